"""Stored records: what a Store keeps for a Snapshot, a Transition and a dead letter.

The "Store" box of the map in docs/architecture.md holds these, never hotstate's own
classes pickled (STYLE.md D.14): header fields are plain columns / hash fields so
listing never unpickles, errors and transitions are JSON, and only the user's
payload (with the run's pending signals) goes through the ``Codec``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, NamedTuple

import msgspec

from hotstate._errors import CodecError, CorruptSnapshotError
from hotstate.actors._snapshot import (
    DeadLetter,
    ErrorInfo,
    Signals,
    Snapshot,
    Status,
    Transition,
    TransitionKind,
    new_tuple as _new,
)

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from hotstate.persistence._codec import Codec

__all__ = [
    "BadRow",
    "RunHeader",
    "SaveResult",
    "StoredDeadLetter",
    "StoredSnapshot",
    "dead_letter_context",
    "decode_dead_letter",
    "decode_snapshot",
    "encode_dead_letter",
    "encode_snapshot",
    "error_from_json",
    "error_to_json",
    "errors_from_json",
    "errors_to_json",
    "header_of",
    "snapshot_context",
    "transition_from_json",
    "transition_from_row",
    "transition_to_json",
    "verifies",
    "verify_dead_letter",
    "verify_snapshot",
]


class RunHeader(NamedTuple):
    """The plain-data header of a stored snapshot: what listing and filtering read.

    A NamedTuple, like ``Snapshot`` (STYLE.md D.14): a flush builds one per dirty
    run, and the frozen dataclass cost 3.3 us each, more than pickling the
    payload (measured on the flush benchmark: encode 4.4 us -> 1.3 us per snapshot).

    Attributes:
        run_id: the run's id.
        workflow: the workflow's name.
        workflow_version: the workflow definition's version.
        version: the snapshot version (the version guard compares this).
        step: the step cursor.
        status: the status as stored (a ``Status`` value).
        updated_at: wall-clock time of this version.
        attempt: the attempt number at the cursor.
        epoch: the ownership epoch of the run's shard when this copy was
            written (0: written without ownership). Stores order copies by
            ``(epoch, version)``: a copy of a newer owner replaces an older
            owner's copy whatever their versions (DESIGN.md "Several processes").
    """

    run_id: str
    workflow: str
    workflow_version: int
    version: int
    step: int
    status: str
    updated_at: float
    attempt: int
    epoch: int = 0


class StoredSnapshot(NamedTuple):
    """A snapshot as a store keeps it (a NamedTuple for the same reason as ``RunHeader``).

    Attributes:
        header: the plain-data header.
        error: JSON text of the ``ErrorInfo`` fields, or None.
        body: codec output (digest-framed) of ``{"payload": ..., "signals": ...}``.
    """

    header: RunHeader
    error: str | None
    body: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredDeadLetter:
    """A dead-letter record as a store keeps it.

    Attributes:
        run_id: the run's id.
        workflow: the workflow's name.
        at: wall-clock time the run was dead-lettered.
        error: JSON of the final ``ErrorInfo``.
        attempts: JSON list of the ``ErrorInfo`` of every failed attempt.
        compensation_errors: JSON list of ``ErrorInfo`` raised by compensations.
        snapshot: the final snapshot.
    """

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
        written: snapshots actually written.
        stale: snapshots skipped because the stored version was >= theirs
            (``written + stale`` is the batch's length).
        transitions: transitions newly stored (a repeated (run_id, version) is ignored).
        reset: this writer's mark in the store was gone or lower than it wrote:
            writes it made are gone (the store restarted empty, or from an older
            snapshot or backup); reported once per loss.
        conflicts: run id -> the version the store holds, for each run of the
            batch whose snapshot was skipped because the store holds a strictly
            higher version: a write the store did not take, which is not durable.
            A run saved at a version equal to the stored one is stale but not a
            conflict (a retried batch the store had already taken), and a run
            that appears more than once is a conflict only when its highest
            version in the batch was skipped. Empty when every snapshot was
            written or was equal.
        rejected: run id -> why, for each run of the batch the store could not
            write at all (text that does not encode, a version or other
            number past 64 bits, a stored key of the wrong type): nothing of
            that run's snapshot was written, every other run of the batch was
            (transitions of it written by an earlier call of a long batch may
            stay; ``Store.save``). Such a snapshot counts as neither
            ``written`` nor ``stale``.
        fenced: shard -> the epoch of the store's fence, for each shard of a
            fenced save (``Store.save(fence=...)``) whose fence is newer than
            the writer's epoch (or the same epoch held by another owner):
            nothing of that shard's runs was written (neither ``written`` nor
            ``stale``), and the writer has lost the shard.
    """

    written: int
    stale: int
    transitions: int
    reset: bool = False
    conflicts: Mapping[str, int] = field(default_factory=dict)
    rejected: Mapping[str, str] = field(default_factory=dict)
    fenced: Mapping[int, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class BadRow:
    """A stored row a read skipped because it is malformed (``Store.scan_snapshots``, ``Store.load_many``).

    Something other than hotstate wrote it, or changed it: a header field of
    the wrong type or out of range, text that is not UTF-8, a missing field,
    a key of the wrong type. The row is left in the store for an operator.

    Attributes:
        run_id: the run id the row is stored under (rendered with
            ``repr`` when the stored id itself is not text).
        reason: what is wrong with it, naming the field and the value.
    """

    run_id: str
    reason: str


_ERROR_FIELDS = tuple(f.name for f in dataclasses.fields(ErrorInfo))


def _error_dict(error: ErrorInfo) -> dict[str, Any]:
    return {name: getattr(error, name) for name in _ERROR_FIELDS}


def error_to_json(error: ErrorInfo) -> str:
    """Serialize an ``ErrorInfo`` as JSON text (plain data, never pickled).

    Args:
        error: the record.

    Returns:
        JSON text of its fields.
    """
    return json.dumps(_error_dict(error), separators=(",", ":"))


def _error_from_dict(data: object, tier: str) -> ErrorInfo:
    if not isinstance(data, dict):
        raise CodecError(tier, f"stored error is not an object: {type(data).__name__}")
    try:
        return ErrorInfo(
            type=str(data["type"]),
            message=str(data["message"]),
            traceback=str(data["traceback"]),
            step=int(data["step"]),
            step_name=str(data["step_name"]),
            attempt=int(data["attempt"]),
            at=float(data["at"]),
        )
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise CodecError(tier, f"stored error is malformed: {exc!r}") from exc


def _loads(text: str | bytes, tier: str, what: str) -> object:
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise CodecError(tier, f"stored {what} is not JSON: {exc}") from exc


def error_from_json(text: str, *, tier: str = "codec") -> ErrorInfo:
    """Rebuild an ``ErrorInfo`` from ``error_to_json`` output.

    Args:
        text: the JSON text.
        tier: the tier it came from (for error messages).

    Returns:
        The record.

    Raises:
        CodecError: the text is not a valid error record.
    """
    return _error_from_dict(_loads(text, tier, "error"), tier)


def errors_to_json(errors: list[ErrorInfo] | tuple[ErrorInfo, ...]) -> str:
    """Serialize a list of ``ErrorInfo`` (dead-letter attempts) as a JSON array.

    Args:
        errors: the records.

    Returns:
        JSON text.
    """
    return json.dumps([_error_dict(e) for e in errors], separators=(",", ":"))


def errors_from_json(text: str, *, tier: str = "codec") -> list[ErrorInfo]:
    """Rebuild a list of ``ErrorInfo`` from ``errors_to_json`` output.

    Args:
        text: the JSON text.
        tier: the tier it came from (for error messages).

    Returns:
        The records.

    Raises:
        CodecError: the text is not a JSON array of error records.
    """
    data = _loads(text, tier, "error list")
    if not isinstance(data, list):
        raise CodecError(tier, f"stored error list is not an array: {type(data).__name__}")
    return [_error_from_dict(item, tier) for item in data]


def transition_to_json(transition: Transition) -> str:
    """Serialize a ``Transition`` as a compact JSON array (plain data, never pickled).

    Args:
        transition: the record.

    Returns:
        JSON text ``[run_id, version, kind, step, status, at, detail]``.
    """
    t = transition
    return json.dumps(
        [t.run_id, t.version, str(t.kind), t.step, str(t.status), t.at, t.detail],
        separators=(",", ":"),
    )


def transition_from_row(row: Sequence[Any], *, tier: str = "codec") -> Transition:
    """Rebuild a ``Transition`` from its plain fields.

    Args:
        row: ``(run_id, version, kind, step, status, at, detail)``.
        tier: the tier it came from (for error messages).

    Returns:
        The record.

    Raises:
        CodecError: the fields are malformed (e.g. an unknown kind or status).
    """
    try:
        run_id, version, kind, step, status, at, detail = row
        return Transition(
            run_id=str(run_id),
            version=int(version),
            kind=TransitionKind(kind),
            step=int(step),
            status=Status(status),
            at=float(at),
            detail=None if detail is None else str(detail),
        )
    except (TypeError, ValueError, OverflowError) as exc:
        raise CodecError(tier, f"stored transition is malformed: {exc!r}") from exc


def transition_from_json(text: str | bytes, *, tier: str = "codec") -> Transition:
    """Rebuild a ``Transition`` from ``transition_to_json`` output.

    Args:
        text: the JSON text.
        tier: the tier it came from (for error messages).

    Returns:
        The record.

    Raises:
        CodecError: the text is not a valid transition.
    """
    data = _loads(text, tier, "transition")
    if not isinstance(data, list):
        raise CodecError(tier, f"stored transition is not an array: {type(data).__name__}")
    return transition_from_row(data, tier=tier)


_STATUS_BY_VALUE: dict[str, Status] = {s.value: s for s in Status}


def header_of(snapshot: Snapshot, epoch: int = 0) -> RunHeader:
    """Build the stored header of a snapshot.

    Args:
        snapshot: the snapshot.
        epoch: the ownership epoch of its shard (0: no ownership).

    Returns:
        Its header.
    """
    s = snapshot
    return _new(
        RunHeader,
        (s.run_id, s.workflow, s.workflow_version, s.version, s.step, s.status.value, s.updated_at, s.attempt, epoch),
    )


_CONTEXT_ENCODER: Final = msgspec.msgpack.Encoder()
_RUN_CONTEXT: Final = "run/1"
_OWNED_RUN_CONTEXT: Final = "run/2"  # run/1 and the ownership epoch
_DEAD_CONTEXT: Final = "dead-letter/1"


def _header_fields(h: RunHeader, error: str | None) -> tuple[Any, ...]:
    # Values as stored; only the time is normalized (a store may hand back 5 for 5.0).
    return (
        h.run_id,
        h.workflow,
        h.workflow_version,
        h.version,
        h.step,
        h.status,
        float(h.updated_at),
        h.attempt,
        error,
    )


_UNCHECKABLE: Final = (TypeError, ValueError, OverflowError)  # UnicodeEncodeError is a ValueError


def _uncheckable(exc: Exception, tier: str, run_id: object, version: object) -> CorruptSnapshotError:
    """A header nobody made with this release (a field out of range or of another type): no frame can match it."""
    return CorruptSnapshotError(
        tier,
        run_id if isinstance(run_id, str) else repr(run_id),
        version if type(version) is int else None,
        f"stored header cannot be checked: {type(exc).__name__}: {exc}",
    )


def snapshot_context(header: RunHeader, error: str | None, *, tier: str = "codec") -> bytes:
    """The bytes a snapshot's frame authenticates besides its body: the whole stored header and error.

    Run id, workflow and definition version, version, step cursor, status,
    update time, attempt and the error's JSON: every field a store keeps in
    columns or hash fields. A stored header changed after the frame was made
    no longer verifies. A copy written under ownership (``epoch`` above 0)
    is tagged ``run/2`` and covers its epoch too: a copy whose stored epoch
    was raised to win the ``(epoch, version)`` order does not verify.

    Raises:
        CorruptSnapshotError: a field cannot be encoded (e.g. an integer out of range): the copy cannot be trusted.
    """
    try:
        epoch = header.epoch
        if epoch == 0:
            return _CONTEXT_ENCODER.encode((_RUN_CONTEXT, *_header_fields(header, error)))
        return _CONTEXT_ENCODER.encode((_OWNED_RUN_CONTEXT, *_header_fields(header, error), epoch))
    except _UNCHECKABLE as exc:
        raise _uncheckable(exc, tier, header.run_id, header.version) from exc


def dead_letter_context(record: StoredDeadLetter, *, tier: str = "codec") -> bytes:
    """The context of a dead letter's snapshot frame: its snapshot's header and every field of the record.

    Raises:
        CorruptSnapshotError: a field cannot be encoded.
    """
    snap = record.snapshot
    try:
        return _CONTEXT_ENCODER.encode(
            (
                _DEAD_CONTEXT,
                *_header_fields(snap.header, snap.error),
                record.run_id,
                record.workflow,
                float(record.at),
                record.error,
                record.attempts,
                record.compensation_errors,
                # An ownership epoch joins only when set: letters written before it still verify.
                *(() if snap.header.epoch == 0 else (snap.header.epoch,)),
            )
        )
    except _UNCHECKABLE as exc:
        raise _uncheckable(exc, tier, record.run_id, snap.header.version) from exc


def _body(snapshot: Snapshot) -> dict[str, Any]:
    signals = snapshot.signals
    body = {"payload": snapshot.payload, "signals": [[name, data] for name, data in signals]}
    if type(signals) is Signals:
        dedupe = signals.dedupe
        if dedupe:
            body["dedupe"] = list(dedupe)  # ``send``'s dedupe keys outlive a restart with the run
    return body


def encode_snapshot(snapshot: Snapshot, codec: Codec, epoch: int = 0) -> StoredSnapshot:
    """Encode a snapshot once, for every tier (docs/architecture.md "Persistence").

    The frame's check covers the body and the whole header (``snapshot_context``).

    Args:
        snapshot: the snapshot.
        codec: encodes the payload and pending signals.
        epoch: the ownership epoch of the run's shard (0: no ownership).

    Returns:
        The stored form.

    Raises:
        CodecError: the payload or a signal's data cannot be encoded.
    """
    header = header_of(snapshot, epoch)
    error = None if snapshot.error is None else error_to_json(snapshot.error)
    body = codec.encode(_body(snapshot), context=snapshot_context(header, error))
    return _new(StoredSnapshot, (header, error, body))


def encode_dead_letter(letter: DeadLetter, codec: Codec) -> StoredDeadLetter:
    """The stored form of a dead letter; an unencodable payload is written as its header only.

    The frame of its snapshot covers that snapshot's header and every field of
    the record (``dead_letter_context``): a record changed or planted without
    the key does not verify.

    Args:
        letter: the dead letter.
        codec: the codec.

    Returns:
        The stored record.
    """
    snap = letter.snapshot
    error = None if snap.error is None else error_to_json(snap.error)
    record = StoredDeadLetter(
        run_id=letter.run_id,
        workflow=letter.workflow,
        at=letter.at,
        error=error_to_json(letter.error),
        attempts=errors_to_json(letter.attempts),
        compensation_errors=errors_to_json(letter.compensation_errors),
        snapshot=_new(StoredSnapshot, (header_of(snap), error, b"")),
    )
    context = dead_letter_context(record)
    try:
        body = codec.encode(_body(snap), context=context)
    except CodecError:
        body = codec.encode({"payload": None, "signals": []}, context=context)
    return dataclasses.replace(record, snapshot=_new(StoredSnapshot, (record.snapshot.header, error, body)))


def decode_dead_letter(record: StoredDeadLetter, codec: Codec, *, tier: str) -> DeadLetter:
    """Verify and decode a stored dead letter (its fields are checked with its snapshot's frame).

    Raises:
        CorruptSnapshotError: the record or its snapshot does not verify; nothing was decoded.
        CodecError: a verified field is malformed.
    """
    snap = decode_snapshot(record.snapshot, codec, tier=tier, context=dead_letter_context(record, tier=tier))
    if record.run_id != snap.run_id:
        raise CorruptSnapshotError(tier, record.run_id, snap.version, f"dead letter holds run {snap.run_id!r}")
    return DeadLetter(
        run_id=record.run_id,
        workflow=record.workflow,
        snapshot=snap,
        error=error_from_json(record.error, tier=tier),
        attempts=tuple(errors_from_json(record.attempts, tier=tier)),
        compensation_errors=tuple(errors_from_json(record.compensation_errors, tier=tier)),
        at=record.at,
    )


def verify_snapshot(stored: StoredSnapshot, codec: Codec, *, tier: str, context: bytes | None = None) -> None:
    """Check a stored snapshot (header, error and body) without decoding its body.

    Args:
        stored: the stored form.
        codec: the codec it was encoded with (same key).
        tier: the tier it came from (for error messages).
        context: the context to check instead (a dead letter's).

    Raises:
        CorruptSnapshotError: it does not verify.
    """
    h = stored.header
    if context is None:
        context = snapshot_context(h, stored.error, tier=tier)
    try:
        codec.verify(stored.body, context=context, tier=tier, run_id=h.run_id)
    except CorruptSnapshotError as exc:
        raise _named(exc, tier, h) from None


def verifies(stored: StoredSnapshot, codec: Codec, *, tier: str) -> bool:
    """Whether a stored snapshot's whole envelope verifies (``verify_snapshot`` as a test; nothing decoded)."""
    try:
        verify_snapshot(stored, codec, tier=tier)
    except (CorruptSnapshotError, CodecError):
        return False
    return True


def verify_dead_letter(record: StoredDeadLetter, codec: Codec, *, tier: str) -> None:
    """Check a stored dead letter (its fields and its snapshot) without decoding the body.

    Raises:
        CorruptSnapshotError: it does not verify.
    """
    verify_snapshot(record.snapshot, codec, tier=tier, context=dead_letter_context(record, tier=tier))


def _named(exc: CorruptSnapshotError, tier: str, h: RunHeader) -> CorruptSnapshotError:
    if exc.version is not None:
        return exc
    reason = str(exc).removeprefix(f"[{exc.tier}] run {exc.run_id!r} v{exc.version}: ")
    return CorruptSnapshotError(tier, h.run_id, h.version, reason)


def decode_snapshot(stored: StoredSnapshot, codec: Codec, *, tier: str, context: bytes | None = None) -> Snapshot:
    """Verify and decode a stored snapshot.

    The frame is checked against the stored header and error
    (``snapshot_context``) before anything is decoded.

    Args:
        stored: the stored form.
        codec: the codec it was encoded with (same key).
        tier: the tier it came from (for error messages).
        context: the context to check instead (a dead letter's).

    Returns:
        The snapshot.

    Raises:
        CorruptSnapshotError: the body does not verify; it was never unpickled.
        CodecError: the verified body, the error or the status is malformed.
    """
    h = stored.header
    if context is None:
        context = snapshot_context(h, stored.error, tier=tier)
    try:
        body = codec.decode(stored.body, context=context, tier=tier, run_id=h.run_id)
    except CorruptSnapshotError as exc:
        raise _named(exc, tier, h) from None
    if not isinstance(body, dict) or "payload" not in body:
        raise CodecError(tier, f"run {h.run_id!r} v{h.version}: body is not a snapshot body")
    # Recovery decodes every unfinished run: a dict lookup instead of Status()
    # and positional construction keep this under ~3 us per snapshot.
    try:
        status = _STATUS_BY_VALUE.get(h.status)
        if status is None:
            status = Status(h.status)
        raw = body.get("signals")
        signals: tuple[tuple[str, Any], ...] | Signals = ()
        keys = body.get("dedupe")
        if keys and (not isinstance(keys, list) or not all(type(k) is str for k in keys)):
            raise TypeError(f"dedupe keys are not a list of str: {keys!r}"[:200])
        if raw or keys:
            # A Signals, not a tuple: counting pending signals of a name stays O(1)
            # however many a stored copy holds (a tuple was scanned on every send).
            signals = Signals(((str(name), data) for name, data in raw or ()), dedupe=keys or ())
    except (TypeError, ValueError) as exc:
        raise CodecError(tier, f"run {h.run_id!r} v{h.version}: {exc}") from exc
    error = None if stored.error is None else error_from_json(stored.error, tier=tier)
    return _new(
        Snapshot,
        (
            h.run_id,
            h.workflow,
            h.workflow_version,
            h.version,
            h.step,
            status,
            body["payload"],
            error,
            h.updated_at,
            h.attempt,
            signals,
        ),
    )
