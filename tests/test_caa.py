"""CAA's A/B behaviour sets as concepts: the loader refuses malformed files, pairs differ in their last token,
held-out items never make pairs, and the A/B score equals the letters' log-probs of a full forward pass."""

import json
import math

import pytest
import torch

from interp_steer.config import ConfigError, StudyRun, TrainRun
from interp_steer.evaluation import caa
from interp_steer.evaluation.concepts import CAA_NAMES, get_concept
from interp_steer.evaluation.evaluate import ab_scores
from interp_steer.method.data import check_pairs, token_difference, tokenize
from interp_steer.method.directions import SteeringVector

CAA = "data/caa"  # under ../shared (tests/conftest.py: the `shared` marker and fixture)


def item(q="Do you agree?\n\nChoices:\n (A) Yes\n (B) No", m="(A)", o="(B)") -> dict:
    return {"question": q, "answer_matching_behavior": m, "answer_not_matching_behavior": o}


def write_behaviour(root, name="sycophancy", n_generate=140, n_test=6):
    d = root / name
    d.mkdir(parents=True)
    gen = [item(f"Question {i}?\n\nChoices:\n (A) Yes\n (B) No", *(("(A)", "(B)") if i % 2 else ("(B)", "(A)")))
           for i in range(n_generate)]
    test = [item(f"Test {i}?\n (A) one\n (B) two\n (C) three", "(C)" if i == 0 else "(A)", "(B)") for i in range(n_test)]
    (d / caa.GENERATE_FILE).write_text(json.dumps(gen))
    (d / caa.TEST_FILE).write_text(json.dumps(test))
    return root


@pytest.mark.parametrize("bad, message", [
    ({"question": "Q (A) (B)"}, "expected an object with keys"),
    (item(m="A"), "a letter in parentheses"),
    (item(m="(B)"), "are both (B)"),
    (item(q="Pick one: (A) or nothing", o="(C)"), "offers no choice (C)"),
    (item(q="   "), "empty question"),
    ("not an object", "expected an object"),
])
def test_a_malformed_item_is_refused_naming_the_file_and_item(tmp_path, bad, message):
    path = tmp_path / "items.json"
    path.write_text(json.dumps([item(), bad]))
    with pytest.raises(ValueError, match="item 1") as e:
        caa.load_items(path, "x")
    assert message in str(e.value) and str(path) in str(e.value)


def test_files_that_are_not_item_lists_are_refused(tmp_path):
    (tmp_path / "empty.json").write_text("[]")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="non-empty JSON list"):
        caa.load_items(tmp_path / "empty.json", "x")
    with pytest.raises(ValueError, match="not a UTF-8 JSON file"):
        caa.load_items(tmp_path / "bad.json", "x")
    with pytest.raises(FileNotFoundError, match="nrimsky/CAA"):
        caa.load_items(tmp_path / "absent.json", "x")
    with pytest.raises(FileNotFoundError, match="has no directory 'refusal'"):
        caa.load_behaviour(tmp_path, "refusal")


def test_held_out_items_are_the_test_set_then_generate_items_that_make_no_pair(tmp_path):
    b = caa.load_behaviour(write_behaviour(tmp_path), "sycophancy")
    assert b.n_test == 6 and len(b.held_out) == 6 + caa.HELD_OUT_GENERATE and len(b.train) == 140 - 100
    assert [i.id for i in b.held_out[:6]] == [f"sycophancy-test-{k}" for k in range(6)]
    assert not {i.id for i in b.held_out} & {i.id for i in b.train}
    assert b.held_out[0].matching == "C"  # a third choice is kept as the item gives it
    balance = b.letter_balance()
    assert set(balance) == {"A", "B"} and sum(balance.values()) == 40
    assert caa.load_behaviour(tmp_path, "sycophancy") == b  # deterministic
    (tmp_path / "small").mkdir()
    for f in (caa.GENERATE_FILE, caa.TEST_FILE):
        (tmp_path / "small" / f).write_text(json.dumps([item()] * 20))
    with pytest.raises(ValueError, match="at least 116 are needed"):
        caa.load_behaviour(tmp_path, "small")


def test_a_pair_is_the_question_with_either_letter_and_differs_in_its_last_token(tiny, tmp_path):
    _, tok = tiny
    b = caa.load_behaviour(write_behaviour(tmp_path), "sycophancy")
    pairs = caa.caa_pairs(tok, b.train)
    check_pairs(pairs, tok)
    for p, it in zip(pairs, b.train):
        assert p.chosen.endswith("(" + it.matching) and p.rejected.endswith("(" + it.other)
        a, r = (tok(x, add_special_tokens=False)["input_ids"] for x in (p.chosen, p.rejected))
        assert len(a) == len(r) and a[:-1] == r[:-1] and a[-1] != r[-1]
        assert token_difference(tok, p.chosen, p.rejected) == 1


def test_the_ab_score_is_the_letters_log_probs_of_a_full_forward(tiny, tmp_path):
    bridge, tok = tiny
    items = caa.load_behaviour(write_behaviour(tmp_path), "sycophancy").held_out[:5]
    s = ab_scores(bridge, tok, None, items, batch_size=2)
    for k, it in enumerate(items):  # one item at a time, every position unembedded
        text = caa.caa_pairs(tok, [it])[0].chosen[:-1]
        batch = tokenize([text], tok)
        with torch.no_grad():
            logp = bridge(batch.input_ids, attention_mask=batch.attention_mask)[0, -1].float().log_softmax(-1)
        m, o = (logp[caa.letter_token(tok, x)] for x in (it.matching, it.other))
        assert s.logodds[k].item() == pytest.approx((m - o).item(), abs=1e-5)
        assert s.mass[k].item() == pytest.approx((m.exp() + o.exp()).item(), rel=1e-5)
        assert s.p_match[k].item() == pytest.approx(1 / (1 + math.exp(-(m - o).item())), abs=1e-6)
    s4 = ab_scores(bridge, tok, None, items, batch_size=4)  # batched = unbatched
    torch.testing.assert_close(s4.logodds, s.logodds, atol=1e-5, rtol=0)


def test_a_steer_and_a_system_prompt_move_the_ab_score(tiny, tmp_path):
    bridge, tok = tiny
    items = caa.load_behaviour(write_behaviour(tmp_path), "sycophancy").held_out[:4]
    base = ab_scores(bridge, tok, None, items)
    d = torch.randn(bridge.cfg.d_model, generator=torch.Generator().manual_seed(1))
    vec = SteeringVector({"blocks.0.hook_resid_post": d / d.norm()}, {"blocks.0.hook_resid_post": 8.0})
    steered = ab_scores(bridge, tok, vec.scaled(1.0).apply, items)
    prompted = ab_scores(bridge, tok, None, items, system=caa.PROMPTS["sycophancy"][0])
    assert (steered.logodds - base.logodds).abs().max() > 1e-3
    assert (prompted.logodds - base.logodds).abs().max() > 1e-3


def test_caa_concepts_need_a_data_dir_and_read_it(tiny, tmp_path):
    _, tok = tiny
    assert len(CAA_NAMES) == 7 and "caa-sycophancy" in CAA_NAMES
    with pytest.raises(ValueError, match="--data-dir"):
        get_concept("caa-sycophancy")
    with pytest.raises(ConfigError, match="--data-dir"):
        StudyRun(concepts=("caa-sycophancy",))
    with pytest.raises(ConfigError, match="--data-dir"):
        TrainRun(concept="caa-refusal")
    with pytest.raises(ConfigError, match="is not a directory"):
        TrainRun(concept="caa-refusal", data_dir=str(tmp_path / "absent"))
    write_behaviour(tmp_path)
    concept = get_concept("caa-sycophancy", tmp_path)
    assert concept.prompts == caa.PROMPTS["sycophancy"] and len(concept.pairs(tok)) == 40
    (effect,) = concept.effects(10, 5)
    assert effect.name == "logodds" and effect.extra == ("p_match", "ab_mass")
    assert StudyRun(concepts=("caa-sycophancy", "honesty"), data_dir=str(tmp_path)).data_dir == str(tmp_path)
    # a study's data is read when its cells run: a report from committed cells needs none
    assert StudyRun(concepts=("caa-sycophancy",), data_dir=str(tmp_path / "absent"), report_only=True).report_only


@pytest.mark.shared(CAA)
def test_the_seven_public_behaviours_load_with_their_counts(shared_dir):
    counts = {"coordinate-other-ais": 360, "corrigible-neutral-HHH": 290, "hallucination": 1000,
              "myopic-reward": 950,
              "survival-instinct": 903, "sycophancy": 1000, "refusal": 408}  # ../shared/data/caa/README.md
    for name, n in counts.items():
        b = caa.load_behaviour(shared_dir / CAA, name)
        assert b.n_test == 50 and len(b.held_out) == 150 and len(b.train) == n - caa.HELD_OUT_GENERATE
        balance = b.letter_balance()
        if name == "survival-instinct":  # more than two choices, and the matching answer mostly (A)
            assert balance["A"] > 2 * balance["B"] and len(balance) > 2
        else:  # the others are balanced within 10 points
            assert set(balance) == {"A", "B"} and abs(balance["A"] / sum(balance.values()) - 0.5) < 0.1
