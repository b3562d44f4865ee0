"""The Store contract (hotstate.persistence.Store; docs/architecture.md "Persistence"), run against every tier."""

from __future__ import annotations

import asyncio
import sqlite3
from typing import TYPE_CHECKING, Any

import pytest
import valkey

from hotstate import (
    ConfigError,
    CorruptSnapshotError,
    ErrorInfo,
    PersistenceError,
    Snapshot,
    Status,
    StoreUnavailableError,
    Transition,
    TransitionKind,
)
from hotstate.persistence import (
    DEFAULT_SHARDS,
    Codec,
    JsonCodec,
    PickleCodec,
    RunHeader,
    SQLiteStore,
    Store,
    StoredDeadLetter,
    StoredSnapshot,
    ValkeyStore,
    shard_of,
)
from hotstate.persistence._records import (
    decode_snapshot,
    encode_snapshot,
    error_to_json,
    errors_to_json,
)
from hotstate.persistence._valkey_server import free_port

if TYPE_CHECKING:
    from pathlib import Path

CODEC = PickleCodec(key=b"contract-key")

ERROR = ErrorInfo(
    type="builtins.ValueError",
    message="card declined",
    traceback="Traceback (most recent call last):\n...",
    step=2,
    step_name="charge",
    attempt=3,
    at=1700000000.25,
)


def snap(
    run_id: str,
    version: int,
    *,
    status: Status = Status.running,
    workflow: str = "orders",
    payload: object = None,
    updated_at: float = 1700000000.0,
    error: ErrorInfo | None = None,
) -> Snapshot:
    return Snapshot(
        run_id=run_id,
        workflow=workflow,
        workflow_version=2,
        version=version,
        step=version - 1,
        status=status,
        payload={"v": version} if payload is None else payload,
        error=error,
        updated_at=updated_at,
        attempt=1,
    )


def stored(run_id: str, version: int, **kwargs: Any) -> StoredSnapshot:
    return encode_snapshot(snap(run_id, version, **kwargs), CODEC)


def trans(run_id: str, version: int, *, detail: str | None = None) -> Transition:
    return Transition(
        run_id=run_id,
        version=version,
        kind=TransitionKind.step,
        step=version - 1,
        status=Status.running,
        at=1700000000.0 + version,
        detail=detail,
    )


async def versions(store: Store, *run_ids: str) -> dict[str, int]:
    found = await store.load_many(list(run_ids))
    return {run_id: s.header.version for run_id, s in found.items()}


async def scan_all(store: Store, page: int, **filters: Any) -> list[str]:
    ids: list[str] = []
    after: str | None = None
    while True:
        headers = await store.scan(after=after, limit=page, **filters)
        assert len(headers) <= page
        ids.extend(h.run_id for h in headers)
        if len(headers) < page:
            return ids
        after = headers[-1].run_id


# --- round trip -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("codec", "payload"),
    [
        (PickleCodec(trust_stores=True), {"items": ("a", "b"), "total": 12.5, "raw": b"\x00\xff"}),
        (PickleCodec(key="s3cret"), {"nested": [{1, 2}, frozenset({3})]}),
        (JsonCodec(), {"items": ["a", "b"], "total": 12.5, "ok": True, "none": None}),
    ],
    ids=["pickle", "pickle-keyed", "json"],
)
async def test_saved_snapshot_loads_back_equal_to_what_was_saved(store: Store, codec: Codec, payload: object) -> None:
    original = snap("run-1", 3, payload=payload, error=ERROR)._replace(
        signals=(("approve", {"by": "ann"}), ("note", "hi"))
    )
    result = await store.save([encode_snapshot(original, codec)], [trans("run-1", 3)])
    assert (result.written, result.stale, result.transitions) == (1, 0, 1)

    loaded = await store.load("run-1")
    assert loaded is not None
    assert decode_snapshot(loaded, codec, tier=store.tier) == original


async def test_header_fields_survive_exactly(store: Store) -> None:
    s = encode_snapshot(snap("r", 7, updated_at=1700000123.123456789, status=Status.waiting), CODEC)
    await store.save([s], [])
    loaded = await store.load("r")
    assert loaded == s


async def test_binary_body_survives_byte_for_byte(store: Store) -> None:
    body = bytes(range(256)) * 4 + b"\r\n\x00"
    s = StoredSnapshot(header=stored("bin", 1).header, error=None, body=body)
    await store.save([s], [])
    loaded = await store.load("bin")
    assert loaded is not None
    assert loaded.body == body


async def test_unknown_run_loads_as_none_with_empty_history(store: Store) -> None:
    assert await store.load("nope") is None
    assert await store.history("nope") == []
    assert await store.load_many(["nope"]) == {}


async def test_load_many_returns_only_the_runs_it_found(store: Store) -> None:
    await store.save([stored("a", 1), stored("b", 2), stored("c", 3)], [])
    found = await store.load_many(["c", "missing", "a", "a"])
    assert sorted(found) == ["a", "c"]
    assert found["c"].header.version == 3
    assert await store.load_many([]) == {}


# --- version guard ---------------------------------------------------------------


async def test_older_version_never_replaces_a_newer_one_whatever_the_batch_order(
    store: Store,
) -> None:
    assert (await store.save([stored("r", 5)], [])).written == 1
    result = await store.save([stored("r", 3)], [])
    assert (result.written, result.stale) == (0, 1)
    assert await versions(store, "r") == {"r": 5}


async def test_equal_version_is_stale_and_keeps_the_stored_body(store: Store) -> None:
    first = stored("r", 4, payload="first")
    await store.save([first], [])
    result = await store.save([stored("r", 4, payload="second")], [])
    assert (result.written, result.stale) == (0, 1)
    assert await store.load("r") == first


async def test_newer_version_replaces_and_counts_as_written(store: Store) -> None:
    await store.save([stored("r", 1)], [])
    result = await store.save([stored("r", 2, status=Status.done)], [])
    assert (result.written, result.stale) == (1, 0)
    loaded = await store.load("r")
    assert loaded is not None
    assert (loaded.header.version, loaded.header.status) == (2, "done")


async def test_mixed_batch_counts_written_and_stale_per_run(store: Store) -> None:
    await store.save([stored("a", 5), stored("b", 5)], [])
    result = await store.save([stored("a", 6), stored("b", 4), stored("c", 1)], [])
    assert (result.written, result.stale) == (2, 1)
    assert await versions(store, "a", "b", "c") == {"a": 6, "b": 5, "c": 1}


# --- conflicts: which skipped snapshots the store holds a newer version of ------------


async def test_a_batch_that_writes_everything_has_no_conflicts(store: Store) -> None:
    assert (await store.save([stored("a", 1), stored("b", 1)], [])).conflicts == {}
    assert (await store.save([stored("a", 2), stored("b", 3)], [])).conflicts == {}
    assert (await store.save([], [trans("a", 2)])).conflicts == {}


async def test_runs_stored_at_a_higher_version_are_the_conflicts_with_the_stored_versions(store: Store) -> None:
    await store.save([stored("a", 5), stored("b", 7), stored("same", 2)], [])
    result = await store.save([stored("a", 3), stored("b", 6), stored("same", 2), stored("new", 1)], [])
    assert (result.written, result.stale) == (1, 3)
    assert result.conflicts == {"a": 5, "b": 7}
    assert await versions(store, "a", "b", "same", "new") == {"a": 5, "b": 7, "same": 2, "new": 1}


async def test_an_equal_version_is_stale_but_never_a_conflict_so_a_committed_batch_can_be_retried(
    store: Store,
) -> None:
    batch = [stored(f"r{i}", 4) for i in range(5)]
    transitions = [trans(f"r{i}", 4) for i in range(5)]
    first = await store.save(batch, transitions)
    retried = await store.save(batch, transitions)  # committed, but the reply was lost
    assert (first.written, first.stale, first.conflicts) == (5, 0, {})
    assert (retried.written, retried.stale, retried.transitions, retried.conflicts) == (0, 5, 0, {})


@pytest.mark.parametrize(
    ("order", "written"),
    [
        (["x3", "x7", "y4", "y2", "z2", "z1", "w5", "w5"], 2),  # x7, z2
        (["x7", "x3", "y2", "y4", "z1", "z2", "w5", "w5"], 3),  # x7, z1 then z2
    ],
    ids=["as-listed", "pairs-reversed"],
)
async def test_a_run_given_twice_is_a_conflict_only_when_its_highest_version_was_skipped(
    store: Store, order: list[str], written: int
) -> None:
    await store.save([stored("x", 5), stored("y", 5), stored("w", 5)], [])
    result = await store.save([stored(item[0], int(item[1:])) for item in order], [])
    # x: v7 is written (v3 is stale). y: both skipped under v5. z: new, v2 wins.
    # w: equal twice, a retry. Only y is a conflict.
    assert (result.written, result.stale) == (written, len(order) - written)
    assert result.conflicts == {"y": 5}
    assert await versions(store, "x", "y", "z", "w") == {"x": 7, "y": 5, "z": 2, "w": 5}


async def test_a_mixed_batch_writes_every_run_but_the_conflicts_with_their_transitions(store: Store) -> None:
    await store.save([stored("held", 9)], [trans("held", 9)])
    snaps = [stored("held", 2), *(stored(f"run-{i}", 1) for i in range(10))]
    transitions = [trans("held", 2), *(trans(f"run-{i}", 1) for i in range(10))]
    result = await store.save(snaps, transitions)
    assert (result.written, result.stale, result.conflicts) == (10, 1, {"held": 9})
    assert result.transitions == 11  # transitions are kept per (run_id, version), conflict or not
    assert await versions(store, *(f"run-{i}" for i in range(10))) == {f"run-{i}": 1 for i in range(10)}
    assert (await store.load("held")) == stored("held", 9)
    assert [t.version for t in await store.history("run-3")] == [1]


async def test_conflicts_are_exact_in_a_large_batch(store: Store) -> None:
    await store.save([stored(f"run-{i:04d}", 10 if i % 7 == 0 else 1) for i in range(1_500)], [])
    result = await store.save([stored(f"run-{i:04d}", 5) for i in range(1_500)], [])
    held = {f"run-{i:04d}": 10 for i in range(1_500) if i % 7 == 0}
    assert (result.written, result.stale) == (1_500 - len(held), len(held))
    assert result.conflicts == held


async def test_same_run_twice_in_one_batch_keeps_the_highest_version(
    store: Store,
) -> None:
    result = await store.save([stored("r", 3), stored("r", 2), stored("r", 4)], [])
    assert (result.written, result.stale) == (2, 1)
    assert await versions(store, "r") == {"r": 4}


async def test_error_is_cleared_when_a_newer_version_has_none(store: Store) -> None:
    await store.save([stored("r", 1, error=ERROR)], [])
    await store.save([stored("r", 2)], [])
    loaded = await store.load("r")
    assert loaded is not None
    assert loaded.error is None


async def test_concurrent_out_of_order_saves_end_at_the_highest_version(
    store: Store,
) -> None:
    order = [7, 2, 9, 1, 5, 9, 3, 8, 4, 6]
    results = await asyncio.gather(*(store.save([stored("r", v)], [trans("r", v)]) for v in order))
    assert await versions(store, "r") == {"r": 9}
    assert sum(r.written for r in results) + sum(r.stale for r in results) == len(order)
    assert sum(r.transitions for r in results) == 9
    assert [t.version for t in await store.history("r")] == list(range(1, 10))


# --- batches and transitions -------------------------------------------------------


async def test_batch_writes_every_run_and_transition_in_one_call(store: Store) -> None:
    snaps = [stored(f"run-{i}", 2) for i in range(20)]
    transitions = [trans(f"run-{i}", v) for i in range(20) for v in (1, 2)]
    result = await store.save(snaps, transitions)
    assert (result.written, result.stale, result.transitions) == (20, 0, 40)
    assert len(await store.load_many([f"run-{i}" for i in range(20)])) == 20
    assert [t.version for t in await store.history("run-7")] == [1, 2]


async def test_empty_batch_writes_nothing(store: Store) -> None:
    result = await store.save([], [])
    assert (result.written, result.stale, result.transitions) == (0, 0, 0)
    assert not result.reset  # it checks this writer's mark (a probe): nothing was lost


async def test_retried_batch_does_not_duplicate_history(store: Store) -> None:
    batch = [trans("r", 1), trans("r", 2, detail="first")]
    assert (await store.save([stored("r", 2)], batch)).transitions == 2
    retried = [trans("r", 1), trans("r", 2, detail="retried"), trans("r", 3)]
    result = await store.save([stored("r", 3)], retried)
    assert result.transitions == 1
    history = await store.history("r")
    assert [t.version for t in history] == [1, 2, 3]
    assert history[1].detail == "first"


async def test_history_is_ordered_by_version_whatever_the_save_order(
    store: Store,
) -> None:
    await store.save([], [trans("r", 10), trans("r", 2)])
    await store.save([], [trans("r", 1), trans("r", 9)])
    history = await store.history("r")
    assert [t.version for t in history] == [1, 2, 9, 10]
    assert history[0] == trans("r", 1)
    assert isinstance(history[0].kind, TransitionKind)
    assert isinstance(history[0].status, Status)


# --- scan ------------------------------------------------------------------------


async def seed_for_scan(store: Store) -> None:
    statuses = [Status.running, Status.done, Status.waiting, Status.failed]
    snaps = [
        stored(
            f"run-{i:03d}",
            1,
            status=statuses[i % 4],
            workflow="orders" if i % 3 else "refunds",
        )
        for i in range(30)
    ]
    await store.save(snaps, [])


async def test_scan_pages_by_status_with_after_cursor_and_limit(store: Store) -> None:
    await seed_for_scan(store)
    expected = [f"run-{i:03d}" for i in range(30) if i % 4 == 0]
    assert await scan_all(store, 3, status="running") == expected
    assert await scan_all(store, 100, status=Status.running) == expected
    either = [f"run-{i:03d}" for i in range(30) if i % 4 in (1, 3)]
    assert await scan_all(store, 4, status=["done", "failed"]) == either


async def test_scan_pages_by_workflow_and_by_both(store: Store) -> None:
    await seed_for_scan(store)
    refunds = [f"run-{i:03d}" for i in range(30) if i % 3 == 0]
    assert await scan_all(store, 2, workflow="refunds") == refunds
    both = [f"run-{i:03d}" for i in range(30) if i % 3 == 0 and i % 4 == 1]
    assert await scan_all(store, 1, workflow="refunds", status="done") == both


async def test_scan_without_filters_pages_every_run_in_run_id_order(
    store: Store,
) -> None:
    await seed_for_scan(store)
    assert await scan_all(store, 7) == [f"run-{i:03d}" for i in range(30)]
    page = await store.scan(after="run-027", limit=10)
    assert [h.run_id for h in page] == ["run-028", "run-029"]


async def test_scan_returns_full_headers(store: Store) -> None:
    await store.save([stored("r", 4, status=Status.waiting, updated_at=1700000001.5)], [])
    (header,) = await store.scan(status="waiting")
    assert header == RunHeader(
        run_id="r",
        workflow="orders",
        workflow_version=2,
        version=4,
        step=3,
        status="waiting",
        updated_at=1700000001.5,
        attempt=1,
    )


async def test_scan_follows_a_runs_status_and_workflow_changes(store: Store) -> None:
    await store.save([stored("r", 1, status=Status.running, workflow="a")], [])
    await store.save([stored("r", 2, status=Status.done, workflow="b")], [])
    assert await store.scan(status="running") == []
    assert await store.scan(workflow="a") == []
    assert [h.version for h in await store.scan(status="done", workflow="b")] == [2]
    # A stale write must not move the run back in the indexes.
    await store.save([stored("r", 1, status=Status.running, workflow="a")], [])
    assert await store.scan(status="running") == []


async def test_scan_never_decodes_bodies(store: Store) -> None:
    # Bodies that no codec would accept: garbage, and a real pickle frame with a
    # forged digest. Scanning must not care.
    garbage = StoredSnapshot(header=stored("g1", 1).header, error=None, body=b"\x80garbage")
    forged_body = bytearray(stored("g2", 1).body)
    forged_body[10] ^= 0xFF
    forged = StoredSnapshot(header=stored("g2", 1).header, error=None, body=bytes(forged_body))
    await store.save([garbage, forged], [])
    assert [h.run_id for h in await store.scan(status="running")] == ["g1", "g2"]
    loaded = await store.load("g2")
    assert loaded is not None
    with pytest.raises(CorruptSnapshotError) as info:
        decode_snapshot(loaded, CODEC, tier=store.tier)
    assert (info.value.run_id, info.value.version) == ("g2", 1)


async def test_scan_rejects_a_non_positive_limit(store: Store) -> None:
    with pytest.raises(ConfigError):
        await store.scan(limit=0)


# --- dead letters ------------------------------------------------------------------


def dead_letter(run_id: str, at: float) -> StoredDeadLetter:
    return StoredDeadLetter(
        run_id=run_id,
        workflow="orders",
        at=at,
        error=error_to_json(ERROR),
        attempts=errors_to_json([ERROR, ERROR]),
        compensation_errors=errors_to_json([]),
        snapshot=stored(run_id, 9, status=Status.failed, error=ERROR),
    )


async def test_dead_letters_save_in_one_batch_and_the_last_record_of_a_run_wins(
    store: Store,
) -> None:
    batch = [dead_letter(f"b{i}", float(i)) for i in range(50)]
    await store.save_dead_letters([*batch, dead_letter("b7", 99.0)])
    listed = await store.dead_letters()
    assert [d.run_id for d in listed] == [f"b{i}" for i in range(50) if i != 7] + ["b7"]
    assert listed[-1] == dead_letter("b7", 99.0)
    await store.save_dead_letters([])  # nothing to write is fine
    assert len(await store.dead_letters()) == 50


async def test_dead_letters_are_saved_listed_oldest_first_and_deleted(
    store: Store,
) -> None:
    late, early = dead_letter("late", 20.0), dead_letter("early", 10.0)
    await store.save_dead_letter(late)
    await store.save_dead_letter(early)
    assert await store.dead_letters() == [early, late]

    replaced = dead_letter("late", 30.0)
    await store.save_dead_letter(replaced)
    assert await store.dead_letters() == [early, replaced]

    assert await store.delete_dead_letter("early") is True
    assert await store.delete_dead_letter("early") is False
    assert await store.dead_letters() == [replaced]


# --- purge -----------------------------------------------------------------------


async def test_purge_finished_deletes_old_finished_runs_and_their_history_only(
    store: Store,
) -> None:
    snaps = [
        stored("old-done", 2, status=Status.done, updated_at=100.0),
        stored("old-failed", 2, status=Status.failed, updated_at=100.0),
        stored("old-cancelled", 2, status=Status.cancelled, updated_at=100.0),
        stored("new-done", 2, status=Status.done, updated_at=300.0),
        stored("old-running", 2, status=Status.running, updated_at=100.0),
        stored("old-waiting", 2, status=Status.waiting, updated_at=100.0),
    ]
    await store.save(snaps, [trans(s.header.run_id, 2) for s in snaps])
    await store.save_dead_letter(dead_letter("old-failed", 100.0))

    assert await store.purge_finished(before=200.0) == 3

    left = await store.scan()
    assert [h.run_id for h in left] == ["new-done", "old-running", "old-waiting"]
    assert await store.load("old-done") is None
    assert await store.history("old-failed") == []
    assert await store.history("new-done") != []
    assert await store.scan(status="failed") == []
    assert [d.run_id for d in await store.dead_letters()] == ["old-failed"]
    assert await store.purge_finished(before=200.0) == 0


# --- tier-specific parts of the contract ----------------------------------------------


async def test_sqlite_batch_that_fails_midway_leaves_nothing_behind(
    tmp_path: Path,
) -> None:
    path = tmp_path / "atomic.db"
    async with SQLiteStore(path) as store:
        with sqlite3.connect(path) as raw:
            raw.execute(
                "CREATE TRIGGER poison BEFORE INSERT ON transitions "
                "WHEN NEW.run_id = 'poison' BEGIN SELECT RAISE(ABORT, 'poisoned'); END"
            )
        raw.close()
        with pytest.raises(PersistenceError):
            await store.save([stored("a", 1), stored("b", 1)], [trans("a", 1), trans("poison", 1)])
        assert await store.load_many(["a", "b"]) == {}
        assert await store.history("a") == []
        # The writer connection is usable again after the rollback.
        assert (await store.save([stored("a", 1)], [])).written == 1


async def test_sqlite_keeps_everything_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "reopen.db"
    async with SQLiteStore(path, synchronous="full") as store:
        await store.save([stored("r", 3)], [trans("r", 3)])
    async with SQLiteStore(path) as store:
        assert await versions(store, "r") == {"r": 3}
        assert len(await store.history("r")) == 1


async def test_sqlite_missing_directory_is_store_unavailable(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "missing" / "x.db")
    with pytest.raises(StoreUnavailableError) as info:
        await store.open()
    assert isinstance(info.value.__cause__, sqlite3.OperationalError)
    assert not (tmp_path / "missing").exists()


async def test_sqlite_locked_database_is_store_unavailable_then_recovers(
    tmp_path: Path,
) -> None:
    path = tmp_path / "locked.db"
    async with SQLiteStore(path, busy_timeout=0.0) as store:
        locker = sqlite3.connect(path, isolation_level=None)
        try:
            locker.execute("BEGIN IMMEDIATE")
            with pytest.raises(StoreUnavailableError, match="locked") as info:
                await store.save([stored("r", 1)], [trans("r", 1)])
            assert isinstance(info.value.__cause__, sqlite3.OperationalError)
        finally:
            locker.rollback()
            locker.close()
        assert (await store.save([stored("r", 1)], [trans("r", 1)])).written == 1


async def test_store_used_before_open_raises_persistence_error(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "x.db")
    with pytest.raises(PersistenceError, match="not open"):
        await store.load("r")


def test_sqlite_rejects_unknown_synchronous_mode(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="synchronous"):
        SQLiteStore(tmp_path / "x.db", synchronous="SOMETIMES")


async def test_valkey_batch_with_a_wrong_type_key_rejects_that_run_alone(valkey_url: str, valkey_prefix: str) -> None:
    with valkey.Valkey.from_url(valkey_url) as raw:
        raw.set(f"{valkey_prefix}:{{{shard_of('poison', DEFAULT_SHARDS)}}}:hist:poison", "not a hash")
    async with ValkeyStore(valkey_url, prefix=valkey_prefix) as store:
        result = await store.save([stored("a", 1), stored("b", 1)], [trans("a", 1), trans("poison", 1)])
        key = store.run_key("poison", "hist")
        assert result.rejected == {"poison": f"key {key} is a string, not a hash"}
        assert (result.written, result.transitions) == (2, 1)
        assert set(await store.load_many(["a", "b"])) == {"a", "b"}
        assert [t.version for t in await store.history("a")] == [1]


async def test_valkey_unreachable_server_is_store_unavailable() -> None:
    store = ValkeyStore(f"valkey://127.0.0.1:{free_port()}/0", socket_timeout=1.0)
    with pytest.raises(StoreUnavailableError) as info:
        await store.open()
    assert info.value.__cause__ is not None


def test_valkey_client_uses_the_libvalkey_parser() -> None:
    assert ValkeyStore.fast_parser is True


async def test_kept_versions_load_the_newest_copy_at_or_before_a_version(store: Store) -> None:
    await store.save_versions([stored("r", 1), stored("r", 5), stored("r", 9)])
    await store.save_versions([stored("r", 5)])  # idempotent
    for wanted, got in [(1, 1), (4, 1), (5, 5), (8, 5), (9, 9), (100, 9)]:
        found = await store.load_version("r", wanted)
        assert found is not None
        assert found.header.version == got
        assert found.body == stored("r", got).body
    assert await store.load_version("r", 0) is None
    assert await store.load_version("other", 10) is None
