"""Progress bars for ``hotstate bench``: one line redrawn in place on a terminal.

The line is sized to the terminal (``$COLUMNS`` first, as ``shutil`` does) at each
redraw and never fills the last column, so it does not wrap and scroll. When
stderr is not a terminal (CI logs, pipes) it prints a plain line at each quarter
instead, so logs stay short.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from typing import TextIO

_LABEL_WIDTH = 26
_BAR_WIDTH = 28
_MIN_BAR_WIDTH = 4  # narrower than this, a bar says nothing: leave it out
_BAR_BEFORE_NOTE = 10  # the bar yields columns to the note down to this width


def terminal_columns(stream: TextIO) -> int:
    """The width of the terminal ``stream`` draws on.

    ``$COLUMNS`` wins when set, as in ``shutil.get_terminal_size``. Otherwise the
    stream's own terminal is asked, since stdout may be redirected while the bar
    draws on stderr; then ``shutil`` (stdout's terminal, else 80).

    Args:
        stream: the stream the bar writes to.

    Returns:
        The number of columns, at least 1.
    """
    env = os.environ.get("COLUMNS", "")
    if env.isdecimal() and int(env) > 0:
        return int(env)
    try:
        columns = os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError):  # no fileno (io.UnsupportedOperation), not a tty
        columns = 0
    return max(1, columns or shutil.get_terminal_size().columns)


def render(label: str, done: int, total: int, elapsed: float, note: str, columns: int) -> str:
    """One bar line for a terminal ``columns`` wide, at most ``columns - 1`` long.

    The counts and time come first. The label shrinks to leave them room, the
    bar gives way to the note down to 10 columns (and is left out below 4),
    and the note is cut at the edge. The line is padded with spaces to its
    full width, so that it covers a longer line drawn before it.

    Args:
        label: what is being measured.
        done: units done.
        total: units in all.
        elapsed: seconds since the start.
        note: the current point, shown after the counts if there is room.
        columns: the terminal's width.

    Returns:
        The line, without the leading carriage return.
    """
    room = columns - 1  # writing the last column makes some terminals wrap
    stats = f"{done}/{total} {elapsed:5.1f}s"
    label_width = max(0, min(_LABEL_WIDTH, room // 3, room - len(stats) - 3))
    head = f"  {label[:label_width]:<{label_width}} "
    free = room - len(head) - len(stats) - 3  # "[", "] " around the bar
    after_note = free - len(note) - 1 if note else free
    bar_width = min(_BAR_WIDTH, max(after_note, min(free, _BAR_BEFORE_NOTE)))
    if bar_width >= _MIN_BAR_WIDTH:
        filled = int(done / max(1, total) * bar_width)
        head += "[" + "#" * filled + "." * (bar_width - filled) + "] "
    line = f"{head}{stats} {note}" if note else head + stats
    return line[:room].ljust(room)


class Progress:
    """A progress bar for one suite.

    Args:
        label: what is being measured.
        total: the number of units of work.
        stream: where to draw (default stderr).
    """

    def __init__(self, label: str, total: int, *, stream: TextIO | None = None) -> None:
        self.label = label
        self.total = max(1, total)
        self.done = 0
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self._t0 = time.perf_counter()
        self._quarter = 0
        self._note = ""
        self._width = 0  # the columns of the last line drawn, for close()

    def advance(self, units: int = 1, note: str = "") -> None:
        """Record ``units`` more done, with an optional note (the current point)."""
        self.done = min(self.total, self.done + units)
        self._note = note
        self._draw()

    def update(self, done: int, total: int, note: str = "") -> None:
        """Set the absolute position (the ``progress(done, total, note)`` callback shape)."""
        self.total = max(1, total)
        self.done = min(self.total, done)
        self._note = note
        self._draw()

    def _draw(self) -> None:
        frac = self.done / self.total
        elapsed = time.perf_counter() - self._t0
        if self.tty:
            # Measured at every redraw: the terminal may be resized mid-suite.
            columns = terminal_columns(self.stream)
            line = render(self.label, self.done, self.total, elapsed, self._note, columns)
            self._width = len(line)
            self.stream.write("\r" + line)
            self.stream.flush()
        elif int(frac * 4) > self._quarter:
            self._quarter = int(frac * 4)
            self.stream.write(f"  {self.label}: {self.done}/{self.total} ({elapsed:.1f}s) {self._note}\n")
            self.stream.flush()

    def close(self) -> None:
        """End the bar's line."""
        if self.tty:
            width = min(self._width, terminal_columns(self.stream) - 1)
            self.stream.write("\r" + " " * width + "\r")
            self.stream.flush()

    def __enter__(self) -> Progress:
        self._draw()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
