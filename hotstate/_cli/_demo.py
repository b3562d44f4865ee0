"""``hotstate demo``: the order lifecycle through a SIGKILL and a recovery, watched live.

A view over one trial of the SIGKILL harness (``hotstate._bench``): a child
(``_bench/_child.py``) runs many orders (``_bench/_orders.py``) on Valkey +
SQLite with a write-behind policy. Partway through this command SIGKILLs it,
the harness's judge compares the trace the child left (what its memory held)
with what the tiers hold, and a second child starts with ``recover=True``
and finishes every order. The view draws the children's ``Progress`` as a live
table, reads the side-effect ledger both wrote to count the steps that ran
again, and checks the invariants.

Embedded defaults: a SQLite file in a temporary directory and a private
valkey-server (``EmbeddedValkey``), both removed at exit, Ctrl-C included.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TextIO

from hotstate._bench._child import Child, ChildConfig
from hotstate._bench._crash import Loss, judge
from hotstate._bench._orders import (
    Effect,
    Finished,
    Orders,
    Progress,
    Recovered,
    order_ids,
)
from hotstate._bench._policy import Policy
from hotstate._bench._table import render_table
from hotstate._cli._output import fail, print_json
from hotstate._errors import HotstateError
from hotstate.persistence import EmbeddedValkey
from hotstate.runtime import run

if TYPE_CHECKING:
    import argparse

__all__ = ["register", "run_command"]

_ROWS: Final = (
    ("place", "1 placing order"),
    ("confirm_payment", "2 awaiting payment"),
    ("ship", "3 awaiting shipment"),
    ("deliver", "4 awaiting delivery"),
    ("compensating", "compensating"),
    ("finished", "finished"),
)
_STATUSES: Final = ("pending", "running", "waiting", "retrying", "compensating", "done", "failed")
_FAIL_INDEX: Final = 7
_MIN_ORDERS: Final = 10
_DESCRIPTION: Final = (
    "Run the order lifecycle (placed -> payment confirmed -> shipped -> delivered) for many orders in a "
    "worker process, persisted write-behind to Valkey and SQLite. Partway through, SIGKILL the worker and "
    "start a new one that recovers and finishes every order; then show what the crash lost, that every "
    "order finished, and that the order designed to fail was compensated and dead-lettered. Exit status 0 "
    "only when all of that holds."
)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``demo`` subcommand.

    Args:
        subparsers: the ``hotstate`` subparsers.
    """
    p = subparsers.add_parser(
        "demo",
        help="order lifecycle demo: SIGKILL a worker mid-flight, recover, check what was lost",
        description=_DESCRIPTION,
    )
    p.add_argument("--orders", type=int, default=200, help="number of orders (default 200)")
    p.add_argument("--valkey-url", help="use this Valkey server (default: a private embedded one)")
    p.add_argument("--sqlite", type=Path, help="use this SQLite file (default: one in a temporary directory)")
    p.add_argument("--valkey-interval", type=float, default=0.1, help="Valkey write-behind interval, s (default 0.1)")
    p.add_argument("--sqlite-interval", type=float, default=1.0, help="SQLite write-behind interval, s (default 1.0)")
    p.add_argument(
        "--kill-at",
        type=float,
        default=0.4,
        help="SIGKILL the first worker once this fraction of orders is delivered (default 0.4)",
    )
    p.add_argument("--pace", type=float, default=1.0, help="scale every simulated delay (default 1.0)")
    p.add_argument("--seed", default=None, help="seed for the simulated delays")
    p.add_argument("--timeout", type=float, default=120.0, help="give up after this many seconds (default 120)")
    p.add_argument("--json", action="store_true", help="print only the summary, as JSON")
    p.set_defaults(func=run_command)


def _check_args(args: argparse.Namespace) -> str | None:
    if args.orders < _MIN_ORDERS:  # fewer leaves no order in flight to lose at the kill
        return f"--orders must be >= {_MIN_ORDERS} (got {args.orders})"
    if not 0 < args.kill_at < 1:
        return f"--kill-at must be between 0 and 1 (got {args.kill_at})"
    for name in ("valkey_interval", "sqlite_interval", "pace", "timeout"):
        value = getattr(args, name)
        if not (value > 0 and math.isfinite(value)):
            return f"--{name.replace('_', '-')} must be a number > 0 (got {value})"
    return None


# ------------------------------------------------------------------ display


def progress_table(table: dict[str, int]) -> str:
    """Render a progress report's ``{"step|status": n}`` counts as steps x statuses.

    Args:
        table: counts by ``"where|status"``.

    Returns:
        The table text.
    """
    rows = []
    for key, label in _ROWS:
        counts = [table.get(f"{key}|{status}", 0) for status in _STATUSES]
        rows.append([label, *counts, sum(counts)])
    return render_table(["where", *_STATUSES, "total"], rows)


class _Display:
    """The live view: redrawn in place with ANSI on a terminal, periodic plain lines otherwise."""

    def __init__(self, *, enabled: bool, orders: int, out: TextIO) -> None:
        self.enabled = enabled
        self.tty = enabled and out.isatty()
        self.orders = orders
        self.out = out
        self._drawn = 0
        self._last_plain = 0.0

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def _clear(self) -> None:
        if self._drawn:
            self._write(f"\x1b[{self._drawn}F\x1b[J")
            self._drawn = 0

    def event(self, text: str) -> None:
        if not self.enabled:
            return
        self._clear()
        self._write(text + "\n")

    def update(self, progress: Progress, pid: int) -> None:
        if not self.enabled:
            return
        table = progress.table
        delivered = table.get("finished|done", 0)
        lags = "  ".join(f"{tier} lag {lag * 1000:.0f} ms" for tier, lag in progress.lags.items())
        title = (
            f"worker #{progress.gen} (pid {pid})  t={progress.t:.1f} s  delivered {delivered}/{self.orders}"
            f"  retries {progress.retries}  {lags}"
        )
        if self.tty:
            self._clear()
            text = f"{title}\n{progress_table(table)}\n"
            self._write(text)
            self._drawn = text.count("\n")
        elif time.monotonic() - self._last_plain >= 1.0:
            self._last_plain = time.monotonic()
            where = ", ".join(
                f"{label.split(' ', 1)[-1]} {n}"
                for key, label in _ROWS
                if (n := sum(table.get(f"{key}|{s}", 0) for s in _STATUSES))
            )
            self._write(f"{title}: {where or 'no orders yet'}\n")

    def done(self) -> None:
        self._drawn = 0  # leave the last table on screen


# ------------------------------------------------------------------ the run


class _Demo:
    """Everything one ``hotstate demo`` run learns, gathered for the summary."""

    def __init__(self, args: argparse.Namespace, url: str, sqlite: Path, workdir: Path, display: _Display) -> None:
        self.args = args
        # One policy spelling: the interval flags are the spec "valkey:V,sqlite:S".
        self.policy = Policy.parse(f"valkey:{args.valkey_interval!r},sqlite:{args.sqlite_interval!r}")
        self.url = url
        self.sqlite = sqlite
        self.workdir = workdir
        self.display = display
        self.tag = uuid.uuid4().hex[:6]
        self.prefix = f"hotstate-demo-{self.tag}"
        self.ledger = workdir / f"ledger-{self.tag}.jsonl"
        self.seed = args.seed if args.seed is not None else self.tag
        self.ids = order_ids(self.tag, args.orders)
        self.deadline = time.monotonic() + args.timeout
        self.started = time.monotonic()
        self.last1: Progress | None = None
        self.kill: dict[str, Any] = {}
        self.loss = Loss()
        self.recovered: Recovered | None = None
        self.final: Progress | None = None
        self.finished: Finished | None = None
        self.worker2_status: int | None = None

    def start(self, gen: int, stack: contextlib.ExitStack) -> tuple[Child, ChildConfig]:
        a = self.args
        orders = Orders(
            tag=self.tag,
            count=a.orders,
            fail_index=_FAIL_INDEX,
            ledger=str(self.ledger),
            gen=gen,
            seed=str(self.seed),
            pace=a.pace,
        )
        config = ChildConfig(
            policy=self.policy.spec,
            sqlite=str(self.sqlite),
            valkey_url=self.url,
            prefix=self.prefix,
            trace=str(self.workdir / f"trace-{self.tag}-{gen}"),
            runs=a.orders,
            orders=orders,
            recover=gen > 1,
            linger=0.0,
        )
        worker = Child(config, self.workdir / f"worker-{self.tag}-{gen}.log", name=f"worker #{gen}")
        stack.callback(worker.kill)
        return worker, config

    def run_first(self, stack: contextlib.ExitStack) -> None:
        """Worker #1 until ``--kill-at`` of the orders are delivered, then SIGKILL it mid-flight and judge."""
        worker, config = self.start(1, stack)
        # Leave at least one order besides the designed failure in flight.
        target = max(1, min(round(self.args.kill_at * self.args.orders), self.args.orders - 2))
        received = 0.0
        while True:
            message = worker.next_message(self.deadline)
            if message is None:
                status = worker.wait(timeout=10)
                raise _DemoError(f"worker #1 exited before the kill (status {status}): {_last_line(worker)}")
            if not isinstance(message, Progress):
                continue
            self.last1, received = message, time.monotonic()
            self.display.update(message, worker.pid)
            if message.table.get("finished|done", 0) >= target:
                break
        # At once: the report is a lower bound on what worker #1 holds, and it keeps
        # working until the signal lands (the trace and the ledger measure that part exactly).
        killed_at, killed_wall = time.monotonic(), time.time()
        status = worker.kill()
        # The harness's judge, before worker #2 changes the tiers. Its violations
        # (a version regression, a run lost) all count as acknowledged steps lost.
        _, _, self.loss = run(judge, config, killed_at, [], self.ids)
        in_flight = sum(n for k, n in self.last1.table.items() if not k.startswith("finished|"))
        self.kill = {
            "worker": 1,
            "pid": worker.pid,
            "signal": "SIGKILL",
            "exit_status": status,
            "at_seconds": round(killed_at - self.started, 3),
            "wall": killed_wall,
            "delivered_before": self.last1.table.get("finished|done", 0),
            "in_flight": in_flight,
            "last_report_age_seconds": round(killed_at - received, 4),
        }
        self.display.event(
            f"*** SIGKILL worker #1 (pid {worker.pid}) at {self.kill['at_seconds']:.1f} s: "
            f"{self.kill['delivered_before']} delivered, {in_flight} in flight"
        )

    def run_second(self, stack: contextlib.ExitStack) -> None:
        """Worker #2 (``recover=True``) until every order has finished."""
        worker, _ = self.start(2, stack)
        while (message := worker.next_message(self.deadline)) is not None:
            if isinstance(message, Progress):
                self.final = message
                self.display.update(message, worker.pid)
            elif isinstance(message, Recovered):
                self.recovered = message
                self.display.event(
                    f"*** worker #2 (pid {worker.pid}) recovered {message.resumed} run(s) in "
                    f"{message.seconds * 1000:.0f} ms ({_by_tier(message.by_tier)}), "
                    f"{message.already_finished} finished in a store,"
                    f" {message.respawned} placed anew (in no store)"
                )
            elif isinstance(message, Finished):
                self.finished = message
        self.worker2_status = worker.wait(timeout=30)
        if self.finished is None or self.final is None:
            raise _DemoError(f"worker #2 did not finish (status {self.worker2_status}): {_last_line(worker)}")


def _last_line(worker: Child) -> str:
    """The last line the worker wrote on stderr (its exception, when it died of one)."""
    lines = worker.stderr_tail().strip().splitlines()
    return lines[-1] if lines else "no output"


def _by_tier(counts: dict[str, int]) -> str:
    return ", ".join(f"from {tier}: {n}" for tier, n in counts.items()) or "none"


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} {n}" for name, n in counts.items()) or "none"


class _DemoError(Exception):
    """The demo could not run to its end (a worker died, or the deadline passed)."""


# ------------------------------------------------------------------ summary


def _ledger(path: Path) -> list[Effect]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        with contextlib.suppress(ValueError, TypeError):  # a line cut short by the SIGKILL
            out.append(Effect(**json.loads(line)))
    return out


def _crash_loss(demo: _Demo) -> dict[str, Any]:
    """What the crash lost: steps that ran in worker #1 but were never durable, so ran again.

    Exact from the ledger (every step and compensation records one effect under
    its idempotency key), and from the judge: worker #1's trace (what its memory
    held at the kill) against what the tiers held before worker #2 started.
    """
    first: dict[str, Effect] = {}
    rerun: list[Effect] = []
    for entry in _ledger(demo.ledger):
        seen = first.get(entry.key)
        if seen is None:
            first[entry.key] = entry
        elif seen.gen == 1 and entry.gen == 2:
            rerun.append(seen)
    oldest = max((demo.kill["wall"] - e.at for e in rerun), default=0.0)
    window = demo.policy.interval + demo.loss.flush
    return {
        "steps_rerun": len(rerun),
        "steps_rerun_by_effect": {k: sum(1 for e in rerun if e.effect == k) for k in sorted({e.effect for e in rerun})},
        "runs_rerun": len({e.run_id for e in rerun}),
        "oldest_rerun_age_seconds": round(oldest, 4),
        "policy_window_seconds": round(window, 4),
        "rerun_within_policy_window": oldest <= window,
        "effects_applied_once": len(first),
        "acknowledged_lost": demo.loss.acknowledged,
        "at_last_report": {
            "runs_behind": demo.loss.runs_behind,
            "versions_behind": demo.loss.steps,
            "steps_behind": demo.loss.steps_behind,
        },
    }


def summarize(demo: _Demo) -> dict[str, Any]:
    """Build the summary, with every invariant and whether it holds.

    Args:
        demo: a finished demo.

    Returns:
        The summary (what ``--json`` prints).
    """
    final, finished, rec = demo.final, demo.finished, demo.recovered
    assert final is not None  # noqa: S101 - run_second checked it
    assert finished is not None  # noqa: S101 - and this
    fail_id = demo.ids[_FAIL_INDEX]
    table = final.table
    delivered = table.get("finished|done", 0)
    failed = table.get("finished|failed", 0)
    unfinished = sum(n for k, n in table.items() if not k.startswith("finished|"))
    comp = finished.compensations.get(fail_id)
    loss = _crash_loss(demo) if rec is not None else {}
    invariants = {
        "worker_killed_with_sigkill": demo.kill.get("exit_status") == -signal.SIGKILL,
        "recovery_resumed_runs": rec is not None and rec.resumed > 0,
        "no_corrupt_or_lost_copies": rec is not None and rec.corrupt == 0 and rec.lost == 0,
        "all_orders_finished": unfinished == 0 and delivered + failed == demo.args.orders,
        "only_designed_failure_dead_lettered": finished.dead_letters == [fail_id] and failed == 1,
        "compensated_in_reverse_order": comp == ["refund", "release_stock"],
        "nothing_acknowledged_lost": loss.get("acknowledged_lost", 1) == 0,
        "worker2_exit_status_0": demo.worker2_status == 0,
    }
    return {
        "ok": all(invariants.values()),
        "invariants": invariants,
        "orders": demo.args.orders,
        "policy": {
            "valkey_interval": demo.args.valkey_interval,
            "sqlite_interval": demo.args.sqlite_interval,
            "mode": "write-behind",
        },
        "stores": {"valkey_url": demo.url, "valkey_prefix": demo.prefix, "sqlite": str(demo.sqlite)},
        "kill": {k: v for k, v in demo.kill.items() if k != "wall"},
        "recovery": {
            k: round(v, 4) if isinstance(v, float) else v
            for k, v in (dataclasses.asdict(rec) if rec is not None else {}).items()
        },
        "crash_loss": loss,
        "final": {
            "delivered": delivered,
            "failed": failed,
            "unfinished": unfinished,
            "retries_after_recovery": final.retries,
            "transitions_after_recovery": final.transitions,
        },
        "designed_failure": {
            "run_id": fail_id,
            "dead_lettered": fail_id in finished.dead_letters,
            "compensations": comp,
        },
        "dead_letters": finished.dead_letters,
        "seconds": round(time.monotonic() - demo.started, 3),
    }


def _print_summary(summary: dict[str, Any]) -> None:
    loss, rec, kill, fin = summary["crash_loss"], summary["recovery"], summary["kill"], summary["final"]
    pol = summary["policy"]
    behind = loss.get("at_last_report", {})
    print(
        f"\nhotstate demo: {summary['orders']} orders, write-behind Valkey every {pol['valkey_interval']:g} s"
        f" + SQLite every {pol['sqlite_interval']:g} s, {summary['seconds']:.1f} s"
    )
    rows: list[list[object]] = [
        [
            "SIGKILL of worker #1",
            f"at {kill.get('at_seconds', 0):.2f} s, {kill.get('delivered_before')} delivered,"
            f" {kill.get('in_flight')} in flight",
        ],
        [
            "runs resumed by worker #2",
            f"{rec.get('resumed')} in {rec.get('seconds', 0) * 1000:.0f} ms ({_by_tier(rec.get('by_tier', {}))})",
        ],
        [
            "steps lost, so run again",
            f"{loss.get('steps_rerun')} in {loss.get('runs_rerun')} run(s)"
            f" ({_counts(loss.get('steps_rerun_by_effect', {}))}), same idempotency keys",
        ],
        [
            "oldest lost step",
            f"{loss.get('oldest_rerun_age_seconds', 0) * 1000:.0f} ms before the kill (policy window"
            f" {loss.get('policy_window_seconds', 0) * 1000:.0f} ms: interval + longest flush)",
        ],
        [
            "behind in the tiers at the kill",
            f"{behind.get('runs_behind')} run(s), {behind.get('versions_behind')} versions",
        ],
        ["acknowledged, then lost", loss.get("acknowledged_lost")],
        ["delivered / failed / unfinished", f"{fin['delivered']} / {fin['failed']} / {fin['unfinished']}"],
        [
            "designed failure",
            f"{summary['designed_failure']['run_id']}: compensations"
            f" {summary['designed_failure']['compensations']},"
            f" dead-lettered: {'yes' if summary['designed_failure']['dead_lettered'] else 'no'}",
        ],
    ]
    print(render_table(["", "result"], rows))
    print()
    print(render_table(["invariant", "holds"], [[k.replace("_", " "), v] for k, v in summary["invariants"].items()]))
    print(
        "\nOK: every order finished; the crash lost only what the policy allows."
        if summary["ok"]
        else "\nFAILED: an invariant does not hold (see above)."
    )


def run_command(args: argparse.Namespace) -> int:
    """Run ``hotstate demo``; returns 0 only when every invariant holds.

    Args:
        args: the parsed command line.

    Returns:
        The exit status.
    """
    problem = _check_args(args)
    if problem is not None:
        return fail(problem, status=2)
    display = _Display(enabled=not args.json, orders=args.orders, out=sys.stdout)
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="hotstate-demo-")))
        url = args.valkey_url
        try:
            if url is None:
                server = EmbeddedValkey()
                stack.callback(server.stop)
                url = server.start().url
                display.event(f"started a private valkey-server at {url}")
            sqlite = args.sqlite if args.sqlite is not None else workdir / "demo.db"
            demo = _Demo(args, url, sqlite, workdir, display)
            demo.run_first(stack)
            demo.run_second(stack)
        except (_DemoError, TimeoutError, HotstateError) as exc:
            return fail(f"demo: {exc}")
        finally:
            display.done()
        summary = summarize(demo)
    if args.json:
        print_json(summary)
    else:
        _print_summary(summary)
    return 0 if summary["ok"] else 1
