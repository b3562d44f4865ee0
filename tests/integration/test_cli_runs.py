"""``hotstate runs`` end to end: real SQLite files, a real Valkey, a real Runtime before and after.

The stores are filled by a real ``Runtime`` (flushed with ``rt.flush()``), then
read through ``hotstate._cli.main`` exactly as the command line does.
"""

from __future__ import annotations

import json
import sqlite3
from typing import TYPE_CHECKING, Any

import anyio
import pytest

from hotstate import (
    PersistenceError,
    RetryPolicy,
    RunFailedError,
    Runtime,
    Status,
    Step,
    StepContext,
    Tier,
    Transition,
    TransitionKind,
    Workflow,
)
from hotstate._cli import main
from hotstate.persistence import FlushPolicy, MsgpackCodec, SQLiteStore, ValkeyStore
from hotstate.persistence._records import snapshot_context

if TYPE_CHECKING:
    from pathlib import Path

GUARD = 10  # seconds; a hang guard only
FLAKY = {"fail": True}


async def inc(p: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    return {**p, "n": p["n"] + 1}


async def flaky(p: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    if FLAKY["fail"]:
        raise ValueError("card declined")
    return {**p, "charged": True}


async def take(p: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    return {**p, "got": ctx.signal}


LINEAR = Workflow("linear", [Step(fn=inc, name=f"s{i}") for i in range(3)])
ORDER = Workflow(
    "order",
    [
        Step(fn=inc, name="reserve"),
        Step(fn=flaky, name="charge", retry=RetryPolicy.never()),
        Step(fn=inc, name="ship"),
    ],
)
SIGNAL = Workflow("signal", [Step(fn=inc, name="a"), Step(fn=take, wait_for="go")])
WORKFLOWS = [LINEAR, ORDER, SIGNAL]


async def _fill(tiers: list[Tier]) -> None:
    FLAKY["fail"] = True
    with anyio.fail_after(GUARD):
        async with Runtime(WORKFLOWS, tiers=tiers) as rt:
            for i in range(3):
                await (await rt.spawn(LINEAR, {"n": i}, run_id=f"lin-{i}")).wait_finished()
            with pytest.raises(RunFailedError):
                await (await rt.spawn(ORDER, {"n": 0}, run_id="order-7")).wait_finished()
            await rt.spawn(SIGNAL, {"n": 0}, run_id="sig-1")
            await rt.flush()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "runs.db"
    anyio.run(_fill, [Tier(SQLiteStore(path), FlushPolicy(interval=60.0))])
    return path


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(["runs", *argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_list_shows_headers_as_a_table_and_as_json(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = cli(capsys, "--sqlite", str(db), "list")
    assert status == 0
    lines = out.splitlines()
    assert lines[0].split() == [
        "run",
        "id",
        "workflow",
        "status",
        "step",
        "version",
        "updated",
        "(UTC)",
        "check",
    ]
    assert all(line.rstrip().endswith(" ok") for line in lines[2:])  # every copy's envelope verifies
    assert [line.split()[0] for line in lines[2:]] == [
        "lin-0",
        "lin-1",
        "lin-2",
        "order-7",
        "sig-1",
    ]
    status, out, _ = cli(capsys, "list", "--sqlite", str(db), "--json")
    rows = {r["run_id"]: r for r in json.loads(out)}
    assert rows["order-7"]["status"] == "failed"
    assert rows["sig-1"]["status"] == "waiting"
    assert rows["lin-0"]["workflow"] == "linear"
    assert all(r["verified"] and r["corrupt"] == [] for r in rows.values())
    assert rows["lin-0"]["updated_at"].endswith("+00:00")


def test_list_filters_by_status_workflow_and_limit(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = cli(
        capsys,
        "--sqlite",
        str(db),
        "--json",
        "list",
        "--status",
        "failed",
        "--status",
        "waiting",
    )
    assert [r["run_id"] for r in json.loads(out)] == ["order-7", "sig-1"]
    _, out, _ = cli(
        capsys,
        "--sqlite",
        str(db),
        "--json",
        "list",
        "--workflow",
        "linear",
        "--limit",
        "2",
    )
    assert [r["run_id"] for r in json.loads(out)] == ["lin-0", "lin-1"]


def test_show_reports_where_the_run_is_and_its_last_error(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = cli(capsys, "--sqlite", str(db), "show", "order-7")
    assert status == 0
    fields = dict(line.split(None, 1) for line in out.splitlines() if line.strip())
    assert fields["status"] == "failed"
    assert fields["workflow"] == "order v1"
    assert "ValueError: card declined (step 1 'charge'" in fields["error"]
    assert fields["durable"].startswith("sqlite v")
    _, out, _ = cli(capsys, "--sqlite", str(db), "--json", "show", "sig-1")
    data = json.loads(out)
    assert (data["status"], data["step"], data["source"], data["error"]) == (
        "waiting",
        1,
        "sqlite",
        None,
    )
    assert data["tiers"] == {"sqlite": data["version"]}


def test_unknown_run_ids_fail_with_one_line_and_status_1(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for action in ("show", "history", "retry"):
        status, out, err = cli(capsys, "--sqlite", str(db), action, "nope")
        assert status == 1, action
        assert out == ""
        assert err.count("\n") == 1
        assert "'nope'" in err


def test_history_lists_transitions_in_version_order(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = cli(capsys, "--sqlite", str(db), "--json", "history", "order-7")
    rows = json.loads(out)
    assert [r["version"] for r in rows] == list(range(1, len(rows) + 1))
    assert rows[0]["kind"] == TransitionKind.spawned
    assert rows[-1]["status"] == "failed"
    status, out, _ = cli(capsys, "--sqlite", str(db), "history", "order-7")
    assert status == 0
    assert out.splitlines()[0].split()[:4] == ["version", "kind", "step", "status"]


def test_dead_letters_lists_the_failed_run(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = cli(capsys, "--sqlite", str(db), "--json", "dead-letters")
    (row,) = json.loads(out)
    assert (row["run_id"], row["workflow"], row["step"], row["attempts"]) == (
        "order-7",
        "order",
        1,
        1,
    )
    assert "ValueError: card declined" in row["error"]
    status, out, _ = cli(capsys, "--sqlite", str(db), "dead-letters")
    assert status == 0
    assert "order-7" in out


async def _recover_and_finish(db: Path) -> tuple[Any, list[Any], int]:
    with anyio.fail_after(GUARD):
        async with Runtime(
            WORKFLOWS,
            tiers=[Tier(SQLiteStore(db), FlushPolicy(interval=60.0))],
            recover=True,
        ) as rt:
            result = await rt.wait_finished("order-7")
            return result, rt.history("order-7"), len(rt.dead_letters())


def test_retry_requeues_a_dead_letter_and_a_recovering_runtime_finishes_it(
    db: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, out, _ = cli(capsys, "--sqlite", str(db), "--json", "show", "order-7")
    before = json.loads(out)["version"]
    status, out, err = cli(capsys, "--sqlite", str(db), "retry", "order-7")
    assert (status, err) == (0, "")
    assert f"v{before + 1}" in out
    _, out, _ = cli(capsys, "--sqlite", str(db), "--json", "show", "order-7")
    now = json.loads(out)
    assert (now["status"], now["step"], now["version"], now["error"]) == (
        "running",
        1,
        before + 1,
        None,
    )
    _, out, _ = cli(capsys, "--sqlite", str(db), "--json", "dead-letters")
    assert json.loads(out) == []
    status, _, err = cli(capsys, "--sqlite", str(db), "retry", "order-7")
    assert status == 1
    assert "no dead letter" in err

    FLAKY["fail"] = False
    result, history, letters = anyio.run(_recover_and_finish, db)
    assert result == {"n": 2, "charged": True}
    assert history[0].kind == TransitionKind.resumed
    assert history[-1].status == Status.done
    assert letters == 0
    # The runtime flushed at exit: the stored trail shows the offline retry, then the resume.
    _, out, _ = cli(capsys, "--sqlite", str(db), "--json", "history", "order-7")
    kinds = [r["kind"] for r in json.loads(out)]
    assert kinds.index("dead_letter_retried") == kinds.index("resumed") - 1
    _, out, _ = cli(capsys, "--sqlite", str(db), "--json", "show", "order-7")
    assert json.loads(out)["status"] == "done"


def test_missing_sqlite_file_is_reported_and_never_created(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "absent.db"
    status, _, err = cli(capsys, "--sqlite", str(path), "list")
    assert status == 1
    assert "no such SQLite file" in err
    assert not path.exists()


def test_a_file_that_is_not_a_database_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "notes.db"
    path.write_bytes(b"this is not sqlite" * 100)
    status, _, err = cli(capsys, "--sqlite", str(path), "list")
    assert status == 1
    assert err.startswith("hotstate: [sqlite]")
    assert "Traceback" not in err


def test_usage_errors_exit_2(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(capsys, "list")[0] == 2
    status, _, err = cli(capsys, "--valkey-url", "http://example", "list")
    assert status == 2
    assert "--valkey-url" in err
    assert cli(capsys, "--sqlite", str(db))[0] == 2
    with pytest.raises(SystemExit) as exc:
        cli(capsys, "--sqlite", str(db), "list", "--limit", "0")
    assert exc.value.code == 2


def test_an_unreachable_valkey_is_a_clear_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    status, _, err = cli(capsys, "--valkey-url", "valkey://127.0.0.1:1/0", "list")
    assert status == 1
    assert err.startswith("hotstate: [valkey]")
    assert err.count("\n") == 1


def _corrupt_sqlite_body(db: Path, run_id: str) -> None:
    with sqlite3.connect(db) as conn:
        (body,) = conn.execute("SELECT body FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        flipped = bytes(body[:-1]) + bytes([body[-1] ^ 0xFF])
        conn.execute("UPDATE runs SET body = ? WHERE run_id = ?", (flipped, run_id))
    conn.close()


def test_a_corrupt_only_copy_is_reported_never_crashes(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _corrupt_sqlite_body(db, "sig-1")
    status, out, err = cli(capsys, "--sqlite", str(db), "show", "sig-1")
    assert status == 1
    assert "(corrupt)" in out
    assert "check failed" in out
    assert "no copy verifies" in err


async def _copy_to_valkey(db: Path, url: str, prefix: str, run_id: str, bump: int) -> None:
    async with SQLiteStore(db) as sq, ValkeyStore(url, prefix=prefix) as vk:
        stored = await sq.load(run_id)
        assert stored is not None
        # The frame's check covers the header: a newer version is made by tagging the same body anew.
        header = stored.header._replace(version=stored.header.version + bump)
        body = MsgpackCodec().reframe(
            stored.body,
            context=snapshot_context(stored.header, stored.error),
            new_context=snapshot_context(header, stored.error),
        )
        newer = stored._replace(header=header, body=body)
        await vk.save([newer], await sq.history(run_id))
        for letter in await sq.dead_letters():
            await vk.save_dead_letter(letter)


def test_show_takes_the_highest_verified_copy_and_reports_the_corrupt_one(
    db: Path, valkey_url: str, valkey_prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    anyio.run(_copy_to_valkey, db, valkey_url, valkey_prefix, "sig-1", 3)
    stores = [
        "--sqlite",
        str(db),
        "--valkey-url",
        valkey_url,
        "--prefix",
        valkey_prefix,
    ]
    _, out, _ = cli(capsys, *stores, "--json", "show", "sig-1")
    data = json.loads(out)
    v = data["tiers"]["sqlite"]
    assert data["tiers"] == {"sqlite": v, "valkey": v + 3}
    assert (data["source"], data["version"]) == ("valkey", v + 3)
    status, out, _ = cli(capsys, *stores, "show", "sig-1")
    assert status == 0
    assert f"sqlite v{v}, valkey v{v + 3}" in out

    anyio.run(_copy_to_valkey, db, valkey_url, valkey_prefix, "order-7", 0)
    _corrupt_sqlite_body(db, "order-7")
    _, out, _ = cli(capsys, *stores, "--json", "show", "order-7")
    data = json.loads(out)
    assert data["source"] == "valkey"
    assert "check failed" in data["corrupt"]["sqlite"]
    _, out, _ = cli(capsys, *stores, "--json", "list", "--status", "waiting")
    assert [(r["run_id"], r["version"]) for r in json.loads(out)] == [("sig-1", v + 3)]


def test_retry_applies_to_every_tier(
    db: Path, valkey_url: str, valkey_prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    anyio.run(_copy_to_valkey, db, valkey_url, valkey_prefix, "order-7", 0)
    stores = [
        "--sqlite",
        str(db),
        "--valkey-url",
        valkey_url,
        "--prefix",
        valkey_prefix,
    ]
    _, out, _ = cli(capsys, *stores, "--json", "dead-letters")
    assert json.loads(out)[0]["tiers"] == ["sqlite", "valkey"]
    status, out, _ = cli(capsys, *stores, "--json", "retry", "order-7")
    assert status == 0
    data = json.loads(out)
    assert data["written"] == {"sqlite": True, "valkey": True}
    for only in (
        ["--sqlite", str(db)],
        ["--valkey-url", valkey_url, "--prefix", valkey_prefix],
    ):
        _, out, _ = cli(capsys, *only, "--json", "show", "order-7")
        assert (json.loads(out)["status"], json.loads(out)["version"]) == (
            "running",
            data["version"],
        )
        _, out, _ = cli(capsys, *only, "--json", "history", "order-7")
        assert json.loads(out)[-1]["kind"] == TransitionKind.dead_letter_retried
    _, out, _ = cli(capsys, *stores, "--json", "dead-letters")
    assert json.loads(out) == []


def test_a_foreign_sqlite_database_is_refused_and_left_untouched(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE notes (x)")
    conn.close()
    status, _, err = cli(capsys, "--sqlite", str(path), "list")
    assert status == 1
    assert "not a hotstate database" in err
    with sqlite3.connect(path) as conn:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    conn.close()
    assert tables == ["notes"]


def test_list_pages_through_the_store(
    db: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("hotstate._cli._runs_actions._PAGE", 2)
    _, out, _ = cli(capsys, "--sqlite", str(db), "--json", "list", "--limit", "4")
    assert [r["run_id"] for r in json.loads(out)] == [
        "lin-0",
        "lin-1",
        "lin-2",
        "order-7",
    ]
    _, out, _ = cli(capsys, "--sqlite", str(db), "--json", "list")
    assert len(json.loads(out)) == 5


def test_inspecting_valkey_writes_no_key_even_under_a_wrong_prefix(
    capsys: pytest.CaptureFixture[str], valkey_url: str, valkey_prefix: str
) -> None:
    import valkey

    status, _, _ = cli(capsys, "--valkey-url", valkey_url, "--prefix", valkey_prefix, "list")
    assert status == 0
    status, _, err = cli(capsys, "--valkey-url", valkey_url, "--prefix", valkey_prefix, "show", "nope")
    assert status == 1
    assert "nope" in err
    with valkey.Valkey.from_url(valkey_url) as client:
        assert list(client.scan_iter(match=f"{valkey_prefix}:*")) == []


async def test_a_read_only_valkey_store_refuses_every_write(valkey_url: str, valkey_prefix: str) -> None:
    async with ValkeyStore(valkey_url, prefix=valkey_prefix, read_only=True) as store:
        with pytest.raises(PersistenceError, match="read-only"):
            await store.save([], [Transition("r", 1, TransitionKind.spawned, 0, Status.pending, 0.0, None)])
        with pytest.raises(PersistenceError, match="read-only"):
            await store.purge_finished(before=0.0)
        assert await store.load("r") is None


def test_list_checks_each_copy_and_marks_a_forged_header(
    db: Path, valkey_url: str, valkey_prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # One HSET-style edit: sig-1 claims to be done. Its frame no longer verifies.
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE runs SET status = 'done', version = version + 9 WHERE run_id = 'sig-1'")
    conn.close()
    _, out, _ = cli(capsys, "--sqlite", str(db), "--json", "list")
    rows = {r["run_id"]: r for r in json.loads(out)}
    assert (rows["sig-1"]["verified"], rows["sig-1"]["corrupt"]) == (False, ["sqlite"])
    assert all(r["verified"] for rid, r in rows.items() if rid != "sig-1")
    _, out, _ = cli(capsys, "--sqlite", str(db), "list")
    assert "CORRUPT (no copy verifies)" in next(line for line in out.splitlines() if line.startswith("sig-1"))
    # With a genuine copy in another tier, that one is listed, and the forged one named.
    anyio.run(_copy_to_valkey, db, valkey_url, valkey_prefix, "order-7", 0)
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE runs SET status = 'done', version = version + 9 WHERE run_id = 'order-7'")
    conn.close()
    stores = ["--sqlite", str(db), "--valkey-url", valkey_url, "--prefix", valkey_prefix]
    _, out, _ = cli(capsys, *stores, "--json", "list")
    order = next(r for r in json.loads(out) if r["run_id"] == "order-7")
    assert (order["status"], order["verified"], order["corrupt"]) == ("failed", True, ["sqlite"])
