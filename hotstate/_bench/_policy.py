"""Flush policies under trial, spelled one way: ``"valkey:0.01,sqlite:1"``.

A policy is its tiers in the runtime's order, each a store kind and a
write-behind interval in seconds, or ``through`` for write-through with group
commit (SQLite then writes with ``synchronous=FULL``); ``:ack`` after a tier
names it in ``Runtime(ack_tiers=...)``, so every acknowledgement waits for it
(``"valkey:0.01,sqlite:1:ack"``). The bench's named
policies, the sweep's points, the reliability suite and ``hotstate demo``
(whose ``--valkey-interval V --sqlite-interval S`` is ``valkey:V,sqlite:S``)
all parse into ``Policy``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from hotstate import FlushPolicy, Tier
from hotstate.persistence import SQLiteStore, ValkeyStore

if TYPE_CHECKING:
    from pathlib import Path

    from hotstate.persistence import Store

KINDS = ("valkey", "sqlite")


@dataclass(frozen=True, slots=True)
class TierSpec:
    """One tier of a policy."""

    kind: str  # "valkey" or "sqlite"
    interval: float | None  # the write-behind interval in seconds; None is write-through
    ack: bool = False  # named in Runtime(ack_tiers=...): acknowledgements wait for it

    def __str__(self) -> str:
        interval = "through" if self.interval is None else repr(self.interval)
        return f"{self.kind}:{interval}{':ack' if self.ack else ''}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Policy:
    """A flush policy under trial."""

    name: str  # how reports name it
    tiers: tuple[TierSpec, ...]  # in the runtime's order

    @classmethod
    def parse(cls, spec: str, name: str | None = None) -> Policy:
        """``"valkey:0.01,sqlite:1"``: a Valkey tier every 10 ms, then SQLite every second.

        Args:
            spec: comma-separated ``kind:interval[:ack]`` (seconds, or ``through``).
            name: how reports name it (default: the spec).

        Raises:
            ValueError: an unknown tier kind, a bad interval or flag.
        """
        tiers = []
        for part in spec.split(","):
            kind, _, value = part.strip().partition(":")
            value, _, flag = value.partition(":")
            if kind not in KINDS:
                raise ValueError(f"unknown tier {kind!r} in policy {spec!r}")
            if flag not in ("", "ack"):
                raise ValueError(f"unknown flag {flag!r} in policy {spec!r} (only 'ack')")
            tiers.append(TierSpec(kind, None if value == "through" else float(value), ack=flag == "ack"))
        return cls(name=spec if name is None else name, tiers=tuple(tiers))

    @property
    def spec(self) -> str:
        """The policy as ``parse`` reads it."""
        return ",".join(map(str, self.tiers))

    @property
    def write_through(self) -> bool:
        """True when some tier is write-through (nothing acknowledged may be lost)."""
        return any(t.interval is None for t in self.tiers)

    @property
    def ack_tiers(self) -> tuple[str, ...]:
        """The tiers named in ``Runtime(ack_tiers=...)``."""
        return tuple(t.kind for t in self.tiers if t.ack)

    @property
    def acknowledging(self) -> tuple[str, ...]:
        """The tiers every acknowledgement waits for: the write-through ones and ``ack_tiers``."""
        return tuple(t.kind for t in self.tiers if t.interval is None or t.ack)

    @property
    def interval(self) -> float:
        """The loss window's interval: the shortest write-behind interval (recovery
        takes the newest copy in any tier); 0 under write-through."""
        if self.write_through:
            return 0.0
        return min(t.interval for t in self.tiers if t.interval is not None)

    @property
    def window_tier(self) -> int:
        """Index of the tier that bounds the loss window (write-through first, else the fastest)."""
        return min(range(len(self.tiers)), key=lambda j: -1.0 if (i := self.tiers[j].interval) is None else i)

    def stores(self, *, sqlite: str | Path, valkey_url: str, prefix: str, writing: bool = False) -> list[Store]:
        """One new store per tier (``writing``: write-through SQLite uses ``synchronous=FULL``)."""
        return [
            SQLiteStore(sqlite, synchronous="FULL" if writing and t.interval is None else "NORMAL")
            if t.kind == "sqlite"
            else ValkeyStore(valkey_url, prefix=prefix)
            for t in self.tiers
        ]

    def build_tiers(self, *, sqlite: str | Path, valkey_url: str, prefix: str) -> list[Tier]:
        """The runtime's tiers for this policy, on new stores."""
        stores = self.stores(sqlite=sqlite, valkey_url=valkey_url, prefix=prefix, writing=True)
        return [
            Tier(store, FlushPolicy.through() if t.interval is None else FlushPolicy(interval=t.interval))
            for t, store in zip(self.tiers, stores, strict=True)
        ]


POLICIES: dict[str, Policy] = {
    "write-behind": Policy.parse("valkey:0.01,sqlite:1", "write-behind valkey 10 ms + sqlite 1 s"),
    "sqlite-behind": Policy.parse("sqlite:0.1", "sqlite-behind 100 ms"),
    "write-through sqlite": Policy.parse("sqlite:through", "write-through sqlite FULL, group commit"),
    "write-through valkey": Policy.parse("valkey:through", "write-through valkey"),
    "write-behind+ack": Policy.parse(
        "valkey:0.01,sqlite:1:ack", "write-behind valkey 10 ms + sqlite 1 s, ack_tiers=[sqlite]"
    ),
}


def find_policy(name: str) -> Policy:
    """Look a policy up by key (``"write-behind"``, ...), by full name, or build one.

    ``"sqlite-behind 0.25"`` / ``"valkey-behind 0.01"`` give one write-behind tier
    at that interval (seconds); a spec such as ``"valkey:0.01,sqlite:1"`` is
    taken as it is.

    Raises:
        ValueError: the name is not understood.
    """
    if name in POLICIES:
        return POLICIES[name]
    for p in POLICIES.values():
        if p.name == name:
            return p
    kind, _, interval = name.partition("-behind ")
    if interval and kind in KINDS:
        seconds = float(interval)
        label = f"{seconds * 1000:g} ms" if seconds < 1 else f"{seconds:g} s"
        return Policy(name=f"{kind}-behind {label}", tiers=(TierSpec(kind, seconds),))
    return Policy.parse(name)
