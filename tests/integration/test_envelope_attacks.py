"""The red team's attacks on the stored envelope (#11), against a real Valkey and a real SQLite file.

An attacker who can write to one tier (a shared Valkey, the SQLite file) but
holds no key changes stored header fields with one ``HSET`` / ``UPDATE``,
moves genuine bodies between runs and versions, and plants dead letters. With
a key, every forgery is reported corrupt and never acted on; without one, the
same edits (which do not recompute the checksum) are caught as corruption.
Steps record each execution in ``EFFECTS``: "never acted on" is proven by
side effects that did not happen, not by the absence of an error.

A planted pickle (a perfectly valid unkeyed frame, checksum and context
recomputed, the strongest attacker without a key) never executes in the
default configuration: recovery, ``spawn`` of a stored id, ``load`` and
``hotstate runs`` all refuse to decode it.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
import valkey.asyncio as avalkey

from hotstate import (
    CorruptSnapshotError,
    RetryPolicy,
    RunFailedError,
    RunNotFoundError,
    Runtime,
    Status,
    Step,
    StepContext,
    Tier,
    Workflow,
)
from hotstate.persistence import (
    DEFAULT_SHARDS,
    SECRET_KEY_ENV,
    FlushPolicy,
    MsgpackCodec,
    PickleCodec,
    SQLiteStore,
    StoredDeadLetter,
    StoredSnapshot,
    ValkeyStore,
    shard_of,
)
from hotstate.persistence._records import snapshot_context


def vkey(prefix: str, run_id: str, kind: str = "run") -> str:
    """A run's Valkey key of ``kind`` (layout 2: each run's keys carry its shard's hash tag)."""
    return f"{prefix}:{{{shard_of(run_id, DEFAULT_SHARDS)}}}:{kind}:{run_id}"


def skey(prefix: str, run_id: str, *parts: str) -> str:
    """A key of ``run_id``'s shard: its dead letters, its status and workflow indexes."""
    return ":".join((prefix, f"{{{shard_of(run_id, DEFAULT_SHARDS)}}}", *parts))


KEY = "envelope-attack-key"
GUARD = 10.0
EFFECTS: list[tuple[str, str, Any]] = []  # (step, run id, amount): every side effect that happened


async def charge(p: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    EFFECTS.append(("charge", ctx.run_id, p["amount"]))
    return p


async def ship(p: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    EFFECTS.append(("ship", ctx.run_id, p["amount"]))
    return {**p, "shipped": True}


async def pay_out(p: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    EFFECTS.append(("refund", ctx.run_id, p["amount"]))
    return {**p, "refunded": True}


ORDER = Workflow("order", [Step(fn=charge), Step(fn=ship, wait_for="go")])
REFUND = Workflow("refund", [Step(fn=pay_out)])


class Planted:
    """Unpickling it creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


@pytest.fixture(params=[True, False], ids=["keyed", "no-key"])
def keyed(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    if request.param:
        monkeypatch.setenv(SECRET_KEY_ENV, KEY)
    else:
        monkeypatch.delenv(SECRET_KEY_ENV, raising=False)
    EFFECTS.clear()
    return bool(request.param)


def tiers(url: str, prefix: str, db: Path) -> list[Tier]:
    return [
        Tier(ValkeyStore(url, prefix=prefix, socket_timeout=1.0), FlushPolicy(interval=0.010, keep_every=1)),
        Tier(SQLiteStore(db), FlushPolicy(interval=1.0, keep_every=1)),
    ]


async def until_status(rt: Runtime, run_id: str, status: Status) -> None:
    with anyio.fail_after(GUARD):
        while rt.get(run_id).status is not status:  # noqa: ASYNC110 - no event for a status
            await anyio.sleep(0.001)


async def setup(url: str, prefix: str, db: Path) -> None:
    """alice's order is done (charged and shipped); bob's and carol's are charged, waiting to ship."""
    async with Runtime([ORDER, REFUND], tiers=tiers(url, prefix, db)) as rt:
        await rt.spawn(ORDER, {"customer": "alice", "amount": 10}, run_id="alice")
        await rt.spawn(ORDER, {"customer": "bob", "amount": 20}, run_id="bob")
        await rt.spawn(ORDER, {"customer": "carol", "amount": 9000}, run_id="carol")
        await until_status(rt, "alice", Status.waiting)
        await rt.send("alice", "go")
        with anyio.fail_after(GUARD):
            await rt.wait_finished("alice")
        await until_status(rt, "bob", Status.waiting)
        await until_status(rt, "carol", Status.waiting)
        await rt.flush()
    EFFECTS.clear()


async def read(tier: str, url: str, prefix: str, db: Path, run_id: str) -> StoredSnapshot:
    store = SQLiteStore(db) if tier == "sqlite" else ValkeyStore(url, prefix=prefix, read_only=True)
    async with store:
        stored = await store.load(run_id)
    assert stored is not None
    return stored


async def plant(tier: str, url: str, prefix: str, db: Path, run_id: str, fields: dict[str, Any]) -> None:
    """Overwrite stored fields of one run in one tier with the backend's own commands (no hotstate code)."""
    if tier == "sqlite":
        with sqlite3.connect(db) as conn:
            sets = ", ".join(f"{name} = ?" for name in fields)
            conn.execute(f"UPDATE runs SET {sets} WHERE run_id = ?", [*fields.values(), run_id])  # noqa: S608
        conn.close()
        return
    raw = avalkey.Valkey.from_url(url)
    try:
        await raw.hset(vkey(prefix, run_id), mapping=fields)
    finally:
        await raw.aclose()


async def recover(url: str, prefix: str, db: Path) -> tuple[Runtime, Any]:
    rt = Runtime([ORDER, REFUND], tiers=tiers(url, prefix, db), recover=True)
    await rt.__aenter__()
    return rt, rt.recovery_report


TIERS = ["valkey", "sqlite"]


@pytest.mark.parametrize("tier", TIERS)
async def test_rewinding_a_done_order_never_ships_it_again(
    valkey_url: str, valkey_prefix: str, tmp_path: Path, tier: str, keyed: bool
) -> None:
    db = tmp_path / "runs.db"
    await setup(valkey_url, valkey_prefix, db)
    done = await read(tier, valkey_url, valkey_prefix, db, "alice")
    # Back to "waiting to ship", one version ahead of every other copy.
    await plant(tier, valkey_url, valkey_prefix, db, "alice", {"status": "waiting", "step": 1, "version": 99})
    rt, report = await recover(valkey_url, valkey_prefix, db)
    try:
        assert [(c.run_id, c.tier, c.version) for c in report.corrupt] == [("alice", tier, 99)]
        assert "alice" not in [r.run_id for r in report.resumed]
        with pytest.raises(RunNotFoundError):  # finished: not held in memory, never resumed
            await rt.send("alice", "go")
        snap = await rt.load("alice")
        assert (snap.status, snap.version) == (Status.done, done.header.version)
    finally:
        await rt.__aexit__(None, None, None)
    assert [e for e in EFFECTS if e[1] == "alice"] == []


@pytest.mark.parametrize("tier", TIERS)
async def test_another_runs_body_in_a_run_is_corrupt_and_never_resumed(
    valkey_url: str, valkey_prefix: str, tmp_path: Path, tier: str, keyed: bool
) -> None:
    db = tmp_path / "runs.db"
    await setup(valkey_url, valkey_prefix, db)
    carol = await read(tier, valkey_url, valkey_prefix, db, "carol")
    bob = await read(tier, valkey_url, valkey_prefix, db, "bob")
    # carol's genuine body as bob's newest copy (one version ahead, so recovery must look at it).
    await plant(tier, valkey_url, valkey_prefix, db, "bob", {"body": carol.body, "version": bob.header.version + 1})
    rt, report = await recover(valkey_url, valkey_prefix, db)
    try:
        assert ("bob", tier) in [(c.run_id, c.tier) for c in report.corrupt]
        other = "sqlite" if tier == "valkey" else "valkey"
        assert ("bob", other) in [(r.run_id, r.tier) for r in report.resumed]
        assert rt.get("bob").payload == {"customer": "bob", "amount": 20}  # bob's own, from the other tier
        await rt.send("bob", "go")
        with anyio.fail_after(GUARD):
            await rt.wait_finished("bob")
    finally:
        await rt.__aexit__(None, None, None)
    assert ("ship", "bob", 20) in EFFECTS
    assert ("ship", "bob", 9000) not in EFFECTS


async def test_an_older_genuine_body_under_a_raised_version_loses_to_the_newer_copy(
    valkey_url: str, valkey_prefix: str, tmp_path: Path, keyed: bool
) -> None:
    db = tmp_path / "runs.db"
    await setup(valkey_url, valkey_prefix, db)
    old = await read("valkey", valkey_url, valkey_prefix, db, "bob")  # genuine: bob waiting to ship
    async with Runtime([ORDER, REFUND], tiers=tiers(valkey_url, valkey_prefix, db), recover=True) as rt:
        await rt.send("bob", "go")
        with anyio.fail_after(GUARD):
            await rt.wait_finished("bob")
        done = rt.get("bob").version
    EFFECTS.clear()
    # Roll bob back to the older genuine copy, its version raised above the newest.
    fields = {"body": old.body, "status": old.header.status, "step": old.header.step, "version": done + 50}
    await plant("valkey", valkey_url, valkey_prefix, db, "bob", fields)
    rt, report = await recover(valkey_url, valkey_prefix, db)
    try:
        assert [(c.run_id, c.tier, c.version) for c in report.corrupt] == [("bob", "valkey", done + 50)]
        assert "bob" not in [r.run_id for r in report.resumed]
        snap = await rt.load("bob")
        assert (snap.status, snap.version) == (Status.done, done)  # SQLite's newer copy
    finally:
        await rt.__aexit__(None, None, None)
    assert EFFECTS == []  # never shipped again


@pytest.mark.parametrize("tier", TIERS)
async def test_retyping_an_order_into_the_refund_workflow_never_pays_out(
    valkey_url: str, valkey_prefix: str, tmp_path: Path, tier: str, keyed: bool
) -> None:
    db = tmp_path / "runs.db"
    await setup(valkey_url, valkey_prefix, db)
    await plant(tier, valkey_url, valkey_prefix, db, "carol", {"workflow": "refund", "step": 0, "version": 77})
    rt, report = await recover(valkey_url, valkey_prefix, db)
    try:
        assert [(c.run_id, c.tier, c.version) for c in report.corrupt] == [("carol", tier, 77)]
        assert rt.get("carol").workflow == "order"
        await rt.flush()
    finally:
        await rt.__aexit__(None, None, None)
    assert [e for e in EFFECTS if e[0] == "refund"] == []


@pytest.mark.parametrize("tier", TIERS)
async def test_a_planted_dead_letter_never_fails_a_live_run(
    valkey_url: str, valkey_prefix: str, tmp_path: Path, tier: str, keyed: bool
) -> None:
    db = tmp_path / "runs.db"
    await setup(valkey_url, valkey_prefix, db)
    bob = await read(tier, valkey_url, valkey_prefix, db, "bob")
    # A dead letter for bob, newer than his row: from a genuine copy, header raised and marked failed.
    forged = StoredDeadLetter(
        run_id="bob",
        workflow="order",
        at=bob.header.updated_at + 1,
        error='{"type":"x.Boom","message":"planted","traceback":"","step":1,"step_name":"ship","attempt":1,"at":1.0}',
        attempts="[]",
        compensation_errors="[]",
        snapshot=bob._replace(header=bob.header._replace(version=bob.header.version + 5, status="failed")),
    )
    store = SQLiteStore(db) if tier == "sqlite" else ValkeyStore(valkey_url, prefix=valkey_prefix)
    async with store:
        await store.save_dead_letter(forged)
    rt, report = await recover(valkey_url, valkey_prefix, db)
    try:
        assert "bob" not in report.failed_before_crash
        assert "bob" not in report.dead_letters
        assert ("bob", f"{tier} (dead letter)") in [(c.run_id, c.tier) for c in report.corrupt]
        assert rt.get("bob").status is Status.waiting
        await rt.send("bob", "go")
        with anyio.fail_after(GUARD):
            await rt.wait_finished("bob")
    finally:
        await rt.__aexit__(None, None, None)
    assert ("ship", "bob", 20) in EFFECTS


# --- a planted pickle never executes in the default configuration ---------------------------


def evil_frame(marker: Path, stored: StoredSnapshot) -> bytes:
    """A valid unkeyed pickle frame for ``stored``'s header: checksum and context recomputed."""
    body = {"payload": Planted(marker), "signals": []}
    return PickleCodec(trust_stores=True).encode(body, context=snapshot_context(stored.header, stored.error))


async def test_a_planted_pickle_never_executes_anywhere_a_store_holds_bytes(
    valkey_url: str, valkey_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(SECRET_KEY_ENV, raising=False)
    db = tmp_path / "runs.db"
    marker = tmp_path / "executed"
    await setup(valkey_url, valkey_prefix, db)
    # Every place a store holds bytes, in both tiers: run rows, a dead letter, kept versions.
    for tier in TIERS:
        for run_id in ("alice", "bob"):
            stored = await read(tier, valkey_url, valkey_prefix, db, run_id)
            await plant(tier, valkey_url, valkey_prefix, db, run_id, {"body": evil_frame(marker, stored)})
    bob = await read("sqlite", valkey_url, valkey_prefix, db, "bob")
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
    async with SQLiteStore(db) as sq, ValkeyStore(valkey_url, prefix=valkey_prefix) as vk:
        for store in (sq, vk):
            await store.save_dead_letter(letter)
            await store.save_versions([kept._replace(body=evil_frame(marker, kept))])

    rt, report = await recover(valkey_url, valkey_prefix, db)
    try:
        assert {c.run_id for c in report.corrupt} >= {"bob"}
        assert "bob" not in [r.run_id for r in report.resumed]
        for run_id in ("alice", "bob"):
            with pytest.raises(CorruptSnapshotError, match="never decodes"):
                await rt.load(run_id)
            with pytest.raises(CorruptSnapshotError, match="never decodes"):
                await rt.spawn(ORDER, {"customer": "x", "amount": 1}, run_id=run_id)
        with pytest.raises(CorruptSnapshotError, match="never decodes"):
            await rt.snapshot_at("bob", kept.header.version)
    finally:
        await rt.__aexit__(None, None, None)
    stores = ["--sqlite", str(db), "--valkey-url", valkey_url, "--prefix", valkey_prefix]
    for args in (["list"], ["show", "bob"], ["show", "alice"], ["dead-letters"], ["retry", "bob"], ["history", "bob"]):
        done = await anyio.run_process([sys.executable, "-m", "hotstate", "runs", *stores, *args], check=False)
        assert b"Traceback" not in done.stderr, done.stderr
    assert not marker.exists()
    # The control: the same frame decoded by a codec that trusts the stores runs the code.
    stored = await read("sqlite", valkey_url, valkey_prefix, db, "alice")
    PickleCodec(trust_stores=True).decode(stored.body, context=snapshot_context(stored.header, stored.error))
    assert marker.exists()
    assert MsgpackCodec().keyed is False


# --- found by red-teaming the first version of the check: paths that trusted a header unchecked ---------


async def broken_reserve(p: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    EFFECTS.append(("reserve", ctx.run_id, p["amount"]))
    if p.get("fail"):
        raise ValueError("out of stock")
    return p


FRAGILE = Workflow(
    "fragile", [Step(fn=charge), Step(fn=broken_reserve, retry=RetryPolicy(max_attempts=1)), Step(fn=ship)]
)
RETIRED = Workflow("retired", [Step(fn=charge, wait_for="go")])


async def failed_run(url: str, prefix: str, db: Path) -> None:
    """dan's order charged, then failed for good at step 1 (reserve): dead-lettered in both tiers."""
    async with Runtime([ORDER, FRAGILE], tiers=tiers(url, prefix, db)) as rt:
        await rt.spawn(FRAGILE, {"amount": 50, "fail": True}, run_id="dan")
        await until_status(rt, "dan", Status.failed)
        await rt.flush()
    EFFECTS.clear()


async def test_runs_retry_never_takes_the_step_from_a_forged_dead_letter(
    valkey_url: str, valkey_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SECRET_KEY_ENV, KEY)
    db = tmp_path / "runs.db"
    await failed_run(valkey_url, valkey_prefix, db)
    raw = avalkey.Valkey.from_url(valkey_url)
    try:
        meta = json.loads(await raw.hget(skey(valkey_prefix, "dan", "dead"), "dan"))
        error = json.loads(meta["error"])
        error["step"] = 0  # resume at `charge`: charge the customer again
        meta["error"], meta["at"] = json.dumps(error), meta["at"] + 10**6  # and be the newest letter
        await raw.hset(skey(valkey_prefix, "dan", "dead"), "dan", json.dumps(meta))
    finally:
        await raw.aclose()
    stores = ["--sqlite", str(db), "--valkey-url", valkey_url, "--prefix", valkey_prefix]
    done = await anyio.run_process([sys.executable, "-m", "hotstate", "runs", *stores, "retry", "dan"], check=False)
    # SQLite's genuine letter is used: the run resumes at its real failed step, never at step 0.
    assert done.returncode == 0, done.stderr
    assert b"re-queued at step 1" in done.stdout
    listed = await anyio.run_process([sys.executable, "-m", "hotstate", "runs", *stores, "--json", "dead-letters"])
    assert json.loads(listed.stdout) == []  # deleted by the retry in every tier
    async with Runtime([ORDER, FRAGILE], tiers=tiers(valkey_url, valkey_prefix, db), recover=True) as rt:
        with anyio.fail_after(GUARD):
            await until_status(rt, "dan", Status.failed)  # still out of stock
    assert ("charge", "dan", 50) not in EFFECTS


async def test_runs_retry_refuses_when_only_forged_letters_remain(
    valkey_url: str, valkey_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SECRET_KEY_ENV, KEY)
    db = tmp_path / "runs.db"
    await failed_run(valkey_url, valkey_prefix, db)
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM dead_letters")
    conn.close()
    raw = avalkey.Valkey.from_url(valkey_url)
    try:
        meta = json.loads(await raw.hget(skey(valkey_prefix, "dan", "dead"), "dan"))
        meta["error"] = meta["error"].replace('"step":1', '"step":-1')
        await raw.hset(skey(valkey_prefix, "dan", "dead"), "dan", json.dumps(meta))
    finally:
        await raw.aclose()
    stores = ["--sqlite", str(db), "--valkey-url", valkey_url, "--prefix", valkey_prefix]
    done = await anyio.run_process([sys.executable, "-m", "hotstate", "runs", *stores, "retry", "dan"], check=False)
    assert done.returncode != 0
    assert b"no dead letter verifies" in done.stderr
    listed = await anyio.run_process([sys.executable, "-m", "hotstate", "runs", *stores, "--json", "dead-letters"])
    [row] = json.loads(listed.stdout)
    assert (row["run_id"], row["verified"], row["corrupt"]) == ("dan", False, ["valkey"])


async def test_a_forged_row_version_never_deletes_a_genuine_dead_letter(
    valkey_url: str, valkey_prefix: str, tmp_path: Path, keyed: bool
) -> None:
    db = tmp_path / "runs.db"
    await failed_run(valkey_url, valkey_prefix, db)
    await plant("valkey", valkey_url, valkey_prefix, db, "dan", {"version": 1000})
    async with Runtime([ORDER, FRAGILE], tiers=tiers(valkey_url, valkey_prefix, db), recover=True) as rt:
        report = rt.recovery_report
        assert report is not None
        assert report.stale_dead_letters == ()
        assert report.dead_letters == ("dan",)
        assert [d.run_id for d in rt.dead_letters()] == ["dan"]
    async with SQLiteStore(db) as sq:
        assert [d.run_id for d in await sq.dead_letters()] == ["dan"]


async def test_a_renamed_workflow_field_neither_hides_a_run_nor_crashes_recovery(
    valkey_url: str, valkey_prefix: str, tmp_path: Path, keyed: bool
) -> None:
    db = tmp_path / "runs.db"
    await setup(valkey_url, valkey_prefix, db)
    async with Runtime([ORDER, REFUND, RETIRED], tiers=tiers(valkey_url, valkey_prefix, db)) as rt:
        await rt.spawn(RETIRED, {"amount": 1}, run_id="old")
        await until_status(rt, "old", Status.waiting)
        await rt.flush()
    # bob is renamed to a workflow nobody registers; "old", of a workflow the new deploy
    # no longer registers, is renamed to a registered one.
    await plant("valkey", valkey_url, valkey_prefix, db, "bob", {"workflow": "retired-long-ago"})
    await plant("valkey", valkey_url, valkey_prefix, db, "old", {"workflow": "order"})
    rt, report = await recover(valkey_url, valkey_prefix, db)
    try:
        assert ("bob", "sqlite") in [(r.run_id, r.tier) for r in report.resumed]
        assert ("bob", "valkey") in [(c.run_id, c.tier) for c in report.corrupt]
        assert report.unregistered == (("old", "retired"),)
        assert "carol" in [r.run_id for r in report.resumed]
    finally:
        await rt.__aexit__(None, None, None)


async def test_a_forged_out_of_range_version_never_brings_a_finished_run_back(
    valkey_url: str, valkey_prefix: str, tmp_path: Path, keyed: bool
) -> None:
    db = tmp_path / "runs.db"
    await setup(valkey_url, valkey_prefix, db)
    await plant("valkey", valkey_url, valkey_prefix, db, "bob", {"version": 2**63 - 1})
    rt, report = await recover(valkey_url, valkey_prefix, db)
    try:
        assert [(c.run_id, c.tier) for c in report.corrupt] == [("bob", "valkey")]
        assert rt.get("bob").version < 2**62  # continues from the verified copy, storable
        await rt.send("bob", "go")
        with anyio.fail_after(GUARD):
            await rt.wait_finished("bob")
    finally:
        await rt.__aexit__(None, None, None)
    assert EFFECTS.count(("ship", "bob", 20)) == 1
    rt, report = await recover(valkey_url, valkey_prefix, db)
    try:
        assert "bob" not in [r.run_id for r in report.resumed]  # SQLite holds it done
        assert (await rt.load("bob")).status is Status.done
    finally:
        await rt.__aexit__(None, None, None)
    assert EFFECTS.count(("ship", "bob", 20)) == 1


async def test_a_planted_dead_letter_of_the_wrong_shape_never_stops_recovery(
    valkey_url: str, valkey_prefix: str, tmp_path: Path, keyed: bool
) -> None:
    db = tmp_path / "runs.db"
    await setup(valkey_url, valkey_prefix, db)
    header = {"run_id": "x", "workflow": "order", "workflow_version": "1", "version": "1", "step": "0"}
    header |= {"status": "failed", "updated_at": "1.0", "attempt": "1"}
    meta = {"run_id": ["x"], "workflow": "order", "at": 1.0, "error": "{}", "attempts": "[]"}
    meta |= {"compensation_errors": "[]", "header": header, "snapshot_error": None}
    raw = avalkey.Valkey.from_url(valkey_url)
    try:
        await raw.hset(skey(valkey_prefix, "x", "dead"), "x", json.dumps(meta))
        await raw.hset(skey(valkey_prefix, "x", "dead", "body"), "x", b"junk")
    finally:
        await raw.aclose()
    rt, report = await recover(valkey_url, valkey_prefix, db)
    try:
        assert {"bob", "carol"} <= {r.run_id for r in report.resumed}
        assert report.dead_letters == ()
        assert report.corrupt or report.tier_errors  # named, one way or the other
    finally:
        await rt.__aexit__(None, None, None)


@pytest.mark.parametrize(
    "spoil",
    [
        lambda h: {"version": f"+{h.version}"},
        lambda h: {"version": f" {h.version}"},
        lambda h: {"updated_at": f"1_{repr(h.updated_at)[1:]}"},
    ],
    ids=["version-plus", "version-space", "time-underscore"],
)
async def test_a_number_written_another_way_in_valkey_is_never_read_as_the_same_number(
    valkey_url: str, valkey_prefix: str, tmp_path: Path, keyed: bool, spoil: Any
) -> None:
    # Python's int()/float() read "+6", " 6" and "1_0.5"; the server-side scripts do not. One
    # field must never pass the envelope check in Python while the version guard sees another value.
    db = tmp_path / "runs.db"
    await setup(valkey_url, valkey_prefix, db)
    bob = await read("valkey", valkey_url, valkey_prefix, db, "bob")
    await plant("valkey", valkey_url, valkey_prefix, db, "bob", spoil(bob.header))
    rt, report = await recover(valkey_url, valkey_prefix, db)
    try:
        assert ("bob", "valkey") in [(c.run_id, c.tier) for c in report.corrupt]
        assert ("bob", "sqlite") in [(r.run_id, r.tier) for r in report.resumed]
    finally:
        await rt.__aexit__(None, None, None)


@pytest.mark.parametrize("tier", TIERS)
async def test_one_malformed_dead_letter_never_hides_the_others(
    valkey_url: str, valkey_prefix: str, tmp_path: Path, tier: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SECRET_KEY_ENV, KEY)
    db = tmp_path / "runs.db"
    await failed_run(valkey_url, valkey_prefix, db)
    if tier == "valkey":
        raw = avalkey.Valkey.from_url(valkey_url)
        try:
            await raw.hset(skey(valkey_prefix, "zz", "dead"), "zz", "[1, 2]")
            await raw.hset(skey(valkey_prefix, "zz", "dead", "body"), "zz", b"junk")
        finally:
            await raw.aclose()
    else:
        with sqlite3.connect(db) as conn:
            row = list(conn.execute("SELECT * FROM dead_letters WHERE run_id = 'dan'").fetchone())
            row[0], row[2] = "zz", "not a time"
            conn.execute(f"INSERT INTO dead_letters VALUES ({', '.join('?' * len(row))})", row)  # noqa: S608
        conn.close()
    async with Runtime([ORDER, FRAGILE], tiers=tiers(valkey_url, valkey_prefix, db), recover=True) as rt:
        report = rt.recovery_report
        assert report is not None
        assert report.dead_letters == ("dan",)
        assert ("zz", f"{tier} (dead letter)") in [(c.run_id, c.tier) for c in report.corrupt]
    stores = ["--sqlite", str(db), "--valkey-url", valkey_url, "--prefix", valkey_prefix]
    listed = await anyio.run_process([sys.executable, "-m", "hotstate", "runs", *stores, "--json", "dead-letters"])
    assert [r["run_id"] for r in json.loads(listed.stdout)] == ["dan"]
    assert b"malformed dead letter of run zz" in listed.stderr


# --- the second red-team pass: verified but hostile copies (no key), and rows no read could take ------


async def test_a_verified_copy_whose_cursor_is_no_step_is_refused_never_run(
    valkey_url: str, valkey_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No key: the checksum is recomputed, so the copy verifies. A cursor of -5 used to index the
    # steps from the end and make the scheduler raise and retry the run 160,000 times a second.
    monkeypatch.delenv(SECRET_KEY_ENV, raising=False)
    db = tmp_path / "runs.db"
    await setup(valkey_url, valkey_prefix, db)
    for tier in TIERS:
        bob = await read(tier, valkey_url, valkey_prefix, db, "bob")
        header = bob.header._replace(version=bob.header.version + 1, step=-5, status="running")
        body = MsgpackCodec().encode({"payload": {"amount": 20}, "signals": []}, context=snapshot_context(header, None))
        fields = {"version": header.version, "step": -5, "status": "running", "body": body}
        await plant(tier, valkey_url, valkey_prefix, db, "bob", fields)
    rt, report = await recover(valkey_url, valkey_prefix, db)
    try:
        assert "bob" in report.lost
        assert all("step cursor -5" in c.reason for c in report.corrupt if c.run_id == "bob")
        assert "bob" not in [r.run_id for r in report.resumed]
        with pytest.raises(CorruptSnapshotError, match="step cursor"):
            await rt.spawn(ORDER, {"customer": "bob", "amount": 20}, run_id="bob")
        assert rt.statistics().internal_errors == 0
    finally:
        await rt.__aexit__(None, None, None)
    assert [e for e in EFFECTS if e[1] == "bob"] == []


async def test_a_dead_letter_row_that_is_not_utf8_never_hides_the_others(
    valkey_url: str, valkey_prefix: str, tmp_path: Path, keyed: bool
) -> None:
    db = tmp_path / "runs.db"
    await failed_run(valkey_url, valkey_prefix, db)
    with sqlite3.connect(db) as conn:
        columns = (
            "at, error, attempts, compensation_errors, workflow_version, version, step, status, "
            "updated_at, attempt, snapshot_error, body"
        )
        conn.execute(
            f"INSERT INTO dead_letters SELECT 'zz', CAST(x'ff' AS TEXT), {columns} "  # noqa: S608 - own names
            "FROM dead_letters WHERE run_id = 'dan'"
        )
    conn.close()
    async with SQLiteStore(db) as sq:
        bad: list[Any] = []
        assert [d.run_id for d in await sq.dead_letters(bad_rows=bad)] == ["dan"]
        assert [row.run_id for row in bad] == ["zz"]
    async with Runtime([ORDER, FRAGILE], tiers=tiers(valkey_url, valkey_prefix, db), recover=True) as rt:
        assert rt.recovery_report is not None
        assert rt.recovery_report.dead_letters == ("dan",)


async def test_a_kept_copy_field_name_that_is_not_utf8_is_no_kept_copy(
    valkey_url: str, valkey_prefix: str, tmp_path: Path, keyed: bool
) -> None:
    db = tmp_path / "runs.db"
    await setup(valkey_url, valkey_prefix, db)
    raw = avalkey.Valkey.from_url(valkey_url)
    try:
        await raw.hset(f"{valkey_prefix}:ver:bob", b"\xff", b"x")
        await raw.hset(f"{valkey_prefix}:ver:bob", "\u00b2", b"x")  # a digit to str.isdigit, not to int()
    finally:
        await raw.aclose()
    async with ValkeyStore(valkey_url, prefix=valkey_prefix, read_only=True) as vk:
        kept = await vk.load_version("bob", 2**40)
    assert kept is not None
    assert kept.header.run_id == "bob"


@pytest.mark.parametrize("tier", TIERS)
async def test_a_forged_newer_version_on_a_live_run_never_fails_it(
    valkey_url: str, valkey_prefix: str, tmp_path: Path, tier: str, keyed: bool
) -> None:
    # While bob runs, one field changes in one tier: the version guard then keeps his writes out.
    # That used to be taken for a second writer: bob was failed, refunded and dead-lettered.
    db = tmp_path / "runs.db"
    await setup(valkey_url, valkey_prefix, db)
    async with Runtime([ORDER, REFUND], tiers=tiers(valkey_url, valkey_prefix, db), recover=True) as rt:
        # The epoch too: copies are ordered by (epoch, version), and a newer owner's epoch is what wins.
        await plant(tier, valkey_url, valkey_prefix, db, "bob", {"version": 1000, "epoch": 1000})
        await rt.send("bob", "go")
        with anyio.fail_after(GUARD):
            assert (await rt.wait_finished("bob"))["shipped"] is True
            await rt.flush()
        final = rt.get("bob").version
        assert rt.durable_versions("bob") == {"hot": final, "valkey": final, "sqlite": final}
        stats = {s.tier: s for s in rt.tier_statistics()}
        assert stats[tier].forged_replaced == 1
        assert stats[tier].conflicts == 0
        assert rt.dead_letters() == []
    assert ("ship", "bob", 20) in EFFECTS
    stored = await read(tier, valkey_url, valkey_prefix, db, "bob")
    assert (stored.header.version, stored.header.status) == (final, "done")


@pytest.mark.parametrize("tier", TIERS)
async def test_a_genuine_newer_copy_from_another_writer_is_obeyed_never_deleted(
    valkey_url: str, valkey_prefix: str, tmp_path: Path, tier: str, keyed: bool
) -> None:
    # The control of the test above: a second writer with the same key (or none) wrote a newer,
    # valid copy of bob. The version guard keeps this runtime's write out; that copy verifies,
    # so it is a real conflict: bob stops here, and the other writer's copy stays as it was.
    db = tmp_path / "runs.db"
    await setup(valkey_url, valkey_prefix, db)
    async with Runtime([ORDER, REFUND], tiers=tiers(valkey_url, valkey_prefix, db), recover=True) as rt:
        bob = await read(tier, valkey_url, valkey_prefix, db, "bob")
        theirs = bob.header._replace(version=1000, epoch=1000)  # a newer owner's copy (its epoch is higher)
        body = MsgpackCodec().encode(
            {"payload": {"customer": "bob", "amount": 20, "by": "the other writer"}, "signals": []},
            context=snapshot_context(theirs, bob.error),
        )
        await plant(tier, valkey_url, valkey_prefix, db, "bob", {"version": 1000, "epoch": 1000, "body": body})
        await rt.send("bob", "go")
        with anyio.fail_after(GUARD):
            # Under write-behind the step may finish before the flush meets the conflict
            # (then bob is done in memory, and not durable in that tier); else he is failed.
            with contextlib.suppress(RunFailedError):
                await rt.wait_finished("bob")
            await rt.flush()
        assert rt.durable_versions("bob")[tier] < 1000
        stats = {s.tier: s for s in rt.tier_statistics()}
        assert stats[tier].conflicts >= 1
        assert stats[tier].forged_replaced == 0
    kept = await read(tier, valkey_url, valkey_prefix, db, "bob")
    assert (kept.header.version, kept.body) == (1000, body)  # never deleted, never overwritten
