"""Child process for the crash-recovery tests: runs a workload until the parent SIGKILLs it.

Usage: python crash_child.py DB_PATH POLICY RUNS STEPS
Prints "ready" once every run is spawned and durable, then one "ack RUN VERSION"
line per step that starts (under write-through its starting version is durable).
"""

from __future__ import annotations

import sys
from typing import Any

import anyio

from hotstate import FlushPolicy, Runtime, Step, StepContext, Tier, Workflow
from hotstate.persistence import SQLiteStore


async def work(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    print(f"ack {ctx.run_id} {ctx.version}", flush=True)
    await anyio.sleep(0.005)
    return {**payload, "n": payload["n"] + 1, "keys": [*payload["keys"][-3:], ctx.idempotency_key]}


def workflow(steps: int) -> Workflow:
    return Workflow("crashy", [Step(fn=work, name=f"s{i}") for i in range(steps)])


def policy(name: str) -> FlushPolicy:
    return FlushPolicy.through() if name == "through" else FlushPolicy(interval=0.02)


async def main(path: str, policy_name: str, runs: int, steps: int) -> None:
    wf = workflow(steps)
    store = SQLiteStore(path, synchronous="FULL" if policy_name == "through" else "NORMAL")
    async with Runtime([wf], tiers=[Tier(store, policy(policy_name))]) as rt:
        handles = [await rt.spawn(wf, {"n": 0, "keys": []}, run_id=f"run-{i:04d}") for i in range(runs)]
        await rt.flush()
        print("ready", flush=True)
        for h in handles:
            await h.wait_finished()
        print("finished", flush=True)


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), backend_options={"use_uvloop": True})
