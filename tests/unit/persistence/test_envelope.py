"""The envelope check (#11): with a key, any single-field change to a stored snapshot or dead letter is detected.

Hypothesis builds a snapshot, encodes it as the persister does, changes one
stored field (a header column, the error, one byte of the body, or a field of
a dead-letter record) to any other value, and checks that decoding refuses it
with ``CorruptSnapshotError`` (or, for a value no store could hold,
``CodecError``), and that the unchanged copy still decodes to the original.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from hotstate import CodecError, CorruptSnapshotError, DeadLetter, ErrorInfo, Snapshot, Status
from hotstate.persistence import MsgpackCodec, PickleCodec, RunHeader, StoredDeadLetter, StoredSnapshot
from hotstate.persistence._records import (
    decode_dead_letter,
    decode_snapshot,
    encode_dead_letter,
    encode_snapshot,
    verify_dead_letter,
    verify_snapshot,
)

KEY = b"envelope-key"
CODECS = [MsgpackCodec(KEY), PickleCodec(KEY)]
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

names = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=12)
ints = st.integers(min_value=0, max_value=2**40)
errors = st.none() | st.builds(
    ErrorInfo,
    type=names,
    message=st.text(max_size=20).map(lambda s: s.encode("utf-8", "surrogatepass").decode("utf-8", "replace")),
    traceback=st.just(""),
    step=ints,
    step_name=names,
    attempt=st.integers(min_value=1, max_value=9),
    at=st.floats(min_value=0, max_value=2e9),
)
payloads = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=10) | st.binary(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
snapshots = st.builds(
    Snapshot,
    run_id=names,
    workflow=names,
    workflow_version=st.integers(min_value=1, max_value=9),
    version=st.integers(min_value=1, max_value=2**40),
    step=ints,
    status=st.sampled_from(list(Status)),
    payload=payloads,
    error=errors,
    updated_at=st.floats(min_value=0, max_value=2e9),
    attempt=st.integers(min_value=1, max_value=9),
    signals=st.lists(st.tuples(names, payloads), max_size=2).map(tuple),
)

HEADER_FIELDS = list(RunHeader._fields)


def other_value(value: Any, data: st.DataObject) -> Any:
    """Any value of the same kind as ``value`` but different from it."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return data.draw(st.integers(min_value=-(2**62), max_value=2**62).filter(lambda v: v != value))
    if isinstance(value, float):
        return data.draw(st.floats(allow_nan=False).filter(lambda v: v != value))
    return data.draw(st.text(max_size=12).filter(lambda v: v != value))


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.name)
@SETTINGS
@given(snap=snapshots, data=st.data())
def test_any_single_header_field_changed_is_detected(codec: Any, snap: Snapshot, data: st.DataObject) -> None:
    stored = encode_snapshot(snap, codec)
    assert decode_snapshot(stored, codec, tier="t") == snap._replace(signals=tuple(snap.signals))
    field = data.draw(st.sampled_from(HEADER_FIELDS))
    changed = stored._replace(
        header=stored.header._replace(**{field: other_value(getattr(stored.header, field), data)})
    )
    with pytest.raises(CorruptSnapshotError):
        decode_snapshot(changed, codec, tier="t")
    with pytest.raises(CorruptSnapshotError):
        verify_snapshot(changed, codec, tier="t")


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.name)
@SETTINGS
@given(snap=snapshots, data=st.data())
def test_a_changed_error_or_body_byte_is_detected(codec: Any, snap: Snapshot, data: st.DataObject) -> None:
    stored = encode_snapshot(snap, codec)
    if data.draw(st.booleans()):
        error = data.draw(st.none() | st.text(max_size=30).filter(lambda e: e != stored.error))
        if error == stored.error:
            return
        changed = stored._replace(error=error)
    else:
        index = data.draw(st.integers(min_value=0, max_value=len(stored.body) - 1))
        body = bytearray(stored.body)
        body[index] ^= data.draw(st.integers(min_value=1, max_value=255))
        changed = stored._replace(body=bytes(body))
    with pytest.raises((CorruptSnapshotError, CodecError)):
        decode_snapshot(changed, codec, tier="t")


def letter_of(snap: Snapshot) -> DeadLetter:
    error = ErrorInfo(type="x.Boom", message="m", traceback="", step=1, step_name="s", attempt=2, at=3.0)
    failed = snap._replace(status=Status.failed, error=error)
    return DeadLetter(
        run_id=snap.run_id,
        workflow=snap.workflow,
        snapshot=failed,
        error=error,
        attempts=(error,),
        compensation_errors=(),
        at=4.0,
    )


DEAD_FIELDS = ["run_id", "workflow", "at", "error", "attempts", "compensation_errors"]


@SETTINGS
@given(snap=snapshots, data=st.data())
def test_any_single_dead_letter_field_changed_is_detected(snap: Snapshot, data: st.DataObject) -> None:
    codec = MsgpackCodec(KEY)
    record = encode_dead_letter(letter_of(snap), codec)
    assert decode_dead_letter(record, codec, tier="t") == letter_of(snap)
    field = data.draw(st.sampled_from([*DEAD_FIELDS, "snapshot"]))
    if field == "snapshot":
        h = record.snapshot.header
        name = data.draw(st.sampled_from(HEADER_FIELDS))
        changed = dataclasses.replace(
            record, snapshot=record.snapshot._replace(header=h._replace(**{name: other_value(getattr(h, name), data)}))
        )
    else:
        changed = dataclasses.replace(record, **{field: other_value(getattr(record, field), data)})
    with pytest.raises((CorruptSnapshotError, CodecError)):
        decode_dead_letter(changed, codec, tier="t")
    with pytest.raises(CorruptSnapshotError):
        verify_dead_letter(changed, codec, tier="t")


def test_a_run_frame_is_not_a_dead_letter_frame_and_back() -> None:
    codec = MsgpackCodec(KEY)
    snap = Snapshot("r", "wf", 1, 3, 1, Status.failed, {"a": 1}, None, 5.0)
    record = encode_dead_letter(letter_of(snap), codec)
    row = encode_snapshot(record_snapshot := letter_of(snap).snapshot, codec)
    with pytest.raises(CorruptSnapshotError):  # the letter's frame planted as the run row
        decode_snapshot(StoredSnapshot(row.header, row.error, record.snapshot.body), codec, tier="t")
    with pytest.raises(CorruptSnapshotError):  # the run row's frame planted as the letter's
        decode_dead_letter(dataclasses.replace(record, snapshot=row), codec, tier="t")
    assert decode_snapshot(row, codec, tier="t") == record_snapshot


def test_the_header_is_bound_to_exact_float_and_int_values() -> None:
    codec = MsgpackCodec(KEY)
    snap = Snapshot("r", "wf", 1, 3, 1, Status.running, None, None, 0.1 + 0.2)
    stored = encode_snapshot(snap, codec)
    nudged = stored._replace(header=stored.header._replace(updated_at=0.30000000000000004 + 1e-16))
    assert nudged.header.updated_at != stored.header.updated_at
    with pytest.raises(CorruptSnapshotError):
        decode_snapshot(nudged, codec, tier="t")
    # A store that hands back an int for a whole float (or the reverse) still verifies: values, not types.
    whole = encode_snapshot(snap._replace(updated_at=5.0), codec)
    as_int = whole._replace(header=whole.header._replace(updated_at=5))
    assert decode_snapshot(as_int, codec, tier="t").version == 3


def test_a_stored_dead_letter_type_is_what_the_persister_writes() -> None:
    record = encode_dead_letter(letter_of(Snapshot("r", "wf", 1, 3, 1, Status.failed, None, None, 5.0)), MsgpackCodec())
    assert isinstance(record, StoredDeadLetter)
