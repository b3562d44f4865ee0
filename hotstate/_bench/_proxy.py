"""A TCP proxy the multi-machine scenarios cut: the network between one worker and one server.

design/ownership.md §5.1, partition option 1 (portable, loopback only, no
root): each worker reaches PostgreSQL and Valkey through proxies of its own,
one per (worker, server) pair, so a test can cut it from one server, the
other, or both. Two ways to cut:

- ``reset``: every open connection is reset (RST), and each new one is reset
  as soon as it is accepted: the peer learns at once (a server that died);
- ``blackhole``: nothing moves any more, but every socket stays open: open
  connections stop forwarding (what was sent waits in the proxy and the
  kernel's buffers) and new ones are accepted and held unconnected. Clients
  hang until their own timeouts, as in a real partition. ``heal`` then lets
  the held bytes through, as TCP retransmission would after a short
  partition: a request a client gave up on may still reach the server late.

The proxy runs its own event loop on a thread, so a driver that blocks its
loop (or has none) never slows the traffic, and cut and heal are plain calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal, Self, final
from urllib.parse import urlsplit, urlunsplit

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import TracebackType

__all__ = ["CutMode", "ProxyStatistics", "TcpProxy", "target_of", "through"]

CutMode = Literal["reset", "blackhole"]
_CHUNK: Final = 1 << 16
_LINGER_RST: Final = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST, not FIN


@dataclass(frozen=True, slots=True, kw_only=True)
class ProxyStatistics:
    """What a proxy has done so far.

    Attributes:
        mode: ``"pass"``, ``"reset"`` or ``"blackhole"``.
        accepted: connections accepted.
        open: connections open now (held ones included).
        held: connections accepted while blackholed (connected upstream only at the heal).
        reset: connections reset (by a cut, or at accept while cut).
        upstream_failures: connections whose server could not be reached.
        bytes_up: bytes forwarded to the server.
        bytes_down: bytes forwarded to the client.
        cuts: cuts so far.
    """

    mode: str
    accepted: int
    open: int
    held: int
    reset: int
    upstream_failures: int
    bytes_up: int
    bytes_down: int
    cuts: int


class _Pipe:
    """One proxied connection: the client's side and, once connected, the server's."""

    __slots__ = ("client", "server")

    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.server: asyncio.StreamWriter | None = None

    def reset(self) -> None:
        for w in (self.client, self.server):
            if w is not None:
                _reset(w)


def _reset(w: asyncio.StreamWriter) -> None:
    """Close ``w`` with a RST (the peer sees ``ECONNRESET``), never waiting."""
    sock = w.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    w.transport.abort()


@final
class TcpProxy:
    """Forwards connections from a free loopback port to ``target_host:target_port``, until cut.

    Args:
        target_host: the server's host.
        target_port: the server's port.
        name: a label for logs and ``repr``.
        host: the address to listen on (loopback).

    Example::

        with TcpProxy("127.0.0.1", 5432) as proxy:
            url = through(proxy, "postgresql://postgres@127.0.0.1:5432/postgres")
            proxy.cut("blackhole")
            proxy.heal()
    """

    def __init__(self, target_host: str, target_port: int, *, name: str = "", host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.name = name
        self.host = host
        self.port = 0
        self._mode: str = "pass"
        self._pipes: set[_Pipe] = set()
        self._counts = dict.fromkeys(
            ("accepted", "held", "reset", "upstream_failures", "bytes_up", "bytes_down", "cuts"), 0
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._gate: asyncio.Event | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def __repr__(self) -> str:
        return f"<TcpProxy {self.name} :{self.port} -> {self.target[0]}:{self.target[1]} {self._mode}>"

    # ------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 10.0) -> Self:
        """Listen on a free port (``port``) and start forwarding.

        Raises:
            OSError: the port could not be bound.
            TimeoutError: the proxy's thread did not start within ``timeout``.
        """
        if self._thread is not None:
            return self
        self._thread = threading.Thread(target=self._main, name=f"proxy-{self.name}", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"proxy {self.name} did not start")
        if self._error is not None:
            raise self._error
        return self

    def _main(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._listen())
        except BaseException as exc:  # noqa: BLE001 - handed to start(), which raises it
            self._error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            for _ in range(3):  # transports aborted last close in callbacks of the next iterations
                loop.run_until_complete(asyncio.sleep(0))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _listen(self) -> None:
        self._gate = asyncio.Event()
        self._gate.set()
        self._server = await asyncio.start_server(self._serve, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def close(self) -> None:
        """Stop listening, reset every connection and end the thread (idempotent)."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return

        async def stop() -> None:
            if self._server is not None:
                self._server.close()
            for pipe in list(self._pipes):
                pipe.reset()
            self._pipes.clear()
            if self._gate is not None:
                self._gate.set()  # held pumps wake, find their sockets gone and end
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            if others:  # every connection is reset: each task ends on its own
                await asyncio.wait(others, timeout=2)
            for _ in range(3):  # aborted transports close in a callback of the next iterations
                await asyncio.sleep(0)

        with contextlib.suppress(RuntimeError, TimeoutError):
            asyncio.run_coroutine_threadsafe(stop(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ------------------------------------------------------------ the faults

    def cut(self, mode: CutMode = "blackhole") -> None:
        """Cut the link: ``reset`` every connection (and each new one), or ``blackhole`` them (see the module doc).

        Raises:
            ValueError: an unknown mode.
        """
        if mode not in ("reset", "blackhole"):
            raise ValueError(f"mode must be 'reset' or 'blackhole', not {mode!r}")
        self._call(self._cut, mode)

    def heal(self) -> None:
        """Forward again; connections held by a blackhole go on with what they had sent."""
        self._call(self._heal)

    def statistics(self) -> ProxyStatistics:
        """The counters (read without a lock: each is one int, written by the proxy's thread only)."""
        return ProxyStatistics(mode=self._mode, open=len(self._pipes), **self._counts)

    def upstream_ports(self) -> set[int]:
        """The local ports of the connections to the server open now (what the server sees as client ports)."""
        ports: set[int] = set()
        for pipe in list(self._pipes):
            server = pipe.server
            sock = server.get_extra_info("sockname") if server is not None else None
            if sock:
                ports.add(sock[1])
        return ports

    def _call(self, fn: Callable[..., None], *args: object) -> None:
        loop = self._loop
        if loop is None:
            raise RuntimeError(f"proxy {self.name} is not started")

        async def run() -> None:
            fn(*args)

        asyncio.run_coroutine_threadsafe(run(), loop).result(5)

    def _cut(self, mode: str) -> None:
        self._counts["cuts"] += 1
        self._mode = mode
        gate = self._gate
        if mode == "blackhole" and gate is not None:
            gate.clear()
        elif mode == "reset":
            for pipe in list(self._pipes):
                pipe.reset()
                self._counts["reset"] += 1
            self._pipes.clear()

    def _heal(self) -> None:
        self._mode = "pass"
        if self._gate is not None:
            self._gate.set()

    # ------------------------------------------------------------ forwarding

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._counts["accepted"] += 1
        if self._mode == "reset":
            self._counts["reset"] += 1
            _reset(writer)
            return
        pipe = _Pipe(writer)
        self._pipes.add(pipe)
        try:
            await self._forward(pipe, reader)
        finally:
            self._pipes.discard(pipe)
            for w in (pipe.client, pipe.server):
                if w is not None and not w.transport.is_closing():
                    w.transport.abort()

    async def _forward(self, pipe: _Pipe, reader: asyncio.StreamReader) -> None:
        gate = self._gate
        if gate is None:  # pragma: no cover - set before the server listens
            return
        if not gate.is_set():
            self._counts["held"] += 1
            await gate.wait()
        if pipe not in self._pipes:  # reset while held
            return
        try:
            up_reader, pipe.server = await asyncio.open_connection(*self.target)
        except OSError:
            self._counts["upstream_failures"] += 1
            _reset(pipe.client)
            return
        if pipe not in self._pipes:  # reset while connecting
            _reset(pipe.server)
            return
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._pump(pipe, reader, pipe.server, "bytes_up"))
            tg.create_task(self._pump(pipe, up_reader, pipe.client, "bytes_down"))

    async def _pump(self, pipe: _Pipe, src: asyncio.StreamReader, dst: asyncio.StreamWriter, counter: str) -> None:
        """Copy ``src`` to ``dst`` while the gate is open; at either end's close, close both."""
        gate = self._gate
        assert gate is not None  # noqa: S101 - set before the server listens
        try:
            while True:
                data = await src.read(_CHUNK)
                if not gate.is_set():
                    await gate.wait()  # blackholed: hold this chunk (and stop reading) until the heal
                if not data or pipe not in self._pipes:
                    break
                dst.write(data)
                self._counts[counter] += len(data)
                await dst.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            if pipe in self._pipes:
                _close_both(pipe)
            else:
                pipe.reset()


def _close_both(pipe: _Pipe) -> None:
    """One side ended: end the other (a FIN each way, as the server or client did)."""
    for w in (pipe.client, pipe.server):
        if w is not None and not w.transport.is_closing():
            w.close()


def through(proxy: TcpProxy, url: str) -> str:
    """``url`` with its host and port replaced by ``proxy``'s (user, path and query kept)."""
    parts = urlsplit(url)
    auth = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
    return urlunsplit(parts._replace(netloc=f"{auth}{proxy.host}:{proxy.port}"))


def target_of(url: str) -> tuple[str, int]:
    """``(host, port)`` of a server URL (``postgresql://…``, ``valkey://…``).

    Raises:
        ValueError: the URL names no host or port.
    """
    parts = urlsplit(url)
    if parts.hostname is None or parts.port is None:
        raise ValueError(f"{url!r} names no host and port")
    return parts.hostname, parts.port
