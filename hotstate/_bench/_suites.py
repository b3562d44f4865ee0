"""The benchmark suites behind ``hotstate bench``; ``run_bench(BenchOptions)`` runs them.

The command line (``hotstate._cli._bench``, whose docstring is the user's
description) builds the options. Each suite prints its figures as it goes,
each beside a ceiling measured in the same process; ``run_bench`` then prints
the summary table and writes the JSON (and, after the sweep, the tuning plot).
"""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hotstate import run
from hotstate._bench import _persist as persist, _pgflush as pgflush, _scale as scale, _w1 as w1
from hotstate._bench._policy import POLICIES, Policy, postgres_schema
from hotstate._bench._progress import Progress
from hotstate._bench._results import results_dir
from hotstate._bench._table import render_table
from hotstate.persistence import EmbeddedValkey, SQLiteStore, ValkeyStore
from hotstate.persistence._postgres_server import EmbeddedPostgres, PostgresServerError
from hotstate.runtime._loop import uvloop_available

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from hotstate._bench._reliability import GuaranteesReport
    from hotstate._bench._sweep import SweepPoint

SUITES = ("w1", "policies", "flush", "recovery", "memory", "scale", "sweep", "reliability", "ownership")
"""Every suite, in the order they run."""
DEFAULT_SUITES = SUITES[:-2]
"""Run by default: all but ``reliability`` (200 SIGKILL trials per policy, then 200 per #10
guarantee scenario and acknowledging policy: about 15 minutes on 2 cores, 4 of them the guarantees)
and ``ownership`` (worker processes killed, paused and redeployed: several minutes)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class BenchOptions:
    """What one ``hotstate bench`` runs (the command line, ``hotstate._cli._bench``, validates it)."""

    suites: tuple[str, ...] = DEFAULT_SUITES  # from SUITES
    n: int = 10_000  # W1 runs started concurrently
    k: int = 10  # W1 steps per run
    rounds: int = 5  # rounds per figure; medians are reported
    sizes: tuple[int, ...] = (1000, 10_000)  # N values of the policies suite
    flush_rows: int = 20_000  # dirty runs per flush in the flush suite
    recovery_runs: int = 100_000  # unfinished runs to recover
    idle_runs: int = 100_000  # idle runs for the memory suite
    scale_sizes: tuple[int, ...] = (1000, 10_000, 100_000, 1_000_000)  # N values of the scale curve, ascending
    # SIGKILL trials per policy in the reliability suite, and per #10 guarantee
    # (per acknowledging policy, lineage, crash loop); None: 200, 3 when quick.
    trials: int | None = None
    valkey_url: str | None = None  # an existing Valkey server (None: a private embedded one)
    postgres_url: str | None = None  # an existing PostgreSQL server (None: a private embedded one, if it can be had)
    sqlite: str | None = None  # put the SQLite databases in this path's folder (None: a temporary folder)
    quick: bool = False  # the sweep's short list of intervals and fewer SIGKILL trials
    json: str | None = None  # where to write the figures (None: results_dir() / "latest.json")
    use_uvloop: bool = True  # run on uvloop when it is installed


@dataclass
class Bench:
    """What the suites share: options, the server URLs, a scratch folder and the results."""

    opts: BenchOptions
    url: str | None
    scratch: Path
    postgres_url: str | None = None
    no_postgres: str = ""  # why there is no PostgreSQL server (its figures are skipped)
    figures: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    plot_points: list[SweepPoint] = field(default_factory=list)  # plotted once the run is over

    def db(self, name: str) -> Path:
        """A fresh SQLite path in the scratch folder."""
        return self.scratch / f"{name}-{time.monotonic_ns()}.db"

    def figure(
        self,
        name: str,
        value: float,
        unit: str,
        ceiling_name: str = "",
        ceiling: float = 0.0,
        *,
        target: str = "",
        met: bool | None = None,
    ) -> dict[str, Any]:
        """Record and print one figure (with its ratio to ``ceiling`` when given)."""
        ratio = value / ceiling if ceiling else None
        shown = f"{ceiling:,.0f}" if ceiling >= 100 else f"{ceiling:.3g}"  # a ceiling in us is below 1
        tail = f"{ratio:>7.2f}x  of {ceiling_name} ({shown})" if ratio is not None else ""
        check = "" if met is None else f"  [{'met' if met else 'MISSED'}: {target}]"
        print(f"  {name:<48}{value:>14,.1f} {unit:<12}{tail}{check}", flush=True)
        record = {
            "name": name,
            "value": value,
            "unit": unit,
            "ceiling_name": ceiling_name,
            "ceiling": ceiling,
            "ratio": ratio,
            "target": target,
            "met": met,
        }
        self.figures.append(record)
        return record

    def skip(self, name: str, reason: str) -> None:
        """Record and print a figure that could not be measured, and why."""
        print(f"  {name:<48}{'skipped':>14}  ({reason})", flush=True)
        self.skipped.append({"name": name, "reason": reason})


async def _rounds(label: str, rounds: int, fn: Callable[[], Awaitable[float]]) -> float:
    """Median of ``rounds`` calls of ``fn``, with a progress bar."""
    values = []
    with Progress(label, rounds) as bar:
        for _ in range(rounds):
            values.append(await fn())
            bar.advance()
    return statistics.median(values)


async def suite_w1(b: Bench) -> None:
    """W1 memory-only against the bare asyncio loop."""
    a = b.opts
    print(f"\nW1: N={a.n:,} runs x K={a.k} steps, memory-only vs bare asyncio (median of {a.rounds})")
    with Progress("W1 memory-only", 1) as bar:
        r = await w1.measure(a.n, a.k, a.rounds)
        bar.advance()
    b.figure("bare asyncio loop, sleep(0) per step", r.ceiling_steps_s, "steps/s")
    b.figure(
        "hotstate memory-only",
        r.hotstate_steps_s,
        "steps/s",
        "bare loop",
        r.ceiling_steps_s,
        target=">= 1.0x bare loop",
        met=r.ratio >= 1.0,
    )


FIGURE_POLICIES: dict[str, Policy | None] = {
    "memory-only": None,
    "write-behind valkey 10 ms + sqlite 1 s": POLICIES["write-behind"],
    "write-behind sqlite 100 ms": POLICIES["sqlite-behind"],
    "write-through sqlite FULL, group commit": POLICIES["write-through sqlite"],
    "write-through valkey": POLICIES["write-through valkey"],
    "write-behind postgres 100 ms": POLICIES["postgres-behind"],
    "write-behind valkey 10 ms + postgres 1 s": POLICIES["write-behind postgres"],
    "write-through postgres, group commit": POLICIES["write-through postgres"],
}
"""The policies suite's figure labels and their policies (None: memory-only)."""


def _uses_postgres(policy: Policy | None) -> bool:
    return policy is not None and any(t.kind == "postgres" for t in policy.tiers)


async def _policy_run(b: Bench, policy: Policy | None, n: int) -> float:
    """W1 steps/s under ``policy``, on new stores; the keys and schema it wrote are deleted after."""
    url = _need_url(b)
    tag = f"{n}-{time.monotonic_ns()}"
    prefix = f"bench-{tag}"
    tiers = (
        policy.build_tiers(sqlite=b.db(tag), valkey_url=url, prefix=prefix, postgres_url=b.postgres_url)
        if policy
        else []
    )
    try:
        return await w1.hotstate_run(n, b.opts.k, tiers=tiers)
    finally:  # leave the servers as we found them
        await persist.drop_prefix(url, prefix)
        if b.postgres_url is not None and _uses_postgres(policy):
            await persist.drop_schema(b.postgres_url, postgres_schema(prefix))


async def suite_policies(b: Bench) -> None:
    """W1 across flush policies, with the raw SQLite and Valkey ceilings."""
    url = _need_url(b)
    k = b.opts.k
    body = persist.body_size()
    # Warm-up, untimed: without it the first runtime (memory-only, the ratios' base) paid the
    # first calls' costs, and read 339,331 steps/s at N=1,000 against write-behind SQLite's 513,917.
    await w1.hotstate_run(min(b.opts.sizes), k)
    for n in b.opts.sizes:
        rounds = max(1, b.opts.rounds - 2)
        print(f"\nW1 across flush policies: N={n:,} x K={k} (median of {rounds}); steps/s until every run is done")
        ceiling = await _rounds("bare loop", rounds, partial(w1.ceiling, n, k))
        b.figure(f"bare asyncio loop (N={n:,})", ceiling, "steps/s")
        raw_sql = await _rounds("raw aiosqlite", rounds, lambda: persist.raw_sqlite_upsert(b.db("raw"), n * k, body))  # noqa: B023
        b.figure(f"raw aiosqlite, {n * k:,} snapshot+transition rows", raw_sql, "rows/s")
        raw_vk = await _rounds("raw valkey MSET", rounds, partial(persist.raw_valkey_mset, url, n * k, body))
        b.figure(f"raw valkey MSET x1000, {n * k:,} snapshot+transition", raw_vk, "rows/s")
        memory = 0.0
        for name, policy in FIGURE_POLICIES.items():
            label = f"{name} (N={n:,})"
            if _uses_postgres(policy) and b.postgres_url is None:
                b.skip(label, b.no_postgres)
                continue
            value = await _rounds(name, rounds, partial(_policy_run, b, policy, n))
            if name == "memory-only":
                memory = value
                b.figure(label, value, "steps/s", "bare loop", ceiling)
            elif "through sqlite" in name:
                b.figure(
                    label,
                    value,
                    "steps/s",
                    "raw sqlite rows/s",
                    raw_sql,
                    target=">= 30,000 steps/s at N=1,000",
                    met=value >= 30_000 if n == 1000 else None,
                )
            elif "through valkey" in name:
                b.figure(label, value, "steps/s", "raw valkey keys/s", raw_vk)
            elif _uses_postgres(policy):  # no target is set for PostgreSQL yet: the ratio shows what the tier costs
                b.figure(label, value, "steps/s", "memory-only", memory)
            else:
                b.figure(
                    label,
                    value,
                    "steps/s",
                    "memory-only",
                    memory,
                    target=">= 0.8x memory-only",
                    met=value >= 0.8 * memory,
                )


async def suite_flush(b: Bench) -> None:
    """Per-snapshot codec cost, then sustained flush throughput per tier against its raw ceiling."""
    url = _need_url(b)
    n = b.opts.flush_rows
    body = persist.body_size()
    rounds = max(3, b.opts.rounds - 2)
    print(f"\nCodec: us per W1 snapshot, {n:,} snapshots (median of {rounds}); the check covers the whole envelope")
    with Progress("codec costs", 1) as bar:
        costs = persist.codec_costs(n, rounds)
        bar.advance()
    raw_encode, raw_decode = costs.pop("raw msgspec")
    b.figure("raw msgspec encode (body only)", raw_encode, "us")
    b.figure("raw msgspec decode (body only)", raw_decode, "us")
    for name, (encode_us, decode_us) in costs.items():
        b.figure(f"encode + tag, {name}", encode_us, "us", "raw encode", raw_encode)
        b.figure(f"check + decode, {name}", decode_us, "us", "raw decode", raw_decode)
    print(f"\nSustained flush throughput: {n:,} dirty runs per flush, {body} B bodies (median of {rounds})")
    raw_sql = await _rounds("raw aiosqlite", rounds, lambda: persist.raw_sqlite_upsert(b.db("raw"), n, body))
    with Progress("persister -> sqlite", 1) as bar:
        async with SQLiteStore(b.db("flush")) as store:
            sql = await persist.sustained_flush(store, n, rounds)
        bar.advance()
    b.figure(
        "persister -> sqlite",
        sql,
        "snapshots/s",
        "raw aiosqlite, same rows",
        raw_sql,
        target=">= 0.6x raw",
        met=sql >= 0.6 * raw_sql,
    )
    raw_vk = await _rounds("raw valkey MSET", rounds, lambda: persist.raw_valkey_mset(url, n, body))
    prefix = f"bench-flush-{time.monotonic_ns()}"
    with Progress("persister -> valkey", 1) as bar:
        try:
            async with ValkeyStore(url, prefix=prefix) as vstore:
                vk = await persist.sustained_flush(vstore, n, rounds)
        finally:
            await persist.drop_prefix(url, prefix)
        bar.advance()
    b.figure(
        "persister -> valkey",
        vk,
        "snapshots/s",
        "raw valkey MSET, same keys",
        raw_vk,
        target=">= 0.6x raw",
        met=vk >= 0.6 * raw_vk,
    )
    await pgflush.flush_postgres(b, n, body, rounds)


async def suite_recovery(b: Bench) -> None:
    """Recovery time of unfinished runs from SQLite."""
    n = b.opts.recovery_runs
    rounds = max(1, b.opts.rounds - 2)
    print(f"\nRecovery: {n:,} unfinished runs from SQLite into a new runtime (median of {rounds})")
    with Progress("recovery", 1) as bar:
        seconds, resumed = await persist.recovery_time(b.db("recovery"), n, rounds)
        bar.advance()
    if resumed != n:
        raise RuntimeError(f"recovery resumed {resumed} of {n} runs")
    target = n == 100_000
    b.figure(
        f"recovery time, {n:,} runs (ms)",
        seconds * 1000,
        "ms",
        target="<= 2 s for 100,000 runs" if target else "",
        met=seconds <= 2.0 if target else None,
    )
    b.figure("recovered runs per second", n / seconds, "runs/s")


async def suite_memory(b: Bench) -> None:
    """Memory per idle run (parked on a signal wait)."""
    n = b.opts.idle_runs
    print(f"\nMemory per idle run: {n:,} runs waiting for a signal, payload None (RSS growth / runs)")
    with Progress("idle runs", 1) as bar:
        r = await scale.idle_memory(n)
        bar.advance()
    b.figure(f"memory per idle run (N={n:,})", r.bytes_per_run, "bytes", target="<= 1 KiB", met=r.within_target)
    b.figure(f"spawn rate, idle runs (N={n:,})", n / r.spawn_seconds, "runs/s")


async def suite_scale(b: Bench) -> None:
    """W1 steps/s and memory per run from the smallest to the largest population."""
    sizes = b.opts.scale_sizes
    rounds = max(1, b.opts.rounds - 2)
    print(
        f"\nScale curve: W1 K={b.opts.k} at N = {', '.join(f'{s:,}' for s in sizes)} (median of {rounds}; 1 above 500k)"
    )
    with Progress("scale curve", len(sizes)) as bar:
        points = await scale.scale_curve(sizes, b.opts.k, rounds, bar.update)
    base, base_ceiling = points[0].steps_per_s, points[0].ceiling_steps_per_s
    for p in points:
        last = p is points[-1] and p.runs >= 1_000_000
        b.figure(
            f"bare asyncio loop at N={p.runs:,}",
            p.ceiling_steps_per_s,
            "steps/s",
            f"bare loop at N={points[0].runs:,}",
            base_ceiling,
        )
        b.figure(
            f"W1 steps/s at N={p.runs:,}",
            p.steps_per_s,
            "steps/s",
            f"N={points[0].runs:,}",
            base,
            target=f">= {scale.SCALE_TARGET_RATIO}x at N=1,000" if last else "",
            met=p.steps_per_s >= scale.SCALE_TARGET_RATIO * base if last else None,
        )
        b.figure(
            f"W1 at N={p.runs:,} against the bare loop at N={p.runs:,}",
            p.steps_per_s,
            "steps/s",
            "bare loop, same N",
            p.ceiling_steps_per_s,
        )
        if p.runs >= 100_000:  # below that, RSS pages and allocator reuse drown the signal
            b.figure(f"memory per W1 run at N={p.runs:,} ({p.payload_bytes} B payload)", p.bytes_per_run, "bytes")
    b.extra["scale"] = [
        {
            "runs": p.runs,
            "steps_per_s": p.steps_per_s,
            "bytes_per_run": p.bytes_per_run,
            "payload_bytes": p.payload_bytes,
            "ceiling_steps_per_s": p.ceiling_steps_per_s,
        }
        for p in points
    ]


async def suite_sweep(b: Bench) -> None:
    """Throughput against the measured loss window, per tier and flush interval (SIGKILL trials)."""
    from hotstate._bench import _sweep
    from hotstate._bench._crash import saturated_bound

    url = _need_url(b)
    print(
        "\nFlush-interval sweep: per tier and interval, steps/s of a child and the loss window "
        "measured by SIGKILLing it (target: window <= interval + one flush)"
    )
    with Progress("sweep", 1) as bar:
        points = await _sweep.run_sweep(
            valkey_url=url, workdir=b.scratch, quick=b.opts.quick, use_uvloop=b.opts.use_uvloop, progress=bar.update
        )
    for p in points:
        b.figure(f"sweep {p.label}: steps/s", p.steps_per_s, "steps/s")
        b.figure(
            f"sweep {p.label}: max loss window (ms)",
            p.loss_window_max * 1000,
            "ms",
            target=f"<= interval + flush ({(p.interval + p.flush_duration) * 1000:.0f} ms)",
            met=p.within_target,
        )
        if not p.within_target:
            bound = saturated_bound(p.interval, p.flush_duration)
            b.figure(
                f"sweep {p.label}: flush outlasts the interval",
                p.loss_window_max * 1000,
                "ms",
                target=f"<= max(interval, flush) + flush ({bound * 1000:.0f} ms)",
                met=p.within_saturated_bound,
            )
    b.extra["sweep"] = _sweep.to_json(points)
    b.plot_points = points


async def suite_reliability(b: Bench) -> None:
    """SIGKILL trials per flush policy with every invariant checked, then the #10 guarantees' trials."""
    from hotstate._bench import _reliability

    url = _need_url(b)
    trials = b.opts.trials or (_reliability.QUICK_TRIALS if b.opts.quick else _reliability.DEFAULT_TRIALS)
    print(f"\nReliability: {trials} SIGKILL trials per policy (mixed workload: signals, retries, compensations)")
    with Progress("reliability", 1) as bar:
        report = await _reliability.run_reliability(
            valkey_url=url, workdir=b.scratch, trials=trials, use_uvloop=b.opts.use_uvloop, progress=bar.update
        )
    for p in report.policies:
        b.figure(
            f"{p.policy}: invariant violations in {p.trials} trials",
            p.invariant_violations,
            "violations",
            target="0",
            met=p.invariant_violations == 0,
        )
        b.figure(f"{p.policy}: runs checked", p.runs_checked, "runs")
        if p.write_through:
            b.figure(
                f"{p.policy}: acknowledged steps lost",
                p.acknowledged_steps_lost,
                "steps",
                target="0",
                met=p.acknowledged_steps_lost == 0,
            )
        b.figure(
            f"{p.policy}: max loss window (ms)",
            p.max_loss_window * 1000,
            "ms",
            target=f"<= interval + flush in every trial ({p.trials_within_window}/{p.trials})",
            met=p.trials_within_window == p.trials,
        )
        b.figure(
            f"{p.policy}: trials within max(interval, flush) + flush",
            p.trials_within_saturated_window,
            "trials",
            target=f"all {p.trials}",
            met=p.trials_within_saturated_window == p.trials,
        )
    print(
        f"\n#10 guarantees: {trials} SIGKILL trials per acknowledging policy (the calls in turn), "
        f"{trials} lineage trials, {trials} crash-loop trials; two at a time"
    )
    with Progress("guarantees", 1) as bar:
        kept = await _reliability.run_guarantees(valkey_url=url, workdir=b.scratch, trials=trials, progress=bar.update)
    print(f"  {len(kept.results)} trials in {kept.seconds:.0f} s", flush=True)
    _guarantee_figures(b, kept)
    b.extra["reliability"] = {
        **report.to_json(),
        "violations": report.violations + kept.violations,  # the suite's pass figure: 0
        "guarantees": kept.to_json(),
    }


def _guarantee_figures(b: Bench, report: GuaranteesReport) -> None:
    """Per scenario (and per acknowledging policy and call): violations, target 0, and runs checked."""
    from hotstate._bench._guarantees import CRASH_LIMIT

    for s in report.scenarios:
        label = {
            "ack": f"ack, {s.policy}",
            "lineage": f"lineage, {s.policy}, SIGKILL before sqlite's flush",
            "crash-loop": f"crash loop, {s.policy}, crash_limit {CRASH_LIMIT}",
        }[s.scenario]
        print(f"  {label}: {s.trials} trials, {s.starts} child processes, {s.seconds:.1f} s of trials", flush=True)
        b.figure(
            f"{label}: violations in {s.trials} trials", s.violations, "violations", target="0", met=s.violations == 0
        )
        b.figure(f"{label}: runs checked", s.runs_checked, "runs")
        for call, c in s.calls.items():
            b.figure(
                f"{label}, {call}: violations in {c.trials} trials",
                c.violations,
                "violations",
                target="0",
                met=c.violations == 0,
            )


async def suite_ownership(b: Bench) -> None:
    """Several processes on one store: takeover after SIGKILL, duplicates per fault, throughput, cost per step."""
    from hotstate._bench import _ownership

    await _ownership.run_suite(b)


SUITE_FUNCTIONS: dict[str, Callable[[Bench], Awaitable[None]]] = {
    "w1": suite_w1,
    "policies": suite_policies,
    "flush": suite_flush,
    "recovery": suite_recovery,
    "memory": suite_memory,
    "scale": suite_scale,
    "sweep": suite_sweep,
    "reliability": suite_reliability,
    "ownership": suite_ownership,
}
NEEDS_VALKEY = frozenset({"policies", "flush", "sweep", "reliability"})
NEEDS_POSTGRES = frozenset({"policies", "flush"})


def _need_url(b: Bench) -> str:
    if b.url is None:  # pragma: no cover - run_bench starts a server for these suites
        raise RuntimeError("this suite needs a Valkey server")
    return b.url


async def main_async(b: Bench) -> None:
    """Run the chosen suites in order."""
    for name in SUITES:
        if name in b.opts.suites:
            await SUITE_FUNCTIONS[name](b)


def _summary(figures: list[dict[str, Any]], skipped: list[dict[str, str]]) -> str:
    rows: list[tuple[object, ...]] = [
        (
            f["name"],
            round(f["value"], 1),
            f["unit"],
            f"{f['ratio']:.2f}x {f['ceiling_name']}" if f["ratio"] is not None else "",
            "" if f["met"] is None else ("met" if f["met"] else "MISSED") + f" ({f['target']})",
        )
        for f in figures
    ]
    rows.extend((s["name"], None, "", "", "skipped (see below)") for s in skipped)
    table = render_table(["figure", "value", "unit", "ratio to ceiling", "target"], rows)
    reasons = dict.fromkeys(s["reason"] for s in skipped)
    return table + "".join(f"\nskipped: {reason}" for reason in reasons)


def _start_postgres() -> tuple[EmbeddedPostgres | None, str]:
    """A private PostgreSQL (fsync on, as SQLite's write-through syncs), or None and why not."""
    server = EmbeddedPostgres(fsync=True)
    try:
        server.start()
    except (PostgresServerError, OSError, subprocess.SubprocessError) as exc:
        server.stop()
        return None, f"no PostgreSQL server: {exc}"
    except BaseException:  # Ctrl-C while it starts: leave nothing behind
        server.stop()
        raise
    return server, ""


def run_bench(opts: BenchOptions) -> int:
    """Run the chosen suites, print the summary, write the JSON (and the tuning plot); returns 0."""
    loop = "uvloop" if uvloop_available() and opts.use_uvloop else "asyncio"
    print(
        f"hotstate benchmarks on {loop}, CPython {platform.python_version()}, {platform.machine()}, "
        f"suites: {', '.join(opts.suites)}"
    )
    if opts.sqlite:
        where = Path(opts.sqlite)
        scratch = where if where.is_dir() else where.parent
        scratch.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix="hotstate-bench-", dir=scratch))
    else:
        scratch = Path(tempfile.mkdtemp(prefix="hotstate-bench-"))
    server = None
    pg_server = None
    url = opts.valkey_url
    pg_url, no_postgres = opts.postgres_url, ""
    started = time.perf_counter()
    try:
        if pg_url is None and NEEDS_POSTGRES & set(opts.suites):  # first: interrupted later, both stop
            pg_server, no_postgres = _start_postgres()
            if pg_server is not None:
                pg_url = pg_server.url
                print(f"private PostgreSQL at {pg_url} (pid {pg_server.pid})")
            else:
                print(f"{no_postgres}; the PostgreSQL figures are skipped")
        if url is None and NEEDS_VALKEY & set(opts.suites):
            server = EmbeddedValkey().start()
            url = server.url
            print(f"private valkey-server at {url} (pid {server.pid})")
        bench = Bench(opts, url, scratch, postgres_url=pg_url, no_postgres=no_postgres)
        run(main_async, bench, use_uvloop=opts.use_uvloop)
    finally:  # also on Ctrl-C: never leave a server behind
        if server is not None:
            server.stop()
        if pg_server is not None:
            pg_server.stop()
    elapsed = time.perf_counter() - started
    print(f"\nSummary ({elapsed:.0f} s)\n" + _summary(bench.figures, bench.skipped))
    path = Path(opts.json) if opts.json else results_dir() / "latest.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "loop": loop,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "quick": opts.quick,
        "seconds": elapsed,
        "figures": bench.figures,
        "skipped": bench.skipped,
        **bench.extra,
    }
    path.write_text(json.dumps(document, indent=2))
    print(f"\nfigures written to {path}")
    if bench.plot_points:
        from hotstate._bench._plot import plot_tuning

        png = plot_tuning(bench.plot_points, path.with_name("tuning.png"))
        print(f"tuning curve (steps/s against the measured loss window) plotted to {png}")
    missed = [f["name"] for f in bench.figures if f["met"] is False]
    if missed:
        print(f"targets missed: {len(missed)} (see the summary)")
    return 0
