"""What a run is: snapshots, transitions, workflow definitions, step context and dead letters.

This layer imports neither ``hotstate.runtime`` nor ``hotstate.persistence``.
"""

from __future__ import annotations

from hotstate.actors._context import Finish, StepContext
from hotstate.actors._snapshot import (
    TERMINAL_STATUSES,
    DeadLetter,
    ErrorInfo,
    Snapshot,
    Status,
    Transition,
    TransitionKind,
)
from hotstate.actors._workflow import (
    Compensation,
    RetryPolicy,
    Step,
    StepFn,
    Workflow,
)

__all__ = [
    "TERMINAL_STATUSES",
    "Compensation",
    "DeadLetter",
    "ErrorInfo",
    "Finish",
    "RetryPolicy",
    "Snapshot",
    "Status",
    "Step",
    "StepContext",
    "StepFn",
    "Transition",
    "TransitionKind",
    "Workflow",
]
