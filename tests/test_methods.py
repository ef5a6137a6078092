"""The method registry: one entry per method, read by the config, the report, the figures and the export; a method
registered at run time is built and swept like the others."""

import re
from typing import get_args

import pytest

from interp_steer import registry
from interp_steer.config import METHODS, ExportRun, MethodName, SweepConfig, VectorMethod
from interp_steer.names import layer_of
from interp_steer.registry import MethodSpec, get_method, register


def test_every_reader_takes_the_registry():
    from interp_steer.comparison.plots import COLORS, _color

    assert METHODS == get_args(MethodName) == tuple(registry.REGISTRY)
    assert get_args(VectorMethod) == registry.names(control_vector=True) == ("pca_diff", "pca_center", "mean_diff",
                                                                            "gradient")
    assert registry.names("additive") == ("pca_diff", "pca_center", "mean_diff", "gradient", "learned_vector")
    assert [n for n in METHODS if get_method(n).trains] == ["learned_vector"]
    assert registry.names("control") == ("random",)
    assert all(COLORS[n] == get_method(n).color for n in METHODS)
    assert len(set(COLORS.values())) == len(COLORS), COLORS  # no two methods or quantities share a colour
    assert _color("adapter@1") == _color("adapter (3 seeds)") == get_method("adapter").color
    for name in METHODS:  # every entry's build function resolves
        assert callable(get_method(name).builder())
    with pytest.raises(Exception, match=re.escape("must be one of adapter, pca_diff") + ".*got 'nope'"):
        SweepConfig.from_dict({"methods": ["adapter", "nope"]})
    with pytest.raises(Exception, match=re.escape(
            "must be one of pca_diff, pca_center, mean_diff, gradient or none, got 'random'")):
        ExportRun.from_dict({"artifact": "a", "out": "b", "format": "control-vector", "method": "random"})


@pytest.mark.parametrize("kw, match", [
    ({"name": "Bad Name"}, "lower-case"),
    ({"name": "adapter"}, "registered already"),
    ({"kind": "magic"}, "kind must be one of"),
    ({"color": "red"}, "color must be"),
    ({"kind": "control", "control_vector": True}, "only an additive method"),
    ({"build": "no function here"}, "build must be"),
])
def test_a_bad_registration_is_refused(kw, match):
    spec = {"name": "fresh", "kind": "additive", "color": "#123456", "unit": "x", "build": "a.b:c", **kw}
    with pytest.raises(ValueError, match=match):
        register(MethodSpec(**spec))
    assert "fresh" not in registry.REGISTRY
    with pytest.raises(ValueError, match="unknown method 'fresh'; registered: adapter"):
        get_method("fresh")


def test_a_method_registered_at_run_time_is_built_and_swept(tiny):
    """CONTRIBUTING's worked example: the mean difference added at the last adapted block only."""
    from interp_steer.app.commands import build_methods
    from interp_steer.comparison.sweep import SweepData, run_sweep, vector_method
    from interp_steer.evaluation.concepts import get_concept
    from interp_steer.evaluation.evaluate import coherence_reference, load_neutral_texts
    from interp_steer.method.data import pair_batches, persona_pairs
    from interp_steer.method.directions import steering_vector
    from interp_steer.method.states import capture

    def build_mean_diff_last(spec, ctx):
        last = max(ctx.hs, key=layer_of)
        return [vector_method(spec.name, steering_vector({last: ctx.hs[last]}, "mean_diff"))]

    bridge, tok = tiny
    pairs = persona_pairs(tok)[:8]
    batches = list(pair_batches(pairs, tok, 4))
    names = ["blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]
    hs = capture(bridge, batches, names)
    register(MethodSpec("mean_diff_last", "additive", "#bcbd22", "one RMS norm at the last adapted block",
                        build_mean_diff_last, control_vector=True))
    try:
        concept = get_concept("sentiment")
        built = build_methods(bridge, ["mean_diff", "mean_diff_last"], {}, hs, batches, concept)
        assert [m.name for m in built] == ["mean_diff", "mean_diff_last"]
        full, last = (m.steer(1.0) for m in built)
        assert full is not None and last is not None
        data = SweepData(concept.effects(2, 0), coherence_reference(bridge, tok, load_neutral_texts()[:2]),
                         bisect_iters=0, grid=(0.5,))
        result = run_sweep(bridge, tok, built[1:], data)
        assert result[0].name == "mean_diff_last" and len(result[0].points) >= 3
    finally:
        registry.REGISTRY.pop("mean_diff_last", None)
    assert "mean_diff_last" not in registry.REGISTRY


def test_learned_vector_is_trained_like_the_adapter_and_swept_like_the_others(tiny):
    """``learned_vector``: the artifact's own pairs, split and steps with ``bias='only'``, so each adapted block
    writes c·b and nothing else; c = 0 is the base model; it is swept like any other method."""
    import torch

    from interp_steer.app.commands import build_methods
    from interp_steer.comparison.sweep import SweepData, run_sweep
    from interp_steer.config import LossConfig, TrainConfig
    from interp_steer.evaluation.concepts import get_concept
    from interp_steer.evaluation.evaluate import coherence_reference, load_neutral_texts
    from interp_steer.method.data import persona_pairs
    from interp_steer.training.loop import train

    bridge, tok = tiny
    pairs = persona_pairs(tok)
    cfg = TrainConfig(layers=(0, 1), loss_layer=2, rank=4, steps=3, batch_pairs=2, n_pairs=8, held_out=0.25,
                      loss=LossConfig(kl_budget=None))
    adapter = train(bridge, tok, pairs, cfg, progress=False)
    concept = get_concept("sentiment")
    with pytest.raises(ValueError, match="sweep it beside a trained adapter"):
        build_methods(bridge, ["learned_vector"], {"adapter": adapter.artifact}, {}, adapter.train_batches,
                      concept)
    (lv,) = build_methods(bridge, ["learned_vector"], {"adapter": adapter.artifact}, {}, adapter.train_batches,
                          concept, tok, pairs)
    assert lv.name == "learned_vector"
    # its run's record reaches the report beside the adapter's: steps, curve, every step's parts
    assert lv.trained["steps_done"] == cfg.steps and len(lv.trained["history"]) == cfg.steps
    assert lv.trained["curve"] == [] and not lv.trained["stopped_early"]
    # the same training, only the parametrisation differs: the vector alone, by hand
    alone = train(bridge, tok, pairs,
                  TrainConfig(**{**cfg.to_dict(), "loss": cfg.loss, "bias": "only", "rank": 1}), progress=False)
    ids = tok(["The weather today is"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        base = bridge(ids)
        assert lv.steer(0.0) is None
        with lv.steer(1.0)(bridge):
            steered = bridge(ids)
        from interp_steer.method.adapter import apply_adapters
        with apply_adapters(bridge, alone.adapters, 1.0):
            by_hand = bridge(ids)
    assert (steered - base).abs().max() > 1e-4 and torch.equal(steered, by_hand)
    for a in alone.adapters:
        assert a.spec.bias == "only" and [n for n, _ in a.named_parameters()] == ["b"] and a.b.norm() > 0
    data = SweepData(concept.effects(2, 0), coherence_reference(bridge, tok, load_neutral_texts()[:2]),
                     bisect_iters=0, grid=(0.5,))
    (result,) = run_sweep(bridge, tok, [lv], data)
    assert result.name == "learned_vector" and len(result.points) >= 3


def test_one_registry_rule_for_methods_exports_and_concepts():
    """Each registry refuses a name given twice (unless replace=True) and names what exists for an unknown one."""
    import dataclasses

    from interp_steer.evaluation import concepts
    from interp_steer.storage import exports

    cases = [(registry.REGISTRY, registry.register, registry.get_method, "adapter", "method"),
             (exports.EXPORTS, exports.register_export, exports.get_export, "lora", "export format"),
             (concepts.CONCEPTS, concepts.register, concepts.get_concept, "sentiment", "concept")]
    for table, register_, get, name, what in cases:
        spec = table[name]
        with pytest.raises(ValueError, match=f"^{what} '{name}' is registered already"):
            register_(dataclasses.replace(spec))
        assert table[name] is spec
        other = dataclasses.replace(spec)
        try:
            assert register_(other, replace=True) is other and get(name) is other
        finally:
            table[name] = spec
        with pytest.raises(ValueError, match=f"^unknown {what} 'nope'; registered: {', '.join(table)}"):
            get("nope")
    with pytest.raises(ValueError, match="name 'Bad Name' must be lower-case"):
        registry.Registry("thing").add("Bad Name", 1)
