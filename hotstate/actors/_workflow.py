"""Workflow definitions: ``Workflow``, ``Step`` and ``RetryPolicy``.

What a run executes, in the "actors" box of the map in docs/architecture.md. These are
plain, validated, immutable definitions; the runtime owns the machinery.
"""

from __future__ import annotations

import inspect
import math
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, final

from hotstate._errors import ConfigError
from hotstate._names import name as valid_name
from hotstate._validate import integer

if TYPE_CHECKING:
    from hotstate.actors._context import StepContext

__all__ = [
    "Compensation",
    "RetryPolicy",
    "Step",
    "StepFn",
    "Workflow",
]


StepFn = Callable[[Any, "StepContext"], Any]
"""A step: ``fn(payload, ctx) -> next payload`` (or an awaitable of it when ``async def``)."""

Compensation = Callable[[Any, "StepContext"], Any]
"""A compensation: ``fn(payload, ctx) -> None | new payload`` (sync or ``async def``)."""


def _check_positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(name, value, "must be a number")
    ok = math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise ConfigError(name, value, "must be a finite number " + (">= 0" if allow_zero else "> 0"))


def _is_exception_type(kind: object) -> bool:
    return isinstance(kind, type) and issubclass(kind, BaseException)


def _is_async_callable(fn: object) -> bool:
    """True for ``async def`` functions, partials of them, and objects with an ``async def __call__``."""
    if fn is None:
        return False
    if inspect.iscoroutinefunction(fn):
        return True
    call = getattr(type(fn), "__call__", None)  # noqa: B004 - the type's __call__, not callable()
    return not inspect.isfunction(fn) and inspect.iscoroutinefunction(call)


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """How a failing step is retried: capped exponential backoff with jitter.

    The delay before attempt ``n + 1`` is ``min(max_delay, initial_delay *
    multiplier ** (n - 1))``, then scaled by a random factor in
    ``[1 - jitter, 1]``.

    Attributes:
        max_attempts: attempts in total, including the first (>= 1).
        initial_delay: seconds before the first retry (>= 0).
        multiplier: growth per attempt (>= 1).
        max_delay: the cap in seconds (default 60).
        jitter: fraction of the delay that is randomised, in ``[0, 1]``.
        non_retryable: exception types that give up at once.

    Raises:
        ConfigError: a field is out of range; the message names it.
    """

    max_attempts: int = 3
    initial_delay: float = 0.1
    multiplier: float = 2.0
    max_delay: float = 60.0
    jitter: float = 0.5
    non_retryable: tuple[type[BaseException], ...] = ()

    def __post_init__(self) -> None:
        integer("RetryPolicy.max_attempts", self.max_attempts, minimum=1)
        _check_positive("RetryPolicy.initial_delay", self.initial_delay, allow_zero=True)
        _check_positive("RetryPolicy.max_delay", self.max_delay, allow_zero=True)
        _check_positive("RetryPolicy.multiplier", self.multiplier)
        if not (math.isfinite(self.multiplier) and self.multiplier >= 1):
            raise ConfigError("RetryPolicy.multiplier", self.multiplier, "must be a finite number >= 1")
        _check_positive("RetryPolicy.jitter", self.jitter, allow_zero=True)
        if not (0.0 <= self.jitter <= 1.0):
            raise ConfigError("RetryPolicy.jitter", self.jitter, "must be within [0, 1]")
        kinds: object = self.non_retryable  # callers may ignore the type hints
        if isinstance(kinds, list | set | frozenset):
            object.__setattr__(self, "non_retryable", kinds := tuple(kinds))
        if not isinstance(kinds, tuple):
            raise ConfigError(
                "RetryPolicy.non_retryable", kinds, f"must be a tuple of exception types, not {type(kinds).__name__}"
            )
        for kind in kinds:
            if not _is_exception_type(kind):
                raise ConfigError("RetryPolicy.non_retryable", kind, "must be exception types")

    @classmethod
    def never(cls) -> RetryPolicy:
        """A policy that never retries (one attempt).

        Returns:
            The policy.
        """
        return cls(max_attempts=1)


@dataclass(frozen=True, slots=True, kw_only=True)
class Step:
    """One step of a workflow.

    Attributes:
        fn: ``fn(payload, ctx) -> next payload``, sync or ``async def``.
        name: the step's name (defaults to ``fn.__name__``): a non-empty str of
            at most 128 bytes of UTF-8 without control characters.
        retry: the retry policy (defaults to the workflow's).
        timeout: seconds the step may run once it suspends, or None.
        compensate: undoes the step when the run gives up later, or None.
        wait_for: the name of a signal the step waits for before it runs;
            the signal's data is in ``ctx.signal``. Named as a step is.

    Raises:
        ConfigError: a field is invalid; the message names it.
    """

    fn: StepFn
    name: str = ""
    retry: RetryPolicy | None = None
    timeout: float | None = None
    compensate: Compensation | None = None
    wait_for: str | None = None
    is_async: bool = field(init=False, default=False)
    compensate_is_async: bool = field(init=False, default=False)
    plain: bool = field(init=False, default=False)
    """``async def``, no signal, no timeout: the runtime's fastest path."""

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise ConfigError("Step.fn", self.fn, "must be callable")
        given: object = self.name  # callers may ignore the type hints
        if isinstance(given, str) and not given:
            object.__setattr__(self, "name", getattr(self.fn, "__name__", "step"))
        object.__setattr__(self, "name", valid_name("Step.name", self.name))
        if self.timeout is not None:
            _check_positive(f"Step({self.name!r}).timeout", self.timeout)
        if self.compensate is not None and not callable(self.compensate):
            raise ConfigError(f"Step({self.name!r}).compensate", self.compensate, "must be callable")
        if self.wait_for is not None:
            object.__setattr__(self, "wait_for", valid_name(f"Step({self.name!r}).wait_for", self.wait_for))
        if self.retry is not None and not isinstance(self.retry, RetryPolicy):
            raise ConfigError(f"Step({self.name!r}).retry", self.retry, "must be a RetryPolicy")
        object.__setattr__(self, "is_async", _is_async_callable(self.fn))
        object.__setattr__(self, "compensate_is_async", _is_async_callable(self.compensate))
        object.__setattr__(self, "plain", self.is_async and self.timeout is None and self.wait_for is None)


@final
class Workflow:
    """A named, versioned sequence of steps.

    Args:
        name: the workflow's name (unique within a runtime): a non-empty str of
            at most 128 bytes of UTF-8 without control characters.
        steps: the steps, in order; plain callables are wrapped in ``Step``.
        version: the definition's version, recorded in every snapshot.
        retry: the default retry policy for steps that set none.

    Raises:
        ConfigError: a bad name, empty steps (or not an iterable of steps),
            duplicate step names, a bad version or retry policy.
    """

    __slots__ = ("_waits", "name", "retry", "steps", "version")

    def __init__(
        self,
        name: str,
        steps: Iterable[Step | StepFn],
        *,
        version: int = 1,
        retry: RetryPolicy | None = None,
    ) -> None:
        name = valid_name("Workflow.name", name)
        integer(f"Workflow({name!r}).version", version, minimum=1)
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise ConfigError(f"Workflow({name!r}).retry", retry, f"must be a RetryPolicy, not {type(retry).__name__}")
        default_retry = retry if retry is not None else RetryPolicy()
        given: object = steps
        if not isinstance(given, Iterable) or isinstance(given, str | bytes):
            raise ConfigError(
                f"Workflow({name!r}).steps", steps, f"must be a sequence of steps, not {type(steps).__name__}"
            )
        built: list[Step] = []
        for item in steps:
            step = item if isinstance(item, Step) else Step(fn=item)
            if step.retry is None:
                step = Step(
                    fn=step.fn,
                    name=step.name,
                    retry=default_retry,
                    timeout=step.timeout,
                    compensate=step.compensate,
                    wait_for=step.wait_for,
                )
            built.append(step)
        if not built:
            raise ConfigError(f"Workflow({name!r}).steps", [], "must have at least one step")
        counts = Counter(s.name for s in built)
        dupes = sorted(n for n, c in counts.items() if c > 1)
        if dupes:
            raise ConfigError(f"Workflow({name!r}).steps", dupes, "step names must be unique")
        self.name = name
        self.version = version
        self.retry = default_retry
        self.steps: Sequence[Step] = tuple(built)
        waits: dict[str, list[int]] = {}
        for i, step in enumerate(built):
            if step.wait_for is not None:
                waits.setdefault(step.wait_for, []).append(i)
        self._waits = {signal: tuple(at) for signal, at in waits.items()}

    def __repr__(self) -> str:
        return f"Workflow({self.name!r}, version={self.version}, steps={[s.name for s in self.steps]})"

    def step_index(self, name: str) -> int:
        """Return the index of the step called ``name``.

        Args:
            name: a step name.

        Returns:
            Its index.

        Raises:
            ConfigError: no step has that name.
        """
        for i, step in enumerate(self.steps):
            if step.name == name:
                return i
        raise ConfigError(f"Workflow({self.name!r}).step", name, "no step has this name")

    def waits_for(self, signal: str, *, from_step: int = 0) -> int:
        """Count the steps at or after ``from_step`` that wait for ``signal``; O(log steps).

        Args:
            signal: a signal name.
            from_step: the first step index counted (a run's cursor).

        Returns:
            How many of those steps wait for it.
        """
        at = self._waits.get(signal)
        return 0 if at is None else len(at) - bisect_left(at, from_step)

    def signals_from(self, from_step: int = 0) -> tuple[str, ...]:
        """Return the signals the steps at or after ``from_step`` wait for, in step order, each once.

        Args:
            from_step: the first step index looked at.

        Returns:
            The signal names.
        """
        return tuple(dict.fromkeys(s.wait_for for s in self.steps[max(from_step, 0) :] if s.wait_for is not None))
