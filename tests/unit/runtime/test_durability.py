"""The runtime with persistence tiers, on MemoryStore and a ManualClock: no I/O, no real time."""

from __future__ import annotations

import threading
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from hotstate import (
    CodecError,
    ConfigError,
    CorruptSnapshotError,
    DurabilityTimeoutError,
    FlushPolicy,
    PickleCodec,
    RetryPolicy,
    RunFailedError,
    RunHandle,
    Runtime,
    Status,
    Step,
    StepContext,
    StoreUnavailableError,
    Tier,
    TransitionKind,
    Workflow,
)
from hotstate.persistence import MemoryStore, StoredSnapshot
from hotstate.persistence._records import decode_snapshot
from hotstate.testing import ManualClock


async def inc(p: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    return {**p, "n": p["n"] + 1}


async def take(p: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    return {**p, "got": ctx.signal}


LINEAR = Workflow("linear", [Step(fn=inc, name=f"s{i}") for i in range(5)])
SIGNAL = Workflow("signal", [Step(fn=inc, name="a"), Step(fn=take, wait_for="go"), Step(fn=inc, name="b")])


async def settle() -> None:
    for _ in range(50):
        await anyio.lowlevel.checkpoint()


async def test_write_behind_writes_nothing_until_the_interval_then_the_latest_snapshot():
    clock = ManualClock()
    store = MemoryStore()
    async with Runtime([LINEAR], clock=clock, tiers=[Tier(store, FlushPolicy(interval=1.0))]) as rt:
        run = await rt.spawn(LINEAR, {"n": 0}, run_id="r1")
        assert await run.wait_finished() == {"n": 5}
        assert await store.load("r1") is None  # nothing written: the interval has not passed
        assert rt.durable_versions("r1") == {"hot": 6, "memory": 0}
        await clock.advance(1.0)
        await settle()
        stored = await store.load("r1")
        assert stored is not None
        assert stored.header.version == 6
        assert stored.header.status == "done"
        assert [t.version for t in await store.history("r1")] == [1, 2, 3, 4, 5, 6]
        stats = rt.tier_statistics()[0]
        assert stats.snapshots_written == 1  # coalesced: one snapshot for six transitions
        assert stats.transitions_written == 6


async def test_flush_makes_everything_durable_now():
    store = MemoryStore()
    async with Runtime([LINEAR], clock=ManualClock(), tiers=[Tier(store, FlushPolicy(interval=60.0))]) as rt:
        runs = [await rt.spawn(LINEAR, {"n": i}) for i in range(20)]
        for run in runs:
            await run.wait_finished()
        await rt.flush()
        for run in runs:
            assert rt.durable_versions(run.run_id)["memory"] == rt.get(run.run_id).version


async def test_failed_flush_merges_the_batch_back_and_newer_versions_win():
    clock = ManualClock()
    store = MemoryStore()
    policy = FlushPolicy(interval=1.0, retry_initial=0.5)
    async with Runtime([SIGNAL], clock=clock, tiers=[Tier(store, policy)]) as rt:
        run = await rt.spawn(SIGNAL, {"n": 0}, run_id="r1")
        await settle()
        assert rt.get("r1").status is Status.waiting
        store.down = True
        with pytest.raises(StoreUnavailableError):
            await rt.flush()
        assert rt.tier_statistics()[0].failures >= 1
        await run.send("go", 7)  # newer versions arrive while the tier is down
        assert await run.wait_finished() == {"n": 2, "got": 7}
        store.down = False
        for _ in range(5):
            await clock.advance(1.0)  # past the retry backoff
        await settle()
        stored = await store.load("r1")
        assert stored is not None
        assert stored.header.version == rt.get("r1").version
        history = await store.history("r1")
        assert [t.version for t in history] == list(range(1, rt.get("r1").version + 1))
        assert rt.tier_statistics()[0].consecutive_failures == 0


async def test_a_failing_tier_does_not_stop_the_other_tier():
    clock = ManualClock()
    down, up = MemoryStore(tier="down"), MemoryStore(tier="up")
    tiers = [Tier(down, FlushPolicy(interval=1.0)), Tier(up, FlushPolicy(interval=1.0))]
    async with Runtime([LINEAR], clock=clock, tiers=tiers) as rt:
        down.down = True
        run = await rt.spawn(LINEAR, {"n": 0})  # a generated id: no tier lookup (an explicit id would need "down")
        rid = run.run_id
        await run.wait_finished()
        await clock.advance(1.0)
        await settle()
        assert (await up.load(rid)) is not None
        assert rt.durable_versions(rid) == {"hot": 6, "down": 0, "up": 6}
        down.down = False
        for _ in range(5):
            await clock.advance(5.0)
        await settle()
        assert rt.durable_versions(rid)["down"] == 6


async def test_write_through_run_advances_only_after_its_snapshot_is_durable_with_group_commit():
    store = MemoryStore()
    async with Runtime([LINEAR], clock=ManualClock(), tiers=[Tier(store, FlushPolicy.through())]) as rt:
        runs: list[RunHandle] = []

        async def spawn(i: int) -> None:  # concurrent requests: their acknowledgements share commits too
            runs.append(await rt.spawn(LINEAR, {"n": i}))

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                for i in range(50):
                    tg.start_soon(spawn, i)
            for run in runs:  # spawn returned: v1 is durable
                assert (await store.load(run.run_id)) is not None
            for run in runs:
                await run.wait_finished()
        for run in runs:
            stored = await store.load(run.run_id)
            assert stored is not None
            # every version the run advanced past was durable first
            assert stored.header.version >= rt.get(run.run_id).version - 1
        # 50 runs x 6 versions, but group commit shares transactions
        assert store.saves < 50 * 6 / 5


async def test_write_through_waiter_gets_a_timeout_error_when_the_tier_is_down():
    clock = ManualClock()
    store = MemoryStore()
    policy = FlushPolicy.through(ack_timeout=2.0, retry_initial=0.1)
    async with Runtime([LINEAR], clock=clock, tiers=[Tier(store, policy)]) as rt:
        store.down = True
        outcome: list[BaseException] = []

        async def spawner() -> None:  # write-through: spawn returns only once v1 is durable
            try:
                await rt.spawn(LINEAR, {"n": 0})  # a generated id: no tier lookup
            except DurabilityTimeoutError as exc:
                outcome.append(exc)

        async def waiter(rid: str) -> None:
            try:
                await rt.wait_durable(rid)
            except DurabilityTimeoutError as exc:
                outcome.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(spawner)
            await settle()
            (spawned,) = rt.list_runs()
            rid = spawned.run_id
            assert rt.get(rid).version == 1  # parked: v1 is not durable, the run does not advance
            assert outcome == []  # and spawn has not acknowledged it
            tg.start_soon(waiter, rid)
            await settle()
            await clock.advance(2.0)
            await settle()
        assert len(outcome) == 2  # spawn and wait_durable: both a typed timeout, never a false ack
        assert all(isinstance(exc, DurabilityTimeoutError) and exc.run_id == rid for exc in outcome)
        run = rt.handle(rid)
        store.down = False  # nothing was lost: once the tier is back the run finishes
        for _ in range(20):
            await clock.advance(5.0)
            if rt.get(rid).finished:
                break
        assert await run.wait_finished() == {"n": 5}


async def test_backpressure_parks_steps_above_the_memory_bound_and_loses_nothing():
    clock = ManualClock()
    store = MemoryStore()
    policy = FlushPolicy(interval=10.0, max_pending_rows=40, max_batch_rows=1000)
    async with Runtime([LINEAR], clock=clock, tiers=[Tier(store, policy)]) as rt:
        runs = [await rt.spawn(LINEAR, {"n": i}) for i in range(30)]
        await settle()
        assert rt.statistics().throttle_waits > 0
        assert rt.tier_statistics()[0].backpressure_events >= 1
        with anyio.fail_after(5):
            for run in runs:
                await run.wait_finished()
        await rt.flush()
        for run in runs:
            stored = await store.load(run.run_id)
            assert stored is not None
            assert stored.header.status == "done"
            assert len(await store.history(run.run_id)) == 6


async def test_unpicklable_payload_fails_only_its_run_with_a_codec_error_and_dead_letter():
    store = MemoryStore()
    async with Runtime([SIGNAL], clock=ManualClock(), tiers=[Tier(store, FlushPolicy(interval=60.0))]) as rt:
        bad = await rt.spawn(SIGNAL, {"n": 0, "lock": threading.Lock()}, run_id="bad")
        good = await rt.spawn(SIGNAL, {"n": 0}, run_id="good")
        await settle()
        await rt.flush()
        with pytest.raises(RunFailedError) as info:
            await bad.wait_finished()
        assert "lock" in info.value.error.message
        assert "bad" in info.value.error.message
        assert isinstance(info.value.__cause__, CodecError)
        assert (await store.load("good")) is not None  # the rest of the batch was written
        await good.send("go", 1)
        assert (await good.wait_finished())["got"] == 1
        await rt.flush()
        letters = await store.dead_letters()
        assert [d.run_id for d in letters] == ["bad"]
        failed = await store.load("bad")
        assert failed is not None
        assert failed.header.status == "failed"


async def test_recovery_resumes_unfinished_runs_from_their_latest_snapshot():
    store = MemoryStore()
    async with Runtime([SIGNAL], tiers=[Tier(store, FlushPolicy(interval=60.0))]) as rt:
        for i in range(10):
            await rt.spawn(SIGNAL, {"n": i}, run_id=f"r{i}")
        await settle()
        assert rt.count(status="waiting") == 10
    # the graceful exit flushed everything; a new runtime picks the runs up
    async with Runtime([SIGNAL], tiers=[Tier(store, FlushPolicy(interval=60.0))], recover=True) as rt:
        report = rt.recovery_report
        assert report is not None
        assert len(report.resumed) == 10
        assert rt.count(status="waiting") == 10
        assert rt.statistics().tasks == 0  # waiting runs hold no task
        assert rt.history("r3")[-1].kind is TransitionKind.resumed
        again = await rt.spawn(SIGNAL, {"n": 99}, run_id="r3")  # never a duplicate
        assert rt.get(again.run_id).payload == {"n": 4}
        await again.send("go", "x")
        assert await again.wait_finished() == {"n": 5, "got": "x"}


async def test_spawn_with_an_id_only_the_store_knows_returns_that_run():
    store = MemoryStore()
    async with Runtime([LINEAR], tiers=[Tier(store, FlushPolicy(interval=60.0))]) as rt:
        run = await rt.spawn(LINEAR, {"n": 0}, run_id="done-1")
        await run.wait_finished()
    async with Runtime([LINEAR], tiers=[Tier(store, FlushPolicy(interval=60.0))]) as rt:
        again = await rt.spawn(LINEAR, {"n": 100}, run_id="done-1")
        assert rt.get(again.run_id).status is Status.done
        assert await again.wait_finished() == {"n": 5}


async def test_recovery_falls_back_to_the_other_tier_when_the_newest_copy_is_corrupt():
    fast, slow = MemoryStore(tier="fast"), MemoryStore(tier="slow")
    key = b"k" * 32
    tiers = [Tier(fast, FlushPolicy(interval=60.0)), Tier(slow, FlushPolicy(interval=60.0))]
    async with Runtime([SIGNAL], tiers=tiers, codec=PickleCodec(key)) as rt:
        await rt.spawn(SIGNAL, {"n": 1}, run_id="r1")
        await settle()
        await rt.flush()
        both = rt.get("r1").version
    await fast.open()
    stored = await fast.load("r1")
    assert stored is not None
    assert stored.header.version == both
    # a newer copy in the fast tier, with one byte flipped
    body = bytearray(stored.body)
    body[-1] ^= 0xFF
    header = stored.header._replace(version=both + 5)
    fast._runs["r1"] = StoredSnapshot(header=header, error=stored.error, body=bytes(body))
    with pytest.raises(CorruptSnapshotError):
        decode_snapshot(fast._runs["r1"], PickleCodec(key), tier="fast")
    async with Runtime([SIGNAL], tiers=tiers, codec=PickleCodec(key), recover=True) as rt:
        report = rt.recovery_report
        assert report is not None
        assert [(c.run_id, c.tier, c.version) for c in report.corrupt] == [("r1", "fast", both + 5)]
        assert [(r.run_id, r.tier, r.version) for r in report.resumed] == [("r1", "slow", both)]
        assert rt.get("r1").payload == {"n": 2}


async def test_runs_of_unregistered_workflows_are_reported_and_kept():
    store = MemoryStore()
    async with Runtime([SIGNAL], tiers=[Tier(store, FlushPolicy(interval=60.0))]) as rt:
        await rt.spawn(SIGNAL, {"n": 0}, run_id="orphan")
        await settle()
    async with Runtime([LINEAR], tiers=[Tier(store, FlushPolicy(interval=60.0))], recover=True) as rt:
        report = rt.recovery_report
        assert report is not None
        assert report.unregistered == (("orphan", "signal"),)
        assert rt.count() == 0
    async with store:
        assert (await store.load("orphan")) is not None  # never deleted


async def test_dead_letters_are_persisted_and_removed_when_retried():
    attempts = {"n": 0}

    async def flaky(p: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        attempts["n"] += 1
        if attempts["n"] == 1:
            raise ValueError("boom")
        return p

    wf = Workflow("flaky", [Step(fn=flaky, retry=RetryPolicy.never())])
    store = MemoryStore()
    async with Runtime([wf], clock=ManualClock(), tiers=[Tier(store, FlushPolicy(interval=60.0))]) as rt:
        run = await rt.spawn(wf, {}, run_id="f1")
        with pytest.raises(RunFailedError):
            await run.wait_finished()
        await rt.flush()
        letters = await store.dead_letters()
        assert [d.run_id for d in letters] == ["f1"]
        assert "boom" in letters[0].error
        await rt.retry_dead_letter("f1")
        assert await run.wait_finished() == {}
        await rt.flush()
        assert await store.dead_letters() == []


async def test_purge_finished_forgets_old_finished_runs_in_memory_and_in_the_tiers():
    clock = ManualClock()
    store = MemoryStore()

    async def boom(p: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        raise ValueError("no")

    failing = Workflow("failing", [Step(fn=boom, retry=RetryPolicy.never())])
    async with Runtime([LINEAR, SIGNAL, failing], clock=clock, tiers=[Tier(store, FlushPolicy(interval=60.0))]) as rt:
        old = [await rt.spawn(LINEAR, {"n": i}) for i in range(5)]
        for run in old:
            await run.wait_finished()
        dead = await rt.spawn(failing, {})
        with pytest.raises(RunFailedError):
            await dead.wait_finished()
        waiting = await rt.spawn(SIGNAL, {"n": 0})
        await clock.advance(100.0)
        fresh = await rt.spawn(LINEAR, {"n": 0})
        await fresh.wait_finished()
        await settle()
        counts = await rt.purge_finished(50.0)
        assert counts == {"hot": 5, "memory": 6}  # the store drops the dead-lettered run too
        for run in old:
            with pytest.raises(Exception, match="no such run"):
                rt.get(run.run_id)
            assert await store.load(run.run_id) is None
        assert rt.get(fresh.run_id).status is Status.done  # too young
        assert rt.get(waiting.run_id).status is Status.waiting  # not finished
        assert rt.get(dead.run_id).status is Status.failed  # dead-lettered: kept for retry
        assert [d.run_id for d in rt.dead_letters()] == [dead.run_id]
        assert len(await store.dead_letters()) == 1


async def test_a_flush_with_more_dirty_runs_than_max_batch_rows_writes_all_of_them_in_chunks():
    store = MemoryStore()
    clock = ManualClock()
    policy = FlushPolicy(interval=60.0, max_batch_rows=3)
    async with Runtime([SIGNAL], clock=clock, tiers=[Tier(store, policy)]) as rt:
        runs = [await rt.spawn(SIGNAL, {"n": i}) for i in range(10)]
        await settle()  # a full batch is due at once: the loop flushes without waiting for the interval
        await rt.flush()
        # 10 dirty runs, saves of at most 3 runs each
        assert store.saves >= 4
        assert rt.tier_statistics()[0].pending_snapshots == 0
        assert rt.tier_statistics()[0].pending_transitions == 0
        for run in runs:
            assert rt.durable_versions(run.run_id)["memory"] == rt.get(run.run_id).version
            assert len(await store.history(run.run_id)) == rt.get(run.run_id).version


async def test_keep_every_gives_time_travel_to_earlier_versions():
    store = MemoryStore()
    clock = ManualClock()
    policy = FlushPolicy(interval=1.0, keep_every=2)
    async with Runtime([SIGNAL], clock=clock, tiers=[Tier(store, policy)]) as rt:
        run = await rt.spawn(SIGNAL, {"n": 0}, run_id="tt")
        await settle()
        await rt.flush()  # v3 (waiting, payload n=1) is kept
        waiting_version = rt.get("tt").version
        await run.send("go", "x")
        await run.wait_finished()
        await rt.flush()
        final = rt.get("tt")
        assert (await rt.snapshot_at("tt", final.version)) == final
        past = await rt.snapshot_at("tt", waiting_version)
        assert past.version == waiting_version
        assert past.status is Status.waiting
        assert past.payload == {"n": 1}
        with pytest.raises(Exception, match="no such run"):
            await rt.snapshot_at("tt", 0)


async def test_background_flushes_free_every_cached_encoding_of_finished_runs():
    """The review's reproduction: 2,000 finished runs, two tiers, loop flushes only (no Runtime.flush())."""
    clock = ManualClock()
    fast, slow = MemoryStore(tier="fast"), MemoryStore(tier="slow")
    tiers = [Tier(fast, FlushPolicy(interval=0.01)), Tier(slow, FlushPolicy(interval=1.0))]
    async with Runtime([LINEAR], clock=clock, tiers=tiers) as rt:
        runs = [await rt.spawn(LINEAR, {"n": i, "blob": "x" * 1000}) for i in range(2000)]
        for run in runs:
            await run.wait_finished()
        encoder = rt._tiers.encoder
        await clock.advance(0.01)
        for _ in range(20):
            await settle()
            if rt.tier_statistics()[0].pending_snapshots == 0:
                break
        assert rt.tier_statistics()[0].pending_snapshots == 0
        assert len(encoder) == 2000  # the slow tier has not written them yet: kept, not encoded twice
        await clock.advance(1.0)
        for _ in range(20):
            await settle()
            if all(s.pending_snapshots == 0 for s in rt.tier_statistics()):
                break
        assert [s.pending_snapshots for s in rt.tier_statistics()] == [0, 0]
        assert len(encoder) == 0  # before the fix: 2,000 until an explicit Runtime.flush()
        assert encoder.encodes == 2000


async def test_a_cache_tier_outage_past_its_bound_never_stalls_steps_and_the_cache_is_rewritten_once_back():
    """Before: a Valkey outage longer than its memory bound stalled every step although SQLite was healthy (#10)."""
    clock = ManualClock()
    cache, durable = MemoryStore(tier="cache"), MemoryStore(tier="durable")
    tiers = [
        Tier(cache, FlushPolicy(interval=0.01, max_pending_rows=20, retry_initial=0.01, retry_max=0.01, cache=True)),
        Tier(durable, FlushPolicy(interval=0.01)),
    ]
    async with Runtime([LINEAR], clock=clock, tiers=tiers) as rt:
        cache.down = True
        await rt.spawn(LINEAR, {"n": -1})
        await clock.advance(0.01)
        await settle()
        assert rt.tier_statistics()[0].consecutive_failures >= 1  # the cache is known to be down
        runs = [await rt.spawn(LINEAR, {"n": i}) for i in range(30)]  # 30 runs x 6 versions: far past 20 rows
        with anyio.fail_after(5):
            for i, run in enumerate(runs):
                assert await run.wait_finished() == {"n": i + 5}  # nobody waited for the cache
        await clock.advance(0.05)
        await settle()
        stats = {s.tier: s for s in rt.tier_statistics()}
        assert stats["cache"].dropped_rows > 0
        assert not stats["cache"].backpressure
        assert rt.statistics().throttle_waits == 0
        for run in runs:
            assert rt.durable_versions(run.run_id)["durable"] == 6  # the durable tier kept every guarantee
        cache.down = False  # the cache comes back: every run is written into it anew
        for _ in range(10):
            await clock.advance(0.05)
            await settle()
        for run in runs:
            stored = await cache.load(run.run_id)
            assert stored is not None
            assert stored.header.version == 6


async def test_a_cache_tier_is_never_an_acknowledging_tier_and_a_down_cache_never_blocks_spawn_of_an_id():
    cache, durable = MemoryStore(tier="cache"), MemoryStore(tier="durable")
    tiers = [Tier(cache, FlushPolicy(interval=60.0, cache=True)), Tier(durable, FlushPolicy(interval=60.0))]
    with pytest.raises(ConfigError, match="cache"):
        Runtime([LINEAR], tiers=tiers, ack_tiers=["cache"])
    async with Runtime([SIGNAL], clock=ManualClock(), tiers=tiers) as rt:
        cache.down = True
        await rt.spawn(SIGNAL, {"n": 0}, run_id="x")  # a down cache cannot hold a copy worth waiting for
        assert rt.get("x").run_id == "x"
        cache.down = False
