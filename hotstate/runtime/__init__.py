"""What runs workflows: the ``Runtime``, its supervisor, event bus, timers and queries."""

from __future__ import annotations

from hotstate.actors import DeadLetter
from hotstate.runtime._backoff import RestartIntensity, RestartWindow, backoff_delay
from hotstate.runtime._events import EventBus, Subscription
from hotstate.runtime._handle import RunHandle
from hotstate.runtime._loop import run, uvloop_available
from hotstate.runtime._recovery import CorruptCopy, RecoveredRun, RecoveryReport
from hotstate.runtime._runtime import Runtime
from hotstate.runtime._statistics import RuntimeStatistics
from hotstate.runtime._supervisor import Supervisor, SupervisorStatistics
from hotstate.runtime._timers import TimerHandle, TimerService

__all__ = [
    "CorruptCopy",
    "DeadLetter",
    "EventBus",
    "RecoveredRun",
    "RecoveryReport",
    "RestartIntensity",
    "RestartWindow",
    "RunHandle",
    "Runtime",
    "RuntimeStatistics",
    "Subscription",
    "Supervisor",
    "SupervisorStatistics",
    "TimerHandle",
    "TimerService",
    "backoff_delay",
    "run",
    "uvloop_available",
]
