"""The parent's side of the ownership scenarios' worker processes (DESIGN.md "Several processes").

``WorkerProcess`` (start, call, signal, wait one worker of
``_owner_worker.py``), ``Cluster`` (workers on one SQLite file or PostgreSQL
schema and one Valkey prefix, each optionally behind ``TcpProxy``s the parent
cuts, the faults sent to them, their shard map) and ``LeaseWatch`` (the lease
table read every 50 ms: where each lease that lapsed ended). The scenarios
are in ``_scenarios.py``, their judge in ``_judge.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Final, TypeAlias

import anyio
import anyio.abc
import asyncpg
from anyio.streams.buffered import BufferedByteReceiveStream

from hotstate._bench._owner_worker import _LINE_LIMIT, WorkerConfig
from hotstate._bench._proxy import CutMode, TcpProxy, target_of, through
from hotstate.persistence._sqlite_authority import authority_path

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Collection, Sequence


__all__ = [
    "Cluster",
    "Fault",
    "LeaseWatch",
    "WorkerCallError",
    "WorkerGoneError",
    "WorkerProcess",
    "poll",
]


async def poll(check: Callable[[], Awaitable[bool]], *, timeout: float, every: float = 0.05) -> None:  # noqa: ASYNC109 - a hang guard
    """Poll ``check`` every ``every`` seconds until it is true.

    For state held in other processes (a worker's shard map, a row of the
    SQLite file): there is no event to wait on.

    Raises:
        TimeoutError: not true within ``timeout`` seconds.
    """
    with anyio.fail_after(timeout):
        while not await check():  # noqa: ASYNC110 - the state is in other processes: no event to wait on
            await anyio.sleep(every)


class WorkerGoneError(ConnectionError):
    """The worker did not answer: it is not running (or closed the connection mid-call)."""


class WorkerCallError(Exception):
    """The worker answered a command with an error.

    Attributes:
        type: the name of the exception type the worker raised.
        message: its text.
    """

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type = type_name
        self.message = message


class WorkerProcess:
    """The parent's handle on one worker: start it, send it commands, signal it.

    Args:
        config: the worker's configuration.
        log: the file its stderr goes to.
        namespace: run it in a pid namespace of its own (``unshare --pid``): to
            the other workers it is then a process on another host, whose lease
            is only ever waited out, never broken at its death.
    """

    def __init__(self, config: WorkerConfig, log: Path, *, namespace: bool = False) -> None:
        self.config = config
        self.log = log
        self.namespace = namespace
        self.port = 0
        self.pid = 0  # the worker's own pid (not unshare's)
        self.member = ""
        self.started_at = 0.0  # wall time it said hello
        self._process: anyio.abc.Process | None = None
        self._log_file: IO[bytes] | None = None

    def __repr__(self) -> str:
        return f"<WorkerProcess {self.config.name} pid={self.pid} member={self.member[:8]}>"

    def command(self) -> list[str]:
        """The command line that starts the worker."""
        cmd = [sys.executable, "-m", "hotstate._bench._owner_worker", self.config.to_json()]
        return ["unshare", "--pid", "--fork", "--kill-child", *cmd] if self.namespace else cmd

    async def start(self, timeout: float = 60.0) -> WorkerProcess:  # noqa: ASYNC109 - a hang guard
        """Start the worker and wait for its hello line (its runtime is open then).

        Raises:
            WorkerGoneError: it exited, or said nothing within ``timeout``.
        """
        self._log_file = self.log.open("ab")
        self._process = await anyio.open_process(
            self.command(), stdin=None, stdout=-1, stderr=self._log_file, start_new_session=True
        )
        stdout = self._process.stdout
        if stdout is None:  # pragma: no cover - stdout is a pipe
            raise WorkerGoneError("no stdout")
        try:
            with anyio.fail_after(timeout):
                line = await BufferedByteReceiveStream(stdout).receive_until(b"\n", 65536)
        except (anyio.EndOfStream, anyio.IncompleteRead, TimeoutError) as exc:
            await self.kill()
            raise WorkerGoneError(f"worker {self.config.name} did not start: {self.log_tail()}") from exc
        hello = json.loads(line)
        self.port, self.pid, self.member, self.started_at = hello["port"], hello["pid"], hello["member"], hello["t"]
        return self

    def log_tail(self, lines: int = 20) -> str:
        """The end of the worker's stderr."""
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    async def call(self, op: str, *, timeout: float = 60.0, **args: Any) -> Any:  # noqa: ASYNC109 - a hang guard
        """Send one command and return its result.

        Raises:
            WorkerCallError: the worker answered with an error (its type name and message).
            WorkerGoneError: no answer (not running, or it went away mid-call).
            TimeoutError: no answer within ``timeout``.
        """
        request = json.dumps({"op": op, **args}).encode() + b"\n"
        with anyio.fail_after(timeout):
            try:
                stream = await anyio.connect_tcp("127.0.0.1", self.port)
            except OSError as exc:
                raise WorkerGoneError(f"{self.config.name}: {exc}") from exc
            async with stream:
                try:
                    await stream.send(request)
                    line = await BufferedByteReceiveStream(stream).receive_until(b"\n", _LINE_LIMIT)
                except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError, OSError) as exc:
                    raise WorkerGoneError(f"{self.config.name} went away during {op}") from exc
        answer = json.loads(line)
        if "error" in answer:
            raise WorkerCallError(answer["error"], answer.get("message", ""))
        return answer["ok"]

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the worker itself (not to ``unshare``)."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)

    @property
    def running(self) -> bool:
        """Whether the process has not been reaped yet."""
        return self._process is not None and self._process.returncode is None

    async def wait(self, timeout: float = 30.0) -> int | None:  # noqa: ASYNC109 - a hang guard
        """Wait for the worker to exit; its return code (negative: the signal), None if it did not exit in time."""
        process = self._process
        if process is None:
            return None
        with anyio.move_on_after(timeout):
            code = await process.wait()
            await process.aclose()
            self._close_log()
            if self.namespace and code == 128 + signal.SIGKILL:
                return -signal.SIGKILL  # unshare passes its child's death on as an exit status
            if self.namespace and code > 128:
                return -(code - 128)
            return code
        return None

    async def terminate(self, timeout: float = 30.0) -> int | None:  # noqa: ASYNC109 - a hang guard
        """SIGTERM (graceful shutdown), then wait for the exit; its return code."""
        self.signal(signal.SIGTERM)
        return await self.wait(timeout)

    async def kill(self) -> None:
        """SIGCONT then SIGKILL the worker (and ``unshare``), and reap it: for cleanup."""
        process = self._process
        if process is None:
            return
        if self.pid:
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGKILL)
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            with anyio.CancelScope(shield=True), anyio.move_on_after(10):
                await process.wait()
        await process.aclose()
        self._close_log()

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


# ------------------------------------------------------------ several workers on one store


@dataclass(frozen=True, slots=True)
class Fault:
    """A signal the harness sent to a worker.

    Attributes:
        kind: ``"kill"`` (SIGKILL), ``"stop"`` (SIGSTOP, until ``until``), ``"term"`` (SIGTERM), ``"cut"``
            (cut from the durable store and lease authority, until ``until``), ``"cut-valkey"`` (from
            Valkey only) or ``"outage"`` (the durable store and lease authority down, until ``until``).
        name: the worker's name.
        pid: its pid.
        member: its member id.
        at: wall time the signal was sent.
        until: wall time of the SIGCONT (``"stop"`` only).
        local: the worker shared this host's pid namespace (its lease may be broken at its death).
    """

    kind: str
    name: str
    pid: int
    member: str
    at: float
    until: float | None = None
    local: bool = True


_HELD_LEASES: Final = "SELECT shard, owner, acquired_at, expires_at FROM hs_shard_lease WHERE owner IS NOT NULL"

LeaseRows: TypeAlias = "Callable[[], list[tuple[int, str, float, float]] | None]"
"""One read of the held leases (shard, owner, acquired_at, expires_at), or None when the authority did not answer."""


class PostgresLeases:
    """Reads a PostgreSQL authority's held leases, from one thread at a time (a loop and a connection of its own).

    Args:
        url: the server (directly, never through a worker's proxy).
        schema: the authority's schema.
    """

    def __init__(self, url: str, schema: str) -> None:
        self.url = url
        self.schema = schema
        self._loop = asyncio.new_event_loop()
        self._conn: asyncpg.Connection | None = None

    def __call__(self) -> list[tuple[int, str, float, float]] | None:
        try:
            return self._loop.run_until_complete(self._read())
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError):
            self._drop()
            return None

    async def _read(self) -> list[tuple[int, str, float, float]]:
        if self._conn is None:
            self._conn = await asyncpg.connect(self.url, timeout=1, server_settings={"search_path": self.schema})
        rows = await self._conn.fetch(_HELD_LEASES, timeout=1)
        return [(r["shard"], r["owner"], r["acquired_at"], r["expires_at"]) for r in rows]

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()

    def close(self) -> None:
        """Close the connection and the loop."""
        self._drop()
        for _ in range(3):  # a terminated connection's transport closes in a callback of the next iterations
            self._loop.run_until_complete(asyncio.sleep(0))
        self._loop.close()


async def open_transactions(url: str, ports: Collection[int]) -> int:
    """How many server sessions of the clients on ``ports`` (this host's side) have a transaction open."""
    if not ports:
        return 0
    conn = await asyncpg.connect(url, timeout=5)
    try:
        n: int = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE client_port = ANY($1::int[]) AND xact_start IS NOT NULL",
            sorted(ports),
        )
    finally:
        await conn.close()
    return n


class LeaseWatch:
    """Reads ``hs_shard_lease`` every ``every`` seconds on a thread: the last expiry seen of each lease.

    ``expiries[(shard, owner, acquired_at)]`` is the latest ``expires_at`` a
    read saw, in the authority's clock: where a lease that lapsed ended (a
    renewal landing between the last read and the lapse is missed: the check
    is then weaker, never wrong).
    """

    def __init__(self, db: Path | None = None, every: float = 0.05, *, rows: LeaseRows | None = None) -> None:
        self.db = db
        self.every = every
        self.expiries: dict[tuple[int, str, float], float] = {}
        self.reads = 0
        self._rows: LeaseRows = rows if rows is not None else self._sqlite_rows
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="lease-watch", daemon=True)

    def start(self) -> None:
        """Start reading."""
        self._thread.start()

    def stop(self) -> None:
        """Stop reading (one last read first, on the watch's thread: a reader may not share the caller's loop)."""
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(10)
        else:
            self._loop()

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self.read()
        self.read()
        close = getattr(self._rows, "close", None)
        if close is not None:
            close()

    def _sqlite_rows(self) -> list[tuple[int, str, float, float]] | None:
        if self.db is None or not self.db.exists():
            return None
        try:
            with contextlib.closing(sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=1)) as db:
                rows: list[tuple[int, str, float, float]] = db.execute(_HELD_LEASES).fetchall()
        except sqlite3.Error:
            return None
        return rows

    def read(self) -> None:
        """One read of the lease table."""
        rows = self._rows()
        if rows is None:
            return
        self.reads += 1
        for shard, owner, acquired, expires in rows:
            key = (shard, owner, acquired)
            if expires > self.expiries.get(key, -1.0):
                self.expiries[key] = expires


class Cluster:
    """Worker processes on one durable store (and one Valkey prefix), the faults sent to them, their shard map.

    The durable store is a SQLite file on this host (its lease authority a
    file beside it), or with ``postgres_url`` a PostgreSQL schema (tier and
    authority: "machines" that share nothing but the network). With
    ``proxied``, each worker reaches each server through a ``TcpProxy`` of its
    own (``proxies[name]["postgres" | "valkey"]``), which ``cut`` and ``heal``
    break and mend.

    Args:
        scratch: a folder for the database, the ledgers and the workers' logs.
        valkey_url: the Valkey server (None: the durable store is the only tier).
        prefix: the Valkey key prefix.
        postgres_url: the PostgreSQL server (None: SQLite).
        schema: the PostgreSQL schema.
        proxied: put a proxy between each worker and each server.
        overrides: ``WorkerConfig`` fields every worker gets.
    """

    def __init__(
        self,
        scratch: Path,
        *,
        valkey_url: str | None,
        prefix: str,
        postgres_url: str | None = None,
        schema: str = "hotstate",
        proxied: bool = False,
        **overrides: Any,
    ) -> None:
        self.scratch = scratch
        self.db = scratch / "runs.db"
        self.authority = Path(authority_path(self.db))  # the default authority's own file, beside the tier's
        if postgres_url is not None:
            overrides.setdefault("ack_tiers", ("postgres",))
        self.base = WorkerConfig(
            sqlite=str(self.db),
            valkey_url=valkey_url,
            prefix=prefix,
            postgres_url=postgres_url,
            schema=schema,
            **overrides,
        )
        self.workers: list[WorkerProcess] = []
        self.faults: list[Fault] = []
        self.owners: dict[int, str | None] = {}
        self.proxied = proxied
        self.proxies: dict[str, dict[str, TcpProxy]] = {}
        rows = PostgresLeases(postgres_url, schema) if postgres_url is not None else None
        self.watch = LeaseWatch(self.authority, rows=rows)
        self._out: set[str] = set()  # paused, leaving or dead: sent nothing

    async def __aenter__(self) -> Cluster:
        self.scratch.mkdir(parents=True, exist_ok=True)
        self.watch.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        with anyio.CancelScope(shield=True):
            for w in self.workers:
                await w.kill()
        for proxies in self.proxies.values():
            for proxy in proxies.values():
                proxy.close()
        self.watch.stop()

    def _proxied(self, name: str) -> dict[str, Any]:
        """The server URLs of worker ``name``: through new proxies of its own."""
        servers = {"valkey": ("valkey_url", self.base.valkey_url), "postgres": ("postgres_url", self.base.postgres_url)}
        out: dict[str, Any] = {}
        mine = self.proxies.setdefault(name, {})
        for server, (field, url) in servers.items():
            if url:
                mine[server] = proxy = TcpProxy(*target_of(url), name=f"{name}-{server}").start()
                out[field] = through(proxy, url)
        return out

    def cut(
        self, w: WorkerProcess, servers: Sequence[str] = ("postgres", "valkey"), mode: CutMode = "blackhole"
    ) -> float:
        """Cut ``w`` from ``servers`` (its proxies to them); the time of the cut. ``heal`` ends it."""
        at = time.time()
        for server in servers:
            self.proxies[w.config.name][server].cut(mode)
        return at

    async def cut_outside_a_transaction(
        self, w: WorkerProcess, servers: Sequence[str], mode: CutMode = "blackhole", tries: int = 40
    ) -> float:
        """Cut ``w`` from ``servers`` at a moment it has no PostgreSQL transaction open; the time of the cut.

        A client partitioned inside a transaction leaves it open on the
        server, with its row locks (a flush's ``FOR SHARE`` on fence rows, a
        renewal's lease rows), until the server notices the connection is
        dead: the new owner's seal waits behind it (see the test of that in
        tests/integration/test_partitions.py). The scenarios are about the
        lease and the fences, so a cut that caught one is healed at once
        (within milliseconds, well inside the lease) and tried again.

        Raises:
            RuntimeError: every try caught a transaction open.
        """
        url = self.base.postgres_url
        for _ in range(tries):
            at = self.cut(w, servers, mode)
            proxy = self.proxies[w.config.name].get("postgres")
            if url is None or proxy is None or "postgres" not in servers:
                return at
            await anyio.sleep(0.01)  # a statement the cut caught in flight reaches the server or not, now
            if not await open_transactions(url, proxy.upstream_ports()):
                return at
            for server in servers:
                self.proxies[w.config.name][server].heal()
            await anyio.sleep(0.03)
        raise RuntimeError(f"{w.config.name} had a PostgreSQL transaction open at each of {tries} cuts")

    def heal(self, w: WorkerProcess, cut_at: float, servers: Sequence[str] = ("postgres", "valkey")) -> Fault:
        """Mend ``w``'s links to ``servers`` (cut at ``cut_at``).

        The fault is a ``cut`` when the durable store (the lease authority) was
        among them, else a ``cut-valkey``: a worker that can renew keeps its
        shards, and the judge excuses nothing it ran twice.
        """
        for server in servers:
            self.proxies[w.config.name][server].heal()
        kind = "cut" if self.base.durable in servers else "cut-valkey"
        fault = Fault(kind, w.config.name, w.pid, w.member, cut_at, time.time(), local=not w.namespace)
        self.faults.append(fault)
        return fault

    @property
    def ledgers(self) -> list[Path]:
        """Every worker's ledger."""
        return [Path(w.config.ledger) for w in self.workers]

    async def start(self, name: str, *, namespace: bool = False, **overrides: Any) -> WorkerProcess:
        """Start a worker named ``name`` (its ledger and log are named after it)."""
        if self.proxied:
            overrides = {**self._proxied(name), **overrides}
        cfg = replace(self.base, name=name, ledger=str(self.scratch / f"ledger-{name}.jsonl"), **overrides)
        w = WorkerProcess(cfg, self.scratch / f"{name}.log", namespace=namespace)
        self.workers.append(w)
        await w.start()
        return w

    async def start_many(self, names: Sequence[str], *, fresh: bool = False, **overrides: Any) -> list[WorkerProcess]:
        """Start workers at the same moment (as ``uvicorn --workers N`` does).

        On a database file that does not exist yet, the first one starts alone
        unless ``fresh``: two processes creating one SQLite file at once race
        (``PRAGMA journal_mode = WAL`` fails with "database is locked" in one
        of them; see the test of that), and the scenarios are about ownership.
        """
        out: dict[str, WorkerProcess] = {}
        rest = list(names)
        if not fresh and not self.db.exists() and rest:
            first = rest.pop(0)
            out[first] = await self.start(first, **overrides)

        async def one(name: str) -> None:
            out[name] = await self.start(name, **overrides)

        async with anyio.create_task_group() as tg:
            for name in rest:
                tg.start_soon(one, name)
        return [out[n] for n in names]

    def live(self) -> list[WorkerProcess]:
        """Workers that run and may be sent calls (not paused, not leaving)."""
        return [w for w in self.workers if w.running and w.config.name not in self._out]

    def by_name(self, name: str) -> WorkerProcess:
        """The worker named ``name``."""
        return next(w for w in self.workers if w.config.name == name)

    async def kill(self, w: WorkerProcess) -> Fault:
        """SIGKILL ``w`` and reap it."""
        self._out.add(w.config.name)
        fault = Fault("kill", w.config.name, w.pid, w.member, time.time(), local=not w.namespace)
        w.signal(signal.SIGKILL)
        self.faults.append(fault)
        await w.wait()
        return fault

    def pause(self, w: WorkerProcess) -> float:
        """SIGSTOP ``w``; the time sent."""
        self._out.add(w.config.name)
        at = time.time()
        w.signal(signal.SIGSTOP)
        return at

    def resume(self, w: WorkerProcess, stopped_at: float) -> Fault:
        """SIGCONT ``w`` (stopped at ``stopped_at``); it may be sent calls again."""
        w.signal(signal.SIGCONT)
        fault = Fault("stop", w.config.name, w.pid, w.member, stopped_at, time.time(), local=not w.namespace)
        self.faults.append(fault)
        self._out.discard(w.config.name)
        return fault

    def outage(self, at: float, until: float) -> list[Fault]:
        """Record that the durable store (the lease authority) was down from ``at`` to ``until``: a fault of every running worker."""
        faults = [
            Fault("outage", w.config.name, w.pid, w.member, at, until, local=not w.namespace)
            for w in self.workers
            if w.running
        ]
        self.faults.extend(faults)
        return faults

    async def terminate(self, w: WorkerProcess, timeout: float = 30.0) -> int | None:  # noqa: ASYNC109 - a hang guard
        """SIGTERM ``w`` (graceful: it hands its shards off) and wait; its exit code."""
        self._out.add(w.config.name)
        self.faults.append(Fault("term", w.config.name, w.pid, w.member, time.time(), local=not w.namespace))
        return await w.terminate(timeout)

    async def terminate_all(self) -> dict[str, int | None]:
        """Gracefully stop every running worker, at once; their exit codes."""
        codes: dict[str, int | None] = {}

        async def one(w: WorkerProcess) -> None:
            codes[w.config.name] = await self.terminate(w)

        async with anyio.create_task_group() as tg:
            for w in self.workers:
                if w.running:
                    tg.start_soon(one, w)
        return codes

    async def stats(self, w: WorkerProcess) -> dict[str, Any] | None:
        """``w``'s statistics, or None when it does not answer."""
        try:
            out: dict[str, Any] = await w.call("stats", timeout=5)
        except (WorkerGoneError, WorkerCallError, TimeoutError):
            return None
        return out

    async def refresh_owners(self) -> None:
        """Read the shard map from a live worker."""
        for w in self.live():
            s = await self.stats(w)
            if s is not None and "leases" in s:
                self.owners = {int(k): v[0] for k, v in s["leases"].items()}
                for k in s["owned"]:
                    self.owners[int(k)] = s["member"]
                return

    async def owned(self) -> dict[str, set[int]]:
        """Per live worker's name, the shards it owns (and is not handing off) now."""
        out: dict[str, set[int]] = {}
        for w in self.live():
            s = await self.stats(w)
            if s is not None:
                out[w.config.name] = {int(k) for k in s.get("owned", {})} - set(s.get("draining", ()))
        return out

    async def wait_balanced(self, timeout: float = 20.0, *, each: int = 1) -> None:  # noqa: ASYNC109 - a hang guard
        """Poll until every shard is owned by exactly one live worker and each live worker owns ``each`` or more."""

        async def balanced() -> bool:
            owned = await self.owned()
            counts = Counter(s for held in owned.values() for s in held)
            return (
                bool(owned)
                and len(counts) == self.base.shards
                and max(counts.values()) == 1
                and min(len(v) for v in owned.values()) >= each
            )

        await poll(balanced, timeout=timeout)

    async def wait_settled(self, quiet: float, timeout: float = 60.0) -> None:  # noqa: ASYNC109 - a hang guard
        """Poll until every shard is owned once by a live worker and no claim or hand-off happened for ``quiet`` s.

        Placement moves ``moves_per_round`` shards per round, so a worker can
        own shards long before the map has settled; a measurement taken
        meanwhile would time hand-offs (drains, loads), not steps.
        """
        last: tuple[int, ...] = ()
        since = time.monotonic()

        async def settled() -> bool:
            nonlocal last, since
            stats = [await self.stats(w) for w in self.live()]
            moves = tuple(s["claims"] + s["handoffs"] + s["losses"] if s else -1 for s in stats)
            now = time.monotonic()
            if moves != last:
                last, since = moves, now
                return False
            owned = Counter(int(k) for s in stats if s for k in s["owned"])
            return len(owned) == self.base.shards and max(owned.values()) == 1 and now - since >= quiet

        await poll(settled, timeout=timeout, every=0.2)

    async def wait_owns(self, w: WorkerProcess, n: int = 1, timeout: float = 20.0) -> None:  # noqa: ASYNC109
        """Poll until ``w`` owns at least ``n`` shards."""

        async def owns() -> bool:
            s = await self.stats(w)
            return s is not None and len(s.get("owned", {})) >= n

        await poll(owns, timeout=timeout)
