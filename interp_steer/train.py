"""Training loop: c = +1 and c = −1 in one batch, the reference computed once, checkpoints, resume.

Per step, for a batch of interleaved pairs (rows duplicated: first half at c = +1, second at c = −1)::

    hs_pi, logits = policy(batch; c)          # adapters applied through hooks
    loss = steering_loss(hs_pi, hs_ref, c, d_steer, logp_pi, logp_ref, ...)   # loss.py

``hs_ref`` (last-token states at the loss layer) and ``logp_ref`` (per-token log-probs) come from one
reference pass over the dataset at c = 0, cached; ``d_steer`` is frozen from it.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge
from transformers import PreTrainedTokenizerBase

from .adapter import AdapterSpec, Scale, apply_adapters, make_adapters
from .capture import forward_last
from .data import Batch, ContrastivePair, pair_batches, split_pairs
from .directions import dhs_svd_direction
from .io import load_adapter, save_adapter, save_tensors_atomic, write_json_atomic
from .loss import Objective, delta_nll, steering_loss, token_logprobs, token_mask


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run depends on. Layer entries: an int is a block index, a float in (0, 1) a depth fraction."""

    layers: tuple[int | float, ...] = (0.27, 0.33, 0.4, 0.47, 0.53, 0.6, 0.67)  # mid-depth: NOTES' prototype used 8–20 of 30
    site: str = "mlp.out"        # the linear layer adapted in each block: writes into the residual stream
    rank: int = 32               # top singular triplets rotated per site
    loss_layer: int | float = 0.75  # hook_resid_post of this block is where the objective is measured
    # separation beat shift at equal coherence on forced-choice honesty (+0.14 vs −0.03 nat at ΔNLL 0.1;
    # README "Results"; within one SE, so weak evidence), although shift moves held-out states monotonically
    objective: Objective = "separation"
    steps: int = 48
    batch_pairs: int = 8         # 16 rows, ×2 for c = ±1: one step ≈ 3 s on 2 cores
    lr: float = 1e-2
    weight_decay: float = 0.0    # decay would pull λ, θ to 0, i.e. towards the base model, for free
    grad_clip: float = 1.0
    margin: float = 0.1          # nat/token a token's log-prob may drop below the reference's for free
    w_coherence: float = 10.0
    power: int = 2
    w_mono: float = 1.0
    mono_margin: float = 0.0
    scale: Scale = "exp"
    rotate_u: bool = False
    init_scale: float = 1e-2     # θ and λ start small and non-zero (symmetry breaking)
    held_out: float = 0.2
    n_pairs: int | None = None   # subsample the pair set (None: all)
    seed: int = 0
    checkpoint_every: int = 16
    eval_coeffs: tuple[float, ...] = (-1.0, 0.0, 1.0)

    def __post_init__(self):
        if not self.layers:
            raise ValueError("layers must name at least one block")
        for v in (*self.layers, self.loss_layer):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not 0 < v < 1) \
                    or (isinstance(v, int) and v < 0):
                raise ValueError(f"layer {v!r}: use an int block index >= 0 or a float depth fraction in (0, 1)")
        if self.site not in ("mlp.out", "mlp.in", "mlp.gate", "attn.q", "attn.k", "attn.v", "attn.o"):
            raise ValueError(f"site {self.site!r}: choose mlp.out, mlp.in, mlp.gate, attn.q, attn.k, attn.v or attn.o")
        if self.objective not in ("shift", "separation"):
            raise ValueError(f"objective must be 'shift' or 'separation', got {self.objective!r}")
        for name in ("rank", "steps", "batch_pairs", "checkpoint_every", "power"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.margin < 0 or self.w_coherence < 0 or self.w_mono < 0:
            raise ValueError("lr must be > 0; margin, w_coherence, w_mono must be >= 0")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown TrainConfig keys: {sorted(unknown)}")
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**d)


def resolve_layer(v: int | float, n_layers: int) -> int:
    L = round(v * (n_layers - 1)) if isinstance(v, float) else v
    if not 0 <= L < n_layers:
        raise ValueError(f"layer {v!r} -> {L} is outside this model's {n_layers} blocks")
    return L


def adapter_specs(cfg: TrainConfig, n_layers: int) -> list[AdapterSpec]:
    layers = sorted({resolve_layer(v, n_layers) for v in cfg.layers})
    loss_layer = resolve_layer(cfg.loss_layer, n_layers)
    if layers[-1] > loss_layer:
        raise ValueError(f"adapted layer {layers[-1]} is after the loss layer {loss_layer}: it cannot move it")
    return [AdapterSpec(f"blocks.{L}.{cfg.site}", cfg.rank, cfg.scale, cfg.rotate_u) for L in layers]


@dataclass
class Reference:
    """The c = 0 pass, once per dataset: last-token states at the loss layer (per batch), per-token
    log-probs (per batch), and last-token states at any extra hooks (concatenated; free in the same pass)."""

    hs: list[Tensor]
    logp: list[Tensor]
    extra: dict[str, Tensor] = field(default_factory=dict)


def reference_pass(bridge: TransformerBridge, batches: Sequence[Batch], hook: str, progress: bool = False,
                   extra: Sequence[str] = ()) -> Reference:
    hs, logp, more = [], [], {n: [] for n in extra}
    with torch.inference_mode():
        for b in tqdm(batches, desc="reference", disable=not progress, leave=False):
            h, logits = forward_last(bridge, b, [hook, *extra], logits=True)
            hs.append(h[hook].clone())
            logp.append(token_logprobs(logits, b.input_ids).clone())
            for n in extra:
                more[n].append(h[n].clone())
    return Reference(hs, logp, {n: torch.cat(v) for n, v in more.items()})


def doubled(batch: Batch) -> tuple[Batch, Tensor]:
    """The batch twice, first at c = +1 then at c = −1: both directions in one forward."""
    n = len(batch)
    c = torch.cat([torch.ones(n), -torch.ones(n)])
    cat2 = lambda t: torch.cat([t, t])  # noqa: E731
    return Batch(cat2(batch.input_ids), cat2(batch.attention_mask), cat2(batch.last)), c


@dataclass
class TrainResult:
    adapters: nn.ModuleList
    d_steer: Tensor
    loss_hook: str
    reference_states: dict[str, Tensor] = field(default_factory=dict)  # c = 0, training rows, adapter layers
    train_batches: list[Batch] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)


def _save_checkpoint(path: Path, adapters, opt: torch.optim.Optimizer, step: int, cfg: TrainConfig,
                     bridge, d_steer: Tensor, scale: float) -> None:
    save_adapter(path, adapters, bridge, train_config=cfg.to_dict(), metrics={"step": step})
    state = opt.state_dict()
    tensors = {f"{i}.{k}": v for i, s in state["state"].items() for k, v in s.items()}
    tensors["d_steer"] = d_steer
    save_tensors_atomic(path / "optimizer.safetensors", tensors)
    write_json_atomic(path / "trainer.json", {"step": step, "scale": scale, "param_groups": state["param_groups"]})


def _load_checkpoint(path: Path, bridge, cfg: TrainConfig):
    adapters, config = load_adapter(path, bridge)
    if TrainConfig.from_dict(config["train_config"]) != cfg:
        raise ValueError(f"checkpoint {path} was written with a different TrainConfig; "
                         "resume with the same config or start a new output directory")
    trainer = json.loads((path / "trainer.json").read_text())
    tensors = load_file(str(path / "optimizer.safetensors"))
    d_steer = tensors.pop("d_steer")
    state: dict = {}
    for k, v in tensors.items():
        i, name = k.split(".", 1)
        state.setdefault(int(i), {})[name] = v
    return adapters, {"state": state, "param_groups": trainer["param_groups"]}, trainer["step"], d_steer, trainer["scale"]


@torch.no_grad()
def evaluate_pairs(bridge: TransformerBridge, adapters, batches: Sequence[Batch], hook: str, d_steer: Tensor,
                   coeffs: Sequence[float]) -> dict[str, dict[str, float]]:
    """Held-out projections on d_steer and mean per-token ΔNLL at each coefficient (c = 0 is the reference)."""
    ref = reference_pass(bridge, batches, hook)
    hs0 = torch.cat(ref.hs)
    out = {}
    for c in coeffs:
        if c == 0:
            hs, dnll = hs0, 0.0
        else:
            hs_parts, num, den = [], 0.0, 0.0
            with apply_adapters(bridge, adapters, float(c)):
                for b, lr in zip(batches, ref.logp):
                    h, logits = forward_last(bridge, b, [hook], logits=True)
                    hs_parts.append(h[hook])
                    m = token_mask(b.attention_mask)
                    num += (delta_nll(token_logprobs(logits, b.input_ids), lr, m) * m.sum()).item()
                    den += m.sum().item()
            hs, dnll = torch.cat(hs_parts), num / den
        proj = hs @ d_steer
        out[f"{c:g}"] = {
            "proj_chosen": proj[0::2].mean().item(), "proj_rejected": proj[1::2].mean().item(),
            "separation": (proj[0::2] - proj[1::2]).mean().item(),
            "shift": ((hs - hs0) @ d_steer).mean().item(), "dnll": dnll,
        }
    return out


def select_pairs(pairs: Sequence[ContrastivePair], cfg: TrainConfig
                 ) -> tuple[list[ContrastivePair], list[ContrastivePair]]:
    """The (train, held-out) pairs of a run: the seeded ``n_pairs`` subsample, then the seeded split."""
    pairs = list(pairs)
    if cfg.n_pairs is not None:
        keep = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(cfg.seed))[: cfg.n_pairs]
        pairs = [pairs[i] for i in sorted(keep.tolist())]
    return split_pairs(pairs, cfg.held_out, seed=cfg.seed)


def train(bridge: TransformerBridge, tokenizer: PreTrainedTokenizerBase, pairs: Sequence[ContrastivePair],
          cfg: TrainConfig = TrainConfig(), out_dir: str | Path | None = None, *, resume: bool = False,
          progress: bool = True, callback: Callable[[int, nn.ModuleList], None] | None = None) -> TrainResult:
    """Train SVD rotation adapters on ``pairs``; write ``out_dir`` (adapter) and ``out_dir.ckpt`` (checkpoints).

    ``callback(step, adapters)`` runs after every optimiser step (e.g. to snapshot directions over training).

    >>> result = train(bridge, tok, persona_pairs(tok), TrainConfig(steps=2))  # doctest: +SKIP
    """
    torch.manual_seed(cfg.seed)
    train_pairs, test_pairs = select_pairs(pairs, cfg)
    if not train_pairs:
        raise ValueError(f"no training pairs left (got {len(pairs)} pairs, held_out={cfg.held_out})")
    n_layers = bridge.cfg.n_layers
    specs = adapter_specs(cfg, n_layers)
    hook = f"blocks.{resolve_layer(cfg.loss_layer, n_layers)}.hook_resid_post"
    batches = list(pair_batches(train_pairs, tokenizer, cfg.batch_pairs))
    test_batches = list(pair_batches(test_pairs, tokenizer, cfg.batch_pairs * 2)) if test_pairs else []
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    # the residual stream at each adapted layer comes free with the reference pass: baselines reuse it
    resid = [f"blocks.{s.site.split('.')[1]}.hook_resid_post" for s in specs]
    ref = reference_pass(bridge, batches, hook, progress, extra=resid)
    timings["reference_s"] = time.perf_counter() - t0
    d_steer = dhs_svd_direction(torch.cat(ref.hs))
    scale = ((torch.cat(ref.hs)[0::2] - torch.cat(ref.hs)[1::2]) @ d_steer).pow(2).mean().sqrt().item()

    adapters = make_adapters(bridge, specs, seed=cfg.seed, init_scale=cfg.init_scale)
    opt = torch.optim.AdamW(adapters.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start = 0
    ckpt = Path(str(out_dir) + ".ckpt") if out_dir is not None else None
    if resume and ckpt is not None and ckpt.exists():
        adapters, opt_state, start, d_steer, scale = _load_checkpoint(ckpt, bridge, cfg)
        opt = torch.optim.AdamW(adapters.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        opt.load_state_dict(opt_state)

    history: list[dict] = []
    fwd_s = bwd_s = 0.0
    step = start
    bar = tqdm(range(start, cfg.steps), desc="train", disable=not progress, initial=start, total=cfg.steps)
    try:
        for step in bar:
            epoch, i = divmod(step, len(batches))
            order = torch.randperm(len(batches), generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
            j = order[i].item()
            batch, c = doubled(batches[j])
            t = time.perf_counter()
            with apply_adapters(bridge, adapters, c):
                hs, logits = forward_last(bridge, batch, [hook], logits=True)
            logp = token_logprobs(logits, batch.input_ids)
            del logits
            loss, parts = steering_loss(
                hs[hook], torch.cat([ref.hs[j]] * 2), c, d_steer, logp, torch.cat([ref.logp[j]] * 2),
                token_mask(batch.attention_mask), objective=cfg.objective, margin=cfg.margin,
                w_coherence=cfg.w_coherence, power=cfg.power, w_mono=cfg.w_mono, mono_margin=cfg.mono_margin,
                scale=scale)
            t1 = time.perf_counter()
            if not math.isfinite(parts["loss"]):
                raise FloatingPointError(
                    f"loss is {parts['loss']} at step {step} ({parts}); training stopped. "
                    f"The last good checkpoint is {ckpt if ckpt and ckpt.exists() else 'none (no checkpoint yet)'}; "
                    "lower lr or raise w_coherence.")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(adapters.parameters(), cfg.grad_clip)
            opt.step()
            fwd_s += t1 - t
            bwd_s += time.perf_counter() - t1
            history.append({"step": step, **parts})
            if callback is not None:
                callback(step, adapters)
            bar.set_postfix({k: f"{v:.3g}" for k, v in parts.items() if k != "loss"})
            if ckpt is not None and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
                _save_checkpoint(ckpt, adapters, opt, step + 1, cfg, bridge, d_steer, scale)
    except KeyboardInterrupt:
        if ckpt is not None and history:  # nothing lost: the last completed step is saved
            _save_checkpoint(ckpt, adapters, opt, history[-1]["step"] + 1, cfg, bridge, d_steer, scale)
            print(f"\ninterrupted: checkpoint at {ckpt} (step {history[-1]['step'] + 1}); rerun with --resume")
        raise
    n_steps = max(1, len(history))
    timings.update(policy_forward_s_per_step=fwd_s / n_steps, backward_s_per_step=bwd_s / n_steps,
                   train_s=fwd_s + bwd_s)
    t = time.perf_counter()
    metrics = evaluate_pairs(bridge, adapters, test_batches, hook, d_steer, cfg.eval_coeffs) if test_batches else {}
    timings["held_out_eval_s"] = time.perf_counter() - t
    result = TrainResult(adapters, d_steer, hook, ref.extra, batches, history, {"held_out": metrics, "scale": scale},
                         timings)
    if out_dir is not None:
        save_adapter(out_dir, adapters, bridge, train_config=cfg.to_dict(),
                     metrics={"held_out": metrics, "timings": timings, "loss_hook": hook,
                              "final": history[-1] if history else {}})
        save_tensors_atomic(Path(out_dir) / "d_steer.safetensors", {"d_steer": d_steer})
        if ckpt is not None:
            shutil.rmtree(ckpt, ignore_errors=True)
    return result
