"""Command line: ``interp-steer train | eval | demo | study | export``.

Every option is made from the annotations of the command's config dataclass (config.py), nested configs
flattened (``--objective`` sets ``train.loss.objective``), so the CLI and the Python API cannot drift.
``--config run_config.json`` starts from a saved config; options given beside it override its values.
Bad input exits with status 2 and one line naming the option or file, before any model is loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import types
from typing import Any, Literal, Sequence, Union, get_args, get_origin

from ..config import COMMANDS, ConfigError, coerce, field_types, load_run_config
from ..signals import Terminated, sigterm_raises

HELP = {"train": "train an SVD rotation adapter on contrastive pairs",
        "eval": "sweep a trained adapter (and baselines) at equal coherence",
        "demo": "per concept: train the adapter (per seed), sweep every method, write reports and figures",
        "study": "models × concepts × seeds, one resumable cell each (shardable), then one report over them",
        "export": "write the steer at a coefficient as a merged HF model, a peft LoRA or a llama.cpp control "
                  "vector"}


def parse_text(text: str, tp: Any) -> Any:
    """A command-line string as a value of annotation ``tp``: ``config.coerce`` in text mode (tuples
    comma-separated, 'none' for None), its error as argparse's."""
    try:
        return coerce(text, tp, text=True)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _metavar(tp: Any) -> str:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        arms = get_args(tp)
        return "|".join(_metavar(a) for a in arms if a is not type(None)) + ("|none" if type(None) in arms else "")
    if origin is tuple:
        return f"{_metavar(get_args(tp)[0])},..."
    if origin is Literal:
        return "{" + ",".join(get_args(tp)) + "}"
    return {int: "INT", float: "X", str: "TEXT"}.get(tp, "V")


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def add_options(parser: argparse.ArgumentParser, cls: type, defaults: Any = None, prefix: tuple[str, ...] = ()
                ) -> None:
    """One option per leaf field of config ``cls`` (nested configs flattened); ``dest`` is the dotted path."""
    types_ = field_types(cls)
    for f in dataclasses.fields(cls):
        tp, path = types_[f.name], (*prefix, f.name)
        default = getattr(defaults, f.name) if defaults is not None else _default(f)
        if dataclasses.is_dataclass(tp):
            add_options(parser, tp, default, path)
            continue
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        help_ = f"{f.metadata.get('help', '')} (default: {shown})"
        if f.metadata.get("positional"):
            parser.add_argument(f.name, nargs="?", default=argparse.SUPPRESS, metavar=f.name.upper(),
                                type=lambda t, tp=tp: parse_text(t, tp), help=f.metadata.get("help"))
        elif tp is bool:
            parser.add_argument(f"--{f.name.replace('_', '-')}", dest=".".join(path), default=argparse.SUPPRESS,
                                action=argparse.BooleanOptionalAction, help=help_)
        else:
            parser.add_argument(f"--{f.name.replace('_', '-')}", dest=".".join(path), default=argparse.SUPPRESS,
                                type=lambda t, tp=tp: parse_text(t, tp), metavar=_metavar(tp), help=help_)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="interp-steer", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, cls in COMMANDS.items():
        p = sub.add_parser(name, help=HELP[name], description=HELP[name])
        p.add_argument("--config", dest="_config", default=None, metavar="RUN_CONFIG_JSON",
                       help="start from a saved run_config.json; options given here override it")
        add_options(p, cls)
    return parser


def config_from_args(command: str, args: argparse.Namespace) -> Any:
    """The command's config: the saved config (if ``--config``), then every option given on the line."""
    base: dict = {}
    if args._config:
        saved, base = load_run_config(args._config)
        if saved != command:
            raise ConfigError(f"{args._config} is a config for `{saved}`, not `{command}`")
    for dest, value in vars(args).items():
        if dest in ("command", "_config"):
            continue
        *parents, leaf = dest.split(".")
        node = base
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{args._config}: {p} must be an object")
        node[leaf] = list(value) if isinstance(value, tuple) else value
    return COMMANDS[command].from_dict(base)


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args.command, args)
        from . import commands, study  # heavy imports (torch, transformers) once the config is known to be good

        run = study.run_study if args.command == "study" else getattr(commands, f"run_{args.command}")
        with sigterm_raises():
            run(cfg)
    except (ValueError, OSError, FloatingPointError) as e:  # ConfigError, FileNotFoundError, FileExistsError,
        # and a diverged loss (train names the last checkpoint and the settings to change)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from safetensors import SafetensorError  # a weights file that could not be written (a full disk)

        if not isinstance(e, SafetensorError):
            raise
        print(f"error: a weights file could not be written ({' '.join(str(e).split())}); is the disk full or "
              "the file size limited (ulimit -f)? Nothing was replaced: the output is written aside and swapped "
              "in whole", file=sys.stderr)
        return 2
    except Terminated:
        print("terminated (SIGTERM)", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
