"""What keeps runs: stores, the codec, and the write-behind persister (see docs/architecture.md).

This layer may import data types from ``hotstate.actors``, never the runtime.
"""

from __future__ import annotations

from hotstate.persistence._codec import (
    SECRET_KEY_ENV,
    Codec,
    JsonCodec,
    PickleCodec,
    frame_format,
)
from hotstate.persistence._listener import IgnoringListener, TierListener
from hotstate.persistence._memory import MemoryStore
from hotstate.persistence._persister import (
    Persister,
    PersisterStatistics,
    SnapshotEncoder,
)
from hotstate.persistence._policy import FlushPolicy, Tier
from hotstate.persistence._records import (
    RunHeader,
    SaveResult,
    StoredDeadLetter,
    StoredSnapshot,
    decode_snapshot,
    encode_snapshot,
    error_from_json,
    error_to_json,
    errors_from_json,
    errors_to_json,
    header_of,
    transition_from_json,
    transition_from_row,
    transition_to_json,
)
from hotstate.persistence._sqlite import SQLiteStore
from hotstate.persistence._store import FINISHED_STATUSES, Store
from hotstate.persistence._tiers import Tiers
from hotstate.persistence._valkey import ValkeyStore
from hotstate.persistence._valkey_server import EmbeddedValkey, ValkeyServerError

__all__ = [
    "FINISHED_STATUSES",
    "SECRET_KEY_ENV",
    "Codec",
    "EmbeddedValkey",
    "FlushPolicy",
    "IgnoringListener",
    "JsonCodec",
    "MemoryStore",
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
    "TierListener",
    "Tiers",
    "ValkeyServerError",
    "ValkeyStore",
    "decode_snapshot",
    "encode_snapshot",
    "error_from_json",
    "error_to_json",
    "errors_from_json",
    "errors_to_json",
    "frame_format",
    "header_of",
    "transition_from_json",
    "transition_from_row",
    "transition_to_json",
]
