"""Fixtures for the store contract suite: one ``store`` per tier, and a Valkey server.

The Valkey server is ``HOTSTATE_VALKEY_URL`` when set, else a private
``EmbeddedValkey`` for the session. No server means the tests fail, never skip.
"""

from __future__ import annotations

import os
import uuid
from typing import TYPE_CHECKING

import pytest
import valkey

from hotstate.persistence import (
    EmbeddedValkey,
    MemoryStore,
    SQLiteStore,
    Store,
    ValkeyStore,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator
    from pathlib import Path

TIERS = ("memory", "sqlite", "valkey")


@pytest.fixture(scope="session")
def valkey_url() -> Iterator[str]:
    url = os.environ.get("HOTSTATE_VALKEY_URL")
    if url:
        yield url
        return
    server = EmbeddedValkey().start()  # raises (test error) if no server can be had
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def valkey_prefix(valkey_url: str) -> Iterator[str]:
    """A unique key prefix; its keys are deleted after the test.

    Sync on purpose: the async ``store`` fixture pulls it with getfixturevalue.
    """
    prefix = f"hs-test-{uuid.uuid4().hex[:12]}"
    yield prefix
    with valkey.Valkey.from_url(valkey_url) as client:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)


async def make_store(
    request: pytest.FixtureRequest, tier: str, tmp_path: Path
) -> Store:
    if tier == "memory":
        return MemoryStore()
    if tier == "sqlite":
        return SQLiteStore(tmp_path / "hotstate.db")
    url: str = request.getfixturevalue("valkey_url")
    prefix: str = request.getfixturevalue("valkey_prefix")
    return ValkeyStore(url, prefix=prefix, socket_timeout=2.0)


@pytest.fixture(params=TIERS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    async with await make_store(request, request.param, tmp_path) as opened:
        yield opened
