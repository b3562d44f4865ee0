"""Red-team tests for shard ownership (issue #12): several runtimes in one process.

Each test is a scenario that breaks a contract of DESIGN.md "Several
processes" / design/ownership.md; it FAILED on the code it was written
against. The working tree changed while they were written: some pass now
because the break was fixed meanwhile; they stay as regression tests.
The setup mirrors tests/unit/runtime/test_ownership.py: one MemoryStore
shared by every runtime, one MemoryAuthority, and a ManualClock for lease
time (flushes run on the real clock, with a 1 ms interval).
"""

from __future__ import annotations

from collections import Counter
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any

import anyio
import pytest

from hotstate import Runtime, Step, Workflow
from hotstate._errors import StoreUnavailableError
from hotstate.persistence import FlushPolicy, MemoryAuthority, MemoryStore, Tier, shard_of
from hotstate.runtime import Ownership
from hotstate.runtime._routing import inbox_context
from hotstate.testing import ManualClock

if TYPE_CHECKING:
    from collections.abc import Callable

SHARDS = 8


class SharedStore(MemoryStore):  # type: ignore[misc]  # a test double of the final class
    """A MemoryStore several runtimes share, with faults a test switches on.

    ``fail_saves``: every ``save`` raises (a store that is down for writes,
    e.g. SQLite locked or read-only); reads and seals still work.
    ``save_gate``: when set, ``save`` waits on it first (a slow flush in flight).
    ``scan_gate``: when set, ``scan_snapshots`` waits on it (a slow load of a shard).
    """

    users = 0

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.fail_saves = False
        self.failed_saves = 0
        self.save_gate: anyio.Event | None = None
        self.save_waiting = anyio.Event()
        self.scan_gate: anyio.Event | None = None
        self.scan_waiting = anyio.Event()
        self.load_gate: anyio.Event | None = None
        self.load_waiting = anyio.Event()
        self.letters_gate: anyio.Event | None = None
        self.letters_waiting = anyio.Event()

    async def open(self) -> None:
        self.users += 1
        await super().open()

    async def aclose(self) -> None:
        self.users -= 1
        if self.users <= 0:
            await super().aclose()

    async def save(self, snapshots: Any, transitions: Any, **kw: Any) -> Any:
        if self.save_gate is not None and (snapshots or transitions):
            self.save_waiting.set()
            await self.save_gate.wait()
        if self.fail_saves:
            self.failed_saves += 1
            raise StoreUnavailableError(self.tier, "injected: the store refuses writes")
        return await super().save(snapshots, transitions, **kw)

    async def scan_snapshots(self, *args: Any, **kw: Any) -> Any:
        if self.scan_gate is not None:
            self.scan_waiting.set()
            await self.scan_gate.wait()
        return await super().scan_snapshots(*args, **kw)

    async def save_dead_letters(self, records: Any, **kw: Any) -> Any:
        if self.letters_gate is not None and records:
            self.letters_waiting.set()
            await self.letters_gate.wait()
        return await super().save_dead_letters(records, **kw)

    async def load(self, run_id: str) -> Any:
        if self.load_gate is not None:
            self.load_waiting.set()
            await self.load_gate.wait()
        return await super().load(run_id)


class Partitioned:
    """One process's view of a shared authority, which a test can cut (``down``) for that process only."""

    def __init__(self, inner: MemoryAuthority) -> None:
        self._inner = inner
        self.name = inner.name
        self.down = False
        self.fail_once: set[str] = set()  # calls that fail the next time they are made

    @property
    def shards(self) -> int:
        return self._inner.shards

    def _check(self, call: str) -> None:
        if self.down:
            raise StoreUnavailableError("authority", "injected: this process is cut from the authority")
        if call in self.fail_once:
            self.fail_once.discard(call)
            raise StoreUnavailableError("authority", f"injected: {call} failed once")

    async def open(self) -> None:
        await self._inner.open()

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def join(self, *args: Any, **kw: Any) -> Any:
        self._check("join")
        return await self._inner.join(*args, **kw)

    async def renew(self, *args: Any, **kw: Any) -> Any:
        self._check("renew")
        return await self._inner.renew(*args, **kw)

    async def claim(self, *args: Any, **kw: Any) -> Any:
        self._check("claim")
        return await self._inner.claim(*args, **kw)

    async def release(self, *args: Any, **kw: Any) -> Any:
        self._check("release")
        return await self._inner.release(*args, **kw)

    async def leave(self, *args: Any, **kw: Any) -> Any:
        self._check("leave")
        return await self._inner.leave(*args, **kw)

    async def leases(self, *args: Any, **kw: Any) -> Any:
        self._check("leases")
        return await self._inner.leases(*args, **kw)

    async def members(self, *args: Any, **kw: Any) -> Any:
        self._check("members")
        return await self._inner.members(*args, **kw)

    async def post(self, *args: Any, **kw: Any) -> Any:
        self._check("post")
        return await self._inner.post(*args, **kw)

    async def pending(self, *args: Any, **kw: Any) -> Any:
        self._check("pending")
        return await self._inner.pending(*args, **kw)

    async def settle(self, *args: Any, **kw: Any) -> Any:
        self._check("settle")
        return await self._inner.settle(*args, **kw)

    async def verdict(self, *args: Any, **kw: Any) -> Any:
        self._check("verdict")
        return await self._inner.verdict(*args, **kw)

    async def prune(self, *args: Any, **kw: Any) -> Any:
        self._check("prune")
        return await self._inner.prune(*args, **kw)


LEDGER: Counter[tuple[str, int, bool]] = Counter()  # (run, step, compensation?) -> executions


async def record(payload: Any, ctx: Any) -> Any:
    LEDGER[ctx.run_id, ctx.step, False] += 1
    return payload


async def record_and_wait(payload: Any, ctx: Any) -> Any:
    LEDGER[ctx.run_id, ctx.step, False] += 1
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


def ownership(clock: ManualClock, authority: MemoryAuthority, name: str, **kw: Any) -> Ownership:
    options: dict[str, Any] = {
        "authority": authority,
        "ttl": 2.0,
        "renew_every": 0.4,
        "claim_every": 0.2,
        "inbox_every": 0.02,
        "forward_timeout": 30.0,
        "handoff_timeout": 1.0,
        "moves_per_round": 4,
        "name": name,
        "clock": clock,
    }
    options.update(kw)
    return Ownership(**options)


def runtime(
    store: MemoryStore,
    clock: ManualClock,
    authority: MemoryAuthority,
    name: str,
    *,
    workflows: list[Workflow] | None = None,
    own: dict[str, Any] | None = None,
    policy: FlushPolicy | None = None,
    **kw: Any,
) -> Runtime:
    tiers = [Tier(store, policy or FlushPolicy(interval=0.001))]
    return Runtime(
        workflows or [ORDER],
        tiers=tiers,
        ownership=ownership(clock, authority, name, **(own or {})),
        recover=True,
        **kw,
    )


async def drive(clock: ManualClock, until: Callable[[], bool], *, step: float = 0.05, limit: float = 60.0) -> None:
    """Advance lease time in steps (letting real flushes happen between) until ``until()`` holds."""
    spent = 0.0
    with anyio.fail_after(10):
        while not until():
            if spent > limit:
                raise AssertionError(f"still not true after {limit} s of lease time")
            await clock.advance(step)
            await anyio.sleep(0.002)
            spent += step


async def settle(clock: ManualClock, seconds: float, *, step: float = 0.05) -> None:
    """Let ``seconds`` of lease time pass (with real time for flushes between)."""
    spent = 0.0
    while spent < seconds:
        await clock.advance(step)
        await anyio.sleep(0.002)
        spent += step


def owned(rt: Runtime) -> dict[int, int]:
    stats = rt.statistics().ownership
    assert stats is not None
    return dict(stats.owned)


def run_in(shards: set[int] | dict[int, int], prefix: str = "r") -> str:
    return next(f"{prefix}{i}" for i in range(10_000) if shard_of(f"{prefix}{i}", SHARDS) in shards)


async def post(rt: Runtime, kind: str, run_id: str, fields: dict[str, Any]) -> int:
    """Post an inbox entry exactly as a non-owner's ``Router.forward`` does (without waiting for the verdict)."""
    owner = rt._owner
    assert owner is not None
    shard = owner.shard_of(run_id)
    body = rt._codec.encode(fields, context=inbox_context(kind, run_id, shard))
    return await owner.authority.post(shard, run_id, kind, body)


# --------------------------------------------------------------------------------------------------------------
# 1. A hand-off whose flush fails orphans the shard: the lease is kept (and renewed) by a process that dropped it.


async def test_handoff_with_failing_flush_does_not_orphan_the_shard() -> None:
    """Rebalance while the store refuses writes (SQLite locked / read-only for a moment).

    A owns every shard; B joins; A's placement round hands shards off. The
    drain's flush fails. ``ShardManager.handoff`` catches the error, evicts the
    runs from memory ("they are dropped from memory") but never releases the
    lease, and A's renewals keep extending every lease it holds in the
    authority. Nobody owns those shards any more: A does not (popped from
    ``owned``, and its own claim skips a lease it holds), and B cannot claim a
    live lease. Once the store is back, every shard must be owned by exactly
    one live runtime again and every run must be held by one of them.
    """
    clock, store = ManualClock(), SharedStore(shards=SHARDS)
    authority = MemoryAuthority(SHARDS, clock=clock.now)
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(runtime(store, clock, authority, "a"))
        ids = [(await a.spawn(ORDER, {}, run_id=f"o{i}")).run_id for i in range(24)]
        await drive(clock, lambda: a.count(status="waiting") == 24)
        await a.flush()
        b = await stack.enter_async_context(runtime(store, clock, authority, "b"))
        store.fail_saves = True
        await settle(clock, 3.0)  # B is counted after 2 renewals; A's placement rounds try to hand shards off
        store.fail_saves = False
        # The store answers again. Give placement plenty of lease time (10 ttl) to converge.
        await settle(clock, 20.0)
        held_a, held_b = set(owned(a)), set(owned(b))
        orphans = set(range(SHARDS)) - held_a - held_b
        leases = {lease.shard: (lease.owner or "")[:8] for lease in await authority.leases()}
        a_id = a._owner.id[:8]  # type: ignore[union-attr]
        lost = [rid for rid in ids if a._lookup(rid) is None and b._lookup(rid) is None]
    assert not orphans, (
        f"shards {sorted(orphans)} are owned by no runtime, but their leases are held by "
        f"{ {s: leases[s] for s in orphans} } (a is {a_id})"
    )
    assert not lost, f"{len(lost)} runs are held by no process: {lost[:5]}"


# --------------------------------------------------------------------------------------------------------------
# 2. The inbox loop dies for good when a shard is lost while it waits for an applied entry to be durable.


async def test_inbox_loop_survives_losing_a_shard_while_an_entry_is_being_made_durable() -> None:
    """A forwarded signal is applied; while its snapshot is being flushed, the lease lapses.

    ``ShardManager._apply`` waits (``Router.wait_applied`` -> ``wait_durable``)
    for what it applied to be durable. Losing the shard meanwhile evicts the
    run and fails that waiter with ``OwnershipLostError`` -- a ``RunError``,
    not a ``PersistenceError`` -- so ``run_inbox``'s ``except (PersistenceError,
    OSError)`` does not catch it and the background task ends (logged as an
    internal error). After the process owns shards again, no forwarded call is
    ever applied by it: every acknowledged ``send``/``cancel``/``spawn`` through
    a non-owner is lost (the sender's ``send`` returns after forward_timeout as
    if it had been delivered).
    """
    clock, store = ManualClock(), SharedStore(shards=SHARDS)
    authority = MemoryAuthority(SHARDS, clock=clock.now)
    async with runtime(store, clock, authority, "a") as a:
        first, second = "first-1", "second-2"
        await a.spawn(ORDER, {}, run_id=first)
        await a.spawn(ORDER, {}, run_id=second)
        await drive(clock, lambda: a.count(status="waiting") == 2)
        await a.flush()
        store.save_gate = anyio.Event()  # the next flush hangs (a slow write in flight)
        await post(a, "signal", first, {"signal": "paid", "data": 1, "key": "k-first"})
        await drive(clock, store.save_waiting.is_set, step=0.02)  # applied; its flush is in flight
        authority.failing = StoreUnavailableError("authority", "injected: unreachable")
        await drive(clock, lambda: not owned(a), step=0.1)  # the lease lapsed: every shard is lost
        store.save_gate.set()
        store.save_gate = None
        authority.failing = None
        await drive(clock, lambda: len(owned(a)) == SHARDS and a._lookup(second) is not None)
        # A owns everything again and holds the run. A forwarded signal must reach it.
        await post(a, "signal", second, {"signal": "paid", "data": 2, "key": "k-second"})
        try:
            await drive(clock, lambda: a.get(second).status == "done", step=0.02, limit=20.0)
            applied = True
        except AssertionError:
            applied = False
        internal = a.statistics().internal_errors
    assert applied, f"the forwarded signal was never applied (runtime internal errors: {internal})"


# --------------------------------------------------------------------------------------------------------------
# 3. The new owner applies inbox entries of a shard before it has loaded the shard's runs.


async def test_forwarded_signal_racing_a_handoff_is_not_refused_as_run_not_found() -> None:
    """A hands shards to B; a signal for a run of a moving shard is forwarded while B loads the shard.

    ``ShardManager.take`` puts the shard in ``owned`` *before* ``load_shards``
    brings its runs into memory, and ``run_inbox`` (another task) reads the
    inbox of every owned shard. While the load is in progress (a slow scan),
    B applies the entry: ``_send_here`` finds no run in memory, the stored copy
    does not know the dedupe key, and the verdict is ``RunNotFoundError`` for a
    run that exists. The entry is settled: the signal is lost and the caller
    is told the run does not exist. Expected: the send is applied exactly
    once and the run finishes.
    """
    clock, store = ManualClock(), SharedStore(shards=SHARDS)
    authority = MemoryAuthority(SHARDS, clock=clock.now)
    outcome: list[BaseException | None] = []
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(runtime(store, clock, authority, "a"))
        ids = [(await a.spawn(ORDER, {}, run_id=f"h{i}")).run_id for i in range(40)]
        await drive(clock, lambda: a.count(status="waiting") == 40)
        await a.flush()
        b = await stack.enter_async_context(runtime(store, clock, authority, "b"))
        store.scan_gate = anyio.Event()  # B's load of the shards it claims is slow
        await drive(clock, store.scan_waiting.is_set, step=0.02)  # B claimed shards and is loading them
        moving = set(owned(b))
        assert moving
        rid = next(r for r in ids if shard_of(r, SHARDS) in moving)

        async def send() -> None:
            try:
                await a.send(rid, "paid", "x")  # A no longer holds the shard: forwarded
                outcome.append(None)
            except BaseException as exc:  # noqa: BLE001 - checked below
                outcome.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(send)
            await settle(clock, 0.5, step=0.02)  # B's inbox loop ticks while the load still waits
            store.scan_gate.set()
            store.scan_gate = None
            await drive(clock, lambda: bool(outcome), step=0.02)
        try:
            await drive(clock, lambda: b._lookup(rid) is not None and b.get(rid).status == "done", limit=10.0)
            finished = True
        except AssertionError:
            finished = False
    assert outcome == [None], f"the forwarded send of an existing run failed: {outcome[0]!r}"
    assert finished


# --------------------------------------------------------------------------------------------------------------
# 4. spawn(run_id=...) checks ownership before its store lookup, not after: a lease lost meanwhile makes a zombie.


async def test_spawn_with_an_id_whose_shard_is_lost_during_the_store_lookup_is_not_lost() -> None:
    """``spawn(run_id=X)``: X's shard is owned here when ``spawn`` checks (``_elsewhere``), then
    ``Adoption.adopt`` asks the stores whether X exists (an await), and the lease lapses meanwhile.

    ``spawn`` goes on with ``Scheduler.spawn_new`` in a shard this process no
    longer owns and returns ``created=True``. The run executes its first step
    here; every flush of it is refused (no epoch for the shard) and
    ``ShardManager.fenced`` ignores refusals of shards it does not own, so the
    run lives only in this process's memory. When the process claims the shard
    again, ``take`` evicts it ("claimed again") and loads the shard from the
    store, which never saw X: the spawn that returned is gone. Expected: a
    spawn that returns leaves a run some owner will hold (or it raises, e.g.
    ``OwnershipLostError``/``NotOwnerError``), and no step runs in a process
    that does not own the run's shard.
    """
    clock, store = ManualClock(), SharedStore(shards=SHARDS)
    authority = MemoryAuthority(SHARDS, clock=clock.now)
    result: list[Any] = []
    async with runtime(store, clock, authority, "a") as a:
        store.load_gate = anyio.Event()

        async def spawn() -> None:
            try:
                result.append(await a.spawn(ORDER, {}, run_id="fresh-1"))
            except BaseException as exc:  # noqa: BLE001 - checked below
                result.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(spawn)
            await drive(clock, store.load_waiting.is_set, step=0.02)
            authority.failing = StoreUnavailableError("authority", "injected: unreachable")
            await drive(clock, lambda: not owned(a), step=0.1)  # the lease lapsed while spawn waited
            store.load_gate.set()
            store.load_gate = None
            await drive(clock, lambda: bool(result), step=0.02)
        await settle(clock, 0.2)
        ran_unowned = LEDGER["fresh-1", 0, False]
        authority.failing = None
        await drive(clock, lambda: len(owned(a)) == SHARDS)
        await a.flush()
        held = a._lookup("fresh-1") is not None
        stored = await store.load("fresh-1")
    returned = not isinstance(result[0], BaseException)
    if returned:
        assert held or stored is not None, (
            f"spawn returned {result[0]!r} (created) but the run exists nowhere; its first step ran "
            f"{ran_unowned} time(s) while this process owned no shard"
        )
    assert ran_unowned == 0, "a step ran in a process that did not own the run's shard"


# --------------------------------------------------------------------------------------------------------------
# 5. Runs loaded for a shard that was lost while its load was in progress stay in memory as zombies.


async def test_shard_lost_while_its_runs_load_leaves_no_zombie_and_loses_no_signal() -> None:
    """A re-claims its shards after an authority outage; while their runs load, the lease lapses again.

    ``ShardManager.lose`` evicts what is in memory *now*; ``load_shards``
    (recovery, an await) then finishes and puts the shard's runs in the
    registry of a process that owns nothing. Those actors are never evicted:
    refused flushes of shards not owned are ignored (``ShardManager.fenced``),
    and ``Runtime._elsewhere`` treats any run found in memory as local while
    no hand-off is running. So ``send`` through this process is applied to the
    zombie (its step runs here), acknowledged, and its writes are refused: B,
    the real owner, never sees the signal. Expected: the send reaches the
    owner and the run finishes there, and the step runs once.
    """
    clock, store = ManualClock(), SharedStore(shards=SHARDS)
    shared = MemoryAuthority(SHARDS, clock=clock.now)
    cut_a = Partitioned(shared)  # A's link to the authority
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(runtime(store, clock, cut_a, "a"))  # type: ignore[arg-type]
        rid = "zombie-1"
        await a.spawn(ORDER, {}, run_id=rid)
        await drive(clock, lambda: a.count(status="waiting") == 1)
        await a.flush()
        cut_a.down = True
        await drive(clock, lambda: not owned(a), step=0.1)
        store.scan_gate = anyio.Event()
        cut_a.down = False
        await drive(clock, store.scan_waiting.is_set, step=0.02)  # re-claimed; the load waits
        cut_a.down = True
        await drive(clock, lambda: not owned(a), step=0.1)  # lapsed again during the load
        store.scan_gate.set()
        store.scan_gate = None
        await settle(clock, 0.1)
        zombie = a._lookup(rid) is not None
        b = await stack.enter_async_context(runtime(store, clock, shared, "b"))
        await drive(clock, lambda: b._lookup(rid) is not None)
        # A client reaches A (still cut from the authority) and sends the signal.
        try:
            await a.send(rid, "paid", "x")
            acknowledged = True
        except Exception:  # noqa: BLE001 - a refusal is fine: the caller knows to retry
            acknowledged = False
        try:
            await drive(clock, lambda: b.get(rid).status == "done", limit=10.0)
            delivered = True
        except AssertionError:
            delivered = False
        pay_runs = LEDGER[rid, 1, False]
        cut_a.down = False
    assert not zombie, (
        f"A holds a run of a shard it lost while loading it; a send through A was acknowledged={acknowledged}, "
        f"delivered to the owner B={delivered}, and the pay step ran {pay_runs}x in A"
    )
    assert delivered or not acknowledged, (
        f"the acknowledged send never reached the owner (the pay step ran {pay_runs}x, in A, which owns nothing)"
    )


# --------------------------------------------------------------------------------------------------------------
# 6. A flush in flight across "lost, then claimed again by the same process" writes the old holding's state.


async def test_failed_flush_in_flight_across_a_reclaim_does_not_write_the_evicted_state() -> None:
    """A's flush is in flight (slow store) when A is cut from the authority and loses its shards; A
    reconnects and claims them again (epoch 2), reloading the runs from the store; then the old flush fails.

    ``Persister._flush_locked`` merges a failed batch back into the pending
    rows (``_merge_back``, newer versions win). ``take``'s "claimed again"
    eviction already ran, so nothing drops these rows: the evicted actor's
    snapshot (epoch-1 work: the run went on to ``done``) is newer than the
    re-loaded run's ``resumed`` snapshot, wins the merge, and the next flush
    writes it stamped with the *new* epoch (``epoch_of`` at encode time). The
    store then says ``done`` while the owner holds the run ``waiting``: state
    of an evicted holding landed. Expected: the stored copy is the held one.
    """
    clock, store = ManualClock(), SharedStore(shards=SHARDS)
    shared = MemoryAuthority(SHARDS, clock=clock.now)
    cut_a = Partitioned(shared)
    async with runtime(store, clock, cut_a, "a") as a:  # type: ignore[arg-type]
        rid = "merge-1"
        await a.spawn(ORDER, {}, run_id=rid)
        await drive(clock, lambda: a.count(status="waiting") == 1)
        await a.flush()
        store.save_gate = anyio.Event()
        await a.send(rid, "paid", 1)  # the run finishes in memory; its flush hangs
        await drive(clock, lambda: store.save_waiting.is_set() and a.get(rid).status == "done", step=0.02)
        cut_a.down = True
        await drive(clock, lambda: not owned(a), step=0.1)  # lost: evicted, pending rows dropped
        cut_a.down = False
        await drive(clock, lambda: len(owned(a)) == SHARDS and a._lookup(rid) is not None)  # claimed again
        held_status = a.get(rid).status
        store.fail_saves = True
        store.save_gate.set()  # the old flush now fails: its batch is merged back
        store.save_gate = None
        await drive(clock, lambda: store.failed_saves > 0, step=0.02)
        store.fail_saves = False
        await settle(clock, 0.3)
        await a.flush()
        held = a.get(rid)
        stored = await store.load(rid)
    assert stored is not None
    assert held_status == "waiting"  # the re-loaded run: the signal was never durable
    assert (stored.header.status, stored.header.version) == (held.status, held.version), (
        f"the store holds {stored.header.status} v{stored.header.version} (epoch {stored.header.epoch}) "
        f"but the owner holds {held.status} v{held.version}"
    )


async def test_slow_flush_of_an_old_holding_does_not_fence_off_the_new_holding() -> None:
    """As above, but the old flush finally succeeds instead of failing.

    It carries the fence it captured when it started (epoch 1); the store's
    fence is now (epoch 2, same member), so the save is refused and
    ``Persister._fenced_off`` reports the shard fenced at epoch 2.
    ``ShardManager.fenced`` compares that with the epoch held *now* (2 >= 2)
    instead of the epoch the refused write carried, and drops the shard this
    process legitimately holds: its runs are evicted again, their waiters fail
    with ``OwnershipLostError`` and unflushed work is thrown away, with no
    other process anywhere. Expected: a refusal of a write made under an
    older epoch of this process does not cost the current holding.
    """
    clock, store = ManualClock(), SharedStore(shards=SHARDS)
    shared = MemoryAuthority(SHARDS, clock=clock.now)
    cut_a = Partitioned(shared)
    async with runtime(store, clock, cut_a, "a") as a:  # type: ignore[arg-type]
        rid = "slow-1"
        await a.spawn(ORDER, {}, run_id=rid)
        await drive(clock, lambda: a.count(status="waiting") == 1)
        await a.flush()
        store.save_gate = anyio.Event()
        await a.send(rid, "paid", 1)
        await drive(clock, lambda: store.save_waiting.is_set(), step=0.02)
        cut_a.down = True
        await drive(clock, lambda: not owned(a), step=0.1)
        cut_a.down = False
        await drive(clock, lambda: len(owned(a)) == SHARDS and a._lookup(rid) is not None)
        stats = a.statistics().ownership
        assert stats is not None
        losses_before, epochs_before = stats.losses, dict(stats.owned)
        a_id = stats.member
        store.save_gate.set()
        store.save_gate = None
        await settle(clock, 0.3)
        stats = a.statistics().ownership
        assert stats is not None
        losses_after = stats.losses
        await settle(clock, 10.0)  # five ttl: anything lost should have been claimed again by now
        missing = set(range(SHARDS)) - set(owned(a))
        leases = {lease.shard: lease.owner for lease in await shared.leases()}
        run_held = a._lookup(rid) is not None
    assert losses_after == losses_before, (
        f"A dropped {losses_after - losses_before} shard(s) it held at epochs {epochs_before} because a write "
        f"it made under an earlier epoch was refused; 10 s later shards {sorted(missing)} are still owned by "
        f"nobody while A keeps renewing their leases (held by A: {all(leases[m] == a_id for m in missing)}), "
        f"and run {rid} is held: {run_held}"
    )


# --------------------------------------------------------------------------------------------------------------
# 7. A forwarded call's typed error comes back without its attributes.


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


async def test_a_forwarded_error_keeps_the_attributes_of_its_type() -> None:
    """``send`` of a signal no step waits for, through a non-owner: ``UnknownSignalError``.

    Locally it carries ``signal``, ``waiting_for``, ``field`` and ``value``
    (documented on the class); ``raise_verdict`` (_routing.py) rebuilds the
    type with ``cls.__new__`` + ``Exception.__init__`` and sets only
    ``run_id``, so code that handles the error as documented
    (``exc.signal``, ``exc.waiting_for``) gets ``AttributeError`` -- only when
    the run happens to live in another process. Same for
    ``RunFinishedError.status``, ``RunConflictError.workflow``,
    ``ConfigError.field`` etc.
    """
    from hotstate import RunFinishedError, UnknownSignalError

    clock, store = ManualClock(), SharedStore(shards=SHARDS)
    authority = MemoryAuthority(SHARDS, clock=clock.now)
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(runtime(store, clock, authority, "a"))
        b = await stack.enter_async_context(runtime(store, clock, authority, "b"))
        await drive(clock, lambda: len(owned(b)) > 0 and len(owned(a)) + len(owned(b)) == SHARDS)
        rid = run_in(owned(a), "y")
        other = run_in(owned(a), "z")
        await a.spawn(ORDER, {}, run_id=rid)
        await a.spawn(ORDER, {}, run_id=other)
        await drive(clock, lambda: a.get(rid).status == "waiting" and a.get(other).status == "waiting")
        await a.cancel(other)
        await drive(clock, lambda: a.get(other).status == "cancelled")
        with pytest.raises(UnknownSignalError) as unknown:
            await call_while_driving(clock, lambda: b.send(rid, "nope"))
        with pytest.raises(RunFinishedError) as finished:
            await call_while_driving(clock, lambda: b.send(other, "paid"))
    missing = [
        f"{type(e).__name__}.{name}"
        for e, names in ((unknown.value, ("signal", "waiting_for", "field", "value")), (finished.value, ("status",)))
        for name in names
        if not hasattr(e, name)
    ]
    assert not missing, f"forwarded errors lack their documented attributes: {missing}"


# --------------------------------------------------------------------------------------------------------------
# 8. An evicted run keeps compensating: compensations that had not started run in two processes.

COMP_GATE: dict[str, anyio.Event] = {}


async def saga_step(payload: Any, ctx: Any) -> Any:
    LEDGER[ctx.run_id, ctx.step, False] += 1
    if ctx.step == 2:
        raise KeyError("the last step fails for good")
    return payload


async def saga_undo(payload: Any, ctx: Any) -> Any:
    LEDGER[ctx.run_id, ctx.step, True] += 1
    gate = COMP_GATE.get(f"{ctx.run_id}/{ctx.step}")
    if gate is not None:
        await gate.wait()
    return payload


SAGA = Workflow(
    "saga",
    [Step(fn=saga_step, name=f"s{i}", compensate=saga_undo) for i in range(3)],
    retry=__import__("hotstate").RetryPolicy(max_attempts=1, non_retryable=(KeyError,)),
)


async def test_an_evicted_run_starts_no_further_compensation() -> None:
    """A run gives up and compensates; its first compensation (of step 1) is in flight when A loses the shard.

    ``Scheduler.evict`` deliberately does not interrupt a compensating actor
    ("a compensation in flight finishes, its rows refused by the fence"), but
    ``RunActor._compensate`` is a loop that never looks at ``evicted``: after
    the one in flight it goes on to compensate step 0, fails the run and
    writes a dead letter -- in a process that owns nothing. The new owner B
    resumes the run from the store (compensating, cursor 2) and compensates
    steps 1 and 0 again. Compensation of step 0 was not in flight at the
    eviction, yet it runs twice, concurrently, in two processes. Expected:
    the evicted actor starts nothing after the compensation in flight.
    """
    COMP_GATE.clear()
    clock, store = ManualClock(), SharedStore(shards=SHARDS)
    shared = MemoryAuthority(SHARDS, clock=clock.now)
    cut_a = Partitioned(shared)
    rid = "saga-1"
    COMP_GATE[f"{rid}/1"] = gate = anyio.Event()
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(runtime(store, clock, cut_a, "a", workflows=[SAGA]))  # type: ignore[arg-type]
        await a.spawn(SAGA, {}, run_id=rid)
        await drive(clock, lambda: LEDGER[rid, 1, True] == 1, step=0.02)  # compensating step 1, in flight
        await a.flush()
        cut_a.down = True
        await drive(clock, lambda: not owned(a), step=0.1)  # A lost every shard; the run was evicted
        gate.set()  # the compensation in flight ends
        await settle(clock, 0.2)
        in_a_after_eviction = LEDGER[rid, 0, True]
        b = await stack.enter_async_context(runtime(store, clock, shared, "b", workflows=[SAGA]))
        await drive(clock, lambda: b._lookup(rid) is not None and b.get(rid).status == "failed", limit=10.0)
        total = LEDGER[rid, 0, True]
        cut_a.down = False
    assert in_a_after_eviction == 0, (
        f"the compensation of step 0 started in A after A lost the run's shard; it ran {total}x in all"
    )


# --------------------------------------------------------------------------------------------------------------
# 9. One forwarded cancel of a compensating run (under ack_tiers) stalls every forwarded call to that owner.


async def test_a_forwarded_cancel_of_a_compensating_run_does_not_stall_the_owners_inbox() -> None:
    """With ``ack_tiers``, ``_cancel_here`` waits (``_settled``) until the run has ended; a compensating
    run ends only when its compensations are done (documented for ``cancel``).

    Applied from the inbox, that wait runs inside ``ShardManager.run_inbox``,
    which applies entries one at a time: every later forwarded ``send``,
    ``spawn`` or ``cancel`` for *any* shard of that owner waits behind one
    run's compensation (minutes, for a compensation that retries a remote
    call). The senders' ``send`` returns after ``forward_timeout`` as if
    delivered; ``spawn`` raises ``DurabilityTimeoutError``. Expected: an
    unrelated forwarded signal is applied within a few inbox rounds.
    """
    COMP_GATE.clear()
    clock, store = ManualClock(), SharedStore(shards=SHARDS)
    authority = MemoryAuthority(SHARDS, clock=clock.now)
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(
            runtime(store, clock, authority, "a", workflows=[ORDER, SAGA], ack_tiers=["memory"])
        )
        b = await stack.enter_async_context(
            runtime(store, clock, authority, "b", workflows=[ORDER, SAGA], ack_tiers=["memory"])
        )
        await drive(clock, lambda: len(owned(b)) > 0 and len(owned(a)) + len(owned(b)) == SHARDS)
        saga = run_in(owned(a), "sg")
        order = run_in(owned(a), "od")
        COMP_GATE[f"{saga}/1"] = gate = anyio.Event()
        await a.spawn(SAGA, {}, run_id=saga)
        await a.spawn(ORDER, {}, run_id=order)
        await drive(clock, lambda: LEDGER[saga, 1, True] == 1 and a.get(order).status == "waiting", step=0.02)

        finished: list[str] = []

        async def call(name: str, fn: Callable[[], Any]) -> None:
            try:
                await fn()
            finally:
                finished.append(name)

        async with anyio.create_task_group() as tg:
            tg.start_soon(call, "cancel", lambda: b.cancel(saga))  # forwarded; A waits for the compensation
            await settle(clock, 0.2, step=0.02)
            tg.start_soon(call, "send", lambda: b.send(order, "paid", 1))  # forwarded, unrelated run
            try:
                await drive(clock, lambda: a.get(order).status == "done", step=0.02, limit=5.0)
                applied = True
            except AssertionError:
                applied = False
            gate.set()
            await drive(clock, lambda: len(finished) == 2, step=0.05)
    assert applied, "the forwarded signal waited for another run's compensation to finish"


# --------------------------------------------------------------------------------------------------------------
# 10. OwnershipLostError names epoch 0, not the epoch the process held.


async def test_ownership_lost_error_names_the_epoch_that_was_held() -> None:
    """``OwnershipLostError.epoch`` is documented as "the epoch this process held it at".

    ``Router.evict_shards`` builds the error with ``owner.owned.get(s, 0)``,
    but ``ShardManager.lose`` (and ``handoff``) pop the shard from ``owned``
    *before* evicting, so every waiter is told epoch 0.
    """
    from hotstate import OwnershipLostError

    clock, store = ManualClock(), SharedStore(shards=SHARDS)
    shared = MemoryAuthority(SHARDS, clock=clock.now)
    cut_a = Partitioned(shared)
    errors: list[BaseException] = []
    async with runtime(store, clock, cut_a, "a") as a:  # type: ignore[arg-type]
        rid = "epoch-1"
        await a.spawn(ORDER, {}, run_id=rid)
        await drive(clock, lambda: a.count(status="waiting") == 1)
        await a.flush()
        held = owned(a)[shard_of(rid, SHARDS)]
        store.save_gate = anyio.Event()
        await a.send(rid, "paid", 1)

        async def wait() -> None:
            try:
                await a.wait_durable(rid, a.get(rid).version)
            except BaseException as exc:  # noqa: BLE001 - checked below
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(wait)
            cut_a.down = True
            await drive(clock, lambda: bool(errors), step=0.1)
            store.save_gate.set()
            store.save_gate = None
        cut_a.down = False
    assert isinstance(errors[0], OwnershipLostError), repr(errors[0])
    assert errors[0].epoch == held, f"OwnershipLostError.epoch is {errors[0].epoch}; the shard was held at {held}"


# --------------------------------------------------------------------------------------------------------------
# 11. A wall-clock step of the authority's clock gives a shard two owners at once.


async def test_a_wall_clock_step_never_gives_a_shard_two_owners_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """``MemoryAuthority`` (the default authority of runtimes sharing a ``MemoryStore``) keeps lease time on
    ``time.time`` -- the wall clock -- while each runtime's self-fence deadline runs on the monotonic clock.
    A step of the wall clock (NTP, or by hand) by more than ``ttl`` expires every lease at once.

    Whichever member renews first then sees itself as the only live member,
    places every shard on itself and claims them, while the other member
    still holds its shards and runs their steps until its own renewal
    (``renew_every`` later) -- no pause, no partition, just a clock step. The
    design's self-fence argument ("the owner stops before anyone can claim")
    assumes the authority's clock only drifts. Expected: at no moment do two
    runtimes both own a shard. (``SQLiteAuthority`` moved to CLOCK_BOOTTIME
    meanwhile; see test_sqlite_breaks.py. This runs on the real clock.)
    """
    import time

    real = time.time
    offset = [0.0]
    monkeypatch.setattr(time, "time", lambda: real() + offset[0])
    store = SharedStore(shards=SHARDS)
    authority = MemoryAuthority(SHARDS)  # the default clock

    def rt(name: str) -> Runtime:
        config = Ownership(authority=authority, ttl=1.0, renew_every=0.2, claim_every=0.05, inbox_every=0.02, name=name)
        return Runtime([ORDER], tiers=[Tier(store, FlushPolicy(interval=0.01))], ownership=config, recover=True)

    overlap: set[int] = set()
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(rt("a"))
        await anyio.sleep(0.1)  # B renews at other moments than A
        b = await stack.enter_async_context(rt("b"))
        with anyio.fail_after(4):
            while not (len(owned(b)) >= 2 and len(owned(a)) + len(owned(b)) == SHARDS):  # noqa: ASYNC110 - a red-team scenario, polled with a deadline
                await anyio.sleep(0.01)
        offset[0] = 10.0  # the host's wall clock steps forward by 10 ttl
        for _ in range(100):
            await anyio.sleep(0.01)
            overlap |= set(owned(a)) & set(owned(b))
        offset[0] = 0.0
    assert not overlap, f"shards {sorted(overlap)} were owned by both runtimes at once after a wall-clock step"


# --------------------------------------------------------------------------------------------------------------
# 12. A runtime with ownership off on stores a clustered runtime uses takes and runs the clustered runs.


@pytest.mark.xfail(
    strict=True,
    reason="open (#12 note): ownership=False trusts the caller to be alone; only an SQLite file or a PostgreSQL"
    " schema with live leases is refused",
)
async def test_a_runtime_without_ownership_does_not_run_runs_of_shards_owned_elsewhere() -> None:
    """``Runtime(ownership=False, recover=True)`` started on a store whose shards are fenced and owned.

    design/ownership.md §4.12: "Running two processes against the same
    stores without cluster should be detected (a ``P:meta``/``hs_meta`` row
    says the stores are clustered; a second non-clustered runtime refuses to
    ``recover=True``)". Nothing detects it: the store has fences for every
    shard, yet the unfenced runtime recovers every unfinished run, executes
    its steps while the owner executes them too, and its unfenced history
    rows (``save(fence=None)``) land in fenced shards. Expected: it refuses
    to start, or at least takes no run of a shard another process owns.
    """
    clock, store = ManualClock(), SharedStore(shards=SHARDS)
    authority = MemoryAuthority(SHARDS, clock=clock.now)
    started = False
    async with runtime(store, clock, authority, "a") as a:
        rid = "both-1"
        await a.spawn(ORDER, {}, run_id=rid)
        await drive(clock, lambda: a.count(status="waiting") == 1)
        await a.flush()
        try:
            async with Runtime(
                [ORDER], tiers=[Tier(store, FlushPolicy(interval=0.001))], ownership=False, recover=True
            ) as rogue:
                started = True
                if rogue._lookup(rid) is not None:
                    await rogue.send(rid, "paid", "rogue")
                await a.send(rid, "paid", "owner")
                await settle(clock, 0.3)
                await anyio.sleep(0.05)
        except Exception:  # noqa: S110, BLE001 - refusing to start is a fine answer
            pass
    assert LEDGER[rid, 1, False] <= 1, (
        f"the pay step of a run owned by A ran {LEDGER[rid, 1, False]}x: the runtime without ownership "
        f"(started={started}) recovered and ran it too"
    )


# --------------------------------------------------------------------------------------------------------------
# 13. A fenced-off owner settles inbox entries: the verdict of a process that owns nothing is final.


async def test_a_paused_owner_that_wakes_up_cannot_settle_the_new_owners_inbox_entries() -> None:
    """A is paused past its lease (its lease timing stands still); B claims every shard and spawns R.
    A signal for R is forwarded. A wakes up: its inbox loop runs before its renewal notices the loss.

    A reads the inbox of the shards it still believes it owns, applies the
    entry (``_send_here``: R is not in A's memory and the stored copy does not
    know the key -> ``RunNotFoundError``), ``wait_applied`` has nothing to
    wait for (R is not held), and ``authority.settle`` records the verdict --
    the authority accepts a settle from anyone (no lease or epoch check).
    B, the owner, never applies the signal; the sender is told the run does
    not exist. design/ownership.md §4.4: what a paused owner does after it
    wakes must not "become durable or visible". Expected: the signal is
    applied by B and R finishes.
    """
    clock, a_clock, store = ManualClock(), ManualClock(), SharedStore(shards=SHARDS)
    authority = MemoryAuthority(SHARDS, clock=clock.now)
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(runtime(store, a_clock, authority, "a"))
        await clock.advance(5.0)  # authority time: A's leases expired long ago; A is paused
        b = await stack.enter_async_context(runtime(store, clock, authority, "b"))
        await drive(clock, lambda: len(owned(b)) == SHARDS)
        handle = await b.spawn(ORDER, {})
        rid = handle.run_id
        await drive(clock, lambda: b.get(rid).status == "waiting")
        await b.flush()
        seq = await post(b, "signal", rid, {"signal": "paid", "data": 1, "key": "k-1"})
        a_owner = a._owner
        assert a_owner is not None
        assert a_clock.now() + 0.1 < a_owner._next_renew  # A wakes: its inbox ticks before its renewal
        for _ in range(4):
            await a_clock.advance(0.02)
            await anyio.sleep(0.01)
        verdict = await authority.verdict(handle_shard := shard_of(rid, SHARDS), seq)
        try:
            await drive(clock, lambda: b.get(rid).status == "done", step=0.02, limit=5.0)
            delivered = True
        except AssertionError:
            delivered = False
        await a_clock.advance(5.0)  # let A notice, so it shuts down cleanly
        await anyio.sleep(0.05)
    assert delivered, (
        f"the signal for R (shard {handle_shard}) was settled by A with verdict {verdict!r}; B never applied it"
    )


# --------------------------------------------------------------------------------------------------------------
# 14. A forwarded cancel is settled before the cancel is durable: a crash of the owner then loses it.


async def test_a_forwarded_cancel_is_settled_only_once_the_cancel_is_durable() -> None:
    """The owner applies a forwarded ``cancel`` and settles the entry ("settles it only once what it applied
    is durable in every tier", _routing.py) -- then crashes before its next write-behind flush.

    ``_cancel_here`` only posts the cancel to the run's mailbox; the
    ``cancelled`` snapshot is committed at the run's next turn. ``wait_applied``
    reads ``actor.snapshot.version`` right after ``apply`` returned -- the
    version *before* the cancel, durable already -- so it returns at once and
    the entry is settled with ``{"ok": ...}``: the sender's ``cancel`` returns.
    The crash loses the unflushed ``cancelled`` snapshot, and the settled entry
    is never replayed: the next owner resumes the run, which was acknowledged
    as cancelled through the inbox. Expected: the cancel survives (the entry
    is replayed, or it was durable before it was settled).
    """
    from hotstate.persistence._authority import member_live

    clock, store = ManualClock(), SharedStore(shards=SHARDS)
    authority = MemoryAuthority(SHARDS, clock=clock.now)
    slow = FlushPolicy(interval=60.0)  # write-behind: the crash window is one interval
    a = runtime(store, clock, authority, "a", policy=slow)
    await a.__aenter__()
    a_owner = a._owner
    assert a_owner is not None
    try:
        rid = "cancel-1"
        await a.spawn(ORDER, {}, run_id=rid)
        await drive(clock, lambda: a.get(rid).status == "waiting")
        await a.flush()
        seq = await post(a, "cancel", rid, {})  # as a non-owner's cancel does
        shard = shard_of(rid, SHARDS)
        verdicts: list[str | None] = [None]

        async def settled() -> bool:
            verdicts[0] = await authority.verdict(shard, seq)
            return verdicts[0] is not None

        for _ in range(100):
            if await settled():
                break
            await clock.advance(0.02)
            await anyio.sleep(0.002)
        assert verdicts[0] == '{"ok": {}}', verdicts[0]  # acknowledged to the sender
        assert a.get(rid).status == "cancelled"
        member_live(a_owner.id, False)  # A crashes (SIGKILL) before its next flush
        async with runtime(store, clock, authority, "b") as b:
            await drive(clock, lambda: len(owned(b)) == SHARDS)
            await settle(clock, 0.5)
            status = (await b.load(rid)).status
    finally:
        a_owner._closing = a_owner._stopping = True
        store.fail_saves = True  # the crashed process writes nothing more (its final flush fails, logged)
        await a.__aexit__(None, None, None)
        store.fail_saves = False
    assert status == "cancelled", f"the acknowledged forwarded cancel was lost: the next owner holds the run {status}"


# --------------------------------------------------------------------------------------------------------------
# 15. A fenced-off owner's dead letter that slips through fails the new owner's live run at the next recovery.


async def fragile_go(payload: Any, ctx: Any) -> Any:
    LEDGER[ctx.run_id, ctx.step, False] += 1
    if ctx.signal == "boom":
        raise KeyError("boom")
    return payload


FRAGILE = Workflow(
    "fragile",
    [Step(fn=record, name="first"), Step(fn=fragile_go, name="go", wait_for="go"), Step(fn=record, name="last")],
    retry=__import__("hotstate").RetryPolicy(max_attempts=1, non_retryable=(KeyError,)),
)


async def test_a_zombie_dead_letter_does_not_fail_the_new_owners_run() -> None:
    """Dead letters carry no fence and no epoch. ``Persister._owned_dead_letters`` seals at the epochs held,
    then writes the letters in a separate call; its docstring accepts that "a claim between this check and
    the write below can still let one letter through: recovery then compares its version with the run's
    newest copy". That comparison (``Adoption._recover``: ``letter.snapshot.version >= snap.version``) is by
    version only -- and a zombie's versions run ahead of the new owner's.

    A is paused past its lease (lease timing stands still) and fails run R
    in memory (v6 letter). Its flush seals (still epoch 1), then B claims
    and seals (epoch 2) and resumes R from the store (waiting, v4), then A's
    letter is written. R is alive and well at B. At the next recovery (B's
    rolling restart), the zombie's letter (v6 >= v4) makes the runtime record
    R as failed without running it. Expected: a letter of a superseded epoch
    never fails a run of a newer one.
    """
    clock, a_clock, store = ManualClock(), ManualClock(), SharedStore(shards=SHARDS)
    authority = MemoryAuthority(SHARDS, clock=clock.now)
    rid = "fragile-1"
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(runtime(store, a_clock, authority, "a", workflows=[FRAGILE]))
        await a.spawn(FRAGILE, {}, run_id=rid)
        await drive(a_clock, lambda: a.get(rid).status == "waiting")
        await a.flush()
        await clock.advance(a_clock.now() + 5.0)  # authority time moves on; A is paused (its clock stands)
        store.letters_gate = anyio.Event()
        await a.send(rid, "go", "boom")  # A still believes it owns the shard: applied here, R fails
        with anyio.fail_after(5):
            await store.letters_waiting.wait()  # A's flush: sealed at epoch 1, now writing the letter
        b = await stack.enter_async_context(runtime(store, clock, authority, "b", workflows=[FRAGILE]))
        await drive(clock, lambda: b._lookup(rid) is not None and b.get(rid).status == "waiting")
        store.letters_gate.set()  # A's letter lands after B's claim
        store.letters_gate = None
        await settle(clock, 0.3)
        await b.flush()
        stack.push_async_callback(a_clock.advance, 10.0)  # let A notice at the end
    async with runtime(store, clock, authority, "c", workflows=[FRAGILE]) as c:  # B's successor
        await drive(clock, lambda: len(owned(c)) == SHARDS)
        status = c.get(rid).status if c._lookup(rid) is not None else (await c.load(rid)).status
    assert status == "waiting", f"a run alive at its owner was recorded {status} from a fenced-off owner's dead letter"


# --------------------------------------------------------------------------------------------------------------
# 16. A forwarded retry_dead_letter applied again (its settle did not land) retries the run a second time.

FLAKY_RUNS: Counter[str] = Counter()


async def always_fails(payload: Any, ctx: Any) -> Any:
    FLAKY_RUNS[ctx.run_id] += 1
    raise KeyError("still broken")


BROKEN = Workflow(
    "broken",
    [Step(fn=always_fails, name="only")],
    retry=__import__("hotstate").RetryPolicy(max_attempts=1, non_retryable=(KeyError,)),
)


async def test_a_forwarded_retry_whose_settle_failed_is_not_applied_twice() -> None:
    """A forwarded ``retry_dead_letter`` is applied; the run runs again and fails again (dead letter again);
    the owner's ``settle`` of the entry does not land (the authority hiccups once, or the owner crashes
    between "durable" and "settled" -- the window the design replays).

    The entry is read and applied again. The design counts on replays being
    no-ops ("a signal's dedupe key, a spawn's run id, a cancel of a run that
    has ended"), but a retry is not idempotent: the run is dead-lettered
    again, so ``_retry_here`` retries it a second time and its step runs once
    more -- one acknowledged call, two retries. Expected: a forwarded retry
    is applied exactly once. Fixed (#13): the retry transition names its inbox
    entry, and a replay finds it (in memory, else in a tier's history).
    """
    FLAKY_RUNS.clear()
    clock, store = ManualClock(), SharedStore(shards=SHARDS)
    shared = MemoryAuthority(SHARDS, clock=clock.now)
    view = Partitioned(shared)
    async with runtime(store, clock, view, "a", workflows=[BROKEN]) as a:  # type: ignore[arg-type]
        rid = "broken-1"
        await a.spawn(BROKEN, {}, run_id=rid)
        await drive(clock, lambda: a.get(rid).status == "failed")
        await a.flush()
        assert FLAKY_RUNS[rid] == 1
        view.fail_once.add("settle")
        seq = await post(a, "retry", rid, {"from_step": None})  # as a non-owner's retry_dead_letter does
        shard = shard_of(rid, SHARDS)
        verdict: list[str | None] = [None]

        async def settled() -> bool:
            verdict[0] = await shared.verdict(shard, seq)
            return verdict[0] is not None

        for _ in range(200):
            if await settled():
                break
            await clock.advance(0.02)
            await anyio.sleep(0.002)
        await settle(clock, 0.3)
        runs = FLAKY_RUNS[rid]
    assert runs == 2, f"one forwarded retry ran the failed step {runs - 1} more times (verdict {verdict[0]!r})"


# --------------------------------------------------------------------------------------------------------------
# 17. Evicting a run whose step turns the cancellation into an ordinary error is an internal error.


async def converts_cancel(payload: Any, ctx: Any) -> Any:
    LEDGER[ctx.run_id, ctx.step, False] += 1
    try:
        await anyio.sleep_forever()
    except BaseException:  # e.g. a client library that raises its own "aborted" error on cancellation  # noqa: BLE001 - a red-team scenario, polled with a deadline
        raise ConnectionError("request aborted") from None
    return payload


CONVERTS = Workflow("converts", [Step(fn=converts_cancel, name="call")])


async def test_evicting_a_step_that_raises_on_cancellation_is_not_an_internal_error() -> None:
    """The eviction interrupts the step in flight (``Scheduler.evict`` -> ``interrupt``). A step that answers
    the cancellation with its own exception (common: client libraries raise "aborted"/"connection reset")
    lands in ``RunActor.turn``'s ``except Exception`` branch, which has no ``evicted`` check:
    ``_step_failed`` commits a ``retrying`` snapshot on the evicted actor, and ``Scheduler.commit`` raises
    ``KeyError`` (the run left the status index) -- logged as "hotstate internal error in turn of run ..."
    and counted in ``internal_errors``. Expected: a lost shard is a normal event, not an internal error.
    """
    clock, store = ManualClock(), SharedStore(shards=SHARDS)
    shared = MemoryAuthority(SHARDS, clock=clock.now)
    cut_a = Partitioned(shared)
    async with runtime(store, clock, cut_a, "a", workflows=[CONVERTS]) as a:  # type: ignore[arg-type]
        rid = "converts-1"
        await a.spawn(CONVERTS, {}, run_id=rid)
        await drive(clock, lambda: LEDGER[rid, 0, False] == 1, step=0.02)
        before = a.statistics().internal_errors
        cut_a.down = True
        await drive(clock, lambda: not owned(a), step=0.1)
        await settle(clock, 0.2)
        after = a.statistics().internal_errors
        cut_a.down = False
    assert after == before, f"losing the shard counted {after - before} internal error(s)"


# --------------------------------------------------------------------------------------------------------------
# 18. A re-delivered signal to a finished run that left memory is never settled: re-applied forever.


async def test_a_redelivered_signal_to_a_finished_run_out_of_memory_gets_a_verdict() -> None:
    """A webhook re-delivers a signal (same dedupe key) through a non-owner after the run finished and left
    the owner's memory (``evict_finished`` / ``retain_finished``: it stays stored).

    Locally ``send`` answers such a re-delivery at once (the stored copy knows
    the key). Through the inbox, ``Router._apply`` -> ``_send_here`` returns
    fine, then ``Router._durable`` finds no actor in memory and raises
    ``OwnershipLostError`` ("the run left this process"), so ``apply`` returns
    None ("read again"). The entry is never settled: the owner re-reads,
    re-decodes and re-applies it every ``inbox_every`` (a store read each
    time) for as long as it owns the shard, and the sender waits the full
    ``forward_timeout``. Expected: a verdict (``ok``) within a few inbox rounds.
    """
    clock, store = ManualClock(), SharedStore(shards=SHARDS)
    authority = MemoryAuthority(SHARDS, clock=clock.now)
    async with runtime(store, clock, authority, "a") as a:
        rid = "redelivered-1"
        await a.spawn(ORDER, {}, run_id=rid)
        await drive(clock, lambda: a.get(rid).status == "waiting")
        await a.send(rid, "paid", 1, dedupe_key="evt-9")
        await drive(clock, lambda: a.get(rid).status == "done")
        assert await a.evict_finished(0) == 1
        seq = await post(a, "signal", rid, {"signal": "paid", "data": 1, "key": "evt-9"})  # the re-delivery
        shard = shard_of(rid, SHARDS)
        for _ in range(100):  # 2 s of lease time: 100 inbox rounds
            if await authority.verdict(shard, seq) is not None:
                break
            await clock.advance(0.02)
            await anyio.sleep(0.002)
        verdict = await authority.verdict(shard, seq)
    assert verdict is not None, "the re-delivered signal was never settled (re-applied every inbox round)"


# --------------------------------------------------------------------------------------------------------------
# 19. One slow step in a hand-off drops the unflushed state of every other run of its shard.

STEP_GATE: dict[str, anyio.Event] = {}


async def slow_step(payload: Any, ctx: Any) -> Any:
    LEDGER[ctx.run_id, ctx.step, False] += 1
    await STEP_GATE[ctx.run_id].wait()
    return payload


SLOW = Workflow("slow", [Step(fn=slow_step, name="long")])


async def test_a_slow_step_in_a_handoff_loses_nothing_of_the_other_runs_of_its_shard() -> None:
    """A hands shard s to B. Run S of shard s is in a step that outlives ``handoff_timeout``; run F of the same
    shard has just been spawned and stepped (write-behind: not flushed yet) and now waits for a signal.

    ``Router.drain_shards`` evicts the slow runs "as if lost" -- by calling
    ``evict_shards`` on their *shards*, which evicts every run of shard s and
    drops every pending row of it (``Tiers.drop``) before the hand-off's
    flush. F's spawn and first step, acknowledged and only in memory, are
    thrown away: B never sees F (nothing of it was stored). The docstring
    promises only that the slow step runs again. Expected: a graceful
    hand-off loses nothing and runs no step twice, except the slow one.
    """
    STEP_GATE.clear()
    clock, store = ManualClock(), SharedStore(shards=SHARDS)
    authority = MemoryAuthority(SHARDS, clock=clock.now)
    lazy = FlushPolicy(interval=60.0)  # write-behind, e.g. SQLite every second: rows wait for the next flush
    own = {"handoff_timeout": 0.1}
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(
            runtime(store, clock, authority, "a", workflows=[ORDER, SLOW], own=own, policy=lazy)
        )
        b = await stack.enter_async_context(runtime(store, clock, authority, "b", workflows=[ORDER, SLOW], own=own))
        a_owner, b_owner = a._owner, b._owner
        assert a_owner is not None
        assert b_owner is not None
        moving = set(b_owner._desired([a_owner.id, b_owner.id]))
        target = {min(moving)}
        slow_id, fast_id = run_in(target, "slow"), run_in(target, "fast")
        STEP_GATE[slow_id] = anyio.Event()
        await a.spawn(SLOW, {}, run_id=slow_id)
        await a.spawn(ORDER, {}, run_id=fast_id)  # acknowledged (write-behind: held in memory)
        await drive(clock, lambda: a._lookup(fast_id) is not None and a.get(fast_id).status == "waiting", step=0.01)
        await drive(clock, lambda: min(target) in owned(b))  # the hand-off happened
        await settle(clock, 0.5)
        STEP_GATE[slow_id].set()
        fast_at_b = b._lookup(fast_id) is not None
        stored = await store.load(fast_id)
    assert fast_at_b, (
        f"run {fast_id}, spawned and acknowledged before the hand-off, is gone: B does not hold it and the "
        f"store has {stored and (stored.header.status, stored.header.version)}"
    )


# --------------------------------------------------------------------------------------------------------------
# 20. A recover=False process holds shards whose stored runs nobody will ever run.
