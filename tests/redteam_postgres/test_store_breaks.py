"""Red-team tests for ``PostgresStore`` (the PostgreSQL tier, #13) on a real PostgreSQL 18.

Each test is an attack on a guarantee of the ``Store`` contract
(hotstate/persistence/_store.py) or of the module docstring of
hotstate/persistence/_postgres.py. Some broke the first version (a dropped
table without a reset, a seal racing a save on a missing fence row, a
composite index entry too long, a recorded shard count that is not one) and
were fixed; the others held, and are kept as cheap regression checks for what
tests/contract and tests/integration do not cover.

Rows are planted or changed by hand through a second connection, as an
operator, a tool or another hotstate version would; each test works in a
schema of its own (``postgres_schema``) on the session's server.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
from typing import TYPE_CHECKING

import asyncpg
import pytest

from hotstate import PersistenceError, Status, StoreUnavailableError, Transition, TransitionKind
from hotstate.persistence import (
    Fence,
    PostgresAuthority,
    PostgresStore,
    RunHeader,
    StoredDeadLetter,
    StoredSnapshot,
    shard_of,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

SHARDS = 8


def snap(
    run_id: str,
    version: int = 1,
    *,
    epoch: int = 0,
    workflow: str = "orders",
    status: str = "running",
    error: str | None = None,
) -> StoredSnapshot:
    header = RunHeader(run_id, workflow, 1, version, 0, status, 1_700_000_000.0, 1, epoch)
    return StoredSnapshot(header, error, b"body")


def trans(run_id: str, version: int, detail: str | None = None) -> Transition:
    return Transition(run_id, version, TransitionKind.step, 0, Status.running, 1_700_000_000.5, detail)


@pytest.fixture
async def store(postgres_url: str, postgres_schema: str) -> AsyncIterator[PostgresStore]:
    async with PostgresStore(postgres_url, schema=postgres_schema, shards=SHARDS) as opened:
        yield opened


async def sql(url: str, statement: str, *args: object) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(statement, *args)
    finally:
        await conn.close()


def in_shard(shard: int) -> str:
    return next(f"r{i}" for i in range(1000) if shard_of(f"r{i}", SHARDS) == shard)


# ------------------------------------------------------------------ one run never blocks the others


async def test_a_run_whose_workflow_and_run_id_overflow_one_index_entry_together_is_rejected_alone(
    store: PostgresStore,
) -> None:
    """Guarantee: one run never blocks the others (#11). If the store cannot write a run, it leaves that
    run out whole and names it in ``SaveResult.rejected``.

    The tier checks every indexed text field on its own against ``INDEXED_BYTES`` (2,000 bytes). But
    ``hs_runs_workflow`` indexes ``(workflow, run_id)`` and ``hs_runs_status`` indexes ``(status,
    run_id)``. A run whose workflow and run id are each 1,867 bytes of random text (too random to
    compress) makes an index entry of ~3,750 bytes. The btree limit is 2,704 bytes.

    Evidence: ``save`` raises ``PersistenceError: ProgramLimitExceededError: index row size 3752
    exceeds btree version 4 maximum 2704 for index "hs_runs_workflow"``. The fallback (``_rejects``)
    finds no culprit and raises again. Nothing of the batch is written, the run "good" included. The
    persister puts the batch back and fails every flush from then on. A cheaper path hits the same
    limit: the U+0000/U+0001 escape can make a run id of 2,000 raw bytes up to 4,000 bytes stored.

    Fix: judge the sum of the columns of each index, after escaping (for example
    ``len(escaped workflow) + len(escaped run_id) <= INDEXED_BYTES``). Or, when PostgreSQL refuses a
    batch with ProgramLimitExceeded, split the batch to find the run it refuses.
    """
    long_id = secrets.token_urlsafe(1400)[:1867]
    long_workflow = secrets.token_urlsafe(1400)[:1867]
    result = await store.save(
        [snap("good"), snap(long_id, workflow=long_workflow)], [trans("good", 1), trans(long_id, 1)]
    )
    assert set(result.rejected) == {long_id}
    assert result.written == 1
    assert await store.load("good") is not None


# ------------------------------------------------------------------ a store that goes back in time


async def test_a_dropped_runs_table_is_reported_as_a_reset_to_every_writer(
    postgres_url: str, postgres_schema: str
) -> None:
    """Guarantee (``Store.save``'s ``reset``): if the store lost writes it acknowledged, the next save of
    every writer reports ``reset``, and the runtime writes again every run it holds. The module makes a
    claim about exactly this case (``_errors``): "The database lost the tables under the open store
    ...: the next call makes them again, and its save finds this writer's mark gone (reset)."

    That holds only when ``hs_writer_marks`` is lost too. Here only ``hs_runs`` is dropped (an operator's
    cleanup, a table restore gone wrong, a migration). Writer A's next save fails with
    ``StoreUnavailableError`` ("the tables are gone") and the call after it makes the tables again. But
    A's mark is still in place, so A never sees ``reset=True``. Writer B (another process on the same
    schema) never even sees an error, because A already made the table again. The acknowledged runs
    "a" and "b" are gone, and neither runtime will write them again.

    Evidence: A saves ``[unavailable, reset=False, ...]`` and B saves ``reset=False``, and
    ``load("a")`` is None.

    Fix: when ``create_schema`` has to make ``hs_runs`` (or any data table) while ``hs_writer_marks``
    already exists, delete every mark in the same transaction. Every writer's next save then reports
    reset.
    """
    a = PostgresStore(postgres_url, schema=postgres_schema, shards=SHARDS)
    b = PostgresStore(postgres_url, schema=postgres_schema, shards=SHARDS)
    async with a, b:
        assert (await a.save([snap("a")], [trans("a", 1)])).written == 1
        assert (await b.save([snap("b")], [trans("b", 1)])).written == 1
        await sql(postgres_url, f'DROP TABLE "{postgres_schema}".hs_runs')
        a_resets = []
        for _ in range(3):
            try:
                a_resets.append((await a.save([snap("c")], [])).reset)
            except StoreUnavailableError:
                continue
        b_reset = (await b.save([snap("d")], [])).reset
        assert await a.load("a") is None  # the loss is real
        assert any(a_resets), "the writer that made hs_runs again was not told that it lost runs"
        assert b_reset, "another writer of the schema was not told that it lost runs"


# ------------------------------------------------------------------ fences


async def test_a_fenced_save_racing_a_seal_on_a_missing_fence_row_never_lands_after_the_seal(
    store: PostgresStore, postgres_url: str
) -> None:
    """Guarantee (``Store.seal``): once a seal returns, no save under an older epoch writes anything of
    that shard. The module says of ``_RAISE_FENCES``: "a fence row deleted by hand is made again, never
    skipped".

    The shard's fence row is deleted by hand (``test_a_fence_row_deleted_by_hand_is_made_again_by_the_seal``
    covers the case without a race). Then:

    1. The new owner's seal (its own statements, on a second connection: ``FOR UPDATE`` finds no row,
       so it upserts ``(2, 'new')``) has not committed yet.
    2. The old owner saves at epoch 1. Its ``FOR SHARE`` also finds no row, so it judges the shard
       free and goes on to upsert ``(1, 'old')``. That INSERT waits on the seal's uncommitted row.
    3. The seal commits and returns: sealed. The save's upsert becomes a no-op (``WHERE f.epoch <
       excluded.epoch`` is false), but the verdict made in step 2 stands. The save writes version 9
       under epoch 1, after the seal, and reports ``fenced == {}``.

    Evidence: ``SaveResult(written=1, fenced={})``. The stored copy is version 9 at epoch 1 while the
    fence row is ``(2, 'new')``. The same race lets an older seal return ``{}`` (sealed) against a
    newer one.

    Fix: have ``_RAISE_FENCES`` return the rows it changed. Read every shard it did not change again
    (the row is visible once the INSERT has waited) and judge it again. Or insert missing rows with
    ``ON CONFLICT DO NOTHING`` first, then read them ``FOR SHARE``.
    """
    rid = in_shard(3)
    assert (await store.save([snap(rid, 1, epoch=1)], [], fence=Fence("old", {3: 1}))).written == 1
    fences = store.table("hs_store_fence")
    conn = await asyncpg.connect(postgres_url)
    try:
        await conn.execute(f"DELETE FROM {fences} WHERE shard = 3")  # noqa: S608 - our own test SQL
        seal = conn.transaction()
        await seal.start()
        found = await conn.fetch(f"SELECT shard FROM {fences} WHERE shard = 3 FOR UPDATE")  # noqa: S608
        assert found == []
        await conn.execute(f"INSERT INTO {fences} VALUES (3, 2, 'new') ON CONFLICT DO NOTHING")  # noqa: S608
        save = asyncio.ensure_future(store.save([snap(rid, 9, epoch=1)], [], fence=Fence("old", {3: 1})))
        await asyncio.sleep(0.3)
        assert not save.done()  # it waits on the seal's row
        await seal.commit()  # the seal returns: shard 3 is sealed at (2, 'new')
        result = await asyncio.wait_for(save, 10)
        row = await conn.fetchrow(f"SELECT epoch, owner FROM {fences} WHERE shard = 3")  # noqa: S608
        assert tuple(row) == (2, "new")
    finally:
        await conn.close()
    stored = await store.load(rid)
    assert stored is not None
    assert result.fenced == {3: 2}
    assert stored.header.version == 1, "an older owner's write landed after the seal"


# ------------------------------------------------------------------ a planted shard count


@pytest.mark.parametrize("value", ["abc", "0"])
@pytest.mark.parametrize("kind", ["store", "read-only store", "authority"])
async def test_a_recorded_shard_count_that_is_not_one_is_a_persistence_error_at_open(
    postgres_url: str, postgres_schema: str, value: str, kind: str
) -> None:
    """Guarantee (``Store.open``): if the backend holds something that is not hotstate's, open raises
    ``PersistenceError``. ``SQLiteStore`` does this (``_recorded_shards``: "hs_meta records
    shards=... which is not a shard count").

    ``PostgresStore._record_shards``/``_read_shards`` and ``PostgresAuthority._record_shards`` call
    ``int(recorded)`` and use the result unchecked.

    Evidence: ``'abc'`` raises a raw ``ValueError`` out of ``open``. No ``_errors`` wraps it, and the CLI
    reports it as a usage error (exit 2). ``'0'`` opens with ``shards == 0``, and the first fenced
    ``save`` raises ``ZeroDivisionError``. ``'-3'`` opens with negative shards and fenced saves are
    never fenced.

    Fix: ``check_shards`` on the recorded value, and a ``PersistenceError`` naming ``hs_meta`` when it
    fails.
    """
    async with PostgresStore(postgres_url, schema=postgres_schema, shards=SHARDS):
        pass
    await sql(postgres_url, f"UPDATE \"{postgres_schema}\".hs_meta SET value = $1 WHERE key = 'shards'", value)  # noqa: S608
    opened: PostgresStore | PostgresAuthority
    if kind == "authority":
        opened = PostgresAuthority(postgres_url, schema=postgres_schema)
    else:
        opened = PostgresStore(postgres_url, schema=postgres_schema, read_only=kind == "read-only store")
    try:
        with pytest.raises(PersistenceError, match="shards"):
            await opened.open()
    finally:
        await opened.aclose()


# ------------------------------------------------------------------ what held


async def test_held_text_with_nul_and_u0001_round_trips_in_every_field_and_orders_by_utf8_bytes(
    store: PostgresStore,
) -> None:
    """U+0000 and U+0001 (the escape character), next to U+0002, U+007F, U+FFFF and an astral
    character, in run ids, workflows, statuses, errors, details and every dead-letter text. Each reads
    back exactly, and each scan (paged with every limit, filtered by workflow or status) and the
    dead-letter list order by UTF-8 bytes, as in the SQLite and Valkey stores. HELD.
    """
    alphabet = ["\x00", "\x01", "\x02", "a", "\x7f", "\xe9", "\uffff", "\U0001f600", "\x01\x02", "\x01\x01"]
    rnd = random.Random(7)
    ids = sorted(
        {"".join(rnd.choice(alphabet) for _ in range(rnd.randrange(0, 6))) for _ in range(200)},
        key=lambda s: s.encode(),
    )
    workflows = {r: rnd.choice(["w\x00", "w\x01", "w", "w\x00\x01"]) for r in ids}
    statuses = {r: rnd.choice(["s\x00", "s\x01", "s"]) for r in ids}
    result = await store.save(
        [snap(r, workflow=workflows[r], status=statuses[r], error=r + "\x00e") for r in ids],
        [trans(r, 1, "d\x00\x01" + r) for r in ids],
    )
    assert (result.written, result.rejected) == (len(ids), {})
    for limit in (1, 7):
        got: list[str] = []
        after = None
        while True:
            page = await store.scan(after=after, limit=limit)
            got += [h.run_id for h in page]
            if len(page) < limit:
                break
            after = page[-1].run_id
        assert got == ids
    for workflow in set(workflows.values()):
        assert [h.run_id for h in await store.scan(workflow=workflow)] == [r for r in ids if workflows[r] == workflow]
    for status in set(statuses.values()):
        found = await store.scan_snapshots(status=status, limit=5)
        assert [s.header.run_id for s in found] == [r for r in ids if statuses[r] == status][:5]
    for r in ids[:20]:
        loaded = await store.load(r)
        assert loaded is not None
        assert (loaded.header.run_id, loaded.header.workflow, loaded.error) == (r, workflows[r], r + "\x00e")
        assert [t.detail for t in await store.history(r)] == ["d\x00\x01" + r]
    letters = [
        StoredDeadLetter(
            run_id=r,
            workflow=r + "\x00",
            at=1.0,
            error="\x00" + r,
            attempts="\x01",
            compensation_errors="\x00\x01",
            snapshot=snap(r, error="\x01"),
        )
        for r in ids
    ]
    assert not await store.save_dead_letters(letters)
    listed = await store.dead_letters()
    assert [d.run_id for d in listed] == ids
    assert [(d.workflow, d.error, d.attempts, d.compensation_errors, d.snapshot.error) for d in listed] == [
        (r + "\x00", "\x00" + r, "\x01", "\x00\x01", "\x01") for r in ids
    ]


async def test_held_saves_cancelled_mid_flight_leave_a_usable_pool_and_no_torn_batch(store: PostgresStore) -> None:
    """A flush task cancelled at a random point in its transaction (a runtime shutting down, a
    ``move_on_after``) 20 times in a row. The pool keeps its connections, the next save works at once,
    and every run's stored version equals its newest stored transition: no batch is half written. HELD.
    """
    rnd = random.Random(3)
    for i in range(20):
        version = i + 1
        task = asyncio.ensure_future(
            store.save([snap(f"r{j}", version) for j in range(500)], [trans(f"r{j}", version) for j in range(500)])
        )
        await asyncio.sleep(rnd.random() * 0.01)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert (await asyncio.wait_for(store.save([snap("after", 1)], []), 5)).written == 1
    for j in (0, 250, 499):
        stored = await store.load(f"r{j}")
        history = await store.history(f"r{j}")
        newest = max((t.version for t in history), default=None)
        assert (None if stored is None else stored.header.version) == newest


async def test_held_a_table_locked_by_another_session_is_store_unavailable_within_the_timeout_then_recovers(
    postgres_url: str, postgres_schema: str
) -> None:
    """Another session holds ``LOCK TABLE hs_runs IN ACCESS EXCLUSIVE MODE`` (a migration, a ``VACUUM
    FULL``). A save and a load each raise ``StoreUnavailableError`` once the 0.3 s timeout has passed.
    The lock is never held forever. After the lock goes, the next save works and reports no reset.
    HELD.
    """
    async with PostgresStore(postgres_url, schema=postgres_schema, timeout=0.3) as store:
        assert (await store.save([snap("a")], [])).written == 1
        conn = await asyncpg.connect(postgres_url)
        try:
            tx = conn.transaction()
            await tx.start()
            await conn.execute(f"LOCK TABLE {store.table('hs_runs')} IN ACCESS EXCLUSIVE MODE")
            with pytest.raises(StoreUnavailableError, match="TimeoutError"):
                await asyncio.wait_for(store.save([snap("a", 2)], []), 5)
            with pytest.raises(StoreUnavailableError):
                await asyncio.wait_for(store.load("a"), 5)
            await tx.rollback()
        finally:
            await conn.close()
        result = await store.save([snap("a", 2)], [])
        assert (result.written, result.reset) == (1, False)
