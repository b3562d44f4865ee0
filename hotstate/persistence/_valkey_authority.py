"""``ValkeyAuthority``: the lease authority on one Valkey server, for deployments whose only durable tier is Valkey.

design/ownership.md §4.3-4.4 on Valkey (and §4.12: "a ValkeyAuthority could be
offered later for a single primary"). Keys, under the prefix ``P`` the
``ValkeyStore`` of the deployment uses (key layout 2, ``_valkey.py``):

- ``P:meta``: the shard count, shared with the store;
- ``P:{s}:lease``: hash ``{owner, acquired_at, expires_at}`` (no owner: free);
- ``P:{s}:fence``: hash ``{epoch, owner}``, the store's fence of shard ``s``,
  whose epoch a claim bumps: a claim is the seal of this tier;
- ``P:members`` (member id -> JSON ``[host, pid, started, name]``),
  ``P:members:joined`` and ``P:members:seen`` (member id -> authority time);
- ``P:{s}:inbox`` (seq -> JSON ``[run_id, kind, created_at]``),
  ``P:{s}:inbox:body``, ``P:{s}:inbox:verdict`` (seq -> body, verdict),
  ``P:{s}:inbox:seq`` (the last number), ``P:{s}:inbox:waiting`` (seqs
  without a verdict) and ``P:{s}:inbox:settled`` (seqs by ``created_at``);
- ``P:ownership_log``: list of JSON ``[shard, epoch, owner, event, at]``, newest first.

Every change is one Lua script (atomic on the server); lease times are the
server's clock (``TIME`` inside the script), so no two processes compare
their own clocks. Claims, renewals and the shard map span every shard: this
authority runs on one server, not on a Valkey Cluster, and refuses to open on
a Cluster node (``cluster_refusal``). Making it one would take more than
routing: a claim and a renewal are atomic across every shard here (one
script), which on a Cluster becomes one script per slot, each on a primary
that replicates asynchronously, so a failover can hand a promoted replica an
older epoch and lease while the old owner still writes. The ``ValkeyStore``
fence limits the harm, but an authority must not lose a claim it granted:
that is what ``PostgresAuthority`` (synchronous commit) and ``SQLiteAuthority``
(one host) are for.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Final, cast, final

import valkey.asyncio as avalkey

from hotstate._errors import ConfigError, PersistenceError
from hotstate.persistence._authority import InboxEntry, MemberInfo, Renewal, ShardLease, process_gone
from hotstate.persistence._shards import DEFAULT_SHARDS, check_shards
from hotstate.persistence._valkey import cluster_enabled, errors, read_layout

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence

    from valkey.commands.core import AsyncScript

__all__ = ["ValkeyAuthority", "cluster_refusal"]

_LOG_KEEP: Final = 100_000  # ownership log entries kept (the oldest go first), as SQLiteAuthority

# Every script: ARGV[1] = P, ARGV[2] = now ('' = the server's clock). Times
# are stored and returned as '%.17g' text (a double, exactly: Lua numbers
# become integers in a reply), epochs and seqs as integers.
_PRELUDE: Final = """#!lua
local p = ARGV[1]
local now = tonumber(ARGV[2])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local fmt = string.format
local function at(x) return fmt('%.17g', x) end
local function tag(s) return p .. ':{' .. s .. '}:' end
-- The fence's epoch as the store writes it (an integer; none: 0), or nil and why.
-- Scripts read every epoch they need before they write anything.
local function epoch_of(b)
  local e = redis.call('HGET', b .. 'fence', 'epoch')
  if not e then return 0 end
  if #e > 20 or not string.find(e, '^%d+$') then
    return nil, 'key ' .. b .. 'fence holds an epoch that is not an integer'
  end
  return tonumber(e)
end
local function log(s, e, owner, event)
  redis.call('LPUSH', p .. ':ownership_log', fmt('[%d,%d,%s,"%s",%s]', s, e, cjson.encode(owner), event, at(now)))
end
"""

# ARGV[3] = ttl, ARGV[4] = member, then per shard: s, the holder judged gone ('' = none), its floor.
# A shard is taken when its lease is free or expired, or held by that holder;
# never when this member holds it live. Returns shard, epoch, ... of those taken.
_CLAIM_LUA: Final = (
    _PRELUDE
    + """
local ttl, me = tonumber(ARGV[3]), ARGV[4]
local taken = {}
for i = 5, #ARGV, 3 do
  local s, gone, floor = tonumber(ARGV[i]), ARGV[i + 1], tonumber(ARGV[i + 2])
  local lease = redis.call('HMGET', tag(s) .. 'lease', 'owner', 'expires_at')
  local live = lease[1] and (tonumber(lease[2]) or 0) > now
  if not live or (lease[1] ~= me and lease[1] == gone) then
    local e, why = epoch_of(tag(s))
    if not e then return redis.error_reply(why) end
    taken[#taken + 1] = s
    taken[#taken + 1] = math.max(e, floor) + 1
  end
end
for i = 1, #taken, 2 do
  local b, e = tag(taken[i]), taken[i + 1]
  redis.call('HSET', b .. 'fence', 'epoch', fmt('%d', e), 'owner', me)
  redis.call('HSET', b .. 'lease', 'owner', me, 'acquired_at', at(now), 'expires_at', at(now + ttl))
  log(taken[i], e, me, 'acquire')
end
if #taken > 0 then redis.call('LTRIM', p .. ':ownership_log', 0, @KEEP@ - 1) end
return taken
"""
).replace("@KEEP@", str(_LOG_KEEP))

# ARGV[3] = shard count, ARGV[4] = ttl ('' = read only), ARGV[5] = member.
# Extends the member's live leases and records its heartbeat (a renewal), and
# returns {now, held shards, the map (owner or '', expires_at, acquired_at,
# epoch, per shard), then for a renewal the members' records, joined and
# seen hashes (HGETALL)}.
_MAP_LUA: Final = (
    _PRELUDE
    + """
local n, ttl, me = tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
local held, map = {}, {}
for s = 0, n - 1 do
  local lease = redis.call('HMGET', tag(s) .. 'lease', 'owner', 'expires_at', 'acquired_at')
  local e, why = epoch_of(tag(s))
  if not e then return redis.error_reply(why) end
  local expires = lease[2] or '0'
  if ttl and lease[1] == me and (tonumber(expires) or 0) > now then
    expires = at(now + ttl)
    held[#held + 1] = s
  end
  map[#map + 1] = lease[1] or ''
  map[#map + 1] = expires
  map[#map + 1] = lease[3] or '0'
  map[#map + 1] = e
end
if not ttl then return {at(now), held, map} end
for _, s in ipairs(held) do redis.call('HSET', tag(s) .. 'lease', 'expires_at', at(now + ttl)) end
if redis.call('HEXISTS', p .. ':members', me) == 1 then
  redis.call('HSET', p .. ':members:seen', me, at(now))
end
return {at(now), held, map, redis.call('HGETALL', p .. ':members'), redis.call('HGETALL', p .. ':members:joined'),
  redis.call('HGETALL', p .. ':members:seen')}
"""
)

# ARGV[3] = member, then shards: gives up those the member holds.
_RELEASE_LUA: Final = (
    _PRELUDE
    + """
local me, mine = ARGV[3], {}
for i = 4, #ARGV do
  local s = tonumber(ARGV[i])
  if redis.call('HGET', tag(s) .. 'lease', 'owner') == me then
    local e, why = epoch_of(tag(s))
    if not e then return redis.error_reply(why) end
    mine[#mine + 1] = s
    mine[#mine + 1] = e
  end
end
for i = 1, #mine, 2 do
  local b = tag(mine[i])
  redis.call('HDEL', b .. 'lease', 'owner')
  redis.call('HSET', b .. 'lease', 'expires_at', at(now))
  log(mine[i], mine[i + 1], me, 'release')
end
return #mine / 2
"""
)

# ARGV[3] = member, ARGV[4] = its JSON [host, pid, started, name]; ARGV[5] = '1' to forget it instead.
_MEMBER_LUA: Final = (
    _PRELUDE
    + """
local me = ARGV[3]
if ARGV[5] == '1' then
  redis.call('HDEL', p .. ':members', me)
  redis.call('HDEL', p .. ':members:joined', me)
  redis.call('HDEL', p .. ':members:seen', me)
else
  redis.call('HSET', p .. ':members', me, ARGV[4])
  redis.call('HSET', p .. ':members:joined', me, at(now))
  redis.call('HSET', p .. ':members:seen', me, at(now))
end
return 0
"""
)

# ARGV[3] = shard, ARGV[4] = run id, ARGV[5] = kind, ARGV[6] = body. Returns the entry's seq.
_POST_LUA: Final = (
    _PRELUDE
    + """
local b = tag(ARGV[3])
local seq = redis.call('INCR', b .. 'inbox:seq')
redis.call('HSET', b .. 'inbox', seq, '[' .. cjson.encode(ARGV[4]) .. ',' .. cjson.encode(ARGV[5]) .. ',' .. at(now) .. ']')
redis.call('HSET', b .. 'inbox:body', seq, ARGV[6])
redis.call('ZADD', b .. 'inbox:waiting', seq, seq)
return seq
"""
)

# ARGV[3] = member, then per entry: shard, seq, verdict, the epoch the member holds the shard at.
# Records a verdict only where none is, while the shard's fence is (that epoch, member).
_SETTLE_LUA: Final = (
    _PRELUDE
    + """
local me, n = ARGV[3], 0
for i = 4, #ARGV, 4 do
  local b, seq = tag(ARGV[i]), ARGV[i + 1]
  local f = redis.call('HMGET', b .. 'fence', 'epoch', 'owner')
  local meta = redis.call('HGET', b .. 'inbox', seq)
  if meta and f[2] == me and tonumber(f[1]) == tonumber(ARGV[i + 3]) then
    if redis.call('HSETNX', b .. 'inbox:verdict', seq, ARGV[i + 2]) == 1 then
      redis.call('ZREM', b .. 'inbox:waiting', seq)
      redis.call('ZADD', b .. 'inbox:settled', cjson.decode(meta)[3], seq)
      n = n + 1
    end
  end
end
return n
"""
)

# ARGV[3] = shard count, ARGV[4] = age: deletes settled entries posted before now - age.
_PRUNE_LUA: Final = (
    _PRELUDE
    + """
local n, cut = 0, '(' .. at(now - tonumber(ARGV[4]))
for s = 0, tonumber(ARGV[3]) - 1 do
  local b = tag(s)
  local old = redis.call('ZRANGEBYSCORE', b .. 'inbox:settled', '-inf', cut)
  for _, seq in ipairs(old) do
    redis.call('HDEL', b .. 'inbox', seq)
    redis.call('HDEL', b .. 'inbox:body', seq)
    redis.call('HDEL', b .. 'inbox:verdict', seq)
    redis.call('ZREM', b .. 'inbox:settled', seq)
  end
  n = n + #old
end
return n
"""
)


def _time(value: bytes | str) -> float:
    return float(value)


def _members(
    records: Mapping[bytes, bytes], joined: Mapping[bytes, bytes], seen: Mapping[bytes, bytes]
) -> tuple[MemberInfo, ...]:
    """The members from the three hashes (record, joined, seen) by member id."""
    out = []
    for raw_id, raw in records.items():
        host, pid, started, name = json.loads(raw)
        when = (_time(joined.get(raw_id, b"0")), _time(seen.get(raw_id, b"0")))
        out.append(MemberInfo(raw_id.decode(), host, pid, started, name, *when))
    return tuple(out)


def cluster_refusal(field: str, where: str) -> ConfigError:
    """The error for a ``ValkeyAuthority`` wanted on a Valkey Cluster (``field`` names the option)."""
    return ConfigError(
        field,
        where,
        "a Valkey Cluster cannot be the lease authority (asynchronous replication: a failover can lose a claim; "
        "and a claim spans every shard's slot): use hotstate.persistence.PostgresAuthority (several hosts) "
        "or SQLiteAuthority (one host), e.g. Runtime(ownership=Ownership(authority=...))",
    )


@final
class ValkeyAuthority:
    """Shard leases and epochs on one Valkey server, for processes that share only Valkey.

    A claim bumps the shard's epoch in ``P:{s}:fence`` (the fence the
    ``ValkeyStore`` on the same prefix checks every fenced save against) and
    sets its lease, in one script, so a claim is also the seal of that tier.
    Lease times are the server's clock.

    Not safe across a failover, nor across a restart that loses writes: an
    epoch bump lives only as long as the server's copy of it. A replica
    promoted by Sentinel or a Cluster failover (replication is asynchronous),
    or a server restarted without an append-only file (or with one not
    fsynced at every write), can come back with an older epoch and lease:
    then two processes can hold one shard at one epoch, and both write until
    the fence's owner check fences the second (design/ownership.md §4.10).
    Use it with a single primary, ``appendonly yes`` and ``appendfsync
    always``, and no failover; else use ``SQLiteAuthority`` (one host) or a
    PostgreSQL authority. ``post`` is as durable as that configuration. A
    Valkey Cluster is refused at ``open`` (module docstring).

    Args:
        url: the server, e.g. ``valkey://127.0.0.1:6379/0``.
        prefix: the key prefix: the same as the deployment's ``ValkeyStore``,
            so that a claim seals it.
        shards: the shard count; None takes the one recorded under the prefix
            (or ``DEFAULT_SHARDS``, then recorded). Another count than the
            recorded one is a ``ConfigError`` at ``open``.
        client: an existing client (not decoding responses) instead of ``url``;
            the authority does not close it.
        socket_timeout: seconds to wait on connect and on each reply.
        clock: the authority's time (default: the server's clock, read inside
            each script); tests inject one.
        gone: how a member is judged gone at a claim (default ``process_gone``).

    Raises:
        ConfigError: ``shards`` is not an int from 1 to ``MAX_SHARDS``.
    """

    def __init__(
        self,
        url: str = "valkey://127.0.0.1:6379/0",
        *,
        prefix: str = "hs",
        shards: int | None = None,
        client: avalkey.Valkey | None = None,
        socket_timeout: float = 5.0,
        clock: Callable[[], float] | None = None,
        gone: Callable[[MemberInfo], bool] | None = None,
    ) -> None:
        self._asked = None if shards is None else check_shards("ValkeyAuthority.shards", shards)
        self.shards = self._asked or DEFAULT_SHARDS
        self.url = url
        self.prefix = prefix
        self.name = f"valkey:{url}#{prefix}"
        self.socket_timeout = socket_timeout
        self._clock = clock
        self._gone = gone if gone is not None else process_gone
        self._client = client
        self._owns_client = client is None
        self._scripts: dict[str, AsyncScript] = {}

    def __repr__(self) -> str:
        return f"<ValkeyAuthority {self.url!r} prefix={self.prefix!r} shards={self.shards}>"

    def _now(self) -> str:
        """The time argument of a script: the injected clock's, or '' for the server's."""
        return "" if self._clock is None else repr(float(self._clock()))

    def _c(self, what: str) -> avalkey.Valkey:
        if self._client is None or not self._scripts:
            raise PersistenceError(self.name, f"cannot {what}: the authority is not open")
        return self._client

    async def _run(self, script: str, what: str, *args: str | bytes) -> Any:
        """Run one of the scripts with ``P`` and the time first (loading it again if the server lost it)."""
        self._c(what)
        async with errors(self.name, what):
            return await self._scripts[script](args=[self.prefix, self._now(), *args])

    async def open(self) -> None:
        """Connect; record (or check) the shard count in ``P:meta``, as the store does. Idempotent.

        Raises:
            StoreUnavailableError: the server cannot be reached.
            ConfigError: the prefix records another shard count, or the server
                is a Valkey Cluster node (``cluster_refusal``).
            PersistenceError: the prefix holds keys of layout 1.
        """
        if self._scripts:
            return
        if self._client is None:
            self._client = avalkey.Valkey.from_url(
                self.url,
                socket_timeout=self.socket_timeout,
                socket_connect_timeout=self.socket_timeout,
                decode_responses=False,
            )
        client = self._client
        try:
            async with errors(self.name, "open"):
                if await cluster_enabled(client):
                    raise cluster_refusal("ValkeyAuthority.url", self.url)
                self.shards, _ = await read_layout(
                    client, self.prefix, shards=self._asked, record=True, tier=self.name, field="ValkeyAuthority.shards"
                )
        except BaseException:
            await self.aclose()
            raise
        scripts = (_CLAIM_LUA, _MAP_LUA, _RELEASE_LUA, _MEMBER_LUA, _POST_LUA, _SETTLE_LUA, _PRUNE_LUA)
        self._scripts = {script: client.register_script(script) for script in scripts}

    async def aclose(self) -> None:
        """Close the client (idempotent); everything stays on the server."""
        self._scripts = {}
        client, self._client = self._client, None
        if client is not None and self._owns_client:
            await client.aclose()

    async def join(self, member: MemberInfo) -> None:
        """Record ``member`` as live (joined and last seen now)."""
        record = json.dumps([member.host, member.pid, member.started, member.name])
        await self._run(_MEMBER_LUA, "join", member.member_id, record, "0")

    async def renew(self, member_id: str, ttl: float) -> Renewal:
        """Extend every live lease of ``member_id`` and record its heartbeat, in one script; read the map."""
        reply = await self._run(_MAP_LUA, "renew", str(self.shards), repr(float(ttl)), member_id)
        now, held, leases = self._read_map(reply)
        members = _members(*(dict(zip(flat[::2], flat[1::2], strict=True)) for flat in reply[3:6]))
        return Renewal(frozenset(held), leases, tuple(m for m in members if m.last_seen > now - ttl), now)

    def _read_map(self, reply: Sequence[Any]) -> tuple[float, list[int], tuple[ShardLease, ...]]:
        """The time, the held shards and the shard map from ``_MAP_LUA``'s reply."""
        now, held, flat = reply[:3]
        leases = tuple(
            ShardLease(
                s,
                bytes(flat[4 * s]).decode() or None,
                int(flat[4 * s + 3]),
                _time(flat[4 * s + 1]),
                _time(flat[4 * s + 2]),
            )
            for s in range(self.shards)
        )
        return _time(now), [int(s) for s in held], leases

    async def claim(
        self, member_id: str, shards: Sequence[int], ttl: float, *, floors: Mapping[int, int] | None = None
    ) -> dict[int, int]:
        """Take each claimable shard of ``shards`` in one script; bump its epoch (past ``floors``; the store's fence: a seal).

        A lease held live by another member is broken only when that member's
        process is provably gone (``gone``); its record is read first, and the
        script breaks the lease only if that member still holds it.

        Raises:
            ConfigError: a shard outside ``0 .. shards - 1``.
        """
        for s in shards:
            if type(s) is not int or not 0 <= s < self.shards:
                raise ConfigError("claim.shards", s, f"must be a shard from 0 to {self.shards - 1}")
        wanted = list(dict.fromkeys(shards))
        gone = await self._gone_holders(member_id, wanted)
        args: list[str] = []
        floors = floors or {}
        for s in wanted:
            args += (str(s), gone.get(s, ""), str(int(floors.get(s, 0))))
        taken = await self._run(_CLAIM_LUA, "claim", repr(float(ttl)), member_id, *args)
        return {int(s): int(e) for s, e in zip(taken[::2], taken[1::2], strict=True)}

    async def _gone_holders(self, member_id: str, shards: Sequence[int]) -> dict[int, str]:
        """Shard -> its holder, for the shards held live by another member whose process is gone."""
        client = self._c("claim")
        async with errors(self.name, "claim"), client.pipeline(transaction=False) as pipe:
            if self._clock is None:
                pipe.time()
            for s in shards:
                pipe.hmget(f"{self.prefix}:{{{s}}}:lease", ["owner", "expires_at"])
            replies = await pipe.execute()
        if self._clock is None:
            seconds, micros = replies.pop(0)
            now = seconds + micros / 1e6
        else:
            now = float(self._clock())
        holders = {
            s: owner.decode()
            for s, (owner, expires) in zip(shards, replies, strict=True)
            if owner is not None and owner.decode() != member_id and _time(expires or b"0") > now
        }
        if not holders:
            return {}
        known = {m.member_id: m for m in await self.members()}
        return {s: holder for s, holder in holders.items() if holder in known and self._gone(known[holder])}

    async def release(self, member_id: str, shards: Collection[int]) -> None:
        """Give up ``shards`` that ``member_id`` holds: claimable at once."""
        wanted = [str(s) for s in shards]
        if wanted:
            await self._run(_RELEASE_LUA, "release", member_id, *wanted)

    async def leave(self, member_id: str) -> None:
        """Release every shard of ``member_id`` and remove it."""
        await self.release(member_id, range(self.shards))
        await self._run(_MEMBER_LUA, "leave", member_id, "", "1")

    async def leases(self) -> tuple[ShardLease, ...]:
        """The shard map, read only."""
        reply = await self._run(_MAP_LUA, "read the shard map", str(self.shards), "", "")
        return self._read_map(reply)[2]

    async def members(self) -> tuple[MemberInfo, ...]:
        """Every recorded member."""
        client = self._c("read the members")
        async with errors(self.name, "read the members"), client.pipeline(transaction=False) as pipe:
            for name in ("members", "members:joined", "members:seen"):
                pipe.hgetall(f"{self.prefix}:{name}")
            records, joined, seen = await pipe.execute()
        return _members(records, joined, seen)

    async def ownership_log(self, shard: int | None = None) -> list[tuple[int, int, str, str, float]]:
        """The ownership log, oldest first: ``(shard, epoch, owner, event, at)`` (acquire, release)."""
        client = self._c("read the ownership log")
        async with errors(self.name, "read the ownership log"):
            raw = await cast("Awaitable[list[bytes]]", client.lrange(f"{self.prefix}:ownership_log", 0, -1))
        rows = [tuple(json.loads(r)) for r in reversed(raw)]
        return [(s, e, o, ev, float(t)) for s, e, o, ev, t in rows if shard is None or s == shard]

    async def post(self, shard: int, run_id: str, kind: str, body: bytes) -> int:
        """Append a forwarded call to ``shard``'s inbox, numbered in the script (in commit order)."""
        return int(await self._run(_POST_LUA, "post to the inbox", str(shard), run_id, kind, bytes(body)))

    async def pending(self, shards: Collection[int], limit: int) -> list[InboxEntry]:
        """Entries of ``shards`` without a verdict, by shard then seq, at most ``limit``."""
        wanted = sorted(set(shards))
        if not wanted or limit < 1:
            return []
        client = self._c("read the inbox")
        async with errors(self.name, "read the inbox"):
            async with client.pipeline(transaction=False) as pipe:
                for s in wanted:
                    pipe.zrangebyscore(f"{self.prefix}:{{{s}}}:inbox:waiting", "-inf", "+inf", start=0, num=limit)
                waiting = await pipe.execute()
            chosen = [(s, int(seq)) for s, seqs in zip(wanted, waiting, strict=True) for seq in seqs][:limit]
            async with client.pipeline(transaction=False) as pipe:
                for s, seq in chosen:
                    pipe.hget(f"{self.prefix}:{{{s}}}:inbox", str(seq))
                    pipe.hget(f"{self.prefix}:{{{s}}}:inbox:body", str(seq))
                found = await pipe.execute()
        out = []
        for (s, seq), meta, body in zip(chosen, found[::2], found[1::2], strict=True):
            if meta is not None and body is not None:  # pruned meanwhile: gone
                run_id, kind, created_at = json.loads(meta)
                out.append(InboxEntry(s, seq, run_id, kind, bytes(body), float(created_at), None))
        return out

    async def settle(self, member_id: str, epochs: Mapping[int, int], verdicts: Sequence[tuple[int, int, str]]) -> int:
        """Record verdicts of applied entries, only while ``member_id`` holds their shard at ``epochs``."""
        args: list[str] = []
        for shard, seq, verdict in verdicts:
            args += (str(shard), str(seq), verdict, str(epochs.get(shard, -1)))
        if not args:
            return 0
        return int(await self._run(_SETTLE_LUA, "settle inbox entries", member_id, *args))

    async def verdict(self, shard: int, seq: int) -> str | None:
        """The entry's verdict, or None while it waits (or when it was pruned)."""
        client = self._c("read a verdict")
        async with errors(self.name, "read a verdict"):
            raw = await cast(
                "Awaitable[bytes | None]", client.hget(f"{self.prefix}:{{{shard}}}:inbox:verdict", str(seq))
            )
        return None if raw is None else bytes(raw).decode()

    async def prune(self, age: float) -> int:
        """Delete settled entries posted more than ``age`` seconds ago (authority time); numbers never go back."""
        return int(await self._run(_PRUNE_LUA, "prune the inbox", str(self.shards), repr(float(age))))
