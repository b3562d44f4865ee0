"""``ValkeyStore``: the Valkey tier of the map in docs/architecture.md.

Keys (``P`` is the prefix):

- ``P:run:{run_id}``: hash of the header fields, ``error`` and ``body``;
- ``P:status:{status}``, ``P:wf:{workflow}``, ``P:runs``: sorted sets with score
  0 and the run id as member, so ``ZRANGEBYLEX`` pages by run id;
- ``P:hist:{run_id}``: hash of version -> transition JSON (``HSETNX``, so a
  retried batch never duplicates history);
- ``P:dead``: hash of run id -> dead-letter JSON, ``P:dead:body``: run id -> body;
- ``P:ver:{run_id}``: the kept copies, a hash of version -> body and
  ``{version}:h`` -> header JSON (``HSETNX``);
- ``P:mark:{writer}``: each open store's mark, ``"{high}:{lost}"``, written at
  ``open``, advanced by every ``save``, deleted by ``aclose``, and expiring
  ``MARK_TTL`` after the last save (see ``ValkeyStore.save``). ``P:epoch``,
  which earlier versions compared instead, is no longer read or written.

``save`` is one ``EVALSHA`` of a Lua script that applies the whole batch
server-side, including the version guard, so it is one round trip and atomic
with respect to other clients. The script computes key names from the prefix,
so it suits a standalone server, not a Valkey Cluster.
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
from typing import TYPE_CHECKING, Any, Final, TypeVar, cast, final

import anyio
import valkey.asyncio as avalkey
from valkey import exceptions as vex
from valkey.utils import LIBVALKEY_AVAILABLE

from hotstate._errors import (
    CodecError,
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
from hotstate.persistence._store import (
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
    from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence

    from valkey.commands.core import AsyncScript

    from hotstate.actors._snapshot import Transition
    from hotstate.persistence._records import BadRow

__all__ = ["ValkeyStore"]

_T = TypeVar("_T")

_HEADER_FIELDS: Final = (
    "run_id",
    "workflow",
    "workflow_version",
    "version",
    "step",
    "status",
    "updated_at",
    "attempt",
)
_SNAPSHOT_FIELDS: Final = (*_HEADER_FIELDS, "error", "body")

# ARGV: prefix, headers JSON, transitions JSON, writer id, floor, seq (WriterMark),
# then one body per snapshot. An empty writer id: a call carrying only the first
# transitions of a long batch (ValkeyStore.save), which leaves the mark alone.
# The headers travel as one JSON array of string fields (cjson decodes it
# server-side) and bodies as separate ARGV entries, so binary bytes survive and
# the client packs ~1 argument per snapshot instead of ~13: packing arguments
# was 60% of a flush's client time (measured: 10k -> 40k+ snapshots/s).
# Versions only go up (docs/architecture.md "Persistence"): the guard runs here, server-side.
_SAVE_LUA: Final = """
local p = ARGV[1]
local heads = cjson.decode(ARGV[2])
local trans = cjson.decode(ARGV[3])
local fmt = string.format
-- This writer's mark (advance_mark in _store.py): lower than the floor, or
-- gone, means the server lost writes this writer had acknowledged (restarted
-- empty or from an older RDB/AOF, a restored backup). A mark key of another
-- type reads as gone (SET replaces it).
local marking = ARGV[4] ~= ''
local mkey, floor, seq = p .. ':mark:' .. ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6])
local high, lost, reset = 0, 0, 0
if marking then
  local ok, held = pcall(redis.call, 'GET', mkey)
  if ok and held then
    local h, l = string.match(held, '^(%d+):(%d+)$')
    if h then high, lost = tonumber(h), tonumber(l) end
  end
  if high < floor then lost = seq end
  if lost > floor then reset = 1 end
end
-- Pass 1 reads and checks, and writes nothing. A run that cannot be written
-- (a number out of range, a key it would write holding another type) is
-- rejected whole, with the reason, and every other run is written (#11): a
-- script that fails keeps the writes it made before, so no check may wait
-- for pass 2.
local bad, nbad = {}, 0
local function reject(rid, why)
  if not bad[rid] then
    bad[rid] = why
    nbad = nbad + 1
  end
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
local NUMBERS = {{3, 'workflow_version'}, {4, 'version'}, {5, 'step'}, {8, 'attempt'}}
-- A stored version that is not an integer (a row hotstate did not write, which
-- every read reports as malformed) orders below every version: it is replaced.
-- Longer than 20 characters is not one either: Python's int() reads no more.
local function version(s)
  if s and #s <= 20 and string.find(s, '^%-?%d+$') then return tonumber(s) end
  return nil
end
local cur = {}  -- run id -> {version, status, workflow, error} as stored; pass 2 keeps it current
-- Pass 2's writes, foreseen: run id -> version, status, workflow after the
-- heads seen so far (three tables: no table built per head).
local simv, sims, simw = {}, {}, {}
for j = 1, #heads do
  local h = heads[j]
  local rid = h[1]
  if not bad[rid] then
    local why = false
    if #h[3] > 18 or #h[4] > 18 or #h[5] > 18 or #h[8] > 18 then  -- shorter is in range: no call
      for k = 1, 4 do
        local f = NUMBERS[k]
        if not why and not int64(h[f[1]]) then
          why = f[2] .. '=' .. h[f[1]] .. ' is out of range (a signed 64-bit integer)'
        end
      end
    end
    if not why and not cur[rid] then
      local key = p .. ':run:' .. rid
      local ok, got = pcall(redis.call, 'HMGET', key, 'version', 'status', 'workflow', 'error')
      if ok then
        cur[rid] = got
        simv[rid], sims[rid], simw[rid] = got[1], got[2], got[3]
      else
        why = wrong(key, 'hash') or ('key ' .. key .. ' cannot be read')
      end
    end
    local st, wf = sims[rid], simw[rid]
    -- Only the keys this head's write touches: one planted index key refuses
    -- the runs moving into or out of it, not every run. A run that keeps its
    -- status and workflow touches no index key (the usual step: no check).
    if not why and (st ~= h[6] or wf ~= h[2] or not simv[rid]) then
      local held = version(simv[rid])
      if not (held and held >= tonumber(h[4])) then
        if st ~= h[6] then
          why = (st and wrong(p .. ':status:' .. st, 'zset')) or wrong(p .. ':status:' .. h[6], 'zset')
        end
        if not why and wf ~= h[2] then
          why = (wf and wrong(p .. ':wf:' .. wf, 'zset')) or wrong(p .. ':wf:' .. h[2], 'zset')
        end
        if not why and not simv[rid] then why = wrong(p .. ':runs', 'zset') end
        simv[rid], sims[rid], simw[rid] = h[4], h[6], h[2]
      end
    end
    if why then reject(rid, why) end
  end
end
-- 2^63, exact as a double (cjson's numbers). Doubles cannot tell -2^63 from one below it, nor
-- 2^63 - 1 from 2^63: both edges are refused, so nothing past 64 bits is ever taken.
local LIMIT = 9223372036854775808
for j = 1, #trans do
  local t = trans[j]
  local rid = t[1]
  if not bad[rid] then
    local why = false
    if not (t[2] > -LIMIT and t[2] < LIMIT) then
      why = 'transition version ' .. fmt('%.17g', t[2]) .. ' is out of range (a signed 64-bit integer)'
    elseif not (t[4] > -LIMIT and t[4] < LIMIT) then
      why = 'transition step ' .. fmt('%.17g', t[4]) .. ' is out of range (a signed 64-bit integer)'
    else
      why = wrong(p .. ':hist:' .. rid, 'hash')
    end
    if why then reject(rid, why) end
  end
end
if marking then
  redis.call('SET', mkey, fmt('%d:%d', math.max(high, seq), lost), 'EX', @MARK_TTL@)
end
local written, stale, added = 0, 0, 0
local above = false  -- a snapshot met a strictly higher stored version
for j = 1, #heads do
  local h = heads[j]
  local rid, wf, st = h[1], h[2], h[6]
  if not bad[rid] then
    local c = cur[rid]
    local key = p .. ':run:' .. rid
    local held = version(c[1])
    if held and held >= tonumber(h[4]) then
      stale = stale + 1
      if held > tonumber(h[4]) then above = true end
    else
      redis.call('HSET', key, 'run_id', rid, 'workflow', wf, 'workflow_version', h[3],
        'version', h[4], 'step', h[5], 'status', st, 'updated_at', h[7],
        'attempt', h[8], 'body', ARGV[6 + j])
      if h[9] ~= '' then
        redis.call('HSET', key, 'error', h[9])
      elseif c[4] then
        redis.call('HDEL', key, 'error')
      end
      if c[2] ~= st then
        if c[2] then redis.call('ZREM', p .. ':status:' .. c[2], rid) end
        redis.call('ZADD', p .. ':status:' .. st, 0, rid)
      end
      if c[3] ~= wf then
        if c[3] then redis.call('ZREM', p .. ':wf:' .. c[3], rid) end
        redis.call('ZADD', p .. ':wf:' .. wf, 0, rid)
      end
      if not c[1] then redis.call('ZADD', p .. ':runs', 0, rid) end
      cur[rid] = {h[4], st, wf, h[9] ~= '' and h[9] or false}
      written = written + 1
    end
  end
end
-- Each history entry is transition_to_json()'s text, built here from the
-- batch's one JSON array ('%.17g' because cjson.encode would round `at` to
-- 14 digits).
local enc = cjson.encode
for j = 1, #trans do
  local t = trans[j]
  if not bad[t[1]] then
    local detail = 'null'
    if t[7] ~= cjson.null then detail = enc(t[7]) end
    local v = fmt('%d', t[2])
    local text = '[' .. enc(t[1]) .. ',' .. v .. ',' .. enc(t[3]) .. ',' .. fmt('%d', t[4]) .. ',' ..
      enc(t[5]) .. ',' .. fmt('%.17g', t[6]) .. ',' .. detail .. ']'
    added = added + redis.call('HSETNX', p .. ':hist:' .. t[1], v, text)
  end
end
-- After the four counts, only when a run was rejected or a snapshot met a
-- higher version (so the usual reply stays 4 integers): the number of
-- rejected runs, then (run id, reason) for each (SaveResult.rejected), then
-- (run id, stored version) for each run whose highest version in the batch
-- is below the one now stored (SaveResult.conflicts).
local reply = {written, stale, added, reset}
if nbad > 0 or above then
  reply[5] = nbad
  for rid, why in pairs(bad) do
    reply[#reply + 1] = rid
    reply[#reply + 1] = why
  end
end
if above then
  local top = {}
  for j = 1, #heads do
    local rid, v = heads[j][1], tonumber(heads[j][4])
    if not bad[rid] and (not top[rid] or v > top[rid]) then top[rid] = v end
  end
  for rid, v in pairs(top) do
    local held = version(cur[rid][1])
    if held and held > v then
      reply[#reply + 1] = rid
      reply[#reply + 1] = cur[rid][1]
    end
  end
end
return reply
""".replace("@MARK_TTL@", str(int(MARK_TTL)))

# ARGV: prefix, cut-off, then run ids. KEYS is unused (key names derive from the
# prefix). Re-checks status and time server-side, so a run revived since the
# caller listed it is kept.
_PURGE_LUA: Final = """
local p, before = ARGV[1], tonumber(ARGV[2])
local finished = {done = true, failed = true, cancelled = true}
local n = 0
for i = 3, #ARGV do
  local rid = ARGV[i]
  local key = p .. ':run:' .. rid
  local h = redis.call('HMGET', key, 'status', 'workflow', 'updated_at')
  if h[1] and finished[h[1]] and tonumber(h[3]) < before then
    redis.call('DEL', key, p .. ':hist:' .. rid, p .. ':ver:' .. rid)
    redis.call('ZREM', p .. ':status:' .. h[1], rid)
    redis.call('ZREM', p .. ':wf:' .. h[2], rid)
    redis.call('ZREM', p .. ':runs', rid)
    n = n + 1
  end
end
return n
"""

_DELETE_COPY_LUA: Final = """
local p, rid = ARGV[1], ARGV[2]
local key = p .. ':run:' .. rid
if redis.call('TYPE', key)['ok'] ~= 'hash' then return 0 end
local h = redis.call('HMGET', key, 'body', 'status', 'workflow')
if h[1] ~= ARGV[3] then return 0 end
redis.call('DEL', key)
if h[2] then redis.call('ZREM', p .. ':status:' .. h[2], rid) end
if h[3] then redis.call('ZREM', p .. ':wf:' .. h[3], rid) end
redis.call('ZREM', p .. ':runs', rid)
return 1
"""

_TRANSIENT_REPLIES: Final = (
    "OOM",
    "MISCONF",
    "READONLY",
    "LOADING",
    "BUSY",
    "MASTERDOWN",
)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _fields(
    run_id: str, reply: list[bytes | None] | Exception, names: Sequence[str], tier: str
) -> list[bytes | None] | None:
    """The values of a reply to ``HMGET key *names``; None when the key does not exist.

    Raises:
        CodecError: the key is not a hash, or the hash lacks a field of
            ``names`` other than ``error`` (the one a run may lack).
    """
    if isinstance(reply, Exception):
        raise CodecError(tier, f"run {run_id!r}: stored key is not a hash: {reply}")
    if None in reply:
        if all(v is None for v in reply):
            return None
        missing = [name for name, v in zip(names, reply, strict=True) if v is None and name != "error"]
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
)
"""Each header field's parser and the type it reads, in _HEADER_FIELDS order."""


def _header(run_id: str, values: Sequence[Any], tier: str) -> RunHeader:
    """A run's header from the first eight values of ``_fields`` (all present).

    Raises:
        CodecError: a field is not UTF-8, a number does not parse, or the
            ``run_id`` field is not the run id of its key.
    """
    try:
        rid, wf, wf_version, version, step, status, updated_at, attempt = (v.decode() for v in values[:8])
        header = RunHeader(
            rid,
            wf,
            _strict_int(wf_version),
            _strict_int(version),
            _strict_int(step),
            status,
            _strict_float(updated_at),
            _strict_int(attempt),
        )
    except (ValueError, OverflowError) as exc:  # UnicodeDecodeError is a ValueError; so is a 5,000-digit int
        raise CodecError(tier, f"run {run_id!r}: stored header is malformed: {_bad_fields(values)}") from exc
    if rid != run_id:
        raise CodecError(tier, f"run {run_id!r}: stored header is malformed: its run_id field is {rid!r}")
    return header


def _bad_fields(values: Sequence[bytes]) -> str:
    """Name each header field that does not parse, with its stored bytes (shortened)."""
    bad = []
    for name, (parse, kind), raw in zip(_HEADER_FIELDS, _PARSERS, values, strict=False):
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
    error = values[8]
    try:
        text = None if error is None else error.decode()
    except UnicodeDecodeError as exc:
        raise CodecError(tier, f"run {run_id!r}: stored error is not UTF-8: {exc}") from exc
    return header, StoredSnapshot(header, text, values[9])


def _stored(run_id: str, reply: list[bytes | None] | Exception, tier: str) -> StoredSnapshot | None:
    """The snapshot in a reply to ``HMGET`` of ``_SNAPSHOT_FIELDS``; None when the run is not stored.

    Raises:
        CodecError: the row is malformed.
    """
    values = _fields(run_id, reply, _SNAPSHOT_FIELDS, tier)
    return None if values is None else _snapshot_row(run_id, values, tier)[1]


def _extras(flat: Sequence[Any]) -> tuple[dict[str, str], dict[str, int]]:
    """``SaveResult.rejected`` and ``conflicts`` from the save script's reply after its four counts.

    Empty, or the number of rejected runs, then (run id, reason) pairs, then
    (run id, stored version) pairs (integers, checked in the script).
    """
    if not flat:
        return {}, {}
    end = 1 + 2 * int(flat[0])
    refused, above = flat[1:end], flat[end:]
    rejected = {run_id.decode(): why.decode() for run_id, why in zip(refused[::2], refused[1::2], strict=True)}
    return rejected, {run_id.decode(): int(held) for run_id, held in zip(above[::2], above[1::2], strict=True)}


def _transitions_json(part: Sequence[Transition]) -> str:
    """The transitions as the script's one JSON array: one C-speed ``dumps`` for the whole part.

    StrEnum members serialise as their values; a json.dumps per transition
    cost ~3 us each, more than the step that made it. A NaN raises
    ``ValueError`` (checked by ``save``).
    """
    return json.dumps(list(part), separators=(",", ":"), allow_nan=False)


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
        s.error or "",
    )


@final
class ValkeyStore(StoreBase):
    """A Store in a Valkey (or Redis-compatible) server.

    Uses ``valkey.asyncio``, which parses replies with the C ``libvalkey``
    parser when it is installed (the ``valkey[libvalkey]`` extra; see
    ``ValkeyStore.fast_parser``).

    Args:
        url: the server, e.g. ``valkey://127.0.0.1:6379/0`` (``valkeys://`` for
            TLS, ``unix://`` for a socket).
        prefix: the key prefix; several stores can share a server with
            different prefixes.
        tier: the tier's name.
        client: an existing client to use instead of ``url``. It must not
            decode responses; the store does not close it.
        socket_timeout: seconds to wait on connect and on each reply.
        read_only: never write (for inspection tools): ``open`` writes no
            mark, and every write raises ``PersistenceError``.
    """

    fast_parser: Final[bool] = LIBVALKEY_AVAILABLE
    """True when valkey-py found ``libvalkey`` (>= 4) and uses its C reply parser."""

    def __init__(
        self,
        url: str = "valkey://127.0.0.1:6379/0",
        *,
        prefix: str = "hs",
        tier: str = "valkey",
        client: avalkey.Valkey | None = None,
        socket_timeout: float = 5.0,
        read_only: bool = False,
    ) -> None:
        self.tier = tier
        self.read_only = read_only
        self.url = url
        self.prefix = prefix
        self.socket_timeout = socket_timeout
        self._client = client
        self._owns_client = client is None
        self._save_script: AsyncScript | None = None
        self._mark = WriterMark()
        self._purge_script: AsyncScript | None = None
        self._delete_copy_script: AsyncScript | None = None

    def __repr__(self) -> str:
        return f"ValkeyStore({self.url!r}, prefix={self.prefix!r}, tier={self.tier!r})"

    def _key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    @contextlib.asynccontextmanager
    async def _errors(self, action: str) -> AsyncIterator[None]:
        try:
            yield
        except (vex.ConnectionError, vex.TimeoutError, OSError) as exc:
            raise StoreUnavailableError(self.tier, f"{action}: {exc}") from exc
        except vex.ResponseError as exc:
            if str(exc).startswith(_TRANSIENT_REPLIES) or isinstance(exc, vex.ReadOnlyError | vex.OutOfMemoryError):
                raise StoreUnavailableError(self.tier, f"{action}: {exc}") from exc
            raise PersistenceError(self.tier, f"{action}: {exc}") from exc

    def _w(self, action: str) -> avalkey.Valkey:
        """The client, for a write."""
        if self.read_only:
            raise PersistenceError(self.tier, f"{action}: this store was opened read-only")
        return self._c()

    def _c(self) -> avalkey.Valkey:
        self._check_open()
        if self._client is None:  # pragma: no cover - open() sets it
            raise HotstateInternalError("ValkeyStore is open without a client")
        return self._client

    @override
    async def open(self) -> None:
        if self._opened:
            return
        if self._client is None:
            self._client = avalkey.Valkey.from_url(
                self.url,
                socket_timeout=self.socket_timeout,
                socket_connect_timeout=self.socket_timeout,
                decode_responses=False,
            )
        try:
            async with self._errors(f"connect to {self.url}"):
                await self._client.ping()
        except BaseException:
            await self._drop_client()
            raise
        self._save_script = self._client.register_script(_SAVE_LUA)
        self._purge_script = self._client.register_script(_PURGE_LUA)
        self._delete_copy_script = self._client.register_script(_DELETE_COPY_LUA)
        if not self.read_only:
            # The mark from open on, not from the first save: versions read
            # before that save (recovery) are claimed too.
            self._mark = mark = WriterMark()
            _, seq = mark.next()
            try:
                async with self._errors("write this writer's mark"):
                    await self._client.set(self._key("mark", mark.writer), f"{seq}:0", ex=int(MARK_TTL))
            except BaseException:
                await self._drop_client()
                raise
            mark.stored(seq)
        self._opened = True

    async def _drop_client(self) -> None:
        client, self._client = self._client, None
        if client is not None and self._owns_client:
            await client.aclose()

    @override
    async def aclose(self) -> None:
        """Delete this writer's mark (a second at most; else it expires), then close the client."""
        was_open, self._opened = self._opened, False
        try:
            if was_open and not self.read_only and self._client is not None:
                with anyio.move_on_after(min(1.0, self.socket_timeout)), contextlib.suppress(vex.ValkeyError, OSError):
                    await self._client.delete(self._key("mark", self._mark.writer))
        finally:
            await self._drop_client()

    @override
    async def save(self, snapshots: Sequence[StoredSnapshot], transitions: Sequence[Transition]) -> SaveResult:
        """Write the batch with one ``EVALSHA``: the version guard and this writer's mark inside the script.

        The script reads ``P:mark:{writer}`` and sets it again (with the
        ``MARK_TTL`` expiry, refreshed by every save) in the same round trip:
        a server restarted empty or from an RDB/AOF file older than this
        writer's last save is noticed there, by every writer sharing the
        prefix. An empty batch is one round trip too: a probe of the mark.

        The script checks, before it writes anything, every key a run would
        write and the run's numbers; a run with a key of another type (say a
        list planted at ``P:run:{run_id}`` or ``P:hist:{run_id}``) or a
        number out of range is left out and named in ``SaveResult.rejected``.
        Text that does not encode (which cjson refuses for the whole batch)
        is found after the script fails, and the batch is sent again without
        those runs. A long history goes in several scripts
        (``CALL_TRANSITIONS``): the first transitions without the mark, the
        last with the snapshots and the mark.
        """
        client = self._w("save")
        added = [0]  # transitions stored by the scripts that went through, counted across a second attempt
        try:
            return await self._save(client, snapshots, transitions, {}, added)
        except (ValueError, PersistenceError) as exc:  # cjson refused the batch, or a NaN
            if isinstance(exc, StoreUnavailableError):
                raise
            rejected = unwritable(snapshots, transitions)
            if not rejected:
                raise
        snapshots, transitions = without(rejected, snapshots, transitions)
        return await self._save(client, snapshots, transitions, rejected, added)

    async def _save(
        self,
        client: avalkey.Valkey,
        snapshots: Sequence[StoredSnapshot],
        transitions: Sequence[Transition],
        rejected: dict[str, str],
        added: list[int],
    ) -> SaveResult:
        parts = transition_parts(transitions, _transitions_json, CALL_TRANSITIONS)
        assert self._save_script is not None  # noqa: S101  (set with _opened)
        script = self._save_script
        known = len(rejected)  # runs left out before this call: ``transitions`` has none of theirs
        for part, text in parts[:-1]:
            if len(rejected) > known:  # a run a script rejected is left out of the later ones
                text = _transitions_json([t for t in part if t.run_id not in rejected])
            async with self._errors("save"):
                reply: list[Any] = await script(args=[self.prefix, "[]", text, "", "0", "0"], client=client)
            added[0] += int(reply[2])
            rejected.update(_extras(reply[4:])[0])
        part, text = parts[-1]
        if len(rejected) > known:
            snapshots, part = without(rejected, snapshots, part)
            text = _transitions_json(part)
        mark = self._mark
        floor, seq = mark.next()
        heads = json.dumps([_header_args(s) for s in snapshots], separators=(",", ":"))
        args: list[str | bytes] = [self.prefix, heads, text, mark.writer, str(floor), str(seq)]
        args.extend(bytes(s.body) for s in snapshots)
        async with self._errors("save"):
            reply = await script(args=args, client=client)
        mark.stored(seq)
        written, stale, n, reset = reply[:4]
        refused, conflicts = _extras(reply[4:])
        rejected.update(refused)
        return SaveResult(
            written=int(written),
            stale=int(stale),
            transitions=added[0] + int(n),
            reset=bool(reset),
            conflicts=conflicts,
            rejected=rejected,
        )

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
            for reply in replies:
                # WRONGTYPE is about one key: a malformed row. Anything else
                # (LOADING, NOAUTH...) is about the server, and fails the read.
                if isinstance(reply, vex.ResponseError) and not str(reply).startswith("WRONGTYPE"):
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
        replies = await self._hmget([self._key("run", run_id) for run_id in ids], _SNAPSHOT_FIELDS)
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

    async def _index_page(self, keys: Sequence[str], after: bytes | None, count: int) -> list[bytes]:
        """The next ``count`` members after ``after`` in the union of index sets, as stored (bytes)."""
        low: bytes = b"-" if after is None else b"(" + after
        async with self._errors("scan"), self._c().pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.zrangebylex(key, low, b"+", start=0, num=count)
            replies: list[list[bytes]] = await pipe.execute()
        return sorted({m for reply in replies for m in reply})[:count]

    def _index_keys(self, statuses: frozenset[str] | None, workflow: str | None) -> list[str]:
        if statuses is not None:
            return [self._key("status", s) for s in sorted(statuses)]
        if workflow is not None:
            return [self._key("wf", workflow)]
        return [self._key("runs")]

    async def _walk(
        self,
        status: str | Iterable[str] | None,
        workflow: str | None,
        after: str | None,
        limit: int,
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
        statuses = status_filter(status)
        keys = self._index_keys(statuses, workflow)
        found: list[_T] = []
        cursor = None if after is None else after.encode()
        while len(found) < limit:
            wanted = limit - len(found)
            members = await self._index_page(keys, cursor, wanted)
            if not members:
                break
            cursor = members[-1]
            ids: list[str] = []
            for member in members:
                try:
                    ids.append(member.decode())
                except UnicodeDecodeError:
                    error = CodecError(self.tier, f"run {member!r}: index member is not UTF-8")
                    bad_row(error, render_id(member), bad_rows)
            replies = await self._hmget([self._key("run", run_id) for run_id in ids], fields)
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
    ) -> list[RunHeader]:
        """Page through the index sets, then read those runs' header fields.

        Each header is checked against the filters again, so an index lagging
        a concurrent write never returns a wrong row.
        """
        return await self._walk(status, workflow, after, limit, _HEADER_FIELDS, _header_row, None)

    @override
    async def scan_snapshots(
        self,
        *,
        status: str | Iterable[str] | None = None,
        workflow: str | None = None,
        after: str | None = None,
        limit: int = 1000,
        bad_rows: list[BadRow] | None = None,
    ) -> list[StoredSnapshot]:
        """``scan``, reading whole runs: one round trip for a page of ids, one for their rows.

        A run deleted between the two is left out, and the page read on past it.
        """
        return await self._walk(status, workflow, after, limit, _SNAPSHOT_FIELDS, _snapshot_row, bad_rows)

    @override
    async def history(self, run_id: str) -> list[Transition]:
        async with self._errors("history"):
            raw = await cast(
                "Awaitable[dict[bytes, bytes]]",
                self._c().hgetall(self._key("hist", run_id)),
            )
        try:
            ordered = sorted(raw.items(), key=lambda kv: int(kv[0]))
        except ValueError as exc:
            raise CodecError(self.tier, f"run {run_id!r}: stored history has a malformed version: {exc}") from exc
        return [transition_from_json(v, tier=self.tier) for _, v in ordered]

    @override
    async def _save_dead_letters(self, records: Sequence[StoredDeadLetter]) -> None:
        if not records:
            return
        metas: dict[str, str] = {}
        bodies: dict[str, bytes] = {}
        for record in records:
            s = record.snapshot
            metas[record.run_id] = json.dumps(
                {
                    "run_id": record.run_id,
                    "workflow": record.workflow,
                    "at": record.at,
                    "error": record.error,
                    "attempts": record.attempts,
                    "compensation_errors": record.compensation_errors,
                    "header": dict(zip(_HEADER_FIELDS, _header_args(s)[:8], strict=True)),
                    "snapshot_error": s.error,
                }
            )
            bodies[record.run_id] = bytes(s.body)
        async with (
            self._errors("save_dead_letters"),
            self._w("save_dead_letters").pipeline(transaction=True) as pipe,
        ):
            pipe.hset(self._key("dead"), mapping=metas)
            pipe.hset(self._key("dead", "body"), mapping=bodies)
            await pipe.execute()

    @override
    async def dead_letters(self, *, bad_rows: list[BadRow] | None = None) -> list[StoredDeadLetter]:
        async with (
            self._errors("dead_letters"),
            self._c().pipeline(transaction=True) as pipe,
        ):
            pipe.hgetall(self._key("dead"))
            pipe.hgetall(self._key("dead", "body"))
            metas, bodies = await pipe.execute()
        records = []
        for run_id, raw in metas.items():
            body = bodies.get(run_id)
            if body is not None:
                try:
                    records.append(_dead_letter(raw, body, self.tier))
                except CodecError as exc:
                    bad_row(exc, render_id(_text(run_id)), bad_rows)
        return sorted(records, key=lambda d: (d.at, d.run_id))

    @override
    async def delete_copy(self, run_id: str, body: bytes) -> bool:
        assert self._delete_copy_script is not None  # noqa: S101  (set with _opened)
        async with self._errors("delete_copy"):
            client = self._w("delete_copy")
            n = await self._delete_copy_script(args=[self.prefix, run_id, bytes(body)], client=client)
        return bool(n)

    @override
    async def delete_dead_letter(self, run_id: str) -> bool:
        async with (
            self._errors("delete_dead_letter"),
            self._w("delete_dead_letter").pipeline(transaction=True) as pipe,
        ):
            pipe.hdel(self._key("dead"), run_id)
            pipe.hdel(self._key("dead", "body"), run_id)
            removed, _ = await pipe.execute()
        return bool(removed)

    @override
    async def save_versions(self, snapshots: Sequence[StoredSnapshot]) -> None:
        if not snapshots:
            return
        async with self._errors("save_versions"), self._w("save_versions").pipeline(transaction=False) as pipe:
            for s in snapshots:
                key = self._key("ver", s.header.run_id)
                v = str(s.header.version)
                pipe.hsetnx(key, v, cast("Any", bytes(s.body)))  # valkey-py types values as str; bytes are sent as is
                pipe.hsetnx(key, v + ":h", json.dumps([*s.header, s.error]))
            await pipe.execute()

    @override
    async def load_version(self, run_id: str, version: int) -> StoredSnapshot | None:
        client = self._c()
        key = self._key("ver", run_id)
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
        """Page through the finished statuses' index sets; delete each page with a script.

        The script checks status and time again server-side, so a run revived
        since its page was listed is kept. Each page is atomic, the whole purge
        is not.
        """
        client = self._w("purge_finished")
        assert self._purge_script is not None  # noqa: S101  (set with _opened)
        purged = 0
        for status in sorted(FINISHED_STATUSES):
            key = self._key("status", status)
            cursor: bytes | None = None
            while True:
                ids = await self._index_page([key], cursor, 500)
                if not ids:
                    break
                cursor = ids[-1]
                async with self._errors("purge_finished"):
                    n = await self._purge_script(args=[self.prefix, repr(float(before)), *ids], client=client)
                purged += int(n)
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
