"""Shared fixtures: a tiny random model (seconds) and the real default model (``slow``, loaded once)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from jaxtyping import install_import_hook

# Runtime checking of every annotation (jaxtyping shapes with one dimension vocabulary, and plain types) over the
# whole package and analysis/, for the whole test run (runtime type checks). It must be installed before anything imports
# them. Classes that validate their own options with clearer messages opt out with `@no_type_check`.
CHECKED = ("interp_steer", "analysis")
install_import_hook(CHECKED, "beartype.beartype")

from interp_steer.models import load_model, tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def _tiny_cached():
    return tiny_model(seed=0)


@pytest.fixture(scope="session")
def _tiny_state(_tiny_cached):
    return {k: v.clone() for k, v in _tiny_cached[0].state_dict().items()}


def _hooked_points(bridge) -> list[str]:
    return sorted({name for name, h in bridge.hook_dict.items() if h.fwd_hooks or h.bwd_hooks})


@pytest.fixture
def tiny(_tiny_cached, _tiny_state):
    """The tiny model, shared; after each test its weights are put back and no hook may be left on it.

    (Cheaper than a deep copy per test, 0.17 s each, and stricter: a leaked hook fails the test that leaked it.)
    """
    torch.manual_seed(0)
    bridge, tok = _tiny_cached
    yield bridge, tok
    leaked = _hooked_points(bridge)
    for name in leaked:
        bridge.hook_dict[name].remove_hooks(including_permanent=True)
    state = bridge.state_dict()
    if any(not torch.equal(state[k], v) for k, v in _tiny_state.items()):
        bridge.load_state_dict(_tiny_state)
    assert not leaked, f"the test left hooks on the model at {leaked}"


@pytest.fixture(scope="session")
def real():
    """The packaged SmolLM2-135M-Instruct, loaded once per test run."""
    return load_model()


def _logits_at_c(bridge, adapters, batch, coeffs=(0.0, 1.0)) -> list[torch.Tensor]:
    """Float logits of ``batch`` without the adapters, then with them at each coefficient (no grad)."""
    def run():
        return bridge(batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids).float()

    from interp_steer.adapter import apply_adapters

    with torch.no_grad():
        out = [run()]
        for c in coeffs:
            with apply_adapters(bridge, adapters, c):
                out.append(run())
    return out


@pytest.fixture
def logits_at_c():
    """``logits_at_c(bridge, adapters, batch)`` -> [base, at c = 0, at c = 1] logits: the c = 0 identity check's
    three passes, shared by every model family and dtype."""
    return _logits_at_c
