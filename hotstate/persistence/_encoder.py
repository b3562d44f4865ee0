"""``SnapshotEncoder``: each (run, version) encoded once however many tiers flush it, and freed once all have it.

Payloads are encoded once per version, not once per tier: the first
tier to flush a version encodes it; the others reuse that encoding. Each
persister's acknowledgement tells the encoder, which drops the entry once every
tier holds that version durable, so a long-running service keeps encodings only
of what some tier has still to write (before: every run's newest encoding, until
an explicit ``Runtime.flush()``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, final

from hotstate.persistence._records import encode_snapshot

if TYPE_CHECKING:
    from collections.abc import Callable

    from hotstate.actors import Snapshot
    from hotstate.persistence._codec import Codec
    from hotstate.persistence._records import StoredSnapshot

__all__ = ["SnapshotEncoder"]


@final
class SnapshotEncoder:
    """Encodes each (run, version) once, however many tiers flush it.

    An encoding is kept until every tier has that version durable, then freed
    (``acknowledged``), so a long-running service holds encodings only of what
    some tier has still to write.

    Args:
        codec: the payload codec.
    """

    def __init__(self, codec: Codec) -> None:
        self.codec = codec
        self._cache: dict[str, tuple[int, StoredSnapshot]] = {}
        self._durable: list[dict[str, int]] = []  # each tier's durable versions
        self.encodes = 0
        # Ownership: the epoch each run's copy is written under (its shard's); None: 0 for all.
        self.epoch_of: Callable[[str], int] | None = None

    def track(self, durable: dict[str, int]) -> None:
        """Count one more tier: an encoding is freed once ``durable`` (and every other tracked map) holds its version."""
        self._durable.append(durable)

    def encode(self, snapshot: Snapshot) -> StoredSnapshot:
        """Encode ``snapshot`` (or return the cached encoding of that version).

        Raises:
            CodecError: the payload cannot be encoded.
        """
        hit = self._cache.get(snapshot.run_id)
        if hit is not None and hit[0] == snapshot.version:
            return hit[1]
        epoch_of = self.epoch_of
        stored = encode_snapshot(snapshot, self.codec, 0 if epoch_of is None else epoch_of(snapshot.run_id))
        self.encodes += 1
        self._cache[snapshot.run_id] = (snapshot.version, stored)
        return stored

    def acknowledged(self, run_id: str, version: int) -> None:
        """A tier has ``version`` of ``run_id`` durable: free the encoding once every tier has it."""
        cache = self._cache
        if not cache:
            return
        hit = cache.get(run_id)
        if hit is None or hit[0] > version:
            return
        held = hit[0]
        for durable in self._durable:
            if durable.get(run_id, 0) < held:
                return
        del cache[run_id]

    def forget(self, run_id: str) -> None:
        """Drop the encoding of a run that left memory (purged)."""
        self._cache.pop(run_id, None)

    def __len__(self) -> int:
        return len(self._cache)
