"""The analysis package (``analysis/``): invariants of dHS, subspace overlaps, gradients and the figure CLI."""

import hashlib
import json
import math

import numpy as np
import pytest
import torch

from analysis import dhs as D  # importable through pytest's pythonpath (pyproject.toml)
from analysis import figures as F
from analysis import gradients as G
from analysis import pca_vs_learned as P
from interp_steer.comparison.plots import figure_sources
from interp_steer.config import LossConfig, TrainConfig
from interp_steer.method.adapter import AdapterSpec, SVDAdapter, linear_weight, make_adapters
from interp_steer.method.data import pair_batches, persona_pairs
from interp_steer.method.directions import dhs_svd_direction, gradient_directions, paired_diff
from interp_steer.names import resid_post


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.fixture
def small(tiny):
    """The tiny model, 6 pairs in 2 batches, and its reference states at every layer."""
    bridge, tok = tiny
    batches = list(pair_batches(persona_pairs(tok)[:6], tok, 3))
    return bridge, tok, batches, D.capture_layers(bridge, batches, [0, 1, 2])


# --- dHS and subspaces ----------------------------------------------------------------------------------

def test_energy_fraction_is_one_inside_a_containing_subspace_and_r_over_d_for_random_ones():
    x = rand(5, 64)
    assert D.energy_fraction(x, x.T) == pytest.approx(1.0, abs=1e-12)  # span of its own rows
    assert D.energy_fraction(x, torch.cat([x.T, rand(64, 3, seed=1)], 1)) == pytest.approx(1.0, abs=1e-12)
    fractions = [D.energy_fraction(x[:1], rand(64, 8, seed=s)) for s in range(1, 301)]
    assert np.mean(fractions) == pytest.approx(D.random_fraction(8, 64), abs=0.01)
    assert all(0 <= f <= 1 for f in fractions)
    assert math.isnan(D.energy_fraction(torch.zeros(2, 64), x.T))


def test_principal_angles_of_a_subspace_with_itself_are_zero_and_with_its_complement_ninety():
    a = rand(64, 4)
    mixed = a @ rand(4, 4, seed=1)  # another basis of the same span
    assert np.allclose(D.principal_angles_deg(a, a), 0, atol=1e-5)
    assert np.allclose(D.principal_angles_deg(a, mixed), 0, atol=1e-5)
    q = torch.linalg.qr(torch.cat([a, rand(64, 4, seed=2)], 1)).Q
    assert np.allclose(D.principal_angles_deg(q[:, :4], q[:, 4:]), 90, atol=1e-5)
    angles = D.principal_angles_deg(a, rand(64, 16, seed=3))
    assert len(angles) == 4 and np.all(np.diff(angles) >= 0)
    assert np.all((D.random_principal_angles_deg(64, 2, 8, n=8) > 0) & (D.random_principal_angles_deg(64, 2, 8, n=8) < 90))


def test_dhs_spectrum_sums_to_one_and_dhsu_holds_the_singular_values():
    dhs = rand(10, 32).float()
    spec = D.dhs_spectrum(dhs)
    assert spec.sum() == pytest.approx(1.0, abs=1e-12)
    assert np.all(spec >= 0) and np.all(np.diff(spec) <= 1e-15)
    S, U = D.dhs_svd(dhs)
    coords = D.dhsu(dhs, 3)
    assert coords.shape == (10, 3)
    assert torch.allclose(coords.double().norm(dim=0), S[:3], rtol=1e-5)
    assert torch.allclose(D.dhsu(dhs).double() @ U.T, dhs.double(), atol=1e-5)  # all axes: dHS back


def test_dhs_policy_pairs_steered_chosen_with_reference_rejected():
    ref, pi = rand(8, 4), rand(8, 4, seed=1)
    assert torch.equal(D.dhs_policy(pi, ref), pi[0::2] - ref[1::2])
    assert torch.equal(D.dhs_policy(ref, ref), paired_diff(ref))  # at c = 0 it is dHS_ref
    with pytest.raises(ValueError, match="interleaved"):
        D.dhs_policy(pi[:3], ref[:3])


def test_weight_subspaces_are_the_singular_vectors_and_fold_the_mlp_norm(tiny):
    bridge, _ = tiny
    W = linear_weight(bridge, "blocks.0.mlp.out").double()
    U = torch.linalg.svd(W, full_matrices=False).U[:, :8]
    assert np.allclose(D.principal_angles_deg(D.weight_subspace(bridge, "blocks.0.mlp.out", 8, "left"), U), 0,
                       atol=1e-3)
    gamma = D.norm_weight(bridge, 1)
    with torch.no_grad():
        gamma.copy_(torch.linspace(0.2, 3.0, gamma.numel()))  # a non-trivial γ, so folding matters
    W_in = linear_weight(bridge, "blocks.1.mlp.in").double()
    V_fold = torch.linalg.svd(W_in * gamma.double()[None], full_matrices=False).Vh[:8].T
    got = D.weight_subspace(bridge, "blocks.1.mlp.in", 8, "right", fold_norm=True)
    assert np.allclose(D.principal_angles_deg(got, V_fold), 0, atol=1e-3)
    raw = D.weight_subspace(bridge, "blocks.1.mlp.in", 8, "right", fold_norm=False)
    assert D.principal_angles_deg(got, raw).max() > 1
    with pytest.raises(ValueError, match="residual stream"):
        D.weight_subspace(bridge, "blocks.0.mlp.out", 8, "right")


def test_analyse_dhs_reports_every_layer_with_fractions_in_range(small):
    bridge, _, _, hs = small
    rep = D.analyse_dhs(bridge, hs, hs_test=hs, hs_pi=hs, hs_pi_ref=hs, rank=8, k=2, n_spectrum=3)
    assert rep.layers == [0, 1, 2] and rep.random == 8 / 64
    for f in (rep.energy_out, rep.energy_attn_o, rep.energy_states_out, rep.energy_in[:2], rep.consistency):
        assert all(0 <= v <= 1 + 1e-9 for v in f)
    assert math.isnan(rep.energy_in[2]) and all(math.isnan(a) for a in rep.angles_in[2])  # no layer 3 to read it
    assert rep.pi_norm == pytest.approx(rep.dhs_norm)  # hs_pi = hs_ref: dHS_pi = dHS_ref
    assert all(sum(s) <= 1 + 1e-9 for s in rep.spectrum)
    json.dumps(rep.to_dict())


def test_heldout_cohens_d_finds_a_planted_concept():
    h = rand(80, 16)
    h[0::2, 3] += 4.0
    assert D.heldout_cohens_d(h[:40], h[40:]) > 2
    assert abs(D.heldout_cohens_d(rand(80, 16)[:40], rand(80, 16, seed=1)[40:])) < 1


# --- PCA vs learned -------------------------------------------------------------------------------------

@pytest.fixture
def moved(tiny):
    """Adapters on blocks 0 and 1 with large random θ, λ (as if trained), rank 8."""
    bridge, _ = tiny
    return make_adapters(bridge, [AdapterSpec("blocks.0.mlp.out", 8), AdapterSpec("blocks.1.mlp.out", 8)],
                         init_scale=0.3)


def test_delta_weight_is_merge_minus_w_and_writes_inside_span_u(tiny, moved):
    bridge, _ = tiny
    a = moved[0]
    W = linear_weight(bridge, a.site).detach()
    assert torch.allclose(P.delta_weight(a, 1.0), a.merge(W, 1.0) - W, atol=1e-5)
    basis, sigma = P.output_subspace(a, 3)
    assert D.energy_fraction(basis.T, a.U) == pytest.approx(1.0, abs=1e-5)
    assert torch.all(sigma[:-1] >= sigma[1:])
    with pytest.raises(ValueError, match="c = 0"):
        P.output_subspace(a, 3, c=0.0)
    with pytest.raises(ValueError, match="residual stream"):
        P.output_subspace(SVDAdapter.from_bridge(bridge, AdapterSpec("blocks.0.mlp.in", 4)), 2)


def test_pca_vs_learned_cosines_lie_in_unit_interval_below_the_span_u_ceiling(small, moved):
    _, _, _, hs = small
    res = P.per_layer(hs, moved, k=2)  # an nn.ModuleList: adapters are any iterable, not a Sequence
    assert res.layers == [0, 1]
    assert P.per_layer(hs, iter(moved), k=2).cos_top == res.cos_top  # only iterated, once
    for cos, ceiling in zip(res.cos_top, res.ceiling):
        assert 0 <= cos <= ceiling + 1e-6 <= 1 + 1e-6  # ΔW writes inside span(U): no closer than that
    assert all(0 <= a <= 90 for row in res.angles for a in row)
    assert res.cos_bias == [None, None]  # no bias term
    with pytest.raises(ValueError, match="no reference states"):
        P.per_layer({0: hs[0]}, moved)


def test_the_bias_term_is_compared_with_the_pca_axis_without_a_ceiling(tiny, small):
    bridge, _, _, hs = small
    a = SVDAdapter.from_bridge(bridge, AdapterSpec("blocks.1.mlp.out", 4, bias="free"), init_scale=0.3)
    assert P.compare(D.dhs_reference(hs[1]), a, 2)["cos_bias"] is None  # b = 0: no direction yet
    p = D.pca_subspace(D.dhs_reference(hs[1]), 1)[:, 0]
    with torch.no_grad():
        a.b.copy_(-3.0 * p + 0.1 * a.U[:, 0])  # mostly the PCA axis, sign flipped
    r = P.compare(D.dhs_reference(hs[1]), a, 2)
    b = a.b.detach()
    expected = abs(float(p @ b)) / b.norm().item()
    assert r["cos_bias"] == pytest.approx(expected, rel=1e-5) and r["cos_bias"] > 0.99


def test_subspace_tracker_snapshots_during_training(tiny):
    from interp_steer.training.loop import train

    bridge, tok = tiny
    tracker = P.SubspaceTracker(every=2, k=2)
    cfg = TrainConfig(layers=(0, 1), loss_layer=2, rank=4, steps=4, batch_pairs=2, n_pairs=10, held_out=0.2,
                      eval_coeffs=(0.0,), loss=LossConfig(kl_budget=None))
    result = train(bridge, tok, persona_pairs(tok), cfg, progress=False, callback=tracker)
    assert tracker.steps == [2, 4] and set(tracker.bases) == {"blocks.0.mlp.out", "blocks.1.mlp.out"}
    hs = D.capture_layers(bridge, result.train_batches, [0, 1])
    over = P.over_training(tracker, hs)
    assert np.array(over["cos_top"]).shape == (2, 2)
    assert np.all((np.array(over["cos_top"]) >= 0) & (np.array(over["cos_top"]) <= 1 + 1e-6))
    # the last snapshot is the returned adapter
    assert np.allclose(D.principal_angles_deg(tracker.bases["blocks.1.mlp.out"][-1],
                                              P.output_subspace(result.adapters[1], 2)[0]), 0, atol=1e-3)


# --- gradients and the learned direction ----------------------------------------------------------------

def test_effective_direction_is_undefined_at_c_zero_and_zero_upstream_of_the_adapters(small):
    bridge, _, batches, hs = small
    adapters = make_adapters(bridge, [AdapterSpec("blocks.1.mlp.out", 4)], init_scale=0.3)
    with pytest.raises(ValueError, match="undefined"):
        G.effective_directions(bridge, batches, adapters, [0, 1], c=0.0)
    e = G.effective_directions(bridge, batches, adapters, [0, 1, 2])
    assert torch.count_nonzero(e[0]) == 0  # layer 0 is before the adapter: hs(+1) = hs(−1) exactly
    assert math.isnan(G.cosine(e[0], hs[0][0])) and e[1].norm() > 0
    plus, minus = D.capture_both_signs(bridge, batches, [1], adapters)
    assert torch.allclose(plus[1], D.capture_layers(bridge, batches, [1], adapters, 1.0)[1], atol=1e-5)
    assert torch.allclose(minus[1], D.capture_layers(bridge, batches, [1], adapters, -1.0)[1], atol=1e-5)


def test_training_gradient_at_the_loss_layer_is_d_steer_and_coherence_never_reaches_the_last_token(small):
    bridge, _, batches, hs = small
    d = dhs_svd_direction(hs[2])
    hook = resid_post(2)
    g = G.training_loss_gradients(bridge, batches, [0, 1, 2], hook, d)
    assert G.cosine(g[2], d) == pytest.approx(1.0, abs=1e-5)
    assert G.cosine(G.training_loss_gradients(bridge, batches, [0], hook, d, c=-1.0)[0],
                    g[0]) == pytest.approx(-1.0, abs=1e-5)
    # causal attention: log-probs of prompt tokens never see the last token's state (the steered model here;
    # directions.gradient_directions relies on the same fact to skip the logits)
    adapters = make_adapters(bridge, [AdapterSpec("blocks.0.mlp.out", 4)], init_scale=0.5)
    a = G.training_loss_gradients(bridge, batches, [1], hook, d, adapters=adapters,
                                  cfg=LossConfig(margin=0.0, w_coherence=1e3))
    b = G.training_loss_gradients(bridge, batches, [1], hook, d, adapters=adapters,
                                  cfg=LossConfig(margin=0.0, w_coherence=0.0))
    assert torch.allclose(a[1], b[1], atol=1e-5)
    with pytest.raises(ValueError, match="c = 0"):
        G.training_loss_gradients(bridge, batches, [0], hook, d, c=0.0)


def test_noref_directions_are_the_package_gradient_directions_keyed_by_layer(small):
    bridge, _, batches, hs = small
    d = dhs_svd_direction(hs[1])
    by_layer = G.noref_gradient_directions(bridge, batches, [0, 1, 2], resid_post(1), d)
    assert sorted(by_layer) == [0, 1]  # layer 2 is after the loss layer: left out
    by_hook = gradient_directions(bridge, batches, [0, 1], resid_post(1), d)
    assert all(torch.allclose(by_layer[L], by_hook[resid_post(L)], atol=1e-6) for L in (0, 1))


def test_layer_map_gives_nan_where_a_direction_is_missing(small):
    _, _, _, hs = small
    unit = {L: torch.ones(64) for L in (0, 1)}
    lm = G.layer_map(hs, grad=unit, noref={}, learned={0: torch.zeros(64), 1: torch.ones(64)})
    assert lm.layers == [0, 1, 2]
    assert math.isnan(lm.grad_pca[2]) and math.isnan(lm.learned_pca[0]) and all(math.isnan(v) for v in lm.noref_pca)
    assert lm.grad_learned[1] == pytest.approx(1.0)
    assert all(-1 - 1e-9 <= v <= 1 + 1e-9 for v in lm.pca_mean)


# --- the study and the figures --------------------------------------------------------------------------

def test_study_config_puts_the_objective_into_the_loss_config():
    from analysis.study import StudyConfig

    assert StudyConfig().train_config().loss == LossConfig()  # None: the package's default objective
    tc = StudyConfig(objective="shift", pairs=20).train_config()
    assert isinstance(tc, TrainConfig) and tc.loss == LossConfig(objective="shift") and tc.n_pairs == 20


def test_study_on_the_tiny_model_feeds_every_model_figure(tiny, tmp_path):
    """The study end to end on the tiny model (its ``model`` swapped in): train's split, the captures, the
    summary through JSON and back, and the three model figures drawn from it."""
    from analysis.study import Study, StudyConfig
    from interp_steer.storage.io import write_json_atomic

    study = Study(StudyConfig(pairs=20, steps=2, loss_layer=2, layers=(0, 1), rank=4, k=2, grad_pairs=4,
                              snapshot_every=1, objective="shift", kl_budget=None))
    study.__dict__["model"] = tiny
    for key in ("dhs_report", "layer_map", "pca_vs_learned"):
        getattr(study, key)  # `trained` checks the study's split against train()'s batches
    summary = study.summary()
    assert summary["train_config"]["loss"]["objective"] == "shift" and summary["n_layers"] == 3
    assert summary["train"]["loss_hook"] == resid_post(2)
    assert summary["pca_vs_learned"]["over_training"]["steps"] == [0, 1, 2]
    assert summary["pca_vs_learned"]["over_training"]["layers"] == [0, 1]
    write_json_atomic(tmp_path / "summary.json", summary)
    data = F._load_summary(tmp_path / "summary.json")
    for draw, name in ((F.dhs_spectra_figure, "dhs_spectra"), (F.layer_map_figure, "layer_map"),
                       (F.pca_vs_learned_figure, "pca_vs_learned")):
        assert draw(data, tmp_path) == [tmp_path / f"{name}.png", tmp_path / f"{name}.svg"]
    # the command redraws them from the stored summary, and each records the summary's SHA-256
    assert F.main(["all", "--from-summary", str(tmp_path / "summary.json"), "--out", str(tmp_path / "cli")]) == 0
    digest = hashlib.sha256((tmp_path / "summary.json").read_bytes()).hexdigest()
    for name in ("dhs_spectra", "layer_map", "pca_vs_learned"):
        for ext in ("png", "svg"):
            assert figure_sources(tmp_path / "cli" / f"{name}.{ext}") == [(tmp_path / "summary.json", digest)]
    assert figure_sources(tmp_path / "cli" / "loss_geometry.png") == []  # a diagram: drawn from no file


def test_figures_read_the_objective_from_nested_and_older_flat_train_configs():
    assert F._objective({"train_config": TrainConfig(loss=LossConfig(objective="shift")).to_dict()}) == "shift"
    assert F._objective({"train_config": {"objective": "separation"}}) == "separation"  # an older summary
    assert F._objective({}) == "?"


def test_figure_cli_writes_png_and_svg_for_loss_geometry(tmp_path, capsys):
    assert F.main(["loss_geometry", "--out", str(tmp_path)]) == 0
    for ext in ("png", "svg"):
        path = tmp_path / f"loss_geometry.{ext}"
        assert path.is_file() and path.stat().st_size > 1000
    assert not list(tmp_path.glob(".*tmp*"))  # written atomically


def _report(rows: dict, zero: float = 0.1) -> dict:
    def iso(deltas):
        side = lambda s: {"coeff": s, "budget_reached": True,  # noqa: E731
                          "effects": {"e": {"delta": sum(deltas) / len(deltas), "item_deltas": [s * d for d in deltas],
                                            "ci95": [0.0, 1.0]}}}
        return {"at_zero": {"e": zero}, "plus": side(1.0), "minus": side(-1.0)}
    return {"concept": "c", "budget": 0.1, "budget_metric": "kl", "effects": [{"name": "e", "unit": "u"}],
            "data": {"items": {"e": 3}}, "iso_table": {k: iso(v) for k, v in rows.items()}}


def test_iso_table_joins_comparable_reports_and_refuses_the_rest(tmp_path, capsys):
    from analysis import iso_table

    (tmp_path / "a.json").write_text(json.dumps(_report({"pca_diff": [0.1, 0.2, 0.3], "random": [0.0, 0.0, 0.1]})))
    (tmp_path / "b.json").write_text(json.dumps(_report({"adapter": [1.0, 1.1, 1.2]})))
    assert iso_table.main([str(tmp_path / "a.json"), f"{tmp_path / 'b.json'}:adapter=learned"]) == 0
    out = capsys.readouterr().out
    assert "| learned | + |" in out and "| learned | − |" in out and "+0.900 [" in out and " *" in out
    assert "note:" not in out  # neither report records its blocks: nothing to warn about
    # baselines measured at other blocks than the adapter: the table says so (rows still joined)
    a, b = _report({"pca_diff": [0.1, 0.2, 0.3]}), _report({"adapter": [1.0, 1.1, 1.2]})
    a["blocks"], b["blocks"] = {"pca_diff": [8, 10]}, {"adapter": [15, 16]}
    (tmp_path / "a2.json").write_text(json.dumps(a))
    (tmp_path / "b2.json").write_text(json.dumps(b))
    assert iso_table.main([str(tmp_path / "a2.json"), f"{tmp_path / 'b2.json'}:adapter=learned"]) == 0
    assert "note: these rows act at different blocks" in (out := capsys.readouterr().out)
    assert "pca_diff at 8, 10; learned at 15, 16" in out
    b["blocks"] = {"adapter": [8, 10]}
    (tmp_path / "b2.json").write_text(json.dumps(b))
    assert iso_table.main([str(tmp_path / "a2.json"), str(tmp_path / "b2.json")]) == 0
    assert "note:" not in capsys.readouterr().out
    (tmp_path / "c.json").write_text(json.dumps(_report({"adapter": [1.0, 1.0, 1.0]}, zero=0.2)))
    assert iso_table.main([str(tmp_path / "a.json"), str(tmp_path / "c.json")]) == 2
    assert "base model's effects differ" in capsys.readouterr().err


def test_iso_table_groups_training_seeds_with_a_t_interval(tmp_path, capsys):
    from analysis import iso_table

    (tmp_path / "a.json").write_text(json.dumps(_report({"pca_diff": [0.1, 0.2, 0.3]})))
    for k, shift in enumerate((0.9, 1.0, 1.1)):
        (tmp_path / f"s{k}.json").write_text(json.dumps(_report({"adapter": [shift, shift + 0.1, shift + 0.2]})))
    specs = [str(tmp_path / "a.json")] + [f"{tmp_path / f's{k}.json'}:adapter=learned@{k}" for k in range(3)]
    first, rows = iso_table.load_rows(specs)
    groups = iso_table.seed_groups(rows, "e")
    g = groups["learned (3 seeds)"]["plus"]["effects"]["e"]
    assert g["delta"] == pytest.approx(1.1) and g["seed_deltas"] == pytest.approx([1.0, 1.1, 1.2])
    assert g["ci95"][1] - g["delta"] == pytest.approx(4.303 * 0.1 / 3 ** 0.5, rel=1e-3)
    assert g["item_deltas"] == pytest.approx([1.0, 1.1, 1.2])
    assert iso_table.main(specs) == 0 and "| learned (3 seeds) | + | +1.100" in capsys.readouterr().out
