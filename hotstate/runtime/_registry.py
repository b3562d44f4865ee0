"""``RunRegistry``: the runs held in memory, by id, with status and workflow indexes.

Answers "where is run X?" (a dict hit) and "which runs are in status S / of
workflow W?" without a scan. The scheduler's commit moves a run between status
buckets inline (it is on the step path); everything else goes through here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, final

from hotstate._errors import RunNotFoundError
from hotstate.actors import TERMINAL_STATUSES, Status

if TYPE_CHECKING:
    from collections.abc import Container, Iterator

    from hotstate.actors._actor import RunActor

__all__ = ["RunRegistry"]


@final
class RunRegistry:
    """Actors by run id, plus insertion-ordered id sets per status and per workflow."""

    __slots__ = ("actors", "by_status", "by_workflow", "get")

    def __init__(self) -> None:
        self.actors: dict[str, RunActor] = {}
        self.get = self.actors.get  # bound once: looked up per spawn and per query
        # Every status bucket exists up front, so the hot path never calls setdefault.
        self.by_status: dict[Status, dict[str, None]] = {status: {} for status in Status}
        self.by_workflow: dict[str, dict[str, None]] = {}

    def __len__(self) -> int:
        return len(self.actors)

    def __contains__(self, run_id: object) -> bool:
        return run_id in self.actors

    def __iter__(self) -> Iterator[RunActor]:
        """The actors in the order they entered memory."""
        return iter(self.actors.values())

    def actor(self, run_id: str) -> RunActor:
        """The run's actor.

        Raises:
            RunNotFoundError: no such run in memory.
        """
        actor = self.actors.get(run_id)
        if actor is None:
            raise RunNotFoundError(run_id)
        return actor

    def add(self, actor: RunActor) -> None:
        """Hold a new run and index it."""
        snap = actor.snapshot
        run_id = snap.run_id
        self.actors[run_id] = actor
        self.by_status[snap.status][run_id] = None
        self.workflow_bucket(snap.workflow)[run_id] = None

    def workflow_bucket(self, workflow: str) -> dict[str, None]:
        """The (live) id set of ``workflow``, created on first use."""
        bucket = self.by_workflow.get(workflow)
        if bucket is None:
            bucket = self.by_workflow[workflow] = {}
        return bucket

    def remove(self, run_id: str) -> None:
        """Forget a run (purged)."""
        actor = self.actors.pop(run_id, None)
        if actor is None:
            return
        snap = actor.snapshot
        self.by_status[snap.status].pop(run_id, None)
        self.by_workflow.get(snap.workflow, {}).pop(run_id, None)

    def purge_finished(self, before: float, *, keep: Container[str]) -> list[str]:
        """Forget finished runs last updated before ``before`` (wall clock), except ``keep`` and running ones.

        Returns:
            The ids forgotten.
        """
        gone: list[str] = []
        actors = self.actors
        for status in TERMINAL_STATUSES:
            for rid in list(self.by_status[status]):
                actor = actors[rid]
                if actor.snapshot.updated_at < before and rid not in keep and not actor.running:
                    gone.append(rid)
                    self.remove(rid)
        return gone

    def select(self, status: Status | None, workflow: str | None) -> list[str]:
        """Return the ids matching both filters (None matches all).

        Order: by when each run entered the filtered status (or was spawned, for
        a workflow filter alone). With no filter at all, the runs in the order
        they entered memory.
        """
        if status is None:
            if workflow is None:
                return list(self.actors)
            return list(self.by_workflow.get(workflow, ()))
        by_status = self.by_status[status]
        if workflow is None:
            return list(by_status)
        by_wf = self.by_workflow.get(workflow, {})
        small, large = (by_status, by_wf) if len(by_status) <= len(by_wf) else (by_wf, by_status)
        return [rid for rid in small if rid in large]

    def count(self, status: Status | None = None, workflow: str | None = None) -> int:
        """How many runs match both filters (None matches all)."""
        if workflow is None:
            return len(self.actors) if status is None else len(self.by_status[status])
        if status is None:
            return len(self.by_workflow.get(workflow, ()))
        return len(self.select(status, workflow))
