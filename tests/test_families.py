"""Model families: the adapter's invariants on tiny random Llama, Qwen2, Gemma 3 and GPT-2 models built offline.

Each family is built once for this module (``models.tiny_model(family=...)``: d_model 64, 3 layers, the default
tokenizer) and put back after each test. GPT-2 stores its linear layers as ``Conv1D`` (``W`` is d_in × d_out,
``y = x W + b``) and has no gated MLP: both are tested on it by name.
"""

import pytest
import torch

from interp_steer.config import LossConfig, TrainConfig
from interp_steer.method.adapter import (
    AdapterSpec,
    apply_adapters,
    available_sites,
    check_sites,
    linear_weight,
    make_adapters,
    merged_weights,
)
from interp_steer.method.data import persona_pairs, tokenize
from interp_steer.method.models import FAMILIES, tiny_model
from interp_steer.method.states import capture
from interp_steer.names import SITES, resid_post
from interp_steer.storage.io import SteeringArtifact
from interp_steer.training.loop import train

N_LAYERS = 3
# one site of each kind, spread over the blocks (with a U rotation and both scales among them)
SPECS = [AdapterSpec("blocks.0.mlp.out", 4), AdapterSpec("blocks.0.attn.q", 4, rotate_u=True),
         AdapterSpec("blocks.1.attn.o", 4, scale="add"), AdapterSpec("blocks.1.mlp.in", 4),
         AdapterSpec("blocks.2.attn.v", 4, rotate_u=True), AdapterSpec("blocks.2.attn.k", 4)]
TEXTS = ["The capital of France is Paris, and the capital of Spain is",
         "Honesty means", "A short one"]  # different lengths: left padding, and longer than Gemma's window of 4


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    """(name, bridge, tokenizer, pristine state) for each family, built once per module."""
    bridge, tok = tiny_model(seed=0, n_layers=N_LAYERS, family=request.param)
    return request.param, bridge, tok, {k: v.clone() for k, v in bridge.state_dict().items()}


@pytest.fixture
def model(family):
    """The family's model; afterwards its weights must be the pristine ones and no hook may be left on it."""
    name, bridge, tok, state = family
    torch.manual_seed(0)
    yield name, bridge, tok
    leaked = sorted({n for n, h in bridge.hook_dict.items() if h.fwd_hooks or h.bwd_hooks})
    for n in leaked:
        bridge.hook_dict[n].remove_hooks(including_permanent=True)
    changed = [k for k, v in bridge.state_dict().items() if not torch.equal(v, state[k])]
    if changed:
        bridge.load_state_dict(state)
    assert not leaked and not changed, f"hooks left at {leaked}; weights changed at {changed}"


def batch_of(tok):
    return tokenize(TEXTS, tok)


def logits(bridge, batch):
    return bridge(batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)


def specs_for(bridge):
    return [s for s in SPECS if s.site.split(".", 2)[2] in available_sites(bridge)]


def test_every_family_has_its_sites_and_gpt2_lacks_only_the_gate(model):
    name, bridge, _ = model
    expected = [s for s in SITES if s != "mlp.gate"] if name == "gpt2" else list(SITES)
    assert available_sites(bridge) == expected
    if name == "gpt2":
        with pytest.raises(ValueError, match=r"'blocks.0.mlp.gate' does not exist .*GPT2LMHeadModel.*"
                                             r"mlp.out, mlp.in, attn.q, attn.k, attn.v, attn.o$"):
            make_adapters(bridge, [AdapterSpec("blocks.0.mlp.gate", 4)])
    with pytest.raises(ValueError, match="has 3 layers"):
        check_sites(bridge, ["blocks.3.mlp.out"])


def test_linear_weight_is_d_out_by_d_in_and_computes_the_layer(model):
    """y = x Wᵀ + b with W = linear_weight(site), against the HF module itself (Conv1D stores Wᵀ)."""
    _, bridge, _ = model
    for site in (f"blocks.1.{s}" for s in available_sites(bridge)):
        module = bridge.get_submodule(site).original_component
        W = linear_weight(bridge, site)
        x = torch.randn(5, W.shape[1])
        b = module.bias if getattr(module, "bias", None) is not None else 0
        with torch.no_grad():
            assert (module(x) - (x @ W.T + b)).abs().max() <= 1e-5, site


def test_c_zero_is_exactly_the_base_model(model, logits_at_c):
    _, bridge, tok = model
    base, zero, one = logits_at_c(bridge, make_adapters(bridge, specs_for(bridge), init_scale=0.3), batch_of(tok))
    assert torch.equal(zero, base)
    assert (one - base).abs().max() > 1e-2  # and every family's hooks really steer


def test_rotation_is_orthogonal_and_reverses(model):
    _, bridge, _ = model
    c = torch.tensor([1.0, -1.0])
    for a in make_adapters(bridge, specs_for(bridge), init_scale=0.3):
        for which in ("v", "u") if a.theta_u is not None else ("v",):
            R = a.rotation(c, which).detach()
            eye = torch.eye(a.spec.rank)
            assert (R[0].T @ R[0] - eye).abs().max() <= 1e-5
            assert (R[1] - R[0].T).abs().max() <= 1e-5  # R(−c) = R(c)ᵀ


def test_merged_weights_equal_hooks(model):
    """On GPT-2 this is the Conv1D orientation test: mlp.out, mlp.in, attn.o are Conv1D (d_in × d_out), and attn.q/k/v
    are the bridge's Linear views into the fused c_attn; a transposed merge would change the logits."""
    name, bridge, tok = model
    assert_merged_equals_hooks(bridge, tok, make_adapters(bridge, specs_for(bridge), init_scale=0.3), name)


def assert_merged_equals_hooks(bridge, tok, ads, name):
    """Merged weights give the hooked logits at c = 1 and −0.6, the steer is not a no-op, and the model's weights
    (and biases) come back exactly."""
    b = batch_of(tok)
    with torch.no_grad():
        base = logits(bridge, b)
        for c in (1.0, -0.6):
            with apply_adapters(bridge, ads, c):
                hooked = logits(bridge, b)
            with merged_weights(bridge, ads, c):
                merged = logits(bridge, b)
            assert (hooked - merged).abs().max() <= 1e-4, (name, c)
            assert (hooked - base).abs().max() > 1e-2
        assert torch.equal(logits(bridge, b), base)  # restored exactly


def test_capture_equals_hf_hidden_states_at_the_last_real_token(model):
    """blocks.L.hook_resid_post = HF hidden_states[L + 1] (before the final norm: layers before the last)."""
    _, bridge, tok = model
    b = batch_of(tok)
    assert (b.attention_mask == 0).any()  # left padding is really there
    names = [resid_post(L) for L in range(N_LAYERS - 1)]
    hs = capture(bridge, [b], names)
    with torch.no_grad():
        out = bridge.original_model(b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids,
                                    output_hidden_states=True)
    rows = torch.arange(len(b))
    for L, n in enumerate(names):
        hf = out.hidden_states[L + 1][rows, b.last]
        assert (hs[n] - hf).abs().max() <= 1e-5 * max(1.0, hf.abs().max().item()), n


def test_two_training_steps_then_save_load_is_identical(model, tmp_path):
    name, bridge, tok = model
    site = "mlp.out"
    cfg = TrainConfig(layers=(0, 1), loss_layer=2, site=site, rank=4, steps=2, batch_pairs=2, n_pairs=8,
                      held_out=0.25, eval_coeffs=(-1.0, 1.0), loss=LossConfig(kl_budget=None))
    if name == "gemma3":  # block 0 attends through a window of 4: the persona never reaches its last token
        with pytest.raises(ValueError, match="do not differ at blocks.0.hook_resid_post.*triplets='top'"):
            train(bridge, tok, persona_pairs(tok), cfg, progress=False)
        cfg = cfg.replace(triplets="top")
    result = train(bridge, tok, persona_pairs(tok), cfg, tmp_path / "run", progress=False)
    assert len(result.history) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)
    fresh = make_adapters(bridge, [a.spec for a in result.adapters], seed=cfg.seed, init_scale=cfg.init_scale)
    moved = [(a.theta_v - f.theta_v).abs().max().item() for a, f in zip(result.adapters, fresh)]
    assert min(moved) > 0  # two optimiser steps changed every adapter
    art = SteeringArtifact.load(tmp_path / "run", bridge)
    assert art.base_model == ("HuggingFaceTB/SmolLM2-135M-Instruct" if name == "llama" else f"tiny-random-{name}")
    b = batch_of(tok)
    with torch.no_grad():
        with apply_adapters(bridge, result.adapters, 1.0):
            trained = logits(bridge, b)
        with apply_adapters(bridge, art.adapters, 1.0):
            loaded = logits(bridge, b)
    assert torch.equal(trained, loaded)


@pytest.mark.parametrize("family", ["gpt2"], indirect=True)
def test_gpt2_square_conv1d_merge_is_not_transposed(model):
    """attn.o of GPT-2 is a square Conv1D (64 × 64): a merge written in the wrong orientation would fit the shape
    and change the logits, so merged = hooks here checks the transpose itself."""
    _, bridge, tok = model
    assert type(bridge.get_submodule("blocks.0.attn.o").original_component).__name__ == "Conv1D"
    ads = make_adapters(bridge, [AdapterSpec(f"blocks.{L}.attn.o", 8) for L in range(N_LAYERS)], init_scale=0.3)
    b = batch_of(tok)
    with torch.no_grad():
        with apply_adapters(bridge, ads, 1.0):
            hooked = logits(bridge, b)
        with merged_weights(bridge, ads, 1.0):
            merged = logits(bridge, b)
        W = linear_weight(bridge, "blocks.0.attn.o")
        saved = W.clone()
        W.T.copy_(ads[0].merge(saved, 1.0))  # the wrong orientation, to show the test would see it
        wrong = logits(bridge, b)
        W.copy_(saved)
    assert (hooked - merged).abs().max() <= 1e-4
    assert (hooked - wrong).abs().max() > 1e-2


def test_pairs_that_differ_outside_every_window_are_refused_before_training(tmp_path):
    """A Gemma 3 with local attention only (window 4): the persona, early in each prompt, never reaches the last
    token, so dHS = 0 at the loss layer. Training says so instead of dividing by a zero scale (NaN at step 1)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from interp_steer.method.models import boot, default_tokenizer

    tok = default_tokenizer()
    cfg = Gemma3TextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=4,
                           layer_types=["sliding_attention"] * 2, pad_token_id=tok.pad_token_id,
                           attn_implementation="eager")
    torch.manual_seed(0)
    bridge = boot(Gemma3ForCausalLM(cfg).eval(), tok, "tiny-random-gemma3-local")
    tc = TrainConfig(layers=(0,), loss_layer=1, rank=4, steps=1, batch_pairs=2, n_pairs=4, held_out=0.0,
                     loss=LossConfig(kl_budget=None))
    with pytest.raises(ValueError, match="same last-token states at blocks.1.hook_resid_post.*sliding"):
        train(bridge, tok, persona_pairs(tok), tc, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("family", ["gpt2"], indirect=True)
def test_a_bias_term_merges_into_a_layer_that_has_a_bias(model):
    """GPT-2's Conv1D layers have biases: an adapter's c·b merges into them, merged = hooks, and they come back."""
    _, bridge, tok = model
    specs = [AdapterSpec("blocks.0.mlp.out", 4, bias="free"), AdapterSpec("blocks.1.attn.o", 4, bias="span"),
             AdapterSpec("blocks.2.mlp.in", 4, bias="free")]
    ads = make_adapters(bridge, specs, init_scale=0.3)
    with torch.no_grad():
        for i, a in enumerate(ads):
            a.b.normal_(generator=torch.Generator().manual_seed(i))
    assert_merged_equals_hooks(bridge, tok, ads, "gpt2 with bias terms")
