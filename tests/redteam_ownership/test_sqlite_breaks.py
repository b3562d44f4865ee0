"""Red-team tests for shard ownership (issue #12) on one SQLite file (store + ``SQLiteAuthority``).

Runtimes run in this process on one database file; the authority's time is
a ManualClock's wall time and lease timing its monotonic time, so leases
expire by ``advance``, never by sleeping. Each test FAILED on the code it was
written against (some pass now: fixed meanwhile, kept as regression tests);
the docstring says what should happen.
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from contextlib import AsyncExitStack, closing
from typing import TYPE_CHECKING, Any

import anyio
import pytest

from hotstate import Runtime, Step, Workflow
from hotstate.persistence import FlushPolicy, MsgpackCodec, SQLiteStore, Tier, shard_of
from hotstate.persistence._sqlite_authority import SQLiteAuthority
from hotstate.runtime import Ownership
from hotstate.runtime._routing import inbox_context
from hotstate.testing import ManualClock

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

SHARDS = 8
KEY = b"k" * 32  # a secret key: inbox entries are MAC'd, not only checksummed

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


def runtime(path: Path, clock: ManualClock, name: str, **kw: Any) -> Runtime:
    authority = SQLiteAuthority(path, shards=SHARDS, clock=clock.wall)
    config = Ownership(
        authority=authority,
        shards=SHARDS,
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
    store = SQLiteStore(path, shards=SHARDS)
    return Runtime(
        [ORDER],
        tiers=[Tier(store, FlushPolicy(interval=0.001))],
        codec=MsgpackCodec(KEY),
        ownership=config,
        recover=True,
        **kw,
    )


async def drive(clock: ManualClock, until: Callable[[], bool], *, step: float = 0.05, limit: float = 60.0) -> None:
    spent = 0.0
    with anyio.fail_after(10):
        while not until():
            if spent > limit:
                raise AssertionError(f"still not true after {limit} s of lease time")
            await clock.advance(step)
            await anyio.sleep(0.005)
            spent += step


async def settle(clock: ManualClock, seconds: float, *, step: float = 0.05) -> None:
    spent = 0.0
    while spent < seconds:
        await clock.advance(step)
        await anyio.sleep(0.005)
        spent += step


async def post(rt: Runtime, kind: str, run_id: str, fields: dict[str, Any]) -> int:
    """Post an inbox entry exactly as a non-owner's ``Router.forward`` does."""
    owner = rt._owner
    assert owner is not None
    shard = owner.shard_of(run_id)
    body = rt._codec.encode(fields, context=inbox_context(kind, run_id, shard))
    return await owner.authority.post(shard, run_id, kind, body)


# --------------------------------------------------------------------------------------------------------------
# 1. A settled inbox entry copied back into hs_inbox is applied again, even under a MAC key.


@pytest.mark.xfail(
    strict=True,
    reason="open (#12 note): an inbox entry's tag does not bind its number, so a settled entry copied back is applied again",
)
async def test_a_replayed_inbox_entry_is_not_applied_again(tmp_path: Path) -> None:
    """Someone who can write the SQLite file (the trust boundary of DESIGN.md "Codec and trust") copies a
    settled ``spawn`` entry into a new row with no verdict, after the run finished and was purged.

    ``inbox_context`` binds the frame to (kind, run_id, shard) but not to the
    entry's ``seq`` (or any one-time id), so the copy verifies under the
    runtime's secret key and the owner applies it: the purged workflow is
    started again and its steps (side effects) run a second time, although
    nobody asked for it. The same works for ``retry`` entries (a dead letter
    retried again) -- a state the runtime never produced. Expected: an entry
    that was applied is never applied again, whatever row it sits in.
    """
    path = tmp_path / "hs.db"
    clock = ManualClock()
    async with runtime(path, clock, "a") as a:
        rid = "replayed-1"
        await post(a, "spawn", rid, {"workflow": "order", "payload": {}})
        await drive(clock, lambda: a._lookup(rid) is not None and a.get(rid).status == "waiting", step=0.02)
        await a.send(rid, "paid", 1)
        await drive(clock, lambda: a.get(rid).status == "done", step=0.02)
        await a.flush()
        await settle(clock, 0.3)  # the entry is settled
        purged = await a.purge_finished(0)
        assert purged["hot"] == 1
        with closing(sqlite3.connect(path)) as db, db:
            (settled,) = db.execute("SELECT count(*) FROM hs_inbox WHERE verdict IS NOT NULL").fetchone()
            assert settled == 1
            db.execute(
                "INSERT INTO hs_inbox SELECT shard, seq + 1000, run_id, kind, body, created_at, NULL"
                " FROM hs_inbox WHERE run_id = ?",
                (rid,),
            )
        await settle(clock, 0.5, step=0.02)
        again = a._lookup(rid) is not None
    assert LEDGER[rid, 0] == 1, f"the purged run was spawned again from a replayed entry (held again: {again})"


# --------------------------------------------------------------------------------------------------------------
# 2. Recovery trusts the stored ``shard`` column: one edited column gives a run two owners (or none).


async def test_an_edited_shard_column_does_not_give_a_run_a_second_owner(tmp_path: Path) -> None:
    """The ``runs.shard`` column is a query field ("the stored column, never recomputed",
    ``SQLiteStore._page``); ``find_runs`` takes what the per-shard scan returns and never checks
    ``shard_of(run_id)`` against the shards it was asked for. The column is not covered by the MAC.

    Someone who can write the file moves run R's ``shard`` column (R is in a
    shard A owns) to a shard that B is about to take. B's load of that shard
    resumes R while A still runs it: two processes execute R's steps (B's
    writes are then refused by the fence, which computes the shard from the
    run id, and ignored because B does not own that shard, so B keeps a zombie).
    DESIGN.md "Codec and trust": header fields kept in columns are checked
    against the verified envelope before recovery trusts them. Expected: B
    does not take R (and A's own scan still finds it).
    """
    path = tmp_path / "hs.db"
    clock = ManualClock()
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(runtime(path, clock, "a"))
        ids = [(await a.spawn(ORDER, {}, run_id=f"p{i}")).run_id for i in range(16)]
        await drive(clock, lambda: a.count(status="waiting") == 16)
        await a.flush()
        b = await stack.enter_async_context(runtime(path, clock, "b"))
        a_owner, b_owner = a._owner, b._owner
        assert a_owner is not None
        assert b_owner is not None
        to_b = set(b_owner._desired([a_owner.id, b_owner.id]))
        rid = next(r for r in ids if shard_of(r, SHARDS) not in to_b)
        moved_to = min(to_b)
        with closing(sqlite3.connect(path)) as db, db:
            db.execute("UPDATE runs SET shard = ? WHERE run_id = ?", (moved_to, rid))
        await drive(clock, lambda: moved_to in b_owner.owned)  # A hands the shard to B; B loads it
        await settle(clock, 1.0)
        in_a, in_b = a._lookup(rid) is not None, b._lookup(rid) is not None
    assert not (in_a and in_b), f"run {rid} (shard {shard_of(rid, SHARDS)}) is held by A and by B (moved to {moved_to})"


# --------------------------------------------------------------------------------------------------------------
# 3. A store restored from an older backup: ownership throws away the newer state memory holds.


async def test_a_backup_restored_in_place_does_not_resume_a_finished_run(tmp_path: Path) -> None:
    """DESIGN.md "Stores": a store restored from an older snapshot or backup is noticed, and "the runtime
    then writes what it holds again"; "A finished run is never resumed".

    Without ownership that is what happens (the next save reports the reset).
    With ownership the authority lives in the same file, so the restore also
    rolls back the lease table: at its next renewal the process finds its
    leases expired (the backup's ``expires_at``), loses every shard, evicts
    every run and drops what it held -- then claims the shards again and
    loads the backup's copies. A run that finished after the backup (and was
    durable) is resumed at ``waiting`` and will run its steps again; the
    newer state the process held is gone. Expected: the finished run stays
    finished (memory's newer state is written back, as without ownership).
    """
    path = tmp_path / "hs.db"
    backup = tmp_path / "backup.db"
    clock = ManualClock()
    async with runtime(path, clock, "a") as a:
        rid = "restored-1"
        await a.spawn(ORDER, {}, run_id=rid)
        await drive(clock, lambda: a.count(status="waiting") == 1)
        await a.flush()
        with closing(sqlite3.connect(path)) as live, closing(sqlite3.connect(backup)) as copy:
            live.backup(copy)  # the operator's nightly backup
        await a.send(rid, "paid", 1)
        await drive(clock, lambda: a.get(rid).status == "done")
        await a.flush()  # done, durable
        await settle(clock, 3.0)  # more than a ttl of lease time; renewals go on in the live file
        with closing(sqlite3.connect(backup)) as copy, closing(sqlite3.connect(path)) as live:
            copy.backup(live)  # restored in place (same file, e.g. sqlite3 FILE ".restore BACKUP")
        await settle(clock, 2.0)
        held = a._lookup(rid)
        status = None if held is None else held.snapshot.status
        await a.flush()
        stored = await a.load(rid)
    assert status in (None, "done"), f"the finished run is held again at {status}: it will run its steps again"
    assert stored.status == "done", f"the stored copy is {stored.status}"


# --------------------------------------------------------------------------------------------------------------
# 4. A renewal that commits after its caller gave up (SQLite locked) orphans every shard of the process.


async def test_a_renewal_that_lands_after_the_deadline_does_not_orphan_the_shards(tmp_path: Path) -> None:
    """Another connection holds the SQLite write lock (a long transaction of another process, or one
    SIGSTOPped in the middle of it) across A's self-fence deadline, and lets go just before the lease
    itself would expire in the authority (the ``margin`` window between ``ttl - margin`` and ``ttl``).

    ``_renew_once`` gives up at the deadline (``move_on_after``) and A loses
    every shard, as designed. But ``SQLiteAuthority._call`` abandons the
    worker thread, which still runs the renewal once the lock is free: it
    commits, extending every lease A held. From then on A's own renewals keep
    those leases alive (``renew`` extends every lease of the member), while
    A's placement never takes them back (``claim`` skips a live lease the
    claimer holds) and nobody else can claim a live lease. Every shard stays
    owned by nobody for as long as A lives: no run executes, no inbox entry
    is applied. Expected: A owns its shards again within a few ttl.
    """
    path = tmp_path / "hs.db"
    clock = ManualClock()
    async with runtime(path, clock, "a") as a:
        owner = a._owner
        assert owner is not None
        rid = "orphan-1"
        await a.spawn(ORDER, {}, run_id=rid)
        await drive(clock, lambda: a.count(status="waiting") == 1)
        await a.flush()
        await drive(clock, lambda: owner._next_renew - clock.now() > 0.35, step=0.01)  # just renewed
        renewed_at, valid_until = clock.now(), owner.valid_until
        locker = sqlite3.connect(path, timeout=0, isolation_level=None)
        try:
            locker.execute("BEGIN IMMEDIATE")  # the write lock: A's next renewal waits for it
            # Lease time moves past A's deadline (ttl - margin) but not past the lease's end (ttl).
            await clock.advance(valid_until - clock.now() + 0.1)
            assert clock.now() < renewed_at + 2.0
            await anyio.sleep(1.6)  # real time: the stuck renewal's move_on_after fires; A loses its shards
            lost = not owner.owned
        finally:
            locker.rollback()  # the lock is free: the abandoned renewal thread commits now
            locker.close()
        await anyio.sleep(0.3)
        await settle(clock, 10.0)  # five ttl of lease time for A to own its shards again
        back = len(owner.owned)
        held = a._lookup(rid) is not None
        with closing(sqlite3.connect(path)) as db:
            holders = {r[0] for r in db.execute("SELECT owner FROM hs_shard_lease")}
    assert lost, "setup: A did not lose its shards at the deadline"
    assert back == SHARDS, (
        f"A owns {back}/{SHARDS} shards 10 s after the lock went away; the leases are held by {holders} "
        f"(A is {owner.id}); run {rid} held: {held}"
    )


# --------------------------------------------------------------------------------------------------------------
# 5. Inbox entries of one shard are applied concurrently: a signal posted after a spawn overtakes it.


async def test_inbox_entries_of_a_shard_are_applied_in_the_order_they_were_posted(tmp_path: Path) -> None:
    """Caller 1 forwards ``spawn(run_id=X)``; caller 2 then forwards ``send(X, "paid")`` (a webhook that
    arrives right after the order was placed). Both entries wait in X's shard's inbox, seq 1 then 2.

    design/ownership.md §4.8: within a shard entries commit in ``seq`` order
    and the owner reads them ``ORDER BY seq`` and applies each. ``run_inbox``
    now starts one task per entry: the spawn's task awaits the stores (does X
    exist already?) and the signal's task, started right after, finds no run
    X and is settled with ``RunNotFoundError`` -- the signal is lost and its
    sender told the run does not exist, though it was posted after the spawn.
    Expected: entries of one shard take effect in ``seq`` order.
    """
    path = tmp_path / "hs.db"
    clock = ManualClock()
    async with runtime(path, clock, "a") as a:
        rid = "ordered-1"
        first = await post(a, "spawn", rid, {"workflow": "order", "payload": {}})
        second = await post(a, "signal", rid, {"signal": "paid", "data": 1, "key": "k-1"})
        owner = a._owner
        assert owner is not None
        shard = shard_of(rid, SHARDS)
        for _ in range(200):
            if await owner.authority.verdict(shard, second) is not None:
                break
            await clock.advance(0.02)
            await anyio.sleep(0.005)
        verdicts = [await owner.authority.verdict(shard, seq) for seq in (first, second)]
        await settle(clock, 0.3)
        status = a.get(rid).status if a._lookup(rid) is not None else None
    assert verdicts[1] == '{"ok": {}}', f"verdicts {verdicts}; the run is {status}"


@pytest.mark.xfail(strict=True, reason="open (#12 note): scans trust the stored shard column as an index")
async def test_an_edited_shard_column_does_not_hide_a_run_from_its_owner(tmp_path: Path) -> None:
    """The other half of the edited ``shard`` column: per-shard recovery scans ``WHERE shard IN (...)`` on
    the stored column, so a run whose column names another shard is not read by the owner of its real
    shard. A crashes; B takes A's shards and loads them: R (shard of A, column moved to one of B's shards
    that B loaded before) is found by neither scan -- it is not resumed and no report names it.
    Expected: every unfinished run of a shard taken over is resumed (or reported).
    """
    from hotstate.persistence._authority import member_live

    path = tmp_path / "hs.db"
    clock = ManualClock()
    a = runtime(path, clock, "a")
    await a.__aenter__()
    a_owner = a._owner
    assert a_owner is not None
    try:
        ids = [(await a.spawn(ORDER, {}, run_id=f"q{i}")).run_id for i in range(16)]
        await drive(clock, lambda: a.count(status="waiting") == 16)
        await a.flush()
        async with runtime(path, clock, "b") as b:
            b_owner = b._owner
            assert b_owner is not None
            await drive(clock, lambda: len(a_owner.owned) + len(b_owner.owned) == SHARDS and len(b_owner.owned) >= 2)
            await settle(clock, 1.0)
            rid = next(r for r in ids if shard_of(r, SHARDS) in a_owner.owned)
            with closing(sqlite3.connect(path)) as db, db:
                db.execute("UPDATE runs SET shard = ? WHERE run_id = ?", (min(b_owner.owned), rid))
            member_live(a_owner.id, False)  # A crashes
            await drive(clock, lambda: len(b_owner.owned) == SHARDS)
            await settle(clock, 1.0)
            held = b._lookup(rid) is not None
            report = b.recovery_report
    finally:
        a_owner._closing = a_owner._stopping = True
        await a.__aexit__(None, None, None)
    assert held, f"run {rid} of a shard B took over was not resumed (B's first recovery report: {report})"


# --------------------------------------------------------------------------------------------------------------
# 6. A wall-clock step on the host (NTP, or by hand) must not give a shard two owners.


async def test_a_wall_clock_step_on_the_host_never_gives_a_shard_two_owners(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two runtimes on one SQLite file with the *default* ``SQLiteAuthority`` clock and the real lease clock.

    The self-fence deadline runs on the monotonic clock; lease expiry in the
    authority ran on ``time.time`` ("this host's wall clock"). A step of the
    wall clock by more than ``ttl`` expires every lease at once: the member
    that renews first sees the other as dead, places every shard on itself
    and claims them while the other still owns and runs its shards until its
    own renewal -- no pause, no partition. Expected: never two owners of a
    shard at once (lease time on the host should not step: e.g. CLOCK_BOOTTIME).
    """
    import time

    real = time.time
    offset = [0.0]
    monkeypatch.setattr(time, "time", lambda: real() + offset[0])
    path = tmp_path / "hs.db"

    def rt(name: str) -> Runtime:
        config = Ownership(shards=SHARDS, ttl=1.0, renew_every=0.2, claim_every=0.05, inbox_every=0.02, name=name)
        return Runtime(
            [ORDER],
            tiers=[Tier(SQLiteStore(path, shards=SHARDS), FlushPolicy(interval=0.01))],
            ownership=config,
            recover=True,
        )

    overlap: set[int] = set()
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(rt("a"))
        await anyio.sleep(0.1)  # B renews at other moments than A
        b = await stack.enter_async_context(rt("b"))
        a_owner, b_owner = a._owner, b._owner
        assert a_owner is not None
        assert b_owner is not None
        with anyio.fail_after(4):
            while not (len(b_owner.owned) >= 2 and len(a_owner.owned) + len(b_owner.owned) == SHARDS):  # noqa: ASYNC110 - a red-team scenario, polled with a deadline
                await anyio.sleep(0.01)
        offset[0] = 10.0  # the host's wall clock steps forward by 10 ttl
        for _ in range(100):
            await anyio.sleep(0.01)
            overlap |= set(a_owner.owned) & set(b_owner.owned)
        offset[0] = 0.0
    assert not overlap, f"shards {sorted(overlap)} were owned by both runtimes at once after a wall-clock step"
