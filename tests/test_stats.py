"""The statistics module: intervals over items and seeds against scipy, where a dose curve spends its budget."""

import math

import numpy as np
import pytest
import scipy.stats
import torch
from scipy.stats import spearmanr

from interp_steer.comparison import stats


def test_mean_ci_is_the_normal_interval_of_the_finite_values():
    x = np.array([0.3, -1.2, 2.5, 0.7, math.nan, 1.1, math.inf])
    m, se, (lo, hi) = stats.mean_ci(x)
    f = x[np.isfinite(x)]
    assert m == pytest.approx(f.mean()) and se == pytest.approx(scipy.stats.sem(f))
    assert (lo, hi) == pytest.approx(scipy.stats.norm.interval(0.95, loc=f.mean(), scale=scipy.stats.sem(f)))
    assert stats.mean_ci(torch.tensor(f)) == stats.mean_ci(list(f))  # any array-like, one answer
    assert all(math.isnan(v) for v in (*stats.mean_ci([1.0])[:2], *stats.mean_ci([1.0])[2]))


def test_paired_difference_uses_the_items_defined_in_both():
    d = stats.paired_difference([1.0, 2.0, math.nan, 4.0], [0.5, math.nan, 1.0, 3.0])
    assert d["n"] == 2 and d["diff"] == pytest.approx(0.75)


def test_over_seeds_is_a_t_interval_and_one_seed_keeps_its_items_interval():
    v = [0.2, 0.5, 0.35]
    got = stats.over_seeds(v, None)
    lo, hi = scipy.stats.t.interval(0.95, 2, loc=np.mean(v), scale=scipy.stats.sem(v))
    assert got["mean"] == pytest.approx(np.mean(v)) and got["ci95"] == pytest.approx([lo, hi])
    assert got["ci_kind"] == "t over seeds" and got["n_seeds"] == 3 and got["per_seed"] == v
    one = stats.over_seeds([0.2, None, math.nan], [0.1, 0.3])
    assert one["mean"] == 0.2 and one["ci95"] == [0.1, 0.3] and one["ci_kind"] == "paired over items"
    assert one["n_seeds"] == 1 and stats.over_seeds([None], None)["n_seeds"] == 0


def test_iso_coherence_finds_the_known_crossing_both_ways():
    c = np.array([-1.0, -0.75, -0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 1.0])
    iso = stats.iso_coherence(c, 2 * c, c**2, budget=0.25)
    assert (iso.plus.coeff, iso.plus.effect, iso.plus.crossed) == (0.5, 1.0, True)
    assert (iso.minus.coeff, iso.minus.effect, iso.minus.crossed) == (-0.5, -1.0, True)
    assert iso.symmetry == 1.0 and iso.effect_zero == 0.0
    assert iso.to_dict()["minus"] == {"coeff": -0.5, "effect": -1.0, "crossed": True, "peak_coeff": -0.5,
                                      "peak_effect": -1.0}
    # a grid that misses the crossing: linear interpolation between 0.4 (0.16) and 0.6 (0.36)
    p = stats.effect_at_budget([0, 0.4, 0.6, 1.0], [0, 0.8, 1.2, 2.0], [0, 0.16, 0.36, 1.0], budget=0.25)
    assert p.coeff == pytest.approx(0.49) and p.effect == pytest.approx(0.98) and p.crossed
    # input order does not matter
    perm = np.random.default_rng(0).permutation(len(c))
    assert stats.iso_coherence(c[perm], 2 * c[perm], c[perm] ** 2, 0.25) == iso


def test_budget_never_crossed_returns_the_last_point_flagged():
    p = stats.effect_at_budget([0, -1, -2], [0, -1, -3], [0, 0.01, 0.02], budget=0.1)
    assert (p.coeff, p.effect, p.crossed) == (-2.0, -3.0, False)
    assert (p.peak_coeff, p.peak_effect) == (-2.0, -3.0)


def test_non_monotone_curves():
    # effect peaks early, then falls before the budget is spent: effect at the crossing vs the peak
    p = stats.effect_at_budget([0, 1, 2, 3], [0, 3, 1, 0], [0, 0.05, 0.08, 0.2], budget=0.1)
    assert p.coeff == pytest.approx(2 + 1 / 6) and p.effect == pytest.approx(1 - 1 / 6) and p.crossed
    assert (p.peak_coeff, p.peak_effect) == (1.0, 3.0)
    # ΔNLL above budget, then back under it: the walk stops at the first crossing
    q = stats.effect_at_budget([0, 1, 2, 3], [0, 1, 2, 3], [0, 0.2, 0.05, 0.01], budget=0.1)
    assert q.coeff == pytest.approx(0.5) and q.effect == pytest.approx(0.5) and q.crossed
    # a minus direction that goes the wrong way: its peak stays at c = 0
    iso = stats.iso_coherence([-2, -1, 0, 1, 2], [1, 0.5, 0, 1, 2], [0.02, 0.01, 0, 0.01, 0.02])
    assert iso.minus.effect == 1.0 and iso.minus.peak_coeff == 0.0 and iso.symmetry == 0.0


def test_curve_inputs_are_validated():
    with pytest.raises(ValueError, match="start at 0"):
        stats.effect_at_budget([0.5, 1], [0, 1], [0, 0.1])
    with pytest.raises(ValueError, match="start at 0"):
        stats.effect_at_budget([0, 1, -1], [0, 1, 1], [0, 0.1, 0.1])
    with pytest.raises(ValueError, match="same length"):
        stats.effect_at_budget([0, 1], [0, 1, 2], [0, 0.1])
    with pytest.raises(ValueError, match="both signs"):
        stats.iso_coherence([0, 1, 2], [0, 1, 2], [0, 0.1, 0.2])
    with pytest.raises(ValueError, match="c = 0"):
        stats.iso_coherence([-1, 1], [0, 1], [0.1, 0.1])


def test_monotonicity_is_spearman_rho():
    c = [-2, -1, 0, 1, 2]
    assert stats.monotonicity(c, [-5, -1, 0, 0.1, 9]) == pytest.approx(1.0)
    assert stats.monotonicity(c, [3, 2, 1, 0, -1]) == pytest.approx(-1.0)
    e = [0, 2, 1, 3, 2.5]
    assert stats.monotonicity(c, e) == pytest.approx(spearmanr(c, e).statistic)
    assert np.isnan(stats.monotonicity(c, [1, 1, 1, 1, 1]))


def test_symmetry():
    assert stats.symmetry(1.0, -1.0) == 1.0
    assert stats.symmetry(2.0, -1.0) == 0.5 and stats.symmetry(0.5, -2.0) == 0.25
    assert stats.symmetry(1.0, 1.0) == 0.0 and stats.symmetry(-1.0, 1.0) == 0.0 and stats.symmetry(0.0, 0.0) == 0.0


