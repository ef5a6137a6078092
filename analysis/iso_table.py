"""One iso-coherence table from several sweep reports (``report.json`` of ``interp-steer demo`` / ``eval``).

Rows labelled ``name@seed`` (e.g. ``adapter=shift+KL@1``) are training seeds of one method: they are also shown
as one row ``name (k seeds)`` whose Δ is the mean over seeds with a t-interval over seeds, and whose comparison
with the reference uses the per-item deltas averaged over seeds.

Rows from different reports are comparable when their sweeps share the concept, the effect items, the neutral
texts and the budget (the c = 0 point is then identical, which this checks). Every row's primary Δ at the
budget is compared, paired over items, with a reference row (by default the best additive baseline found):

    python -m analysis.iso_table runs/sentiment/report.json runs/sent_shift_kl-eval/report.json:adapter=shift+KL
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from interp_steer.comparison.report import seed_groups
from interp_steer.comparison.stats import paired_difference
from interp_steer.registry import names as method_names


def load_rows(specs: list[str], blocks: dict[str, list[int]] | None = None) -> tuple[dict, dict[str, dict]]:
    """``path[:method=label,...]`` -> (first report, {label: iso row}); checks the reports are comparable.
    ``blocks``, if given, receives each row's blocks (reports that record them: ``"blocks"``)."""
    first, rows = None, {}
    for spec in specs:
        path, _, renames = spec.partition(":")
        report = json.loads(Path(path).read_text())
        names = dict((r.split("=", 1) * 2)[:2] if "=" not in r else r.split("=", 1)
                     for r in renames.split(",") if r) if renames else {}
        if first is None:
            first = report
        else:
            for key in ("concept", "budget", "budget_metric", "effects", "data"):
                if report.get(key) != first.get(key):
                    raise ValueError(f"{path}: {key} differs from {specs[0]}'s; the rows would not be comparable")
            z0 = next(iter(first["iso_table"].values()))["at_zero"]
            z1 = next(iter(report["iso_table"].values()))["at_zero"]
            if any(not math.isclose(z0[k], z1[k], rel_tol=1e-9, abs_tol=1e-12) for k in z0):
                raise ValueError(f"{path}: the base model's effects differ from {specs[0]}'s ({z1} vs {z0})")
        for name, iso in report["iso_table"].items():
            if not names or name in names:
                rows[names.get(name, name)] = iso
                if blocks is not None and name in report.get("blocks", {}):
                    blocks[names.get(name, name)] = report["blocks"][name]
    assert first is not None
    return first, rows


def block_note(blocks: dict[str, list[int]]) -> str | None:
    """A warning when the rows act at different blocks (an additive baseline measured at other blocks than an
    adapter is not the fair comparison: the blocks alone can move every method); None when they agree."""
    sets = {tuple(b) for b in blocks.values() if b}
    if len(sets) < 2:
        return None
    groups = {}
    for name, b in blocks.items():
        if b:
            groups.setdefault(tuple(b), []).append(name)
    return ("note: these rows act at different blocks; compare methods at the same blocks (re-run the "
            "baselines with `interp-steer eval ARTIFACT --methods …` on the adapter's artifact): "
            + "; ".join(f"{', '.join(n)} at {', '.join(map(str, b))}" for b, n in groups.items()))


def table(first: dict, rows: dict[str, dict], reference: str | None) -> str:
    effects = [e["name"] for e in first["effects"]]
    primary = effects[0]
    rows = {**rows, **seed_groups(rows, primary)}
    out = ["CI: paired over items; for a seeds row, a t-interval over seeds.", "",
           f"{first['concept']}: Δ at {first['budget_metric'].upper()} = {first['budget']} nat/token; "
           f"base model: " + ", ".join(f"{k} {v:+.3f}" for k, v in next(iter(rows.values()))["at_zero"].items()),
           "", f"| method | dir | Δ {primary} [95% CI] | " + " | ".join(f"Δ {e}" for e in effects[1:])
           + f" | coeff | vs {reference or 'best additive'} (paired) |",
           "|---|---|---|" + "---|" * len(effects[1:]) + "---|---|"]
    for side, sign in (("plus", 1.0), ("minus", -1.0)):
        ref = reference or max((n for n in rows if n in method_names("additive")),
                               key=lambda n: sign * rows[n][side]["effects"][primary]["delta"], default=None)
        for name, iso in rows.items():
            e = iso[side]["effects"][primary]
            ci = e.get("ci95", [math.nan, math.nan])
            comp = ""
            if ref is not None and name != ref:
                d = paired_difference([sign * x for x in e["item_deltas"]],
                                      [sign * x for x in rows[ref][side]["effects"][primary]["item_deltas"]])
                comp = f"{d['diff']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]{' *' if d['significant'] else ''}"
            reached = "" if iso[side]["budget_reached"] else " (budget not reached)"
            out.append(f"| {name} | {'+' if sign > 0 else '−'} | {e.get('delta_paired', e['delta']):+.3f} "
                       f"[{ci[0]:+.3f}, {ci[1]:+.3f}] | "
                       + " | ".join(f"{iso[side]['effects'][x]['delta']:+.3f}" for x in effects[1:])
                       + f" | {'–' if math.isnan(iso[side]['coeff']) else format(iso[side]['coeff'], '.3g')}"
                       f"{reached} | {comp} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m analysis.iso_table", description=__doc__.splitlines()[0])
    p.add_argument("reports", nargs="+",
                   help="report.json[:method[=label],...] (only the named methods, optionally renamed)")
    p.add_argument("--reference", default=None, help="row to compare with (default: the best additive baseline)")
    args = p.parse_args(argv)
    try:
        blocks: dict[str, list[int]] = {}
        first, rows = load_rows(args.reports, blocks)
        note = block_note(blocks)
        print(table(first, rows, args.reference) + (f"\n\n{note}" if note else ""))
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
