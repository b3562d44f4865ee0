"""The lease authority contract (``hotstate.persistence.Authority``), on every authority.

Time is injected (``clock=``), so leases expire by moving a number, never by
sleeping; "is this member's process gone" is injected too (``gone=``).
"""

from __future__ import annotations

import hashlib
import sqlite3
from typing import TYPE_CHECKING, Any

import pytest

from hotstate import ConfigError
from hotstate.persistence import Authority, MemberInfo, MemoryAuthority, SQLiteAuthority, SQLiteStore
from hotstate.persistence._authority import new_member
from hotstate.persistence._postgres_authority import PostgresAuthority
from hotstate.persistence._valkey_authority import ValkeyAuthority

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

SHARDS = 8
TTL = 10.0


class Clock:
    """Authority time a test moves by hand."""

    def __init__(self) -> None:
        self.t = 1_000.0

    def __call__(self) -> float:
        return self.t


class Gone:
    """Which members' processes a test declares gone."""

    def __init__(self) -> None:
        self.ids: set[str] = set()

    def __call__(self, member: MemberInfo) -> bool:
        return member.member_id in self.ids


def make(kind: str, tmp_path: Path, clock: Clock, gone: Gone, shards: int | None = SHARDS) -> Any:
    if kind == "memory":
        return MemoryAuthority(shards, clock=clock, gone=gone)
    if kind.startswith("valkey "):  # "valkey <url> <prefix>"
        _, url, prefix = kind.split(" ")
        return ValkeyAuthority(url, prefix=prefix, shards=shards, clock=clock, gone=gone)
    if kind.startswith("postgres "):  # "postgres <url>": a schema of this test's own
        schema = "hs_" + hashlib.blake2b(str(tmp_path).encode(), digest_size=8).hexdigest()
        return PostgresAuthority(kind.split(" ")[1], schema=schema, shards=shards, clock=clock, gone=gone)
    return SQLiteAuthority(tmp_path / "authority.db", shards=shards, clock=clock, gone=gone)


@pytest.fixture(params=["memory", "sqlite", "valkey", "postgres"])
def kind(request: pytest.FixtureRequest) -> str:
    if request.param == "postgres":
        return f"postgres {request.getfixturevalue('postgres_url')}"
    if request.param == "valkey":
        return f"valkey {request.getfixturevalue('valkey_url')} {request.getfixturevalue('valkey_prefix')}"
    return str(request.param)


@pytest.fixture
async def env(kind: str, tmp_path: Path) -> AsyncIterator[tuple[Authority, Clock, Gone]]:
    clock, gone = Clock(), Gone()
    authority = make(kind, tmp_path, clock, gone)
    await authority.open()
    try:
        yield authority, clock, gone
    finally:
        await authority.aclose()


async def joined(authority: Authority, name: str) -> str:
    member = new_member(name)
    await authority.join(member)
    return member.member_id


async def test_a_claim_takes_free_shards_and_bumps_their_epoch(env: tuple[Authority, Clock, Gone]) -> None:
    authority, _, _ = env
    assert isinstance(authority, Authority)
    a = await joined(authority, "a")
    assert await authority.claim(a, [0, 1, 2], TTL) == {0: 1, 1: 1, 2: 1}
    assert await authority.claim(a, [0, 3], TTL) == {3: 1}  # a live lease of its own is never bumped
    leases = {lease.shard: lease for lease in await authority.leases()}
    assert (leases[0].owner, leases[0].epoch) == (a, 1)
    assert leases[5].owner is None


async def test_a_live_lease_is_not_claimable_an_expired_one_is_and_its_epoch_goes_up(
    env: tuple[Authority, Clock, Gone],
) -> None:
    authority, clock, _ = env
    a, b = await joined(authority, "a"), await joined(authority, "b")
    await authority.claim(a, [0, 1], TTL)
    assert await authority.claim(b, [0, 1], TTL) == {}
    clock.t += TTL - 0.001
    assert await authority.claim(b, [0], TTL) == {}
    clock.t += 0.002
    assert await authority.claim(b, [0], TTL) == {0: 2}
    renewal = await authority.renew(a, TTL)
    assert renewal.held == frozenset()  # expired: a renewal does not bring a lapsed lease back
    assert await authority.claim(b, [1], TTL) == {1: 2}


async def test_renewal_extends_every_lease_of_the_member_and_lists_live_members(
    env: tuple[Authority, Clock, Gone],
) -> None:
    authority, clock, _ = env
    a, b = await joined(authority, "a"), await joined(authority, "b")
    await authority.claim(a, [0, 1, 2], TTL)
    clock.t += TTL * 0.9
    renewal = await authority.renew(a, TTL)
    assert renewal.held == frozenset({0, 1, 2})
    clock.t += TTL * 0.9
    assert await authority.claim(b, [0, 1, 2], TTL) == {}  # renewed: still held
    renewal = await authority.renew(b, TTL)
    assert {m.member_id for m in renewal.members} == {a, b}
    clock.t += TTL * 1.5
    renewal = await authority.renew(b, TTL)
    assert {m.member_id for m in renewal.members} == {b}  # a stopped renewing


async def test_a_lease_of_a_provably_gone_process_is_broken_at_once(env: tuple[Authority, Clock, Gone]) -> None:
    authority, _, gone = env
    a, b = await joined(authority, "a"), await joined(authority, "b")
    await authority.claim(a, [0, 1], TTL)
    gone.ids.add(a)
    assert await authority.claim(b, [0, 1], TTL) == {0: 2, 1: 2}


async def test_a_release_makes_shards_claimable_at_once(env: tuple[Authority, Clock, Gone]) -> None:
    authority, _, _ = env
    a, b = await joined(authority, "a"), await joined(authority, "b")
    await authority.claim(a, [0, 1], TTL)
    await authority.release(b, [0])  # not b's: nothing happens
    assert await authority.claim(b, [0], TTL) == {}
    await authority.release(a, [0])
    assert await authority.claim(b, [0], TTL) == {0: 2}
    await authority.leave(a)
    assert await authority.claim(b, [1], TTL) == {1: 2}
    assert {m.member_id for m in await authority.members()} == {b}


async def test_a_claim_with_a_floor_jumps_past_it_and_a_lower_floor_changes_nothing(
    env: tuple[Authority, Clock, Gone],
) -> None:
    authority, _, _ = env
    a = await joined(authority, "a")
    # A store's fence at epoch 40 refused a seal (the authority went back in time): one claim passes it.
    assert await authority.claim(a, [0, 1], TTL, floors={0: 40}) == {0: 41, 1: 1}
    await authority.release(a, [0, 1])
    assert await authority.claim(a, [0, 1], TTL, floors={0: 3, 1: 0}) == {0: 42, 1: 2}  # never down
    leases = {lease.shard: lease for lease in await authority.leases()}
    assert (leases[0].owner, leases[0].epoch) == (a, 42)


async def test_epochs_only_ever_go_up_across_many_claims(env: tuple[Authority, Clock, Gone]) -> None:
    authority, _, _ = env
    members = [await joined(authority, str(i)) for i in range(3)]
    seen: list[int] = []
    for i in range(12):
        m = members[i % 3]
        taken = await authority.claim(m, [4], TTL)
        seen.append(taken[4])
        await authority.release(m, [4])
    assert seen == list(range(1, 13))


async def test_the_shard_count_is_recorded_and_another_is_refused(kind: str, tmp_path: Path) -> None:
    if kind == "memory":
        with pytest.raises(ConfigError):
            MemoryAuthority(0)
        return
    clock, gone = Clock(), Gone()
    first = make(kind, tmp_path, clock, gone, shards=SHARDS)
    await first.open()
    await first.aclose()
    again = make(kind, tmp_path, clock, gone, shards=None)
    await again.open()
    assert again.shards == SHARDS
    await again.aclose()
    other = make(kind, tmp_path, clock, gone, shards=SHARDS * 2)
    with pytest.raises(ConfigError, match=str(SHARDS)):
        await other.open()


async def test_the_inbox_numbers_entries_per_shard_and_keeps_verdicts(env: tuple[Authority, Clock, Gone]) -> None:
    authority, clock, _ = env
    a = await joined(authority, "a")
    held = await authority.claim(a, [3, 4], TTL)
    seqs = [await authority.post(3, f"r{i}", "signal", b"x%d" % i) for i in range(3)]
    assert seqs == [1, 2, 3]
    assert await authority.post(4, "other", "cancel", b"") == 1
    pending = await authority.pending([3], 10)
    assert [(e.seq, e.run_id, e.body) for e in pending] == [(1, "r0", b"x0"), (2, "r1", b"x1"), (3, "r2", b"x2")]
    assert await authority.settle(a, held, [(3, 1, '{"ok": {}}'), (3, 2, '{"error": "X"}')]) == 2
    assert await authority.settle(a, held, [(3, 1, '{"ok": "again"}')]) == 0  # a verdict is recorded once
    assert await authority.verdict(3, 1) == '{"ok": {}}'
    assert await authority.verdict(3, 3) is None
    assert [e.seq for e in await authority.pending([3, 4], 10)] == [3, 1]
    clock.t += 1000
    assert await authority.prune(500) == 2
    assert await authority.verdict(3, 1) is None
    assert await authority.post(3, "r9", "signal", b"") == 4  # numbers never go back after a prune


async def test_the_sqlite_authority_shares_the_stores_fence_table(tmp_path: Path) -> None:
    """A claim on the SQLite tier's own file seals that tier: the fence row is the store's."""
    db = tmp_path / "runs.db"
    async with SQLiteStore(db) as store:
        authority = SQLiteAuthority(db, shards=store.shards)
        await authority.open()
        member = new_member("a")
        await authority.join(member)
        assert await authority.claim(member.member_id, [7], TTL) == {7: 1}
        await authority.aclose()
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT epoch, owner FROM hs_shard_fence WHERE shard = 7").fetchone() == (
            1,
            member.member_id,
        )
    conn.close()


async def test_only_the_holder_of_a_shard_at_its_epoch_settles_its_entries(env: tuple[Authority, Clock, Gone]) -> None:
    """A process that lost the shard (a paused owner waking up) must not mark the new owner's entries applied."""
    authority, clock, _ = env
    a, b = await joined(authority, "a"), await joined(authority, "b")
    old = await authority.claim(a, [2], TTL)
    seq = await authority.post(2, "r", "signal", b"")
    clock.t += TTL + 1
    new = await authority.claim(b, [2], TTL)
    assert await authority.settle(a, old, [(2, seq, '{"ok": {}}')]) == 0
    assert await authority.verdict(2, seq) is None
    assert [e.seq for e in await authority.pending([2], 10)] == [seq]
    assert await authority.settle(b, new, [(2, seq, '{"ok": {}}')]) == 1
