"""A pair batch packed (each pair's shared prefix once, data.pack_pairs) gives the unpacked forward's states,
log-probs and gradients, in every family the tests cover, steered or not."""

import pytest
import torch

from interp_steer.method.adapter import AdapterSpec, apply_adapters, make_adapters
from interp_steer.method.data import ContrastivePair, pack_pairs, pair_batches, tokenize
from interp_steer.method.loss import token_mask
from interp_steer.method.models import FAMILIES, tiny_model
from interp_steer.method.prefix import reuse_prefix
from interp_steer.method.states import forward_last, packing

QUESTION = "<|im_start|>user\nWould you rather have {} now or {} later?\n(A) now\n(B) later<|im_end|>\n" \
           "<|im_start|>assistant\n("
# CAA's shape: the pair differs in its last token (the letter), prompts of different lengths in one batch
CHOICES = [("one cake", "two cakes"), ("a small bag of gold coins", "a big one"), ("tea", "a whole pot")]
PAIRS = [ContrastivePair(QUESTION.format(a, b) + "A", QUESTION.format(a, b) + "B") for a, b in CHOICES]
HOOKS = ["blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]


def _both(bridge, batch, **kw):
    return [forward_last(bridge, batch, HOOKS, logprobs=True, pack=p, **kw) for p in (False, True)]


def _close(plain, packed, mask):
    (h0, lp0), (h1, lp1) = plain, packed
    for n in HOOKS:
        torch.testing.assert_close(h1[n], h0[n], rtol=1e-5, atol=1e-5)
    assert lp1.shape == lp0.shape
    torch.testing.assert_close(lp1 * mask, lp0 * mask, rtol=1e-5, atol=1e-5)


def test_pack_layout_puts_every_token_back(tiny):
    _, tok = tiny
    batch = next(pair_batches(PAIRS, tok, len(PAIRS)))
    packed = pack_pairs(batch)
    assert packed is not None and packed.input_ids.shape[0] == len(PAIRS)
    real = batch.attention_mask.bool()
    assert torch.equal(packed.unpack(packed.input_ids)[real], batch.input_ids[real])
    assert torch.equal(packed.unpack(packed.position_ids)[real], batch.position_ids[real])
    # one more token per pair than its longer prompt: the prefix is stored once
    assert packed.input_ids.shape[1] == real.sum(-1).max() + 1
    # a rejected row's last token never sees the chosen row's letter
    rows = torch.arange(len(batch))
    r, c = packed.row[rows, batch.last], packed.col[rows, batch.last]
    assert torch.equal(r, rows // 2)  # both prompts of pair i live in packed row i
    for i in range(len(PAIRS)):
        assert not packed.mask[i, 0, c[2 * i + 1], c[2 * i]]
        assert packed.mask[i, 0, c[2 * i + 1], c[2 * i] - 1]


def test_pack_refuses_what_saves_little(tiny):
    _, tok = tiny
    unrelated = tokenize(["the cat sat on the mat today", "a completely different sentence here"], tok)
    assert pack_pairs(unrelated) is None
    assert pack_pairs(tokenize(["one", "two", "three"], tok)) is None  # odd rows: not pairs


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_forward_matches_unpacked(family):
    bridge, tok = tiny_model(family=family)
    batch = next(pair_batches(PAIRS, tok, len(PAIRS)))
    if family == "gemma3":  # its sliding window (4) is shorter than the prompts: the full mask would be wrong
        assert packing(bridge, batch) is None
    with torch.no_grad():
        _close(*_both(bridge, batch), token_mask(batch.attention_mask))


def test_packed_steered_forward_and_gradients_match(tiny):
    bridge, tok = tiny
    batch, c = next(pair_batches(PAIRS, tok, len(PAIRS))).doubled()  # c = +1 then -1, per row
    packed = packing(bridge, batch)
    assert packed is not None
    adapters = make_adapters(bridge, [AdapterSpec("blocks.1.mlp.out", rank=8)], init_scale=0.3)
    outs, grads = [], []
    for p in (None, packed):
        adapters.zero_grad()
        with apply_adapters(bridge, adapters, c if p is None else p.pair_values(c)):
            hs, lp = forward_last(bridge, batch, HOOKS, logprobs=True, pack=p is not None)
        m = token_mask(batch.attention_mask)
        (hs[HOOKS[1]].pow(2).sum() + (lp * m).sum()).backward()
        outs.append((hs, lp))
        grads.append([q.grad.clone() for q in adapters.parameters() if q.grad is not None])
    _close(*outs, token_mask(batch.attention_mask))
    assert grads[0] and len(grads[0]) == len(grads[1])
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g1, g0, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="one value per pair"):
        packed.pair_values(torch.arange(len(batch), dtype=torch.float))


def test_packed_forward_reuses_its_prefix(tiny):
    bridge, tok = tiny
    batch = next(pair_batches(PAIRS, tok, len(PAIRS)))
    adapters = make_adapters(bridge, [AdapterSpec("blocks.1.mlp.out", rank=8)], init_scale=0.3)
    with torch.no_grad(), apply_adapters(bridge, adapters, 1.0):
        plain = forward_last(bridge, batch, HOOKS, logprobs=True)
        with reuse_prefix(bridge, 1) as stats:
            forward_last(bridge, batch, HOOKS, logprobs=True, pack=True)  # fills
            again = forward_last(bridge, batch, HOOKS, logprobs=True, pack=True)  # reuses
    assert stats.reused == 1
    _close(plain, again, token_mask(batch.attention_mask))
