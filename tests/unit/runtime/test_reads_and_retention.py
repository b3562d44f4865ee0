"""Reads and retention (#10, item 6): ``load``, ``list_stored``, ``evict_finished`` and ``retain_finished``.

On MemoryStore tiers and a ManualClock: no I/O, no real time. A finished run
can leave memory and still answer from the stores; a stored run is read
without being adopted or run again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel
import pytest

from hotstate import (
    ConfigError,
    CorruptSnapshotError,
    FlushPolicy,
    RetryPolicy,
    RunNotFoundError,
    Runtime,
    RuntimeClosedError,
    Status,
    Step,
    StepContext,
    StoreUnavailableError,
    Tier,
    Workflow,
)
from hotstate.persistence import MemoryStore, RunHeader, StoredSnapshot
from hotstate.testing import ManualClock, checkpoint_until

if TYPE_CHECKING:
    from collections.abc import Sequence

    from hotstate.runtime._registry import ListedRun

GUARD = 5  # seconds; a hang guard only

calls: list[str] = []  # every step execution, by run id: the side effect a read must never cause


async def count(p: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    calls.append(ctx.run_id)
    return {**p, "n": p["n"] + 1}


async def take(p: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    calls.append(ctx.run_id)
    return {**p, "got": ctx.signal}


async def boom(p: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    raise ValueError("card declined")


ORDER = Workflow("order", [Step(fn=count, name="reserve"), Step(fn=count, name="ship")])
PARKED = Workflow("parked", [Step(fn=count, name="a"), Step(fn=take, wait_for="go"), Step(fn=count, name="b")])
DOOMED = Workflow("doomed", [Step(fn=boom, name="charge", retry=RetryPolicy(max_attempts=1))])
WORKFLOWS = [ORDER, PARKED, DOOMED]


@pytest.fixture(autouse=True)
def _no_calls() -> None:
    calls.clear()


def two_tiers(fast: MemoryStore, slow: MemoryStore, *, interval: float = 60.0) -> list[Tier]:
    return [
        Tier(fast, FlushPolicy(interval=interval, ack_timeout=2.0)),
        Tier(slow, FlushPolicy(interval=interval, ack_timeout=2.0)),
    ]


async def finish(rt: Runtime, ids: Sequence[str]) -> None:
    for rid in ids:
        await rt.spawn(ORDER, {"n": 0}, run_id=rid)
    with anyio.fail_after(GUARD):
        for rid in ids:
            assert await rt.wait_finished(rid) == {"n": 2}


async def park(rt: Runtime, ids: Sequence[str]) -> None:
    for rid in ids:
        await rt.spawn(PARKED, {"n": 0}, run_id=rid)
    await checkpoint_until(lambda: all(rt.get(rid).status is Status.waiting for rid in ids))


async def listed_all(rt: Runtime, *, limit: int, **filters: Any) -> list[ListedRun]:
    """Every page of ``list_stored``, concatenated."""
    out: list[ListedRun] = []
    after: str | None = None
    while True:
        page = await rt.list_stored(after=after, limit=limit, **filters)
        out.extend(page)
        if len(page) < limit:
            return out
        after = page[-1].run_id


def resident_state(rt: Runtime, run_id: str) -> list[int]:
    """What the tiers' persisters still hold for ``run_id`` (durable versions; white-box on purpose)."""
    return [p.durable[run_id] for p in rt._tiers._persisters if run_id in p.durable]


# ------------------------------------------------------------------ load


async def test_load_answers_stored_runs_after_a_restart_without_adopting_or_running_them():
    fast, slow = MemoryStore(tier="fast"), MemoryStore(tier="slow")
    clock = ManualClock()
    async with Runtime(WORKFLOWS, tiers=two_tiers(fast, slow), clock=clock) as rt:
        await finish(rt, [f"o{i}" for i in range(10)])
        await park(rt, ["p0", "p1"])
    executed = len(calls)
    async with Runtime(WORKFLOWS, tiers=two_tiers(fast, slow), clock=clock) as rt:  # no recovery
        for i in range(10):
            with pytest.raises(RunNotFoundError):
                rt.get(f"o{i}")  # before: the only read, memory only
            snap = await rt.load(f"o{i}")
            assert (snap.status, snap.payload, snap.version) == (Status.done, {"n": 2}, 3)
        snap = await rt.load("p0")
        assert (snap.status, snap.step) == (Status.waiting, 1)
        assert rt.count() == 0  # nothing was brought into memory
        assert rt.statistics().ready == 0
        await anyio.lowlevel.checkpoint()
        assert len(calls) == executed  # no step ran
        assert resident_state(rt, "o0") == []  # a read records nothing per run
        assert await rt.load("p0") == snap  # the same answer twice


async def test_load_answers_from_memory_first_and_works_memory_only():
    async with Runtime(WORKFLOWS, clock=ManualClock()) as rt:
        await finish(rt, ["a"])
        assert await rt.load("a") is rt.get("a")
        with pytest.raises(RunNotFoundError):
            await rt.load("nope")


async def test_load_of_an_unknown_id_raises_run_not_found_and_a_bad_id_raises_config_error():
    async with Runtime(WORKFLOWS, tiers=two_tiers(MemoryStore(tier="a"), MemoryStore(tier="b"))) as rt:
        with pytest.raises(RunNotFoundError) as info:
            await rt.load("nope")
        assert info.value.run_id == "nope"
        for bad in ("", None, 7, b"x"):
            with pytest.raises(ConfigError):
                await rt.load(bad)  # type: ignore[arg-type]
    with pytest.raises(RuntimeClosedError):
        await rt.load("nope")  # the stores are closed


async def test_load_falls_back_past_a_corrupt_newest_copy_and_raises_when_none_verifies():
    fast, slow = MemoryStore(tier="fast"), MemoryStore(tier="slow")
    async with Runtime(WORKFLOWS, tiers=two_tiers(fast, slow), clock=ManualClock()) as rt:
        await finish(rt, ["a"])
        await rt.flush()
        assert await rt.evict_finished(0.0) == 0  # updated now: not older than 0 s yet
        good = await slow.load("a")
    assert good is not None
    await fast.open()
    tampered = StoredSnapshot(header=good.header._replace(version=9), error=None, body=good.body[:-1] + b"!")
    await fast.save([tampered], [])
    await fast.aclose()
    async with Runtime(WORKFLOWS, tiers=two_tiers(fast, slow), clock=ManualClock()) as rt:
        snap = await rt.load("a")
        assert (snap.version, snap.payload) == (3, {"n": 2})  # slow's copy: the newest that verifies
        await slow.save([tampered], [])
        with pytest.raises(CorruptSnapshotError) as info:
            await rt.load("a")
        assert (info.value.run_id, info.value.version) == ("a", 9)
        assert rt.count() == 0


class HangingReads:
    """A MemoryStore whose reads never answer while ``hang`` is set (a stopped server)."""

    def __init__(self, tier: str) -> None:
        self.inner = MemoryStore(tier=tier)
        self.tier = tier
        self.hang = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def load(self, run_id: str) -> StoredSnapshot | None:
        if self.hang:
            await anyio.sleep_forever()
        return await self.inner.load(run_id)

    async def scan(self, **kwargs: Any) -> list[RunHeader]:
        if self.hang:
            await anyio.sleep_forever()
        return await self.inner.scan(**kwargs)


async def test_a_down_tier_makes_load_and_list_stored_raise_store_unavailable():
    fast, slow = MemoryStore(tier="fast"), MemoryStore(tier="slow")
    clock = ManualClock()
    async with Runtime(WORKFLOWS, tiers=two_tiers(fast, slow), clock=clock) as rt:
        await finish(rt, ["a", "b"])
        await clock.advance(1.0)
        assert await rt.evict_finished(0.5) == 2
        slow.down = True  # it may hold the newest copy: no answer from the other tier alone
        with pytest.raises(StoreUnavailableError) as info:
            await rt.load("a")
        assert info.value.tier == "slow"
        with pytest.raises(StoreUnavailableError, match="list its runs"):
            await rt.list_stored()
        with pytest.raises(RunNotFoundError):
            rt.get("a")
        slow.down = False
        assert (await rt.load("a")).status is Status.done
        assert [r.run_id for r in await rt.list_stored()] == ["a", "b"]


async def test_a_down_cache_tier_is_left_out_of_load_and_list_stored():
    cache, durable = MemoryStore(tier="cache"), MemoryStore(tier="durable")
    clock = ManualClock()
    tiers = [Tier(cache, FlushPolicy(interval=60.0, cache=True)), Tier(durable, FlushPolicy(interval=60.0))]
    async with Runtime(WORKFLOWS, tiers=tiers, clock=clock) as rt:
        await finish(rt, ["a"])
        await clock.advance(1.0)
        assert await rt.evict_finished(0.5) == 1
        cache.down = True  # a cache, not a guarantee: the other tier answers
        assert (await rt.load("a")).status is Status.done
        assert [(r.run_id, r.tier) for r in await rt.list_stored(status="done")] == [("a", "durable")]
        durable.down = True
        with pytest.raises(StoreUnavailableError):
            await rt.load("a")
        with pytest.raises(StoreUnavailableError):
            await rt.list_stored()
        cache.down = durable.down = False


async def test_a_tier_that_does_not_answer_makes_load_and_list_stored_raise_after_its_ack_timeout():
    clock = ManualClock()
    store = HangingReads("slow")
    async with Runtime(WORKFLOWS, tiers=[Tier(store, FlushPolicy(interval=60.0, ack_timeout=2.0))], clock=clock) as rt:
        store.hang = True
        outcome: list[BaseException] = []

        async def read(what: str) -> None:
            try:
                if what == "load":
                    await rt.load("x")
                else:
                    await rt.list_stored()
            except StoreUnavailableError as exc:
                outcome.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(read, "load")
            tg.start_soon(read, "list")
            await checkpoint_until(lambda: clock.sleepers >= 2)
            await clock.advance(1.9)
            assert outcome == []
            await clock.advance(0.2)
        assert len(outcome) == 2
        assert all("2 s" in str(exc) for exc in outcome)


# ------------------------------------------------------------ list_stored


async def test_list_stored_merges_memory_and_every_tier_once_per_run_ordered_by_id_with_a_cursor():
    fast, slow = MemoryStore(tier="fast"), MemoryStore(tier="slow")
    clock = ManualClock()
    async with Runtime(WORKFLOWS, tiers=two_tiers(fast, slow), clock=clock) as rt:
        await finish(rt, [f"o{i:02d}" for i in range(12)])
        await clock.advance(1.0)
        assert await rt.evict_finished(0.5) == 12  # stored only now
        await park(rt, ["p0", "p1"])  # in memory, not flushed: no tier has them
        await rt.flush()
        await rt.send("p1", "go", 1)  # newer in memory than in the tiers
        await checkpoint_until(lambda: rt.get("p1").status is Status.done)
        everything = await listed_all(rt, limit=5)
        assert [r.run_id for r in everything] == [*(f"o{i:02d}" for i in range(12)), "p0", "p1"]
        by_id = {r.run_id: r for r in everything}
        assert (by_id["o03"].tier, by_id["o03"].status, by_id["o03"].version) == ("fast", Status.done, 3)
        assert (by_id["p1"].tier, by_id["p1"].status) == ("hot", Status.done)  # memory wins
        assert by_id["p0"].tier == "hot"
        assert by_id["o03"].updated_at == (await rt.load("o03")).updated_at
        assert [r.run_id for r in await rt.list_stored(status="waiting")] == ["p0"]
        assert [r.run_id for r in await rt.list_stored(status=Status.done, after="o10")] == ["o11", "p1"]
        assert [r.run_id for r in await rt.list_stored(workflow="parked")] == ["p0", "p1"]
        assert await rt.list_stored(workflow="nope") == []
        assert len(await rt.list_stored(limit=10_000)) == 14
        assert rt.count() == 2  # listing brings nothing into memory


async def test_list_stored_filters_on_the_newest_copy_not_on_a_stale_tier():
    """A run finished in one tier but still waiting in a tier that is behind is not 'waiting'."""
    fast, slow = MemoryStore(tier="fast"), MemoryStore(tier="slow")
    clock = ManualClock()
    async with Runtime(WORKFLOWS, tiers=two_tiers(fast, slow), clock=clock) as rt:
        await park(rt, ["r1", "r2"])
        await rt.flush()
        waiting = await slow.load("r1")
    assert waiting is not None
    async with Runtime(WORKFLOWS, tiers=two_tiers(fast, slow), clock=clock, recover=True) as rt:
        await rt.send("r1", "go", 1)
        await checkpoint_until(lambda: rt.get("r1").status is Status.done)
        await clock.advance(1.0)
        assert await rt.evict_finished(0.5) == 1
    await slow.open()  # the slow tier goes back to r1's older, waiting copy
    slow._runs["r1"] = waiting  # white-box: the state a crash between the tiers' flushes leaves
    await slow.aclose()
    async with Runtime(WORKFLOWS, tiers=two_tiers(fast, slow), clock=clock) as rt:
        assert [(r.run_id, r.tier) for r in await rt.list_stored(status="done")] == [("r1", "fast")]
        assert [r.run_id for r in await rt.list_stored(status="waiting")] == ["r2"]
        done = await fast.load("r1")
        assert done is not None
        assert done.header.version > waiting.header.version
        listed = await rt.list_stored()
        assert [(r.run_id, r.version, r.tier) for r in listed] == [
            ("r1", done.header.version, "fast"),
            ("r2", listed[1].version, "fast"),
        ]


async def test_list_stored_skips_a_malformed_row_and_lists_the_rest():
    store = MemoryStore(tier="mem")
    async with Runtime(WORKFLOWS, tiers=[Tier(store, FlushPolicy(interval=60.0))], clock=ManualClock()) as rt:
        await finish(rt, ["a", "b", "c"])
        await rt.flush()
        good = await store.load("b")
        assert good is not None
        await store.save([good._replace(header=good.header._replace(version=99, step="two"))], [])  # type: ignore[arg-type]
        assert [r.run_id for r in await rt.list_stored()] == ["a", "b", "c"]  # b is in memory
    async with Runtime(WORKFLOWS, tiers=[Tier(store, FlushPolicy(interval=60.0))], clock=ManualClock()) as rt:
        assert [r.run_id for r in await rt.list_stored()] == ["a", "c"]


async def test_list_stored_rejects_bad_arguments():
    async with Runtime(WORKFLOWS, tiers=[Tier(MemoryStore(), FlushPolicy())]) as rt:
        for kwargs in (
            {"limit": 0},
            {"limit": 10_001},
            {"limit": True},
            {"limit": "5"},
            {"status": "bogus"},
            {"after": 5},
            {"workflow": ""},
        ):
            with pytest.raises(ConfigError):
                await rt.list_stored(**kwargs)
    with pytest.raises(RuntimeClosedError):
        await rt.list_stored()


# ---------------------------------------------------------------- retention


async def test_evict_finished_frees_memory_and_load_list_stored_and_history_still_answer():
    fast, slow = MemoryStore(tier="fast"), MemoryStore(tier="slow")
    clock = ManualClock()
    async with Runtime(WORKFLOWS, tiers=two_tiers(fast, slow), clock=clock) as rt:
        ids = [f"o{i:03d}" for i in range(200)]
        await finish(rt, ids)
        await park(rt, ["p0"])
        doomed = await rt.spawn(DOOMED, {"n": 0}, run_id="d0")
        await checkpoint_until(lambda: rt.get("d0").status is Status.failed)
        await clock.advance(1.0)
        await finish(rt, ["young"])
        assert rt.count() == 203
        assert await rt.evict_finished(0.5) == 200  # flushed first; the young, parked and dead-lettered stay
        assert rt.count() == 3
        assert sorted(r.run_id for r in rt.list_runs()) == ["d0", "p0", "young"]
        assert [d.run_id for d in rt.dead_letters()] == [doomed.run_id]
        with pytest.raises(RunNotFoundError):
            rt.get("o000")
        for rid in ids:
            assert (await rt.load(rid)).payload == {"n": 2}
            assert resident_state(rt, rid) == []  # no per-run persister state left behind
        assert len(rt._tiers.encoder) == 0
        assert len(await listed_all(rt, limit=64)) == 203
        for store in (fast, slow):
            assert [t.version for t in await store.history("o000")] == [1, 2, 3]  # the audit trail stays
        assert await rt.evict_finished(0.5) == 0


async def test_spawn_of_an_evicted_id_returns_the_finished_run_without_running_it_again():
    clock = ManualClock()
    async with Runtime(WORKFLOWS, tiers=[Tier(MemoryStore(), FlushPolicy(interval=60.0))], clock=clock) as rt:
        await finish(rt, ["a"])
        await clock.advance(1.0)
        assert await rt.evict_finished(0.5) == 1
        executed = len(calls)
        run = await rt.spawn(ORDER, {"n": 100}, run_id="a")
        with anyio.fail_after(GUARD):
            assert await run.wait_finished() == {"n": 2}  # the stored result, not a new run
        assert rt.get("a").version == 3
        assert len(calls) == executed
        assert await rt.evict_finished(0.5) == 1  # and it can leave again


async def test_retain_finished_evicts_on_the_runtime_clock_once_durable_everywhere():
    fast, slow = MemoryStore(tier="fast"), MemoryStore(tier="slow")
    clock = ManualClock()
    tiers = [Tier(fast, FlushPolicy(interval=1.0)), Tier(slow, FlushPolicy(interval=30.0))]
    async with Runtime(WORKFLOWS, tiers=tiers, clock=clock, retain_finished=10.0) as rt:  # a tick every 2.5 s
        await finish(rt, ["a", "b"])
        await clock.advance(12.6)  # old enough, durable in fast, not yet in slow
        assert rt.count() == 2
        assert rt.durable_versions("a") == {"hot": 3, "fast": 3, "slow": 0}
        await clock.advance(17.5)  # slow flushes at 30 s
        assert rt.durable_versions("a") == {"hot": 3, "fast": 3, "slow": 3}
        await clock.advance(2.5)  # the next tick
        await checkpoint_until(lambda: rt.count() == 0)
        assert (await rt.load("a")).status is Status.done
        await finish(rt, ["c"])
        await clock.advance(5.0)
        assert [r.run_id for r in rt.list_runs()] == ["c"]  # not old enough yet


async def test_retain_finished_keeps_runs_while_a_tier_cannot_take_them():
    store = MemoryStore()
    clock = ManualClock()
    async with Runtime(WORKFLOWS, tiers=[Tier(store, FlushPolicy(interval=1.0))], clock=clock, retain_finished=0) as rt:
        store.down = True
        run = await rt.spawn(ORDER, {"n": 0})  # a generated id: no lookup in the down tier
        with anyio.fail_after(GUARD):
            await run.wait_finished()
        await clock.advance(5.0)
        assert rt.count() == 1  # its final version is in no store: it stays
        store.down = False
        await rt.flush()
        await clock.advance(1.0)  # the next tick
        await checkpoint_until(lambda: rt.count() == 0)
        assert (await rt.load(run.run_id)).payload == {"n": 2}


async def test_retention_needs_a_tier_and_a_non_negative_age():
    with pytest.raises(ConfigError, match="memory-only"):
        Runtime(WORKFLOWS, retain_finished=60.0)
    for bad in (-1.0, float("nan"), "60", True):
        with pytest.raises(ConfigError):
            Runtime(WORKFLOWS, tiers=[Tier(MemoryStore(), FlushPolicy())], retain_finished=bad)  # type: ignore[arg-type]
    async with Runtime(WORKFLOWS, clock=ManualClock()) as rt:
        with pytest.raises(ConfigError, match="memory-only"):
            await rt.evict_finished(0.0)
    async with Runtime(WORKFLOWS, tiers=[Tier(MemoryStore(), FlushPolicy())], clock=ManualClock()) as rt:
        with pytest.raises(ConfigError):
            await rt.evict_finished(-1.0)
    with pytest.raises(RuntimeClosedError):
        await rt.evict_finished(0.0)


async def test_purge_finished_still_deletes_what_eviction_left_in_the_stores():
    store = MemoryStore()
    clock = ManualClock()
    async with Runtime(WORKFLOWS, tiers=[Tier(store, FlushPolicy(interval=60.0))], clock=clock) as rt:
        await finish(rt, ["a", "b"])
        await clock.advance(1.0)
        assert await rt.evict_finished(0.5) == 2
        assert await rt.purge_finished(0.5) == {"hot": 0, "memory": 2}
        with pytest.raises(RunNotFoundError):
            await rt.load("a")
        assert await rt.list_stored() == []
