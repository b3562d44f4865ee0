"""``Adoption``: bringing stored runs into memory (recovery at start; ``spawn`` of an id only a tier knows).

The "Recovery and adoption" section of docs/architecture.md, on the runtime side:
``_recovery.find_runs``/``find_dead_letters``/``choose_copy`` choose the copies;
this object rebuilds the actors from them (``resumed`` transitions, versions
above any stored copy), records runs that failed for good just before a crash,
and holds dead letters again.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import time
from typing import TYPE_CHECKING, NamedTuple, final

from hotstate._errors import (
    CorruptSnapshotError,
    CrashLoopError,
    HotstateInternalError,
    PersistenceError,
    RunConflictError,
    WorkflowNotRegisteredError,
)
from hotstate.actors import (
    TERMINAL_STATUSES,
    ErrorInfo,
    Snapshot,
    Status,
    Transition,
    TransitionKind,
)
from hotstate.actors._actor import RunActor
from hotstate.actors._history import History
from hotstate.actors._snapshot import new_tuple as _new
from hotstate.runtime._recovery import (
    CorruptCopy,
    RecoveryReport,
    choose_copy,
    cursor_problem,
    find_dead_letters,
    find_runs,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Collection, Mapping, Sequence

    from hotstate.actors import DeadLetter, Workflow
    from hotstate.persistence import BadRow, Codec, StoredSnapshot
    from hotstate.persistence._tiers import Tiers
    from hotstate.runtime._registry import RunRegistry
    from hotstate.runtime._scheduler import Scheduler
    from hotstate.runtime._supervisor import Supervisor

__all__ = ["Adoption", "Repair", "crash_marker", "crashes_of", "same_definition"]

log = logging.getLogger("hotstate.runtime")


_LOAD_CHUNK = 2_000
_IN_FLIGHT = (Status.running, Status.pending, Status.retrying)
_CRASH = "hotstate.crash"  # ErrorInfo.type of the marker a resumed in-flight run carries


def same_definition(snap: Snapshot, wf: Workflow) -> None:
    """Refuse ``snap`` for ``spawn`` of ``wf`` unless it is of that workflow and definition version.

    Raises:
        RunConflictError: it is not; nothing was changed.
    """
    if snap.workflow != wf.name or snap.workflow_version != wf.version:
        raise RunConflictError(snap.run_id, snap.workflow, snap.workflow_version, wf.name, wf.version)


def crashes_of(snap: Snapshot) -> int:
    """How many consecutive process crashes found ``snap``'s run in flight (its stored crash marker)."""
    error = snap.error
    return error.attempt if error is not None and error.type == _CRASH else 0


def crash_marker(snap: Snapshot, crashes: int, now: float) -> ErrorInfo:
    """The ``error`` a run resumed after ``crashes`` crashes carries until its next step commits.

    Its ``attempt`` is ``crashes + 1``: the count should the process crash
    again before then. Stored with the snapshot, so the count is durable.
    """
    return ErrorInfo(
        type=_CRASH,
        message=f"resumed at step {snap.step} after {crashes} consecutive process crash(es) while in flight",
        traceback="",
        step=snap.step,
        step_name="",
        attempt=crashes + 1,
        at=now,
    )


class Repair(NamedTuple):
    """What ``Adoption.reconcile`` did.

    Attributes:
        repaired: per tier, how many runs were written back to the newest verified copy.
        corrupt: copies that did not verify (or rows that were malformed), never copied.
        errors: tiers that could not be compared or repaired, with the error.
    """

    repaired: dict[str, int]
    corrupt: list[CorruptCopy]
    errors: dict[str, str]


@final
class Adoption:
    """Recovers every stored unfinished run, or adopts one stored id.

    Args:
        registry: where adopted runs are held.
        scheduler: commits their ``resumed`` transitions and runs them.
        supervisor: holds the dead letters.
        workflows: the registered workflows (the runtime's live mapping).
        codec: verifies and decodes stored copies.
        wall: the wall clock for stamps.
        concurrency: chunks loaded at once per tier during recovery.
    """

    def __init__(
        self,
        registry: RunRegistry,
        scheduler: Scheduler,
        supervisor: Supervisor,
        workflows: Mapping[str, Workflow],
        codec: Codec,
        wall: Callable[[], float],
        *,
        concurrency: int,
        crash_limit: int,
        release_timeout: float,
    ) -> None:
        self._registry = registry
        self._scheduler = scheduler
        self._tiers: Tiers = scheduler.tiers
        self._supervisor = supervisor
        self._workflows = workflows
        self._codec = codec
        self._wall = wall
        self._concurrency = concurrency
        self._crash_limit = crash_limit
        self._release_timeout = release_timeout
        self._quarantine: list[tuple[Snapshot, int, int]] = []  # (snapshot, highest, crashes) held back

    async def recover(self, shards: Collection[int] | None = None) -> RecoveryReport:
        """Resume every unfinished run found in the tiers; hold their dead letters again.

        Args:
            shards: only runs of these shards (the ones this process just
                claimed and sealed); None: every run (ownership off).

        Returns:
            What was found and done.
        """
        # Recovery builds ~5 long-lived objects per run; with 100,000 runs the
        # cyclic GC's repeated full passes over them cost almost as much as the
        # rest of recovery. Measured (100,000 unfinished runs in SQLite, medians
        # of 3, 2026-11): 2.3 s with collection on -> 1.3 s with it paused.
        # Nothing here makes cycles, so collection is paused for the bulk load
        # and restored after.
        t0 = time.perf_counter()
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            report = await self._recover(t0, shards)
        finally:
            if gc_was_enabled:
                gc.enable()
        log.info(
            "hotstate: recovered %d run(s) in %.3f s (%d corrupt copies, %d unregistered, %d lost)",
            len(report.resumed),
            report.seconds,
            len(report.corrupt),
            len(report.unregistered),
            len(report.lost),
        )
        return report

    async def reconcile(self, shards: Collection[int] | None = None) -> Repair:
        """Bring every tier that is behind up to the newest verified copy of every run, finished ones included.

        A run finished in a fast tier while a slow tier still holds an older,
        unfinished copy (a crash between their flushes) must never come back
        from the older copy: the slow tier gets the newest verified copy and
        its history. Copies that do not verify are reported, never spread.
        """
        if len(self._tiers) < 2:
            return Repair({}, [], {})  # one tier is its own newest copy
        malformed: dict[str, list[BadRow]] = {}
        held, errors = await self._tiers.versions(malformed, shards)
        corrupt = [
            CorruptCopy(run_id=row.run_id, tier=tier, version=0, reason=f"malformed row: {row.reason}")
            for tier, rows in malformed.items()
            for row in rows
        ]
        # A malformed row is left for an operator: never written over, even with a verified copy.
        untouchable = {(tier, row.run_id) for tier, rows in malformed.items() for row in rows}
        if len(held) < 2:
            return Repair({}, corrupt, errors)
        newest: dict[str, int] = {}
        for versions in held.values():
            for rid, v in versions.items():
                if v > newest.get(rid, 0):
                    newest[rid] = v
        ids = sorted(rid for rid, v in newest.items() if any(versions.get(rid, 0) < v for versions in held.values()))
        if not ids:
            return Repair({}, corrupt, errors)
        copies: dict[str, list[tuple[str, StoredSnapshot]]] = {rid: [] for rid in ids}
        for tier, versions in held.items():
            bad: list[BadRow] = []
            want = [rid for rid in ids if rid in versions]
            for i in range(0, len(want), _LOAD_CHUNK):
                found = await self._tiers.load_from(tier, want[i : i + _LOAD_CHUNK], bad)
                for rid, stored in found.items():
                    copies[rid].append((tier, stored))
            corrupt.extend(
                CorruptCopy(run_id=row.run_id, tier=tier, version=0, reason=f"malformed row: {row.reason}")
                for row in bad
            )
        repairs: dict[str, list[tuple[StoredSnapshot, Sequence[Transition]]]] = {tier: [] for tier in held}
        for rid in ids:
            if not copies[rid]:
                continue
            choice = choose_copy(rid, copies[rid], self._codec)
            corrupt.extend(choice.corrupt)
            if choice.snapshot is None:
                continue
            stored = next(c for t, c in copies[rid] if t == choice.tier)
            try:
                history = await self._tiers.history_from(choice.tier, rid)
            except PersistenceError as exc:
                log.warning("hotstate: history of run %r in %r unreadable; repairing its snapshot only: %s",
                            rid, choice.tier, exc)  # fmt: skip
                history = []
            for tier, versions in held.items():
                if versions.get(rid, 0) < choice.snapshot.version and (tier, rid) not in untouchable:
                    repairs[tier].append((stored, history))
        repaired: dict[str, int] = {}
        for tier, items in repairs.items():
            if items:
                try:
                    repaired[tier] = await self._tiers.repair(tier, items)
                except PersistenceError as exc:
                    errors[tier] = str(exc)
                    log.error("hotstate: could not repair tier %r: %s", tier, exc)
        if repaired:
            log.info("hotstate: tiers behind brought up to the newest verified copies: %s", repaired)
        return Repair(repaired, corrupt, errors)

    async def _recover(self, t0: float, shards: Collection[int] | None) -> RecoveryReport:
        repair = await self.reconcile(shards)
        stores = self._tiers.stores
        snapshots, report = await find_runs(
            stores, self._codec, self._workflows, concurrency=self._concurrency, shards=shards
        )
        letters, bad_letters, letter_errors = await find_dead_letters(stores, self._codec, shards)
        failed: list[str] = []
        crash_looped: list[str] = []
        ready: list[RunActor] = []  # resumed, scheduled once their crash counts are durable
        registry = self._registry
        # Fewest consecutive crashes first: a suspect never delays the others.
        snapshots.sort(key=lambda item: crashes_of(item[0]))
        for snap, highest in snapshots:
            if snap.run_id in registry:
                continue
            letter = letters.get(snap.run_id)
            if letter is not None and letter.snapshot.version >= snap.version:
                # Dead letters are written before the run rows in a flush: the
                # run failed for good, but its final row missed the crash.
                self._adopt_failed(letter, highest)
                failed.append(snap.run_id)
            elif snap.status in _IN_FLIGHT:
                # In flight at the crash that just happened. Its marker (set when it was
                # last resumed, cleared by any step since) says how many consecutive
                # crashes that makes; unmarked, this is the first.
                marked = crashes_of(snap)
                crashes = max(marked, 1)
                if crashes >= self._crash_limit:
                    ready.append(self._fail_crash_loop(snap, highest, crashes))
                    crash_looped.append(snap.run_id)
                elif marked == 0:
                    ready.append(self._resume(snap, highest, crashes=crashes, schedule=False))
                else:
                    # In flight at the last crash too, without durable progress since:
                    # a suspect. Held back, released one at a time once the others run.
                    self._registry.add(
                        RunActor(self._workflows[snap.workflow], snap, History(max(snap.version, highest)))
                    )
                    self._quarantine.append((snap, highest, crashes))
            else:
                ready.append(self._resume(snap, highest, schedule=False))
        loaded, stale, rows_written = await self._load_dead_letters(letters, set(failed))
        for actor in ready:
            status = actor.snapshot.status
            if status is not Status.waiting and status not in TERMINAL_STATUSES:
                # Its first step runs once the resumed snapshot, with its crash count,
                # is durable in a tier: a step that takes the process down at once
                # still counts. Runs start as their flush lands, not after all of them.
                self._scheduler.release_when_durable(actor)
        failed.extend(rows_written)
        resumed = report.resumed
        if failed or crash_looped:
            not_resumed = {*failed, *crash_looped}
            resumed = tuple(r for r in resumed if r.run_id not in not_resumed)
        return dataclasses.replace(
            report,
            resumed=resumed,
            seconds=time.perf_counter() - t0,  # the whole recovery, adoption included
            corrupt=tuple(dict.fromkeys((*repair.corrupt, *report.corrupt, *bad_letters))),  # each copy once
            tier_errors={**repair.errors, **letter_errors, **report.tier_errors},
            repaired=repair.repaired,
            dead_letters=tuple(loaded),
            failed_before_crash=tuple(failed),
            stale_dead_letters=tuple(stale),
            crash_looped=tuple(crash_looped),
            held_back=tuple(s.run_id for s, _, _ in self._quarantine),
        )

    async def release_held_back(self) -> None:
        """Run the held-back suspects one at a time, each with its crash count durable first.

        A suspect's count goes up only when it is released, and is flushed to
        every tier before its step runs: if it takes the process down again,
        only its own count has grown, and past ``crash_limit`` the next recovery
        fails it instead. The next suspect is released once this one has made
        durable progress (its next version is in every tier), has ended, or
        ``release_timeout`` passed.
        """
        while self._quarantine:
            snap, highest, crashes = self._quarantine.pop(0)
            actor = self._registry.get(snap.run_id)
            if actor is None or actor.snapshot.version != snap.version:
                continue  # purged, or moved on by a send/cancel meanwhile
            self._registry.remove(snap.run_id)
            actor = self._resume(snap, highest, crashes=crashes, schedule=False)
            released = actor.snapshot.version
            try:
                await self._tiers.flush()
            except PersistenceError as exc:
                log.warning("hotstate: held-back run %r released without its crash count durable: %s", snap.run_id, exc)
            self._scheduler.schedule(actor)
            for tier in self._tiers.names:
                try:
                    await self._tiers.wait_durable(snap.run_id, released + 1, tier=tier, timeout=self._release_timeout)
                except PersistenceError:
                    break  # no durable progress in time (a long step, or a tier down): release the next anyway

    async def adopt(self, run_id: str, *, expect: Workflow | None = None) -> bool:
        """``spawn`` with an id only a tier knows: bring that run back, never a duplicate.

        Every answering tier is asked and ``choose_copy`` picks (as in recovery):
        a run finished in a slow tier is never resumed from an older copy in a
        fast one, and the resumed run continues above every version any tier claims.
        Only the chosen (verified) copy is trusted: its workflow, not a stored
        header's, decides, and with ``expect`` a run of another workflow or
        definition version is refused before anything of it is resumed.

        Returns:
            True when the run is now held (adopted here or meanwhile), False when no tier has it.

        Raises:
            RunConflictError: the stored run is not of ``expect``; it was left as it is.
            WorkflowNotRegisteredError: the stored run's workflow is not registered.
            CorruptSnapshotError: copies exist, but none verifies.
            StoreUnavailableError: a tier could not say whether it holds the run
                (never a second lineage from the other tiers' older copies).
        """
        copies = await self._tiers.copies(run_id)
        if not copies:
            return False
        if run_id in self._registry:  # adopted by a concurrent spawn meanwhile
            return True
        choice = choose_copy(run_id, copies, self._codec)
        snap = choice.snapshot
        if snap is None:
            if choice.error is None:  # pragma: no cover - no snapshot means some copy failed
                raise HotstateInternalError(f"no copy of run {run_id!r} was chosen and none failed")
            raise choice.error
        if expect is not None:
            same_definition(snap, expect)
        if snap.workflow not in self._workflows:
            raise WorkflowNotRegisteredError(run_id, snap.workflow)
        problem = cursor_problem(snap, self._workflows[snap.workflow])
        if problem is not None:
            raise CorruptSnapshotError(choice.tier, run_id, snap.version, problem)
        if run_id in self._registry:  # adopted by a concurrent spawn while the copies were checked
            return True
        if snap.finished:
            self._registry.add(RunActor(self._workflows[snap.workflow], snap, History(snap.version)))
        else:
            self._resume(snap, choice.highest)
        return True

    def _resume(self, snap: Snapshot, highest: int, *, crashes: int = 0, schedule: bool = True) -> RunActor:
        """Bring a stored unfinished run into memory at ``snap`` and record ``resumed``.

        ``crashes`` > 0 marks a run that was in flight at that many consecutive
        crashes: the resumed snapshot carries ``crashes + 1`` (in its ``error``,
        so it is stored with it), the count should the process crash again
        before the run's next step clears it.
        """
        status = snap.status
        if status is Status.retrying or status is Status.pending:
            status = Status.running  # the backoff timer died with the old process: retry now
        error: ErrorInfo | None = snap.error
        if crashes:
            error = crash_marker(snap, crashes, self._wall())
        elif crashes_of(snap):
            error = None  # not in flight (waiting): a crash marker it still carries is stale
        actor = self._bring_back(snap, highest, status, TransitionKind.resumed, "from v{}", error)
        if schedule and status is not Status.waiting and status not in TERMINAL_STATUSES:
            self._scheduler.schedule(actor)
        return actor

    def _fail_crash_loop(self, snap: Snapshot, highest: int, crashes: int) -> RunActor:
        """Fail a run in flight at ``crashes`` consecutive crashes: compensated and dead-lettered, not resumed.

        Returns:
            The actor, to schedule: its mailbox holds the failure.
        """
        actor = self._resume(snap, highest, schedule=False)
        exc = CrashLoopError(snap.run_id, crashes, snap.step)
        log.error("hotstate recovery: %s", exc)
        actor.post_fail("it crashed the process", exc)
        return actor

    def _adopt_failed(self, letter: DeadLetter, highest: int) -> None:
        """Record a run that failed for good before the crash (its dead letter is newer than its row)."""
        snap = letter.snapshot
        detail = f"recovered from its dead letter (v{snap.version})"
        self._bring_back(snap, highest, Status.failed, TransitionKind.failed, detail, snap.error)

    def _bring_back(
        self,
        snap: Snapshot,
        highest: int,
        status: Status,
        kind: TransitionKind,
        detail: str,
        error: ErrorInfo | None,
    ) -> RunActor:
        """Hold ``snap``'s run and commit its next version in ``status`` with a ``kind`` transition and ``error``.

        The new version is above ``highest``, the newest version any tier claims
        for the run (a corrupt copy's too): versions are never reused. ``detail``
        may hold ``{}`` for the version it continues from.

        Returns:
            The actor.
        """
        run_id = snap.run_id
        base = max(snap.version, highest)
        actor = RunActor(self._workflows[snap.workflow], snap, History(base))
        self._registry.add(actor)
        now = self._wall()
        v = base + 1
        # _new, not _replace: recovery adopts 100,000 runs, and _replace costs ~3 us each.
        fields = (run_id, snap.workflow, snap.workflow_version, v, snap.step, status, snap.payload,
                  error, now, snap.attempt, snap.signals)  # fmt: skip
        transition = _new(Transition, (run_id, v, kind, snap.step, status, now, detail.format(base)))
        self._scheduler.commit(actor, _new(Snapshot, fields), transition)
        return actor

    async def _load_dead_letters(
        self, letters: dict[str, DeadLetter], failed: set[str]
    ) -> tuple[list[str], list[str], list[str]]:
        """Hold the stores' dead letters in memory again, so they can be listed and retried.

        ``failed`` are the runs already recorded as failed from their letter.
        A letter older than its run (retried before the crash, the deletion not
        yet durable) is stale: it is deleted from every tier instead. A letter
        newer than every stored row of its run (the crash came between the
        letter and the row) has its final row written now.

        Returns:
            The run ids loaded, the stale ones deleted, and the runs whose
            final row was written from their letter.
        """
        registry = self._registry
        newest = await self._tiers.newest_versions([rid for rid in letters if rid not in registry])
        loaded: list[str] = []
        stale: list[str] = []
        rows_written: list[str] = []
        for rid, letter in letters.items():
            actor = registry.get(rid)
            version = letter.snapshot.version
            newer = actor.snapshot.version if actor is not None else newest.get(rid, 0)
            # Letters are written before run rows, so a row newer than its run's
            # newest letter means the run was retried after that letter.
            if rid not in failed and newer > version:
                stale.append(rid)
                self._tiers.mark_dead_letter_deleted(rid)
                continue
            if letter.workflow not in self._workflows:
                log.warning(
                    "hotstate recovery: dead letter of run %r names unregistered workflow %r; left in the stores",
                    rid,
                    letter.workflow,
                )
                continue
            if actor is None:
                if newer < version:
                    # No tier holds the run's final row (its letter went first and
                    # the crash came before the row): write it now.
                    self._adopt_failed(letter, newer)
                    rows_written.append(rid)
                else:
                    snap = letter.snapshot
                    registry.add(RunActor(self._workflows[snap.workflow], snap, History(snap.version)))
            self._supervisor.dead_letters[rid] = letter
            loaded.append(rid)
        return loaded, stale, rows_written
