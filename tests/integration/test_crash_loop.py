"""A run that crashes its process (#10): counted durably, held back, then failed and dead-lettered.

A real child process runs 10 ordinary orders and one whose step SIGKILLs the
process (as an out-of-memory kill or a crashing extension would). The parent
restarts it with ``recover=True`` until it exits on its own. Before: the poison
run was resumed at attempt 1 after every restart, never dead-lettered, and the
other runs made no progress across 5 restarts.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path
from typing import Any

import anyio

from hotstate.persistence import SQLiteStore

CRASH_LIMIT = 3
ORDINARY = 10

CHILD = textwrap.dedent(
    """
    import json, os, signal, sys
    import anyio
    from hotstate import FlushPolicy, RunFailedError, Runtime, Step, Tier, Workflow
    from hotstate.persistence import SQLiteStore

    db, ledger, limit, ordinary = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])

    async def reserve(p, ctx):
        return {**p, "reserved": True}

    async def work(p, ctx):
        with open(ledger, "a") as f:  # every execution of the step, written before it can crash
            f.write(json.dumps([ctx.run_id, ctx.attempt]) + "\\n")
        await anyio.sleep(0.05)  # some work first: the runs before this step are durable by now
        if p["poison"]:
            os.kill(os.getpid(), signal.SIGKILL)  # the step takes its process down
        return {**p, "worked": True}

    async def refund(p, ctx):
        with open(ledger, "a") as f:
            f.write(json.dumps([ctx.run_id, "compensated"]) + "\\n")

    JOB = Workflow("job", [Step(fn=reserve, name="reserve", compensate=refund), Step(fn=work, name="work")])

    async def main():
        tier = Tier(SQLiteStore(db), FlushPolicy(interval=0.01))
        async with Runtime([JOB], tiers=[tier], recover=True, crash_limit=limit) as rt:
            report = rt.recovery_report
            print(json.dumps({"resumed": len(report.resumed), "crash_looped": list(report.crash_looped),
                              "held_back": list(report.held_back)}), flush=True)
            if not report.resumed and not report.crash_looped and not rt.count():
                await rt.spawn(JOB, {"poison": True}, run_id="poison")  # first in the queue
                for i in range(ordinary):
                    await rt.spawn(JOB, {"poison": False}, run_id=f"order-{i:02d}")
            for snap in rt.list_runs():
                try:
                    await rt.wait_finished(snap.run_id)
                except RunFailedError:
                    pass
        print("done", flush=True)

    anyio.run(main)
    """
)


async def test_a_step_that_kills_its_process_is_failed_after_the_crash_limit_and_every_other_run_finishes(
    tmp_path: Path,
) -> None:
    db, ledger, script = tmp_path / "runs.db", tmp_path / "ledger.jsonl", tmp_path / "child.py"
    script.write_text(CHILD)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")]),
    }
    starts: list[dict[str, Any]] = []
    exits: list[int] = []
    for _ in range(CRASH_LIMIT + 3):
        with anyio.fail_after(60):
            proc = await anyio.run_process(
                [sys.executable, str(script), str(db), str(ledger), str(CRASH_LIMIT), str(ORDINARY)],
                env=env,
                check=False,
            )
        lines = proc.stdout.decode().splitlines()
        starts.append(json.loads(lines[0]))
        exits.append(proc.returncode)
        if proc.returncode == 0:
            assert lines[-1] == "done"
            break
    assert exits[-1] == 0, (exits, starts, proc.stderr.decode())
    assert exits[:-1] == [-9] * (len(exits) - 1)
    assert len(exits) <= CRASH_LIMIT + 2  # the first run, CRASH_LIMIT crashes at most, the final start
    assert starts[-1]["crash_looped"] == ["poison"]  # failed at the recovery that found it over the limit
    assert any("poison" in s["held_back"] for s in starts)  # a suspect after its second crash: released alone
    entries = [json.loads(line) for line in ledger.read_text().splitlines()]
    poison_runs = [e for e in entries if e[0] == "poison" and e[1] != "compensated"]
    assert len(poison_runs) == CRASH_LIMIT  # never executed again once over the limit
    assert ["poison", "compensated"] in entries  # given up like any failure: compensated
    async with SQLiteStore(db) as sq:
        headers = {h.run_id: h for h in await sq.scan(limit=100)}
        assert headers["poison"].status == "failed"
        assert all(headers[f"order-{i:02d}"].status == "done" for i in range(ORDINARY))
        letters = {d.run_id: d for d in await sq.dead_letters()}
        assert "CrashLoopError" in letters["poison"].error
        assert "3 consecutive process crashes" in letters["poison"].error
