"""dHS per layer: how the pair difference looks, and where it sits among the weights' singular subspaces.

Symbols of docs/method.md, at the last non-padded token of ``blocks.L.hook_resid_post``::

    dHS_ref = hs_ref_cho − hs_ref_rej               (both at c = 0: the base model)
    dHS_pi  = hs_pi_cho(c = +1) − hs_ref_rej         (the steered chosen row against the reference rejected one)
    dHS     = P diag(S_dhs) U_dhsᵀ                    (SVD; U_dhs: d_model × k, the concept's axes in the stream)
    dHSU    = dHS @ U_dhs                            (each pair's coordinates on those axes: pairs × k)

The seed names the d_model-side singular vectors ``U_dhs`` (so that ``dHSU = dHS @ U_dhs`` type-checks); we keep
that name although ``torch.linalg.svd`` calls them ``Vh.T``.

Overlap with the weights: for a subspace with orthonormal basis ``Q`` (d_model × r),
``energy(dHS, Q) = ‖dHS Q‖²_F / ‖dHS‖²_F``, the share of dHS's energy inside span(Q). A random r-dim subspace
holds ``r / d_model`` of any fixed vector's energy in expectation, the baseline every fraction is read against.
The subspaces:

* ``U_w`` of ``blocks.L.mlp.out`` (down_proj): the top-r directions the layer-L MLP *writes* into the stream;
* ``V_w`` of ``blocks.{L+1}.mlp.in`` (up_proj): the top-r directions the next MLP *reads*. It reads
  ``RMSNorm(h)·γ``, not ``h``: with ``fold_norm=True`` we use ``W diag(γ)``, whose right singular vectors are the
  directions of the raw stream it reads (the per-token RMS factor is a scalar, so it does not change directions);
  it reads ``resid_mid`` of block L+1, i.e. ``resid_post L`` plus that block's attention output;
* ``U_w`` of ``blocks.L.attn.o``: the top-r directions layer L's attention writes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterable, Literal, Sequence

import einops
import numpy as np
import scipy.linalg
import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from interp_steer.method.adapter import SVDAdapter, apply_adapters, linear_weight
from interp_steer.method.data import Batch
from interp_steer.method.directions import mean_diff_direction, paired_diff
from interp_steer.method.states import capture, check_hook_names, forward_last
from interp_steer.names import resid_names, site_layer, site_name

# --- capture ----------------------------------------------------------------------------------------------

def capture_layers(bridge: TransformerBridge, batches: Sequence[Batch], layers: Sequence[int],
                   adapters: Iterable[SVDAdapter] = (), c: float = 0.0, progress: bool = False
                   ) -> dict[int, Float[Tensor, "n d_model"]]:
    """Last-token ``resid_post`` of every layer in ``layers``, at coefficient ``c`` (c = 0: the reference)."""
    names = resid_names(layers)
    adapters = list(adapters)
    if c == 0 or not adapters:
        hs = capture(bridge, batches, names, progress=progress)
    else:
        with apply_adapters(bridge, adapters, float(c)):
            hs = capture(bridge, batches, names, progress=progress)
    return {L: hs[n] for L, n in zip(layers, names)}


def capture_both_signs(bridge: TransformerBridge, batches: Sequence[Batch], layers: Sequence[int],
                       adapters: Iterable[SVDAdapter], c: float = 1.0
                       ) -> tuple[dict[int, Float[Tensor, "n d_model"]], dict[int, Float[Tensor, "n d_model"]]]:
    """States at +c and −c from one forward per batch (each batch run twice, a coefficient per row)."""
    names = check_hook_names(bridge, resid_names(layers))
    adapters = list(adapters)
    plus: dict[int, list[Tensor]] = {L: [] for L in layers}
    minus: dict[int, list[Tensor]] = {L: [] for L in layers}
    with torch.inference_mode():
        for b in batches:
            n = len(b)
            two, signs = b.doubled()  # the rows twice: first half at +1, second at −1
            with apply_adapters(bridge, adapters, float(c) * signs):
                store, _ = forward_last(bridge, two, names)
            for L, name in zip(layers, names):
                plus[L].append(store[name][:n].float())
                minus[L].append(store[name][n:].float())
    return {L: torch.cat(v) for L, v in plus.items()}, {L: torch.cat(v) for L, v in minus.items()}


# --- dHS and its spectrum ---------------------------------------------------------------------------------

def dhs_reference(hs: Float[Tensor, "batch d_model"]) -> Float[Tensor, "pairs d_model"]:
    """dHS_ref = hs_cho − hs_rej, rows interleaved (even chosen, odd rejected), both at c = 0."""
    return paired_diff(hs)


def dhs_policy(hs_pi: Float[Tensor, "batch d_model"], hs_ref: Float[Tensor, "batch d_model"]
               ) -> Float[Tensor, "pairs d_model"]:
    """dHS_pi = hs_pi_cho(c) − hs_ref_rej: the steered chosen rows against the reference's rejected rows."""
    if hs_pi.shape != hs_ref.shape or hs_pi.shape[0] % 2:
        raise ValueError(f"need two interleaved captures of one shape, got {tuple(hs_pi.shape)}, "
                         f"{tuple(hs_ref.shape)}")
    return hs_pi[0::2] - hs_ref[1::2]


def dhs_svd(dhs: Float[Tensor, "pairs d_model"], center: bool = False
            ) -> tuple[Float[Tensor, " k"], Float[Tensor, "d_model k"]]:
    """Singular values ``S_dhs`` and d_model-side singular vectors ``U_dhs`` of dHS (centred: PCA)."""
    x = dhs.double()
    if center:
        x = x - x.mean(0)
    _, S, Vh = torch.linalg.svd(x, full_matrices=False)
    return S, Vh.T


def dhs_spectrum(dhs: Float[Tensor, "pairs d_model"], center: bool = False) -> np.ndarray:
    """Normalised spectrum S_dhs² / Σ S_dhs²: the share of dHS energy on each singular axis (sums to 1)."""
    S, _ = dhs_svd(dhs, center)
    energy = S.pow(2)
    return (energy / energy.sum()).numpy()


def dhsu(dhs: Float[Tensor, "pairs d_model"], k: int | None = None) -> Float[Tensor, "pairs k"]:
    """dHSU = dHS @ U_dhs[:, :k]: each pair's coordinates on dHS's own top-k axes (= P diag(S))."""
    _, U = dhs_svd(dhs)
    return (dhs.double() @ U[:, :k]).to(dhs.dtype)


def pca_subspace(dhs: Float[Tensor, "pairs d_model"], k: int) -> Float[Tensor, "d_model k"]:
    """Top-k principal axes of the centred dHS (k = 1: ``directions.pca_diff_direction`` up to sign)."""
    return dhs_svd(dhs, center=True)[1][:, :k].float()


# --- subspaces and overlaps -------------------------------------------------------------------------------

def orthonormal(basis: Float[Tensor, "d_model rank"]) -> Float[Tensor, "d_model rank"]:
    """An orthonormal basis of span(basis) (QR, float64)."""
    return torch.linalg.qr(basis.double()).Q


def energy_fraction(x: Float[Tensor, "*n d_model"], basis: Float[Tensor, "d_model rank"]) -> float:
    """‖x Q‖²_F / ‖x‖²_F for Q an orthonormal basis of span(basis): the share of x's energy in that subspace.

    1 when span(basis) contains every row of x; r/d in expectation for a random r-dim subspace.
    """
    x = einops.rearrange(x.double(), "... d_model -> (...) d_model")
    total = x.pow(2).sum()
    if total == 0:
        return math.nan
    return ((x @ orthonormal(basis)).pow(2).sum() / total).item()


def random_fraction(r: int, d: int) -> float:
    """Expected energy fraction of a fixed vector inside a uniformly random r-dim subspace of R^d."""
    return r / d


def norm_weight(bridge: TransformerBridge, layer: int) -> Tensor:
    """γ of the RMSNorm in front of block ``layer``'s MLP (``blocks.L.ln2``)."""
    module = getattr(bridge.get_submodule(f"blocks.{layer}.ln2"), "original_component", None)
    if module is None or getattr(module, "weight", None) is None:
        raise ValueError(f"blocks.{layer}.ln2 has no weight to fold")
    return module.weight


Side = Literal["left", "right"]


def weight_subspace(bridge: TransformerBridge, site: str, r: int, side: Side, fold_norm: bool = True
                    ) -> Float[Tensor, "d_model rank"]:
    """Top-r singular vectors of a site's weight (HF layout d_out × d_in) on the residual-stream side.

    ``side="left"``: U_w (columns in d_out), for writers (``mlp.out``, ``attn.o``).
    ``side="right"``: V_w (columns in d_in), for readers (``mlp.in``, ``mlp.gate``); with ``fold_norm`` the
    MLP's RMSNorm γ is folded in first (``W diag(γ)``), so V_w is in raw residual-stream coordinates.
    """
    W = linear_weight(bridge, site).detach().double()
    d_model = bridge.cfg.d_model
    if side == "left":
        if W.shape[0] != d_model:
            raise ValueError(f"{site}: output dim {W.shape[0]} is not the residual stream ({d_model})")
        return _top_eigvecs(W @ W.T, r)
    if side == "right":
        if W.shape[1] != d_model:
            raise ValueError(f"{site}: input dim {W.shape[1]} is not the residual stream ({d_model})")
        if fold_norm:
            if ".mlp." not in site:
                raise ValueError(f"fold_norm is only defined for MLP inputs (ln2), not {site}")
            W = W * norm_weight(bridge, site_layer(site)).detach().double()[None, :]
        return _top_eigvecs(W.T @ W, r)
    raise ValueError(f"side must be 'left' or 'right', got {side!r}")


def _top_eigvecs(gram: Float[Tensor, "d_model d_model"], r: int) -> Float[Tensor, "d_model rank"]:
    """Top-r eigenvectors of W Wᵀ (or Wᵀ W): the top-r left (right) singular vectors of W.

    The d_model × d_model Gram matrix in float64 is ~5× cheaper than an SVD of the d_model × d_mlp weight,
    and squaring the spectrum costs nothing that matters for a top-r subspace at this precision.
    """
    _, vecs = torch.linalg.eigh(gram)  # ascending eigenvalues
    return vecs[:, -r:].flip(-1).float()


def principal_angles_deg(a: Float[Tensor, "d_model k"], b: Float[Tensor, "d_model rank"]) -> np.ndarray:
    """Principal angles between span(a) and span(b), in degrees, smallest first (min(k, r) of them).

    0 for a shared direction, 90 for orthogonal ones (scipy.linalg.subspace_angles).
    """
    angles = scipy.linalg.subspace_angles(a.detach().double().numpy(), b.detach().double().numpy())
    return np.sort(np.degrees(angles))


def random_principal_angles_deg(d: int, k: int, r: int, n: int = 32, seed: int = 0) -> np.ndarray:
    """Mean principal angles (degrees, smallest first) between random k- and r-dim subspaces of R^d."""
    g = torch.Generator().manual_seed(seed)
    runs = [principal_angles_deg(torch.randn(d, k, generator=g, dtype=torch.float64),
                                 torch.randn(d, r, generator=g, dtype=torch.float64)) for _ in range(n)]
    return np.mean(runs, axis=0)


# --- the per-layer report ---------------------------------------------------------------------------------

def heldout_cohens_d(hs_train: Float[Tensor, "batch d_model"], hs_test: Float[Tensor, "n d_model"]) -> float:
    """Separation of held-out chosen from rejected states along the training pairs' mean-diff direction.

    Cohen's d: mean((hs_cho − hs_rej)·d) / pooled within-class std of hs·d. A direction fitted and measured on
    the same pairs would look separated in 576 dimensions even without a concept; held-out pairs do not.
    """
    d = mean_diff_direction(hs_train).double()
    p = hs_test.double() @ d
    pooled = ((p[0::2].var() + p[1::2].var()) / 2).sqrt()
    return ((p[0::2] - p[1::2]).mean() / pooled).item()


@dataclass
class DHSReport:
    """Per-layer numbers (lists aligned with ``layers``); ``NaN`` where a quantity does not exist."""

    layers: list[int]
    rank: int                      # r of the weight subspaces
    k: int                         # dHS directions compared with them
    d_model: int
    dhs_norm: list[float]          # mean ‖dHS_ref‖ over pairs
    rel_norm: list[float]          # mean ‖dHS_ref‖ / RMS ‖hs‖ (the stream's norm grows with depth)
    consistency: list[float]       # ‖mean dHS_ref‖ / mean ‖dHS_ref‖: 1 when every pair differs the same way
    cohens_d: list[float]          # held-out separation along the train mean-diff direction (NaN: no held-out)
    spectrum: list[list[float]]    # normalised spectrum of dHS_ref (first n_spectrum values)
    spectrum_pi: list[list[float]]  # same for dHS_pi (empty without adapters)
    pi_norm: list[float]           # mean ‖dHS_pi‖ (NaN without adapters)
    pi_rel_norm: list[float]       # mean ‖dHS_pi‖ / RMS ‖hs_ref‖ of the same rows
    energy_out: list[float]        # energy of dHS_ref in U_w(blocks.L.mlp.out)
    energy_in: list[float]         # … in V_w(blocks.{L+1}.mlp.in), γ folded; NaN at the last layer
    energy_attn_o: list[float]     # … in U_w(blocks.L.attn.o)
    energy_states_out: list[float]  # baseline: energy of the centred states hs − mean(hs) in U_w(mlp.out)
    random: float                  # r / d_model
    angles_out: list[list[float]]  # principal angles (deg) between top-k U_dhs and U_w(mlp.out)
    angles_in: list[list[float]]   # … and V_w(mlp.in of L+1)
    random_angles: list[float]     # the same for random subspaces (mean)

    def to_dict(self) -> dict:
        return asdict(self)


def analyse_dhs(bridge: TransformerBridge, hs_ref: dict[int, Float[Tensor, "batch d_model"]], *,
                hs_test: dict[int, Float[Tensor, "_ d_model"]] | None = None,
                hs_pi: dict[int, Float[Tensor, "n d_model"]] | None = None,
                hs_pi_ref: dict[int, Float[Tensor, "n d_model"]] | None = None,
                rank: int = 32, k: int = 4, fold_norm: bool = True, n_spectrum: int = 16) -> DHSReport:
    """Everything above for each layer of ``hs_ref`` (interleaved reference states, c = 0).

    ``hs_test``: held-out reference states (for Cohen's d). ``hs_pi``/``hs_pi_ref``: steered (c = +1) and
    reference states of the same rows, for dHS_pi.
    """
    layers = sorted(hs_ref)
    n_layers, d_model = bridge.cfg.n_layers, bridge.cfg.d_model
    out = {f: [] for f in ("dhs_norm", "rel_norm", "consistency", "cohens_d", "spectrum", "spectrum_pi", "pi_norm",
                           "pi_rel_norm", "energy_out", "energy_in", "energy_attn_o", "energy_states_out",
                           "angles_out", "angles_in")}
    for L in layers:
        hs = hs_ref[L]
        dhs = dhs_reference(hs)
        norms = dhs.double().norm(dim=-1)
        out["dhs_norm"].append(norms.mean().item())
        out["rel_norm"].append((norms.mean() / hs.double().norm(dim=-1).pow(2).mean().sqrt()).item())
        out["consistency"].append((dhs.double().mean(0).norm() / norms.mean()).item())
        out["cohens_d"].append(heldout_cohens_d(hs, hs_test[L]) if hs_test is not None else math.nan)
        out["spectrum"].append(dhs_spectrum(dhs)[:n_spectrum].tolist())
        if hs_pi is not None and hs_pi_ref is not None:
            dpi = dhs_policy(hs_pi[L], hs_pi_ref[L])
            out["spectrum_pi"].append(dhs_spectrum(dpi)[:n_spectrum].tolist())
            out["pi_norm"].append(dpi.double().norm(dim=-1).mean().item())
            out["pi_rel_norm"].append(out["pi_norm"][-1] / hs_pi_ref[L].double().norm(dim=-1).pow(2).mean().sqrt().item())
        else:
            out["pi_norm"].append(math.nan)
            out["pi_rel_norm"].append(math.nan)
        top = dhs_svd(dhs)[1][:, :k]
        u_out = weight_subspace(bridge, site_name(L, "mlp.out"), rank, "left")
        out["energy_out"].append(energy_fraction(dhs, u_out))
        out["energy_states_out"].append(energy_fraction(hs - hs.mean(0), u_out))
        out["energy_attn_o"].append(energy_fraction(dhs, weight_subspace(bridge, site_name(L, "attn.o"), rank, "left")))
        out["angles_out"].append(principal_angles_deg(top, u_out).tolist())
        if L + 1 < n_layers:
            v_in = weight_subspace(bridge, site_name(L + 1, "mlp.in"), rank, "right", fold_norm)
            out["energy_in"].append(energy_fraction(dhs, v_in))
            out["angles_in"].append(principal_angles_deg(top, v_in).tolist())
        else:
            out["energy_in"].append(math.nan)
            out["angles_in"].append([math.nan] * k)
    return DHSReport(layers=layers, rank=rank, k=k, d_model=d_model, random=random_fraction(rank, d_model),
                     random_angles=random_principal_angles_deg(d_model, k, rank).tolist(), **out)
