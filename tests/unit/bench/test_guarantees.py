"""The #10 guarantees' trials without a child process: the ack judge, seeded workloads, plans and figures."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import anyio
import pytest

from hotstate import ErrorInfo, FlushPolicy, Runtime, Snapshot, Status, Tier, Transition, TransitionKind
from hotstate._bench import _guarantees as guarantees
from hotstate._bench._ack import FLAKY_MESSAGE, OPS, SHORT_STEPS, Acknowledged
from hotstate._bench._guarantees import GuaranteeTrial, crash_loop_workload, kept, lineage_workload
from hotstate._bench._lineage import EFFECTS, SIGNAL, lineage_workflow, read_ledger
from hotstate._bench._policy import find_policy
from hotstate._bench._reliability import CallCount, GuaranteesReport, _plan, summarize_guarantee
from hotstate.persistence import MemoryStore

RID = "r"


def copy(version: int, status: Status = Status.running, **fields: Any) -> Snapshot:
    values: dict[str, Any] = {"step": 0, "payload": {"op": "spawn", "n": 0}, "error": None, **fields}
    return Snapshot(
        run_id=RID, workflow="w", workflow_version=1, version=version, status=status, updated_at=0.0, **values
    )


def history(*kinds: TransitionKind) -> dict[int, Transition]:
    return {
        v: Transition(run_id=RID, version=v, kind=kind, step=0, status=Status.running, at=0.0)
        for v, kind in enumerate(kinds, start=1)
    }


def said(op: str, acked: int, version: int | None = None, status: str = "running") -> Acknowledged:
    return Acknowledged(op=op, run_id=RID, acked=acked, version=acked if version is None else version, status=status)


FAILED = ErrorInfo(
    type="builtins.ValueError", message=FLAKY_MESSAGE, traceback="", step=0, step_name="flaky", attempt=1, at=0.0
)
SENT = {"sent": RID}


@pytest.mark.parametrize(
    ("acknowledged", "snap", "hist"),
    [
        (said("spawn", 1), copy(2), history(TransitionKind.spawned, TransitionKind.step)),
        (
            said("send", 3),
            copy(3, signals=(("go", SENT),)),
            history(*[TransitionKind.spawned] * 2, TransitionKind.signal),
        ),
        (
            said("send_consumed", 3),
            copy(3, signals=(("go", SENT),)),
            history(*[TransitionKind.step] * 2, TransitionKind.signal),
        ),
        (
            said("send_consumed", 3),
            copy(5, step=1, payload={"got": SENT}),
            history(*[TransitionKind.step] * 2, TransitionKind.signal, *[TransitionKind.step] * 2),
        ),
        (said("cancel", 3), copy(3, Status.cancelled), history(*[TransitionKind.step] * 2, TransitionKind.cancelled)),
        (
            said("wait_finished", 4),
            copy(4, Status.done, payload={"n": SHORT_STEPS}),
            history(*[TransitionKind.step] * 4),
        ),
        (said("wait_failed", 4), copy(4, Status.failed, error=FAILED), history(*[TransitionKind.step] * 4)),
        (
            said("retry_dead_letter", 5),
            copy(5),
            history(*[TransitionKind.step] * 4, TransitionKind.dead_letter_retried),
        ),
    ],
    ids=lambda x: x.op if isinstance(x, Acknowledged) else "",
)
def test_the_ack_judge_finds_each_acknowledged_change_in_a_tier_that_holds_it(acknowledged, snap, hist):
    assert set(OPS) >= {acknowledged.op}
    assert kept(acknowledged, snap, hist) == []


@pytest.mark.parametrize(
    ("acknowledged", "snap", "hist", "problem"),
    [
        (said("spawn", 1), None, {}, "nothing stored"),
        (said("cancel", 3), copy(2), history(TransitionKind.spawned, TransitionKind.step), "stored v2 (running)"),
        (said("send", 3), copy(3, signals=(("go", SENT),)), history(TransitionKind.spawned), "stored history [1]"),
        (said("send", 2), copy(2), history(TransitionKind.spawned, TransitionKind.signal), "signals ()"),
        (
            said("send", 2, version=3),
            copy(3, signals=(("go", SENT),)),
            history(TransitionKind.spawned, TransitionKind.signal),
            "moved on",
        ),
        (said("cancel", 2), copy(2), history(TransitionKind.spawned, TransitionKind.step), "v2 is step"),
        (
            said("wait_finished", 2),
            copy(3, Status.done, payload={"n": 3}),
            history(*[TransitionKind.step] * 3),
            "stored v3 done",
        ),
        (said("wait_failed", 2), copy(2, Status.failed), history(*[TransitionKind.step] * 2), "error None"),
    ],
)
def test_the_ack_judge_names_what_a_tier_misses(acknowledged, snap, hist, problem):
    found = kept(acknowledged, snap, hist)
    assert found
    assert problem in found[0], found


def test_a_lineage_trial_is_seeded_and_leaves_some_orders_to_finish_and_some_parked():
    one = lineage_workload(7, "t", Path("l"))
    assert one == lineage_workload(7, "t", Path("l"))
    shapes = {(w.early, w.late, w.unpaid) for w in (lineage_workload(s, "t", Path("l")) for s in range(50))}
    assert len(shapes) > 40
    for seed in range(200):
        w = lineage_workload(seed, "t", Path("l"))
        n = w.early + w.late
        assert 5 <= w.early <= 20
        assert 0 <= w.late <= 10
        assert len(w.unpaid) <= n // 3 < n  # some order always finishes before the kill
        assert all(0 <= i < n for i in w.unpaid)
        assert len(set(w.ids())) == n


@pytest.mark.parametrize("policy", ["write-behind", "sqlite-behind", "write-through valkey"])
def test_the_poison_job_works_past_several_flush_intervals_before_it_kills_the_process(policy):
    pol = find_policy(policy)
    for seed in range(100):
        w = crash_loop_workload(seed, "t", Path("l"), pol)
        ids = w.ids()
        assert ids[w.poison_at] == w.poison_id
        assert len(ids) == w.ordinary + 1 == len(w.work)
        assert w.work[w.poison_at] >= max(0.05, 3 * pol.interval)


async def test_each_lineage_step_writes_its_side_effect_once_per_execution(tmp_path):
    ledger = str(tmp_path / "ledger")
    wf = lineage_workflow(ledger)
    async with Runtime([wf], tiers=[Tier(MemoryStore(), FlushPolicy(interval=60.0))]) as rt:
        handle = await rt.spawn(wf, {}, run_id="o")
        with anyio.fail_after(5):  # a hang guard only
            async with rt.subscribe(run_id="o") as seen:
                async for t in seen:
                    if t.kind is TransitionKind.waiting:
                        break
            await rt.send("o", SIGNAL, 42)
            assert await handle.wait_finished() == {"reserved": True, "charged": 42, "shipped": True}
    assert read_ledger(ledger) == [("o", effect) for effect in EFFECTS]
    assert read_ledger(str(tmp_path / "missing")) == []


def trial(scenario: str, call: str = "", violations: tuple[str, ...] = (), runs: int = 1) -> GuaranteeTrial:
    return GuaranteeTrial(
        scenario=scenario, policy="p", call=call, seed=0, runs_checked=runs, violations=violations, seconds=0.5
    )


def test_acknowledgement_figures_count_trials_and_violations_per_call():
    results = [trial("ack", "spawn"), trial("ack", "send", ("lost",)), trial("ack", "spawn", ("a", "b"))]
    summary = summarize_guarantee("ack", "p", results)
    assert summary.calls == {"spawn": CallCount(trials=2, violations=2), "send": CallCount(trials=1, violations=1)}
    assert (summary.trials, summary.runs_checked, summary.violations, summary.starts) == (3, 3, 3, 3)
    assert summary.examples == ("lost", "a", "b")
    report = GuaranteesReport(scenarios=(summary,), results=tuple(results), seconds=1.0)
    document = report.to_json(trials=True)
    assert document["violations"] == 3
    assert document["scenarios"][0]["calls"]["send"] == {"trials": 1, "violations": 1}
    assert [t["call"] for t in document["trials"]] == ["spawn", "send", "spawn"]
    assert dataclasses.asdict(summarize_guarantee("lineage", "p", [trial("lineage", runs=12)]))["calls"] == {}


def test_the_plan_takes_the_calls_in_turn_each_policy_one_call_further():
    policies = [find_policy(p) for p in guarantees.ACK_POLICIES]
    plan = _plan(guarantees.SCENARIOS, 2, policies, find_policy("write-behind"), "valkey://x")
    labels = [label for label, _ in plan]
    assert len(plan) == 3 * 2 + 2 + 2
    assert [label.split(": ")[1].split()[0] for label in labels[:6]] == [
        "spawn",
        "send",
        "send",
        "send_consumed",
        "send_consumed",
        "cancel",
    ]
    assert labels[6:] == ["lineage 1/2", "lineage 2/2", "crash loop 1/2", "crash loop 2/2"]
    assert [label for label, _ in _plan(["lineage"], 1, policies, policies[0], "")] == ["lineage 1/1"]
    full = _plan(["ack"], 200, policies[:1], policies[0], "")
    calls = [label.split(": ")[1].split()[0] for label, _ in full]
    assert {c: calls.count(c) for c in OPS} == {op: 29 if i < 4 else 28 for i, op in enumerate(OPS)}
