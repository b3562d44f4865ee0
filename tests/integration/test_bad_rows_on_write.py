"""One bad run never blocks a tier (#11, item 3), on a real Valkey and real SQLite files.

Each test is an attack the red team made, with 100 ordinary runs beside the bad
one: text that does not encode, a version out of range, a stored key of the
wrong type. Before the fix every flush of the tier failed (under backpressure
the runtime stalled, and a graceful shutdown left SQLite with 1 of 101 runs).
Now the tier writes every other run, the bad run is failed with a
``RunRejectedError`` naming it, the tier and the reason (or, when it can be
stored, it is stored with its text made storable), the tier's statistics count
it, and a graceful shutdown leaves every other run durable in every tier.

Flushes are driven with ``rt.flush()`` and the shutdown; ``anyio.fail_after``
is only a hang guard.
"""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING, Any

import anyio
import pytest
import valkey

from hotstate import (
    CodecError,
    MsgpackCodec,
    RetryPolicy,
    RunFailedError,
    RunRejectedError,
    Runtime,
    Snapshot,
    StaleVersionError,
    Status,
    Step,
    StepContext,
    SystemClock,
    Tier,
    Transition,
    TransitionKind,
    Workflow,
)
from hotstate.actors import _actor, _snapshot
from hotstate.persistence import DEFAULT_SHARDS, FlushPolicy, SQLiteStore, ValkeyStore, shard_of
from hotstate.persistence._tiers import Tiers

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from pathlib import Path

GUARD = 20  # seconds; a hang guard only
N = 100  # ordinary runs beside the bad one


async def inc(p: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    return {**p, "n": p["n"] + 1}


async def take(p: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    return {**p, "got": ctx.signal}


async def bad_file(p: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    if p.get("bad"):
        # A file name that is not UTF-8, as os.fsdecode gives it: a lone surrogate.
        raise ValueError("bad file \udcff.txt")
    return {**p, "n": p["n"] + 1}


ONCE = RetryPolicy(max_attempts=1)
LINEAR = Workflow("linear", [Step(fn=inc, name="a"), Step(fn=bad_file, name="open", retry=ONCE), Step(fn=inc)])
SIGNAL = Workflow("signal", [Step(fn=inc, name="a"), Step(fn=take, wait_for="go"), Step(fn=inc, name="b")])


def tiers_for(
    url: str, prefix: str, db: Path, *, max_pending_rows: int | None = None
) -> tuple[ValkeyStore, SQLiteStore, list[Tier]]:
    vk = ValkeyStore(url, prefix=prefix, socket_timeout=2.0)
    sq = SQLiteStore(db)
    return (
        vk,
        sq,
        [
            Tier(vk, FlushPolicy(interval=0.01, max_pending_rows=max_pending_rows)),
            Tier(sq, FlushPolicy(interval=0.05, max_pending_rows=max_pending_rows)),
        ],
    )


class Recorder:
    """A ``TierListener`` that keeps the runs it is told to fail."""

    def __init__(self) -> None:
        self.codec_errors: list[tuple[str, CodecError]] = []

    def durable(self, item: Any) -> None:
        pass

    def pressure(self, tier: str, on: bool) -> None:
        pass

    def codec_error(self, run_id: str, exc: CodecError) -> None:
        self.codec_errors.append((run_id, exc))

    def conflict(self, run_id: str, exc: StaleVersionError) -> None:
        raise AssertionError(exc)

    def reset(self, tier: str) -> None:
        pass

    def fenced(self, tier: str, shards: Mapping[int, int], sent: Mapping[int, int]) -> None:
        """Nothing here is fenced."""


def step(run_id: str, version: int) -> tuple[Snapshot, Transition]:
    snap = Snapshot(run_id, "signal", 1, version, 0, Status.running, {"n": 0}, None, 1_700_000_000.0, 1, ())
    return snap, Transition(run_id, version, TransitionKind.step, 0, Status.running, 1_700_000_000.0, None)


async def wait_until(predicate: Callable[[], bool]) -> None:
    with anyio.fail_after(GUARD):
        while not predicate():  # noqa: ASYNC110 - run status has no event to wait on
            await anyio.sleep(0.002)


def ids(prefix: str) -> list[str]:
    return [f"{prefix}-{i:03d}" for i in range(N)]


async def stored_versions(url: str, prefix: str, db: Path) -> dict[str, dict[str, tuple[int, str]]]:
    """Each tier's stored runs: run id -> (version, status), read by fresh store objects."""
    out: dict[str, dict[str, tuple[int, str]]] = {}
    for store in (ValkeyStore(url, prefix=prefix, read_only=True), SQLiteStore(db)):
        async with store:
            found = await store.scan_snapshots(limit=10_000, bad_rows=[])  # a planted key is a bad row
            out[store.tier] = {s.header.run_id: (s.header.version, s.header.status) for s in found}
    return out


async def assert_durable_everywhere(
    url: str, prefix: str, db: Path, final: dict[str, tuple[int, str]]
) -> dict[str, dict[str, tuple[int, str]]]:
    """Every run of ``final`` is stored at its final version and status in both tiers, with its whole history."""
    stored = await stored_versions(url, prefix, db)
    for tier, runs in stored.items():
        for rid, want in final.items():
            assert runs.get(rid) == want, (tier, rid)
    for store in (ValkeyStore(url, prefix=prefix, read_only=True), SQLiteStore(db)):
        async with store:
            for rid, (version, _) in final.items():
                assert [t.version for t in await store.history(rid)] == list(range(1, version + 1)), (store.tier, rid)
    return stored


def assert_rejected(exc: BaseException, run_id: str, tier: str | None, *words: str) -> None:
    """``exc`` (a run's failure) was caused by a ``RunRejectedError`` naming the run, a tier and the reason."""
    assert isinstance(exc, RunFailedError), exc
    cause = exc.__cause__
    assert isinstance(cause, RunRejectedError), repr(cause)
    assert cause.run_id == run_id
    assert repr(run_id) in str(cause)
    if tier is not None:
        assert cause.tier == tier
    assert f"[{cause.tier}]" in str(cause)
    for word in words:
        assert word in str(cause), (word, str(cause))


# ------------------------------------------------------------ text that does not encode


async def test_a_step_error_holding_a_lone_surrogate_is_stored_escaped_and_blocks_no_tier(
    valkey_url: str, valkey_prefix: str, tmp_path: Path
) -> None:
    db = tmp_path / "runs.db"
    # A small memory bound: before the fix, the blocked tiers held every step back.
    _vk, _sq, tiers = tiers_for(valkey_url, valkey_prefix, db, max_pending_rows=50)
    good = ids("ok")
    async with Runtime([LINEAR], tiers=tiers) as rt:
        bad = await rt.spawn(LINEAR, {"n": 0, "bad": True}, run_id="bad")
        for rid in good:
            await rt.spawn(LINEAR, {"n": 0}, run_id=rid)
        with anyio.fail_after(GUARD), pytest.raises(RunFailedError) as failed:
            await bad.wait_finished()
        error = failed.value.error
        assert error.message == "bad file \\xff.txt"  # the byte the file name held, escaped
        assert "bad file \\xff.txt" in error.traceback
        with anyio.fail_after(GUARD):
            for rid in good:
                await rt.wait_finished(rid)
        final = {rid: (rt.get(rid).version, rt.get(rid).status.value) for rid in [*good, "bad"]}
        stats = {s.tier: s for s in rt.tier_statistics()}
    assert final["bad"][1] == "failed"
    await assert_durable_everywhere(valkey_url, valkey_prefix, db, final)
    for name in ("valkey", "sqlite"):
        assert stats[name].rejected_rows == 0  # made storable at the source: nothing to reject
    async with SQLiteStore(db) as sq:
        stored = await sq.load("bad")
        assert stored is not None
        assert stored.error is not None
        assert "bad file \\\\xff.txt" in stored.error
        details = [t.detail or "" for t in await sq.history("bad")]
        assert any("bad file \\xff.txt" in d for d in details), details
        assert len(await sq.dead_letters()) == 1


async def test_a_lone_surrogate_that_reaches_the_stores_is_refused_alone_and_blocks_no_tier(
    valkey_url: str, valkey_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The red team's run again without the fix at the source: the stores' own isolation holds."""
    monkeypatch.setattr(_actor, "storable_text", lambda text: text)
    monkeypatch.setattr(_snapshot, "storable_text", lambda text: text)
    db = tmp_path / "runs.db"
    _vk, _sq, tiers = tiers_for(valkey_url, valkey_prefix, db, max_pending_rows=50)
    good = ids("ok")
    async with Runtime([LINEAR], tiers=tiers) as rt:
        await rt.spawn(LINEAR, {"n": 0, "bad": True}, run_id="bad")
        for rid in good:
            await rt.spawn(LINEAR, {"n": 0}, run_id=rid)
        with anyio.fail_after(GUARD):
            for rid in good:
                await rt.wait_finished(rid)
            await wait_until(lambda: rt.get("bad").finished)
            await rt.flush()
        assert "\udcff" in rt.get("bad").error.message  # type: ignore[union-attr]
        final = {rid: (rt.get(rid).version, rt.get(rid).status.value) for rid in good}
        stats = {s.tier: s for s in rt.tier_statistics()}
    await assert_durable_everywhere(valkey_url, valkey_prefix, db, final)  # all 100, not 1 of 101
    for name in ("valkey", "sqlite"):
        assert stats[name].failures == 0, stats[name].last_error
        assert stats[name].rejected_rows >= 1
        assert stats[name].backpressure is False


# ------------------------------------------------------------ a number out of range


async def test_a_planted_version_at_the_top_of_the_range_is_replaced_and_blocks_no_tier(
    valkey_url: str, valkey_prefix: str, tmp_path: Path
) -> None:
    """The red team's 2**63 - 1 in SQLite's version column made every SQLite flush raise OverflowError.

    The copy does not verify, so recovery resumes the run from Valkey's, below
    the forged claim (``MAX_CLAIM``). SQLite's version guard then keeps the
    run's next write out; the persister reads that copy, finds it does not
    verify, deletes it and writes the run again (``forged_replaced``): the
    run finishes like the others, and the tier writes every run.
    """
    db = tmp_path / "runs.db"
    good = ids("sig")
    _vk, _sq, tiers = tiers_for(valkey_url, valkey_prefix, db)
    async with Runtime([SIGNAL], tiers=tiers) as rt:
        for rid in [*good, "bad"]:
            await rt.spawn(SIGNAL, {"n": 0}, run_id=rid)
        await wait_until(lambda: all(rt.get(rid).status is Status.waiting for rid in [*good, "bad"]))
    with sqlite3.connect(db) as conn:
        # The epoch as well: copies are ordered by (epoch, version), so only a forged copy
        # that also claims a newer owner's epoch keeps the next owner's writes out.
        conn.execute("UPDATE runs SET version = ?, epoch = ? WHERE run_id = 'bad'", ((1 << 63) - 1, (1 << 63) - 1))
    conn.close()
    _vk, _sq, tiers = tiers_for(valkey_url, valkey_prefix, db)
    async with Runtime([SIGNAL], tiers=tiers, recover=True) as rt:
        for rid in [*good, "bad"]:
            await rt.send(rid, "go", rid)
        with anyio.fail_after(GUARD):
            for rid in [*good, "bad"]:
                await rt.wait_finished(rid)
            await rt.flush()
        final = {rid: (rt.get(rid).version, rt.get(rid).status.value) for rid in [*good, "bad"]}
        stats = {s.tier: s for s in rt.tier_statistics()}
    await assert_durable_everywhere(valkey_url, valkey_prefix, db, final)
    assert (stats["valkey"].failures, stats["sqlite"].failures) == (0, 0)
    assert stats["sqlite"].forged_replaced == 1
    assert stats["sqlite"].conflicts == 0


async def test_a_run_past_64_bits_is_refused_by_both_real_tiers_and_every_other_run_is_flushed(
    valkey_url: str, valkey_prefix: str, tmp_path: Path
) -> None:
    """What the runtime does with a run resumed above a forged 2**63 - 1, without going through recovery."""
    listener = Recorder()
    vk = ValkeyStore(valkey_url, prefix=valkey_prefix, socket_timeout=2.0)
    sq = SQLiteStore(tmp_path / "runs.db")
    tiers = Tiers([Tier(vk, FlushPolicy()), Tier(sq, FlushPolicy())], MsgpackCodec(), SystemClock(), listener)
    await tiers.open()
    try:
        mark = tiers.mark
        assert mark is not None
        good = ids("run")
        for rid in good:
            mark(*step(rid, 1))
        mark(*step("bad", 1 << 63))
        with anyio.fail_after(GUARD):
            await tiers.flush()  # returns: the refused run is never waited for
        for rid in good:
            assert tiers.durable_versions(rid) == {"valkey": 1, "sqlite": 1}
        assert tiers.durable_versions("bad") == {"valkey": 0, "sqlite": 0}
        assert sorted((e.tier, rid) for rid, e in listener.codec_errors) == [("sqlite", "bad"), ("valkey", "bad")]
        for _, exc in listener.codec_errors:
            assert isinstance(exc, RunRejectedError)
            assert "version=9223372036854775808 is out of range" in exc.reason
        for stats in tiers.statistics():
            assert (stats.rejected_rows, stats.failures, stats.snapshots_written) == (1, 0, N)
        for name in ("valkey", "sqlite"):
            with pytest.raises(RunRejectedError):
                await tiers.wait_durable("bad", 1 << 63, tier=name)
        for store in (vk, sq):
            assert len(await store.scan(limit=1000)) == N
            assert await store.load("bad") is None
    finally:
        await tiers.aclose()


# ------------------------------------------------------------ a Valkey key of the wrong type


@pytest.mark.parametrize("through", [True, False], ids=["write-through", "write-behind"])
@pytest.mark.parametrize(("key", "kind"), [("run", "list"), ("hist", "string")])
async def test_a_valkey_key_of_the_wrong_type_fails_its_run_alone_and_the_other_tier_keeps_it(
    valkey_url: str, valkey_prefix: str, tmp_path: Path, key: str, kind: str, through: bool
) -> None:
    """Write-through, the refusal comes before the next step: the run fails. Write-behind, the run
    may finish first: then it stays done, and waiting for it in Valkey raises the refusal."""
    db = tmp_path / "runs.db"
    good = ids("sig")
    planted = f"{valkey_prefix}:{{{shard_of('bad', DEFAULT_SHARDS)}}}:{key}:bad"  # layout 2: the run's shard tag
    vk = ValkeyStore(valkey_url, prefix=valkey_prefix, socket_timeout=2.0)
    tiers = [
        Tier(vk, FlushPolicy.through() if through else FlushPolicy(interval=0.01)),
        Tier(SQLiteStore(db), FlushPolicy(interval=0.05)),
    ]
    async with Runtime([SIGNAL], tiers=tiers) as rt:
        for rid in [*good, "bad"]:
            await rt.spawn(SIGNAL, {"n": 0}, run_id=rid)
        await wait_until(lambda: all(rt.get(rid).status is Status.waiting for rid in [*good, "bad"]))
        with anyio.fail_after(GUARD):
            await rt.flush()
        with valkey.Valkey.from_url(valkey_url) as raw:
            raw.delete(planted)
            if kind == "list":
                raw.rpush(planted, "planted")
            else:
                raw.set(planted, "planted")
        for rid in good:
            await rt.send(rid, "go", rid)
        if through:  # the send is acknowledged once durable in Valkey: it never will be
            with pytest.raises(RunRejectedError, match="bad"):
                await rt.send("bad", "go", "bad")
        else:
            await rt.send("bad", "go", "bad")
        with anyio.fail_after(GUARD):
            for rid in good:
                await rt.wait_finished(rid)
            await wait_until(lambda: rt.get("bad").finished)
            await rt.flush()  # returns: a refused run is never waited for
        words = (planted, f"is a {kind}, not a hash")
        if through:  # failed by the refusal; its end is acknowledged by Valkey, which refuses it
            with pytest.raises(RunRejectedError):
                await rt.wait_finished("bad")
            error = rt.get("bad").error
            assert error is not None
            assert error.type == "hotstate.RunRejectedError"
            assert all(w in error.message for w in ("[valkey] run 'bad'", *words))
        with pytest.raises(RunRejectedError) as refused:
            await rt.wait_durable("bad", tier="valkey")
        assert refused.value.run_id == "bad"
        assert all(w in str(refused.value) for w in words)
        final = {rid: (rt.get(rid).version, rt.get(rid).status.value) for rid in good}
        bad = (rt.get("bad").version, rt.get("bad").status.value)
        stats = {s.tier: s for s in rt.tier_statistics()}
    assert bad[1] == ("failed" if through else "done")
    stored = await assert_durable_everywhere(valkey_url, valkey_prefix, db, final)
    assert stored["sqlite"]["bad"] == bad  # the other tier took every version of it
    with valkey.Valkey.from_url(valkey_url) as raw:
        assert raw.type(planted) == kind.encode()  # nothing was written into the planted key
    assert (stats["valkey"].failures, stats["sqlite"].failures) == (0, 0)
    assert stats["valkey"].rejected_rows >= 1
    assert stats["sqlite"].rejected_rows == 0
    if through:
        async with SQLiteStore(db) as sq:
            assert [d.run_id for d in await sq.dead_letters()] == ["bad"]
