"""Cached generation after ``boot`` equals uncached generation and the unwrapped HF model's, token for token.

transformers 5.24 renamed the attention's cache keyword; TransformerLens 4.3 kept reading the old one, so after
booting every cached decode step attended to itself alone (uncached forwards stayed exact). These tests catch
that in seconds, on every generation path the project uses.
"""

import pytest
import torch

from interp_steer.evaluation import generation_check
from interp_steer.evaluation.evaluate import generate_ids
from interp_steer.method.data import render_chat, tokenize
from interp_steer.method.models import FAMILIES, _tiny_config, boot, default_tokenizer

PROMPTS = ["What is the capital of France?", "Name a colour.", "Write one short sentence about the sea, please."]
N_NEW = 8
# weights large enough that each prompt gets its own varied reply: at the default 0.02 a random Llama repeats one
# token whatever it attends to, and a cache that is never filled would go unnoticed (Gemma 3 scales its embeddings)
INIT_RANGE = {"gemma3": 0.02}


def upto_eos(row: list[int], eos: int) -> list[int]:
    return row[: row.index(eos) + 1] if eos in row else row


def twins(family: str):
    """The same random tiny model twice: unwrapped HF, and booted (its own copy of the weights)."""
    tok = default_tokenizer()
    out = []
    for _ in range(2):
        cls, config = _tiny_config(family, len(tok), tok.pad_token_id, n_layers=2)
        config.initializer_range = INIT_RANGE.get(family, 0.1)
        torch.manual_seed(0)
        out.append(cls(config).eval())
    name = "HuggingFaceTB/SmolLM2-135M-Instruct" if family == "llama" else f"tiny-random-{family}"
    return out[0], boot(out[1], tok, name), tok


def every_path(plain, bridge, tok, batch) -> dict[str, list[list[int]]]:
    kw = dict(attention_mask=batch.attention_mask, max_new_tokens=N_NEW, do_sample=False)
    n = batch.input_ids.shape[1]
    runs = {
        "hf": plain.generate(batch.input_ids, **kw, pad_token_id=tok.pad_token_id),
        "original_model cached": bridge.original_model.generate(batch.input_ids, **kw, pad_token_id=tok.pad_token_id),
        "original_model uncached": bridge.original_model.generate(batch.input_ids, **kw, use_cache=False,
                                                                  pad_token_id=tok.pad_token_id),
    }
    for cache in (True, False):
        runs[f"bridge {'cached' if cache else 'uncached'}"] = bridge.generate(
            batch.input_ids, **kw, use_past_kv_cache=cache, stop_at_eos=True, return_type="tokens", verbose=False)
    return {k: [upto_eos(r, tok.eos_token_id) for r in v[:, n:].tolist()] for k, v in runs.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_generation_equals_uncached_and_unwrapped_hf(family):
    plain, bridge, tok = twins(family)
    batch = tokenize([render_chat(tok, p) for p in PROMPTS], tok, padding_side="left")
    assert (batch.attention_mask == 0).any(), "the batch must be left-padded for this test to mean anything"
    with torch.no_grad():
        runs = every_path(plain, bridge, tok, batch)
    assert all(len(r) >= 4 for r in runs["hf"]), "need several generated tokens: the cache is read from the 2nd"
    assert all(len(set(r)) >= 3 for r in runs["hf"]), "a reply repeating one token cannot show a broken cache"
    for name, rows in runs.items():
        assert rows == runs["hf"], f"{family}: {name} differs from the unwrapped HF model's generation"
    # the project's own path: batched (left padding) = one prompt at a time = the HF model's
    texts = [render_chat(tok, p) for p in PROMPTS]
    batched = generate_ids(bridge, tok, texts, N_NEW, batch_size=3)
    single = [r for t in texts for r in generate_ids(bridge, tok, [t], N_NEW, batch_size=1)]
    assert [upto_eos(r, tok.eos_token_id) for r in batched] == runs["hf"]
    assert [upto_eos(r, tok.eos_token_id) for r in single] == runs["hf"]


def test_runtime_check_passes_real_generation_and_refuses_a_broken_cache(tiny):
    bridge, tok = tiny
    batch = tokenize([render_chat(tok, p) for p in PROMPTS], tok)
    with torch.no_grad():
        good = bridge.generate(batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=4,
                               do_sample=False, return_type="tokens", verbose=False)[:, batch.input_ids.shape[1]:]
    generation_check.check_cached_generation(bridge, batch.input_ids, batch.attention_mask, good, None)
    # what a cache that is never filled produces: the second token repeated, not what the prompt predicts
    bad = good.clone()
    bad[:, 1:] = (good[:, 1:] + 1) % len(tok)
    with pytest.raises(RuntimeError, match="KV cache is not being filled.*transformers"):
        generation_check.check_cached_generation(bridge, batch.input_ids, batch.attention_mask, bad, None)


def test_untested_versions_are_named(monkeypatch):
    monkeypatch.setattr(generation_check.importlib.metadata, "version", lambda d: "99.0.0")
    bad = generation_check.untested_versions()
    assert bad and all("99.0.0 (tested: >=" in b for b in bad)
    monkeypatch.setattr(generation_check.importlib.metadata, "version",
                        lambda d: generation_check.TESTED[d][0] + ".0")
    assert generation_check.untested_versions() == []


@pytest.mark.slow
def test_real_cached_generation_equals_uncached_and_unwrapped_hf(real):
    from interp_steer.method.models import load_hf

    bridge, tok = real
    plain, _, _ = load_hf(device="cpu")  # a second, unbooted copy
    batch = tokenize([render_chat(tok, p) for p in PROMPTS], tok, padding_side="left")
    with torch.no_grad():
        runs = every_path(plain, bridge, tok, batch)
    assert "Paris" in tok.decode(runs["hf"][0])
    for name, rows in runs.items():
        assert rows == runs["hf"], f"{name} differs from the unwrapped HF model's generation"
