"""The training loop: c = +1 and c = −1 in one batch, against a reference computed once; checkpoints, resume.

Per step, for a batch of interleaved pairs (rows duplicated: first half at c = +1, second at c = −1)::

    hs_pi, logits = policy(batch; c)                       # adapters applied through hooks
    loss = steering_loss(hs_pi, hs_ref, c, d_steer, logp_pi, logp_ref, mask, cfg.loss)   # loss.py

``hs_ref`` (last-token states at the loss layer) and ``logp_ref`` (per-token log-probs) come from one
reference pass over the dataset at c = 0 (``capture.reference_pass``); ``d_steer`` is frozen from it.

With ``objective="behaviour"`` the step reads behaviour instead of states: each pair's prompts continued by the
base model's own continuations of both (``Continuations``), and ``loss.behaviour_loss`` on their log-ratios.

Under ``torchrun`` (a process group exists, ``training/distributed.py``) each process takes its shard of every global
batch of ``batch_pairs`` pairs (and of every generic-text batch), computes the reference only for it, and every
mean of the loss is taken over the global batch; the gradients are summed over the processes, so each step is
the one-process step. Rank 0 alone writes checkpoints and the artifact; the others wait at a barrier.
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
from typing import Callable, Protocol, Sequence

import torch
from jaxtyping import Float
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge
from transformers import PreTrainedTokenizerBase

from .. import progress as command_progress
from ..config import TrainConfig
from ..evaluation.evaluate import evaluate_pairs, generate_ids, greedy_continuations, reply_batch
from ..method.adapter import AdapterSpec, apply_adapters, check_sites, make_adapters
from ..method.data import (
    Batch,
    ContrastivePair,
    check_lengths,
    interleave,
    last_index,
    load_json,
    pair_batches,
    render_chat,
    select_pairs,
)
from ..method.directions import dhs_svd_direction, mean_diff_direction, paired_diff
from ..method.loss import (
    Total,
    behaviour_loss,
    dual_step,
    kl_lagrangian,
    shift_objective,
    steering_loss,
    token_kl,
    token_logprobs,
    token_mask,
)
from ..method.models import model_device
from ..method.prefix import first_block, reuse_prefix
from ..method.states import Reference, forward_last, packing, reference_pass
from ..names import resid_post, site_layer, site_name
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
from .distributed import World


def resolve_layer(v: int | float, n_layers: int) -> int:
    """A block index from an index or a depth fraction in (0, 1) (``round(v · (n_layers − 1))``)."""
    L = round(v * (n_layers - 1)) if isinstance(v, float) else v
    if not 0 <= L < n_layers:
        raise ValueError(f"layer {v!r} -> {L} is outside this model's {n_layers} blocks")
    return L


def loss_hook(cfg: TrainConfig, n_layers: int) -> str:
    """``blocks.{loss_layer}.hook_resid_post``: where the objective is measured."""
    return resid_post(resolve_layer(cfg.loss_layer, n_layers))


def adapter_specs(cfg: TrainConfig, n_layers: int) -> list[AdapterSpec]:
    """One spec per adapted block (sorted, deduplicated); every one must come before the loss layer."""
    layers = sorted({resolve_layer(v, n_layers) for v in cfg.layers})
    last = resolve_layer(cfg.loss_layer, n_layers)
    if layers[-1] > last:
        raise ValueError(f"adapted layer {layers[-1]} is after the loss layer {last}: it cannot move it")
    return [AdapterSpec(site_name(L, cfg.site), cfg.rank, cfg.scale, cfg.rotate_u, cfg.bias) for L in layers]


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


KL_SAMPLE_SEED = 0  # sampled KL text: one fixed draw, so every run (seed, concept) on a model shares it


@dataclass
class GenericText:
    """Where the KL constraint is measured in training: the base model's own replies to generic requests
    (``datasets/coherence_prompts.json``, disjoint from every evaluation text; greedy, or sampled with
    ``cfg.kl_sample``), and the reference's next-token log-probs at the positions that predict reply tokens,
    cached once (float16: 0.1 MB per token)."""

    batches: list[Batch | None]  # None: this process has no row of that batch (more processes than its texts)
    masks: list[Float[Tensor, "_batch _pos_1"]]
    ref_logp: list[Float[Tensor, "_tok vocab"]]
    sample_seed: int | None = None  # None: greedy replies
    # with LossConfig.w_text_shift: where the text's shift is read, and the reference there
    hook: str | None = None
    ref_hs: list[Float[Tensor, "_tok d_model"]] = field(default_factory=list)


@torch.no_grad()
def generic_text(bridge: TransformerBridge, tokenizer: PreTrainedTokenizerBase, n_texts: int, batch_size: int,
                 max_new_tokens: int = 32, world: World = World(), sample_seed: int | None = None,
                 hook: str | None = None) -> GenericText:
    """The texts, batched by ``batch_size``: one greedy reply to each of the first ``n_texts`` prompts, or, with
    ``sample_seed``, ``n_texts`` replies sampled at temperature 1, the prompts taken in turn (so each is answered
    several times when ``n_texts`` exceeds them). With several processes, rank 0 writes the replies (one set of
    texts everywhere) and each process keeps, and scores, its shard of every batch (possibly none of a small one).
    ``hook``: also keep the reference's states there at the positions that predict reply tokens (``text_shift``)."""
    if hook is not None and world.parallel:
        raise ValueError("the generic text's shift (w_text_shift) is not sharded across processes yet: "
                         "train it in one process")
    prompts = load_json("coherence_prompts.json")["prompts"]
    prompts = prompts[:n_texts] if sample_seed is None else [prompts[i % len(prompts)] for i in range(n_texts)]
    replies = greedy_continuations(bridge, tokenizer, None, prompts, max_new_tokens=max_new_tokens,
                                   seed=sample_seed) if world.main else None
    if world.parallel:
        replies = distributed.broadcast(replies)
    heads, texts = [], []
    for p, r in zip(prompts, replies):
        head = render_chat(tokenizer, p)
        try:
            reply_batch(tokenizer, [head], [r])  # a reply must tokenize on its own boundary to be scored
        except ValueError:
            continue
        heads.append(head)
        texts.append(r)
    if not texts:
        raise ValueError("no usable generic text for the KL constraint (every base-model reply was empty)")
    out = GenericText([], [], [], sample_seed, hook)
    for i in range(0, len(texts), batch_size):
        batch, mask = reply_batch(tokenizer, heads[i: i + batch_size], texts[i: i + batch_size],
                                  model_device(bridge))
        if world.parallel:
            lo, hi = world.bounds(len(batch))
            if lo == hi:  # fewer texts than processes: this one adds nothing to this batch's KL sums
                out.batches.append(None)
                out.masks.append(mask[:0])
                out.ref_logp.append(torch.zeros(0, 0, dtype=torch.float16))
                continue
            batch, cols = distributed.take_rows(batch, lo, hi)
            mask = mask[lo:hi, cols.start: cols.stop - 1]  # pos_1 column j predicts token j + 1
        logits, hs = _generic_forward(bridge, batch, hook)
        out.batches.append(batch)
        out.masks.append(mask)
        out.ref_logp.append(logits[:, :-1][mask.bool()].float().log_softmax(-1).half())
        if hs is not None:
            out.ref_hs.append(hs[:, :-1][mask.bool()].float())
    return out


def kl_text(bridge: TransformerBridge, tokenizer: PreTrainedTokenizerBase, cfg: TrainConfig, world: World = World()
            ) -> GenericText | None:
    """The generic text ``cfg`` trains its KL constraint (and text shift) on: None without ``loss.kl_budget``;
    sampled with ``kl_sample``; with the loss hook's reference states when ``loss.w_text_shift`` > 0."""
    if cfg.loss.kl_budget is None:
        return None
    hook = loss_hook(cfg, bridge.cfg.n_layers) if cfg.loss.w_text_shift > 0 else None
    text = generic_text(bridge, tokenizer, cfg.kl_texts, cfg.kl_batch, world=world,
                        sample_seed=KL_SAMPLE_SEED if cfg.kl_sample else None, hook=hook)
    command_progress.tick("kl_text")
    return text


def _generic_forward(bridge: TransformerBridge, batch: Batch, hook: str | None
                     ) -> tuple[Float[Tensor, "batch pos vocab"], Float[Tensor, "batch pos d_model"] | None]:
    """Logits, and the states at ``hook`` (every position) when it is given."""
    kw = dict(attention_mask=batch.attention_mask, position_ids=batch.position_ids)
    if hook is None:
        return bridge(batch.input_ids, **kw), None
    store: dict[str, Tensor] = {}
    logits = bridge.run_with_hooks(batch.input_ids, fwd_hooks=[(hook, lambda act, hook: store.update(hs=act))],
                                   **kw)
    return logits, store["hs"]


def kl_both_ways(bridge: TransformerBridge, adapters, text: GenericText, j: int, total: Total | None = None
                 ) -> tuple[Tensor, Tensor, Float[Tensor, "_tok2 d_model"] | None]:
    """Mean per-token KL(reference ‖ steered) on generic batch ``j`` at c = +1 and at c = −1 (one forward);
    with ``total``, over every process's share of the batch. Third: the states at ``text.hook`` at the n reply
    positions at c = +1, then the n at c = −1 (None without a hook)."""
    if total is None:
        kl, n, hs = _kl_rows(bridge, adapters, text, j)
        return kl[:n].mean(), kl[n:].mean(), hs
    if text.batches[j] is None:  # none of this batch's texts here: zeros to the sums, nothing to differentiate
        plus = minus = torch.zeros(())
        n = 0
    else:
        kl, n, _ = _kl_rows(bridge, adapters, text, j)
        plus, minus = kl[:n].sum(), kl[n:].sum()
    count = total(torch.tensor(float(n)))  # the same collectives, in the same order, in every process
    return total(plus) / count, total(minus) / count, None


def text_shift(hs: Float[Tensor, "tok2 d_model"], ref_hs: Float[Tensor, "tok d_model"],
               d: Float[Tensor, " d_model"], scale: float, balance: bool = False) -> Float[Tensor, ""]:
    """The shift objective on the generic text's n reply positions (``hs``: the n at c = +1, then the n at c = −1):
    mean over positions of c · (hs(c) − hs_ref)·d / scale (``loss.shift_objective``), i.e. steering text that
    carries no persona, like the evaluation's, rather than only the pair prompts."""
    n = len(ref_hs)
    c = torch.cat([hs.new_ones(n), -hs.new_ones(n)])
    return shift_objective(hs, torch.cat([ref_hs, ref_hs]), c, d, scale, None, balance)


def _kl_rows(bridge: TransformerBridge, adapters, text: GenericText, j: int
             ) -> tuple[Float[Tensor, " tok"], int, Float[Tensor, "tok d_model"] | None]:
    """Per-token KL of generic batch ``j``: the n tokens at c = +1, then the n at c = −1 (and the states)."""
    batch, c = text.batches[j].doubled()
    with apply_adapters(bridge, adapters, c):
        logits, hs = _generic_forward(bridge, batch, text.hook)
    mask = text.masks[j].bool()
    both = torch.cat([mask, mask])
    n = int(mask.sum())
    logp = logits[:, :-1][both].float().log_softmax(-1)
    ref = text.ref_logp[j].float()
    return token_kl(torch.cat([ref, ref]), logp), n, (hs[:, :-1][both].float() if hs is not None else None)


@dataclass
class Continuations:
    """The behaviour objective's batches (``LossConfig.objective == "behaviour"``), built once before training.

    y_w and y_l are the base model's greedy continuations of a pair's chosen and rejected prompt. Each pair gives
    four rows: its rejected prompt + y_w, + y_l (scored at c = +1: the steer must move the rejected persona
    towards the chosen one's behaviour), then its chosen prompt + y_w, + y_l (c = −1). ``reply`` marks the
    positions that predict a continuation token, ``mask`` every real position; ``ref_logp`` is the reference's
    per-token log-prob (c = 0), computed once."""

    batches: list[Batch]
    c: list[Float[Tensor, " _rows"]]
    reply: list[Float[Tensor, "_rows _pos_1"]]
    mask: list[Float[Tensor, "_rows _pos_1"]]
    ref_logp: list[Float[Tensor, "_rows _pos_1"]]
    dropped: int  # pairs left out: an empty continuation, or the same continuation for both prompts


def _continuation_rows(heads: Sequence[list[int]], conts: Sequence[list[int]], pad_id: int,
                       device: torch.device) -> tuple[Batch, Tensor]:
    """Right-padded ``head + continuation`` token rows and the mask of positions predicting a continuation token."""
    n, width = len(heads), max(len(h) + len(y) for h, y in zip(heads, conts))
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    attn = torch.zeros(n, width, dtype=torch.long)
    reply = torch.zeros(n, width - 1)
    for r, (h, y) in enumerate(zip(heads, conts)):
        ids[r, : len(h) + len(y)] = torch.tensor(h + y)
        attn[r, : len(h) + len(y)] = 1
        reply[r, len(h) - 1: len(h) + len(y) - 1] = 1  # column j predicts token j + 1
    ids, attn = ids.to(device), attn.to(device)
    return Batch(ids, attn, last_index(attn)), reply.to(device)


@torch.no_grad()
def continuations(bridge: TransformerBridge, tokenizer: PreTrainedTokenizerBase, pairs: Sequence[ContrastivePair],
                  batch_pairs: int, n_tokens: int, gen_batch: int = 64, progress: bool = False) -> Continuations:
    """Greedy ``n_tokens``-token continuations of every pair prompt (base model, KV cache, ``gen_batch`` prompts
    a call), cut at the first end-of-sequence token, then the four rows per pair of ``Continuations`` in batches
    of ``batch_pairs`` pairs. Generating them takes minutes on a CPU: ``progress`` shows a bar."""
    dev = model_device(bridge)
    stop = {i for i in (tokenizer.eos_token_id, tokenizer.pad_token_id) if i is not None}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    texts = interleave(pairs)
    heads = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    conts = [row[: next((k for k, t in enumerate(row) if t in stop), len(row))]
             for row in generate_ids(bridge, tokenizer, texts, n_tokens, gen_batch,
                                     desc="continuations" if progress else None)]
    keep = [k for k in range(len(pairs)) if conts[2 * k] and conts[2 * k + 1] and conts[2 * k] != conts[2 * k + 1]]
    if not keep:
        raise ValueError("no pair has two different non-empty continuations: the behaviour objective has nothing "
                         "to "
                         "learn from; use objective 'shift', or pairs whose prompts the model continues "
                         "differently")
    out = Continuations([], [], [], [], [], dropped=len(pairs) - len(keep))
    for i in range(0, len(keep), batch_pairs):
        rows_h, rows_y = [], []
        for k in keep[i: i + batch_pairs]:
            cho, rej, y_w, y_l = heads[2 * k], heads[2 * k + 1], conts[2 * k], conts[2 * k + 1]
            rows_h += [rej, rej, cho, cho]
            rows_y += [y_w, y_l, y_w, y_l]
        batch, reply = _continuation_rows(rows_h, rows_y, pad_id, dev)
        c = torch.tensor([1.0, 1.0, -1.0, -1.0], device=dev).repeat(len(rows_h) // 4)
        logits = bridge(batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
        out.batches.append(batch)
        out.c.append(c)
        out.reply.append(reply)
        out.mask.append(token_mask(batch.attention_mask))
        out.ref_logp.append(token_logprobs(logits, batch.input_ids))
    return out


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


class Objective(Protocol):
    def loss(self, step: int, bridge: TransformerBridge,
             adapters: nn.ModuleList) -> tuple[Tensor, dict[str, float]]:
        ...


@dataclass
class PairObjective:
    """``shift`` / ``separation``: a batch of pairs at c = +1 and c = −1 in one forward, its last-token states at
    the loss hook against the reference's, plus the coherence penalty and the monotonic hinge (``steering_loss``)."""

    batches: list[Batch]  # this process's rows of each global batch
    ref: Reference
    hook: str
    d_steer: Tensor
    scale: float
    cfg: TrainConfig
    total: Total | None = None

    def loss(self, step: int, bridge: TransformerBridge,
             adapters: nn.ModuleList) -> tuple[Tensor, dict[str, float]]:
        j = batch_order(step, len(self.batches), self.cfg.seed)
        batch, c = self.batches[j].doubled()
        packed = packing(bridge, batch)  # each pair's shared prefix once (CAA's pairs: half the tokens)
        with apply_adapters(bridge, adapters, c if packed is None else packed.pair_values(c)):
            hs, logp = forward_last(bridge, batch, [self.hook], logprobs=True, pack=True)
        # the objective in float32 whatever the model's dtype (a no-op for float32 models)
        return steering_loss(hs[self.hook].float(), torch.cat([self.ref.hs[j]] * 2).float(), c, self.d_steer, logp,
                             torch.cat([self.ref.logp[j]] * 2), token_mask(batch.attention_mask), self.cfg.loss,
                             self.scale, self.total)


@dataclass
class BehaviourObjective:
    """``behaviour``: the log-ratio of the base model's own continuations (``Continuations``), ``behaviour_loss``."""

    cont: Continuations
    cfg: TrainConfig

    def loss(self, step: int, bridge: TransformerBridge,
             adapters: nn.ModuleList) -> tuple[Tensor, dict[str, float]]:
        cont = self.cont
        k = batch_order(step, len(cont.batches), self.cfg.seed)
        batch = cont.batches[k]
        with apply_adapters(bridge, adapters, cont.c[k]):
            logits = bridge(batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
        logp = token_logprobs(logits, batch.input_ids)
        del logits
        return behaviour_loss(logp, cont.ref_logp[k], cont.reply[k], cont.mask[k], cont.c[k], self.cfg.loss)


@dataclass
class KLConstraint:
    """The coherence constraint beside any objective: KL(reference ‖ steered) on generic text at c = ±1, each
    direction under its own Lagrange multiplier (``duals``, one ascent step after each optimiser step), and with
    ``w_text_shift`` the shift objective on that text too."""

    text: GenericText
    d_steer: Tensor
    scale: float
    cfg: TrainConfig
    duals: list[float]  # λ for c = +1 and c = −1
    total: Total | None = None

    def add(self, step: int, bridge: TransformerBridge, adapters: nn.ModuleList, loss: Tensor, parts: dict
            ) -> Tensor:
        g = step % len(self.text.batches)
        kl_plus, kl_minus, text_hs = kl_both_ways(bridge, adapters, self.text, g, self.total)
        budget = self.cfg.loss.kl_budget
        loss = loss + kl_lagrangian(kl_plus, budget, self.duals[0]) + kl_lagrangian(kl_minus, budget, self.duals[1])
        parts.update(kl_plus=kl_plus.item(), kl_minus=kl_minus.item(), lam_plus=self.duals[0],
                     lam_minus=self.duals[1])
        if text_hs is not None:
            tshift = text_shift(text_hs, self.text.ref_hs[g], self.d_steer, self.scale, self.cfg.loss.balance)
            loss = loss - self.cfg.loss.w_text_shift * tshift
            parts["tshift"] = tshift.item()
        parts["loss"] = loss.item()
        return loss

    def update(self, parts: dict) -> None:
        lc = self.cfg.loss
        self.duals = [dual_step(lam, parts[k], lc.kl_budget, lc.kl_dual_lr, lc.kl_equality)  # type: ignore[arg-type]
                      for lam, k in zip(self.duals, ("kl_plus", "kl_minus"))]


MIN_RISE = 0.01  # what counts as the held-out objective improving, in its unit (the pairs' separation RMS)


@dataclass
class HeldOutCurve:
    """The held-out pairs' shift objective at c = ±1 (``shift_objective``: their last-token states at the loss hook
    against the reference's, along ``d_steer``) every ``cfg.eval_every`` steps; with ``cfg.patience``, the step at
    which it stopped rising (by ``MIN_RISE``) for that many measurements. The run then stops there; its adapters
    are the last step's."""

    batches: list[Batch]
    ref_hs: list[Tensor]
    hook: str
    d_steer: Tensor
    scale: float
    cfg: TrainConfig
    points: list[dict] = field(default_factory=list)

    def due(self, done: int) -> bool:
        return self.cfg.eval_every > 0 and done % self.cfg.eval_every == 0

    @torch.no_grad()
    def measure(self, done: int, bridge: TransformerBridge, adapters: nn.ModuleList) -> dict:
        num = rows = 0.0
        for b, ref in zip(self.batches, self.ref_hs):
            b, c = b.doubled()
            packed = packing(bridge, b)
            with apply_adapters(bridge, adapters, c if packed is None else packed.pair_values(c)):
                hs, _ = forward_last(bridge, b, [self.hook], pack=True)
            obj = shift_objective(hs[self.hook].float(), torch.cat([ref] * 2).float(), c, self.d_steer, self.scale)
            num, rows = num + obj.item() * len(b), rows + len(b)
        point = {"step": done, "held_out_obj": num / rows}
        self.points.append(point)
        return point

    def exhausted(self) -> bool:
        """No rise of ``MIN_RISE`` over the best before the last ``patience`` measurements."""
        k = self.cfg.patience
        if k == 0 or len(self.points) <= k:
            return False
        values = [p["held_out_obj"] for p in self.points]
        return max(values[-k:]) < max(values[:-k]) + MIN_RISE


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


def batch_order(step: int, n_batches: int, seed: int) -> int:
    """The batch of ``step``: a seeded permutation per epoch, so a resumed run sees the same order."""
    epoch, i = divmod(step, n_batches)
    order = torch.randperm(n_batches, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
    return int(order[i].item())


def pair_scale(ref: Reference, d_steer: Tensor) -> float:
    """RMS of the reference pairs' separation along ``d_steer``: the objective's unit."""
    hs = torch.cat(ref.hs).float()
    return ((hs[0::2] - hs[1::2]) @ d_steer).pow(2).mean().sqrt().item()
