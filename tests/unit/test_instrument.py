"""Instruments observe transitions and store writes without monkeypatching."""

from __future__ import annotations

from typing import Any

import pytest

from hotstate import (
    ConfigError,
    FlushPolicy,
    Instrument,
    Runtime,
    Snapshot,
    Step,
    StepContext,
    Tier,
    Transition,
    Workflow,
)
from hotstate._instrument import Instruments
from hotstate.persistence import MemoryStore


async def inc(p: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    return {"n": p["n"] + 1}


WF = Workflow("wf", [Step(fn=inc, name=f"s{i}") for i in range(3)])


class Recorder(Instrument):
    def __init__(self) -> None:
        self.versions: list[tuple[str, int]] = []
        self.saves: list[tuple[str, str, BaseException | None]] = []

    def transition_committed(self, snapshot: Snapshot, transition: Transition) -> None:
        assert snapshot.version == transition.version
        self.versions.append((snapshot.run_id, snapshot.version))

    def save_started(self, tier: str) -> None:
        self.saves.append(("start", tier, None))

    def save_finished(self, tier: str, error: BaseException | None) -> None:
        self.saves.append(("end", tier, error))


class Broken(Instrument):
    def transition_committed(self, snapshot: Snapshot, transition: Transition) -> None:
        raise RuntimeError("instrument bug")


async def test_an_instrument_sees_every_transition_of_a_memory_only_runtime_in_order():
    rec = Recorder()
    async with Runtime([WF], instruments=[rec]) as rt:
        run = await rt.spawn(WF, {"n": 0}, run_id="a")
        assert await run.wait_finished() == {"n": 3}
        assert rec.versions == [("a", v) for v in range(1, 5)]
        assert [t.version for t in rt.history("a")] == [1, 2, 3, 4]
    assert rec.saves == []


async def test_an_instrument_sees_each_store_write_start_and_end():
    rec = Recorder()
    tier = Tier(MemoryStore(), FlushPolicy(interval=60))
    async with Runtime([WF], tiers=[tier], instruments=[rec]) as rt:
        run = await rt.spawn(WF, {"n": 0}, run_id="a")
        await run.wait_finished()
        await rt.flush()
        assert rec.saves == [("start", "memory", None), ("end", "memory", None)]
        assert rec.versions[-1] == ("a", 4)


async def test_a_failing_instrument_hook_is_logged_and_the_run_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    async with Runtime([WF], instruments=[Broken()]) as rt:
        run = await rt.spawn(WF, {"n": 0})
        assert await run.wait_finished() == {"n": 3}
    assert "instrument hook transition_committed failed" in caplog.text


def test_hooks_nobody_overrides_are_not_installed() -> None:
    class OnlySaves(Instrument):
        def save_started(self, tier: str) -> None:
            pass

    inst = Instruments([OnlySaves()])
    assert inst.committed == ()
    assert len(inst.save_started) == 1
    assert inst.save_finished == ()

    def mark(snapshot: Snapshot, transition: Transition) -> None:
        pass

    assert inst.wrap_mark(mark) is mark
    assert Instruments().wrap_mark(None) is None


def test_an_instrument_that_is_not_one_is_a_config_error():
    with pytest.raises(ConfigError, match="instruments"):
        Runtime([WF], instruments=[object()])  # type: ignore[list-item]
