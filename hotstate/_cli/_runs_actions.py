"""The actions of ``hotstate runs``: list, show, history, dead-letters, retry.

Each takes the parsed arguments and the opened stores and returns the exit
status; ``_runs.py`` parses, opens the stores and reports errors.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from hotstate._bench._table import render_table
from hotstate._cli._output import fail, print_json
from hotstate._cli._safe import printable
from hotstate._errors import (
    CodecError,
    CorruptSnapshotError,
    RunNotFoundError,
)
from hotstate.actors import Status, Transition, TransitionKind
from hotstate.persistence import BadRow, MsgpackCodec, RunHeader, StoredSnapshot
from hotstate.persistence._authority import process_gone
from hotstate.persistence._postgres_authority import read_postgres_shard_map
from hotstate.persistence._records import (
    dead_letter_context,
    error_from_json,
    errors_from_json,
    snapshot_context,
    verify_dead_letter,
    verify_snapshot,
)
from hotstate.persistence._shards import shard_of
from hotstate.persistence._sqlite_authority import read_shard_map

if TYPE_CHECKING:
    import argparse
    from collections.abc import Iterable, Sequence

    from hotstate.actors import ErrorInfo
    from hotstate.persistence import RunHeader, Store, StoredDeadLetter

__all__ = ["run_dead_letters", "run_history", "run_list", "run_retry", "run_shards", "run_show"]

_PAGE = 1000
_RETRY_DETAIL = "offline: hotstate runs retry"


def _iso(at: float) -> str:
    try:
        return datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds")
    except (OverflowError, OSError, ValueError):
        return repr(at)


def _error_text(error: ErrorInfo) -> str:
    return f"{error.type}: {error.message} (step {error.step} {error.step_name!r}, attempt {error.attempt})"


def _table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """``render_table`` with every text cell escaped (stored text is never printed raw)."""
    return render_table(headers, [[printable(v) if isinstance(v, str) else v for v in row] for row in rows])


def _header_dict(h: RunHeader) -> dict[str, Any]:
    return {
        "run_id": h.run_id,
        "workflow": h.workflow,
        "workflow_version": h.workflow_version,
        "status": h.status,
        "step": h.step,
        "version": h.version,
        "attempt": h.attempt,
        "updated_at": _iso(h.updated_at),
    }


# --- list -------------------------------------------------------------------


def _check_text(verified: bool, corrupt: Sequence[str]) -> str:
    """The ``check`` column of ``list`` and ``dead-letters``."""
    if not verified:
        return "CORRUPT (no copy verifies)"
    if corrupt:
        return f"ok; corrupt copy in {', '.join(corrupt)}"
    return "ok"


async def _scan_all(store: Store, args: argparse.Namespace) -> dict[str, StoredSnapshot]:
    found: dict[str, StoredSnapshot] = {}
    after: str | None = None
    while len(found) < args.limit:
        want = min(_PAGE, args.limit - len(found))
        page = await store.scan_snapshots(
            status=args.status, workflow=args.workflow, after=after, limit=want, bad_rows=[]
        )
        found.update((s.header.run_id, s) for s in page)
        if len(page) < want:
            break
        after = page[-1].header.run_id
    return found


class _Listed:
    """One run in ``hotstate runs list``: its newest copy that verifies, and the tiers whose newer copy did not."""

    __slots__ = ("corrupt", "header", "verified")

    def __init__(self) -> None:
        self.header: RunHeader | None = None
        self.verified = False
        self.corrupt: set[str] = set()

    def offer(self, tier: str, stored: StoredSnapshot) -> None:
        h = stored.header
        if self.header is not None and self.verified and h.version <= self.header.version:
            return
        try:
            _verify(stored, tier)
        except CorruptSnapshotError:
            self.corrupt.add(tier)
            if self.header is None:
                self.header = h  # shown, marked corrupt, until a copy that verifies is offered
            return
        self.header, self.verified = h, True


async def run_list(args: argparse.Namespace, stores: Sequence[Store]) -> int:
    """List runs: per run the newest copy across tiers whose whole envelope verifies; no payload is decoded."""
    listed: dict[str, _Listed] = {}
    for store in stores:
        for rid, stored in (await _scan_all(store, args)).items():
            listed.setdefault(rid, _Listed()).offer(store.tier, stored)
    if len(stores) > 1 and listed:
        # A run may match the filter in one tier yet be newer (and elsewhere) in another.
        for store in stores:
            for rid, stored in (await store.load_many(sorted(listed), bad_rows=[])).items():
                listed[rid].offer(store.tier, stored)
    rows = [
        (rid, entry)
        for rid, entry in sorted(listed.items())
        if entry.header is not None
        and (not args.status or entry.header.status in args.status)
        and (args.workflow is None or entry.header.workflow == args.workflow)
    ][: args.limit]
    if args.json:
        print_json(
            [
                {**_header_dict(e.header), "verified": e.verified, "corrupt": sorted(e.corrupt)}
                for _, e in rows
                if e.header is not None
            ]
        )
        return 0
    print(
        _table(
            ["run id", "workflow", "status", "step", "version", "updated (UTC)", "check"],
            [
                (
                    h.run_id,
                    f"{h.workflow} v{h.workflow_version}",
                    h.status,
                    h.step,
                    h.version,
                    _iso(h.updated_at),
                    _check_text(e.verified, sorted(e.corrupt)),
                )
                for _, e in rows
                if (h := e.header) is not None
            ],
        )
    )
    return 0


# --- show -------------------------------------------------------------------


def _verify(stored: StoredSnapshot, tier: str) -> None:
    """Check a copy's whole envelope (header, error and body) without decoding its payload.

    The key comes from ``HOTSTATE_SECRET_KEY`` as the runtime's does. Checking a
    frame decodes nothing, so a pickle frame is checked too, never unpickled.

    Raises:
        CorruptSnapshotError: the copy does not verify.
    """
    verify_snapshot(stored, MsgpackCodec(), tier=tier)


def _reseal(stored: StoredSnapshot, context: bytes, header: RunHeader, error: str | None) -> StoredSnapshot:
    """``stored``'s body under a new header: checked against its own context first, decoded never.

    Raises:
        CorruptSnapshotError: the copy does not verify.
    """
    body = MsgpackCodec().reframe(
        stored.body,
        context=context,
        new_context=snapshot_context(header, error),
        tier="cli",
        run_id=header.run_id,
    )
    return StoredSnapshot(header=header, error=error, body=body)


@dataclass(frozen=True, slots=True, kw_only=True)
class _Copy:
    tier: str
    stored: StoredSnapshot | None
    corrupt: str | None = None


async def _copies(run_id: str, stores: Sequence[Store]) -> list[_Copy]:
    copies: list[_Copy] = []
    for store in stores:
        stored = await store.load(run_id)
        if stored is None:
            copies.append(_Copy(tier=store.tier, stored=None))
            continue
        try:
            _verify(stored, store.tier)
        except CorruptSnapshotError as exc:
            copies.append(_Copy(tier=store.tier, stored=stored, corrupt=str(exc)))
        else:
            copies.append(_Copy(tier=store.tier, stored=stored))
    return copies


def _best(copies: Sequence[_Copy]) -> _Copy | None:
    good = [c for c in copies if c.stored is not None and c.corrupt is None]
    return max(good, key=lambda c: c.stored.header.version if c.stored else 0, default=None)


def _tier_text(c: _Copy) -> str:
    if c.stored is None:
        return f"{c.tier} absent"
    return f"{c.tier} v{c.stored.header.version}" + (" (corrupt)" if c.corrupt else "")


async def run_show(args: argparse.Namespace, stores: Sequence[Store]) -> int:
    """Where a run is now: the highest verified copy, and every tier's durable version."""
    copies = await _copies(args.run_id, stores)
    if all(c.stored is None for c in copies):
        raise RunNotFoundError(args.run_id)
    best = _best(copies)
    data: dict[str, Any] = {
        "run_id": args.run_id,
        "tiers": {c.tier: None if c.stored is None else c.stored.header.version for c in copies},
        "corrupt": {c.tier: c.corrupt for c in copies if c.corrupt},
        "source": None if best is None else best.tier,
    }
    data.update(await _holder(args, stores))
    if best is not None and best.stored is not None:
        data.update(_header_dict(best.stored.header))
        data["error"] = None
        if best.stored.error is not None:
            try:
                data["error"] = _error_text(error_from_json(best.stored.error, tier=best.tier))
            except CodecError as exc:
                data["error"] = f"(unreadable: {exc})"
    if args.json:
        print_json(data)
    else:
        _print_show(data, copies)
    if best is None:
        return fail(f"run {args.run_id!r}: no copy verifies in any tier")
    return 0


def _print_show(data: dict[str, Any], copies: Sequence[_Copy]) -> None:
    rows: list[tuple[str, object]] = [("run", data["run_id"])]
    if data["source"] is not None:
        rows += [
            ("status", data["status"]),
            ("workflow", f"{data['workflow']} v{data['workflow_version']}"),
            ("step", data["step"]),
            ("version", data["version"]),
            ("attempt", data["attempt"]),
            ("updated (UTC)", data["updated_at"]),
            ("error", data["error"] or "-"),
            ("source", f"{data['source']} (highest verified copy)"),
        ]
    if data.get("shard") is not None:
        rows.append(("shard", f"{data['shard']} (epoch {data['epoch_held']})"))
        rows.append(("held by", data["held_by"] or "no process (free, or its lease lapsed)"))
    rows.append(("durable", ", ".join(_tier_text(c) for c in copies)))
    rows += [("corrupt", c.corrupt) for c in copies if c.corrupt]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key.ljust(width)}  {printable(str(value))}")


# --- history ----------------------------------------------------------------


def _transition_dict(t: Transition) -> dict[str, Any]:
    return {
        "version": t.version,
        "kind": str(t.kind),
        "step": t.step,
        "status": str(t.status),
        "at": _iso(t.at),
        "detail": t.detail,
    }


async def run_history(args: argparse.Namespace, stores: Sequence[Store]) -> int:
    """A run's transitions, merged across tiers by version."""
    merged: dict[int, Transition] = {}
    found = False
    for store in stores:
        for t in await store.history(args.run_id):
            merged.setdefault(t.version, t)
        found = found or await store.load(args.run_id) is not None
    if not merged and not found:
        raise RunNotFoundError(args.run_id)
    transitions = [merged[v] for v in sorted(merged)]
    if args.json:
        print_json([_transition_dict(t) for t in transitions])
        return 0
    print(
        _table(
            ["version", "kind", "step", "status", "time (UTC)", "detail"],
            [(t.version, str(t.kind), t.step, str(t.status), _iso(t.at), t.detail) for t in transitions],
        )
    )
    return 0


# --- dead letters -----------------------------------------------------------


def _letter_dict(d: StoredDeadLetter, tiers: Sequence[str], corrupt: Sequence[str]) -> dict[str, Any]:
    h = d.snapshot.header
    try:
        error = _error_text(error_from_json(d.error))
        attempts = len(errors_from_json(d.attempts))
    except CodecError as exc:
        error, attempts = f"(unreadable: {exc})", 0
    return {
        "run_id": d.run_id,
        "workflow": d.workflow,
        "at": _iso(d.at),
        "step": h.step,
        "version": h.version,
        "error": error,
        "attempts": attempts,
        "tiers": list(tiers),
        "verified": not corrupt or len(corrupt) < len(tiers),
        "corrupt": list(corrupt),
    }


def _letter_verifies(d: StoredDeadLetter, tier: str) -> bool:
    try:
        verify_dead_letter(d, MsgpackCodec(), tier=tier)
    except CorruptSnapshotError:
        return False
    return True


async def _letters(
    stores: Sequence[Store],
) -> dict[str, tuple[StoredDeadLetter, list[str], list[str]]]:
    """Per run: the newest letter that verifies (else the newest one), the tiers holding one, those whose letter did not verify."""
    found: dict[str, tuple[StoredDeadLetter, list[str], list[str]]] = {}
    for store in stores:
        malformed: list[BadRow] = []
        for d in await store.dead_letters(bad_rows=malformed):
            ok = _letter_verifies(d, store.tier)
            old = found.get(d.run_id)
            tiers = [*old[1], store.tier] if old else [store.tier]
            corrupt = (old[2] if old else []) + ([] if ok else [store.tier])
            # A letter that verifies beats one that does not; then the newer one wins.
            # The one kept so far verifies when fewer of the tiers seen hold a corrupt one.
            keep = d
            if old is not None and (ok, d.at) <= (len(old[2]) < len(old[1]), old[0].at):
                keep = old[0]
            found[d.run_id] = (keep, tiers, corrupt)
        for row in malformed:
            print(
                f"{store.tier}: malformed dead letter of run {printable(row.run_id)}: {printable(row.reason)}",
                file=sys.stderr,
            )
    return found


async def run_dead_letters(args: argparse.Namespace, stores: Sequence[Store]) -> int:
    """The dead-letter records of every tier, oldest first."""
    letters = sorted((await _letters(stores)).values(), key=lambda item: item[0].at)
    rows = [_letter_dict(d, tiers, corrupt) for d, tiers, corrupt in letters]
    if args.json:
        print_json(rows)
        return 0
    print(
        _table(
            [
                "run id",
                "workflow",
                "dead-lettered (UTC)",
                "step",
                "attempts",
                "error",
                "tiers",
                "check",
            ],
            [
                (
                    r["run_id"],
                    r["workflow"],
                    r["at"],
                    r["step"],
                    r["attempts"],
                    r["error"],
                    ", ".join(r["tiers"]),
                    _check_text(r["verified"], r["corrupt"]),
                )
                for r in rows
            ],
        )
    )
    return 0


# --- retry ------------------------------------------------------------------


async def _retry_base(
    run_id: str, stores: Sequence[Store], letters: Sequence[StoredDeadLetter]
) -> tuple[StoredSnapshot, bytes]:
    """The highest verified copy among the stored snapshots and ``letters``' snapshots (verified ones), and its context."""
    candidates = [c for c in await _copies(run_id, stores) if c.stored is not None]
    candidates += [_Copy(tier="dead-letter", stored=d.snapshot) for d in letters]
    contexts = {id(d.snapshot): dead_letter_context(d) for d in letters}
    best = _best(candidates)
    if best is None or best.stored is None:
        reasons = "; ".join(c.corrupt for c in candidates if c.corrupt)
        raise CorruptSnapshotError("cli", run_id, None, f"no copy verifies: {reasons}")
    stored = best.stored
    return stored, contexts.get(id(stored)) or snapshot_context(stored.header, stored.error)


async def run_retry(args: argparse.Namespace, stores: Sequence[Store]) -> int:
    """Re-queue a dead-lettered run in every tier for the next ``recover=True`` runtime."""
    run_id = args.run_id
    found = [(s.tier, d) for s in stores for d in await s.dead_letters(bad_rows=[]) if d.run_id == run_id]
    if not found:
        return fail(f"run {run_id!r}: no dead letter in {', '.join(s.tier for s in stores)}")
    # Only letters whose whole record verifies are trusted: the step to resume at
    # comes from one, and a forged one must never be signed anew by this command.
    letters = [d for tier, d in found if _letter_verifies(d, tier)]
    if not letters:
        return fail(f"run {run_id!r}: no dead letter verifies (in {', '.join(t for t, _ in found)}); not retried")
    base, context = await _retry_base(run_id, stores, letters)
    h = base.header
    if h.status != Status.failed.value:
        return fail(f"run {run_id!r} is {printable(h.status)} at v{h.version}, not failed: not retried")
    newest = max(letters, key=lambda d: d.at)
    cursor = error_from_json(newest.error).step
    if cursor < 0:
        return fail(f"run {run_id!r}: its dead letter names step {cursor}, not a step: not retried")
    now = time.time()
    header = h._replace(
        version=h.version + 1,
        step=cursor,
        status=Status.running.value,
        updated_at=now,
        attempt=1,
    )
    snapshot = _reseal(base, context, header, None)
    transition = Transition(
        run_id=run_id,
        version=header.version,
        kind=TransitionKind.dead_letter_retried,
        step=cursor,
        status=Status.running,
        at=now,
        detail=_RETRY_DETAIL,
    )
    written: dict[str, bool] = {}
    for store in stores:
        result = await store.save([snapshot], [transition])
        written[store.tier] = result.written == 1
        await store.delete_dead_letter(run_id)
    data = {
        "run_id": run_id,
        "version": header.version,
        "step": cursor,
        "status": header.status,
        "written": written,
    }
    if args.json:
        print_json(data)
    else:
        tiers = ", ".join(
            f"{t} v{header.version}" + ("" if ok else " (stale: not written)") for t, ok in written.items()
        )
        print(
            f"run {run_id!r} re-queued at step {cursor} as v{header.version} ({tiers}); "
            "the next Runtime(recover=True) resumes it"
        )
    if not all(written.values()):
        return fail(f"run {run_id!r}: a tier holds a newer version; not written there")
    return 0


# --- shards -------------------------------------------------------------------


def _member_text(member_id: str | None, members: dict[str, Any]) -> str | None:
    if member_id is None:
        return None
    m = members.get(member_id)
    if m is None:
        return member_id[:12]
    label = f" {m.name}" if m.name else ""
    gone = " (process gone)" if process_gone(m) else ""
    return f"{member_id[:12]}{label} pid {m.pid}{gone}"


async def _shard_map(args: argparse.Namespace) -> tuple[Any, dict[str, Any], float] | None:
    """The shard map of the given stores' authority: PostgreSQL's (``--postgres``), else the SQLite file's."""
    if getattr(args, "postgres", None) is not None:
        found = await read_postgres_shard_map(args.postgres, args.schema)
    elif args.sqlite is not None:
        found = read_shard_map(args.sqlite)
    else:
        return None
    if found is None:
        return None
    leases, members, now = found
    return leases, {m.member_id: m for m in members}, now


async def _holder(args: argparse.Namespace, stores: Sequence[Store]) -> dict[str, Any]:
    """Which process holds ``args.run_id``'s shard, from the stores' shard map (empty: no map there)."""
    found = await _shard_map(args)
    if found is None:
        return {}
    leases, members, now = found
    shard = shard_of(args.run_id, stores[0].shards)
    lease = next((x for x in leases if x.shard == shard), None)
    if lease is None:
        return {}
    live = lease.owner is not None and lease.expires_at > now
    return {
        "shard": shard,
        "epoch_held": lease.epoch,
        "held_by": _member_text(lease.owner, members) if live else None,
    }


async def run_shards(args: argparse.Namespace, stores: Sequence[Store]) -> int:
    """The shard map: each shard's owner, epoch and lease expiry (from the PostgreSQL or SQLite authority)."""
    found = await _shard_map(args)
    if found is None:
        return fail(
            "runs shards: no shard map here (give --postgres with the database, or --sqlite with the file,"
            " the runtimes share)"
        )
    leases, members, now = found
    rows = []
    for lease in leases:
        live = lease.owner is not None and lease.expires_at > now
        state = "held" if live else ("lapsed" if lease.owner is not None else "free")
        rows.append(
            {
                "shard": lease.shard,
                "state": state,
                "owner": _member_text(lease.owner, members),
                "epoch": lease.epoch,
                "expires_in": round(lease.expires_at - now, 3) if lease.owner is not None else None,
            }
        )
    if args.json:
        print_json({"shards": rows, "members": [m._asdict() for m in members.values()]})
        return 0
    print(
        _table(
            ["shard", "state", "owner", "epoch", "expires in (s)"],
            [
                [
                    r["shard"],
                    r["state"],
                    r["owner"] or "-",
                    r["epoch"],
                    "-" if r["expires_in"] is None else r["expires_in"],
                ]
                for r in rows
            ],
        )
    )
    held: dict[str, int] = {}
    for r in rows:
        if r["state"] == "held":
            held[r["owner"]] = held.get(r["owner"], 0) + 1
    print(
        f"\n{len(rows)} shards; " + ("; ".join(f"{printable(k)}: {v}" for k, v in sorted(held.items())) or "none held")
    )
    return 0
