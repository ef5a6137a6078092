"""The SVD rotation adapter: a reversible, coefficient-controlled edit of one linear layer.

For a linear site with weight ``W`` (HF orientation ``d_out × d_in``, ``y = x Wᵀ``), keep the top ``r``
singular triplets ``W = U diag(S) Vᵀ + W_res``. The steered layer is::

    y(c) = x (V R(c)) diag(S_c) Uᵀ + x W_resᵀ,   R(c) = cayley(c·θ) = (I − cθ/2)⁻¹ (I + cθ/2),
    S_c = exp(c·λ) ⊙ S   (or S + c·λ with scale="add")

with θ skew-symmetric, so R(c) is orthogonal, R(0) = I and R(−c) = R(c)ᵀ: c = 0 is the base model and
c = ±1 steer the two ways, exact inverses in rotation. It is applied through the site's TransformerLens
hooks as the low-rank delta ``Δy = ((xV) R(c) diag(S_c) − (xV) diag(S)) Uᵀ``: read ``x`` at
``{site}.hook_in``, add ``Δy`` at ``{site}.hook_out``. With ``rotate_u`` the output basis turns too,
``U → U R_u(c)``.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Iterator, Literal, Sequence, no_type_check

import einops
import torch
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.model_bridge import TransformerBridge

from .config import Scale
from .names import check_site, hook_in, hook_out


@no_type_check  # validates itself with clearer messages than the test run's runtime type checker
@dataclass(frozen=True)
class AdapterSpec:
    """What one adapter is: site (TransformerLens name of a linear layer), rank, options."""

    site: str
    rank: int = 32
    scale: Scale = "exp"
    rotate_u: bool = False

    def __post_init__(self):
        check_site(self.site)
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if self.scale not in ("exp", "add"):
            raise ValueError(f"scale must be 'exp' or 'add', got {self.scale!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def linear_weight(bridge: TransformerBridge, site: str) -> Float[Tensor, "d_out d_in"]:
    """The weight of the linear layer behind a site, as the HF module holds it."""
    try:
        module = bridge.get_submodule(site)
    except AttributeError:
        raise ValueError(f"site {site!r} does not exist in this model ({bridge.cfg.n_layers} layers)") from None
    linear = getattr(module, "original_component", None)
    if not isinstance(linear, nn.Linear):
        raise ValueError(f"site {site!r} is not a linear layer (found {type(linear).__name__})")
    return linear.weight


def skew(p: Float[Tensor, "rank rank"]) -> Float[Tensor, "rank rank"]:
    """θ = triu(p, 1) − triu(p, 1)ᵀ: a skew-symmetric matrix from a free parameter."""
    upper = torch.triu(p, diagonal=1)
    return upper - upper.transpose(-1, -2)


def cayley(theta: Float[Tensor, "rank rank"], c: Float[Tensor, "n"]) -> Float[Tensor, "n rank rank"]:
    """R(c) = (I − cθ/2)⁻¹ (I + cθ/2), one rotation per coefficient; orthogonal for skew θ."""
    eye = torch.eye(theta.shape[-1], dtype=theta.dtype, device=theta.device)
    a = c.to(theta.dtype)[:, None, None] * theta / 2
    return torch.linalg.solve(eye - a, eye + a)


class SVDAdapter(nn.Module):
    """One site's adapter: frozen ``U, S, V`` (top-r SVD of the base weight) and learnable ``θ, λ``.

    >>> a = SVDAdapter.from_bridge(bridge, AdapterSpec("blocks.0.mlp.out", rank=4))  # doctest: +SKIP
    >>> with apply_adapters(bridge, [a], c=1.0): logits = bridge(ids)  # doctest: +SKIP
    """

    def __init__(self, spec: AdapterSpec, U: Tensor, S: Tensor, V: Tensor, *, init_scale: float = 1e-2,
                 seed: int = 0):
        super().__init__()
        self.spec = spec
        r = spec.rank
        if U.shape[1] != r or V.shape[1] != r or S.shape != (r,):
            raise ValueError(f"U, S, V must have rank {r}; got {tuple(U.shape)}, {tuple(S.shape)}, {tuple(V.shape)}")
        self.register_buffer("U", U.detach().clone().contiguous())  # d_out × r
        self.register_buffer("S", S.detach().clone().contiguous())  # r
        self.register_buffer("V", V.detach().clone().contiguous())  # d_in × r
        g = torch.Generator().manual_seed(seed)
        # λ must start non-zero: at λ = 0 and small θ, c = +1 and c = −1 get mirrored gradients and the
        # pair can sit at a saddle (seed-guide.md). θ starts small so R(±1) ≈ I.
        self.theta_v = nn.Parameter(init_scale * torch.randn(r, r, generator=g, dtype=U.dtype))
        self.lam = nn.Parameter(init_scale * torch.randn(r, generator=g, dtype=U.dtype))
        self.theta_u = nn.Parameter(init_scale * torch.randn(r, r, generator=g, dtype=U.dtype)) if spec.rotate_u else None

    @classmethod
    def from_weight(cls, spec: AdapterSpec, W: Float[Tensor, "d_out d_in"], **kw) -> "SVDAdapter":
        """Decompose ``W = U diag(S) Vᵀ + W_res`` (top ``spec.rank``) in float64 for accuracy."""
        if spec.rank > min(W.shape):
            raise ValueError(f"rank {spec.rank} exceeds min{tuple(W.shape)} of site {spec.site}")
        U, S, Vh = torch.linalg.svd(W.detach().double(), full_matrices=False)
        r = spec.rank
        return cls(spec, U[:, :r].to(W.dtype), S[:r].to(W.dtype), Vh[:r].T.to(W.dtype), **kw)

    @classmethod
    def from_bridge(cls, bridge: TransformerBridge, spec: AdapterSpec, **kw) -> "SVDAdapter":
        return cls.from_weight(spec, linear_weight(bridge, spec.site), **kw)

    @property
    def site(self) -> str:
        return self.spec.site

    def rotation(self, c: Float[Tensor, "n"], which: Literal["v", "u"] = "v") -> Float[Tensor, "n rank rank"]:
        """R(c) for each coefficient in ``c``."""
        p = self.theta_v if which == "v" else self.theta_u
        if p is None:
            raise ValueError("this adapter has no U rotation (spec.rotate_u=False)")
        return cayley(skew(p), c)

    def singular_values(self, c: Float[Tensor, "n"]) -> Float[Tensor, "n rank"]:
        """S_c = exp(c·λ) ⊙ S, or S + c·λ for scale='add'."""
        c = c.to(self.S.dtype)[:, None]
        if self.spec.scale == "exp":
            return torch.exp(c * self.lam) * self.S
        return self.S + c * self.lam

    def delta(self, x: Float[Tensor, "batch pos d_in"], c: Float[Tensor, "batch"]) -> Float[Tensor, "batch pos d_out"]:
        """Δy = ((xV) R(c) diag(S_c) [R_u(c)ᵀ] − (xV) diag(S)) Uᵀ, one c per batch row."""
        # one Cayley solve per distinct c (training has two, ±1; evaluation one), not one per row
        cs, row = torch.unique(c, return_inverse=True)
        R, S_c = self.rotation(cs)[row], self.singular_values(cs)[row]  # batch r r, batch r
        z = x @ self.V  # batch pos r
        zr = torch.einsum("bpr,brs->bps", z, R) * S_c[:, None, :]
        if self.theta_u is not None:
            zr = torch.einsum("bps,bts->bpt", zr, self.rotation(cs, "u")[row])  # (U R_u)ᵀ = R_uᵀ Uᵀ
        return (zr - z * self.S) @ self.U.T

    def factors(self, c: float) -> tuple[Float[Tensor, "d_out rank"], Float[Tensor, "rank d_in"]]:
        """ΔW(c) = W(c) − W = B A with B = U (R_u diag(S_c) Rᵀ − diag(S)) and A = Vᵀ: rank ≤ r, so exactly a LoRA."""
        cc = torch.tensor([float(c)], dtype=self.S.dtype, device=self.S.device)
        core = torch.diag(self.singular_values(cc)[0]) @ self.rotation(cc)[0].T
        if self.theta_u is not None:
            core = self.rotation(cc, "u")[0] @ core
        return self.U @ (core - torch.diag(self.S)), self.V.T

    def merge(self, W: Float[Tensor, "d_out d_in"], c: float) -> Float[Tensor, "d_out d_in"]:
        """W(c) = W_res + (U R_u) diag(S_c) (V R)ᵀ = W + U (R_u diag(S_c) Rᵀ − diag(S)) Vᵀ = W + B A (``factors``)."""
        B, A = self.factors(c)
        return W + B @ A

    def hooks(self, c: float | Tensor) -> list[tuple[str, Callable]]:
        """The ``(hook_name, fn)`` pair that applies this adapter at coefficient(s) ``c``."""
        stash: dict[str, Tensor] = {}
        return [(hook_in(self.site), _read_input(stash)), (hook_out(self.site), _add_delta(self, stash, c))]


def _read_input(stash: dict[str, Tensor]) -> Callable:
    def hook(act: Tensor, hook) -> None:
        # attn.o reads per-head z (batch pos head d_head): the linear layer sees the heads concatenated
        stash["x"] = einops.rearrange(act, "b p h d -> b p (h d)") if act.ndim == 4 else act
    return hook


def _add_delta(adapter: SVDAdapter, stash: dict[str, Tensor], c: float | Tensor) -> Callable:
    def hook(act: Tensor, hook) -> Tensor:
        x = stash.pop("x")
        cc = torch.as_tensor(c, dtype=x.dtype, device=x.device)
        cc = cc.expand(x.shape[0]) if cc.ndim == 0 else cc
        if cc.shape != (x.shape[0],):
            raise ValueError(f"c must be a scalar or have one value per batch row ({x.shape[0]}), got {tuple(cc.shape)}")
        delta = adapter.delta(x, cc)
        if act.ndim == 4:  # attn.q/k/v write per-head outputs
            delta = einops.rearrange(delta, "b p (h d) -> b p h d", h=act.shape[2])
        return act + delta
    return hook


@contextmanager
def apply_adapters(bridge: TransformerBridge, adapters: Iterable[SVDAdapter], c: float | Tensor
                   ) -> Iterator[TransformerBridge]:
    """Apply ``adapters`` at coefficient ``c`` (scalar, or one per batch row) inside the block.

    Every hook is registered or none; on exit, also by exception, exactly these hooks are removed.
    """
    hooks = [h for a in adapters for h in a.hooks(c)]
    missing = [n for n, _ in hooks if n not in bridge.hook_dict]
    if missing:
        raise ValueError(f"adapter hook points missing in this model: {missing}")
    with bridge.hooks(fwd_hooks=hooks):
        yield bridge


@contextmanager
def merged_weights(bridge: TransformerBridge, adapters: Iterable[SVDAdapter], c: float) -> Iterator[TransformerBridge]:
    """Bake ``W(c)`` into the model's weights inside the block; the originals come back on exit."""
    saved = []
    try:
        with torch.no_grad():
            for a in adapters:
                W = linear_weight(bridge, a.site)
                saved.append((W, W.detach().clone()))
                W.copy_(a.merge(W.detach(), c))
        yield bridge
    finally:
        with torch.no_grad():
            for W, orig in saved:
                W.copy_(orig)


def make_adapters(bridge: TransformerBridge, specs: Sequence[AdapterSpec], seed: int = 0, init_scale: float = 1e-2
                  ) -> nn.ModuleList:
    """One adapter per spec (sites must be unique), seeded per site."""
    sites = [s.site for s in specs]
    if len(set(sites)) != len(sites):
        raise ValueError(f"duplicate sites: {sites}")
    return nn.ModuleList(
        SVDAdapter.from_bridge(bridge, s, seed=seed + i, init_scale=init_scale) for i, s in enumerate(specs)
    )
