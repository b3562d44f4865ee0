"""Typed usage of the public API: only type-checked (mypy), never collected by pytest."""

from __future__ import annotations

from typing import Any

import hotstate
from hotstate import (
    FlushPolicy,
    RetryPolicy,
    RunHandle,
    Runtime,
    Snapshot,
    Status,
    Step,
    StepContext,
    Tier,
    Transition,
    Workflow,
)
from hotstate.persistence import SQLiteStore, ValkeyStore
from hotstate.testing import ManualClock


async def place(order: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    key: str = ctx.idempotency_key
    return {**order, "key": key}


def refund(order: dict[str, Any], ctx: StepContext) -> None:
    pass


ORDER = Workflow(
    "order",
    [Step(fn=place, compensate=refund, retry=RetryPolicy(max_attempts=5), timeout=3.0)],
    version=2,
)


async def embed() -> None:
    tiers = [
        Tier(ValkeyStore("valkey://127.0.0.1:6379/0"), FlushPolicy(interval=0.01)),
        Tier(SQLiteStore("runs.db"), FlushPolicy.through()),
    ]
    async with Runtime([ORDER], tiers=tiers, recover=True, clock=ManualClock()) as rt:
        run: RunHandle = await rt.spawn(ORDER, {"id": 1}, run_id="o-1")
        snap: Snapshot = rt.get(run.run_id)
        status: Status = snap.status
        waiting: list[Snapshot] = rt.list_runs(status=Status.waiting, workflow="order", limit=10)
        history: list[Transition] = rt.history(run.run_id)
        versions: dict[str, int] = rt.durable_versions(run.run_id)
        result: Any = await run.wait_finished()
        await rt.flush()
        del status, waiting, history, versions, result


def main() -> None:
    hotstate.run(embed)
