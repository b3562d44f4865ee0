# mypy: allow-untyped-defs
"""Run ids, signal, workflow and step names, dedupe keys: bounded, typed, no control characters (#11)."""

from __future__ import annotations

import pytest

from hotstate import ConfigError, Step, Workflow
from hotstate._names import MAX_DEDUPE_KEY_BYTES, MAX_NAME_BYTES, MAX_RUN_ID_BYTES, dedupe_key, name, run_id


async def noop(payload, ctx):
    return payload


CHECKS = [(run_id, MAX_RUN_ID_BYTES), (name, MAX_NAME_BYTES), (dedupe_key, MAX_DEDUPE_KEY_BYTES)]

GOOD = ["a", "order-0001", "ÄÖü café", "日本語", "with space", "emoji-🙂", "x" * 10]

BAD = [
    ("", "must not be empty"),
    ("a\x00b", "control characters"),
    ("tab\there", "control characters"),
    ("new\nline", "control characters"),
    ("esc\x1b[31m", "control characters"),
    ("del\x7f", "control characters"),
    ("c1\x85", "control characters"),
    ("c1\x9b", "control characters"),
    ("lone\udc80surrogate", "UTF-8"),
    (123, "must be a str, not int"),
    (b"bytes", "must be a str, not bytes"),
    (None, "must be a str, not NoneType"),
    (["a"], "must be a str, not list"),
]


@pytest.mark.parametrize(("check", "limit"), CHECKS, ids=["run_id", "name", "dedupe_key"])
@pytest.mark.parametrize("value", GOOD)
def test_printable_text_within_the_limit_is_accepted(check, limit, value):
    assert check("f", value) == value


@pytest.mark.parametrize(("check", "limit"), CHECKS, ids=["run_id", "name", "dedupe_key"])
@pytest.mark.parametrize(("value", "reason"), BAD, ids=[repr(v) for v, _ in BAD])
def test_a_bad_value_is_a_config_error_naming_the_field(check, limit, value, reason):
    with pytest.raises(ConfigError, match=reason) as info:
        check("spawn.run_id", value)
    assert info.value.field == "spawn.run_id"
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(("check", "limit"), CHECKS, ids=["run_id", "name", "dedupe_key"])
def test_the_limit_counts_utf8_bytes_not_characters(check, limit):
    assert check("f", "x" * limit) == "x" * limit
    with pytest.raises(ConfigError, match=f"at most {limit} bytes of UTF-8, not {limit + 1}"):
        check("f", "x" * (limit + 1))
    two_bytes = "é" * (limit // 2)
    assert check("f", two_bytes) == two_bytes
    with pytest.raises(ConfigError, match=f"not {limit + 2}"):
        check("f", two_bytes + "é")


def test_a_megabyte_run_id_is_refused_with_a_short_message():
    """The red-team's 1 MB id (57 MB of SQLite for 50 steps) is refused; the error does not repeat it."""
    with pytest.raises(ConfigError) as info:
        run_id("spawn.run_id", "r" * 1_000_000)
    assert len(str(info.value)) < 300
    assert "1000000" in str(info.value)


def test_a_str_subclass_comes_back_as_a_plain_str():
    class Id(str):
        __slots__ = ()

    assert type(run_id("f", Id("a\u00e9"))) is str
    assert type(name("f", Id("signal\u00e9"))) is str


def test_the_limits_are_the_documented_ones():
    assert (MAX_RUN_ID_BYTES, MAX_NAME_BYTES, MAX_DEDUPE_KEY_BYTES) == (256, 128, 256)


# ------------------------------------------------------------- Workflow and Step


@pytest.mark.parametrize(("value", "reason"), [*BAD, ("w" * 129, "at most 128 bytes")])
def test_workflow_names_are_checked(value, reason):
    with pytest.raises(ConfigError, match=reason) as info:
        Workflow(value, [noop])
    assert info.value.field == "Workflow.name"


NOT_EMPTY_NOR_NONE = [(v, r) for v, r in BAD if v not in ("", None)]


@pytest.mark.parametrize(("value", "reason"), [*NOT_EMPTY_NOR_NONE, ("s" * 129, "at most 128 bytes")])
def test_step_names_are_checked(value, reason):
    with pytest.raises(ConfigError, match=reason) as info:
        Step(fn=noop, name=value)
    assert info.value.field == "Step.name"


@pytest.mark.parametrize(
    ("value", "reason"), [*NOT_EMPTY_NOR_NONE, ("", "must not be empty"), ("g" * 129, "at most 128 bytes")]
)
def test_signal_names_a_step_waits_for_are_checked(value, reason):
    with pytest.raises(ConfigError, match=reason) as info:
        Step(fn=noop, name="pay", wait_for=value)
    assert info.value.field == "Step('pay').wait_for"


def test_an_empty_step_name_still_defaults_to_the_function_name():
    assert Step(fn=noop).name == "noop"
    assert Step(fn=noop, name="").name == "noop"


@pytest.mark.parametrize(
    ("steps", "reason"),
    [(None, "not NoneType"), (5, "not int"), ("abc", "not str"), ([], "at least one step")],
)
def test_workflow_steps_must_be_an_iterable_of_steps(steps, reason):
    with pytest.raises(ConfigError, match=reason):
        Workflow("w", steps)


def test_workflow_retry_must_be_a_retry_policy():
    with pytest.raises(ConfigError, match="must be a RetryPolicy, not int") as info:
        Workflow("w", [noop], retry=3)  # type: ignore[arg-type]
    assert info.value.field == "Workflow('w').retry"


def test_workflow_counts_the_steps_left_that_wait_for_a_signal():
    wf = Workflow(
        "w",
        [
            Step(fn=noop, name="a", wait_for="x"),
            Step(fn=noop, name="b"),
            Step(fn=noop, name="c", wait_for="y"),
            Step(fn=noop, name="d", wait_for="x"),
        ],
    )
    assert [wf.waits_for("x", from_step=k) for k in range(5)] == [2, 1, 1, 1, 0]
    assert [wf.waits_for("y", from_step=k) for k in range(5)] == [1, 1, 1, 0, 0]
    assert wf.waits_for("z") == 0
    assert [wf.signals_from(k) for k in range(5)] == [("x", "y"), ("y", "x"), ("y", "x"), ("x",), ()]
