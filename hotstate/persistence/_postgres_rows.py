r"""The SQL and the rows of the PostgreSQL tier (``PostgresStore``, in ``_postgres.py``).

What holds no connection: the statements (the schema, the save's one
statement, the fences, the kept versions and dead letters), the escaping of
the text PostgreSQL cannot hold (U+0000 and U+0001, ``\x01`` as the escape),
the column arrays a batch is sent as and the snapshots read back from rows,
and the runs PostgreSQL would refuse for their own values (``_rejects``).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Final

import asyncpg

from hotstate._errors import CodecError, HotstateInternalError
from hotstate.persistence._records import RunHeader, StoredSnapshot
from hotstate.persistence._shards import shard_of
from hotstate.persistence._store import (
    CALL_BYTES,
    REPLACED_COLUMNS,
    TRANSACTION_TRANSITIONS,
    stored_problem,
    unwritable,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

    from hotstate.actors._snapshot import Transition

__all__ = ["INDEXED_BYTES", "RUN_TYPES", "TRANSITION_TYPES"]

# The columns hs_runs and hs_versions share: RunHeader's fields, the
# snapshot's error and body, then the shard.
_SNAPSHOT_COLUMNS: Final = """
    workflow text COLLATE "C" NOT NULL,
    workflow_version bigint NOT NULL,
    version bigint NOT NULL,
    step bigint NOT NULL,
    status text COLLATE "C" NOT NULL,
    updated_at float8 NOT NULL CHECK (updated_at <> 'NaN'),
    attempt bigint NOT NULL,
    epoch bigint NOT NULL,
    error text,
    body bytea NOT NULL,
    shard integer NOT NULL"""

_SCHEMA: Final = f"""
CREATE TABLE IF NOT EXISTS {{s}}.hs_meta (key text PRIMARY KEY, value text NOT NULL);
CREATE TABLE IF NOT EXISTS {{s}}.hs_runs (
    run_id text COLLATE "C" PRIMARY KEY,{_SNAPSHOT_COLUMNS}
);
CREATE INDEX IF NOT EXISTS hs_runs_status ON {{s}}.hs_runs (status, run_id);
CREATE INDEX IF NOT EXISTS hs_runs_workflow ON {{s}}.hs_runs (workflow, run_id);
CREATE INDEX IF NOT EXISTS hs_runs_shard ON {{s}}.hs_runs (shard, run_id);
CREATE TABLE IF NOT EXISTS {{s}}.hs_transitions (
    run_id text COLLATE "C" NOT NULL,
    version bigint NOT NULL,
    kind text NOT NULL,
    step bigint NOT NULL,
    status text NOT NULL,
    at float8 NOT NULL CHECK (at <> 'NaN' AND at <> 'Infinity' AND at <> '-Infinity'),
    detail text,
    PRIMARY KEY (run_id, version)
);
CREATE TABLE IF NOT EXISTS {{s}}.hs_versions (
    run_id text COLLATE "C" NOT NULL,{_SNAPSHOT_COLUMNS},
    PRIMARY KEY (run_id, version)
);
CREATE TABLE IF NOT EXISTS {{s}}.hs_dead_letters (
    run_id text COLLATE "C" PRIMARY KEY,
    workflow text NOT NULL,
    at float8 NOT NULL CHECK (at <> 'NaN'),
    error text NOT NULL,
    attempts text NOT NULL,
    compensation_errors text NOT NULL,
    workflow_version bigint NOT NULL,
    version bigint NOT NULL,
    step bigint NOT NULL,
    status text NOT NULL,
    updated_at float8 NOT NULL CHECK (updated_at <> 'NaN'),
    attempt bigint NOT NULL,
    snapshot_error text,
    body bytea NOT NULL,
    shard integer NOT NULL
);
CREATE TABLE IF NOT EXISTS {{s}}.hs_writer_marks (
    writer text PRIMARY KEY, high bigint NOT NULL, lost bigint NOT NULL, at float8 NOT NULL
);
CREATE TABLE IF NOT EXISTS {{s}}.hs_store_fence (shard integer PRIMARY KEY, epoch bigint NOT NULL, owner text NOT NULL);
"""

_RUN_COLUMNS: Final = (
    "run_id, workflow, workflow_version, version, step, status, updated_at, attempt, epoch, error, body"
)
_HEADER_COLUMNS: Final = "run_id, workflow, workflow_version, version, step, status, updated_at, attempt, epoch"
_SNAPSHOT_ARRAYS: Final = (
    "$1::text[], $2::text[], $3::int8[], $4::int8[], $5::int8[], $6::text[], $7::float8[], $8::int8[], $9::int8[],"
    " $10::text[], $11::bytea[], $12::int4[]"
)

# Copies are ordered by (epoch, version): the WHERE makes a lower or equal pair
# a no-op, so the rows returned are exactly the rows written. A run's shard
# never changes (the count is fixed per schema).
_UPSERT_RUNS: Final = f"""
INSERT INTO {{s}}.hs_runs AS r ({_RUN_COLUMNS}, shard)
SELECT * FROM unnest({{a}})
ON CONFLICT (run_id) DO UPDATE SET version = excluded.version, {REPLACED_COLUMNS}
WHERE (excluded.epoch, excluded.version) > (r.epoch, r.version)
RETURNING 1
"""

_INSERT_TRANSITIONS: Final = """
INSERT INTO {s}.hs_transitions (run_id, version, kind, step, status, at, detail)
SELECT * FROM unnest({a})
ON CONFLICT DO NOTHING
RETURNING 1
"""

# The mark rule of advance_mark (_store.py) in SQL: no row reads as (0, 0).
_ADVANCE_MARK: Final = """
INSERT INTO {s}.hs_writer_marks AS m (writer, high, lost, at)
VALUES ($1::text, $2::int8, CASE WHEN $3::int8 > 0 THEN $2::int8 ELSE 0 END, $4::float8)
ON CONFLICT (writer) DO UPDATE SET
    high = greatest(m.high, excluded.high),
    lost = CASE WHEN m.high < $3::int8 THEN excluded.high ELSE m.lost END,
    at = excluded.at
RETURNING lost
"""


def _numbered(template: str, first: int, types: Sequence[str]) -> str:
    return template.replace("{a}", ", ".join(f"${first + i}::{t}[]" for i, t in enumerate(types)))


# The PostgreSQL types of the snapshot columns (RunHeader's fields, error, body, shard) and of a
# transition's fields, in order: the arrays a flush sends (the bench's raw ceilings use them too).
RUN_TYPES: Final = ("text", "text", "int8", "int8", "int8", "text", "float8", "int8", "int8", "text", "bytea", "int4")
TRANSITION_TYPES: Final = ("text", "int8", "text", "int8", "text", "float8", "text")

# One statement a save: the mark ($1-$4), the snapshots ($5-$16), the
# transitions ($17-$23). Data-modifying CTEs all run to completion.
_SAVE: Final = (
    "WITH mark AS ("
    + _ADVANCE_MARK
    + "), runs AS ("
    + _numbered(_UPSERT_RUNS, 5, RUN_TYPES)
    + "), trans AS ("
    + _numbered(_INSERT_TRANSITIONS, 17, TRANSITION_TYPES)
    + ") SELECT (SELECT lost FROM mark), (SELECT count(*) FROM runs), (SELECT count(*) FROM trans)"
)
_SAVE_TRANSITIONS: Final = (
    "WITH trans AS (" + _numbered(_INSERT_TRANSITIONS, 1, TRANSITION_TYPES) + ") SELECT count(*) FROM trans"
)

# The runs of a saved batch whose (epoch, version) is below the stored one
# (SaveResult.conflicts), read in the save's transaction when some were stale.
_CONFLICTS: Final = """
SELECT r.run_id, r.version FROM {s}.hs_runs r
JOIN unnest($1::text[], $2::int8[], $3::int8[]) AS b(run_id, epoch, version) ON r.run_id = b.run_id
WHERE (r.epoch, r.version) > (b.epoch, b.version)
"""

_READ_FENCES: Final = (
    "SELECT shard, epoch, owner FROM {s}.hs_store_fence WHERE shard = ANY($1::int4[]) ORDER BY shard FOR {lock}"
)
_MAKE_FENCES: Final = """
INSERT INTO {s}.hs_store_fence (shard, epoch, owner) SELECT unnest($1::int4[]), 0, '' ON CONFLICT DO NOTHING
"""
# An upsert, not an UPDATE: a fence row deleted by hand is made again, never skipped.
_RAISE_FENCES: Final = """
INSERT INTO {s}.hs_store_fence AS f (shard, epoch, owner)
SELECT * FROM unnest($1::int4[], $2::int8[], $3::text[])
ON CONFLICT (shard) DO UPDATE SET epoch = excluded.epoch, owner = excluded.owner
WHERE f.epoch < excluded.epoch
"""

# A kept copy per (run_id, version): the first stays, unless a newer owner's
# copy of that version comes (its lineage is the run's).
_KEEP_VERSIONS: Final = _numbered(
    f"""
INSERT INTO {{s}}.hs_versions AS v ({_RUN_COLUMNS}, shard)
SELECT * FROM unnest({{a}})
ON CONFLICT (run_id, version) DO UPDATE SET {REPLACED_COLUMNS}
WHERE excluded.epoch > v.epoch
""",
    1,
    RUN_TYPES,
)

_DEAD_LETTER_COLUMNS: Final = (
    "run_id, workflow, at, error, attempts, compensation_errors, workflow_version, version, step, status,"
    " updated_at, attempt, snapshot_error, body"
)
_SAVE_DEAD_LETTERS: Final = _numbered(
    f"""
INSERT INTO {{s}}.hs_dead_letters AS d ({_DEAD_LETTER_COLUMNS}, shard)
SELECT * FROM unnest({{a}})
ON CONFLICT (run_id) DO UPDATE SET
    workflow = excluded.workflow, at = excluded.at, error = excluded.error, attempts = excluded.attempts,
    compensation_errors = excluded.compensation_errors, workflow_version = excluded.workflow_version,
    version = excluded.version, step = excluded.step, status = excluded.status,
    updated_at = excluded.updated_at, attempt = excluded.attempt, snapshot_error = excluded.snapshot_error,
    body = excluded.body
""",
    1,
    (
        "text",
        "text",
        "float8",
        "text",
        "text",
        "text",
        "int8",
        "int8",
        "int8",
        "text",
        "float8",
        "int8",
        "text",
        "bytea",
        "int4",
    ),
)

INDEXED_BYTES: Final = 2000
"""The longest run id, workflow or status (UTF-8 bytes) the PostgreSQL tier takes: an index entry
holds at most about 2,700 bytes (a third of a page), and these columns are indexed (a run whose
text is longer is rejected, ``SaveResult.rejected``, when its batch fails)."""

# What PostgreSQL refuses because of one row's values: the batch is written again without those runs.
_ROW_REFUSED: Final = (
    asyncpg.DataError,
    asyncpg.IntegrityConstraintViolationError,
    asyncpg.exceptions.ProgramLimitExceededError,
)

# A table or the schema is missing: the database lost them under an open store.
_GONE: Final = (asyncpg.exceptions.UndefinedTableError, asyncpg.exceptions.InvalidSchemaNameError)

# --- text PostgreSQL cannot hold ------------------------------------------------

_ESCAPED: Final = re.compile("(?:[^\x01]|\x01[\x01\x02])*", re.DOTALL)


def _escape(text: str) -> str:
    r"""``text`` with U+0001 as ``\x01\x02`` and U+0000 as ``\x01\x01``: order and equality kept."""
    return text.replace("\x01", "\x01\x02").replace("\x00", "\x01\x01")


def _escape_column(values: list[Any]) -> list[Any]:
    """The column with every text holding U+0000 or U+0001 escaped; the list itself when none does (~all)."""
    joined = "".join(v for v in values if type(v) is str)
    if "\x00" not in joined and "\x01" not in joined:
        return values
    return [_escape(v) if type(v) is str and ("\x00" in v or "\x01" in v) else v for v in values]


class _MalformedError(ValueError):
    """A stored text holding U+0001 that is not one of this store's escapes (not written by hotstate)."""


def _unescape(text: str) -> str:
    if "\x01" not in text:
        return text
    if not _ESCAPED.fullmatch(text):
        raise _MalformedError(text)
    return text.replace("\x01\x01", "\x00").replace("\x01\x02", "\x01")


def _unescape_opt(text: str | None) -> str | None:
    return None if text is None else _unescape(text)


# --- rows ------------------------------------------------------------------------


def _snapshot_columns(snapshots: Sequence[StoredSnapshot], shards: int) -> list[list[Any]]:
    """The snapshots as 12 column arrays (``RUN_TYPES``), text escaped where it must be."""
    if not snapshots:
        return [[] for _ in RUN_TYPES]
    cols: list[list[Any]] = [list(c) for c in zip(*(s.header for s in snapshots), strict=True)]
    if len(cols) != 9:  # pragma: no cover - RunHeader has 9 fields
        raise HotstateInternalError("RunHeader changed shape")
    ids = cols[0]
    cols.append([s.error for s in snapshots])
    cols.append([b if type(b := s.body) is bytes else bytes(b) for s in snapshots])
    cols.append([shard_of(r, shards) if type(r) is str else 0 for r in ids])  # another type: rejected
    for i in (0, 1, 5, 9):
        cols[i] = _escape_column(cols[i])
    return cols


def _transition_columns(part: Sequence[Transition]) -> list[list[Any]]:
    if not part:
        return [[] for _ in TRANSITION_TYPES]
    cols = [list(c) for c in zip(*part, strict=True)]
    cols[2] = [str(k) for k in cols[2]]
    cols[4] = [str(k) for k in cols[4]]
    for i in (0, 2, 4, 6):
        cols[i] = _escape_column(cols[i])
    return cols


def _newest(snapshots: Sequence[StoredSnapshot]) -> list[StoredSnapshot]:
    """One snapshot a run, its highest ``(epoch, version)`` (an upsert may touch a row once)."""
    top: dict[str, StoredSnapshot] = {}
    for s in snapshots:
        h = s.header
        held = top.get(h.run_id)
        if held is None or (h.epoch, h.version) > (held.header.epoch, held.header.version):
            top[h.run_id] = s
    return list(top.values()) if len(top) < len(snapshots) else list(snapshots)


def _transition_problem(t: Transition) -> str | None:
    """Why a transition's fields cannot go in their typed columns (a value of another type), or None."""
    bad = [
        f"transition {name}={value!r}"
        for name, ok in (
            ("run_id", type(t.run_id) is str),
            ("version", type(t.version) is int),
            ("kind", isinstance(t.kind, str)),
            ("step", type(t.step) is int),
            ("status", isinstance(t.status, str)),
            ("at", type(t.at) in (int, float)),
            ("detail", t.detail is None or isinstance(t.detail, str)),
        )
        if not ok
        for value in (getattr(t, name),)
    ]
    return ", ".join(bad) or None


def _stored_size(value: object) -> int:
    """The UTF-8 bytes ``value`` takes in its column (escapes included); 0 for a value that is not text."""
    if not isinstance(value, str):
        return 0
    if value.isascii() and "\x00" not in value and "\x01" not in value:
        return len(value)
    return len(_escape(value).encode("utf-8", "replace"))


def _too_long(run_id: object, *others: tuple[str, object]) -> str | None:
    """Why an index entry holding the run id is longer than ``INDEXED_BYTES``, or None.

    The run id is indexed alone and with each of ``others`` (``(workflow,
    run_id)`` and ``(status, run_id)`` are composite keys).
    """
    size = _stored_size(run_id)
    if size > INDEXED_BYTES:
        return f"run_id is {size} bytes; PostgreSQL indexes at most {INDEXED_BYTES}"
    for name, value in others:
        both = size + _stored_size(value)
        if both > INDEXED_BYTES:
            return f"{name} and run_id are {both} bytes together; PostgreSQL indexes at most {INDEXED_BYTES}"
    return None


def _rejects(snapshots: Sequence[StoredSnapshot], transitions: Sequence[Transition]) -> dict[str, str]:
    """``unwritable``, and the runs PostgreSQL refuses for their own values.

    Those are a value of another type than its column (PostgreSQL columns are
    typed), and indexed text too long for an index entry.
    """
    found = unwritable(snapshots, transitions)
    for s in snapshots:
        h = s.header
        if h.run_id not in found and (why := _too_long(h.run_id, ("workflow", h.workflow), ("status", h.status))):
            found[h.run_id] = why
    for t in transitions:
        if t.run_id not in found and (why := _too_long(t.run_id)):
            found[t.run_id] = why
    for s in snapshots:
        rid = s.header.run_id
        if rid not in found and (why := stored_problem(s)) is not None:
            found[rid] = f"a value of another type than its column: {why}"  # keyed as given: `without` drops it"
    for t in transitions:
        if t.run_id not in found and (why := _transition_problem(t)) is not None:
            found[t.run_id] = f"a value of another type than its column: {why}"
    return found


def _parts(transitions: Sequence[Transition]) -> list[Sequence[Transition]]:
    """Transitions in statements of at most ``TRANSACTION_TRANSITIONS``, and about ``CALL_BYTES`` of details."""
    if len(transitions) <= TRANSACTION_TRANSITIONS and sum(len(t.detail or "") for t in transitions) <= CALL_BYTES:
        return [transitions]
    parts: list[Sequence[Transition]] = []
    start, size = 0, 0
    for i, t in enumerate(transitions):
        n = len(t.detail) if isinstance(t.detail, str) else 0
        if i > start and (i - start >= TRANSACTION_TRANSITIONS or size + n > CALL_BYTES):
            parts.append(transitions[start:i])
            start, size = i, 0
        size += n
    parts.append(transitions[start:])
    return parts


def _stored(row: Sequence[Any], tier: str) -> StoredSnapshot:
    """A row of ``_RUN_COLUMNS`` as a snapshot, or ``CodecError`` when a text is not this store's."""
    try:
        header = RunHeader(
            _unescape(row[0]), _unescape(row[1]), row[2], row[3], row[4], _unescape(row[5]), row[6], row[7], row[8]
        )
        return StoredSnapshot(header, _unescape_opt(row[9]), row[10])
    except _MalformedError as exc:
        raise _malformed(row[0], tier, exc) from None


def _header(row: Sequence[Any], tier: str) -> RunHeader:
    try:
        return RunHeader(
            _unescape(row[0]), _unescape(row[1]), row[2], row[3], row[4], _unescape(row[5]), row[6], row[7], row[8]
        )
    except _MalformedError as exc:
        raise _malformed(row[0], tier, exc) from None


def _malformed(run_id: str, tier: str, exc: _MalformedError) -> CodecError:
    return CodecError(
        tier,
        f"run {run_id!r}: stored text {exc.args[0]!r} holds U+0001 that is not one of the store's escapes"
        " (not written by hotstate)",
    )


def _shown(run_id: str) -> str:
    """A stored run id for a report: unescaped when it can be, else as stored."""
    try:
        return _unescape(run_id)
    except _MalformedError:
        return run_id
