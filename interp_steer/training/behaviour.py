"""The behaviour objective's data: each pair's prompts continued by the base model's own greedy
continuations of both, with the reference's log-probs on them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge
from transformers import PreTrainedTokenizerBase

from ..evaluation.evaluate import generate_ids
from ..method.data import (
    Batch,
    ContrastivePair,
    interleave,
    last_index,
)
from ..method.loss import (
    token_logprobs,
    token_mask,
)
from ..method.models import model_device


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
    """Right-padded ``head + continuation`` token rows, and the mask of the positions that predict a
    continuation token."""
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
