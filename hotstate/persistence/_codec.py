"""The codecs: a value's bytes in a frame whose check covers the whole envelope (docs/architecture.md "Codec and trust").

The persister encodes each payload once per flush with a ``Codec``; every store
keeps the framed bytes as they are. A frame (version 2) is::

    magic     3 bytes: b"HS" + frame version 2
    algorithm 1 byte: 2 = XXH3-128 checksum (no key), 3 = BLAKE2b-128 MAC (keyed)
    format    1 byte: 0 = pickle, 1 = cloudpickle, 2 = JSON, 3 = MessagePack
    tag       16 bytes, over magic + algorithm + format + the context + body
    body

The *context* is bytes the caller names and the frame does not hold: for a
snapshot, its whole header as the store keeps it in columns or hash fields (run
id, workflow and definition version, version, step cursor, status, attempt,
error; ``hotstate.persistence._records``). A stored header changed by anyone
without the key no longer matches its frame's tag, so the copy is corrupt.

Without a key the tag is a checksum: it catches corruption, not forgery, so the
default codec (``MsgpackCodec``) is data-only: decoding its frames never runs
code. ``PickleCodec`` needs a key, or the named opt-in ``trust_stores=True``.

Frames of version 1 (a 32-byte BLAKE2b digest or HMAC-SHA256 over the body
only) are still read, unless ``accept_legacy=False``: their check does not
cover the header.

Bytes whose tag does not verify are never decoded.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import pickle
import struct
import sys
from typing import Any, Final, Protocol, runtime_checkable

import msgspec
import xxhash

from hotstate._errors import CodecError, ConfigError, CorruptSnapshotError

if sys.version_info >= (3, 12):
    from typing import override
else:
    from typing_extensions import override

__all__ = ["SECRET_KEY_ENV", "Codec", "JsonCodec", "MsgpackCodec", "PickleCodec", "frame_format"]

SECRET_KEY_ENV: Final = "HOTSTATE_SECRET_KEY"  # noqa: S105  (a variable name, not a secret)
"""Environment variable read for the secret key when a codec is built without one."""

_MAGIC: Final = b"HS\x02"
_MAGIC_V1: Final = b"HS\x01"
_ALG_V1_DIGEST: Final = 0
_ALG_V1_HMAC: Final = 1
_ALG_XXH3: Final = 2
_ALG_BLAKE2B: Final = 3
_FMT_PICKLE: Final = 0
_FMT_CLOUDPICKLE: Final = 1
_FMT_JSON: Final = 2
_FMT_MSGPACK: Final = 3
_TAG_SIZE: Final = 16
_V1_DIGEST_SIZE: Final = 32
_PREFIX_SIZE: Final = len(_MAGIC) + 2
_HEADER_SIZE: Final = _PREFIX_SIZE + _TAG_SIZE
_V1_HEADER_SIZE: Final = _PREFIX_SIZE + _V1_DIGEST_SIZE
_FORMAT_NAMES: Final = {
    _FMT_PICKLE: "pickle",
    _FMT_CLOUDPICKLE: "cloudpickle",
    _FMT_JSON: "json",
    _FMT_MSGPACK: "msgpack",
}
_ALGORITHM_NAMES: Final = {
    _ALG_V1_DIGEST: "BLAKE2b-256 digest (frame v1)",
    _ALG_V1_HMAC: "HMAC-SHA256 (frame v1)",
    _ALG_XXH3: "XXH3-128 checksum",
    _ALG_BLAKE2B: "BLAKE2b-128 MAC",
}
_DATA_ONLY: Final = frozenset({_FMT_JSON, _FMT_MSGPACK})
_PICKLED: Final = frozenset({_FMT_PICKLE, _FMT_CLOUDPICKLE})
_ANY_FORMAT: Final = _DATA_ONLY | _PICKLED
_LENGTH = struct.Struct("<I")
_ONE_SHOT: Final = 4096  # bytes of body hashed by one call (copied once) rather than streamed
_xxh3_128: Final = xxhash.xxh3_128_digest


@runtime_checkable
class Codec(Protocol):
    """Turns a value into a frame whose tag covers it and a context, and back.

    This protocol documents ``encode``, ``decode`` and ``verify`` once;
    ``MsgpackCodec`` (the default), ``JsonCodec`` and ``PickleCodec`` implement
    it. A codec of your own must authenticate ``context`` with the frame
    (without storing it), and must never decode bytes that did not verify.

    Attributes:
        name: a short name for the encoding, e.g. ``"msgpack"``.
        keyed: True when frames carry a MAC made with a secret key (forgery
            is detected), False for a checksum (corruption is detected).
    """

    # Empty, so that the slotted codecs that subclass the protocol stay slotted.
    __slots__ = ()

    name: str

    @property
    def keyed(self) -> bool:
        """True when frames carry a MAC made with a secret key."""
        ...

    def encode(self, value: Any, *, context: bytes = b"") -> bytes:
        """Encode ``value`` into a frame whose tag covers it and ``context``.

        Args:
            value: the value.
            context: bytes authenticated with the frame but not stored in it
                (for a snapshot: its header); ``decode`` must be given the same.

        Returns:
            The framed bytes.

        Raises:
            CodecError: the value cannot be encoded (exactly); the message names the type.
        """
        ...

    def decode(self, data: bytes, *, context: bytes = b"", tier: str = "", run_id: str = "") -> Any:
        """Verify a frame against ``context``, then decode its body.

        Args:
            data: bytes made by ``encode`` of a codec with the same key.
            context: the context given to ``encode``.
            tier: the tier the bytes came from (for error messages).
            run_id: the run the bytes belong to (for error messages).

        Returns:
            The value.

        Raises:
            CorruptSnapshotError: the frame is malformed, was altered, its
                context differs, it was made with another key (or none), or in
                a format this codec does not decode; nothing was decoded.
            CodecError: the verified body could not be decoded (e.g. a pickle
                names a class that no longer exists).
        """
        ...

    def verify(self, data: bytes, *, context: bytes = b"", tier: str = "", run_id: str = "") -> None:
        """Check a frame's tag against ``context`` without decoding its body (for tools that inspect copies).

        Raises:
            CorruptSnapshotError: as for ``decode``.
        """
        ...


def _resolve_key(key: bytes | str | None) -> bytes | None:
    if key is None:
        key = os.environ.get(SECRET_KEY_ENV) or None
        if key is None:
            return None
    if not isinstance(key, bytes | bytearray | str):
        raise ConfigError("key", key, "must be bytes or str")
    resolved = key.encode() if isinstance(key, str) else bytes(key)
    if not resolved:
        raise ConfigError("key", key, "an empty secret key gives no protection")
    return resolved


class _FramedCodec(Codec):
    """Framing, the tag and its check, shared by the codecs; subclasses pick the body format."""

    __slots__ = ("_accept_legacy", "_algorithm", "_key", "_mac_key")

    name: str = ""
    _write_format: int = -1
    _readable: frozenset[int] = _DATA_ONLY

    def __init__(self, key: bytes | str | None = None, *, accept_legacy: bool = True) -> None:
        self._key = _resolve_key(key)
        self._accept_legacy = bool(accept_legacy)
        if self._key is None:
            self._algorithm = _ALG_XXH3
            self._mac_key = b""
        else:
            self._algorithm = _ALG_BLAKE2B
            # BLAKE2b takes keys of at most 64 bytes: derive one of any secret's length.
            self._mac_key = hashlib.blake2b(self._key, digest_size=32, person=b"hotstate-mac").digest()

    @property
    @override
    def keyed(self) -> bool:
        return self._key is not None

    @property
    def algorithm(self) -> str:
        """The check frames carry: ``"BLAKE2b-128 MAC"`` with a key, ``"XXH3-128 checksum"`` without."""
        return _ALGORITHM_NAMES[self._algorithm]

    # ------------------------------------------------------------ the tag

    def _tag(self, prefix: bytes, context: bytes, body: bytes | memoryview) -> bytes:
        if self._algorithm == _ALG_XXH3:
            if len(body) <= _ONE_SHOT:  # one call beats a streaming object for small frames
                return _xxh3_128(b"".join((prefix, _LENGTH.pack(len(context)), context, body)))
            h = xxhash.xxh3_128(b"".join((prefix, _LENGTH.pack(len(context)), context)))
            h.update(body)
            return h.digest()
        m = hashlib.blake2b(
            b"".join((prefix, _LENGTH.pack(len(context)), context)), key=self._mac_key, digest_size=_TAG_SIZE
        )
        m.update(body)
        return m.digest()

    def _frame(self, fmt: int, body: bytes, context: bytes) -> bytes:
        prefix = _MAGIC + bytes((self._algorithm, fmt))
        return b"".join((prefix, self._tag(prefix, context, body), body))

    @override
    def verify(self, data: bytes, *, context: bytes = b"", tier: str = "", run_id: str = "") -> None:
        # Any known format: checking a tag decodes nothing.
        self._verify(data, context, tier, run_id, _ANY_FORMAT)

    def reframe(self, data: bytes, *, context: bytes, new_context: bytes, tier: str = "", run_id: str = "") -> bytes:
        """Check a frame against ``context``, then tag the same body for ``new_context`` (decoding nothing).

        For tools that change a stored header (``hotstate runs retry``): the
        body keeps its format and bytes; a frame of version 1 comes back as
        version 2.

        Raises:
            CorruptSnapshotError: the frame does not verify against ``context``.
        """
        fmt, body = self._verify(data, context, tier, run_id, _ANY_FORMAT)
        return self._frame(fmt, bytes(body), new_context)

    def _verify(
        self, data: bytes, context: bytes, tier: str, run_id: str, readable: frozenset[int] | None = None
    ) -> tuple[int, memoryview]:
        """Check the frame and its tag; returns (format, body). Never decodes the body."""
        formats = self._readable if readable is None else readable
        if type(data) is bytes and len(data) >= _HEADER_SIZE:
            # Fast path for well-formed frames (recovery verifies 100,000 of them).
            fmt = data[_PREFIX_SIZE - 1]
            if data[_PREFIX_SIZE - 2] == self._algorithm and data.startswith(_MAGIC) and fmt in formats:
                body = memoryview(data)[_HEADER_SIZE:]
                if hmac.compare_digest(self._tag(data[:_PREFIX_SIZE], context, body), data[_PREFIX_SIZE:_HEADER_SIZE]):
                    return fmt, body
        return self._verify_slow(data, context, tier, run_id, formats)

    def _verify_slow(
        self, data: bytes, context: bytes, tier: str, run_id: str, formats: frozenset[int]
    ) -> tuple[int, memoryview]:
        def corrupt(reason: str) -> CorruptSnapshotError:
            return CorruptSnapshotError(tier or "codec", run_id, None, reason)

        if not isinstance(data, bytes | bytearray | memoryview):
            raise corrupt(f"expected bytes, got {type(data).__qualname__}")
        view = memoryview(data)
        magic = bytes(view[: len(_MAGIC)])
        if magic == _MAGIC_V1:
            return self._verify_v1(view, corrupt, formats)
        if len(view) < _HEADER_SIZE:
            raise corrupt(f"frame too short ({len(view)} bytes)")
        if magic != _MAGIC:
            raise corrupt("not a hotstate frame (bad magic)")
        algorithm, fmt = view[len(_MAGIC)], view[len(_MAGIC) + 1]
        self._check_kind(algorithm, fmt, corrupt, formats)
        body = view[_HEADER_SIZE:]
        tag = self._tag(bytes(view[:_PREFIX_SIZE]), context, body)
        if not hmac.compare_digest(tag, bytes(view[_PREFIX_SIZE:_HEADER_SIZE])):
            raise corrupt("check failed: the bytes or the stored header were altered, or the key is wrong")
        return fmt, body

    def _check_kind(self, algorithm: int, fmt: int, corrupt: Any, formats: frozenset[int]) -> None:
        want = _ALG_BLAKE2B if self.keyed else _ALG_XXH3
        if algorithm in (_ALG_V1_DIGEST, _ALG_V1_HMAC):
            want = _ALG_V1_HMAC if self.keyed else _ALG_V1_DIGEST
        if algorithm != want:
            # A keyed codec must not accept unkeyed frames: anyone who can write
            # to the store could otherwise make a checksum.
            mine = "a MAC (keyed)" if self.keyed else "a checksum (no key)"
            named = _ALGORITHM_NAMES.get(algorithm, f"algorithm {algorithm}")
            raise corrupt(f"frame carries {named}; this codec checks {mine}")
        if fmt not in formats:
            named = _FORMAT_NAMES.get(fmt, f"format {fmt}")
            if fmt in _PICKLED:
                raise corrupt(
                    f"frame holds {named}, which the data-only codec {self.name!r} never decodes (nothing was "
                    "unpickled); to read it, use PickleCodec with the secret key it was written with"
                )
            raise corrupt(f"frame format {named} is not read by codec {self.name!r}")

    def _verify_v1(self, view: memoryview, corrupt: Any, formats: frozenset[int]) -> tuple[int, memoryview]:
        """A frame of version 1: its digest covers the body only (no context)."""
        if not self._accept_legacy:
            raise corrupt("frame version 1 (its check does not cover the header) and accept_legacy=False")
        if len(view) < _V1_HEADER_SIZE:
            raise corrupt(f"frame too short ({len(view)} bytes)")
        algorithm, fmt = view[len(_MAGIC)], view[len(_MAGIC) + 1]
        self._check_kind(algorithm, fmt, corrupt, formats)
        body = view[_V1_HEADER_SIZE:]
        h = (
            hashlib.blake2b(digest_size=_V1_DIGEST_SIZE)
            if self._key is None
            else hmac.new(self._key, digestmod=hashlib.sha256)
        )
        h.update(view[:_PREFIX_SIZE])
        h.update(body)
        if not hmac.compare_digest(h.digest(), bytes(view[_PREFIX_SIZE:_V1_HEADER_SIZE])):
            raise corrupt("digest mismatch: the bytes were altered or the key is wrong")
        return fmt, body

    # --------------------------------------------------------- the bodies

    @override
    def decode(self, data: bytes, *, context: bytes = b"", tier: str = "", run_id: str = "") -> Any:
        fmt, body = self._verify(data, context, tier, run_id)
        try:
            if fmt == _FMT_MSGPACK:
                return self._from_msgpack(body)
            if fmt == _FMT_JSON:
                return json.loads(bytes(body))
            # Only a codec that reads pickle gets here, after the tag verified.
            return pickle.loads(body)  # noqa: S301
        except Exception as exc:
            raise CodecError(
                tier or "codec",
                f"run {run_id!r}: cannot decode a verified {_FORMAT_NAMES[fmt]} body: {type(exc).__name__}: {exc}",
            ) from exc

    def _from_msgpack(self, body: memoryview) -> Any:
        return _PLAIN_DECODER.decode(body)


_PLAIN_ENCODER: Final = msgspec.msgpack.Encoder()
_PLAIN_DECODER: Final = msgspec.msgpack.Decoder()

_KEPT: Final = "dict, list, str, int (64-bit), float, bool, None, bytes, timezone-aware datetime"


def _first_difference(original: Any, decoded: Any, path: str) -> tuple[str, Any] | None:
    """Where ``decoded`` (a round trip of ``original``) differs from it: (path, the original value there)."""
    if type(original) is not type(decoded):
        return path, original
    if isinstance(original, float):
        same = original == decoded or (math.isnan(original) and math.isnan(decoded))
        return None if same else (path, original)
    if isinstance(original, dict):
        if original.keys() != decoded.keys():
            return path, original
        for key, value in original.items():
            found = _first_difference(value, decoded[key], f"{path}[{key!r}]")
            if found is not None:
                return found
        return None
    if isinstance(original, list):
        if len(original) != len(decoded):
            return path, original
        for i, (a, b) in enumerate(zip(original, decoded, strict=True)):
            found = _first_difference(a, b, f"{path}[{i}]")
            if found is not None:
                return found
        return None
    return None if original == decoded else (path, original)


class MsgpackCodec(_FramedCodec):
    """MessagePack (msgspec) for plain data and tagged msgspec ``Struct`` records: the default codec.

    Data-only: decoding a frame never runs code, whatever a store holds.
    What it accepts round-trips exactly: each encoding is decoded again and
    compared, and a value that would come back different (a tuple as a list,
    a set, a naive datetime as text, an object) is refused with a
    ``CodecError`` naming its type and where it sits. It keeps dicts, lists,
    str, int (64-bit), float, bool, None, bytes and timezone-aware datetimes,
    and instances of the ``types`` given: msgspec ``Struct`` classes declared
    with ``tag=True``, whose typed fields may hold tuples, sets, enums,
    dates, nested Structs and the rest msgspec types.

    Args:
        key: the secret for the MAC. When None, ``HOTSTATE_SECRET_KEY`` is
            read from the environment; without either, frames carry a
            checksum (corruption is caught, forgery is not).
        types: tagged ``Struct`` classes payloads and signal data may hold.
        accept_legacy: read frames of version 1 (body-only check).

    Raises:
        ConfigError: the key is empty, or a type is not a tagged ``Struct``.
    """

    __slots__ = ("_types",)

    name = "msgpack"
    _write_format = _FMT_MSGPACK

    def __init__(
        self,
        key: bytes | str | None = None,
        *,
        types: tuple[type[msgspec.Struct], ...] | list[type[msgspec.Struct]] = (),
        accept_legacy: bool = True,
    ) -> None:
        super().__init__(key, accept_legacy=accept_legacy)
        registry: dict[tuple[str, Any], type[msgspec.Struct]] = {}
        for kind in types:
            given: object = kind  # typed as a Struct class; a caller may pass anything
            config = getattr(kind, "__struct_config__", None)
            if not isinstance(given, type) or not issubclass(given, msgspec.Struct) or config is None:
                raise ConfigError("types", kind, "must be msgspec.Struct classes")
            if config.tag is None or config.tag_field is None:
                raise ConfigError("types", kind, "must be declared with tag=True (class T(msgspec.Struct, tag=True))")
            registry[(config.tag_field, config.tag)] = kind
        self._types = registry

    @override
    def encode(self, value: Any, *, context: bytes = b"") -> bytes:
        try:
            body = _PLAIN_ENCODER.encode(value)
        except (TypeError, OverflowError, UnicodeEncodeError, ValueError, RecursionError) as exc:
            raise CodecError("codec", self._refusal(value, exc)) from exc
        back = self._from_msgpack(memoryview(body))
        if back != value:
            found = _first_difference(value, back, "")
            if found is not None:
                path, bad = found
                raise CodecError(
                    "codec",
                    f"the msgpack codec cannot keep a {type(bad).__qualname__} at value{path} exactly "
                    f"(it keeps {_KEPT}, and tagged msgspec Structs given as types=); use one of those, or "
                    "PickleCodec with a secret key",
                )
        return self._frame(_FMT_MSGPACK, body, context)

    def _refusal(self, value: Any, exc: Exception) -> str:
        return (
            f"cannot encode a {type(value).__qualname__} payload with the msgpack codec: {type(exc).__name__}: {exc} "
            f"(it keeps {_KEPT}, and tagged msgspec Structs given as types=; or use PickleCodec with a secret key)"
        )

    @override
    def _from_msgpack(self, body: memoryview) -> Any:
        value = _PLAIN_DECODER.decode(body)
        return self._revive(value) if self._types else value

    def _revive(self, value: Any) -> Any:
        """Turn decoded dicts that carry a registered tag back into their ``Struct``."""
        kind = type(value)
        if kind is dict:
            for (field, tag), struct_type in self._types.items():
                if value.get(field) == tag:
                    return msgspec.convert(value, struct_type)
            return {k: self._revive(v) for k, v in value.items()}
        if kind is list:
            return [self._revive(v) for v in value]
        return value


class JsonCodec(_FramedCodec):
    """JSON for plain-data payloads, framed like ``MsgpackCodec``; data-only too.

    Tuples come back as lists; only dicts with string keys, lists, strings,
    numbers, booleans and None round-trip exactly.

    Args:
        key: the MAC secret; as for ``MsgpackCodec``.
        accept_legacy: read frames of version 1.

    Raises:
        ConfigError: the key is empty.
    """

    __slots__ = ()

    name = "json"
    _write_format = _FMT_JSON

    @override
    def encode(self, value: Any, *, context: bytes = b"") -> bytes:
        try:
            text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=True)
            body = text.encode()
        except (TypeError, ValueError, RecursionError) as exc:  # UnicodeEncodeError is a ValueError
            raise CodecError(
                "codec",
                f"cannot encode a {type(value).__qualname__} payload as JSON: {exc}",
            ) from exc
        return self._frame(_FMT_JSON, body, context)


def _encode_error(value: object, exc: Exception) -> CodecError:
    return CodecError(
        "codec",
        f"cannot pickle a {type(value).__qualname__} payload: {type(exc).__name__}: {exc}",
    )


class PickleCodec(_FramedCodec):
    """Pickle (protocol 5) with a cloudpickle fallback: any Python object, but decoding runs code.

    Whoever can write to a store can make a pickle run code when it is
    decoded, so this codec needs a secret key (frames carry a MAC; a frame
    without the right one is never unpickled), or the explicit opt-in
    ``trust_stores=True`` for stores nobody else can write to. What plain
    pickle cannot serialize (lambdas, local classes) is encoded with
    cloudpickle; the frame records which was used. It also reads the
    data-only formats (msgpack, JSON), so switching to it keeps old frames
    readable.

    Args:
        key: the MAC secret. When None, ``HOTSTATE_SECRET_KEY`` is read from
            the environment.
        trust_stores: allow no key: frames then carry a checksum, and anyone
            who can write to a store can run code in this process.
        accept_legacy: read frames of version 1.

    Raises:
        ConfigError: the key is empty, or there is no key and ``trust_stores`` is False.
    """

    __slots__ = ()

    name = "pickle"
    _write_format = _FMT_PICKLE
    _readable = _DATA_ONLY | _PICKLED

    def __init__(
        self, key: bytes | str | None = None, *, trust_stores: bool = False, accept_legacy: bool = True
    ) -> None:
        super().__init__(key, accept_legacy=accept_legacy)
        if self._key is None and not trust_stores:
            raise ConfigError(
                "key",
                None,
                "PickleCodec runs code from the stores when it decodes: give it a secret key "
                f"(PickleCodec(key=...) or {SECRET_KEY_ENV}), or opt in with PickleCodec(trust_stores=True) "
                "when nobody else can write to the stores; the default MsgpackCodec needs neither",
            )

    @override
    def encode(self, value: Any, *, context: bytes = b"") -> bytes:
        try:
            return self._frame(_FMT_PICKLE, pickle.dumps(value, protocol=5), context)
        except (pickle.PicklingError, TypeError, AttributeError):
            pass  # lambdas, local classes: cloudpickle below
        except Exception as exc:
            raise _encode_error(value, exc) from exc
        import cloudpickle  # only needed on the fallback path

        try:
            body: bytes = cloudpickle.dumps(value, protocol=5)
        except Exception as exc:
            # A user's __reduce__ may raise anything; it is still an encoding failure.
            raise _encode_error(value, exc) from exc
        return self._frame(_FMT_CLOUDPICKLE, body, context)


def frame_format(data: bytes) -> str | None:
    """Name the body format of a frame (``"msgpack"``, ``"json"``, ``"pickle"``, ``"cloudpickle"``).

    Reads only the unverified header; for diagnostics, never for trust decisions.

    Args:
        data: framed bytes.

    Returns:
        The format name, or None when ``data`` is not a hotstate frame.
    """
    if len(data) < _PREFIX_SIZE or data[: len(_MAGIC)] not in (_MAGIC, _MAGIC_V1):
        return None
    return _FORMAT_NAMES.get(data[len(_MAGIC) + 1])
