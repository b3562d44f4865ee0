"""The ``Store`` protocol: what every tier (memory, SQLite, Valkey) promises (DESIGN.md, Stores)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from hotstate.actors import Transition
    from hotstate.persistence._records import RunHeader, SaveResult, StoredDeadLetter, StoredSnapshot

__all__ = ["Store"]


@runtime_checkable
class Store(Protocol):
    """An async, batched, version-monotonic store of snapshots, transitions and dead letters."""

    tier: str

    async def open(self) -> None:
        """Connect and create what is missing."""
        ...

    async def aclose(self) -> None:
        """Close; idempotent."""
        ...

    async def save(self, snapshots: Sequence[StoredSnapshot], transitions: Sequence[Transition]) -> SaveResult:
        """Write a batch atomically; never replace a snapshot with a lower or equal version."""
        ...

    async def load(self, run_id: str) -> StoredSnapshot | None:
        """Return the stored snapshot of ``run_id``, or None."""
        ...

    async def load_many(self, run_ids: Sequence[str]) -> dict[str, StoredSnapshot]:
        """Return the stored snapshots of those runs that exist."""
        ...

    async def scan(
        self,
        *,
        status: str | Iterable[str] | None = None,
        workflow: str | None = None,
        after: str | None = None,
        limit: int = 1000,
    ) -> list[RunHeader]:
        """Page through headers in run-id order, without decoding bodies."""
        ...

    async def history(self, run_id: str) -> list[Transition]:
        """Return the stored transitions of ``run_id`` ordered by version."""
        ...

    async def save_dead_letter(self, record: StoredDeadLetter) -> None:
        """Store (or replace) a dead-letter record."""
        ...

    async def dead_letters(self) -> list[StoredDeadLetter]:
        """Return every dead-letter record."""
        ...

    async def delete_dead_letter(self, run_id: str) -> bool:
        """Delete a dead-letter record; True if one existed."""
        ...

    async def purge_finished(self, *, before: float) -> int:
        """Delete finished runs updated before ``before``; returns how many."""
        ...
