"""The judge of the ownership scenarios: ``judge`` checks every invariant once a scenario's workers stopped.

From the workers' ledgers, the ownership log and every store (read by
``_readers.py``; the log and the leases from whichever authority the cluster
uses), ``judge`` checks:

1. **authority**: per shard, acquired epochs strictly increase; a release
   names the epoch held; every execution ran under an epoch its member was
   granted;
2. **leases**: no two lease intervals of a shard overlap (an interval ends at
   its release, else at the last expiry seen by ``LeaseWatch``, or at the
   death of its process when that process was on this host: then the next
   claim may break it at once);
3. **runs**: every run finished, as designed (``held`` runs cancelled, the
   others done), with one copy per tier at the same ``(epoch, version)``, a
   history whose versions strictly increase and whose every step transition is
   an execution in a ledger, and a trail naming each step once;
4. **duplicates**: an idempotency key executed more than once is allowed only
   when all executions but one were by a faulted process at or after its
   fault minus ``CRASH_WINDOW`` (until ``CRASH_WINDOW`` after a pause, cut or
   outage ended), and each later owner ran under a higher epoch;
   graceful scenarios must show none;
5. **zombies** (SIGSTOP, cut): nothing the paused or cut process executed
   after the takeover is in any stored copy (final or kept) or history;
6. **calls**: every acknowledged signal is applied exactly once and no
   signal refused with a typed error was applied; every acknowledged cancel
   ended its run cancelled; no spawn id is answered ``created=True`` twice
   (an answer lost because its owner let the shard go before recording it is
   counted in ``Report.spawn_answers_lost``);
7. **takeover**: per shard the faulted process held, detection (fault to the
   next claim) within ``claim_every`` when the dead process was on this host
   (its lease is broken at once), else within ``ttl + renew_every +
   claim_every`` (the lease runs out ``ttl`` after the last renewal, and the
   others see the member gone at their next renewal, then claim at their next
   placement round), with 0.5 s for scheduling; and load (claim to the last
   run of the shard resumed) within ``LOAD_BUDGET`` (plus the statement
   timeout of a tier the new owner was cut from: its seal there waits that
   long);
8. **self-fencing** (``cut``, ``outage``): a worker that cannot reach the
   authority runs no step of a shard under its epoch past its deadline
   (``ttl - margin`` after its last renewal, at most after the fault).

Each scenario also stops its workers with SIGTERM and expects exit status 0
and no internal error in any worker's runtime (``RuntimeStatistics``).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from hotstate._bench._readers import (
    TERMINAL,
    Execution,
    LogEvent,
    TierView,
    authority_clock,
    ownership_log,
    read_ledgers,
    read_tier,
    resumed_runs,
)
from hotstate.persistence import shard_of

if TYPE_CHECKING:
    from collections.abc import Sequence

    from hotstate._bench._cluster import Cluster, Fault
    from hotstate._bench._owner_worker import WorkerConfig
    from hotstate._bench._scenarios import Traffic
    from hotstate.actors import Snapshot, Transition

__all__ = [
    "CRASH_WINDOW",
    "LOAD_BUDGET",
    "Report",
    "Takeover",
    "judge",
]

CRASH_WINDOW: Final = 0.5
"""Seconds before a fault in which an execution may be lost from every tier (and so run again)."""
LOAD_BUDGET: Final = 1.0
"""Seconds a new owner may take from its claim to its first resumed run (a few hundred runs per shard)."""
EXPECTED: Final = {"plain": "done", "signalled": "done", "held": "cancelled"}
LEASE_FAULTS: Final = ("kill", "stop", "cut")
"""Faults after which another process takes the faulted one's shards (``cut``: from the lease authority)."""


@dataclass(frozen=True, slots=True)
class Takeover:
    """A shard of a faulted worker, taken by another.

    Attributes:
        shard: the shard.
        kind: the fault (``kill``, ``stop``, ``term``).
        local: the faulted worker shared this host's pid namespace.
        detection: seconds from the fault to the next claim of the shard.
        load: seconds from that claim until its owner resumed the last run of it (None: nothing to resume).
    """

    shard: int
    kind: str
    local: bool
    detection: float
    load: float | None


@dataclass
class Report:
    """What ``judge`` found in one scenario (``violations`` must be empty)."""

    scenario: str
    runs: int = 0
    executions: int = 0
    duplicates: int = 0
    max_duplicate_age: float = 0.0  # fault time minus the earliest duplicated execution's time
    zombie_executions: int = 0
    late_executions: int = 0  # executions of a cut-off owner past its deadline (under the held epoch)
    max_overshoot: float = 0.0  # seconds the latest of them ran past the deadline
    signals_sent: int = 0
    signals_acked: int = 0
    signals_unacked_applied: int = 0
    cancels_acked: int = 0
    same_id_spawns: int = 0
    spawn_answers_lost: list[str] = field(default_factory=list)  # created by a call that was told created=False
    calls: int = 0
    via_non_owner: int = 0
    acquires: int = 0
    releases: int = 0
    leases_checked: int = 0
    leases_unobserved: int = 0
    takeovers: list[Takeover] = field(default_factory=list)
    outcomes: dict[str, int] = field(default_factory=dict)
    errors: list[tuple[float, str, str, str, str]] = field(default_factory=list)  # calls that raised
    notes: dict[str, float] = field(default_factory=dict)  # a scenario's own figures
    violations: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """A JSON-able record."""
        out = dataclasses.asdict(self)
        out["violations"] = self.violations[:20]
        return out

    def summary(self) -> str:
        """One line for logs and assertion messages."""
        return (
            f"{self.scenario}: {self.runs} runs, {self.executions} executions, {self.duplicates} duplicates, "
            f"{self.zombie_executions} zombie executions, {self.signals_acked}/{self.signals_sent} signals acked, "
            f"{self.cancels_acked} cancels, {self.via_non_owner}/{self.calls} calls via non-owners, "
            f"{len(self.takeovers)} takeovers, {len(self.violations)} violations in {self.seconds:.1f} s"
        )


async def judge(cluster: Cluster, traffic: Traffic, *, scenario: str, started: float) -> Report:
    """Check every invariant of the module doc once every worker has stopped; the report."""
    report = Report(scenario, calls=traffic.calls, via_non_owner=traffic.via_non_owner)
    report.outcomes = dict(traffic.outcomes)
    report.errors = list(traffic.errors)
    report.signals_sent, report.signals_acked = len(traffic.sent), len(traffic.acked)
    report.cancels_acked = len(traffic.cancelled)
    report.same_id_spawns = len(traffic.same_ids)
    cfg = cluster.base
    log = await ownership_log(cluster)
    executions = read_ledgers(cluster.ledgers)
    report.executions = len(executions)
    _check_authority(log, executions, report)
    wall = await authority_clock(cluster)
    expiries = {key: wall(at) for key, at in cluster.watch.expiries.items()}
    _check_leases(log, expiries, cluster.faults, report)
    tiers = [await read_tier(store, kept=cfg.keep_every is not None) for store in cfg.stores()]
    for view in tiers:
        report.violations.extend(view.problems)
    runs = set(traffic.runs).union(*(view.finals for view in tiers))
    report.runs = len(runs)
    takes = _takeovers(log, await resumed_runs(cluster), cluster.faults, cfg, report)
    zombies = _zombies(executions, cluster.faults, takes)
    report.zombie_executions = len(zombies)
    for view in tiers:
        _check_tier(view, runs, traffic, executions, zombies, report)
    _check_tiers_agree(tiers, runs, report)
    _check_duplicates(executions, cluster.faults, report)
    _check_self_fence(log, executions, cluster.faults, cfg, report)
    _check_calls(tiers[-1], traffic, report)
    report.seconds = time.time() - started
    return report


def _check_authority(log: Sequence[LogEvent], executions: Sequence[Execution], report: Report) -> None:
    """Epochs strictly increase per shard; a release names the held epoch; executions ran under granted epochs."""
    v = report.violations
    held: dict[int, LogEvent] = {}
    granted: set[tuple[int, int, str]] = set()
    last: dict[int, int] = {}
    for e in log:
        if e.event == "acquire":
            report.acquires += 1
            if e.epoch <= last.get(e.shard, 0):
                v.append(f"shard {e.shard}: epoch {e.epoch} acquired after epoch {last[e.shard]}")
            last[e.shard] = max(e.epoch, last.get(e.shard, 0))
            held[e.shard] = e
            granted.add((e.shard, e.epoch, e.owner))
        elif e.event == "release":
            report.releases += 1
            h = held.pop(e.shard, None)
            if h is None or (h.epoch, h.owner) != (e.epoch, e.owner):
                v.append(f"shard {e.shard}: release of epoch {e.epoch} by {e.owner[:8]}, held: {h}")
    for x in executions:
        if x.epoch and (x.shard, x.epoch, x.member) not in granted:
            v.append(
                f"{x.key} executed by {x.member[:8]} under epoch {x.epoch} of shard {x.shard}, never granted to it"
            )


def _check_leases(
    log: Sequence[LogEvent],
    expiries: dict[tuple[int, str, float], float],
    faults: Sequence[Fault],
    report: Report,
) -> None:
    """No two lease intervals of a shard overlap."""
    deaths = {f.member: f.at for f in faults if f.kind == "kill" and f.local}
    current: dict[int, LogEvent] = {}
    for e in log:
        if e.event == "release":
            if (h := current.get(e.shard)) is not None and (h.epoch, h.owner) == (e.epoch, e.owner):
                del current[e.shard]
            continue
        prev = current.get(e.shard)
        current[e.shard] = e
        if prev is None:
            continue
        report.leases_checked += 1
        end = expiries.get((prev.shard, prev.owner, prev.raw))
        died = deaths.get(prev.owner)
        if died is not None and died <= e.at:
            end = died if end is None else min(end, died)  # provably gone: the lease may be broken at once
        if end is None:
            report.leases_unobserved += 1
        elif e.at < end:
            report.violations.append(
                f"shard {e.shard}: epoch {e.epoch} acquired by {e.owner[:8]} at {e.at:.3f},"
                f" {end - e.at:.3f} s before epoch {prev.epoch}'s lease ({prev.owner[:8]}) ended"
            )


def _holders(log: Sequence[LogEvent], at: float) -> dict[int, LogEvent]:
    """Who held each shard at ``at``, by the log."""
    held: dict[int, LogEvent] = {}
    for e in log:
        if e.at > at:
            break
        if e.event == "acquire":
            held[e.shard] = e
        elif (h := held.get(e.shard)) is not None and h.owner == e.owner:
            del held[e.shard]
    return held


def _takeovers(
    log: Sequence[LogEvent],
    resumed: Sequence[tuple[str, float]],
    faults: Sequence[Fault],
    cfg: WorkerConfig,
    report: Report,
) -> dict[tuple[str, int], LogEvent]:
    """Per fault and shard the faulted worker held: the next claim; checks the bound. Keys: (member, shard)."""
    resumed_at: dict[int, list[float]] = defaultdict(list)
    for run_id, at in resumed:
        resumed_at[shard_of(run_id, cfg.shards)].append(at)
    takes: dict[tuple[str, int], LogEvent] = {}
    for f in faults:
        if f.kind not in LEASE_FAULTS:
            continue
        for shard, h in _holders(log, f.at).items():
            if h.owner != f.member:
                continue
            nxt = next((e for e in log if e.shard == shard and e.event == "acquire" and e.at > f.at), None)
            if nxt is None:
                report.violations.append(f"shard {shard} of {f.name} ({f.kind}) was never taken over")
                continue
            takes[f.member, shard] = nxt
            until = next((e.at for e in log if e.shard == shard and e.at > nxt.at), math.inf)  # its holding ends
            loads = [at for at in resumed_at[shard] if nxt.at <= at < until]
            load = max(loads) - nxt.at if loads else None  # every run of the shard resumed
            t = Takeover(shard, f.kind, f.local, nxt.at - f.at, load)
            report.takeovers.append(t)
            lapse = 0.0 if f.kind == "kill" and f.local else cfg.ttl + cfg.renew_every
            bound = lapse + cfg.claim_every + 0.5
            if t.detection > bound:
                report.violations.append(f"shard {shard}: taken {t.detection:.2f} s after {f.kind}, bound {bound:.2f}")
            budget = LOAD_BUDGET + _cut_wait(nxt.owner, nxt.at, faults, cfg)
            if load is not None and load > budget:
                report.violations.append(f"shard {shard}: its last run resumed {load:.2f} s after the claim")
    return takes


def _cut_wait(member: str, at: float, faults: Sequence[Fault], cfg: WorkerConfig) -> float:
    """Seconds a new owner cut from a tier at ``at`` waits before loading: its seal there times out first."""
    wait = 0.0
    for f in faults:
        if f.member == member and f.kind in ("cut", "cut-valkey") and f.at <= at <= (f.until or f.at):
            wait = max(wait, cfg.postgres_timeout if f.kind == "cut" else cfg.valkey_timeout)
    return wait


def _zombies(
    executions: Sequence[Execution], faults: Sequence[Fault], takes: dict[tuple[str, int], LogEvent]
) -> dict[tuple[int, float], Execution]:
    """Executions of a paused or cut worker after another claimed the shard, under its old epoch. Keys: (pid, t)."""
    out: dict[tuple[int, float], Execution] = {}
    for f in faults:
        if f.kind not in ("stop", "cut"):
            continue
        for x in executions:
            take = takes.get((f.member, x.shard))
            if x.pid == f.pid and take is not None and x.t >= take.at and x.epoch < take.epoch:
                out[x.pid, x.t] = x
    return out


def _steps_of(workflow: str, cfg: WorkerConfig) -> int:
    return {"plain": cfg.steps, "signalled": 1 + 2 * cfg.waits, "held": 1}.get(workflow, 0)


def _check_tier(
    view: TierView,
    runs: set[str],
    traffic: Traffic,
    executions: Sequence[Execution],
    zombies: dict[tuple[int, float], Execution],
    report: Report,
) -> None:
    """Every run finished as designed in this tier; trails and histories are real, and zombie-free."""
    v = report.violations
    cfg = traffic.cluster.base
    for run_id in sorted(runs):
        held = view.finals.get(run_id)
        if held is None:
            v.append(f"{view.tier}: run {run_id} is missing")
            continue
        epoch, snap = held
        want = EXPECTED.get(snap.workflow, "done")
        if snap.status.value != want:
            v.append(f"{view.tier}: run {run_id} ({snap.workflow}) ended {snap.status.value}, expected {want}")
        _check_trail(view.tier, snap, epoch, _steps_of(snap.workflow, cfg), zombies, v)
        _check_history(view.tier, snap, view.history.get(run_id, []), executions, zombies, v)
    for epoch, snap in view.kept:
        _check_trail(view.tier, snap, epoch, None, zombies, v)


def _check_trail(
    tier: str,
    snap: Snapshot,
    epoch: int,
    steps: int | None,
    zombies: dict[tuple[int, float], Execution],
    v: list[str],
) -> None:
    """The payload's trail names steps 0, 1, ... once each (all of them when done), under epochs up to the copy's."""
    trail = snap.payload.get("trail", []) if isinstance(snap.payload, dict) else []
    names = f"{tier}: run {snap.run_id} v{snap.version}"
    if [s for s, *_ in trail] != list(range(len(trail))):
        v.append(f"{names}: trail steps {[s for s, *_ in trail]}")
    if steps is not None and snap.status.value == "done" and len(trail) != steps:
        v.append(f"{names}: done after {len(trail)} of {steps} steps")
    epochs = [e for *_, e in trail]
    if epochs != sorted(epochs) or (epochs and max(epochs) > epoch):
        v.append(f"{names}: trail epochs {epochs} under a copy of epoch {epoch}")
    for _, pid, t, _ in trail:
        if (pid, t) in zombies:
            v.append(f"{names}: holds a step the paused process {pid} executed after the takeover")


def _check_history(
    tier: str,
    snap: Snapshot,
    history: Sequence[Transition],
    executions: Sequence[Execution],
    zombies: dict[tuple[int, float], Execution],
    v: list[str],
) -> None:
    """Versions strictly increase up to the copy's; one terminal transition, last; each step one real execution."""
    names = f"{tier}: run {snap.run_id}"
    versions = [t.version for t in history]
    if versions != sorted(set(versions)) or not versions or versions[-1] != snap.version:
        v.append(f"{names}: history versions {versions}, copy at v{snap.version}")
    ends = [t for t in history if t.status.value in TERMINAL]
    if len(ends) != 1 or ends[0] is not history[-1]:
        v.append(f"{names}: {len(ends)} terminal transitions in its history")
    by_step: dict[int, list[Execution]] = defaultdict(list)
    for x in executions:
        if x.run == snap.run_id:
            by_step[x.step].append(x)
    for tr in history:
        if tr.kind.value != "step":
            continue
        # A step starts at x.version; a signal taken while it runs puts transitions between.
        found = [x for x in by_step.get(tr.step, []) if x.version < tr.version and -0.001 <= tr.at - x.t <= 1.0]
        if not found:
            v.append(f"{names}: step transition v{tr.version} (step {tr.step}) matches no execution in a ledger")
            continue
        x = min(found, key=lambda x: tr.at - x.t)
        if (x.pid, x.t) in zombies:
            v.append(f"{names}: history v{tr.version} is a step the paused process {x.pid} ran after the takeover")


def _check_tiers_agree(tiers: Sequence[TierView], runs: set[str], report: Report) -> None:
    """Every tier holds each run at the same (epoch, version, status): one lineage."""
    for run_id in sorted(runs):
        seen = {
            view.tier: (e, s.version, s.status.value)
            for view in tiers
            if (h := view.finals.get(run_id))
            for e, s in [h]
        }
        if len(set(seen.values())) > 1:
            report.violations.append(f"run {run_id}: tiers disagree: {seen}")


def _faulty(x: Execution, faults: Sequence[Fault]) -> Fault | None:
    """The fault that may make ``x`` run again (it ran close before it, or while paused)."""
    for f in faults:
        if f.pid != x.pid or f.kind not in (*LEASE_FAULTS, "outage"):
            continue
        end = f.at if f.kind == "kill" else (f.until or f.at) + CRASH_WINDOW
        if f.at - CRASH_WINDOW <= x.t <= end:
            return f
    return None


def _check_self_fence(
    log: Sequence[LogEvent], executions: Sequence[Execution], faults: Sequence[Fault], cfg: WorkerConfig, report: Report
) -> None:
    """A worker that cannot reach the authority stops its shards at its deadline (design §4.4 and §5.2, item 7).

    Its last renewal began before the cut (or outage) at ``f.at``, so its
    deadline is at the latest ``f.at + ttl - margin``. An execution under the
    epoch it held then, recorded later than the deadline plus one step
    (``step_sleep``: the ledger line is written when the step ends) and
    0.1 s of scheduling, and before the link came back (a renewal may land
    after that), is a step run by a process that should have stopped.
    """
    margin = max(cfg.ttl / 10, 0.2) if cfg.ttl > 0.4 else cfg.ttl / 4  # as ShardManager's
    slack = cfg.step_sleep + 0.1
    for f in faults:
        if f.kind not in ("cut", "outage") or f.until is None:
            continue
        deadline = f.at + cfg.ttl - margin
        held = {s: h.epoch for s, h in _holders(log, f.at).items() if h.owner == f.member}
        for x in executions:
            if x.pid != f.pid or held.get(x.shard) != x.epoch or not deadline < x.t < f.until:
                continue
            late = x.t - deadline
            report.late_executions += 1
            report.max_overshoot = max(report.max_overshoot, late)
            if late > slack:
                report.violations.append(
                    f"{x.key}: {f.name} ran shard {x.shard} (epoch {x.epoch}) {late:.3f} s past its deadline"
                    f" ({f.kind} at {f.at:.3f}, ttl {cfg.ttl:g} - margin {margin:g})"
                )


def _check_duplicates(executions: Sequence[Execution], faults: Sequence[Fault], report: Report) -> None:
    """A key runs again only after a fault of the process that ran it, and each later owner is newer."""
    by_key: dict[str, list[Execution]] = defaultdict(list)
    for x in executions:
        by_key[x.key].append(x)
    for key, xs in by_key.items():
        if len(xs) < 2:
            continue
        report.duplicates += len(xs) - 1
        bad = [(x, f) for x in xs if (f := _faulty(x, faults)) is not None]
        good = [x for x in xs if _faulty(x, faults) is None]
        for x, f in bad:
            report.max_duplicate_age = max(report.max_duplicate_age, f.at - x.t)
        if len(good) > 1:
            report.violations.append(f"{key} executed {len(xs)} times, {len(good)} of them by no faulted process")
        if len({(x.pid, x.epoch) for x in xs}) < len(xs):
            report.violations.append(f"{key} executed twice by one process under one epoch")
        if any(g.epoch <= x.epoch for g in good for x, _ in bad if x.epoch):
            report.violations.append(f"{key} ran again under an epoch not above the faulted owner's")


def _check_calls(view: TierView, traffic: Traffic, report: Report) -> None:
    """Acknowledged signals applied once each, acknowledged cancels honoured, one creation per spawned id."""
    v = report.violations
    where: Counter[str] = Counter()
    for run_id, (_, snap) in view.finals.items():
        got = snap.payload.get("signals", []) if isinstance(snap.payload, dict) else []
        for sid in got:
            where[sid] += 1
            if traffic.sent.get(sid) != run_id:
                v.append(f"run {run_id} holds signal {sid}, never sent to it")
        if snap.workflow == "signalled" and snap.status.value == "done" and len(got) != traffic.waits:
            v.append(f"run {run_id} done with {len(got)} signals")
    for sid, n in where.items():
        if n > 1:
            v.append(f"signal {sid} applied {n} times")
    missing = [sid for sid in traffic.acked if where[sid] != 1]
    if missing:
        v.append(f"{len(missing)} acknowledged signals not applied exactly once, e.g. {missing[:3]}")
    report.signals_unacked_applied = sum(1 for sid in where if sid not in traffic.acked)
    for sid, error in traffic.refused.items():
        if where[sid]:  # a typed error says the call did nothing: a retry would apply it twice
            v.append(f"signal {sid} was refused with {error}, yet applied to run {traffic.sent[sid]}")
    for run_id in traffic.cancelled:
        held = view.finals.get(run_id)
        if held is None or held[1].status.value != "cancelled":
            v.append(f"run {run_id}: cancel acknowledged, run ended {held[1].status.value if held else 'missing'}")
    for run_id in traffic.runs:
        n = traffic.created[run_id]
        if n > 1:
            v.append(f"run {run_id}: {n} spawn calls answered created=True")
        elif n == 0 and run_id not in traffic.spawn_unknown:
            # The owner that created it let the shard go (crash, lease, hand-off) before it recorded
            # its answer: the next owner applied the entry again and answered created=False.
            report.spawn_answers_lost.append(run_id)
