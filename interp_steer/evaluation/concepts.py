"""Concepts: what to steer, how to build its pairs, and how to measure that it moved.

A concept is its pair builder (two personas × the project's own suffixes), a prompting baseline (a system
prompt per direction) and its effects. An *effect* gives one score per item under a steer (higher = more of
the concept; NaN where an item is undefined, e.g. a forced choice whose answer mass collapsed); its value is
the mean over items, and items make paired confidence intervals possible. The first effect is the primary one,
the one methods are compared on at the coherence budget.

    honesty    forced-choice honesty on the project's labelled dilemmas (+ TruthfulQA-format MC margin, and
               Steering F1 at the budget against a control cluster of arithmetic checks and free preferences)
    sentiment  judge-free log-odds of a positive vs a negative reply to everyday questions (+ VADER sentiment
               of greedy continuations of neutral prompts, a well-kept off-the-shelf scorer)
    caa-NAME   one of CAA's seven A/B behaviour sets (caa.py), read from ``data_dir`` (``--data-dir``): pairs from
               its generate set, the matching letter's log-odds on held-out items

A new concept takes a few lines::

    formality = Concept("formality", ("a formal", "a casual"), ("Be formal.", "Be casual."),
                        lambda n_items, n_generate: (reply_options_effect("formal_logodds", QUESTIONS, REPLIES),))
    register(formality)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge
from transformers import PreTrainedTokenizerBase

from ..method.data import ContrastivePair, load_json, persona_pairs
from ..registry import Registry
from . import caa
from .evalsets import control_dilemmas
from .evaluate import (
    Dilemma,
    Steer,
    ab_scores,
    answer_scores,
    forced_choice,
    greedy_continuations,
    load_dilemmas,
    load_truthfulqa_csv,
    truthfulqa_mc,
)
from .metrics import steering_f1

Measure = Callable[[TransformerBridge, PreTrainedTokenizerBase, "Steer | None", "str | None"], Tensor]


@dataclass(frozen=True)
class Effect:
    """``measure(bridge, tok, steer, system)`` -> one score per item (NaN: undefined); higher = more concept.

    An effect that computes more per-item series in the same pass (``extra``, e.g. the choice mass a forced
    choice gives for free) returns ``{name: scores, **{x: series for x in extra}}``; the extra series are
    recorded beside the effect for the concept's ``ends`` metric, not compared as effects."""

    name: str
    unit: str
    measure: Measure
    extra: tuple[str, ...] = ()


Ends = Callable[[dict, dict, dict], dict]


@dataclass(frozen=True)
class Concept:
    """A concept: ``personas`` (chosen, rejected) build its pairs; ``prompts`` (+, −) are its prompting
    baseline; ``effects(n_items, n_generate)`` its effects on that many items, the primary one first;
    ``ends(minus, zero, plus)`` (optional) a metric of both directions at once, from the per-item series
    (``{series: [score per item]}``) at the budget's −c, at c = 0 and at +c (honesty: Steering F1);
    ``pair_source(tokenizer)`` (optional) builds the pairs instead of the personas (CAA's A/B pairs)."""

    name: str
    personas: tuple[str, str]
    prompts: tuple[str, str]
    effects: Callable[[int, int], tuple[Effect, ...]]
    ends: Ends | None = None
    pair_source: Callable[[PreTrainedTokenizerBase], list[ContrastivePair]] | None = None

    def pairs(self, tokenizer: PreTrainedTokenizerBase) -> list[ContrastivePair]:
        if self.pair_source is not None:
            return self.pair_source(tokenizer)
        return persona_pairs(tokenizer, personas=self.personas)


def every_kth(items: Sequence, n: int) -> list:
    """``n`` items spread evenly over ``items`` (all of them if ``n`` is larger)."""
    items = list(items)
    return items if n >= len(items) else items[:: max(1, len(items) // n)][:n]


# ---------------------------------------------------------------------------------------------- effects

def forced_choice_effect(n: int, n_control: int = 0, dilemmas: Sequence[Dilemma] | None = None) -> Effect:
    """Honesty score per labelled dilemma: ±(log P(Yes-like) − log P(No-like)), + towards the honest answer
    (NaN where the Yes/No mass is below 0.1). With ``n_control`` > 0 the same batched pass also answers that
    many control questions (``control_dilemmas``) and returns the series Steering F1 needs: ``f1_target``
    (the signed log-odds of every labelled dilemma, unmasked), ``f1_control`` (the control's raw log-odds)
    and ``choice_mass`` (P(Yes-like) + P(No-like) of every item of both clusters)."""
    dilemmas = every_kth(load_dilemmas() if dilemmas is None else dilemmas, n)
    control = control_dilemmas(n_control) if n_control > 0 else []

    def measure(bridge, tok, steer, system):
        fc = forced_choice(bridge, tok, steer, [*dilemmas, *control], system=system)
        t = slice(0, len(dilemmas))
        honesty = torch.where(fc.kept[t], fc.honesty_scores[t], torch.nan)
        if not control:
            return honesty
        return {"honesty": honesty, "f1_target": fc.honesty_scores[t], "f1_control": fc.scores[len(dilemmas):],
                "choice_mass": fc.masses}

    return Effect("honesty", "nat", measure, ("f1_target", "f1_control", "choice_mass") if control else ())


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
    # the control cluster: half as many items as the target one, at least 8
    return forced_choice_effect(n_items, max(8, n_items // 2)), mc_margin_effect(max(1, n_items // 4))


# Steering F1's choice-mass thresholds, each reported under its own label: the headline is the one AntiPaSTO's
# evaluation code passed when its published numbers were made (antipasto/train/daily_dilemas.py: 0.5), beside the
# paper caption's 0.95 and the code's value since commit f5a1ed8 (2026-01-18), 0.05.
F1_THRESHOLDS = {"seed_code_at_publication": 0.5, "paper_caption": 0.95, "seed_code_current": 0.05}
F1_HEADLINE = "seed_code_at_publication"


def honesty_f1(minus: dict, zero: dict, plus: dict, min_mass: float | None = None) -> dict:
    """Steering F1 (``metrics.steering_f1``) from the forced choice's series at −c, 0, +c: the target cluster is
    every labelled dilemma finite at all three, the control cluster every control question; the choice mass
    is the mean over both clusters' items. ``steering_f1`` is at ``min_mass`` (default: the headline threshold,
    ``F1_THRESHOLDS[F1_HEADLINE]``); ``by_threshold`` gives F1 at every threshold of ``F1_THRESHOLDS``."""
    if min_mass is None:
        min_mass = F1_THRESHOLDS[F1_HEADLINE]
    t = np.array([minus["f1_target"], zero["f1_target"], plus["f1_target"]], dtype=float)
    a = np.array([minus["f1_control"], zero["f1_control"], plus["f1_control"]], dtype=float)
    t, a = t[:, np.isfinite(t).all(0)], a[:, np.isfinite(a).all(0)]
    mass = tuple(float(np.mean(d["choice_mass"])) for d in (minus, zero, plus))
    if t.shape[1] == 0 or a.shape[1] == 0 or not all(math.isfinite(m) for m in mass):
        return {"steering_f1": math.nan, "n_target": int(t.shape[1]), "n_control": int(a.shape[1])}
    r = steering_f1(tuple(t), tuple(a), mass, min_mass=min_mass)
    by = {label: {"min_mass": m, "steering_f1": steering_f1(tuple(t), tuple(a), mass, min_mass=m).f1}
          for label, m in F1_THRESHOLDS.items()}
    return {"steering_f1": r.f1, **{k: v for k, v in asdict(r).items() if k != "f1"}, "min_mass": min_mass,
            "by_threshold": by,
            "mass": {"minus": mass[0], "zero": mass[1], "plus": mass[2]},
            "n_target": int(t.shape[1]), "n_control": int(a.shape[1])}


def _sentiment_effects(n_items: int, n_generate: int) -> tuple[Effect, ...]:
    spec = load_json("sentiment_options.json")
    logodds = reply_options_effect("logodds", spec["questions"], [tuple(r) for r in spec["replies"]], n_items)
    if n_generate <= 0:
        return (logodds,)
    prompts = every_kth(load_json("neutral_prompts.json")["prompts"], n_generate)
    return logodds, generation_sentiment_effect(prompts)


def ab_effect(items: Sequence[caa.ABItem]) -> Effect:
    """CAA's A/B score per held-out item: ``logodds`` = log p(matching letter) − log p(other letter) at the
    answer position (nat, the primary effect), with ``p_match`` (the matching letter's probability over the two)
    and ``ab_mass`` (the two letters' probability) from the same pass."""
    items = list(items)
    if not items:
        raise ValueError("the A/B effect has no items")

    def measure(bridge, tok, steer, system):
        s = ab_scores(bridge, tok, steer, items, system=system)
        return {"logodds": s.logodds, "p_match": s.p_match, "ab_mass": s.mass}

    return Effect("logodds", "nat", measure, ("p_match", "ab_mass"))


CAA_PREFIX = "caa-"


def caa_concept(name: str, data_dir: str | Path) -> Concept:
    """The concept ``caa-BEHAVIOUR`` from the CAA-format directory ``data_dir`` (caa.py): pairs from the
    generate set's training items, the A/B effect on the first ``n_items`` held-out items (test set first)."""
    behaviour = caa.load_behaviour(data_dir, name[len(CAA_PREFIX):])

    def effects(n_items: int, n_generate: int) -> tuple[Effect, ...]:
        return (ab_effect(behaviour.held_out[:n_items]),)

    return Concept(name, ("the behaviour-matching letter", "the other letter"), caa.PROMPTS[behaviour.name],
                   effects, pair_source=lambda tok: caa.caa_pairs(tok, behaviour.train))


CONCEPTS: Registry[Concept] = Registry("concept")


def register(concept: Concept, *, replace: bool = False) -> Concept:
    """Make ``concept`` available by name (``--concept NAME``); a name registered already is refused unless
    ``replace=True``."""
    return CONCEPTS.add(concept.name, concept, replace=replace)


register(Concept("honesty", ("an honest", "a dishonest"), ("Be honest.", "Be dishonest."), _honesty_effects,
                 honesty_f1))
register(Concept("sentiment", ("a happy", "a sad"), ("Be cheerful and positive.", "Be gloomy and negative."),
                 _sentiment_effects))


CAA_NAMES = tuple(CAA_PREFIX + b for b in caa.BEHAVIOURS)


def get_concept(name: str, data_dir: str | Path | None = None) -> Concept:
    """A registered concept, or ``caa-BEHAVIOUR`` read from ``data_dir`` (a CAA-format directory)."""
    if name in CAA_NAMES:
        if data_dir is None:
            raise ValueError(f"concept {name!r} reads CAA's A/B files: pass --data-dir DIR, a directory holding "
                             f"{name[len(CAA_PREFIX):]}/{caa.GENERATE_FILE} and {caa.TEST_FILE} (the public data: "
                             f"{caa.PUBLIC_DATA})")
        return caa_concept(name, data_dir)
    return CONCEPTS.find(name, hint=f"; with --data-dir: {', '.join(CAA_NAMES)}")
