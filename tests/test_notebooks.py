"""The notebooks are stored with their outputs (a reader sees the numbers and figures without running them), each
opens with what it shows, and the test run executes them without writing them back."""

import json
import re
from pathlib import Path

ROOT = Path(__file__).parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def text(cell) -> str:
    src = cell["source"]
    return "".join(src) if isinstance(src, list) else src


def test_each_notebook_is_stored_executed_in_order_without_errors_and_opens_with_what_it_shows():
    assert len(NOTEBOOKS) >= 4
    for path in NOTEBOOKS:
        nb = json.loads(path.read_text())
        first = nb["cells"][0]
        assert first["cell_type"] == "markdown" and re.search(r"^\*\*Shows\*\*[ ,].+?\.(\s|$)", text(first), re.M | re.S), \
            f"{path.name}: open with one sentence of what it shows ('**Shows** ...')"
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        counts = [c["execution_count"] for c in code]
        assert counts == list(range(1, len(code) + 1)), f"{path.name}: store it executed top to bottom (make notebooks)"
        assert not [o for c in code for o in c["outputs"] if o["output_type"] == "error"], path.name
        # setup and training cells may be silent; what they compute is shown by the cells after them
        printed = "".join("".join(o.get("text", "")) for c in code for o in c["outputs"])
        assert code[-1]["outputs"] and re.search(r"\d\.\d", printed), f"{path.name}: store it with its numbers"


def test_the_figures_are_stored():
    for name in ("02_pca_vs_learned", "03_layer_map"):
        nb = json.loads((ROOT / "notebooks" / f"{name}.ipynb").read_text())
        assert any("image/png" in o.get("data", {}) for c in nb["cells"] if c["cell_type"] == "code"
                   for o in c["outputs"]), name


def test_the_test_run_executes_the_notebooks_and_never_writes_them():
    make = (ROOT / "Makefile").read_text()
    line = next(ln for ln in make.splitlines() if "--nbmake" in ln)
    assert "notebooks" in line and "--overwrite" not in line
