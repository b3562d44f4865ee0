# mypy: allow-untyped-defs
"""Pure supervisor decisions: backoff delay, restart window, policy validation (STYLE.md F.19)."""

from __future__ import annotations

import math
import random

import pytest

from hotstate import ConfigError, RestartIntensity, RetryPolicy
from hotstate.runtime._backoff import RestartWindow, backoff_delay

# ------------------------------------------------------------------ backoff_delay


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("jitter", [0.0, 0.25, 0.5, 1.0])
def test_seeded_jitter_keeps_every_delay_within_zero_and_cap(seed, jitter):
    policy = RetryPolicy(
        initial_delay=0.1,
        multiplier=2.0,
        max_delay=5.0,
        jitter=jitter,
        max_attempts=100,
    )
    rng = random.Random(seed)
    for attempt in range(1, 80):
        base = min(policy.max_delay, policy.initial_delay * policy.multiplier ** (attempt - 1))
        delay = backoff_delay(policy, attempt, rng)
        assert 0.0 <= delay <= policy.max_delay
        # jitter scales the base by a factor in [1 - jitter, 1]
        assert base * (1.0 - jitter) - 1e-12 <= delay <= base + 1e-12


def test_jitter_actually_varies_the_delay_with_a_seeded_rng():
    policy = RetryPolicy(initial_delay=1.0, multiplier=1.0, max_delay=10.0, jitter=1.0)
    rng = random.Random(7)
    delays = {backoff_delay(policy, 1, rng) for _ in range(50)}
    assert len(delays) > 40
    assert min(delays) < 0.2
    assert max(delays) > 0.8


def test_the_same_seed_gives_the_same_delays():
    policy = RetryPolicy(initial_delay=0.5, jitter=0.5, max_attempts=10)
    a = [backoff_delay(policy, n, random.Random(42)) for n in range(1, 10)]
    b = [backoff_delay(policy, n, random.Random(42)) for n in range(1, 10)]
    assert a == b


@pytest.mark.parametrize("attempt", [60, 61, 100, 1_000, 10_000, 1_000_000])
@pytest.mark.parametrize(
    ("initial", "multiplier", "cap"),
    [(0.1, 2.0, 60.0), (1.0, 10.0, 1000.0), (0.001, 1.5, 3.0), (1e-9, 1.0001, 2.0)],
)
def test_cap_holds_at_large_attempts_without_overflow(attempt, initial, multiplier, cap):
    policy = RetryPolicy(initial_delay=initial, multiplier=multiplier, max_delay=cap, jitter=0.0)
    delay = backoff_delay(policy, attempt, random.Random(0))
    # compare in log space: the power itself would overflow a float
    if (attempt - 1) * math.log(multiplier) >= math.log(cap / initial):
        assert delay == cap
    else:  # the tiny-growth policy has not reached its cap yet
        assert delay == pytest.approx(initial * multiplier ** (attempt - 1))
    assert math.isfinite(delay)


def test_cap_holds_at_attempt_60_with_the_default_policy():
    policy = RetryPolicy(jitter=0.0)
    assert backoff_delay(policy, 60, random.Random(0)) == 60.0
    assert backoff_delay(policy, 10_000, random.Random(0)) == 60.0


def test_cap_holds_at_attempt_10_000_with_full_jitter():
    policy = RetryPolicy(jitter=1.0)
    rng = random.Random(3)
    for _ in range(100):
        assert 0.0 <= backoff_delay(policy, 10_000, rng) <= 60.0


@pytest.mark.parametrize(
    ("initial", "multiplier", "expected"),
    [
        (0.5, 3.0, [0.5, 1.5, 4.5, 13.5, 40.5, 60.0, 60.0]),
        (1.0, 2.0, [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0]),
        (0.25, 1.0, [0.25] * 7),
        (0.0, 2.0, [0.0] * 7),
    ],
)
def test_zero_jitter_gives_exact_exponential_values(initial, multiplier, expected):
    policy = RetryPolicy(initial_delay=initial, multiplier=multiplier, max_delay=60.0, jitter=0.0)
    rng = random.Random(0)
    assert [backoff_delay(policy, n, rng) for n in range(1, 8)] == expected


def test_zero_jitter_does_not_consume_randomness():
    policy = RetryPolicy(initial_delay=1.0, jitter=0.0)
    rng = random.Random(5)
    backoff_delay(policy, 3, rng)
    assert rng.random() == random.Random(5).random()


def test_zero_jitter_delays_never_decrease_as_attempts_grow():
    policy = RetryPolicy(initial_delay=0.01, multiplier=1.7, max_delay=30.0, jitter=0.0)
    delays = [backoff_delay(policy, n, random.Random(0)) for n in range(1, 300)]
    assert delays == sorted(delays)
    assert delays[-1] == 30.0


def test_a_zero_cap_gives_zero_delay():
    policy = RetryPolicy(initial_delay=1.0, max_delay=0.0, jitter=0.5)
    assert backoff_delay(policy, 1, random.Random(0)) == 0.0
    assert backoff_delay(policy, 5, random.Random(0)) == 0.0


@pytest.mark.parametrize("attempt", [0, -1, -100])
def test_attempt_below_one_raises(attempt):
    with pytest.raises(ValueError, match="attempt"):
        backoff_delay(RetryPolicy(), attempt, random.Random(0))


# ------------------------------------------------------------------ RestartWindow


@pytest.mark.parametrize("max_restarts", [1, 2, 3, 5, 10])
def test_exactly_max_restarts_inside_the_window_pass_and_one_more_fails(max_restarts):
    window = RestartWindow(RestartIntensity(max_restarts=max_restarts, window=10.0))
    times = [i * (9.0 / max_restarts) for i in range(max_restarts)]  # all inside [0, 9]
    assert [window.record(t) for t in times] == [True] * max_restarts
    assert window.record(9.5) is False


def test_zero_max_restarts_gives_up_on_the_first_restart():
    window = RestartWindow(RestartIntensity(max_restarts=0, window=10.0))
    assert window.record(0.0) is False


def test_a_restart_exactly_window_seconds_after_the_first_no_longer_counts_it():
    window = RestartWindow(RestartIntensity(max_restarts=1, window=10.0))
    assert window.record(100.0) is True
    assert window.record(110.0) is True  # the restart at 100 is exactly 10 s old: it left
    assert len(window) == 1


def test_a_restart_just_inside_the_window_still_counts_the_first():
    window = RestartWindow(RestartIntensity(max_restarts=1, window=10.0))
    assert window.record(100.0) is True
    assert window.record(109.999) is False


def test_old_restarts_slide_out_of_the_window():
    window = RestartWindow(RestartIntensity(max_restarts=2, window=5.0))
    assert window.record(0.0)
    assert window.record(1.0)
    assert not window.record(2.0)  # three inside [0, 5)
    # at 6.0, the restarts at 0 and 1 have left; 2 and 6 remain
    assert window.record(6.0)
    assert len(window) == 2
    assert not window.record(6.5)


def test_restart_windows_are_independent():
    intensity = RestartIntensity(max_restarts=1, window=60.0)
    a, b = RestartWindow(intensity), RestartWindow(intensity)
    assert a.record(0.0)
    assert b.record(0.0)
    assert not a.record(1.0)
    assert len(b) == 1


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_restarts": -1}, "max_restarts"),
        ({"max_restarts": True}, "max_restarts"),
        ({"max_restarts": 1.5}, "max_restarts"),
        ({"window": 0.0}, "window"),
        ({"window": -1.0}, "window"),
        ({"window": math.nan}, "window"),
        ({"window": math.inf}, "window"),
    ],
)
def test_restart_intensity_validation_errors_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field) as info:
        RestartIntensity(**kwargs)
    assert field in info.value.field
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_attempts": 0}, "max_attempts"),
        ({"max_attempts": -3}, "max_attempts"),
        ({"max_attempts": True}, "max_attempts"),
        ({"max_attempts": 2.0}, "max_attempts"),
        ({"initial_delay": -0.1}, "initial_delay"),
        ({"initial_delay": math.nan}, "initial_delay"),
        ({"initial_delay": math.inf}, "initial_delay"),
        ({"max_delay": -1.0}, "max_delay"),
        ({"max_delay": math.nan}, "max_delay"),
        ({"multiplier": 0.5}, "multiplier"),
        ({"multiplier": math.nan}, "multiplier"),
        ({"jitter": 1.01}, "jitter"),
        ({"jitter": -0.01}, "jitter"),
        ({"jitter": math.nan}, "jitter"),
        ({"non_retryable": (int,)}, "non_retryable"),
        ({"non_retryable": ("ValueError",)}, "non_retryable"),
    ],
)
def test_retry_policy_validation_errors_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field) as info:
        RetryPolicy(**kwargs)
    assert field in info.value.field
    assert repr(next(iter(kwargs.values()))) in str(info.value) or field == "non_retryable"


@pytest.mark.parametrize(
    ("cls", "kwargs", "field"),
    [
        (RetryPolicy, {"initial_delay": "1"}, "initial_delay"),
        (RetryPolicy, {"max_delay": None}, "max_delay"),
        (RetryPolicy, {"jitter": "0.5"}, "jitter"),
        (RetryPolicy, {"multiplier": "2"}, "multiplier"),
        (RestartIntensity, {"window": "60"}, "window"),
    ],
)
def test_non_numeric_durations_raise_config_error_naming_the_field(cls, kwargs, field):
    # STYLE.md E.17: validate once, at construction, with errors that name the field
    # (a bare TypeError from math.isfinite does not name it).
    with pytest.raises(ConfigError, match=field):
        cls(**kwargs)


def test_valid_policies_keep_their_values():
    policy = RetryPolicy(max_attempts=1, initial_delay=0.0, multiplier=1.0, max_delay=0.0, jitter=1.0)
    assert (policy.max_attempts, policy.jitter) == (1, 1.0)
    assert RetryPolicy.never().max_attempts == 1
    assert RestartIntensity(max_restarts=0, window=0.001).max_restarts == 0
