"""``hotstate demo``: a worker SIGKILLed mid-flight, a recovering worker finishes every order."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import valkey

from hotstate._cli import main

ROOT = Path(__file__).parents[2]


def test_demo_kills_a_worker_recovers_and_finishes_every_order_but_the_designed_failure(tmp_path, valkey_url, capsys):
    db = tmp_path / "d.db"
    status = main(
        [
            "demo",
            "--orders",
            "40",
            "--valkey-url",
            valkey_url,
            "--sqlite",
            str(db),
            "--json",
            "--pace",
            "0.3",
            "--seed",
            "test",
        ]
    )
    out = capsys.readouterr().out
    summary = json.loads(out)
    try:
        assert status == 0, out
        assert summary["ok"] is True
        assert all(summary["invariants"].values()), summary["invariants"]
        # the kill happened mid-flight, and recovery resumed the runs in flight
        kill = summary["kill"]
        assert kill["signal"] == "SIGKILL"
        assert kill["exit_status"] == -signal.SIGKILL
        assert kill["in_flight"] > 0
        assert 0 < kill["delivered_before"] < 40
        recovery = summary["recovery"]
        assert recovery["resumed"] > 0
        assert recovery["corrupt"] == 0
        assert recovery["lost"] == 0
        # every order finished: all delivered except the one designed to fail
        fail_id = summary["designed_failure"]["run_id"]
        assert fail_id.endswith("-order-0007")
        assert summary["final"] == {**summary["final"], "delivered": 39, "failed": 1, "unfinished": 0}
        assert summary["dead_letters"] == [fail_id]
        assert summary["designed_failure"]["dead_lettered"] is True
        assert summary["designed_failure"]["compensations"] == ["refund", "release_stock"]
        # the crash lost only what no tier had acknowledged; lost steps ran again under the same key
        loss = summary["crash_loss"]
        assert loss["acknowledged_lost"] == 0
        assert loss["steps_rerun"] >= 0
        assert loss["effects_applied_once"] >= 39 * 4  # four steps per delivered order, each effect once
        assert summary["stores"]["sqlite"] == str(db)
        assert db.exists()
    finally:
        prefix = summary["stores"]["valkey_prefix"]
        with valkey.Valkey.from_url(valkey_url) as client:
            keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
            if keys:
                client.delete(*keys)


def test_demo_rejects_bad_options_with_status_2(capsys):
    assert main(["demo", "--orders", "0"]) == 2
    assert "--orders" in capsys.readouterr().err
    assert main(["demo", "--kill-at", "1.5"]) == 2
    assert "--kill-at" in capsys.readouterr().err


def test_order_lifecycle_example_compensates_in_reverse_order_and_dead_letters():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "examples.order_lifecycle"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.index("compensation: refund 42 to order-B") < out.index("compensation: release stock of order-B")
    assert "order-A finished:" in out
    assert "dead letter: order-B AddressRejectedError" in out
    assert "1 retries, 1 give-ups, 1 dead letter(s)" in out
