"""What a training step optimises. An objective owns the batches it needs and returns a step's loss
and its parts (floats, for the history): the pairs' shift along the frozen direction
(``PairObjective``) or the behaviour's log-ratios (``BehaviourObjective``); the KL constraint
(``KLConstraint``) prices coherence on the generic text, and ``HeldOutCurve`` measures the
objective on the held-out pairs to decide when to stop."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor, nn
from transformer_lens.model_bridge import TransformerBridge

from ..config import TrainConfig
from ..method.adapter import apply_adapters
from ..method.data import (
    Batch,
)
from ..method.loss import (
    Total,
    behaviour_loss,
    dual_step,
    kl_lagrangian,
    shift_objective,
    steering_loss,
    token_logprobs,
    token_mask,
)
from ..method.states import Reference, forward_last, packing
from .behaviour import Continuations
from .coherence_text import GenericText, kl_both_ways, text_shift


class Objective(Protocol):
    def loss(self, step: int, bridge: TransformerBridge,
             adapters: nn.ModuleList) -> tuple[Tensor, dict[str, float]]:
        ...


@dataclass
class PairObjective:
    """``shift`` / ``separation``: a batch of pairs at c = +1 and c = −1 in one forward, its last-token states at
    the loss hook against the reference's, plus the coherence penalty and the monotonic hinge
    (``steering_loss``)."""

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
    """``behaviour``: the log-ratio of the base model's own continuations (``Continuations``),
    ``behaviour_loss``."""

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
        loss = (loss + kl_lagrangian(kl_plus, budget, self.duals[0])
                + kl_lagrangian(kl_minus, budget, self.duals[1]))
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


def batch_order(step: int, n_batches: int, seed: int) -> int:
    """The batch of ``step``: a seeded permutation per epoch, so a resumed run sees the same order."""
    epoch, i = divmod(step, n_batches)
    order = torch.randperm(n_batches, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
    return int(order[i].item())
