"""Fixtures for tests that start, kill, stop or restart a Valkey server of their own.

The session's shared server (``valkey_url`` in tests/conftest.py) must never be
disturbed, so fault tests get a private ``EmbeddedValkey`` each.
"""

from __future__ import annotations

import contextlib
import os
import signal
from typing import TYPE_CHECKING

import pytest

from hotstate.persistence import EmbeddedValkey

if TYPE_CHECKING:
    from collections.abc import Iterator


@contextlib.contextmanager
def _running(server: EmbeddedValkey) -> Iterator[EmbeddedValkey]:
    server.start()
    try:
        yield server
    finally:
        if server.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(server.pid, signal.SIGCONT)  # never leave a SIGSTOPped process behind
        server.stop()


@pytest.fixture
def private_valkey() -> Iterator[EmbeddedValkey]:
    """A private server that keeps its data across a restart (append-only file)."""
    with _running(EmbeddedValkey(persistence=True)) as server:
        yield server


@pytest.fixture
def ephemeral_valkey() -> Iterator[EmbeddedValkey]:
    """A private server that comes back empty after a restart."""
    with _running(EmbeddedValkey(persistence=False)) as server:
        yield server
