"""Time sources: the ``Clock`` protocol and the default ``SystemClock``.

Every wait the runtime schedules (backoff, step timeouts, flush intervals) goes
through a Clock, so tests can drive time by hand (``hotstate.testing.ManualClock``).
"""

from __future__ import annotations

import time
from typing import Protocol, final, runtime_checkable

import anyio


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
