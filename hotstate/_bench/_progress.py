"""Progress bars for ``hotstate bench``: one line redrawn in place on a terminal.

When stderr is not a terminal (CI logs, pipes) it prints a plain line at each
quarter instead, so logs stay short.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


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
            width = 28
            filled = int(frac * width)
            bar = "#" * filled + "." * (width - filled)
            text = f"\r  {self.label:<26} [{bar}] {self.done}/{self.total} {elapsed:5.1f}s {self._note}"
            self.stream.write(text[:140].ljust(100))
            self.stream.flush()
        elif int(frac * 4) > self._quarter:
            self._quarter = int(frac * 4)
            self.stream.write(f"  {self.label}: {self.done}/{self.total} ({elapsed:.1f}s) {self._note}\n")
            self.stream.flush()

    def close(self) -> None:
        """End the bar's line."""
        if self.tty:
            self.stream.write("\r" + " " * 140 + "\r")
            self.stream.flush()

    def __enter__(self) -> Progress:
        self._draw()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
