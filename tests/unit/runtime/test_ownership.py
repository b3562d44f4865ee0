"""Shard ownership in one process: several runtimes on one MemoryStore and one MemoryAuthority.

Lease time runs on a ManualClock shared by the authority and every runtime's
lease timing (``Ownership(clock=...)``), so expiry, renewal and placement are
driven by ``advance``, never by sleeping. Steps record every execution in a
ledger keyed by ``ctx.idempotency_key``-like ``(run, step)`` pairs.
"""

from __future__ import annotations

from collections import Counter
from contextlib import AsyncExitStack
from functools import partial
from typing import TYPE_CHECKING, Any

import anyio
import pytest

from hotstate import ConfigError, OwnershipLostError, Runtime, Step, Workflow
from hotstate.persistence import FlushPolicy, MemoryAuthority, MemoryStore, Tier, shard_of
from hotstate.runtime import Ownership
from hotstate.testing import ManualClock

if TYPE_CHECKING:
    from collections.abc import Callable

SHARDS = 16


class SharedStore(MemoryStore):  # type: ignore[misc]  # a test double of the final class
    """One MemoryStore object shared by several runtimes: it closes when the last of them closes it."""

    users = 0

    async def open(self) -> None:
        """Count one more user."""
        self.users += 1
        await super().open()

    async def aclose(self) -> None:
        """Close once no runtime uses it."""
        self.users -= 1
        if self.users <= 0:
            await super().aclose()


LEDGER: Counter[tuple[str, int]] = Counter()


async def record(payload: Any, ctx: Any) -> Any:
    LEDGER[ctx.run_id, ctx.step] += 1
    return payload


async def record_and_wait(payload: Any, ctx: Any) -> Any:
    LEDGER[ctx.run_id, ctx.step] += 1
    return {**payload, "got": ctx.signal}


ORDER = Workflow(
    "order",
    [
        Step(fn=record, name="reserve"),
        Step(fn=record_and_wait, name="pay", wait_for="paid"),
        Step(fn=record, name="ship"),
    ],
)


@pytest.fixture(autouse=True)
def _ledger() -> None:
    LEDGER.clear()


def ownership(clock: ManualClock, authority: MemoryAuthority, name: str) -> Ownership:
    return Ownership(
        authority=authority,
        ttl=2.0,
        renew_every=0.4,
        claim_every=0.2,
        inbox_every=0.02,
        forward_timeout=30.0,
        handoff_timeout=1.0,
        moves_per_round=4,
        name=name,
        clock=clock,
    )


def runtime(store: MemoryStore, clock: ManualClock, authority: MemoryAuthority, name: str, **kw: Any) -> Runtime:
    tiers = [Tier(store, FlushPolicy(interval=0.001))]
    return Runtime([ORDER], tiers=tiers, ownership=ownership(clock, authority, name), recover=True, **kw)


async def drive(clock: ManualClock, until: Callable[[], bool], *, step: float = 0.05, limit: float = 60.0) -> None:
    """Advance lease time in steps (letting real flushes happen between) until ``until()`` holds."""
    spent = 0.0
    with anyio.fail_after(30):
        while not until():
            if spent > limit:
                raise AssertionError(f"still not true after {limit} s of lease time")
            await clock.advance(step)
            await anyio.sleep(0.002)
            spent += step


async def call_while_driving(clock: ManualClock, fn: Callable[[], Any]) -> Any:
    """Await ``fn()`` while lease time moves (a forwarded call waits on the owner's inbox loop)."""
    result: list[Any] = []
    done = anyio.Event()

    async def call() -> None:
        try:
            result.append(await fn())
        except BaseException as exc:  # noqa: BLE001 - handed back to the caller
            result.append(exc)
        done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(call)
        await drive(clock, done.is_set, step=0.02)
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


def placed(*runtimes: Runtime) -> bool:
    """Every runtime owns exactly the shards placement gives it among the live ones, and nothing moves."""
    total = 0
    for rt in runtimes:
        owner = rt._owner
        assert owner is not None
        members = owner._counted(owner.clock.now())
        if len(members) != len(runtimes) or set(owner.owned) != set(owner._desired(members)) or owner.draining:
            return False
        total += len(owner.owned)
    return total == SHARDS


def owned(rt: Runtime) -> dict[int, int]:
    stats = rt.statistics().ownership
    assert stats is not None
    return dict(stats.owned)


async def test_a_single_runtime_owns_every_shard_and_its_ids_carry_their_shard() -> None:
    clock, store = ManualClock(), SharedStore(shards=SHARDS)
    authority = MemoryAuthority(SHARDS, clock=clock.now)
    async with runtime(store, clock, authority, "a") as rt:
        assert sorted(owned(rt)) == list(range(SHARDS))
        assert set(owned(rt).values()) == {1}
        handles = [await rt.spawn(ORDER, {"n": i}) for i in range(40)]
        shards = {shard_of(h.run_id, SHARDS) for h in handles}
        assert shards == set(range(SHARDS))  # round-robin over the owned shards
        for h in handles:
            assert h.run_id.startswith(f"s{shard_of(h.run_id, SHARDS)}.~")
        await rt.flush()
        stored = await store.load(handles[0].run_id)
        assert stored is not None
        assert stored.header.epoch == 1  # written under the shard's epoch
    assert all(lease.owner is None for lease in await authority.leases())  # released at shutdown


async def test_a_second_runtime_takes_half_the_shards_and_nothing_runs_twice() -> None:
    clock, store = ManualClock(), SharedStore(shards=SHARDS)
    authority = MemoryAuthority(SHARDS, clock=clock.now)
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(runtime(store, clock, authority, "a"))
        ids = [(await a.spawn(ORDER, {"n": i}, run_id=f"order-{i}")).run_id for i in range(60)]
        await drive(clock, lambda: a.count(status="waiting") == 60)
        b = await stack.enter_async_context(runtime(store, clock, authority, "b"))
        await drive(clock, lambda: placed(a, b))
        assert not set(owned(a)) & set(owned(b))
        await drive(clock, lambda: sum(rt._lookup(rid) is not None for rt in (a, b) for rid in ids) == 60)
        # Every run is held by exactly one of them, the one owning its shard.
        for rid in ids:
            holder = [rt for rt in (a, b) if rt._lookup(rid) is not None]
            assert len(holder) == 1
            assert shard_of(rid, SHARDS) in owned(holder[0])
        # Pay every order through the runtime that does NOT hold it: forwarded, applied once.
        for rid in ids:
            other = b if a._lookup(rid) is not None else a
            await call_while_driving(clock, partial(other.send, rid, "paid", 1))
        await drive(clock, lambda: a.count(status="done") + b.count(status="done") == 60)
    assert all(count == 1 for count in LEDGER.values()), [k for k, c in LEDGER.items() if c > 1]
    assert len(LEDGER) == 60 * 3


async def test_a_signal_forwarded_twice_with_one_dedupe_key_is_applied_once() -> None:
    clock, store = ManualClock(), SharedStore(shards=SHARDS)
    authority = MemoryAuthority(SHARDS, clock=clock.now)
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(runtime(store, clock, authority, "a"))
        b = await stack.enter_async_context(runtime(store, clock, authority, "b"))
        await drive(clock, lambda: placed(a, b))
        rid = next(f"o{i}" for i in range(1000) if shard_of(f"o{i}", SHARDS) in owned(a))
        await a.spawn(ORDER, {}, run_id=rid)
        await drive(clock, lambda: a.get(rid).status == "waiting")
        for _ in range(2):
            await call_while_driving(clock, lambda: b.send(rid, "paid", "x", dedupe_key="evt-1"))
        await drive(clock, lambda: a.get(rid).status == "done")
        assert a.get(rid).payload["got"] == "x"
    assert LEDGER[rid, 1] == 1


async def test_spawn_and_cancel_through_a_non_owner_reach_the_owner() -> None:
    clock, store = ManualClock(), SharedStore(shards=SHARDS)
    authority = MemoryAuthority(SHARDS, clock=clock.now)
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(runtime(store, clock, authority, "a"))
        b = await stack.enter_async_context(runtime(store, clock, authority, "b"))
        await drive(clock, lambda: placed(a, b))
        rid = next(f"x{i}" for i in range(1000) if shard_of(f"x{i}", SHARDS) in owned(a))
        handle = await call_while_driving(clock, lambda: b.spawn(ORDER, {}, run_id=rid))
        assert handle.created
        assert a._lookup(rid) is not None
        assert b._lookup(rid) is None
        again = await call_while_driving(clock, lambda: b.spawn(ORDER, {}, run_id=rid))
        assert not again.created
        await call_while_driving(clock, lambda: b.cancel(rid))
        await drive(clock, lambda: a.get(rid).status == "cancelled")
        with pytest.raises(Exception, match="cancelled"):
            await call_while_driving(clock, lambda: b.wait_finished(rid))


async def test_a_forwarded_signal_the_owner_refuses_raises_the_same_typed_error() -> None:
    from hotstate import UnknownSignalError

    clock, store = ManualClock(), SharedStore(shards=SHARDS)
    authority = MemoryAuthority(SHARDS, clock=clock.now)
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(runtime(store, clock, authority, "a"))
        b = await stack.enter_async_context(runtime(store, clock, authority, "b"))
        await drive(clock, lambda: placed(a, b))
        rid = next(f"y{i}" for i in range(1000) if shard_of(f"y{i}", SHARDS) in owned(a))
        await a.spawn(ORDER, {}, run_id=rid)
        with pytest.raises(UnknownSignalError, match="nope"):
            await call_while_driving(clock, lambda: b.send(rid, "nope"))


async def test_an_owner_whose_lease_lapsed_is_fenced_off_and_its_waiters_hear_it() -> None:
    """A keeps running on a clock that stopped (a paused process); B claims its shards; A's next flush is fenced."""
    clock, paused, store = ManualClock(), ManualClock(), SharedStore(shards=SHARDS)
    authority = MemoryAuthority(SHARDS, clock=clock.now)
    tiers = [Tier(store, FlushPolicy(interval=0.001))]
    a_config = ownership(paused, authority, "a")  # A's lease timing never moves: it never notices
    async with Runtime([ORDER], tiers=tiers, ownership=a_config, recover=True) as a:
        rid = "stale-1"
        await a.spawn(ORDER, {}, run_id=rid)
        await drive(clock, lambda: a.get(rid).status == "waiting")
        await a.flush()
        b = runtime(store, clock, authority, "b")
        async with b:
            await drive(clock, lambda: len(owned(b)) == SHARDS)  # A's leases expired in authority time
            assert b._lookup(rid) is not None  # B resumed the run from the store
            # A still thinks it owns the shard and accepts a signal; its flush is refused.
            waiting = anyio.Event()
            errors: list[BaseException] = []

            async def wait_on_a() -> None:
                waiting.set()
                try:
                    await a.wait_durable(rid, a.get(rid).version + 1)
                except BaseException as exc:  # noqa: BLE001 - checked below
                    errors.append(exc)

            async with anyio.create_task_group() as tg:
                tg.start_soon(wait_on_a)
                await waiting.wait()
                await a._send_here(rid, "paid", "from-a")
                await drive(clock, lambda: a._lookup(rid) is None, step=0.001)
            assert errors
            assert isinstance(errors[0], OwnershipLostError)
            stored = await store.load(rid)
            assert stored is not None
            assert stored.header.epoch == 2  # B's epoch; nothing of A's after the seal landed
            assert (await b.load(rid)).status == "waiting"
            assert a.statistics().tiers[0].fenced_rows >= 1


async def test_restart_after_a_crash_in_this_process_does_not_wait_for_the_lease() -> None:
    clock, store = ManualClock(), SharedStore(shards=SHARDS)
    authority = MemoryAuthority(SHARDS, clock=clock.now)
    a = runtime(store, clock, authority, "a")
    await a.__aenter__()
    await a.spawn(ORDER, {}, run_id="r1")
    await a.flush()
    # Simulate a crash: the runtime is gone without releasing anything.
    owner = a._owner
    assert owner is not None
    from hotstate.persistence._authority import member_live

    member_live(owner.id, False)
    async with runtime(store, clock, authority, "a2") as again:
        assert len(owned(again)) == SHARDS  # broken at once: its process start is provably gone
        assert again._lookup("r1") is not None
    owner._closing = owner._stopping = True
    await a.__aexit__(None, None, None)


async def test_another_shard_count_is_refused() -> None:
    clock = ManualClock()
    authority = MemoryAuthority(SHARDS, clock=clock.now)
    store = SharedStore(shards=SHARDS * 2)
    with pytest.raises(ConfigError, match="shards"):
        async with runtime(store, clock, authority, "a"):
            pass
    with pytest.raises(ConfigError, match="16"):
        Ownership(shards=0)
