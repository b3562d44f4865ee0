"""What keeps runs: stores, the codec, and the write-behind persister (see DESIGN.md).

This layer may import data types from ``hotstate.actors``, never the runtime.
"""

from __future__ import annotations

from hotstate.persistence._codec import SECRET_KEY_ENV, Codec, JsonCodec, PickleCodec
from hotstate.persistence._memory import MemoryStore
from hotstate.persistence._persister import (
    Persistence,
    Persister,
    PersisterStatistics,
    SnapshotEncoder,
    Tier,
)
from hotstate.persistence._policy import FlushPolicy
from hotstate.persistence._records import (
    RunHeader,
    SaveResult,
    StoredDeadLetter,
    StoredSnapshot,
    decode_snapshot,
    encode_snapshot,
)
from hotstate.persistence._sqlite import SQLiteStore
from hotstate.persistence._store import Store

__all__ = [
    "SECRET_KEY_ENV",
    "Codec",
    "FlushPolicy",
    "JsonCodec",
    "MemoryStore",
    "Persistence",
    "Persister",
    "PersisterStatistics",
    "PickleCodec",
    "RunHeader",
    "SQLiteStore",
    "SaveResult",
    "SnapshotEncoder",
    "Store",
    "StoredDeadLetter",
    "StoredSnapshot",
    "Tier",
    "decode_snapshot",
    "encode_snapshot",
]
