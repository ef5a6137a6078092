"""Invariants of the SVD rotation adapter: identity at c = 0, orthogonality, inversion, merge = hooks, io."""

import pytest
import torch

from interp_steer.method.adapter import (
    AdapterSpec,
    SVDAdapter,
    apply_adapters,
    cayley,
    linear_weight,
    make_adapters,
    merged_weights,
    skew,
)

SITES = ["blocks.0.mlp.out", "blocks.1.attn.o", "blocks.1.attn.q", "blocks.2.mlp.in", "blocks.2.attn.k"]


def ids(tok, n=3):
    g = torch.Generator().manual_seed(1)
    return torch.randint(100, 20000, (n, 7), generator=g)


def adapters_for(bridge, **kw):
    specs = [AdapterSpec(s, rank=8, rotate_u=(i % 2 == 1), scale="exp" if i < 3 else "add") for i, s in enumerate(SITES)]
    return make_adapters(bridge, specs, init_scale=0.3, **kw)  # large init: the adapter really changes things


def test_c_zero_is_exactly_the_base_model(tiny):
    bridge, tok = tiny
    x = ids(tok)
    ads = adapters_for(bridge)
    with torch.no_grad():
        base = bridge(x)
        with apply_adapters(bridge, ads, 0.0):
            zero = bridge(x)
        with apply_adapters(bridge, ads, 1.0):
            one = bridge(x)
    assert (zero - base).abs().max() <= 1e-6
    assert (one - base).abs().max() > 1e-2  # and the adapter is not a no-op


def test_rotation_is_orthogonal_and_reverses_with_c():
    g = torch.Generator().manual_seed(0)
    theta = skew(torch.randn(16, 16, generator=g))
    c = torch.tensor([0.3, 1.0, -1.0, 2.5])
    R = cayley(theta, c)
    eye = torch.eye(16)
    for Rc in R:
        assert (Rc.T @ Rc - eye).abs().max() <= 1e-5
    assert (R[2] - R[1].T).abs().max() <= 1e-5  # R(−c) = R(c)ᵀ
    assert (cayley(theta, torch.zeros(1))[0] - eye).abs().max() == 0
    assert (theta + theta.T).abs().max() == 0


def test_rank_r_residual_holds_exactly_the_discarded_singular_values(tiny):
    """Eckart–Young: ‖W − U diag(S) Vᵀ‖_F² = Σ_{i>r} σ_i² and the residual's spectrum is σ_{r+1}, σ_{r+2}, …"""
    bridge, _ = tiny
    for s in SITES:
        W = linear_weight(bridge, s).detach().double()
        sv = torch.linalg.svdvals(W)
        for r in (1, 8, 32):
            a = SVDAdapter.from_weight(AdapterSpec(s, rank=r), W.float())
            assert torch.allclose(a.S.double(), sv[:r].float().double(), rtol=1e-5)
            W_res = W - a.U.double() @ torch.diag(a.S.double()) @ a.V.double().T
            assert abs(W_res.norm() ** 2 - sv[r:].pow(2).sum()) <= 1e-4 * sv.pow(2).sum()
            assert torch.allclose(torch.linalg.svdvals(W_res)[: len(sv) - r], sv[r:], atol=1e-5)
            eye = torch.eye(r, dtype=torch.float64)
            assert (a.U.double().T @ a.U.double() - eye).abs().max() <= 1e-5
            assert (a.V.double().T @ a.V.double() - eye).abs().max() <= 1e-5


def test_aligned_triplets_are_the_most_aligned_and_leave_the_rest_of_w_as_residual(tiny):
    """With ``align = d`` the kept triplets maximise |u_iᵀ d| (a direction built from low triplets picks them),
    stay in singular-value order, and W_res = W − U_r S_r V_rᵀ still holds the rest: c = 0 merges to W."""
    bridge, _ = tiny
    site = "blocks.1.mlp.out"
    W = linear_weight(bridge, site).detach()
    U, S, _ = torch.linalg.svd(W.double(), full_matrices=False)
    d = (U[:, 40] - 0.5 * U[:, 50] + 0.2 * U[:, 3]).float()  # lies in triplets 3, 40 and 50
    a = SVDAdapter.from_weight(AdapterSpec(site, rank=3), W, align=d)
    assert torch.allclose(a.S.double(), S[[3, 40, 50]].float().double(), rtol=1e-5)
    assert (a.U.T @ a.U - torch.eye(3)).abs().max() <= 1e-5
    assert (a.U @ (a.U.T @ d) - d).norm() <= 1e-4 * d.norm()  # the adapter's output space holds all of d
    top = SVDAdapter.from_weight(AdapterSpec(site, rank=3), W)
    assert (top.U @ (top.U.T @ d)).norm() < 0.25 * d.norm()  # the top-3 by singular value hold almost none
    assert torch.allclose(a.merge(W, 0.0), W, atol=1e-6)
    for bad in (torch.zeros(64), torch.ones(5), torch.full((64,), float("nan"))):
        with pytest.raises(ValueError, match="alignment direction"):
            SVDAdapter.from_weight(AdapterSpec(site, rank=3), W, align=bad)
    with pytest.raises(ValueError, match="sites without an adapter"):
        make_adapters(bridge, [AdapterSpec(site, rank=3)], align={"blocks.0.mlp.out": d})


def test_delta_matches_a_dense_reference(tiny):
    """Δy from the hooks equals x (W(c) − W)ᵀ with W(c) written straight from the equation."""
    bridge, _ = tiny
    W = linear_weight(bridge, "blocks.1.attn.o")
    a = SVDAdapter.from_weight(AdapterSpec("blocks.1.attn.o", rank=8, rotate_u=True), W, init_scale=0.3)
    c = 0.7
    cc = torch.tensor([c])
    R = torch.linalg.inv(torch.eye(8) - c * skew(a.theta_v) / 2) @ (torch.eye(8) + c * skew(a.theta_v) / 2)
    Ru = torch.linalg.inv(torch.eye(8) - c * skew(a.theta_u) / 2) @ (torch.eye(8) + c * skew(a.theta_u) / 2)
    S_c = torch.exp(c * a.lam) * a.S
    W_res = W - a.U @ torch.diag(a.S) @ a.V.T
    W_c = (a.U @ Ru) @ torch.diag(S_c) @ (a.V @ R).T + W_res
    x = torch.randn(2, 5, W.shape[1])
    with torch.no_grad():
        assert (a.delta(x, cc.expand(2)) - x @ (W_c - W).T).abs().max() <= 1e-5
        assert (a.merge(W, c) - W_c).abs().max() <= 1e-5


def test_merged_weights_equal_hooks(tiny):
    bridge, tok = tiny
    x = ids(tok)
    ads = adapters_for(bridge)
    with torch.no_grad():
        base = bridge(x)
        for c in (1.0, -0.6):
            with apply_adapters(bridge, ads, c):
                hooked = bridge(x)
            with merged_weights(bridge, ads, c):
                merged = bridge(x)
            assert (hooked - merged).abs().max() <= 1e-4
        assert (bridge(x) - base).abs().max() == 0  # weights restored exactly


def test_per_row_coefficients_equal_separate_runs(tiny):
    bridge, tok = tiny
    x = ids(tok, 2)
    ads = adapters_for(bridge)
    with torch.no_grad():
        with apply_adapters(bridge, ads, torch.tensor([1.0, -1.0])):
            both = bridge(x)
        with apply_adapters(bridge, ads, 1.0):
            plus = bridge(x)
        with apply_adapters(bridge, ads, -1.0):
            minus = bridge(x)
    assert (both[0] - plus[0]).abs().max() <= 1e-5 and (both[1] - minus[1]).abs().max() <= 1e-5


def hook_counts(bridge):
    """Hooks per hook point (aliases such as hook_resid_post / hook_out share one point: count it once)."""
    points = {id(h): h for h in bridge.hook_dict.values()}
    return {k: len(h.fwd_hooks) + len(h.bwd_hooks) for k, h in points.items()}


def test_no_hook_left_behind_after_an_exception(tiny):
    bridge, tok = tiny
    own = bridge.hook_dict["blocks.0.hook_resid_post"]
    own.add_hook(lambda act, hook: None)  # a user's hook: must survive
    before = hook_counts(bridge)
    ads = adapters_for(bridge)
    with pytest.raises(RuntimeError, match="boom"):
        with apply_adapters(bridge, ads, 1.0):
            assert sum(hook_counts(bridge).values()) == sum(before.values()) + 2 * len(SITES)
            raise RuntimeError("boom")
    assert hook_counts(bridge) == before
    own.remove_hooks(including_permanent=True)


def test_merged_weights_come_back_exactly_after_an_exception(tiny):
    bridge, _ = tiny
    ads = adapters_for(bridge)
    before = {s: linear_weight(bridge, s).detach().clone() for s in SITES}
    with pytest.raises(RuntimeError, match="boom"):
        with merged_weights(bridge, ads, 1.0):
            assert any(not torch.equal(linear_weight(bridge, s), before[s]) for s in SITES)  # really merged
            raise RuntimeError("boom")
    assert all(torch.equal(linear_weight(bridge, s), before[s]) for s in SITES)


def test_bad_specs_raise():
    with pytest.raises(ValueError, match="not a linear layer name"):
        AdapterSpec("blocks.1.hook_resid_post")
    with pytest.raises(ValueError, match="rank"):
        AdapterSpec("blocks.1.mlp.out", rank=0)
    with pytest.raises(ValueError, match="scale"):
        AdapterSpec("blocks.1.mlp.out", scale="mul")


def test_site_outside_model_and_rank_too_large(tiny):
    bridge, _ = tiny
    with pytest.raises(ValueError, match="does not exist"):
        make_adapters(bridge, [AdapterSpec("blocks.9.mlp.out")])
    with pytest.raises(ValueError, match="exceeds"):
        make_adapters(bridge, [AdapterSpec("blocks.0.mlp.out", rank=65)])
    with pytest.raises(ValueError, match="duplicate"):
        make_adapters(bridge, [AdapterSpec("blocks.0.mlp.out", 4), AdapterSpec("blocks.0.mlp.out", 4)])


def test_gradients_reach_theta_and_lambda_only(tiny):
    bridge, tok = tiny
    ads = adapters_for(bridge)
    with apply_adapters(bridge, ads, torch.tensor([1.0, -1.0, 1.0])):
        bridge(ids(tok)).logsumexp(-1).mean().backward()
    for a in ads:
        assert a.theta_v.grad is not None and a.theta_v.grad.abs().sum() > 0
        assert a.lam.grad is not None and a.lam.grad.abs().sum() > 0
    assert all(p.grad is None for p in bridge.parameters())


@pytest.mark.slow
def test_real_model_adapter_identity_and_merge(real):
    bridge, tok = real
    x = tok(["The capital of France is", "Honesty means"], return_tensors="pt", padding=True)
    specs = [AdapterSpec(f"blocks.{L}.mlp.out", rank=32) for L in (8, 14, 20)]
    ads = make_adapters(bridge, specs, init_scale=0.05)
    with torch.no_grad():
        base = bridge(x["input_ids"], attention_mask=x["attention_mask"])
        with apply_adapters(bridge, ads, 0.0):
            zero = bridge(x["input_ids"], attention_mask=x["attention_mask"])
        with apply_adapters(bridge, ads, 1.0):
            hooked = bridge(x["input_ids"], attention_mask=x["attention_mask"])
        with merged_weights(bridge, ads, 1.0):
            merged = bridge(x["input_ids"], attention_mask=x["attention_mask"])
    assert (zero - base).abs().max() <= 1e-6
    assert (hooked - merged).abs().max() <= 1e-4
    assert (hooked - base).abs().max() > 1e-3


def test_bias_only_is_a_learned_vector_c_times_b_and_nothing_else(tiny, tmp_path):
    """``bias='only'`` (the learned_vector method): b is the one parameter, Δy = c·b exactly for every input, c = 0 is
    the base model, merged = hooks where the layer has a bias, and save → load is identical."""
    from interp_steer.config import TrainConfig
    from interp_steer.storage.io import SteeringArtifact, load_artifact, save_artifact

    bridge, tok = tiny
    x = ids(tok)
    site = "blocks.1.mlp.out"
    a = make_adapters(bridge, [AdapterSpec(site, rank=2, bias="only")], init_scale=0.3)[0]
    assert [n for n, _ in a.named_parameters()] == ["b"]
    assert a.theta_v.abs().max() == 0 and a.lam.abs().max() == 0
    with torch.no_grad():
        a.b.normal_(generator=torch.Generator().manual_seed(3))
        xs = torch.randn(3, 5, a.V.shape[0])
        c = torch.tensor([1.0, -0.5, 0.0])
        assert torch.equal(a.delta(xs, c), (c[:, None, None] * a.b).expand(3, 5, -1))
        B, _ = a.factors(0.7)
        assert B.abs().max() == 0  # no low-rank part: a LoRA of it is its lora_bias alone
        base = bridge(x)
        with apply_adapters(bridge, [a], 0.0):
            assert torch.equal(bridge(x), base)
        with apply_adapters(bridge, [a], 1.0):
            hooked = bridge(x)
        assert (hooked - base).abs().max() > 1e-2
        if getattr(bridge.get_submodule(site), "original_component").bias is not None:
            with merged_weights(bridge, [a], 1.0):
                assert (bridge(x) - hooked).abs().max() <= 1e-4
    art = SteeringArtifact.build(bridge, [a], torch.ones(bridge.cfg.d_model), "blocks.2.hook_resid_post",
                                 TrainConfig(layers=[1], rank=2, bias="only"))
    save_artifact(tmp_path / "v", art)
    back = load_artifact(tmp_path / "v").adapters[0]
    assert back.spec == a.spec and all(torch.equal(back.state_dict()[k], v) for k, v in a.state_dict().items())
    with pytest.raises(ValueError, match="no rotation to turn U"):
        AdapterSpec(site, rank=2, bias="only", rotate_u=True)
    with pytest.raises(ValueError, match="no rotation to turn U"):
        TrainConfig(bias="only", rotate_u=True)


@pytest.mark.parametrize("kind", ["free", "span"])
def test_the_bias_term_adds_c_times_b_and_keeps_every_invariant(tiny, kind):
    """``bias``: Δy gains exactly c·b (odd in c; b = U w inside span(U) for 'span'), c = 0 stays the base model bit
    for bit; merging into a layer without a bias is refused, naming the way out."""
    bridge, tok = tiny
    x = ids(tok)
    site = "blocks.1.mlp.out"
    plain, biased = make_adapters(bridge, [AdapterSpec(site, rank=8)], init_scale=0.3)[0], \
        make_adapters(bridge, [AdapterSpec(site, rank=8, bias=kind)], init_scale=0.3)[0]
    assert plain.b is None and plain.bias_vector() is None and plain.bias_delta(1.0) is None
    assert biased.b.shape == ((bridge.cfg.d_model,) if kind == "free" else (8,))
    assert biased.bias_vector().abs().max() == 0  # starts as the base model
    with torch.no_grad():
        biased.b.normal_(generator=torch.Generator().manual_seed(4))
        b = biased.bias_vector()
        if kind == "span":
            assert torch.allclose(b, biased.U @ biased.b) and torch.allclose(biased.U @ (biased.U.T @ b), b, atol=1e-5)
        xs = torch.randn(3, 5, plain.V.shape[0])
        c = torch.tensor([1.0, -0.5, 0.0])
        diff = biased.delta(xs, c) - plain.delta(xs, c)  # same seed: same θ, λ
        assert (diff - c[:, None, None] * b).abs().max() <= 1e-5
        assert torch.equal(biased.bias_delta(-0.5), -0.5 * b) and biased.bias_delta(0.0).abs().max() == 0
        base = bridge(x)
        with apply_adapters(bridge, [biased], 0.0):
            assert torch.equal(bridge(x), base)
        with apply_adapters(bridge, [biased], 1.0):
            assert (bridge(x) - base).abs().max() > 1e-2
    with pytest.raises(ValueError, match=f"has a bias term \\(bias='{kind}'\\).*no bias to merge.*LoRA"):
        with merged_weights(bridge, [biased], 1.0):
            pass
    with pytest.raises(ValueError, match="bias must be 'none', 'free', 'span' or 'only'"):
        AdapterSpec(site, bias=True)
