"""Steering directions from last-token states of interleaved pairs, and additive steering vectors.

All strategies take ``hs`` (rows interleaved: even chosen, odd rejected) and return a unit direction whose
sign points from rejected to chosen: ``mean((hs_cho − hs_rej)·d) > 0``.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Callable, Iterator, Literal, Mapping

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from ..names import layer_of, resid_names
from .loss import noref_loss
from .models import model_device
from .states import check_hook_names, stop_layer

DirectionKind = Literal[  # how a direction is read from pair states (not a sweep.Method)
    "pca_diff", "pca_center", "mean_diff", "random", "dhs_svd"]


def paired_diff(hs: Float[Tensor, "batch d_model"]) -> Float[Tensor, "pairs d_model"]:
    """dHS = hs_cho − hs_rej per pair (at c = 0 both from the reference)."""
    if hs.shape[0] % 2:
        raise ValueError(f"hs must hold interleaved pairs (even number of rows), got {hs.shape[0]}")
    return hs[0::2] - hs[1::2]


def _orient(d: Tensor, diff: Tensor) -> Tensor:
    d = d / d.norm()
    return -d if (diff @ d).mean() < 0 else d


def dhs_svd_direction(hs: Float[Tensor, "batch d_model"]) -> Float[Tensor, " d_model"]:
    """Top right singular vector of the uncentred dHS: the axis holding most of the pairs' difference energy.

    The default frozen ``d_steer``; unlike centred PCA it keeps the mean difference in play.
    """
    diff = paired_diff(hs).double()
    return _orient(torch.linalg.svd(diff, full_matrices=False).Vh[0], diff).float()


def pca_diff_direction(hs: Float[Tensor, "batch d_model"]) -> Float[Tensor, " d_model"]:
    """First principal component of the centred paired differences (repeng's ``pca_diff``)."""
    diff = paired_diff(hs).double()
    centred = diff - diff.mean(0)
    return _orient(torch.linalg.svd(centred, full_matrices=False).Vh[0], diff).float()


def pca_center_direction(hs: Float[Tensor, "batch d_model"]) -> Float[Tensor, " d_model"]:
    """First PC of states centred on each pair's mean (repeng's ``pca_center``): ±dHS/2 per pair."""
    h = hs.double()
    centre = (h[0::2] + h[1::2]) / 2
    rows = torch.cat([h[0::2] - centre, h[1::2] - centre])
    return _orient(torch.linalg.svd(rows, full_matrices=False).Vh[0], paired_diff(h)).float()


def mean_diff_direction(hs: Float[Tensor, "batch d_model"]) -> Float[Tensor, " d_model"]:
    """mean(hs_cho − hs_rej), normalised (CAA)."""
    diff = paired_diff(hs).double()
    return _orient(diff.mean(0), diff).float()


def random_direction(hs: Float[Tensor, "batch d_model"], seed: int = 0) -> Float[Tensor, " d_model"]:
    """A seeded random unit direction (sign still oriented so comparisons are like for like)."""
    g = torch.Generator().manual_seed(seed)
    return _orient(torch.randn(hs.shape[-1], generator=g, dtype=torch.float64), paired_diff(hs).double()).float()


def direction(method: str, hs: Float[Tensor, "batch d_model"], seed: int = 0) -> Float[Tensor, " d_model"]:
    """The unit direction of ``method`` for interleaved states ``hs``."""
    strategies: dict[str, Callable[[Tensor], Tensor]] = {
        "pca_diff": pca_diff_direction,
        "pca_center": pca_center_direction,
        "mean_diff": mean_diff_direction,
        "dhs_svd": dhs_svd_direction,
        "random": lambda h: random_direction(h, seed),
    }
    if method not in strategies:
        raise ValueError(f"unknown direction method {method!r}; choose one of {sorted(strategies)}")
    return strategies[method](hs)


@dataclass(frozen=True)
class SteeringVector:
    """Additive steering: ``hs[name] ← hs[name] + coeff · scale · d`` at every position, per hook name.

    ``scale`` makes one coefficient unit comparable across layers (default: the RMS norm of the states).
    Coefficient 0 is the identity exactly (no hook is registered).
    """

    directions: Mapping[str, Tensor]
    scales: Mapping[str, float]
    coeff: float = 1.0

    def scaled(self, coeff: float) -> "SteeringVector":
        return replace(self, coeff=coeff)

    @contextmanager
    def apply(self, bridge: TransformerBridge) -> Iterator[TransformerBridge]:
        """Add the vectors inside the block; exactly these hooks are removed on exit."""
        missing = [n for n in self.directions if n not in bridge.hook_dict]
        if missing:
            raise ValueError(f"unknown hook names for steering vector: {missing}")
        dev = model_device(bridge)
        hooks = [] if self.coeff == 0 else [
            (n, _add_vector((self.coeff * self.scales[n] * d).to(dev))) for n, d in self.directions.items()
        ]
        with bridge.hooks(fwd_hooks=hooks):
            yield bridge


def _add_vector(v: Tensor) -> Callable:
    def hook(act: Tensor, hook) -> Tensor:
        return act + v.to(act.dtype)
    return hook


def steering_vector(hs: Mapping[str, Float[Tensor, "batch d_model"]], method: DirectionKind, seed: int = 0
                    ) -> SteeringVector:
    """One direction per hook name from captured states, scaled by the RMS norm of those states."""
    dirs = {n: direction(method, h, seed) for n, h in hs.items()}
    scales = {n: h.norm(dim=-1).pow(2).mean().sqrt().item() for n, h in hs.items()}
    return SteeringVector(dirs, scales)


def gradient_directions(bridge: TransformerBridge, batches, layers: list[int], loss_hook: str,
                        d_steer: Float[Tensor, " d_model"]) -> dict[str, Float[Tensor, " d_model"]]:
    """g_L = −mean over chosen rows of ∂L_noref/∂hs_L (last token), normalised, for each ``resid_post`` layer L.

    ``L_noref`` (loss.noref_loss) is −mean((hs_cho − hs_rej)·d_steer) at ``loss_hook`` plus a coherence term on
    the chosen rows' token log-probs. That term has exactly zero gradient at the last token: by causality no
    logit of a real token depends on the last position (its own logit predicts a token not in the text). So
    g_L is the pull-back of d_steer through the layers between L and the loss layer, and the forward stops
    at the loss layer (no logits). It is the first-order steering direction at L (seed guide: gradient →
    steering mapping).
    """
    names = check_hook_names(bridge, [*resid_names(layers), loss_hook])
    dev = model_device(bridge)
    sums = {n: torch.zeros(bridge.cfg.d_model, device=dev) for n in names[:-1]}
    stop = stop_layer(bridge, names)
    count = 0
    for batch in batches:
        batch = batch.to(dev)
        acts: dict[str, Tensor] = {}
        hooks = [(n, retain_grad_hook(acts, n)) for n in names]
        with torch.enable_grad():
            bridge.run_with_hooks(batch.input_ids, attention_mask=batch.attention_mask,
                                  position_ids=batch.position_ids, stop_at_layer=stop, fwd_hooks=hooks)
            rows = torch.arange(len(batch), device=dev)
            hs = acts[loss_hook][rows, batch.last].float()
            # the coherence term's gradient here is zero (docstring)
            no_logits = torch.zeros(len(batch) // 2, device=dev)
            loss = noref_loss(hs[0::2], hs[1::2], no_logits, d_steer.to(dev))
            grads = torch.autograd.grad(loss, [acts[n] for n in names[:-1]])
        for n, g in zip(names[:-1], grads):
            sums[n] -= g[rows, batch.last][0::2].sum(0).float()
        count += len(batch) // 2
    return {n: (s / count) / (s / count).norm() for n, s in sums.items()}


def retain_grad_hook(store: dict[str, Tensor], key: str) -> Callable:
    """A hook that stores its activation, made a grad-requiring leaf if the frozen model gave none."""
    def hook(act: Tensor, hook) -> Tensor:
        if not act.requires_grad:  # the base model is frozen: make this activation a leaf we can ask about
            act = act.detach().requires_grad_(True)
        store[key] = act
        return act
    return hook


def additive_vector(bridge: TransformerBridge, name: str, artifact, hs: dict, batches) -> SteeringVector:
    """The additive steer ``name`` (pca_diff, pca_center, mean_diff, random, gradient) at the hooks of ``hs``.
    ``random`` is drawn from the artifact's training seed: each seed of a study is a fresh draw, so the null
    control's interval over seeds is an interval over directions."""
    if name == "gradient":
        layers = [layer_of(n) for n in hs]
        # a forward + backward per batch: 4 batches (~32 pairs) give a stable mean at a fraction of the cost
        dirs = gradient_directions(bridge, batches[:4], layers, artifact.loss_hook, artifact.d_steer)
        return SteeringVector(dirs, steering_vector(hs, "mean_diff").scales)
    return steering_vector(hs, name, seed=artifact.config.seed if artifact is not None else 0)
