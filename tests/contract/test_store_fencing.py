"""The Store ownership contract (``Store`` docstring, design/ownership.md §4.5), run against every tier.

A fenced save (``save(fence=)``) writes nothing of a shard whose fence in the
store is newer than the writer's epoch (or the same epoch held by another
owner, or not named by the fence) and reports it in ``SaveResult.fenced``;
``seal`` raises fences without writing; copies are ordered by
``(epoch, version)``; ``scan``/``scan_snapshots`` filter by shard. Run ids
here carry their shard in hotstate's generated prefix (``s3.~a`` is in shard 3,
``shard_of``), so each test names its shards directly.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import pytest

from hotstate import ConfigError, PersistenceError, Snapshot, Status, Transition, TransitionKind
from hotstate.persistence import (
    MemoryStore,
    PickleCodec,
    PostgresStore,
    SQLiteStore,
    Store,
    StoredDeadLetter,
    StoredSnapshot,
    ValkeyStore,
)
from hotstate.persistence._records import decode_snapshot, encode_snapshot
from hotstate.persistence._shards import DEFAULT_SHARDS, Fence, generated_prefix, shard_of
from hotstate.persistence._store import CALL_TRANSITIONS, TRANSACTION_TRANSITIONS, DeadLetterRefusals

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterable
    from pathlib import Path

    import aiosqlite

CODEC = PickleCodec(key=b"fencing-key")


def rid(shard: int, name: str = "r") -> str:
    """A run id in ``shard`` (hotstate's generated prefix)."""
    return f"{generated_prefix(shard)}{name}"


def stored(run_id: str, version: int, epoch: int = 0, *, status: Status = Status.running) -> StoredSnapshot:
    snap = Snapshot(
        run_id=run_id,
        workflow="orders",
        workflow_version=1,
        version=version,
        step=version - 1,
        status=status,
        payload={"v": version, "epoch": epoch},
        error=None,
        updated_at=1_700_000_000.0 + version,
        attempt=1,
    )
    return encode_snapshot(snap, CODEC, epoch)


def trans(run_id: str, version: int) -> Transition:
    return Transition(
        run_id=run_id,
        version=version,
        kind=TransitionKind.step,
        step=version - 1,
        status=Status.running,
        at=1_700_000_000.0 + version,
        detail=None,
    )


def history_of(run_id: str, versions: Iterable[int]) -> list[Transition]:
    return [trans(run_id, v) for v in versions]


async def pair(store: Store, run_id: str) -> tuple[int, int] | None:
    """The stored ``(epoch, version)`` of a run, or None."""
    found = await store.load(run_id)
    return None if found is None else (found.header.epoch, found.header.version)


async def history(store: Store, run_id: str) -> list[int]:
    return [t.version for t in await store.history(run_id)]


# --- a fenced shard writes nothing; the others are written ------------------------------


async def test_a_fenced_batch_writes_nothing_of_its_shard_and_writes_the_other_shards_runs(store: Store) -> None:
    assert await store.seal(Fence("new", {1: 5})) == {}
    batch = [stored(rid(1, "a"), 3, 4), stored(rid(1, "b"), 2, 4), stored(rid(2, "c"), 3, 4)]
    transitions = [*history_of(rid(1, "a"), [1, 2, 3]), *history_of(rid(2, "c"), [1, 2, 3])]
    result = await store.save(batch, transitions, fence=Fence("old", {1: 4, 2: 4}))
    assert result.fenced == {1: 5}
    assert (result.written, result.stale, result.transitions, result.conflicts) == (1, 0, 3, {})
    for gone in (rid(1, "a"), rid(1, "b")):
        assert await store.load(gone) is None
        assert await store.history(gone) == []
    assert await pair(store, rid(2, "c")) == (4, 3)
    assert await history(store, rid(2, "c")) == [1, 2, 3]


async def test_seal_then_a_lower_epoch_save_is_rejected_and_reported_with_the_stored_epoch(store: Store) -> None:
    run = rid(3)
    old, new = Fence("old", {3: 1}), Fence("new", {3: 2})
    assert (await store.save([stored(run, 3, 1)], [trans(run, 3)], fence=old)).written == 1
    assert await store.seal(new) == {}
    late = await store.save([stored(run, 4, 1)], [trans(run, 4)], fence=old)
    assert late.fenced == {3: 2}
    assert (late.written, late.stale, late.transitions) == (0, 0, 0)
    assert await pair(store, run) == (1, 3)
    assert await history(store, run) == [3]
    # The new owner resumes from version 3 at its epoch.
    resumed = await store.save([stored(run, 4, 2)], [trans(run, 4)], fence=new)
    assert (resumed.written, resumed.fenced, resumed.transitions) == (1, {}, 1)
    assert await pair(store, run) == (2, 4)


async def test_the_same_epoch_held_by_another_owner_is_fenced(store: Store) -> None:
    run = rid(4)
    assert (await store.save([stored(run, 1, 3)], [], fence=Fence("a", {4: 3}))).written == 1
    twin = await store.save([stored(run, 2, 3)], [trans(run, 2)], fence=Fence("b", {4: 3}))
    assert twin.fenced == {4: 3}
    assert (twin.written, twin.transitions) == (0, 0)
    assert await store.seal(Fence("b", {4: 3})) == {4: 3}
    assert await pair(store, run) == (3, 1)
    assert (await store.save([stored(run, 2, 3)], [], fence=Fence("a", {4: 3}))).written == 1  # the first keeps it


async def test_a_first_fenced_save_raises_a_missing_fence(store: Store) -> None:
    run = rid(5)
    first = await store.save([stored(run, 1, 7)], [trans(run, 1)], fence=Fence("a", {5: 7}))
    assert (first.written, first.fenced) == (1, {})
    # The fence is now (7, "a"): an older epoch, and the same epoch of another owner, are refused.
    assert (await store.save([stored(run, 9, 6)], [], fence=Fence("b", {5: 6}))).fenced == {5: 7}
    assert (await store.save([stored(run, 9, 7)], [], fence=Fence("b", {5: 7}))).fenced == {5: 7}
    assert await store.seal(Fence("b", {5: 7})) == {5: 7}
    assert await pair(store, run) == (7, 1)


async def test_a_shard_the_fence_does_not_name_is_fenced_with_its_stored_epoch(store: Store) -> None:
    unowned = await store.save([stored(rid(6), 1, 1), stored(rid(7), 1, 1)], [], fence=Fence("a", {6: 1}))
    assert unowned.fenced == {7: 0}  # no fence stored there yet, and none raised
    assert (unowned.written, unowned.stale) == (1, 0)
    assert await store.load(rid(7)) is None
    assert await store.seal(Fence("b", {7: 4})) == {}
    assert (await store.save([stored(rid(7), 1, 1)], [], fence=Fence("a", {6: 1}))).fenced == {7: 4}


# --- (epoch, version) order ---------------------------------------------------------------


async def test_a_higher_epoch_with_a_lower_version_replaces_a_lower_epoch_with_a_higher_version(store: Store) -> None:
    run = rid(8)
    await store.save([stored(run, 9, 1)], [])
    result = await store.save([stored(run, 2, 2)], [])
    assert (result.written, result.stale, result.conflicts) == (1, 0, {})
    assert await store.load(run) == stored(run, 2, 2)


async def test_a_lower_epoch_with_a_higher_version_does_not_replace_and_is_a_conflict(store: Store) -> None:
    run = rid(8)
    await store.save([stored(run, 2, 2)], [])
    result = await store.save([stored(run, 9, 1)], [])
    assert (result.written, result.stale, result.conflicts) == (0, 1, {run: 2})
    again = await store.save([stored(run, 2, 2)], [])  # the same pair: a retry, never a conflict
    assert (again.written, again.stale, again.conflicts) == (0, 1, {})
    assert await store.load(run) == stored(run, 2, 2)


async def test_a_run_given_twice_in_a_batch_keeps_its_highest_pair_and_conflicts_on_it(store: Store) -> None:
    await store.save([stored(rid(1, "x"), 5, 2), stored(rid(1, "y"), 5, 2)], [])
    batch = [stored(rid(1, "x"), 9, 1), stored(rid(1, "x"), 1, 3), stored(rid(1, "y"), 7, 1), stored(rid(1, "y"), 8, 1)]
    result = await store.save(batch, [])
    assert (result.written, result.stale) == (1, 3)
    assert result.conflicts == {rid(1, "y"): 5}  # x: (3, 1) wins over the stored (2, 5); y: (1, 8) is below it
    assert await pair(store, rid(1, "x")) == (3, 1)
    assert await pair(store, rid(1, "y")) == (2, 5)


# --- without a fence; seal -----------------------------------------------------------------


async def test_a_save_without_fence_ignores_fences_and_leaves_them_as_they_are(store: Store) -> None:
    run = rid(9)
    assert await store.seal(Fence("x", {9: 9})) == {}
    result = await store.save([stored(run, 1)], [trans(run, 1)])
    assert (result.written, result.transitions, result.fenced) == (1, 1, {})
    assert (await store.save([stored(run, 2, 8)], [], fence=Fence("y", {9: 8}))).fenced == {9: 9}
    assert await store.seal(Fence("x", {9: 9})) == {}


async def test_seal_is_idempotent_and_returns_the_shards_it_could_not_seal(store: Store) -> None:
    assert await store.seal(Fence("a", {1: 3, 2: 3})) == {}
    assert await store.seal(Fence("a", {1: 3, 2: 3})) == {}
    assert await store.seal(Fence("b", {1: 2, 2: 3, 3: 1})) == {1: 3, 2: 3}
    assert await store.seal(Fence("b", {3: 1})) == {}
    assert await store.seal(Fence("c", {1: 4})) == {}
    assert await store.seal(Fence("a", {1: 3, 2: 3})) == {1: 4}
    assert await store.seal(Fence("a", {})) == {}
    # What the seals left: shard 1 is c's at 4, 2 a's at 3, 3 b's at 1.
    batch = [stored(rid(1), 1, 4), stored(rid(2), 1, 3), stored(rid(3), 1, 1)]
    assert (await store.save(batch, [], fence=Fence("a", {1: 4, 2: 3, 3: 1}))).fenced == {1: 4, 3: 1}


async def test_a_long_batch_of_a_fenced_shard_writes_none_of_its_transitions(store: Store) -> None:
    n = 2 * max(CALL_TRANSITIONS, TRANSACTION_TRANSITIONS) + 7  # several store calls
    assert await store.seal(Fence("new", {1: 2})) == {}
    transitions = [*history_of(rid(1), range(1, n + 1)), trans(rid(2), 1)]
    result = await store.save(
        [stored(rid(1), n, 1), stored(rid(2), 1, 1)], transitions, fence=Fence("old", {1: 1, 2: 1})
    )
    assert (result.fenced, result.written, result.transitions) == ({1: 2}, 1, 1)
    assert await store.history(rid(1)) == []
    assert await pair(store, rid(2)) == (1, 1)


# --- reads: shard filter and the epoch ---------------------------------------------------


async def test_scan_and_scan_snapshots_keep_only_the_runs_of_the_given_shards(store: Store) -> None:
    plain = [f"order-{i}" for i in range(40)]  # no prefix: crc32 picks their shards
    prefixed = [rid(s, f"{i}") for s in (1, 2, 3) for i in range(5)]
    ids = [*plain, *prefixed]
    await store.save([stored(r, 1, status=Status.done if i % 3 else Status.running) for i, r in enumerate(ids)], [])
    wanted = {1, 3, shard_of(plain[0], store.shards)}
    expected = sorted(r for r in ids if shard_of(r, store.shards) in wanted)
    assert len(expected) > 10

    found: list[str] = []
    after: str | None = None
    while True:  # paging keeps the filter
        page = await store.scan(shards=wanted, after=after, limit=4)
        found.extend(h.run_id for h in page)
        if len(page) < 4:
            break
        after = page[-1].run_id
    assert found == expected
    assert [s.header.run_id for s in await store.scan_snapshots(shards=wanted)] == expected
    running = await store.scan(shards=wanted, status="running")
    assert [h.run_id for h in running] == [r for r in expected if ids.index(r) % 3 == 0]
    many = set(range(1, store.shards, 2))  # half the shards: SQLite reads by run id instead of by shard
    assert [h.run_id for h in await store.scan(shards=many)] == sorted(
        r for r in ids if shard_of(r, store.shards) in many
    )
    assert await store.scan(shards=()) == []
    assert await store.scan_snapshots(shards=[]) == []
    assert len(await store.scan()) == len(ids)


async def test_the_epoch_round_trips_in_load_load_many_scan_and_scan_snapshots(store: Store) -> None:
    copies = [stored(rid(1, "a"), 4, 7), stored(rid(2, "b"), 3, 0), stored(rid(3, "c"), 2, 2**40)]
    await store.save(copies, [])
    by_id = {c.header.run_id: c for c in copies}
    for c in copies:
        loaded = await store.load(c.header.run_id)
        assert loaded == c
        assert decode_snapshot(loaded, CODEC, tier=store.tier).version == c.header.version  # run/2 verifies
    assert await store.load_many(list(by_id)) == by_id
    assert await store.scan() == [c.header for c in copies]
    assert await store.scan_snapshots() == copies


async def test_a_newer_owners_kept_copy_of_a_version_replaces_the_first_and_keeps_its_epoch(store: Store) -> None:
    run = rid(1)
    await store.save_versions([stored(run, 4, 0), stored(run, 6, 2)])
    await store.save_versions([stored(run, 4, 5), stored(run, 6, 2, status=Status.done), stored(run, 6, 1)])
    assert await store.load_version(run, 5) == stored(run, 4, 5)  # a newer owner's copy of version 4
    assert await store.load_version(run, 6) == stored(run, 6, 2)  # else the first copy of a version stays


# --- dead letters and kept copies under a fence -------------------------------------------------


def letter(run_id: str, version: int = 3, error: str = "{}") -> StoredDeadLetter:
    return StoredDeadLetter(
        run_id=run_id,
        workflow="orders",
        at=1_700_000_001.0,
        error=error,
        attempts="[]",
        compensation_errors="[]",
        snapshot=stored(run_id, version, status=Status.failed),
    )


async def letters(store: Store) -> list[str]:
    return [d.run_id for d in await store.dead_letters()]


def fenced_shards(refused: object) -> dict[int, int]:
    """``DeadLetterRefusals.fenced`` of a ``save_dead_letters`` reply (every store here returns one)."""
    assert isinstance(refused, DeadLetterRefusals)
    return dict(refused.fenced)


async def test_a_fenced_dead_letter_save_writes_nothing_of_its_shard_and_writes_the_other_shards(
    store: Store,
) -> None:
    assert await store.seal(Fence("new", {1: 5})) == {}
    batch = [letter(rid(1, "a")), letter(rid(1, "b")), letter(rid(2, "c"))]
    refused = await store.save_dead_letters(batch, fence=Fence("old", {1: 4, 2: 4}))
    assert refused is not None
    assert set(refused) == {rid(1, "a"), rid(1, "b")}
    assert all(why.startswith("fenced") for why in refused.values())
    assert fenced_shards(refused) == {1: 5}
    assert await letters(store) == [rid(2, "c")]
    # The written shard's missing fence was raised to the writer's: an older epoch is refused there now.
    assert await store.seal(Fence("other", {2: 3})) == {2: 4}
    # The new owner's letter of the same run is written.
    assert await store.save_dead_letters([letter(rid(1, "a"), 7)], fence=Fence("new", {1: 5})) == {}
    assert await letters(store) == [rid(1, "a"), rid(2, "c")]


async def test_a_dead_letter_of_a_shard_the_fence_does_not_name_or_of_a_twin_owner_is_fenced(store: Store) -> None:
    refused = await store.save_dead_letters([letter(rid(3)), letter(rid(4))], fence=Fence("a", {4: 2}))
    assert refused is not None
    assert set(refused) == {rid(3)}
    assert refused[rid(3)].startswith("fenced")
    assert fenced_shards(refused) == {3: 0}  # no fence there yet, and none raised
    twin = await store.save_dead_letters([letter(rid(4), 5)], fence=Fence("b", {4: 2}))  # same epoch, another owner
    assert twin is not None
    assert (set(twin), fenced_shards(twin)) == ({rid(4)}, {4: 2})
    assert [d.snapshot.header.version for d in await store.dead_letters()] == [3]  # a's letter stays


async def test_a_fenced_and_a_rejected_dead_letter_are_both_reported_and_the_rest_written(store: Store) -> None:
    assert await store.seal(Fence("new", {1: 2})) == {}
    batch = [letter(rid(1)), letter(rid(2, "bad"), error="\udcff"), letter(rid(2, "ok"))]
    refused = await store.save_dead_letters(batch, fence=Fence("old", {1: 1, 2: 1}))
    assert refused is not None
    assert set(refused) == {rid(1), rid(2, "bad")}
    assert refused[rid(1)].startswith("fenced")
    assert not refused[rid(2, "bad")].startswith("fenced")
    assert fenced_shards(refused) == {1: 2}
    assert await letters(store) == [rid(2, "ok")]


async def test_save_dead_letter_under_a_fence_raises_when_fenced_and_writes_nothing(store: Store) -> None:
    assert await store.seal(Fence("new", {1: 2})) == {}
    with pytest.raises(PersistenceError, match="fenced"):
        await store.save_dead_letter(letter(rid(1)), fence=Fence("old", {1: 1}))
    await store.save_dead_letter(letter(rid(1)), fence=Fence("new", {1: 2}))
    assert await letters(store) == [rid(1)]


async def test_dead_letters_and_kept_copies_without_fence_ignore_fences_and_leave_them(store: Store) -> None:
    assert await store.seal(Fence("x", {1: 9})) == {}
    assert await store.save_dead_letters([letter(rid(1))]) in ({}, None)
    assert await store.save_versions([stored(rid(1), 4, 1)]) is None
    assert await letters(store) == [rid(1)]
    assert await store.load_version(rid(1), 9) == stored(rid(1), 4, 1)
    assert await store.seal(Fence("x", {1: 9})) == {}  # still x's at 9


async def test_fenced_kept_copies_are_not_kept_for_their_shard_and_reported(store: Store) -> None:
    assert await store.seal(Fence("new", {1: 5})) == {}
    copies = [stored(rid(1, "a"), 4, 4), stored(rid(1, "b"), 2, 4), stored(rid(2), 4, 4), stored(rid(3), 4, 4)]
    assert await store.save_versions(copies, fence=Fence("old", {1: 4, 2: 4})) == {1: 5, 3: 0}
    assert await store.load_version(rid(1, "a"), 9) is None
    assert await store.load_version(rid(1, "b"), 9) is None
    assert await store.load_version(rid(3), 9) is None
    assert await store.load_version(rid(2), 9) == stored(rid(2), 4, 4)
    assert await store.seal(Fence("other", {2: 3})) == {2: 4}  # raised to the writer's
    # The new owner keeps its copies; a fenced write with nothing fenced reports nothing.
    assert await store.save_versions([stored(rid(1, "a"), 4, 5)], fence=Fence("new", {1: 5})) == {}
    assert await store.load_version(rid(1, "a"), 9) == stored(rid(1, "a"), 4, 5)
    assert await store.save_versions([], fence=Fence("new", {1: 5})) in ({}, None)


# --- the shard count ------------------------------------------------------------------------


def other_store(store: Store, **options: Any) -> Store:
    """A second store object over the same data as ``store`` (another process, say)."""
    if isinstance(store, SQLiteStore):
        return SQLiteStore(store.path, **options)
    if isinstance(store, ValkeyStore):
        return ValkeyStore(store.url, prefix=store.prefix, **options)
    if isinstance(store, PostgresStore):
        return PostgresStore(store.url, schema=store.schema, **options)
    raise AssertionError(type(store))


async def test_the_shard_count_is_recorded_at_the_first_open_and_another_count_is_refused(store: Store) -> None:
    assert store.shards == DEFAULT_SHARDS
    if isinstance(store, MemoryStore):  # the object is its own record
        async with MemoryStore(shards=16) as small:
            assert small.shards == 16
        with pytest.raises(ConfigError, match="shards"):
            MemoryStore(shards=0)
        return
    async with other_store(store) as same:
        assert same.shards == DEFAULT_SHARDS
    async with other_store(store, shards=DEFAULT_SHARDS) as same:
        assert same.shards == DEFAULT_SHARDS
    refused = other_store(store, shards=16)
    with pytest.raises(ConfigError, match=rf"shards=16.*{DEFAULT_SHARDS}"):
        await refused.open()
    await refused.aclose()


# --- SQLite: a claim that commits between two transactions of one save ------------------------


@pytest.mark.parametrize("claim_before", [2, 3], ids=["before-the-second", "before-the-last"])
async def test_sqlite_a_long_batch_checks_the_fence_again_in_every_transaction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, claim_before: int
) -> None:
    n = 2 * TRANSACTION_TRANSITIONS + 7  # three transactions: two of transitions, then the last one
    path = tmp_path / "fenced.db"
    async with SQLiteStore(path) as store, SQLiteStore(path) as claimer:
        begun = 0
        original = store._transaction

        @contextlib.asynccontextmanager
        async def transaction(action: str) -> AsyncIterator[aiosqlite.Connection]:
            nonlocal begun
            begun += 1
            if begun == claim_before:  # the transaction before it has committed
                assert await claimer.seal(Fence("new", {1: 2})) == {}
            async with original(action) as conn:
                yield conn

        monkeypatch.setattr(store, "_transaction", transaction)
        transitions = [*history_of(rid(1), range(1, n + 1)), trans(rid(2), 1)]
        batch = [stored(rid(1), n, 1), stored(rid(2), 1, 1)]
        result = await store.save(batch, transitions, fence=Fence("old", {1: 1, 2: 1}))
        landed = (claim_before - 1) * TRANSACTION_TRANSITIONS  # the parts committed before the claim
        assert result.fenced == {1: 2}
        assert (result.written, result.stale, result.transitions) == (1, 0, landed + 1)
        assert await history(store, rid(1)) == list(range(1, landed + 1))
        assert await store.load(rid(1)) is None
        assert await pair(store, rid(2)) == (1, 1)
        assert begun == 3


async def test_a_fenced_shard_and_a_rejected_run_in_one_batch_leave_the_rest_written(store: Store) -> None:
    assert await store.seal(Fence("new", {1: 3})) == {}
    batch = [stored(rid(1), 1, 2), stored(rid(2, "bad"), 1, 2), stored(rid(2, "ok"), 1, 2)]
    bad = Transition(rid(2, "bad"), 1, TransitionKind.step, 0, Status.running, 1.0, "\udcff")
    result = await store.save(batch, [bad, trans(rid(2, "ok"), 1)], fence=Fence("old", {1: 2, 2: 2}))
    assert (result.fenced, set(result.rejected)) == ({1: 3}, {rid(2, "bad")})
    assert (result.written, result.transitions) == (1, 1)
    assert await pair(store, rid(2, "ok")) == (2, 1)
    assert await store.load(rid(1)) is None
