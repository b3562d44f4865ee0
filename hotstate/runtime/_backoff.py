"""Pure supervisor decisions: backoff delay and restart intensity (OTP ``add_restart``).

No clock and no randomness of their own: callers pass ``now`` and an ``rng``,
so tests check them exhaustively with plain numbers (STYLE.md F.19).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, final

from hotstate._validate import integer, number

if TYPE_CHECKING:
    import random

    from hotstate.actors import RetryPolicy

__all__ = ["RestartIntensity", "RestartWindow", "backoff_delay"]


def backoff_delay(policy: RetryPolicy, attempt: int, rng: random.Random) -> float:
    """Return the seconds to wait before retrying after failed attempt ``attempt``.

    The base delay is ``initial_delay * multiplier ** (attempt - 1)`` capped at
    ``max_delay``; jitter then scales it by a factor drawn from
    ``[1 - jitter, 1]``, so the result always lies within ``[0, max_delay]``.

    Args:
        policy: the step's retry policy.
        attempt: the attempt that just failed (1-based).
        rng: the random source (seed it for deterministic tests).

    Returns:
        The delay in seconds.

    Raises:
        ValueError: ``attempt`` is below 1.
    """
    if attempt < 1:
        raise ValueError(f"attempt={attempt!r}: attempts are 1-based")
    cap = policy.max_delay
    # Compare exponents instead of computing a huge power: attempt 10_000 must not overflow.
    if policy.multiplier > 1 and policy.initial_delay > 0:
        limit = math.log(cap / policy.initial_delay, policy.multiplier) if cap > 0 else -math.inf
        base = cap if attempt - 1 >= limit else policy.initial_delay * policy.multiplier ** (attempt - 1)
    else:
        base = policy.initial_delay
    base = min(base, cap)
    if policy.jitter:
        base *= 1.0 - policy.jitter * rng.random()
    return base


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class RestartIntensity:
    """OTP restart intensity: more than ``max_restarts`` within ``window`` seconds gives up.

    Applies per run, on top of each step's ``RetryPolicy.max_attempts``.

    Attributes:
        max_restarts: restarts allowed inside one window (>= 0).
        window: the sliding window in seconds (> 0).

    Raises:
        ConfigError: a field is out of range.
    """

    max_restarts: int = 10
    window: float = 60.0

    def __post_init__(self) -> None:
        integer("RestartIntensity.max_restarts", self.max_restarts, minimum=0)
        number("RestartIntensity.window", self.window, strict=True)


@final
class RestartWindow:
    """The restart times of one run, judged against a ``RestartIntensity``.

    A restart at ``now`` counts together with earlier restarts at times ``t``
    where ``now - t < window`` (a restart exactly ``window`` seconds old has
    left the window, as in OTP).

    Args:
        intensity: the limit to apply.
    """

    __slots__ = ("_intensity", "_times")

    def __init__(self, intensity: RestartIntensity) -> None:
        self._intensity = intensity
        self._times: deque[float] = deque()

    def record(self, now: float) -> bool:
        """Record a restart at ``now``.

        Args:
            now: the monotonic time of the restart.

        Returns:
            True if the restart is allowed, False if the intensity is exceeded
            (the caller gives up).
        """
        times = self._times
        window = self._intensity.window
        while times and now - times[0] >= window:
            times.popleft()
        times.append(now)
        return len(times) <= self._intensity.max_restarts

    def __len__(self) -> int:
        return len(self._times)
