"""``SQLiteAuthority``: the lease authority for several processes on one host.

design/ownership.md §4.3 in SQLite: ``hs_shard_lease`` (renewed often) and
``hs_shard_fence`` (changed only by a claim) are separate tables, with
``hs_members`` and an ``hs_ownership_log``. SQLite serializes writers
(``BEGIN IMMEDIATE``), so claims are linearizable on one host; times are
this host's wall clock, which every process on the host shares.

When the file is also an ``SQLiteStore``'s, the fence table is the store's:
a claim bumps the epoch the store's saves are checked against, so the claim
itself seals that tier. Calls run on a worker thread with their own
connection; each is one short transaction.
"""

from __future__ import annotations

import math
import sqlite3
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Final, final

import anyio.to_thread

from hotstate._errors import ConfigError, PersistenceError, StoreUnavailableError
from hotstate.persistence._authority import InboxEntry, MemberInfo, Renewal, ShardLease, process_gone
from hotstate.persistence._shards import DEFAULT_SHARDS, check_shards

if TYPE_CHECKING:
    from collections.abc import Callable, Collection, Mapping, Sequence

__all__ = ["SQLiteAuthority", "authority_path", "host_clock", "read_shard_map"]

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS hs_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS hs_shard_fence (
    shard INTEGER PRIMARY KEY, epoch INTEGER NOT NULL, owner TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS hs_shard_lease (
    shard INTEGER PRIMARY KEY, owner TEXT, acquired_at REAL NOT NULL, expires_at REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS hs_shard_lease_owner ON hs_shard_lease (owner);
CREATE TABLE IF NOT EXISTS hs_members (
    member_id TEXT PRIMARY KEY, host TEXT NOT NULL, pid INTEGER NOT NULL, started TEXT NOT NULL,
    name TEXT NOT NULL, joined_at REAL NOT NULL, last_seen REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS hs_inbox (
    shard INTEGER NOT NULL, seq INTEGER NOT NULL, run_id TEXT NOT NULL, kind TEXT NOT NULL, body BLOB NOT NULL,
    created_at REAL NOT NULL, verdict TEXT, PRIMARY KEY (shard, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS hs_inbox_waiting ON hs_inbox (shard, seq) WHERE verdict IS NULL;
CREATE TABLE IF NOT EXISTS hs_ownership_log (
    shard INTEGER NOT NULL, epoch INTEGER NOT NULL, owner TEXT NOT NULL, event TEXT NOT NULL, at REAL NOT NULL
);
"""

_LOG_KEEP: Final = 100_000  # ownership log rows kept (the oldest go first)


def authority_path(database: str | Path) -> str:
    """The file of the default authority of an SQLite tier's ``database``: ``<database>-authority``.

    Its own file, beside the tier's: a lease renewal never waits behind the
    tier's flushes for SQLite's one write lock (with several saturated
    processes on one file, renewals queued behind flushes long enough for
    leases to lapse), and a process stopped inside a flush's transaction stops
    every other process's flushes but not their renewals. An in-memory
    database (``:memory:``) keeps an in-memory authority.
    """
    text = str(database)
    return text if text == ":memory:" else f"{text}-authority"


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip() or None
    except OSError:
        return None


def host_clock() -> tuple[Callable[[], float], str]:
    """The clock leases on one host are measured with, and its name (recorded in the file).

    Linux: ``CLOCK_BOOTTIME``, one clock for every process of the host, which
    no one can set (a wall-clock step, NTP or by hand, moves no lease) and
    which counts time suspended; named with the boot id, as it restarts at
    boot. Elsewhere: the wall clock.
    """
    boot = _boot_id()
    if boot is not None and hasattr(time, "CLOCK_BOOTTIME"):
        clock_id = time.CLOCK_BOOTTIME
        return (lambda: time.clock_gettime(clock_id)), f"boottime:{boot}"
    return time.time, "wall"


@final
class SQLiteAuthority:
    """Shard leases and epochs in an SQLite file, for processes on one host.

    Args:
        path: the database file: by default ``authority_path`` of the first
            SQLite tier's file (its own file, so renewals never queue behind
            the tier's flushes). The tier's own file works too (a claim then
            also seals that tier).
        shards: the shard count; None takes the recorded one (or
            ``DEFAULT_SHARDS`` for a new file). Another count than the
            recorded one is a ``ConfigError`` at ``open``.
        busy_timeout: seconds a call waits for another writer's lock.
        clock: the authority's time (default: ``host_clock``, a clock no one
            can set; tests inject one).
        gone: how a member is judged gone (default ``process_gone``).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        shards: int | None = None,
        busy_timeout: float = 5.0,
        clock: Callable[[], float] | None = None,
        gone: Callable[[MemberInfo], bool] | None = None,
    ) -> None:
        self.path = Path(path)
        self._asked = None if shards is None else check_shards("SQLiteAuthority.shards", shards)
        self.shards = self._asked or DEFAULT_SHARDS
        self.name = f"sqlite:{self.path}"
        self._busy = busy_timeout
        if clock is None:
            self._now, self._clock_name = host_clock()
        else:
            self._now, self._clock_name = clock, "injected"
        self._gone = gone if gone is not None else process_gone
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<SQLiteAuthority {str(self.path)!r} shards={self.shards}>"

    async def _call(self, fn: Callable[[sqlite3.Connection], object], what: str, *, write: bool = True) -> object:
        conn = self._conn
        if conn is None:
            raise PersistenceError(self.name, f"cannot {what}: the authority is not open")

        def run() -> object:
            with self._lock:
                try:
                    conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                    try:
                        out = fn(conn)
                    except BaseException:
                        conn.rollback()
                        raise
                    conn.commit()
                    return out
                except sqlite3.OperationalError as exc:
                    raise StoreUnavailableError(self.name, f"{what}: {exc}") from exc

        # Abandoned on cancel: a renewal stuck behind a lock must not hold its caller past a lease deadline.
        return await anyio.to_thread.run_sync(run, abandon_on_cancel=True)

    async def open(self) -> None:
        """Create the schema and record (or check) the shard count."""
        if self._conn is not None:
            return

        def connect() -> sqlite3.Connection:
            conn = sqlite3.connect(self.path, timeout=self._busy, isolation_level=None, check_same_thread=False)
            try:
                deadline = time.monotonic() + self._busy
                while True:  # another process switching the same new file answers "locked" at once
                    try:
                        conn.execute("PRAGMA journal_mode=WAL")
                        break
                    except sqlite3.OperationalError as exc:
                        if "locked" not in str(exc) or time.monotonic() >= deadline:
                            raise
                        time.sleep(0.01)
                conn.executescript(_SCHEMA)
            except sqlite3.DatabaseError as exc:
                conn.close()
                raise PersistenceError(self.name, f"cannot open the authority: {exc}") from exc
            return conn

        try:
            self._conn = await anyio.to_thread.run_sync(connect)
        except sqlite3.OperationalError as exc:
            raise StoreUnavailableError(self.name, f"cannot open: {exc}") from exc
        try:
            await self._call(self._record_shards, "record the shard count")
        except BaseException:
            await self.aclose()
            raise

    def _record_shards(self, conn: sqlite3.Connection) -> None:
        row = conn.execute("SELECT value FROM hs_meta WHERE key = 'shards'").fetchone()
        if row is None:
            conn.execute("INSERT INTO hs_meta (key, value) VALUES ('shards', ?)", (str(self.shards),))
        else:
            recorded = int(row[0])
            if self._asked is not None and recorded != self._asked:
                raise ConfigError(
                    "SQLiteAuthority.shards",
                    self._asked,
                    f"the file {str(self.path)!r} records {recorded} shards; a process with another count"
                    " would place runs in other shards than the others do",
                )
            self.shards = recorded
        clock = conn.execute("SELECT value FROM hs_meta WHERE key = 'clock'").fetchone()
        if clock is None or clock[0] != self._clock_name:
            # Leases and heartbeats measured on another clock (before a reboot) mean nothing
            # on this one: every process of that boot is gone, so every lease is free.
            if clock is not None:
                conn.execute("UPDATE hs_shard_lease SET expires_at = 0")
                conn.execute("UPDATE hs_members SET last_seen = 0")
            conn.execute("INSERT OR REPLACE INTO hs_meta (key, value) VALUES ('clock', ?)", (self._clock_name,))
        have = conn.execute("SELECT count(*) FROM hs_shard_lease").fetchone()[0]
        if have < self.shards:
            conn.executemany(
                "INSERT OR IGNORE INTO hs_shard_lease (shard, owner, acquired_at, expires_at) VALUES (?, NULL, 0, 0)",
                [(s,) for s in range(self.shards)],
            )

    async def aclose(self) -> None:
        """Close the connection (idempotent), once no call (an abandoned one included) is using it."""
        conn, self._conn = self._conn, None
        if conn is not None:

            def close() -> None:
                with self._lock:  # a call abandoned on cancel may still run on this connection
                    conn.close()

            await anyio.to_thread.run_sync(close)

    async def join(self, member: MemberInfo) -> None:
        """Record ``member`` as live."""

        def run(conn: sqlite3.Connection) -> None:
            now = self._now()
            conn.execute(
                "INSERT OR REPLACE INTO hs_members VALUES (?, ?, ?, ?, ?, ?, ?)",
                (member.member_id, member.host, member.pid, member.started, member.name, now, now),
            )

        await self._call(run, "join")

    async def renew(self, member_id: str, ttl: float) -> Renewal:
        """Extend every lease of ``member_id``, in one statement; read the map and live members."""

        def run(conn: sqlite3.Connection) -> Renewal:
            now = self._now()
            # No RETURNING: it needs SQLite 3.35, and some Pythons 3.11 ship older.
            conn.execute(
                "UPDATE hs_shard_lease SET expires_at = ? WHERE owner = ? AND expires_at > ?",
                (now + ttl, member_id, now),
            )
            held = conn.execute(
                "SELECT shard FROM hs_shard_lease WHERE owner = ? AND expires_at = ?", (member_id, now + ttl)
            ).fetchall()
            conn.execute("UPDATE hs_members SET last_seen = ? WHERE member_id = ?", (now, member_id))
            members = conn.execute("SELECT * FROM hs_members WHERE last_seen > ?", (now - ttl,)).fetchall()
            return Renewal(
                frozenset(r[0] for r in held),
                self._read_leases(conn),
                tuple(MemberInfo(*m) for m in members),
                now,
            )

        out = await self._call(run, "renew")
        assert isinstance(out, Renewal)  # noqa: S101 - run returns one
        return out

    @staticmethod
    def _read_leases(conn: sqlite3.Connection) -> tuple[ShardLease, ...]:
        rows = conn.execute(
            "SELECT l.shard, l.owner, coalesce(f.epoch, 0), l.expires_at, l.acquired_at"
            " FROM hs_shard_lease l LEFT JOIN hs_shard_fence f ON f.shard = l.shard ORDER BY l.shard"
        ).fetchall()
        return tuple(ShardLease(*r) for r in rows)

    async def claim(
        self, member_id: str, shards: Sequence[int], ttl: float, *, floors: Mapping[int, int] | None = None
    ) -> dict[int, int]:
        """Take each claimable shard of ``shards`` in one transaction; bump its epoch (and fence), past ``floors``."""
        floors = floors or {}
        for s in shards:
            if type(s) is not int or not 0 <= s < self.shards:
                raise ConfigError("claim.shards", s, f"must be a shard from 0 to {self.shards - 1}")

        def run(conn: sqlite3.Connection) -> dict[int, int]:
            now = self._now()
            taken: dict[int, int] = {}
            marks = ",".join("?" * len(shards))
            rows = conn.execute(
                f"SELECT shard, owner, expires_at FROM hs_shard_lease WHERE shard IN ({marks})",  # noqa: S608 - placeholders only
                list(shards),
            ).fetchall()
            holders: dict[str, MemberInfo | None] = {}
            for shard, owner, expires_at in rows:
                if owner is not None and expires_at > now:
                    if owner == member_id:
                        continue  # held already
                    if owner not in holders:
                        m = conn.execute("SELECT * FROM hs_members WHERE member_id = ?", (owner,)).fetchone()
                        holders[owner] = None if m is None else MemberInfo(*m)
                    holder = holders[owner]
                    if holder is None or not self._gone(holder):
                        continue
                floor = int(floors.get(shard, 0))
                conn.execute(
                    "INSERT INTO hs_shard_fence (shard, epoch, owner) VALUES (?, ? + 1, ?)"
                    " ON CONFLICT (shard) DO UPDATE SET epoch = max(epoch, ?) + 1, owner = excluded.owner",
                    (shard, floor, member_id, floor),
                )
                epoch = conn.execute("SELECT epoch FROM hs_shard_fence WHERE shard = ?", (shard,)).fetchone()[0]
                conn.execute(
                    "UPDATE hs_shard_lease SET owner = ?, acquired_at = ?, expires_at = ? WHERE shard = ?",
                    (member_id, now, now + ttl, shard),
                )
                conn.execute(
                    "INSERT INTO hs_ownership_log VALUES (?, ?, ?, 'acquire', ?)", (shard, epoch, member_id, now)
                )
                taken[shard] = epoch
            if taken:
                self._trim_log(conn)
            return taken

        out = await self._call(run, "claim")
        assert isinstance(out, dict)  # noqa: S101 - run returns one
        return out

    @staticmethod
    def _trim_log(conn: sqlite3.Connection) -> None:
        conn.execute(
            "DELETE FROM hs_ownership_log WHERE rowid <= (SELECT max(rowid) FROM hs_ownership_log) - ?", (_LOG_KEEP,)
        )

    async def release(self, member_id: str, shards: Collection[int]) -> None:
        """Give up ``shards`` that ``member_id`` holds: claimable at once."""
        wanted = list(shards)

        def run(conn: sqlite3.Connection) -> None:
            now = self._now()
            for shard in wanted:
                released = conn.execute(
                    "UPDATE hs_shard_lease SET owner = NULL, expires_at = ? WHERE shard = ? AND owner = ?",
                    (now, shard, member_id),
                ).rowcount
                if released:
                    row = conn.execute("SELECT epoch FROM hs_shard_fence WHERE shard = ?", (shard,)).fetchone()
                    conn.execute(
                        "INSERT INTO hs_ownership_log VALUES (?, ?, ?, 'release', ?)",
                        (shard, 0 if row is None else row[0], member_id, now),
                    )

        await self._call(run, "release")

    async def leave(self, member_id: str) -> None:
        """Release every shard of ``member_id`` and remove it."""
        await self.release(member_id, range(self.shards))

        def run(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM hs_members WHERE member_id = ?", (member_id,))

        await self._call(run, "leave")

    async def leases(self) -> tuple[ShardLease, ...]:
        """The shard map."""
        out = await self._call(self._read_leases, "read the shard map", write=False)
        assert isinstance(out, tuple)  # noqa: S101
        return out

    async def members(self) -> tuple[MemberInfo, ...]:
        """Every recorded member."""

        def run(conn: sqlite3.Connection) -> tuple[MemberInfo, ...]:
            return tuple(MemberInfo(*m) for m in conn.execute("SELECT * FROM hs_members").fetchall())

        out = await self._call(run, "read the members", write=False)
        assert isinstance(out, tuple)  # noqa: S101
        return out

    async def ownership_log(self, shard: int | None = None) -> list[tuple[int, int, str, str, float]]:
        """The ownership log, oldest first: ``(shard, epoch, owner, event, at)`` (acquire, release)."""

        def run(conn: sqlite3.Connection) -> list[tuple[int, int, str, str, float]]:
            if shard is None:
                return conn.execute("SELECT * FROM hs_ownership_log ORDER BY rowid").fetchall()
            return conn.execute("SELECT * FROM hs_ownership_log WHERE shard = ? ORDER BY rowid", (shard,)).fetchall()

        out = await self._call(run, "read the ownership log", write=False)
        assert isinstance(out, list)  # noqa: S101
        return out

    async def post(self, shard: int, run_id: str, kind: str, body: bytes) -> int:
        """Append a forwarded call to ``shard``'s inbox; committed (durable) when this returns.

        The number is taken inside the writer's transaction (``BEGIN IMMEDIATE``
        serializes writers), so within a shard numbers commit in order.
        """

        def run(conn: sqlite3.Connection) -> int:
            row = conn.execute("SELECT max(seq) FROM hs_inbox WHERE shard = ?", (shard,)).fetchone()
            seq = (row[0] or 0) + 1
            conn.execute(
                "INSERT INTO hs_inbox VALUES (?, ?, ?, ?, ?, ?, NULL)", (shard, seq, run_id, kind, body, self._now())
            )
            return seq

        out = await self._call(run, "post to the inbox")
        assert isinstance(out, int)  # noqa: S101
        return out

    async def pending(self, shards: Collection[int], limit: int) -> list[InboxEntry]:
        """Entries of ``shards`` without a verdict, oldest first per shard."""
        wanted = sorted(shards)
        if not wanted:
            return []

        def run(conn: sqlite3.Connection) -> list[InboxEntry]:
            marks = ",".join("?" * len(wanted))
            rows = conn.execute(
                f"SELECT * FROM hs_inbox WHERE verdict IS NULL AND shard IN ({marks}) ORDER BY shard, seq LIMIT ?",  # noqa: S608 - placeholders only
                [*wanted, limit],
            ).fetchall()
            return [InboxEntry(*r) for r in rows]

        out = await self._call(run, "read the inbox", write=False)
        assert isinstance(out, list)  # noqa: S101
        return out

    async def settle(self, member_id: str, epochs: Mapping[int, int], verdicts: Sequence[tuple[int, int, str]]) -> int:
        """Record verdicts of applied entries, only while ``member_id`` holds their shard at ``epochs``."""

        def run(conn: sqlite3.Connection) -> int:
            recorded = 0
            for shard, seq, verdict in verdicts:
                recorded += conn.execute(
                    "UPDATE hs_inbox SET verdict = ? WHERE shard = ? AND seq = ? AND verdict IS NULL"
                    " AND EXISTS (SELECT 1 FROM hs_shard_fence f WHERE f.shard = ? AND f.epoch = ? AND f.owner = ?)",
                    (verdict, shard, seq, shard, epochs.get(shard, -1), member_id),
                ).rowcount
            return recorded

        out = await self._call(run, "settle inbox entries")
        assert isinstance(out, int)  # noqa: S101
        return out

    async def verdict(self, shard: int, seq: int) -> str | None:
        """The entry's verdict, or None while it waits."""

        def run(conn: sqlite3.Connection) -> str | None:
            row = conn.execute("SELECT verdict FROM hs_inbox WHERE shard = ? AND seq = ?", (shard, seq)).fetchone()
            return None if row is None else row[0]

        out = await self._call(run, "read a verdict", write=False)
        assert out is None or isinstance(out, str)  # noqa: S101
        return out

    async def prune(self, age: float) -> int:
        """Delete settled entries older than ``age`` seconds; the newest entry of each shard stays (its number)."""

        def run(conn: sqlite3.Connection) -> int:
            return conn.execute(
                "DELETE FROM hs_inbox WHERE verdict IS NOT NULL AND created_at < ?"
                " AND seq < (SELECT max(seq) FROM hs_inbox i WHERE i.shard = hs_inbox.shard)",
                (self._now() - age,),
            ).rowcount

        out = await self._call(run, "prune the inbox")
        assert isinstance(out, int)  # noqa: S101
        return out


def read_shard_map(path: str | Path) -> tuple[tuple[ShardLease, ...], tuple[MemberInfo, ...], float] | None:
    """The shard map, members and the authority's time now, read only from an SQLite file (None: no authority).

    ``path`` is a tier's database (its ``authority_path`` is read when it
    exists) or an authority's own file. For tools (``hotstate runs shards``):
    it opens the file read-only and writes nothing. Lease times are on the
    clock recorded in the file (``host_clock``).
    """
    beside = Path(authority_path(path))
    if beside.is_file():  # the default authority of this tier's file
        path = beside
    uri = Path(path).absolute().as_uri() + "?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True)
    except sqlite3.Error as exc:
        raise PersistenceError(f"sqlite:{path}", f"cannot read the shard map: {exc}") from exc
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not {"hs_shard_lease", "hs_members", "hs_meta"} <= tables:
            return None
        leases = SQLiteAuthority._read_leases(conn)
        members = tuple(MemberInfo(*m) for m in conn.execute("SELECT * FROM hs_members").fetchall())
        recorded = conn.execute("SELECT value FROM hs_meta WHERE key = 'clock'").fetchone()
    except sqlite3.Error as exc:
        raise PersistenceError(f"sqlite:{path}", f"cannot read the shard map: {exc}") from exc
    finally:
        conn.close()
    now_fn, name = host_clock()
    if recorded is not None and recorded[0] != name:
        now_fn = time.time if recorded[0] != "wall" else now_fn
        if recorded[0].startswith("boottime:"):
            return leases, members, math.inf  # measured before a reboot: every lease has ended
    return leases, members, now_fn()
