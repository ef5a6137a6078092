"""One figure style for the project (one-column width, labelled axes with units) and the dose-response plots.

Every figure is written as PNG and SVG, each to a temporary name first and then renamed. A figure drawn from
files (a study's ``results.json``, a report) carries their SHA-256 in its metadata (``Source``: one
``sha256:HEX PATH`` line per file, PATH relative to the figure's directory), so ``figure_sources`` can tell
whether it still shows what those files hold.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..registry import REGISTRY  # noqa: E402
from ..registry import color as method_color

COLUMN_WIDTH = 3.4  # inches: one column of a two-column paper
STYLE = {
    "figure.dpi": 150, "savefig.dpi": 200, "font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8,
    "legend.fontsize": 6.5, "xtick.labelsize": 7, "ytick.labelsize": 7, "axes.spines.top": False,
    "axes.spines.right": False, "lines.linewidth": 1.2, "lines.markersize": 3, "svg.fonttype": "none",
    "axes.grid": True, "grid.alpha": 0.25, "grid.linewidth": 0.5,
}
# each method's colour is its registry entry's (registry.py); the analysis figures add their own quantities
COLORS = {**{name: spec.color for name, spec in REGISTRY.items()}, "dhs_svd": "#e377c2"}


def figure(nrows: int = 1, ncols: int = 1, height: float = 2.4, width: float = COLUMN_WIDTH, **kw):
    with plt.rc_context(STYLE):
        return plt.subplots(nrows, ncols, figsize=(width, height), **kw)


SOURCE_KEY = "Source"  # PNG text chunk and SVG Dublin Core element (dc:source) holding the provenance


def save(fig, directory: str | Path, name: str, sources: Sequence[str | Path] = ()) -> list[Path]:
    """Write ``name.png`` and ``name.svg`` into ``directory`` atomically; close the figure.

    ``sources``: the files the figure was drawn from; each one's SHA-256 and path (relative to ``directory``)
    go into both files' metadata (``figure_sources`` reads them back).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lines = [f"sha256:{_sha256(Path(src))} {Path(os.path.relpath(src, directory)).as_posix()}" for src in sources]
    paths = []
    with plt.rc_context(STYLE):
        fig.tight_layout()
        for ext in ("png", "svg"):
            path = directory / f"{name}.{ext}"
            tmp = directory / f".{name}.tmp.{ext}"
            fig.savefig(tmp, format=ext, metadata={SOURCE_KEY: "\n".join(lines)} if lines else None)
            os.replace(tmp, path)
            paths.append(path)
    plt.close(fig)
    return paths


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def figure_sources(path: str | Path) -> list[tuple[Path, str]]:
    """The files a PNG or SVG written by ``save`` was drawn from, with the SHA-256 each had then: ``[(file,
    sha256), ...]``, the file resolved against the figure's directory; ``[]`` for a figure drawn from no file."""
    path = Path(path)
    if path.suffix == ".png":
        from PIL import Image  # matplotlib's own dependency

        with Image.open(path) as im:
            text = im.text.get(SOURCE_KEY, "")
    elif path.suffix == ".svg":
        from html import unescape

        m = re.search(r"<dc:source>(.*?)</dc:source>", path.read_text(), re.S)
        text = unescape(m.group(1)) if m else ""
    else:
        raise ValueError(f"{path}: figure_sources reads .png and .svg figures, not {path.suffix!r}")
    out = []
    for line in filter(None, (x.strip() for x in text.splitlines())):
        m = re.fullmatch(r"sha256:([0-9a-f]{64}) (.+)", line)
        if m is None:
            raise ValueError(f"{path}: unreadable {SOURCE_KEY} line {line!r} (expected 'sha256:HEX PATH')")
        out.append((Path(os.path.normpath(path.parent / m.group(2))), m.group(1)))
    return out


def stale_sources(path: str | Path) -> list[str]:
    """What makes a figure out of date: each source file that is missing or whose SHA-256 differs now."""
    bad = []
    for src, digest in figure_sources(path):
        if not src.is_file():
            bad.append(f"{src} (missing)")
        elif _sha256(src) != digest:
            bad.append(f"{src} (changed since the figure was drawn)")
    return bad


def _color(name: str) -> str:
    return method_color(name)


def _paired_band(pts: Sequence[dict], effect: str) -> tuple[list[float], list[float]]:
    """Per point, the 95 % half-width of the mean item change from c = 0 (paired over items: the band is
    zero at c = 0 and shows how well the change, not the level, is known)."""
    if not all("items" in p for p in pts):  # a report without per-item scores: no band
        return [p["effects"][effect] for p in pts], [math.nan] * len(pts)
    zero = next(p for p in pts if p["coeff"] == 0.0)["items"][effect]
    half, value = [], []
    for p in pts:
        d = [a - b for a, b in zip(p["items"][effect], zero) if math.isfinite(a) and math.isfinite(b)]
        n = len(d)
        m = sum(d) / n if n else math.nan
        sd = math.sqrt(sum((x - m) ** 2 for x in d) / (n - 1)) if n > 1 else math.nan
        half.append(1.959963984540054 * sd / math.sqrt(n) if n > 1 else math.nan)
        value.append(p["effects"][effect])
    return value, half


def dose_response_figures(report: dict, directory: str | Path, sources: Sequence[str | Path] = ()) -> list[Path]:
    """The primary effect against the coefficient (one panel per method, coherence on a second axis) and against
    the budgeted coherence measure (all methods). ``sources``: the report's file(s), recorded in each figure."""
    points: dict[str, Sequence[dict]] = report["points"]
    budget, metric = report["budget"], report["budget_metric"]
    cost_key, cost_label = ("kl_mean", "KL (nat/tok)") if metric == "kl" else ("dnll", "ΔNLL (nat/tok)")
    effect = report["effects"][0]
    label = f"{effect['name']} ({effect['unit']})"
    names = list(points)
    paths = []

    ncols = 2
    nrows = (len(names) + 1) // 2
    with plt.rc_context(STYLE):
        fig, axes = figure(nrows, ncols, height=1.35 * nrows + 0.4, width=COLUMN_WIDTH * 1.4, squeeze=False)
        for ax, name in zip(axes.flat, names):
            pts = points[name]
            c = [p["coeff"] for p in pts]
            ax.plot(c, [p["effects"][effect["name"]] for p in pts], "o-", color=_color(name))
            ax2 = ax.twinx()
            # coherence is also known at the budget-search probes (no effect measured there)
            coh = sorted({p["coeff"]: p[cost_key] for p in [*pts, *report.get("budget_probes", {}).get(name, [])]}.items())
            ax2.plot([k for k, _ in coh], [v for _, v in coh], "s:", color="#555555", markersize=2)
            ax2.axhline(budget, color="#555555", lw=0.6, ls="--")
            ax2.set_ylabel(cost_label, fontsize=6, color="#555555")
            ax2.tick_params(labelsize=6, colors="#555555")
            ax2.grid(False)
            ax.set_title(name)
            ax.set_xlabel("coefficient c" + (" (RMS units)" if name not in ("adapter", "prompting") else ""))
            ax.set_ylabel(label)
        for ax in list(axes.flat)[len(names):]:
            ax.axis("off")
        paths += save(fig, directory, "dose_response_coefficient", sources)

        fig, ax = figure(height=2.4, width=COLUMN_WIDTH * 1.25)
        for name in names:
            pts = sorted(points[name], key=lambda p: p["coeff"])
            x = [p[cost_key] for p in pts]
            y, half = _paired_band(pts, effect["name"])
            # two branches (c < 0 and c > 0) meet at c = 0, where KL is 0: draw each so the band follows it
            for branch in ([p for p in pts if p["coeff"] <= 0], [p for p in pts if p["coeff"] >= 0]):
                idx = [pts.index(p) for p in branch]
                ax.fill_between([x[i] for i in idx], [y[i] - half[i] for i in idx], [y[i] + half[i] for i in idx],
                                color=_color(name), alpha=0.15, lw=0)
            ax.plot([x[i] for i in range(len(pts)) if pts[i]["coeff"] <= 0],
                    [y[i] for i in range(len(pts)) if pts[i]["coeff"] <= 0], "v-", color=_color(name), label=name)
            ax.plot([x[i] for i in range(len(pts)) if pts[i]["coeff"] >= 0],
                    [y[i] for i in range(len(pts)) if pts[i]["coeff"] >= 0], "^-", color=_color(name))
        ax.axvline(budget, color="k", lw=0.7, ls="--")
        ax.text(budget, ax.get_ylim()[1], f" budget {budget}", fontsize=6, va="top")
        ax.set_xlabel(f"{cost_label.split(' ')[0]} on neutral text (nat/token)")
        ax.set_ylabel(f"{report['concept']}: {label}")
        right = max([p[cost_key] for pts in points.values() for p in pts] + [budget])
        ax.set_xlim(left=min(-0.01, ax.get_xlim()[0]), right=1.25 * right)
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
        paths += save(fig, directory, "dose_response_coherence", sources)

        rows = report.get("iso_table", {})
        if not rows:
            return paths
        fig, ax = figure(height=0.22 * len(rows) + 0.9, width=COLUMN_WIDTH * 1.25)
        for i, (name, iso) in enumerate(rows.items()):
            for side, dy, marker in (("plus", 0.12, "^"), ("minus", -0.12, "v")):
                e = iso[side]["effects"][effect["name"]]
                d, (lo, hi) = e.get("delta_paired", e["delta"]), e.get("ci95", [math.nan, math.nan])
                ax.errorbar([d], [i + dy], xerr=[[d - lo], [hi - d]], fmt=marker, color=_color(name),
                            mfc="white" if not iso[side]["budget_reached"] else _color(name), capsize=1.5, lw=0.8)
        ax.axvline(0, color="k", lw=0.6)
        ax.set_yticks(range(len(rows)), list(rows))
        ax.invert_yaxis()
        ax.set_xlabel(f"Δ {effect['name']} at {metric.upper()} = {budget} (95 % CI; ▲ c > 0, ▼ c < 0)")
        paths += save(fig, directory, "effect_at_budget", sources)
    return paths
