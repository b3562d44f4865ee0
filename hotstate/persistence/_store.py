"""The ``Store`` protocol: the "Store" box of the DESIGN.md diagram (section "Stores").

Every store (memory, SQLite, Valkey) keeps the same contract, checked by one
shared suite in ``tests/contract``:

- ``save`` writes a batch atomically where the backend allows;
- writes are version-monotonic: a stored snapshot is never replaced by one with a
  lower or equal version, whatever order batches arrive in;
- transitions are idempotent by ``(run_id, version)``;
- ``scan`` pages through headers ordered by run id and never decodes a body;
- backend failures surface as ``StoreUnavailableError`` (transient).
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Final, Protocol, Self, runtime_checkable

from hotstate._errors import ConfigError, PersistenceError
from hotstate.actors._snapshot import TERMINAL_STATUSES

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence
    from types import TracebackType

    from hotstate.actors._snapshot import Transition
    from hotstate.persistence._records import (
        RunHeader,
        SaveResult,
        StoredDeadLetter,
        StoredSnapshot,
    )

__all__ = ["FINISHED_STATUSES", "Store"]

FINISHED_STATUSES: Final[frozenset[str]] = frozenset(str(s) for s in TERMINAL_STATUSES)
"""Stored status values ``purge_finished`` may delete: done, failed, cancelled."""


@runtime_checkable
class Store(Protocol):
    """An async persistence tier.

    Attributes:
        tier: the tier's name (``"memory"``, ``"sqlite"``, ``"valkey"`` or a
            user-given one), used in errors and statistics.
    """

    tier: str

    async def open(self) -> None:
        """Connect and prepare the schema. Idempotent.

        Raises:
            StoreUnavailableError: the backend cannot be reached.
        """
        ...

    async def aclose(self) -> None:
        """Release connections. Idempotent."""
        ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    async def save(
        self, snapshots: Sequence[StoredSnapshot], transitions: Sequence[Transition]
    ) -> SaveResult:
        """Write a batch of snapshots and transitions, atomically where possible.

        A snapshot whose stored version is >= its own is skipped (counted as
        stale); a transition already stored for its ``(run_id, version)`` is
        ignored.

        Args:
            snapshots: the newest snapshot per run (any order).
            transitions: the transitions to append.

        Returns:
            What was written.

        Raises:
            StoreUnavailableError: the backend failed; nothing (or, where the
                backend cannot roll back, an idempotent prefix) was written.
        """
        ...

    async def load(self, run_id: str) -> StoredSnapshot | None:
        """Read the stored snapshot of a run.

        Args:
            run_id: the run.

        Returns:
            The snapshot, or None when the run is not stored.

        Raises:
            StoreUnavailableError: the backend failed.
        """
        ...

    async def load_many(self, run_ids: Sequence[str]) -> dict[str, StoredSnapshot]:
        """Read several runs' snapshots in one go.

        Args:
            run_ids: the runs.

        Returns:
            The stored snapshots by run id; missing runs are left out.

        Raises:
            StoreUnavailableError: the backend failed.
        """
        ...

    async def scan(
        self,
        *,
        status: str | Iterable[str] | None = None,
        workflow: str | None = None,
        after: str | None = None,
        limit: int = 1000,
    ) -> list[RunHeader]:
        """Page through run headers ordered by run id, never decoding a body.

        Args:
            status: keep only runs in this status (or any of these statuses).
            workflow: keep only runs of this workflow.
            after: the cursor: return run ids strictly greater than this one.
            limit: the page size (at most this many headers).

        Returns:
            Up to ``limit`` headers; pass the last one's ``run_id`` as ``after``
            for the next page. Fewer than ``limit`` means the end.

        Raises:
            StoreUnavailableError: the backend failed.
        """
        ...

    async def scan_snapshots(
        self,
        *,
        status: str | Iterable[str] | None = None,
        workflow: str | None = None,
        after: str | None = None,
        limit: int = 1000,
    ) -> list[StoredSnapshot]:
        """Page through whole stored snapshots (header, error, body) by run id.

        Recovery's bulk read: one pass instead of ``scan`` then ``load_many``.
        Bodies are returned as stored, not decoded.

        Args:
            status: keep only runs in this status (or any of these statuses).
            workflow: keep only runs of this workflow.
            after: the cursor: run ids strictly greater than this one.
            limit: the page size.

        Returns:
            Up to ``limit`` snapshots ordered by run id.

        Raises:
            StoreUnavailableError: the backend failed.
        """
        ...

    async def history(self, run_id: str) -> list[Transition]:
        """Read a run's stored transitions, ordered by version.

        Args:
            run_id: the run.

        Returns:
            The transitions (empty when none are stored).

        Raises:
            StoreUnavailableError: the backend failed.
        """
        ...

    async def save_dead_letter(self, record: StoredDeadLetter) -> None:
        """Store a dead-letter record, replacing any earlier one for the run.

        Args:
            record: the record.

        Raises:
            StoreUnavailableError: the backend failed.
        """
        ...

    async def save_dead_letters(self, records: Sequence[StoredDeadLetter]) -> None:
        """Store several dead-letter records at once (one transaction / round trip).

        Args:
            records: the records; a later one for the same run replaces an earlier one.

        Raises:
            StoreUnavailableError: the backend failed; nothing was written.
        """
        ...

    async def dead_letters(self) -> list[StoredDeadLetter]:
        """List the dead-letter records, oldest first.

        Returns:
            The records.

        Raises:
            StoreUnavailableError: the backend failed.
        """
        ...

    async def delete_dead_letter(self, run_id: str) -> bool:
        """Remove a run's dead-letter record.

        Args:
            run_id: the run.

        Returns:
            True when a record was removed.

        Raises:
            StoreUnavailableError: the backend failed.
        """
        ...

    async def save_versions(self, snapshots: Sequence[StoredSnapshot]) -> None:
        """Keep these snapshots as point-in-time copies (time travel); idempotent per version.

        Args:
            snapshots: the copies to keep.

        Raises:
            StoreUnavailableError: the backend failed.
        """
        ...

    async def load_version(self, run_id: str, version: int) -> StoredSnapshot | None:
        """Return the newest kept copy of ``run_id`` at or before ``version``.

        Args:
            run_id: the run.
            version: the newest version wanted.

        Returns:
            The copy, or None when none is kept that early.

        Raises:
            StoreUnavailableError: the backend failed.
        """
        ...

    async def purge_finished(self, *, before: float) -> int:
        """Delete finished runs (done, failed, cancelled) last updated before ``before``.

        Their snapshot and history go; dead-letter records stay.

        Args:
            before: wall-clock cut-off (exclusive).

        Returns:
            How many runs were deleted.

        Raises:
            StoreUnavailableError: the backend failed.
        """
        ...


def status_filter(status: str | Iterable[str] | None) -> frozenset[str] | None:
    """Normalize ``scan``'s ``status`` argument to a set of stored values (None = any)."""
    if status is None:
        return None
    if isinstance(status, str):
        return frozenset((str(status),))
    return frozenset(str(s) for s in status)


def check_limit(limit: int) -> None:
    """Reject a non-positive page size."""
    if limit < 1:
        raise ConfigError("limit", limit, "must be >= 1")


class StoreBase:
    """Open/closed bookkeeping shared by the stores: context manager and leak warning."""

    tier: str
    _opened: bool = False

    async def open(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    async def aclose(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def _check_open(self) -> None:
        if not self._opened:
            raise PersistenceError(
                self.tier,
                "store is not open; call `await store.open()` or use `async with`",
            )

    def __del__(self) -> None:
        # aiosqlite's rule (STYLE.md F.22): a leaked open store is a test failure.
        if self._opened:
            warnings.warn(
                f"{type(self).__name__} (tier {self.tier!r}) was garbage-collected "
                "while open; call `await store.aclose()` or use `async with`",
                ResourceWarning,
                stacklevel=2,
            )
