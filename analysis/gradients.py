"""Gradient → steering mapping per layer, against PCA, mean-diff and the learned adapter's effective direction.

For each layer L (last-token ``blocks.L.hook_resid_post``), averaged over rows::

    g_noref(L) = −mean_cho ∂L_noref / ∂hs_L          (directions.gradient_directions: seed's noref loss)
    g_train(L) = −mean_rows ∂L_train / ∂hs_L,   L_train = −shift_objective + w_coh · coherence_penalty  at c
    e(L)       = mean_rows [hs_L(+c) − hs_L(−c)]        (what the trained adapter does at L; held-out rows)

and their cosines with ``pca_diff`` and ``mean_diff`` of the reference states at L.

Two facts shape what these gradients can show (both tested in ``tests/test_analysis.py``):

* The coherence terms score the prompt's own tokens, predicted from positions ``0 … last−1``. Under causal
  attention the last token's state never reaches those predictions, so ∂coherence/∂hs_L[last] = 0 exactly, for
  the noref and the training loss alike: at the last token both gradients are the pull-back of the frozen
  direction, ``J_{L→loss}ᵀ d_steer``, through the layers between L and the loss layer (summed over chosen rows
  for noref, over every row for the shift objective). Coherence shapes training through the other positions.
* At the reference (no adapters) every token sits inside its margin, so the training loss's coherence term is
  flat there too; with ``adapters`` the gradient is taken at the steered model.

The monotonic hinge is left out: it needs both signs of c in one batch, and it is zero whenever the shift
objective is positive on both sides.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from interp_steer.config import LossConfig
from interp_steer.method.adapter import SVDAdapter, apply_adapters
from interp_steer.method.data import Batch
from interp_steer.method.directions import (
    gradient_directions,
    mean_diff_direction,
    pca_diff_direction,
    retain_grad_hook,
)
from interp_steer.method.loss import coherence_penalty, shift_objective, token_logprobs, token_mask
from interp_steer.method.models import model_device
from interp_steer.method.states import check_hook_names, forward_last, stop_layer
from interp_steer.names import layer_of, resid_names, resid_post

from .dhs import capture_both_signs


def cosine(a: Tensor, b: Tensor) -> float:
    """Signed cosine; NaN when either vector is zero or NaN (an undefined direction stays undefined)."""
    a, b = a.double().flatten(), b.double().flatten()
    na, nb = a.norm(), b.norm()
    if not (torch.isfinite(na) and torch.isfinite(nb)) or na == 0 or nb == 0:
        return math.nan
    return (a @ b / (na * nb)).item()


def _unit_or_nan(v: Tensor) -> Tensor:
    n = v.norm()
    return v / n if n > 0 else torch.full_like(v, math.nan)


def noref_gradient_directions(bridge: TransformerBridge, batches: Sequence[Batch], layers: Sequence[int],
                              loss_hook: str,
                              d_steer: Float[Tensor, " d_model"]) -> dict[int, Float[Tensor, " d_model"]]:
    """``directions.gradient_directions`` keyed by layer; layers after the loss layer are left out."""
    loss_layer = layer_of(loss_hook)
    keep = [L for L in layers if loss_layer is None or L <= loss_layer]
    dirs = gradient_directions(bridge, batches, keep, loss_hook, d_steer)
    return {L: dirs[resid_post(L)] for L in keep}


def training_loss_gradients(bridge: TransformerBridge, batches: Sequence[Batch], layers: Sequence[int],
                            loss_hook: str, d_steer: Float[Tensor, " d_model"], *,
                            adapters: Iterable[SVDAdapter] = (), c: float = 1.0, cfg: LossConfig = LossConfig(),
                            scale: float = 1.0) -> dict[int, Float[Tensor, " d_model"]]:
    """g_train(L) = −mean over rows of ∂(−shift + w_coh·coherence)/∂hs_L at the last token, unit norm.

    The coherence term is the training loss's, with ``cfg``'s ``margin``, ``w_coherence`` and ``power``
    (``config.LossConfig``: the defaults are written there only). The objective is always ``shift`` and the
    monotonic hinge is left out, whatever ``cfg.objective`` and ``cfg.w_mono`` say (module docstring).

    Without ``adapters`` the policy is the reference (c only signs the objective) and the coherence term, exactly
    zero there with zero gradient, is skipped. Layers after the loss layer get NaN directions (no dependence).
    """
    if c == 0:
        raise ValueError("c = 0 makes the shift objective identically zero: its gradient has no direction")
    adapters = list(adapters)
    names = check_hook_names(bridge, resid_names(layers))
    (loss_hook,) = check_hook_names(bridge, [loss_hook])
    dev = model_device(bridge)
    d = d_steer.float().to(dev)
    # At the reference every token is inside its margin: the coherence term and its gradient are exactly 0,
    # so the forward can stop at the loss layer and skip the logits (the costly part on a 49k vocabulary).
    stop = None if adapters else stop_layer(bridge, [*names, loss_hook])
    # float64 accumulators on the CPU: MPS has no float64, and the sums are tiny
    sums = {L: torch.zeros(bridge.cfg.d_model, dtype=torch.float64) for L in layers}
    for b in batches:
        b = b.to(dev)
        rows, m = torch.arange(len(b), device=dev), token_mask(b.attention_mask)
        acts: dict[str, Tensor] = {}
        hooks = [(n, retain_grad_hook(acts, n)) for n in [*names, loss_hook]]
        ref = _reference(bridge, b, loss_hook) if adapters else None
        with torch.enable_grad():
            ctx = apply_adapters(bridge, adapters, float(c)) if adapters else nullcontext()
            with ctx:
                logits = bridge.run_with_hooks(b.input_ids, attention_mask=b.attention_mask,
                                               position_ids=b.position_ids, fwd_hooks=hooks, stop_at_layer=stop)
            hs_pi = acts[loss_hook][rows, b.last].float()
            cc = torch.full((len(b),), float(c), device=dev)
            if ref is None:
                loss = -shift_objective(hs_pi, hs_pi.detach(), cc, d, scale)
            else:
                hs_ref, logp_ref = ref
                logp_pi = token_logprobs(logits, b.input_ids)
                loss = -shift_objective(hs_pi, hs_ref, cc, d, scale) \
                    + cfg.w_coherence * coherence_penalty(logp_pi, logp_ref, m, cfg.margin, cfg.power)
            present = [(L, n) for L, n in zip(layers, names) if n in acts]  # after stop_at_layer: no state
            grads = torch.autograd.grad(loss, [acts[n] for _, n in present], allow_unused=True)
        for (L, _), g in zip(present, grads):
            if g is not None:
                sums[L] -= g[rows, b.last].cpu().double().sum(0)
    return {L: _unit_or_nan(s).float() for L, s in sums.items()}


def _reference(bridge: TransformerBridge, b: Batch, loss_hook: str
               ) -> tuple[Float[Tensor, "batch d_model"], Float[Tensor, "batch pos_1"]]:
    """(hs_ref at the loss hook's last token, per-token log-probs) at c = 0, without grad."""
    with torch.inference_mode():
        h, logits = forward_last(bridge, b, [loss_hook], logits=True)
        return h[loss_hook].clone(), token_logprobs(logits, b.input_ids).clone()


def effective_directions(bridge: TransformerBridge, batches: Sequence[Batch], adapters: Iterable[SVDAdapter],
                         layers: Sequence[int], c: float = 1.0) -> dict[int, Float[Tensor, " d_model"]]:
    """e(L) = mean over rows of hs_L(+c) − hs_L(−c): the adapter's effective direction at L (not normalised).

    Raises ``ValueError`` at c = 0, where e is identically zero and has no direction. Layers upstream of every
    adapter get an exact zero vector (cosines with it are NaN, see ``cosine``).
    """
    if c == 0:
        raise ValueError("c = 0 is the base model: hs(+0) − hs(−0) = 0, so the effective direction is undefined; "
                         "use c > 0 (e.g. 1.0)")
    plus, minus = capture_both_signs(bridge, batches, layers, adapters, c)
    return {L: (plus[L] - minus[L]).double().mean(0).float() for L in layers}


@dataclass
class LayerMap:
    """Signed cosines per layer (lists aligned with ``layers``); NaN where a direction is undefined."""

    layers: list[int]
    grad_pca: list[float]
    grad_mean: list[float]
    grad_learned: list[float]
    noref_pca: list[float]
    noref_mean: list[float]
    noref_learned: list[float]
    learned_pca: list[float]
    learned_mean: list[float]
    pca_mean: list[float]
    grad_noref: list[float]        # the two gradients against each other
    learned_norm: list[float]      # ‖e(L)‖: how far the adapter moves the stream at L (0 upstream of it)

    def to_dict(self) -> dict:
        return asdict(self)


def layer_map(hs_ref: dict[int, Float[Tensor, "batch d_model"]], grad: dict[int, Float[Tensor, " d_model"]],
              noref: dict[int, Float[Tensor, " d_model"]],
              learned: dict[int, Float[Tensor, " d_model"]]) -> LayerMap:
    """Cosines of every direction pair per layer; a layer missing from a dict gives NaN."""
    nan = torch.full((1,), math.nan)
    out: dict[str, list[float]] = {f: [] for f in LayerMap.__dataclass_fields__ if f != "layers"}
    layers = sorted(hs_ref)
    for L in layers:
        pca, mean = pca_diff_direction(hs_ref[L]), mean_diff_direction(hs_ref[L])
        g, n, e = grad.get(L, nan), noref.get(L, nan), learned.get(L, nan)
        for name, (a, b) in {"grad_pca": (g, pca), "grad_mean": (g, mean), "grad_learned": (g, e),
                             "noref_pca": (n, pca), "noref_mean": (n, mean), "noref_learned": (n, e),
                             "learned_pca": (e, pca), "learned_mean": (e, mean), "pca_mean": (pca, mean),
                             "grad_noref": (g, n)}.items():
            out[name].append(cosine(a, b))
        out["learned_norm"].append(e.double().norm().item() if L in learned else math.nan)
    return LayerMap(layers=layers, **out)
