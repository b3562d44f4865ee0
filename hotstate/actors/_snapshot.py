"""Pure data: the ``Snapshot`` envelope, the ``Transition`` record, ``Status`` and ``ErrorInfo``.

This is the "current Snapshot" and "Transition" of the map in docs/architecture.md.

Snapshot and Transition are ``NamedTuple``s rather than frozen dataclasses
(STYLE.md D.14 allows this when a benchmark shows construction cost matters).
Measured on the W1 workload (10,000 runs x 10 steps, uvloop, CPython 3.11):
building one frozen slotted kw-only dataclass snapshot + transition per step ran
at 0.38x the bare-loop ceiling, the same with NamedTuples at 0.67x, and with
NamedTuples built by ``tuple.__new__`` (as the hot path does) at ~1.0x.
They are still immutable; ``_replace`` makes a changed copy.
"""

from __future__ import annotations

import enum
import traceback
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final, NamedTuple, final, overload

__all__ = [
    "DEDUPE_KEYS_KEPT",
    "TERMINAL_STATUSES",
    "DeadLetter",
    "ErrorInfo",
    "Signals",
    "Snapshot",
    "Status",
    "Transition",
    "TransitionKind",
    "new_tuple",
    "storable_text",
]

new_tuple: Final = tuple.__new__
"""``new_tuple(Snapshot, (...))`` builds a NamedTuple from its fields in order, without the
keyword-parsing ``__new__`` frame. Only the measured paths use it (the step loop,
spawn, recovery's 100,000 adoptions, decoding headers); the field order it relies
on is pinned by ``tests/unit/actors/test_snapshot.py``."""


def storable_text(text: str) -> str:
    r"""``text`` as valid UTF-8 text, so every store can keep it (#11).

    A lone surrogate does not encode, and one in an error message used to
    fail every flush of a tier. Non-UTF-8 bytes that ``os.fsdecode`` or
    ``sys.argv`` smuggled in as surrogates (U+DC80..U+DCFF) come back as
    ``\xNN``, the byte they stand for; any other lone surrogate as
    ``\udNNN``. Text that encodes is returned as is.

    Args:
        text: any text.

    Returns:
        Text that encodes as UTF-8.
    """
    if text.isascii():
        return text
    try:
        text.encode()
    except UnicodeEncodeError:
        try:
            return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:  # a surrogate outside U+DC80..U+DCFF
            return text.encode("utf-8", "backslashreplace").decode()
    return text


class Status(enum.StrEnum):
    """Where a run is in its life. Stored as the member's string value."""

    pending = "pending"
    """Spawned, its first step not yet started."""
    running = "running"
    """Executing steps."""
    waiting = "waiting"
    """Parked until a named signal arrives; holds no task."""
    retrying = "retrying"
    """A step failed and a retry is scheduled after a backoff; holds no task."""
    compensating = "compensating"
    """Giving up: running the compensations of completed steps."""
    done = "done"
    """Finished: every step ran (or a step finished the run early)."""
    failed = "failed"
    """Failed for good; compensated and dead-lettered."""
    cancelled = "cancelled"
    """Cancelled on request."""


TERMINAL_STATUSES: frozenset[Status] = frozenset({Status.done, Status.failed, Status.cancelled})
"""Statuses a run never leaves (except by an explicit dead-letter retry)."""


class TransitionKind(enum.StrEnum):
    """What happened in a transition. Stored as the member's string value."""

    spawned = "spawned"
    step = "step"
    waiting = "waiting"
    signal = "signal"
    step_failed = "step_failed"
    retry = "retry"
    compensating = "compensating"
    compensated = "compensated"
    compensation_failed = "compensation_failed"
    failed = "failed"
    cancelled = "cancelled"
    resumed = "resumed"
    dead_letter_retried = "dead_letter_retried"


@dataclass(frozen=True, slots=True, kw_only=True)
class ErrorInfo:
    """A recorded failure: what was raised, where, and on which attempt.

    Attributes:
        type: the exception's qualified type name, e.g. ``"builtins.ValueError"``.
        message: ``str(exc)``.
        traceback: the formatted traceback text.
        step: the step index that raised (-1 when not inside a step).
        step_name: the step's name.
        attempt: the attempt number (1-based) that raised.
        at: wall-clock time of the failure.
    """

    type: str
    message: str
    traceback: str
    step: int
    step_name: str
    attempt: int
    at: float

    @classmethod
    def from_exception(cls, exc: BaseException, *, step: int, step_name: str, attempt: int, at: float) -> ErrorInfo:
        """Record ``exc`` (with its traceback text), its text made storable (``storable_text``).

        Args:
            exc: the exception raised.
            step: the step index.
            step_name: the step name.
            attempt: the attempt number.
            at: wall-clock time.

        Returns:
            The new record.
        """
        kind = type(exc)
        return cls(
            type=storable_text(f"{kind.__module__}.{kind.__qualname__}"),
            message=storable_text(str(exc)),
            traceback=storable_text("".join(traceback.format_exception(exc))),
            step=step,
            step_name=storable_text(step_name),
            attempt=attempt,
            at=at,
        )

    @property
    def summary(self) -> str:
        """``"ValueError: message"``, the short form used in transition details."""
        return f"{self.type.rpartition('.')[2]}: {self.message}"


_COMPACT_AT: Final = 64  # dropped entries kept in front of a shared list before it is copied

DEDUPE_KEYS_KEPT: Final = 1_000
"""How many dedupe keys (``Runtime.send(dedupe_key=...)``) a run remembers: the newest ones."""


@final
class _Keys:
    """The last ``DEDUPE_KEYS_KEPT`` dedupe keys, oldest first; O(1) ``in`` and ``added``.

    The same sharing as ``Signals``: one list per lineage, a window per version,
    plus ``index`` (key -> its newest position in the list), shared as well.
    """

    __slots__ = ("index", "items", "start", "stop")

    def __init__(self, items: list[str], start: int, stop: int, index: dict[str, int]) -> None:
        self.items = items
        self.start = start
        self.stop = stop
        self.index = index

    @classmethod
    def of(cls, keys: Iterable[str]) -> _Keys:
        items = list(dict.fromkeys(keys))[-DEDUPE_KEYS_KEPT:]
        return cls(items, 0, len(items), {key: i for i, key in enumerate(items)})

    def __contains__(self, key: str) -> bool:
        at = self.index.get(key)
        if at is None or at < self.start:
            return False
        if at < self.stop:
            return True
        # Added again after this (older) window let it go: look in the window itself.
        return key in self.items[self.start : self.stop]

    def added(self, key: str) -> _Keys:
        items, start, stop, index = self.items, self.start, self.stop, self.index
        if stop != len(items) or (start >= _COMPACT_AT and start * 2 > len(items)):
            window = items[start:stop]  # another version shares the list, or most of it is dropped keys
            items, start, stop, index = window, 0, len(window), {k: i for i, k in enumerate(window)}
        index[key] = len(items)
        items.append(key)
        stop += 1
        if stop - start > DEDUPE_KEYS_KEPT:
            start += 1
        return _Keys(items, start, stop, index)

    def __iter__(self) -> Iterator[str]:
        return map(self.items.__getitem__, range(self.start, self.stop))


@final
class Signals(Sequence[tuple[str, Any]]):
    """A run's pending signals, oldest first: an immutable sequence of ``(name, data)`` pairs.

    It reads like the tuple of pairs it replaces: iteration, ``len``,
    indexing, ``==`` and ``hash`` as that tuple, and it pickles (and copies)
    as that tuple, so no hotstate class reaches a pickle. Built from any
    iterable of pairs (a decoded tuple).

    ``appended`` and dropping the oldest pair are O(1), where a tuple copied
    every pending pair on each ``send`` (139 us per send at 16k pending, #11):
    the snapshots of one run share one list and each sees its own window of
    it. A list is only ever appended to, and only by the newest window (the
    one ending at its end); appending to an older window copies it first, so
    no earlier snapshot ever sees a change. ``count_of(name)`` is O(1) too.

    It also remembers the dedupe keys of the last ``DEDUPE_KEYS_KEPT``
    signals sent with one (``dedupe``, ``has_key``), kept the same way: they
    change with the pending signals, in the same commit. They are not part
    of ``==``, ``hash`` or the pickled tuple, which stand for the pairs only.

    Args:
        pairs: ``(name, data)`` pairs, oldest first.
        dedupe: dedupe keys, oldest first (the newest ``DEDUPE_KEYS_KEPT`` are kept).
    """

    __slots__ = ("_counts", "_items", "_keys", "_start", "_stop")

    def __init__(self, pairs: Iterable[tuple[str, Any]] = (), *, dedupe: Iterable[str] = ()) -> None:
        items = [(name, data) for name, data in pairs]
        counts: dict[str, int] = {}
        for name, _ in items:
            counts[name] = counts.get(name, 0) + 1
        self._items = items
        self._start = 0
        self._stop = len(items)
        self._counts = counts
        keys = _Keys.of(dedupe)
        self._keys: _Keys | None = keys if keys.stop else None

    @classmethod
    def of(cls, pairs: Iterable[tuple[str, Any]]) -> Signals:
        """Return ``pairs`` if it is a ``Signals`` already, else a ``Signals`` of them (O(n) once).

        Args:
            pairs: ``(name, data)`` pairs, oldest first.

        Returns:
            The pending signals.
        """
        return pairs if type(pairs) is Signals else cls(pairs)

    def _window(self, items: list[tuple[str, Any]], start: int, stop: int, counts: dict[str, int]) -> Signals:
        new = object.__new__(Signals)
        new._items = items
        new._start = start
        new._stop = stop
        new._counts = counts
        new._keys = self._keys
        return new

    def appended(self, name: str, data: Any, dedupe_key: str | None = None) -> Signals:
        """Return these signals with ``(name, data)`` after them; O(1) amortized.

        Args:
            name: the signal's name.
            data: its data.
            dedupe_key: remember this key too (``has_key``); the oldest one
                goes once ``DEDUPE_KEYS_KEPT`` are kept.

        Returns:
            The new pending signals (this object is unchanged).
        """
        items, start, stop = self._items, self._start, self._stop
        if stop != len(items):  # a later window shares this list: branch off with a copy
            items, start, stop = items[start:stop], 0, stop - start
        items.append((name, data))
        counts = self._counts.copy()
        counts[name] = counts.get(name, 0) + 1
        new = self._window(items, start, stop + 1, counts)
        if dedupe_key is not None:
            keys = self._keys
            new._keys = _Keys.of((dedupe_key,)) if keys is None else keys.added(dedupe_key)
        return new

    def has_key(self, key: str) -> bool:
        """Return whether a signal was sent with dedupe key ``key`` (among the last ``DEDUPE_KEYS_KEPT``); O(1).

        Args:
            key: a dedupe key.

        Returns:
            True if it is remembered.
        """
        keys = self._keys
        return keys is not None and key in keys

    @property
    def dedupe(self) -> tuple[str, ...]:
        """The remembered dedupe keys, oldest first."""
        keys = self._keys
        return () if keys is None else tuple(keys)

    def without_first(self, name: str) -> Signals:
        """Return these signals without the oldest one called ``name`` (the one a step consumed).

        O(1) when it is the oldest of all, else O(n).

        Args:
            name: the signal's name.

        Returns:
            The new pending signals (``self`` when none is called ``name``).
        """
        items, start, stop = self._items, self._start, self._stop
        if not self._counts.get(name):
            return self
        at = next(i for i in range(start, stop) if items[i][0] == name)
        counts = self._counts.copy()
        if counts[name] == 1:
            del counts[name]
        else:
            counts[name] -= 1
        if at != start:
            kept = items[start:at] + items[at + 1 : stop]
            return self._window(kept, 0, len(kept), counts)
        start += 1
        if start >= _COMPACT_AT and start * 2 > len(items):  # most of the list is dropped pairs: copy the window
            items, start, stop = items[start:stop], 0, stop - start
        return self._window(items, start, stop, counts)

    def count_of(self, name: str) -> int:
        """Return how many pending signals are called ``name``; O(1).

        Args:
            name: a signal name.

        Returns:
            The count.
        """
        return self._counts.get(name, 0)

    def __len__(self) -> int:
        return self._stop - self._start

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        return map(self._items.__getitem__, range(self._start, self._stop))

    @overload
    def __getitem__(self, index: int) -> tuple[str, Any]: ...

    @overload
    def __getitem__(self, index: slice) -> tuple[tuple[str, Any], ...]: ...

    def __getitem__(self, index: int | slice) -> tuple[str, Any] | tuple[tuple[str, Any], ...]:
        if isinstance(index, slice):
            return tuple(self)[index]
        n = self._stop - self._start
        i = index + n if index < 0 else index
        if not 0 <= i < n:
            raise IndexError("Signals index out of range")
        return self._items[self._start + i]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Signals | tuple):
            return len(self) == len(other) and tuple(self) == tuple(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        return f"Signals({list(self)!r})"

    def __reduce__(self) -> tuple[type[tuple[Any, ...]], tuple[tuple[tuple[str, Any], ...]]]:
        return tuple, (tuple(self),)  # pickled and copied as the tuple of pairs it stands for (no keys)


class Snapshot(NamedTuple):
    """The immutable state of one run at one version.

    Attributes:
        run_id: the run's id.
        workflow: the workflow's name.
        workflow_version: the workflow definition's version.
        version: starts at 1, +1 per transition, never reused.
        step: the cursor: index of the next step to run.
        status: where the run is.
        payload: the user's data (never mutated in place by hotstate).
        error: the latest failure, or None.
        updated_at: wall-clock time of this version.
        attempt: the attempt number the step at the cursor is on (1-based).
        signals: signals received but not yet consumed, oldest first,
            as ``(name, data)`` pairs: a ``Signals`` (O(1) append), or a
            tuple of pairs (a new or decoded snapshot); both compare equal
            to the tuple of pairs.
    """

    run_id: str
    workflow: str
    workflow_version: int
    version: int
    step: int
    status: Status
    payload: Any
    error: ErrorInfo | None
    updated_at: float
    attempt: int = 1
    signals: Sequence[tuple[str, Any]] = ()

    @property
    def finished(self) -> bool:
        """True when the run is done, failed or cancelled."""
        return self.status in TERMINAL_STATUSES

    @property
    def dedupe(self) -> tuple[str, ...]:
        """The dedupe keys of the last ``DEDUPE_KEYS_KEPT`` signals sent with one, oldest first.

        Kept in ``signals`` (a ``Signals``), which they change with; a tuple of
        pairs (a new or decoded snapshot) has none.
        """
        signals = self.signals
        return signals.dedupe if type(signals) is Signals else ()


class Transition(NamedTuple):
    """One entry of a run's audit trail.

    Attributes:
        run_id: the run's id.
        version: the snapshot version this transition produced.
        kind: what happened.
        step: the step cursor it concerns.
        status: the run's status after it.
        at: wall-clock time.
        detail: a short human-readable detail (error summary, signal name), or None.
    """

    run_id: str
    version: int
    kind: TransitionKind
    step: int
    status: Status
    at: float
    detail: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class DeadLetter:
    """A run that failed for good, kept so that it is never silently dropped.

    Attributes:
        run_id: the run's id.
        workflow: the workflow's name.
        snapshot: the final snapshot (status failed).
        error: the error that made the run give up.
        attempts: every recorded step failure of the run, oldest first, with times.
        compensation_errors: compensations that raised (recorded, not hidden).
        at: wall-clock time the record was written.
    """

    run_id: str
    workflow: str
    snapshot: Snapshot
    error: ErrorInfo
    attempts: tuple[ErrorInfo, ...]
    compensation_errors: tuple[ErrorInfo, ...]
    at: float
