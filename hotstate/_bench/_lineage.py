"""The lineage workload (#10): runs finish in Valkey, the child is SIGKILLed before SQLite's flush.

A child of the SIGKILL harness (``_child.py``) runs ``LineageLoad`` on Valkey
every 10 ms and SQLite at a long interval: ``early`` orders are spawned and
park at ``charge`` (waiting for ``paid``), both tiers are flushed, ``late``
orders are spawned (only Valkey ever sees them), the orders not in ``unpaid``
are paid and finish, and once Valkey holds every order as it is in memory the
child says ``Settled`` and SIGKILLs itself. SQLite still holds the early
orders parked and none of the late ones. The parent (``_guarantees.py``)
recovers, pays the parked orders, purges the finished ones, restarts, and
checks that no finished order was resumed and that no side effect ran twice:
every step appends one line to the ledger each time it runs, in the child and
in the parent alike.
"""

from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio

from hotstate import Step, StepContext, Workflow

if TYPE_CHECKING:
    from collections.abc import Callable

    from hotstate import Runtime
    from hotstate._bench._trace import TraceWriter

WORKFLOW = "lineage-order"
SIGNAL = "paid"
EFFECTS = ("reserve", "charge", "ship")
"""The side effects: one per step, each written to the ledger every time its step runs."""


@dataclass(frozen=True, slots=True, kw_only=True)
class LineageWorkload:
    """One lineage trial (part of the child's ``ChildConfig``)."""

    tag: str  # run ids are "{tag}-{i:03d}"
    early: int  # orders spawned and flushed to both tiers, parked at charge
    late: int  # orders spawned after that flush (never in SQLite before the kill)
    unpaid: tuple[int, ...]  # order indexes left parked at the kill; the rest finish
    ledger: str  # the side-effect ledger, appended to

    def ids(self) -> list[str]:
        """Every order's run id, early ones first."""
        return [f"{self.tag}-{i:03d}" for i in range(self.early + self.late)]


@dataclass(frozen=True, slots=True, kw_only=True)
class Settled:
    """Valkey holds every order as memory does: the child's last message before its SIGKILL."""

    finished: list[str]  # orders done at the kill
    parked: list[str]  # orders waiting for ``paid`` at the kill
    durable: dict[str, dict[str, int]]  # ``Runtime.durable_versions`` of every order at the kill


def lineage_workflow(ledger: str) -> Workflow:
    """The order workflow; each step appends ``[run_id, effect]`` to ``ledger`` when it runs."""

    def effect(ctx: StepContext, name: str) -> None:
        with open(ledger, "a", encoding="utf-8") as f:  # one small append per execution
            f.write(json.dumps([ctx.run_id, name]) + "\n")

    async def reserve(p: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        effect(ctx, "reserve")
        return {**p, "reserved": True}

    async def charge(p: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        effect(ctx, "charge")
        return {**p, "charged": ctx.signal}

    async def ship(p: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        effect(ctx, "ship")
        return {**p, "shipped": True}

    steps = [Step(fn=reserve, name="reserve"), Step(fn=charge, wait_for=SIGNAL), Step(fn=ship, name="ship")]
    return Workflow(WORKFLOW, steps)


def read_ledger(path: str) -> list[tuple[Any, ...]]:
    """A ledger's lines as tuples (``(run_id, effect)`` here), in order; a missing file is empty."""
    try:
        with open(path, encoding="utf-8") as f:
            return [tuple(json.loads(line)) for line in f if line.strip()]
    except FileNotFoundError:
        return []


class LineageLoad:
    """The child's side of a lineage trial.

    Args:
        workload: the trial.
        trace: the child's trace (every order is registered).
        send: writes a message to the parent.
    """

    def __init__(self, workload: LineageWorkload, trace: TraceWriter, send: Callable[[Settled], None]) -> None:
        self.load = workload
        self.send = send
        self.ids = workload.ids()
        self.workflow = lineage_workflow(workload.ledger)
        self.workflows = [self.workflow]
        for i, rid in enumerate(self.ids):
            trace.register(rid, i)
        trace.slots[trace.layout.STARTED] = len(self.ids)

    async def run(self, rt: Runtime) -> None:
        """Park, flush, pay, wait for Valkey, say ``Settled`` and SIGKILL this process."""
        early, late = self.ids[: self.load.early], self.ids[self.load.early :]
        await self._park(rt, early)
        await rt.flush()  # both tiers hold the early orders parked at charge
        await self._park(rt, late)
        unpaid = {self.ids[i] for i in self.load.unpaid}
        paid = [rid for rid in self.ids if rid not in unpaid]
        for rid in paid:
            await rt.send(rid, SIGNAL, 42)
        for rid in paid:
            await rt.wait_finished(rid)
        for rid in self.ids:
            await rt.wait_durable(rid, tier="valkey")
        self.send(
            Settled(
                finished=paid,
                parked=sorted(unpaid),
                durable={rid: rt.durable_versions(rid) for rid in self.ids},
            )
        )
        os.kill(os.getpid(), signal.SIGKILL)  # before SQLite's flush

    async def _park(self, rt: Runtime, ids: list[str]) -> None:
        for rid in ids:
            await rt.spawn(self.workflow, {}, run_id=rid)
        with anyio.fail_after(30):  # a hang guard only
            while any(rt.get(rid).status != "waiting" for rid in ids):  # noqa: ASYNC110 - the runs park themselves
                await anyio.sleep(0.001)
