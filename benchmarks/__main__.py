"""Run the benchmarks: ``python -m benchmarks [--n N] [--k K] [--rounds R]``."""

from __future__ import annotations

import argparse
import platform
import sys

from benchmarks import w1
from hotstate import run
from hotstate.runtime import uvloop_available


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--n", type=int, default=10_000, help="runs started concurrently")
    parser.add_argument("--k", type=int, default=10, help="steps per run")
    parser.add_argument("--rounds", type=int, default=5, help="rounds; medians are reported")
    parser.add_argument("--no-uvloop", action="store_true", help="plain asyncio instead of uvloop")
    args = parser.parse_args(argv)
    loop = "uvloop" if uvloop_available() and not args.no_uvloop else "asyncio"
    print(f"hotstate W1 on {loop}, CPython {platform.python_version()}, {platform.machine()}")
    print(f"N={args.n:,} runs x K={args.k} steps, median of {args.rounds} rounds\n")
    r = run(w1.measure, args.n, args.k, args.rounds, use_uvloop=not args.no_uvloop)
    print(f"{'workload':<34}{'steps/s':>14}{'vs ceiling':>12}")
    print(f"{'ceiling: bare asyncio, sleep(0)':<34}{r.ceiling_steps_s:>14,.0f}{1.0:>11.2f}x")
    print(f"{'hotstate memory-only':<34}{r.hotstate_steps_s:>14,.0f}{r.ratio:>11.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
