# mypy: allow-untyped-defs
"""``Runtime``: spawning, versions, queries, signals, lifecycle, cancel, timeouts, fairness."""

from __future__ import annotations

import gc
import warnings
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from hotstate import (
    ConfigError,
    Finish,
    RetryPolicy,
    RunCancelledError,
    RunFailedError,
    RunFinishedError,
    RunNotFoundError,
    Runtime,
    RuntimeClosedError,
    Status,
    Step,
    StepResultError,
    TransitionKind,
    Workflow,
    WorkflowNotRegisteredError,
)

NEVER = RetryPolicy.never()


async def add_one(payload: Any, ctx: Any) -> Any:
    return payload + 1


def add_one_sync(payload: Any, ctx: Any) -> Any:
    return payload + 1


def counting(n: int, *, sync: bool = False) -> Workflow:
    fn = add_one_sync if sync else add_one
    return Workflow("count", [Step(fn=fn, name=f"s{i}") for i in range(n)])


def assert_no_supervision(rt: Runtime) -> None:
    stats = rt.statistics().supervisor
    assert (stats.failures, stats.retries, stats.give_ups, stats.dead_letters) == (
        0,
        0,
        0,
        0,
    )
    assert rt.dead_letters() == []


# ------------------------------------------------------------------ spawn and versions


async def test_spawn_runs_every_step_and_ends_done_with_the_final_payload(clock):
    async with Runtime([counting(3)], clock=clock) as rt:
        run = await rt.spawn("count", 10)
        with anyio.fail_after(5):
            assert await run.wait_finished() == 13
        snap = rt.get(run.run_id)
        assert snap.status is Status.done
        assert (snap.payload, snap.step, snap.error) == (13, 3, None)
        assert snap.finished


async def test_spawn_accepts_the_workflow_object_as_well_as_its_name(clock):
    wf = counting(2)
    async with Runtime([wf], clock=clock) as rt:
        run = await rt.spawn(wf, 0)
        with anyio.fail_after(5):
            assert await run.wait_finished() == 2


async def test_versions_start_at_one_and_go_up_by_one_per_transition(clock):
    async with Runtime([counting(4)], clock=clock) as rt:
        run = await rt.spawn("count", 0, run_id="r1")
        assert rt.get("r1").version == 1
        assert rt.get("r1").status is Status.pending
        with anyio.fail_after(5):
            await run.wait_finished()
        history = rt.history("r1")
        assert [t.version for t in history] == [1, 2, 3, 4, 5]
        assert [t.kind for t in history] == [TransitionKind.spawned] + [TransitionKind.step] * 4
        assert [t.status for t in history] == [Status.pending] + [Status.running] * 3 + [Status.done]
        assert [t.step for t in history] == [0, 0, 1, 2, 3]
        assert {t.run_id for t in history} == {"r1"}
        assert rt.get("r1").version == history[-1].version
        assert rt.statistics().transitions == 5


async def test_stamps_come_from_the_injected_clock(clock):
    async with Runtime([counting(1)], clock=clock) as rt:
        run = await rt.spawn("count", 0)
        with anyio.fail_after(5):
            await run.wait_finished()
        assert {t.at for t in run.history()} == {clock.wall()}
        assert rt.get(run.run_id).updated_at == clock.wall()


async def test_get_returns_the_latest_snapshot_at_every_point(clock, until):
    release = anyio.Event()
    started = anyio.Event()

    async def hold(payload, ctx):
        started.set()
        await release.wait()
        return [*payload, "held"]

    async def tail(payload, ctx):
        return [*payload, "tail"]

    wf = Workflow("hold", [Step(fn=tail, name="first"), hold, tail])
    async with Runtime([wf], clock=clock) as rt:
        run = await rt.spawn("hold", [], run_id="r1")
        with anyio.fail_after(5):
            await started.wait()
        snap = rt.get("r1")
        assert snap == run.snapshot
        assert (snap.status, snap.step, snap.payload) == (Status.running, 1, ["tail"])
        assert snap.version == rt.history("r1")[-1].version
        release.set()
        with anyio.fail_after(5):
            await run.wait_finished()
        assert rt.get("r1").payload == ["tail", "held", "tail"]
        assert rt.get("r1").version == rt.history("r1")[-1].version == 4


async def test_get_and_history_of_an_unknown_run_raise_run_not_found(clock):
    async with Runtime([counting(1)], clock=clock) as rt:
        with pytest.raises(RunNotFoundError):
            rt.get("nope")
        with pytest.raises(RunNotFoundError):
            rt.history("nope")
        with pytest.raises(RunNotFoundError):
            rt.handle("nope")
        with pytest.raises(RunNotFoundError):
            await rt.wait_finished("nope")


async def test_spawn_with_an_existing_run_id_returns_that_run_and_starts_nothing(clock, until):
    calls: list[Any] = []
    release = anyio.Event()

    async def once(payload, ctx):
        calls.append(payload)
        await release.wait()
        return payload

    async with Runtime([Workflow("once", [once])], clock=clock) as rt:
        first = await rt.spawn("once", "first", run_id="r1")
        await until(lambda: len(calls) == 1)
        second = await rt.spawn("once", "second", run_id="r1")
        assert second == first
        assert second.run_id == "r1"
        release.set()
        with anyio.fail_after(5):
            assert await second.wait_finished() == "first"
        third = await rt.spawn("once", "third", run_id="r1")  # even once finished
        assert third == first
        assert calls == ["first"]
        assert rt.count() == 1
        assert len(rt.history("r1")) == 2


async def test_spawning_twice_before_the_run_starts_still_runs_it_once(clock):
    calls: list[Any] = []

    async def once(payload, ctx):
        calls.append(payload)
        return payload

    async with Runtime([Workflow("once", [once])], clock=clock) as rt:
        a = await rt.spawn("once", 1, run_id="r1")
        b = await rt.spawn("once", 2, run_id="r1")
        with anyio.fail_after(5):
            await a.wait_finished()
        assert a == b
        assert calls == [1]


@pytest.mark.parametrize("run_id", ["", 5])
async def test_spawn_with_a_bad_run_id_raises_config_error(clock, run_id):
    async with Runtime([counting(1)], clock=clock) as rt:
        with pytest.raises(ConfigError, match="run_id"):
            await rt.spawn("count", 0, run_id=run_id)


async def test_generated_run_ids_are_unique(clock):
    async with Runtime([counting(1)], clock=clock) as rt:
        runs = [await rt.spawn("count", i) for i in range(50)]
        assert len({r.run_id for r in runs}) == 50
        with anyio.fail_after(5):
            assert [await r.wait_finished() for r in runs] == list(range(1, 51))


# ------------------------------------------------------------------ queries


async def test_list_runs_and_count_filter_by_status_and_workflow(clock, until):
    async def pay(payload, ctx):
        return payload

    waits = Workflow("waits", [Step(fn=pay, wait_for="paid")])
    async with Runtime([waits, counting(2)], clock=clock) as rt:
        for i in range(2):
            await rt.spawn("waits", i, run_id=f"w{i}")
        for i in range(3):
            await rt.spawn("count", i, run_id=f"c{i}")
        await until(lambda: rt.count(status="done") == 3 and rt.count(status=Status.waiting) == 2)
        assert rt.count() == 5
        assert rt.count(workflow="waits") == 2
        assert rt.count(workflow="count") == 3
        assert rt.count(status="done", workflow="waits") == 0
        assert rt.count(status="waiting", workflow="waits") == 2
        assert rt.count(status="running") == 0
        assert rt.count(workflow="unknown") == 0
        assert [s.run_id for s in rt.list_runs(status="waiting")] == ["w0", "w1"]
        assert [s.run_id for s in rt.list_runs(status=Status.done, workflow="count")] == ["c0", "c1", "c2"]
        assert [s.run_id for s in rt.list_runs(workflow="count", limit=2)] == [
            "c0",
            "c1",
        ]
        assert sorted(s.run_id for s in rt.list_runs()) == [
            "c0",
            "c1",
            "c2",
            "w0",
            "w1",
        ]
        assert rt.list_runs(status="done", workflow="waits") == []
        assert all(s.status is Status.done for s in rt.list_runs(status="done"))
        assert rt.statistics().by_status == {"done": 3, "waiting": 2}
        assert rt.statistics().runs == 5


async def test_list_runs_with_an_unknown_status_raises_config_error(clock):
    async with Runtime([counting(1)], clock=clock) as rt:
        with pytest.raises(ConfigError, match="status"):
            rt.list_runs(status="sleeping")
        with pytest.raises(ConfigError, match="status"):
            rt.count(status="sleeping")


# ------------------------------------------------------------------ signals


async def test_a_waiting_run_holds_no_task_and_a_signal_wakes_it(clock, until):
    seen: list[Any] = []

    async def pay(payload, ctx):
        seen.append(ctx.signal)
        return {**payload, "paid": ctx.signal}

    wf = Workflow("order", [Step(fn=pay, wait_for="paid")])
    async with Runtime([wf], clock=clock) as rt:
        run = await rt.spawn("order", {"id": 1})
        await until(lambda: rt.get(run.run_id).status is Status.waiting)
        await until(lambda: rt.statistics().tasks == 0)
        stats = rt.statistics()
        assert (stats.tasks, stats.ready, stats.timers) == (0, 0, 0)
        assert seen == []
        await run.send("paid", 42)
        with anyio.fail_after(5):
            assert await run.wait_finished() == {"id": 1, "paid": 42}
        assert seen == [42]
        kinds = [t.kind for t in run.history()]
        assert kinds == [
            TransitionKind.spawned,
            TransitionKind.waiting,
            TransitionKind.signal,
            TransitionKind.step,
        ]
        assert run.history()[1].detail == "paid"
        assert rt.get(run.run_id).signals == ()


async def test_signals_sent_before_the_run_starts_are_buffered_and_consumed_in_order(
    clock,
):
    async def take(payload, ctx):
        return [*payload, ctx.signal]

    wf = Workflow("collect", [Step(fn=take, name=f"t{i}", wait_for="item") for i in range(3)])
    async with Runtime([wf], clock=clock) as rt:
        run = await rt.spawn("collect", [])
        for item in ("a", "b", "c"):
            await run.send("item", item)
        with anyio.fail_after(5):
            assert await run.wait_finished() == ["a", "b", "c"]
        assert rt.get(run.run_id).signals == ()


async def test_signals_sent_while_an_earlier_step_is_suspended_are_buffered(clock, until):
    release = anyio.Event()
    started = anyio.Event()

    async def busy(payload, ctx):
        started.set()
        await release.wait()
        return payload

    async def take(payload, ctx):
        return [*payload, ctx.signal]

    wf = Workflow(
        "collect",
        [
            busy,
            Step(fn=take, name="t1", wait_for="item"),
            Step(fn=take, name="t2", wait_for="item"),
        ],
    )
    async with Runtime([wf], clock=clock) as rt:
        run = await rt.spawn("collect", [])
        with anyio.fail_after(5):
            await started.wait()
        await run.send("item", 1)
        await run.send("item", 2)
        release.set()
        with anyio.fail_after(5):
            assert await run.wait_finished() == [1, 2]


async def test_a_buffered_signal_of_another_name_waits_for_its_own_step(clock, until):
    async def take(payload, ctx):
        return [*payload, (ctx.step_name, ctx.signal)]

    wf = Workflow(
        "two",
        [
            Step(fn=take, name="first", wait_for="b"),
            Step(fn=take, name="second", wait_for="a"),
        ],
    )
    async with Runtime([wf], clock=clock) as rt:
        run = await rt.spawn("two", [])
        await run.send("a", "for second")
        await until(lambda: rt.get(run.run_id).status is Status.waiting)
        assert rt.get(run.run_id).signals == (("a", "for second"),)
        await run.send("b", "for first")
        with anyio.fail_after(5):
            assert await run.wait_finished() == [
                ("first", "for first"),
                ("second", "for second"),
            ]


async def test_send_to_an_unknown_run_raises_run_not_found(clock):
    async with Runtime([counting(1)], clock=clock) as rt:
        with pytest.raises(RunNotFoundError) as info:
            await rt.send("ghost", "paid")
        assert info.value.run_id == "ghost"


async def test_send_to_a_finished_run_raises_run_finished(clock):
    async def pay(payload, ctx):
        return payload

    wf = Workflow("order", [Step(fn=pay, wait_for="paid")])
    async with Runtime([wf], clock=clock) as rt:
        run = await rt.spawn("order", 1)
        await run.send("paid")
        with anyio.fail_after(5):
            await run.wait_finished()
        with pytest.raises(RunFinishedError, match="done") as info:
            await run.send("paid")
        assert info.value.status == "done"


async def test_send_of_a_signal_no_step_waits_for_raises_config_error(clock):
    async def pay(payload, ctx):
        return payload

    wf = Workflow("order", [Step(fn=pay, wait_for="paid")])
    async with Runtime([wf], clock=clock) as rt:
        run = await rt.spawn("order", 1)
        with pytest.raises(ConfigError, match="shipped"):
            await run.send("shipped")
        await run.cancel()


# ------------------------------------------------------------------ registration and lifecycle


async def test_spawning_an_unknown_workflow_raises_workflow_not_registered(clock):
    stranger = Workflow("count", [add_one])  # same name, different definition
    async with Runtime([counting(1)], clock=clock) as rt:
        with pytest.raises(WorkflowNotRegisteredError) as info:
            await rt.spawn("refund", 0, run_id="r1")
        assert (info.value.workflow, info.value.run_id) == ("refund", "r1")
        assert isinstance(info.value, LookupError)
        with pytest.raises(WorkflowNotRegisteredError):
            await rt.spawn(stranger, 0)
        assert rt.count() == 0


def test_registering_two_workflows_with_one_name_raises_config_error():
    with pytest.raises(ConfigError, match="count"):
        Runtime([counting(1), counting(2)])
    rt = Runtime([counting(1)])
    with pytest.raises(ConfigError, match="already registered"):
        rt.register(counting(1))


def test_registering_the_same_workflow_twice_is_harmless():
    wf = counting(1)
    rt = Runtime([wf])
    rt.register(wf)
    assert rt.workflows == {"count": wf}


def test_registering_something_that_is_not_a_workflow_raises_config_error():
    with pytest.raises(ConfigError, match="Workflow"):
        Runtime([add_one])  # type: ignore[list-item]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"shutdown_timeout": -1}, "shutdown_timeout"),
        ({"shutdown_timeout": "5"}, "shutdown_timeout"),
        ({"steps_per_turn": 0}, "steps_per_turn"),
        ({"steps_per_turn": True}, "steps_per_turn"),
    ],
)
def test_bad_runtime_options_raise_config_error_naming_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        Runtime(**kwargs)


async def test_using_the_runtime_before_it_is_entered_raises_runtime_closed(clock):
    rt = Runtime([counting(1)], clock=clock)
    with pytest.raises(RuntimeClosedError):
        await rt.spawn("count", 0)
    with pytest.raises(RuntimeClosedError):
        await rt.send("r1", "paid")
    with pytest.raises(RuntimeClosedError):
        await rt.cancel("r1")
    with pytest.raises(RuntimeClosedError):
        await rt.retry_dead_letter("r1")
    await rt.aclose()


async def test_using_the_runtime_after_exit_raises_runtime_closed(clock):
    async with Runtime([counting(1)], clock=clock) as rt:
        run = await rt.spawn("count", 0)
        with anyio.fail_after(5):
            await run.wait_finished()
    with pytest.raises(RuntimeClosedError):
        await rt.spawn("count", 0)
    with pytest.raises(RuntimeClosedError):
        await rt.send(run.run_id, "x")
    with pytest.raises(RuntimeClosedError):
        await rt.cancel(run.run_id)
    with pytest.raises(RuntimeClosedError):
        async with rt:
            pass
    assert rt.get(run.run_id).status is Status.done  # queries still answer


async def test_aclose_closes_an_entered_runtime(clock):
    rt = Runtime([counting(1)], clock=clock)
    await rt.__aenter__()
    run = await rt.spawn("count", 0)
    with anyio.fail_after(5):
        await run.wait_finished()
    await rt.aclose()
    with pytest.raises(RuntimeClosedError):
        await rt.spawn("count", 0)
    await rt.aclose()  # idempotent


async def test_run_handles_cannot_be_built_by_users(clock):
    from hotstate import RunHandle

    async with Runtime([counting(1)], clock=clock) as rt:
        with pytest.raises(TypeError):
            RunHandle(rt, "r1")


# ------------------------------------------------------------------ step results


def _forgot_await_sync(payload, ctx):
    return add_one(payload, ctx)  # a coroutine, never awaited


async def _forgot_await_async(payload, ctx):
    return add_one(payload, ctx)  # a coroutine, never awaited


@pytest.mark.parametrize("fn", [_forgot_await_sync, _forgot_await_async], ids=["sync", "async"])
async def test_a_step_returning_an_unawaited_coroutine_fails_with_step_result_error(clock, fn):
    wf = Workflow("forgot", [Step(fn=fn, name="forgot", retry=NEVER)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        async with Runtime([wf], clock=clock) as rt:
            run = await rt.spawn("forgot", 1)
            with anyio.fail_after(5), pytest.raises(RunFailedError) as info:
                await run.wait_finished()
            assert rt.get(run.run_id).status is Status.failed
            assert info.value.error.type == "hotstate.StepResultError"
            assert "coroutine" in info.value.error.message
            assert isinstance(info.value.__cause__, StepResultError)
            assert isinstance(info.value.__cause__, TypeError)
            del info
        del rt
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)]


@pytest.mark.parametrize("sync", [True, False], ids=["sync", "async"])
async def test_sync_and_async_steps_both_work(clock, sync):
    async with Runtime([counting(5, sync=sync)], clock=clock) as rt:
        run = await rt.spawn("count", 0)
        with anyio.fail_after(5):
            assert await run.wait_finished() == 5


async def test_mixed_sync_and_async_steps_pass_payloads_along(clock):
    def double(payload, ctx):
        return payload * 2

    wf = Workflow(
        "mixed",
        [
            add_one,
            double,
            Step(fn=add_one_sync, name="again"),
            Step(fn=double, name="twice"),
        ],
    )
    async with Runtime([wf], clock=clock) as rt:
        run = await rt.spawn("mixed", 1)
        with anyio.fail_after(5):
            assert await run.wait_finished() == ((1 + 1) * 2 + 1) * 2


def _finish_marker(payload, ctx):
    return Finish({"early": payload})


def _finish_ctx(payload, ctx):
    return ctx.finish({"early": payload})


async def _finish_marker_async(payload, ctx):
    return Finish({"early": payload})


@pytest.mark.parametrize("finisher", [_finish_marker, _finish_ctx, _finish_marker_async])
async def test_finish_ends_the_run_early_with_status_done(clock, finisher):
    later: list[str] = []

    async def never(payload, ctx):
        later.append("ran")
        return payload

    wf = Workflow("early", [add_one, Step(fn=finisher, name="stop"), never])
    async with Runtime([wf], clock=clock) as rt:
        run = await rt.spawn("early", 1)
        with anyio.fail_after(5):
            assert await run.wait_finished() == {"early": 2}
        snap = rt.get(run.run_id)
        assert snap.status is Status.done
        assert snap.step == 3
        assert later == []
        assert [t.version for t in run.history()] == [1, 2, 3]


# ------------------------------------------------------------------ idempotency keys


async def test_idempotency_key_is_stable_across_retries_and_distinct_per_step_and_compensation(clock, until):
    keys: dict[str, list[str]] = {
        "reserve": [],
        "flaky": [],
        "undo_reserve": [],
        "undo_flaky": [],
    }
    failures = {"flaky": 0}

    async def reserve(payload, ctx):
        keys["reserve"].append(ctx.idempotency_key)
        return payload

    async def flaky(payload, ctx):
        keys["flaky"].append(ctx.idempotency_key)
        if failures["flaky"] < 2:
            failures["flaky"] += 1
            raise ConnectionError("try again")
        return payload

    async def doomed(payload, ctx):
        raise PermissionError("no")

    def undo_reserve(payload, ctx):
        keys["undo_reserve"].append(ctx.idempotency_key)

    def undo_flaky(payload, ctx):
        keys["undo_flaky"].append(ctx.idempotency_key)

    retry = RetryPolicy(max_attempts=5, initial_delay=1.0, multiplier=1.0, jitter=0.0)
    wf = Workflow(
        "keys",
        [
            Step(fn=reserve, compensate=undo_reserve),
            Step(fn=flaky, compensate=undo_flaky, retry=retry),
            Step(fn=doomed, retry=NEVER),
        ],
    )
    async with Runtime([wf], clock=clock) as rt:
        run = await rt.spawn("keys", {}, run_id="k1")
        await until(lambda: rt.get("k1").status is Status.retrying)
        await clock.advance(1.0)
        await until(lambda: rt.get("k1").status is Status.retrying and rt.get("k1").attempt == 3)
        await clock.advance(1.0)
        with anyio.fail_after(5), pytest.raises(RunFailedError):
            await run.wait_finished()
    assert len(keys["flaky"]) == 3
    assert len(set(keys["flaky"])) == 1
    every = [
        keys["reserve"][0],
        keys["flaky"][0],
        keys["undo_reserve"][0],
        keys["undo_flaky"][0],
    ]
    assert len(set(every)) == 4
    assert all(k.startswith("k1") or "k1" in k for k in every)


# ------------------------------------------------------------------ cancel


async def test_cancelling_a_waiting_run_ends_it_cancelled_without_compensation(clock, until):
    undone: list[str] = []

    async def reserve(payload, ctx):
        return payload

    async def pay(payload, ctx):
        return payload

    wf = Workflow(
        "order",
        [
            Step(fn=reserve, compensate=lambda p, c: undone.append("reserve")),
            Step(fn=pay, wait_for="paid"),
        ],
    )
    async with Runtime([wf], clock=clock) as rt:
        run = await rt.spawn("order", 1)
        await until(lambda: rt.get(run.run_id).status is Status.waiting)
        await run.cancel()
        with anyio.fail_after(5), pytest.raises(RunCancelledError) as info:
            await run.wait_finished()
        assert info.value.run_id == run.run_id
        assert rt.get(run.run_id).status is Status.cancelled
        assert run.history()[-1].kind is TransitionKind.cancelled
        assert undone == []
        assert_no_supervision(rt)
        with pytest.raises(RunFinishedError, match="cancelled"):
            await run.cancel()
        with pytest.raises(RunFinishedError):
            await run.send("paid")


async def test_cancelling_a_run_whose_step_is_suspended_ends_it_cancelled(clock, until):
    started = anyio.Event()
    never = anyio.Event()
    cleanup: list[str] = []
    undone: list[str] = []

    async def first(payload, ctx):
        return payload

    async def stuck(payload, ctx):
        started.set()
        try:
            await never.wait()
        finally:
            cleanup.append("stuck")
        return payload

    wf = Workflow("stuck", [Step(fn=first, compensate=lambda p, c: undone.append("first")), stuck])
    async with Runtime([wf], clock=clock) as rt:
        run = await rt.spawn("stuck", 1)
        with anyio.fail_after(5):
            await started.wait()
        await run.cancel()
        with anyio.fail_after(5), pytest.raises(RunCancelledError):
            await run.wait_finished()
        assert rt.get(run.run_id).status is Status.cancelled
        assert cleanup == ["stuck"]
        assert undone == []
        assert_no_supervision(rt)
        await until(lambda: rt.statistics().tasks == 0)
        assert rt.statistics().internal_errors == 0


async def test_cancelling_a_suspended_step_with_a_timeout_is_not_a_timeout(clock, until):
    started = anyio.Event()
    never = anyio.Event()

    async def stuck(payload, ctx):
        started.set()
        await never.wait()

    wf = Workflow("stuck", [Step(fn=stuck, timeout=10.0)])
    async with Runtime([wf], clock=clock) as rt:
        run = await rt.spawn("stuck", 1)
        with anyio.fail_after(5):
            await started.wait()
        await run.cancel()
        with anyio.fail_after(5), pytest.raises(RunCancelledError):
            await run.wait_finished()
        await clock.advance(20.0)  # the disarmed timeout must not fire into anything
        assert rt.get(run.run_id).status is Status.cancelled
        assert_no_supervision(rt)
        assert rt.statistics().timers == 0
        assert rt.statistics().internal_errors == 0


async def test_cancelling_a_run_before_its_first_step_runs_it_never(clock):
    calls: list[int] = []

    async def step(payload, ctx):
        calls.append(payload)
        return payload

    async with Runtime([Workflow("w", [step])], clock=clock) as rt:
        run = await rt.spawn("w", 1)
        await run.cancel()
        with anyio.fail_after(5), pytest.raises(RunCancelledError):
            await run.wait_finished()
        assert calls == []
        assert [t.version for t in run.history()] == [1, 2]


async def test_cancelling_a_run_that_is_backing_off_ends_it_and_the_wake_does_nothing(clock, until):
    calls: list[int] = []

    async def flaky(payload, ctx):
        calls.append(ctx.attempt)
        raise ConnectionError("down")

    policy = RetryPolicy(max_attempts=5, initial_delay=3.0, jitter=0.0)
    async with Runtime([Workflow("w", [Step(fn=flaky, retry=policy)])], clock=clock) as rt:
        run = await rt.spawn("w", 1)
        await until(lambda: rt.get(run.run_id).status is Status.retrying)
        await run.cancel()
        with anyio.fail_after(5), pytest.raises(RunCancelledError):
            await run.wait_finished()
        version = rt.get(run.run_id).version
        await clock.advance(10.0)
        assert calls == [1]
        assert rt.get(run.run_id).status is Status.cancelled
        assert rt.get(run.run_id).version == version
        assert rt.dead_letters() == []
        assert rt.statistics().internal_errors == 0


async def test_cancel_of_an_unknown_run_raises_run_not_found(clock):
    async with Runtime([counting(1)], clock=clock) as rt:
        with pytest.raises(RunNotFoundError):
            await rt.cancel("ghost")


# ------------------------------------------------------------------ timeouts


async def test_a_step_timeout_is_recorded_as_step_timeout_error_then_retried(clock, until):
    attempts: list[int] = []
    never = anyio.Event()

    async def first(payload, ctx):
        return payload

    async def slow(payload, ctx):
        attempts.append(ctx.attempt)
        if ctx.attempt == 1:
            await never.wait()
        await anyio.lowlevel.checkpoint()
        return [*payload, "slow"]

    policy = RetryPolicy(max_attempts=3, initial_delay=1.0, jitter=0.0)
    wf = Workflow("t", [first, Step(fn=slow, timeout=5.0, retry=policy)])
    async with Runtime([wf], clock=clock) as rt:
        run = await rt.spawn("t", [], run_id="t1")
        await until(lambda: attempts == [1])
        await clock.advance(4.9)
        assert rt.get("t1").status is Status.running
        assert rt.get("t1").attempt == 1
        await clock.advance(0.1)
        await until(lambda: rt.get("t1").status is Status.retrying)
        snap = rt.get("t1")
        assert snap.error is not None
        assert snap.error.type == "hotstate.StepTimeoutError"
        assert (snap.error.step, snap.error.step_name, snap.error.attempt) == (
            1,
            "slow",
            1,
        )
        assert "timed out after 5 s" in snap.error.message
        failed = [t for t in rt.history("t1") if t.kind is TransitionKind.step_failed]
        assert len(failed) == 1
        assert failed[0].detail is not None
        assert failed[0].detail.startswith("StepTimeoutError")
        await clock.advance(0.999)
        assert attempts == [1]
        await clock.advance(0.001)
        with anyio.fail_after(5):
            assert await run.wait_finished() == ["slow"]
        assert attempts == [1, 2]
        stats = rt.statistics().supervisor
        assert (stats.failures, stats.retries, stats.give_ups) == (1, 1, 0)


async def test_a_step_that_finishes_before_its_timeout_is_not_interrupted(clock, until):
    release = anyio.Event()

    async def slow(payload, ctx):
        await release.wait()
        return payload + 1

    wf = Workflow("t", [Step(fn=slow, timeout=5.0, retry=NEVER)])
    async with Runtime([wf], clock=clock) as rt:
        run = await rt.spawn("t", 0)
        await until(lambda: clock.sleepers == 1)
        await clock.advance(4.0)
        release.set()
        with anyio.fail_after(5):
            assert await run.wait_finished() == 1
        await clock.advance(10.0)
        assert rt.get(run.run_id).status is Status.done
        assert rt.statistics().timers == 0


async def test_a_sync_step_with_a_timeout_runs_normally(clock):
    wf = Workflow("t", [Step(fn=add_one_sync, timeout=1.0)])
    async with Runtime([wf], clock=clock) as rt:
        run = await rt.spawn("t", 0)
        with anyio.fail_after(5):
            assert await run.wait_finished() == 1
        assert rt.statistics().timers == 0


# ------------------------------------------------------------------ isolation and fairness


async def test_other_runs_keep_running_while_one_fails_retries_or_times_out(clock, until):
    never = anyio.Event()

    async def flaky(payload, ctx):
        raise ConnectionError("down")

    async def hang(payload, ctx):
        await never.wait()

    async def hop(payload, ctx):
        await anyio.lowlevel.checkpoint()
        return payload + 1

    retrying = RetryPolicy(max_attempts=2, initial_delay=30.0, jitter=0.0)
    wfs = [
        Workflow("flaky", [Step(fn=flaky, retry=retrying)]),
        Workflow("broken", [Step(fn=flaky, retry=NEVER)]),
        Workflow("hang", [Step(fn=hang, timeout=10.0, retry=NEVER)]),
        Workflow("healthy", [Step(fn=hop, name=f"h{i}") for i in range(5)]),
    ]
    async with Runtime(wfs, clock=clock) as rt:
        flaky_run = await rt.spawn("flaky", 0)
        broken_run = await rt.spawn("broken", 0)
        hang_run = await rt.spawn("hang", 0)
        healthy = [await rt.spawn("healthy", i) for i in range(3)]
        with anyio.fail_after(5):
            assert [await r.wait_finished() for r in healthy] == [5, 6, 7]
        assert rt.get(flaky_run.run_id).status is Status.retrying
        assert rt.get(broken_run.run_id).status is Status.failed
        assert rt.get(hang_run.run_id).status is Status.pending  # still in its first step
        assert clock.now() == 0.0
        late = await rt.spawn("healthy", 100)
        await clock.advance(10.0)  # the hang run times out and fails
        with anyio.fail_after(5):
            assert await late.wait_finished() == 105
        await clock.advance(30.0)
        for run in (flaky_run, broken_run, hang_run):
            with anyio.fail_after(5), pytest.raises(RunFailedError):
                await run.wait_finished()
        assert rt.statistics().internal_errors == 0


async def test_ten_thousand_synchronous_steps_do_not_starve_another_run(clock):
    progress = {"big": 0}
    observed: list[int] = []

    def tick(payload, ctx):
        progress["big"] += 1
        return payload

    async def hop(payload, ctx):
        observed.append(progress["big"])
        await anyio.lowlevel.checkpoint()
        return payload

    big = Workflow("big", [Step(fn=tick, name=f"s{i}") for i in range(10_000)])
    small = Workflow("small", [Step(fn=hop, name=f"h{i}") for i in range(5)])
    async with Runtime([big, small], clock=clock) as rt:
        big_run = await rt.spawn("big", None)
        small_run = await rt.spawn("small", None)
        with anyio.fail_after(5):
            await small_run.wait_finished()
            finished_at = progress["big"]
            await big_run.wait_finished()
    assert progress["big"] == 10_000
    # The small run interleaved with the big one and finished long before it.
    assert finished_at < 10_000
    assert observed == sorted(observed)
    assert observed[-1] < 10_000


async def test_a_crashing_step_does_not_disturb_runs_spawned_after_it(clock):
    async def boom(payload, ctx):
        raise ValueError("bad input")

    wfs = [Workflow("boom", [Step(fn=boom, retry=NEVER)]), counting(2)]
    async with Runtime(wfs, clock=clock) as rt:
        bad = await rt.spawn("boom", 0)
        good = await rt.spawn("count", 0)
        with anyio.fail_after(5):
            assert await good.wait_finished() == 2
            with pytest.raises(RunFailedError):
                await bad.wait_finished()


# ------------------------------------------------------------------ shutdown


async def test_shutdown_waits_for_the_step_in_flight_then_starts_no_other(clock, until):
    started = anyio.Event()
    release = anyio.Event()
    later: list[str] = []

    async def first(payload, ctx):
        return [*payload, "first"]

    async def in_flight(payload, ctx):
        started.set()
        await release.wait()
        return [*payload, "in flight"]

    async def after(payload, ctx):
        later.append("ran")
        return payload

    async def release_once_stopping(rt: Runtime) -> None:
        await until(lambda: rt.state == "closing")
        release.set()

    wf = Workflow("w", [first, in_flight, after])
    with anyio.fail_after(5):
        async with (
            anyio.create_task_group() as tg,
            Runtime([wf], clock=clock, shutdown_timeout=5.0) as rt,
        ):
            run = await rt.spawn("w", [], run_id="r1")
            await started.wait()
            tg.start_soon(release_once_stopping, rt)
    snap = rt.get("r1")
    assert snap.payload == ["first", "in flight"]
    assert (snap.status, snap.step) == (Status.running, 2)
    assert later == []
    assert run.history()[-1].version == snap.version


async def test_shutdown_cancels_a_suspended_step_after_the_timeout_and_keeps_the_latest_snapshot(clock, caplog):
    started = anyio.Event()
    never = anyio.Event()
    cleanup: list[str] = []

    async def first(payload, ctx):
        return payload + 1

    async def stuck(payload, ctx):
        started.set()
        try:
            await never.wait()
        finally:
            cleanup.append("cancelled")
        return payload

    wf = Workflow("w", [first, stuck])
    with anyio.fail_after(5):
        # The one place real time passes: a tiny shutdown_timeout.
        async with Runtime([wf], clock=clock, shutdown_timeout=0.05) as rt:
            run = await rt.spawn("w", 1, run_id="r1")
            await started.wait()
            before = rt.get("r1")
    after = rt.get("r1")
    assert after == before
    assert (after.status, after.step, after.payload, after.error) == (
        Status.running,
        1,
        2,
        None,
    )
    assert cleanup == ["cancelled"]
    assert [t.kind for t in run.history()] == [
        TransitionKind.spawned,
        TransitionKind.step,
    ]
    assert_no_supervision(rt)
    assert any("still running" in r.getMessage() for r in caplog.records)


async def test_wait_finished_callers_get_runtime_closed_when_the_runtime_shuts_down(clock, until):
    outcome: list[BaseException] = []

    async def pay(payload, ctx):
        return payload

    async def waiter(rt: Runtime, run_id: str) -> None:
        try:
            await rt.wait_finished(run_id)
        except RuntimeClosedError as exc:
            outcome.append(exc)

    wf = Workflow("order", [Step(fn=pay, wait_for="paid")])
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg, Runtime([wf], clock=clock) as rt:
            run = await rt.spawn("order", 1)
            await until(lambda: rt.get(run.run_id).status is Status.waiting)
            tg.start_soon(waiter, rt, run.run_id)
            await until(lambda: rt._registry.actor(run.run_id).waiters is not None)
    assert len(outcome) == 1
    with pytest.raises(RuntimeClosedError):
        await rt.wait_finished(run.run_id)


async def test_list_runs_without_filters_is_oldest_first_across_workflows(clock, until):
    async def pay(payload, ctx):
        return payload

    a = Workflow("a", [Step(fn=pay, wait_for="go")])
    b = Workflow("b", [Step(fn=pay, wait_for="go")])
    async with Runtime([a, b], clock=clock) as rt:
        for run_id, name in [("r1", "a"), ("r2", "b"), ("r3", "a"), ("r4", "b")]:
            await rt.spawn(name, 0, run_id=run_id)
        await until(lambda: rt.count(status="waiting") == 4)
        # Runtime.list_runs documents `limit` as "at most this many, oldest first".
        assert [s.run_id for s in rt.list_runs()] == ["r1", "r2", "r3", "r4"]
        assert [s.run_id for s in rt.list_runs(limit=2)] == ["r1", "r2"]
