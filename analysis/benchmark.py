"""Costs as ratios against a plain forward, all measured in one run on the default model.

    python analysis/benchmark.py [--pairs 256] [--repeats 3] [--first-load] [--no-eval] [--out runs/benchmark.json]

Each row times one operation over the same batches (256 persona pairs, 16 pairs = 32 rows a batch) and
divides by a plain bridge forward of those batches. Then the parts of the equal-coherence evaluation, each at one
coefficient with the 7 default adapters applied (what one dose point of a sweep costs, per item and in all).
Run it with nothing else on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from interp_steer.config import LossConfig, TrainConfig  # noqa: E402
from interp_steer.method.adapter import apply_adapters, make_adapters  # noqa: E402
from interp_steer.method.data import pair_batches, persona_pairs  # noqa: E402
from interp_steer.method.directions import steering_vector  # noqa: E402
from interp_steer.method.loss import steering_loss, token_logprobs, token_mask  # noqa: E402
from interp_steer.method.models import load_model  # noqa: E402
from interp_steer.method.prefix import first_block, reuse_prefix  # noqa: E402
from interp_steer.method.states import capture, forward_last  # noqa: E402
from interp_steer.names import resid_names  # noqa: E402
from interp_steer.training.loop import adapter_specs, loss_hook  # noqa: E402


def timed(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs (after one warm-up)."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--first-load", action="store_true", help="also time a first load into an empty cache (~30 s)")
    ap.add_argument("--no-eval", action="store_true", help="skip the evaluation parts (~2 min)")
    ap.add_argument("--eval-fraction", type=float, default=1.0,
                    help="run the evaluation parts on this fraction of their items (a slow machine: 0.25)")
    ap.add_argument("--out", default="runs/benchmark.json")
    args = ap.parse_args(argv)

    results: dict[str, float] = {}
    if args.first_load:
        with tempfile.TemporaryDirectory() as tmp:
            old = os.environ.get("INTERP_STEER_CACHE")
            os.environ["INTERP_STEER_CACHE"] = tmp
            t = time.perf_counter()
            load_model()
            results["load_first_s"] = time.perf_counter() - t
            if old is None:
                del os.environ["INTERP_STEER_CACHE"]
            else:
                os.environ["INTERP_STEER_CACHE"] = old
    t = time.perf_counter()
    bridge, tok = load_model()
    results["load_cached_s"] = time.perf_counter() - t

    pairs = persona_pairs(tok)[: args.pairs]
    batches = list(pair_batches(pairs, tok, batch_pairs=16))
    n_tokens = sum(int(b.attention_mask.sum()) for b in batches)
    hf = bridge.original_model

    def plain():
        with torch.inference_mode():
            for b in batches:
                bridge(b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids)

    def hf_forward():
        with torch.inference_mode():
            for b in batches:
                hf(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids)

    names30 = resid_names(range(bridge.cfg.n_layers))
    cfg = TrainConfig()
    specs = adapter_specs(cfg, bridge.cfg.n_layers)
    adapters = make_adapters(bridge, specs, init_scale=0.05)
    hook = loss_hook(cfg, bridge.cfg.n_layers)
    # the objective this benchmark has always timed (steering_loss's default before LossConfig); the cost of a
    # step does not depend on it
    loss_cfg = LossConfig(objective="shift")
    vec = steering_vector(capture(bridge, batches[:2], resid_names([8, 14])), "mean_diff").scaled(0.1)

    def adapter_forward():
        with torch.inference_mode(), apply_adapters(bridge, adapters, 1.0):
            for b in batches:
                bridge(b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids)

    def vector_forward():
        with torch.inference_mode(), vec.apply(bridge):
            for b in batches:
                bridge(b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids)

    def train_steps():
        # one training step per batch of 8 pairs = 16 rows, doubled for c = ±1 (the TrainConfig default)
        for b in pair_batches(pairs[:64], tok, batch_pairs=8):
            with torch.inference_mode():
                h0, l0 = forward_last(bridge, b, [hook], logits=True)
                lp0 = token_logprobs(l0, b.input_ids)
            h0, lp0 = h0[hook].clone(), lp0.clone()
            bb, c = b.doubled()
            with apply_adapters(bridge, adapters, c):
                h, logits = forward_last(bridge, bb, [hook], logits=True)
            d = torch.ones(h0.shape[-1], device=h0.device) / h0.shape[-1] ** 0.5
            loss, _ = steering_loss(h[hook], torch.cat([h0, h0]), c, d,
                                    token_logprobs(logits, bb.input_ids), torch.cat([lp0, lp0]),
                                    token_mask(bb.attention_mask), loss_cfg)
            loss.backward()
        for p in adapters.parameters():
            p.grad = None

    def train_forward_only():
        for b in pair_batches(pairs[:64], tok, batch_pairs=8):
            with torch.inference_mode():
                forward_last(bridge, b, [hook], logits=True)

    rows = {
        "plain bridge forward (logits)": plain,
        "HF model forward (no hooks)": hf_forward,
        "capture 30 x resid_post, last token": lambda: capture(bridge, batches, names30, progress=False),
        "capture 1 layer (stop_at_layer=9)": lambda: capture(bridge, batches, resid_names([8]), progress=False),
        "forward with 7 adapters (c=1)": adapter_forward,
        "forward with additive vector, 2 layers": vector_forward,
    }
    start = first_block([sp.site for sp in specs] + [hook])
    base = None
    print(f"{len(pairs)} pairs, {len(batches)} batches, {n_tokens} real tokens, torch threads "
          f"{torch.get_num_threads()}")
    for name, fn in rows.items():
        s = timed(fn, args.repeats)
        base = base or s
        results[name] = s
        print(f"{name:45s} {s:8.2f} s   x{s / base:5.2f}")
    # the same steered pass reusing the residual entering the first adapted block (the warm-up pass stores it)
    with reuse_prefix(bridge, start):
        s = timed(adapter_forward, args.repeats)
    results[f"forward with 7 adapters (c=1), blocks < {start} reused"] = s
    prefix = {"start_block": start, "steered_pass": s / results["forward with 7 adapters (c=1)"]}
    print(f"{'  ... blocks < ' + str(start) + ' reused':45s} {s:8.2f} s   x{s / base:5.2f}   "
          f"(x{prefix['steered_pass']:.2f} of the full steered pass)")
    # the training step is measured on 64 pairs; compare with a plain forward of the same 64 pairs
    s_fwd = timed(train_forward_only, 1)
    s_step = timed(train_steps, 1)
    with reuse_prefix(bridge, start):
        s_step_reused = timed(train_steps, 1)
    prefix["train_step"] = s_step_reused / s_step
    results["train: 8 steps (64 pairs, c=±1, fwd+bwd, incl. ref)"] = s_step
    results[f"train: the same 8 steps, blocks < {start} reused"] = s_step_reused
    results["train: plain forward of the same 64 pairs"] = s_fwd
    print(f"{'8 training steps (64 pairs) / plain fwd of them':45s} {s_step:8.2f} s   x{s_step / s_fwd:5.2f}")
    print(f"{'  ... blocks < ' + str(start) + ' reused':45s} {s_step_reused:8.2f} s   "
          f"x{s_step_reused / s_fwd:5.2f}   "
          f"(x{prefix['train_step']:.2f} of the full steps)")
    evaluation = {} if args.no_eval else eval_parts(bridge, tok, adapters, start, args.eval_fraction)
    if evaluation:
        full = sum(v["seconds"] for k, v in evaluation.items() if "reused" not in k and "(old)" not in k)
        reused = sum(v["seconds"] for k, v in evaluation.items() if "reused" in k)
        prefix["dose_point"] = reused / full
        print(f"one dose point (every part above): {full:.1f} s full, {reused:.1f} s reused: x{reused / full:.2f}")
    print(f"model load (cached): {results['load_cached_s']:.2f} s" +
          (f"; first load (empty cache): {results['load_first_s']:.1f} s" if "load_first_s" in results else ""))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"n_pairs": len(pairs), "n_tokens": n_tokens, "seconds": results, "evaluation": evaluation,
                               "prefix_reuse_ratios": prefix, "torch_threads": torch.get_num_threads(),
                               "ratios": {k: v / base for k, v in results.items() if not k.startswith(("load", "train"))}},
                              indent=2))
    print(f"wrote {out}")
    return 0


def eval_parts(bridge, tok, adapters, start: int, fraction: float = 1.0) -> dict[str, dict]:
    """Seconds of each evaluation part at one steered coefficient (c = 1, the 7 default adapters), per item and in
    all; forced choice also the old way (full-vocabulary logits at every position) to show what reading one
    position's logits saves."""
    from interp_steer.evaluation.concepts import get_concept
    from interp_steer.evaluation.evaluate import (
        choice_prompt,
        choice_token_ids,
        coherence,
        coherence_reference,
        load_dilemmas,
        load_neutral_texts,
    )
    from interp_steer.method.data import tokenize

    def steer(b):
        return apply_adapters(b, adapters, 1.0)

    k = lambda n: max(1, round(n * fraction))  # noqa: E731
    honesty = get_concept("honesty").effects(k(220), 0)  # 220 dilemmas, 55 MC questions
    sentiment = get_concept("sentiment").effects(k(200), k(16))  # 200 reply pairs, 16 generations
    texts = load_neutral_texts()[:k(16)]
    ref = coherence_reference(bridge, tok, texts)
    dilemmas = load_dilemmas()[:k(220)]
    yes, no = choice_token_ids(tok)

    def forced_choice_full_logits():
        prompts = [choice_prompt(tok, d) for d in dilemmas]
        with torch.inference_mode(), steer(bridge):
            for i in range(0, len(prompts), 16):
                b = tokenize(prompts[i: i + 16], tok)
                logp = bridge(b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids)
                logp = logp[torch.arange(len(b)), b.last].float().log_softmax(-1)
                (logp[:, yes].logsumexp(-1) - logp[:, no].logsumexp(-1)).sum().item()

    parts = {
        "honesty: forced choice": (lambda: honesty[0].measure(bridge, tok, steer, None), k(220)),
        "honesty: forced choice, full logits (old)": (forced_choice_full_logits, k(220)),
        "honesty: MC margin": (lambda: honesty[1].measure(bridge, tok, steer, None), k(55)),
        "sentiment: reply log-odds": (lambda: sentiment[0].measure(bridge, tok, steer, None), k(200)),
        "sentiment: VADER of 32-token greedy replies": (lambda: sentiment[1].measure(bridge, tok, steer, None), k(16)),
        "coherence: KL + dNLL on neutral texts": (lambda: coherence(bridge, tok, steer, texts, ref), k(16)),
    }
    out = {}
    print("\nevaluation parts at one coefficient (7 adapters, c = 1), full and with the prefix reused:")
    for name, (fn, n) in parts.items():
        s = timed(fn, 1)
        out[name] = {"seconds": s, "items": n, "seconds_per_item": s / n}
        print(f"{name:58s} {s:7.2f} s  {1000 * s / n:7.1f} ms/item")
        if "(old)" in name:
            continue
        with reuse_prefix(bridge, start):  # the warm-up pass of ``timed`` stores what the timed pass reuses
            r = timed(fn, 1)
        out[name + f", blocks < {start} reused"] = {"seconds": r, "items": n, "seconds_per_item": r / n}
        print(f"{'  ... reused':58s} {r:7.2f} s  {1000 * r / n:7.1f} ms/item   x{r / s:.2f}")
    return out


if __name__ == "__main__":
    sys.exit(main())
