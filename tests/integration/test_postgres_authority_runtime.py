"""A runtime whose lease authority is PostgreSQL (``PostgresAuthority``), on a real server (#13's first piece).

The authority contract runs on PostgreSQL in tests/contract/test_authority.py;
here the seam is used end to end: the runtime claims every shard in
PostgreSQL, runs on a Valkey tier fenced with those epochs, and releases
every shard at shutdown.
"""

from __future__ import annotations

import uuid
from typing import Any

import anyio

from hotstate import Ownership, Runtime, Step, Workflow
from hotstate.persistence import FlushPolicy, Tier, ValkeyStore
from hotstate.persistence._postgres_authority import PostgresAuthority

SHARDS = 8


async def bump(payload: int, ctx: Any) -> int:
    return payload + 1


WF = Workflow("pg-owned", [Step(fn=bump, name="a"), Step(fn=bump, name="b")])


async def test_a_runtime_owns_its_shards_in_postgres_and_gives_them_back(
    postgres_url: str, valkey_url: str, valkey_prefix: str
) -> None:
    schema = f"hs_{uuid.uuid4().hex[:12]}"
    authority = PostgresAuthority(postgres_url, schema=schema, shards=SHARDS)
    tiers = [Tier(ValkeyStore(valkey_url, prefix=valkey_prefix, shards=SHARDS), FlushPolicy(interval=0.01))]
    async with Runtime([WF], tiers=tiers, ownership=Ownership(authority=authority, shards=SHARDS)) as rt:
        stats = rt.statistics().ownership
        assert stats is not None
        assert sorted(stats.owned) == list(range(SHARDS))
        handle = await rt.spawn(WF, 0)
        with anyio.fail_after(10):
            assert await handle.wait_finished() == 2
        await rt.flush()
        stored = await tiers[0].store.load(handle.run_id)
        assert stored is not None
        assert stored.header.epoch == stats.owned[int(handle.run_id[1 : handle.run_id.index(".")])]
    check = PostgresAuthority(postgres_url, schema=schema)
    await check.open()
    try:
        assert all(lease.owner is None for lease in await check.leases())  # released at shutdown
        assert {lease.epoch for lease in await check.leases()} == {1}
    finally:
        await check.aclose()
