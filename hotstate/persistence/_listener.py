"""``TierListener``: how a persister tells its owner what happened, passed to its constructor.

The persistence layer never imports the runtime. What the runtime must hear from
a tier (a parked run may go on, a tier is over its memory bound, a payload cannot
be encoded, the store holds a newer version of a run, a store lost its data)
arrives through this one protocol, which the
runtime's scheduler implements. ``IgnoringListener`` serves a persister used on
its own (benchmarks, tests).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, final

if TYPE_CHECKING:
    from collections.abc import Mapping

    from hotstate._errors import CodecError, StaleVersionError

__all__ = ["IgnoringListener", "TierListener"]


class TierListener(Protocol):
    """What a tier reports upward. Every call is synchronous and comes from the tier's flush or ``mark``."""

    def durable(self, item: Any) -> None:
        """The flush that ``notify_when_durable`` (or a throttle) waited for is acknowledged: hand ``item`` on."""
        ...

    def pressure(self, tier: str, on: bool) -> None:
        """``tier`` passed its memory bound (``on``) or drained below it again."""
        ...

    def codec_error(self, run_id: str, exc: CodecError) -> None:
        """The newest snapshot of ``run_id`` cannot be encoded: the run must fail."""
        ...

    def conflict(self, run_id: str, exc: StaleVersionError) -> None:
        """The store skipped ``run_id``'s snapshot because it holds a newer version: the run must stop."""
        ...

    def reset(self, tier: str) -> None:
        """``tier``'s store lost its data: queue everything held in memory for it again."""
        ...

    def fenced(self, tier: str, shards: Mapping[int, int], sent: Mapping[int, int]) -> None:
        """``tier``'s fence refused these shards (shard -> the stored epoch) of a save made at ``sent`` epochs."""
        ...


@final
class IgnoringListener:
    """A ``TierListener`` that ignores every report (a persister driven by hand)."""

    def durable(self, item: Any) -> None:
        """Ignore."""

    def pressure(self, tier: str, on: bool) -> None:
        """Ignore."""

    def codec_error(self, run_id: str, exc: CodecError) -> None:
        """Ignore."""

    def conflict(self, run_id: str, exc: StaleVersionError) -> None:
        """Ignore."""

    def reset(self, tier: str) -> None:
        """Ignore."""

    def fenced(self, tier: str, shards: Mapping[int, int], sent: Mapping[int, int]) -> None:
        """Ignore."""
