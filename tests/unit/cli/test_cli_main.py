"""The ``hotstate`` dispatcher: help, unknown commands and argument errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from hotstate._cli import main
from hotstate._cli._main import SUBCOMMAND_MODULES, build_parser


def exit_code(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[object, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def test_runs_and_advise_are_registered() -> None:
    assert "hotstate._cli._runs" in SUBCOMMAND_MODULES
    assert "hotstate._cli._advise" in SUBCOMMAND_MODULES
    usage = build_parser().format_help()
    assert "runs" in usage
    assert "advise" in usage


def test_every_subcommand_bench_included_is_registered_by_the_one_application() -> None:
    assert "hotstate._cli._bench" in SUBCOMMAND_MODULES
    assert all(name.startswith("hotstate._cli.") for name in SUBCOMMAND_MODULES)
    usage = build_parser().format_help()
    assert all(command in usage for command in ("bench", "demo", "runs", "advise"))


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["runs", "--help"],
        ["runs", "list", "--help"],
        ["runs", "retry", "--help"],
        ["advise", "--help"],
        ["bench", "--help"],
        ["demo", "--help"],
    ],
)
def test_help_prints_usage_and_exits_0(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = exit_code(capsys, *argv)
    assert code == 0
    assert out.startswith("usage: hotstate")
    assert err == ""


def test_advise_help_documents_the_rules(capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = exit_code(capsys, "advise", "--help")
    assert "write-through" in out
    assert "max_pending_rows" in out


def test_no_command_prints_help_on_stderr_and_returns_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main([]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "usage: hotstate" in err


def test_an_unknown_command_exits_2_naming_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = exit_code(capsys, "frobnicate")
    assert code == 2
    assert out == ""
    assert "invalid choice: 'frobnicate'" in err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["runs", "--sqlite", "x.db", "explode"], "invalid choice"),
        (["runs", "--sqlite", "x.db", "show"], "RUN_ID"),
        (["runs", "--sqlite", "x.db", "list", "--limit", "many"], "not an integer"),
        (["runs", "--sqlite", "x.db", "list", "--limit", "-1"], "must be >= 1"),
        (
            ["runs", "--sqlite", "x.db", "list", "--status", "sleeping"],
            "invalid choice",
        ),
        (["advise"], "required"),
        (["advise", "--updates-per-second", "10"], "--max-loss"),
        (["advise", "--updates-per-second", "ten", "--max-loss", "1"], "not a number"),
        (
            [
                "advise",
                "--updates-per-second",
                "1",
                "--max-loss",
                "1",
                "--tier",
                "disk",
            ],
            "invalid choice",
        ),
    ],
)
def test_argument_errors_exit_2_with_a_message(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = exit_code(capsys, *argv)
    assert code == 2
    assert out == ""
    assert needle in err
    assert "Traceback" not in err


def test_runs_without_an_action_returns_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["runs", "--sqlite", "x.db"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "choose an action" in err


def test_the_installed_entry_point_runs_as_a_module() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "hotstate",
            "advise",
            "--updates-per-second",
            "-1",
            "--max-loss",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.startswith("hotstate: advise: --updates-per-second=-1.0")
