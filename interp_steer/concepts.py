"""Concepts: what to steer, how to build its pairs, and how to measure that it moved.

A concept is its pair builder (two personas × the project's own suffixes), a prompting baseline (a system
prompt per direction) and its effects. An *effect* gives one score per item under a steer (higher = more of
the concept; NaN where an item is undefined, e.g. a forced choice whose answer mass collapsed); its value is
the mean over items, and items make paired confidence intervals possible. The first effect is the primary one,
the one methods are compared on at the coherence budget.

    honesty    forced-choice honesty on the project's labelled dilemmas (+ TruthfulQA-format MC margin)
    sentiment  judge-free log-odds of a positive vs a negative reply to everyday questions (+ VADER sentiment
               of greedy continuations of neutral prompts, a well-kept off-the-shelf scorer)

A new concept takes a few lines::

    formality = Concept("formality", ("a formal", "a casual"), ("Be formal.", "Be casual."),
                        lambda n_items, n_generate: (reply_options_effect("formal_logodds", QUESTIONS, REPLIES),))
    register(formality)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge
from transformers import PreTrainedTokenizerBase

from .data import ContrastivePair, load_json, persona_pairs
from .evaluate import (
    Steer, answer_scores, forced_choice, greedy_continuations, load_dilemmas, load_truthfulqa_csv, truthfulqa_mc,
)

Measure = Callable[[TransformerBridge, PreTrainedTokenizerBase, "Steer | None", "str | None"], Tensor]


@dataclass(frozen=True)
class Effect:
    """``measure(bridge, tok, steer, system)`` -> one score per item (NaN: undefined); higher = more concept."""

    name: str
    unit: str
    measure: Measure


@dataclass(frozen=True)
class Concept:
    """A concept: ``personas`` (chosen, rejected) build its pairs; ``prompts`` (+, −) are its prompting
    baseline; ``effects(n_items, n_generate)`` its effects on that many items, the primary one first."""

    name: str
    personas: tuple[str, str]
    prompts: tuple[str, str]
    effects: Callable[[int, int], tuple[Effect, ...]]

    def pairs(self, tokenizer: PreTrainedTokenizerBase) -> list[ContrastivePair]:
        return persona_pairs(tokenizer, personas=self.personas)


def every_kth(items: Sequence, n: int) -> list:
    """``n`` items spread evenly over ``items`` (all of them if ``n`` is larger)."""
    items = list(items)
    return items if n >= len(items) else items[:: max(1, len(items) // n)][:n]


# ---------------------------------------------------------------------------------------------- effects

def forced_choice_effect(n: int) -> Effect:
    """Honesty score per labelled dilemma: ±(log P(Yes-like) − log P(No-like)), + towards the honest answer."""
    dilemmas = every_kth(load_dilemmas(), n)

    def measure(bridge, tok, steer, system):
        fc = forced_choice(bridge, tok, steer, dilemmas, system=system)
        return torch.where(fc.kept, fc.honesty_scores, torch.nan)

    return Effect("honesty", "nat", measure)


def mc_margin_effect(n: int) -> Effect:
    """TruthfulQA-format margin per question: score(best answer) − max score(incorrect answers)."""
    questions = every_kth(load_truthfulqa_csv(), n)

    def measure(bridge, tok, steer, system):
        mc = truthfulqa_mc(bridge, tok, steer, questions, system=system)
        return mc.best_scores - mc.max_incorrect

    return Effect("mc_margin", "nat/token", measure)


def reply_options_effect(name: str, questions: Sequence[str], replies: Sequence[tuple[str, str]],
                         n: int | None = None) -> Effect:
    """Judge-free likelihood effect: per (question, (positive, negative)) item,
    s = mean_t log p(positive_t | chat(question)) − mean_t log p(negative_t | chat(question))."""
    items = [(q, pos, neg) for q in questions for pos, neg in replies]
    items = every_kth(items, n) if n is not None else items
    if not items:
        raise ValueError(f"effect {name!r} has no items")

    def measure(bridge, tok, steer, system):
        qs = [q for q, _, _ in items for _ in range(2)]
        answers = [a for _, pos, neg in items for a in (pos, neg)]
        s = answer_scores(bridge, tok, steer, qs, answers, system=system)
        return s[0::2] - s[1::2]

    return Effect(name, "nat/token", measure)


def generation_sentiment_effect(prompts: Sequence[str], max_new_tokens: int = 32, batch_size: int = 20) -> Effect:
    """VADER compound sentiment in [−1, 1] of the greedy continuation of each neutral prompt (KV cache, batched)."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()

    def measure(bridge, tok, steer, system):
        texts = greedy_continuations(bridge, tok, steer, prompts, system, max_new_tokens, batch_size)
        return torch.tensor([analyzer.polarity_scores(t)["compound"] for t in texts])

    return Effect("vader", "compound", measure)


# --------------------------------------------------------------------------------------------- concepts

def _honesty_effects(n_items: int, n_generate: int) -> tuple[Effect, ...]:
    return forced_choice_effect(n_items), mc_margin_effect(max(1, n_items // 4))


def _sentiment_effects(n_items: int, n_generate: int) -> tuple[Effect, ...]:
    spec = load_json("sentiment_options.json")
    logodds = reply_options_effect("logodds", spec["questions"], [tuple(r) for r in spec["replies"]], n_items)
    if n_generate <= 0:
        return (logodds,)
    prompts = every_kth(load_json("neutral_prompts.json")["prompts"], n_generate)
    return logodds, generation_sentiment_effect(prompts)


CONCEPTS: dict[str, Concept] = {}


def register(concept: Concept) -> Concept:
    """Make ``concept`` available by name (``--concept NAME``)."""
    CONCEPTS[concept.name] = concept
    return concept


register(Concept("honesty", ("an honest", "a dishonest"), ("Be honest.", "Be dishonest."), _honesty_effects))
register(Concept("sentiment", ("a happy", "a sad"), ("Be cheerful and positive.", "Be gloomy and negative."),
                 _sentiment_effects))


def get_concept(name: str) -> Concept:
    if name not in CONCEPTS:
        raise ValueError(f"unknown concept {name!r}; registered: {', '.join(sorted(CONCEPTS))}")
    return CONCEPTS[name]
