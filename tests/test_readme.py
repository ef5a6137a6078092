"""The README's Python example runs as written and prints what the README says it prints."""

import contextlib
import io
import re
from pathlib import Path

import pytest

README = Path(__file__).parents[1] / "README.md"


def blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.slow
def test_readme_example_prints_its_documented_output(tmp_path, monkeypatch):
    code = blocks("python")[0]
    want = blocks("text")[0]
    monkeypatch.chdir(tmp_path)  # the example writes runs/readme-sentiment
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(README), "exec"), {})  # noqa: S102 (the project's own README)
    printed = "".join(line for line in out.getvalue().splitlines(keepends=True) if re.match(r"^[+-]\d ", line))
    print(printed)  # what to paste into the README when the example's output changes on purpose
    assert printed == want
