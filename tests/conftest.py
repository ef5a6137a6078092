"""Shared fixtures: a tiny random model (seconds), the real default model (``slow``, loaded once), and the data
beside the checkout (``shared``: skipped without it, failed under CI)."""

import os
from pathlib import Path

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

from interp_steer.method.models import load_model, tiny_model  # noqa: E402

# --- ../shared: data beside the checkout. CI has it; a clone from the project's public home does not. -------------



# A test that reads it is marked `@pytest.mark.shared("data/NAME", ...)` (the paths it needs, relative to ../shared)



# and takes the `shared_dir` fixture. Without them it skips, with one line naming the missing path; under CI
# (`.ci/run` sets INTERP_STEER_REQUIRE_SHARED=1; CI=true does the same) it fails, so CI never skips it silently.
SHARED_ENV, REQUIRE_ENV = "INTERP_STEER_SHARED", "INTERP_STEER_REQUIRE_SHARED"
SHARED = Path(os.environ.get(SHARED_ENV) or Path(__file__).resolve().parents[2] / "shared")


def shared_required(env=os.environ) -> bool:
    """Whether a missing ../shared fails the tests that read it: INTERP_STEER_REQUIRE_SHARED if set (0/false/no:
    skip), else CI (true/1/yes: fail)."""
    flag = env.get(REQUIRE_ENV, "").strip().lower()
    if flag:
        return flag not in ("0", "false", "no")
    return env.get("CI", "").strip().lower() in ("1", "true", "yes")


def missing_shared(marker, root: Path = SHARED) -> str | None:
    """The first path a `shared` marker names (default: ``data``) that is not under ``root``, as a message."""
    for rel in marker.args or ("data",):
        if not (root / rel).exists():
            return (f"{root / rel} is missing: this test reads ../shared beside the checkout ({SHARED_ENV}=DIR "
                    "points elsewhere)")
    return None


@pytest.hookimpl(tryfirst=True)  # before any fixture (the real model) is set up
def pytest_runtest_setup(item):
    marker = item.get_closest_marker("shared")
    why = missing_shared(marker) if marker is not None else None
    if why is None:
        return
    if shared_required():
        pytest.fail(f"{why}; {REQUIRE_ENV} or CI requires it", pytrace=False)
    pytest.skip(why)


@pytest.fixture
def shared_dir(request) -> Path:
    """The ../shared directory (``$INTERP_STEER_SHARED`` if set), for a test marked ``@pytest.mark.shared(...)``."""
    if request.node.get_closest_marker("shared") is None:
        pytest.fail('a test reading ../shared must be marked @pytest.mark.shared("data/NAME"): `make test-fast` '
                    "deselects those, and a missing ../shared skips them", pytrace=False)
    return SHARED


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
        return bridge(batch.input_ids, attention_mask=batch.attention_mask,
                      position_ids=batch.position_ids).float()

    from interp_steer.method.adapter import apply_adapters

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
