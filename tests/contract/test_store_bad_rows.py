"""One malformed row never hides the others (#10): ``bad_rows`` on ``scan_snapshots`` and ``load_many``.

A row goes bad when something other than hotstate writes the store. Each case
plants one the way that backend allows: raw SQL on the SQLite file, raw
commands on the Valkey server, and for ``MemoryStore`` (which keeps whatever
``save`` was given, like SQLite keeps what a column was given) a ``save`` of a
record with fields of the wrong type.

Without a ``bad_rows`` list the reads raise ``CodecError`` as before; with one,
the row is reported there once and every other row is returned, and paging
works as without bad rows: a page shorter than ``limit`` is the last one, and
the last snapshot's run id is the cursor.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import asyncpg
import pytest
import valkey

from hotstate import CodecError, Snapshot, Status
from hotstate.persistence import (
    BadRow,
    MemoryStore,
    PickleCodec,
    PostgresStore,
    SQLiteStore,
    Store,
    StoredSnapshot,
    ValkeyStore,
    shard_of,
)
from hotstate.persistence._records import encode_snapshot

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable
    from pathlib import Path

CODEC = PickleCodec(key=b"bad-rows-key")
UNFINISHED = ("pending", "running", "waiting")  # what recovery scans for


def stored(run_id: str, version: int = 1, status: Status = Status.running) -> StoredSnapshot:
    return encode_snapshot(
        Snapshot(
            run_id=run_id,
            workflow="orders",
            workflow_version=1,
            version=version,
            step=0,
            status=status,
            payload={"run": run_id},
            error=None,
            updated_at=1_700_000_000.0,
            attempt=1,
        ),
        CODEC,
    )


# --- planting ----------------------------------------------------------------------


def sqlite_exec(store: Store, sql: str, *params: object) -> None:
    assert isinstance(store, SQLiteStore)
    conn = sqlite3.connect(store.path)
    try:
        with conn:
            conn.execute(sql, params)
    finally:
        conn.close()


def valkey_client(store: Store) -> valkey.Valkey:
    assert isinstance(store, ValkeyStore)
    return valkey.Valkey.from_url(store.url)


def valkey_hset(store: Store, run_id: str, field: str, value: bytes | str) -> None:
    with valkey_client(store) as raw:
        raw.hset(valkey_store(store).run_key(run_id), field, value)


def valkey_prefix(store: Store) -> str:
    assert isinstance(store, ValkeyStore)
    return store.prefix


def valkey_store(store: Store) -> ValkeyStore:
    assert isinstance(store, ValkeyStore)
    return store


@dataclass(frozen=True)
class Plant:
    """One way to make run ``run_id`` malformed in one tier.

    Attributes:
        tier: the store it applies to.
        name: what is wrong.
        spoil: makes the stored (well-formed) row of the run malformed, in
            place; for ``MemoryStore``, saves the malformed record instead.
        reason: what ``BadRow.reason`` must say (it names the field and value).
        reported_as: the ``BadRow.run_id`` when it is not the run id itself
            (the stored id is not text).
        loadable: ``load_many`` can ask for the row by its run id.
        header: the header is what is malformed, so ``scan`` (which reads
            headers only) fails too; else only the error or the body is.
    """

    tier: str
    name: str
    spoil: Callable[[Store, str], Any]
    reason: str
    reported_as: Callable[[str], str] | None = None
    loadable: bool = True
    header: bool = True


async def memory_save(store: Store, key: str, **bad: Any) -> None:
    """Save run ``key`` with header fields (or the error) of the wrong type, as a caller could."""
    good = stored(key)
    error = bad.pop("error", None)
    header = good.header._replace(**bad)
    result = await store.save([StoredSnapshot(header, error, good.body)], [])
    assert result.written == 1


def memory(name: str, reason: str, **bad: Any) -> Plant:
    rid = bad.get("run_id")
    return Plant(
        "memory",
        name,
        lambda store, run_id: memory_save(store, run_id, **bad),
        reason,
        reported_as=None if rid is None else (lambda _run_id: repr(rid)),
        loadable=rid is None,
        header="error" not in bad,
    )


def sqlite(name: str, assignment: str, reason: str, **kwargs: Any) -> Plant:
    return Plant(
        "sqlite",
        name,
        lambda store, run_id: sqlite_exec(store, f"UPDATE runs SET {assignment} WHERE run_id = ?", run_id),  # noqa: S608 - the test's own SQL
        reason,
        **kwargs,
    )


def not_utf8(run_id: str) -> bytes:
    return run_id.encode() + b"\xff"


def valkey_field(name: str, field: str, value: bytes | str, reason: str) -> Plant:
    return Plant(
        "valkey",
        name,
        lambda store, run_id: valkey_hset(store, run_id, field, value),
        reason,
        header=field != "error",
    )


def valkey_wrong_type(store: Store, run_id: str) -> None:
    with valkey_client(store) as raw:
        key = valkey_store(store).run_key(run_id)
        raw.delete(key)
        raw.rpush(key, "a list, not a hash")


def valkey_missing_body(store: Store, run_id: str) -> None:
    with valkey_client(store) as raw:
        raw.hdel(valkey_store(store).run_key(run_id), "body")


def valkey_foreign_member(store: Store, run_id: str) -> None:
    """An index member that is not UTF-8, just after ``run_id`` (the run itself stays good)."""
    with valkey_client(store) as raw:
        member = not_utf8(run_id)
        vs = valkey_store(store)
        shard = shard_of(run_id, vs.shards)  # the index of the run's shard (layout 2)
        for index in (("runs",), ("status", "running")):
            raw.zadd(vs.shard_key(shard, *index), {member: 0})


async def postgres_exec(store: Store, assignment: str, run_id: str) -> None:
    assert isinstance(store, PostgresStore)
    conn = await asyncpg.connect(store.url)
    try:
        await conn.execute(f"UPDATE {store.table('hs_runs')} SET {assignment} WHERE run_id = $1", run_id)  # noqa: S608
    finally:
        await conn.close()


def postgres(name: str, assignment: str, **kwargs: Any) -> Plant:
    """PostgreSQL's columns are typed and its text is UTF-8: what can be wrong is text holding U+0001
    that is not one of the store's escapes (U+0000 is stored escaped)."""
    return Plant(
        "postgres",
        name,
        lambda store, run_id: postgres_exec(store, assignment, run_id),
        "holds U+0001 that is not one of the store's escapes",
        **kwargs,
    )


PLANTS = [
    memory("version-text", "version='2'", version="2"),
    memory("workflow-not-text", "workflow=7", workflow=7),
    memory("updated-at-text", "updated_at='yesterday'", updated_at="yesterday"),
    memory("error-not-text", "error=12", error=12),
    memory("run-id-not-text", "run_id=2", run_id=2),
    sqlite("version-text", "version = 'x'", "version='x'"),
    sqlite("version-out-of-range", "version = 99999999999999999999", "version=1e+20"),  # stored as a REAL
    sqlite("version-with-nul", "version = '2' || char(0)", "version='2\\x00'"),
    sqlite("version-real", "version = 5.5", "version=5.5"),
    sqlite("workflow-not-utf8", "workflow = CAST(x'ff' AS TEXT)", "workflow=<text that is not UTF-8"),
    sqlite("error-not-text", "error = x'00ff'", "error=b'\\x00\\xff'", header=False),
    sqlite("body-not-blob", "body = 'text'", "body is a str", header=False),
    sqlite(
        "run-id-not-utf8",
        "run_id = CAST(run_id || x'ff' AS TEXT)",
        "run_id=<text that is not UTF-8",
        reported_as=lambda run_id: f"<text that is not UTF-8: {not_utf8(run_id)!r}>",
        loadable=False,
    ),
    valkey_field("version-text", "version", "x", "version=b'x' (not int)"),
    valkey_field("version-out-of-range", "version", "9" * 5_000, "version=b'9999"),
    valkey_field("version-with-nul", "version", "2\x00", "version=b'2\\x00' (not int)"),
    valkey_field("version-exponent", "version", "1e3", "version=b'1e3' (not int)"),  # a number to Lua, not an int
    valkey_field("workflow-not-utf8", "workflow", b"\xff", "workflow=b'\\xff' (not UTF-8)"),
    valkey_field("error-not-utf8", "error", b"\xfe", "error is not UTF-8"),
    valkey_field("run-id-of-another-run", "run_id", "someone-else", "run_id field is 'someone-else'"),
    Plant("valkey", "key-of-another-type", valkey_wrong_type, "not a hash"),
    Plant("valkey", "hash-without-body", valkey_missing_body, "lacks body", header=False),
    postgres("workflow-bad-escape", "workflow = E'or\\x01ders'"),
    postgres("error-bad-escape", "error = E'boom \\x01'", header=False),
    postgres(
        "run-id-bad-escape",
        "run_id = run_id || E'\\x01'",
        reported_as=lambda run_id: run_id + "\x01",
        loadable=False,
    ),
]


@pytest.fixture
async def opened(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """The store for the test's ``plant`` (parametrized): a fresh file, prefix or memory."""
    tier = request.node.callspec.params["plant"].tier
    store: Store
    if tier == "memory":
        store = MemoryStore()
    elif tier == "sqlite":
        store = SQLiteStore(tmp_path / "bad-rows.db")
    elif tier == "postgres":
        store = PostgresStore(
            request.getfixturevalue("postgres_url"), schema=request.getfixturevalue("postgres_schema")
        )
    else:
        store = ValkeyStore(request.getfixturevalue("valkey_url"), prefix=request.getfixturevalue("valkey_prefix"))
    async with store:
        yield store


async def seed(store: Store, plant: Plant, run_ids: list[str], bad: set[str]) -> None:
    """Store every run of ``run_ids`` well formed but those in ``bad``, spoiled by ``plant``."""
    memory_store = isinstance(store, MemoryStore)
    await store.save([stored(r) for r in run_ids if not (memory_store and r in bad)], [])
    for run_id in sorted(bad):
        result = plant.spoil(store, run_id)
        if result is not None:
            await result


def reported(plant: Plant, run_id: str) -> str:
    return run_id if plant.reported_as is None else plant.reported_as(run_id)


CASES = [pytest.param(p, id=f"{p.tier}-{p.name}") for p in PLANTS]
LOADABLE = [pytest.param(p, id=f"{p.tier}-{p.name}") for p in PLANTS if p.loadable]


# --- one bad row --------------------------------------------------------------------------


@pytest.mark.parametrize("plant", CASES)
async def test_scan_snapshots_reports_a_malformed_row_and_returns_every_other(opened: Store, plant: Plant) -> None:
    ids = [f"r{i}" for i in range(5)]
    await seed(opened, plant, ids, {"r2"})

    with pytest.raises(CodecError):
        await opened.scan_snapshots(status=UNFINISHED)
    if plant.header:
        with pytest.raises(CodecError):
            await opened.scan()
    else:  # listing reads headers only
        assert len(await opened.scan()) == 5

    bad: list[BadRow] = []
    page = await opened.scan_snapshots(status=UNFINISHED, bad_rows=bad)
    assert [s.header.run_id for s in page] == ["r0", "r1", "r3", "r4"]
    assert page[0] == stored("r0")
    assert [b.run_id for b in bad] == [reported(plant, "r2")]
    assert plant.reason in bad[0].reason
    assert opened.tier not in bad[0].reason  # the reason is the detail; the caller knows the tier


@pytest.mark.parametrize("plant", LOADABLE)
async def test_load_many_reports_a_malformed_row_and_returns_every_other(opened: Store, plant: Plant) -> None:
    ids = [f"r{i}" for i in range(5)]
    await seed(opened, plant, ids, {"r2"})

    with pytest.raises(CodecError):
        await opened.load_many(ids)
    with pytest.raises(CodecError):
        await opened.load("r2")

    bad: list[BadRow] = []
    found = await opened.load_many([*ids, "missing", "r2"], bad_rows=bad)
    assert sorted(found) == ["r0", "r1", "r3", "r4"]
    assert found["r4"] == stored("r4")
    assert [b.run_id for b in bad] == ["r2"]  # asked twice, read once
    assert plant.reason in bad[0].reason
    assert await opened.load("r3") == stored("r3")


# --- paging -------------------------------------------------------------------------------

PAGING = [
    pytest.param(p, id=f"{p.tier}-{p.name}")
    for p in PLANTS
    if p.name in ("version-text", "run-id-not-utf8", "key-of-another-type", "hash-without-body")
]


@pytest.mark.parametrize("plant", PAGING)
@pytest.mark.parametrize("limit", [1, 3, 4, 100])
async def test_paging_like_recovery_reads_every_good_row_once_and_reports_every_bad_row_once(
    opened: Store, plant: Plant, limit: int
) -> None:
    """Recovery's loop, unchanged: stop at a page shorter than ``limit``, else continue after its last run."""
    ids = [f"p{i:02d}" for i in range(30)]
    # The first and last rows, a stretch longer than a page, and one alone.
    bad_ids = {"p00", "p05", "p06", "p07", "p08", "p09", "p17", "p29"}
    await seed(opened, plant, ids, bad_ids)

    bad: list[BadRow] = []
    seen: list[str] = []
    pages: list[int] = []
    after: str | None = None
    while True:
        page = await opened.scan_snapshots(status=UNFINISHED, after=after, limit=limit, bad_rows=bad)
        pages.append(len(page))
        seen.extend(s.header.run_id for s in page)
        if len(page) < limit:
            break
        after = page[-1].header.run_id

    assert seen == [r for r in ids if r not in bad_ids]
    assert sorted(b.run_id for b in bad) == sorted(reported(plant, r) for r in bad_ids)
    assert all(n == limit for n in pages[:-1])  # every page but the last is full


@pytest.mark.parametrize("limit", [1, 2, 100])
async def test_valkey_paging_reads_past_index_members_that_are_not_utf8_and_runs_deleted_since_listed(
    valkey_url: str, valkey_prefix: str, limit: int
) -> None:
    store = ValkeyStore(valkey_url, prefix=valkey_prefix)
    async with store:
        ids = [f"p{i:02d}" for i in range(12)]
        await store.save([stored(r) for r in ids], [])
        for run_id in ("p03", "p04", "p05", "p11"):
            valkey_foreign_member(store, run_id)
        with valkey_client(store) as raw:  # in the index, but the hash is gone: not stored
            raw.delete(*(store.run_key(r) for r in ("p06", "p07", "p08")))

        bad: list[BadRow] = []
        seen: list[str] = []
        after: str | None = None
        while True:
            page = await store.scan_snapshots(status=UNFINISHED, after=after, limit=limit, bad_rows=bad)
            seen.extend(s.header.run_id for s in page)
            if len(page) < limit:
                break
            after = page[-1].header.run_id

    assert seen == [r for r in ids if r not in ("p06", "p07", "p08")]
    assert [b.run_id for b in bad] == [repr(not_utf8(r)) for r in ("p03", "p04", "p05", "p11")]
    assert all("not UTF-8" in b.reason for b in bad)


async def test_sqlite_text_that_is_not_utf8_is_a_malformed_row_never_an_unreachable_store(tmp_path: Path) -> None:
    """sqlite3 fails a whole query on one such value, with an OperationalError (which reads as transient)."""
    async with SQLiteStore(tmp_path / "utf8.db") as store:
        await store.save([stored("a"), stored("b"), stored("c")], [])
        sqlite_exec(store, "UPDATE runs SET status = CAST(x'72756e6e696e67ff' AS TEXT) WHERE run_id = 'b'")
        with pytest.raises(CodecError, match="not UTF-8"):
            await store.scan()
        with pytest.raises(CodecError, match="not UTF-8"):
            await store.load("b")
        bad: list[BadRow] = []
        assert [s.header.run_id for s in await store.scan_snapshots(bad_rows=bad)] == ["a", "c"]
        assert [b.run_id for b in bad] == ["b"]


# --- a stored version that is not an integer, on the write side ------------------------------

REPLACED = [
    pytest.param(p, id=f"{p.tier}-{p.name}")
    for p in PLANTS
    if p.name in ("version-text", "version-out-of-range", "version-with-nul", "version-real", "version-exponent")
]


@pytest.mark.parametrize("plant", REPLACED)
async def test_a_stored_version_that_is_not_an_integer_orders_below_every_version_so_the_next_save_replaces_it(
    opened: Store, plant: Plant
) -> None:
    """Reads skip such a row (it has no version they can use), and so does the version guard: never a conflict."""
    await seed(opened, plant, ["ok", "r"], {"r"})
    result = await opened.save([stored("r", 1), stored("ok", 2), stored("new", 1)], [])
    assert (result.written, result.stale, result.conflicts) == (3, 0, {})
    bad: list[BadRow] = []
    found = await opened.load_many(["r", "ok", "new"], bad_rows=bad)
    assert (found["r"], bad) == (stored("r", 1), [])
    assert (await opened.save([stored("r", 1)], [])).conflicts == {}  # an ordinary row again: equal is stale
