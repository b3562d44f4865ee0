"""The ownership scenarios: traffic sent through non-owners while faults hit the owners, then the judge.

design/ownership.md §5 on one host: worker processes (``_owner_worker.py``)
share one SQLite file (durable tier and lease authority) and one
valkey-server; a driver sends spawns, signals and cancels to them, mostly
through workers that do not own the run's shard; faults are SIGKILL, SIGSTOP
past the lease, and SIGTERM (a graceful hand-off). As on several machines,
the workers share a PostgreSQL schema (durable tier and ``PostgresAuthority``)
instead, each behind TCP proxies of its own: faults are then also partitions
(``cut``: from PostgreSQL, or from both servers), cuts from Valkey alone
(``cut-valkey``), a PostgreSQL crash and restart (``outage``, a fault of
every worker) and a Valkey Cluster failover. Each ``scenario_*`` runs its
faults on a ``Cluster`` (``_cluster.py``) under ``Traffic``, completes every
run, stops the workers and returns the ``Report`` of ``judge``
(``_judge.py``, where the invariants are listed).
"""

from __future__ import annotations

import contextlib
import functools
import random
import signal
import sqlite3
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import anyio

from hotstate._bench._cluster import Cluster, WorkerCallError, WorkerGoneError, WorkerProcess, poll
from hotstate._bench._judge import Report, judge
from hotstate._bench._readers import ended_runs, wait_ended
from hotstate._errors import StoreUnavailableError
from hotstate.persistence import shard_of

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from pathlib import Path

    from hotstate._bench._proxy import CutMode
    from hotstate.persistence import EmbeddedValkeyCluster
    from hotstate.persistence._postgres_server import EmbeddedPostgres

__all__ = [
    "Traffic",
    "scenario_asymmetric",
    "scenario_forwarding",
    "scenario_partition",
    "scenario_postgres_restart",
    "scenario_rolling",
    "scenario_scale",
    "scenario_sigkill",
    "scenario_sigstop",
    "scenario_together",
    "scenario_valkey_failover",
]

_UNKNOWN_OUTCOME: Final = ("RuntimeClosedError", "DurabilityTimeoutError", "StoreUnavailableError")


# ------------------------------------------------------------------ the driver


@dataclass
class Traffic:
    """Spawns, signals and cancels sent to a cluster, mostly through workers not owning the run's shard.

    Every call's outcome is kept: acknowledged (the call returned), refused
    (a typed error: not applied), or unknown (the worker went away or did not
    answer in time: it may have been applied). Runs of ``signalled`` get
    ``waits`` acknowledged signals each, runs of ``held`` one acknowledged
    cancel; ``complete`` drives every run to that point and waits for the end.
    """

    cluster: Cluster
    tag: str = "r"
    seed: int = 0
    rng: random.Random = field(init=False)
    runs: dict[str, str] = field(default_factory=dict)  # run id -> workflow, acknowledged spawns
    created: Counter[str] = field(default_factory=Counter)  # run id -> calls answering created=True
    need_signals: dict[str, int] = field(default_factory=dict)  # signals still to acknowledge (reserved in flight)
    same_ids: list[str] = field(default_factory=list)  # ids spawned by several workers at once
    spawn_unknown: set[str] = field(default_factory=set)  # ids with a spawn call of unknown outcome
    sent: dict[str, str] = field(default_factory=dict)  # signal id -> run id, every attempt
    refused: dict[str, str] = field(default_factory=dict)  # signal id -> the typed error its call raised
    acked: dict[str, str] = field(default_factory=dict)  # signal id -> run id, acknowledged
    to_cancel: set[str] = field(default_factory=set)
    cancelled: set[str] = field(default_factory=set)  # acknowledged cancels
    outcomes: Counter[str] = field(default_factory=Counter)  # "op:result" -> count
    errors: list[tuple[float, str, str, str, str]] = field(default_factory=list)  # (t, op, run, worker, error)
    calls: int = 0
    via_non_owner: int = 0
    _n: int = 0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    @property
    def waits(self) -> int:
        """Signals a ``signalled`` run takes."""
        return self.cluster.base.waits

    def _pick(self, run_id: str, avoid: str = "") -> WorkerProcess | None:
        live = self.cluster.live()
        if not live:
            return None
        owner = self.cluster.owners.get(shard_of(run_id, self.cluster.base.shards))
        others = [w for w in live if w.member != owner and w.member != avoid]
        w = self.rng.choice(others or live)
        self.via_non_owner += w.member != owner
        return w

    async def call(self, op: str, run_id: str, *, avoid: str = "", **args: Any) -> tuple[str, Any]:
        """One call through a (preferably non-owning) worker: ``("ok", result)``, ``("refused", type)`` or ``("unknown", why)``."""
        w = self._pick(run_id, avoid)
        if w is None:
            await anyio.sleep(0.05)
            return "unknown", "no live worker"
        self.calls += 1
        try:
            result = await w.call(op, run_id=run_id, timeout=30, **args)
        except WorkerCallError as exc:
            # Errors that say nothing happened, versus a worker shutting down mid-call, or a store
            # that did not answer: its commit may still land (a partition that heals delivers a
            # COMMIT late), and Router.forward raises StoreUnavailableError even after its inbox
            # entry is durable (the xfail test in tests/integration/test_partitions.py).
            kind = "unknown" if exc.type in _UNKNOWN_OUTCOME else "refused"
            self.outcomes[f"{op}:{exc.type}"] += 1
            self.errors.append((time.time(), op, run_id, w.config.name, str(exc)))
            return kind, exc.type
        except (WorkerGoneError, TimeoutError) as exc:
            self.outcomes[f"{op}:{type(exc).__name__}"] += 1
            self.errors.append((time.time(), op, run_id, w.config.name, repr(exc)))
            return "unknown", type(exc).__name__
        self.outcomes[f"{op}:ok"] += 1
        return "ok", result

    async def spawn(self, workflow: str) -> str:
        """Spawn a new run (an id of the driver's) until acknowledged; its id."""
        self._n += 1
        run_id = f"{self.tag}-{self._n}"
        while True:
            kind, result = await self.call("spawn", run_id, workflow=workflow, payload={})
            if kind == "ok":
                self.created[run_id] += bool(result["created"])
                self._track(run_id, workflow)
                return run_id
            if kind == "unknown":
                self.spawn_unknown.add(run_id)
            await anyio.sleep(0.05)  # the same id again: spawn is idempotent on it

    def _track(self, run_id: str, workflow: str) -> None:
        if run_id in self.runs:
            return
        self.runs[run_id] = workflow
        if workflow == "signalled":
            self.need_signals[run_id] = self.waits
        elif workflow == "held":
            self.to_cancel.add(run_id)

    async def signal_one(self, run_id: str) -> None:
        """Send ``run_id`` one signal with a fresh id (its slot is reserved while in flight)."""
        self.need_signals[run_id] -= 1
        sid = f"{run_id}/{uuid.uuid4().hex[:10]}"
        self.sent[sid] = run_id
        kind, result = await self.call("send", run_id, signal="sig", data={"id": sid})
        if kind == "ok":
            self.acked[sid] = run_id
            return
        if kind == "refused":
            self.refused[sid] = str(result)
        if result in ("UnknownSignalError", "RunFinishedError") or (
            result == "RunNotFoundError" and await self.ended(run_id)
        ):
            self.need_signals[run_id] = 0  # an earlier call of unknown outcome landed: every wait is served
            return
        self.need_signals[run_id] += 1

    async def cancel_one(self, run_id: str) -> None:
        """Cancel ``run_id`` once."""
        self.to_cancel.discard(run_id)
        kind, result = await self.call("cancel", run_id)
        if kind == "ok":
            self.cancelled.add(run_id)
            return
        if result == "RunFinishedError" or (result == "RunNotFoundError" and await self.ended(run_id)):
            return  # an earlier call of unknown outcome landed (a finished run is not loaded by a new owner)
        self.to_cancel.add(run_id)

    async def ended(self, run_id: str) -> bool:
        """Whether ``run_id`` is stored finished in the SQLite file."""
        return run_id in await ended_runs(self.cluster)

    async def same_id_spawns(self, n: int = 2) -> str:
        """``n`` workers spawn one new id at the same moment (none of them its owner, where possible)."""
        self._n += 1
        run_id = f"{self.tag}-{self._n}"
        self.same_ids.append(run_id)
        async with anyio.create_task_group() as tg:
            for _ in range(n):
                tg.start_soon(self._spawn_id, run_id)
        return run_id

    async def _spawn_id(self, run_id: str) -> None:
        while True:
            kind, result = await self.call("spawn", run_id, workflow="plain", payload={})
            if kind == "ok":
                self.created[run_id] += bool(result["created"])
                self._track(run_id, "plain")
                return
            if kind == "unknown":
                self.spawn_unknown.add(run_id)
            await anyio.sleep(0.05)

    async def step(self) -> None:
        """One action: serve a run that needs a signal or a cancel, else spawn a new run."""
        needy = [r for r, n in self.need_signals.items() if n > 0]
        roll = self.rng.random()
        if needy and roll < 0.5:
            await self.signal_one(self.rng.choice(needy))
        elif self.to_cancel and roll < 0.65:
            await self.cancel_one(self.rng.choice(sorted(self.to_cancel)))
        else:
            await self.spawn(self.rng.choice(("plain", "signalled", "signalled", "held")))

    async def run(self, stop: anyio.Event, *, concurrency: int = 3, pace: float = 0.05) -> None:
        """Act until ``stop`` is set: ``concurrency`` loops, each pausing up to ``pace`` s between calls."""

        async def loop() -> None:
            while not stop.is_set():
                await self.step()
                await anyio.sleep(self.rng.uniform(0, pace))

        async def owners() -> None:
            while not stop.is_set():
                await self.cluster.refresh_owners()
                await anyio.sleep(0.2)

        async with anyio.create_task_group() as tg:
            tg.start_soon(owners)
            for _ in range(concurrency):
                tg.start_soon(loop)

    async def complete(self, timeout: float = 60.0) -> None:  # noqa: ASYNC109 - a hang guard
        """Give every run what it waits for (signals, cancels), then poll SQLite until every run has ended.

        Raises:
            TimeoutError: not within ``timeout``; the message names the runs still open.
        """
        with anyio.move_on_after(timeout):
            await self.cluster.refresh_owners()
            while any(n > 0 for n in self.need_signals.values()) or self.to_cancel:
                async with anyio.create_task_group() as tg:
                    for r, n in list(self.need_signals.items()):
                        if n > 0:
                            tg.start_soon(self.signal_one, r)
                    for r in sorted(self.to_cancel):
                        tg.start_soon(self.cancel_one, r)
                await self.cluster.refresh_owners()
            await wait_ended(self.cluster, self.runs, timeout)
            return
        needy = {r: n for r, n in self.need_signals.items() if n > 0}
        open_runs = sorted(set(self.runs) - await ended_runs(self.cluster))
        raise TimeoutError(
            f"runs not finished after {timeout:g} s: {open_runs[:10]} ({len(open_runs)});"
            f" signals still needed {needy}; cancels still needed {sorted(self.to_cancel)}; calls {dict(self.outcomes)}"
        )


# ------------------------------------------------------------------ scenarios


async def _drive(traffic: Traffic, body: Callable[[], Awaitable[None]], *, warmup: int = 8) -> None:
    """Send traffic while ``body`` (the faults) runs, from once ``warmup`` runs exist; then complete every run."""
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(traffic.run, stop)
        try:
            await _more_runs(traffic, warmup - len(traffic.runs))
            await body()
        finally:
            stop.set()
    await traffic.complete()


async def _more_runs(traffic: Traffic, n: int, timeout: float = 60.0) -> None:  # noqa: ASYNC109 - a hang guard
    """Poll until the traffic has spawned ``n`` more runs (it goes on while faults settle)."""
    goal = len(traffic.runs) + n

    async def spawned() -> bool:
        return len(traffic.runs) >= goal

    await poll(spawned, timeout=timeout, every=0.02)


async def _finish(cluster: Cluster, traffic: Traffic, scenario: str, started: float) -> Report:
    """Stop every worker gracefully (exit 0 expected, no internal error logged) and judge."""
    errors = {w.config.name: s["internal_errors"] for w in cluster.live() if (s := await cluster.stats(w))}
    codes = await cluster.terminate_all()
    report = await judge(cluster, traffic, scenario=scenario, started=started)
    report.violations.extend(f"{name} exited {code} after SIGTERM" for name, code in codes.items() if code != 0)
    report.violations.extend(
        f"{name}: {n} internal error(s) in the runtime's machinery (see its log)" for name, n in errors.items() if n
    )
    return report


async def _busiest(cluster: Cluster) -> tuple[WorkerProcess, set[int]]:
    """The live worker owning the most shards, and its shards."""
    owned = await cluster.owned()
    name = max(sorted(owned), key=lambda n: len(owned[n]))
    return cluster.by_name(name), owned[name]


async def scenario_sigkill(cluster: Cluster, *, seed: int = 0, namespace: bool = False) -> Report:
    """(a) SIGKILL of an owner among 3: its shards are taken over, every run finishes, duplicates only at the kill.

    ``namespace``: the victim runs in a pid namespace of its own (another
    host to the others), so its lease is waited out instead of broken.
    """
    started = time.time()
    await cluster.start_many(["k0", "k1"])
    victim = await cluster.start("k2", namespace=namespace)
    await cluster.wait_balanced()
    traffic = Traffic(cluster, tag=f"kill{seed}", seed=seed)

    async def body() -> None:
        await cluster.kill(victim)
        await cluster.wait_balanced(timeout=cluster.base.ttl * 3 + 10)
        await _more_runs(traffic, 6)

    await _drive(traffic, body, warmup=12)
    return await _finish(cluster, traffic, "sigkill" + ("-other-host" if namespace else ""), started)


def _write_lock_free(db: Path) -> bool:
    """Whether another connection can take the SQLite file's write lock within 0.5 s (a live writer's is ms)."""
    with contextlib.closing(sqlite3.connect(db, isolation_level=None, timeout=0.5)) as c:
        try:
            c.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError:
            return False
        c.execute("ROLLBACK")
        return True


async def _pause_outside_a_write(cluster: Cluster, w: WorkerProcess, tries: int = 20) -> float:
    """SIGSTOP ``w`` at a moment it holds no write lock on the SQLite file; the time it stopped.

    A process paused inside a write transaction of the shared file (a flush, a
    renewal, a claim) holds the lock every other process needs to renew: they
    all drop their shards at their deadline and nothing is claimed until it
    resumes (safety holds, the cluster stalls: see the lapsed-lease test). The
    scenario is one owner paused, so a pause that caught ``w`` mid-write is
    undone (SIGCONT within 0.5 s, well inside its lease) and tried again.

    Raises:
        RuntimeError: ``w`` held the lock at every try.
    """
    for _ in range(tries):
        at = cluster.pause(w)
        free = await anyio.to_thread.run_sync(_write_lock_free, cluster.db)
        if free and await anyio.to_thread.run_sync(_write_lock_free, cluster.authority):
            return at
        w.signal(signal.SIGCONT)
        await anyio.sleep(0.05)
    raise RuntimeError(f"{w.config.name} held the SQLite write lock at each of {tries} pauses")


async def scenario_sigstop(cluster: Cluster, *, seed: int = 0) -> Report:
    """(c) SIGSTOP of an owner past its lease, then SIGCONT: its shards move; it evicts and rejoins."""
    started = time.time()
    await cluster.start_many(["p0", "p1", "p2"])
    await cluster.wait_balanced()
    traffic = Traffic(cluster, tag=f"stop{seed}", seed=seed)
    ttl = cluster.base.ttl

    async def body() -> None:
        victim, held = await _busiest(cluster)
        before = await cluster.stats(victim)
        gone = before["losses"] + before["handoffs"] if before else 0
        stopped = await _pause_outside_a_write(cluster, victim)

        async def taken() -> bool:  # another worker owns each of its shards
            return not held - set().union(*(await cluster.owned()).values())

        async def rejoined() -> bool:  # it let go of what it held (lost or handed off), and owns shards again
            s = await cluster.stats(victim)
            return s is not None and s["losses"] + s["handoffs"] >= gone + len(held) and bool(s["owned"])

        await poll(taken, timeout=ttl * 4 + 10)
        await anyio.sleep(max(0.0, stopped + 1.5 * ttl - time.time()))  # the fault: a pause of 1.5 ttl at least
        cluster.resume(victim, stopped)
        await poll(rejoined, timeout=ttl * 4 + 20)
        await _more_runs(traffic, 6)

    await _drive(traffic, body, warmup=12)
    return await _finish(cluster, traffic, "sigstop", started)


async def scenario_rolling(cluster: Cluster, *, cycles: int = 3, seed: int = 0) -> Report:
    """(b) Rolling deploy: start a new worker, SIGTERM the oldest, ``cycles`` times, under traffic: no duplicate."""
    started = time.time()
    await cluster.start_many(["d0", "d1"])
    await cluster.wait_balanced()
    traffic = Traffic(cluster, tag=f"roll{seed}", seed=seed)

    async def body() -> None:
        for i in range(cycles):
            await cluster.start(f"d{i + 2}")
            await cluster.terminate(cluster.live()[0])
            await cluster.wait_balanced()
            await _more_runs(traffic, 3)

    await _drive(traffic, body)
    return await _finish(cluster, traffic, "rolling", started)


async def scenario_forwarding(cluster: Cluster, *, runs: int = 30, same_id: int = 4, seed: int = 0) -> Report:
    """(d) Spawns, signals and cancels through non-owners (and one id spawned by two at once): each once."""
    started = time.time()
    await cluster.start_many(["f0", "f1", "f2"])
    await cluster.wait_balanced()
    traffic = Traffic(cluster, tag=f"fwd{seed}", seed=seed)

    async def body() -> None:
        for _ in range(same_id):
            await traffic.same_id_spawns(2)
        await _more_runs(traffic, runs)

    await _drive(traffic, body)
    return await _finish(cluster, traffic, "forwarding", started)


async def scenario_together(cluster: Cluster, *, parked: int = 16, seed: int = 0) -> Report:
    """(e) Two workers started at the same moment on one store holding unfinished runs (``uvicorn --workers 2``).

    A first worker parks runs waiting for signals and cancels and stops
    gracefully; two workers then start together with ``recover=True``: they
    split the shards, resume each parked run once, and serve every call.
    """
    started = time.time()
    traffic = Traffic(cluster, tag=f"two{seed}", seed=seed)
    first = await cluster.start("e0")
    for i in range(parked):
        await traffic.spawn(("signalled", "held", "plain")[i % 3])
    await cluster.terminate(first)
    await cluster.start_many(["e1", "e2"])
    await cluster.wait_balanced()

    async def body() -> None:
        await _more_runs(traffic, 8)

    await _drive(traffic, body, warmup=0)
    return await _finish(cluster, traffic, "together", started)


async def scenario_scale(cluster: Cluster, *, seed: int = 0) -> Report:
    """Scale 1 -> 3 -> 1 under traffic: shards move by graceful hand-offs only, nothing runs twice."""
    started = time.time()
    await cluster.start("s0")
    traffic = Traffic(cluster, tag=f"scale{seed}", seed=seed)

    async def body() -> None:
        a, b = await cluster.start_many(["s1", "s2"])
        await cluster.wait_balanced(each=2)
        await _more_runs(traffic, 4)
        await cluster.terminate(a)
        await cluster.terminate(b)
        await cluster.wait_balanced()
        await _more_runs(traffic, 4)

    await _drive(traffic, body)
    return await _finish(cluster, traffic, "scale 1-3-1", started)


# ------------------------------------------------------------------ several machines (PostgreSQL authority)


async def _taken_from(cluster: Cluster, victim: WorkerProcess, held: set[int]) -> bool:
    """Whether live workers other than ``victim`` own every shard of ``held``."""
    owned = await cluster.owned()
    others = set().union(*(v for name, v in owned.items() if name != victim.config.name))
    return held <= others


async def _rejoined(cluster: Cluster, victim: WorkerProcess, gone: int, held: set[int]) -> bool:
    """Whether ``victim`` let go of ``held`` (lost or handed off, on top of ``gone`` before) and owns shards again."""
    s = await cluster.stats(victim)
    return s is not None and s["losses"] + s["handoffs"] >= gone + len(held) and bool(s["owned"])


def _let_go(stats: dict[str, Any] | None) -> int:
    return stats["losses"] + stats["handoffs"] if stats else 0


async def scenario_partition(
    cluster: Cluster, *, seed: int = 0, mode: CutMode = "blackhole", hold: float | None = None, anywhere: bool = False
) -> Report:
    """(S3) An owner cut from PostgreSQL and Valkey for ``hold`` (2 ttl) under traffic, then healed.

    It stops its shards at its deadline (``_check_self_fence``), the others
    take them once its lease ends, nothing it ran after the takeover is in
    any store (``_zombies``), and after the heal it rejoins. The cluster
    must be ``proxied`` on PostgreSQL. Unless ``anywhere``, the cut comes at a
    moment the owner has no PostgreSQL transaction open
    (``Cluster.cut_outside_a_transaction`` says why).
    """
    started = time.time()
    await cluster.start_many(["n0", "n1", "n2"])
    await cluster.wait_balanced()
    traffic = Traffic(cluster, tag=f"cut{seed}", seed=seed)
    ttl = cluster.base.ttl
    hold = 2 * ttl if hold is None else hold

    async def body() -> None:
        victim, held = await _busiest(cluster)
        gone = _let_go(await cluster.stats(victim))
        both = ("postgres", "valkey")
        at = (
            cluster.cut(victim, both, mode) if anywhere else await cluster.cut_outside_a_transaction(victim, both, mode)
        )
        await poll(functools.partial(_taken_from, cluster, victim, held), timeout=ttl * 4 + 10)
        await anyio.sleep(max(0.0, at + hold - time.time()))
        cluster.heal(victim, at, ("postgres", "valkey"))
        await poll(functools.partial(_rejoined, cluster, victim, gone, held), timeout=ttl * 4 + 20)
        await _more_runs(traffic, 6)

    await _drive(traffic, body, warmup=12)
    return await _finish(cluster, traffic, f"partition ({mode})", started)


async def scenario_asymmetric(
    cluster: Cluster, *, seed: int = 0, mode: CutMode = "blackhole", hold: float | None = None, anywhere: bool = False
) -> Report:
    """(S4) At once, under traffic: one owner cut from PostgreSQL only, another from Valkey only, for ``hold`` (2 ttl).

    The first cannot renew: it stops at its deadline, the others take its
    shards and seal Valkey, where it can still write until then (the fence
    refuses it after). The second keeps its lease and every shard: its
    Valkey flushes fail and are retried, and after the heal every tier
    holds every run (``Report.notes``: its losses and Valkey flush failures).
    ``anywhere`` as in ``scenario_partition``.
    """
    started = time.time()
    await cluster.start_many(["m0", "m1", "m2"])
    await cluster.wait_balanced()
    traffic = Traffic(cluster, tag=f"asym{seed}", seed=seed)
    ttl = cluster.base.ttl
    hold = 2 * ttl if hold is None else hold
    report_notes: dict[str, float] = {}

    async def body() -> None:
        pg_cut, held = await _busiest(cluster)
        vk_cut = next(w for w in cluster.live() if w is not pg_cut)
        gone = _let_go(await cluster.stats(pg_cut))
        before = await cluster.stats(vk_cut) or {}
        pg = ("postgres",)
        at = cluster.cut(pg_cut, pg, mode) if anywhere else await cluster.cut_outside_a_transaction(pg_cut, pg, mode)
        cluster.cut(vk_cut, ("valkey",), mode)
        await poll(functools.partial(_taken_from, cluster, pg_cut, held), timeout=ttl * 4 + 10)
        await anyio.sleep(max(0.0, at + hold - time.time()))
        during = await cluster.stats(vk_cut) or {}
        cluster.heal(pg_cut, at, ("postgres",))
        cluster.heal(vk_cut, at, ("valkey",))
        await poll(functools.partial(_rejoined, cluster, pg_cut, gone, held), timeout=ttl * 4 + 20)
        await _more_runs(traffic, 6)
        after = await cluster.stats(vk_cut) or {}
        report_notes["valkey_cut_losses"] = after.get("losses", -1) - before.get("losses", 0)
        report_notes["valkey_cut_failures"] = during.get("tiers", {}).get("valkey", {}).get("failures", 0) - before.get(
            "tiers", {}
        ).get("valkey", {}).get("failures", 0)
        report_notes["valkey_cut_pending_at_heal"] = (
            during.get("tiers", {}).get("valkey", {}).get("pending_snapshots", 0)
        )

    await _drive(traffic, body, warmup=12)
    report = await _finish(cluster, traffic, f"asymmetric ({mode})", started)
    report.notes.update(report_notes)
    if report_notes.get("valkey_cut_losses", 0) != 0:
        report.violations.append(f"the worker cut from Valkey only lost {report_notes['valkey_cut_losses']} shards")
    return report


async def scenario_postgres_restart(
    cluster: Cluster, server: EmbeddedPostgres, *, seed: int = 0, down: float = 0.0
) -> Report:
    """(S7) PostgreSQL crashes (``crash``: no checkpoint) under traffic and starts again after ``down`` s, same port.

    Every worker loses the authority and the durable tier at once; each
    stops its shards at its deadline when the restart outlasts it, takes them
    back (or another does) once the server answers, and every run finishes
    with nothing acknowledged lost. The outage is a fault of every worker
    (duplicates are judged as for a cut).
    """
    started = time.time()
    await cluster.start_many(["r0", "r1", "r2"])
    await cluster.wait_balanced()
    traffic = Traffic(cluster, tag=f"pgr{seed}", seed=seed)
    ttl = cluster.base.ttl

    async def body() -> None:
        at = time.time()
        await anyio.to_thread.run_sync(server.crash)
        await anyio.sleep(down)
        await anyio.to_thread.run_sync(server.start)
        cluster.outage(at, time.time())
        await cluster.wait_balanced(timeout=ttl * 4 + 20)
        await _more_runs(traffic, 8)

    await _drive(traffic, body, warmup=12)
    return await _finish(cluster, traffic, f"postgres restart (down {down:g} s)", started)


async def _valkey_heads(cluster: Cluster) -> dict[str, tuple[int, int]]:
    """``run -> (epoch, version)`` of every run the Valkey tier holds now (headers only; {} while it fails)."""
    store = cluster.base.stores()[0]
    out: dict[str, tuple[int, int]] = {}
    try:
        async with store:
            after: str | None = None
            while True:
                page = await store.scan(after=after, limit=1000)
                out.update((h.run_id, (h.epoch, h.version)) for h in page)
                if len(page) < 1000:
                    return out
                after = page[-1].run_id
    except StoreUnavailableError:
        return {}


async def scenario_valkey_failover(
    cluster: Cluster, valkey: EmbeddedValkeyCluster, *, seed: int = 0, killed: int = 1
) -> Report:
    """(S8) A Valkey Cluster primary SIGKILLed under traffic, its replica promoted; acknowledgements wait for PostgreSQL.

    Just before the kill the Valkey tier's copies are read (the rows Valkey
    had acknowledged); after the promotion, those the new primary lacks or
    holds older are what the failover lost (``Report.notes``:
    ``valkey_rows_lost`` of ``valkey_rows_read``). The judge then checks
    that PostgreSQL and the fences kept that loss from becoming a lost
    acknowledgement, a double execution or a stale copy that wins.
    ``killed`` is a primary's index, not the node whose URL the cluster
    was given (the judge reads through it).
    """
    started = time.time()
    await cluster.start_many(["v0", "v1", "v2"])
    await cluster.wait_balanced()
    traffic = Traffic(cluster, tag=f"vkf{seed}", seed=seed)
    notes: dict[str, float] = {}

    async def body() -> None:
        before = await _valkey_heads(cluster)
        at = time.time()
        await anyio.to_thread.run_sync(valkey.kill, killed)
        await anyio.to_thread.run_sync(valkey.wait_promoted, killed)
        notes["failover_s"] = time.time() - at
        after = await _valkey_heads(cluster)
        lost = [r for r, head in before.items() if after.get(r, (0, 0)) < head]
        notes["valkey_rows_read"] = len(before)
        notes["valkey_rows_lost"] = len(lost)
        await _more_runs(traffic, 8)

    await _drive(traffic, body, warmup=16)
    report = await _finish(cluster, traffic, "valkey failover", started)
    report.notes.update(notes)
    return report
