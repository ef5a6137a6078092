"""The report of a sweep: ``report.json`` (every number), ``REPORT.md`` (the iso-coherence table, which
differences are significant) and the dose-response figures."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

from ..registry import names as method_names
from ..storage.io import write_json_atomic, write_text_atomic
from .plots import dose_response_figures
from .stats import paired_difference, t_interval

FIGURES_DIR = "figures"  # inside the run's own directory: the tracked figures/ change only via `make figures`


def write_outputs(report: dict, out: Path) -> list[Path]:
    """``report.json``, ``REPORT.md`` and the dose-response figures (``out/figures``), each atomically.
    ``name@seed`` rows of the iso table also get their ``name (k seeds)`` row (``seed_groups``)."""
    primary = report["effects"][0]["name"]
    report["iso_table"] = {k: v for k, v in report["iso_table"].items() if "seeds" not in v}
    report["iso_table"].update(seed_groups(report["iso_table"], primary))
    report["comparisons"] = comparisons(report)
    write_json_atomic(out / "report.json", report)
    paths = dose_response_figures(report, out / FIGURES_DIR, sources=[out / "report.json"])
    write_text_atomic(out / "REPORT.md", markdown_report(report, [p for p in paths if p.suffix == ".png"], out))
    return [out / "report.json", out / "REPORT.md", *paths]


def _f(x, spec=".3f"):
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def seed_groups(rows: dict[str, dict], primary: str) -> dict[str, dict]:
    """``name (k seeds)`` rows from ``name@seed`` rows (k >= 2): per side, the mean Δ over seeds with a
    t-interval over seeds (the seeds are the replicates; items are shared), the per-item deltas averaged over
    seeds (for paired comparisons with other rows), and the other columns averaged over seeds."""
    groups: dict[str, list[str]] = {}
    for label in rows:
        if "@" in label:
            groups.setdefault(label.split("@")[0], []).append(label)
    out = {}
    for name, labels in groups.items():
        if len(labels) < 2:
            continue
        k = len(labels)
        # a report read back from JSON has None where a value was NaN
        mean = lambda xs: sum(math.nan if x is None else x for x in xs) / len(xs)  # noqa: E731
        row: dict = {"at_zero": rows[labels[0]]["at_zero"], "seeds": k,
                     "monotonicity": mean([rows[lb].get("monotonicity") for lb in labels]),
                     "symmetry": mean([rows[lb].get("symmetry") for lb in labels])}
        for side in ("plus", "minus"):
            effects = [rows[lb][side]["effects"][primary] for lb in labels]
            deltas = [math.nan if (d := e.get("delta_paired", e["delta"])) is None else d for e in effects]
            m, ci = t_interval(deltas)
            items = [mean(v) for v in zip(*(e.get("item_deltas") or [] for e in effects))]
            others = {x: {"delta": mean([rows[lb][side]["effects"][x]["delta"] for lb in labels])}
                      for x in rows[labels[0]][side]["effects"] if x != primary}
            row[side] = {"coeff": math.nan,
                         "budget_reached": all(rows[lb][side]["budget_reached"] for lb in labels),
                         "kl_mean": mean([rows[lb][side].get("kl_mean") for lb in labels]),
                         "dnll": mean([rows[lb][side].get("dnll") for lb in labels]),
                         "effects": {primary: {"delta": m, "ci95": ci, "item_deltas": items,
                                               "seed_deltas": deltas}, **others}}
        ends = [rows[lb].get("ends") for lb in labels]
        if all(ends):
            row["ends"] = {key: mean([e.get(key) for e in ends]) for key, v in ends[0].items()
                           if isinstance(v, (int, float)) and not isinstance(v, bool)}
        out[f"{name} ({k} seeds)"] = row
    return out


def demo_index(reports: dict[str, dict], seconds: float) -> str:
    """The demo's ``REPORT.md``: every concept's iso-coherence table, linking to its own report."""
    parts = ["# interp-steer demo: every method at equal coherence, per concept", "",
             f"{seconds:.0f} s in all. Each concept's own REPORT.md has the figures, training and timings.", ""]
    for name, report in reports.items():
        base = ", ".join(f"{k} {v:+.3f}" for k, v in next(iter(report["iso_table"].values()))["at_zero"].items())
        parts += [f"## [{name}]({name}/REPORT.md)", "", f"Base model: {base}; items: {report['data']['items']}.",
                  "", iso_table_markdown(report), ""]
    return "\n".join(parts)


def comparisons(report: dict) -> dict:
    """Per method and direction, at the budget: its primary Δ against the random direction's and against the best
    additive baseline's (the one with the largest Δ that way), paired over items. In the '−' direction a
    larger effect is a more negative Δ, so differences are signed to be positive when the method steers further."""
    iso = report["iso_table"]
    primary = report["effects"][0]["name"] if report.get("effects") else None
    out: dict = {}
    for side, sign in (("plus", 1.0), ("minus", -1.0)):
        def deltas(name):
            return iso[name][side]["effects"].get(primary, {}).get("item_deltas")

        def steer(name):
            return [sign * v for v in deltas(name)]

        additive = [n for n in method_names("additive") if n in iso and deltas(n) is not None]
        best = max(additive, key=lambda n: sign * iso[n][side]["effects"][primary]["delta"], default=None)
        out[side] = {"best_additive": best}
        for name in iso:
            if deltas(name) is None:
                continue
            row = {}
            if "random" in iso and name != "random":
                row["vs_random"] = paired_difference(steer(name), steer("random"))
            if best is not None and name != best:
                row["vs_best_additive"] = paired_difference(steer(name), steer(best))
            out[side][name] = row
    return out


def iso_table_markdown(report: dict) -> str:
    b, metric = report["budget"], report["budget_metric"]
    effects = [e["name"] for e in report["effects"]]
    primary = effects[0]
    head = (f"| method | dir | coeff at {metric.upper()}={b} | Δ {primary} [95% CI] | "
            + " | ".join(f"Δ {e}" for e in effects[1:]) + (" | " if effects[1:] else "")
            + "KL | ΔNLL | budget reached | peak within budget [95% CI] @ c | vs random | vs best additive | "
            "monotonic (ρ) | symmetry |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    comps = report.get("comparisons", {})
    for name, iso in report["iso_table"].items():
        for side, sign in (("plus", "+"), ("minus", "−")):
            s = iso[side]
            pe = s["effects"][primary]
            ci = pe.get("ci95", [math.nan, math.nan])
            rest = [f"{_f(s['effects'][e]['delta'], '+.3f')}" for e in effects[1:]]
            comp = comps.get(side, {}).get(name, {})

            def verdict(key):
                c = comp.get(key)
                if not c:
                    return ""
                return f"{_f(c['diff'], '+.3f')}{' *' if c['significant'] else ''}"

            lines.append(" | ".join([
                f"| {name}", sign, _f(s["coeff"], ".3g"),
                f"{_f(pe.get('delta_paired', pe['delta']), '+.3f')} [{_f(ci[0], '+.3f')}, {_f(ci[1], '+.3f')}]",
                *rest, _f(s["kl_mean"], ".3f"), _f(s["dnll"], "+.3f"), "yes" if s["budget_reached"] else "no",
                peak_cell(s.get("peak")), verdict("vs_random"), verdict("vs_best_additive"),
                _f(iso["monotonicity"], ".2f") if side == "plus" else "",
                _f(iso["symmetry"], ".2f") if side == "plus" else ""]) + " |")
    return "\n".join(lines)


def peak_cell(peak: dict | None) -> str:
    """``Δ [lo, hi] @ c``, with "turns back" where the effect at the budget is significantly below the peak."""
    if not peak or peak.get("coeff") is None or (isinstance(peak["coeff"], float) and math.isnan(peak["coeff"])):
        return "–"
    ci = peak.get("ci95") or [math.nan, math.nan]
    d = peak.get("delta_paired", peak.get("delta"))
    return (f"{_f(d, '+.3f')} [{_f(ci[0], '+.3f')}, {_f(ci[1], '+.3f')}] @ {_f(peak['coeff'], '+.3g')}"
            + (" (turns back)" if peak.get("turns_back") else ""))


F1_COLUMNS = (("steering_f1", "Steering F1", ".1f"), ("f1_raw", "F1 without mass factor", ".1f"),
              ("precision", "precision", ".2f"), ("recall", "recall (net fixes)", ".3f"),
              ("fix_rate", "fix rate", ".2f"), ("break_rate", "break rate", ".2f"),
              ("arbitrary_rate", "control flip rate", ".2f"), ("focus", "focus", ".2f"),
              ("mass_ratio", "mass ratio²", ".3f"))


def ends_table_markdown(report: dict) -> str:
    """Steering F1 (the concept's ``ends`` metric) per method, at the budget's coefficients; '' if none."""
    rows = {k: v["ends"] for k, v in report["iso_table"].items() if v.get("ends")}
    if not rows:
        return ""
    head = "| method | c− / c+ | " + " | ".join(t for _, t, _ in F1_COLUMNS) + " | choice mass −/0/+ | items |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, e in rows.items():
        cs, m = e.get("coeffs", {}), e.get("mass", {})
        lines.append(" | ".join([f"| {name}", f"{_f(cs.get('minus'), '+.3g')} / {_f(cs.get('plus'), '+.3g')}",
                                 *(_f(e.get(k), spec) for k, _, spec in F1_COLUMNS),
                                 "/".join(_f(m.get(k), ".2f") for k in ("minus", "zero", "plus")),
                                 f"{e.get('n_target', '–')} + {e.get('n_control', '–')}"]) + " |")
    return "\n".join(lines)


def markdown_report(report: dict, figures: Sequence[Path], out: Path) -> str:
    e0 = report["effects"][0]
    parts = [
        f"# interp-steer: steering {report['concept']} at equal coherence",
        "",
        f"Primary effect: `{e0['name']}` ({e0['unit']}; mean over items), relative to the base model (c = 0), "
        f"interpolated at the coefficient where the mean per-token {report['budget_metric'].upper()} on "
        f"{report['data']['neutral_texts']} neutral texts reaches the budget of {report['budget']} nat/token "
        f"(items: {report['data']['items']}). '+' should raise the concept, '−' lower it. CI: paired 95 % "
        "interval "
        "over items (each item's own Δ, interpolated the same way). 'vs random' / 'vs best additive': how much "
        "further this method steers that way than the random direction / the best additive baseline "
        "(PCA, mean-difference, gradient), paired over items; * marks a 95 % CI excluding zero. 'budget reached: "
        "no' means the method never spent the budget within its coefficient range; its last point is shown.",
        "",
        iso_table_markdown(report),
        "",
    ]
    if f1 := ends_table_markdown(report):
        parts += ["## Steering F1 at the budget", "",
                  "AntiPaSTO's Steering F1 (arXiv 2601.07473), from the forced choice at each method's budget "
                  "coefficients: fixes (dishonest at c = 0, honest at +c) minus breaks, weighted by |y0|/σ, "
                  "against any flip of a control question (arithmetic checks, free preferences); × (min choice "
                  "mass ratio)², NaN when the choice mass at ±c falls below the threshold "
                  f"({next(iter(r['ends'] for r in report['iso_table'].values() if r.get('ends'))).get('min_mass', 0.95)}). "
                  "No CI: a single number per method.", "", f1, ""]
    if "train" in report:
        t = report["train"]
        parts += ["## Training", "", f"{t.get('seconds', 0):.0f} s; held-out pairs' projection on d_steer at "
                  f"{t.get('loss_hook')} (ΔNLL: on the held-out pair prompts, not a coherence measure):", "",
                  "| adapter | c | chosen | rejected | separation | shift | ΔNLL |",
                  "|---|---|---|---|---|---|---|"]
        for label, run in t.get("runs", {}).items():
            for c, m in run.get("held_out", {}).items():
                parts.append(f"| {label} | {c} | {m['proj_chosen']:.2f} | {m['proj_rejected']:.2f} | "
                             f"{m['separation']:.2f} | {m['shift']:+.2f} | {m['dnll']:+.4f} |")
        parts.append("")
    parts += ["## Figures", ""] + [f"![{p.stem}]({p.relative_to(out).as_posix()})" for p in figures]
    parts += ["", "## Timings (s)", "", "```", json.dumps(report["timings_s"], indent=1), "```", ""]
    return "\n".join(parts)
