"""``History``: a run's transitions, stored compactly in memory.

A run's audit trail can hold thousands of transitions. Keeping each one as a
``Transition`` object costs ~100 bytes and, worse, one more object the cyclic
garbage collector must traverse on every full collection: on W1 (10,000 runs x
10 steps, uvloop) that GC work alone cost ~0.45 us per step, a third of the
whole per-step budget. Here a transition is two floats in one ``array('d')``
(time, and step/kind/status packed into an exact integer), plus a sparse dict
for the few that carry a detail; ``Transition`` objects are rebuilt on read.
Versions are implicit: every transition makes exactly one new version.
"""

from __future__ import annotations

from array import array
from typing import Final, final

from hotstate.actors._snapshot import Status, Transition, TransitionKind

__all__ = ["History"]

KINDS: Final = tuple(TransitionKind)
STATUSES: Final = tuple(Status)
KIND_CODE: Final = {k: i for i, k in enumerate(KINDS)}
STATUS_CODE: Final = {s: i for i, s in enumerate(STATUSES)}
# code = step * 256 + kind * 16 + status; exact in a float for steps < 2**44.
STEP_RUNNING: Final = KIND_CODE[TransitionKind.step] * 16 + STATUS_CODE[Status.running]


def encode(t: Transition) -> float:
    """Pack a transition's step, kind and status into one exact float."""
    return t.step * 256 + KIND_CODE[t.kind] * 16 + STATUS_CODE[t.status]


@final
class History:
    """A run's transitions from version ``base + 1`` on.

    Args:
        base: the version before the first transition held (0 for a new run;
            a resumed run holds only what happened since it was resumed).
    """

    __slots__ = ("base", "cols", "details")

    def __init__(self, base: int = 0, first: Transition | None = None) -> None:
        self.base = base
        self.details: dict[int, str] | None = None
        if first is None:
            self.cols = array("d")  # time, code, time, code, ...
        else:
            self.cols = array("d", (first.at, encode(first)))
            if first.detail is not None:
                self.details = {0: first.detail}

    def __len__(self) -> int:
        return len(self.cols) >> 1

    def add(self, t: Transition) -> None:
        """Append one transition (its version must be the next one)."""
        cols = self.cols
        if t.detail is not None:
            if self.details is None:
                self.details = {}
            self.details[len(cols) >> 1] = t.detail
        cols.append(t.at)
        cols.append(t.step * 256 + KIND_CODE[t.kind] * 16 + STATUS_CODE[t.status])

    def last_at(self) -> float | None:
        """Time of the newest transition held, or None."""
        return self.cols[-2] if self.cols else None

    def transitions(self, run_id: str) -> list[Transition]:
        """Rebuild the transitions, oldest first.

        Args:
            run_id: the run's id (not stored per transition).

        Returns:
            The transitions.
        """
        cols = self.cols
        details = self.details or {}
        out = []
        for i in range(len(cols) >> 1):
            code = int(cols[2 * i + 1])
            step, rest = divmod(code, 256)
            out.append(
                Transition(
                    run_id, self.base + i + 1, KINDS[rest >> 4], step, STATUSES[rest & 15], cols[2 * i], details.get(i)
                )
            )
        return out
