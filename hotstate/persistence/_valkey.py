"""``ValkeyStore``: the Valkey tier of the map in docs/architecture.md.

Key layout 2 (design/ownership.md §4.9; ``P`` is the prefix, ``s`` the run's
shard, ``shard_of``). Every key of a run lives under its shard's hash tag
``{s}``, so all keys of a shard hash to one Valkey Cluster slot:

- ``P:meta``: hash ``{shards, layout}``, written at the first ``open`` (the
  only key of no shard besides a standalone server's writer marks; on a
  Cluster it lives in the slot of its own name, like any other key);
- ``P:{s}:fence``: hash ``{epoch, owner}``, the shard's fence (``Store.seal``);
- ``P:{s}:run:<run_id>``: hash of the header fields (``epoch`` among them),
  ``error`` and ``body``;
- ``P:{s}:status:<status>``, ``P:{s}:wf:<workflow>``, ``P:{s}:runs``: sorted
  sets with score 0 and the run id as member, so ``ZRANGEBYLEX`` pages by run
  id; a scan merges the shards' sets in run-id order;
- ``P:{s}:hist:<run_id>``: hash of version -> transition JSON (``HSETNX``, so
  a retried batch never duplicates history);
- ``P:{s}:dead``: hash of run id -> dead-letter JSON, ``P:{s}:dead:body``:
  run id -> body;
- ``P:{s}:ver:<run_id>``: the kept copies, a hash of version -> body and
  ``{version}:h`` -> header JSON;
- ``P:mark:<writer>``: each open store's mark, ``"{high}:{lost}"``, written at
  ``open``, advanced by every ``save``, deleted by ``aclose``, and expiring
  ``MARK_TTL`` after the last save (see ``ValkeyStore.save``); on a Cluster
  ``P:{s}:mark:<writer>`` instead, one per shard, in the shard's slot.

A prefix that holds keys of layout 1 (``P:runs``, ``P:run:<id>``... and no
``P:meta``) is refused at ``open``: hotstate is pre-1.0 and does not migrate.

``save`` applies each shard's part of a batch server-side (its fence, the
``(epoch, version)`` guard, the indexes) in Lua scripts, all pipelined in one
round trip with the writer's mark last. A script holds the parts of several
shards on a standalone server (``SCRIPT_ROWS``) and of one shard on a Cluster
node, where every script starts with ``#!lua`` so that the server refuses
one that would touch two slots.

On a Valkey Cluster (``INFO cluster`` says ``cluster_enabled:1`` at ``open``)
the store talks through ``valkey.asyncio.cluster.ValkeyCluster``, built from
``url`` (any node's) or given as ``client``: its pipeline sends each node its
scripts in one round trip, all nodes at once, follows ``MOVED``/``ASK`` and
reads the slot map again after a failover. Every call routes by its keys,
and every key of a script is in one slot, so saves, seals, reads, scans
(which merge index sets held by several nodes), dead letters, kept copies
and purges all work across nodes. What a Cluster changes:

- A writer's mark is one key per shard, ``P:{s}:mark:<writer>``, checked and
  advanced inside the shard's own save script, atomically with its rows: a
  failover to a replica that lacks acknowledged rows of shard ``s`` lacks the
  mark that came with them, and the writer's next save of ``s`` (or any
  probe, which checks every shard) reports ``SaveResult.reset``. Not noticed:
  a loss in a shard the writer never writes or probes again, and the loss of
  writes a mark does not follow (a seal, a dead letter, a kept copy, a purge)
  unless a later save of the same shard by the same writer was lost too.
- A failover loses what the replica had not received (replication is
  asynchronous): rows, and seals. A shard whose seal was lost has its older
  fence back, so the old owner's fenced saves are taken again until the new
  owner writes the shard (its higher epoch then wins by ``(epoch, version)``).
  tests/integration/test_valkey_cluster_failover.py shows both.
- While a primary is down, and until its replica serves its slots, calls
  raise ``StoreUnavailableError`` (a node unreachable, ``CLUSTERDOWN``,
  ``TRYAGAIN``, redirections run out); the first call after a failover may
  raise it once more, as the client learns the new slot map.
- ``ValkeyAuthority`` refuses a Cluster: use ``PostgresAuthority`` or
  ``SQLiteAuthority`` (``_valkey_authority.py`` says why).
- ``P:meta`` and dead-letter deletes are scripts on one key's slot (a Cluster
  client has no ``MULTI``); the key names are those of a standalone server,
  so a prefix moved between the two keeps its layout.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
import sys
import time
from typing import TYPE_CHECKING, Any, Final, NamedTuple, TypeVar, cast, final

import anyio
import msgspec
import valkey.asyncio as avalkey
from valkey import exceptions as vex
from valkey.asyncio.cluster import ValkeyCluster
from valkey.utils import LIBVALKEY_AVAILABLE

from hotstate._errors import (
    CodecError,
    ConfigError,
    HotstateInternalError,
    PersistenceError,
    StoreUnavailableError,
)
from hotstate.persistence._records import (
    RunHeader,
    SaveResult,
    StoredDeadLetter,
    StoredSnapshot,
    transition_from_json,
)
from hotstate.persistence._shards import DEFAULT_SHARDS, check_shards, shard_of
from hotstate.persistence._store import (
    CALL_BYTES,
    CALL_TRANSITIONS,
    FINISHED_STATUSES,
    MARK_TTL,
    StoreBase,
    WriterMark,
    bad_row,
    check_limit,
    render_id,
    status_filter,
    stored_problem,
    transition_parts,
    unwritable,
    without,
)

if sys.version_info >= (3, 12):
    from typing import override
else:
    from typing_extensions import override

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable, Mapping, Sequence
    from typing import TypeAlias

    from hotstate.actors._snapshot import Transition
    from hotstate.persistence._records import BadRow
    from hotstate.persistence._shards import Fence
    from hotstate.persistence._valkey_authority import ValkeyAuthority

__all__ = ["Client", "ValkeyStore", "cluster_enabled", "errors", "read_layout", "refusal"]

_T = TypeVar("_T")

Client: TypeAlias = "avalkey.Valkey | ValkeyCluster"
"""A client of one server, or of a Valkey Cluster (routing each key to its node)."""

LAYOUT: Final = 2
"""The key layout this module reads and writes (recorded in ``P:meta``)."""

_HEADER_FIELDS: Final = (
    "run_id",
    "workflow",
    "workflow_version",
    "version",
    "step",
    "status",
    "updated_at",
    "attempt",
    "epoch",
)
_SNAPSHOT_FIELDS: Final = (*_HEADER_FIELDS, "error", "body")
_MAY_LACK: Final = frozenset({"error", "epoch"})  # no error; no epoch: written before epochs (0)

SCRIPT_ROWS: Final = 1024
"""Snapshots and transitions a save script gathers from several shards (a standalone server).

A shard's part alone may hold more (up to ``CALL_TRANSITIONS``). Flushing
20,000 runs (2 cores, medians of 4): ~40-42k snapshots/s in scripts of 4,096
rows, ~45-47k in scripts of 256 to 1,024 rows (Lua's tables stay small), as
with one script per shard; a flush of fewer rows is one script, which saves
valkey-py's ~27 us of packing and reading per command (128 scripts: ~3.5 ms
a flush, which cost W1 write-behind Valkey ~25% of its steps/s).
"""

TRIP_ROWS: Final = 8 * SCRIPT_ROWS
"""Snapshots and transitions a save sends in one round trip; a larger flush takes several.

Packing a pipeline holds the event loop: a flush of 10,000 runs and 55,000
transitions packed whole held it ~300 ms, and W1 write-behind Valkey
(N=10,000, whose whole run is 2-3 such flushes) lost ~10% of its steps/s;
in round trips of 8 scripts it matched the release before (medians of 5-6
runs, 2 cores).
"""

# Keys that only layout 1 wrote (P:epoch before the writers' marks); a
# prefix holding one of them and no P:meta is refused at open.
_LAYOUT_1_KEYS: Final = ("runs", "epoch", "dead", "dead:body")

# A save's parts of one or more shards (ValkeyStore.save): on a standalone
# server one script carries the shards of a round up to SCRIPT_ROWS, on a
# Cluster node one shard (a script touches one slot there).
# KEYS: each shard's fence key P:{s}:fence (the other keys the script
# computes from P and s are in the same slot). ARGV: P, the owner, then JSON:
# the shards [[s, the batch's epoch there ('' = an unfenced save: the fence
# is neither read nor written)], ...], their heads [[head, ...], ...] and
# their transitions [[transition, ...], ...], then one body per head, shard
# after shard. A shard carrying only the first transitions of a long history
# has no heads.
# The heads travel as JSON arrays of string fields (cjson decodes them
# server-side) and bodies as separate ARGV entries, so binary bytes survive and
# the client packs ~1 argument per snapshot instead of ~14: packing arguments
# was 60% of a flush's client time (measured: 10k -> 40k+ snapshots/s).
# Copies are ordered by (epoch, version) (Store): the guard runs here, server-side.
# The reply holds one reply per shard: {written, stale, transitions added}
# and, only when a run was rejected or a snapshot met a higher copy (so the
# usual reply stays 3 integers), the number of rejected runs, then (run id,
# reason) for each (SaveResult.rejected), then (run id, stored version) for
# each run whose highest (epoch, version) in the batch is below the one now
# stored (SaveResult.conflicts). A fenced shard's reply is {-1, the fence's
# epoch}, a shard whose fence key is unusable an error.
# On a Cluster (one shard a script) the shard's writer mark P:{s}:mark:<writer>
# comes after the fence key in KEYS, and the shard's entry in ARGV[3] has two
# more items, the floor and the seq (_MARK_LUA's rule): the mark is checked
# and advanced first, whatever the fence, and one more reply item says
# whether the shard lost writes (1) or not (0).
_SAVE_LUA: Final = """#!lua
local p, owner = ARGV[1], ARGV[2]
local shards = cjson.decode(ARGV[3])
local all_heads = cjson.decode(ARGV[4])
local all_trans = cjson.decode(ARGV[5])
local fmt = string.format
local reset = nil
if #KEYS > #shards then
  local mkey, floor, seq = KEYS[#KEYS], shards[1][3], shards[1][4]
  local high, lost = 0, 0
  local ok, held = pcall(redis.call, 'GET', mkey)
  if ok and held then
    local h, l = string.match(held, '^(%d+):(%d+)$')
    if h then high, lost = tonumber(h), tonumber(l) end
  end
  if high < floor then lost = seq end
  redis.call('SET', mkey, fmt('%d:%d', math.max(high, seq), lost), 'EX', @MARK_TTL@)
  reset = 0
  if lost > floor then reset = 1 end
end
-- A stored integer as Python's str() writes it, else nil: a row hotstate did
-- not write, which every read reports as malformed. Longer than 20
-- characters is not one either: Python's int() reads no more.
local function num(s)
  if s and #s <= 20 and string.find(s, '^%-?%d+$') then return tonumber(s) end
  return nil
end
local types = {}
local function wrong(key, want)
  local t = types[key]
  if not t then
    t = redis.call('TYPE', key).ok
    types[key] = t
  end
  if t ~= 'none' and t ~= want then return 'key ' .. key .. ' is a ' .. t .. ', not a ' .. want end
  return false
end
-- Decimal text of a signed 64-bit integer (Python's str() of an int in range);
-- anything shorter than 19 characters that Python wrote is one.
local function int64(s)
  local sign, d = string.match(s, '^(%-?)(%d+)$')
  if not d then return false end
  if #d ~= 19 then return #d < 19 end
  if sign == '-' then return d <= '9223372036854775808' end
  return d <= '9223372036854775807'
end
local NUMBERS = {{3, 'workflow_version'}, {4, 'version'}, {5, 'step'}, {8, 'attempt'}, {9, 'epoch'}}
-- A stored copy (its version and epoch as stored) against a head's (epoch,
-- version): 1 above, 0 the same, -1 below. No copy, or a version or epoch
-- that is not an integer, orders below every head (the write replaces it);
-- no epoch is 0 (a copy written before epochs).
local function order(v, e, hv, he)
  local sv, se = num(v), 0
  if e then se = num(e) end
  if not sv or not se then return -1 end
  if se ~= he then
    if se > he then return 1 end
    return -1
  end
  if sv > hv then return 1 end
  if sv < hv then return -1 end
  return 0
end
-- 2^63, exact as a double (cjson's numbers). Doubles cannot tell -2^63 from one below it, nor
-- 2^63 - 1 from 2^63: both edges are refused, so nothing past 64 bits is ever taken.
local LIMIT = 9223372036854775808
local enc = cjson.encode

-- Shard g's part; its first body is ARGV[body + 1].
local function shard(g, body)
  local epoch = shards[g][2]
  local b = p .. ':{' .. fmt('%d', shards[g][1]) .. '}:'
  local fkey, rkey = KEYS[g], b .. 'runs'
  local heads, trans = all_heads[g], all_trans[g]
  -- The shard's fence first (fence_verdict in _shards.py): a fenced shard
  -- writes nothing; an older or missing fence is raised to the batch's.
  if epoch ~= '' then
    local e = tonumber(epoch)
    local ok, f = pcall(redis.call, 'HMGET', fkey, 'epoch', 'owner')
    if not ok then return redis.error_reply('key ' .. fkey .. ' is a ' .. redis.call('TYPE', fkey).ok .. ', not a hash') end
    local held = num(f[1])
    if f[1] and not held then return redis.error_reply('key ' .. fkey .. ' holds an epoch that is not an integer') end
    if held and (held > e or (held == e and f[2] ~= owner)) then return {-1, f[1]} end
    if not held or held < e then redis.call('HSET', fkey, 'epoch', epoch, 'owner', owner) end
  end
  -- Pass 1 reads and checks, and writes nothing. A run that cannot be written
  -- (a number out of range, a key it would write holding another type) is
  -- rejected whole, with the reason, and every other run is written (#11): a
  -- script that fails keeps the writes it made before, so no check may wait
  -- for pass 2.
  local bad, nbad = {}, 0  -- run id -> why, for each rejected run (checked only while not rejected)
  local cur = {}  -- run id -> {version, status, workflow, error, epoch} as stored; pass 2 keeps it current
  -- Pass 2's writes, foreseen: run id -> version, status, workflow, epoch after
  -- the heads seen so far (four tables: no table built per head).
  local simv, sims, simw, sime = {}, {}, {}, {}
  for j = 1, #heads do
    local h = heads[j]
    local rid = h[1]
    if not bad[rid] then
      local why = false
      if #h[3] > 18 or #h[4] > 18 or #h[5] > 18 or #h[8] > 18 or #h[9] > 18 then  -- shorter is in range: no call
        for k = 1, 5 do
          local f = NUMBERS[k]
          if not why and not int64(h[f[1]]) then
            why = f[2] .. '=' .. h[f[1]] .. ' is out of range (a signed 64-bit integer)'
          end
        end
      end
      if not why and not cur[rid] then
        local key = b .. 'run:' .. rid
        local ok, got = pcall(redis.call, 'HMGET', key, 'version', 'status', 'workflow', 'error', 'epoch')
        if ok then
          cur[rid] = got
          simv[rid], sims[rid], simw[rid], sime[rid] = got[1], got[2], got[3], got[5]
        else
          why = wrong(key, 'hash') or ('key ' .. key .. ' cannot be read')
        end
      end
      local st, wf = sims[rid], simw[rid]
      -- Only the keys this head's write touches: one planted index key refuses
      -- the runs moving into or out of it, not every run. A run that keeps its
      -- status and workflow touches no index key (the usual step: no check).
      if not why and (st ~= h[6] or wf ~= h[2] or not simv[rid]) then
        if order(simv[rid], sime[rid], tonumber(h[4]), tonumber(h[9])) < 0 then
          if st ~= h[6] then
            why = (st and wrong(b .. 'status:' .. st, 'zset')) or wrong(b .. 'status:' .. h[6], 'zset')
          end
          if not why and wf ~= h[2] then
            why = (wf and wrong(b .. 'wf:' .. wf, 'zset')) or wrong(b .. 'wf:' .. h[2], 'zset')
          end
          if not why and not simv[rid] then why = wrong(rkey, 'zset') end
          simv[rid], sims[rid], simw[rid], sime[rid] = h[4], h[6], h[2], h[9]
        end
      end
      if why then
        bad[rid], nbad = why, nbad + 1
      end
    end
  end
  for j = 1, #trans do
    local t = trans[j]
    local rid = t[1]
    if not bad[rid] then
      local why = false
      if type(t[6]) ~= 'number' then  -- the client sends no NaN or infinity; a null is not a time
        why = 'transition v' .. fmt('%.17g', t[2]) .. ' at is not a number'
      elseif not (t[2] > -LIMIT and t[2] < LIMIT) then
        why = 'transition version ' .. fmt('%.17g', t[2]) .. ' is out of range (a signed 64-bit integer)'
      elseif not (t[4] > -LIMIT and t[4] < LIMIT) then
        why = 'transition step ' .. fmt('%.17g', t[4]) .. ' is out of range (a signed 64-bit integer)'
      else
        why = wrong(b .. 'hist:' .. rid, 'hash')
      end
      if why then
        bad[rid], nbad = why, nbad + 1
      end
    end
  end
  local written, stale, added = 0, 0, 0
  local above = false  -- a snapshot met a strictly higher stored (epoch, version)
  for j = 1, #heads do
    local h = heads[j]
    local rid, wf, st = h[1], h[2], h[6]
    if not bad[rid] then
      local c = cur[rid]
      local o = order(c[1], c[5], tonumber(h[4]), tonumber(h[9]))
      if o >= 0 then
        stale = stale + 1
        if o > 0 then above = true end
      else
        local key = b .. 'run:' .. rid
        redis.call('HSET', key, 'run_id', rid, 'workflow', wf, 'workflow_version', h[3],
          'version', h[4], 'step', h[5], 'status', st, 'updated_at', h[7],
          'attempt', h[8], 'epoch', h[9], 'body', ARGV[body + j])
        if h[10] ~= '' then
          redis.call('HSET', key, 'error', h[10])
        elseif c[4] then
          redis.call('HDEL', key, 'error')
        end
        if c[2] ~= st then
          if c[2] then redis.call('ZREM', b .. 'status:' .. c[2], rid) end
          redis.call('ZADD', b .. 'status:' .. st, 0, rid)
        end
        if c[3] ~= wf then
          if c[3] then redis.call('ZREM', b .. 'wf:' .. c[3], rid) end
          redis.call('ZADD', b .. 'wf:' .. wf, 0, rid)
        end
        if not c[1] then redis.call('ZADD', rkey, 0, rid) end
        cur[rid] = {h[4], st, wf, h[10] ~= '' and h[10] or false, h[9]}
        written = written + 1
      end
    end
  end
  -- Each history entry is transition_to_json()'s text, built here from the
  -- batch's JSON ('%.17g' because cjson.encode would round `at` to 14 digits).
  for j = 1, #trans do
    local t = trans[j]
    if not bad[t[1]] then
      local detail = 'null'
      if t[7] ~= cjson.null then detail = enc(t[7]) end
      local v = fmt('%d', t[2])
      local text = '[' .. enc(t[1]) .. ',' .. v .. ',' .. enc(t[3]) .. ',' .. fmt('%d', t[4]) .. ',' ..
        enc(t[5]) .. ',' .. fmt('%.17g', t[6]) .. ',' .. detail .. ']'
      added = added + redis.call('HSETNX', b .. 'hist:' .. t[1], v, text)
    end
  end
  local reply = {written, stale, added}
  if nbad > 0 or above then
    reply[4] = nbad
    for rid, why in pairs(bad) do
      reply[#reply + 1] = rid
      reply[#reply + 1] = why
    end
  end
  if above then
    local topv, tope = {}, {}
    for j = 1, #heads do
      local rid = heads[j][1]
      if not bad[rid] then
        local v, e = tonumber(heads[j][4]), tonumber(heads[j][9])
        if not topv[rid] or e > tope[rid] or (e == tope[rid] and v > topv[rid]) then
          topv[rid], tope[rid] = v, e
        end
      end
    end
    for rid, v in pairs(topv) do
      if order(cur[rid][1], cur[rid][5], v, tope[rid]) > 0 then
        reply[#reply + 1] = rid
        reply[#reply + 1] = cur[rid][1]
      end
    end
  end
  return reply
end

local replies, body = {}, 5
for g = 1, #shards do
  replies[g] = shard(g, body)
  body = body + #all_heads[g]
end
if reset then replies[#shards + 1] = reset end
return replies
""".replace("@MARK_TTL@", str(int(MARK_TTL)))

# This writer's mark (advance_mark in _store.py). KEYS[1] = P:mark:<writer>;
# ARGV: floor, seq. Lower than the floor, or gone, means the server lost
# writes this writer had acknowledged (restarted empty or from an older
# RDB/AOF, a restored backup). A mark key of another type reads as gone (SET
# replaces it). Returns 1 for a reset.
_MARK_LUA: Final = """#!lua
local floor, seq = tonumber(ARGV[1]), tonumber(ARGV[2])
local high, lost = 0, 0
local ok, held = pcall(redis.call, 'GET', KEYS[1])
if ok and held then
  local h, l = string.match(held, '^(%d+):(%d+)$')
  if h then high, lost = tonumber(h), tonumber(l) end
end
if high < floor then lost = seq end
redis.call('SET', KEYS[1], string.format('%d:%d', math.max(high, seq), lost), 'EX', @MARK_TTL@)
if lost > floor then return 1 end
return 0
""".replace("@MARK_TTL@", str(int(MARK_TTL)))

# Store.seal for one shard. KEYS[1] = P:{s}:fence; ARGV: epoch, owner.
# Returns nil when sealed (raised, or already this owner's at this epoch),
# else the stored epoch (a newer one, or this one held by another owner).
_SEAL_LUA: Final = """#!lua
local ok, f = pcall(redis.call, 'HMGET', KEYS[1], 'epoch', 'owner')
if not ok then
  return redis.error_reply('key ' .. KEYS[1] .. ' is a ' .. redis.call('TYPE', KEYS[1]).ok .. ', not a hash')
end
local epoch, held = tonumber(ARGV[1]), nil
if f[1] and #f[1] <= 20 and string.find(f[1], '^%-?%d+$') then held = tonumber(f[1]) end
if f[1] and not held then return redis.error_reply('key ' .. KEYS[1] .. ' holds an epoch that is not an integer') end
if held and (held > epoch or (held == epoch and f[2] ~= ARGV[2])) then return f[1] end
if not held or held < epoch then redis.call('HSET', KEYS[1], 'epoch', ARGV[1], 'owner', ARGV[2]) end
return false
"""

# KEYS: B..'runs'; ARGV: B, cut-off, then run ids of the shard. Re-checks
# status and time server-side, so a run revived since the caller listed it is kept.
_PURGE_LUA: Final = """#!lua
local b, before = ARGV[1], tonumber(ARGV[2])
local finished = {done = true, failed = true, cancelled = true}
local n = 0
for i = 3, #ARGV do
  local rid = ARGV[i]
  local key = b .. 'run:' .. rid
  local h = redis.call('HMGET', key, 'status', 'workflow', 'updated_at')
  if h[1] and finished[h[1]] and tonumber(h[3]) < before then
    redis.call('DEL', key, b .. 'hist:' .. rid, b .. 'ver:' .. rid)
    redis.call('ZREM', b .. 'status:' .. h[1], rid)
    redis.call('ZREM', b .. 'wf:' .. h[2], rid)
    redis.call('ZREM', KEYS[1], rid)
    n = n + 1
  end
end
return n
"""

# KEYS: the run's key, B..'runs'; ARGV: B, run id, body.
_DELETE_COPY_LUA: Final = """#!lua
local b, rid = ARGV[1], ARGV[2]
local key = KEYS[1]
if redis.call('TYPE', key)['ok'] ~= 'hash' then return 0 end
local h = redis.call('HMGET', key, 'body', 'status', 'workflow')
if h[1] ~= ARGV[3] then return 0 end
redis.call('DEL', key)
if h[2] then redis.call('ZREM', b .. 'status:' .. h[2], rid) end
if h[3] then redis.call('ZREM', b .. 'wf:' .. h[3], rid) end
redis.call('ZREM', KEYS[2], rid)
return 1
"""

# The fence check that opens a dead-letter or kept-copy script (fence_verdict
# in _shards.py, as in _SAVE_LUA), before anything is written. KEYS[1] =
# P:{s}:fence; ARGV[1] = the writer's epoch there ('' = an unfenced write: the
# fence is neither read nor written), ARGV[2] = the owner. A fenced shard
# replies {-1, the fence's epoch} and writes nothing; an older or missing
# fence is raised to the writer's.
_FENCE_LUA: Final = """
if ARGV[1] ~= '' then
  local fkey, e = KEYS[1], tonumber(ARGV[1])
  local ok, f = pcall(redis.call, 'HMGET', fkey, 'epoch', 'owner')
  if not ok then return redis.error_reply('key ' .. fkey .. ' is a ' .. redis.call('TYPE', fkey).ok .. ', not a hash') end
  local held = nil
  if f[1] and #f[1] <= 20 and string.find(f[1], '^%-?%d+$') then held = tonumber(f[1]) end
  if f[1] and not held then return redis.error_reply('key ' .. fkey .. ' holds an epoch that is not an integer') end
  if held and (held > e or (held == e and f[2] ~= ARGV[2])) then return {-1, f[1]} end
  if not held or held < e then redis.call('HSET', fkey, 'epoch', ARGV[1], 'owner', ARGV[2]) end
end
"""

# One shard's dead letters, atomically. KEYS: B..'fence', B..'dead',
# B..'dead:body'; ARGV: epoch, owner (_FENCE_LUA), then (run id, JSON, body)...
_DEAD_LUA: Final = (
    "#!lua"
    + _FENCE_LUA
    + """for i = 3, #ARGV, 3 do
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
  redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 2])
end
return (#ARGV - 2) / 3
"""
)

# One shard's kept copies (ValkeyStore.save_versions). KEYS: B..'fence', then
# each copy's B..'ver:'..run_id; ARGV: epoch, owner (_FENCE_LUA), then per
# copy, version, epoch, body, header JSON (its 9th item is the epoch; a copy
# kept before epochs has its error there, which reads as epoch 0). The first
# copy of a version stays, unless a newer owner's (a higher epoch) comes.
_VERSIONS_LUA: Final = (
    "#!lua"
    + _FENCE_LUA
    + """for j = 2, #KEYS do
  local key, i = KEYS[j], 4 * j - 5
  local v = ARGV[i]
  local held = redis.call('HGET', key, v .. ':h')
  local keep = not held
  if held then
    local ok, h = pcall(cjson.decode, held)
    local e = 0
    if ok and type(h) == 'table' and type(h[9]) == 'number' then e = h[9] end
    keep = tonumber(ARGV[i + 1]) > e
  end
  if keep then redis.call('HSET', key, v, ARGV[i + 2], v .. ':h', ARGV[i + 3]) end
end
return 0
"""
)

# P:meta at a first open: KEYS[1] = P:meta; ARGV: shards, layout. Of two
# stores opening an empty prefix at once, the first one's count is recorded
# (HSETNX). Returns HGETALL P:meta. A script, not MULTI: a Cluster client has
# no transactions, and the key has no shard (its slot is the prefix's).
_META_LUA: Final = """#!lua
redis.call('HSETNX', KEYS[1], 'shards', ARGV[1])
redis.call('HSETNX', KEYS[1], 'layout', ARGV[2])
return redis.call('HGETALL', KEYS[1])
"""

# One shard's dead letter, removed. KEYS: B..'dead', B..'dead:body'; ARGV: run id.
_DELETE_DEAD_LUA: Final = """#!lua
local n = redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
return n
"""

# Every script starts with "#!lua" (no flags): a Valkey Cluster then refuses
# a script that touches keys of two slots, as the layout requires, instead of
# running it in the compatibility mode that lets undeclared keys of any slot
# through (tests/integration/test_valkey_layout.py runs the store on one).
_SCRIPTS: Final = (
    _SAVE_LUA,
    _MARK_LUA,
    _SEAL_LUA,
    _PURGE_LUA,
    _DELETE_COPY_LUA,
    _DEAD_LUA,
    _VERSIONS_LUA,
    _DELETE_DEAD_LUA,
)


_TRANSIENT_REPLIES: Final = (
    "OOM",
    "MISCONF",
    "READONLY",
    "LOADING",
    "BUSY",
    "MASTERDOWN",
    "CLUSTERDOWN",
    "TRYAGAIN",
)

# A Cluster's replies while it fails over or moves a slot: a retry after the
# client refreshed its slot map may succeed (design/ownership.md §4.9).
# valkey-py strips the code of MOVED, ASK, TRYAGAIN and CLUSTERDOWN, so they are told by class.
_TRANSIENT_CLUSTER: Final = (vex.ClusterDownError, vex.TryAgainError, vex.AskError)  # MOVED is an AskError

# Of valkey-py's ValkeyClusterException messages, those that a retry may fix
# (no node reachable, slots not covered yet, nodes that disagree mid-failover).
_TRANSIENT_CLUSTER_TEXT: Final = ("cannot be connected", "not covered", "could not agree")


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _fields(
    run_id: str, reply: list[bytes | None] | Exception, names: Sequence[str], tier: str
) -> list[bytes | None] | None:
    """The values of a reply to ``HMGET key *names``; None when the key does not exist.

    Raises:
        CodecError: the key is not a hash, or the hash lacks a field of
            ``names`` other than ``error`` and ``epoch`` (those a run may lack).
    """
    if isinstance(reply, Exception):
        raise CodecError(tier, f"run {run_id!r}: stored key is not a hash: {reply}")
    if None in reply:
        if all(v is None for v in reply):
            return None
        missing = [name for name, v in zip(names, reply, strict=True) if v is None and name not in _MAY_LACK]
        if missing:
            raise CodecError(tier, f"run {run_id!r}: stored hash lacks {', '.join(missing)}")
    return reply


_INT_TEXT: Final = re.compile(r"-?[0-9]{1,19}")


def _strict_int(text: str) -> int:
    """A stored integer exactly as this store writes it (``str(int)``).

    Python's ``int()`` also takes ``+6``, `` 6``, ``6_0`` and other scripts'
    digits, which the server-side scripts read differently (or not at all):
    two readings of one field would let a changed field pass the envelope
    check in Python while the version guard or a purge sees another value.

    Raises:
        ValueError: anything else.
    """
    if _INT_TEXT.fullmatch(text) is None:
        raise ValueError(f"not an integer as stored: {text[:40]!r}")
    return int(text)


def _strict_float(text: str) -> float:
    """A stored time exactly as this store writes it (``repr(float)``).

    Raises:
        ValueError: anything else (``1_0.5``, `` 1.5``, ``nan``).
    """
    value = float(text)
    if repr(value) != text or value != value:
        raise ValueError(f"not a time as stored: {text[:40]!r}")
    return value


_PARSERS: Final[tuple[tuple[Callable[[str], object], str], ...]] = (
    (str, "str"),
    (str, "str"),
    (_strict_int, "int"),
    (_strict_int, "int"),
    (_strict_int, "int"),
    (str, "str"),
    (_strict_float, "float"),
    (_strict_int, "int"),
    (_strict_int, "int"),
)
"""Each header field's parser and the type it reads, in _HEADER_FIELDS order."""


def _header(run_id: str, values: Sequence[Any], tier: str) -> RunHeader:
    """A run's header from the first nine values of ``_fields`` (all present but ``epoch``).

    Raises:
        CodecError: a field is not UTF-8, a number does not parse, or the
            ``run_id`` field is not the run id of its key.
    """
    try:
        rid, wf, wf_version, version, step, status, updated_at, attempt = (v.decode() for v in values[:8])
        epoch = values[8]
        header = RunHeader(
            rid,
            wf,
            _strict_int(wf_version),
            _strict_int(version),
            _strict_int(step),
            status,
            _strict_float(updated_at),
            _strict_int(attempt),
            0 if epoch is None else _strict_int(epoch.decode()),
        )
    except (ValueError, OverflowError) as exc:  # UnicodeDecodeError is a ValueError; so is a 5,000-digit int
        raise CodecError(tier, f"run {run_id!r}: stored header is malformed: {_bad_fields(values)}") from exc
    if rid != run_id:
        raise CodecError(tier, f"run {run_id!r}: stored header is malformed: its run_id field is {rid!r}")
    return header


def _bad_fields(values: Sequence[bytes | None]) -> str:
    """Name each header field that does not parse, with its stored bytes (shortened)."""
    bad = []
    for name, (parse, kind), raw in zip(_HEADER_FIELDS, _PARSERS, values, strict=False):
        if raw is None:
            continue  # no epoch: 0
        try:
            parse(raw.decode())
        except (ValueError, OverflowError) as exc:
            shown = raw if len(raw) <= 40 else raw[:40] + b"..."
            why = "not UTF-8" if isinstance(exc, UnicodeDecodeError) else f"not {kind}"
            bad.append(f"{name}={shown!r} ({why})")
    return ", ".join(bad)


def _header_row(run_id: str, values: Sequence[Any], tier: str) -> tuple[RunHeader, RunHeader]:
    header = _header(run_id, values, tier)
    return header, header


def _snapshot_row(run_id: str, values: Sequence[Any], tier: str) -> tuple[RunHeader, StoredSnapshot]:
    """A run's header and snapshot from the values of ``_fields`` for ``_SNAPSHOT_FIELDS``.

    Raises:
        CodecError: the header is malformed, or the error is not UTF-8.
    """
    header = _header(run_id, values, tier)
    error = values[9]
    try:
        text = None if error is None else error.decode()
    except UnicodeDecodeError as exc:
        raise CodecError(tier, f"run {run_id!r}: stored error is not UTF-8: {exc}") from exc
    return header, StoredSnapshot(header, text, values[10])


def _stored(run_id: str, reply: list[bytes | None] | Exception, tier: str) -> StoredSnapshot | None:
    """The snapshot in a reply to ``HMGET`` of ``_SNAPSHOT_FIELDS``; None when the run is not stored.

    Raises:
        CodecError: the row is malformed.
    """
    values = _fields(run_id, reply, _SNAPSHOT_FIELDS, tier)
    return None if values is None else _snapshot_row(run_id, values, tier)[1]


def _extras(flat: Sequence[Any]) -> tuple[dict[str, str], dict[str, int]]:
    """``SaveResult.rejected`` and ``conflicts`` from the save script's reply after its three counts.

    Empty, or the number of rejected runs, then (run id, reason) pairs, then
    (run id, stored version) pairs (integers, checked in the script).
    """
    if not flat:
        return {}, {}
    end = 1 + 2 * int(flat[0])
    refused, above = flat[1:end], flat[end:]
    rejected = {run_id.decode(): why.decode() for run_id, why in zip(refused[::2], refused[1::2], strict=True)}
    return rejected, {run_id.decode(): int(held) for run_id, held in zip(above[::2], above[1::2], strict=True)}


_JSON: Final = msgspec.json.Encoder()


def _transitions_json(part: Sequence[Transition]) -> str:
    """The transitions as one JSON array, for the save script.

    msgspec writes enums as their values and is ~10x faster than
    ``json.dumps`` here (measured: 3,000 transitions, 2.4 ms -> 0.2 ms).

    Raises:
        ValueError: a time is NaN or infinite (msgspec would write ``null``),
            or a text does not encode (a lone surrogate).
    """
    text = _JSON.encode(part)
    if b",null," in text and any(t.at != t.at or t.at in (math.inf, -math.inf) for t in part):
        raise ValueError("a transition's time is not a finite number")
    return text.decode()


def _header_args(s: StoredSnapshot) -> tuple[str, ...]:
    h = s.header
    return (
        h.run_id,
        h.workflow,
        str(h.workflow_version),
        str(h.version),
        str(h.step),
        h.status,
        repr(float(h.updated_at)),
        str(h.attempt),
        str(h.epoch),
        s.error or "",
    )


_SHA: Final = {script: hashlib.sha1(script.encode(), usedforsecurity=False).hexdigest() for script in _SCRIPTS}


class _Call(NamedTuple):
    """One command of a pipeline: a script (``script`` is its text) or, when ``script`` is None, ``args`` as a command."""

    script: str | None
    keys: Sequence[str]
    args: Sequence[str | bytes]


class _ShardSave:
    """One shard's part of a save, as it goes through the rounds of ``ValkeyStore.save``.

    ``parts`` are the shard's transitions in store calls
    (``transition_parts``); the last one goes with the snapshots.
    """

    __slots__ = ("base", "done", "epoch", "heads", "parts", "shard", "snapshots")

    def __init__(self, shard: int, base: str, epoch: str, snapshots: list[StoredSnapshot]) -> None:
        self.shard = shard
        self.base = base
        self.epoch = epoch
        self.snapshots = snapshots
        self.heads = "[]"  # the snapshots' heads, as JSON
        self.parts: list[tuple[Sequence[Transition], str]] = []
        self.done = False

    def split(self, transitions: Sequence[Transition], rejected: dict[str, str]) -> None:
        """Encode the heads and ``parts``; a run that has no JSON (a NaN time, a lone surrogate) is rejected first.

        Raises:
            ValueError: the batch has no JSON and no run is to blame.
        """
        try:
            self._encode(transitions)
            return
        except ValueError:
            found = unwritable(self.snapshots, transitions)
            if not found:
                raise
        self.leave_out(found, rejected, transitions)

    def _encode(self, transitions: Sequence[Transition]) -> None:
        self.heads = _JSON.encode([_header_args(s) for s in self.snapshots]).decode()
        self.parts = transition_parts(transitions, _transitions_json, CALL_TRANSITIONS)

    def leave_out(
        self, found: Mapping[str, str], rejected: dict[str, str], transitions: Sequence[Transition] | None = None
    ) -> None:
        """Leave the runs ``found`` out of what this shard has still to write (and name them in ``rejected``)."""
        rejected.update(found)
        self.snapshots, rest = without(found, self.snapshots, self.left() if transitions is None else transitions)
        self._encode(rest)

    def left(self) -> list[Transition]:
        """The transitions still to write."""
        return [t for part, _ in self.parts for t in part]

    @property
    def final(self) -> bool:
        """Whether the next call is the last one: the snapshots with the last transitions."""
        return len(self.parts) <= 1

    def part(self) -> tuple[Sequence[Transition], str]:
        """The next transitions to write, and their JSON."""
        return self.parts[0] if self.parts else ((), "[]")


class _ShardMarks:
    """A writer's marks on a Cluster, one per shard (``P:{s}:mark:<writer>``): each one's floor, and when it was written.

    ``WriterMark.floor``'s rule, shard by shard: a shard's mark lives in the
    shard's slot and is advanced by the shard's own save script, so it shares
    the fate of the shard's rows through a failover or a slot migration.
    """

    __slots__ = ("at", "floors")

    def __init__(self, shards: int) -> None:
        self.floors = [0] * shards
        self.at = [0.0] * shards  # time.monotonic() of the last write that returned

    def stored(self, shard: int, seq: int, now: float) -> None:
        if seq > self.floors[shard]:
            self.floors[shard] = seq
        self.at[shard] = now

    def due(self, now: float) -> list[int]:
        """The shards whose mark was last written ``MARK_TTL / 2`` ago or more."""
        return [s for s, at in enumerate(self.at) if now - at >= MARK_TTL / 2]


class _Tally:
    """What the calls of one save have done so far (``SaveResult``'s fields)."""

    __slots__ = ("conflicts", "fenced", "rejected", "reset", "stale", "transitions", "written")

    def __init__(self, rejected: dict[str, str]) -> None:
        self.written = self.stale = self.transitions = 0
        self.reset = False
        self.rejected = rejected
        self.conflicts: dict[str, int] = {}
        self.fenced: dict[int, int] = {}

    def result(self) -> SaveResult:
        return SaveResult(
            written=self.written,
            stale=self.stale,
            transitions=self.transitions,
            reset=self.reset,
            conflicts=self.conflicts,
            rejected=self.rejected,
            fenced=self.fenced,
        )


def _rows(plan: _ShardSave, last: bool) -> int:
    """Rows of a shard's next call: its transitions, and its snapshots when it is the last."""
    return len(plan.part()[0]) + (len(plan.snapshots) if last else 0)


def _by_shard(
    snapshots: Sequence[StoredSnapshot], transitions: Sequence[Transition], shards: int
) -> dict[int, tuple[list[StoredSnapshot], list[Transition]]]:
    """The batch split by shard, in the order given (one ``shard_of`` per run)."""
    of: dict[str, int] = {}
    groups: dict[int, tuple[list[StoredSnapshot], list[Transition]]] = {}

    def group_of(rid: str) -> tuple[list[StoredSnapshot], list[Transition]]:
        n = of.get(rid)
        if n is None:
            n = of[rid] = shard_of(rid, shards)
        group = groups.get(n)
        if group is None:
            group = groups[n] = ([], [])
        return group

    for s in snapshots:
        group_of(s.header.run_id)[0].append(s)
    for t in transitions:
        group_of(t.run_id)[1].append(t)
    return groups


def _merge(got: Sequence[Sequence[bytes]], count: int) -> tuple[list[tuple[bytes, int]], bytes | None]:
    """The members read so far from each index set, merged (each with its set's position), and the ``count``-th.

    A member in several sets is kept once, with the first set's position.
    """
    seen: dict[bytes, int] = {}
    for i, members in enumerate(got):
        for m in members:
            seen.setdefault(m, i)
    merged = sorted(seen.items())
    return merged, (merged[count - 1][0] if len(merged) >= count else None)


def _first_read(count: int, sets: int) -> int:
    """How many members to ask each of ``sets`` index sets for, to find ``count`` in one round trip mostly.

    Run ids spread evenly over shards: a set holds about ``count / sets`` of
    the next ``count``; three standard deviations more (Poisson) leave a
    second round trip to about one page in ten at 128 shards.
    """
    if sets == 1:
        return count
    share = count / sets
    return math.ceil(share + 3 * math.sqrt(share)) + 1


def refusal(tier: str, action: str, exc: vex.ResponseError) -> PersistenceError:
    """The error for a reply the server refused: ``StoreUnavailableError`` when a retry may help."""
    text = str(exc)
    if (
        text.startswith(_TRANSIENT_REPLIES)
        or isinstance(exc, vex.ReadOnlyError | vex.OutOfMemoryError | _TRANSIENT_CLUSTER)
        or "during rehashing of the slot" in text  # a script's undeclared key mid-migration (§4.9)
    ):
        return StoreUnavailableError(tier, f"{action}: {exc}")
    return PersistenceError(tier, f"{action}: {exc}")


@contextlib.asynccontextmanager
async def errors(tier: str, action: str) -> AsyncIterator[None]:
    """Turn the client's errors into hotstate's: unreachable, timed out or busy -> ``StoreUnavailableError``.

    Raises:
        StoreUnavailableError: the server is unreachable, or refused for a reason a retry may fix
            (among them a Valkey Cluster failing over or moving a slot).
        PersistenceError: it refused for another reason.
    """
    try:
        yield
    except (vex.ConnectionError, vex.TimeoutError, vex.ClusterError, OSError) as exc:
        # ClusterError: a Cluster client's redirections ran out (TTL exhausted) mid-failover.
        raise StoreUnavailableError(tier, f"{action}: {exc}") from exc
    except vex.ResponseError as exc:
        raise refusal(tier, action, exc) from exc
    except vex.ValkeyClusterException as exc:  # raised by the Cluster client itself, not by a server
        if isinstance(exc, vex.SlotNotCoveredError) or any(t in str(exc) for t in _TRANSIENT_CLUSTER_TEXT):
            raise StoreUnavailableError(tier, f"{action}: {exc}") from exc
        raise PersistenceError(tier, f"{action}: {exc}") from exc


async def read_layout(
    client: Client, prefix: str, *, shards: int | None, record: bool, tier: str, field: str
) -> tuple[int, bool]:
    """The shard count ``P:meta`` records, and whether the server is a Cluster node (one slot a script).

    With ``record``, a prefix that has no ``P:meta`` gets one (``shards``, or
    ``DEFAULT_SHARDS``, and layout 2). Shared by ``ValkeyStore`` and ``ValkeyAuthority``, which keep one prefix's shards together.

    Raises:
        ConfigError: ``P:meta`` records another count than ``shards`` (``field`` names the option).
        PersistenceError: the prefix holds layout-1 keys, or ``P:meta`` is not one this release wrote.
        valkey.exceptions.ValkeyError: the server failed (the caller maps it, ``errors``).
    """
    meta_key = f"{prefix}:meta"
    cluster = isinstance(client, ValkeyCluster)
    async with client.pipeline(transaction=False) as pipe:
        if not cluster:  # a Cluster client refuses INFO in a pipeline (it has no key to route by)
            pipe.info("cluster")
        pipe.hgetall(meta_key)
        for name in _LAYOUT_1_KEYS:
            pipe.exists(f"{prefix}:{name}")
        replies = await pipe.execute(raise_on_error=False)
    await _raise_lost(client, replies)
    info, meta, *old = [{"cluster_enabled": 1}, *replies] if cluster else replies
    _raise_first((meta, *old))
    # INFO refused (renamed, or an ACL): one slot per script, right on any server.
    slot_per_script = isinstance(info, vex.ResponseError) or bool(info.get("cluster_enabled"))
    if not meta:
        found = [f"{prefix}:{name}" for name, n in zip(_LAYOUT_1_KEYS, old, strict=True) if n]
        if found:
            raise PersistenceError(
                tier,
                f"prefix {prefix!r} holds keys of layout 1 ({', '.join(found)}) and no {meta_key}: "
                f"this release reads key layout {LAYOUT} only (keys grouped by shard) and does not migrate "
                "(hotstate is pre-1.0); read that data with the release that wrote it, or use another prefix",
            )
        wanted = DEFAULT_SHARDS if shards is None else shards
        if not record:
            return wanted, slot_per_script
        meta = await _record_meta(client, meta_key, wanted)
    layout, recorded_text = meta.get(b"layout"), meta.get(b"shards")
    if layout != str(LAYOUT).encode():
        raise PersistenceError(
            tier, f"{meta_key} records key layout {layout!r}; this release reads layout {LAYOUT} only"
        )
    try:
        recorded = check_shards(f"{meta_key} shards", _strict_int((recorded_text or b"").decode()))
    except (ValueError, ConfigError) as exc:
        raise PersistenceError(tier, f"{meta_key} records no shard count it can use: {exc}") from exc
    if shards is not None and shards != recorded:
        raise ConfigError(
            field,
            shards,
            f"prefix {prefix!r} holds runs under {recorded} shards ({meta_key}); open it with shards={recorded} or shards=None",
        )
    return recorded, slot_per_script


async def _raise_lost(client: Client, replies: Sequence[Any]) -> None:
    """Raise a lost connection among a Cluster pipeline's replies, after making the client read the slot map again.

    valkey-py's Cluster pipeline returns a connection lost while reading
    replies as a reply, and, unlike its single commands, does not refresh
    its slot map then: without the reset here, every call after a failover
    would go to the dead primary once more before the client noticed.

    Raises:
        valkey.exceptions.ValkeyError: the lost connection (the caller maps it, ``errors``).
    """
    for reply in replies:
        if isinstance(reply, Exception) and not isinstance(reply, vex.ResponseError):
            if isinstance(client, ValkeyCluster) and isinstance(reply, vex.ConnectionError | vex.TimeoutError):
                await client._reset_for_reinitialize()  # private in valkey-py 6.2: what its single commands call
            raise reply


def _raise_first(replies: Sequence[Any]) -> None:
    """Raise the first error among a pipeline's replies (a Cluster pipeline returns a lost connection as one).

    Raises:
        Exception: that error (the caller maps it, ``errors``).
    """
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply


async def _record_meta(client: Client, meta_key: str, shards: int) -> dict[bytes, bytes]:
    """Record ``P:meta`` unless it is there (``_META_LUA``); what it holds then."""
    flat = await cast("Awaitable[list[bytes]]", client.eval(_META_LUA, 1, meta_key, str(shards), str(LAYOUT)))
    return dict(zip(flat[::2], flat[1::2], strict=True))


async def cluster_enabled(client: Client) -> bool:
    """Whether the server is a Valkey Cluster node (``INFO cluster``); a refused ``INFO`` reads as no.

    Raises:
        valkey.exceptions.ValkeyError: the server failed (the caller maps it, ``errors``).
    """
    if isinstance(client, ValkeyCluster):
        return True
    try:
        info = await client.info("cluster")
    except vex.ResponseError:  # renamed or forbidden by an ACL
        return False
    return bool(info.get("cluster_enabled"))


@final
class ValkeyStore(StoreBase):
    """A Store in a Valkey (or Redis-compatible) server.

    Uses ``valkey.asyncio``, which parses replies with the C ``libvalkey``
    parser when it is installed (the ``valkey[libvalkey]`` extra; see
    ``ValkeyStore.fast_parser``).

    Keys are grouped by shard (one hash tag each), so the layout suits a
    Valkey Cluster: on a Cluster node the store reaches every node through a
    ``ValkeyCluster`` client (module docstring: marks per shard, what a
    failover can lose). A save is atomic per shard, not as a whole: another
    client may see one shard's part of a batch before another's (they may go
    in different scripts, on different nodes).

    Args:
        url: the server, e.g. ``valkey://127.0.0.1:6379/0`` (``valkeys://`` for
            TLS, ``unix://`` for a socket); for a Valkey Cluster, any node's.
        prefix: the key prefix; several stores can share a server with
            different prefixes.
        tier: the tier's name.
        client: an existing client to use instead of ``url``: a
            ``valkey.asyncio.Valkey``, or a ``valkey.asyncio.cluster.ValkeyCluster``
            for a Cluster of several primaries. It must not decode responses;
            the store does not close it.
        socket_timeout: seconds to wait on connect and on each reply.
        read_only: never write (for inspection tools): ``open`` writes no
            mark and no ``P:meta``, and every write raises ``PersistenceError``.
        shards: the shard count. None: the count recorded under the prefix,
            or ``DEFAULT_SHARDS`` when none is (then recorded at ``open``).

    Raises:
        ConfigError: ``shards`` is not an int from 1 to ``MAX_SHARDS``.
    """

    fast_parser: Final[bool] = LIBVALKEY_AVAILABLE
    """True when valkey-py found ``libvalkey`` (>= 4) and uses its C reply parser."""

    def __init__(
        self,
        url: str = "valkey://127.0.0.1:6379/0",
        *,
        prefix: str = "hs",
        tier: str = "valkey",
        client: Client | None = None,
        socket_timeout: float = 5.0,
        read_only: bool = False,
        shards: int | None = None,
    ) -> None:
        self._shards_given = None if shards is None else check_shards("ValkeyStore.shards", shards)
        self.shards = DEFAULT_SHARDS if shards is None else shards
        self.tier = tier
        self.read_only = read_only
        self.url = url
        self.prefix = prefix
        self.socket_timeout = socket_timeout
        self._client = client
        self._owns_client = client is None
        self._mark = WriterMark()
        self._bases: list[str] = []  # "P:{s}:" per shard, set at open
        # One slot a script (a Cluster node), set at open; tests set it to run that path on a standalone server.
        self._slot_per_script = True
        # A Valkey Cluster client (set at open): a mark per shard (_ShardMarks), scripts loaded on every primary.
        self._cluster = isinstance(client, ValkeyCluster)
        self._marks = _ShardMarks(0)

    def __repr__(self) -> str:
        return f"ValkeyStore({self.url!r}, prefix={self.prefix!r}, tier={self.tier!r})"

    def shard_key(self, shard: int, *parts: str) -> str:
        """The name of a key of ``shard``: ``shard_key(3, "status", "done")`` is ``P:{3}:status:done``.

        For tools and tests that read or write the store's keys directly.
        """
        return ":".join((self.prefix, f"{{{shard}}}", *parts))

    def default_authority(self, shards: int | None = None) -> ValkeyAuthority:
        """The lease authority of a runtime whose only durable tier is this store: its server, its prefix.

        One Valkey server; not safe across a failover or a restart without AOF
        (``ValkeyAuthority``). A store built on a client shares that client.
        On a Valkey Cluster there is none: ``ValkeyAuthority`` refuses to open
        there (known already for a ``ValkeyCluster`` client or an open store).

        Raises:
            ConfigError: the store is on a Valkey Cluster; pass
                ``Ownership(authority=PostgresAuthority(...))`` (several hosts)
                or ``SQLiteAuthority`` (one host).
        """
        from hotstate.persistence._valkey_authority import ValkeyAuthority, cluster_refusal

        if self._cluster or isinstance(self._client, ValkeyCluster):
            raise cluster_refusal("Ownership.authority", self.url)
        return ValkeyAuthority(
            self.url, prefix=self.prefix, shards=shards, client=None if self._owns_client else self._client
        )

    def run_key(self, run_id: str, kind: str = "run") -> str:
        """The name of ``run_id``'s key of ``kind``: ``run`` (its hash), ``hist`` (history) or ``ver`` (kept copies)."""
        return self.shard_key(shard_of(run_id, self.shards), kind, run_id)

    def _key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def _run_key(self, kind: str, run_id: str) -> str:
        return f"{self._bases[shard_of(run_id, self.shards)]}{kind}:{run_id}"

    def _errors(self, action: str) -> contextlib.AbstractAsyncContextManager[None]:
        return errors(self.tier, action)

    def _refused(self, action: str, exc: vex.ResponseError) -> PersistenceError:
        return refusal(self.tier, action, exc)

    def _w(self, action: str) -> Client:
        """The client, for a write."""
        if self.read_only:
            raise PersistenceError(self.tier, f"{action}: this store was opened read-only")
        return self._c()

    def _c(self) -> Client:
        self._check_open()
        if self._client is None:  # pragma: no cover - open() sets it
            raise HotstateInternalError("ValkeyStore is open without a client")
        return self._client

    @override
    async def open(self) -> None:
        """Connect (to a Cluster's every node on one), then read (or record) ``P:meta``; then write this writer's mark.

        A server that is a Valkey Cluster node (``INFO cluster``) is reached
        through a ``ValkeyCluster`` client built from ``url`` instead.

        Raises:
            StoreUnavailableError: the server cannot be reached.
            ConfigError: the prefix records another shard count than ``shards``,
                or ``client`` is a client of one node of a Cluster whose slots
                several primaries serve (pass a ``ValkeyCluster``).
            PersistenceError: the prefix holds keys of layout 1 (and no
                ``P:meta``), or a ``P:meta`` this release cannot read.
        """
        if self._opened:
            return
        try:
            async with self._errors(f"connect to {self.url}"):
                client = await self._connect()
            async with self._errors("read the key layout"):
                self.shards = await self._layout(client)
            self._bases = [f"{self.prefix}:{{{s}}}:" for s in range(self.shards)]
            if not self.read_only:
                await self._write_first_marks(client)
        except BaseException:
            await self._drop_client()
            raise
        self._opened = True

    async def _connect(self) -> Client:
        """The client, connected: a ``ValkeyCluster`` on a Cluster node when the store builds its own.

        Raises:
            ConfigError: the caller's client reaches one node of a Cluster of several primaries.
            valkey.exceptions.ValkeyError: the server failed (the caller maps it).
        """
        options: dict[str, Any] = {
            "socket_timeout": self.socket_timeout,
            "socket_connect_timeout": self.socket_timeout,
            "decode_responses": False,
        }
        if self._client is None:
            self._client = avalkey.Valkey.from_url(self.url, **options)
        client = self._client
        await client.ping()
        if isinstance(client, ValkeyCluster) or not await cluster_enabled(client):
            self._cluster = isinstance(client, ValkeyCluster)
            return client
        if not self._owns_client:
            info: dict[str, str] = await client.execute_command("CLUSTER INFO")
            size = info.get("cluster_size", "1")
            if size != "1":
                raise ConfigError(
                    "ValkeyStore.client",
                    client,
                    f"its server is one node of a Valkey Cluster of {size} primaries: "
                    "pass a valkey.asyncio.cluster.ValkeyCluster client, or url= alone",
                )
            return client  # a Cluster of one node: every key is on it
        await client.aclose()
        # Every node's URL reaches the whole Cluster: the client reads the slot map from it.
        self._client = cluster = ValkeyCluster.from_url(self.url, **options)
        self._cluster = True
        await cluster.initialize()
        return cluster

    async def _write_first_marks(self, client: Client) -> None:
        """Load the scripts and write this writer's mark: one key, or on a Cluster one in every shard.

        The mark from open on, not from the first save: versions read before
        that save (recovery) are claimed too. On one server the scripts are
        loaded in the same round trip, so the first save finds them.
        """
        self._mark = mark = WriterMark()
        _, seq = mark.next()
        value = f"{seq}:0"
        if self._cluster:
            await self._load_scripts(client)
            self._marks = marks = _ShardMarks(self.shards)
            async with self._errors("write this writer's marks"), client.pipeline(transaction=False) as pipe:
                for base in self._bases:
                    pipe.set(f"{base}mark:{mark.writer}", value, ex=int(MARK_TTL))
                replies = await pipe.execute(raise_on_error=False)
                await _raise_lost(client, replies)
                _raise_first(replies)
            now = time.monotonic()
            for shard in range(self.shards):
                marks.stored(shard, seq, now)
            return
        async with self._errors("write this writer's mark"), client.pipeline(transaction=False) as pipe:
            for script in _SCRIPTS:
                pipe.script_load(script)
            pipe.set(self._key("mark", mark.writer), value, ex=int(MARK_TTL))
            await pipe.execute()
        mark.stored(seq)

    async def _layout(self, client: Client) -> int:
        shards, self._slot_per_script = await read_layout(
            client,
            self.prefix,
            shards=self._shards_given,
            record=not self.read_only,
            tier=self.tier,
            field="ValkeyStore.shards",
        )
        return shards

    async def _drop_client(self) -> None:
        client, self._client = self._client, None
        if client is not None and self._owns_client:
            await client.aclose()

    @override
    async def aclose(self) -> None:
        """Delete this writer's mark or marks (a second at most; else they expire), then close the client."""
        was_open, self._opened = self._opened, False
        try:
            if was_open and not self.read_only and self._client is not None:
                with (
                    anyio.move_on_after(min(1.0, self.socket_timeout)),
                    contextlib.suppress(vex.ValkeyError, vex.ValkeyClusterException, OSError),
                ):
                    await self._delete_marks(self._client)
        finally:
            await self._drop_client()

    async def _delete_marks(self, client: Client) -> None:
        writer = self._mark.writer
        if not self._cluster:
            await client.delete(self._key("mark", writer))
            return
        async with client.pipeline(transaction=False) as pipe:
            for base in self._bases:
                pipe.delete(f"{base}mark:{writer}")
            await pipe.execute(raise_on_error=False)

    # ------------------------------------------------------------------ scripts

    async def _send(self, client: Client, calls: Sequence[_Call], action: str) -> list[Any]:
        """Run ``calls`` pipelined in one round trip; a reply the server refused is returned in its place.

        On a Cluster the client sends each node its calls in one round trip
        (all nodes at once), in order, and follows ``MOVED`` and ``ASK``
        itself; a node it could not reach fails the whole call.

        Raises:
            StoreUnavailableError: the server, or a node of the Cluster, is unreachable.
        """
        async with self._errors(action), client.pipeline(transaction=False) as pipe:
            for call in calls:
                if call.script is None:
                    pipe.execute_command(*call.args)
                else:
                    # As a raw command: valkey-py's Cluster pipeline blocks its evalsha()
                    # method, but routes a raw EVALSHA by its keys (one slot a script here).
                    pipe.execute_command("EVALSHA", _SHA[call.script], len(call.keys), *call.keys, *call.args)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
            await _raise_lost(client, replies)
        return replies

    async def _load_scripts(self, client: Client) -> None:
        """Load every script (a server restarted, or its script cache flushed, has none); on a Cluster on every primary.

        A replica promoted by a failover has no scripts (the cache is not
        replicated): the first call there replies ``NOSCRIPT`` and comes here.
        """
        async with self._errors("load scripts"):
            if isinstance(client, ValkeyCluster):
                cluster = client

                async def load(script: str) -> None:
                    await cluster.script_load(script)

                async with anyio.create_task_group() as tg:
                    for script in _SCRIPTS:
                        tg.start_soon(load, script)
                return
            async with client.pipeline(transaction=False) as pipe:
                for script in _SCRIPTS:
                    pipe.script_load(script)
                await pipe.execute()

    async def _scripted(self, client: Client, calls: Sequence[_Call], action: str) -> list[Any]:
        """``_send``, then once more for the calls the server had no script for; a refusal raises.

        Raises:
            StoreUnavailableError: the server is unreachable or refused for a
                reason a retry may fix.
            PersistenceError: it refused for another reason.
        """
        replies = await self._send(client, calls, action)
        missing = [i for i, reply in enumerate(replies) if isinstance(reply, vex.NoScriptError)]
        if missing:
            await self._load_scripts(client)
            again = await self._send(client, [calls[i] for i in missing], action)
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
        for reply in replies:
            if isinstance(reply, vex.ResponseError):
                raise self._refused(action, reply) from reply
        return replies

    # --------------------------------------------------------------------- save

    @override
    async def save(
        self, snapshots: Sequence[StoredSnapshot], transitions: Sequence[Transition], *, fence: Fence | None = None
    ) -> SaveResult:
        """Write the batch in Lua scripts (each shard's part in one), pipelined with this writer's mark in one round trip.

        Each shard's part checks (and raises) the shard's fence when the save
        is fenced, then applies the ``(epoch, version)`` guard and the index
        changes. A shard the fence does not name is fenced without a script
        (its fence is read in the same round trip). The mark
        (``P:mark:{writer}``, refreshed to the ``MARK_TTL`` expiry) is checked
        and advanced by a script of its own, sent after the rows' scripts in
        the same pipeline: commands of one connection apply in order, and an
        RDB, AOF or replica of the server is a prefix of that order, so a
        server that kept the mark kept every row written before it. A server
        restarted empty or from a file older than this writer's last save is
        noticed there, by every writer sharing the prefix; ``P:meta`` is then
        written again. An empty batch is one round trip too: a probe of the
        mark. On a Valkey Cluster each shard has its own mark, advanced inside
        the shard's script: a node that lost writes (a failover to a lagging
        replica) is noticed shard by shard, by the next save of each shard
        (a probe checks them all); see the module docstring.

        Each part checks, before it writes anything, every key a run would
        write and the run's numbers; a run with a key of another type (say a
        list planted at its hash or history) or a number out of range is left
        out and named in ``SaveResult.rejected``, and so is a run whose text
        does not encode (a lone surrogate) or whose time is NaN, found while
        the batch is encoded. A shard with a long history goes in several
        scripts (``CALL_TRANSITIONS``) over several round trips: the first
        transitions first, the last with the snapshots and the mark; a run
        an earlier part rejected is left out of the later ones.
        """
        client = self._w("save")
        tally = _Tally({})
        owner = "" if fence is None else fence.owner
        plans: list[_ShardSave] = []
        unowned: list[int] = []
        for shard, (snaps, trans) in _by_shard(snapshots, transitions, self.shards).items():
            epoch = None if fence is None else fence.epochs.get(shard)
            if fence is not None and epoch is None:
                unowned.append(shard)  # fenced whatever the store holds: this writer holds no epoch there
                continue
            plan = _ShardSave(shard, self._bases[shard], "" if epoch is None else str(epoch), snaps)
            plan.split(trans, tally.rejected)
            plans.append(plan)
        if self._cluster:
            await self._cluster_rounds(client, plans, unowned, owner, tally)
        else:
            await self._rounds(client, plans, unowned, owner, tally)
        if tally.reset:
            await self._record_layout(client)
        return tally.result()

    async def _rounds(
        self, client: Client, plans: list[_ShardSave], unowned: list[int], owner: str, tally: _Tally
    ) -> None:
        """Send the shards' calls round by round (one round trip each) until all are written, the mark last.

        A round holds each unfinished shard's next part, and the mark when it
        holds a shard's last part (or nothing else is left): so the mark
        that returns last was applied after every row of the save.
        """
        mark = self._mark
        marked = 0  # the seq of the last mark applied after every row written so far (0: none yet)
        reloads = 0
        while True:
            active = [plan for plan in plans if not plan.done]
            groups = self._groups(active)
            calls = [self._save_call(group, owner) for group in groups]
            calls.extend(_Call(None, (), ("HGET", self._bases[s] + "fence", "epoch")) for s in unowned)
            seq = 0
            if any(plan.final for plan in active) or not (active or marked):
                floor, seq = mark.next()
                calls.append(_Call(_MARK_LUA, (self._key("mark", mark.writer),), (str(floor), str(seq))))
            if not calls:
                break
            rows = [sum(_rows(plan, last) for plan, last in group) for group in groups]
            replies = await self._trips(client, calls, rows)
            if any(isinstance(r, vex.NoScriptError) for r in replies):
                reloads += 1
                if reloads > 2:  # pragma: no cover - the server drops scripts as fast as they are loaded
                    raise PersistenceError(self.tier, "save: the server keeps losing its scripts")
                await self._load_scripts(client)
            retried = False
            for group, reply in zip(groups, replies, strict=False):
                retried |= self._took(group, reply, tally)
            for shard, reply in zip(unowned, replies[len(groups) :], strict=False):
                tally.fenced[shard] = self._fence_epoch(shard, reply)
            unowned = []
            if seq:
                reply = replies[-1]
                if isinstance(reply, vex.NoScriptError) or retried:
                    marked = 0  # rows of this round go again: the mark goes again after them
                elif isinstance(reply, vex.ResponseError):
                    raise self._refused("save", reply) from reply
                else:
                    tally.reset = tally.reset or bool(reply)
                    marked = seq
            if marked and all(plan.done for plan in plans):
                break
        mark.stored(marked)

    async def _cluster_rounds(
        self, client: Client, plans: list[_ShardSave], unowned: list[int], owner: str, tally: _Tally
    ) -> None:
        """``_rounds`` on a Cluster: each shard's script checks and advances the shard's own mark, atomically with its rows.

        A batch with no shard to write (a probe) checks every shard's mark
        instead, and a save also refreshes the marks of the shards it does not
        write whose mark was last written ``MARK_TTL / 2`` ago or more, so
        that no mark of a live writer expires. Calls go to all nodes at once.
        """
        marks, writer = self._marks, self._mark.writer
        planned = {plan.shard for plan in plans}
        extra = list(range(self.shards)) if not plans else [s for s in marks.due(time.monotonic()) if s not in planned]
        reloads = 0
        while True:
            active = [plan for plan in plans if not plan.done]
            if not (active or unowned or extra):
                return
            _, seq = self._mark.next()
            groups = self._groups(active)  # one shard each
            calls = [self._save_call(group, owner, (writer, marks.floors[group[0][0].shard], seq)) for group in groups]
            calls += [_Call(None, (), ("HGET", self._bases[s] + "fence", "epoch")) for s in unowned]
            calls += [
                _Call(_MARK_LUA, (f"{self._bases[s]}mark:{writer}",), (str(marks.floors[s]), str(seq))) for s in extra
            ]
            replies = await self._trips(client, calls, [sum(_rows(plan, last) for plan, last in g) for g in groups])
            if any(isinstance(r, vex.NoScriptError) for r in replies):
                reloads += 1
                if reloads > 2:  # pragma: no cover - the server drops scripts as fast as they are loaded
                    raise PersistenceError(self.tier, "save: the server keeps losing its scripts")
                await self._load_scripts(client)
            now = time.monotonic()
            for group, reply in zip(groups, replies, strict=False):
                if isinstance(reply, list):
                    tally.reset |= bool(reply.pop())  # the shard's mark: it lost writes
                    marks.stored(group[0][0].shard, seq, now)
                self._took(group, reply, tally)
            n = len(groups) + len(unowned)
            for shard, reply in zip(unowned, replies[len(groups) : n], strict=True):
                tally.fenced[shard] = self._fence_epoch(shard, reply)
            unowned = []
            extra = self._took_marks(extra, replies[n:], seq, tally, now)

    def _took_marks(
        self, shards: Sequence[int], replies: Sequence[Any], seq: int, tally: _Tally, now: float
    ) -> list[int]:
        """Count the replies of ``_MARK_LUA`` on ``shards`` in ``tally``; the shards whose script was missing.

        Raises:
            StoreUnavailableError: the server refused for a reason a retry may fix.
            PersistenceError: it refused for another reason.
        """
        left = []
        for shard, reply in zip(shards, replies, strict=True):
            if isinstance(reply, vex.NoScriptError):
                left.append(shard)
            elif isinstance(reply, vex.ResponseError):
                raise self._refused("save", reply) from reply
            else:
                tally.reset |= bool(reply)
                self._marks.stored(shard, seq, now)
        return left

    async def _trips(self, client: Client, calls: Sequence[_Call], rows: Sequence[int]) -> list[Any]:
        """``_send`` of ``calls`` in round trips of up to ``TRIP_ROWS`` rows (``rows``: each call's; the rest 0).

        Most flushes are one round trip. Each round trip waits for the one
        before, so the calls still apply in order (the mark last).
        """
        replies: list[Any] = []
        start = total = 0
        for i, n in enumerate(rows):
            if total and total + n > TRIP_ROWS:
                replies += await self._send(client, calls[start:i], "save")
                start, total = i, 0
            total += n
        replies += await self._send(client, calls[start:], "save")
        return replies

    def _groups(self, plans: Sequence[_ShardSave]) -> list[list[tuple[_ShardSave, bool]]]:
        """The shards of a round by script, each with whether its part is its last.

        On a standalone server a script holds shards until their snapshots
        and transitions reach ``SCRIPT_ROWS`` (or their transitions
        ``CALL_BYTES``); on a Cluster node it holds one shard.
        """
        groups: list[list[tuple[_ShardSave, bool]]] = []
        rows = size = 0
        for plan in plans:
            last = plan.final
            text = plan.part()[1]
            n = _rows(plan, last)
            if groups and not self._slot_per_script and rows + n <= SCRIPT_ROWS and size + len(text) <= CALL_BYTES:
                groups[-1].append((plan, last))
                rows, size = rows + n, size + len(text)
            else:
                groups.append([(plan, last)])
                rows, size = n, len(text)
        return groups

    def _save_call(
        self, group: Sequence[tuple[_ShardSave, bool]], owner: str, mark: tuple[str, int, int] | None = None
    ) -> _Call:
        """The save script for ``group``'s next parts (see ``_SAVE_LUA`` for its arguments).

        ``mark`` (a Cluster's, one shard a script): the writer, the shard's
        floor and this round's seq, for the shard's mark checked in the script.
        """
        keys = [plan.base + "fence" for plan, _ in group]
        if mark is None:
            shards = _JSON.encode([(plan.shard, plan.epoch) for plan, _ in group]).decode()
        else:
            (plan, _), (writer, floor, seq) = group[0], mark
            keys.append(f"{plan.base}mark:{writer}")
            shards = _JSON.encode([(plan.shard, plan.epoch, floor, seq)]).decode()
        heads = ",".join(plan.heads if last else "[]" for plan, last in group)
        texts = ",".join(plan.part()[1] for plan, _ in group)
        args: list[str | bytes] = [self.prefix, owner, shards, f"[{heads}]", f"[{texts}]"]
        for plan, last in group:
            if last:
                args.extend(bytes(s.body) for s in plan.snapshots)
        return _Call(_SAVE_LUA, keys, args)

    def _took(self, group: Sequence[tuple[_ShardSave, bool]], reply: Any, tally: _Tally) -> bool:
        """Count one save script's reply in ``tally``; True when some of its shards go again.

        Raises:
            StoreUnavailableError: the server refused for a reason a retry may fix.
            PersistenceError: it refused for another reason, not one run's.
        """
        if isinstance(reply, vex.NoScriptError):
            return True
        if not isinstance(reply, vex.ResponseError):
            for (plan, last), one in zip(group, reply, strict=True):
                self._took_shard(plan, last, one, tally)
            return False
        error = self._refused("save", reply)
        if isinstance(error, StoreUnavailableError):
            raise error from reply
        # cjson refuses a whole script for text that does not encode: find those runs, send the rest again.
        found = False
        for plan, _ in group:
            runs = {
                rid: why for rid, why in unwritable(plan.snapshots, plan.left()).items() if rid not in tally.rejected
            }
            if runs:
                plan.leave_out(runs, tally.rejected)
                found = True
        if not found:
            raise error from reply
        return True

    def _took_shard(self, plan: _ShardSave, last: bool, reply: Any, tally: _Tally) -> None:
        """Count one shard's part of a save script's reply in ``tally``.

        Raises:
            PersistenceError: the shard's fence key is not a hash, or holds an epoch that is not an integer.
        """
        if isinstance(reply, vex.ResponseError):
            raise self._refused("save", reply) from reply
        if reply[0] == -1:  # fenced: nothing of this shard was written
            tally.fenced[plan.shard] = _strict_int(_text(reply[1]))
            plan.done = True
            return
        refused, conflicts = _extras(reply[3:])
        tally.transitions += int(reply[2])
        if not last:
            plan.parts.pop(0)
            if refused:  # a run a script rejected is left out of the later ones
                plan.leave_out(refused, tally.rejected)
            return
        tally.written += int(reply[0])
        tally.stale += int(reply[1])
        tally.rejected.update(refused)
        tally.conflicts.update(conflicts)
        plan.done = True

    def _fence_epoch(self, shard: int, reply: Any, action: str = "save") -> int:
        """The epoch of ``shard``'s fence from a reply to ``HGET`` (0: no fence).

        Raises:
            PersistenceError: the fence key is not a hash, or its epoch is not an integer.
        """
        if isinstance(reply, vex.ResponseError):
            raise self._refused(f"{action}: read the fence of shard {shard}", reply) from reply
        if reply is None:
            return 0
        try:
            return _strict_int(_text(reply))
        except (ValueError, UnicodeDecodeError) as exc:
            raise PersistenceError(
                self.tier, f"{action}: {self.shard_key(shard, 'fence')} holds a malformed epoch"
            ) from exc

    async def _record_layout(self, client: Client) -> None:
        """Write ``P:meta`` again after a reset (a server that lost writes may have lost it too)."""
        async with self._errors("record the key layout"):
            await _record_meta(client, self._key("meta"), self.shards)

    @override
    async def seal(self, fence: Fence) -> dict[int, int]:
        """One script per shard on ``P:{s}:fence``, pipelined in one round trip.

        Raises:
            ConfigError: ``fence.epochs`` names a shard outside ``0 .. shards - 1``.
        """
        client = self._w("seal")
        shards = sorted(fence.epochs)
        for shard in shards:
            self._check_shard(shard)
        calls = [_Call(_SEAL_LUA, (self._bases[s] + "fence",), (str(fence.epochs[s]), fence.owner)) for s in shards]
        replies = await self._scripted(client, calls, "seal")
        return {s: _strict_int(_text(reply)) for s, reply in zip(shards, replies, strict=True) if reply is not None}

    def _check_shard(self, shard: int) -> None:
        if type(shard) is not int or not 0 <= shard < self.shards:
            raise ConfigError("fence.epochs", shard, f"must be a shard from 0 to {self.shards - 1}")

    # -------------------------------------------------------------------- reads

    @override
    async def load(self, run_id: str) -> StoredSnapshot | None:
        found = await self.load_many([run_id])
        return found.get(run_id)

    async def _hmget(self, keys: Sequence[str], fields: Sequence[str]) -> list[list[bytes | None] | Exception]:
        """``HMGET`` of ``fields`` from each key, pipelined; a key of another type gives its error."""
        async with self._errors("read"), self._c().pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hmget(key, [*fields])
            replies: list[list[bytes | None] | Exception] = await pipe.execute(raise_on_error=False)
            await _raise_lost(self._c(), replies)
            for reply in replies:
                # WRONGTYPE is about one key: a malformed row. Anything else
                # (LOADING, NOAUTH, a Cluster node lost...) is about the server, and fails the read.
                if isinstance(reply, Exception) and not str(reply).startswith("WRONGTYPE"):
                    raise reply
        return replies

    @override
    async def load_many(
        self, run_ids: Sequence[str], *, bad_rows: list[BadRow] | None = None
    ) -> dict[str, StoredSnapshot]:
        self._c()
        ids = list(dict.fromkeys(run_ids))
        if not ids:
            return {}
        replies = await self._hmget([self._run_key("run", run_id) for run_id in ids], _SNAPSHOT_FIELDS)
        found = {}
        for run_id, reply in zip(ids, replies, strict=True):
            try:
                stored = _stored(run_id, reply, self.tier)
            except CodecError as exc:
                bad_row(exc, run_id, bad_rows)
                continue
            if stored is not None:
                found[run_id] = stored
        return found

    async def _index_page(self, keys: Sequence[str], after: bytes | None, count: int) -> list[tuple[bytes, int]]:
        """The next ``count`` members after ``after`` in the union of index sets, as stored (bytes), each with its set's position.

        Each round trip asks every set that may still hold one of the next
        ``count`` for its next members (``_first_read``, then twice as many
        each time), until the ``count``-th member of the union is known: a
        set whose last member read is past it holds no other one before it.
        """
        low: bytes = b"-" if after is None else b"(" + after
        lows = [low] * len(keys)
        want = [_first_read(count, len(keys))] * len(keys)  # 0: the set ran out
        got: list[list[bytes]] = [[] for _ in keys]
        todo = list(range(len(keys)))
        merged: list[tuple[bytes, int]] = []
        while todo:
            async with self._errors("scan"), self._c().pipeline(transaction=False) as pipe:
                for i in todo:
                    pipe.zrangebylex(keys[i], lows[i], b"+", start=0, num=want[i])
                replies: list[list[bytes]] = await pipe.execute()
            for i, reply in zip(todo, replies, strict=True):
                got[i].extend(reply)
                if len(reply) < want[i]:
                    want[i] = 0
                else:
                    lows[i] = b"(" + reply[-1]
                    want[i] *= 2
            merged, bound = _merge(got, count)
            todo = [i for i in range(len(keys)) if want[i] and (bound is None or got[i][-1] < bound)]
        return merged[:count]

    def _index_keys(
        self, statuses: frozenset[str] | None, workflow: str | None, shards: Collection[int] | None
    ) -> tuple[list[str], list[int]]:
        """The index sets to merge for these filters, and the shard of each."""
        chosen = range(self.shards) if shards is None else sorted({s for s in shards if 0 <= s < self.shards})
        if statuses is not None:
            names = [f"status:{s}" for s in sorted(statuses)]
        elif workflow is not None:
            names = [f"wf:{workflow}"]
        else:
            names = ["runs"]
        pairs = [(self._bases[s] + name, s) for s in chosen for name in names]
        return [key for key, _ in pairs], [s for _, s in pairs]

    async def _walk(
        self,
        status: str | Iterable[str] | None,
        workflow: str | None,
        after: str | None,
        limit: int,
        shards: Collection[int] | None,
        fields: Sequence[str],
        make: Callable[[str, Sequence[bytes | None], str], tuple[RunHeader, _T]],
        bad_rows: list[BadRow] | None,
    ) -> list[_T]:
        """Up to ``limit`` runs of the index that match the filters, by run id: ``make`` of their ``fields``.

        Each row is checked against the filters again, so an index lagging a
        concurrent write never returns a wrong row, and a run deleted since it
        was listed is left out. Malformed rows are reported in ``bad_rows`` (or
        raised). Rows left out do not count toward ``limit``: the walk reads on.
        """
        check_limit(limit)
        self._c()
        statuses = status_filter(status)
        keys, _ = self._index_keys(statuses, workflow, shards)
        found: list[_T] = []
        cursor = None if after is None else after.encode()
        while keys and len(found) < limit:
            wanted = limit - len(found)
            members = await self._index_page(keys, cursor, wanted)
            if not members:
                break
            cursor = members[-1][0]
            ids: list[str] = []
            for member, _ in members:
                try:
                    ids.append(member.decode())
                except UnicodeDecodeError:
                    error = CodecError(self.tier, f"run {member!r}: index member is not UTF-8")
                    bad_row(error, render_id(member), bad_rows)
            replies = await self._hmget([self._run_key("run", run_id) for run_id in ids], fields)
            for run_id, reply in zip(ids, replies, strict=True):
                try:
                    values = _fields(run_id, reply, fields, self.tier)
                    if values is None:
                        continue  # deleted since it was listed
                    header, item = make(run_id, values, self.tier)
                except CodecError as exc:
                    bad_row(exc, run_id, bad_rows)
                    continue
                if (statuses is None or header.status in statuses) and (
                    workflow is None or header.workflow == workflow
                ):
                    found.append(item)
            if len(members) < wanted:
                break  # every index set ran out
        return found

    @override
    async def scan(
        self,
        *,
        status: str | Iterable[str] | None = None,
        workflow: str | None = None,
        after: str | None = None,
        limit: int = 1000,
        shards: Collection[int] | None = None,
    ) -> list[RunHeader]:
        """Page through the shards' index sets merged by run id, then read those runs' header fields.

        Each header is checked against the filters again, so an index lagging
        a concurrent write never returns a wrong row.
        """
        return await self._walk(status, workflow, after, limit, shards, _HEADER_FIELDS, _header_row, None)

    @override
    async def scan_snapshots(
        self,
        *,
        status: str | Iterable[str] | None = None,
        workflow: str | None = None,
        after: str | None = None,
        limit: int = 1000,
        bad_rows: list[BadRow] | None = None,
        shards: Collection[int] | None = None,
    ) -> list[StoredSnapshot]:
        """``scan``, reading whole runs: a round trip for a page of ids (mostly one), one for their rows.

        A run deleted between the two is left out, and the page read on past it.
        """
        return await self._walk(status, workflow, after, limit, shards, _SNAPSHOT_FIELDS, _snapshot_row, bad_rows)

    @override
    async def history(self, run_id: str) -> list[Transition]:
        client = self._c()
        async with self._errors("history"):
            raw = await cast("Awaitable[dict[bytes, bytes]]", client.hgetall(self._run_key("hist", run_id)))
        try:
            ordered = sorted(raw.items(), key=lambda kv: int(kv[0]))
        except ValueError as exc:
            raise CodecError(self.tier, f"run {run_id!r}: stored history has a malformed version: {exc}") from exc
        return [transition_from_json(v, tier=self.tier) for _, v in ordered]

    # ------------------------------------------------------------- dead letters

    @override
    async def _save_dead_letters(self, records: Sequence[StoredDeadLetter], fence: Fence | None) -> dict[int, int]:
        """One script per shard (atomic there, its fence checked first), pipelined in one round trip.

        A shard the fence does not name is fenced without a script (its fence
        is read in the same round trip), as in ``save``.
        """
        if not records:
            return {}
        client = self._w("save_dead_letters")
        by_shard: dict[int, dict[str, tuple[str, bytes]]] = {}
        for record in records:
            s = record.snapshot
            meta = json.dumps(
                {
                    "run_id": record.run_id,
                    "workflow": record.workflow,
                    "at": record.at,
                    "error": record.error,
                    "attempts": record.attempts,
                    "compensation_errors": record.compensation_errors,
                    "header": dict(zip(_HEADER_FIELDS, _header_args(s), strict=False)),
                    "snapshot_error": s.error,
                }
            )
            shard = shard_of(record.run_id, self.shards)
            by_shard.setdefault(shard, {})[record.run_id] = (meta, bytes(s.body))  # the last one for a run wins
        calls: list[_Call] = []
        called: list[int] = []
        unowned: list[int] = []
        owner = "" if fence is None else fence.owner
        for shard, found in by_shard.items():
            epoch = "" if fence is None else fence.epochs.get(shard)
            if epoch is None:
                unowned.append(shard)
                continue
            base = self._bases[shard]
            args: list[str | bytes] = [str(epoch), owner]
            for run_id, (meta, body) in found.items():
                args += (run_id, meta, body)
            calls.append(_Call(_DEAD_LUA, (base + "fence", base + "dead", base + "dead:body"), args))
            called.append(shard)
        return await self._fenced_calls(client, calls, called, unowned, "save_dead_letters")

    async def _fenced_calls(
        self, client: Client, calls: list[_Call], called: Sequence[int], unowned: Sequence[int], action: str
    ) -> dict[int, int]:
        """Run the scripts of ``called`` shards (each opening with ``_FENCE_LUA``) and read the ``unowned`` fences.

        Returns:
            shard -> the stored fence's epoch, for each shard fenced (0: an unowned shard with no fence).
        """
        calls += [_Call(None, (), ("HGET", self._bases[s] + "fence", "epoch")) for s in unowned]
        replies = await self._scripted(client, calls, action)
        lost: dict[int, int] = {}
        for shard, reply in zip(called, replies, strict=False):
            if isinstance(reply, list) and reply and reply[0] == -1:
                lost[shard] = _strict_int(_text(reply[1]))
        for shard, reply in zip(unowned, replies[len(called) :], strict=True):
            lost[shard] = self._fence_epoch(shard, reply, action)
        return lost

    @override
    async def dead_letters(self, *, bad_rows: list[BadRow] | None = None) -> list[StoredDeadLetter]:
        """Every shard's two hashes, pipelined in one round trip."""
        client = self._c()
        async with self._errors("dead_letters"), client.pipeline(transaction=False) as pipe:
            for base in self._bases:
                pipe.hgetall(base + "dead")
                pipe.hgetall(base + "dead:body")
            replies: list[dict[bytes, bytes]] = await pipe.execute()
        records = []
        for metas, bodies in zip(replies[::2], replies[1::2], strict=True):
            for run_id, raw in metas.items():
                body = bodies.get(run_id)
                if body is not None:
                    try:
                        records.append(_dead_letter(raw, body, self.tier))
                    except CodecError as exc:
                        bad_row(exc, render_id(_text(run_id)), bad_rows)
        return sorted(records, key=lambda d: (d.at, d.run_id))

    @override
    async def delete_dead_letter(self, run_id: str) -> bool:
        client = self._w("delete_dead_letter")
        base = self._bases[shard_of(run_id, self.shards)]
        call = _Call(_DELETE_DEAD_LUA, (base + "dead", base + "dead:body"), (run_id,))
        (removed,) = await self._scripted(client, [call], "delete_dead_letter")
        return bool(removed)

    # ------------------------------------------------------- copies and purging

    @override
    async def delete_copy(self, run_id: str, body: bytes) -> bool:
        client = self._w("delete_copy")
        base = self._bases[shard_of(run_id, self.shards)]
        call = _Call(_DELETE_COPY_LUA, (f"{base}run:{run_id}", base + "runs"), (base, run_id, bytes(body)))
        (n,) = await self._scripted(client, [call], "delete_copy")
        return bool(n)

    @override
    async def save_versions(
        self, snapshots: Sequence[StoredSnapshot], *, fence: Fence | None = None
    ) -> dict[int, int] | None:
        """One script per shard, pipelined in one round trip: a newer owner's copy of a version replaces the first.

        With ``fence``, each script checks its shard's fence first; a shard
        the fence does not name is fenced without a script, as in ``save``.
        """
        if not snapshots:
            return None if fence is None else {}
        client = self._w("save_versions")
        owner = "" if fence is None else fence.owner
        by_shard: dict[int, tuple[list[str], list[str | bytes]]] = {}
        unowned: set[int] = set()
        for s in snapshots:
            h = s.header
            shard = shard_of(h.run_id, self.shards)
            entry = by_shard.get(shard)
            if entry is None:
                epoch = "" if fence is None else fence.epochs.get(shard)
                if epoch is None:
                    unowned.add(shard)
                    continue
                base = self._bases[shard]
                entry = by_shard[shard] = ([base + "fence"], [str(epoch), owner])
            keys, args = entry
            keys.append(f"{self._bases[shard]}ver:{h.run_id}")
            args += (str(h.version), str(h.epoch), bytes(s.body), json.dumps([*h, s.error]))
        calls = [_Call(_VERSIONS_LUA, keys, args) for keys, args in by_shard.values()]
        lost = await self._fenced_calls(client, calls, list(by_shard), sorted(unowned), "save_versions")
        return None if fence is None else lost

    @override
    async def load_version(self, run_id: str, version: int) -> StoredSnapshot | None:
        client = self._c()
        key = self._run_key("ver", run_id)
        async with self._errors("load_version"):
            fields = await cast("Awaitable[list[bytes]]", client.hkeys(key))
            # Field names are not under the check: one that is not ASCII digits is not a kept copy.
            names = (x.decode("ascii", "replace") for x in fields)
            kept = [int(f) for f in names if _INT_TEXT.fullmatch(f) and int(f) <= version]
            if not kept:
                return None
            v = str(max(kept))
            body, head = await cast("Awaitable[list[bytes | None]]", client.hmget(key, [v, v + ":h"]))
        if body is None or head is None:
            return None
        try:
            *header, error = json.loads(_text(head))
            stored = StoredSnapshot(header=RunHeader(*header), error=error, body=bytes(body))
        except (TypeError, ValueError, RecursionError) as exc:  # UnicodeDecodeError, JSONDecodeError: ValueErrors
            raise CodecError(self.tier, f"run {run_id!r}: kept copy v{v} is malformed: {exc!r}"[:300]) from exc
        problem = stored_problem(stored)
        if problem is not None:
            raise CodecError(self.tier, f"run {run_id!r}: kept copy v{v} is malformed: {problem}"[:300])
        return stored

    @override
    async def purge_finished(self, *, before: float) -> int:
        """Page through the finished statuses' index sets of every shard, merged; delete each page.

        A page's runs go with one script per shard (pipelined in one round
        trip), which checks status and time again server-side, so a run
        revived since its page was listed is kept. Each shard's part of a
        page is atomic, the whole purge is not.
        """
        client = self._w("purge_finished")
        keys, shard_of_key = self._index_keys(FINISHED_STATUSES, None, None)
        cut = repr(float(before))
        purged = 0
        cursor: bytes | None = None
        while True:
            page = await self._index_page(keys, cursor, 500)
            if not page:
                break
            cursor = page[-1][0]
            by_shard: dict[int, list[bytes]] = {}
            for member, i in page:
                by_shard.setdefault(shard_of_key[i], []).append(member)
            calls = [
                _Call(_PURGE_LUA, (self._bases[s] + "runs",), (self._bases[s], cut, *ids))
                for s, ids in by_shard.items()
            ]
            purged += sum(int(n) for n in await self._scripted(client, calls, "purge_finished"))
            if len(page) < 500:
                break
        return purged


def _dead_letter(raw: bytes, body: bytes, tier: str) -> StoredDeadLetter:
    """A stored dead letter; a tampered or foreign record is a ``CodecError``, never a crash."""
    try:
        return _dead_letter_fields(json.loads(raw), body)
    except (KeyError, TypeError, ValueError, OverflowError, RecursionError) as exc:
        raise CodecError(tier, f"a stored dead letter is malformed: {exc!r}") from exc


def _dead_letter_fields(meta: dict[str, Any], body: bytes) -> StoredDeadLetter:
    """The record, each field of the type it is written with (a planted record may hold anything).

    Raises:
        TypeError: a field has another type.
        ValueError: a number is not as this store writes it.
        KeyError: a field is missing.
    """
    h = meta["header"]
    header = RunHeader(
        run_id=h["run_id"],
        workflow=h["workflow"],
        workflow_version=_strict_int(h["workflow_version"]),
        version=_strict_int(h["version"]),
        step=_strict_int(h["step"]),
        status=h["status"],
        updated_at=_strict_float(h["updated_at"]),
        attempt=_strict_int(h["attempt"]),
        epoch=_strict_int(h.get("epoch", "0")),  # no epoch: written before epochs
    )
    at = meta["at"]
    if type(at) not in (int, float):
        raise TypeError(f"at is a {type(at).__name__}")
    record = StoredDeadLetter(
        run_id=meta["run_id"],
        workflow=meta["workflow"],
        at=float(at),
        error=meta["error"],
        attempts=meta["attempts"],
        compensation_errors=meta["compensation_errors"],
        snapshot=StoredSnapshot(header=header, error=meta["snapshot_error"], body=bytes(body)),
    )
    texts = (record.run_id, record.workflow, record.error, record.attempts, record.compensation_errors)
    if not all(type(t) is str for t in texts):
        raise TypeError("a text field of the record is not text")
    problem = stored_problem(record.snapshot)
    if problem is not None:
        raise TypeError(problem)
    return record
