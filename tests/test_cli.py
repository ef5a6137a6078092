"""The command line parses into the same dataclasses as the Python API."""

import argparse
import json

import pytest

from interp_steer import cli
from interp_steer.train import TrainConfig


def parse(*argv):
    p = argparse.ArgumentParser()
    cli.add_config_options(p)
    return cli.config_from_args(p.parse_args(list(argv)))


def test_every_config_field_is_an_option_and_defaults_match():
    assert parse() == TrainConfig()
    cfg = parse("--steps", "7", "--layers", "3,0.5", "--objective", "separation", "--rotate-u", "true",
                "--n-pairs", "none", "--lr", "0.001")
    assert cfg == TrainConfig(steps=7, layers=(3, 0.5), objective="separation", rotate_u=True, lr=0.001)


def test_bad_values_fail_clearly():
    with pytest.raises(ValueError, match="objective"):
        parse("--objective", "magnitude")
    with pytest.raises(SystemExit):
        parse("--steps", "many")


def test_pairs_file_is_validated(tiny, tmp_path):
    _, tok = tiny
    f = tmp_path / "pairs.json"
    f.write_text(json.dumps([{"chosen": "I love cheese", "rejected": "I hate cheese"}]))
    args = argparse.Namespace(pairs=str(f), personas=None)
    assert len(cli.load_pairs(args, tok)) == 1
    f.write_text(json.dumps([{"good": "x"}]))
    with pytest.raises(SystemExit, match="chosen"):
        cli.load_pairs(args, tok)


def test_main_reports_errors_without_a_traceback(capsys):
    assert cli.main(["eval", "/nonexistent/adapter", "--methods", "adapter,nope"]) == 2
    assert "error:" in capsys.readouterr().err


def test_eval_of_a_missing_adapter_fails_before_loading_a_model(capsys):
    assert cli.main(["eval", "/nonexistent/adapter"]) == 2
    assert "not an adapter directory" in capsys.readouterr().err
