"""``RuntimeStatistics``: the runtime's figures, read with ``Runtime.statistics()``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Mapping

    from hotstate.persistence import PersisterStatistics
    from hotstate.runtime._ownership import ShardMap
    from hotstate.runtime._supervisor import SupervisorStatistics

__all__ = ["RuntimeStatistics"]


@dataclass(frozen=True, slots=True, kw_only=True)
class RuntimeStatistics:
    """Figures of a runtime, read with ``Runtime.statistics()``.

    Attributes:
        runs: runs held in memory.
        by_status: how many runs are in each status.
        transitions: transitions committed since start.
        ready: runs waiting in the ready queue.
        tasks: scheduler and step-hosting tasks alive.
        timers: scheduled deadlines (backoffs, timeouts).
        subscribers: live subscriptions.
        subscriber_overflows: subscribers cut off for falling behind.
        internal_errors: crashes in hotstate's own machinery (each logged).
        supervisor: the supervisor's figures.
        tiers: each persistence tier's figures.
        throttle_waits: times a run was parked by backpressure.
        published: transitions delivered to the event bus (0 while nobody subscribes).
        ownership: the shard map as this process sees it (None: ownership is off).
    """

    runs: int
    by_status: Mapping[str, int]
    transitions: int
    ready: int
    tasks: int
    timers: int
    subscribers: int
    subscriber_overflows: int
    internal_errors: int
    supervisor: SupervisorStatistics
    tiers: tuple[PersisterStatistics, ...] = ()
    throttle_waits: int = 0
    published: int = 0
    ownership: ShardMap | None = None
