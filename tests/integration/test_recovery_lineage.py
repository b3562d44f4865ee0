"""Recovery and lineage under faults (#10): real SQLite files and a real Valkey server.

- One malformed row in a tier is skipped and reported; every other run of that
  tier is recovered (before: the whole tier was dropped and 491 recorded steps
  ran again from the other tier's older copies).
"""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING, Any

import anyio

from hotstate import FlushPolicy, Runtime, Step, StepContext, Tier, Workflow
from hotstate.persistence import SQLiteStore

if TYPE_CHECKING:
    from pathlib import Path

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
