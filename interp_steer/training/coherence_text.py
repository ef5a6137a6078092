"""The KL constraint's generic text: the base model's own replies to generic requests, the reference's
log-probs on them cached once, and the steered policy's KL from it (both ways, per token)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge
from transformers import PreTrainedTokenizerBase

from .. import progress as command_progress
from ..config import TrainConfig
from ..evaluation.evaluate import greedy_continuations, reply_batch
from ..method.adapter import apply_adapters
from ..method.data import (
    Batch,
    load_json,
    render_chat,
)
from ..method.loss import (
    Total,
    shift_objective,
    token_kl,
)
from ..method.models import model_device
from . import distributed
from .distributed import World
from .sites import loss_hook

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
    ``hook``: also keep the reference's states there at the positions that predict reply tokens
    (``text_shift``)."""
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
