"""SIGKILL crash trials: kill a child mid-workload, recover, check invariants, measure what was lost.

The parent side of the trials (the child is ``_child.py``, its memory read from
the trace it leaves, ``_trace.py``), and the one judge of every SIGKILL in the
harness, ``judge``, which ``hotstate demo`` and the #10 guarantees' trials
(``_guarantees.py``) use too. One trial:

1. start the child on a policy (a fresh SQLite file, a fresh Valkey key prefix)
   and a shared trace file; wait for its ``Ready`` message;
2. SIGKILL it after a random delay (seeded), noting ``time.monotonic()`` (system-wide
   on Linux, so the child's commit times compare with it);
3. read what the child had committed in memory (the trace survives SIGKILL) and
   what every tier holds, then, unless ``verify=False``, recover in a fresh
   ``Runtime(recover=True)`` in this process, drive every run to its end and
   check the invariants:

   - no run lost: every run the child knew durable (or, under write-through,
     had acknowledged) is in a tier;
   - no corrupt snapshot, no unreadable tier, no unregistered workflow;
   - no version regression: each run resumes at or above the newest version the
     child knew durable, and its stored history never reuses a version;
   - no duplicate: ``spawn`` with every run id the child used returns that run;
   - every run finishes: done, or failed and dead-lettered exactly for the runs
     designed to fail;
   - under write-through, no acknowledged step lost.

The loss window of a trial is the kill time minus the commit time of the oldest
version that was in the child's memory but in no tier (0 when nothing was lost).
A write-behind policy promises at most its interval plus one flush duration.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import signal
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread

from hotstate import Runtime, Status
from hotstate._bench import _trial as trial
from hotstate._bench._child import Child, ChildConfig, Ready
from hotstate._bench._persist import drop_prefix
from hotstate._bench._policy import Policy, find_policy
from hotstate._bench._trace import Trace, read_trace
from hotstate._bench._trial import Workload

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from hotstate.actors import Transition
    from hotstate.persistence import Store

# A run slot holds commit times for this many versions; the trial workflow uses
# about 12 + work_steps versions per run (retries and compensations included).
_VERSIONS = 48
# What ``stored_headers`` gives per run: the newest version any tier holds, and its step.
Stored = dict[str, tuple[int, int]]
# Seconds the recovered runs get to finish: a hang guard (driving them takes
# under 1 s; a hung trial is reported as a violation and the suite goes on).
DRIVE_WITHIN = 20.0


# ------------------------------------------------------------------ records


def saturated_bound(interval: float, flush: float) -> float:
    """What a crash can lose when flushes may outlast the interval (s).

    One flush is in flight at a time: a version committed just after a flush
    took its batch waits for that flush and then for the next one.
    """
    return max(interval, flush) + flush


@dataclass(frozen=True, slots=True, kw_only=True)
class TrialResult:
    """What one SIGKILL trial found.

    Attributes:
        policy: the policy's name.
        seed: the trial's seed.
        interval: the policy's loss-window interval (0: write-through).
        write_through: whether the policy is write-through.
        runs: runs the child had started (committed at least once).
        runs_checked: runs recovered, driven to their end and checked (0 unless verified).
        steps_before_kill: transitions the child had committed.
        steps_lost: committed transitions found in no tier.
        runs_lost: runs found in no tier at all (never durable; none acknowledged).
        loss_window: kill time minus the commit time of the oldest lost version (s).
        acknowledged_steps_lost: versions lost that the child knew durable or
            (write-through) had acknowledged by starting the next step from them.
        corrupt_snapshots: copies the recovery report rejected.
        violations: broken invariants, as sentences (empty: the trial passed).
        steps_per_s: the child's committed transitions per second before the kill.
        flush_duration: the longest flush of the window's tier (s): the longest the
            child reported, or the write in flight at the kill if that had
            already run longer.
        kill_after: seconds between the child's ``ready`` and the kill.
        recovery_seconds: how long ``Runtime(recover=True)`` took to start.
    """

    policy: str
    seed: int
    interval: float
    write_through: bool
    runs: int
    runs_checked: int
    steps_before_kill: int
    steps_lost: int
    runs_lost: int
    loss_window: float
    acknowledged_steps_lost: int
    corrupt_snapshots: int
    violations: tuple[str, ...]
    steps_per_s: float
    flush_duration: float
    kill_after: float
    recovery_seconds: float

    @property
    def policy_window(self) -> float:
        """What the policy promises a crash can lose: interval + one flush (s)."""
        return self.interval + self.flush_duration

    def within_window(self, allowance: float = 0.0) -> bool:
        """True when the measured loss window is inside the policy's, plus ``allowance``."""
        return self.loss_window <= self.policy_window + allowance

    @property
    def saturated_window(self) -> float:
        """The bound when a flush can outlast the interval (s).

        One flush is in flight at a time, so a version committed just after a
        flush took its batch waits for that flush and then for the next: the
        longer of the interval and a flush, plus one flush (two flushes under
        write-through). It equals ``policy_window`` while flushes are shorter
        than the interval.
        """
        return saturated_bound(self.interval, self.flush_duration)

    def within_saturated_window(self) -> bool:
        """True when the measured loss window is inside ``saturated_window``."""
        return self.loss_window <= self.saturated_window


# ------------------------------------------------------------------- stores


async def stored_headers(stores: Sequence[Store]) -> Stored:
    """The newest ``(version, step)`` of every run across the tiers, from headers only.

    A dead-letter record carries the run's final snapshot and is written before
    the run's row (recovery records the run as failed from it), so it counts.
    """
    best: Stored = {}
    for store in stores:
        async with store:
            headers = [letter.snapshot.header for letter in await store.dead_letters()]
            after: str | None = None
            while True:
                page = await store.scan(after=after, limit=5000)
                headers.extend(page)
                if len(page) < 5000:
                    break
                after = page[-1].run_id
            for h in headers:
                if h.version > best.get(h.run_id, (0, 0))[0]:
                    best[h.run_id] = (h.version, h.step)
    return best


# -------------------------------------------------------------------- child


async def _run_and_kill(
    config: ChildConfig, log: Path, kill_after: float, ready_within: float
) -> tuple[float, int, str]:
    """Start the child, wait for ``Ready``, SIGKILL it ``kill_after`` s later.

    Returns:
        ``(kill time, return code, stderr tail)``; the kill time is 0 when the
        child never became ready.
    """
    child = await anyio.to_thread.run_sync(Child, config, log)  # fork/exec off the loop
    killed_at = 0.0
    try:
        message = await anyio.to_thread.run_sync(
            child.next_message, time.monotonic() + ready_within, abandon_on_cancel=True
        )
        if isinstance(message, Ready):
            # The random moment of the crash: this wait is the trial's input, not a sync.
            await anyio.sleep(kill_after)
            killed_at = time.monotonic()
    except TimeoutError:
        pass  # judged as a child that did not run until the kill
    finally:
        with anyio.CancelScope(shield=True):  # a cancelled trial still kills and reaps its child
            status = await anyio.to_thread.run_sync(child.kill)
    return killed_at, status, child.stderr_tail()


# -------------------------------------------------------------------- trial


async def run_trial(
    policy: Policy | str,
    *,
    valkey_url: str,
    workdir: Path,
    seed: int,
    kill_after: tuple[float, float] = (0.05, 0.4),
    workload: Workload | None = None,
    verify: bool = True,
    use_uvloop: bool = True,
    ready_within: float = 30.0,
    keep: bool = False,
) -> TrialResult:
    """Run one SIGKILL trial; its files and Valkey keys are deleted afterwards.

    Args:
        policy: the policy (or a name ``find_policy`` understands).
        valkey_url: the Valkey server (used only when the policy has a Valkey tier).
        workdir: where the SQLite file and the trace go.
        seed: seeds the kill moment.
        kill_after: the kill comes uniformly within this many seconds after ``ready``.
        workload: the child's workload.
        verify: recover in a fresh runtime and check every invariant; False only
            reads the tiers' headers (enough to measure the loss).
        use_uvloop: run the child on uvloop.
        ready_within: seconds the child may take to become ready.
        keep: keep the SQLite file, trace, child log and Valkey keys (post-mortem
            of a violation; the prefix is ``hs-crash-`` + the files' tag).

    Returns:
        The trial's record.

    Raises:
        ValueError: the policy is not understood.
    """
    pol = find_policy(policy) if isinstance(policy, str) else policy
    wl = workload if workload is not None else Workload()
    rng = random.Random(seed)
    delay = rng.uniform(*kill_after)
    tag = uuid.uuid4().hex[:10]
    db, trace_path, log = workdir / f"crash-{tag}.db", workdir / f"crash-{tag}.trace", workdir / f"crash-{tag}.log"
    config = ChildConfig(
        policy=pol.spec,
        sqlite=str(db),
        valkey_url=valkey_url,
        prefix=f"hs-crash-{tag}",
        trace=str(trace_path),
        runs=wl.max_runs,
        versions=_VERSIONS,
        trial=wl,
        use_uvloop=use_uvloop,
    )
    try:
        killed_at, rc, tail = await _run_and_kill(config, log, delay, ready_within)
        return await _judge(
            pol, wl, config, seed=seed, delay=delay, killed_at=killed_at, rc=rc, tail=tail, verify=verify
        )
    finally:
        if not keep:
            await clean(pol, valkey_url, config.prefix, (trace_path, log, db))


async def clean(pol: Policy, valkey_url: str, prefix: str, paths: Sequence[Path]) -> None:
    """Delete a trial's files (an SQLite file with its WAL) and its Valkey keys."""
    for path in paths:
        # The database, its WAL and shared memory, and the same three of its ownership authority.
        for base in (path.name, path.name + "-authority"):
            for suffix in ("", "-wal", "-shm"):
                path.with_name(base + suffix).unlink(missing_ok=True)
    if any(t.kind == "valkey" for t in pol.tiers):
        await drop_prefix(valkey_url, prefix)


async def judge(
    config: ChildConfig, killed_at: float, violations: list[str], run_ids: Sequence[str] | None = None
) -> tuple[Trace, Stored, Loss]:
    """The harness's one judge: what the killed child's memory held (its trace) that no tier holds.

    Args:
        config: the killed child's config (its trace file, policy and stores).
        killed_at: ``time.monotonic()`` of the kill.
        violations: broken invariants are appended here.
        run_ids: the run id of each trace slot (default: the trial's ``run_id``).

    Returns:
        The trace, the newest copy of each run in the tiers, and the loss.
    """
    pol = Policy.parse(config.policy)
    trace = read_trace(Path(config.trace), config.layout, len(pol.tiers))
    stored = await stored_headers(config.stores())
    loss = losses(pol, trace, stored, killed_at, violations, run_ids)
    loss.flush = flush_duration(pol, trace, killed_at)
    return trace, stored, loss


async def _judge(
    pol: Policy,
    wl: Workload,
    config: ChildConfig,
    *,
    seed: int,
    delay: float,
    killed_at: float,
    rc: int | None,
    tail: str,
    verify: bool,
) -> TrialResult:
    violations: list[str] = []
    if killed_at == 0.0 or rc != -signal.SIGKILL:
        violations.append(f"child did not run until the kill (return code {rc}): {tail.strip()[-500:]}")
        killed_at = killed_at or time.monotonic()
    trace, stored, loss = await judge(config, killed_at, violations)
    checked, corrupt, recovery_seconds = 0, 0, 0.0
    if verify and trace.started:
        checked, corrupt, recovery_seconds = await _recover_and_check(wl, trace, stored, config.stores, violations)
    elapsed = killed_at - trace.ready if trace.ready else 0.0
    return TrialResult(
        policy=pol.name,
        seed=seed,
        interval=pol.interval,
        write_through=pol.write_through,
        runs=sum(1 for h in trace.hot if h > 0),
        runs_checked=checked,
        steps_before_kill=trace.commits,
        steps_lost=loss.steps,
        runs_lost=loss.runs,
        loss_window=loss.window,
        acknowledged_steps_lost=loss.acknowledged,
        corrupt_snapshots=corrupt,
        violations=tuple(violations),
        steps_per_s=trace.commits / elapsed if elapsed > 0 else 0.0,
        flush_duration=loss.flush,
        kill_after=delay,
        recovery_seconds=recovery_seconds,
    )


def flush_duration(pol: Policy, trace: Trace, killed_at: float) -> float:
    """The window tier's longest flush, counting the write in flight at the kill.

    The child's statistics cover completed flushes only; its save stamps show a
    write that started and never ended, which had lasted at least
    ``kill - start`` (its encoding, before the write, is not counted).
    """
    if not trace.flush:
        return 0.0
    _, longest, started, ended = trace.flush[pol.window_tier]
    in_flight = killed_at - started if started > ended else 0.0
    return max(longest, in_flight)


@dataclass(slots=True)
class Loss:
    """What the tiers miss of what the child's memory held at the kill."""

    steps: int = 0  # committed versions found in no tier
    runs: int = 0  # runs found in no tier at all (never durable)
    runs_behind: int = 0  # runs whose newest committed version is in no tier
    steps_behind: int = 0  # step cursors the tiers' newest copies are behind memory's, summed
    window: float = 0.0  # kill time minus the commit time of the oldest lost version (s)
    # Versions lost that the child knew durable or (write-through) had
    # acknowledged by starting the next step from them.
    acknowledged: int = 0
    # The window tier's longest flush, the write in flight at the kill included
    # (s): the policy window is the interval plus this.
    flush: float = 0.0


def losses(
    pol: Policy,
    trace: Trace,
    stored: Stored,
    killed_at: float,
    violations: list[str],
    run_ids: Sequence[str] | None = None,
) -> Loss:
    """Compare what the child had in memory with what the tiers hold (run ``i`` is ``run_ids[i]``)."""
    loss = Loss()
    oldest = killed_at
    for i in range(trace.started):
        hot = trace.hot[i]
        if hot == 0:
            continue  # an index handed out, never spawned
        rid = trial.run_id(i) if run_ids is None else run_ids[i]
        durable, step = stored.get(rid, (0, 0))
        known = trace.durable[i]
        acknowledged = max(known, trace.acked[i] if pol.write_through else 0)
        if durable < known:
            violations.append(
                f"version regression: {rid} is at v{durable} in the tiers, the child knew v{known} durable"
            )
        if durable < acknowledged:
            loss.acknowledged += acknowledged - durable
            if durable == 0:
                violations.append(f"run lost: {rid} was acknowledged (v{acknowledged}) but is in no tier")
        if hot > durable:
            loss.steps += hot - durable
            loss.runs += durable == 0
            loss.runs_behind += 1
            loss.steps_behind += max(0, trace.steps[i] - step)
            first = durable + 1
            if first < len(trace.times[i]) and trace.times[i][first] > 0:
                oldest = min(oldest, trace.times[i][first])
    if loss.acknowledged and pol.write_through:
        violations.append(f"write-through lost {loss.acknowledged} acknowledged step(s)")
    loss.window = max(0.0, killed_at - oldest)
    return loss


async def _recover_and_check(
    wl: Workload,
    trace: Trace,
    stored: Stored,
    stores: Callable[[], list[Store]],
    violations: list[str],
) -> tuple[int, int, float]:
    """Recover in a fresh runtime, drive every run to its end, check the invariants.

    Returns:
        ``(runs checked, corrupt copies, recovery seconds)``.
    """
    from hotstate import FlushPolicy, Tier

    driver = trial.SignalDriver()
    wf = trial.make_workflow(
        work_steps=wl.work_steps, fail_every=wl.fail_every, flaky_every=wl.flaky_every, request_signal=driver.request
    )
    ids = [trial.run_id(i) for i in range(trace.started) if trace.hot[i] > 0]
    tiers = [Tier(s, FlushPolicy(interval=0.01)) for s in stores()]
    t0 = time.perf_counter()
    async with Runtime([wf], tiers=tiers, recover=True, shutdown_timeout=2.0) as rt:
        recovery_seconds = time.perf_counter() - t0
        report = rt.recovery_report
        assert report is not None  # noqa: S101 - recover=True
        violations.extend(f"corrupt snapshot: {c.run_id} v{c.version} in {c.tier}: {c.reason}" for c in report.corrupt)
        violations.extend(f"recovery found no verifiable copy of {rid}" for rid in report.lost)
        violations.extend(f"unregistered workflow {wf_name!r} for {rid}" for rid, wf_name in report.unregistered)
        violations.extend(f"tier {t} unreadable at recovery: {e}" for t, e in report.tier_errors.items())
        violations.extend(
            f"{r.run_id} resumed from v{r.version} below the stored v{stored[r.run_id][0]}"
            for r in report.resumed
            if r.version < stored.get(r.run_id, (0, 0))[0]
        )
        for rid in ids:
            handle = await rt.spawn(wf, trial.payload(trial.run_index(rid)), run_id=rid)
            have = stored.get(rid, (0, 0))[0]
            now = rt.get(handle.run_id).version
            if now < have:
                violations.append(f"spawn adopted an older copy: spawn({rid}) gave v{now}; the tiers hold v{have}")
            elif have == 0 and now != 1:
                violations.append(f"spawn({rid}) gave v{now}; no tier holds it")
        if rt.count() != len(ids):
            violations.append(f"duplicate or missing runs: {rt.count()} in the runtime, {len(ids)} run ids")
        try:
            with anyio.fail_after(DRIVE_WITHIN):  # a hang guard only
                await driver.drive(rt, ids)
        except TimeoutError:  # one hung trial is a finding of the suite, not the end of it
            stuck = [rt.get(rid) for rid in ids if not rt.get(rid).finished]
            violations.append(
                f"{len(stuck)} recovered runs never finished ({DRIVE_WITHIN:g} s), e.g. "
                + ", ".join(f"{s.run_id} {s.status.value} at step {s.step} v{s.version}" for s in stuck[:3])
            )
        await rt.flush()
        final = {rid: rt.get(rid) for rid in ids}
    failing = {rid for rid in ids if trial.fails_for_good(trial.run_index(rid), wl.fail_every)}
    for rid, snap in final.items():
        want = Status.failed if rid in failing else Status.done
        if snap.status is not want:
            violations.append(f"{rid} ended {snap.status.value}, expected {want.value}")
    await _check_stores(stores(), final, failing, stored, violations)
    return len(ids), len(report.corrupt), recovery_seconds


async def _check_stores(
    stores: list[Store], final: dict[str, Any], failing: set[str], stored: Stored, violations: list[str]
) -> None:
    """After the graceful exit: final versions in the tiers, dead letters, histories."""
    letters: dict[str, int] = {}
    newest: dict[str, int] = {}
    for store in stores:
        async with store:
            for d in await store.dead_letters():
                letters[d.run_id] = max(letters.get(d.run_id, 0), d.snapshot.header.version)
            loaded = await store.load_many(list(final))
            for rid, s in loaded.items():
                newest[rid] = max(newest.get(rid, 0), s.header.version)
            for rid, snap in final.items():
                if snap.version > stored.get(rid, (0, 0))[0]:  # changed after the crash: its history grew
                    _check_history(rid, await store.history(rid), store.tier, violations)
    for rid, snap in final.items():
        if (row := newest.get(rid, 0)) != snap.version:
            violations.append(f"{rid}: the tiers hold v{row} after a graceful exit, memory v{snap.version}")
    violations.extend(
        f"dead letter missing: {rid} failed for good but no tier holds its dead-letter record"
        for rid in sorted(failing - set(letters))
    )
    violations.extend(
        f"unexpected dead letter: {rid} was not designed to fail"
        for rid in sorted((set(letters) & set(final)) - failing)
    )


def _check_history(rid: str, history: list[Transition], tier: str, violations: list[str]) -> None:
    versions = [t.version for t in history]
    if any(b <= a for a, b in itertools.pairwise(versions)):
        violations.append(f"{rid}: stored history in {tier} reuses or reorders versions {versions}")


def as_dict(result: TrialResult) -> dict[str, Any]:
    """A JSON-able dict of one trial (with the policy window)."""
    return {**dataclasses.asdict(result), "violations": list(result.violations), "policy_window": result.policy_window}
