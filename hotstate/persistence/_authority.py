"""The lease authority: who owns each shard, until when, and at which epoch.

DESIGN.md "Several processes" and design/ownership.md §4.3-4.4. An
``Authority`` keeps, per shard, a *lease* (owner, expiry) and an *epoch*
(bumped by every claim: the fencing token the stores check), and the live
*members* (one per process start). The lease only decides who may try
(liveness); the stores' fences decide whose writes land (safety).

This module holds the protocol, its records, the ``MemoryAuthority`` (one
process: tests, a ``MemoryStore``) and how a process is proved gone on this
host. ``SQLiteAuthority`` (one host) is in ``_sqlite_authority.py``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
import uuid
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, NamedTuple, Protocol, final, runtime_checkable

from hotstate._errors import ConfigError
from hotstate.persistence._shards import DEFAULT_SHARDS, check_shards

if TYPE_CHECKING:
    from collections.abc import Callable, Collection, Mapping, Sequence

__all__ = [
    "Authority",
    "InboxEntry",
    "MemberInfo",
    "MemoryAuthority",
    "Renewal",
    "ShardLease",
    "host_identity",
    "member_live",
    "new_member",
    "process_gone",
]


class MemberInfo(NamedTuple):
    """A member (one process start) as the authority records it.

    Attributes:
        member_id: fresh per process start (never a host name or a constant).
        host: the host identity (``host_identity``): name, boot and pid namespace.
        pid: the process id on that host.
        started: the process's start identity on that host ('' when unknown),
            so a reused pid is never mistaken for the member.
        name: a label the user gave (e.g. a deployment's instance name).
        joined_at: authority time it joined.
        last_seen: authority time of its last renewal.
    """

    member_id: str
    host: str
    pid: int
    started: str
    name: str
    joined_at: float
    last_seen: float


class ShardLease(NamedTuple):
    """One row of the shard map.

    Attributes:
        shard: the shard.
        owner: the holding member's id, or None (never claimed, or released).
        epoch: the epoch of the last claim (0: never claimed).
        expires_at: authority time the lease ends (past: claimable).
        acquired_at: authority time of the last claim.
    """

    shard: int
    owner: str | None
    epoch: int
    expires_at: float
    acquired_at: float


class Renewal(NamedTuple):
    """What one ``Authority.renew`` returns.

    Attributes:
        held: the shards whose lease this member still holds, now extended.
        leases: the whole shard map after the renewal.
        members: the members seen within the lease time.
        now: the authority's time of the renewal.
    """

    held: frozenset[int]
    leases: tuple[ShardLease, ...]
    members: tuple[MemberInfo, ...]
    now: float


class InboxEntry(NamedTuple):
    """A call forwarded to a shard's owner (design/ownership.md §4.8): durable once ``post`` returns.

    Attributes:
        shard: the run's shard.
        seq: its number in the shard's inbox (per shard, increasing in commit order).
        run_id: the run the call is for.
        kind: ``"spawn"``, ``"signal"``, ``"cancel"`` or ``"retry"``.
        body: the call's arguments as the codec framed them (the owner verifies them).
        created_at: authority time it was posted.
        verdict: None until the owner applied it; then JSON: ``{"ok": ...}`` or ``{"error": ...}``.
    """

    shard: int
    seq: int
    run_id: str
    kind: str
    body: bytes
    created_at: float
    verdict: str | None


@runtime_checkable
class Authority(Protocol):
    """Hands out shard leases and epochs; one per deployment, shared by every process.

    A claim of a shard succeeds when its lease is free, expired, or held by a
    member on this host whose process is provably gone (``process_gone``:
    its pid is dead or belongs to another process start); it sets the lease
    and bumps the shard's epoch in one transaction, and where the authority
    shares a store's fence (the SQLite authority and the SQLite store use one
    table in one file) the claim is that store's seal. Renewal extends every
    lease a member holds in one statement. Times are the authority's clock.

    Errors: ``StoreUnavailableError`` when the backend cannot be reached (the
    caller retries; a member that cannot renew stops itself before its lease
    ends), ``ConfigError`` when the recorded shard count differs.

    Attributes:
        name: for logs and statistics (e.g. ``"sqlite:/path/to.db"``).
        shards: the shard count (known once open).
    """

    name: str
    shards: int

    async def open(self) -> None:
        """Connect, create the schema, record or check the shard count. Idempotent."""
        ...

    async def aclose(self) -> None:
        """Release connections. Idempotent."""
        ...

    async def join(self, member: MemberInfo) -> None:
        """Record ``member`` as live (its ``joined_at``/``last_seen`` are set by the authority)."""
        ...

    async def renew(self, member_id: str, ttl: float) -> Renewal:
        """Extend every lease ``member_id`` holds to now + ``ttl``; read the map and live members."""
        ...

    async def claim(
        self, member_id: str, shards: Sequence[int], ttl: float, *, floors: Mapping[int, int] | None = None
    ) -> dict[int, int]:
        """Take each of ``shards`` that is claimable; returns shard -> its new epoch for those taken.

        A taken shard's epoch is one more than its last, and more than
        ``floors[shard]`` when given: the runtime passes the epoch a store's
        fence holds when that fence refused a seal, which happens when the
        authority went back in time (restored, made again empty, a failover
        that lost commits) and hands out epochs the stores have seen. Jumping
        past it keeps epochs increasing everywhere, in one claim instead of
        one claim per missing epoch.
        """
        ...

    async def release(self, member_id: str, shards: Collection[int]) -> None:
        """Give up ``shards`` (only those ``member_id`` holds): claimable at once by others."""
        ...

    async def leave(self, member_id: str) -> None:
        """Release every shard of ``member_id`` and remove the member."""
        ...

    async def leases(self) -> tuple[ShardLease, ...]:
        """The shard map, read only (for ``hotstate runs`` and statistics)."""
        ...

    async def members(self) -> tuple[MemberInfo, ...]:
        """Every recorded member, live or not."""
        ...

    async def post(self, shard: int, run_id: str, kind: str, body: bytes) -> int:
        """Append a forwarded call to ``shard``'s inbox; durable when this returns. Returns its ``seq``."""
        ...

    async def pending(self, shards: Collection[int], limit: int) -> list[InboxEntry]:
        """Entries of ``shards`` without a verdict, oldest first per shard."""
        ...

    async def settle(self, member_id: str, epochs: Mapping[int, int], verdicts: Sequence[tuple[int, int, str]]) -> int:
        """Record ``(shard, seq, verdict)`` of applied entries; returns how many were recorded.

        Only where none is recorded yet, and only while ``member_id`` still
        holds the entry's shard at the epoch given in ``epochs`` (a process
        that lost the shard meanwhile settles nothing: the new owner applies
        the entry, and its dedupe key makes that a no-op if it was applied).
        """
        ...

    async def verdict(self, shard: int, seq: int) -> str | None:
        """The entry's verdict, or None while it waits (or when it was pruned)."""
        ...

    async def prune(self, age: float) -> int:
        """Delete settled entries posted more than ``age`` seconds ago (authority time); returns how many."""
        ...


# ------------------------------------------------------------ process identity


@cache
def host_identity() -> str:
    """This host as the authority knows it: host name, boot id and pid namespace.

    Two processes may judge each other's pids only when all three match: a
    container with its own pid namespace, or the same name after a reboot, is
    another "host" whose leases are only ever waited out.
    """
    boot = ""
    with contextlib.suppress(OSError), open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
        boot = f.read().strip()
    ns = ""
    with contextlib.suppress(OSError):
        ns = str(os.stat("/proc/self/ns/pid").st_ino)
    return f"{socket.gethostname()}|{boot}|{ns}"


def _start_identity(pid: int) -> str | None:
    """The start time of process ``pid`` (clock ticks since boot, from /proc), '' if unknowable, None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return None
    except OSError:
        return ""
    # The command name (field 2) is in parentheses and may hold spaces or ')'.
    rest = stat[stat.rfind(b")") + 2 :].split()
    if rest[:1] == [b"Z"] or rest[:1] == [b"X"]:
        return None  # a zombie: it has exited, only its exit status is left
    return rest[19].decode() if len(rest) > 19 else ""


def new_member(name: str = "") -> MemberInfo:
    """A member record for this process start: a fresh id, this host, this pid and its start identity."""
    pid = os.getpid()
    return MemberInfo(
        member_id=uuid.uuid4().hex,
        host=host_identity(),
        pid=pid,
        started=_start_identity(pid) or "",
        name=name,
        joined_at=0.0,
        last_seen=0.0,
    )


_LOCAL_MEMBERS: set[str] = set()  # members of this process that are live (a runtime holds each)


def member_live(member_id: str, live: bool) -> None:
    """Record whether a member of *this* process is live (its runtime is open), for ``process_gone``."""
    if live:
        _LOCAL_MEMBERS.add(member_id)
    else:
        _LOCAL_MEMBERS.discard(member_id)


def process_gone(member: MemberInfo) -> bool:
    """Is ``member``'s process provably gone? Only ever True for a member of this host.

    True when its pid no longer exists (or is a zombie), or now belongs to
    another process start, or it is a member of this very process whose
    runtime is no longer open. False when it may be alive, or when it is on
    another host (or pid namespace): then only its lease expiry frees it.
    """
    if member.host != host_identity() or member.pid <= 0:
        return False
    if member.pid == os.getpid() and member.started == (_start_identity(member.pid) or ""):
        return member.member_id not in _LOCAL_MEMBERS
    started = _start_identity(member.pid)
    if started is None:
        if not os.path.isdir("/proc/self"):  # no procfs: ask the kernel
            try:
                os.kill(member.pid, 0)
            except ProcessLookupError:
                return True
            except OSError:
                return False
            return False
        return True
    return bool(member.started) and bool(started) and started != member.started


# ------------------------------------------------------------------- memory


@dataclass(slots=True)
class _Shard:
    owner: str | None = None
    epoch: int = 0
    expires_at: float = 0.0
    acquired_at: float = 0.0


@final
class MemoryAuthority:
    """An authority in this process's memory: for tests and for runtimes sharing one ``MemoryStore``.

    Several runtimes in one event loop share one ``MemoryAuthority`` (and one
    clock) to exercise ownership without processes. Its fences are not a
    store's: the runtime seals every tier after a claim.

    Args:
        shards: the shard count (default ``DEFAULT_SHARDS``).
        clock: the authority's time (default: ``time.monotonic``, which no
            one can set); a test passes ``ManualClock.now`` to expire leases
            without sleeping.
        gone: how a member is judged gone at a claim (default ``process_gone``);
            tests pass a predicate.
    """

    def __init__(
        self,
        shards: int | None = None,
        *,
        clock: Callable[[], float] | None = None,
        gone: Callable[[MemberInfo], bool] | None = None,
    ) -> None:
        self.shards = DEFAULT_SHARDS if shards is None else check_shards("MemoryAuthority.shards", shards)
        self.name = "memory"
        self._now = clock if clock is not None else time.monotonic  # one process: a clock no one can set
        self._gone = gone if gone is not None else process_gone
        self._map = [_Shard() for _ in range(self.shards)]
        self._members: dict[str, MemberInfo] = {}
        self.log: list[tuple[int, int, str, str, float]] = []  # (shard, epoch, owner, event, at)
        self._inbox: dict[tuple[int, int], InboxEntry] = {}
        self._seq = [0] * self.shards
        self.failing: BaseException | None = None  # set by a test: every call raises it
        self._open = False

    def __repr__(self) -> str:
        return f"<MemoryAuthority shards={self.shards} members={len(self._members)}>"

    def _check(self) -> None:
        if self.failing is not None:
            raise self.failing

    async def open(self) -> None:
        """Nothing to connect (idempotent)."""
        self._open = True

    async def aclose(self) -> None:
        """Nothing to release (idempotent); the map stays for the next runtime."""
        self._open = False

    async def join(self, member: MemberInfo) -> None:
        """Record ``member`` as live."""
        self._check()
        now = self._now()
        self._members[member.member_id] = member._replace(joined_at=now, last_seen=now)

    async def renew(self, member_id: str, ttl: float) -> Renewal:
        """Extend ``member_id``'s leases to now + ``ttl``."""
        self._check()
        now = self._now()
        held = []
        for s, row in enumerate(self._map):
            if row.owner == member_id and row.expires_at > now:
                row.expires_at = now + ttl
                held.append(s)
        member = self._members.get(member_id)
        if member is not None:
            self._members[member_id] = member._replace(last_seen=now)
        return Renewal(frozenset(held), self._leases(), self._live(now, ttl), now)

    def _live(self, now: float, ttl: float) -> tuple[MemberInfo, ...]:
        return tuple(m for m in self._members.values() if m.last_seen + ttl > now)

    def _leases(self) -> tuple[ShardLease, ...]:
        return tuple(
            ShardLease(s, row.owner, row.epoch, row.expires_at, row.acquired_at) for s, row in enumerate(self._map)
        )

    async def claim(
        self, member_id: str, shards: Sequence[int], ttl: float, *, floors: Mapping[int, int] | None = None
    ) -> dict[int, int]:
        """Take each claimable shard of ``shards``; bump its epoch (past ``floors``)."""
        self._check()
        floors = floors or {}
        now = self._now()
        taken: dict[int, int] = {}
        for s in shards:
            if not 0 <= s < self.shards:
                raise ConfigError("claim.shards", s, f"must be a shard from 0 to {self.shards - 1}")
            row = self._map[s]
            if row.owner is not None and row.owner != member_id and row.expires_at > now:
                holder = self._members.get(row.owner)
                if holder is None or not self._gone(holder):
                    continue
            if row.owner == member_id and row.expires_at > now:
                continue  # held already: a claim never bumps a live lease of its own
            epoch = max(row.epoch, floors.get(s, 0)) + 1
            row.owner, row.epoch, row.expires_at, row.acquired_at = member_id, epoch, now + ttl, now
            taken[s] = row.epoch
            self.log.append((s, row.epoch, member_id, "acquire", now))
        return taken

    async def release(self, member_id: str, shards: Collection[int]) -> None:
        """Give up ``shards`` that ``member_id`` holds."""
        self._check()
        now = self._now()
        for s in shards:
            row = self._map[s]
            if row.owner == member_id:
                row.owner, row.expires_at = None, now
                self.log.append((s, row.epoch, member_id, "release", now))

    async def leave(self, member_id: str) -> None:
        """Release every shard of ``member_id`` and forget it."""
        await self.release(member_id, range(self.shards))
        self._members.pop(member_id, None)

    async def leases(self) -> tuple[ShardLease, ...]:
        """The shard map."""
        self._check()
        return self._leases()

    async def members(self) -> tuple[MemberInfo, ...]:
        """Every recorded member."""
        self._check()
        return tuple(self._members.values())

    async def post(self, shard: int, run_id: str, kind: str, body: bytes) -> int:
        """Append a forwarded call to ``shard``'s inbox."""
        self._check()
        self._seq[shard] += 1
        seq = self._seq[shard]
        self._inbox[shard, seq] = InboxEntry(shard, seq, run_id, kind, bytes(body), self._now(), None)
        return seq

    async def pending(self, shards: Collection[int], limit: int) -> list[InboxEntry]:
        """Entries of ``shards`` without a verdict."""
        self._check()
        wanted = set(shards)
        out = [e for (s, _), e in sorted(self._inbox.items()) if s in wanted and e.verdict is None]
        return out[:limit]

    async def settle(self, member_id: str, epochs: Mapping[int, int], verdicts: Sequence[tuple[int, int, str]]) -> int:
        """Record the verdicts of applied entries of shards ``member_id`` still holds at ``epochs``."""
        self._check()
        recorded = 0
        for shard, seq, verdict in verdicts:
            row = self._map[shard]
            if row.owner != member_id or row.epoch != epochs.get(shard):
                continue
            entry = self._inbox.get((shard, seq))
            if entry is not None and entry.verdict is None:
                self._inbox[shard, seq] = entry._replace(verdict=verdict)
                recorded += 1
        return recorded

    async def verdict(self, shard: int, seq: int) -> str | None:
        """The entry's verdict."""
        self._check()
        entry = self._inbox.get((shard, seq))
        return None if entry is None else entry.verdict

    async def prune(self, age: float) -> int:
        """Delete settled entries posted more than ``age`` seconds ago."""
        before = self._now() - age
        gone = [k for k, e in self._inbox.items() if e.verdict is not None and e.created_at < before]
        for k in gone:
            del self._inbox[k]
        return len(gone)
