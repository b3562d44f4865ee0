# mypy: allow-untyped-defs
"""``TimerService`` on a ManualClock: deadline order, cancel, early wake, isolated failures."""

from __future__ import annotations

import functools
import logging
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import anyio
import pytest

from hotstate.runtime._timers import TimerService

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from hotstate.testing import ManualClock


@asynccontextmanager
async def serving(clock: ManualClock) -> AsyncIterator[TimerService]:
    service = TimerService(clock)
    with anyio.fail_after(5):  # hang guard only
        async with anyio.create_task_group() as tg:
            await tg.start(service.run)
            yield service
            tg.cancel_scope.cancel()


async def test_callbacks_fire_in_deadline_order(clock):
    fired: list[str] = []
    async with serving(clock) as timers:
        timers.call_later(3.0, lambda: fired.append("c"))
        timers.call_later(1.0, lambda: fired.append("a"))
        timers.call_later(2.0, lambda: fired.append("b"))
        timers.call_later(2.0, lambda: fired.append("b2"))  # same deadline: order of scheduling
        await clock.advance(5.0)
    assert fired == ["a", "b", "b2", "c"]


async def test_callbacks_fire_only_once_their_deadline_is_reached(clock):
    fired: list[float] = []
    async with serving(clock) as timers:
        for delay in (1.0, 2.0, 3.0):
            timers.call_later(delay, functools.partial(fired.append, delay))
        assert len(timers) == 3
        await clock.advance(0.999)
        assert fired == []
        await clock.advance(0.001)
        assert fired == [1.0]
        await clock.advance(1.5)
        assert fired == [1.0, 2.0]
        assert len(timers) == 1
        await clock.advance(0.5)
        assert fired == [1.0, 2.0, 3.0]
        assert len(timers) == 0


async def test_a_cancelled_timer_never_fires(clock):
    fired: list[str] = []
    async with serving(clock) as timers:
        handle = timers.call_later(1.0, lambda: fired.append("cancelled"))
        timers.call_later(2.0, lambda: fired.append("kept"))
        handle.cancel()
        assert len(timers) == 1
        await clock.advance(3.0)
    assert fired == ["kept"]


async def test_cancelling_the_earliest_timer_while_sleeping_on_it_skips_it(clock):
    fired: list[str] = []
    async with serving(clock) as timers:
        first = timers.call_later(1.0, lambda: fired.append("first"))
        timers.call_later(1.5, lambda: fired.append("second"))
        await clock.advance(0.5)
        first.cancel()
        await clock.advance(0.6)
        assert fired == []
        await clock.advance(0.4)
        assert fired == ["second"]


async def test_an_earlier_deadline_added_while_sleeping_wakes_the_service(clock):
    fired: list[str] = []
    async with serving(clock) as timers:
        timers.call_later(10.0, lambda: fired.append("late"))
        await clock.advance(0)  # the service now sleeps until 10
        assert clock.next_deadline() == 10.0
        timers.call_later(1.0, lambda: fired.append("early"))
        await clock.advance(1.0)
        assert fired == ["early"]
        await clock.advance(9.0)
        assert fired == ["early", "late"]


async def test_a_timer_added_with_nothing_scheduled_wakes_the_idle_service(clock):
    fired: list[str] = []
    async with serving(clock) as timers:
        await clock.advance(0)
        assert clock.sleepers == 0  # nothing due: it waits without a deadline
        timers.call_later(2.0, lambda: fired.append("x"))
        await clock.advance(2.0)
        assert fired == ["x"]


async def test_zero_and_negative_delays_fire_on_the_next_pass(clock):
    fired: list[str] = []
    async with serving(clock) as timers:
        timers.call_later(0.0, lambda: fired.append("zero"))
        timers.call_later(-5.0, lambda: fired.append("negative"))
        await clock.advance(0)
        assert sorted(fired) == ["negative", "zero"]


async def test_a_raising_callback_is_counted_logged_and_does_not_stop_other_timers(clock, caplog):
    fired: list[str] = []

    def boom() -> None:
        raise RuntimeError("callback bug")

    with caplog.at_level(logging.ERROR, logger="hotstate.timers"):
        async with serving(clock) as timers:
            timers.call_later(1.0, lambda: fired.append("before"))
            timers.call_later(1.0, boom)
            timers.call_later(1.0, lambda: fired.append("same deadline"))
            timers.call_later(2.0, lambda: fired.append("later"))
            await clock.advance(1.0)
            assert timers.errors == 1
            await clock.advance(1.0)
            timers.call_later(1.0, boom)
            await clock.advance(1.0)
            assert timers.errors == 2
    assert fired == ["before", "same deadline", "later"]
    records = [r for r in caplog.records if r.name == "hotstate.timers"]
    assert len(records) == 2
    assert all(r.exc_info is not None and "callback bug" in str(r.exc_info[1]) for r in records)


@pytest.mark.parametrize("count", [1, 10, 200])
async def test_many_timers_fire_in_order(clock, rng, count):
    fired: list[float] = []
    delays = [rng.uniform(0, 100) for _ in range(count)]
    async with serving(clock) as timers:
        for d in delays:
            timers.call_later(d, functools.partial(fired.append, d))
        await clock.advance(100.0)
    assert fired == sorted(delays)
