"""The reliability suite: many SIGKILL trials per flush policy, folded into figures.

Each trial (``_crash.py``) kills a child running the mixed workload (signal
waits, a transient failure retried, runs failing for good that are compensated
and dead-lettered), recovers in a fresh runtime and checks every invariant. Per
policy the suite reports: trials, runs checked, invariant violations (must be
0), runs lost (never durable, so never acknowledged), corrupt snapshots, the
longest loss window against the policy's window, and acknowledged steps lost
(must be 0 under write-through).

``run_guarantees`` runs the #10 guarantees' trials (``_guarantees.py``): an
acknowledged call then SIGKILL, per acknowledging policy (the calls taken in
turn); orders finished in Valkey, SIGKILL before SQLite's flush, recovery,
purge and restart; a step that kills its process, restarted until the run is
dead-lettered. Per scenario (and per policy and call for acknowledgements) it
reports trials, runs checked and violations (must be 0).
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from hotstate._bench import _guarantees as guarantees
from hotstate._bench._ack import OPS
from hotstate._bench._crash import TrialResult, as_dict, run_trial
from hotstate._bench._policy import Policy, find_policy

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

    from hotstate._bench._guarantees import GuaranteeTrial
    from hotstate._bench._trial import Workload

__all__ = [
    "DEFAULT_POLICIES",
    "CallCount",
    "GuaranteeReliability",
    "GuaranteesReport",
    "PolicyReliability",
    "ReliabilityReport",
    "run_guarantees",
    "run_reliability",
    "summarize",
    "summarize_guarantee",
]

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


# ------------------------------------------------------------- #10 guarantees


@dataclass(frozen=True, slots=True, kw_only=True)
class CallCount:
    """One acknowledged call's trials and violations under one policy."""

    trials: int
    violations: int


@dataclass(frozen=True, slots=True, kw_only=True)
class GuaranteeReliability:
    """One scenario's figures (for ``ack``: one acknowledging policy's) over its trials.

    Attributes:
        scenario: ``ack``, ``lineage`` or ``crash-loop``.
        policy: the policy's name.
        trials: SIGKILL trials run.
        runs_checked: runs whose guarantee was checked.
        violations: broken guarantees over all trials (must be 0).
        seconds: the trials' summed duration (s).
        starts: child processes started (more than ``trials`` for crash loops).
        calls: ``ack``: per call, its trials and violations.
        examples: the first few violation texts.
    """

    scenario: str
    policy: str
    trials: int
    runs_checked: int
    violations: int
    seconds: float
    starts: int
    calls: dict[str, CallCount] = field(default_factory=dict)
    examples: tuple[str, ...] = ()


def summarize_guarantee(scenario: str, policy: str, results: Sequence[GuaranteeTrial]) -> GuaranteeReliability:
    """Fold one scenario's (and policy's) trials into its figures."""
    calls: dict[str, CallCount] = {}
    for call in dict.fromkeys(r.call for r in results if r.call):
        mine = [r for r in results if r.call == call]
        calls[call] = CallCount(trials=len(mine), violations=sum(len(r.violations) for r in mine))
    return GuaranteeReliability(
        scenario=scenario,
        policy=policy,
        trials=len(results),
        runs_checked=sum(r.runs_checked for r in results),
        violations=sum(len(r.violations) for r in results),
        seconds=sum(r.seconds for r in results),
        starts=sum(r.starts for r in results),
        calls=calls,
        examples=tuple([v for r in results for v in r.violations][:5]),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class GuaranteesReport:
    """The #10 guarantees' figures and trials.

    Attributes:
        scenarios: one summary per scenario (``ack``: one per policy), in the order run.
        results: every trial.
        seconds: wall-clock time of all the trials (s).
    """

    scenarios: tuple[GuaranteeReliability, ...]
    results: tuple[GuaranteeTrial, ...] = field(repr=False)
    seconds: float = 0.0

    @property
    def violations(self) -> int:
        """Violations over every scenario (the pass figure: 0)."""
        return sum(s.violations for s in self.scenarios)

    def to_json(self, *, trials: bool = False) -> dict[str, Any]:
        """A JSON-able summary (and every trial's record with ``trials=True``)."""
        out: dict[str, Any] = {
            "violations": self.violations,
            "seconds": self.seconds,
            "scenarios": [{**dataclasses.asdict(s), "examples": list(s.examples)} for s in self.scenarios],
        }
        if trials:
            out["trials"] = [guarantees.as_dict(r) for r in self.results]
        return out


async def run_guarantees(
    *,
    valkey_url: str,
    workdir: Path | None = None,
    scenarios: Sequence[str] = guarantees.SCENARIOS,
    trials: int | None = None,
    quick: bool = False,
    ack_policies: Sequence[str] = guarantees.ACK_POLICIES,
    crash_loop_policy: str = guarantees.CRASH_LOOP_POLICY,
    seed: int = 0,
    concurrency: int = 2,
    progress: Callable[[int, int, str], None] | None = None,
) -> GuaranteesReport:
    """Run the #10 guarantees' SIGKILL trials.

    Args:
        valkey_url: the Valkey server (the caller owns it; keys are deleted per trial).
        workdir: scratch folder (default: a new temporary one).
        scenarios: from ``_guarantees.SCENARIOS``.
        trials: trials per acknowledging policy (the calls taken in turn), and
            per other scenario (default 200, or 3 with ``quick``).
        quick: a handful of trials.
        ack_policies: the acknowledging policies (keys or names, see ``_policy.POLICIES``).
        crash_loop_policy: the crash-loop trials' policy.
        seed: the first trial's seed (each trial gets its own).
        concurrency: trials at a time (2 keeps both cores busy, which varies
            where in a group commit each kill lands).
        progress: called ``(done, total, label)`` after each trial.

    Returns:
        The report: per-scenario figures and every trial.

    Raises:
        ValueError: an unknown scenario or policy.
    """
    unknown = sorted(set(scenarios) - set(guarantees.SCENARIOS))
    if unknown:
        raise ValueError(f"unknown scenario(s) {unknown}; choose from {guarantees.SCENARIOS}")
    n = trials if trials is not None else (QUICK_TRIALS if quick else DEFAULT_TRIALS)
    folder = workdir if workdir is not None else Path(tempfile.mkdtemp(prefix="hotstate-guarantees-"))
    plan = _plan(scenarios, n, [find_policy(p) for p in ack_policies], find_policy(crash_loop_policy), valkey_url)
    done = 0
    results: list[GuaranteeTrial | None] = [None] * len(plan)
    limit = anyio.Semaphore(max(1, concurrency))

    async def one(k: int, label: str, make: Callable[..., Awaitable[GuaranteeTrial]]) -> None:
        nonlocal done
        async with limit:
            results[k] = await make(workdir=folder, seed=seed + k)
        done += 1
        if progress is not None:
            progress(done, len(plan), label)

    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for k, (label, make) in enumerate(plan):
            tg.start_soon(one, k, label, make)
    finished = [r for r in results if r is not None]
    groups: dict[tuple[str, str], list[GuaranteeTrial]] = {}
    for r in finished:
        groups.setdefault((r.scenario, r.policy), []).append(r)
    return GuaranteesReport(
        scenarios=tuple(summarize_guarantee(sc, pol, rs) for (sc, pol), rs in groups.items()),
        results=tuple(finished),
        seconds=time.perf_counter() - started,
    )


def _plan(
    scenarios: Sequence[str], n: int, ack_policies: Sequence[Policy], loop_policy: Policy, url: str
) -> list[tuple[str, Callable[..., Awaitable[GuaranteeTrial]]]]:
    """Every trial as ``(label, make)``, scenario by scenario; ``make(workdir=, seed=)`` runs it.

    Acknowledgements take the calls in turn, each policy starting one call
    further, so a handful of trials still covers several calls.
    """
    plan: list[tuple[str, Callable[..., Awaitable[GuaranteeTrial]]]] = []
    if "ack" in scenarios:
        for j, pol in enumerate(ack_policies):
            for k in range(n):
                op = OPS[(j + k) % len(OPS)]
                plan.append(
                    (f"ack {pol.name}: {op} {k + 1}/{n}", partial(guarantees.ack_trial, pol, op, valkey_url=url))
                )
    if "lineage" in scenarios:
        plan.extend((f"lineage {k + 1}/{n}", partial(guarantees.lineage_trial, valkey_url=url)) for k in range(n))
    if "crash-loop" in scenarios:
        make = partial(guarantees.crash_loop_trial, loop_policy, valkey_url=url)
        plan.extend((f"crash loop {k + 1}/{n}", make) for k in range(n))
    return plan
