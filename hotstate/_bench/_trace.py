"""The trace a SIGKILLed child leaves behind: what its memory held, for the judge in ``_crash.py``.

The child writes into a ``MAP_SHARED`` mmap of a file the parent created: the
kernel keeps the pages when the process dies, and a write costs no syscall.
Layout (float64 slots), see ``TraceLayout``:

- header: ready time, commits, runs started and finished, and per tier the
  flush durations and when the tier's last store write started and ended;
- per run: the newest version known durable (polled every few ms from
  ``Runtime.durable_versions``), the newest version a step started from (under
  write-through that version is durable: acknowledged), the newest committed
  version and its step, and the ``time.monotonic()`` at which each version was
  committed.

``TraceWriter`` is a ``hotstate.Instrument``: the runtime calls it on every
committed transition and around every store write of a flush, so the step path
gains one clock read and four array writes, and nothing is patched.
"""

from __future__ import annotations

import mmap
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio

from hotstate import Instrument

if TYPE_CHECKING:
    from pathlib import Path

    from hotstate import Runtime, Snapshot, StepContext, Transition

_monotonic = time.monotonic


@dataclass(frozen=True, slots=True)
class TraceLayout:
    """Where each figure lives in the shared trace file (indexes of float64 slots).

    Attributes:
        runs: run slots reserved (run indexes ``0 .. runs - 1``).
        versions: versions with a commit-time slot per run (higher ones are
            counted but not timed).
    """

    runs: int
    versions: int = 48

    HEADER = 64
    READY = 0  # monotonic time the workload started (0 until then)
    COMMITS = 1  # transitions committed so far
    STARTED = 2  # run indexes handed out so far
    FINISHED = 3  # runs finished (done or failed) so far
    TIERS = 8  # per tier j at 8 + 4j: last flush duration, longest flush duration, last save start, last save end
    DURABLE = 0  # per run: newest version known durable in some tier
    ACKED = 1  # per run: newest version a step started from
    HOT = 2  # per run: newest committed version
    STEP = 3  # per run: the step cursor of the newest committed version
    TIMES = 4  # per run: commit time of version v at TIMES + v

    @property
    def stride(self) -> int:
        """Slots per run."""
        return self.TIMES + self.versions + 1

    @property
    def size(self) -> int:
        """File size in bytes."""
        return (self.HEADER + self.runs * self.stride) * 8

    def base(self, index: int) -> int:
        """First slot of run ``index``."""
        return self.HEADER + index * self.stride


@dataclass(slots=True)
class Trace:
    """What a trace file held (read by the parent after the kill); per-run lists are by run index."""

    ready: float  # monotonic time the workload started (0: never)
    commits: int  # transitions committed
    started: int  # run indexes handed out
    flush: list[tuple[float, float, float, float]]  # per tier: last and longest flush, last write's start and end
    durable: list[int]  # the newest version known durable
    acked: list[int]  # the newest version a step started from
    hot: list[int]  # the newest committed version (0: never spawned)
    times: list[list[float]]  # commit time by version (0.0: not committed, or not timed)
    steps: list[int]  # the step cursor of the newest committed version


def read_trace(path: Path, layout: TraceLayout, tiers: int) -> Trace:
    """Read a trace file written with ``layout`` by a child with ``tiers`` tiers."""
    slots = memoryview(path.read_bytes()).cast("d")
    started = min(int(slots[layout.STARTED]), layout.runs)
    flush = [
        (
            slots[layout.TIERS + 4 * j],
            slots[layout.TIERS + 4 * j + 1],
            slots[layout.TIERS + 4 * j + 2],
            slots[layout.TIERS + 4 * j + 3],
        )
        for j in range(tiers)
    ]
    durable, acked, hot, times, steps = [], [], [], [], []
    for i in range(started):
        b = layout.base(i)
        durable.append(int(slots[b + layout.DURABLE]))
        acked.append(int(slots[b + layout.ACKED]))
        hot.append(int(slots[b + layout.HOT]))
        steps.append(int(slots[b + layout.STEP]))
        times.append(list(slots[b + layout.TIMES : b + layout.stride]))
    return Trace(slots[layout.READY], int(slots[layout.COMMITS]), started, flush, durable, acked, hot, times, steps)


class TraceWriter(Instrument):
    """The child's side of the trace: an instrument of its runtime, and the durability poller.

    Args:
        path: the trace file the parent created (``layout.size`` bytes).
        layout: its layout.
        tiers: the runtime's tier names, in order.
    """

    def __init__(self, path: str, layout: TraceLayout, tiers: list[str]) -> None:
        self.layout = layout
        self._file = open(path, "r+b")  # noqa: SIM115 - closed by close()
        self._map = mmap.mmap(self._file.fileno(), layout.size, flags=mmap.MAP_SHARED)
        self.slots = memoryview(self._map).cast("d")
        self._tiers = {name: TraceLayout.TIERS + 4 * j for j, name in enumerate(tiers)}
        self._bases: dict[str, int] = {}  # run id -> its first slot
        self._unsettled: dict[str, int] = {}  # run id -> first slot, until finished and durable

    def register(self, rid: str, index: int) -> None:
        """Give run ``rid`` the slots of run ``index`` (before it is spawned or resumed)."""
        self._bases[rid] = self._unsettled[rid] = self.layout.base(index)

    def transition_committed(self, snapshot: Snapshot, transition: Transition) -> None:
        """Stamp the version's commit time, the run's newest version and step, and the commit count."""
        base = self._bases.get(snapshot.run_id)
        if base is None:
            return  # not one of the workload's runs
        slots, v = self.slots, snapshot.version
        if v <= self.layout.versions:
            slots[base + TraceLayout.TIMES + v] = _monotonic()
        slots[base + TraceLayout.HOT] = v
        slots[base + TraceLayout.STEP] = snapshot.step
        slots[TraceLayout.COMMITS] += 1

    def save_started(self, tier: str) -> None:
        """Stamp the start of a store write: newer than its end at the kill means a write in flight."""
        if (at := self._tiers.get(tier)) is not None:
            self.slots[at + 2] = _monotonic()

    def save_finished(self, tier: str, error: BaseException | None) -> None:
        """Stamp the end of a store write."""
        if (at := self._tiers.get(tier)) is not None:
            self.slots[at + 3] = _monotonic()

    def step_started(self, ctx: StepContext) -> None:
        """A step started from ``ctx.version``: under write-through that version was acknowledged."""
        slot = self._bases[ctx.run_id] + TraceLayout.ACKED
        if ctx.version > self.slots[slot]:
            self.slots[slot] = ctx.version

    async def poll(self, rt: Runtime, period: float) -> None:
        """Record what is durable, and the tiers' flush durations, every ``period`` seconds; until cancelled."""
        slots, unsettled = self.slots, self._unsettled
        while True:
            t0 = time.perf_counter()
            for j, stats in enumerate(rt.tier_statistics()):
                slots[TraceLayout.TIERS + 4 * j] = stats.last_flush_duration
                slots[TraceLayout.TIERS + 4 * j + 1] = stats.max_flush_duration
            for rid, base in list(unsettled.items()):
                try:
                    versions = rt.durable_versions(rid)
                except LookupError:
                    continue  # registered, not spawned yet
                hot = versions.pop("hot")
                durable = max(versions.values(), default=0)
                if durable > slots[base + TraceLayout.DURABLE]:
                    slots[base + TraceLayout.DURABLE] = durable
                if durable >= hot and rt.get(rid).finished:
                    del unsettled[rid]
            # The child's own cadence (the parent never waits on it), stretched so
            # polling costs the workload at most ~10% when many runs are unsettled.
            await anyio.sleep(max(period, 9 * (time.perf_counter() - t0)))

    def close(self) -> None:
        """Unmap and close the file (the pages stay in it)."""
        self.slots.release()
        self._map.close()
        self._file.close()
