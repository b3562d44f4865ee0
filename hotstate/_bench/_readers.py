"""What the judge of the ownership scenarios reads, and the runs the traffic driver waits for.

The workers' ledgers (``read_ledgers``), the ownership log (``read_log``,
``ownership_log``), the ``resumed`` transitions, every tier's copies and
histories (``read_tier``), and the runs stored finished (``ended_runs``):
from the cluster's SQLite file or PostgreSQL schema, read directly (never
through a worker's proxy). The judge is in ``_judge.py``, the driver in
``_scenarios.py``.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import anyio
import asyncpg

from hotstate import MsgpackCodec
from hotstate._bench._cluster import poll
from hotstate._errors import CorruptSnapshotError
from hotstate.persistence._records import decode_snapshot

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from pathlib import Path

    from hotstate._bench._cluster import Cluster
    from hotstate.actors import Snapshot, Transition
    from hotstate.persistence import Store

__all__ = [
    "TERMINAL",
    "Execution",
    "LogEvent",
    "TierView",
    "authority_clock",
    "authority_to_wall",
    "ended_runs",
    "ownership_log",
    "read_ledgers",
    "read_log",
    "read_resumed",
    "read_tier",
    "resumed_runs",
    "wait_ended",
]

TERMINAL: Final = ("done", "failed", "cancelled")


async def wait_ended(cluster: Cluster, run_ids: Iterable[str], timeout: float) -> None:  # noqa: ASYNC109 - a hang guard
    """Poll the cluster's durable store until each of ``run_ids`` is stored finished."""
    wanted = set(run_ids)

    async def ended() -> bool:
        return wanted <= await ended_runs(cluster)

    await poll(ended, timeout=timeout)


async def ended_runs(cluster: Cluster) -> set[str]:
    """The runs stored finished in the cluster's durable store (none while it does not answer)."""
    if cluster.base.postgres_url:
        rows = await _pg_fetch(cluster, "SELECT run_id FROM hs_runs WHERE status = ANY($1::text[])", list(TERMINAL))
        return {r[0] for r in rows or ()}
    return await anyio.to_thread.run_sync(_ended, cluster.db)


def _ended(db: Path) -> set[str]:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as c:
        marks = ",".join("?" * len(TERMINAL))
        return {r[0] for r in c.execute(f"SELECT run_id FROM runs WHERE status IN ({marks})", TERMINAL)}  # noqa: S608 - placeholders only


async def _pg_fetch(cluster: Cluster, sql: str, *args: object) -> list[tuple[Any, ...]] | None:
    """Rows of one query in the cluster's PostgreSQL schema, read directly (never through a proxy); None: no answer."""
    url = cluster.base.postgres_url
    if url is None:  # pragma: no cover - callers check
        raise ValueError("the cluster has no PostgreSQL")
    try:
        conn = await asyncpg.connect(url, timeout=5, server_settings={"search_path": cluster.base.schema})
        try:
            return [tuple(r) for r in await conn.fetch(sql, *args, timeout=10)]
        finally:
            await conn.close()
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError):
        return None


@dataclass(frozen=True, slots=True)
class Execution:
    """One ledger line: a step executed by a worker."""

    key: str
    run: str
    step: int
    version: int
    shard: int
    epoch: int
    pid: int
    member: str
    t: float


@dataclass(frozen=True, slots=True)
class LogEvent:
    """One row of ``hs_ownership_log``: ``at`` as wall-clock time, ``raw`` in the authority's clock."""

    shard: int
    epoch: int
    owner: str
    event: str
    at: float
    raw: float


@dataclass
class TierView:
    """What one tier holds of the runs: newest copies, kept copies, histories."""

    tier: str
    finals: dict[str, tuple[int, Snapshot]] = field(default_factory=dict)  # run -> (epoch, snapshot)
    kept: list[tuple[int, Snapshot]] = field(default_factory=list)
    history: dict[str, list[Transition]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def read_ledgers(paths: Iterable[Path]) -> list[Execution]:
    """Every worker's executions, by time."""
    out: list[Execution] = []
    for path in paths:
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            d = json.loads(line)
            out.append(
                Execution(
                    d["key"], d["run"], d["step"], d["version"], d["shard"], d["epoch"], d["pid"], d["member"], d["t"]
                )
            )
    out.sort(key=lambda e: e.t)
    return out


def authority_to_wall(db: Path) -> Callable[[float], float]:
    """Turns the file's authority times into wall-clock times (ledgers and transitions are stamped with those).

    The SQLite authority measures leases with ``CLOCK_BOOTTIME`` on Linux (its
    ``hs_meta`` row ``clock`` says which): one clock for every process of the
    host, which runs at the wall clock's rate, so one offset converts it.
    """
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as c:
        row = c.execute("SELECT value FROM hs_meta WHERE key = 'clock'").fetchone()
    if row is not None and str(row[0]).startswith("boottime") and hasattr(time, "CLOCK_BOOTTIME"):
        offset = time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)
        return lambda at: at + offset
    return lambda at: at


def read_log(db: Path) -> list[LogEvent]:
    """The ownership log, in commit order."""
    wall = authority_to_wall(db)
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as c:
        rows = c.execute("SELECT shard, epoch, owner, event, at FROM hs_ownership_log ORDER BY rowid").fetchall()
    return [LogEvent(shard, epoch, owner, event, wall(at), at) for shard, epoch, owner, event, at in rows]


async def ownership_log(cluster: Cluster) -> list[LogEvent]:
    """The cluster's ownership log, in commit order (SQLite) or in the order that order implies (PostgreSQL).

    PostgreSQL's log rows carry the time each claim or release *began*
    (``clock_timestamp()`` read first in its transaction); a release that
    began before a claim may commit after the claim began, so two events of
    one shard can be stamped out of order by a few microseconds. Within each
    shard the order is then the epochs' (acquire before the release of the
    same epoch), which is the commit order the row locks enforce.
    """
    if not cluster.base.postgres_url:
        return await anyio.to_thread.run_sync(read_log, cluster.authority)
    rows = await _pg_fetch(cluster, "SELECT shard, epoch, owner, event, at FROM hs_ownership_log")
    if rows is None:
        raise RuntimeError("the PostgreSQL authority did not answer: no ownership log to judge")
    events = sorted((LogEvent(s, e, o, ev, at, at) for s, e, o, ev, at in rows), key=lambda e: e.at)
    slots: dict[int, list[int]] = defaultdict(list)
    for i, e in enumerate(events):
        slots[e.shard].append(i)
    out = list(events)
    for where in slots.values():
        ordered = sorted((events[i] for i in where), key=lambda e: (e.epoch, e.event != "acquire", e.at))
        for i, e in zip(where, ordered, strict=True):
            out[i] = e
    return out


async def resumed_runs(cluster: Cluster) -> list[tuple[str, float]]:
    """``(run id, at)`` of every ``resumed`` transition in the cluster's durable store."""
    if cluster.base.postgres_url:
        rows = await _pg_fetch(cluster, "SELECT run_id, at FROM hs_transitions WHERE kind = 'resumed'")
        return [(r, at) for r, at in rows or ()]
    return await anyio.to_thread.run_sync(read_resumed, cluster.db)


async def authority_clock(cluster: Cluster) -> Callable[[float], float]:
    """Turns the cluster's authority times into wall-clock times (PostgreSQL's are wall-clock times already)."""
    if cluster.base.postgres_url:
        return lambda at: at
    return authority_to_wall(cluster.authority)


def read_resumed(db: Path) -> list[tuple[str, float]]:
    """``(run id, at)`` of every stored ``resumed`` transition."""
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as c:
        return c.execute("SELECT run_id, at FROM transitions WHERE kind = 'resumed'").fetchall()


async def read_tier(store: Store, *, kept: bool) -> TierView:
    """Every run ``store`` holds: its copy (verified and decoded), its history, and its kept copies if ``kept``."""
    codec = MsgpackCodec()
    view = TierView(store.tier)
    async with store:
        after: str | None = None
        while True:
            page = await store.scan(after=after, limit=1000)
            for h in page:
                await _read_run(store, codec, h.run_id, view, kept=kept)
            if len(page) < 1000:
                return view
            after = page[-1].run_id


async def _read_run(store: Store, codec: MsgpackCodec, run_id: str, view: TierView, *, kept: bool) -> None:
    stored = await store.load(run_id)
    if stored is None:
        view.problems.append(f"{view.tier}: run {run_id} listed but not loadable")
        return
    try:
        snap = decode_snapshot(stored, codec, tier=store.tier)
    except CorruptSnapshotError as exc:
        view.problems.append(f"{view.tier}: run {run_id}: {exc}")
        return
    view.finals[run_id] = (stored.header.epoch, snap)
    view.history[run_id] = await store.history(run_id)
    if kept:
        for version in range(1, snap.version + 1):
            copy = await store.load_version(run_id, version)
            if copy is not None:
                view.kept.append((copy.header.epoch, decode_snapshot(copy, codec, tier=store.tier)))
