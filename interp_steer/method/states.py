"""Last-token hidden states at TransformerLens hook points.

``hs[name][i] = act_name[i, last[i]]``: only the last non-padded row of each sequence is kept (never a
full-sequence cache), and the forward stops after the deepest block asked for. Works the same for the
reference model (c = 0) and inside ``with apply_adapters(...)`` for a steered one.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge

from .. import progress as command_progress
from ..names import layer_of
from .data import Batch, Packed
from .loss import token_logprobs
from .models import model_device


def check_hook_names(bridge: TransformerBridge, names: Iterable[str]) -> list[str]:
    """Return ``names`` as a list, or raise ``ValueError`` naming the closest valid hook names."""
    names = list(names)
    if not names:
        raise ValueError("no hook names given")
    valid = bridge.hook_dict
    for n in names:
        if not isinstance(n, str) or n not in valid:
            close = difflib.get_close_matches(str(n), list(valid), n=3, cutoff=0.6)
            raise ValueError(
                f"unknown hook name {n!r}; close matches: {close or 'none'}. "
                "Names are TransformerLens hook names, e.g. 'blocks.12.hook_resid_post'."
            )
    return names


def stop_layer(bridge: TransformerBridge, names: Sequence[str]) -> int | None:
    """The ``stop_at_layer`` that still runs every hook in ``names`` (``None``: run to the end)."""
    layers = [layer_of(n) for n in names]
    if any(layer is None for layer in layers):
        return None
    stop = max(layers) + 1  # type: ignore[type-var]
    return None if stop >= bridge.cfg.n_layers else stop


def _take_last(store: dict[str, Tensor], key: str, rows: Tensor, last: Tensor) -> Callable:
    def hook(act: Tensor, hook) -> None:
        store[key] = act[rows, last]
    return hook


def packing(bridge: TransformerBridge, batch: Batch) -> Packed | None:
    """How ``forward_last(..., pack=True)`` runs ``batch``: packed (``data.Packed``) where the pairs share a
    prefix and the model attends to the whole packed row anyway (no sliding window shorter than it), else None."""
    packed = batch.packed
    if packed is None:
        return None
    window = getattr(getattr(getattr(bridge, "original_model", None), "config", None), "sliding_window", None)
    if window is not None and packed.input_ids.shape[1] > window:
        return None
    return packed


def forward_last(bridge: TransformerBridge, batch: Batch, names: Sequence[str], *, logits: bool = False,
                 logprobs: bool = False, pack: bool = False
                 ) -> tuple[dict[str, Float[Tensor, "batch d_model"]], Tensor | None]:
    """One forward: last-token rows at ``names`` (with autograd, if enabled), and the logits (``logits``) or
    the per-token log-probs ``token_logprobs(logits, input_ids)`` (``logprobs``) if asked, in the batch's layout.

    ``pack``: run each pair's shared prefix once (``packing``): the same states and log-probs to float rounding
    for about half the tokens on CAA's pairs, which differ in their last token only. A hook that acts per row
    (a coefficient per row) must then act per pair: ``packing(bridge, batch).pair_values(c)``.

    Names are not re-validated here (hot path): call ``check_hook_names`` once first. The batch is moved to the
    model's device if it is not there (a no-op for batches made there).
    """
    batch = batch.to(model_device(bridge))
    packed = packing(bridge, batch) if pack else None
    store: dict[str, Tensor] = {}
    if packed is None:
        ids, kw = batch.input_ids, dict(attention_mask=batch.attention_mask, position_ids=batch.position_ids)
        rows, last = torch.arange(len(batch), device=ids.device), batch.last
    else:
        ids, kw = packed.input_ids, dict(attention_mask=packed.mask, position_ids=packed.position_ids)
        every = torch.arange(len(batch), device=ids.device)
        rows, last = packed.row[every, batch.last], packed.col[every, batch.last]
    hooks = [(n, _take_last(store, n, rows, last)) for n in names]
    want = logits or logprobs
    stop = None if want else stop_layer(bridge, names)
    out = bridge.run_with_hooks(ids, stop_at_layer=stop, fwd_hooks=hooks, **kw)
    missing = [n for n in names if n not in store]
    if missing:
        raise RuntimeError(f"hooks did not fire: {missing}")
    if not want:
        return store, None
    if packed is None:
        return store, (token_logprobs(out, batch.input_ids) if logprobs else out)
    if logits:
        return store, packed.unpack(out)
    # log-softmax over the packed tokens only, then each row's predicting slot and target token
    lse = torch.logsumexp(out.float(), dim=-1)
    r, c = packed.row[:, :-1], packed.col[:, :-1]
    target = out[r, c, batch.input_ids[:, 1:]].float()
    return store, target - lse[r, c]


def capture(bridge: TransformerBridge, batches: Iterable[Batch], names: Sequence[str], *,
            progress: bool | None = None, desc: str = "capture") -> dict[str, Float[Tensor, "n d_model"]]:
    """Last-token states at each hook name, concatenated over ``batches`` (in row order).

    >>> hs = capture(bridge, pair_batches(pairs, tok), ["blocks.1.hook_resid_post"])  # doctest: +SKIP
    >>> dhs = hs["blocks.1.hook_resid_post"][::2] - hs["blocks.1.hook_resid_post"][1::2]  # doctest: +SKIP
    """
    names = check_hook_names(bridge, names)
    batches = list(batches)
    parts: dict[str, list[Tensor]] = {n: [] for n in names}
    show = len(batches) > 4 if progress is None else progress
    with torch.inference_mode():
        for batch in tqdm(batches, desc=desc, disable=not show, leave=False):
            store, _ = forward_last(bridge, batch, names, pack=True)
            for n in names:
                parts[n].append(store[n].float().cpu())
    return {n: torch.cat(parts[n]) for n in names}


@dataclass
class Reference:
    """The c = 0 pass over a dataset, once: last-token states at ``hook`` and per-token log-probs, per batch,
    and last-token states at any ``extra`` hooks (concatenated; free in the same pass)."""

    hs: list[Float[Tensor, "_batch d_model"]]  # (_: batches differ in size and length)
    logp: list[Float[Tensor, "_batch _pos_1"]]
    extra: dict[str, Float[Tensor, "n d_model"]] = field(default_factory=dict)


def reference_pass(bridge: TransformerBridge, batches: Sequence[Batch], hook: str, progress: bool = False,
                   extra: Sequence[str] = (), states_only: bool = False) -> Reference:
    """What the loss needs from the reference model (c = 0), for every batch, in one pass each.
    ``states_only``: the states alone (``logp`` empty), the forward stopping after the deepest hook."""
    check_hook_names(bridge, [hook, *extra])
    hs, logp, more = [], [], {n: [] for n in extra}
    with torch.inference_mode():
        for b in tqdm(batches, desc="reference", disable=not progress, leave=False):
            h, lp = forward_last(bridge, b, [hook, *extra], logprobs=not states_only, pack=True)
            hs.append(h[hook].clone())
            if lp is not None:
                logp.append(lp.clone())
            for n in extra:
                more[n].append(h[n].clone())
            command_progress.tick("capture")
    return Reference(hs, logp, {n: torch.cat(v) for n, v in more.items()})
