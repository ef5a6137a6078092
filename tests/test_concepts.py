"""Concepts: their pairs, their effects against hand computations, and a user's own concept in a few lines."""

import pytest
import torch

from interp_steer.evaluation.concepts import (
    CONCEPTS,
    Concept,
    get_concept,
    greedy_continuations,
    register,
    reply_options_effect,
)
from interp_steer.evaluation.evaluate import answer_scores
from interp_steer.method.adapter import AdapterSpec, apply_adapters, make_adapters
from interp_steer.method.data import render_chat


def test_builtin_concepts_build_their_pairs_and_effects(tiny):
    _, tok = tiny
    assert {"honesty", "sentiment"} <= set(CONCEPTS)
    sent = get_concept("sentiment")
    pairs = sent.pairs(tok)
    assert len(pairs) > 250 and "a happy person" in pairs[0].chosen and "a sad person" in pairs[0].rejected
    names = [e.name for e in sent.effects(200, 4)]
    assert names == ["logodds", "vader"] and [e.name for e in sent.effects(200, 0)] == ["logodds"]
    assert [e.name for e in get_concept("honesty").effects(10, 2)] == ["honesty", "mc_margin"]
    with pytest.raises(ValueError, match="unknown concept 'nope'; registered: honesty, sentiment"):
        get_concept("nope")


def test_reply_log_odds_match_a_hand_computation(tiny):
    bridge, tok = tiny
    effect = reply_options_effect("e", ["How was it?", "How did it go?"],
                                  [("Great.", "Awful."), ("Fine.", "Bad.")])
    scores = effect.measure(bridge, tok, None, None)
    assert scores.shape == (4,)
    s = answer_scores(bridge, tok, None, ["How was it?"] * 2, ["Great.", "Awful."])
    assert scores[0].item() == pytest.approx((s[0] - s[1]).item(), abs=1e-5)
    assert get_concept("sentiment").effects(6, 0)[0].measure(bridge, tok, None, None).shape == (6,)  # n items


def test_greedy_continuations_batched_equal_unbatched_and_c_zero_is_the_base_model(tiny):
    bridge, tok = tiny
    prompts = ["Describe a kitchen.", "Tell me about the weather today and tomorrow, please."]
    both = greedy_continuations(bridge, tok, None, prompts, max_new_tokens=6, batch_size=2)
    assert both == [greedy_continuations(bridge, tok, None, [p], max_new_tokens=6)[0] for p in prompts]
    ads = make_adapters(bridge, [AdapterSpec("blocks.1.mlp.out", rank=8)], init_scale=2.0)
    zero = greedy_continuations(bridge, tok, lambda b: apply_adapters(b, ads, 0.0), prompts, max_new_tokens=6)
    assert zero == both
    steered = greedy_continuations(bridge, tok, lambda b: apply_adapters(b, ads, 3.0), prompts, max_new_tokens=6)
    assert steered != both  # the hooks act during generation (with the KV cache)


def test_a_users_concept_takes_a_few_lines_and_is_registered(tiny):
    bridge, tok = tiny
    formality = register(Concept("formality", ("a formal", "a casual"), ("Be formal.", "Be casual."),
                                 lambda n, m: (reply_options_effect("formal", ["Hi?"], [("Good day.", "Hey.")]),)))
    try:
        assert get_concept("formality") is formality
        (effect,) = formality.effects(1, 0)
        scores = effect.measure(bridge, tok, None, "Be formal.")
        assert scores.shape == (1,) and torch.isfinite(scores).all()
        assert render_chat(tok, "Hi?", system="Be formal.") != render_chat(tok, "Hi?")
    finally:
        CONCEPTS.pop("formality")
