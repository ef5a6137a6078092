"""The training loop: config validation, checkpoints, resume, NaN handling, and a real short run."""

import importlib
import math
import os
import signal

import pytest
import torch

from interp_steer.config import LossConfig, TrainConfig
from interp_steer.method.adapter import apply_adapters, linear_weight
from interp_steer.method.data import ContrastivePair, load_json, persona_pairs, select_pairs
from interp_steer.method.directions import mean_diff_direction
from interp_steer.method.loss import continuation_logratio, token_logprobs
from interp_steer.names import resid_post, site_layer
from interp_steer.storage.io import SteeringArtifact, load_checkpoint
from interp_steer.training import coherence_text, objectives
from interp_steer.training.loop import adapter_specs, train

train_mod = importlib.import_module("interp_steer.training.loop")

# the KL constraint (on by default) has its own test; elsewhere it would only cost time on the tiny model
TINY = dict(layers=(0, 1), loss_layer=2, rank=4, steps=4, batch_pairs=2, n_pairs=12, checkpoint_every=2,
            eval_coeffs=(-1.0, 0.0, 1.0), held_out=0.25, loss=LossConfig(kl_budget=None))


def params(adapters):
    return torch.cat([p.detach().flatten() for p in adapters.parameters()])


@pytest.fixture(scope="module")
def straight(_tiny_cached):
    """The uninterrupted TINY run that every interrupted-and-resumed run must reproduce (checkpoint_every does
    not change the trajectory)."""
    bridge, tok = _tiny_cached
    return params(train(bridge, tok, persona_pairs(tok), TrainConfig(**TINY), progress=False).adapters)


def test_config_validation_and_roundtrip():
    cfg = TrainConfig(layers=(3, 0.5), loss_layer=0.9)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="depth fraction"):
        TrainConfig(layers=(1.5,))
    with pytest.raises(ValueError, match="site"):
        TrainConfig(site="mlp.down")
    with pytest.raises(ValueError, match="unknown LossConfig keys"):
        TrainConfig.from_dict({"loss": {"margn": 1}})
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
    art = SteeringArtifact.load(tmp_path / "run", bridge)
    assert art.config == TrainConfig(**TINY) and art.loss_hook == result.loss_hook == "blocks.2.hook_resid_post"
    assert torch.equal(params(art.adapters), params(result.adapters)) and torch.equal(art.d_steer, result.d_steer)
    assert art.metrics["held_out"] == result.metrics["held_out"]
    with pytest.raises(FileExistsError, match="--overwrite"):  # refused before any work
        train(bridge, tok, pairs, TrainConfig(**TINY), tmp_path / "run", progress=False)
    train(bridge, tok, pairs, TrainConfig(**{**TINY, "steps": 2}), tmp_path / "run", overwrite=True,
          progress=False)
    assert SteeringArtifact.load(tmp_path / "run").config.steps == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no temporary or .prev directory left


def test_a_bias_term_is_trained_saved_and_loaded(tiny, tmp_path):
    bridge, tok = tiny
    cfg = TrainConfig(**{**TINY, "bias": "span"})
    assert all(s.bias == "span" for s in adapter_specs(cfg, bridge.cfg.n_layers))
    result = train(bridge, tok, persona_pairs(tok), cfg, tmp_path / "run", progress=False)
    assert all(a.b is not None and a.b.abs().max() > 0 for a in result.adapters)  # it moved from 0
    art = SteeringArtifact.load(tmp_path / "run", bridge)
    assert art.config.bias == "span" and all(torch.equal(a.b, b.b) for a, b in zip(art.adapters, result.adapters))


def test_aligned_triplets_take_each_sites_triplets_from_the_pairs_mean_difference(tiny):
    bridge, tok = tiny
    cfg = TrainConfig(**{**TINY, "steps": 1, "triplets": "aligned"})
    result = train(bridge, tok, persona_pairs(tok), cfg, progress=False)
    for a in result.adapters:
        d = mean_diff_direction(result.reference_states[resid_post(site_layer(a.site))])
        W = linear_weight(bridge, a.site).detach()
        U = torch.linalg.svd(W.double(), full_matrices=False).U
        best = (U.T @ d.double()).abs().topk(a.spec.rank).values.sort().values
        assert torch.allclose((a.U.double().T @ d.double()).abs().sort().values, best, atol=1e-5)
    with pytest.raises(ValueError, match="writes the residual stream"):
        TrainConfig(site="mlp.in", triplets="aligned")


def test_a_hard_interrupt_keeps_the_last_checkpoint_and_resume_matches_an_uninterrupted_run(tiny, tmp_path,
                                                                                            monkeypatch, straight):
    """An exception in the middle of a step (a second Ctrl-C, or a kill) saves nothing half-done: the periodic
    checkpoint (step 2) stays, and resuming from it gives the uninterrupted run."""
    bridge, tok = tiny
    pairs = persona_pairs(tok)
    cfg = TrainConfig(**TINY)

    real_loss, calls = objectives.steering_loss, {"n": 0}

    def interrupting(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 4:  # during step index 3, after 3 completed steps
            raise KeyboardInterrupt
        return real_loss(*a, **kw)

    monkeypatch.setattr(objectives, "steering_loss", interrupting)
    with pytest.raises(KeyboardInterrupt):
        train(bridge, tok, pairs, cfg, tmp_path / "b", progress=False)
    assert load_checkpoint(tmp_path / "b.ckpt", bridge).step == 2
    monkeypatch.setattr(objectives, "steering_loss", real_loss)
    resumed = train(bridge, tok, pairs, cfg, tmp_path / "b", resume=True, progress=False)
    assert [h["step"] for h in resumed.history] == [2, 3]
    assert (params(resumed.adapters) - straight).abs().max() <= 1e-6
    with pytest.raises(ValueError, match="different TrainConfig"):
        monkeypatch.setattr(objectives, "steering_loss", interrupting)
        calls["n"] = 0
        with pytest.raises(KeyboardInterrupt):
            train(bridge, tok, pairs, cfg, tmp_path / "c", progress=False)
        monkeypatch.setattr(objectives, "steering_loss", real_loss)
        train(bridge, tok, pairs, TrainConfig(**{**TINY, "lr": 0.5}), tmp_path / "c", resume=True, progress=False)


def test_nan_stops_training_and_keeps_the_last_good_checkpoint(tiny, tmp_path, monkeypatch):
    bridge, tok = tiny
    real_loss, calls = objectives.steering_loss, {"n": 0}

    def poisoned(*a, **kw):
        calls["n"] += 1
        loss, parts = real_loss(*a, **kw)
        if calls["n"] == 3:
            return loss * float("nan"), {**parts, "loss": float("nan")}
        return loss, parts

    monkeypatch.setattr(objectives, "steering_loss", poisoned)
    with pytest.raises(FloatingPointError, match="last good checkpoint"):
        train(bridge, tok, persona_pairs(tok), TrainConfig(**TINY), tmp_path / "run", progress=False)
    ckpt = load_checkpoint(tmp_path / "run.ckpt", bridge)
    assert ckpt.step == 2 and ckpt.artifact.metrics["step"] == 2
    assert all(torch.isfinite(p).all() for p in ckpt.artifact.adapters.parameters())
    assert not (tmp_path / "run").exists()


def test_ctrl_c_finishes_the_step_and_its_checkpoint_matches_its_weights(tiny, tmp_path, straight):
    """SIGINT right after an optimiser step: the checkpoint's step counter equals the steps in its weights, and
    resuming gives the uninterrupted run."""
    bridge, tok = tiny
    pairs = persona_pairs(tok)
    cfg = TrainConfig(**{**TINY, "checkpoint_every": 100})
    snapshots = {}
    # whatever the runner had (Python's default, or SIG_IGN when started in the background without job control)
    before = signal.getsignal(signal.SIGINT)

    def ctrl_c_after_step_1(step, adapters):
        snapshots[step] = params(adapters).clone()
        if step == 1:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        train(bridge, tok, pairs, cfg, tmp_path / "r", progress=False, callback=ctrl_c_after_step_1)
    ckpt = load_checkpoint(tmp_path / "r.ckpt", bridge)
    assert ckpt.step == 2 and torch.equal(params(ckpt.artifact.adapters), snapshots[1])
    resumed = train(bridge, tok, pairs, cfg, tmp_path / "r", resume=True, progress=False)
    assert [h["step"] for h in resumed.history] == [2, 3]
    assert (params(resumed.adapters) - straight).abs().max() <= 1e-6
    assert signal.getsignal(signal.SIGINT) is before  # the handler was put back


def test_resume_falls_back_to_the_previous_checkpoint_when_a_swap_was_cut(tiny, tmp_path, straight):
    """A kill between the two renames of a checkpoint swap leaves only NAME.prev: resume uses it and matches an
    uninterrupted run; a finished run removes both."""
    bridge, tok = tiny
    pairs = persona_pairs(tok)
    cfg = TrainConfig(**TINY)

    def stop_at_step_3(step, adapters):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(bridge, tok, pairs, cfg, tmp_path / "s", progress=False, callback=stop_at_step_3)
    (tmp_path / "s.ckpt").rename(tmp_path / "s.ckpt.prev")  # as if killed between the swap's two renames
    assert load_checkpoint(tmp_path / "s.ckpt", bridge).step == 2
    resumed = train(bridge, tok, pairs, cfg, tmp_path / "s", resume=True, progress=False)
    assert [h["step"] for h in resumed.history] == [2, 3]
    assert (params(resumed.adapters) - straight).abs().max() <= 1e-6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


@pytest.mark.slow
def test_real_short_training_steers_with_the_sign_of_c(real):
    """Shift objective: every held-out state moves along d_steer with the sign of c."""
    bridge, tok = real
    cfg = TrainConfig(loss=LossConfig(objective="shift", kl_budget=None), steps=10, n_pairs=96, held_out=0.25,
                      eval_coeffs=(-1.0, 0.0, 1.0))
    result = train(bridge, tok, persona_pairs(tok), cfg, progress=False)
    held = result.metrics["held_out"]
    scale = result.metrics["scale"]
    # held-out states move along d_steer with the sign of c, by a real fraction of the pair separation
    assert held["1"]["shift"] > 0.1 * scale and held["-1"]["shift"] < -0.1 * scale
    assert held["1"]["proj_chosen"] > held["0"]["proj_chosen"] > held["-1"]["proj_chosen"]
    assert held["1"]["proj_rejected"] > held["0"]["proj_rejected"] > held["-1"]["proj_rejected"]
    # coherence: the mean penalty in the last steps stays below its margin (in nat², squared hinge)
    last = result.history[-3:]
    assert sum(h["coh"] for h in last) / len(last) < cfg.loss.margin
    assert abs(held["1"]["dnll"]) < 0.5 and abs(held["-1"]["dnll"]) < 0.5


@pytest.mark.slow
def test_real_short_training_separates_with_the_sign_of_c(real):
    """Separation objective: the held-out pair separation on d_steer grows at c = +1 and shrinks at c = −1."""
    bridge, tok = real
    cfg = TrainConfig(loss=LossConfig(objective="separation", kl_budget=None), steps=10, n_pairs=96, held_out=0.25)
    result = train(bridge, tok, persona_pairs(tok), cfg, progress=False)
    held = result.metrics["held_out"]
    assert held["1"]["separation"] > held["0"]["separation"] + 0.1 * result.metrics["scale"]
    assert held["-1"]["separation"] < held["0"]["separation"] - 0.1 * result.metrics["scale"]
    last = result.history[-3:]
    assert sum(h["coh"] for h in last) / len(last) < cfg.loss.margin


@pytest.mark.slow
def test_real_behaviour_training_prefers_each_sides_continuations_on_held_out_pairs(real):
    """Behaviour objective: on held-out pairs (prompts and continuations never trained on), c = +1 raises the
    chosen prompt's continuation against the rejected one's, relative to the reference, and c = −1 the opposite."""
    bridge, tok = real
    pairs = persona_pairs(tok)
    cfg = TrainConfig(loss=LossConfig(objective="behaviour", kl_budget=None, continuation_tokens=8), steps=8,
                      n_pairs=64, held_out=0.25)
    result = train(bridge, tok, pairs, cfg, progress=False)
    assert result.history[-1]["obj"] > result.history[0]["obj"]
    _, test_pairs = select_pairs(pairs, cfg.n_pairs, cfg.held_out, cfg.seed)
    held = train_mod.continuations(bridge, tok, test_pairs, 8, 8)
    margins = []
    for b, c, reply, ref in zip(held.batches, held.c, held.reply, held.ref_logp):
        with torch.no_grad(), apply_adapters(bridge, result.adapters, c):
            logits = bridge(b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids)
        delta = continuation_logratio(token_logprobs(logits, b.input_ids), ref, reply)
        margins.append(c[0::2] * (delta[0::2] - delta[1::2]))
    margins = torch.cat(margins)
    assert margins.mean() > 0.1 and (margins > 0).float().mean() > 0.7, margins


def test_a_prompt_longer_than_the_context_is_refused_before_training(tiny):
    bridge, tok = tiny
    long = " ".join(["word"] * (bridge.cfg.n_ctx + 10))
    pairs = [ContrastivePair(f"I love it. {long}", f"I hate it. {long}")] * 4
    with pytest.raises(ValueError, match="longer than the model's context"):
        train(bridge, tok, pairs, TrainConfig(**TINY), progress=False)


def test_the_kl_constraint_measures_generic_text_raises_its_multipliers_and_resumes_exactly(tiny, tmp_path):
    """With loss.kl_budget set, every step measures KL(reference ‖ steered) on the base model's own replies to
    generic requests at c = ±1; a budget far below the drift raises both multipliers; they are checkpointed, so
    an interrupted run resumes to the uninterrupted one."""
    bridge, tok = tiny
    pairs = persona_pairs(tok)
    cfg = TrainConfig(**{**TINY, "kl_texts": 2, "kl_batch": 2, "loss": LossConfig(kl_budget=1e-7, kl_dual_lr=0.5)})
    straight = train(bridge, tok, pairs, cfg, progress=False)
    h = straight.history
    assert all(x["kl_plus"] > 0 and x["kl_minus"] > 0 for x in h)
    assert h[0]["lam_plus"] == 0.0 and h[-1]["lam_plus"] > 0 and h[-1]["lam_minus"] > 0
    assert straight.timings["generic_text_s"] > 0
    # the same text computed once beforehand (run_demo: one set for every concept and seed) trains identically
    shared = coherence_text.generic_text(bridge, tok, cfg.kl_texts, cfg.kl_batch)
    again = train(bridge, tok, pairs, cfg, progress=False, generic=shared)
    assert torch.equal(params(again.adapters), params(straight.adapters)) and "generic_text_s" not in again.timings
    with pytest.raises(ValueError, match="kl_batch=1"):
        train(bridge, tok, pairs, cfg.replace(kl_batch=1), progress=False, generic=shared)
    with pytest.raises(ValueError, match="greedy but cfg.kl_sample is True"):
        train(bridge, tok, pairs, cfg.replace(kl_sample=True), progress=False, generic=shared)

    def stop_at_step_3(step, adapters):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(bridge, tok, pairs, cfg, tmp_path / "k", progress=False, callback=stop_at_step_3)
    ckpt = load_checkpoint(tmp_path / "k.ckpt", bridge)
    assert ckpt.duals == [h[2]["lam_plus"], h[2]["lam_minus"]]  # the multipliers of step 2, as written after it
    resumed = train(bridge, tok, pairs, cfg, tmp_path / "k", resume=True, progress=False)
    assert (params(resumed.adapters) - params(straight.adapters)).abs().max() <= 1e-6


def test_sampled_kl_text_is_one_fixed_draw_that_cycles_the_prompts_and_leaves_the_rng_alone(tiny):
    """kl_sample: replies drawn at temperature 1 from a fixed seed (the same text on every call, the caller's RNG
    state untouched), the prompts taken in turn so there can be more texts than prompts."""
    bridge, tok = tiny
    n_prompts = len(load_json("coherence_prompts.json")["prompts"])
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = coherence_text.generic_text(bridge, tok, n_prompts + 3, 8, max_new_tokens=6,
                               sample_seed=coherence_text.KL_SAMPLE_SEED)
    assert torch.equal(torch.rand(3), before)
    b = coherence_text.generic_text(bridge, tok, n_prompts + 3, 8, max_new_tokens=6,
                               sample_seed=coherence_text.KL_SAMPLE_SEED)
    greedy = coherence_text.generic_text(bridge, tok, n_prompts + 3, 8, max_new_tokens=6)
    rows = lambda t: [r for bt in t.batches for r in bt.input_ids.tolist()]  # noqa: E731
    assert a.sample_seed == 0 and greedy.sample_seed is None
    assert rows(a) == rows(b) and sum(len(bt) for bt in a.batches) == n_prompts + 3  # cycled past the prompts
    assert sum(len(bt) for bt in greedy.batches) <= n_prompts  # one greedy reply per prompt (empty ones dropped)
    other = coherence_text.generic_text(bridge, tok, n_prompts + 3, 8, max_new_tokens=6, sample_seed=1)
    assert rows(other) != rows(a)  # a draw: another seed, other text
    cfg = TrainConfig(**{**TINY, "kl_texts": 2, "kl_batch": 2, "kl_sample": True, "loss": LossConfig(kl_budget=0.1)})
    trained = train(bridge, tok, persona_pairs(tok), cfg, progress=False)
    assert all(x["kl_plus"] > 0 for x in trained.history)


def test_the_text_shift_reads_the_generic_texts_states_at_the_loss_hook_and_trains(tiny):
    """w_text_shift: the generic text keeps the reference's states at the loss hook at every reply position (those
    of a plain hooked pass); the objective is c · (hs − ref)·d / scale averaged over them (0 at the reference);
    training logs it; a precomputed text without those states, or a config without the KL text, is refused."""
    bridge, tok = tiny
    pairs = persona_pairs(tok)
    cfg = TrainConfig(**{**TINY, "kl_texts": 3, "kl_batch": 2,
                         "loss": LossConfig(kl_budget=0.1, w_text_shift=1.0)})
    hook = train_mod.loss_hook(cfg, bridge.cfg.n_layers)
    text = coherence_text.generic_text(bridge, tok, cfg.kl_texts, cfg.kl_batch, hook=hook)
    _, cache = bridge.run_with_cache(text.batches[0].input_ids, attention_mask=text.batches[0].attention_mask,
                                     position_ids=text.batches[0].position_ids, names_filter=[hook])
    mask = text.masks[0].bool()
    assert torch.allclose(text.ref_hs[0], cache[hook][:, :-1][mask].float(), atol=1e-5)
    d = torch.nn.functional.normalize(torch.randn(bridge.cfg.d_model), dim=0)
    ref = text.ref_hs[0]
    assert coherence_text.text_shift(torch.cat([ref, ref]), ref, d, 2.0).item() == 0.0
    moved = torch.cat([ref + 3 * d, ref - 1 * d])  # +3 along d at c = +1, −1 at c = −1: mean c·shift = 2
    assert coherence_text.text_shift(moved, ref, d, 2.0).item() == pytest.approx(1.0, abs=1e-4)
    trained = train(bridge, tok, pairs, cfg, progress=False)
    assert all(math.isfinite(x["tshift"]) for x in trained.history)
    # the text the config asks for, made once beforehand (run_demo's path), trains identically
    again = train(bridge, tok, pairs, cfg, progress=False, generic=train_mod.kl_text(bridge, tok, cfg))
    assert torch.equal(params(again.adapters), params(trained.adapters))
    plain = coherence_text.generic_text(bridge, tok, cfg.kl_texts, cfg.kl_batch)
    with pytest.raises(ValueError, match="needs blocks"):
        train(bridge, tok, pairs, cfg, progress=False, generic=plain)
    with pytest.raises(ValueError, match="w_text_shift reads the KL constraint's generic text"):
        LossConfig(kl_budget=None, w_text_shift=1.0)


@pytest.fixture
def lively(tiny):
    """The tiny model with its matrices ×4: at its initial scale it continues every prompt with the same token, so
    no pair would have two different continuations (the ``tiny`` fixture puts the weights back afterwards)."""
    with torch.no_grad():
        for p in tiny[0].parameters():
            if p.ndim == 2:
                p.mul_(4.0)
    return tiny


def test_behaviour_rows_are_the_base_models_own_continuations_and_their_reference_is_a_plain_pass(lively):
    """Per pair: (rejected + y_w, rejected + y_l) at c = +1, (chosen + y_w, chosen + y_l) at c = −1, where y_w / y_l
    are greedy continuations of the chosen / rejected prompt: in the rows that continue their own prompt every
    continuation token is the base model's argmax. The cached reference equals a pass over each row alone."""
    bridge, tok = lively
    pairs = persona_pairs(tok)[:10]
    cont = train_mod.continuations(bridge, tok, pairs, 3, 4)
    kept = sum(len(b) // 4 for b in cont.batches)
    assert kept > 0 and kept + cont.dropped == len(pairs)
    for b, c, reply, mask, ref in zip(cont.batches, cont.c, cont.reply, cont.mask, cont.ref_logp):
        assert c.tolist() == [1.0, 1.0, -1.0, -1.0] * (len(b) // 4)
        rows = []
        for r in range(len(b)):
            ids = b.input_ids[r, b.attention_mask[r].bool()]
            cols = reply[r].nonzero()[:, 0]
            assert cols.tolist() == list(range(int(cols[0]), len(ids) - 1))  # the continuation runs to the end
            rows.append((ids[: int(cols[0]) + 1].tolist(), ids[int(cols[0]) + 1:].tolist()))
            with torch.no_grad():
                logits = bridge(ids[None])
            alone = torch.log_softmax(logits[0, :-1].float(), -1).gather(-1, ids[1:, None])[:, 0]
            assert torch.allclose(ref[r, : len(ids) - 1], alone, atol=1e-5)
            assert mask[r].sum() == len(ids) - 1
            if r % 4 in (1, 2):  # rejected + y_l, chosen + y_w: each continues its own prompt greedily
                assert torch.equal(logits[0, cols].argmax(-1), ids[cols + 1])
        for i in range(0, len(rows), 4):
            (rej, y_w), (rej2, y_l), (cho, y_w2), (cho2, y_l2) = rows[i: i + 4]
            assert rej == rej2 and cho == cho2 and rej != cho and y_w == y_w2 and y_l == y_l2 and y_w != y_l


def test_behaviour_objective_trains_and_is_refused_under_torchrun(lively, monkeypatch):
    bridge, tok = lively
    cfg = TrainConfig(**{**TINY, "steps": 4, "n_pairs": 16, "lr": 0.05,
                         "loss": LossConfig(kl_budget=None, objective="behaviour", continuation_tokens=4)})
    result = train(bridge, tok, persona_pairs(tok), cfg, progress=False)
    h = result.history
    assert h[0]["obj"] == pytest.approx(-math.log(2), abs=1e-3)  # the adapters start near the identity
    assert h[-1]["obj"] > h[0]["obj"] and result.timings["continuations_s"] > 0
    monkeypatch.setattr(train_mod.distributed, "current", lambda: train_mod.distributed.World(0, 2))
    with pytest.raises(ValueError, match="one process"):
        train(bridge, tok, persona_pairs(tok), cfg, progress=False)


def test_an_equality_kl_constraint_lowers_its_multipliers_below_zero_under_the_budget(tiny):
    """kl_equality: far under the budget the multipliers go negative (the term then rewards spending it), by
    kl_dual_lr · (KL / budget − 1) a step; the inequality's multipliers stay at 0."""
    bridge, tok = tiny
    loss = LossConfig(kl_budget=10.0, kl_dual_lr=0.5, kl_equality=True)
    cfg = TrainConfig(**{**TINY, "steps": 3, "kl_texts": 2, "kl_batch": 2, "loss": loss})
    h = train(bridge, tok, persona_pairs(tok), cfg, progress=False).history
    assert h[0]["lam_plus"] == 0.0
    assert h[1]["lam_plus"] == pytest.approx(0.5 * (h[0]["kl_plus"] / 10.0 - 1))
    assert h[2]["lam_minus"] < h[1]["lam_minus"] < 0
    h = train(bridge, tok, persona_pairs(tok), cfg.replace(loss=loss.replace(kl_equality=False)),
              progress=False).history
    assert all(x["lam_plus"] == 0.0 and x["lam_minus"] == 0.0 for x in h)


def test_the_held_out_curve_is_the_shift_objective_on_the_held_out_pairs(tiny):
    """Measured every eval_every steps with the adapters of that step: the last point equals the objective
    computed by hand with the final adapters on the held-out split (unpacked, one pair batch)."""
    from interp_steer.method.data import pair_batches
    from interp_steer.method.loss import shift_objective
    from interp_steer.method.states import capture

    bridge, tok = tiny
    pairs = persona_pairs(tok)
    cfg = TrainConfig(**{**TINY, "eval_every": 2})
    result = train(bridge, tok, pairs, cfg, progress=False)
    curve = result.artifact.metrics["curve"]
    assert [p["step"] for p in curve] == [2, 4]
    assert [h.get("held_out_obj") is not None for h in result.history] == [False, True, False, True]
    _, test = select_pairs(pairs, cfg.n_pairs, cfg.held_out, cfg.seed)
    batches = list(pair_batches(test, tok, 64))
    hook = result.loss_hook
    ref = capture(bridge, batches, [hook])[hook]
    with apply_adapters(bridge, result.adapters, 1.0), torch.no_grad():
        plus = capture(bridge, batches, [hook])[hook]
    with apply_adapters(bridge, result.adapters, -1.0), torch.no_grad():
        minus = capture(bridge, batches, [hook])[hook]
    c = torch.cat([torch.ones(len(ref)), -torch.ones(len(ref))])
    want = shift_objective(torch.cat([plus, minus]), torch.cat([ref, ref]), c, result.artifact.d_steer.float(),
                           result.artifact.metrics["scale"]).item()
    assert curve[-1]["held_out_obj"] == pytest.approx(want, rel=1e-4, abs=1e-6)
    assert result.artifact.metrics["steps_done"] == 4 and not result.artifact.metrics["stopped_early"]


def test_patience_stops_where_the_held_out_objective_stopped_rising_and_a_resumed_run_keeps_its_curve(
        tiny, tmp_path, monkeypatch):
    bridge, tok = tiny
    pairs = persona_pairs(tok)
    values = iter([0.5, 0.8, 0.805, 0.79, 0.2, 9.0])  # no rise of MIN_RISE after step 2, for 2 measurements

    def scripted(self, done, bridge, adapters):
        self.points.append({"step": done, "held_out_obj": next(values)})
        return self.points[-1]

    monkeypatch.setattr(train_mod.HeldOutCurve, "measure", scripted)
    cfg = TrainConfig(**{**TINY, "steps": 10, "eval_every": 1, "patience": 2, "checkpoint_every": 100})
    result = train(bridge, tok, pairs, cfg, tmp_path / "run", progress=False)
    m = SteeringArtifact.load(tmp_path / "run").metrics
    assert m["steps_done"] == 4 and m["stopped_early"] and len(result.history) == 4
    assert [p["held_out_obj"] for p in m["curve"]] == [0.5, 0.8, 0.805, 0.79]
    # the rule itself: a rise of MIN_RISE within the last `patience` points keeps it going
    curve = train_mod.HeldOutCurve([], [], "", torch.zeros(1), 1.0, cfg,
                                   [{"held_out_obj": v} for v in (0.5, 0.8, 0.79, 0.811)])
    assert not curve.exhausted()
    with pytest.raises(Exception, match="patience 2 stops on the held-out objective"):
        TrainConfig(**{**TINY, "patience": 2})
    # interrupted after step 2 (checkpoint at 2, curve points at 1 and 2), resumed: the curve goes on from them
    monkeypatch.setattr(train_mod.HeldOutCurve, "exhausted", lambda self: False)
    values = iter([0.1, 0.2, 0.3, 0.4])
    cfg = TrainConfig(**{**TINY, "eval_every": 1, "patience": 2})
    real_loss, calls = objectives.steering_loss, {"n": 0}

    def interrupting(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real_loss(*a, **kw)

    monkeypatch.setattr(objectives, "steering_loss", interrupting)
    with pytest.raises(KeyboardInterrupt):
        train(bridge, tok, pairs, cfg, tmp_path / "b", progress=False)
    monkeypatch.setattr(objectives, "steering_loss", real_loss)
    values = iter([0.3, 0.4])
    resumed = train(bridge, tok, pairs, cfg, tmp_path / "b", resume=True, progress=False)
    assert [(p["step"], p["held_out_obj"]) for p in resumed.artifact.metrics["curve"]] == \
        [(1, 0.1), (2, 0.2), (3, 0.3), (4, 0.4)]
