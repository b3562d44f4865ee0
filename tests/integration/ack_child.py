"""Child process for test_ack_durability.py: one acknowledged call, then SIGKILL.

Usage: python ack_child.py OP POLICY DB_PATH VALKEY_URL PREFIX RUN_ID

Starts a runtime under POLICY with CHURN busy runs (so the tiers always have
unflushed work and a group commit in flight), makes one acknowledged call OP on
RUN_ID, prints one JSON line, flushed: the op, the run id, the version the call
acknowledged, and the version and status ``rt.get`` shows right after it; then
it SIGKILLs itself: nothing after the call gets a chance to flush. Any other
outcome (an exception, a DurabilityTimeoutError) exits with a traceback
instead, which the parent reports.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
from typing import Any

import anyio

from hotstate import (
    FlushPolicy,
    Runtime,
    StepContext,
    Tier,
    TransitionKind,
)
from hotstate._bench._ack import FLAKY_MESSAGE, OPS, act, workflows
from hotstate.persistence import PickleCodec, SQLiteStore, ValkeyStore

KEY = b"ack-durability-key-0123456789abc"
CHURN = 8  # runs stepping every millisecond meanwhile
CHURN_STEPS = 5000  # more than any child lives for
CHURN_WARMUP = 5 * CHURN  # steps taken before the call: the tiers are in their steady state
POLICIES = ("sqlite-through", "valkey-through", "behind+ack", "sqlite-behind-60s", "sqlite-behind-60s+ack")


_flaky_calls = [0]  # one run per process: the simplest "fail once"


async def flaky(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Fails the first time (the run fails for good and is dead-lettered), then stays busy."""
    _flaky_calls[0] += 1
    if _flaky_calls[0] == 1:
        raise ValueError(FLAKY_MESSAGE)
    await anyio.sleep(3600)  # ends with the SIGKILL
    return payload


# The bench's acknowledgement workload: the same workflows and the same call (hotstate._bench._ack).
WORKFLOW = workflows(CHURN_STEPS, flaky)
CHURNING = WORKFLOW["churn"]


def tiers(policy: str, db: str, valkey_url: str, prefix: str) -> tuple[list[Tier], list[str]]:
    """The tiers and ack_tiers of ``policy``."""
    if policy == "sqlite-through":
        return [Tier(SQLiteStore(db, synchronous="FULL"), FlushPolicy.through())], []
    if policy == "valkey-through":
        return [Tier(ValkeyStore(valkey_url, prefix=prefix), FlushPolicy.through())], []
    if policy == "behind+ack":
        valkey_tier = Tier(ValkeyStore(valkey_url, prefix=prefix), FlushPolicy(interval=0.01))
        return [valkey_tier, Tier(SQLiteStore(db), FlushPolicy(interval=1.0))], ["sqlite"]
    if policy in ("sqlite-behind-60s", "sqlite-behind-60s+ack"):
        ack = ["sqlite"] if policy.endswith("+ack") else []
        return [Tier(SQLiteStore(db), FlushPolicy(interval=60.0))], ack
    raise ValueError(f"unknown policy {policy!r}")


async def churn(rt: Runtime, run_id: str) -> None:
    """Start the churn runs and return once they have taken CHURN_WARMUP steps between them."""
    async with rt.subscribe(workflow=CHURNING.name, maxsize=CHURN_STEPS) as seen:
        async with anyio.create_task_group() as tg:  # spawned together: they share group commits
            for i in range(CHURN):
                tg.start_soon(functools.partial(rt.spawn, CHURNING, {"n": 0}, run_id=f"{run_id}-churn-{i}"))
        steps = 0
        with anyio.fail_after(10):  # a hang guard only
            async for transition in seen:
                steps += transition.kind is TransitionKind.step
                if steps >= CHURN_WARMUP:
                    break


async def main(op: str, policy: str, db: str, valkey_url: str, prefix: str, run_id: str) -> None:
    if op not in OPS or policy not in POLICIES:
        raise ValueError(f"unknown op {op!r} or policy {policy!r}")
    tier_list, ack = tiers(policy, db, valkey_url, prefix)
    async with Runtime(
        list(dict.fromkeys(WORKFLOW.values())), tiers=tier_list, ack_tiers=ack, codec=PickleCodec(KEY)
    ) as rt:
        await churn(rt, run_id)
        acked = await act(rt, op, run_id, WORKFLOW[op])
        snap = rt.get(run_id)  # sync, no I/O: the run as the caller sees it after the call
        line = {"op": op, "run_id": run_id, "acked": acked, "version": snap.version, "status": snap.status.value}
        sys.stdout.write(json.dumps(line) + "\n")
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    op, policy, db, valkey_url, prefix, run_id = sys.argv[1:7]
    anyio.run(main, op, policy, db, valkey_url, prefix, run_id, backend_options={"use_uvloop": True})
