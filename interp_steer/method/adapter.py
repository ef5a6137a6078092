"""The SVD rotation adapter: a reversible, coefficient-controlled edit of one linear layer.

For a linear site with weight ``W`` (HF orientation ``d_out × d_in``, ``y = x Wᵀ``), keep the top ``r``
singular triplets ``W = U diag(S) Vᵀ + W_res``. The steered layer is::

    y(c) = x (V R(c)) diag(S_c) Uᵀ + x W_resᵀ,   R(c) = cayley(c·θ) = (I − cθ/2)⁻¹ (I + cθ/2),
    S_c = exp(c·λ) ⊙ S   (or S + c·λ with scale="add")

with θ skew-symmetric, so R(c) is orthogonal, R(0) = I and R(−c) = R(c)ᵀ: c = 0 is the base model and
c = ±1 steer the two ways, exact inverses in rotation. It is applied through the site's TransformerLens
hooks as the low-rank delta ``Δy = ((xV) R(c) diag(S_c) − (xV) diag(S)) Uᵀ``: read ``x`` at
``{site}.hook_in``, add ``Δy`` at ``{site}.hook_out``. With ``rotate_u`` the output basis turns too,
``U → U R_u(c)``. With ``bias`` the layer also writes ``c·b`` (b learnable, odd in c like the rest): a rotation
can only redirect what the layer already writes; ``b`` adds a direction of its own, as a steering vector does.
``bias="free"`` lets b be any output vector; ``bias="span"`` keeps it in the adapter's own output subspace,
``b = U w``, so that everything the adapter writes lies in span(U); ``bias="only"`` keeps θ and λ at 0 (buffers,
not parameters), so the layer writes exactly ``c·b``: a steering vector trained by the adapter's own objective
(the ``learned_vector`` method).

The adapter computes in float32 whatever the model's dtype (U, S, V, θ, λ, the Cayley solve, Δy): the hook
reads ``x`` as float32 and adds ``Δy`` cast to the activation's dtype, so c = 0 (Δy = 0 exactly) leaves a
bfloat16 model bit-identical too. GPT-2-style ``Conv1D`` layers store ``Wᵀ`` (``y = x W + b``);
``linear_weight`` returns the ``d_out × d_in`` view either way.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Iterator, Literal, Mapping, Sequence, no_type_check

import einops
import torch
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.model_bridge import TransformerBridge
from transformers.pytorch_utils import Conv1D

from ..config import Bias, Scale
from ..names import SITES, check_site, hook_in, hook_out, site_layer

COMPUTE_DTYPE = torch.float32  # the adapter's own dtype, whatever the model's


@no_type_check  # validates itself with clearer messages than the test run's runtime type checker
@dataclass(frozen=True)
class AdapterSpec:
    """What one adapter is: site (TransformerLens name of a linear layer), rank, options."""

    site: str
    rank: int = 32
    scale: Scale = "exp"
    rotate_u: bool = False
    bias: Bias = "none"

    def __post_init__(self):
        check_site(self.site)
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank must be an integer >= 1, got {self.rank!r}")
        if self.scale not in ("exp", "add"):
            raise ValueError(f"scale must be 'exp' or 'add', got {self.scale!r}")
        if not isinstance(self.rotate_u, bool):
            raise ValueError(f"rotate_u must be True or False, got {self.rotate_u!r}")
        if self.bias not in ("none", "free", "span", "only"):
            raise ValueError(f"bias must be 'none', 'free', 'span' or 'only', got {self.bias!r}")
        if self.bias == "only" and self.rotate_u:
            raise ValueError("bias='only' writes c·b alone: it has no rotation to turn U with (rotate_u=False)")

    def to_dict(self) -> dict:
        return asdict(self)


def _linear(bridge: TransformerBridge, site: str) -> nn.Module | None:
    """The HF ``nn.Linear`` or ``Conv1D`` behind a site name, if the model has one there."""
    try:
        module = bridge.get_submodule(site)
    except AttributeError:
        return None
    linear = getattr(module, "original_component", None)
    return linear if isinstance(linear, (nn.Linear, Conv1D)) else None


def available_sites(bridge: TransformerBridge) -> list[str]:
    """The sites (of ``names.SITES``) every block of this model has as a linear layer with both hooks.

    Llama, Qwen2, Gemma 3: all seven; GPT-2 (no gated MLP): no ``mlp.gate``.
    """
    hooks = bridge.hook_dict  # built on each access: once here

    def has(layer: int, site: str) -> bool:
        name = f"blocks.{layer}.{site}"
        return _linear(bridge, name) is not None and hook_in(name) in hooks and hook_out(name) in hooks
    return [s for s in SITES if all(has(L, s) for L in range(bridge.cfg.n_layers))]


def check_sites(bridge: TransformerBridge, sites: Iterable[str]) -> None:
    """Raise ``ValueError`` for the first site this model lacks, naming the sites it has."""
    for site in sites:
        check_site(site)
        L = site_layer(site)
        if not 0 <= L < bridge.cfg.n_layers:
            raise ValueError(f"site {site!r} does not exist in this model: it has {bridge.cfg.n_layers} layers "
                             f"(blocks.0 … blocks.{bridge.cfg.n_layers - 1})")
        if _linear(bridge, site) is None or hook_in(site) not in bridge.hook_dict:
            have = available_sites(bridge)
            raise ValueError(f"site {site!r} does not exist in this model "
                             f"({type(bridge.original_model).__name__}); "
                             f"its blocks have the sites {', '.join(have) or 'none'}")


def linear_weight(bridge: TransformerBridge, site: str) -> Float[Tensor, "d_out d_in"]:
    """The weight of the linear layer behind a site as ``d_out × d_in`` (``y = x Wᵀ``): the HF ``nn.Linear``
    weight itself, or a transposed view of a ``Conv1D`` weight (GPT-2 stores ``d_in × d_out``, ``y = x W``).
    Either way an in-place write to the result writes the model's weight."""
    check_sites(bridge, [site])
    linear = _linear(bridge, site)
    return linear.weight.T if isinstance(linear, Conv1D) else linear.weight  # type: ignore[union-attr]


def aligned_triplets(U: Float[Tensor, "d_out k"], d: Float[Tensor, " d"], r: int) -> Tensor:
    """Indices of the ``r`` output singular vectors most aligned with ``d`` (largest ``|u_iᵀ d|``), in
    singular-value order.

    An adapter changes its site's output only inside span(U_r); the top-r triplets by singular value hold about
    as much of a concept direction as a random subspace, the r most aligned about twice as much (docs/results.md).
    """
    if d.shape != (U.shape[0],):
        raise ValueError(f"alignment direction has shape {tuple(d.shape)}; this site writes {U.shape[0]} features")
    if not torch.isfinite(d).all() or d.norm() == 0:
        raise ValueError("alignment direction must be finite and non-zero")
    score = (U.T @ d.to(U.dtype)).abs()
    return score.topk(r).indices.sort().values


def skew(p: Float[Tensor, "rank rank"]) -> Float[Tensor, "rank rank"]:
    """θ = triu(p, 1) − triu(p, 1)ᵀ: a skew-symmetric matrix from a free parameter."""
    upper = torch.triu(p, diagonal=1)
    return upper - upper.transpose(-1, -2)


def cayley(theta: Float[Tensor, "rank rank"], c: Float[Tensor, " n"]) -> Float[Tensor, "n rank rank"]:
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
            raise ValueError(f"U, S, V must have rank {r}; got {tuple(U.shape)}, {tuple(S.shape)}, "
                             f"{tuple(V.shape)}")
        f32 = COMPUTE_DTYPE
        self.register_buffer("U", U.detach().to(f32).clone().contiguous())  # d_out × r
        self.register_buffer("S", S.detach().to(f32).clone().contiguous())  # r
        self.register_buffer("V", V.detach().to(f32).clone().contiguous())  # d_in × r
        # drawn on the CPU, then moved: the same seed gives the same θ, λ on every device
        g = torch.Generator().manual_seed(seed)

        def draw(*shape: int) -> nn.Parameter:
            return nn.Parameter((init_scale * torch.randn(*shape, generator=g, dtype=f32)).to(self.U.device))
        # λ must start non-zero: at λ = 0 and small θ, c = +1 and c = −1 get mirrored gradients and the
        # pair can sit at a saddle (docs/method.md). θ starts small so R(±1) ≈ I.
        self.theta_v = draw(r, r)
        self.lam = draw(r)
        self.theta_u = draw(r, r) if spec.rotate_u else None
        if spec.bias == "only":  # a vector alone: R = I and S_c = S for every c, nothing to learn but b
            del self.theta_v, self.lam
            self.register_buffer("theta_v", torch.zeros(r, r, dtype=f32, device=self.U.device))
            self.register_buffer("lam", torch.zeros(r, dtype=f32, device=self.U.device))
        # b starts at 0: c·b is odd in c, so c = ±1 already pull it the same way (no saddle to break).
        # 'free': b in the layer's output space (d_out); 'span': its coordinates w in U's basis (b = U w)
        size = {"none": 0, "free": U.shape[0], "span": r, "only": U.shape[0]}[spec.bias]
        self.b = nn.Parameter(torch.zeros(size, dtype=f32, device=self.U.device)) if size else None

    @classmethod
    def from_weight(cls, spec: AdapterSpec, W: Float[Tensor, "d_out d_in"], *,
                    align: Float[Tensor, " d"] | None = None, **kw) -> "SVDAdapter":
        """Decompose ``W = U diag(S) Vᵀ + W_res`` in float64 for accuracy, keeping ``spec.rank`` triplets: the
        largest singular values, or with ``align`` the triplets whose output vectors ``u_i`` are most aligned
        with it (largest ``|u_iᵀ d|``; see ``aligned_triplets``). Either way ``W_res`` is the rest of ``W``.
        U, S, V are kept in float32 on ``W``'s device."""
        if spec.rank > min(W.shape):
            raise ValueError(f"rank {spec.rank} exceeds min{tuple(W.shape)} of site {spec.site}")
        # MPS has no float64: decompose on the CPU there
        where = torch.device("cpu") if W.device.type == "mps" else W.device
        U, S, Vh = torch.linalg.svd(W.detach().to(where, torch.float64), full_matrices=False)
        keep = (torch.arange(spec.rank) if align is None else aligned_triplets(U, align.to(where), spec.rank)).to(where)

        def back(t: Tensor) -> Tensor:
            return t.to(W.device, COMPUTE_DTYPE)
        return cls(spec, back(U[:, keep]), back(S[keep]), back(Vh[keep].T), **kw)

    @classmethod
    def from_bridge(cls, bridge: TransformerBridge, spec: AdapterSpec, **kw) -> "SVDAdapter":
        return cls.from_weight(spec, linear_weight(bridge, spec.site), **kw)

    @property
    def site(self) -> str:
        return self.spec.site

    def rotation(self, c: Float[Tensor, " n"], which: Literal["v", "u"] = "v") -> Float[Tensor, "n rank rank"]:
        """R(c) for each coefficient in ``c``."""
        p = self.theta_v if which == "v" else self.theta_u
        if p is None:
            raise ValueError("this adapter has no U rotation (spec.rotate_u=False)")
        return cayley(skew(p), c)

    def singular_values(self, c: Float[Tensor, " n"]) -> Float[Tensor, "n rank"]:
        """S_c = exp(c·λ) ⊙ S, or S + c·λ for scale='add'."""
        c = c.to(self.S.dtype)[:, None]
        if self.spec.scale == "exp":
            return torch.exp(c * self.lam) * self.S
        return self.S + c * self.lam

    def delta(self, x: Float[Tensor, "batch pos d_in"],
              c: Float[Tensor, " batch"]) -> Float[Tensor, "batch pos d_out"]:
        """Δy = ((xV) R(c) diag(S_c) [R_u(c)ᵀ] − (xV) diag(S)) Uᵀ [+ c·b], one c per batch row (b = U w for
        bias='span')."""
        if self.spec.bias == "only":  # θ = λ = 0: the rotation and scaling terms vanish exactly
            return (c.to(x.dtype)[:, None, None] * self.b).expand(*x.shape[:2], -1)
        # one Cayley solve per distinct c (training has two, ±1; evaluation one), not one per row
        cs, row = torch.unique(c, return_inverse=True)
        R, S_c = self.rotation(cs)[row], self.singular_values(cs)[row]  # batch r r, batch r
        z = x @ self.V  # batch pos r
        zr = torch.einsum("bpr,brs->bps", z, R) * S_c[:, None, :]
        if self.theta_u is not None:
            zr = torch.einsum("bps,bts->bpt", zr, self.rotation(cs, "u")[row])  # (U R_u)ᵀ = R_uᵀ Uᵀ
        coef = zr - z * self.S
        if self.spec.bias == "span":  # c·U w: add c·w to the coefficients in U's basis
            coef = coef + c.to(coef.dtype)[:, None, None] * self.b
        out = coef @ self.U.T
        if self.spec.bias == "free":
            out = out + c.to(out.dtype)[:, None, None] * self.b
        return out

    def factors(self, c: float) -> tuple[Float[Tensor, "d_out rank"], Float[Tensor, "rank d_in"]]:
        """ΔW(c) = W(c) − W = B A with B = U (R_u diag(S_c) Rᵀ − diag(S)) and A = Vᵀ: rank ≤ r, so exactly a LoRA."""
        cc = torch.tensor([float(c)], dtype=self.S.dtype, device=self.S.device)
        core = torch.diag(self.singular_values(cc)[0]) @ self.rotation(cc)[0].T
        if self.theta_u is not None:
            core = self.rotation(cc, "u")[0] @ core
        return self.U @ (core - torch.diag(self.S)), self.V.T

    def bias_vector(self) -> Float[Tensor, " d_out"] | None:
        """b in the layer's output space (``U w`` for bias='span'), or None without a bias term."""
        if self.b is None:
            return None
        return self.U @ self.b if self.spec.bias == "span" else self.b

    def bias_delta(self, c: float) -> Float[Tensor, " d_out"] | None:
        """Δbias(c) = c·b, or None without a bias term: what merging adds to the layer's bias."""
        b = self.bias_vector()
        return None if b is None else float(c) * b

    def merge(self, W: Float[Tensor, "d_out d_in"], c: float) -> Float[Tensor, "d_out d_in"]:
        """W(c) = W_res + (U R_u) diag(S_c) (V R)ᵀ = W + U (R_u diag(S_c) Rᵀ − diag(S)) Vᵀ = W + B A (``factors``),
        in float32."""
        B, A = self.factors(c)
        return W.to(self.S.dtype) + B @ A

    def hooks(self, c: float | Tensor) -> list[tuple[str, Callable]]:
        """The ``(hook_name, fn)`` pair that applies this adapter at coefficient(s) ``c``."""
        stash: dict[str, Tensor] = {}
        return [(hook_in(self.site), _read_input(stash)), (hook_out(self.site), _add_delta(self, stash, c))]


def _read_input(stash: dict[str, Tensor]) -> Callable:
    def hook(act: Tensor, hook) -> None:
        # attn.o reads per-head z (batch pos head d_head): the linear layer sees the heads concatenated
        x = einops.rearrange(act, "b p h d -> b p (h d)") if act.ndim == 4 else act
        stash["x"] = x.to(COMPUTE_DTYPE)  # the adapter's math is float32 whatever the model's dtype
    return hook


def _add_delta(adapter: SVDAdapter, stash: dict[str, Tensor], c: float | Tensor) -> Callable:
    def hook(act: Tensor, hook) -> Tensor:
        x = stash.pop("x")
        cc = torch.as_tensor(c, dtype=x.dtype, device=x.device)
        cc = cc.expand(x.shape[0]) if cc.ndim == 0 else cc
        if cc.shape != (x.shape[0],):
            raise ValueError(f"c must be a scalar or have one value per batch row ({x.shape[0]}), got "
                             f"{tuple(cc.shape)}")
        delta = adapter.delta(x, cc)
        if act.ndim == 4:  # attn.q/k/v write per-head outputs
            delta = einops.rearrange(delta, "b p (h d) -> b p h d", h=act.shape[2])
        return act + delta.to(act.dtype)
    return hook


@contextmanager
def apply_adapters(bridge: TransformerBridge, adapters: Iterable[SVDAdapter], c: float | Tensor
                   ) -> Iterator[TransformerBridge]:
    """Apply ``adapters`` at coefficient ``c`` (scalar, or one per batch row) inside the block.

    Every hook is registered or none; on exit, also by exception, exactly these hooks are removed. ``c`` must be
    a finite real number (or a tensor of them): anything else is refused before a hook is registered.
    """
    check_coefficient(c)
    hooks = [h for a in adapters for h in a.hooks(c)]
    missing = [n for n, _ in hooks if n not in bridge.hook_dict]
    if missing:
        raise ValueError(f"adapter hook points missing in this model: {missing}")
    with bridge.hooks(fwd_hooks=hooks):
        yield bridge


def check_coefficient(c: object) -> None:
    """Raise ``ValueError`` unless ``c`` is a finite real number or a floating tensor of them."""
    if isinstance(c, Tensor):
        if not c.is_floating_point() or not bool(torch.isfinite(c).all()):
            raise ValueError(f"coefficient tensor must be floating point and finite, got {c.dtype} "
                             f"{c.tolist()[:4]}")
        return
    if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c):
        raise ValueError(f"coefficient c must be a finite number, got {c!r}")


@contextmanager
def merged_weights(bridge: TransformerBridge, adapters: Iterable[SVDAdapter],
                   c: float) -> Iterator[TransformerBridge]:
    """Bake ``W(c)`` into the model's weights inside the block; the originals come back on exit."""
    adapters = list(adapters)
    for a in adapters:
        if a.b is not None and _linear(bridge, a.site).bias is None:  # type: ignore[union-attr]
            raise ValueError(f"adapter at {a.site} has a bias term (bias={a.spec.bias!r}) but that layer has no "
                             "bias "
                             "to merge it into; apply it through hooks (apply_adapters) or export a LoRA (peft's "
                             "lora_bias holds it)")
    saved = []
    try:
        with torch.no_grad():
            for a in adapters:
                W = linear_weight(bridge, a.site)  # a view for Conv1D: copy_ writes the model's weight
                saved.append((W, W.detach().clone()))
                W.copy_(a.merge(W.detach(), c))  # float32 math, rounded once to the weight's dtype
                db = a.bias_delta(c)
                if db is not None:
                    bias = _linear(bridge, a.site).bias  # type: ignore[union-attr]
                    saved.append((bias, bias.detach().clone()))
                    bias.copy_(bias.detach().float() + db)
        yield bridge
    finally:
        with torch.no_grad():
            for W, orig in saved:
                W.copy_(orig)


def make_adapters(bridge: TransformerBridge, specs: Sequence[AdapterSpec], seed: int = 0, init_scale: float = 1e-2,
                  align: Mapping[str, Tensor] | None = None) -> nn.ModuleList:
    """One adapter per spec (sites must be unique), seeded per site; ``align[site]``, where given, picks that
    site's triplets by alignment with a direction in its output space instead of by singular value."""
    sites = [s.site for s in specs]
    if len(set(sites)) != len(sites):
        raise ValueError(f"duplicate sites: {sites}")
    check_sites(bridge, sites)
    align = dict(align or {})
    unknown = sorted(set(align) - set(sites))
    if unknown:
        raise ValueError(f"alignment directions given for sites without an adapter: {unknown}")
    return nn.ModuleList(
        SVDAdapter.from_bridge(bridge, s, seed=seed + i, init_scale=init_scale, align=align.get(s.site))
        for i, s in enumerate(specs)
    )
