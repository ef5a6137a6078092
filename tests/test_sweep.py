"""The sweep driver and the demo's outputs, end to end on the tiny model."""

import hashlib
import json
import math

import pytest
import torch

from interp_steer.comparison.plots import figure_sources
from interp_steer.comparison.report import comparisons, seed_groups, write_outputs
from interp_steer.comparison.stats import paired_difference
from interp_steer.comparison.sweep import (
    Method,
    MethodResult,
    Point,
    SweepData,
    adapter_method,
    at_prompting_cost,
    budget_bracket,
    dose_grid,
    iso_summary,
    paired_delta,
    prompting_method,
    run_sweep,
    vector_method,
)
from interp_steer.evaluation.concepts import get_concept
from interp_steer.evaluation.evaluate import coherence_reference, load_neutral_texts
from interp_steer.method.adapter import AdapterSpec, make_adapters
from interp_steer.method.data import pair_batches, persona_pairs
from interp_steer.method.directions import steering_vector
from interp_steer.method.states import capture
from interp_steer.names import resid_names


@pytest.fixture
def setup(tiny):
    bridge, tok = tiny
    # small on purpose: the tiny model's 49k-vocab unembedding dominates its cost
    data = SweepData(get_concept("honesty").effects(2, 1),
                     coherence_reference(bridge, tok, load_neutral_texts()[:2]),
                     budget=0.05, budget_metric="dnll", bisect_iters=1, grid=(0.5,),
                     ends=get_concept("honesty").ends)
    return bridge, tok, data


def sharpen(c):
    """A steer whose ΔNLL grows with |c| on a random model: it scales the final normed state by 1 + 20|c|."""
    def hook(act, hook):
        return act * (1 + 20 * abs(c))
    return lambda b: b.hooks(fwd_hooks=[("ln_final.hook_out", hook)])


def test_budget_search_brackets_the_budget(setup):
    bridge, tok, data = setup
    method = Method("sharpen", lambda c: sharpen(c) if c else None, c_init=0.01, c_max=10.0)
    probes = []
    lo, hi = budget_bracket(bridge, tok, method, 1.0, data, probes)
    below = [p for p in probes if p.dnll <= data.budget]
    above = [p for p in probes if p.dnll > data.budget]
    assert above and below, "the tiny model must cross the budget within c_max for this test to mean anything"
    assert lo == max(p.coeff for p in below) and hi == min(p.coeff for p in above) and lo < hi


def test_run_sweep_and_outputs(setup, tmp_path):
    bridge, tok, data = setup
    adapters = make_adapters(bridge, [AdapterSpec("blocks.1.mlp.out", rank=4)], init_scale=0.5)
    hs = capture(bridge, pair_batches(persona_pairs(tok)[:6], tok), resid_names([1]))
    methods = [adapter_method(adapters), vector_method("pca_diff", steering_vector(hs, "pca_diff")),
               prompting_method()]
    results = run_sweep(bridge, tok, methods, data, progress=False)
    assert [r.name for r in results] == ["adapter", "pca_diff", "prompting"]
    for r in results:
        zero = [p for p in r.points if p.coeff == 0]
        assert len(zero) == 1 and zero[0].dnll == 0.0 and zero[0].kl_mean == 0.0
        assert any(p.coeff > 0 for p in r.points) and any(p.coeff < 0 for p in r.points)
        assert set(r.iso) >= {"plus", "minus", "symmetry", "monotonicity"}
    assert [p.coeff for p in results[2].points] == [-1.0, 0.0, 1.0]
    for r in results:  # honesty's ends metric at the budget, from the same forced-choice pass
        ends = r.iso["ends"]
        assert ends["coeffs"] == {"minus": r.iso["minus"]["coeff"], "plus": r.iso["plus"]["coeff"]}
        assert (ends["n_target"], ends["n_control"]) == (2, 8) and set(ends["mass"]) == {"minus", "zero", "plus"}
        assert math.isnan(ends["steering_f1"]) or 0 <= ends["steering_f1"] <= 100
        assert {"precision", "recall", "focus", "f1_raw"} <= set(ends)
        zero = next(p for p in r.points if p.coeff == 0)
        assert len(zero.items["choice_mass"]) == 10 and len(zero.items["f1_control"]) == 8
        assert set(zero.effects) == {"honesty", "f1_target", "f1_control", "choice_mass", "mc_margin"}
    for r in results[:2]:  # per direction: the bracket end(s) and the grid point, and c = 0 once
        per_side = 2 + all(r.iso[s]["budget_reached"] for s in ("plus", "minus"))
        assert len(r.points) == 1 + 2 * per_side, [p.coeff for p in r.points]
    report = {"concept": "honesty", "budget": data.budget, "budget_metric": data.budget_metric,
              "effects": [{"name": e.name, "unit": e.unit} for e in data.effects],
              "data": {"items": {"honesty": 2, "mc_margin": 1}, "neutral_texts": 2},
              "timings_s": {}, "iso_table": {r.name: r.iso for r in results},
              "points": {r.name: [p.__dict__ for p in r.points] for r in results}}
    # two rows standing in for two training seeds of one method: they get a "(2 seeds)" row
    report["iso_table"].update({"m@0": results[0].iso, "m@1": results[1].iso})
    (tmp_path / "out").mkdir()
    paths = write_outputs(report, tmp_path / "out")
    loaded = json.loads((tmp_path / "out" / "report.json").read_text())  # strict JSON: no NaN
    assert set(loaded["iso_table"]) == {"adapter", "pca_diff", "prompting", "m@0", "m@1", "m (2 seeds)"}
    assert loaded["iso_table"]["m (2 seeds)"]["seeds"] == 2
    md = (tmp_path / "out" / "REPORT.md").read_text()
    assert "| adapter | + |" in md and "| m (2 seeds) | − |" in md
    assert "](figures/dose_response_coherence.png)" in md and "](figures/effect_at_budget.png)" in md
    assert {p.name for p in paths if p.parent == tmp_path / "out" / "figures"} == {
        f"{n}.{ext}" for n in ("dose_response_coefficient", "dose_response_coherence", "effect_at_budget")
        for ext in ("png", "svg")}
    digest = hashlib.sha256((tmp_path / "out" / "report.json").read_bytes()).hexdigest()
    assert all(figure_sources(p) == [(tmp_path / "out" / "report.json", digest)] for p in paths
               if p.suffix in (".png", ".svg"))  # each figure records the report it was drawn from
    write_outputs(report, tmp_path / "out")  # writing again recomputes the group rows instead of grouping them
    assert json.loads((tmp_path / "out" / "report.json").read_text())["iso_table"] == loaded["iso_table"]


def synthetic(items_by_c: dict[float, list[float]], cost=lambda c: c * c) -> list[Point]:
    return [Point("m", c, dnll=cost(c), kl_mean=cost(c), kl_p95=0.0,
                  effects={"e": float(torch.tensor(v).nanmean())}, items={"e": v}) for c, v in items_by_c.items()]


def test_iso_summary_on_synthetic_points():
    pts = synthetic({c: [2 * c, 2 * c + 0.1, 2 * c - 0.1] for c in (-1.0, -0.5, 0.0, 0.5, 1.0)})
    iso = iso_summary(pts, 0.25, "kl", "e")
    assert iso["plus"]["coeff"] == pytest.approx(0.5) and iso["plus"]["effects"]["e"]["delta"] == pytest.approx(1.0)
    assert iso["minus"]["coeff"] == pytest.approx(-0.5) and iso["minus"]["effects"]["e"]["delta"] == pytest.approx(-1.0)
    assert iso["plus"]["kl_mean"] == pytest.approx(0.25) and iso["symmetry"] == pytest.approx(1.0)
    assert iso["monotonicity"] == pytest.approx(1.0) and iso["budget_metric"] == "kl"


def test_peak_within_budget_and_a_curve_that_turns_back():
    """Up: the effect peaks at c = 0.5 and falls by c = 1 (the budget's c): the peak is reported with its CI and
    the turn back is significant. Down: monotone, the peak is the last point within the budget."""
    up = {0.25: [1.0, 1.1, 0.9], 0.5: [2.0, 2.2, 1.9], 1.0: [0.5, 0.7, 0.6], 1.5: [0.0, 0.1, 0.2]}
    items = {0.0: [0.0, 0.1, -0.1], **up,
             **{-c: [-2 * c, -2 * c + 0.1, -2 * c - 0.1] for c in (0.25, 0.5, 1.0, 1.5)}}
    pts = synthetic(items)  # cost c²: within the budget 1.0 up to |c| = 1
    iso = iso_summary(pts, 1.0, "kl", "e")
    peak = iso["plus"]["peak"]
    assert peak["coeff"] == 0.5 and peak["delta_paired"] == pytest.approx(6.1 / 3) and peak["cost"] == 0.25
    assert peak["ci95"][0] < 6.1 / 3 < peak["ci95"][1] and peak["turns_back"]
    assert peak["vs_budget"]["diff"] == pytest.approx(6.1 / 3 - 0.6) and peak["vs_budget"]["significant"]
    down = iso["minus"]["peak"]
    assert down["coeff"] == -1.0 and down["delta_paired"] == pytest.approx(-2.0) and not down["turns_back"]
    flat = synthetic({0.0: [0.0, 0.1], 0.5: [0.0, 0.1], -0.5: [0.0, 0.1]}, cost=lambda c: 9.0 if c else 0.0)
    assert math.isnan(iso_summary(flat, 1.0, "kl", "e")["plus"]["peak"]["coeff"])  # nothing within the budget


def test_paired_delta_matches_a_hand_computation():
    nan = float("nan")
    pts = synthetic({0.0: [0.1, 0.2, -0.1, nan], 1.0: [0.5, 0.2, 0.3, 0.4], 2.0: [0.9, 0.4, 0.5, 0.6]})
    out = paired_delta(pts, 1.5, "e")  # halfway between c = 1 and c = 2; item 4 has no c = 0 score: left out
    deltas = [(0.7 - 0.1), (0.3 - 0.2), (0.4 + 0.1)]
    mean = sum(deltas) / 3
    se = math.sqrt(sum((d - mean) ** 2 for d in deltas) / 2) / math.sqrt(3)
    assert out["n_items"] == 3 and out["se"] == pytest.approx(se, rel=1e-9)
    assert out["delta_paired"] == pytest.approx(mean) and out["ci95"][0] == pytest.approx(mean - 1.959964 * se, rel=1e-6)
    assert out["item_deltas"][:3] == pytest.approx(deltas) and math.isnan(out["item_deltas"][3])


def test_every_method_is_also_read_at_the_cost_prompting_spends():
    """Prompting spends KL 0.04 up and 0.09 down (its points at c = ±1); a steer of cost c² and effect 2c is read
    at c = +0.2 and c = −0.3 (interpolated between measured points, per item), prompting at its own ±1."""
    steer = synthetic({c: [2 * c, 2 * c + 0.1, 2 * c - 0.1] for c in (-1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0)})
    prompt = [Point("prompting", c, dnll=k, kl_mean=k, kl_p95=0.0, effects={"e": e}, items={"e": [e, e + 1, e - 1]})
              for c, k, e in ((-1.0, 0.09, -0.3), (0.0, 0.0, 0.0), (1.0, 0.04, 0.5))]
    results = [MethodResult("m", steer), MethodResult("prompting", prompt)]
    at_prompting_cost(results, "kl", "e")
    up, down = results[0].iso["at_prompting_cost"]["plus"], results[0].iso["at_prompting_cost"]["minus"]
    # cost is c² only at the measured points: linear between them, so KL 0.04 falls at c = 0.25·0.04/0.0625
    assert up["cost"] == 0.04 and up["reached"] and up["coeff"] == pytest.approx(0.16)
    assert up["effects"]["e"]["delta"] == pytest.approx(0.32)
    assert down["coeff"] == pytest.approx(-(0.25 + 0.25 * (0.09 - 0.0625) / (0.25 - 0.0625)))
    own = results[1].iso["at_prompting_cost"]
    assert own["plus"]["coeff"] == 1.0 and own["plus"]["effects"]["e"]["delta"] == pytest.approx(0.5)
    assert own["minus"]["effects"]["e"]["item_deltas"] == pytest.approx([-0.3] * 3)  # paired against its c = 0


def test_dose_grid_measures_at_least_seven_points_per_direction_around_the_crossing():
    g = dose_grid(0.875, 1.0, (0.25, 0.5, 0.75, 1.25, 1.5, 2.0))
    assert g == pytest.approx([0.25, 0.5, 0.75, 0.875, 1.0, 1.25, 1.5, 2.0])
    assert dose_grid(4.0, None, (0.5,)) == [2.0, 4.0]  # never crossed: around the last point
    assert dose_grid(0.0, 0.01, (0.5,)) == [0.005, 0.01]  # even the smallest probe was over budget


def test_the_powered_grid_anchors_at_the_interpolated_crossing_and_keeps_eight_points():
    from interp_steer.comparison.sweep import MIN_POINTS, Point, crossing

    powered = (0.2, 0.4, 0.6, 0.8, 0.9, 1.15)
    # KL 0.08 at c = 0.8, 0.18 at 1.0: c* = 0.8 + 0.2 · (0.1 − 0.08) / 0.1 = 0.84
    probes = [Point("m", -0.8, 0.0, 0.08, 0.1), Point("m", -1.0, 0.0, 0.18, 0.2)]
    at = crossing(0.8, 1.0, probes, -1.0, 0.1, "kl")
    assert at == pytest.approx(0.84)
    g = dose_grid(0.8, 1.0, powered, at, MIN_POINTS)
    assert len(g) == 8 and 0.8 in g and 1.0 in g and min(abs(x - 1.15 * 0.84) for x in g) < 1e-12
    # the bracket's low end on a grid point (lo = 0.8 c*): counted once, a FILL fraction makes up the eighth
    g = dose_grid(0.8, 1.1, powered, 1.0, MIN_POINTS)
    assert len(g) == 8 and g.count(0.8) == 1 and 0.1 in g
    assert crossing(4.0, None, probes, 1.0, 0.1, "kl") is None
    assert crossing(0.0, 0.01, [Point("m", 0.01, 0.0, 0.5, 0.6)], 1.0, 0.1, "kl") == pytest.approx(0.002)


def test_seed_rows_get_a_mean_row_with_a_t_interval_over_seeds_and_item_means():
    def row(deltas):
        side = {"coeff": 1.0, "budget_reached": True, "kl_mean": 0.1, "dnll": 0.01,
                "effects": {"e": {"delta": sum(deltas) / 3, "delta_paired": sum(deltas) / 3, "item_deltas": deltas},
                            "f": {"delta": 0.5}}}
        return {"at_zero": {"e": 0.0}, "monotonicity": 1.0, "symmetry": 0.5, "plus": side, "minus": side}

    seeds = {"a@0": [1.0, 2.0, 3.0], "a@1": [2.0, 2.0, 2.0], "a@2": [0.0, 3.0, 6.0], "b": [0.0, 0.0, 0.0]}
    groups = seed_groups({k: row(v) for k, v in seeds.items()}, "e")
    assert list(groups) == ["a (3 seeds)"]
    g = groups["a (3 seeds)"]["plus"]
    means = [2.0, 2.0, 3.0]  # per seed
    sd = math.sqrt(sum((m - 7 / 3) ** 2 for m in means) / 2)
    assert g["effects"]["e"]["delta"] == pytest.approx(7 / 3) and g["effects"]["e"]["seed_deltas"] == means
    # t(.975, 2)
    assert g["effects"]["e"]["ci95"][1] == pytest.approx(7 / 3 + 4.302652729911275 * sd / math.sqrt(3))
    assert g["effects"]["e"]["item_deltas"] == pytest.approx([1.0, 7 / 3, 11 / 3])
    assert g["effects"]["f"]["delta"] == 0.5 and g["kl_mean"] == pytest.approx(0.1) and math.isnan(g["coeff"])
    comp = comparisons({"iso_table": {**{k: row(v) for k, v in seeds.items()}, "mean_diff": row([1.0, 1.0, 1.0]),
                                      **groups}, "effects": [{"name": "e"}]})
    assert comp["plus"]["a (3 seeds)"]["vs_best_additive"]["diff"] == pytest.approx(7 / 3 - 1)


def test_paired_difference_and_comparisons_flag_only_real_differences():
    big = paired_difference([1.0, 1.1, 0.9, 1.2], [0.0, 0.1, -0.1, 0.05])
    assert big["significant"] and big["diff"] == pytest.approx(1.0375)
    assert not paired_difference([0.1, -0.1, 0.2, -0.2], [0.0, 0.0, 0.0, 0.0])["significant"]
    iso = {name: {side: {"effects": {"e": {"delta": sum(v) / 4, "item_deltas": v}}} for side in ("plus", "minus")}
           for name, v in {"adapter": [1.0, 1.1, 0.9, 1.2], "random": [0.0, 0.1, -0.1, 0.05],
                           "mean_diff": [0.5, 0.6, 0.4, 0.5]}.items()}
    comp = comparisons({"iso_table": iso, "effects": [{"name": "e"}]})
    assert comp["plus"]["best_additive"] == "mean_diff"
    assert comp["plus"]["adapter"]["vs_random"]["significant"] and comp["plus"]["adapter"]["vs_best_additive"]["diff"] > 0
    assert comp["minus"]["adapter"]["vs_random"]["diff"] < 0  # '−' counts steering further down as positive
