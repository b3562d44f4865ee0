# mypy: allow-untyped-defs
"""``RunActor.turn`` driven directly by a recording ``ActorHost``: no runtime, no scheduler, no time.

The host does what the protocol asks and nothing more: ``commit`` makes the
snapshot current and appends to the history, ``mark`` and ``publish`` record,
``retry_delay`` answers from a script.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

from hotstate import StepResultError
from hotstate.actors import (
    Finish,
    Snapshot,
    Status,
    Step,
    StepContext,
    Transition,
    TransitionKind,
    Workflow,
)
from hotstate.actors._actor import RunActor
from hotstate.actors._history import History

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

WALL = 1_700_000_000.0


class RecordingBus:
    """The ``Publisher`` the actor sees: records what it publishes."""

    def __init__(self, count: int = 0) -> None:
        self.count = count
        self.published: list[tuple[Transition, str]] = []

    def publish(self, transition: Transition, workflow: str) -> None:
        self.published.append((transition, workflow))


class RecordingHost:
    """An ``ActorHost`` that records commits, marks, decisions and finished runs.

    Args:
        delays: what ``retry_delay`` answers, in order (None: give up).
        wait_from: ``must_wait`` answers True from this version on (None: never).
    """

    def __init__(self, delays: Iterable[float | None] = (), *, wait_from: int | None = None) -> None:
        self.stopping = False
        self.hold = False
        self.mark: Callable[[Snapshot, Transition], None] | None = self._mark
        self._bus = RecordingBus()
        self.delays = list(delays)
        self.wait_from = wait_from
        self.marks: list[tuple[Snapshot, Transition]] = []
        self.commits: list[tuple[Snapshot, Transition]] = []
        self.retry_asked: list[tuple[str, Exception]] = []
        self.wakes: list[float] = []
        self.must_wait_calls: list[int] = []
        self.armed: list[float] = []
        self.disarmed: list[object] = []
        self.finished_runs: list[tuple[str, Status]] = []
        self.wall_calls = 0

    def _mark(self, snapshot: Snapshot, transition: Transition) -> None:
        self.marks.append((snapshot, transition))

    @property
    def bus(self) -> RecordingBus:
        return self._bus

    def must_wait(self, actor: RunActor, version: int) -> bool:
        self.must_wait_calls.append(version)
        return self.wait_from is not None and version >= self.wait_from

    def commit(self, actor: RunActor, snapshot: Snapshot, transition: Transition) -> None:
        actor.snapshot = snapshot
        actor.history.add(transition)
        self.commits.append((snapshot, transition))

    def wall(self) -> float:
        self.wall_calls += 1
        return WALL + self.wall_calls

    def retry_delay(self, actor: RunActor, step: Step, exc: Exception) -> float | None:
        self.retry_asked.append((step.name, exc))
        return self.delays.pop(0)

    def schedule_wake(self, actor: RunActor, delay: float) -> None:
        self.wakes.append(delay)

    def arm_timeout(self, actor: RunActor, timeout: float) -> object:
        self.armed.append(timeout)
        return ("timer", timeout)

    def disarm(self, handle: object) -> None:
        self.disarmed.append(handle)

    def finished(self, actor: RunActor) -> None:
        self.finished_runs.append((actor.run_id, actor.snapshot.status))

    def transitions(self) -> list[Transition]:
        """Every transition the actor produced, through either door, by version."""
        return sorted((t for _, t in self.marks + self.commits), key=lambda t: t.version)


def new_actor(workflow: Workflow, payload: Any, run_id: str = "r1") -> RunActor:
    """A run at version 1 (pending), as spawn leaves it."""
    snap = Snapshot(
        run_id,
        workflow.name,
        workflow.version,
        1,
        0,
        Status.pending,
        payload,
        None,
        WALL,
        1,
        (),
    )
    spawned = Transition(run_id, 1, TransitionKind.spawned, 0, Status.pending, WALL, None)
    return RunActor(workflow, snap, History(0, spawned))


def counting_workflow(n: int, calls: list[int], name: str = "count") -> Workflow:
    """``n`` plain async steps; each appends its index to ``calls`` and adds one to the payload."""

    async def step(payload: int, ctx: StepContext) -> int:
        calls.append(ctx.step)
        return payload + 1

    return Workflow(name, [Step(fn=step, name=f"s{i}") for i in range(n)])


# ---------------------------------------------------------------- the fast path


async def test_steps_run_inline_and_the_fast_path_marks_each_transition_with_consecutive_versions():
    calls: list[int] = []
    actor = new_actor(counting_workflow(5, calls), 0)
    host = RecordingHost()
    host.bus.count = 1  # someone subscribes: the fast path publishes too
    fast = await actor.turn(host, 100)
    assert calls == [0, 1, 2, 3, 4]  # one turn ran every step
    assert fast == 3  # steps 1-3; the first (pending -> running) and the last (done) went through commit
    assert [t.version for _, t in host.marks] == [3, 4, 5]
    assert [t.version for _, t in host.commits] == [2, 6]
    assert [t.version for t in host.transitions()] == [2, 3, 4, 5, 6]
    for snapshot, transition in host.marks:
        assert snapshot.version == transition.version
        assert snapshot.step == transition.step + 1
        assert (snapshot.status, transition.kind) == (
            Status.running,
            TransitionKind.step,
        )
    assert [t for t, _ in host.bus.published] == [t for _, t in host.marks]
    assert actor.history.transitions("r1")[1:] == host.transitions()
    assert actor.snapshot.version == 6
    assert (actor.snapshot.status, actor.snapshot.payload) == (Status.done, 5)
    assert host.finished_runs == [("r1", Status.done)]


async def test_a_run_marks_nothing_on_the_fast_path_when_memory_only_and_unsubscribed():
    calls: list[int] = []
    actor = new_actor(counting_workflow(4, calls), 0)
    host = RecordingHost()
    host.mark = None
    assert await actor.turn(host, 100) == 2
    assert host.marks == []
    assert host.bus.published == []
    assert len(actor.history) == 5  # the history still has every version
    assert actor.snapshot.status is Status.done


# ---------------------------------------------------------------- failures


async def test_a_step_that_raises_asks_retry_delay_and_given_none_compensates_in_reverse_and_fails():
    undone: list[str] = []
    ran: list[str] = []

    async def work(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        ran.append(ctx.step_name)
        if ctx.step_name == "c":
            raise ValueError("boom")
        return payload

    def undo(payload: dict[str, Any], ctx: StepContext) -> None:
        assert ctx.compensating
        undone.append(ctx.step_name)

    wf = Workflow(
        "saga",
        [
            Step(fn=work, name="a", compensate=undo),
            Step(fn=work, name="b", compensate=undo),
            Step(fn=work, name="c", compensate=undo),
            Step(fn=work, name="d"),
        ],
    )
    actor = new_actor(wf, {})
    host = RecordingHost([None])
    await actor.turn(host, 100)
    assert ran == ["a", "b", "c"]
    [(step_name, exc)] = host.retry_asked
    assert step_name == "c"
    assert isinstance(exc, ValueError)
    assert undone == [
        "b",
        "a",
    ]  # c never completed: only a and b are undone, newest first
    assert host.finished_runs == [("r1", Status.failed)]
    kinds = [t.kind for t in host.transitions()]
    assert kinds == [
        TransitionKind.step,
        TransitionKind.step,
        TransitionKind.step_failed,
        TransitionKind.compensated,
        TransitionKind.compensated,
        TransitionKind.failed,
    ]
    final = actor.snapshot
    assert final.status is Status.failed
    assert final.error is not None
    assert (final.error.step_name, final.error.message, final.step) == ("c", "boom", 2)
    assert [a.step_name for a in actor.attempts] == ["c"]


async def test_a_step_that_raises_and_is_given_a_delay_waits_for_the_wake_and_runs_again():
    attempts: list[int] = []

    async def flaky(payload: int, ctx: StepContext) -> int:
        attempts.append(ctx.attempt)
        if ctx.attempt == 1:
            raise ConnectionError("try again")
        return payload + 1

    async def after(payload: int, ctx: StepContext) -> int:
        attempts.append(ctx.attempt)
        return payload + 1

    wf = Workflow("flaky", [Step(fn=flaky), Step(fn=after)])
    actor = new_actor(wf, 0)
    host = RecordingHost([0.25])
    await actor.turn(host, 100)
    assert attempts == [1]
    assert host.wakes == [0.25]
    assert (actor.snapshot.status, actor.snapshot.attempt) == (Status.retrying, 2)
    assert not actor.runnable()  # holds nothing until the wake
    assert host.finished_runs == []
    actor.post_wake()
    assert actor.runnable()
    await actor.turn(host, 100)
    assert attempts == [
        1,
        2,
        1,
    ]  # the retried step on attempt 2, the next step on its first
    assert [t.kind for t in host.transitions()] == [
        TransitionKind.step_failed,
        TransitionKind.retry,
        TransitionKind.step,
        TransitionKind.step,
    ]
    assert (actor.snapshot.status, actor.snapshot.payload) == (Status.done, 2)
    assert host.finished_runs == [("r1", Status.done)]


async def test_a_step_that_forgets_to_await_fails_with_step_result_error():
    async def inner(payload: int, ctx: StepContext) -> int:
        return payload

    async def forgetful(payload: int, ctx: StepContext) -> Any:
        return inner(payload, ctx)  # no await: a coroutine object is the "result"

    actor = new_actor(Workflow("forgetful", [Step(fn=forgetful)]), 0)
    host = RecordingHost([None])
    await actor.turn(host, 100)
    [(_, exc)] = host.retry_asked
    assert isinstance(exc, StepResultError)
    assert host.finished_runs == [("r1", Status.failed)]


# ---------------------------------------------------------------- finishing, waiting, cancelling


async def test_finish_ends_the_run_early_with_its_payload():
    calls: list[str] = []

    async def early(payload: dict[str, Any], ctx: StepContext) -> Finish[dict[str, Any]]:
        calls.append("early")
        return Finish({"early": True})

    async def never(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        calls.append("never")
        return payload

    actor = new_actor(Workflow("short", [Step(fn=early), Step(fn=never)]), {})
    host = RecordingHost()
    await actor.turn(host, 100)
    assert calls == ["early"]
    final = actor.snapshot
    assert (final.status, final.payload, final.step, final.version) == (
        Status.done,
        {"early": True},
        2,
        2,
    )
    assert host.finished_runs == [("r1", Status.done)]


async def test_a_wait_for_step_parks_the_run_waiting_until_accept_signal():
    got: list[Any] = []

    async def before(payload: int, ctx: StepContext) -> int:
        return payload + 1

    async def take(payload: int, ctx: StepContext) -> int:
        got.append(ctx.signal)
        return payload + int(ctx.signal)

    async def after(payload: int, ctx: StepContext) -> int:
        return payload * 10

    wf = Workflow("signal", [Step(fn=before), Step(fn=take, wait_for="go"), Step(fn=after)])
    actor = new_actor(wf, 0)
    host = RecordingHost()
    await actor.turn(host, 100)
    assert got == []
    assert (actor.snapshot.status, actor.snapshot.step) == (Status.waiting, 1)
    assert not actor.runnable()
    before_idle = len(host.transitions())
    await actor.turn(host, 100)  # a turn while waiting changes nothing
    assert len(host.transitions()) == before_idle
    actor.accept_signal(host, "other", 1)  # not the awaited signal: kept, still waiting
    assert (actor.snapshot.status, actor.snapshot.signals) == (
        Status.waiting,
        (("other", 1),),
    )
    actor.accept_signal(host, "go", 7)
    assert (actor.snapshot.status, actor.snapshot.signals) == (
        Status.running,
        (("other", 1), ("go", 7)),
    )
    await actor.turn(host, 100)
    assert got == [7]
    final = actor.snapshot
    assert (final.status, final.payload, final.signals) == (
        Status.done,
        80,
        (("other", 1),),
    )
    assert [t.kind for t in host.transitions()] == [
        TransitionKind.step,
        TransitionKind.waiting,
        TransitionKind.signal,
        TransitionKind.signal,
        TransitionKind.step,
        TransitionKind.step,
    ]


async def test_a_cancel_in_the_mailbox_ends_the_run_before_its_next_step():
    calls: list[int] = []
    actor = new_actor(counting_workflow(3, calls), 0)
    host = RecordingHost()
    actor.post_cancel()
    await actor.turn(host, 100)
    assert calls == []
    assert actor.snapshot.status is Status.cancelled
    assert host.finished_runs == [("r1", Status.cancelled)]


async def test_a_step_with_a_timeout_arms_and_disarms_its_timer():
    async def quick(payload: int, ctx: StepContext) -> int:
        return payload + 1

    actor = new_actor(Workflow("timed", [Step(fn=quick, timeout=5.0)]), 0)
    host = RecordingHost()
    await actor.turn(host, 100)
    assert host.armed == [5.0]
    assert host.disarmed == [("timer", 5.0)]
    assert actor.snapshot.status is Status.done


# ---------------------------------------------------------------- fairness and holding back


async def test_the_budget_limits_the_fast_steps_of_one_turn():
    calls: list[int] = []
    actor = new_actor(counting_workflow(10, calls), 0)
    host = RecordingHost()
    assert await actor.turn(host, 3) == 3
    # The first step leaves pending through host.commit, which the host counts
    # itself; the budget counts the fast steps after it.
    assert calls == [0, 1, 2, 3]
    assert actor.snapshot.status is Status.running
    assert actor.runnable()
    assert await actor.turn(host, 3) == 3
    assert calls == [0, 1, 2, 3, 4, 5, 6]
    assert await actor.turn(host, 3) == 2  # steps 7 and 8; step 9 finishes through commit
    assert calls == list(range(10))
    assert host.finished_runs == [("r1", Status.done)]


async def test_stopping_stops_the_turn_before_the_next_step():
    calls: list[int] = []
    host = RecordingHost()

    async def step(payload: int, ctx: StepContext) -> int:
        calls.append(ctx.step)
        if ctx.step == 1:
            host.stopping = True  # shutdown begins while step 1 runs
        return payload + 1

    actor = new_actor(Workflow("stop", [Step(fn=step, name=f"s{i}") for i in range(4)]), 0)
    await actor.turn(host, 100)
    assert calls == [0, 1]  # step 1 finished and was committed; step 2 never started
    assert (actor.snapshot.step, actor.snapshot.status, actor.snapshot.version) == (
        2,
        Status.running,
        3,
    )
    assert host.finished_runs == []


async def test_stopping_before_the_turn_runs_nothing():
    calls: list[int] = []
    actor = new_actor(counting_workflow(2, calls), 0)
    host = RecordingHost()
    host.stopping = True
    assert await actor.turn(host, 100) == 0
    assert calls == []
    assert host.transitions() == []


async def test_hold_with_must_wait_parks_the_actor_before_the_step():
    calls: list[int] = []
    actor = new_actor(counting_workflow(4, calls), 0)
    host = RecordingHost(wait_from=3)
    host.hold = True
    await actor.turn(host, 100)
    assert calls == [0, 1]
    assert host.must_wait_calls == [
        1,
        2,
        3,
    ]  # asked before each step, with the version it would advance past
    assert actor.parked
    assert not actor.runnable()
    assert actor.snapshot.version == 3
    actor.parked = False  # what the scheduler does once the tier has v3 durable
    host.wait_from = None
    await actor.turn(host, 100)
    assert calls == [0, 1, 2, 3]
    assert host.finished_runs == [("r1", Status.done)]


@pytest.mark.parametrize("hold", [False, True])
async def test_must_wait_is_asked_only_when_the_host_holds(hold: bool) -> None:
    calls: list[int] = []
    actor = new_actor(counting_workflow(2, calls), 0)
    host = RecordingHost(wait_from=1)
    host.hold = hold
    await actor.turn(host, 100)
    assert actor.parked is hold
    assert calls == ([] if hold else [0, 1])
    assert host.must_wait_calls == ([1] if hold else [])
