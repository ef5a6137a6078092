"""The training objective: move along a frozen direction, stay coherent token by token.

Symbols (docs/method.md): ``hs_pi`` are last-token hidden states of the steered policy at coefficient ``c``,
``hs_ref`` those of the reference (the same model at c = 0, no grad), ``d`` the frozen unit direction
``d_steer`` (PCA of dHS at c = 0, pointing from rejected to chosen). Rows are interleaved pairs: even rows
chosen, odd rows rejected.

``loss = −objective + w_coh · coherence + w_mono · monotonic_hinge``.

Every mean over the batch takes an optional ``total`` (``distributed.global_sum`` under torchrun): a mean is then
``total(Σ local) / total(local count)``, the mean over the global batch, and the loss is the one-process loss.
Without it (one process) each mean is computed exactly as written below.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from ..config import LossConfig, Objective

Total = Callable[[Tensor], Tensor]  # Σ over this process's rows -> Σ over every process's (global_sum)


def _mean(x: Tensor, total: Total | None) -> Tensor:
    """x.mean(), or the mean over every process's elements."""
    if total is None:
        return x.mean()
    return total(x.sum()) / total(x.new_tensor(float(x.numel())))


def _ratio(num: Tensor, den: Tensor, total: Total | None) -> Tensor:
    """num / max(den, 1), each summed over every process first if ``total`` is given (masked means)."""
    if total is None:
        return num / den.clamp(min=1)
    return total(num) / total(den).clamp(min=1)


def separation_objective(hs_pi: Float[Tensor, "batch d_model"], c: Float[Tensor, " batch"],
                         d: Float[Tensor, " d_model"],
                         scale: float = 1.0, total: Total | None = None) -> Float[Tensor, ""]:
    """mean over pairs of c · (hs_pi_cho − hs_pi_rej)·d / scale   (the seed's separation; maximise).

    Blind to moving chosen and rejected together, so it can reward amplifying the contrast without
    steering (docs/method.md).
    """
    per_pair = (hs_pi[0::2] - hs_pi[1::2]) @ d
    return _mean(c[0::2] * per_pair, total) / scale


def shift_objective(hs_pi: Float[Tensor, "batch d_model"], hs_ref: Float[Tensor, "batch d_model"],
                    c: Float[Tensor, " batch"],
                    d: Float[Tensor, " d_model"], scale: float = 1.0, total: Total | None = None,
                    balance: bool = False) -> Float[Tensor, ""]:
    """mean over rows of c · (hs_pi(c) − hs_ref)·d / scale   (every row, chosen and rejected; maximise).

    balance:  ½ Σ_{c = ±1} g(m_c),  m_c = mean over the rows at c of c · (hs_pi − hs_ref)·d / scale,
              g(x) = log(1 + x) for x ≥ 0, x below (continuous, slope 1 at 0), so the direction that lags gets
              (1 + m_lead) / (1 + m_lag) times the gradient of the one that leads.
    """
    proj = c * ((hs_pi - hs_ref) @ d) / scale
    if not balance:
        return _mean(proj, total)
    g = lambda x: torch.log1p(x.clamp(min=0)) + x.clamp(max=0)  # noqa: E731
    return 0.5 * (g(_mean(proj[c > 0], total)) + g(_mean(proj[c < 0], total)))


def token_logprobs(logits: Float[Tensor, "batch pos vocab"], input_ids: Int[Tensor, "batch pos"]
                   ) -> Float[Tensor, "batch pos_1"]:
    """logp(t) = log softmax(logits[:, t−1])[input_ids[:, t]] for t = 1..pos−1."""
    logits = logits[:, :-1].float()
    target = input_ids[:, 1:, None]
    return (logits.gather(-1, target)[..., 0] - torch.logsumexp(logits, dim=-1))


def token_mask(attention_mask: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos_1"]:
    """1 where both the predicted token and its context token are real (not padding)."""
    return (attention_mask[:, 1:] * attention_mask[:, :-1]).float()


def coherence_penalty(logp_pi: Float[Tensor, "batch pos_1"], logp_ref: Float[Tensor, "batch pos_1"],
                      mask: Float[Tensor, "batch pos_1"], margin: float, power: int = 2, total: Total | None = None
                      ) -> Float[Tensor, ""]:
    """mean over real tokens of relu(logp_ref(t) − logp_pi(t) − margin) ** power.

    Per token, so no single easy token can buy slack for the rest; against the c = 0 reference, so drift
    from the base model is bounded (the seed's detached-self baseline bounds nothing, docs/method.md).
    """
    excess = F.relu(logp_ref - logp_pi - margin) ** power
    return _ratio((excess * mask).sum(), mask.sum(), total)


def token_kl(logp_ref: Float[Tensor, "tok vocab"], logp_pi: Float[Tensor, "tok vocab"]) -> Float[Tensor, " tok"]:
    """KL_t(ref ‖ π) = Σ_v p_ref(v) (log p_ref(v) − log p_π(v)), one value per token (nat)."""
    return (logp_ref.exp() * (logp_ref - logp_pi)).sum(-1)


def kl_lagrangian(kl: Float[Tensor, ""], budget: float, lam: float) -> Float[Tensor, ""]:
    """λ · (KL / budget − 1): with λ ≥ 0 raised by dual ascent while KL > budget (and lowered, not below 0,
    while KL < budget), the steered model is held at the budget instead of merely penalised for drifting."""
    return lam * (kl / budget - 1)


def dual_step(lam: float, kl: float, budget: float, lr: float, equality: bool = False) -> float:
    """λ ← max(0, λ + lr · (KL / budget − 1)): projected gradient ascent on the multiplier of KL ≤ budget.

    ``equality``: the constraint KL = budget, so λ may go negative (λ + lr · (KL / budget − 1), unprojected): below
    the budget the Lagrangian term then *rewards* drift, and c = ±1 are driven to spend the budget exactly.
    """
    step = lam + lr * (kl / budget - 1)
    return step if equality else max(0.0, step)


def delta_nll(logp_pi: Float[Tensor, "batch pos_1"], logp_ref: Float[Tensor, "batch pos_1"],
              mask: Float[Tensor, "batch pos_1"], total: Total | None = None) -> Float[Tensor, ""]:
    """Mean per-token ΔNLL = mean(logp_ref − logp_pi) over real tokens (nat/token; > 0 is worse)."""
    return _ratio(((logp_ref - logp_pi) * mask).sum(), mask.sum(), total)


def monotonic_hinge(score_neg: Float[Tensor, ""], score_zero: Float[Tensor, ""], score_pos: Float[Tensor, ""],
                    margin: float = 0.0) -> Float[Tensor, ""]:
    """relu(s(−1) − s(0) + m) + relu(s(0) − s(+1) + m): zero only when s(−1) < s(0) < s(+1) by m."""
    return F.relu(score_neg - score_zero + margin) + F.relu(score_zero - score_pos + margin)


def projection_scores(hs_pi: Float[Tensor, "batch d_model"], hs_ref: Float[Tensor, "batch d_model"],
                      c: Float[Tensor, " batch"],
                      d: Float[Tensor, " d_model"], objective: Objective, scale: float = 1.0,
                      total: Total | None = None
                      ) -> tuple[Float[Tensor, ""], Float[Tensor, ""], Float[Tensor, ""]]:
    """The behaviour score s(c) at c = −1, 0, +1 that the hinge orders (rows with c = ±1 present).

    shift: s(c) = mean (hs_pi(c) − hs_ref)·d, so s(0) = 0. separation: s(c) = mean (hs_cho − hs_rej)·d at c,
    s(0) from the reference.
    """
    if objective == "shift":
        proj = (hs_pi - hs_ref) @ d / scale
        return _mean(proj[c < 0], total), proj.new_zeros(()), _mean(proj[c > 0], total)
    sep = lambda h: ((h[0::2] - h[1::2]) @ d) / scale  # noqa: E731
    s_pi, s_ref, cp = sep(hs_pi), sep(hs_ref), c[0::2]
    return _mean(s_pi[cp < 0], total), _mean(s_ref, total), _mean(s_pi[cp > 0], total)


def steering_loss(hs_pi: Float[Tensor, "batch d_model"], hs_ref: Float[Tensor, "batch d_model"],
                  c: Float[Tensor, " batch"], d: Float[Tensor, " d_model"], logp_pi: Float[Tensor, "batch pos_1"],
                  logp_ref: Float[Tensor, "batch pos_1"], mask: Float[Tensor, "batch pos_1"],
                  cfg: LossConfig = LossConfig(), scale: float = 1.0, total: Total | None = None
                  ) -> tuple[Tensor, dict[str, float]]:
    """loss = −objective + w_coh · coherence_penalty + w_mono · monotonic_hinge; returns (loss, parts).

    Every setting comes from ``cfg`` (defaults written once, in ``config.LossConfig``); ``scale`` is the
    reference's pair-separation RMS, so the objective is in units of the concept's natural size. ``total``: the
    rows are one process's shard of a global batch (module docstring).
    """
    if cfg.objective == "shift":
        obj = shift_objective(hs_pi, hs_ref, c, d, scale, total, cfg.balance)
    elif cfg.objective == "separation":
        obj = separation_objective(hs_pi, c, d, scale, total)
    else:
        raise ValueError(f"steering_loss reads hidden states: objective must be 'shift' or 'separation', got "
                         f"{cfg.objective!r} (objective 'behaviour' is behaviour_loss)")
    coh = coherence_penalty(logp_pi, logp_ref, mask, cfg.margin, cfg.power, total)
    mono = monotonic_hinge(*projection_scores(hs_pi, hs_ref, c, d, cfg.objective, scale, total),
                           margin=cfg.mono_margin)
    loss = -obj + cfg.w_coherence * coh + cfg.w_mono * mono
    parts = {"loss": loss.item(), "obj": obj.item(), "coh": coh.item(), "mono": mono.item(),
             "dnll": delta_nll(logp_pi.detach(), logp_ref, mask, total).item()}
    return loss, parts


def continuation_logratio(logp_pi: Float[Tensor, "rows pos_1"], logp_ref: Float[Tensor, "rows pos_1"],
                          reply: Float[Tensor, "rows pos_1"]) -> Float[Tensor, " rows"]:
    """Δ = Σ_t (log π_c(y_t | x, y_<t) − log π_0(y_t | x, y_<t)) over each row's continuation tokens y."""
    return ((logp_pi - logp_ref) * reply).sum(-1)


def behaviour_objective(delta: Float[Tensor, " rows"], c: Float[Tensor, " rows"], beta: float,
                        total: Total | None = None) -> Float[Tensor, ""]:
    """mean over prompts of log σ(β · c · (Δ_w − Δ_l))   (maximise; BiPO's objective, Cao et al. 2024).

    Rows come in twos on one prompt x and one coefficient c: even rows continue x with y_w, the base model's
    greedy continuation of the *chosen* prompt, odd rows with y_l, that of the *rejected* one. At c = +1 the
    steered model should raise y_w against y_l relative to the reference, at c = −1 the opposite; Δ from
    ``continuation_logratio``.
    """
    return _mean(F.logsigmoid(beta * c[0::2] * (delta[0::2] - delta[1::2])), total)


def behaviour_loss(logp_pi: Float[Tensor, "rows pos_1"], logp_ref: Float[Tensor, "rows pos_1"],
                   reply: Float[Tensor, "rows pos_1"], mask: Float[Tensor, "rows pos_1"], c: Float[Tensor, " rows"],
                   cfg: LossConfig = LossConfig(), total: Total | None = None) -> tuple[Tensor, dict[str, float]]:
    """loss = −behaviour_objective + w_coh · coherence_penalty on the prompt tokens; returns (loss, parts).

    ``mask``: every real token position; ``reply``: those that predict a continuation token (the continuation
    is meant to change, the prompt is not). The monotonic hinge of the hidden-state objectives has no
    counterpart: the log-sigmoid already orders c = −1 < 0 < +1 on every prompt. ``parts["win"]`` is the
    fraction of prompts whose log-ratio has the sign of c.
    """
    delta = continuation_logratio(logp_pi, logp_ref, reply)
    obj = behaviour_objective(delta, c, cfg.beta, total)
    prompt = mask * (1 - reply)
    coh = coherence_penalty(logp_pi, logp_ref, prompt, cfg.margin, cfg.power, total)
    loss = -obj + cfg.w_coherence * coh
    with torch.no_grad():
        margin = c[0::2] * (delta[0::2] - delta[1::2])
        win = _mean((margin > 0).float(), total)
    parts = {"loss": loss.item(), "obj": obj.item(), "coh": coh.item(), "mono": 0.0,
             "dnll": delta_nll(logp_pi.detach(), logp_ref, prompt, total).item(), "win": win.item()}
    return loss, parts


def noref_loss(hs_pos: Float[Tensor, "n d_model"], hs_neg: Float[Tensor, "n d_model"],
               logp_avg_pos: Float[Tensor, " n"],
               d: Float[Tensor, " d_model"] | None = None, boundary: float = 0.99, weight: float = 1e4
               ) -> Float[Tensor, ""]:
    """The seed's ``contrastive_steering_loss_noref``, for gradient extraction only (never training).

    loss = −mean((hs_pos − hs_neg)·d)  [or −mean ||hs_pos − hs_neg|| without d]
           + weight · mean relu(boundary · logp.detach() − logp)²

    Its coherence baseline is the policy's own detached log-prob, so it does not bound drift from a
    reference; its use is the gradient ∂loss/∂hs at one point (analysis: gradient → steering direction).
    """
    diff = hs_pos - hs_neg
    sep = (diff @ d) if d is not None else diff.norm(dim=-1)
    coherence = F.relu(boundary * logp_avg_pos.detach() - logp_avg_pos) ** 2
    return -sep.mean() + weight * coherence.mean()
