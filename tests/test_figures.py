"""Figures tell today's results: each one the README or a document shows records the SHA-256 of the results it was
drawn from (``plots.save``), and those files still hold exactly that; a figure drawn from no committed file is
named here with the command that draws it. Git keeps no mtimes, so only content is compared."""

import hashlib
import re
from pathlib import Path

import pytest

from analysis.figures import FIGURES
from interp_steer.comparison import plots

ROOT = Path(__file__).resolve().parents[1]
# what the project shows: the README, the documents, and each committed study's report (a cell's own REPORT.md
# links figures that stay on the machine that made them, .gitignore)
DOCUMENTS = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")),
             *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*/REPORT.md"))]
# figures drawn from no committed file, and the command that draws each (PNG and SVG alike)
COMMANDS = {
    "figures/loss_geometry": "python -m analysis.figures loss_geometry",  # a diagram: no numbers
    # drawn 2026-11-22 from runs/analysis/summary.json (not committed) with the objective docs/method.md names
    "figures/dhs_spectra": "python -m analysis.figures dhs_spectra --objective separation --threads 1",
    "figures/layer_map": "python -m analysis.figures layer_map --objective separation --threads 1",
    "figures/pca_vs_learned": "python -m analysis.figures pca_vs_learned --objective separation --threads 1",
}
LINK = re.compile(r"\]\(([^)\s]+\.(?:png|svg))\)")


def shown() -> dict[Path, str]:
    """Every figure a document links to, with the first document linking it."""
    out: dict[Path, str] = {}
    for doc in DOCUMENTS:
        for ref in LINK.findall((ROOT / doc).read_text()):
            out.setdefault(((ROOT / doc).parent / ref).resolve(), doc)
    return out


def _key(path: Path) -> str:
    return path.relative_to(ROOT).with_suffix("").as_posix()


def test_a_saved_figure_records_its_sources_and_knows_when_they_change(tmp_path):
    results = tmp_path / "study" / "results.json"
    results.parent.mkdir()
    results.write_text('{"groups": []}')
    fig, ax = plots.figure()
    ax.plot([0, 1], [0, 1])
    paths = plots.save(fig, tmp_path / "study" / "figures", "f", sources=[results])
    digest = hashlib.sha256(results.read_bytes()).hexdigest()
    for p in paths:
        assert plots.figure_sources(p) == [(results, digest)] and plots.stale_sources(p) == []
    results.write_text('{"groups": [1]}')
    assert all(plots.stale_sources(p) == [f"{results} (changed since the figure was drawn)"] for p in paths)
    results.unlink()
    assert plots.stale_sources(paths[0]) == [f"{results} (missing)"]
    fig, ax = plots.figure()
    assert plots.figure_sources(plots.save(fig, tmp_path, "diagram")[0]) == []  # drawn from no file
    with pytest.raises(ValueError, match="reads .png and .svg"):
        plots.figure_sources(results)


def test_every_figure_shown_exists_and_is_drawn_from_the_current_results_or_by_a_named_command():
    figures = shown()
    assert any(_key(p) == "docs/study/figures/dose_kl--smollm2-135m--sentiment" for p in figures)
    for path, doc in figures.items():
        assert path.is_file(), f"{doc} shows {path}, which does not exist"
        sources = plots.figure_sources(path)
        if not sources:
            assert _key(path) in COMMANDS, (
                f"{doc} shows {path.relative_to(ROOT)}, which records no results file (plots.save's `sources`) "
                "and is not in tests/test_figures.py's COMMANDS: redraw it with the command that makes it")
            continue
        stale = plots.stale_sources(path)
        assert not stale, (f"{doc} shows {path.relative_to(ROOT)}, older than its results: {stale}. Redraw it "
                           "(a study's: `interp-steer study --config STUDY/run_config.json --report-only`)")


def test_every_tracked_figure_is_shown_and_accounted_for():
    """figures/ holds only figures a document shows (nothing left from an abandoned protocol), and COMMANDS
    names only figures that exist, by commands that exist."""
    figures = {_key(p) for p in shown()}
    for path in sorted((ROOT / "figures").iterdir()):
        if path.suffix in (".png", ".svg"):
            assert _key(path) in figures, f"{path.relative_to(ROOT)} is shown by no document: remove it"
            assert plots.figure_sources(path) or _key(path) in COMMANDS, f"{path} has no provenance"
    for key, command in COMMANDS.items():
        assert (ROOT / f"{key}.png").is_file() or (ROOT / f"{key}.svg").is_file(), key
        name = command.split()[3]
        assert name in FIGURES and key.endswith(name), command
