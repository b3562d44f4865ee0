# mypy: allow-untyped-defs
"""``Persister`` and ``SnapshotEncoder`` without a ``Runtime``: MemoryStore, ManualClock, driven flushes.

What a tier reports goes to a recording ``TierListener``; failures come from a
small store that wraps a ``MemoryStore`` and follows a script (no mocks).
"""

from __future__ import annotations

import threading
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel
import pytest

from hotstate import (
    CodecError,
    ConfigError,
    DurabilityTimeoutError,
    PersistenceError,
    StaleVersionError,
    StoreUnavailableError,
)
from hotstate.actors import (
    DeadLetter,
    ErrorInfo,
    Snapshot,
    Status,
    Transition,
    TransitionKind,
)
from hotstate.persistence import (
    FlushPolicy,
    MemoryStore,
    PickleCodec,
    SaveResult,
    StoredSnapshot,
    Tier,
)
from hotstate.persistence._encoder import SnapshotEncoder
from hotstate.persistence._persister import Persister
from hotstate.persistence._records import decode_dead_letter, decode_snapshot, encode_snapshot
from hotstate.persistence._store import StoreBase
from hotstate.persistence._tiers import Tiers
from hotstate.testing import ManualClock, checkpoint_until

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Collection, Iterable, Mapping, Sequence

    from hotstate.persistence import BadRow, Fence, RunHeader, StoredDeadLetter

CODEC = PickleCodec(b"k" * 32)


def snap(run_id: str, version: int, status: Status = Status.running, payload: Any = None) -> Snapshot:
    return Snapshot(
        run_id,
        "wf",
        1,
        version,
        version - 1,
        status,
        {"v": version} if payload is None else payload,
        None,
        1_700_000_000.0 + version,
        1,
        (),
    )


def trans(run_id: str, version: int, status: Status = Status.running) -> Transition:
    kind = TransitionKind.spawned if version == 1 else TransitionKind.step
    return Transition(run_id, version, kind, version - 1, status, 1_700_000_000.0 + version, None)


def mark(
    persister: Persister,
    run_id: str,
    version: int,
    status: Status = Status.running,
    payload: Any = None,
) -> Snapshot:
    s = snap(run_id, version, status, payload)
    persister.mark(s, trans(run_id, version, status))
    return s


def letter_for(s: Snapshot) -> DeadLetter:
    error = ErrorInfo.from_exception(ValueError("boom"), step=s.step, step_name="charge", attempt=1, at=s.updated_at)
    return DeadLetter(
        run_id=s.run_id,
        workflow=s.workflow,
        snapshot=s,
        error=error,
        attempts=(error,),
        compensation_errors=(),
        at=s.updated_at,
    )


class Recorder:
    """A ``TierListener`` that writes down every report, in order."""

    def __init__(self) -> None:
        self.durables: list[Any] = []
        self.pressures: list[tuple[str, bool]] = []
        self.codec_errors: list[tuple[str, CodecError]] = []
        self.conflicts: list[tuple[str, StaleVersionError]] = []
        self.resets: list[str] = []
        self.fenced_shards: list[dict[int, int]] = []

    def durable(self, item: Any) -> None:
        self.durables.append(item)

    def pressure(self, tier: str, on: bool) -> None:
        self.pressures.append((tier, on))

    def codec_error(self, run_id: str, exc: CodecError) -> None:
        self.codec_errors.append((run_id, exc))

    def conflict(self, run_id: str, exc: StaleVersionError) -> None:
        self.conflicts.append((run_id, exc))

    def reset(self, tier: str) -> None:
        self.resets.append(tier)

    def fenced(self, tier: str, shards: Mapping[int, int], sent: Mapping[int, int]) -> None:
        self.fenced_shards.append(dict(shards))


class ScriptedStore(StoreBase):
    """A MemoryStore behind a script: failing saves, a reported reset, a hook inside ``save``.

    Attributes:
        calls: the write calls in the order they reached the store.
        fail_saves: the next ``save`` calls that raise (1 = the next one), then succeed.
        fail_at_save: when set, only the ``save`` with this 1-based number raises.
        reset_next: the next successful ``save`` reports that the store lost its data.
        during_save: called inside ``save`` before it applies or raises (e.g. to mark meanwhile).
    """

    def __init__(self, tier: str = "scripted") -> None:
        self.tier = tier
        self.inner = MemoryStore(tier=tier)
        self.shards = self.inner.shards
        self.calls: list[str] = []
        self.fail_saves = 0
        self.fail_at_save: int | None = None
        self.reset_next = False
        self.conflicts_next: dict[str, int] = {}
        self.during_save: Callable[[], object] | None = None
        self.save_calls = 0

    async def open(self) -> None:
        await self.inner.open()
        self._opened = True

    async def aclose(self) -> None:
        await self.inner.aclose()
        self._opened = False

    async def save(
        self, snapshots: Sequence[StoredSnapshot], transitions: Sequence[Transition], *, fence: Fence | None = None
    ) -> SaveResult:
        self.save_calls += 1
        self.calls.append("save")
        if self.during_save is not None:
            hook, self.during_save = self.during_save, None
            hook()
        if self.fail_saves > 0 or self.fail_at_save == self.save_calls:
            self.fail_saves = max(0, self.fail_saves - 1)
            raise StoreUnavailableError(self.tier, "scripted failure")
        if self.conflicts_next:  # the store holds newer versions of these runs: it skips them
            conflicts, self.conflicts_next = self.conflicts_next, {}
            kept = [x for x in snapshots if x.header.run_id not in conflicts]
            result = await self.inner.save(kept, transitions)
            return SaveResult(
                written=result.written,
                stale=result.stale + len(snapshots) - len(kept),
                transitions=result.transitions,
                conflicts=conflicts,
            )
        result = await self.inner.save(snapshots, transitions)
        if self.reset_next:
            self.reset_next = False
            return SaveResult(
                written=result.written,
                stale=result.stale,
                transitions=result.transitions,
                reset=True,
            )
        return result

    async def seal(self, fence: Fence) -> dict[int, int]:
        return await self.inner.seal(fence)

    async def load(self, run_id: str) -> StoredSnapshot | None:
        return await self.inner.load(run_id)

    async def delete_copy(self, run_id: str, body: bytes) -> bool:
        return await self.inner.delete_copy(run_id, body)

    async def load_many(
        self, run_ids: Sequence[str], *, bad_rows: list[BadRow] | None = None
    ) -> dict[str, StoredSnapshot]:
        return await self.inner.load_many(run_ids, bad_rows=bad_rows)

    async def scan(
        self,
        *,
        status: str | Iterable[str] | None = None,
        workflow: str | None = None,
        after: str | None = None,
        limit: int = 1000,
        shards: Collection[int] | None = None,
    ) -> list[RunHeader]:
        return await self.inner.scan(status=status, workflow=workflow, after=after, limit=limit, shards=shards)

    async def scan_snapshots(
        self,
        *,
        status: str | Iterable[str] | None = None,
        workflow: str | None = None,
        after: str | None = None,
        limit: int = 1000,
        bad_rows: list[BadRow] | None = None,
        shards: Collection[int] | None = None,
    ) -> list[StoredSnapshot]:
        return await self.inner.scan_snapshots(
            status=status, workflow=workflow, after=after, limit=limit, bad_rows=bad_rows, shards=shards
        )

    async def history(self, run_id: str) -> list[Transition]:
        return await self.inner.history(run_id)

    async def save_dead_letter(self, record: StoredDeadLetter, *, fence: Fence | None = None) -> None:
        self.calls.append("save_dead_letter")
        await self.inner.save_dead_letter(record, fence=fence)

    async def save_dead_letters(
        self, records: Sequence[StoredDeadLetter], *, fence: Fence | None = None
    ) -> dict[str, str]:
        self.calls.append("save_dead_letters")
        return await self.inner.save_dead_letters(records, fence=fence)

    async def dead_letters(self, *, bad_rows: list[BadRow] | None = None) -> list[StoredDeadLetter]:
        return await self.inner.dead_letters()

    async def delete_dead_letter(self, run_id: str) -> bool:
        self.calls.append("delete_dead_letter")
        return await self.inner.delete_dead_letter(run_id)

    async def save_versions(
        self, snapshots: Sequence[StoredSnapshot], *, fence: Fence | None = None
    ) -> dict[int, int] | None:
        return await self.inner.save_versions(snapshots, fence=fence)

    async def load_version(self, run_id: str, version: int) -> StoredSnapshot | None:
        return await self.inner.load_version(run_id, version)

    async def purge_finished(self, *, before: float) -> int:
        return await self.inner.purge_finished(before=before)


@asynccontextmanager
async def flush_loop(persister: Persister) -> AsyncIterator[None]:
    """Run the persister's flush loop for the block; stop it (after its flush in progress) at the end."""
    with anyio.fail_after(5):  # hang guard only: time is the ManualClock's
        async with anyio.create_task_group() as tg:
            await tg.start(persister.run)
            yield
            persister.stop()


# ---------------------------------------------------------------- coalescing and the interval


async def test_marks_coalesce_to_the_newest_snapshot_and_nothing_is_written_before_the_interval():
    clock = ManualClock()
    listener = Recorder()
    async with MemoryStore() as store:
        p = Persister(
            Tier(store, FlushPolicy(interval=1.0)),
            SnapshotEncoder(CODEC),
            clock,
            listener,
        )
        async with flush_loop(p):
            for v in (1, 2, 3):
                mark(p, "r1", v)
            await clock.advance(0.999)
            assert store.saves == 0
            assert p.pending_rows == 4  # one snapshot (coalesced) + three transitions
            await clock.advance(0.001)
            await checkpoint_until(lambda: store.saves == 1)
        stored = await store.load("r1")
        assert stored is not None
        assert stored.header.version == 3
        assert decode_snapshot(stored, CODEC, tier="t").payload == {"v": 3}
        assert [t.version for t in await store.history("r1")] == [1, 2, 3]
        stats = p.statistics()
        assert (stats.flushes, stats.snapshots_written, stats.transitions_written) == (
            1,
            1,
            3,
        )
        assert p.pending_rows == 0


async def test_flush_once_writes_and_acknowledges_the_durable_versions():
    async with MemoryStore() as store:
        p = Persister(
            Tier(store, FlushPolicy(interval=60.0)),
            SnapshotEncoder(CODEC),
            ManualClock(),
            Recorder(),
        )
        mark(p, "a", 1)
        mark(p, "a", 2)
        mark(p, "b", 1)
        assert p.durable == {}
        await p.flush_once()
        assert p.durable == {"a": 2, "b": 1}
        assert store.saves == 1
        mark(p, "a", 3)
        await p.flush()
        assert p.durable == {"a": 3, "b": 1}
        stored = await store.load("a")
        assert stored is not None
        assert stored.header.version == 3


async def test_a_failed_flush_merges_the_batch_back_newer_versions_win_and_nothing_is_reported_durable():
    listener = Recorder()
    async with ScriptedStore() as store:
        p = Persister(
            Tier(store, FlushPolicy.through()),
            SnapshotEncoder(CODEC),
            ManualClock(),
            listener,
        )
        mark(p, "r1", 1)
        mark(p, "r1", 2)
        p.notify_when_durable("r1", "go on")
        store.fail_saves = 1
        store.during_save = lambda: mark(p, "r1", 3)  # a newer version arrives while the save is failing
        with pytest.raises(StoreUnavailableError):
            await p.flush_once()
        assert listener.durables == []
        assert p.durable == {}
        stats = p.statistics()
        assert (
            stats.failures,
            stats.consecutive_failures,
            stats.pending_snapshots,
        ) == (1, 1, 1)
        assert stats.pending_transitions == 3
        assert stats.last_error is not None
        assert "scripted failure" in stats.last_error
        assert p.failing
        await p.flush_once()
        stored = await store.load("r1")
        assert stored is not None
        assert stored.header.version == 3  # the merged-back v2 did not replace the newer v3
        assert [t.version for t in await store.history("r1")] == [
            1,
            2,
            3,
        ]  # in order, none lost
        assert p.durable == {"r1": 3}
        assert listener.durables == ["go on"]
        assert not p.failing


async def test_the_loop_retries_a_failed_flush_after_the_backoff_not_at_the_next_interval():
    clock = ManualClock()
    async with ScriptedStore() as store:
        policy = FlushPolicy(interval=1.0, retry_initial=2.0, retry_max=2.0)
        p = Persister(Tier(store, policy), SnapshotEncoder(CODEC), clock, Recorder())
        store.fail_saves = 1
        async with flush_loop(p):
            mark(p, "r1", 1)
            await clock.advance(1.0)
            await checkpoint_until(lambda: p.statistics().failures == 1)
            assert p.durable == {}
            await clock.advance(1.0)  # the interval has passed again, the backoff has not
            assert store.save_calls == 1
            await clock.advance(1.0)
            await checkpoint_until(lambda: p.durable == {"r1": 1})
        assert store.save_calls == 2
        assert p.statistics().consecutive_failures == 0


# ---------------------------------------------------------------- write-through


async def test_write_through_hands_the_waiting_item_to_the_listener_once_after_the_acknowledging_flush():
    listener = Recorder()
    async with MemoryStore() as store:
        p = Persister(
            Tier(store, FlushPolicy.through()),
            SnapshotEncoder(CODEC),
            ManualClock(),
            listener,
        )
        mark(p, "r1", 1)
        item = object()
        p.notify_when_durable("r1", item)
        mark(p, "other", 1)
        assert listener.durables == []
        await p.flush_once()
        assert listener.durables == [item]
        assert p.waiting == {}
        mark(p, "r1", 2)
        await p.flush_once()
        assert listener.durables == [item]  # exactly once


async def test_write_through_wakes_the_loop_at_once_without_advancing_the_clock():
    clock = ManualClock()
    listener = Recorder()
    async with MemoryStore() as store:
        p = Persister(Tier(store, FlushPolicy.through()), SnapshotEncoder(CODEC), clock, listener)
        async with flush_loop(p):
            mark(p, "r1", 1)
            p.notify_when_durable("r1", "r1 may go on")
            await checkpoint_until(lambda: listener.durables == ["r1 may go on"])
        assert clock.now() == 0.0
        assert p.durable == {"r1": 1}


# ---------------------------------------------------------------- memory bound


async def test_crossing_max_pending_rows_reports_pressure_once_and_draining_releases_it():
    listener = Recorder()
    async with MemoryStore(tier="mem") as store:
        p = Persister(
            Tier(store, FlushPolicy(interval=60.0, max_pending_rows=5)),
            SnapshotEncoder(CODEC),
            ManualClock(),
            listener,
        )
        mark(p, "a", 1)
        mark(p, "a", 2)
        mark(p, "a", 3)  # 1 snapshot + 3 transitions = 4 rows
        mark(p, "b", 1)  # 2 + 4 = 6 > 5
        assert listener.pressures == [("mem", True)]
        assert p.statistics().backpressure
        mark(p, "b", 2)
        assert listener.pressures == [("mem", True)]  # reported once, not per mark
        await p.flush_once()
        assert listener.pressures == [("mem", True), ("mem", False)]
        assert not p.statistics().backpressure
        assert p.statistics().backpressure_events == 1


async def test_a_failed_flush_keeps_the_pressure_on():
    listener = Recorder()
    async with ScriptedStore(tier="mem") as store:
        p = Persister(
            Tier(store, FlushPolicy(interval=60.0, max_pending_rows=2)),
            SnapshotEncoder(CODEC),
            ManualClock(),
            listener,
        )
        mark(p, "a", 1)
        mark(p, "a", 2)
        store.fail_saves = 1
        with pytest.raises(StoreUnavailableError):
            await p.flush_once()
        assert listener.pressures == [("mem", True)]
        await p.flush_once()
        assert listener.pressures == [("mem", True), ("mem", False)]


async def test_crossing_max_pending_bytes_reports_pressure():
    listener = Recorder()
    async with MemoryStore(tier="mem") as store:
        policy = FlushPolicy(interval=60.0, max_pending_rows=None, max_pending_bytes=2_000)
        p = Persister(Tier(store, policy), SnapshotEncoder(CODEC), ManualClock(), listener)
        big = {"blob": b"x" * 1_000}
        mark(p, "r0", 1, payload=big)
        await p.flush_once()  # measures ~1 kB per snapshot
        assert p.statistics().bytes_written > 1_000
        for i in range(1, 6):
            mark(p, f"r{i}", 1, payload=big)  # ~5 kB estimated, over the 2 kB bound
        assert listener.pressures == [("mem", True)]


# ---------------------------------------------------------------- unencodable payloads


async def test_an_unencodable_payload_reports_a_codec_error_once_and_writes_the_header_only_when_failed():
    listener = Recorder()
    async with MemoryStore() as store:
        p = Persister(
            Tier(store, FlushPolicy(interval=60.0)),
            SnapshotEncoder(CODEC),
            ManualClock(),
            listener,
        )
        lock = {"lock": threading.Lock()}
        mark(p, "bad", 1, payload=lock)
        mark(p, "good", 1)
        await p.flush_once()
        assert [rid for rid, _ in listener.codec_errors] == ["bad"]
        assert "bad" in str(listener.codec_errors[0][1])
        assert "lock" in str(listener.codec_errors[0][1])
        assert await store.load("bad") is None  # not failed yet: nothing of it is written
        assert await store.load("good") is not None  # the rest of the batch is
        mark(p, "bad", 2, payload=lock)
        await p.flush_once()
        assert len(listener.codec_errors) == 1  # once per run, not once per flush
        assert await store.load("bad") is None
        mark(p, "bad", 3, Status.failed, payload=lock)
        await p.flush_once()
        stored = await store.load("bad")
        assert stored is not None
        assert (stored.header.version, stored.header.status) == (3, "failed")
        assert decode_snapshot(stored, CODEC, tier="t").payload is None  # the header, without the payload
        assert [t.version for t in await store.history("bad")] == [1, 2, 3]
        assert len(listener.codec_errors) == 1
        assert p.statistics().codec_errors == 1


async def test_an_unencodable_snapshot_is_not_reported_durable():
    async with MemoryStore() as store:
        p = Persister(
            Tier(store, FlushPolicy(interval=60.0)),
            SnapshotEncoder(CODEC),
            ManualClock(),
            Recorder(),
        )
        mark(p, "bad", 1, payload={"lock": threading.Lock()})
        await p.flush_once()
        assert await store.load("bad") is None
        assert p.durable.get("bad", 0) == 0


# ---------------------------------------------------------------- a store that lost its data


async def test_a_store_reporting_a_reset_tells_the_listener_and_forgets_the_durable_versions():
    listener = Recorder()
    async with ScriptedStore(tier="valkeyish") as store:
        p = Persister(
            Tier(store, FlushPolicy(interval=60.0)),
            SnapshotEncoder(CODEC),
            ManualClock(),
            listener,
        )
        mark(p, "old", 1)
        await p.flush_once()
        assert listener.resets == []
        mark(p, "new", 1)
        store.reset_next = True
        await p.flush_once()
        assert listener.resets == ["valkeyish"]
        # Nothing acknowledged before can be trusted ("old"); what the save that
        # noticed the loss wrote ("new") is in the store.
        assert p.durable == {"new": 1}
        assert p.statistics().resets == 1
        mark(p, "new", 2)
        await p.flush_once()
        assert listener.resets == ["valkeyish"]  # reported by one save only


async def test_a_reset_reported_before_a_later_chunk_fails_still_reaches_the_listener():
    listener = Recorder()
    async with ScriptedStore(tier="valkeyish") as store:
        p = Persister(
            Tier(store, FlushPolicy(interval=60.0, max_batch_rows=1)),
            SnapshotEncoder(CODEC),
            ManualClock(),
            listener,
        )
        mark(p, "r0", 1)
        mark(p, "r1", 1)
        store.reset_next = True  # the first chunk's save reports the reset
        store.fail_at_save = 2  # the second chunk's save fails
        with pytest.raises(StoreUnavailableError):
            await p.flush_once()
        await p.flush_once()  # the retry succeeds; the store does not report the reset again
        assert store.save_calls == 3
        assert listener.resets == ["valkeyish"]


# ---------------------------------------------------------------- dead letters


async def test_dead_letters_are_encoded_in_the_flush_and_written_before_the_run_rows():
    async with ScriptedStore() as store:
        encoder = SnapshotEncoder(CODEC)
        p = Persister(Tier(store, FlushPolicy(interval=60.0)), encoder, ManualClock(), Recorder())
        failed = mark(p, "r1", 4, Status.failed)
        p.mark_dead_letter(letter_for(failed))
        assert encoder.encodes == 0  # mark_dead_letter does no encoding
        await p.flush_once()
        assert store.calls == ["save_dead_letters", "save"]
        assert encoder.encodes == 1  # the letter and the run row share one encoding
        [record] = await store.dead_letters()
        assert record.run_id == "r1"
        assert "boom" in record.error
        assert decode_dead_letter(record, CODEC, tier="t").snapshot == failed
        p.mark_dead_letter_deleted("r1")
        await p.flush_once()
        assert store.calls[-1] == "delete_dead_letter"
        assert await store.dead_letters() == []


async def test_a_dead_letter_whose_payload_cannot_be_encoded_is_written_with_its_header():
    async with MemoryStore() as store:
        p = Persister(
            Tier(store, FlushPolicy(interval=60.0)),
            SnapshotEncoder(CODEC),
            ManualClock(),
            Recorder(),
        )
        failed = mark(p, "r1", 2, Status.failed, payload={"lock": threading.Lock()})
        p.mark_dead_letter(letter_for(failed))
        await p.flush_once()
        [record] = await store.dead_letters()
        assert record.snapshot.header.version == 2
        assert decode_dead_letter(record, CODEC, tier="t").snapshot.payload is None


async def test_a_failed_dead_letter_write_is_retried_before_the_rows():
    async with MemoryStore() as store:
        p = Persister(
            Tier(store, FlushPolicy(interval=60.0)),
            SnapshotEncoder(CODEC),
            ManualClock(),
            Recorder(),
        )
        failed = mark(p, "r1", 2, Status.failed)
        p.mark_dead_letter(letter_for(failed))
        store.down = True
        with pytest.raises(StoreUnavailableError):
            await p.flush_once()
        assert store.saves == 0  # no run row went ahead of its letter
        store.down = False
        await p.flush_once()
        assert [d.run_id for d in await store.dead_letters()] == ["r1"]
        assert p.durable == {"r1": 2}


# ---------------------------------------------------------------- the shared encoder's retention


def finish_runs(marks: Callable[[Snapshot, Transition], None], n: int) -> None:
    """Mark ``n`` runs spawned, stepped and done (three versions each)."""
    for i in range(n):
        rid = f"run-{i:05d}"
        for v, status in ((1, Status.pending), (2, Status.running), (3, Status.done)):
            marks(snap(rid, v, status), trans(rid, v, status))


async def test_two_tiers_flushed_by_their_loops_hold_no_encoding_of_2000_finished_runs():
    clock = ManualClock()
    fast, slow = MemoryStore(tier="fast"), MemoryStore(tier="slow")
    tiers = Tiers(
        [Tier(fast, FlushPolicy(interval=1.0)), Tier(slow, FlushPolicy(interval=5.0))],
        CODEC,
        clock,
        Recorder(),
    )
    await tiers.open()
    try:
        with anyio.fail_after(5):  # hang guard only
            async with anyio.create_task_group() as tg:
                await tiers.run_loops(tg)
                assert tiers.mark is not None
                finish_runs(tiers.mark, 2_000)
                await clock.advance(1.0)
                await checkpoint_until(lambda: fast.saves == 1)
                assert len(tiers.encoder) == 2_000  # the slow tier has still to write them
                await clock.advance(4.0)
                await checkpoint_until(lambda: slow.saves == 1)
                tiers.stop_loops()
        assert tiers.durable_versions("run-01999") == {"fast": 3, "slow": 3}
        assert tiers.encoder.encodes == 2_000  # once per run-version, for both tiers
        assert len(tiers.encoder) == 0
    finally:
        await tiers.aclose()


async def test_two_persisters_sharing_an_encoder_encode_once_and_free_after_the_second_flush():
    encoder = SnapshotEncoder(CODEC)
    clock = ManualClock()
    async with MemoryStore(tier="a") as a, MemoryStore(tier="b") as b:
        pa = Persister(Tier(a, FlushPolicy(interval=60.0)), encoder, clock, Recorder())
        pb = Persister(Tier(b, FlushPolicy(interval=60.0)), encoder, clock, Recorder())

        def both(s: Snapshot, t: Transition) -> None:
            pa.mark(s, t)
            pb.mark(s, t)

        finish_runs(both, 2_000)
        await pa.flush_once()
        assert encoder.encodes == 2_000
        assert len(encoder) == 2_000  # tier b has none of them durable yet: kept for it
        await pb.flush_once()
        assert encoder.encodes == 2_000  # tier b reused every encoding
        assert len(encoder) == 0
        assert (await a.load("run-00000")) == (await b.load("run-00000"))


async def test_an_encoding_outlived_by_a_newer_version_is_replaced_not_kept():
    encoder = SnapshotEncoder(CODEC)
    clock = ManualClock()
    async with MemoryStore(tier="a") as a, MemoryStore(tier="b") as b:
        pa = Persister(Tier(a, FlushPolicy(interval=60.0)), encoder, clock, Recorder())
        pb = Persister(Tier(b, FlushPolicy(interval=60.0)), encoder, clock, Recorder())
        for p in (pa, pb):
            mark(p, "r1", 1)
        await pa.flush_once()  # v1 encoded and kept for b
        for p in (pa, pb):
            mark(p, "r1", 2)
        await pb.flush_once()  # b writes v2 (encodes it); a still has only v1
        assert encoder.encodes == 2
        assert len(encoder) == 1
        await pa.flush_once()  # a writes v2 from the cache
        assert encoder.encodes == 2
        assert len(encoder) == 0
        assert (pa.durable, pb.durable) == ({"r1": 2}, {"r1": 2})


# ---------------------------------------------------------------- waiters never wait for what cannot come


async def test_a_waiter_on_an_unencodable_snapshot_gets_the_codec_error_at_once_not_a_timeout():
    listener = Recorder()
    clock = ManualClock()
    async with MemoryStore() as store:
        p = Persister(
            Tier(store, FlushPolicy(interval=60.0, ack_timeout=3600.0)), SnapshotEncoder(CODEC), clock, listener
        )
        mark(p, "bad", 1, payload={"lock": threading.Lock()})
        mark(p, "good", 1)
        outcome: dict[str, BaseException | None] = {}

        async def wait(rid: str) -> None:
            try:
                await p.wait_durable(rid, 1)
                outcome[rid] = None
            except PersistenceError as exc:
                outcome[rid] = exc

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(wait, "bad")
                tg.start_soon(wait, "good")
                await anyio.lowlevel.checkpoint()
                await p.flush_once()
        assert outcome["good"] is None
        assert isinstance(outcome["bad"], CodecError)
        assert "bad" in str(outcome["bad"])
        assert p.durable == {"good": 1}


async def test_a_timed_out_waiter_is_forgotten_and_names_the_seconds_it_waited():
    clock = ManualClock()
    async with ScriptedStore() as store:
        p = Persister(
            Tier(store, FlushPolicy(interval=60.0, ack_timeout=2.0)), SnapshotEncoder(CODEC), clock, Recorder()
        )
        store.fail_saves = 1_000  # the tier is down
        mark(p, "r", 1)
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:

                async def wait() -> None:
                    with pytest.raises(DurabilityTimeoutError, match="not durable after 2 s"):
                        await p.wait_durable("r", 1)

                tg.start_soon(wait)
                await anyio.lowlevel.checkpoint()
                await clock.advance(2.0)
        assert p._durable_events == {}  # no waiter left to keep the loop flushing at once


async def test_a_snapshot_the_store_skipped_for_a_newer_version_is_never_durable_and_its_waiters_fail():
    listener = Recorder()
    async with ScriptedStore(tier="guarded") as store:
        p = Persister(Tier(store, FlushPolicy(interval=60.0)), SnapshotEncoder(CODEC), ManualClock(), listener)
        await store.inner.save([encode_snapshot(snap("theirs", 7), CODEC)], [])  # a genuine newer copy
        mark(p, "theirs", 1)
        mark(p, "ours", 1)
        p.notify_when_durable("theirs", "parked actor")
        store.conflicts_next = {"theirs": 7}
        outcome: list[StaleVersionError] = []

        async def wait() -> None:
            try:
                await p.wait_durable("theirs", 1)
            except StaleVersionError as exc:
                outcome.append(exc)

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(wait)
                await anyio.lowlevel.checkpoint()
                await p.flush_once()
        assert p.durable == {"ours": 1}  # never "theirs": the store holds v7, not ours
        assert [(e.run_id, e.stored, e.attempted) for e in outcome] == [("theirs", 7, 1)]
        assert [(rid, e.stored) for rid, e in listener.conflicts] == [("theirs", 7)]
        assert listener.durables == []  # the parked run is not released as if durable
        assert "theirs" not in p.waiting
        assert p.statistics().conflicts == 1


async def test_flush_returns_when_a_pending_snapshot_conflicts_with_a_newer_stored_version():
    async with ScriptedStore(tier="guarded") as store:
        p = Persister(Tier(store, FlushPolicy(interval=60.0)), SnapshotEncoder(CODEC), ManualClock(), Recorder())
        await store.inner.save([encode_snapshot(snap("theirs", 7), CODEC)], [])  # a genuine newer copy
        mark(p, "theirs", 1)
        store.conflicts_next = {"theirs": 7}
        with anyio.fail_after(5):  # before the fix: spun forever waiting for "theirs" to become durable
            await p.flush()
        assert p.durable == {}


async def test_a_newer_copy_that_does_not_verify_is_deleted_and_the_run_written_again():
    # One HSET of a version field (no key) used to fail a live run through this conflict (#11).
    listener = Recorder()
    async with MemoryStore(tier="forged") as store:
        p = Persister(Tier(store, FlushPolicy(interval=60.0)), SnapshotEncoder(CODEC), ManualClock(), listener)
        genuine = encode_snapshot(snap("r1", 3), CODEC)
        await store.save([genuine], [])
        forged = genuine._replace(header=genuine.header._replace(version=1000))  # not re-tagged
        await store.delete_copy("r1", genuine.body)
        await store.save([forged], [])
        mark(p, "r1", 4)
        with anyio.fail_after(5):
            await p.flush()
            await p.wait_durable("r1", 4)
        assert listener.conflicts == []
        kept = await store.load("r1")
        assert kept is not None
        assert decode_snapshot(kept, CODEC, tier="forged").version == 4
        assert p.statistics().forged_replaced == 1
        assert p.durable == {"r1": 4}


# ---------------------------------------------------------------- a cache tier


async def test_a_cache_tier_down_past_its_bound_drops_what_is_pending_and_is_rewritten_once_it_answers():
    listener = Recorder()
    async with ScriptedStore(tier="cache") as store:
        policy = FlushPolicy(interval=60.0, max_pending_rows=10, cache=True)
        p = Persister(Tier(store, policy), SnapshotEncoder(CODEC), ManualClock(), listener)
        store.fail_saves = 1_000  # the cache is down
        mark(p, "r00", 1)
        with pytest.raises(StoreUnavailableError):
            await p.flush_once()
        assert p.failing
        for i in range(1, 40):
            mark(p, f"r{i:02d}", 1)  # far past the bound while it is down
        assert listener.pressures == []  # a cache outage never holds steps back
        assert p.pending_rows <= 10  # and what is pending for it does not grow without bound
        assert p.statistics().dropped_rows >= 30
        assert listener.resets == []
        store.fail_saves = 0
        await p.flush_once()  # it answers again
        assert listener.resets == ["cache"]  # the runtime writes every run it holds into it anew
        assert p.statistics().resets == 1


async def test_a_dropped_cache_with_nothing_pending_is_probed_until_it_answers():
    listener = Recorder()
    async with ScriptedStore(tier="cache") as store:
        policy = FlushPolicy(interval=60.0, max_pending_rows=2, cache=True)
        p = Persister(Tier(store, policy), SnapshotEncoder(CODEC), ManualClock(), listener)
        store.fail_saves = 1_000
        mark(p, "a", 1)
        with pytest.raises(StoreUnavailableError):
            await p.flush_once()
        mark(p, "b", 1)  # past the bound while down: dropped, nothing pending any more
        assert p.pending_rows == 0
        assert p._next_deadline(0.0) == 0.0  # still due: the loop keeps asking
        store.inner.down = True
        with pytest.raises(StoreUnavailableError):
            await p.flush_once()  # the probe reaches the store and fails
        assert listener.resets == []
        store.inner.down = False
        await p.flush_once()
        assert listener.resets == ["cache"]


def test_a_cache_tier_cannot_be_write_through():
    with pytest.raises(ConfigError, match="cache"):
        FlushPolicy.through(cache=True)
