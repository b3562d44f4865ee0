"""Someone with write access to the PostgreSQL tables attacks the runtime (the envelope check, #11, on PostgreSQL).

tests/integration/test_envelope_attacks.py runs these attacks on Valkey and
SQLite; here the rows are changed with plain SQL, as an operator, a tool or
an attacker holding the database's credentials would: a header rewound on a
finished order, another run's body moved in, a planted pickle in every
column that holds bytes (run rows, a dead letter, kept versions). Nothing
forged is used, no finished run runs again, and no pickle executes.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import pytest

from hotstate import CorruptSnapshotError, Runtime, Status, Step, StepContext, Tier, Workflow
from hotstate.persistence import (
    SECRET_KEY_ENV,
    FlushPolicy,
    MsgpackCodec,
    PickleCodec,
    PostgresStore,
    StoredDeadLetter,
    StoredSnapshot,
)
from hotstate.persistence._records import snapshot_context

GUARD = 10.0
EFFECTS: list[tuple[str, str]] = []  # (step, run id): every side effect that happened


async def charge(p: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    EFFECTS.append(("charge", ctx.run_id))
    return p


async def ship(p: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    EFFECTS.append(("ship", ctx.run_id))
    return {**p, "shipped": True}


ORDER = Workflow("order", [Step(fn=charge), Step(fn=ship, wait_for="go")])


class Planted:
    """Unpickling it creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def tiers(url: str, schema: str) -> list[Tier]:
    return [Tier(PostgresStore(url, schema=schema), FlushPolicy(interval=0.01, keep_every=1))]


async def until_status(rt: Runtime, run_id: str, status: Status) -> None:
    with anyio.fail_after(GUARD):
        while rt.get(run_id).status is not status:  # noqa: ASYNC110 - no event for a status
            await anyio.sleep(0.001)


async def setup(url: str, schema: str) -> None:
    """alice's order is done (charged and shipped); bob's and carol's are charged, waiting to ship."""
    async with Runtime([ORDER], tiers=tiers(url, schema)) as rt:
        for name in ("alice", "bob", "carol"):
            await rt.spawn(ORDER, {"customer": name}, run_id=name)
            await until_status(rt, name, Status.waiting)
        await rt.send("alice", "go")
        with anyio.fail_after(GUARD):
            await rt.wait_finished("alice")
        await rt.flush()
    EFFECTS.clear()


async def read(url: str, schema: str, run_id: str) -> StoredSnapshot:
    async with PostgresStore(url, schema=schema, read_only=True) as store:
        found = await store.load(run_id)
    assert found is not None
    return found


async def plant(url: str, schema: str, run_id: str, **columns: object) -> None:
    """Change ``run_id``'s row in ``hs_runs`` with plain SQL."""
    sets = ", ".join(f"{name} = ${i + 2}" for i, name in enumerate(columns))
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(f'UPDATE "{schema}".hs_runs SET {sets} WHERE run_id = $1', run_id, *columns.values())  # noqa: S608
    finally:
        await conn.close()


async def recover(url: str, schema: str) -> tuple[Runtime, Any]:
    rt = Runtime([ORDER], tiers=tiers(url, schema), recover=True)
    await rt.__aenter__()
    report = rt.recovery_report
    assert report is not None
    return rt, report


@pytest.fixture(autouse=True)
def no_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SECRET_KEY_ENV, raising=False)  # the default configuration: digests, no MAC
    EFFECTS.clear()


async def test_a_done_order_rewound_by_sql_never_ships_again(postgres_url: str, postgres_schema: str) -> None:
    await setup(postgres_url, postgres_schema)
    await plant(postgres_url, postgres_schema, "alice", status="waiting", step=1, version=99)
    rt, report = await recover(postgres_url, postgres_schema)
    try:
        assert ("alice", "postgres") in [(c.run_id, c.tier) for c in report.corrupt]
        assert "alice" not in [r.run_id for r in report.resumed]
        with pytest.raises(CorruptSnapshotError):
            await rt.load("alice")
    finally:
        await rt.__aexit__(None, None, None)
    assert ("ship", "alice") not in EFFECTS


async def test_another_runs_body_moved_into_a_run_is_corrupt_and_never_resumed(
    postgres_url: str, postgres_schema: str
) -> None:
    await setup(postgres_url, postgres_schema)
    carol = await read(postgres_url, postgres_schema, "carol")
    bob = await read(postgres_url, postgres_schema, "bob")
    await plant(postgres_url, postgres_schema, "bob", body=carol.body, version=bob.header.version + 1)
    rt, report = await recover(postgres_url, postgres_schema)
    try:
        assert ("bob", "postgres") in [(c.run_id, c.tier) for c in report.corrupt]
        assert "bob" not in [r.run_id for r in report.resumed]
        assert rt.get("carol").status is Status.waiting  # the genuine owner of that body resumes
    finally:
        await rt.__aexit__(None, None, None)


async def test_a_planted_pickle_in_any_postgres_column_of_bytes_never_executes(
    postgres_url: str, postgres_schema: str, tmp_path: Path
) -> None:
    marker = tmp_path / "executed"
    await setup(postgres_url, postgres_schema)

    def evil(stored: StoredSnapshot) -> bytes:
        body = {"payload": Planted(marker), "signals": []}
        return PickleCodec(trust_stores=True).encode(body, context=snapshot_context(stored.header, stored.error))

    for run_id in ("alice", "bob"):
        await plant(postgres_url, postgres_schema, run_id, body=evil(await read(postgres_url, postgres_schema, run_id)))
    bob = await read(postgres_url, postgres_schema, "bob")
    letter = StoredDeadLetter(
        run_id="bob",
        workflow="order",
        at=bob.header.updated_at + 1,
        error='{"type":"x","message":"m","traceback":"","step":1,"step_name":"s","attempt":1,"at":1.0}',
        attempts="[]",
        compensation_errors="[]",
        snapshot=bob._replace(header=bob.header._replace(version=bob.header.version + 1)),
    )
    kept = bob._replace(header=bob.header._replace(version=bob.header.version + 10))
    async with PostgresStore(postgres_url, schema=postgres_schema) as store:
        await store.save_dead_letter(letter)
        await store.save_versions([kept._replace(body=evil(kept))])
    rt, report = await recover(postgres_url, postgres_schema)
    try:
        assert {c.run_id for c in report.corrupt} >= {"bob"}
        assert "bob" not in [r.run_id for r in report.resumed]
        for run_id in ("alice", "bob"):
            with pytest.raises(CorruptSnapshotError, match="never decodes"):
                await rt.load(run_id)
        with pytest.raises(CorruptSnapshotError, match="never decodes"):
            await rt.snapshot_at("bob", kept.header.version)
    finally:
        await rt.__aexit__(None, None, None)
    stores = ["--postgres", postgres_url, "--schema", postgres_schema]
    for args in (["list"], ["show", "bob"], ["show", "alice"], ["dead-letters"], ["history", "bob"], ["retry", "bob"]):
        done = await anyio.run_process([sys.executable, "-m", "hotstate", "runs", *stores, *args], check=False)
        assert b"Traceback" not in done.stderr, done.stderr
    assert not marker.exists()
    assert ("ship", "bob") not in EFFECTS
    # The control: the same frame decoded by a codec that trusts the stores runs the code.
    stored = await read(postgres_url, postgres_schema, "alice")
    PickleCodec(trust_stores=True).decode(stored.body, context=snapshot_context(stored.header, stored.error))
    assert marker.exists()
    assert MsgpackCodec().keyed is False
