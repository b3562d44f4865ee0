"""``MemoryStore``: a Store kept in dicts, for tests and memory-only deployments.

It keeps the full Store contract (docs/architecture.md "Persistence"), so the contract suite
runs against it like any other tier. Stored records are frozen and hold only
immutable values (``bytes`` bodies are copied from any buffer), so callers can
never change what the store holds. Like SQLite, it stores the fields it is
given and checks their types when it reads them (``stored_problem``).

Ownership (design/ownership.md §4.5) works as in the other stores: a fence
per shard in a dict, ``(epoch, version)`` order, and a shard count fixed at
construction. Several runtimes of one process may share one object, as
processes share a database.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, final

from hotstate._errors import CodecError, StoreUnavailableError
from hotstate.persistence._records import SaveResult, StoredSnapshot
from hotstate.persistence._shards import DEFAULT_SHARDS, check_shards, judge_fences, shard_of
from hotstate.persistence._store import (
    FINISHED_STATUSES,
    StoreBase,
    WriterMark,
    advance_mark,
    bad_row,
    check_limit,
    render_id,
    status_filter,
    stored_problem,
    unwritable,
    without,
)

if sys.version_info >= (3, 12):
    from typing import override
else:
    from typing_extensions import override

if TYPE_CHECKING:
    from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence

    from hotstate.actors._snapshot import Transition
    from hotstate.persistence._records import BadRow, RunHeader, StoredDeadLetter
    from hotstate.persistence._shards import Fence

__all__ = ["MemoryStore"]


def _own(stored: StoredSnapshot) -> StoredSnapshot:
    if type(stored.body) is bytes:
        return stored
    return StoredSnapshot(header=stored.header, error=stored.error, body=bytes(stored.body))


def _conflicts(runs: Mapping[str, StoredSnapshot], snapshots: Sequence[StoredSnapshot]) -> dict[str, int]:
    """The runs whose highest ``(epoch, version)`` in the batch is below what ``runs`` now holds (after the batch)."""
    top: dict[str, tuple[int, int]] = {}
    for s in snapshots:
        h = s.header
        pair = (h.epoch, h.version)
        if h.run_id not in top or pair > top[h.run_id]:
            top[h.run_id] = pair
    return {
        rid: held.version
        for rid, pair in top.items()
        if type((held := runs[rid].header).version) is int
        and type(held.epoch) is int
        and (held.epoch, held.version) > pair
    }


def _newer(held: RunHeader, header: RunHeader) -> int:
    """How ``held`` (stored) orders against ``header`` by ``(epoch, version)``: 1 above, 0 equal, -1 below.

    A stored version or epoch that is not an int (a malformed row, see
    ``stored_problem``) orders below every pair: the row is replaced.
    """
    if type(held.version) is not int or type(held.epoch) is not int:
        return -1
    mine, theirs = (held.epoch, held.version), (header.epoch, header.version)
    return (mine > theirs) - (mine < theirs)


@final
class MemoryStore(StoreBase):
    """A Store in process memory. Nothing survives the process.

    Args:
        tier: the tier's name.
        shards: the shard count (``shard_of``); None: ``DEFAULT_SHARDS``.
            The object is its own record: the count never changes.

    Attributes:
        shards: the shard count.

    Raises:
        ConfigError: ``shards`` is not a shard count.
    """

    def __init__(self, *, tier: str = "memory", shards: int | None = None) -> None:
        self.tier = tier
        self.shards = DEFAULT_SHARDS if shards is None else check_shards("shards", shards)
        # Shard -> (epoch, owner): the newest that sealed it or wrote to it.
        self._fences: dict[int, tuple[int, str]] = {}
        self._runs: dict[str, StoredSnapshot] = {}
        self._history: dict[str, dict[int, Transition]] = {}
        self._dead: dict[str, StoredDeadLetter] = {}
        self._versions: dict[str, dict[int, StoredSnapshot]] = {}
        # Writer id -> (high, lost) mark (Store: "goes back in time"). A test
        # rolls the store back by putting copies of these dicts back.
        self._marks: dict[str, tuple[int, int]] = {}
        self._mark = WriterMark()
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
        if self._opened:
            return
        self._mark = mark = WriterMark()
        _, seq = mark.next()
        self._marks[mark.writer] = (seq, 0)
        mark.stored(seq)
        self._opened = True

    @override
    async def aclose(self) -> None:
        if self._opened:
            self._marks.pop(self._mark.writer, None)
        self._opened = False

    @override
    async def save(
        self, snapshots: Sequence[StoredSnapshot], transitions: Sequence[Transition], *, fence: Fence | None = None
    ) -> SaveResult:
        """Apply the batch at once (no ``await``), rejecting what SQLite and Valkey would reject.

        Dicts could hold anything, but a test run on this store must see the
        rejections a real store makes (``unwritable``). With ``fence``, the
        runs of fenced shards are dropped before anything is written.
        """
        self._check_open()
        written = stale = added = 0
        above = False
        rejected = unwritable(snapshots, transitions)
        if rejected:
            snapshots, transitions = without(rejected, snapshots, transitions)
        # No await below: the whole batch is applied atomically w.r.t. other tasks.
        fenced: dict[int, int] = {}
        if fence is not None:
            snapshots, transitions, fenced = self._fenced(fence, snapshots, transitions)
        mark = self._mark
        floor, seq = mark.next()
        self._marks[mark.writer], reset = advance_mark(self._marks.get(mark.writer), floor, seq)
        for stored in snapshots:
            current = self._runs.get(stored.header.run_id)
            if current is not None and (order := _newer(current.header, stored.header)) >= 0:
                stale += 1
                above = above or order > 0
                continue
            self._runs[stored.header.run_id] = _own(stored)
            written += 1
        for t in transitions:
            per_run = self._history.setdefault(t.run_id, {})
            if t.version not in per_run:
                per_run[t.version] = t
                added += 1
        self.saves += 1
        mark.stored(seq)
        if above or rejected or fenced:  # an equal pair is a retried batch, not a conflict
            return SaveResult(
                written=written,
                stale=stale,
                transitions=added,
                reset=reset,
                conflicts=_conflicts(self._runs, snapshots) if above else {},
                rejected=rejected,
                fenced=fenced,
            )
        return SaveResult(written=written, stale=stale, transitions=added, reset=reset)

    def _fenced(
        self, fence: Fence, snapshots: Sequence[StoredSnapshot], transitions: Sequence[Transition]
    ) -> tuple[Sequence[StoredSnapshot], Sequence[Transition], dict[int, int]]:
        """The batch without its fenced shards' runs, and those shards; raises the older fences it meets."""
        shards = self.shards
        of = {
            rid: shard_of(rid, shards) for rid in {s.header.run_id for s in snapshots} | {t.run_id for t in transitions}
        }
        lost = self._judge(fence, set(of.values()))
        if not lost:
            return snapshots, transitions, lost
        return (
            [s for s in snapshots if of[s.header.run_id] not in lost],
            [t for t in transitions if of[t.run_id] not in lost],
            lost,
        )

    def _judge(self, fence: Fence, shards: Iterable[int]) -> dict[int, int]:
        """Apply ``fence_verdict`` to each shard, raising the older fences; shard -> stored epoch for those fenced.

        A shard ``fence.epochs`` does not name is fenced (its stored epoch, 0 when it has no fence).
        """
        lost, raised = judge_fences(self._fences, fence, shards)
        for shard, epoch, owner in raised:
            self._fences[shard] = (epoch, owner)
        return lost

    @override
    async def seal(self, fence: Fence) -> dict[int, int]:
        self._check_open()
        return self._judge(fence, list(fence.epochs))

    def _checked(self, stored: StoredSnapshot, bad_rows: list[BadRow] | None, *, header_only: bool = False) -> bool:
        """Whether ``stored`` is well formed; a malformed one is reported (or raised)."""
        problem = stored_problem(stored, header_only=header_only)
        if problem is None:
            return True
        rid = render_id(stored.header.run_id)
        bad_row(CodecError(self.tier, f"run {rid!r}: stored row is malformed: {problem}"), rid, bad_rows)
        return False

    @override
    async def load(self, run_id: str) -> StoredSnapshot | None:
        self._check_open()
        stored = self._runs.get(run_id)
        if stored is not None:
            self._checked(stored, None)  # raises CodecError when malformed
        return stored

    @override
    async def load_many(
        self, run_ids: Sequence[str], *, bad_rows: list[BadRow] | None = None
    ) -> dict[str, StoredSnapshot]:
        self._check_open()
        found: dict[str, StoredSnapshot] = {}
        for r in dict.fromkeys(run_ids):
            stored = self._runs.get(r)
            if stored is not None and self._checked(stored, bad_rows):
                found[r] = stored
        return found

    def _page(
        self,
        status: str | Iterable[str] | None,
        workflow: str | None,
        after: str | None,
        limit: int,
        bad_rows: list[BadRow] | None,
        shards: Collection[int] | None,
        *,
        header_only: bool = False,
    ) -> Iterator[StoredSnapshot]:
        """Up to ``limit`` well-formed rows in run id order; malformed ones are reported and read past."""
        self._check_open()
        check_limit(limit)
        statuses = status_filter(status)
        rows = [
            s
            for s in self._runs.values()
            if (statuses is None or s.header.status in statuses) and (workflow is None or s.header.workflow == workflow)
        ]
        if shards is not None:
            # A run id that is not text (a malformed row) belongs to no shard.
            wanted, count = frozenset(shards), self.shards
            rows = [s for s in rows if type(rid := s.header.run_id) is str and shard_of(rid, count) in wanted]
        # A run id that is not text (a malformed row) cannot be ordered with
        # the others: it comes first, like an integer key in SQLite.
        odd = [s for s in rows if type(s.header.run_id) is not str] if after is None else []
        named = sorted(
            (s for s in rows if type(s.header.run_id) is str and (after is None or s.header.run_id > after)),
            key=lambda s: s.header.run_id,
        )
        taken = 0
        for stored in (*odd, *named):
            if taken == limit:
                return
            if self._checked(stored, bad_rows, header_only=header_only):
                taken += 1
                yield stored

    @override
    async def scan(
        self,
        *,
        status: str | Iterable[str] | None = None,
        workflow: str | None = None,
        after: str | None = None,
        limit: int = 1000,
        shards: Collection[int] | None = None,
    ) -> list[RunHeader]:
        return [s.header for s in self._page(status, workflow, after, limit, None, shards, header_only=True)]

    @override
    async def scan_snapshots(
        self,
        *,
        status: str | Iterable[str] | None = None,
        workflow: str | None = None,
        after: str | None = None,
        limit: int = 1000,
        bad_rows: list[BadRow] | None = None,
        shards: Collection[int] | None = None,
    ) -> list[StoredSnapshot]:
        return list(self._page(status, workflow, after, limit, bad_rows, shards))

    @override
    async def history(self, run_id: str) -> list[Transition]:
        self._check_open()
        per_run = self._history.get(run_id, {})
        return [per_run[v] for v in sorted(per_run)]

    @override
    async def _save_dead_letters(self, records: Sequence[StoredDeadLetter], fence: Fence | None) -> dict[int, int]:
        self._check_open()
        # No await below: the fence check and the write are one step for other tasks.
        if fence is None:
            for record in records:
                self._dead[record.run_id] = record
            return {}
        shards = self.shards
        of = {r.run_id: shard_of(r.run_id, shards) for r in records}
        lost = self._judge(fence, set(of.values()))
        for record in records:
            if of[record.run_id] not in lost:
                self._dead[record.run_id] = record
        return lost

    @override
    async def dead_letters(self, *, bad_rows: list[BadRow] | None = None) -> list[StoredDeadLetter]:
        self._check_open()  # records are kept as given: nothing to parse, nothing malformed
        return sorted(self._dead.values(), key=lambda d: (d.at, d.run_id))

    @override
    async def delete_copy(self, run_id: str, body: bytes) -> bool:
        self._check_open()
        stored = self._runs.get(run_id)
        if stored is None or stored.body != body:
            return False
        del self._runs[run_id]
        return True

    @override
    async def delete_dead_letter(self, run_id: str) -> bool:
        self._check_open()
        return self._dead.pop(run_id, None) is not None

    @override
    async def save_versions(
        self, snapshots: Sequence[StoredSnapshot], *, fence: Fence | None = None
    ) -> dict[int, int] | None:
        self._check_open()
        lost: dict[int, int] | None = None
        if fence is not None:  # no await below: the fence check and the write are one step
            shards = self.shards
            of = {s.header.run_id: shard_of(s.header.run_id, shards) for s in snapshots}
            lost = self._judge(fence, set(of.values()))
            if lost:
                snapshots = [s for s in snapshots if of[s.header.run_id] not in lost]
        for stored in snapshots:
            kept = self._versions.setdefault(stored.header.run_id, {})
            held = kept.get(stored.header.version)
            # The first copy of a version stays, unless a newer owner's comes (SQLiteStore's rule).
            if held is None or stored.header.epoch > held.header.epoch:
                kept[stored.header.version] = _own(stored)
        return lost

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
