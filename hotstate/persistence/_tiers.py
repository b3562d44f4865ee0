"""``Tiers``: every persistence tier of a runtime behind one door (zero tiers is memory-only).

Everything tier-wide lives here, once: the one ``mark`` per transition, flushing,
durable versions and the waits on them, the write-through gate's check, the
lookup of a run's copies across tiers, time travel, purge, dead letters,
repopulating a tier that lost its data, and the figures. The runtime asks this
object; it never loops over persisters or reaches a store itself.
"""

from __future__ import annotations

import logging
import warnings
from typing import TYPE_CHECKING, Any, TypeVar, final

from hotstate._clock import within
from hotstate._errors import (
    CodecError,
    ConfigError,
    CorruptSnapshotError,
    HotstateError,
    PersistenceError,
    StoreUnavailableError,
)
from hotstate.persistence._encoder import SnapshotEncoder
from hotstate.persistence._persister import Persister, PersisterStatistics
from hotstate.persistence._policy import Tier
from hotstate.persistence._records import decode_snapshot, verifies

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence

    import anyio

    from hotstate._clock import Clock
    from hotstate._instrument import Instruments
    from hotstate.actors import DeadLetter, Snapshot, Transition
    from hotstate.persistence._codec import Codec
    from hotstate.persistence._listener import TierListener
    from hotstate.persistence._records import BadRow, RunHeader, StoredSnapshot
    from hotstate.persistence._shards import Fence
    from hotstate.persistence._store import Store

__all__ = ["Tiers"]

log = logging.getLogger("hotstate.persistence")

_PAGE = 10_000  # headers per scan page when comparing tiers
_REPAIR_BATCH = 500  # copies per save when repairing a tier that is behind
_T = TypeVar("_T")


def _no_fence() -> Fence | None:
    return None


@final
class Tiers:
    """All tiers of a runtime, fastest first, seen as one object.

    Args:
        tiers: the tiers, fastest first (on a version tie the earlier tier's copy wins).
        codec: the payload codec shared by all tiers.
        clock: time for intervals, backoff and lookup deadlines.
        listener: what each tier reports to (the runtime's scheduler).
        instruments: observers of each store write.

    Raises:
        ConfigError: an entry is not a ``Tier``, or two tiers share a name.
    """

    def __init__(
        self,
        tiers: Sequence[Tier],
        codec: Codec,
        clock: Clock,
        listener: TierListener,
        instruments: Instruments | None = None,
    ) -> None:
        for tier in tiers:
            if not isinstance(tier, Tier):
                raise ConfigError("Runtime.tiers", tier, "must be Tier(store, policy) objects")
        names = [t.store.tier for t in tiers]
        if len(set(names)) != len(names):
            raise ConfigError("tiers", names, "tier names must be unique (pass tier=... to the stores)")
        self.codec = codec
        self._clock = clock
        self.encoder = SnapshotEncoder(codec)
        self._persisters = [Persister(t, self.encoder, clock, listener, instruments) for t in tiers]
        self._by_name = {p.name: p for p in self._persisters}
        self._through = [p for p in self._persisters if p.policy.write_through]
        self.mark = self._fan_out_mark()
        self._state = "new"
        self._fence: Callable[[], Fence | None] = _no_fence

    def own(
        self, fence: Callable[[], Fence | None], shard_of: Callable[[str], int], epoch_of: Callable[[str], int]
    ) -> None:
        """Write under ownership from now on: every save carries ``fence()``, every copy its shard's epoch."""
        self._fence = fence
        self.encoder.epoch_of = epoch_of
        for p in self._persisters:
            p.fence = fence
            p.shard_of = shard_of

    async def seal(self, fence: Fence) -> dict[str, dict[int, int] | str]:
        """Seal ``fence``'s shards in every tier; per tier, the shards it could not seal, or the error.

        A tier that fails is reported, not raised: the shards are still safe
        there (its fence is raised by the new owner's first write to it, and
        copies are ordered by ``(epoch, version)``).
        """
        out: dict[str, dict[int, int] | str] = {}
        for p in self._persisters:
            try:
                lost = await p.store.seal(fence)
            except PersistenceError as exc:
                log.warning("hotstate: cannot seal shards %s in tier %r yet: %s", sorted(fence.epochs), p.name, exc)
                out[p.name] = str(exc)
                continue
            if lost:
                out[p.name] = dict(lost)
        return out

    def drop(self, doomed: Callable[[str], bool], exc: Callable[[str], HotstateError]) -> None:
        """Drop everything pending of the runs ``doomed`` selects, in every tier (their shard left this process)."""
        for p in self._persisters:
            p.drop(doomed, exc)

    def _fan_out_mark(self) -> Callable[[Snapshot, Transition], None] | None:
        """The one O(1) call per transition: None when memory-only, the only tier's own ``mark`` when one."""
        persisters = self._persisters
        if not persisters:
            return None
        if len(persisters) == 1:
            return persisters[0].mark
        marks = [p.mark for p in persisters]

        def mark(snapshot: Snapshot, transition: Transition) -> None:
            for m in marks:
                m(snapshot, transition)

        return mark

    def __len__(self) -> int:
        return len(self._persisters)

    @property
    def names(self) -> tuple[str, ...]:
        """The tiers' names, in order."""
        return tuple(self._by_name)

    @property
    def stores(self) -> tuple[Store, ...]:
        """The tiers' stores, in order (recovery reads them)."""
        return tuple(p.store for p in self._persisters)

    @property
    def cache_names(self) -> tuple[str, ...]:
        """The names of the cache tiers (``FlushPolicy(cache=True)``), in order."""
        return tuple(p.name for p in self._persisters if p.policy.cache)

    @property
    def write_through_names(self) -> tuple[str, ...]:
        """The names of the write-through tiers, in order."""
        return tuple(p.name for p in self._through)

    @property
    def write_through(self) -> bool:
        """True when some tier's policy is write-through (runs may be parked after each step)."""
        return bool(self._through)

    # ------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        """Open every store."""
        self._state = "open"
        for p in self._persisters:
            await p.store.open()

    async def run_loops(self, task_group: anyio.abc.TaskGroup) -> None:
        """Start every tier's flush loop in ``task_group``; returns once they run."""
        for p in self._persisters:
            await task_group.start(p.run)

    def stop_loops(self) -> None:
        """Ask every flush loop to exit after its flush in progress (before the final flush)."""
        for p in self._persisters:
            p.stop()

    async def flush(self) -> None:
        """Flush every tier now; returns once what was pending is durable.

        Raises:
            PersistenceError: a tier failed (the others were still flushed; its
                batch was put back and is retried).
        """
        errors: list[PersistenceError] = []
        for p in self._persisters:
            try:
                await p.flush()
            except PersistenceError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    async def aclose(self) -> None:
        """Close every store (after the final flush); a store that fails to close is logged."""
        self._state = "closed"
        for p in self._persisters:
            try:
                await p.store.aclose()
            except Exception:
                log.exception("hotstate: closing tier %r failed", p.name)

    def __del__(self, _warn: Any = warnings.warn) -> None:
        if getattr(self, "_state", "closed") == "open":
            _warn(f"unclosed {self!r}", ResourceWarning, stacklevel=1)

    # ------------------------------------------------------------ durability

    def durable_versions(self, run_id: str) -> dict[str, int]:
        """The newest version of ``run_id`` each tier has acknowledged (0: none); no I/O."""
        return {p.name: p.durable.get(run_id, 0) for p in self._persisters}

    def park_until_durable(self, run_id: str, version: int, item: Any) -> bool:
        """The write-through gate: if a write-through tier lacks ``version``, hand ``item`` to the listener once it has it.

        Returns:
            True when ``item`` was parked, False when every write-through tier has ``version``.
        """
        for p in self._through:
            # A tier that refused the run, with nothing of it pending, will never
            # take this version: parking there would hold the run forever (#11).
            if p.durable.get(run_id, 0) < version and not p.refused(run_id):
                p.notify_when_durable(run_id, item)
                return True
        return False

    def notify_everywhere(self, run_id: str, item: Any) -> bool:
        """Hand ``item`` to the listener as each tier acknowledges ``run_id``'s next flush; flush soon.

        Returns:
            False when there is no tier (nothing will ever be acknowledged).
        """
        for p in self._persisters:
            p.notify_when_durable(run_id, item)
        return bool(self._persisters)

    async def wait_durable(
        self,
        run_id: str,
        version: int,
        *,
        tier: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - on the injectable clock, per tier
    ) -> None:
        """Wait until ``version`` of ``run_id`` is durable in every tier (or in ``tier``).

        Raises:
            ConfigError: no tier has that name, or there is no tier at all.
            DurabilityTimeoutError: not durable in time; the tier is down or slow.
        """
        if not self._persisters:
            raise ConfigError("wait_durable", run_id, "the runtime is memory-only (no tiers)")
        persisters = self._persisters if tier is None else [self._named("wait_durable.tier", tier)]
        for p in persisters:
            await p.wait_durable(run_id, version, timeout)

    def _named(self, field_name: str, tier: str) -> Persister:
        p = self._by_name.get(tier)
        if p is None:
            raise ConfigError(field_name, tier, "no tier has this name")
        return p

    # ------------------------------------------------------------ lookups

    async def copies(self, run_id: str) -> list[tuple[str, StoredSnapshot]]:
        """Every tier's copy of ``run_id``, in tier order; every tier that is not a cache must answer.

        ``peek``, plus: a copy read back is durable in its tier, so that version
        counts as acknowledged there (the run is about to be held in memory).
        A tier that fails, or does not answer within its policy's
        ``ack_timeout`` (on the runtime's clock), may hold the newest copy:
        rather than guess from the others (a finished run started again from
        an older copy), the lookup raises; a cache tier is left out instead.

        Raises:
            StoreUnavailableError: a tier that is not a cache could not say whether it holds the run.
        """
        found = await self.peek(run_id)
        for tier, stored in found:
            self._note_verified(self._by_name[tier], stored)
        return found

    def _note_verified(self, p: Persister, stored: StoredSnapshot) -> None:
        """A copy read from ``p``'s tier counts as durable there only if its whole envelope verifies.

        A forged header claiming a higher version must not make ``wait_durable``
        (an acknowledgement) return for a version the tier never took.
        """
        if verifies(stored, self.codec, tier=p.name):
            p.note_stored(stored.header.run_id, stored.header.version)

    async def newest_versions(self, run_ids: Sequence[str]) -> dict[str, int]:
        """The highest verified version any readable tier holds for each of ``run_ids`` (absent: none).

        A copy that does not verify counts for nothing: its version may be forged.
        """
        newest: dict[str, int] = {}
        if not run_ids:
            return newest
        for p in self._persisters:
            try:
                found = await p.store.load_many(run_ids)
            except PersistenceError as exc:
                log.error("hotstate recovery: cannot read runs of tier %r: %s", p.name, exc)
                continue
            for rid, stored in found.items():
                if not verifies(stored, self.codec, tier=p.name):
                    continue
                version = stored.header.version
                p.note_stored(rid, version)
                newest[rid] = max(newest.get(rid, 0), version)
        return newest

    async def load_version(self, run_id: str, version: int, *, tier: str | None = None) -> Snapshot | None:
        """The kept copy of ``run_id`` at ``version`` (or the newest before it), from the first tier that has one.

        Raises:
            ConfigError: no tier has the name ``tier``.
            CorruptSnapshotError: the kept copy does not verify (never unpickled).
        """
        persisters = self._persisters if tier is None else [self._named("snapshot_at.tier", tier)]
        for p in persisters:
            stored = await p.store.load_version(run_id, version)
            if stored is not None:
                snap = decode_snapshot(stored, self.codec, tier=p.name)
                if snap.run_id != run_id or snap.version > version:
                    # A genuine copy, but not one of this run at or before ``version``: the
                    # store's own keys or fields were changed (they are not under the check).
                    raise CorruptSnapshotError(
                        p.name, run_id, snap.version, f"kept copy is of run {snap.run_id!r} v{snap.version}"
                    )
                return snap
        return None

    async def peek(self, run_id: str) -> list[tuple[str, StoredSnapshot]]:
        """Every tier's copy of ``run_id``, as ``copies`` reads them, for a read that holds nothing in memory.

        The rule of ``copies`` (every tier must answer within its policy's
        ``ack_timeout``; a cache tier that cannot is left out, as
        ``FlushPolicy.cache`` says), but nothing is recorded: per-run
        bookkeeping of a run not held in memory would only grow with every
        distinct run read (``Runtime.load``).

        Raises:
            StoreUnavailableError: a tier that is not a cache could not say whether it holds the run.
        """
        found: list[tuple[str, StoredSnapshot]] = []
        for p in self._persisters:
            try:
                stored = await self._bounded(p, f"tell whether run {run_id!r} is stored there", p.store.load, run_id)
            except StoreUnavailableError as exc:
                if not p.policy.cache:
                    raise
                log.warning("hotstate: cache tier %r left out of a read: %s", p.name, exc)
                continue
            if stored is not None:
                found.append((p.name, stored))
        return found

    async def newest_headers(
        self, *, status: str | None, workflow: str | None, after: str | None, limit: int
    ) -> tuple[dict[str, tuple[str, RunHeader]], str | None]:
        """One page of the stored runs: the newest header of each, across every tier; bodies are not decoded.

        Each tier pages up to ``limit`` headers after ``after`` (``Store.scan``).
        The page is complete up to ``through``: the smallest last id of the
        tiers whose page was full (None when none was: nothing more is stored).
        For each run in it the newest version any tier holds wins (the earlier
        tier on a tie). With a status filter, a run that some tier did not list
        is read there too (``load_many``: bodies come, undecoded): that tier may
        hold a newer copy in another status, which must win over an older copy
        that matches. When the tiers agree, no run needs that read. A cache
        tier (``FlushPolicy.cache``) that cannot be read is left out.

        Args:
            status: only runs whose newest copy is in this status.
            workflow: only runs of this workflow.
            after: the cursor: only run ids strictly greater.
            limit: the page size per tier.

        Returns:
            ``{run_id: (tier, header)}`` for the matching runs up to ``through``, and ``through``.

        Raises:
            StoreUnavailableError: a tier that is not a cache failed, or did not
                answer within its ``ack_timeout``: a page without it could be
                wrong, so none is given.
        """
        pages: list[tuple[Persister, dict[str, RunHeader]]] = []
        through: str | None = None
        for p in self._persisters:
            try:
                page = await self._bounded(p, "list its runs", self._scan_page, p, status, workflow, after, limit)
            except StoreUnavailableError as exc:
                if not p.policy.cache:
                    raise
                log.warning("hotstate: cache tier %r left out of a listing: %s", p.name, exc)
                continue
            pages.append((p, {h.run_id: h for h in page}))
            if len(page) >= limit and (through is None or page[-1].run_id < through):
                through = page[-1].run_id
        newest: dict[str, tuple[str, RunHeader]] = {}
        for p, headers in pages:
            for rid, h in headers.items():
                held = newest.get(rid)
                if (through is None or rid <= through) and (held is None or h.version > held[1].version):
                    newest[rid] = (p.name, h)
        if status is None:
            return newest, through
        for p, headers in pages:
            missing = [rid for rid in newest if rid not in headers]
            if not missing:
                continue
            try:
                found = await self._bounded(p, "read runs", self._read_many, p, missing)
            except StoreUnavailableError as exc:
                if not p.policy.cache:
                    raise
                log.warning("hotstate: cache tier %r left out of a listing: %s", p.name, exc)
                continue
            for rid, stored in found.items():
                if stored.header.version > newest[rid][1].version:
                    newest[rid] = (p.name, stored.header)
        return {rid: c for rid, c in newest.items() if c[1].status == status}, through

    @staticmethod
    async def _scan_page(
        p: Persister, status: str | None, workflow: str | None, after: str | None, limit: int
    ) -> list[RunHeader]:
        try:
            return await p.store.scan(status=status, workflow=workflow, after=after, limit=limit)
        except CodecError:
            # A malformed header: read whole rows instead, which skips and reports it.
            bad: list[BadRow] = []
            page = await p.store.scan_snapshots(
                status=status, workflow=workflow, after=after, limit=limit, bad_rows=bad
            )
            for row in bad:
                log.warning("hotstate: malformed row of run %r in %r not listed: %s", row.run_id, p.name, row.reason)
            return [stored.header for stored in page]

    @staticmethod
    async def _read_many(p: Persister, run_ids: list[str]) -> dict[str, StoredSnapshot]:
        bad: list[BadRow] = []
        found = await p.store.load_many(run_ids, bad_rows=bad)
        for row in bad:
            log.warning("hotstate: malformed row of run %r in %r not listed: %s", row.run_id, p.name, row.reason)
        return found

    async def _bounded(self, p: Persister, what: str, read: Callable[..., Awaitable[_T]], *args: Any) -> _T:
        """``await read(*args)`` within ``p``'s ``ack_timeout`` on the runtime's clock.

        Raises:
            StoreUnavailableError: it failed, or did not answer in time.
        """
        seconds = p.policy.ack_timeout
        try:
            answered, value = await within(self._clock, seconds, read(*args))
        except PersistenceError as exc:
            raise StoreUnavailableError(p.name, f"cannot {what}: {exc.detail}") from exc
        if not answered:
            raise StoreUnavailableError(p.name, f"did not answer within {seconds:g} s: cannot {what}")
        return value  # type: ignore[return-value]  # answered: the value read, None included

    def durable_everywhere(self, run_id: str, version: int) -> bool:
        """True when every tier has acknowledged ``version`` of ``run_id`` (or a newer one); no I/O."""
        return all(p.durable.get(run_id, 0) >= version for p in self._persisters)

    def forget(self, run_ids: Iterable[str]) -> None:
        """Drop the per-run bookkeeping (durable versions, cached encoding) of runs that left memory but stay stored."""
        persisters = self._persisters
        for rid in run_ids:
            for p in persisters:
                p.forget(rid)

    # ------------------------------------------------------------ lineage repair

    async def versions(
        self, bad_rows: dict[str, list[BadRow]], shards: Collection[int] | None = None
    ) -> tuple[dict[str, dict[str, int]], dict[str, str]]:
        """Every tier's stored version of every run, finished or not, from one paged header scan each.

        Args:
            bad_rows: filled with each tier's malformed rows (left out of its versions).
            shards: only runs of these shards (None: every run).

        Returns:
            ``{tier: {run_id: version}}`` for the tiers that could be read, and
            ``{tier: error}`` for those that could not.
        """
        held: dict[str, dict[str, int]] = {}
        errors: dict[str, str] = {}
        for p in self._persisters:
            versions: dict[str, int] = {}
            after: str | None = None
            try:
                try:
                    while True:
                        page = await (
                            p.store.scan(after=after, limit=_PAGE)
                            if shards is None
                            else p.store.scan(after=after, limit=_PAGE, shards=shards)
                        )
                        for header in page:
                            versions[header.run_id] = header.version
                        if len(page) < _PAGE:
                            break
                        after = page[-1].run_id
                except CodecError:
                    # A malformed header: read whole rows instead, which skips and
                    # reports it (rare, and slower: bodies come too).
                    versions = await self._versions_past_bad_rows(p, bad_rows.setdefault(p.name, []), shards)
            except PersistenceError as exc:
                errors[p.name] = str(exc)
                log.error("hotstate: cannot scan tier %r to compare copies: %s", p.name, exc)
                continue
            held[p.name] = versions
        return held, errors

    @staticmethod
    async def _versions_past_bad_rows(
        p: Persister, bad: list[BadRow], shards: Collection[int] | None
    ) -> dict[str, int]:
        versions: dict[str, int] = {}
        after: str | None = None
        while True:
            page = await (
                p.store.scan_snapshots(after=after, limit=_PAGE, bad_rows=bad)
                if shards is None
                else p.store.scan_snapshots(after=after, limit=_PAGE, bad_rows=bad, shards=shards)
            )
            for stored in page:
                versions[stored.header.run_id] = stored.header.version
            if len(page) < _PAGE:
                break
            after = page[-1].header.run_id
        return versions

    async def load_from(self, tier: str, run_ids: Sequence[str], bad_rows: list[BadRow]) -> dict[str, StoredSnapshot]:
        """``tier``'s copies of ``run_ids`` (malformed rows reported in ``bad_rows``); each read copy is durable there."""
        p = self._by_name[tier]
        found = await p.store.load_many(run_ids, bad_rows=bad_rows)
        for stored in found.values():
            self._note_verified(p, stored)
        return found

    async def history_from(self, tier: str, run_id: str) -> list[Transition]:
        """``tier``'s stored transitions of ``run_id``, oldest first."""
        return await self._by_name[tier].store.history(run_id)

    async def repair(self, tier: str, copies: Sequence[tuple[StoredSnapshot, Sequence[Transition]]]) -> int:
        """Write verified copies, with their history, into ``tier``, which is behind; in batches.

        The store's version guard keeps anything newer it holds, and a repeated
        transition is ignored, so a repair never regresses a tier.

        Returns:
            How many snapshots the tier took.
        """
        p = self._by_name[tier]
        written = 0
        for i in range(0, len(copies), _REPAIR_BATCH):
            batch = copies[i : i + _REPAIR_BATCH]
            fence = self._fence()
            snapshots = [s for s, _ in batch]
            history = [t for _, history in batch for t in history]
            if fence is None:
                result = await p.store.save(snapshots, history)
            else:
                result = await p.store.save(snapshots, history, fence=fence)
            if result.reset:  # this save found the loss: the runtime writes what it holds again
                p.store_was_reset()
            written += result.written
            for stored, _ in batch:
                rid = stored.header.run_id
                if (
                    rid not in result.conflicts and rid not in result.rejected and not result.fenced
                ):  # refused: not there
                    p.note_stored(rid, stored.header.version)
        return written

    # ------------------------------------------------------------ writes

    async def purge(self, run_ids: Iterable[str], before: float) -> dict[str, int]:
        """Forget ``run_ids`` (gone from memory) and delete finished runs older than ``before`` from every tier.

        Returns:
            How many runs each tier deleted.

        Raises:
            PersistenceError: a tier failed.
        """
        await self.flush()  # a purged run's last versions must not arrive after the delete
        gone = list(run_ids)
        out: dict[str, int] = {}
        for p in self._persisters:
            for rid in gone:
                p.forget(rid)
            out[p.name] = await p.store.purge_finished(before=before)
        return out

    def mark_dead_letter(self, letter: DeadLetter) -> None:
        """Queue a dead letter for every tier (encoded in each flush)."""
        for p in self._persisters:
            p.mark_dead_letter(letter)

    def mark_dead_letter_deleted(self, run_id: str) -> None:
        """Queue the deletion of a run's dead letter in every tier."""
        for p in self._persisters:
            p.mark_dead_letter_deleted(run_id)

    def repopulate(
        self,
        tier: str,
        runs: Iterable[tuple[Snapshot, Sequence[Transition]]],
        letters: Iterable[DeadLetter],
    ) -> None:
        """``tier`` lost its data: queue every run held in memory (with its history) and every dead letter."""
        p = self._by_name[tier]
        for snapshot, transitions in runs:
            p.repopulate(snapshot, transitions)
        for letter in letters:
            p.mark_dead_letter(letter)

    def statistics(self) -> list[PersisterStatistics]:
        """Each tier's persister figures, in order."""
        return [p.statistics() for p in self._persisters]
