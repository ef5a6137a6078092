"""Every steering method, registered once: its name, what kind of steer it is, what its coefficient means, whether
a llama.cpp control vector can hold it, its colour in figures, and the function that builds it.

The config's ``MethodName`` and ``VectorMethod``, the report's additive set, the figures' colours and the export's
control-vector check all read this table, so a new method is one ``register(...)`` here and its build function
(CONTRIBUTING.md, "Where to add things", has a worked example). Nothing here imports torch: the build function is
named as ``"module:function"`` and imported when a sweep first needs it.

A build function takes ``(spec, ctx)``, ``ctx`` being a ``sweep.BuildContext`` (the model, the trained artifacts,
the training pairs' c = 0 states at the adapted blocks, their batches, the concept), and returns the
``sweep.Method`` objects to sweep (the adapter gives one per artifact: one per training seed).
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import Callable, Generic, Literal, TypeVar, no_type_check

T = TypeVar("T")


class Registry(dict, Generic[T]):
    """Names to what they name (methods, export formats, concepts): one rule for a name registered twice (refused
    unless ``replace=True``) and one error for a name not registered, listing those that are. Read it as a dict."""

    def __init__(self, what: str):
        super().__init__()
        self.what = what

    def add(self, name: str, item: T, *, replace: bool = False) -> T:
        if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_-]*", name):
            raise ValueError(f"{self.what} name {name!r} must be lower-case letters, digits, '_' and '-'")
        if name in self and not replace:
            raise ValueError(f"{self.what} {name!r} is registered already (pass replace=True to replace it)")
        self[name] = item
        return item

    def find(self, name: str, hint: str = "") -> T:
        if name not in self:
            raise ValueError(f"unknown {self.what} {name!r}; registered: {', '.join(self)}{hint}")
        return self[name]

Kind = Literal["adapter", "additive", "control", "prompting"]
KINDS: tuple[str, ...] = ("adapter", "additive", "control", "prompting")


@no_type_check  # register() validates a spec with clearer messages than the test run's runtime type checker
@dataclass(frozen=True)
class MethodSpec:
    """One steering method. ``kind``: ``adapter`` (a trained artifact), ``additive`` (a vector added to the
    residual stream, a contender for "best additive baseline"), ``control`` (an additive vector that is a null
    control, never a contender), ``prompting`` (a system prompt; it changes the tokens)."""

    name: str
    kind: Kind
    color: str
    unit: str                      # what c means for this method
    build: str | Callable          # "module:function" or the function itself: (spec, ctx) -> list[sweep.Method]
    control_vector: bool = False   # a llama.cpp control vector can hold it (an additive steer from the pairs)
    description: str = ""
    # built by a training run like the adapter's (its steps count in the progress plan)
    trains: bool = False

    def builder(self) -> Callable:
        if callable(self.build):
            return self.build
        module, _, name = self.build.partition(":")
        return getattr(importlib.import_module(module), name)


REGISTRY: Registry[MethodSpec] = Registry("method")


def register(spec: MethodSpec, *, replace: bool = False) -> MethodSpec:
    """Make ``spec`` a method of every sweep, report and figure (``--methods NAME``)."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", spec.name):
        raise ValueError(f"method name {spec.name!r} must be lower-case letters, digits and '_'")
    if spec.kind not in KINDS:
        raise ValueError(f"method {spec.name!r}: kind must be one of {', '.join(KINDS)}, got {spec.kind!r}")
    if not re.fullmatch(r"#[0-9a-fA-F]{6}", spec.color):
        raise ValueError(f"method {spec.name!r}: color must be '#rrggbb', got {spec.color!r}")
    if spec.control_vector and spec.kind not in ("additive",):
        raise ValueError(f"method {spec.name!r}: only an additive method can be written as a control vector")
    if not (callable(spec.build) or re.fullmatch(r"[\w.]+:\w+", spec.build)):
        raise ValueError(f"method {spec.name!r}: build must be a function or 'module:function', got {spec.build!r}")
    return REGISTRY.add(spec.name, spec, replace=replace)


def get_method(name: str) -> MethodSpec:
    return REGISTRY.find(name)


def names(kind: str | None = None, control_vector: bool | None = None) -> tuple[str, ...]:
    """Registered names in registration order, optionally of one kind or by whether a control vector holds them."""
    return tuple(n for n, s in REGISTRY.items() if (kind is None or s.kind == kind)
                 and (control_vector is None or s.control_vector == control_vector))


def color(label: str) -> str:
    """A method's colour; labels such as ``adapter@1`` or ``adapter (3 seeds)`` take their method's."""
    spec = REGISTRY.get(label.split("@")[0].split(" (")[0])
    return spec.color if spec else "#333333"


_RMS = "one RMS norm of the residual stream at each adapted block per unit of c"
_ADDITIVE = "interp_steer.comparison.sweep:build_additive"

register(MethodSpec("adapter", "adapter", "#d62728", "the trained coefficient: ±1 are the directions it was "
                                                     "trained for",
                    "interp_steer.comparison.sweep:build_adapter", description="the SVD rotation adapter (one per artifact)"))
register(MethodSpec("pca_diff", "additive", "#1f77b4", _RMS, _ADDITIVE, True,
                    "first principal component of the pair differences (repeng's pca_diff)"))
register(MethodSpec("pca_center", "additive", "#17becf", _RMS, _ADDITIVE, True,
                    "first principal component of the centred pair states (repeng's pca_center)"))
register(MethodSpec("mean_diff", "additive", "#2ca02c", _RMS, _ADDITIVE, True,
                    "mean of the pair differences (DiffMean, CAA)"))
register(MethodSpec("gradient", "additive", "#9467bd", _RMS, _ADDITIVE, True,
                    "mean gradient of the objective with respect to each block's output"))
register(MethodSpec("learned_vector", "additive", "#8c564b", "the trained coefficient: ±1 are the directions it "
                                                             "was "
                    "trained for", "interp_steer.comparison.sweep:build_learned_vector", trains=True,
                    description="a vector per adapted block trained by the adapter's objective and KL constraint "
                                "(bias='only'; of the kind of BiPO and ReFT-r1)"))
register(MethodSpec("random", "control", "#7f7f7f", _RMS, _ADDITIVE,
                    description="a random direction, sign-oriented by the pairs: the null control"))
register(MethodSpec("prompting", "prompting", "#ff7f0e", "±1: the concept's two system prompts",
                    "interp_steer.comparison.sweep:build_prompting", description="the concept's system prompts"))

__all__ = ["Registry", "MethodSpec", "REGISTRY", "register", "get_method", "names", "color", "KINDS"]
