"""The flush-interval sweep: throughput against the real loss window, per tier and interval.

For each tier (Valkey, SQLite) and each write-behind interval, a few SIGKILL
trials (``_crash.py``) run the trial workload flat out in a child and measure:
its committed transitions per second before the kill, and the loss window (kill
time minus the commit time of the oldest version in no tier). A write-through
point per tier (interval 0) sits beside them.

The target: the loss window never exceeds the interval plus one flush duration
(the longest flush the child reported); for write-through, nothing
acknowledged is lost and the window is within one group commit. Each point says
whether its trials held it.

The sweep's workload has no runs that fail for good, so every point measures
the same plain mix of steps, signals and retries; the reliability suite runs the
full mixed workload with compensations and dead letters.
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hotstate._bench._crash import TrialResult, run_trial, saturated_bound
from hotstate._bench._policy import Policy, TierSpec
from hotstate._bench._trial import Workload

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

DEFAULT_INTERVALS = (0.001, 0.01, 0.1, 1.0, 5.0)
QUICK_INTERVALS = (0.01, 0.1)
TIERS = ("valkey", "sqlite")
SWEEP_WORKLOAD = Workload(fail_every=0)


@dataclass(frozen=True, slots=True, kw_only=True)
class SweepPoint:
    """One tier at one interval.

    Attributes:
        tier: ``"valkey"`` or ``"sqlite"``.
        interval: the write-behind interval in seconds; 0 is write-through.
        steps_per_s: median committed transitions per second before the kill.
        loss_window_max: the longest loss window of the trials (s).
        loss_window_p50: their median (s).
        flush_duration: the longest flush any trial's child reported (s).
        trials: SIGKILL trials behind the point.
        within_saturated_bound: every trial's window <= max(interval,
            flush_duration) + flush_duration: the bound when flushes outlast
            the interval (equal to the target otherwise).
        within_target: every trial's window <= interval + flush_duration (and,
            for write-through, no acknowledged step lost).
        acknowledged_steps_lost: over all trials.
        violations: invariant violations over all trials (expected 0).
    """

    tier: str
    interval: float
    steps_per_s: float
    loss_window_max: float
    loss_window_p50: float
    flush_duration: float
    trials: int
    within_target: bool
    acknowledged_steps_lost: int = 0
    violations: int = 0
    within_saturated_bound: bool = True

    @property
    def label(self) -> str:
        """``"valkey 10 ms"``, ``"sqlite write-through"``."""
        if self.interval == 0:
            return f"{self.tier} write-through"
        ms = self.interval * 1000
        return f"{self.tier} {ms:g} ms" if ms < 1000 else f"{self.tier} {self.interval:g} s"


def point_policy(tier: str, interval: float) -> Policy:
    """The one-tier policy of a sweep point (interval 0: write-through)."""
    if interval == 0:
        return Policy(name=f"write-through {tier}", tiers=(TierSpec(tier, None),))
    return Policy(name=f"{tier}-behind {interval:g} s", tiers=(TierSpec(tier, interval),))


def kill_range(interval: float) -> tuple[float, float]:
    """When to kill: past a warm-up of 0.2 s plus one interval (so a flush has
    completed and the tier is in its steady cadence), anywhere in the next 1.5
    intervals (at least 0.3 s)."""
    start = 0.2 + interval
    return (start, start + max(0.3, 1.5 * interval))


def summarize_point(tier: str, interval: float, results: Sequence[TrialResult]) -> SweepPoint:
    """Fold one point's trials into a ``SweepPoint``."""
    windows = [r.loss_window for r in results]
    flush = max((r.flush_duration for r in results), default=0.0)
    acknowledged = sum(r.acknowledged_steps_lost for r in results)
    # One flush duration: the longest any trial of the point saw. A trial's own
    # figure misses the flush in flight at its kill, which can be its longest.
    if interval == 0:
        held = acknowledged == 0 and all(r.loss_window <= flush for r in results)
    else:
        held = all(r.loss_window <= interval + flush for r in results)
    return SweepPoint(
        tier=tier,
        interval=interval,
        steps_per_s=statistics.median(r.steps_per_s for r in results) if results else 0.0,
        loss_window_max=max(windows, default=0.0),
        loss_window_p50=statistics.median(windows) if windows else 0.0,
        flush_duration=flush,
        trials=len(results),
        within_target=held and bool(results),
        within_saturated_bound=bool(results)
        and acknowledged == 0
        and all(r.loss_window <= saturated_bound(interval, flush) for r in results),
        acknowledged_steps_lost=acknowledged,
        violations=sum(len(r.violations) for r in results),
    )


async def run_sweep(
    *,
    valkey_url: str,
    workdir: Path | None = None,
    tiers: Sequence[str] = TIERS,
    intervals: Sequence[float] | None = None,
    trials: int | None = None,
    quick: bool = False,
    write_through: bool = True,
    workload: Workload | None = None,
    seed: int = 0,
    use_uvloop: bool = True,
    progress: Callable[[int, int, str], None] | None = None,
) -> list[SweepPoint]:
    """Measure throughput and loss window for every tier x interval.

    Args:
        valkey_url: the Valkey server (the caller owns it; keys are deleted per trial).
        workdir: scratch folder for SQLite files and traces (default: a new temporary one).
        tiers: which tiers to sweep.
        intervals: write-behind intervals in seconds (default ``DEFAULT_INTERVALS``,
            or ``QUICK_INTERVALS`` with ``quick``).
        trials: SIGKILL trials per point (default 3, or 2 with ``quick``).
        quick: the short list, fewer trials.
        write_through: add a write-through point (interval 0) per tier.
        workload: the child's workload (default: flat out, no runs failing for good).
        seed: the first trial's seed.
        use_uvloop: run the children on uvloop.
        progress: called ``(done, total, label)`` after each trial.

    Returns:
        The points, per tier in interval order (write-through first).

    Raises:
        ValueError: an unknown tier.
    """
    for tier in tiers:
        if tier not in TIERS:
            raise ValueError(f"unknown tier {tier!r}; choose from {TIERS}")
    chosen = tuple(intervals) if intervals is not None else (QUICK_INTERVALS if quick else DEFAULT_INTERVALS)
    per_point = trials if trials is not None else (2 if quick else 3)
    wl = workload if workload is not None else SWEEP_WORKLOAD
    folder = workdir if workdir is not None else Path(tempfile.mkdtemp(prefix="hotstate-sweep-"))
    grid = [(tier, iv) for tier in tiers for iv in ((0.0,) if write_through else ()) + chosen]
    total = len(grid) * per_point
    done = 0
    points: list[SweepPoint] = []
    for tier, interval in grid:
        results = []
        for k in range(per_point):
            results.append(
                await run_trial(
                    point_policy(tier, interval),
                    valkey_url=valkey_url,
                    workdir=folder,
                    seed=seed + done,
                    kill_after=kill_range(interval),
                    workload=wl,
                    verify=False,
                    use_uvloop=use_uvloop,
                )
            )
            done += 1
            if progress is not None:
                progress(done, total, f"sweep {point_policy(tier, interval).name} trial {k + 1}/{per_point}")
        points.append(summarize_point(tier, interval, results))
    return points


_KEYS = (
    "tier",
    "interval",
    "steps_per_s",
    "loss_window_max",
    "loss_window_p50",
    "flush_duration",
    "trials",
    "within_target",
    "within_saturated_bound",
)


def to_json(points: Sequence[SweepPoint]) -> list[dict[str, Any]]:
    """The results file's ``"sweep"`` list: exactly the keys ``hotstate advise`` reads.

    Returns:
        One dict per point with ``tier``, ``interval``, ``steps_per_s``,
        ``loss_window_max``, ``loss_window_p50``, ``flush_duration``, ``trials``,
        ``within_target`` and ``within_saturated_bound``.
    """
    out = []
    for p in points:
        d = dataclasses.asdict(p)
        out.append({k: d[k] for k in _KEYS})
    return out
