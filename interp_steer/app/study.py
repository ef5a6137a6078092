"""``interp-steer study``: models × concepts × training seeds, one *cell* each, then one report over them.

A cell is one model, one concept and one training seed: its adapter is trained and every method of the sweep
(the adapter and the baselines built from the same training pairs, at the same blocks) is measured at equal
coherence, as in ``demo``. Each cell is written whole into ``OUT/cells/ID`` (``write_dir_atomic``: a killed
cell leaves no half-written cell, only a temporary directory beside it), so a study resumes where it stopped:
a finished cell is never recomputed (``--overwrite`` recomputes it). Cells shard across processes
(``--shard I/N``, or the rank and world size under ``torchrun``): each process runs every N-th cell, and
whichever finishes writes the report over all finished cells:

    OUT/results.json   every cell's rows pooled: per model, concept, method and direction the effects at the
                       budget (mean over seeds, t-interval over seeds; one seed: the paired interval over items),
                       the peak within the budget, Steering F1, and the adapter against the best additive
                       baseline, prompting and the random direction, paired per seed
    OUT/REPORT.md      those tables, the figures, which cells are missing, and the command that made it
    OUT/figures/       dose-response on the KL axis with CI bands, and the effect at the budget, per model and
                       concept (PNG + SVG)

Each cell's ``cell.json`` (a few tens of kB) is all the report needs: commit those to carry a study to
another machine, where it resumes.
"""

from __future__ import annotations

import math
import os
import re
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

from .. import progress as command_progress
from ..comparison.plots import figure, save
from ..comparison.report import write_outputs
from ..comparison.stats import mean_ci, over_seeds, paired_difference
from ..config import ConfigError, StudyRun, run_config_doc
from ..evaluation.concepts import F1_HEADLINE, F1_THRESHOLDS, get_concept
from ..method.models import DEFAULT_NAMES, GEMMA_NAMES, load_model
from ..registry import color as color_of
from ..registry import names as method_names
from ..storage.io import (
    RUN_CONFIG_FILE,
    check_dir_target,
    check_owned_or_empty,
    read_json,
    write_dir_atomic,
    write_json_atomic,
    write_text_atomic,
)
from ..storage.ownership import MANIFEST, claim, remove_owned, why_not_owned, write_manifest
from ..training.coherence_text import kl_text
from ..training.objectives import MIN_RISE
from .commands import check_device, concept_report, merge_units, planned_units

CELLS = "cells"
PROMPTING_KL = "at prompting's KL"  # the comparisons read at prompting's own cost
# series an effect measures in the same pass, shown beside it at the budget (not compared as effects): CAA's
# matching-letter probability and the A/B mass, the forced choice's Yes/No mass
SHOWN_SERIES = ("p_match", "ab_mass", "choice_mass")
CELL_FILE = "cell.json"
FIGURES = "figures"


@dataclass(frozen=True)
class Cell:
    model: str
    concept: str
    seed: int

    @property
    def id(self) -> str:
        return f"{model_slug(self.model)}--{self.concept}--s{self.seed}"


def model_slug(model: str) -> str:
    """The model's part of a cell id: a packaged model's short name whichever of its names is given, else the
    whole name as given (a hub id, a directory path), so that two models in folders of one name differ."""
    if model in DEFAULT_NAMES or model in GEMMA_NAMES:
        return DEFAULT_NAMES[0] if model in DEFAULT_NAMES else GEMMA_NAMES[0]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.normpath(model).lstrip("./") or model)


def model_identity(model: str) -> str:
    """What a study's model is, to refuse one named twice: the packaged model whichever of its names; a local
    directory's resolved path; a hub id as given."""
    if model in DEFAULT_NAMES or model in GEMMA_NAMES:
        return DEFAULT_NAMES[1] if model in DEFAULT_NAMES else GEMMA_NAMES[1]
    path = Path(model).expanduser()
    return str(path.resolve()) if model.startswith(("/", ".", "~")) or path.exists() else model


def check_models(models: Sequence[str]) -> None:
    """Refuse one model named twice (an alias beside its HF name, two paths to one directory) and two models
    whose cell ids would be one, before anything is written."""
    seen: dict[str, str] = {}
    slugs: dict[str, str] = {}
    for m in models:
        key, slug = model_identity(m), model_slug(m)
        if key in seen:
            raise ConfigError(f"--models names one model twice: {seen[key]!r} and {m!r} are both {key}; give each "
                              "model once")
        if slug in slugs:
            raise ConfigError(f"--models {slugs[slug]!r} and {m!r} would share the cell ids {slug}--…; give one "
                              "of "
                              "them by another path (e.g. its absolute path)")
        seen[key], slugs[slug] = m, m


def study_cells(cfg: StudyRun) -> list[Cell]:
    """Every cell, model-major (a process loads each model once)."""
    return [Cell(m, c, s) for m in cfg.models for c in cfg.concepts for s in cfg.seeds]


def shard(cfg: StudyRun) -> tuple[int, int]:
    """``(i, n)``: ``--shard``, else torchrun's ``RANK``/``WORLD_SIZE`` (checked like ``--shard``), else
    ``(0, 1)``."""
    if cfg.shard is not None:
        return cfg.shard_index()
    rank, size = os.environ.get("RANK", "0"), os.environ.get("WORLD_SIZE", "1")
    try:
        i, n = int(rank), int(size)
    except ValueError:
        i = n = -1
    if not 0 <= i < n:
        raise ConfigError(f"RANK={rank!r} and WORLD_SIZE={size!r} (torchrun's environment) must be integers with "
                          "0 <= RANK < WORLD_SIZE; unset them to run every cell in one process, or give --shard "
                          "I/N")
    return i, n


def finished(out: Path, cell: Cell) -> bool:
    d = out / CELLS / cell.id
    return why_not_owned(d, cell.id, ("cell",)) is None and (d / CELL_FILE).is_file()


# ------------------------------------------------------------------------------------------ the study dir

@contextmanager
def _waited_claim(out: Path, seconds: float = 120) -> Iterator[None]:
    """``claim(out)``, waiting up to ``seconds`` for another process (a shard) holding it."""
    deadline = time.monotonic() + seconds
    with ExitStack() as stack:
        while True:
            try:
                stack.enter_context(claim(out))
                break
            except FileExistsError as e:
                if "another process" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        yield


def _open_study(out: Path, cfg: StudyRun) -> None:
    """Create ``out`` for this study, or check that it holds this study (same cells' settings) to resume.
    One process at a time (a claim, waited for): shards starting together see one study."""
    with _waited_claim(out):
        return _open_claimed(out, cfg)


def _open_claimed(out: Path, cfg: StudyRun) -> None:
    if out.is_symlink():
        raise FileExistsError(f"{out} is a symbolic link; interp-steer never writes through one. Give the real "
                              "path.")
    if check_owned_or_empty(out, "study", "a study", "--out"):  # a renamed or copied study is still the study
        saved = read_json(out / RUN_CONFIG_FILE, "the study's run_config.json")
        if not (isinstance(saved, dict) and saved.get("command") == "study"):
            raise FileExistsError(f"{out} holds an interp-steer run that is not a study; choose another --out")
        old = StudyRun.from_dict(saved["config"]).study_fields()
        diff = _first_difference(old, cfg.study_fields())
        if diff and not cfg.overwrite:
            raise ConfigError(f"{out} holds a study whose cells were made with other settings ({diff}); resume it "
                              "with the same settings (--config its run_config.json), choose another --out, or "
                              "pass --overwrite to recompute every cell")
    # the latest grid (models, concepts and seeds may grow between runs), without this process's own options:
    # what `--config run_config.json` reruns or reports
    out.mkdir(parents=True, exist_ok=True)
    whole = cfg.replace(shard=None, overwrite=False, report_only=False)
    write_json_atomic(out / RUN_CONFIG_FILE, run_config_doc("study", whole))
    write_manifest(out, out.name, skip=(CELLS,), kind="study")


def _first_difference(a, b, where: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if (d := _first_difference(a.get(k), b.get(k), f"{where}{k}.")) is not None:
                return d
        return None
    a, b = (list(x) if isinstance(x, tuple) else x for x in (a, b))
    return None if a == b else f"{where.rstrip('.')}: {a!r} then, {b!r} now"


# ------------------------------------------------------------------------------------------------ cells

def _curve(points: list[dict], effects: Sequence[str]) -> list[dict]:
    """Per measured point: coefficient, KL, ΔNLL and each effect's paired Δ from c = 0 with its 95 % CI."""
    zero = next(p for p in points if p["coeff"] == 0.0)
    out = []
    for p in points:
        row = {"coeff": p["coeff"], "kl_mean": p["kl_mean"], "dnll": p["dnll"], "delta": {}}
        for e in effects:
            d = torch.tensor(p["items"][e], dtype=torch.float64) - torch.tensor(zero["items"][e], dtype=torch.float64)
            m, _, ci = mean_ci(d)
            row["delta"][e] = [0.0 if p is zero else m, *([0.0, 0.0] if p is zero else ci)]
        out.append(row)
    return out


def cell_summary(cell: Cell, report: dict, seconds: float) -> dict:
    """What the study keeps of a cell's report: its iso table (with per-item deltas, for paired comparisons
    across cells), comparisons, curves, Steering F1, timings; not every point's items."""
    effects = [e["name"] for e in report["effects"]]
    return {"cell": {"model": cell.model, "concept": cell.concept, "seed": cell.seed, "id": cell.id},
            "seconds": seconds, "effects": report["effects"], "budget": report["budget"],
            "budget_metric": report["budget_metric"], "data": report["data"], "blocks": report["blocks"],
            "machine": report["machine"], "iso_table": report["iso_table"], "comparisons": report["comparisons"],
            "curves": {m: _curve(pts, effects) for m, pts in report["points"].items()},
            "timings_s": report["timings_s"], "prefix_reuse": report.get("prefix_reuse"),
            "train": {k: v for k, v in report.get("train", {}).items() if k != "config"}}


def run_cell(bridge, tok, cell: Cell, cfg: StudyRun, generic, out: Path) -> None:
    """Train and sweep one cell into a temporary directory, then move it into ``out/cells/ID`` whole."""
    concept = get_concept(cell.concept, cfg.data_dir)

    def fill(tmp: Path) -> None:
        t = time.perf_counter()
        report = concept_report(bridge, tok, concept, (cell.seed,), cfg.train, cfg.sweep, tmp, generic, cell.model)
        report["timings_s"]["total"] = time.perf_counter() - t
        write_outputs(report, tmp)
        write_json_atomic(tmp / CELL_FILE, cell_summary(cell, report, time.perf_counter() - t))

    # what a committed study leaves out (.gitignore): the adapter, the full report, the figures
    local = (f"adapter-s{cell.seed}", "report.json", FIGURES)
    write_dir_atomic(out / CELLS / cell.id, fill, overwrite=True, what="a study cell", local=local)


def run_study(cfg: StudyRun) -> dict:
    """Run this process's unfinished cells (resumable, shardable), then write the report over every finished
    cell. Returns the pooled results."""
    check_device(cfg)
    for c in cfg.concepts if not cfg.report_only else ():
        get_concept(c, cfg.data_dir)  # an unknown name (or unreadable CAA data) fails before any work
    out = Path(cfg.out)
    check_models(cfg.models)
    cells = study_cells(cfg)
    i, n = shard(cfg)
    mine = cells[i::n]
    if (out / CELLS).is_symlink() or (out / CELLS).exists() and not (out / CELLS).is_dir():
        raise FileExistsError(f"{out / CELLS} is a symbolic link or not a directory; interp-steer writes its "
                              "cells "
                              "only into a real directory of the study. Move it away or choose another --out.")
    for cell in mine:  # a cell name holding what the study did not write: refused before any work
        d = out / CELLS / cell.id
        if d.is_symlink() or (d.exists() and why_not_owned(d, cell.id) is not None):
            check_dir_target(d, True, "a study cell")
    made = [p for p in [out, *out.parents] if not p.exists()]  # a study that fails before a cell leaves none
    try:
        _open_study(out, cfg)
        todo = [c for c in mine if cfg.overwrite or not finished(out, c)] if not cfg.report_only else []
        if cfg.report_only:
            print(f"study {out}: {len(cells)} cells; the report from the finished ones (--report-only)")
        else:
            print(f"study {out}: {len(cells)} cells, shard {i}/{n}: {len(mine)}, {len(mine) - len(todo)} already "
                  f"finished, {len(todo)} to run")
        if todo:
            run_cells(todo, cfg, out)
    except BaseException:
        if made and not any(finished(out, c) for c in cells):
            remove_owned(out, None, ("study",))
            for p in made[1:]:
                try:
                    p.rmdir()
                except OSError:
                    break
        raise
    return write_study_report(out, cfg)


def run_cells(todo: Sequence[Cell], cfg: StudyRun, out: Path) -> None:
    """Every cell of ``todo`` in order, one model in memory at a time, under one bar over them all whose ETA is
    learnt per model and kind of work (progress.py)."""
    loaded = load_model(todo[0].model, cfg.device, cfg.dtype)
    tok = loaded[1]
    concepts = {c: get_concept(c, cfg.data_dir) for c in cfg.concepts}
    n_pairs = {c: len(concepts[c].pairs(tok)) for c in cfg.concepts}  # the pair texts need no model
    plans = [({f"{m}:kl_text": 1}, {}) for m in dict.fromkeys(c.model for c in todo)]
    plans += [planned_units(concepts[c.concept], n_pairs[c.concept], (c.seed,), cfg.train, cfg.sweep,
                            prefix=f"{c.model}:") for c in todo]
    counts, prior = merge_units(*plans)
    model, generic = None, None
    with command_progress.plan(counts, prior, f"study ({len(todo)} cells)") as bar:
        for k, cell in enumerate(todo):
            bar.prefix = f"{cell.model}:"
            bar.bar.set_description_str(f"study cell {k + 1}/{len(todo)} {cell.id}")
            if model != cell.model:
                if model is not None:
                    loaded = None  # one model in memory at a time
                    loaded = load_model(cell.model, cfg.device, cfg.dtype)
                model, generic = cell.model, kl_text(loaded[0], loaded[1], cfg.train)
            run_cell(loaded[0], loaded[1], cell, cfg, generic, out)


# ------------------------------------------------------------------------------------------------ report

def read_cells(out: Path, cfg: StudyRun) -> tuple[dict[str, dict], list[str]]:
    """Every finished cell's summary by id, and the ids of the cells not finished yet."""
    done, missing = {}, []
    for cell in study_cells(cfg):
        if finished(out, cell):
            done[cell.id] = read_json(out / CELLS / cell.id / CELL_FILE, f"cell {cell.id}")
        else:
            missing.append(cell.id)
    return done, missing


def f1_at(ends: dict, min_mass: float) -> float:
    """Steering F1 at the choice-mass threshold ``min_mass`` from a cell's ends: F1 is its raw value times the
    mass factor where the smaller of the masses at ±c reaches the threshold, else NaN (``metrics.steering_f1``),
    so cells that recorded one threshold give every other exactly."""
    mass, raw, ratio = ends.get("mass"), _num(ends.get("f1_raw")), _num(ends.get("mass_ratio"))
    if not mass or not math.isfinite(raw) or not math.isfinite(ratio):
        return math.nan
    return raw * ratio if min(_num(mass["minus"]), _num(mass["plus"])) >= min_mass else math.nan


def _num(x) -> float:
    return math.nan if x is None else float(x)


def pool(cells: dict[str, dict]) -> dict:
    """Rows and comparisons per model and concept, pooled over the seeds' cells."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for c in cells.values():
        groups.setdefault((c["cell"]["model"], c["cell"]["concept"]), []).append(c)
    out = []
    for (model, concept), cs in groups.items():
        cs = sorted(cs, key=lambda c: c["cell"]["seed"])
        effects = [e["name"] for e in cs[0]["effects"]]
        primary = effects[0]
        methods = list(cs[0]["iso_table"])
        first = next(iter(cs[0]["iso_table"].values()))["plus"]["effects"]
        series = [x for x in SHOWN_SERIES if x in first and x not in effects]  # measured beside an effect
        rows = []
        for m in methods:
            for side in ("plus", "minus"):
                sides = [c["iso_table"][m][side] for c in cs if m in c["iso_table"]]
                row = {"method": m, "side": side, "coeff": [_num(s["coeff"]) for s in sides],
                       "kl_mean": [_num(s["kl_mean"]) for s in sides],
                       "budget_reached": [bool(s["budget_reached"]) for s in sides], "effects": {}}
                for e in [*effects, *series]:
                    es = [s["effects"][e] for s in sides]
                    row["effects"][e] = over_seeds([_num(x.get("delta_paired", x["delta"])) for x in es],
                                                    es[0].get("ci95") if len(es) == 1 else None)
                peaks = [s.get("peak", {}) for s in sides]
                row["peak"] = {"delta": over_seeds([_num(p.get("delta_paired")) for p in peaks],
                                                    peaks[0].get("ci95") if len(peaks) == 1 else None),
                               "coeff": [_num(p.get("coeff")) for p in peaks],
                               "turns_back": [bool(p.get("turns_back")) for p in peaks]}
                ends = [c["iso_table"][m].get("ends") for c in cs if m in c["iso_table"]]
                if side == "plus" and all(ends) and ends:
                    row["steering_f1_by_threshold"] = {
                        label: over_seeds([f1_at(x, m) for x in ends], None) for label, m in F1_THRESHOLDS.items()}
                    row["steering_f1"] = row["steering_f1_by_threshold"][F1_HEADLINE]
                    row["steering_f1_raw"] = over_seeds([_num(x.get("f1_raw")) for x in ends], None)
                    row["focus"] = [_num(x.get("focus")) for x in ends]
                    row["mass"] = [x.get("mass") for x in ends]
                rows.append(row)
        out.append({"model": model, "concept": concept, "seeds": [c["cell"]["seed"] for c in cs],
                    "effects": cs[0]["effects"], "series": series, "rows": rows,
                    "comparisons": compare(cs, effects, primary), "seconds": sum(c["seconds"] for c in cs)})
    return {"groups": out}


def compare(cs: list[dict], effects: Sequence[str], primary: str) -> list[dict]:
    """The adapter against the best additive baseline (the one steering furthest that way on the primary
    effect, over seeds), prompting and the random direction: per seed a paired difference over items (signed
    so > 0 means the adapter steers further that way), then over seeds."""
    out = []
    iso0 = cs[0]["iso_table"]
    if "adapter" not in iso0:
        return out
    for side, sign in (("plus", 1.0), ("minus", -1.0)):
        def mean_delta(name: str) -> float:
            v = [_num(c["iso_table"][name][side]["effects"][primary]["delta"]) for c in cs]
            return sum(v) / len(v)
        additive = [a for a in method_names("additive") if a in iso0]
        best = max(additive, key=lambda a: sign * mean_delta(a), default=None)
        for other, label in ((best, "best additive"), ("prompting", "prompting"), ("random", "random")):
            if other is None or other not in iso0:
                continue
            for e in effects:
                per = []
                for c in cs:
                    a = c["iso_table"]["adapter"][side]["effects"][e].get("item_deltas")
                    b = c["iso_table"][other][side]["effects"][e].get("item_deltas")
                    if a is None or b is None:
                        continue
                    per.append(paired_difference([sign * _num(x) for x in a], [sign * _num(x) for x in b]))
                if not per:
                    continue
                out.append({"side": side, "effect": e, "against": other, "label": label, **_pooled(per)})
        out += _at_prompting_cost(cs, effects, side, sign)
    return out


def _pooled(per: list[dict]) -> dict:
    """Per-seed paired differences pooled over seeds (one seed: its interval over items), and whether the
    95 % interval excludes 0."""
    pooled = over_seeds([p["diff"] for p in per], per[0]["ci95"] if len(per) == 1 else None)
    lo, hi = pooled["ci95"]
    return {**pooled, "significant": bool(lo > 0 or hi < 0)}


def _at_prompting_cost(cs: list[dict], effects: Sequence[str], side: str, sign: float) -> list[dict]:
    """Every steering method against prompting at prompting's own KL that way (the sweep's ``at_prompting_cost``),
    paired per seed over items like ``compare``; label ``at prompting's KL``."""
    iso0 = cs[0]["iso_table"]
    if "prompting" not in iso0 or "at_prompting_cost" not in iso0["prompting"]:
        return []
    out = []
    for m in [m for m in iso0 if m != "prompting"]:
        for e in effects:
            per = []
            for c in cs:
                a = c["iso_table"][m].get("at_prompting_cost", {}).get(side, {}).get("effects", {}).get(e)
                b = c["iso_table"]["prompting"]["at_prompting_cost"][side]["effects"].get(e)
                if a is None or b is None:
                    continue
                per.append(paired_difference([sign * _num(x) for x in a["item_deltas"]],
                                             [sign * _num(x) for x in b["item_deltas"]]))
            if not per:
                continue
            kl = [_num(c["iso_table"]["prompting"]["at_prompting_cost"][side]["cost"]) for c in cs]
            out.append({"side": side, "effect": e, "method": m, "against": "prompting", "label": PROMPTING_KL,
                        "kl": kl, **_pooled(per)})
    return out


def _f(x, spec: str = "+.3f") -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def _ci(d: dict, spec: str = "+.3f") -> str:
    lo, hi = d["ci95"]
    return f"{_f(d['mean'], spec)} [{_f(lo, spec)}, {_f(hi, spec)}]"


def group_markdown(g: dict, budget: float) -> list[str]:
    effects = [e["name"] for e in g["effects"]]
    primary = effects[0]
    sign_of = {"plus": "+", "minus": "−"}
    f1 = any("steering_f1" in r for r in g["rows"])
    shown = [*effects[1:], *g.get("series", [])]
    head = (f"| method | dir | Δ {primary} [95% CI] | " + "".join(f"Δ {e} | " for e in shown)
            + "KL at c* | peak Δ within budget [95% CI] | "
            + ("Steering F1 @0.5 / @0.95 / @0.05 (raw) | " if f1 else ""))
    lines = [f"### {g['model']} · {g['concept']} (seeds {', '.join(map(str, g['seeds']))})", "", head.rstrip(),
             "|" + "---|" * (head.count("|") - 1)]
    for r in g["rows"]:
        kl = [x for x in r["kl_mean"] if math.isfinite(x)]
        reached = "" if all(r["budget_reached"]) else " (budget not reached)"
        back = " ↩" if any(r["peak"]["turns_back"]) else ""
        cells = [r["method"], sign_of[r["side"]], _ci(r["effects"][primary]) + reached,
                 *(_ci(r["effects"][e]) for e in shown), _f(sum(kl) / len(kl) if kl else math.nan, ".3f"),
                 _ci(r["peak"]["delta"]) + back]
        if f1:
            by = r.get("steering_f1_by_threshold", {})
            cells.append(" / ".join(_f(by[k]["mean"], ".1f") if k in by else "–" for k in F1_THRESHOLDS)
                         + f" ({_f(r['steering_f1_raw']['mean'], '.1f')})" if "steering_f1" in r else "")
        lines.append("| " + " | ".join(cells) + " |")
    seeds = lambda c: f"{c.get('ci_kind', '')} ({c['n_seeds']} seed{'s' if c['n_seeds'] != 1 else ''})"  # noqa: E731
    lines += ["", f"Adapter against the others at KL = {budget} (> 0: the adapter steers further that way; "
              "* marks a 95 % CI excluding 0):", "", "| dir | effect | adapter − | diff [95% CI] | CI over |",
              "|---|---|---|---|---|"]
    for c in g["comparisons"]:
        if c["label"] == PROMPTING_KL:
            continue
        name = c["against"] if c["label"] != "best additive" else f"{c['against']} (best additive)"
        lines.append(f"| {sign_of[c['side']]} | {c['effect']} | {name} | "
                     f"{_ci(c)}{' *' if c['significant'] else ''}"
                     f" | {seeds(c)} |")
    at_prompt = [c for c in g["comparisons"] if c["label"] == PROMPTING_KL]
    if at_prompt:
        lines += ["", "Every steering method against prompting at the KL prompting itself spends that way (> 0: "
                      "the "
                  "method steers further than the prompt at equal cost):", "",
                  "| dir | effect | method − prompting | prompting's KL | diff [95% CI] | CI over |",
                  "|---|---|---|---|---|---|"]
        for c in at_prompt:
            kl = [x for x in c["kl"] if math.isfinite(x)]
            lines.append(f"| {sign_of[c['side']]} | {c['effect']} | {c['method']} | "
                         f"{_f(sum(kl) / len(kl) if kl else math.nan, '.3f')} | {_ci(c)}"
                         f"{' *' if c['significant'] else ''} | {seeds(c)} |")
    return lines + [""]


def verdict(pooled: dict) -> dict:
    """Per model, how many (concept, direction) pairs put the adapter ahead of, level with or behind the best
    additive baseline on the primary effect at the budget (ahead/behind: the paired 95 % CI excludes 0)."""
    out: dict[str, dict[str, list[str]]] = {}
    for g in pooled["groups"]:
        primary = g["effects"][0]["name"]
        v = out.setdefault(g["model"], {"ahead": [], "level": [], "behind": []})
        for c in g["comparisons"]:
            if c["label"] != "best additive" or c["effect"] != primary:
                continue
            lo, hi = c["ci95"]
            key = "ahead" if lo > 0 else "behind" if hi < 0 else "level"
            v[key].append(f"{g['concept']} {'↑' if c['side'] == 'plus' else '↓'}")
    return out


def verdict_markdown(pooled: dict) -> list[str]:
    lines = ["| model | adapter ahead of the best additive | level | behind |", "|---|---|---|---|"]
    for model, v in verdict(pooled).items():
        lines.append(f"| {model} | " + " | ".join(f"{len(v[k])}" + (f" ({', '.join(v[k])})" if v[k] else "")
                                                for k in ("ahead", "level", "behind")) + " |")
    return lines


def summary_markdown(pooled: dict) -> list[str]:
    """One row per model and concept: each method's Δ of the primary effect at the budget, both ways (mean over
    seeds; † budget not reached), and the adapter against the best additive baseline with its interval. The
    README's results table is this table (tests/test_readme.py checks it)."""
    head = ("| model · concept (effect; seeds) | adapter ↑ / ↓ | best additive ↑ / ↓ | prompting ↑ / ↓ | "
            "random ↑ / ↓ | adapter − best additive ↑ / ↓ [95% CI] | adapter − prompting at its KL ↑ / ↓ |")
    lines = [head, "|---|---|---|---|---|---|---|"]
    for g in pooled["groups"]:
        p = g["effects"][0]["name"]
        by: dict = {}
        for r in g["rows"]:
            by.setdefault(r["method"], {})[r["side"]] = r

        def at(m: str, side: str) -> str:
            r = by.get(m, {}).get(side)
            return "–" if r is None else _f(r["effects"][p]["mean"],
                                            "+.2f") + ("" if all(r["budget_reached"]) else "†")

        best = {c["side"]: c for c in g["comparisons"] if c["effect"] == p and c["label"] == "best additive"}
        names = "/".join(dict.fromkeys(c["against"] for c in best.values())) or "–"

        at_kl = {c["side"]: c for c in g["comparisons"]
                 if c["effect"] == p and c["label"] == PROMPTING_KL and c["method"] == "adapter"}

        def diff(side: str, of: dict = best) -> str:
            c = of.get(side)
            return "–" if c is None else _ci(c, "+.2f") + (" *" if c["significant"] else "")

        lines.append(f"| {g['model']} · {g['concept']} ({p}; {len(g['seeds'])}) | {at('adapter', 'plus')} / "
                     f"{at('adapter', 'minus')} | {names}: "
                     + " / ".join(at(best[s]["against"], s) if s in best else "–" for s in ("plus", "minus"))
                     + f" | {at('prompting', 'plus')} / {at('prompting', 'minus')} | {at('random', 'plus')} / "
                     f"{at('random', 'minus')} | {diff('plus')} / {diff('minus')} | {diff('plus', at_kl)} / "
                     f"{diff('minus', at_kl)} |")
    return lines


def study_figures(pooled: dict, cells: dict[str, dict], out: Path, study: Path | None = None) -> list[Path]:
    """Per model and concept: the primary effect's Δ against KL (each seed's curve, CI band), and the Δ at the
    budget per method and direction with its CI. With ``study`` (the study directory), each figure records the
    SHA-256 of ``results.json`` and of the group's ``cell.json`` files it was drawn from (``plots.save``)."""
    paths = []
    for g in pooled["groups"]:
        primary = g["effects"][0]["name"]
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{g['model']}--{g['concept']}")
        sources = [] if study is None else [study / "results.json"] + [
            study / CELLS / k / CELL_FILE for k, c in sorted(cells.items())
            if (c["cell"]["model"], c["cell"]["concept"]) == (g["model"], g["concept"])]
        fig, ax = figure(height=2.5)
        for c in cells.values():
            if (c["cell"]["model"], c["cell"]["concept"]) != (g["model"], g["concept"]):
                continue
            for m, pts in c["curves"].items():
                pts = sorted(pts, key=lambda p: p["coeff"])
                for side in (1, -1):
                    ps = [p for p in pts if p["coeff"] * side >= 0]
                    x = [_num(p["kl_mean"]) for p in ps]
                    y, lo, hi = ([_num(p["delta"][primary][k]) for p in ps] for k in range(3))
                    color = color_of(m)
                    ax.plot(x, y, "o-" if side > 0 else "s--", color=color, alpha=0.8,
                            label=m if side > 0 and c["cell"]["seed"] == g["seeds"][0] else None)
                    ax.fill_between(x, lo, hi, color=color, alpha=0.12, linewidth=0)
        budget = next(iter(cells.values()))["budget"]
        ax.axvline(budget, color="k", lw=0.6, ls=":")
        ax.set_xscale("symlog", linthresh=1e-3)
        ax.set_xlim(left=0)  # KL is never negative
        ax.set_xlabel("KL(reference ‖ steered), nat/token")
        ax.set_ylabel(f"Δ {primary} from c = 0 (● +c, ■ −c)")
        ax.set_title(f"{g['model']} · {g['concept']}")
        ax.legend(ncol=3, loc="upper left", fontsize=5.5, framealpha=0.7)
        paths += save(fig, out, f"dose_kl--{name}", sources)
        fig, ax = figure(height=2.3)
        rows = g["rows"]
        labels = [f"{r['method']} {'+' if r['side'] == 'plus' else '−'}" for r in rows]
        means = [_num(r["effects"][primary]["mean"]) for r in rows]
        ci = [[_num(x) for x in r["effects"][primary]["ci95"]] for r in rows]
        err = [[0.0 if math.isnan(m - c[0]) else m - c[0] for m, c in zip(means, ci)],
               [0.0 if math.isnan(c[1] - m) else c[1] - m for m, c in zip(means, ci)]]
        ax.bar(range(len(rows)), means, yerr=err, capsize=2,
               color=[color_of(r["method"]) for r in rows])
        ax.set_xticks(range(len(rows)), labels, rotation=60, ha="right")
        ax.axhline(0, color="k", lw=0.5)
        ax.set_ylabel(f"Δ {primary} at KL = {budget}")
        ax.set_title(f"{g['model']} · {g['concept']}")
        paths += save(fig, out, f"at_budget--{name}", sources)
    return paths


def write_study_report(out: Path, cfg: StudyRun) -> dict:
    """``results.json``, ``REPORT.md`` and ``figures/`` over every finished cell (one process at a time: the
    study's claim, waited for; its lock lies beside the study, so nothing of it is inside)."""
    with _waited_claim(out):
        cells, missing = read_cells(out, cfg)
        pooled = {"cells": sorted(cells), "missing": missing, **pool(cells)}
        reason = why_not_owned(out, None, ("study",))
        if reason is not None:
            raise FileExistsError(f"{out} changed since the study wrote it ({reason}); the report is not rewritten")
        write_json_atomic(out / "results.json", pooled)
        figs = study_figures(pooled, cells, out / FIGURES, out) if cells else []
        write_text_atomic(out / "REPORT.md", study_markdown(pooled, cells, cfg, [p for p in figs
                                                                                if p.suffix == ".png"], out))
        write_manifest(out, out.name, skip=(CELLS,), kind="study")
    print(f"wrote {out / 'REPORT.md'} ({len(cells)} cells finished, {len(missing)} missing)")
    return pooled


def training_markdown(cells: dict[str, dict], max_steps: int) -> list[str]:
    """Per cell and trained run (the adapter, learned_vector): the steps it ran of ``max_steps``, whether the
    held-out objective stopped it, and that objective (the held-out pairs' shift along d_steer, in the pairs'
    separation RMS) at its first, best and last measurement."""
    lines = ["| cell | run | steps | stopped early | held-out objective: first → best (step) → last | train min |",
             "|---|---|---|---|---|---|"]
    for cid, c in sorted(cells.items()):
        for name, run in c.get("train", {}).get("runs", {}).items():
            curve = run.get("curve") or [{"step": h["step"] + 1, "held_out_obj": h["held_out_obj"]}
                                         for h in run.get("history", []) if "held_out_obj" in h]
            steps = run.get("steps_done") or len(run.get("history", [])) or "?"
            if curve:
                best = max(curve, key=lambda p: p["held_out_obj"])
                trace = (f"{curve[0]['held_out_obj']:.3f} → {best['held_out_obj']:.3f} ({best['step']}) → "
                         f"{curve[-1]['held_out_obj']:.3f}")
            else:
                trace = "not measured"
            early = "yes" if run.get("stopped_early") else "no"
            secs = run.get("seconds")
            lines.append(f"| {cid} | {name} | {steps} / {max_steps} | {early} | {trace} | "
                         f"{secs / 60:.1f} |" if secs else f"| {cid} | {name} | {steps} / {max_steps} | {early} | "
                         f"{trace} | ? |")
    return lines if len(lines) > 2 else []


def training_protocol(cfg: StudyRun) -> str:
    """How the trained runs were stopped, in words, as the study's config says."""
    t, most = cfg.train, f"{cfg.train.steps} steps of {cfg.train.batch_pairs} pairs"
    if t.eval_every == 0:
        return (f"Each trained run ran its full {most}; no held-out curve was measured during training (eval_every "
                f"0), so the objective shown, if any, is the per-step history's:")
    if t.patience == 0:
        return (f"Each trained run measured its held-out pairs' objective every {t.eval_every} steps and ran its "
                f"full {most} (patience 0: no early stopping):")
    return (f"Each trained run measures its held-out pairs' objective every {t.eval_every} steps and stops once "
            f"{t.patience} measurements in a row have not raised it by {MIN_RISE} (at most {most}):")


def study_markdown(pooled: dict, cells: dict[str, dict], cfg: StudyRun, figures: Sequence[Path], out: Path) -> str:
    first = next(iter(cells.values()), None)
    budget = first["budget"] if first else cfg.sweep.budget
    models = ", ".join(cfg.models)
    parts = [f"# Study: {', '.join(cfg.concepts)} on {models}", "",
             f"Written {time.strftime('%Y-%m-%d')} by `interp-steer study --config {out / RUN_CONFIG_FILE}` (the "
             "settings are in that file; `--report-only` rewrites this report from the finished cells, without it "
             f"the missing cells run first). {len(cells)} cells finished"
             + (f", {len(pooled['missing'])} missing: {', '.join(pooled['missing'])}" if pooled["missing"] else "")
             + ".", "",
             f"Every method is compared at the coefficient where its mean per-token KL(reference ‖ steered) on "
             f"neutral text reaches {budget} nat/token, at the same blocks (prompting acts on the tokens). Δ: "
             "change "
             "from c = 0, mean over items. With several seeds the interval is a t-interval over seeds (each seed "
             "trains the adapter and rebuilds the baselines from its own training split); with one seed it is the "
             "paired 95 % interval over items. 'peak Δ within budget': the largest effect that way at any "
             "measured "
             "coefficient whose KL is within the budget (↩: a seed's curve turns back, its effect at the budget "
             "is significantly below its peak). Steering F1: AntiPaSTO's metric (arXiv 2601.07473) at the budget "
             "coefficients, NaN where the Yes/No mass at ±c is below the threshold; shown at 0.5 (the threshold "
             "its evaluation code passed for its published numbers), 0.95 (its caption) and 0.05 (its code since "
             "2026-01-18); raw: without the mass factor. 'adapter − prompting at its KL': both read where "
             "prompting's own KL lies (prompting rarely spends the budget).", ""]
    if first:
        parts += [f"Items: {first['data']['items']}; machine: {first['machine']['platform']}, "
                  f"{first['machine']['torch_threads']} torch threads. Cell time: "
                  + ", ".join(f"{k} {v['seconds'] / 60:.1f} min" for k, v in sorted(cells.items())) + ".", ""]
    if pooled["groups"]:
        parts += ["## Verdict", "", "Per model, the (concept, direction) pairs where the adapter's effect at the "
                  "budget is ahead of, level with or behind the best additive baseline's (paired 95 % CI):", "",
                  *verdict_markdown(pooled), ""]
        parts += ["## Summary", "", f"Δ of each concept's primary effect at KL = {budget} (↑: toward the concept, "
                                    "↓: "
                  "away; mean over seeds; † the budget was not reached, the last point is shown); * marks an "
                  "interval excluding 0.", "", *summary_markdown(pooled), ""]
    for g in pooled["groups"]:
        parts += group_markdown(g, budget)
    if training := training_markdown(cells, cfg.train.steps):
        parts += ["## Training", "", training_protocol(cfg), "", *training, ""]
    parts += ["## Figures", ""] + [f"![{p.stem}]({p.relative_to(out).as_posix()})" for p in figures] + [""]
    return "\n".join(parts)


__all__ = ["Cell", "study_cells", "run_study", "write_study_report", "pool", "compare", "cell_summary", "MANIFEST"]
