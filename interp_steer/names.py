"""Hook names: the one address of a site (TransformerLens convention), built and parsed here only.

``resid_post(12) == "blocks.12.hook_resid_post"``; a *site* is a linear layer inside a block,
``"blocks.12.mlp.out"``, whose input and output hooks are ``site + ".hook_in"`` / ``".hook_out"``.
"""

from __future__ import annotations

import re
from typing import Iterable

SITES = ("mlp.out", "mlp.in", "mlp.gate", "attn.q", "attn.k", "attn.v", "attn.o")  # linear layers per block
RESID_WRITERS = ("mlp.out", "attn.o")  # sites whose output is added to the residual stream
_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_SITE = re.compile(r"^blocks\.\d+\.(" + "|".join(re.escape(s) for s in SITES) + r")$")


def resid_post(layer: int) -> str:
    """``blocks.{layer}.hook_resid_post``: the residual stream after block ``layer``."""
    return f"blocks.{int(layer)}.hook_resid_post"


def resid_names(layers: Iterable[int]) -> list[str]:
    """``resid_post(L)`` for each layer."""
    return [resid_post(L) for L in layers]


def site_name(layer: int, site: str) -> str:
    """``blocks.{layer}.{site}``, e.g. ``site_name(12, "mlp.out") == "blocks.12.mlp.out"``."""
    name = f"blocks.{int(layer)}.{site}"
    check_site(name)
    return name


def check_site(name: str) -> str:
    """Return ``name`` if it names a linear layer of a block, else raise ``ValueError`` saying what does."""
    if not isinstance(name, str) or not _SITE.match(name):
        raise ValueError(
            f"site {name!r} is not a linear layer name; expected 'blocks.L.X' with X one of {', '.join(SITES)} "
            "(TransformerLens names without .hook_in/.hook_out), e.g. 'blocks.12.mlp.out'")
    return name


def layer_of(name: str) -> int | None:
    """Block index of a hook or site name (``blocks.7.mlp.out.hook_in`` -> 7); ``None`` outside blocks."""
    m = _BLOCK.match(name)
    return int(m.group(1)) if m else None


def site_layer(site: str) -> int:
    """The block index of a site (``blocks.7.mlp.out`` -> 7); raises on a name that is not a site."""
    return int(_BLOCK.match(check_site(site)).group(1))  # type: ignore[union-attr]


def hook_in(site: str) -> str:
    return f"{site}.hook_in"


def hook_out(site: str) -> str:
    return f"{site}.hook_out"
