"""Typed configs: every command and the training loop are driven by one frozen dataclass each.

Each config checks the type of every field against its annotation (an ``int`` field refuses ``1.5``, a ``float``
field refuses NaN and ±inf) and its range in ``__post_init__``, so a bad value is reported before any model is
loaded, whether it came from Python, the command line (``app/cli.py`` builds the options from these annotations)
or a saved ``run_config.json``. ``to_dict``/``from_dict`` round-trip through JSON.

The configs validate themselves with messages a user can act on, so the test run's runtime type checker is
kept off them (``no_type_check``): it would answer a bad value first, with a less helpful message.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import types
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal, Sequence, Union, get_args, get_origin, no_type_check

from .names import RESID_WRITERS, SITES
from .registry import names as method_names

Objective = Literal["shift", "separation", "behaviour"]
Scale = Literal["exp", "add"]
Bias = Literal["none", "free", "span", "only"]
Triplets = Literal["top", "aligned"]
Site = Literal["mlp.out", "mlp.in", "mlp.gate", "attn.q", "attn.k", "attn.v", "attn.o"]
BudgetMetric = Literal["kl", "dnll"]
# auto: cuda if available, else mps, else cpu (models.resolve_device)
Device = Literal["auto", "cpu", "cuda", "mps"]
DType = Literal["float32", "bfloat16", "float16"]  # the model's weights; adapters compute in float32 regardless
# the registry's names (registry.py), in its order: a method registered there is an option everywhere
MethodName = Literal[method_names()]  # type: ignore[valid-type]
ExportFormat = Literal["merged", "lora", "control-vector"]
VectorMethod = Literal[method_names(control_vector=True)]  # type: ignore[valid-type]  # what a control vector holds
METHODS: tuple[str, ...] = get_args(MethodName)
assert get_args(Site) == SITES


class ConfigError(ValueError):
    """A config value of the wrong type or out of range (the message names the field and what is allowed)."""


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "none"
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(str(a) for a in get_args(tp))
    if get_origin(tp) in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if get_origin(tp) is tuple:
        return f"a list of ({_type_name(get_args(tp)[0])})"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _expected(where: str, what: str, value: Any) -> ConfigError:
    return ConfigError(f"{where} must be {what}, got {value!r}" if where else f"expected {what}, got {value!r}")


def coerce(value: Any, tp: Any, where: str = "", text: bool = False) -> Any:
    """``value`` as type ``tp`` (int -> float for float fields, list -> tuple, dict -> nested config), or
    ``ConfigError`` naming ``where``. The one type walker of the project: JSON values, Python arguments and, with
    ``text``, command-line strings (a tuple comma-separated, ``none`` for None, numbers parsed) all go through it."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, dict):
            return tp.from_dict(value, where=where + ".")
        raise _expected(where, f"a JSON object of {tp.__name__} fields", value)
    elif origin in (Union, types.UnionType):
        if text and type(None) in get_args(tp) and isinstance(value, str) and value.strip().lower() == "none":
            return None
        for arm in get_args(tp):  # exact arms first: an int stays an int in ``int | float``
            try:
                return coerce(value, arm, where, text)
            except ConfigError:
                continue
    elif origin is Literal:
        if isinstance(value, str) and value in get_args(tp):
            return value
    elif origin is tuple:
        if text and isinstance(value, str):
            items = [t.strip() for t in value.split(",")]
            if not value.strip() or not all(items):
                raise _expected(where, f"a comma-separated list of ({_type_name(get_args(tp)[0])})", value)
            value = items
        if isinstance(value, (list, tuple)):
            (item, _dots) = get_args(tp)
            return tuple(coerce(v, item, f"{where}[{i}]" if where else "", text) for i, v in enumerate(value))
    elif tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if text and isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        if isinstance(value, bool):
            return value
    elif tp is int:
        if text and isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                raise _expected(where, "an integer", value) from None
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if text and isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise _expected(where, "a number", value) from None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise _expected(where, "a finite number", value)
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - a config annotated with a type this module does not know
        raise TypeError(f"{where}: unsupported config annotation {tp!r}")
    raise _expected(where, _type_name(tp), value)


@cache
def field_types(cls: type) -> dict[str, Any]:
    """The evaluated annotation of each field (``typing.get_type_hints`` returns nothing for a class marked
    ``no_type_check``, so the string annotations are evaluated in the defining module)."""
    namespace = vars(sys.modules[cls.__module__])
    return {f.name: eval(f.type, namespace) if isinstance(f.type, str) else f.type  # noqa: S307 (own source)
            for f in dataclasses.fields(cls)}


class Config:
    """Mixin of the config dataclasses: type checks from annotations, JSON round trip, ``replace``."""

    def _check_types(self) -> None:
        hints = field_types(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            object.__setattr__(self, f.name, coerce(getattr(self, f.name), hints[f.name], f.name))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, d: Any, where: str = "") -> Any:
        if not isinstance(d, dict):
            raise ConfigError(f"{where or cls.__name__}: expected a JSON object of {cls.__name__} fields, got "
                              f"{d!r}")
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} keys {[where + k for k in unknown]}; known: {sorted(names)}")
        hints = field_types(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: coerce(_under_default(fields[k], v, hints[k]), hints[k], where + k) for k, v in d.items()})

    def replace(self, **changes: Any) -> Any:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


def _under_default(f: dataclasses.Field, value: Any, tp: Any) -> Any:
    """A nested config given in part (a JSON file, the CLI's options) over the field's own default, so a command's
    defaults hold for whatever is not named: ``eval --n-items 2`` keeps eval's methods, not SweepConfig's."""
    if not (isinstance(value, dict) and dataclasses.is_dataclass(tp) and f.default_factory is not dataclasses.MISSING):
        return value

    def merged(base: dict, over: dict) -> dict:
        return {**base, **{k: merged(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
                           for k, v in over.items()}}

    return merged(f.default_factory().to_dict(), value)


KL_PROMPTS = 32  # prompts in datasets/coherence_prompts.json: greedy KL text has one reply each (test_cli checks)
MAX_COEFF = 1000.0  # the largest |c| a held-out evaluation accepts (±1 are the trained ends)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _positive_ints(cfg: Any, *names: str, minimum: int = 1) -> None:
    for n in names:
        _require(getattr(cfg, n) >= minimum, f"{n} must be >= {minimum}, got {getattr(cfg, n)}")


def _existing_file(name: str, path: str | None) -> None:
    if path is not None and not Path(path).expanduser().is_file():
        raise ConfigError(f"{name} {path!r} is not a file")


def _existing_dir(name: str, path: str | None) -> None:
    if path is not None and not Path(path).expanduser().is_dir():
        raise ConfigError(f"{name} {path!r} is not a directory")


def _data_dir(concepts: Sequence[str], data_dir: str | None, must_exist: bool = True) -> None:
    """A ``caa-*`` concept needs ``data_dir`` (a CAA-format directory); checked before any model loads."""
    if must_exist:
        _existing_dir("data_dir", data_dir)
    caa = [c for c in concepts if c.startswith("caa-")]
    _require(not caa or data_dir is not None,
             f"concept(s) {', '.join(caa)} read CAA's A/B files: give --data-dir DIR, a directory holding "
             "BEHAVIOUR/generate_dataset.json and BEHAVIOUR/test_dataset_ab.json (the public data: "
             "github.com/nrimsky/CAA, datasets/generate and datasets/test)")


def _model_name(model: str | None) -> None:
    if model is not None and Path(model).expanduser().is_file():
        raise ConfigError(f"model {model!r} is a file; give a directory holding config.json, the weights and the "
                          "tokenizer, a Hugging Face model name, or leave it out for the packaged default")


def _personas(personas: tuple[str, ...] | None) -> None:
    if personas is not None:
        _require(len(personas) == 2 and personas[0] != personas[1] and all(p.strip() for p in personas),
                 f"personas must be two different non-empty strings, e.g. 'a happy,a sad'; got {personas!r}")


# ------------------------------------------------------------------------------------------- training

@no_type_check
@dataclass(frozen=True)
class LossConfig(Config):
    """The training objective and its coherence and monotonicity terms (loss.py), passed whole to the loss."""

    # shift is the default because it moved the reply log-odds further than separation at the same KL budget
    # (docs/results.md, "Ablations on sentiment")
    objective: Objective = field(default="shift", metadata={
        "help": "shift/separation: move states along d_steer; behaviour: prefer the chosen prompt's continuations"})
    margin: float = field(default=0.1, metadata={"help": "nat/token a token's log-prob may drop for free"})
    w_coherence: float = field(default=10.0, metadata={"help": "weight of the per-token coherence penalty"})
    power: int = field(default=2, metadata={"help": "exponent of the coherence hinge"})
    w_mono: float = field(default=1.0, metadata={"help": "weight of the monotonic hinge s(−1) < s(0) < s(+1)"})
    mono_margin: float = field(default=0.0, metadata={"help": "margin of the monotonic hinge"})
    # with plain shift the direction that moves easily takes most of the gradient of the shared rotation
    balance: bool = field(default=False, metadata={
        "help": "shift only: maximise log(1 + shift) of each direction, so the lagging one gets more gradient"})
    # the coherence term on the pair prompts alone does not bind (its cost shows up on other text): this holds
    # KL(reference ‖ steered) on generic text at the budget, per direction, with a Lagrange multiplier
    kl_budget: float | None = field(default=0.1, metadata={
        "help": "KL per token on generic text that c = ±1 may spend (none: off)"})
    kl_dual_lr: float = field(default=1.0, metadata={"help": "dual-ascent step of the KL multipliers"})
    # the pair prompts name the persona; the evaluation's text does not: this also shifts the generic text's states
    w_text_shift: float = field(default=0.0, metadata={
        "help": "weight of the shift objective on the KL constraint's generic text (every reply position; needs "
                "kl_budget); 0: off"})
    kl_equality: bool = field(default=False, metadata={
        "help": "hold KL at c = ±1 *at* the budget (multipliers may go negative) instead of under it"})
    # objective "behaviour" (BiPO-like): the base model's own continuations of the chosen and rejected prompts
    beta: float = field(default=0.1, metadata={
        "help": "temperature of the behaviour objective's log-sigmoid on summed continuation log-ratios"})
    continuation_tokens: int = field(default=16, metadata={
        "help": "greedy tokens continued from each pair prompt for the behaviour objective"})

    def __post_init__(self):
        self._check_types()
        _positive_ints(self, "power", "continuation_tokens")
        _require(not self.balance or self.objective == "shift",
                 f"balance applies to objective 'shift', not {self.objective!r}: drop --balance or use "
                 "--objective shift")
        _require(self.beta > 0, f"beta must be > 0, got {self.beta}")
        _require(self.kl_budget is None or self.kl_budget > 0, "kl_budget must be > 0 or none, got "
                                                               f"{self.kl_budget}")
        _require(self.kl_dual_lr > 0, f"kl_dual_lr must be > 0, got {self.kl_dual_lr}")
        _require(self.w_text_shift == 0 or self.kl_budget is not None,
                 "w_text_shift reads the KL constraint's generic text: set kl_budget (--kl-budget 0.1) or drop it")
        for n in ("margin", "w_coherence", "w_mono", "mono_margin", "w_text_shift"):
            _require(getattr(self, n) >= 0, f"{n} must be >= 0, got {getattr(self, n)}")


@no_type_check
@dataclass(frozen=True)
class TrainConfig(Config):
    """Everything a training run depends on. Layer entries: an int is a block index, a float in (0, 1) a depth
    fraction (so one config fits models of any depth)."""

    layers: tuple[int | float, ...] = field(
        # blocks 15–21 of SmolLM2's 30: where held-out pairs start to separate along the mean difference, and
        # better at equal KL than earlier, wider ranges (docs/method.md; docs/results.md, "Ablations on sentiment")
        default=(0.52, 0.55, 0.59, 0.62, 0.66, 0.69, 0.72),
        metadata={"help": "adapted blocks: ints are indices, floats in (0, 1) depth fractions"})
    site: Site = field(default="mlp.out", metadata={"help": "the linear layer adapted in each block"})
    # the top singular triplets hold about as much of a concept direction as a random subspace; the most aligned
    # ones hold more, and need the larger rank to (docs/results.md, "Ablations on sentiment")
    rank: int = field(default=64, metadata={"help": "singular triplets rotated per site"})
    triplets: Triplets = field(default="aligned", metadata={
        "help": "which triplets: the largest singular values, or those whose output vectors are most aligned "
                "with the pairs' mean difference at that block (mlp.out/attn.o only)"})
    loss_layer: int | float = field(default=0.75, metadata={"help": "block whose resid_post the objective reads"})
    loss: LossConfig = field(default_factory=LossConfig)
    steps: int = field(default=48, metadata={"help": "optimiser steps"})
    batch_pairs: int = field(default=8, metadata={"help": "pairs per step (×2 rows, ×2 for c = ±1)"})
    lr: float = field(default=1e-2, metadata={"help": "AdamW learning rate"})
    # decay would pull λ, θ to 0, i.e. towards the base model, for free
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm (> 0)"})
    scale: Scale = field(default="exp", metadata={"help": "S_c = exp(cλ)⊙S or S + cλ"})
    rotate_u: bool = field(default=False, metadata={"help": "also rotate the output basis U"})
    # off by default: a bias term makes the adapter partly a steering vector (whose credit then is not the
    # rotation's), and Llama's down_proj has no bias to merge it into (docs/results.md, "Ablations on sentiment")
    bias: Bias = field(default="none", metadata={
        "help": "each adapted layer also writes c·b, b learnable: anywhere in its output space ('free'), or "
                "inside "
                "the adapter's own output subspace span(U), b = U w ('span'); 'none': rotation and scaling only; "
                "'only': c·b and nothing else, θ and λ held at 0 (a learned steering vector: --methods "
                "learned_vector)"})
    # θ and λ start small and non-zero (symmetry breaking: docs/method.md)
    init_scale: float = field(default=1e-2, metadata={"help": "std of the initial θ, λ (> 0)"})
    held_out: float = field(default=0.2, metadata={"help": "fraction of pairs held out, in [0, 1)"})
    n_pairs: int | None = field(default=None, metadata={"help": "subsample the pair set (none: all)"})
    seed: int = field(default=0, metadata={"help": "seeds the subsample, split, order and initialisation"})
    checkpoint_every: int = field(default=16, metadata={"help": "steps between checkpoints"})
    eval_every: int = field(default=0, metadata={
        "help": "steps between measurements of the held-out pairs' objective (the training curve); 0: none"})
    patience: int = field(default=0, metadata={
        "help": "stop once the held-out objective has not risen by 0.01 for this many measurements (steps is "
                "then the most it runs); 0: run every step"})
    eval_coeffs: tuple[float, ...] = field(default=(-1.0, 0.0, 1.0),
                                           metadata={"help": "coefficients of the held-out evaluation"})
    kl_texts: int = field(default=32, metadata={"help": "generic texts for the KL constraint (loss.kl_budget)"})
    kl_batch: int = field(default=4, metadata={"help": "generic texts per step (×2 for c = ±1)"})
    # greedy replies are the contexts where the model is most sure of itself, so KL there under-reports drift
    kl_sample: bool = field(default=False, metadata={
        "help": "sample the generic replies at temperature 1 (one fixed draw, shared by every seed), each prompt "
                "answered as often as kl_texts needs, instead of one greedy reply per prompt"})

    def __post_init__(self):
        self._check_types()
        _require(len(self.layers) > 0, "layers must name at least one block")
        _require(self.triplets == "top" or self.site in RESID_WRITERS,
                 f"triplets='aligned' needs a site that writes the residual stream ({', '.join(RESID_WRITERS)}); "
                 f"{self.site!r} does not: pass triplets='top' (--triplets top) with it")
        for v in (*self.layers, self.loss_layer):
            _require((isinstance(v, int) and v >= 0) or (isinstance(v, float) and 0 < v < 1),
                     f"layer {v!r}: use an int block index >= 0 or a float depth fraction in (0, 1)")
        _positive_ints(self, "rank", "steps", "batch_pairs", "checkpoint_every", "kl_texts", "kl_batch")
        _positive_ints(self, "seed", "eval_every", "patience", minimum=0)
        _require(self.patience == 0 or (self.eval_every > 0 and self.held_out > 0),
                 f"patience {self.patience} stops on the held-out objective: it needs eval_every > 0 and "
                 f"held_out > 0 (got eval_every {self.eval_every}, held_out {self.held_out})")
        _require(self.seed < 2 ** 63, f"seed must be below 2**63 (torch's generator seed), got {self.seed}")
        _require(self.n_pairs is None or self.n_pairs >= 2, f"n_pairs must be >= 2 or none, got {self.n_pairs}")
        _require(self.lr > 0, f"lr must be > 0, got {self.lr}")
        _require(self.grad_clip > 0, f"grad_clip must be > 0, got {self.grad_clip} (a negative clip would ascend)")
        _require(self.init_scale > 0, f"init_scale must be > 0, got {self.init_scale} (λ must start non-zero)")
        _require(not (self.bias == "only" and self.rotate_u),
                 "bias 'only' writes c·b alone: it has no rotation to turn U with; drop --rotate-u")
        _require(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        _require(0 <= self.held_out < 1, f"held_out must be in [0, 1), got {self.held_out}")
        _require(len(self.eval_coeffs) > 0, "eval_coeffs must hold at least one coefficient")
        _require(self.kl_sample or self.kl_texts <= KL_PROMPTS,
                 f"kl_texts {self.kl_texts} but greedy KL text has one reply to each of {KL_PROMPTS} prompts: use "
                 f"--kl-texts {KL_PROMPTS} or less, or --kl-sample to answer each prompt several times")
        # exp(c·λ) of the adapter's scaling overflows float32 long before |c| = 1e30; ±1 are the trained ends
        _require(all(abs(c) <= MAX_COEFF for c in self.eval_coeffs),
                 f"eval_coeffs must lie in [-{MAX_COEFF:g}, {MAX_COEFF:g}] (±1 are the trained directions), "
                 f"got {self.eval_coeffs}")


# ------------------------------------------------------------------------------------- the commands

@no_type_check
@dataclass(frozen=True)
class TrainRun(Config):
    """``interp-steer train``: where the pairs come from, where the artifact goes, and the TrainConfig."""

    out: str = field(default="runs/honesty", metadata={"help": "artifact directory to write"})
    model: str | None = field(default=None,
                              metadata={"help": "HF name or local directory (none: packaged SmolLM2)"})
    device: Device = field(default="auto", metadata={"help": "where the model runs (auto: cuda, else mps, else "
                                                             "cpu)"})
    dtype: DType = field(default="float32", metadata={"help": "the model's weight dtype (adapters stay float32)"})
    pairs: str | None = field(default=None, metadata={"help": "JSON list of {chosen, rejected} (none: honesty)"})
    personas: tuple[str, ...] | None = field(default=None, metadata={"help": "two personas, e.g. 'a happy,a sad'"})
    concept: str = field(default="honesty", metadata={"help": "whose pairs to train on, without pairs/personas"})
    data_dir: str | None = field(default=None, metadata={
        "help": "CAA-format directory for the caa-* concepts (BEHAVIOUR/generate_dataset.json, "
                "test_dataset_ab.json)"})
    resume: bool = field(default=False, metadata={"help": "continue from OUT.ckpt if it exists"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing artifact at OUT"})
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        self._check_types()
        _require(bool(self.out.strip()), "out must be a directory path")
        _model_name(self.model)
        _existing_file("pairs", self.pairs)
        _personas(self.personas)
        _require(not (self.pairs and self.personas), "give pairs or personas, not both")
        _data_dir(() if self.pairs or self.personas else (self.concept,), self.data_dir)


@no_type_check
@dataclass(frozen=True)
class SweepConfig(Config):
    """What the equal-coherence sweep measures, and on how many items (concepts.py, sweep.py)."""

    methods: tuple[MethodName, ...] = field(default=METHODS, metadata={"help": f"subset of {','.join(METHODS)}"})
    budget_metric: BudgetMetric = field(default="kl", metadata={"help": "coherence measure the budget is on"})
    budget: float = field(default=0.1, metadata={"help": "coherence budget on neutral text, nat/token"})
    # default subsample keeps `make demo` affordable on 2 CPU cores; pass larger values for papers
    n_items: int = field(default=34, metadata={"help": "items of the primary effect (e.g. dilemmas)"})
    n_secondary: int = field(default=8, metadata={
        "help": "sentiment's generated replies scored by VADER (0: skip); honesty's MC questions are n_items/4"})
    n_neutral: int = field(default=16, metadata={"help": "neutral texts for coherence (of 45)"})
    bisect: int = field(default=3, metadata={"help": "bisection steps of the budget search"})
    grid: tuple[float, ...] = field(default=(0.25, 0.5, 0.75, 1.25, 1.5, 2.0),
                                    metadata={"help": "extra dose points, as fractions of the budget crossing"})

    def __post_init__(self):
        self._check_types()
        _require(len(self.methods) > 0 and len(set(self.methods)) == len(self.methods),
                 f"methods must be distinct and at least one of {','.join(METHODS)}, got {self.methods}")
        _require(self.budget > 0, f"budget must be > 0 nat/token, got {self.budget}")
        _positive_ints(self, "n_items", "n_neutral")
        _positive_ints(self, "n_secondary", "bisect", minimum=0)
        _require(all(f > 0 for f in self.grid), f"grid fractions must be > 0, got {self.grid}")


@no_type_check
@dataclass(frozen=True)
class EvalRun(Config):
    """``interp-steer eval ARTIFACT``: sweep a trained adapter (and baselines from its training pairs)."""

    artifact: str = field(default="", metadata={"help": "artifact directory written by `interp-steer train`",
                                                "positional": True})
    out: str | None = field(default=None, metadata={"help": "report directory (none: ARTIFACT-eval)"})
    model: str | None = field(default=None, metadata={"help": "HF name or local directory (none: the artifact's)"})
    device: Device = field(default="auto", metadata={"help": "where the model runs (auto: cuda, else mps, else "
                                                             "cpu)"})
    dtype: DType = field(default="float32", metadata={"help": "the model's weight dtype (adapters stay float32)"})
    pairs: str | None = field(default=None, metadata={"help": "the pairs file (none: what the artifact records)"})
    personas: tuple[str, ...] | None = field(default=None,
                                             metadata={"help": "the personas (none: the artifact's)"})
    overwrite: bool = field(default=False, metadata={"help": "write over an earlier report in OUT"})
    concept: str | None = field(default=None, metadata={"help": "whose effects to measure (none: the artifact's)"})
    data_dir: str | None = field(default=None, metadata={
        "help": "CAA-format directory for the caa-* concepts (BEHAVIOUR/generate_dataset.json, "
                "test_dataset_ab.json)"})
    sweep: SweepConfig = field(default_factory=lambda: SweepConfig(methods=("adapter",)))

    def __post_init__(self):
        self._check_types()
        _require(bool(self.artifact.strip()), "give the artifact directory to evaluate")
        _model_name(self.model)
        _existing_file("pairs", self.pairs)
        _personas(self.personas)
        _data_dir((self.concept,) if self.concept else (), self.data_dir)

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out else Path(self.artifact.rstrip("/") + "-eval")


# The quick demo (`interp-steer demo`, `make demo`): the methods the field compares, a short training run and a
# coarse sweep, so both concepts finish in minutes on 2 CPU cores (CONTRIBUTING.md, "Demo"). `--powered` is the
# full protocol; its measured duration is in CONTRIBUTING.md too.
DEMO_TRAIN = {"steps": 8, "kl_texts": 12, "n_pairs": 64}
DEMO_SWEEP = {"methods": ("adapter", "mean_diff", "pca_diff", "random", "prompting"), "n_items": 12,
              "n_secondary": 0, "n_neutral": 8, "bisect": 1, "grid": (0.5,)}
# Powered: >= 100 held-out items, every neutral text, a tight bracket and 8 measured points per dose curve, all
# within 1.5x the budget (the bracket's two ends and 6 fractions of c*; KL grows about as c^2, so 1.15 c* costs
# about 1.3x the budget); no VADER (16 replies gave intervals wider than the differences reported); 256 pairs
# (205 to train on, the rest held out: the reference and baseline captures stay minutes on long A/B prompts).
POWERED = {"train": {"steps": 96, "eval_every": 8, "patience": 3, "kl_texts": 32, "n_pairs": 256},
           "sweep": {"methods": METHODS, "n_items": 220, "n_secondary": 0, "n_neutral": 45, "bisect": 3,
                     "grid": (0.2, 0.4, 0.6, 0.8, 0.9, 1.15)}}


class _Preset:
    """The quick preset (``DEMO_TRAIN``/``DEMO_SWEEP``) under the given ``train``/``sweep`` fields, or ``POWERED``
    with ``powered``: for ``from_dict`` (the CLI's options, a run_config.json) and for Python construction."""

    @classmethod
    def from_dict(cls, d: Any, where: str = "") -> Any:
        if isinstance(d, dict):
            powered = d.get("powered", cls.__dataclass_fields__["powered"].default)  # type: ignore[attr-defined]
            preset = POWERED if powered is True else {"train": DEMO_TRAIN, "sweep": DEMO_SWEEP}
            d = dict(d)
            for name, values in preset.items():
                given = d.get(name, {})
                if isinstance(given, dict):
                    d[name] = {**{k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}, **given}
        return super().from_dict(d, where)  # type: ignore[misc]

    def _apply_powered(self) -> None:
        """``X(powered=True)`` in Python: powered values wherever a field holds the quick one."""
        if self.powered:  # type: ignore[attr-defined]
            quick = {"train": DEMO_TRAIN, "sweep": DEMO_SWEEP}
            for name, preset in POWERED.items():
                current = getattr(self, name)
                fields = type(current).__dataclass_fields__  # a field the quick preset leaves: its default
                changes = {k: v for k, v in preset.items()
                           if getattr(current, k) == quick[name].get(k, fields[k].default)}
                object.__setattr__(self, name, current.replace(**changes))

    def _check_run(self, models: tuple[str | None, ...]) -> None:
        """What a demo and a study check alike, in this order: the field types, the powered preset, OUT, the
        models (distinct), the concepts and the seeds."""
        self._check_types()  # type: ignore[attr-defined]
        self._apply_powered()
        _require(bool(self.out.strip()), "out must be a directory path")  # type: ignore[attr-defined]
        _require(len(models) > 0 and len(set(models)) == len(models),
                 f"models must be distinct and at least one, got {models}")
        for m in models:
            _model_name(m)
        _require(len(self.concepts) > 0 and len(set(self.concepts)) == len(self.concepts),  # type: ignore[attr-defined]
                 f"concepts must be distinct and at least one, got {self.concepts}")  # type: ignore[attr-defined]
        # the directory is read (and checked) when cells run: a report from finished cells reads no data, so a
        # committed study reports on a machine without it
        _data_dir(self.concepts, self.data_dir, must_exist=False)  # type: ignore[attr-defined]
        seeds = self.seeds  # type: ignore[attr-defined]
        _require(len(seeds) > 0 and len(set(seeds)) == len(seeds) and min(seeds) >= 0,
                 f"seeds must be distinct integers >= 0, at least one, got {seeds}")


@no_type_check
@dataclass(frozen=True)
class DemoRun(_Preset, Config):
    """``interp-steer demo``: per concept, train the adapter (one artifact per seed), sweep every method at equal
    coherence, write its report and figures; an index ``REPORT.md`` over the concepts."""

    out: str = field(default="runs/demo", metadata={"help": "run directory (one sub-directory per concept)"})
    model: str | None = field(default=None,
                              metadata={"help": "HF name or local directory (none: packaged SmolLM2)"})
    device: Device = field(default="auto", metadata={"help": "where the model runs (auto: cuda, else mps, else "
                                                             "cpu)"})
    dtype: DType = field(default="float32", metadata={"help": "the model's weight dtype (adapters stay float32)"})
    overwrite: bool = field(default=False, metadata={"help": "write over an earlier demo in OUT"})
    concepts: tuple[str, ...] = field(default=("honesty", "sentiment"),
                                      metadata={"help": "what to steer, each with its own pairs and effects"})
    seeds: tuple[int, ...] = field(default=(0,), metadata={
        "help": "training seeds of the adapter (>= 3 for a CI over seeds; each seed is a training run)"})
    data_dir: str | None = field(default=None, metadata={
        "help": "CAA-format directory for the caa-* concepts (BEHAVIOUR/generate_dataset.json, "
                "test_dataset_ab.json)"})
    powered: bool = field(default=False, metadata={
        "help": "the full protocol (every method, 100 items, 45 neutral texts, finer sweep, 48 training steps) "
                "instead of the quick demo; options given beside it still apply"})
    train: TrainConfig = field(default_factory=lambda: TrainConfig(**DEMO_TRAIN))
    sweep: SweepConfig = field(default_factory=lambda: SweepConfig(**DEMO_SWEEP))

    def __post_init__(self):
        self._check_run((self.model,))


@no_type_check
@dataclass(frozen=True)
class StudyRun(_Preset, Config):
    """``interp-steer study``: models × concepts × seeds, each cell (one model, concept and training seed: its
    adapter and every method's sweep) in its own directory, resumable and shardable; then one report."""

    out: str = field(default="runs/study", metadata={"help": "study directory (cells/, REPORT.md, results.json)"})
    models: tuple[str, ...] = field(default=("smollm2-135m", "gemma-3-270m"), metadata={
        "help": "packaged names (smollm2-135m, gemma-3-270m), HF names or local directories"})
    concepts: tuple[str, ...] = field(default=("honesty", "sentiment"), metadata={"help": "what to steer"})
    seeds: tuple[int, ...] = field(default=(0, 1, 2), metadata={"help": "training seeds: one cell each"})
    data_dir: str | None = field(default=None, metadata={
        "help": "CAA-format directory for the caa-* concepts (BEHAVIOUR/generate_dataset.json, "
                "test_dataset_ab.json)"})
    device: Device = field(default="auto", metadata={"help": "where the model runs (auto: cuda, else mps, else "
                                                             "cpu)"})
    dtype: DType = field(default="float32", metadata={"help": "the model's weight dtype (adapters stay float32)"})
    shard: str | None = field(default=None, metadata={
        "help": "I/N: run every N-th cell from the I-th (0-based); under torchrun: the rank and world size"})
    overwrite: bool = field(default=False, metadata={"help": "recompute finished cells too (else they are kept)"})
    powered: bool = field(default=True, metadata={
        "help": "the powered protocol (config.POWERED); --no-powered: the quick demo's sizes"})
    report_only: bool = field(default=False, metadata={"help": "write the report from finished cells; run none"})
    train: TrainConfig = field(default_factory=lambda: TrainConfig(**DEMO_TRAIN))
    sweep: SweepConfig = field(default_factory=lambda: SweepConfig(**DEMO_SWEEP))

    def __post_init__(self):
        self._check_run(self.models)
        if self.shard is not None:
            self.shard_index()

    def shard_index(self) -> tuple[int, int]:
        """``(i, n)`` of ``shard`` ("I/N", 0 <= I < N)."""
        try:
            i, n = (int(x) for x in str(self.shard).split("/"))
        except ValueError:
            raise ConfigError(f"shard must be I/N with integers 0 <= I < N (e.g. 0/4), got {self.shard!r}") from None
        _require(0 <= i < n, f"shard must be I/N with 0 <= I < N, got {self.shard!r}")
        return i, n

    def study_fields(self) -> dict:
        """What decides the cells' results: two runs with equal ``study_fields`` may share finished cells."""
        d = self.to_dict()
        return {k: d[k] for k in ("train", "sweep", "dtype")}


@no_type_check
@dataclass(frozen=True)
class ExportRun(Config):
    """``interp-steer export ARTIFACT --out DIR --format F --coeff C``: the steer at c as a merged HF model, a peft
    LoRA, or (an additive steer from the artifact's pairs) a llama.cpp control vector (storage/exports.py)."""

    artifact: str = field(default="", metadata={"help": "artifact directory written by `interp-steer train`",
                                                "positional": True})
    out: str = field(default="", metadata={"help": "export directory to write"})
    format: ExportFormat | None = field(default=None, metadata={"help": "merged, lora or control-vector"})
    # c = +1 is the direction the adapter was trained for; a control vector's c is in RMS-norm units (as in eval)
    coeff: float = field(default=1.0, metadata={"help": "steering coefficient c baked into the export"})
    method: VectorMethod | None = field(default=None, metadata={
        "help": "additive steer of a control vector, from the artifact's pairs at its adapted blocks"})
    model: str | None = field(default=None, metadata={"help": "HF name or local directory (none: the artifact's)"})
    pairs: str | None = field(default=None, metadata={
        "help": "the pairs file a control vector is built from (none: what the artifact records)"})
    overwrite: bool = field(default=False, metadata={"help": "replace an earlier export at OUT"})
    data_dir: str | None = field(default=None, metadata={
        "help": "CAA-format directory for the caa-* concepts (BEHAVIOUR/generate_dataset.json, "
                "test_dataset_ab.json)"})

    def __post_init__(self):
        self._check_types()
        _require(bool(self.artifact.strip()), "give the artifact directory to export")
        _require(bool(self.out.strip()), "give --out, the export directory to write")
        _require(self.format is not None, "give --format: merged, lora or control-vector")
        _require(self.format == "control-vector" or self.method is None,
                 f"method is only for --format control-vector (the {self.format} export is the adapter itself)")
        _require(self.format != "control-vector" or self.method is not None,
                 "give --method (pca_diff, pca_center, mean_diff or gradient) for a control vector")
        _require(self.format == "control-vector" or self.pairs is None,
                 f"pairs is only for --format control-vector (the {self.format} export is the adapter itself)")
        _existing_file("pairs", self.pairs)
        _model_name(self.model)
        _existing_dir("data_dir", self.data_dir)


COMMANDS: dict[str, type] = {"train": TrainRun, "eval": EvalRun, "demo": DemoRun, "study": StudyRun,
                             "export": ExportRun}


def load_run_config(path: str | Path) -> tuple[str, dict]:
    """``(command, fields)`` of a saved ``run_config.json`` ({"command": ..., "config": {...}})."""
    path = Path(path)
    if path.exists() and not path.is_file():  # a FIFO would block the read forever
        raise ConfigError(f"cannot read config {path}: it is not a regular file (a directory, a FIFO or a "
                          "device); "
                          "give a run_config.json")
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ConfigError(f"cannot read config {path}: {e.__class__.__name__}: {e}") from None
    if not (isinstance(doc, dict) and doc.get("command") in COMMANDS and isinstance(doc.get("config"), dict)):
        raise ConfigError(f"{path}: expected {{\"command\": one of {sorted(COMMANDS)}, \"config\": {{...}}}} "
                          "as written beside every run's outputs (run_config.json)")
    return doc["command"], doc["config"]


def run_config_doc(command: str, cfg: Config) -> dict:
    """What ``run_config.json`` holds: the command and its resolved config."""
    return {"command": command, "config": cfg.to_dict()}


__all__ = ["ConfigError", "LossConfig", "TrainConfig", "TrainRun", "SweepConfig", "EvalRun", "DemoRun", "StudyRun",
           "ExportRun",
           "METHODS", "ExportFormat", "VectorMethod", "Objective", "Scale", "Bias", "Site", "Triplets",
           "MethodName", "Device", "DType", "load_run_config", "run_config_doc", "COMMANDS"]
