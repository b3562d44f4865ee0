"""An authority that went back in time (restored, made again empty, a failover that lost commits).

Its epochs restart below the fences the stores hold. Every seal is then
refused, and without ``Authority.claim``'s ``floors`` each claim got one
epoch more than the last: a shard fenced at epoch 1,000 stayed unowned for
1,000 claim rounds. The runtime now passes the refused fence's epoch as the
floor of its next claim, which jumps past it: every shard is owned again at
the next round, never by two processes, and no run is lost.
"""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING, Any

import anyio

from hotstate import Ownership, Runtime, Step, StepContext, Workflow
from hotstate.persistence import FlushPolicy, PostgresStore, SQLiteStore, Tier
from hotstate.persistence._sqlite_authority import authority_path

if TYPE_CHECKING:
    from pathlib import Path

SHARDS = 4
STALE = 1000  # the epoch the stores' fences are at: far past what a restored authority hands out


def ownership() -> Ownership:
    return Ownership(shards=SHARDS, ttl=2.0, renew_every=0.2, claim_every=0.1)


async def inc(p: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    return {**p, "n": p["n"] + 1}


async def take(p: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    return {**p, "got": ctx.signal}


PARKED = Workflow("parked", [Step(fn=inc, name="a"), Step(fn=take, name="wait", wait_for="go")])


async def _park(tiers: list[Tier], n: int) -> list[str]:
    async with Runtime([PARKED], tiers=tiers, ownership=ownership()) as rt:
        ids = [(await rt.spawn(PARKED, {"n": 0})).run_id for _ in range(n)]
        with anyio.fail_after(10):
            while any(rt.get(r).step < 1 for r in ids):  # noqa: ASYNC110 - polling the runtime's state
                await anyio.sleep(0.01)
        await rt.flush()
    return ids


async def _resume_all(tiers: list[Tier], ids: list[str]) -> tuple[dict[int, int], float]:
    """Start a runtime, wait until it owns every shard; returns the epochs and how long that took."""
    async with Runtime([PARKED], tiers=tiers, recover=True, ownership=ownership()) as rt:
        t0 = anyio.current_time()
        with anyio.fail_after(10):  # without floors: STALE claim rounds of 0.1 s, 100 s
            while True:
                owned = rt.statistics().ownership
                assert owned is not None
                if len(owned.owned) == SHARDS:
                    break
                await anyio.sleep(0.02)
        took = anyio.current_time() - t0
        for r in ids:
            await rt.send(r, "go", r)
        for r in ids:
            with anyio.fail_after(10):
                assert (await rt.handle(r).wait_finished())["got"] == r
        return dict(owned.owned), took


async def test_a_deleted_sqlite_authority_file_under_fences_far_ahead_owns_every_shard_at_the_next_claim(
    tmp_path: Path,
) -> None:
    db = tmp_path / "runs.db"
    ids = await _park([Tier(SQLiteStore(db, shards=SHARDS), FlushPolicy(interval=0.01))], 8)
    with sqlite3.connect(db) as conn:  # weeks of deploys later, the fences are far ahead...
        conn.execute("UPDATE hs_shard_fence SET epoch = ?", (STALE,))
    conn.close()
    await anyio.Path(authority_path(db)).unlink()  # ...and the authority's file is lost
    epochs, took = await _resume_all([Tier(SQLiteStore(db, shards=SHARDS), FlushPolicy(interval=0.01))], ids)
    assert set(epochs.values()) == {STALE + 1}  # one claim past the fence, not STALE claims
    assert took < 5.0


async def test_a_postgres_authority_that_lost_its_tables_owns_every_shard_again_past_the_fences(
    postgres_url: str, postgres_schema: str
) -> None:
    import asyncpg

    def tiers() -> list[Tier]:
        return [Tier(PostgresStore(postgres_url, schema=postgres_schema, shards=SHARDS), FlushPolicy(interval=0.01))]

    ids = await _park(tiers(), 8)
    conn = await asyncpg.connect(postgres_url)
    try:  # the store's fences stay; the authority's lease and epoch rows are gone
        await conn.execute(f'UPDATE "{postgres_schema}".hs_store_fence SET epoch = $1', STALE)  # noqa: S608
        for table in ("hs_shard_fence", "hs_shard_lease", "hs_members"):
            await conn.execute(f'DELETE FROM "{postgres_schema}".{table}')  # noqa: S608
    finally:
        await conn.close()
    epochs, _ = await _resume_all(tiers(), ids)
    assert set(epochs.values()) == {STALE + 1}
