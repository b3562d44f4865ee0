"""The write-behind ``Persister``: one per tier, sharing one ``SnapshotEncoder`` (``_encoder.py``).

The "Persister" box of the map in docs/architecture.md: ``mark`` is O(1) and does no I/O (it keeps
the newest snapshot per run and appends the transition); the flush loop
coalesces, encodes once (shared across tiers through ``SnapshotEncoder``),
writes one batch, and only then acknowledges durability. A failed flush puts
its batch back (newer versions win) and retries with capped backoff. Dead
letters cross in as domain objects and are encoded in the flush too. What the
owner must hear (durable, pressure, codec error, reset) goes to the
``TierListener`` given to the constructor. ``Tiers`` (``_tiers.py``) holds one
persister per tier.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, final

import anyio
import anyio.lowlevel

from hotstate._clock import within
from hotstate._errors import (
    CodecError,
    DurabilityTimeoutError,
    HotstateError,
    PersistenceError,
    RunRejectedError,
    StaleVersionError,
    StoreUnavailableError,
)
from hotstate.actors import DeadLetter, Snapshot, Status, Transition
from hotstate.persistence._records import (
    SaveResult,
    StoredDeadLetter,
    StoredSnapshot,
    encode_dead_letter,
    encode_snapshot,
    verifies,
)
from hotstate.persistence._store import DeadLetterRefusals

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from anyio.abc import TaskStatus

    from hotstate._clock import Clock
    from hotstate._instrument import Instruments
    from hotstate.persistence._encoder import SnapshotEncoder
    from hotstate.persistence._listener import TierListener
    from hotstate.persistence._policy import Tier
    from hotstate.persistence._shards import Fence

__all__ = ["Persister", "PersisterStatistics"]


log = logging.getLogger("hotstate.persistence")


@dataclass(frozen=True, slots=True, kw_only=True)
class PersisterStatistics:
    """Figures of one tier's persister.

    Attributes:
        tier: the tier's name.
        flushes: successful flushes.
        failures: failed flushes (each retried; nothing was lost).
        consecutive_failures: failures since the last success (0 when healthy).
        snapshots_written: snapshots written (after coalescing).
        transitions_written: transitions written.
        stale_skipped: snapshots the store's version guard skipped.
        rows_last_flush: snapshots + transitions in the last flush.
        last_flush_duration: seconds the last flush took.
        max_flush_duration: the longest flush so far, in seconds.
        bytes_written: encoded snapshot bytes written.
        pending_snapshots: runs with an unflushed snapshot now.
        pending_transitions: unflushed transitions now.
        lag: age in seconds of the oldest unflushed transition (0 when none).
        backpressure: True while steps wait for this tier to drain.
        backpressure_events: times the memory bound was crossed.
        codec_errors: snapshots that could not be encoded (their runs failed).
        conflicts: snapshots the store skipped because it holds a newer version of
            the run (never counted durable; the run was stopped).
        rejected_rows: runs the store could not write at all and left out of
            a save (``SaveResult.rejected``: text that does not encode, a
            number out of range, a key of the wrong type), once per save that
            carried them, plus dead letters it could not write. Never
            counted durable; the run was failed (#11).
        dropped_rows: rows a cache tier (``FlushPolicy(cache=True)``) dropped
            while down past its memory bound (it was written anew once back).
        forged_replaced: copies that claimed a newer version of a run but did
            not verify (a forged header): deleted, and the run written again.
        resets: times the store reported it had lost its data (e.g. Valkey restarted
            empty); each time the runtime wrote what it holds in memory again.
        last_error: the last flush error's message, or None.
        fenced_rows: runs (and dead letters, and runs' kept copies) whose
            rows the store's fence refused: their shard had passed to another
            process. Dropped, never retried or counted durable (DESIGN.md
            "Several processes").
    """

    tier: str
    flushes: int
    failures: int
    consecutive_failures: int
    snapshots_written: int
    transitions_written: int
    stale_skipped: int
    rows_last_flush: int
    last_flush_duration: float
    max_flush_duration: float
    bytes_written: int
    pending_snapshots: int
    pending_transitions: int
    lag: float
    backpressure: bool
    backpressure_events: int
    codec_errors: int
    conflicts: int
    rejected_rows: int
    dropped_rows: int
    forged_replaced: int
    resets: int
    last_error: str | None
    fenced_rows: int = 0


@final
class _Waiter:
    """One ``wait_durable`` caller: set when its version is durable, or with the error that means it never will be."""

    __slots__ = ("error", "event", "version")

    def __init__(self, version: int) -> None:
        self.version = version
        self.event = anyio.Event()
        self.error: HotstateError | None = None


@final
class Persister:
    """Flushes one tier: coalesced snapshots and the transition log, in batches.

    Args:
        tier: the store and its flush policy.
        encoder: the encoder shared by all tiers.
        clock: time for intervals and backoff.
        listener: told when a parked item may go on, about pressure, codec
            errors and a store that lost its data.
        instruments: observers of each store write (none: no cost).
    """

    def __init__(
        self,
        tier: Tier,
        encoder: SnapshotEncoder,
        clock: Clock,
        listener: TierListener,
        instruments: Instruments | None = None,
    ) -> None:
        self.store = tier.store
        self.durable: dict[str, int] = {}
        self._instruments = (
            instruments if instruments is not None and (instruments.save_started or instruments.save_finished) else None
        )
        self.policy = tier.policy
        self.name = tier.store.tier
        self._encoder = encoder
        encoder.track(self.durable)
        self._clock = clock
        self._listener = listener
        self._dirty: dict[str, Snapshot] = {}
        self._transitions: list[Transition] = []
        self._dead: list[DeadLetter] = []
        self._dead_deletes: list[str] = []
        self.waiting: dict[str, Any] = {}  # run_id -> what to hand the listener once durable
        self._durable_events: dict[str, list[_Waiter]] = {}
        self._lock = anyio.Lock()
        self._sleep: anyio.CancelScope | None = None
        self._last_flush = clock.now()
        self._avg_bytes = 0.0
        self._poisoned: dict[str, CodecError] = {}  # runs whose snapshot cannot be encoded: why
        self._conflicted: set[str] = set()  # runs whose conflict was logged (once each)
        self._suspects: dict[str, tuple[Snapshot, int]] = {}  # conflicts to judge: (snapshot, claimed version)
        self._forged_replaced = 0
        self._rejected: dict[str, RunRejectedError] = {}  # runs the store refused: their last refusal
        self._kept: dict[str, int] = {}  # run -> the keep_every span of its newest kept copy
        self.pressure = False
        self._stopping = False
        bound = tier.policy.max_pending_rows
        self._bound_rows = bound if bound is not None else 1 << 62
        self._bound_dirty = 1 << 62  # dirty runs past max_pending_bytes at the measured bytes per snapshot
        # Record a transition and the run's newest snapshot: O(1), no I/O. Only a
        # bytes-bounded tier pays for the second bound check on every mark.
        self.mark: Callable[[Snapshot, Transition], None] = (
            self._mark if tier.policy.max_pending_bytes is None else self._mark_bounded_bytes
        )
        self._urgent_rows = 0 if tier.policy.write_through else tier.policy.max_batch_rows
        # figures
        self._flushes = self._failures = self._consecutive = 0
        self._snapshots_written = self._transitions_written = self._stale = 0
        self._rows_last = 0
        self._last_duration = self._max_duration = 0.0
        self._bytes = 0
        self._pressure_events = 0
        self._codec_errors = 0
        self._conflicts = 0
        self._rejected_rows = 0
        self._cache_dropped = False  # a cache tier dropped pending rows: rewrite it once it answers
        self._dropped_rows = 0
        self._resets = 0
        self._last_error: str | None = None
        # Ownership (set by Tiers): the fence every save carries, and each run's shard.
        self.fence: Callable[[], Fence | None] | None = None
        self.shard_of: Callable[[str], int] | None = None
        self._fenced_rows = 0
        self._doomed: list[Callable[[str], bool]] = []  # dropped while a flush held its batch

    # ------------------------------------------------------------ hot path

    def _mark(self, snapshot: Snapshot, transition: Transition) -> None:
        dirty = self._dirty
        dirty[snapshot.run_id] = snapshot
        transitions = self._transitions
        transitions.append(transition)
        n = len(transitions)
        if n >= self._urgent_rows or n == 1:
            self._poke()  # batch full, write-through, or the loop sleeps with nothing pending
        if n + len(dirty) > self._bound_rows and not self.pressure:
            self._set_pressure(True)

    def _mark_bounded_bytes(self, snapshot: Snapshot, transition: Transition) -> None:
        """``mark`` for a tier with ``max_pending_bytes``: also bound the estimated bytes of the dirty runs.

        The estimate is the bytes per snapshot measured by the last flush that
        wrote any (before the first, only the rows bound applies).
        """
        dirty = self._dirty
        dirty[snapshot.run_id] = snapshot
        transitions = self._transitions
        transitions.append(transition)
        n = len(transitions)
        if n >= self._urgent_rows or n == 1:
            self._poke()
        if (n + len(dirty) > self._bound_rows or len(dirty) > self._bound_dirty) and not self.pressure:
            self._set_pressure(True)

    def mark_dead_letter(self, letter: DeadLetter) -> None:
        """Queue a dead letter for the next flush (encoded there, like snapshots)."""
        self._dead.append(letter)
        self._poke()

    def mark_dead_letter_deleted(self, run_id: str) -> None:
        """Queue the deletion of a dead-letter record (it was retried)."""
        self._dead_deletes.append(run_id)
        self._poke()

    def _poke(self) -> None:
        if self._sleep is not None:
            self._sleep.cancel()

    def _set_pressure(self, on: bool) -> None:
        if on and self.policy.cache:
            self._cache_over_bound()  # a cache never holds steps back
            return
        self.pressure = on
        if on:
            self._pressure_events += 1
            self._poke()
        self._listener.pressure(self.name, on)

    def _cache_over_bound(self) -> None:
        """A cache tier past its memory bound: flush now; while it fails, drop what is pending (rewritten later)."""
        if not self.failing:
            self._poke()
            return
        dropped = len(self._dirty) + len(self._transitions) + len(self._dead) + len(self._dead_deletes)
        if not self._cache_dropped:
            log.warning(
                "hotstate: cache tier %r is down past its memory bound: %d pending rows dropped; "
                "it is written anew from memory once it answers",
                self.name,
                dropped,
            )
        self._cache_dropped = True
        self._dropped_rows += dropped
        self._dirty = {}
        self._transitions = []
        self._dead = []
        self._dead_deletes = []
        exc = StoreUnavailableError(self.name, "a cache tier down past its memory bound dropped what was pending")
        for rid in list(self._durable_events):
            self._fail_waiters(rid, exc)

    # -------------------------------------------------------------- queries

    @property
    def failing(self) -> bool:
        """True while the tier's latest flush failed (it is being retried)."""
        return self._consecutive > 0

    def refused(self, run_id: str) -> bool:
        """True when the store refused ``run_id`` (``SaveResult.rejected``) and nothing newer of it is pending."""
        return bool(self._rejected) and run_id in self._rejected and run_id not in self._dirty

    @property
    def pending_rows(self) -> int:
        """Unflushed snapshots + transitions."""
        return len(self._dirty) + len(self._transitions)

    def statistics(self) -> PersisterStatistics:
        """Return this tier's figures.

        Returns:
            A frozen record.
        """
        lag = 0.0
        if self._transitions:
            lag = max(0.0, self._clock.wall() - self._transitions[0].at)
        return PersisterStatistics(
            tier=self.name,
            flushes=self._flushes,
            failures=self._failures,
            consecutive_failures=self._consecutive,
            snapshots_written=self._snapshots_written,
            transitions_written=self._transitions_written,
            stale_skipped=self._stale,
            rows_last_flush=self._rows_last,
            last_flush_duration=self._last_duration,
            max_flush_duration=self._max_duration,
            bytes_written=self._bytes,
            pending_snapshots=len(self._dirty),
            pending_transitions=len(self._transitions),
            lag=lag,
            backpressure=self.pressure,
            backpressure_events=self._pressure_events,
            codec_errors=self._codec_errors,
            conflicts=self._conflicts,
            rejected_rows=self._rejected_rows,
            dropped_rows=self._dropped_rows,
            forged_replaced=self._forged_replaced,
            resets=self._resets,
            last_error=self._last_error,
            fenced_rows=self._fenced_rows,
        )

    async def wait_durable(self, run_id: str, version: int, timeout: float | None = None) -> None:  # noqa: ASYNC109 - on the injectable clock, defaulting to the policy's ack_timeout
        """Wait until ``run_id`` is durable at ``version`` or later in this tier.

        Args:
            run_id: the run.
            version: the version to wait for.
            timeout: seconds on this persister's clock (default: the policy's ``ack_timeout``).

        Raises:
            DurabilityTimeoutError: not durable in time (the tier is down or slow).
            RunRejectedError: the store refused the run (``SaveResult.rejected``),
                and no newer snapshot of it is pending: it will never be durable.
            PersistenceError: another reason it will never be durable here
                (a conflict, a payload that cannot be encoded).
        """
        if self.durable.get(run_id, 0) >= version:
            return
        if self.refused(run_id):
            raise self._rejected[run_id]
        poisoned = self._poisoned.get(run_id) if self._poisoned else None
        if poisoned is not None and run_id not in self._dirty:
            # Its snapshot could not be encoded, and nothing newer is pending: a caller
            # arriving after that flush would otherwise wait for a version never written.
            raise poisoned
        waiter = _Waiter(version)
        self._durable_events.setdefault(run_id, []).append(waiter)
        self._poke()
        seconds = self.policy.ack_timeout if timeout is None else timeout
        try:
            answered, _ = await within(self._clock, seconds, waiter.event.wait())
        finally:
            self._drop_waiter(run_id, waiter)
        if waiter.error is not None:
            raise waiter.error
        if not answered and self.durable.get(run_id, 0) < version:
            raise DurabilityTimeoutError(
                self.name,
                f"run {run_id!r} v{version} not durable after {seconds:g} s"
                f" (durable: v{self.durable.get(run_id, 0)}; last error: {self._last_error})",
                run_id=run_id,
                version=version,
            )

    def _drop_waiter(self, run_id: str, waiter: _Waiter) -> None:
        pending = self._durable_events.get(run_id)
        if pending is not None and waiter in pending:
            pending.remove(waiter)
            if not pending:
                del self._durable_events[run_id]

    def _fail_waiters(self, run_id: str, exc: HotstateError) -> None:
        """Wake every ``wait_durable`` caller of ``run_id`` with ``exc``: what they wait for will not become durable."""
        pending = self._durable_events.pop(run_id, None)
        for waiter in pending or ():
            waiter.error = exc
            waiter.event.set()

    # ----------------------------------------------------------- the loop

    def stop(self) -> None:
        """Let the flush loop finish the flush in progress, if any, and exit (shutdown)."""
        self._stopping = True
        self._poke()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """The flush loop: flush when due, back off after failures; until ``stop()`` or cancelled."""
        task_status.started()
        policy = self.policy
        delay = policy.retry_initial
        retry_at = 0.0
        while not self._stopping:
            now = self._clock.now()
            deadline = self._next_deadline(now)
            if self._consecutive:
                deadline = max(retry_at, deadline)
            if deadline > now:
                with anyio.CancelScope() as scope:
                    self._sleep = scope  # mark() pokes it: then the deadline is recomputed
                    if deadline == float("inf"):
                        await anyio.sleep_forever()
                    else:
                        await self._clock.sleep_until(deadline)
                self._sleep = None
                continue
            try:
                await self.flush_once()
            except PersistenceError:
                pass  # counted, logged and merged back by flush_once; retried after backoff
            except Exception:
                self._failures += 1
                self._consecutive += 1
                log.exception("hotstate: flush of tier %r failed unexpectedly", self.name)
            if self._consecutive:
                retry_at = self._clock.now() + delay
                delay = min(policy.retry_max, delay * 2)
            else:
                delay = policy.retry_initial
            await anyio.lowlevel.checkpoint()

    def _next_deadline(self, now: float) -> float:
        """When the next flush is due, given ``now`` (pure apart from reading the pending state)."""
        # Dead letters keep the tier's cadence like any other row: a crash before
        # they are durable re-runs the failed step and dead-letters it again.
        # Flushing at once for each of them made a steady trickle of failures
        # flush back to back (measured in the sweep: SQLite flushes ran without
        # pause and the loss window grew past the interval plus one flush).
        if not self._transitions and not self._dirty and not self._dead and not self._dead_deletes:
            return now if self._cache_dropped else float("inf")  # a dropped cache: probe it until it answers
        if self.pressure or self._durable_events or self.waiting:
            return now  # someone is blocked on this tier: flush now
        policy = self.policy
        if policy.flush_due(
            now=now, last_flush=self._last_flush, pending_rows=self.pending_rows, dirty_runs=len(self._dirty)
        ):
            return now
        return self._last_flush + policy.interval

    async def flush(self) -> None:
        """Flush everything pending now, and return once it is durable.

        Raises:
            PersistenceError: the tier failed; the batch was put back and will be retried.
        """
        # A batch the loop is writing right now is not in _dirty any more: wait
        # for it first (the lock), or this call could return before it is durable.
        async with self._lock:
            pass
        # What is pending now; marks that arrive meanwhile go with the next flush,
        # so a busy runtime cannot keep this call from returning.
        target = {rid: snap.version for rid, snap in self._dirty.items()}
        rounds = 0
        while self._transitions or self._dead or self._dead_deletes or target:
            await self.flush_once()
            # A version the store skipped for a newer one, or that cannot be encoded,
            # will never be durable here: waiting for it would never return.
            never = self._conflicted | self._poisoned.keys() | self._rejected.keys()
            target = {rid: v for rid, v in target.items() if self.durable.get(rid, 0) < v and rid not in never}
            rounds += 1
            if rounds > 1 and not target and not self._dead and not self._dead_deletes:
                break
        if rounds == 0 and await self._probe_reset():
            await self.flush()  # the store went back in time: write what memory holds again

    async def _probe_reset(self) -> bool:
        """Nothing was pending: ask the store (an empty save) whether it lost writes this runtime made.

        An idle runtime would otherwise never notice a store restored from an
        older snapshot before it closes, and the next recovery would resume
        runs the lost copies show unfinished.

        Returns:
            True when the store reported the loss (the runs held are queued again).
        """
        async with self._lock:
            try:
                result = await self.store.save([], [])
            except PersistenceError:
                raise
            except Exception as exc:
                raise StoreUnavailableError(self.name, f"{type(exc).__name__}: {exc}") from exc
        if result.reset:
            self._store_was_reset()
        return result.reset

    async def flush_once(self) -> None:
        """Write everything pending, in saves of at most ``max_batch_rows`` runs.

        Raises:
            PersistenceError: the tier failed; the batch was put back.
        """
        async with self._lock:
            try:
                await self._flush_locked()
            finally:
                self._doomed = []

    def _chunks(
        self, batch: dict[str, Snapshot], transitions: list[Transition]
    ) -> list[tuple[dict[str, Snapshot], list[Transition]]]:
        """Split a flush into saves of at most ``max_batch_rows`` runs, each with its runs' transitions.

        One pass over the transitions however many chunks there are: a flush
        never rescans what it leaves for later (it leaves nothing).
        """
        limit = self.policy.max_batch_rows
        if len(batch) <= limit:
            return [(batch, transitions)]
        by_run: dict[str, list[Transition]] = {}
        for t in transitions:
            group = by_run.get(t.run_id)
            if group is None:
                by_run[t.run_id] = [t]
            else:
                group.append(t)
        items = list(batch.items())
        chunks: list[tuple[dict[str, Snapshot], list[Transition]]] = []
        for i in range(0, len(items), limit):
            chunk = dict(items[i : i + limit])
            chunk_transitions: list[Transition] = []
            for rid in chunk:
                chunk_transitions.extend(by_run.pop(rid, ()))
            chunks.append((chunk, chunk_transitions))
        for leftover in by_run.values():  # transitions whose run has no dirty snapshot
            chunks[-1][1].extend(leftover)
        return chunks

    def _encode(self, batch: dict[str, Snapshot]) -> tuple[list[StoredSnapshot], dict[str, CodecError]]:
        """The stored form of each snapshot, and the runs whose snapshot cannot be written (with why)."""
        encode = self._encoder.encode
        out: list[StoredSnapshot] = []
        unwritten: dict[str, CodecError] = {}
        for rid, snap in batch.items():
            try:
                out.append(encode(snap))
            except CodecError as exc:
                named = CodecError(exc.tier, f"run {rid!r}: {exc.detail}")
                named.__cause__ = exc
                header_only = self._encode_poisoned(rid, snap, named)
                if header_only:
                    out.extend(header_only)
                else:
                    unwritten[rid] = named
        return out, unwritten

    def _encode_poisoned(self, rid: str, snap: Snapshot, exc: CodecError) -> list[StoredSnapshot]:
        """An unencodable payload fails its run; its header still reaches the store."""
        if rid not in self._poisoned:
            self._poisoned[rid] = exc
            self._codec_errors += 1
            log.error("hotstate: run %r cannot be persisted to %r: %s", rid, self.name, exc)
            self._listener.codec_error(rid, exc)
        if snap.status is not Status.failed:
            return []  # the run is being failed; its failed snapshot will be written
        epoch_of = self._encoder.epoch_of
        epoch = 0 if epoch_of is None else epoch_of(rid)
        return [encode_snapshot(snap._replace(payload=None, signals=()), self._encoder.codec, epoch)]

    async def _flush_locked(self) -> None:
        dead, self._dead = self._dead, []
        dead_deletes, self._dead_deletes = self._dead_deletes, []
        batch, self._dirty = self._dirty, {}
        transitions, self._transitions = self._transitions, []
        self._last_flush = self._clock.now()
        t0 = time.perf_counter()
        chunks = self._chunks(batch, transitions)
        done = snapshots = rows = nbytes = 0
        dead_saved = False
        fence = None if self.fence is None else self.fence()
        try:
            if self._cache_dropped and not chunks[0][0] and not chunks[0][1] and not dead and not dead_deletes:
                await self.store.scan(limit=1)  # a dropped cache with nothing pending: does it answer yet?
            # Dead letters go before the run rows: after a crash between the two,
            # recovery finds a letter newer than the run's row and records the
            # run as failed (never a failed run without its letter).
            if dead:  # one transaction for all of them: a flush may carry many
                records = [self._encode_dead_letter(letter) for letter in dead]
                if fence is None:
                    refused = await self.store.save_dead_letters(records)
                else:  # the store judges each letter's shard in the write itself
                    refused = await self.store.save_dead_letters(records, fence=fence)
                if refused:
                    self._refused_dead_letters(refused, fence)
            dead_saved = True
            for chunk, chunk_transitions in chunks:
                stored, unwritten = self._encode(chunk)
                conflicts: Mapping[str, int] = {}
                rejected: Mapping[str, str] = {}
                if stored or chunk_transitions:
                    result = await self._save(stored, chunk_transitions, fence)
                    self._stale += result.stale
                    if result.fenced:  # another process owns these shards: nothing of them was written
                        chunk, stored, chunk_transitions = self._fenced_off(
                            result.fenced, fence, chunk, stored, chunk_transitions
                        )
                    conflicts = result.conflicts
                    if result.rejected:  # nothing of these runs was written
                        rejected = result.rejected
                        stored = [x for x in stored if x.header.run_id not in rejected]
                        chunk_transitions = [t for t in chunk_transitions if t.run_id not in rejected]
                    if result.reset:
                        # At once, not after the whole flush: a later chunk that fails
                        # must not lose it (the store reports a reset only once).
                        self._store_was_reset()
                if self.policy.keep_every is not None and stored:
                    await self._keep_versions(stored, fence)
                done += 1
                self._acknowledge(chunk, unwritten, conflicts, rejected)
                if self._suspects:
                    await self._judge_conflicts()
                snapshots += len(stored)
                rows += len(stored) + len(chunk_transitions)
                nbytes += sum(len(x.body) for x in stored)
            # Deletions (retried letters) after the rows: a crash between leaves a
            # stale letter that recovery recognises (older than its run) and deletes.
            for rid in dead_deletes:
                await self.store.delete_dead_letter(rid)
        except BaseException as exc:
            rest = chunks[done:]
            self._merge_back(
                {rid: snap for chunk, _ in rest for rid, snap in chunk.items()},
                [t for _, chunk_transitions in rest for t in chunk_transitions],
                [] if dead_saved else dead,
                dead_deletes,
            )
            if not isinstance(exc, Exception):
                raise  # cancelled mid-write: the batch is back in pending, nothing is dropped
            self._failures += 1
            self._consecutive += 1
            self._last_error = f"{type(exc).__name__}: {exc}"
            if self._consecutive == 1 or self._consecutive % 100 == 0:
                log.warning(
                    "hotstate: flush of tier %r failed (%d in a row), will retry: %s",
                    self.name,
                    self._consecutive,
                    self._last_error,
                )
            if isinstance(exc, PersistenceError):
                raise
            raise StoreUnavailableError(self.name, self._last_error) from exc
        duration = time.perf_counter() - t0
        self._consecutive = 0
        self._last_error = None
        self._flushes += 1
        self._snapshots_written += snapshots
        self._transitions_written += rows - snapshots
        self._rows_last = rows
        self._last_duration = duration
        self._max_duration = max(self._max_duration, duration)
        self._bytes += nbytes
        if self._cache_dropped:
            self._cache_dropped = False
            self._store_was_reset("a cache tier answers again after rows were dropped for it")
        if snapshots:
            self._avg_bytes = avg = nbytes / snapshots
            bound_bytes = self.policy.max_pending_bytes
            if bound_bytes is not None and avg > 0:
                self._bound_dirty = int(bound_bytes / avg)
        if self.pressure and not self.policy.over_bound(
            pending_rows=self.pending_rows, pending_bytes=len(self._dirty) * self._avg_bytes
        ):
            self._set_pressure(False)

    def _encode_dead_letter(self, letter: DeadLetter) -> StoredDeadLetter:
        """The stored form of a dead letter (``encode_dead_letter``)."""
        return encode_dead_letter(letter, self._encoder.codec)

    async def _save(
        self, stored: list[StoredSnapshot], transitions: list[Transition], fence: Fence | None = None
    ) -> SaveResult:
        instruments = self._instruments
        if instruments is None:
            if fence is None:
                return await self.store.save(stored, transitions)
            return await self.store.save(stored, transitions, fence=fence)
        instruments.saving(self.name)
        try:
            if fence is None:
                result = await self.store.save(stored, transitions)
            else:
                result = await self.store.save(stored, transitions, fence=fence)
        except BaseException as exc:
            instruments.saved(self.name, exc)
            raise
        instruments.saved(self.name, None)
        return result

    async def _keep_versions(self, stored: list[StoredSnapshot], fence: Fence | None = None) -> None:
        """Keep a point-in-time copy when a run's version enters a new ``keep_every`` span.

        With ``fence``, the store judges each copy's shard in the write: the
        copies of a shard it fenced off are dropped and reported, as
        ``_fenced_off`` does with rows.
        """
        every = self.policy.keep_every
        assert every is not None  # noqa: S101 - checked by the caller
        kept = self._kept
        keep = [s for s in stored if s.header.version // every > kept.get(s.header.run_id, -1)]
        if not keep:
            return
        if fence is None:
            await self.store.save_versions(keep)
        else:
            fenced = await self.store.save_versions(keep, fence=fence)
            if fenced:
                shard_of = self.shard_of
                assert shard_of is not None  # noqa: S101 - a fenced save needs the shard map
                lost = {s.header.run_id for s in keep if shard_of(s.header.run_id) in fenced}
                self._fenced(fenced, fence, len(lost), "kept copies")
                keep = [s for s in keep if s.header.run_id not in lost]
        for s in keep:
            kept[s.header.run_id] = s.header.version // every

    def store_was_reset(self, why: str = "it lost writes (restarted empty or from an older copy)") -> None:
        """A save reported that the store lost writes: forget what it acknowledged; the runtime writes every run again."""
        self._store_was_reset(why)

    def _store_was_reset(self, why: str = "it lost writes (restarted empty or from an older copy)") -> None:
        """The store lost writes: nothing acknowledged before can be trusted; write every run held again."""
        self._resets += 1
        self.durable.clear()
        log.warning("hotstate: tier %r: %s; writing every run held in memory again", self.name, why)
        self._listener.reset(self.name)

    def repopulate(self, snapshot: Snapshot, transitions: Sequence[Transition]) -> None:
        """Queue a run's current snapshot and the transitions still in memory (after a reset)."""
        self._dirty[snapshot.run_id] = snapshot
        self._transitions.extend(transitions)
        self._poke()

    def note_stored(self, run_id: str, version: int) -> None:
        """The store was read holding ``version`` of ``run_id``: that version is durable here."""
        if self.durable.get(run_id, 0) < version:
            self.durable[run_id] = version

    def notify_when_durable(self, run_id: str, item: Any) -> None:
        """Hand ``item`` to the listener once ``run_id``'s next flush is acknowledged; flush soon."""
        self.waiting[run_id] = item
        self._poke()

    def _acknowledge(
        self,
        batch: dict[str, Snapshot],
        unwritten: Mapping[str, CodecError],
        conflicts: Mapping[str, int],
        rejected: Mapping[str, str],
    ) -> None:
        """Count as durable what the store wrote: never a snapshot it could not take, refused, or skipped for a newer one."""
        durable = self.durable
        waiting = self.waiting
        events = self._durable_events
        acknowledged = self._encoder.acknowledged
        skips = bool(unwritten or conflicts or rejected)  # almost always False: one test per flush, not per row
        if rejected:
            for rid, why in rejected.items():
                self._refused(rid, why)
        for rid, snap in batch.items():
            if skips:
                if rid in unwritten:
                    self._fail_waiters(rid, unwritten[rid])
                    continue
                if rid in rejected:
                    continue
                stored = conflicts.get(rid)
                if stored is not None:
                    self._suspects[rid] = (snap, stored)  # judged by _judge_conflicts, which reads the copy
                    continue
            if durable.get(rid, 0) < snap.version:
                durable[rid] = snap.version
            acknowledged(rid, snap.version)
            if waiting:
                item = waiting.pop(rid, None)
                if item is not None:
                    self._listener.durable(item)
            if events:
                pending = events.get(rid)
                if pending:
                    keep = [w for w in pending if w.version > snap.version]
                    for w in pending:
                        if w.version <= snap.version:
                            w.event.set()
                    if keep:
                        events[rid] = keep
                    else:
                        del events[rid]

    async def _judge_conflicts(self) -> None:
        """Read each copy that kept a write out: a genuine newer copy stops the run; a forged one is replaced.

        A conflict means the store holds a newer version of the run. Only a copy
        whose whole envelope verifies says so: one HSET of a ``version`` field
        (no key needed) used to fail a live run, compensate and dead-letter it
        (#11). A copy that does not verify is deleted (only if its bytes are
        still the ones read) and the run's snapshot is written again.
        """
        suspects, self._suspects = self._suspects, {}
        codec = self._encoder.codec
        for rid, (snap, claimed) in suspects.items():
            if self._doomed and any(d(rid) for d in self._doomed):
                continue  # its shard left this process while the save was out
            try:
                stored = await self.store.load(rid)
                genuine = stored is not None and verifies(stored, codec, tier=self.name)
                if stored is not None and not genuine:
                    delete = getattr(self.store, "delete_copy", None)
                    if delete is None:  # a store of an older protocol: keep the old rule
                        genuine = True
                    else:
                        await delete(rid, stored.body)
                        self._forged_replaced += 1
                        log.warning(
                            "hotstate: tier %r held run %r at v%d in a copy that does not verify; "
                            "deleted, and the run's v%d written again",
                            self.name,
                            rid,
                            claimed,
                            snap.version,
                        )
            except Exception as exc:  # noqa: BLE001 - judged again at the next flush
                log.warning("hotstate: tier %r: cannot judge the conflict of run %r yet: %s", self.name, rid, exc)
                genuine = False
            if genuine:
                self._conflict(rid, snap.version, claimed)
            else:
                newer = self._dirty.get(rid)
                if newer is None or newer.version < snap.version:
                    self._dirty[rid] = snap
                self._poke()

    def _conflict(self, rid: str, attempted: int, stored: int) -> None:
        """The store holds ``rid`` at a newer version than this runtime wrote: not durable, and the run must stop."""
        exc = StaleVersionError(self.name, rid, stored, attempted)
        self._conflicts += 1
        if rid not in self._conflicted:
            self._conflicted.add(rid)
            log.error(
                "hotstate: tier %r holds run %r at v%d, newer than the v%d this runtime wrote; not counted durable",
                self.name,
                rid,
                stored,
                attempted,
            )
        self._fail_waiters(rid, exc)
        self.waiting.pop(rid, None)
        self._listener.conflict(rid, exc)

    def _refused(self, rid: str, why: str) -> None:
        """The store refused ``rid`` whole (``SaveResult.rejected``): not durable, never retried, and the run must fail.

        Its rows are dropped, not merged back: the store would refuse them
        again, and a retried batch would block every other run (#11). The
        owner hears every refusal through ``codec_error``, as for a payload
        that cannot be encoded: the first fails the run; a later one (the
        run is being failed, and each new snapshot is offered once) schedules
        it again, as a run parked for a write-through tier would otherwise
        wait for a durability that never comes. Logged once per run.
        """
        exc = RunRejectedError(self.name, rid, why)
        self._rejected_rows += 1
        if rid not in self._rejected:
            log.error(
                "hotstate: tier %r refused run %r; not counted durable, the run is failed: %s", self.name, rid, why
            )
        self._rejected[rid] = exc
        self._fail_waiters(rid, exc)
        self.waiting.pop(rid, None)
        self._listener.codec_error(rid, exc)

    def _refused_dead_letters(self, refused: Mapping[str, str], fence: Fence | None) -> None:
        """The store left these dead letters out; the other records were written.

        A letter the fence refused (its reason starts with "fenced") is
        dropped like a fenced row (``_fenced_off``): its shard passed to
        another process. Any other is counted and logged.
        """
        shard_of = self.shard_of if fence is not None else None
        stored = refused.fenced if isinstance(refused, DeadLetterRefusals) else {}  # shard -> the store's epoch
        fenced: dict[int, int] = {}
        dropped = 0
        for rid, why in refused.items():
            if shard_of is not None and why.startswith("fenced"):
                shard = shard_of(rid)
                fenced[shard] = stored.get(shard, 0)
                dropped += 1
                continue
            self._rejected_rows += 1
            log.error("hotstate: tier %r cannot write the dead letter of run %r: %s", self.name, rid, why)
        if dropped:
            self._fenced(fenced, fence, dropped, "dead letters")

    def _merge_back(
        self,
        batch: dict[str, Snapshot],
        transitions: list[Transition],
        dead: list[DeadLetter],
        dead_deletes: list[str],
    ) -> None:
        """Put a failed batch back; snapshots marked meanwhile are newer and win.

        Rows of runs dropped while the batch was out (their shard left this
        process) stay dropped: written later, under another holding, they
        would be an old owner's state.
        """
        if self._doomed:
            doomed = self._doomed

            def gone(rid: str) -> bool:
                return any(d(rid) for d in doomed)

            batch = {rid: snap for rid, snap in batch.items() if not gone(rid)}
            transitions = [t for t in transitions if not gone(t.run_id)]
            dead = [d for d in dead if not gone(d.run_id)]
            dead_deletes = [rid for rid in dead_deletes if not gone(rid)]
        dirty = self._dirty
        for rid, snap in batch.items():
            newer = dirty.get(rid)
            if newer is None or newer.version < snap.version:
                dirty[rid] = snap
        self._transitions = transitions + self._transitions
        self._dead = dead + self._dead
        self._dead_deletes = dead_deletes + self._dead_deletes

    def _fenced(self, fenced: Mapping[int, int], fence: Fence | None, rows: int, what: str) -> None:
        """The store's fence refused ``rows`` rows of ``fenced`` shards (shard -> stored epoch): count, log, report."""
        self._fenced_rows += rows
        log.warning(
            "hotstate: tier %r refused shards %s to this process (another owns them now); their unflushed %s are dropped",
            self.name,
            sorted(fenced),
            what,
        )
        sent = {} if fence is None else {s: e for s, e in fence.epochs.items() if s in fenced}
        self._listener.fenced(self.name, fenced, sent)

    def _fenced_off(
        self,
        fenced: Mapping[int, int],
        fence: Fence | None,
        chunk: dict[str, Snapshot],
        stored: list[StoredSnapshot],
        transitions: list[Transition],
    ) -> tuple[dict[str, Snapshot], list[StoredSnapshot], list[Transition]]:
        """Drop the rows of shards the store fenced off: retrying them can never succeed (design/ownership.md §4.7)."""
        shard_of = self.shard_of
        assert shard_of is not None  # noqa: S101 - a fenced save needs the shard map
        lost = {rid for rid in chunk if shard_of(rid) in fenced}
        lost.update(t.run_id for t in transitions if shard_of(t.run_id) in fenced)
        self._fenced(fenced, fence, len(lost), "rows")
        return (
            {rid: snap for rid, snap in chunk.items() if rid not in lost},
            [x for x in stored if x.header.run_id not in lost],
            [t for t in transitions if t.run_id not in lost],
        )

    def drop(self, doomed: Callable[[str], bool], exc: Callable[[str], HotstateError]) -> None:
        """Drop everything pending of the runs ``doomed`` selects (their shard left this process).

        Their ``wait_durable`` callers get ``exc(run_id)``; nothing of them is written or merged back.
        """
        if self._lock.locked():
            self._doomed.append(doomed)  # a flush holds a batch: it must not merge these back
        self._dirty = {rid: s for rid, s in self._dirty.items() if not doomed(rid)}
        self._transitions = [t for t in self._transitions if not doomed(t.run_id)]
        self._dead = [d for d in self._dead if not doomed(d.run_id)]
        self._dead_deletes = [rid for rid in self._dead_deletes if not doomed(rid)]
        self._suspects = {rid: v for rid, v in self._suspects.items() if not doomed(rid)}
        for rid in [rid for rid in self.waiting if doomed(rid)]:
            del self.waiting[rid]
        for rid in [rid for rid in self._durable_events if doomed(rid)]:
            self._fail_waiters(rid, exc(rid))
        for rid in [rid for rid in self.durable if doomed(rid)]:
            self.forget(rid)

    def forget(self, run_id: str) -> None:
        """Drop per-run bookkeeping of a run that is gone from memory."""
        self.durable.pop(run_id, None)
        self._encoder.forget(run_id)
        self._poisoned.pop(run_id, None)
        self._conflicted.discard(run_id)
        self._rejected.pop(run_id, None)
        self._kept.pop(run_id, None)
