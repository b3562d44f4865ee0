"""What keeps runs: stores, codecs, flush policies and tiers (see docs/architecture.md).

This layer may import data types from ``hotstate.actors``, never the runtime.
"""

from __future__ import annotations

from hotstate.persistence._authority import Authority, MemberInfo, MemoryAuthority, Renewal, ShardLease
from hotstate.persistence._codec import SECRET_KEY_ENV, Codec, JsonCodec, MsgpackCodec, PickleCodec
from hotstate.persistence._memory import MemoryStore
from hotstate.persistence._persister import PersisterStatistics
from hotstate.persistence._policy import FlushPolicy, Tier
from hotstate.persistence._postgres import PostgresStore
from hotstate.persistence._postgres_authority import PostgresAuthority
from hotstate.persistence._records import (
    BadRow,
    RunHeader,
    SaveResult,
    StoredDeadLetter,
    StoredSnapshot,
)
from hotstate.persistence._shards import DEFAULT_SHARDS, Fence, shard_of
from hotstate.persistence._sqlite import SQLiteStore
from hotstate.persistence._sqlite_authority import SQLiteAuthority
from hotstate.persistence._store import FINISHED_STATUSES, DeadLetterRefusals, Store
from hotstate.persistence._valkey import ValkeyStore
from hotstate.persistence._valkey_authority import ValkeyAuthority
from hotstate.persistence._valkey_server import EmbeddedValkey, EmbeddedValkeyCluster, ValkeyServerError

__all__ = [
    "DEFAULT_SHARDS",
    "FINISHED_STATUSES",
    "SECRET_KEY_ENV",
    "Authority",
    "BadRow",
    "Codec",
    "DeadLetterRefusals",
    "EmbeddedValkey",
    "EmbeddedValkeyCluster",
    "Fence",
    "FlushPolicy",
    "JsonCodec",
    "MemberInfo",
    "MemoryAuthority",
    "MemoryStore",
    "MsgpackCodec",
    "PersisterStatistics",
    "PickleCodec",
    "PostgresAuthority",
    "PostgresStore",
    "Renewal",
    "RunHeader",
    "SQLiteAuthority",
    "SQLiteStore",
    "SaveResult",
    "ShardLease",
    "Store",
    "StoredDeadLetter",
    "StoredSnapshot",
    "Tier",
    "ValkeyAuthority",
    "ValkeyServerError",
    "ValkeyStore",
    "shard_of",
]
