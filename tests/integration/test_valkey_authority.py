"""What only ``ValkeyAuthority`` does, against a real Valkey server.

The authority contract itself runs on Valkey in tests/contract/test_authority.py.
Here: a claim seals the ``ValkeyStore`` on the same prefix, leases use the
server's clock when none is injected, the shard count is the store's, and the
documented limit: a restart without an append-only file forgets an epoch bump.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import pytest
import valkey

from hotstate import ConfigError, StoreUnavailableError
from hotstate.persistence import MemberInfo, RunHeader, StoredSnapshot, ValkeyStore
from hotstate.persistence._authority import new_member
from hotstate.persistence._shards import Fence, generated_prefix
from hotstate.persistence._valkey_authority import ValkeyAuthority

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from hotstate.persistence import EmbeddedValkey

SHARDS = 8
TTL = 10.0


def nobody_gone(member: MemberInfo) -> bool:
    """No member's process is gone (the test decides nothing by pids)."""
    return False


async def joined(authority: ValkeyAuthority, name: str) -> str:
    member = new_member(name)
    await authority.join(member)
    return member.member_id


# --- Valkey only ----------------------------------------------------------------------------------


def stored(run_id: str, version: int, epoch: int) -> StoredSnapshot:
    header = RunHeader(run_id, "orders", 1, version, version - 1, "running", 1_700_000_000.0, 1, epoch)
    return StoredSnapshot(header, None, b"body")


async def test_a_claim_seals_the_store_on_the_same_prefix(valkey_url: str, valkey_prefix: str) -> None:
    run = f"{generated_prefix(5)}r"
    async with ValkeyStore(valkey_url, prefix=valkey_prefix) as store:
        authority = ValkeyAuthority(valkey_url, prefix=valkey_prefix)
        await authority.open()
        try:
            assert authority.shards == store.shards
            a, b = await joined(authority, "a"), await joined(authority, "b")
            first = await authority.claim(a, [5], TTL)
            assert (await store.save([stored(run, 1, first[5])], [], fence=Fence(a, first))).written == 1
            await authority.release(a, [5])
            second = await authority.claim(b, [5], TTL)
            assert second == {5: 2}
            # No seal call: the claim itself raised the fence, so a's late write lands nowhere.
            late = await store.save([stored(run, 9, first[5])], [], fence=Fence(a, first))
            assert (late.fenced, late.written) == ({5: 2}, 0)
            assert await store.seal(Fence(b, second)) == {}  # the new owner's seal changes nothing
            with valkey.Valkey.from_url(valkey_url) as raw:
                assert raw.hgetall(store.shard_key(5, "fence")) == {b"epoch": b"2", b"owner": b.encode()}
        finally:
            await authority.aclose()


async def test_leases_are_timed_by_the_servers_clock_when_no_clock_is_given(
    valkey_url: str, valkey_prefix: str
) -> None:
    authority = ValkeyAuthority(valkey_url, prefix=valkey_prefix, shards=SHARDS)
    await authority.open()
    try:
        with valkey.Valkey.from_url(valkey_url) as raw:
            before = float("{}.{:06d}".format(*raw.time()))
            a = await joined(authority, "a")
            await authority.claim(a, [1], TTL)
            renewal = await authority.renew(a, TTL)
            after = float("{}.{:06d}".format(*raw.time()))
        lease = renewal.leases[1]
        assert before <= lease.acquired_at <= renewal.now <= after
        assert lease.expires_at == renewal.now + TTL
        assert {m.member_id: before <= m.joined_at <= m.last_seen <= after for m in renewal.members} == {a: True}
    finally:
        await authority.aclose()


async def test_the_shard_count_is_the_stores_and_another_is_refused(valkey_url: str, valkey_prefix: str) -> None:
    first = ValkeyAuthority(valkey_url, prefix=valkey_prefix, shards=SHARDS)
    await first.open()
    await first.aclose()
    again = ValkeyAuthority(valkey_url, prefix=valkey_prefix)
    await again.open()
    assert again.shards == SHARDS
    await again.aclose()
    async with ValkeyStore(valkey_url, prefix=valkey_prefix) as store:
        assert store.shards == SHARDS  # recorded by the authority: the store places runs the same way
    other = ValkeyAuthority(valkey_url, prefix=valkey_prefix, shards=SHARDS * 2)
    with pytest.raises(ConfigError, match=rf"shards={SHARDS * 2}.* {SHARDS} shards"):
        await other.open()
    with pytest.raises(ConfigError, match="shards"):
        ValkeyAuthority(valkey_url, shards=0)
    with pytest.raises(ConfigError, match=r"claim\.shards"):
        await again.claim("m", [SHARDS], TTL)  # checked before any call: open or not


async def retried(call: Callable[[], Awaitable[dict[int, int]]]) -> dict[int, int]:
    """``call()``, again once after the connection a server restart broke."""
    for _ in range(3):
        with contextlib.suppress(StoreUnavailableError):
            return await call()
    raise AssertionError("the server did not come back")


@pytest.mark.parametrize("aof", [False, True], ids=["no-append-only-file", "append-only-file"])
async def test_an_epoch_bump_survives_a_restart_only_with_an_append_only_file(
    request: pytest.FixtureRequest, aof: bool
) -> None:
    """The documented limit: the epoch lives only as long as the server's copy of it."""
    server: EmbeddedValkey = request.getfixturevalue("private_valkey" if aof else "ephemeral_valkey")
    authority = ValkeyAuthority(server.url, prefix="hs", shards=SHARDS, socket_timeout=2.0, gone=nobody_gone)
    await authority.open()
    try:
        a, b = await joined(authority, "a"), await joined(authority, "b")
        assert await authority.claim(a, [3], TTL) == {3: 1}
        server.restart()
        taken = await retried(lambda: authority.claim(b, [3], TTL))
        # Without the file, b gets epoch 1 again while a still believes it holds epoch 1: two owners of
        # one epoch, told apart only by the fences' owner check. With it, a's lease is still live.
        assert taken == ({} if aof else {3: 1})
    finally:
        await authority.aclose()
