"""``interp-steer eval`` and ``interp-steer demo``: sweeps, the iso-coherence table, figures and report.

The demo: train the adapter on the default model, build every baseline from the same pairs and the same
capture, sweep them all (sweep.py), and write ``figures/`` plus ``REPORT.md`` and ``report.json``.
"""

from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import torch

from .io import write_json_atomic

DEFAULT_METHODS = ("adapter", "pca_diff", "pca_center", "mean_diff", "gradient", "random", "prompting")


def add_commands(sub) -> None:
    for name, func, helptext in (("demo", cmd_demo, "train, sweep every method, write figures and the report"),
                                 ("eval", cmd_eval, "sweep a trained adapter (and baselines) at equal coherence")):
        p = sub.add_parser(name, help=helptext)
        if name == "eval":
            p.add_argument("adapter", help="adapter directory written by `interp-steer train`")
            p.add_argument("--pairs", default=None, help="the --pairs file the adapter was trained with, if any")
            p.add_argument("--personas", default=None, help="the --personas the adapter was trained with, if any")
        p.add_argument("--out", default="runs/demo" if name == "demo" else None,
                       help="where report.json / REPORT.md go (default: runs/demo, or the adapter directory)")
        p.add_argument("--figures", default="figures", help="figure directory (default: figures)")
        p.add_argument("--methods", default=",".join(DEFAULT_METHODS if name == "demo" else ("adapter",)),
                       help=f"comma-separated subset of {','.join(DEFAULT_METHODS)}")
        p.add_argument("--budget", type=float, default=0.1, help="ΔNLL budget, nat/token (default 0.1)")
        # default subsample: keeps `make demo` within ~15 min on 2 CPU cores; pass larger values for papers
        p.add_argument("--n-dilemmas", type=int, default=34, help="labelled dilemmas, every k-th (default 34 of 68)")
        p.add_argument("--n-neutral", type=int, default=16, help="neutral texts for coherence (default 16 of 45)")
        p.add_argument("--n-mc", type=int, default=8, help="TruthfulQA-format questions (default 8 of 36; 0: skip)")
        p.add_argument("--bisect", type=int, default=3, help="bisection steps of the budget search (default 3)")
        p.add_argument("--steps", type=int, default=None, help="training steps (demo; default: TrainConfig's)")
        p.add_argument("--model", default=None, help="model name or directory (default: packaged SmolLM2)")
        p.set_defaults(func=func)


def _methods(names: str) -> list[str]:
    chosen = [m.strip() for m in names.split(",") if m.strip()]
    bad = [m for m in chosen if m not in DEFAULT_METHODS]
    if bad:
        raise ValueError(f"unknown methods {bad}; choose from {','.join(DEFAULT_METHODS)}")
    return chosen


def build_methods(bridge, tok, names: Sequence[str], adapters, hs: dict, loss_hook: str, d_steer, batches):
    """Every requested method from the same capture ``hs`` (training pairs, c = 0, adapter layers)."""
    from .directions import SteeringVector, gradient_directions, steering_vector
    from .sweep import adapter_method, prompting_method, vector_method

    methods = []
    for name in names:
        if name == "adapter":
            methods.append(adapter_method(adapters))
        elif name == "prompting":
            methods.append(prompting_method())
        elif name == "gradient":
            layers = [int(n.split(".")[1]) for n in hs]
            # a forward + backward per batch: 4 batches (~32 pairs) give a stable mean at a fraction of the cost
            dirs = gradient_directions(bridge, batches[:4], layers, loss_hook, d_steer)
            scales = steering_vector(hs, "mean_diff").scales
            methods.append(vector_method("gradient", SteeringVector(dirs, scales)))
        else:
            methods.append(vector_method(name, steering_vector(hs, name)))
    return methods


def subsample(args):
    """The evaluation sets, evenly subsampled (every k-th item) to the sizes asked for."""
    from .evaluate import load_dilemmas, load_neutral_texts, load_truthfulqa_csv

    def sub(items, n):
        return items if n is None or n >= len(items) else items[:: max(1, len(items) // n)][:n]

    questions = sub(load_truthfulqa_csv(), args.n_mc) if args.n_mc else []
    return sub(load_dilemmas(), args.n_dilemmas), questions, sub(load_neutral_texts(), args.n_neutral)


def run(bridge, tok, args, adapters, hs, loss_hook, d_steer, batches, extra: dict) -> dict:
    from .evaluate import coherence_reference
    from .sweep import SweepData, run_sweep

    dilemmas, questions, texts = subsample(args)
    data = SweepData(dilemmas, questions, coherence_reference(bridge, tok, texts), budget=args.budget,
                     bisect_iters=args.bisect, verbose=True)
    t = time.perf_counter()
    methods = build_methods(bridge, tok, _methods(args.methods), adapters, hs, loss_hook, d_steer, batches)
    build_s = time.perf_counter() - t
    results = run_sweep(bridge, tok, methods, data)
    report = {
        "budget_dnll": args.budget,
        "data": {"dilemmas": len(dilemmas), "mc_questions": len(questions), "neutral_texts": len(texts)},
        "machine": {"platform": platform.platform(), "torch_threads": torch.get_num_threads()},
        "timings_s": {"build_methods": build_s, **{r.name: r.seconds for r in results}},
        "iso_table": {r.name: r.iso for r in results},
        "points": {r.name: [asdict(p) for p in r.points] for r in results},
        "budget_probes": {r.name: [asdict(p) for p in r.probes] for r in results},
        **extra,
    }
    return report


def write_outputs(report: dict, out: Path, figures: Path) -> list[Path]:
    from .plots import dose_response_figures

    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "report.json", report)
    paths = dose_response_figures(report, figures)
    md = markdown_report(report, [p for p in paths if p.suffix == ".png"])
    tmp = out / "REPORT.md.tmp"  # write, then rename: no half-written report on interrupt
    tmp.write_text(md)
    tmp.replace(out / "REPORT.md")
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


def markdown_report(report: dict, figures: Sequence[Path]) -> str:
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
    parts += ["## Figures", ""] + [f"![{p.stem}]({Path('..') / '..' / p if not p.is_absolute() else p})" for p in figures]
    parts += ["", "## Timings (s)", "", "```", json.dumps(report["timings_s"], indent=1), "```", ""]
    return "\n".join(parts)


def cmd_demo(args) -> int:
    from .data import persona_pairs
    from .models import load_model
    from .train import TrainConfig, train

    _methods(args.methods)  # fail before minutes of work
    t0 = time.perf_counter()
    bridge, tok = load_model(args.model)
    cfg = TrainConfig() if args.steps is None else TrainConfig(steps=args.steps)
    out = Path(args.out)
    result = train(bridge, tok, persona_pairs(tok), cfg, out / "adapter")
    train_s = time.perf_counter() - t0
    report = run(bridge, tok, args, result.adapters, result.reference_states, result.loss_hook, result.d_steer,
                 result.train_batches, {"train": {"seconds": train_s, "loss_hook": result.loss_hook,
                                                  "held_out": result.metrics["held_out"], "config": cfg.to_dict()}})
    report["timings_s"]["total"] = time.perf_counter() - t0
    for p in write_outputs(report, out, Path(args.figures)):
        print(f"wrote {p}")
    print("\n" + iso_table_markdown(report))
    print(f"\ndemo finished in {report['timings_s']['total']:.0f}s")
    return 0


def cmd_eval(args) -> int:
    from .capture import capture
    from .data import pair_batches
    from .io import load_adapter
    from .models import load_model
    from .train import TrainConfig, select_pairs

    _methods(args.methods)
    if not (Path(args.adapter) / "config.json").is_file():
        raise FileNotFoundError(f"{args.adapter} is not an adapter directory (no config.json); "
                                "write one with `interp-steer train --out DIR`")
    t0 = time.perf_counter()
    bridge, tok = load_model(args.model)
    adapters, config = load_adapter(args.adapter, bridge)
    cfg = TrainConfig.from_dict(config["train_config"])
    loss_hook = config["metrics"]["loss_hook"]
    from safetensors.torch import load_file

    d_steer = load_file(str(Path(args.adapter) / "d_steer.safetensors"))["d_steer"]
    from .cli import load_pairs

    train_pairs, _ = select_pairs(load_pairs(args, tok), cfg)  # the baselines see the adapter's training pairs
    batches = list(pair_batches(train_pairs, tok, cfg.batch_pairs))
    names = [f"blocks.{a.site.split('.')[1]}.hook_resid_post" for a in adapters]
    hs = capture(bridge, batches, names) if any(m != "adapter" for m in _methods(args.methods)) else {}
    report = run(bridge, tok, args, adapters, hs, loss_hook, d_steer, batches, {"adapter": str(args.adapter)})
    report["timings_s"]["total"] = time.perf_counter() - t0
    for p in write_outputs(report, Path(args.out or args.adapter), Path(args.figures)):
        print(f"wrote {p}")
    print("\n" + iso_table_markdown(report))
    return 0
