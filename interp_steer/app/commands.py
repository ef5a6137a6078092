"""What each command does, given its config: ``run_train``, ``run_eval``, ``run_demo``, ``run_export``.

Each checks its output path before any model work, writes ``run_config.json`` (the resolved config, which
``interp-steer CMD --config run_config.json`` runs again) beside its outputs, and never touches a file it
did not write. The CLI (cli.py) only parses into these configs.
"""

from __future__ import annotations

import dataclasses
import platform
import time
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import torch
from transformer_lens.model_bridge import TransformerBridge
from transformers import PreTrainedTokenizerBase

from .. import progress as command_progress
from ..comparison.report import demo_index, iso_table_markdown, write_outputs
from ..comparison.sweep import BuildContext, Method, SweepData, build_method, run_sweep, training_record
from ..config import (
    ConfigError,
    DemoRun,
    EvalRun,
    ExportRun,
    StudyRun,
    SweepConfig,
    TrainConfig,
    TrainRun,
    run_config_doc,
)
from ..evaluation.concepts import Concept, every_kth, get_concept
from ..evaluation.evaluate import coherence_reference, load_neutral_texts
from ..method.data import ContrastivePair, check_pairs, load_pairs_file, pair_batches, persona_pairs, select_pairs
from ..method.models import (
    DEFAULT_MODEL,
    check_model_source,
    load_model,
    model_device,
    resolve_device,
    resolve_dtype,
)
from ..method.prefix import reuse_prefix
from ..method.states import capture
from ..names import resid_post, site_layer
from ..registry import get_method
from ..storage.exports import export, get_export
from ..storage.io import (
    RUN_CONFIG_FILE,
    SteeringArtifact,
    check_dir_target,
    check_out_name,
    check_run_dir,
    load_artifact,
    prepare_run_dir,
    seal_run_dir,
    write_json_atomic,
    write_text_atomic,
)
from ..storage.ownership import claim
from ..training import distributed
from ..training.coherence_text import kl_text
from ..training.loop import TrainResult, train

ARTIFACT_DIR = "adapter"  # the demo's artifact, inside its run directory


def load_pairs(tokenizer: PreTrainedTokenizerBase, pairs: str | None = None,
               personas: Sequence[str] | None = None, concept: str = "honesty",
               data_dir: str | None = None) -> list[ContrastivePair]:
    """The pairs of a run: a pairs file, persona × suffix pairs for two personas, or the concept's own pairs."""
    if pairs:
        out = load_pairs_file(pairs)
        check_pairs(out, tokenizer)
        return out
    if personas:
        return persona_pairs(tokenizer, personas=(personas[0], personas[1]))
    return get_concept(concept, data_dir).pairs(tokenizer)


def data_source(model: str | None, pairs: str | None, personas: Sequence[str] | None, concept: str) -> dict:
    """What the artifact records about where its pairs (and model) came from, so eval can rebuild them."""
    return {"model": model, "pairs": str(Path(pairs).resolve()) if pairs else None,
            "personas": list(personas) if personas else None, "concept": concept}


def check_device(cfg: TrainRun | EvalRun | DemoRun | StudyRun) -> None:
    """Refuse a device this machine lacks, a dtype it cannot run, or a model path that holds no model, before
    anything is written or loaded."""
    resolve_dtype(cfg.dtype, resolve_device(cfg.device))
    for model in getattr(cfg, "models", None) or (cfg.model,):
        check_model_source(model)


def check_outside(out: str | Path, artifact: str | Path, option: str = "--out") -> None:
    """Refuse an output directory equal to or inside the artifact it reads (it would write into the artifact)."""
    o, a = Path(out).resolve(), Path(artifact).resolve()
    if o == a or a in o.parents:
        raise ConfigError(f"{option} {out} is inside the artifact {artifact}; an artifact is never written into. "
                          "Choose an output directory outside it.")


def model_for(artifact: SteeringArtifact, model: str | None, where: str) -> str | None:
    """The model to load for ``artifact``: the one the user names. What the artifact records is compared,
    never followed: an artifact does not choose what is downloaded or run."""
    recorded = artifact.data.get("model")
    if model is None and recorded not in (None, DEFAULT_MODEL):
        raise ConfigError(f"{where} was trained on model {recorded!r}; interp-steer does not load a model because "
                          f"an artifact names it. Pass --model {recorded} (or the directory holding it) if you "
                          "trust that source.")
    return model


def pairs_for(artifact: SteeringArtifact, pairs_file: str | None, personas: Sequence[str] | None, where: str
              ) -> tuple[str | None, Sequence[str] | None]:
    """The pairs source for ``artifact``'s baselines: what the user gives, else the recorded personas (strings,
    not a file); a recorded pairs file is never opened because the artifact names it."""
    recorded = artifact.data
    if pairs_file is None and personas is None:
        if recorded.get("pairs"):
            raise ConfigError(f"{where} was trained on the pairs file {recorded['pairs']!r}; interp-steer does "
                              "not "
                              "read a file because an artifact names it. Pass --pairs FILE to rebuild its "
                              "training pairs.")
        personas = recorded.get("personas")
    return pairs_file, personas


def run_train(cfg: TrainRun, progress: bool = True) -> TrainResult:
    """Train and write the artifact. Under ``torchrun --nproc_per_node N`` the N processes train data-parallel
    (training/loop.py): each joins the process group here, and rank 0 alone writes and prints."""
    check_device(cfg)
    # an unknown name fails before minutes of work, and so does a bad output path
    get_concept(cfg.concept, cfg.data_dir)
    check_dir_target(cfg.out, cfg.overwrite, siblings=(".ckpt",))
    with distributed.joined() as world:
        t0 = time.perf_counter()
        bridge, tok = load_model(cfg.model, distributed.process_device(cfg.device, world), cfg.dtype)
        pairs = load_pairs(tok, cfg.pairs, cfg.personas, cfg.concept, cfg.data_dir)
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
        for k in ("loss", "obj", "coh", "mono", "dnll", "win") if k in first),
        f"held-out projection on d_steer at {result.loss_hook} (pair separation scale "
        f"{result.metrics['scale']:.2f});"
        " dNLL: on the held-out pair prompts (not a coherence measure: see `interp-steer eval`):",
        f"  {'c':>5} {'chosen':>9} {'rejected':>9} {'separation':>10} {'shift':>8} {'dNLL':>8}"]
    for c, m in result.metrics["held_out"].items():
        lines.append(f"  {c:>5} {m['proj_chosen']:9.2f} {m['proj_rejected']:9.2f} {m['separation']:10.2f} "
                     f"{m['shift']:8.2f} {m['dnll']:8.4f}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ sweeps

def build_methods(bridge: TransformerBridge, names: Sequence[str], artifacts: dict[str, SteeringArtifact],
                  hs: dict, batches, concept: Concept, tokenizer: PreTrainedTokenizerBase | None = None,
                  pairs: Sequence[ContrastivePair] | None = None, generic=None) -> list[Method]:
    """Every requested method, each built by its registry entry (registry.py) from the same context: the
    artifacts (``"adapter"`` gives one method per artifact, labelled e.g. ``adapter@1`` for a training seed),
    the training pairs' c = 0 states ``hs`` at the resid_post of the adapted layers, their batches, the concept;
    a method that trains (``learned_vector``) also needs the tokenizer and the pairs before their split."""
    ctx = BuildContext(bridge, artifacts, hs, batches, concept, tokenizer, list(pairs) if pairs else None, generic)
    return [m for name in names for m in build_method(get_method(name), ctx)]


def training_pairs(tok: PreTrainedTokenizerBase, artifact: SteeringArtifact, concept: Concept,
                   pairs_file: str | None = None, personas: Sequence[str] | None = None) -> list[ContrastivePair]:
    """The pairs the artifact was trained from, before its split (``pairs_for``: what the user gives, else the
    recorded personas or the concept's pairs)."""
    pairs_file, personas = pairs_for(artifact, pairs_file, personas, "the artifact")
    if pairs_file or personas:
        return load_pairs(tok, pairs_file, personas, concept.name)
    return concept.pairs(tok)


def training_batches(tok: PreTrainedTokenizerBase, artifact: SteeringArtifact, concept: Concept,
                     pairs_file: str | None = None, personas: Sequence[str] | None = None,
                     device: torch.device | str | None = None,
                     pairs: Sequence[ContrastivePair] | None = None) -> list:
    """The artifact's own training pairs (``training_pairs`` unless given), split and batched as in training."""
    tc = artifact.config
    pairs = training_pairs(tok, artifact, concept, pairs_file, personas) if pairs is None else pairs
    train_pairs, _ = select_pairs(pairs, tc.n_pairs, tc.held_out, tc.seed)
    return list(pair_batches(train_pairs, tok, tc.batch_pairs, device=device))


def adapted_blocks(artifact: SteeringArtifact) -> list[int]:
    """Every adapted block, once each, in order."""
    return sorted({site_layer(a.site) for a in artifact.adapters})


def adapted_resid_names(artifact: SteeringArtifact) -> list[str]:
    """``resid_post`` of every adapted block: where the additive baselines act."""
    return [resid_post(L) for L in adapted_blocks(artifact)]


def method_blocks(names: Sequence[str], artifacts: dict[str, SteeringArtifact]) -> dict[str, list[int]]:
    """The blocks each method's row acts at (``build_methods``' rows, by name)."""
    first = next(iter(artifacts.values()))
    out: dict[str, list[int]] = {}
    for name in names:
        if name == "adapter":
            out.update({label: adapted_blocks(a) for label, a in artifacts.items()})
        else:
            out[name] = [] if name == "prompting" else adapted_blocks(first)
    return out


def sweep_report(bridge: TransformerBridge, tok: PreTrainedTokenizerBase, cfg: SweepConfig, concept: Concept,
                 artifacts: dict[str, SteeringArtifact], hs: dict, batches, extra: dict,
                 pairs: Sequence[ContrastivePair] | None = None, generic=None) -> dict:
    """Sweep every method of ``cfg`` at the same coherence budget on ``concept``'s effects; a JSON-ready report."""
    effects = concept.effects(cfg.n_items, cfg.n_secondary)
    texts = every_kth(load_neutral_texts(), cfg.n_neutral)
    blocks = method_blocks(cfg.methods, artifacts)
    # every method but prompting acts at these blocks or later: blocks below run once per text and item
    start = min((min(b) for b in blocks.values() if b), default=0)
    t = time.perf_counter()  # built first: a method that trains (learned_vector) runs its own prefix reuse
    methods = build_methods(bridge, cfg.methods, artifacts, hs, batches, concept, tok, pairs, generic)
    build_s = time.perf_counter() - t
    trained = {m.name: m.trained for m in methods if m.trained is not None}
    if trained:  # a method trained while it was built (learned_vector): its run beside the adapters'
        extra = {**extra, "train": {**extra.get("train", {}),
                                    "runs": {**extra.get("train", {}).get("runs", {}), **trained}}}
    with reuse_prefix(bridge, start) as prefix:
        data = SweepData(effects, coherence_reference(bridge, tok, texts), budget=cfg.budget,
                         budget_metric=cfg.budget_metric, bisect_iters=cfg.bisect, grid=cfg.grid, verbose=True,
                         ends=concept.ends)
        results = run_sweep(bridge, tok, methods, data)
    zero = results[0].points[[p.coeff for p in results[0].points].index(0.0)] if results else None
    return {
        "concept": concept.name, "budget": cfg.budget, "budget_metric": cfg.budget_metric,
        "effects": [{"name": e.name, "unit": e.unit} for e in effects],
        "data": {"items": {k: len(v) for k, v in zero.items.items()} if zero else {}, "neutral_texts": len(texts)},
        "machine": {"platform": platform.platform(), "torch_threads": torch.get_num_threads()},
        "timings_s": {"build_methods": build_s, **{r.name: r.seconds for r in results}},
        "iso_table": {r.name: r.iso for r in results},
        # where each row acts: an adapter at its artifact's blocks, an additive vector at the first artifact's
        # (their resid_post), prompting nowhere; rows are only a fair comparison at the same blocks
        "blocks": blocks,
        "prefix_reuse": {"start_block": start, "reused": prefix.reused, "full": prefix.full + prefix.filled},
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


# Seconds per unit on 2 CPU cores with SmolLM2-135M (CONTRIBUTING, "Demo"): only the bar's first guesses; the
# ETA soon uses the times observed, kind by kind (progress.py)
PRIOR_S = {"step": 7.0, "capture": 1.3, "kl_text": 15.0, "probe": 1.4}


def planned_units(concept: Concept, n_pairs: int, seeds: Sequence[int], train_cfg: TrainConfig,
                  sweep_cfg: SweepConfig, prefix: str = "") -> tuple[dict[str, float], dict[str, float]]:
    """``(counts, prior seconds)`` of the units ``concept_report`` ticks (progress.py): per seed its training
    steps and reference captures; per method its budget probes and effect points (both directions), c = 0 and
    prompting on the whole model."""
    effects = concept.effects(sweep_cfg.n_items, sweep_cfg.n_secondary)
    primary = effects[0].name
    n_train = max(1, round(min(n_pairs, train_cfg.n_pairs or n_pairs) * (1 - train_cfg.held_out)))
    trained = len(seeds) + sum(get_method(m).trains for m in sweep_cfg.methods)  # the adapters, learned methods
    counts: dict[str, float] = {"step": trained * train_cfg.steps,
                                "capture": trained * -(-n_train // train_cfg.batch_pairs)}
    point, full = f"point:{primary}", f"point_full:{primary}"
    counts[full] = 1 + 2 * ("prompting" in sweep_cfg.methods)
    hooked = sum(len(seeds) if m == "adapter" else 1 for m in sweep_cfg.methods if m != "prompting")
    counts["probe"] = hooked * 2 * (3 + sweep_cfg.bisect)
    counts[point] = hooked * 2 * (2 + len(sweep_cfg.grid))
    generated = sweep_cfg.n_secondary if any(e.name == "vader" for e in effects) else 0
    prior = {**PRIOR_S, point: 2.0 + 0.12 * sweep_cfg.n_items + 1.0 * generated}
    prior[full] = 2 * prior[point]
    return {prefix + k: float(v) for k, v in counts.items()}, {prefix + k: float(v) for k, v in prior.items()}


def merge_units(*plans: tuple[dict, dict]) -> tuple[dict, dict]:
    counts: dict[str, float] = {}
    prior: dict[str, float] = {}
    for c, p in plans:
        for k, v in c.items():
            counts[k] = counts.get(k, 0.0) + v
        prior.update(p)
    return counts, prior


def concept_report(bridge: TransformerBridge, tok: PreTrainedTokenizerBase, concept: Concept, seeds: Sequence[int],
                   train_cfg: TrainConfig, sweep_cfg: SweepConfig, out: Path, generic, model: str | None,
                   overwrite: bool = False) -> dict:
    """Train one adapter per seed (``out/adapter-s{seed}``), then sweep every method of ``sweep_cfg`` at equal
    coherence on ``concept``: the report (``write_outputs`` writes it). The additive baselines come from the
    first seed's training pairs; several seeds appear as ``adapter@seed`` rows."""
    t1 = time.perf_counter()
    pairs = concept.pairs(tok)
    artifacts, first, train_info = {}, None, {}
    for seed in seeds:
        tcfg = dataclasses.replace(train_cfg, seed=seed)
        result = train(bridge, tok, pairs, tcfg, out / f"{ARTIFACT_DIR}-s{seed}", overwrite=overwrite,
                       data=data_source(model, None, None, concept.name), generic=generic)
        label = "adapter" if len(seeds) == 1 else f"adapter@{seed}"
        artifacts[label] = result.artifact
        first = first or result
        # the loss parts of every step (a few kB): the training curve a cell report keeps
        train_info[label] = training_record(result)
    train_s = time.perf_counter() - t1
    return sweep_report(bridge, tok, sweep_cfg, concept, artifacts, first.reference_states, first.train_batches,
                        {"train": {"seconds": train_s, "loss_hook": first.loss_hook, "seeds": list(seeds),
                                   "runs": train_info, "config": train_cfg.to_dict()}}, pairs, generic)


def run_demo(cfg: DemoRun) -> dict:
    """Per concept: train one adapter per seed (``CONCEPT/adapter-s{seed}``), sweep every method at equal
    coherence and write ``CONCEPT/report.json``, ``REPORT.md`` and ``figures/``; then ``REPORT.md`` (every
    concept's table) and ``run_config.json`` in ``cfg.out``. Several seeds appear as ``adapter@seed`` rows and
    one ``adapter (k seeds)`` row with a t-interval over seeds."""
    distributed.single_process_only("demo")
    check_device(cfg)
    concepts = [get_concept(c, cfg.data_dir) for c in cfg.concepts]  # an unknown name fails before any work
    out = check_run_dir(cfg.out, cfg.overwrite)
    for c in concepts:
        for seed in cfg.seeds:
            check_dir_target(out / c.name / f"{ARTIFACT_DIR}-s{seed}", cfg.overwrite, siblings=(".ckpt",))
    t0 = time.perf_counter()
    bridge, tok = load_model(cfg.model, cfg.device, cfg.dtype)  # a model that fails to load has written nothing
    prepare_run_dir(out, cfg.overwrite)
    write_json_atomic(out / RUN_CONFIG_FILE, run_config_doc("demo", cfg))
    seal_run_dir(out)
    reports = {}
    counts, prior = merge_units(({"kl_text": 1}, {}), *(
        planned_units(c, len(c.pairs(tok)), cfg.seeds, cfg.train, cfg.sweep) for c in concepts))
    with command_progress.plan(counts, prior, "demo"):
        # the KL constraint's text depends on the model alone: one set for every concept and seed (~15 s each)
        generic = kl_text(bridge, tok, cfg.train)
        for concept in concepts:
            t1 = time.perf_counter()
            cdir = prepare_run_dir(out / concept.name, cfg.overwrite)
            report = concept_report(bridge, tok, concept, cfg.seeds, cfg.train, cfg.sweep, cdir, generic,
                                    cfg.model, cfg.overwrite)
            reports[concept.name] = _finish(report, cdir, t1)
            seal_run_dir(out)
    total = time.perf_counter() - t0
    write_text_atomic(out / "REPORT.md", demo_index(reports, total))
    seal_run_dir(out)
    print(f"\nwrote {out / 'REPORT.md'}\ndemo finished in {total:.0f}s")
    return reports


def run_eval(cfg: EvalRun) -> dict:
    """Sweep a saved artifact (and baselines built from its training pairs) at equal coherence, holding the claim
    on the output directory throughout: a second eval into it is refused at once."""
    with claim(check_out_name(cfg.out_dir)):
        return _run_eval(cfg)


def _run_eval(cfg: EvalRun) -> dict:
    distributed.single_process_only("eval")
    check_device(cfg)
    artifact = load_artifact(cfg.artifact)  # a bad artifact fails before the model loads; checked against it below
    recorded = artifact.data
    concept = get_concept(cfg.concept or recorded.get("concept") or "honesty", cfg.data_dir)
    check_outside(cfg.out_dir, cfg.artifact)
    out = check_run_dir(cfg.out_dir, cfg.overwrite)
    where = f"artifact {cfg.artifact}"
    model = model_for(artifact, cfg.model, where)
    pairs_for(artifact, cfg.pairs, cfg.personas, where)
    t0 = time.perf_counter()
    bridge, tok = load_model(model, cfg.device, cfg.dtype)
    artifact.check_model(bridge, where=where)
    artifact = artifact.to(model_device(bridge))
    prepare_run_dir(out, cfg.overwrite)
    write_json_atomic(out / RUN_CONFIG_FILE, run_config_doc("eval", cfg))
    seal_run_dir(out)  # an interrupted eval leaves a run directory --overwrite may replace
    pairs = training_pairs(tok, artifact, concept, cfg.pairs, cfg.personas)
    batches = training_batches(tok, artifact, concept, device=model_device(bridge), pairs=pairs)  # baselines' too
    names = adapted_resid_names(artifact)
    hs = capture(bridge, batches, names) if any(m != "adapter" for m in cfg.sweep.methods) else {}
    report = sweep_report(bridge, tok, cfg.sweep, concept, {"adapter": artifact}, hs, batches,
                          {"artifact": str(cfg.artifact)}, pairs)
    report = _finish(report, out, t0)
    seal_run_dir(out)
    return report


def run_export(cfg: ExportRun) -> Path:
    """Write the artifact's steer at ``cfg.coeff`` as ``cfg.format`` into ``cfg.out`` (``storage.exports.export``).

    The artifact, the format's own checks and the output path are checked before the model loads; the model is
    then checked against the artifact's weight fingerprints, so an export never bakes an adapter into weights it
    was not made for. The claim on ``cfg.out`` is held throughout: a second export into it is refused at once.
    """
    with claim(check_out_name(cfg.out)):
        return _run_export(cfg)


def _run_export(cfg: ExportRun) -> Path:
    artifact = load_artifact(cfg.artifact)
    check_outside(cfg.out, cfg.artifact)
    check_model_source(cfg.model)
    check_dir_target(cfg.out, cfg.overwrite, what="an export")
    where = f"artifact {cfg.artifact}"
    model = model_for(artifact, cfg.model, where)
    spec = get_export(cfg.format)  # type: ignore[arg-type]
    try:
        spec.check(artifact, cfg.method)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    if spec.needs_pairs:
        pairs_for(artifact, cfg.pairs, None, where)
    bridge, tok = load_model(model, device="cpu")  # exports are written from an exact float32 CPU copy
    artifact.check_model(bridge, where=where)
    concept = get_concept(artifact.data.get("concept") or "honesty", cfg.data_dir)
    pairs = training_pairs(tok, artifact, concept, cfg.pairs) if spec.needs_pairs else None
    manifest = {"artifact": str(cfg.artifact), "base_model": artifact.base_model,
                "run_config": run_config_doc("export", cfg)}
    out = export(artifact, bridge, tok, spec.name, cfg.coeff, cfg.out, overwrite=cfg.overwrite, manifest=manifest,
                 method=cfg.method, pairs=pairs)
    print(f"{cfg.format} export at c = {cfg.coeff:g} written to {out}")
    return out
