r"""``PostgresStore``: the PostgreSQL tier (asyncpg), for runs kept across machines (#13).

The tables (in one schema, ``hotstate`` by default, which the PostgreSQL
lease authority may share: their table names differ, and both record the
shard count in ``hs_meta``):

- ``hs_runs``: one row a run: the header as columns (``run_id``, ``workflow``,
  ``status``... ``epoch``), ``error`` as text, ``body`` as ``bytea``, and the
  ``shard``; indexes on ``(status, run_id)``, ``(workflow, run_id)`` and
  ``(shard, run_id)``, so a scan pages headers without reading a body;
- ``hs_transitions``: the history, keyed ``(run_id, version)``;
- ``hs_versions``: kept copies, keyed ``(run_id, version)``;
- ``hs_dead_letters``: one record a run;
- ``hs_writer_marks``: each open store's mark (``Store.save``'s ``reset``: a
  database restored from a backup, or a failover to a replica that had not
  received the newest commits, is noticed);
- ``hs_store_fence``: each shard's fence (``Store.seal``), one row a shard
  made at the first ``open``, so a flush can lock the rows it needs.

A ``save`` is one transaction: with a fence, ``SELECT ... FOR SHARE`` of its
shards' fence rows (a seal's ``UPDATE`` of a row waits for the flushes
holding it, and no flush under an older epoch commits after the seal);
then one statement whose data-modifying CTEs advance the writer's mark,
upsert the snapshots and insert the transitions, each batch sent as arrays
(``unnest``), so a flush is a few round trips whatever its size.

Text columns are ``COLLATE "C"`` (run ids order by their UTF-8 bytes, as in
the other stores). PostgreSQL text cannot hold U+0000, which a run id or a
detail may carry: text holding U+0000 or U+0001 is stored with U+0001 as an
escape (``\x01\x01`` is U+0000, ``\x01\x02`` is U+0001). That keeps the
order and equality of every value, and leaves all other text as it is for
SQL queries.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import sys
import time
from typing import TYPE_CHECKING, Any, cast, final

import asyncpg

from hotstate._errors import (
    CodecError,
    ConfigError,
    HotstateInternalError,
    PersistenceError,
    StoreUnavailableError,
)
from hotstate.persistence._postgres_common import (
    check_schema,
    create_schema,
    postgres_error,
    recorded_shards,
    session_settings,
)
from hotstate.persistence._postgres_rows import (
    _ADVANCE_MARK,
    _CONFLICTS,
    _DEAD_LETTER_COLUMNS,
    _GONE,
    _HEADER_COLUMNS,
    _KEEP_VERSIONS,
    _MAKE_FENCES,
    _RAISE_FENCES,
    _READ_FENCES,
    _ROW_REFUSED,
    _RUN_COLUMNS,
    _SAVE,
    _SAVE_DEAD_LETTERS,
    _SAVE_TRANSITIONS,
    _SCHEMA,
    _escape_column,
    _header,
    _malformed,
    _MalformedError,
    _newest,
    _parts,
    _rejects,
    _shown,
    _snapshot_columns,
    _stored,
    _too_long,
    _transition_columns,
    _unescape,
    _unescape_opt,
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
    MARK_TTL,
    StoreBase,
    WriterMark,
    bad_row,
    check_limit,
    dead_letter_problem,
    read_on,
    status_filter,
    without,
)

if sys.version_info >= (3, 12):
    from typing import override
else:
    from typing_extensions import override

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Collection, Iterable, Mapping, Sequence

    from hotstate.actors._snapshot import Transition
    from hotstate.persistence._postgres_authority import PostgresAuthority
    from hotstate.persistence._records import BadRow
    from hotstate.persistence._shards import Fence

__all__ = ["PostgresStore"]


@final
class PostgresStore(StoreBase):
    """A Store in a PostgreSQL database (asyncpg), shared by processes on several machines.

    Needs PostgreSQL 13 or later. A connection pool serves reads; writes go
    one at a time (a store object is one writer). Rows and indexes are in
    the module docstring of ``hotstate.persistence._postgres``; every header
    field is a column, for queries of your own (``SELECT status, count(*)
    FROM hotstate.hs_runs GROUP BY status``).

    Behind PgBouncer in transaction mode, pass ``statement_cache_size=0``
    (asyncpg's prepared statements do not survive a pooler's reassignment).

    Args:
        url: the database, e.g. ``postgresql://user:pass@host:5432/db``.
        schema: the schema holding the tables (created when missing).
        tier: the tier's name.
        shards: the shard count. None: the count the schema records (``hs_meta``),
            or ``DEFAULT_SHARDS`` for a new schema. Another count than the
            recorded one is refused at ``open``.
        pool_size: the most connections the store opens.
        timeout: seconds to connect, and seconds a statement may take.
        read_only: never write (for inspection tools): ``open`` creates
            nothing and writes no mark, and every write raises ``PersistenceError``.
        statement_cache_size: asyncpg's prepared statement cache per connection.
        server_settings: the settings each session starts with (None: the
            server ends a session idle inside a transaction for ``timeout / 2``,
            so a process partitioned mid-flush never holds the shard's fence
            rows for long; ``{}`` behind PgBouncer, see ``session_settings``).
        create: make the schema and tables when missing. False (tools
            that write, such as ``hotstate runs retry``): ``open`` refuses a
            schema that holds no hotstate tables, so a mistyped name creates nothing.

    Raises:
        ConfigError: ``schema``, ``shards``, ``pool_size`` or ``timeout`` is invalid.
    """

    def __init__(
        self,
        url: str,
        *,
        schema: str = "hotstate",
        tier: str = "postgres",
        shards: int | None = None,
        pool_size: int = 4,
        timeout: float = 10.0,
        read_only: bool = False,
        statement_cache_size: int = 100,
        create: bool = True,
        server_settings: Mapping[str, str] | None = None,
    ) -> None:
        self.schema = check_schema("PostgresStore.schema", schema)
        self.create = create
        self._shards_given = None if shards is None else check_shards("PostgresStore.shards", shards)
        self.shards = DEFAULT_SHARDS if shards is None else shards
        if type(pool_size) is not int or pool_size < 1:
            raise ConfigError("PostgresStore.pool_size", pool_size, "must be an int >= 1")
        given: object = timeout  # callers may ignore the type hints
        if not (isinstance(given, int | float) and math.isfinite(given) and given > 0):
            raise ConfigError("PostgresStore.timeout", timeout, "must be a positive number of seconds")
        self.url = url
        self.tier = tier
        self.read_only = read_only
        self.pool_size = pool_size
        self.timeout = float(timeout)
        self._cache = statement_cache_size
        self._settings = session_settings(self.timeout, server_settings)
        self._pool: asyncpg.Pool | None = None
        self._mark = WriterMark()
        self._write_lock = asyncio.Lock()
        self._schema_lost = False
        q = f'"{self.schema}"'
        self._sql: dict[str, str] = {
            name: text.replace("{s}", q)
            for name, text in (
                ("save", _SAVE),
                ("save_transitions", _SAVE_TRANSITIONS),
                ("conflicts", _CONFLICTS),
                ("read_fences", _READ_FENCES.replace("{lock}", "SHARE")),
                ("lock_fences", _READ_FENCES.replace("{lock}", "UPDATE")),
                ("raise_fences", _RAISE_FENCES),
                ("make_fences", _MAKE_FENCES),
                ("keep_versions", _KEEP_VERSIONS),
                ("save_dead_letters", _SAVE_DEAD_LETTERS),
                ("mark", _ADVANCE_MARK),
            )
        }
        self._t = q  # the quoted schema, for the statements built per call

    def __repr__(self) -> str:
        return f"PostgresStore(schema={self.schema!r}, tier={self.tier!r})"

    def table(self, name: str) -> str:
        """A table's qualified name, quoted: ``table("hs_runs")`` is ``"hotstate".hs_runs`` (for tools and tests)."""
        return f"{self._t}.{check_schema('table', name)}"

    def default_authority(self, shards: int | None = None) -> PostgresAuthority:
        """The lease authority of a runtime whose durable tier is this store: the same database and schema.

        As linearizable as the PostgreSQL deployment (a single primary, or
        synchronous replication, is safe; see ``PostgresAuthority``).
        """
        from hotstate.persistence._postgres_authority import PostgresAuthority

        return PostgresAuthority(
            self.url,
            schema=self.schema,
            shards=shards,
            timeout=self.timeout,
            statement_cache_size=self._cache,
            server_settings=self._settings,
        )

    # --- connections -------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _errors(self, action: str) -> AsyncIterator[None]:
        try:
            yield
        except _GONE as exc:
            if self.read_only or action == "open":
                raise postgres_error(self.tier, action, exc) from exc
            # The database lost the tables under the open store (a server restored or
            # made again empty): the next call makes them again, and its save finds
            # this writer's mark gone (reset).
            self._schema_lost = True
            raise StoreUnavailableError(
                self.tier, f"{action}: the tables are gone ({exc}); they are made again at the next call"
            ) from exc
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
            raise postgres_error(self.tier, action, exc) from exc

    async def _remake(self, pool: asyncpg.Pool) -> None:
        """Make the tables again when a call found them gone (see ``_errors``)."""
        if self._schema_lost:
            async with self._errors("make the tables again"), pool.acquire() as conn:
                await create_schema(conn, self.schema, _SCHEMA.replace("{s}", self._t), self._record_again)
            self._schema_lost = False

    async def _record_again(self, conn: Any) -> None:
        """``_record_shards``, and every writer's mark dropped: a table was lost, so every writer must hear of it.

        Marks kept beside a dropped table would say nothing was lost; without
        them each writer's next save reports the reset and writes what it holds.
        """
        await self._record_shards(conn)
        await conn.execute(f"DELETE FROM {self._t}.hs_writer_marks")

    def _p(self) -> asyncpg.Pool:
        self._check_open()
        if self._pool is None:  # pragma: no cover - open() sets it
            raise HotstateInternalError("PostgresStore is open without a pool")
        return self._pool

    def _w(self, action: str) -> asyncpg.Pool:
        if self.read_only:
            raise PersistenceError(self.tier, f"{action}: this store was opened read-only")
        return self._p()

    @contextlib.asynccontextmanager
    async def _transaction(self, action: str) -> AsyncIterator[Any]:
        """One write transaction on a pooled connection, one at a time per store."""
        pool = self._w(action)
        async with self._write_lock:
            await self._remake(pool)
            async with self._errors(action), pool.acquire() as conn, conn.transaction():
                yield conn

    @override
    async def open(self) -> None:
        """Connect; create the schema and tables, record (or check) the shard count, write this writer's mark.

        Raises:
            StoreUnavailableError: the server cannot be reached.
            ConfigError: ``shards`` differs from the count the schema records.
            PersistenceError: read-only (or ``create=False``), and the schema holds no hotstate tables.
        """
        if self._opened:
            return
        async with self._errors("open"):
            pool = await asyncpg.create_pool(
                self.url,
                min_size=1,
                max_size=self.pool_size,
                timeout=self.timeout,
                command_timeout=self.timeout,
                statement_cache_size=self._cache,
                server_settings=self._settings,
            )
        try:
            async with self._errors("open"), pool.acquire() as conn:
                if self.read_only or not self.create:
                    await self._read_shards(conn)
                if not self.read_only:
                    await create_schema(conn, self.schema, _SCHEMA.replace("{s}", self._t), self._record_shards)
                    self._mark = WriterMark()
                    await self._write_first_mark(conn)
        except BaseException:
            pool.terminate()
            raise
        self._pool = pool
        self._opened = True

    async def _read_shards(self, conn: Any) -> None:
        exists = await conn.fetchval("SELECT to_regclass($1)", f"{self._t}.hs_runs")
        if exists is None:
            raise PersistenceError(self.tier, f"schema {self.schema!r} holds no hotstate tables (nothing was stored)")
        recorded = await conn.fetchval(f"SELECT value FROM {self._t}.hs_meta WHERE key = 'shards'")
        if recorded is not None:
            self._check_shards(recorded_shards(self.tier, recorded))

    async def _record_shards(self, conn: Any) -> None:
        """Record the shard count (or check it), and make each shard's fence row (in ``open``'s transaction)."""
        t = self._t
        await conn.execute(f"LOCK TABLE {t}.hs_meta IN SHARE ROW EXCLUSIVE MODE")  # two first opens at once
        recorded = await conn.fetchval(f"SELECT value FROM {t}.hs_meta WHERE key = 'shards'")
        if recorded is None:
            await conn.execute(f"INSERT INTO {t}.hs_meta (key, value) VALUES ('shards', $1)", str(self.shards))
        else:
            self._check_shards(recorded_shards(self.tier, recorded))
        await conn.execute(
            f"INSERT INTO {t}.hs_store_fence (shard, epoch, owner)"
            " SELECT s, 0, '' FROM generate_series(0, $1::int4 - 1) AS s ON CONFLICT DO NOTHING",
            self.shards,
        )

    def _check_shards(self, recorded: int) -> None:
        if self._shards_given is not None and recorded != self._shards_given:
            raise ConfigError(
                "PostgresStore.shards",
                self._shards_given,
                f"schema {self.schema!r} records {recorded} shards; open it with shards={recorded} (or None),"
                " or move its runs to a new schema",
            )
        self.shards = recorded

    async def _write_first_mark(self, conn: Any) -> None:
        """Write this writer's mark now (and drop marks older than ``MARK_TTL``), as ``SQLiteStore`` does."""
        floor, seq = self._mark.next()
        now = time.time()
        async with conn.transaction():
            await conn.execute(f"DELETE FROM {self._t}.hs_writer_marks WHERE at < $1", now - MARK_TTL)
            await conn.fetchval(self._sql["mark"], self._mark.writer, seq, floor, now)
        self._mark.stored(seq)

    @override
    async def aclose(self) -> None:
        """Delete this writer's mark (when the server answers; else it goes after ``MARK_TTL``) and close the pool."""
        was_open, self._opened = self._opened, False
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            if was_open and not self.read_only:
                async with self._write_lock:
                    with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError):
                        await pool.execute(
                            f"DELETE FROM {self._t}.hs_writer_marks WHERE writer = $1",
                            self._mark.writer,
                            timeout=min(self.timeout, 2.0),
                        )
            await asyncio.wait_for(pool.close(), timeout=self.timeout)
        except (TimeoutError, OSError, asyncpg.InterfaceError):
            pool.terminate()
        except BaseException:
            pool.terminate()
            raise

    # --- writes ------------------------------------------------------------------

    async def _judge(
        self, conn: Any, fence: Fence, shards: Collection[int], *, lock: str = "read_fences"
    ) -> dict[int, int]:
        """``fence_verdict`` for each of ``shards`` under a row lock; raises the older fences. Returns the fenced shards."""
        wanted = sorted(shards)
        rows = await conn.fetch(self._sql[lock], wanted)
        if len(rows) < len(wanted):  # a row deleted by hand: make it (waiting for a racing maker), then lock it
            await conn.execute(self._sql["make_fences"], wanted)
            rows = await conn.fetch(self._sql[lock], wanted)
        stored = {r[0]: (r[1], r[2]) for r in rows if r[1] > 0}  # epoch 0: the row made at open, no fence yet
        lost, raised = judge_fences(stored, fence, shards)
        if raised:
            await conn.execute(
                self._sql["raise_fences"], [r[0] for r in raised], [r[1] for r in raised], [r[2] for r in raised]
            )
        return lost

    @override
    async def save(
        self, snapshots: Sequence[StoredSnapshot], transitions: Sequence[Transition], *, fence: Fence | None = None
    ) -> SaveResult:
        """Write the batch, and advance this writer's mark, in one transaction.

        A long history goes in transactions of its own first
        (``TRANSACTION_TRANSITIONS`` each). A batch PostgreSQL refuses for a
        run's values (text that does not encode, a number out of range, NaN,
        a value of another type than its column) is rolled back and written
        again without those runs (``SaveResult.rejected``). With ``fence``,
        every transaction reads its shards' fence rows ``FOR SHARE`` and
        raises the older ones.
        """
        self._w("save")
        added = [0]
        lost: dict[int, int] = {}
        try:
            return await self._save(snapshots, transitions, {}, added, fence, lost)
        except (PersistenceError, TypeError, ValueError, AttributeError, OverflowError) as exc:
            if isinstance(exc, PersistenceError) and (
                isinstance(exc, StoreUnavailableError) or not isinstance(exc.__cause__, _ROW_REFUSED)
            ):
                raise
            rejected = _rejects(snapshots, transitions)
            if not rejected:
                raise
        snapshots, transitions = without(rejected, snapshots, transitions)
        return await self._save(snapshots, transitions, rejected, added, fence, lost)

    async def _fenced(
        self, conn: Any, fence: Fence | None, lost: dict[int, int], run_ids: Iterable[str]
    ) -> dict[int, int]:
        """Judge the fences of these runs' shards in the open transaction; ``lost`` gathers the fenced shards."""
        if fence is None:
            return lost
        n = self.shards
        wanted = {shard_of(r, n) for r in run_ids if r.__class__ is str}  # another type: the save rejects it
        wanted.difference_update(lost)
        if wanted:
            lost.update(await self._judge(conn, fence, wanted))
        return lost

    async def _save(
        self,
        snapshots: Sequence[StoredSnapshot],
        transitions: Sequence[Transition],
        rejected: dict[str, str],
        added: list[int],
        fence: Fence | None,
        lost: dict[int, int],
    ) -> SaveResult:
        n = self.shards
        parts = _parts(transitions)
        for part in parts[:-1]:
            async with self._transaction("save") as conn:
                await self._fenced(conn, fence, lost, {t.run_id for t in part})
                if lost:
                    part = [t for t in part if shard_of(t.run_id, n) not in lost]
                if part:
                    added[0] += await conn.fetchval(self._sql["save_transitions"], *_transition_columns(part))
        part = parts[-1]
        mark = self._mark
        conflicts: dict[str, int] = {}
        async with self._transaction("save") as conn:
            floor, seq = mark.next()  # under the write lock: the floor of the save before it counts
            await self._fenced(conn, fence, lost, [*(s.header.run_id for s in snapshots), *(t.run_id for t in part)])
            if lost:
                snapshots = [s for s in snapshots if shard_of(s.header.run_id, n) not in lost]
                part = [t for t in part if shard_of(t.run_id, n) not in lost]
            newest = _newest(snapshots)
            extra = await self._rewrites(conn, snapshots) if len(newest) < len(snapshots) else 0
            row = await conn.fetchrow(
                self._sql["save"],
                mark.writer,
                seq,
                floor,
                time.time(),
                *_snapshot_columns(newest, n),
                *_transition_columns(part),
            )
            reset = row[0] > floor
            written: int = row[1]
            if written < len(newest):  # one more query, only when something was skipped
                heads = [s.header for s in newest]
                rows = await conn.fetch(
                    self._sql["conflicts"],
                    _escape_column([h.run_id for h in heads]),
                    [h.epoch for h in heads],
                    [h.version for h in heads],
                )
                conflicts = {_unescape(r[0]): r[1] for r in rows}
        mark.stored(seq)
        written += extra
        return SaveResult(
            written=written,
            stale=len(snapshots) - written,
            transitions=added[0] + row[2],
            reset=reset,
            conflicts=conflicts,
            rejected=rejected,
            fenced=dict(lost) if fence is not None else {},
        )

    async def _rewrites(self, conn: Any, snapshots: Sequence[StoredSnapshot]) -> int:
        """For runs given more than once: how many more writes than one the batch makes, in the order given.

        The upsert writes each run once, at its newest copy; the contract
        counts every copy that would replace the one before it (``written``).
        Reads the stored pairs of those runs, under a row lock, in the save's
        transaction. Rare: the persister gives each run once.
        """
        given: dict[str, list[tuple[int, int]]] = {}
        for x in snapshots:
            given.setdefault(x.header.run_id, []).append((x.header.epoch, x.header.version))
        twice = [r for r, pairs in given.items() if len(pairs) > 1]
        rows = await conn.fetch(
            f"SELECT run_id, epoch, version FROM {self._t}.hs_runs WHERE run_id = ANY($1::text[]) FOR UPDATE",
            _escape_column(list(twice)),
        )
        held: dict[str, tuple[int, int]] = {_unescape(r[0]): (r[1], r[2]) for r in rows}
        extra = 0
        for run_id in twice:
            top = held.get(run_id)
            writes = 0
            for pair in given[run_id]:
                if top is None or pair > top:
                    top, writes = pair, writes + 1
            extra += max(writes - 1, 0)
        return extra

    @override
    async def seal(self, fence: Fence) -> dict[int, int]:
        """Raise the fences in one transaction, under ``FOR UPDATE`` (it waits for flushes holding a row)."""
        if not fence.epochs:
            self._w("seal")
            return {}
        async with self._transaction("seal") as conn:
            return await self._judge(conn, fence, list(fence.epochs), lock="lock_fences")

    @override
    def _dead_letter_problem(self, record: StoredDeadLetter) -> str | None:
        """``dead_letter_problem``, and a run id too long to index."""
        return dead_letter_problem(record) or _too_long(record.run_id)

    @override
    async def _save_dead_letters(self, records: Sequence[StoredDeadLetter], fence: Fence | None) -> dict[int, int]:
        """One transaction; with ``fence``, the records' shards are judged under ``FOR SHARE``."""
        if not records:
            self._w("save_dead_letters")
            return {}
        n = self.shards
        last = list({r.run_id: r for r in records}.values())  # the last one for a run wins
        async with self._transaction("save_dead_letters") as conn:
            lost = await self._fenced(conn, fence, {}, (r.run_id for r in last))
            kept = [r for r in last if shard_of(r.run_id, n) not in lost] if lost else last
            if kept:
                await conn.execute(self._sql["save_dead_letters"], *self._dead_letter_columns(kept))
        return lost

    def _dead_letter_columns(self, records: Sequence[StoredDeadLetter]) -> list[list[Any]]:
        n = self.shards
        cols: list[list[Any]] = [[] for _ in range(15)]
        for r in records:
            s = r.snapshot
            h = s.header
            row = (
                r.run_id,
                r.workflow,
                r.at,
                r.error,
                r.attempts,
                r.compensation_errors,
                h.workflow_version,
                h.version,
                h.step,
                h.status,
                h.updated_at,
                h.attempt,
                s.error,
                bytes(s.body),
                shard_of(r.run_id, n),
            )
            for col, value in zip(cols, row, strict=True):
                col.append(value)
        for i in (0, 1, 3, 4, 5, 9, 12):
            cols[i] = _escape_column(cols[i])
        return cols

    @override
    async def delete_copy(self, run_id: str, body: bytes) -> bool:
        async with self._transaction("delete_copy") as conn:
            status = await conn.execute(
                f"DELETE FROM {self._t}.hs_runs WHERE run_id = $1 AND body = $2",
                _escape_column([run_id])[0],
                bytes(body),
            )
            return bool(_count(status))

    @override
    async def delete_dead_letter(self, run_id: str) -> bool:
        async with self._transaction("delete_dead_letter") as conn:
            status = await conn.execute(
                f"DELETE FROM {self._t}.hs_dead_letters WHERE run_id = $1",
                _escape_column([run_id])[0],
            )
            return bool(_count(status))

    @override
    async def save_versions(
        self, snapshots: Sequence[StoredSnapshot], *, fence: Fence | None = None
    ) -> dict[int, int] | None:
        """One transaction; with ``fence``, the copies' shards are judged under ``FOR SHARE``."""
        if not snapshots:
            self._w("save_versions")
            return None if fence is None else {}
        n = self.shards
        firsts: dict[tuple[str, int], StoredSnapshot] = {}
        for s in snapshots:  # one row a (run, version): the newest epoch, else the first given
            key = (s.header.run_id, s.header.version)
            held = firsts.get(key)
            if held is None or s.header.epoch > held.header.epoch:
                firsts[key] = s
        # A copy of a run too long to index is not kept (``save`` rejects that run too).
        unique = [x for x in firsts.values() if _too_long(x.header.run_id) is None]
        async with self._transaction("save_versions") as conn:
            lost = await self._fenced(conn, fence, {}, (s.header.run_id for s in unique))
            kept = [s for s in unique if shard_of(s.header.run_id, n) not in lost] if lost else unique
            if kept:
                await conn.execute(self._sql["keep_versions"], *_snapshot_columns(kept, n))
        return None if fence is None else lost

    @override
    async def purge_finished(self, *, before: float) -> int:
        t = self._t
        async with self._transaction("purge_finished") as conn:
            ids = await conn.fetch(
                f"DELETE FROM {t}.hs_runs WHERE status = ANY($1::text[]) AND updated_at < $2 RETURNING run_id",
                sorted(FINISHED_STATUSES),
                before,
            )
            gone = [r[0] for r in ids]
            if gone:
                await conn.execute(f"DELETE FROM {t}.hs_transitions WHERE run_id = ANY($1::text[])", gone)
                await conn.execute(f"DELETE FROM {t}.hs_versions WHERE run_id = ANY($1::text[])", gone)
            return len(gone)

    # --- reads -------------------------------------------------------------------

    async def _fetch(self, sql: str, *args: object) -> list[Any]:
        pool = self._p()
        if self._schema_lost:
            async with self._write_lock:
                await self._remake(pool)
        async with self._errors("read"):
            rows: list[Any] = await pool.fetch(sql, *args)
            return rows

    def _checked(self, row: Sequence[Any], bad_rows: list[BadRow] | None) -> StoredSnapshot | None:
        try:
            return _stored(row, self.tier)
        except CodecError as exc:
            bad_row(exc, _shown(row[0]), bad_rows)
            return None

    @override
    async def load(self, run_id: str) -> StoredSnapshot | None:
        rows = await self._fetch(
            f"SELECT {_RUN_COLUMNS} FROM {self._t}.hs_runs WHERE run_id = $1",
            _escape_column([run_id])[0],
        )
        return _stored(rows[0], self.tier) if rows else None

    @override
    async def load_many(
        self, run_ids: Sequence[str], *, bad_rows: list[BadRow] | None = None
    ) -> dict[str, StoredSnapshot]:
        found: dict[str, StoredSnapshot] = {}
        ids = _escape_column(list(dict.fromkeys(run_ids)))
        for start in range(0, len(ids), 10_000):
            rows = await self._fetch(
                f"SELECT {_RUN_COLUMNS} FROM {self._t}.hs_runs WHERE run_id = ANY($1::text[])",
                ids[start : start + 10_000],
            )
            for row in rows:
                if (stored := self._checked(row, bad_rows)) is not None:
                    found[stored.header.run_id] = stored
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
        cursor = None if after is None else _escape_column([after])[0]
        rows = await self._page(_HEADER_COLUMNS, status, workflow, cursor, limit, shards)
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
            lambda cursor, n: self._page(_RUN_COLUMNS, status, workflow, cast("str | None", cursor), n, shards),
            lambda row: self._checked(row, bad_rows),
            None if after is None else _escape_column([after])[0],
            limit,
        )

    async def _page(
        self,
        columns: str,
        status: str | Iterable[str] | None,
        workflow: str | None,
        after: str | None,
        limit: int,
        shards: Collection[int] | None,
    ) -> list[Any]:
        where: list[str] = []
        params: list[object] = []
        if shards is not None:  # the stored column, never recomputed
            params.append(sorted({int(s) for s in shards}))
            where.append(f"shard = ANY(${len(params)}::int4[])")
        statuses = status_filter(status)
        if statuses is not None:
            params.append(_escape_column(sorted(statuses)))
            where.append(f"status = ANY(${len(params)}::text[])")
        if workflow is not None:
            params.append(_escape_column([workflow])[0])
            where.append(f"workflow = ${len(params)}")
        if after is not None:
            params.append(after)
            where.append(f"run_id > ${len(params)}")
        params.append(limit)
        tail = (" WHERE " + " AND ".join(where) if where else "") + f" ORDER BY run_id LIMIT ${len(params)}"
        return await self._fetch(f"SELECT {columns} FROM {self._t}.hs_runs{tail}", *params)

    @override
    async def history(self, run_id: str) -> list[Transition]:
        rows = await self._fetch(
            f"SELECT run_id, version, kind, step, status, at, detail FROM {self._t}.hs_transitions"
            " WHERE run_id = $1 ORDER BY version",
            _escape_column([run_id])[0],
        )
        out = []
        for r in rows:
            try:
                fields = (_unescape(r[0]), r[1], _unescape(r[2]), r[3], _unescape(r[4]), r[5], _unescape_opt(r[6]))
            except _MalformedError as exc:
                raise _malformed(run_id, self.tier, exc) from None
            out.append(transition_from_row(fields, tier=self.tier))
        return out

    @override
    async def dead_letters(self, *, bad_rows: list[BadRow] | None = None) -> list[StoredDeadLetter]:
        rows = await self._fetch(f"SELECT {_DEAD_LETTER_COLUMNS} FROM {self._t}.hs_dead_letters ORDER BY at, run_id")
        records = []
        for r in rows:
            try:
                run_id, workflow = _unescape(r[0]), _unescape(r[1])
                snapshot = StoredSnapshot(
                    RunHeader(run_id, workflow, r[6], r[7], r[8], _unescape(r[9]), r[10], r[11], 0),
                    _unescape_opt(r[12]),
                    r[13],
                )
                records.append(
                    StoredDeadLetter(
                        run_id=run_id,
                        workflow=workflow,
                        at=r[2],
                        error=_unescape(r[3]),
                        attempts=_unescape(r[4]),
                        compensation_errors=_unescape(r[5]),
                        snapshot=snapshot,
                    )
                )
            except _MalformedError as exc:
                bad_row(_malformed(r[0], self.tier, exc), _shown(r[0]), bad_rows)
        return records

    @override
    async def load_version(self, run_id: str, version: int) -> StoredSnapshot | None:
        rows = await self._fetch(
            f"SELECT {_RUN_COLUMNS} FROM {self._t}.hs_versions WHERE run_id = $1 AND version <= $2"
            " ORDER BY version DESC LIMIT 1",
            _escape_column([run_id])[0],
            version,
        )
        return _stored(rows[0], self.tier) if rows else None


def _count(status: str) -> int:
    """The row count of a command tag (``DELETE 3``)."""
    return int(status.rsplit(" ", 1)[-1])
