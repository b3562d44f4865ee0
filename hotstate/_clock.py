"""Time sources: the ``Clock`` protocol and the default ``SystemClock``.

Every wait the runtime schedules (backoff, step timeouts, flush intervals) goes
through a Clock, so tests can drive time by hand (``hotstate.testing.ManualClock``).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Protocol, TypeVar, final, runtime_checkable

import anyio

if TYPE_CHECKING:
    from collections.abc import Awaitable

T = TypeVar("T")


@runtime_checkable
class Clock(Protocol):
    """Monotonic time for deadlines, plus the wall clock used for timestamps."""

    def now(self) -> float:
        """Return the monotonic time in seconds."""
        ...

    def wall(self) -> float:
        """Return wall-clock time in seconds since the epoch (for ``updated_at``)."""
        ...

    async def sleep_until(self, deadline: float) -> None:
        """Sleep until ``now() >= deadline``; cancellable."""
        ...


@final
class SystemClock:
    """The real clock: the event loop's monotonic time and ``time.time()``."""

    __slots__ = ()

    def now(self) -> float:
        """Return the event loop's monotonic time in seconds."""
        return time.monotonic()

    # A plain alias keeps the per-step stamp to one C call.
    wall = staticmethod(time.time)

    async def sleep_until(self, deadline: float) -> None:
        """Sleep until the monotonic clock reaches ``deadline``."""
        await anyio.sleep(max(0.0, deadline - time.monotonic()))


async def within(clock: Clock, seconds: float, work: Awaitable[T]) -> tuple[bool, T | None]:
    """``(True, await work)``, or ``(False, None)`` once ``seconds`` pass on ``clock`` (not the loop's).

    ``SystemClock`` is the event loop's clock, so the bound is a deadline on a
    cancel scope with no watchdog task (10,000 tier lookups: 1.7 s with a
    watchdog task each, see tests/integration/test_bad_input_at_scale.py); any
    other clock (a ``ManualClock`` in tests) gets a watchdog task sleeping on it.
    What ``work`` raises propagates as itself, never wrapped in an ExceptionGroup.
    """
    if type(clock) is SystemClock:
        with anyio.move_on_after(seconds):
            return True, await work
        return False, None
    deadline = clock.now() + seconds  # now, not when the watchdog task first runs
    result: tuple[bool, T | None] = (False, None)
    failure: BaseException | None = None
    async with anyio.create_task_group() as tg:

        async def watchdog() -> None:
            await clock.sleep_until(deadline)
            tg.cancel_scope.cancel()

        tg.start_soon(watchdog)
        try:
            result = (True, await work)
        except Exception as exc:  # noqa: BLE001 - re-raised below, outside the task group
            failure = exc
        tg.cancel_scope.cancel()
    if failure is not None:
        raise failure
    return result
