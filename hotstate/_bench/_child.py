"""The child process of every SIGKILL trial and of ``hotstate demo``, and the parent's handle on it.

``Child(config, log)`` starts ``python -m hotstate._bench._child CONFIG``, where
CONFIG is a ``ChildConfig`` as JSON. The child runs its workload on the
policy's tiers with a ``TraceWriter`` installed as the runtime's instrument
(what its memory held survives the SIGKILL there, for the judge in
``_crash.py``) and says ``Ready`` once the workload starts:

- a trial (``_trial.py``) runs until the parent SIGKILLs it (out of run slots,
  it lingers until then: every trial ends in a crash); the parent recovers;
- the demo's orders (``_orders.py``) run until every order has finished, with
  ``Progress`` reports for the live view; generation 2 starts with recovery;
- the #10 guarantees' workloads kill themselves at the moment under test
  (the parent's side is ``_guarantees.py``): an acknowledged call
  (``_ack.py``, ``Acknowledged``), orders finished in Valkey before SQLite's
  flush (``_lineage.py``, ``Settled``), a step that kills its process on
  every start (``_crashloop.py``, ``Started`` from each start).

Messages on stdout are frozen dataclasses, one JSON object per line with
their field names and the class name under ``"message"``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import queue
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, Protocol, TypeAlias

import anyio

from hotstate import Runtime
from hotstate._bench._ack import AckLoad, Acknowledged, AckWorkload
from hotstate._bench._crashloop import CrashLoopLoad, CrashLoopWorkload, Started
from hotstate._bench._lineage import LineageLoad, LineageWorkload, Settled
from hotstate._bench._orders import Finished, OrderLoad, Orders, Progress, Recovered
from hotstate._bench._policy import Policy
from hotstate._bench._trace import TraceLayout, TraceWriter
from hotstate._bench._trial import TrialLoad, Workload

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

    from hotstate import Workflow
    from hotstate.persistence import Store


@dataclass(frozen=True, slots=True, kw_only=True)
class ChildConfig:
    """Everything a child needs, given by the parent (its one argument, as JSON)."""

    policy: str  # the tiers, a Policy spec such as "valkey:0.01,sqlite:1"
    sqlite: str  # the SQLite file
    valkey_url: str  # the Valkey server (used when the policy has a Valkey tier)
    prefix: str  # the Valkey key prefix
    trace: str  # the trace file, created zeroed by ``Child``
    runs: int  # run slots in the trace
    versions: int = TraceLayout(0).versions  # timed versions per run
    # The workload: exactly one of these.
    trial: Workload | None = None  # a trial's workload
    orders: Orders | None = None  # the demo's orders
    ack: AckWorkload | None = None  # one acknowledged call
    lineage: LineageWorkload | None = None  # orders finished in Valkey before SQLite's flush
    crash_loop: CrashLoopWorkload | None = None  # a step that kills its process
    recover: bool = False  # start with Runtime(recover=True)
    crash_limit: int = 3  # Runtime(crash_limit=...)
    report_interval: float = 0.05  # seconds between Progress messages (orders only)
    poll: float = 0.005  # seconds between durability polls
    linger: float = 120.0  # seconds to wait for the kill once the workload is done
    use_uvloop: bool = True

    @property
    def layout(self) -> TraceLayout:
        """The trace file's layout."""
        return TraceLayout(self.runs, self.versions)

    def stores(self) -> list[Store]:
        """New stores on the child's tiers, to read what they hold."""
        return Policy.parse(self.policy).stores(sqlite=self.sqlite, valkey_url=self.valkey_url, prefix=self.prefix)

    def to_json(self) -> str:
        """The config as the child's one argument."""
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ChildConfig:
        """Parse ``to_json``'s text."""
        fields = json.loads(text)
        for name, workload in _WORKLOADS.items():
            if (value := fields.get(name)) is not None:
                for key, field_type in _TUPLES.get(name, {}).items():
                    value[key] = field_type(value[key])  # JSON has lists only
                fields[name] = workload(**value)
        return cls(**fields)


_WORKLOADS: dict[str, type[Any]] = {
    "trial": Workload,
    "orders": Orders,
    "ack": AckWorkload,
    "lineage": LineageWorkload,
    "crash_loop": CrashLoopWorkload,
}
_TUPLES: dict[str, dict[str, type[tuple[Any, ...]]]] = {"lineage": {"unpaid": tuple}, "crash_loop": {"work": tuple}}


@dataclass(frozen=True, slots=True, kw_only=True)
class Ready:
    """The workload started (the trace's ready time is set)."""


Message: TypeAlias = Ready | Progress | Recovered | Finished | Acknowledged | Settled | Started
_MESSAGES: dict[str, type[Message]] = {
    cls.__name__: cls for cls in (Ready, Progress, Recovered, Finished, Acknowledged, Settled, Started)
}


def send(message: Message) -> None:
    """Write one message on stdout."""
    print(json.dumps({"message": type(message).__name__, **dataclasses.asdict(message)}), flush=True)


def parse(line: str) -> Message:
    """Read one message line.

    Raises:
        ValueError: not JSON.
        KeyError: not a message.
        TypeError: a message with other fields.
    """
    fields: dict[str, Any] = json.loads(line)
    return _MESSAGES[fields.pop("message")](**fields)


class Child:
    """One child process, and a thread that turns its stdout into messages.

    Args:
        config: what the child runs (its trace file is created here).
        log: where its stderr goes.
        name: how errors name it.
    """

    def __init__(self, config: ChildConfig, log: Path, name: str = "child") -> None:
        self.name = name
        self.log = log
        with open(config.trace, "wb") as trace:
            trace.truncate(config.layout.size)  # zeroed: what the child maps and the judge reads
        self._err: IO[bytes] = log.open("wb")
        # Our own module with a config we built, no shell.
        self.proc = subprocess.Popen(  # noqa: S603
            [sys.executable, "-m", "hotstate._bench._child", config.to_json()],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._err,
            text=True,
        )
        self.pid = self.proc.pid
        self._messages: queue.Queue[Message | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, name=f"{name}-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        stdout = self.proc.stdout
        assert stdout is not None  # noqa: S101 - PIPE
        for line in stdout:
            with contextlib.suppress(ValueError, KeyError, TypeError):  # a line cut short by the SIGKILL
                self._messages.put(parse(line))
        self._messages.put(None)

    def next_message(self, deadline: float) -> Message | None:
        """The next message, or None once the child's stdout closed.

        Raises:
            TimeoutError: nothing before ``deadline`` (monotonic).
        """
        try:
            return self._messages.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise TimeoutError(f"{self.name} sent nothing before the deadline") from None

    def kill(self) -> int:
        """SIGKILL the child if it runs and reap it; returns its exit status."""
        if self.proc.poll() is None:
            self.proc.kill()
        status = self.proc.wait(timeout=10)
        self._reader.join(timeout=5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._err.close()
        return status

    def wait(self, timeout: float) -> int:
        """Wait for the child to exit; returns its exit status."""
        return self.proc.wait(timeout=timeout)

    def stderr_tail(self, chars: int = 2000) -> str:
        """The end of what the child wrote on stderr."""
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


class Load(Protocol):
    """A child's workload: its workflows, and what it does with the runtime."""

    @property
    def workflows(self) -> Sequence[Workflow]:
        """The workflows to register."""
        ...

    async def run(self, rt: Runtime) -> None:
        """Run the workload (it may end with the process)."""
        ...


def _load(config: ChildConfig, trace: TraceWriter, stores: list[Store]) -> Load:
    """The config's one workload, with the trace its runs are registered in."""
    if config.trial is not None:
        return TrialLoad(config.trial, trace)
    if config.ack is not None:
        return AckLoad(config.ack, trace, send)
    if config.lineage is not None:
        return LineageLoad(config.lineage, trace, send)
    if config.crash_loop is not None:
        return CrashLoopLoad(config.crash_loop, trace, send)
    assert config.orders is not None  # noqa: S101 - one workload, by construction
    return OrderLoad(config.orders, trace, stores, send, config.report_interval)


async def child_main(config: ChildConfig) -> None:
    """Run the workload until killed (or until it is done and ``linger`` passed)."""
    policy = Policy.parse(config.policy)
    tiers = policy.build_tiers(sqlite=config.sqlite, valkey_url=config.valkey_url, prefix=config.prefix)
    trace = TraceWriter(config.trace, config.layout, [t.store.tier for t in tiers])
    load = _load(config, trace, [t.store for t in tiers])
    try:
        async with (
            Runtime(
                load.workflows,
                tiers=tiers,
                recover=config.recover,
                ack_tiers=policy.ack_tiers,
                crash_limit=config.crash_limit,
                instruments=[trace],
                shutdown_timeout=1.0,
            ) as rt,
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(trace.poll, rt, config.poll)
            trace.slots[TraceLayout.READY] = time.monotonic()
            send(Ready())
            await load.run(rt)
            # Done: wait for the kill (a crash, as in every trial), but never
            # outlive a parent that died without killing us.
            with anyio.move_on_after(config.linger):
                await anyio.sleep_forever()
            tg.cancel_scope.cancel()
    finally:
        trace.close()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the child process: ``python -m hotstate._bench._child CONFIG_JSON``."""
    from hotstate import run

    config = ChildConfig.from_json((sys.argv[1:] if argv is None else argv)[0])
    run(child_main, config, use_uvloop=config.use_uvloop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
