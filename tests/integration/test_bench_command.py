"""``hotstate bench`` end to end at tiny sizes: every suite runs, figures and targets land in the JSON."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys

import pytest

from hotstate._cli import main

TINY = [
    "--n",
    "200",
    "--k",
    "3",
    "--rounds",
    "1",
    "--sizes",
    "100",
    "--flush-rows",
    "200",
    "--recovery-runs",
    "300",
    "--idle-runs",
    "500",
    "--scale-sizes",
    "100,300",
]


def test_the_measurement_suites_run_and_write_their_figures(tmp_path, valkey_url, capsys):
    out = tmp_path / "latest.json"
    status = main(
        [
            "bench",
            *TINY,
            "--suite",
            "w1,policies,flush,recovery,memory,scale",
            "--valkey-url",
            valkey_url,
            "--sqlite",
            str(tmp_path),
            "--json",
            str(out),
        ]
    )
    assert status == 0
    document = json.loads(out.read_text())
    names = [f["name"] for f in document["figures"]]
    for expected in (
        "hotstate memory-only",
        "write-through sqlite FULL, group commit (N=100)",
        "persister -> sqlite",
        "persister -> valkey",
        "recovered runs per second",
        "memory per idle run (N=500)",
        "W1 steps/s at N=300",
    ):
        assert expected in names
    assert all(f["value"] > 0 for f in document["figures"] if f["unit"] != "bytes")
    assert [p["runs"] for p in document["scale"]] == [100, 300]
    ratios = {f["name"]: f["ratio"] for f in document["figures"]}
    assert ratios["hotstate memory-only"] is not None
    text = capsys.readouterr().out
    assert "Summary" in text
    assert "ratio to ceiling" in text


def test_the_sigkill_suites_write_the_sweep_the_reliability_figures_and_the_plot(tmp_path, valkey_url):
    out = tmp_path / "latest.json"
    status = main(
        [
            "bench",
            "--quick",
            "--suite",
            "sweep,reliability",
            "--trials",
            "1",
            "--valkey-url",
            valkey_url,
            "--json",
            str(out),
        ]
    )
    assert status == 0
    document = json.loads(out.read_text())
    assert {(p["tier"], p["interval"]) for p in document["sweep"]} >= {("valkey", 0.01), ("sqlite", 0.1)}
    for point in document["sweep"]:
        assert point["trials"] >= 1
        assert point["steps_per_s"] > 0
    assert document["reliability"]["violations"] == 0
    assert len(document["reliability"]["policies"]) == 4
    kept = document["reliability"]["guarantees"]
    assert kept["violations"] == 0
    scenarios = kept["scenarios"]
    assert [(s["scenario"], s["trials"], s["violations"]) for s in scenarios] == [
        *[("ack", 1, 0)] * 3,
        ("lineage", 1, 0),
        ("crash-loop", 1, 0),
    ]
    assert [list(s["calls"]) for s in scenarios[:3]] == [["spawn"], ["send"], ["send_consumed"]]
    assert all(s["runs_checked"] >= 1 for s in scenarios)
    assert 4 <= scenarios[-1]["starts"] <= 5  # the first start, crash_limit (3) crashes, the last start
    names = {f["name"] for f in document["figures"]}
    assert "ack, write-through valkey, send: violations in 1 trials" in names
    assert "crash loop, write-behind valkey 10 ms + sqlite 1 s, crash_limit 3: violations in 1 trials" in names
    png = (tmp_path / "tuning.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--suite", "nope"], "unknown suite"),
        (["--sizes", "ten"], "whole numbers"),
        (["--scale-sizes", "0"], "positive"),
        (["--rounds", "0"], "--rounds must be at least 1"),
        (["--trials", "0"], "--trials must be at least 1"),
    ],
)
def test_bad_bench_arguments_exit_2_with_a_message(argv, message, capsys):
    assert main(["bench", *argv]) == 2
    assert message in capsys.readouterr().err


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purpose: it is no longer serving
    with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"
    return True


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_the_private_valkey_server_stops_when_the_benchmark_is_interrupted(tmp_path, sig):
    with subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hotstate",
            "bench",
            "--suite",
            "policies",
            "--sizes",
            "300000",
            "--rounds",
            "3",
            "--json",
            str(tmp_path / "x.json"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    ) as proc:
        assert proc.stdout is not None
        pid = None
        for line in proc.stdout:
            match = re.search(r"private valkey-server at \S+ \(pid (\d+)\)", line)
            if match:
                pid = int(match.group(1))
                break
        assert pid is not None
        assert _alive(pid)
        proc.send_signal(sig)
        status = proc.wait(timeout=30)
    assert status != 0
    assert not _alive(pid)
    assert not (tmp_path / "x.json").exists()
