"""The #10 guarantees as SIGKILL trials: the parent's side of the ack, lineage and crash-loop workloads.

Each trial runs the harness's one child runner (``_child.py``) with its own
workload; the child SIGKILLs itself at the moment under test (after sending a
typed message), the harness's one judge (``_crash.judge``) checks that nothing
the child knew durable is missing from the tiers, and the scenario's own check
follows:

- **ack**: an acknowledged call (``_ack.OPS``) then SIGKILL; violation: the
  acknowledged change is missing from an acknowledging tier (the write-through
  tiers and ``ack_tiers``, read directly, never through recovery).
- **lineage**: orders finished in Valkey (10 ms) and SIGKILLed before SQLite's
  flush; recovery, the parked orders paid, ``purge_finished(older_than=0)``,
  another restart; violation: a finished order resumed again, or a side
  effect (from the ledger every step appends to) executed twice.
- **crash-loop**: a step that SIGKILLs its process, started again with
  ``recover=True`` until the child exits on its own; violation: the poison run
  executed more than ``crash_limit`` times or not dead-lettered with
  ``CrashLoopError`` in every tier, or an ordinary run not ``done``.

Each trial is seeded (which call, how many orders, which stay parked, where the
poison job sits in the queue, how long each job works) and cleans up its files
and Valkey keys.
"""

from __future__ import annotations

import dataclasses
import random
import signal
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread

from hotstate import Runtime, Status, TransitionKind
from hotstate._bench import _ack as ack, _crashloop as crashloop, _lineage as lineage
from hotstate._bench._child import Child, ChildConfig, Message
from hotstate._bench._crash import clean, judge
from hotstate._bench._policy import Policy, find_policy
from hotstate.persistence import MsgpackCodec, SQLiteStore
from hotstate.persistence._records import decode_snapshot

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

    from hotstate import RecoveryReport, Snapshot, Tier, Transition

SCENARIOS = ("ack", "lineage", "crash-loop")
ACK_POLICIES = ("write-through sqlite", "write-through valkey", "write-behind+ack")
"""The policies whose acknowledgements are checked (each acknowledges in some tier)."""
LINEAGE_CHILD = "valkey:0.01,sqlite:60"  # the child: SQLite's flush surely comes after the kill
LINEAGE_POLICY = Policy.parse("valkey:0.01,sqlite:1", "write-behind valkey 10 ms + sqlite 1 s")
CRASH_LOOP_POLICY = "write-behind"
CRASH_LIMIT = 3
_EXIT_WITHIN = 60.0  # seconds a child may take to reach its kill or exit; a hang guard only


@dataclass(frozen=True, slots=True, kw_only=True)
class GuaranteeTrial:
    """What one trial of a #10 guarantee found.

    Attributes:
        scenario: from ``SCENARIOS``.
        policy: the policy's name.
        call: the acknowledged call (``ack``), else "".
        seed: the trial's seed.
        runs_checked: runs whose guarantee was checked (``ack``: the acknowledged
            run; ``lineage``: every order; ``crash-loop``: every job).
        violations: broken guarantees, as sentences (empty: the trial passed).
        seconds: how long the trial took.
        starts: child processes started (``crash-loop``: the first start and every restart).
    """

    scenario: str
    policy: str
    call: str
    seed: int
    runs_checked: int
    violations: tuple[str, ...]
    seconds: float
    starts: int = 1


def as_dict(trial: GuaranteeTrial) -> dict[str, Any]:
    """A JSON-able dict of one trial."""
    return {**dataclasses.asdict(trial), "violations": list(trial.violations)}


# -------------------------------------------------------------------- child


def _paths(workdir: Path, tag: str) -> tuple[Path, Path, Path, Path]:
    """The trial's SQLite file, trace, child log and ledger."""
    return workdir / f"{tag}.db", workdir / f"{tag}.trace", workdir / f"{tag}.log", workdir / f"{tag}.ledger"


async def run_child(config: ChildConfig, log: Path) -> tuple[list[Message], int | None, str]:
    """Run a child that ends by itself (its own SIGKILL or exit) and collect its messages.

    Returns:
        ``(messages, exit status, stderr tail)``; the status is None when the
        child had to be killed at the deadline.
    """
    child = await anyio.to_thread.run_sync(Child, config, log)  # fork/exec off the loop
    deadline = time.monotonic() + _EXIT_WITHIN
    messages: list[Message] = []
    timed_out = False
    try:
        while (m := await anyio.to_thread.run_sync(child.next_message, deadline, abandon_on_cancel=True)) is not None:
            messages.append(m)
    except TimeoutError:
        timed_out = True
    finally:
        with anyio.CancelScope(shield=True):  # a cancelled trial still kills and reaps its child
            status = await anyio.to_thread.run_sync(child.kill)
    return messages, None if timed_out else status, child.stderr_tail()


def _first(messages: list[Message], kind: type[Any]) -> Any:
    return next((m for m in messages if isinstance(m, kind)), None)


def _killed(rc: int | None, tail: str, what: str) -> list[str]:
    if rc == -signal.SIGKILL:
        return []
    return [f"the child did not {what} (exit status {rc}): {tail.strip()[-500:]}"]


async def _killed_after(
    config: ChildConfig, log: Path, kind: type[Any], killed: str, missing: str, violations: list[str]
) -> Any:
    """Run a child that says ``kind`` then SIGKILLs itself; the message, or None (both failures recorded)."""
    messages, rc, tail = await run_child(config, log)
    violations.extend(_killed(rc, tail, killed))
    said = _first(messages, kind)
    if said is None:
        violations.append(f"{missing}: {tail.strip()[-500:]}")
    return said


def _recovery_errors(report: RecoveryReport | None, violations: list[str]) -> None:
    if report is None:  # pragma: no cover - recover=True sets it
        violations.append("no recovery report")
        return
    violations.extend(f"corrupt copy: {c.run_id} v{c.version} in {c.tier}: {c.reason}" for c in report.corrupt)
    violations.extend(f"recovery found no verifiable copy of {rid}" for rid in report.lost)
    violations.extend(f"tier {t} unreadable at recovery: {e}" for t, e in report.tier_errors.items())


# ---------------------------------------------------------------------- ack


async def ack_trial(
    policy: Policy | str,
    op: str,
    *,
    valkey_url: str,
    workdir: Path,
    seed: int,
    check: Sequence[str] | None = None,
) -> GuaranteeTrial:
    """One acknowledged call under ``policy``, SIGKILL, then read the acknowledging tiers.

    Args:
        policy: the policy (or a name ``find_policy`` understands).
        op: the call, from ``_ack.OPS``.
        valkey_url: the Valkey server (used when the policy has a Valkey tier).
        workdir: where the trial's files go (deleted afterwards).
        seed: names the run (the call is the trial's input).
        check: the tiers to read (default: the policy's acknowledging tiers);
            a control names a tier that acknowledges nothing.

    Returns:
        The trial's record.

    Raises:
        ValueError: the policy is not understood, there is no tier to check, or ``op`` is unknown.
    """
    pol = find_policy(policy) if isinstance(policy, str) else policy
    tiers = tuple(check) if check is not None else pol.acknowledging
    if not tiers or op not in ack.OPS:
        raise ValueError(f"no acknowledging tier in {pol.name!r}, or unknown call {op!r}")
    t0 = time.perf_counter()
    tag = f"ack-{uuid.uuid4().hex[:10]}"
    db, trace, log, _ = _paths(workdir, tag)
    workload = ack.AckWorkload(op=op, run_id=f"{op}-{seed}")
    config = ChildConfig(
        policy=pol.spec,
        sqlite=str(db),
        valkey_url=valkey_url,
        prefix=f"hs-{tag}",
        trace=str(trace),
        runs=workload.churn + 1,
        ack=workload,
    )
    violations: list[str] = []
    try:
        said: ack.Acknowledged | None = await _killed_after(
            config,
            log,
            ack.Acknowledged,
            "SIGKILL itself right after the call",
            f"{op}: the call never returned",
            violations,
        )
        if said is not None:
            await judge(config, time.monotonic(), violations, [workload.run_id, *workload.churn_ids()])
            violations.extend(await _acknowledging_tiers(pol, tiers, config, said))
    finally:
        await clean(pol, valkey_url, config.prefix, (db, trace, log))
    return GuaranteeTrial(
        scenario="ack",
        policy=pol.name,
        call=op,
        seed=seed,
        runs_checked=1,
        violations=tuple(violations),
        seconds=time.perf_counter() - t0,
    )


async def _acknowledging_tiers(
    pol: Policy, tiers: Sequence[str], config: ChildConfig, said: ack.Acknowledged
) -> list[str]:
    """The acknowledged change, looked for in each of ``tiers``' own copy and history."""
    out: list[str] = []
    for spec, store in zip(pol.tiers, config.stores(), strict=True):
        if spec.kind not in tiers:
            continue
        async with store:
            raw = await store.load(said.run_id)
            history = {t.version: t for t in await store.history(said.run_id)}
        try:
            snap = None if raw is None else decode_snapshot(raw, MsgpackCodec(), tier=store.tier)
        except Exception as exc:  # noqa: BLE001 - a copy that does not decode is this trial's finding
            out.append(f"{said.op} {said.run_id}: the {store.tier} copy does not decode: {exc!r}")
            continue
        out.extend(f"{said.op} {said.run_id} in {store.tier}: {v}" for v in kept(said, snap, history))
    return out


def kept(said: ack.Acknowledged, snap: Snapshot | None, history: dict[int, Transition]) -> list[str]:
    """What is wrong with a tier's copy of the run ``said`` acknowledged (empty: the change is there)."""
    where = f"acknowledged v{said.acked}"
    if snap is None:
        return [f"{where}, nothing stored"]
    if snap.version < said.acked:
        return [f"{where}, stored v{snap.version} ({snap.status.value})"]
    if said.acked not in history:
        return [f"{where}, stored history {sorted(history)}"]
    kind = history[said.acked].kind
    final = (snap.version, said.version) == (said.acked, said.acked)
    signals = [name for name, _ in snap.signals]
    checks: dict[str, list[tuple[bool, str]]] = {
        "spawn": [(kind is TransitionKind.spawned and snap.payload["op"] == "spawn", f"v{said.acked} is {kind}")],
        "send": [
            (said.version == said.acked, f"the run moved on to v{said.version} after the signal"),
            (kind is TransitionKind.signal, f"v{said.acked} is {kind}"),
            (snap.signals == ((ack.SIGNAL, {"sent": said.run_id}),) and snap.step == 0, f"signals {snap.signals}"),
        ],
        "send_consumed": [
            (kind is TransitionKind.signal, f"v{said.acked} is {kind}"),
            (
                signals == [ack.SIGNAL]
                or (signals == [] and snap.step >= 1 and snap.payload.get("got") == {"sent": said.run_id}),
                f"stored v{snap.version} step {snap.step} signals {snap.signals}",
            ),
        ],
        "cancel": [
            (kind is TransitionKind.cancelled, f"v{said.acked} is {kind}"),
            (final and snap.status is Status.cancelled, f"stored v{snap.version} {snap.status.value}"),
        ],
        "wait_finished": [
            (final and snap.status is Status.done, f"stored v{snap.version} {snap.status.value}"),
            (snap.payload.get("n") == ack.SHORT_STEPS, f"payload {snap.payload}"),
        ],
        "wait_failed": [
            (final and snap.status is Status.failed, f"stored v{snap.version} {snap.status.value}"),
            (snap.error is not None and snap.error.message == ack.FLAKY_MESSAGE, f"error {snap.error}"),
        ],
        "retry_dead_letter": [
            (kind is TransitionKind.dead_letter_retried, f"v{said.acked} is {kind}"),
            (
                final and snap.status is Status.running and snap.error is None,
                f"stored v{snap.version} {snap.status.value}",
            ),
        ],
    }
    return [f"{where}, {problem}" for ok, problem in checks[said.op] if not ok]


# ------------------------------------------------------------------ lineage


def lineage_workload(seed: int, tag: str, ledger: Path) -> lineage.LineageWorkload:
    """The seeded trial: 5-20 orders flushed to both tiers, 0-10 more after, up to a third left parked."""
    rng = random.Random(seed)
    early, late = rng.randint(5, 20), rng.randint(0, 10)
    n = early + late
    unpaid = tuple(sorted(rng.sample(range(n), rng.randint(0, n // 3))))
    return lineage.LineageWorkload(tag=tag, early=early, late=late, unpaid=unpaid, ledger=str(ledger))


async def lineage_trial(*, valkey_url: str, workdir: Path, seed: int) -> GuaranteeTrial:
    """Orders finished in Valkey, SIGKILL before SQLite's flush, recovery, purge, restart."""
    t0 = time.perf_counter()
    tag = f"lineage-{uuid.uuid4().hex[:10]}"
    db, trace, log, ledger = _paths(workdir, tag)
    workload = lineage_workload(seed, tag, ledger)
    ids = workload.ids()
    config = ChildConfig(
        policy=LINEAGE_CHILD,
        sqlite=str(db),
        valkey_url=valkey_url,
        prefix=f"hs-{tag}",
        trace=str(trace),
        runs=len(ids),
        lineage=workload,
    )
    violations: list[str] = []
    try:
        settled: lineage.Settled | None = await _killed_after(
            config,
            log,
            lineage.Settled,
            "SIGKILL itself once Valkey held every order",
            "the orders never settled in Valkey",
            violations,
        )
        if settled is not None:
            await judge(config, time.monotonic(), violations, ids)
            violations.extend(await _sqlite_behind(config, settled))
            try:
                await _recover_purge_restart(config, workload, settled, violations)
            except Exception as exc:  # noqa: BLE001 - a runtime that raises is this trial's finding
                violations.append(f"recovery, purge or restart raised {exc!r}")
            violations.extend(_effects_once(ids, str(ledger)))
    finally:
        await clean(LINEAGE_POLICY, valkey_url, config.prefix, (db, trace, log, ledger))
    return GuaranteeTrial(
        scenario="lineage",
        policy=LINEAGE_POLICY.name,
        call="",
        seed=seed,
        runs_checked=len(ids),
        violations=tuple(violations),
        seconds=time.perf_counter() - t0,
    )


async def _sqlite_behind(config: ChildConfig, settled: lineage.Settled) -> list[str]:
    """The trial's premise: SQLite holds no finished order at the kill (else it tests nothing)."""
    async with SQLiteStore(config.sqlite) as sqlite:
        done = {h.run_id for h in await sqlite.scan(limit=1000) if h.status == Status.done.value}
    ahead = sorted(done & set(settled.finished))
    return [f"setup: SQLite had flushed before the kill; it holds {ahead[:3]} done"] if ahead else []


async def _recover_purge_restart(
    config: ChildConfig, workload: lineage.LineageWorkload, settled: lineage.Settled, violations: list[str]
) -> None:
    wf = lineage.lineage_workflow(workload.ledger)

    def tiers() -> list[Tier]:
        return LINEAGE_POLICY.build_tiers(sqlite=config.sqlite, valkey_url=config.valkey_url, prefix=config.prefix)

    async with Runtime([wf], tiers=tiers(), recover=True, shutdown_timeout=2.0) as rt:
        _recovery_errors(rt.recovery_report, violations)
        resumed = {r.run_id for r in rt.recovery_report.resumed} if rt.recovery_report else set()
        violations.extend(f"finished order resumed at recovery: {rid}" for rid in settled.finished if rid in resumed)
        violations.extend(
            f"parked order not resumed at recovery: {rid}" for rid in settled.parked if rid not in resumed
        )
        with anyio.fail_after(30):  # a hang guard only
            for rid in settled.parked:
                if rid in resumed:
                    await rt.send(rid, lineage.SIGNAL, 42)
            for rid in settled.parked:
                if rid in resumed:
                    await rt.wait_finished(rid)
        await rt.purge_finished(older_than=0)
    async with Runtime([wf], tiers=tiers(), recover=True, shutdown_timeout=2.0) as rt:
        report = rt.recovery_report
        _recovery_errors(report, violations)
        violations.extend(
            f"finished and purged order resumed after the restart: {r.run_id}"
            for r in (report.resumed if report else ())
        )
        if rt.count():
            violations.append(f"{rt.count()} orders in memory after the purge and restart (0 expected)")


def _effects_once(ids: Sequence[str], ledger: str) -> list[str]:
    counts = Counter(lineage.read_ledger(ledger))
    return [
        f"side effect {effect} of {rid} executed {counts[(rid, effect)]} times"
        for rid in ids
        for effect in lineage.EFFECTS
        if counts[(rid, effect)] != 1
    ]


# --------------------------------------------------------------- crash loop


def crash_loop_workload(seed: int, tag: str, ledger: Path, pol: Policy) -> crashloop.CrashLoopWorkload:
    """The seeded trial: 4-12 ordinary jobs working 1-100 ms, the poison job anywhere in the queue.

    The poison job works long enough for its step to be durable before it
    kills the process (several of the policy's intervals): a crash inside the
    write-behind window would lose the run itself, which is another promise.
    """
    rng = random.Random(seed)
    ordinary = rng.randint(4, 12)
    poison_at = rng.randint(0, ordinary)
    work = [round(rng.uniform(0.001, 0.1), 4) for _ in range(ordinary + 1)]
    work[poison_at] = round(max(0.05, 3 * pol.interval) + rng.uniform(0.0, 0.05), 4)
    return crashloop.CrashLoopWorkload(
        tag=tag, ordinary=ordinary, poison_at=poison_at, work=tuple(work), ledger=str(ledger)
    )


async def crash_loop_trial(
    policy: Policy | str = CRASH_LOOP_POLICY,
    *,
    valkey_url: str,
    workdir: Path,
    seed: int,
    crash_limit: int = CRASH_LIMIT,
) -> GuaranteeTrial:
    """Start a child whose poison job kills it, again and again with ``recover=True``, until it exits by itself."""
    pol = find_policy(policy) if isinstance(policy, str) else policy
    t0 = time.perf_counter()
    tag = f"loop-{uuid.uuid4().hex[:10]}"
    db, trace, log, ledger = _paths(workdir, tag)
    workload = crash_loop_workload(seed, tag, ledger, pol)
    ids = workload.ids()
    config = ChildConfig(
        policy=pol.spec,
        sqlite=str(db),
        valkey_url=valkey_url,
        prefix=f"hs-{tag}",
        trace=str(trace),
        runs=len(ids),
        crash_loop=workload,
        recover=True,
        crash_limit=crash_limit,
        linger=0.0,
    )
    violations: list[str] = []
    starts = 0
    try:
        for starts in range(1, crash_limit + 5):
            messages, rc, tail = await run_child(config, log)
            if _first(messages, crashloop.Started) is None:
                violations.append(f"start {starts} never recovered: {tail.strip()[-500:]}")
            await judge(config, time.monotonic(), violations, ids)
            if rc == 0:
                break
            if bad := _killed(rc, tail, "exit or kill itself"):
                violations.extend(f"start {starts}: {v}" for v in bad)
                break
        else:
            violations.append(f"the poison job still crashed the process after {starts} starts")
        violations.extend(_poison_executions(workload, crash_limit))
        violations.extend(await _final_states(config, workload))
    finally:
        await clean(pol, valkey_url, config.prefix, (db, trace, log, ledger))
    return GuaranteeTrial(
        scenario="crash-loop",
        policy=pol.name,
        call="",
        seed=seed,
        runs_checked=len(ids),
        violations=tuple(violations),
        seconds=time.perf_counter() - t0,
        starts=starts,
    )


def _poison_executions(workload: crashloop.CrashLoopWorkload, crash_limit: int) -> list[str]:
    entries = lineage.read_ledger(workload.ledger)
    runs = sum(1 for rid, what in entries if rid == workload.poison_id and what != crashloop.COMPENSATED)
    if runs > crash_limit:
        return [f"the poison job executed {runs} times (crash_limit {crash_limit})"]
    return []


async def _final_states(config: ChildConfig, workload: crashloop.CrashLoopWorkload) -> list[str]:
    """After the child's graceful exit: in every tier, the poison job failed and dead-lettered, the others done."""
    out: list[str] = []
    for store in config.stores():
        async with store:
            status = {h.run_id: h.status for h in await store.scan(limit=1000)}
            letters = {d.run_id: d.error for d in await store.dead_letters()}
        poison = workload.poison_id
        if status.get(poison) != Status.failed.value or "CrashLoopError" not in letters.get(poison, ""):
            out.append(f"{store.tier}: the poison job is {status.get(poison)}, dead letter {letters.get(poison)!r}")
        out.extend(
            f"{store.tier}: ordinary job {rid} is {status.get(rid)}"
            for rid in workload.ids()
            if rid != poison and status.get(rid) != Status.done.value
        )
    return out
