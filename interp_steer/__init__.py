"""interp-steer: reversible SVD-rotation steering adapters learned from contrastive pairs, on TransformerLens hooks.

The public face, for notebooks and scripts (``import interp_steer as ist``)::

    bridge, tok = ist.load_model()                       # packaged SmolLM2-135M-Instruct, offline
    pairs = ist.persona_pairs(tok)                       # honesty persona × suffix pairs
    result = ist.train(bridge, tok, pairs, ist.TrainConfig(steps=8), "runs/quick")
    art = ist.SteeringArtifact.load("runs/quick", bridge)
    with art.apply(bridge, c=1.0):
        logits = bridge(ids)

These 27 names are the face; everything else stays importable from its module. The package is grouped by role,
each group importing only from the ones above it (``tests/test_layout.py`` holds the order):

    names, config, registry, progress, signals   the shared vocabulary (no torch)
    method/       pairs and batches, models, hidden states, prefix reuse, the adapter, the loss, directions
    storage/      manifests and claims, artifacts, exports
    evaluation/   concepts, item sets (dilemmas, CAA's A/B), scores, Steering F1
    training/     the loop and its objectives, one process or many
    comparison/   the sweep to one coherence budget, the report, its figures
    app/          the command line, its commands, the study

Names resolve lazily, so ``import interp_steer`` (and the CLI's argument checking) costs no torch import.

Models and data
    ``load_model``      a packaged model by name (``smollm2-135m``, ``gemma-3-270m``) or a local HF directory
    ``ContrastivePair`` one chosen / rejected prompt pair
    ``persona_pairs``   the honesty persona × suffix pairs (or any two personas)
    ``split_pairs``     a seeded train / held-out split
    ``pair_batches``    pairs tokenized into padded, interleaved batches
Training and the adapter
    ``TrainConfig``, ``LossConfig``  every training setting, typed, with its default
    ``train``           train adapters on pairs; ``TrainResult`` (artifact, reference states, history)
    ``TrainResult``
    ``SteeringArtifact``  a trained steer: ``load``, ``save``, ``apply(bridge, c)``
    ``apply_adapters``  adapters at coefficient c through hooks (c = 0: exactly the base model)
    ``export``          an artifact as a merged HF model, a peft LoRA or a llama.cpp control vector
Hidden states and directions
    ``capture``         last-token states at hook points
    ``resid_post``, ``layer_of``  hook names from block indices and back
    ``direction``       a direction from paired states (dHS SVD, PCA, mean difference)
    ``steering_vector`` an additive steering vector per layer, in RMS units of the residual stream
Concepts and effects
    ``Concept``, ``register``, ``get_concept``  what to steer and how to measure it (honesty, sentiment, yours)
    ``reply_options_effect``  a judge-free effect: log-odds of one reply against another
    ``forced_choice``, ``load_dilemmas``  honesty dilemmas scored by forced choice
    ``greedy_continuations``  steered greedy text
The comparison
    ``SweepConfig``     a sweep: methods, KL budget, items
    ``StudyRun``, ``run_study``  models × concepts × methods × seeds, resumable, one report
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "names": ("resid_post", "layer_of"),
    "config": ("TrainConfig", "LossConfig", "SweepConfig", "StudyRun"),
    "method.models": ("load_model",),
    "method.data": ("ContrastivePair", "persona_pairs", "pair_batches", "split_pairs"),
    "method.states": ("capture",),
    "method.adapter": ("apply_adapters",),
    "method.directions": ("direction", "steering_vector"),
    "storage.io": ("SteeringArtifact",),
    "training.loop": ("train", "TrainResult"),
    "evaluation.evaluate": ("forced_choice", "load_dilemmas"),
    "app.study": ("run_study",),
    "storage.exports": ("export",),
    "evaluation.concepts": ("Concept", "register", "get_concept", "reply_options_effect", "greedy_continuations"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'interp_steer' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
