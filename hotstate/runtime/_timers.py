"""One timer task for every deadline the runtime schedules (backoff waits, step timeouts).

The supervisor never sleeps: it schedules a deadline here (STYLE.md E.17), and
this service sleeps on the injectable ``Clock`` until the earliest one is due.
"""

from __future__ import annotations

import heapq
import itertools
import logging
from typing import TYPE_CHECKING, final

import anyio

if TYPE_CHECKING:
    from collections.abc import Callable

    from anyio.abc import TaskStatus

    from hotstate._clock import Clock

__all__ = ["TimerService"]

log = logging.getLogger("hotstate.timers")


@final
class TimerHandle:
    """A scheduled callback; ``cancel()`` stops it from running."""

    __slots__ = ("callback", "cancelled", "deadline")

    def __init__(self, deadline: float, callback: Callable[[], None]) -> None:
        self.deadline = deadline
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        """Do not run the callback."""
        self.cancelled = True


@final
class TimerService:
    """A heap of deadlines served by one task sleeping on a Clock.

    Args:
        clock: the clock whose ``now``/``sleep_until`` define time.
    """

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._heap: list[tuple[float, int, TimerHandle]] = []
        self._seq = itertools.count()
        self._wake: anyio.CancelScope | None = None
        self._sleeping_until = float("inf")
        self.errors = 0

    def __len__(self) -> int:
        return sum(1 for _, _, h in self._heap if not h.cancelled)

    def call_later(self, delay: float, callback: Callable[[], None]) -> TimerHandle:
        """Run ``callback`` once ``delay`` seconds have passed on the clock.

        Args:
            delay: seconds from now.
            callback: a plain function; it must not block.

        Returns:
            A handle whose ``cancel()`` stops it.
        """
        handle = TimerHandle(self._clock.now() + max(0.0, delay), callback)
        heapq.heappush(self._heap, (handle.deadline, next(self._seq), handle))
        if handle.deadline < self._sleeping_until and self._wake is not None:
            self._wake.cancel()
        return handle

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve deadlines until cancelled."""
        task_status.started()
        heap = self._heap
        while True:
            now = self._clock.now()
            while heap and (heap[0][2].cancelled or heap[0][0] <= now):
                _, _, handle = heapq.heappop(heap)
                if not handle.cancelled:
                    self._fire(handle)
            deadline = heap[0][0] if heap else float("inf")
            with anyio.CancelScope() as scope:
                self._wake = scope
                self._sleeping_until = deadline
                if deadline == float("inf"):
                    await anyio.sleep_forever()
                else:
                    await self._clock.sleep_until(deadline)
            self._wake = None
            self._sleeping_until = float("inf")

    def _fire(self, handle: TimerHandle) -> None:
        try:
            handle.callback()
        except Exception:
            self.errors += 1
            log.exception("hotstate timer callback failed")
