"""``Router``: what the runtime does for shard ownership (the ``OwnerHost`` of ``_ownership.py``).

- Taking shards in: seal every tier, drop stray pending rows, load the
  shards' runs (recovery restricted to them).
- Letting shards go: drain (stop their runs, let steps in flight finish,
  flush), or evict at once when lost (drop unflushed rows, fail waiters with
  ``OwnershipLostError``).
- Forwarding: ``spawn``/``send``/``cancel``/``retry_dead_letter`` for a shard
  owned elsewhere go into the shard's durable inbox (design/ownership.md §4.8),
  framed by the codec so the owner verifies them; the owner applies each
  entry through the runtime's own calls (signals carry a dedupe key, so an
  entry applied again after a crash changes nothing), and settles it only
  once what it applied is durable in every tier.
- Following: ``wait_finished`` on a run held elsewhere polls its stored copy.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import TYPE_CHECKING, Any, Final, final

import anyio
import msgspec

from hotstate import _errors
from hotstate._errors import (
    CorruptSnapshotError,
    DurabilityTimeoutError,
    HotstateError,
    OwnershipLostError,
    PersistenceError,
    RunError,
    StoreUnavailableError,
)
from hotstate.actors import Status, TransitionKind

if TYPE_CHECKING:
    from collections.abc import Collection, Mapping

    from hotstate.actors._actor import RunActor
    from hotstate.persistence._authority import InboxEntry
    from hotstate.persistence._codec import Codec
    from hotstate.persistence._shards import Fence
    from hotstate.persistence._tiers import Tiers
    from hotstate.runtime._adoption import Adoption
    from hotstate.runtime._ownership import ShardManager
    from hotstate.runtime._registry import RunRegistry
    from hotstate.runtime._runtime import Runtime
    from hotstate.runtime._scheduler import Scheduler

__all__ = ["Router", "inbox_context"]

log = logging.getLogger("hotstate.ownership")

_CONTEXT: Final = msgspec.msgpack.Encoder()
_DRAIN_POLL: Final = 0.005
_VERDICT_POLL: Final = (0.005, 0.25)  # first and longest wait between verdict reads
_FOLLOW_POLL: Final = (0.01, 0.5)
_ENDED: Final = (Status.done, Status.failed, Status.cancelled)


def inbox_context(kind: str, run_id: str, shard: int) -> bytes:
    """What an inbox entry's frame covers besides its body: a planted or moved entry does not verify."""
    return _CONTEXT.encode(("inbox/1", kind, run_id, shard))


def _verdict_error(exc: BaseException) -> str:
    """The verdict of a call the owner refused: its type, message and plain attributes (rebuilt by the sender)."""
    attrs: dict[str, Any] = {}
    for name, value in vars(exc).items():
        plain = {"tuple": list(value)} if isinstance(value, tuple) else value
        try:
            json.dumps(plain)
        except (TypeError, ValueError):
            continue
        attrs[name] = plain
    return json.dumps({"error": type(exc).__name__, "message": str(exc), "attrs": attrs})


def raise_verdict(run_id: str, verdict: str) -> dict[str, Any]:
    """The owner's answer: its result, or the error it raised, rebuilt as the same hotstate type."""
    try:
        answer = json.loads(verdict)
    except ValueError:
        answer = {"error": "HotstateError", "message": f"unreadable verdict {verdict!r}"}
    if not isinstance(answer, dict):
        answer = {"error": "HotstateError", "message": f"unreadable verdict {verdict!r}"}
    name = answer.get("error")
    if name is None:
        result = answer.get("ok")
        return result if isinstance(result, dict) else {}
    cls = getattr(_errors, str(name), None)
    if not (isinstance(cls, type) and issubclass(cls, HotstateError)):
        cls = RunError
    exc = cls.__new__(cls)
    Exception.__init__(exc, f"{answer.get('message', '')} (answered by the run's owner)")
    attrs = answer.get("attrs")
    if isinstance(attrs, dict):
        for key, value in attrs.items():
            if isinstance(value, dict) and set(value) == {"tuple"} and isinstance(value["tuple"], list):
                value = tuple(value["tuple"])
            if isinstance(key, str) and not key.startswith("_"):
                setattr(exc, key, value)
    if isinstance(exc, RunError):
        exc.run_id = run_id
    raise exc


@final
class Router:
    """The runtime's side of shard ownership (see the module doc); built by ``Runtime`` when ownership is on."""

    def __init__(
        self,
        runtime: Runtime,
        registry: RunRegistry,
        scheduler: Scheduler,
        tiers: Tiers,
        adoption: Adoption,
        codec: Codec,
    ) -> None:
        self._rt = runtime
        self._registry = registry
        self._scheduler = scheduler
        self._tiers = tiers
        self._adoption = adoption
        self._codec = codec
        self.owner: ShardManager | None = None  # set right after: they refer to each other
        self._lingering: dict[int, list[RunActor]] = {}
        self._releasing = False
        self.loads = 0

    def _manager(self) -> ShardManager:
        owner = self.owner
        if owner is None:  # pragma: no cover - set at construction
            raise RuntimeError("no shard manager")
        return owner

    # ----------------------------------------------------------- taking shards in

    async def seal(self, fence: Fence) -> dict[str, dict[int, int] | str]:
        """Seal ``fence``'s shards in every tier."""
        return await self._tiers.seal(fence)

    def lingering(self) -> frozenset[int]:
        """Shards with an evicted run whose step or compensation still runs."""
        held = self._lingering
        for shard in list(held):
            held[shard] = [a for a in held[shard] if a.running]
            if not held[shard]:
                del held[shard]
        return frozenset(held)

    async def load_shards(self, shards: Mapping[int, int], *, resume: bool) -> None:
        """Resume the unfinished runs of ``shards`` and hold their dead letters (recovery, for these shards)."""
        if not resume:
            return
        report = await self._adoption.recover(shards=set(shards))
        self.loads += 1
        rt = self._rt
        if rt.recovery_report is None:
            rt.recovery_report = report
        if report.held_back and not self._releasing:
            self._releasing = True

            async def release() -> None:
                try:
                    await self._adoption.release_held_back()
                finally:
                    self._releasing = False

            self._scheduler.start_background(release, "hotstate-release-held-back")

    # ----------------------------------------------------------- letting shards go

    def _actors_of(self, shards: Collection[int]) -> list[RunActor]:
        owner = self._manager()
        wanted = set(shards)
        return [a for a in self._registry if owner.shard_of(a.snapshot.run_id) in wanted]

    def evict_shards(self, shards: Mapping[int, int], why: str) -> None:
        """Drop ``shards``' runs (shard -> the epoch held) from memory and their pending rows; fail their waiters."""
        owner = self._manager()
        wanted = set(shards)
        actors = self._actors_of(wanted)
        for actor in actors:
            if actor.running:
                self._lingering.setdefault(owner.shard_of(actor.snapshot.run_id), []).append(actor)
        self._scheduler.evict(actors)
        shard_of = owner.shard_of

        def lost(run_id: str) -> OwnershipLostError:
            s = shard_of(run_id)
            return OwnershipLostError(run_id, s, shards.get(s, 0), why)

        self._tiers.drop(lambda rid: shard_of(rid) in wanted, lost)
        if actors:
            log.info("hotstate: %d run(s) of shards %s left this process: %s", len(actors), sorted(wanted)[:8], why)

    async def drain_shards(self, shards: Collection[int], timeout: float) -> None:  # noqa: ASYNC109 - a bounded wait
        """Stop ``shards``' runs, give steps in flight ``timeout`` seconds, then flush every tier.

        A run of a draining shard parks at its next step (``Scheduler.suspend``);
        one whose step is still running at the deadline is evicted as if lost
        (that step runs again at the next owner: the only way a hand-off
        repeats work). The flush then makes every drained run's newest
        version durable in every tier.

        Raises:
            PersistenceError: a tier could not be flushed: the shards stay here.
        """
        owner = self._manager()
        wanted = set(shards)
        self._scheduler.suspend(lambda a: owner.shard_of(a.snapshot.run_id) in wanted)
        try:
            with anyio.move_on_after(timeout):
                while True:  # steps end in user code: there is no event to wait on
                    if not any(a.running for a in self._actors_of(wanted)):
                        break
                    await anyio.sleep(_DRAIN_POLL)
            slow = [a for a in self._actors_of(wanted) if a.running]
            if slow:
                # Their last committed versions are flushed below with the rest of the shard; the
                # steps still running are interrupted when the shard is evicted, and run again at
                # the next owner (the one way a hand-off repeats work).
                log.warning(
                    "hotstate: %d step(s) still running after %.3g s of hand-off; they run again at the next owner",
                    len(slow),
                    timeout,
                )
            await self._tiers.flush()
        except BaseException:
            self._scheduler.resume_suspended()
            raise
        # Stay suspended: the caller releases, evicts, then calls end_drain.

    def end_drain(self) -> None:
        """A hand-off is over: runs it stopped that are still here go on."""
        self._scheduler.resume_suspended()

    def pause_shards(self, shards: Collection[int]) -> None:
        """Stop ``shards``' runs at their next step while their lapsed leases are claimed back."""
        owner = self._manager()
        wanted = set(shards)
        self._scheduler.suspend(lambda a: owner.shard_of(a.snapshot.run_id) in wanted, key="lapsed")

    def end_pause(self) -> None:
        """The claim back is over: paused runs still here go on."""
        self._scheduler.resume_suspended(key="lapsed")

    # ----------------------------------------------------------- the inbox

    async def forward(self, kind: str, run_id: str, fields: dict[str, Any]) -> dict[str, Any] | None:
        """Post a call for ``run_id`` to its shard's inbox; the owner's result, or None if it did not answer in time.

        Returns once the entry is durable in the authority (acknowledged);
        then waits up to ``forward_timeout`` for the owner's verdict and raises
        the error it raised, rebuilt as the same hotstate type.
        """
        owner = self._manager()
        shard = owner.shard_of(run_id)
        body = self._codec.encode(fields, context=inbox_context(kind, run_id, shard))
        seq = await owner.authority.post(shard, run_id, kind, body)
        owner.forwarded += 1
        clock = owner.clock
        deadline = clock.now() + owner.config.forward_timeout
        wait, longest = _VERDICT_POLL
        while True:
            # The entry is committed: the call is acknowledged, whatever happens to this read.
            # A read that fails (the authority restarting, a partition) is tried again until
            # the deadline, never raised: the owner applies the entry either way.
            try:
                verdict = await owner.authority.verdict(shard, seq)
            except (PersistenceError, OSError) as exc:
                log.info("hotstate: reading the verdict of inbox entry %d/%d failed, trying again: %s", shard, seq, exc)
                verdict = None
            if verdict is not None:
                return raise_verdict(run_id, verdict)
            left = deadline - clock.now()
            if left <= 0:
                log.info(
                    "hotstate: call %s for run %r is in shard %d's inbox (#%d); its owner has not answered yet",
                    kind,
                    run_id,
                    shard,
                    seq,
                )
                return None
            await clock.sleep_until(clock.now() + min(wait, left))
            wait = min(wait * 2, longest)

    async def apply(self, entry: InboxEntry) -> str | None:
        """Apply one forwarded call to a run of a shard this process owns; its verdict once its effect is durable.

        Returns None when the entry must be read again (this process lost the
        shard meanwhile, or a tier did not make the effect durable in time):
        applying it again is a no-op where it was applied (a signal's dedupe
        key, a spawn's run id, a cancel of a run that has ended).
        """
        try:
            fields = self._codec.decode(
                entry.body,
                context=inbox_context(entry.kind, entry.run_id, entry.shard),
                tier="inbox",
                run_id=entry.run_id,
            )
            if not isinstance(fields, dict):
                raise CorruptSnapshotError("inbox", entry.run_id, None, "an inbox entry's body is not a map")
            result = await self._apply(entry, fields)
            await self._durable(entry)
        except (OwnershipLostError, DurabilityTimeoutError, StoreUnavailableError) as exc:
            log.info("hotstate: inbox entry %d/%d not settled yet: %s", entry.shard, entry.seq, exc)
            return None
        except HotstateError as exc:
            return _verdict_error(exc)
        except Exception as exc:
            log.exception("hotstate: applying inbox entry %d/%d failed", entry.shard, entry.seq)
            return _verdict_error(exc)
        return json.dumps({"ok": result})

    async def _apply(self, entry: InboxEntry, fields: dict[str, Any]) -> dict[str, Any]:
        rt = self._rt
        run_id = entry.run_id
        kind = entry.kind
        if kind == "signal":
            await rt._send_here(run_id, fields["signal"], fields.get("data"), dedupe_key=fields["key"])
            return {}
        if kind == "cancel":
            actor = self._registry.get(run_id)
            if actor is not None and actor.snapshot.status in _ENDED:
                return {}  # applied before (a replay after a crash): the run has ended
            await rt._cancel_here(run_id)
            actor = self._registry.get(run_id)
            if actor is not None and actor.snapshot.status is not Status.compensating:
                await rt._settled(actor)  # the cancel takes effect at the run's next turn
            return {}
        if kind == "spawn":
            handle = await rt._spawn_here(fields["workflow"], fields.get("payload"), run_id)
            return {"created": handle.created}
        if kind == "retry":
            # A retry is not idempotent (the run may fail again and be dead-lettered again), so
            # its transition names the entry, and a replay finds it there: applied once.
            marker = f"inbox entry {entry.shard}/{entry.seq}"
            if not await self._retried(run_id, marker):
                await rt._retry_here(run_id, fields.get("from_step"), detail=marker)
            return {}
        raise CorruptSnapshotError("inbox", run_id, None, f"unknown inbox entry kind {kind!r}")

    async def _retried(self, run_id: str, marker: str) -> bool:
        """Whether a retry transition of ``run_id`` names ``marker``: in memory, else in a tier's history.

        The entry is settled only once its effect is durable in every tier,
        so a replay after a crash finds the transition in any tier.
        """
        actor = self._registry.get(run_id)
        if actor is not None and any(
            t.kind is TransitionKind.dead_letter_retried and t.detail == marker
            for t in actor.history.transitions(run_id)
        ):
            return True
        unread: PersistenceError | None = None
        for tier in self._tiers.names:
            try:
                stored = await self._tiers.history_from(tier, run_id)
            except PersistenceError as exc:
                unread = exc
                continue
            if any(t.kind is TransitionKind.dead_letter_retried and t.detail == marker for t in stored):
                return True
        if unread is not None:  # not proven new: the entry is read again later (``apply``'s None)
            raise StoreUnavailableError(unread.tier, f"cannot tell whether {marker} was applied: {unread}")
        return False

    async def _durable(self, entry: InboxEntry) -> None:
        """Return once the run's current version is durable in every tier (raises if its shard left meanwhile)."""
        owner = self._manager()
        if owner.shard_of(entry.run_id) not in owner.owned:
            raise OwnershipLostError(entry.run_id, entry.shard, 0, "the run left this process while applied")
        actor = self._registry.get(entry.run_id)
        if actor is None:
            return  # answered from the stores (a re-delivery to a run that left memory): nothing new to make durable
        if actor.evicted:
            raise OwnershipLostError(entry.run_id, entry.shard, 0, "the run left this process while applied")
        if len(self._tiers):
            await self._tiers.wait_durable(entry.run_id, actor.snapshot.version)

    @staticmethod
    def dedupe_key() -> str:
        """A fresh key for a forwarded signal sent without one (so a replayed entry is applied once)."""
        return f"hs-inbox:{uuid.uuid4().hex}"

    # ----------------------------------------------------------- following

    async def follow(self, run_id: str) -> Any:
        """Wait for a run held elsewhere to finish, reading its stored copy; its final payload.

        Raises:
            RunFailedError, RunCancelledError: as ``wait_finished``.
        """
        wait, longest = _FOLLOW_POLL
        rt = self._rt
        while True:
            held = self._registry.get(run_id)
            if held is not None:  # its shard came here meanwhile
                return await rt.wait_finished(run_id)
            try:
                snap = await rt.load(run_id)
            except PersistenceError as exc:
                log.debug("hotstate: following run %r: %s", run_id, exc)
                snap = None
            if snap is not None and snap.status in _ENDED:
                return rt._final(run_id, snap, None)
            clock = self._manager().clock
            await clock.sleep_until(clock.now() + wait)
            wait = min(wait * 2, longest)
