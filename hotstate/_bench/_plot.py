"""The tuning curve: throughput against the measured loss window, one point per policy/interval.

matplotlib (the ``bench`` extra) is imported inside ``plot_tuning`` with the
Agg backend, so importing this module costs nothing and needs no display.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from hotstate._bench._sweep import SweepPoint

# A loss window of 0 (nothing lost: write-through, or a kill right after a
# flush) has no place on a log axis; it is drawn at this floor and labelled.
FLOOR = 1e-4


def _fields(point: SweepPoint | Mapping[str, Any]) -> tuple[str, float, float, float]:
    if isinstance(point, dict):
        return (
            str(point["tier"]),
            float(point["interval"]),
            float(point["steps_per_s"]),
            float(point["loss_window_max"]),
        )
    p: Any = point
    return str(p.tier), float(p.interval), float(p.steps_per_s), float(p.loss_window_max)


def _label(tier: str, interval: float, window: float) -> str:
    if interval == 0:
        name = "write-through"
    elif interval < 1:
        name = f"{interval * 1000:g} ms"
    else:
        name = f"{interval:g} s"
    return f"{name}{' (0 lost)' if window <= 0 else ''}"


def plot_tuning(
    points: Sequence[SweepPoint | Mapping[str, Any]],
    path: str | Path,
    *,
    title: str = "hotstate flush policies: throughput vs measured loss window",
) -> Path:
    """Draw the tuning curve into a PNG.

    Args:
        points: sweep points (``SweepPoint`` or the dicts of ``_sweep.to_json``).
        path: where to write the PNG (parent folders are created).
        title: the figure's title.

    Returns:
        The PNG's path.

    Raises:
        ImportError: matplotlib is not installed (``pip install 'hotstate[bench]'``).
    """
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    by_tier: dict[str, list[tuple[float, float, float]]] = {}
    for point in points:
        tier, interval, rate, window = _fields(point)
        by_tier.setdefault(tier, []).append((interval, rate, window))
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    try:
        for tier, rows in sorted(by_tier.items()):
            rows.sort()
            xs = [max(w, FLOOR) for _, _, w in rows]
            ys = [r for _, r, _ in rows]
            ax.plot(xs, ys, marker="o", linestyle="-", label=tier)
            for (interval, _, window), x, y in zip(rows, xs, ys, strict=True):
                ax.annotate(
                    _label(tier, interval, window), (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8
                )
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(mpl.ticker.NullFormatter())  # decade labels only: minor ones overlap
        ax.set_xlabel(f"measured loss window, max over SIGKILL trials (s, log; 0 drawn at {FLOOR:g})")
        ax.set_ylabel("throughput (steps/s)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        if by_tier:
            ax.legend(title="tier")
        fig.tight_layout()
        fig.savefig(out, format="png")
    finally:
        plt.close(fig)
    return out
