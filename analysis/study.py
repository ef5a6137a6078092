"""The real-model study behind the figures: one quick adapter on the default model and every capture it needs.

``Study(StudyConfig())`` computes each piece once, on first use (model, split, training with output-subspace
snapshots, captures at every layer at c = 0 and c = ±1, the dHS report, gradients, PCA vs learned), and
``Study.summary()`` returns the numbers as plain data: what ``analysis.figures`` draws and stores.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from functools import cached_property
from typing import Callable, Literal


@dataclass(frozen=True)
class StudyConfig:
    """Sizes of the real-model study (defaults: ``all`` in a few minutes on 2 CPU cores)."""

    pairs: int = 96              # persona pairs (80 % train, 20 % held out)
    steps: int = 16              # optimiser steps of the quick adapter
    loss_layer: int = 22         # the seed method's prototype layout: loss at 22, adapters on 8–20
    layers: tuple[int, ...] = (8, 10, 12, 14, 16, 18, 20)
    rank: int = 32               # r of the adapters and of the weight subspaces
    # the figures compare the adapter's output with the top-r singular subspace (the README's numbers): top
    # triplets, whatever the package's default
    triplets: Literal["top", "aligned"] = "top"
    k: int = 4                   # dHS / output directions compared
    grad_pairs: int = 32         # training pairs used for the gradients (forward + backward: the cost)
    snapshot_every: int = 4      # steps between output-subspace snapshots
    seed: int = 0
    objective: Literal["shift", "separation"] | None = None  # None: LossConfig's default (the package's choice)
    model: str | None = None     # None: the packaged SmolLM2-135M-Instruct
    kl_budget: float | None = 0.1  # the KL constraint on generic text (LossConfig's default); None: off

    def train_config(self):
        from interp_steer.config import LossConfig, TrainConfig

        loss = LossConfig(kl_budget=self.kl_budget) if self.objective is None else \
            LossConfig(objective=self.objective, kl_budget=self.kl_budget)
        return TrainConfig(layers=self.layers, loss_layer=self.loss_layer, rank=self.rank, steps=self.steps,
                           triplets=self.triplets, n_pairs=self.pairs, seed=self.seed, checkpoint_every=10**9,
                           loss=loss)


def _log(msg: str) -> None:
    print(f"[analysis] {msg}", file=sys.stderr, flush=True)


class Study:
    """Model, pairs, one quick adapter and every capture, each computed once on first use."""

    def __init__(self, cfg: StudyConfig):
        self.cfg = cfg
        self.timings: dict[str, float] = {}

    def _timed(self, name: str, fn: Callable):
        t = time.perf_counter()
        value = fn()
        self.timings[name] = round(time.perf_counter() - t, 1)
        _log(f"{name}: {self.timings[name]} s")
        return value

    @cached_property
    def model(self):
        from interp_steer.method.models import load_model

        return self._timed("load_model", lambda: load_model(self.cfg.model))

    @property
    def bridge(self):
        return self.model[0]

    @property
    def layers(self) -> list[int]:
        return list(range(self.bridge.cfg.n_layers))

    @cached_property
    def split(self):
        """The same subsample and split as ``train`` (checked against its batches in ``result``)."""
        from interp_steer.method.data import persona_pairs, select_pairs

        tc = self.cfg.train_config()
        return select_pairs(persona_pairs(self.model[1]), tc.n_pairs, tc.held_out, tc.seed)

    @cached_property
    def test_batches(self):
        from interp_steer.method.data import pair_batches

        return list(pair_batches(self.split[1], self.model[1], 16))

    @cached_property
    def trained(self):
        import torch

        from interp_steer.method.adapter import make_adapters
        from interp_steer.method.data import pair_batches, persona_pairs
        from interp_steer.training.loop import adapter_specs, train

        from .pca_vs_learned import SubspaceTracker

        tc, tok, split = self.cfg.train_config(), self.model[1], self.split
        tracker = SubspaceTracker(every=self.cfg.snapshot_every, k=self.cfg.k)
        # train() seeds its adapters deterministically: rebuild them to record the state before step 1
        tracker.record(0, make_adapters(self.bridge, adapter_specs(tc, self.bridge.cfg.n_layers), seed=tc.seed,
                                        init_scale=tc.init_scale))
        pairs = persona_pairs(tok)
        result = self._timed("train", lambda: train(self.bridge, tok, pairs, tc, progress=True, callback=tracker))
        first = next(pair_batches(split[0], tok, tc.batch_pairs))
        if not torch.equal(first.input_ids, result.train_batches[0].input_ids):
            raise RuntimeError("the study's train/held-out split differs from train()'s; update Study.split")
        return result, tracker

    @property
    def result(self):
        return self.trained[0]

    # Each step resolves what it depends on before its timer starts, so the timings do not nest.
    @cached_property
    def hs_train(self):
        from .dhs import capture_layers

        batches, layers = self.result.train_batches, self.layers
        return self._timed("capture_train", lambda: capture_layers(self.bridge, batches, layers))

    @cached_property
    def hs_test(self):
        from .dhs import capture_layers

        batches, layers = self.test_batches, self.layers
        return self._timed("capture_test", lambda: capture_layers(self.bridge, batches, layers))

    @cached_property
    def hs_test_signed(self):
        """Held-out states at c = +1 and c = −1 (one forward per batch, a coefficient per row)."""
        from .dhs import capture_both_signs

        batches, layers, adapters = self.test_batches, self.layers, self.result.adapters
        return self._timed("capture_test_pm",
                           lambda: capture_both_signs(self.bridge, batches, layers, adapters, 1.0))

    @cached_property
    def dhs_report(self):
        from .dhs import analyse_dhs

        hs, test, plus = self.hs_train, self.hs_test, self.hs_test_signed[0]
        return self._timed("analyse_dhs", lambda: analyse_dhs(
            self.bridge, hs, hs_test=test, hs_pi=plus, hs_pi_ref=test, rank=self.cfg.rank, k=self.cfg.k))

    @cached_property
    def grad_batches(self):
        from interp_steer.method.data import pair_batches

        return list(pair_batches(self.split[0][: self.cfg.grad_pairs], self.model[1], 8))

    @cached_property
    def layer_map(self):
        from .gradients import layer_map, noref_gradient_directions, training_loss_gradients

        r, batches, hs = self.result, self.grad_batches, self.hs_train
        upto = [L for L in self.layers if L <= self.cfg.loss_layer]
        grad = self._timed("grad_train", lambda: training_loss_gradients(
            self.bridge, batches, upto, r.loss_hook, r.d_steer, cfg=r.artifact.config.loss,
            scale=r.metrics["scale"]))
        noref = self._timed("grad_noref", lambda: noref_gradient_directions(
            self.bridge, batches, upto, r.loss_hook, r.d_steer))
        # = gradients.effective_directions, from the ±1 captures that dhs_spectra uses too (one pass, not two)
        plus, minus = self.hs_test_signed
        learned = {L: (plus[L] - minus[L]).double().mean(0).float() for L in self.layers}
        return layer_map(hs, grad, noref, learned)

    @cached_property
    def pca_vs_learned(self):
        from .pca_vs_learned import over_training, per_layer

        (result, tracker), hs = self.trained, self.hs_train
        return self._timed("pca_vs_learned", lambda: {
            "per_layer": per_layer(hs, result.adapters, k=self.cfg.k).to_dict(),
            "over_training": over_training(tracker, hs)})

    def summary(self) -> dict:
        """Everything computed so far, as plain data (what the figures draw and ``--summary`` stores)."""
        out: dict = {"config": asdict(self.cfg), "train_config": self.cfg.train_config().to_dict(),
                     "timings_s": self.timings, "n_layers": self.bridge.cfg.n_layers}
        if "trained" in self.__dict__:
            r = self.result
            out["train"] = {"loss_hook": r.loss_hook, "held_out": r.metrics.get("held_out"),
                            "scale": r.metrics.get("scale"), "first": r.history[0], "last": r.history[-1],
                            "n_train_pairs": len(self.split[0]), "n_test_pairs": len(self.split[1])}
        for key in ("dhs_report", "layer_map"):
            if key in self.__dict__:
                out[key] = self.__dict__[key].to_dict()
        if "pca_vs_learned" in self.__dict__:
            out["pca_vs_learned"] = self.pca_vs_learned
        return out
