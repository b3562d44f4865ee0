"""``RunHandle`` (a handle on one run) and ``RuntimeStatistics`` (the runtime's figures)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, final

if TYPE_CHECKING:
    from collections.abc import Mapping

    from hotstate.actors import Snapshot, Transition
    from hotstate.persistence import PersisterStatistics
    from hotstate.runtime._runtime import Runtime
    from hotstate.runtime._supervisor import SupervisorStatistics

__all__ = ["RunHandle", "RuntimeStatistics"]

_HANDLE_TOKEN: Final = object()


@dataclass(frozen=True, slots=True, kw_only=True)
class RuntimeStatistics:
    """Figures of a runtime, read with ``Runtime.statistics()``.

    Attributes:
        runs: runs held in memory.
        by_status: how many runs are in each status.
        transitions: transitions committed since start.
        ready: runs waiting in the ready queue.
        tasks: scheduler and step-hosting tasks alive.
        timers: scheduled deadlines (backoffs, timeouts).
        subscribers: live subscriptions.
        subscriber_overflows: subscribers cut off for falling behind.
        internal_errors: crashes in hotstate's own machinery (each logged).
        supervisor: the supervisor's figures.
        tiers: each persistence tier's figures.
        throttle_waits: times a run was parked by backpressure.
    """

    runs: int
    by_status: Mapping[str, int]
    transitions: int
    ready: int
    tasks: int
    timers: int
    subscribers: int
    subscriber_overflows: int
    internal_errors: int
    supervisor: SupervisorStatistics
    tiers: tuple[PersisterStatistics, ...] = ()
    throttle_waits: int = 0


@final
class RunHandle:
    """A handle on one run of a runtime. Returned by ``Runtime.spawn``; not built by users."""

    __slots__ = ("_runtime", "run_id")

    def __init__(self, runtime: Runtime, run_id: str, *, _token: object = None) -> None:
        if _token is not _HANDLE_TOKEN:
            raise TypeError("RunHandle is created by Runtime.spawn or Runtime.handle")
        self._runtime = runtime
        self.run_id = run_id

    @classmethod
    def _new(cls, runtime: Runtime, run_id: str) -> RunHandle:
        handle = object.__new__(cls)  # skips the guarded __init__: spawn is on W1's path
        handle._runtime = runtime
        handle.run_id = run_id
        return handle

    def __repr__(self) -> str:
        return f"<RunHandle {self.run_id!r}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunHandle) and other.run_id == self.run_id and other._runtime is self._runtime

    def __hash__(self) -> int:
        return hash(self.run_id)

    @property
    def snapshot(self) -> Snapshot:
        """Where the run is now (its latest snapshot); O(1), no I/O.

        Raises:
            RunNotFoundError: the run is not held by the runtime.
        """
        return self._runtime.get(self.run_id)

    async def wait_finished(self) -> Any:
        """Wait for the run to finish; see ``Runtime.wait_finished``.

        Returns:
            The final payload.

        Raises:
            RunFailedError: the run failed for good.
            RunCancelledError: the run was cancelled.
        """
        return await self._runtime.wait_finished(self.run_id)

    async def send(self, signal: str, data: Any = None) -> None:
        """Send a signal to the run; see ``Runtime.send``.

        Raises:
            RunFinishedError: the run has finished.
            RuntimeClosedError: the runtime is closed.
        """
        await self._runtime.send(self.run_id, signal, data)

    async def cancel(self) -> None:
        """Cancel the run; see ``Runtime.cancel``.

        Raises:
            RunFinishedError: the run has finished.
        """
        await self._runtime.cancel(self.run_id)

    def history(self) -> list[Transition]:
        """Return the run's transitions, oldest first.

        Raises:
            RunNotFoundError: the run is not held by the runtime.
        """
        return self._runtime.history(self.run_id)
