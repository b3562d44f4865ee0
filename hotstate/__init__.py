"""hotstate: an asyncio actor runtime for multi-step workflows.

The map (docs/architecture.md has it whole)::

    spawn/send --> Runtime --> Scheduler --> RunActor.turn (one actor per run: mailbox + Snapshot)
                     |            |  runs a step inline, makes the next Snapshot + Transition
                     |            +--> Tiers.mark --> one Persister per tier: O(1) mark, flush loop
                     |            +--> EventBus: publish(transition) -> subscribers
                     |            +--> Instrument hooks (only those someone overrides)
                     +-- Supervisor: retry with backoff from the latest snapshot,
                     |               or give up -> compensate (saga) -> failed -> dead letter
                     +-- Adoption: recovery at start, spawn of an id only a tier knows

- ``hotstate.actors``: what a run is (Snapshot, Transition, Workflow, Step, StepContext, DeadLetter).
- ``hotstate.runtime``: what runs them (Runtime, RunHandle, recovery report, statistics).
- ``hotstate.persistence``: what keeps them (stores, codecs, flush policies and tiers).

The names most code needs are re-exported here.
"""

from __future__ import annotations

import logging

from hotstate._clock import Clock, SystemClock
from hotstate._errors import (
    CodecError,
    ConfigError,
    CorruptSnapshotError,
    CrashLoopError,
    DurabilityTimeoutError,
    HotstateError,
    HotstateInternalError,
    NotOwnerError,
    OwnershipLostError,
    PersistenceError,
    RunCancelledError,
    RunConflictError,
    RunError,
    RunFailedError,
    RunFinishedError,
    RunNotFoundError,
    RunRejectedError,
    RuntimeClosedError,
    SignalQueueFullError,
    StaleVersionError,
    StepResultError,
    StepTimeoutError,
    StoreUnavailableError,
    SubscriberOverflowError,
    UnknownSignalError,
    ValkeyServerError,
    WorkflowNotRegisteredError,
)
from hotstate._instrument import Instrument
from hotstate.actors import (
    ErrorInfo,
    Finish,
    RetryPolicy,
    Snapshot,
    Status,
    Step,
    StepContext,
    Transition,
    TransitionKind,
    Workflow,
)
from hotstate.persistence import FlushPolicy, JsonCodec, MsgpackCodec, PickleCodec, Tier
from hotstate.runtime import (
    DeadLetter,
    Ownership,
    RecoveryReport,
    RestartIntensity,
    RunHandle,
    Runtime,
    RuntimeStatistics,
    SupervisorStatistics,
    run,
)

__version__ = "0.1.0"

__all__ = [
    "Clock",
    "CodecError",
    "ConfigError",
    "CorruptSnapshotError",
    "CrashLoopError",
    "DeadLetter",
    "DurabilityTimeoutError",
    "ErrorInfo",
    "Finish",
    "FlushPolicy",
    "HotstateError",
    "HotstateInternalError",
    "Instrument",
    "JsonCodec",
    "MsgpackCodec",
    "NotOwnerError",
    "Ownership",
    "OwnershipLostError",
    "PersistenceError",
    "PickleCodec",
    "RecoveryReport",
    "RestartIntensity",
    "RetryPolicy",
    "RunCancelledError",
    "RunConflictError",
    "RunError",
    "RunFailedError",
    "RunFinishedError",
    "RunHandle",
    "RunNotFoundError",
    "RunRejectedError",
    "Runtime",
    "RuntimeClosedError",
    "RuntimeStatistics",
    "SignalQueueFullError",
    "Snapshot",
    "StaleVersionError",
    "Status",
    "Step",
    "StepContext",
    "StepResultError",
    "StepTimeoutError",
    "StoreUnavailableError",
    "SubscriberOverflowError",
    "SupervisorStatistics",
    "SystemClock",
    "Tier",
    "Transition",
    "TransitionKind",
    "UnknownSignalError",
    "ValkeyServerError",
    "Workflow",
    "WorkflowNotRegisteredError",
    "run",
]

# A library never configures logging: without a handler of the application's,
# hotstate's records go nowhere instead of to the "last resort" stderr handler.
logging.getLogger("hotstate").addHandler(logging.NullHandler())
