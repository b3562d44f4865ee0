"""The runtime's machinery: the ``ActorHost`` the actors call, and the scheduler.

``Runtime`` (in ``_runtime.py``) is the public door; this base class holds the
hot path it hands to actors (commit, failure decisions, timers) and the ready
queue with its scheduler tasks. The scheduler arms a watch (``loop.call_soon``)
before it can yield; the watch runs only once the task has yielded, so if it
finds the scheduler inside a run's turn, that run's step has suspended: the task
stays with that run as its host and a fresh scheduler task takes the queue
(``_handoff``). This costs one callback per yield instead of anything per step.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Final

import anyio
import anyio.lowlevel

from hotstate._errors import PersistenceError
from hotstate.actors import (
    TERMINAL_STATUSES,
    DeadLetter,
    RunActor,
    Snapshot,
    Status,
    Transition,
)
from hotstate.actors._actor import MSG_WAKE
from hotstate.persistence import (
    StoredDeadLetter,
    encode_snapshot,
    error_to_json,
    errors_to_json,
)
from hotstate.runtime._timers import TimerHandle

if TYPE_CHECKING:
    from collections import deque
    from collections.abc import Callable

    from hotstate.actors import Step
    from hotstate.persistence import Codec, Persistence, Persister
    from hotstate.runtime._durability import Durability
    from hotstate.runtime._events import EventBus
    from hotstate.runtime._queries import RunIndex
    from hotstate.runtime._supervisor import Supervisor
    from hotstate.runtime._timers import TimerService

__all__ = ["RuntimeHost"]

log = logging.getLogger("hotstate.runtime")

# A scheduler task yields to the event loop after this many steps, so a burst
# of synchronous steps never starves other tasks (STYLE.md: every N steps).
_STEPS_PER_YIELD: Final = 256


class RuntimeHost:
    """The ``ActorHost`` implementation and the scheduler; ``Runtime`` sets the state up."""

    _actors: dict[str, RunActor]
    _index: RunIndex
    _transitions: int
    _internal_errors: int
    _bus: EventBus
    _supervisor: Supervisor
    _timers: TimerService
    _state: str
    _ready: deque[RunActor]
    _worker_active: bool
    _worker_actor: RunActor | None
    _watch_armed: bool
    _tasks: int
    _tasks_idle: anyio.Event | None
    _tg: anyio.abc.TaskGroup | None
    _steps_per_turn: int
    _persistence: Persistence | None
    _codec: Codec
    _durability: Durability | None
    stopping: bool
    hold: bool
    mark: Callable[[Snapshot, Transition], None] | None
    wall: Callable[[], float]

    @property
    def bus(self) -> EventBus:
        """The event bus (ActorHost)."""
        return self._bus

    # ------------------------------------------------ ActorHost (hot path)

    def _set_hold(self, hold: bool) -> None:
        self.hold = hold

    def must_wait(self, actor: RunActor, version: int) -> bool:
        """Park ``actor`` until it may advance past ``version`` (ActorHost)."""
        durability = self._durability
        return durability is not None and durability.must_wait(actor, version)

    def commit(self, actor: RunActor, snapshot: Snapshot, transition: Transition) -> None:
        """Make ``snapshot`` current for ``actor`` (called by the actor; not for users)."""
        old = actor.snapshot.status
        actor.snapshot = snapshot
        if snapshot.status is not old:
            by_status = self._index.by_status  # RunIndex.move, inlined
            del by_status[old][snapshot.run_id]
            by_status[snapshot.status][snapshot.run_id] = None
        actor.history.add(transition)
        self._transitions += 1
        if self.mark is not None:
            self.mark(snapshot, transition)
        if self._bus.count:
            self._publish(transition, snapshot.workflow)

    def _publish(self, transition: Transition, workflow: str) -> None:
        try:
            self._bus.publish(transition, workflow)
        except Exception:  # noqa: BLE001 - a subscriber bug must not stop the run
            self._internal_error("event bus publish")

    def retry_delay(self, actor: RunActor, step: Step, exc: Exception) -> float | None:
        """Ask the supervisor whether to retry (ActorHost)."""
        if self.stopping:
            return 0.0  # shutdown is not a failure verdict: retry when resumed
        return self._supervisor.retry_delay(actor, step, exc)

    def schedule_wake(self, actor: RunActor, delay: float) -> None:
        """Wake ``actor`` after ``delay`` seconds (ActorHost)."""
        def wake() -> None:
            if self._state == "open":
                actor.post(MSG_WAKE)
                self._schedule(actor)
        self._timers.call_later(delay, wake)

    def arm_timeout(self, actor: RunActor, timeout: float) -> TimerHandle:
        """Cancel the actor's suspended step after ``timeout`` seconds (ActorHost)."""
        def expire() -> None:
            # Timers fire only while the step's task is suspended in that step.
            task = actor.host_task
            if actor.running and actor.interrupt is None and task is not None:
                actor.interrupt = "timeout"
                task.cancel()
        return self._timers.call_later(timeout, expire)

    def disarm(self, handle: object) -> None:
        """Cancel a timeout timer (ActorHost)."""
        if isinstance(handle, TimerHandle):
            handle.cancel()

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
            if self._persistence is not None:
                self._store_dead_letter(letter)
        if actor.attempts:
            self._supervisor.forget(snap.run_id)  # only runs that failed once have a window
        if actor.waiters is not None:
            actor.waiters.set()
            actor.waiters = None

    # ------------------------------------------------------------- scheduler

    def _store_dead_letter(self, letter: DeadLetter, persisters: list[Persister] | None = None) -> None:
        assert self._persistence is not None  # noqa: S101
        snap = letter.snapshot
        try:
            stored = self._persistence.encoder.encode(snap)
        except PersistenceError:
            stored = encode_snapshot(snap._replace(payload=None, signals=()), self._codec)
        record = StoredDeadLetter(
            run_id=letter.run_id,
            workflow=letter.workflow,
            at=letter.at,
            error=error_to_json(letter.error),
            attempts=errors_to_json(letter.attempts),
            compensation_errors=errors_to_json(letter.compensation_errors),
            snapshot=stored,
        )
        for p in self._persistence.persisters if persisters is None else persisters:
            p.mark_dead_letter(record)

    def _schedule(self, actor: RunActor) -> None:
        actor.parked = False
        if actor.queued or actor.running:
            return
        actor.queued = True
        self._ready.append(actor)
        if not self._worker_active and self._state == "open":
            self._start_worker()

    def _start_worker(self) -> None:
        tg = self._tg
        assert tg is not None  # noqa: S101 - only called while open
        self._worker_active = True
        self._tasks += 1
        tg.start_soon(self._serve, name="hotstate-scheduler")

    async def _serve(self) -> None:
        """Serve the ready queue; stays with a run as its host when a step suspends."""
        ready = self._ready
        budget = self._steps_per_turn
        task = asyncio.current_task()
        yield_at = self._transitions + _STEPS_PER_YIELD
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
                try:
                    fast = await actor.turn(self, budget)
                    self._transitions += fast  # not `+= await`: that reads the counter before the await
                except Exception:  # noqa: BLE001 - isolate a bug in one run from the others
                    self._internal_error(f"turn of run {actor.run_id!r}")
                finally:
                    actor.running = False
                    actor.host_task = None
                # Only the task in the scheduler role may write _worker_actor: after
                # a handoff it belongs to the new scheduler task, not to this host.
                handed_off = self._worker_actor is not actor
                if not handed_off:
                    self._worker_actor = None
                if actor.runnable():
                    if actor.snapshot.status in TERMINAL_STATUSES:
                        actor.mailbox = None  # messages to a finished run have nowhere to go
                    else:
                        self._schedule(actor)
                if handed_off:
                    if self._worker_active or not ready:
                        return  # this task only hosted a step; a scheduler already runs
                    self._worker_active = True
                    self._arm_watch()
                elif self._transitions >= yield_at or (turns := turns + 1) >= _STEPS_PER_YIELD:
                    turns = 0
                    yield_at = self._transitions + _STEPS_PER_YIELD
                    await anyio.lowlevel.checkpoint()  # the armed watch finds no turn: no handoff
                    self._arm_watch()
        finally:
            self._tasks -= 1
            if self._tasks == 0 and self._tasks_idle is not None:
                self._tasks_idle.set()

    def _internal_error(self, where: str) -> None:
        self._internal_errors += 1
        log.exception("hotstate internal error in %s", where)  # noqa: LOG004 - only called from except blocks
