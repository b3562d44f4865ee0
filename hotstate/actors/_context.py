"""The ``StepContext`` a step receives (who it is, which attempt, its idempotency key) and ``Finish``."""

from __future__ import annotations

from typing import Any, Generic, NamedTuple, TypeVar, final

__all__ = ["Finish", "StepContext"]

P = TypeVar("P")


@final
class Finish(Generic[P]):
    """Return ``Finish(payload)`` from a step to finish the run early (status done).

    Args:
        payload: the run's final payload.
    """

    __slots__ = ("payload",)

    def __init__(self, payload: P) -> None:
        self.payload = payload

    def __repr__(self) -> str:
        return f"Finish({self.payload!r})"


class StepContext(NamedTuple):
    """What a step (or compensation) knows about the run it is executing for.

    A NamedTuple because one is built per step on the hot path (see _snapshot.py).

    Attributes:
        run_id: the run's id.
        workflow: the workflow's name.
        workflow_version: the workflow definition's version.
        step: the step index.
        step_name: the step's name.
        attempt: the attempt number, 1-based (a retry is attempt 2, ...).
        version: the snapshot version the step starts from.
        signal: the data of the signal that woke a ``wait_for`` step, else None.
        compensating: True when this context is given to a compensation.
    """

    run_id: str
    workflow: str
    workflow_version: int
    step: int
    step_name: str
    attempt: int
    version: int
    signal: Any = None
    compensating: bool = False

    @property
    def idempotency_key(self) -> str:
        """A key that is the same for every execution of this step of this run.

        It does not change when the step is retried, nor when it runs again after
        crash recovery, so side effects can be deduplicated with it. It is built
        from the run id, the workflow definition version and the step index; the
        snapshot version is not part of it because every retry makes a new version.
        A compensation gets its own key (suffix ``:compensate``).
        """
        key = f"{self.run_id}:{self.workflow_version}:{self.step}"
        return key + ":compensate" if self.compensating else key

    @staticmethod
    def finish(payload: P) -> Finish[P]:
        """Wrap ``payload`` so that returning it finishes the run early.

        Args:
            payload: the final payload.

        Returns:
            The marker to return from the step.
        """
        return Finish(payload)
