"""SQLite faults under a running runtime: locked, read-only, full, and a deleted directory (#5).

Each fault is injected into a real SQLite file while runs are in flight. The
persister must raise a typed ``StoreUnavailableError`` (tier ``"sqlite"``, a
message naming the cause), count it in ``tier_statistics()``, retry with backoff
on the runtime's ``ManualClock`` (no retry storm while time stands still), keep
serving runs, and, once the fault clears, get every run's latest version and
every transition into the file.

Mechanisms (the tests may run as root, where ``chmod`` stops no write):

- locked: a second ``sqlite3`` connection holds ``BEGIN EXCLUSIVE`` for longer
  than the store's ``busy_timeout``;
- read-only: ``PRAGMA query_only = ON`` on the store's writer connection, the
  one mechanism that refuses writes whatever the user id (SQLITE_READONLY);
- full: ``PRAGMA max_page_count`` at the current page count on the writer
  connection (SQLITE_FULL);
- deleted directory: ``shutil.rmtree`` of the database's directory; the open
  descriptors would keep accepting writes into an unlinked file, so the store
  checks the file's identity before each transaction.
"""

from __future__ import annotations

import shutil
import sqlite3
from typing import TYPE_CHECKING, Any

import anyio
import pytest

from hotstate import (
    PersistenceError,
    Runtime,
    Status,
    Step,
    StepContext,
    StoreUnavailableError,
    Tier,
    Workflow,
)
from hotstate.persistence import FlushPolicy, SQLiteStore
from hotstate.testing import ManualClock

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

GUARD = 10  # seconds; a hang guard only
BUSY = 0.05  # the store's busy timeout in the locked case (real seconds, inside SQLite)
POLICY = FlushPolicy(interval=1.0, retry_initial=0.5, retry_max=2.0)


async def inc(p: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    return {**p, "n": p["n"] + 1}


async def take(p: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    return {**p, "got": ctx.signal}


SIGNAL = Workflow(
    "signal",
    [Step(fn=inc, name="a"), Step(fn=take, wait_for="go"), Step(fn=inc, name="b"), Step(fn=inc, name="c")],
)


async def wait_until(predicate: Callable[[], bool]) -> None:
    with anyio.fail_after(GUARD):
        while not predicate():  # noqa: ASYNC110 - the aiosqlite thread has no event to wait on
            await anyio.sleep(0.001)


class Fault:
    """One way of making the SQLite file refuse writes, and of clearing it."""

    name = ""
    message = ""  # a fragment the typed error's message must contain

    def __init__(self, store: SQLiteStore, db: Path) -> None:
        self.store = store
        self.db = db

    async def inject(self) -> None:
        raise NotImplementedError

    async def clear(self) -> None:
        raise NotImplementedError


class Locked(Fault):
    name, message = "locked", "database is locked"

    async def inject(self) -> None:
        self.other = sqlite3.connect(self.db, isolation_level=None, check_same_thread=False)
        self.other.execute("BEGIN EXCLUSIVE")

    async def clear(self) -> None:
        self.other.execute("ROLLBACK")
        self.other.close()


class ReadOnly(Fault):
    name, message = "read-only", "readonly database"

    async def inject(self) -> None:
        # The store's own writer connection (a private attribute on purpose: no
        # public API makes an open SQLite connection read-only, and chmod does not
        # stop root).
        await self.store._w().execute("PRAGMA query_only = ON")

    async def clear(self) -> None:
        await self.store._w().execute("PRAGMA query_only = OFF")


class Full(Fault):
    name, message = "full", "database or disk is full"

    async def inject(self) -> None:
        conn = self.store._w()
        async with conn.execute("PRAGMA page_count") as cur:
            row = await cur.fetchone()
        assert row is not None
        await conn.execute(f"PRAGMA max_page_count = {int(row[0])}")

    async def clear(self) -> None:
        await self.store._w().execute("PRAGMA max_page_count = 1073741823")


class DeletedDirectory(Fault):
    name, message = "deleted-directory", "deleted or replaced"

    async def inject(self) -> None:
        shutil.rmtree(self.db.parent)

    async def clear(self) -> None:
        self.db.parent.mkdir()


FAULTS = [Locked, ReadOnly, Full, DeletedDirectory]


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "data" / "runs.db"
    path.parent.mkdir()
    return path


def assert_file_holds(db: Path, expected: dict[str, tuple[int, str]]) -> None:
    """Read the file with plain sqlite3: each run at its version and status, transitions 1..v."""
    with sqlite3.connect(db) as conn:
        runs = {r[0]: (r[1], r[2]) for r in conn.execute("SELECT run_id, version, status FROM runs")}
        transitions: dict[str, list[int]] = {}
        for rid, version in conn.execute("SELECT run_id, version FROM transitions ORDER BY run_id, version"):
            transitions.setdefault(rid, []).append(version)
    conn.close()
    assert runs == expected
    for rid, (version, _) in expected.items():
        assert transitions.get(rid) == list(range(1, version + 1)), rid


@pytest.mark.parametrize("fault_type", FAULTS, ids=lambda f: f.name)
async def test_a_sqlite_fault_is_a_typed_retried_error_and_nothing_is_lost_once_it_clears(
    db: Path, fault_type: type[Fault]
) -> None:
    clock = ManualClock()
    store = SQLiteStore(db, busy_timeout=BUSY)
    fault = fault_type(store, db)
    async with Runtime([SIGNAL], tiers=[Tier(store, POLICY)], clock=clock) as rt:
        ids = [(await rt.spawn(SIGNAL, {"n": i}, run_id=f"r{i:02d}")).run_id for i in range(20)]
        await wait_until(lambda: all(rt.get(r).status is Status.waiting for r in ids))
        with anyio.fail_after(GUARD):
            await rt.flush()
        before = {r: rt.get(r).version for r in ids}
        assert all(rt.durable_versions(r)["sqlite"] == before[r] for r in ids)

        await fault.inject()
        # The runtime keeps serving: half the runs finish, new runs start (with
        # payloads big enough to need new pages).
        with anyio.fail_after(GUARD):
            for rid in ids[:10]:
                await rt.send(rid, "go", rid)
            for rid in ids[:10]:
                assert (await rt.wait_finished(rid))["got"] == rid
            extra = [(await rt.spawn(SIGNAL, {"n": 0, "blob": "x" * 8000}, run_id=f"new{i}")).run_id for i in range(5)]
        await wait_until(lambda: all(rt.get(r).status is Status.waiting for r in extra))

        with pytest.raises(StoreUnavailableError) as info, anyio.fail_after(GUARD):
            await rt.flush()
        assert isinstance(info.value, PersistenceError)
        assert info.value.tier == "sqlite"
        assert fault.message in str(info.value), str(info.value)
        stats = rt.tier_statistics()[0]
        assert stats.failures >= 1
        assert stats.consecutive_failures >= 1
        assert stats.last_error is not None
        assert fault.message in stats.last_error
        assert stats.pending_snapshots == 15  # nothing dropped: the batch went back
        for rid in ids:
            assert rt.durable_versions(rid)["sqlite"] == before[rid]

        # Backoff: while time stands still, the loop does not retry (no storm) ...
        failures = stats.failures
        for _ in range(200):
            await anyio.lowlevel.checkpoint()
        assert rt.tier_statistics()[0].failures == failures
        # ... and once the backoff (and interval) passes on the clock, it retries by itself.
        await clock.advance(POLICY.retry_max + POLICY.interval)
        await wait_until(lambda: rt.tier_statistics()[0].failures > failures)
        assert rt.tier_statistics()[0].consecutive_failures >= 2

        await fault.clear()
        failures = rt.tier_statistics()[0].failures
        await clock.advance(POLICY.retry_max + POLICY.interval)
        await wait_until(lambda: rt.tier_statistics()[0].consecutive_failures == 0)
        with anyio.fail_after(GUARD):
            await rt.flush()
        stats = rt.tier_statistics()[0]
        assert stats.consecutive_failures == 0
        assert stats.last_error is None
        assert stats.pending_snapshots == stats.pending_transitions == 0
        for rid in ids + extra:
            v = rt.get(rid).version
            assert rt.durable_versions(rid) == {"hot": v, "sqlite": v}
        expected = {r: (rt.get(r).version, rt.get(r).status.value) for r in ids + extra}
    assert_file_holds(db, expected)
    assert {expected[r][1] for r in ids[:10]} == {"done"}


async def test_a_deleted_directory_that_comes_back_gets_every_run_again_not_only_the_new_ones(
    db: Path,
) -> None:
    """The recreated file is empty: the store reports a reset, and the runtime rewrites all it holds."""
    store = SQLiteStore(db)
    async with Runtime([SIGNAL], tiers=[Tier(store, POLICY)], clock=ManualClock()) as rt:
        ids = [(await rt.spawn(SIGNAL, {"n": i}, run_id=f"r{i:02d}")).run_id for i in range(10)]
        await wait_until(lambda: all(rt.get(r).status is Status.waiting for r in ids))
        with anyio.fail_after(GUARD):
            await rt.flush()
        shutil.rmtree(db.parent)
        db.parent.mkdir()  # back at once: the next write opens a new, empty file
        await rt.send("r00", "go", 1)
        await wait_until(lambda: rt.get("r00").status is Status.done)
        with anyio.fail_after(GUARD):
            await rt.flush()
        assert rt.tier_statistics()[0].resets == 1
        expected = {r: (rt.get(r).version, rt.get(r).status.value) for r in ids}
    assert_file_holds(db, expected)


async def test_a_store_opened_on_a_missing_directory_raises_a_typed_error_naming_the_path(
    tmp_path: Path,
) -> None:
    store = SQLiteStore(tmp_path / "missing" / "runs.db")
    with pytest.raises(StoreUnavailableError) as info:
        await store.open()
    assert info.value.tier == "sqlite"
    assert "missing" in str(info.value)
    with pytest.raises(StoreUnavailableError):
        async with Runtime([SIGNAL], tiers=[Tier(store, POLICY)]):
            pass  # pragma: no cover - never entered
