"""Several worker processes on one SQLite file and one valkey-server: shard ownership under faults.

design/ownership.md §5 on one host, with real processes (``hotstate._bench._owner_worker``),
a real SQLite file (durable tier and lease authority) and a real valkey-server. A driver
sends spawns, signals and cancels mostly through workers that do not own the run's shard,
while workers are SIGKILLed, SIGSTOPped past their lease, or redeployed with SIGTERM.
``judge`` (``hotstate._bench._judge``) then checks every invariant after each scenario:
epochs only increase per shard, no two leases of a shard overlap, every run finished as
designed in every tier with a history of real executions, each acknowledged call applied
exactly once, duplicate executions only for steps in flight at a crash (none after a
graceful hand-off), nothing a paused process did after the takeover in any store, and the
takeover within ``ttl + claim_every`` plus the load budget.

Timing: ttl 2 s, renewals every 0.4 s, claims every 0.2 s, 16 shards, steps sleeping 10 ms.
Longer scenarios (scale 1 -> 3 -> 1, takeover at ttl 5 and 10 s, throughput) are in the
``ownership`` bench suite (``hotstate bench --suite ownership``).

The tests at the end are regressions for bugs these scenarios found in the ownership code
(each reproduced deterministically, each fixed since): a hand-off that never ended its drain,
a late renewal that orphaned every shard, an inbox task that died on a lost shard, calls
answered RunNotFoundError while a claimed shard's runs loaded, and an inbox entry for a
finished run that was never settled; and, in the SQLite store, two processes creating one
new file at once; and a renewal late by less than the margin, which evicted unflushed runs
before a lapsed lease nobody took was taken back in place (``ShardManager._reclaim_or_lose``).
"""

from __future__ import annotations

import functools
import itertools
import sqlite3
import time
from typing import TYPE_CHECKING, Any

import anyio
import pytest

from hotstate._bench._cluster import Cluster, WorkerCallError, WorkerProcess, poll
from hotstate._bench._readers import authority_to_wall
from hotstate._bench._scenarios import (
    scenario_forwarding,
    scenario_rolling,
    scenario_sigkill,
    scenario_sigstop,
    scenario_together,
)
from hotstate.persistence import shard_of

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from hotstate._bench._judge import Report

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def make_cluster(tmp_path: Path, valkey_url: str, valkey_prefix: str) -> Callable[..., Cluster]:
    """Clusters on tiers [valkey 10 ms, sqlite 50 ms] (``valkey=False``: sqlite alone), 4 shards moved per round.

    A forwarded call waits 4 s for its owner's verdict (then returns, its entry durable in the inbox).
    """

    def make(*, valkey: bool = True, **overrides: Any) -> Cluster:
        overrides.setdefault("moves_per_round", 4)
        overrides.setdefault("forward_timeout", 4.0)  # a forwarded call is acknowledged once durable anyway
        return Cluster(tmp_path, valkey_url=valkey_url if valkey else None, prefix=valkey_prefix, **overrides)

    return make


def assert_clean(report: Report) -> None:
    assert report.violations == [], report.summary() + "\n" + "\n".join(report.violations[:30])
    assert report.runs >= 10, report.summary()
    assert report.signals_acked > 0, report.summary()
    assert report.cancels_acked > 0, report.summary()
    assert report.via_non_owner >= 0.8 * report.calls, report.summary()  # the map is at most 0.2 s stale


# ------------------------------------------------------------------ scenarios


async def test_sigkill_of_an_owner_its_shards_move_at_once_and_every_run_finishes(make_cluster):
    async with make_cluster() as cluster:
        report = await scenario_sigkill(cluster)
    assert_clean(report)
    kills = [t for t in report.takeovers if t.kind == "kill"]
    assert kills, report.summary()
    cfg = cluster.base
    # On this host a dead owner's lease is broken at once: one placement round, not the ttl.
    assert max(t.detection for t in kills) <= 2 * cfg.claim_every + 0.5, report.takeovers
    # Duplicates only for steps in flight at the kill (judge: within CRASH_WINDOW, under a newer epoch).
    assert report.max_duplicate_age <= 0.5


async def test_sigkill_of_an_owner_on_another_host_is_taken_over_once_its_lease_expires(make_cluster):
    async with make_cluster() as cluster:
        report = await scenario_sigkill(cluster, namespace=True)
    assert_clean(report)
    kills = [t for t in report.takeovers if t.kind == "kill"]
    assert kills, report.summary()
    cfg = cluster.base
    # Its last renewal was at most renew_every before the kill: the lease ran at least ttl - renew_every.
    assert min(t.detection for t in kills) >= cfg.ttl - cfg.renew_every - 0.05, report.takeovers
    assert max(t.detection + (t.load or 0.0) for t in kills) <= cfg.ttl + cfg.claim_every + 1.5, report.takeovers


@pytest.mark.scenario
async def test_rolling_deploy_three_times_under_traffic_runs_nothing_twice(make_cluster):
    async with make_cluster() as cluster:
        report = await scenario_rolling(cluster, cycles=3)
    assert_clean(report)
    assert report.duplicates == 0, report.summary()
    assert report.releases >= 3 * 4, report.summary()  # every hand-off released its shards


async def test_rolling_deploy_on_sqlite_alone_runs_nothing_twice(make_cluster):
    async with make_cluster(valkey=False) as cluster:
        report = await scenario_rolling(cluster, cycles=2)
    assert_clean(report)
    assert report.duplicates == 0, report.summary()


@pytest.mark.scenario
async def test_sigstop_past_the_lease_moves_its_shards_and_nothing_it_did_after_is_stored(make_cluster):
    async with make_cluster(keep_every=1) as cluster:  # every flushed copy is kept, and checked for zombie steps
        report = await scenario_sigstop(cluster)
    assert_clean(report)
    stops = [t for t in report.takeovers if t.kind == "stop"]
    assert stops, report.summary()
    cfg = cluster.base
    # A paused process is alive: its lease is waited out, never broken.
    assert min(t.detection for t in stops) >= cfg.ttl - cfg.renew_every - 0.05, report.takeovers


async def test_calls_through_non_owners_are_applied_exactly_once(make_cluster):
    async with make_cluster() as cluster:
        report = await scenario_forwarding(cluster, runs=30, same_id=4)
    assert_clean(report)
    assert report.duplicates == 0, report.summary()
    assert report.outcomes.get("spawn:ok", 0) >= 30 + 2 * 4, report.outcomes


async def test_two_workers_started_together_split_the_shards_and_resume_each_parked_run_once(make_cluster):
    # uvicorn and fastapi are not installed here: two plain workers started at the same moment
    # stand in for `uvicorn --workers 2` running the README's lifespan example (recover=True).
    async with make_cluster() as cluster:
        report = await scenario_together(cluster, parked=16)
    assert_clean(report)
    assert report.duplicates == 0, report.summary()


# ------------------------------------------------------------------ regressions: bugs these scenarios found


async def _owner_and_other(cluster: Cluster, run_id: str) -> tuple[WorkerProcess, WorkerProcess]:
    """Of two live workers: the one owning ``run_id``'s shard (by its own shard map), and the other."""
    shard = shard_of(run_id, cluster.base.shards)
    owned = await cluster.owned()
    a, b = cluster.live()
    return (a, b) if shard in owned[a.config.name] else (b, a)


def _leases(db: Path) -> list[tuple[int, str | None, float]]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as c:
        return c.execute("SELECT shard, owner, expires_at FROM hs_shard_lease ORDER BY shard").fetchall()


async def test_a_shard_handed_off_and_claimed_back_runs_its_runs(make_cluster):
    """Regression: a hand-off left Scheduler.suspend's predicate set (no end_drain), parking the shard's runs forever."""
    async with make_cluster(moves_per_round=16) as cluster:  # one hand-off: every shard b gets is in it
        a = await cluster.start("a")
        b = await cluster.start("b")
        await cluster.wait_balanced()  # a handed b's shards off to it (drain, flush, release)
        lent = (await cluster.owned())["b"]
        assert await cluster.terminate(b) == 0  # b releases them; a claims them back
        await cluster.wait_owns(a, cluster.base.shards)
        run_id = next(r for i in itertools.count() if shard_of(r := f"back-{i}", cluster.base.shards) in lent)
        await a.call("spawn", workflow="plain", run_id=run_id)
        await a.call("wait_finished", run_id=run_id, timeout=5)  # 3 steps of 10 ms


async def test_a_renewal_that_lands_after_the_deadline_gives_its_leases_back(make_cluster):
    """Regression: a renewal abandoned at the deadline that committed later kept leases nobody ran, forever."""
    async with make_cluster(valkey=False) as cluster:
        a = await cluster.start("a")
        ttl = cluster.base.ttl
        first = _leases(cluster.authority)[0][2]

        async def renewed() -> bool:
            return _leases(cluster.authority)[0][2] != first

        await poll(renewed, timeout=5, every=0.005)  # a renewal landed: T is its time
        t = authority_to_wall(cluster.authority)(_leases(cluster.authority)[0][2]) - ttl
        blocker = sqlite3.connect(cluster.authority, isolation_level=None, timeout=10)
        try:
            blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock (a long flush, a paused writer)
            # Past a's deadline (T + ttl - margin, margin 0.2 s), before its lease ends (T + ttl): the
            # renewal a gave up on commits once the lock is free.
            await anyio.sleep(max(0.0, t + ttl - 0.1 - time.time()))
        finally:
            blocker.rollback()
            blocker.close()
        await cluster.wait_owns(a, cluster.base.shards, timeout=3 * ttl)  # it dropped them at its deadline: back?


async def test_after_losing_every_shard_to_a_lapsed_lease_forwarded_calls_are_applied_again(make_cluster):
    """Regression: OwnershipLostError raised while applying an inbox entry ended the inbox task for good.

    The fault is also what a process paused inside a write transaction of the shared SQLite file
    does to every other process (seen in the SIGSTOP scenario): nobody can renew, every process
    drops every shard at its deadline, and all resumes once the lock is free.
    """
    async with make_cluster(valkey=False) as cluster:
        a, b = await cluster.start_many(["a", "b"])
        await cluster.wait_balanced()
        run_id = (await a.call("spawn", workflow="signalled"))["run_id"]  # a generated id: one of a's shards

        async def waiting() -> bool:
            return bool((await a.call("locate", run_id=run_id))["status"] == "waiting")

        async def lost() -> bool:
            losses: list[int] = [(await cluster.stats(w) or {}).get("losses", 0) for w in (a, b)]
            return min(losses) > 0

        await poll(waiting, timeout=10)
        blocker = sqlite3.connect(cluster.authority, isolation_level=None, timeout=10)
        try:
            blocker.execute("BEGIN IMMEDIATE")  # no renewal lands: both drop every shard at their deadline
            async with anyio.create_task_group() as tg:  # a forwarded call in flight across it
                tg.start_soon(functools.partial(b.call, "send", run_id=run_id, data={"id": "first"}, timeout=30))
                await poll(lost, timeout=3 * cluster.base.ttl)
                await anyio.sleep(cluster.base.ttl)  # the fault lasts past the leases' end: no late renewal lands
                blocker.rollback()
        finally:
            blocker.close()
        await cluster.wait_balanced()
        _, other = await _owner_and_other(cluster, run_id)
        await other.call("send", run_id=run_id, data={"id": "second"})
        final = await other.call("wait_finished", run_id=run_id, timeout=10)
        assert sorted(final["signals"]) == ["first", "second"]
        for w in (a, b):
            assert (await w.call("stats"))["internal_errors"] == 0


async def test_calls_waiting_for_a_dead_owners_shards_are_applied_once_its_runs_are_loaded(make_cluster):
    """Regression: take() owned the shards before their runs loaded; the inbox answered RunNotFoundError meanwhile."""
    async with make_cluster() as cluster:
        b = await cluster.start("b")
        a = await cluster.start("a", namespace=True)  # another host to b: its lease is waited out
        await cluster.wait_balanced()
        ids = await a.call("spawn_many", workflow="held", count=2000, timeout=60)  # a's shards, a few ms to load each
        await a.call("flush")
        await cluster.kill(a)
        answers: list[str] = []

        async def cancel(run_id: str) -> None:  # posted to the inbox while a's shards have no owner
            try:
                await b.call("cancel", run_id=run_id, timeout=30)
                answers.append("ok")
            except WorkerCallError as exc:
                answers.append(exc.type)

        async with anyio.create_task_group() as tg:
            for run_id in ids[::50]:
                tg.start_soon(cancel, run_id)
        assert answers == ["ok"] * len(answers)  # before the fix: every one RunNotFoundError


async def test_a_signal_delivered_again_to_a_finished_run_through_a_non_owner_is_answered_at_once(make_cluster):
    """Regression: an inbox entry for a finished run (not loaded by its owner) was re-read forever, never settled."""
    async with make_cluster(forward_timeout=4.0) as cluster:
        first = await cluster.start("first")
        run_id = (await first.call("spawn", workflow="signalled"))["run_id"]
        for key in ("k1", "k2"):
            await first.call("send", run_id=run_id, data={"id": key}, dedupe_key=key)
        await first.call("wait_finished", run_id=run_id)
        assert await cluster.terminate(first) == 0
        await cluster.start_many(["b", "c"])  # a finished run is not loaded by its next owner
        await cluster.wait_balanced()
        _, other = await _owner_and_other(cluster, run_id)
        started = time.monotonic()
        await other.call("send", run_id=run_id, data={"id": "k1"}, dedupe_key="k1")  # a webhook delivered again
        assert time.monotonic() - started < 2.0  # before the fix: forward_timeout (4 s), the entry never settled


async def test_two_workers_started_together_on_a_new_store_both_start(tmp_path, valkey_url, valkey_prefix):
    """Regression: two processes creating one SQLite file raced on `PRAGMA journal_mode = WAL` (one in 2-3 pairs failed)."""
    for pair in range(3):  # `uvicorn --workers 2` on a first deploy: no database file yet
        async with Cluster(tmp_path / f"pair-{pair}", valkey_url=valkey_url, prefix=f"{valkey_prefix}-{pair}") as c:
            await c.start_many(["a", "b"], fresh=True)
            await c.wait_balanced()
            assert set((await c.terminate_all()).values()) == {0}


async def test_a_renewal_late_by_less_than_the_margin_keeps_the_unflushed_runs(make_cluster):
    async with make_cluster(valkey=False, sqlite_interval=30.0, ack_tiers=()) as cluster:
        a = await cluster.start("a")
        run_id = (await a.call("spawn", workflow="plain"))["run_id"]
        await a.call("wait_finished", run_id=run_id)  # done in memory; nothing flushed for 30 s
        ttl = cluster.base.ttl
        first = _leases(cluster.authority)[0][2]

        async def renewed() -> bool:
            return _leases(cluster.authority)[0][2] != first

        await poll(renewed, timeout=5, every=0.005)  # a renewal landed: T is its time
        t = authority_to_wall(cluster.authority)(_leases(cluster.authority)[0][2]) - ttl
        blocker = sqlite3.connect(cluster.authority, isolation_level=None, timeout=10)
        try:
            blocker.execute("BEGIN IMMEDIATE")
            await anyio.sleep(max(0.0, t + ttl - 0.1 - time.time()))  # past a's deadline, before its lease ends
        finally:
            blocker.rollback()
            blocker.close()
        await cluster.wait_owns(a, cluster.base.shards, timeout=3 * ttl)
        assert (await a.call("locate", run_id=run_id))["status"] == "done"  # with the bug: RunNotFoundError
