"""Instruments: observe a runtime without monkeypatching it (trio's ``Instrument`` is the model).

An ``Instrument`` overrides the hooks it cares about. The runtime asks
``Instruments`` once, at construction, which hooks any instrument overrides, and
calls only those: with no instrument installed (or none overriding a hook) that
hook costs nothing, not even a call. A hook that raises is logged and the
instrument keeps its place; the run and the flush go on.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, final

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from hotstate.actors import Snapshot, Transition

__all__ = ["Instrument", "Instruments"]

log = logging.getLogger("hotstate.instrument")

_HOOKS = ("transition_committed", "save_started", "save_finished")


class Instrument:
    """Base class of runtime observers; override only the hooks you need.

    Hooks run synchronously inside the runtime (the step path for
    ``transition_committed``, the flush for the save hooks): keep them O(1) and
    free of I/O.
    """

    def transition_committed(self, snapshot: Snapshot, transition: Transition) -> None:
        """A run's new snapshot became current (after the tiers were told about it).

        Args:
            snapshot: the run's new current snapshot.
            transition: the transition that made it.
        """

    def save_started(self, tier: str) -> None:
        """A tier's flush is about to write one batch to its store.

        Args:
            tier: the tier's name.
        """

    def save_finished(self, tier: str, error: BaseException | None) -> None:
        """A tier's store write returned (``error`` is None) or raised.

        Args:
            tier: the tier's name.
            error: what the write raised, if anything.
        """


@final
class Instruments:
    """The installed instruments, with one list of bound hooks per hook name.

    Args:
        instruments: the instruments, called in this order.
    """

    __slots__ = ("committed", "save_finished", "save_started")

    def __init__(self, instruments: Iterable[Instrument] = ()) -> None:
        chosen = list(instruments)
        hooks: dict[str, list[Callable[..., None]]] = {name: [] for name in _HOOKS}
        for instrument in chosen:
            for name in _HOOKS:
                if getattr(type(instrument), name) is not getattr(Instrument, name):
                    hooks[name].append(getattr(instrument, name))
        self.committed: tuple[Callable[[Snapshot, Transition], None], ...] = tuple(hooks["transition_committed"])
        self.save_started: tuple[Callable[[str], None], ...] = tuple(hooks["save_started"])
        self.save_finished: tuple[Callable[[str, BaseException | None], None], ...] = tuple(hooks["save_finished"])

    def wrap_mark(
        self, mark: Callable[[Snapshot, Transition], None] | None
    ) -> Callable[[Snapshot, Transition], None] | None:
        """Return ``mark`` followed by every ``transition_committed`` hook (``mark`` itself when none)."""
        hooks = self.committed
        if not hooks:
            return mark

        def committed(snapshot: Snapshot, transition: Transition) -> None:
            if mark is not None:
                mark(snapshot, transition)
            for hook in hooks:
                try:
                    hook(snapshot, transition)
                except Exception:
                    log.exception("hotstate: instrument hook transition_committed failed")

        return committed

    def saving(self, tier: str) -> None:
        """Call every ``save_started`` hook."""
        for hook in self.save_started:
            try:
                hook(tier)
            except Exception:
                log.exception("hotstate: instrument hook save_started failed")

    def saved(self, tier: str, error: BaseException | None) -> None:
        """Call every ``save_finished`` hook."""
        for hook in self.save_finished:
            try:
                hook(tier, error)
            except Exception:
                log.exception("hotstate: instrument hook save_finished failed")
