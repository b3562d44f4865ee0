"""Persistence benchmarks: W1 across flush policies, sustained flush throughput, recovery time.

Every figure is reported beside a ceiling measured in the same process:
- W1 policies against memory-only hotstate and the bare asyncio loop (``benchmarks.w1``);
- SQLite against a raw aiosqlite one-transaction ``executemany`` upsert of the same rows;
- Valkey against a raw ``MSET`` in 1,000-key chunks of the same number of keys and bytes.
"""

from __future__ import annotations

import gc
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import aiosqlite

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
from hotstate.persistence import SQLiteStore, Store
from hotstate.persistence._encoder import SnapshotEncoder
from hotstate.persistence._listener import IgnoringListener
from hotstate.persistence._persister import Persister
from hotstate.persistence._records import encode_snapshot

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
