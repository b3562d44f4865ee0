"""The SIGKILL harness's parts without a child process: the config, the messages, policies, the trace instrument."""

from __future__ import annotations

import dataclasses
import json
from typing import TYPE_CHECKING, Any

import anyio
import pytest

from hotstate import FlushPolicy, Runtime, Step, StepContext, Tier, Workflow
from hotstate._bench._ack import Acknowledged, AckWorkload
from hotstate._bench._child import ChildConfig, Ready, parse, send
from hotstate._bench._crashloop import CrashLoopWorkload, Started
from hotstate._bench._lineage import LineageWorkload, Settled
from hotstate._bench._orders import Finished, Orders, Progress, Recovered
from hotstate._bench._policy import Policy
from hotstate._bench._trace import TraceLayout, TraceWriter, read_trace
from hotstate._bench._trial import SignalDriver, Workload, make_workflow, payload, run_id
from hotstate.persistence import MemoryStore, SQLiteStore
from hotstate.testing import ManualClock

if TYPE_CHECKING:
    from pathlib import Path

BASE: dict[str, Any] = {
    "policy": "valkey:0.01,sqlite:1.0",
    "sqlite": "t.db",
    "valkey_url": "valkey://x",
    "prefix": "p",
    "trace": "t.trace",
    "runs": 10,
}


@pytest.mark.parametrize(
    "config",
    [
        ChildConfig(**BASE, trial=Workload(inflight=4, pace=0.01)),
        ChildConfig(
            **BASE,
            orders=Orders(tag="t", count=10, fail_index=7, ledger="l", gen=2, seed="s"),
            recover=True,
            linger=0.0,
        ),
        ChildConfig(**BASE, ack=AckWorkload(op="send", run_id="send-3")),
        ChildConfig(**BASE, lineage=LineageWorkload(tag="t", early=3, late=1, unpaid=(0, 2), ledger="l")),
        ChildConfig(
            **BASE,
            crash_loop=CrashLoopWorkload(tag="t", ordinary=2, poison_at=1, work=(0.01, 0.05, 0.02), ledger="l"),
            recover=True,
            crash_limit=4,
            linger=0.0,
        ),
    ],
)
def test_the_child_config_round_trips_through_json(config):
    assert ChildConfig.from_json(config.to_json()) == config
    assert config.layout == TraceLayout(10, 48)


@pytest.mark.parametrize(
    "message",
    [
        Ready(),
        Progress(gen=1, t=0.5, table={"ship|waiting": 3}, lags={"valkey": 0.01}, retries=2, transitions=40),
        Recovered(
            resumed=3,
            by_tier={"valkey": 3},
            corrupt=0,
            lost=0,
            unregistered=0,
            seconds=0.01,
            already_finished=1,
            respawned=0,
        ),
        Finished(dead_letters=["t-order-0007"], compensations={"t-order-0007": ["refund", "release_stock"]}),
        Acknowledged(op="cancel", run_id="cancel-1", acked=3, version=3, status="cancelled"),
        Settled(finished=["t-000"], parked=["t-001"], durable={"t-000": {"hot": 5, "valkey": 5, "sqlite": 2}}),
        Started(resumed=["t-job-00"], crash_looped=[], held_back=["t-poison"]),
    ],
)
def test_messages_travel_as_json_with_their_field_names(message, capsys):
    send(message)
    line = capsys.readouterr().out
    fields = json.loads(line)
    assert fields.pop("message") == type(message).__name__
    assert set(fields) == {f.name for f in dataclasses.fields(message)}
    assert parse(line) == message


@pytest.mark.parametrize(
    ("line", "error"),
    [('{"message": "Pro', ValueError), ('{"message": "Nope"}', KeyError), ('{"message": "Ready", "x": 1}', TypeError)],
)
def test_a_line_that_is_not_a_message_raises(line, error):
    with pytest.raises(error):
        parse(line)


def test_write_through_sqlite_tiers_write_with_synchronous_full_and_readers_do_not(tmp_path):
    policy = Policy.parse("sqlite:through,sqlite:0.5")
    tiers = policy.build_tiers(sqlite=tmp_path / "a.db", valkey_url="", prefix="p")
    assert [t.policy for t in tiers] == [FlushPolicy.through(), FlushPolicy(interval=0.5)]
    assert [t.store.synchronous for t in tiers if isinstance(t.store, SQLiteStore)] == ["FULL", "NORMAL"]
    readers = policy.stores(sqlite=tmp_path / "a.db", valkey_url="", prefix="p")
    assert [s.synchronous for s in readers if isinstance(s, SQLiteStore)] == ["NORMAL", "NORMAL"]


@pytest.mark.parametrize(
    ("spec", "ack_tiers", "acknowledging"),
    [
        ("valkey:0.01,sqlite:1.0:ack", ("sqlite",), ("sqlite",)),
        ("sqlite:through", (), ("sqlite",)),
        ("valkey:through,sqlite:1.0", (), ("valkey",)),
        ("valkey:0.01,sqlite:1.0", (), ()),
    ],
)
def test_a_policy_names_its_ack_tiers_and_the_tiers_acknowledgements_wait_for(spec, ack_tiers, acknowledging):
    policy = Policy.parse(spec)
    assert (policy.ack_tiers, policy.acknowledging) == (ack_tiers, acknowledging)
    assert policy.spec == spec
    assert Policy.parse(policy.spec) == policy


def test_a_policy_with_an_unknown_tier_flag_is_refused():
    with pytest.raises(ValueError, match="unknown flag 'fast'"):
        Policy.parse("sqlite:1:fast")


async def step(p: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    return {**p, "n": p["n"] + 1}


async def test_the_trace_writer_records_commits_steps_and_store_writes_as_an_instrument(tmp_path: Path) -> None:
    layout = TraceLayout(runs=3, versions=4)
    path = tmp_path / "t.trace"
    path.write_bytes(bytes(layout.size))
    trace = TraceWriter(str(path), layout, ["memory"])
    wf = Workflow("w", [Step(fn=step, name=f"s{i}") for i in range(6)])
    trace.register("a", 0)
    trace.register("b", 2)
    try:
        tiers = [Tier(MemoryStore(), FlushPolicy(interval=60.0))]
        async with Runtime([wf], tiers=tiers, clock=ManualClock(), instruments=[trace]) as rt:
            for rid in ("a", "b", "unregistered"):
                await (await rt.spawn(wf, {"n": 0}, run_id=rid)).wait_finished()
            await rt.flush()
            final = rt.get("a")
            transitions = rt.statistics().transitions
        trace.slots[TraceLayout.STARTED] = 3
    finally:
        trace.close()
    read = read_trace(path, layout, tiers=1)
    assert read.hot == [final.version, 0, final.version]  # slot 1 never registered
    assert read.steps == [final.step, 0, final.step]
    assert read.commits == 2 * transitions // 3  # the unregistered run is not traced
    assert all(t > 0 for t in read.times[0][1:])  # versions 1..4 timed (higher ones are only counted)
    _, _, started, ended = read.flush[0]
    assert 0 < started <= ended  # the flush's store write, stamped around


async def test_the_signal_driver_signals_runs_that_wait_without_asking_and_each_run_once() -> None:
    # As a run recovered past its request step: it waits for `paid` but never asks.
    driver = SignalDriver()
    wf = make_workflow(work_steps=1, fail_every=0, flaky_every=0, request_signal=lambda rid: None)
    ids = [run_id(i) for i in range(3)]
    async with Runtime([wf]) as rt:
        for i, rid in enumerate(ids):
            await rt.spawn(wf, payload(i), run_id=rid)
        driver.request(ids[0])
        driver.request(ids[0])  # asked twice (by its step, then seen waiting): one signal
        with anyio.fail_after(5):  # a hang guard only
            await driver.drive(rt, ids)
        assert all(rt.get(rid).status == "done" for rid in ids)
        assert [sum(t.kind == "signal" for t in rt.history(rid)) for rid in ids] == [1, 1, 1]
    assert driver.requested == set(ids)
