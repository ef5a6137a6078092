"""Shared fixtures: a tiny random model (seconds) and the real default model (``slow``, loaded once)."""

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

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
