"""The crash-loop workload (#10): one run's step SIGKILLs its own process, every start.

A child of the SIGKILL harness (``_child.py``) runs ``CrashLoopLoad`` with
``Runtime(recover=True, crash_limit=...)``. Every start spawns the ordinary
jobs and the poison job (at position ``poison_at`` in the queue): ``spawn``
is idempotent on the run id, so a job recovered, held back or finished in a
tier comes back as it is, and only a job no tier holds starts anew. Every job
reserves, then works for its own duration (``work[i]`` seconds) and
the poison job then kills the process, as an out-of-memory kill or a crashing
extension would. The parent (``_guarantees.py``) starts the child again until
it exits on its own, then checks: the poison run executed at most
``crash_limit`` times and was dead-lettered with ``CrashLoopError``, and every
ordinary run finished. Each execution of ``work`` is appended to the ledger
before it can crash; each start says ``Started`` with its recovery report.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio

from hotstate import RunFailedError, Step, StepContext, Workflow

if TYPE_CHECKING:
    from collections.abc import Callable

    from hotstate import Runtime
    from hotstate._bench._trace import TraceWriter

WORKFLOW = "crash-loop-job"
POISON = "poison"
COMPENSATED = "compensated"


@dataclass(frozen=True, slots=True, kw_only=True)
class CrashLoopWorkload:
    """One crash-loop trial (part of the child's ``ChildConfig``)."""

    tag: str  # run ids are "{tag}-job-{i:02d}" and "{tag}-poison"
    ordinary: int  # jobs that finish
    poison_at: int  # the poison job's place in the spawn order (0: first)
    work: tuple[float, ...]  # seconds each job's work step takes, in spawn order
    ledger: str  # every execution of work, and every compensation, appended here

    def ids(self) -> list[str]:
        """Every job's run id, in spawn order."""
        ids = [f"{self.tag}-job-{i:02d}" for i in range(self.ordinary)]
        ids.insert(self.poison_at, self.poison_id)
        return ids

    @property
    def poison_id(self) -> str:
        """The poison job's run id."""
        return f"{self.tag}-{POISON}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Started:
    """What this start's recovery found: a child message, once per start."""

    resumed: list[str]
    crash_looped: list[str]
    held_back: list[str]


def crash_loop_workflow(ledger: str) -> Workflow:
    """The job workflow: reserve (compensated by a refund), then work (the poison job kills the process)."""

    def record(entry: list[Any]) -> None:
        with open(ledger, "a", encoding="utf-8") as f:  # written before the step can crash
            f.write(json.dumps(entry) + "\n")

    async def reserve(p: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        return {**p, "reserved": True}

    async def work(p: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        record([ctx.run_id, ctx.attempt])
        await anyio.sleep(p["work"])  # the job's work: runs before this step are durable by now
        if p["poison"]:
            os.kill(os.getpid(), signal.SIGKILL)  # the step takes its process down
        return {**p, "worked": True}

    async def refund(p: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        record([ctx.run_id, COMPENSATED])
        return {**p, "reserved": False}

    return Workflow(WORKFLOW, [Step(fn=reserve, name="reserve", compensate=refund), Step(fn=work, name="work")])


class CrashLoopLoad:
    """The child's side of a crash-loop trial: one start.

    Args:
        workload: the trial.
        trace: the child's trace (every job is registered before recovery adopts it).
        send: writes a message to the parent.
    """

    def __init__(self, workload: CrashLoopWorkload, trace: TraceWriter, send: Callable[[Started], None]) -> None:
        self.load = workload
        self.send = send
        self.ids = workload.ids()
        self.workflow = crash_loop_workflow(workload.ledger)
        self.workflows = [self.workflow]
        for i, rid in enumerate(self.ids):
            trace.register(rid, i)
        trace.slots[trace.layout.STARTED] = len(self.ids)

    async def run(self, rt: Runtime) -> None:
        """Say what recovery found, spawn every job (idempotent), wait until every job in memory ends."""
        report = rt.recovery_report
        self.send(
            Started(
                resumed=[r.run_id for r in report.resumed] if report else [],
                crash_looped=list(report.crash_looped) if report else [],
                held_back=list(report.held_back) if report else [],
            )
        )
        for i, rid in enumerate(self.ids):
            payload = {"poison": rid == self.load.poison_id, "work": self.load.work[i]}
            await rt.spawn(self.workflow, payload, run_id=rid)
        for snap in rt.list_runs():  # held-back runs are in memory too, released one at a time
            with contextlib.suppress(RunFailedError):  # the poison job, once over the limit
                await rt.wait_finished(snap.run_id)
