"""The ``EventBus``: publishes transitions to subscribers (the "EventBus" box of the map in docs/architecture.md).

Publishing never waits. Each subscription has a bounded buffer; a subscriber
that falls ``maxsize`` transitions behind is cut off with
``SubscriberOverflowError`` instead of slowing the runtime down.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, final

import anyio

from hotstate._errors import SubscriberOverflowError
from hotstate._validate import integer

if TYPE_CHECKING:
    from hotstate.actors import Transition

__all__ = ["EventBus", "Subscription"]


@final
class Subscription(AsyncIterator["Transition"]):
    """An async iterator of transitions. Close it with ``aclose()`` or ``async with``.

    Raises:
        SubscriberOverflowError: from ``__anext__`` once the buffered
            transitions have been read, if the subscriber fell behind.
    """

    __slots__ = ("_buffer", "_bus", "_closed", "_event", "_overflowed", "maxsize", "run_id", "workflow")

    def __init__(self, bus: EventBus, run_id: str | None, workflow: str | None, maxsize: int) -> None:
        self._bus = bus
        self.run_id = run_id
        self.workflow = workflow
        self.maxsize = maxsize
        self._buffer: deque[Transition] = deque()
        self._event: anyio.Event | None = None
        self._closed = False
        self._overflowed = False

    def _push(self, transition: Transition) -> bool:
        """Buffer one transition; False when this subscriber must be cut off."""
        if len(self._buffer) >= self.maxsize:
            self._overflowed = True
            self._wake()
            return False
        self._buffer.append(transition)
        self._wake()
        return True

    def _wake(self) -> None:
        if self._event is not None:
            self._event.set()
            self._event = None

    def _end(self) -> None:
        self._closed = True
        self._wake()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Transition:
        while True:
            if self._buffer:
                return self._buffer.popleft()
            if self._overflowed:
                raise SubscriberOverflowError(self.maxsize)
            if self._closed:
                raise StopAsyncIteration
            self._event = event = anyio.Event()
            await event.wait()

    def get_nowait(self) -> Transition | None:
        """Return the next buffered transition, or None when none is buffered.

        Returns:
            The transition or None.

        Raises:
            SubscriberOverflowError: the subscriber fell behind and was cut off.
        """
        if self._buffer:
            return self._buffer.popleft()
        if self._overflowed:
            raise SubscriberOverflowError(self.maxsize)
        return None

    async def aclose(self) -> None:
        """Stop receiving; iteration ends after the buffered transitions."""
        self._bus._remove(self)
        self._end()

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


@final
class EventBus:
    """Routes each transition to the subscribers of its run, its workflow, or all."""

    def __init__(self) -> None:
        self._all: set[Subscription] = set()
        self._by_run: dict[str, set[Subscription]] = {}
        self._by_workflow: dict[str, set[Subscription]] = {}
        self.count = 0  # live subscriptions; the hot path checks it before publishing
        self.overflows = 0
        self.published = 0

    def subscribe(self, *, run_id: str | None = None, workflow: str | None = None, maxsize: int = 1000) -> Subscription:
        """Open a subscription filtered by run and/or workflow.

        Args:
            run_id: only this run's transitions.
            workflow: only this workflow's transitions.
            maxsize: buffer bound; a subscriber further behind is cut off.

        Returns:
            The subscription.

        Raises:
            ConfigError: ``maxsize`` is below 1.
        """
        integer("subscribe.maxsize", maxsize, minimum=1)
        sub = Subscription(self, run_id, workflow, maxsize)
        if run_id is not None:
            self._by_run.setdefault(run_id, set()).add(sub)
        elif workflow is not None:
            self._by_workflow.setdefault(workflow, set()).add(sub)
        else:
            self._all.add(sub)
        self.count += 1
        return sub

    def publish(self, transition: Transition, workflow: str) -> None:
        """Deliver ``transition`` to every matching subscriber, never waiting."""
        self.published += 1
        targets: list[Subscription] = []
        if self._all:
            targets.extend(self._all)
        subs = self._by_run.get(transition.run_id)
        if subs:
            targets.extend(s for s in subs if s.workflow is None or s.workflow == workflow)
        subs = self._by_workflow.get(workflow)
        if subs:
            targets.extend(subs)
        for sub in targets:
            if not sub._push(transition):
                self.overflows += 1
                self._remove(sub)

    def close_all(self) -> None:
        """End every subscription (at runtime shutdown)."""
        for sub in [
            *self._all,
            *(s for v in self._by_run.values() for s in v),
            *(s for v in self._by_workflow.values() for s in v),
        ]:
            sub._end()
        self._all.clear()
        self._by_run.clear()
        self._by_workflow.clear()
        self.count = 0

    def _remove(self, sub: Subscription) -> None:
        if sub.run_id is not None:
            group = self._by_run.get(sub.run_id)
        elif sub.workflow is not None:
            group = self._by_workflow.get(sub.workflow)
        else:
            group = self._all
        if group is not None and sub in group:
            group.discard(sub)
            self.count -= 1
            if not group and group is not self._all:
                key = sub.run_id if sub.run_id is not None else sub.workflow
                (self._by_run if sub.run_id is not None else self._by_workflow).pop(key or "", None)
