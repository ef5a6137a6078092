"""The README's Python example runs as written and prints what the README says it prints."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"


def blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.slow
def test_readme_example_prints_its_documented_output(tmp_path):
    """In a fresh interpreter (what a reader runs; nothing of earlier tests carried over), in a scratch directory
    (the example writes runs/readme-sentiment)."""
    code, want = blocks("python")[0], blocks("text")[0]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=1800)
    assert run.returncode == 0, run.stderr[-2000:]
    printed = [line for line in run.stdout.splitlines() if re.match(r"^[+-]\d ", line)]
    print("\n".join(printed))  # what to paste into the README when the example's output changes on purpose
    assert printed == want.splitlines()  # c = 0 is the base model's own reply; ±1 the trained steer's


def test_readme_results_table_is_the_committed_study_summary():
    """The README's results are not typed in: they are docs/study/REPORT.md's summary table, line for line
    (`interp-steer study --config docs/study/run_config.json --report-only` rewrites it from the cells)."""
    report = (ROOT / "docs" / "study" / "REPORT.md").read_text()
    table = [ln for ln in report.split("## Summary", 1)[1].split("\n\n")[2].splitlines() if ln.startswith("|")]
    readme = README.read_text()
    assert len(table) >= 3 and "\n".join(table) in readme
