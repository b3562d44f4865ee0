"""Persistence benchmarks: W1 across flush policies, sustained flush throughput, recovery time.

Every figure is reported beside a ceiling measured in the same process:
- W1 policies against memory-only hotstate and the bare asyncio loop (``benchmarks.w1``);
- SQLite against a raw aiosqlite one-transaction ``executemany`` upsert of the same rows;
- Valkey against a raw ``MSET`` in 1,000-key chunks of the same number of keys and bytes;
- PostgreSQL against the best of three raw asyncpg batch writes of the same rows into a table
  shaped like ``hs_runs`` (``RAW_POSTGRES_METHODS``: ``executemany``, ``unnest`` arrays, ``COPY``).
"""

from __future__ import annotations

import gc
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiosqlite
import asyncpg

from hotstate import (
    FlushPolicy,
    MsgpackCodec,
    Runtime,
    Snapshot,
    Status,
    Tier,
    Transition,
    TransitionKind,
)
from hotstate._bench import _w1 as w1
from hotstate.persistence import PostgresStore, SQLiteStore, Store
from hotstate.persistence._encoder import SnapshotEncoder
from hotstate.persistence._listener import IgnoringListener
from hotstate.persistence._persister import Persister
from hotstate.persistence._postgres_rows import RUN_TYPES, TRANSITION_TYPES
from hotstate.persistence._records import RunHeader, encode_snapshot

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

BLOB = w1.BLOB


# ------------------------------------------------------------------ ceilings


async def raw_sqlite_upsert(path: Path, rows: int, body_size: int) -> float:
    """Raw aiosqlite, one transaction: ``executemany`` upsert of ``rows`` snapshot rows
    plus ``executemany`` insert of ``rows`` transition rows (what a flush writes); rows/s."""
    body = os.urandom(body_size)
    async with aiosqlite.connect(path, isolation_level=None) as db:
        await db.execute("PRAGMA journal_mode = WAL")
        await db.execute("PRAGMA synchronous = NORMAL")
        await db.execute(
            "CREATE TABLE IF NOT EXISTS raw (run_id TEXT PRIMARY KEY, workflow TEXT, workflow_version INTEGER, "
            "version INTEGER, step INTEGER, status TEXT, updated_at REAL, attempt INTEGER, error TEXT, body BLOB) WITHOUT ROWID"
        )
        await db.execute(
            "CREATE TABLE IF NOT EXISTS raw_t (run_id TEXT, version INTEGER, kind TEXT, step INTEGER, status TEXT, "
            "at REAL, detail TEXT, PRIMARY KEY (run_id, version)) WITHOUT ROWID"
        )
        data = [(f"r{i}", "w1", 1, 2, 1, "running", 1.0, 1, None, body) for i in range(rows)]
        trans = [(f"r{i}", 2, "step", 0, "running", 1.0, None) for i in range(rows)]
        t0 = time.perf_counter()
        await db.execute("BEGIN IMMEDIATE")
        await db.executemany(
            "INSERT INTO raw VALUES (?,?,?,?,?,?,?,?,?,?) ON CONFLICT(run_id) DO UPDATE SET version = excluded.version, "
            "body = excluded.body WHERE excluded.version > raw.version",
            data,
        )
        await db.executemany("INSERT OR IGNORE INTO raw_t VALUES (?,?,?,?,?,?,?)", trans)
        await db.execute("COMMIT")
        return rows / (time.perf_counter() - t0)


async def raw_valkey_mset(url: str, keys: int, body_size: int) -> float:
    """Raw Valkey: ``MSET`` in 1,000-key chunks of ``keys`` snapshot keys plus
    ``keys`` transition keys (what a flush writes); snapshots/s."""
    import valkey.asyncio as valkey_asyncio

    client = valkey_asyncio.Valkey.from_url(url)
    body = os.urandom(body_size)
    tjson = b'["r0000000",2,"step",0,"running",1700000000.0,null]'
    try:
        t0 = time.perf_counter()
        for i in range(0, keys, 500):
            chunk: dict[str, bytes] = {}
            for j in range(i, min(keys, i + 500)):
                chunk[f"raw:{j}"] = body
                chunk[f"raw:t:{j}"] = tjson
            await client.mset(chunk)
        rate = keys / (time.perf_counter() - t0)
        await drop_keys(client, "raw:*")
        return rate
    finally:
        await client.aclose()


async def drop_keys(client: Any, pattern: str) -> None:
    """Delete this benchmark's keys only (never FLUSHDB: the server may be someone's)."""
    batch: list[bytes] = []
    async for key in client.scan_iter(match=pattern, count=5000):
        batch.append(key)
        if len(batch) >= 5000:
            await client.unlink(*batch)
            batch.clear()
    if batch:
        await client.unlink(*batch)


async def drop_prefix(url: str, prefix: str) -> None:
    """Delete every key a ValkeyStore with ``prefix`` wrote."""
    import valkey.asyncio as valkey_asyncio

    client = valkey_asyncio.Valkey.from_url(url)
    try:
        await drop_keys(client, f"{prefix}:*")
    finally:
        await client.aclose()


# ------------------------------------------------------ PostgreSQL ceilings

# hs_runs' shape (_postgres_rows.py): the header as columns, the body as bytea, the
# same three secondary indexes (an upsert that changes status updates them all);
# and hs_transitions'.
_RAW_TABLES = """
CREATE TABLE {t} (
    run_id text COLLATE "C" PRIMARY KEY, workflow text COLLATE "C" NOT NULL, workflow_version bigint NOT NULL,
    version bigint NOT NULL, step bigint NOT NULL, status text COLLATE "C" NOT NULL, updated_at float8 NOT NULL,
    attempt bigint NOT NULL, epoch bigint NOT NULL, error text, body bytea NOT NULL, shard integer NOT NULL);
CREATE INDEX ON {t} (status, run_id);
CREATE INDEX ON {t} (workflow, run_id);
CREATE INDEX ON {t} (shard, run_id);
CREATE TABLE {t}_t (
    run_id text COLLATE "C" NOT NULL, version bigint NOT NULL, kind text NOT NULL, step bigint NOT NULL,
    status text NOT NULL, at float8 NOT NULL, detail text, PRIMARY KEY (run_id, version));
"""
_RUN_COLUMNS = (*RunHeader._fields, "error", "body", "shard")  # the store's column order (_postgres_rows.py)
_TRANSITION_COLUMNS = Transition._fields


def _raw_statements(table: str) -> dict[str, str]:
    """Each method's statements for ``table`` (our own names: nothing here comes from outside)."""
    columns = ", ".join(_RUN_COLUMNS)
    history = ", ".join(_TRANSITION_COLUMNS)
    updates = ", ".join(f"{c} = excluded.{c}" for c in _RUN_COLUMNS[1:-1])
    # The store's upsert: every column replaced, guarded by (epoch, version).
    upsert = (
        f"INSERT INTO {table} AS r ({columns}) {{}} ON CONFLICT (run_id) DO UPDATE SET {updates}"
        " WHERE (excluded.epoch, excluded.version) > (r.epoch, r.version)"
    )
    insert = f"INSERT INTO {table}_t ({history}) {{}} ON CONFLICT DO NOTHING"
    runs = ", ".join(f"${i + 1}::{t}[]" for i, t in enumerate(RUN_TYPES))
    transitions = ", ".join(f"${len(RUN_TYPES) + i + 1}::{t}[]" for i, t in enumerate(TRANSITION_TYPES))
    return {
        "upsert_values": upsert.format(f"VALUES ({', '.join(f'${i + 1}' for i in range(len(_RUN_COLUMNS)))})"),
        "insert_values": insert.format(f"VALUES ({', '.join(f'${i + 1}' for i in range(len(_TRANSITION_COLUMNS)))})"),
        "unnest": (
            f"WITH runs AS ({upsert.format(f'SELECT * FROM unnest({runs})')} RETURNING 1),"  # noqa: S608
            f" trans AS ({insert.format(f'SELECT * FROM unnest({transitions})')} RETURNING 1)"  # noqa: S608
            " SELECT (SELECT count(*) FROM runs), (SELECT count(*) FROM trans)"
        ),
        "upsert_stage": upsert.format(f"SELECT {columns} FROM raw_stage"),  # noqa: S608
        "insert_stage": insert.format(f"SELECT {history} FROM raw_stage_t"),  # noqa: S608
    }


Rows = list[tuple[Any, ...]]


async def _by_executemany(conn: Any, sql: dict[str, str], runs: Rows, transitions: Rows) -> None:
    async with conn.transaction():
        await conn.executemany(sql["upsert_values"], runs)
        await conn.executemany(sql["insert_values"], transitions)


async def _by_unnest(conn: Any, sql: dict[str, str], runs: Rows, transitions: Rows) -> None:
    columns = [list(c) for c in zip(*runs, strict=True)]
    history = [list(c) for c in zip(*transitions, strict=True)]
    async with conn.transaction():
        await conn.fetchrow(sql["unnest"], *columns, *history)


async def _by_copy(conn: Any, sql: dict[str, str], runs: Rows, transitions: Rows) -> None:
    async with conn.transaction():
        await conn.copy_records_to_table("raw_stage", records=runs, columns=_RUN_COLUMNS)
        await conn.copy_records_to_table("raw_stage_t", records=transitions, columns=_TRANSITION_COLUMNS)
        await conn.execute(sql["upsert_stage"])
        await conn.execute(sql["insert_stage"])


RAW_POSTGRES_METHODS: dict[str, Callable[[Any, dict[str, str], Rows, Rows], Awaitable[None]]] = {
    "executemany": _by_executemany,
    "unnest()": _by_unnest,
    "COPY": _by_copy,
}
"""The raw asyncpg batch writes, each one transaction upserting a batch's runs and inserting their
transitions: ``executemany`` of the statements; ``unnest()`` of one array a column, both in one
statement (what ``PostgresStore.save`` does, with its writer mark and escaping on top); ``COPY``
(``copy_records_to_table``) into temporary tables, then ``INSERT ... SELECT`` from them."""


def _raw_rows(n: int, version: int, body: bytes) -> tuple[Rows, Rows]:
    now = time.time()
    runs = [(f"run-{i:07d}", "w1", 1, version, 1, "running", now, 1, 0, None, body, i % 256) for i in range(n)]
    transitions = [(f"run-{i:07d}", version, "step", 0, "running", now, None) for i in range(n)]
    return runs, transitions


SAVE = "PostgresStore.save"
"""``postgres_batches``' name for the store's contender."""


async def postgres_batches(url: str, rows: int, body_size: int, rounds: int, store: PostgresStore) -> dict[str, float]:
    """Rows/s of each ``RAW_POSTGRES_METHODS`` and of ``store.save`` (``SAVE``), median of ``rounds``.

    Each writes ``rows`` runs and their transitions a round, the raw methods
    each into its own table in a private schema (dropped after). Round ``r``
    writes version ``r + 2`` of the same runs (an insert, then updates, as
    ``sustained_flush`` does); within a round the four take turns going first,
    so a checkpoint or the autovacuum falls on each alike. Encoding the
    store's snapshots is not timed (``sustained_flush`` times the persister,
    encoding included).
    """
    body = os.urandom(body_size)
    codec = MsgpackCodec()
    schema = f"hs_bench_raw_{time.monotonic_ns()}"
    tables = {name: f'"{schema}".m{i}' for i, name in enumerate(RAW_POSTGRES_METHODS)}
    statements = {name: _raw_statements(table) for name, table in tables.items()}
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(f'CREATE SCHEMA "{schema}"')
        for table in tables.values():
            await conn.execute(_RAW_TABLES.format(t=table))
        some = next(iter(tables.values()))
        await conn.execute(f"CREATE TEMP TABLE raw_stage (LIKE {some}) ON COMMIT DELETE ROWS")
        await conn.execute(f"CREATE TEMP TABLE raw_stage_t (LIKE {some}_t) ON COMMIT DELETE ROWS")
        names = [*RAW_POSTGRES_METHODS, SAVE]
        rates: dict[str, list[float]] = {name: [] for name in names}
        for r in range(rounds):
            runs, transitions = _raw_rows(rows, r + 2, body)
            batch = _snapshots(rows, r + 2)
            snapshots = [encode_snapshot(snap, codec) for snap, _ in batch]
            for name in names[r % len(names) :] + names[: r % len(names)]:
                gc.collect()
                t0 = time.perf_counter()
                if name == SAVE:
                    written = (await store.save(snapshots, [t for _, t in batch])).written
                    if written != rows:
                        raise RuntimeError(f"PostgresStore.save wrote {written} of {rows} snapshots")
                else:
                    await RAW_POSTGRES_METHODS[name](conn, statements[name], runs, transitions)
                rates[name].append(rows / (time.perf_counter() - t0))
        return {name: statistics.median(values) for name, values in rates.items()}
    finally:
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()


async def drop_schema(url: str, schema: str) -> None:
    """Drop a schema a figure wrote (its store's and its lease authority's tables)."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


# ------------------------------------------------------- sustained flush rate


def _snapshots(n: int, version: int) -> list[tuple[Snapshot, Transition]]:
    out = []
    now = time.time()
    for i in range(n):
        rid = f"run-{i:07d}"
        snap = Snapshot(rid, "w1", 1, version, 1, Status.running, {"n": version, "id": rid, "blob": BLOB}, None, now)
        out.append((snap, Transition(rid, version, TransitionKind.step, 0, Status.running, now, None)))
    return out


async def sustained_flush(store: Store, n: int, rounds: int = 3) -> float:
    """Snapshots/s a persister flushes into ``store``: mark n runs, then time ``flush()``."""
    encoder = SnapshotEncoder(MsgpackCodec())
    from hotstate import SystemClock

    persister = Persister(
        Tier(store, FlushPolicy(interval=3600, max_batch_rows=n)), encoder, SystemClock(), IgnoringListener()
    )
    rates = []
    for r in range(rounds):
        batch = _snapshots(n, r + 2)
        for snap, tr in batch:
            persister.mark(snap, tr)
        gc.collect()
        t0 = time.perf_counter()
        await persister.flush()
        rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates)


CODEC_KEY = b"bench-secret-key-0123456789abcdef"


def codec_costs(n: int, rounds: int) -> dict[str, tuple[float, float]]:
    """Per W1 snapshot, in us: (encode, check + decode) for each codec, keyed and not, and the raw msgspec ceiling.

    ``encode`` is ``encode_snapshot`` (header, error, body, the exactness check
    and the tag); ``check + decode`` is ``decode_snapshot`` (the tag over the
    whole envelope, then the body). The ceiling, ``"raw msgspec"``, is one
    ``msgspec.msgpack`` encode and decode of the same body with no envelope.
    Medians of ``rounds`` passes over ``n`` snapshots.
    """
    import msgspec  # a bench-only import: the runtime uses it through the codec

    from hotstate.persistence import MsgpackCodec, PickleCodec
    from hotstate.persistence._records import decode_snapshot

    snaps = [snap for snap, _ in _snapshots(n, 5)]
    codecs = {
        "msgpack (default), no key": MsgpackCodec(key=None),
        "msgpack (default), keyed": MsgpackCodec(key=CODEC_KEY),
        "pickle, keyed": PickleCodec(key=CODEC_KEY),
    }
    out: dict[str, tuple[float, float]] = {}
    bodies = [{"payload": s.payload, "signals": []} for s in snaps]
    enc, dec = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder()
    raw_enc, raw_dec = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        raw = [enc.encode(body) for body in bodies]
        raw_enc.append((time.perf_counter() - t0) / n * 1e6)
        t0 = time.perf_counter()
        for data in raw:
            dec.decode(data)
        raw_dec.append((time.perf_counter() - t0) / n * 1e6)
    out["raw msgspec"] = (statistics.median(raw_enc), statistics.median(raw_dec))
    for name, codec in codecs.items():
        encodes, decodes = [], []
        for _ in range(rounds):
            t0 = time.perf_counter()
            stored = [encode_snapshot(s, codec) for s in snaps]
            encodes.append((time.perf_counter() - t0) / n * 1e6)
            t0 = time.perf_counter()
            for x in stored:
                decode_snapshot(x, codec, tier="bench")
            decodes.append((time.perf_counter() - t0) / n * 1e6)
        out[name] = (statistics.median(encodes), statistics.median(decodes))
    return out


def body_size() -> int:
    """The encoded size of one W1 snapshot body, so ceilings write the same bytes."""
    snap = Snapshot(
        "run-0000000", "w1", 1, 2, 1, Status.running, {"n": 1, "id": "run-0000000", "blob": BLOB}, None, 0.0
    )
    return len(encode_snapshot(snap, MsgpackCodec()).body)


# ----------------------------------------------------------------- recovery


async def recovery_time(path: Path, runs: int, rounds: int = 1) -> tuple[float, int]:
    """Write ``runs`` unfinished runs to SQLite, then time ``Runtime(recover=True)``.

    Each round recovers the same runs again (each recovery leaves them waiting,
    one version later). Returns the median seconds and the runs resumed.
    """
    codec = MsgpackCodec()
    wf = w1.workflow(10)
    async with SQLiteStore(path) as store:
        now = time.time()
        for i in range(0, runs, 10_000):
            chunk = []
            for j in range(i, min(runs, i + 10_000)):
                rid = f"rec-{j:07d}"
                snap = Snapshot(rid, "w1", 1, 3, 2, Status.waiting, {"n": 2, "id": rid, "blob": BLOB}, None, now)
                chunk.append(encode_snapshot(snap, codec))
            await store.save(chunk, [])
    times = []
    resumed = 0
    for _ in range(rounds):
        gc.collect()
        t0 = time.perf_counter()
        rt = Runtime([wf], tiers=[Tier(SQLiteStore(path), FlushPolicy(interval=60))], recover=True)
        async with rt:
            times.append(time.perf_counter() - t0)
            report = rt.recovery_report
            assert report is not None  # noqa: S101
            resumed = len(report.resumed)
            # leaving flushes 'resumed' transitions for every run; not part of the figure
    return statistics.median(times), resumed


def tmpdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="hotstate-bench-"))
