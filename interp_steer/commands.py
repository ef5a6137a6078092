"""What each command does, given its config: ``run_train``, ``run_eval``, ``run_demo``.

Each checks its output path before any model work, writes ``run_config.json`` (the resolved config, which
``interp-steer CMD --config run_config.json`` runs again) beside its outputs, and never touches a file it
did not write. The CLI (cli.py) only parses into these configs.
"""

from __future__ import annotations

import platform
import time
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import torch
from transformer_lens.model_bridge import TransformerBridge
from transformers import PreTrainedTokenizerBase

from . import distributed
from .capture import capture
from .concepts import Concept, every_kth, get_concept
from .config import DemoRun, EvalRun, SweepConfig, TrainRun, run_config_doc
from .data import ContrastivePair, check_pairs, load_pairs_file, pair_batches, persona_pairs, select_pairs
from .directions import SteeringVector, gradient_directions, steering_vector
from .evaluate import coherence_reference, load_neutral_texts
from .io import (
    RUN_CONFIG_FILE, SteeringArtifact, check_dir_target, load_artifact, prepare_run_dir, write_json_atomic,
)
from .models import load_model
from .names import layer_of, resid_post, site_layer
from .report import iso_table_markdown, write_outputs
from .sweep import Method, SweepData, adapter_method, prompting_method, run_sweep, vector_method
from .train import TrainResult, train

ARTIFACT_DIR = "adapter"  # the demo's artifact, inside its run directory


def load_pairs(tokenizer: PreTrainedTokenizerBase, pairs: str | None = None,
               personas: Sequence[str] | None = None, concept: str = "honesty") -> list[ContrastivePair]:
    """The pairs of a run: a pairs file, persona × suffix pairs for two personas, or the concept's own pairs."""
    if pairs:
        out = load_pairs_file(pairs)
        check_pairs(out, tokenizer)
        return out
    if personas:
        return persona_pairs(tokenizer, personas=(personas[0], personas[1]))
    return get_concept(concept).pairs(tokenizer)


def data_source(model: str | None, pairs: str | None, personas: Sequence[str] | None, concept: str) -> dict:
    """What the artifact records about where its pairs (and model) came from, so eval can rebuild them."""
    return {"model": model, "pairs": str(Path(pairs).resolve()) if pairs else None,
            "personas": list(personas) if personas else None, "concept": concept}


def run_train(cfg: TrainRun, progress: bool = True) -> TrainResult:
    """Train and write the artifact. Under ``torchrun --nproc_per_node N`` the N processes train data-parallel
    (train.py): each joins the process group here, and rank 0 alone writes and prints."""
    get_concept(cfg.concept)  # an unknown name fails before minutes of work, and so does a bad output path
    check_dir_target(cfg.out, cfg.overwrite)
    with distributed.joined() as world:
        t0 = time.perf_counter()
        bridge, tok = load_model(cfg.model)
        pairs = load_pairs(tok, cfg.pairs, cfg.personas, cfg.concept)
        if world.main:
            print(f"model {cfg.model or 'default'} loaded in {time.perf_counter() - t0:.1f}s; {len(pairs)} pairs"
                  + (f"; {world.size} processes" if world.parallel else ""))
        result = train(bridge, tok, pairs, cfg.train, cfg.out, resume=cfg.resume, overwrite=cfg.overwrite,
                       progress=progress, data=data_source(cfg.model, cfg.pairs, cfg.personas, cfg.concept),
                       run_config=run_config_doc("train", cfg))
    if world.main:
        print(f"\nartifact written to {cfg.out}  ({time.perf_counter() - t0:.0f}s in all; timings: "
              + ", ".join(f"{k}={v:.2f}" for k, v in result.timings.items()) + ")")
        print(training_summary(result))
    return result


def training_summary(result: TrainResult) -> str:
    first, last = (result.history[0], result.history[-1]) if result.history else ({}, {})
    lines = ["loss parts, first -> last step: " + ", ".join(
        f"{k} {first.get(k, float('nan')):.4g} -> {last.get(k, float('nan')):.4g}"
        for k in ("loss", "obj", "coh", "mono", "dnll")),
        f"held-out projection on d_steer at {result.loss_hook} (pair separation scale {result.metrics['scale']:.2f});"
        " dNLL: on the held-out pair prompts (not a coherence measure: see `interp-steer eval`):",
        f"  {'c':>5} {'chosen':>9} {'rejected':>9} {'separation':>10} {'shift':>8} {'dNLL':>8}"]
    for c, m in result.metrics["held_out"].items():
        lines.append(f"  {c:>5} {m['proj_chosen']:9.2f} {m['proj_rejected']:9.2f} {m['separation']:10.2f} "
                     f"{m['shift']:8.2f} {m['dnll']:8.4f}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ sweeps

def build_methods(bridge: TransformerBridge, names: Sequence[str], artifact: SteeringArtifact,
                  hs: dict, batches, concept: Concept) -> list[Method]:
    """Every requested method; the additive ones from the same capture ``hs`` (training pairs, c = 0, the
    resid_post of the adapted layers)."""
    methods = []
    for name in names:
        if name == "adapter":
            methods.append(adapter_method(artifact.adapters))
        elif name == "prompting":
            methods.append(prompting_method(*concept.prompts))
        elif name == "gradient":
            layers = [layer_of(n) for n in hs]
            # a forward + backward per batch: 4 batches (~32 pairs) give a stable mean at a fraction of the cost
            dirs = gradient_directions(bridge, batches[:4], layers, artifact.loss_hook, artifact.d_steer)
            methods.append(vector_method("gradient", SteeringVector(dirs, steering_vector(hs, "mean_diff").scales)))
        else:
            methods.append(vector_method(name, steering_vector(hs, name)))
    return methods


def sweep_report(bridge: TransformerBridge, tok: PreTrainedTokenizerBase, cfg: SweepConfig, concept: Concept,
                 artifact: SteeringArtifact, hs: dict, batches, extra: dict) -> dict:
    """Sweep every method of ``cfg`` at the same coherence budget on ``concept``'s effects; a JSON-ready report."""
    effects = concept.effects(cfg.n_items, cfg.n_secondary)
    texts = every_kth(load_neutral_texts(), cfg.n_neutral)
    data = SweepData(effects, coherence_reference(bridge, tok, texts), budget=cfg.budget,
                     budget_metric=cfg.budget_metric, bisect_iters=cfg.bisect, grid=cfg.grid, verbose=True)
    t = time.perf_counter()
    methods = build_methods(bridge, cfg.methods, artifact, hs, batches, concept)
    build_s = time.perf_counter() - t
    results = run_sweep(bridge, tok, methods, data)
    zero = results[0].points[[p.coeff for p in results[0].points].index(0.0)] if results else None
    return {
        "concept": concept.name, "budget": cfg.budget, "budget_metric": cfg.budget_metric,
        "effects": [{"name": e.name, "unit": e.unit} for e in effects],
        "data": {"items": {k: len(v) for k, v in zero.items.items()} if zero else {}, "neutral_texts": len(texts)},
        "machine": {"platform": platform.platform(), "torch_threads": torch.get_num_threads()},
        "timings_s": {"build_methods": build_s, **{r.name: r.seconds for r in results}},
        "iso_table": {r.name: r.iso for r in results},
        "points": {r.name: [asdict(p) for p in r.points] for r in results},
        "budget_probes": {r.name: [asdict(p) for p in r.probes] for r in results},
        **extra,
    }


def _finish(report: dict, out: Path, t0: float) -> dict:
    report["timings_s"]["total"] = time.perf_counter() - t0
    for p in write_outputs(report, out):
        print(f"wrote {p}")
    print("\n" + iso_table_markdown(report))
    return report


def run_demo(cfg: DemoRun) -> dict:
    """Train on the concept's pairs, sweep every method, write ``cfg.out``: the artifact (``adapter/``),
    ``report.json``, ``REPORT.md``, ``figures/`` and ``run_config.json``."""
    distributed.single_process_only("demo")
    concept = get_concept(cfg.concept)
    out = prepare_run_dir(cfg.out, cfg.overwrite)
    check_dir_target(out / ARTIFACT_DIR, cfg.overwrite)
    write_json_atomic(out / RUN_CONFIG_FILE, run_config_doc("demo", cfg))
    t0 = time.perf_counter()
    bridge, tok = load_model(cfg.model)
    result = train(bridge, tok, concept.pairs(tok), cfg.train, out / ARTIFACT_DIR, overwrite=cfg.overwrite,
                   data=data_source(cfg.model, None, None, concept.name))
    train_s = time.perf_counter() - t0
    report = sweep_report(bridge, tok, cfg.sweep, concept, result.artifact, result.reference_states,
                          result.train_batches,
                          {"train": {"seconds": train_s, "loss_hook": result.loss_hook,
                                     "held_out": result.metrics["held_out"], "config": cfg.train.to_dict()}})
    report = _finish(report, out, t0)
    print(f"\ndemo finished in {report['timings_s']['total']:.0f}s")
    return report


def run_eval(cfg: EvalRun) -> dict:
    """Sweep a saved artifact (and baselines built from its training pairs) at equal coherence."""
    distributed.single_process_only("eval")
    artifact = load_artifact(cfg.artifact)  # a bad artifact fails before the model loads; checked against it below
    recorded = artifact.data
    concept = get_concept(cfg.concept or recorded.get("concept") or "honesty")
    out = prepare_run_dir(cfg.out_dir, cfg.overwrite)
    t0 = time.perf_counter()
    model = cfg.model if cfg.model is not None else recorded.get("model")
    bridge, tok = load_model(model)
    artifact.check_model(bridge, where=f"artifact {cfg.artifact}")
    pairs_file, personas = cfg.pairs, cfg.personas
    if pairs_file is None and personas is None:
        pairs_file, personas = recorded.get("pairs"), recorded.get("personas")
    write_json_atomic(out / RUN_CONFIG_FILE, run_config_doc("eval", cfg))
    tc = artifact.config
    train_pairs, _ = select_pairs(load_pairs(tok, pairs_file, personas, concept.name), tc.n_pairs, tc.held_out, tc.seed)
    batches = list(pair_batches(train_pairs, tok, tc.batch_pairs))  # the baselines see the adapter's training pairs
    names = [resid_post(site_layer(a.site)) for a in artifact.adapters]
    hs = capture(bridge, batches, names) if any(m != "adapter" for m in cfg.sweep.methods) else {}
    report = sweep_report(bridge, tok, cfg.sweep, concept, artifact, hs, batches, {"artifact": str(cfg.artifact)})
    return _finish(report, out, t0)
