"""Crash-trial bookkeeping: policies (_policy), the trace layout (_trace), and the judge's loss arithmetic (_crash)."""

from __future__ import annotations

import pytest

from hotstate._bench import _crash as crash, _trial as trial
from hotstate._bench._policy import Policy, TierSpec, find_policy
from hotstate._bench._trace import Trace, TraceLayout


def test_policy_keys_names_and_built_policies():
    wb = find_policy("write-behind")
    assert find_policy(wb.name) is wb
    assert wb.tiers == (TierSpec("valkey", 0.01), TierSpec("sqlite", 1.0))
    assert (wb.interval, wb.window_tier, wb.write_through) == (0.01, 0, False)
    through = find_policy("write-through sqlite")
    assert (through.interval, through.write_through) == (0.0, True)
    built = find_policy("sqlite-behind 0.25")
    assert (built.spec, built.interval, built.name) == ("sqlite:0.25", 0.25, "sqlite-behind 250 ms")
    assert find_policy("sqlite:1,valkey:0.5").window_tier == 1
    assert find_policy("sqlite:1,valkey:through").window_tier == 1


def test_one_spelling_parses_and_prints_back():
    demo = Policy.parse("valkey:0.1,sqlite:1.0", "demo")
    assert demo == Policy(name="demo", tiers=(TierSpec("valkey", 0.1), TierSpec("sqlite", 1.0)))
    assert Policy.parse(demo.spec) == Policy(name=demo.spec, tiers=demo.tiers)
    assert Policy.parse("sqlite:through").spec == "sqlite:through"


@pytest.mark.parametrize("bad", ["memcached:1", "sqlite:soon", "nonsense"])
def test_unknown_policies_raise_value_error(bad):
    with pytest.raises(ValueError):  # noqa: PT011 - float() and our own message both raise ValueError
        find_policy(bad)


def test_trace_layout_gives_every_run_its_own_slots():
    layout = TraceLayout(10, 8)
    assert layout.stride == 4 + 8 + 1
    assert layout.base(0) == layout.HEADER
    assert layout.base(9) + layout.stride == layout.size // 8
    assert trial.run_index(trial.run_id(1234)) == 1234


def test_runs_designed_to_fail():
    assert [i for i in range(30) if trial.fails_for_good(i, 10)] == [9, 19, 29]
    assert not any(trial.fails_for_good(i, 0) for i in range(30))


def trace(
    hot: list[int], durable: list[int], acked: list[int], times: list[dict[int, float]], steps: list[int] | None = None
) -> Trace:
    rows = []
    for t in times:
        row = [0.0] * 10
        for v, at in t.items():
            row[v] = at
        rows.append(row)
    return Trace(
        ready=1.0,
        commits=sum(hot),
        started=len(hot),
        flush=[(0.01, 0.02, 9.9, 9.95)],
        durable=durable,
        acked=acked,
        hot=hot,
        times=rows,
        steps=steps if steps is not None else [0] * len(hot),
    )


def test_loss_window_runs_from_the_oldest_lost_commit_to_the_kill():
    tr = trace(
        hot=[5, 3, 2, 0],
        durable=[3, 3, 0, 0],
        acked=[4, 2, 1, 0],
        times=[{4: 10.02, 5: 10.05}, {}, {1: 10.04, 2: 10.06}, {}],
        steps=[5, 3, 2, 0],
    )
    violations: list[str] = []
    stored = {"r0000000": (3, 3), "r0000001": (3, 3)}
    loss = crash.losses(find_policy("sqlite-behind"), tr, stored, 10.1, violations)
    assert violations == []
    assert (loss.steps, loss.runs, loss.acknowledged) == (4, 1, 0)
    assert loss.window == pytest.approx(0.08)
    assert (loss.runs_behind, loss.steps_behind) == (2, 4)  # r0 two steps behind, r2 in no tier at step 2


def test_nothing_lost_is_a_zero_window():
    tr = trace(hot=[4], durable=[4], acked=[4], times=[{4: 10.0}])
    loss = crash.losses(find_policy("sqlite-behind"), tr, {"r0000000": (4, 6)}, 10.5, [])
    assert (loss.steps, loss.window) == (0, 0.0)


def test_a_version_below_what_the_child_knew_durable_is_a_regression():
    tr = trace(hot=[5], durable=[4], acked=[0], times=[{4: 10.0, 5: 10.01}])
    violations: list[str] = []
    crash.losses(find_policy("sqlite-behind"), tr, {"r0000000": (3, 2)}, 10.1, violations)
    assert violations == ["version regression: r0000000 is at v3 in the tiers, the child knew v4 durable"]


def test_write_through_counts_an_acknowledged_step_lost_as_a_violation():
    tr = trace(hot=[6, 2], durable=[0, 0], acked=[5, 1], times=[{5: 10.0, 6: 10.01}, {1: 10.0, 2: 10.0}])
    violations: list[str] = []
    stored = {"r0000000": (4, 3)}
    loss = crash.losses(find_policy("write-through sqlite"), tr, stored, 10.1, violations)
    assert loss.acknowledged == 2
    assert violations == [
        "run lost: r0000001 was acknowledged (v1) but is in no tier",
        "write-through lost 2 acknowledged step(s)",
    ]


@pytest.mark.parametrize(
    ("flush", "killed_at", "expected"),
    [
        ((0.01, 0.02, 9.9, 9.95), 10.5, 0.02),  # the last write ended: the longest reported flush
        ((0.01, 0.02, 10.2, 9.95), 10.5, 0.3),  # a write started at 10.2 was still running at 10.5
        ((0.0, 0.0, 0.0, 0.0), 1.6, 0.0),  # nothing written yet
    ],
)
def test_flush_duration_counts_the_write_in_flight_at_the_kill(flush, killed_at, expected):
    tr = trace(hot=[1], durable=[0], acked=[0], times=[{1: 1.0}])
    tr.flush = [flush]
    assert crash.flush_duration(find_policy("sqlite-behind"), tr, killed_at) == pytest.approx(expected)
