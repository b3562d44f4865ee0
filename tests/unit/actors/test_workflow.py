# mypy: allow-untyped-defs
"""Workflow definitions: validation, defaults, plain callables, step lookup, step context."""

from __future__ import annotations

import math
from typing import Any

import pytest

from hotstate import ConfigError, Finish, RetryPolicy, Step, StepContext, Workflow


async def reserve(payload, ctx):
    return payload


async def charge(payload, ctx):
    return payload


def ship(payload, ctx):
    return payload


def undo(payload, ctx):
    return None


def test_duplicate_step_names_raise_config_error_naming_them():
    with pytest.raises(ConfigError, match="unique") as info:
        Workflow("order", [Step(fn=reserve), Step(fn=charge, name="reserve")])
    assert info.value.value == ["reserve"]
    assert "steps" in info.value.field


def test_the_same_plain_callable_twice_is_a_duplicate():
    with pytest.raises(ConfigError, match="reserve"):
        Workflow("order", [reserve, charge, reserve])


def test_empty_steps_raise_config_error():
    with pytest.raises(ConfigError, match="steps"):
        Workflow("order", [])


def test_empty_steps_from_an_exhausted_iterator_raise_config_error():
    with pytest.raises(ConfigError, match="at least one step"):
        Workflow("order", iter(()))


@pytest.mark.parametrize("name", ["", None, 5, b"order"])
def test_empty_or_non_str_name_raises_config_error(name):
    with pytest.raises(ConfigError, match=r"Workflow\.name"):
        Workflow(name, [reserve])


@pytest.mark.parametrize("version", [0, -1, True, 1.0, "1"])
def test_bad_version_raises_config_error(version):
    with pytest.raises(ConfigError, match="version"):
        Workflow("order", [reserve], version=version)


@pytest.mark.parametrize("timeout", [0, 0.0, -1.0, math.nan, math.inf])
def test_bad_timeout_raises_config_error_naming_the_step(timeout):
    with pytest.raises(ConfigError, match=r"Step\('reserve'\)\.timeout") as info:
        Step(fn=reserve, timeout=timeout)
    value = info.value.value
    assert value is timeout or (isinstance(value, float) and math.isnan(value))


def test_non_numeric_timeout_raises_config_error_not_type_error():
    # STYLE.md E.17: configuration errors name the field; a TypeError does not.
    with pytest.raises(ConfigError, match="timeout"):
        Step(fn=reserve, timeout="5")  # type: ignore[arg-type]


@pytest.mark.parametrize("wait_for", [5, "", b"paid", ("paid",)])
def test_wait_for_must_be_a_non_empty_str(wait_for):
    with pytest.raises(ConfigError, match="wait_for"):
        Step(fn=reserve, wait_for=wait_for)


def test_step_fn_must_be_callable():
    with pytest.raises(ConfigError, match=r"Step\.fn"):
        Step(fn="reserve")  # type: ignore[arg-type]


def test_compensation_must_be_callable():
    with pytest.raises(ConfigError, match="compensate"):
        Step(fn=reserve, compensate=42)  # type: ignore[arg-type]


def test_retry_must_be_a_retry_policy():
    with pytest.raises(ConfigError, match="retry"):
        Step(fn=reserve, retry={"max_attempts": 3})  # type: ignore[arg-type]


def test_workflow_default_retry_fills_in_steps_without_one():
    default = RetryPolicy(max_attempts=7)
    own = RetryPolicy(max_attempts=2)
    wf = Workflow("order", [reserve, Step(fn=charge, retry=own)], retry=default)
    assert wf.steps[0].retry is default
    assert wf.steps[1].retry is own
    assert wf.retry is default


def test_without_a_workflow_retry_the_default_policy_fills_in():
    wf = Workflow("order", [reserve, Step(fn=charge)])
    assert wf.steps[0].retry == RetryPolicy()
    assert wf.steps[1].retry == RetryPolicy()


def test_filling_in_the_retry_keeps_every_other_step_field():
    step = Step(fn=ship, name="send", timeout=3.0, compensate=undo, wait_for="paid")
    wf = Workflow("order", [step])
    filled = wf.steps[0]
    assert (
        filled.fn,
        filled.name,
        filled.timeout,
        filled.compensate,
        filled.wait_for,
    ) == (
        ship,
        "send",
        3.0,
        undo,
        "paid",
    )
    assert filled.is_async is False
    assert filled.compensate_is_async is False


def test_plain_callables_become_steps_named_after_the_function():
    wf = Workflow("order", [reserve, charge, ship])
    assert [s.name for s in wf.steps] == ["reserve", "charge", "ship"]
    assert all(isinstance(s, Step) for s in wf.steps)
    assert [s.fn for s in wf.steps] == [reserve, charge, ship]


def test_step_flags_say_async_and_plain():
    async_plain = Step(fn=reserve)
    sync_step = Step(fn=ship)
    timed = Step(fn=reserve, timeout=1.0)
    waiting = Step(fn=reserve, wait_for="go")
    async_comp = Step(fn=ship, compensate=reserve)
    assert (async_plain.is_async, async_plain.plain) == (True, True)
    assert (sync_step.is_async, sync_step.plain) == (False, False)
    assert timed.plain is False
    assert waiting.plain is False
    assert async_comp.compensate_is_async is True


def test_an_explicit_name_wins_over_the_function_name():
    assert Step(fn=reserve, name="hold").name == "hold"


def test_step_index_finds_steps_by_name():
    wf = Workflow("order", [reserve, charge, Step(fn=ship, name="send")])
    assert [wf.step_index(n) for n in ("reserve", "charge", "send")] == [0, 1, 2]


def test_step_index_of_an_unknown_name_raises_config_error():
    wf = Workflow("order", [reserve])
    with pytest.raises(ConfigError, match="refund"):
        wf.step_index("refund")


def test_workflow_steps_are_an_immutable_sequence():
    wf = Workflow("order", [reserve, charge])
    assert isinstance(wf.steps, tuple)
    assert wf.version == 1
    assert Workflow("order", [reserve], version=3).version == 3


def test_step_is_frozen():
    step = Step(fn=reserve)
    with pytest.raises(AttributeError):
        step.name = "other"  # type: ignore[misc]


def _ctx(**changes: Any) -> StepContext:
    base = StepContext("run-1", "order", 2, 1, "charge", 1, 5)
    return base._replace(**changes)


def test_idempotency_key_is_stable_across_attempts_and_versions():
    first = _ctx()
    retry = _ctx(attempt=3, version=9)
    assert first.idempotency_key == retry.idempotency_key
    assert "run-1" in first.idempotency_key


def test_idempotency_key_differs_between_steps_runs_and_compensations():
    keys = {
        _ctx().idempotency_key,
        _ctx(step=2, step_name="ship").idempotency_key,
        _ctx(run_id="run-2").idempotency_key,
        _ctx(compensating=True).idempotency_key,
        _ctx(step=2, compensating=True).idempotency_key,
    }
    assert len(keys) == 5


def test_finish_wraps_the_final_payload():
    marker = StepContext.finish({"total": 3})
    assert isinstance(marker, Finish)
    assert marker.payload == {"total": 3}
    assert repr(Finish(1)) == "Finish(1)"


class AsyncCallable:
    """A step written as an object with an ``async def __call__``."""

    async def __call__(self, payload: Any, ctx: StepContext) -> Any:
        return payload


def test_an_object_with_async_call_is_an_async_step():
    # Otherwise the runtime calls it as a sync step, gets a coroutine back and fails
    # the run with StepResultError ("did it forget an `await`...?").
    step = Step(fn=AsyncCallable())
    assert step.is_async is True
    assert step.plain is True
