"""A store that goes back in time is noticed (``Store.save``'s ``reset``; DESIGN.md "Stores"), on every tier.

Each tier goes back the way it does in production, with real files and a real server:

- memory: its dicts are put back to copies taken earlier;
- sqlite: the online backup API copies the database aside, and later back over
  the open file in place (what ``sqlite3 runs.db ".restore backup.db"`` does:
  same file, same inode, older contents); losing everything is its directory
  deleted and created again (a volume that comes back empty). ``sqlite-old``
  runs the same on the code path of an SQLite without ``RETURNING`` or JSON
  functions;
- valkey: a private server without an append-only file (``--save ""``), told to
  ``SAVE`` an RDB, then SIGKILLed and started again: it loads that RDB, so
  everything written after the ``SAVE`` is gone (a crash under Valkey's default
  RDB persistence, or a restored RDB backup). Losing everything is the same
  restart with the RDB deleted;
- postgres: a private server's files copied while it is stopped, later put
  back after a crash (a base backup restored, or a failover to a replica that
  lacked the newest commits); losing everything is a new empty cluster.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import copy
import shutil
import sqlite3
import uuid
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import anyio
import asyncpg
import pytest
import valkey

from hotstate import PersistenceError, Snapshot, Status, StoreUnavailableError, Transition, TransitionKind
from hotstate.persistence import (
    EmbeddedValkey,
    MemoryStore,
    PickleCodec,
    PostgresStore,
    SaveResult,
    SQLiteStore,
    Store,
    StoredSnapshot,
    ValkeyStore,
    _sqlite as sqlite_module,
)
from hotstate.persistence._postgres_server import EmbeddedPostgres
from hotstate.persistence._records import encode_snapshot
from hotstate.persistence._store import MARK_TTL, advance_mark

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
    from pathlib import Path

T = TypeVar("T")
CODEC = PickleCodec(trust_stores=True)


def stored(run_id: str, version: int, status: Status = Status.running) -> StoredSnapshot:
    snap = Snapshot(run_id, "orders", 1, version, version - 1, status, {"v": version}, None, 1_700_000_000.0)
    return encode_snapshot(snap, CODEC)


def trans(run_id: str, version: int) -> Transition:
    return Transition(run_id, version, TransitionKind.step, version - 1, Status.running, 1_700_000_000.0, None)


async def retried(call: Callable[[], Awaitable[T]]) -> T:
    """``call()``, again while it fails on a connection a server restart broke (what the persister does)."""
    for _ in range(20):
        try:
            return await call()
        except StoreUnavailableError:
            await anyio.sleep(0.05)
    raise AssertionError("the store did not come back")


async def save(store: Store, run_id: str, version: int) -> SaveResult:
    return await retried(lambda: store.save([stored(run_id, version)], [trans(run_id, version)]))


async def probe(store: Store) -> SaveResult:
    return await retried(lambda: store.save([], []))


async def version(store: Store, run_id: str) -> int | None:
    found = await retried(lambda: store.load(run_id))
    return None if found is None else found.header.version


class Backend(Protocol):
    """One tier's stored data, and the ways it goes back in time."""

    def new_store(self) -> Store:
        """A store object (not open) on this data; every one is a writer of its own once open."""
        ...

    async def checkpoint(self) -> None:
        """Take a backup of the data as it is now."""
        ...

    async def roll_back(self) -> None:
        """Bring the data back to the last checkpoint, under the open stores."""
        ...

    async def lose_everything(self) -> None:
        """The data is gone (restarted empty), under the open stores."""
        ...

    def marks(self) -> dict[str, str]:
        """The writers' marks the store holds: writer id -> ``"high:lost"``."""
        ...


class MemoryBackend:
    # Every dict a MemoryStore keeps; stores made here share them, and a roll
    # back puts copies back into them in place.
    STATE = ("_runs", "_history", "_dead", "_versions", "_marks")

    def __init__(self) -> None:
        self.first: MemoryStore | None = None
        self.saved: dict[str, Any] = {}

    def new_store(self) -> Store:
        store = MemoryStore()
        if self.first is None:
            self.first = store
        else:
            for name in self.STATE:
                setattr(store, name, getattr(self.first, name))
        return store

    def _state(self) -> dict[str, dict[Any, Any]]:
        assert self.first is not None
        return {name: getattr(self.first, name) for name in self.STATE}

    async def checkpoint(self) -> None:
        self.saved = copy.deepcopy(self._state())

    async def roll_back(self) -> None:
        for name, live in self._state().items():
            live.clear()
            live.update(copy.deepcopy(self.saved[name]))

    async def lose_everything(self) -> None:
        for live in self._state().values():
            live.clear()

    def marks(self) -> dict[str, str]:
        return {w: f"{h}:{lost}" for w, (h, lost) in self._state()["_marks"].items()}


class SQLiteBackend:
    def __init__(self, tmp_path: Path) -> None:
        self.dir = tmp_path / "data"
        self.dir.mkdir()
        self.path = self.dir / "runs.db"
        self.backup = tmp_path / "backup.db"

    def new_store(self) -> Store:
        return SQLiteStore(self.path)

    @staticmethod
    def _copy(source: Path, target: Path) -> None:
        with contextlib.closing(sqlite3.connect(source)) as src, contextlib.closing(sqlite3.connect(target)) as dst:
            src.backup(dst)

    async def checkpoint(self) -> None:
        self._copy(self.path, self.backup)

    async def roll_back(self) -> None:
        inode = self.path.stat().st_ino
        self._copy(self.backup, self.path)
        assert self.path.stat().st_ino == inode  # in place: the store's file check sees nothing

    async def lose_everything(self) -> None:
        shutil.rmtree(self.dir)
        self.dir.mkdir()

    def marks(self) -> dict[str, str]:
        return sqlite_marks(self.path)


def sqlite_marks(path: Path) -> dict[str, str]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return {w: f"{h}:{lost}" for w, h, lost in db.execute("SELECT writer, high, lost FROM writer_marks")}


class ValkeyBackend:
    PREFIX = "rollback"

    def __init__(self, server: EmbeddedValkey) -> None:
        self.server = server

    def new_store(self) -> Store:
        return ValkeyStore(self.server.url, prefix=self.PREFIX, socket_timeout=2.0)

    def _rdb(self) -> Path:
        assert self.server.data_dir is not None
        return self.server.data_dir / "dump.rdb"

    async def checkpoint(self) -> None:
        with valkey.Valkey.from_url(self.server.url) as client:
            client.save()
        assert self._rdb().exists()

    async def roll_back(self) -> None:
        # SIGKILL: no shutdown save (there are no save points anyway); the start loads dump.rdb.
        self.server.kill()
        self.server.start()

    async def lose_everything(self) -> None:
        self.server.kill()
        self._rdb().unlink(missing_ok=True)
        self.server.start()

    def marks(self) -> dict[str, str]:
        with valkey.Valkey.from_url(self.server.url) as client:
            keys = list(client.scan_iter(match=f"{self.PREFIX}:mark:*"))
            return {k.decode().rsplit(":", 1)[1]: client.get(k).decode() for k in keys}


@contextlib.contextmanager
def valkey_server() -> Iterator[EmbeddedValkey]:
    server = EmbeddedValkey(persistence=False).start()  # no AOF, no save points: only an explicit SAVE persists
    try:
        yield server
    finally:
        server.stop()


class PostgresBackend:
    """A schema of its own on a private server (the module's), backed up by copying the stopped server's files.

    A roll back is a crash (``-m immediate``) and the copy put back (a base
    backup restored, or a failover to a replica that had not received the
    newest commits); losing everything is a new empty cluster on the same port.
    """

    def __init__(self, server: EmbeddedPostgres, tmp_path: Path) -> None:
        self.server = server
        self.schema = f"rollback_{uuid.uuid4().hex[:12]}"
        self.backup = tmp_path / "pg-backup"

    def new_store(self) -> Store:
        return PostgresStore(self.server.url, schema=self.schema, timeout=5.0)

    async def checkpoint(self) -> None:
        self.server.shutdown()
        assert self.server.data_dir is not None
        shutil.rmtree(self.backup, ignore_errors=True)
        shutil.copytree(self.server.data_dir, self.backup, symlinks=True)
        self.server.start()

    async def roll_back(self) -> None:
        self.server.crash()
        self.server.restore(self.backup)
        self.server.start()

    async def lose_everything(self) -> None:
        self.server.crash()
        self.server.wipe()
        self.server.start()

    def marks(self) -> dict[str, str]:
        async def read() -> dict[str, str]:
            conn = await asyncpg.connect(self.server.url)
            try:
                rows = await conn.fetch(f'SELECT writer, high, lost FROM "{self.schema}".hs_writer_marks')  # noqa: S608
            finally:
                await conn.close()
            return {r[0]: f"{r[1]}:{r[2]}" for r in rows}

        with concurrent.futures.ThreadPoolExecutor(1) as pool:  # a sync call inside the test's event loop
            return pool.submit(asyncio.run, read()).result()


@pytest.fixture(scope="module")
def rollback_postgres() -> Iterator[EmbeddedPostgres]:
    """A private server this module crashes, restores and wipes (never the shared ``postgres_url``)."""
    with EmbeddedPostgres() as server:
        yield server


@pytest.fixture(params=["memory", "sqlite", "sqlite-old", "valkey", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Backend]:
    if request.param == "postgres":
        yield PostgresBackend(request.getfixturevalue("rollback_postgres"), tmp_path)
        return
    if request.param == "memory":
        yield MemoryBackend()
    elif request.param.startswith("sqlite"):
        if request.param == "sqlite-old":
            monkeypatch.setattr(sqlite_module, "_returning_available", lambda: False)
            monkeypatch.setattr(sqlite_module, "_json_available", lambda: False)
        yield SQLiteBackend(tmp_path)
    else:
        with valkey_server() as server:
            yield ValkeyBackend(server)


@contextlib.asynccontextmanager
async def opened(backend: Backend) -> AsyncIterator[Store]:
    async with backend.new_store() as store:
        yield store


# --- the rule -------------------------------------------------------------------


def test_the_mark_rule_reports_a_loss_once_and_again_only_when_its_reply_was_lost() -> None:
    # open: no mark yet, floor 0 -> the mark (1, 0); every later save checks against floor >= 1
    assert advance_mark(None, 0, 1) == ((1, 0), False)
    assert advance_mark((1, 0), 1, 2) == ((2, 0), False)
    # a save whose reply was lost (mark 3 stored, floor still 2) is no loss
    assert advance_mark((3, 0), 2, 4) == ((4, 0), False)
    # gone (restarted empty) or lower than the floor (an older backup): lost at this save
    assert advance_mark(None, 4, 5) == ((5, 5), True)
    assert advance_mark((2, 0), 4, 5) == ((5, 5), True)
    # the next save, which saw that report returned (floor 5), does not report it again
    assert advance_mark((5, 5), 5, 6) == ((6, 5), False)
    # had the reply of the reporting save been lost (floor still 4), the next one reports it
    assert advance_mark((5, 5), 4, 6) == ((6, 5), True)
    # overlapping saves that land out of order never lower the mark
    assert advance_mark((9, 0), 7, 8) == ((9, 0), False)


# --- every tier -----------------------------------------------------------------


async def test_a_save_after_the_store_went_back_to_an_older_backup_reports_reset_exactly_once(
    backend: Backend,
) -> None:
    async with opened(backend) as store:
        assert not (await save(store, "a", 1)).reset
        await backend.checkpoint()
        assert not (await save(store, "a", 2)).reset
        await backend.roll_back()
        assert await version(store, "a") == 1  # the store really went back: version 2 is gone
        first = await save(store, "b", 1)
        assert first.reset
        assert first.written == 1  # the batch of the save that reports it is written
        assert not (await save(store, "b", 2)).reset
        assert not (await save(store, "a", 2)).reset  # the caller writes what it holds again
        assert await version(store, "a") == 2


async def test_every_writer_sharing_the_store_notices_an_empty_restart_on_its_own_next_save(
    backend: Backend,
) -> None:
    async with opened(backend) as one, opened(backend) as two:
        assert not (await save(one, "one", 1)).reset
        assert not (await save(two, "two", 1)).reset
        await backend.lose_everything()
        assert (await save(one, "one", 2)).reset
        assert not (await save(one, "one", 3)).reset
        assert (await save(two, "two", 2)).reset  # the first writer's save re-based only its own mark
        assert not (await save(two, "two", 3)).reset


async def test_a_loss_before_a_writers_first_save_is_still_a_reset(backend: Backend) -> None:
    """The mark is written at open: what a writer read before its first save (recovery) is covered too."""
    async with opened(backend) as earlier:
        await save(earlier, "a", 1)
    async with opened(backend) as store:
        assert await version(store, "a") == 1
        await backend.lose_everything()
        assert (await save(store, "b", 1)).reset


async def test_a_restore_that_loses_nothing_and_a_new_writer_are_not_resets(backend: Backend) -> None:
    async with opened(backend) as store:
        await save(store, "a", 1)
        await backend.checkpoint()
        await backend.roll_back()  # a backup as new as the store: nothing acknowledged is gone
        assert not (await save(store, "a", 2)).reset
    async with opened(backend) as store:  # the runtime restarted: a new writer, which claims nothing older
        assert not (await save(store, "a", 3)).reset
        assert await version(store, "a") == 3


async def test_a_loss_reported_by_a_save_whose_reply_was_lost_is_reported_by_the_next_save(
    backend: Backend,
) -> None:
    async with opened(backend) as store:
        await save(store, "a", 1)
        await backend.checkpoint()
        await save(store, "a", 2)
        await backend.roll_back()
        mark = store._mark  # type: ignore[attr-defined]
        floor = mark.floor
        assert (await save(store, "a", 2)).reset
        mark.floor = floor  # as if the reply never came: the writer does not know the save was applied
        assert (await save(store, "a", 3)).reset
        assert not (await save(store, "a", 4)).reset


async def test_an_empty_save_is_a_probe_that_finds_the_loss(backend: Backend) -> None:
    async with opened(backend) as store:
        await save(store, "a", 1)
        await backend.lose_everything()
        result = await probe(store)
        assert result.reset
        assert (result.written, result.stale, result.transitions) == (0, 0, 0)
        assert not (await probe(store)).reset


async def test_each_open_store_has_one_mark_and_a_closed_one_leaves_none(backend: Backend) -> None:
    async with opened(backend) as one:
        writer = one._mark.writer  # type: ignore[attr-defined]
        assert backend.marks() == {writer: "1:0"}  # written at open
        await save(one, "a", 1)
        async with opened(backend) as two:
            await save(two, "a", 2)
            assert len(backend.marks()) == 2
            assert backend.marks()[writer] == "2:0"
        assert list(backend.marks()) == [writer]
    assert backend.marks() == {}


# --- one tier -------------------------------------------------------------------


def move_over(copy: Path, path: Path) -> None:
    """Move a database file over ``path``, whose WAL and shared-memory files go (else they would
    overlay the moved file with the old one's newest pages: SQLite's "mispaired journal")."""
    for suffix in ("-wal", "-shm"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)
    copy.replace(path)


async def test_an_sqlite_file_replaced_by_an_older_copy_is_one_reset_and_by_a_current_copy_none(
    tmp_path: Path,
) -> None:
    """A new inode: the store opens the path again (as before); the mark alone decides whether writes were lost."""
    path, aside = tmp_path / "runs.db", tmp_path / "copy.db"
    async with SQLiteStore(path) as store:
        await save(store, "a", 1)
        SQLiteBackend._copy(path, aside)
        await save(store, "a", 2)
        move_over(aside, path)
        assert (await save(store, "b", 1)).reset  # once: the file check no longer reports one of its own
        assert not (await save(store, "b", 2)).reset
        assert await version(store, "a") == 1
        SQLiteBackend._copy(path, aside)
        move_over(aside, path)  # a current copy: nothing acknowledged is lost
        assert not (await save(store, "b", 3)).reset
        assert await version(store, "b") == 3


async def test_sqlite_marks_older_than_the_ttl_are_removed_when_a_store_opens(tmp_path: Path) -> None:
    path = tmp_path / "runs.db"
    async with SQLiteStore(path):
        pass
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute("INSERT INTO writer_marks VALUES ('crashed-long-ago', 7, 0, 1.0)")
        db.execute("INSERT INTO writer_marks VALUES ('crashed-lately', 7, 0, strftime('%s', 'now'))")
    async with SQLiteStore(path) as store:
        assert set(sqlite_marks(path)) == {"crashed-lately", store._mark.writer}


async def test_a_valkey_mark_expires_after_the_ttl_refreshed_by_every_save(tmp_path: Path) -> None:
    with valkey_server() as server, valkey.Valkey.from_url(server.url) as client:
        async with ValkeyStore(server.url, prefix="ttl") as store:
            key = f"ttl:mark:{store._mark.writer}"
            assert MARK_TTL - 5 < client.ttl(key) <= MARK_TTL
            client.expire(key, 60)
            await save(store, "a", 1)
            assert MARK_TTL - 5 < client.ttl(key) <= MARK_TTL
        assert client.exists(key) == 0


async def test_a_read_only_valkey_store_writes_no_mark(tmp_path: Path) -> None:
    with valkey_server() as server, valkey.Valkey.from_url(server.url) as client:
        async with ValkeyStore(server.url, prefix="ro") as writer:
            await save(writer, "a", 1)
        async with ValkeyStore(server.url, prefix="ro", read_only=True) as reader:
            assert await version(reader, "a") == 1
            with pytest.raises(PersistenceError, match="read-only"):
                await reader.save([], [])
        assert list(client.scan_iter(match="ro:mark:*")) == []
