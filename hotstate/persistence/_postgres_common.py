"""What the PostgreSQL tier and the PostgreSQL lease authority share: names, error kinds, schema creation.

No state: helpers over ``asyncpg`` connections.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Final

import anyio
import asyncpg

from hotstate._errors import ConfigError, PersistenceError, StoreUnavailableError
from hotstate.persistence._shards import check_shards

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Mapping

__all__ = ["check_schema", "create_schema", "postgres_error", "recorded_shards", "session_settings"]

_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")

# Errors a retry may fix: the connection (lost, refused, reset), the server
# (shutting down, starting, in recovery, read-only after a failover, out of
# connections, disk or memory), and transactions the server rolled back
# (deadlock, serialization) or cancelled (statement timeout).
_TRANSIENT: Final = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.TransactionRollbackError,
    asyncpg.exceptions.ReadOnlySQLTransactionError,
    asyncpg.exceptions.LockNotAvailableError,
    asyncpg.exceptions.PostgresSystemError,  # class 58: I/O error, undefined file
    asyncpg.exceptions.InvalidCachedStatementError,  # a table changed under a prepared statement: asyncpg prepares again
)

# Two processes creating one schema at once: CREATE ... IF NOT EXISTS is not
# atomic across sessions in PostgreSQL (the catalog's unique index decides).
_CREATE_RACES: Final = (
    asyncpg.UniqueViolationError,
    asyncpg.exceptions.DuplicateTableError,
    asyncpg.exceptions.DuplicateObjectError,
    asyncpg.exceptions.DuplicateSchemaError,
)


def check_schema(field: str, schema: object) -> str:
    """``schema`` as a plain SQL name (it is spliced into statements, quoted), or ``ConfigError``."""
    if not isinstance(schema, str) or not _NAME.fullmatch(schema):
        raise ConfigError(field, schema, "must be a plain SQL name (letters, digits, _; at most 63)")
    return schema


def session_settings(timeout: float, given: Mapping[str, str] | None) -> dict[str, str]:
    """The settings every session of a pool starts with (asyncpg's ``server_settings``).

    By default the server ends a session that stays idle inside a
    transaction for ``timeout / 2``: a process cut off by a partition in the
    middle of a transaction leaves it open on the server, with its row locks
    (a flush's ``FOR SHARE`` on the fence rows, a claim's ``FOR UPDATE`` on
    lease rows), until TCP notices, hours by default, and the next owner's
    seal and every write of those shards would wait behind it. No
    transaction of hotstate's is idle between its statements for long.
    Startup settings, not ``SET``: the pool's ``RESET ALL`` at each release
    keeps them. ``given`` replaces them: PgBouncer refuses startup settings
    it does not know, so pass ``{}`` there and set it for the role instead
    (``ALTER ROLE app SET idle_in_transaction_session_timeout = '5s'``).
    """
    if given is not None:
        return dict(given)
    return {"idle_in_transaction_session_timeout": str(max(int(timeout * 500), 100))}


def recorded_shards(name: str, value: object) -> int:
    """The shard count ``hs_meta`` records, checked: ``PersistenceError`` when it is not one (edited by hand)."""
    try:
        return check_shards("shards", int(str(value)))
    except (TypeError, ValueError) as exc:  # ConfigError is a ValueError too
        raise PersistenceError(name, f"hs_meta records shards={value!r}, which is not a shard count") from exc


def postgres_error(name: str, action: str, exc: BaseException) -> PersistenceError:
    """The hotstate error for an ``asyncpg`` failure: ``StoreUnavailableError`` when a retry may help."""
    if isinstance(exc, _TRANSIENT):
        return StoreUnavailableError(name, f"{action}: {type(exc).__name__}: {exc}")
    return PersistenceError(name, f"{action}: {type(exc).__name__}: {exc}")


async def create_schema(
    conn: asyncpg.Connection,
    schema: str,
    ddl: str,
    then: Callable[[asyncpg.Connection], Awaitable[object]] | None = None,
) -> None:
    """``CREATE SCHEMA IF NOT EXISTS`` and ``ddl`` in one transaction, retried when another process races it.

    Openers of one schema take turns: a transaction-scoped advisory lock
    (released at commit; it guards only this DDL, never ownership) comes
    first, as two openers running ``CREATE INDEX IF NOT EXISTS`` and then
    writing the same tables deadlock. ``then(conn)`` (an async callable),
    when given, runs in the same transaction.
    """
    for attempt in range(20):
        try:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"hotstate schema {schema}")
                await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
                await conn.execute(
                    f'SET LOCAL search_path TO "{schema}"'
                )  # for unqualified names, even behind a pooler
                await conn.execute(ddl)
                if then is not None:
                    await then(conn)
            return
        except (*_CREATE_RACES, asyncpg.exceptions.TransactionRollbackError):
            if attempt == 19:
                raise
            await anyio.sleep(0.01 * (attempt + 1))
