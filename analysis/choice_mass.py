"""How the forced choice's Yes/No mass depends on how the question is put (c = 0, no steer).

Steering F1 discounts an effect by the probability the model gives the two answers (the choice mass); the
project's honesty prompt (``evaluate.choice_prompt``: the dilemma, the instruction, the chat template, the
assistant turn prefilled with "My choice:") gets 0.77–0.89 on SmolLM2. This script measures the mean mass over
every labelled dilemma for variants of that prompt, to say what raises it; the study's measurement is unchanged
(the variants are only read here).

    python -m analysis.choice_mass --out runs/choice_mass.json            # SmolLM2, all 220 dilemmas
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from interp_steer.evaluation.evaluate import (
    CHOICE_INSTRUCTION,
    CHOICE_PREFIX,
    _by_length,
    choice_token_ids,
    load_dilemmas,
    logits_at,
)
from interp_steer.method.data import render_chat, tokenize
from interp_steer.method.models import load_model, model_device

ONLY = "Answer with Yes or No only."
# name -> (user turn, assistant prefill, system prompt, chat template); {d}: the dilemma
VARIANTS = {
    "project (chat, prefill 'My choice:')": ("{d}\n\n" + CHOICE_INSTRUCTION, CHOICE_PREFIX, None, True),
    "no prefill": ("{d}\n\n" + CHOICE_INSTRUCTION, "", None, True),
    "prefill 'My choice: '": ("{d}\n\n" + CHOICE_INSTRUCTION, CHOICE_PREFIX + " ", None, True),
    "prefill 'My choice is'": ("{d}\n\n" + CHOICE_INSTRUCTION, "My choice is", None, True),
    "system 'Answer with Yes or No only.'": ("{d}\n\n" + CHOICE_INSTRUCTION, CHOICE_PREFIX, ONLY, True),
    "instruction 'Yes or No only'": ("{d}\n\n" + ONLY, "", None, True),
    "plain text, no chat template": ("{d}\n\n" + CHOICE_INSTRUCTION, CHOICE_PREFIX, None, False),
}


def prompt(tok, user: str, prefill: str, system: str | None, chat: bool) -> str:
    if chat:
        return render_chat(tok, user, prefill, system=system)
    return (f"{system}\n\n" if system else "") + f"{user}\n\n{prefill}"


@torch.inference_mode()
def masses(bridge, tok, prompts: list[str], batch_size: int = 16) -> torch.Tensor:
    """P(Yes-like) + P(No-like) at the token after each prompt (``evaluate.forced_choice``'s token sets)."""
    yes, no = choice_token_ids(tok)
    out, dev = torch.empty(len(prompts)), model_device(bridge)
    for idx in _by_length(tok, prompts, batch_size):
        batch = tokenize([prompts[i] for i in idx], tok, device=dev)
        logp = logits_at(bridge, batch, torch.arange(len(batch), device=dev), batch.last).float().log_softmax(-1)
        out[idx] = (logp[:, yes].logsumexp(-1).exp() + logp[:, no].logsumexp(-1).exp()).cpu()
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="HF name or local directory (default: packaged SmolLM2)")
    ap.add_argument("--out", type=Path, default=None, help="JSON file to write (default: print only)")
    args = ap.parse_args(argv)
    bridge, tok = load_model(args.model)
    dilemmas = [d for d in load_dilemmas() if d.honest_answer is not None]
    rows = {}
    for name, (user, prefill, system, chat) in VARIANTS.items():
        t = time.perf_counter()
        m = masses(bridge, tok, [prompt(tok, user.format(d=d.text), prefill, system, chat) for d in dilemmas])
        rows[name] = {"mean": m.mean().item(), "median": m.median().item(),
                      "share_below_0.5": (m < 0.5).float().mean().item(), "seconds": time.perf_counter() - t}
        print(f"{name:40s} mass mean {rows[name]['mean']:.3f}  median {rows[name]['median']:.3f}  "
              f"< 0.5: {rows[name]['share_below_0.5']:.2f}")
    result = {"model": args.model or "smollm2-135m", "n_dilemmas": len(dilemmas), "variants": rows,
              "date": time.strftime("%Y-%m-%d"), "command": "python -m analysis.choice_mass"
              + (f" --model {args.model}" if args.model else "")}
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
