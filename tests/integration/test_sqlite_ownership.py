"""SQLite and ownership: files of the release before it, the recorded shard count, the shared fence table.

A file written by the release before ownership (its schema is copied below,
verbatim) opens, gains the ``epoch`` and ``shard`` columns in place, and every
copy in it still verifies. The shard count lives in ``hs_meta``; the fences in
``hs_shard_fence``, the table the SQLite lease authority's claims write.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from typing import TYPE_CHECKING

import pytest

from hotstate import ConfigError, ErrorInfo, PersistenceError, Snapshot, Status, Transition, TransitionKind
from hotstate.actors._snapshot import DeadLetter
from hotstate.persistence import BadRow, PickleCodec, SQLiteStore, StoredSnapshot
from hotstate.persistence._records import (
    decode_dead_letter,
    decode_snapshot,
    encode_dead_letter,
    encode_snapshot,
)
from hotstate.persistence._shards import DEFAULT_SHARDS, Fence, shard_of
from hotstate.persistence._sqlite import SQLITE_FENCE_SCHEMA, SQLITE_META_SCHEMA

if TYPE_CHECKING:
    from pathlib import Path

CODEC = PickleCodec(key=b"migration-key")

# The schema of the release before ownership (hotstate/persistence/_sqlite.py at
# commit 30c7475), copied so that this test keeps meaning what it says.
_OLD_SNAPSHOT_COLUMNS = """
    workflow TEXT NOT NULL,
    workflow_version INTEGER NOT NULL,
    version INTEGER NOT NULL,
    step INTEGER NOT NULL,
    status TEXT NOT NULL,
    updated_at REAL NOT NULL,
    attempt INTEGER NOT NULL,
    error TEXT,
    body BLOB NOT NULL"""

OLD_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,{_OLD_SNAPSHOT_COLUMNS}
);
CREATE INDEX IF NOT EXISTS runs_status ON runs (status, run_id);
CREATE INDEX IF NOT EXISTS runs_workflow ON runs (workflow, run_id);
CREATE TABLE IF NOT EXISTS transitions (
    run_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    kind TEXT NOT NULL,
    step INTEGER NOT NULL,
    status TEXT NOT NULL,
    at REAL NOT NULL,
    detail TEXT,
    PRIMARY KEY (run_id, version)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS snapshot_versions (
    run_id TEXT NOT NULL,{_OLD_SNAPSHOT_COLUMNS},
    PRIMARY KEY (run_id, version)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dead_letters (
    run_id TEXT PRIMARY KEY,
    workflow TEXT NOT NULL,
    at REAL NOT NULL,
    error TEXT NOT NULL,
    attempts TEXT NOT NULL,
    compensation_errors TEXT NOT NULL,
    workflow_version INTEGER NOT NULL,
    version INTEGER NOT NULL,
    step INTEGER NOT NULL,
    status TEXT NOT NULL,
    updated_at REAL NOT NULL,
    attempt INTEGER NOT NULL,
    snapshot_error TEXT,
    body BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS writer_marks (
    writer TEXT PRIMARY KEY,
    high INTEGER NOT NULL,
    lost INTEGER NOT NULL,
    at REAL NOT NULL
) WITHOUT ROWID;
"""

RUN_IDS = [f"order-{i}" for i in range(30)] + ["s5.~generated-1", "s200.~past-the-count", "nul\x00inside"]

ERROR = ErrorInfo(type="builtins.ValueError", message="no", traceback="", step=1, step_name="b", attempt=2, at=1.0)


def snap(run_id: str, version: int, status: Status = Status.running) -> Snapshot:
    return Snapshot(
        run_id=run_id,
        workflow="orders",
        workflow_version=1,
        version=version,
        step=version - 1,
        status=status,
        payload={"v": version, "id": run_id},
        error=ERROR if status is Status.failed else None,
        updated_at=1_700_000_000.0 + version,
        attempt=1,
    )


def trans(run_id: str, version: int) -> Transition:
    return Transition(
        run_id, version, TransitionKind.step, version - 1, Status.running, 1_700_000_000.0 + version, None
    )


def old_row(s: StoredSnapshot) -> tuple[object, ...]:
    """A ``runs`` row as the release before wrote it: the header without the epoch, error, body."""
    assert s.header.epoch == 0
    return (*s.header[:8], s.error, s.body)


def write_old_file(path: Path) -> dict[str, StoredSnapshot]:
    """A database as the release before left it; returns the copies in ``runs``."""
    copies = {r: encode_snapshot(snap(r, 3), CODEC) for r in RUN_IDS}
    letter = encode_dead_letter(
        DeadLetter(
            run_id="dead-1",
            workflow="orders",
            snapshot=snap("dead-1", 4, Status.failed),
            error=ERROR,
            attempts=(ERROR,),
            compensation_errors=(),
            at=1_700_000_009.0,
        ),
        CODEC,
    )
    d = letter.snapshot
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute("PRAGMA journal_mode = WAL")  # as the release before left its files
        db.executescript(OLD_SCHEMA)
        db.executemany("INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", [old_row(c) for c in copies.values()])
        db.executemany(
            "INSERT INTO transitions VALUES (?, ?, ?, ?, ?, ?, ?)",
            [(r, v, "step", v - 1, "running", 1_700_000_000.0 + v, None) for r in RUN_IDS for v in (1, 2, 3)],
        )
        kept = [encode_snapshot(snap(r, 2), CODEC) for r in RUN_IDS[:5]]
        db.executemany(
            "INSERT INTO snapshot_versions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", [old_row(k) for k in kept]
        )
        db.execute(
            "INSERT INTO dead_letters VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                letter.run_id,
                letter.workflow,
                letter.at,
                letter.error,
                letter.attempts,
                letter.compensation_errors,
                *d.header[2:8],
                d.error,
                d.body,
            ),
        )
        db.execute("INSERT INTO writer_marks VALUES ('old-writer', 7, 0, 1700000000.0)")
    return copies


def columns(path: Path, table: str) -> list[str]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return [row[1] for row in db.execute(f"PRAGMA table_info({table})")]


def stored_shards(path: Path, table: str) -> dict[str, int]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return dict(db.execute(f"SELECT run_id, shard FROM {table}"))  # noqa: S608 - the test's own SQL


def recorded(path: Path) -> str | None:
    with contextlib.closing(sqlite3.connect(path)) as db:
        row = db.execute("SELECT value FROM hs_meta WHERE key = 'shards'").fetchone()
        return None if row is None else str(row[0])


# --- a file of the release before -------------------------------------------------------------


async def test_sqlite_a_file_of_the_release_before_opens_migrates_and_every_copy_verifies(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    copies = write_old_file(path)
    async with SQLiteStore(path) as store:
        assert store.shards == DEFAULT_SHARDS
        for run_id, copy in copies.items():
            loaded = await store.load(run_id)
            assert loaded == copy
            assert decode_snapshot(loaded, CODEC, tier="sqlite") == snap(run_id, 3)
            assert [t.version for t in await store.history(run_id)] == [1, 2, 3]
        kept = await store.load_version(RUN_IDS[0], 2)
        assert kept is not None
        assert decode_snapshot(kept, CODEC, tier="sqlite").version == 2
        (letter,) = await store.dead_letters()
        assert decode_dead_letter(letter, CODEC, tier="sqlite").snapshot == snap("dead-1", 4, Status.failed)
        # The old rows are in their shards, and newer writes order over them.
        for shard in (5, shard_of(RUN_IDS[0], DEFAULT_SHARDS)):
            expected = sorted(r for r in RUN_IDS if shard_of(r, DEFAULT_SHARDS) == shard)
            assert [h.run_id for h in await store.scan(shards=[shard])] == expected
        result = await store.save([encode_snapshot(snap(RUN_IDS[0], 4), CODEC, 1)], [trans(RUN_IDS[0], 4)])
        assert (result.written, result.transitions) == (1, 1)
        assert (await store.save([copies[RUN_IDS[1]]], [])).stale == 1
    assert recorded(path) == str(DEFAULT_SHARDS)
    assert columns(path, "runs")[-2:] == columns(path, "snapshot_versions")[-2:] == ["epoch", "shard"]
    assert "epoch" not in columns(path, "dead_letters")  # a dead letter's frame does not cover an epoch
    for table in ("runs", "snapshot_versions"):
        assert all(s == shard_of(r, DEFAULT_SHARDS) for r, s in stored_shards(path, table).items())
    with contextlib.closing(sqlite3.connect(path)) as db:
        (index,) = db.execute("SELECT sql FROM sqlite_master WHERE name = 'runs_shard'").fetchone()
        assert "(shard, run_id)" in index


async def test_sqlite_a_file_of_the_release_before_takes_the_shard_count_it_is_first_opened_with(
    tmp_path: Path,
) -> None:
    path = tmp_path / "old.db"
    write_old_file(path)
    async with SQLiteStore(path, shards=16) as store:
        assert store.shards == 16
        assert [h.run_id for h in await store.scan(shards=[5])] == sorted(r for r in RUN_IDS if shard_of(r, 16) == 5)
    assert recorded(path) == "16"
    assert all(s == shard_of(r, 16) for r, s in stored_shards(path, "runs").items())
    async with SQLiteStore(path) as again:  # None: the recorded count
        assert again.shards == 16


async def test_sqlite_two_stores_opening_one_old_file_at_once_both_open_and_it_migrates_once(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    copies = write_old_file(path)
    first, second = SQLiteStore(path), SQLiteStore(path)
    await asyncio.gather(first.open(), second.open())
    try:
        assert first.shards == second.shards == DEFAULT_SHARDS
        assert await second.load_many(list(copies)) == copies
    finally:
        await first.aclose()
        await second.aclose()
    assert columns(path, "runs").count("shard") == 1


async def test_sqlite_a_row_the_release_before_could_not_read_does_not_stop_the_migration(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    copies = write_old_file(path)
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        body = copies[RUN_IDS[0]].body
        db.execute(
            "INSERT INTO runs VALUES (CAST(x'626164ff' AS TEXT), 'orders', 1, 1, 0, 'running', 1.0, 1, NULL, ?)",
            (body,),
        )
        db.execute("INSERT INTO runs VALUES (NULL, 'orders', 1, 1, 0, 'running', 1.0, 1, NULL, ?)", (body,))
    async with SQLiteStore(path) as store:
        bad: list[BadRow] = []
        found = await store.scan_snapshots(bad_rows=bad)
        assert {s.header.run_id for s in found} == set(copies)
        assert len(bad) == 2


# --- the recorded shard count -----------------------------------------------------------------


async def test_sqlite_a_new_file_records_the_given_count_and_refuses_another(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    async with SQLiteStore(path, shards=7) as store:
        assert store.shards == 7
    assert recorded(path) == "7"
    refused = SQLiteStore(path, shards=8)
    with pytest.raises(ConfigError, match=r"shards=8: .*records 7 shards"):
        await refused.open()
    await refused.aclose()
    with pytest.raises(ConfigError, match="shards"):
        SQLiteStore(path, shards=0)


async def test_sqlite_a_recorded_count_that_is_not_one_is_refused_at_open(tmp_path: Path) -> None:
    path = tmp_path / "odd.db"
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute(SQLITE_META_SCHEMA)
        db.execute("INSERT INTO hs_meta VALUES ('shards', 'many')")
    store = SQLiteStore(path)
    with pytest.raises(PersistenceError, match="shards='many'"):
        await store.open()
    await store.aclose()


async def test_sqlite_a_file_replaced_while_open_is_recreated_with_the_store_count(tmp_path: Path) -> None:
    path = tmp_path / "db" / "replaced.db"
    path.parent.mkdir()
    async with SQLiteStore(path, shards=16):
        pass
    async with SQLiteStore(path) as store:  # takes the recorded 16
        path.unlink()
        result = await store.save([encode_snapshot(snap("s9.~a", 1), CODEC)], [])
        assert (result.written, result.reset) == (1, True)
        assert recorded(path) == "16"
        assert [h.run_id for h in await store.scan(shards=[9])] == ["s9.~a"]


# --- the fence table, shared with the SQLite lease authority ---------------------------------


async def test_sqlite_a_claim_written_to_the_fence_table_fences_the_old_owner(tmp_path: Path) -> None:
    path = tmp_path / "fence.db"
    async with SQLiteStore(path) as store:
        old = Fence("old", {3: 1})
        assert (await store.save([encode_snapshot(snap("s3.~r", 1), CODEC, 1)], [], fence=old)).written == 1
        # What the authority's claim does, in its own transaction on its own connection.
        with contextlib.closing(sqlite3.connect(path)) as db, db:
            db.execute("UPDATE hs_shard_fence SET epoch = epoch + 1, owner = 'new' WHERE shard = 3")
        late = await store.save([encode_snapshot(snap("s3.~r", 2), CODEC, 1)], [trans("s3.~r", 2)], fence=old)
        assert (late.fenced, late.written, late.transitions) == ({3: 2}, 0, 0)
        assert await store.seal(Fence("new", {3: 2})) == {}  # the claim was the seal


async def test_sqlite_the_fence_and_meta_ddl_are_the_tables_the_store_creates(tmp_path: Path) -> None:
    async with SQLiteStore(tmp_path / "store.db"):
        pass
    with contextlib.closing(sqlite3.connect(":memory:")) as fresh:
        fresh.execute(SQLITE_META_SCHEMA)
        fresh.execute(SQLITE_FENCE_SCHEMA)
        want = {t: list(fresh.execute(f"PRAGMA table_info({t})")) for t in ("hs_meta", "hs_shard_fence")}
    with contextlib.closing(sqlite3.connect(tmp_path / "store.db")) as db:
        assert {t: list(db.execute(f"PRAGMA table_info({t})")) for t in want} == want


async def _same(payload: int, ctx: object) -> int:
    return payload


async def test_a_runtime_without_ownership_refuses_a_file_whose_shards_another_process_holds(tmp_path: Path) -> None:
    from hotstate import FlushPolicy, Runtime, Step, Tier, Workflow

    wf = Workflow("same", [Step(fn=_same, name="a")])
    db = tmp_path / "runs.db"

    def tiers() -> list[Tier]:
        return [Tier(SQLiteStore(db), FlushPolicy(interval=0.01))]

    async with Runtime([wf], tiers=tiers()):
        rogue = Runtime([wf], tiers=tiers(), ownership=False, recover=True)
        with pytest.raises(ConfigError, match=r"128 shard\(s\) of .*runs\.db' are held by other processes"):
            await rogue.__aenter__()
    async with Runtime([wf], tiers=tiers(), ownership=False):  # alone once the owner left: allowed
        pass
