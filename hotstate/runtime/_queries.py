"""In-memory indexes that answer "which runs are in status S / of workflow W" without a scan."""

from __future__ import annotations

from typing import final

from hotstate.actors import Status

__all__ = ["RunIndex"]


@final
class RunIndex:
    """Insertion-ordered sets of run ids per status and per workflow."""

    __slots__ = ("by_status", "by_workflow")

    def __init__(self) -> None:
        # Every bucket exists up front, so the hot path never calls setdefault.
        self.by_status: dict[Status, dict[str, None]] = {status: {} for status in Status}
        self.by_workflow: dict[str, dict[str, None]] = {}

    def add(self, run_id: str, workflow: str, status: Status) -> None:
        """Index a new run."""
        self.by_status[status][run_id] = None
        self.workflow_bucket(workflow)[run_id] = None

    def workflow_bucket(self, workflow: str) -> dict[str, None]:
        """The (live) id set of ``workflow``, created on first use."""
        bucket = self.by_workflow.get(workflow)
        if bucket is None:
            bucket = self.by_workflow[workflow] = {}
        return bucket

    def move(self, run_id: str, old: Status, new: Status) -> None:
        """Move a run from one status to another."""
        by_status = self.by_status
        del by_status[old][run_id]
        by_status[new][run_id] = None

    def remove(self, run_id: str, workflow: str, status: Status) -> None:
        """Forget a run."""
        self.by_status.get(status, {}).pop(run_id, None)
        self.by_workflow.get(workflow, {}).pop(run_id, None)

    def select(self, status: Status | None, workflow: str | None) -> list[str]:
        """Return the ids matching both filters (None matches all).

        Order: by when each run entered the filtered status (or was spawned, for
        a workflow filter alone). With no filter at all the runtime lists its
        runs in spawn order itself, so both filters None returns every run
        grouped by workflow.
        """
        if status is None:
            return list(self.by_workflow.get(workflow or "", ()))
        by_status = self.by_status.get(status, {})
        if workflow is None:
            return list(by_status)
        by_wf = self.by_workflow.get(workflow, {})
        small, large = (by_status, by_wf) if len(by_status) <= len(by_wf) else (by_wf, by_status)
        return [rid for rid in small if rid in large]

    def count(self, status: Status) -> int:
        """How many runs are in ``status``."""
        return len(self.by_status.get(status, ()))
