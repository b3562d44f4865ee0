"""The bench progress bar fits the terminal it draws on (hotstate._bench._progress)."""

from __future__ import annotations

import io
import os
import termios

import pytest

from hotstate._bench._progress import Progress, render, terminal_columns

LONG_LABEL = "persister -> valkey, write-through with group commit"
LONG_NOTE = "interval=0.010 s, max_batch_rows=10000, valkey tier, trial 3 of 5"


class FakeTerminal(io.StringIO):
    """A stream that says it is a terminal; its size comes from $COLUMNS."""

    def isatty(self) -> bool:
        return True


def lines_drawn(stream: FakeTerminal) -> list[str]:
    return stream.getvalue().split("\r")


@pytest.mark.parametrize("columns", [80, 40])
@pytest.mark.parametrize("label", ["W1 memory-only", LONG_LABEL])
@pytest.mark.parametrize("note", ["", "n=1000", LONG_NOTE])
def test_every_line_drawn_fits_the_terminal(
    monkeypatch: pytest.MonkeyPatch, columns: int, label: str, note: str
) -> None:
    monkeypatch.setenv("COLUMNS", str(columns))
    stream = FakeTerminal()
    with Progress(label, 12_345, stream=stream) as bar:
        for done in (1, 6_000, 12_345):
            bar.update(done, 12_345, note)
    drawn = lines_drawn(stream)
    assert len(drawn) > 4
    assert all(len(line) <= columns - 1 for line in drawn)
    assert "12345/12345" in drawn[-3]  # the last bar, before close() blanks it
    assert drawn[-2].strip() == ""  # close() blanks the line...
    assert drawn[-1] == ""  # ...and leaves the cursor at its start


@pytest.mark.parametrize(("columns", "bar_width"), [(140, 28), (80, 28), (40, 9), (20, 0)])
def test_the_bar_shrinks_with_the_terminal_and_drops_out_when_too_narrow(columns: int, bar_width: int) -> None:
    line = render("W1 memory-only", 5, 10, 1.25, "", columns)
    assert len(line) == columns - 1
    if bar_width:
        bar = line[line.index("[") + 1 : line.index("]")]
        assert bar == "#" * (bar_width // 2) + "." * (bar_width - bar_width // 2)
    else:
        assert "[" not in line
    assert "5/10   1.2s" in line


def test_counts_and_time_survive_at_40_columns_with_a_long_label_and_note() -> None:
    line = render(LONG_LABEL, 7, 9, 12.5, LONG_NOTE, 40)
    assert line == "  persister ->  [#######...] 7/9  12.5s"
    assert len(line) == 39


def test_the_note_shares_an_80_column_line_with_a_narrower_bar() -> None:
    line = render("sweep", 1, 4, 0.5, "interval=0.010 s valkey", 80)
    assert line.rstrip().endswith("interval=0.010 s valkey")
    bar = line[line.index("[") + 1 : line.index("]")]
    assert len(bar) == 13  # 37 columns free, less the 23-column note and a space


def test_columns_env_var_wins_and_is_read_at_every_redraw(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stream = FakeTerminal()
    monkeypatch.setenv("COLUMNS", "100")
    bar = Progress("resize", 2, stream=stream)
    bar.advance()
    monkeypatch.setenv("COLUMNS", "50")
    bar.advance()
    first, second = lines_drawn(stream)[1:]
    assert (len(first), len(second)) == (99, 49)


def test_without_columns_the_streams_own_terminal_size_is_used(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)
    leader, follower = os.openpty()
    try:
        termios.tcsetwinsize(follower, (24, 57))
        with open(follower, "w", closefd=False) as tty:
            assert terminal_columns(tty) == 57
            monkeypatch.setenv("COLUMNS", "not a number")
            assert terminal_columns(tty) == 57
            monkeypatch.setenv("COLUMNS", "0")
            assert terminal_columns(tty) == 57
    finally:
        os.close(leader)
        os.close(follower)


def test_off_a_terminal_it_prints_plain_lines_at_each_quarter() -> None:
    stream = io.StringIO()
    with Progress("scale curve", 8, stream=stream) as bar:
        for _ in range(8):
            bar.advance(note="n=1k")
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert [line.split(":")[1].split()[0] for line in lines] == [
        "2/8",
        "4/8",
        "6/8",
        "8/8",
    ]
