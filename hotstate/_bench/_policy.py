"""Flush policies under trial, spelled one way: ``"valkey:0.01,sqlite:1"``.

A policy is its tiers in the runtime's order, each a store kind and a
write-behind interval in seconds, or ``through`` for write-through with group
commit (SQLite then writes with ``synchronous=FULL``); ``:ack`` after a tier
names it in ``Runtime(ack_tiers=...)``, so every acknowledgement waits for it
(``"valkey:0.01,sqlite:1:ack"``). A ``postgres`` tier is a ``PostgresStore``
in a schema named after the figure's prefix (``postgres_schema``), on the
server given as ``postgres_url`` (``"valkey:0.01,postgres:1"`` is the
multi-machine deployment). The bench's named
policies, the sweep's points, the reliability suite and ``hotstate demo``
(whose ``--valkey-interval V --sqlite-interval S`` is ``valkey:V,sqlite:S``)
all parse into ``Policy``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hotstate import FlushPolicy, Tier
from hotstate.persistence import PostgresStore, SQLiteStore, ValkeyStore

if TYPE_CHECKING:
    from pathlib import Path

    from hotstate.persistence import Store

KINDS = ("valkey", "sqlite", "postgres")


def postgres_schema(prefix: str) -> str:
    """The PostgreSQL schema of a figure whose Valkey keys start with ``prefix``: one a figure, dropped after it."""
    name = re.sub(r"[^a-z0-9_]", "_", prefix.lower())
    return (name if name[:1].isalpha() else f"hs_{name}")[:63]


def _interval(value: str, kind: str, spec: str) -> float | None:
    """A tier's interval: ``through`` (None) or positive, finite seconds."""
    if value == "through":
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(
            f"bad interval {value!r} for tier {kind!r} in policy {spec!r}: seconds > 0 or 'through' (e.g. {kind}:0.1)"
        )
    return seconds


@dataclass(frozen=True, slots=True)
class TierSpec:
    """One tier of a policy."""

    kind: str  # one of KINDS
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
            ValueError: an unknown tier kind, a missing or bad interval, or an unknown flag.
        """
        tiers = []
        for part in spec.split(","):
            kind, _, value = part.strip().partition(":")
            value, _, flag = value.partition(":")
            if kind not in KINDS:
                raise ValueError(f"unknown tier {kind!r} in policy {spec!r} (choose from {', '.join(KINDS)})")
            if flag not in ("", "ack"):
                raise ValueError(f"unknown flag {flag!r} in policy {spec!r} (only 'ack')")
            tiers.append(TierSpec(kind, _interval(value, kind, spec), ack=flag == "ack"))
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

    def stores(
        self,
        *,
        sqlite: str | Path,
        valkey_url: str,
        prefix: str,
        writing: bool = False,
        postgres_url: str | None = None,
    ) -> list[Store]:
        """One new store per tier (``writing``: write-through SQLite uses ``synchronous=FULL``).

        A ``postgres`` tier writes in schema ``postgres_schema(prefix)`` on ``postgres_url``.

        Raises:
            ValueError: a ``postgres`` tier, and no ``postgres_url``.
        """
        if postgres_url is None and any(t.kind == "postgres" for t in self.tiers):
            raise ValueError(f"policy {self.spec!r} has a postgres tier: it needs a PostgreSQL URL (--postgres-url)")
        stores: list[Store] = []
        for t in self.tiers:
            if t.kind == "sqlite":
                stores.append(SQLiteStore(sqlite, synchronous="FULL" if writing and t.interval is None else "NORMAL"))
            elif t.kind == "postgres" and postgres_url is not None:
                stores.append(PostgresStore(postgres_url, schema=postgres_schema(prefix)))
            else:
                stores.append(ValkeyStore(valkey_url, prefix=prefix))
        return stores

    def build_tiers(
        self, *, sqlite: str | Path, valkey_url: str, prefix: str, postgres_url: str | None = None
    ) -> list[Tier]:
        """The runtime's tiers for this policy, on new stores.

        Raises:
            ValueError: a ``postgres`` tier, and no ``postgres_url``.
        """
        stores = self.stores(
            sqlite=sqlite, valkey_url=valkey_url, prefix=prefix, writing=True, postgres_url=postgres_url
        )
        return [
            Tier(store, FlushPolicy.through() if t.interval is None else FlushPolicy(interval=t.interval))
            for t, store in zip(self.tiers, stores, strict=True)
        ]


POLICIES: dict[str, Policy] = {
    "write-behind": Policy.parse("valkey:0.01,sqlite:1", "write-behind valkey 10 ms + sqlite 1 s"),
    "sqlite-behind": Policy.parse("sqlite:0.1", "sqlite-behind 100 ms"),
    "write-through sqlite": Policy.parse("sqlite:through", "write-through sqlite FULL, group commit"),
    "write-through valkey": Policy.parse("valkey:through", "write-through valkey"),
    "postgres-behind": Policy.parse("postgres:0.1", "write-behind postgres 100 ms"),
    "write-behind postgres": Policy.parse("valkey:0.01,postgres:1", "write-behind valkey 10 ms + postgres 1 s"),
    "write-through postgres": Policy.parse("postgres:through", "write-through postgres, group commit"),
    "write-behind+ack": Policy.parse(
        "valkey:0.01,sqlite:1:ack", "write-behind valkey 10 ms + sqlite 1 s, ack_tiers=[sqlite]"
    ),
}


def find_policy(name: str) -> Policy:
    """Look a policy up by key (``"write-behind"``, ...), by full name, or build one.

    ``"sqlite-behind 0.25"`` / ``"valkey-behind 0.01"`` / ``"postgres-behind 0.1"`` give one write-behind tier
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
