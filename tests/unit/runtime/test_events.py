# mypy: allow-untyped-defs
"""The event bus through the runtime: filtered subscriptions, overflow, close, shutdown."""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio
import anyio.lowlevel
import pytest

from hotstate import (
    ConfigError,
    RetryPolicy,
    Runtime,
    Status,
    Step,
    SubscriberOverflowError,
    Transition,
    TransitionKind,
    Workflow,
)

if TYPE_CHECKING:
    from hotstate.actors import StepFn
    from hotstate.runtime import Subscription


async def add_one(payload, ctx):
    return payload + 1


async def hop(payload, ctx):
    await anyio.lowlevel.checkpoint()  # suspends: exercises the handed-off path too
    return payload + 1


def steps(n: int, fn: StepFn = add_one) -> list[Step]:
    return [Step(fn=fn, name=f"s{i}") for i in range(n)]


def drain(sub: Subscription) -> list[Transition]:
    out = []
    while (t := sub.get_nowait()) is not None:
        out.append(t)
    return out


@pytest.mark.parametrize("fn", [add_one, hop], ids=["inline", "suspending"])
async def test_a_run_subscription_receives_exactly_that_runs_transitions_in_order(clock, fn):
    wf = Workflow("w", steps(4, fn))
    async with Runtime([wf], clock=clock) as rt:
        sub = rt.subscribe(run_id="r1")
        other = await rt.spawn("w", 0, run_id="r0")
        run = await rt.spawn("w", 0, run_id="r1")
        with anyio.fail_after(5):
            await other.wait_finished()
            await run.wait_finished()
        received = drain(sub)
        assert received == run.history()
        assert [t.version for t in received] == [1, 2, 3, 4, 5]
        assert {t.run_id for t in received} == {"r1"}
        assert received[-1].status is Status.done
        await sub.aclose()


async def test_a_workflow_subscription_receives_only_that_workflows_transitions(clock):
    a = Workflow("a", steps(2))
    b = Workflow("b", steps(3))
    async with Runtime([a, b], clock=clock) as rt:
        sub = rt.subscribe(workflow="a")
        runs = [await rt.spawn(name, 0, run_id=f"{name}{i}") for i in range(2) for name in ("a", "b")]
        with anyio.fail_after(5):
            for run in runs:
                await run.wait_finished()
        received = drain(sub)
        assert {t.run_id for t in received} == {"a0", "a1"}
        for run_id in ("a0", "a1"):
            assert [t for t in received if t.run_id == run_id] == rt.history(run_id)
        await sub.aclose()


async def test_a_subscription_by_run_and_workflow_needs_both_to_match(clock):
    a = Workflow("a", steps(1))
    b = Workflow("b", steps(1))
    async with Runtime([a, b], clock=clock) as rt:
        wrong = rt.subscribe(run_id="r1", workflow="a")
        right = rt.subscribe(run_id="r1", workflow="b")
        run = await rt.spawn("b", 0, run_id="r1")
        with anyio.fail_after(5):
            await run.wait_finished()
        assert drain(wrong) == []
        assert drain(right) == run.history()
        await wrong.aclose()
        await right.aclose()


async def test_an_unfiltered_subscription_receives_every_transition(clock):
    wf = Workflow("w", steps(2))
    async with Runtime([wf], clock=clock) as rt:
        sub = rt.subscribe()
        runs = [await rt.spawn("w", 0) for _ in range(3)]
        with anyio.fail_after(5):
            for run in runs:
                await run.wait_finished()
        received = drain(sub)
        assert len(received) == rt.statistics().transitions == 9
        for run in runs:
            assert [t for t in received if t.run_id == run.run_id] == run.history()
        await sub.aclose()


async def test_iterating_a_subscription_yields_transitions_as_they_happen(clock, until):
    received: list[Transition] = []

    async def pay(payload, ctx):
        return payload

    wf = Workflow("w", [Step(fn=pay, wait_for="paid")])

    async def consume(sub: Subscription) -> None:
        async for transition in sub:
            received.append(transition)
            if transition.status is Status.done:
                return

    async with Runtime([wf], clock=clock) as rt:
        sub = rt.subscribe(run_id="r1")
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(consume, sub)
                run = await rt.spawn("w", 0, run_id="r1")
                await until(lambda: len(received) == 2)
                assert [t.kind for t in received] == [
                    TransitionKind.spawned,
                    TransitionKind.waiting,
                ]
                await run.send("paid")
        assert received == run.history()
        await sub.aclose()


async def test_a_slow_subscriber_is_cut_off_after_its_buffer_and_the_runtime_keeps_running(
    clock,
):
    wf = Workflow("w", steps(5))
    async with Runtime([wf], clock=clock) as rt:
        slow = rt.subscribe(maxsize=2)
        healthy = rt.subscribe()
        runs = [await rt.spawn("w", i) for i in range(3)]
        with anyio.fail_after(5):
            results = [await run.wait_finished() for run in runs]
        assert results == [5, 6, 7]
        assert rt.count(status="done") == 3
        assert rt.statistics().subscriber_overflows == 1
        assert rt.statistics().subscribers == 1

        first_two = [await slow.__anext__(), await slow.__anext__()]
        assert first_two == [t for t in drain(healthy) if t.version == 1][:2]
        with pytest.raises(SubscriberOverflowError) as info:
            await slow.__anext__()
        assert info.value.maxsize == 2
        with pytest.raises(SubscriberOverflowError):
            slow.get_nowait()

        # The runtime still runs and still publishes to the healthy subscriber.
        late = await rt.spawn("w", 100)
        with anyio.fail_after(5):
            assert await late.wait_finished() == 105
        assert drain(healthy) == late.history()
        await slow.aclose()
        await healthy.aclose()


async def test_a_slow_subscriber_iterating_with_async_for_gets_its_buffer_then_the_error(
    clock,
):
    wf = Workflow("w", steps(5))
    async with Runtime([wf], clock=clock) as rt:
        slow = rt.subscribe(maxsize=2)
        run = await rt.spawn("w", 0)
        with anyio.fail_after(5):
            await run.wait_finished()
        got: list[Transition] = []

        async def read_all() -> None:
            async for transition in slow:
                got.append(transition)  # noqa: PERF401 - keep what was read before the error

        with pytest.raises(SubscriberOverflowError):
            await read_all()
        assert got == run.history()[:2]


async def test_aclose_ends_iteration_and_stops_delivery(clock):
    wf = Workflow("w", steps(2))
    async with Runtime([wf], clock=clock) as rt:
        sub = rt.subscribe()
        assert rt.statistics().subscribers == 1
        run = await rt.spawn("w", 0)
        with anyio.fail_after(5):
            await run.wait_finished()
        await sub.aclose()
        assert rt.statistics().subscribers == 0
        await sub.aclose()  # idempotent
        assert rt.statistics().subscribers == 0
        buffered = [t async for t in sub]  # what was buffered is still readable, then it ends
        assert buffered == run.history()
        later = await rt.spawn("w", 0)
        with anyio.fail_after(5):
            await later.wait_finished()
        assert [t async for t in sub] == []


async def test_aclose_wakes_a_reader_blocked_on_an_empty_subscription(clock, until):
    done: list[str] = []
    async with Runtime([Workflow("w", steps(1))], clock=clock) as rt:
        sub = rt.subscribe(run_id="nothing-will-happen")

        async def reader() -> None:
            async for _ in sub:
                pass
            done.append("ended")

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(reader)
                await anyio.lowlevel.checkpoint()
                await sub.aclose()
        assert done == ["ended"]


async def test_a_subscription_used_as_a_context_manager_closes_on_exit(clock):
    async with Runtime([Workflow("w", steps(1))], clock=clock) as rt:
        async with rt.subscribe(workflow="w") as sub:
            assert rt.statistics().subscribers == 1
        assert rt.statistics().subscribers == 0
        assert sub.get_nowait() is None


async def test_subscriptions_end_at_runtime_shutdown(clock, until):
    ended: list[int] = []

    async def reader(sub: Subscription, index: int) -> None:
        async for _ in sub:
            pass
        ended.append(index)

    async def pay(payload, ctx):
        return payload

    wf = Workflow("w", [Step(fn=pay, wait_for="paid")])
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg, Runtime([wf], clock=clock) as rt:
            subs = [
                rt.subscribe(),
                rt.subscribe(workflow="w"),
                rt.subscribe(run_id="r1"),
            ]
            for i, sub in enumerate(subs):
                tg.start_soon(reader, sub, i)
            await rt.spawn("w", 0, run_id="r1")
            await until(lambda: rt.get("r1").status is Status.waiting)
            assert ended == []
            # leaving the runtime ends every subscription; then the task group waits for the readers
    assert sorted(ended) == [0, 1, 2]
    assert rt.statistics().subscribers == 0


@pytest.mark.parametrize("maxsize", [0, -1, True, 1.5])
async def test_subscribe_with_a_bad_maxsize_raises_config_error(clock, maxsize):
    async with Runtime([Workflow("w", steps(1))], clock=clock) as rt:
        with pytest.raises(ConfigError, match="maxsize"):
            rt.subscribe(maxsize=maxsize)


async def test_a_crashing_subscriber_never_takes_down_runs(clock, caplog):
    wf = Workflow("w", steps(3))
    async with Runtime([wf], clock=clock) as rt:
        sub = rt.subscribe()

        def explode(transition, workflow):
            raise RuntimeError("subscriber bug")

        rt._bus.publish = explode  # type: ignore[method-assign]
        run = await rt.spawn("w", 0)
        other = await rt.spawn("w", 10)
        with anyio.fail_after(5):
            assert await run.wait_finished() == 3
            assert await other.wait_finished() == 13
        assert rt.statistics().internal_errors >= 2
        assert any("subscriber bug" in str(r.exc_info[1]) for r in caplog.records if r.exc_info)
        await sub.aclose()


async def test_no_transition_is_published_when_nobody_listens(clock):
    async with Runtime([Workflow("w", steps(3), retry=RetryPolicy.never())], clock=clock) as rt:
        run = await rt.spawn("w", 0)
        with anyio.fail_after(5):
            await run.wait_finished()
        assert rt.statistics().published == 0
        sub = rt.subscribe(run_id=run.run_id)
        again = await rt.spawn("w", 0)
        with anyio.fail_after(5):
            await again.wait_finished()
        assert rt.statistics().published == len(again.history())
        assert drain(sub) == []
        await sub.aclose()
