"""``SQLiteStore``: the SQLite tier of the map in docs/architecture.md.

WAL mode and one writer connection (aiosqlite runs each connection on its own
thread); a second, read-only connection serves loads and scans so readers never
queue behind a flush. Each ``save`` is one transaction: an ``executemany``
UPSERT guarded by ``(epoch, version)``, ``INSERT OR IGNORE`` for transitions,
and this writer's row in ``writer_marks`` (how a file restored from a backup
is noticed). A fenced save (and a fenced write of dead letters or kept
copies) also reads and raises the rows of its shards in ``hs_shard_fence``
in that transaction (design/ownership.md §4.5); the shard count is recorded
in ``hs_meta``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import operator
import os
import sqlite3
import sys
import time
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, cast, final

import aiosqlite
import anyio
import anyio.to_thread

from hotstate._errors import (
    CodecError,
    ConfigError,
    HotstateInternalError,
    PersistenceError,
    StoreUnavailableError,
)
from hotstate.persistence._records import (
    RunHeader,
    SaveResult,
    StoredDeadLetter,
    StoredSnapshot,
    transition_from_row,
)
from hotstate.persistence._shards import DEFAULT_SHARDS, check_shards, judge_fences, shard_of
from hotstate.persistence._store import (
    FINISHED_STATUSES,
    INT64_MAX,
    INT64_MIN,
    MARK_TTL,
    REPLACED_COLUMNS,
    TRANSACTION_TRANSITIONS,
    StoreBase,
    WriterMark,
    advance_mark,
    bad_row,
    check_limit,
    read_on,
    render_id,
    status_filter,
    transition_parts,
    unwritable,
    without,
)

if sys.version_info >= (3, 12):
    from typing import override
else:
    from typing_extensions import override

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Collection, Iterable, Sequence

    from hotstate.actors._snapshot import Transition
    from hotstate.persistence._records import BadRow
    from hotstate.persistence._shards import Fence

__all__ = ["SQLiteStore"]

_SYNCHRONOUS: Final = frozenset({"OFF", "NORMAL", "FULL", "EXTRA"})

# The columns `runs` and `snapshot_versions` share after run_id: RunHeader's
# fields but the epoch, then the snapshot's error and body, then the epoch and
# the shard (added last by the release that brought ownership, so a migrated
# file and a new one have the same layout). Every statement names its columns.
# `dead_letters` holds a snapshot in another order.
_SNAPSHOT_COLUMNS: Final = """
    workflow TEXT NOT NULL,
    workflow_version INTEGER NOT NULL,
    version INTEGER NOT NULL,
    step INTEGER NOT NULL,
    status TEXT NOT NULL,
    updated_at REAL NOT NULL,
    attempt INTEGER NOT NULL,
    error TEXT,
    body BLOB NOT NULL,
    epoch INTEGER NOT NULL DEFAULT 0,
    shard INTEGER NOT NULL DEFAULT 0"""

SQLITE_META_SCHEMA: Final = (
    "CREATE TABLE IF NOT EXISTS hs_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID"
)
"""The settings a database records (``shards``: the shard count), shared with the SQLite lease authority."""

SQLITE_FENCE_SCHEMA: Final = (
    "CREATE TABLE IF NOT EXISTS hs_shard_fence "
    "(shard INTEGER PRIMARY KEY, epoch INTEGER NOT NULL, owner TEXT NOT NULL) WITHOUT ROWID"
)
"""Each shard's fence: the newest ``(epoch, owner)`` that sealed it or wrote to it.

The store reads it in every fenced save and raises it (``fence_verdict``);
the SQLite lease authority, in the same file, bumps ``epoch`` and sets
``owner`` when it hands out a claim, which is then this store's seal.
"""

_SCHEMA: Final = f"""
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,{_SNAPSHOT_COLUMNS}
);
CREATE INDEX IF NOT EXISTS runs_status ON runs (status, run_id);
CREATE INDEX IF NOT EXISTS runs_workflow ON runs (workflow, run_id);
CREATE TABLE IF NOT EXISTS transitions (
    run_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    kind TEXT NOT NULL,
    step INTEGER NOT NULL,
    status TEXT NOT NULL,
    at REAL NOT NULL,
    detail TEXT,
    PRIMARY KEY (run_id, version)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS snapshot_versions (
    run_id TEXT NOT NULL,{_SNAPSHOT_COLUMNS},
    PRIMARY KEY (run_id, version)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dead_letters (
    run_id TEXT PRIMARY KEY,
    workflow TEXT NOT NULL,
    at REAL NOT NULL,
    error TEXT NOT NULL,
    attempts TEXT NOT NULL,
    compensation_errors TEXT NOT NULL,
    workflow_version INTEGER NOT NULL,
    version INTEGER NOT NULL,
    step INTEGER NOT NULL,
    status TEXT NOT NULL,
    updated_at REAL NOT NULL,
    attempt INTEGER NOT NULL,
    snapshot_error TEXT,
    body BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS writer_marks (
    writer TEXT PRIMARY KEY,
    high INTEGER NOT NULL,
    lost INTEGER NOT NULL,
    at REAL NOT NULL
) WITHOUT ROWID;
{SQLITE_META_SCHEMA};
{SQLITE_FENCE_SCHEMA};
"""

# The columns a file of the release before ownership lacks: added at open
# (ALTER TABLE ADD COLUMN keeps the rows; shards are then computed once).
_ADDED_COLUMNS: Final = (
    ("runs", "epoch"),
    ("runs", "shard"),
    ("snapshot_versions", "epoch"),
    ("snapshot_versions", "shard"),
)
# After the migration: on an old file the column does not exist before it. Not
# (shard, status, run_id): a flush's upsert sets `status`, so SQLite rewrites every
# index holding it, and that one cost 15-20% of the CPU of a 20,000-run update flush
# (measured; this one costs nothing there, as neither column is ever updated). A
# status filter goes through runs_status, as before.
_SHARD_INDEX: Final = "CREATE INDEX IF NOT EXISTS runs_shard ON runs (shard, run_id)"

# A scan of at most 1/_FEW_SHARDS of the shards goes through runs_shard; of more,
# it reads the table in run id order, filtering (a unary + keeps SQLite off the
# index, which it would still pick, then sort every remaining match on each page).
# Measured, 100,000 runs in 128 shards, pages of 1,000: 4 shards 9 ms by the index,
# 16 ms in run id order; 8 shards 22 vs 16; 32 shards 143 vs 25; 1 shard 1 vs 12.
_FEW_SHARDS: Final = 20

_RUN_COLUMNS: Final = (*RunHeader._fields, "error", "body")
_HEADER_WIDTH: Final = len(RunHeader._fields)
_RUN_WIDTH: Final = len(_RUN_COLUMNS)


def _select(width: int, *, typed: bool = False) -> str:
    """``SELECT`` of the first ``width`` run columns; ``typed`` adds each one's ``typeof()`` after them."""
    columns = _RUN_COLUMNS[:width]
    listed = ", ".join(columns)
    if typed:
        listed += ", " + ", ".join(f"typeof({c})" for c in columns)
    return f"SELECT {listed} FROM runs"  # noqa: S608 - our own column names


# width -> (the plain SELECT, the one with typeof() columns that _read_raw reads)
_SELECTS: Final = {w: (_select(w), _select(w, typed=True)) for w in (_HEADER_WIDTH, _RUN_WIDTH)}

# Copies are ordered by (epoch, version) (docs/architecture.md "Persistence";
# design/ownership.md 4.5): the WHERE makes a lower or equal pair a no-op, so
# `rowcount` counts exactly the rows written. A stored version or epoch that is
# not an integer (a row hotstate did not write, which every read reports as
# malformed) orders below every pair: the row is replaced. A run's shard never
# changes (the count is fixed per file): the update leaves it.
_UPSERT: Final = f"""
INSERT INTO runs (
    run_id, workflow, workflow_version, version, step, status, updated_at, attempt, epoch,
    error, body, shard
) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (run_id) DO UPDATE SET version = excluded.version, {REPLACED_COLUMNS}
WHERE (excluded.epoch, excluded.version) > (runs.epoch, runs.version)
    OR typeof(runs.version) <> 'integer' OR typeof(runs.epoch) <> 'integer'
"""  # noqa: S608 - our own column names

# A kept copy per (run_id, version): the first stays, unless a newer owner's
# copy of that version comes (its lineage is the run's; design/ownership.md 4.5).
_KEEP_VERSION: Final = f"""
INSERT INTO snapshot_versions (
    run_id, workflow, workflow_version, version, step, status, updated_at, attempt, epoch,
    error, body, shard
) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (run_id, version) DO UPDATE SET {REPLACED_COLUMNS}
WHERE excluded.epoch > snapshot_versions.epoch
"""  # noqa: S608 - our own column names


# The runs of a saved batch whose highest (epoch, version) in it is below the
# stored one: SaveResult.conflicts, with the stored version. Run in the save's
# transaction, only when some snapshot was stale. `batch` holds
# (run_id, epoch, version) rows, one per run.
def _conflicts_sql(batch: str) -> str:
    return (
        f"WITH batch(run_id, epoch, top) AS ({batch}) "  # noqa: S608 - our own SQL, values are parameters
        "SELECT runs.run_id, runs.version FROM batch JOIN runs ON runs.run_id = batch.run_id "
        "WHERE typeof(runs.version) = 'integer' AND typeof(runs.epoch) = 'integer' "
        "AND (runs.epoch, runs.version) > (batch.epoch, batch.top)"
    )


_CONFLICTS_JSON: Final = _conflicts_sql(
    "SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), json_extract(value, '$[2]') FROM json_each(?)"
)
_CONFLICT_ROWS: Final = 300  # (run_id, epoch, top) rows per statement: 900 parameters, under 999 on old builds

_INSERT_TRANSITION: Final = """
INSERT OR IGNORE INTO transitions (run_id, version, kind, step, status, at, detail)
VALUES (?, ?, ?, ?, ?, ?, ?)
"""

# The whole batch as one JSON parameter, unpacked by SQLite in C: one statement
# instead of one bind + step per row. Under a CPU-bound event loop the writer
# thread must win the GIL back after every row's step, so a flush of thousands
# of transitions took 100-280 ms with executemany in a saturated worker
# (hotstate bench, sweep suite); unpacked in SQLite it is one handoff.
_INSERT_TRANSITIONS_JSON: Final = """
INSERT OR IGNORE INTO transitions (run_id, version, kind, step, status, at, detail)
SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), json_extract(value, '$[2]'),
       json_extract(value, '$[3]'), json_extract(value, '$[4]'), json_extract(value, '$[5]'),
       json_extract(value, '$[6]')
FROM json_each(?)
"""

# This writer's mark (advance_mark in _store.py) in one statement of the save's
# transaction: a thread handoff costs up to a GIL switch interval under a
# CPU-bound loop (see _INSERT_TRANSITIONS_JSON), so not a SELECT and an UPSERT.
# On the right of SET the columns hold the old row; RETURNING sees the new one,
# and the save reports a reset when the new `lost` is above the floor. No row
# reads as (0, 0), as in advance_mark. RETURNING needs SQLite 3.35.
_ADVANCE_MARK: Final = """
INSERT INTO writer_marks (writer, high, lost, at)
VALUES (:writer, :seq, CASE WHEN :floor > 0 THEN :seq ELSE 0 END, :at)
ON CONFLICT (writer) DO UPDATE SET
    high = max(high, excluded.high),
    lost = CASE WHEN high < :floor THEN excluded.high ELSE lost END,
    at = excluded.at
RETURNING lost
"""
_READ_MARK: Final = "SELECT high, lost FROM writer_marks WHERE writer = ?"
_WRITE_MARK: Final = "INSERT OR REPLACE INTO writer_marks (writer, high, lost, at) VALUES (?, ?, ?, ?)"

# The placeholders take sorted(FINISHED_STATUSES) (three of them) and the cut-off.
_PURGE_TRANSITIONS: Final = """
DELETE FROM transitions WHERE run_id IN (
    SELECT run_id FROM runs WHERE status IN (?, ?, ?) AND updated_at < ?
)
"""
_PURGE_RUNS: Final = "DELETE FROM runs WHERE status IN (?, ?, ?) AND updated_at < ?"
_PURGE_VERSIONS: Final = """
DELETE FROM snapshot_versions WHERE run_id IN (
    SELECT run_id FROM runs WHERE status IN (?, ?, ?) AND updated_at < ?
)
"""


def _dead_letter_row(record: StoredDeadLetter) -> tuple[object, ...]:
    s = record.snapshot
    h = s.header
    return (
        record.run_id,
        record.workflow,
        record.at,
        record.error,
        record.attempts,
        record.compensation_errors,
        h.workflow_version,
        h.version,
        h.step,
        h.status,
        h.updated_at,
        h.attempt,
        s.error,
        bytes(s.body),
    )


# No epoch column: a dead letter's frame does not cover it (dead_letter_context)
# and nothing orders dead letters by it, so its snapshot reads back at epoch 0.
# (A column would also change the table every existing INSERT ... SELECT copies.)
_SAVE_DEAD_LETTER: Final = """
INSERT OR REPLACE INTO dead_letters (
    run_id, workflow, at, error, attempts, compensation_errors, workflow_version, version, step,
    status, updated_at, attempt, snapshot_error, body
) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""


# json_extract() ends a text value at an escaped NUL (checked on SQLite 3.40):
# a batch holding one goes row by row, or a run id "a\x00b" would become "a".
# The test is on the JSON text, so a literal backslash-u0000 in a value also
# takes the row-by-row path: slower, never wrong.
_NUL_IN_JSON: Final = "\\u0000"


async def _conflicts(conn: aiosqlite.Connection, snapshots: Sequence[StoredSnapshot]) -> dict[str, int]:
    """``SaveResult.conflicts`` of a batch just upserted, read in the same transaction."""
    top: dict[str, tuple[int, int]] = {}
    for s in snapshots:
        h = s.header
        pair = (h.epoch, h.version)
        held = top.get(h.run_id)
        if held is None or pair > held:
            top[h.run_id] = pair
    rows = [(run_id, epoch, version) for run_id, (epoch, version) in top.items()]
    if _json_available():
        batch = json.dumps(rows, ensure_ascii=False, separators=(",", ":"))
        if _NUL_IN_JSON not in batch:
            return dict(cast("Iterable[tuple[str, int]]", await conn.execute_fetchall(_CONFLICTS_JSON, (batch,))))
    found: dict[str, int] = {}
    for start in range(0, len(rows), _CONFLICT_ROWS):
        part = rows[start : start + _CONFLICT_ROWS]
        sql = _conflicts_sql("VALUES " + ", ".join(["(?, ?, ?)"] * len(part)))
        found.update(cast("Iterable[tuple[str, int]]", await conn.execute_fetchall(sql, [x for r in part for x in r])))
    return found


async def _wal(conn: aiosqlite.Connection, busy_timeout: float) -> None:
    """``PRAGMA journal_mode = WAL``, retried while another process switches the same new file.

    The switch needs the file to itself and answers "database is locked" at
    once, without the busy handler: two processes opening a new database
    together (``uvicorn --workers 2``) raced, and one failed to start.
    """
    deadline = time.monotonic() + busy_timeout
    delay = 0.005
    while True:
        try:
            await conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
        await anyio.sleep(delay)
        delay = min(delay * 2, 0.1)


@functools.cache
def _json_available() -> bool:
    """Whether this SQLite has the JSON functions (built in since 3.38, an extension before)."""
    try:
        with contextlib.closing(sqlite3.connect(":memory:")) as db:
            row: tuple[object, ...] | None = db.execute("SELECT json_extract('[1]', '$[0]')").fetchone()
            return row == (1,)
    except sqlite3.Error:
        return False


@functools.cache
def _returning_available() -> bool:
    """Whether this SQLite has ``RETURNING`` (3.35): else the mark takes a SELECT and an UPSERT."""
    return sqlite3.sqlite_version_info >= (3, 35, 0)


async def _advance_mark(conn: aiosqlite.Connection, writer: str, floor: int, seq: int) -> bool:
    """Check and advance ``writer``'s mark in the open transaction; True when the file lost acknowledged writes."""
    now = time.time()
    if _returning_available():
        params = {"writer": writer, "seq": seq, "floor": floor, "at": now}
        rows = list(await conn.execute_fetchall(_ADVANCE_MARK, params))
        lost: int = rows[0][0]
        return lost > floor
    rows = list(await conn.execute_fetchall(_READ_MARK, (writer,)))
    held = (int(rows[0][0]), int(rows[0][1])) if rows else None
    (high, lost), reset = advance_mark(held, floor, seq)
    await conn.execute(_WRITE_MARK, (writer, high, lost, now))
    return reset


def _transitions_json(part: Sequence[Transition]) -> str:
    """The transitions as one JSON parameter for ``_INSERT_TRANSITIONS_JSON`` ("" when SQLite lacks JSON).

    StrEnum members serialise as their values; floats round-trip (repr). A
    NaN raises ``ValueError`` here: SQLite would call the JSON malformed,
    which reads as an unreachable store.
    """
    if not _json_available():
        return ""
    return json.dumps(list(part), ensure_ascii=False, separators=(",", ":"), allow_nan=False)


_VERSION: Final = operator.itemgetter(1)
_STEP: Final = operator.itemgetter(3)


async def _insert_transitions(conn: aiosqlite.Connection, part: Sequence[Transition], text: str) -> int:
    """``INSERT OR IGNORE`` ``part`` (``text`` is its ``_transitions_json``); how many rows were new.

    Raises:
        OverflowError: a version or step is past 64 bits (``save`` rejects its run).
    """
    if text and _NUL_IN_JSON not in text:
        # json_extract() reads an integer past 64 bits (either way) as a REAL, which
        # the INTEGER column keeps: check what a bind would (~20 ns a transition).
        versions, steps = list(map(_VERSION, part)), list(map(_STEP, part))
        if max(versions) > INT64_MAX or max(steps) > INT64_MAX or min(versions) < INT64_MIN or min(steps) < INT64_MIN:
            raise OverflowError("a transition's version or step is past 64 bits")
        cur = await conn.execute(_INSERT_TRANSITIONS_JSON, (text,))
    else:
        rows = [(t.run_id, t.version, str(t.kind), t.step, str(t.status), t.at, t.detail) for t in part]
        cur = await conn.executemany(_INSERT_TRANSITION, rows)
    return cur.rowcount


def _snapshot_row(s: StoredSnapshot, shards: int) -> tuple[object, ...]:
    # RunHeader is a NamedTuple whose fields are the first 9 columns of _UPSERT, in order.
    # shard_of costs ~0.12 us a run (measured, 20,000 ids): the fenceless path pays it too.
    body = s.body
    h = s.header
    rid = h.run_id
    shard = shard_of(rid, shards) if type(rid) is str else 0  # another type: SQLite binds it, a read reports it
    return (*h, s.error, body if type(body) is bytes else bytes(body), shard)


_new = tuple.__new__  # NamedTuples without the keyword-parsing __new__ frame


class _NotText:
    """A text value that is not UTF-8, read as bytes: it fails every type check, and says why."""

    __slots__ = ("raw",)

    def __init__(self, raw: bytes) -> None:
        self.raw = raw

    def __repr__(self) -> str:
        return f"<text that is not UTF-8: {self.raw!r}>"


def _not_utf8(exc: BaseException | None) -> bool:
    """Whether a read failed because a stored text value does not decode (CPython's sqlite3 message)."""
    return isinstance(exc, sqlite3.OperationalError) and str(exc).startswith("Could not decode to UTF-8")


def _read_raw(uri: str, sql: str, params: Sequence[object], width: int, busy_ms: int) -> list[tuple[Any, ...]]:
    """Run a read of ``width`` run columns whose text did not decode, with text read as bytes.

    ``sql`` is a ``_select(width, typed=True)`` query: each value is followed
    by its ``typeof()``, so text (decoded here, or a ``_NotText``) is told
    from a blob. Blocking: run it in a worker thread.
    """
    with contextlib.closing(sqlite3.connect(uri, uri=True, isolation_level=None)) as db:
        db.text_factory = bytes
        db.execute(f"PRAGMA busy_timeout = {busy_ms}")
        rows = db.execute(sql, params).fetchall()
    out: list[tuple[Any, ...]] = []
    for row in rows:
        values = list(row[:width])
        for i, kind in enumerate(row[width:]):
            if kind == b"text":
                try:
                    values[i] = values[i].decode("utf-8")
                except UnicodeDecodeError:
                    values[i] = _NotText(values[i])
        out.append(tuple(values))
    return out


def _malformed(row: Sequence[Any], tier: str) -> CodecError:
    """A row whose columns do not have their types (written by something else)."""
    types: tuple[type | tuple[type, ...], ...] = (str, str, int, int, int, str, (int, float), int, int)
    width = _HEADER_WIDTH
    bad = [f"{n}={v!r}" for n, t, v in zip(RunHeader._fields, types, row[:width], strict=True) if not isinstance(v, t)]
    if len(row) > width and row[width] is not None and not isinstance(row[width], str):
        bad.append(f"error={row[width]!r}")
    if len(row) > width + 1 and not isinstance(row[width + 1], bytes | bytearray | memoryview):
        bad.append(f"body is a {type(row[width + 1]).__name__}")
    return CodecError(tier, f"run {render_id(row[0])!r}: stored header is malformed: {', '.join(bad)}")


def _well_formed(row: Sequence[Any]) -> bool:
    # Columns keep whatever type was written: a text version would reach the
    # version guard and recovery's ordering as a str (#5). Type checks cost
    # ~0.2 us per row on recovery's path.
    return (
        type(row[3]) is int
        and type(row[8]) is int
        and type(row[2]) is int
        and type(row[4]) is int
        and type(row[7]) is int
        and type(row[5]) is str
        and type(row[1]) is str
        and type(row[0]) is str
        and type(row[6]) in (float, int)
    )


def _header(row: Sequence[Any], tier: str) -> RunHeader:
    if not _well_formed(row):
        raise _malformed(row, tier)
    return _new(RunHeader, row[:_HEADER_WIDTH])


def _stored(row: Sequence[Any], tier: str) -> StoredSnapshot:
    """A row of ``_RUN_COLUMNS`` (the header's columns, error, body) as a snapshot, or ``CodecError``."""
    body = row[10]
    if type(body) is not bytes:
        if not isinstance(body, bytearray | memoryview):
            raise _malformed(row, tier)
        body = bytes(body)
    error = row[9]
    if not _well_formed(row) or (error is not None and type(error) is not str):
        raise _malformed(row, tier)
    return _new(StoredSnapshot, (_new(RunHeader, row[:_HEADER_WIDTH]), error, body))


# --- ownership: the recorded shard count, the migration, the fences ---------------

_READ_SHARDS: Final = "SELECT value FROM hs_meta WHERE key = 'shards'"
_RECORD_SHARDS: Final = "INSERT OR IGNORE INTO hs_meta (key, value) VALUES ('shards', ?)"
_RAISE_FENCE: Final = """
INSERT INTO hs_shard_fence (shard, epoch, owner) VALUES (?, ?, ?)
ON CONFLICT (shard) DO UPDATE SET epoch = excluded.epoch, owner = excluded.owner
WHERE excluded.epoch > hs_shard_fence.epoch
"""


async def _recorded_shards(conn: aiosqlite.Connection, tier: str) -> int | None:
    """The shard count the file records, or None when it records none yet.

    Raises:
        PersistenceError: the recorded value is not a shard count.
    """
    rows = list(await conn.execute_fetchall(_READ_SHARDS))
    if not rows:
        return None
    value = rows[0][0]
    try:
        return check_shards("shards", int(value))
    except (TypeError, ValueError) as exc:  # ConfigError is a ValueError too
        raise PersistenceError(tier, f"hs_meta records shards={value!r}, which is not a shard count") from exc


async def _missing_columns(conn: aiosqlite.Connection) -> list[tuple[str, str]]:
    """The ``_ADDED_COLUMNS`` this file lacks (all of them in a file of the release before ownership)."""
    have: dict[str, set[str]] = {}
    for table, _ in _ADDED_COLUMNS:
        if table not in have:
            rows = await conn.execute_fetchall("SELECT name FROM pragma_table_info(?)", (table,))
            have[table] = {row[0] for row in rows}
    return [(table, column) for table, column in _ADDED_COLUMNS if column not in have[table]]


def _stored_shard(raw: object, shards: int) -> int:
    """``shard_of`` a stored run id read as bytes (``CAST(run_id AS BLOB)``), for the migration.

    Bytes, so that a text value that is not UTF-8 (a row hotstate did not
    write) cannot fail the migration: it gets the CRC of its bytes. A NULL id gets 0.
    """
    if not isinstance(raw, bytes):
        return 0
    try:
        return shard_of(raw.decode(), shards)
    except UnicodeDecodeError:
        return zlib.crc32(raw) % shards


async def _migrate(conn: aiosqlite.Connection, missing: Sequence[tuple[str, str]], shards: int) -> None:
    """Add the ``missing`` columns, and compute the shard of every stored row, in the open transaction.

    One Python call per row (~1 us): a million runs take a few seconds, once.
    """
    for table, column in missing:
        # Our own names, from _ADDED_COLUMNS.
        await conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} INTEGER NOT NULL DEFAULT 0")
    await conn.create_function("hs_shard_of", 1, functools.partial(_stored_shard, shards=shards), deterministic=True)
    for table in ("runs", "snapshot_versions"):
        if (table, "shard") in missing:
            await conn.execute(f"UPDATE {table} SET shard = hs_shard_of(CAST(run_id AS BLOB))")  # noqa: S608


def _listed(shards: Iterable[int]) -> str:
    """Shard numbers as SQL integer literals: ``operator.index`` lets nothing else through, and no parameter limit applies."""
    return ", ".join(str(operator.index(s)) for s in shards)


async def _judge_fences(conn: aiosqlite.Connection, fence: Fence, shards: Collection[int]) -> dict[int, int]:
    """Apply ``fence_verdict`` to each of ``shards`` in the open transaction, raising the older fences.

    Returns:
        shard -> the stored fence's epoch, for each shard fenced: its fence
        is newer, or the same epoch of another owner, or ``fence.epochs``
        does not name it (its stored epoch then, 0 when it has no fence).
    """
    sql = f"SELECT shard, epoch, owner FROM hs_shard_fence WHERE shard IN ({_listed(shards)})"  # noqa: S608
    stored: dict[int, tuple[int, str]] = {row[0]: (row[1], row[2]) for row in await conn.execute_fetchall(sql)}
    lost, raised = judge_fences(stored, fence, shards)
    if raised:
        await conn.executemany(_RAISE_FENCE, raised)
    return lost


@final
class _Fencing:
    """One fenced save's view of the fences, kept across its transactions (and its second attempt)."""

    __slots__ = ("fence", "lost", "shard_of", "shards")

    def __init__(self, fence: Fence, shards: int) -> None:
        self.fence = fence
        self.shards = shards
        self.lost: dict[int, int] = {}  # shard -> stored epoch: nothing more of it is written
        self.shard_of: dict[str, int] = {}

    def shard(self, run_id: str) -> int:
        found = self.shard_of.get(run_id)
        if found is None:
            found = self.shard_of[run_id] = shard_of(run_id, self.shards)
        return found

    async def check(self, conn: aiosqlite.Connection, run_ids: Iterable[str]) -> None:
        """Judge the fences of these runs' shards in the open transaction.

        Every transaction of a long save checks again: a claim may commit
        between two of them. A shard found fenced stays so for the save.
        """
        wanted = {self.shard(r) for r in run_ids}
        wanted.difference_update(self.lost)
        if wanted:
            self.lost.update(await _judge_fences(conn, self.fence, wanted))

    def keeps(self, run_id: str) -> bool:
        return self.shard(run_id) not in self.lost

    def transitions(self, part: Sequence[Transition], text: str) -> tuple[Sequence[Transition], str]:
        """``part`` without the fenced shards' transitions, with its JSON (encoded again only when some went)."""
        if not self.lost:
            return part, text
        kept = [t for t in part if self.keeps(t.run_id)]
        if len(kept) == len(part):
            return part, text
        return kept, _transitions_json(kept) if kept else ""


@final
class SQLiteStore(StoreBase):
    """A Store in one SQLite file (WAL mode, one writer connection).

    Creating the file's directory is the caller's job: a missing directory is a
    ``StoreUnavailableError`` at ``open``.

    Args:
        path: the database file (``":memory:"`` for a private in-memory database).
        synchronous: ``PRAGMA synchronous``: OFF, NORMAL, FULL or EXTRA. NORMAL
            in WAL mode is durable against process crashes, not power loss.
        busy_timeout: seconds a connection waits on a lock before failing.
        tier: the tier's name.
        shards: the shard count (``shard_of``). None: the count the file
            records, or ``DEFAULT_SHARDS`` for a new file. The first ``open``
            records it in ``hs_meta``; another count than the recorded one is
            refused at ``open``.

    Attributes:
        shards: the shard count of the file (the recorded one, once open).

    Raises:
        ConfigError: ``synchronous``, ``busy_timeout`` or ``shards`` is
            invalid; at ``open``, ``shards`` differs from the count the file
            records.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: str = "NORMAL",
        busy_timeout: float = 5.0,
        tier: str = "sqlite",
        shards: int | None = None,
    ) -> None:
        self._shards_option = None if shards is None else check_shards("shards", shards)
        self.shards = DEFAULT_SHARDS if shards is None else shards
        mode = synchronous.upper()
        if mode not in _SYNCHRONOUS:
            raise ConfigError("synchronous", synchronous, f"must be one of {sorted(_SYNCHRONOUS)}")
        if busy_timeout < 0:
            raise ConfigError("busy_timeout", busy_timeout, "must be >= 0 seconds")
        self.tier = tier
        self.path = str(path)
        # Resolved now: a relative path must not change meaning if the cwd does.
        self._read_uri = Path(self.path).absolute().as_uri() + "?mode=ro"
        self.synchronous = mode
        self.busy_timeout = busy_timeout
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        # (st_dev, st_ino) of the file the connections have open. A deleted (or
        # replaced) file keeps accepting writes through the open descriptors on
        # Linux, and they vanish with the process: a write must fail instead (#5).
        # The file opened in its place holds no mark of this writer (or an
        # older one), so the next save reports the reset.
        self._identity: tuple[int, int] | None = None
        self._mark = WriterMark()
        # One transaction at a time on the single writer connection.
        self._write_lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"SQLiteStore({self.path!r}, tier={self.tier!r})"

    @contextlib.asynccontextmanager
    async def _errors(self, action: str) -> AsyncIterator[None]:
        try:
            yield
        except sqlite3.OperationalError as exc:
            # locked, busy, readonly, full, disk I/O, cannot open: transient.
            raise StoreUnavailableError(self.tier, f"{action}: {exc}") from exc
        except sqlite3.DatabaseError as exc:
            raise PersistenceError(self.tier, f"{action}: {type(exc).__name__}: {exc}") from exc

    async def _connect(self, *, read_only: bool, shards: int | None = None) -> aiosqlite.Connection:
        """A connection; the writer's also prepares the file (schema, shard count, migration).

        Raises:
            ConfigError: ``shards`` differs from the count the file records.
        """
        if read_only:
            pending = aiosqlite.connect(self._read_uri, uri=True, isolation_level=None)
        else:
            pending = aiosqlite.connect(self.path, isolation_level=None)
        try:
            conn = await pending
        except BaseException:
            # aiosqlite (checked against 0.22.1, core.py) starts a worker thread
            # per connection. When connecting fails, Connection._connect calls
            # stop(), which queues the close with a future, and does not await
            # it. The worker then hands its result to that future's loop with
            # call_soon_threadsafe; if the loop has closed meanwhile, the thread
            # dies with "RuntimeError: Event loop is closed" (omnilib/aiosqlite
            # #241), which pytest reports as an unhandled thread exception. So
            # wait for the thread while the loop lives. Connection has no public
            # join (requested in omnilib/aiosqlite#387), hence the private
            # `_thread`, read with a default in case a release renames it.
            thread = getattr(pending, "_thread", None)
            if thread is not None and thread.is_alive():
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(thread.join, 5.0)
            raise
        try:
            await conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            if not read_only:
                await _wal(conn, self.busy_timeout)
                await conn.execute(f"PRAGMA synchronous = {self.synchronous}")
                await conn.executescript(_SCHEMA)
                self.shards = await self._prepare(conn, shards)
        except BaseException:
            await conn.close()
            raise
        return conn

    async def _prepare(self, conn: aiosqlite.Connection, wanted: int | None) -> int:
        """Record or check the shard count, and migrate a file of the release before ownership.

        Reads only, when the file is current (a file that cannot be written
        still opens); else one ``BEGIN IMMEDIATE`` transaction, which checks
        again (another process may have done it meanwhile).

        Returns:
            The file's shard count.

        Raises:
            ConfigError: ``wanted`` differs from the count the file records.
        """
        recorded = await _recorded_shards(conn, self.tier)
        if recorded is None or await _missing_columns(conn):
            await conn.execute("BEGIN IMMEDIATE")
            try:
                recorded = await _recorded_shards(conn, self.tier)
                if recorded is None:
                    recorded = DEFAULT_SHARDS if wanted is None else wanted
                    await conn.execute(_RECORD_SHARDS, (str(recorded),))
                self._check_shards(recorded, wanted)  # before rows are given shards under it
                missing = await _missing_columns(conn)
                if missing:
                    await _migrate(conn, missing, recorded)
                    await conn.execute(_SHARD_INDEX)
                await conn.commit()
            except BaseException:
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        await conn.rollback()
                raise
        self._check_shards(recorded, wanted)
        await conn.execute(_SHARD_INDEX)  # a new file's (a no-op once it exists)
        return recorded

    def _check_shards(self, recorded: int, wanted: int | None) -> None:
        if wanted is not None and wanted != recorded:
            raise ConfigError(
                "shards",
                wanted,
                f"the database {self.path!r} records {recorded} shards; open it with shards={recorded} "
                "(or None), or move its runs to a new database",
            )

    @override
    async def open(self) -> None:
        if self._opened:
            return
        async with self._errors(f"open {self.path!r}"):
            self._writer = await self._connect(read_only=False, shards=self._shards_option)
            try:
                if self.path != ":memory:":
                    self._reader = await self._connect(read_only=True)
                self._mark = WriterMark()
                await self._write_first_mark()
            except BaseException:
                for conn in (self._reader, self._writer):
                    if conn is not None:
                        await conn.close()
                self._writer = self._reader = None
                raise
        self._identity = self._file_identity()
        self._opened = True

    async def _write_first_mark(self) -> None:
        """Write this writer's mark now, so versions read before its first save are claimed too.

        Marks more than ``MARK_TTL`` old (left by crashed processes) go in the
        same transaction. A file that cannot be written now (locked, read
        only) is no error here: the first save writes the mark, as a row it
        does not find is then not a loss.
        """
        assert self._writer is not None  # noqa: S101 - open() set it
        conn = self._writer
        mark = self._mark
        floor, seq = mark.next()
        now = time.time()
        try:
            await conn.execute("BEGIN IMMEDIATE")
            await conn.execute("DELETE FROM writer_marks WHERE at < ?", (now - MARK_TTL,))
            await _advance_mark(conn, mark.writer, floor, seq)
            await conn.commit()
        except sqlite3.OperationalError:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    await conn.rollback()
            return
        mark.stored(seq)

    def _file_identity(self) -> tuple[int, int] | None:
        if self.path == ":memory:":
            return None
        try:
            st = os.stat(self.path)
        except OSError:
            return (-1, -1)  # gone
        return (st.st_dev, st.st_ino)

    async def _check_file(self) -> None:
        """Reopen the path if the open file was deleted or replaced; fail while it cannot be.

        Raises:
            StoreUnavailableError: the file is gone and cannot be created again
                (e.g. its directory was deleted).
        """
        if self._identity is None or self._file_identity() == self._identity:
            return
        try:
            writer = await self._connect(read_only=False, shards=self.shards)
        except sqlite3.Error as exc:
            raise StoreUnavailableError(
                self.tier,
                f"the database file {self.path!r} was deleted or replaced while open, "
                f"and cannot be opened again: {exc}",
            ) from exc
        try:
            reader = await self._connect(read_only=True)
        except BaseException:
            await writer.close()
            raise
        old = (self._writer, self._reader)
        self._writer, self._reader = writer, reader
        self._identity = self._file_identity()
        for conn in old:
            if conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    await conn.close()

    @override
    async def aclose(self) -> None:
        """Delete this writer's mark (if the file can be written; else it goes after ``MARK_TTL``) and close."""
        was_open, self._opened = self._opened, False
        writer, reader = self._writer, self._reader
        self._writer = self._reader = None
        if reader is not None:
            await reader.close()
        if writer is not None:
            async with self._write_lock:
                try:
                    if was_open:
                        with contextlib.suppress(sqlite3.Error):
                            await writer.execute("DELETE FROM writer_marks WHERE writer = ?", (self._mark.writer,))
                finally:
                    await writer.close()

    def _w(self) -> aiosqlite.Connection:
        self._check_open()
        if self._writer is None:  # pragma: no cover - open() sets it
            raise HotstateInternalError("SQLiteStore is open without a writer")
        return self._writer

    def _r(self) -> aiosqlite.Connection:
        return self._reader or self._w()

    @contextlib.asynccontextmanager
    async def _transaction(self, action: str) -> AsyncIterator[aiosqlite.Connection]:
        self._w()
        async with self._write_lock, self._errors(action):
            await self._check_file()
            conn = self._w()
            await conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                await conn.commit()
            except BaseException:
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        await conn.rollback()
                raise

    @override
    async def save(
        self, snapshots: Sequence[StoredSnapshot], transitions: Sequence[Transition], *, fence: Fence | None = None
    ) -> SaveResult:
        """Write the batch, and advance this writer's mark, in one transaction; a failed one is rolled back.

        Before each write transaction the store checks that its path still
        names the file it has open. When the file was deleted or replaced, the
        store opens the path again (creating an empty database if nothing is
        there). ``reset`` comes from the mark: the file now open holds no mark
        of this writer, or an older one, when it lost writes this writer saw
        committed (a new empty file, an older copy moved over the path, or a
        backup restored in place, e.g. with ``sqlite3 FILE ".restore BACKUP"``,
        which keeps the file). A file replaced by an up-to-date copy is not a
        reset. While the path cannot be opened (its directory is gone), writes
        raise ``StoreUnavailableError``.

        A batch that sqlite3 cannot bind (a lone surrogate, an integer past
        64 bits, a NaN in a NOT NULL column) is rolled back, and written again
        without the runs ``unwritable`` names (``SaveResult.rejected``): the
        check costs nothing until a batch fails.

        With ``fence``, every transaction of the save (a long history takes
        several) reads the fences of the shards it writes, under its
        ``BEGIN IMMEDIATE``, and raises the older ones: a claim committed
        between two of them fences the rest of the save.
        """
        added = [0]  # transitions stored by the calls that went through, counted across a second attempt
        fencing = None if fence is None else _Fencing(fence, self.shards)
        try:
            return await self._save(snapshots, transitions, {}, added, fencing)
        except (ValueError, OverflowError, PersistenceError) as exc:  # UnicodeEncodeError is a ValueError
            if isinstance(exc, StoreUnavailableError):
                raise
            rejected = unwritable(snapshots, transitions)
            if not rejected:
                raise
        snapshots, transitions = without(rejected, snapshots, transitions)
        return await self._save(snapshots, transitions, rejected, added, fencing)

    async def _save(
        self,
        snapshots: Sequence[StoredSnapshot],
        transitions: Sequence[Transition],
        rejected: dict[str, str],
        added: list[int],
        fencing: _Fencing | None,
    ) -> SaveResult:
        parts = transition_parts(transitions, _transitions_json, TRANSACTION_TRANSITIONS)
        for part, text in parts[:-1]:  # a long history: the first transitions in transactions of their own
            async with self._transaction("save") as conn:
                if fencing is not None:
                    await fencing.check(conn, {t.run_id for t in part})
                    part, text = fencing.transitions(part, text)
                if part:
                    added[0] += await _insert_transitions(conn, part, text)
        part, text = parts[-1]
        written = 0
        conflicts: dict[str, int] = {}
        mark = self._mark
        shards = self.shards
        async with self._transaction("save") as conn:
            floor, seq = mark.next()  # under the write lock: the floor of the save before it counts
            reset = await _advance_mark(conn, mark.writer, floor, seq)
            if fencing is not None:
                await fencing.check(conn, [*(s.header.run_id for s in snapshots), *(t.run_id for t in part)])
                if fencing.lost:
                    snapshots = [s for s in snapshots if fencing.keeps(s.header.run_id)]
                part, text = fencing.transitions(part, text)
            if snapshots:
                cur = await conn.executemany(_UPSERT, [_snapshot_row(s, shards) for s in snapshots])
                written = cur.rowcount
                if written < len(snapshots):  # one more query, only when something was skipped
                    conflicts = await _conflicts(conn, snapshots)
            n = await _insert_transitions(conn, part, text) if part else 0
        mark.stored(seq)
        return SaveResult(
            written=written,
            stale=len(snapshots) - written,
            transitions=added[0] + n,
            reset=reset,
            conflicts=conflicts,
            rejected=rejected,
            fenced={} if fencing is None else dict(fencing.lost),
        )

    @override
    async def seal(self, fence: Fence) -> dict[int, int]:
        """Raise the fences in one transaction (the SQLite lease authority's claim already does, in this file)."""
        if not fence.epochs:
            self._w()
            return {}
        async with self._transaction("seal") as conn:
            return await _judge_fences(conn, fence, list(fence.epochs))

    async def _fetchall(self, sql: str, params: Sequence[object] = ()) -> list[Any]:
        async with self._errors("read"):
            return list(await self._r().execute_fetchall(sql, params))

    async def _fetch_runs(self, width: int, tail: str, params: Sequence[object]) -> list[Any]:
        """Rows of the first ``width`` columns of ``runs``; ``tail`` is the SQL after ``FROM runs``.

        One text value that is not UTF-8 makes sqlite3 fail the whole query
        (an ``OperationalError``, which would read as an unreachable store).
        The rows are then read again, on a connection of their own, with text
        as bytes: such a value comes back as a ``_NotText``, which makes its
        row malformed and leaves the others readable.
        """
        plain, typed = _SELECTS[width]
        try:
            return await self._fetchall(plain + tail, params)
        except StoreUnavailableError as exc:
            if self._reader is None or not _not_utf8(exc.__cause__):
                raise
        async with self._errors("read"):
            return await anyio.to_thread.run_sync(
                _read_raw, self._read_uri, typed + tail, params, width, int(self.busy_timeout * 1000)
            )

    def _checked(self, row: Sequence[Any], bad_rows: list[BadRow] | None) -> StoredSnapshot | None:
        """``row``'s snapshot; None when it is malformed and was reported in ``bad_rows`` (else it raises)."""
        try:
            return _stored(row, self.tier)
        except CodecError as exc:
            bad_row(exc, render_id(row[0]), bad_rows)
            return None

    @override
    async def load(self, run_id: str) -> StoredSnapshot | None:
        rows = await self._fetch_runs(_RUN_WIDTH, " WHERE run_id = ?", (run_id,))
        return _stored(rows[0], self.tier) if rows else None

    @override
    async def load_many(
        self, run_ids: Sequence[str], *, bad_rows: list[BadRow] | None = None
    ) -> dict[str, StoredSnapshot]:
        found: dict[str, StoredSnapshot] = {}
        ids = list(dict.fromkeys(run_ids))
        chunk = 500  # well under SQLITE_MAX_VARIABLE_NUMBER on old builds (999)
        for start in range(0, len(ids), chunk):
            part = ids[start : start + chunk]
            rows = await self._fetch_runs(_RUN_WIDTH, f" WHERE run_id IN ({', '.join('?' * len(part))})", part)
            for row in rows:
                if (stored := self._checked(row, bad_rows)) is not None:
                    found[row[0]] = stored
        return found

    @override
    async def scan(
        self,
        *,
        status: str | Iterable[str] | None = None,
        workflow: str | None = None,
        after: str | None = None,
        limit: int = 1000,
        shards: Collection[int] | None = None,
    ) -> list[RunHeader]:
        check_limit(limit)
        rows = await self._page(_HEADER_WIDTH, status, workflow, after, limit, shards)
        return [_header(row, self.tier) for row in rows]

    @override
    async def scan_snapshots(
        self,
        *,
        status: str | Iterable[str] | None = None,
        workflow: str | None = None,
        after: str | None = None,
        limit: int = 1000,
        bad_rows: list[BadRow] | None = None,
        shards: Collection[int] | None = None,
    ) -> list[StoredSnapshot]:
        """Read a page; when rows were reported in ``bad_rows``, read on until the page is full or the runs end."""
        check_limit(limit)
        return await read_on(
            lambda cursor, n: self._page(_RUN_WIDTH, status, workflow, cursor, n, shards),
            lambda row: self._checked(row, bad_rows),
            after,
            limit,
        )

    async def _page(
        self,
        width: int,
        status: str | Iterable[str] | None,
        workflow: str | None,
        after: object,
        limit: int,
        shards: Collection[int] | None,
    ) -> list[Any]:
        where: list[str] = []
        params: list[object] = []
        if shards is not None:  # the stored column, never recomputed
            wanted = sorted(set(shards))
            column = "shard" if len(wanted) * _FEW_SHARDS <= self.shards else "+shard"
            where.append(f"{column} IN ({_listed(wanted)})")
        statuses = status_filter(status)
        if statuses is not None:
            where.append(f"status IN ({', '.join('?' * len(statuses))})")
            params.extend(sorted(statuses))
        if workflow is not None:
            where.append("workflow = ?")
            params.append(workflow)
        if isinstance(after, _NotText):  # the last row read had a run id that is not UTF-8
            where.append("run_id > CAST(? AS TEXT)")
            params.append(after.raw)
        elif after is not None:
            where.append("run_id > ?")
            params.append(after)
        tail = " WHERE " + " AND ".join(where) if where else ""
        return await self._fetch_runs(width, tail + " ORDER BY run_id LIMIT ?", [*params, limit])

    @override
    async def history(self, run_id: str) -> list[Transition]:
        rows = await self._fetchall(
            "SELECT run_id, version, kind, step, status, at, detail FROM transitions WHERE run_id = ? ORDER BY version",
            (run_id,),
        )
        return [transition_from_row(tuple(row), tier=self.tier) for row in rows]

    @override
    async def _save_dead_letters(self, records: Sequence[StoredDeadLetter], fence: Fence | None) -> dict[int, int]:
        """One transaction; with ``fence``, the records' shards are judged under its ``BEGIN IMMEDIATE``."""
        if not records:
            return {}
        if fence is None:
            rows = [_dead_letter_row(r) for r in records]
            async with self._transaction("save_dead_letters") as conn:
                await conn.executemany(_SAVE_DEAD_LETTER, rows)
            return {}
        shards = self.shards
        of = {r.run_id: shard_of(r.run_id, shards) for r in records}
        async with self._transaction("save_dead_letters") as conn:
            lost = await _judge_fences(conn, fence, set(of.values()))
            kept = [r for r in records if of[r.run_id] not in lost] if lost else records
            if kept:
                await conn.executemany(_SAVE_DEAD_LETTER, [_dead_letter_row(r) for r in kept])
        return lost

    @override
    async def dead_letters(self, *, bad_rows: list[BadRow] | None = None) -> list[StoredDeadLetter]:
        columns = (
            "run_id, workflow, at, error, attempts, compensation_errors, "
            "workflow_version, version, step, status, updated_at, attempt, snapshot_error, body"
        )
        tail = " FROM dead_letters ORDER BY at, run_id"
        try:
            rows = await self._fetchall(f"SELECT {columns}{tail}", ())
        except StoreUnavailableError as exc:
            # One text value that is not UTF-8 fails the whole query: read the rows
            # again with text as bytes, so that row alone is malformed (as _fetch_runs).
            if self._reader is None or not _not_utf8(exc.__cause__):
                raise
            names = [c.strip() for c in columns.split(",")]
            typed = f"SELECT {columns}, {', '.join(f'typeof({c})' for c in names)}{tail}"
            async with self._errors("read"):
                rows = await anyio.to_thread.run_sync(
                    _read_raw, self._read_uri, typed, (), len(names), int(self.busy_timeout * 1000)
                )
        records = []
        for r in rows:
            try:
                if not all(type(x) is str for x in (r[0], r[1], r[3], r[4], r[5])) or type(r[2]) not in (int, float):
                    raise CodecError(self.tier, f"run {render_id(r[0])}: stored dead letter is malformed")
                records.append(
                    StoredDeadLetter(
                        run_id=r[0],
                        workflow=r[1],
                        at=float(r[2]),
                        error=r[3],
                        attempts=r[4],
                        compensation_errors=r[5],
                        snapshot=_stored((r[0], r[1], *r[6:12], 0, *r[12:]), self.tier),
                    )
                )
            except CodecError as exc:
                bad_row(exc, render_id(r[0]), bad_rows)
        return records

    @override
    async def delete_copy(self, run_id: str, body: bytes) -> bool:
        async with self._transaction("delete_copy") as conn:
            cur = await conn.execute("DELETE FROM runs WHERE run_id = ? AND body = ?", (run_id, body))
            return cur.rowcount > 0

    @override
    async def delete_dead_letter(self, run_id: str) -> bool:
        async with self._transaction("delete_dead_letter") as conn:
            cur = await conn.execute("DELETE FROM dead_letters WHERE run_id = ?", (run_id,))
            return cur.rowcount > 0

    @override
    async def save_versions(
        self, snapshots: Sequence[StoredSnapshot], *, fence: Fence | None = None
    ) -> dict[int, int] | None:
        """One transaction; with ``fence``, the copies' shards are judged under its ``BEGIN IMMEDIATE``."""
        if not snapshots:
            return None if fence is None else {}
        shards = self.shards
        if fence is None:
            async with self._transaction("save_versions") as conn:
                await conn.executemany(_KEEP_VERSION, [_snapshot_row(s, shards) for s in snapshots])
            return None
        of = {s.header.run_id: shard_of(s.header.run_id, shards) for s in snapshots}
        async with self._transaction("save_versions") as conn:
            lost = await _judge_fences(conn, fence, set(of.values()))
            kept = [s for s in snapshots if of[s.header.run_id] not in lost] if lost else snapshots
            if kept:
                await conn.executemany(_KEEP_VERSION, [_snapshot_row(s, shards) for s in kept])
        return lost

    @override
    async def load_version(self, run_id: str, version: int) -> StoredSnapshot | None:
        rows = await self._fetchall(
            "SELECT run_id, workflow, workflow_version, version, step, status, updated_at, "
            "attempt, epoch, error, body FROM snapshot_versions WHERE run_id = ? AND version <= ? "
            "ORDER BY version DESC LIMIT 1",
            [run_id, version],
        )
        return _stored(rows[0], self.tier) if rows else None

    @override
    async def purge_finished(self, *, before: float) -> int:
        params = [*sorted(FINISHED_STATUSES), before]
        async with self._transaction("purge_finished") as conn:
            await conn.execute(_PURGE_TRANSITIONS, params)
            await conn.execute(_PURGE_VERSIONS, params)
            cur = await conn.execute(_PURGE_RUNS, params)
            return cur.rowcount
