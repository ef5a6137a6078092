"""Steering directions and additive steering vectors."""

import pytest
import torch

from interp_steer.method.data import pair_batches, persona_pairs
from interp_steer.method.directions import (
    SteeringVector,
    direction,
    gradient_directions,
    paired_diff,
    steering_vector,
)
from interp_steer.method.states import capture
from interp_steer.names import resid_names


@pytest.fixture
def hs():
    g = torch.Generator().manual_seed(0)
    concept = torch.zeros(6)
    concept[2] = 1.0
    base = torch.randn(40, 6, generator=g)
    base[0::2] += 3 * concept  # chosen rows sit 3 units further along axis 2
    return base, concept


@pytest.mark.parametrize("method", ["pca_diff", "pca_center", "mean_diff", "dhs_svd", "random"])
def test_directions_are_unit_and_point_from_rejected_to_chosen(hs, method):
    h, _ = hs
    d = direction(method, h)
    assert d.norm().item() == pytest.approx(1.0, abs=1e-5)
    assert (paired_diff(h) @ d).mean() > 0


@pytest.mark.parametrize("method", ["pca_center", "mean_diff", "dhs_svd"])
def test_directions_find_a_planted_concept(hs, method):
    h, concept = hs
    assert direction(method, h) @ concept > 0.9


def test_mean_diff_matches_hand_computation(hs):
    h, _ = hs
    m = sum(h[2 * i] - h[2 * i + 1] for i in range(20)) / 20
    assert (direction("mean_diff", h) - m / m.norm()).abs().max() <= 1e-6


def test_unknown_method_and_odd_rows_raise(hs):
    h, _ = hs
    with pytest.raises(ValueError, match="unknown direction method"):
        direction("ica", h)
    with pytest.raises(ValueError, match="even number"):
        direction("mean_diff", h[:5])


def test_steering_vector_zero_is_identity_and_scaled_is_a_new_value(tiny):
    bridge, tok = tiny
    pairs = persona_pairs(tok)[:6]
    hs = capture(bridge, pair_batches(pairs, tok), resid_names([1]))
    vec = steering_vector(hs, "mean_diff")
    ids = tok(["hello world"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        base = bridge(ids)
        with vec.scaled(0.0).apply(bridge):
            zero = bridge(ids)
        with vec.scaled(0.5).apply(bridge):
            half = bridge(ids)
        # additive: the hooked residual is exactly base + 0.5·scale·d at every position
        with vec.scaled(0.5).apply(bridge):
            got = capture(bridge, pair_batches(pairs[:1], tok), resid_names([1]))["blocks.1.hook_resid_post"]
        plain = capture(bridge, pair_batches(pairs[:1], tok), resid_names([1]))["blocks.1.hook_resid_post"]
    n = "blocks.1.hook_resid_post"
    assert torch.equal(zero, base)
    assert (half - base).abs().max() > 1e-3
    assert (got - plain - 0.5 * vec.scales[n] * vec.directions[n]).abs().max() <= 1e-5
    assert vec.coeff == 1.0 and vec.scaled(2.0).coeff == 2.0
    with pytest.raises(ValueError, match="unknown hook names"):
        with SteeringVector({"blocks.9.hook_resid_post": torch.zeros(64)},
                            {"blocks.9.hook_resid_post": 1.0}).apply(bridge):
            pass


def test_gradient_direction_at_the_loss_layer_is_d_steer(tiny):
    """−∂(−(h_cho − h_rej)·d)/∂h_cho = d exactly at the loss layer itself."""
    bridge, tok = tiny
    batches = list(pair_batches(persona_pairs(tok)[:4], tok, batch_pairs=2))
    d = torch.randn(64)
    d = d / d.norm()
    g = gradient_directions(bridge, batches, [0, 2], "blocks.2.hook_resid_post", d)
    assert (g["blocks.2.hook_resid_post"] - d).abs().max() <= 1e-5
    g0 = g["blocks.0.hook_resid_post"]
    assert torch.isfinite(g0).all() and g0.norm().item() == pytest.approx(1.0, abs=1e-5)
    assert all(p.grad is None for p in bridge.parameters())


def test_the_random_baseline_is_a_fresh_draw_per_training_seed(tiny, hs):
    from types import SimpleNamespace

    from interp_steer.method.directions import additive_vector

    states = {"blocks.0.hook_resid_post": hs[0]}
    art = lambda seed: SimpleNamespace(config=SimpleNamespace(seed=seed))  # noqa: E731
    d0, d0b, d1 = (additive_vector(tiny[0], "random", art(s), states, []).directions["blocks.0.hook_resid_post"]
                   for s in (0, 0, 1))
    assert torch.equal(d0, d0b) and not torch.allclose(d0, d1)  # the same seed, the same draw; another, another
