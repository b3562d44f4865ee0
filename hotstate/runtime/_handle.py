"""``RunHandle``: a handle on one run, held by users and passed around freely.

It knows its runtime only through ``RunOwner``, the five calls it makes, so
this module does not import ``_runtime.py`` (which imports it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final, Protocol, final

if TYPE_CHECKING:
    from hotstate.actors import Snapshot, Transition

__all__ = ["RunHandle", "RunOwner"]

_HANDLE_TOKEN: Final = object()


class RunOwner(Protocol):
    """What a ``RunHandle`` asks of its runtime (``Runtime`` implements it)."""

    def get(self, run_id: str) -> Snapshot:
        """The run's latest snapshot."""
        ...

    async def wait_finished(self, run_id: str) -> Any:
        """Wait for the run to finish and return its final payload."""
        ...

    async def send(self, run_id: str, signal: str, data: Any = None, *, dedupe_key: str | None = None) -> None:
        """Send a signal to the run."""
        ...

    async def cancel(self, run_id: str) -> None:
        """Cancel the run."""
        ...

    def history(self, run_id: str) -> list[Transition]:
        """The run's transitions, oldest first."""
        ...


@final
class RunHandle:
    """A handle on one run of a runtime. Returned by ``Runtime.spawn``; not built by users.

    Attributes:
        run_id: the run's id.
        created: True when the ``Runtime.spawn`` call that returned this handle
            started the run; False when the run already existed (in memory or
            in a store), and for handles from ``Runtime.handle`` and
            ``Runtime.retry_dead_letter``. Not part of equality.
    """

    __slots__ = ("_runtime", "created", "run_id")

    def __init__(self, runtime: RunOwner, run_id: str, *, _token: object = None) -> None:
        if _token is not _HANDLE_TOKEN:
            raise TypeError("RunHandle is created by Runtime.spawn or Runtime.handle")
        self._runtime = runtime
        self.run_id = run_id
        self.created = False

    @classmethod
    def _new(cls, runtime: RunOwner, run_id: str, created: bool) -> RunHandle:
        handle = object.__new__(cls)  # skips the guarded __init__: spawn is on W1's path
        handle._runtime = runtime
        handle.run_id = run_id
        handle.created = created
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

    async def send(self, signal: str, data: Any = None, *, dedupe_key: str | None = None) -> None:
        """Send a signal to the run; see ``Runtime.send`` (and its ``dedupe_key``).

        Raises:
            RunFinishedError: the run has finished.
            UnknownSignalError: no step left waits for ``signal``.
            SignalQueueFullError: too many signals are pending in the run.
            RuntimeClosedError: the runtime is closed.
        """
        await self._runtime.send(self.run_id, signal, data, dedupe_key=dedupe_key)

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
