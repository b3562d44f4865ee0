"""Valkey key layout 2 (design/ownership.md §4.9): keys grouped by shard, one slot per script, against real servers.

- every key of a run, and every index, fence and dead-letter key, carries its
  shard's hash tag: all keys of a shard hash to one Cluster slot;
- the store runs whole on a one-node Valkey Cluster, whose scripts (``#!lua``)
  are refused when they touch keys of two slots;
- a fenced shard's keys are left byte for byte as they were;
- ``P:meta`` records the shard count: another count is refused, and so is a
  prefix holding keys of layout 1;
- scans merge the shards' indexes in run-id order, and a flush is one round trip.
"""

from __future__ import annotations

import contextlib
import math
import subprocess
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

import pytest
import valkey
from valkey.crc import key_slot

from hotstate import (
    CodecError,
    ConfigError,
    PersistenceError,
    Status,
    StoreUnavailableError,
    Transition,
    TransitionKind,
)
from hotstate.persistence import (
    DEFAULT_SHARDS,
    EmbeddedValkey,
    RunHeader,
    StoredDeadLetter,
    StoredSnapshot,
    ValkeyStore,
)
from hotstate.persistence._shards import Fence, generated_prefix, shard_of
from hotstate.persistence._store import CALL_TRANSITIONS
from hotstate.persistence._valkey import SCRIPT_ROWS, TRIP_ROWS
from hotstate.persistence._valkey_server import free_port, valkey_server_binary

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence
    from pathlib import Path


def stored(
    run_id: str, version: int = 1, *, epoch: int = 0, status: str = "running", workflow: str = "orders", at: float = 1.0
) -> StoredSnapshot:
    header = RunHeader(run_id, workflow, 1, version, version - 1, status, 1_700_000_000.0 + at, 1, epoch)
    return StoredSnapshot(header, None, f"body of {run_id} v{version} e{epoch}".encode())


def trans(run_id: str, version: int) -> Transition:
    return Transition(run_id, version, TransitionKind.step, version - 1, Status.running, 1_700_000_000.5, None)


def rid(shard: int, name: str = "r") -> str:
    """A run id in ``shard`` (hotstate's generated prefix)."""
    return f"{generated_prefix(shard)}{name}"


def dead(run_id: str) -> StoredDeadLetter:
    return StoredDeadLetter(
        run_id=run_id,
        workflow="orders",
        at=1.0,
        error="{}",
        attempts="[]",
        compensation_errors="[]",
        snapshot=stored(run_id, 3, epoch=2, status="failed"),
    )


def keys_of(url: str, pattern: str) -> list[bytes]:
    with valkey.Valkey.from_url(url) as raw:
        return sorted(raw.scan_iter(match=pattern, count=1000))


def dumps_of(url: str, pattern: str) -> dict[bytes, bytes | None]:
    """Every key matching ``pattern`` with its ``DUMP`` (type, value and encoding, byte for byte)."""
    with valkey.Valkey.from_url(url) as raw:
        return {key: raw.dump(key) for key in sorted(raw.scan_iter(match=pattern, count=1000))}


async def a_bit_of_everything(store: ValkeyStore, ids: Sequence[str]) -> None:
    """Every kind of write the store makes, for the runs ``ids``."""
    await store.save([stored(r, 2) for r in ids], [trans(r, v) for r in ids for v in (1, 2)])
    await store.save([stored(ids[0], 3, status="done")], [trans(ids[0], 3)])
    await store.save_versions([stored(r, 2) for r in ids])
    await store.save_dead_letters([dead(ids[1])])
    assert await store.seal(Fence("me", {shard_of(ids[2], store.shards): 1})) == {}


# --- every key carries its shard's tag -------------------------------------------------------


async def test_every_key_of_a_shard_carries_its_tag_and_hashes_to_its_slot(valkey_url: str, valkey_prefix: str) -> None:
    ids = [*(f"order-{i}" for i in range(30)), rid(5, "a"), rid(77, "b")]
    async with ValkeyStore(valkey_url, prefix=valkey_prefix) as store:
        await a_bit_of_everything(store, ids)
        writer = store._mark.writer
    kinds: set[str] = set()
    for raw_key in keys_of(valkey_url, f"{valkey_prefix}:*"):
        key = raw_key.decode()
        rest = key.removeprefix(valkey_prefix + ":")
        if rest in ("meta", f"mark:{writer}"):
            continue  # the two keys of no shard (the mark is gone at aclose)
        tag, name = rest.split(":", 1)
        shard = int(tag.removeprefix("{").removesuffix("}"))
        assert tag == f"{{{shard}}}"
        assert key_slot(raw_key) == key_slot(f"{{{shard}}}".encode()), key
        kind, _, run_id = name.partition(":")
        if kind in ("run", "hist", "ver"):
            assert shard == shard_of(run_id, DEFAULT_SHARDS), key
            name = kind
        kinds.add(name)
    indexes = {"runs", "status:running", "status:done", "wf:orders"}
    assert kinds == {"run", "hist", "ver", "fence", "dead", "dead:body", *indexes}
    assert keys_of(valkey_url, f"{valkey_prefix}:mark:*") == []


# --- a one-node Valkey Cluster refuses scripts that touch two slots ---------------------------


@pytest.fixture
def cluster_node(tmp_path: Path) -> Iterator[str]:
    """A valkey-server with cluster mode on, serving every slot alone; its URL."""
    port = free_port()
    process = subprocess.Popen(
        [
            valkey_server_binary(),
            *("--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path)),
            *("--save", "", "--appendonly", "no", "--protected-mode", "no"),
            *("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"valkey://127.0.0.1:{port}/0"
        with valkey.Valkey.from_url(url) as raw:
            # The server's start-up, not a behaviour under test: a new cluster
            # node takes writes ~2 s after it serves its slots (Valkey's
            # CLUSTER_WRITABLE_DELAY); the deadline only bounds a hang.
            deadline = time.monotonic() + 30
            added = False
            while True:
                assert process.poll() is None, "the cluster node exited"
                with contextlib.suppress(valkey.ConnectionError):
                    if not added:
                        added = raw.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383) == b"OK"
                    if b"cluster_state:ok" in raw.execute_command("CLUSTER", "INFO"):
                        break
                assert time.monotonic() < deadline, "the cluster node did not come up"
                time.sleep(0.02)
        yield url
    finally:
        process.kill()
        process.wait()


async def test_the_store_runs_whole_on_a_cluster_node_that_refuses_scripts_touching_two_slots(
    cluster_node: str,
) -> None:
    with valkey.Valkey.from_url(cluster_node) as raw, pytest.raises(valkey.ResponseError, match="same slot"):
        raw.eval("#!lua\nredis.call('SET', KEYS[1], 1)\nreturn redis.call('SET', 'another-slot', 1)", 1, "hs:{1}:x")
    ids = [*(f"order-{i}" for i in range(40)), rid(3, "long")]
    async with ValkeyStore(cluster_node, prefix="hs") as store:
        assert store._slot_per_script is True  # told by the server: one shard a script
        await a_bit_of_everything(store, ids)
        long = [trans(rid(3, "long"), v) for v in range(3, 2 * CALL_TRANSITIONS + 10)]  # several scripts
        result = await store.save([stored(rid(3, "long"), 9)], long, fence=Fence("me", {3: 1}))
        assert (result.written, result.transitions, result.fenced) == (1, len(long), {})
        late = await store.save([stored(rid(3, "long"), 10)], [], fence=Fence("old", {3: 0}))
        assert late.fenced == {3: 1}
        assert len(await store.history(rid(3, "long"))) == len(long) + 2
        assert [h.run_id for h in await store.scan(limit=7)] == sorted(ids)[:7]
        assert {s.header.run_id for s in await store.scan_snapshots(status="running")} == set(ids) - {ids[0]}
        assert set(await store.load_many(ids)) == set(ids)
        assert [d.run_id for d in await store.dead_letters()] == [ids[1]]
        assert await store.delete_dead_letter(ids[1])
        kept = await store.load_version(ids[4], 2)
        assert kept is not None
        assert await store.delete_copy(ids[4], kept.body)
        assert await store.purge_finished(before=2_000_000_000.0) == 1
        assert not (await store.save([], [])).reset


# --- a fenced shard is left as it was -----------------------------------------------------------


SLOT_PER_SCRIPT = pytest.mark.parametrize(
    "slot_per_script", [False, True], ids=["shared-scripts", "one-shard-a-script"]
)


@SLOT_PER_SCRIPT
async def test_a_fenced_shards_keys_are_left_byte_for_byte(
    valkey_url: str, valkey_prefix: str, slot_per_script: bool
) -> None:
    old, new = Fence("old", {1: 4, 2: 4}), Fence("new", {1: 5})
    in_one, in_two = [rid(1, "a"), rid(1, "b")], [rid(2, "c")]
    async with ValkeyStore(valkey_url, prefix=valkey_prefix) as store:
        store._slot_per_script = slot_per_script
        first = [stored(r, 2, epoch=4) for r in [*in_one, *in_two]]
        await store.save(first, [trans(r, v) for r in [*in_one, *in_two] for v in (1, 2)], fence=old)
        await store.save_dead_letters([dead(in_one[0])])
        assert await store.seal(new) == {}
        before = dumps_of(valkey_url, f"{valkey_prefix}:{{1}}:*")
        assert len(before) >= 8  # fence, 2 runs, 2 histories, 3 indexes, dead letters
        # Every kind of change: new versions, a new status and workflow, a new run, new transitions.
        late = [
            stored(in_one[0], 3, epoch=4, status="done"),
            stored(in_one[1], 3, epoch=4, workflow="refunds"),
            stored(rid(1, "new"), 1, epoch=4),
            stored(in_two[0], 3, epoch=4, status="done"),
        ]
        transitions = [trans(in_one[0], 3), trans(in_one[1], 3), trans(rid(1, "new"), 1), trans(in_two[0], 3)]
        result = await store.save(late, transitions, fence=old)
        assert result.fenced == {1: 5}
        assert (result.written, result.transitions) == (1, 1)
    assert dumps_of(valkey_url, f"{valkey_prefix}:{{1}}:*") == before
    async with ValkeyStore(valkey_url, prefix=valkey_prefix, read_only=True) as reader:
        found = await reader.load(in_two[0])
        assert found is not None
        assert (found.header.status, found.header.epoch) == ("done", 4)


@SLOT_PER_SCRIPT
async def test_runs_no_store_can_write_are_left_out_and_their_shards_other_runs_written(
    valkey_url: str, valkey_prefix: str, slot_per_script: bool
) -> None:
    surrogate, nan, planted, huge = rid(1, "surrogate"), rid(1, "nan"), rid(2, "planted"), rid(2, "huge")
    fine = [rid(s, "fine") for s in (1, 2, 3)]
    async with ValkeyStore(valkey_url, prefix=valkey_prefix) as store:
        store._slot_per_script = slot_per_script
        with valkey.Valkey.from_url(valkey_url) as raw:
            raw.set(store.run_key(planted, "hist"), "not a hash")
        transitions = [trans(r, 1) for r in [*fine, planted, huge]]
        transitions.append(trans(surrogate, 1)._replace(detail="\udcff"))
        transitions.append(trans(nan, 1)._replace(at=math.nan))
        transitions.append(trans(huge, 1 << 70))
        snapshots = [stored(r) for r in [*fine, surrogate, nan, planted, huge]]
        result = await store.save(snapshots, transitions, fence=Fence("me", {1: 1, 2: 1, 3: 1}))
        assert set(result.rejected) == {surrogate, nan, planted, huge}
        assert "not a hash" in result.rejected[planted]
        assert "out of range" in result.rejected[huge]
        assert (result.written, result.stale, result.transitions, result.fenced) == (3, 0, 3, {})
        assert set(await store.load_many([*fine, surrogate, nan, planted, huge])) == set(fine)


# --- P:meta: the shard count and the layout ------------------------------------------------------


async def test_the_recorded_shard_count_is_used_and_another_count_is_refused_naming_both(
    valkey_url: str, valkey_prefix: str
) -> None:
    async with ValkeyStore(valkey_url, prefix=valkey_prefix, shards=16) as store:
        assert store.shards == 16
        await store.save([stored(f"r{i}") for i in range(64)], [])
    with valkey.Valkey.from_url(valkey_url) as raw:
        assert raw.hgetall(f"{valkey_prefix}:meta") == {b"shards": b"16", b"layout": b"2"}
    tags = {key.split(b":")[1] for key in keys_of(valkey_url, f"{valkey_prefix}:{{*}}:run:*")}
    assert tags == {f"{{{shard_of(f'r{i}', 16)}}}".encode() for i in range(64)}
    for shards in (None, 16):
        async with ValkeyStore(valkey_url, prefix=valkey_prefix, shards=shards, read_only=shards is None) as again:
            assert again.shards == 16
            assert len(await again.scan()) == 64
    refused = ValkeyStore(valkey_url, prefix=valkey_prefix, shards=DEFAULT_SHARDS)
    with pytest.raises(ConfigError, match=rf"shards={DEFAULT_SHARDS}.* 16 shards"):
        await refused.open()
    await refused.aclose()
    with pytest.raises(ConfigError, match="shards"):
        ValkeyStore(valkey_url, prefix=valkey_prefix, shards=0)


async def test_a_read_only_store_on_an_empty_prefix_records_nothing(valkey_url: str, valkey_prefix: str) -> None:
    async with ValkeyStore(valkey_url, prefix=valkey_prefix, read_only=True, shards=8) as reader:
        assert (reader.shards, await reader.scan(), await reader.dead_letters()) == (8, [], [])
    assert keys_of(valkey_url, f"{valkey_prefix}:*") == []


@pytest.mark.parametrize(
    ("key", "plant"),
    [
        ("runs", lambda raw, k: raw.zadd(k, {"old-run": 0})),
        ("epoch", lambda raw, k: raw.set(k, "a0b1")),
        ("dead", lambda raw, k: raw.hset(k, "old-run", "{}")),
    ],
    ids=["runs", "epoch", "dead"],
)
@pytest.mark.parametrize("read_only", [False, True], ids=["writer", "reader"])
async def test_a_prefix_holding_layout_1_keys_is_refused_and_left_as_it_is(
    valkey_url: str, valkey_prefix: str, key: str, plant: Any, read_only: bool
) -> None:
    full = f"{valkey_prefix}:{key}"
    with valkey.Valkey.from_url(valkey_url) as raw:
        raw.hset(f"{valkey_prefix}:run:old-run", "version", "3")
        plant(raw, full)
    before = dumps_of(valkey_url, f"{valkey_prefix}:*")
    store = ValkeyStore(valkey_url, prefix=valkey_prefix, read_only=read_only)
    with pytest.raises(PersistenceError, match=rf"layout 1 \({full}\).*pre-1.0") as refused:
        await store.open()
    assert not isinstance(refused.value, StoreUnavailableError)
    await store.aclose()
    assert dumps_of(valkey_url, f"{valkey_prefix}:*") == before  # no P:meta, no mark


async def test_a_meta_of_another_layout_is_refused(valkey_url: str, valkey_prefix: str) -> None:
    with valkey.Valkey.from_url(valkey_url) as raw:
        raw.hset(f"{valkey_prefix}:meta", mapping={"shards": "128", "layout": "3"})
    store = ValkeyStore(valkey_url, prefix=valkey_prefix)
    with pytest.raises(PersistenceError, match="layout b'3'"):
        await store.open()
    await store.aclose()


async def test_a_server_that_lost_everything_gets_its_meta_back_with_the_reset(
    ephemeral_valkey: EmbeddedValkey,
) -> None:
    async with ValkeyStore(ephemeral_valkey.url, prefix="lost", shards=8, socket_timeout=2.0) as store:
        await store.save([stored("a")], [])
        ephemeral_valkey.restart()  # comes back empty
        for _ in range(3):  # the first call meets the connection the restart broke
            with contextlib.suppress(StoreUnavailableError):
                result = await store.save([stored("b")], [])
                break
        assert result.reset
    with valkey.Valkey.from_url(ephemeral_valkey.url) as raw:
        assert raw.hgetall("lost:meta") == {b"shards": b"8", b"layout": b"2"}


# --- the epoch field ----------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["+3", " 3", "3.0", "x"])
async def test_a_stored_epoch_written_another_way_is_malformed_and_the_next_save_replaces_it(
    valkey_url: str, valkey_prefix: str, text: str
) -> None:
    async with ValkeyStore(valkey_url, prefix=valkey_prefix) as store:
        await store.save([stored("r", 5, epoch=3)], [])
        with valkey.Valkey.from_url(valkey_url) as raw:
            raw.hset(store.run_key("r"), "epoch", text)
        with pytest.raises(CodecError, match="epoch"):
            await store.load("r")
        result = await store.save([stored("r", 1, epoch=1)], [])  # below (3, 5), but the stored pair is unreadable
        assert (result.written, result.conflicts) == (1, {})
        assert await store.load("r") == stored("r", 1, epoch=1)


async def test_a_copy_written_before_epochs_reads_as_epoch_0_and_any_epoch_replaces_it(
    valkey_url: str, valkey_prefix: str
) -> None:
    async with ValkeyStore(valkey_url, prefix=valkey_prefix) as store:
        await store.save([stored("r", 9)], [])
        with valkey.Valkey.from_url(valkey_url) as raw:
            raw.hdel(store.run_key("r"), "epoch")
        assert await store.load("r") == stored("r", 9)
        assert (await store.save([stored("r", 2, epoch=1)], [])).written == 1


# --- scans merge the shards; a flush is one round trip ---------------------------------------------


@pytest.mark.parametrize("limit", [1, 7, 100, 1000])
async def test_scans_merge_every_shards_index_in_run_id_order_however_skewed(
    valkey_url: str, valkey_prefix: str, limit: int
) -> None:
    # Many done runs, few running ones, all in shard 0 or spread: the merge reads on until it knows the page.
    done = [f"d{i:04d}" for i in range(300)]
    running = [rid(0, f"{i:03d}") for i in range(40)] + ["m-1", "z-9"]
    async with ValkeyStore(valkey_url, prefix=valkey_prefix) as store:
        await store.save([stored(r, status="done") for r in done] + [stored(r) for r in running], [])
        for status, expected in ((None, sorted(done + running)), (("running", "done"), sorted(done + running))):
            seen: list[str] = []
            after: str | None = None
            while True:
                page = await store.scan(status=status, after=after, limit=limit)
                seen.extend(h.run_id for h in page)
                if len(page) < limit:
                    break
                after = page[-1].run_id
            assert seen == expected
        assert [h.run_id for h in await store.scan(status="running", limit=limit)] == sorted(running)[:limit]
        in_zero = sorted(r for r in done + running if shard_of(r, store.shards) == 0)
        assert len(in_zero) >= 40
        assert [h.run_id for h in await store.scan(shards=[0], limit=limit)] == in_zero[:limit]


@pytest.mark.parametrize("slot_per_script", [False, True], ids=["standalone", "cluster-like"])
async def test_a_batch_across_every_shard_is_one_round_trip(
    valkey_url: str, valkey_prefix: str, monkeypatch: pytest.MonkeyPatch, slot_per_script: bool
) -> None:
    """Standalone: shards share scripts of up to SCRIPT_ROWS rows; on a Cluster node one shard a script.

    Either way a flush of up to TRIP_ROWS rows is one round trip.
    """
    async with ValkeyStore(valkey_url, prefix=valkey_prefix) as store:
        assert store._slot_per_script is False  # a standalone server
        store._slot_per_script = slot_per_script
        sent: list[int] = []
        send = store._send

        async def counted(client: Any, calls: Any, action: str) -> list[Any]:
            sent.append(len(calls))
            return await send(client, calls, action)

        monkeypatch.setattr(store, "_send", counted)
        for n in (100, 2000):
            sent.clear()
            ids = [f"run-{n}-{i}" for i in range(n)]
            result = await store.save([stored(r, 3) for r in ids], [trans(r, v) for r in ids for v in (1, 2, 3)])
            assert (result.written, result.transitions) == (n, 3 * n)
            assert len(sent) == 1  # one round trip: the scripts and the mark in one pipeline
            shards = Counter(shard_of(r, store.shards) for r in ids)
            if slot_per_script:
                assert sent == [len(shards) + 1]
            else:
                rows, biggest = 4 * n, 4 * max(shards.values())  # a snapshot and three transitions a run
                assert math.ceil(rows / SCRIPT_ROWS) <= sent[0] - 1 <= math.ceil(rows / (SCRIPT_ROWS - biggest))
            assert await store.load_many(ids[:50]) == {r: stored(r, 3) for r in ids[:50]}
        sent.clear()
        assert (await store.save([], [])).written == 0
        assert sent == [1]  # a probe: the mark alone
        sent.clear()
        ids = [f"big-{i}" for i in range(3 * TRIP_ROWS // 4)]  # a snapshot and three transitions each: 3 trips' worth
        result = await store.save([stored(r, 3) for r in ids], [trans(r, v) for r in ids for v in (1, 2, 3)])
        assert (result.written, result.transitions) == (len(ids), 3 * len(ids))
        assert len(sent) in (3, 4)  # round trips of up to TRIP_ROWS rows (a script's rows are not split)
