"""The command line parses into the configs' dataclasses, from their annotations; bad input is refused with one
clear line and exit status 2 before any model is loaded (CONTRIBUTING.md, "Rejected inputs")."""

import json

import pytest

from interp_steer.app import cli, commands
from interp_steer.config import DemoRun, EvalRun, LossConfig, SweepConfig, TrainConfig, TrainRun
from interp_steer.storage.io import SteeringArtifact
from interp_steer.storage.ownership import MANIFEST


def parse(command, *argv):
    args = cli.build_parser().parse_args([command, *argv])
    return cli.config_from_args(command, args)


def test_every_field_is_an_option_and_defaults_match():
    assert parse("train") == TrainRun()
    assert parse("demo") == DemoRun()
    assert parse("eval", "runs/x") == EvalRun(artifact="runs/x")
    cfg = parse("train", "--steps", "7", "--layers", "3,0.5", "--objective", "shift", "--rotate-u",
                "--n-pairs", "none", "--lr", "0.001", "--margin", "0.2", "--personas", "a happy,a sad")
    assert cfg == TrainRun(personas=("a happy", "a sad"), train=TrainConfig(
        steps=7, layers=(3, 0.5), loss=LossConfig(objective="shift", margin=0.2), rotate_u=True, lr=0.001))
    assert isinstance(cfg.train.layers[0], int) and isinstance(cfg.train.layers[1], float)
    assert parse("eval", "a", "--methods", "adapter,random", "--budget", "0.2").sweep == SweepConfig(
        methods=("adapter", "random"), budget=0.2)


def test_saved_run_config_runs_again_and_flags_override_it(tmp_path):
    cfg = parse("demo", "--steps", "3", "--methods", "adapter,pca_diff", "--out", str(tmp_path / "d"))
    f = tmp_path / "run_config.json"
    f.write_text(json.dumps({"command": "demo", "config": cfg.to_dict()}))
    assert parse("demo", "--config", str(f)) == cfg
    assert parse("demo", "--config", str(f), "--steps", "5").train.steps == 5
    assert parse("demo", "--config", str(f), "--steps", "5").sweep.methods == ("adapter", "pca_diff")


@pytest.fixture
def no_model(monkeypatch):
    """Every rejected input must be caught before a model is loaded."""
    def refuse(*a, **kw):
        raise AssertionError("a model was loaded for a bad input")
    monkeypatch.setattr(commands, "load_model", refuse)


BAD_OPTIONS = [  # (argv, what the message must name)
    (["train", "--n-pairs", "1.5"], "expected an integer"),
    (["train", "--steps", "2.5"], "expected an integer"),
    (["train", "--seed", "0.5"], "expected an integer"),
    (["train", "--seed", "-1"], "seed must be >= 0"),
    (["train", "--held-out", "1"], "held_out must be in [0, 1)"),
    (["train", "--grad-clip", "-1"], "grad_clip must be > 0"),
    (["train", "--n-pairs", "-2"], "n_pairs must be >= 2"),
    (["train", "--lr", "nan"], "expected a finite number"),
    (["train", "--w-coherence", "inf"], "expected a finite number"),
    (["train", "--margin", "-0.1"], "margin must be >= 0"),
    (["train", "--init-scale", "0"], "init_scale must be > 0"),
    (["train", "--eval-coeffs", "1,nan"], "expected a finite number"),
    (["train", "--seed", str(2 ** 64)], "seed must be below 2**63"),
    (["train", "--eval-coeffs=-1e30,1e30"], "eval_coeffs must lie in [-1000, 1000]"),
    (["train", "--balance", "--objective", "separation"], "balance applies to objective 'shift'"),
    (["train", "--w-text-shift", "1", "--kl-budget", "none"], "w_text_shift reads the KL constraint's generic text"),
    (["train", "--w-text-shift", "-1"], "w_text_shift must be >= 0"),
    (["train", "--layers", "none"], "expected"),
    (["train", "--device", "tpu"], "expected one of auto, cpu, cuda, mps"),
    (["eval", "a", "--dtype", "fp8"], "expected one of float32, bfloat16, float16"),
    (["demo", "--dtype", "float64"], "expected one of float32, bfloat16, float16"),
    (["train", "--layers", "1.5"], "depth fraction in (0, 1)"),
    (["train", "--layers", ""], "comma-separated list"),
    (["train", "--objective", "magnitude"], "expected one of shift, separation"),
    (["train", "--site", "mlp.down"], "expected one of mlp.out"),
    (["train", "--rank", "0"], "rank must be >= 1"),
    (["train", "--personas", "a happy"], "personas must be two different"),
    (["train", "--personas", "a,a"], "personas must be two different"),
    (["train", "--pairs", "/no/such/pairs.json"], "is not a file"),
    (["demo", "--budget", "0"], "budget must be > 0"),
    (["demo", "--budget", "inf"], "expected a finite number"),
    (["demo", "--n-items", "0"], "n_items must be >= 1"),
    (["demo", "--n-neutral", "0"], "n_neutral must be >= 1"),
    (["demo", "--n-secondary", "-1"], "n_secondary must be >= 0"),
    (["demo", "--budget-metric", "nll"], "expected one of kl, dnll"),
    (["demo", "--grid", "0.5,-1"], "grid fractions must be > 0"),
    (["demo", "--concepts", "sentiment,nope"], "unknown concept 'nope'"),
    (["demo", "--seeds", "0,0"], "seeds must be distinct"),
    (["demo", "--concepts", "honesty,honesty"], "concepts must be distinct"),
    (["train", "--concept", "nope"], "unknown concept 'nope'"),
    (["demo", "--methods", "adapter,nope"], "expected one of adapter"),
    (["demo", "--methods", "adapter,adapter"], "methods must be distinct"),
    (["eval"], "give the artifact directory"),
    (["eval", "/nonexistent/adapter"], "not an artifact directory"),
]


@pytest.mark.parametrize("argv, message", BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS])
def test_bad_options_exit_2_with_one_clear_line(no_model, capsys, argv, message):
    with pytest.raises(SystemExit) as e:  # argparse's own exit for type errors; main() returns 2 for the rest
        raise SystemExit(cli.main(argv))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def run_main(argv, capsys):
    code = cli.main(argv)
    return code, capsys.readouterr().err


BAD_CONFIG_FILES = {  # --config files for `demo`: content -> what the message must say
    "{nope": "cannot read config",
    "[" * 100000 + "]" * 100000: "cannot read config",
    json.dumps({"command": "demo"}): "expected",
    json.dumps({"command": "train", "config": {}}): "is a config for `train`, not `demo`",
    json.dumps({"command": "demo", "config": {"stepz": 1}}): "unknown DemoRun keys",
    json.dumps({"command": "demo", "config": {"train": 3}}): "train must be a JSON object of TrainConfig fields",
    json.dumps({"command": "demo", "config": {"train": {"steps": 2.5}}}): "steps must be an integer",
}


def test_bad_files_exit_2_naming_the_file(no_model, tmp_path, capsys):
    (tmp_path / "model.bin").write_text("x")
    code, err = run_main(["train", "--model", str(tmp_path / "model.bin")], capsys)
    assert code == 2 and "model.bin" in err and "is a file" in err
    for i, (text, message) in enumerate(BAD_CONFIG_FILES.items()):
        f = tmp_path / f"config{i}.json"
        f.write_text(text)
        code, err = run_main(["demo", "--config", str(f)], capsys)
        assert code == 2 and message in err and "Traceback" not in err, (text[:40], err)
    code, err = run_main(["demo", "--config", str(tmp_path / "missing.json")], capsys)
    assert code == 2 and "missing.json" in err


def test_unwritable_or_foreign_output_is_found_before_the_model(no_model, tmp_path, capsys):
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "thesis.tex").write_text("precious")
    code, err = run_main(["train", "--out", str(thesis)], capsys)
    assert code == 2 and "did not write" in err
    code, err = run_main(["train", "--out", str(thesis), "--overwrite"], capsys)
    assert code == 2 and "did not write" in err
    for extra in ([], ["--overwrite"]):
        code, err = run_main(["demo", "--out", str(thesis), *extra], capsys)
        assert code == 2 and "did not write" in err
    assert [p.name for p in thesis.iterdir()] == ["thesis.tex"] and (thesis / "thesis.tex").read_text() == "precious"
    (tmp_path / "a-file").write_text("x")
    code, err = run_main(["train", "--out", str(tmp_path / "a-file" / "sub" / "a")], capsys)
    assert code == 2 and "cannot write" in err  # its parent cannot be created: found before training
    code, err = run_main(["demo", "--out", str(tmp_path / "a-file")], capsys)
    assert code == 2 and "not a directory" in err


def test_pairs_file_is_validated(tiny, tmp_path):
    _, tok = tiny
    f = tmp_path / "pairs.json"
    f.write_text(json.dumps([{"chosen": "I love cheese", "rejected": "I hate cheese"},
                             {"chosen": "I love bread", "rejected": "I hate bread"}]))
    assert len(commands.load_pairs(tok, str(f))) == 2
    for bad, message in [([{"good": "x"}], "entry 0"), ([{"chosen": 1, "rejected": "x"}], "entry 0"),
                         ([{"chosen": ["x"], "rejected": "x"}], "entry 0"), ({"chosen": "x"}, "non-empty JSON list"),
                         ([], "non-empty JSON list")]:
        f.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=message):
            commands.load_pairs(tok, str(f))
    f.write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(ValueError, match="not a readable JSON"):
        commands.load_pairs(tok, str(f))
    f.write_text(json.dumps([{"chosen": "I love cheese", "rejected": "You really do hate every kind of cheese"},
                             {"chosen": "I love bread", "rejected": "I hate bread"}]))
    with pytest.raises(ValueError, match="differs by"):
        commands.load_pairs(tok, str(f))


def test_train_then_eval_end_to_end_through_the_commands(tiny, tmp_path, monkeypatch, capsys):
    """The command path on the tiny model: train writes a whole artifact with its run config, eval rebuilds the
    training pairs from what the artifact records and writes its report, figures and run config; nothing else."""
    loads = []

    def load(name=None, device="auto", dtype=None):
        loads.append((name, device, dtype))
        return tiny
    monkeypatch.setattr(commands, "load_model", load)
    art = tmp_path / "a"
    assert cli.main(["train", "--out", str(art), "--layers", "0,1", "--loss-layer", "2", "--rank", "4",
                     "--steps", "2", "--batch-pairs", "2", "--n-pairs", "8", "--concept", "sentiment",
                     "--kl-budget", "none", "--device", "cpu"]) == 0
    assert loads == [(None, "cpu", "float32")]  # --device reaches the loader; --dtype's default is float32
    assert sorted(p.name for p in art.iterdir()) == [MANIFEST, "adapter.safetensors", "config.json",
                                                     "run_config.json"]
    saved = json.loads((art / "run_config.json").read_text())
    assert parse("train", "--config", str(art / "run_config.json")) == TrainRun.from_dict(saved["config"])
    assert cli.main(["eval", str(art), "--methods", "adapter,mean_diff", "--n-items", "2", "--n-neutral", "2",
                     "--n-secondary", "0", "--bisect", "0", "--grid", "0.5", "--budget-metric", "dnll"]) == 0
    out = tmp_path / "a-eval"
    assert {"report.json", "REPORT.md", "run_config.json", "figures", MANIFEST} == {p.name for p in out.iterdir()}
    report = json.loads((out / "report.json").read_text())
    assert set(report["iso_table"]) == {"adapter", "mean_diff"}
    blocks = sorted({int(a.site.split(".")[1]) for a in SteeringArtifact.load(art).adapters})
    # the baseline acts at the adapter's blocks
    assert report["blocks"] == {"adapter": blocks, "mean_diff": blocks}
    assert report["concept"] == "sentiment"  # recorded by train (--personas given: the concept's name still is)
    assert report["effects"] == [{"name": "logodds", "unit": "nat/token"}]
    assert cli.main(["eval", str(art), "--methods", "adapter", "--n-items", "2", "--n-neutral", "2"]) == 2
    assert "--overwrite" in capsys.readouterr().err  # a second eval does not write over the first unasked
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "a-eval"]


def test_demo_end_to_end_two_concepts_two_seeds(tiny, tmp_path, monkeypatch):
    """One model load; per concept one artifact per seed, a report whose adapter rows are per seed plus their
    mean row; an index REPORT.md over both concepts; nothing else written."""
    loads = []
    monkeypatch.setattr(commands, "load_model", lambda name=None, device="auto",
                        dtype=None: loads.append(1) or tiny)
    texts = []  # the KL constraint's text: made once for both concepts and both seeds
    real_kl_text = commands.kl_text
    monkeypatch.setattr(commands, "kl_text", lambda *a, **k: texts.append(1) or real_kl_text(*a, **k))
    out = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out), "--concepts", "honesty,sentiment", "--seeds", "0,1",
                     "--layers", "0,1", "--loss-layer", "2", "--rank", "4", "--steps", "1", "--batch-pairs", "2",
                     "--n-pairs", "8", "--kl-texts", "2", "--kl-batch", "2", "--methods", "adapter,mean_diff",
                     "--n-items", "2", "--n-neutral", "2", "--n-secondary", "0", "--bisect", "0", "--grid", "0.5",
                     "--budget-metric", "dnll"]) == 0
    assert loads == [1] and texts == [1]
    assert {p.name for p in out.iterdir()} == {"honesty", "sentiment", "REPORT.md", "run_config.json", MANIFEST}
    for concept in ("honesty", "sentiment"):
        d = out / concept
        assert {p.name for p in d.iterdir()} == {"adapter-s0", "adapter-s1", "report.json", "REPORT.md", "figures"}
        a0, a1 = (SteeringArtifact.load(d / f"adapter-s{k}") for k in (0, 1))
        assert (a0.config.seed, a1.config.seed) == (0, 1) and a0.data["concept"] == concept
        report = json.loads((d / "report.json").read_text())
        assert set(report["iso_table"]) == {"adapter@0", "adapter@1", "adapter (2 seeds)", "mean_diff"}
        assert report["concept"] == concept and report["train"]["seeds"] == [0, 1]
        assert report["blocks"]["adapter@0"] == report["blocks"]["adapter@1"] == report["blocks"]["mean_diff"] != []
    index = (out / "REPORT.md").read_text()
    assert "[honesty](honesty/REPORT.md)" in index and "| adapter (2 seeds) | + |" in index


def test_demo_is_quick_by_default_and_powered_is_one_option_away():
    from interp_steer.config import DEMO_SWEEP, DEMO_TRAIN, METHODS, POWERED

    quick = parse("demo")
    assert quick.sweep.methods == ("adapter", "mean_diff", "pca_diff", "random", "prompting")
    assert quick.train.steps == DEMO_TRAIN["steps"] and quick.sweep.grid == DEMO_SWEEP["grid"]
    powered = parse("demo", "--powered", "--n-items", "7")
    assert powered.sweep.methods == METHODS and powered.train.steps == POWERED["train"]["steps"]
    assert powered.sweep.n_items == 7 and powered.sweep.n_neutral == POWERED["sweep"]["n_neutral"]  # options win
    assert DemoRun.from_dict(powered.to_dict()) == powered  # its run_config.json runs it again


def test_function_defaults_agree_with_their_config_fields():
    """One source per default: a public function's (or SweepData's) parameter named like a config field has that
    field's default, or none. Drift here gave a Python user and a CLI user different sweeps."""
    import dataclasses
    import importlib
    import inspect
    import pkgutil

    import interp_steer
    from interp_steer.comparison.sweep import SweepData
    from interp_steer.config import LossConfig

    fields = {}
    for cls in (TrainConfig, LossConfig, SweepConfig):
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                fields.setdefault(f.name, (cls.__name__, f.default))
    renamed = {"bisect_iters": "bisect"}
    # a parameter that shares a field's name but means another field (or another thing: the loss's numeric
    # `scale` is the pair separation scale, TrainConfig.scale the adapter's scaling law)
    means = {("interp_steer.method.loss", "monotonic_hinge", "margin"): "mono_margin"}
    drift = []
    sd = {f.name: f.default for f in dataclasses.fields(SweepData)}
    for name, default in sd.items():
        key = renamed.get(name, name)
        if key in fields and default != fields[key][1]:
            drift.append(f"SweepData.{name}={default!r} vs {fields[key][0]}.{key}={fields[key][1]!r}")
    for mod in pkgutil.walk_packages(interp_steer.__path__, "interp_steer."):
        m = importlib.import_module(mod.name)
        for fname, fn in vars(m).items():
            if not inspect.isfunction(fn) or fn.__module__ != m.__name__ or fname.startswith("_"):
                continue
            for p in inspect.signature(fn).parameters.values():
                key = means.get((m.__name__, fname, p.name), p.name)
                if key not in fields or p.default is inspect.Parameter.empty or p.default is None:
                    continue
                if type(p.default) is not type(fields[key][1]):
                    continue  # same name, another kind of value: another quantity
                if p.default != fields[key][1]:
                    drift.append(f"{m.__name__}.{fname}({p.name}={p.default!r}) vs "
                                 f"{fields[key][0]}.{key}={fields[key][1]!r}")
    assert not drift, "defaults written twice disagree:\n" + "\n".join(drift)


def test_a_diverging_loss_ends_in_one_line_and_exit_2(tiny, tmp_path, monkeypatch, capsys):
    """`--lr 1e30` on the tiny model: the loss goes non-finite; the CLI prints train's message (the last
    checkpoint, the settings to change), no traceback, and writes no artifact."""
    monkeypatch.setattr(commands, "load_model", lambda name=None, device="auto", dtype=None: tiny)
    art = tmp_path / "a"
    code = cli.main(["train", "--out", str(art), "--layers", "0,1", "--loss-layer", "2", "--rank", "4",
                     "--steps", "6", "--batch-pairs", "2", "--n-pairs", "8", "--kl-budget", "none",
                     "--lr", "1e30", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert "training stopped" in err and "lower --lr" in err
    assert not art.exists()
