"""The statistics every comparison rests on, in one place, on one backend (numpy; scipy for the t and rank laws).

Two kinds of replicate appear: *items* (the held-out prompts one model answers, shared by every method, so methods
are compared paired over items, with a normal interval) and *seeds* (training runs, the replicates of a study:
a t-interval over their per-seed values). A dose curve's *cost* is its coherence price in the budget's unit,
KL(reference ‖ steered) by default (ΔNLL when the sweep's ``budget_metric`` says so).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import scipy.stats
from numpy.typing import ArrayLike

Z95 = 1.959963984540054  # the normal law's 97.5 % quantile


# ------------------------------------------------------------------------------------------ over items

def mean_ci(values: ArrayLike) -> tuple[float, float, list[float]]:
    """Mean, standard error and normal 95 % CI of the finite values (NaN for fewer than two)."""
    d = np.asarray(values, dtype=np.float64).ravel()
    d = d[np.isfinite(d)]
    if len(d) < 2:
        return math.nan, math.nan, [math.nan, math.nan]
    m, se = float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d)))
    return m, se, [m - Z95 * se, m + Z95 * se]


def paired_difference(a: ArrayLike, b: ArrayLike) -> dict:
    """Mean of a − b over the items defined in both, its standard error and 95 % CI (paired over items)."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    d = (x - y)[np.isfinite(x) & np.isfinite(y)]
    m, se, (lo, hi) = mean_ci(d)
    return {"diff": m, "se": se, "ci95": [lo, hi], "n": len(d), "significant": lo > 0 or hi < 0}


# ------------------------------------------------------------------------------------------ over seeds

def t_interval(values: Sequence[float]) -> tuple[float, list[float]]:
    """Mean and 95 % t-interval of ``values`` (≥ 2, the seeds' replicates); NaN where a value is NaN."""
    v = np.asarray(values, dtype=np.float64)
    m = float(v.mean())
    half = float(scipy.stats.t.ppf(0.975, len(v) - 1)) * float(v.std(ddof=1)) / math.sqrt(len(v))
    return m, [m - half, m + half]


def over_seeds(values: Sequence[float | None], fallback_ci: Sequence[float | None] | None) -> dict:
    """Mean over the seeds with a finite value, with a t-interval over them (≥ 2 seeds); one seed keeps its
    own interval (``fallback_ci``, paired over items); none gives NaN."""
    v = [x for x in values if x is not None and math.isfinite(x)]
    if not v:
        return {"mean": math.nan, "ci95": [math.nan, math.nan], "n_seeds": 0, "per_seed": list(values)}
    if len(v) >= 2:
        m, ci = t_interval(v)
        kind = "t over seeds"
    else:
        m, kind = v[0], "paired over items"
        ci = [math.nan if x is None else float(x) for x in (fallback_ci or [None, None])]
    return {"mean": m, "ci95": ci, "ci_kind": kind, "n_seeds": len(v), "per_seed": list(values)}


# ---------------------------------------------------------------------------- a dose curve at a budget

@dataclass(frozen=True)
class IsoPoint:
    """Where one direction's walk spends the cost budget; ``crossed=False``: never spent (last point)."""

    coeff: float
    effect: float
    crossed: bool
    peak_coeff: float   # the point within budget whose effect goes furthest in the direction's sign
    peak_effect: float


def effect_at_budget(coeffs: ArrayLike, effects: ArrayLike, cost: ArrayLike, budget: float = 0.1) -> IsoPoint:
    """c* = where cost(c) first crosses ``budget`` (linear interpolation), and effect(c*) likewise.

    ``coeffs`` start at 0 and go one way with |c| strictly increasing. Walk outward; at the first point with
    cost > budget, interpolate between it and the previous point; later points are ignored even if the cost
    falls back. "Reached" is that interpolated point, or the last point if the cost never exceeds the budget
    (``crossed=False``: the effect is a lower bound, sweep further). ``peak_*`` is the sampled point or the
    crossing point with the largest sign(c)·effect: it differs from ``effect`` on non-monotone curves.
    """
    c, e, d = (np.asarray(x, dtype=float) for x in (coeffs, effects, cost))
    if not (c.ndim == 1 and c.shape == e.shape == d.shape and len(c) >= 2):
        raise ValueError(f"coeffs, effects, cost must be 1-D of the same length >= 2, got {c.shape}, {e.shape}, "
                         f"{d.shape}")
    if c[0] != 0 or not (np.all(c[1:] > 0) or np.all(c[1:] < 0)) or np.any(np.diff(np.abs(c)) <= 0):
        raise ValueError(f"coeffs must start at 0 and go one way with |c| strictly increasing, got {c.tolist()}")
    if not np.all(np.isfinite(d)) or d[0] > budget:
        raise ValueError(f"cost must be finite and within budget at c = 0, got {d.tolist()}")
    over = np.nonzero(d > budget)[0]
    if len(over):
        i = over[0]
        t = (budget - d[i - 1]) / (d[i] - d[i - 1])
        cs, es = c[i - 1] + t * (c[i] - c[i - 1]), e[i - 1] + t * (e[i] - e[i - 1])
        pc, pe = np.append(c[:i], cs), np.append(e[:i], es)
    else:
        cs, es, pc, pe = c[-1], e[-1], c, e
    j = int(np.argmax(np.sign(c[1]) * pe))  # first on ties: the smallest |c|
    return IsoPoint(float(cs), float(es), bool(len(over)), float(pc[j]), float(pe[j]))


@dataclass(frozen=True)
class IsoCoherence:
    """Both directions of one sweep at one cost budget; symmetry of their effects relative to c = 0."""

    budget: float
    effect_zero: float
    plus: IsoPoint
    minus: IsoPoint
    symmetry: float

    def to_dict(self) -> dict:
        return asdict(self)


def iso_coherence(coeffs: ArrayLike, effects: ArrayLike, cost: ArrayLike, budget: float = 0.1) -> IsoCoherence:
    """``effect_at_budget`` on c ≥ 0 and on c ≤ 0 of one sweep (in any order; c = 0 exactly once)."""
    c, e, d = (np.asarray(x, dtype=float) for x in (coeffs, effects, cost))
    if not c.shape == e.shape == d.shape or c.ndim != 1:
        raise ValueError(f"coeffs, effects, cost must be 1-D of one length, got {c.shape}, {e.shape}, {d.shape}")
    zero = np.nonzero(c == 0)[0]
    if len(zero) != 1 or not (c > 0).any() or not (c < 0).any():
        raise ValueError(f"the sweep needs c = 0 exactly once and coefficients of both signs, got {c.tolist()}")

    def side(keep: np.ndarray) -> IsoPoint:
        idx = np.concatenate([zero, np.nonzero(keep)[0][np.argsort(np.abs(c[keep]))]])
        return effect_at_budget(c[idx], e[idx], d[idx], budget)

    plus, minus, e0 = side(c > 0), side(c < 0), float(e[zero[0]])
    return IsoCoherence(float(budget), e0, plus, minus, symmetry(plus.effect - e0, minus.effect - e0))


def monotonicity(coeffs: ArrayLike, effects: ArrayLike) -> float:
    """Spearman ρ between coefficient and effect (1: effect rises with c throughout; NaN if either is constant)."""
    c, e = np.asarray(coeffs, dtype=float), np.asarray(effects, dtype=float)
    if c.shape != e.shape or c.ndim != 1 or len(c) < 2:
        raise ValueError(f"coeffs and effects must be 1-D of one length >= 2, got {c.shape}, {e.shape}")
    if np.all(c == c[0]) or np.all(e == e[0]):
        return float("nan")
    return float(scipy.stats.spearmanr(c, e).statistic)


def symmetry(effect_plus: float, effect_minus: float) -> float:
    """min(|e+|, |e−|) / max(|e+|, |e−|) if e+ > 0 > e− (changes from c = 0), else 0.

    1: both directions steer equally far, each the right way; 0: a direction does nothing or goes the wrong way.
    """
    if not effect_plus > 0 > effect_minus:
        return 0.0
    return min(effect_plus, -effect_minus) / max(effect_plus, -effect_minus)
