"""Compute each block once per token: reuse the residual entering block B across every steered pass.

A steer that acts only at blocks >= B (adapters, additive vectors, the frozen direction's read-out) leaves the
residual entering block B exactly what the unsteered model computes for the same tokens. Inside
``reuse_prefix(bridge, B)``, every forward of the bridge whose active hooks all sit at blocks >= B looks the
tokens up: the first pass over them runs whole and keeps the residual entering B (so the reference pass costs
nothing extra); every later pass over the same tokens skips blocks 0..B-1 and starts at B from that residual,
through TransformerLens' own residual re-entry. A pass with a hook below B, a KV cache (generation), or other
tokens (prompting) runs whole, unchanged. Outputs are the full forward's: the blocks from B on see the very same
tensor.
"""

from __future__ import annotations

import hashlib
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_PLAIN_KWARGS = {"attention_mask", "position_ids", "return_type", "stop_at_layer"}
DEFAULT_BUDGET_BYTES = 2 << 30  # residuals kept per context; the oldest are dropped beyond it


@dataclass
class PrefixStats:
    """How the passes inside one ``reuse_prefix`` went: ``reused`` skipped blocks 0..B-1, ``filled`` ran whole
    and stored their residual, ``full`` ran whole because they could not reuse one."""

    reused: int = 0
    filled: int = 0
    full: int = 0
    bytes: int = 0
    _store: dict = field(default_factory=dict, repr=False)


def _hook_blocks(bridge: TransformerBridge) -> dict[str, int]:
    """The block of every hook point (-1 for those before the first block: embeddings; after the last:
    n_layers)."""
    out = {}
    n = bridge.cfg.n_layers
    for name in bridge.hook_dict:
        m = _BLOCK.match(name)
        if m:
            out[name] = int(m.group(1))
        elif name.startswith(("embed", "pos_embed", "hook_embed", "hook_pos_embed", "rotary")):
            out[name] = -1
        else:
            out[name] = n
    return out


def _first_hooked(bridge: TransformerBridge, blocks: dict[str, int], start: int) -> tuple[int, bool]:
    """The lowest block with an active forward hook (n_layers if none), and whether block ``start``'s input
    hook itself has one (a steer that rewrites the residual entering B)."""
    first, at_input = bridge.cfg.n_layers, False
    for name, hp in bridge.hook_dict.items():
        if hp.fwd_hooks:
            first = min(first, blocks[name])
            at_input = at_input or name in (f"blocks.{start}.hook_in", f"blocks.{start}.hook_resid_pre")
    return first, at_input


def _key(ids: Tensor, kwargs: dict) -> bytes:
    h = hashlib.blake2b(digest_size=20)
    for t in (ids, kwargs.get("attention_mask"), kwargs.get("position_ids")):
        if t is None:
            h.update(b"-")
            continue
        t = t.detach()
        h.update(str((tuple(t.shape), t.dtype)).encode())
        h.update(t.cpu().contiguous().numpy().tobytes())
    return h.digest()


def _eligible(input: Any, kwargs: dict, start: int) -> bool:
    if not (isinstance(input, Tensor) and input.ndim == 2 and not input.is_floating_point()):
        return False
    if set(kwargs) - _PLAIN_KWARGS:  # a KV cache, inputs_embeds, start_at_layer: not ours to change
        return False
    stop = kwargs.get("stop_at_layer")
    return stop is None or stop > start


@contextmanager
def reuse_prefix(bridge: TransformerBridge, start: int, budget_bytes: int = DEFAULT_BUDGET_BYTES
                 ) -> Iterator[PrefixStats]:
    """Within the block, passes whose hooks all act at blocks >= ``start`` reuse the residual entering block
    ``start`` computed by the first pass over the same tokens. Yields the counts (``PrefixStats``).

    ``start`` <= 0 (or >= n_layers) changes nothing. Nested use on one bridge is refused.
    """
    stats = PrefixStats()
    n = bridge.cfg.n_layers
    if not 0 < start < n:
        yield stats
        return
    if "forward" in vars(bridge):
        raise RuntimeError("reuse_prefix is already active on this bridge (or its forward is patched)")
    original = bridge.forward
    blocks = _hook_blocks(bridge)
    target = bridge.blocks[start]
    store = stats._store

    def skip(hidden_states=None, *args, **kwargs):
        return hidden_states if hidden_states is not None else kwargs["hidden_states"]

    def grab(act: Tensor, hook) -> None:
        grab.value = act.detach()

    def forward(input, *args, **kwargs):
        if args or not _eligible(input, kwargs, start):
            stats.full += 1
            return original(input, *args, **kwargs)
        first, at_input = _first_hooked(bridge, blocks, start)
        if first < start or at_input:
            stats.full += 1
            return original(input, **kwargs)
        key = _key(input, kwargs)
        residual = store.get(key)
        if residual is None:  # run whole, keeping the residual entering ``start`` on the way
            hp = bridge.hook_dict[f"blocks.{start}.hook_in"]
            grab.value = None
            handle = hp.register_forward_hook(lambda m, i, o: grab(o, hp))
            try:
                out = original(input, **kwargs)
            finally:
                handle.remove()
            if grab.value is not None:
                size = grab.value.numel() * grab.value.element_size()
                while store and stats.bytes + size > budget_bytes:
                    old = store.pop(next(iter(store)))
                    stats.bytes -= old.numel() * old.element_size()
                if size <= budget_bytes:
                    store[key] = grab.value
                    stats.bytes += size
            stats.filled += 1
            return out
        if residual.is_inference() and not torch.is_inference_mode_enabled():
            residual = store[key] = residual.clone()  # stored under inference_mode, now needed by autograd
        # blocks 0..start-1 return their input untouched; block ``start`` swaps in the stored residual
        for b in bridge.blocks[:start]:
            b.__dict__["forward"] = skip  # (the components route setattr to the HF module they wrap)
        target._start_at_layer_idx, target._start_residual = start, residual
        try:
            out = original(input, **kwargs)
        finally:
            target._start_at_layer_idx = target._start_residual = None
            for b in bridge.blocks[:start]:
                b.__dict__.pop("forward", None)
        stats.reused += 1
        return out

    bridge.__dict__["forward"] = forward
    try:
        yield stats
    finally:
        bridge.__dict__.pop("forward", None)
        store.clear()
        stats.bytes = 0


def first_block(names) -> int:
    """The lowest block index among hook or site names (``blocks.15.mlp.out`` -> 15); 0 if there is none."""
    found = [int(m.group(1)) for n in names if (m := _BLOCK.match(n))]
    return min(found) if found else 0

