# mypy: allow-untyped-defs
"""``send`` takes only a signal some step left will consume (#11 item 4): no orphan queued forever."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from hotstate import (
    ConfigError,
    FlushPolicy,
    RetryPolicy,
    RunFinishedError,
    Runtime,
    SignalQueueFullError,
    Status,
    Step,
    Tier,
    UnknownSignalError,
    Workflow,
)
from hotstate.actors._snapshot import DEDUPE_KEYS_KEPT
from hotstate.persistence import MemoryStore


async def take(payload, ctx):
    return [*payload, (ctx.step_name, ctx.signal)]


ORDER = Workflow(
    "order",
    [Step(fn=take, name="pay", wait_for="paid"), Step(fn=take, name="ship", wait_for="shipped")],
)


async def waiting_at(rt: Runtime, run_id: str, step: int, until: Any) -> None:
    await until(lambda: (rt.get(run_id).status, rt.get(run_id).step) == (Status.waiting, step))


async def test_a_redelivered_webhook_is_refused_and_nothing_is_queued(clock, until):
    async with Runtime([ORDER], clock=clock) as rt:
        run = await rt.spawn(ORDER, [], run_id="o1")
        await run.send("paid", 1)
        await waiting_at(rt, "o1", 1, until)
        before = rt.get("o1")
        with pytest.raises(UnknownSignalError) as info:
            await run.send("paid", 1)  # the payment provider delivers the webhook again
        err = info.value
        assert (err.run_id, err.signal, err.waiting_for) == ("o1", "paid", ("shipped",))
        assert "no step left (at or after step 1) waits for signal 'paid'" in str(err)
        assert "'shipped'" in str(err)
        assert isinstance(err, ConfigError)
        assert err.field == "send.signal"
        assert rt.get("o1") == before  # no new version, nothing queued
        await run.send("shipped", 2)
        with anyio.fail_after(5):
            assert await run.wait_finished() == [("pay", 1), ("ship", 2)]


async def test_a_signal_for_a_later_step_is_queued_until_that_step(clock, until):
    async with Runtime([ORDER], clock=clock) as rt:
        run = await rt.spawn(ORDER, [], run_id="o1")
        await waiting_at(rt, "o1", 0, until)
        await run.send("shipped", "early")  # the current step waits for "paid": fine, a later one takes it
        assert rt.get("o1").signals == (("shipped", "early"),)
        with pytest.raises(UnknownSignalError) as info:
            await run.send("shipped", "again")  # the one step that waits for it has one queued
        assert info.value.waiting_for == ("paid",)
        assert "each of the 1 that do already has one queued" in str(info.value)
        await run.send("paid", "now")
        with anyio.fail_after(5):
            assert await run.wait_finished() == [("pay", "now"), ("ship", "early")]


async def test_a_signal_no_step_waits_for_is_refused_naming_what_the_run_waits_for(clock):
    async with Runtime([ORDER], clock=clock) as rt:
        run = await rt.spawn(ORDER, [], run_id="o1")
        with pytest.raises(UnknownSignalError, match="no step of workflow 'order' waits for signal 'refunded'") as info:
            await run.send("refunded")
        assert info.value.waiting_for == ("paid", "shipped")
        assert rt.get("o1").signals == ()


async def test_as_many_signals_are_taken_as_steps_left_wait_for_them(clock):
    wf = Workflow("collect", [Step(fn=take, name=f"t{i}", wait_for="item") for i in range(3)])
    async with Runtime([wf], clock=clock) as rt:
        run = await rt.spawn(wf, [], run_id="c1")
        for item in ("a", "b", "c"):
            await run.send("item", item)
        with pytest.raises(UnknownSignalError):
            await run.send("item", "d")
        with anyio.fail_after(5):
            assert [data for _, data in await run.wait_finished()] == ["a", "b", "c"]


async def test_a_finished_run_still_raises_run_finished(clock):
    async with Runtime([ORDER], clock=clock) as rt:
        run = await rt.spawn(ORDER, [], run_id="o1")
        await run.send("paid")
        await run.send("shipped")
        with anyio.fail_after(5):
            await run.wait_finished()
        with pytest.raises(RunFinishedError):
            await run.send("paid")


async def test_a_compensating_run_takes_no_signal(clock, until):
    undo_started = anyio.Event()
    release = anyio.Event()

    async def undo(payload, ctx):
        undo_started.set()
        await release.wait()

    async def boom(payload, ctx):
        raise RuntimeError("card declined")

    wf = Workflow(
        "saga",
        [
            Step(fn=take, name="reserve", compensate=undo),
            Step(fn=boom, name="charge"),
            Step(fn=take, name="ship", wait_for="shipped"),
        ],
        retry=RetryPolicy.never(),
    )
    async with Runtime([wf], clock=clock) as rt:
        run = await rt.spawn(wf, [], run_id="s1")
        with anyio.fail_after(5):
            await undo_started.wait()
        assert rt.get("s1").status is Status.compensating
        with pytest.raises(UnknownSignalError, match="compensating") as info:
            await run.send("shipped")
        assert info.value.waiting_for == ()
        release.set()
        with pytest.raises(Exception, match="card declined"):
            await run.wait_finished()
        assert rt.get("s1").signals == ()


async def test_a_step_sending_to_its_own_run_counts_what_it_already_sent(clock):
    outcomes: list[Any] = []

    async def announce(payload, ctx):
        for n in (1, 2):
            try:
                await rt.send(ctx.run_id, "next", n)
                outcomes.append(n)
            except UnknownSignalError as exc:
                outcomes.append(exc.signal)
        return payload

    wf = Workflow("self", [Step(fn=announce, name="announce"), Step(fn=take, name="then", wait_for="next")])
    async with Runtime([wf], clock=clock) as rt:
        run = await rt.spawn(wf, [], run_id="me")
        with anyio.fail_after(5):
            assert await run.wait_finished() == [("then", 1)]
        assert outcomes == [1, "next"]


# ------------------------------------------------------------------ the bound per run


def feeder(n: int) -> Workflow:
    """A first step that waits for "start", then ``n`` steps that each take one "item"."""
    return Workflow(
        "feed",
        [
            Step(fn=take, name="start", wait_for="start"),
            *(Step(fn=take, name=f"i{k}", wait_for="item") for k in range(n)),
        ],
    )


async def test_pending_signals_are_bounded_per_run_and_a_full_queue_takes_nothing(clock, until):
    wf = feeder(5)
    async with Runtime([wf], clock=clock, max_pending_signals=3) as rt:
        run = await rt.spawn(wf, [], run_id="f1")
        for k in range(3):
            await run.send("item", k)
        before = rt.get("f1")
        with pytest.raises(SignalQueueFullError) as info:
            await run.send("item", 3)
        assert (info.value.run_id, info.value.signal, info.value.limit) == ("f1", "item", 3)
        assert rt.get("f1") == before
        with pytest.raises(SignalQueueFullError):
            await run.send("start")  # full is full, whatever the name
        await rt.cancel("f1")


async def test_a_queue_that_was_full_takes_signals_again_once_steps_consume_them(clock, until):
    wf = Workflow("pair", [Step(fn=take, name="a", wait_for="x"), Step(fn=take, name="b", wait_for="y")])
    async with Runtime([wf], clock=clock, max_pending_signals=1) as rt:
        run = await rt.spawn(wf, [], run_id="p1")
        await waiting_at(rt, "p1", 0, until)
        await run.send("y", 2)  # for the later step: queued, and the queue is full
        with pytest.raises(SignalQueueFullError):
            await run.send("x", 1)
        assert rt.get("p1").signals == (("y", 2),)
        await rt.cancel("p1")


async def test_the_default_bound_is_a_thousand(clock):
    wf = feeder(1_001)
    async with Runtime([wf], clock=clock) as rt:
        run = await rt.spawn(wf, [], run_id="f1")
        for k in range(1_000):
            await run.send("item", k)
        assert len(rt.get("f1").signals) == 1_000
        with pytest.raises(SignalQueueFullError):
            await run.send("item", 1_000)
        await rt.cancel("f1")


async def test_signals_of_a_stored_run_are_appended_to_after_adoption(clock, until):
    """A decoded snapshot holds a plain tuple of pairs: the first send after adoption builds ``Signals`` from it."""
    wf = feeder(3)
    store = MemoryStore()
    tiers = [Tier(store, FlushPolicy(interval=60.0))]
    async with Runtime([wf], tiers=tiers, clock=clock) as rt:
        run = await rt.spawn(wf, [], run_id="f1")
        await run.send("item", "a")
        await run.send("item", "b")
        await rt.flush()
    async with Runtime([wf], tiers=tiers, clock=clock) as rt:
        run = await rt.spawn(wf, [], run_id="f1")
        assert not run.created
        assert rt.get("f1").signals == (("item", "a"), ("item", "b"))
        await run.send("item", "c")
        with pytest.raises(UnknownSignalError):
            await run.send("item", "d")  # three steps take an item, three are queued
        await run.send("start", "go")
        with anyio.fail_after(5):
            assert [data for _, data in await run.wait_finished()] == ["go", "a", "b", "c"]


# ------------------------------------------------------------------ dedupe keys


async def test_a_redelivery_with_the_same_dedupe_key_is_a_no_op_even_after_it_was_consumed(clock, until):
    async with Runtime([ORDER], clock=clock) as rt:
        run = await rt.spawn(ORDER, [], run_id="o1")
        await run.send("paid", 1, dedupe_key="evt_1")
        await waiting_at(rt, "o1", 1, until)
        before = rt.get("o1")
        assert before.dedupe == ("evt_1",)
        await run.send("paid", 1, dedupe_key="evt_1")  # returns as the first did: no UnknownSignalError
        await rt.send("o1", "paid", "other data", dedupe_key="evt_1")
        assert rt.get("o1") == before  # nothing queued, no new version
        await run.send("shipped", 2, dedupe_key="evt_2")
        with anyio.fail_after(5):
            assert await run.wait_finished() == [("pay", 1), ("ship", 2)]
        await run.send("shipped", 2, dedupe_key="evt_2")  # after the run finished: still answered
        assert rt.get("o1").dedupe == ("evt_1", "evt_2")
        with pytest.raises(RunFinishedError):
            await run.send("shipped", 2, dedupe_key="evt_3")  # a new delivery to a finished run


async def test_a_duplicate_before_consumption_queues_nothing(clock, until):
    wf = feeder(3)
    async with Runtime([wf], clock=clock) as rt:
        run = await rt.spawn(wf, [], run_id="f1")
        await run.send("item", "a", dedupe_key="k1")
        await run.send("item", "a", dedupe_key="k1")
        await run.send("item", "b", dedupe_key="k2")
        await run.send("item", "c")  # no key: always a new signal
        assert rt.get("f1").signals == (("item", "a"), ("item", "b"), ("item", "c"))
        await run.send("start", "go")
        with anyio.fail_after(5):
            assert [data for _, data in await run.wait_finished()] == ["go", "a", "b", "c"]


async def test_a_run_remembers_its_last_thousand_dedupe_keys(clock):
    wf = feeder(DEDUPE_KEYS_KEPT + 1)
    async with Runtime([wf], clock=clock, max_pending_signals=2 * DEDUPE_KEYS_KEPT) as rt:
        run = await rt.spawn(wf, [], run_id="f1")
        for k in range(DEDUPE_KEYS_KEPT + 1):
            await run.send("item", k, dedupe_key=f"k{k}")
        keys = rt.get("f1").dedupe
        assert (len(keys), keys[0], keys[-1]) == (DEDUPE_KEYS_KEPT, "k1", f"k{DEDUPE_KEYS_KEPT}")
        version = rt.get("f1").version
        await run.send("item", "again", dedupe_key="k1")
        assert rt.get("f1").version == version
        with pytest.raises(UnknownSignalError):
            await run.send("item", "again", dedupe_key="k0")  # forgotten: a new delivery, and no step wants it
        await rt.cancel("f1")


async def test_a_step_resending_with_one_dedupe_key_sends_once(clock, until):
    async def announce(payload, ctx):
        await rt.send(ctx.run_id, "next", 1, dedupe_key="once")
        await rt.send(ctx.run_id, "next", 2, dedupe_key="once")  # still in the mailbox: a duplicate
        return payload

    wf = Workflow(
        "self",
        [
            Step(fn=announce, name="announce"),
            Step(fn=take, name="then", wait_for="next"),
            Step(fn=take, name="later", wait_for="next"),
        ],
    )
    async with Runtime([wf], clock=clock) as rt:
        run = await rt.spawn(wf, [], run_id="me")
        await waiting_at(rt, "me", 2, until)
        assert rt.get("me").dedupe == ("once",)
        await run.send("next", 3, dedupe_key="twice")
        with anyio.fail_after(5):
            assert await run.wait_finished() == [("then", 1), ("later", 3)]


async def test_a_duplicate_under_write_through_returns_once_the_run_is_durable(clock, until):
    async def keep(payload, ctx):
        return [*payload, ctx.signal]

    wf = Workflow("order", [Step(fn=keep, name="pay", wait_for="paid"), Step(fn=keep, name="ship", wait_for="shipped")])
    async with Runtime([wf], tiers=[Tier(MemoryStore(), FlushPolicy.through())], clock=clock) as rt:
        run = await rt.spawn(wf, [], run_id="o1")
        await run.send("paid", 1, dedupe_key="evt_1")
        await waiting_at(rt, "o1", 1, until)
        await run.send("paid", 1, dedupe_key="evt_1")
        assert rt.durable_versions("o1")["memory"] == rt.get("o1").version


@pytest.mark.parametrize(
    ("bad", "reason"),
    [("", "must not be empty"), ("k\x00", "control characters"), ("k" * 257, "at most 256 bytes"), (7, "not int")],
)
async def test_a_bad_dedupe_key_is_a_config_error_and_nothing_is_queued(clock, bad, reason):
    async with Runtime([ORDER], clock=clock) as rt:
        run = await rt.spawn(ORDER, [], run_id="o1")
        before = rt.get("o1")
        with pytest.raises(ConfigError, match=reason) as info:
            await run.send("paid", 1, dedupe_key=bad)
        assert info.value.field == "send.dedupe_key"
        assert rt.get("o1") == before
