# mypy: allow-untyped-defs
"""``hotstate.testing.ManualClock``: time moves only when the test says so."""

from __future__ import annotations

import anyio
import pytest

from hotstate import Clock
from hotstate.testing import ManualClock


def test_manual_clock_satisfies_the_clock_protocol():
    assert isinstance(ManualClock(), Clock)


def test_manual_clock_starts_where_told_and_maps_wall_time():
    clock = ManualClock(10.0, wall_start=1_000.0)
    assert clock.now() == 10.0
    assert clock.wall() == 1_000.0


async def test_advance_moves_monotonic_and_wall_time_together():
    clock = ManualClock(wall_start=500.0)
    await clock.advance(2.5)
    assert clock.now() == 2.5
    assert clock.wall() == 502.5


async def test_advance_wakes_due_sleepers_only():
    clock = ManualClock()
    woke: list[float] = []

    async def sleeper(deadline: float) -> None:
        await clock.sleep_until(deadline)
        woke.append(deadline)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for deadline in (3.0, 1.0, 2.0, 5.0):
                tg.start_soon(sleeper, deadline)
            await clock.advance(0)
            assert clock.sleepers == 4
            assert clock.next_deadline() == 1.0
            await clock.advance(0.5)
            assert woke == []
            await clock.advance(1.5)  # now 2.0: the 1.0 and 2.0 sleepers are due
            assert sorted(woke) == [1.0, 2.0]
            assert clock.sleepers == 2
            assert clock.next_deadline() == 3.0
            await clock.advance(0.999)
            assert sorted(woke) == [1.0, 2.0]
            await clock.advance(10)
            assert sorted(woke) == [1.0, 2.0, 3.0, 5.0]
    assert clock.sleepers == 0
    assert clock.next_deadline() is None


async def test_sleeping_until_a_past_deadline_returns_at_once():
    clock = ManualClock(5.0)
    with anyio.fail_after(5):
        await clock.sleep_until(5.0)
        await clock.sleep_until(1.0)
    assert clock.sleepers == 0


async def test_advance_lets_woken_tasks_run_before_it_returns():
    clock = ManualClock()
    chain: list[str] = []
    second = anyio.Event()

    async def first() -> None:
        await clock.sleep_until(1.0)
        chain.append("first")
        second.set()

    async def then() -> None:
        await second.wait()
        chain.append("second")

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(first)
            tg.start_soon(then)
            await clock.advance(0)
            await clock.advance(1.0)
            assert chain == ["first", "second"]


async def test_a_cancelled_sleeper_no_longer_counts():
    clock = ManualClock()
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(clock.sleep_until, 4.0)
            await clock.advance(0)
            assert clock.sleepers == 1
            tg.cancel_scope.cancel()
    # The cancelled sleep_until must not leave a phantom sleeper behind.
    assert clock.sleepers == 0
    assert clock.next_deadline() is None
    await clock.advance(5)
    assert clock.now() == 5.0


@pytest.mark.parametrize("seconds", [-1, -0.001, float("-inf")])
async def test_negative_advance_raises_and_does_not_move_time(seconds):
    clock = ManualClock(3.0)
    with pytest.raises(ValueError, match="backwards"):
        await clock.advance(seconds)
    assert clock.now() == 3.0
