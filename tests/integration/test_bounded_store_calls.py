"""No store call runs long (#11, item 6): a very long history is written in bounded calls.

Re-writing a run with 1,000,000 transitions after an empty restart was one Lua
script: every other Valkey client got ``BUSY`` or waited for seconds. Now
``save`` writes at most ``CALL_TRANSITIONS`` transitions per script (~15 ms on
2 cores), so a second client's commands wait for one part at most, and at most
``TRANSACTION_TRANSITIONS`` per SQLite transaction (~40 ms), while the whole
history is stored, each transition once.

Each test saves one run with 200,000 transitions (one call of ~0.5 s before the
fix): Valkey's while a probe in a thread of its own measures how long the
server kept it waiting, SQLite's timing each transaction. The bound, 200 ms, is
generous for a loaded 2-core machine and still far below the one-call figure.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from typing import TYPE_CHECKING

import anyio
import pytest
import valkey

from hotstate import Status, Transition, TransitionKind
from hotstate.persistence import DEFAULT_SHARDS, RunHeader, SQLiteStore, Store, StoredSnapshot, ValkeyStore, shard_of
from hotstate.persistence._records import transition_from_json
from hotstate.persistence._store import CALL_TRANSITIONS, TRANSACTION_TRANSITIONS


def vkey(prefix: str, run_id: str, kind: str = "run") -> str:
    """A run's Valkey key of ``kind`` (layout 2: each run's keys carry its shard's hash tag)."""
    return f"{prefix}:{{{shard_of(run_id, DEFAULT_SHARDS)}}}:{kind}:{run_id}"


def skey(prefix: str, run_id: str, *parts: str) -> str:
    """A key of ``run_id``'s shard: its dead letters, its status and workflow indexes."""
    return ":".join((prefix, f"{{{shard_of(run_id, DEFAULT_SHARDS)}}}", *parts))


if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

N = 200_000
BOUND = 0.200  # seconds a probe may wait for one store call

pytestmark = pytest.mark.slow


def long_history(run_id: str) -> tuple[StoredSnapshot, list[Transition]]:
    header = RunHeader(run_id, "orders", 1, N, 3, "running", 1_700_000_000.0, 1)
    at = 1_700_000_000.25
    history = [Transition(run_id, v, TransitionKind.step, 3, Status.running, at, None) for v in range(1, N + 1)]
    return StoredSnapshot(header, None, b"body"), history


class Probe:
    """Call ``once`` in a loop in a thread of its own; keep the longest call (seconds)."""

    def __init__(self, once: Callable[[], object]) -> None:
        self.once = once
        self.longest = 0.0
        self.calls = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            t0 = time.perf_counter()
            self.once()
            self.longest = max(self.longest, time.perf_counter() - t0)
            self.calls += 1
            time.sleep(0.001)

    def __enter__(self) -> Probe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


async def save_under_probe(store: Store, once: Callable[[], object]) -> Probe:
    snapshot, history = long_history("long")
    with Probe(once) as probe:
        await anyio.sleep(0.05)  # the probe runs before the save starts
        with anyio.fail_after(60):  # a hang guard only
            result = await store.save([snapshot], history)
        await anyio.sleep(0.05)
    assert (result.written, result.transitions, result.rejected) == (1, N, {})
    assert probe.calls > 10
    return probe


async def test_a_200k_transition_history_never_holds_other_valkey_clients_off_for_long(
    valkey_url: str, valkey_prefix: str
) -> None:
    with valkey.Valkey.from_url(valkey_url) as pinger:
        async with ValkeyStore(valkey_url, prefix=valkey_prefix) as store:
            probe = await save_under_probe(store, pinger.ping)
            assert probe.longest < BOUND, f"a PING waited {probe.longest * 1000:.0f} ms"
        key = vkey(valkey_prefix, "long", "hist")
        assert pinger.hlen(key) == N
        first, last = pinger.hmget(key, ["1", str(N)])
        assert first is not None
        assert last is not None
        assert transition_from_json(first).version == 1
        assert transition_from_json(last).version == N
    assert N // CALL_TRANSITIONS >= 40  # the save took that many scripts


async def test_a_200k_transition_history_is_written_in_short_sqlite_transactions(tmp_path: Path) -> None:
    """Each transaction is timed from its BEGIN to its COMMIT on the store's writer connection.

    Another writer of the file is not a fair probe here: SQLite's busy handler
    sleeps 1 ms, 2 ms, ... 100 ms between tries, so it can miss every gap
    between short transactions and wait for the whole save anyway.
    """
    db = tmp_path / "runs.db"
    spans: list[float] = []
    began = [0.0]

    def trace(sql: str) -> None:  # runs in the connection's thread
        if sql.startswith("BEGIN"):
            began[0] = time.perf_counter()
        elif sql == "COMMIT":
            spans.append(time.perf_counter() - began[0])

    async with SQLiteStore(db) as store:
        writer = store._writer  # the store's one writer connection (a test seam)
        assert writer is not None
        await writer.set_trace_callback(trace)
        snapshot, history = long_history("long")
        with anyio.fail_after(60):  # a hang guard only
            result = await store.save([snapshot], history)
        assert (result.written, result.transitions, result.rejected) == (1, N, {})
    with contextlib.closing(sqlite3.connect(db)) as check:
        assert check.execute("SELECT count(*), min(version), max(version) FROM transitions").fetchone() == (N, 1, N)
    assert len(spans) >= N // TRANSACTION_TRANSITIONS
    assert max(spans) < BOUND, f"a transaction took {max(spans) * 1000:.0f} ms"
