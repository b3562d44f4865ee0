"""SIGKILL crash trials (hotstate._bench._crash): a child is killed mid-workload, a fresh runtime recovers.

Each trial runs the mixed workload (signal waits, a transient failure retried,
runs failing for good, compensated and dead-lettered) in a child process under
one flush policy, SIGKILLs it at a seeded random moment, recovers in this
process, drives every run to its end and checks the invariants; the loss window
is measured from the child's commit times (a MAP_SHARED trace survives the kill).

The workload is paced (16 runs in flight, each slot resting 10 ms between runs)
so the event loop is not saturated: then a write-behind tier keeps its cadence
and the promise "at most the interval plus one flush" is what is checked. The
flat-out case is measured, not asserted, by the sweep (``hotstate bench``).

The #10 guarantees' trials (hotstate._bench._guarantees) run in the same child
runner; here one acknowledgement and one lineage trial, and two controls that
show their judges can fail (a write-behind spawn without ``ack_tiers``; recovery
and purge without the #10 tier reconciliation, patched out in this process,
which runs the parent's side). ``test_bench_command.py`` runs one trial of every
scenario, the crash loop included, through ``hotstate bench``.
"""

from __future__ import annotations

import pytest

from hotstate._bench._crash import TrialResult, run_trial
from hotstate._bench._guarantees import ack_trial, lineage_trial
from hotstate._bench._reliability import run_reliability
from hotstate._bench._sweep import run_sweep, to_json
from hotstate._bench._trial import Workload
from hotstate.runtime._adoption import Adoption, Repair

WORKLOAD = Workload(inflight=16, pace=0.01, max_runs=5000)
KILL_AFTER = (0.15, 0.4)

# Scheduling allowance on top of interval + flush duration: the flush loop's
# timer can fire late while the child's event loop runs a scheduler burst (up
# to 256 steps per yield) or the machine's 2 cores are busy with the parent and
# valkey-server; 25 ms is ~10x the lateness seen in paced trials (windows were
# at most ~12 ms under a 100 ms interval).
ALLOWANCE = 0.025


def assert_recovered(result: TrialResult) -> None:
    assert result.violations == ()
    assert result.runs > 0
    assert result.steps_before_kill > 0
    assert result.runs_checked == result.runs  # every run the child started was driven to its end
    assert result.corrupt_snapshots == 0
    assert result.acknowledged_steps_lost == 0


@pytest.mark.parametrize("trial", [0, 1])
@pytest.mark.parametrize("policy", ["write-behind", "sqlite-behind"])
async def test_write_behind_sigkill_loses_at_most_interval_plus_one_flush(valkey_url, tmp_path, policy, trial):
    result = await run_trial(
        policy, valkey_url=valkey_url, workdir=tmp_path, seed=100 + trial, kill_after=KILL_AFTER, workload=WORKLOAD
    )
    assert_recovered(result)
    assert not result.write_through
    assert 0.0 <= result.loss_window <= result.interval + result.flush_duration + ALLOWANCE, result
    assert list(tmp_path.iterdir()) == []  # the trial's SQLite file and trace are gone


@pytest.mark.parametrize("trial", [0, 1])
@pytest.mark.parametrize("policy", ["write-through sqlite", "write-through valkey"])
async def test_write_through_sigkill_loses_no_acknowledged_step(valkey_url, tmp_path, policy, trial):
    result = await run_trial(
        policy, valkey_url=valkey_url, workdir=tmp_path, seed=200 + trial, kill_after=KILL_AFTER, workload=WORKLOAD
    )
    assert_recovered(result)
    assert result.write_through
    # What may be lost is only the versions committed while their group commit was in flight.
    assert result.loss_window <= result.flush_duration + ALLOWANCE, result


async def test_sweep_point_and_reliability_figures_report_progress(valkey_url, tmp_path):
    seen: list[tuple[int, int, str]] = []

    def progress(done: int, total: int, label: str) -> None:
        seen.append((done, total, label))

    points = await run_sweep(
        valkey_url=valkey_url,
        workdir=tmp_path,
        tiers=("sqlite",),
        intervals=(0.05,),
        trials=1,
        write_through=False,
        workload=WORKLOAD,
        progress=progress,
    )
    (row,) = to_json(points)
    assert row["tier"] == "sqlite"
    assert row["interval"] == 0.05
    assert row["trials"] == 1
    assert row["steps_per_s"] > 0
    assert row["loss_window_max"] == row["loss_window_p50"] >= 0
    assert isinstance(row["within_target"], bool)
    report = await run_reliability(
        valkey_url=valkey_url,
        workdir=tmp_path,
        policies=["write-through valkey"],
        trials=1,
        workload=WORKLOAD,
        kill_after=KILL_AFTER,
        progress=progress,
    )
    assert [s[:2] for s in seen] == [(1, 1), (1, 1)]
    assert seen[0][2].startswith("sweep sqlite-behind")
    (figures,) = report.to_json()["policies"]
    assert figures["trials"] == 1
    assert figures["runs_checked"] > 0
    assert figures["acknowledged_steps_lost"] == 0
    assert figures["corrupt_snapshots"] == 0
    assert figures["invariant_violations"] == len(report.results[0].violations)
    assert report.results[0].violations == ()


async def test_an_acknowledged_change_is_in_the_acknowledging_tier_and_the_control_misses_one(valkey_url, tmp_path):
    result = await ack_trial("write-behind+ack", "send_consumed", valkey_url=valkey_url, workdir=tmp_path, seed=1)
    assert (result.scenario, result.call, result.runs_checked, result.violations) == ("ack", "send_consumed", 1, ())
    # Control: the same check on a write-behind SQLite tier flushed every 60 s, with no
    # ack_tiers: the spawn returned, the child died, SQLite never saw the run.
    control = await ack_trial(
        "sqlite-behind 60", "spawn", valkey_url=valkey_url, workdir=tmp_path, seed=2, check=["sqlite"]
    )
    assert len(control.violations) == 1
    assert "acknowledged v1, nothing stored" in control.violations[0]
    assert list(tmp_path.iterdir()) == []


async def test_orders_finished_in_valkey_only_are_neither_resumed_nor_charged_twice(valkey_url, tmp_path):
    result = await lineage_trial(valkey_url=valkey_url, workdir=tmp_path, seed=3)
    assert result.violations == ()
    assert result.runs_checked >= 5
    assert list(tmp_path.iterdir()) == []


async def test_control_without_reconciling_the_tiers_finished_orders_come_back_and_the_lineage_judge_says_so(
    valkey_url, tmp_path, monkeypatch
):
    # As before #10: recovery and purge_finished compare no tiers, so SQLite keeps its
    # stale parked copies of orders that finished in Valkey, and they come back
    # (11 of the 11 finished orders of seed 3 at 6c55973).
    async def no_repair(self: Adoption, shards: object = None) -> Repair:
        return Repair({}, [], {})

    monkeypatch.setattr(Adoption, "reconcile", no_repair)
    result = await lineage_trial(valkey_url=valkey_url, workdir=tmp_path, seed=3)
    assert any("resumed after the restart" in v for v in result.violations), result.violations
    assert list(tmp_path.iterdir()) == []
