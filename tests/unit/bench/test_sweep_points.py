"""Sweep points and their JSON (hotstate._bench._sweep): pure folding of trial records."""

from __future__ import annotations

import dataclasses

import pytest

from hotstate._bench._crash import TrialResult
from hotstate._bench._sweep import (
    SweepPoint,
    kill_range,
    point_policy,
    summarize_point,
    to_json,
)

BASE = TrialResult(
    policy="p",
    seed=0,
    interval=0.1,
    write_through=False,
    runs=10,
    runs_checked=0,
    steps_before_kill=100,
    steps_lost=5,
    runs_lost=0,
    loss_window=0.05,
    acknowledged_steps_lost=0,
    corrupt_snapshots=0,
    violations=(),
    steps_per_s=1000.0,
    flush_duration=0.01,
    kill_after=0.3,
    recovery_seconds=0.0,
)


def trial(**changes: object) -> TrialResult:
    return dataclasses.replace(BASE, **changes)  # type: ignore[arg-type]


def test_to_json_has_exactly_the_keys_advise_reads():
    point = summarize_point("sqlite", 0.1, [trial(), trial(loss_window=0.08, steps_per_s=3000.0)])
    (row,) = to_json([point])
    assert list(row) == [
        "tier",
        "interval",
        "steps_per_s",
        "loss_window_max",
        "loss_window_p50",
        "flush_duration",
        "trials",
        "within_target",
        "within_saturated_bound",
    ]
    assert row == {
        "tier": "sqlite",
        "interval": 0.1,
        "steps_per_s": 2000.0,
        "loss_window_max": 0.08,
        "loss_window_p50": pytest.approx(0.065),
        "flush_duration": 0.01,
        "trials": 2,
        "within_target": True,
        "within_saturated_bound": True,
    }


def test_a_window_past_interval_plus_flush_misses_the_target():
    point = summarize_point("valkey", 0.1, [trial(), trial(loss_window=0.111, flush_duration=0.01)])
    assert not point.within_target
    assert point.loss_window_max == 0.111


def test_the_target_uses_the_longest_flush_any_trial_of_the_point_saw():
    # the second trial was killed before its child reported a flush (0.0)
    point = summarize_point("valkey", 0.1, [trial(flush_duration=0.05), trial(loss_window=0.14, flush_duration=0.0)])
    assert point.within_target
    assert point.flush_duration == 0.05


@pytest.mark.parametrize(("acknowledged", "window", "held"), [(0, 0.004, True), (1, 0.004, False), (0, 0.02, False)])
def test_write_through_holds_when_nothing_acknowledged_is_lost_within_one_commit(acknowledged, window, held):
    results = [trial(interval=0.0, write_through=True, acknowledged_steps_lost=acknowledged, loss_window=window)]
    assert summarize_point("sqlite", 0.0, results).within_target is held


def test_a_point_without_trials_holds_nothing():
    assert summarize_point("sqlite", 0.1, []) == SweepPoint(
        tier="sqlite",
        interval=0.1,
        steps_per_s=0.0,
        loss_window_max=0.0,
        loss_window_p50=0.0,
        flush_duration=0.0,
        trials=0,
        within_target=False,
        within_saturated_bound=False,
    )


def test_a_flush_longer_than_the_interval_is_checked_against_the_saturated_bound():
    # flushes of 45 ms at a 10 ms interval: the next flush waits for the one in flight
    point = summarize_point("sqlite", 0.01, [trial(interval=0.01, flush_duration=0.045, loss_window=0.087)])
    assert not point.within_target  # 87 ms > 10 + 45 ms
    assert point.within_saturated_bound  # 87 ms <= 45 + 45 ms
    worse = summarize_point("sqlite", 0.01, [trial(interval=0.01, flush_duration=0.045, loss_window=0.091)])
    assert not worse.within_saturated_bound


def test_point_policies_and_labels():
    assert point_policy("sqlite", 0.0).spec == "sqlite:through"
    assert point_policy("valkey", 0.01).spec == "valkey:0.01"
    assert point_policy("valkey", 0.01).interval == 0.01
    labels = [summarize_point(t, i, [trial()]).label for t, i in [("valkey", 0.0), ("sqlite", 0.001), ("sqlite", 5.0)]]
    assert labels == ["valkey write-through", "sqlite 1 ms", "sqlite 5 s"]


def test_kill_range_covers_one_and_a_half_intervals_after_a_warm_up_of_one_interval():
    assert kill_range(0.01) == pytest.approx((0.21, 0.51))
    assert kill_range(5.0) == pytest.approx((5.2, 12.7))


def test_reliability_counts_trials_within_each_bound():
    from hotstate._bench._reliability import summarize

    results = [
        trial(loss_window=0.05),  # inside interval + flush (0.11)
        trial(flush_duration=0.2, loss_window=0.35),  # outside 0.1 + 0.2, inside 0.2 + 0.2
        trial(flush_duration=0.2, loss_window=0.45),  # outside both
    ]
    figures = summarize("p", results)
    assert (figures.trials_within_window, figures.trials_within_saturated_window) == (1, 2)
    assert results[1].saturated_window == pytest.approx(0.4)
