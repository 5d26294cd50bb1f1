"""Accuracy-vs-epoch curves: RAUC and epochs-to-reach (definitions in docs/STUDY.md).

A curve is its evaluation points (epochs ascending, accuracy at each), read as the
piecewise-linear function through them. Pure functions over sequences of numbers.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import numpy as np


def _as_curve(epochs: Sequence[float], values: Sequence[float]) -> Tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(epochs, dtype=float), np.asarray(values, dtype=float)
    if x.ndim != 1 or x.shape != y.shape or x.size == 0:
        raise ValueError(f"a curve needs as many values as epochs (at least one), got {x.shape} and {y.shape}")
    if np.any(np.diff(x) <= 0):
        raise ValueError(f"curve epochs must be strictly increasing, got {x.tolist()}")
    return x, y


def area_under(epochs: Sequence[float], values: Sequence[float], start: float, end: float) -> float:
    """Integral over [start, end] of the piecewise-linear curve (inside its epoch range)."""
    x, y = _as_curve(epochs, values)
    if not x[0] <= start <= end <= x[-1]:
        raise ValueError(f"[{start}, {end}] is outside the curve's epochs [{x[0]}, {x[-1]}]")
    grid = np.unique(np.concatenate([[start, end], x[(x > start) & (x < end)]]))
    g = np.interp(grid, x, y)
    return float(np.sum(np.diff(grid) * (g[1:] + g[:-1]) / 2))


def common_range(*curves: Tuple[Sequence[float], Sequence[float]]) -> Tuple[float, float]:
    """[latest first epoch, earliest last epoch] of the curves."""
    xs = [_as_curve(e, v)[0] for e, v in curves]
    return max(x[0] for x in xs), min(x[-1] for x in xs)


def rauc(baseline_epochs: Sequence[float], baseline_values: Sequence[float],
         mto_epochs: Sequence[float], mto_values: Sequence[float]) -> float:
    """Area under MTO's curve / area under the baseline's, over their common epoch range."""
    start, end = common_range((baseline_epochs, baseline_values), (mto_epochs, mto_values))
    if not start < end:
        raise ValueError(f"the curves share no epoch interval (common range [{start}, {end}]); "
                         "RAUC needs at least two evaluation epochs in common")
    base = area_under(baseline_epochs, baseline_values, start, end)
    if base <= 0:
        raise ValueError("the baseline's area is zero; RAUC is undefined")
    return area_under(mto_epochs, mto_values, start, end) / base


def epochs_to_reach(epochs: Sequence[float], values: Sequence[float], target: float) -> Optional[float]:
    """First epoch at which the piecewise-linear curve reaches `target`; None if it never does."""
    x, y = _as_curve(epochs, values)
    if y[0] >= target:
        return float(x[0])
    for i in range(1, len(x)):
        if y[i] >= target:
            return float(x[i - 1] + (target - y[i - 1]) / (y[i] - y[i - 1]) * (x[i] - x[i - 1]))
    return None


def epochs_to_reach_is_bound(epochs: Sequence[float], values: Sequence[float], target: float) -> bool:
    """Whether epochs_to_reach(...) is only an upper bound: the curve's first point, after some
    training (epoch > 0), already reaches `target`, so it got there at that epoch or before."""
    x, y = _as_curve(epochs, values)
    return bool(y[0] >= target and x[0] > 0)


def compare_curves(baseline_epochs: Sequence[float], baseline_values: Sequence[float],
                   mto_epochs: Sequence[float], mto_values: Sequence[float]) -> Dict[str, Optional[float]]:
    """The study's numbers for one baseline/MTO pair (keys documented in docs/STUDY.md)."""
    bx, by = _as_curve(baseline_epochs, baseline_values)
    mx, my = _as_curve(mto_epochs, mto_values)
    target = float(by[-1])
    reach = epochs_to_reach(mx, my, target)
    baseline_reach = epochs_to_reach(bx, by, target)  # its last epoch, or earlier if it plateaued
    try:
        ratio: Optional[float] = rauc(bx, by, mx, my)
    except ValueError:
        ratio = None
    return {
        "rauc": ratio,
        "baseline_final_epoch": float(bx[-1]),
        "baseline_final_top1": target,
        "mto_final_epoch": float(mx[-1]),
        "mto_final_top1": float(my[-1]),
        # Paired only at the same epoch: a shorter curve's last point is not a final accuracy.
        "mto_minus_baseline_final_top1": float(my[-1]) - target if mx[-1] == bx[-1] else None,
        "baseline_epochs_to_final": baseline_reach,
        "mto_epochs_to_baseline": reach,
        "epoch_saving": None if reach is None or not baseline_reach else 1.0 - reach / baseline_reach,
        "baseline_epochs_to_final_is_bound": epochs_to_reach_is_bound(bx, by, target),
        "mto_epochs_to_baseline_is_bound": reach is not None and epochs_to_reach_is_bound(mx, my, target),
    }
