"""One command per figure: ``python -m analysis.figures NAME [--out figures] [--pairs N] [--steps N]``.

NAME is one of ``loss_geometry`` (a diagram, no model), ``dhs_spectra``, ``layer_map``, ``pca_vs_learned`` (train a
small adapter on the default model, then analyse it), or ``all``. Every figure is written as PNG and SVG with
``interp_steer.comparison.plots``; the numbers behind the model figures go to ``--summary`` (default
``runs/analysis/summary.json``) before they are drawn, and each model figure records that file's SHA-256. The
dose-response figures are the demo's and the study's own (``runs/demo/CONCEPT/figures``, ``STUDY/figures``).

The defaults (96 pairs, 16 steps, loss at layer 22, ``mlp.out`` adapters on layers 8–20, every 2nd) keep ``all``
at a few minutes on 2 CPU cores. They are a quick look, not the trained adapter of ``make demo``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from interp_steer.comparison import plots
from interp_steer.comparison.plots import COLORS, figure, plt, save
from interp_steer.storage.io import write_json_atomic

from .study import Study, StudyConfig

FIGURES = ("loss_geometry", "dhs_spectra", "layer_map", "pca_vs_learned")
DEFAULT_SUMMARY = Path("runs/analysis/summary.json")


def styled(fn: Callable) -> Callable:
    """Draw inside the project's rc style (``plots.figure`` applies it only while creating the axes)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with plt.rc_context(plots.STYLE):
            return fn(*args, **kwargs)
    return wrapper


# --- the diagram ------------------------------------------------------------------------------------------

def _arrow(ax, start, end, color, lw=1.0, style="-|>", ls="-", z=3):
    from matplotlib.patches import FancyArrowPatch

    ax.add_patch(FancyArrowPatch(start, end, arrowstyle=style, mutation_scale=7, color=color, lw=lw,
                                 linestyle=ls, zorder=z, shrinkA=0, shrinkB=0))


def _ellipse_extremes(centre, a, b, angle_deg):
    """Points of the ellipse with the smallest and largest x (where its boundary's normal is ±x)."""
    t = np.linspace(0, 2 * np.pi, 2001)
    phi = np.radians(angle_deg)
    x = centre[0] + a * np.cos(t) * np.cos(phi) - b * np.sin(t) * np.sin(phi)
    y = centre[1] + a * np.cos(t) * np.sin(phi) + b * np.sin(t) * np.cos(phi)
    return (x[x.argmin()], y[x.argmin()]), (x[x.argmax()], y[x.argmax()])


@styled
def loss_geometry_figure(out: Path) -> list[Path]:
    """The objective terms in one 2-D plane of activation space: d_steer across, everything else up."""
    from matplotlib.colors import to_rgba
    from matplotlib.patches import Ellipse

    cho, rej = COLORS["adapter"], COLORS["pca_diff"]
    grey = "#555555"
    fig, (a1, a2) = figure(2, 1, height=5.0)
    for ax in (a1, a2):
        ax.grid(False)
        ax.axhline(0, color="#bbbbbb", lw=0.5, zorder=0)
        ax.set_xlabel("projection on d_steer (arbitrary units)")
        ax.set_ylabel("orthogonal direction (a.u.)")
        ax.set_aspect("equal")

    # (a) separation: a common shift the wrong way plus a larger contrast still scores as progress
    r0, c0 = np.array([-0.6, 0.2]), np.array([0.6, 0.45])
    shift = np.array([-1.3, -0.9])
    r1, c1 = r0 + shift + np.array([-0.5, 0.0]), c0 + shift + np.array([0.5, 0.1])
    _arrow(a1, (-3.1, -1.6), (-1.9, -1.6), "k", lw=1.2)
    a1.text(-2.5, -1.45, "d_steer (frozen)", ha="center", fontsize=6)
    for p, q, col in ((r0, r1, rej), (c0, c1, cho)):
        _arrow(a1, p, q, col, lw=0.8, ls="--")
    a1.plot(*r0, "o", color=rej, mfc="white", ms=5, zorder=4)
    a1.plot(*c0, "o", color=cho, mfc="white", ms=5, zorder=4)
    a1.plot(*r1, "o", color=rej, ms=5, zorder=4)
    a1.plot(*c1, "o", color=cho, ms=5, zorder=4)
    a1.annotate("", c0, r0, arrowprops=dict(arrowstyle="-|>", color=grey, lw=0.7))
    a1.annotate("", c1, r1, arrowprops=dict(arrowstyle="-|>", color=grey, lw=0.7))
    a1.text(*(r0 + [0.0, 0.25]), "h_ref_rej", color=rej, fontsize=6, ha="center")
    a1.text(*(c0 + [0.05, 0.25]), "h_ref_cho", color=cho, fontsize=6, ha="center")
    a1.text(*(r1 + [0.0, -0.35]), "h_pi_rej(+1)", color=rej, fontsize=6, ha="center")
    a1.text(*(c1 + [0.2, -0.35]), "h_pi_cho(+1)", color=cho, fontsize=6, ha="center")
    sep0, sep1 = (c0 - r0)[0], (c1 - r1)[0]
    mean_shift = ((r1 - r0)[0] + (c1 - c0)[0]) / 2
    a1.text(0.98, 0.97, f"separation c·(h_cho − h_rej)·d: {sep0:.1f} → {sep1:.1f}  (rewarded)\n"
            f"mean shift along d: {mean_shift:+.1f}  (invisible to it)",
            transform=a1.transAxes, ha="right", va="top", fontsize=6)
    a1.set_title("(a) separation objective", loc="left")
    a1.set_xlim(-3.3, 1.9)
    a1.set_ylim(-2.0, 1.4)

    # (b) shift, each row against its own reference, inside its per-token coherence region
    regions = {"rej": (np.array([-0.8, -0.2]), 1.0, 0.55, 25.0), "cho": (np.array([0.8, 0.6]), 1.0, 0.5, -20.0)}
    for key, (centre, a, b, ang) in regions.items():
        col = rej if key == "rej" else cho
        a2.add_patch(Ellipse(centre, 2 * a, 2 * b, angle=ang, fill=True, fc=to_rgba(col, 0.08), ec=col, lw=0.7,
                             ls="--", zorder=1))
        lo, hi = _ellipse_extremes(centre, a, b, ang)
        _arrow(a2, centre, hi, col, lw=1.0)
        _arrow(a2, centre, lo, col, lw=1.0, ls=":")
        a2.plot(*centre, "o", color=col, mfc="white", ms=5, zorder=4)
        a2.plot(*hi, "o", color=col, ms=4, zorder=4)
        a2.plot(*lo, "s", color=col, ms=3.5, zorder=4)
        a2.text(centre[0] + 0.05, centre[1] - 0.27, f"h_ref_{key}", color=col, fontsize=6, ha="center")
        a2.text(hi[0] + 0.08, hi[1], "c = +1", color=col, fontsize=5.5, va="center")
        a2.text(lo[0] - 0.08, lo[1], "c = −1", color=col, fontsize=5.5, va="center", ha="right")
    a2.text(0.02, 0.03, "dashed: coherence region around the c = 0 reference\n"
            "(every token within the margin: relu(logp_ref − logp_pi − m) = 0)",
            transform=a2.transAxes, fontsize=5.5, va="bottom", color=grey)
    a2.text(0.98, 0.97, "shift c·(h_pi(c) − h_ref)·d, every row\n"
            "hinge: s(−1) < s(0) = 0 < s(+1)",
            transform=a2.transAxes, ha="right", va="top", fontsize=6)
    _arrow(a2, (-2.4, 1.25), (-1.4, 1.25), "k", lw=1.2)
    a2.text(-1.9, 1.38, "d_steer", ha="center", fontsize=6)
    a2.set_title("(b) shift objective + coherence", loc="left")
    a2.set_xlim(-2.6, 2.4)
    a2.set_ylim(-1.3, 1.7)
    return save(fig, out, "loss_geometry")


# --- the model figures: each draws from the summary dict (``Study.summary()`` or ``--from-summary``) -------

def _depth_colors(layers, n_layers):
    import matplotlib

    cmap = matplotlib.colormaps["viridis"]
    return [cmap(L / max(1, n_layers - 1)) for L in layers]


def _mark_layers(ax, cfg: dict, horizontal: bool = False) -> None:
    """Grey lines at the adapter layers, a dotted line at the loss layer."""
    line = ax.axhline if horizontal else ax.axvline
    for L in cfg["layers"]:
        line(L, color="#d0d0d0", lw=0.6, zorder=0)
    line(cfg["loss_layer"], color="k", lw=0.7, ls=":", zorder=0)


def _objective(data: dict) -> str:
    """The quick adapter's training objective: ``train_config.loss.objective`` (a summary written before the loss
    settings moved into ``LossConfig`` kept it at ``train_config.objective``)."""
    tc = data.get("train_config", {})
    return str(tc.get("loss", {}).get("objective", tc.get("objective", "?")))


def _twin_legend(ax, twin, **kw) -> None:
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = twin.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, frameon=False, fontsize=5.5, **kw)


@styled
def dhs_spectra_figure(data: dict, out: Path, sources: Sequence[Path] = ()) -> list[Path]:
    """(a) normalised dHS spectra, (b) size of dHS_ref and dHS_pi per layer, (c) separability per layer."""
    rep, cfg = data["dhs_report"], data["config"]
    fig, (a1, a2, a3) = figure(3, 1, height=5.6)
    shown = sorted(set(rep["layers"][::4]) | {cfg["loss_layer"]})
    for L, col in zip(shown, _depth_colors(shown, data["n_layers"])):
        sp = rep["spectrum"][rep["layers"].index(L)]
        a1.semilogy(range(1, len(sp) + 1), sp, "o-", color=col, ms=2, lw=0.8, label=f"L{L}")
    a1.set_xlabel("singular axis of dHS_ref (index)")
    a1.set_ylabel("S² / ΣS² (share)")
    a1.set_title("(a) dHS spectrum at c = 0", loc="left")
    a1.legend(ncol=4, frameon=False, fontsize=5.5)

    x = rep["layers"]
    a2.plot(x, rep["rel_norm"], "o-", color=COLORS["pca_diff"], label="dHS_ref (train pairs)")
    if not all(math.isnan(v) for v in rep["pi_rel_norm"]):
        a2.plot(x, rep["pi_rel_norm"], "s--", color=COLORS["adapter"], label="dHS_pi, c = +1 (held out)")
    _mark_layers(a2, cfg)
    a2.set_xlabel("layer (resid_post; grey: adapters, dotted: loss)")
    a2.set_ylabel("mean ‖dHS‖ / RMS ‖hs‖")
    a2.set_title(f"(b) size of the pair difference ({_objective(data)} adapter)", loc="left")
    a2.legend(frameon=False, loc="upper left")

    a3.plot(x, rep["cohens_d"], "o-", color=COLORS["mean_diff"], label="Cohen's d, held out (left axis)")
    _mark_layers(a3, cfg)
    a3.set_xlabel("layer (resid_post)")
    a3.set_ylabel("Cohen's d")
    a3b = a3.twinx()
    a3b.plot(x, [sp[0] for sp in rep["spectrum"]], "^:", color=COLORS["dhs_svd"], label="top-axis share S₁²/ΣS²")
    a3b.plot(x, rep["consistency"], "v:", color=COLORS["random"], label="‖mean dHS‖ / mean ‖dHS‖")
    a3b.set_ylabel("fraction")
    a3b.set_ylim(0, 1.05)
    a3b.grid(False)
    a3b.spines["right"].set_visible(True)
    a3.set_title("(c) separability and one-dimensionality", loc="left")
    _twin_legend(a3, a3b, loc="upper left")
    return save(fig, out, "dhs_spectra", sources)


def _heatmap(ax, columns: dict, layers, cmap, vmin, vmax, label):
    import matplotlib

    arr = np.ma.masked_invalid(np.array(list(columns.values()), dtype=float).T)
    cm = matplotlib.colormaps[cmap].with_extremes(bad="#e6e6e6")  # undefined (NaN): light grey
    im = ax.imshow(arr, aspect="auto", cmap=cm, vmin=vmin, vmax=vmax, origin="lower", interpolation="nearest",
                   extent=(-0.5, len(columns) - 0.5, layers[0] - 0.5, layers[-1] + 0.5))
    ax.set_xticks(range(len(columns)))
    ax.set_xticklabels(list(columns), rotation=90, fontsize=6)
    ax.grid(False)
    bar = ax.figure.colorbar(im, ax=ax, location="top", fraction=0.05, pad=0.02, aspect=12)
    bar.set_label(label, fontsize=6.5)
    bar.ax.tick_params(labelsize=5.5)


@styled
def layer_map_figure(data: dict, out: Path, sources: Sequence[Path] = ()) -> list[Path]:
    """(a) cosines of gradient, learned, PCA and mean-diff directions per layer; (b) dHS energy in weight subspaces."""
    lm, rep, cfg = data["layer_map"], data["dhs_report"], data["config"]
    fig, (a1, a2) = figure(1, 2, height=4.6, gridspec_kw={"width_ratios": [7, 5]})
    _heatmap(a1, {"g·pca": lm["grad_pca"], "g·mean": lm["grad_mean"], "g·e": lm["grad_learned"],
                  "noref·pca": lm["noref_pca"], "e·pca": lm["learned_pca"], "e·mean": lm["learned_mean"],
                  "pca·mean": lm["pca_mean"]},
             lm["layers"], "RdBu_r", -1, 1, "(a) signed cosine\n(g: loss gradient, e: learned)")
    a1.set_ylabel("layer (resid_post; dotted: loss layer)")
    en = {"U_w mlp.out": rep["energy_out"], "V_w mlp.in L+1": rep["energy_in"], "U_w attn.o": rep["energy_attn_o"],
          "states, U_w mlp.out": rep["energy_states_out"], "random r/d": [rep["random"]] * len(rep["layers"])}
    top = max(v for col in en.values() for v in col if not math.isnan(v))
    _heatmap(a2, en, rep["layers"], "magma", 0, top, "(b) share of dHS energy\nin top-r subspaces, r = "
                                                     f"{rep['rank']}")
    for ax in (a1, a2):
        ax.axhline(cfg["loss_layer"], color="k", lw=0.7, ls=":")
    return save(fig, out, "layer_map", sources)


@styled
def pca_vs_learned_figure(data: dict, out: Path, sources: Sequence[Path] = ()) -> list[Path]:
    """(a) PCA axis vs the adapter's top output direction per adapter layer; (b) the same over training."""
    per, tr = data["pca_vs_learned"]["per_layer"], data["pca_vs_learned"]["over_training"]
    fig, (a1, a2) = figure(2, 1, height=4.6)
    x = per["layers"]
    a1.plot(x, per["cos_top"], "o-", color=COLORS["adapter"], label="|cos(pca₁, ΔW top output)|")
    a1.plot(x, per["ceiling"], "^--", color=COLORS["pca_diff"], label="ceiling: ‖P_U pca₁‖, span(U), r")
    a1.axhline(per["random_cos"], color=COLORS["random"], lw=0.8, ls=":", label="random vectors, E|cos|")
    a1b = a1.twinx()
    a1b.plot(x, [float(np.mean(a)) for a in per["angles"]], "s:", color="#555555",
             label=f"mean principal angle, k = {per['k']} (right)")
    a1b.axhline(float(np.mean(per["random_angles"])), color="#555555", lw=0.6, ls="-.",
                label="random subspaces, mean angle (right)")
    a1b.set_ylabel("angle (deg)")
    a1b.set_ylim(0, 90)
    a1b.grid(False)
    a1b.spines["right"].set_visible(True)
    a1.set_ylim(0, 1.02)
    a1.set_xlabel("adapter layer L (blocks.L.mlp.out vs resid_post L)")
    a1.set_ylabel("|cosine|")
    a1.set_title(f"(a) after {data['config']['steps']} steps ({_objective(data)} objective)", loc="left")
    _twin_legend(a1, a1b, loc="center left", bbox_to_anchor=(0.0, 0.62))

    cos = np.array(tr["cos_top"], dtype=float)
    for j, (L, col) in enumerate(zip(tr["layers"], _depth_colors(tr["layers"], data["n_layers"]))):
        a2.plot(tr["steps"], cos[:, j], "o-", color=col, label=f"L{L}")
    a2.axhline(per["random_cos"], color=COLORS["random"], lw=0.8, ls=":")
    a2.set_xlabel("optimiser steps (0: initialisation)")
    a2.set_ylabel("|cos(pca₁, ΔW top output)|")
    a2.set_ylim(0, 1.02)
    a2.set_title("(b) over training", loc="left")
    a2.legend(ncol=4, frameon=False, fontsize=5.5)
    return save(fig, out, "pca_vs_learned", sources)


# --- command line -----------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.figures", description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=[*FIGURES, "all"], help="figure to (re)generate")
    parser.add_argument("--out", default="figures", help="figure directory (default: figures)")
    parser.add_argument("--pairs", type=int, default=StudyConfig.pairs,
                        help=f"pairs (default {StudyConfig.pairs})")
    parser.add_argument("--steps", type=int, default=StudyConfig.steps, help="training steps (default "
                                                                             f"{StudyConfig.steps})")
    parser.add_argument("--objective", choices=("shift", "separation"), default=None,
                        help="training objective of the quick adapter (default: TrainConfig's)")
    parser.add_argument("--model", default=None, help="model name or directory (default: packaged SmolLM2)")
    parser.add_argument("--summary", default=str(DEFAULT_SUMMARY),
                        help=f"where the numbers behind the model figures go (default {DEFAULT_SUMMARY})")
    parser.add_argument("--from-summary", default=None, metavar="PATH",
                        help="redraw the model figures from a stored summary instead of recomputing")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads for torch and BLAS (default: their own choice; use 1 on a shared "
                             "machine)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.pairs < 10 or args.steps < 1:
        parser.error("--pairs must be >= 10 (a held-out fifth is needed) and --steps >= 1")
    if args.threads:
        import torch
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(args.threads)
        threadpool_limits(args.threads)  # numpy/scipy BLAS too: two pools fighting over 2 cores is slow

    out = Path(args.out)
    names = list(FIGURES) if args.name == "all" else [args.name]
    needs = {"dhs_spectra": ("dhs_report",), "layer_map": ("layer_map", "dhs_report"),
             "pca_vs_learned": ("pca_vs_learned",)}
    keys = [k for n in names for k in needs.get(n, ())]
    data, sources = {}, []
    if keys and args.from_summary:
        data, sources = _load_summary(Path(args.from_summary)), [Path(args.from_summary)]
        missing = sorted({k for k in keys if k not in data})
        if missing:
            raise SystemExit(f"error: {args.from_summary} has no {missing}; run {args.name} without --from-summary")
    elif keys:
        # every number first, then the summary, then the figures: each figure records the summary's SHA-256
        study = Study(StudyConfig(pairs=args.pairs, steps=args.steps, objective=args.objective, model=args.model))
        t0 = time.perf_counter()
        for key in keys:
            getattr(study, key)  # computed once
        study.timings["total"] = round(time.perf_counter() - t0, 1)
        summary = Path(args.summary)
        summary.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(summary, study.summary(), indent=1)
        print(f"wrote {summary}")
        data, sources = _load_summary(summary), [summary]

    makers: dict[str, Callable[[], list[Path]]] = {
        "loss_geometry": lambda: loss_geometry_figure(out),
        "dhs_spectra": lambda: dhs_spectra_figure(data, out, sources),
        "layer_map": lambda: layer_map_figure(data, out, sources),
        "pca_vs_learned": lambda: pca_vs_learned_figure(data, out, sources),
    }
    for name in names:
        for p in makers[name]():
            print(f"wrote {p}")
    return 0


def _load_summary(path: Path) -> dict:
    """A stored summary, with JSON nulls back to NaN (the figures treat NaN as 'undefined')."""
    def nan(obj):
        if obj is None:
            return math.nan
        if isinstance(obj, dict):
            return {k: nan(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [nan(v) for v in obj]
        return obj

    if not path.is_file():
        raise SystemExit(f"error: {path} does not exist; run a model figure first (it writes --summary)")
    return nan(json.loads(path.read_text()))


if __name__ == "__main__":
    sys.exit(main())
