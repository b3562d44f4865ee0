"""Red-team process tests: child processes (``_child.py``) on one SQLite file, SIGKILLed and SIGSTOPped.

These attacks HELD on the code they were written against (they pass); they
stay as regression checks for the process-level contracts:
- a restart after a crash on the same host does not wait out the lease;
- a paused (SIGSTOP) owner is taken over after its lease, and once resumed
  it stops within a few steps and none of its later writes lands.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from contextlib import closing, suppress
from pathlib import Path

CHILD = Path(__file__).with_name("_child.py")


def start(db: Path, ledger: Path, name: str, ttl: float, *, spawn: bool = False) -> subprocess.Popen[str]:
    args = [sys.executable, str(CHILD), str(db), str(ledger), name, str(ttl)] + (["spawn"] if spawn else [])
    log = db.with_name(f"{name}.stderr")
    with log.open("w") as err:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == "READY", f"child {name} did not start: {line!r} {log.read_text()}"
    return proc


def read_ledger(ledger: Path) -> list[tuple[str, int, int, float]]:
    if not ledger.exists():
        return []
    out = []
    for line in ledger.read_text().splitlines():
        run, step, pid, at = line.split()
        out.append((run, int(step), int(pid), float(at)))
    return out


def wait_for(cond: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return
        time.sleep(0.02)
    raise AssertionError("timed out")


def stop(proc: subprocess.Popen[str]) -> None:
    with suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGCONT)
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def test_held_a_restart_after_sigkill_takes_the_shards_without_waiting_out_the_lease(tmp_path: Path) -> None:
    db, ledger = tmp_path / "hs.db", tmp_path / "ledger"
    a = start(db, ledger, "a", 30.0, spawn=True)
    try:
        wait_for(lambda: len(read_ledger(ledger)) >= 40, 5)
        a.kill()
        a.wait()
        killed_at = time.time()
        b = start(db, ledger, "b", 30.0)
        try:
            wait_for(
                lambda: {r for r, _, pid, _ in read_ledger(ledger) if pid == b.pid} >= {f"w{i}" for i in range(8)}, 5
            )
            resumed_at = max(t for _, _, pid, t in read_ledger(ledger) if pid == b.pid)
        finally:
            stop(b)
    finally:
        stop(a)
    assert resumed_at - killed_at < 5.0  # ttl is 30 s: the dead pid's leases were broken at once


def test_held_a_sigstopped_owner_is_taken_over_and_once_resumed_runs_few_steps_and_writes_none(tmp_path: Path) -> None:
    db, ledger = tmp_path / "hs.db", tmp_path / "ledger"
    ttl = 1.0
    a = start(db, ledger, "a", ttl, spawn=True)
    b = None
    try:
        wait_for(lambda: len(read_ledger(ledger)) >= 40, 5)
        os.kill(a.pid, signal.SIGSTOP)
        b = start(db, ledger, "b", ttl)
        b_pid = b.pid
        wait_for(lambda: {r for r, _, pid, _ in read_ledger(ledger) if pid == b_pid} >= {f"w{i}" for i in range(8)}, 5)
        with closing(sqlite3.connect(db)) as conn:
            epochs_b = dict(conn.execute("SELECT shard, epoch FROM hs_shard_fence").fetchall())
        resumed_at = time.time()
        os.kill(a.pid, signal.SIGCONT)
        time.sleep(1.0)
        lines = read_ledger(ledger)
        with closing(sqlite3.connect(db)) as conn:
            rows = conn.execute("SELECT run_id, epoch, version FROM runs").fetchall()
    finally:
        if b is not None:
            stop(b)
        stop(a)
    # Zombie steps: steps A ran after SIGCONT that B (the owner since the takeover) also ran. Steps of
    # shards B later hands back to A are A's own (B drained and flushed them first): never the same step.
    by_b = {(r, s) for r, s, pid, _ in lines if pid == b_pid}
    zombie = Counter(r for r, s, pid, t in lines if pid == a.pid and t > resumed_at and (r, s) in by_b)
    assert max(zombie.values(), default=0) <= 4, zombie  # "one burst": a few steps per run at most
    # Every stored run row is B's (the epoch of B's claim or later), never a zombie write of A's.
    from hotstate.persistence import shard_of

    for run_id, epoch, _ in rows:
        assert epoch >= epochs_b[shard_of(run_id, 8)], (run_id, epoch, epochs_b)


def test_held_a_rolling_deploy_runs_no_step_twice(tmp_path: Path) -> None:
    """A runs everything; B starts (rebalance hands half over), then A gets SIGTERM (hands off the rest)."""
    db, ledger = tmp_path / "hs.db", tmp_path / "ledger"
    a = start(db, ledger, "a", 2.0, spawn=True)
    b = None
    try:
        wait_for(lambda: len(read_ledger(ledger)) >= 40, 5)
        b = start(db, ledger, "b", 2.0)
        b_pid = b.pid
        wait_for(lambda: len({r for r, _, pid, _ in read_ledger(ledger) if pid == b_pid}) >= 2, 5)
        a.send_signal(signal.SIGTERM)
        a.wait(5)
        wait_for(lambda: {r for r, _, pid, _ in read_ledger(ledger) if pid == b_pid} >= {f"w{i}" for i in range(8)}, 5)
        time.sleep(0.3)
    finally:
        if b is not None:
            stop(b)
        stop(a)
    twice = {k: n for k, n in Counter((r, s) for r, s, _, _ in read_ledger(ledger)).items() if n > 1}
    assert not twice, f"steps run twice in a rolling deploy: {sorted(twice)[:10]}"
