# mypy: allow-untyped-defs
"""Pure data: Snapshot, Transition, Status, TransitionKind, ErrorInfo and History."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from hotstate import ErrorInfo, Snapshot, Status, Transition, TransitionKind
from hotstate.actors import TERMINAL_STATUSES
from hotstate.actors._history import History


def _snapshot(**changes: Any) -> Snapshot:
    base = Snapshot(
        run_id="r1",
        workflow="order",
        workflow_version=1,
        version=1,
        step=0,
        status=Status.pending,
        payload={"a": 1},
        error=None,
        updated_at=10.0,
    )
    return base._replace(**changes)


def test_snapshot_is_immutable():
    snap = _snapshot()
    with pytest.raises(AttributeError):
        snap.version = 2  # type: ignore[misc]


def test_replace_makes_a_changed_copy_and_leaves_the_original():
    snap = _snapshot()
    newer = snap._replace(version=2, status=Status.running)
    assert (snap.version, snap.status) == (1, Status.pending)
    assert (newer.version, newer.status, newer.run_id) == (2, Status.running, "r1")


def test_snapshot_defaults_attempt_one_and_no_signals():
    snap = _snapshot()
    assert snap.attempt == 1
    assert snap.signals == ()


@pytest.mark.parametrize("status", list(Status))
def test_finished_is_true_exactly_for_terminal_statuses(status):
    expected = status in (Status.done, Status.failed, Status.cancelled)
    assert _snapshot(status=status).finished is expected


def test_terminal_statuses_are_done_failed_and_cancelled():
    assert frozenset({Status.done, Status.failed, Status.cancelled}) == TERMINAL_STATUSES


@pytest.mark.parametrize("enum_cls", [Status, TransitionKind])
def test_enum_members_are_lowercase_strings_matching_their_names(enum_cls):
    for member in enum_cls:
        assert member.value == member.name
        assert member.value == member.value.lower()
        assert str(member) == member.value
        assert enum_cls(member.value) is member


def test_status_has_every_status_the_design_names():
    names = {s.value for s in Status}
    assert {
        "pending",
        "running",
        "waiting",
        "done",
        "failed",
        "compensating",
        "cancelled",
    } <= names


def _raise_value_error() -> None:
    raise ValueError("bad card")


def test_error_info_records_type_message_traceback_and_where():
    try:
        _raise_value_error()
    except ValueError as exc:
        info = ErrorInfo.from_exception(exc, step=2, step_name="charge", attempt=3, at=99.5)
    assert info.type == "builtins.ValueError"
    assert info.message == "bad card"
    assert "_raise_value_error" in info.traceback
    assert "ValueError: bad card" in info.traceback
    assert (info.step, info.step_name, info.attempt, info.at) == (2, "charge", 3, 99.5)
    assert info.summary == "ValueError: bad card"


def test_error_info_names_local_classes_by_qualified_name():
    class BoomError(Exception):
        pass

    info = ErrorInfo.from_exception(BoomError("x"), step=0, step_name="s", attempt=1, at=0.0)
    assert info.type.endswith("BoomError")
    assert "<locals>" in info.type
    assert info.summary == "BoomError: x"


def test_error_info_is_frozen():
    info = ErrorInfo.from_exception(ValueError("x"), step=0, step_name="s", attempt=1, at=0.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.message = "y"  # type: ignore[misc]


def test_transition_is_an_immutable_record_with_optional_detail():
    tr = Transition("r1", 3, TransitionKind.step, 1, Status.running, 5.0)
    assert tr.detail is None
    with pytest.raises(AttributeError):
        tr.version = 4  # type: ignore[misc]


def test_history_rebuilds_transitions_with_consecutive_versions_and_details():
    first = Transition("r1", 1, TransitionKind.spawned, 0, Status.pending, 1.0)
    history = History(0, first)
    rest = [
        Transition("r1", 2, TransitionKind.step, 0, Status.running, 2.0),
        Transition("r1", 3, TransitionKind.waiting, 1, Status.waiting, 3.0, "paid"),
        Transition(
            "r1",
            4,
            TransitionKind.step_failed,
            70_000,
            Status.retrying,
            4.5,
            "ValueError: x",
        ),
        Transition("r1", 5, TransitionKind.cancelled, 70_000, Status.cancelled, 6.0),
    ]
    for tr in rest:
        history.add(tr)
    assert history.transitions("r1") == [first, *rest]
    assert len(history) == 5
    assert history.last_at() == 6.0


def test_history_of_a_resumed_run_numbers_versions_from_its_base():
    history = History(41)
    history.add(Transition("r1", 42, TransitionKind.resumed, 3, Status.running, 1.0, "from v41"))
    assert history.transitions("r1") == [
        Transition("r1", 42, TransitionKind.resumed, 3, Status.running, 1.0, "from v41")
    ]
    assert History().last_at() is None


def test_field_orders_that_positional_construction_relies_on_are_pinned():
    """``new_tuple(Snapshot, (...))`` is used on the measured paths: a reordered field must fail here, loudly."""
    from hotstate.actors._context import StepContext
    from hotstate.persistence import RunHeader

    assert Snapshot._fields == (
        "run_id",
        "workflow",
        "workflow_version",
        "version",
        "step",
        "status",
        "payload",
        "error",
        "updated_at",
        "attempt",
        "signals",
    )
    assert Transition._fields == ("run_id", "version", "kind", "step", "status", "at", "detail")
    assert StepContext._fields == (
        "run_id",
        "workflow",
        "workflow_version",
        "step",
        "step_name",
        "attempt",
        "version",
        "signal",
        "compensating",
    )
    assert RunHeader._fields == (
        "run_id",
        "workflow",
        "workflow_version",
        "version",
        "step",
        "status",
        "updated_at",
        "attempt",
        "epoch",
    )
