"""A re-delivered signal with the same dedupe key is a no-op across restarts (#11), with a real SQLite file.

The keys travel in the snapshot body, under the envelope check: a runtime
recovered from the file still knows which deliveries it took, for a run that
is resumed and for one that finished and is only in the store.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import anyio
import pytest

from hotstate import FlushPolicy, Runtime, Status, Step, StepContext, Tier, UnknownSignalError, Workflow
from hotstate.persistence import SQLiteStore

if TYPE_CHECKING:
    from pathlib import Path

GUARD = 10.0
TAKEN: list[tuple[str, Any]] = []


async def pay(p: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    TAKEN.append(("paid", ctx.signal))
    return {**p, "paid": ctx.signal}


async def ship(p: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    TAKEN.append(("shipped", ctx.signal))
    return {**p, "shipped": ctx.signal}


ORDER = Workflow("order", [Step(fn=pay, wait_for="paid"), Step(fn=ship, wait_for="shipped")])


def tiers(db: Path) -> list[Tier]:
    return [Tier(SQLiteStore(db), FlushPolicy(interval=0.05))]


async def until_waiting(rt: Runtime, run_id: str) -> None:
    with anyio.fail_after(GUARD):
        while rt.get(run_id).status is not Status.waiting:  # noqa: ASYNC110 - no event for a status
            await anyio.sleep(0.001)


async def test_a_redelivery_after_a_restart_queues_nothing(tmp_path: Path) -> None:
    db = tmp_path / "runs.db"
    TAKEN.clear()
    async with Runtime([ORDER], tiers=tiers(db)) as rt:
        await rt.spawn(ORDER, {}, run_id="o1")
        await rt.spawn(ORDER, {}, run_id="o2")
        await rt.send("o1", "paid", 10, dedupe_key="evt-pay-1")
        await rt.send("o2", "paid", 20, dedupe_key="evt-pay-2")
        await rt.send("o2", "shipped", "ups", dedupe_key="evt-ship-2")
        with anyio.fail_after(GUARD):
            await rt.wait_finished("o2")
        await until_waiting(rt, "o1")
        assert rt.get("o1").step == 1
    assert sorted(TAKEN) == [("paid", 10), ("paid", 20), ("shipped", "ups")]

    async with Runtime([ORDER], tiers=tiers(db), recover=True) as rt:
        assert [r.run_id for r in rt.recovery_report.resumed] == ["o1"]  # type: ignore[union-attr]
        assert rt.get("o1").dedupe == ("evt-pay-1",)
        # The webhook is delivered again: nothing is queued, no error.
        await rt.send("o1", "paid", 10, dedupe_key="evt-pay-1")
        # o2 finished and is only in the file: its keys still answer.
        await rt.send("o2", "shipped", "ups", dedupe_key="evt-ship-2")
        # Without the key, the same signal is refused: no step left waits for it.
        with pytest.raises(UnknownSignalError):
            await rt.send("o1", "paid", 10)
        await rt.send("o1", "shipped", "dhl", dedupe_key="evt-ship-1")
        with anyio.fail_after(GUARD):
            assert await rt.wait_finished("o1") == {"paid": 10, "shipped": "dhl"}
    assert sorted(TAKEN) == [("paid", 10), ("paid", 20), ("shipped", "dhl"), ("shipped", "ups")]
