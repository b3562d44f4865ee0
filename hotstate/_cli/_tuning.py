"""The decision behind ``hotstate advise``: measured figures in, a ``FlushPolicy`` per tier out.

Pure: no I/O except ``load_measurements`` (reads a results file). The rules are
in ``hotstate._cli._advise``'s docstring, which ``hotstate advise --help`` shows.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from hotstate._bench._results import results_dir
from hotstate._bench._sweep import SweepPoint
from hotstate._errors import ConfigError
from hotstate._validate import number
from hotstate.persistence import FlushPolicy

__all__ = [
    "DEFAULT_FLUSH_RATE",
    "DEFAULT_THROUGH_RATE",
    "Measurements",
    "Recommendation",
    "SweepPoint",
    "TierAdvice",
    "advise",
    "load_measurements",
    "measurements_from_results",
]

TIERS: Final = ("valkey", "sqlite")

DEFAULT_FLUSH_RATE: Final[dict[str, float]] = {"valkey": 100_000.0, "sqlite": 50_000.0}
"""Built-in sustained flush rates (snapshots/s), used without benchmark results."""

DEFAULT_THROUGH_RATE: Final[dict[str, float]] = {"valkey": 20_000.0, "sqlite": 5_000.0}
"""Built-in write-through capacities (steps/s), used without benchmark results."""

MIN_INTERVAL: Final = 0.001  # seconds; below it per-flush overhead dominates
ROWS_PER_UPDATE: Final = 2  # one snapshot + one transition
CYCLES_OF_HEADROOM: Final = 4
MIN_PENDING_ROWS: Final = 10_000


@dataclass(frozen=True, slots=True, kw_only=True)
class Measurements:
    """What the advice is based on.

    Attributes:
        source: where the figures came from (a path, or ``"built-in defaults"``).
        flush_rate: sustained flush rate per tier (snapshots/s).
        through_rate: write-through capacity per tier (steps/s).
        sweep: measured intervals, if any.
        defaulted: ``(tier, figure)`` pairs filled in from the built-in defaults.
    """

    source: str
    flush_rate: dict[str, float]
    through_rate: dict[str, float]
    sweep: tuple[SweepPoint, ...] = ()
    defaulted: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class TierAdvice:
    """The recommendation for one tier.

    Attributes:
        tier: the tier.
        policy: the recommended policy.
        code: the policy as Python code.
        feasible: False when the requirement cannot be met on this tier.
        loss_window: the expected worst-case loss window (seconds).
        reasons: why.
        warnings: what to watch out for.
    """

    tier: str
    policy: FlushPolicy
    code: str
    feasible: bool
    loss_window: float
    reasons: tuple[str, ...]
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Recommendation:
    """The advice for every tier.

    Attributes:
        updates_per_second: the load asked about.
        max_loss: the loss tolerated (seconds).
        source: where the figures came from.
        notes: remarks about the figures (e.g. defaults used).
        tiers: the advice per tier.
    """

    updates_per_second: float
    max_loss: float
    source: str
    notes: tuple[str, ...]
    tiers: tuple[TierAdvice, ...] = field(default_factory=tuple)

    @property
    def feasible(self) -> bool:
        """True when every tier can meet the requirement."""
        return all(t.feasible for t in self.tiers)


# --- the decision (pure) ----------------------------------------------------


def _round_down(value: float, digits: int = 2) -> float:
    if value <= 0:
        return value
    scale = 10.0 ** (digits - 1 - math.floor(math.log10(value)))
    return math.floor(value * scale) / scale


def _code(policy: FlushPolicy) -> str:
    if policy.write_through:
        return "FlushPolicy.through()"
    return f"FlushPolicy(interval={policy.interval!r}, max_pending_rows={policy.max_pending_rows:_})"


def _pending_rows(rate: float, cycle: float) -> int:
    rows = ROWS_PER_UPDATE * rate * cycle * CYCLES_OF_HEADROOM
    return max(MIN_PENDING_ROWS, math.ceil(rows))


def _origin(m: Measurements, tier: str, figure: str) -> str:
    return "built-in default" if f"{tier} {figure}" in m.defaulted else "measured"


def _through(tier: str, rate: float, m: Measurements) -> TierAdvice:
    capacity = m.through_rate[tier]
    policy = FlushPolicy.through()
    reasons = [
        "max-loss 0: a step's snapshot must be durable before its run advances, "
        "so write-through; runs waiting at once share one commit (group commit)",
        f"{_origin(m, tier, 'write-through capacity')} write-through capacity "
        f"{capacity:,.0f} steps/s vs {rate:,.0f} updates/s",
    ]
    warnings: list[str] = []
    if rate > capacity:
        warnings.append(
            f"{rate:,.0f} updates/s exceeds the write-through capacity of {capacity:,.0f} "
            "steps/s: steps will wait on commits and throughput caps near that figure"
        )
    return TierAdvice(
        tier=tier,
        policy=policy,
        code=_code(policy),
        feasible=rate <= capacity,
        loss_window=0.0,
        reasons=tuple(reasons),
        warnings=tuple(warnings),
    )


def _from_sweep(tier: str, rate: float, max_loss: float, points: list[SweepPoint]) -> TierAdvice | None:
    fits = [p for p in points if p.loss_window_max <= max_loss]
    if not fits:
        return None
    best = max(fits, key=lambda p: p.interval)
    cycle = best.interval + best.flush_duration
    policy = FlushPolicy(interval=best.interval, max_pending_rows=_pending_rows(rate, cycle))
    reasons = [
        f"the largest measured interval whose max loss window fits {max_loss:g} s: "
        f"{best.interval:g} s (loss window max {best.loss_window_max:.3g} s, "
        f"p50 {best.loss_window_p50:.3g} s, flush {best.flush_duration:.3g} s, "
        f"{best.steps_per_s:,.0f} steps/s)",
        _bound_reason(policy, rate),
    ]
    warnings = []
    if best.steps_per_s < rate:
        warnings.append(
            f"measured at {best.steps_per_s:,.0f} steps/s, below {rate:,.0f} updates/s: "
            "flushes are larger at your load and the loss window may be longer"
        )
    return TierAdvice(
        tier=tier,
        policy=policy,
        code=_code(policy),
        feasible=True,
        loss_window=best.loss_window_max,
        reasons=tuple(reasons),
        warnings=tuple(warnings),
    )


def _bound_reason(policy: FlushPolicy, rate: float) -> str:
    rows = policy.max_pending_rows or 0
    return (
        f"max_pending_rows={rows:,}: about {CYCLES_OF_HEADROOM} flush cycles of "
        f"unflushed rows ({ROWS_PER_UPDATE} per update); if the tier stops, steps wait "
        f"after {rows / (ROWS_PER_UPDATE * rate):.3g} s instead of memory growing"
    )


def _from_rate(tier: str, rate: float, max_loss: float, m: Measurements) -> TierAdvice:
    capacity = m.flush_rate[tier]
    reasons = [
        f"{_origin(m, tier, 'flush rate')} sustained flush rate {capacity:,.0f} "
        "snapshots/s; assuming every update "
        "dirties a distinct run (no coalescing, the worst case)"
    ]
    if rate >= capacity:
        interval = _round_down(max_loss / 2)
        policy = FlushPolicy(interval=interval, max_pending_rows=_pending_rows(rate, max_loss))
        warning = (
            f"{rate:,.0f} updates/s needs a flush rate above the "
            f"{_origin(m, tier, 'flush rate')} sustained capacity of {capacity:,.0f} snapshots/s: the tier falls behind at any "
            "interval and backpressure caps throughput near that figure; "
            f"unflushed rows reach the bound after "
            f"{(policy.max_pending_rows or 0) / (ROWS_PER_UPDATE * (rate - capacity) or 1):.3g} s "
            "when the capacity is exceeded"
        )
        return TierAdvice(
            tier=tier,
            policy=policy,
            code=_code(policy),
            feasible=False,
            loss_window=math.inf,
            reasons=(*reasons, _bound_reason(policy, rate)),
            warnings=(warning,),
        )
    interval = _round_down(max_loss / (1 + rate / capacity))
    duration = rate * interval / capacity
    reasons.append(
        f"interval = max-loss minus one flush: {interval:g} s, flushing "
        f"{rate * interval:,.0f} rows in about {duration:.3g} s; worst-case loss "
        f"{interval + duration:.3g} s <= {max_loss:g} s"
    )
    if interval < MIN_INTERVAL:
        through = _through(tier, rate, m)
        note = (
            f"the interval would be {interval:g} s, under {MIN_INTERVAL:g} s, where "
            "per-flush overhead dominates: write-through (group commit) instead"
        )
        return TierAdvice(
            tier=tier,
            policy=through.policy,
            code=through.code,
            feasible=through.feasible,
            loss_window=0.0,
            reasons=(*reasons, note, *through.reasons[1:]),
            warnings=through.warnings,
        )
    policy = FlushPolicy(interval=interval, max_pending_rows=_pending_rows(rate, interval + duration))
    reasons.append(_bound_reason(policy, rate))
    return TierAdvice(
        tier=tier,
        policy=policy,
        code=_code(policy),
        feasible=True,
        loss_window=interval + duration,
        reasons=tuple(reasons),
    )


def advise(
    *,
    updates_per_second: float,
    max_loss: float,
    measurements: Measurements,
    tiers: tuple[str, ...] = TIERS,
) -> Recommendation:
    """Recommend a flush policy per tier (the rules are in the module docstring).

    Args:
        updates_per_second: the expected load (> 0, finite).
        max_loss: seconds of work a crash may lose (>= 0, finite).
        measurements: the figures to base it on.
        tiers: the tiers to advise on.

    Returns:
        The recommendation.

    Raises:
        ConfigError: a bad number (negative, zero rate, NaN, infinite) or tier.
    """
    rate = number("updates_per_second", updates_per_second, strict=True)
    loss = number("max_loss", max_loss)
    for tier in tiers:
        if tier not in TIERS:
            raise ConfigError("tier", tier, f"must be one of {list(TIERS)}")
    advice: list[TierAdvice] = []
    for tier in tiers:
        points = [p for p in measurements.sweep if p.tier == tier]
        if loss == 0:
            advice.append(_through(tier, rate, measurements))
            continue
        swept = _from_sweep(tier, rate, loss, points) if points else None
        if swept is None:
            fallback = _from_rate(tier, rate, loss, measurements)
            if points:
                smallest = min(points, key=lambda p: p.loss_window_max)
                fallback = _with_reason(
                    fallback,
                    (
                        f"no measured interval fits {loss:g} s (the best, {smallest.interval:g} s, "
                        f"lost up to {smallest.loss_window_max:.3g} s); computed from the flush rate"
                    ),
                )
            swept = fallback
        advice.append(swept)
    notes = [f"{d} from built-in defaults" for d in measurements.defaulted]
    return Recommendation(
        updates_per_second=rate,
        max_loss=loss,
        source=measurements.source,
        notes=tuple(notes),
        tiers=tuple(advice),
    )


def _with_reason(advice: TierAdvice, reason: str) -> TierAdvice:
    return TierAdvice(
        tier=advice.tier,
        policy=advice.policy,
        code=advice.code,
        feasible=advice.feasible,
        loss_window=advice.loss_window,
        reasons=(reason, *advice.reasons),
        warnings=advice.warnings,
    )


# --- reading results --------------------------------------------------------


def _positive(value: object, *, allow_zero: bool = False) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    ok = math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    return float(value) if ok else None


# Sweep fields: the interval and throughput must be > 0; a loss window or a
# flush duration may be measured as 0.
_SWEEP_FIELDS: Final = (
    ("interval", False),
    ("steps_per_s", False),
    ("loss_window_max", True),
    ("loss_window_p50", True),
    ("flush_duration", True),
)


def _sweep(raw: object) -> tuple[SweepPoint, ...]:
    if not isinstance(raw, list):
        return ()
    points = []
    for item in raw:
        if not isinstance(item, dict) or item.get("tier") not in TIERS:
            continue
        values = {name: _positive(item.get(name), allow_zero=zero) for name, zero in _SWEEP_FIELDS}
        if any(v is None for v in values.values()):
            continue
        points.append(
            SweepPoint(
                tier=str(item["tier"]),
                interval=float(values["interval"] or 0),
                steps_per_s=float(values["steps_per_s"] or 0),
                loss_window_max=float(values["loss_window_max"] or 0),
                loss_window_p50=float(values["loss_window_p50"] or 0),
                flush_duration=float(values["flush_duration"] or 0),
                trials=int(item.get("trials") or 0),
                within_target=bool(item.get("within_target")),
            )
        )
    return tuple(points)


def measurements_from_results(data: object, source: str) -> Measurements:
    """Pick the figures ``advise`` needs from a results document.

    Missing figures are filled from the built-in defaults and listed in
    ``Measurements.defaulted``.

    Args:
        data: the parsed ``latest.json`` (``{"figures": [...], "sweep": [...]}``).
        source: where it came from (shown to the user).

    Returns:
        The measurements.

    Raises:
        ConfigError: ``data`` is not a results document.
    """
    if not isinstance(data, dict) or not isinstance(data.get("figures", []), list):
        raise ConfigError("results", source, "not a hotstate benchmark results document")
    flush: dict[str, float] = {}
    through: dict[str, list[float]] = {t: [] for t in TIERS}
    for fig in data.get("figures", []):
        if not isinstance(fig, dict) or not isinstance(fig.get("name"), str):
            continue
        name, value = fig["name"], _positive(fig.get("value"))
        if value is None:
            continue
        for tier in TIERS:
            if name == f"persister -> {tier}":
                flush[tier] = value
            elif name.startswith(f"write-through {tier}"):
                through[tier].append(value)
    defaulted: list[str] = []
    for tier in TIERS:
        if tier not in flush:
            flush[tier] = DEFAULT_FLUSH_RATE[tier]
            defaulted.append(f"{tier} flush rate")
    through_rate: dict[str, float] = {}
    for tier in TIERS:
        if through[tier]:
            through_rate[tier] = min(through[tier])  # conservative: the lowest concurrency's
        else:
            through_rate[tier] = DEFAULT_THROUGH_RATE[tier]
            defaulted.append(f"{tier} write-through capacity")
    return Measurements(
        source=source,
        flush_rate=flush,
        through_rate=through_rate,
        sweep=_sweep(data.get("sweep")),
        defaulted=tuple(defaulted),
    )


def _defaults(source: str) -> Measurements:
    return measurements_from_results({"figures": []}, source)


def load_measurements(path_arg: str | None) -> Measurements:
    path = Path(path_arg) if path_arg else results_dir() / "latest.json"
    if not path.exists():
        if path_arg:
            raise FileNotFoundError(f"no such results file: {str(path)!r}")
        return _defaults(f"built-in defaults (no results at {path}; run `hotstate bench` to measure)")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError("results", str(path), f"cannot read: {exc}") from exc
    return measurements_from_results(data, str(path))
