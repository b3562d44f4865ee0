from __future__ import annotations

import math

import pytest

from hotstate import ConfigError
from hotstate.persistence import FlushPolicy


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("interval", 0),
        ("interval", -1.0),
        ("interval", math.nan),
        ("interval", math.inf),
        ("max_batch_rows", 0),
        ("max_batch_rows", True),
        ("max_pending_rows", -5),
        ("max_pending_bytes", 0),
        ("ack_timeout", 0),
        ("retry_initial", -0.1),
        ("keep_every", 0),
        ("keep_every", 1.5),
    ],
)
def test_invalid_policy_values_raise_config_error_naming_the_field(field, value):
    with pytest.raises(ConfigError, match=f"FlushPolicy.{field}"):
        FlushPolicy(**{field: value})


def test_retry_max_below_retry_initial_is_rejected():
    with pytest.raises(ConfigError, match="retry_max"):
        FlushPolicy(retry_initial=1.0, retry_max=0.5)


def test_nothing_pending_is_never_due():
    policy = FlushPolicy(interval=0.01)
    assert not policy.flush_due(now=100.0, last_flush=0.0, pending_rows=0, dirty_runs=0)


@pytest.mark.parametrize(
    ("now", "due"),
    [(10.0, False), (10.999, False), (11.0, True), (12.5, True)],
)
def test_write_behind_is_due_exactly_when_the_interval_has_passed(now, due):
    policy = FlushPolicy(interval=1.0)
    assert policy.flush_due(now=now, last_flush=10.0, pending_rows=3, dirty_runs=1) is due


def test_a_full_batch_is_due_before_the_interval():
    policy = FlushPolicy(interval=5.0, max_batch_rows=100)
    assert not policy.flush_due(now=1.0, last_flush=0.0, pending_rows=99, dirty_runs=99)
    assert policy.flush_due(now=1.0, last_flush=0.0, pending_rows=100, dirty_runs=100)


def test_write_through_is_due_whenever_something_is_pending():
    policy = FlushPolicy.through()
    assert policy.write_through
    assert policy.flush_due(now=0.0, last_flush=0.0, pending_rows=1, dirty_runs=1)


@pytest.mark.parametrize(
    ("rows", "nbytes", "over"),
    [(1000, 0.0, False), (1001, 0.0, True), (10, 4096.0, False), (10, 4097.0, True)],
)
def test_memory_bound_counts_rows_and_bytes(rows, nbytes, over):
    policy = FlushPolicy(max_pending_rows=1000, max_pending_bytes=4096)
    assert policy.over_bound(pending_rows=rows, pending_bytes=nbytes) is over


def test_no_bound_never_holds_steps_back():
    policy = FlushPolicy(max_pending_rows=None, max_pending_bytes=None)
    assert not policy.over_bound(pending_rows=10**12, pending_bytes=1e18)
