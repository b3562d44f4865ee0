"""Crash recovery: a real child process is SIGKILLed mid-workload, a new runtime resumes every run."""

from __future__ import annotations

import importlib.util
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest

from hotstate import Runtime, Status, Tier
from hotstate.persistence import FlushPolicy, SQLiteStore

CHILD = Path(__file__).with_name("crash_child.py")
_spec = importlib.util.spec_from_file_location("crash_child", CHILD)
assert _spec is not None
assert _spec.loader is not None
_child = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_child)
workflow = _child.workflow
RUNS, STEPS = 60, 20


def run_child_and_kill(db: Path, policy: str, kill_after_acks: int) -> dict[str, int]:
    """Start the child, SIGKILL it after `kill_after_acks` step acks; return the highest ack per run."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.Popen(
        [sys.executable, str(CHILD), str(db), policy, str(RUNS), str(STEPS)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    acked: dict[str, int] = {}
    seen = 0
    ready = False
    deadline = time.monotonic() + 60
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            if line.startswith("ready"):
                ready = True
            elif line.startswith("ack ") and ready:
                _, run_id, version = line.split()
                acked[run_id] = max(acked.get(run_id, 0), int(version))
                seen += 1
                if seen >= kill_after_acks:
                    break
            if time.monotonic() > deadline:
                break
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    assert ready
    return acked


@pytest.mark.parametrize("trial", [0, 1, 2])
@pytest.mark.parametrize("policy", ["behind", "through"])
async def test_sigkill_mid_workload_then_recovery_finishes_every_run(tmp_path, policy, trial):
    rng = random.Random(f"crash-{policy}-{trial}")
    db = tmp_path / "runs.db"
    acked = await anyio.to_thread.run_sync(run_child_and_kill, db, policy, rng.randint(RUNS // 2, RUNS * 3))
    store = SQLiteStore(db)
    wf = workflow(STEPS)
    async with store:
        before = {h.run_id: h.version for h in await store.scan(limit=10_000)}
    assert len(before) == RUNS  # every spawned run was durable before the kill
    async with Runtime([wf], tiers=[Tier(SQLiteStore(db), FlushPolicy(interval=0.05))], recover=True) as rt:
        report = rt.recovery_report
        assert report is not None
        assert report.corrupt == ()
        assert report.lost == ()
        resumed = {r.run_id: r.version for r in report.resumed}
        for run_id, version in resumed.items():
            assert version == before[run_id]  # resumed from the latest durable snapshot
        if policy == "through":
            for run_id, version in acked.items():
                # a step started only once its starting version was durable: nothing acknowledged is lost
                assert before[run_id] >= version, (run_id, before[run_id], version)
        with anyio.fail_after(60):
            for i in range(RUNS):
                handle = rt.handle(f"run-{i:04d}") if f"run-{i:04d}" in resumed else None
                if handle is not None:
                    await handle.wait_finished()
        for run_id in resumed:
            snap = rt.get(run_id)
            assert snap.status is Status.done
            assert snap.payload["n"] >= STEPS  # steps after the last durable snapshot ran again
            assert snap.version > before[run_id]  # no version went backwards
        await rt.flush()
    async with store:
        for run_id in before:
            stored = await store.load(run_id)
            assert stored is not None
            assert stored.header.status == "done"
            history = await store.history(run_id)
            versions = [t.version for t in history]
            assert versions == sorted(set(versions))  # strictly increasing, no duplicates
