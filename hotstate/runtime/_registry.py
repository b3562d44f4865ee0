"""``RunRegistry``: the runs held in memory, by id, with status and workflow indexes.

Answers "where is run X?" (a dict hit) and "which runs are in status S / of
workflow W?" without a scan. The scheduler's commit moves a run between status
buckets inline (it is on the step path); everything else goes through here,
including which finished runs may leave memory (retention) and how the runs in
memory are merged into a listing of the stores (``ListedRun``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, final

from hotstate._errors import RunNotFoundError
from hotstate.actors import TERMINAL_STATUSES, Status

if TYPE_CHECKING:
    from collections.abc import Callable, Container, Iterator, Mapping

    from hotstate.actors._actor import RunActor
    from hotstate.persistence import RunHeader

__all__ = ["ListedRun", "RunRegistry"]

log = logging.getLogger("hotstate.runtime")

HOT = "hot"
"""``ListedRun.tier`` of a run held in memory (the name ``durable_versions`` uses)."""


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class ListedRun:
    """One run in a page of ``Runtime.list_stored``: its header, never its payload.

    Attributes:
        run_id: the run's id.
        workflow: the workflow's name.
        version: the snapshot version listed (the newest across memory and tiers).
        step: the step cursor.
        status: the status.
        updated_at: wall-clock time of that version.
        tier: where that version was read: ``"hot"`` for a run held in memory,
            else the name of the tier whose copy is the newest (the earlier
            tier on a tie).
    """

    run_id: str
    workflow: str
    version: int
    step: int
    status: Status
    updated_at: float
    tier: str


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

    def evict_finished(
        self,
        before: float,
        *,
        keep: Container[str],
        durable: Callable[[str, int], bool],
        ordered: bool = False,
    ) -> list[str]:
        """Let finished runs last updated before ``before`` leave memory, when ``durable`` says the stores hold them.

        Like ``purge_finished``, ``keep`` (dead-lettered runs) and runs whose
        turn is still ending stay. ``durable(run_id, version)`` must be true for
        the run's current version: a run leaves memory only once its newest
        version is durable in every tier.

        Args:
            before: the wall-clock cut-off (exclusive), compared with ``updated_at``.
            keep: ids that stay.
            durable: whether a version is durable in every tier.
            ordered: stop each status bucket at its first run updated at or after
                ``before``. A bucket is in the order runs finished, so this makes a
                periodic pass cost the runs it evicts, not every finished run held;
                a run that came back into memory already old (``spawn`` of a
                stored id) may wait for the runs ahead of it.

        Returns:
            The ids evicted.
        """
        gone: list[str] = []
        actors = self.actors
        for status in TERMINAL_STATUSES:
            for rid in self.by_status[status]:
                actor = actors[rid]
                snap = actor.snapshot
                if snap.updated_at >= before:
                    if ordered:
                        break
                    continue
                if rid not in keep and not actor.running and durable(rid, snap.version):
                    gone.append(rid)
        for rid in gone:
            self.remove(rid)
        return gone

    def listing(
        self,
        stored: Mapping[str, tuple[str, RunHeader]],
        status: Status | None,
        workflow: str | None,
        after: str | None,
        through: str | None,
    ) -> list[ListedRun]:
        """Merge the runs held in memory into a page of stored headers, ordered by run id.

        A run held in memory is listed as memory holds it, whatever a tier
        says: memory is where its newest verified version is (a tier may hold
        an older copy, or a newer one that did not verify). Stored headers are
        plain data that no digest covers; a status that is not a ``Status`` is
        logged and left out.

        Args:
            stored: the newest stored header of each run in the page, with its tier.
            status: only runs in this status.
            workflow: only runs of this workflow.
            after: the page starts after this run id.
            through: the page ends at this run id (None: no end).

        Returns:
            The page, ordered by run id.
        """
        actors = self.actors
        out: dict[str, ListedRun] = {}
        for rid, (tier, h) in stored.items():
            if rid in actors:
                continue
            try:
                st = Status(h.status)
            except ValueError:
                log.warning("hotstate: run %r in %r has an unknown stored status %r; not listed", rid, tier, h.status)
                continue
            out[rid] = ListedRun(
                run_id=rid, workflow=h.workflow, version=h.version, step=h.step, status=st,
                updated_at=h.updated_at, tier=tier,
            )  # fmt: skip
        for rid in self.select(status, workflow):
            if (after is None or rid > after) and (through is None or rid <= through):
                s = actors[rid].snapshot
                out[rid] = ListedRun(
                    run_id=rid, workflow=s.workflow, version=s.version, step=s.step, status=s.status,
                    updated_at=s.updated_at, tier=HOT,
                )  # fmt: skip
        return [out[rid] for rid in sorted(out)]

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
