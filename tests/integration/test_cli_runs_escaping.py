"""``hotstate runs`` never lets stored text act on the operator's terminal (issue #11, terminal output).

Runs whose id, workflow name, error and transition details hold a newline,
an OSC title sequence, an SGR colour, a C1 CSI and a bidi override are
planted in a real SQLite file and a real Valkey: through the store API
(snapshots built directly, as a store would hold what any writer wrote), and
with raw SQL / Valkey commands for fields the store API never writes. The real
command line (``python -m hotstate runs``) then reads them: no control, format
or separator character reaches stdout or stderr, a newline forges no table row,
and ``--json`` stays valid, ASCII JSON that gives back the exact stored text.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import unicodedata
from typing import TYPE_CHECKING

import anyio
import pytest
import valkey

from hotstate import ErrorInfo, Snapshot, Status, Transition, TransitionKind
from hotstate._cli._safe import printable
from hotstate.persistence import DEFAULT_SHARDS, JsonCodec, SQLiteStore, StoredDeadLetter, ValkeyStore, shard_of
from hotstate.persistence._records import encode_snapshot, error_to_json, errors_to_json


def vkey(prefix: str, run_id: str, kind: str = "run") -> str:
    """A run's Valkey key of ``kind`` (layout 2: each run's keys carry its shard's hash tag)."""
    return f"{prefix}:{{{shard_of(run_id, DEFAULT_SHARDS)}}}:{kind}:{run_id}"


def skey(prefix: str, run_id: str, *parts: str) -> str:
    """A key of ``run_id``'s shard: its dead letters, its status and workflow indexes."""
    return ":".join((prefix, f"{{{shard_of(run_id, DEFAULT_SHARDS)}}}", *parts))


if TYPE_CHECKING:
    from pathlib import Path

    from hotstate.persistence import Store

GUARD = 30  # seconds per command; a hang guard only
NASTY = "\n\x1b]0;x\x07\x1b[31m\u202e\x9b2J"
RUN_IDS = (
    "plain-1",
    "nl\nforged-row  done  9",
    "osc\x1b]0;x\x07",
    "sgr\x1b[31mred",
    "rtl\u202etxt.exe",
    "all" + NASTY,
)
FAILED = RUN_IDS[1:]  # dead-lettered, with a nasty error
STEPS = 3  # transitions per run
# What no output line may hold: controls (C0 but the line feed, DEL, C1), format
# characters (bidi overrides among them), line and paragraph separators.
UNSAFE = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
SHOW_KEYS = frozenset({"run", "status", "workflow", "step", "version", "attempt", "updated", "error", "source"})
SHOW_KEYS |= {"durable", "corrupt"}


def _error(run_id: str) -> ErrorInfo:
    return ErrorInfo(
        type="builtins.ValueError" + NASTY,
        message=f"card declined for {run_id}{NASTY}",
        traceback="Traceback" + NASTY,
        step=1,
        step_name="charge" + NASTY,
        attempt=2,
        at=1_700_000_000.0,
    )


def _snapshot(run_id: str) -> Snapshot:
    failed = run_id in FAILED
    return Snapshot(
        run_id=run_id,
        workflow="order" + NASTY,
        workflow_version=1,
        version=STEPS,
        step=1 if failed else STEPS,
        status=Status.failed if failed else Status.done,
        payload={"note": "payload" + NASTY},
        error=_error(run_id) if failed else None,
        updated_at=1_700_000_000.0,
    )


def _transitions(run_id: str) -> list[Transition]:
    kinds = [TransitionKind.spawned, TransitionKind.step, TransitionKind.step_failed]
    return [
        Transition(run_id, v, kinds[v - 1], v - 1, Status.running, 1_700_000_000.0 + v, f"detail {v}{NASTY}")
        for v in range(1, STEPS + 1)
    ]


async def _plant(store: Store) -> None:
    codec = JsonCodec()  # data-only; the CLI verifies a JSON frame with JsonCodec
    async with store:
        stored = {rid: encode_snapshot(_snapshot(rid), codec) for rid in RUN_IDS}
        result = await store.save(list(stored.values()), [t for rid in RUN_IDS for t in _transitions(rid)])
        assert (result.written, dict(result.rejected)) == (len(RUN_IDS), {})
        await store.save_dead_letters(
            [
                StoredDeadLetter(
                    run_id=rid,
                    workflow="order" + NASTY,
                    at=1_700_000_100.0,
                    error=error_to_json(_error(rid)),
                    attempts=errors_to_json([_error(rid), _error(rid)]),
                    compensation_errors="[]",
                    snapshot=stored[rid],
                )
                for rid in FAILED
            ]
        )


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "runs.db"
    anyio.run(_plant, SQLiteStore(path))
    return path


@pytest.fixture
def vk(valkey_url: str, valkey_prefix: str) -> list[str]:
    anyio.run(_plant, ValkeyStore(valkey_url, prefix=valkey_prefix))
    return ["--valkey-url", valkey_url, "--prefix", valkey_prefix]


@pytest.fixture(params=["sqlite", "valkey", "both"])
def stores(request: pytest.FixtureRequest) -> list[str]:
    sqlite_args = ["--sqlite", str(request.getfixturevalue("db"))]
    if request.param == "sqlite":
        return sqlite_args
    vk_args: list[str] = request.getfixturevalue("vk")
    return vk_args if request.param == "valkey" else [*sqlite_args, *vk_args]


def runs(*argv: str) -> tuple[int, str, str]:
    """``python -m hotstate runs ARGV``; fails the test if any output byte would act on a terminal."""
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    proc = subprocess.run(
        [sys.executable, "-m", "hotstate", "runs", *argv], capture_output=True, timeout=GUARD, env=env, check=False
    )
    out, err = proc.stdout.decode("utf-8"), proc.stderr.decode("utf-8")  # strict: no lone surrogate got through
    for name, text in (("stdout", out), ("stderr", err)):
        bad = sorted({ch for ch in text if ch != "\n" and unicodedata.category(ch) in UNSAFE})
        assert not bad, f"{name} of runs {argv!r} holds {bad!r}:\n{text!r}"
    assert "Traceback" not in err
    return proc.returncode, out, err


def _rows(table: str) -> list[str]:
    lines = table.splitlines()
    assert set(lines[1]) <= {"-", " "}, lines[:2]  # the rule under the header
    return lines[2:]


def test_list_prints_one_row_per_run_with_every_field_escaped(stores: list[str]) -> None:
    status, out, err = runs(*stores, "list")
    assert (status, err) == (0, "")
    rows = _rows(out)
    assert len(rows) == len(RUN_IDS)
    for rid in RUN_IDS:
        assert [row.startswith(printable(rid) + " ") for row in rows].count(True) == 1, rid
    assert all(printable("order" + NASTY) + " v1" in row for row in rows)


def test_history_prints_one_row_per_transition(stores: list[str]) -> None:
    for rid in RUN_IDS:
        status, out, err = runs(*stores, "history", rid)
        assert (status, err) == (0, ""), rid
        rows = _rows(out)
        assert len(rows) == STEPS, (rid, out)
        assert [row.endswith(printable(f"detail {v}{NASTY}")) for v, row in enumerate(rows, 1)] == [True] * STEPS


def test_dead_letters_print_one_row_per_letter(stores: list[str]) -> None:
    status, out, err = runs(*stores, "dead-letters")
    assert (status, err) == (0, "")
    rows = _rows(out)
    assert len(rows) == len(FAILED)
    for rid in FAILED:
        (row,) = (r for r in rows if r.startswith(printable(rid) + " "))
        assert printable(f"card declined for {rid}{NASTY}") in row


def test_show_prints_one_line_per_field(stores: list[str]) -> None:
    for rid in RUN_IDS:
        status, out, err = runs(*stores, "show", rid)
        fields = dict(line.split(None, 1) for line in out.splitlines())
        assert set(fields) <= SHOW_KEYS, (rid, out)
        assert fields["run"] == printable(rid)
        if status == 1:  # no copy verified: reported (escaped, one line each), never trusted
            assert "corrupt" in fields, (rid, out)
            assert err.count("\n") == 1
            continue
        assert (status, err) == (0, ""), (rid, err)
        assert fields["workflow"] == printable("order" + NASTY) + " v1"
        if rid in FAILED:
            assert printable(f"card declined for {rid}{NASTY}") in fields["error"]


def test_json_output_is_ascii_and_gives_back_the_exact_stored_text(stores: list[str]) -> None:
    status, out, _ = runs(*stores, "--json", "list")
    assert status == 0
    assert out.isascii()  # ensure_ascii: bidi, C1 and separators are \\u escapes, never raw
    assert sorted(r["run_id"] for r in json.loads(out)) == sorted(RUN_IDS)
    _, out, _ = runs(*stores, "--json", "history", RUN_IDS[-1])
    assert [r["detail"] for r in json.loads(out)] == [f"detail {v}{NASTY}" for v in range(1, STEPS + 1)]
    _, out, _ = runs(*stores, "--json", "dead-letters")
    assert {r["workflow"] for r in json.loads(out)} == {"order" + NASTY}


# --- fields the store API never writes: raw SQL and raw Valkey commands -------


def test_a_raw_status_and_transition_kind_in_sqlite_are_escaped(db: Path) -> None:
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE runs SET status = ? WHERE run_id = ?", ("done" + NASTY, "plain-1"))
        conn.execute("UPDATE transitions SET kind = ? WHERE run_id = ? AND version = 2", ("x" + NASTY, "plain-1"))
        conn.execute("UPDATE runs SET status = ? WHERE run_id = ?", ("failed" + NASTY, RUN_IDS[-1]))
    conn.close()
    status, out, err = runs("--sqlite", str(db), "list")
    assert (status, err) == (0, "")
    rows = _rows(out)
    assert len(rows) == len(RUN_IDS)
    assert [printable("done" + NASTY) in row for row in rows].count(True) == 1
    assert [printable("failed" + NASTY) in row for row in rows].count(True) == 1
    # retry refuses the run (its status is not ``failed``, or no copy verifies) on one escaped line.
    status, out, err = runs("--sqlite", str(db), "retry", RUN_IDS[-1])
    assert (status, out, err.count("\n")) == (1, "", 1)
    # A transition kind hotstate never wrote is reported (escaped, on one line), never printed raw.
    status, out, err = runs("--sqlite", str(db), "history", "plain-1")
    assert status in (0, 1)
    if status == 0:
        assert len(_rows(out)) == STEPS
    else:
        assert out == ""
        assert err.count("\n") == 1


def test_raw_valkey_fields_are_escaped(valkey_url: str, vk: list[str], valkey_prefix: str) -> None:
    with valkey.Valkey.from_url(valkey_url) as client:
        client.hset(vkey(valkey_prefix, "plain-1"), "status", "done" + NASTY)
        client.hset(vkey(valkey_prefix, "plain-1"), "workflow", "wf" + NASTY)
        client.hset(vkey(valkey_prefix, "plain-1", "hist"), "2", "not json" + NASTY)
    status, out, err = runs(*vk, "list")
    assert status in (0, 1)
    if status == 0:
        rows = _rows(out)
        assert len(rows) == len(RUN_IDS)
        assert [row.startswith("plain-1 ") for row in rows].count(True) == 1
    else:
        assert (out, err.count("\n")) == ("", 1)
    status, out, err = runs(*vk, "history", "plain-1")
    assert status in (0, 1)
    if status == 0:
        assert len(_rows(out)) == STEPS
    else:
        assert (out, err.count("\n")) == ("", 1)
