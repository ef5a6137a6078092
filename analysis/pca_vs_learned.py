"""The PCA subspace of dHS against the subspace the adapter writes into, per layer and over training.

For an adapter on a site that writes into the residual stream (``blocks.L.mlp.out``, ``blocks.L.attn.o``)::

    ΔW(c) = merge(W, c) − W = U (R_u diag(S_c) R(c)ᵀ − diag(S)) Vᵀ      (d_model × d_in, rank ≤ r)
    ΔW(+1) = A diag(σ) Bᵀ     (SVD; A[:, :k] is the adapter's top-k output subspace in the stream)

compared with the top-k PCA axes of the reference dHS at ``blocks.L.hook_resid_post`` (centred; k = 1 is
``pca_diff``): ``|cos|`` of the two top vectors (singular vectors have no sign, so it lies in [0, 1]) and the
principal angles between the k-dim subspaces.

A ceiling: ΔW's columns lie in span(U), the top-r left singular subspace of W (also with ``rotate_u``: U R_u
spans the same space). So no output direction of the adapter can be closer to the PCA axis p than
``‖U Uᵀ p‖ = sqrt(energy(p, U))``; ``ceiling`` reports it next to the cosine. An adapter's bias term ``c·b``
(``bias`` 'free' or 'span') is not part of ΔW and has no ceiling: ``cos_bias = |cos(p, b)|`` (None without one).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Iterable

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor, nn

from interp_steer.method.adapter import SVDAdapter
from interp_steer.names import resid_post, site_layer

from .dhs import dhs_reference, energy_fraction, pca_subspace, principal_angles_deg, random_principal_angles_deg

_WRITERS = (".mlp.out", ".attn.o")


def delta_weight(adapter: SVDAdapter, c: float = 1.0) -> Float[Tensor, "d_out d_in"]:
    """ΔW(c) = merge(W, c) − W, computed as merge(0, c): the same matrix without cancelling two large weights."""
    zeros = torch.zeros(adapter.U.shape[0], adapter.V.shape[0], dtype=adapter.U.dtype, device=adapter.U.device)
    with torch.no_grad():
        return adapter.merge(zeros, c)


def output_subspace(adapter: SVDAdapter, k: int, c: float = 1.0
                    ) -> tuple[Float[Tensor, "d_model k"], Float[Tensor, " k"]]:
    """Top-k left singular vectors of ΔW(c) and their singular values, for a site writing into the stream."""
    if not adapter.site.endswith(_WRITERS):
        raise ValueError(f"{adapter.site} does not write into the residual stream; use an mlp.out or attn.o "
                         "adapter")
    if c == 0:
        raise ValueError("c = 0: ΔW = 0, the adapter writes nothing, so it has no output subspace")
    A, sigma, _ = torch.linalg.svd(delta_weight(adapter, c).double(), full_matrices=False)
    return A[:, :k].float(), sigma[:k].float()


def compare(dhs: Float[Tensor, "pairs d_model"], adapter: SVDAdapter, k: int, c: float = 1.0) -> dict:
    """|cos| of the top PCA axis and ΔW's top output vector, principal angles (deg), the span(U) ceiling, and |cos|
    of the PCA axis and the bias term (None without one, or while it is 0)."""
    p = pca_subspace(dhs, k)
    a, sigma = output_subspace(adapter, k, c)
    b = adapter.bias_vector()
    b = None if b is None else b.detach().double()
    return {
        "cos_top": abs(float(p[:, 0].double() @ a[:, 0].double())),
        "cos_bias": None if b is None or b.norm() == 0 else abs(float(p[:, 0].double() @ b / b.norm())),
        "angles": principal_angles_deg(p, a).tolist(),
        "ceiling": math.sqrt(energy_fraction(p[:, :1].T, adapter.U)),
        "sigma": sigma.tolist(),
    }


@dataclass
class PcaVsLearned:
    """Per adapter layer (lists aligned with ``layers``)."""

    layers: list[int]
    k: int
    cos_top: list[float]           # |cos(pca_1, a_1)| in [0, 1]
    ceiling: list[float]           # max |cos| of pca_1 with any vector of span(U)
    angles: list[list[float]]      # principal angles (deg) between PCA top-k and ΔW top-k
    random_cos: float              # E|cos| of two random unit vectors in d_model, ≈ sqrt(2/(π d))
    random_angles: list[float]     # mean principal angles of random k-dim subspaces
    cos_bias: list[float | None] = field(default_factory=list)  # |cos(pca_1, b)|, None without a bias term

    def to_dict(self) -> dict:
        return asdict(self)


def per_layer(hs_ref: dict[int, Float[Tensor, "batch d_model"]], adapters: Iterable[SVDAdapter], k: int = 4,
              c: float = 1.0) -> PcaVsLearned:
    """``compare`` for every adapter, against the reference states at its own layer."""
    adapters = list(adapters)
    rows = {f: [] for f in ("cos_top", "ceiling", "angles", "cos_bias")}
    layers = []
    for a in adapters:
        L = site_layer(a.site)
        if L not in hs_ref:
            raise ValueError(f"no reference states for layer {L} (adapter {a.site}); capture {resid_post(L)}")
        r = compare(dhs_reference(hs_ref[L]), a, k, c)
        layers.append(L)
        for f in rows:
            rows[f].append(r[f])
    d = adapters[0].U.shape[0]
    return PcaVsLearned(layers, k, random_cos=math.sqrt(2 / (math.pi * d)),
                        random_angles=random_principal_angles_deg(d, k, k).tolist(), **rows)


@dataclass
class SubspaceTracker:
    """A ``train(..., callback=tracker)`` callback: every ``every`` steps, ΔW(+1)'s top-k output subspace per site.

    ``steps[i]`` counts optimiser steps taken (1 after the first); ``record(0, adapters)`` adds the initial state.
    """

    every: int = 4
    k: int = 4
    steps: list[int] = field(default_factory=list)
    bases: dict[str, list[Tensor]] = field(default_factory=dict)

    def __call__(self, step: int, adapters: nn.ModuleList) -> None:
        if (step + 1) % self.every == 0:
            self.record(step + 1, adapters)

    def record(self, n_steps: int, adapters: Iterable[SVDAdapter]) -> None:
        self.steps.append(n_steps)
        for a in adapters:
            self.bases.setdefault(a.site, []).append(output_subspace(a, self.k)[0])


def over_training(tracker: SubspaceTracker, hs_ref: dict[int, Float[Tensor, "batch d_model"]], k: int | None = None
                  ) -> dict:
    """|cos| of the top axes and the mean principal angle per recorded step and site: arrays steps × sites."""
    k = k or tracker.k
    sites = list(tracker.bases)
    layers = [site_layer(s) for s in sites]
    cos = np.full((len(tracker.steps), len(sites)), np.nan)
    angle = np.full_like(cos, np.nan)
    for j, (site, L) in enumerate(zip(sites, layers)):
        p = pca_subspace(dhs_reference(hs_ref[L]), k)
        for i, a in enumerate(tracker.bases[site]):
            cos[i, j] = abs(float(p[:, 0].double() @ a[:, 0].double()))
            angle[i, j] = float(np.mean(principal_angles_deg(p, a[:, :k])))
    return {"steps": list(tracker.steps), "layers": layers, "cos_top": cos.tolist(), "mean_angle": angle.tolist()}
