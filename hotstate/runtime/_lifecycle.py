"""``Lifecycle``: a runtime's start-up and shut-down, in named phases on one ``AsyncExitStack``.

Start-up opens the tiers' stores, enters the task group, starts the timer
service and every tier's flush loop in it, lets the scheduler serve, then
(optionally) recovers. Each phase pushes its own teardown, so teardown is the
reverse of start-up (OTP's rule) and a failed start-up undoes exactly what
started. Shut-down is graceful first: drain the steps in flight, flush every
tier (shielded, with a deadline), release subscribers and waiters; then the
stack cancels the task group and closes the stores.
"""

from __future__ import annotations

import logging
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Literal, final

import anyio

from hotstate._errors import PersistenceError, RuntimeClosedError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from types import TracebackType

    from hotstate.persistence._tiers import Tiers
    from hotstate.runtime._events import EventBus
    from hotstate.runtime._scheduler import Scheduler
    from hotstate.runtime._timers import TimerService

__all__ = ["Lifecycle", "State"]

log = logging.getLogger("hotstate.runtime")

State = Literal["new", "open", "closing", "closed"]


@final
class Lifecycle:
    """Starts a runtime's parts in order and stops them in reverse.

    Args:
        tiers: the persistence tiers.
        timers: the timer service.
        scheduler: the scheduler.
        bus: the event bus.
        shutdown_timeout: seconds in-flight steps get to finish at shutdown.
        flush_timeout: seconds the final flush at shutdown may take.
    """

    def __init__(
        self,
        tiers: Tiers,
        timers: TimerService,
        scheduler: Scheduler,
        bus: EventBus,
        *,
        shutdown_timeout: float,
        flush_timeout: float,
    ) -> None:
        self._tiers = tiers
        self._timers = timers
        self._scheduler = scheduler
        self._bus = bus
        self._shutdown_timeout = shutdown_timeout
        self._flush_timeout = flush_timeout
        self._stack: AsyncExitStack | None = None
        self.state: State = "new"
        self.closing: Callable[[], None] | None = None  # told first when shutdown starts
        self.after_flush: Callable[[], Awaitable[None]] | None = None  # run, shielded, after the final flush

    async def start(self, recover: Callable[[], Awaitable[None]] | None = None) -> None:
        """Start every part, then run ``recover`` (the runtime is open while it runs).

        Raises:
            RuntimeClosedError: started before.
            BaseException: whatever a phase raised; what had started is stopped again.
        """
        if self.state != "new":
            raise RuntimeClosedError("a Runtime can be entered only once")
        stack = AsyncExitStack()
        try:
            await self._start(stack)
            if recover is not None:
                await recover()
        except BaseException:
            self.state = "closed"
            await stack.aclose()
            raise
        self._stack = stack

    async def _start(self, stack: AsyncExitStack) -> None:
        """The start-up phases; each pushes its teardown onto ``stack``.

        1. the tiers' stores open (closed last, shielded);
        2. the task group (cancelled, then awaited, at teardown);
        3. the timer service and every tier's flush loop, in that group;
        4. the scheduler serves the ready queue.
        """
        stack.push_async_callback(self._close_tiers)
        await self._tiers.open()
        tg = await stack.enter_async_context(anyio.create_task_group())
        stack.callback(tg.cancel_scope.cancel)
        await tg.start(self._timers.run)
        await self._tiers.run_loops(tg)
        self._scheduler.start(tg)
        self.state = "open"

    async def _close_tiers(self) -> None:
        with anyio.CancelScope(shield=True):
            await self._tiers.aclose()

    async def stop(
        self,
        exc_type: type[BaseException] | None = None,
        exc: BaseException | None = None,
        tb: TracebackType | None = None,
    ) -> bool | None:
        """Shut down gracefully, then unwind the start-up phases in reverse.

        Returns:
            What the task group's exit returns for the exception being handled.
        """
        if self.state == "new":
            self.state = "closed"
            return None
        await self._shutdown()
        self.state = "closed"
        stack, self._stack = self._stack, None
        if stack is None:
            return None
        return await stack.__aexit__(exc_type, exc, tb)

    async def _shutdown(self) -> None:
        """The graceful phases: drain the steps in flight, flush every tier, release subscribers and waiters."""
        if self.state != "open":
            return
        self.state = "closing"
        if self.closing is not None:
            self.closing()
        left = await self._scheduler.drain(self._shutdown_timeout)
        if left:
            log.warning(
                "hotstate: %d step(s) still running after %.3g s; cancelling them", left, self._shutdown_timeout
            )
        await self._final_flush()
        if self.after_flush is not None:
            with anyio.CancelScope(shield=True):
                await self.after_flush()
        self._bus.close_all()
        self._scheduler.wake_waiters()  # wait_finished callers raise RuntimeClosedError

    async def _final_flush(self) -> None:
        """Flush every tier: shielded, so it always tries, with a deadline, so it never hangs."""
        # The loops finish (never abandon) a flush in progress and exit, so the
        # task-group cancellation that follows interrupts no write.
        self._tiers.stop_loops()
        with anyio.move_on_after(self._flush_timeout, shield=True) as scope:
            try:
                await self._tiers.flush()
            except PersistenceError as exc:
                log.error("hotstate: final flush failed; unflushed state is lost with this process: %s", exc)
        if scope.cancelled_caught:
            log.error("hotstate: final flush did not finish within %.3g s", self._flush_timeout)
