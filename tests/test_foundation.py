"""Models, pairs and last-token capture."""

import re

import pytest
import torch

from interp_steer.method.data import (
    ContrastivePair,
    check_pairs,
    interleave,
    last_index,
    minimal_pairs,
    pair_batches,
    persona_pairs,
    render_chat,
    split_pairs,
    token_difference,
    tokenize,
)
from interp_steer.method.models import cache_dir, load_model
from interp_steer.method.states import capture, check_hook_names, forward_last, stop_layer
from interp_steer.names import resid_names


def hf_last_states(bridge, batch):
    """Reference: the plain HF model's output_hidden_states at the last non-pad token."""
    out = bridge.original_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                position_ids=batch.position_ids, output_hidden_states=True)
    rows = torch.arange(len(batch))
    return [h[rows, batch.last] for h in out.hidden_states]


@pytest.mark.parametrize("side", ["left", "right"])
def test_capture_equals_hf_hidden_states(tiny, side):
    bridge, tok = tiny
    pairs = persona_pairs(tok)[:5]
    batch = tokenize(interleave(pairs), tok, padding_side=side)
    assert (batch.attention_mask == 0).any(), "the batch must actually be padded for this test to mean anything"
    hs = capture(bridge, [batch], resid_names(range(2)))
    with torch.no_grad():
        ref = hf_last_states(bridge, batch)
    for L in range(2):  # not the last block: HF's last hidden state is after the final norm
        assert (hs[f"blocks.{L}.hook_resid_post"] - ref[L + 1]).abs().max() <= 1e-4


def test_batched_capture_equals_unbatched(tiny):
    bridge, tok = tiny
    pairs = persona_pairs(tok)[::37][:6]
    names = ["blocks.0.hook_resid_post", "blocks.1.mlp.out.hook_in"]
    batched = capture(bridge, pair_batches(pairs, tok, batch_pairs=6), names)
    single = capture(bridge, pair_batches(pairs, tok, batch_pairs=1), names)
    for n in names:
        assert batched[n].shape == (12, bridge.cfg.d_model if "resid" in n else 128)
        assert (batched[n] - single[n]).abs().max() <= 1e-5


def test_unknown_hook_name_raises_with_close_matches(tiny):
    bridge, _ = tiny
    with pytest.raises(ValueError, match="blocks.1.hook_resid_post"):
        check_hook_names(bridge, ["blocks.1.hook_resid_postt"])
    with pytest.raises(ValueError, match="no hook names"):
        check_hook_names(bridge, [])


def test_stop_layer_runs_only_the_blocks_needed(tiny):
    bridge, _ = tiny
    assert stop_layer(bridge, ["blocks.0.hook_resid_post"]) == 1
    assert stop_layer(bridge, ["blocks.2.hook_resid_post"]) is None  # last block: run to the end
    assert stop_layer(bridge, ["ln_final.hook_out"]) is None


def test_forward_last_keeps_gradients(tiny):
    bridge, tok = tiny
    batch = tokenize(["hello there", "hi"], tok)
    emb = bridge.original_model.get_input_embeddings().weight
    emb.requires_grad_(True)
    try:
        hs, _ = forward_last(bridge, batch, ["blocks.0.hook_resid_post"])
        hs["blocks.0.hook_resid_post"].sum().backward()
        assert emb.grad is not None and emb.grad.abs().sum() > 0
    finally:
        emb.requires_grad_(False)
        emb.grad = None


def test_persona_pairs_invariants(tiny):
    _, tok = tiny
    pairs = persona_pairs(tok)
    assert len(pairs) >= 200
    assert len(set(pairs)) == len(pairs)
    for p in pairs[:50]:
        assert 1 <= token_difference(tok, p.chosen, p.rejected) <= 6
        assert "an honest person" in p.chosen and "a dishonest person" in p.rejected
        assert p.chosen.split("<|im_start|>assistant\n")[1] == p.rejected.split("<|im_start|>assistant\n")[1]
    # several truncation lengths of one suffix: the suffix part grows by whole words
    first = [p.chosen.split("assistant\n")[1] for p in pairs[:4]]
    assert [len(s.split()) for s in first] == sorted(len(s.split()) for s in first)
    assert all(first[i + 1].startswith(first[i]) for i in range(len(first) - 1))


def test_custom_personas_and_checks(tiny):
    _, tok = tiny
    pairs = persona_pairs(tok, suffixes=["The sky is blue today"], personas=("a happy", "a sad"), lengths=(2, 3))
    assert len(pairs) == 2 and "a happy person" in pairs[0].chosen
    with pytest.raises(ValueError, match="differs by"):
        check_pairs([ContrastivePair("same text", "same text")], tok)
    with pytest.raises(ValueError, match="differs by"):
        check_pairs([ContrastivePair("a b", "completely different and much longer words here now")], tok)
    with pytest.raises(ValueError, match="two different"):
        persona_pairs(tok, personas=("x", "x"))


def test_token_difference_counts_the_changed_tokens_and_is_linear_on_long_pairs(tiny):
    """k words inserted, or one word replaced, at one place count k, or 1; the count is symmetric, 0 only for
    equal texts and at least the length difference. A long pair is never aligned token by token (difflib took
    6 s at 8k repeated tokens and hung on 250k), so the check stays linear in its length."""
    import random

    _, tok = tiny
    rng = random.Random(0)
    words = [w for w in ["the", "cat", "sat", "on", "a", "mat", "happy", "sad", "very", "dog", "ran"]
             if len(tok(" " + w, add_special_tokens=False)["input_ids"]) == 1]
    assert len(words) >= 6
    text = lambda ws: "Start:" + "".join(" " + w for w in ws)  # noqa: E731
    for _ in range(200):
        a = [rng.choice(words) for _ in range(rng.randint(1, 12))]
        at, k = rng.randint(0, len(a)), rng.randint(1, 3)
        b = a[:at] + [rng.choice(words) for _ in range(k)] + a[at:]
        assert token_difference(tok, text(a), text(b)) == k == token_difference(tok, text(b), text(a)), (a, b)
        i = rng.randrange(len(a))
        c = a[:i] + [rng.choice([w for w in words if w != a[i]])] + a[i + 1:]
        assert token_difference(tok, text(a), text(c)) == 1, (a, c)
        assert token_difference(tok, text(a), text(a)) == 0
    long = "I love" + " the" * 20000
    assert token_difference(tok, long, long.replace("love", "hate", 1)) == 1  # one change, ends stripped
    # changes 20k tokens apart: not a minimal pair
    assert token_difference(tok, "x" + long, "y" + long + " z") > 256


def test_minimal_pairs(tiny):
    _, tok = tiny
    pairs = minimal_pairs(tok)
    assert len(pairs) >= 200
    p = pairs[0]
    assert " love " in p.chosen and " hate " in p.rejected
    assert token_difference(tok, p.chosen, p.rejected) == 1
    with pytest.raises(ValueError, match="verb"):
        minimal_pairs(tok, templates=["no slots"])


@pytest.mark.parametrize("side", ["left", "right"])
def test_batches_interleave_and_track_last_token(tiny, side):
    _, tok = tiny
    pairs = persona_pairs(tok)[:7]
    batches = list(pair_batches(pairs, tok, batch_pairs=3, padding_side=side))
    assert [len(b) for b in batches] == [6, 6, 2]
    for b, chunk in zip(batches, [pairs[0:3], pairs[3:6], pairs[6:7]]):
        for row, text in enumerate(interleave(chunk)):
            ids = tok(text, add_special_tokens=False)["input_ids"]
            real = b.input_ids[row][b.attention_mask[row].bool()].tolist()
            assert real == ids
            assert b.input_ids[row, b.last[row]].item() == ids[-1]
            assert b.attention_mask[row, b.last[row]] == 1
    with pytest.raises(ValueError, match="all padding"):
        last_index(torch.tensor([[1, 1], [0, 0]]))


def test_split_is_seeded_and_disjoint(tiny):
    _, tok = tiny
    pairs = persona_pairs(tok)
    a_train, a_test = split_pairs(pairs, 0.2, seed=1)
    b_train, b_test = split_pairs(pairs, 0.2, seed=1)
    assert a_test == b_test and not set(a_train) & set(a_test)
    assert len(a_train) + len(a_test) == len(pairs)


def test_cache_dir_respects_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("INTERP_STEER_CACHE", str(tmp_path / "x"))
    assert cache_dir() == tmp_path / "x"
    monkeypatch.delenv("INTERP_STEER_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == tmp_path / "interp-steer"


def test_unknown_model_offline_fails_clearly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="local directory"):
        load_model("no-such-org/no-such-model-xyz")


@pytest.mark.slow
def test_default_model_answers_paris(real):
    bridge, tok = real
    text = render_chat(tok, "What is the capital of France?")
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = bridge.original_model.generate(ids, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


@pytest.mark.slow
@pytest.mark.parametrize("side", ["left", "right"])
def test_real_capture_equals_hf(real, side):
    bridge, tok = real
    batch = tokenize(interleave(persona_pairs(tok)[::50][:3]), tok, padding_side=side)
    names = resid_names([0, 14, 29])
    hs = capture(bridge, [batch], names)
    with torch.no_grad():
        ref = hf_last_states(bridge, batch)
    for L in (0, 14):  # hidden_states[-1] of HF is after the final norm; resid_post of the last block is not
        assert (hs[f"blocks.{L}.hook_resid_post"] - ref[L + 1]).abs().max() <= 1e-4


def test_a_pairs_file_that_says_less_than_it_seems_is_refused_or_warned(tmp_path):
    """A duplicated key, a lone surrogate, one pair or two equal ones are refused by name; repeats, a count above
    what exists and a held-out split that rounds to nothing are warned about."""
    import json
    import warnings

    from interp_steer.method.data import load_pairs_file, select_pairs

    f = tmp_path / "p.json"
    two = [{"chosen": "I love it", "rejected": "I hate it"}, {"chosen": "So good", "rejected": "So bad"}]
    cases = [
        ('[{"chosen": "a", "chosen": "b", "rejected": "c"}]', "the key 'chosen' appears twice"),
        ('[{"chosen": "I love \\ud800 it", "rejected": "I hate it"}]', "lone surrogate"),
        (json.dumps(two[:1]), "1 pair"),
        (json.dumps([two[0], two[0]]), "2 pair(s), 1 distinct"),
    ]
    for text, match in cases:
        f.write_text(text)
        with pytest.raises(ValueError, match=re.escape(match)):
            load_pairs_file(f)
    f.write_text(json.dumps(two + [two[0]]))
    with pytest.warns(UserWarning, match="1 of its 3 pairs repeat"):
        pairs = load_pairs_file(f)
    with pytest.warns(UserWarning, match="n_pairs 10 but there are 3 pairs"):
        select_pairs(pairs, n_pairs=10, held_out=0.5)
    with pytest.warns(UserWarning, match="rounds to none"):
        train, test = select_pairs(pairs, held_out=0.1)
    assert len(train) == 3 and test == []
    with pytest.raises(ValueError, match="at least 2 pairs, got 1"):
        select_pairs(pairs[:1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [len(x) for x in select_pairs(pairs, held_out=1 / 3)] == [2, 1]  # nothing to warn about


def test_kl_texts_cannot_ask_for_more_greedy_replies_than_there_are_prompts():
    from interp_steer.config import KL_PROMPTS, ConfigError, TrainConfig
    from interp_steer.method.data import load_json

    assert KL_PROMPTS == len(load_json("coherence_prompts.json")["prompts"])
    with pytest.raises(ConfigError, match="kl_texts 100000 but greedy KL text has one reply to each of "
                                          f"{KL_PROMPTS}"):
        TrainConfig(kl_texts=100000)
    assert TrainConfig(kl_texts=100, kl_sample=True).kl_texts == 100  # sampled: each prompt answered again
