"""The ``Store`` protocol: the "Store" box of the map in docs/architecture.md.

``Store``'s docstrings are the one statement of the contract every store
(memory, SQLite, Valkey) keeps; one shared suite in ``tests/contract`` checks
it. ``StoreBase`` holds the open/closed bookkeeping the three share, and the
functions below it the rest they share: filters, the page-size check, how
a malformed row is reported (``bad_row``), and the writer's mark that notices
a store gone back in time (``WriterMark``, ``advance_mark``).
"""

from __future__ import annotations

import math
import sys
import uuid
import warnings
from typing import TYPE_CHECKING, Any, Final, Protocol, Self, final, runtime_checkable

from hotstate._errors import CodecError, ConfigError, PersistenceError
from hotstate.actors._snapshot import TERMINAL_STATUSES
from hotstate.persistence._records import BadRow
from hotstate.persistence._shards import shard_of

if sys.version_info >= (3, 12):
    from typing import override
else:
    from typing_extensions import override

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
    from types import TracebackType

    from hotstate.actors._snapshot import Transition
    from hotstate.persistence._records import (
        RunHeader,
        SaveResult,
        StoredDeadLetter,
        StoredSnapshot,
    )
    from hotstate.persistence._shards import Fence

__all__ = ["FINISHED_STATUSES", "DeadLetterRefusals", "Store"]

FINISHED_STATUSES: Final[frozenset[str]] = frozenset(str(s) for s in TERMINAL_STATUSES)
"""Stored status values ``purge_finished`` may delete: done, failed, cancelled."""


@runtime_checkable
class Store(Protocol):
    """An async persistence tier: the one statement of the store contract.

    ``MemoryStore``, ``SQLiteStore`` and ``ValkeyStore`` implement it and carry
    a docstring only where they differ. A store of your own needs no
    inheritance (matching signatures is enough); ``tests/contract`` shows what
    it must do.

    Versions only go up (docs/architecture.md "Persistence"): a stored snapshot is never
    replaced by one whose ``header.version`` is lower than or equal to its own,
    whatever order batches arrive in, and a transition is stored at most once
    per ``(run_id, version)``. So the same batch can be written again (after an
    error, or a connection lost mid-write) without harm. A stale snapshot is
    not an error: ``save`` counts it, names the runs a strictly higher stored
    version kept out (``SaveResult.conflicts``), and no store raises
    ``StaleVersionError``.

    A stored row that something other than hotstate wrote or changed can be
    malformed (a header field of the wrong type, text that is not UTF-8, a
    missing field, a key of the wrong type). Reads raise ``CodecError`` for it,
    or, when given a ``bad_rows`` list (``scan_snapshots``, ``load_many``),
    skip it and report it there, so one bad row never hides the others. As
    reads cannot use a stored version that is not an integer, ``save`` orders
    it below every version: the next snapshot of that run replaces the row.

    A store keeps each body as the bytes it was given and never decodes one:
    reads return bodies as stored, and the codec verifies them.

    A store that goes back in time is noticed (DESIGN.md "Stores"). Each
    store object, from ``open`` to ``aclose``, is one *writer*: it picks a
    random writer id and keeps a mark under that id in the store, written at
    ``open`` and advanced by every ``save`` inside the save's own transaction
    or round trip. A mark that is gone, or lower than the last one this writer
    saw stored, means the store lost writes it had acknowledged: restarted
    empty, restored from an older snapshot, RDB/AOF file or backup, or its
    database file replaced or restored in place. ``save`` then reports
    ``SaveResult.reset``, and the caller writes everything it holds again.
    The mark is per writer, not per store, so every writer sharing a prefix
    or a file notices on its own next ``save``, and an old backup cannot
    carry it forward (it holds the mark as it was then). A store object
    opened again is a new writer, which claims nothing from before.
    ``aclose`` removes the writer's mark; a mark a crashed process left
    behind is removed 30 days after its last save (``MARK_TTL``).
    Read-only stores write no mark.

    Errors any method may raise:

    - ``StoreUnavailableError``: the backend failed in a way a retry may fix
      (unreachable, timed out, locked, busy, read-only, full, out of memory).
      The persister retries with backoff.
    - ``PersistenceError`` (any other kind): a retry will not help. The store
      is not open (a call before ``open`` or after ``aclose``), it was opened
      read-only and the call writes, or the backend refused the request (a key
      of another type, a file that is not an SQLite database).

    Ownership (DESIGN.md "Several processes"). Runs map to ``shards`` shards
    (``shard_of``); the count is recorded in the store at its first ``open``,
    and a store object given another count refuses to open. Each shard has a
    *fence* in the store: the newest ``(epoch, owner)`` that sealed it or
    wrote to it. A fenced ``save`` (``fence=``) writes nothing of a shard
    whose fence is newer than the writer's epoch, or holds the same epoch for
    another owner (``fence_verdict``), and reports it in ``SaveResult.fenced``;
    it raises an older fence to its own in the same transaction or script.
    ``save_dead_letters`` and ``save_versions`` take the same ``fence`` and
    judge each record's shard by the same rule, in the transaction or script
    of their write. ``seal`` raises fences without writing: a new owner seals a shard in every
    store before it reads the shard's copies, so nothing an older owner writes
    afterwards lands. Stored copies are ordered by ``(header.epoch,
    header.version)``: a copy replaces the stored one only when that pair is
    greater (a newer owner's copy wins over an older owner's whatever the
    versions; a version of the same owner only over lower ones).

    Attributes:
        tier: the tier's name (``"memory"``, ``"sqlite"``, ``"valkey"`` or a
            user-given one), used in errors and statistics.
        shards: the shard count the store holds runs under (known once open).
    """

    tier: str
    shards: int

    async def open(self) -> None:
        """Connect and prepare the schema. Idempotent.

        Raises:
            StoreUnavailableError: the backend cannot be reached.
            PersistenceError: the backend refused (e.g. the file is not an
                SQLite database).
        """
        ...

    async def aclose(self) -> None:
        """Release connections; the stored data stays for a later ``open``. Idempotent."""
        ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    async def save(
        self, snapshots: Sequence[StoredSnapshot], transitions: Sequence[Transition], *, fence: Fence | None = None
    ) -> SaveResult:
        """Write a batch of snapshots and transitions atomically.

        Other readers see all of the batch or none of it. A snapshot is written
        only when the store holds no snapshot of its run or an older
        ``(epoch, version)``; otherwise it is stale and skipped. A transition whose
        ``(run_id, version)`` is already stored, or repeated in the batch, is
        ignored.

        One run never blocks the others (#11). A run the store cannot write
        at all is left out whole (its snapshots and transitions) and named in
        ``SaveResult.rejected`` with the reason; every other run of the batch
        is written. Every store rejects a run carrying text that does not
        encode as UTF-8 (a lone surrogate), an integer outside the signed
        64-bit range, or a NaN time (``snapshot_problem``,
        ``transition_problem``); a store may reject more (Valkey: a key the
        run would write that holds another type, say a list planted where
        its hash or history belongs). Such a run is rejected by every save
        that carries it again, so the caller must not retry it as if the
        store were down. A run id holding a NUL character is a run id like
        any other: no store cuts it short.

        No store call runs long (#11): a batch of more than a call's worth
        of transitions (``CALL_TRANSITIONS`` in a Valkey script,
        ``TRANSACTION_TRANSITIONS`` in an SQLite transaction), or more than
        ``CALL_BYTES`` of them, is written in several calls. The first parts of the transitions go in calls before
        the last one, which holds the snapshots: a reader may see some of the
        batch's transitions before its snapshots, never a snapshot without
        its transitions. If the save fails midway those transitions stay
        (the batch can still be written again: each ``(run_id, version)`` is
        stored once), and a run rejected by a later call may have some
        transitions written by the earlier ones (the batch is not checked
        ahead: that would cost every long flush). The snapshots of a batch
        are always written together, in one call.

        With ``fence``, the fence of each shard the batch writes is checked
        and written in the same transaction or script as the rows: a shard
        whose stored fence is newer than ``fence.epochs[shard]`` (or equal,
        held by another owner), or a shard ``fence.epochs`` does not name,
        has none of its runs' snapshots or transitions written and is named
        in ``SaveResult.fenced``; an older or missing fence is raised to the
        batch's. Without ``fence`` (a single process, memory-only use, a
        tool) no fence is read or written.

        Args:
            snapshots: snapshots in any order; a run may appear more than once
                (its highest ``(epoch, version)`` wins).
            transitions: the transitions to append, in any order.
            fence: the writer's member id and its epoch per shard.

        Returns:
            The counts: each snapshot is either ``written`` or ``stale``
            (``written + stale == len(snapshots)``); ``transitions`` counts the
            transitions newly stored. ``conflicts`` maps each run whose
            snapshot was skipped because the store holds a strictly higher
            version to that stored version: that write was not taken. A
            snapshot at a version equal to the stored one is stale, never a
            conflict: it is how a retried batch that was committed but not
            acknowledged comes back. A run given more than once is a conflict
            only when its highest version was skipped. ``reset`` is True when
            the store found this writer's mark gone or lower than the last
            one this writer saw stored: writes it acknowledged are gone (a
            server restarted empty or from an older snapshot, a database
            file replaced or restored from a backup). This save's own batch
            is written; the caller should write again every run it holds. A
            loss is reported by one ``save`` of each writer, and by the next
            one too when the reply of that save was lost, so the report is
            never lost with it. Losing writes that were never acknowledged
            is not a reset: nobody claimed them. An empty batch writes no
            run but still checks and advances the mark: it is a probe.
            ``rejected`` maps each run the store could not write at all to
            the reason (naming the field or key and the value); its
            snapshots count as neither ``written`` nor ``stale``, and it is
            never in ``conflicts``.

        Raises:
            StoreUnavailableError: the write failed. Nothing was written, or
                (a connection lost after the server applied it) all of it; a
                retry of the same batch is safe either way.
            PersistenceError: the backend refused the batch for a reason
                that is not one run's (e.g. a key every run writes holds
                another type); nothing was written.
        """
        ...

    async def seal(self, fence: Fence) -> dict[int, int]:
        """Raise each named shard's fence to ``(fence.epochs[shard], fence.owner)`` where it is older.

        A new owner calls it before reading a shard's copies: once it returns,
        no save under an older epoch writes anything of that shard here.
        Atomic per shard, idempotent (sealing again at the same epoch by the
        same owner changes nothing).

        Returns:
            shard -> the stored fence's epoch, for each shard whose fence is
            newer than asked, or the same epoch held by another owner: that
            shard was not sealed, another owner holds it. Empty when every
            shard was sealed.

        Raises:
            StoreUnavailableError: the write failed (it may or may not have
                happened; sealing again is safe).
        """
        ...

    async def load(self, run_id: str) -> StoredSnapshot | None:
        """Read the stored snapshot of a run.

        Args:
            run_id: the run.

        Returns:
            The snapshot, or None when the run is not stored.

        Raises:
            StoreUnavailableError: the read failed.
            CodecError: the stored header is malformed (written by something
                other than hotstate).
        """
        ...

    async def load_many(
        self, run_ids: Sequence[str], *, bad_rows: list[BadRow] | None = None
    ) -> dict[str, StoredSnapshot]:
        """Read several runs' snapshots in one go.

        Args:
            run_ids: the runs; repeats are read once.
            bad_rows: when given, a malformed stored row is left out of the
                result and reported by appending a ``BadRow`` here, instead of
                raising ``CodecError``.

        Returns:
            The stored snapshots by run id; runs not stored, and malformed
            rows reported in ``bad_rows``, are left out.

        Raises:
            StoreUnavailableError: the read failed.
            CodecError: a stored row is malformed, and ``bad_rows`` is None.
        """
        ...

    async def scan(
        self,
        *,
        status: str | Iterable[str] | None = None,
        workflow: str | None = None,
        after: str | None = None,
        limit: int = 1000,
        shards: Collection[int] | None = None,
    ) -> list[RunHeader]:
        """Page through run headers ordered by run id, never reading a body.

        Args:
            status: keep only runs in this status (or any of these statuses).
            workflow: keep only runs of this workflow.
            after: the cursor: only run ids strictly greater than this one.
            limit: the page size.
            shards: keep only runs of these shards (``shard_of``).

        Returns:
            Up to ``limit`` headers ordered by run id. Pass the last one's
            ``run_id`` as ``after`` for the next page; fewer than ``limit``
            means there is no next page.

        Raises:
            ConfigError: ``limit`` is below 1.
            StoreUnavailableError: the read failed.
            CodecError: a stored header is malformed.
        """
        ...

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
        """Page through whole stored snapshots (header, error, body) by run id.

        Recovery's bulk read: one pass instead of ``scan`` then ``load_many``.
        Filters and paging are those of ``scan``, and hold whatever rows are
        skipped: a malformed row reported in ``bad_rows`` does not count
        toward ``limit`` (the store reads on past it), so a page shorter than
        ``limit`` is still the last one, and the last snapshot's ``run_id``
        is still the cursor for the next page. Each bad row is reported once
        over a whole pass.

        Args:
            status: keep only runs in this status (or any of these statuses).
            workflow: keep only runs of this workflow.
            after: the cursor: only run ids strictly greater than this one.
            limit: the page size.
            bad_rows: when given, a malformed stored row is skipped and
                reported by appending a ``BadRow`` here, instead of raising
                ``CodecError``.
            shards: keep only runs of these shards (``shard_of``): how a new
                owner reads the shards it claimed.

        Returns:
            Up to ``limit`` snapshots ordered by run id, bodies as stored.
            Fewer than ``limit`` means there is no next page.

        Raises:
            ConfigError: ``limit`` is below 1.
            StoreUnavailableError: the read failed.
            CodecError: a stored row is malformed, and ``bad_rows`` is None.
        """
        ...

    async def history(self, run_id: str) -> list[Transition]:
        """Read a run's stored transitions, ordered by version.

        Args:
            run_id: the run.

        Returns:
            The transitions (empty when none are stored).

        Raises:
            StoreUnavailableError: the read failed.
            CodecError: a stored transition is malformed.
        """
        ...

    async def save_dead_letter(self, record: StoredDeadLetter, *, fence: Fence | None = None) -> None:
        """Store a dead-letter record, replacing any earlier one for the run.

        Args:
            record: the record.
            fence: as in ``save_dead_letters``.

        Raises:
            StoreUnavailableError: the write failed.
            CodecError: the store cannot write this record
                (``dead_letter_problem``); nothing was written.
            PersistenceError: the fence refused the record's shard (the
                message says "fenced"); nothing was written.
        """
        ...

    async def save_dead_letters(
        self, records: Sequence[StoredDeadLetter], *, fence: Fence | None = None
    ) -> Mapping[str, str] | None:
        """Store several dead-letter records atomically (one transaction or round trip).

        A record the store cannot write (``dead_letter_problem``: text that
        does not encode, a number out of range) is left out, and the others
        are written, as ``save`` does with a run (#11).

        With ``fence``, the fence of each record's shard (``shard_of`` of its
        run id) is judged as ``save`` judges it, in the same transaction or
        script as the write: a record of a fenced shard (a newer fence, the
        same epoch held by another owner, or a shard ``fence.epochs`` does
        not name) is not written, and an older or missing fence is raised.
        So an owner fenced off can never leave a letter that would fail the
        new owner's run. Without ``fence`` no fence is read or written.

        Args:
            records: the records. Each replaces the record stored for its run,
                and the last one for a run in ``records`` wins.
            fence: the writer's member id and its epoch per shard.

        Returns:
            Run id -> why, for each record left out (empty when all were
            written). A record the fence refused is among them, with a
            reason that starts with ``"fenced"``. The stores of hotstate
            return a ``DeadLetterRefusals`` (a ``dict``), whose ``fenced``
            maps each refused shard to the stored fence's epoch (as
            ``SaveResult.fenced``). A store of your own may return a plain
            mapping, or None for "all written".

        Raises:
            StoreUnavailableError: the write failed; nothing was written, or
                (a connection lost after the backend applied it) all of it.
        """
        ...

    async def dead_letters(self, *, bad_rows: list[BadRow] | None = None) -> list[StoredDeadLetter]:
        """List the dead-letter records, oldest first.

        Args:
            bad_rows: when given, a malformed stored record is left out and
                reported by appending a ``BadRow`` here, instead of raising
                ``CodecError``: one planted record never hides the others.

        Returns:
            The records ordered by ``at``, then run id.

        Raises:
            StoreUnavailableError: the read failed.
            CodecError: a stored record is malformed, and ``bad_rows`` is None.
        """
        ...

    async def delete_copy(self, run_id: str, body: bytes) -> bool:
        """Delete a run's stored snapshot if its body is still exactly ``body`` (its history stays).

        For a copy that does not verify but claims a newer version than the
        runtime holds (a forged header): the version guard would refuse every
        genuine write of the run, so the caller removes that copy, and only
        that copy (compare and delete in one step), then writes the run again.

        Args:
            run_id: the run.
            body: the stored body the caller read and found not to verify.

        Returns:
            True when the copy was deleted, False when the run holds another body (or none).

        Raises:
            StoreUnavailableError: the write failed.
        """
        ...

    async def delete_dead_letter(self, run_id: str) -> bool:
        """Remove a run's dead-letter record.

        Args:
            run_id: the run.

        Returns:
            True when a record was removed, False when there was none.

        Raises:
            StoreUnavailableError: the write failed.
        """
        ...

    async def save_versions(
        self, snapshots: Sequence[StoredSnapshot], *, fence: Fence | None = None
    ) -> Mapping[int, int] | None:
        """Keep point-in-time copies of snapshots (time travel).

        A copy is kept per ``(run_id, version)``: the first one stored stays,
        so writing one again changes nothing.

        With ``fence``, each copy's shard is judged as ``save`` judges it, in
        the same transaction or script as the write: no copy of a fenced
        shard is kept, and an older or missing fence is raised.

        Args:
            snapshots: the copies to keep.
            fence: the writer's member id and its epoch per shard.

        Returns:
            With ``fence``: shard -> the stored fence's epoch, for each shard
            whose copies the fence refused (empty when all were kept), as
            ``SaveResult.fenced``. Without: None (a caller may ignore it).

        Raises:
            StoreUnavailableError: the write failed.
        """
        ...

    async def load_version(self, run_id: str, version: int) -> StoredSnapshot | None:
        """Read the newest kept copy of a run at or before a version.

        Args:
            run_id: the run.
            version: the newest version wanted.

        Returns:
            The copy, or None when none is kept that early.

        Raises:
            StoreUnavailableError: the read failed.
            CodecError: the kept copy's header is malformed.
        """
        ...

    async def purge_finished(self, *, before: float) -> int:
        """Delete finished runs (done, failed, cancelled) last updated before ``before``.

        A run goes with its history and kept copies; dead-letter records stay.

        Args:
            before: the wall-clock cut-off (exclusive), compared with
                ``header.updated_at``.

        Returns:
            How many runs were deleted.

        Raises:
            StoreUnavailableError: the delete failed; some runs may already be
                gone, and calling again is safe.
        """
        ...


MARK_TTL: Final = 30 * 86_400.0
"""Seconds a writer's mark outlives the writer's last save (30 days).

``aclose`` removes the mark; this only bounds the marks of crashed processes.
It is safe because a mark that expires under a live writer can only cause a
false reset (that writer writes what it holds again, all of it stale for the
store), never a missed one, and a writer saves at every flush that has
anything to write: only one idle for 30 days writes again needlessly.
"""


@final
class WriterMark:
    """One writer's id and how far its mark has gone (the client side of ``Store.save``'s ``reset``).

    ``floor`` is the highest mark this writer knows the store holds (written at
    ``open`` or by a save that returned); ``seq`` numbers every attempt, so a
    retried save never reuses the mark of one whose reply was lost. The store
    applies ``advance_mark`` (or the same rule in Lua or SQL) in the save's own
    transaction. Saves of one writer are expected one at a time, as a
    persister makes them: overlapping saves never cause a false reset (a mark
    only goes up), but a loss between two of them can go unnoticed.
    """

    __slots__ = ("floor", "seq", "writer")

    def __init__(self) -> None:
        self.writer: Final = uuid.uuid4().hex
        self.floor = 0
        self.seq = 0

    def next(self) -> tuple[int, int]:
        """``(floor, seq)`` for the next write of the mark: the check and the new value."""
        self.seq += 1
        return self.floor, self.seq

    def stored(self, seq: int) -> None:
        """A write of mark ``seq`` returned: the store holds at least that much from now on."""
        if seq > self.floor:
            self.floor = seq


def advance_mark(held: tuple[int, int] | None, floor: int, seq: int) -> tuple[tuple[int, int], bool]:
    """The mark rule: a writer's stored mark after a save, and whether the save reports ``reset``.

    A mark is ``(high, lost)``: the highest ``seq`` stored (a mark only goes
    up), and the ``seq`` of the last save that found the store had lost
    writes (0: none). A mark below ``floor`` (absent reads as ``(0, 0)``)
    means the store lost acknowledged writes; the save reports it while the
    writer has not seen that report returned (``lost > floor``), so a report
    whose reply was lost is given again by the next save.

    Args:
        held: the stored mark, or None when there is none.
        floor: the writer's ``WriterMark.floor``.
        seq: this save's ``seq`` (greater than every one sent before).

    Returns:
        The mark to store, and ``reset``.
    """
    high, lost = held or (0, 0)
    if high < floor:
        lost = seq
    return (max(high, seq), lost), lost > floor


REPLACED_COLUMNS: Final = ", ".join(
    f"{c} = excluded.{c}"
    for c in ("workflow", "workflow_version", "step", "status", "updated_at", "attempt", "epoch", "error", "body")
)
"""The ``SET`` list of an SQL upsert of a stored copy (SQLite and PostgreSQL): every column but the
run id, the version (the kept copies' key; the runs' upsert sets it too) and the shard (fixed per run)."""


def status_filter(status: str | Iterable[str] | None) -> frozenset[str] | None:
    """Normalize ``scan``'s ``status`` argument to a set of stored values (None = any)."""
    if status is None:
        return None
    if isinstance(status, str):
        return frozenset((str(status),))
    return frozenset(str(s) for s in status)


async def read_on(
    page: Callable[[object, int], Awaitable[Sequence[Sequence[Any]]]],
    checked: Callable[[Sequence[Any]], StoredSnapshot | None],
    after: object,
    limit: int,
) -> list[StoredSnapshot]:
    """``scan_snapshots``'s paging over rows some of which are malformed (SQLite and PostgreSQL).

    ``page(cursor, n)`` reads up to ``n`` rows after the stored run id
    ``cursor`` (a row's first column), in run id order; ``checked(row)`` is
    its snapshot, or None when it was malformed and reported. Reads on past
    reported rows until ``limit`` snapshots are found or the rows end, so a
    page shorter than ``limit`` is still the last one.
    """
    found: list[StoredSnapshot] = []
    cursor = after
    while True:
        wanted = limit - len(found)
        rows = await page(cursor, wanted)
        found.extend(stored for row in rows if (stored := checked(row)) is not None)
        if len(rows) < wanted or len(found) == limit:
            return found
        cursor = rows[-1][0]  # as stored: a malformed id still orders where the store keeps it


def check_limit(limit: int) -> None:
    """Reject a non-positive page size."""
    if limit < 1:
        raise ConfigError("limit", limit, "must be >= 1")


def bad_row(error: CodecError, run_id: str, bad_rows: list[BadRow] | None) -> None:
    """Report a malformed row in ``bad_rows``, or raise ``error`` when the caller gave no list.

    Raises:
        CodecError: ``error``, when ``bad_rows`` is None.
    """
    if bad_rows is None:
        raise error
    bad_rows.append(BadRow(run_id=run_id, reason=error.detail))


def render_id(value: object) -> str:
    """A stored run id as text, for a report: as is when it is text, else its ``repr``."""
    return value if isinstance(value, str) else repr(value)


_HEADER_TYPES: Final[tuple[type | tuple[type, ...], ...]] = (str, str, int, int, int, str, (int, float), int, int)


def stored_problem(stored: StoredSnapshot, *, header_only: bool = False) -> str | None:
    """What is malformed in a stored snapshot's fields, or None when each has its type.

    The rule ``SQLiteStore`` applies to its columns, for a store that keeps
    records as they were given (``MemoryStore``): ``bool`` is not an integer,
    a version must be an ``int`` (never a float or text), the error is text or
    None, and the body is bytes. ``header_only`` checks the header alone (what
    ``scan`` reads).
    """
    h = stored.header
    error: object = stored.error  # typed str | None; a caller may have put anything there
    body: object = stored.body
    if (
        type(h.version) is int
        and type(h.workflow_version) is int
        and type(h.step) is int
        and type(h.attempt) is int
        and type(h.epoch) is int
        and type(h.run_id) is str
        and type(h.workflow) is str
        and type(h.status) is str
        and type(h.updated_at) in (float, int)
        and (header_only or ((error is None or type(error) is str) and type(body) is bytes))
    ):
        return None
    bad = [
        f"{name}={value!r}"
        for name, want, value in zip(h._fields, _HEADER_TYPES, h, strict=True)
        if type(value) is bool or not isinstance(value, want)
    ]
    if not header_only and error is not None and not isinstance(error, str):
        bad.append(f"error={error!r}")
    if not header_only and not isinstance(body, bytes):
        bad.append(f"body is a {type(body).__name__}")
    return ", ".join(bad) or None


INT64_MIN: Final = -(1 << 63)
INT64_MAX: Final = (1 << 63) - 1

CALL_TRANSITIONS: Final = 4096
"""Transitions per Valkey script (#11): ~3.4 us each (client and server, 2 cores), ~15 ms a script.

Re-writing a 1,000,000-transition history in one script held every other
Valkey client off (``BUSY``) for seconds. Smaller scripts also made the W1
write-behind workload with Valkey and SQLite faster (N=10,000: 155k -> 212k
steps/s), as one long script no longer stalls the flush loop.
"""

TRANSACTION_TRANSITIONS: Final = 16384
"""Transitions per SQLite transaction (#11): ~2.4 us each, ~40 ms a transaction.

Larger than ``CALL_TRANSITIONS``: every transaction costs the writer thread
a GIL handoff, which a CPU-bound loop stretches (W1 write-behind SQLite,
N=10,000: 316k steps/s with 4,096, 333k with 16,384, 331k unbounded).
"""

CALL_BYTES: Final = 1 << 20
"""Characters of transition JSON per store call (long details), #11; a single larger transition goes alone."""


def transition_parts(
    transitions: Sequence[Transition], encode: Callable[[Sequence[Transition]], str], limit: int
) -> list[tuple[Sequence[Transition], str]]:
    """Split ``transitions`` into store calls: at most ``limit`` each, encoded in at most ``CALL_BYTES``.

    Each part comes with ``encode(part)``, made once. A batch within both
    bounds (most flushes) is one part, encoded once, and never copied.
    """
    parts: list[tuple[Sequence[Transition], str]] = []
    if len(transitions) <= limit:
        _split(transitions, encode, parts)
        return parts
    for i in range(0, len(transitions), limit):
        _split(transitions[i : i + limit], encode, parts)
    return parts


def _split(
    part: Sequence[Transition],
    encode: Callable[[Sequence[Transition]], str],
    out: list[tuple[Sequence[Transition], str]],
) -> None:
    text = encode(part)
    if len(text) <= CALL_BYTES or len(part) <= 1:
        out.append((part, text))
        return
    half = len(part) // 2
    _split(part[:half], encode, out)
    _split(part[half:], encode, out)


def _text_problem(name: str, value: object) -> str | None:
    if type(value) is not str or value.isascii():
        return None
    try:
        value.encode()
    except UnicodeEncodeError as exc:
        return f"{name} is not UTF-8 text (a lone surrogate {value[exc.start]!r} at {exc.start})"
    return None


def _int_problem(name: str, value: object) -> str | None:
    if type(value) is int and not INT64_MIN <= value <= INT64_MAX:
        return f"{name}={value} is out of range (a signed 64-bit integer)"
    return None


def _float_problem(name: str, value: object, *, finite: bool = False) -> str | None:
    if type(value) is float and (math.isnan(value) or (finite and math.isinf(value))):
        return f"{name} is {value}"
    return None


def snapshot_problem(stored: StoredSnapshot) -> str | None:
    """Why no store can write this snapshot (``SaveResult.rejected``), or None.

    Text that does not encode as UTF-8 (a lone surrogate), an integer outside
    the signed 64-bit range (SQLite's INTEGER), a NaN time (SQLite's NOT NULL
    REAL takes it as NULL; a transition's time must be finite, as JSON
    carries it). Fields of another
    type are not judged here: a store keeps what it is given, and a read
    reports it (``stored_problem``).
    """
    h = stored.header
    return (
        _text_problem("run_id", h.run_id)
        or _text_problem("workflow", h.workflow)
        or _text_problem("status", h.status)
        or _text_problem("error", stored.error)
        or _int_problem("version", h.version)
        or _int_problem("workflow_version", h.workflow_version)
        or _int_problem("step", h.step)
        or _int_problem("attempt", h.attempt)
        or _int_problem("epoch", h.epoch)
        or _float_problem("updated_at", h.updated_at)
    )


def transition_problem(t: Transition) -> str | None:
    """Why no store can write this transition (see ``snapshot_problem``), or None."""
    return (
        _text_problem("run_id", t.run_id)
        or _text_problem(f"transition v{t.version} detail", t.detail)
        or _int_problem("transition version", t.version)
        or _int_problem(f"transition v{t.version} step", t.step)
        or _float_problem(f"transition v{t.version} at", t.at, finite=True)  # JSON has neither NaN nor inf
    )


def dead_letter_problem(record: StoredDeadLetter) -> str | None:
    """Why no store can write this dead-letter record (see ``snapshot_problem``), or None."""
    return (
        _text_problem("run_id", record.run_id)
        or _text_problem("workflow", record.workflow)
        or _text_problem("dead letter error", record.error)
        or _text_problem("dead letter attempts", record.attempts)
        or _text_problem("dead letter compensation_errors", record.compensation_errors)
        or _float_problem("dead letter at", record.at)
        or snapshot_problem(record.snapshot)
    )


def unwritable(snapshots: Sequence[StoredSnapshot], transitions: Sequence[Transition]) -> dict[str, str]:
    """The runs of a batch no store can write, with the first reason found for each (``SaveResult.rejected``).

    A row whose text is ASCII and whose numbers are in range passes one
    expression (~0.15 us a row, measured: 6 ms for 20,000 snapshots and
    20,000 transitions, against 21 ms calling the ``*_problem`` functions
    for each); the rest get the full check.
    """
    found: dict[str, str] = {}
    lo, hi = INT64_MIN, INT64_MAX
    for s in snapshots:
        h, e = s.header, s.error
        try:
            if (
                h.run_id.isascii()
                and h.workflow.isascii()
                and h.status.isascii()
                and (e is None or e.isascii())
                and lo <= h.version <= hi
                and lo <= h.workflow_version <= hi
                and lo <= h.step <= hi
                and lo <= h.attempt <= hi
                and h.updated_at == h.updated_at  # not NaN
            ):
                continue
        except (AttributeError, TypeError):  # a field of another type: the full check judges it
            pass
        if h.run_id not in found and (why := snapshot_problem(s)) is not None:
            found[h.run_id] = why
    for t in transitions:
        d = t.detail
        try:
            if (
                t.run_id.isascii()
                and (d is None or d.isascii())
                and lo <= t.version <= hi
                and lo <= t.step <= hi
                and -math.inf < t.at < math.inf
            ):
                continue
        except (AttributeError, TypeError):
            pass
        if t.run_id not in found and (why := transition_problem(t)) is not None:
            found[t.run_id] = why
    return found


def without(
    rejected: Mapping[str, str], snapshots: Sequence[StoredSnapshot], transitions: Sequence[Transition]
) -> tuple[list[StoredSnapshot], list[Transition]]:
    """The batch without anything of the ``rejected`` runs."""
    return (
        [s for s in snapshots if s.header.run_id not in rejected],
        [t for t in transitions if t.run_id not in rejected],
    )


def fenced_reason(shard: int, stored: int, fence: Fence) -> str:
    """Why a record of ``shard`` was refused by the store's fence at ``stored`` (``save_dead_letters``)."""
    epoch = fence.epochs.get(shard)
    if epoch is None:
        return f"fenced: this writer holds no epoch of shard {shard} (its fence is at epoch {stored})"
    return f"fenced: shard {shard}'s fence is at epoch {stored}, this writer holds epoch {epoch}"


@final
class DeadLetterRefusals(dict[str, str]):
    """What ``save_dead_letters`` left out: run id -> why (a plain ``dict`` to a caller that wants no more).

    Attributes:
        fenced: shard -> the stored fence's epoch, for each shard whose
            records the fence refused (those runs' reasons start with
            ``"fenced"``); empty when the fence refused none.
    """

    __slots__ = ("fenced",)

    def __init__(self, *args: Iterable[tuple[str, str]]) -> None:
        super().__init__(*args)
        self.fenced: Mapping[int, int] = {}


class StoreBase(Store):
    """Open/closed bookkeeping shared by the stores: context manager and leak warning.

    It subclasses ``Store`` so that mypy checks the stores' ``@override``
    methods against the protocol; a store of your own need not.
    """

    tier: str
    _opened: bool = False

    @override
    async def __aenter__(self) -> Self:
        await self.open()
        return self

    @override
    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    @override
    async def save_dead_letter(self, record: StoredDeadLetter, *, fence: Fence | None = None) -> None:
        if fence is None:
            rejected = await self.save_dead_letters([record])
        else:
            rejected = await self.save_dead_letters([record], fence=fence)
        if rejected:
            why = rejected[record.run_id]
            if isinstance(rejected, DeadLetterRefusals) and rejected.fenced:
                raise PersistenceError(self.tier, f"run {record.run_id!r}: dead letter not written: {why}")
            raise CodecError(self.tier, f"run {record.run_id!r}: dead letter cannot be written: {why}")

    @override
    async def save_dead_letters(
        self, records: Sequence[StoredDeadLetter], *, fence: Fence | None = None
    ) -> dict[str, str]:
        """Write the records at once; one no store can write is left out (``dead_letter_problem``).

        Dead letters are few: each record is checked before the write.

        Returns:
            A ``DeadLetterRefusals``: run id -> why, and the fenced shards.
        """
        refusals = DeadLetterRefusals(
            (r.run_id, why) for r in records if (why := self._dead_letter_problem(r)) is not None
        )
        fenced = await self._save_dead_letters(
            [r for r in records if r.run_id not in refusals] if refusals else records, fence
        )
        if fenced:
            assert fence is not None  # noqa: S101 - only a fenced write is refused
            refusals.fenced = fenced
            shards = self.shards
            for r in records:
                shard = shard_of(r.run_id, shards)
                if shard in fenced and r.run_id not in refusals:
                    refusals[r.run_id] = fenced_reason(shard, fenced[shard], fence)
        return refusals

    def _dead_letter_problem(self, record: StoredDeadLetter) -> str | None:
        """Why this store cannot write ``record`` (``dead_letter_problem``; a store may refuse more)."""
        return dead_letter_problem(record)

    async def _save_dead_letters(self, records: Sequence[StoredDeadLetter], fence: Fence | None) -> Mapping[int, int]:
        """Write ``records`` (each one a store can write) in one transaction or round trip.

        With ``fence``, the records of a fenced shard are not written.

        Returns:
            shard -> the stored fence's epoch, for each shard ``fence``
            refused (empty without a fence).
        """
        raise NotImplementedError

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
