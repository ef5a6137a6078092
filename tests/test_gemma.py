"""Gemma-3-270M, the second packaged model (extra ``[gemma]``), offline by name: the family invariants on its real
weights. ``slow``: loaded once for this module (about a minute to dequantize the first time, then seconds)."""

import pytest
import torch

from interp_steer.method.adapter import AdapterSpec, apply_adapters, make_adapters, merged_weights
from interp_steer.method.data import render_chat, tokenize
from interp_steer.method.models import GEMMA_MODEL, load_model
from interp_steer.method.prefix import reuse_prefix
from interp_steer.method.states import capture
from interp_steer.names import resid_post

TEXTS = ["The capital of France is", "Honesty means telling the truth even when", "Hi"]


@pytest.fixture(scope="module")
def gemma():
    return load_model("gemma-3-270m", device="cpu")


def run(bridge, batch):
    return bridge(batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids).float()


@pytest.mark.slow
def test_gemma_loads_by_name_offline_with_a_chat_template(gemma):
    bridge, tok = gemma
    assert bridge.cfg.n_layers == 18 and bridge.cfg.model_name in (GEMMA_MODEL, "gemma-3-270m")
    head = render_chat(tok, "Hi?", system="You are a happy person.")
    assert head == f"{tok.bos_token}<start_of_turn>user\nYou are a happy person.\n\nHi?<end_of_turn>\n<start_of_turn>model\n"
    assert render_chat(tok, None,
                       system="P").endswith("<start_of_turn>user\nP<end_of_turn>\n<start_of_turn>model\n")
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = bridge.original_model.generate(ids, max_new_tokens=10, do_sample=False)
    # a base model: it answers, greedily, like this (the GGUF dequantized by transformers, checked by hand)
    assert tok.decode(out[0, ids.shape[1]:]).startswith(" the capital of the country of France")


@pytest.mark.slow
def test_gemma_invariants_c0_exact_merged_equals_hooks_capture_equals_hf_and_prefix_reuse(gemma):
    bridge, tok = gemma
    batch = tokenize(TEXTS, tok)
    adapters = make_adapters(bridge, [AdapterSpec("blocks.9.mlp.out", 8), AdapterSpec("blocks.12.attn.o", 8)])
    with torch.no_grad():
        for a in adapters:
            a.lam.normal_(0, 0.5)
            a.theta_v.normal_(0, 0.5)
        base = run(bridge, batch)
        with apply_adapters(bridge, adapters, 0.0):
            assert torch.equal(run(bridge, batch), base)
        with apply_adapters(bridge, adapters, 1.0):
            hooked = run(bridge, batch)
        assert (hooked - base).abs().max() > 1e-2
        with merged_weights(bridge, adapters, 1.0):
            merged = run(bridge, batch)
        assert (merged - hooked).abs().max() <= 1e-3 * hooked.abs().max()
        assert torch.equal(run(bridge, batch), base)  # weights restored
        hs = capture(bridge, [batch], [resid_post(4), resid_post(10)], progress=False)
        ref = bridge.original_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                    position_ids=batch.position_ids, output_hidden_states=True).hidden_states
        rows = torch.arange(len(batch))
        for L in (4, 10):
            assert (hs[resid_post(L)] - ref[L + 1][rows, batch.last]).abs().max() <= 1e-3
        with reuse_prefix(bridge, 9) as stats:
            run(bridge, batch)
            with apply_adapters(bridge, adapters, 1.0):
                reused = run(bridge, batch)
        assert stats.reused == 1 and (reused - hooked).abs().max() <= 1e-4
