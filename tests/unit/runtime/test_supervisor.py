# mypy: allow-untyped-defs
"""The supervisor in a running runtime: retry from the latest snapshot, give up, saga, dead letters."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel
import pytest

from hotstate import (
    ConfigError,
    DeadLetter,
    ErrorInfo,
    RestartIntensity,
    RetryPolicy,
    RunFailedError,
    RunNotFoundError,
    Runtime,
    Status,
    Step,
    StepContext,
    StepTimeoutError,
    TransitionKind,
    Workflow,
)
from hotstate.runtime._backoff import backoff_delay
from hotstate.testing import ManualClock, checkpoint_until

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

WALL0 = ManualClock().wall()  # the wall time a fresh ManualClock starts at


class Flaky:
    """A step that raises ``error`` on its first ``failures`` calls, then succeeds."""

    def __init__(self, failures: int, error: type[Exception] = ConnectionError) -> None:
        self.failures = failures
        self.error = error
        self.calls: list[tuple[int, Any]] = []  # (attempt, payload seen)
        self.raised: list[Exception] = []

    async def step(self, payload: Any, ctx: StepContext) -> Any:
        self.calls.append((ctx.attempt, payload))
        if len(self.calls) <= self.failures:
            exc = self.error(f"failure {len(self.calls)}")
            self.raised.append(exc)
            raise exc
        return {**payload, "flaky": len(self.calls)}


async def first(payload, ctx):
    return {**payload, "first": True}


async def drive(
    rt: Runtime,
    clock: ManualClock,
    run_id: str,
    *,
    step: float = 100.0,
    max_rounds: int = 30,
) -> Any:
    """Advance the clock until the run finishes; return wait_finished's outcome.

    Before each advance, let the runtime do everything it can at the current
    time: the run is finished or waits on a timer (a backoff or a step timeout).
    """
    for _ in range(max_rounds):
        await checkpoint_until(lambda: rt.get(run_id).finished or rt.statistics().timers > 0)
        if rt.get(run_id).finished:
            break
        await clock.advance(step)
    with anyio.fail_after(5):
        return await rt.wait_finished(run_id)


# ------------------------------------------------------------------ retry


async def test_a_transient_failure_is_retried_from_the_latest_snapshot_after_the_backoff(clock, until):
    flaky = Flaky(1)
    policy = RetryPolicy(max_attempts=3, initial_delay=2.0, jitter=0.0)
    wf = Workflow("w", [first, Step(fn=flaky.step, name="flaky", retry=policy)])
    async with Runtime([wf], clock=clock) as rt:
        run = await rt.spawn("w", {"id": 1}, run_id="r1")
        await until(lambda: rt.get("r1").status is Status.retrying)
        snap = rt.get("r1")
        assert (snap.step, snap.attempt, snap.payload) == (
            1,
            2,
            {"id": 1, "first": True},
        )
        assert snap.error is not None
        assert snap.error.type == "builtins.ConnectionError"
        assert rt.statistics().timers == 1
        await clock.advance(1.5)
        assert len(flaky.calls) == 1  # not before the delay
        assert rt.get("r1").status is Status.retrying
        await clock.advance(0.5)
        with anyio.fail_after(5):
            result = await run.wait_finished()
        assert result == {"id": 1, "first": True, "flaky": 2}
        assert flaky.calls == [
            (1, {"id": 1, "first": True}),
            (2, {"id": 1, "first": True}),
        ]
        kinds = [t.kind for t in run.history()]
        assert kinds == [
            TransitionKind.spawned,
            TransitionKind.step,
            TransitionKind.step_failed,
            TransitionKind.retry,
            TransitionKind.step,
        ]
        assert [t.version for t in run.history()] == [1, 2, 3, 4, 5]
        assert "retry in 2 s" in (run.history()[2].detail or "")
        stats = rt.statistics().supervisor
        assert (stats.failures, stats.retries, stats.give_ups, stats.dead_letters) == (
            1,
            1,
            0,
            0,
        )


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_jittered_backoff_is_scheduled_on_the_clock_from_the_seeded_rng(seed, until):
    clock = ManualClock()
    flaky = Flaky(1)
    policy = RetryPolicy(max_attempts=2, initial_delay=4.0, jitter=0.5)
    expected = backoff_delay(policy, 1, random.Random(seed))
    assert 2.0 <= expected <= 4.0
    wf = Workflow("w", [Step(fn=flaky.step, name="flaky", retry=policy)])
    async with Runtime([wf], clock=clock, rng=random.Random(seed)) as rt:
        run = await rt.spawn("w", {}, run_id="r1")
        await until(lambda: rt.get("r1").status is Status.retrying and clock.next_deadline() is not None)
        assert clock.next_deadline() == expected
        await clock.advance(expected - 0.01)
        assert len(flaky.calls) == 1
        await clock.advance(0.02)
        with anyio.fail_after(5):
            await run.wait_finished()
        assert len(flaky.calls) == 2


async def test_each_retry_waits_longer_per_the_policy(clock, until):
    flaky = Flaky(3)
    policy = RetryPolicy(max_attempts=4, initial_delay=1.0, multiplier=3.0, jitter=0.0)
    wf = Workflow("w", [Step(fn=flaky.step, name="flaky", retry=policy)])
    async with Runtime([wf], clock=clock) as rt:
        run = await rt.spawn("w", {}, run_id="r1")
        deadlines = []
        for attempt in (2, 3, 4):
            await until(lambda a=attempt: rt.get("r1").attempt == a and clock.next_deadline() is not None)
            deadline = clock.next_deadline()
            assert deadline is not None
            deadlines.append(deadline)
            await clock.advance(deadline - clock.now())
        with anyio.fail_after(5):
            await run.wait_finished()
        assert deadlines == [1.0, 1.0 + 3.0, 1.0 + 3.0 + 9.0]
        assert [a for a, _ in flaky.calls] == [1, 2, 3, 4]


async def test_a_retried_wait_for_step_sees_the_same_signal_again(clock, until):
    seen: list[Any] = []

    async def pay(payload, ctx):
        seen.append(ctx.signal)
        if len(seen) == 1:
            raise ConnectionError("card network down")
        return ctx.signal

    policy = RetryPolicy(max_attempts=2, initial_delay=1.0, jitter=0.0)
    wf = Workflow("w", [Step(fn=pay, wait_for="paid", retry=policy)])
    async with Runtime([wf], clock=clock) as rt:
        run = await rt.spawn("w", None)
        await run.send("paid", 99)
        await until(lambda: rt.get(run.run_id).status is Status.retrying)
        await clock.advance(1.0)
        with anyio.fail_after(5):
            assert await run.wait_finished() == 99
        assert seen == [99, 99]


# ------------------------------------------------------------------ giving up


async def test_a_non_retryable_error_gives_up_at_once(clock):
    class CardDeclinedError(PermissionError):
        pass

    flaky = Flaky(1, CardDeclinedError)
    policy = RetryPolicy(max_attempts=5, non_retryable=(PermissionError,))
    wf = Workflow("w", [Step(fn=flaky.step, name="flaky", retry=policy)])
    async with Runtime([wf], clock=clock) as rt:
        run = await rt.spawn("w", {})
        with anyio.fail_after(5), pytest.raises(RunFailedError):
            await run.wait_finished()
        assert len(flaky.calls) == 1
        stats = rt.statistics().supervisor
        assert (stats.failures, stats.retries, stats.give_ups, stats.non_retryable) == (
            1,
            0,
            1,
            1,
        )
        assert rt.statistics().timers == 0


async def test_max_attempts_exhausted_gives_up(clock):
    flaky = Flaky(99)
    policy = RetryPolicy(max_attempts=3, initial_delay=1.0, multiplier=1.0, jitter=0.0)
    wf = Workflow("w", [Step(fn=flaky.step, name="flaky", retry=policy)])
    async with Runtime([wf], clock=clock) as rt:
        await rt.spawn("w", {}, run_id="r1")
        with pytest.raises(RunFailedError) as info:
            await drive(rt, clock, "r1", step=1.0)
        assert [a for a, _ in flaky.calls] == [1, 2, 3]
        assert info.value.error.attempt == 3
        stats = rt.statistics().supervisor
        assert (
            stats.failures,
            stats.retries,
            stats.attempts_exhausted,
            stats.give_ups,
        ) == (3, 2, 1, 1)


async def test_restart_intensity_exceeded_gives_up_before_max_attempts(clock):
    flaky = Flaky(99)
    policy = RetryPolicy(max_attempts=10, initial_delay=1.0, multiplier=1.0, jitter=0.0)
    wf = Workflow("w", [Step(fn=flaky.step, name="flaky", retry=policy)])
    intensity = RestartIntensity(max_restarts=2, window=60.0)
    async with Runtime([wf], clock=clock, intensity=intensity) as rt:
        await rt.spawn("w", {}, run_id="r1")
        with pytest.raises(RunFailedError):
            await drive(rt, clock, "r1", step=1.0)
        assert len(flaky.calls) == 3  # two restarts allowed, the third exceeds
        stats = rt.statistics().supervisor
        assert (stats.retries, stats.intensity_exceeded, stats.attempts_exhausted) == (
            2,
            1,
            0,
        )


async def test_restarts_spread_wider_than_the_window_do_not_exceed_the_intensity(clock):
    flaky = Flaky(4)
    policy = RetryPolicy(max_attempts=10, initial_delay=10.0, multiplier=1.0, jitter=0.0)
    wf = Workflow("w", [Step(fn=flaky.step, name="flaky", retry=policy)])
    intensity = RestartIntensity(max_restarts=1, window=10.0)
    async with Runtime([wf], clock=clock, intensity=intensity) as rt:
        await rt.spawn("w", {}, run_id="r1")
        result = await drive(rt, clock, "r1", step=10.0)
        assert result["flaky"] == 5
        assert rt.statistics().supervisor.intensity_exceeded == 0


async def test_restart_intensity_is_counted_per_run(clock):
    policy = RetryPolicy(max_attempts=10, initial_delay=1.0, multiplier=1.0, jitter=0.0)
    steps = {f"r{i}": Flaky(1) for i in range(3)}

    async def dispatch(payload, ctx):
        return await steps[ctx.run_id].step(payload, ctx)

    wf = Workflow("w", [Step(fn=dispatch, name="dispatch", retry=policy)])
    async with Runtime([wf], clock=clock, intensity=RestartIntensity(max_restarts=1, window=60.0)) as rt:
        for run_id in steps:
            await rt.spawn("w", {}, run_id=run_id)
        for run_id in steps:
            await drive(rt, clock, run_id, step=1.0)
        assert rt.count(status="done") == 3
        assert rt.statistics().supervisor.intensity_exceeded == 0


# ------------------------------------------------------------------ saga and dead letters


async def test_giving_up_compensates_completed_steps_in_reverse_order_and_dead_letters(
    clock,
):
    calls: list[tuple[str, str, Any]] = []
    keys: dict[str, str] = {}

    def step(name: str) -> Callable[[Any, Any], Awaitable[Any]]:
        async def fn(payload, ctx):
            keys[name] = ctx.idempotency_key
            return {**payload, name: True}

        fn.__name__ = name
        return fn

    def undo(
        name: str, *, fail: bool = False, result: Callable[[Any], Any] | None = None
    ) -> Callable[[Any, Any], Awaitable[Any]]:
        async def fn(payload, ctx):
            calls.append((name, ctx.idempotency_key, dict(payload)))
            assert ctx.compensating
            if fail:
                raise RuntimeError(f"cannot undo {name}")
            return result(payload) if result else None

        return fn

    doomed_exc = ValueError("out of stock")

    async def doomed(payload, ctx):
        raise doomed_exc

    wf = Workflow(
        "saga",
        [
            Step(fn=step("reserve"), compensate=undo("reserve")),
            Step(fn=step("charge"), compensate=undo("charge", fail=True)),
            Step(fn=step("note")),  # nothing to undo
            Step(
                fn=step("label"),
                compensate=undo("label", result=lambda p: {**p, "label": "voided"}),
            ),
            Step(fn=doomed, retry=RetryPolicy.never()),
        ],
    )
    async with Runtime([wf], clock=clock) as rt:
        run = await rt.spawn("saga", {}, run_id="s1")
        with anyio.fail_after(5), pytest.raises(RunFailedError) as info:
            await run.wait_finished()

        # Reverse order, and a failing compensation does not stop the others.
        assert [name for name, _, _ in calls] == ["label", "charge", "reserve"]
        # A compensation's returned payload is what the next compensation sees.
        assert calls[1][2]["label"] == "voided"
        # Each compensation has its own key, distinct from every step key.
        comp_keys = [key for _, key, _ in calls]
        assert len(set(comp_keys)) == 3
        assert not set(comp_keys) & set(keys.values())

        snap = rt.get("s1")
        assert snap.status is Status.failed
        assert snap.error is not None
        assert (snap.error.step, snap.error.step_name, snap.error.type) == (
            4,
            "doomed",
            "builtins.ValueError",
        )

        history = run.history()
        tail = [(t.kind, t.step) for t in history[-6:]]
        assert tail == [
            (TransitionKind.step_failed, 4),
            (TransitionKind.compensated, 3),
            (TransitionKind.compensated, 2),
            (TransitionKind.compensation_failed, 1),
            (TransitionKind.compensated, 0),
            (TransitionKind.failed, 4),
        ]
        assert history[-6].status is Status.compensating
        assert history[-1].status is Status.failed
        assert "RuntimeError: cannot undo charge" in (history[-3].detail or "")
        assert [t.version for t in history] == list(range(1, len(history) + 1))

        letters = rt.dead_letters()
        assert len(letters) == 1
        letter = letters[0]
        assert isinstance(letter, DeadLetter)
        assert (letter.run_id, letter.workflow) == ("s1", "saga")
        assert letter.snapshot == snap
        assert letter.error == snap.error
        assert "doomed" in letter.error.traceback
        assert "ValueError: out of stock" in letter.error.traceback
        assert len(letter.compensation_errors) == 1
        comp_error = letter.compensation_errors[0]
        assert (comp_error.step, comp_error.step_name, comp_error.type) == (
            1,
            "charge",
            "builtins.RuntimeError",
        )
        assert "cannot undo charge" in comp_error.traceback
        assert [a.attempt for a in letter.attempts] == [1]

        # RunFailedError carries the recorded error, and the user's exception as cause.
        assert info.value.error == snap.error
        assert isinstance(info.value.error, ErrorInfo)
        assert info.value.__cause__ is doomed_exc
        assert info.value.run_id == "s1"
        assert rt.statistics().supervisor.dead_letters == 1


async def test_dead_letter_attempts_record_every_failure_with_its_time(clock):
    flaky = Flaky(99)
    policy = RetryPolicy(max_attempts=3, initial_delay=5.0, multiplier=1.0, jitter=0.0)
    wf = Workflow("w", [Step(fn=flaky.step, name="flaky", retry=policy)])
    async with Runtime([wf], clock=clock) as rt:
        await rt.spawn("w", {}, run_id="r1")
        with pytest.raises(RunFailedError) as info:
            await drive(rt, clock, "r1", step=5.0)
        (letter,) = rt.dead_letters()
        assert [a.attempt for a in letter.attempts] == [1, 2, 3]
        assert [a.at for a in letter.attempts] == [WALL0, WALL0 + 5.0, WALL0 + 10.0]
        assert [a.message for a in letter.attempts] == [
            "failure 1",
            "failure 2",
            "failure 3",
        ]
        assert letter.error == letter.attempts[-1]
        assert info.value.__cause__ is flaky.raised[-1]


async def test_a_timeout_that_exhausts_the_policy_fails_the_run_with_step_timeout_error(clock, until):
    never = anyio.Event()

    async def hang(payload, ctx):
        await never.wait()

    wf = Workflow(
        "w",
        [
            Step(
                fn=hang,
                timeout=2.0,
                retry=RetryPolicy(max_attempts=2, initial_delay=1.0, jitter=0.0),
            )
        ],
    )
    async with Runtime([wf], clock=clock) as rt:
        await rt.spawn("w", {}, run_id="r1")
        await until(lambda: clock.sleepers == 1)
        with pytest.raises(RunFailedError) as info:
            await drive(rt, clock, "r1", step=1.0)
        assert info.value.error.type == "hotstate.StepTimeoutError"
        assert isinstance(info.value.__cause__, StepTimeoutError)
        assert [a.type for a in rt.dead_letters()[0].attempts] == ["hotstate.StepTimeoutError"] * 2


async def test_cancelling_a_compensating_run_lets_it_finish_compensating_and_fail(clock, until):
    release = anyio.Event()
    started = anyio.Event()
    undone: list[str] = []

    async def undo(payload, ctx):
        started.set()
        await release.wait()
        undone.append("reserve")

    async def doomed(payload, ctx):
        raise ValueError("no")

    wf = Workflow(
        "w",
        [Step(fn=first, compensate=undo), Step(fn=doomed, retry=RetryPolicy.never())],
    )
    async with Runtime([wf], clock=clock) as rt:
        run = await rt.spawn("w", {})
        with anyio.fail_after(5):
            await started.wait()
        assert rt.get(run.run_id).status is Status.compensating
        await run.cancel()
        release.set()
        with anyio.fail_after(5), pytest.raises(RunFailedError):
            await run.wait_finished()
        assert undone == ["reserve"]
        assert rt.get(run.run_id).status is Status.failed


# ------------------------------------------------------------------ retry_dead_letter


async def test_retry_dead_letter_reruns_the_failed_step_and_the_run_ends_done(clock):
    flaky = Flaky(1)
    wf = Workflow("w", [first, Step(fn=flaky.step, name="flaky", retry=RetryPolicy.never())])
    async with Runtime([wf], clock=clock) as rt:
        run = await rt.spawn("w", {}, run_id="r1")
        with anyio.fail_after(5), pytest.raises(RunFailedError):
            await run.wait_finished()
        assert len(rt.dead_letters()) == 1
        failed_version = rt.get("r1").version

        handle = await rt.retry_dead_letter("r1")
        assert handle == run
        with anyio.fail_after(5):
            result = await handle.wait_finished()
        assert result == {"first": True, "flaky": 2}
        snap = rt.get("r1")
        assert (snap.status, snap.error) == (Status.done, None)
        assert rt.dead_letters() == []
        assert rt.statistics().supervisor.dead_letters == 0
        history = run.history()
        retried = [t for t in history if t.kind is TransitionKind.dead_letter_retried]
        assert len(retried) == 1
        assert retried[0].version == failed_version + 1
        assert retried[0].step == 1
        assert [a for a, _ in flaky.calls] == [1, 1]  # a fresh retry budget
        assert [t.version for t in history] == list(range(1, len(history) + 1))


async def test_retry_dead_letter_can_resume_from_a_named_step(clock):
    calls: list[str] = []
    flaky = Flaky(1)

    async def head(payload, ctx):
        calls.append("head")
        return payload

    wf = Workflow("w", [head, Step(fn=flaky.step, name="flaky", retry=RetryPolicy.never())])
    async with Runtime([wf], clock=clock) as rt:
        run = await rt.spawn("w", {}, run_id="r1")
        with anyio.fail_after(5), pytest.raises(RunFailedError):
            await run.wait_finished()
        await rt.retry_dead_letter("r1", from_step="head")
        with anyio.fail_after(5):
            await run.wait_finished()
        assert calls == ["head", "head"]


async def test_retry_dead_letter_of_an_unknown_or_healthy_run_raises_run_not_found(
    clock,
):
    async with Runtime([Workflow("w", [first])], clock=clock) as rt:
        with pytest.raises(RunNotFoundError):
            await rt.retry_dead_letter("ghost")
        run = await rt.spawn("w", {})
        with anyio.fail_after(5):
            await run.wait_finished()
        with pytest.raises(RunNotFoundError):
            await rt.retry_dead_letter(run.run_id)


@pytest.mark.parametrize("from_step", [5, -1, "nope", True])
async def test_retry_dead_letter_from_a_bad_step_raises_config_error(clock, from_step):
    wf = Workflow("w", [first, Step(fn=Flaky(9).step, name="flaky", retry=RetryPolicy.never())])
    async with Runtime([wf], clock=clock) as rt:
        run = await rt.spawn("w", {}, run_id="r1")
        with anyio.fail_after(5), pytest.raises(RunFailedError):
            await run.wait_finished()
        with pytest.raises(ConfigError):
            await rt.retry_dead_letter("r1", from_step=from_step)
        assert len(rt.dead_letters()) == 1  # still there
        assert rt.get("r1").status is Status.failed


# ------------------------------------------------------------------ behaviour matrix


class DeclinedError(Exception):
    """A business error that must not be retried."""


class Timeout:
    """Marker: the step hangs past its timeout instead of raising."""


DEFAULT = RetryPolicy(max_attempts=3, initial_delay=0.5, jitter=0.5)
NEVER = RetryPolicy.never()
STRICT = RetryPolicy(max_attempts=4, initial_delay=1.0, non_retryable=(DeclinedError, KeyError))


@pytest.mark.parametrize(
    ("policy", "error", "failures", "outcome", "attempts"),
    [
        (DEFAULT, ConnectionError, 0, "done", 1),
        (DEFAULT, ConnectionError, 1, "done", 2),
        (DEFAULT, ConnectionError, 2, "done", 3),
        (DEFAULT, ConnectionError, 3, "failed", 3),
        (DEFAULT, DeclinedError, 1, "done", 2),  # not listed as non-retryable here
        (DEFAULT, Timeout, 2, "done", 3),
        (DEFAULT, Timeout, 3, "failed", 3),
        (NEVER, ConnectionError, 1, "failed", 1),
        (NEVER, Timeout, 1, "failed", 1),
        (STRICT, DeclinedError, 1, "failed", 1),
        (STRICT, KeyError, 1, "failed", 1),
        (STRICT, ValueError, 3, "done", 4),
        (STRICT, ValueError, 4, "failed", 4),
        (STRICT, Timeout, 3, "done", 4),
    ],
    ids=lambda v: getattr(v, "__name__", None) or (str(v) if not isinstance(v, RetryPolicy) else None),
)
async def test_behaviour_matrix(clock, rng, policy, error, failures, outcome, attempts):
    calls: list[int] = []
    never = anyio.Event()

    async def step(payload, ctx):
        calls.append(ctx.attempt)
        if len(calls) <= failures:
            if error is Timeout:
                await never.wait()
            raise error("boom")
        return "ok"

    timeout = 5.0 if error is Timeout else None
    wf = Workflow("w", [Step(fn=step, name="step", retry=policy, timeout=timeout)])
    async with Runtime([wf], clock=clock, rng=rng) as rt:
        await rt.spawn("w", None, run_id="r1")
        if outcome == "done":
            assert await drive(rt, clock, "r1", step=5.0) == "ok"
        else:
            with pytest.raises(RunFailedError) as info:
                await drive(rt, clock, "r1", step=5.0)
            expected_type = StepTimeoutError if error is Timeout else error
            assert isinstance(info.value.__cause__, expected_type)
            assert len(rt.dead_letters()) == 1
        assert calls == list(range(1, attempts + 1))
        assert rt.get("r1").status is Status(outcome)
        stats = rt.statistics().supervisor
        assert stats.failures == min(failures, attempts)
        assert stats.give_ups == (1 if outcome == "failed" else 0)
