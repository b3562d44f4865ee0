"""A worker process for the red-team process tests: a runtime on one SQLite file, with a ledger of executions.

    python _child.py DB LEDGER NAME TTL [spawn]

Every step appends ``run step pid time`` to LEDGER (O_APPEND, one short line:
atomic). With ``spawn`` it spawns runs w0..w7 (spawning an existing id is
idempotent). Prints READY once open; runs until SIGTERM (graceful shutdown).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from typing import Any

from hotstate import Runtime, Step, Workflow
from hotstate.persistence import FlushPolicy, SQLiteStore, Tier
from hotstate.runtime import Ownership

DB, LEDGER, NAME, TTL = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
SPAWN = len(sys.argv) > 5 and sys.argv[5] == "spawn"
STEPS = 400
RUNS = [f"w{i}" for i in range(8)]

_fd = os.open(LEDGER, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


async def tick(payload: dict[str, Any], ctx: object) -> dict[str, Any]:
    await asyncio.sleep(0.005)
    os.write(_fd, f"{ctx.run_id} {ctx.step} {os.getpid()} {time.time():.6f}\n".encode())  # type: ignore[attr-defined]
    return {"n": payload["n"] + 1}


COUNT = Workflow("count", [Step(fn=tick, name=f"t{i}") for i in range(STEPS)])


async def main() -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    config = Ownership(shards=8, ttl=TTL, renew_every=min(0.2, TTL / 5), claim_every=0.05, inbox_every=0.02, name=NAME)
    tiers = [Tier(SQLiteStore(DB, shards=8), FlushPolicy(interval=0.02))]
    async with Runtime([COUNT], tiers=tiers, ownership=config, recover=True, shutdown_timeout=1.0) as rt:
        if SPAWN:
            for rid in RUNS:
                await rt.spawn(COUNT, {"n": 0}, run_id=rid)
        print("READY", flush=True)
        await stop.wait()


asyncio.run(main())
