"""Never lose a user's file: a directory is the project's only by its manifest, never by its file names; a
symbolic link is never written through; siblings (``.prev``, ``.ckpt``) are touched only when provably ours; a
failed command changes nothing; two writers of one path exclude each other; SIGTERM checkpoints like Ctrl-C.

Each data-loss case writes a user's bytes first and asserts they are unchanged afterwards.
"""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from interp_steer.app import cli, commands
from interp_steer.config import LossConfig, TrainConfig
from interp_steer.method.data import persona_pairs
from interp_steer.signals import Terminated
from interp_steer.storage.io import load_checkpoint, seal_run_dir, write_dir_atomic
from interp_steer.storage.ownership import claim, remove_owned, why_not_owned, write_manifest
from interp_steer.training.loop import train

TINY = dict(layers=(0, 1), loss_layer=2, rank=4, steps=4, batch_pairs=2, n_pairs=12, checkpoint_every=100,
            held_out=0.25, loss=LossConfig(kl_budget=None))
TRAIN_ARGS = ["--layers", "0,1", "--loss-layer", "2", "--rank", "4", "--steps", "1", "--batch-pairs", "2",
              "--n-pairs", "8", "--kl-budget", "none", "--device", "cpu"]


def snapshot(root: Path) -> dict[str, bytes | str]:
    """Every entry under ``root`` (links as their target, never followed): what must stay the same."""
    out: dict[str, bytes | str] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            out[rel] = f"-> {os.readlink(p)}" if p.is_symlink() else "dir" if p.is_dir() else p.read_bytes()
    return out


def user_files(d: Path, files: dict[str, str]) -> None:
    d.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (d / name).write_text(text)


@pytest.fixture
def tiny_cli(tiny, monkeypatch):
    monkeypatch.setattr(commands, "load_model", lambda *a, **k: tiny)
    return tiny


def run(argv, capsys):
    code = cli.main(argv)
    return code, capsys.readouterr().err


def test_user_siblings_named_like_checkpoints_are_never_touched(tiny_cli, tmp_path, capsys):
    """Case 1: X.prev, X.ckpt and X.ckpt.prev holding a user's files: train refuses before any work."""
    user_files(tmp_path / "X.prev", {"config.json": "mine", "notes.txt": "mine too"})
    user_files(tmp_path / "X.ckpt", {"config.json": "mine"})
    user_files(tmp_path / "X.ckpt.prev", {"run_config.json": "mine"})
    before = snapshot(tmp_path)
    for extra in ([], ["--overwrite"]):
        code, err = run(["train", "--out", str(tmp_path / "X"), *TRAIN_ARGS, *extra], capsys)
        assert code == 2 and "is in the way" in err and "no interp-steer manifest" in err
    assert snapshot(tmp_path) == before


def test_a_users_model_folder_is_not_an_export_whatever_its_file_names(tiny_cli, tmp_path, capsys):
    """Case 2: a folder of HF file names (config.json, model.safetensors, tokenizer.json) is not ours."""
    code, _ = run(["train", "--out", str(tmp_path / "art"), *TRAIN_ARGS], capsys)
    assert code == 0
    user_files(tmp_path / "M", {"config.json": "{}", "model.safetensors": "weights", "tokenizer.json": "{}"})
    before = snapshot(tmp_path / "M")
    for extra in ([], ["--overwrite"]):
        code, err = run(["export", str(tmp_path / "art"), "--out", str(tmp_path / "M"), "--format", "lora", *extra],
                        capsys)
        assert code == 2 and "not an export interp-steer wrote" in err and "already holds" not in err
    assert snapshot(tmp_path / "M") == before


def test_a_symlinked_out_is_refused_and_its_target_untouched(tiny_cli, tmp_path, capsys):
    """Case 3: --out is a link to a user's directory (empty or not): refused, target and link unchanged."""
    user_files(tmp_path / "U", {"config.json": "precious"})
    (tmp_path / "E").mkdir()
    (tmp_path / "L").symlink_to(tmp_path / "U")
    (tmp_path / "LE").symlink_to(tmp_path / "E")
    before = snapshot(tmp_path)
    for link in ("L", "LE"):
        code, err = run(["train", "--out", str(tmp_path / link), *TRAIN_ARGS, "--overwrite"], capsys)
        assert code == 2 and "symbolic link" in err
    code, err = run(["demo", "--out", str(tmp_path / "L"), "--overwrite"], capsys)
    assert code == 2 and "symbolic link" in err
    assert snapshot(tmp_path) == before and not (tmp_path / "L.prev").exists()
    # a link where the .prev sibling would go is in the way too, and is left alone
    (tmp_path / "Y.prev").symlink_to(tmp_path / "U")
    code, err = run(["train", "--out", str(tmp_path / "Y"), *TRAIN_ARGS], capsys)
    assert code == 2 and "Y.prev is in the way" in err and (tmp_path / "U" / "config.json").read_text() == "precious"


def test_a_failed_demo_has_changed_nothing(tmp_path, capsys):
    """Case 4: a demo whose model path does not exist fails before its first write."""
    art = tmp_path / "ART"
    user_files(art, {"run_config.json": '{"earlier": "run"}'})
    seal_run_dir(art)  # an earlier run's directory: --overwrite may replace it
    before = snapshot(tmp_path)
    code, err = run(["demo", "--out", str(art), "--overwrite", "--model", str(tmp_path / "nonexistent")], capsys)
    assert code == 2 and "no such directory" in err
    code, err = run(["demo", "--out", str(art), "--overwrite", "--model", str(art)], capsys)
    assert code == 2 and "not a model directory" in err
    assert snapshot(tmp_path) == before


def test_eval_and_export_never_write_into_the_artifact(tiny_cli, tmp_path, capsys):
    """Case 5: eval --out ART and export --out ART/lora are refused; the artifact stays whole and replaceable."""
    art = tmp_path / "ART"
    assert run(["train", "--out", str(art), *TRAIN_ARGS], capsys)[0] == 0
    before = snapshot(tmp_path)
    code, err = run(["eval", str(art), "--out", str(art), "--overwrite"], capsys)
    assert code == 2 and "inside the artifact" in err
    code, err = run(["export", str(art), "--out", str(art / "lora"), "--format", "lora"], capsys)
    assert code == 2 and "inside the artifact" in err
    assert snapshot(tmp_path) == before
    assert run(["train", "--out", str(art), *TRAIN_ARGS, "--overwrite"], capsys)[0] == 0


def test_an_artifact_does_not_choose_what_is_loaded_or_read(tiny_cli, tmp_path, capsys):
    """An artifact's record of its model and pairs file is compared, never followed."""
    import json

    art = tmp_path / "ART"
    assert run(["train", "--out", str(art), *TRAIN_ARGS], capsys)[0] == 0
    cfg = json.loads((art / "config.json").read_text())
    secret = tmp_path / "secret.json"
    secret.write_text('[{"token": "SECRET-123"}]')
    cfg["data"] = {**cfg["data"], "model": "some-org/some-model"}
    (art / "config.json").write_text(json.dumps(cfg))
    code, err = run(["export", str(art), "--out", str(tmp_path / "e"), "--format", "lora"], capsys)
    assert code == 2 and "does not load a model because an artifact names it" in err
    cfg["data"] = {**cfg["data"], "model": None, "pairs": str(secret)}
    (art / "config.json").write_text(json.dumps(cfg))
    code, err = run(["export", str(art), "--out", str(tmp_path / "e"), "--format", "control-vector", "--method", "mean_diff"], capsys)
    assert code == 2 and "does not read a file because an artifact names it" in err and "SECRET" not in err
    assert not (tmp_path / "e").exists()


def test_manifest_proves_ownership_and_removal_touches_only_listed_files(tmp_path):
    d = tmp_path / "d"
    user_files(d / "sub", {"a.txt": "a"})
    write_manifest(d, kind="run")
    assert why_not_owned(d) is None and why_not_owned(d, "other") is not None
    (d / "sub" / "late.txt").write_text("the user's")
    assert "late.txt" in why_not_owned(d)
    assert not remove_owned(d) and (d / "sub" / "late.txt").read_text() == "the user's"
    (d / "sub" / "late.txt").unlink()
    os.symlink(tmp_path, d / "sub" / "link")
    assert "link" in why_not_owned(d)
    (d / "sub" / "link").unlink()
    assert remove_owned(d) and not d.exists()


def test_permissions_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        out = write_dir_atomic(tmp_path / "e", {"f.txt": lambda p: p.write_text("x")})
    finally:
        os.umask(old)
    assert (out.stat().st_mode & 0o777) == 0o755 and ((out / "f.txt").stat().st_mode & 0o777) == 0o644


def test_a_claim_makes_missing_parents_and_a_failed_one_removes_them(tmp_path):
    with claim(tmp_path / "a" / "b" / "X"):
        assert (tmp_path / "a" / "b").is_dir()
    assert (tmp_path / "a" / "b").is_dir()
    with pytest.raises(RuntimeError):
        with claim(tmp_path / "c" / "d" / "X"):
            raise RuntimeError("the command failed")
    assert not (tmp_path / "c").exists()


def test_two_writers_of_one_path_one_wins_the_other_is_told(tmp_path):
    target = tmp_path / "X"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from interp_steer.storage.ownership import claim
        with claim({str(target)!r}):
            print("held", flush=True)
            time.sleep(30)
        """)], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1])
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FileExistsError, match="another process is writing"):
            write_dir_atomic(target, {"f.txt": lambda p: p.write_text("x")})
        assert not target.exists()
    finally:
        holder.kill()
        holder.wait()
    write_dir_atomic(target, {"f.txt": lambda p: p.write_text("x")})  # the kernel released the dead one's lock
    with claim(target), claim(target):  # re-entrant within a process
        pass
    assert not (tmp_path / ".X.lock").exists()


def test_sigterm_checkpoints_like_ctrl_c_and_a_second_stops_at_once(tiny, tmp_path):
    bridge, tok = tiny
    before = signal.getsignal(signal.SIGTERM)

    def term_after_step_1(step, adapters):
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Terminated):
        train(bridge, tok, persona_pairs(tok), TrainConfig(**TINY), tmp_path / "r", progress=False,
              callback=term_after_step_1)
    assert load_checkpoint(tmp_path / "r.ckpt", bridge).step == 2
    assert signal.getsignal(signal.SIGTERM) is before
    assert not list(tmp_path.glob(".*tmp-*"))

    def term_twice(step, adapters):
        if step == 0:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Terminated):
        train(bridge, tok, persona_pairs(tok), TrainConfig(**TINY), tmp_path / "s", progress=False,
              callback=term_twice)
    assert not (tmp_path / "s").exists()


def test_non_finite_or_non_numeric_coefficients_are_refused(tiny, tmp_path):
    import torch

    from interp_steer.method.adapter import AdapterSpec, apply_adapters, check_coefficient, make_adapters
    from interp_steer.storage.exports import save_lora

    bridge, _ = tiny
    adapters = make_adapters(bridge, [AdapterSpec("blocks.0.mlp.out", 4)])
    with torch.no_grad():
        adapters[0].lam.fill_(1.0)
    with pytest.raises(ValueError, match="finite number, got '1'"):  # (the test run's type checker would also)
        check_coefficient("1")
    for c in (float("nan"), float("inf"), torch.tensor([1.0, float("nan")]), torch.tensor([1])):
        with pytest.raises(ValueError, match="finite"):
            with apply_adapters(bridge, adapters, c):
                pass
    with pytest.raises(ValueError, match="not finite"):
        save_lora(bridge, adapters, 1e30, tmp_path / "l", base_model="m")
    assert not (tmp_path / "l").exists()
