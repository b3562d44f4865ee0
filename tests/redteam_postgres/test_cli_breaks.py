"""Red-team tests for ``hotstate runs --postgres URL --schema S ...`` (hotstate/_cli/_runs.py) on a real PostgreSQL 18.

Two of these broke the first version (a mistyped schema made by ``retry``,
a traceback on a table with one more column) and were fixed; the third held:
inspecting a schema that holds nothing creates nothing. tests/integration/test_postgres_store.py checks that
inspecting a filled schema writes nothing.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import asyncpg

from hotstate._cli import main
from hotstate.persistence import PostgresStore, RunHeader, StoredSnapshot
from hotstate.persistence._authority import MemberInfo

if TYPE_CHECKING:
    import pytest


def schema_state(url: str, schema: str) -> tuple[int, int]:
    """(1 if the schema exists else 0, how many tables it holds)."""

    async def read() -> tuple[int, int]:
        conn = await asyncpg.connect(url)
        try:
            found = await conn.fetchval("SELECT count(*) FROM pg_namespace WHERE nspname = $1", schema)
            tables = await conn.fetchval("SELECT count(*) FROM pg_tables WHERE schemaname = $1", schema)
        finally:
            await conn.close()
        return int(found), int(tables)

    return asyncio.run(read())


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    status = main(["runs", *argv])
    _, err = capsys.readouterr()
    return status, err


def test_runs_retry_on_a_mistyped_schema_creates_nothing(
    postgres_url: str, postgres_schema: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Guarantee (``_check_sqlite``'s docstring, the CLI's rule for the SQLite tier): "a mistyped path must
    not leave an empty database behind, nor add tables to someone else's". Inspecting a PostgreSQL
    schema keeps to this (a read-only store). ``retry`` does not.

    ``hotstate runs --postgres URL --schema <typo> retry RUN`` opens a writable ``PostgresStore``
    against a schema that does not exist. ``open`` runs ``CREATE SCHEMA``, makes 7 tables and one fence
    row per shard, records ``DEFAULT_SHARDS`` in ``hs_meta`` and writes a writer's mark. Only then
    does the command report "no dead letter in postgres" (exit 1). The schema, with a shard count of
    its own choosing, stays behind for the next runtime that points at it. Pointed at a schema an
    application already uses, it adds ``hs_*`` tables there.

    Evidence: before the command, the schema does not exist. After it exits with status 1, the
    schema exists and holds 7 tables.

    Fix: check, as ``_check_sqlite`` does, that the schema holds ``hs_runs`` (``to_regclass``) before
    opening a writable store, and refuse otherwise.
    """
    assert schema_state(postgres_url, postgres_schema) == (0, 0)
    status, err = cli(capsys, "--postgres", postgres_url, "--schema", postgres_schema, "retry", "order-7")
    assert status == 1
    assert "order-7" in err or "hotstate tables" in err
    assert schema_state(postgres_url, postgres_schema) == (0, 0), "retry made the schema and its tables"


def test_runs_shards_on_a_members_table_with_one_more_column_exits_with_a_status(
    postgres_url: str, postgres_schema: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Guarantee (the CLI's docstring): "Exit status: 0 on success, 1 when a run is not found or a store
    fails, 2 on usage errors". Never a traceback.

    A schema whose ``hs_members`` has one more column (another hotstate version's tables, or a column an
    operator added). ``read_postgres_shard_map`` builds ``MemberInfo(*row)`` from ``SELECT *``. The
    ``TypeError`` is neither a ``HotstateError`` nor an ``OSError``, so ``_execute`` lets it out of
    ``main``. ``hotstate runs shards`` (and ``show``) crash with a traceback.
    test_authority_breaks.py shows the same ``SELECT *`` taking down a runtime's renewals.

    Fix: select named columns. A row that does not decode is a ``PersistenceError`` (exit 1).
    """

    async def fill() -> None:
        async with PostgresStore(postgres_url, schema=postgres_schema) as store:
            await store.save([StoredSnapshot(RunHeader("a", "orders", 1, 1, 0, "done", 1.0, 1, 0), None, b"b")], [])
            authority = store.default_authority()
            await authority.open()
            try:
                await authority.join(MemberInfo("m1", "some-host", 4242, "", "web-1", 0.0, 0.0))
            finally:
                await authority.aclose()
        conn = await asyncpg.connect(postgres_url)
        try:
            await conn.execute(f'ALTER TABLE "{postgres_schema}".hs_members ADD COLUMN zone text')
        finally:
            await conn.close()

    asyncio.run(fill())
    status, _ = cli(capsys, "--postgres", postgres_url, "--schema", postgres_schema, "shards")
    assert status in (0, 1)


def test_held_inspecting_a_schema_that_does_not_exist_creates_nothing(
    postgres_url: str, postgres_schema: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``list``, ``show``, ``history``, ``dead-letters`` and ``shards`` against a missing schema each
    exit 1 with "holds no hotstate tables", and leave no schema behind. HELD.
    """
    pg = ("--postgres", postgres_url, "--schema", postgres_schema)
    for action in (["list"], ["show", "x"], ["history", "x"], ["dead-letters"], ["shards"]):
        status, err = cli(capsys, *pg, *action)
        assert status == 1, action
        assert "holds no hotstate tables" in err, action
    assert schema_state(postgres_url, postgres_schema) == (0, 0)
