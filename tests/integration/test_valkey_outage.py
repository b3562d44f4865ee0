"""Valkey killed mid-load and restarted later: bounded memory, backpressure, catch-up (#5).

``test_tiers.py`` covers an outage between loads (runs keep going, Valkey
catches up) and a restart that comes back empty. This file covers what it does
not: the server SIGKILLed while a load is running, and an outage long enough for
the Valkey tier's unflushed rows to reach ``max_pending_rows``. Then:

- SQLite keeps flushing every version;
- the Valkey tier's pending rows stay at its bound, and do not grow however long
  the outage lasts: steps and ``spawn`` wait (backpressure) instead;
- after the restart, backpressure lifts, every waiting step and spawn goes on,
  and Valkey gets every run's latest version and whole history.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import anyio
import pytest

from hotstate import (
    Runtime,
    Status,
    Step,
    StepContext,
    StoreUnavailableError,
    Tier,
    Workflow,
)
from hotstate.persistence import EmbeddedValkey, FlushPolicy, SQLiteStore, ValkeyStore

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

GUARD = 20  # seconds; a hang guard only
RUNS = 200
AFTER = 8  # steps after the signal
BOUND = 400  # the Valkey tier's max_pending_rows


async def inc(p: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    return {**p, "n": p["n"] + 1}


async def take(p: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    return {**p, "got": ctx.signal}


LOAD = Workflow(
    "load",
    [Step(fn=inc, name="a"), Step(fn=take, wait_for="go"), *(Step(fn=inc, name=f"s{i}") for i in range(AFTER))],
)
FINAL_VERSION = 3 + 2 + AFTER  # spawned, a, waiting, signal, take, the steps after (done on the last)


async def wait_until(predicate: Callable[[], bool]) -> None:
    with anyio.fail_after(GUARD):
        while not predicate():  # noqa: ASYNC110 - retries against a dead server have no event
            await anyio.sleep(0.002)


async def test_valkey_killed_mid_load_keeps_memory_bounded_with_backpressure_and_catches_up(
    private_valkey: EmbeddedValkey, tmp_path: Path
) -> None:
    vk = ValkeyStore(private_valkey.url, prefix="outage", socket_timeout=1.0)
    sq = SQLiteStore(tmp_path / "runs.db")
    vk_policy = FlushPolicy(interval=0.010, max_pending_rows=BOUND, retry_initial=0.005, retry_max=0.02)
    tiers = [Tier(vk, vk_policy), Tier(sq, FlushPolicy(interval=0.05))]
    async with Runtime([LOAD], tiers=tiers) as rt:
        ids = [(await rt.spawn(LOAD, {"n": i}, run_id=f"r{i:03d}")).run_id for i in range(RUNS)]
        await wait_until(lambda: all(rt.get(r).status is Status.waiting for r in ids))
        with anyio.fail_after(GUARD):
            await rt.flush()

        # The load starts (every run is scheduled) and the server dies under it.
        for rid in ids:
            await rt.send(rid, "go", rid)
        private_valkey.kill()

        def valkey() -> Any:
            return rt.tier_statistics()[0]

        await wait_until(lambda: valkey().backpressure and valkey().failures >= 3)
        # More than the bound was marked in total, but the tier holds at most the bound
        # plus what steps already running when it was crossed could add.
        await wait_until(lambda: rt.statistics().ready == 0)
        held = valkey().pending_snapshots + valkey().pending_transitions
        assert BOUND < held <= BOUND + RUNS, held
        unfinished = [r for r in ids if not rt.get(r).finished]
        assert unfinished  # steps are waiting, not running on into memory
        assert rt.statistics().throttle_waits > 0
        assert valkey().backpressure_events >= 1
        assert valkey().last_error is not None

        # A spawn during the outage waits at the gate too.
        late: list[str] = []

        async def spawn_late() -> None:
            late.append((await rt.spawn(LOAD, {"n": -1}, run_id="late")).run_id)

        async with anyio.create_task_group() as tg:
            tg.start_soon(spawn_late)
            # The outage goes on: retries fail, memory does not grow, nothing advances.
            failures = valkey().failures
            await wait_until(lambda: valkey().failures >= failures + 5)
            assert valkey().pending_snapshots + valkey().pending_transitions == held
            assert [r for r in ids if not rt.get(r).finished] == unfinished
            assert late == []
            # SQLite keeps up with everything that did happen.
            with pytest.raises(StoreUnavailableError), anyio.fail_after(GUARD):
                await rt.flush()
            for rid in ids:
                v = rt.get(rid).version
                assert rt.durable_versions(rid)["sqlite"] == v
            assert rt.tier_statistics()[1].consecutive_failures == 0

            await anyio.to_thread.run_sync(private_valkey.start)  # same port, data kept (AOF)
            await wait_until(lambda: late == ["late"])
        with anyio.fail_after(GUARD):
            for rid in ids:
                assert (await rt.wait_finished(rid))["got"] == rid
            await rt.send("late", "go", "late")
            await rt.wait_finished("late")
            await rt.flush()
        assert not valkey().backpressure
        assert valkey().consecutive_failures == 0
        assert valkey().resets == 0  # the server kept its data: nothing needed rewriting
        everyone = [*ids, "late"]
        assert {rt.get(rid).version for rid in ids} == {FINAL_VERSION}
        final = {rid: rt.get(rid).version for rid in everyone}  # "late" got its signal before waiting
        for rid, v in final.items():
            assert rt.durable_versions(rid) == {"hot": v, "valkey": v, "sqlite": v}
        for store in (vk, sq):
            found = await store.load_many(everyone)
            assert sorted(found) == sorted(everyone), store.tier
            for rid, v in final.items():
                assert found[rid].header.version == v
                assert found[rid].header.status == "done"
                history = await store.history(rid)
                assert [t.version for t in history] == list(range(1, v + 1)), (store.tier, rid)
