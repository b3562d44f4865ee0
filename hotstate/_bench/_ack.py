"""The acknowledgement workload (#10): one acknowledged call, then the child SIGKILLs itself.

A child of the SIGKILL harness (``_child.py``) runs ``AckLoad``: ``churn`` runs
step every millisecond (so a group commit is in flight and the tiers hold
unflushed work), then one call is made on run ``run_id`` and, the moment it
returns, the child says ``Acknowledged`` and SIGKILLs itself, with no await in
between: nothing after the call gets a chance to flush. The parent
(``_guarantees.py``) then reads the acknowledging tier and checks the change
is there. The calls (``OPS``):

- ``spawn``: the run's v1;
- ``send``: the snapshot holding the signal (the run is busy in an earlier
  step, so the signal is still pending); ``send_consumed``: the run was waiting
  for it, so the stored copy holds it pending or is past the step that took it;
- ``cancel``: ``cancelled`` at the acknowledged version;
- ``wait_finished``: ``done`` at the final version; ``wait_failed``: the same
  call raising ``RunFailedError``, ``failed`` at the final version;
- ``retry_dead_letter``: the retried version, ``running``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio

from hotstate import RetryPolicy, RunFailedError, Step, StepContext, TransitionKind, Workflow

if TYPE_CHECKING:
    from collections.abc import Callable

    from hotstate import Runtime
    from hotstate._bench._trace import TraceWriter

OPS = ("spawn", "send", "send_consumed", "cancel", "wait_finished", "wait_failed", "retry_dead_letter")
"""The acknowledged calls, in the order the trials take them."""
SIGNAL = "go"
SHORT_STEPS = 3  # steps of the run wait_finished waits for
FLAKY_MESSAGE = "first attempt fails"


@dataclass(frozen=True, slots=True, kw_only=True)
class AckWorkload:
    """One acknowledgement trial (part of the child's ``ChildConfig``)."""

    op: str  # from OPS
    run_id: str  # the run the call acknowledges
    churn: int = 8  # runs stepping every millisecond meanwhile
    churn_warmup: int = 40  # churn steps taken before the call: the tiers are in their steady state
    churn_steps: int = 5000  # steps per churn run: more than any child lives for

    def churn_ids(self) -> list[str]:
        """The churn runs' ids."""
        return [f"{self.run_id}-churn-{i}" for i in range(self.churn)]


@dataclass(frozen=True, slots=True, kw_only=True)
class Acknowledged:
    """The call returned: the child's last message before its SIGKILL."""

    op: str
    run_id: str
    acked: int  # the version the call acknowledged
    version: int  # ``rt.get(run_id).version`` right after the call (may be ahead, not durable yet)
    status: str  # its status then


async def _busy(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    await anyio.sleep(3600)  # ends with the SIGKILL (or a cancel)
    return payload


async def _gate(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    return {**payload, "got": ctx.signal}


async def _tick(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    await anyio.sleep(0.001)
    return {**payload, "n": payload["n"] + 1}


def workflows(churn_steps: int, flaky: Callable[[dict[str, Any], StepContext], Any]) -> dict[str, Workflow]:
    """The workflow of each call, and ``"churn"``: the parent registers the same names to read them."""
    busy = Workflow("busy", [Step(fn=_busy, name="busy")])
    failing = Workflow("flaky", [Step(fn=flaky, name="flaky", retry=RetryPolicy.never())])
    return {
        "spawn": busy,
        # The signal waits behind a busy step, so the run does not move after it is accepted.
        "send": Workflow("pending", [Step(fn=_busy, name="busy"), Step(fn=_gate, name="gate", wait_for=SIGNAL)]),
        # The run waits for the signal, consumes it at once, then stays busy.
        "send_consumed": Workflow(
            "consumed", [Step(fn=_gate, name="gate", wait_for=SIGNAL), Step(fn=_busy, name="busy")]
        ),
        "cancel": busy,
        "wait_finished": Workflow("short", [Step(fn=_tick, name=f"t{i}") for i in range(SHORT_STEPS)]),
        "wait_failed": failing,
        "retry_dead_letter": failing,
        "churn": Workflow("churn", [Step(fn=_tick, name=f"c{i}") for i in range(churn_steps)]),
    }


class AckLoad:
    """The child's side of an acknowledgement trial.

    Args:
        workload: the trial.
        trace: the child's trace (the churn runs and the acknowledged run are registered).
        send: writes a message to the parent.
    """

    def __init__(self, workload: AckWorkload, trace: TraceWriter, send: Callable[[Acknowledged], None]) -> None:
        self.load = workload
        self.send = send
        self._flaky_calls = 0
        self.by_op = workflows(workload.churn_steps, self._flaky)
        self.workflows = list(dict.fromkeys(self.by_op.values()))
        for i, rid in enumerate([workload.run_id, *workload.churn_ids()]):
            trace.register(rid, i)
        trace.slots[trace.layout.STARTED] = workload.churn + 1

    async def _flaky(self, payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        """Fails the first time (the run fails for good and is dead-lettered), then stays busy."""
        self._flaky_calls += 1  # one such run per child
        if self._flaky_calls == 1:
            raise ValueError(FLAKY_MESSAGE)
        return await _busy(payload, ctx)

    async def run(self, rt: Runtime) -> None:
        """Churn, make the call, say ``Acknowledged`` and SIGKILL this process."""
        await self._churn(rt)
        acked = await self._act(rt)
        snap = rt.get(self.load.run_id)  # sync, no I/O: the run as the caller sees it after the call
        self.send(
            Acknowledged(
                op=self.load.op, run_id=self.load.run_id, acked=acked, version=snap.version, status=snap.status.value
            )
        )
        os.kill(os.getpid(), signal.SIGKILL)  # no await since the call returned

    async def _churn(self, rt: Runtime) -> None:
        """Start the churn runs; return once they have taken ``churn_warmup`` steps between them."""
        wf = self.by_op["churn"]
        async with rt.subscribe(workflow=wf.name, maxsize=self.load.churn_steps) as seen:
            async with anyio.create_task_group() as tg:  # spawned together: they share group commits
                for rid in self.load.churn_ids():
                    tg.start_soon(functools.partial(rt.spawn, wf, {"n": 0}, run_id=rid))
            steps = 0
            with anyio.fail_after(30):  # a hang guard only
                async for transition in seen:
                    steps += transition.kind is TransitionKind.step
                    if steps >= self.load.churn_warmup:
                        break

    async def _act(self, rt: Runtime) -> int:
        return await act(rt, self.load.op, self.load.run_id, self.by_op[self.load.op])


async def act(rt: Runtime, op: str, rid: str, wf: Workflow) -> int:
    """Make the acknowledged call; return the version it acknowledged.

    ``rt.get`` right after the call can already be ahead of that version
    (the run moved on in memory, not yet durable anywhere), so where the run
    can move, the version is taken just before the call: each of these
    calls commits exactly one version before its first await.
    """
    handle = await rt.spawn(wf, {"op": op, "n": 0}, run_id=rid)
    if op == "spawn":
        return 1
    if op in ("send", "send_consumed"):
        before = rt.get(rid).version
        await rt.send(rid, SIGNAL, {"sent": rid})
        return before + 1
    if op == "retry_dead_letter":
        with contextlib.suppress(RunFailedError):
            await handle.wait_finished()
        before = rt.get(rid).version
        await rt.retry_dead_letter(rid)
        return before + 1
    if op == "cancel":
        await rt.cancel(rid)
    elif op == "wait_finished":
        await handle.wait_finished()
    else:
        try:
            await handle.wait_finished()
        except RunFailedError:
            pass
        else:
            raise AssertionError("the flaky run did not fail")
    return rt.get(rid).version  # finished: it cannot move any more
