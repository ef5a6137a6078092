"""Tests that read ../shared (the `shared` marker, tests/conftest.py): on a clone with nothing beside it they skip
with one line naming what is missing; under CI (`INTERP_STEER_REQUIRE_SHARED=1`, or `CI=true`) they fail."""

import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import REQUIRE_ENV, SHARED_ENV, shared_required  # tests/ is on sys.path (pytest's rootdir conftest)

ROOT = Path(__file__).resolve().parents[1]


def test_ci_variables_decide_whether_a_missing_shared_fails():
    assert not shared_required({})
    assert shared_required({"CI": "true"}) and shared_required({"CI": "1"})
    assert not shared_required({"CI": "false"})
    assert shared_required({REQUIRE_ENV: "1"}) and shared_required({REQUIRE_ENV: "yes", "CI": "false"})
    assert not shared_required({REQUIRE_ENV: "0", "CI": "true"})  # the explicit variable wins


def _run_shared_tests(tmp: Path, shared: Path, **env: str) -> subprocess.CompletedProcess:
    """``pytest -m shared`` over the test files that use the marker (collecting only those keeps it cheap)."""
    files = sorted(p.name for p in (ROOT / "tests").glob("test_*.py")
                   if p.name != Path(__file__).name and "pytest.mark.shared" in p.read_text())
    base = {k: v for k, v in os.environ.items() if k not in ("CI", REQUIRE_ENV, "PYTEST_ADDOPTS")}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", f"--basetemp={tmp / 'pytest'}",
         "-m", "shared", *(f"tests/{f}" for f in files)],
        cwd=ROOT, env={**base, SHARED_ENV: str(shared), "OMP_NUM_THREADS": "1", **env},
        capture_output=True, text=True, timeout=600)


def _count(out: str, word: str) -> int:
    m = re.search(rf"(\d+) {word}", out.strip().splitlines()[-1])
    return int(m.group(1)) if m else 0


def test_every_shared_test_skips_without_shared_and_fails_under_ci(tmp_path):
    missing = tmp_path / "no-shared-here"
    skipped = _run_shared_tests(tmp_path / "skip", missing)
    out = skipped.stdout + skipped.stderr
    n = _count(out, "skipped")
    assert skipped.returncode == 0 and n >= 2 and _count(out, "passed") == 0, out[-3000:]
    reasons = [line for line in out.splitlines() if line.startswith("SKIPPED")]
    assert reasons and all(f"{missing}/data" in line and "is missing" in line for line in reasons), out[-3000:]

    failed = _run_shared_tests(tmp_path / "fail", missing, CI="true")
    out = failed.stdout + failed.stderr
    assert failed.returncode == 1 and _count(out, "errors?") == n and _count(out, "skipped") == 0, out[-3000:]
    assert f"{missing}/data" in out and f"{REQUIRE_ENV} or CI requires it" in out
