"""``spawn(run_id=...)`` looks the id up in the tiers, but a tier that hangs or is failing never stalls it."""

from __future__ import annotations

from typing import Any

import anyio
import anyio.lowlevel
import pytest

from hotstate import (
    FlushPolicy,
    RunNotFoundError,
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


async def test_a_tier_that_does_not_answer_makes_spawn_of_an_id_a_typed_error_after_its_ack_timeout():
    """It may hold the newest copy: never start a second lineage from the others (#10)."""
    clock = ManualClock()
    store = HangingLoads()
    tiers = [Tier(store, FlushPolicy(interval=60.0, ack_timeout=2.0))]
    async with Runtime([PARKED], tiers=tiers, clock=clock) as rt:
        store.hang = True
        outcome: list[BaseException] = []

        async def spawn() -> None:
            try:
                await rt.spawn(PARKED, {}, run_id="x")
            except StoreUnavailableError as exc:
                outcome.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(spawn)
            for _ in range(20):
                await anyio.lowlevel.checkpoint()
            assert outcome == []  # still asking the tier
            await clock.advance(1.9)
            assert outcome == []
            await clock.advance(0.2)  # past ack_timeout
        assert len(outcome) == 1
        assert "'x'" in str(outcome[0])
        assert "2 s" in str(outcome[0])
        with pytest.raises(RunNotFoundError):
            rt.get("x")  # nothing was started
        store.hang = False
        await rt.spawn(PARKED, {}, run_id="x")  # the tier answers again: the same call works
        assert rt.get("x").status in (Status.pending, Status.waiting)


async def test_a_failing_tier_makes_spawn_of_an_id_a_typed_error_and_starts_nothing():
    store = HangingLoads()
    clock = ManualClock()
    async with Runtime([PARKED], tiers=[Tier(store, FlushPolicy(interval=60.0))], clock=clock) as rt:
        await rt.spawn(PARKED, {}, run_id="a")
        store.inner.down = True
        with pytest.raises(StoreUnavailableError):
            await rt.flush()
        with anyio.fail_after(5), pytest.raises(StoreUnavailableError, match="'b'"):
            await rt.spawn(PARKED, {}, run_id="b")
        with pytest.raises(RunNotFoundError):
            rt.get("b")
        assert (await rt.spawn(PARKED, {})).run_id  # a generated id needs no lookup
        store.inner.down = False
        await rt.spawn(PARKED, {}, run_id="b")
        assert rt.get("b").status in (Status.pending, Status.waiting)


async def test_with_the_system_clock_the_bound_is_a_deadline_on_the_lookup():
    store = HangingLoads()
    tiers = [Tier(store, FlushPolicy(interval=60.0, ack_timeout=0.05))]
    async with Runtime([PARKED], tiers=tiers) as rt:
        store.hang = True
        with anyio.fail_after(5), pytest.raises(StoreUnavailableError):  # the bound is the 0.05 s ack_timeout
            await rt.spawn(PARKED, {}, run_id="y")
        with pytest.raises(RunNotFoundError):
            rt.get("y")
        store.hang = False
