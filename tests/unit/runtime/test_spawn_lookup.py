"""``spawn(run_id=...)`` looks the id up in the tiers, but a tier that hangs or is failing never stalls it."""

from __future__ import annotations

from typing import Any

import anyio
import anyio.lowlevel
import pytest

from hotstate import (
    FlushPolicy,
    Runtime,
    Status,
    Step,
    StepContext,
    StoreUnavailableError,
    Tier,
    Workflow,
)
from hotstate.persistence import MemoryStore, StoredSnapshot
from hotstate.testing import ManualClock


async def take(p: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    return {**p, "got": ctx.signal}


PARKED = Workflow("parked", [Step(fn=take, wait_for="go")])


class HangingLoads:
    """A MemoryStore whose ``load`` never answers while ``hang`` is set (a stopped server)."""

    def __init__(self) -> None:
        self.inner = MemoryStore()
        self.tier = self.inner.tier
        self.hang = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def load(self, run_id: str) -> StoredSnapshot | None:
        if self.hang:
            await anyio.sleep_forever()
        return await self.inner.load(run_id)


async def test_a_tier_that_does_not_answer_is_skipped_after_its_ack_timeout_on_the_runtime_clock():
    clock = ManualClock()
    store = HangingLoads()
    tiers = [Tier(store, FlushPolicy(interval=60.0, ack_timeout=2.0))]
    async with Runtime([PARKED], tiers=tiers, clock=clock) as rt:
        store.hang = True
        done = anyio.Event()

        async def spawn() -> None:
            await rt.spawn(PARKED, {}, run_id="x")
            done.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(spawn)
            for _ in range(20):
                await anyio.lowlevel.checkpoint()
            assert not done.is_set()  # still asking the tier
            await clock.advance(1.9)
            assert not done.is_set()
            await clock.advance(0.2)  # past ack_timeout
            with anyio.fail_after(5):
                await done.wait()
        assert rt.get("x").status in (Status.pending, Status.waiting)
        store.hang = False


async def test_a_failing_tier_is_not_asked_at_all():
    store = HangingLoads()
    clock = ManualClock()
    async with Runtime([PARKED], tiers=[Tier(store, FlushPolicy(interval=60.0))], clock=clock) as rt:
        await rt.spawn(PARKED, {}, run_id="a")
        store.inner.down = True
        with pytest.raises(StoreUnavailableError):
            await rt.flush()
        assert rt.tier_statistics()[0].consecutive_failures >= 1
        store.hang = True  # would block forever if spawn asked it
        with anyio.fail_after(5):
            await rt.spawn(PARKED, {}, run_id="b")
        assert rt.get("b").status in (Status.pending, Status.waiting)
        store.hang = False
        store.inner.down = False


async def test_with_the_system_clock_the_bound_is_a_deadline_on_the_lookup():
    store = HangingLoads()
    tiers = [Tier(store, FlushPolicy(interval=60.0, ack_timeout=0.05))]
    async with Runtime([PARKED], tiers=tiers) as rt:
        store.hang = True
        with anyio.fail_after(5):  # hang guard only; the bound is the 0.05 s ack_timeout
            await rt.spawn(PARKED, {}, run_id="y")
        assert rt.get("y").version >= 1
        store.hang = False
