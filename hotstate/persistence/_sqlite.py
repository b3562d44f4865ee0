"""``SQLiteStore``: the Store contract on one SQLite file (aiosqlite, WAL, one writer connection).

DESIGN.md, Stores: one transaction per flush with ``executemany``; the version
guard is in the UPSERT itself (``WHERE excluded.version > runs.version``), so a
stale batch can never overwrite a newer snapshot whatever order batches arrive in.
"""

from __future__ import annotations

import sqlite3
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, final

import aiosqlite

from hotstate._errors import ConfigError, StoreUnavailableError
from hotstate.persistence._records import (
    RunHeader,
    SaveResult,
    StoredDeadLetter,
    StoredSnapshot,
    transition_from_row,
    transition_to_row,
)

if TYPE_CHECKING:
    from hotstate.actors import Transition

__all__ = ["SQLiteStore"]

_SYNC_MODES: Final = ("OFF", "NORMAL", "FULL", "EXTRA")
_HEADER_COLS: Final = "run_id, workflow, workflow_version, version, step, status, updated_at, attempt"
_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    workflow TEXT NOT NULL,
    workflow_version INTEGER NOT NULL,
    version INTEGER NOT NULL,
    step INTEGER NOT NULL,
    status TEXT NOT NULL,
    updated_at REAL NOT NULL,
    attempt INTEGER NOT NULL,
    error TEXT,
    body BLOB NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS runs_by_status ON runs (status, run_id);
CREATE INDEX IF NOT EXISTS runs_by_workflow ON runs (workflow, run_id);
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
CREATE TABLE IF NOT EXISTS dead_letters (
    run_id TEXT PRIMARY KEY,
    workflow TEXT NOT NULL,
    at REAL NOT NULL,
    error TEXT NOT NULL,
    attempts TEXT NOT NULL,
    compensation_errors TEXT NOT NULL,
    header TEXT NOT NULL,
    snapshot_error TEXT,
    body BLOB NOT NULL
);
"""
_UPSERT: Final = f"""
INSERT INTO runs ({_HEADER_COLS}, error, body) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (run_id) DO UPDATE SET
    workflow = excluded.workflow, workflow_version = excluded.workflow_version,
    version = excluded.version, step = excluded.step, status = excluded.status,
    updated_at = excluded.updated_at, attempt = excluded.attempt,
    error = excluded.error, body = excluded.body
WHERE excluded.version > runs.version
"""
_TERMINAL: Final = ("done", "failed", "cancelled")


def _header(row: Sequence[Any]) -> RunHeader:
    return RunHeader(
        run_id=row[0], workflow=row[1], workflow_version=row[2], version=row[3],
        step=row[4], status=row[5], updated_at=row[6], attempt=row[7],
    )


def _stored(row: Sequence[Any]) -> StoredSnapshot:
    return StoredSnapshot(header=_header(row), error=row[8], body=bytes(row[9]))


@final
class SQLiteStore:
    """Snapshots, transitions and dead letters in one SQLite file.

    Args:
        path: the database file (its directory must exist).
        synchronous: ``OFF``, ``NORMAL`` (default, safe with WAL against
            process crashes), ``FULL`` or ``EXTRA`` (also power loss).
        busy_timeout: seconds to wait for another writer's lock.
        tier: the tier's name.

    Raises:
        ConfigError: an option is invalid.
    """

    def __init__(
        self, path: str | Path, *, synchronous: str = "NORMAL", busy_timeout: float = 5.0, tier: str = "sqlite"
    ) -> None:
        sync = str(synchronous).upper()
        if sync not in _SYNC_MODES:
            raise ConfigError("SQLiteStore.synchronous", synchronous, f"must be one of {_SYNC_MODES}")
        if not (isinstance(busy_timeout, int | float) and busy_timeout >= 0):
            raise ConfigError("SQLiteStore.busy_timeout", busy_timeout, "must be a number >= 0")
        self.path = Path(path)
        self.synchronous = sync
        self.busy_timeout = float(busy_timeout)
        self.tier = tier
        self._db: aiosqlite.Connection | None = None

    def __repr__(self) -> str:
        return f"<SQLiteStore {str(self.path)!r} synchronous={self.synchronous}>"

    def _error(self, exc: BaseException) -> StoreUnavailableError:
        err = StoreUnavailableError(self.tier, f"{self.path}: {type(exc).__name__}: {exc}")
        err.__cause__ = exc
        return err

    async def open(self) -> None:
        """Open the writer connection, switch to WAL and create the tables.

        Raises:
            StoreUnavailableError: the file cannot be opened or written.
        """
        if self._db is not None:
            return
        try:
            db = await aiosqlite.connect(self.path, isolation_level=None)
        except (sqlite3.Error, OSError) as exc:
            raise self._error(exc) from exc
        try:
            await db.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            await db.execute("PRAGMA journal_mode = WAL")
            await db.execute(f"PRAGMA synchronous = {self.synchronous}")
            await db.executescript(_SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            await db.close()
            raise self._error(exc) from exc
        self._db = db

    async def aclose(self) -> None:
        """Close the connection; idempotent."""
        db, self._db = self._db, None
        if db is not None:
            try:
                await db.close()
            except sqlite3.Error as exc:
                raise self._error(exc) from exc

    async def __aenter__(self) -> SQLiteStore:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __del__(self, _warn: Any = warnings.warn) -> None:
        if getattr(self, "_db", None) is not None:
            _warn(f"unclosed {self!r}", ResourceWarning, stacklevel=1)

    def _conn(self) -> aiosqlite.Connection:
        if self._db is None:
            raise StoreUnavailableError(self.tier, f"{self.path}: store is not open")
        return self._db

    async def save(self, snapshots: Sequence[StoredSnapshot], transitions: Sequence[Transition]) -> SaveResult:
        """Write a batch in one transaction (version-guarded UPSERT, idempotent transitions).

        Raises:
            StoreUnavailableError: the write failed (locked, read-only, full, I/O); nothing was written.
        """
        db = self._conn()
        rows = [
            (h.run_id, h.workflow, h.workflow_version, h.version, h.step, h.status, h.updated_at, h.attempt, s.error, s.body)
            for s in snapshots
            for h in (s.header,)
        ]
        try:
            await db.execute("BEGIN IMMEDIATE")
            try:
                before = db.total_changes
                if rows:
                    await db.executemany(_UPSERT, rows)
                written = db.total_changes - before
                before = db.total_changes
                if transitions:
                    await db.executemany(
                        "INSERT OR IGNORE INTO transitions VALUES (?, ?, ?, ?, ?, ?, ?)",
                        [transition_to_row(t) for t in transitions],
                    )
                added = db.total_changes - before
                await db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    await db.execute("ROLLBACK")
                raise
        except (sqlite3.Error, OSError) as exc:
            raise self._error(exc) from exc
        return SaveResult(written=written, stale=len(rows) - written, transitions=added)

    async def _fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        try:
            async with self._conn().execute(sql, params) as cursor:
                return list(await cursor.fetchall())
        except (sqlite3.Error, OSError) as exc:
            raise self._error(exc) from exc

    async def load(self, run_id: str) -> StoredSnapshot | None:
        """Return the stored snapshot of ``run_id``, or None."""
        rows = await self._fetch(f"SELECT {_HEADER_COLS}, error, body FROM runs WHERE run_id = ?", (run_id,))
        return _stored(rows[0]) if rows else None

    async def load_many(self, run_ids: Sequence[str]) -> dict[str, StoredSnapshot]:
        """Return the stored snapshots of those runs that exist."""
        out: dict[str, StoredSnapshot] = {}
        ids = list(run_ids)
        for i in range(0, len(ids), 500):  # stay under SQLite's bound-parameter limit
            chunk = ids[i : i + 500]
            marks = ",".join("?" * len(chunk))
            for row in await self._fetch(f"SELECT {_HEADER_COLS}, error, body FROM runs WHERE run_id IN ({marks})", chunk):
                out[row[0]] = _stored(row)
        return out

    async def scan(
        self,
        *,
        status: str | Iterable[str] | None = None,
        workflow: str | None = None,
        after: str | None = None,
        limit: int = 1000,
    ) -> list[RunHeader]:
        """Page headers in run-id order; never reads a body."""
        where: list[str] = []
        params: list[Any] = []
        if status is not None:
            statuses = [status] if isinstance(status, str) else list(status)
            where.append(f"status IN ({','.join('?' * len(statuses))})")
            params.extend(statuses)
        if workflow is not None:
            where.append("workflow = ?")
            params.append(workflow)
        if after is not None:
            where.append("run_id > ?")
            params.append(after)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        params.append(int(limit))
        rows = await self._fetch(f"SELECT {_HEADER_COLS} FROM runs {clause} ORDER BY run_id LIMIT ?", params)  # noqa: S608 - only placeholders are interpolated
        return [_header(r) for r in rows]

    async def history(self, run_id: str) -> list[Transition]:
        """Return the transitions of ``run_id`` ordered by version."""
        rows = await self._fetch("SELECT * FROM transitions WHERE run_id = ? ORDER BY version", (run_id,))
        return [transition_from_row(r) for r in rows]

    async def save_dead_letter(self, record: StoredDeadLetter) -> None:
        """Store (or replace) a dead-letter record."""
        import json
        from dataclasses import asdict

        s = record.snapshot
        db = self._conn()
        try:
            await db.execute(
                "INSERT OR REPLACE INTO dead_letters VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (record.run_id, record.workflow, record.at, record.error, record.attempts,
                 record.compensation_errors, json.dumps(asdict(s.header)), s.error, s.body),
            )
        except (sqlite3.Error, OSError) as exc:
            raise self._error(exc) from exc

    async def dead_letters(self) -> list[StoredDeadLetter]:
        """Return every dead-letter record, oldest first."""
        import json

        rows = await self._fetch("SELECT * FROM dead_letters ORDER BY at, run_id")
        return [
            StoredDeadLetter(
                run_id=r[0], workflow=r[1], at=r[2], error=r[3], attempts=r[4], compensation_errors=r[5],
                snapshot=StoredSnapshot(header=RunHeader(**json.loads(r[6])), error=r[7], body=bytes(r[8])),
            )
            for r in rows
        ]

    async def delete_dead_letter(self, run_id: str) -> bool:
        """Delete a dead-letter record; True if one existed."""
        db = self._conn()
        try:
            cursor = await db.execute("DELETE FROM dead_letters WHERE run_id = ?", (run_id,))
            return cursor.rowcount > 0
        except (sqlite3.Error, OSError) as exc:
            raise self._error(exc) from exc

    async def purge_finished(self, *, before: float) -> int:
        """Delete finished runs (snapshot and history) last updated before ``before``."""
        db = self._conn()
        try:
            await db.execute("BEGIN IMMEDIATE")
            ids = [r[0] for r in await db.execute_fetchall(
                "SELECT run_id FROM runs WHERE status IN (?, ?, ?) AND updated_at < ?", (*_TERMINAL, before))]
            await db.executemany("DELETE FROM transitions WHERE run_id = ?", [(i,) for i in ids])
            await db.executemany("DELETE FROM runs WHERE run_id = ?", [(i,) for i in ids])
            await db.execute("COMMIT")
        except (sqlite3.Error, OSError) as exc:
            if self._db is not None and self._db.in_transaction:
                await self._db.execute("ROLLBACK")
            raise self._error(exc) from exc
        return len(ids)
