"""Shared fixtures: a tiny random model (seconds) and the real default model (``slow``, loaded once)."""

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from jaxtyping import install_import_hook

# Runtime shape checking of the jaxtyping annotations for the whole test run (STYLE.md §3). Not on modules whose
# functions or dataclasses validate Literal options themselves: beartype would reject a bad value before the
# clear ValueError that users get (and the tests check) could be raised.
# (adapter, directions, loss, train take Literal options too: their ValueErrors are tested, so they stay out.)
_CHECKED = ("interp_steer.capture", "interp_steer.evaluate", "interp_steer.sweep")
with install_import_hook(_CHECKED, "beartype.beartype"):
    import interp_steer.capture  # noqa: F401
    import interp_steer.evaluate  # noqa: F401
    import interp_steer.sweep  # noqa: F401

from interp_steer.models import load_model, tiny_model


@pytest.fixture(scope="session")
def _tiny_cached():
    return tiny_model(seed=0)


@pytest.fixture
def tiny(_tiny_cached):
    """A fresh deep copy of the tiny model per test, so a test cannot leak hooks or weights into another."""
    torch.manual_seed(0)
    bridge, tok = _tiny_cached
    return copy.deepcopy(bridge), tok


@pytest.fixture(scope="session")
def real():
    """The packaged SmolLM2-135M-Instruct, loaded once per test run."""
    return load_model()
