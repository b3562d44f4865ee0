"""Reads and retention after a restart (#10, item 6): real SQLite files and a real Valkey server.

- 2,000 orders, 795 of them paid and finished, then a restart with
  ``recover=True``: ``get`` misses the 795 finished ones (it reads memory, and
  recovery loads unfinished runs only); ``load`` answers all 2,000.
- Every order finished, then ``evict_finished``: memory holds none of them,
  while ``load``, ``list_stored`` and the stored history still answer; after
  another restart ``load`` answers all 2,000 and no step ever ran twice.
- A corrupt newest copy in Valkey: ``load`` falls back to SQLite's, never
  unpickling the planted bytes.
- A stopped (SIGSTOPped) Valkey server: ``load`` and ``list_stored`` raise
  ``StoreUnavailableError`` after the tier's ``ack_timeout``, and answer again
  once it runs.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import pytest
import valkey.asyncio as avalkey

from hotstate import (
    CorruptSnapshotError,
    FlushPolicy,
    RunNotFoundError,
    Runtime,
    Status,
    Step,
    StepContext,
    StoreUnavailableError,
    Tier,
    Workflow,
)
from hotstate.persistence import DEFAULT_SHARDS, EmbeddedValkey, PickleCodec, SQLiteStore, ValkeyStore, shard_of


def vkey(prefix: str, run_id: str, kind: str = "run") -> str:
    """A run's Valkey key of ``kind`` (layout 2: each run's keys carry its shard's hash tag)."""
    return f"{prefix}:{{{shard_of(run_id, DEFAULT_SHARDS)}}}:{kind}:{run_id}"


def skey(prefix: str, run_id: str, *parts: str) -> str:
    """A key of ``run_id``'s shard: its dead letters, its status and workflow indexes."""
    return ":".join((prefix, f"{{{shard_of(run_id, DEFAULT_SHARDS)}}}", *parts))


if TYPE_CHECKING:
    from hotstate.runtime._registry import ListedRun

GUARD = 60  # seconds; a hang guard only
ORDERS = 2_000
PAID_BEFORE_RESTART = 795

executed: Counter[tuple[str, str]] = Counter()  # (run id, step): how often each step ran


async def reserve(p: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    executed[ctx.run_id, "reserve"] += 1
    return {**p, "reserved": True}


async def pay(p: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    executed[ctx.run_id, "pay"] += 1
    return {**p, "paid": ctx.signal}


async def ship(p: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    executed[ctx.run_id, "ship"] += 1
    return {**p, "shipped": True}


ORDER = Workflow(
    "order", [Step(fn=reserve, name="reserve"), Step(fn=pay, name="pay", wait_for="paid"), Step(fn=ship, name="ship")]
)
IDS = [f"o{i:04d}" for i in range(ORDERS)]


@pytest.fixture(autouse=True)
def _fresh_counts() -> None:
    executed.clear()


def tiers(url: str, prefix: str, db: Path, *, ack_timeout: float = 5.0) -> list[Tier]:
    """The README's tiers: Valkey every 10 ms, SQLite every second."""
    return [
        Tier(ValkeyStore(url, prefix=prefix, socket_timeout=1.0), FlushPolicy(interval=0.010, ack_timeout=ack_timeout)),
        Tier(SQLiteStore(db), FlushPolicy(interval=1.0, ack_timeout=ack_timeout)),
    ]


async def wait_status(rt: Runtime, ids: list[str], status: Status) -> None:
    with anyio.fail_after(GUARD):
        while any(rt.get(rid).status is not status for rid in ids):  # noqa: ASYNC110 - no event for a status
            await anyio.sleep(0.005)


async def missing(rt: Runtime) -> tuple[int, int, Counter[Status]]:
    """How many orders ``get`` and ``load`` cannot find, and the statuses ``load`` answers."""
    from_get = 0
    for rid in IDS:
        try:
            rt.get(rid)
        except RunNotFoundError:
            from_get += 1
    from_load = 0
    statuses: Counter[Status] = Counter()
    for rid in IDS:
        try:
            statuses[(await rt.load(rid)).status] += 1
        except RunNotFoundError:
            from_load += 1
    return from_get, from_load, statuses


async def listed_all(rt: Runtime, *, limit: int, **filters: Any) -> list[ListedRun]:
    out: list[ListedRun] = []
    after: str | None = None
    while True:
        page = await rt.list_stored(after=after, limit=limit, **filters)
        out.extend(page)
        if len(page) < limit:
            return out
        after = page[-1].run_id


async def test_every_order_answers_load_after_restarts_and_eviction_and_no_step_runs_twice(
    valkey_url: str, valkey_prefix: str, tmp_path: Path
) -> None:
    db = tmp_path / "orders.db"
    async with Runtime([ORDER], tiers=tiers(valkey_url, valkey_prefix, db)) as rt:
        for rid in IDS:
            await rt.spawn(ORDER, {"id": rid}, run_id=rid)
        await wait_status(rt, IDS, Status.waiting)
        for rid in IDS[:PAID_BEFORE_RESTART]:
            await rt.send(rid, "paid", 10)
        await wait_status(rt, IDS[:PAID_BEFORE_RESTART], Status.done)

    async with Runtime([ORDER], tiers=tiers(valkey_url, valkey_prefix, db), recover=True) as rt:
        report = rt.recovery_report
        assert report is not None
        assert len(report.resumed) == ORDERS - PAID_BEFORE_RESTART
        from_get, from_load, statuses = await missing(rt)
        assert from_get == PAID_BEFORE_RESTART  # before: "where is order X?" was a 404 for these
        assert from_load == 0
        assert statuses == {Status.done: PAID_BEFORE_RESTART, Status.waiting: ORDERS - PAID_BEFORE_RESTART}
        assert rt.count() == ORDERS - PAID_BEFORE_RESTART  # load adopted nothing
        done = await listed_all(rt, limit=300, status="done")
        assert [r.run_id for r in done] == IDS[:PAID_BEFORE_RESTART]
        assert {r.tier for r in done} == {"valkey"}  # the first tier, on a version tie
        everything = await listed_all(rt, limit=1_000)
        assert [r.run_id for r in everything] == IDS
        assert Counter(r.tier for r in everything) == {
            "valkey": PAID_BEFORE_RESTART,
            "hot": ORDERS - PAID_BEFORE_RESTART,
        }

        for rid in IDS[PAID_BEFORE_RESTART:]:
            await rt.send(rid, "paid", 20)
        await wait_status(rt, IDS[PAID_BEFORE_RESTART:], Status.done)
        held = rt.count()
        t0 = time.perf_counter()
        evicted = await rt.evict_finished(0.0)
        evict_seconds = time.perf_counter() - t0
        assert (held, evicted, rt.count()) == (ORDERS - PAID_BEFORE_RESTART, held, 0)
        t0 = time.perf_counter()
        from_get, from_load, statuses = await missing(rt)
        load_seconds = time.perf_counter() - t0
        assert (from_get, from_load, statuses) == (ORDERS, 0, {Status.done: ORDERS})
        assert [r.run_id for r in await listed_all(rt, limit=10_000, status=Status.done)] == IDS
        assert await rt.list_stored(status="waiting") == []
        before = len(executed)
        run = await rt.spawn(ORDER, {"id": "again"}, run_id=IDS[0])  # the stored, finished order
        with anyio.fail_after(GUARD):
            assert await run.wait_finished() == {"id": IDS[0], "reserved": True, "paid": 10, "shipped": True}
        assert len(executed) == before
        print(  # figures for the commit message (pytest -s)
            f"evicted {evicted} in {evict_seconds:.3f} s; 2 x {ORDERS} reads (get+load) in {load_seconds:.3f} s"
        )

    async with Runtime([ORDER], tiers=tiers(valkey_url, valkey_prefix, db), recover=True) as rt:
        report = rt.recovery_report
        assert report is not None
        assert report.resumed == ()
        assert await missing(rt) == (ORDERS, 0, {Status.done: ORDERS})
    async with SQLiteStore(db) as sqlite, ValkeyStore(valkey_url, prefix=valkey_prefix) as vk:
        trails = [await store.history(IDS[-1]) for store in (sqlite, vk)]  # the audit trail stays in every tier
        assert trails[0] == trails[1]
        assert [t.kind.value for t in trails[0]][:2] == ["spawned", "step"]
        assert "resumed" in [t.kind.value for t in trails[0]]
        assert trails[0][-1].status is Status.done
    assert set(executed.values()) == {1}  # no step of any order ever ran twice
    assert len(executed) == 3 * ORDERS


async def test_a_corrupt_newest_copy_in_valkey_falls_back_to_sqlite_and_is_never_unpickled(
    valkey_url: str, valkey_prefix: str, tmp_path: Path
) -> None:
    db = tmp_path / "orders.db"
    marker = tmp_path / "unpickled.marker"
    async with Runtime([ORDER], tiers=tiers(valkey_url, valkey_prefix, db)) as rt:
        await rt.spawn(ORDER, {"id": "x"}, run_id="x")
        await wait_status(rt, ["x"], Status.waiting)
        await rt.send("x", "paid", 5)
        await wait_status(rt, ["x"], Status.done)
        await rt.flush()
        good = rt.get("x")
        assert await rt.evict_finished(0.0) == 1

    class Planted:
        def __reduce__(self) -> tuple[Any, ...]:
            return (Path.touch, (marker,))

    frame = bytearray(PickleCodec(trust_stores=True).encode({"payload": Planted(), "signals": ()}))
    frame[10] ^= 0x01  # inside the digest
    raw = avalkey.Valkey.from_url(valkey_url)
    try:
        await raw.hset(vkey(valkey_prefix, "x"), mapping={"body": bytes(frame), "version": good.version + 50})
    finally:
        await raw.aclose()
    async with Runtime([ORDER], tiers=tiers(valkey_url, valkey_prefix, db)) as rt:
        snap = await rt.load("x")
        assert (snap.version, snap.status, snap.payload) == (good.version, Status.done, good.payload)
        listed = await rt.list_stored()
        assert [(r.run_id, r.version, r.tier) for r in listed] == [("x", good.version + 50, "valkey")]  # headers only
    assert not marker.exists()
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE runs SET body = ? WHERE run_id = 'x'", (bytes(frame),))
    conn.close()
    async with Runtime([ORDER], tiers=tiers(valkey_url, valkey_prefix, db)) as rt:
        with pytest.raises(CorruptSnapshotError) as info:
            await rt.load("x")
        assert info.value.run_id == "x"
    assert not marker.exists()


async def test_a_stopped_valkey_makes_load_and_list_stored_raise_within_its_ack_timeout(
    private_valkey: EmbeddedValkey, tmp_path: Path
) -> None:
    db = tmp_path / "orders.db"
    pid = private_valkey.pid
    assert pid is not None
    async with Runtime([ORDER], tiers=tiers(private_valkey.url, "hs", db, ack_timeout=0.3)) as rt:
        await rt.spawn(ORDER, {"id": "x"}, run_id="x")
        await wait_status(rt, ["x"], Status.waiting)
        await rt.send("x", "paid", 5)
        await wait_status(rt, ["x"], Status.done)
        assert await rt.evict_finished(0.0) == 1
        os.kill(pid, signal.SIGSTOP)
        try:
            for read in (lambda: rt.load("x"), lambda: rt.list_stored()):
                t0 = time.perf_counter()
                with anyio.fail_after(GUARD), pytest.raises(StoreUnavailableError) as info:
                    await read()
                assert info.value.tier == "valkey"
                assert time.perf_counter() - t0 < 5.0  # the 0.3 s ack_timeout, not a hang
        finally:
            os.kill(pid, signal.SIGCONT)
        with anyio.fail_after(GUARD):
            assert (await rt.load("x")).status is Status.done
            assert [r.run_id for r in await rt.list_stored()] == ["x"]
