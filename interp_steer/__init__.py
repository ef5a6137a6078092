"""interp-steer: reversible SVD-rotation steering adapters learned from contrastive pairs, on TransformerLens hooks.

The public face, for notebooks and scripts (``import interp_steer as ist``)::

    bridge, tok = ist.load_model()                       # packaged SmolLM2-135M-Instruct, offline
    pairs = ist.persona_pairs(tok)                       # honesty persona × suffix pairs
    result = ist.train(bridge, tok, pairs, ist.TrainConfig(steps=8), "runs/quick")
    art = ist.SteeringArtifact.load("runs/quick", bridge)
    with ist.apply_adapters(bridge, art.adapters, c=1.0):
        logits = bridge(ids)

Names resolve lazily, so ``import interp_steer`` (and the CLI's argument checking) costs no torch import.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

_EXPORTS = {
    "names": ("resid_post", "resid_names", "layer_of", "site_layer", "site_name", "check_site", "SITES"),
    "config": ("TrainConfig", "LossConfig", "SweepConfig", "TrainRun", "EvalRun", "DemoRun", "ExportRun", "StudyRun",
               "ConfigError"),
    "methods": ("MethodSpec", "get_method"),
    "models": ("load_model", "tiny_model", "DEFAULT_MODEL", "available_devices"),
    "data": ("ContrastivePair", "Batch", "persona_pairs", "minimal_pairs", "pair_batches", "tokenize", "render_chat",
             "select_pairs", "split_pairs", "load_pairs_file", "token_difference", "check_pairs"),
    "capture": ("capture", "forward_last", "check_hook_names", "reference_pass"),
    "adapter": ("AdapterSpec", "SVDAdapter", "apply_adapters", "merged_weights", "make_adapters", "cayley",
                "available_sites"),
    "directions": ("direction", "steering_vector", "SteeringVector", "gradient_directions", "paired_diff",
                   "dhs_svd_direction"),
    "plots": ("figure", "save"),
    "loss": ("steering_loss", "token_logprobs", "token_mask", "delta_nll"),
    "io": ("SteeringArtifact", "save_artifact", "load_artifact"),
    "train": ("train", "TrainResult", "adapter_specs", "resolve_layer"),
    "evaluate": ("coherence", "coherence_reference", "forced_choice", "truthfulqa_mc", "iso_coherence",
                 "evaluate_pairs", "load_dilemmas", "load_neutral_texts", "load_truthfulqa_csv"),
    "sweep": ("run_sweep", "SweepData", "adapter_method", "vector_method", "prompting_method"),
    "commands": ("run_train", "run_eval", "run_demo", "run_export", "load_pairs"),
    "study": ("run_study",),
    "export": ("save_merged", "save_lora", "save_control_vector", "read_control_vector", "hf_module_name",
               "hf_state_dict"),
    "concepts": ("Concept", "Effect", "CONCEPTS", "register", "get_concept", "reply_options_effect",
                 "generation_sentiment_effect", "greedy_continuations"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)
# Functions named like the module that holds them. Importing a submodule makes Python set it as an attribute of
# its package, which would make ``ist.train`` the module once anything imported ``interp_steer.train``: the
# package keeps these names for the functions (the modules stay importable: ``importlib.import_module``).
_SHADOWED = frozenset(n for n in _WHERE if n == _WHERE[n])


class _Face(types.ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        if name in _SHADOWED and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Face


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'interp_steer' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
