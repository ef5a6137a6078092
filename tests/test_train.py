"""The training loop: config validation, checkpoints, resume, NaN handling, and a real short run."""

import pytest
import torch

import interp_steer.train as train_mod
from interp_steer.data import persona_pairs
from interp_steer.io import load_adapter
from interp_steer.train import TrainConfig, adapter_specs, train

TINY = dict(layers=(0, 1), loss_layer=2, rank=4, steps=4, batch_pairs=2, n_pairs=12, checkpoint_every=2,
            eval_coeffs=(-1.0, 0.0, 1.0), held_out=0.25)


def params(adapters):
    return torch.cat([p.detach().flatten() for p in adapters.parameters()])


def test_config_validation_and_roundtrip():
    cfg = TrainConfig(layers=(3, 0.5), loss_layer=0.9)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="depth fraction"):
        TrainConfig(layers=(1.5,))
    with pytest.raises(ValueError, match="site"):
        TrainConfig(site="mlp.down")
    with pytest.raises(ValueError, match="unknown TrainConfig keys"):
        TrainConfig.from_dict({"lrr": 1})
    specs = adapter_specs(TrainConfig(layers=(0.27, 8, 0.69), loss_layer=0.75), 30)
    assert [s.site for s in specs] == ["blocks.8.mlp.out", "blocks.20.mlp.out"]
    with pytest.raises(ValueError, match="after the loss layer"):
        adapter_specs(TrainConfig(layers=(25,), loss_layer=10), 30)


def test_train_writes_a_loadable_adapter(tiny, tmp_path):
    bridge, tok = tiny
    pairs = persona_pairs(tok)
    result = train(bridge, tok, pairs, TrainConfig(**TINY), tmp_path / "run", progress=False)
    assert len(result.history) == 4
    assert set(result.metrics["held_out"]) == {"-1", "0", "1"}
    assert result.metrics["held_out"]["0"]["shift"] == 0.0 and result.metrics["held_out"]["0"]["dnll"] == 0.0
    assert not (tmp_path / "run.ckpt").exists()  # checkpoints are removed once the final adapter is written
    loaded, config = load_adapter(tmp_path / "run", bridge)
    assert config["train_config"]["steps"] == 4
    assert torch.equal(params(loaded), params(result.adapters))


def test_interrupt_saves_and_resume_matches_an_uninterrupted_run(tiny, tmp_path, monkeypatch):
    bridge, tok = tiny
    pairs = persona_pairs(tok)
    cfg = TrainConfig(**TINY)
    straight = train(bridge, tok, pairs, cfg, tmp_path / "a", progress=False)

    real_loss, calls = train_mod.steering_loss, {"n": 0}

    def interrupting(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 4:  # during step index 3, after 3 completed steps
            raise KeyboardInterrupt
        return real_loss(*a, **kw)

    monkeypatch.setattr(train_mod, "steering_loss", interrupting)
    with pytest.raises(KeyboardInterrupt):
        train(bridge, tok, pairs, cfg, tmp_path / "b", progress=False)
    assert (tmp_path / "b.ckpt" / "trainer.json").exists()
    monkeypatch.setattr(train_mod, "steering_loss", real_loss)
    resumed = train(bridge, tok, pairs, cfg, tmp_path / "b", resume=True, progress=False)
    assert [h["step"] for h in resumed.history] == [3]
    assert (params(resumed.adapters) - params(straight.adapters)).abs().max() <= 1e-6
    with pytest.raises(ValueError, match="different TrainConfig"):
        monkeypatch.setattr(train_mod, "steering_loss", interrupting)
        calls["n"] = 0
        with pytest.raises(KeyboardInterrupt):
            train(bridge, tok, pairs, cfg, tmp_path / "c", progress=False)
        monkeypatch.setattr(train_mod, "steering_loss", real_loss)
        train(bridge, tok, pairs, TrainConfig(**{**TINY, "lr": 0.5}), tmp_path / "c", resume=True, progress=False)


def test_nan_stops_training_and_keeps_the_last_good_checkpoint(tiny, tmp_path, monkeypatch):
    bridge, tok = tiny
    real_loss, calls = train_mod.steering_loss, {"n": 0}

    def poisoned(*a, **kw):
        calls["n"] += 1
        loss, parts = real_loss(*a, **kw)
        if calls["n"] == 3:
            return loss * float("nan"), {**parts, "loss": float("nan")}
        return loss, parts

    monkeypatch.setattr(train_mod, "steering_loss", poisoned)
    with pytest.raises(FloatingPointError, match="last good checkpoint"):
        train(bridge, tok, persona_pairs(tok), TrainConfig(**TINY), tmp_path / "run", progress=False)
    adapters, config = load_adapter(tmp_path / "run.ckpt", bridge)
    assert config["metrics"]["step"] == 2
    assert all(torch.isfinite(p).all() for p in adapters.parameters())
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_real_short_training_steers_with_the_sign_of_c(real):
    """Shift objective: every held-out state moves along d_steer with the sign of c."""
    bridge, tok = real
    cfg = TrainConfig(objective="shift", steps=10, n_pairs=96, held_out=0.25, eval_coeffs=(-1.0, 0.0, 1.0))
    result = train(bridge, tok, persona_pairs(tok), cfg, progress=False)
    held = result.metrics["held_out"]
    scale = result.metrics["scale"]
    # held-out states move along d_steer with the sign of c, by a real fraction of the pair separation
    assert held["1"]["shift"] > 0.1 * scale and held["-1"]["shift"] < -0.1 * scale
    assert held["1"]["proj_chosen"] > held["0"]["proj_chosen"] > held["-1"]["proj_chosen"]
    assert held["1"]["proj_rejected"] > held["0"]["proj_rejected"] > held["-1"]["proj_rejected"]
    # coherence: the mean penalty in the last steps stays below its margin (in nat², squared hinge)
    last = result.history[-3:]
    assert sum(h["coh"] for h in last) / len(last) < cfg.margin
    assert abs(held["1"]["dnll"]) < 0.5 and abs(held["-1"]["dnll"]) < 0.5


@pytest.mark.slow
def test_real_short_training_separates_with_the_sign_of_c(real):
    """Separation objective: the held-out pair separation on d_steer grows at c = +1 and shrinks at c = −1."""
    bridge, tok = real
    cfg = TrainConfig(objective="separation", steps=10, n_pairs=96, held_out=0.25)
    result = train(bridge, tok, persona_pairs(tok), cfg, progress=False)
    held = result.metrics["held_out"]
    assert held["1"]["separation"] > held["0"]["separation"] + 0.1 * result.metrics["scale"]
    assert held["-1"]["separation"] < held["0"]["separation"] - 0.1 * result.metrics["scale"]
    last = result.history[-3:]
    assert sum(h["coh"] for h in last) / len(last) < cfg.margin
