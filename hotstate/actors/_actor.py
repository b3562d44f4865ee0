"""``RunActor``: one run's mailbox and turn loop (the "Actor" box of DESIGN.md).

The turn loop runs consecutive steps inline. An ``async def`` step is driven
with ``coro.send(None)``: when it completes without suspending, no event-loop
round trip is paid (DESIGN.md, Performance shape). Only when a step really
suspends does the actor ask its host to hand the scheduler role to another task
and then await the rest of the step in the current task, inside a cancel scope
that serves step timeouts and ``cancel``.

The actor knows nothing of the runtime: everything it needs (commit a
transition, decide about a failure, schedule a wake-up) goes through the
``ActorHost`` protocol, which the runtime implements.
"""

from __future__ import annotations

import types
from collections import deque
from collections.abc import Coroutine, Generator
from typing import TYPE_CHECKING, Any, Final, Protocol, final

import anyio

from hotstate._errors import StepResultError, StepTimeoutError
from hotstate.actors._context import StepContext
from hotstate.actors._snapshot import (
    TERMINAL_STATUSES,
    ErrorInfo,
    Snapshot,
    Status,
    Transition,
    TransitionKind,
)
from hotstate.actors._workflow import Finish

if TYPE_CHECKING:
    from hotstate.actors._workflow import Step, Workflow

__all__ = ["ActorHost", "RunActor", "TransitionSink"]

# Mailbox message kinds.
MSG_SIGNAL: Final = 0
MSG_CANCEL: Final = 1
MSG_WAKE: Final = 2

_new = tuple.__new__  # builds NamedTuples without the keyword-parsing __new__ frame
_RUNNING = Status.running
_PENDING = Status.pending
_WAITING = Status.waiting
_RETRYING = Status.retrying
_COMPENSATING = Status.compensating
_DONE = Status.done
_K_STEP = TransitionKind.step


class TransitionSink(Protocol):
    """The persistence seam: told about every transition, O(1), no I/O."""

    def mark(self, snapshot: Snapshot, transition: Transition) -> None:
        """Record that ``snapshot`` is now the newest state of its run."""
        ...


class ActorHost(Protocol):
    """What an actor needs from the runtime that runs it."""

    stopping: bool
    """True once shutdown began: finish the step in flight, start no other."""

    def commit(self, actor: RunActor, snapshot: Snapshot, transition: Transition) -> None:
        """Make ``snapshot`` current: history, indexes, persisters, subscribers."""
        ...

    def wall(self) -> float:
        """Wall-clock time for stamps."""
        ...

    def retry_delay(self, actor: RunActor, step: Step, exc: Exception) -> float | None:
        """Seconds until the failed step is retried, or None to give up."""
        ...

    def schedule_wake(self, actor: RunActor, delay: float) -> None:
        """Post a wake message to ``actor`` after ``delay`` seconds."""
        ...

    def arm_timeout(self, actor: RunActor, timeout: float) -> object:
        """Cancel ``actor.scope`` (marking ``actor.timed_out``) after ``timeout``; returns a handle."""
        ...

    def disarm(self, handle: object) -> None:
        """Cancel a timer armed with ``arm_timeout``."""
        ...

    def handoff(self, actor: RunActor) -> None:
        """The current task is about to block on ``actor``'s step: let another task serve the rest."""
        ...

    def finished(self, actor: RunActor) -> None:
        """The run reached a terminal status."""
        ...


class _StepInterruptedError(Exception):
    """Internal: the suspended step was cancelled by ``cancel()``; not a failure."""


@types.coroutine
def _resume(coro: Coroutine[Any, Any, Any], yielded: Any) -> Generator[Any, Any, Any]:
    """Continue awaiting ``coro``, which already yielded ``yielded`` to us."""
    send, throw = coro.send, coro.throw
    while True:
        try:
            value = yield yielded
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as exc:  # noqa: BLE001 - forwarded into the step verbatim, like `await`
            try:
                yielded = throw(exc)
            except StopIteration as stop:
                return stop.value
        else:
            try:
                yielded = send(value)
            except StopIteration as stop:
                return stop.value


def _is_awaitable(value: object) -> bool:
    return hasattr(type(value), "__await__")


@final
class RunActor:
    """One workflow run: its current snapshot, history, mailbox and turn loop.

    Users never build these; the runtime does. Read a run through
    ``Runtime.get`` and the run handle instead.
    """

    __slots__ = (
        "attempts",
        "comp_errors",
        "history",
        "last_exc",
        "mailbox",
        "queued",
        "running",
        "scope",
        "snapshot",
        "timed_out",
        "waiters",
        "workflow",
    )

    def __init__(self, workflow: Workflow, snapshot: Snapshot) -> None:
        self.workflow = workflow
        self.snapshot = snapshot
        self.history: list[Transition] = []
        self.mailbox: deque[tuple[int, Any, Any]] = deque()
        self.queued = False  # in the runtime's ready queue
        self.running = False  # a task is executing its turn
        self.scope: anyio.CancelScope | None = None  # set while a step is suspended
        self.timed_out = False
        self.last_exc: BaseException | None = None
        self.attempts: list[ErrorInfo] = []
        self.comp_errors: list[ErrorInfo] = []
        self.waiters: anyio.Event | None = None

    @property
    def run_id(self) -> str:
        """The run's id."""
        return self.snapshot.run_id

    def __repr__(self) -> str:
        s = self.snapshot
        return f"<RunActor {s.run_id!r} {s.workflow} v{s.version} step={s.step} {s.status}>"

    def runnable(self) -> bool:
        """True when a turn would make progress now."""
        status = self.snapshot.status
        return bool(self.mailbox) or status is _RUNNING or status is _PENDING or status is _COMPENSATING

    # ------------------------------------------------------------------ turn

    async def turn(self, host: ActorHost, budget: int) -> None:
        """Advance until idle, finished, or ``budget`` steps have run.

        Args:
            host: the runtime.
            budget: the most steps to run in this turn (fairness).
        """
        steps = self.workflow.steps
        nsteps = len(steps)
        commit = host.commit
        wall = host.wall
        while budget > 0 and not host.stopping:
            if self.mailbox and self._drain_mailbox(host):
                return
            s = self.snapshot
            status = s.status
            if status is _COMPENSATING:
                await self._compensate(host)
                return
            if status is not _RUNNING and status is not _PENDING:
                return  # waiting, retrying (no wake yet) or terminal
            k = s.step
            if k >= nsteps:  # only after a resume at the very end
                self._finish(host, s, s.payload, k)
                return
            step = steps[k]
            signal = None
            if step.wait_for is not None:
                signal = _find_signal(s.signals, step.wait_for)
                if signal is _MISSING:
                    self._park(host, s, step.wait_for)
                    return
            ctx = _new(StepContext, (s.run_id, s.workflow, s.workflow_version, k, step.name, s.attempt, s.version, signal, False))
            try:
                if step.is_async:
                    coro = step.fn(s.payload, ctx)
                    try:
                        yielded = coro.send(None)
                    except StopIteration as stop:
                        result = stop.value
                    else:
                        result = await self._await_suspended(host, coro, yielded, step.timeout, step.name)
                else:
                    result = step.fn(s.payload, ctx)
                if _is_awaitable(result):
                    if isinstance(result, Coroutine):
                        result.close()  # never awaited on purpose; keep no warning behind
                    raise StepResultError(s.run_id, step.name, result)
            except _StepInterruptedError:
                continue  # the cancel message waits in the mailbox
            except Exception as exc:
                self._step_failed(host, step, exc)
                continue
            s = self.snapshot  # a signal may have been committed while the step was suspended
            signals = s.signals if step.wait_for is None else _drop_first(s.signals, step.wait_for)
            if type(result) is Finish:
                self._finish(host, s, result.payload, nsteps, signals)
                return
            if k + 1 >= nsteps:
                self._finish(host, s, result, nsteps, signals)
                return
            v = s.version + 1
            now = wall()
            commit(
                self,
                _new(Snapshot, (s.run_id, s.workflow, s.workflow_version, v, k + 1, _RUNNING, result, None, now, 1, signals)),
                _new(Transition, (s.run_id, v, _K_STEP, k, _RUNNING, now, None)),
            )
            budget -= 1

    # --------------------------------------------------------------- helpers

    def _commit(
        self,
        host: ActorHost,
        kind: TransitionKind,
        detail: str | None = None,
        **changes: Any,
    ) -> Snapshot:
        """Commit a (non hot-path) transition that changes ``changes`` fields."""
        s = self.snapshot
        now = host.wall()
        new = s._replace(version=s.version + 1, updated_at=now, **changes)
        host.commit(self, new, Transition(s.run_id, new.version, kind, new.step, new.status, now, detail))
        return new

    def _finish(
        self,
        host: ActorHost,
        s: Snapshot,
        payload: Any,
        cursor: int,
        signals: tuple[tuple[str, Any], ...] | None = None,
    ) -> None:
        now = host.wall()
        v = s.version + 1
        new = Snapshot(s.run_id, s.workflow, s.workflow_version, v, cursor, _DONE, payload, None, now, 1,
                       s.signals if signals is None else signals)
        host.commit(self, new, Transition(s.run_id, v, _K_STEP, min(s.step, cursor), _DONE, now, None))
        host.finished(self)

    def _park(self, host: ActorHost, s: Snapshot, signal: str) -> None:
        if s.status is not _WAITING:
            self._commit(host, TransitionKind.waiting, signal, status=_WAITING)

    def _drain_mailbox(self, host: ActorHost) -> bool:
        """Apply queued messages; return True when the run has finished."""
        while self.mailbox:
            kind, name, data = self.mailbox.popleft()
            s = self.snapshot
            if s.status in TERMINAL_STATUSES:
                continue
            if kind == MSG_SIGNAL:
                status = s.status
                if status is _WAITING and self.workflow.steps[s.step].wait_for == name:
                    status = _RUNNING
                self._commit(host, TransitionKind.signal, name, signals=(*s.signals, (name, data)), status=status)
            elif kind == MSG_CANCEL:
                if s.status is _COMPENSATING:
                    continue  # a saga being undone finishes undoing; see Runtime.cancel
                self._commit(host, TransitionKind.cancelled, None, status=Status.cancelled)
                host.finished(self)
                return True
            elif kind == MSG_WAKE and s.status is _RETRYING:
                self._commit(host, TransitionKind.retry, f"attempt {s.attempt}", status=_RUNNING)
        return False

    async def _await_suspended(
        self,
        host: ActorHost,
        coro: Coroutine[Any, Any, Any],
        yielded: Any,
        timeout: float | None,
        name: str,
    ) -> Any:
        """Slow path: the step suspended; host it in this task until it returns."""
        host.handoff(self)
        self.timed_out = False
        handle = None
        with anyio.CancelScope() as scope:
            self.scope = scope
            if timeout is not None:
                handle = host.arm_timeout(self, timeout)
            try:
                return await _resume(coro, yielded)
            finally:
                self.scope = None
                if handle is not None:
                    host.disarm(handle)
        if self.timed_out and timeout is not None:
            raise StepTimeoutError(name, timeout)
        raise _StepInterruptedError

    def _step_failed(self, host: ActorHost, step: Step, exc: Exception) -> None:
        s = self.snapshot
        info = ErrorInfo.from_exception(exc, step=s.step, step_name=step.name, attempt=s.attempt, at=host.wall())
        self.last_exc = exc
        self.attempts.append(info)
        delay = host.retry_delay(self, step, exc)
        if delay is not None:
            self._commit(host, TransitionKind.step_failed,
                         f"{info.summary} (attempt {s.attempt}); retry in {delay:.3g} s",
                         status=_RETRYING, error=info, attempt=s.attempt + 1)
            host.schedule_wake(self, delay)
        else:
            self._commit(host, TransitionKind.step_failed, f"{info.summary} (attempt {s.attempt}); giving up",
                         status=_COMPENSATING, error=info)

    async def _call(self, host: ActorHost, fn: Any, is_async: bool, payload: Any, ctx: StepContext) -> Any:
        """Call a compensation the same way a step is called."""
        if not is_async:
            return fn(payload, ctx)
        coro = fn(payload, ctx)
        try:
            yielded = coro.send(None)
        except StopIteration as stop:
            return stop.value
        return await self._await_suspended(host, coro, yielded, None, ctx.step_name)

    async def _compensate(self, host: ActorHost) -> None:
        """Run compensations of completed steps in reverse order, then fail the run.

        During compensation the step cursor counts down: a snapshot at cursor ``j``
        means compensations of steps ``>= j`` have run, so recovery continues
        where a crash left off.
        """
        steps = self.workflow.steps
        while True:
            s = self.snapshot
            j = s.step - 1
            if j < 0:
                break
            step = steps[j]
            if step.compensate is None:
                self._commit(host, TransitionKind.compensated, f"{step.name}: nothing to undo", step=j)
                continue
            ctx = StepContext(s.run_id, s.workflow, s.workflow_version, j, step.name, 1, s.version, None, True)
            try:
                result = await self._call(host, step.compensate, step.compensate_is_async, s.payload, ctx)
                if _is_awaitable(result):
                    if isinstance(result, Coroutine):
                        result.close()
                    raise StepResultError(s.run_id, f"{step.name} (compensation)", result)
            except _StepInterruptedError:
                continue
            except Exception as exc:
                info = ErrorInfo.from_exception(exc, step=j, step_name=step.name, attempt=1, at=host.wall())
                self.comp_errors.append(info)
                self._commit(host, TransitionKind.compensation_failed, info.summary, step=j)
                continue
            changes: dict[str, Any] = {"step": j}
            if result is not None:
                changes["payload"] = result
            self._commit(host, TransitionKind.compensated, step.name, **changes)
        s = self.snapshot
        error = s.error
        self._commit(host, TransitionKind.failed, error.summary if error else None,
                     status=Status.failed, step=error.step if error else s.step)
        host.finished(self)


_MISSING: Final = object()


def _find_signal(signals: tuple[tuple[str, Any], ...], name: str) -> Any:
    """Return the data of the oldest signal called ``name``, or ``_MISSING``."""
    for sig, data in signals:
        if sig == name:
            return data
    return _MISSING


def _drop_first(signals: tuple[tuple[str, Any], ...], name: str | None) -> tuple[tuple[str, Any], ...]:
    """Remove the oldest signal called ``name`` (the one the step consumed)."""
    for i, (sig, _) in enumerate(signals):
        if sig == name:
            return signals[:i] + signals[i + 1 :]
    return signals
