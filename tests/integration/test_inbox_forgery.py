"""Forged inbox entries against a real runtime and its default SQLite authority file (#12).

Someone who can write the authority's file (``runs.db-authority``) plants
inbox entries: a signal framed under another key, an unkeyed one, and a
genuine entry of one run moved to another. None may reach a run: each is
answered with ``CorruptSnapshotError`` and the run keeps waiting. A genuine
entry posted the same way is applied (the control).
"""

from __future__ import annotations

import sqlite3
from contextlib import closing
from typing import TYPE_CHECKING, Any

import anyio
import pytest

from hotstate import MsgpackCodec, Ownership, Runtime, Step, Workflow
from hotstate.persistence import FlushPolicy, SQLiteStore, Tier
from hotstate.persistence._sqlite_authority import authority_path
from hotstate.runtime._routing import inbox_context

if TYPE_CHECKING:
    from pathlib import Path

KEY = b"k" * 32


async def take(payload: Any, ctx: Any) -> Any:
    return {"got": ctx.signal}


ORDER = Workflow("order", [Step(fn=take, name="pay", wait_for="paid")])


def plant(db: Path, shard: int, seq: int, run_id: str, body: bytes) -> None:
    with closing(sqlite3.connect(authority_path(db))) as conn, conn:
        conn.execute("INSERT INTO hs_inbox VALUES (?, ?, ?, 'signal', ?, 0, NULL)", (shard, seq, run_id, body))


def verdict(db: Path, shard: int, seq: int) -> str | None:
    with closing(sqlite3.connect(authority_path(db))) as conn:
        row = conn.execute("SELECT verdict FROM hs_inbox WHERE shard = ? AND seq = ?", (shard, seq)).fetchone()
    return None if row is None else row[0]


async def answered(db: Path, shard: int, seq: int) -> str:
    with anyio.fail_after(10):
        while (found := verdict(db, shard, seq)) is None:  # noqa: ASYNC110 - another process's table
            await anyio.sleep(0.01)
    return found


@pytest.mark.parametrize(
    "forge",
    ["another key", "no key", "moved from another run"],
)
async def test_a_forged_inbox_entry_never_reaches_a_run(tmp_path: Path, forge: str) -> None:
    db = tmp_path / "runs.db"
    codec = MsgpackCodec(KEY)
    tiers = [Tier(SQLiteStore(db), FlushPolicy(interval=0.01))]
    async with Runtime([ORDER], tiers=tiers, codec=codec, ownership=Ownership(inbox_every=0.01)) as rt:
        owner = rt._owner
        assert owner is not None
        for rid in ("victim", "other"):
            await rt.spawn(ORDER, {}, run_id=rid)
        shard = owner.shard_of("victim")
        fields = {"signal": "paid", "data": "forged", "key": "k-1"}
        if forge == "another key":
            body = MsgpackCodec(b"x" * 32).encode(fields, context=inbox_context("signal", "victim", shard))
        elif forge == "no key":
            body = MsgpackCodec().encode(fields, context=inbox_context("signal", "victim", shard))
        else:  # genuine, keyed, but made for "other": planted under "victim"
            body = codec.encode(fields, context=inbox_context("signal", "other", owner.shard_of("other")))
        plant(db, shard, 1_000_001, "victim", body)
        answer = await answered(db, shard, 1_000_001)
        assert "CorruptSnapshotError" in answer
        assert rt.get("victim").status == "waiting"
        assert rt.get("victim").signals == ()
        # The control: a genuine entry, framed as a non-owner frames it, is applied.
        genuine = codec.encode({**fields, "data": "real"}, context=inbox_context("signal", "victim", shard))
        plant(db, shard, 1_000_002, "victim", genuine)
        assert '"ok"' in await answered(db, shard, 1_000_002)
        with anyio.fail_after(10):
            while rt.get("victim").status != "done":  # noqa: ASYNC110 - polled with a deadline
                await anyio.sleep(0.01)
        assert rt.get("victim").payload == {"got": "real"}
