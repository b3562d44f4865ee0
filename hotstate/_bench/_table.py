"""Plain text tables: the bench summary, the demo and ``hotstate runs`` print them (a leaf)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def render_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """Render ``rows`` as a text table under ``headers``.

    Numbers are right-aligned and thousands-separated; ``None`` shows as ``-``.
    """
    raw = [list(row) for row in rows]
    cells = [[_cell(v) for v in row] for row in raw]
    right = [
        bool(raw)
        and all(isinstance(row[i], int | float) and not isinstance(row[i], bool) for row in raw if row[i] is not None)
        for i in range(len(headers))
    ]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, text in enumerate(row):
            widths[i] = max(widths[i], len(text))

    def line(texts: Sequence[str]) -> str:
        return "  ".join(t.rjust(widths[i]) if right[i] else t.ljust(widths[i]) for i, t in enumerate(texts)).rstrip()

    out = [line(list(headers)), "  ".join("-" * w for w in widths)]
    out.extend(line(row) for row in cells)
    return "\n".join(out)
