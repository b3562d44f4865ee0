"""``hotstate advise``: the pure decision tested with numbers, then the command itself."""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

import pytest

from hotstate import ConfigError
from hotstate._cli import main
from hotstate._cli._tuning import (
    DEFAULT_FLUSH_RATE,
    Measurements,
    SweepPoint,
    advise,
    measurements_from_results,
)
from hotstate.persistence import FlushPolicy

if TYPE_CHECKING:
    from pathlib import Path


def measured(
    flush: float = 100_000.0,
    through: float = 10_000.0,
    sweep: tuple[SweepPoint, ...] = (),
) -> Measurements:
    return Measurements(
        source="test",
        flush_rate={"valkey": flush, "sqlite": flush},
        through_rate={"valkey": through, "sqlite": through},
        sweep=sweep,
    )


def point(interval: float, loss_max: float, *, tier: str = "sqlite", steps: float = 50_000.0) -> SweepPoint:
    return SweepPoint(
        tier=tier,
        interval=interval,
        steps_per_s=steps,
        loss_window_max=loss_max,
        loss_window_p50=loss_max / 2,
        flush_duration=loss_max - interval,
        trials=3,
        within_target=True,
    )


def test_zero_max_loss_is_write_through_with_group_commit_within_capacity() -> None:
    rec = advise(updates_per_second=5_000, max_loss=0, measurements=measured(through=10_000))
    assert [t.tier for t in rec.tiers] == ["valkey", "sqlite"]
    for t in rec.tiers:
        assert t.policy == FlushPolicy.through()
        assert t.code == "FlushPolicy.through()"
        assert (t.feasible, t.loss_window, t.warnings) == (True, 0.0, ())
    assert rec.feasible


def test_zero_max_loss_above_write_through_capacity_warns_and_is_not_feasible() -> None:
    rec = advise(
        updates_per_second=20_000,
        max_loss=0,
        measurements=measured(through=10_000),
        tiers=("sqlite",),
    )
    (t,) = rec.tiers
    assert t.policy.write_through
    assert not t.feasible
    assert "exceeds the write-through capacity of 10,000" in t.warnings[0]
    assert not rec.feasible


def test_interval_is_max_loss_minus_one_flush_duration() -> None:
    # R = 10,000/s, C = 100,000/s: interval = 1 / (1 + 0.1) = 0.909.. -> 0.9 (2 digits, down);
    # a flush of 9,000 rows takes 0.09 s, so the loss window is 0.99 s <= 1 s.
    rec = advise(
        updates_per_second=10_000,
        max_loss=1.0,
        measurements=measured(flush=100_000),
        tiers=("valkey",),
    )
    (t,) = rec.tiers
    assert t.policy.interval == 0.9
    assert not t.policy.write_through
    assert t.loss_window == pytest.approx(0.99)
    assert t.loss_window <= 1.0
    assert t.feasible
    # Memory bound: 2 rows per update x 10,000/s x 0.99 s x 4 cycles.
    assert t.policy.max_pending_rows == math.ceil(2 * 10_000 * 0.99 * 4)
    assert t.code == "FlushPolicy(interval=0.9, max_pending_rows=79_200)"
    assert eval(t.code, {"FlushPolicy": FlushPolicy}) == t.policy  # noqa: S307 - the printed code is valid Python


@pytest.mark.parametrize(
    ("rate", "loss"),
    [(1, 0.01), (1_000, 0.25), (40_000, 2.0), (99_000, 30.0), (5, 3600.0)],
)
def test_the_loss_window_always_fits_and_backpressure_starts_at_a_finite_bound(rate: float, loss: float) -> None:
    (t,) = advise(
        updates_per_second=rate,
        max_loss=loss,
        measurements=measured(flush=100_000),
        tiers=("sqlite",),
    ).tiers
    assert t.feasible
    assert t.loss_window <= loss
    assert t.policy.interval >= 0.001
    bound = t.policy.max_pending_rows
    assert bound is not None
    assert bound >= 2 * rate * t.loss_window  # holds at least one cycle of rows
    assert bound >= 10_000


def test_a_rate_above_the_sustained_flush_capacity_is_refused() -> None:
    (t,) = advise(
        updates_per_second=150_000,
        max_loss=1.0,
        measurements=measured(flush=100_000),
        tiers=("sqlite",),
    ).tiers
    assert not t.feasible
    assert math.isinf(t.loss_window)
    assert "above the measured sustained capacity of 100,000" in t.warnings[0]
    assert t.policy.max_pending_rows is not None  # a bound, so memory cannot grow without one


def test_an_interval_under_a_millisecond_becomes_write_through() -> None:
    (t,) = advise(
        updates_per_second=100,
        max_loss=0.0005,
        measurements=measured(),
        tiers=("valkey",),
    ).tiers
    assert t.policy.write_through
    assert t.feasible
    assert any("under 0.001 s" in r for r in t.reasons)


def test_the_sweep_picks_the_largest_interval_whose_measured_loss_fits() -> None:
    sweep = (
        point(0.01, 0.02),
        point(0.1, 0.15),
        point(0.5, 0.7),
        point(1.0, 1.3),
        point(0.05, 0.06, tier="valkey"),
    )
    rec = advise(updates_per_second=10_000, max_loss=0.75, measurements=measured(sweep=sweep))
    by_tier = {t.tier: t for t in rec.tiers}
    assert by_tier["sqlite"].policy.interval == 0.5
    assert by_tier["sqlite"].loss_window == 0.7
    assert "largest measured interval" in by_tier["sqlite"].reasons[0]
    assert by_tier["valkey"].policy.interval == 0.05
    assert by_tier["sqlite"].warnings == ()


def test_the_sweep_warns_when_measured_below_the_asked_load() -> None:
    (t,) = advise(
        updates_per_second=80_000,
        max_loss=0.75,
        measurements=measured(sweep=(point(0.5, 0.7, steps=20_000),)),
        tiers=("sqlite",),
    ).tiers
    assert t.policy.interval == 0.5
    assert "measured at 20,000 steps/s" in t.warnings[0]


def test_no_sweep_point_fits_falls_back_to_the_flush_rate() -> None:
    (t,) = advise(
        updates_per_second=10_000,
        max_loss=0.1,
        measurements=measured(flush=100_000, sweep=(point(0.5, 0.7),)),
        tiers=("sqlite",),
    ).tiers
    assert "no measured interval fits 0.1 s" in t.reasons[0]
    assert t.policy.interval == 0.09
    assert t.loss_window <= 0.1


@pytest.mark.parametrize(
    ("rate", "loss", "field"),
    [
        (0, 1.0, "updates_per_second"),
        (-5, 1.0, "updates_per_second"),
        (math.nan, 1.0, "updates_per_second"),
        (math.inf, 1.0, "updates_per_second"),
        (10, -0.5, "max_loss"),
        (10, math.nan, "max_loss"),
        (10, math.inf, "max_loss"),
    ],
)
def test_bad_numbers_are_config_errors_naming_the_field(rate: float, loss: float, field: str) -> None:
    with pytest.raises(ConfigError) as exc:
        advise(updates_per_second=rate, max_loss=loss, measurements=measured())
    assert exc.value.field == field


def test_an_unknown_tier_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="tier"):
        advise(
            updates_per_second=1,
            max_loss=1,
            measurements=measured(),
            tiers=("memcached",),
        )


def test_results_figures_are_read_by_their_benchmark_names() -> None:
    data: dict[str, Any] = {
        "figures": [
            {"name": "persister -> sqlite", "value": 80_000.0, "unit": "snapshots/s"},
            {"name": "persister -> valkey", "value": 300_000.0, "unit": "snapshots/s"},
            {
                "name": "write-through sqlite FULL, group commit (N=1,000)",
                "value": 4_000.0,
                "unit": "steps/s",
            },
            {
                "name": "write-through sqlite FULL, group commit (N=10,000)",
                "value": 9_000.0,
                "unit": "steps/s",
            },
            {"name": "hotstate memory-only", "value": 600_000.0, "unit": "steps/s"},
            {"name": "persister -> valkey", "value": "fast"},
        ],
        "sweep": [
            {
                "tier": "sqlite",
                "interval": 0.1,
                "steps_per_s": 1e5,
                "loss_window_max": 0.2,
                "loss_window_p50": 0.12,
                "flush_duration": 0.05,
            },
            {
                "tier": "sqlite",
                "interval": -1,
                "steps_per_s": 1e5,
                "loss_window_max": 0.2,
                "loss_window_p50": 0.12,
                "flush_duration": 0.05,
            },
            {
                "tier": "valkey",
                "interval": 0.01,
                "steps_per_s": 1e5,
                "loss_window_max": 0,
                "loss_window_p50": 0,
                "flush_duration": 0.0,
            },
            {"tier": "disk"},
        ],
    }
    m = measurements_from_results(data, "x.json")
    assert m.flush_rate == {"sqlite": 80_000.0, "valkey": 300_000.0}
    assert m.through_rate["sqlite"] == 4_000.0  # the lower concurrency's: conservative
    assert m.defaulted == ("valkey write-through capacity",)
    assert [(p.tier, p.interval) for p in m.sweep] == [
        ("sqlite", 0.1),
        ("valkey", 0.01),
    ]


def test_a_document_without_figures_is_all_defaults() -> None:
    m = measurements_from_results({"loop": "uvloop"}, "x.json")
    assert m.flush_rate == DEFAULT_FLUSH_RATE
    assert len(m.defaulted) == 4
    with pytest.raises(ConfigError):
        measurements_from_results([1, 2], "x.json")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(["advise", *argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_command_without_results_uses_built_in_defaults_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HOTSTATE_BENCH_DIR", str(tmp_path / "none"))
    status, out, err = run(capsys, "--updates-per-second", "1000", "--max-loss", "0.5")
    assert (status, err) == (0, "")
    assert "figures: built-in defaults" in out
    assert "FlushPolicy(interval=" in out
    assert out.count("FlushPolicy(") == 2


def test_command_json_uses_the_given_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results = tmp_path / "latest.json"
    results.write_text(
        json.dumps(
            {
                "loop": "uvloop",
                "python": "3.12",
                "figures": [
                    {
                        "name": "persister -> sqlite",
                        "value": 50_000.0,
                        "unit": "snapshots/s",
                        "ceiling_name": "",
                        "ceiling": 0.0,
                        "ratio": None,
                    }
                ],
            }
        )
    )
    status, out, _ = run(
        capsys,
        "--updates-per-second",
        "5000",
        "--max-loss",
        "2",
        "--results",
        str(results),
        "--json",
        "--tier",
        "sqlite",
    )
    assert status == 0
    data = json.loads(out)
    assert data["source"] == str(results)
    (tier,) = data["tiers"]
    assert tier["tier"] == "sqlite"
    assert tier["policy"]["interval"] == 1.8  # 2 / (1 + 5,000 / 50,000) = 1.818 -> 1.8
    assert tier["code"].startswith("FlushPolicy(interval=1.8,")
    assert data["feasible"] is True


def test_command_exits_1_when_the_requirement_cannot_be_met(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results = tmp_path / "r.json"
    results.write_text(json.dumps({"figures": [{"name": "persister -> valkey", "value": 1_000.0}]}))
    status, out, err = run(
        capsys,
        "--updates-per-second",
        "5000",
        "--max-loss",
        "1",
        "--results",
        str(results),
        "--tier",
        "valkey",
    )
    assert status == 1
    assert "requirement NOT met" in out
    assert err == "hotstate: advise: the requirement cannot be met on valkey; see the warnings\n"


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--updates-per-second", "0", "--max-loss", "1"], "updates-per-second"),
        (["--updates-per-second", "-3", "--max-loss", "1"], "updates-per-second"),
        (["--updates-per-second", "nan", "--max-loss", "1"], "finite"),
        (["--updates-per-second", "10", "--max-loss", "-1"], "max-loss"),
        (["--updates-per-second", "10", "--max-loss", "NaN"], "finite"),
    ],
)
def test_bad_numbers_exit_2_with_one_clear_line(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = run(capsys, *argv)
    assert status == 2
    assert out == ""
    assert err.count("\n") == 1
    assert needle in err


def test_missing_or_malformed_results_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = run(
        capsys,
        "--updates-per-second",
        "1",
        "--max-loss",
        "1",
        "--results",
        str(tmp_path / "absent.json"),
    )
    assert status == 1
    assert "no such results file" in err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    status, _, err = run(capsys, "--updates-per-second", "1", "--max-loss", "1", "--results", str(bad))
    assert status == 1
    assert "cannot read" in err


def test_command_uses_the_sweep_when_the_results_have_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results = tmp_path / "latest.json"
    sweep = [
        {
            "tier": "valkey",
            "interval": i,
            "steps_per_s": 90_000.0,
            "loss_window_max": i * 1.4,
            "loss_window_p50": i * 0.7,
            "flush_duration": i * 0.3,
        }
        for i in (0.01, 0.1, 1.0)
    ]
    results.write_text(json.dumps({"figures": [], "sweep": sweep}))
    status, out, _ = run(
        capsys,
        "--updates-per-second",
        "50000",
        "--max-loss",
        "0.5",
        "--results",
        str(results),
        "--tier",
        "valkey",
    )
    assert status == 0
    assert "FlushPolicy(interval=0.1, max_pending_rows=" in out
    assert "largest measured interval" in out
