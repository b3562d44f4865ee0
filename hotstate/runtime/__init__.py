"""What runs workflows: the ``Runtime``, run handles, recovery reports and statistics."""

from __future__ import annotations

from hotstate.actors import DeadLetter
from hotstate.runtime._backoff import RestartIntensity
from hotstate.runtime._events import Subscription
from hotstate.runtime._handle import RunHandle
from hotstate.runtime._loop import run
from hotstate.runtime._ownership import Location, Ownership, ShardMap
from hotstate.runtime._recovery import CorruptCopy, RecoveredRun, RecoveryReport
from hotstate.runtime._registry import ListedRun
from hotstate.runtime._runtime import Runtime
from hotstate.runtime._statistics import RuntimeStatistics
from hotstate.runtime._supervisor import SupervisorStatistics

__all__ = [
    "CorruptCopy",
    "DeadLetter",
    "ListedRun",
    "Location",
    "Ownership",
    "RecoveredRun",
    "RecoveryReport",
    "RestartIntensity",
    "RunHandle",
    "Runtime",
    "RuntimeStatistics",
    "ShardMap",
    "Subscription",
    "SupervisorStatistics",
    "run",
]
