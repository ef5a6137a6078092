"""Each loss term against a plain loop written straight from its equation."""

import math

import pytest
import torch

from interp_steer.config import LossConfig
from interp_steer.method.loss import (
    behaviour_loss,
    behaviour_objective,
    coherence_penalty,
    continuation_logratio,
    delta_nll,
    dual_step,
    kl_lagrangian,
    monotonic_hinge,
    noref_loss,
    projection_scores,
    separation_objective,
    shift_objective,
    steering_loss,
    token_kl,
    token_logprobs,
    token_mask,
)


@pytest.fixture
def states():
    g = torch.Generator().manual_seed(0)
    n, d = 8, 5  # 4 pairs, interleaved
    hs_pi = torch.randn(n, d, generator=g)
    hs_ref = torch.randn(n, d, generator=g)
    dvec = torch.randn(d, generator=g)
    dvec = dvec / dvec.norm()
    c = torch.tensor([1.0, 1.0, 1.0, 1.0, -1.0, -1.0, -1.0, -1.0])
    return hs_pi, hs_ref, dvec, c


def dot(a, b):
    return sum(x * y for x, y in zip(a.tolist(), b.tolist()))


def test_separation_matches_loop(states):
    hs_pi, _, d, c = states
    total = 0.0
    for p in range(4):
        total += c[2 * p].item() * dot(hs_pi[2 * p] - hs_pi[2 * p + 1], d)
    assert math.isclose(separation_objective(hs_pi, c, d, scale=2.0).item(), total / 4 / 2.0, rel_tol=1e-5)


def test_shift_matches_loop(states):
    hs_pi, hs_ref, d, c = states
    total = sum(c[i].item() * dot(hs_pi[i] - hs_ref[i], d) for i in range(8))
    assert math.isclose(shift_objective(hs_pi, hs_ref, c, d).item(), total / 8, rel_tol=1e-5)


def test_balanced_shift_is_the_mean_of_each_directions_log1p_and_favours_the_lagging_one(states):
    """½ Σ_c g(m_c), g = log1p above 0 and the identity below; the direction that moves less gets the larger
    gradient (in the ratio (1 + m_lead) / (1 + m_lag)); LossConfig refuses balance for other objectives."""
    hs_pi, hs_ref, d, c = states
    g = lambda x: math.log1p(x) if x >= 0 else x  # noqa: E731
    m = {s: sum(s * dot(hs_pi[i] - hs_ref[i], d) for i in range(8) if c[i].item() == s) / 4 for s in (1.0, -1.0)}
    want = 0.5 * (g(m[1.0]) + g(m[-1.0]))
    assert math.isclose(shift_objective(hs_pi, hs_ref, c, d, balance=True).item(), want, rel_tol=1e-5)
    # a state where up moves 1 and down 3 (in units of d): the up rows' gradient is (1 + 3) / (1 + 1) = 2x
    hs = hs_ref + torch.outer(torch.where(c > 0, 1.0, 3.0) * c, d)
    hs.requires_grad_(True)
    shift_objective(hs, hs_ref, c, d, balance=True).backward()
    up, down = (hs.grad[c > 0] @ d).abs().mean(), (hs.grad[c < 0] @ d).abs().mean()
    assert up.item() == pytest.approx(2 * down.item(), rel=1e-5)
    assert shift_objective(hs_pi, hs_ref, c, d, balance=False).item() == pytest.approx(
        shift_objective(hs_pi, hs_ref, c, d).item())
    with pytest.raises(ValueError, match="balance applies to objective 'shift'"):
        LossConfig(objective="separation", balance=True)


def test_shift_sees_a_common_move_that_separation_cannot(states):
    hs_pi, _, d, c = states
    moved = hs_pi + 3.0 * d * c[:, None]  # every row moves along d with the sign of c
    assert separation_objective(moved, c, d).item() == pytest.approx(separation_objective(hs_pi, c, d).item(), abs=1e-5)
    assert shift_objective(moved, hs_pi, c, d).item() == pytest.approx(3.0, abs=1e-5)


def test_token_logprobs_and_mask_match_loop():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 7, generator=g)
    ids = torch.randint(0, 7, (2, 4), generator=g)
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 0]])
    lp = token_logprobs(logits, ids)
    tm = token_mask(mask)
    for b in range(2):
        for t in range(1, 4):
            ref = logits[b, t - 1].log_softmax(-1)[ids[b, t]].item()
            assert math.isclose(lp[b, t - 1].item(), ref, rel_tol=1e-5, abs_tol=1e-6)
            assert tm[b, t - 1].item() == float(mask[b, t] and mask[b, t - 1])


def test_coherence_penalty_matches_loop():
    g = torch.Generator().manual_seed(2)
    lp_ref = -torch.rand(3, 6, generator=g) * 3
    lp_pi = lp_ref - torch.randn(3, 6, generator=g)
    mask = (torch.rand(3, 6, generator=g) > 0.3).float()
    for power in (1, 2):
        num = den = 0.0
        for b in range(3):
            for t in range(6):
                if mask[b, t]:
                    num += max(0.0, lp_ref[b, t].item() - lp_pi[b, t].item() - 0.2) ** power
                    den += 1
        assert math.isclose(coherence_penalty(lp_pi, lp_ref, mask, 0.2, power).item(), num / den, rel_tol=1e-5)
    # tokens that improve, or drop by less than the margin, cost nothing
    assert coherence_penalty(lp_ref + 0.5, lp_ref, mask, 0.0).item() == 0.0
    assert coherence_penalty(lp_ref - 0.1, lp_ref, mask, 0.2).item() == 0.0
    dn = sum((lp_ref[b, t] - lp_pi[b, t]).item() for b in range(3) for t in range(6) if mask[b, t]) / mask.sum().item()
    assert math.isclose(delta_nll(lp_pi, lp_ref, mask).item(), dn, rel_tol=1e-5)


def test_monotonic_hinge():
    t = torch.tensor
    assert monotonic_hinge(t(-1.0), t(0.0), t(1.0)).item() == 0.0
    assert monotonic_hinge(t(0.5), t(0.0), t(1.0)).item() == pytest.approx(0.5)
    assert monotonic_hinge(t(-1.0), t(0.0), t(-0.25)).item() == pytest.approx(0.25)
    assert monotonic_hinge(t(-1.0), t(0.0), t(1.0), margin=1.5).item() == pytest.approx(1.0)


def test_projection_scores_match_loop(states):
    hs_pi, hs_ref, d, c = states
    neg, zero, pos = projection_scores(hs_pi, hs_ref, c, d, "shift")
    assert zero.item() == 0.0
    assert pos.item() == pytest.approx(sum(dot(hs_pi[i] - hs_ref[i], d) for i in range(4)) / 4, rel=1e-5)
    assert neg.item() == pytest.approx(sum(dot(hs_pi[i] - hs_ref[i], d) for i in range(4, 8)) / 4, rel=1e-5)
    neg, zero, pos = projection_scores(hs_pi, hs_ref, c, d, "separation")
    assert pos.item() == pytest.approx(sum(dot(hs_pi[2 * p] - hs_pi[2 * p + 1], d) for p in (0, 1)) / 2, rel=1e-5)
    assert zero.item() == pytest.approx(sum(dot(hs_ref[2 * p] - hs_ref[2 * p + 1], d) for p in range(4)) / 4,
                                        rel=1e-5)


def test_steering_loss_combines_parts(states):
    hs_pi, hs_ref, d, c = states
    g = torch.Generator().manual_seed(3)
    lp_ref = -torch.rand(8, 5, generator=g)
    lp_pi = lp_ref - 0.5 * torch.rand(8, 5, generator=g)
    mask = torch.ones(8, 5)
    for objective in ("shift", "separation"):
        cfg = LossConfig(objective=objective, margin=0.1, w_coherence=3.0, w_mono=2.0)
        loss, parts = steering_loss(hs_pi, hs_ref, c, d, lp_pi, lp_ref, mask, cfg)
        expect = -parts["obj"] + 3.0 * parts["coh"] + 2.0 * parts["mono"]
        assert loss.item() == pytest.approx(expect, rel=1e-5)
        obj = shift_objective(hs_pi, hs_ref, c, d) if objective == "shift" else separation_objective(hs_pi, c, d)
        assert parts["obj"] == pytest.approx(obj.item(), rel=1e-6)
    with pytest.raises(ValueError, match="objective"):
        LossConfig(objective="magnitude")


def test_noref_loss_matches_loop(states):
    hs_pi, hs_ref, d, _ = states
    logp = -torch.rand(8)
    sep = sum(dot(hs_pi[i] - hs_ref[i], d) for i in range(8)) / 8
    coh = sum(max(0.0, 0.99 * logp[i].item() - logp[i].item()) ** 2 for i in range(8)) / 8
    assert noref_loss(hs_pi, hs_ref, logp, d).item() == pytest.approx(-sep + 1e4 * coh, rel=1e-4)
    norm = sum((hs_pi[i] - hs_ref[i]).norm().item() for i in range(8)) / 8
    assert noref_loss(hs_pi, hs_ref, logp).item() == pytest.approx(-norm + 1e4 * coh, rel=1e-4)


def test_token_kl_matches_a_loop_and_the_lagrangian_holds_the_budget():
    g = torch.Generator().manual_seed(5)
    ref = torch.randn(3, 7, generator=g).log_softmax(-1)
    pi = torch.randn(3, 7, generator=g).log_softmax(-1)
    kl = token_kl(ref, pi)
    for t in range(3):
        assert kl[t].item() == pytest.approx(sum(math.exp(ref[t, v]) * (ref[t, v] - pi[t, v]) for v in range(7)).item(),
                                             rel=1e-5)
    assert token_kl(ref, ref).abs().max() <= 1e-6 and (kl > 0).all()
    assert kl_lagrangian(torch.tensor(0.2), 0.1, 3.0).item() == pytest.approx(3.0)  # λ (KL/budget − 1)
    assert dual_step(1.0, 0.2, 0.1, 0.5) == pytest.approx(1.5)    # over budget: λ rises
    assert dual_step(0.2, 0.0, 0.1, 0.5) == 0.0                   # under budget: falls, never below 0
    # KL = budget: below 0 rewards drift
    assert dual_step(0.2, 0.0, 0.1, 0.5, equality=True) == pytest.approx(-0.3)
    assert dual_step(-0.3, 0.2, 0.1, 0.5, equality=True) == pytest.approx(0.2)
    assert kl_lagrangian(torch.tensor(0.05), 0.1, -0.3).item() == pytest.approx(0.15)  # lowered by raising KL


def test_behaviour_objective_matches_a_loop_and_rewards_the_sign_of_c():
    """log σ(β c (Δ_w − Δ_l)) per (prompt, c) row pair, Δ summed over continuation tokens only."""
    g = torch.Generator().manual_seed(3)
    logp_pi, logp_ref = -torch.rand(8, 6, generator=g), -torch.rand(8, 6, generator=g)
    reply = torch.zeros(8, 6)
    reply[:, 3:] = 1
    reply[5, 5] = 0  # rows may differ in continuation length
    mask = torch.ones(8, 6)
    c = torch.tensor([1.0, 1, -1, -1] * 2)
    delta = continuation_logratio(logp_pi, logp_ref, reply)
    for r in range(8):
        assert delta[r] == pytest.approx(sum(float(logp_pi[r, t] - logp_ref[r, t]) for t in range(6) if reply[r, t]),
                                         abs=1e-6)
    beta = 0.3
    expect = sum(math.log(1 / (1 + math.exp(-beta * float(c[2 * i] * (delta[2 * i] - delta[2 * i + 1])))))
                 for i in range(4)) / 4
    assert behaviour_objective(delta, c, beta).item() == pytest.approx(expect, rel=1e-6)
    # at the reference every log-ratio is 0: the objective is log σ(0) = −log 2 and nothing is "won"
    loss, parts = behaviour_loss(logp_ref, logp_ref, reply, mask, c, LossConfig(objective="behaviour"))
    assert parts["obj"] == pytest.approx(-math.log(2)) and parts["coh"] == 0 and parts["win"] == 0
    # raising y_w (even rows) helps where c = +1 and hurts where c = −1
    up = logp_ref + 0.5 * reply * (torch.arange(8) % 2 == 0)[:, None]
    _, p = behaviour_loss(up, logp_ref, reply, mask, c, LossConfig(objective="behaviour"))
    assert p["win"] == 0.5
    d_up, pos = continuation_logratio(up, logp_ref, reply), c > 0
    assert behaviour_objective(d_up[pos], c[pos], beta) > -math.log(2) > behaviour_objective(d_up[~pos], c[~pos], beta)


def test_behaviour_loss_guards_only_the_prompt_tokens():
    """A continuation token made less likely costs nothing in coherence (it is meant to move); a prompt token does."""
    logp_ref = torch.full((4, 5), -1.0)
    reply = torch.zeros(4, 5)
    reply[:, 3:] = 1
    mask = torch.ones(4, 5)
    c = torch.tensor([1.0, 1, -1, -1])
    cfg = LossConfig(objective="behaviour", margin=0.1, w_coherence=2.0)
    drop_reply = logp_ref - 2.0 * reply
    _, parts = behaviour_loss(drop_reply, logp_ref, reply, mask, c, cfg)
    assert parts["coh"] == 0 and parts["dnll"] == 0
    drop_prompt = logp_ref - 2.0 * (1 - reply)
    loss, parts = behaviour_loss(drop_prompt, logp_ref, reply, mask, c, cfg)
    assert parts["coh"] == pytest.approx(1.9 ** 2) and parts["dnll"] == pytest.approx(2.0)
    assert loss.item() == pytest.approx(-parts["obj"] + 2.0 * parts["coh"], rel=1e-6)
    with pytest.raises(ValueError, match="behaviour_loss"):
        steering_loss(torch.zeros(4, 3), torch.zeros(4, 3), c, torch.ones(3), logp_ref, logp_ref, mask, cfg)
