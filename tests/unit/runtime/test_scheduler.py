# mypy: allow-untyped-defs
"""``Scheduler`` without a ``Runtime``: the commit invariant, the ready queue, idle runs, drain.

Three doors make a snapshot current: ``Scheduler.spawn_new`` (version 1), the
actor's fast path (a step that leaves the status running) and
``Scheduler.commit`` (everything else). Whichever door a transition takes, the
run's history, the registry's status index, the tiers, the instruments and the
event bus must see the same thing.
"""

from __future__ import annotations

import asyncio
import random
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio

from hotstate._instrument import Instrument, Instruments
from hotstate.actors import (
    RetryPolicy,
    Snapshot,
    Status,
    Step,
    StepContext,
    Transition,
    TransitionKind,
    Workflow,
)
from hotstate.persistence import FlushPolicy, MemoryStore, PickleCodec, Tier
from hotstate.runtime import RestartIntensity
from hotstate.runtime._events import EventBus
from hotstate.runtime._registry import RunRegistry
from hotstate.runtime._scheduler import Scheduler
from hotstate.runtime._supervisor import Supervisor
from hotstate.runtime._timers import TimerService

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

    import pytest

    from hotstate.actors._actor import RunActor
    from hotstate.testing import ManualClock

    Until = Callable[[Callable[[], bool]], Awaitable[None]]


async def inc(payload: int, ctx: StepContext) -> int:
    return payload + 1


async def take(payload: int, ctx: StepContext) -> int:
    return payload + int(ctx.signal)


async def boom(payload: int, ctx: StepContext) -> int:
    raise ValueError("boom")


SIGNAL = Workflow(
    "signal",
    [
        Step(fn=inc, name="a"),
        Step(fn=inc, name="b"),
        Step(fn=take, wait_for="go"),
        Step(fn=inc, name="c"),
    ],
)
FAILING = Workflow("failing", [Step(fn=inc, name="a"), Step(fn=boom, retry=RetryPolicy.never())])


class Witness(Instrument):
    """At each committed transition, checks what the rest of the runtime holds at that moment.

    Instruments run inside ``mark`` (after the tiers were told), so at that point
    the actor, its history and the status index must already show the transition.
    """

    def __init__(self, registry: RunRegistry) -> None:
        self.registry = registry
        self.seen: list[Transition] = []
        self.problems: list[str] = []

    def transition_committed(self, snapshot: Snapshot, transition: Transition) -> None:
        self.seen.append(transition)
        rid = transition.run_id
        actor = self.registry.get(rid)
        if actor is None or actor.snapshot is not snapshot:
            self.problems.append(f"{rid} v{transition.version}: not the actor's current snapshot")
            return
        if snapshot.version != transition.version or snapshot.status is not transition.status:
            self.problems.append(f"{rid} v{transition.version}: snapshot and transition disagree")
        if len(actor.history) != transition.version:
            self.problems.append(f"{rid} v{transition.version}: history holds {len(actor.history)}")
        buckets = [status for status, ids in self.registry.by_status.items() if rid in ids]
        if buckets != [transition.status]:
            self.problems.append(f"{rid} v{transition.version}: status index has it in {buckets}")


class Parts:
    """A scheduler and the parts it is built from."""

    def __init__(
        self,
        clock: ManualClock,
        *,
        tiers: list[Tier] | None = None,
        steps_per_turn: int = 64,
    ) -> None:
        self.registry = RunRegistry()
        self.supervisor = Supervisor(RestartIntensity(), clock, random.Random(1234))
        self.timers = TimerService(clock)
        self.bus = EventBus()
        self.witness = Witness(self.registry)
        self.scheduler = Scheduler(
            self.registry,
            self.supervisor,
            self.timers,
            self.bus,
            clock,
            tiers=tiers or [],
            codec=PickleCodec(b"k" * 32),
            instruments=Instruments([self.witness]),
            steps_per_turn=steps_per_turn,
        )


@asynccontextmanager
async def serving(parts: Parts) -> AsyncIterator[anyio.abc.TaskGroup]:
    """Open the tiers and serve the ready queue and the timers for the block."""
    await parts.scheduler.tiers.open()
    try:
        with anyio.fail_after(5):  # hang guard only: time is the ManualClock's
            async with anyio.create_task_group() as tg:
                await tg.start(parts.timers.run)
                parts.scheduler.start(tg)
                yield tg
                tg.cancel_scope.cancel()  # the timer task; scheduler tasks have finished by now
    finally:
        await parts.scheduler.tiers.aclose()


def drain_subscription(sub: Any) -> list[Transition]:
    out: list[Transition] = []
    while (t := sub.get_nowait()) is not None:
        out.append(t)
    return out


# ---------------------------------------------------------------- the commit invariant


async def test_spawn_the_fast_path_and_commit_leave_history_index_tier_instruments_and_bus_in_agreement(
    clock: ManualClock, until: Until, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = MemoryStore()
    parts = Parts(clock, tiers=[Tier(store, FlushPolicy(interval=60.0))])
    scheduler, registry = parts.scheduler, parts.registry
    sub = parts.bus.subscribe()
    through_commit: list[Transition] = []
    commit = scheduler.commit

    def recording_commit(actor: RunActor, snapshot: Snapshot, transition: Transition) -> None:
        through_commit.append(transition)
        commit(actor, snapshot, transition)

    monkeypatch.setattr(scheduler, "commit", recording_commit)
    async with serving(parts):
        scheduler.spawn_new(SIGNAL, "ok", 0)
        scheduler.spawn_new(FAILING, "bad", 0)
        ok, bad = registry.actor("ok"), registry.actor("bad")
        await until(lambda: ok.snapshot.status is Status.waiting and bad.snapshot.finished)
        ok.accept_signal(scheduler, "go", 10)  # what Runtime.send does
        scheduler.schedule(ok)
        await until(lambda: ok.snapshot.finished)
        await scheduler.tiers.flush()

    assert parts.witness.problems == []
    assert (ok.snapshot.status, ok.snapshot.payload) == (Status.done, 13)
    assert bad.snapshot.status is Status.failed
    ok_history = ok.history.transitions("ok")
    assert [t.kind for t in ok_history] == [
        TransitionKind.spawned,
        TransitionKind.step,
        TransitionKind.step,
        TransitionKind.waiting,
        TransitionKind.signal,
        TransitionKind.step,
        TransitionKind.step,
    ]
    # the three doors: spawn_new took v1, the fast path v3 and v6, commit the status changes
    assert [t.version for t in through_commit if t.run_id == "ok"] == [2, 4, 5, 7]
    bad_history = bad.history.transitions("bad")
    assert [t.kind for t in bad_history] == [
        TransitionKind.spawned,
        TransitionKind.step,
        TransitionKind.step_failed,
        TransitionKind.compensated,
        TransitionKind.failed,
    ]
    published = drain_subscription(sub)
    await store.open()  # closed with the tiers; a MemoryStore keeps its data
    for rid, history in (("ok", ok_history), ("bad", bad_history)):
        assert [t.version for t in history] == list(range(1, len(history) + 1))
        assert [t for t in parts.witness.seen if t.run_id == rid] == history
        assert [t for t in published if t.run_id == rid] == history
        assert await store.history(rid) == history
        stored = await store.load(rid)
        assert stored is not None
        assert stored.header.version == len(history)
    assert scheduler.transitions == len(ok_history) + len(bad_history)
    assert registry.by_status[Status.done] == {"ok": None}
    assert registry.by_status[Status.failed] == {"bad": None}
    assert sum(len(ids) for ids in registry.by_status.values()) == 2
    assert [d.run_id for d in await store.dead_letters()] == ["bad"]
    await store.aclose()


# ---------------------------------------------------------------- the ready queue


async def test_schedule_does_not_queue_an_actor_twice(clock: ManualClock, until: Until) -> None:
    calls: list[int] = []

    async def step(payload: int, ctx: StepContext) -> int:
        calls.append(ctx.step)
        return payload + 1

    parts = Parts(clock)
    scheduler = parts.scheduler
    scheduler.spawn_new(Workflow("w", [Step(fn=step, name=f"s{i}") for i in range(3)]), "r1", 0)
    actor = parts.registry.actor("r1")
    assert scheduler.ready == 1  # not started: the queue holds it
    scheduler.schedule(actor)
    scheduler.schedule(actor)
    assert scheduler.ready == 1
    actor.parked = True
    scheduler.schedule(actor)  # unparks, still not queued twice
    assert (scheduler.ready, actor.parked, actor.queued) == (1, False, True)
    async with serving(parts):
        await until(lambda: actor.snapshot.finished)
        await until(lambda: scheduler.tasks == 0)
    assert calls == [0, 1, 2]
    assert actor.snapshot.version == 4


async def test_an_idle_run_holds_no_task(clock: ManualClock, until: Until) -> None:
    parts = Parts(clock)
    scheduler = parts.scheduler
    async with serving(parts):
        before = len(asyncio.all_tasks())
        scheduler.spawn_new(SIGNAL, "r1", 0)
        actor = parts.registry.actor("r1")
        await until(lambda: actor.snapshot.status is Status.waiting and scheduler.tasks == 0)
        assert scheduler.ready == 0
        assert not actor.queued
        assert not actor.running
        assert actor.host_task is None
        assert len(asyncio.all_tasks()) == before


async def test_a_retrying_run_holds_no_task_until_its_wake_on_the_clock(clock: ManualClock, until: Until) -> None:
    attempts: list[int] = []

    async def flaky(payload: int, ctx: StepContext) -> int:
        attempts.append(ctx.attempt)
        if ctx.attempt == 1:
            raise ConnectionError("later")
        return payload + 1

    retry = RetryPolicy(max_attempts=2, initial_delay=1.0, jitter=0.0)
    parts = Parts(clock)
    scheduler = parts.scheduler
    async with serving(parts):
        scheduler.spawn_new(Workflow("flaky", [Step(fn=flaky, retry=retry)]), "r1", 0)
        actor = parts.registry.actor("r1")
        await until(lambda: actor.snapshot.status is Status.retrying and scheduler.tasks == 0)
        await clock.advance(0.999)
        assert attempts == [1]
        await clock.advance(0.001)
        await until(lambda: actor.snapshot.finished)
    assert attempts == [1, 2]
    assert actor.snapshot.status is Status.done


async def test_pressure_parks_steps_and_its_release_schedules_them_again(clock: ManualClock, until: Until) -> None:
    calls: list[int] = []

    async def step(payload: int, ctx: StepContext) -> int:
        calls.append(ctx.step)
        return payload + 1

    parts = Parts(clock)
    scheduler = parts.scheduler
    scheduler.pressure("slow", True)  # what a tier over its memory bound reports
    assert scheduler.hold
    async with serving(parts):
        scheduler.spawn_new(Workflow("w", [Step(fn=step, name=f"s{i}") for i in range(2)]), "r1", 0)
        actor = parts.registry.actor("r1")
        await until(lambda: actor.parked and scheduler.tasks == 0)
        assert calls == []
        assert scheduler.throttle_waits == 1
        scheduler.pressure("slow", False)
        assert (scheduler.hold, scheduler.ready) == (
            False,
            1,
        )  # released and queued again
        await until(lambda: actor.snapshot.finished)
    assert calls == [0, 1]


# ---------------------------------------------------------------- drain


async def test_drain_with_nothing_in_flight_returns_zero(clock: ManualClock) -> None:
    parts = Parts(clock)
    async with serving(parts):
        assert await parts.scheduler.drain(0) == 0
    assert parts.scheduler.stopping


async def test_drain_returns_the_tasks_still_running_and_starts_no_new_step(clock: ManualClock, until: Until) -> None:
    release = anyio.Event()
    calls: list[int] = []

    async def blocking(payload: int, ctx: StepContext) -> int:
        calls.append(ctx.step)
        await release.wait()
        return payload + 1

    parts = Parts(clock)
    scheduler = parts.scheduler
    async with serving(parts):
        scheduler.spawn_new(Workflow("w", [Step(fn=blocking, name=f"s{i}") for i in range(3)]), "r1", 0)
        actor = parts.registry.actor("r1")
        await until(lambda: calls == [0] and scheduler.tasks == 1)
        assert await scheduler.drain(0) == 1  # the deadline has passed at once: one step still in flight
        release.set()
        assert await scheduler.drain(5) == 0  # 5 s is a hang guard: the step returns at the next checkpoint
        scheduler.schedule(actor)
        assert scheduler.tasks == 0  # closed: a scheduled run starts no task
    assert calls == [0]  # the step in flight finished; no new one started
    assert (actor.snapshot.step, actor.snapshot.status) == (1, Status.running)
