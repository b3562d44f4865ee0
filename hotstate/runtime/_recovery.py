"""Recovery after a process crash: find every unfinished run, pick its best verified copy.

docs/architecture.md, "Recovery and adoption": read the unfinished runs' headers from every tier, take per
run the highest version whose digest verifies (falling back to an older copy,
from another tier, when the newest is corrupt, and reporting it). Payloads are
decoded only for the chosen copies; loads run in chunks with bounded concurrency.
``choose_copy`` is that rule, written once: recovery and the adoption of one
stored id (``spawn``) both use it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, NamedTuple, final

import anyio

from hotstate._errors import CodecError, CorruptSnapshotError, PersistenceError
from hotstate.actors import TERMINAL_STATUSES, DeadLetter, Snapshot, Status
from hotstate.actors._snapshot import new_tuple as _new
from hotstate.persistence._records import decode_dead_letter, decode_snapshot, verifies
from hotstate.persistence._shards import DEFAULT_SHARDS, shard_of

if TYPE_CHECKING:
    from collections.abc import Collection, Mapping, Sequence

    from hotstate.actors import Workflow
    from hotstate.persistence import BadRow, Codec, Store, StoredSnapshot

__all__ = [
    "Choice",
    "CorruptCopy",
    "RecoveredRun",
    "RecoveryReport",
    "choose_copy",
    "find_dead_letters",
    "find_runs",
]

log = logging.getLogger("hotstate.recovery")

_UNFINISHED = tuple(s.value for s in Status if s not in TERMINAL_STATUSES)
_PAGE = 10_000
_CHUNK = 2_000


class RecoveredRun(NamedTuple):
    """One run brought back into memory (a NamedTuple: recovery builds 100,000 of them).

    Attributes:
        run_id: the run.
        workflow: its workflow.
        tier: the tier whose copy was used.
        version: the version resumed from.
        status: its status in that copy.
    """

    run_id: str
    workflow: str
    tier: str
    version: int
    status: str


@dataclass(frozen=True, slots=True, kw_only=True)
class CorruptCopy:
    """A stored copy that failed verification (it was never unpickled).

    Attributes:
        run_id: the run.
        tier: where the copy is.
        version: the version its header claims.
        reason: why it was rejected.
    """

    run_id: str
    tier: str
    version: int
    reason: str


class Choice(NamedTuple):
    """What ``choose_copy`` picked for one run.

    Attributes:
        snapshot: the newest copy that verifies, decoded (None: none verifies).
        tier: the tier it came from ("" when none verifies).
        highest: the highest version any copy claims, a corrupt one included up to ``MAX_CLAIM``.
        corrupt: the copies that failed verification, newest first.
        error: the first verification error (to raise when nothing verifies).
    """

    snapshot: Snapshot | None
    tier: str
    highest: int
    corrupt: list[CorruptCopy]
    error: PersistenceError | None


def _newest_first(copy: tuple[str, StoredSnapshot]) -> tuple[int, int]:
    # Copies are ordered by (epoch, version): a newer owner's copy wins over an
    # older owner's whatever their versions (a zombie's tail in a tier that
    # could not be sealed at a takeover has higher versions, an older epoch).
    header = copy[1].header
    return -header.epoch, -header.version


MAX_CLAIM: Final = 2**62
"""The highest version a copy that does not verify may push a run to.

A resumed run continues above every version any copy claims, so the version
guard lets it replace a corrupt newer copy and no version is used twice. A
claim beyond this (a forged 2**63 - 1) is ignored: continuing above it would
leave no version a store can hold (SQLite keeps 64-bit integers). That tier
then holds the run at a version this runtime cannot pass, and reports the
conflict when it is written (the run is failed there, never run twice).
"""


def _highest(copies: Sequence[tuple[str, StoredSnapshot]], verified: int) -> int:
    claims = [c[1].header.version for c in copies]
    return max([verified, *(v for v in claims if type(v) is int and v <= MAX_CLAIM)])


def cursor_problem(snap: Snapshot, workflow: Workflow) -> str | None:
    """Why a verified copy cannot be resumed by ``workflow``, or None.

    Under no key a checksum can be recomputed: a copy may verify and still hold
    a step cursor the workflow has no step for (a negative one indexed steps
    from the end and made the scheduler spin) or an attempt below 1.
    """
    if type(snap.step) is not int or not 0 <= snap.step <= len(workflow.steps):
        return f"step cursor {snap.step!r} is not a step of workflow {workflow.name!r} ({len(workflow.steps)} steps)"
    if type(snap.attempt) is not int or snap.attempt < 1:
        return f"attempt {snap.attempt!r} is below 1"
    return None


def _claimed_version(copy: tuple[str, StoredSnapshot]) -> int:
    return copy[1].header.version


def _newest_verified_workflow(copies: Sequence[tuple[str, StoredSnapshot]], codec: Codec) -> str | None:
    """The workflow of the newest copy whose whole envelope verifies (nothing decoded), or None when none does."""
    return next(
        (
            stored.header.workflow
            for tier, stored in sorted(copies, key=_newest_first)
            if verifies(stored, codec, tier=tier)
        ),
        None,
    )


def choose_copy(run_id: str, copies: Sequence[tuple[str, StoredSnapshot]], codec: Codec) -> Choice:
    """The one copy-choice rule: the newest copy that verifies wins.

    Newest is the highest ``(epoch, version)``. A tie goes to the earlier (faster) tier; a copy that does not verify
    is reported and the next newest is tried; it is never unpickled.

    Args:
        run_id: the run.
        copies: ``(tier, stored copy)`` in tier order (not empty).
        codec: the codec (with the key) that verifies and decodes payloads.

    Returns:
        The choice.
    """
    if len(copies) > 1:
        copies = sorted(copies, key=_newest_first)  # stable: tier order on a version tie
    corrupt: list[CorruptCopy] = []
    error: PersistenceError | None = None
    for tier, stored in copies:
        try:
            snap = decode_snapshot(stored, codec, tier=tier)
        except (CorruptSnapshotError, CodecError) as exc:
            corrupt.append(CorruptCopy(run_id=run_id, tier=tier, version=stored.header.version, reason=str(exc)))
            log.warning(
                "hotstate: copy of run %r in %r v%d does not verify: %s", run_id, tier, stored.header.version, exc
            )
            error = error or exc
            continue
        return Choice(snap, tier, _highest(copies, snap.version), corrupt, error)
    return Choice(None, "", _highest(copies, 0), corrupt, error)


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class RecoveryReport:
    """What ``Runtime(recover=True)`` found and did.

    Attributes:
        resumed: runs rebuilt in memory and continuing (``held_back`` ones
            included: they continue one at a time; ``crash_looped`` ones not).
        already_finished: runs unfinished in one tier but finished in a newer copy in another.
        corrupt: copies that failed verification (a fallback copy was used when one
            verified), and malformed rows skipped by the scan (``version`` 0: unreadable).
        lost: runs with no verifiable copy at all (reported, left in the stores).
        unregistered: ``(run_id, workflow)`` of runs whose workflow is not registered
            (reported, never deleted).
        tier_errors: tiers that could not be read, with the error.
        dead_letters: runs whose dead letter was loaded (``dead_letters()``
            lists them and ``retry_dead_letter`` works after the restart).
        failed_before_crash: runs that had failed for good (their dead letter
            was durable) while a tier's run row still showed them unfinished:
            recorded as failed, not resumed.
        stale_dead_letters: dead letters of runs retried before the crash
            (the run is newer than its letter): deleted.
        repaired: per tier, runs written back to the newest verified copy (and
            its history) because the tier was behind, finished runs included.
        crash_looped: runs in flight at ``crash_limit`` consecutive process
            crashes: failed with ``CrashLoopError`` (compensated, dead-lettered)
            instead of resumed again.
        held_back: suspects (in flight at the last crash too) resumed one at a
            time after the others, each with its crash count durable first.
        seconds: how long recovery took, from the first read to the last run adopted.
    """

    resumed: tuple[RecoveredRun, ...] = ()
    already_finished: tuple[str, ...] = ()
    corrupt: tuple[CorruptCopy, ...] = ()
    lost: tuple[str, ...] = ()
    unregistered: tuple[tuple[str, str], ...] = ()
    tier_errors: Mapping[str, str] = field(default_factory=dict)
    dead_letters: tuple[str, ...] = ()
    failed_before_crash: tuple[str, ...] = ()
    stale_dead_letters: tuple[str, ...] = ()
    repaired: Mapping[str, int] = field(default_factory=dict)
    crash_looped: tuple[str, ...] = ()
    held_back: tuple[str, ...] = ()
    seconds: float = 0.0

    def by_tier(self) -> dict[str, int]:
        """Count resumed runs per source tier.

        Returns:
            ``{tier: count}``.
        """
        out: dict[str, int] = {}
        for r in self.resumed:
            out[r.tier] = out.get(r.tier, 0) + 1
        return out


async def _unfinished_copies(
    store: Store, bad_rows: list[BadRow], shards: Collection[int] | None
) -> dict[str, StoredSnapshot]:
    """Every unfinished run's stored snapshot in ``store`` (of ``shards``), in one paged pass; malformed rows go to ``bad_rows``."""
    found: dict[str, StoredSnapshot] = {}
    after: str | None = None
    while True:
        if shards is None:
            page = await store.scan_snapshots(status=_UNFINISHED, after=after, limit=_PAGE, bad_rows=bad_rows)
        else:
            page = await store.scan_snapshots(
                status=_UNFINISHED, after=after, limit=_PAGE, bad_rows=bad_rows, shards=shards
            )
        for stored in page:
            found[stored.header.run_id] = stored
        if len(page) < _PAGE:
            break
        after = page[-1].header.run_id
    if shards is not None:
        # A stored shard column or index is only where to look: which shard a run is in is
        # its id's (``shard_of``). An edited column must not hand a run to a second owner.
        count = getattr(store, "shards", DEFAULT_SHARDS)
        found = {rid: stored for rid, stored in found.items() if shard_of(rid, count) in shards}
    return found


async def _load_all(
    store: Store, run_ids: Sequence[str], concurrency: int, bad_rows: list[BadRow]
) -> dict[str, StoredSnapshot]:
    out: dict[str, StoredSnapshot] = {}
    limiter = anyio.CapacityLimiter(concurrency)

    async def chunk(ids: Sequence[str]) -> None:
        async with limiter:
            out.update(await store.load_many(ids, bad_rows=bad_rows))

    async with anyio.create_task_group() as tg:
        for i in range(0, len(run_ids), _CHUNK):
            tg.start_soon(chunk, run_ids[i : i + _CHUNK])
    return out


async def find_runs(
    stores: Sequence[Store],
    codec: Codec,
    registered: Mapping[str, Workflow],
    *,
    concurrency: int = 4,
    shards: Collection[int] | None = None,
) -> tuple[list[tuple[Snapshot, int]], RecoveryReport]:
    """Find the best verified snapshot of every unfinished run across ``stores``.

    Args:
        stores: the tiers, in the runtime's order.
        codec: the codec (with the key) that verifies and decodes payloads.
        registered: the registered workflows by name.
        concurrency: chunks loaded at once per tier.
        shards: only runs of these shards (None: every run).

    Returns:
        The snapshots to resume (registered workflows only, unfinished in their
        best copy), each with the highest version any copy claims (a corrupt
        newer copy included: the resumed run continues above it, so versions
        are never reused), and the report.
    """
    t0 = time.perf_counter()
    tier_errors: dict[str, str] = {}
    per_tier: list[dict[str, StoredSnapshot]] = []
    bad: dict[str, list[BadRow]] = {store.tier: [] for store in stores}
    for store in stores:
        try:
            per_tier.append(await _unfinished_copies(store, bad[store.tier], shards))
        except PersistenceError as exc:
            tier_errors[store.tier] = str(exc)
            per_tier.append({})
            log.error("hotstate recovery: cannot scan tier %r: %s", store.tier, exc)
    # Every run any tier lists: which workflow it is of is read from its chosen,
    # verified copy below, never from a stored header (one HSET could rename it).
    ids = sorted({rid for found in per_tier for rid in found})
    # A run unfinished in one tier may be newer (even finished) in another:
    # fetch its copy from every tier whose scan did not return it.
    for store, found in zip(stores, per_tier, strict=True):
        if store.tier in tier_errors:
            continue
        missing = [rid for rid in ids if rid not in found]
        if missing:
            try:
                found.update(await _load_all(store, missing, concurrency, bad[store.tier]))
            except PersistenceError as exc:
                tier_errors[store.tier] = str(exc)
    copies: dict[str, list[tuple[str, StoredSnapshot]]] = {rid: [] for rid in ids}
    for store, found in zip(stores, per_tier, strict=True):
        for rid in ids:
            copy = found.get(rid)
            if copy is not None:
                copies[rid].append((store.tier, copy))
    resumed: list[tuple[Snapshot, int]] = []
    report_resumed: list[RecoveredRun] = []
    finished: list[str] = []
    corrupt: list[CorruptCopy] = []
    lost: list[str] = []
    unregistered_runs: list[tuple[str, str]] = []
    for rid in ids:
        claimed = max(copies[rid], key=_claimed_version)[1].header.workflow
        if claimed not in registered:
            # Probably a retired workflow: its payload may name classes that are gone,
            # so find out from the newest copy that verifies, without decoding one.
            verified = _newest_verified_workflow(copies[rid], codec)
            if verified is not None and verified not in registered:
                unregistered_runs.append((rid, verified))
                continue
        choice = choose_copy(rid, copies[rid], codec)
        if choice.corrupt:
            corrupt.extend(choice.corrupt)
        snap = choice.snapshot
        if snap is None:
            lost.append(rid)
        elif snap.workflow not in registered:
            unregistered_runs.append((rid, snap.workflow))
        elif (problem := cursor_problem(snap, registered[snap.workflow])) is not None:
            log.warning("hotstate recovery: copy of run %r in %r cannot be resumed: %s", rid, choice.tier, problem)
            corrupt.append(CorruptCopy(run_id=rid, tier=choice.tier, version=snap.version, reason=problem))
            lost.append(rid)
        elif snap.status in TERMINAL_STATUSES:
            finished.append(rid)
        else:
            resumed.append((snap, choice.highest))
            report_resumed.append(
                _new(RecoveredRun, (rid, snap.workflow, choice.tier, snap.version, snap.status.value))
            )
    for tier, rows in bad.items():
        for row in rows:  # one malformed row is skipped and reported; the rest of its tier is read
            log.warning("hotstate recovery: malformed row of run %r in %r skipped: %s", row.run_id, tier, row.reason)
            corrupt.append(CorruptCopy(run_id=row.run_id, tier=tier, version=0, reason=f"malformed row: {row.reason}"))
    report = RecoveryReport(
        resumed=tuple(report_resumed),
        already_finished=tuple(finished),
        corrupt=tuple(corrupt),
        lost=tuple(lost),
        unregistered=tuple(sorted(unregistered_runs)),
        tier_errors=tier_errors,
        seconds=time.perf_counter() - t0,
    )
    return resumed, report


async def find_dead_letters(
    stores: Sequence[Store], codec: Codec, shards: Collection[int] | None = None
) -> tuple[dict[str, DeadLetter], list[CorruptCopy], dict[str, str]]:
    """Every run's newest verified dead letter across ``stores`` (of ``shards``, when given).

    A run's dead letter may sit in one tier only (a crash between tiers'
    flushes); the copy with the highest snapshot version that verifies wins.

    Returns:
        The dead letters by run id, the copies that failed verification, and
        the tiers that could not be read (with the error).
    """
    best: dict[str, DeadLetter] = {}
    corrupt: list[CorruptCopy] = []
    errors: dict[str, str] = {}
    for store in stores:
        try:
            malformed: list[BadRow] = []
            records = await store.dead_letters(bad_rows=malformed)
        except PersistenceError as exc:
            errors[store.tier] = str(exc)
            log.error("hotstate recovery: cannot read the dead letters of tier %r: %s", store.tier, exc)
            continue
        for row in malformed:  # one planted record never hides the tier's other letters
            log.warning(
                "hotstate recovery: malformed dead letter of run %r in %r: %s", row.run_id, store.tier, row.reason
            )
            corrupt.append(
                CorruptCopy(run_id=row.run_id, tier=f"{store.tier} (dead letter)", version=0, reason=row.reason)
            )
        if shards is not None:
            count = getattr(store, "shards", DEFAULT_SHARDS)
            records = [r for r in records if type(r.run_id) is str and shard_of(r.run_id, count) in shards]
        for record in records:
            version = record.snapshot.header.version
            # Nothing of a record is used before it verifies: a planted one may hold anything.
            held = best.get(record.run_id) if type(record.run_id) is str else None
            if held is not None and type(version) is int and held.snapshot.version >= version:
                continue
            try:
                letter = decode_dead_letter(record, codec, tier=store.tier)
            except (CorruptSnapshotError, CodecError, TypeError, ValueError) as exc:
                rid: object = record.run_id
                corrupt.append(
                    CorruptCopy(
                        run_id=rid if isinstance(rid, str) else repr(rid),
                        tier=f"{store.tier} (dead letter)",
                        version=version if type(version) is int else 0,
                        reason=str(exc),
                    )
                )
                log.warning(
                    "hotstate recovery: corrupt dead letter of run %r in %r: %s", record.run_id, store.tier, exc
                )
                continue
            best[record.run_id] = letter
    return best, corrupt, errors
