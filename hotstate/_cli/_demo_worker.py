"""The worker process of ``hotstate demo``: one ``Runtime`` running the order lifecycle.

``python -m hotstate._cli._demo_worker --gen G ...`` (started by ``hotstate demo``,
never by hand). Generation 1 takes orders as they arrive; generation 2 starts
with ``recover=True`` after the parent SIGKILLed generation 1. Both drive the
orders themselves: simulated payment, warehouse and carrier systems send each
waiting order its next signal after a random delay.

It talks to the parent in JSON lines on stdout (``progress`` every
``--report-interval``, ``recovered`` once, ``finished`` at the end) and records
every side effect, with its idempotency key, in an append-only ledger file, so
the parent can see which steps ran again after the crash. Nothing it writes
needs a clean exit: it can be killed at any moment.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import anyio

from hotstate import FlushPolicy, Runtime, Tier, run
from hotstate._cli._orders import new_order, next_signal, order_workflow, where
from hotstate.persistence import SQLiteStore, ValkeyStore

if TYPE_CHECKING:
    from hotstate import StepContext, Workflow
    from hotstate.persistence import Store

__all__ = ["main", "order_ids", "order_payload"]

_TICK = 0.01
_WAIT_RANGES = {"payment_confirmed": (0.2, 1.2), "shipped": (0.2, 1.5), "delivered": (0.2, 1.2)}


def order_ids(tag: str, orders: int) -> list[str]:
    """The run ids of one demo's orders.

    Args:
        tag: the demo's unique tag.
        orders: how many orders.

    Returns:
        ``["{tag}-order-0000", ...]``.
    """
    return [f"{tag}-order-{i:04d}" for i in range(orders)]


def order_payload(index: int, fail_index: int) -> dict[str, Any]:
    """Order ``index``'s initial payload: every tenth meets one carrier outage; ``fail_index`` is undeliverable.

    Args:
        index: the order's number.
        fail_index: the number of the order designed to fail for good.

    Returns:
        The payload.
    """
    address = "nowhere" if index == fail_index else f"{index} Main St"
    return new_order(f"item-{index % 7}", address, amount=10 + index % 90, carrier_outages=int(index % 10 == 3))


class _Ledger:
    """The outside world's record of side effects: one JSON line per effect, written at once."""

    def __init__(self, path: Path, gen: int) -> None:
        self._file: TextIO = path.open("a", buffering=1, encoding="utf-8")
        self._gen = gen

    def record(self, effect: str, ctx: StepContext, order: dict[str, Any]) -> None:
        line = {"k": ctx.idempotency_key, "e": effect, "run": ctx.run_id, "g": self._gen, "t": time.time()}
        self._file.write(json.dumps(line) + "\n")

    def close(self) -> None:
        self._file.close()


def _emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def _progress(rt: Runtime, wf: Workflow, ids: list[str], gen: int, started: float) -> dict[str, Any]:
    table: Counter[str] = Counter()
    versions: list[int] = []
    acked: list[int] = []
    steps: list[int] = []
    for rid in ids:
        try:
            snap = rt.get(rid)
        except LookupError:
            versions.append(0)
            acked.append(0)
            steps.append(0)
            continue
        table[f"{where(wf, snap)}|{snap.status}"] += 1
        versions.append(snap.version)
        steps.append(snap.step)
        durable = rt.durable_versions(rid)
        acked.append(max(v for k, v in durable.items() if k != "hot"))
    stats = rt.statistics()
    tiers = [{"tier": t.tier, "lag": t.lag, "flushes": t.flushes, "last_flush_duration": t.last_flush_duration,
              "max_flush_duration": t.max_flush_duration, "pending": t.pending_snapshots} for t in stats.tiers]
    return {"gen": gen, "t": time.monotonic() - started, "table": dict(table), "v": versions, "acked": acked,
            "step": steps, "tiers": tiers, "retries": stats.supervisor.retries,
            "transitions": stats.transitions}


class _Driver:
    """The payment provider, warehouse and carrier: each sends a waiting order its signal after a delay."""

    def __init__(self, rt: Runtime, wf: Workflow, ids: list[str], rng: random.Random, pace: float) -> None:
        self.rt = rt
        self.wf = wf
        self.ids = ids
        self.rng = rng
        self.pace = pace
        self.due: dict[tuple[str, str], float] = {}
        self.spawned: set[str] = set()

    def finished(self) -> bool:
        rt = self.rt
        return all(rid in self.spawned and rt.get(rid).finished for rid in self.ids)

    async def tick(self) -> None:
        now = time.monotonic()
        for rid in self.ids:
            if rid not in self.spawned:
                continue
            snap = self.rt.get(rid)
            signal = next_signal(self.wf, snap)
            if signal is None:
                continue
            due = self.due.get((rid, signal))
            if due is None:
                lo, hi = _WAIT_RANGES[signal]
                self.due[(rid, signal)] = now + self.rng.uniform(lo, hi) * self.pace
            elif now >= due:
                await self.rt.send(rid, signal, {"amount": snap.payload["amount"]} if signal == "payment_confirmed" else None)


async def _report_loop(rt: Runtime, wf: Workflow, ids: list[str], gen: int, started: float, every: float) -> None:
    while True:
        _emit("progress", **_progress(rt, wf, ids, gen, started))
        await anyio.sleep(every)


def _recovered(rt: Runtime, ids: list[str]) -> dict[str, Any]:
    """What recovery brought back, read before any resumed step runs."""
    report = rt.recovery_report
    assert report is not None  # noqa: S101 - recover=True sets it
    mine = set(ids)
    resumed = {r.run_id: r for r in report.resumed if r.run_id in mine}
    durable_v = [resumed[rid].version if rid in resumed else 0 for rid in ids]
    durable_step = [rt.get(rid).step if rid in resumed else 0 for rid in ids]
    # Dead-lettered runs come back with their letter (finished, not resumed):
    # their letter's version is what was durable.
    letters = {d.run_id: d.snapshot for d in rt.dead_letters() if d.run_id in mine}
    for i, rid in enumerate(ids):
        if rid in letters:
            durable_v[i], durable_step[i] = letters[rid].version, letters[rid].step
    by_tier = Counter(r.tier for r in resumed.values())
    return {"resumed": len(resumed), "by_tier": dict(by_tier), "corrupt": len(report.corrupt),
            "lost": len(report.lost), "unregistered": len(report.unregistered), "seconds": report.seconds,
            "durable_v": durable_v, "durable_step": durable_step, "already_finished": len(letters),
            "respawned": 0}


async def _spawn_all(rt: Runtime, wf: Workflow, ids: list[str], driver: _Driver, args: argparse.Namespace,
                     recovered: dict[str, Any] | None) -> None:
    """Generation 1: orders arrive over ``--arrivals`` seconds. Later: every order not in memory, now.

    ``spawn`` is idempotent on the run id, so an order a store holds (finished
    ones too) comes back as it was, and only orders no tier ever saw start anew.
    """
    spread = args.arrivals * args.pace if args.gen == 1 else 0.0
    started = time.monotonic()
    for i, rid in enumerate(ids):
        delay = started + spread * i / max(1, len(ids)) - time.monotonic()
        if delay > 0:
            await anyio.sleep(delay)
        known = rid in driver.spawned or _in_memory(rt, rid)
        await rt.spawn(wf, order_payload(i, args.fail_index), run_id=rid)
        driver.spawned.add(rid)
        if recovered is not None and not known:
            snap = rt.get(rid)
            if snap.finished:  # finished in a store before the crash: not resumed, but durable
                recovered["durable_v"][i] = snap.version
                recovered["durable_step"][i] = snap.step
                recovered["already_finished"] += 1
            else:
                recovered["respawned"] += 1
    if recovered is not None:
        _emit("recovered", gen=args.gen, **recovered)


def _in_memory(rt: Runtime, rid: str) -> bool:
    try:
        rt.get(rid)
    except LookupError:
        return False
    return True


async def _dead_letters(stores: list[Store], ids: list[str]) -> list[str]:
    mine = set(ids)
    found: set[str] = set()
    for store in stores:
        found.update(d.run_id for d in await store.dead_letters() if d.run_id in mine)
    return sorted(found)


async def main_async(args: argparse.Namespace) -> None:
    """Run one worker generation until every order has finished.

    Args:
        args: the parsed command line (see ``build_parser``).
    """
    ledger = _Ledger(Path(args.ledger), args.gen)
    wf = order_workflow(ledger.record)
    ids = order_ids(args.tag, args.orders)
    stores: list[Store] = [ValkeyStore(args.valkey_url, prefix=args.valkey_prefix), SQLiteStore(args.sqlite)]
    tiers = [Tier(stores[0], FlushPolicy(interval=args.valkey_interval)),
             Tier(stores[1], FlushPolicy(interval=args.sqlite_interval))]
    started = time.monotonic()
    try:
        async with Runtime([wf], tiers=tiers, recover=args.gen > 1) as rt:
            recovered = _recovered(rt, ids) if args.gen > 1 else None
            driver = _Driver(rt, wf, ids, random.Random(f"{args.seed}-{args.gen}"), args.pace)
            driver.spawned = {rid for rid in ids if _in_memory(rt, rid)}
            async with anyio.create_task_group() as tg:
                tg.start_soon(_report_loop, rt, wf, ids, args.gen, started, args.report_interval)
                tg.start_soon(_spawn_all, rt, wf, ids, driver, args, recovered)
                while not driver.finished():
                    await driver.tick()
                    await anyio.sleep(_TICK)
                tg.cancel_scope.cancel()
            await rt.flush()
            final = _progress(rt, wf, ids, args.gen, started)
            payloads = {rid: rt.get(rid).payload for rid in ids if rt.get(rid).status != "done"}
            dead = await _dead_letters(stores, ids)
            _emit("finished", **final, dead_letters=dead, not_delivered=payloads)
    finally:
        ledger.close()


def build_parser() -> argparse.ArgumentParser:
    """The worker's command line (all options are given by ``hotstate demo``)."""
    p = argparse.ArgumentParser(prog="python -m hotstate._cli._demo_worker")
    p.add_argument("--gen", type=int, required=True)
    p.add_argument("--tag", required=True)
    p.add_argument("--orders", type=int, required=True)
    p.add_argument("--fail-index", type=int, required=True)
    p.add_argument("--valkey-url", required=True)
    p.add_argument("--valkey-prefix", required=True)
    p.add_argument("--sqlite", required=True)
    p.add_argument("--ledger", required=True)
    p.add_argument("--valkey-interval", type=float, required=True)
    p.add_argument("--sqlite-interval", type=float, required=True)
    p.add_argument("--seed", default="0")
    p.add_argument("--pace", type=float, default=1.0)
    p.add_argument("--arrivals", type=float, default=3.0)
    p.add_argument("--report-interval", type=float, default=0.05)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run a worker; returns the exit status.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
        0 when every order finished.
    """
    run(main_async, build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
