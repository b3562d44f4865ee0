# mypy: allow-untyped-defs
"""Inputs bounded and typed (#11): every public entry that takes a run id or a signal name checks it."""

from __future__ import annotations

import inspect
from typing import Any

import pytest

from hotstate import ConfigError, RunNotFoundError, Runtime, Step, Workflow


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


async def call(result: Any) -> Any:
    return await result if inspect.isawaitable(result) else result


@pytest.mark.parametrize(("method", "entry"), RUN_ID_ENTRIES, ids=[m for m, _ in RUN_ID_ENTRIES])
@pytest.mark.parametrize(("bad", "reason"), BAD_IDS)
async def test_every_entry_taking_a_run_id_refuses_a_bad_one_with_config_error(clock, method, entry, bad, reason):
    async with Runtime([PARKED], clock=clock) as rt:
        await rt.spawn(PARKED, {}, run_id="r1")
        with pytest.raises(ConfigError, match=reason) as info:
            await call(entry(rt, bad))
        assert info.value.field == f"{method}.run_id"
        assert rt.count() == 1  # nothing was started


@pytest.mark.parametrize(("method", "entry"), RUN_ID_ENTRIES[1:-1], ids=[m for m, _ in RUN_ID_ENTRIES[1:-1]])
async def test_a_valid_id_of_no_run_is_still_run_not_found(clock, method, entry):
    async with Runtime([PARKED], clock=clock) as rt:
        with pytest.raises(RunNotFoundError):
            await call(entry(rt, "ghost"))


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
