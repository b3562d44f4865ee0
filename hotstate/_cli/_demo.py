"""``hotstate demo``: the order lifecycle through a SIGKILL and a recovery, watched live.

The parent process (this module) starts a worker process (``_demo_worker``)
that runs many orders on Valkey + SQLite with a write-behind policy. Partway
through it SIGKILLs the worker, starts a second one with ``recover=True``, and
watches it finish every order. Then it checks what the crash cost against the
policy, from three sources: the first worker's last progress report, the
second worker's recovery report, and the side-effect ledger both wrote.

Embedded defaults: a SQLite file in a temporary directory and a private
valkey-server (``EmbeddedValkey``), both removed at exit, Ctrl-C included.
"""

from __future__ import annotations

import contextlib
import json
import math
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Final, TextIO

from hotstate._bench._table import render_table
from hotstate._cli._output import fail, print_json
from hotstate._errors import HotstateError
from hotstate.persistence import EmbeddedValkey

if TYPE_CHECKING:
    import argparse
    from collections.abc import Sequence

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
    p.add_argument("--kill-at", type=float, default=0.4,
                   help="SIGKILL the first worker once this fraction of orders is delivered (default 0.4)")
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


# ------------------------------------------------------------------ workers


class _Worker:
    """One worker process and a thread that turns its stdout into events."""

    def __init__(self, gen: int, argv: Sequence[str], log_path: Path) -> None:
        self.gen = gen
        self._log: IO[bytes] = log_path.open("wb")
        self.log_path = log_path
        # Our own module with arguments we built, no shell.
        self.proc = subprocess.Popen(  # noqa: S603
            [sys.executable, "-m", "hotstate._cli._demo_worker", *argv],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._log, text=True,
        )
        self.events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, name=f"demo-worker-{gen}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        stdout = self.proc.stdout
        assert stdout is not None  # noqa: S101 - PIPE
        for line in stdout:
            with contextlib.suppress(ValueError):
                self.events.put(json.loads(line))
        self.events.put(None)

    def next_event(self, deadline: float) -> dict[str, Any] | None:
        """The next event, or None once the worker's stdout closed.

        Raises:
            TimeoutError: nothing before ``deadline`` (monotonic).
        """
        try:
            return self.events.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise TimeoutError(f"worker #{self.gen} sent nothing before the deadline") from None

    def kill(self) -> int:
        """SIGKILL the worker if it runs, reap it; returns its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        status = self.proc.wait(timeout=10)
        self._reader.join(timeout=5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()
        return status

    def last_error(self) -> str:
        """The last line the worker wrote on stderr (its exception, when it died of one)."""
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "no output"
        return lines[-1] if lines else "no output"


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

    def update(self, progress: dict[str, Any], pid: int) -> None:
        if not self.enabled:
            return
        table = progress["table"]
        delivered = table.get("finished|done", 0)
        lags = "  ".join(f"{t['tier']} lag {t['lag'] * 1000:.0f} ms" for t in progress["tiers"])
        title = (f"worker #{progress['gen']} (pid {pid})  t={progress['t']:.1f} s  delivered {delivered}/{self.orders}"
                 f"  retries {progress['retries']}  {lags}")
        if self.tty:
            self._clear()
            text = f"{title}\n{progress_table(table)}\n"
            self._write(text)
            self._drawn = text.count("\n")
        elif time.monotonic() - self._last_plain >= 1.0:
            self._last_plain = time.monotonic()
            where = ", ".join(f"{label.split(' ', 1)[-1]} {n}" for key, label in _ROWS
                              if (n := sum(table.get(f"{key}|{s}", 0) for s in _STATUSES)))
            self._write(f"{title}: {where or 'no orders yet'}\n")

    def done(self) -> None:
        self._drawn = 0  # leave the last table on screen


# ------------------------------------------------------------------ the run


class _Demo:
    """Everything one ``hotstate demo`` run learns, gathered for the summary."""

    def __init__(self, args: argparse.Namespace, url: str, sqlite: Path, workdir: Path, display: _Display) -> None:
        self.args = args
        self.url = url
        self.sqlite = sqlite
        self.workdir = workdir
        self.display = display
        self.tag = uuid.uuid4().hex[:6]
        self.prefix = f"hotstate-demo-{self.tag}"
        self.ledger = workdir / f"ledger-{self.tag}.jsonl"
        self.seed = args.seed if args.seed is not None else self.tag
        self.fail_index = _FAIL_INDEX
        self.deadline = time.monotonic() + args.timeout
        self.started = time.monotonic()
        self.last1: dict[str, Any] | None = None
        self.kill: dict[str, Any] = {}
        self.recovered: dict[str, Any] | None = None
        self.final: dict[str, Any] | None = None
        self.worker2_status: int | None = None

    def worker_argv(self, gen: int) -> list[str]:
        a = self.args
        return ["--gen", str(gen), "--tag", self.tag, "--orders", str(a.orders), "--fail-index", str(self.fail_index),
                "--valkey-url", self.url, "--valkey-prefix", self.prefix, "--sqlite", str(self.sqlite),
                "--ledger", str(self.ledger), "--valkey-interval", str(a.valkey_interval),
                "--sqlite-interval", str(a.sqlite_interval), "--seed", str(self.seed), "--pace", str(a.pace)]

    def start(self, gen: int, stack: contextlib.ExitStack) -> _Worker:
        worker = _Worker(gen, self.worker_argv(gen), self.workdir / f"worker-{self.tag}-{gen}.log")
        stack.callback(worker.kill)
        return worker

    def run_first(self, stack: contextlib.ExitStack) -> None:
        """Worker #1 until ``--kill-at`` of the orders are delivered, then SIGKILL it mid-flight."""
        worker = self.start(1, stack)
        # Leave at least one order besides the designed failure in flight.
        target = max(1, min(round(self.args.kill_at * self.args.orders), self.args.orders - 2))
        received = 0.0
        while True:
            event = worker.next_event(self.deadline)
            if event is None:
                status = worker.proc.wait(timeout=10)
                raise _DemoError(f"worker #1 exited before the kill (status {status}): {worker.last_error()}")
            if event["event"] != "progress":
                continue
            self.last1 = event
            received = time.monotonic()
            self.display.update(event, worker.proc.pid)
            if event["table"].get("finished|done", 0) >= target:
                break
        # At once: the report is a lower bound on what worker #1 holds, and it keeps
        # working until the signal lands (the ledger measures that part exactly).
        killed_at = time.time()
        report_age = time.monotonic() - received
        status = worker.kill()
        in_flight = sum(n for k, n in self.last1["table"].items() if not k.startswith("finished|"))
        self.kill = {"worker": 1, "pid": worker.proc.pid, "signal": "SIGKILL", "exit_status": status,
                     "at_seconds": round(time.monotonic() - self.started, 3), "wall": killed_at,
                     "delivered_before": self.last1["table"].get("finished|done", 0), "in_flight": in_flight,
                     "last_report_age_seconds": round(report_age, 4)}
        self.display.event(f"*** SIGKILL worker #1 (pid {worker.proc.pid}) at {self.kill['at_seconds']:.1f} s: "
                           f"{self.kill['delivered_before']} delivered, {in_flight} in flight")

    def run_second(self, stack: contextlib.ExitStack) -> None:
        """Worker #2 (``recover=True``) until every order has finished."""
        worker = self.start(2, stack)
        while True:
            event = worker.next_event(self.deadline)
            if event is None:
                break
            if event["event"] == "progress":
                self.display.update(event, worker.proc.pid)
            elif event["event"] == "recovered":
                self.recovered = event
                self.display.event(
                    f"*** worker #2 (pid {worker.proc.pid}) recovered {event['resumed']} run(s) in "
                    f"{event['seconds'] * 1000:.0f} ms ({_by_tier(event['by_tier'])}), "
                    f"{event.get('already_finished', 0)} finished in a store,"
                    f" {event.get('respawned', 0)} placed anew (in no store)")
            elif event["event"] == "finished":
                self.final = event
                self.display.update(event, worker.proc.pid)
        self.worker2_status = worker.proc.wait(timeout=30)
        if self.final is None:
            raise _DemoError(f"worker #2 did not finish (status {self.worker2_status}): {worker.last_error()}")


def _by_tier(counts: dict[str, int]) -> str:
    return ", ".join(f"from {tier}: {n}" for tier, n in counts.items()) or "none"


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} {n}" for name, n in counts.items()) or "none"


class _DemoError(Exception):
    """The demo could not run to its end (a worker died, or the deadline passed)."""


# ------------------------------------------------------------------ summary


def _ledger(path: Path) -> list[dict[str, Any]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        with contextlib.suppress(ValueError):  # a line cut short by the SIGKILL
            out.append(json.loads(line))
    return out


def _crash_loss(demo: _Demo) -> dict[str, Any]:
    """What the crash lost: steps that ran in worker #1 but were never durable, so ran again.

    Exact from the ledger (every step and compensation records one effect under
    its idempotency key); a lower bound from worker #1's last progress report
    against the recovery report (worker #1 kept working until the signal landed).
    """
    last, rec = demo.last1, demo.recovered
    assert last is not None  # noqa: S101 - run_first set it
    assert rec is not None  # noqa: S101 - checked by the caller
    runs_behind = versions_behind = steps_behind = acknowledged_lost = 0
    for i in range(demo.args.orders):
        hot, step = last["v"][i], last["step"][i]
        if hot == 0:
            continue  # not placed yet at the last report
        behind = hot - rec["durable_v"][i]
        if behind > 0:
            runs_behind += 1
            versions_behind += behind
            steps_behind += max(0, step - rec["durable_step"][i])
        if rec["durable_v"][i] < last["acked"][i]:
            acknowledged_lost += 1  # a tier had acknowledged a version that recovery did not find
    first: dict[str, dict[str, Any]] = {}
    rerun: list[dict[str, Any]] = []
    for entry in _ledger(demo.ledger):
        seen = first.get(entry["k"])
        if seen is None:
            first[entry["k"]] = entry
        elif seen["g"] == 1 and entry["g"] == 2:
            rerun.append(seen)
    oldest = max((demo.kill["wall"] - e["t"] for e in rerun), default=0.0)
    intervals = {"valkey": demo.args.valkey_interval, "sqlite": demo.args.sqlite_interval}
    window = min(intervals[t["tier"]] + t["max_flush_duration"] for t in last["tiers"])
    return {
        "steps_rerun": len(rerun),
        "steps_rerun_by_effect": {k: sum(1 for e in rerun if e["e"] == k) for k in sorted({e["e"] for e in rerun})},
        "runs_rerun": len({e["run"] for e in rerun}),
        "oldest_rerun_age_seconds": round(oldest, 4),
        "policy_window_seconds": round(window, 4),
        "rerun_within_policy_window": oldest <= window,
        "effects_applied_once": len(first),
        "acknowledged_lost": acknowledged_lost,
        "at_last_report": {"runs_behind": runs_behind, "versions_behind": versions_behind,
                           "steps_behind": steps_behind},
    }


def summarize(demo: _Demo) -> dict[str, Any]:
    """Build the summary, with every invariant and whether it holds.

    Args:
        demo: a finished demo.

    Returns:
        The summary (what ``--json`` prints).
    """
    final, rec = demo.final, demo.recovered
    assert final is not None  # noqa: S101 - run_second checked it
    fail_id = f"{demo.tag}-order-{demo.fail_index:04d}"
    table = final["table"]
    delivered = table.get("finished|done", 0)
    failed = table.get("finished|failed", 0)
    unfinished = sum(n for k, n in table.items() if not k.startswith("finished|"))
    comp = final["not_delivered"].get(fail_id, {}).get("compensations")
    loss = _crash_loss(demo) if rec is not None else {}
    invariants = {
        "worker_killed_with_sigkill": demo.kill.get("exit_status") == -signal.SIGKILL,
        "recovery_resumed_runs": rec is not None and rec["resumed"] > 0,
        "no_corrupt_or_lost_copies": rec is not None and rec["corrupt"] == 0 and rec["lost"] == 0,
        "all_orders_finished": unfinished == 0 and delivered + failed == demo.args.orders,
        "only_designed_failure_dead_lettered": final["dead_letters"] == [fail_id] and failed == 1,
        "compensated_in_reverse_order": comp == ["refund", "release_stock"],
        "nothing_acknowledged_lost": loss.get("acknowledged_lost", 1) == 0,
        "worker2_exit_status_0": demo.worker2_status == 0,
    }
    return {
        "ok": all(invariants.values()),
        "invariants": invariants,
        "orders": demo.args.orders,
        "policy": {"valkey_interval": demo.args.valkey_interval, "sqlite_interval": demo.args.sqlite_interval,
                   "mode": "write-behind"},
        "stores": {"valkey_url": demo.url, "valkey_prefix": demo.prefix, "sqlite": str(demo.sqlite)},
        "kill": {k: v for k, v in demo.kill.items() if k != "wall"},
        "recovery": {k: round(v, 4) if isinstance(v, float) else v for k, v in (rec or {}).items()
                     if k not in ("event", "gen", "durable_v", "durable_step")},
        "crash_loss": loss,
        "final": {"delivered": delivered, "failed": failed, "unfinished": unfinished,
                  "retries_after_recovery": final["retries"], "transitions_after_recovery": final["transitions"]},
        "designed_failure": {"run_id": fail_id, "dead_lettered": fail_id in final["dead_letters"],
                             "compensations": comp},
        "dead_letters": final["dead_letters"],
        "seconds": round(time.monotonic() - demo.started, 3),
    }


def _print_summary(summary: dict[str, Any]) -> None:
    loss, rec, kill, fin = summary["crash_loss"], summary["recovery"], summary["kill"], summary["final"]
    pol = summary["policy"]
    behind = loss.get("at_last_report", {})
    print(f"\nhotstate demo: {summary['orders']} orders, write-behind Valkey every {pol['valkey_interval']:g} s"
          f" + SQLite every {pol['sqlite_interval']:g} s, {summary['seconds']:.1f} s")
    rows: list[list[object]] = [
        ["SIGKILL of worker #1", f"at {kill.get('at_seconds', 0):.2f} s, {kill.get('delivered_before')} delivered,"
                                 f" {kill.get('in_flight')} in flight"],
        ["runs resumed by worker #2", f"{rec.get('resumed')} in {rec.get('seconds', 0) * 1000:.0f} ms"
                                      f" ({_by_tier(rec.get('by_tier', {}))})"],
        ["steps lost, so run again", f"{loss.get('steps_rerun')} in {loss.get('runs_rerun')} run(s)"
                                     f" ({_counts(loss.get('steps_rerun_by_effect', {}))}), same idempotency keys"],
        ["oldest lost step", f"{loss.get('oldest_rerun_age_seconds', 0) * 1000:.0f} ms before the kill (policy window"
                             f" {loss.get('policy_window_seconds', 0) * 1000:.0f} ms: interval + longest flush)"],
        ["behind at worker #1's last report", f"{behind.get('runs_behind')} run(s),"
                                              f" {behind.get('versions_behind')} versions"],
        ["acknowledged, then lost", loss.get("acknowledged_lost")],
        ["delivered / failed / unfinished", f"{fin['delivered']} / {fin['failed']} / {fin['unfinished']}"],
        ["designed failure", f"{summary['designed_failure']['run_id']}: compensations"
                             f" {summary['designed_failure']['compensations']},"
                             f" dead-lettered: {'yes' if summary['designed_failure']['dead_lettered'] else 'no'}"],
    ]
    print(render_table(["", "result"], rows))
    print()
    print(render_table(["invariant", "holds"], [[k.replace("_", " "), v] for k, v in summary["invariants"].items()]))
    print("\nOK: every order finished; the crash lost only what the policy allows." if summary["ok"]
          else "\nFAILED: an invariant does not hold (see above).")


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
