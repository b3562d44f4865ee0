"""Where the runtime meets its persisters: write-through gates, backpressure, codec failures.

Runs that must not advance yet (their snapshot is not durable in a
write-through tier, or a tier passed its memory bound) are parked: they hold no
task and sit in a persister's ``waiting`` map or the throttled list, and are
rescheduled when the flush that unblocks them is acknowledged.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, final

import anyio

from hotstate.actors._actor import MSG_FAIL

if TYPE_CHECKING:
    from collections.abc import Callable

    from hotstate._errors import CodecError
    from hotstate.actors import RunActor
    from hotstate.persistence import Persistence

__all__ = ["Durability"]

log = logging.getLogger("hotstate.runtime")


@final
class Durability:
    """The runtime's view of its tiers.

    Args:
        persistence: the tiers.
        schedule: puts an actor back in the ready queue.
        lookup: finds an actor by run id (None when it is gone).
        on_hold: told the new value of ``hold`` whenever it changes.
    """

    def __init__(
        self,
        persistence: Persistence,
        schedule: Callable[[RunActor], None],
        lookup: Callable[[str], RunActor | None],
        on_hold: Callable[[bool], None],
    ) -> None:
        self.persistence = persistence
        self._on_hold = on_hold
        self._schedule = schedule
        self._lookup = lookup
        self._through = persistence.write_through
        self._pressured: set[str] = set()
        self._throttled: list[RunActor] = []
        self.gate: anyio.Event | None = None  # spawn waits on it under backpressure
        self.throttle_waits = 0
        for p in persistence.persisters:
            p.on_durable = self._on_durable
            p.on_codec_error = self._on_codec_error
            p.on_pressure = self._pressure_callback(p.name)

    @property
    def hold(self) -> bool:
        """True when a run may have to wait before its next step."""
        return bool(self._through) or bool(self._pressured)

    def must_wait(self, actor: RunActor, version: int) -> bool:
        """Park ``actor`` if it may not advance past ``version`` yet.

        Returns:
            True when parked (it will be rescheduled), False to go on.
        """
        if self._pressured:
            self.throttle_waits += 1
            self._throttled.append(actor)
            return True
        run_id = actor.snapshot.run_id
        for p in self._through:
            if p.durable.get(run_id, 0) < version:
                p.notify_when_durable(run_id, actor)
                return True
        return False

    def _on_durable(self, item: Any) -> None:
        self._schedule(item)

    def _on_codec_error(self, run_id: str, exc: CodecError) -> None:
        actor = self._lookup(run_id)
        if actor is None or actor.snapshot.finished:
            return
        actor.post(MSG_FAIL, "its payload cannot be persisted", exc)
        self._schedule(actor)

    def _pressure_callback(self, tier: str) -> Callable[[bool], None]:
        def on_pressure(on: bool) -> None:
            if on:
                if not self._pressured:
                    log.warning("hotstate: tier %r passed its memory bound; steps wait until it drains", tier)
                self._pressured.add(tier)
                self._on_hold(self.hold)
                return
            self._pressured.discard(tier)
            self._on_hold(self.hold)
            if not self._pressured:
                throttled, self._throttled = self._throttled, []
                for actor in throttled:
                    self._schedule(actor)
                if self.gate is not None:
                    self.gate.set()
                    self.gate = None

        return on_pressure

    async def wait_gate(self) -> None:
        """Wait while any tier is over its memory bound (spawn's backpressure)."""
        while self._pressured:
            if self.gate is None:
                self.gate = anyio.Event()
            await self.gate.wait()
