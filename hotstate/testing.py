"""Public helpers for testing code that uses hotstate.

``ManualClock`` is to hotstate what ``trio.testing.MockClock`` is to trio: time
moves only when the test says so, so backoff, timeouts and flush intervals are
tested without sleeping.
"""

from __future__ import annotations

import heapq
import itertools
from typing import TYPE_CHECKING, final

import anyio
import anyio.lowlevel

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["ManualClock", "checkpoint_until"]


@final
class ManualClock:
    """A clock that only moves when ``advance`` is called.

    Args:
        start: the initial monotonic time.
        wall_start: the wall-clock time that corresponds to ``start``.
    """

    def __init__(self, start: float = 0.0, *, wall_start: float = 1_700_000_000.0) -> None:
        self._now = start
        self._wall_offset = wall_start - start
        self._sleepers: list[tuple[float, int, anyio.Event]] = []
        self._seq = itertools.count()

    def now(self) -> float:
        """Return the current manual time."""
        return self._now

    def wall(self) -> float:
        """Return the wall-clock time matching the manual time."""
        return self._now + self._wall_offset

    @property
    def sleepers(self) -> int:
        """How many tasks are sleeping on this clock right now."""
        return sum(1 for _, _, event in self._sleepers if not event.is_set())

    def next_deadline(self) -> float | None:
        """Return the earliest deadline anyone sleeps until, or None."""
        live = [d for d, _, e in self._sleepers if not e.is_set()]
        return min(live) if live else None

    async def sleep_until(self, deadline: float) -> None:
        """Sleep until ``advance`` moves time to ``deadline`` or beyond."""
        if deadline <= self._now:
            await anyio.lowlevel.checkpoint()
            return
        event = anyio.Event()
        entry = (deadline, next(self._seq), event)
        heapq.heappush(self._sleepers, entry)
        try:
            await event.wait()
        finally:
            if not event.is_set():  # cancelled: nobody sleeps on this entry any more
                self._sleepers.remove(entry)
                heapq.heapify(self._sleepers)

    async def advance(self, seconds: float) -> None:
        """Move time forward, wake every sleeper now due, and let them run.

        Args:
            seconds: how far to move; must not be negative.

        Raises:
            ValueError: if ``seconds`` is negative.
        """
        if seconds < 0:
            raise ValueError(f"seconds={seconds!r}: time cannot go backwards")
        self._now += seconds
        while self._sleepers and self._sleepers[0][0] <= self._now:
            heapq.heappop(self._sleepers)[2].set()
        # Let woken tasks, and what they wake in turn, run before returning.
        for _ in range(20):
            await anyio.lowlevel.checkpoint()


async def checkpoint_until(condition: Callable[[], bool], *, checkpoints: int = 5_000) -> None:
    """Let other tasks run, one checkpoint at a time (no time passes), until ``condition()`` holds.

    Args:
        condition: checked before each checkpoint.
        checkpoints: how many checkpoints to allow before giving up.

    Raises:
        AssertionError: the condition still fails after ``checkpoints`` checkpoints.
    """
    with anyio.fail_after(5):  # a hang guard only: the loop is bounded by checkpoints
        for _ in range(checkpoints):
            if condition():
                return
            await anyio.lowlevel.checkpoint()
    raise AssertionError(f"condition still false after {checkpoints} checkpoints")
