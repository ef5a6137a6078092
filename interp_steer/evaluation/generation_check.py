"""A run-time guard: cached generation must agree with an uncached forward.

TransformerLens re-implements attention around each HF attention module to expose its hooks, and reads the KV
cache from the keyword HF passes it. When a transformers release renames that keyword (5.24 passes ``cache=``
where TransformerLens 4.3 reads ``past_key_values=``), the bridge silently stops filling the cache: every decode
step attends to itself alone and greedy replies turn into ``'The-----------'``, while every uncached forward is
still exact. Nothing raises. So the first generation on each bridge is checked once against one uncached
forward over what it produced, and a mismatch stops the run with the versions and the fix.
"""

from __future__ import annotations

import importlib.metadata
import warnings
import weakref

import torch
from jaxtyping import Int
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

# Versions the test suite has run, [low, high) per distribution: the lower bounds of pyproject.toml (`make
# test-lowest`) up to constraints.txt's pins (`make test`). pyproject caps transformers at the known break, 5.24.
TESTED = {"transformers": ("5.9", "5.24"), "transformer-lens": ("4.0", "4.4")}
CHECK_TOKENS = 4  # generated tokens per row checked against the uncached forward
CHECK_ROWS = 4
_checked: weakref.WeakSet = weakref.WeakSet()
_warned: set[str] = set()


def _key(version: str) -> tuple[int, ...]:
    parts = []
    for p in version.split(".")[:3]:
        digits = "".join(ch for ch in p if ch.isdigit()) or "0"  # '0rc1' -> 0
        parts.append(int(digits))
    return tuple(parts)


def untested_versions() -> list[str]:
    """``'transformers 5.24.0 (tested: >=5.23,<5.24)'`` for each installed version outside ``TESTED``."""
    out = []
    for dist, (low, high) in TESTED.items():
        have = importlib.metadata.version(dist)
        if not _key(low) <= _key(have) < _key(high):
            out.append(f"{dist} {have} (tested: >={low},<{high})")
    return out


def warn_untested_once() -> None:
    """One warning per process naming the installed versions the test suite has not run."""
    bad = [v for v in untested_versions() if v not in _warned]
    if bad:
        _warned.update(bad)
        warnings.warn(f"interp-steer has not been tested with {', '.join(bad)}; generation is checked against an "
                      "uncached forward on first use, but other paths may be wrong. Install the tested versions "
                      "with `pip install -e .` in a fresh environment (see CONTRIBUTING.md).", stacklevel=3)


@torch.no_grad()
def check_cached_generation(bridge: TransformerBridge, input_ids: Int[Tensor, "batch pos"],
                            attention_mask: Int[Tensor, "batch pos"], generated: Int[Tensor, "batch new"],
                            eos_token_id: int | None, tol: float = 1e-3) -> None:
    """Raise ``RuntimeError`` if the first greedy tokens a cached ``generate`` gave are not what one uncached
    forward over the prompt and those tokens predicts (each must be the argmax, to ``tol`` in logit).

    ``input_ids`` are left-padded prompts; ``generated`` the tokens after them. Rows are checked up to their
    first ``eos_token_id``. Cheap: one forward over at most ``CHECK_ROWS`` rows.
    """
    rows = slice(0, min(CHECK_ROWS, len(input_ids)))
    new = generated[rows, :CHECK_TOKENS]
    if new.shape[1] == 0:
        return
    ids = torch.cat([input_ids[rows], new], 1)
    mask = torch.cat([attention_mask[rows], torch.ones_like(new)], 1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = bridge(ids, attention_mask=mask, position_ids=positions).float()
    start = input_ids.shape[1] - 1
    pred = logits[:, start: start + new.shape[1]]  # the logits that chose each new token
    chosen = pred.gather(-1, new[..., None])[..., 0]
    gap = pred.max(-1).values - chosen  # 0 where the new token is the uncached argmax
    valid = torch.ones_like(new, dtype=torch.bool)
    if eos_token_id is not None:
        stopped = (new == eos_token_id).cumsum(-1) - (new == eos_token_id).long()  # after the first eos
        valid = stopped == 0
    if (gap[valid] > tol).any():
        row, col = [int(i) for i in (gap * valid > tol).nonzero()[0]]
        versions = {d: importlib.metadata.version(d) for d in TESTED}
        raise RuntimeError(
            "cached generation disagrees with an uncached forward of the same tokens (row "
            f"{row}, generated token {col}: its logit is {gap[row, col].item():.3g} below the argmax). The KV "
            "cache "
            f"is not being filled on this combination: transformers {versions['transformers']}, transformer-lens "
            f"{versions['transformer-lens']}; every generated text would be wrong. Install the tested versions "
            f"({', '.join(f'{d}>={lo},<{hi}' for d, (lo, hi) in TESTED.items())}): `pip install -e .` in a fresh "
            "environment.")


def is_checked(bridge: TransformerBridge) -> bool:
    return bridge in _checked


def check_once(bridge: TransformerBridge, input_ids: Tensor, attention_mask: Tensor, generated: Tensor,
               eos_token_id: int | None) -> None:
    """``check_cached_generation`` on the first generation of each bridge in this process, then never again."""
    if bridge in _checked:
        return
    warn_untested_once()
    check_cached_generation(bridge, input_ids, attention_mask, generated, eos_token_id)
    _checked.add(bridge)
