"""The tuning-curve PNG (hotstate._bench._plot)."""

from __future__ import annotations

from hotstate._bench._plot import plot_tuning
from hotstate._bench._sweep import SweepPoint, to_json

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def point(tier: str, interval: float, rate: float, window: float) -> SweepPoint:
    return SweepPoint(
        tier=tier,
        interval=interval,
        steps_per_s=rate,
        loss_window_max=window,
        loss_window_p50=window / 2,
        flush_duration=0.002,
        trials=2,
        within_target=True,
    )


def test_plot_tuning_writes_a_png_with_one_point_per_policy(tmp_path):
    points = [
        point("valkey", 0.0, 9_000.0, 0.0),  # write-through, nothing lost: drawn at the floor
        point("valkey", 0.01, 20_000.0, 0.012),
        point("valkey", 0.1, 30_000.0, 0.11),
        point("sqlite", 0.0, 12_000.0, 0.001),
        point("sqlite", 1.0, 45_000.0, 1.02),
    ]
    out = plot_tuning(points, tmp_path / "figs" / "tuning.png")
    data = out.read_bytes()
    assert out == tmp_path / "figs" / "tuning.png"
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 1000
    assert data[12:16] == b"IHDR"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (800, 500)


def test_plot_tuning_accepts_the_results_json_dicts(tmp_path):
    dicts = to_json([point("sqlite", 0.1, 30_000.0, 0.09), point("sqlite", 5.0, 50_000.0, 5.1)])
    out = plot_tuning(dicts, tmp_path / "t.png", title="small")
    assert out.read_bytes().startswith(PNG_SIGNATURE)
    assert out.stat().st_size > 0
