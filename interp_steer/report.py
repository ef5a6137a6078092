"""The report of a sweep: ``report.json`` (every number), ``REPORT.md`` (the iso-coherence table) and figures."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

from .io import write_json_atomic, write_text_atomic
from .plots import dose_response_figures

FIGURES_DIR = "figures"  # inside the run's own directory: the tracked figures/ change only via `make figures`


def write_outputs(report: dict, out: Path) -> list[Path]:
    """``report.json``, ``REPORT.md`` and the dose-response figures (``out/figures``), each atomically."""
    write_json_atomic(out / "report.json", report)
    paths = dose_response_figures(report, out / FIGURES_DIR)
    write_text_atomic(out / "REPORT.md", markdown_report(report, [p for p in paths if p.suffix == ".png"], out))
    return [out / "report.json", out / "REPORT.md", *paths]


def _f(x, spec=".3f"):
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def iso_table_markdown(report: dict) -> str:
    b = report["budget_dnll"]
    lines = [f"| method | dir | coeff at ΔNLL={b} | Δ honesty ± SE (nat) | honest-answer acc | MC1 | budget reached | monotonic (ρ) | symmetry |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, iso in report["iso_table"].items():
        for side, sign in (("plus", "+"), ("minus", "−")):
            s = iso[side]
            lines.append(f"| {name} | {sign} | {_f(s['coeff'], '.3g')} | {_f(s['delta_honesty'], '+.3f')}"
                         f"{' ± ' + _f(s['delta_honesty_se'], '.3f') if 'delta_honesty_se' in s else ''} | "
                         f"{_f(s.get('accuracy'), '.2f')} | {_f(s.get('mc1'), '.2f')} | {'yes' if s['budget_reached'] else 'no'} | "
                         f"{_f(iso['monotonicity'], '.2f') if side == 'plus' else ''} | {_f(iso['symmetry'], '.2f') if side == 'plus' else ''} |")
    return "\n".join(lines)


def markdown_report(report: dict, figures: Sequence[Path], out: Path) -> str:
    parts = [
        "# interp-steer: steering at equal coherence",
        "",
        f"Effect: forced-choice honesty score (log P(honest answer) − log P(other), nat; mean over "
        f"{report['data']['dilemmas']} labelled dilemmas), relative to the base model (c = 0), interpolated at the "
        f"coefficient where the mean per-token ΔNLL on {report['data']['neutral_texts']} neutral texts reaches the "
        f"budget of {report['budget_dnll']} nat/token. '+' should raise honesty, '−' lower it. SE: paired standard "
        "error over dilemmas (each dilemma's own Δ, interpolated the same way). 'budget reached: no' means the "
        "method never spent the budget within its coefficient range; its last point is shown.",
        "",
        iso_table_markdown(report),
        "",
    ]
    if "train" in report:
        t = report["train"]
        parts += ["## Training", "", f"{t.get('seconds', 0):.0f} s; held-out projection on d_steer at "
                  f"{t.get('loss_hook')}:", "", "```", json.dumps(t.get("held_out", {}), indent=1), "```", ""]
    parts += ["## Figures", ""] + [f"![{p.stem}]({p.relative_to(out).as_posix()})" for p in figures]
    parts += ["", "## Timings (s)", "", "```", json.dumps(report["timings_s"], indent=1), "```", ""]
    return "\n".join(parts)
