"""``hotstate advise``: recommend a ``FlushPolicy`` per tier from measured figures.

Reads the latest benchmark results (``hotstate bench`` writes them to
``results_dir() / "latest.json"``) or, when there are none, built-in defaults
(and says so). The decision is the pure function ``advise``: inputs in, a
``Recommendation`` out, tested with plain numbers.

The rules, per tier (Valkey and SQLite), for ``R`` updates per second and a
tolerated loss of ``L`` seconds (docs/architecture.md: a write-behind crash loses at most
the interval plus one flush duration; write-through loses nothing):

1. ``L == 0``: write-through with group commit, ``FlushPolicy.through()``. The
   measured write-through capacity (steps/s, the lowest of the benchmark's
   concurrency levels) is compared with ``R``; above it, steps wait on commits
   and throughput is capped near that capacity (a warning, not feasible).
2. ``L > 0`` with a measured sweep (``"sweep"`` in the results): the largest
   measured interval whose maximum loss window fits in ``L`` (a warning when it
   was measured at a lower load than ``R``).
3. ``L > 0`` otherwise: every update is assumed to dirty a distinct run (no
   coalescing: the worst case), so a flush writes ``rows = R * interval`` rows
   in ``rows / C`` seconds, ``C`` the sustained flush rate (snapshots/s). The
   interval is ``L`` minus one flush duration: ``interval = L / (1 + R / C)``,
   rounded down to two significant digits. When ``R >= C`` the tier cannot
   keep up at any interval: refused (not feasible). An interval under 1 ms is
   refused too: per-flush overhead would dominate; write-through fits better.
4. Memory bound: each update leaves about two unflushed rows (a snapshot and a
   transition). ``max_pending_rows`` holds four flush cycles of them
   (``2 * R * (interval + duration) * 4``, at least 10,000), so a slow flush is
   absorbed, while a tier outage makes steps wait (backpressure) after
   ``max_pending_rows / (2 R)`` seconds instead of memory growing without bound.

Exit status: 0 when every tier's requirement can be met, 1 when one cannot (the
advice is still printed) or the results file is unreadable, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict
from typing import Any

from hotstate._cli._output import fail, print_json
from hotstate._cli._tuning import (
    TIERS,
    Recommendation,
    TierAdvice,
    advise,
    load_measurements,
)
from hotstate._errors import ConfigError
from hotstate._validate import number

__all__ = ["register", "run_command"]


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``hotstate advise`` to the command line.

    Args:
        subparsers: the ``hotstate`` sub-command set.
    """
    parser = subparsers.add_parser(
        "advise",
        help="recommend a flush policy per tier from benchmark results",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--updates-per-second",
        type=_float,
        required=True,
        metavar="R",
        help="expected snapshot updates (steps) per second, > 0",
    )
    parser.add_argument(
        "--max-loss",
        type=_float,
        required=True,
        metavar="SECONDS",
        help="seconds of work a crash may lose, >= 0 (0: write-through)",
    )
    parser.add_argument(
        "--results",
        metavar="PATH",
        default=None,
        help="benchmark results JSON (default: the latest `hotstate bench` results)",
    )
    parser.add_argument(
        "--tier",
        action="append",
        choices=TIERS,
        default=None,
        help="advise on this tier only (repeatable; default: both)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(func=run_command)


def _as_data(rec: Recommendation) -> dict[str, Any]:
    def tier(t: TierAdvice) -> dict[str, Any]:
        return {
            "tier": t.tier,
            "policy": asdict(t.policy),
            "code": t.code,
            "feasible": t.feasible,
            "loss_window": t.loss_window if math.isfinite(t.loss_window) else None,
            "reasons": list(t.reasons),
            "warnings": list(t.warnings),
        }

    return {
        "updates_per_second": rec.updates_per_second,
        "max_loss": rec.max_loss,
        "source": rec.source,
        "notes": list(rec.notes),
        "feasible": rec.feasible,
        "tiers": [tier(t) for t in rec.tiers],
    }


def _print(rec: Recommendation) -> None:
    print(f"advice for {rec.updates_per_second:,.6g} updates/s, max loss {rec.max_loss:g} s")
    print(f"figures: {rec.source}")
    for note in rec.notes:
        print(f"  note: {note}")
    for t in rec.tiers:
        print(f"\n{t.tier}:{'' if t.feasible else '  (requirement NOT met)'}")
        print(f"    {t.code}")
        for reason in t.reasons:
            print(f"  - {reason}")
        for warning in t.warnings:
            print(f"  ! {warning}")


def run_command(args: argparse.Namespace) -> int:
    """Run ``hotstate advise``.

    Args:
        args: the parsed arguments.

    Returns:
        0 when every tier's requirement can be met, 1 when one cannot or the
        results are unreadable, 2 on bad arguments.
    """
    tiers = tuple(dict.fromkeys(args.tier)) if args.tier else TIERS
    try:
        # Arguments first, so a bad number is a usage error whatever the results.
        number("--updates-per-second", args.updates_per_second, strict=True)
        number("--max-loss", args.max_loss)
    except ConfigError as exc:
        return fail(f"advise: {exc}", status=2)
    try:
        measurements = load_measurements(args.results)
    except (ConfigError, OSError) as exc:
        return fail(f"advise: {exc}", status=1)
    rec = advise(
        updates_per_second=args.updates_per_second,
        max_loss=args.max_loss,
        measurements=measurements,
        tiers=tiers,
    )
    if args.json:
        print_json(_as_data(rec))
    else:
        _print(rec)
    if not rec.feasible:
        missed = ", ".join(t.tier for t in rec.tiers if not t.feasible)
        return fail(f"advise: the requirement cannot be met on {missed}; see the warnings")
    return 0
