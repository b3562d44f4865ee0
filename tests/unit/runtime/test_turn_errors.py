"""A run whose turn keeps raising is failed, never rescheduled forever (#11, found by red-teaming)."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from hotstate import RunFailedError, Runtime, Step, StepContext, Workflow
from hotstate.actors._actor import RunActor
from hotstate.actors._snapshot import Signals
from hotstate.persistence import MsgpackCodec
from hotstate.persistence._records import decode_snapshot, encode_snapshot


async def inc(p: int, ctx: StepContext) -> int:
    return p + 1


WF = Workflow("w", [Step(fn=inc, name="one"), Step(fn=inc, name="two")])


async def test_a_turn_that_raises_at_the_same_version_fails_the_run_after_three_tries(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[str] = []
    real = RunActor.turn

    async def turn(self: RunActor, host: Any, budget: int) -> int:
        if self.run_id == "bad" and not self.snapshot.finished and self.snapshot.status.value != "compensating":
            calls.append(self.run_id)
            if len(calls) <= 3:
                raise IndexError("a cursor no step has")  # stands in for a state no step can take
        return await real(self, host, budget)

    monkeypatch.setattr(RunActor, "turn", turn)
    async with Runtime([WF]) as rt:
        good = await rt.spawn(WF, 0, run_id="good")
        bad = await rt.spawn(WF, 0, run_id="bad")
        with anyio.fail_after(5):
            assert await good.wait_finished() == 2
            with pytest.raises(RunFailedError):
                await bad.wait_finished()
        assert len(calls) <= 4  # three failing turns, then the fail: no spin
        assert rt.statistics().internal_errors == 3


def test_decoded_pending_signals_are_a_signals_counting_in_constant_time() -> None:
    from hotstate.actors import Snapshot, Status

    codec = MsgpackCodec()
    snap = Snapshot("r", "w", 1, 2, 1, Status.waiting, 0, None, 1.0, signals=(("go", 1), ("go", 2)))
    back = decode_snapshot(encode_snapshot(snap, codec), codec, tier="t")
    assert type(back.signals) is Signals
    assert back.signals == (("go", 1), ("go", 2))
    assert back.signals.count_of("go") == 2
