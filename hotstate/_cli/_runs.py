"""``hotstate runs``: inspect and re-queue stored runs offline, straight from the stores.

Reads the "Store" box of the DESIGN.md diagram without a runtime: a SQLite file
(``--sqlite``) and/or a Valkey server (``--valkey-url``, ``--prefix``).

- ``list`` pages through headers only (``Store.scan`` never decodes a payload);
  with several tiers each run shows its newest header.
- ``show`` answers "where is this run now?": the highest copy whose digest
  verifies wins; a copy that does not verify is reported, never unpickled.
- ``history`` merges the transitions of every tier by version.
- ``dead-letters`` lists the dead-letter records.
- ``retry`` does offline what ``Runtime.retry_dead_letter`` does in process: the
  next version of the snapshot (status ``running``, cursor at the failed step,
  error cleared, attempt 1), a ``dead_letter_retried`` transition, and the dead
  letter deleted, in every given tier; the next ``Runtime(recover=True)``
  resumes the run.

Exit status: 0 on success, 1 when a run is not found or a store fails, 2 on
usage errors.
"""

from __future__ import annotations

import argparse
import contextlib
import sqlite3
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from hotstate._cli._output import fail, print_json, render_table
from hotstate._errors import (
    CodecError,
    ConfigError,
    CorruptSnapshotError,
    HotstateError,
    PersistenceError,
    RunNotFoundError,
)
from hotstate.actors import Status, Transition, TransitionKind
from hotstate.persistence import (
    JsonCodec,
    PickleCodec,
    SQLiteStore,
    StoredSnapshot,
    ValkeyStore,
    error_from_json,
    errors_from_json,
    frame_format,
)
from hotstate.runtime import run

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

    from hotstate.actors import ErrorInfo
    from hotstate.persistence import RunHeader, Store, StoredDeadLetter

__all__ = ["register"]

_VALKEY_SCHEMES = frozenset({"valkey", "valkeys", "redis", "rediss", "unix"})
_VALKEY_TIMEOUT = 2.0  # seconds: an unreachable server is reported quickly
_PAGE = 1000
_RETRY_DETAIL = "offline: hotstate runs retry"


class _UsageError(Exception):
    """A bad argument found after parsing (exit status 2)."""


# --- parser -----------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _store_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    # On the sub-commands too (default SUPPRESS), so both
    # `runs --sqlite X list` and `runs list --sqlite X` work.
    default: Any = argparse.SUPPRESS if suppress else None
    parser.add_argument(
        "--sqlite", metavar="PATH", default=default, help="a hotstate SQLite file"
    )
    parser.add_argument(
        "--valkey-url",
        metavar="URL",
        default=default,
        help="a Valkey server, e.g. valkey://127.0.0.1:6379/0",
    )
    parser.add_argument(
        "--prefix",
        default=argparse.SUPPRESS if suppress else "hs",
        help="the ValkeyStore key prefix (default: hs)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS if suppress else False,
        help="print JSON instead of a table",
    )


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``hotstate runs`` to the command line.

    Args:
        subparsers: the ``hotstate`` sub-command set.
    """
    parser = subparsers.add_parser(
        "runs",
        help="list, inspect and retry stored runs (SQLite and/or Valkey)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _store_options(parser, suppress=False)
    parser.set_defaults(func=_no_action, runs_parser=parser)
    actions = parser.add_subparsers(dest="action", metavar="ACTION")

    p = actions.add_parser("list", help="run headers (no payload is decoded)")
    p.add_argument(
        "--status",
        action="append",
        choices=[s.value for s in Status],
        help="keep runs in this status (repeatable)",
    )
    p.add_argument("--workflow", help="keep runs of this workflow")
    p.add_argument(
        "--limit", type=_positive_int, default=100, help="at most N runs (default 100)"
    )
    p.set_defaults(func=lambda a: _execute(a, _list))

    p = actions.add_parser(
        "show", help="where a run is now, and its durable version per tier"
    )
    p.add_argument("run_id", metavar="RUN_ID")
    p.set_defaults(func=lambda a: _execute(a, _show))

    p = actions.add_parser("history", help="a run's transitions")
    p.add_argument("run_id", metavar="RUN_ID")
    p.set_defaults(func=lambda a: _execute(a, _history))

    p = actions.add_parser("dead-letters", help="the dead-letter records")
    p.set_defaults(func=lambda a: _execute(a, _dead_letters))

    p = actions.add_parser(
        "retry", help="re-queue a dead-lettered run for the next recover=True runtime"
    )
    p.add_argument("run_id", metavar="RUN_ID")
    p.set_defaults(func=lambda a: _execute(a, _retry))

    for sub in actions.choices.values():
        _store_options(sub, suppress=True)


def _no_action(args: argparse.Namespace) -> int:
    args.runs_parser.print_usage(sys.stderr)
    return fail(
        "runs: choose an action: list, show, history, dead-letters, retry", status=2
    )


# --- running ----------------------------------------------------------------


def _check_sqlite(path: Path) -> None:
    """Refuse a path that is not an existing hotstate database.

    Opening a ``SQLiteStore`` creates the file and its schema: a mistyped path
    must not leave an empty database behind, nor add tables to someone else's.
    """
    if not path.is_file():
        what = "not a file" if path.exists() else "no such SQLite file"
        raise PersistenceError("sqlite", f"{what}: {str(path)!r}")
    try:
        conn = sqlite3.connect(path.absolute().as_uri() + "?mode=ro", uri=True)
        try:
            row = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'runs'"
            ).fetchone()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise PersistenceError("sqlite", f"cannot read {str(path)!r}: {exc}") from exc
    if row is None:
        raise PersistenceError(
            "sqlite", f"not a hotstate database (no runs table): {str(path)!r}"
        )


def _stores(args: argparse.Namespace) -> list[Store]:
    stores: list[Store] = []
    if args.sqlite is not None:
        path = Path(args.sqlite)
        # Opening a missing path would create an empty database: check first.
        _check_sqlite(path)
        stores.append(SQLiteStore(path))
    if args.valkey_url is not None:
        try:
            scheme = urlsplit(args.valkey_url).scheme
        except ValueError:  # e.g. an unclosed IPv6 bracket
            scheme = ""
        if scheme not in _VALKEY_SCHEMES:
            raise _UsageError(
                f"--valkey-url {args.valkey_url!r}: expected a valkey://, valkeys://, "
                "redis://, rediss:// or unix:// URL"
            )
        if not args.prefix:
            raise _UsageError("--prefix must not be empty")
        stores.append(
            ValkeyStore(
                args.valkey_url,
                prefix=args.prefix,
                socket_timeout=_VALKEY_TIMEOUT,
                read_only=args.action != "retry",  # inspecting never writes a key
            )
        )
    if not stores:
        raise _UsageError(
            "runs: give at least one store: --sqlite PATH and/or --valkey-url URL"
        )
    return stores


@contextlib.asynccontextmanager
async def _opened(stores: Sequence[Store]) -> AsyncIterator[Sequence[Store]]:
    async with contextlib.AsyncExitStack() as stack:
        for store in stores:
            try:
                await stack.enter_async_context(store)
            except ValueError as exc:  # valkey-py rejects a malformed URL at connect
                raise _UsageError(f"{store.tier}: {exc}") from exc
        yield stores


def _execute(
    args: argparse.Namespace,
    action: Callable[[argparse.Namespace, Sequence[Store]], Awaitable[int]],
) -> int:
    async def main(stores: list[Store]) -> int:
        async with _opened(stores) as opened:
            return await action(args, opened)

    try:
        return run(main, _stores(args))
    except _UsageError as exc:
        return fail(str(exc), status=2)
    except ConfigError as exc:
        return fail(str(exc), status=2)
    except (HotstateError, OSError) as exc:
        return fail(str(exc), status=1)


def _iso(at: float) -> str:
    try:
        return datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds")
    except (OverflowError, OSError, ValueError):
        return repr(at)


def _error_text(error: ErrorInfo) -> str:
    return (
        f"{error.type}: {error.message} (step {error.step} {error.step_name!r}, "
        f"attempt {error.attempt})"
    )


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


async def _scan_all(store: Store, args: argparse.Namespace) -> dict[str, RunHeader]:
    found: dict[str, RunHeader] = {}
    after: str | None = None
    while len(found) < args.limit:
        want = min(_PAGE, args.limit - len(found))
        page = await store.scan(
            status=args.status, workflow=args.workflow, after=after, limit=want
        )
        found.update((h.run_id, h) for h in page)
        if len(page) < want:
            break
        after = page[-1].run_id
    return found


def _newest(a: RunHeader | None, b: RunHeader) -> RunHeader:
    return b if a is None or b.version > a.version else a


async def _list(args: argparse.Namespace, stores: Sequence[Store]) -> int:
    newest: dict[str, RunHeader] = {}
    for store in stores:
        for rid, h in (await _scan_all(store, args)).items():
            newest[rid] = _newest(newest.get(rid), h)
    if len(stores) > 1 and newest:
        # A run may match the filter in one tier yet be newer (and elsewhere) in another.
        for store in stores:
            for rid, s in (await store.load_many(sorted(newest))).items():
                newest[rid] = _newest(newest[rid], s.header)
        newest = {
            rid: h
            for rid, h in newest.items()
            if (not args.status or h.status in args.status)
            and (args.workflow is None or h.workflow == args.workflow)
        }
    headers = [newest[rid] for rid in sorted(newest)][: args.limit]
    if args.json:
        print_json([_header_dict(h) for h in headers])
        return 0
    print(
        render_table(
            ["run id", "workflow", "status", "step", "version", "updated (UTC)"],
            [
                (
                    h.run_id,
                    f"{h.workflow} v{h.workflow_version}",
                    h.status,
                    h.step,
                    h.version,
                    _iso(h.updated_at),
                )
                for h in headers
            ],
        )
    )
    return 0


# --- show -------------------------------------------------------------------


def _verify(stored: StoredSnapshot, tier: str) -> None:
    """Check a copy's digest/HMAC without unpickling its payload.

    Raises:
        CorruptSnapshotError: the copy does not verify.
    """
    h = stored.header
    codec = JsonCodec() if frame_format(stored.body) == "json" else PickleCodec()
    try:
        # Verification only: the payload is not needed here, and unpickling it
        # would import the user's classes.
        codec.verify(stored.body, tier=tier, run_id=h.run_id)
    except CorruptSnapshotError as exc:
        reason = exc.detail.split(": ", 1)[-1]
        raise CorruptSnapshotError(tier, h.run_id, h.version, reason) from None


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
    return max(
        good, key=lambda c: c.stored.header.version if c.stored else 0, default=None
    )


def _tier_text(c: _Copy) -> str:
    if c.stored is None:
        return f"{c.tier} absent"
    return f"{c.tier} v{c.stored.header.version}" + (" (corrupt)" if c.corrupt else "")


async def _show(args: argparse.Namespace, stores: Sequence[Store]) -> int:
    copies = await _copies(args.run_id, stores)
    if all(c.stored is None for c in copies):
        raise RunNotFoundError(args.run_id)
    best = _best(copies)
    data: dict[str, Any] = {
        "run_id": args.run_id,
        "tiers": {
            c.tier: None if c.stored is None else c.stored.header.version
            for c in copies
        },
        "corrupt": {c.tier: c.corrupt for c in copies if c.corrupt},
        "source": None if best is None else best.tier,
    }
    if best is not None and best.stored is not None:
        data.update(_header_dict(best.stored.header))
        data["error"] = None
        if best.stored.error is not None:
            try:
                data["error"] = _error_text(
                    error_from_json(best.stored.error, tier=best.tier)
                )
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
    rows.append(("durable", ", ".join(_tier_text(c) for c in copies)))
    rows += [("corrupt", c.corrupt) for c in copies if c.corrupt]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key.ljust(width)}  {value}")


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


async def _history(args: argparse.Namespace, stores: Sequence[Store]) -> int:
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
        render_table(
            ["version", "kind", "step", "status", "time (UTC)", "detail"],
            [
                (t.version, str(t.kind), t.step, str(t.status), _iso(t.at), t.detail)
                for t in transitions
            ],
        )
    )
    return 0


# --- dead letters -----------------------------------------------------------


def _letter_dict(d: StoredDeadLetter, tiers: Sequence[str]) -> dict[str, Any]:
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
    }


async def _letters(
    stores: Sequence[Store],
) -> dict[str, tuple[StoredDeadLetter, list[str]]]:
    found: dict[str, tuple[StoredDeadLetter, list[str]]] = {}
    for store in stores:
        for d in await store.dead_letters():
            old = found.get(d.run_id)
            tiers = ([*old[1], store.tier]) if old else [store.tier]
            keep = d if old is None or d.at > old[0].at else old[0]
            found[d.run_id] = (keep, tiers)
    return found


async def _dead_letters(args: argparse.Namespace, stores: Sequence[Store]) -> int:
    letters = sorted((await _letters(stores)).values(), key=lambda item: item[0].at)
    rows = [_letter_dict(d, tiers) for d, tiers in letters]
    if args.json:
        print_json(rows)
        return 0
    print(
        render_table(
            [
                "run id",
                "workflow",
                "dead-lettered (UTC)",
                "step",
                "attempts",
                "error",
                "tiers",
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
                )
                for r in rows
            ],
        )
    )
    return 0


# --- retry ------------------------------------------------------------------


async def _retry_base(
    run_id: str, stores: Sequence[Store], letters: Sequence[StoredDeadLetter]
) -> StoredSnapshot:
    """The highest verified copy among the stored snapshots and the dead letters' snapshots."""
    candidates = [c for c in await _copies(run_id, stores) if c.stored is not None]
    for d in letters:
        try:
            _verify(d.snapshot, "dead-letter")
            candidates.append(_Copy(tier="dead-letter", stored=d.snapshot))
        except CorruptSnapshotError as exc:
            candidates.append(
                _Copy(tier="dead-letter", stored=d.snapshot, corrupt=str(exc))
            )
    best = _best(candidates)
    if best is None or best.stored is None:
        reasons = "; ".join(c.corrupt for c in candidates if c.corrupt)
        raise CorruptSnapshotError("cli", run_id, None, f"no copy verifies: {reasons}")
    return best.stored


async def _retry(args: argparse.Namespace, stores: Sequence[Store]) -> int:
    run_id = args.run_id
    letters = [
        d for store in stores for d in await store.dead_letters() if d.run_id == run_id
    ]
    if not letters:
        return fail(
            f"run {run_id!r}: no dead letter in {', '.join(s.tier for s in stores)}"
        )
    base = await _retry_base(run_id, stores, letters)
    h = base.header
    if h.status != Status.failed.value:
        return fail(
            f"run {run_id!r} is {h.status} at v{h.version}, not failed: not retried"
        )
    newest = max(letters, key=lambda d: d.at)
    cursor = error_from_json(newest.error).step
    now = time.time()
    header = h._replace(
        version=h.version + 1,
        step=cursor,
        status=Status.running.value,
        updated_at=now,
        attempt=1,
    )
    snapshot = StoredSnapshot(header=header, error=None, body=base.body)
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
            f"{t} v{header.version}" + ("" if ok else " (stale: not written)")
            for t, ok in written.items()
        )
        print(
            f"run {run_id!r} re-queued at step {cursor} as v{header.version} ({tiers}); "
            "the next Runtime(recover=True) resumes it"
        )
    if not all(written.values()):
        return fail(f"run {run_id!r}: a tier holds a newer version; not written there")
    return 0
