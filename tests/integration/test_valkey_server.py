"""EmbeddedValkey: a real valkey-server child process, and ValkeyStore across an outage."""

from __future__ import annotations

import os
import signal

import pytest
import valkey

from hotstate import Snapshot, Status, StoreUnavailableError
from hotstate.persistence import (
    EmbeddedValkey,
    PickleCodec,
    ValkeyStore,
)
from hotstate.persistence._records import encode_snapshot


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_server_answers_on_its_url_and_stop_removes_process_and_directory() -> None:
    server = EmbeddedValkey().start()
    try:
        assert server.url == f"valkey://127.0.0.1:{server.port}/0"
        with valkey.Valkey.from_url(server.url) as client:
            assert client.ping()
        pid, data_dir = server.pid, server.data_dir
        assert pid is not None
        assert data_dir is not None
        assert data_dir.is_dir()
    finally:
        server.stop()
    assert not server.running
    assert not pid_alive(pid)
    assert not data_dir.exists()
    server.stop()  # idempotent


def test_restart_keeps_the_port_and_with_persistence_the_data() -> None:
    with EmbeddedValkey(persistence=True) as server:
        port, first_pid = server.port, server.pid
        with valkey.Valkey.from_url(server.url) as client:
            client.set("k", "v")
        server.restart()
        assert (server.port, server.running) == (port, True)
        assert server.pid != first_pid
        with valkey.Valkey.from_url(server.url) as client:
            assert client.get("k") == b"v"


async def test_store_reports_an_outage_as_unavailable_and_recovers_after_restart() -> None:
    codec = PickleCodec(trust_stores=True)
    snapshot = Snapshot(
        run_id="r",
        workflow="w",
        workflow_version=1,
        version=1,
        step=0,
        status=Status.running,
        payload={"n": 1},
        error=None,
        updated_at=1.0,
    )
    with EmbeddedValkey(persistence=True) as server:
        async with ValkeyStore(server.url, socket_timeout=1.0) as store:
            await store.save([encode_snapshot(snapshot, codec)], [])
            assert server.pid is not None
            os.kill(server.pid, signal.SIGKILL)
            server.kill()
            with pytest.raises(StoreUnavailableError) as info:
                await store.save([encode_snapshot(snapshot._replace(version=2), codec)], [])
            assert info.value.tier == "valkey"
            server.start()
            result = await store.save([encode_snapshot(snapshot._replace(version=2), codec)], [])
            assert result.written == 1
