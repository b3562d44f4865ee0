"""``Scheduler``: the ready queue and its tasks; the ``ActorHost`` and the ``TierListener``.

Runnable actors wait in a ready queue served by a scheduler task that runs
their steps inline. The task arms a watch (``loop.call_soon``) before it can
yield; the watch runs only once the task has yielded, so if it finds the task
inside a run's turn, that run's step has suspended: the task stays with that run
as its host and a fresh task takes the queue (``_handoff``). This costs one
callback per yield instead of anything per step. An idle run holds no task.

The actors call in through the ``ActorHost`` protocol (commit, failure
decisions, timers); the tiers report through ``TierListener`` (a parked run may
go on, backpressure, an unencodable payload, a newer stored version, a store
that lost its data). Runs
that must not advance yet are parked: they hold no task and sit in a tier's
``waiting`` map or the throttled list until the flush that unblocks them is
acknowledged. This class is the only writer of an actor's scheduling fields
(``queued``, ``running``, ``host_task``, ``parked``, ``interrupt``).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING, Any, Final, final

import anyio
import anyio.lowlevel

from hotstate.actors import (
    TERMINAL_STATUSES,
    DeadLetter,
    Snapshot,
    Status,
    Transition,
    TransitionKind,
)
from hotstate.actors._actor import RunActor
from hotstate.actors._history import History
from hotstate.actors._snapshot import new_tuple as _new
from hotstate.persistence._tiers import Tiers
from hotstate.runtime._timers import TimerHandle

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence

    from hotstate._clock import Clock
    from hotstate._errors import CodecError, StaleVersionError
    from hotstate._instrument import Instruments
    from hotstate.actors import Step, Workflow
    from hotstate.persistence import Codec, Tier
    from hotstate.runtime._events import EventBus
    from hotstate.runtime._registry import RunRegistry
    from hotstate.runtime._supervisor import Supervisor
    from hotstate.runtime._timers import TimerService

__all__ = ["Scheduler"]

log = logging.getLogger("hotstate.runtime")

# A scheduler task yields to the event loop after this many steps, so a burst
# of synchronous steps never starves other tasks (STYLE.md: every N steps).
_STEPS_PER_YIELD: Final = 256

_PENDING: Final = Status.pending
_SPAWNED: Final = TransitionKind.spawned

_TURN_ERRORS = 3
"""Turns in a row a run may raise at one version before it is failed (``Scheduler._turn_failed``)."""


@final
class _Release:
    """A recovered run to schedule once the first tier acknowledges its resumed snapshot (one-shot)."""

    __slots__ = ("actor", "fired")

    def __init__(self, actor: RunActor) -> None:
        self.actor = actor
        self.fired = False


@final
class Scheduler:
    """Runs actors' turns from a ready queue; what actors and tiers call into.

    It builds the ``Tiers`` it marks into, because the tiers report back to it:
    building them here needs no late binding in either direction.

    Args:
        registry: the runs held in memory.
        supervisor: failure decisions and dead letters.
        timers: deadlines for wake-ups and step timeouts.
        bus: where transitions are published.
        clock: the wall clock for stamps.
        tiers: the persistence tiers (none: memory-only).
        codec: the payload codec of every tier.
        instruments: observers of transitions and store writes.
        steps_per_turn: steps one run may take before others get a turn.
    """

    def __init__(
        self,
        registry: RunRegistry,
        supervisor: Supervisor,
        timers: TimerService,
        bus: EventBus,
        clock: Clock,
        *,
        tiers: Sequence[Tier],
        codec: Codec,
        instruments: Instruments,
        steps_per_turn: int,
    ) -> None:
        self._registry = registry
        self._supervisor = supervisor
        self._timers = timers
        self._bus = bus
        self.wall = clock.wall
        self.tiers = Tiers(tiers, codec, clock, self, instruments)
        self.mark = instruments.wrap_mark(self.tiers.mark)
        self.hold = self.tiers.write_through
        self.stopping = False
        self._open = False
        self._tg: anyio.abc.TaskGroup | None = None
        self._ready: deque[RunActor] = deque()
        self._worker_active = False
        self._worker_actor: RunActor | None = None
        self._watch_armed = False
        self._steps_per_turn = steps_per_turn
        self.tasks = 0
        self._tasks_idle: anyio.Event | None = None
        self.transitions = 0
        self.internal_errors = 0
        # Runs whose turn raised, with the version it raised at and how many times in a row.
        self._turn_errors: dict[str, tuple[int, int]] = {}
        self._pressured: set[str] = set()
        self._throttled: list[RunActor] = []
        self._gate: anyio.Event | None = None  # spawn waits on it under backpressure
        self.throttle_waits = 0
        # Ownership: told when a tier's fence refused shards (the ShardManager sets it).
        self.on_fenced: Callable[[str, Mapping[int, int], Mapping[int, int]], None] | None = None
        self._suspend: Callable[[RunActor], bool] | None = None  # runs of shards handed off or whose lease lapsed
        self._suspends: dict[str, Callable[[RunActor], bool]] = {}  # each active suspend() by its key
        self._suspended: list[RunActor] = []

    # ------------------------------------------------------------ lifecycle

    def start(self, task_group: anyio.abc.TaskGroup) -> None:
        """Serve the ready queue from tasks of ``task_group`` from now on."""
        self._tg = task_group
        self._open = True
        if self._ready:
            self._start_worker()

    def start_background(self, job: Callable[[], Awaitable[None]], name: str) -> None:
        """Run ``job`` in the runtime's task group; it is cancelled at shutdown, and a crash in it is logged."""
        tg = self._tg
        if tg is None:  # pragma: no cover - only called once started
            return

        async def guarded() -> None:
            try:
                await job()
            except Exception:  # noqa: BLE001 - machinery must not take the runtime down
                self.internal_error(name)

        tg.start_soon(guarded, name=name)

    async def drain(self, timeout: float) -> int:  # noqa: ASYNC109 - a shielded deadline, not a cancellation point
        """Start no new step; give the steps in flight ``timeout`` seconds to finish.

        Returns:
            How many tasks were still running at the deadline.
        """
        self._open = False
        self.stopping = True
        with anyio.move_on_after(timeout, shield=True):
            while self.tasks:
                self._tasks_idle = anyio.Event()
                await self._tasks_idle.wait()
        return self.tasks

    def wake_waiters(self) -> None:
        """Wake every ``wait_finished`` caller (they see the runtime closed)."""
        for actor in self._registry:
            if actor.waiters is not None:
                actor.waiters.set()
                actor.waiters = None

    @property
    def ready(self) -> int:
        """Runs waiting in the ready queue."""
        return len(self._ready)

    # ------------------------------------------------------------ ActorHost

    @property
    def bus(self) -> EventBus:
        """The event bus (ActorHost)."""
        return self._bus

    def must_wait(self, actor: RunActor, version: int) -> bool:
        """Park ``actor`` until it may advance past ``version`` (ActorHost)."""
        if self._suspend is not None and self._suspend(actor):
            self._suspended.append(actor)  # its shard is being handed off: it stops here
            return True
        if self._pressured:
            self.throttle_waits += 1
            self._throttled.append(actor)
            return True
        return self.tiers.park_until_durable(actor.snapshot.run_id, version, actor)

    def commit(self, actor: RunActor, snapshot: Snapshot, transition: Transition) -> None:
        """Make ``snapshot`` current: history, status index, tiers, subscribers (ActorHost).

        The actor's fast path (``RunActor.turn``) and ``spawn_new`` do the same
        inline; ``tests/unit/runtime/test_scheduler.py`` checks that all three agree.
        """
        old = actor.snapshot.status
        actor.snapshot = snapshot
        if snapshot.status is not old:
            by_status = self._registry.by_status
            del by_status[old][snapshot.run_id]
            by_status[snapshot.status][snapshot.run_id] = None
        actor.history.add(transition)
        self.transitions += 1
        if self.mark is not None:
            self.mark(snapshot, transition)
        if self._bus.count:
            self._publish(transition, snapshot.workflow)

    def _publish(self, transition: Transition, workflow: str) -> None:
        try:
            self._bus.publish(transition, workflow)
        except Exception:  # noqa: BLE001 - a subscriber bug must not stop the run
            self.internal_error("event bus publish")

    def retry_delay(self, actor: RunActor, step: Step, exc: Exception) -> float | None:
        """Ask the supervisor whether to retry (ActorHost)."""
        if self.stopping:
            return 0.0  # shutdown is not a failure verdict: retry when resumed
        return self._supervisor.retry_delay(actor, step, exc)

    def schedule_wake(self, actor: RunActor, delay: float) -> None:
        """Wake ``actor`` after ``delay`` seconds (ActorHost)."""

        def wake() -> None:
            if self._open:
                actor.post_wake()
                self.schedule(actor)

        self._timers.call_later(delay, wake)

    def arm_timeout(self, actor: RunActor, timeout: float) -> TimerHandle:
        """Cancel the actor's suspended step after ``timeout`` seconds (ActorHost)."""

        def expire() -> None:
            self.interrupt(actor, "timeout")  # fires only while the step's task is suspended in it

        return self._timers.call_later(timeout, expire)

    def disarm(self, handle: object) -> None:
        """Cancel a timeout timer (ActorHost)."""
        if isinstance(handle, TimerHandle):
            handle.cancel()

    def interrupt(self, actor: RunActor, reason: str) -> bool:
        """Cancel the step ``actor`` is suspended in, from another task (see ``_actor.py``).

        Returns:
            True when a suspended step was interrupted.
        """
        task = actor.host_task
        if actor.running and actor.interrupt is None and task is not None and task is not asyncio.current_task():
            actor.interrupt = reason
            task.cancel()
            return True
        return False

    def finished(self, actor: RunActor) -> None:
        """A run reached a terminal status (ActorHost)."""
        snap = actor.snapshot
        if snap.status is Status.failed and snap.error is not None:
            letter = self._supervisor.dead_letters[snap.run_id] = DeadLetter(
                run_id=snap.run_id,
                workflow=snap.workflow,
                snapshot=snap,
                error=snap.error,
                attempts=actor.attempts,
                compensation_errors=actor.comp_errors,
                at=self.wall(),
            )
            self.tiers.mark_dead_letter(letter)  # encoded in each tier's flush
        if actor.attempts:
            self._supervisor.forget(snap.run_id)  # only runs that failed once have a window
        if actor.waiters is not None:
            actor.waiters.set()
            actor.waiters = None

    # ------------------------------------------------------------ TierListener

    def durable(self, item: Any) -> None:
        """A parked run's snapshot is durable in a write-through tier: schedule it (TierListener)."""
        if item.__class__ is _Release:
            if not item.fired:  # the first tier to make it durable releases it; the others find it fired
                item.fired = True
                self.schedule(item.actor)
            return
        self.schedule(item)

    def release_when_durable(self, actor: RunActor) -> None:
        """Schedule ``actor`` once its current snapshot is durable in any tier (at once when memory-only)."""
        snap = actor.snapshot
        durable = self.tiers.durable_versions(snap.run_id)
        if not durable or max(durable.values()) >= snap.version:
            self.schedule(actor)  # memory-only, or a flush already took it before this call
            return
        self.tiers.notify_everywhere(snap.run_id, _Release(actor))

    def pressure(self, tier: str, on: bool) -> None:
        """A tier crossed its memory bound: park steps, or let them go again (TierListener)."""
        if on:
            if not self._pressured:
                log.warning("hotstate: tier %r passed its memory bound; steps wait until it drains", tier)
            self._pressured.add(tier)
            self.hold = True
            return
        self._pressured.discard(tier)
        self.hold = self.tiers.write_through or bool(self._pressured) or self._suspend is not None
        if not self._pressured:
            throttled, self._throttled = self._throttled, []
            for actor in throttled:
                self.schedule(actor)
            if self._gate is not None:
                self._gate.set()
                self._gate = None

    def codec_error(self, run_id: str, exc: CodecError) -> None:
        """A run's payload cannot be encoded: fail the run for good (TierListener)."""
        actor = self._registry.get(run_id)
        if actor is None or actor.snapshot.finished:
            return
        actor.post_fail("its payload cannot be persisted", exc)
        self.schedule(actor)

    def conflict(self, run_id: str, exc: StaleVersionError) -> None:
        """A tier holds a newer version of the run than this runtime wrote: fail the run (TierListener).

        Its lineage in the stores has moved on without this process (a second
        writer, or a copy restored under it); continuing would overwrite nothing
        and acknowledge nothing, so the run stops here with the conflict as its error.
        """
        actor = self._registry.get(run_id)
        if actor is None or actor.snapshot.finished:
            return
        actor.post_fail("a tier holds a newer version of it", exc)
        self.schedule(actor)

    def reset(self, tier: str) -> None:
        """``tier`` lost its data: write every run held in memory, its history and dead letter again (TierListener)."""
        self.tiers.repopulate(
            tier,
            ((a.snapshot, a.history.transitions(a.snapshot.run_id)) for a in self._registry),
            self._supervisor.dead_letters.values(),
        )

    def fenced(self, tier: str, shards: Mapping[int, int], sent: Mapping[int, int]) -> None:
        """``tier``'s fence refused ``shards`` of a save made at ``sent`` epochs (TierListener)."""
        if self.on_fenced is not None:
            self.on_fenced(tier, shards, sent)

    def suspend(self, which: Callable[[RunActor], bool], key: str = "handoff") -> None:
        """Stop the runs ``which`` selects at their next step; ``resume_suspended(key)`` ends it.

        A hand-off drains its shards this way (``key`` "handoff"), and an
        owner whose lease lapsed stops its shards while it claims them back
        ("lapsed"); the two may overlap. It uses the write-through gate
        (``hold``): while nothing is suspended it costs nothing per step.
        """
        self._suspends[key] = which
        self._suspend = selected = self._selector() or which
        self.hold = True
        ready = self._ready
        if ready:
            keep = [a for a in ready if not selected(a)]
            stopped = [a for a in ready if selected(a)]
            for a in stopped:
                a.queued = False
                a.parked = True
            self._suspended.extend(stopped)
            ready.clear()
            ready.extend(keep)

    def resume_suspended(self, key: str = "handoff") -> None:
        """End ``suspend(key)``: the runs it stopped go on (evicted ones stay out, others still suspended stay)."""
        self._suspends.pop(key, None)
        self._suspend = which = self._selector()
        self.hold = self.tiers.write_through or bool(self._pressured) or which is not None
        stopped, self._suspended = self._suspended, []
        for actor in stopped:
            if actor.evicted:
                continue
            if which is not None and which(actor):
                self._suspended.append(actor)
            else:
                self.schedule(actor)

    def _selector(self) -> Callable[[RunActor], bool] | None:
        """The runs any active ``suspend`` selects (None: none is active)."""
        selectors = list(self._suspends.values())
        if not selectors:
            return None
        if len(selectors) == 1:
            return selectors[0]
        return lambda actor: any(which(actor) for which in selectors)

    def evict(self, actors: Collection[RunActor]) -> int:
        """Take ``actors`` out of this process: their shard left it (design/ownership.md §4.7).

        They leave the ready queue and every index, are never scheduled again
        (``queued`` stays set, so ``schedule`` returns at once, and ``parked``
        keeps ``_serve`` from queueing them after a turn), and a step in flight
        is interrupted (an evicted actor commits nothing more; a compensation
        in flight finishes, its rows refused by the fence). ``wait_finished``
        callers wake and follow the run through the stores.

        Returns:
            How many of them still had a step or compensation running.
        """
        ids = {a.snapshot.run_id for a in actors}
        if not ids:
            return 0
        ready = self._ready
        if ready:
            keep = [a for a in ready if a.snapshot.run_id not in ids]
            ready.clear()
            ready.extend(keep)
        if self._throttled:
            self._throttled = [a for a in self._throttled if a.snapshot.run_id not in ids]
        running = 0
        registry = self._registry
        dead = self._supervisor.dead_letters
        for actor in actors:
            rid = actor.snapshot.run_id
            actor.evicted = True
            actor.queued = True
            actor.parked = True
            if actor.running:
                running += 1
                if actor.snapshot.status is not Status.compensating:
                    self.interrupt(actor, "evict")
            registry.remove(rid)
            dead.pop(rid, None)
            self._supervisor.forget(rid)
            self._turn_errors.pop(rid, None)
            if actor.waiters is not None:
                actor.waiters.set()
                actor.waiters = None
        return running

    async def wait_gate(self) -> None:
        """Wait while any tier is over its memory bound (spawn's backpressure)."""
        while self._pressured:
            if self._gate is None:
                self._gate = anyio.Event()
            await self._gate.wait()

    # ------------------------------------------------------------ scheduling

    def spawn_new(self, workflow: Workflow, run_id: str, payload: Any) -> None:
        """Hold, record and queue a new run at version 1 (``Runtime.spawn``'s fast path).

        What ``RunRegistry.add``, ``commit`` and ``schedule`` do, inlined: spawn is
        on W1's measured path.
        """
        name = workflow.name
        now = self.wall()
        snap = _new(Snapshot, (run_id, name, workflow.version, 1, 0, _PENDING, payload, None, now, 1, ()))
        tr = _new(Transition, (run_id, 1, _SPAWNED, 0, _PENDING, now, None))
        actor = RunActor(workflow, snap, History(0, tr))
        registry = self._registry
        registry.actors[run_id] = actor
        registry.by_status[_PENDING][run_id] = None
        registry.workflow_bucket(name)[run_id] = None
        self.transitions += 1
        if self.mark is not None:
            self.mark(snap, tr)
        if self._bus.count:
            self._publish(tr, name)
        actor.queued = True
        self._ready.append(actor)
        if not self._worker_active and self._open:
            self._start_worker()

    def restart(self, actor: RunActor, cursor: int, detail: str | None = None) -> None:
        """Run a dead-lettered run again from step ``cursor`` with a fresh budget (``retry_dead_letter``).

        ``detail`` goes in the ``dead_letter_retried`` transition (a forwarded
        retry names its inbox entry there, so a replay of it is a no-op).
        """
        actor.clear_failures()
        s = actor.snapshot
        now = self.wall()
        new = s._replace(
            version=s.version + 1, step=cursor, status=Status.running, error=None, attempt=1, updated_at=now
        )
        self.commit(
            actor,
            new,
            Transition(s.run_id, new.version, TransitionKind.dead_letter_retried, cursor, Status.running, now, detail),
        )
        self.schedule(actor)

    def schedule(self, actor: RunActor) -> None:
        """Put ``actor`` in the ready queue (unparking it) unless it is queued or running."""
        actor.parked = False
        if actor.queued or actor.running:
            return
        actor.queued = True
        self._ready.append(actor)
        if not self._worker_active and self._open:
            self._start_worker()

    def _handoff(self) -> None:
        """The watch: runs once the scheduler task has yielded.

        If it yielded inside a run's turn, a step suspended: that task keeps the
        run, and a new task takes the ready queue.
        """
        self._watch_armed = False
        if self._worker_actor is not None:
            self._worker_actor = None
            self._worker_active = False
            if self._ready:
                self._start_worker()

    def _arm_watch(self) -> None:
        if not self._watch_armed:
            self._watch_armed = True
            asyncio.get_running_loop().call_soon(self._handoff)

    def _start_worker(self) -> None:
        tg = self._tg
        if tg is None:  # pragma: no cover - _open implies started
            return
        self._worker_active = True
        self.tasks += 1
        tg.start_soon(self._serve, name="hotstate-scheduler")

    async def _serve(self) -> None:
        """Serve the ready queue; stays with a run as its host when a step suspends."""
        ready = self._ready
        budget = self._steps_per_turn
        task = asyncio.current_task()
        yield_at = self.transitions + _STEPS_PER_YIELD
        turns = 0
        self._arm_watch()
        try:
            while True:
                if not ready or self.stopping:
                    self._worker_active = False
                    return
                actor = ready.popleft()
                actor.queued = False
                self._worker_actor = actor
                actor.running = True
                actor.host_task = task
                raised: Exception | None = None
                try:
                    fast = await actor.turn(self, budget)
                    self.transitions += fast  # not `+= await`: that reads the counter before the await
                except Exception as exc:  # noqa: BLE001 - isolate a bug in one run from the others
                    self.internal_error(f"turn of run {actor.run_id!r}")
                    raised = exc
                finally:
                    actor.running = False
                    actor.host_task = None
                broken = raised is not None and self._turn_failed(actor, raised)
                if raised is None and self._turn_errors:
                    self._turn_errors.pop(actor.run_id, None)
                # Only the task in the scheduler role may write _worker_actor: after
                # a handoff it belongs to the new scheduler task, not to this host.
                handed_off = self._worker_actor is not actor
                if not handed_off:
                    self._worker_actor = None
                if actor.runnable() and not broken:
                    if actor.snapshot.status in TERMINAL_STATUSES:
                        actor.mailbox = None  # messages to a finished run have nowhere to go
                    else:
                        self.schedule(actor)
                if handed_off:
                    if self._worker_active or not ready:
                        return  # this task only hosted a step; a scheduler already runs
                    self._worker_active = True
                    self._arm_watch()
                elif self.transitions >= yield_at or (turns := turns + 1) >= _STEPS_PER_YIELD:
                    turns = 0
                    yield_at = self.transitions + _STEPS_PER_YIELD
                    await anyio.lowlevel.checkpoint()  # the armed watch finds no turn: no handoff
                    self._arm_watch()
        finally:
            self.tasks -= 1
            if self.tasks == 0 and self._tasks_idle is not None:
                self._tasks_idle.set()

    def _turn_failed(self, actor: RunActor, exc: Exception) -> bool:
        """A run's turn raised: go on, unless it raised at the same version ``_TURN_ERRORS`` times in a row.

        A bug around a run (a subscriber that raises) leaves the run moving:
        it is scheduled again as before. A run that raises without advancing
        would raise again at once: one such run spun a core with 160,000
        errors a second (#11, a cursor planted in a store). It is failed
        instead, and parked if failing it raises too.

        Returns:
            True when the caller must not schedule it again.
        """
        version = actor.snapshot.version
        held = self._turn_errors.get(actor.run_id)
        count = held[1] + 1 if held is not None and held[0] == version else 1
        self._turn_errors[actor.run_id] = (version, count)
        if count < _TURN_ERRORS:
            return False
        if count == _TURN_ERRORS:
            log.error("hotstate: run %r raised %d times at v%d; it is failed", actor.run_id, count, version)
            actor.post_fail("hotstate could not run its turn", exc)
            self.schedule(actor)
        else:
            log.error("hotstate: run %r raised again while being failed; it is parked", actor.run_id)
        return True

    def internal_error(self, where: str) -> None:
        """Count and log a crash in hotstate's own machinery (call from an ``except`` block)."""
        self.internal_errors += 1
        log.exception("hotstate internal error in %s", where)  # noqa: LOG004 - only called from except blocks
