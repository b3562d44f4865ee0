"""Red-team tests for ``PostgresAuthority`` and ``read_postgres_shard_map`` (#13) on a real PostgreSQL 18.

Each test is an attack on a guarantee: the authority's own docstrings, the
typed errors of every backend call (``StoreUnavailableError`` when a retry
may help, never a hang), or the ownership contract of DESIGN.md "Several
processes" (a process stops owning a shard at its lease deadline). Most broke
the first PostgreSQL authority (a column added to a table, openers at once,
lost tables, locked tables) and were fixed; the others held.

A "hang" is measured without cancelling the call. The call runs as a task,
the test waits a bounded time, then releases the lock it held. That lets the
call finish by itself, so nothing is left half closed.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import anyio
import asyncpg

from hotstate import Ownership, Runtime, Step, StepContext, StoreUnavailableError, Workflow
from hotstate.persistence import FlushPolicy, PostgresAuthority, PostgresStore, Tier
from hotstate.persistence._authority import MemberInfo, host_identity
from hotstate.persistence._postgres_authority import read_postgres_shard_map

SHARDS = 4


async def sql(url: str, statement: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


async def made(url: str, schema: str) -> None:
    """The schema with the authority's tables (what any earlier process leaves)."""
    authority = PostgresAuthority(url, schema=schema, shards=SHARDS)
    await authority.open()
    await authority.aclose()


async def finishes_while_locked(url: str, tables: list[str], call: Any, wait: float) -> tuple[bool, object]:
    """Run ``call()`` while another session holds ``tables`` ACCESS EXCLUSIVE. Did it end within ``wait`` s?

    The lock is released after ``wait`` either way, and the call is awaited to its end (never cancelled).
    """
    conn = await asyncpg.connect(url)
    try:
        tx = conn.transaction()
        await tx.start()
        for table in tables:
            await conn.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
        task = asyncio.ensure_future(call())
        done, _ = await asyncio.wait({task}, timeout=wait)
        await tx.rollback()
    finally:
        await conn.close()
    try:
        outcome: object = await asyncio.wait_for(task, 10)
    except Exception as exc:  # noqa: BLE001 - the outcome is what the test looks at
        outcome = exc
    return bool(done), outcome


# ------------------------------------------------------------------ opening


async def test_authorities_opening_one_existing_schema_at_once_all_open(
    postgres_url: str, postgres_schema: str
) -> None:
    """Guarantee: processes that start at the same time on one schema all open. The integration test
    ``test_processes_creating_one_schema_at_once_all_open`` checks 4 stores and ONE authority. Every
    ``Runtime`` on PostgreSQL opens an authority by default, so N replicas of a deployment rolled out
    together open N authorities at once.

    ``PostgresAuthority.open`` runs ``create_schema`` every time, even when the schema exists.
    ``CREATE INDEX IF NOT EXISTS hs_shard_lease_owner`` takes a SHARE lock on ``hs_shard_lease``
    before it sees that the index exists. Then ``_record_shards`` takes ``LOCK hs_meta IN SHARE ROW
    EXCLUSIVE`` and inserts into ``hs_shard_lease`` (ROW EXCLUSIVE). Two openers each hold SHARE on
    ``hs_shard_lease``; one waits for ``hs_meta``, the other for ROW EXCLUSIVE on ``hs_shard_lease``.
    That is a deadlock.

    Evidence: 28 of 36 opens failed (6 at a time, schema already made) with ``StoreUnavailableError:
    open: DeadlockDetectedError``. ``create_schema`` retries only the catalog races
    (``_CREATE_RACES``), not deadlocks, and ``Runtime.__aenter__`` does not retry either. 4 runtimes
    started together: 2 of them failed to start, in each of 3 rounds. Every deadlock also costs
    ``deadlock_timeout`` (1 s).

    Fix: take one lock first, before any DDL: ``pg_advisory_xact_lock(hashtext(schema))`` (a
    transaction lock is safe behind a pooler), or ``LOCK hs_meta`` first once it exists. Or skip the
    DDL when ``to_regclass`` finds the tables, and retry ``TransactionRollbackError`` in
    ``create_schema``.
    """
    await made(postgres_url, postgres_schema)
    for _ in range(2):
        authorities = [PostgresAuthority(postgres_url, schema=postgres_schema) for _ in range(8)]
        try:
            outcomes = await asyncio.gather(*(a.open() for a in authorities), return_exceptions=True)
        finally:
            for a in authorities:
                await a.aclose()
        failed = [repr(o)[:120] for o in outcomes if o is not None]
        assert not failed, failed


async def test_the_authority_open_is_bounded_by_its_timeout_when_a_table_is_locked(
    postgres_url: str, postgres_schema: str
) -> None:
    """Guarantee: ``timeout`` is "seconds a statement may take", and a backend that cannot answer is
    ``StoreUnavailableError``, never a hang. ``PostgresStore.open`` keeps to this: its pool has
    ``command_timeout``, and it raises within 0.3 s in the same setup.

    ``PostgresAuthority.open`` makes its tables on a connection from ``asyncpg.connect(url,
    timeout=...)``, whose ``timeout`` bounds only the connect. Another session holds ``hs_meta`` (a
    migration, a ``VACUUM FULL``, a console left inside a transaction), and the open waits for as
    long as that lasts. So does ``Runtime.__aenter__``, since every PostgreSQL runtime opens one.

    Evidence: with ``timeout=0.3`` the open is still waiting after 2 s. It ends only when the lock
    is released.

    Fix: ``asyncpg.connect(..., command_timeout=self._timeout)``, or ``SET LOCAL lock_timeout`` /
    ``statement_timeout`` in ``create_schema``, raised as ``StoreUnavailableError``.
    """
    await made(postgres_url, postgres_schema)
    authority = PostgresAuthority(postgres_url, schema=postgres_schema, timeout=0.3)
    try:
        ended, outcome = await finishes_while_locked(
            postgres_url, [f'"{postgres_schema}".hs_meta'], authority.open, wait=2.0
        )
    finally:
        await authority.aclose()
    assert ended, "PostgresAuthority.open was still waiting 2 s after its 0.3 s timeout"
    assert isinstance(outcome, StoreUnavailableError)


async def test_reading_the_shard_map_is_bounded_when_a_table_is_locked(postgres_url: str, postgres_schema: str) -> None:
    """Guarantee (``read_postgres_shard_map``'s docstring): "StoreUnavailableError: the server cannot be
    reached". For the tools (``hotstate runs shards``, and ``show``, which names the holder of the
    run's shard) this means an answer or a typed error, never a hang.

    It connects with ``timeout=connect_timeout`` only, which bounds the connect. It then reads
    ``hs_shard_lease`` with no statement timeout. The CLI's read-only store (``timeout=10``) is bounded
    in the same setup, so ``hotstate runs --postgres ... shards`` hangs only in this call.

    Evidence: with ``connect_timeout=0.3`` and ``hs_shard_lease`` locked by another session, the call
    is still waiting after 2 s.

    Fix: ``asyncpg.connect(url, timeout=connect_timeout, command_timeout=connect_timeout)`` (or a
    ``statement_timeout`` of its own), and the ``TimeoutError`` raised as ``StoreUnavailableError``.
    """
    await made(postgres_url, postgres_schema)

    async def read() -> object:
        return await read_postgres_shard_map(postgres_url, postgres_schema, connect_timeout=0.3)

    ended, outcome = await finishes_while_locked(postgres_url, [f'"{postgres_schema}".hs_shard_lease'], read, wait=2.0)
    assert ended, "read_postgres_shard_map was still waiting 2 s after its 0.3 s timeout"
    assert isinstance(outcome, StoreUnavailableError)


# ------------------------------------------------------------------ tables that change under the authority


async def test_the_authority_makes_its_tables_again_after_the_database_lost_them(
    postgres_url: str, postgres_schema: str
) -> None:
    """Guarantee: a database that lost its tables (restored or made again empty, a dropped schema) is a
    failure a retry fixes. ``PostgresStore`` does this by design (``_errors``: "the next call makes them
    again", and the save reports reset). Its authority, on the same schema, does not.

    Evidence: after ``DROP SCHEMA ... CASCADE``, ``claim`` raises ``PersistenceError:
    UndefinedTableError: relation "hs_shard_lease" does not exist`` on every call. The runtime-level
    effect, seen with a private server crashed, wiped and started again under a running ``Runtime``:
    the store came back (it logged "it lost writes ... writing every run held in memory again"). But
    every renewal and every placement round failed from then on. The runtime lost all its shards, and
    every later ``spawn`` failed with "post to the inbox: UndefinedTableError". This went on until the
    process was restarted.

    Fix: as the store does, treat ``UndefinedTableError``/``InvalidSchemaNameError`` as
    ``StoreUnavailableError`` and make the tables again at the next call (``create_schema`` with
    ``_record_shards``). Epochs start again at 1, and the stores' fences keep any older owner out.
    """
    authority = PostgresAuthority(postgres_url, schema=postgres_schema, shards=SHARDS)
    await authority.open()
    try:
        assert await authority.claim("m1", [0], 5.0) == {0: 1}
        await sql(postgres_url, f'DROP SCHEMA "{postgres_schema}" CASCADE')
        got: dict[int, int] = {}
        for _ in range(3):
            try:
                got = await authority.claim("m1", [0, 1], 5.0)
                break
            except StoreUnavailableError:
                continue
        assert set(got) == {0, 1}
    finally:
        await authority.aclose()


async def step(p: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    return {**p, "n": p["n"] + 1}


ONE = Workflow("one", [Step(fn=step, name="s")])


async def test_a_column_added_to_the_members_table_never_leaves_a_runtime_owning_shards_past_its_lease(
    postgres_url: str, postgres_schema: str
) -> None:
    """Guarantee (DESIGN.md "Several processes"): a process stops owning its shards at its lease
    deadline unless a renewal lands. A shard another member claimed at a higher epoch is never run
    here.

    ``renew``, ``members``, ``pending`` and ``read_postgres_shard_map`` read ``SELECT * FROM
    hs_members`` (and ``hs_inbox``) into ``MemberInfo(*row)``. Add one column: a newer hotstate
    release's migration during a rolling upgrade, or an operator's ``zone`` column for a dashboard.
    ``renew`` then raises ``TypeError: MemberInfo.__new__() takes 8 positional arguments but 9 were
    given``. That is not a ``PersistenceError``, so ``_renew_once`` does not catch it. The renewal
    task dies ("internal error in hotstate-lease-renewals"), and with it the only place that enforces
    ``valid_until``.

    Evidence: the lease lapses in the database and an intruder claims every shard at epoch 2. The
    runtime still reports ``owned == {0: 1, 1: 1, 2: 1, 3: 1}`` with ``lease_valid_for`` around
    -1.1 s, and still runs new steps in those shards. Its store writes are fenced, but the steps (and
    their side effects) run twice.

    Fix: select named columns everywhere (never ``*``), and turn a row that does not decode into a
    ``PersistenceError``. In the runtime, make ``run_renewals`` treat any exception as a failed
    renewal, so the deadline still applies.
    """
    tier = Tier(PostgresStore(postgres_url, schema=postgres_schema, shards=SHARDS), FlushPolicy(interval=0.02))
    ownership = Ownership(shards=SHARDS, ttl=0.6, renew_every=0.1, claim_every=0.1)
    intruder = PostgresAuthority(postgres_url, schema=postgres_schema)
    with anyio.fail_after(20):
        async with Runtime([ONE], tiers=[tier], ownership=ownership) as rt:
            await (await rt.spawn(ONE, {"n": 0})).wait_finished()
            stats = rt.statistics().ownership
            assert stats is not None
            assert len(stats.owned) == SHARDS
            await sql(postgres_url, f'ALTER TABLE "{postgres_schema}".hs_members ADD COLUMN zone text')
            await anyio.sleep(1.5)  # > ttl: without a renewal, every lease lapsed in the database
            await intruder.open()
            try:
                taken = await intruder.claim("intruder", list(range(SHARDS)), 30.0)
            finally:
                await intruder.aclose()
            stats = rt.statistics().ownership
            assert stats is not None
            both = set(taken) & set(stats.owned)
            assert not both, (
                f"shards {sorted(both)} are held by another member at epochs {taken} and still owned here"
                f" (lease valid for {stats.lease_valid_for:.2f} s)"
            )


# ------------------------------------------------------------------ what held


async def test_held_a_lease_of_a_member_whose_pid_now_belongs_to_another_process_start_is_broken_at_once(
    postgres_url: str, postgres_schema: str
) -> None:
    """The real ``process_gone`` (the contract suite injects its own): a live lease of a member on this
    host is broken at the next claim when its pid now runs another process start (a pid reused after
    a crash). A live lease of a member on another host is waited out, never judged by pid. HELD.
    """
    authority = PostgresAuthority(postgres_url, schema=postgres_schema, shards=SHARDS)
    await authority.open()
    try:
        host = host_identity()
        reused = MemberInfo("reused", host, os.getpid(), "1", "old", 0.0, 0.0)  # our pid, another start
        await authority.join(reused)
        assert await authority.claim("reused", [0], 60.0) == {0: 1}
        assert await authority.claim("next", [0], 60.0) == {0: 2}
        leases = {lease.shard: lease for lease in await authority.leases()}
        assert leases[0].owner == "next"
        remote = MemberInfo("remote", "another-host", os.getpid(), "1", "far", 0.0, 0.0)
        await authority.join(remote)
        assert await authority.claim("remote", [1], 60.0) == {1: 1}
        assert await authority.claim("next", [1], 60.0) == {}
        found = await read_postgres_shard_map(postgres_url, postgres_schema)
        assert found is not None
        assert {m.member_id for m in found[1]} == {"reused", "remote"}
    finally:
        await authority.aclose()
