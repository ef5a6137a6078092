"""The sweep driver and the demo's outputs, end to end on the tiny model."""

import json

import pytest

from interp_steer.adapter import AdapterSpec, make_adapters
from interp_steer.capture import capture
from interp_steer.names import resid_names
from interp_steer.data import pair_batches, persona_pairs
from interp_steer.directions import steering_vector
from interp_steer.evaluate import coherence_reference, load_dilemmas, load_neutral_texts, load_truthfulqa_csv
from interp_steer.report import write_outputs
from interp_steer.sweep import (
    Method, SweepData, adapter_method, budget_bracket, iso_summary, prompting_method, run_sweep, vector_method,
)


@pytest.fixture
def setup(tiny):
    bridge, tok = tiny
    # small on purpose: the tiny model's 49k-vocab unembedding dominates its cost
    data = SweepData(load_dilemmas()[:2], load_truthfulqa_csv()[:1],
                     coherence_reference(bridge, tok, load_neutral_texts()[:2]), budget=0.05, bisect_iters=1)
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
    report = {"budget_dnll": data.budget, "data": {"dilemmas": 2, "mc_questions": 1, "neutral_texts": 2},
              "timings_s": {}, "iso_table": {r.name: r.iso for r in results},
              "points": {r.name: [p.__dict__ for p in r.points] for r in results}}
    (tmp_path / "out").mkdir()
    paths = write_outputs(report, tmp_path / "out")
    loaded = json.loads((tmp_path / "out" / "report.json").read_text())  # strict JSON: no NaN
    assert set(loaded["iso_table"]) == {"adapter", "pca_diff", "prompting"}
    md = (tmp_path / "out" / "REPORT.md").read_text()
    assert "| adapter | + |" in md and "](figures/dose_response_coherence.png)" in md  # links that resolve
    assert {p.name for p in paths if p.parent == tmp_path / "out" / "figures"} == {
        "dose_response_coefficient.png", "dose_response_coefficient.svg",
        "dose_response_coherence.png", "dose_response_coherence.svg"}


def test_iso_summary_on_synthetic_points():
    from interp_steer.sweep import Point

    pts = [Point("m", c, dnll=c * c, kl_mean=0.0, kl_p95=0.0, honesty=2 * c, accuracy=0.5 + c / 10, mc1=0.5)
           for c in (-1.0, -0.5, 0.0, 0.5, 1.0)]
    iso = iso_summary(pts, budget=0.25)
    assert iso["plus"]["coeff"] == pytest.approx(0.5) and iso["plus"]["delta_honesty"] == pytest.approx(1.0)
    assert iso["minus"]["coeff"] == pytest.approx(-0.5) and iso["minus"]["delta_honesty"] == pytest.approx(-1.0)
    assert iso["plus"]["accuracy"] == pytest.approx(0.55) and iso["symmetry"] == pytest.approx(1.0)
    assert iso["monotonicity"] == pytest.approx(1.0)


def test_paired_error_matches_a_hand_computation():
    import math

    from interp_steer.sweep import Point, paired_error

    nan = float("nan")
    items = {0.0: [0.1, 0.2, -0.1, nan], 1.0: [0.5, 0.2, 0.3, 0.4], 2.0: [0.9, 0.4, 0.5, 0.6]}
    pts = [Point("m", c, dnll=0.0, kl_mean=0.0, kl_p95=0.0, item_honesty=v) for c, v in items.items()]
    out = paired_error(pts, 1.5)  # halfway between c = 1 and c = 2; item 4 has no c = 0 score: left out
    deltas = [(0.7 - 0.1), (0.3 - 0.2), (0.4 + 0.1)]
    mean = sum(deltas) / 3
    se = math.sqrt(sum((d - mean) ** 2 for d in deltas) / 2) / math.sqrt(3)
    assert out["n_items"] == 3 and out["delta_honesty_se"] == pytest.approx(se, rel=1e-9)
    assert paired_error([Point("m", 0.0, 0.0, 0.0, 0.0)], 0.0) == {}
