"""``MemoryStore``: the Store contract in dicts (for tests, and as the reference implementation)."""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, final

from hotstate._errors import StoreUnavailableError
from hotstate.persistence._records import RunHeader, SaveResult, StoredDeadLetter, StoredSnapshot

if TYPE_CHECKING:
    from hotstate.actors import Transition

__all__ = ["MemoryStore"]

_TERMINAL = frozenset({"done", "failed", "cancelled"})


@final
class MemoryStore:
    """A store held in memory: the same contract as SQLite and Valkey, no durability.

    Args:
        tier: the tier's name.
    """

    def __init__(self, *, tier: str = "memory") -> None:
        self.tier = tier
        self._runs: dict[str, StoredSnapshot] = {}
        self._ids: list[str] = []  # sorted, for paging
        self._history: dict[str, dict[int, Transition]] = {}
        self._dead: dict[str, StoredDeadLetter] = {}
        self._open = False
        # Testability hooks (fault injection without mocks): `down` makes every
        # call fail like an unreachable server; `fail_next` fails one call.
        self.down = False
        self.fail_next: Exception | None = None
        self.saves = 0  # save() calls that succeeded: group commit shows as few saves

    async def open(self) -> None:
        """Mark the store open."""
        self._open = True

    async def aclose(self) -> None:
        """Mark the store closed (its data stays, like a file would)."""
        self._open = False

    async def __aenter__(self) -> MemoryStore:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def _check(self) -> None:
        if not self._open:
            raise StoreUnavailableError(self.tier, "store is not open")
        if self.down:
            raise StoreUnavailableError(self.tier, "store is down")
        if self.fail_next is not None:
            exc, self.fail_next = self.fail_next, None
            raise StoreUnavailableError(self.tier, str(exc)) from exc

    async def save(self, snapshots: Sequence[StoredSnapshot], transitions: Sequence[Transition]) -> SaveResult:
        """Write a batch: version-monotonic snapshots, idempotent transitions."""
        self._check()
        written = stale = added = 0
        for s in snapshots:
            rid = s.header.run_id
            cur = self._runs.get(rid)
            if cur is not None and cur.header.version >= s.header.version:
                stale += 1
                continue
            if cur is None:
                bisect.insort(self._ids, rid)
            self._runs[rid] = s
            written += 1
        for t in transitions:
            h = self._history.setdefault(t.run_id, {})
            if t.version not in h:
                h[t.version] = t
                added += 1
        self.saves += 1
        return SaveResult(written=written, stale=stale, transitions=added)

    async def load(self, run_id: str) -> StoredSnapshot | None:
        """Return the stored snapshot or None."""
        self._check()
        return self._runs.get(run_id)

    async def load_many(self, run_ids: Sequence[str]) -> dict[str, StoredSnapshot]:
        """Return the stored snapshots that exist."""
        self._check()
        return {rid: s for rid in run_ids if (s := self._runs.get(rid)) is not None}

    async def scan(
        self,
        *,
        status: str | Iterable[str] | None = None,
        workflow: str | None = None,
        after: str | None = None,
        limit: int = 1000,
    ) -> list[RunHeader]:
        """Page headers in run-id order."""
        self._check()
        wanted = {status} if isinstance(status, str) else (set(status) if status is not None else None)
        start = 0 if after is None else bisect.bisect_right(self._ids, after)
        out: list[RunHeader] = []
        for rid in self._ids[start:]:
            h = self._runs[rid].header
            if (wanted is None or h.status in wanted) and (workflow is None or h.workflow == workflow):
                out.append(h)
                if len(out) >= limit:
                    break
        return out

    async def history(self, run_id: str) -> list[Transition]:
        """Return transitions ordered by version."""
        self._check()
        h = self._history.get(run_id, {})
        return [h[v] for v in sorted(h)]

    async def save_dead_letter(self, record: StoredDeadLetter) -> None:
        """Store a dead-letter record."""
        self._check()
        self._dead[record.run_id] = record

    async def dead_letters(self) -> list[StoredDeadLetter]:
        """Return the dead-letter records."""
        self._check()
        return list(self._dead.values())

    async def delete_dead_letter(self, run_id: str) -> bool:
        """Delete a dead-letter record."""
        self._check()
        return self._dead.pop(run_id, None) is not None

    async def purge_finished(self, *, before: float) -> int:
        """Delete finished runs last updated before ``before``."""
        self._check()
        gone = [rid for rid, s in self._runs.items() if s.header.status in _TERMINAL and s.header.updated_at < before]
        for rid in gone:
            del self._runs[rid]
            self._history.pop(rid, None)
            self._ids.remove(rid)
        return len(gone)
