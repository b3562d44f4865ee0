"""W1: N runs started concurrently x K steps, against a bare asyncio ceiling in the same process.

Payload ``{"n": int, "id": str, "blob": 200-character str}``; each step returns a
new payload with ``n + 1``. The ceiling is a bare loop with one task per run
awaiting the same step function K times with one ``await asyncio.sleep(0)`` per
step. Speed is reported as steps/s and as a ratio to the ceiling.
"""

from __future__ import annotations

import asyncio
import gc
import statistics
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio

from hotstate import RunHandle, Runtime, Status, StepContext, Workflow

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

BLOB = "x" * 200


async def step(payload: dict[str, Any], ctx: StepContext | None = None) -> dict[str, Any]:
    """The W1 step: a new payload with n + 1."""
    return {"n": payload["n"] + 1, "id": payload["id"], "blob": payload["blob"]}


def workflow(k: int) -> Workflow:
    """The W1 workflow of ``k`` steps."""
    return Workflow("w1", [step] * 1 if k == 1 else [_named(i) for i in range(k)])


def _named(i: int) -> Callable[[dict[str, Any], StepContext], Awaitable[dict[str, Any]]]:
    async def fn(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        return {"n": payload["n"] + 1, "id": payload["id"], "blob": payload["blob"]}

    fn.__name__ = f"step{i}"
    return fn


async def ceiling(n: int, k: int) -> float:
    """Bare asyncio: one task per run, K awaited steps with one sleep(0) each; steps/s."""

    async def run(i: int) -> None:
        p = {"n": 0, "id": f"r{i}", "blob": BLOB}
        for _ in range(k):
            p = await step(p)
            await asyncio.sleep(0)
        assert p["n"] == k  # noqa: S101

    gc.collect()
    t0 = time.perf_counter()
    async with asyncio.TaskGroup() as tg:
        for i in range(n):
            tg.create_task(run(i))
    return n * k / (time.perf_counter() - t0)


async def hotstate_run(
    n: int, k: int, *, on_done: Callable[[Runtime], None] | None = None, **runtime_options: Any
) -> float:
    """hotstate: N concurrent spawns, wait until every run is done; steps/s.

    Memory-only by default; pass ``tiers=[...]`` for a persistence policy.
    ``on_done(runtime)`` is called once every run is done, before the runtime
    closes (the scale suite samples memory there).
    """
    wf = workflow(k)
    gc.collect()
    async with Runtime([wf], **runtime_options) as rt:
        t0 = time.perf_counter()
        tiers = runtime_options.get("tiers", ())
        if runtime_options.get("ack_tiers") or any(t.policy.write_through for t in tiers):
            # Each spawn returns once its first snapshot is durable: N concurrent
            # callers (as N web requests would be) share the group commits.
            handles: list[RunHandle] = []
            async with anyio.create_task_group() as tg:

                async def spawn(i: int) -> None:
                    handles.append(await rt.spawn(wf, {"n": 0, "id": f"r{i}", "blob": BLOB}))

                for i in range(n):
                    tg.start_soon(spawn, i)
        else:
            handles = [await rt.spawn(wf, {"n": 0, "id": f"r{i}", "blob": BLOB}) for i in range(n)]
        for h in handles:
            await h.wait_finished()
        elapsed = time.perf_counter() - t0
        assert rt.count(status=Status.done) == n  # noqa: S101
        assert all(h.snapshot.payload["n"] == k for h in handles)  # noqa: S101
        if on_done is not None:
            on_done(rt)
    return n * k / elapsed


@dataclass(frozen=True, slots=True)
class W1Result:
    """Medians of several rounds."""

    n: int
    k: int
    rounds: int
    ceiling_steps_s: float
    hotstate_steps_s: float

    @property
    def ratio(self) -> float:
        """hotstate over the ceiling."""
        return self.hotstate_steps_s / self.ceiling_steps_s


async def measure(n: int = 10_000, k: int = 10, rounds: int = 5) -> W1Result:
    """Alternate ceiling and hotstate rounds and return the medians."""
    await hotstate_run(min(n, 1000), k)  # warm-up: imports, code paths
    await ceiling(min(n, 1000), k)
    ceil, hot = [], []
    for _ in range(rounds):
        ceil.append(await ceiling(n, k))
        hot.append(await hotstate_run(n, k))
    return W1Result(n, k, rounds, statistics.median(ceil), statistics.median(hot))
