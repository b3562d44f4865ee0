"""Recovery and lineage under faults (#10): real SQLite files, a real Valkey server, real SIGKILLs.

- One malformed row in a tier is skipped and reported; every other run of that
  tier is recovered (before: the whole tier was dropped and 491 recorded steps
  ran again from the other tier's older copies).
- A SIGKILL after runs finished in Valkey but before SQLite's flush, then
  recovery, ``purge_finished`` and another restart: no finished run comes back
  (before: 20 of 20 were resumed from SQLite's stale copies, because recovery
  never repaired the tier that was behind and each tier purged only what it
  listed as finished).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import sys
import textwrap
from pathlib import Path
from typing import Any

import anyio
import pytest

from hotstate import FlushPolicy, RunNotFoundError, Runtime, Step, StepContext, StoreUnavailableError, Tier, Workflow
from hotstate.persistence import EmbeddedValkey, SQLiteStore, ValkeyStore

GUARD = 10  # seconds; a hang guard only


async def inc(p: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    return {**p, "n": p["n"] + 1}


async def take(p: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    return {**p, "got": ctx.signal}


PARKED = Workflow("parked", [Step(fn=inc, name="a"), Step(fn=take, wait_for="go"), Step(fn=inc, name="b")])


async def test_one_malformed_row_is_skipped_and_reported_and_the_rest_of_its_tier_is_recovered(tmp_path: Path) -> None:
    db = tmp_path / "runs.db"
    async with Runtime([PARKED], tiers=[Tier(SQLiteStore(db), FlushPolicy(interval=60.0))]) as rt:
        for i in range(20):
            await rt.spawn(PARKED, {"n": i}, run_id=f"r{i:02d}")
        with anyio.fail_after(GUARD):
            while rt.count(status="waiting") < 20:  # noqa: ASYNC110 - the runs park themselves
                await anyio.sleep(0.001)
    # Something other than hotstate writes one row: its step is no longer a number.
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE runs SET step = 'two' WHERE run_id = 'r07'")
    conn.close()
    async with Runtime([PARKED], tiers=[Tier(SQLiteStore(db), FlushPolicy(interval=60.0))], recover=True) as rt:
        report = rt.recovery_report
        assert report is not None
        assert report.tier_errors == {}  # the tier was read, not dropped
        assert sorted(r.run_id for r in report.resumed) == [f"r{i:02d}" for i in range(20) if i != 7]
        assert [(c.run_id, c.tier) for c in report.corrupt] == [("r07", "sqlite")]
        assert "malformed row" in report.corrupt[0].reason
        assert "step" in report.corrupt[0].reason
        for i in range(20):
            if i != 7:
                await rt.send(f"r{i:02d}", "go", i)
        with anyio.fail_after(GUARD):
            for i in range(20):
                if i != 7:
                    assert await rt.wait_finished(f"r{i:02d}") == {"n": i + 2, "got": i}
    with sqlite3.connect(db) as conn:  # the bad row is left for an operator, untouched
        assert conn.execute("SELECT step FROM runs WHERE run_id = 'r07'").fetchone() == ("two",)
    conn.close()


# A child on the README's tiers (Valkey every 10 ms, SQLite every second, here
# every minute so the kill surely lands before SQLite's flush): runs park at the
# charge step, both tiers flush, the runs are paid and finish; once Valkey holds
# every run finished, the child SIGKILLs itself. SQLite still holds them parked.
LINEAGE_CHILD = textwrap.dedent(
    """
    import json, os, signal, sys
    import anyio
    from hotstate import FlushPolicy, Runtime, Step, Tier, Workflow
    from hotstate.persistence import SQLiteStore, ValkeyStore

    db, url, prefix, ledger, runs = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])

    async def reserve(p, ctx):
        return {**p, "reserved": True}

    async def charge(p, ctx):  # the side effect, written down once per execution
        with open(ledger, "a") as f:
            f.write(json.dumps([ctx.run_id, ctx.signal]) + "\\n")
        return {**p, "charged": ctx.signal}

    async def ship(p, ctx):
        return {**p, "shipped": True}

    ORDER = Workflow("order", [Step(fn=reserve, name="reserve"), Step(fn=charge, wait_for="paid"), Step(fn=ship, name="ship")])

    async def main():
        tiers = [
            Tier(ValkeyStore(url, prefix=prefix), FlushPolicy(interval=0.01)),
            Tier(SQLiteStore(db), FlushPolicy(interval=60.0)),
        ]
        async with Runtime([ORDER], tiers=tiers) as rt:
            ids = [f"order-{i:02d}" for i in range(runs)]
            for rid in ids:
                await rt.spawn(ORDER, {}, run_id=rid)
            while rt.count(status="waiting") < runs:
                await anyio.sleep(0.001)
            await rt.flush()  # both tiers hold every run parked at charge
            for rid in ids:
                await rt.send(rid, "paid", 42)
            for rid in ids:
                await rt.wait_finished(rid)
                await rt.wait_durable(rid, tier="valkey")
            print(json.dumps(rt.durable_versions(ids[0])), flush=True)
            os.kill(os.getpid(), signal.SIGKILL)  # before SQLite's flush

    anyio.run(main)
    """
)

ORDER_STEPS = [Step(fn=inc, name="reserve"), Step(fn=take, wait_for="paid"), Step(fn=inc, name="ship")]
ORDER = Workflow("order", ORDER_STEPS)


def lineage_tiers(url: str, prefix: str, db: Path) -> list[Tier]:
    return [
        Tier(ValkeyStore(url, prefix=prefix), FlushPolicy(interval=0.01)),
        Tier(SQLiteStore(db), FlushPolicy(interval=1.0)),
    ]


async def crash_between_the_tiers(tmp_path: Path, url: str, prefix: str, runs: int) -> tuple[Path, Path]:
    """Run LINEAGE_CHILD: ``runs`` orders finished in Valkey, parked at charge in SQLite, then SIGKILL."""
    db, ledger, script = tmp_path / "runs.db", tmp_path / "ledger.jsonl", tmp_path / "child.py"
    script.write_text(LINEAGE_CHILD)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")]),
    }
    with anyio.fail_after(60):
        proc = await anyio.run_process(
            [sys.executable, str(script), str(db), url, prefix, str(ledger), str(runs)], env=env, check=False
        )
    assert proc.returncode == -9, proc.stderr.decode()
    return db, ledger


async def test_spawn_of_a_finished_run_while_the_tier_with_its_newest_copy_is_stopped_starts_nothing(
    tmp_path: Path, ephemeral_valkey: EmbeddedValkey
) -> None:
    """Valkey holds the run finished, SQLite an older parked copy; Valkey is SIGSTOPped (#10).

    Before: spawn skipped the stopped tier and adopted SQLite's older copy, a
    second lineage that charged the order again once paid. Now spawn raises a
    typed error and starts nothing; once Valkey answers, it returns the finished run.
    """
    url, prefix = ephemeral_valkey.url, "stopped"
    db, ledger = await crash_between_the_tiers(tmp_path, url, prefix, runs=1)
    tiers = [
        Tier(ValkeyStore(url, prefix=prefix, socket_timeout=5.0), FlushPolicy(interval=0.01, ack_timeout=0.3)),
        Tier(SQLiteStore(db), FlushPolicy(interval=1.0, ack_timeout=0.3)),
    ]
    assert ephemeral_valkey.pid is not None
    async with Runtime([ORDER], tiers=tiers) as rt:
        os.kill(ephemeral_valkey.pid, signal.SIGSTOP)
        try:
            with anyio.fail_after(10), pytest.raises(StoreUnavailableError, match="order-00"):
                await rt.spawn(ORDER, {}, run_id="order-00")
            with pytest.raises(RunNotFoundError):
                rt.get("order-00")  # no second lineage was started from SQLite's parked copy
        finally:
            os.kill(ephemeral_valkey.pid, signal.SIGCONT)
        with anyio.fail_after(10):
            await rt.spawn(ORDER, {}, run_id="order-00")
        assert rt.get("order-00").status == "done"  # the finished run, adopted as it is
    assert len(ledger.read_text().splitlines()) == 1  # charged once, in the child, never again


async def test_runs_finished_in_one_tier_never_come_back_after_a_crash_recovery_purge_and_restart(
    tmp_path: Path, valkey_url: str, valkey_prefix: str
) -> None:
    db, ledger, script, runs = tmp_path / "runs.db", tmp_path / "ledger.jsonl", tmp_path / "child.py", 20
    script.write_text(LINEAGE_CHILD)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")]),
    }
    with anyio.fail_after(60):
        proc = await anyio.run_process(
            [sys.executable, str(script), str(db), valkey_url, valkey_prefix, str(ledger), str(runs)],
            env=env,
            check=False,
        )
    assert proc.returncode == -9, proc.stderr.decode()
    at_kill = json.loads(proc.stdout.decode().splitlines()[-1])
    assert at_kill["valkey"] == at_kill["hot"] > at_kill["sqlite"]  # killed between the two tiers' flushes
    charged = [json.loads(line)[0] for line in ledger.read_text().splitlines()]
    assert sorted(charged) == [f"order-{i:02d}" for i in range(runs)]
    async with SQLiteStore(db) as sq:
        assert {h.status for h in await sq.scan(limit=100)} == {"waiting"}  # SQLite is behind

    async with Runtime([ORDER], tiers=lineage_tiers(valkey_url, valkey_prefix, db), recover=True) as rt:
        report = rt.recovery_report
        assert report is not None
        assert report.resumed == ()  # every run finished: nothing to resume
        assert dict(report.repaired) == {"sqlite": runs}  # the tier that was behind is brought up
        async with SQLiteStore(db) as sq:
            assert {h.status for h in await sq.scan(limit=100)} == {"done"}
            history = await sq.history("order-00")
            assert [t.version for t in history] == list(range(1, history[-1].version + 1))  # no gap
        purged = await rt.purge_finished(older_than=0)
        assert purged == {"hot": 0, "valkey": runs, "sqlite": runs}  # the finished copy is deleted everywhere

    async with Runtime([ORDER], tiers=lineage_tiers(valkey_url, valkey_prefix, db), recover=True) as rt:
        report = rt.recovery_report
        assert report is not None
        assert report.resumed == ()  # 0 finished runs resumed (before: 20 of 20)
        assert rt.count() == 0
    assert len(ledger.read_text().splitlines()) == runs  # no side effect ran twice
