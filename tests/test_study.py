"""``interp-steer study`` on the tiny model: cells written whole, resumed, sharded; the pooled report; refusals."""

import json

import pytest

from interp_steer.app import cli, study
from interp_steer.comparison.plots import figure_sources, stale_sources
from interp_steer.config import ConfigError, StudyRun
from interp_steer.storage.ownership import MANIFEST

SMALL = ["--layers", "0,1", "--loss-layer", "2", "--rank", "4", "--steps", "1", "--batch-pairs", "2", "--n-pairs",
         "8", "--kl-texts", "2", "--kl-batch", "2", "--methods", "adapter,mean_diff,random,prompting", "--n-items",
         "2", "--n-neutral", "2", "--n-secondary", "0", "--bisect", "0", "--grid", "0.5", "--budget-metric",
         "dnll", "--budget", "0.05"]


@pytest.fixture
def loads(tiny, monkeypatch):
    calls = []
    monkeypatch.setattr(study, "load_model", lambda name=None, device="auto",
                        dtype=None: calls.append(name) or tiny)
    trained = []
    real = study.concept_report
    monkeypatch.setattr(study, "concept_report", lambda *a, **k: trained.append(a[2].name) or real(*a, **k))
    return calls, trained


def snapshot(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_study_runs_every_cell_once_then_resumes_and_pools(loads, tmp_path, capsys):
    calls, trained = loads
    out = tmp_path / "s"
    argv = ["study", "--out", str(out), "--models", "smollm2-135m", "--concepts", "honesty,sentiment",
            "--seeds", "0,1", *SMALL]
    assert cli.main(argv) == 0
    ids = [f"smollm2-135m--{c}--s{s}" for c in ("honesty", "sentiment") for s in (0, 1)]
    assert calls == ["smollm2-135m"] and trained == ["honesty", "honesty", "sentiment", "sentiment"]
    assert sorted(p.name for p in (out / "cells").iterdir() if not p.name.startswith(".")) == sorted(ids)
    assert {p.name for p in out.iterdir()} == {"cells", "figures", "REPORT.md", "results.json", "run_config.json",
                                               MANIFEST}
    cell = json.loads((out / "cells" / ids[0] / "cell.json").read_text())
    assert cell["cell"] == {"model": "smollm2-135m", "concept": "honesty", "seed": 0, "id": ids[0]}
    held = cell["train"]["runs"]["adapter"]["held_out"]
    cell_md = (out / "cells" / ids[0] / "REPORT.md").read_text()
    assert held and all(f"| adapter | {c} | {m['proj_chosen']:.2f} |" in cell_md for c, m in held.items())
    assert set(cell["iso_table"]) == {"adapter", "mean_diff", "random", "prompting"}
    assert "ends" in cell["iso_table"]["adapter"] and "peak" in cell["iso_table"]["adapter"]["plus"]
    assert all(p["delta"]["honesty"][0] == 0.0 for p in cell["curves"]["adapter"] if p["coeff"] == 0)
    results = json.loads((out / "results.json").read_text())
    assert results["missing"] == [] and sorted(results["cells"]) == sorted(ids)
    groups = {(g["model"], g["concept"]): g for g in results["groups"]}
    honesty, sentiment = groups[("smollm2-135m", "honesty")], groups[("smollm2-135m", "sentiment")]
    assert honesty["seeds"] == sentiment["seeds"] == [0, 1]
    row = next(r for r in sentiment["rows"] if r["method"] == "adapter" and r["side"] == "plus")
    d = row["effects"]["logodds"]  # (the tiny model's Yes/No mass is too low for honesty's items: NaN there)
    per = [json.loads((out / "cells" / i / "cell.json").read_text())["iso_table"]["adapter"]["plus"]["effects"]
           ["logodds"]["delta_paired"] for i in ids[2:]]
    assert d["n_seeds"] == 2 and d["per_seed"] == pytest.approx(per) and d["mean"] == pytest.approx(sum(per) / 2)
    assert d["ci_kind"] == "t over seeds" and d["ci95"][0] <= d["mean"] <= d["ci95"][1]
    assert "steering_f1" in next(r for r in honesty["rows"] if r["method"] == "adapter" and r["side"] == "plus")
    assert "steering_f1" not in row  # sentiment has no ends metric
    against = {(c["side"], c["against"]) for c in sentiment["comparisons"] if c["effect"] == "logodds"}
    assert {("plus", "prompting"), ("plus", "random"), ("plus", "mean_diff"), ("minus", "prompting")} <= against
    vs_prompt = next(c for c in sentiment["comparisons"] if (c["side"], c["against"]) == ("plus", "prompting"))
    assert vs_prompt["n_seeds"] == 2 and vs_prompt["ci_kind"] == "t over seeds"
    md = (out / "REPORT.md").read_text()
    assert "### smollm2-135m · honesty (seeds 0, 1)" in md and "| adapter | + |" in md and "Steering F1" in md
    summary = [ln for ln in md.split("## Summary", 1)[1].splitlines() if ln.startswith("| smollm2-135m · ")]
    up = next(r for r in sentiment["rows"] if r["method"] == "adapter" and r["side"] == "plus")
    assert len(summary) == 2 and f"| {up['effects']['logodds']['mean']:+.2f}" in summary[1]
    assert "](figures/dose_kl--smollm2-135m--honesty.png)" in md and "interp-steer study --config" in md
    # every trained run's steps and held-out curve (1 step, measured every 8: none measured)
    assert f"| {ids[0]} | adapter | 1 / 1 | no | not measured |" in md.split("## Training", 1)[1]
    assert (out / "figures" / "at_budget--smollm2-135m--sentiment.svg").is_file()
    # each figure records results.json and its group's cells, as they are: none is stale
    cells_of = sorted(out / "cells" / i / "cell.json" for i in ids if "sentiment" in i)
    srcs = figure_sources(out / "figures" / "at_budget--smollm2-135m--sentiment.png")
    assert [p for p, _ in srcs] == [out / "results.json", *cells_of]
    assert all(stale_sources(p) == [] for p in (out / "figures").glob("*.*g"))

    before = snapshot(out / "cells")
    calls.clear(), trained.clear()
    assert cli.main(argv) == 0  # everything finished: no model loaded, no cell touched
    assert calls == [] and trained == [] and snapshot(out / "cells") == before
    assert "4 already finished, 0 to run" in capsys.readouterr().out

    grown = ["study", "--out", str(out), "--models", "smollm2-135m", "--concepts", "honesty,sentiment",
             "--seeds", "0,1,2", *SMALL]
    assert cli.main(grown) == 0  # a seed more: only its cells run
    assert trained == ["honesty",
                       "sentiment"] and {k: v for k, v in snapshot(out / "cells").items() if k in before} == before


def test_a_killed_cell_leaves_no_cell_and_the_study_resumes_there(loads, tmp_path, monkeypatch):
    calls, trained = loads
    out = tmp_path / "s"
    argv = ["study", "--out", str(out), "--models", "smollm2-135m", "--concepts", "honesty", "--seeds", "0,1",
            *SMALL]
    real = study.write_outputs

    def dies_in_second_cell(report, where):
        if len(trained) == 2:
            raise KeyboardInterrupt
        return real(report, where)
    monkeypatch.setattr(study, "write_outputs", dies_in_second_cell)
    assert cli.main(argv) == 130
    cells = {p.name for p in (out / "cells").iterdir()}
    assert cells == {"smollm2-135m--honesty--s0"}  # the interrupted cell's temporary directory is gone too
    monkeypatch.setattr(study, "write_outputs", real)
    trained.clear()
    assert cli.main(argv) == 0 and trained == ["honesty"]
    assert json.loads((out / "results.json").read_text())["missing"] == []


def test_shards_split_the_cells_and_any_shard_reports_what_is_finished(loads, tmp_path):
    calls, trained = loads
    out = tmp_path / "s"
    base = ["study", "--out", str(out), "--models", "smollm2-135m", "--concepts", "honesty,sentiment", "--seeds",
            "0", *SMALL]
    assert cli.main([*base, "--shard", "1/2"]) == 0 and trained == ["sentiment"]
    assert json.loads((out / "results.json").read_text())["missing"] == ["smollm2-135m--honesty--s0"]
    assert "1 missing: smollm2-135m--honesty--s0" in (out / "REPORT.md").read_text()
    assert cli.main([*base, "--shard", "0/2"]) == 0 and trained == ["sentiment", "honesty"]
    assert json.loads((out / "results.json").read_text())["missing"] == []
    assert study.shard(StudyRun(shard="2/3")) == (2, 3)
    for bad in ("2/2", "x", "1/0", "-1/2"):
        with pytest.raises(ConfigError, match="shard must be I/N"):
            StudyRun(shard=bad)


def test_other_settings_a_foreign_directory_or_a_changed_file_are_refused(loads, tmp_path, capsys):
    calls, trained = loads
    out = tmp_path / "s"
    base = ["study", "--out", str(out), "--models", "smollm2-135m", "--concepts", "sentiment", "--seeds", "0"]
    assert cli.main([*base, *SMALL]) == 0
    assert cli.main([*base, *SMALL[:-2], "--budget", "0.07"]) == 2  # other cell settings: not mixed in
    assert "other settings (sweep.budget: 0.05 then, 0.07 now)" in capsys.readouterr().err
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    assert cli.main(["study", "--out", str(theirs), "--models", "smollm2-135m", *SMALL]) == 2
    assert "is not a study interp-steer wrote" in capsys.readouterr().err
    assert snapshot(theirs) == {"notes.txt": b"mine"}
    (out / "REPORT.md").write_text("my edits")  # a file the study wrote, changed by its user
    assert cli.main([*base, *SMALL]) == 2 and (out / "REPORT.md").read_text() == "my edits"
    foreign = out / "cells" / "smollm2-135m--sentiment--s1"
    foreign.mkdir()
    (foreign / "x.txt").write_text("mine")
    (out / "REPORT.md").unlink()
    assert cli.main([*base[:-1], "0,1", *SMALL]) == 2 and (foreign / "x.txt").read_text() == "mine"
    assert trained == ["sentiment"]


@pytest.mark.parametrize("eval_every,patience,says", [
    (0, 0, "ran its full 16 steps of 8 pairs; no held-out curve was measured during training (eval_every 0)"),
    (8, 0, "every 8 steps and ran its full 16 steps of 8 pairs (patience 0: no early stopping)"),
    (8, 3, "every 8 steps and stops once 3 measurements in a row have not raised it by 0.01 (at most 16 steps")])
def test_the_training_section_says_how_the_runs_were_stopped(eval_every, patience, says):
    cfg = StudyRun(powered=False)
    cfg = cfg.replace(train=cfg.train.replace(steps=16, batch_pairs=8, eval_every=eval_every, patience=patience))
    assert says in study.training_protocol(cfg)
