"""The child side of the SIGKILL crash trials (``_crash.py`` is the parent).

Run as ``python -m hotstate._bench._crash_child --policy SPEC --mmap PATH ...``.
It runs a mixed workload under one flush policy until the parent SIGKILLs it:
``inflight`` runs at a time of a workflow that reserves, passes a step that
fails transiently on its first attempt (every ``flaky_every``-th run), waits for
a ``paid`` signal (sent by a driver task), does ``work_steps`` steps and ships;
every ``fail_every``-th run fails for good at ``ship``, is compensated and
dead-lettered.

What the parent needs after the kill is written to a ``MAP_SHARED`` mmap of a
file: the kernel keeps the pages when the process dies, and a write costs no
syscall. Layout (float64 slots), see ``TraceLayout``:

- header: ready time, commits, runs started, and per tier the flush durations
  and when the last ``Store.save`` started and ended;
- per run: the newest version known durable (polled every few ms from
  ``Runtime.durable_versions``), the newest version a step started from (under
  write-through that version is durable: acknowledged), the newest committed
  version, and the ``time.monotonic()`` at which each version was committed.

Commit times are taken by wrapping ``Runtime.mark`` (called once per committed
transition, before the persister sees it), so nothing is added to the step path
beyond one clock read and three array writes.
"""

from __future__ import annotations

import argparse
import contextlib
import mmap
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio

from hotstate import (
    FlushPolicy,
    RetryPolicy,
    RunFailedError,
    Runtime,
    Status,
    Step,
    StepContext,
    Tier,
    Workflow,
)
from hotstate.persistence import SQLiteStore, ValkeyStore

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from pathlib import Path

    from hotstate import Snapshot, Transition
    from hotstate.persistence import SaveResult, StoredSnapshot

WORKFLOW = "crash-trial"
SIGNAL = "paid"


# ------------------------------------------------------------------- layout

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
    TIMES = 3  # per run: commit time of version v at TIMES + v

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
    """What a trace file held (read by the parent after the kill).

    Attributes:
        ready: monotonic time the workload started (0: never).
        commits: transitions committed.
        started: run indexes handed out.
        flush: per tier, the last and the longest flush duration reported, and
            when the tier's last ``Store.save`` started and ended (monotonic; 0: none).
        durable: per run, the newest version known durable.
        acked: per run, the newest version a step started from.
        hot: per run, the newest committed version (0: never spawned).
        times: per run, commit time by version (0.0: not committed or not timed).
    """

    ready: float
    commits: int
    started: int
    flush: list[tuple[float, float, float, float]]
    durable: list[int]
    acked: list[int]
    hot: list[int]
    times: list[list[float]]


def read_trace(path: Path, layout: TraceLayout, tiers: int) -> Trace:
    """Read a trace file written with ``layout`` by a child with ``tiers`` tiers."""
    slots = memoryview(path.read_bytes()).cast("d")
    started = min(int(slots[layout.STARTED]), layout.runs)
    flush = [(slots[layout.TIERS + 4 * j], slots[layout.TIERS + 4 * j + 1], slots[layout.TIERS + 4 * j + 2],
              slots[layout.TIERS + 4 * j + 3]) for j in range(tiers)]
    durable, acked, hot, times = [], [], [], []
    for i in range(started):
        b = layout.base(i)
        durable.append(int(slots[b + layout.DURABLE]))
        acked.append(int(slots[b + layout.ACKED]))
        hot.append(int(slots[b + layout.HOT]))
        times.append(list(slots[b + layout.TIMES : b + layout.stride]))
    return Trace(slots[layout.READY], int(slots[layout.COMMITS]), started, flush, durable, acked, hot, times)


def run_id(index: int) -> str:
    """The run id of run ``index`` (parsed back by ``run_index``)."""
    return f"r{index:07d}"


def run_index(rid: str) -> int:
    """The index of run id ``rid``."""
    return int(rid[1:])


# ----------------------------------------------------------------- workflow

class TransientError(Exception):
    """Raised by the flaky step on its first attempt; retried."""


class PermanentError(Exception):
    """Raised by ``ship`` for the runs designed to fail; not retried."""


def fails_for_good(index: int, fail_every: int) -> bool:
    """True for the runs designed to fail, be compensated and dead-lettered."""
    return fail_every > 0 and index % fail_every == fail_every - 1


def make_workflow(
    *,
    work_steps: int,
    fail_every: int,
    flaky_every: int,
    request_signal: Callable[[str], None],
    on_step: Callable[[StepContext], None] | None = None,
) -> Workflow:
    """The trial workflow; the parent's recovery runtime builds the same one.

    Args:
        work_steps: plain steps between the signal and ``ship``.
        fail_every: every this many runs fail for good at ``ship`` (0: none).
        flaky_every: every this many runs fail once, transiently, at ``flaky``.
        request_signal: called with the run id when the run is about to wait
            for its ``paid`` signal (the driver sends it).
        on_step: called with the context at the start of every step.

    Returns:
        The workflow.
    """
    note = on_step if on_step is not None else (lambda _ctx: None)

    async def reserve(p: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        note(ctx)
        return {**p, "n": p["n"] + 1, "reserved": True}

    async def release(p: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        return {**p, "reserved": False}

    async def flaky(p: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        note(ctx)
        if flaky_every > 0 and p["i"] % flaky_every == 0 and ctx.attempt == 1:
            raise TransientError(f"{ctx.run_id}: transient failure, attempt {ctx.attempt}")
        return {**p, "n": p["n"] + 1}

    async def request(p: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        note(ctx)
        request_signal(ctx.run_id)
        return {**p, "n": p["n"] + 1}

    async def pay(p: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        note(ctx)
        return {**p, "n": p["n"] + 1, "paid": ctx.signal}

    async def refund(p: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        return {**p, "paid": None, "refunded": True}

    async def work(p: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        note(ctx)
        return {**p, "n": p["n"] + 1, "key": ctx.idempotency_key}

    async def ship(p: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        note(ctx)
        if fails_for_good(p["i"], fail_every):
            raise PermanentError(f"{ctx.run_id}: cannot ship")
        return {**p, "n": p["n"] + 1, "shipped": True}

    quick = RetryPolicy(max_attempts=3, initial_delay=0.002, max_delay=0.01)
    steps = [
        Step(fn=reserve, compensate=release),
        Step(fn=flaky, retry=quick),
        Step(fn=request),
        Step(fn=pay, wait_for=SIGNAL, compensate=refund),
        *[Step(fn=work, name=f"work{j}") for j in range(work_steps)],
        Step(fn=ship, retry=RetryPolicy(max_attempts=3, initial_delay=0.002, non_retryable=(PermanentError,))),
    ]
    return Workflow(WORKFLOW, steps)


def payload(index: int) -> dict[str, Any]:
    """The initial payload of run ``index``."""
    return {"i": index, "n": 0, "blob": "x" * 100}


class SignalDriver:
    """Sends ``paid`` to the runs that asked for it (the workflow's ``request`` step calls ``request``)."""

    def __init__(self) -> None:
        self.queue: list[str] = []
        self.event = anyio.Event()

    def request(self, rid: str) -> None:
        """Queue ``rid`` for its signal."""
        self.queue.append(rid)
        self.event.set()

    async def serve(self, rt: Runtime) -> None:
        """Send the queued signals as they come; until cancelled."""
        while True:
            if not self.queue:
                await self.event.wait()
            self.event = anyio.Event()
            batch, self.queue = self.queue, []
            for rid in batch:
                if not rt.get(rid).finished:
                    await rt.send(rid, SIGNAL, {"amount": run_index(rid)})

    async def drive(self, rt: Runtime, run_ids: list[str]) -> None:
        """Signal every run that waits (now or later) until all of ``run_ids`` have finished."""
        for snap in rt.list_runs(status=Status.waiting):
            self.request(snap.run_id)

        async def finish(rid: str) -> None:
            with contextlib.suppress(RunFailedError):  # the runs designed to fail
                await rt.wait_finished(rid)

        async with anyio.create_task_group() as tg:
            tg.start_soon(self.serve, rt)
            async with anyio.create_task_group() as waiters:
                for rid in run_ids:
                    waiters.start_soon(finish, rid)
            tg.cancel_scope.cancel()


# ------------------------------------------------------------------- policy

def parse_policy(spec: str) -> list[tuple[str, float | None]]:
    """``"valkey:0.01,sqlite:1"`` -> ``[("valkey", 0.01), ("sqlite", 1.0)]``; ``through`` -> None.

    Raises:
        ValueError: an unknown tier or a bad interval.
    """
    out: list[tuple[str, float | None]] = []
    for part in spec.split(","):
        kind, _, value = part.strip().partition(":")
        if kind not in ("valkey", "sqlite"):
            raise ValueError(f"unknown tier {kind!r} in policy {spec!r}")
        out.append((kind, None if value == "through" else float(value)))
    return out


def build_tiers(spec: str, *, sqlite_path: str, valkey_url: str, prefix: str) -> list[Tier]:
    """The tiers a policy spec describes (write-through SQLite uses ``synchronous=FULL``).

    Raises:
        ValueError: a bad spec.
    """
    tiers: list[Tier] = []
    for kind, interval in parse_policy(spec):
        policy = FlushPolicy.through() if interval is None else FlushPolicy(interval=interval)
        if kind == "sqlite":
            store: SQLiteStore | ValkeyStore = SQLiteStore(sqlite_path, synchronous="FULL" if interval is None else "NORMAL")
        else:
            store = ValkeyStore(valkey_url, prefix=prefix)
        tiers.append(Tier(store, policy))
    return tiers


# -------------------------------------------------------------------- child

class _Trace:
    """The child's writer of the shared trace."""

    def __init__(self, path: str, layout: TraceLayout) -> None:
        self.layout = layout
        self._file = open(path, "r+b")  # noqa: SIM115 - closed by close()
        self._map = mmap.mmap(self._file.fileno(), layout.size, flags=mmap.MAP_SHARED)
        self.slots = memoryview(self._map).cast("d")

    def wrap_mark(self, mark: Callable[[Snapshot, Transition], None]) -> Callable[[Snapshot, Transition], None]:
        slots = self.slots
        header, stride, times, hot, top = TraceLayout.HEADER, self.layout.stride, TraceLayout.TIMES, TraceLayout.HOT, self.layout.versions
        commits = TraceLayout.COMMITS
        now = time.monotonic

        def traced(snapshot: Snapshot, transition: Transition) -> None:
            base = header + int(snapshot.run_id[1:]) * stride
            v = snapshot.version
            if v <= top:
                slots[base + times + v] = now()
            slots[base + hot] = v
            slots[commits] += 1
            mark(snapshot, transition)

        return traced

    def trace_saves(self, store: SQLiteStore | ValkeyStore, tier: int) -> None:
        """Stamp when each ``save`` of ``store`` starts and ends (the write of a flush).

        The persister calls ``store.save`` once per chunk, after encoding it, so
        a start stamp newer than the end stamp at the kill means a write in flight.
        """
        inner = store.save
        slots = self.slots
        at = TraceLayout.TIERS + 4 * tier + 2
        now = time.monotonic

        async def save(snapshots: Sequence[StoredSnapshot], transitions: Sequence[Transition]) -> SaveResult:
            slots[at] = now()
            try:
                return await inner(snapshots, transitions)
            finally:
                slots[at + 1] = now()

        store.save = save  # type: ignore[method-assign]  # the benchmark's own store objects only

    def on_step(self, ctx: StepContext) -> None:
        slot = self.layout.base(run_index(ctx.run_id)) + TraceLayout.ACKED
        if ctx.version > self.slots[slot]:
            self.slots[slot] = ctx.version

    def close(self) -> None:
        self.slots.release()
        self._map.close()
        self._file.close()


async def _poll(rt: Runtime, trace: _Trace, unsettled: dict[str, int], period: float) -> None:
    """Record what is durable, and the tiers' flush durations, every ``period`` seconds."""
    slots = trace.slots
    layout = trace.layout
    while True:
        t0 = time.perf_counter()
        for j, stats in enumerate(rt.tier_statistics()):
            slots[TraceLayout.TIERS + 4 * j] = stats.last_flush_duration
            slots[TraceLayout.TIERS + 4 * j + 1] = stats.max_flush_duration
        for rid, index in list(unsettled.items()):
            versions = rt.durable_versions(rid)
            hot = versions.pop("hot")
            durable = max(versions.values(), default=0)
            slot = layout.base(index) + TraceLayout.DURABLE
            if durable > slots[slot]:
                slots[slot] = durable
            if durable >= hot and rt.get(rid).finished:
                del unsettled[rid]
        # The child's own cadence (the parent never waits on it), stretched so
        # polling costs the workload at most ~10% when many runs are unsettled.
        await anyio.sleep(max(period, 9 * (time.perf_counter() - t0)))


async def child_main(args: argparse.Namespace) -> None:
    """Run the workload until killed (or until ``max_runs`` runs finished)."""
    layout = TraceLayout(args.max_runs, args.versions)
    trace = _Trace(args.mmap, layout)
    driver = SignalDriver()
    wf = make_workflow(work_steps=args.work_steps, fail_every=args.fail_every, flaky_every=args.flaky_every,
                       request_signal=driver.request, on_step=trace.on_step)
    tiers = build_tiers(args.policy, sqlite_path=args.sqlite, valkey_url=args.valkey_url, prefix=args.prefix)
    for j, tier in enumerate(tiers):
        assert isinstance(tier.store, SQLiteStore | ValkeyStore)  # noqa: S101 - built just above
        trace.trace_saves(tier.store, j)
    slots = trace.slots
    unsettled: dict[str, int] = {}
    async with Runtime([wf], tiers=tiers, shutdown_timeout=1.0) as rt:
        assert rt.mark is not None  # noqa: S101 - a policy always has a tier
        rt.mark = trace.wrap_mark(rt.mark)

        async def worker() -> None:
            while slots[TraceLayout.STARTED] < layout.runs:
                index = int(slots[TraceLayout.STARTED])
                slots[TraceLayout.STARTED] = index + 1
                rid = run_id(index)
                handle = await rt.spawn(wf, payload(index), run_id=rid)
                unsettled[rid] = index
                with contextlib.suppress(RunFailedError):  # the runs designed to fail
                    await handle.wait_finished()
                slots[TraceLayout.FINISHED] += 1
                if args.pace > 0:
                    await anyio.sleep(args.pace)  # the workload's offered load, not a synchronisation

        async with anyio.create_task_group() as tg:
            tg.start_soon(driver.serve, rt)
            tg.start_soon(_poll, rt, trace, unsettled, args.poll)
            slots[TraceLayout.READY] = time.monotonic()
            print("ready", flush=True)
            async with anyio.create_task_group() as workers:
                for _ in range(args.inflight):
                    workers.start_soon(worker)
            print("finished", flush=True)
            # Out of run slots: wait for the kill (a crash, as in every trial),
            # but never outlive a parent that died without killing us.
            with anyio.move_on_after(args.linger):
                await anyio.sleep_forever()
            tg.cancel_scope.cancel()
    trace.close()


def parser() -> argparse.ArgumentParser:
    """The child's command line."""
    p = argparse.ArgumentParser(prog="python -m hotstate._bench._crash_child", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", required=True, help='tiers, e.g. "valkey:0.01,sqlite:1" or "sqlite:through"')
    p.add_argument("--mmap", required=True, help="the trace file the parent created (TraceLayout.size bytes)")
    p.add_argument("--sqlite", required=True, help="SQLite file")
    p.add_argument("--valkey-url", default="", help="Valkey URL")
    p.add_argument("--prefix", default="hs-crash", help="Valkey key prefix")
    p.add_argument("--max-runs", type=int, required=True, help="run slots in the trace")
    p.add_argument("--versions", type=int, default=TraceLayout(0).versions, help="timed versions per run")
    p.add_argument("--inflight", type=int, default=64, help="runs in flight at once")
    p.add_argument("--work-steps", type=int, default=6, help="plain steps after the signal")
    p.add_argument("--fail-every", type=int, default=10, help="every N-th run fails for good")
    p.add_argument("--flaky-every", type=int, default=3, help="every N-th run fails once, transiently")
    p.add_argument("--pace", type=float, default=0.0, help="seconds each worker rests between runs (0: flat out)")
    p.add_argument("--poll", type=float, default=0.005, help="seconds between durability polls")
    p.add_argument("--linger", type=float, default=120.0, help="seconds to wait for the kill once out of run slots")
    p.add_argument("--no-uvloop", action="store_true", help="plain asyncio")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the child process."""
    from hotstate import run

    args = parser().parse_args(argv)
    run(child_main, args, use_uvloop=not args.no_uvloop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
