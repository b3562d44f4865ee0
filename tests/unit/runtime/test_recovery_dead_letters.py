"""Dead letters survive a restart: recovery loads them, records runs that failed just before a crash,
and deletes letters made stale by a retry whose deletion never became durable."""

from __future__ import annotations

from typing import Any

import pytest

from hotstate import (
    DeadLetter,
    ErrorInfo,
    FlushPolicy,
    RetryPolicy,
    Runtime,
    Snapshot,
    Status,
    Step,
    StepContext,
    Tier,
    Workflow,
)
from hotstate.persistence import MemoryStore, MsgpackCodec, StoredDeadLetter
from hotstate.persistence._records import encode_dead_letter, encode_snapshot

ATTEMPTS: dict[str, int] = {}


async def first(p: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    return {**p, "first": True}


async def flaky(p: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Fails while ``p["fail"]`` is set in ATTEMPTS for the run; a retry after the restart succeeds."""
    ATTEMPTS[ctx.run_id] = ATTEMPTS.get(ctx.run_id, 0) + 1
    if ATTEMPTS[ctx.run_id] <= p.get("fail_times", 0):
        raise ValueError("card declined")
    return {**p, "charged": True}


def undo(p: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    return {**p, "undone": True}


ORDER = Workflow(
    "order",
    [Step(fn=first, compensate=undo), Step(fn=flaky, retry=RetryPolicy(max_attempts=1))],
)


def tier(store: MemoryStore) -> list[Tier]:
    return [Tier(store, FlushPolicy(interval=60.0))]


async def test_a_dead_letter_can_be_listed_and_retried_after_a_restart():
    store = MemoryStore()
    ATTEMPTS.clear()
    async with Runtime([ORDER], tiers=tier(store)) as rt:
        run = await rt.spawn(ORDER, {"fail_times": 1}, run_id="o1")
        with pytest.raises(Exception, match="card declined"):
            await run.wait_finished()
        assert [d.run_id for d in rt.dead_letters()] == ["o1"]
    async with Runtime([ORDER], tiers=tier(store), recover=True) as rt:
        report = rt.recovery_report
        assert report is not None
        assert report.dead_letters == ("o1",)
        assert report.resumed == ()
        [letter] = rt.dead_letters()
        assert letter.run_id == "o1"
        assert letter.error.message == "card declined"
        assert letter.snapshot.status is Status.failed
        assert rt.get("o1").status is Status.failed
        handle = await rt.retry_dead_letter("o1")
        result = await handle.wait_finished()
        assert result["charged"] is True
        assert rt.dead_letters() == []
    assert await _letters(store) == []  # the retry's deletion was flushed at exit


def _failed_letter(snap: Snapshot, codec: MsgpackCodec) -> StoredDeadLetter:
    error = ErrorInfo(
        type="builtins.ValueError",
        message="card declined",
        traceback="",
        step=1,
        step_name="flaky",
        attempt=1,
        at=snap.updated_at,
    )
    letter = DeadLetter(
        run_id=snap.run_id,
        workflow=snap.workflow,
        snapshot=snap,
        error=error,
        attempts=(error,),
        compensation_errors=(),
        at=snap.updated_at,
    )
    return encode_dead_letter(letter, codec)


async def test_a_run_whose_dead_letter_is_newer_than_its_row_is_recorded_failed_not_resumed():
    # The crash fell between a flush's dead-letter write and its run rows.
    store = MemoryStore()
    codec = MsgpackCodec()
    await store.open()
    running = Snapshot("o2", "order", ORDER.version, 3, 1, Status.running, {"first": True}, None, 1.0)
    await store.save([encode_snapshot(running, codec)], [])
    failed = running._replace(version=7, status=Status.failed, payload={"first": True, "undone": True})
    await store.save_dead_letter(_failed_letter(failed, codec))
    await store.aclose()
    ATTEMPTS.clear()
    async with Runtime([ORDER], tiers=tier(store), recover=True) as rt:
        report = rt.recovery_report
        assert report is not None
        assert report.failed_before_crash == ("o2",)
        assert report.dead_letters == ("o2",)
        assert [r.run_id for r in report.resumed] == []
        assert rt.get("o2").status is Status.failed
        assert rt.get("o2").version == 8  # above every stored version: never reused
        assert [d.run_id for d in rt.dead_letters()] == ["o2"]
        assert ATTEMPTS == {}  # the failed step did not run again
    row = await _load(store, "o2")
    assert (row.header.status, row.header.version) == ("failed", 8)


async def test_a_letter_older_than_its_run_is_stale_and_deleted():
    # The crash fell after a retried run's new rows but before its letter's deletion.
    store = MemoryStore()
    codec = MsgpackCodec()
    await store.open()
    old = Snapshot("o3", "order", ORDER.version, 5, 1, Status.failed, {"first": True}, None, 1.0)
    await store.save_dead_letter(_failed_letter(old, codec))
    retried = old._replace(version=6, status=Status.running)
    await store.save([encode_snapshot(retried, codec)], [])
    await store.aclose()
    ATTEMPTS.clear()
    async with Runtime([ORDER], tiers=tier(store), recover=True) as rt:
        report = rt.recovery_report
        assert report is not None
        assert report.stale_dead_letters == ("o3",)
        assert [r.run_id for r in report.resumed] == ["o3"]
        assert rt.dead_letters() == []
        assert (await rt.wait_finished("o3"))["charged"] is True
    assert await _letters(store) == []


async def _load(store: MemoryStore, run_id: str) -> Any:
    async with store:
        row = await store.load(run_id)
    assert row is not None
    return row


async def _letters(store: MemoryStore) -> list[StoredDeadLetter]:
    async with store:
        return await store.dead_letters()


async def test_a_run_that_exists_only_as_a_dead_letter_gets_its_row_written():
    # The run failed for good before any of its rows reached the tier; its letter did.
    store = MemoryStore()
    codec = MsgpackCodec()
    async with store:
        failed = Snapshot("o4", "order", ORDER.version, 4, 1, Status.failed, {"first": True}, None, 1.0)
        await store.save_dead_letter(_failed_letter(failed, codec))
    async with Runtime([ORDER], tiers=tier(store), recover=True) as rt:
        report = rt.recovery_report
        assert report is not None
        assert report.failed_before_crash == ("o4",)
        assert rt.get("o4").status is Status.failed
        assert [d.run_id for d in rt.dead_letters()] == ["o4"]
    row = await _load(store, "o4")
    assert (row.header.status, row.header.version) == ("failed", 5)


async def test_spawn_of_a_stored_id_takes_the_newest_copy_across_tiers():
    # The fast tier lags behind: it still has the run at step 1, the slow one has it done.
    fast, slow = MemoryStore(tier="fast"), MemoryStore(tier="slow")
    codec = MsgpackCodec()
    running = Snapshot("o5", "order", ORDER.version, 3, 1, Status.running, {"first": True}, None, 1.0)
    done = running._replace(version=6, step=2, status=Status.done, payload={"first": True, "charged": True})
    async with fast:
        await fast.save([encode_snapshot(running, codec)], [])
    async with slow:
        await slow.save([encode_snapshot(done, codec)], [])
    ATTEMPTS.clear()
    tiers = [Tier(fast, FlushPolicy(interval=60.0)), Tier(slow, FlushPolicy(interval=60.0))]
    async with Runtime([ORDER], tiers=tiers) as rt:
        handle = await rt.spawn(ORDER, {"fresh": True}, run_id="o5")
        assert rt.get("o5").status is Status.done
        assert rt.get("o5").version == 6
        assert await handle.wait_finished() == {"first": True, "charged": True}
    assert ATTEMPTS == {}  # nothing ran again
