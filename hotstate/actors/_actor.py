"""``RunActor``: one run's mailbox and turn loop (the "Actor" box of the map in docs/architecture.md).

The turn loop runs consecutive steps inline, awaiting each step directly: a
step that completes without suspending costs no event-loop round trip
(docs/architecture.md, "A step's life"). When a step does suspend, the runtime notices
(a watch callback that only runs once the scheduler task has yielded) and
hands the ready queue to a fresh task, while this task keeps hosting the run.

Step timeouts and ``cancel`` interrupt a suspended step the way
``asyncio.timeout`` does: ``task.cancel()`` on the hosting task, and
``task.uncancel()`` when the ``CancelledError`` comes back, so a shutdown that
cancels at the same moment still propagates. No cancel scope is entered per
step: entering one costs more than a whole step.

The actor knows nothing of the runtime: everything it needs (commit a
transition, decide about a failure, schedule a wake-up) goes through the
``ActorHost`` protocol, which the runtime implements.
"""

from __future__ import annotations

import asyncio
from asyncio import CancelledError
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, Final, Protocol, final

from hotstate._errors import StepResultError, StepTimeoutError
from hotstate.actors._context import Finish, StepContext
from hotstate.actors._history import STEP_RUNNING, History
from hotstate.actors._snapshot import (
    TERMINAL_STATUSES,
    ErrorInfo,
    Signals,
    Snapshot,
    Status,
    Transition,
    TransitionKind,
    new_tuple as _new,
    storable_text,
)

if TYPE_CHECKING:
    import anyio

    from hotstate.actors._workflow import Step, Workflow

__all__ = ["ActorHost", "Publisher", "RunActor", "TransitionSink"]

# Mailbox message kinds.
MSG_SIGNAL: Final = 0
MSG_CANCEL: Final = 1
MSG_WAKE: Final = 2
MSG_FAIL: Final = 3  # fail the run for good (e.g. its payload cannot be persisted)

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


class Publisher(Protocol):
    """The event bus as the actor sees it."""

    count: int
    """Live subscriptions; publishing is skipped when 0."""

    def publish(self, transition: Transition, workflow: str) -> None:
        """Deliver a transition to subscribers, never waiting."""
        ...


class ActorHost(Protocol):
    """What an actor needs from the runtime that runs it."""

    stopping: bool
    """True once shutdown began: finish the step in flight, start no other."""

    mark: Callable[[Snapshot, Transition], None] | None
    """The persisters' ``mark`` (None when memory-only): called once per transition."""

    hold: bool
    """True when runs may have to wait before a step (write-through, backpressure)."""

    def must_wait(self, actor: RunActor, version: int) -> bool:
        """Return True (and reschedule the actor later) if it must not advance past ``version`` yet."""
        ...

    @property
    def bus(self) -> Publisher:
        """Where transitions go when someone subscribes."""
        ...

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
        """Interrupt the actor's step (reason ``"timeout"``) after ``timeout``; returns a handle."""
        ...

    def disarm(self, handle: object) -> None:
        """Cancel a timer armed with ``arm_timeout``."""
        ...

    def finished(self, actor: RunActor) -> None:
        """The run reached a terminal status."""
        ...


# Per result type: does it look awaitable (a step that forgot an `await`)?
# hasattr() on a type costs ~300 ns when the attribute is missing (it raises
# internally); a dict hit costs ~30 ns.
_AWAITABLE: dict[type, bool] = {}


def _is_awaitable(value: object) -> bool:
    cls = type(value)
    known = _AWAITABLE.get(cls)
    if known is None:
        known = _AWAITABLE[cls] = hasattr(cls, "__await__")
    return known


@final
class RunActor:
    """One workflow run: its current snapshot, history, mailbox and turn loop.

    Users never build these; the runtime does. Read a run through
    ``Runtime.get`` and the run handle instead.
    """

    __slots__ = (
        "attempts",
        "comp_errors",
        "evicted",
        "history",
        "host_task",
        "interrupt",
        "last_exc",
        "mailbox",
        "parked",
        "queued",
        "running",
        "snapshot",
        "waiters",
        "workflow",
    )

    def __init__(self, workflow: Workflow, snapshot: Snapshot, history: History) -> None:
        self.workflow = workflow
        self.snapshot = snapshot
        self.history = history
        self.mailbox: deque[tuple[int, Any, Any]] | None = None  # created by the first post()
        self.queued = False  # in the runtime's ready queue
        self.parked = False  # waiting for durability or backpressure; the runtime reschedules it
        self.running = False  # a task is executing its turn
        self.host_task: asyncio.Task[Any] | None = None  # the task running its turn
        self.interrupt: str | None = None  # "cancel" or "timeout" once host_task.cancel() was called
        self.last_exc: BaseException | None = None
        self.attempts: tuple[ErrorInfo, ...] = ()
        self.comp_errors: tuple[ErrorInfo, ...] = ()
        self.waiters: anyio.Event | None = None
        self.evicted = False  # its shard left this process: it commits nothing more

    @property
    def run_id(self) -> str:
        """The run's id."""
        return self.snapshot.run_id

    def __repr__(self) -> str:
        s = self.snapshot
        return f"<RunActor {s.run_id!r} {s.workflow} v{s.version} step={s.step} {s.status}>"

    def post(self, kind: int, name: Any = None, data: Any = None) -> None:
        """Append a message to the mailbox (the runtime then schedules the actor)."""
        if self.mailbox is None:
            self.mailbox = deque()
        self.mailbox.append((kind, name, data))

    def post_signal(self, name: str, data: Any, dedupe_key: str | None = None) -> None:
        """Deliver signal ``name`` after the step in flight (the run's own step sent it)."""
        self.post(MSG_SIGNAL, name, (data, dedupe_key))

    def post_cancel(self) -> None:
        """Cancel the run at its next turn."""
        self.post(MSG_CANCEL)

    def post_wake(self) -> None:
        """End a retry backoff: the failed step runs again at the next turn."""
        self.post(MSG_WAKE)

    def post_fail(self, reason: str, exc: Exception) -> None:
        """Fail the run for good at its next turn (e.g. its payload cannot be persisted)."""
        self.post(MSG_FAIL, reason, exc)

    def _evicted(self) -> bool:
        """``evicted``, read through a call: an await may have set it (type checkers narrow attributes)."""
        return self.evicted

    def clear_failures(self) -> None:
        """Forget recorded step and compensation failures (a dead letter is retried)."""
        self.attempts = ()
        self.comp_errors = ()
        self.last_exc = None

    def runnable(self) -> bool:
        """True when a turn would make progress now."""
        if self.parked:
            return False
        status = self.snapshot.status
        return bool(self.mailbox) or status is _RUNNING or status is _PENDING or status is _COMPENSATING

    # ------------------------------------------------------------------ turn

    async def turn(self, host: ActorHost, budget: int) -> int:
        """Advance until idle, finished, or ``budget`` steps have run.

        Args:
            host: the runtime.
            budget: the most steps to run in this turn (fairness).

        Returns:
            How many steps were committed on the fast path (the host counts
            its other commits itself).
        """
        # Everything constant for the run is hoisted into locals: this loop is
        # the per-step cost that W1 measures against a bare asyncio loop.
        wf = self.workflow
        steps = wf.steps
        nsteps = len(steps)
        run_id = self.snapshot.run_id
        wf_name = wf.name
        wf_version = wf.version
        mark = host.mark
        bus = host.bus
        wall = host.wall
        append = self.history.cols.append
        awaitable = _AWAITABLE
        code_base = STEP_RUNNING - 256
        fast = 0
        while fast < budget and not host.stopping:
            if self.mailbox and self._drain_mailbox(host):
                return fast
            s = self.snapshot
            if host.hold and host.must_wait(self, s.version):
                self.parked = True  # until durable (write-through) or the tiers drain (backpressure)
                return fast
            status = s.status
            if status is not _RUNNING:
                if status is _COMPENSATING:
                    await self._compensate(host)
                    return fast
                if status is not _PENDING:
                    return fast  # waiting, retrying (no wake yet) or terminal
            k = s.step
            if k >= nsteps:  # only after a resume at the very end
                self._finish(host, s, s.payload, k)
                return fast
            step = steps[k]
            if step.plain:
                # An `async def` step with no signal and no timeout: the common case.
                try:
                    result = await step.fn(
                        s.payload,
                        _new(
                            StepContext, (run_id, wf_name, wf_version, k, step.name, s.attempt, s.version, None, False)
                        ),
                    )
                except CancelledError:
                    if self._take_interrupt() is None:
                        raise  # shutdown or an outer cancel scope: not ours to handle
                    if self.evicted:
                        return fast  # its shard left this process: nothing more is committed
                    continue  # "cancel": the cancel message waits in the mailbox
                except Exception as exc:  # noqa: BLE001 - a step/compensation failure is the user's exception: recorded, supervised
                    if self._evicted():
                        return fast  # evicted meanwhile (the step answered our cancel with its own error)
                    self._step_failed(host, step, exc)
                    continue
                if awaitable.get(type(result), True) and self._bad_result(host, run_id, step, result):
                    continue
                s = self.snapshot  # a suspended step lets others commit (a signal) meanwhile
                if self.interrupt is not None:
                    self._take_interrupt()  # the step swallowed our cancel and returned
                    if self.evicted:
                        return fast
                signals = s.signals
            else:
                done = await self._general_step(host, s, step, k)
                if done is _FAILED:
                    if self.evicted:
                        return fast
                    continue
                s, result, signals = done
            if type(result) is Finish:
                self._finish(host, s, result.payload, nsteps, signals)
                return fast
            k += 1
            if k >= nsteps:
                self._finish(host, s, result, nsteps, signals)
                return fast
            v = s.version + 1
            now = wall()
            new = _new(Snapshot, (run_id, wf_name, wf_version, v, k, _RUNNING, result, None, now, 1, signals))
            if status is _RUNNING:
                # Fast path (status unchanged): what host.commit does, inlined;
                # the Transition object is built only when someone takes it.
                self.snapshot = new
                append(now)
                append(k * 256 + code_base)
                if mark is not None or bus.count:
                    tr = _new(Transition, (run_id, v, _K_STEP, k - 1, _RUNNING, now, None))
                    if mark is not None:
                        mark(new, tr)
                    if bus.count:
                        bus.publish(tr, wf_name)
                fast += 1
            else:
                host.commit(self, new, _new(Transition, (run_id, v, _K_STEP, k - 1, _RUNNING, now, None)))
        return fast

    async def _general_step(self, host: ActorHost, s: Snapshot, step: Step, k: int) -> Any:
        """Run a step that waits for a signal, has a timeout, or is sync.

        Returns:
            ``(snapshot, result, signals)``, or ``_FAILED`` when the step failed,
            parked, or was interrupted (the turn loop then looks again).
        """
        wait_for = step.wait_for
        signal = None
        if wait_for is not None:
            signal = _find_signal(s.signals, wait_for)
            if signal is _MISSING:
                self._park(host, s, wait_for)
                return _FAILED
        ctx = _new(
            StepContext, (s.run_id, s.workflow, s.workflow_version, k, step.name, s.attempt, s.version, signal, False)
        )
        timer = None if step.timeout is None else host.arm_timeout(self, step.timeout)
        try:
            if step.is_async:
                result = await step.fn(s.payload, ctx)
            else:
                result = step.fn(s.payload, ctx)
        except CancelledError:
            reason = self._take_interrupt()
            if reason is None:
                raise  # shutdown or an outer cancel scope: not ours to handle
            if reason == "timeout" and step.timeout is not None:
                self._step_failed(host, step, StepTimeoutError(step.name, step.timeout))
            return _FAILED  # "cancel": the cancel message waits in the mailbox
        except Exception as exc:  # noqa: BLE001 - a step/compensation failure is the user's exception: recorded, supervised
            if not self._evicted():
                self._step_failed(host, step, exc)
            return _FAILED
        finally:
            if timer is not None:
                host.disarm(timer)
        if self.interrupt is not None:
            self._take_interrupt()  # the step swallowed our cancel and returned
            if self.evicted:
                return _FAILED
        if _is_awaitable(result) and self._bad_result(host, s.run_id, step, result):
            return _FAILED
        s = self.snapshot
        return s, result, (s.signals if wait_for is None else _drop_first(s.signals, wait_for))

    def _bad_result(self, host: ActorHost, run_id: str, step: Step, result: Any) -> bool:
        """Fail the step if it returned an awaitable (it forgot an ``await``)."""
        if not _is_awaitable(result):
            return False
        if isinstance(result, Coroutine):
            result.close()  # never awaited on purpose; keep no warning behind
        try:
            raise StepResultError(run_id, step.name, result)
        except StepResultError as exc:
            self._step_failed(host, step, exc)
        return True

    # --------------------------------------------------------------- helpers

    def _commit(
        self,
        host: ActorHost,
        kind: TransitionKind,
        detail: str | None = None,
        **changes: Any,
    ) -> Snapshot:
        """Commit a (non hot-path) transition that changes ``changes`` fields.

        ``detail`` (a signal or step name, an error summary) is made storable
        first: one lone surrogate in it failed every flush of a tier (#11).
        """
        s = self.snapshot
        now = host.wall()
        if detail is not None:
            detail = storable_text(detail)
        new = s._replace(version=s.version + 1, updated_at=now, **changes)
        host.commit(self, new, Transition(s.run_id, new.version, kind, new.step, new.status, now, detail))
        return new

    def _finish(
        self,
        host: ActorHost,
        s: Snapshot,
        payload: Any,
        cursor: int,
        signals: Sequence[tuple[str, Any]] | None = None,
    ) -> None:
        now = host.wall()
        v = s.version + 1
        run_id = s.run_id
        new = _new(
            Snapshot,
            (
                run_id,
                s.workflow,
                s.workflow_version,
                v,
                cursor,
                _DONE,
                payload,
                None,
                now,
                1,
                s.signals if signals is None else signals,
            ),
        )
        host.commit(self, new, _new(Transition, (run_id, v, _K_STEP, min(s.step, cursor), _DONE, now, None)))
        host.finished(self)

    def _park(self, host: ActorHost, s: Snapshot, signal: str) -> None:
        if s.status is not _WAITING:
            self._commit(host, TransitionKind.waiting, signal, status=_WAITING)

    def _drain_mailbox(self, host: ActorHost) -> bool:
        """Apply queued messages; return True when the run has finished."""
        mailbox = self.mailbox
        while mailbox:
            kind, name, data = mailbox.popleft()
            s = self.snapshot
            if s.status in TERMINAL_STATUSES:
                continue
            if kind == MSG_SIGNAL:
                self.accept_signal(host, name, *data)
            elif kind == MSG_CANCEL:
                if s.status is _COMPENSATING:
                    continue  # a saga being undone finishes undoing; see Runtime.cancel
                self._commit(host, TransitionKind.cancelled, None, status=Status.cancelled)
                host.finished(self)
                return True
            elif kind == MSG_FAIL:
                if s.status is not _COMPENSATING:
                    self._give_up(host, name, data)
            elif kind == MSG_WAKE and s.status is _RETRYING:
                self._commit(host, TransitionKind.retry, f"attempt {s.attempt}", status=_RUNNING)
        return False

    def _take_interrupt(self) -> str | None:
        """Consume our own ``host_task.cancel()``; None if the cancellation is not (only) ours."""
        reason = self.interrupt
        if reason is None:
            return None
        self.interrupt = None
        task = self.host_task
        if task is not None and task.uncancel() > 0:
            return None  # cancelled from outside as well: let it propagate
        return reason

    def accept_signal(self, host: ActorHost, name: str, data: Any, dedupe_key: str | None = None) -> None:
        """Record a received signal in a new snapshot (it waits there until a step consumes it).

        The runtime calls this straight from ``send`` unless the run's own step is
        the sender (then the signal goes through the mailbox), so an accepted
        signal is in the snapshot, and in the persisters, at once. Its
        ``dedupe_key``, if any, is remembered in the same snapshot.
        """
        s = self.snapshot
        if s.status in TERMINAL_STATUSES:
            return
        status = s.status
        steps = self.workflow.steps
        if status is _WAITING and s.step < len(steps) and steps[s.step].wait_for == name:
            status = _RUNNING
        signals = Signals.of(s.signals).appended(name, data, dedupe_key)
        self._commit(host, TransitionKind.signal, name, signals=signals, status=status)

    def seen(self, dedupe_key: str) -> bool:
        """Whether a signal sent with ``dedupe_key`` was taken (in the snapshot, or in the mailbox)."""
        signals = self.snapshot.signals
        if type(signals) is Signals and signals.has_key(dedupe_key):
            return True
        mailbox = self.mailbox
        if not mailbox:
            return False
        return any(kind == MSG_SIGNAL and data[1] == dedupe_key for kind, _, data in mailbox)

    def signal_room(self, name: str) -> int:
        """How many more ``name`` signals the run would ever consume (<= 0: none).

        The steps at or after the cursor that wait for ``name``, minus the
        ``name`` signals already queued (in the snapshot, or in the mailbox
        when the run's own step sent them). Steps run in order, so a signal
        no step left waits for would stay queued forever. A run that is
        compensating runs no more steps.
        """
        s = self.snapshot
        if s.status is _COMPENSATING:
            return 0
        wanted = self.workflow.waits_for(name, from_step=s.step)
        if not wanted:
            return 0
        queued = _count_of(s.signals, name)
        if self.mailbox:
            queued += sum(1 for kind, sig, _ in self.mailbox if kind == MSG_SIGNAL and sig == name)
        return wanted - queued

    def pending_signals(self) -> int:
        """Signals received and not yet consumed: in the snapshot, and in the mailbox (the run's own step sent them)."""
        pending = len(self.snapshot.signals)
        if self.mailbox:
            pending += sum(1 for kind, _, _ in self.mailbox if kind == MSG_SIGNAL)
        return pending

    def signals_wanted(self) -> tuple[str, ...]:
        """The signals the run still waits for (``signal_room`` > 0), in the order its steps wait for them."""
        if self.snapshot.status is _COMPENSATING:
            return ()
        return tuple(n for n in self.workflow.signals_from(self.snapshot.step) if self.signal_room(n) > 0)

    def _give_up(self, host: ActorHost, reason: str, exc: Exception) -> None:
        """Fail the run for good from outside a step (compensations still run)."""
        s = self.snapshot
        steps = self.workflow.steps
        name = steps[s.step].name if s.step < len(steps) else "<end>"
        info = ErrorInfo.from_exception(exc, step=s.step, step_name=name, attempt=s.attempt, at=host.wall())
        self.last_exc = exc
        self.attempts = (*self.attempts, info)
        self._commit(
            host, TransitionKind.step_failed, f"{info.summary}; {reason}; giving up", status=_COMPENSATING, error=info
        )

    def _step_failed(self, host: ActorHost, step: Step, exc: Exception) -> None:
        s = self.snapshot
        info = ErrorInfo.from_exception(exc, step=s.step, step_name=step.name, attempt=s.attempt, at=host.wall())
        self.last_exc = exc
        self.attempts = (*self.attempts, info)
        delay = host.retry_delay(self, step, exc)
        if delay is not None:
            self._commit(
                host,
                TransitionKind.step_failed,
                f"{info.summary} (attempt {s.attempt}); retry in {delay:.3g} s",
                status=_RETRYING,
                error=info,
                attempt=s.attempt + 1,
            )
            host.schedule_wake(self, delay)
        else:
            self._commit(
                host,
                TransitionKind.step_failed,
                f"{info.summary} (attempt {s.attempt}); giving up",
                status=_COMPENSATING,
                error=info,
            )

    async def _call(self, fn: Any, is_async: bool, payload: Any, ctx: StepContext) -> Any:
        """Call a compensation the way a step is called."""
        if is_async:
            return await fn(payload, ctx)
        return fn(payload, ctx)

    async def _compensate(self, host: ActorHost) -> None:
        """Run compensations of completed steps in reverse order, then fail the run.

        During compensation the step cursor counts down: a snapshot at cursor ``j``
        means compensations of steps ``>= j`` have run, so recovery continues
        where a crash left off.
        """
        steps = self.workflow.steps
        while True:
            if self._evicted():
                return  # its shard left this process: the next owner compensates from the stored cursor
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
                result = await self._call(step.compensate, step.compensate_is_async, s.payload, ctx)
                if _is_awaitable(result):
                    if isinstance(result, Coroutine):
                        result.close()
                    raise StepResultError(s.run_id, f"{step.name} (compensation)", result)
            except Exception as exc:  # noqa: BLE001 - a step/compensation failure is the user's exception: recorded, supervised
                if self._evicted():
                    return
                info = ErrorInfo.from_exception(exc, step=j, step_name=step.name, attempt=1, at=host.wall())
                self.comp_errors = (*self.comp_errors, info)
                self._commit(host, TransitionKind.compensation_failed, info.summary, step=j)
                continue
            if self._evicted():
                return  # evicted while the compensation ran: the next owner records it (at-least-once)
            changes: dict[str, Any] = {"step": j}
            if result is not None:
                changes["payload"] = result
            self._commit(host, TransitionKind.compensated, step.name, **changes)
        s = self.snapshot
        error = s.error
        self._commit(
            host,
            TransitionKind.failed,
            error.summary if error else None,
            status=Status.failed,
            step=error.step if error else s.step,
        )
        host.finished(self)


_MISSING: Final = object()
_FAILED: Final = object()


def _find_signal(signals: Sequence[tuple[str, Any]], name: str) -> Any:
    """Return the data of the oldest signal called ``name``, or ``_MISSING``."""
    if type(signals) is Signals and not signals.count_of(name):
        return _MISSING
    for sig, data in signals:
        if sig == name:
            return data
    return _MISSING


def _drop_first(signals: Sequence[tuple[str, Any]], name: str) -> Signals:
    """Remove the oldest signal called ``name`` (the one the step consumed)."""
    return Signals.of(signals).without_first(name)


def _count_of(signals: Sequence[tuple[str, Any]], name: str) -> int:
    """How many of ``signals`` are called ``name``: O(1) for ``Signals``, a scan of a (decoded) tuple."""
    if type(signals) is Signals:
        return signals.count_of(name)
    return sum(1 for sig, _ in signals if sig == name)
