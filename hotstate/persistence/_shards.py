"""Shards and fences: which shard a run belongs to, and what a fenced write carries.

DESIGN.md "Several processes": run ids map to a fixed number of shards (the
count is recorded in the stores and the authority); each shard has one owner
at a time, whose claims bump the shard's *epoch*. Every store write of an
owner carries a ``Fence`` (its member id and the epoch of each shard it
writes), and a store refuses a shard's rows when its own fence for that
shard is newer (``fence_verdict``). Pure functions and data: no I/O.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Literal

from hotstate._errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

__all__ = [
    "DEFAULT_SHARDS",
    "MAX_SHARDS",
    "Fence",
    "check_shards",
    "fence_verdict",
    "generated_prefix",
    "judge_fences",
    "shard_of",
]

DEFAULT_SHARDS: Final = 128
"""The shard count of stores and authorities that were given none."""

MAX_SHARDS: Final = 16_384
"""The largest shard count (one Valkey Cluster hash slot each at most)."""


def check_shards(field_name: str, shards: object) -> int:
    """``shards`` as a shard count, or ``ConfigError`` naming ``field_name``."""
    if type(shards) is not int or not 1 <= shards <= MAX_SHARDS:
        raise ConfigError(field_name, shards, f"must be an int from 1 to {MAX_SHARDS}")
    return shards


def generated_prefix(shard: int) -> str:
    """The prefix of run ids hotstate generates in ``shard``: ``s17.~`` (``shard_of`` reads it back)."""
    return f"s{shard}.~"


_PREFIXES: dict[str, int] = {}  # "s17" -> 17, filled as generated ids are seen (at most 100,000 entries)


def shard_of(run_id: str, shards: int) -> int:
    """The shard of ``run_id`` among ``shards``: the same in every process, language and release.

    An id hotstate generated carries its shard (``s17.~<unique>``), read back
    without hashing. Any other id (or one whose prefix names a shard past
    ``shards``) is ``zlib.crc32`` of its UTF-8 bytes modulo ``shards``;
    Python's ``hash()`` is randomized per process and never used. Text that
    does not encode (a lone surrogate) hashes its escaped form. About 0.1 us
    either way (it runs once per snapshot a flush writes).
    """
    head, sep, _ = run_id.partition(".~")
    if sep:
        n = _PREFIXES.get(head)
        if n is None and len(head) < 7 and head[:1] == "s" and head[1:].isascii() and head[1:].isdigit():
            n = _PREFIXES[head] = int(head[1:])
        if n is not None and n < shards:
            return n
    try:
        raw = run_id.encode()
    except UnicodeEncodeError:
        raw = run_id.encode("utf-8", "backslashreplace")
    return zlib.crc32(raw) % shards


@dataclass(frozen=True, slots=True)
class Fence:
    """What a fenced store write carries: the writer and the epoch of each shard it writes.

    Attributes:
        owner: the writing member's id (fresh per process start).
        epochs: shard -> the epoch this writer holds it at. A run of a shard
            not named here is refused as fenced (its writer owns no epoch there).
    """

    owner: str
    epochs: Mapping[int, int] = field(default_factory=dict)


Verdict = Literal["write", "raise", "fenced"]


def fence_verdict(stored_epoch: int | None, stored_owner: str | None, epoch: int, owner: str) -> Verdict:
    """What a store does with a write at ``(epoch, owner)`` over its fence ``(stored_epoch, stored_owner)``.

    ``fenced``: the stored fence is newer, or the same epoch belongs to another
    owner (an epoch handed out twice: the first writer keeps the shard).
    ``raise``: no fence yet or an older one; the store raises it to this
    write's, in the same transaction or script (a first write after a seal
    that did not reach this store). ``write``: the fence is this writer's.
    """
    if stored_epoch is None or stored_epoch < epoch:
        return "raise"
    if stored_epoch > epoch or stored_owner != owner:
        return "fenced"
    return "write"


def judge_fences(
    stored: Mapping[int, tuple[int, str]], fence: Fence, shards: Iterable[int]
) -> tuple[dict[int, int], list[tuple[int, int, str]]]:
    """``fence_verdict`` for each of ``shards`` against the ``stored`` fences (shard -> (epoch, owner)).

    Returns:
        The shards fenced (shard -> the stored epoch; a shard ``fence.epochs``
        does not name is fenced at its stored epoch, 0 when it has none), and
        the fences to raise to the writer's, as ``(shard, epoch, owner)``. A
        store applies both in the same transaction or script as its write.
    """
    lost: dict[int, int] = {}
    raised: list[tuple[int, int, str]] = []
    owner = fence.owner
    for shard in shards:
        held = stored.get(shard)
        epoch = fence.epochs.get(shard)
        if epoch is None:
            lost[shard] = 0 if held is None else held[0]
            continue
        verdict = fence_verdict(None, None, epoch, owner) if held is None else fence_verdict(*held, epoch, owner)
        if verdict == "raise":
            raised.append((shard, epoch, owner))
        elif verdict == "fenced" and held is not None:
            lost[shard] = held[0]
    return lost, raised
