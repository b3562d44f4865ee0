"""Payload codecs: pickle (with a cloudpickle fallback) and JSON, each behind a digest or HMAC.

DESIGN.md, Codec and trust: every encoded payload carries a digest; with a
secret key it is an HMAC-SHA256. Bytes whose digest/MAC does not verify are
never unpickled. Frame: ``b"HS" | version | algorithm | format | 32-byte MAC | body``.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import os
import pickle
from typing import Any, Final, Protocol, final, runtime_checkable

import cloudpickle

from hotstate._errors import CodecError, CorruptSnapshotError

__all__ = ["SECRET_KEY_ENV", "Codec", "JsonCodec", "PickleCodec"]

SECRET_KEY_ENV: Final = "HOTSTATE_SECRET_KEY"
_MAGIC: Final = b"HS\x01"
_ALG_DIGEST: Final = 0
_ALG_HMAC: Final = 1
_FMT_PICKLE: Final = 0
_FMT_CLOUDPICKLE: Final = 1
_FMT_JSON: Final = 2
_HEAD: Final = len(_MAGIC) + 2
_MAC_LEN: Final = 32


@runtime_checkable
class Codec(Protocol):
    """Turns payloads into verified bytes and back."""

    name: str

    def encode(self, value: Any) -> bytes:
        """Encode ``value``; raises ``CodecError`` naming the offending type."""
        ...

    def decode(self, data: bytes, *, tier: str = "", run_id: str = "") -> Any:
        """Verify then decode; raises ``CorruptSnapshotError`` before touching unverified bytes."""
        ...


def _key(key: bytes | str | None) -> bytes | None:
    if key is None:
        env = os.environ.get(SECRET_KEY_ENV)
        key = env if env else None
    if isinstance(key, str):
        return key.encode()
    return key


class _Framed:
    """Digest/HMAC framing shared by the codecs."""

    name = "framed"

    def __init__(self, key: bytes | str | None = None) -> None:
        self._key = _key(key)
        self._alg = _ALG_HMAC if self._key is not None else _ALG_DIGEST

    @property
    def keyed(self) -> bool:
        """True when an HMAC key is configured."""
        return self._key is not None

    def _mac(self, signed: bytes) -> bytes:
        if self._key is not None:
            return hmac.new(self._key, signed, hashlib.sha256).digest()
        return hashlib.sha256(signed).digest()

    def _frame(self, fmt: int, body: bytes) -> bytes:
        head = _MAGIC + bytes((self._alg, fmt))
        return head + self._mac(head + body) + body

    def _verify(self, data: bytes, tier: str, run_id: str) -> tuple[int, bytes]:
        def corrupt(reason: str) -> CorruptSnapshotError:
            return CorruptSnapshotError(tier or "codec", run_id, None, reason)

        if not isinstance(data, bytes | bytearray | memoryview):
            raise corrupt(f"expected bytes, got {type(data).__name__}")
        data = bytes(data)
        if len(data) < _HEAD + _MAC_LEN or not data.startswith(_MAGIC):
            raise corrupt("not a hotstate frame (bad magic or truncated)")
        alg, fmt = data[len(_MAGIC)], data[len(_MAGIC) + 1]
        if alg != self._alg:
            want = "an HMAC (a key is configured)" if self._key is not None else "a plain digest"
            raise corrupt(f"frame algorithm {alg} does not match: expected {want}")
        mac = data[_HEAD : _HEAD + _MAC_LEN]
        body = data[_HEAD + _MAC_LEN :]
        if not hmac.compare_digest(mac, self._mac(data[:_HEAD] + body)):
            raise corrupt("digest/MAC mismatch (tampered, corrupted or written with another key)")
        return fmt, body


@final
class PickleCodec(_Framed):
    """Pickle protocol 5, falling back to cloudpickle only for what pickle cannot serialise.

    cloudpickle is several times slower than pickle on plain data, so it is used
    only when pickle fails (lambdas, local classes). The key comes from the
    ``key`` argument or the ``HOTSTATE_SECRET_KEY`` environment variable.

    Args:
        key: the HMAC key; None reads the environment (no key: a plain SHA-256 digest).
    """

    name = "pickle"

    def encode(self, value: Any) -> bytes:
        """Encode ``value``.

        Raises:
            CodecError: neither pickle nor cloudpickle can serialise it; names the type.
        """
        try:
            return self._frame(_FMT_PICKLE, pickle.dumps(value, protocol=5))
        except (pickle.PicklingError, TypeError, AttributeError):
            pass
        try:
            return self._frame(_FMT_CLOUDPICKLE, cloudpickle.dumps(value, protocol=5))
        except Exception as exc:  # noqa: BLE001 - cloudpickle raises many types; all mean "cannot encode"
            raise CodecError("codec", f"cannot pickle a {_offender(value, exc)}: {exc}") from exc

    def decode(self, data: bytes, *, tier: str = "", run_id: str = "") -> Any:
        """Verify the frame, then unpickle.

        Raises:
            CorruptSnapshotError: the frame does not verify (nothing was unpickled).
            CodecError: verified bytes that still fail to unpickle.
        """
        fmt, body = self._verify(data, tier, run_id)
        if fmt not in (_FMT_PICKLE, _FMT_CLOUDPICKLE):
            raise CorruptSnapshotError(tier or "codec", run_id, None, f"frame format {fmt} is not pickle")
        try:
            # The only place hotstate unpickles: the digest/HMAC was verified above.
            return pickle.loads(body)  # noqa: S301
        except Exception as exc:  # noqa: BLE001 - any unpickling failure is a codec error
            raise CodecError(tier or "codec", f"run {run_id!r}: verified bytes failed to unpickle: {exc}") from exc


@final
class JsonCodec(_Framed):
    """JSON for plain-data payloads (dict, list, str, int, float, bool, None), with the same framing.

    Args:
        key: the HMAC key; None reads the environment.
    """

    name = "json"

    def encode(self, value: Any) -> bytes:
        """Encode ``value`` as JSON.

        Raises:
            CodecError: the value is not plain data; names the type.
        """
        try:
            body = json.dumps(value, separators=(",", ":"), allow_nan=False).encode()
        except (TypeError, ValueError) as exc:
            raise CodecError("codec", f"cannot encode as JSON: {exc}") from exc
        return self._frame(_FMT_JSON, body)

    def decode(self, data: bytes, *, tier: str = "", run_id: str = "") -> Any:
        """Verify the frame, then parse JSON.

        Raises:
            CorruptSnapshotError: the frame does not verify.
            CodecError: verified bytes that are not valid JSON.
        """
        fmt, body = self._verify(data, tier, run_id)
        if fmt != _FMT_JSON:
            raise CorruptSnapshotError(tier or "codec", run_id, None, f"frame format {fmt} is not JSON")
        try:
            value = json.loads(body)
        except ValueError as exc:
            raise CodecError(tier or "codec", f"run {run_id!r}: invalid JSON: {exc}") from exc
        if isinstance(value, dict) and isinstance(value.get("signals"), list):
            value["signals"] = [tuple(s) if isinstance(s, list) else s for s in value["signals"]]
        return value


def _offender(value: Any, exc: BaseException) -> str:
    """Name the innermost object pickle choked on, when it can be found."""
    seen: list[Any] = [value]
    while seen:
        item = seen.pop()
        try:
            pickle.dumps(item, protocol=5)
            continue
        except Exception:  # noqa: BLE001, S110 - probing only
            pass
        children: list[Any] = []
        if isinstance(item, dict):
            children = list(item.values())
        elif isinstance(item, list | tuple | set | frozenset):
            children = list(item)
        bad = []
        for child in children:
            try:
                cloudpickle.dump(child, io.BytesIO(), protocol=5)
            except Exception:  # noqa: BLE001 - probing only
                bad.append(child)
        if not bad:
            return f"{type(item).__module__}.{type(item).__qualname__}"
        seen.extend(bad[:1])
    return type(exc).__name__
