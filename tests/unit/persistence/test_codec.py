"""The codec: round trips, the cloudpickle fallback, and "bytes that do not verify are never unpickled"."""

from __future__ import annotations

import contextlib
import pickle
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
from hotstate.persistence import SECRET_KEY_ENV, Codec, JsonCodec, PickleCodec
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
    codec = PickleCodec(key)
    assert codec.decode(codec.encode(value)) == value


@pytest.mark.parametrize("value", [None, 1, 2.5, "é", [1, "a"], {"k": [True, None]}])
def test_json_codec_round_trips_plain_data(value: object) -> None:
    codec = JsonCodec(key=KEY)
    assert codec.decode(codec.encode(value)) == value


def test_codecs_satisfy_the_protocol() -> None:
    assert isinstance(PickleCodec(), Codec)
    assert isinstance(JsonCodec(), Codec)
    assert (PickleCodec().name, JsonCodec().name) == ("pickle", "json")


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

    codec = PickleCodec()
    data = codec.encode(Local(7))
    assert frame_format(data) == "cloudpickle"
    assert codec.decode(data).n == 7


def test_plain_values_use_plain_pickle() -> None:
    assert frame_format(PickleCodec().encode({"a": 1})) == "pickle"


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
        PickleCodec().encode(value)
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
    codec = PickleCodec(key)
    with pytest.raises(CorruptSnapshotError) as info:
        codec.decode(tamper(codec.encode({"a": 1})), tier="sqlite", run_id="r1")
    assert (info.value.tier, info.value.run_id) == ("sqlite", "r1")


def test_frame_made_with_another_key_is_corrupt() -> None:
    data = PickleCodec(b"other-key").encode("x")
    with pytest.raises(CorruptSnapshotError, match="digest mismatch"):
        PickleCodec(KEY).decode(data)


def test_unkeyed_frame_is_rejected_by_a_keyed_codec() -> None:
    with pytest.raises(CorruptSnapshotError, match="algorithm"):
        PickleCodec(KEY).decode(PickleCodec().encode("x"))


def test_keyed_frame_is_rejected_by_an_unkeyed_codec() -> None:
    with pytest.raises(CorruptSnapshotError, match="algorithm"):
        PickleCodec().decode(PickleCodec(KEY).encode("x"))


def test_foreign_raw_pickle_is_corrupt() -> None:
    with pytest.raises(CorruptSnapshotError, match="magic"):
        PickleCodec().decode(pickle.dumps({"a": list(range(40))}, protocol=5))


def test_json_frame_is_rejected_by_the_pickle_codec() -> None:
    with pytest.raises(CorruptSnapshotError, match="format"):
        PickleCodec().decode(JsonCodec().encode([1]))


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
        genuine[: body_start - 32] + b"\x00" * 32 + evil,  # zeroed MAC
        PickleCodec().encode(Marker(str(marker))),  # unkeyed digest, recomputed by the attacker
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
    assert PickleCodec(KEY).decode(from_env.encode("x")) == "x"
    monkeypatch.delenv(SECRET_KEY_ENV)
    assert not PickleCodec().keyed


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200), keyed=st.booleans())
def test_decoding_arbitrary_bytes_raises_only_codec_errors(data: bytes, keyed: bool) -> None:
    for codec in (
        PickleCodec(KEY if keyed else None),
        JsonCodec(KEY if keyed else None),
    ):
        with contextlib.suppress(CorruptSnapshotError, CodecError):
            codec.decode(data)


@settings(max_examples=200, deadline=None)
@given(body=st.binary(max_size=120))
def test_a_verified_frame_with_a_malformed_body_raises_codec_error(body: bytes) -> None:
    codec = JsonCodec(KEY)
    framed = codec._frame(2, body)  # a correctly signed frame around arbitrary bytes
    with contextlib.suppress(CodecError):
        codec.decode(framed)


@pytest.mark.parametrize("codec", [PickleCodec(), JsonCodec(), PickleCodec(key=b"k" * 32)])
def test_verify_accepts_intact_frames_and_names_the_run_for_altered_ones(codec: PickleCodec | JsonCodec) -> None:
    frame = codec.encode({"a": 1})
    codec.verify(frame, tier="sqlite", run_id="r1")  # intact: no error, nothing decoded
    flipped = frame[:-1] + bytes([frame[-1] ^ 1])
    with pytest.raises(CorruptSnapshotError, match="r1"):
        codec.verify(flipped, tier="sqlite", run_id="r1")
    with pytest.raises(CorruptSnapshotError):
        codec.verify(frame[:5], tier="sqlite", run_id="r1")
