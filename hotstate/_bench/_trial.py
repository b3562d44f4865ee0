"""The SIGKILL trials' workload: a mixed workflow, its signal driver, and the child's run loop.

``inflight`` runs at a time of a workflow that reserves, passes a step that
fails transiently on its first attempt (every ``flaky_every``-th run), waits for
a ``paid`` signal (sent by ``SignalDriver``), does ``work_steps`` steps and
ships; every ``fail_every``-th run fails for good at ``ship``, is compensated
and dead-lettered. The parent's recovering runtime (``_crash.py``) builds the
same workflow to drive the recovered runs to their end.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio

from hotstate import RetryPolicy, RunFailedError, Status, Step, StepContext, Workflow
from hotstate._bench._trace import TraceLayout

if TYPE_CHECKING:
    from collections.abc import Callable

    from hotstate import Runtime
    from hotstate._bench._trace import TraceWriter

WORKFLOW = "crash-trial"
SIGNAL = "paid"


@dataclass(frozen=True, slots=True, kw_only=True)
class Workload:
    """The child's workload.

    Attributes:
        inflight: runs in flight at once.
        work_steps: plain steps after the signal wait.
        fail_every: every this many runs fail for good (compensated, dead-lettered).
        flaky_every: every this many runs fail once at ``flaky`` and are retried.
        max_runs: run slots in the trace (the child stops starting runs there).
        pace: seconds each in-flight slot rests between runs; 0 runs flat out
            (the event loop saturated, as in the throughput sweep), above 0 offers
            a bounded load that leaves the flush loop room to keep its cadence.
    """

    inflight: int = 64
    work_steps: int = 6
    fail_every: int = 10
    flaky_every: int = 3
    max_runs: int = 50_000
    pace: float = 0.0


def run_id(index: int) -> str:
    """The run id of run ``index`` (parsed back by ``run_index``)."""
    return f"r{index:07d}"


def run_index(rid: str) -> int:
    """The index of run id ``rid``."""
    return int(rid[1:])


class TransientError(Exception):
    """Raised by the flaky step on its first attempt; retried."""


class PermanentError(Exception):
    """Raised by ``ship`` for the runs designed to fail; not retried."""


def fails_for_good(index: int, fail_every: int) -> bool:
    """True for the runs designed to fail, be compensated and dead-lettered."""
    return fail_every > 0 and index % fail_every == fail_every - 1


def make_workflow(
    *,
    work_steps: int,
    fail_every: int,
    flaky_every: int,
    request_signal: Callable[[str], None],
    on_step: Callable[[StepContext], None] | None = None,
) -> Workflow:
    """The trial workflow; the parent's recovery runtime builds the same one.

    Args:
        work_steps: plain steps between the signal and ``ship``.
        fail_every: every this many runs fail for good at ``ship`` (0: none).
        flaky_every: every this many runs fail once, transiently, at ``flaky``.
        request_signal: called with the run id when the run is about to wait
            for its ``paid`` signal (the driver sends it).
        on_step: called with the context at the start of every step.

    Returns:
        The workflow.
    """
    note = on_step if on_step is not None else (lambda _ctx: None)

    async def reserve(p: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        note(ctx)
        return {**p, "n": p["n"] + 1, "reserved": True}

    async def release(p: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        return {**p, "reserved": False}

    async def flaky(p: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        note(ctx)
        if flaky_every > 0 and p["i"] % flaky_every == 0 and ctx.attempt == 1:
            raise TransientError(f"{ctx.run_id}: transient failure, attempt {ctx.attempt}")
        return {**p, "n": p["n"] + 1}

    async def request(p: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        note(ctx)
        request_signal(ctx.run_id)
        return {**p, "n": p["n"] + 1}

    async def pay(p: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        note(ctx)
        return {**p, "n": p["n"] + 1, "paid": ctx.signal}

    async def refund(p: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        return {**p, "paid": None, "refunded": True}

    async def work(p: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        note(ctx)
        return {**p, "n": p["n"] + 1, "key": ctx.idempotency_key}

    async def ship(p: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        note(ctx)
        if fails_for_good(p["i"], fail_every):
            raise PermanentError(f"{ctx.run_id}: cannot ship")
        return {**p, "n": p["n"] + 1, "shipped": True}

    quick = RetryPolicy(max_attempts=3, initial_delay=0.002, max_delay=0.01)
    steps = [
        Step(fn=reserve, compensate=release),
        Step(fn=flaky, retry=quick),
        Step(fn=request),
        Step(fn=pay, wait_for=SIGNAL, compensate=refund),
        *[Step(fn=work, name=f"work{j}") for j in range(work_steps)],
        Step(fn=ship, retry=RetryPolicy(max_attempts=3, initial_delay=0.002, non_retryable=(PermanentError,))),
    ]
    return Workflow(WORKFLOW, steps)


def payload(index: int) -> dict[str, Any]:
    """The initial payload of run ``index``."""
    return {"i": index, "n": 0, "blob": "x" * 100}


class SignalDriver:
    """Sends ``paid`` to the runs that asked for it (the workflow's ``request`` step calls ``request``)."""

    def __init__(self) -> None:
        self.queue: list[str] = []
        self.event = anyio.Event()
        self.requested: set[str] = set()  # each run needs one signal: asked by its step or seen waiting

    def request(self, rid: str) -> None:
        """Queue ``rid`` for its signal (once)."""
        if rid in self.requested:
            return
        self.requested.add(rid)
        self.queue.append(rid)
        self.event.set()

    async def serve(self, rt: Runtime) -> None:
        """Send the queued signals as they come; until cancelled."""
        while True:
            if not self.queue:
                await self.event.wait()
            self.event = anyio.Event()
            batch, self.queue = self.queue, []
            for rid in batch:
                if not rt.get(rid).finished:
                    await rt.send(rid, SIGNAL, {"amount": run_index(rid)})

    async def drive(self, rt: Runtime, run_ids: list[str]) -> None:
        """Signal every run that waits (now or later) until all of ``run_ids`` have finished.

        A run recovered past its ``request`` step but not yet waiting never asks
        again: it starts once its resumed snapshot is durable, maybe after this
        driver started, so waiting runs are looked for until the end.
        """

        async def finish(rid: str) -> None:
            with contextlib.suppress(RunFailedError):  # the runs designed to fail
                await rt.wait_finished(rid)

        async with anyio.create_task_group() as tg:
            tg.start_soon(self.watch, rt)
            tg.start_soon(self.serve, rt)
            async with anyio.create_task_group() as waiters:
                for rid in run_ids:
                    waiters.start_soon(finish, rid)
            tg.cancel_scope.cancel()

    async def watch(self, rt: Runtime, period: float = 0.01) -> None:
        """Request the signal of every run found waiting for it without one pending; until cancelled."""
        while True:
            for snap in rt.list_runs(status=Status.waiting):
                if not any(name == SIGNAL for name, _ in snap.signals):
                    self.request(snap.run_id)
            await anyio.sleep(period)  # the driver's cadence, not a synchronisation


class TrialLoad:
    """The child's side of a trial: ``inflight`` workers start runs until the trace is out of run slots.

    Args:
        workload: the workload.
        trace: the child's trace (runs are registered in it before they are spawned).
    """

    def __init__(self, workload: Workload, trace: TraceWriter) -> None:
        self.load = workload
        self.trace = trace
        self.driver = SignalDriver()
        self.workflow = make_workflow(
            work_steps=workload.work_steps,
            fail_every=workload.fail_every,
            flaky_every=workload.flaky_every,
            request_signal=self.driver.request,
            on_step=trace.step_started,
        )
        self.workflows = [self.workflow]

    async def run(self, rt: Runtime) -> None:
        """Run the workload until every run slot was used (the parent kills the child before, as a rule)."""
        slots, runs = self.trace.slots, self.trace.layout.runs

        async def worker() -> None:
            while slots[TraceLayout.STARTED] < runs:
                index = int(slots[TraceLayout.STARTED])
                slots[TraceLayout.STARTED] = index + 1
                rid = run_id(index)
                self.trace.register(rid, index)
                handle = await rt.spawn(self.workflow, payload(index), run_id=rid)
                with contextlib.suppress(RunFailedError):  # the runs designed to fail
                    await handle.wait_finished()
                slots[TraceLayout.FINISHED] += 1
                if self.load.pace > 0:
                    await anyio.sleep(self.load.pace)  # the workload's offered load, not a synchronisation

        async with anyio.create_task_group() as tg:
            tg.start_soon(self.driver.serve, rt)
            async with anyio.create_task_group() as workers:
                for _ in range(self.load.inflight):
                    workers.start_soon(worker)
            tg.cancel_scope.cancel()
