# mypy: allow-untyped-defs
# mypy: disable-error-code="arg-type,list-item"
"""Inputs bounded and typed (#11): every public entry that takes a run id or a signal name checks it.

Wrong types are the point of this file, so mypy's arg-type check is off here.
"""

from __future__ import annotations

import inspect
from typing import Any

import anyio
import pytest

from hotstate import (
    ConfigError,
    FlushPolicy,
    RetryPolicy,
    RunConflictError,
    RunFailedError,
    RunNotFoundError,
    Runtime,
    Step,
    Tier,
    Workflow,
)
from hotstate.persistence import MemoryStore
from hotstate.testing import checkpoint_until


async def take(payload, ctx):
    return {**payload, ctx.step_name: ctx.signal}


PARKED = Workflow(
    "parked", [Step(fn=take, name="pay", wait_for="paid"), Step(fn=take, name="ship", wait_for="shipped")]
)

BAD_IDS = [
    pytest.param("a\x00b", "control characters", id="nul"),
    pytest.param("r\n1", "control characters", id="newline"),
    pytest.param("r" * 1_000_000, "at most 256 bytes", id="1MB"),
    pytest.param("", "must not be empty", id="empty"),
    pytest.param("\udcff", "UTF-8", id="surrogate"),
    pytest.param(123, "must be a str, not int", id="int"),
    pytest.param(["r1"], "must be a str, not list", id="list"),
]

# Every public Runtime method that takes a run id, called with ``bad`` in its place.
RUN_ID_ENTRIES: list[tuple[str, Any]] = [
    ("spawn", lambda rt, bad: rt.spawn(PARKED, {}, run_id=bad)),
    ("handle", lambda rt, bad: rt.handle(bad)),
    ("get", lambda rt, bad: rt.get(bad)),
    ("load", lambda rt, bad: rt.load(bad)),
    ("history", lambda rt, bad: rt.history(bad)),
    ("send", lambda rt, bad: rt.send(bad, "paid")),
    ("cancel", lambda rt, bad: rt.cancel(bad)),
    ("wait_finished", lambda rt, bad: rt.wait_finished(bad)),
    ("retry_dead_letter", lambda rt, bad: rt.retry_dead_letter(bad)),
    ("snapshot_at", lambda rt, bad: rt.snapshot_at(bad, 1)),
    ("durable_versions", lambda rt, bad: rt.durable_versions(bad)),
    ("wait_durable", lambda rt, bad: rt.wait_durable(bad)),
    ("subscribe", lambda rt, bad: rt.subscribe(run_id=bad)),
]


async def call_(result: Any) -> Any:
    return await result if inspect.isawaitable(result) else result


@pytest.mark.parametrize(("method", "entry"), RUN_ID_ENTRIES, ids=[m for m, _ in RUN_ID_ENTRIES])
@pytest.mark.parametrize(("bad", "reason"), BAD_IDS)
async def test_every_entry_taking_a_run_id_refuses_a_bad_one_with_config_error(clock, method, entry, bad, reason):
    async with Runtime([PARKED], clock=clock) as rt:
        await rt.spawn(PARKED, {}, run_id="r1")
        with pytest.raises(ConfigError, match=reason) as info:
            await call_(entry(rt, bad))
        assert info.value.field == f"{method}.run_id"
        assert rt.count() == 1  # nothing was started


@pytest.mark.parametrize(("method", "entry"), RUN_ID_ENTRIES[1:-1], ids=[m for m, _ in RUN_ID_ENTRIES[1:-1]])
async def test_a_valid_id_of_no_run_is_still_run_not_found(clock, method, entry):
    async with Runtime([PARKED], clock=clock) as rt:
        with pytest.raises(RunNotFoundError):
            await call_(entry(rt, "ghost"))


async def test_a_spawned_run_with_a_non_ascii_id_is_found_by_every_lookup(clock):
    async with Runtime([PARKED], clock=clock) as rt:
        run = await rt.spawn(PARKED, {}, run_id="commande-été-🙂")
        assert rt.get("commande-été-🙂").run_id == run.run_id
        assert rt.history("commande-été-🙂")[0].run_id == "commande-été-🙂"
        await rt.send("commande-été-🙂", "paid", 1)


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        pytest.param("paid\x00", "control characters", id="nul"),
        pytest.param("p" * 129, "at most 128 bytes", id="long"),
        pytest.param("", "must not be empty", id="empty"),
        pytest.param(7, "must be a str, not int", id="int"),
    ],
)
async def test_send_refuses_a_bad_signal_name_before_anything_is_queued(clock, bad, reason):
    async with Runtime([PARKED], clock=clock) as rt:
        run = await rt.spawn(PARKED, {}, run_id="r1")
        before = rt.get("r1")
        with pytest.raises(ConfigError, match=reason) as info:
            await run.send(bad)
        assert info.value.field == "send.signal"
        assert rt.get("r1").version == before.version


# ------------------------------------------------------------------ wrong types


class NotAStore:
    pass


def _runtime(**options: Any) -> Runtime:
    return Runtime([PARKED], **options)


# (the call, the field the ConfigError names): misuse that used to raise AttributeError,
# TypeError or ValueError from deep inside, or pass silently.
CONSTRUCTION: list[tuple[str, Any, str]] = [
    ("Tier(store, None)", lambda: Tier(MemoryStore(), None), "Tier.policy"),
    ("Tier(None)", lambda: Tier(None), "Tier.store"),
    ("Tier(object)", lambda: Tier(NotAStore()), "Tier.store"),
    ("Tier(store, dict)", lambda: Tier(MemoryStore(), {"interval": 1}), "Tier.policy"),
    ("FlushPolicy(interval='1')", lambda: FlushPolicy(interval="1"), "FlushPolicy.interval"),
    ("FlushPolicy(max_batch_rows=1.5)", lambda: FlushPolicy(max_batch_rows=1.5), "FlushPolicy.max_batch_rows"),
    ("FlushPolicy(write_through=1)", lambda: FlushPolicy(write_through=1), "FlushPolicy.write_through"),
    (
        "FlushPolicy.write_behind(bogus)",
        lambda: FlushPolicy.write_behind(1.0, bogus=1),
        "FlushPolicy.write_behind.bogus",
    ),
    ("FlushPolicy.through(bogus)", lambda: FlushPolicy.through(intervall=1), "FlushPolicy.through.intervall"),
    ("RetryPolicy(non_retryable=int)", lambda: RetryPolicy(non_retryable=5), "RetryPolicy.non_retryable"),
    ("RetryPolicy(non_retryable=cls)", lambda: RetryPolicy(non_retryable=ValueError), "RetryPolicy.non_retryable"),
    ("Workflow(steps=None)", lambda: Workflow("w", None), "Workflow('w').steps"),
    ("Workflow(version='1')", lambda: Workflow("w", [take], version="1"), "Workflow('w').version"),
    ("Step(timeout='1')", lambda: Step(fn=take, timeout="1"), "Step('take').timeout"),
    ("Runtime(workflows=5)", lambda: Runtime(5), "Runtime.workflows"),
    ("Runtime(workflows=[5])", lambda: Runtime([5]), "Runtime.workflows"),
    ("Runtime(clock=5)", lambda: _runtime(clock=5), "Runtime.clock"),
    ("Runtime(rng=5)", lambda: _runtime(rng=5), "Runtime.rng"),
    ("Runtime(intensity=5)", lambda: _runtime(intensity=5), "Runtime.intensity"),
    ("Runtime(codec=5)", lambda: _runtime(codec=5), "Runtime.codec"),
    ("Runtime(tiers=tier)", lambda: _runtime(tiers=Tier(MemoryStore())), "Runtime.tiers"),
    ("Runtime(tiers=[store])", lambda: _runtime(tiers=[MemoryStore()]), "Runtime.tiers"),
    ("Runtime(instruments=5)", lambda: _runtime(instruments=5), "Runtime.instruments"),
    ("Runtime(ack_tiers='t')", lambda: _runtime(tiers=[Tier(MemoryStore())], ack_tiers="memory"), "Runtime.ack_tiers"),
    ("Runtime(ack_tiers=[5])", lambda: _runtime(ack_tiers=[5]), "Runtime.ack_tiers"),
    ("Runtime(steps_per_turn='9')", lambda: _runtime(steps_per_turn="9"), "Runtime.steps_per_turn"),
    ("Runtime.register(5)", lambda: _runtime().register(5), "Runtime.register.workflow"),
    ("Runtime(max_pending_signals=0)", lambda: _runtime(max_pending_signals=0), "Runtime.max_pending_signals"),
    ("Runtime(max_pending_signals='9')", lambda: _runtime(max_pending_signals="9"), "Runtime.max_pending_signals"),
]


@pytest.mark.parametrize(("call", "field"), [(c, f) for _, c, f in CONSTRUCTION], ids=[n for n, _, _ in CONSTRUCTION])
def test_wrong_types_at_construction_are_config_errors_naming_the_field(call, field):
    with pytest.raises(ConfigError) as info:
        call()
    assert info.value.field == field


# The same for every public Runtime method, on a running runtime with one run "r1".
METHODS: list[tuple[str, Any, str]] = [
    ("spawn(123)", lambda rt: rt.spawn(123, {}), "spawn.workflow"),
    ("spawn(None)", lambda rt: rt.spawn(None, {}), "spawn.workflow"),
    ("list_runs(limit=-1)", lambda rt: rt.list_runs(limit=-1), "list_runs.limit"),
    ("list_runs(limit='x')", lambda rt: rt.list_runs(limit="x"), "list_runs.limit"),
    ("list_runs(limit=1.5)", lambda rt: rt.list_runs(status="waiting", limit=1.5), "list_runs.limit"),
    ("list_runs(workflow=[])", lambda rt: rt.list_runs(workflow=[]), "list_runs.workflow"),
    ("list_runs(status=[])", lambda rt: rt.list_runs(status=[]), "status"),
    ("count(workflow=5)", lambda rt: rt.count(workflow=5), "count.workflow"),
    ("count(status=5)", lambda rt: rt.count(status=5), "status"),
    ("list_stored(limit=0)", lambda rt: rt.list_stored(limit=0), "list_stored.limit"),
    ("list_stored(after=5)", lambda rt: rt.list_stored(after=5), "list_stored.after"),
    ("subscribe(maxsize='9')", lambda rt: rt.subscribe(maxsize="9"), "subscribe.maxsize"),
    ("subscribe(workflow=5)", lambda rt: rt.subscribe(workflow=5), "subscribe.workflow"),
    ("snapshot_at(version='1')", lambda rt: rt.snapshot_at("r1", "1"), "snapshot_at.version"),
    ("wait_durable(version='1')", lambda rt: rt.wait_durable("r1", "1"), "wait_durable.version"),
    ("wait_durable(tier=5)", lambda rt: rt.wait_durable("r1", tier=5), "wait_durable.tier"),
    ("wait_durable(timeout='1')", lambda rt: rt.wait_durable("r1", timeout="1"), "wait_durable.timeout"),
    ("purge_finished('1')", lambda rt: rt.purge_finished("1"), "purge_finished.older_than"),
    ("evict_finished(-1)", lambda rt: rt.evict_finished(-1), "evict_finished.older_than"),
    ("send(signal=5)", lambda rt: rt.send("r1", 5), "send.signal"),
]


@pytest.mark.parametrize(("call", "field"), [(c, f) for _, c, f in METHODS], ids=[n for n, _, _ in METHODS])
async def test_wrong_types_given_to_runtime_methods_are_config_errors_naming_the_field(clock, call, field):
    async with Runtime([PARKED], clock=clock) as rt:
        await rt.spawn(PARKED, {}, run_id="r1")
        with pytest.raises(ConfigError) as info:
            await call_(call(rt))
        assert info.value.field == field
        assert rt.count() == 1


async def test_retry_dead_letter_from_a_fractional_step_is_a_config_error(clock):
    async def boom(payload, ctx):
        raise RuntimeError("no")

    wf = Workflow("boom", [Step(fn=take, name="a"), Step(fn=boom, name="b")], retry=RetryPolicy.never())
    async with Runtime([wf], clock=clock) as rt:
        run = await rt.spawn(wf, {}, run_id="b1")
        with pytest.raises(RunFailedError):
            await run.wait_finished()
        with pytest.raises(ConfigError) as info:
            await rt.retry_dead_letter("b1", from_step=0.5)
        assert info.value.field == "retry_dead_letter.from_step"
        assert rt.dead_letters()[0].run_id == "b1"  # still dead-lettered: nothing was restarted


# ------------------------------------------------------------------ spawn of an existing id


async def step(payload, ctx):
    return payload


ORDER = Workflow("order", [Step(fn=take, name="pay", wait_for="paid")])
REFUND = Workflow("refund", [Step(fn=take, name="pay_back", wait_for="approved")])
ORDER_V2 = Workflow("order", [Step(fn=take, name="pay", wait_for="paid"), step], version=2)


async def test_spawn_of_an_existing_id_with_another_workflow_is_a_conflict_and_changes_nothing(clock):
    async with Runtime([ORDER, REFUND], clock=clock) as rt:
        first = await rt.spawn(ORDER, {"amount": 5}, run_id="o1")
        before = rt.get("o1")
        for workflow in (REFUND, "refund"):
            with pytest.raises(RunConflictError) as info:
                await rt.spawn(workflow, {"amount": 500}, run_id="o1")
            err = info.value
            assert (err.run_id, err.workflow, err.workflow_version) == ("o1", "order", 1)
            assert (err.requested, err.requested_version) == ("refund", 1)
            assert "'order' v1" in str(err)
            assert "'refund' v1" in str(err)
        assert rt.get("o1") == before
        assert rt.count() == 1
        assert first.created


async def test_the_handle_says_whether_spawn_created_the_run(clock):
    async with Runtime([ORDER], clock=clock) as rt:
        generated = await rt.spawn(ORDER, {})
        first = await rt.spawn(ORDER, {}, run_id="o1")
        again = await rt.spawn("order", {"other": "payload"}, run_id="o1")
        assert (generated.created, first.created, again.created) == (True, True, False)
        assert again == first  # created is not part of equality
        assert rt.get("o1").payload == {}
        assert not rt.handle("o1").created


async def test_spawn_of_an_id_only_a_store_holds_conflicts_on_another_workflow_or_version(clock):
    store = MemoryStore()
    async with Runtime([ORDER], tiers=[Tier(store, FlushPolicy(interval=60.0))], clock=clock) as rt:
        await rt.spawn(ORDER, {"amount": 5}, run_id="o1")
        await rt.flush()
    async with store:
        stored = await store.load("o1")
    assert stored is not None
    async with Runtime([ORDER_V2, REFUND], tiers=[Tier(store, FlushPolicy(interval=60.0))], clock=clock) as rt:
        with pytest.raises(RunConflictError) as info:
            await rt.spawn(REFUND, {"amount": 500}, run_id="o1")
        assert (info.value.workflow, info.value.requested) == ("order", "refund")
        with pytest.raises(RunConflictError) as info:
            await rt.spawn(ORDER_V2, {"amount": 5}, run_id="o1")
        assert (info.value.workflow_version, info.value.requested_version) == (1, 2)
        # Refused before anything of it was resumed: not in memory, not resumed, not rewritten.
        assert rt.count() == 0
        assert (await rt.load("o1")).payload == {"amount": 5}
    async with store:
        assert await store.load("o1") == stored
    async with Runtime([ORDER], tiers=[Tier(store, FlushPolicy(interval=60.0))], clock=clock) as rt:
        adopted = await rt.spawn(ORDER, {"amount": 999}, run_id="o1")
        assert not adopted.created
        assert rt.get("o1").payload == {"amount": 5}


class GatedLoads:
    """A MemoryStore whose ``load`` waits for ``gate`` (two spawns of one new id ask it at once)."""

    def __init__(self) -> None:
        self.inner = MemoryStore()
        self.tier = self.inner.tier
        self.gate = anyio.Event()
        self.loads = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def load(self, run_id: str) -> Any:
        self.loads += 1
        await self.gate.wait()
        return await self.inner.load(run_id)


async def test_two_concurrent_spawns_of_one_new_id_start_it_once(clock):
    store = GatedLoads()
    async with Runtime([ORDER], tiers=[Tier(store, FlushPolicy(interval=60.0))], clock=clock) as rt:
        handles: list[Any] = []

        async def spawn(payload: int) -> None:
            handles.append(await rt.spawn(ORDER, {"n": payload}, run_id="o1"))

        async with anyio.create_task_group() as tg:
            tg.start_soon(spawn, 1)
            tg.start_soon(spawn, 2)
            await checkpoint_until(lambda: store.loads == 2)
            store.gate.set()
        assert sorted(h.created for h in handles) == [False, True]
        assert [t.kind for t in rt.history("o1")][:1] == ["spawned"]
        assert sum(t.kind == "spawned" for t in rt.history("o1")) == 1
