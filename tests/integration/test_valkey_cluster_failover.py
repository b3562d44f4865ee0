"""``ValkeyStore`` through a Valkey Cluster failover: a primary SIGKILLed, its replica promoted.

Each test forms its own ``EmbeddedValkeyCluster`` (3 primaries, 1 replica each,
``cluster-node-timeout`` 1 s: about 2 s to form, 2-3 s to fail over) and checks:

- while a primary is down, saves raise ``StoreUnavailableError`` only (never a raw
  valkey error), and they succeed again once its replica serves its slots;
- what the failover lost: rows acknowledged before the kill that the promoted replica
  lacks (replication is asynchronous). The writer whose acknowledged rows were lost is
  told so by ``SaveResult.reset`` at its next save of the shards concerned (its marks
  live in those shards' slots);
- a seal acknowledged just before the kill and lost with it: the shard's fence goes back
  to the older epoch, so the old owner's fenced saves are accepted again until the new
  owner writes the shard (its higher epoch then wins by ``(epoch, version)``). The writer
  marks do not notice a lost seal.

The loss figures are printed (``-s``). One trial by default; more with
``HOTSTATE_FAILOVER_TRIALS=10 pytest -s tests/integration/test_valkey_cluster_failover.py``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import pytest
import valkey
from valkey.crc import key_slot

from hotstate import StoreUnavailableError
from hotstate.persistence import EmbeddedValkeyCluster, RunHeader, SaveResult, StoredSnapshot, ValkeyStore
from hotstate.persistence._shards import Fence, generated_prefix

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterator, Sequence

T = TypeVar("T")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

SHARDS = 16
RUNS = 128  # runs a writer writes at every version, all shards: every node's slots take writes at the kill
WRITERS = 4  # writers stopped by the kill, whose losses are measured (one save in flight each)
PAD = b"x" * 1024  # a body of ~1 KB: replication has something to lag behind
TRIALS = max(1, int(os.environ.get("HOTSTATE_FAILOVER_TRIALS", "1")))
KILLED = 0  # the primary killed; its replica is node 3 (primaries first, then their replicas)
RETRY_PACE = 0.02  # seconds between attempts while the cluster fails over (as the persister's backoff)


def stored(run_id: str, version: int, *, epoch: int = 0, pad: bytes = b"") -> StoredSnapshot:
    header = RunHeader(run_id, "orders", 1, version, version - 1, "running", 1_700_000_000.0 + version, 1, epoch)
    return StoredSnapshot(header, None, f"{run_id} v{version} e{epoch}".encode() + pad)


@contextlib.contextmanager
def failover_cluster() -> Iterator[EmbeddedValkeyCluster]:
    with EmbeddedValkeyCluster(primaries=3, replicas=1, node_timeout=1.0) as cluster:
        yield cluster


def shards_on(cluster: EmbeddedValkeyCluster, index: int) -> list[int]:
    """The hotstate shards whose slot primary ``index`` serves (its range: the cluster splits slots evenly)."""
    share = 16384 // cluster.primaries
    return [s for s in range(SHARDS) if index * share <= key_slot(f"{{{s}}}".encode()) < (index + 1) * share]


async def until_ok(call: Callable[[], Awaitable[T]]) -> T:
    """``call()``, again while it raises ``StoreUnavailableError``, as the persister retries (a hang guard bounds it).

    After a failover, a client's first call to the dead primary's slots fails
    once: that is how it learns the new slot map.
    """
    with anyio.fail_after(30):
        while True:
            try:
                return await call()
            except StoreUnavailableError:
                await anyio.sleep(RETRY_PACE)


async def until_saved(store: ValkeyStore, *args: Any, **kwargs: Any) -> SaveResult:
    return await until_ok(lambda: store.save(*args, **kwargs))


@dataclass
class Writer:
    """Saves ``ids`` at version 1, 2, 3... through one store; what was acknowledged, and each error's type."""

    ids: Sequence[str]
    acked: int = 0
    errors: list[str] = field(default_factory=list)
    acked_after: int = 0  # saves acknowledged since `resumed` was set
    resets: int = 0
    stop: bool = False
    resumed: bool = False
    back: anyio.Event = field(default_factory=anyio.Event)  # three saves acknowledged after `resumed`

    async def run(self, store: ValkeyStore, started: anyio.Event) -> None:
        version = 0
        while not self.stop:
            version += 1
            try:
                result = await store.save([stored(r, version, pad=PAD) for r in self.ids], [])
            except StoreUnavailableError as exc:
                self.errors.append(type(exc).__name__)
                version -= 1
                await anyio.sleep(RETRY_PACE)
                continue
            self.acked = version
            self.resets += result.reset
            self.acked_after += self.resumed
            if self.acked_after >= 3:
                self.back.set()
            if version == 20:
                started.set()


@dataclass(frozen=True)
class Trial:
    acked: int  # snapshots the measured writers saw acknowledged (all versions)
    lost_runs: int  # runs whose stored version is below the last one acknowledged, after the promotion
    lost_versions: int  # acknowledged versions missing, summed over those runs
    resets: int  # writers whose next save reported their loss
    errors: int  # StoreUnavailableError seen by the other writer during the failover
    failover: float  # seconds from the kill to a replica serving the slots


def shard_in(run_id: str) -> int:
    return int(run_id[1 : run_id.index(".")])


def ids(name: str) -> list[str]:
    return [f"{generated_prefix(i % SHARDS)}{name}-{i}" for i in range(RUNS)]


@pytest.mark.parametrize("trial", range(TRIALS))
async def test_saves_through_a_failover_raise_only_unavailable_and_acknowledged_losses_are_a_reset(
    trial: int,
) -> None:
    with failover_cluster() as cluster:
        assert [n.role for n in cluster.nodes()] == ["primary"] * 3 + ["replica"] * 3
        measured = [Writer(ids(f"w{k}")) for k in range(WRITERS)]
        other = Writer(ids("other"))  # writes on through the failover
        async with contextlib.AsyncExitStack() as stack:
            stores = [
                await stack.enter_async_context(ValkeyStore(url, prefix="fo", shards=SHARDS, socket_timeout=2.0))
                for url in [cluster.url] * WRITERS + [cluster.urls[1]]
            ]
            async with anyio.create_task_group() as tg:
                started = [anyio.Event() for _ in stores]
                for writer, store, event in zip([*measured, other], stores, started, strict=True):
                    tg.start_soon(writer.run, store, event)
                with anyio.fail_after(30):
                    for event in started:
                        await event.wait()
                for writer in measured:
                    writer.stop = True  # after the save in flight: it meets the kill
                clock = anyio.current_time()
                cluster.kill(KILLED)
                promoted = await anyio.to_thread.run_sync(cluster.wait_promoted, KILLED)
                failover = anyio.current_time() - clock
                other.resumed = True
                with anyio.fail_after(30):
                    await other.back.wait()  # the other writer writes again, on every node
                other.stop = True
            # Only StoreUnavailableError was caught: any other error would have failed the task group.
            assert promoted == 3
            assert [n.role for n in cluster.nodes()] == ["down", "primary", "primary", "primary", "replica", "replica"]
            lost_runs = lost_versions = resets = 0
            for writer, store in zip(measured, stores, strict=False):
                found = await until_ok(functools.partial(stores[-1].load_many, writer.ids))
                behind = {r: writer.acked - found[r].header.version for r in writer.ids}
                behind = {r: n for r, n in behind.items() if n > 0}
                assert {shard_in(r) for r in behind} <= set(shards_on(cluster, KILLED))  # the killed node's only
                again = [stored(r, writer.acked + 1) for r in writer.ids]
                reset = (await until_saved(store, again, [])).reset
                assert reset == bool(behind)  # the writer hears of its lost rows at its next save, and only then
                assert not (await store.save([stored(r, writer.acked + 2) for r in writer.ids], [])).reset
                lost_runs, lost_versions, resets = (
                    lost_runs + len(behind),
                    lost_versions + sum(behind.values()),
                    resets + reset,
                )
        acked = sum(w.acked for w in measured) * RUNS
        trial_result = Trial(acked, lost_runs, lost_versions, resets, len(other.errors), round(failover, 2))
        print(f"\nfailover trial {trial}: {trial_result}")


async def test_a_seal_lost_in_a_failover_lets_the_old_owner_write_until_the_new_owner_writes_the_shard() -> None:
    with failover_cluster() as cluster:
        shard = shards_on(cluster, KILLED)[0]
        run = f"{generated_prefix(shard)}fenced"
        old, new = Fence("old", {shard: 1}), Fence("new", {shard: 2})
        async with (
            ValkeyStore(cluster.url, prefix="fence", shards=SHARDS) as zombie,
            ValkeyStore(cluster.urls[1], prefix="fence", shards=SHARDS) as owner,
        ):
            assert (await zombie.save([stored(run, 1, epoch=1)], [], fence=old)).written == 1
            cluster.wait_replicated()
            replica = cluster.nodes()[3]
            assert (replica.role, replica.pid is not None) == ("replica", True)
            assert replica.pid is not None
            # The replica stopped, then cut off: what the primary writes next never reaches it
            # (a stopped replica alone would still read what its socket buffered).
            os.kill(replica.pid, signal.SIGSTOP)
            try:
                with valkey.Valkey(port=cluster.nodes()[KILLED].port) as primary:
                    assert primary.client_kill_filter(_type="slave") == 1
                assert await owner.seal(new) == {}  # acknowledged by the primary
                assert (await zombie.save([stored(run, 2, epoch=1)], [], fence=old)).fenced == {shard: 2}
                cluster.kill(KILLED)
            finally:
                os.kill(replica.pid, signal.SIGCONT)
            assert await anyio.to_thread.run_sync(cluster.wait_promoted, KILLED) == 3
            # The promoted replica never had the seal: the fence is back at epoch 1, the old owner's.
            # (Its fenced save before the kill advanced its mark, which the failover lost too: a reset.)
            late = await until_saved(zombie, [stored(run, 3, epoch=1)], [], fence=old)
            assert (late.written, late.fenced, late.reset) == (1, {}, True)
            assert await until_ok(lambda: owner.load(run)) == stored(run, 3, epoch=1)
            # The new owner's first write of the shard raises the fence again, and its epoch wins over a higher version.
            mine = await owner.save([stored(run, 2, epoch=2)], [], fence=new)
            assert (mine.written, mine.fenced, mine.reset) == (1, {}, False)  # no mark noticed the lost seal
            assert (await zombie.save([stored(run, 4, epoch=1)], [], fence=old)).fenced == {shard: 2}
            assert await owner.load(run) == stored(run, 2, epoch=2)
