"""Where training acts, from a TrainConfig: the adapted sites (``AdapterSpec``s) and the hook the loss reads."""

from __future__ import annotations

from ..config import TrainConfig
from ..method.adapter import AdapterSpec
from ..names import resid_post, site_name


def resolve_layer(v: int | float, n_layers: int) -> int:
    """A block index from an index or a depth fraction in (0, 1) (``round(v · (n_layers − 1))``)."""
    L = round(v * (n_layers - 1)) if isinstance(v, float) else v
    if not 0 <= L < n_layers:
        raise ValueError(f"layer {v!r} -> {L} is outside this model's {n_layers} blocks")
    return L


def loss_hook(cfg: TrainConfig, n_layers: int) -> str:
    """``blocks.{loss_layer}.hook_resid_post``: where the objective is measured."""
    return resid_post(resolve_layer(cfg.loss_layer, n_layers))


def adapter_specs(cfg: TrainConfig, n_layers: int) -> list[AdapterSpec]:
    """One spec per adapted block (sorted, deduplicated); every one must come before the loss layer."""
    layers = sorted({resolve_layer(v, n_layers) for v in cfg.layers})
    last = resolve_layer(cfg.loss_layer, n_layers)
    if layers[-1] > last:
        raise ValueError(f"adapted layer {layers[-1]} is after the loss layer {last}: it cannot move it")
    return [AdapterSpec(site_name(L, cfg.site), cfg.rank, cfg.scale, cfg.rotate_u, cfg.bias) for L in layers]
