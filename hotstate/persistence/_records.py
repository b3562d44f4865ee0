"""Stored forms of snapshots, transitions and dead letters (plain data + one encoded body).

Header fields are plain columns / hash fields, so listing and filtering never
decode a payload; only ``body`` (payload + pending signals) goes through the codec.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from hotstate._errors import CodecError, CorruptSnapshotError
from hotstate.actors import ErrorInfo, Snapshot, Status, Transition, TransitionKind

if TYPE_CHECKING:
    from hotstate.persistence._codec import Codec

__all__ = [
    "RunHeader",
    "SaveResult",
    "StoredDeadLetter",
    "StoredSnapshot",
    "decode_snapshot",
    "encode_snapshot",
    "error_from_json",
    "error_to_json",
    "transition_from_row",
    "transition_to_row",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class RunHeader:
    """The plain-data header of a stored snapshot (never needs the codec)."""

    run_id: str
    workflow: str
    workflow_version: int
    version: int
    step: int
    status: str
    updated_at: float
    attempt: int


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredSnapshot:
    """A snapshot as stored: header, error as JSON text, and the encoded body."""

    header: RunHeader
    error: str | None
    body: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredDeadLetter:
    """A dead-letter record as stored (errors as JSON text)."""

    run_id: str
    workflow: str
    at: float
    error: str
    attempts: str
    compensation_errors: str
    snapshot: StoredSnapshot


@dataclass(frozen=True, slots=True, kw_only=True)
class SaveResult:
    """What one ``Store.save`` did.

    Attributes:
        written: snapshots written.
        stale: snapshots skipped because the stored version was >= theirs.
        transitions: transitions newly stored (duplicates are ignored).
    """

    written: int
    stale: int
    transitions: int


def error_to_json(error: ErrorInfo) -> str:
    """Serialise an ``ErrorInfo`` as JSON text."""
    return json.dumps(asdict(error), separators=(",", ":"))


def error_from_json(text: str) -> ErrorInfo:
    """Parse an ``ErrorInfo`` from JSON text.

    Raises:
        CodecError: the text is not a valid error record.
    """
    try:
        data = json.loads(text)
        return ErrorInfo(**data)
    except (ValueError, TypeError) as exc:
        raise CodecError("codec", f"invalid error record: {exc}") from exc


def encode_snapshot(snapshot: Snapshot, codec: Codec) -> StoredSnapshot:
    """Encode a snapshot for storage (the body once; the header as plain fields).

    Raises:
        CodecError: the payload or signals cannot be encoded; names the run and type.
    """
    try:
        body = codec.encode({"payload": snapshot.payload, "signals": snapshot.signals})
    except CodecError as exc:
        raise CodecError(exc.tier, f"run {snapshot.run_id!r}: {exc.detail}") from exc
    header = RunHeader(
        run_id=snapshot.run_id,
        workflow=snapshot.workflow,
        workflow_version=snapshot.workflow_version,
        version=snapshot.version,
        step=snapshot.step,
        status=snapshot.status.value,
        updated_at=snapshot.updated_at,
        attempt=snapshot.attempt,
    )
    error = None if snapshot.error is None else error_to_json(snapshot.error)
    return StoredSnapshot(header=header, error=error, body=body)


def decode_snapshot(stored: StoredSnapshot, codec: Codec, *, tier: str) -> Snapshot:
    """Verify and decode a stored snapshot.

    Raises:
        CorruptSnapshotError: the body's digest/MAC does not verify, or the header is invalid.
        CodecError: the verified body cannot be decoded.
    """
    h = stored.header
    body = codec.decode(stored.body, tier=tier, run_id=h.run_id)
    try:
        status = Status(h.status)
        payload = body["payload"]
        signals = tuple((str(name), data) for name, data in body["signals"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptSnapshotError(tier, h.run_id, h.version, f"invalid stored snapshot: {exc}") from exc
    error = None if stored.error is None else error_from_json(stored.error)
    return Snapshot(h.run_id, h.workflow, h.workflow_version, h.version, h.step, status, payload,
                    error, h.updated_at, h.attempt, signals)


def transition_to_row(t: Transition) -> tuple[str, int, str, int, str, float, str | None]:
    """A transition as a plain row."""
    return (t.run_id, t.version, t.kind.value, t.step, t.status.value, t.at, t.detail)


def transition_from_row(row: Any) -> Transition:
    """A transition from a plain row ``(run_id, version, kind, step, status, at, detail)``."""
    run_id, version, kind, step, status, at, detail = row
    return Transition(str(run_id), int(version), TransitionKind(kind), int(step), Status(status), float(at), detail)
