"""The PostgreSQL tier end to end, on a real server: runtimes, the seal against a flush, restarts, crashes, the CLI.

The Store contract (and its fencing, bad-row, reject and rollback parts) runs
on PostgreSQL in tests/contract; here the tier is used the way a deployment
uses it.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import signal
import subprocess
import sys
import textwrap
from typing import TYPE_CHECKING, Any

import anyio
import asyncpg
import pytest

from hotstate import RetryPolicy, RunFailedError, Runtime, Status, Step, StepContext, StoreUnavailableError, Workflow
from hotstate._cli import main
from hotstate.persistence import (
    Fence,
    FlushPolicy,
    MsgpackCodec,
    PostgresAuthority,
    PostgresStore,
    StoredDeadLetter,
    Tier,
    _postgres_rows as postgres_rows,
)
from hotstate.persistence._postgres_authority import read_postgres_shard_map
from hotstate.persistence._postgres_server import EmbeddedPostgres
from hotstate.persistence._records import encode_snapshot
from hotstate.persistence._shards import shard_of

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from hotstate.persistence import StoredSnapshot

GUARD = 30  # seconds; a hang guard only
SHARDS = 8
CODEC = MsgpackCodec()
FLAKY = {"fail": True}


async def inc(p: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    return {**p, "n": p["n"] + 1}


async def slow(p: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    await anyio.sleep(0.02)
    return {**p, "n": p["n"] + 1}


async def flaky(p: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    if FLAKY["fail"]:
        raise ValueError("card declined")
    return {**p, "charged": True}


LINEAR = Workflow("linear", [Step(fn=inc, name=f"s{i}") for i in range(3)])
SLOW = Workflow("slow", [Step(fn=slow, name=f"s{i}") for i in range(5)])
ORDER = Workflow("order", [Step(fn=inc, name="reserve"), Step(fn=flaky, name="charge", retry=RetryPolicy.never())])
WORKFLOWS = [LINEAR, SLOW, ORDER]


def snap(run_id: str, version: int, epoch: int = 1) -> StoredSnapshot:
    from hotstate import Snapshot

    s = Snapshot(run_id, "linear", 1, version, version, Status.running, {"n": version}, None, 1_700_000_000.0)
    return encode_snapshot(s, CODEC, epoch)


@pytest.fixture
async def store(postgres_url: str, postgres_schema: str) -> AsyncIterator[PostgresStore]:
    async with PostgresStore(postgres_url, schema=postgres_schema, shards=SHARDS) as opened:
        yield opened


# --- a runtime on the tier --------------------------------------------------------------


@pytest.mark.parametrize("interval", [0.01, None], ids=["write-behind", "write-through"])
async def test_a_runtime_keeps_its_runs_in_postgres_and_owns_its_shards_there(
    postgres_url: str, postgres_schema: str, interval: float | None
) -> None:
    policy = FlushPolicy(interval=interval) if interval is not None else FlushPolicy(write_through=True)
    tier = Tier(PostgresStore(postgres_url, schema=postgres_schema, shards=SHARDS), policy)
    with anyio.fail_after(GUARD):
        async with Runtime(WORKFLOWS, tiers=[tier]) as rt:
            handles = [await rt.spawn(LINEAR, {"n": i}) for i in range(20)]
            for i, h in enumerate(handles):
                assert (await h.wait_finished())["n"] == i + 3
            await rt.flush()
            owned = rt.statistics().ownership
            assert owned is not None
            assert sorted(owned.owned) == list(range(SHARDS))  # the default authority: this database
            found = await read_postgres_shard_map(postgres_url, postgres_schema)
            assert found is not None
            leases, members, now = found
            assert {lease.owner for lease in leases} == {owned.member}
            assert [m.member_id for m in members] == [owned.member]
            assert all(lease.expires_at > now for lease in leases)
            stored = await tier.store.load(handles[0].run_id)
            assert stored is not None
            assert stored.header.status == "done"
            assert stored.header.epoch == owned.owned[shard_of(handles[0].run_id, SHARDS)]
            assert [t.version for t in await tier.store.history(handles[0].run_id)] == [1, 2, 3, 4]
    # Released at shutdown: a new runtime takes every shard at once and reads the runs back.
    async with Runtime(WORKFLOWS, tiers=[Tier(PostgresStore(postgres_url, schema=postgres_schema), policy)]) as rt:
        loaded = await rt.load(handles[5].run_id)
        assert (loaded.status, loaded.payload["n"]) == (Status.done, 8)
        listed = await rt.list_stored(status="done")
        assert len(listed) == 20


async def test_two_runtimes_on_one_schema_split_the_shards_and_each_reads_the_others_runs(
    postgres_url: str, postgres_schema: str
) -> None:
    from hotstate import Ownership

    def tiers() -> list[Tier]:
        return [Tier(PostgresStore(postgres_url, schema=postgres_schema, shards=SHARDS), FlushPolicy(interval=0.01))]

    with anyio.fail_after(GUARD):
        async with (
            Runtime(
                WORKFLOWS, tiers=tiers(), ownership=Ownership(shards=SHARDS, ttl=2.0, renew_every=0.2, claim_every=0.1)
            ) as one,
            Runtime(
                WORKFLOWS, tiers=tiers(), ownership=Ownership(shards=SHARDS, ttl=2.0, renew_every=0.2, claim_every=0.1)
            ) as two,
        ):
            while True:  # placement moves shards to the second member over a few rounds
                a, b = one.statistics().ownership, two.statistics().ownership
                assert a is not None
                assert b is not None
                if a.owned and b.owned and len(a.owned) + len(b.owned) == SHARDS:
                    break
                await anyio.sleep(0.05)
            assert not set(a.owned) & set(b.owned)
            mine = [await one.spawn(LINEAR, {"n": 0}) for _ in range(6)]
            for h in mine:
                await h.wait_finished()
            await one.flush()
            for h in mine:  # any process answers load for any run
                assert (await two.load(h.run_id)).status == Status.done


async def test_a_runtime_without_ownership_refuses_a_schema_whose_shards_another_process_holds(
    postgres_url: str, postgres_schema: str
) -> None:
    from hotstate import ConfigError

    def tiers() -> list[Tier]:
        return [Tier(PostgresStore(postgres_url, schema=postgres_schema, shards=SHARDS), FlushPolicy(interval=0.01))]

    async with Runtime(WORKFLOWS, tiers=tiers()):
        rogue = Runtime(WORKFLOWS, tiers=tiers(), ownership=False, recover=True)
        with pytest.raises(ConfigError, match=rf"{SHARDS} shard\(s\) of schema '{postgres_schema}' are held"):
            await rogue.__aenter__()
    async with Runtime(WORKFLOWS, tiers=tiers(), ownership=False):  # alone once the owner left: allowed
        pass


# --- the seal and a flush in flight ------------------------------------------------------


async def test_a_seal_waits_for_a_flush_holding_the_fence_and_no_older_write_lands_after_it(
    store: PostgresStore,
) -> None:
    rid = next(f"r{i}" for i in range(100) if shard_of(f"r{i}", SHARDS) == 3)
    old = Fence("old", {3: 1})
    assert (await store.save([snap(rid, 1)], [], fence=old)).fenced == {}
    # A flush of the old owner in flight: its transaction holds the fence row FOR SHARE.
    conn = await asyncpg.connect(store.url)
    try:
        tx = conn.transaction()
        await tx.start()
        sql = f"SELECT epoch FROM {store.table('hs_store_fence')} WHERE shard = 3 FOR SHARE"  # noqa: S608
        row = await conn.fetchrow(sql)
        assert row["epoch"] == 1
        sealed = anyio.Event()

        async def seal() -> None:
            assert await store.seal(Fence("new", {3: 2})) == {}
            sealed.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(seal)
            await anyio.sleep(0.3)
            assert not sealed.is_set()  # the seal's UPDATE waits for the flush's lock
            write = f"UPDATE {store.table('hs_runs')} SET version = 2 WHERE run_id = $1"  # noqa: S608
            await conn.execute(write, rid)  # the flush's write
            await tx.commit()
            with anyio.fail_after(5):
                await sealed.wait()
    finally:
        await conn.close()
    # Once sealed, nothing of the old epoch lands, even at a higher version.
    result = await store.save([snap(rid, 9)], [], fence=old)
    assert result.fenced == {3: 2}
    assert result.written == 0
    loaded = await store.load(rid)
    assert loaded is not None
    assert loaded.header.version == 2
    # The new owner writes over the old owner's copy whatever its version.
    assert (await store.save([snap(rid, 1, epoch=2)], [], fence=Fence("new", {3: 2}))).written == 1


async def test_a_fence_row_deleted_by_hand_is_made_again_by_the_seal(store: PostgresStore) -> None:
    rid = next(f"r{i}" for i in range(100) if shard_of(f"r{i}", SHARDS) == 3)
    assert (await store.save([snap(rid, 1)], [], fence=Fence("old", {3: 1}))).written == 1
    conn = await asyncpg.connect(store.url)
    try:
        await conn.execute(f"DELETE FROM {store.table('hs_store_fence')}")  # noqa: S608
    finally:
        await conn.close()
    assert await store.seal(Fence("new", {3: 2})) == {}
    assert (await store.save([snap(rid, 5)], [], fence=Fence("old", {3: 1}))).fenced == {3: 2}


async def test_text_too_long_to_index_rejects_its_run_only(store: PostgresStore) -> None:
    from hotstate import Transition, TransitionKind

    long_id = secrets.token_urlsafe(4000)  # ~5,300 characters that do not compress under the index's limit
    step = TransitionKind.step
    result = await store.save(
        [snap("short", 1), snap(long_id, 1)],
        [Transition(r, 1, step, 0, Status.running, 1.0, None) for r in ("short", long_id)],
    )
    assert result.written == 1
    assert set(result.rejected) == {long_id}
    assert "PostgreSQL indexes at most" in result.rejected[long_id]
    assert await store.load("short") is not None
    letter_refusals = await store.save_dead_letters(
        [
            StoredDeadLetter(
                run_id=rid,
                workflow="linear",
                at=1.0,
                error="{}",
                attempts="[]",
                compensation_errors="[]",
                snapshot=snap(rid, 1),
            )
            for rid in (long_id, "short")
        ]
    )
    assert set(letter_refusals or {}) == {long_id}
    assert [d.run_id for d in await store.dead_letters()] == ["short"]
    await store.save_versions([snap(long_id, 1), snap("short", 1)])
    assert await store.load_version("short", 1) is not None


async def test_a_long_batch_checks_the_fence_in_every_transaction(
    store: PostgresStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hotstate import Transition, TransitionKind

    monkeypatch.setattr(postgres_rows, "TRANSACTION_TRANSITIONS", 10)  # read by _parts
    rid = next(f"r{i}" for i in range(100) if shard_of(f"r{i}", SHARDS) == 5)
    fence = Fence("old", {5: 1})
    calls = 0
    real = store._transaction  # the seam between two transactions of one save

    def claiming(action: str) -> Any:
        nonlocal calls
        calls += 1
        if calls == 2:  # a claim that commits between the first and the second transaction
            return _sealed_then(real(action), store)
        return real(action)

    monkeypatch.setattr(store, "_transaction", claiming)
    transitions = [
        Transition(rid, v, TransitionKind.step, v - 1, Status.running, 1_700_000_000.0, None) for v in range(1, 31)
    ]
    result = await store.save([snap(rid, 30)], transitions, fence=fence)
    assert result.fenced == {5: 2}
    assert result.written == 0
    assert [t.version for t in await store.history(rid)] == list(range(1, 11))  # the first transaction only
    assert await store.load(rid) is None


class _sealed_then:  # noqa: N801 - an async context manager wrapping the store's own
    def __init__(self, inner: Any, store: PostgresStore) -> None:
        self.inner, self.store = inner, store

    async def __aenter__(self) -> Any:
        other = PostgresStore(self.store.url, schema=self.store.schema)
        async with other:
            assert await other.seal(Fence("new", {5: 2})) == {}
        return await self.inner.__aenter__()

    async def __aexit__(self, *exc: object) -> Any:
        return await self.inner.__aexit__(*exc)


async def test_processes_creating_one_schema_at_once_all_open(postgres_url: str, postgres_schema: str) -> None:
    stores = [PostgresStore(postgres_url, schema=postgres_schema) for _ in range(4)]
    authority = PostgresAuthority(postgres_url, schema=postgres_schema)
    try:
        async with anyio.create_task_group() as tg:
            for s in stores:
                tg.start_soon(s.open)
            tg.start_soon(authority.open)
        assert {s.shards for s in stores} == {authority.shards}
    finally:
        for s in stores:
            await s.aclose()
        await authority.aclose()


async def test_another_shard_count_than_the_authority_recorded_is_refused(
    postgres_url: str, postgres_schema: str
) -> None:
    from hotstate import ConfigError

    authority = PostgresAuthority(postgres_url, schema=postgres_schema, shards=16)
    await authority.open()
    await authority.aclose()
    refused = PostgresStore(postgres_url, schema=postgres_schema, shards=32)
    with pytest.raises(ConfigError, match="16 shards"):
        await refused.open()


# --- outages -----------------------------------------------------------------------------


async def test_a_store_call_during_a_server_crash_fails_typed_and_works_again_after_the_restart(tmp_path: Path) -> None:
    with EmbeddedPostgres() as server:
        async with PostgresStore(server.url, timeout=3.0) as store:
            assert (await store.save([snap("a", 1)], [])).written == 1
            server.crash()
            with pytest.raises(StoreUnavailableError):
                await store.save([snap("a", 2)], [])
            with pytest.raises(StoreUnavailableError):
                await store.load("a")
            server.start()
            for _ in range(50):  # the pool replaces its broken connections
                try:
                    result = await store.save([snap("a", 2)], [])
                    break
                except StoreUnavailableError:
                    await anyio.sleep(0.05)
            else:
                raise AssertionError("the store did not come back")
            assert not result.reset  # a crash loses nothing committed: not a reset
            loaded = await store.load("a")
            assert loaded is not None
            assert loaded.header.version == 2


async def test_runs_finish_and_nothing_is_lost_across_a_server_crash_mid_load() -> None:
    with EmbeddedPostgres() as server:
        tier = Tier(PostgresStore(server.url, timeout=3.0, shards=SHARDS), FlushPolicy(interval=0.02))
        with anyio.fail_after(60):
            async with Runtime(WORKFLOWS, tiers=[tier]) as rt:
                handles = [await rt.spawn(SLOW, {"n": 0}) for _ in range(40)]
                await anyio.sleep(0.05)
                server.crash()
                await anyio.sleep(0.5)  # flushes fail meanwhile; the runs go on in memory
                server.start()
                for h in handles:
                    assert (await h.wait_finished())["n"] == 5
                await rt.flush()
                assert rt.statistics().tiers[0].failures > 0  # the outage was seen, and retried
        async with PostgresStore(server.url) as check:
            for h in handles:
                got = await check.load(h.run_id)
                assert got is not None
                assert got.header.status == "done"
                assert [t.version for t in await check.history(h.run_id)] == list(range(1, 7))


_CHILD = textwrap.dedent(
    """
    import sys, anyio
    from hotstate import Runtime, Step, Workflow
    from hotstate.persistence import FlushPolicy, PostgresStore, Tier

    async def slow(p, ctx):
        await anyio.sleep(0.05)
        return {**p, "n": p["n"] + 1}

    SLOW = Workflow("slow", [Step(fn=slow, name=f"s{i}") for i in range(40)])

    async def main():
        store = PostgresStore(sys.argv[1], schema=sys.argv[2], shards=8)
        async with Runtime([SLOW], tiers=[Tier(store, FlushPolicy(interval=0.01))]) as rt:
            ids = [(await rt.spawn(SLOW, {"n": 0})).run_id for _ in range(20)]
            await rt.flush()
            print(" ".join(ids), flush=True)
            await anyio.sleep(3600)

    anyio.run(main)
    """
)


async def test_a_new_runtime_resumes_every_run_of_a_process_killed_mid_run(
    postgres_url: str, postgres_schema: str
) -> None:
    argv = [sys.executable, "-c", _CHILD, postgres_url, postgres_schema]
    child = await anyio.to_thread.run_sync(functools.partial(subprocess.Popen, argv, stdout=subprocess.PIPE, text=True))
    try:
        assert child.stdout is not None
        ids = (await anyio.to_thread.run_sync(child.stdout.readline)).split()
        assert len(ids) == 20
        await anyio.sleep(0.3)  # some steps stored
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        if child.stdout is not None:
            child.stdout.close()
    store = PostgresStore(postgres_url, schema=postgres_schema)
    with anyio.fail_after(GUARD):
        async with Runtime([SLOW_40], tiers=[Tier(store, FlushPolicy(interval=0.01))], recover=True) as rt:
            # The dead process's leases are broken at once (same host, its pid gone).
            for rid in ids:
                assert (await rt.handle(rid).wait_finished())["n"] == 40
            await rt.flush()
    async with PostgresStore(postgres_url, schema=postgres_schema) as check:
        for rid in ids:
            history = await check.history(rid)
            resumed = [t for t in history if t.kind == "resumed"]
            assert len(resumed) == 1  # one takeover, and no version stored twice
            assert len({t.version for t in history}) == len(history)


async def slow40(p: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    await anyio.sleep(0.005)
    return {**p, "n": p["n"] + 1}


SLOW_40 = Workflow("slow", [Step(fn=slow40, name=f"s{i}") for i in range(40)])


# --- the command line ----------------------------------------------------------------------


async def _fill(url: str, schema: str) -> None:
    FLAKY["fail"] = True
    tier = Tier(PostgresStore(url, schema=schema, shards=SHARDS), FlushPolicy(interval=60.0))
    async with Runtime(WORKFLOWS, tiers=[tier]) as rt:
        for i in range(3):
            await (await rt.spawn(LINEAR, {"n": i}, run_id=f"lin-{i}")).wait_finished()
        with pytest.raises(RunFailedError):
            await (await rt.spawn(ORDER, {"n": 0}, run_id="order-7")).wait_finished()
        await rt.flush()


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(["runs", *argv])
    out, err = capsys.readouterr()
    return status, out, err


async def _marks(url: str, schema: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        count: int = await conn.fetchval(f'SELECT count(*) FROM "{schema}".hs_writer_marks')  # noqa: S608
        return count
    finally:
        await conn.close()


def test_hotstate_runs_reads_postgres_and_writes_nothing_while_inspecting(
    postgres_url: str, postgres_schema: str, capsys: pytest.CaptureFixture[str]
) -> None:
    anyio.run(_fill, postgres_url, postgres_schema)
    pg = ("--postgres", postgres_url, "--schema", postgres_schema)
    status, out, _ = cli(capsys, *pg, "list", "--json")
    assert status == 0
    rows = json.loads(out)
    assert {r["run_id"]: r["status"] for r in rows} == {
        "lin-0": "done",
        "lin-1": "done",
        "lin-2": "done",
        "order-7": "failed",
    }
    status, out, _ = cli(capsys, *pg, "show", "lin-1", "--json")
    assert status == 0
    shown = json.loads(out)
    assert (shown["status"], shown["source"], shown["shard"]) == ("done", "postgres", shard_of("lin-1", SHARDS))
    assert shown["held_by"] is None  # the runtime released its shards at shutdown
    status, out, _ = cli(capsys, *pg, "history", "lin-1", "--json")
    assert status == 0
    assert [t["version"] for t in json.loads(out)] == [1, 2, 3, 4]
    status, out, _ = cli(capsys, *pg, "dead-letters", "--json")
    assert status == 0
    assert [d["run_id"] for d in json.loads(out)] == ["order-7"]
    status, out, _ = cli(capsys, *pg, "shards", "--json")
    assert status == 0
    assert len(json.loads(out)["shards"]) == SHARDS
    assert anyio.run(_marks, postgres_url, postgres_schema) == 0  # no writer's mark: nothing written
    status, _, err = cli(capsys, *pg, "show", "nope")
    assert status == 1
    assert "nope" in err
    status, _, err = cli(capsys, "--postgres", "mysql://x", "list")
    assert status == 2
    assert "postgresql://" in err


def test_hotstate_runs_retry_requeues_a_postgres_dead_letter_and_a_recovering_runtime_finishes_it(
    postgres_url: str, postgres_schema: str, capsys: pytest.CaptureFixture[str]
) -> None:
    anyio.run(_fill, postgres_url, postgres_schema)
    status, _, err = cli(capsys, "--postgres", postgres_url, "--schema", postgres_schema, "retry", "order-7")
    assert status == 0, err
    FLAKY["fail"] = False

    async def finish() -> dict[str, Any]:
        tier = Tier(PostgresStore(postgres_url, schema=postgres_schema), FlushPolicy(interval=0.01))
        async with Runtime(WORKFLOWS, tiers=[tier], recover=True) as rt:
            with anyio.fail_after(GUARD):
                out: dict[str, Any] = await rt.handle("order-7").wait_finished()
            return out

    assert anyio.run(finish)["charged"] is True
