"""Fuzzing every decode path: whatever the bytes, only the typed errors come out (#5).

Stored bytes and text are untrusted (a disk flips bits, someone writes into
Valkey). Every function that reads them back must raise ``CorruptSnapshotError``
or ``CodecError`` (both ``PersistenceError``), never ``KeyError``, ``TypeError``,
``OverflowError``, ``RecursionError``, ``UnicodeDecodeError``... so recovery can
report a bad copy and go on. ``test_codec.py`` already fuzzes raw bytes into the
codecs; here the inputs are shaped to get past each check in turn: genuine frames
with mutations, verified frames around hostile JSON, headers with every field
type, transitions and error records with extreme numbers and deep nesting.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

from hotstate import CodecError, CorruptSnapshotError, PersistenceError
from hotstate.persistence import JsonCodec, PickleCodec
from hotstate.persistence._records import (
    RunHeader,
    StoredSnapshot,
    decode_snapshot,
    error_from_json,
    errors_from_json,
    snapshot_context,
    transition_from_json,
    transition_from_row,
)

KEY = b"fuzz-key" * 4
TYPED = (CodecError, CorruptSnapshotError)
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DEEP = "[" * 3_000 + "]" * 3_000  # nesting past the interpreter's recursion limit (1,000)

# JSON-ish values with the awkward corners: huge ints, inf/nan, surrogates, nesting.
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=10**300, max_value=10**400)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=8) | st.dictionaries(st.text(max_size=8), inner, max_size=8),
    max_leaves=30,
)
any_values = json_values | st.binary(max_size=20) | st.tuples(scalars, scalars)


def codecs() -> list[PickleCodec | JsonCodec]:
    return [PickleCodec(trust_stores=True), PickleCodec(KEY), JsonCodec(), JsonCodec(KEY)]


def decodes_or_raises_typed(fn: Any, *args: Any, **kwargs: Any) -> None:
    """Call ``fn``: it returns, or raises one of the typed errors (anything else fails the test)."""
    try:
        fn(*args, **kwargs)
    except TYPED as exc:
        error: PersistenceError = exc
    else:
        return
    assert error.tier  # every typed error names where the bytes came from


# ------------------------------------------------------------------------ codec frames


@FUZZ
@given(
    value=json_values,
    index=st.integers(min_value=0),
    xor=st.integers(min_value=1, max_value=255),
    cut=st.integers(min_value=0),
)
def test_a_mutated_genuine_frame_is_rejected_as_corrupt_never_decoded(
    value: Any, index: int, xor: int, cut: int
) -> None:
    for codec in codecs():
        frame = codec.encode(value)
        flipped = bytearray(frame)
        flipped[index % len(frame)] ^= xor
        for bad in (bytes(flipped), frame[: cut % len(frame)]):
            with pytest.raises(CorruptSnapshotError):
                codec.decode(bad, tier="t", run_id="r")


@FUZZ
@given(
    algorithm=st.integers(min_value=0, max_value=255),
    fmt=st.integers(min_value=0, max_value=255),
    rest=st.binary(max_size=120),
    kind=st.sampled_from([bytes, bytearray, memoryview]),
)
def test_a_frame_with_the_right_magic_and_any_header_raises_only_typed_errors(
    algorithm: int, fmt: int, rest: bytes, kind: type
) -> None:
    data = kind(b"HS\x01" + bytes((algorithm, fmt)) + rest)
    for codec in codecs():
        decodes_or_raises_typed(codec.decode, data, tier="t", run_id="r")


@FUZZ
@given(value=st.one_of(st.text(max_size=40), st.integers(), st.none(), st.lists(st.integers(), max_size=5)))
def test_a_value_that_is_not_bytes_is_corrupt(value: Any) -> None:
    for codec in codecs():
        with pytest.raises(CorruptSnapshotError):
            codec.decode(value, tier="t", run_id="r")


@FUZZ
@given(text=st.text(max_size=200) | st.just(DEEP) | json_values.map(lambda v: json.dumps(v)))
@example(text=DEEP)
def test_a_verified_json_frame_with_any_body_raises_only_codec_errors(text: str) -> None:
    codec = JsonCodec(KEY)
    for body in (text.encode("utf-8", "surrogatepass"), text.encode("utf-16")):
        framed = codec._frame(2, body, b"")  # correctly signed: only the body is hostile
        decodes_or_raises_typed(codec.decode, framed, tier="t", run_id="r")


# ----------------------------------------------------------------- stored snapshots


headers = st.builds(
    RunHeader,
    run_id=st.text(max_size=10),
    workflow=st.text(max_size=10),
    workflow_version=st.integers(),
    version=st.integers(),
    step=st.integers(),
    status=st.sampled_from(["pending", "running", "waiting", "done", "failed"])
    | st.text(max_size=10)
    | st.integers()
    | st.none(),
    updated_at=st.floats(),
    attempt=st.integers(),
)
bodies = st.fixed_dictionaries({"payload": json_values}, optional={"signals": json_values}) | json_values


@FUZZ
@given(header=headers, body=bodies, error=st.none() | st.text(max_size=60) | json_values.map(json.dumps))
def test_decoding_a_stored_snapshot_with_any_header_body_and_error_raises_only_typed_errors(
    header: RunHeader, body: Any, error: str | None
) -> None:
    for codec in (JsonCodec(KEY), PickleCodec(KEY)):
        stored = StoredSnapshot(header, error, codec.encode(body))
        decodes_or_raises_typed(decode_snapshot, stored, codec, tier="t")


@FUZZ
@given(header=headers, raw=st.binary(max_size=80))
def test_decoding_a_stored_snapshot_with_raw_bytes_is_corrupt_and_names_run_and_version(
    header: RunHeader, raw: bytes
) -> None:
    for codec in codecs():
        with pytest.raises(CorruptSnapshotError) as info:
            decode_snapshot(StoredSnapshot(header, None, raw), codec, tier="t")
        assert (info.value.tier, info.value.run_id, info.value.version) == ("t", header.run_id, header.version)


@pytest.mark.parametrize("status", [["waiting"], {"s": 1}, b"waiting"], ids=["list", "dict", "bytes"])
def test_a_header_status_of_the_wrong_type_is_corrupt(status: Any) -> None:
    # The frame's check covers the header: a status changed to anything else fails it.
    codec = JsonCodec(KEY)
    good = RunHeader("r", "wf", 1, 1, 0, "waiting", 1.0, 1)
    body = codec.encode({"payload": 1}, context=snapshot_context(good, None))
    decode_snapshot(StoredSnapshot(good, None, body), codec, tier="t")
    with pytest.raises(CorruptSnapshotError):
        decode_snapshot(StoredSnapshot(good._replace(status=status), None, body), codec, tier="t")


def test_a_deeply_nested_stored_error_is_a_codec_error() -> None:
    # Even one that verifies (made with the key) is refused with a typed error.
    codec = JsonCodec(KEY)
    header = RunHeader("r", "wf", 1, 1, 0, "waiting", 1.0, 1)
    body = codec.encode({"payload": 1}, context=snapshot_context(header, DEEP))
    with pytest.raises(CodecError):
        decode_snapshot(StoredSnapshot(header, DEEP, body), codec, tier="t")


# ---------------------------------------------------------------------- transitions


rows = st.lists(any_values, min_size=0, max_size=9) | st.tuples(
    st.text(max_size=5) | st.integers(),
    scalars,
    st.sampled_from(["spawned", "stepped", "resumed"]) | scalars,
    scalars,
    st.sampled_from(["running", "waiting", "done"]) | scalars,
    scalars,
    scalars,
)


@FUZZ
@given(row=rows)
@example(row=("r", float("inf"), "spawned", 0, "pending", 1.0, None))
@example(row=("r", 1, "spawned", 0, "pending", 10**400, None))
def test_a_transition_row_with_any_fields_raises_only_codec_errors(row: Any) -> None:
    decodes_or_raises_typed(transition_from_row, row, tier="t")


@FUZZ
@given(text=st.text(max_size=200) | rows.map(lambda r: json.dumps(list(r), default=repr)) | json_values.map(json.dumps))
@example(text='["r", Infinity, "spawned", 0, "pending", 1.0, null]')
@example(text=f'["r", 1, "spawned", 0, "pending", {"9" * 400}, null]')
@example(text=DEEP)
def test_transition_json_text_of_any_shape_raises_only_codec_errors(text: str) -> None:
    decodes_or_raises_typed(transition_from_json, text, tier="t")
    decodes_or_raises_typed(transition_from_json, text.encode("utf-8", "surrogatepass"), tier="t")


@FUZZ
@given(raw=st.binary(max_size=100))
@example(raw=b"\xff\xfe")
def test_transition_json_bytes_that_are_not_utf8_raise_only_codec_errors(raw: bytes) -> None:
    decodes_or_raises_typed(transition_from_json, raw, tier="t")


# -------------------------------------------------------------------- error records

FIELDS = ("type", "message", "traceback", "step", "step_name", "attempt", "at")
error_objects = st.fixed_dictionaries(dict.fromkeys(FIELDS, any_values)) | st.dictionaries(
    st.sampled_from(FIELDS) | st.text(max_size=5), any_values, max_size=8
)


def as_json(value: Any) -> str:
    return json.dumps(value, default=repr)


@FUZZ
@given(
    text=st.text(max_size=200) | error_objects.map(as_json) | json_values.map(json.dumps),
)
@example(text='{"type":"a","message":"b","traceback":"","step":Infinity,"step_name":"s","attempt":1,"at":1}')
@example(text='{"type":"a","message":"b","traceback":"","step":1,"step_name":"s","attempt":1,"at":' + "9" * 400 + "}")
@example(text=DEEP)
def test_error_json_of_any_shape_raises_only_codec_errors(text: str) -> None:
    decodes_or_raises_typed(error_from_json, text, tier="t")


@FUZZ
@given(text=st.text(max_size=200) | st.lists(error_objects, max_size=4).map(as_json) | json_values.map(json.dumps))
@example(text='[{"type":"a","message":"b","traceback":"","step":-Infinity,"step_name":"s","attempt":1,"at":1}]')
@example(text=DEEP)
def test_error_list_json_of_any_shape_raises_only_codec_errors(text: str) -> None:
    decodes_or_raises_typed(errors_from_json, text, tier="t")
