"""Command line: ``interp-steer train | eval | demo``.

Options of ``train`` are generated from ``TrainConfig``'s fields, so the CLI and the Python API cannot drift.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

from .train import TrainConfig


def _parse_value(text: str, default):
    """Parse a CLI string like the field's default: tuples are comma-separated; 'none' is None."""
    if text.lower() == "none":
        return None
    if isinstance(default, tuple):
        return tuple(_number(t) for t in text.split(",") if t.strip())
    if isinstance(default, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")
        return text.lower() in ("true", "1")
    if isinstance(default, (int, float)) or default is None:
        return _number(text)
    return text


def _number(text: str):
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def add_config_options(parser: argparse.ArgumentParser) -> None:
    for f in dataclasses.fields(TrainConfig):
        default = f.default
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f"cfg_{f.name}", default=None,
                            type=lambda t, d=default: _parse_value(t, d), metavar="V",
                            help=f"(default: {shown})")


def config_from_args(args: argparse.Namespace, base: TrainConfig | None = None) -> TrainConfig:
    base = base or TrainConfig()
    changes = {f.name: getattr(args, f"cfg_{f.name}") for f in dataclasses.fields(TrainConfig)
               if getattr(args, f"cfg_{f.name}") is not None}
    return dataclasses.replace(base, **changes)


def load_pairs(args, tokenizer):
    from .data import ContrastivePair, check_pairs, persona_pairs

    if args.pairs:
        rows = json.loads(Path(args.pairs).read_text())
        if not isinstance(rows, list) or not all(isinstance(r, dict) and {"chosen", "rejected"} <= set(r) for r in rows):
            raise SystemExit(f"{args.pairs}: expected a JSON list of {{\"chosen\": ..., \"rejected\": ...}} objects")
        pairs = [ContrastivePair(r["chosen"], r["rejected"]) for r in rows]
        check_pairs(pairs, tokenizer)
        return pairs
    personas = tuple(args.personas.split(",")) if args.personas else None
    return persona_pairs(tokenizer, personas=personas) if personas else persona_pairs(tokenizer)


def cmd_train(args) -> int:
    from .models import load_model
    from .train import train

    cfg = config_from_args(args)
    t0 = time.perf_counter()
    bridge, tok = load_model(args.model)
    pairs = load_pairs(args, tok)
    print(f"model {args.model or 'default'} loaded in {time.perf_counter() - t0:.1f}s; {len(pairs)} pairs")
    result = train(bridge, tok, pairs, cfg, args.out, resume=args.resume)
    total = time.perf_counter() - t0
    print(f"\nadapter written to {args.out}  ({total:.0f}s in all; timings: "
          + ", ".join(f"{k}={v:.2f}" for k, v in result.timings.items()) + ")")
    first, last = result.history[0] if result.history else {}, result.history[-1] if result.history else {}
    print("loss parts, first -> last step: " + ", ".join(
        f"{k} {first.get(k, float('nan')):.4g} -> {last.get(k, float('nan')):.4g}" for k in ("loss", "obj", "coh", "mono", "dnll")))
    print(f"held-out projection on d_steer at {result.loss_hook} (pair separation scale {result.metrics['scale']:.2f});"
          " dNLL: on the held-out pair prompts (not a coherence measure: see `interp-steer eval`):")
    print(f"  {'c':>5} {'chosen':>9} {'rejected':>9} {'separation':>10} {'shift':>8} {'dNLL':>8}")
    for c, m in result.metrics["held_out"].items():
        print(f"  {c:>5} {m['proj_chosen']:9.2f} {m['proj_rejected']:9.2f} {m['separation']:10.2f} "
              f"{m['shift']:8.2f} {m['dnll']:8.4f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = argparse.ArgumentParser(prog="interp-steer", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train an SVD rotation adapter on contrastive pairs")
    p.add_argument("--out", default="runs/honesty", help="adapter directory to write (default: runs/honesty)")
    p.add_argument("--model", default=None, help="HF model name or local directory (default: packaged SmolLM2-135M-Instruct)")
    p.add_argument("--pairs", default=None, help="JSON list of {chosen, rejected} prompts (default: built-in honesty pairs)")
    p.add_argument("--personas", default=None, help="two comma-separated personas, e.g. 'a happy,a sad'")
    p.add_argument("--resume", action="store_true", help="continue from OUT.ckpt if it exists")
    add_config_options(p)
    p.set_defaults(func=cmd_train)

    from . import evaluate_cli  # the eval/demo commands live beside the evaluation code

    evaluate_cli.add_commands(sub)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
