"""The codec: payload bytes with a digest or HMAC in front (docs/architecture.md "Persistence").

The persister encodes each payload once per flush with a ``Codec``; every store
keeps the framed bytes as they are. The frame is::

    magic (3 bytes: b"HS" + frame version 1)
    algorithm (1 byte: 0 = BLAKE2b-256 digest, 1 = HMAC-SHA256 with the secret key)
    format (1 byte: 0 = pickle, 1 = cloudpickle, 2 = JSON)
    digest (32 bytes, over magic + algorithm + format + body)
    body

Bytes whose digest/MAC does not verify are never unpickled: ``decode`` checks the
frame first and reaches ``pickle.loads`` only after ``hmac.compare_digest``
accepted it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import pickle
import sys
from typing import Any, Final, Protocol, final, runtime_checkable

from hotstate._errors import CodecError, ConfigError, CorruptSnapshotError

if sys.version_info >= (3, 12):
    from typing import override
else:
    from typing_extensions import override

__all__ = ["SECRET_KEY_ENV", "Codec", "JsonCodec", "PickleCodec", "frame_format"]

SECRET_KEY_ENV: Final = "HOTSTATE_SECRET_KEY"  # noqa: S105  (a variable name, not a secret)
"""Environment variable read for the HMAC key when a codec is built without one."""

_MAGIC: Final = b"HS\x01"
_ALG_DIGEST: Final = 0
_ALG_HMAC: Final = 1
_FMT_PICKLE: Final = 0
_FMT_CLOUDPICKLE: Final = 1
_FMT_JSON: Final = 2
_DIGEST_SIZE: Final = 32
_PREFIX_SIZE: Final = len(_MAGIC) + 2
_HEADER_SIZE: Final = _PREFIX_SIZE + _DIGEST_SIZE
_FORMAT_NAMES: Final = {
    _FMT_PICKLE: "pickle",
    _FMT_CLOUDPICKLE: "cloudpickle",
    _FMT_JSON: "json",
}


@runtime_checkable
class Codec(Protocol):
    """Turns a payload into framed, digest-carrying bytes and back.

    This protocol documents ``encode`` and ``decode`` once; ``PickleCodec`` and
    ``JsonCodec`` implement it.

    Attributes:
        name: a short name for the encoding, e.g. ``"pickle"``.
    """

    # Empty, so that the slotted codecs that subclass the protocol stay slotted.
    __slots__ = ()

    name: str

    def encode(self, value: Any) -> bytes:
        """Encode ``value`` into a frame that carries its digest (or HMAC).

        Args:
            value: the payload.

        Returns:
            The framed bytes.

        Raises:
            CodecError: the value cannot be encoded; the message names its type.
        """
        ...

    def decode(self, data: bytes, *, tier: str = "", run_id: str = "") -> Any:
        """Verify a frame, then decode its body.

        The body is decoded only after the digest (or HMAC) verified: bytes
        that fail never reach the decoder (for pickle, ``pickle.loads``).

        Args:
            data: bytes made by ``encode`` of a codec with the same key.
            tier: the tier the bytes came from (for error messages).
            run_id: the run the bytes belong to (for error messages).

        Returns:
            The payload.

        Raises:
            CorruptSnapshotError: the frame is malformed, was altered, or was
                made with another key (or none) or in a format this codec does
                not read; nothing was decoded.
            CodecError: the verified body could not be decoded (e.g. a pickle
                names a class that no longer exists).
        """
        ...


def _resolve_key(key: bytes | str | None) -> bytes | None:
    if key is None:
        key = os.environ.get(SECRET_KEY_ENV) or None
        if key is None:
            return None
    resolved = key.encode() if isinstance(key, str) else bytes(key)
    if not resolved:
        raise ConfigError("key", key, "an empty secret key gives no protection")
    return resolved


class _FramedCodec(Codec):
    """Framing, digest and verification shared by the codecs; subclasses pick the body."""

    __slots__ = ("_algorithm", "_key")

    _accepted_formats: frozenset[int] = frozenset()

    def __init__(self, key: bytes | str | None = None) -> None:
        self._key = _resolve_key(key)
        self._algorithm = _ALG_DIGEST if self._key is None else _ALG_HMAC

    @property
    def keyed(self) -> bool:
        """True when frames carry an HMAC made with a secret key."""
        return self._key is not None

    def _digest(self, prefix: bytes, body: bytes | memoryview) -> bytes:
        # Incremental updates: a large body is hashed in place, never copied.
        h = (
            hashlib.blake2b(digest_size=_DIGEST_SIZE)
            if self._key is None
            else hmac.new(self._key, digestmod=hashlib.sha256)
        )
        h.update(prefix)
        h.update(body)
        return h.digest()

    def _frame(self, fmt: int, body: bytes) -> bytes:
        prefix = _MAGIC + bytes((self._algorithm, fmt))
        return b"".join((prefix, self._digest(prefix, body), body))

    def verify(self, data: bytes, *, tier: str = "", run_id: str = "") -> None:
        """Check a frame's digest (or HMAC) without decoding its payload.

        For tools that inspect stored copies (``hotstate runs show``): nothing
        is unpickled, so no user class is imported.

        Args:
            data: the stored frame.
            tier: named in the error.
            run_id: named in the error.

        Raises:
            CorruptSnapshotError: the frame is malformed, was altered, or was
                written with another key (or none).
        """
        self._verify(data, tier, run_id)

    def _verify(self, data: bytes, tier: str, run_id: str) -> tuple[int, memoryview]:
        """Check the frame and digest; returns (format, body). Never decodes the body."""
        if type(data) is bytes and len(data) >= _HEADER_SIZE:
            # Fast path for well-formed frames (recovery verifies 100,000 of them):
            # the same checks as below, without building closures or views first.
            fmt = data[_PREFIX_SIZE - 1]
            if data[_PREFIX_SIZE - 2] == self._algorithm and data.startswith(_MAGIC) and fmt in self._accepted_formats:
                body = memoryview(data)[_HEADER_SIZE:]
                expected = self._digest(data[:_PREFIX_SIZE], body)
                if hmac.compare_digest(expected, data[_PREFIX_SIZE:_HEADER_SIZE]):
                    return fmt, body
        return self._verify_slow(data, tier, run_id)

    def _verify_slow(self, data: bytes, tier: str, run_id: str) -> tuple[int, memoryview]:
        def corrupt(reason: str) -> CorruptSnapshotError:
            return CorruptSnapshotError(tier or "codec", run_id, None, reason)

        if not isinstance(data, bytes | bytearray | memoryview):
            raise corrupt(f"expected bytes, got {type(data).__qualname__}")
        view = memoryview(data)
        if len(view) < _HEADER_SIZE:
            raise corrupt(f"frame too short ({len(view)} bytes)")
        if bytes(view[: len(_MAGIC)]) != _MAGIC:
            raise corrupt("not a hotstate frame (bad magic)")
        algorithm, fmt = view[len(_MAGIC)], view[len(_MAGIC) + 1]
        if algorithm != self._algorithm:
            # A keyed codec must not accept unkeyed frames: anyone who can write
            # to the store could otherwise forge a plain digest.
            want = "HMAC (keyed)" if self.keyed else "plain digest (unkeyed)"
            raise corrupt(f"frame algorithm {algorithm} does not match this codec's {want}")
        if fmt not in self._accepted_formats:
            raise corrupt(f"frame format {fmt} is not accepted by this codec")
        body = view[_HEADER_SIZE:]
        expected = self._digest(bytes(view[:_PREFIX_SIZE]), body)
        if not hmac.compare_digest(expected, bytes(view[_PREFIX_SIZE:_HEADER_SIZE])):
            raise corrupt("digest mismatch: the bytes were altered or the key is wrong")
        return fmt, body


def _encode_error(value: object, exc: Exception) -> CodecError:
    return CodecError(
        "codec",
        f"cannot pickle a {type(value).__qualname__} payload: {type(exc).__name__}: {exc}",
    )


@final
class PickleCodec(_FramedCodec):
    """Pickle (protocol 5) with a cloudpickle fallback, framed with a digest or HMAC.

    What plain pickle cannot serialize (lambdas, local classes) is encoded with
    cloudpickle; the frame records which was used. Cloudpickle output is
    ordinary pickle data, so decoding needs no special path.

    Args:
        key: the HMAC secret. When None, ``HOTSTATE_SECRET_KEY`` is read from
            the environment; without either, frames carry a plain BLAKE2b
            digest (integrity against corruption, not against forgery).

    Raises:
        ConfigError: the key is empty.
    """

    __slots__ = ()

    name = "pickle"
    _accepted_formats = frozenset({_FMT_PICKLE, _FMT_CLOUDPICKLE})

    @override
    def encode(self, value: Any) -> bytes:
        try:
            return self._frame(_FMT_PICKLE, pickle.dumps(value, protocol=5))
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
        return self._frame(_FMT_CLOUDPICKLE, body)

    @override
    def decode(self, data: bytes, *, tier: str = "", run_id: str = "") -> Any:
        _, body = self._verify(data, tier, run_id)
        try:
            # The digest/HMAC was verified just above (docs/architecture.md "Persistence").
            return pickle.loads(body)  # noqa: S301
        except Exception as exc:
            raise CodecError(
                tier or "codec",
                f"run {run_id!r}: cannot unpickle a verified payload: {type(exc).__name__}: {exc}",
            ) from exc


@final
class JsonCodec(_FramedCodec):
    """JSON for plain-data payloads, framed with a digest or HMAC like ``PickleCodec``.

    Tuples come back as lists; only dicts with string keys, lists, strings,
    numbers, booleans and None round-trip exactly.

    Args:
        key: the HMAC secret; as for ``PickleCodec``.

    Raises:
        ConfigError: the key is empty.
    """

    __slots__ = ()

    name = "json"
    _accepted_formats = frozenset({_FMT_JSON})

    @override
    def encode(self, value: Any) -> bytes:
        try:
            text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=True)
        except (TypeError, ValueError) as exc:
            raise CodecError(
                "codec",
                f"cannot encode a {type(value).__qualname__} payload as JSON: {exc}",
            ) from exc
        return self._frame(_FMT_JSON, text.encode())

    @override
    def decode(self, data: bytes, *, tier: str = "", run_id: str = "") -> Any:
        _, body = self._verify(data, tier, run_id)
        try:
            return json.loads(bytes(body))
        except (ValueError, RecursionError) as exc:
            raise CodecError(tier or "codec", f"run {run_id!r}: verified body is not JSON: {exc}") from exc


def frame_format(data: bytes) -> str | None:
    """Name the body format of a frame (``"pickle"``, ``"cloudpickle"``, ``"json"``).

    Reads only the unverified header; for diagnostics, never for trust decisions.

    Args:
        data: framed bytes.

    Returns:
        The format name, or None when ``data`` is not a hotstate frame.
    """
    if len(data) < _HEADER_SIZE or data[: len(_MAGIC)] != _MAGIC:
        return None
    return _FORMAT_NAMES.get(data[len(_MAGIC) + 1])
