"""``hotstate runs``: inspect and re-queue stored runs offline, straight from the stores.

Reads the "Store" box of the map in docs/architecture.md without a runtime: a SQLite file
(``--sqlite``), a PostgreSQL database (``--postgres``, ``--schema``) and/or a Valkey server
(``--valkey-url``, ``--prefix``).

- ``list`` pages through headers only (``Store.scan`` never decodes a payload);
  with several tiers each run shows its newest header.
- ``show`` answers "where is this run now?": the highest copy whose digest
  verifies wins; a copy that does not verify is reported, never unpickled.
- ``history`` merges the transitions of every tier by version.
- ``dead-letters`` lists the dead-letter records.
- ``shards`` shows the shard map of processes sharing the PostgreSQL schema or the SQLite file: each
  shard's owner (member id, name, pid), epoch and lease expiry; ``show``
  names the process holding the run's shard.
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
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from hotstate._cli._output import fail
from hotstate._cli._runs_actions import (
    run_dead_letters,
    run_history,
    run_list,
    run_retry,
    run_shards,
    run_show,
)
from hotstate._cli._safe import printable
from hotstate._errors import (
    ConfigError,
    HotstateError,
    PersistenceError,
)
from hotstate.actors import Status
from hotstate.persistence import (
    PostgresStore,
    SQLiteStore,
    ValkeyStore,
)
from hotstate.runtime import run

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

    from hotstate.persistence import Store

__all__ = ["register"]

_VALKEY_SCHEMES = frozenset({"valkey", "valkeys", "redis", "rediss", "unix"})
_VALKEY_TIMEOUT = 2.0  # seconds: an unreachable server is reported quickly


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
    parser.add_argument("--sqlite", metavar="PATH", default=default, help="a hotstate SQLite file")
    parser.add_argument(
        "--valkey-url",
        metavar="URL",
        default=default,
        help="a Valkey server, e.g. valkey://127.0.0.1:6379/0",
    )
    parser.add_argument(
        "--postgres",
        metavar="URL",
        default=default,
        help="a PostgreSQL database, e.g. postgresql://user@host:5432/db",
    )
    parser.add_argument(
        "--schema",
        default=argparse.SUPPRESS if suppress else "hotstate",
        help="the PostgresStore schema (default: hotstate)",
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
    p.add_argument("--limit", type=_positive_int, default=100, help="at most N runs (default 100)")
    p.set_defaults(func=lambda a: _execute(a, run_list))

    p = actions.add_parser("show", help="where a run is now, and its durable version per tier")
    p.add_argument("run_id", metavar="RUN_ID")
    p.set_defaults(func=lambda a: _execute(a, run_show))

    p = actions.add_parser("history", help="a run's transitions")
    p.add_argument("run_id", metavar="RUN_ID")
    p.set_defaults(func=lambda a: _execute(a, run_history))

    p = actions.add_parser("dead-letters", help="the dead-letter records")
    p.set_defaults(func=lambda a: _execute(a, run_dead_letters))

    p = actions.add_parser("shards", help="the shard map: which process owns each shard, its epoch and lease")
    p.set_defaults(func=lambda a: _execute(a, run_shards))

    p = actions.add_parser("retry", help="re-queue a dead-lettered run for the next recover=True runtime")
    p.add_argument("run_id", metavar="RUN_ID")
    p.set_defaults(func=lambda a: _execute(a, run_retry))

    for sub in actions.choices.values():
        _store_options(sub, suppress=True)


def _no_action(args: argparse.Namespace) -> int:
    args.runs_parser.print_usage(sys.stderr)
    return fail("runs: choose an action: list, show, history, dead-letters, shards, retry", status=2)


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
            row = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'runs'").fetchone()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise PersistenceError("sqlite", f"cannot read {str(path)!r}: {exc}") from exc
    if row is None:
        raise PersistenceError("sqlite", f"not a hotstate database (no runs table): {str(path)!r}")


def _stores(args: argparse.Namespace) -> list[Store]:
    stores: list[Store] = []
    if args.sqlite is not None:
        path = Path(args.sqlite)
        # Opening a missing path would create an empty database: check first.
        _check_sqlite(path)
        stores.append(SQLiteStore(path))
    if args.postgres is not None:
        try:
            scheme = urlsplit(args.postgres).scheme
        except ValueError:
            scheme = ""
        if scheme not in ("postgresql", "postgres"):
            raise _UsageError(f"--postgres {args.postgres!r}: expected a postgresql:// URL")
        stores.append(
            PostgresStore(
                args.postgres,
                schema=args.schema,
                timeout=_VALKEY_TIMEOUT * 5,
                read_only=args.action != "retry",  # inspecting never writes a row
                create=False,  # a mistyped schema is an error, never a new empty one
                pool_size=1,
            )
        )
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
        raise _UsageError("runs: give at least one store: --sqlite PATH, --postgres URL and/or --valkey-url URL")
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

    # An error can quote stored text (a header field, a reason read from a row): escaped like the tables.
    try:
        return run(main, _stores(args))
    except _UsageError as exc:
        return fail(printable(str(exc)), status=2)
    except ConfigError as exc:
        return fail(printable(str(exc)), status=2)
    except (HotstateError, OSError) as exc:
        return fail(printable(str(exc)), status=1)
