"""The training loop: c = +1 and c = −1 in one batch, against a reference computed once; checkpoints, resume.

Per step, for a batch of interleaved pairs (rows duplicated: first half at c = +1, second at c = −1)::

    hs_pi, logits = policy(batch; c)                       # adapters applied through hooks
    loss = steering_loss(hs_pi, hs_ref, c, d_steer, logp_pi, logp_ref, mask, cfg.loss)   # loss.py

``hs_ref`` (last-token states at the loss layer) and ``logp_ref`` (per-token log-probs) come from one
reference pass over the dataset at c = 0 (``method.states.reference_pass``); ``d_steer`` is frozen from it. What a
step optimises lives in ``objectives.py``; the KL constraint's generic text in ``coherence_text.py``; the behaviour
objective's continuations in ``behaviour.py``; which sites and hook a config names in ``sites.py``.

With ``objective="behaviour"`` the step reads behaviour instead of states: each pair's prompts continued by the
base model's own continuations of both (``Continuations``), and ``loss.behaviour_loss`` on their log-ratios.

Under ``torchrun`` (a process group exists, ``distributed.py``) each process takes its shard of every global batch
of ``batch_pairs`` pairs (and of every generic-text batch), computes the reference only for it, and every mean of
the loss is taken over the global batch; the gradients are summed over the processes, so each step is the
one-process step. Rank 0 alone writes checkpoints and the artifact; the others wait at a barrier.
"""

from __future__ import annotations

import hashlib
import json
import math
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge
from transformers import PreTrainedTokenizerBase

from .. import progress as command_progress
from ..config import TrainConfig
from ..evaluation.evaluate import evaluate_pairs
from ..method.adapter import AdapterSpec, check_sites, make_adapters
from ..method.data import (
    Batch,
    ContrastivePair,
    check_lengths,
    pair_batches,
    select_pairs,
)
from ..method.directions import dhs_svd_direction, mean_diff_direction, paired_diff
from ..method.loss import (
    Total,
)
from ..method.models import model_device
from ..method.prefix import first_block, reuse_prefix
from ..method.states import Reference, reference_pass
from ..names import resid_post, site_layer
from ..signals import Terminated
from ..storage.io import (
    CHECKPOINT_FILES,
    Checkpoint,
    SteeringArtifact,
    check_checkpoint,
    check_dir_target,
    checkpoint_identity,
    load_checkpoint,
    model_name,
    remove_checkpoint,
    resolve_dir,
    save_artifact,
    save_checkpoint,
)
from ..storage.ownership import claim
from . import distributed
from .behaviour import Continuations, continuations
from .coherence_text import (
    GenericText,
    kl_text,
)
from .distributed import World
from .objectives import BehaviourObjective, HeldOutCurve, KLConstraint, Objective, PairObjective
from .sites import adapter_specs, loss_hook


@dataclass
class TrainResult:
    artifact: SteeringArtifact
    reference_states: dict[str, Tensor] = field(default_factory=dict)  # c = 0, training rows, resid at adapters
    train_batches: list[Batch] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)
    timings: dict = field(default_factory=dict)

    @property
    def adapters(self) -> nn.ModuleList:
        return self.artifact.adapters

    @property
    def d_steer(self) -> Tensor:
        return self.artifact.d_steer

    @property
    def loss_hook(self) -> str:
        return self.artifact.loss_hook

    @property
    def metrics(self) -> dict:
        return self.artifact.metrics


class _DeferredInterrupt:
    """The first Ctrl-C or SIGTERM lets the running step finish (then the loop checkpoints and stops), so a
    checkpoint's step counter always matches its weights; a second one stops at once, keeping the last
    checkpoint. ``stop()`` raises what the signal means: ``KeyboardInterrupt`` or ``signals.Terminated``."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self.signum: int | None = None
        self._old: dict = {}

    def stop(self) -> None:
        raise Terminated if self.signum == signal.SIGTERM else KeyboardInterrupt

    def _handler(self, signum, frame):
        if self.requested:
            self.stop()
        self.requested, self.signum = True, signum
        name = "SIGTERM" if signum == signal.SIGTERM else "interrupt"
        tqdm.write(f"{name}: finishing this step and writing a checkpoint (send it again to stop at once)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handler) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)
        return False


def train(bridge: TransformerBridge, tokenizer: PreTrainedTokenizerBase, pairs: Sequence[ContrastivePair],
          cfg: TrainConfig = TrainConfig(), out_dir: str | Path | None = None, *, resume: bool = False,
          overwrite: bool = False, progress: bool = True, data: dict | None = None, run_config: dict | None = None,
          callback: Callable[[int, nn.ModuleList], None] | None = None, generic: GenericText | None = None
          ) -> TrainResult:
    """``_train`` holding the claim on ``out_dir`` (and its checkpoint) for the whole run: a second process
    training into the same path fails at once (``ownership.claim``)."""
    mine = out_dir is not None and distributed.current().main
    with claim(Path(out_dir)) if mine else nullcontext():  # type: ignore[arg-type]
        return _train(bridge, tokenizer, pairs, cfg, out_dir, resume=resume, overwrite=overwrite,
                      progress=progress, data=data, run_config=run_config, callback=callback, generic=generic)


# ------------------------------------------------------------------------------------------- objectives
#
# An objective owns the batches it needs and returns a step's loss and its parts (floats, for the history).


# ------------------------------------------------------------------------------------------- the run

@dataclass
class _Setup:
    """Everything the loop reads, built once before the first step (``_prepare``)."""

    specs: list[AdapterSpec]
    hook: str
    text_hook: str | None
    batches: list[Batch]
    test_batches: list[Batch]
    local: list[Batch]
    total: Total | None
    ref: Reference
    whole: Reference
    d_steer: Tensor
    scale: float
    align: dict | None
    cont: Continuations | None
    generic: GenericText | None
    timings: dict
    test_ref: list[Tensor] = field(default_factory=list)  # the held-out batches' states at the loss hook (curve)


@dataclass
class _Checkpoints:
    """Rank 0 writes ``out.ckpt`` every ``cfg.checkpoint_every`` steps and when stopped; every rank meets at a
    barrier after it, so a rank that raises later knows the checkpoint is whole."""

    path: Path | None
    world: World
    bridge: TransformerBridge
    cfg: TrainConfig
    data: dict | None
    identity: str
    run_config: dict | None

    def due(self, done: int, stop: bool) -> bool:
        every = self.cfg.checkpoint_every
        return self.path is not None and ((done % every == 0 and done < self.cfg.steps) or stop)

    def save(self, step: int, adapters, d_steer: Tensor, hook: str, opt, scale: float,
             duals: Sequence[float], curve: Sequence[dict] = ()) -> None:
        if self.world.main:
            art = SteeringArtifact.build(self.bridge, adapters, d_steer, hook, self.cfg,
                                         {"step": step, "curve": list(curve)}, self.data)
            save_checkpoint(self.path, Checkpoint(art, opt.state_dict(), step, scale, list(duals)),  # type: ignore[arg-type]
                            self.identity, self.run_config)
        if self.world.parallel:
            distributed.barrier()

    def diverged(self, parts: dict, step: int) -> FloatingPointError:
        last = resolve_dir(self.path, CHECKPOINT_FILES) if self.path is not None else None
        return FloatingPointError(
            f"loss is {parts['loss']} at step {step} ({parts}); training stopped. The last good checkpoint "
            f"is {last or 'none (no checkpoint yet)'}; lower --lr or --init-scale, or raise --w-coherence.")


def _train(bridge: TransformerBridge, tokenizer: PreTrainedTokenizerBase, pairs: Sequence[ContrastivePair],
           cfg: TrainConfig, out_dir: str | Path | None, *, resume: bool, overwrite: bool, progress: bool,
           data: dict | None, run_config: dict | None, callback: Callable[[int, nn.ModuleList], None] | None,
           generic: GenericText | None) -> TrainResult:
    """Train SVD rotation adapters on ``pairs``; write the artifact to ``out_dir`` and checkpoints to
    ``out_dir.ckpt`` (removed when the run completes).

    ``data`` records where the pairs came from (stored in the artifact); ``callback(step, adapters)`` runs
    after every optimiser step (e.g. to snapshot directions over training). ``generic``: the KL constraint's text,
    ``kl_text(bridge, tokenizer, cfg)`` computed once for several runs on one model (it depends on neither the
    pairs nor the seed); None: computed here when ``cfg.loss.kl_budget`` is set.

    Inside a process group (``torchrun``; ``distributed.joined``) every process calls this with the same
    arguments: each trains on its shard of every global batch of ``cfg.batch_pairs`` pairs, the steps are those
    of one process, rank 0 writes the files, and every process returns the same adapters and metrics.

    >>> result = train(bridge, tok, persona_pairs(tok), TrainConfig(steps=2))  # doctest: +SKIP
    """
    out = Path(out_dir) if out_dir is not None else None
    ckpt_path = out.with_name(out.name + ".ckpt") if out is not None else None
    identity = run_identity(cfg, model_name(bridge), pairs)
    if out is not None:  # a bad output path (or a checkpoint beside it of another run) is found now
        check_dir_target(out, overwrite, siblings=(".ckpt",))
        check_checkpoint(out, identity, overwrite, resume)
    torch.manual_seed(cfg.seed)
    world = distributed.current()
    progress = progress and world.main
    run = _prepare(bridge, tokenizer, pairs, cfg, world, progress, generic)
    adapters, opt, start, d_steer, scale, duals, points = _start(bridge, cfg, run, ckpt_path if resume else None, world,
                                                         identity)
    objective: Objective = (BehaviourObjective(run.cont, cfg) if run.cont is not None else
                            PairObjective(run.local, run.ref, run.hook, d_steer, scale, cfg, run.total))
    kl = KLConstraint(run.generic, d_steer, scale, cfg, duals, run.total) if run.generic is not None else None
    ckpt = _Checkpoints(ckpt_path, world, bridge, cfg, data, identity, run_config)
    timings = run.timings
    curve = HeldOutCurve(run.test_batches, run.test_ref, run.hook, d_steer, scale, cfg, list(points))
    if not run.test_ref:
        curve.cfg = cfg.replace(eval_every=0, patience=0)  # nothing held out (or a behaviour objective)

    history: list[dict] = []
    fwd_s = bwd_s = curve_s = 0.0
    stopped_at = None
    bar = tqdm(range(start, cfg.steps), desc="train", disable=not progress or command_progress.active(),
               initial=start, total=cfg.steps)
    # every pass of the loop hooks blocks >= first only: the residual entering it is computed once per batch
    first = first_block([*(sp.site for sp in run.specs), run.hook, *([run.text_hook] if run.text_hook else [])])
    with _DeferredInterrupt() as interrupt:  # held through the artifact's writing: a late SIGTERM still gets it
        with reuse_prefix(bridge, first) as prefix:
            for step in bar:
                t = time.perf_counter()
                loss, parts = objective.loss(step, bridge, adapters)
                if kl is not None:
                    loss = kl.add(step, bridge, adapters, loss, parts)
                t1 = time.perf_counter()
                if not math.isfinite(parts["loss"]):
                    raise ckpt.diverged(parts, step)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if world.parallel:  # each process holds its rows' part of the global loss's gradient
                    distributed.sum_gradients(adapters.parameters())
                torch.nn.utils.clip_grad_norm_(adapters.parameters(), cfg.grad_clip)
                opt.step()
                if kl is not None:
                    kl.update(parts)
                fwd_s += t1 - t
                bwd_s += time.perf_counter() - t1
                done = step + 1
                if curve.due(done):  # every process measures all of it: they agree on when to stop
                    t2 = time.perf_counter()
                    parts.update(held_out_obj=curve.measure(done, bridge, adapters)["held_out_obj"])
                    curve_s += time.perf_counter() - t2
                history.append({"step": step, **parts})
                if callback is not None:
                    callback(step, adapters)
                bar.set_postfix({k: f"{v:.3g}" for k, v in parts.items() if k != "loss"})
                command_progress.tick("step")
                # under torchrun every process gets the Ctrl-C, not necessarily in the same step: they agree first
                stop = distributed.any_rank(interrupt.requested) if world.parallel else interrupt.requested
                if ckpt.due(done, stop):
                    ckpt.save(done, adapters, d_steer, run.hook, opt, scale, kl.duals if kl else duals, curve.points)
                if stop:
                    tqdm.write(f"interrupted: checkpoint at {ckpt_path} (step {done}); rerun with --resume")
                    interrupt.stop()
                if curve.exhausted():
                    stopped_at = done
                    break
        n_steps = max(1, len(history))
        timings.update(policy_forward_s_per_step=fwd_s / n_steps, backward_s_per_step=bwd_s / n_steps,
                       train_s=fwd_s + bwd_s, held_out_curve_s=curve_s, prefix_reused=float(prefix.reused),
                       prefix_full=float(prefix.full + prefix.filled))
        result = _finish(bridge, cfg, run, adapters, d_steer, scale, history, out, overwrite, data, run_config,
                         world, identity, resumed=resume and start > 0, curve=curve.points,
                         steps_done=stopped_at or cfg.steps)
        if interrupt.requested:  # the signal came after the last step: the artifact is whole, then it stops
            tqdm.write(f"stopped after the last step; the artifact is written at {out}")
            interrupt.stop()
    return result


def _prepare(bridge: TransformerBridge, tokenizer: PreTrainedTokenizerBase, pairs: Sequence[ContrastivePair],
             cfg: TrainConfig, world: World, progress: bool, generic: GenericText | None) -> _Setup:
    """Split and batch the pairs, run the reference pass, freeze ``d_steer`` and its scale, pick aligned triplets,
    build the behaviour continuations and the KL text: everything checked before the first step."""
    train_pairs, test_pairs = select_pairs(pairs, cfg.n_pairs, cfg.held_out, cfg.seed)
    if not train_pairs:
        raise ValueError(f"no training pairs left (got {len(pairs)} pairs, held_out={cfg.held_out})")
    check_lengths(train_pairs + test_pairs, tokenizer, bridge.cfg.n_ctx)
    n_layers = bridge.cfg.n_layers
    specs = adapter_specs(cfg, n_layers)
    check_sites(bridge, [s.site for s in specs])  # a site this architecture lacks fails before any pass
    hook = loss_hook(cfg, n_layers)
    if world.parallel and cfg.loss.objective == "behaviour":
        raise ValueError("objective 'behaviour' runs in one process only (its continuation batches are not "
                         "sharded "
                         "yet); run it without torchrun, or use objective 'shift'")
    if world.parallel and cfg.loss.w_text_shift > 0:
        raise ValueError("w_text_shift runs in one process only (the generic text's states are not sharded yet); "
                         "run it without torchrun, or set w_text_shift 0")
    text_hook = hook if cfg.loss.w_text_shift > 0 else None
    dev = model_device(bridge)
    batches = list(pair_batches(train_pairs, tokenizer, cfg.batch_pairs, device=dev))
    test_batches = list(pair_batches(test_pairs, tokenizer, cfg.batch_pairs * 2, device=dev)) if test_pairs else []
    timings: dict[str, float] = {}
    local, total = batches, None  # this process's rows of each batch; how the loss sums over processes
    if world.parallel:
        distributed.check_same_data(batches, cfg)
        distributed.check_shards(len(train_pairs), cfg.batch_pairs, world)
        local, total = [distributed.pair_shard(b, world) for b in batches], distributed.global_sum

    t0 = time.perf_counter()
    # the residual stream at each adapted layer comes free with the reference pass: baselines reuse it
    resid = [resid_post(site_layer(s.site)) for s in specs]
    ref = reference_pass(bridge, local, hook, progress and not command_progress.active(), extra=resid)
    whole = distributed.whole_reference(ref, local, [len(b) // 2 for b in batches],
                                        world) if world.parallel else ref
    timings["reference_s"] = time.perf_counter() - t0
    # the direction's float64 SVD on the CPU (MPS has no float64), then d_steer lives on the model's device
    d_steer = dhs_svd_direction(torch.cat(whole.hs).cpu()).to(dev)
    scale = pair_scale(whole, d_steer)
    if not scale > 0:  # 0 (or NaN): the objective's unit would divide by it and the first step would be NaN
        raise ValueError(f"the chosen and rejected prompts have the same last-token states at {hook}: nothing to "
                         "steer along. Do the pairs differ inside what the last token can attend to (a sliding "
                         "attention window, a context limit)?")
    align = _aligned(specs, whole) if cfg.triplets == "aligned" else None

    cont = None
    if cfg.loss.objective == "behaviour":
        t = time.perf_counter()
        cont = continuations(bridge, tokenizer, train_pairs, cfg.batch_pairs, cfg.loss.continuation_tokens,
                             progress=progress)
        timings["continuations_s"] = time.perf_counter() - t

    if cfg.loss.kl_budget is None:
        generic = None
    elif generic is not None:
        _check_generic(generic, cfg, text_hook, world)
    else:
        t = time.perf_counter()
        generic = kl_text(bridge, tokenizer, cfg, world)
        timings["generic_text_s"] = time.perf_counter() - t
    test_ref = []
    if cfg.eval_every > 0 and test_batches and cfg.loss.objective != "behaviour":
        t = time.perf_counter()
        test_ref = reference_pass(bridge, test_batches, hook, states_only=True).hs
        timings["held_out_reference_s"] = time.perf_counter() - t
    return _Setup(specs, hook, text_hook, batches, test_batches, local, total, ref, whole, d_steer, scale, align,
                  cont, generic, timings, test_ref)


def _aligned(specs: Sequence[AdapterSpec], whole: Reference) -> dict[str, Tensor]:
    """Each site's alignment direction: the pairs' mean difference at its block's resid_post."""
    align = {}
    for s in specs:
        states = whole.extra[resid_post(site_layer(s.site))]
        if paired_diff(states).abs().max() == 0:
            raise ValueError(
                f"the pairs' last-token states do not differ at {resid_post(site_layer(s.site))} (is the "
                "difference "
                f"outside a sliding attention window there?): aligned triplets have nothing to align {s.site} "
                "with; adapt later blocks, or pass triplets='top' (--triplets top)")
        align[s.site] = mean_diff_direction(states)
    return align


def _check_generic(generic: GenericText, cfg: TrainConfig, text_hook: str | None, world: World) -> None:
    """A caller's precomputed KL text must be what this run would compute."""
    if world.parallel:
        raise ValueError("pass no precomputed generic text under torchrun: each process keeps its own shard")
    if any(b is None or len(b) > cfg.kl_batch for b in generic.batches) or not generic.batches:
        raise ValueError(f"the precomputed generic text does not fit kl_batch={cfg.kl_batch}: compute it with "
                         "kl_text(bridge, tokenizer, cfg)")
    if (generic.sample_seed is not None) != cfg.kl_sample:
        raise ValueError("the precomputed generic text is "
                         f"{'sampled' if generic.sample_seed is not None else 'greedy'}"
                         f" but cfg.kl_sample is {cfg.kl_sample}: compute it with kl_text(bridge, tokenizer, cfg)")
    if generic.hook != text_hook:
        raise ValueError(f"the precomputed generic text keeps states at {generic.hook} but this run's text shift "
                         f"needs {text_hook}: compute it with kl_text(bridge, tokenizer, cfg)")


def run_identity(cfg: TrainConfig, model: str, pairs: Sequence[ContrastivePair]) -> str:
    """Which run a checkpoint or artifact belongs to: the SHA-256 of its TrainConfig, its model's name and its
    pairs. A checkpoint is replaced or removed only by the run of its identity (``io.check_checkpoint``)."""
    doc = {"train_config": cfg.to_dict(), "model": model, "pairs": [[p.chosen, p.rejected] for p in pairs]}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, ensure_ascii=True).encode()).hexdigest()


def _start(bridge: TransformerBridge, cfg: TrainConfig, run: _Setup, ckpt_path: Path | None, world: World,
           identity: str):
    """Fresh adapters and optimiser, or those of the checkpoint at ``ckpt_path`` (``--resume``): ``(adapters,
    optimiser, first step, d_steer, scale, duals, the held-out curve so far)``, the same in every process."""
    adapters = make_adapters(bridge, run.specs, seed=cfg.seed, init_scale=cfg.init_scale, align=run.align)
    opt = torch.optim.AdamW(adapters.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start, d_steer, scale, duals, points = 0, run.d_steer, run.scale, [0.0, 0.0], []
    found = load_checkpoint(ckpt_path, bridge) if ckpt_path is not None else None
    if found is not None:
        if found.artifact.config != cfg:
            raise ValueError(f"checkpoint {ckpt_path} was written with a different TrainConfig; resume with the "
                             "same config, or start a new output directory")
        written = checkpoint_identity(resolve_dir(ckpt_path, CHECKPOINT_FILES) or ckpt_path, ckpt_path.name)
        if written not in (None, identity):
            raise ValueError(f"checkpoint {ckpt_path} was written from other pairs or another model (same "
                             "TrainConfig); resume with the same pairs and model, or start a new output directory")
        adapters, d_steer, scale, start = found.artifact.adapters, found.artifact.d_steer, found.scale, found.step
        duals = list(found.duals) or duals
        points = list(found.artifact.metrics.get("curve", []))
        opt = torch.optim.AdamW(adapters.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        opt.load_state_dict(found.optimizer)
    if world.parallel:
        distributed.check_same_start(adapters, d_steer, [float(start), scale, *duals], ckpt_path)
    return adapters, opt, start, d_steer, scale, duals, points


def _finish(bridge: TransformerBridge, cfg: TrainConfig, run: _Setup, adapters, d_steer: Tensor, scale: float,
            history: list[dict], out: Path | None, overwrite: bool, data: dict | None, run_config: dict | None,
            world: World, identity: str, resumed: bool, curve: Sequence[dict] = (),
            steps_done: int | None = None) -> TrainResult:
    """Held-out metrics, the artifact (written by rank 0, the checkpoint then removed), the result."""
    t = time.perf_counter()
    # small (held-out pairs, forward only): every process runs all of it and returns the same metrics
    held_out = (evaluate_pairs(bridge, adapters, run.test_batches, run.hook, d_steer, cfg.eval_coeffs)
                if run.test_batches else {})
    run.timings["held_out_eval_s"] = time.perf_counter() - t
    metrics = {"held_out": held_out, "scale": scale, "timings": run.timings,
               "final": history[-1] if history else {}, "steps_done": steps_done or cfg.steps,
               "stopped_early": steps_done is not None and steps_done < cfg.steps, "curve": list(curve)}
    artifact = SteeringArtifact.build(bridge, adapters, d_steer, run.hook, cfg, metrics, data)
    if out is not None:
        if world.main:
            save_artifact(out, artifact, overwrite=overwrite, run_config=run_config, identity=identity)
            remove_checkpoint(out.with_name(out.name + ".ckpt"), identity, resumed, overwrite)
        if world.parallel:
            distributed.barrier()
    return TrainResult(artifact, run.whole.extra, run.batches, history, run.timings)


def pair_scale(ref: Reference, d_steer: Tensor) -> float:
    """RMS of the reference pairs' separation along ``d_steer``: the objective's unit."""
    hs = torch.cat(ref.hs).float()
    return ((hs[0::2] - hs[1::2]) @ d_steer).pow(2).mean().sqrt().item()
