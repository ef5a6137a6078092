"""The hostile suite: what a careless or hostile user, or a cloned repository, can put where interp-steer reads and
writes. Every case snapshots the tree around it (files with their bytes and modes, folders, links and their
targets, never followed) and asserts that what the user owns is unchanged afterwards, and that the refusal is one
line naming what was wrong. Cases of CONTRIBUTING's "Rejected inputs" live beside their modules' tests; the ones
here are about files: manifests as data, reserved names, siblings, studies. A later round extends this module.
"""

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from interp_steer.app import cli, commands, study
from interp_steer.storage import ownership
from interp_steer.storage.io import check_dir_target, write_dir_atomic
from interp_steer.storage.ownership import MANIFEST, claim, remove_owned, why_not_owned, write_manifest

TRAIN_ARGS = ["--layers", "0,1", "--loss-layer", "2", "--rank", "4", "--steps", "1", "--batch-pairs", "2",
              "--n-pairs", "8", "--kl-budget", "none", "--device", "cpu"]
EVAL_ARGS = ["--methods", "adapter", "--n-items", "2", "--n-neutral", "2", "--n-secondary", "0", "--bisect", "0",
             "--grid", "1"]


def tree(root: Path) -> dict:
    """Every entry under ``root`` and ``root`` itself: ``(kind, mode, bytes or link target)``, links never
    followed. Two equal trees hold the same bytes at the same names with the same modes."""
    out = {}
    root = Path(root)
    if not os.path.lexists(root):
        return out
    stack = [root]
    while stack:
        p = stack.pop()
        st_ = os.lstat(p)
        rel = "." if p == root else p.relative_to(root).as_posix()
        mode = stat.S_IMODE(st_.st_mode)
        if stat.S_ISLNK(st_.st_mode):
            out[rel] = ("link", mode, os.readlink(p))
        elif stat.S_ISDIR(st_.st_mode):
            out[rel] = ("dir", mode, None)
            stack += sorted(p.iterdir())
        elif stat.S_ISREG(st_.st_mode):
            out[rel] = ("file", mode, p.read_bytes())
        else:
            out[rel] = ("other", mode, stat.S_IFMT(st_.st_mode))
    return out


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def forge(directory: Path, entries: list, fmt: int | None = 2, kind: str = "artifact", name: str | None = None,
          extra: str = "") -> None:
    """A manifest in ``directory`` listing ``entries`` (``(key, bytes)`` pairs: the size and hash those bytes
    have), written as raw JSON so that a key may appear twice."""
    directory.mkdir(parents=True, exist_ok=True)
    files = ", ".join(f'{json.dumps(k)}: {{"size": {len(b)}, "sha256": "{sha(b)}"}}' for k, b in entries)
    head = f'"written_by": "interp-steer", "name": {json.dumps(name or directory.name)}, '
    if fmt is not None:
        head += f'"format": {fmt}, "kind": "{kind}", "identity": null, "local": [], '
    (directory / MANIFEST).write_text("{" + head + f'"skip": [], "files": {{{files}}}{extra}}}')


def user_file(path: Path, text: str = "the user's") -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text.encode()


@pytest.fixture
def tiny_cli(tiny, monkeypatch):
    monkeypatch.setattr(commands, "load_model", lambda *a, **k: tiny)
    return tiny


def run(argv, capsys):
    code = cli.main(argv)
    err = capsys.readouterr().err
    return code, err


# ------------------------------------------------------------------------------------ manifests are data

BAD_KEYS = {  # key -> what the refusal says of it
    "/etc/passwd": "absolute", "../victim.txt": "'..' component", "a/../../victim.txt": "'..' component",
    "": "empty", ".": "'.' component", "a//b": "empty", "./a": "'.' component", "a/./b": "'.' component",
    "a/": "empty", "a\\..\\b": "backslash", "a\x00b": "NUL", MANIFEST: "the manifest itself",
}


@pytest.mark.parametrize("key", list(BAD_KEYS), ids=[repr(k) for k in BAD_KEYS])
def test_a_key_outside_the_directory_makes_it_not_owned_naming_the_key(tmp_path, key):
    d = tmp_path / "d"
    notes = user_file(d / "notes.txt")
    victim = user_file(tmp_path / "victim.txt")
    forge(d, [("notes.txt", notes), (key, victim)])
    before = tree(tmp_path)
    reason = why_not_owned(d)
    assert reason is not None and repr(key) in reason and BAD_KEYS[key] in reason
    assert not remove_owned(d)
    with pytest.raises(FileExistsError, match="not an artifact interp-steer wrote"):
        write_dir_atomic(d, {"config.json": lambda p: p.write_text("{}")}, overwrite=True)
    assert tree(tmp_path) == before


def test_reproduction_a_forged_artifact_manifest_with_overwrite(tiny_cli, tmp_path, capsys):
    """``F/`` lists notes.txt (present, right hash), an absolute victim and ``../victim_rel.txt``: ``train --out F
    --overwrite`` refuses, naming the key; both victims and F are unchanged."""
    f = tmp_path / "F"
    notes = user_file(f / "notes.txt", "my notes")
    va = user_file(tmp_path / "abs" / "victim_abs.txt", "absolute victim")
    vr = user_file(tmp_path / "victim_rel.txt", "relative victim")
    forge(f, [("notes.txt", notes), (str(tmp_path / "abs" / "victim_abs.txt"), va), ("../victim_rel.txt", vr)],
          fmt=None)
    before = tree(tmp_path)
    code, err = run(["train", "--out", str(f), "--overwrite", *TRAIN_ARGS], capsys)
    assert code == 2 and "is not an artifact interp-steer wrote" in err and "victim_abs.txt" in err
    assert "absolute path" in err and err.count("\n") == 1
    assert tree(tmp_path) == before


def test_reproduction_a_forged_checkpoint_manifest_without_overwrite(tiny_cli, tmp_path, capsys):
    """``K2.ckpt/`` lists an absolute path; a plain ``train --out K2`` refuses before any work: K2.ckpt is in the
    way. Before, the run finished and ``remove_checkpoint`` deleted the victim."""
    victim = user_file(tmp_path / "victim.txt")
    forge(tmp_path / "K2.ckpt", [(str(tmp_path / "victim.txt"), victim)], fmt=None)
    before = tree(tmp_path)
    code, err = run(["train", "--out", str(tmp_path / "K2"), *TRAIN_ARGS], capsys)
    assert code == 2 and "K2.ckpt is in the way" in err and "absolute path" in err
    assert tree(tmp_path) == before


@pytest.fixture
def study_no_model(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a model was loaded for a refused study")
    monkeypatch.setattr(study, "load_model", refuse)


def test_reproduction_a_cloned_study_whose_cell_lists_a_path_outside(study_no_model, tmp_path, capsys):
    """A cell directory holding only a manifest listing ``../../../victim.txt`` (cell manifests are committed by
    design): a plain resume refuses that cell before any model loads; the victim is kept."""
    out = tmp_path / "S"
    base = ["study", "--out", str(out), "--models", "smollm2-135m", "--concepts", "honesty", "--seeds", "0"]
    assert run([*base, "--report-only"], capsys)[0] == 0
    victim = user_file(tmp_path / "victim.txt")
    forge(out / "cells" / "smollm2-135m--honesty--s0", [("../../../victim.txt", victim)], fmt=None, kind="cell")
    before = tree(tmp_path)
    code, err = run(base, capsys)
    assert code == 2 and "'../../../victim.txt'" in err and "not a study cell interp-steer wrote" in err
    assert tree(tmp_path) == before


def test_every_listed_entry_must_be_there_as_the_plain_file_it_claims(tmp_path):
    d = tmp_path / "d"
    a = user_file(d / "a.txt", "a")
    forge(d, [("a.txt", a), ("gone.txt", b"x")])
    assert "lists 'gone.txt', which is not there" in why_not_owned(d)
    (d / "sub").mkdir()
    (d / "sub" / "real.txt").write_text("r")
    os.symlink(d / "sub", d / "linked")
    forge(d, [("a.txt", a), ("sub/real.txt", b"r"), ("linked/real.txt", b"r")])
    assert "'linked'" in why_not_owned(d) or "linked/real.txt" in why_not_owned(d)
    os.unlink(d / "linked")
    forge(d, [("a.txt", a), ("a.txt", a)])
    assert "lists 'a.txt' twice" in why_not_owned(d)
    forge(d, [("a.txt", a), ("a.txt/b", a)])
    assert "both as a file and as a folder" in why_not_owned(d)
    before = tree(tmp_path)
    assert not remove_owned(d) and tree(tmp_path) == before


def test_a_committed_study_may_lack_what_it_leaves_out_as_a_whole_never_in_part(tmp_path):
    """What a committed cell leaves out (its adapter folder, .gitignore) may be absent as a whole, never in part;
    written before kinds (format 1) any whole top-level entry may be."""
    d = tmp_path / "cell"
    user_file(d / "cell.json", "{}")
    user_file(d / "adapter-s0" / "config.json", "{}")
    user_file(d / "adapter-s0" / "adapter.safetensors", "w")
    write_manifest(d, kind="cell", local=("adapter-s0",))
    (d / "adapter-s0" / "adapter.safetensors").unlink()
    assert "adapter-s0/adapter.safetensors" in why_not_owned(d)
    (d / "adapter-s0" / "config.json").unlink()
    (d / "adapter-s0").rmdir()
    assert why_not_owned(d) is None
    forge(d, [("cell.json", b"{}"), ("figures/a.png", b"png")], fmt=2, kind="cell")
    assert "figures/a.png" in why_not_owned(d)  # not declared local
    forge(d, [("cell.json", b"{}"), ("figures/a.png", b"png")], fmt=None)
    assert why_not_owned(d) is None
    assert remove_owned(d) and not d.exists()


def test_hard_links_and_links_on_the_way_are_never_the_projects(tmp_path):
    victim = user_file(tmp_path / "outside" / "victim.txt", "keep me")
    d = tmp_path / "d"
    d.mkdir()
    os.link(tmp_path / "outside" / "victim.txt", d / "hard.txt")
    forge(d, [("hard.txt", victim)])
    assert "hard link" in why_not_owned(d)
    with pytest.raises(ValueError, match="hard links"):
        write_manifest(d, kind="run")
    os.unlink(d / "hard.txt")
    os.symlink(tmp_path / "outside", d / "via")
    forge(d, [("via/victim.txt", victim)])
    assert why_not_owned(d) is not None
    before = tree(tmp_path)
    assert not remove_owned(d) and tree(tmp_path) == before


def test_a_huge_manifest_or_a_deep_tree_is_refused_in_one_line(tmp_path):
    d = tmp_path / "d"
    forge(d, [], extra=', "pad": "' + "x" * (ownership.MAX_MANIFEST_BYTES + 1) + '"')
    assert "larger than any interp-steer writes" in why_not_owned(d)
    deep = tmp_path / "deep"
    deep.mkdir()
    fd = os.open(deep, os.O_RDONLY)
    for _ in range(1100):  # deeper than Python's recursion limit
        os.mkdir("d", dir_fd=fd)
        fd, old = os.open("d", os.O_RDONLY, dir_fd=fd), fd
        os.close(old)
    os.close(fd)
    forge(deep, [])
    assert "deeper than" in why_not_owned(deep)
    with pytest.raises(ValueError, match="deeper than"):
        write_manifest(deep, kind="run")
    assert not remove_owned(deep) and (deep / "d" / "d").is_dir()
    for depth in range(1100, 0, -1):  # (shutil.rmtree recurses too)
        os.rmdir(deep.joinpath(*["d"] * depth))


# the property: whatever a manifest says, nothing outside its directory changes, and a directory that is not
# the project's does not change either
def _keys(tmp: Path) -> st.SearchStrategy:
    victim = str(tmp / "outside" / "victim.txt")
    fixed = ["inside.txt", "nested/in.txt", "missing.txt", "nested", victim, str(tmp / "outside"),
             "../outside/victim.txt", "../../outside/victim.txt", "nested/../../outside/victim.txt",
             "via/victim.txt", "via/sub/deep.txt", "hard.txt", "", ".", "/", "nested//in.txt", "./inside.txt",
             "nested/./in.txt", "..", "via", MANIFEST]
    return st.one_of(st.sampled_from(fixed), st.text(alphabet="ab./\\\x00", max_size=8))


def _content_for(key: str, d: Path) -> bytes:
    """The bytes that name would have if pathlib followed it (what a forger lists, to pass the hash check)."""
    p = d / key
    try:
        return p.read_bytes() if p.is_file() else b"?"
    except (OSError, ValueError):
        return b"?"


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), fmt=st.sampled_from([None, 2]), hard=st.booleans(), via=st.booleans())
def test_no_forged_manifest_changes_anything_outside_its_directory(tmp_path_factory, data, fmt, hard, via):
    tmp = tmp_path_factory.mktemp("forged")
    user_file(tmp / "outside" / "victim.txt", "victim")
    user_file(tmp / "outside" / "sub" / "deep.txt", "deep victim")
    os.chmod(tmp / "outside" / "victim.txt", 0o640)
    d = tmp / "work" / "D"
    user_file(d / "inside.txt", "inside")
    user_file(d / "nested" / "in.txt", "nested")
    if hard:
        os.link(tmp / "outside" / "victim.txt", d / "hard.txt")
    if via:
        os.symlink(tmp / "outside", d / "via")
    honest = ["inside.txt", "nested/in.txt"] if data.draw(st.booleans()) else []  # what is there, listed
    keys = honest + data.draw(st.just([]) | st.lists(_keys(tmp), max_size=4))
    forge(d, [(k, _content_for(k, d)) for k in keys], fmt=fmt)
    outside = tree(tmp / "outside")
    inside = tree(d)
    owned = why_not_owned(d) is None
    event("owned" if owned else "refused")
    if not owned:
        assert not remove_owned(d) and tree(d) == inside
        with pytest.raises(FileExistsError):
            check_dir_target(d, overwrite=True)
    else:
        write_dir_atomic(d, {"config.json": lambda p: p.write_text("{}")}, overwrite=True)
        assert remove_owned(d) and not d.exists()
    assert tree(tmp / "outside") == outside


# ---------------------------------------------------------------------------------- reserved names

def test_a_users_file_named_like_the_lock_is_never_deleted_or_written(tiny_cli, tmp_path, capsys):
    """``.LK2.lock`` beside ``--out LK2``: a user's file, folder or link of that name is refused and kept."""
    target = user_file(tmp_path / "target.txt", "a link's target")
    for make in (lambda p: p.write_text("my lock notes"), lambda p: p.mkdir(),
                 lambda p: p.symlink_to(tmp_path / "target.txt")):
        lock = tmp_path / ".LK2.lock"
        make(lock)
        before = tree(tmp_path)
        code, err = run(["train", "--out", str(tmp_path / "LK2"), *TRAIN_ARGS], capsys)
        assert code == 2 and ".LK2.lock is in the way" in err and err.count("\n") == 1
        assert tree(tmp_path) == before and (tmp_path / "target.txt").read_bytes() == target
        lock.rmdir() if lock.is_dir() and not lock.is_symlink() else lock.unlink()
    with claim(tmp_path / "LK2"):
        assert (tmp_path / ".LK2.lock").read_bytes() == ownership.LOCK_MARK
    assert not (tmp_path / ".LK2.lock").exists() and not list(tmp_path.glob(".LK2.lock.*"))


def test_a_hard_link_at_a_temporary_manifest_name_is_never_written_through(tmp_path):
    """The manifest is written to a fresh, randomly named file, never to a name that exists."""
    d = tmp_path / "S"
    user_file(d / "run_config.json", "{}")
    mine = user_file(tmp_path / "mine.txt", "the user's linked file")
    os.link(tmp_path / "mine.txt", tmp_path / "S_tmp_link")
    os.rename(tmp_path / "S_tmp_link", d / f"{MANIFEST}.tmp")
    with pytest.raises(ValueError, match="hard links"):
        write_manifest(d, kind="study")  # a file of the user's inside is refused, not listed
    assert (tmp_path / "mine.txt").read_bytes() == mine


def test_a_users_lock_named_file_inside_an_artifact_is_not_ignored(tiny_cli, tmp_path, capsys):
    """``.notes.lock`` the user put inside an artifact makes it not the project's: --overwrite refuses, nothing
    moves to ``LK.prev``."""
    art = tmp_path / "LK"
    assert run(["train", "--out", str(art), *TRAIN_ARGS], capsys)[0] == 0
    user_file(art / ".notes.lock", "my notes")
    before = tree(tmp_path)
    code, err = run(["train", "--out", str(art), "--overwrite", *TRAIN_ARGS], capsys)
    assert code == 2 and "'.notes.lock'" in err
    assert tree(tmp_path) == before and not (tmp_path / "LK.prev").exists()


# ------------------------------------------------------------------------ identity, not names, for siblings

TINY = dict(layers=(0, 1), loss_layer=2, rank=4, steps=4, batch_pairs=2, n_pairs=8, checkpoint_every=100,
            held_out=0.25)


def _terminated_run(tiny, out: Path, **changes) -> None:
    """A training run stopped by SIGTERM after its second step: ``out.ckpt`` is left, resumable."""
    import signal

    from interp_steer.config import LossConfig, TrainConfig
    from interp_steer.method.data import persona_pairs
    from interp_steer.signals import Terminated
    from interp_steer.training.loop import train

    bridge, tok = tiny

    def term(step, adapters):
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    cfg = TrainConfig(**{**TINY, **changes}, loss=LossConfig(kl_budget=None))
    with pytest.raises(Terminated):
        train(bridge, tok, persona_pairs(tok), cfg, out, progress=False, callback=term)


def test_another_runs_checkpoint_is_kept_and_named_with_how_to_resume_it(tiny_cli, tmp_path, capsys):
    """``train --out K4`` stopped (K4.ckpt left), then a fresh ``train --out K4 --seed 3``: refused, the
    checkpoint kept byte for byte; ``--overwrite`` discards it."""
    _terminated_run(tiny_cli, tmp_path / "K4")
    assert (tmp_path / "K4.ckpt").is_dir()
    before = tree(tmp_path)
    code, err = run(["train", "--out", str(tmp_path / "K4"), "--seed", "3", *TRAIN_ARGS], capsys)
    assert code == 2 and "K4.ckpt is the checkpoint of another training run" in err
    assert "--resume" in err and "--overwrite" in err
    assert tree(tmp_path) == before
    assert run(["train", "--out", str(tmp_path / "K4"), "--seed", "3", *TRAIN_ARGS, "--overwrite"], capsys)[0] == 0
    assert not (tmp_path / "K4.ckpt").exists() and (tmp_path / "K4" / "config.json").is_file()


def test_a_runs_own_checkpoint_is_resumed_and_then_removed(tiny, tmp_path):
    from interp_steer.config import LossConfig, TrainConfig
    from interp_steer.method.data import persona_pairs
    from interp_steer.training.loop import train

    _terminated_run(tiny, tmp_path / "R")
    bridge, tok = tiny
    train(bridge, tok, persona_pairs(tok), TrainConfig(**TINY, loss=LossConfig(kl_budget=None)), tmp_path / "R",
          resume=True, progress=False)
    assert not (tmp_path / "R.ckpt").exists() and (tmp_path / "R" / "adapter.safetensors").is_file()


def test_an_artifact_named_like_a_checkpoint_is_not_one(tiny_cli, tmp_path, capsys):
    """``train --out Z.ckpt`` then ``train --out Z``: the artifact Z.ckpt is in the way, kept."""
    assert run(["train", "--out", str(tmp_path / "Z.ckpt"), *TRAIN_ARGS], capsys)[0] == 0
    before = tree(tmp_path)
    for extra in ([], ["--overwrite"]):
        code, err = run(["train", "--out", str(tmp_path / "Z"), *TRAIN_ARGS, *extra], capsys)
        assert code == 2 and "Z.ckpt is in the way" in err and "an artifact interp-steer wrote, not a checkpoint" in err
    assert tree(tmp_path) == before


def test_eval_out_at_another_artifact_is_refused(tiny_cli, tmp_path, capsys):
    """``eval base --out art3 --overwrite`` where art3 is another trained artifact: refused, art3 unchanged."""
    for name in ("base", "art3"):
        assert run(["train", "--out", str(tmp_path / name), *TRAIN_ARGS], capsys)[0] == 0
    before = tree(tmp_path)
    code, err = run(["eval", str(tmp_path / "base"), "--out", str(tmp_path / "art3"), "--overwrite"], capsys)
    assert code == 2 and "an artifact interp-steer wrote, not a run directory" in err
    assert tree(tmp_path) == before


def test_an_interrupted_eval_leaves_a_run_directory_that_overwrite_replaces(tiny_cli, tmp_path, capsys,
                                                                           monkeypatch):
    """Ctrl-C in the middle of ``eval``'s sweep: the directory is a run's (not "not a run directory"); a rerun
    without ``--overwrite`` names the flag, one with it finishes; the artifact is never touched."""
    art, ev = tmp_path / "art", tmp_path / "ev"
    assert run(["train", "--out", str(art), *TRAIN_ARGS], capsys)[0] == 0
    artifact = tree(art)

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(commands, "sweep_report", interrupted)
        code, err = run(["eval", str(art), "--out", str(ev), *EVAL_ARGS], capsys)
    assert code == 130 and err == "interrupted\n"
    assert json.loads((ev / MANIFEST).read_text())["kind"] == "run"
    left = tree(ev)
    code, err = run(["eval", str(art), "--out", str(ev), *EVAL_ARGS], capsys)
    assert code == 2 and "--overwrite" in err and "not a run directory" not in err and err.count("\n") == 1
    assert tree(ev) == left
    code, _ = run(["eval", str(art), "--out", str(ev), *EVAL_ARGS, "--overwrite"], capsys)
    assert code == 0 and (ev / "report.json").is_file() and tree(art) == artifact


def test_a_renamed_artifact_stays_the_projects(tiny_cli, tmp_path, capsys):
    assert run(["train", "--out", str(tmp_path / "A"), *TRAIN_ARGS], capsys)[0] == 0
    os.rename(tmp_path / "A", tmp_path / "B")
    assert run(["train", "--out", str(tmp_path / "B"), *TRAIN_ARGS, "--overwrite"], capsys)[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["B"]


def test_a_copied_committed_study_reports_from_its_copy(tmp_path, capsys, study_no_model):
    """``cp -r docs/study COPY; interp-steer study --config docs/study/run_config.json --out COPY --report-only``:
    the committed manifests (written before kinds) are read, the copy is the study's, the report rewritten."""
    import shutil

    repo = Path(__file__).resolve().parents[1]
    copy = tmp_path / "study_copy"
    shutil.copytree(repo / "docs" / "study", copy, symlinks=True)
    cells = tree(copy / "cells")
    code, err = run(["study", "--config", str(repo / "docs" / "study" / "run_config.json"), "--out", str(copy),
                     "--report-only"], capsys)
    assert code == 0, err
    results = json.loads((copy / "results.json").read_text())
    assert results["missing"] == [] and len(results["cells"]) == 12
    assert tree(copy / "cells") == cells and why_not_owned(copy, None, ("study",)) is None


def test_sigterm_after_the_last_step_still_writes_the_artifact(tiny, tmp_path, monkeypatch):
    """A SIGTERM while the finished run measures its held-out pairs: the artifact is written, then it stops."""
    import importlib
    import signal

    from interp_steer.config import LossConfig, TrainConfig
    from interp_steer.method.data import persona_pairs
    from interp_steer.signals import Terminated
    from interp_steer.storage.io import load_artifact

    train_mod = importlib.import_module("interp_steer.training.loop")  # (the package exports the function as train)
    real = train_mod.evaluate_pairs

    def late(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)

    monkeypatch.setattr(train_mod, "evaluate_pairs", late)
    bridge, tok = tiny
    with pytest.raises(Terminated):
        train_mod.train(bridge, tok, persona_pairs(tok), TrainConfig(**TINY, loss=LossConfig(kl_budget=None)),
                        tmp_path / "T", progress=False)
    assert load_artifact(tmp_path / "T", bridge).metrics["steps_done"] == TINY["steps"]
    assert not (tmp_path / "T.ckpt").exists()


# --------------------------------------------------------------------------- studies that cannot collide

def _fake_model(d: Path) -> str:
    user_file(d / "config.json", '{"model_type": "llama"}')
    return str(d)


def test_two_models_in_folders_of_one_name_get_cells_of_their_own(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a, b = _fake_model(tmp_path / "mA" / "m"), _fake_model(tmp_path / "mB" / "m")
    study.check_models(["./mA/m", "./mB/m"])
    ids = {study.Cell(m, "honesty", 0).id for m in ("./mA/m", "./mB/m", a, b)}
    assert len(ids) == 4
    assert study.Cell("smollm2-135m", "honesty", 0).id == study.Cell("HuggingFaceTB/SmolLM2-135M-Instruct",
                                                                     "honesty", 0).id == "smollm2-135m--honesty--s0"


@pytest.mark.parametrize("models", [["smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct"],
                                    ["gemma-3-270m", "google/gemma-3-270m"], ["./m", "{tmp}/m"], ["./m", "m"]])
def test_one_model_named_twice_is_refused_before_anything_is_written(study_no_model, tmp_path, monkeypatch, capsys,
                                                                     models):
    monkeypatch.chdir(tmp_path)
    _fake_model(tmp_path / "m")
    before = tree(tmp_path)
    code, err = run(["study", "--out", str(tmp_path / "S"), "--models", ",".join(models).format(tmp=tmp_path),
                     "--concepts", "honesty", "--seeds", "0"], capsys)
    assert code == 2 and "names one model twice" in err and err.count("\n") == 1
    assert tree(tmp_path) == before


def test_a_symlinked_cells_folder_is_refused_and_its_target_untouched(study_no_model, tmp_path, capsys):
    out = tmp_path / "S"
    base = ["study", "--out", str(out), "--models", "smollm2-135m", "--concepts", "honesty", "--seeds", "0"]
    assert run([*base, "--report-only"], capsys)[0] == 0
    user_file(tmp_path / "mine" / "thesis.tex", "chapter 1")
    (out / "cells").symlink_to(tmp_path / "mine")
    before = tree(tmp_path)
    code, err = run(base, capsys)
    assert code == 2 and "cells is a symbolic link" in err
    assert tree(tmp_path) == before


@pytest.mark.parametrize("env", [{"RANK": "5", "WORLD_SIZE": "2"}, {"RANK": "-1", "WORLD_SIZE": "2"},
                                 {"RANK": "0", "WORLD_SIZE": "0"}, {"RANK": "abc", "WORLD_SIZE": "2"}])
def test_rank_and_world_size_are_checked_like_shard(study_no_model, tmp_path, monkeypatch, capsys, env):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    code, err = run(["study", "--out", str(tmp_path / "S"), "--models", "smollm2-135m", "--seeds", "0"], capsys)
    assert code == 2 and "0 <= RANK < WORLD_SIZE" in err and f"RANK={env['RANK']!r}" in err
    assert list(tmp_path.iterdir()) == []


def test_a_study_whose_model_fails_to_load_writes_nothing(tmp_path, monkeypatch, capsys):
    def fail(*a, **k):
        raise OSError("Could not load model 'smollm2-135m': the cache is damaged")
    monkeypatch.setattr(study, "load_model", fail)
    code, err = run(["study", "--out", str(tmp_path / "a" / "b" / "S9"), "--models", "smollm2-135m", "--concepts",
                     "honesty", "--seeds", "0"], capsys)
    assert code == 2 and "Could not load model" in err
    assert list(tmp_path.iterdir()) == []


# -------------------------------------------------------------------------- commands that do what they say

ONE_NESTED_OPTION = [  # (command, positional, option, value, nested field path)
    ("train", [], "--margin", "0.3", ("train", "loss", "margin")),
    ("train", [], "--steps", "3", ("train", "steps")),
    ("eval", ["a"], "--n-items", "2", ("sweep", "n_items")),
    ("eval", ["a"], "--budget", "0.2", ("sweep", "budget")),
    ("demo", [], "--n-items", "2", ("sweep", "n_items")),
    ("study", [], "--n-items", "2", ("sweep", "n_items")),
    ("study", [], "--margin", "0.3", ("train", "loss", "margin")),
]


def _replaced(cfg, path, value):
    import dataclasses

    head, *rest = path
    return dataclasses.replace(cfg, **{head: _replaced(getattr(cfg, head), rest, value) if rest else value})


@pytest.mark.parametrize("command,positional,option,value,path", ONE_NESTED_OPTION)
def test_one_option_changes_one_field_whatever_the_command(command, positional, option, value, path):
    """``eval --n-items 2`` keeps eval's methods (adapter), as its --help says: every command's defaults hold for
    what is not named, on the command line and in a JSON config alike."""
    from interp_steer.config import COMMANDS

    parse = lambda *argv: cli.config_from_args(command, cli.build_parser().parse_args([command, *argv]))  # noqa: E731
    cfg, plain = parse(*positional, option, value), parse(*positional)
    assert cfg == _replaced(plain, path, type(_get(plain, path))(value))
    nested = {path[0]: _nest(path[1:], type(_get(plain, path))(value))}
    assert COMMANDS[command].from_dict({**({"artifact": "a"} if positional else {}), **nested}) == cfg


def _get(cfg, path):
    for p in path:
        cfg = getattr(cfg, p)
    return cfg


def _nest(path, value):
    return {path[0]: _nest(path[1:], value)} if path else value


def test_a_fifo_as_config_is_refused_at_once(tmp_path, capsys):
    fifo = tmp_path / "config.fifo"
    os.mkfifo(fifo)
    code, err = run(["train", "--config", str(fifo)], capsys)
    assert code == 2 and "not a regular file" in err
    code, err = run(["train", "--pairs", str(fifo)], capsys)
    assert code == 2 and "is not a file" in err


@pytest.mark.parametrize("out", [".", "..", "/"])
def test_an_out_that_names_no_directory_of_its_own_is_refused(tiny_cli, tmp_path, monkeypatch, capsys, out):
    monkeypatch.chdir(tmp_path)
    user_file(tmp_path / "notes.txt")
    before = tree(tmp_path)
    code, err = run(["train", "--out", out, *TRAIN_ARGS], capsys)
    assert code == 2 and "names no directory of its own" in err and "Error" not in err
    assert tree(tmp_path) == before


def _holder(target: Path):
    """Another process holding the claim on ``target`` until killed."""
    import subprocess
    import sys
    import textwrap

    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from interp_steer.storage.ownership import claim
        with claim({str(target)!r}):
            print("held", flush=True)
            time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1])
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_eval_and_export_hold_a_claim_on_their_output(tiny_cli, tmp_path, capsys):
    """A second export (or eval) into a directory another process is writing is refused at once, never lost."""
    art = tmp_path / "art"
    assert run(["train", "--out", str(art), *TRAIN_ARGS], capsys)[0] == 0
    for argv, target in ((["export", str(art), "--out", str(tmp_path / "cexp"), "--format", "lora", "--overwrite"],
                          tmp_path / "cexp"), (["eval", str(art), "--out", str(tmp_path / "ev")],
                                               tmp_path / "ev")):
        holder = _holder(target)
        try:
            before = tree(tmp_path)
            code, err = run(argv, capsys)
            assert code == 2 and "another process is writing" in err
            assert tree(tmp_path) == before
        finally:
            holder.kill()
            holder.wait()


def test_a_control_vector_export_takes_the_pairs_file_it_asks_for(tiny_cli, tmp_path, capsys):
    from interp_steer.method.data import persona_pairs

    pairs = tmp_path / "pairs.json"
    pairs.write_text(json.dumps([{"chosen": p.chosen, "rejected": p.rejected} for p in persona_pairs(tiny_cli[1])]))
    art = tmp_path / "art"
    assert run(["train", "--out", str(art), "--pairs", str(pairs), *TRAIN_ARGS], capsys)[0] == 0
    argv = ["export", str(art), "--out", str(tmp_path / "cv"), "--format", "control-vector", "--method",
            "mean_diff"]
    code, err = run(argv, capsys)
    assert code == 2 and "--pairs FILE" in err and not (tmp_path / "cv").exists()
    assert run([*argv, "--pairs", str(pairs)], capsys)[0] == 0
    assert (tmp_path / "cv" / "control_vector.gguf").is_file()


def test_an_artifact_trained_in_bfloat16_is_exported_from_float32_weights(tmp_path, monkeypatch, capsys):
    """Its fingerprints are of the bfloat16 weights: a float32 copy of the same weights is checked after the
    cast, not refused as 'different weights'."""
    from interp_steer.method.models import tiny_model
    from interp_steer.storage.io import load_artifact

    bf16, f32 = tiny_model(seed=0, dtype="bfloat16"), tiny_model(seed=0)
    monkeypatch.setattr(commands, "load_model", lambda *a, **k: bf16)
    art = tmp_path / "art"
    assert run(["train", "--out", str(art), *TRAIN_ARGS], capsys)[0] == 0
    assert json.loads((art / "config.json").read_text())["weights_dtype"] == "bfloat16"
    load_artifact(art, f32[0])  # checked against the float32 copy
    monkeypatch.setattr(commands, "load_model", lambda *a, **k: f32)
    code, err = run(["export", str(art), "--out", str(tmp_path / "lora"), "--format", "lora"], capsys)
    assert code == 0, err
    other = tiny_model(seed=1)
    with pytest.raises(ValueError, match="differ from those it was trained on"):
        load_artifact(art, other[0])


def test_a_full_disk_while_writing_weights_is_one_line_and_replaces_nothing(tiny_cli, tmp_path, capsys,
                                                                            monkeypatch):
    """The weights' writer failing as a full disk makes it (safetensors raises its own error, not OSError):
    one line naming the likely cause, rc 2, the earlier artifact byte for byte as it was, no temporary left."""
    from safetensors import SafetensorError

    import interp_steer.storage.io as io_mod

    out = tmp_path / "A"
    assert run(["train", "--out", str(out), *TRAIN_ARGS], capsys)[0] == 0
    before = tree(tmp_path)

    def full(*a, **k):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")

    monkeypatch.setattr(io_mod, "save_file", full)
    code, err = run(["train", "--out", str(out), "--overwrite", *TRAIN_ARGS], capsys)
    errors = [ln for ln in err.splitlines() if "error:" in ln]  # (beside the progress bars)
    assert code == 2 and len(errors) == 1 and "Traceback" not in err
    assert "disk full" in errors[0] and "StorageFull" in errors[0]
    assert tree(tmp_path) == before


def test_a_read_only_target_with_overwrite_is_refused_before_anything_is_written(tiny_cli, tmp_path, capsys,
                                                                                 monkeypatch):
    """A target whose files could not be removed after the swap (read-only: as root, simulated through
    ``os.access``) is refused first: one line, no ``.prev``, no temporary, the artifact as it was."""
    import interp_steer.storage.io as io_mod

    out = tmp_path / "A"
    assert run(["train", "--out", str(out), *TRAIN_ARGS], capsys)[0] == 0
    real_access = os.access
    if os.geteuid() == 0:
        monkeypatch.setattr(io_mod.os, "access", lambda p, m, **k: Path(p) != out and real_access(p, m, **k))
    out.chmod(0o555)
    try:
        before = tree(tmp_path)
        code, err = run(["train", "--out", str(out), "--overwrite", *TRAIN_ARGS], capsys)
        errors = [ln for ln in err.splitlines() if "error:" in ln]
        assert code == 2 and len(errors) == 1 and "is read-only" in errors[0] and "chmod -R u+w" in errors[0]
        assert tree(tmp_path) == before
    finally:
        out.chmod(0o755)
