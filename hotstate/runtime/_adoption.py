"""Bringing stored runs into memory: recovery at start, and ``spawn`` of an id only a store knows.

The "Recovery after a process crash" box of DESIGN.md, on the runtime side:
``_recovery.find_runs``/``find_dead_letters`` choose the copies; this base class
of ``Runtime`` rebuilds the actors from them (``resumed`` transitions, versions
above any stored copy), records runs that failed for good just before a crash,
holds dead letters again, and repopulates a tier that lost its data.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import time
from typing import TYPE_CHECKING

import anyio

from hotstate._clock import Clock, SystemClock
from hotstate._errors import PersistenceError, WorkflowNotRegisteredError
from hotstate.actors import (
    TERMINAL_STATUSES,
    RunActor,
    Snapshot,
    Status,
    Transition,
    TransitionKind,
)
from hotstate.actors._history import History
from hotstate.persistence import decode_snapshot
from hotstate.runtime._host import RuntimeHost
from hotstate.runtime._recovery import RecoveryReport, find_dead_letters, find_runs

if TYPE_CHECKING:
    from hotstate.actors import DeadLetter, Workflow
    from hotstate.persistence import Persister, Store, StoredSnapshot

__all__ = ["StoreBackedHost"]

log = logging.getLogger("hotstate.runtime")

_new = tuple.__new__  # NamedTuples without the keyword-parsing __new__ frame


class StoreBackedHost(RuntimeHost):
    """Adoption of stored runs; ``Runtime`` sets the state up."""

    _workflows: dict[str, Workflow]
    _clock: Clock
    _recovery_concurrency: int
    recovery_report: RecoveryReport | None

    def _repopulate(self, persister: Persister) -> None:
        """A tier lost its data: queue every run held in memory, with its history and dead letter."""
        for actor in self._actors.values():
            snap = actor.snapshot
            persister.repopulate(snap, actor.history.transitions(snap.run_id))
        for letter in self._supervisor.dead_letters.values():
            self._store_dead_letter(letter, [persister])

    async def _recover_runs(self) -> None:
        assert self._persistence is not None  # noqa: S101
        stores = [p.store for p in self._persistence.persisters]
        # Recovery builds ~5 long-lived objects per run; with 100,000 runs the
        # cyclic GC's repeated full passes over them cost more than the rest of
        # recovery (measured: 3.9 s -> see the benchmark). Nothing here makes
        # cycles, so collection is paused for the bulk load and restored after.
        t0 = time.perf_counter()
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            snapshots, report = await find_runs(
                stores, self._codec, self._workflows, concurrency=self._recovery_concurrency
            )
            letters, bad_letters, letter_errors = await find_dead_letters(stores, self._codec)
            failed: list[str] = []
            for snap, highest in snapshots:
                if snap.run_id in self._actors:
                    continue
                letter = letters.get(snap.run_id)
                if letter is not None and letter.snapshot.version >= snap.version:
                    # Dead letters are written before the run rows in a flush: the
                    # run failed for good, but its final row missed the crash.
                    self._adopt_failed(letter, highest)
                    failed.append(snap.run_id)
                else:
                    self._adopt(snap, TransitionKind.resumed, highest)
            loaded, stale, rows_written = await self._load_dead_letters(letters, set(failed))
            failed.extend(rows_written)
            resumed = report.resumed
            if failed:
                failed_ids = set(failed)
                resumed = tuple(r for r in resumed if r.run_id not in failed_ids)
            self.recovery_report = dataclasses.replace(
                report,
                resumed=resumed,
                seconds=time.perf_counter() - t0,  # the whole recovery, adoption included
                corrupt=(*report.corrupt, *bad_letters),
                tier_errors={**letter_errors, **report.tier_errors},
                dead_letters=tuple(loaded),
                failed_before_crash=tuple(failed),
                stale_dead_letters=tuple(stale),
            )
            report = self.recovery_report
        finally:
            if gc_was_enabled:
                gc.enable()
        log.info("hotstate: recovered %d run(s) in %.3f s (%d corrupt copies, %d unregistered, %d lost)",
                 len(report.resumed), report.seconds, len(report.corrupt), len(report.unregistered), len(report.lost))

    def _adopt_failed(self, letter: DeadLetter, highest: int) -> None:
        """Record a run that failed for good before the crash (its dead letter is newer than its row)."""
        snap = letter.snapshot
        run_id = snap.run_id
        base = max(snap.version, highest)
        actor = RunActor(self._workflows[snap.workflow], snap, History(base))
        self._actors[run_id] = actor
        self._index.add(run_id, snap.workflow, snap.status)
        now = self.wall()
        v = base + 1  # above any copy a tier claims: versions are never reused
        new = _new(Snapshot, (run_id, snap.workflow, snap.workflow_version, v, snap.step, Status.failed,
                              snap.payload, snap.error, now, snap.attempt, snap.signals))
        self.commit(actor, new, _new(Transition, (run_id, v, TransitionKind.failed, snap.step, Status.failed, now,
                                                  f"recovered from its dead letter (v{snap.version})")))

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
        assert self._persistence is not None  # noqa: S101
        persisters = self._persistence.persisters
        newest: dict[str, int] = {}
        unknown = [rid for rid in letters if rid not in self._actors]
        for p in persisters:
            try:
                found = await p.store.load_many(unknown) if unknown else {}
            except PersistenceError as exc:
                log.error("hotstate recovery: cannot read runs of tier %r: %s", p.name, exc)
                continue
            for rid, stored in found.items():
                newest[rid] = max(newest.get(rid, 0), stored.header.version)
        loaded: list[str] = []
        stale: list[str] = []
        rows_written: list[str] = []
        for rid, letter in letters.items():
            actor = self._actors.get(rid)
            version = letter.snapshot.version
            newer = actor.snapshot.version if actor is not None else newest.get(rid, 0)
            # Letters are written before run rows, so a row newer than its run's
            # newest letter means the run was retried after that letter.
            if rid not in failed and newer > version:
                stale.append(rid)
                for p in persisters:
                    p.mark_dead_letter_deleted(rid)
                continue
            if letter.workflow not in self._workflows:
                log.warning("hotstate recovery: dead letter of run %r names unregistered workflow %r; left in the stores",
                            rid, letter.workflow)
                continue
            if actor is None:
                if newer < version:
                    # No tier holds the run's final row (its letter went first and
                    # the crash came before the row): write it now.
                    self._adopt_failed(letter, newer)
                    rows_written.append(rid)
                else:
                    snap = letter.snapshot
                    self._actors[rid] = RunActor(self._workflows[snap.workflow], snap, History(snap.version))
                    self._index.add(rid, snap.workflow, snap.status)
            self._supervisor.dead_letters[rid] = letter
            loaded.append(rid)
        return loaded, stale, rows_written

    def _adopt(self, snap: Snapshot, kind: TransitionKind, highest: int = 0) -> RunActor:
        """Bring a stored run into memory at ``snap`` and record ``kind`` (resumed).

        The new version is above ``highest``, the newest version any tier claims
        for the run (a corrupt copy's too): versions are never reused.
        """
        wf = self._workflows[snap.workflow]
        status = snap.status
        if status is Status.retrying or status is Status.pending:
            status = Status.running  # the backoff timer died with the old process: retry now
        run_id = snap.run_id
        base = max(snap.version, highest)
        actor = RunActor(wf, snap, History(base))
        self._actors[run_id] = actor
        self._index.add(run_id, snap.workflow, snap.status)
        now = self.wall()
        v = base + 1
        # _new, not _replace: recovery adopts 100,000 runs, and _replace costs ~3 us each.
        new = _new(Snapshot, (run_id, snap.workflow, snap.workflow_version, v, snap.step, status,
                              snap.payload, snap.error, now, snap.attempt, snap.signals))
        self.commit(actor, new, _new(Transition, (run_id, v, kind, snap.step, status, now, f"from v{v - 1}")))
        if status is not Status.waiting and status not in TERMINAL_STATUSES:
            self._schedule(actor)
        return actor

    async def _load_within(self, store: Store, run_id: str, seconds: float) -> tuple[bool, StoredSnapshot | None]:
        """``(True, store.load(run_id))``, or ``(False, None)`` after ``seconds`` on the runtime's clock (not the loop's)."""
        result: tuple[bool, StoredSnapshot | None] = (False, None)
        clock = self._clock
        if type(clock) is SystemClock:
            # SystemClock is the event loop's clock: a deadline on a cancel scope
            # is the same bound without a watchdog task (10,000 spawns: 1.7 s -> see
            # tests/integration/test_bad_input_at_scale.py's duration).
            with anyio.move_on_after(seconds):
                result = (True, await store.load(run_id))
            return result
        failure: PersistenceError | None = None
        async with anyio.create_task_group() as tg:

            async def watchdog() -> None:
                await clock.sleep_until(clock.now() + seconds)
                tg.cancel_scope.cancel()

            tg.start_soon(watchdog)
            try:
                result = (True, await store.load(run_id))
            except PersistenceError as exc:  # raised here, not wrapped in an ExceptionGroup
                failure = exc
            tg.cancel_scope.cancel()
        if failure is not None:
            raise failure
        return result

    async def _adopt_stored(self, run_id: str) -> bool:
        """spawn() with an id that only a store knows: bring that run back, never a duplicate.

        Every answering tier is asked, and the highest version that verifies
        wins (as in recovery): a run finished in a slow tier is never resumed
        from an older copy in a fast one, and the resumed run continues above
        every version any tier claims.

        Raises:
            WorkflowNotRegisteredError: the stored run's workflow is not registered.
            CorruptSnapshotError: copies exist, but none verifies.
        """
        assert self._persistence is not None  # noqa: S101
        copies: list[tuple[int, int, str, StoredSnapshot]] = []
        for order, p in enumerate(self._persistence.persisters):
            if p.failing:
                continue  # a down tier must not stall every spawn for its socket timeout
            try:
                answered, stored = await self._load_within(p.store, run_id, p.policy.ack_timeout)
            except PersistenceError as exc:
                log.warning("hotstate: spawn(%r) could not ask tier %r: %s", run_id, p.name, exc)
                continue
            if not answered:
                log.warning("hotstate: tier %r did not answer within %.3g s; spawn(%r) did not wait for it",
                            p.name, p.policy.ack_timeout, run_id)
                continue
            if stored is not None:
                copies.append((-stored.header.version, order, p.name, stored))
        if not copies:
            return False
        if run_id in self._actors:  # adopted by a concurrent spawn meanwhile
            return True
        copies.sort(key=lambda c: (c[0], c[1]))
        highest = -copies[0][0]
        workflow = copies[0][3].header.workflow
        if workflow not in self._workflows:
            raise WorkflowNotRegisteredError(run_id, workflow)
        error: PersistenceError | None = None
        for _, _, tier, stored in copies:
            try:
                snap = decode_snapshot(stored, self._codec, tier=tier)
            except PersistenceError as exc:  # corrupt or undecodable: fall back to the next copy
                log.warning("hotstate: spawn(%r): copy in %r v%d does not verify: %s",
                            run_id, tier, stored.header.version, exc)
                error = error or exc
                continue
            if snap.finished:
                actor = RunActor(self._workflows[snap.workflow], snap, History(snap.version))
                self._actors[run_id] = actor
                self._index.add(run_id, snap.workflow, snap.status)
            else:
                self._adopt(snap, TransitionKind.resumed, highest)
            return True
        assert error is not None  # noqa: S101 - every copy failed to decode
        raise error
