"""``PostgresAuthority``: shard leases and epochs in PostgreSQL, for processes on several machines (#13).

design/ownership.md §4.3 in PostgreSQL: ``hs_shard_lease`` (renewed often)
and ``hs_shard_fence`` (changed only by a claim) are separate tables, so a
renewal never waits behind a flush's shared lock on a fence row. Claims take
``FOR UPDATE SKIP LOCKED`` on the lease rows they want and bump the epoch in
the same transaction; renewal is one ``UPDATE`` per process. Times are the
database's (``clock_timestamp()``), never a process's, unless a test injects
a clock. No advisory locks (session-bound, lost behind poolers, no token).
The inbox takes each shard's next number from a counter row locked until
commit, so within a shard entries commit in number order.

It is exactly as linearizable as the PostgreSQL deployment: a single
primary, or synchronous replication, is safe; an asynchronous failover can
lose a committed epoch bump (the stores' fences then keep the first writer
of that epoch, DESIGN.md "Several processes").
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final, final

import asyncpg

from hotstate._errors import ConfigError, PersistenceError, StoreUnavailableError
from hotstate.persistence._authority import InboxEntry, MemberInfo, Renewal, ShardLease, process_gone
from hotstate.persistence._postgres_common import (
    check_schema,
    create_schema,
    postgres_error,
    recorded_shards,
    session_settings,
)
from hotstate.persistence._shards import DEFAULT_SHARDS, check_shards

if TYPE_CHECKING:
    from collections.abc import Callable, Collection, Mapping, Sequence

__all__ = ["PostgresAuthority", "read_postgres_shard_map"]

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS hs_meta (key text PRIMARY KEY, value text NOT NULL);
CREATE TABLE IF NOT EXISTS hs_shard_fence (shard integer PRIMARY KEY, epoch bigint NOT NULL, owner text NOT NULL);
CREATE TABLE IF NOT EXISTS hs_shard_lease (
    shard integer PRIMARY KEY, owner text, acquired_at float8 NOT NULL, expires_at float8 NOT NULL
);
CREATE INDEX IF NOT EXISTS hs_shard_lease_owner ON hs_shard_lease (owner);
CREATE TABLE IF NOT EXISTS hs_members (
    member_id text PRIMARY KEY, host text NOT NULL, pid integer NOT NULL, started text NOT NULL,
    name text NOT NULL, joined_at float8 NOT NULL, last_seen float8 NOT NULL
);
CREATE TABLE IF NOT EXISTS hs_ownership_log (
    shard integer NOT NULL, epoch bigint NOT NULL, owner text NOT NULL, event text NOT NULL, at float8 NOT NULL
);
CREATE TABLE IF NOT EXISTS hs_inbox_seq (shard integer PRIMARY KEY, next bigint NOT NULL);
CREATE TABLE IF NOT EXISTS hs_inbox (
    shard integer NOT NULL, seq bigint NOT NULL, run_id text NOT NULL, kind text NOT NULL, body bytea NOT NULL,
    created_at float8 NOT NULL, verdict text, PRIMARY KEY (shard, seq)
);
"""

# The time of a statement: the injected clock's ($n, a test) or the database's.
_NOW: Final = "coalesce({}::float8, extract(epoch from clock_timestamp())::float8)"
# The columns a row is read by, in the record's field order: never `SELECT *`, so a column
# added to a table (a later release's migration, an operator) cannot shift or break a record.
_MEMBER: Final = ", ".join(MemberInfo._fields)
_ENTRY: Final = ", ".join(InboxEntry._fields)
_GONE: Final = (asyncpg.exceptions.UndefinedTableError, asyncpg.exceptions.InvalidSchemaNameError)
_FAILURES: Final = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)


@final
class PostgresAuthority:
    """Shard leases, epochs and the inbox in PostgreSQL (asyncpg), for processes on several machines.

    Args:
        url: the server, e.g. ``postgresql://user@host:5432/db``.
        schema: the schema holding the tables (created when missing).
        shards: the shard count; None takes the recorded one (or
            ``DEFAULT_SHARDS`` for a new schema). Another count than the
            recorded one is a ``ConfigError`` at ``open``.
        clock: the authority's time (default: the database's
            ``clock_timestamp()``); tests inject one.
        gone: how a member is judged gone at a claim (default ``process_gone``).
        timeout: seconds a statement may take.
        statement_cache_size: asyncpg's prepared statement cache per
            connection (0 behind PgBouncer in transaction mode).
        server_settings: the settings each session starts with (None: the
            server ends a session idle inside a transaction for ``timeout / 2``,
            so a claimer partitioned mid-claim never holds lease rows for long;
            ``{}`` behind PgBouncer).
    """

    def __init__(
        self,
        url: str,
        *,
        schema: str = "hotstate",
        shards: int | None = None,
        clock: Callable[[], float] | None = None,
        gone: Callable[[MemberInfo], bool] | None = None,
        timeout: float = 10.0,
        statement_cache_size: int = 100,
        server_settings: Mapping[str, str] | None = None,
    ) -> None:
        self.url = url
        self.schema = check_schema("PostgresAuthority.schema", schema)
        self._asked = None if shards is None else check_shards("PostgresAuthority.shards", shards)
        self.shards = DEFAULT_SHARDS if self._asked is None else self._asked
        self.name = f"postgres:{schema}"
        self._clock = clock
        self._gone = gone if gone is not None else process_gone
        self._timeout = timeout
        self._cache = statement_cache_size
        self._settings = session_settings(timeout, server_settings)
        self._search_path = f'SET LOCAL search_path TO "{self.schema}"'
        self._tables_lost = False
        self._pool: asyncpg.Pool | None = None

    def __repr__(self) -> str:
        return f"<PostgresAuthority schema={self.schema!r} shards={self.shards}>"

    def _now(self) -> float | None:
        return None if self._clock is None else self._clock()

    def _p(self) -> asyncpg.Pool:
        pool = self._pool
        if pool is None:
            raise PersistenceError(self.name, "the authority is not open")
        return pool

    async def _tx(self, what: str, fn: Callable[[Any], Any]) -> Any:
        """Run ``fn(conn)`` in one transaction; a lost server is ``StoreUnavailableError``."""
        pool = self._p()
        try:
            if self._tables_lost:
                async with pool.acquire() as conn:
                    await create_schema(conn, self.schema, _SCHEMA, self._record_shards)
                self._tables_lost = False
            async with pool.acquire() as conn, conn.transaction():
                # Per transaction: a pooler in transaction mode does not keep a session's settings.
                await conn.execute(self._search_path)
                return await fn(conn)
        except _GONE as exc:
            # The database lost the tables (a server made again empty, a dropped schema): they
            # are made again at the next call. Every lease and epoch went with them; a store
            # whose fences survived refuses the seal of each claim below its fence, and the
            # claimer gives the lease back, so the shard stays unowned (never doubly owned)
            # until its epoch, one more per claim, passes the store's fence.
            self._tables_lost = True
            raise StoreUnavailableError(
                self.name, f"{what}: the tables are gone ({exc}); made again at the next call"
            ) from exc
        except _FAILURES as exc:
            raise postgres_error(self.name, what, exc) from exc

    async def open(self) -> None:
        """Connect, create the schema and tables, record (or check) the shard count. Idempotent."""
        if self._pool is not None:
            return
        try:
            first = await asyncpg.connect(
                self.url, timeout=self._timeout, command_timeout=self._timeout, statement_cache_size=self._cache
            )
            try:
                await create_schema(first, self.schema, _SCHEMA, self._record_shards)
            finally:
                await first.close()
            self._pool = await asyncpg.create_pool(
                self.url,
                min_size=1,
                max_size=4,
                timeout=self._timeout,
                command_timeout=self._timeout,
                statement_cache_size=self._cache,
                server_settings=self._settings,
            )
        except _FAILURES as exc:
            raise postgres_error(self.name, "open", exc) from exc

    async def _record_shards(self, conn: Any) -> None:
        await conn.execute("LOCK TABLE hs_meta IN SHARE ROW EXCLUSIVE MODE")  # two first opens at once
        row = await conn.fetchrow("SELECT value FROM hs_meta WHERE key = 'shards'")
        if row is None:
            await conn.execute("INSERT INTO hs_meta (key, value) VALUES ('shards', $1)", str(self.shards))
        else:
            recorded = recorded_shards(self.name, row["value"])
            if self._asked is not None and recorded != self._asked:
                raise ConfigError(
                    "PostgresAuthority.shards",
                    self._asked,
                    f"schema {self.schema!r} records {recorded} shards; a process with another count"
                    " would place runs in other shards than the others do",
                )
            self.shards = recorded
        await conn.execute(
            "INSERT INTO hs_shard_lease (shard, owner, acquired_at, expires_at)"
            " SELECT s, NULL, 0, 0 FROM generate_series(0, $1 - 1) AS s ON CONFLICT DO NOTHING",
            self.shards,
        )

    async def aclose(self) -> None:
        """Close the pool (idempotent)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    async def join(self, member: MemberInfo) -> None:
        """Record ``member`` as live."""
        now = self._now()

        async def run(c: Any) -> None:
            await c.execute(
                f"INSERT INTO hs_members VALUES ($1, $2, $3, $4, $5, {_NOW.format('$6')}, {_NOW.format('$6')})"
                " ON CONFLICT (member_id) DO UPDATE SET last_seen = excluded.last_seen",
                member.member_id, member.host, member.pid, member.started, member.name, now,
            )  # fmt: skip

        await self._tx("join", run)

    @staticmethod
    async def _read_leases(c: Any) -> tuple[ShardLease, ...]:
        rows = await c.fetch(
            "SELECT l.shard, l.owner, coalesce(f.epoch, 0) AS epoch, l.expires_at, l.acquired_at"
            " FROM hs_shard_lease l LEFT JOIN hs_shard_fence f ON f.shard = l.shard ORDER BY l.shard"
        )
        return tuple(ShardLease(r["shard"], r["owner"], r["epoch"], r["expires_at"], r["acquired_at"]) for r in rows)

    async def renew(self, member_id: str, ttl: float) -> Renewal:
        """Extend every lease of ``member_id`` in one statement; read the map and live members."""
        given = self._now()

        async def run(c: Any) -> Renewal:
            now = await c.fetchval(f"SELECT {_NOW.format('$1')}", given)
            held = await c.fetch(
                "UPDATE hs_shard_lease SET expires_at = $1::float8 + $2::float8 WHERE owner = $3 AND expires_at > $1::float8"
                " RETURNING shard",
                now, ttl, member_id,
            )  # fmt: skip
            await c.execute("UPDATE hs_members SET last_seen = $1 WHERE member_id = $2", now, member_id)
            members = await c.fetch(f"SELECT {_MEMBER} FROM hs_members WHERE last_seen > $1::float8", now - ttl)
            return Renewal(
                frozenset(r["shard"] for r in held),
                await self._read_leases(c),
                tuple(MemberInfo(*m) for m in members),
                now,
            )

        out: Renewal = await self._tx("renew", run)
        return out

    async def claim(
        self, member_id: str, shards: Sequence[int], ttl: float, *, floors: Mapping[int, int] | None = None
    ) -> dict[int, int]:
        """Take each claimable shard of ``shards`` (``FOR UPDATE SKIP LOCKED``); bump its epoch (past ``floors``) in the same transaction."""
        floors = floors or {}
        wanted = list(shards)
        for s in wanted:
            if type(s) is not int or not 0 <= s < self.shards:
                raise ConfigError("claim.shards", s, f"must be a shard from 0 to {self.shards - 1}")
        given = self._now()

        async def run(c: Any) -> dict[int, int]:
            now = await c.fetchval(f"SELECT {_NOW.format('$1')}", given)
            rows = await c.fetch(
                "SELECT shard, owner, expires_at FROM hs_shard_lease WHERE shard = ANY($1::int[])"
                " ORDER BY shard FOR UPDATE SKIP LOCKED",
                wanted,
            )
            taken: dict[int, int] = {}
            for r in rows:
                owner, shard = r["owner"], r["shard"]
                if owner is not None and r["expires_at"] > now:
                    if owner == member_id:
                        continue
                    m = await c.fetchrow(f"SELECT {_MEMBER} FROM hs_members WHERE member_id = $1", owner)
                    if m is None or not self._gone(MemberInfo(*m)):
                        continue
                epoch = await c.fetchval(
                    "INSERT INTO hs_shard_fence (shard, epoch, owner) VALUES ($1, $3::int8 + 1, $2) ON CONFLICT (shard)"
                    " DO UPDATE SET epoch = greatest(hs_shard_fence.epoch, $3::int8) + 1, owner = excluded.owner"
                    " RETURNING epoch",
                    shard, member_id, int(floors.get(shard, 0)),
                )  # fmt: skip
                await c.execute(
                    "UPDATE hs_shard_lease SET owner = $1, acquired_at = $2::float8, expires_at = $2::float8 + $3::float8"
                    " WHERE shard = $4",
                    member_id, now, ttl, shard,
                )  # fmt: skip
                await c.execute(
                    "INSERT INTO hs_ownership_log VALUES ($1, $2, $3, 'acquire', $4)", shard, epoch, member_id, now
                )
                taken[shard] = epoch
            return taken

        out: dict[int, int] = await self._tx("claim", run)
        return out

    async def release(self, member_id: str, shards: Collection[int]) -> None:
        """Give up ``shards`` that ``member_id`` holds: claimable at once."""
        wanted = list(shards)
        given = self._now()

        async def run(c: Any) -> None:
            now = await c.fetchval(f"SELECT {_NOW.format('$1')}", given)
            rows = await c.fetch(
                "UPDATE hs_shard_lease SET owner = NULL, expires_at = $1 WHERE shard = ANY($2::int[]) AND owner = $3"
                " RETURNING shard",
                now, wanted, member_id,
            )  # fmt: skip
            for r in rows:
                await c.execute(
                    "INSERT INTO hs_ownership_log SELECT $1, coalesce((SELECT epoch FROM hs_shard_fence"
                    " WHERE shard = $1), 0), $2, 'release', $3",
                    r["shard"], member_id, now,
                )  # fmt: skip

        await self._tx("release", run)

    async def leave(self, member_id: str) -> None:
        """Release every shard of ``member_id`` and remove it."""
        await self.release(member_id, range(self.shards))
        await self._tx("leave", lambda c: c.execute("DELETE FROM hs_members WHERE member_id = $1", member_id))

    async def leases(self) -> tuple[ShardLease, ...]:
        """The shard map."""
        out: tuple[ShardLease, ...] = await self._tx("read the shard map", self._read_leases)
        return out

    async def members(self) -> tuple[MemberInfo, ...]:
        """Every recorded member."""

        async def run(c: Any) -> tuple[MemberInfo, ...]:
            return tuple(MemberInfo(*m) for m in await c.fetch(f"SELECT {_MEMBER} FROM hs_members"))

        out: tuple[MemberInfo, ...] = await self._tx("read the members", run)
        return out

    async def post(self, shard: int, run_id: str, kind: str, body: bytes) -> int:
        """Append a forwarded call to ``shard``'s inbox; committed when this returns. Returns its number.

        The number comes from the shard's counter row, locked until commit, so
        within a shard entries commit in number order (a sequence would not
        guarantee that: a lower number can commit after a higher one).
        """
        given = self._now()

        async def run(c: Any) -> int:
            seq: int = await c.fetchval(
                "INSERT INTO hs_inbox_seq (shard, next) VALUES ($1, 1) ON CONFLICT (shard)"
                " DO UPDATE SET next = hs_inbox_seq.next + 1 RETURNING next",
                shard,
            )
            await c.execute(
                f"INSERT INTO hs_inbox VALUES ($1, $2, $3, $4, $5, {_NOW.format('$6')}, NULL)",
                shard, seq, run_id, kind, bytes(body), given,
            )  # fmt: skip
            return seq

        out: int = await self._tx("post to the inbox", run)
        return out

    async def pending(self, shards: Collection[int], limit: int) -> list[InboxEntry]:
        """Entries of ``shards`` without a verdict, oldest first per shard."""
        wanted = sorted(shards)
        if not wanted:
            return []

        async def run(c: Any) -> list[InboxEntry]:
            rows = await c.fetch(
                f"SELECT {_ENTRY} FROM hs_inbox WHERE verdict IS NULL AND shard = ANY($1::int[]) ORDER BY shard, seq LIMIT $2",
                wanted,
                limit,
            )
            return [InboxEntry(*r) for r in rows]

        out: list[InboxEntry] = await self._tx("read the inbox", run)
        return out

    async def settle(self, member_id: str, epochs: Mapping[int, int], verdicts: Sequence[tuple[int, int, str]]) -> int:
        """Record verdicts of applied entries, only while ``member_id`` holds their shard at ``epochs``."""

        async def run(c: Any) -> int:
            recorded = 0
            for shard, seq, verdict in verdicts:
                status = await c.execute(
                    "UPDATE hs_inbox SET verdict = $1 WHERE shard = $2 AND seq = $3 AND verdict IS NULL"
                    " AND EXISTS (SELECT 1 FROM hs_shard_fence f WHERE f.shard = $2 AND f.epoch = $4 AND f.owner = $5)",
                    verdict, shard, seq, epochs.get(shard, -1), member_id,
                )  # fmt: skip
                recorded += int(str(status).rsplit(" ", 1)[-1])
            return recorded

        out: int = await self._tx("settle inbox entries", run)
        return out

    async def verdict(self, shard: int, seq: int) -> str | None:
        """The entry's verdict, or None while it waits."""

        async def run(c: Any) -> str | None:
            value: str | None = await c.fetchval(
                "SELECT verdict FROM hs_inbox WHERE shard = $1 AND seq = $2", shard, seq
            )
            return value

        out: str | None = await self._tx("read a verdict", run)
        return out

    async def prune(self, age: float) -> int:
        """Delete settled entries older than ``age`` seconds (numbers are never reused: the counter row keeps them)."""
        given = self._now()

        async def run(c: Any) -> int:
            status = await c.execute(
                f"DELETE FROM hs_inbox WHERE verdict IS NOT NULL AND created_at < {_NOW.format('$1')} - $2::float8",
                given,
                age,
            )
            return int(str(status).rsplit(" ", 1)[-1])

        out: int = await self._tx("prune the inbox", run)
        return out


async def read_postgres_shard_map(
    url: str, schema: str = "hotstate", *, connect_timeout: float = 10.0
) -> tuple[tuple[ShardLease, ...], tuple[MemberInfo, ...], float] | None:
    """The shard map, members and the database's time now, read in one read-only transaction (None: no authority).

    For tools (``hotstate runs --postgres URL shards``): it writes nothing and
    creates nothing. Lease times are on the database's clock, as the
    authority's are.

    Raises:
        StoreUnavailableError: the server cannot be reached.
        PersistenceError: the server refused the read.
    """
    name = f"postgres:{check_schema('schema', schema)}"
    try:
        conn = await asyncpg.connect(url, timeout=connect_timeout, command_timeout=connect_timeout)
        try:
            if await conn.fetchval("SELECT to_regclass($1)", f'"{schema}".hs_shard_lease') is None:
                return None
            async with conn.transaction(readonly=True, isolation="repeatable_read"):
                await conn.execute(f'SET LOCAL search_path TO "{schema}"')
                leases = await PostgresAuthority._read_leases(conn)
                members = tuple(MemberInfo(*m) for m in await conn.fetch(f"SELECT {_MEMBER} FROM hs_members"))
                now: float = await conn.fetchval(f"SELECT {_NOW.format('NULL')}")
        finally:
            await conn.close()
    except _FAILURES as exc:
        raise postgres_error(name, "read the shard map", exc) from exc
    return leases, members, now
