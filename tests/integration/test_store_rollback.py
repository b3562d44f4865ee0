"""A runtime whose store went back in time writes every run again, and recovery resumes no finished run.

Real servers and files (#10): a Valkey server without an append-only file is
told to ``SAVE`` an RDB while 50 runs wait for a signal; the runs then finish
and are flushed; the server is SIGKILLed and started again, so it loads that
RDB and the 50 runs are back to ``waiting`` in it (a crash under Valkey's
default RDB persistence, or a restored RDB backup; the old prefix-wide epoch
key came back with it, so this went unnoticed). For SQLite the same happens
with a backup restored in place over the open file (the online backup API, as
``sqlite3 runs.db ".restore backup.db"`` does). Before the writer marks, the
runtime went on claiming the lost versions, and the next ``recover=True``
resumed 50 of the 50 finished runs.
"""

from __future__ import annotations

import contextlib
import sqlite3
from typing import TYPE_CHECKING, Any

import anyio
import pytest
import valkey

from hotstate import Runtime, Status, Step, StepContext, StoreUnavailableError, Tier, Workflow
from hotstate.persistence import EmbeddedValkey, FlushPolicy, SQLiteStore, Store, ValkeyStore

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

GUARD = 20  # seconds; a hang guard only
RUNS = 50
POLICY = FlushPolicy(interval=0.010, retry_initial=0.005, retry_max=0.02)


async def inc(p: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    return {**p, "n": p["n"] + 1}


async def take(p: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    return {**p, "got": ctx.signal}


SIGNAL = Workflow("signal", [Step(fn=inc, name="a"), Step(fn=take, wait_for="go"), Step(fn=inc, name="b")])


async def wait_until(predicate: Callable[[], bool]) -> None:
    with anyio.fail_after(GUARD):
        while not predicate():  # noqa: ASYNC110 - the flush loop retries a restarted server; no event for it
            await anyio.sleep(0.005)


def all_in(rt: Runtime, ids: list[str], status: Status) -> Callable[[], bool]:
    return lambda: all(rt.get(r).status is status for r in ids)


async def flush(rt: Runtime) -> None:
    """``rt.flush()``, again while a connection the restart broke fails it (the flush loop retries too)."""
    with anyio.fail_after(GUARD):
        while True:
            try:
                await rt.flush()
                return
            except StoreUnavailableError:
                await anyio.sleep(0.01)


class ValkeyRollback:
    """A Valkey server with RDB persistence only, and a prefix of its own."""

    def __init__(self, server: EmbeddedValkey) -> None:
        self.server = server

    def store(self) -> Store:
        return ValkeyStore(self.server.url, prefix="rollback", socket_timeout=1.0)

    def checkpoint(self) -> None:
        with valkey.Valkey.from_url(self.server.url) as client:
            client.save()

    def roll_back(self) -> None:
        self.server.kill()  # SIGKILL: what was written since the SAVE is lost
        self.server.start()  # loads dump.rdb


class SQLiteRollback:
    def __init__(self, tmp_path: Path) -> None:
        self.path = tmp_path / "runs.db"
        self.backup = tmp_path / "backup.db"

    def store(self) -> Store:
        return SQLiteStore(self.path)

    @staticmethod
    def _copy(source: Path, target: Path) -> None:
        with contextlib.closing(sqlite3.connect(source)) as src, contextlib.closing(sqlite3.connect(target)) as dst:
            src.backup(dst)

    def checkpoint(self) -> None:
        self._copy(self.path, self.backup)

    def roll_back(self) -> None:
        self._copy(self.backup, self.path)


Rollback = ValkeyRollback | SQLiteRollback


@pytest.fixture(params=["valkey", "sqlite"])
def rollback(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Rollback]:
    if request.param == "sqlite":
        yield SQLiteRollback(tmp_path)
        return
    server = EmbeddedValkey(persistence=False).start()  # no AOF, no save points: only SAVE writes the RDB
    try:
        yield ValkeyRollback(server)
    finally:
        server.stop()


async def finish_after_a_checkpoint(rt: Runtime, rollback: Rollback) -> list[str]:
    """50 runs wait, durable; the store's backup is taken; they finish, durable; the store goes back to the backup."""
    ids = [(await rt.spawn(SIGNAL, {"n": i}, run_id=f"r{i:02d}")).run_id for i in range(RUNS)]
    await wait_until(all_in(rt, ids, Status.waiting))
    await flush(rt)
    rollback.checkpoint()
    for rid in ids:
        await rt.send(rid, "go", rid)
    await wait_until(all_in(rt, ids, Status.done))
    await flush(rt)
    assert rt.tier_statistics()[0].resets == 0
    await anyio.to_thread.run_sync(rollback.roll_back)
    async with rollback.store() as look:
        stored = await look.load_many(ids)
        assert {s.header.status for s in stored.values()} == {"waiting"}  # the loss is real
    return ids


async def resumed_after_restart(rollback: Rollback) -> set[str]:
    async with Runtime([SIGNAL], tiers=[Tier(rollback.store(), POLICY)], recover=True) as rt:
        report = rt.recovery_report
        assert report is not None
        return {r.run_id for r in report.resumed}


async def test_a_store_gone_back_to_an_older_backup_is_noticed_at_the_next_flush_and_gets_every_run_again(
    rollback: Rollback,
) -> None:
    async with Runtime([SIGNAL], tiers=[Tier(rollback.store(), POLICY)]) as rt:
        ids = await finish_after_a_checkpoint(rt, rollback)

        await rt.spawn(SIGNAL, {"n": -1}, run_id="late")  # the next flush has something to write
        await wait_until(lambda: rt.get("late").status is Status.waiting)
        await flush(rt)
        await flush(rt)  # the first one found the loss and queued every run again
        stats = rt.tier_statistics()[0]
        assert stats.resets == 1
        assert stats.pending_snapshots == 0
        async with rollback.store() as look:
            stored = await look.load_many(ids)
            for rid in ids:
                v = rt.get(rid).version
                assert (stored[rid].header.version, stored[rid].header.status) == (v, "done")
                assert rt.durable_versions(rid)[rt.tier_statistics()[0].tier] == v
                assert [t.version for t in await look.history(rid)] == list(range(1, v + 1))

    assert await resumed_after_restart(rollback) == {"late"}  # before: the 50 finished runs too


async def test_a_runtime_idle_after_the_store_went_back_notices_before_it_closes(rollback: Rollback) -> None:
    """A runtime that writes nothing after the rollback still checks its mark: the final flush probes the store."""
    async with Runtime([SIGNAL], tiers=[Tier(rollback.store(), POLICY)]) as rt:
        ids = await finish_after_a_checkpoint(rt, rollback)
    assert await resumed_after_restart(rollback) == set(), f"{RUNS} finished runs resumed: {ids[:3]}..."


async def test_two_runtimes_sharing_a_valkey_prefix_each_notice_an_empty_restart_and_write_their_runs_again() -> None:
    """Before, the prefix-wide epoch told only the first runtime to flush; the other's runs were never written again."""
    server = EmbeddedValkey(persistence=False).start()
    try:
        shared = ValkeyRollback(server)
        # Two writers on one prefix, each with its own runs: the writers' marks are under test, not
        # ownership (which would send every run to one of them), so ownership is off.
        async with (
            Runtime([SIGNAL], tiers=[Tier(shared.store(), POLICY)], ownership=False) as one,
            Runtime([SIGNAL], tiers=[Tier(shared.store(), POLICY)], ownership=False) as two,
        ):
            ids = {rt: [(await rt.spawn(SIGNAL, {"n": i}, run_id=f"{name}{i:02d}")).run_id for i in range(10)]
                   for rt, name in ((one, "one"), (two, "two"))}  # fmt: skip
            for rt in (one, two):
                await wait_until(all_in(rt, ids[rt], Status.waiting))
                await flush(rt)
            await anyio.to_thread.run_sync(server.restart)  # no RDB, no AOF: back empty
            for rt in (one, two):
                await rt.send(ids[rt][0], "go", 1)  # each runtime has something to write again
                await wait_until(all_in(rt, ids[rt][:1], Status.done))
                await flush(rt)
                await flush(rt)
            assert [rt.tier_statistics()[0].resets for rt in (one, two)] == [1, 1]
            async with shared.store() as look:
                stored = await look.load_many([*ids[one], *ids[two]])
                assert {rid: s.header.version for rid, s in stored.items()} == {
                    rid: rt.get(rid).version for rt in (one, two) for rid in ids[rt]
                }
    finally:
        server.stop()
