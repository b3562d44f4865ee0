"""Generated argument lists for ``hotstate runs`` and ``hotstate advise``: never a traceback.

Every outcome is argparse's ``SystemExit``, a zero status, or a non-zero status
with a ``hotstate: ...`` message. Valkey URLs come from a fixed list of
unreachable or malformed ones, so no example can touch a real server.
"""

from __future__ import annotations

import contextlib
import io
from typing import TYPE_CHECKING

import anyio
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from hotstate._cli import main
from hotstate.persistence import SQLiteStore

if TYPE_CHECKING:
    from pathlib import Path

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_URLS = [
    "valkey://127.0.0.1:1/0",
    "http://example.com",
    "",
    "valkey://127.0.0.1:1/notadb",
    "unix:///nonexistent/hotstate.sock",
    "rediss://127.0.0.1:1/0",
    "valkey://[::1",
]

_RUNS_WORDS = [
    "list",
    "show",
    "history",
    "dead-letters",
    "retry",
    "--status",
    "--workflow",
    "--limit",
    "--json",
    "--prefix",
    "--help",
    "running",
    "failed",
    "0",
    "-1",
    "3",
    "nan",
    "run-1",
    "--",
]
_ADVISE_WORDS = [
    "--updates-per-second",
    "--max-loss",
    "--results",
    "--json",
    "--tier",
    "sqlite",
    "valkey",
    "0",
    "-1",
    "1e9",
    "0.5",
    "nan",
    "inf",
    "-inf",
    "1e-300",
    "1e308",
    "2",
    "--help",
]


async def _empty_store(path: Path) -> None:
    async with SQLiteStore(path):
        pass


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("fuzz") / "runs.db"
    anyio.run(_empty_store, path)
    return str(path)


def _words(words: list[str]) -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(words), st.text(max_size=12))


def _check(argv: list[str]) -> None:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status: object = main(argv)
        except SystemExit as exc:
            status = exc
    if isinstance(status, SystemExit):
        # argparse: --help (0) or a usage error (2), with its message.
        assert status.code in (0, 2), (argv, status.code)
        assert status.code == 0 or "usage:" in err.getvalue()
        return
    assert isinstance(status, int)
    text = err.getvalue()
    assert "Traceback" not in text
    if status != 0:
        assert text.splitlines()[-1].startswith("hotstate"), (argv, text)


@FUZZ
@given(
    store=st.one_of(
        st.just(["--sqlite", "<db>"]),
        st.builds(lambda u: ["--valkey-url", u], st.sampled_from(_URLS)),
        st.builds(
            lambda p: ["--sqlite", p],
            st.text(max_size=12).filter(lambda p: p.strip("\x00") == p),
        ),
        st.just([]),
    ),
    rest=st.lists(_words(_RUNS_WORDS), max_size=6),
)
def test_runs_never_raises_a_traceback(db: str, store: list[str], rest: list[str]) -> None:
    _check(["runs", *[db if s == "<db>" else s for s in store], *rest])


@FUZZ
@given(rest=st.lists(_words(_ADVISE_WORDS), max_size=8))
def test_advise_never_raises_a_traceback(rest: list[str]) -> None:
    _check(["advise", *rest])


@FUZZ
@given(
    rate=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-(10**6), 10**12)),
    loss=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10, 10**6)),
)
def test_advise_on_any_numbers_gives_advice_or_a_usage_error(rate: float, loss: float) -> None:
    _check(
        [
            "advise",
            "--updates-per-second",
            str(rate),
            "--max-loss",
            str(loss),
            "--results",
            "/nonexistent/hotstate-fuzz.json",
        ]
    )
