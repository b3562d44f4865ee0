"""The ``Supervisor``: retry with capped jittered backoff, restart intensity, dead letters.

The "Supervisor" box of the map in docs/architecture.md. Its decisions are pure (see ``_backoff``);
this class keeps the per-run restart windows, the dead-letter records and the
figures, and never sleeps: waits are deadlines on the timer service.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, final

from hotstate.runtime._backoff import RestartIntensity, RestartWindow, backoff_delay

if TYPE_CHECKING:
    import random

    from hotstate._clock import Clock
    from hotstate.actors import DeadLetter, Step
    from hotstate.actors._actor import RunActor

__all__ = ["Supervisor", "SupervisorStatistics"]


@dataclass(frozen=True, slots=True, kw_only=True)
class SupervisorStatistics:
    """Figures of the supervisor.

    Attributes:
        failures: step failures seen.
        retries: retries scheduled.
        give_ups: runs given up (any reason).
        non_retryable: give-ups because the error type is non-retryable.
        attempts_exhausted: give-ups because ``max_attempts`` was reached.
        intensity_exceeded: give-ups because of the restart intensity.
        dead_letters: dead letters currently held.
    """

    failures: int
    retries: int
    give_ups: int
    non_retryable: int
    attempts_exhausted: int
    intensity_exceeded: int
    dead_letters: int


@final
class Supervisor:
    """Decides retry or give up for failing steps and keeps the dead letters.

    Args:
        intensity: the per-run restart intensity.
        clock: time source for the intensity window.
        rng: random source for jitter.
    """

    def __init__(self, intensity: RestartIntensity, clock: Clock, rng: random.Random) -> None:
        self.intensity = intensity
        self._clock = clock
        self._rng = rng
        self._windows: dict[str, RestartWindow] = {}
        self.dead_letters: dict[str, DeadLetter] = {}
        self._failures = 0
        self._retries = 0
        self._non_retryable = 0
        self._exhausted = 0
        self._intensity_exceeded = 0

    def retry_delay(self, actor: RunActor, step: Step, exc: Exception) -> float | None:
        """Return the backoff before retrying, or None to give up.

        Args:
            actor: the failing run.
            step: the step that raised.
            exc: what it raised.

        Returns:
            Seconds to wait, or None.
        """
        self._failures += 1
        policy = step.retry
        assert policy is not None  # Workflow fills in its default  # noqa: S101
        attempt = actor.snapshot.attempt
        if policy.non_retryable and isinstance(exc, policy.non_retryable):
            self._non_retryable += 1
            return None
        if attempt >= policy.max_attempts:
            self._exhausted += 1
            return None
        window = self._windows.get(actor.run_id)
        if window is None:
            window = self._windows[actor.run_id] = RestartWindow(self.intensity)
        if not window.record(self._clock.now()):
            self._intensity_exceeded += 1
            return None
        self._retries += 1
        return backoff_delay(policy, attempt, self._rng)

    def forget(self, run_id: str) -> None:
        """Drop the restart window of a finished run."""
        self._windows.pop(run_id, None)

    def statistics(self) -> SupervisorStatistics:
        """Return the current figures.

        Returns:
            A frozen record.
        """
        return SupervisorStatistics(
            failures=self._failures,
            retries=self._retries,
            give_ups=self._non_retryable + self._exhausted + self._intensity_exceeded,
            non_retryable=self._non_retryable,
            attempts_exhausted=self._exhausted,
            intensity_exceeded=self._intensity_exceeded,
            dead_letters=len(self.dead_letters),
        )
