"""Shared fixtures: a tiny random model (seconds) and the real default model (``slow``, loaded once)."""

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from jaxtyping import install_import_hook

# Runtime checking of every annotation (jaxtyping shapes with one dimension vocabulary, and plain types) over the
# whole package and analysis/, for the whole test run (STYLE.md §3). It must be installed before anything imports
# them. Classes that validate their own options with clearer messages opt out with `@no_type_check`.
CHECKED = ("interp_steer", "analysis")
install_import_hook(CHECKED, "beartype.beartype")

from interp_steer.models import load_model, tiny_model  # noqa: E402


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
