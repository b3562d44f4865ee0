"""The codecs: round trips, exactness of the data-only default, the cloudpickle fallback, frames of version 1,
and "bytes that do not verify are never decoded"."""

from __future__ import annotations

import contextlib
import datetime
import decimal
import hashlib
import hmac
import json
import pickle
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings, strategies as st

from hotstate import (
    CodecError,
    ConfigError,
    CorruptSnapshotError,
    ErrorInfo,
    Snapshot,
    Status,
)
from hotstate.persistence import SECRET_KEY_ENV, Codec, JsonCodec, MsgpackCodec, PickleCodec
from hotstate.persistence._codec import frame_format
from hotstate.persistence._records import decode_snapshot, encode_snapshot

KEY = b"test-secret-key"


@dataclass(frozen=True)
class Order:
    sku: str
    qty: int


class Marker:
    """Unpickling writes a file: the observable side effect of ``pickle.loads``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path(self.path).write_text, ("unpickled!",))


# --- round trips -------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [None, 0, "text", b"\x00\xff", [1, (2, 3)], {"a": {1, 2}}, Order("x", 2), 10**40],
)
@pytest.mark.parametrize("key", [None, KEY])
def test_pickle_codec_round_trips_values(value: object, key: bytes | None) -> None:
    codec = PickleCodec(key, trust_stores=True)
    assert codec.decode(codec.encode(value)) == value


@pytest.mark.parametrize("value", [None, 1, 2.5, "é", [1, "a"], {"k": [True, None]}])
def test_json_codec_round_trips_plain_data(value: object) -> None:
    codec = JsonCodec(key=KEY)
    assert codec.decode(codec.encode(value)) == value


def test_codecs_satisfy_the_protocol() -> None:
    assert isinstance(PickleCodec(trust_stores=True), Codec)
    assert isinstance(JsonCodec(), Codec)
    assert isinstance(MsgpackCodec(), Codec)
    assert (PickleCodec(trust_stores=True).name, JsonCodec().name, MsgpackCodec().name) == ("pickle", "json", "msgpack")


def test_snapshot_round_trips_through_encode_and_decode() -> None:
    error = ErrorInfo.from_exception(ValueError("boom"), step=1, step_name="charge", attempt=2, at=5.0)
    snapshot = Snapshot(
        run_id="r",
        workflow="orders",
        workflow_version=1,
        version=3,
        step=1,
        status=Status.retrying,
        payload=Order("x", 1),
        error=error,
        updated_at=12.5,
        attempt=2,
        signals=(("go", {"fast": True}),),
    )
    codec = PickleCodec(KEY)
    assert decode_snapshot(encode_snapshot(snapshot, codec), codec, tier="t") == snapshot


# --- cloudpickle fallback and encoding failures -----------------------------------


def test_lambda_falls_back_to_cloudpickle_and_still_decodes() -> None:
    codec = PickleCodec(KEY)
    data = codec.encode({"f": lambda x: x * 3})
    assert frame_format(data) == "cloudpickle"
    assert codec.decode(data)["f"](4) == 12


def test_local_class_falls_back_to_cloudpickle() -> None:
    class Local:
        def __init__(self, n: int) -> None:
            self.n = n

    codec = PickleCodec(trust_stores=True)
    data = codec.encode(Local(7))
    assert frame_format(data) == "cloudpickle"
    assert codec.decode(data).n == 7


def test_plain_values_use_plain_pickle() -> None:
    assert frame_format(PickleCodec(trust_stores=True).encode({"a": 1})) == "pickle"


def gen() -> Any:
    yield 1


@pytest.mark.parametrize(
    ("value", "type_name"),
    [
        (threading.Lock(), "lock"),
        (gen(), "generator"),
        ({"lock": threading.Lock()}, "lock"),
    ],
)
def test_unpicklable_value_raises_codec_error_naming_the_type(value: object, type_name: str) -> None:
    with pytest.raises(CodecError, match=type_name) as info:
        PickleCodec(trust_stores=True).encode(value)
    assert info.value.__cause__ is not None


def test_json_codec_rejects_non_json_values_naming_the_type() -> None:
    with pytest.raises(CodecError, match="Order"):
        JsonCodec().encode(Order("x", 1))


def test_empty_key_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="key"):
        PickleCodec(key=b"")


# --- trust: frames that do not verify are rejected before unpickling -------------------


def flipped(data: bytes, index: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 0x01
    return bytes(out)


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(lambda d: flipped(d, len(d) - 1), id="flipped-body-byte"),
        pytest.param(lambda d: flipped(d, 10), id="flipped-digest-byte"),
        pytest.param(lambda d: flipped(d, 4), id="flipped-format-byte"),
        pytest.param(lambda d: flipped(d, 0), id="flipped-magic-byte"),
        pytest.param(lambda d: d[:-1], id="truncated-body"),
        pytest.param(lambda d: d[:20], id="truncated-header"),
        pytest.param(lambda d: b"", id="empty"),
        pytest.param(lambda d: d + b"x", id="appended-byte"),
    ],
)
@pytest.mark.parametrize("key", [None, KEY])
def test_tampered_frame_is_corrupt(tamper: Any, key: bytes | None) -> None:
    codec = PickleCodec(key, trust_stores=True)
    with pytest.raises(CorruptSnapshotError) as info:
        codec.decode(tamper(codec.encode({"a": 1})), tier="sqlite", run_id="r1")
    assert (info.value.tier, info.value.run_id) == ("sqlite", "r1")


def test_frame_made_with_another_key_is_corrupt() -> None:
    data = PickleCodec(b"other-key").encode("x")
    with pytest.raises(CorruptSnapshotError, match="check failed"):
        PickleCodec(KEY).decode(data)


def test_unkeyed_frame_is_rejected_by_a_keyed_codec() -> None:
    with pytest.raises(CorruptSnapshotError, match="checksum"):
        PickleCodec(KEY).decode(PickleCodec(trust_stores=True).encode("x"))


def test_keyed_frame_is_rejected_by_an_unkeyed_codec() -> None:
    with pytest.raises(CorruptSnapshotError, match="MAC"):
        PickleCodec(trust_stores=True).decode(PickleCodec(KEY).encode("x"))


def test_foreign_raw_pickle_is_corrupt() -> None:
    with pytest.raises(CorruptSnapshotError, match="magic"):
        PickleCodec(trust_stores=True).decode(pickle.dumps({"a": list(range(40))}, protocol=5))


def test_the_pickle_codec_reads_the_data_only_formats() -> None:
    # Switching to pickle keeps what the default codec wrote readable.
    codec = PickleCodec(trust_stores=True)
    assert codec.decode(JsonCodec().encode([1])) == [1]
    assert codec.decode(MsgpackCodec().encode({"a": [1]})) == {"a": [1]}


@pytest.mark.parametrize("key", [None, KEY])
@pytest.mark.parametrize("reader", [MsgpackCodec, JsonCodec])
def test_data_only_codecs_never_unpickle_a_pickle_frame_even_one_that_verifies(
    tmp_path: Path, key: bytes | None, reader: Any
) -> None:
    marker = tmp_path / "side-effect"
    frame = PickleCodec(key, trust_stores=True).encode(Marker(str(marker)))
    with pytest.raises(CorruptSnapshotError, match="never decodes"):
        reader(key).decode(frame, tier="valkey", run_id="r1")
    reader(key).verify(frame)  # its check is intact: only decoding is refused
    assert not marker.exists()


def test_forged_frame_is_never_unpickled_but_a_verified_one_would_be(
    tmp_path: Path,
) -> None:
    marker = tmp_path / "side-effect"
    codec = PickleCodec(KEY)
    evil = pickle.dumps(Marker(str(marker)), protocol=5)
    genuine = codec.encode(Marker(str(marker)))
    body_start = len(genuine) - len(evil)
    assert genuine[body_start:] == evil

    forgeries = [
        genuine[: body_start - 16] + b"\x00" * 16 + evil,  # zeroed MAC
        PickleCodec(trust_stores=True).encode(Marker(str(marker))),  # unkeyed digest, recomputed by the attacker
        PickleCodec(b"attacker-key").encode(Marker(str(marker))),  # attacker's own key
        evil,  # raw pickle
    ]
    for forged in forgeries:
        with pytest.raises(CorruptSnapshotError):
            codec.decode(forged)
        assert not marker.exists()

    # The control: with the right key the same bytes are unpickled, and the side effect happens.
    codec.decode(genuine)
    assert marker.read_text() == "unpickled!"


def test_secret_key_is_read_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(SECRET_KEY_ENV, KEY.decode())
    from_env = PickleCodec()
    assert from_env.keyed
    assert MsgpackCodec().keyed
    assert PickleCodec(KEY).decode(from_env.encode("x")) == "x"
    monkeypatch.delenv(SECRET_KEY_ENV)
    assert not PickleCodec(trust_stores=True).keyed


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200), keyed=st.booleans())
def test_decoding_arbitrary_bytes_raises_only_codec_errors(data: bytes, keyed: bool) -> None:
    for codec in (
        PickleCodec(KEY if keyed else None, trust_stores=True),
        JsonCodec(KEY if keyed else None),
        MsgpackCodec(KEY if keyed else None),
    ):
        with contextlib.suppress(CorruptSnapshotError, CodecError):
            codec.decode(data)


@settings(max_examples=200, deadline=None)
@given(body=st.binary(max_size=120))
def test_a_verified_frame_with_a_malformed_body_raises_codec_error(body: bytes) -> None:
    codec = JsonCodec(KEY)
    framed = codec._frame(2, body, b"")  # a correctly signed frame around arbitrary bytes
    with contextlib.suppress(CodecError):
        codec.decode(framed)
    msgpack = MsgpackCodec(KEY)
    with contextlib.suppress(CodecError):
        msgpack.decode(msgpack._frame(3, body, b""))


@pytest.mark.parametrize(
    "codec", [PickleCodec(trust_stores=True), JsonCodec(), PickleCodec(key=b"k" * 32), MsgpackCodec(b"k" * 100)]
)
def test_verify_accepts_intact_frames_and_names_the_run_for_altered_ones(codec: Codec) -> None:
    frame = codec.encode({"a": 1})
    codec.verify(frame, tier="sqlite", run_id="r1")  # intact: no error, nothing decoded
    flipped = frame[:-1] + bytes([frame[-1] ^ 1])
    with pytest.raises(CorruptSnapshotError, match="r1"):
        codec.verify(flipped, tier="sqlite", run_id="r1")
    with pytest.raises(CorruptSnapshotError):
        codec.verify(frame[:5], tier="sqlite", run_id="r1")


# --- the pickle codec needs a key or a named opt-in -------------------------------------


def test_pickle_without_a_key_is_refused_naming_the_opt_in(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SECRET_KEY_ENV, raising=False)
    with pytest.raises(ConfigError, match="trust_stores=True"):
        PickleCodec()
    assert not PickleCodec(trust_stores=True).keyed
    assert PickleCodec(KEY).keyed


# --- the data-only default: exact round trip, or a CodecError naming the type ------------


class Line(msgspec.Struct, tag=True):
    sku: str
    qty: int
    tags: tuple[str, ...] = ()
    when: datetime.date | None = None


class Basket(msgspec.Struct, tag=True):
    lines: list[Line]
    seen: frozenset[int] = frozenset()


class Untagged(msgspec.Struct):
    a: int


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        -(2**63),
        2**64 - 1,
        1.5,
        "é\u202e",
        b"\x00\xff",
        [1, [2, {"k": None}]],
        {"a": {"b": [1.0, "x"]}, 3: "int key"},
        datetime.datetime(2026, 11, 29, 12, 0, tzinfo=datetime.UTC),
        {"nan": float("nan")},
    ],
    ids=repr,
)
@pytest.mark.parametrize("key", [None, KEY])
def test_msgpack_round_trips_plain_data_exactly(value: object, key: bytes | None) -> None:
    codec = MsgpackCodec(key)
    back = codec.decode(codec.encode(value))
    assert type(back) is type(value)
    assert repr(back) == repr(value)  # repr: equal, and NaN compares by its text


@pytest.mark.parametrize(
    ("value", "type_name", "where"),
    [
        ((1, 2), "tuple", "value"),
        ({"items": ("a", "b")}, "tuple", "value['items']"),
        ({"s": {1, 2}}, "set", "value['s']"),
        ([datetime.datetime(2026, 1, 1)], "datetime", "value[0]"),  # naive: would come back as text
        ({"d": datetime.date(2026, 1, 1)}, "date", "value['d']"),
        ({"o": Order("x", 1)}, "Order", ""),
        ({"l": Line("x", 1)}, "Line", "value['l']"),  # a Struct not given as types=
        ({"u": uuid.UUID(int=1)}, "UUID", "value['u']"),
        ({"n": decimal.Decimal("1.5")}, "Decimal", "value['n']"),
        ({"big": 2**64}, "int", ""),
        ({"s": "bad \udcff"}, "str", ""),
        ({"lock": threading.Lock()}, "lock", ""),
    ],
)
def test_msgpack_refuses_what_would_not_come_back_the_same_naming_type_and_place(
    value: object, type_name: str, where: str
) -> None:
    with pytest.raises(CodecError, match=type_name) as info:
        MsgpackCodec().encode(value)
    assert where in str(info.value)
    assert "PickleCodec" in str(info.value)  # says how to keep arbitrary objects


def test_msgpack_keeps_tagged_structs_given_as_types_anywhere_in_the_value() -> None:
    codec = MsgpackCodec(types=[Line, Basket])
    basket = Basket([Line("a", 1, ("x", "y"), datetime.date(2026, 1, 2)), Line("b", 2)], frozenset({3}))
    value = {"basket": basket, "extra": [Line("c", 3)], "n": 1}
    back = codec.decode(codec.encode(value))
    assert back == value
    assert type(back["basket"].lines[0].tags) is tuple
    assert type(back["extra"][0]) is Line


def test_msgpack_types_must_be_tagged_structs() -> None:
    with pytest.raises(ConfigError, match="tag=True"):
        MsgpackCodec(types=[Untagged])
    with pytest.raises(ConfigError, match=r"msgspec\.Struct"):
        MsgpackCodec(types=[Order])  # type: ignore[list-item]


# --- frames of version 1 (the previous release) still read ---------------------------------


def v1_frame(fmt: int, body: bytes, key: bytes | None) -> bytes:
    """A frame as release 0.x wrote it: a 32-byte digest or HMAC-SHA256 over prefix + body only."""
    prefix = b"HS\x01" + bytes((0 if key is None else 1, fmt))
    digest = (
        hashlib.blake2b(prefix + body, digest_size=32).digest()
        if key is None
        else hmac.new(key, prefix + body, hashlib.sha256).digest()
    )
    return prefix + digest + body


@pytest.mark.parametrize("key", [None, KEY])
def test_version_1_frames_still_read(key: bytes | None) -> None:
    value = {"payload": {"n": 1}, "signals": []}
    assert PickleCodec(key, trust_stores=True).decode(v1_frame(0, pickle.dumps(value), key)) == value
    assert MsgpackCodec(key).decode(v1_frame(2, json.dumps(value).encode(), key)) == value
    assert frame_format(v1_frame(0, b"x", key)) == "pickle"


def test_version_1_pickle_is_never_unpickled_by_the_default_codec_and_legacy_can_be_refused(tmp_path: Path) -> None:
    marker = tmp_path / "side-effect"
    frame = v1_frame(0, pickle.dumps(Marker(str(marker))), None)
    with pytest.raises(CorruptSnapshotError, match="never decodes"):
        MsgpackCodec().decode(frame)
    assert not marker.exists()
    with pytest.raises(CorruptSnapshotError, match="accept_legacy"):
        PickleCodec(trust_stores=True, accept_legacy=False).decode(frame)
    assert not marker.exists()


# --- the context: bytes the frame authenticates without holding ---------------------------


@pytest.mark.parametrize("codec", [MsgpackCodec(), MsgpackCodec(KEY), PickleCodec(KEY), JsonCodec(KEY)])
def test_a_frame_verifies_only_with_the_context_it_was_made_with(codec: Codec) -> None:
    frame = codec.encode({"a": 1}, context=b"run r1 v3")
    assert codec.decode(frame, context=b"run r1 v3") == {"a": 1}
    for other in (b"", b"run r1 v4", b"run r2 v3", b"run r1 v3\x00"):
        with pytest.raises(CorruptSnapshotError):
            codec.decode(frame, context=other)
        with pytest.raises(CorruptSnapshotError):
            codec.verify(frame, context=other)


def test_keyed_frames_carry_blake2b_and_unkeyed_ones_xxh3() -> None:
    assert MsgpackCodec(KEY).algorithm == "BLAKE2b-128 MAC"
    assert MsgpackCodec().algorithm == "XXH3-128 checksum"
