"""Prefix reuse: a pass that reuses the residual entering block B equals the full forward, on every family."""

import pytest
import torch

from interp_steer.method.adapter import AdapterSpec, apply_adapters, make_adapters
from interp_steer.method.data import interleave, persona_pairs, tokenize
from interp_steer.method.models import FAMILIES, tiny_model
from interp_steer.method.prefix import first_block, reuse_prefix


def run(bridge, batch):
    return bridge(batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids).float()


def trained_like(bridge, sites):
    adapters = make_adapters(bridge, [AdapterSpec(s, 4, bias="free") for s in sites])
    with torch.no_grad():
        for a in adapters:
            for p in a.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.3)  # far from the identity: the steer really changes the logits
    return adapters


@pytest.mark.parametrize("family", FAMILIES)
def test_reused_prefix_equals_the_full_forward(family):
    bridge, tok = tiny_model(family=family)
    batch = tokenize(interleave(persona_pairs(tok)[:3]), tok)
    adapters = trained_like(bridge, ["blocks.1.mlp.out", "blocks.2.attn.o"])
    with torch.no_grad():
        base = run(bridge, batch)
        full = {c: None for c in (-1.0, 1.0)}
        for c in full:
            with apply_adapters(bridge, adapters, c):
                full[c] = run(bridge, batch)
        assert (full[1.0] - base).abs().max() > 1e-2, "the steer must change the logits for this test to mean much"
        with reuse_prefix(bridge, 1) as stats:
            ref = run(bridge, batch)  # the reference pass fills the store
            got = {}
            for c in full:
                with apply_adapters(bridge, adapters, c):
                    got[c] = run(bridge, batch)
        assert (stats.filled, stats.reused, stats.full) == (1, 2, 0)
    assert torch.equal(ref, base)
    for c in full:
        assert (got[c] - full[c]).abs().max() <= 1e-5
    assert "forward" not in vars(bridge) and all("forward" not in vars(b) for b in bridge.blocks)


def test_reuse_keeps_gradients_batched_equals_unbatched_and_falls_back_when_it_must(tiny):
    bridge, tok = tiny
    pairs = persona_pairs(tok)[:4]
    batch = tokenize(interleave(pairs), tok)
    adapters = trained_like(bridge, ["blocks.1.mlp.out"])

    def loss():
        with apply_adapters(bridge, adapters, 1.0):
            return run(bridge, batch).logsumexp(-1).mean()

    want = torch.autograd.grad(loss(), list(adapters.parameters()), allow_unused=True)
    with reuse_prefix(bridge, 1) as stats:
        with torch.inference_mode():  # stored as an inference tensor; autograd may still use it later
            run(bridge, batch)
        got = torch.autograd.grad(loss(), list(adapters.parameters()), allow_unused=True)
        # one row at a time reuses its own residual; equal to the batched pass
        singles = [tokenize(interleave([p]), tok) for p in pairs]
        with torch.no_grad(), apply_adapters(bridge, adapters, 1.0):
            whole = run(bridge, batch)
            for i, s in enumerate(singles):
                run(bridge, s)
                one = run(bridge, s)
                for r in range(2):
                    row = 2 * i + r
                    n = int(s.attention_mask[r].sum())
                    assert (one[r, -n:] - whole[row, -n:]).abs().max() <= 1e-4
        before = stats.full
        adapters0 = trained_like(bridge, ["blocks.0.mlp.out"])  # a steer below B: the full path, still exact
        with torch.no_grad(), apply_adapters(bridge, adapters0, 1.0):
            low = run(bridge, batch)
        assert stats.full == before + 1
    with torch.no_grad(), apply_adapters(bridge, adapters0, 1.0):
        assert torch.equal(low, run(bridge, batch))
    for w, g in zip(want, got):
        assert (w is None and g is None) or (w - g).abs().max() <= 1e-6
    with pytest.raises(RuntimeError, match="already active"):
        with reuse_prefix(bridge, 1), reuse_prefix(bridge, 1):
            pass
    assert "forward" not in vars(bridge)


def test_first_block():
    assert first_block(["blocks.15.mlp.out", "blocks.3.hook_resid_post", "ln_final.hook_out"]) == 3
    assert first_block(["unembed.hook_in"]) == 0
