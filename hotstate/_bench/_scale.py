"""Scale suites: memory per idle run, and steps/s and memory per run from 1,000 to 1,000,000 runs.

Memory is the growth of the process's resident set (``/proc/self/statm``, after
a full collection) divided by the number of runs, so it counts everything a run
costs: actor, snapshot, history, indexes, handle, allocator slack. The idle
workload's payload is ``None`` so the figure is hotstate's own overhead; the
scale curve uses the W1 payload (a 200-character string and two fields), whose
size is reported beside it.

Targets (issue #4): at most 1 KiB per idle run; steps/s at 1,000,000 runs at
least 0.8x steps/s at 1,000 runs. Each point also measures the bare asyncio
loop (one task per run, as in W1) at the same size, so the curve shows how much
of the drop at large sizes the interpreter and the memory hierarchy cause for
any asyncio program, and how much is hotstate's.
"""

from __future__ import annotations

import gc
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel

from hotstate import Runtime, Status, Step, StepContext, Workflow
from hotstate._bench import _w1 as w1

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

IDLE_TARGET_BYTES = 1024
SCALE_TARGET_RATIO = 0.8


def rss_bytes() -> int:
    """This process's resident set size (Linux ``/proc``; ``ru_maxrss`` elsewhere)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: the peak is the best portable figure
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


async def _go(payload: Any, ctx: StepContext) -> Any:
    return payload


IDLE_WORKFLOW = Workflow("idle", [Step(fn=_go, wait_for="go")])


@dataclass(frozen=True, slots=True)
class IdleResult:
    """Memory of ``runs`` runs parked on a signal wait (no task each)."""

    runs: int
    bytes_per_run: float
    spawn_seconds: float

    @property
    def within_target(self) -> bool:
        """At most 1 KiB per idle run."""
        return self.bytes_per_run <= IDLE_TARGET_BYTES


async def idle_memory(runs: int) -> IdleResult:
    """Spawn ``runs`` runs that wait for a signal; RSS growth per run."""
    async with Runtime([IDLE_WORKFLOW]) as rt:
        await rt.spawn(IDLE_WORKFLOW, None)  # warm every code path and lazily built table
        gc.collect()
        before = rss_bytes()
        t0 = time.perf_counter()
        for _ in range(runs):
            await rt.spawn(IDLE_WORKFLOW, None)
        for _ in range(1000):  # let every run reach its signal wait (and drop its task)
            if rt.count(status=Status.waiting) == runs + 1:
                break
            await anyio.lowlevel.checkpoint()
        else:
            raise RuntimeError(f"expected {runs + 1} waiting runs, found {rt.count(status=Status.waiting)}")
        seconds = time.perf_counter() - t0
        gc.collect()
        grown = rss_bytes() - before
    return IdleResult(runs, grown / runs, seconds)


@dataclass(frozen=True, slots=True)
class ScalePoint:
    """W1 (K steps per run) at one population size."""

    runs: int
    steps_per_s: float
    bytes_per_run: float
    payload_bytes: int
    ceiling_steps_per_s: float


def w1_payload_bytes() -> int:
    """The W1 payload's own size (dict + its strings), shown beside memory per run."""
    p = {"n": 0, "id": "r0000000", "blob": w1.BLOB}
    return sys.getsizeof(p) + sum(sys.getsizeof(v) for v in p.values())


async def scale_point(runs: int, k: int, rounds: int) -> ScalePoint:
    """Median W1 steps/s at ``runs`` runs, the RSS growth per run of one round, and the bare loop at the same size."""
    rates = []
    ceilings = []
    samples: list[int] = []

    def sample(rt: Runtime) -> None:
        samples.append(rss_bytes())

    per_run = 0.0
    for r in range(rounds):
        gc.collect()
        before = rss_bytes()
        rates.append(await w1.hotstate_run(runs, k, on_done=sample))
        if r == 0:
            per_run = (samples[0] - before) / runs
        gc.collect()
        ceilings.append(await w1.ceiling(runs, k))
    return ScalePoint(runs, statistics.median(rates), per_run, w1_payload_bytes(), statistics.median(ceilings))


async def scale_curve(
    sizes: Sequence[int],
    k: int,
    rounds: int,
    progress: Callable[[int, int, str], None] | None = None,
) -> list[ScalePoint]:
    """W1 at each size in ``sizes`` (smallest first)."""
    points = []
    for i, n in enumerate(sizes):
        if progress is not None:
            progress(i, len(sizes), f"N={n:,}")
        points.append(await scale_point(n, k, rounds if n < 500_000 else 1))
    if progress is not None:
        progress(len(sizes), len(sizes), "")
    return points
