"""Shard ownership for several processes on one set of stores (DESIGN.md "Several processes").

``Ownership`` is the user's configuration; ``ShardManager`` does the work:

- **start**: open the authority, check the shard count against every store,
  join (a fresh member id per process start), renew once, claim the shards
  this process should own (all of them when it is alone);
- **take** (``_take``): for shards just claimed, drop any stray pending rows,
  seal every tier at the new epoch, then let the runtime load their runs
  (seal, then read: design/ownership.md §4.1);
- **the loop**: renew every ``renew_every``; a shard the renewal no longer
  lists, or every shard once the lease deadline passes unrenewed, is lost
  (evicted); claim what placement says this process should own; hand off,
  a few per round, what it says another live member should own;
- **the inbox loop**: apply calls other processes forwarded to owned shards;
- **stop**: hand every shard off (drain, flush, release) and leave.

Placement is rendezvous hashing of (shard, member) over the live members;
a member counts only once it has renewed for ``2 * renew_every`` (a joining
process does not make every other one hand shards off at once). Placement
only decides who *tries*: the claim decides who owns, the fences in the
stores whose writes land.
"""

from __future__ import annotations

import logging
import math
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Protocol, final

import anyio

from hotstate._clock import Clock, SystemClock
from hotstate._errors import ConfigError, PersistenceError
from hotstate._validate import integer, number
from hotstate.persistence._authority import Authority, MemberInfo, member_live, new_member, process_gone
from hotstate.persistence._shards import Fence, check_shards, shard_of

if TYPE_CHECKING:
    from collections.abc import Collection, Mapping, Sequence

    from hotstate.actors import Snapshot
    from hotstate.persistence._authority import InboxEntry, Renewal, ShardLease
    from hotstate.persistence._store import Store

__all__ = ["Location", "Ownership", "ShardManager", "ShardMap"]

log = logging.getLogger("hotstate.ownership")

_INBOX_BATCH: Final = 500


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class Ownership:
    """How a runtime shares its stores with other processes: shards, leases, fences.

    A runtime with tiers owns shards by default (``Runtime(ownership=None)``):
    its first durable SQLite tier's file is the authority (several processes
    on one host), or a ``MemoryStore``'s own authority (several runtimes in
    one process). Alone, a process owns every shard; a crashed owner's lease
    on this host is broken at once when its process is provably gone.

    Attributes:
        authority: where leases and epochs live (default: see above). Use
            ``SQLiteAuthority(path)`` on one host.
        shards: the shard count (default: the recorded one, or 128 for new
            stores); every process and store must agree, or start refuses.
        ttl: seconds a lease lasts unrenewed. A crashed owner's shards on
            another host (or in another pid namespace) are taken over after
            about this long; a paused owner stops itself before it ends.
        renew_every: seconds between renewals (default ``ttl / 5``).
        claim_every: seconds between placement rounds (default ``min(1, ttl / 10)``).
        inbox_every: seconds between reads of the owned shards' inboxes.
        forward_timeout: seconds a forwarded call waits for the owner's verdict.
        handoff_timeout: seconds a hand-off waits for steps in flight.
        moves_per_round: shards handed off per placement round (default
            ``max(1, shards // 10)``).
        name: a label for this process in the shard map (e.g. a pod name).
        clock: the monotonic clock of lease deadlines (default: the system's);
            tests inject one. Not the runtime's clock: leases are real time.
    """

    authority: Authority | None = None
    shards: int | None = None
    ttl: float = 10.0
    renew_every: float | None = None
    claim_every: float | None = None
    inbox_every: float = 0.05
    forward_timeout: float = 30.0
    handoff_timeout: float = 5.0
    moves_per_round: int | None = None
    name: str = ""
    clock: Clock | None = None

    def __post_init__(self) -> None:
        if self.authority is not None and not isinstance(self.authority, Authority):
            raise ConfigError("Ownership.authority", self.authority, "must be an Authority")
        if self.shards is not None:
            check_shards("Ownership.shards", self.shards)
        ttl = number("Ownership.ttl", self.ttl, strict=True)
        if self.renew_every is not None and not 0 < number("Ownership.renew_every", self.renew_every) <= ttl / 2:
            raise ConfigError(
                "Ownership.renew_every", self.renew_every, f"must be above 0 and at most ttl / 2 ({ttl / 2:g})"
            )
        if self.claim_every is not None:
            number("Ownership.claim_every", self.claim_every, strict=True)
        number("Ownership.inbox_every", self.inbox_every, strict=True)
        number("Ownership.forward_timeout", self.forward_timeout)
        number("Ownership.handoff_timeout", self.handoff_timeout)
        if self.moves_per_round is not None:
            integer("Ownership.moves_per_round", self.moves_per_round, minimum=1)
        if not isinstance(self.name, str):
            raise ConfigError("Ownership.name", self.name, "must be a str")
        if self.clock is not None and not isinstance(self.clock, Clock):
            raise ConfigError("Ownership.clock", self.clock, "must be a Clock")


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class ShardMap:
    """Who owns what, as this process last saw it (``RuntimeStatistics.ownership``).

    Attributes:
        member: this process's member id.
        name: its label.
        shards: the shard count.
        owned: shard -> epoch, for the shards this process owns now.
        draining: shards being handed off.
        leases: the whole map at the last renewal: shard -> (owner, epoch, expires_at).
        members: live members at the last renewal: member id -> (name, host, pid).
        lease_valid_for: seconds until this process must stop itself unless it renews (negative: past).
        claims, losses, handoffs: shards claimed, lost (fenced, lapsed) and handed off so far.
        forwarded, applied: inbox entries this process posted, and applied as owner.
    """

    member: str
    name: str
    shards: int
    owned: Mapping[int, int]
    draining: frozenset[int]
    leases: Mapping[int, tuple[str | None, int, float]]
    members: Mapping[str, tuple[str, str, int]]
    lease_valid_for: float
    claims: int
    losses: int
    handoffs: int
    forwarded: int
    applied: int


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class Location:
    """Where a run is, across processes (``Runtime.locate``).

    Attributes:
        run_id: the run.
        shard: its shard (None: ownership is off).
        owner: the member id of the process owning the shard, as this process
            last saw the map (None: nobody holds it now, or ownership is off).
        epoch: the owner's epoch of the shard.
        expires_at: the authority time the owner's lease ends (None: unknown or held here).
        here: True when this process holds the run in memory (``snapshot`` is
            its live state); False: ``snapshot`` is the newest stored copy.
        snapshot: the run's state.
    """

    run_id: str
    shard: int | None
    owner: str | None
    epoch: int
    expires_at: float | None
    here: bool
    snapshot: Snapshot


class OwnerHost(Protocol):
    """What the ``ShardManager`` needs from the runtime."""

    async def load_shards(self, shards: Mapping[int, int], *, resume: bool) -> None:
        """Bring the stored runs of ``shards`` (just claimed and sealed) into memory."""
        ...

    def evict_shards(self, shards: Mapping[int, int], why: str) -> None:
        """Drop the runs of ``shards`` from memory and every tier's pending rows."""
        ...

    async def drain_shards(self, shards: Collection[int], timeout: float) -> None:  # noqa: ASYNC109 - a bounded wait
        """Stop ``shards``' runs, let steps in flight finish, flush every tier."""
        ...

    async def apply(self, entry: InboxEntry) -> str | None:
        """Apply a forwarded call to a run of an owned shard, wait until its effect is durable; the verdict JSON.

        None: not applied for good here (the shard was lost, a tier did not
        answer): the entry is read again, by this process or the next owner.
        """
        ...

    async def seal(self, fence: Fence) -> dict[str, dict[int, int] | str]:
        """Seal ``fence``'s shards in every tier; per tier, the shards it could not seal (or its error)."""
        ...

    def lingering(self) -> frozenset[int]:
        """Shards with an evicted run whose step or compensation still runs (not to be claimed yet)."""
        ...

    def end_drain(self) -> None:
        """A hand-off is over: runs it stopped that are still here go on."""
        ...

    def pause_shards(self, shards: Collection[int]) -> None:
        """Stop ``shards``' runs at their next step (their leases lapsed; the manager claims them back)."""
        ...

    def end_pause(self) -> None:
        """The claim back is over: paused runs still here go on (the lost shards' were evicted)."""
        ...


def _weight(shard: int, member: str) -> int:
    return zlib.crc32(f"{shard}/{member}".encode())


@final
class ShardManager:
    """Owns shards for one runtime: claims, renewals, hand-offs, fences and the inbox (see the module doc)."""

    def __init__(self, config: Ownership, authority: Authority, host: OwnerHost) -> None:
        self.config = config
        self.authority = authority
        self._host = host
        self.member: MemberInfo = new_member(config.name)
        self.id = self.member.member_id
        self.shards = config.shards if config.shards is not None else authority.shards
        self.owned: dict[int, int] = {}
        self.draining: set[int] = set()
        self.leases: tuple[ShardLease, ...] = ()
        self.live: tuple[MemberInfo, ...] = ()
        self._clock = self.clock = config.clock if config.clock is not None else SystemClock()
        self._ttl = config.ttl
        self._renew_every = config.renew_every if config.renew_every is not None else config.ttl / 5
        self._claim_every = config.claim_every if config.claim_every is not None else min(1.0, config.ttl / 10)
        self._margin = max(config.ttl / 10, 0.2) if config.ttl > 0.4 else config.ttl / 4
        self.valid_until = -math.inf
        self._next_renew = 0.0
        self._owned_since: dict[int, float] = {}
        self._taking: set[int] = set()  # claimed, being sealed: not owned yet
        self._held_before: set[int] = set()  # shards this process has owned at some point
        self._floors: dict[
            int, int
        ] = {}  # shard -> the epoch a store's fence refused a seal at (next claim jumps past it)
        self._loading: set[int] = set()  # owned, their runs being loaded
        self._first_seen: dict[str, float] = {}
        self._spawn_shards: list[int] = []
        self._fence: Fence | None = None
        self._spawn_next = 0
        self._stopping = False  # renewals end
        self._closing = False  # placement and the inbox end (shutdown began)
        self._lock = anyio.Lock()  # one claim / hand-off / renewal at a time
        self._applying: set[tuple[int, int]] = set()  # inbox entries applied here, not settled yet
        self._busy: set[int] = set()  # shards whose entries a task is applying
        self._verdicts: list[tuple[int, int, str, int]] = []  # (shard, seq, verdict, epoch) to settle
        self.claims = self.losses = self.handoffs = self.forwarded = self.applied = 0

    def __repr__(self) -> str:
        return f"<ShardManager {self.id[:8]} owns {len(self.owned)}/{self.shards}>"

    # -------------------------------------------------------------- the hot side

    def shard_of(self, run_id: str) -> int:
        """The shard of ``run_id``."""
        return shard_of(run_id, self.shards)

    def fence(self) -> Fence:
        """The fence a save carries now: this member, and the epoch of each shard it owns (a copy).

        Built once per change of ``owned`` (``_owned_changed``), not per flush.
        """
        fence = self._fence
        if fence is None:
            fence = self._fence = Fence(self.id, dict(self.owned))
        return fence

    def epoch_of(self, run_id: str) -> int:
        """The epoch ``run_id``'s copies are written under (0: its shard is not owned here)."""
        return self.owned.get(shard_of(run_id, self.shards), 0)

    def holds(self, run_id: str) -> bool:
        """Does this process own ``run_id``'s shard now, with its runs loaded, and is not handing it off?

        False while the shard's runs load: a call for one of them goes through
        the inbox and is applied once they are in memory.
        """
        s = shard_of(run_id, self.shards)
        return s in self.owned and s not in self.draining and s not in self._loading

    def spawn_shard(self) -> int | None:
        """An owned shard for a generated run id (round-robin), or None when this process owns none."""
        shards = self._spawn_shards
        if not shards:
            return None
        i = self._spawn_next
        if i >= len(shards):
            i = 0
        self._spawn_next = i + 1
        return shards[i]

    def _owned_changed(self) -> None:
        self._fence = None
        self._spawn_shards = sorted(s for s in self.owned if s not in self.draining)

    def owner_of(self, run_id: str) -> tuple[int, str | None, int, float]:
        """``(shard, owner, epoch, expires_at)`` of ``run_id``'s shard, from the last renewal's map."""
        s = shard_of(run_id, self.shards)
        if s in self.owned:
            return s, self.id, self.owned[s], math.nan
        for lease in self.leases:
            if lease.shard == s:
                return s, lease.owner, lease.epoch, lease.expires_at
        return s, None, 0, math.nan

    # ----------------------------------------------------------------- start

    async def start(self, stores: Sequence[Store]) -> dict[int, int]:
        """Open the authority, check the shard count, join and claim; returns the shards claimed (not yet taken)."""
        await self.authority.open()
        recorded = self.authority.shards
        if self.config.shards is not None and self.config.shards != recorded:
            raise ConfigError(
                "Ownership.shards",
                self.config.shards,
                f"the authority {self.authority.name} records {recorded} shards",
            )
        self.shards = recorded
        for store in stores:
            held = getattr(store, "shards", recorded)
            if held != recorded:
                raise ConfigError(
                    "Ownership.shards",
                    recorded,
                    f"tier {store.tier!r} holds its runs in {held} shards and the authority in {recorded}:"
                    " open them with the same count",
                )
        member_live(self.id, True)
        await self.authority.join(self.member)
        await self._renew()
        now = self._clock.now()
        for m in self.live:  # members already there when this one starts count at once
            self._first_seen.setdefault(m.member_id, now - 2 * self._renew_every)
        return await self._claim(self._wanted())

    # ------------------------------------------------------------ placement

    def _counted(self, now: float) -> list[str]:
        """Members placement counts: this one, and live ones seen for two renewals."""
        seen = self._first_seen
        out = [self.id]
        for m in self.live:
            if m.member_id == self.id or process_gone(m):  # a crashed process on this host: never placed on
                continue
            first = seen.setdefault(m.member_id, now)
            if now - first >= 2 * self._renew_every:
                out.append(m.member_id)
        return out

    def _desired(self, members: Sequence[str]) -> list[int]:
        """The shards rendezvous hashing gives this member among ``members``."""
        me = self.id
        return [s for s in range(self.shards) if max(members, key=lambda m: (_weight(s, m), m)) == me]

    def _wanted(self) -> list[int]:
        """Desired shards this process does not own yet, and may claim now."""
        lingering = self._host.lingering()
        return [
            s for s in self._desired(self._counted(self._clock.now())) if s not in self.owned and s not in lingering
        ]

    # ------------------------------------------------------------ authority calls

    async def _renew(self) -> Renewal:
        t0 = self._clock.now()
        renewal = await self.authority.renew(self.id, self._ttl)
        self.valid_until = t0 + self._ttl - self._margin
        self._next_renew = t0 + self._renew_every
        self.leases = renewal.leases
        self.live = renewal.members
        return renewal

    async def _claim(self, shards: Sequence[int]) -> dict[int, int]:
        if not shards:
            return {}
        floors = {s: self._floors[s] for s in shards if s in self._floors}
        if floors:  # only then: an authority of your own without `floors` keeps working
            claimed = await self.authority.claim(self.id, shards, self._ttl, floors=floors)
        else:
            claimed = await self.authority.claim(self.id, shards, self._ttl)
        for s in claimed:
            self._floors.pop(s, None)
        if claimed:
            self.claims += len(claimed)
            log.info("hotstate: member %s claimed shards %s", self.id[:8], _ranges(claimed))
        return claimed

    async def take(self, claimed: Mapping[int, int], *, resume: bool) -> None:
        """Seal ``claimed`` in every tier, then own them and load their runs (seal, then read)."""
        if not claimed:
            return
        self._taking.update(claimed)
        try:
            again = {s: e for s, e in claimed.items() if s in self._held_before}
            if again:  # stray rows of an earlier holding of these shards (no scan for a first holding)
                self._host.evict_shards(again, "claimed again")
            lost = await self._seal(claimed)
            if lost:
                await self.authority.release(self.id, lost)
            kept = {s: e for s, e in claimed.items() if s not in lost}
            self.owned.update(kept)
            self._held_before.update(kept)
            now = self._clock.now()
            for s in kept:
                self._owned_since[s] = now
            self._owned_changed()
        finally:
            self._taking.difference_update(claimed)
        if not kept:
            return
        self._loading.update(kept)
        try:
            await self._host.load_shards(kept, resume=resume)
        finally:
            self._loading.difference_update(kept)
            # Lost while they loaded (a renewal, a fence): what the load brought in after the
            # eviction is evicted now, so no run stays in memory without its shard.
            gone = {s: e for s, e in kept.items() if self.owned.get(s) != e}
            if gone:
                self._host.evict_shards(gone, "lost while its runs were loading")

    async def _seal(self, claimed: Mapping[int, int]) -> set[int]:
        """Seal every tier; the shards a tier's fence says another (newer) owner holds."""
        results = await self._host.seal(Fence(self.id, dict(claimed)))
        lost: set[int] = set()
        for tier, result in results.items():
            if isinstance(result, dict):
                log.warning("hotstate: tier %r holds shards %s under a newer owner; not taken", tier, sorted(result))
                lost.update(result)
                for shard, epoch in result.items():
                    # The next claim of the shard jumps past this fence (Authority.claim's floors): when
                    # the authority went back in time, else one claim a missing epoch would be needed.
                    self._floors[shard] = max(self._floors.get(shard, 0), int(epoch))
        return lost

    # ---------------------------------------------------------------- the loops

    async def run_renewals(self) -> None:
        """Renew every ``renew_every``; stop owning everything at the deadline if no renewal landed."""
        while not self._stopping:
            now = self._clock.now()
            wake = min(self._next_renew, self.valid_until if self.owned else math.inf)
            if wake > now:
                await self._clock.sleep_until(wake)
                continue
            await self._renew_once()

    async def _renew_once(self) -> None:
        t0 = self._clock.now()
        renewal = None
        # Never wait past the deadline: a renewal stuck behind a lock must not keep a lapsed lease alive.
        with anyio.move_on_after(max(self.valid_until - t0, 0.05) if self.owned else self._ttl):
            try:
                renewal = await self._renew()
            except (PersistenceError, OSError) as exc:
                log.warning("hotstate: member %s cannot renew its leases: %s", self.id[:8], exc)
            except Exception:  # any authority's bug: a renewal that did not land, never a dead deadline
                log.exception("hotstate: member %s: renewing failed unexpectedly; not renewed", self.id[:8])
        if renewal is None:
            if self._clock.now() >= self.valid_until and self.owned:
                await self._reclaim_or_lose(
                    [s for s in self.owned if s not in self.draining],
                    "its lease lapsed: no renewal reached the authority in time",
                )
            self._next_renew = self._clock.now() + min(self._renew_every, 0.5)
            return
        since = self._owned_since
        gone = [s for s in self.owned if s not in renewal.held and s not in self.draining and since.get(s, t0) < t0]
        if gone:
            await self._reclaim_or_lose(gone, "its lease lapsed or another process claimed it")
        # Leases this process holds but does not own in memory (lost at a deadline while the
        # renewal was on its way, or a claim whose take failed): give them back, never keep
        # renewing them (nobody else could claim them).
        stray = [s for s in renewal.held if s not in self.owned and s not in self._taking]
        if stray:
            try:
                await self.authority.release(self.id, stray)
            except (PersistenceError, OSError) as exc:
                log.warning("hotstate: member %s cannot give back shards %s yet: %s", self.id[:8], _ranges(stray), exc)

    async def _reclaim_or_lose(self, shards: Sequence[int], why: str) -> None:
        """Take back lapsed leases nobody took meanwhile, keeping the runs in memory; lose the others.

        A claim bumps a shard's epoch by one: a re-claim that gets exactly the
        held epoch + 1 proves no other process held the shard in between, so
        memory is still the newest state and the runs go on under the new
        epoch (after a seal at it). Any other outcome (the authority does not
        answer, another process holds the lease, or held it and let it go)
        loses the shard: its runs are evicted and reloaded from the stores
        when it is claimed again. A renewal late by a moment (a lock held by a
        flush, a pause) so costs no run state.

        The shards' runs stop at their next step while the claim is on its
        way (``OwnerHost.pause_shards``; steps already running finish): past
        the deadline no step of them starts here, whoever holds them next.
        """
        old = {s: self.owned[s] for s in shards if s in self.owned}
        if not old:
            return
        got: dict[int, int] = {}
        t0 = self._clock.now()
        self._host.pause_shards(old)
        try:
            with anyio.move_on_after(max(self._renew_every, 0.05)):
                try:
                    got = await self.authority.claim(self.id, list(old), self._ttl)
                except (PersistenceError, OSError) as exc:
                    log.warning("hotstate: member %s cannot take its lapsed leases back: %s", self.id[:8], exc)
            kept = {s: e for s, e in got.items() if e == old[s] + 1 and self.owned.get(s) == old[s]}
            if kept:
                lost_in_seal = await self._seal(kept)
                kept = {s: e for s, e in kept.items() if s not in lost_in_seal}
            for s, epoch in kept.items():  # before the runs go on: their next flush carries the new epoch
                self.owned[s] = epoch
            self._owned_changed()
            if kept:
                self.valid_until = max(self.valid_until, t0 + self._ttl - self._margin)
                log.warning(
                    "hotstate: member %s took back shards %s after its lease lapsed (%s); nothing moved meanwhile",
                    self.id[:8],
                    _ranges(kept),
                    why,
                )
            lost = [s for s in old if s not in kept]
            if lost:
                self.lose(lost, why)  # evicted while paused: none of their steps starts again here
        finally:
            self._host.end_pause()
        stale = {s: e for s, e in got.items() if s not in kept}
        if stale:  # claimed, but another process held it in between: taken afresh (seal, then reload)
            await self.take(stale, resume=True)

    async def run(self) -> None:
        """Place, claim and hand off every ``claim_every`` until stopped (a background task of the runtime)."""
        while True:
            async with self._lock:
                if self._closing:
                    return
                try:
                    claimed = await self._claim(self._wanted())
                    await self.take(claimed, resume=True)
                    await self._rebalance()
                except (PersistenceError, OSError) as exc:
                    log.warning("hotstate: member %s: placement round failed, will retry: %s", self.id[:8], exc)
            await self._clock.sleep_until(self._clock.now() + self._claim_every)

    def closing(self) -> None:
        """Shutdown began: claim, hand off and apply nothing more (renewals go on until ``stop``)."""
        self._closing = True

    async def _rebalance(self) -> None:
        """Hand off, a few per round, owned shards placement gives to another live member."""
        if not self.owned or self._closing:
            return
        members = self._counted(self._clock.now())
        if len(members) < 2:
            return
        desired = set(self._desired(members))
        extra = sorted(s for s in self.owned if s not in desired and s not in self.draining)
        limit = self.config.moves_per_round or max(1, self.shards // 10)
        if extra:
            await self.handoff(extra[:limit], "placement gives it to another process")

    async def handoff(self, shards: Sequence[int], why: str) -> None:
        """Drain, flush and release ``shards``: the next owner resumes them with nothing run twice.

        If the flush fails, the shards stay here (their runs go on): letting
        them go unflushed would make the next owner run steps again.
        """
        shards = [s for s in shards if s in self.owned]
        if not shards:
            return
        self.draining.update(shards)
        self._owned_changed()
        try:
            await self._host.drain_shards(shards, self.config.handoff_timeout)
        except (PersistenceError, OSError) as exc:
            self.draining.difference_update(shards)
            self._owned_changed()
            log.warning("hotstate: hand-off of shards %s put off: %s", _ranges(shards), exc)
            return
        try:
            await self.authority.release(self.id, shards)
        except (PersistenceError, OSError) as exc:
            log.warning("hotstate: releasing shards %s failed (they expire after the ttl): %s", _ranges(shards), exc)
        self.handoffs += len(shards)
        held = {s: self.owned[s] for s in shards if s in self.owned}
        for s in shards:
            self.owned.pop(s, None)
            self._owned_since.pop(s, None)
            self.draining.discard(s)
        self._owned_changed()
        self._host.evict_shards(held, f"handed off: {why}")
        self._host.end_drain()
        log.info("hotstate: member %s handed off shards %s (%s)", self.id[:8], _ranges(shards), why)

    def lose(self, shards: Collection[int], why: str) -> None:
        """Shards this process no longer owns: evict their runs at once; nothing unflushed of them is kept."""
        lost = {s: self.owned[s] for s in shards if s in self.owned}
        if not lost:
            return
        self.losses += len(lost)
        for s in lost:
            self.owned.pop(s, None)
            self._owned_since.pop(s, None)
            self.draining.discard(s)
        self._owned_changed()
        log.warning("hotstate: member %s lost shards %s: %s", self.id[:8], _ranges(lost), why)
        self._host.evict_shards(lost, why)

    def fenced(self, tier: str, shards: Mapping[int, int], sent: Mapping[int, int]) -> None:
        """A tier's fence refused a save: lose the shards whose *current* holding it refused.

        A save made under an earlier holding of a shard this process holds
        again (a slow flush across a loss and a claim) is refused by the new
        holding's own fence: that is no loss.
        """
        mine = [s for s in shards if s in self.owned and sent.get(s) == self.owned[s]]
        if mine:
            self.lose(mine, f"tier {tier!r} is fenced by a newer owner")

    # ---------------------------------------------------------------- inbox

    async def run_inbox(self) -> None:
        """Apply forwarded calls to owned shards: in order within a shard, shards side by side.

        Each shard's entries are applied by one task, oldest first, each
        settled once its effect is durable; an entry stays in ``_applying``
        until its verdict is recorded (or it must be read again), so it is
        never applied twice by one holding. A slow entry (a cancel waiting for
        its run to end) holds up only the entries after it in its shard.
        """
        every = self.config.inbox_every
        keep = max(10 * self.config.forward_timeout, 300.0)  # settled entries stay readable this long
        next_prune = self._clock.now() + keep
        async with anyio.create_task_group() as tg:
            while not self._closing:
                await self._clock.sleep_until(self._clock.now() + every)
                try:
                    if self._clock.now() >= next_prune:
                        next_prune = self._clock.now() + keep
                        await self.authority.prune(keep)
                    await self._settle()
                    idle = [s for s in self.owned if s not in self.draining and s not in self._loading]
                    idle = [s for s in idle if s not in self._busy]
                    if not idle:
                        continue
                    by_shard: dict[int, list[InboxEntry]] = {}
                    for entry in await self.authority.pending(idle, _INBOX_BATCH):
                        if (entry.shard, entry.seq) not in self._applying:
                            by_shard.setdefault(entry.shard, []).append(entry)
                    for shard, entries in by_shard.items():
                        epoch = self.owned.get(shard)
                        if epoch is None:
                            continue
                        self._busy.add(shard)
                        self._applying.update((e.shard, e.seq) for e in entries)
                        tg.start_soon(self._apply_shard, shard, entries, epoch)
                except (PersistenceError, OSError) as exc:
                    if not self._closing:  # else: the authority closed under this read at shutdown
                        log.warning("hotstate: member %s cannot read its inbox yet: %s", self.id[:8], exc)
            tg.cancel_scope.cancel()

    async def _apply_shard(self, shard: int, entries: Sequence[InboxEntry], epoch: int) -> None:
        """Apply ``entries`` of one shard in order; stop at the first that must be read again."""
        try:
            for i, entry in enumerate(entries):
                verdict = None
                if self.owned.get(shard) == epoch and shard not in self.draining:
                    verdict = await self._host.apply(entry)
                if verdict is None or self.owned.get(shard) != epoch:
                    for later in entries[i:]:
                        self._applying.discard((later.shard, later.seq))  # read again, in order
                    return
                self._verdicts.append((entry.shard, entry.seq, verdict, epoch))
        finally:
            self._busy.discard(shard)

    async def _settle(self) -> None:
        """Record the verdicts ready, for the shards still held at the epoch they were applied under."""
        ready, self._verdicts = self._verdicts, []
        if not ready:
            return
        held = [(s, q, v) for s, q, v, e in ready if self.owned.get(s) == e]
        epochs = {s: e for s, _, _, e in ready}
        try:
            if held:
                self.applied += await self.authority.settle(self.id, epochs, held)
        finally:
            for s, q, _, _ in ready:
                self._applying.discard((s, q))

    # ---------------------------------------------------------------- stop

    async def stop(self) -> None:
        """Release every shard and leave (after the runtime's final flush), then close the authority."""
        self._closing = True
        self._stopping = True
        try:
            async with self._lock:
                owned = list(self.owned)
                if owned:
                    await self.authority.release(self.id, owned)
                    self.handoffs += len(owned)
                await self.authority.leave(self.id)
        except (PersistenceError, OSError) as exc:
            log.warning(
                "hotstate: member %s could not release its shards (they expire after the ttl): %s", self.id[:8], exc
            )
        finally:
            self.owned.clear()
            self._owned_changed()
            member_live(self.id, False)
            await self._close_authority()

    async def _close_authority(self) -> None:
        try:
            await self.authority.aclose()
        except Exception:
            log.exception("hotstate: closing the authority %s failed", self.authority.name)

    async def abandon(self) -> None:
        """The runtime failed to start: this member is gone (its leases can be broken at once)."""
        self._closing = self._stopping = True
        member_live(self.id, False)
        await self._close_authority()

    def statistics(self) -> ShardMap:
        """The shard map as this process sees it."""
        return ShardMap(
            member=self.id,
            name=self.config.name,
            shards=self.shards,
            owned=dict(self.owned),
            draining=frozenset(self.draining),
            leases={lease.shard: (lease.owner, lease.epoch, lease.expires_at) for lease in self.leases},
            members={m.member_id: (m.name, m.host, m.pid) for m in self.live},
            lease_valid_for=self.valid_until - self._clock.now(),
            claims=self.claims,
            losses=self.losses,
            handoffs=self.handoffs,
            forwarded=self.forwarded,
            applied=self.applied,
        )


def _ranges(shards: Collection[int]) -> str:
    """``[0-3, 7]``: shard numbers as ranges, for logs."""
    out: list[str] = []
    run: list[int] = []
    for s in sorted(shards):
        if run and s == run[-1] + 1:
            run.append(s)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [s]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return "[" + ", ".join(out) + "]"
