"""``ValkeyStore`` on a real Valkey Cluster of 3 primaries (the session's ``valkey_cluster``).

- the harness: the cluster serves every slot, and a store's keys spread over every primary,
  each shard's keys on the node that serves the shard's slot;
- the store reached through any node's URL, or a ``ValkeyCluster`` client of the caller's,
  does all its work across nodes: saves, loads, scans, history, dead letters, kept
  versions, purges, seals and fenced saves; a standalone client of the caller's is refused;
- writer marks live one per shard, in the shard's slot: a shard that lost this writer's
  writes is a reset at the next save that writes it (or a probe), and only then;
- ``ValkeyAuthority`` refuses a Cluster with a ``ConfigError`` naming the authorities to use;
- a runtime writes its runs to the cluster through a Valkey tier, with ``SQLiteAuthority``.

Failover and the losses it brings are in test_valkey_cluster_failover.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import anyio
import pytest
import valkey
from valkey.asyncio.cluster import ValkeyCluster
from valkey.cluster import ValkeyCluster as SyncValkeyCluster
from valkey.crc import key_slot

from hotstate import ConfigError, Ownership, Runtime, Status, Step, Transition, TransitionKind, Workflow
from hotstate.persistence import (
    FlushPolicy,
    RunHeader,
    SQLiteAuthority,
    StoredDeadLetter,
    StoredSnapshot,
    Tier,
    ValkeyAuthority,
    ValkeyStore,
)
from hotstate.persistence._shards import Fence, generated_prefix, shard_of
from hotstate.persistence._store import CALL_TRANSITIONS

if TYPE_CHECKING:
    from pathlib import Path

SHARDS = 16


def stored(
    run_id: str, version: int = 1, *, epoch: int = 0, status: str = "running", workflow: str = "orders", at: float = 1.0
) -> StoredSnapshot:
    header = RunHeader(run_id, workflow, 1, version, version - 1, status, 1_700_000_000.0 + at, 1, epoch)
    return StoredSnapshot(header, None, f"body of {run_id} v{version} e{epoch}".encode())


def trans(run_id: str, version: int) -> Transition:
    return Transition(run_id, version, TransitionKind.step, version - 1, Status.running, 1_700_000_000.5, None)


def rid(shard: int, name: str) -> str:
    """A run id in ``shard`` (hotstate's generated prefix)."""
    return f"{generated_prefix(shard)}{name}"


def dead(run_id: str, at: float) -> StoredDeadLetter:
    return StoredDeadLetter(
        run_id=run_id,
        workflow="orders",
        at=at,
        error="{}",
        attempts="[]",
        compensation_errors="[]",
        snapshot=stored(run_id, 3, epoch=2, status="failed"),
    )


def sync_cluster(url: str) -> SyncValkeyCluster:
    cluster: SyncValkeyCluster = SyncValkeyCluster.from_url(url)  # type: ignore[no-untyped-call]  # valkey-py's is untyped
    return cluster


def primaries(url: str) -> list[tuple[str, int]]:
    with sync_cluster(url) as cluster:
        return sorted((node.host, node.port) for node in cluster.get_primaries())


def keys_by_primary(url: str, prefix: str) -> dict[int, list[str]]:
    """Port of each primary -> the keys under ``prefix`` it holds."""
    found = {}
    for host, port in primaries(url):
        with valkey.Valkey(host=host, port=port) as client:
            found[port] = sorted(k.decode() for k in client.scan_iter(match=f"{prefix}:*", count=1000))
    return found


def store_on(url: str, prefix: str, **options: Any) -> ValkeyStore:
    """What the contract suite's ``make_store`` builds for the ``valkey-cluster`` tier."""
    return ValkeyStore(url, prefix=prefix, socket_timeout=2.0, **options)


# --- the harness ---------------------------------------------------------------------------


async def test_the_cluster_serves_every_slot_and_a_stores_keys_spread_over_every_primary(
    valkey_cluster: str, valkey_cluster_prefix: str
) -> None:
    nodes = primaries(valkey_cluster)
    assert len(nodes) >= 3
    for host, port in nodes:
        with valkey.Valkey(host=host, port=port) as client:
            info = client.execute_command("CLUSTER INFO")
            assert (info["cluster_state"], info["cluster_slots_ok"]) == ("ok", "16384")
    ids = [f"order-{i}" for i in range(200)]
    async with store_on(valkey_cluster, valkey_cluster_prefix) as store:
        assert store._cluster
        assert isinstance(store._client, ValkeyCluster)
        result = await store.save([stored(r, 2) for r in ids], [trans(r, v) for r in ids for v in (1, 2)])
        assert (result.written, result.transitions, result.reset) == (200, 400, False)
        held = keys_by_primary(valkey_cluster, valkey_cluster_prefix)
    assert all(held.values()), {port: len(keys) for port, keys in held.items()}  # every primary holds some
    with sync_cluster(valkey_cluster) as cluster:
        for port, keys in held.items():
            for key in keys:  # each key on the node serving its slot: the shard's tag decides
                assert cluster.get_node_from_key(key).port == port, key
    run_keys = [k for keys in held.values() for k in keys if ":run:" in k]
    assert len(run_keys) == 200


# --- the store's whole surface across nodes ---------------------------------------------------


async def test_every_store_operation_works_across_the_nodes(valkey_cluster: str, valkey_cluster_prefix: str) -> None:
    ids = [f"order-{i:03}" for i in range(120)]
    async with store_on(valkey_cluster, valkey_cluster_prefix, shards=SHARDS) as store:
        assert store._slot_per_script
        first = await store.save([stored(r, 1) for r in ids], [trans(r, 1) for r in ids])
        assert (first.written, first.transitions) == (120, 120)
        done = ids[::3]
        again = await store.save(
            [stored(r, 2, status="done", at=2.0) for r in done] + [stored(ids[1], 1)],
            [trans(r, 2) for r in done],
        )
        assert (again.written, again.stale, again.transitions) == (len(done), 1, len(done))
        assert (await store.save([stored(ids[0], 1)], [])).conflicts == {ids[0]: 2}
        # reads
        loaded = await store.load_many(ids)
        assert {r: s.header.version for r, s in loaded.items()} == {r: 2 if r in done else 1 for r in ids}
        assert await store.load(ids[0]) == stored(ids[0], 2, status="done", at=2.0)
        assert await store.load("nobody") is None
        assert [t.version for t in await store.history(ids[0])] == [1, 2]
        # scans merge the shards' index sets, which live on several nodes
        paged: list[str] = []
        after = None
        while page := await store.scan(limit=7, after=after):
            paged += [h.run_id for h in page]
            after = page[-1].run_id
        assert paged == ids
        assert [h.run_id for h in await store.scan(status="done", limit=1000)] == done
        assert [s.header.run_id for s in await store.scan_snapshots(status="running", limit=5)] == [
            r for r in ids if r not in done
        ][:5]
        in_three = [r for r in ids if shard_of(r, SHARDS) == 3]
        assert [h.run_id for h in await store.scan(shards=[3], limit=1000)] == in_three
        # dead letters, kept versions, copies, purges
        await store.save_dead_letters([dead(ids[4], 2.0), dead(ids[5], 1.0)])
        assert [d.run_id for d in await store.dead_letters()] == [ids[5], ids[4]]
        assert await store.delete_dead_letter(ids[5])
        assert not await store.delete_dead_letter(ids[5])
        assert [d.run_id for d in await store.dead_letters()] == [ids[4]]
        await store.save_versions([stored(ids[1], 1), stored(ids[2], 1)])
        kept = await store.load_version(ids[1], 5)
        assert kept == stored(ids[1], 1)
        assert await store.delete_copy(ids[2], stored(ids[2], 1).body)
        assert await store.load(ids[2]) is None
        assert await store.purge_finished(before=1_700_000_001.5) == 0  # done at 2.0: not before
        assert await store.purge_finished(before=1_700_000_010.0) == len(done)
        assert await store.load_many(done) == {}
        assert [h.run_id for h in await store.scan(status="done", limit=1000)] == []


async def test_fences_and_seals_hold_on_every_node(valkey_cluster: str, valkey_cluster_prefix: str) -> None:
    shards = [0, 5, 11]
    async with store_on(valkey_cluster, valkey_cluster_prefix, shards=SHARDS) as store:
        assert await store.seal(Fence("new", dict.fromkeys(shards, 2))) == {}
        assert await store.seal(Fence("old", dict.fromkeys(shards, 1))) == dict.fromkeys(shards, 2)
        runs = [rid(s, "a") for s in shards]
        late = await store.save([stored(r, 5, epoch=1) for r in runs], [], fence=Fence("old", dict.fromkeys(shards, 1)))
        assert (late.fenced, late.written) == (dict.fromkeys(shards, 2), 0)
        assert await store.load_many(runs) == {}
        owned = Fence("new", {0: 2, 5: 2})  # not shard 11: fenced without a script
        result = await store.save([stored(r, 1, epoch=2) for r in runs], [], fence=owned)
        assert (result.written, result.fenced) == (2, {11: 2})
        long = [trans(runs[0], v) for v in range(2, 2 * CALL_TRANSITIONS + 10)]  # several scripts, several rounds
        result = await store.save([stored(runs[0], 9, epoch=2)], long, fence=owned)
        assert (result.written, result.transitions, result.fenced) == (1, len(long), {})
        refused = await store.save_dead_letters([dead(runs[1], 1.0)], fence=Fence("old", {5: 1}))
        assert list(refused) == [runs[1]]
        assert "epoch 2" in refused[runs[1]]
        assert await store.save_versions([stored(runs[0], 9, epoch=2)], fence=owned) == {}


async def test_any_nodes_url_and_a_callers_cluster_client_reach_the_whole_cluster(
    valkey_cluster: str, valkey_cluster_prefix: str
) -> None:
    ids = [f"any-{i}" for i in range(40)]
    async with store_on(valkey_cluster, valkey_cluster_prefix) as store:
        await store.save([stored(r, 1) for r in ids], [])
    for host, port in primaries(valkey_cluster):
        async with store_on(f"valkey://{host}:{port}/0", valkey_cluster_prefix, read_only=True) as reader:
            assert set(await reader.load_many(ids)) == set(ids)
    client = ValkeyCluster.from_url(valkey_cluster)
    try:
        async with ValkeyStore(client=client, prefix=valkey_cluster_prefix) as store:
            assert store._cluster
            assert (await store.save([stored(r, 2) for r in ids], [])).written == 40
        assert len(await client.keys(f"{valkey_cluster_prefix}:*", target_nodes=ValkeyCluster.PRIMARIES)) > 40
    finally:
        await client.aclose()


async def test_a_callers_client_of_one_node_of_a_cluster_is_refused_naming_the_fix(
    valkey_cluster: str, valkey_cluster_prefix: str
) -> None:
    client = valkey.asyncio.Valkey.from_url(valkey_cluster)
    try:
        store = ValkeyStore(client=client, prefix=valkey_cluster_prefix)
        with pytest.raises(ConfigError, match=r"ValkeyStore\.client.*ValkeyCluster"):
            await store.open()
    finally:
        await client.aclose()


# --- writer marks, one per shard ---------------------------------------------------------------


async def test_a_writer_keeps_one_mark_per_shard_and_removes_them_at_close(
    valkey_cluster: str, valkey_cluster_prefix: str
) -> None:
    async with store_on(valkey_cluster, valkey_cluster_prefix, shards=SHARDS) as store:
        writer = store._mark.writer
        held = keys_by_primary(valkey_cluster, valkey_cluster_prefix)
        marks = sorted(k for keys in held.values() for k in keys if ":mark:" in k)
        assert marks == sorted(store.shard_key(s, "mark", writer) for s in range(SHARDS))  # written at open
        assert all(key_slot(m.encode()) == key_slot(f"{{{m.split('{')[1].split('}')[0]}}}".encode()) for m in marks)
    held = keys_by_primary(valkey_cluster, valkey_cluster_prefix)
    assert [k for keys in held.values() for k in keys if ":mark:" in k] == []


async def test_a_shard_that_lost_this_writers_writes_is_a_reset_when_it_is_written_or_probed(
    valkey_cluster: str, valkey_cluster_prefix: str
) -> None:
    """A rolled-back slot (here: its mark deleted, as a failover to a lagging replica or a restart would) is
    noticed by the next save that writes that shard, by a probe (an empty save), and by no other save."""
    gone, kept = rid(2, "gone"), rid(9, "kept")
    async with store_on(valkey_cluster, valkey_cluster_prefix, shards=SHARDS) as store:
        await store.save([stored(gone, 1), stored(kept, 1)], [])
        with sync_cluster(valkey_cluster) as raw:
            raw.delete(store.shard_key(2, "mark", store._mark.writer))
            raw.delete(store.shard_key(2, "run", gone))
        assert not (await store.save([stored(kept, 2)], [])).reset  # shard 9 lost nothing
        assert (await store.save([stored(gone, 2)], [])).reset
        assert not (await store.save([stored(gone, 3)], [])).reset  # reported once
        with sync_cluster(valkey_cluster) as raw:
            raw.delete(store.shard_key(13, "mark", store._mark.writer))
        probe = await store.save([], [])
        assert (probe.reset, probe.written) == (True, 0)
        assert not (await store.save([], [])).reset
        # A reset whose reply was lost is reported again: the writer never saw its floor rise.
        with sync_cluster(valkey_cluster) as raw:
            raw.delete(store.shard_key(2, "mark", store._mark.writer))
        floor = store._marks.floors[2]
        assert (await store.save([stored(gone, 4)], [])).reset
        store._marks.floors[2] = floor
        assert (await store.save([stored(gone, 5)], [])).reset
        assert not (await store.save([stored(gone, 6)], [])).reset


# --- the lease authority --------------------------------------------------------------------


async def test_valkey_authority_refuses_a_cluster_naming_the_authorities_to_use(
    valkey_cluster: str, valkey_cluster_prefix: str
) -> None:
    authority = ValkeyAuthority(valkey_cluster, prefix=valkey_cluster_prefix)
    with pytest.raises(ConfigError, match=r"PostgresAuthority.*SQLiteAuthority"):
        await authority.open()
    async with store_on(valkey_cluster, valkey_cluster_prefix) as store:
        with pytest.raises(ConfigError, match="PostgresAuthority"):
            store.default_authority()
    workflow = Workflow("cluster-default", [Step(fn=bump, name="a")])
    runtime = Runtime([workflow], tiers=[Tier(store_on(valkey_cluster, valkey_cluster_prefix))])
    with pytest.raises(ConfigError, match="PostgresAuthority"):
        async with runtime:
            pass


# --- a runtime on the cluster -----------------------------------------------------------------


async def bump(payload: int, ctx: Any) -> int:
    return payload + 1


async def test_a_runtime_runs_workflows_to_the_end_on_a_cluster_tier(
    valkey_cluster: str, valkey_cluster_prefix: str, tmp_path: Path
) -> None:
    workflow = Workflow("cluster-owned", [Step(fn=bump, name="a"), Step(fn=bump, name="b"), Step(fn=bump, name="c")])
    authority = SQLiteAuthority(tmp_path / "authority.db", shards=SHARDS)
    tiers = [Tier(store_on(valkey_cluster, valkey_cluster_prefix, shards=SHARDS), FlushPolicy(interval=0.01))]
    async with Runtime([workflow], tiers=tiers, ownership=Ownership(authority=authority, shards=SHARDS)) as rt:
        handles = [await rt.spawn(workflow, i) for i in range(60)]
        with anyio.fail_after(20):
            results = [await h.wait_finished() for h in handles]
        assert results == [i + 3 for i in range(60)]
        await rt.flush()
        stats = rt.statistics().ownership
        assert stats is not None
        epochs = dict(stats.owned)
    async with store_on(valkey_cluster, valkey_cluster_prefix, read_only=True) as reader:
        found = await reader.load_many([h.run_id for h in handles])
        assert len(found) == 60
        assert {s.header.status for s in found.values()} == {"done"}
        assert all(s.header.epoch == epochs[shard_of(r, SHARDS)] for r, s in found.items())
        assert len(await reader.scan(status="done", limit=1000)) == 60
        assert len(await reader.history(handles[0].run_id)) >= 4
