"""Fixtures for the store contract suite: one ``store`` per tier, and a Valkey server.

The Valkey fixtures (``valkey_url``, ``valkey_prefix``) live in tests/conftest.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from hotstate.persistence import (
    MemoryStore,
    PostgresStore,
    SQLiteStore,
    Store,
    ValkeyStore,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

TIERS = ("memory", "sqlite", "valkey", "valkey-cluster", "postgres")


async def make_store(request: pytest.FixtureRequest, tier: str, tmp_path: Path) -> Store:
    if tier == "memory":
        return MemoryStore()
    if tier == "sqlite":
        return SQLiteStore(tmp_path / "hotstate.db")
    if tier == "valkey-cluster":  # three primaries: a store's shards spread over every node
        return ValkeyStore(
            request.getfixturevalue("valkey_cluster"),
            prefix=request.getfixturevalue("valkey_cluster_prefix"),
            socket_timeout=2.0,
        )
    if tier == "postgres":
        return PostgresStore(request.getfixturevalue("postgres_url"), schema=request.getfixturevalue("postgres_schema"))
    url: str = request.getfixturevalue("valkey_url")
    prefix: str = request.getfixturevalue("valkey_prefix")
    return ValkeyStore(url, prefix=prefix, socket_timeout=2.0)


@pytest.fixture(params=TIERS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    async with await make_store(request, request.param, tmp_path) as opened:
        yield opened
