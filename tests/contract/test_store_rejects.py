"""One run a store cannot write never blocks the others (#11): ``SaveResult.rejected``, on every store.

Each case saves a batch of good runs with one run that carries what no store
can write (text that does not encode, an integer past 64 bits), or, on Valkey,
one whose key holds another type. The store writes every other run, leaves
the bad one out whole (its snapshot and its transitions) and names it with a
reason. Saving the same batch again rejects it again: the store is not down.

Also here: run ids holding NUL are kept apart (``json_extract`` stops at NUL:
one overwrote another run's history in SQLite), and a history longer than one
store call (``CALL_TRANSITIONS``, ``TRANSACTION_TRANSITIONS``) is written in several calls, with every
transition stored and counted once.

Records are built by hand, never through a codec: a store never decodes a body,
and a codec that checks text would refuse them before the store saw them.
"""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING

import asyncpg
import pytest
import valkey

from hotstate import CodecError, Status, Transition, TransitionKind
from hotstate.persistence import (
    MemoryStore,
    PostgresStore,
    RunHeader,
    SQLiteStore,
    Store,
    StoredDeadLetter,
    StoredSnapshot,
    ValkeyStore,
    shard_of,
)
from hotstate.persistence._store import CALL_BYTES, CALL_TRANSITIONS, TRANSACTION_TRANSITIONS

if TYPE_CHECKING:
    from collections.abc import Sequence

BIG = 1 << 63  # one past SQLite's INTEGER


def stored(
    run_id: str, version: int = 1, *, workflow: str = "orders", status: str = "running", error: str | None = None
) -> StoredSnapshot:
    header = RunHeader(run_id, workflow, 1, version, 0, status, 1_700_000_000.0, 1)
    return StoredSnapshot(header, error, b"body of " + run_id.encode("utf-8", "backslashreplace"))


def trans(run_id: str, version: int, detail: str | None = None) -> Transition:
    return Transition(run_id, version, TransitionKind.step, 0, Status.running, 1_700_000_000.5, detail)


def history_of(run_id: str, versions: Sequence[int]) -> list[Transition]:
    return [trans(run_id, v) for v in versions]


async def assert_written(store: Store, run_id: str, version: int, history: Sequence[int]) -> None:
    found = await store.load(run_id)
    assert found is not None, run_id
    assert found.header.run_id == run_id
    assert found.header.version == version
    assert [t.version for t in await store.history(run_id)] == list(history)


async def assert_absent(store: Store, run_id: str) -> None:
    assert await store.load(run_id) is None
    assert await store.history(run_id) == []
    assert run_id not in {h.run_id for h in await store.scan()}


# ------------------------------------------------------------ what no store can write


@pytest.mark.parametrize(
    ("bad_snapshot", "bad_transition", "reason"),
    [
        pytest.param(stored("bad"), trans("bad", 1, "no such file \udcff.txt"), "detail", id="surrogate-detail"),
        pytest.param(stored("bad\udcff"), trans("bad\udcff", 1), "run_id", id="surrogate-run-id"),
        pytest.param(stored("bad", workflow="wf\ud800"), trans("bad", 1), "workflow", id="surrogate-workflow"),
        pytest.param(stored("bad", error='{"m":"\udcff"}'), trans("bad", 1), "error", id="surrogate-error"),
        pytest.param(stored("bad", BIG), trans("bad", BIG), "version", id="version-past-64-bits"),
        pytest.param(stored("bad", 1), trans("bad", BIG + 5), "version", id="transition-version-past-64-bits"),
        pytest.param(stored("bad", -BIG - 1), trans("bad", 1), "version", id="version-below-64-bits"),
        pytest.param(stored("bad", 1), trans("bad", -BIG - 1), "version", id="transition-version-below-64-bits"),
        pytest.param(stored("bad"), trans("bad", 1)._replace(at=float("inf")), "at", id="transition-time-infinite"),
    ],
)
async def test_a_run_the_store_cannot_write_is_rejected_alone_and_every_other_run_is_written(
    store: Store, bad_snapshot: StoredSnapshot, bad_transition: Transition, reason: str
) -> None:
    bad = bad_snapshot.header.run_id
    result = await store.save(
        [stored("a"), bad_snapshot, stored("b", 2)],
        [trans("a", 1), bad_transition, *history_of("b", [1, 2])],
    )
    assert set(result.rejected) == {bad}
    assert reason in result.rejected[bad]
    assert (result.written, result.stale, result.transitions) == (2, 0, 3)
    assert result.conflicts == {}
    await assert_written(store, "a", 1, [1])
    await assert_written(store, "b", 2, [1, 2])
    if bad.isascii():
        await assert_absent(store, bad)
    # The same batch again: rejected again, the others equal (a retry after a lost reply).
    again = await store.save([stored("a"), bad_snapshot], [trans("a", 1), bad_transition])
    assert set(again.rejected) == {bad}
    assert (again.written, again.stale, again.transitions) == (0, 1, 0)


async def test_a_rejected_run_keeps_nothing_of_the_batch_not_even_its_good_rows(store: Store) -> None:
    await store.save([stored("r", 1)], [trans("r", 1)])
    result = await store.save(
        [stored("r", 2), stored("r", 3), stored("ok", 1)],
        [trans("r", 2), trans("r", 3, "bad \udcff"), trans("ok", 1)],
    )
    assert set(result.rejected) == {"r"}
    assert (result.written, result.stale) == (1, 0)
    await assert_written(store, "r", 1, [1])  # as before the batch
    await assert_written(store, "ok", 1, [1])


async def test_a_stored_version_at_the_top_of_the_range_is_a_conflict_and_the_next_one_is_rejected(
    store: Store,
) -> None:
    top = BIG - 1
    await plant_version(store, "r", top)
    below = await store.save([stored("r", 5)], [])
    assert below.conflicts == {"r": top}
    assert below.rejected == {}
    past = await store.save([stored("r", top + 1), stored("ok", 1)], [trans("r", top + 1)])
    assert set(past.rejected) == {"r"}
    assert "version" in past.rejected["r"]
    assert past.written == 1
    found = await store.load("r")
    assert found is not None
    assert found.header.version == top


async def postgres_sql(store: PostgresStore, sql: str, *args: object) -> None:
    conn = await asyncpg.connect(store.url)
    try:
        await conn.execute(sql, *args)
    finally:
        await conn.close()


async def plant_version(store: Store, run_id: str, version: int) -> None:
    """Store ``run_id`` at ``version`` the way something other than hotstate would."""
    if isinstance(store, SQLiteStore):
        await store.save([stored(run_id, 1)], [])
        with sqlite3.connect(store.path) as db:
            db.execute("UPDATE runs SET version = ? WHERE run_id = ?", (version, run_id))
        db.close()
    elif isinstance(store, ValkeyStore):
        await store.save([stored(run_id, 1)], [])
        with valkey.Valkey.from_url(store.url) as raw:
            raw.hset(store.run_key(run_id), "version", str(version))
    elif isinstance(store, PostgresStore):
        await store.save([stored(run_id, 1)], [])
        sql = f"UPDATE {store.table('hs_runs')} SET version = $1 WHERE run_id = $2"  # noqa: S608 - the test's own SQL
        await postgres_sql(store, sql, version, run_id)
    else:
        assert isinstance(store, MemoryStore)
        await store.save([stored(run_id, version)], [])


# ------------------------------------------------------------ NUL in a run id


async def test_run_ids_holding_nul_are_runs_of_their_own_never_cut_short(store: Store) -> None:
    ids = ["a", "a\x00b", "a\x00c", "\x00"]
    result = await store.save(
        [stored(rid, 2) for rid in ids],
        [t for rid in ids for t in [trans(rid, 1, f"of {rid}"), trans(rid, 2, "nul \x00 inside")]],
    )
    assert (result.written, result.transitions, result.rejected) == (4, 8, {})
    for rid in ids:
        await assert_written(store, rid, 2, [1, 2])
        history = await store.history(rid)
        assert [t.run_id for t in history] == [rid, rid]
        assert [t.detail for t in history] == [f"of {rid}", "nul \x00 inside"]
    # A stale write of one NUL id is a conflict of that id only.
    again = await store.save([stored("a\x00b", 1), stored("a", 3)], [trans("a", 3)])
    assert again.conflicts == {"a\x00b": 2}
    assert (again.written, again.stale) == (1, 1)
    await assert_written(store, "a\x00b", 2, [1, 2])
    await assert_written(store, "a", 3, [1, 2, 3])


# ------------------------------------------------------------ dead letters


def letter(run_id: str, version: int = 3, error: str = "{}") -> StoredDeadLetter:
    return StoredDeadLetter(
        run_id=run_id,
        workflow="orders",
        at=1_700_000_001.0,
        error=error,
        attempts="[]",
        compensation_errors="[]",
        snapshot=stored(run_id, version, status="failed"),
    )


async def test_a_dead_letter_the_store_cannot_write_is_left_out_and_the_others_are_written(store: Store) -> None:
    rejected = await store.save_dead_letters([letter("a"), letter("b\udcff"), letter("c", BIG), letter("d")])
    assert rejected is not None
    assert set(rejected) == {"b\udcff", "c"}
    assert "run_id" in rejected["b\udcff"]
    assert "version" in rejected["c"]
    assert [d.run_id for d in await store.dead_letters()] == ["a", "d"]
    with pytest.raises(CodecError, match="dead letter cannot be written"):
        await store.save_dead_letter(letter("e", error="\udcff"))
    assert await store.save_dead_letters([letter("f")]) in ({}, None)


# ------------------------------------------------------------ bounded store calls


async def test_a_history_longer_than_one_store_call_is_written_whole_and_counted_once(store: Store) -> None:
    n = 2 * max(CALL_TRANSITIONS, TRANSACTION_TRANSITIONS) + 7
    history = history_of("long", range(1, n + 1))
    result = await store.save([stored("long", n), stored("short", 1)], [*history, trans("short", 1)])
    assert (result.written, result.transitions, result.rejected) == (2, n + 1, {})
    await assert_written(store, "long", n, range(1, n + 1))
    # Again (a retry of a batch whose reply was lost): every transition is already there.
    again = await store.save([stored("long", n)], history)
    assert (again.written, again.stale, again.transitions) == (0, 1, 0)


async def test_long_details_split_a_batch_by_size_and_a_bad_run_in_it_is_still_rejected_alone(
    store: Store,
) -> None:
    detail = "x" * (CALL_BYTES // 4)
    history = [trans("wide", v, detail) for v in range(1, 11)]  # about 2.5 calls by size
    bad = [trans("bad", 1), trans("bad", 2, "\udcff")]
    result = await store.save([stored("wide", 10), stored("bad", 2)], [*history, *bad])
    assert set(result.rejected) == {"bad"}
    assert (result.written, result.transitions) == (1, 10)
    found = await store.history("wide")
    assert [t.detail for t in found] == [detail] * 10
    await assert_absent(store, "bad")


# ------------------------------------------------------------ Valkey: keys of the wrong type


@pytest.mark.parametrize(
    ("key", "plant"),
    [
        ("run:bad", lambda raw, k: raw.rpush(k, "x")),
        ("run:bad", lambda raw, k: raw.set(k, "x")),
        ("hist:bad", lambda raw, k: raw.sadd(k, "x")),
    ],
    ids=["run-list", "run-string", "hist-set"],
)
async def test_valkey_a_run_key_of_another_type_rejects_that_run_and_leaves_the_key_alone(
    valkey_url: str, valkey_prefix: str, key: str, plant: object
) -> None:
    async with ValkeyStore(valkey_url, prefix=valkey_prefix) as store:
        await store.save([stored("bad", 1), stored("ok", 1)], [trans("bad", 1), trans("ok", 1)])
        full = store.run_key("bad", key.split(":")[0])
        with valkey.Valkey.from_url(valkey_url) as raw:
            raw.delete(full)
            plant(raw, full)  # type: ignore[operator]
            before = raw.dump(full)
        result = await store.save([stored("bad", 2), stored("ok", 2)], [trans("bad", 2), trans("ok", 2)])
        assert result.rejected == {"bad": f"key {full} is a {raw_type(valkey_url, full)}, not a hash"}
        assert (result.written, result.transitions) == (1, 1)
        await assert_written(store, "ok", 2, [1, 2])
        with valkey.Valkey.from_url(valkey_url) as raw:
            assert raw.dump(full) == before  # nothing was written into it
            assert (
                raw.zscore(store.shard_key(shard_of("bad", store.shards), "status", "running"), "bad") is not None
            )  # its index is as it was


def raw_type(url: str, key: str) -> str:
    with valkey.Valkey.from_url(url) as raw:
        kind: bytes = raw.type(key)
        return kind.decode()


async def test_valkey_an_index_key_of_another_type_rejects_only_the_runs_that_write_it(
    valkey_url: str, valkey_prefix: str
) -> None:
    async with ValkeyStore(valkey_url, prefix=valkey_prefix) as store:
        await store.save([stored("stays", status="waiting"), stored("leaves", status="waiting")], [])
        with valkey.Valkey.from_url(valkey_url) as raw:
            # Layout 2 keeps one index per shard: plant the bad key in the shard of every run below.
            for rid in ("w", "leaves", "stays"):
                key = store.shard_key(shard_of(rid, store.shards), "status", "waiting")
                raw.delete(key)
                raw.set(key, "not a sorted set")
        result = await store.save(
            [
                stored("w", status="waiting"),  # new in that status: its ZADD would fail
                stored("leaves", 2, status="running"),  # its ZREM would fail
                stored("stays", 2, status="waiting"),  # no index write: taken
                stored("r", status="running"),
            ],
            [trans("w", 1), trans("r", 1), trans("stays", 2)],
        )
        assert set(result.rejected) == {"w", "leaves"}
        assert "status:waiting is a string, not a zset" in result.rejected["w"]
        assert (result.written, result.stale) == (2, 0)
        await assert_written(store, "r", 1, [1])
        await assert_written(store, "stays", 2, [2])
        assert await store.load("w") is None
        assert await store.history("w") == []
        found = await store.load("leaves")
        assert found is not None
        assert found.header.version == 1


async def test_valkey_a_mark_key_of_another_type_reads_as_a_lost_mark_never_a_failed_save(
    valkey_url: str, valkey_prefix: str
) -> None:
    async with ValkeyStore(valkey_url, prefix=valkey_prefix) as store:
        await store.save([stored("a")], [])
        with valkey.Valkey.from_url(valkey_url) as raw:
            for key in raw.scan_iter(match=f"{valkey_prefix}:mark:*"):
                raw.delete(key)
                raw.rpush(key, "x")
        result = await store.save([stored("b")], [trans("b", 1)])
        assert result.reset is True
        assert result.written == 1
        assert (await store.save([], [])).reset is False
