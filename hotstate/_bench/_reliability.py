"""The reliability suite: many SIGKILL trials per flush policy, folded into figures.

Each trial (``_crash.py``) kills a child running the mixed workload (signal
waits, a transient failure retried, runs failing for good that are compensated
and dead-lettered), recovers in a fresh runtime and checks every invariant. Per
policy the suite reports: trials, runs checked, invariant violations (must be
0), runs lost (never durable, so never acknowledged), corrupt snapshots, the
longest loss window against the policy's window, and acknowledged steps lost
(must be 0 under write-through).
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hotstate._bench._crash import TrialResult, as_dict, run_trial
from hotstate._bench._policy import Policy, find_policy

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from hotstate._bench._trial import Workload

__all__ = ["DEFAULT_POLICIES", "PolicyReliability", "ReliabilityReport", "run_reliability", "summarize"]

DEFAULT_POLICIES = ("write-behind", "sqlite-behind", "write-through sqlite", "write-through valkey")
DEFAULT_TRIALS = 200
QUICK_TRIALS = 3


@dataclass(frozen=True, slots=True, kw_only=True)
class PolicyReliability:
    """One policy's figures over its trials.

    Attributes:
        policy: the policy's name.
        trials: SIGKILL trials run.
        runs_checked: runs recovered, driven to their end and checked.
        invariant_violations: broken invariants over all trials (must be 0).
        runs_lost: runs in no tier after the kill (never durable, never acknowledged).
        steps_lost: committed transitions in no tier after the kill.
        corrupt_snapshots: copies recovery rejected.
        max_loss_window: the longest loss window (s).
        policy_window: the longest promised window over the trials: interval + flush (s).
        trials_within_window: trials whose loss window was inside their own policy window.
        trials_within_saturated_window: trials inside the longer of interval and
            flush, plus one flush (the bound when flushes outlast the interval).
        acknowledged_steps_lost: acknowledged versions lost (must be 0 under write-through).
        write_through: whether the policy is write-through.
        examples: the first few violation texts.
    """

    policy: str
    trials: int
    runs_checked: int
    invariant_violations: int
    runs_lost: int
    steps_lost: int
    corrupt_snapshots: int
    max_loss_window: float
    policy_window: float
    trials_within_window: int
    trials_within_saturated_window: int
    acknowledged_steps_lost: int
    write_through: bool
    examples: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class ReliabilityReport:
    """The suite's records and figures.

    Attributes:
        policies: one summary per policy.
        results: every trial.
    """

    policies: tuple[PolicyReliability, ...]
    results: tuple[TrialResult, ...] = field(repr=False)

    @property
    def violations(self) -> int:
        """Invariant violations over every policy (the suite's pass figure: 0)."""
        return sum(p.invariant_violations for p in self.policies)

    def to_json(self, *, trials: bool = False) -> dict[str, Any]:
        """A JSON-able summary (and every trial's record with ``trials=True``)."""
        out: dict[str, Any] = {
            "violations": self.violations,
            "policies": [{**dataclasses.asdict(p), "examples": list(p.examples)} for p in self.policies],
        }
        if trials:
            out["trials"] = [as_dict(r) for r in self.results]
        return out


def summarize(policy: str, results: Sequence[TrialResult]) -> PolicyReliability:
    """Fold one policy's trials into its figures."""
    examples = [v for r in results for v in r.violations][:5]
    return PolicyReliability(
        policy=policy,
        trials=len(results),
        runs_checked=sum(r.runs_checked for r in results),
        invariant_violations=sum(len(r.violations) for r in results),
        runs_lost=sum(r.runs_lost for r in results),
        steps_lost=sum(r.steps_lost for r in results),
        corrupt_snapshots=sum(r.corrupt_snapshots for r in results),
        max_loss_window=max((r.loss_window for r in results), default=0.0),
        policy_window=max((r.policy_window for r in results), default=0.0),
        trials_within_window=sum(r.within_window() for r in results),
        trials_within_saturated_window=sum(r.within_saturated_window() for r in results),
        acknowledged_steps_lost=sum(r.acknowledged_steps_lost for r in results),
        write_through=any(r.write_through for r in results),
        examples=tuple(examples),
    )


async def run_reliability(
    *,
    valkey_url: str,
    workdir: Path | None = None,
    policies: Sequence[str | Policy] = DEFAULT_POLICIES,
    trials: int | None = None,
    quick: bool = False,
    workload: Workload | None = None,
    kill_after: tuple[float, float] = (0.1, 0.5),
    seed: int = 0,
    use_uvloop: bool = True,
    progress: Callable[[int, int, str], None] | None = None,
) -> ReliabilityReport:
    """Run ``trials`` verified SIGKILL trials per policy.

    Args:
        valkey_url: the Valkey server (the caller owns it; keys are deleted per trial).
        workdir: scratch folder (default: a new temporary one).
        policies: policy keys or names (see ``_policy.POLICIES``) or policies.
        trials: trials per policy (default 200, or 3 with ``quick``).
        quick: a handful of trials.
        workload: the child's workload (default ``Workload()``).
        kill_after: the kill comes uniformly within this many seconds after ``ready``.
        seed: the first trial's seed (each trial gets its own).
        use_uvloop: run the children on uvloop.
        progress: called ``(done, total, label)`` after each trial.

    Returns:
        The report: per-policy figures and every trial.

    Raises:
        ValueError: a policy is not understood.
    """
    chosen = [find_policy(p) if isinstance(p, str) else p for p in policies]
    per_policy = trials if trials is not None else (QUICK_TRIALS if quick else DEFAULT_TRIALS)
    folder = workdir if workdir is not None else Path(tempfile.mkdtemp(prefix="hotstate-reliability-"))
    total = len(chosen) * per_policy
    done = 0
    summaries: list[PolicyReliability] = []
    everything: list[TrialResult] = []
    for pol in chosen:
        results = []
        for k in range(per_policy):
            results.append(
                await run_trial(
                    pol,
                    valkey_url=valkey_url,
                    workdir=folder,
                    seed=seed + done,
                    kill_after=kill_after,
                    workload=workload,
                    verify=True,
                    use_uvloop=use_uvloop,
                )
            )
            done += 1
            if progress is not None:
                progress(done, total, f"reliability {pol.name} trial {k + 1}/{per_policy}")
        summaries.append(summarize(pol.name, results))
        everything.extend(results)
    return ReliabilityReport(policies=tuple(summaries), results=tuple(everything))
