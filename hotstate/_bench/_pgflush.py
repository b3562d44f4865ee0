"""The flush suite's PostgreSQL figures: ``PostgresStore.save`` and the persister beside raw asyncpg.

The raw batch writes of the same rows (``executemany``, ``unnest()`` arrays,
``COPY``) are ``_persist.RAW_POSTGRES_METHODS``; the best of them is the
ceiling of every figure here. Without a server, each figure is recorded as skipped.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from hotstate._bench import _persist as persist
from hotstate._bench._progress import Progress
from hotstate.persistence import PostgresStore

if TYPE_CHECKING:
    from hotstate._bench._suites import Bench

__all__ = ["POSTGRES_FLUSH_FIGURES", "flush_postgres"]


POSTGRES_FLUSH_FIGURES = (
    *(f"raw asyncpg {method} upsert" for method in persist.RAW_POSTGRES_METHODS),
    persist.SAVE,
    "persister -> postgres",
)
"""The flush suite's PostgreSQL figures."""


async def flush_postgres(b: Bench, n: int, body: int, rounds: int) -> None:
    """``PostgresStore.save`` and the persister against the best raw asyncpg batch write of the same rows."""
    print(
        f"\nPostgreSQL batch writes: {n:,} runs + {n:,} transitions a transaction, {body} B bodies "
        f"(median of {rounds}); raw asyncpg into tables shaped like hs_runs and hs_transitions"
    )
    pg = b.postgres_url
    if pg is None:
        for name in POSTGRES_FLUSH_FIGURES:
            b.skip(name, b.no_postgres)
        return
    schemas = [f"hs_bench_flush_{time.monotonic_ns()}_{i}" for i in range(2)]
    try:
        with Progress("raw asyncpg + save", 1) as bar:
            async with PostgresStore(pg, schema=schemas[0]) as store:
                rates = await persist.postgres_batches(pg, n, body, rounds, store)
            bar.advance()
        with Progress("persister -> postgres", 1) as bar:
            async with PostgresStore(pg, schema=schemas[1]) as store:
                flushed = await persist.sustained_flush(store, n, rounds)
            bar.advance()
    finally:
        for schema in schemas:
            await persist.drop_schema(pg, schema)
    save = rates.pop(persist.SAVE)
    best = max(rates, key=rates.__getitem__)
    ceiling = f"best raw ({best})"
    for method, rate in rates.items():
        b.figure(f"raw asyncpg {method} upsert", rate, "rows/s", ceiling, rates[best])
    b.figure(persist.SAVE, save, "rows/s", ceiling, rates[best])
    b.figure("persister -> postgres", flushed, "snapshots/s", ceiling, rates[best])
