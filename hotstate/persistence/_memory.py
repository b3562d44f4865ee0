"""``MemoryStore``: a Store kept in dicts, for tests and memory-only deployments.

It keeps the full Store contract (docs/architecture.md "Persistence"), so the contract suite
runs against it like any other tier. Stored records are frozen and hold only
immutable values (``bytes`` bodies are copied from any buffer), so callers can
never change what the store holds.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, final

from hotstate._errors import StoreUnavailableError
from hotstate.persistence._records import SaveResult, StoredSnapshot
from hotstate.persistence._store import (
    FINISHED_STATUSES,
    StoreBase,
    check_limit,
    status_filter,
)

if sys.version_info >= (3, 12):
    from typing import override
else:
    from typing_extensions import override

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from hotstate.actors._snapshot import Transition
    from hotstate.persistence._records import RunHeader, StoredDeadLetter

__all__ = ["MemoryStore"]


def _own(stored: StoredSnapshot) -> StoredSnapshot:
    if type(stored.body) is bytes:
        return stored
    return StoredSnapshot(header=stored.header, error=stored.error, body=bytes(stored.body))


@final
class MemoryStore(StoreBase):
    """A Store in process memory. Nothing survives the process.

    Args:
        tier: the tier's name.
    """

    def __init__(self, *, tier: str = "memory") -> None:
        self.tier = tier
        self._runs: dict[str, StoredSnapshot] = {}
        self._history: dict[str, dict[int, Transition]] = {}
        self._dead: dict[str, StoredDeadLetter] = {}
        self._versions: dict[str, dict[int, StoredSnapshot]] = {}
        # Testability hooks (fault injection without mocks): while `down` is
        # true every call fails like an unreachable server; `saves` counts
        # successful save() calls, which is how tests see group commit.
        self.down = False
        self.saves = 0

    @override
    def _check_open(self) -> None:
        super()._check_open()
        if self.down:
            raise StoreUnavailableError(self.tier, "store is down (MemoryStore.down)")

    @override
    async def open(self) -> None:
        self._opened = True

    @override
    async def aclose(self) -> None:
        self._opened = False

    @override
    async def save(self, snapshots: Sequence[StoredSnapshot], transitions: Sequence[Transition]) -> SaveResult:
        self._check_open()
        written = stale = added = 0
        # No await below: the whole batch is applied atomically w.r.t. other tasks.
        for stored in snapshots:
            current = self._runs.get(stored.header.run_id)
            if current is not None and current.header.version >= stored.header.version:
                stale += 1
                continue
            self._runs[stored.header.run_id] = _own(stored)
            written += 1
        for t in transitions:
            per_run = self._history.setdefault(t.run_id, {})
            if t.version not in per_run:
                per_run[t.version] = t
                added += 1
        self.saves += 1
        return SaveResult(written=written, stale=stale, transitions=added)

    @override
    async def load(self, run_id: str) -> StoredSnapshot | None:
        self._check_open()
        return self._runs.get(run_id)

    @override
    async def load_many(self, run_ids: Sequence[str]) -> dict[str, StoredSnapshot]:
        self._check_open()
        return {r: s for r in run_ids if (s := self._runs.get(r)) is not None}

    @override
    async def scan(
        self,
        *,
        status: str | Iterable[str] | None = None,
        workflow: str | None = None,
        after: str | None = None,
        limit: int = 1000,
    ) -> list[RunHeader]:
        self._check_open()
        check_limit(limit)
        statuses = status_filter(status)
        headers = [
            s.header
            for s in self._runs.values()
            if (after is None or s.header.run_id > after)
            and (statuses is None or s.header.status in statuses)
            and (workflow is None or s.header.workflow == workflow)
        ]
        headers.sort(key=lambda h: h.run_id)
        return headers[:limit]

    @override
    async def scan_snapshots(
        self,
        *,
        status: str | Iterable[str] | None = None,
        workflow: str | None = None,
        after: str | None = None,
        limit: int = 1000,
    ) -> list[StoredSnapshot]:
        headers = await self.scan(status=status, workflow=workflow, after=after, limit=limit)
        return [self._runs[h.run_id] for h in headers]

    @override
    async def history(self, run_id: str) -> list[Transition]:
        self._check_open()
        per_run = self._history.get(run_id, {})
        return [per_run[v] for v in sorted(per_run)]

    @override
    async def save_dead_letter(self, record: StoredDeadLetter) -> None:
        self._check_open()
        self._dead[record.run_id] = record

    @override
    async def save_dead_letters(self, records: Sequence[StoredDeadLetter]) -> None:
        self._check_open()
        for record in records:
            self._dead[record.run_id] = record

    @override
    async def dead_letters(self) -> list[StoredDeadLetter]:
        self._check_open()
        return sorted(self._dead.values(), key=lambda d: (d.at, d.run_id))

    @override
    async def delete_dead_letter(self, run_id: str) -> bool:
        self._check_open()
        return self._dead.pop(run_id, None) is not None

    @override
    async def save_versions(self, snapshots: Sequence[StoredSnapshot]) -> None:
        self._check_open()
        for stored in snapshots:
            kept = self._versions.setdefault(stored.header.run_id, {})
            kept.setdefault(stored.header.version, _own(stored))

    @override
    async def load_version(self, run_id: str, version: int) -> StoredSnapshot | None:
        self._check_open()
        kept = self._versions.get(run_id, {})
        older = [v for v in kept if v <= version]
        return kept[max(older)] if older else None

    @override
    async def purge_finished(self, *, before: float) -> int:
        self._check_open()
        doomed = [
            run_id
            for run_id, s in self._runs.items()
            if s.header.status in FINISHED_STATUSES and s.header.updated_at < before
        ]
        for run_id in doomed:
            del self._runs[run_id]
            self._history.pop(run_id, None)
            self._versions.pop(run_id, None)
        return len(doomed)
