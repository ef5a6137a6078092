"""Steering F1 on a hand-computed example (the arithmetic is in the comments)."""

import math

import pytest

from interp_steer.evaluation.metrics import steering_f1

# target y0 = [-2, -1, 1, 2]: σ = sqrt(2.5), weights |y0|/σ normalised = [1/3, 1/6, 1/6, 1/3]
TARGET = ([-3, -2, 1, 1], [-2, -1, 1, 2], [1, -1, -1, 3])  # (y−, y0, y+)
ARBITRARY = ([1, -1], [1, -1], [1, 1])                       # item 1 flips from y0 to y+: weight 1/2


def test_hand_computed_example():
    r = steering_f1(TARGET, ARBITRARY, (0.97, 0.99, 0.98))
    assert not r.swapped
    assert r.fixes_w == pytest.approx(1 / 3) and r.breaks_w == pytest.approx(1 / 6)  # item 0 fixed, item 2 broken
    assert r.recall == pytest.approx(1 / 6) and r.arbitrary_w == pytest.approx(0.5)
    assert r.precision == pytest.approx(0.25)                                  # (1/6) / (1/6 + 1/2)
    assert r.f1_raw == pytest.approx(20.0)                                     # 2·0.25·(1/6) / (0.25 + 1/6) = 0.2
    assert r.mass_ratio == pytest.approx((0.97 / 0.99) ** 2)
    assert r.f1 == pytest.approx(20.0 * (0.97 / 0.99) ** 2)
    assert (r.fix_rate, r.break_rate, r.arbitrary_rate) == (0.25, 0.25, 0.5)
    assert r.focus == pytest.approx(1.0)                                       # 2/4 target vs 1/2 arbitrary


def test_sign_is_canonicalised_and_low_choice_mass_is_nan():
    swap = lambda t: (t[2], t[1], t[0])  # noqa: E731
    r = steering_f1(swap(TARGET), swap(ARBITRARY), (0.98, 0.99, 0.97))
    assert r.swapped and r.f1 == pytest.approx(20.0 * (0.97 / 0.99) ** 2)
    assert math.isnan(steering_f1(TARGET, ARBITRARY, (0.90, 0.99, 0.98)).f1)
    assert steering_f1(TARGET, ARBITRARY, (0.90, 0.99, 0.98), min_mass=0.5).f1 > 0
    # breaks outweighing fixes give net 0, not a negative score
    assert steering_f1(([0, 0], [1, 2], [-1, -2]), ARBITRARY, (1.0, 1.0, 1.0)).f1 == 0.0
    with pytest.raises(ValueError, match="finite"):
        steering_f1(([0, float("nan")], [1, 2], [1, 2]), ARBITRARY, (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="one length"):
        steering_f1(([0], [1, 2], [1, 2]), ARBITRARY, (1.0, 1.0, 1.0))


def test_honesty_f1_reads_the_forced_choice_series():
    """The concept's ``ends``: the same number as the metric on the arrays, NaN items dropped from a cluster, the
    choice mass the mean over both clusters' items."""
    from interp_steer.evaluation.concepts import get_concept, honesty_f1

    assert get_concept("honesty").ends is honesty_f1
    at = [{"f1_target": [TARGET[k][i] for i in range(4)] + [math.nan], "f1_control": list(ARBITRARY[k]),
           "choice_mass": [m] * 7} for k, m in enumerate((0.97, 0.99, 0.98))]
    r = honesty_f1(*at)
    assert r["steering_f1"] == pytest.approx(20.0 * (0.97 / 0.99) ** 2) and r["f1_raw"] == pytest.approx(20.0)
    assert (r["n_target"], r["n_control"]) == (4,
                                               2) and r["mass"] == pytest.approx({"minus": 0.97, "zero": 0.99, "plus": 0.98})
    empty = honesty_f1(*({**a, "f1_target": [math.nan] * 5} for a in at))
    assert math.isnan(empty["steering_f1"]) and empty["n_target"] == 0


def test_steering_f1_is_given_at_each_labelled_threshold_and_derivable_from_any_cell():
    """Masses 0.6 / 0.9 / 0.7 at −c / 0 / +c: F1 exists at the seed code's 0.5 and 0.05, is NaN at the caption's
    0.95; ``study.f1_at`` gives each threshold's F1 again from the raw value, the masses and their factor alone."""
    from interp_steer.app.study import f1_at
    from interp_steer.evaluation.concepts import F1_HEADLINE, F1_THRESHOLDS, honesty_f1

    at = [{"f1_target": [TARGET[k][i] for i in range(4)], "f1_control": list(ARBITRARY[k]), "choice_mass": [m] * 6}
          for k, m in enumerate((0.6, 0.9, 0.7))]
    r = honesty_f1(*at)
    by = {k: v["steering_f1"] for k, v in r["by_threshold"].items()}
    assert F1_THRESHOLDS[F1_HEADLINE] == 0.5 and r["min_mass"] == 0.5
    assert r["steering_f1"] == pytest.approx(20.0 * (0.6 / 0.9) ** 2) == pytest.approx(by["seed_code_at_publication"])
    assert math.isnan(by["paper_caption"]) and by["seed_code_current"] == pytest.approx(r["steering_f1"])
    for label, m in F1_THRESHOLDS.items():
        assert f1_at(r, m) == pytest.approx(by[label], nan_ok=True)


def test_control_cluster_is_deterministic_and_its_sums_are_right():
    import re

    from interp_steer.evaluation.evalsets import control_dilemmas

    items = control_dilemmas(20)
    assert [d.id for d in items] == [d.id for d in control_dilemmas(20)] and len({d.id for d in items}) == 20
    assert all(d.honest_answer is None for d in items)  # unlabelled: any flip is a side effect
    math_items = [d for d in items if d.id.startswith("ctl-math-")]
    assert len(math_items) == 10
    for d in math_items:
        a, b, p = map(int, re.search(r"Problem: (\d+) \+ (\d+)\nProposed answer: (-?\d+)", d.text).groups())
        assert (a + b == p) == (int(d.id.rsplit("-", 1)[1]) % 2 == 0)  # even k: the right sum, odd k: a wrong one
    with pytest.raises(ValueError, match="at least one"):
        control_dilemmas(0)
