"""The whole hotstate exception tree (see STYLE.md E.15).

This module imports nothing from hotstate, so every layer can raise these.
"""

from __future__ import annotations

from typing import Any


class HotstateError(Exception):
    """Base class of every error hotstate raises on purpose."""


class ConfigError(HotstateError, ValueError):
    """A workflow, policy or runtime option is invalid.

    Raised at construction time; the message names the field and the value.
    """

    def __init__(self, field: str, value: object, reason: str) -> None:
        self.field = field
        self.value = value
        super().__init__(f"{field}={value!r}: {reason}")


class RuntimeClosedError(HotstateError):
    """The runtime is not running: used before ``__aenter__`` or after ``aclose``."""


class RunError(HotstateError):
    """An error about one run; ``run_id`` names it."""

    def __init__(self, run_id: str, message: str) -> None:
        self.run_id = run_id
        super().__init__(f"run {run_id!r}: {message}")


class RunNotFoundError(RunError, LookupError):
    """No run with this id is known to the runtime (or the store)."""

    def __init__(self, run_id: str) -> None:
        super().__init__(run_id, "no such run")


class WorkflowNotRegisteredError(RunError, LookupError):
    """A run names a workflow that is not registered with the runtime."""

    def __init__(self, run_id: str, workflow: str) -> None:
        self.workflow = workflow
        super().__init__(run_id, f"workflow {workflow!r} is not registered")


class RunFinishedError(RunError):
    """The run has already finished (done, failed or cancelled); it takes no more input."""

    def __init__(self, run_id: str, status: str, action: str) -> None:
        self.status = status
        super().__init__(run_id, f"cannot {action}: the run is already {status}")


class CrashLoopError(RunError):
    """The run was in flight at ``crashes`` consecutive process crashes: it is failed instead of resumed again.

    A step that kills its process (out of memory, a crashing extension) would
    otherwise be resumed at every restart forever. ``step`` is the cursor it
    was resumed at each time.
    """

    def __init__(self, run_id: str, crashes: int, step: int) -> None:
        self.crashes = crashes
        self.step = step
        super().__init__(run_id, f"in flight at {crashes} consecutive process crashes (step {step}); not resumed again")


class RunFailedError(RunError):
    """The run failed for good.

    ``error`` holds the recorded error (an ``ErrorInfo``); ``__cause__`` is the
    user's exception when it is still in memory.
    """

    def __init__(self, run_id: str, error: Any) -> None:
        self.error = error
        super().__init__(
            run_id,
            f"failed at step {error.step} ({error.step_name!r}) after "
            f"{error.attempt} attempt(s): {error.type}: {error.message}",
        )


class RunCancelledError(RunError):
    """The run was cancelled before it finished."""

    def __init__(self, run_id: str) -> None:
        super().__init__(run_id, "was cancelled")


class StepResultError(RunError, TypeError):
    """A step returned something that is not a payload (e.g. an un-awaited coroutine)."""

    def __init__(self, run_id: str, step: str, got: object) -> None:
        self.step = step
        super().__init__(
            run_id,
            f"step {step!r} returned {type(got).__name__!s}, not a payload; "
            "did it forget an `await` or need to be declared `async def`?",
        )


class StepTimeoutError(HotstateError, TimeoutError):
    """A step ran past its timeout. Recorded like any step failure, and retryable."""

    def __init__(self, step: str, timeout: float) -> None:
        self.step = step
        self.timeout = timeout
        super().__init__(f"step {step!r} timed out after {timeout:g} s")


class SubscriberOverflowError(HotstateError):
    """A subscriber fell more than its buffer behind and was cut off."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        super().__init__(
            f"subscriber fell {maxsize} transitions behind and was cut off; "
            "read faster or subscribe with a larger buffer"
        )


class PersistenceError(HotstateError):
    """An error in a persistence tier; ``tier`` names it."""

    def __init__(self, tier: str, message: str) -> None:
        self.tier = tier
        self.detail = message
        super().__init__(f"[{tier}] {message}")


class StoreUnavailableError(PersistenceError):
    """The tier could not be reached or refused the write; transient, retried with backoff."""


class StaleVersionError(PersistenceError):
    """The version guard rejected a write: ``stored`` >= ``attempted``."""

    def __init__(self, tier: str, run_id: str, stored: int, attempted: int) -> None:
        self.run_id = run_id
        self.stored = stored
        self.attempted = attempted
        super().__init__(tier, f"run {run_id!r}: stored version {stored} >= attempted {attempted}")


class CorruptSnapshotError(PersistenceError):
    """Stored bytes failed their digest/HMAC check; they were never unpickled."""

    def __init__(self, tier: str, run_id: str, version: int | None, reason: str) -> None:
        self.run_id = run_id
        self.version = version
        super().__init__(tier, f"run {run_id!r} v{version}: {reason}")


class CodecError(PersistenceError):
    """A payload could not be encoded or decoded."""


class DurabilityTimeoutError(PersistenceError, TimeoutError):
    """A change was not durable in a tier in time (the tier is down or slow); nothing is lost.

    ``run_id`` and ``version`` name what was waited for (None when unknown), so a
    caller whose ``spawn`` timed out still learns the id of the run it started.
    """

    def __init__(self, tier: str, message: str, *, run_id: str | None = None, version: int | None = None) -> None:
        self.run_id = run_id
        self.version = version
        super().__init__(tier, message)


class ValkeyServerError(HotstateError, RuntimeError):
    """The embedded Valkey server could not be found, started or reached."""


class HotstateInternalError(HotstateError):
    """A bug in hotstate, never the user's fault. Please report it."""


class RunRejectedError(CodecError):
    """A store could not write a run at all, so the run is failed (``SaveResult.rejected``).

    What the run carried cannot be stored in that tier: text that does not
    encode as UTF-8, an integer out of the store's range, a stored key of the
    wrong type. The store wrote every other run of the batch. ``run_id`` names
    the run and ``reason`` says why, as the store reported it.
    """

    def __init__(self, tier: str, run_id: str, reason: str) -> None:
        self.run_id = run_id
        self.reason = reason
        super().__init__(tier, f"run {run_id!r} cannot be written to this tier: {reason}")


class RunConflictError(RunError):
    """``spawn`` named an existing run of another workflow or definition version; nothing was started.

    ``workflow`` and ``workflow_version`` are the existing run's (its
    snapshot's), ``requested`` and ``requested_version`` what ``spawn`` asked
    for. The existing run is left as it is.
    """

    def __init__(
        self, run_id: str, workflow: str, workflow_version: int, requested: str, requested_version: int
    ) -> None:
        self.workflow = workflow
        self.workflow_version = workflow_version
        self.requested = requested
        self.requested_version = requested_version
        super().__init__(
            run_id,
            f"exists as workflow {workflow!r} v{workflow_version}; "
            f"spawn asked for {requested!r} v{requested_version}: nothing was started",
        )


class UnknownSignalError(RunError, ConfigError):
    """``send`` of a signal no step left in the run waits for; nothing was queued or acknowledged.

    Steps run in order, so such a signal would stay queued forever (a
    re-delivered webhook, a typo). That covers a signal no step of the
    workflow waits for, one only steps before the cursor wait for, one whose
    every waiting step left already has one queued, and any signal while the
    run is compensating. A ``ConfigError`` (and so a ``ValueError``) too, as
    ``send`` raised for a signal no step waits for before. ``signal`` names the
    signal and ``waiting_for`` the signals the run still waits for.
    """

    def __init__(self, run_id: str, signal: str, waiting_for: tuple[str, ...], reason: str) -> None:
        self.run_id = run_id
        self.signal = signal
        self.waiting_for = waiting_for
        self.field = "send.signal"
        self.value = signal
        wanted = ", ".join(map(repr, waiting_for)) or "no signal"
        HotstateError.__init__(self, f"run {run_id!r}: {reason}; it still waits for {wanted}; nothing was queued")


class SignalQueueFullError(RunError):
    """``send`` found ``limit`` signals already pending in the run; nothing was queued or acknowledged.

    ``Runtime(max_pending_signals=...)`` bounds each run's pending signals.
    Send again once the run's steps have consumed some. ``signal`` names the
    signal refused.
    """

    def __init__(self, run_id: str, signal: str, limit: int) -> None:
        self.signal = signal
        self.limit = limit
        super().__init__(
            run_id, f"{limit} signals are pending already (max_pending_signals); {signal!r} was not queued"
        )


class OwnershipLostError(RunError):
    """This process no longer owns the run's shard: another process does, or will once it claims it.

    Raised to callers waiting on a run (``wait_finished``, ``wait_durable``,
    an acknowledgement) when this process lost the shard: its lease lapsed,
    another process's claim fenced it off, or it handed the shard off. What
    this process did to the run after its last accepted write is dropped;
    the new owner resumes the run from its newest stored copy. Ask again
    (``Runtime.locate``, ``Runtime.load``, or any call through a process that
    owns the shard).

    Attributes:
        shard: the shard lost.
        epoch: the epoch this process held it at.
    """

    def __init__(self, run_id: str, shard: int, epoch: int, why: str) -> None:
        self.shard = shard
        self.epoch = epoch
        super().__init__(run_id, f"this process no longer owns shard {shard} (epoch {epoch}): {why}")


class NotOwnerError(RunError):
    """The run's shard is owned by another process, and this call cannot be forwarded to it.

    Attributes:
        shard: the run's shard.
        owner: the owning member's id, or None when no process holds it now.
    """

    def __init__(self, run_id: str, shard: int, owner: str | None, action: str) -> None:
        self.shard = shard
        self.owner = owner
        held = f"process {owner}" if owner else "no process (it is being taken over)"
        super().__init__(run_id, f"cannot {action}: shard {shard} is held by {held}, not this one")


# Recorded error type names (ErrorInfo.type) and pickles should name the public
# path, not this private module (STYLE.md D.14).
for _cls in list(globals().values()):
    if isinstance(_cls, type) and issubclass(_cls, HotstateError):
        _cls.__module__ = "hotstate"
del _cls
