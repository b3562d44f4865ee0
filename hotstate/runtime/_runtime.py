"""``Runtime``: the embedding entry point (the "Runtime" box of the map in docs/architecture.md).

The public API and the lifecycle only. ``__init__`` builds the parts:

- ``RunRegistry`` (``_registry.py``): the runs held in memory and their indexes;
- ``Scheduler`` (``_scheduler.py``): the ready queue and its tasks, the
  ``ActorHost`` the actors call and the ``TierListener`` the tiers report to;
  it builds the ``Tiers`` (``persistence/_tiers.py``), every tier behind one door;
- ``Adoption`` (``_adoption.py``): recovery, and ``spawn`` of a stored id;
- the ``Supervisor``, the ``TimerService`` and the ``EventBus``.

Start-up and shut-down run in named phases on one ``AsyncExitStack``, so
teardown is the reverse of start-up. Each user method is validation plus a call
into a part. Runs on asyncio (plain or uvloop): interrupts use ``Task.uncancel``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import uuid
import warnings
import weakref
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, final

import anyio

from hotstate._clock import Clock, SystemClock
from hotstate._errors import (
    ConfigError,
    CorruptSnapshotError,
    DurabilityTimeoutError,
    HotstateInternalError,
    RunCancelledError,
    RunFailedError,
    RunFinishedError,
    RunNotFoundError,
    RuntimeClosedError,
    SignalQueueFullError,
    StoreUnavailableError,
    UnknownSignalError,
    WorkflowNotRegisteredError,
)
from hotstate._instrument import Instrument, Instruments
from hotstate._names import dedupe_key as valid_dedupe_key, name as valid_name, run_id as valid_run_id
from hotstate._validate import integer, number, text
from hotstate.actors import (
    TERMINAL_STATUSES,
    DeadLetter,
    Snapshot,
    Status,
    Transition,
    Workflow,
)
from hotstate.persistence import (
    Codec,
    MemoryStore,
    MsgpackCodec,
    PersisterStatistics,
    PostgresStore,
    SQLiteStore,
    Tier,
)
from hotstate.persistence._authority import Authority, MemoryAuthority, process_gone
from hotstate.persistence._postgres_authority import read_postgres_shard_map
from hotstate.persistence._shards import generated_prefix
from hotstate.persistence._sqlite_authority import SQLiteAuthority, authority_path, read_shard_map
from hotstate.runtime._adoption import Adoption, same_definition
from hotstate.runtime._backoff import RestartIntensity
from hotstate.runtime._events import EventBus, Subscription
from hotstate.runtime._handle import _HANDLE_TOKEN, RunHandle
from hotstate.runtime._lifecycle import Lifecycle, State
from hotstate.runtime._ownership import Location, Ownership, ShardManager
from hotstate.runtime._recovery import choose_copy
from hotstate.runtime._registry import ListedRun, RunRegistry
from hotstate.runtime._routing import Router
from hotstate.runtime._scheduler import Scheduler
from hotstate.runtime._statistics import RuntimeStatistics
from hotstate.runtime._supervisor import Supervisor
from hotstate.runtime._timers import TimerService

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from types import TracebackType

    from hotstate.actors._actor import RunActor
    from hotstate.runtime._recovery import RecoveryReport


__all__ = ["Runtime"]

log = logging.getLogger("hotstate.runtime")

_T = TypeVar("_T")


def _check_kind(field: str, value: object, kind: type, what: str) -> None:
    if value is not None and not isinstance(value, kind):
        raise ConfigError(field, value, f"must be {what} or None, not {type(value).__name__}")


def _items(field: str, value: object, kind: type[_T], what: str) -> list[_T]:
    """``value`` as a list of ``kind``: ``ConfigError`` for a str, a non-iterable or an item of another type."""
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise ConfigError(field, value, f"must be a sequence of {what}, not {type(value).__name__}")
    items = list(value)
    for item in items:
        if not isinstance(item, kind):
            raise ConfigError(field, item, f"must be {what}, not {type(item).__name__}")
    return items


def _why_unwanted(actor: RunActor, signal: str) -> str:
    """Why ``send`` refuses ``signal`` (``UnknownSignalError``'s reason)."""
    s = actor.snapshot
    workflow = actor.workflow
    if s.status is Status.compensating:
        return f"no step waits for signal {signal!r}: the run is compensating"
    if not workflow.waits_for(signal):
        return f"no step of workflow {workflow.name!r} waits for signal {signal!r}"
    left = workflow.waits_for(signal, from_step=s.step)
    if not left:
        return f"no step left (at or after step {s.step}) waits for signal {signal!r}"
    return f"no step left waits for another signal {signal!r}: each of the {left} that do already has one queued"


_MEMORY_AUTHORITIES: weakref.WeakKeyDictionary[MemoryStore, MemoryAuthority] = weakref.WeakKeyDictionary()


def _sqlite_shard_map(store: SQLiteStore) -> tuple[Any, Any, float] | None:
    """The shard map beside an SQLite tier's file (None: no file yet, or no authority there); a quick local read."""
    if not Path(store.path).is_file():
        return None
    return read_shard_map(store.path)


def _default_authority(tiers: Sequence[Tier], shards: int | None) -> Authority | None:
    """The authority a runtime with these tiers uses by default, or None (nothing durable to share).

    The first durable PostgreSQL tier's database (``PostgresAuthority``: processes on several
    machines; it comes first, as the widest a tier is shared); else a file beside the first
    durable SQLite tier's (``authority_path``: processes on one host); else a ``MemoryStore``'s
    own authority (runtimes sharing it in one process); else the first Valkey tier's server
    (one server, not across a failover).
    """
    durable = [t.store for t in tiers if not t.policy.cache]
    for store in durable:
        if isinstance(store, PostgresStore):
            return store.default_authority(shards)
    for store in durable:
        if isinstance(store, SQLiteStore):
            return SQLiteAuthority(authority_path(store.path), shards=shards)
    for store in durable:
        if isinstance(store, MemoryStore):
            held = _MEMORY_AUTHORITIES.get(store)
            if held is None:
                held = _MEMORY_AUTHORITIES[store] = MemoryAuthority(shards)
            return held
    for store in durable:  # a store that names one (ValkeyStore: its server, not safe across a failover)
        make = getattr(store, "default_authority", None)
        if make is not None:
            authority: Authority = make(shards)
            return authority
    return None


_MAX_LISTED = 10_000  # list_stored's largest page: each tier reads one page of this many headers
_NO_TIER = "the runtime is memory-only: a run evicted from memory would be lost (purge_finished deletes runs)"


@final
class Runtime:
    """Runs workflows as in-memory actors. Use it as an async context manager.

    Args:
        workflows: workflows to register now (more with ``register``).
        clock: time source for backoff, timeouts and stamps (default: the system clock).
        rng: random source for backoff jitter (default: a fresh ``random.Random()``).
        intensity: restart intensity applied per run.
        tiers: persistence tiers (a store and its ``FlushPolicy`` each), fastest
            first; none means memory-only.
        codec: the payload codec for every tier (default: ``MsgpackCodec()``,
            data-only, keyed from ``HOTSTATE_SECRET_KEY`` when that is set;
            ``PickleCodec`` for arbitrary objects needs a key or ``trust_stores=True``).
        recover: at start, resume every unfinished run found in the tiers
            (see ``recovery_report``).
        recovery_concurrency: chunks loaded at once per tier during recovery.
        shutdown_timeout: seconds in-flight steps get to finish at shutdown.
        flush_timeout: seconds the final flush at shutdown may take.
        steps_per_turn: steps one run may take before others get a turn (fairness).
        crash_limit: a run in flight at this many consecutive process crashes
            (a step that kills its process) is failed with ``CrashLoopError``,
            compensated and dead-lettered at the next recovery instead of being
            resumed again; runs in flight at the last crash too are resumed one
            at a time after the others, so one poison run never starves them.
        ack_tiers: tiers whose durability every acknowledgement waits for, as
            for write-through tiers (always waited for): ``spawn``, ``send``,
            ``cancel`` and ``retry_dead_letter`` return, and ``wait_finished``
            returns or raises, only once the change is durable there; waiters
            share the tier's group commit. E.g. ``ack_tiers=["sqlite"]`` over a
            write-behind SQLite tier makes a web handler's 2xx mean "survives a
            SIGKILL" while steps stay write-behind.
        instruments: observers called on every transition and around each
            batch of run rows a tier writes (``Store.save``; not dead letters,
            kept versions or deletions) (``Instrument``); a hook no instrument
            overrides costs nothing.
        retain_finished: seconds a finished run stays in memory once its final
            version is durable in every tier; then it leaves memory and stays in
            the stores (``evict_finished``). A timer on the runtime's clock checks
            every quarter of this (at least every second, at most every
            minute), costs the runs it evicts, and nothing per step. Default:
            finished runs stay in memory until ``purge_finished``.
        ownership: how this runtime shares its stores with other processes
            (DESIGN.md "Several processes"). By default (None), a runtime with
            a durable tier owns shards of runs under leases and fences: it
            runs only runs of shards it owns, forwards calls for other shards
            to their owner, and hands its shards off at shutdown, so several
            processes (``uvicorn --workers 2``, a rolling deploy) never run a
            step twice. Alone, it owns every shard. ``Ownership(...)`` tunes it
            (lease ttl, shard count, authority); False turns it off: then this
            process must be the only one using its stores.
        max_pending_signals: the most signals one run holds unconsumed;
            ``send`` past it raises ``SignalQueueFullError`` and queues nothing.
            (``send`` already takes only signals a step left will consume, so
            only a workflow with more waiting steps than this reaches it.)

    Raises:
        ConfigError: an option is out of range or of the wrong type, or two
            workflows share a name.

    Example::

        async with Runtime([order_workflow]) as rt:
            run = await rt.spawn("order", {"id": 1})
            print(rt.get(run.run_id).status)
            result = await run.wait_finished()
    """

    def __init__(
        self,
        workflows: Iterable[Workflow] = (),
        *,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        intensity: RestartIntensity | None = None,
        tiers: Sequence[Tier] = (),
        codec: Codec | None = None,
        recover: bool = False,
        recovery_concurrency: int = 4,
        shutdown_timeout: float = 5.0,
        flush_timeout: float = 30.0,
        steps_per_turn: int = 100,
        instruments: Sequence[Instrument] = (),
        ack_tiers: Sequence[str] = (),
        crash_limit: int = 3,
        retain_finished: float | None = None,
        max_pending_signals: int = 1_000,
        ownership: Ownership | bool | None = None,
    ) -> None:
        number("Runtime.shutdown_timeout", shutdown_timeout)
        number("Runtime.flush_timeout", flush_timeout, strict=True)
        integer("Runtime.steps_per_turn", steps_per_turn, minimum=1)
        integer("Runtime.recovery_concurrency", recovery_concurrency, minimum=1)
        integer("Runtime.crash_limit", crash_limit, minimum=1)
        self._max_signals = integer("Runtime.max_pending_signals", max_pending_signals, minimum=1)
        _check_kind("Runtime.clock", clock, Clock, "a Clock")
        _check_kind("Runtime.rng", rng, random.Random, "a random.Random")
        _check_kind("Runtime.intensity", intensity, RestartIntensity, "a RestartIntensity")
        _check_kind("Runtime.codec", codec, Codec, "a Codec")
        workflows = _items("Runtime.workflows", workflows, Workflow, "Workflow objects")
        tiers = _items("Runtime.tiers", tiers, Tier, "Tier objects")
        instruments = _items("Runtime.instruments", instruments, Instrument, "Instrument objects")
        ack_tiers = _items("Runtime.ack_tiers", ack_tiers, str, "tier names (str)")
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._wall = self._clock.wall
        self._codec: Codec = codec if codec is not None else MsgpackCodec()
        self._workflows: dict[str, Workflow] = {}
        for wf in workflows:
            self.register(wf)
        self._recover = bool(recover)
        self.recovery_report: RecoveryReport | None = None
        self._supervisor = Supervisor(
            intensity or RestartIntensity(), self._clock, rng if rng is not None else random.Random()
        )
        self._timers = TimerService(self._clock)
        self._bus = EventBus()
        self._registry = RunRegistry()
        self._scheduler = Scheduler(
            self._registry,
            self._supervisor,
            self._timers,
            self._bus,
            self._clock,
            tiers=tiers,
            codec=self._codec,
            instruments=Instruments(instruments),
            steps_per_turn=steps_per_turn,
        )
        self._tiers = self._scheduler.tiers
        for name in ack_tiers:
            if name not in self._tiers.names:
                raise ConfigError(
                    "Runtime.ack_tiers", name, f"no tier has this name (tiers: {list(self._tiers.names)})"
                )
            if name in self._tiers.cache_names:
                raise ConfigError(
                    "Runtime.ack_tiers", name, "a cache tier (FlushPolicy(cache=True)) acknowledges nothing"
                )
        # The tiers an acknowledgement waits for: every write-through tier, plus ack_tiers.
        self._ack = tuple(dict.fromkeys([*self._tiers.write_through_names, *ack_tiers]))
        self._retain: float | None = None
        if retain_finished is not None:
            self._retain = number("Runtime.retain_finished", retain_finished)
            if not len(self._tiers):
                raise ConfigError("Runtime.retain_finished", retain_finished, _NO_TIER)
        self._adoption = Adoption(
            self._registry,
            self._scheduler,
            self._supervisor,
            self._workflows,
            self._codec,
            self._wall,
            concurrency=recovery_concurrency,
            crash_limit=crash_limit,
            release_timeout=5.0,
        )
        self._ids = itertools.count(1)
        self._id_prefix = uuid.uuid4().hex[:12] + "-"
        self._owner: ShardManager | None = None
        self._router: Router | None = None
        self._lifecycle = Lifecycle(
            self._tiers,
            self._timers,
            self._scheduler,
            self._bus,
            shutdown_timeout=float(shutdown_timeout),
            flush_timeout=float(flush_timeout),
        )
        self._set_up_ownership(ownership, tiers)

    def _set_up_ownership(self, ownership: Ownership | bool | None, tiers: Sequence[Tier]) -> None:
        if ownership is False or (ownership is None and not tiers):
            return
        if ownership is True or ownership is None:
            config = Ownership()
        elif isinstance(ownership, Ownership):
            config = ownership
        else:
            raise ConfigError("Runtime.ownership", ownership, "must be an Ownership, True, False or None")
        if not tiers:
            raise ConfigError("Runtime.ownership", ownership, "a memory-only runtime shares nothing to own")
        authority = config.authority or _default_authority(tiers, config.shards)
        if authority is None:
            if ownership is not None:
                raise ConfigError(
                    "Ownership.authority", None, "no tier can be the authority: pass one (e.g. SQLiteAuthority(path))"
                )
            log.info("hotstate: no tier can hold leases; this runtime must be the only one on its stores")
            return
        router = Router(self, self._registry, self._scheduler, self._tiers, self._adoption, self._codec)
        owner = ShardManager(config, authority, router)
        router.owner = owner
        self._router, self._owner = router, owner
        self._lifecycle.closing = owner.closing
        self._lifecycle.after_flush = owner.stop

    # ------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> Runtime:
        owner = self._owner
        if owner is None:
            await self._refuse_owned_stores()
            await self._lifecycle.start(self._recover_runs if self._recover else None)
        else:
            await self._lifecycle.start(self._start_owning)
        if self._retain is not None:
            self._retention_tick()
        return self

    async def _refuse_owned_stores(self) -> None:
        """``ownership=False`` on stores other processes hold shards of: refuse, before anything runs.

        Such a runtime would resume and run their runs beside them, and its
        unfenced writes pass every store's fence. Checked where the default
        authority of a tier keeps its leases: beside an SQLite file, and in a
        PostgreSQL tier's schema.
        """
        for store in self._tiers.stores:
            if isinstance(store, PostgresStore):
                found = await read_postgres_shard_map(store.url, store.schema, connect_timeout=store.timeout)
                where = f"schema {store.schema!r}"
            elif isinstance(store, SQLiteStore):
                found = _sqlite_shard_map(store)
                where = repr(store.path)
            else:
                continue
            if found is None:
                continue
            leases, members, now = found
            by_id = {m.member_id: m for m in members}
            held = [
                lease
                for lease in leases
                if lease.owner is not None
                and lease.expires_at > now
                and not ((m := by_id.get(lease.owner)) is not None and process_gone(m))
            ]
            if held:
                raise ConfigError(
                    "Runtime.ownership",
                    False,
                    f"{len(held)} shard(s) of {where} are held by other processes;"
                    " a runtime without ownership would run their runs too (use ownership on, the default)",
                )

    async def _start_owning(self) -> None:
        """Join, claim, seal and load this process's shards, then keep them (renewals, placement, inbox)."""
        owner = self._owner
        assert owner is not None  # noqa: S101 - only called with ownership on
        try:
            claimed = await owner.start(self._tiers.stores)
            self._tiers.own(owner.fence, owner.shard_of, owner.epoch_of)
            self._scheduler.on_fenced = owner.fenced
            await owner.take(claimed, resume=self._recover)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await owner.abandon()
            raise
        if self.recovery_report is None and self._recover:
            self.recovery_report = await self._adoption.recover(shards=())  # nothing claimed: an empty report
        scheduler = self._scheduler
        scheduler.start_background(owner.run_renewals, "hotstate-lease-renewals")
        scheduler.start_background(owner.run, "hotstate-shard-placement")
        scheduler.start_background(owner.run_inbox, "hotstate-inbox")

    async def _recover_runs(self) -> None:
        self.recovery_report = report = await self._adoption.recover()
        if report.held_back:
            self._scheduler.start_background(self._adoption.release_held_back, "hotstate-release-held-back")

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        return await self._lifecycle.stop(exc_type, exc, tb)

    async def aclose(self) -> None:
        """Shut down gracefully: stop accepting, let in-flight steps finish, then cancel.

        Prefer ``async with``; this is for code that cannot use it. Runs that did
        not finish stay at their latest snapshot (a later runtime can resume them).
        """
        await self._lifecycle.stop()

    @property
    def state(self) -> State:
        """The lifecycle state: ``new`` until entered, ``open``, ``closing`` during shutdown, then ``closed``."""
        return self._lifecycle.state

    def __del__(self, _warn: Any = warnings.warn) -> None:
        lifecycle = getattr(self, "_lifecycle", None)
        if lifecycle is not None and lifecycle.state in ("open", "closing"):
            _warn(f"unclosed {self!r}", ResourceWarning, stacklevel=1)

    def __repr__(self) -> str:
        registry = getattr(self, "_registry", None)
        return f"<Runtime {self.state} runs={0 if registry is None else len(registry)}>"

    def _check_open(self) -> None:
        state = self._lifecycle.state
        if state != "open":
            raise RuntimeClosedError(
                "the runtime is not running; use `async with Runtime(...)`"
                if state == "new"
                else "the runtime is closed"
            )

    # -------------------------------------------------------------- workflows

    def register(self, workflow: Workflow) -> None:
        """Register a workflow so runs of it can be spawned (and recovered).

        Args:
            workflow: the definition.

        Raises:
            ConfigError: another workflow has the same name, or ``workflow`` is not one.
        """
        if not isinstance(workflow, Workflow):
            raise ConfigError("Runtime.register.workflow", workflow, "must be a Workflow")
        existing = self._workflows.get(workflow.name)
        if existing is not None and existing is not workflow:
            raise ConfigError("Workflow.name", workflow.name, "a workflow with this name is already registered")
        self._workflows[workflow.name] = workflow

    @property
    def workflows(self) -> Mapping[str, Workflow]:
        """The registered workflows by name."""
        return dict(self._workflows)

    # ----------------------------------------------------------------- spawn

    async def spawn(self, workflow: Workflow | str, payload: Any, *, run_id: str | None = None) -> RunHandle:
        """Start a run of ``workflow`` with ``payload``.

        Idempotent on ``run_id``: if a run with that id exists, its handle is
        returned (``created`` False) and nothing new is started, provided it is
        a run of the same workflow and definition version (its
        ``Snapshot.workflow_version``); otherwise ``RunConflictError``. An id not
        in memory is looked up in every tier and the newest verified copy is
        adopted (before the check: a conflicting stored run is in memory after). A tier that
        fails, or does not answer within its policy's ``ack_timeout``, may hold
        the newest copy, so ``spawn`` raises ``StoreUnavailableError`` rather
        than start a second lineage from the others (retry once the tier is
        back). Generated ids are never looked up.

        Args:
            workflow: a registered workflow or its name.
            payload: the initial payload.
            run_id: the run's id (default: a fresh unique id).

        Under write-through (or with ``ack_tiers``) it returns once the run's
        first snapshot is durable in those tiers.

        Returns:
            The run's handle; ``RunHandle.created`` says whether this call started it.

        Raises:
            RuntimeClosedError: the runtime is not running.
            WorkflowNotRegisteredError: the workflow is not registered.
            RunConflictError: a run with ``run_id`` exists, of another workflow
                or another definition version; it is left as it is.
            ConfigError: ``workflow`` is neither a ``Workflow`` nor a str, or
                ``run_id`` is not a valid run id.
            StoreUnavailableError: a tier could not say whether it holds ``run_id``.
            DurabilityTimeoutError: an acknowledging tier did not make it durable
                within its ``ack_timeout`` (the run exists; spawning the same
                ``run_id`` again is safe).
            PersistenceError: an acknowledging tier cannot hold it
                (``CodecError``: the payload cannot be encoded;
                ``StaleVersionError``: the tier holds a newer version).
        """
        if self._lifecycle.state != "open":
            self._check_open()
        if isinstance(workflow, str):
            name = workflow
        elif isinstance(workflow, Workflow):
            name = workflow.name
        else:
            raise ConfigError(
                "spawn.workflow",
                workflow,
                f"must be a Workflow or a workflow name (str), not {type(workflow).__name__}",
            )
        scheduler = self._scheduler
        if scheduler.hold:
            await scheduler.wait_gate()  # backpressure: a tier is over its memory bound
        owner = self._owner
        if run_id is None:
            if owner is None:
                run_id = f"{self._id_prefix}{next(self._ids)}"
            else:
                shard = owner.spawn_shard()
                if shard is None:  # this process owns no shard (yet): the run starts at an owner
                    n = next(self._ids)
                    run_id = f"{generated_prefix(n % owner.shards)}{self._id_prefix}{n}"
                    self._registered(workflow, name, run_id)
                    return await self._forward_spawn(name, payload, run_id)
                run_id = f"{generated_prefix(shard)}{self._id_prefix}{next(self._ids)}"
            wf = self._registered(workflow, name, run_id)
        elif owner is not None and self._elsewhere("spawn.run_id", run_id):
            self._registered(workflow, name, run_id)
            return await self._forward_spawn(name, payload, run_id)
        else:
            held = self._lookup(run_id) is not None
            if not held:
                run_id = valid_run_id("spawn.run_id", run_id)
            wf = self._registered(workflow, name, run_id)
            adopted = not held and len(self._tiers) and await self._adoption.adopt(run_id, expect=wf)
            if owner is not None and not held and self._elsewhere("spawn.run_id", run_id):
                # The shard left this process while the tiers answered: what the lookup
                # brought in must not stay, and the run starts at its new owner.
                router = self._router
                assert router is not None  # noqa: S101 - set with the owner
                shard = owner.shard_of(run_id)
                if shard not in owner.owned:
                    router.evict_shards({shard: 0}, "lost while spawn looked its run up")
                return await self._forward_spawn(name, payload, run_id)
            if held or adopted or run_id in self._registry.actors:  # or spawned by a concurrent call meanwhile
                self._same_definition(run_id, wf)
                if self._ack:
                    await self._acknowledge(run_id, 1)
                return RunHandle._new(self, run_id, False)
        scheduler.spawn_new(wf, run_id, payload)
        if self._ack:
            await self._acknowledge(run_id, 1)
        return RunHandle._new(self, run_id, True)

    async def _forward_spawn(self, name: str, payload: Any, run_id: str) -> RunHandle:
        """``spawn`` of a run whose shard another process owns: through the shard's inbox."""
        router = self._router
        assert router is not None  # noqa: S101 - only with ownership on
        answer = await router.forward("spawn", run_id, {"workflow": name, "payload": payload})
        if answer is None:
            raise DurabilityTimeoutError(
                "inbox",
                f"run {run_id!r} is in its shard's inbox, and its owner did not answer within forward_timeout;"
                " it will start there (spawning the same run_id again is safe)",
                run_id=run_id,
            )
        return RunHandle._new(self, run_id, bool(answer.get("created")))

    async def _spawn_here(self, name: str, payload: Any, run_id: str) -> RunHandle:
        """``spawn(name, payload, run_id=...)`` for a shard this process owns (an applied inbox entry)."""
        return await self.spawn(name, payload, run_id=run_id)

    def _elsewhere(self, field: str, run_id: str) -> bool:
        """With ownership on: is ``run_id``'s shard held by another process (or being handed off)?"""
        owner = self._owner
        return owner is not None and not owner.holds(valid_run_id(field, run_id))

    def _registered(self, workflow: Workflow | str, name: str, run_id: str) -> Workflow:
        wf = self._workflows.get(name)
        if wf is None or (wf is not workflow and not isinstance(workflow, str)):
            raise WorkflowNotRegisteredError(run_id, name)
        return wf

    def _same_definition(self, run_id: str, wf: Workflow) -> None:
        """``spawn`` of an existing id returns it only for the same workflow and definition version."""
        same_definition(self._registry.actors[run_id].snapshot, wf)

    def handle(self, run_id: str) -> RunHandle:
        """Return a handle on an existing run.

        Args:
            run_id: the run's id.

        Returns:
            The handle.

        Raises:
            RunNotFoundError: no such run.
            ConfigError: ``run_id`` is not a valid run id.
        """
        self._actor("handle.run_id", run_id)
        return RunHandle(self, run_id, _token=_HANDLE_TOKEN)

    # --------------------------------------------------------------- queries

    def get(self, run_id: str) -> Snapshot:
        """Where is this run right now? Its latest snapshot; O(1), no I/O.

        Args:
            run_id: the run's id.

        Returns:
            The latest snapshot.

        Raises:
            RunNotFoundError: no such run.
            ConfigError: ``run_id`` is not a valid run id.
        """
        return self._actor("get.run_id", run_id).snapshot

    def _lookup(self, run_id: str) -> RunActor | None:
        """The run's actor, or None (an unhashable "id" too: it is validated on the miss)."""
        try:
            return self._registry.get(run_id)
        except TypeError:
            return None

    def _actor(self, field: str, run_id: str) -> RunActor:
        """The run's actor; ``ConfigError`` for a value no run id can be, else ``RunNotFoundError``.

        Validation costs nothing on a hit: only a miss checks the id.
        """
        actor = self._lookup(run_id)
        if actor is None:
            raise RunNotFoundError(valid_run_id(field, run_id))
        return actor

    async def load(self, run_id: str) -> Snapshot:
        """Where is this run, in memory or in the stores, finished or not?

        A run held in memory answers at once, as ``get`` does. Otherwise every
        tier is asked for its copy, and the newest copy that verifies is
        decoded and returned (a copy that does not verify is never unpickled;
        an older one is used). Nothing is brought into memory, adopted or run:
        ``spawn(run_id=...)`` does that.

        Args:
            run_id: the run's id.

        Returns:
            The run's newest snapshot.

        Raises:
            ConfigError: ``run_id`` is not a valid run id.
            RunNotFoundError: no such run in memory or in any tier.
            RuntimeClosedError: the run is not in memory and the runtime is not
                running (its stores are closed).
            StoreUnavailableError: a tier failed, or did not answer within its
                policy's ``ack_timeout``: it may hold the newest copy (a cache
                tier, ``FlushPolicy.cache``, is left out instead).
            CorruptSnapshotError: copies exist, but none verifies.
        """
        actor = self._lookup(run_id)
        if actor is not None:
            return actor.snapshot
        run_id = valid_run_id("load.run_id", run_id)
        if not len(self._tiers):
            raise RunNotFoundError(run_id)
        self._check_open()
        copies = await self._tiers.peek(run_id)
        actor = self._registry.get(run_id)
        if actor is not None:  # spawned or adopted meanwhile: memory holds the newest
            return actor.snapshot
        if not copies:
            raise RunNotFoundError(run_id)
        choice = choose_copy(run_id, copies, self._codec)
        if choice.snapshot is None:  # every copy failed; choose_copy logged each
            error = choice.error
            if isinstance(error, CorruptSnapshotError):
                raise error
            newest = choice.corrupt[0]  # a CodecError: the frame or a field could not be read
            raise CorruptSnapshotError(newest.tier, run_id, newest.version, newest.reason) from error
        return choice.snapshot

    def list_runs(
        self, *, status: Status | str | None = None, workflow: str | None = None, limit: int | None = None
    ) -> list[Snapshot]:
        """List runs by status and/or workflow from the in-memory indexes (no scan).

        Args:
            status: only runs in this status.
            workflow: only runs of this workflow.
            limit: at most this many, oldest first.

        Returns:
            Their latest snapshots.

        Raises:
            ConfigError: ``status`` is not a status name, ``workflow`` is not a
                workflow name, or ``limit`` is not an int >= 0.
        """
        st = self._status(status)
        if workflow is not None:
            workflow = valid_name("list_runs.workflow", workflow)
        if limit is not None:
            integer("list_runs.limit", limit)
        registry = self._registry
        if st is None and workflow is None:
            actors_in_order = iter(registry)  # spawn order, across workflows
            if limit is not None:
                actors_in_order = itertools.islice(actors_in_order, limit)
            return [a.snapshot for a in actors_in_order]
        ids = registry.select(st, workflow)
        if limit is not None:
            ids = ids[:limit]
        actors = registry.actors
        return [actors[rid].snapshot for rid in ids]

    def count(self, *, status: Status | str | None = None, workflow: str | None = None) -> int:
        """Count runs by status and/or workflow.

        Args:
            status: only runs in this status.
            workflow: only runs of this workflow.

        Returns:
            The count.

        Raises:
            ConfigError: ``status`` is not a status name, or ``workflow`` is not a workflow name.
        """
        if workflow is not None:
            workflow = valid_name("count.workflow", workflow)
        return self._registry.count(self._status(status), workflow)

    async def list_stored(
        self,
        *,
        status: Status | str | None = None,
        workflow: str | None = None,
        after: str | None = None,
        limit: int = 100,
    ) -> list[ListedRun]:
        """List runs in the stores and in memory, a page at a time, ordered by run id.

        Finished runs that left memory (``evict_finished``) or were never
        loaded (after a restart) are listed as well as runs in memory. Only
        headers are read, never a payload (``Store.scan``, one page per tier).
        Each run is listed once, at its newest version: a run held in memory as
        memory holds it, otherwise the newest copy any tier holds (headers carry
        no digest: a copy ``load`` would reject as corrupt is still listed).
        Filters apply to that version. Costs one page per tier, and a pass
        over the runs in memory that match the filters.

        Args:
            status: only runs in this status.
            workflow: only runs of this workflow.
            after: the cursor: only run ids after this one (pass the last
                ``run_id`` of the previous page).
            limit: the page size, 1 to 10,000.

        Returns:
            Up to ``limit`` runs; fewer means there is no next page.

        Raises:
            ConfigError: ``status`` is not a status name, ``workflow`` or
                ``after`` is not a str, or ``limit`` is out of range.
            RuntimeClosedError: the runtime has tiers and is not running.
            StoreUnavailableError: a tier failed, or did not answer within its
                policy's ``ack_timeout`` (no partial page is given; a cache
                tier, ``FlushPolicy.cache``, is left out instead).
        """
        st = self._status(status)
        if workflow is not None:
            text("list_stored.workflow", workflow)
        if after is not None and not isinstance(after, str):
            raise ConfigError("list_stored.after", after, "must be a run id (str) or None")
        if integer("list_stored.limit", limit, minimum=1) > _MAX_LISTED:
            raise ConfigError("list_stored.limit", limit, f"must be <= {_MAX_LISTED}")
        if len(self._tiers):
            self._check_open()
        listed: list[ListedRun] = []
        cursor = after
        while True:
            stored, through = await self._tiers.newest_headers(
                status=None if st is None else st.value, workflow=workflow, after=cursor, limit=limit
            )
            listed.extend(self._registry.listing(stored, st, workflow, cursor, through)[: limit - len(listed)])
            if len(listed) >= limit or through is None:
                return listed
            cursor = through  # a run that left the filter since it was stored made the page short

    @staticmethod
    def _status(status: Status | str | None) -> Status | None:
        if status is None or isinstance(status, Status):
            return status
        try:
            return Status(status)
        except ValueError:
            raise ConfigError("status", status, f"must be one of {[s.value for s in Status]}") from None

    def history(self, run_id: str) -> list[Transition]:
        """Return a run's transitions (its audit trail), oldest first.

        Args:
            run_id: the run's id.

        Returns:
            A copy of the transitions held in memory.

        Raises:
            RunNotFoundError: no such run.
            ConfigError: ``run_id`` is not a valid run id.
        """
        return self._actor("history.run_id", run_id).history.transitions(run_id)

    def subscribe(self, *, run_id: str | None = None, workflow: str | None = None, maxsize: int = 1000) -> Subscription:
        """Subscribe to transitions as they happen.

        Args:
            run_id: only this run.
            workflow: only this workflow.
            maxsize: buffered transitions before the subscriber is cut off.

        Returns:
            An async iterator; ``SubscriberOverflowError`` ends it if it falls behind.

        Raises:
            ConfigError: ``maxsize`` is below 1, ``run_id`` is not a valid run
                id, or ``workflow`` is not a valid workflow name.
        """
        if run_id is not None:
            run_id = valid_run_id("subscribe.run_id", run_id)
        if workflow is not None:
            workflow = valid_name("subscribe.workflow", workflow)
        return self._bus.subscribe(run_id=run_id, workflow=workflow, maxsize=maxsize)

    def dead_letters(self) -> list[DeadLetter]:
        """Return the dead-letter records (runs that failed for good), oldest first.

        Returns:
            The records.
        """
        return list(self._supervisor.dead_letters.values())

    async def flush(self) -> None:
        """Flush every tier now; returns once what was pending is durable.

        Raises:
            RuntimeClosedError: the runtime is not running.
            PersistenceError: a tier failed (its batch was put back and is retried).
        """
        self._check_open()
        await self._tiers.flush()

    def durable_versions(self, run_id: str) -> dict[str, int]:
        """Where is this run, per tier? ``{"hot": 12, "valkey": 12, "sqlite": 9}``; no I/O.

        ``hot`` is the in-memory version; each tier's figure is the newest version
        this runtime has had acknowledged by it (0: none yet).

        Args:
            run_id: the run's id.

        Returns:
            Versions by tier.

        Raises:
            RunNotFoundError: no such run.
            ConfigError: ``run_id`` is not a valid run id.
        """
        hot = self._actor("durable_versions.run_id", run_id).snapshot.version
        return {"hot": hot, **self._tiers.durable_versions(run_id)}

    async def wait_durable(
        self,
        run_id: str,
        version: int | None = None,
        *,
        tier: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - on the injectable clock, per tier
    ) -> None:
        """Wait until the run's snapshot is durable (in every tier, or in ``tier``).

        Args:
            run_id: the run's id.
            version: the version to wait for (default: the current one).
            tier: only this tier.
            timeout: seconds (default: each tier's ``ack_timeout``).

        Raises:
            RunNotFoundError: no such run.
            ConfigError: no tier has that name, the runtime is memory-only,
                ``run_id`` is not a valid run id, ``version`` is not an int >= 0,
                or ``timeout`` is not a number >= 0.
            DurabilityTimeoutError: not durable in time; the tier is down or slow.
            RunRejectedError: the tier refused the run (text that does not
                encode, a number out of range, a stored key of the wrong type).
            StaleVersionError: the tier holds a newer version of the run.
            CodecError: the run's snapshot cannot be encoded.
        """
        actor = self._actor("wait_durable.run_id", run_id)
        v = actor.snapshot.version if version is None else integer("wait_durable.version", version)
        if tier is not None and not isinstance(tier, str):
            raise ConfigError(
                "wait_durable.tier", tier, f"must be a tier name (str) or None, not {type(tier).__name__}"
            )
        if timeout is not None:
            number("wait_durable.timeout", timeout)
        await self._tiers.wait_durable(run_id, v, tier=tier, timeout=timeout)

    async def purge_finished(self, older_than: float) -> dict[str, int]:
        """Forget finished runs last updated more than ``older_than`` seconds ago.

        They leave memory and every tier (snapshot and history). Runs with a
        dead letter stay in memory so they can still be retried; their
        dead-letter record keeps the final snapshot in the tiers.

        First every tier is flushed and every tier that is behind is brought
        up to the newest verified copy of each run (a header scan of every
        tier), so a run finished in one tier is never purged there while an
        older, unfinished copy survives in another and comes back later.

        Args:
            older_than: age in seconds (by ``updated_at``, wall clock).

        Returns:
            How many runs were purged: ``{"hot": n, "<tier>": n, ...}``.

        Raises:
            RuntimeClosedError: the runtime is not running.
            ConfigError: ``older_than`` is negative or not a number.
            PersistenceError: a tier failed (memory was purged already).
        """
        self._check_open()
        number("purge_finished.older_than", older_than)
        before = self._wall() - older_than
        gone = self._registry.purge_finished(before, keep=self._supervisor.dead_letters)
        await self._tiers.flush()
        repair = await self._adoption.reconcile()
        if repair.errors:  # a tier that could not be compared may hold the stale copy a purge would leave
            tier, error = next(iter(repair.errors.items()))
            raise StoreUnavailableError(tier, f"cannot compare its copies before purging; nothing purged: {error}")
        return {"hot": len(gone), **await self._tiers.purge(gone, before)}

    async def evict_finished(self, older_than: float) -> int:
        """Let finished runs last updated more than ``older_than`` seconds ago leave memory; they stay stored.

        Every tier is flushed first, and a run leaves memory only once its
        newest version is durable in every tier. Afterwards ``get`` raises
        ``RunNotFoundError`` for it while ``load`` and ``list_stored`` answer
        from the stores, its history stays there, and ``spawn(run_id=...)``
        returns it (finished, never run again). Dead-lettered runs stay in
        memory so they can be retried. ``purge_finished`` is the delete.

        Args:
            older_than: age in seconds (by ``updated_at``, wall clock).

        Returns:
            How many runs left memory.

        Raises:
            RuntimeClosedError: the runtime is not running.
            ConfigError: ``older_than`` is negative or not a number, or the
                runtime is memory-only (an evicted run would be lost).
            PersistenceError: a tier failed to flush (nothing left memory).
        """
        self._check_open()
        number("evict_finished.older_than", older_than)
        if not len(self._tiers):
            raise ConfigError("evict_finished", older_than, _NO_TIER)
        await self._tiers.flush()
        return self._evict(self._wall() - older_than, ordered=False)

    def _evict(self, before: float, *, ordered: bool) -> int:
        gone = self._registry.evict_finished(
            before, keep=self._supervisor.dead_letters, durable=self._tiers.durable_everywhere, ordered=ordered
        )
        self._tiers.forget(gone)
        return len(gone)

    def _retention_tick(self) -> None:
        """``retain_finished``: evict what is old enough and durable, without I/O; a later tick takes the rest."""
        retain = self._retain
        if retain is None or self._lifecycle.state != "open":
            return
        self._timers.call_later(min(max(retain / 4, 1.0), 60.0), self._retention_tick)
        self._evict(self._wall() - retain, ordered=True)

    async def snapshot_at(self, run_id: str, version: int, *, tier: str | None = None) -> Snapshot:
        """Time travel: the run as it was at ``version`` (or the newest kept copy before it).

        The current snapshot answers for the current version; older versions come
        from the copies kept by tiers whose policy sets ``keep_every``.

        Args:
            run_id: the run's id.
            version: the version wanted.
            tier: read only this tier (default: the first that has a copy).

        Returns:
            The snapshot.

        Raises:
            RunNotFoundError: no copy at or before ``version`` is kept.
            ConfigError: no tier has that name, ``run_id`` is not a valid run
                id, or ``version`` is not an int >= 0.
            CorruptSnapshotError: the kept copy does not verify (never unpickled).
        """
        actor = self._lookup(run_id)
        if actor is None:
            run_id = valid_run_id("snapshot_at.run_id", run_id)
        version = integer("snapshot_at.version", version)
        if actor is not None and actor.snapshot.version <= version:
            return actor.snapshot
        snap = await self._tiers.load_version(run_id, version, tier=tier)
        if snap is None:
            raise RunNotFoundError(run_id)
        return snap

    def tier_statistics(self) -> list[PersisterStatistics]:
        """Return each tier's persister figures (flushes, rows, lag, failures, ...).

        Returns:
            One frozen record per tier, in order.
        """
        return self._tiers.statistics()

    def statistics(self) -> RuntimeStatistics:
        """Return the runtime's current figures.

        Returns:
            A frozen record.
        """
        scheduler = self._scheduler
        return RuntimeStatistics(
            runs=len(self._registry),
            by_status={s.value: n for s, ids in self._registry.by_status.items() if (n := len(ids))},
            transitions=scheduler.transitions,
            ready=scheduler.ready,
            tasks=scheduler.tasks,
            timers=len(self._timers),
            subscribers=self._bus.count,
            subscriber_overflows=self._bus.overflows,
            internal_errors=scheduler.internal_errors + self._timers.errors,
            supervisor=self._supervisor.statistics(),
            tiers=tuple(self._tiers.statistics()),
            throttle_waits=scheduler.throttle_waits,
            published=self._bus.published,
            ownership=None if self._owner is None else self._owner.statistics(),
        )

    async def locate(self, run_id: str) -> Location:
        """Where is this run, across processes? Its shard, the shard's owner, and its newest copy.

        The owner and epoch come from this process's shard map (refreshed at
        every lease renewal); the snapshot from memory when this process
        holds the run, else from the stores (``load``), labelled by ``here``.

        Raises:
            ConfigError: ``run_id`` is not a valid run id.
            RunNotFoundError: no such run in memory or in any tier.
        """
        run_id = valid_run_id("locate.run_id", run_id)
        owner = self._owner
        actor = self._lookup(run_id)
        snap = actor.snapshot if actor is not None else await self.load(run_id)
        if owner is None:
            return Location(run_id=run_id, shard=None, owner=None, epoch=0, expires_at=None, here=True, snapshot=snap)
        shard, holder, epoch, expires = owner.owner_of(run_id)
        return Location(
            run_id=run_id,
            shard=shard,
            owner=holder,
            epoch=epoch,
            expires_at=None if expires != expires else expires,
            here=actor is not None,
            snapshot=snap,
        )

    # ------------------------------------------------------- run interaction

    async def wait_finished(self, run_id: str) -> Any:
        """Wait until the run finishes and return its final payload.

        Args:
            run_id: the run's id.

        Returns:
            The final payload.

        Raises:
            RunNotFoundError: no such run.
            RunFailedError: the run failed for good (``__cause__`` is the step's exception).
            RunCancelledError: the run was cancelled.
            RuntimeClosedError: the runtime shut down before the run finished.
            DurabilityTimeoutError: under write-through or ``ack_tiers``, the
                final snapshot was not durable there within ``ack_timeout``.
            ConfigError: ``run_id`` is not a valid run id.
        """
        actor = self._lookup(run_id)
        router = self._router
        if actor is None:
            if router is not None and self._lifecycle.state == "open":
                owner = self._owner
                assert owner is not None  # noqa: S101 - set with the router
                if not owner.holds(valid_run_id("wait_finished.run_id", run_id)):
                    return await router.follow(run_id)  # held by another process: read its stored copy
            actor = self._actor("wait_finished.run_id", run_id)
        await self._settled(actor)
        if actor.evicted and router is not None and self._lifecycle.state == "open":
            return await router.follow(run_id)  # its shard moved to another process meanwhile
        snap = actor.snapshot
        if snap.status not in TERMINAL_STATUSES:
            raise RuntimeClosedError(f"run {run_id!r} did not finish before the runtime closed")
        if self._ack:
            await self._acknowledge(run_id, snap.version)
        return self._final(run_id, snap, actor.last_exc)

    def _final(self, run_id: str, snap: Snapshot, cause: BaseException | None) -> Any:
        """``wait_finished``'s answer for a finished snapshot: its payload, or the error it ended with."""
        if snap.status is Status.done:
            return snap.payload
        if snap.status is Status.cancelled:
            raise RunCancelledError(run_id)
        error = snap.error
        if error is None:  # pragma: no cover - failed runs always carry an error
            raise HotstateInternalError(f"run {run_id!r} failed without an error record")
        raise RunFailedError(run_id, error) from cause

    async def send(self, run_id: str, signal: str, data: Any = None, *, dedupe_key: str | None = None) -> None:
        """Send a named signal (with data) to a run.

        Signals queue in the run until a step that waits for that name runs.
        Only a signal some step left (at or after the cursor) will consume is
        taken: one per such step, counting those already queued.

        With a ``dedupe_key``, a signal sent again with the same key (a
        re-delivered webhook) is taken once: the repeat queues nothing and
        returns as the first call did (under write-through or ``ack_tiers``,
        once the run's current version is durable there), even after the run
        consumed it or finished. A run remembers the keys of its last 1,000
        keyed signals (``Snapshot.dedupe``).

        Args:
            run_id: the run's id.
            signal: the signal's name.
            data: its data, given to the waiting step as ``ctx.signal``.
            dedupe_key: the delivery's id (e.g. the webhook's event id): a
                non-empty str of at most 256 bytes of UTF-8 without control
                characters.

        Raises:
            RuntimeClosedError: the runtime is not running.
            RunNotFoundError: no such run in memory (a run only in the stores
                answers a ``dedupe_key`` it remembers, and raises this otherwise).
            RunFinishedError: the run has finished.
            UnknownSignalError: no step left waits for ``signal``, or each one
                that does already has one queued, or the run is compensating;
                nothing was queued (a ``ConfigError`` too).
            SignalQueueFullError: ``max_pending_signals`` are pending in the
                run; nothing was queued.
            ConfigError: ``run_id``, ``signal`` or ``dedupe_key`` is not a valid
                id, name or key.
            DurabilityTimeoutError: under write-through or ``ack_tiers``, the
                snapshot holding the signal was not durable within ``ack_timeout``.
        """
        self._check_open()
        if dedupe_key is not None:
            dedupe_key = valid_dedupe_key("send.dedupe_key", dedupe_key)
        if self._owner is not None and self._elsewhere("send.run_id", run_id):
            signal = valid_name("send.signal", signal)
            router = self._router
            assert router is not None  # noqa: S101 - set with the owner
            key = dedupe_key if dedupe_key is not None else router.dedupe_key()
            await router.forward("signal", run_id, {"signal": signal, "data": data, "key": key})
            return
        await self._send_here(run_id, signal, data, dedupe_key=dedupe_key)

    async def _send_here(self, run_id: str, signal: str, data: Any = None, *, dedupe_key: str | None = None) -> None:
        """``send`` to a run of a shard this process owns (or with ownership off)."""
        if dedupe_key is not None:
            dedupe_key = valid_dedupe_key("send.dedupe_key", dedupe_key)
        try:
            actor = self._actor("send.run_id", run_id)
        except RunNotFoundError:
            if dedupe_key is not None and dedupe_key in (await self.load(run_id)).dedupe:
                return  # a re-delivery to a run that left memory (finished, or after a restart): answered
            raise
        signal = valid_name("send.signal", signal)
        own_step = actor.running and actor.host_task is asyncio.current_task()
        if dedupe_key is not None and actor.seen(dedupe_key):  # a re-delivery: answered as the first was
            if self._ack and not own_step:
                await self._acknowledge(run_id, actor.snapshot.version)
            return
        status = actor.snapshot.status
        if status in TERMINAL_STATUSES:
            raise RunFinishedError(run_id, status.value, f"send {signal!r}")
        if actor.signal_room(signal) <= 0:
            raise UnknownSignalError(run_id, signal, actor.signals_wanted(), _why_unwanted(actor, signal))
        if actor.pending_signals() >= self._max_signals:
            raise SignalQueueFullError(run_id, signal, self._max_signals)
        if own_step:
            actor.post_signal(signal, data, dedupe_key)  # the run's own step is sending: apply after it
        else:
            actor.accept_signal(self._scheduler, signal, data, dedupe_key)
        version = actor.snapshot.version
        if actor.runnable():
            self._scheduler.schedule(actor)
        if self._ack and not own_step:  # a step cannot wait for its own commit
            await self._acknowledge(run_id, version)

    async def cancel(self, run_id: str) -> None:
        """Cancel a run: a suspended step is cancelled, and the run ends ``cancelled``.

        Cancellation is not failure: no compensation runs, no restart budget is
        used, nothing is dead-lettered. A run that is already compensating
        finishes compensating and ends ``failed``.

        Args:
            run_id: the run's id.

        Raises:
            RuntimeClosedError: the runtime is not running.
            RunNotFoundError: no such run.
            RunFinishedError: the run has finished.
            ConfigError: ``run_id`` is not a valid run id.
            DurabilityTimeoutError: under write-through or ``ack_tiers``, the run's
                final snapshot was not durable within ``ack_timeout`` (the cancel
                returns once the run has ended and that is durable).
        """
        self._check_open()
        if self._owner is not None and self._elsewhere("cancel.run_id", run_id):
            router = self._router
            assert router is not None  # noqa: S101 - set with the owner
            await router.forward("cancel", run_id, {})
            return
        await self._cancel_here(run_id)

    async def _cancel_here(self, run_id: str) -> None:
        """``cancel`` a run of a shard this process owns (or with ownership off)."""
        actor = self._actor("cancel.run_id", run_id)
        status = actor.snapshot.status
        if status in TERMINAL_STATUSES:
            raise RunFinishedError(run_id, status.value, "cancel")
        actor.post_cancel()
        if status is not Status.compensating:
            # A turn in another task can only be suspended inside a step: interrupt it.
            self._scheduler.interrupt(actor, "cancel")
        self._scheduler.schedule(actor)
        if self._ack and actor.host_task is not asyncio.current_task():  # a step cannot wait for its own run
            await self._settled(actor)
            await self._acknowledge(run_id, actor.snapshot.version)

    async def retry_dead_letter(self, run_id: str, *, from_step: int | str | None = None) -> RunHandle:
        """Run a dead-lettered run again, with a fresh retry budget.

        Its compensations have already run; by default it resumes at the step
        that failed, with the payload as the compensations left it.

        Args:
            run_id: the run's id.
            from_step: resume at this step index or name instead.

        Returns:
            The run's handle.

        Raises:
            RuntimeClosedError: the runtime is not running.
            RunNotFoundError: no dead letter for this run.
            ConfigError: ``from_step`` names no step, or ``run_id`` is not a valid run id.
            DurabilityTimeoutError: under write-through or ``ack_tiers``, the
                retried snapshot was not durable within ``ack_timeout``.
        """
        self._check_open()
        if self._owner is not None and self._elsewhere("retry_dead_letter.run_id", run_id):
            router = self._router
            assert router is not None  # noqa: S101 - set with the owner
            await router.forward("retry", run_id, {"from_step": from_step})
            return RunHandle(self, run_id, _token=_HANDLE_TOKEN)
        return await self._retry_here(run_id, from_step)

    async def _retry_here(self, run_id: str, from_step: int | str | None, *, detail: str | None = None) -> RunHandle:
        """``retry_dead_letter`` of a run of a shard this process owns (or with ownership off).

        ``detail``: the retry transition's detail (a forwarded retry's inbox entry).
        """
        actor = self._actor("retry_dead_letter.run_id", run_id)
        letter = self._supervisor.dead_letters.get(run_id)
        if letter is None:
            raise RunNotFoundError(run_id)
        steps = actor.workflow.steps
        if from_step is None:
            cursor = letter.error.step
        elif isinstance(from_step, str):
            cursor = actor.workflow.step_index(from_step)
        else:
            cursor = from_step
        given: object = cursor  # callers may ignore the type hints
        if isinstance(given, bool) or not isinstance(given, int) or not 0 <= cursor < len(steps):
            raise ConfigError("retry_dead_letter.from_step", from_step, f"must be a step of {actor.workflow!r}")
        del self._supervisor.dead_letters[run_id]
        self._tiers.mark_dead_letter_deleted(run_id)
        self._scheduler.restart(actor, cursor, detail)
        if self._ack:
            await self._acknowledge(run_id, actor.snapshot.version)
        return RunHandle(self, run_id, _token=_HANDLE_TOKEN)

    async def _acknowledge(self, run_id: str, version: int) -> None:
        """Return once ``version`` of ``run_id`` is durable in every acknowledging tier (group commit)."""
        for tier in self._ack:
            await self._tiers.wait_durable(run_id, version, tier=tier)

    async def _settled(self, actor: RunActor) -> None:
        """Wait until ``actor``'s run has ended (or the runtime closes)."""
        while actor.snapshot.status not in TERMINAL_STATUSES and self._lifecycle.state == "open" and not actor.evicted:
            if actor.waiters is None:
                actor.waiters = anyio.Event()
            await actor.waiters.wait()
