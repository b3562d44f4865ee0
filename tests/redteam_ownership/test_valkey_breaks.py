"""Red-team test for shard ownership (issue #12) with a shared Valkey tier (the session's embedded server).

FAILS on the code it was written against; the docstring says what should happen.
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any

import anyio
import pytest

from hotstate import Runtime, Step, Workflow
from hotstate.persistence import FlushPolicy, SQLiteStore, Tier, ValkeyStore
from hotstate.runtime import Ownership

if TYPE_CHECKING:
    from pathlib import Path

RAN: list[tuple[str, str]] = []


async def pay(payload: Any, ctx: Any) -> Any:
    RAN.append((ctx.run_id, payload["who"]))
    return payload


async def first(payload: Any, ctx: Any) -> Any:
    return payload


WF = Workflow("pay", [Step(fn=first, name="first"), Step(fn=pay, name="pay", wait_for="go")])


@pytest.mark.xfail(
    strict=True,
    reason="open (#12 note): two authorities sharing a tier (two hosts, each its own SQLite file) are not detected",
)
async def test_two_hosts_with_the_default_authority_do_not_both_own_every_shard(
    tmp_path: Path, valkey_url: str, valkey_prefix: str
) -> None:
    """Two hosts share a Valkey tier; each also keeps a local SQLite tier (its own file). Ownership is on by
    default, and its default authority is "the first durable SQLite tier's file" -- a different file on each
    host. Each process is then alone in its own authority: both claim every shard (epoch 1), and nothing
    compares the two. The shared Valkey tier's fences see two owners of one epoch ("first writer keeps
    the shard") but a process with nothing to write never finds out, and one that is fenced claims again
    in its own authority (epoch 2, 3, ...) and wins the fence back: the two keep taking the shards from
    each other, and both resume and run every run. Expected: the second process refuses to start (or is
    told to configure a shared authority), or at least no run is held and run by both.
    """
    RAN.clear()
    own: dict[str, Any] = {"ttl": 2.0, "renew_every": 0.2, "claim_every": 0.1, "inbox_every": 0.02}

    def host(name: str) -> Runtime:
        tiers = [
            Tier(ValkeyStore(valkey_url, prefix=valkey_prefix, shards=8), FlushPolicy(interval=0.005)),
            Tier(SQLiteStore(tmp_path / f"{name}.db", shards=8), FlushPolicy(interval=0.02)),
        ]
        return Runtime([WF], tiers=tiers, ownership=Ownership(shards=8, name=name, **own), recover=True)

    refused: BaseException | None = None
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(host("a"))
        await a.spawn(WF, {"who": "?"}, run_id="order-1")
        with anyio.fail_after(5):
            while a.get("order-1").status != "waiting":  # noqa: ASYNC110 - a red-team scenario, polled with a deadline
                await anyio.sleep(0.01)
        await a.flush()
        try:
            b = await stack.enter_async_context(host("b"))
        except Exception as exc:  # noqa: BLE001 - refusing is a fine answer
            refused = exc
        if refused is None:
            await anyio.sleep(0.3)
            held_by_both = a._lookup("order-1") is not None and b._lookup("order-1") is not None
            if a._lookup("order-1") is not None:
                await a.send("order-1", "go", {"who": "a"})
            if b._lookup("order-1") is not None:
                await b.send("order-1", "go", {"who": "b"})
            await anyio.sleep(0.3)
    if refused is None:
        assert not held_by_both and len(RAN) <= 1, f"both processes held the run; its pay step ran {RAN}"  # noqa: PT018 - a red-team scenario, polled with a deadline
