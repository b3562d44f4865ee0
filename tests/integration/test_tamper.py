"""Tampering and corruption written straight into each tier, with a secret key configured (#5).

The runtime's codec is keyed from ``HOTSTATE_SECRET_KEY``. Every planted body
carries a pickle whose unpickling would create a marker file, so "never
unpickled" is proven by the file not existing, not by the absence of an error.

``test_tiers.py`` already proves: a flipped body byte in Valkey, and a raw or
unkeyed-frame foreign pickle in SQLite. Here: the rest of the matrix (each tier
x flipped MAC byte, truncated value, foreign raw pickle, frame digested without
the key, frame made with another key), both copies corrupt at once, and
tampered header fields.
"""

from __future__ import annotations

import hashlib
import pickle
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import pytest
import valkey.asyncio as avalkey

from hotstate import Runtime, Status, Step, StepContext, Tier, Workflow
from hotstate.persistence import (
    DEFAULT_SHARDS,
    SECRET_KEY_ENV,
    FlushPolicy,
    PickleCodec,
    SQLiteStore,
    ValkeyStore,
    shard_of,
)
from hotstate.persistence._records import decode_snapshot


def vkey(prefix: str, run_id: str, kind: str = "run") -> str:
    """A run's Valkey key of ``kind`` (layout 2: each run's keys carry its shard's hash tag)."""
    return f"{prefix}:{{{shard_of(run_id, DEFAULT_SHARDS)}}}:{kind}:{run_id}"


def skey(prefix: str, run_id: str, *parts: str) -> str:
    """A key of ``run_id``'s shard: its dead letters, its status and workflow indexes."""
    return ":".join((prefix, f"{{{shard_of(run_id, DEFAULT_SHARDS)}}}", *parts))


if TYPE_CHECKING:
    from collections.abc import Callable

KEY = "tamper-test-secret-key"
GUARD = 10  # seconds; a hang guard only
AHEAD = 50  # a planted copy claims this many versions more than the good one


async def inc(p: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    return {**p, "n": p["n"] + 1}


async def take(p: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    return {**p, "got": ctx.signal}


SIGNAL = Workflow("signal", [Step(fn=inc, name="a"), Step(fn=take, wait_for="go"), Step(fn=inc, name="b")])


class Planted:
    """Unpickling it creates ``marker``: the proof that bytes were unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def evil_body(marker: Path) -> dict[str, Any]:
    return {"payload": Planted(marker), "signals": ()}


# Each corruption turns the marker into the bytes planted in a tier. The genuine
# frames are made with the right key, so the pickle inside is intact: only the
# check in front of pickle.loads stands between it and the side effect.
def flipped_mac_byte(marker: Path) -> bytes:
    frame = bytearray(PickleCodec(KEY).encode(evil_body(marker)))
    frame[10] ^= 0x01  # inside the 32-byte MAC; the body is untouched
    return bytes(frame)


def truncated(marker: Path) -> bytes:
    return PickleCodec(KEY).encode(evil_body(marker))[:-1]  # drops only the STOP opcode


def foreign_raw_pickle(marker: Path) -> bytes:
    return pickle.dumps(evil_body(marker), protocol=5)


def unkeyed_frame(marker: Path) -> bytes:
    # Built by hand: PickleCodec(None) would read the key from the environment.
    # A plain BLAKE2b digest is what anyone can recompute without the key.
    body = pickle.dumps(evil_body(marker), protocol=5)
    prefix = b"HS\x01" + bytes((0, 0))  # magic, algorithm 0 (digest), format 0 (pickle)
    return prefix + hashlib.blake2b(prefix + body, digest_size=32).digest() + body


def other_key_frame(marker: Path) -> bytes:
    return PickleCodec(b"attacker's own key").encode(evil_body(marker))


CORRUPTIONS: dict[str, Callable[[Path], bytes]] = {
    "flipped-mac-byte": flipped_mac_byte,
    "truncated": truncated,
    "foreign-raw-pickle": foreign_raw_pickle,
    "unkeyed-frame": unkeyed_frame,
    "other-key-frame": other_key_frame,
}
# (tier, corruption) pairs test_tiers.py proves already.
COVERED = {("sqlite", "foreign-raw-pickle"), ("sqlite", "unkeyed-frame")}
MATRIX = [
    pytest.param(tier, kind, id=f"{tier}-{kind}")
    for tier in ("valkey", "sqlite")
    for kind in CORRUPTIONS
    if (tier, kind) not in COVERED
]


@pytest.fixture(autouse=True)
def secret_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_KEY_ENV, KEY)


def tiers(url: str, prefix: str, db: Path) -> list[Tier]:
    return [
        Tier(ValkeyStore(url, prefix=prefix, socket_timeout=1.0), FlushPolicy(interval=0.010)),
        Tier(SQLiteStore(db), FlushPolicy(interval=1.0)),
    ]


async def one_waiting_run_in_both_tiers(url: str, prefix: str, db: Path) -> int:
    async with Runtime([SIGNAL], tiers=tiers(url, prefix, db)) as rt:
        await rt.spawn(SIGNAL, {"n": 1}, run_id="r1")
        with anyio.fail_after(GUARD):
            while rt.get("r1").status is not Status.waiting:  # noqa: ASYNC110 - no event for a status
                await anyio.sleep(0.001)
            await rt.flush()
        version = rt.get("r1").version
        assert rt.durable_versions("r1") == {"hot": version, "valkey": version, "sqlite": version}
    return version


def other_store(name: str, url: str, prefix: str, db: Path) -> SQLiteStore | ValkeyStore:
    """A second, read-side store on one tier (the runtime's own stores are busy)."""
    return SQLiteStore(db) if name == "sqlite" else ValkeyStore(url, prefix=prefix, read_only=True)


async def plant(tier: str, url: str, prefix: str, db: Path, fields: dict[str, Any]) -> None:
    """Overwrite stored fields of run r1 directly in one tier (its own layout, no hotstate code)."""
    if tier == "sqlite":
        with sqlite3.connect(db) as conn:
            sets = ", ".join(f"{name} = ?" for name in fields)
            conn.execute(f"UPDATE runs SET {sets} WHERE run_id = 'r1'", list(fields.values()))  # noqa: S608 - test's own column names
        conn.close()
        return
    raw = avalkey.Valkey.from_url(url)
    try:
        await raw.hset(vkey(prefix, "r1"), mapping=fields)
    finally:
        await raw.aclose()


@pytest.mark.parametrize(("tier", "kind"), MATRIX)
async def test_a_tampered_copy_is_never_unpickled_reported_corrupt_and_the_other_tier_is_used(
    valkey_url: str, valkey_prefix: str, tmp_path: Path, tier: str, kind: str
) -> None:
    db = tmp_path / "runs.db"
    marker = tmp_path / "unpickled.marker"
    good = await one_waiting_run_in_both_tiers(valkey_url, valkey_prefix, db)
    body = CORRUPTIONS[kind](marker)
    await plant(tier, valkey_url, valkey_prefix, db, {"body": body, "version": good + AHEAD})
    other = "sqlite" if tier == "valkey" else "valkey"

    async with Runtime([SIGNAL], tiers=tiers(valkey_url, valkey_prefix, db), recover=True) as rt:
        report = rt.recovery_report
        assert report is not None
        assert [(c.run_id, c.tier, c.version) for c in report.corrupt] == [("r1", tier, good + AHEAD)]
        assert "run 'r1'" in report.corrupt[0].reason
        assert [(r.run_id, r.tier, r.version) for r in report.resumed] == [("r1", other, good)]
        assert report.lost == ()
        assert dict(report.repaired) == {}  # the tampered copy is never spread to the other tier
        for name in ("valkey", "sqlite"):
            if name != tier:
                async with other_store(name, valkey_url, valkey_prefix, db) as store:
                    kept = await store.load("r1")
                assert kept is not None
                decode_snapshot(kept, PickleCodec(KEY), tier=name)  # still the genuine, verifiable copy
        assert rt.get("r1").payload == {"n": 2}
        await rt.send("r1", "go", "ok")
        with anyio.fail_after(GUARD):
            assert await rt.wait_finished("r1") == {"n": 3, "got": "ok"}
            await rt.flush()
        final = rt.get("r1").version
        assert final > good + AHEAD  # versions are never reused: the planted copy is overwritten
        assert rt.durable_versions("r1") == {"hot": final, "valkey": final, "sqlite": final}
    assert not marker.exists()  # never unpickled

    # The genuine frame of the same pickle, with the right key, would have been:
    # the control that shows the marker is a real side effect.
    if kind in ("flipped-mac-byte", "truncated"):
        PickleCodec(KEY).decode(PickleCodec(KEY).encode(evil_body(marker)))
        assert marker.exists()


async def test_when_both_copies_are_corrupt_the_run_is_reported_lost_never_unpickled_and_left_in_place(
    valkey_url: str, valkey_prefix: str, tmp_path: Path
) -> None:
    db = tmp_path / "runs.db"
    marker = tmp_path / "unpickled.marker"
    good = await one_waiting_run_in_both_tiers(valkey_url, valkey_prefix, db)
    await plant("valkey", valkey_url, valkey_prefix, db, {"body": flipped_mac_byte(marker)})
    await plant("sqlite", valkey_url, valkey_prefix, db, {"body": other_key_frame(marker)})
    async with Runtime([SIGNAL], tiers=tiers(valkey_url, valkey_prefix, db), recover=True) as rt:
        report = rt.recovery_report
        assert report is not None
        assert sorted((c.tier, c.version) for c in report.corrupt) == [("sqlite", good), ("valkey", good)]
        assert report.lost == ("r1",)
        assert report.resumed == ()
        assert rt.count() == 0
    assert not marker.exists()
    # reported, never deleted: both copies are still there for an operator
    sq = SQLiteStore(db)
    async with sq:
        stored = await sq.load("r1")
    assert stored is not None
    assert stored.header.version == good


@pytest.mark.parametrize("tier", ["valkey", "sqlite"])
async def test_a_tampered_header_field_is_reported_and_recovery_uses_the_other_tier(
    valkey_url: str, valkey_prefix: str, tmp_path: Path, tier: str
) -> None:
    """A header that is not a number must not crash recovery (it never touches the payload)."""
    db = tmp_path / "runs.db"
    good = await one_waiting_run_in_both_tiers(valkey_url, valkey_prefix, db)
    await plant(tier, valkey_url, valkey_prefix, db, {"version": "not-a-number"})
    other = "sqlite" if tier == "valkey" else "valkey"
    async with Runtime([SIGNAL], tiers=tiers(valkey_url, valkey_prefix, db), recover=True) as rt:
        report = rt.recovery_report
        assert report is not None
        assert [(r.run_id, r.tier, r.version) for r in report.resumed] == [("r1", other, good)]
        assert report.corrupt or report.tier_errors  # the bad copy is named, one way or the other
        assert rt.get("r1").status is Status.waiting
