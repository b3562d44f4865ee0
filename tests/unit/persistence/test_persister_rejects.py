# mypy: allow-untyped-defs
"""A run the store refuses (``SaveResult.rejected``) is failed, never retried, and blocks nobody (#11).

``MemoryStore`` rejects what SQLite and Valkey would: here a transition whose
detail holds a lone surrogate, and a snapshot whose version is past 64 bits
(both encode; only the store refuses them). ManualClock, driven flushes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import anyio
import pytest

from hotstate import CodecError, RunRejectedError, StaleVersionError
from hotstate.actors import DeadLetter, ErrorInfo, Snapshot, Status, Transition, TransitionKind
from hotstate.persistence import FlushPolicy, MemoryStore, PickleCodec, Tier
from hotstate.persistence._encoder import SnapshotEncoder
from hotstate.persistence._persister import Persister
from hotstate.persistence._tiers import Tiers
from hotstate.testing import ManualClock

if TYPE_CHECKING:
    from collections.abc import Mapping

CODEC = PickleCodec(b"k" * 32)
BIG = 1 << 63


def snap(run_id: str, version: int, status: Status = Status.running) -> Snapshot:
    return Snapshot(run_id, "wf", 1, version, 0, status, {"v": version}, None, 1_700_000_000.0, 1, ())


def trans(run_id: str, version: int, detail: str | None = None) -> Transition:
    return Transition(run_id, version, TransitionKind.step, 0, Status.running, 1_700_000_000.0, detail)


class Recorder:
    """A ``TierListener`` that writes down the reports a refusal makes."""

    def __init__(self) -> None:
        self.durables: list[Any] = []
        self.codec_errors: list[tuple[str, CodecError]] = []

    def durable(self, item: Any) -> None:
        self.durables.append(item)

    def pressure(self, tier: str, on: bool) -> None:
        pass

    def codec_error(self, run_id: str, exc: CodecError) -> None:
        self.codec_errors.append((run_id, exc))

    def conflict(self, run_id: str, exc: StaleVersionError) -> None:
        raise AssertionError(f"no conflict expected: {exc}")

    def reset(self, tier: str) -> None:
        raise AssertionError("no reset expected")

    def fenced(self, tier: str, shards: Mapping[int, int], sent: Mapping[int, int]) -> None:
        """Nothing here is fenced."""


def persister(store: MemoryStore, listener: Recorder, policy: FlushPolicy | None = None) -> Persister:
    return Persister(Tier(store, policy or FlushPolicy(interval=60.0)), SnapshotEncoder(CODEC), ManualClock(), listener)


async def test_a_refused_run_is_failed_once_not_durable_and_the_others_are_durable():
    listener = Recorder()
    async with MemoryStore(tier="mem") as store:
        p = persister(store, listener)
        for rid in ("a", "b"):
            p.mark(snap(rid, 1), trans(rid, 1))
        p.mark(snap("bad", 1), trans("bad", 1, "no such file \udcff.txt"))
        p.notify_when_durable("bad", "parked")
        await p.flush()  # returns: the refused run is not waited for
        assert p.durable == {"a": 1, "b": 1}
        assert [rid for rid, _ in listener.codec_errors] == ["bad"]
        exc = listener.codec_errors[0][1]
        assert isinstance(exc, RunRejectedError)
        assert (exc.tier, exc.run_id) == ("mem", "bad")
        assert "detail is not UTF-8 text" in exc.reason
        assert "[mem] run 'bad'" in str(exc)
        assert "parked" not in listener.durables  # never handed on: it is not durable
        assert "bad" not in p.waiting
        with pytest.raises(RunRejectedError):
            await p.wait_durable("bad", 1, timeout=1.0)  # at once: nothing of it is pending
        stats = p.statistics()
        assert (stats.rejected_rows, stats.failures, stats.consecutive_failures) == (1, 0, 0)
        assert (stats.pending_snapshots, stats.pending_transitions) == (0, 0)  # dropped, not merged back
        assert (stats.snapshots_written, stats.transitions_written) == (2, 2)
        assert await store.load("bad") is None


async def test_a_later_snapshot_of_a_refused_run_is_offered_once_and_each_refusal_is_reported():
    listener = Recorder()
    async with MemoryStore(tier="mem") as store:
        p = persister(store, listener)
        p.mark(snap("bad", BIG), trans("bad", BIG))  # past 64 bits: every store refuses it
        p.mark(snap("ok", 1), trans("ok", 1))
        await p.flush()
        p.mark(snap("bad", BIG + 1, Status.failed), trans("bad", BIG + 1))  # the run is being failed
        await p.flush()
        assert [rid for rid, _ in listener.codec_errors] == ["bad", "bad"]  # the second schedules a parked run
        assert p.statistics().rejected_rows == 2
        assert p.durable == {"ok": 1}
        # Once the run's rows can be written (say, the planted key is gone), they count again.
        p.mark(snap("bad", 7), trans("bad", 7))
        await p.flush()
        assert p.durable == {"ok": 1, "bad": 7}
        assert len(listener.codec_errors) == 2


async def test_a_waiter_of_a_refused_run_is_woken_with_the_refusal():
    listener = Recorder()
    async with MemoryStore(tier="mem") as store:
        p = persister(store, listener, FlushPolicy.through())
        p.mark(snap("bad", 1), trans("bad", 1, "\udcff"))
        with anyio.fail_after(5):  # hang guard only: time is the ManualClock's
            async with anyio.create_task_group() as tg:
                await tg.start(p.run)
                with pytest.raises(RunRejectedError, match="bad"):
                    await p.wait_durable("bad", 1)  # pokes the loop, whose flush refuses it
                p.stop()


async def test_a_dead_letter_the_store_cannot_write_is_counted_and_the_flush_goes_on():
    listener = Recorder()
    async with MemoryStore(tier="mem") as store:
        p = persister(store, listener)
        for rid, version in (("a", 3), ("bad", BIG)):
            s = snap(rid, version, Status.failed)
            error = ErrorInfo.from_exception(ValueError("boom"), step=0, step_name="s", attempt=1, at=1.0)
            p.mark_dead_letter(
                DeadLetter(
                    run_id=rid,
                    workflow="wf",
                    snapshot=s,
                    error=error,
                    attempts=(error,),
                    compensation_errors=(),
                    at=1.0,
                )
            )
        p.mark(snap("ok", 1), trans("ok", 1))
        await p.flush()
        assert [d.run_id for d in await store.dead_letters()] == ["a"]
        stats = p.statistics()
        assert (stats.rejected_rows, stats.failures) == (1, 0)
        assert p.durable == {"ok": 1}


async def test_a_repair_never_counts_a_refused_run_as_stored():
    async with MemoryStore(tier="mem") as store:
        tiers = Tiers([Tier(store, FlushPolicy())], CODEC, ManualClock(), Recorder())
        copies = [
            (SnapshotEncoder(CODEC).encode(snap("ok", 2)), [trans("ok", 1), trans("ok", 2)]),
            (SnapshotEncoder(CODEC).encode(snap("bad", 2)), [trans("bad", 1), trans("bad", 2, "\udcff")]),
        ]
        assert await tiers.repair("mem", copies) == 1
        assert tiers.durable_versions("ok") == {"mem": 2}
        assert tiers.durable_versions("bad") == {"mem": 0}
