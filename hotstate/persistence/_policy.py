"""``FlushPolicy``: when a tier flushes, how much it may hold, and whether steps wait for it; ``Tier``: a store and its policy.

Pure: ``flush_due`` takes ``now`` and the pending figures as arguments, so it is
tested with plain numbers (STYLE.md F.19).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, final

from hotstate._errors import ConfigError
from hotstate._validate import integer, number
from hotstate.persistence._store import Store

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = ["FlushPolicy", "Tier"]


def _positive(field: str, value: object, *, allow_zero: bool = False) -> None:
    number(field, value, strict=not allow_zero)


def _count(field: str, value: object) -> None:
    if value is not None:
        integer(field, value, minimum=1)


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class FlushPolicy:
    """How one tier's persister flushes.

    Write-behind (the default): steps never wait for I/O; the latest snapshot
    per run and every transition are flushed every ``interval`` seconds, or
    sooner when ``max_batch_rows`` runs are dirty. A crash can lose at most
    ``interval`` plus one flush duration of work.

    Write-through (``write_through=True``): a run advances only after its
    snapshot is durable in this tier. Every run waiting at that moment shares
    one transaction (group commit); ``interval`` is ignored.

    Attributes:
        interval: seconds between write-behind flushes (> 0).
        max_batch_rows: flush early once this many runs are dirty (>= 1).
        max_pending_rows: memory bound in unflushed rows (snapshots + transitions);
            above it, steps wait (backpressure) instead of anything being dropped.
            None: no bound.
        max_pending_bytes: memory bound in estimated bytes of unflushed
            snapshots (estimated from the sizes measured at the last flush). None: no bound.
        write_through: steps wait until their snapshot is durable in this tier.
        ack_timeout: seconds ``wait_durable`` waits before ``DurabilityTimeoutError``.
        retry_initial: first backoff after a failed flush (seconds).
        retry_max: cap of that backoff (seconds).
        keep_every: also keep a point-in-time copy of each run about every this
            many versions (time travel, ``Runtime.snapshot_at``); None keeps only
            the latest snapshot. With coalescing, the copy kept for a span of
            ``keep_every`` versions is the first one flushed in it.
        cache: the tier is a cache, not a guarantee: while it is failing and
            past its memory bound, what is pending for it is dropped instead of
            steps waiting (no backpressure from a cache outage), and once it
            answers again the runtime writes every run it holds into it anew.
            A cache tier is never write-through, never an acknowledging tier
            (``Runtime(ack_tiers=...)``), and a ``spawn`` of a stored id does
            not wait for it when it is down. The other tiers keep every guarantee.

    Raises:
        ConfigError: a field is out of range; the message names it.
    """

    interval: float = 1.0
    max_batch_rows: int = 10_000
    max_pending_rows: int | None = 1_000_000
    max_pending_bytes: int | None = None
    write_through: bool = False
    ack_timeout: float = 5.0
    retry_initial: float = 0.05
    retry_max: float = 5.0
    keep_every: int | None = None
    cache: bool = False

    def __post_init__(self) -> None:
        _positive("FlushPolicy.interval", self.interval)
        _count("FlushPolicy.max_batch_rows", self.max_batch_rows)
        _count("FlushPolicy.max_pending_rows", self.max_pending_rows)
        _count("FlushPolicy.max_pending_bytes", self.max_pending_bytes)
        _positive("FlushPolicy.ack_timeout", self.ack_timeout)
        _positive("FlushPolicy.retry_initial", self.retry_initial)
        _positive("FlushPolicy.retry_max", self.retry_max)
        _count("FlushPolicy.keep_every", self.keep_every)
        if self.retry_max < self.retry_initial:
            raise ConfigError("FlushPolicy.retry_max", self.retry_max, "must be >= retry_initial")
        if not isinstance(self.write_through, bool):
            raise ConfigError("FlushPolicy.write_through", self.write_through, "must be a bool")
        if not isinstance(self.cache, bool):
            raise ConfigError("FlushPolicy.cache", self.cache, "must be a bool")
        if self.cache and self.write_through:
            raise ConfigError("FlushPolicy.cache", self.cache, "a cache tier cannot be write-through")

    @classmethod
    def write_behind(cls, interval: float, **options: int | float | None) -> FlushPolicy:
        """A write-behind policy flushing every ``interval`` seconds.

        Args:
            interval: seconds between flushes.
            **options: other fields.

        Returns:
            The policy.

        Raises:
            ConfigError: a field is out of range, or no field has an option's name.
        """
        _known("FlushPolicy.write_behind", options)
        return cls(interval=interval, **options)  # type: ignore[arg-type]

    @classmethod
    def through(cls, **options: int | float | None) -> FlushPolicy:
        """A write-through policy with group commit.

        Args:
            **options: other fields.

        Returns:
            The policy.

        Raises:
            ConfigError: a field is out of range, or no field has an option's name.
        """
        _known("FlushPolicy.through", options)
        return cls(write_through=True, **options)  # type: ignore[arg-type]

    def flush_due(self, *, now: float, last_flush: float, pending_rows: int, dirty_runs: int) -> bool:
        """Decide whether a flush should start now.

        Args:
            now: the current monotonic time.
            last_flush: when the previous flush started.
            pending_rows: unflushed snapshots + transitions.
            dirty_runs: runs with an unflushed snapshot.

        Returns:
            True if something is pending and the interval has passed, the batch
            is full, or the policy is write-through.
        """
        if pending_rows <= 0:
            return False
        if self.write_through or dirty_runs >= self.max_batch_rows:
            return True
        return now - last_flush >= self.interval

    def over_bound(self, *, pending_rows: int, pending_bytes: float) -> bool:
        """Return True when unflushed state passes the memory bound (steps must wait).

        Args:
            pending_rows: unflushed snapshots + transitions.
            pending_bytes: their estimated size in bytes.

        Returns:
            True above either bound.
        """
        if self.max_pending_rows is not None and pending_rows > self.max_pending_rows:
            return True
        return self.max_pending_bytes is not None and pending_bytes > self.max_pending_bytes


def _known(where: str, options: Mapping[str, object]) -> None:
    names = {f.name for f in fields(FlushPolicy)}
    for option in options:
        if option not in names:
            raise ConfigError(
                f"{where}.{option}", options[option], f"FlushPolicy has no such field (fields: {sorted(names)})"
            )


@final
@dataclass(frozen=True, slots=True)
class Tier:
    """A store and the policy its persister flushes with.

    Attributes:
        store: where snapshots go (a ``Store``).
        policy: when and how they go there.

    Raises:
        ConfigError: ``store`` is not a ``Store`` or ``policy`` not a ``FlushPolicy``.
    """

    store: Store
    policy: FlushPolicy = field(default_factory=FlushPolicy)

    def __post_init__(self) -> None:
        given: object = self.store  # callers may ignore the type hints
        if not isinstance(given, Store):
            raise ConfigError("Tier.store", given, f"must be a Store, not {type(given).__name__}")
        policy: object = self.policy
        if not isinstance(policy, FlushPolicy):
            raise ConfigError("Tier.policy", policy, f"must be a FlushPolicy, not {type(policy).__name__}")
