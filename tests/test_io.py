"""The artifact: every field round-trips, logits are bit-identical after load, every bad directory is refused
by name, and nothing the project did not write is ever deleted."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from interp_steer.config import LossConfig, TrainConfig
from interp_steer.method.adapter import AdapterSpec, apply_adapters, linear_weight, make_adapters
from interp_steer.storage.io import (
    CONFIG_FILE,
    FORMAT_VERSION,
    WEIGHTS_FILE,
    Checkpoint,
    SteeringArtifact,
    load_artifact,
    load_checkpoint,
    save_checkpoint,
    write_dir_atomic,
)
from interp_steer.storage.ownership import MANIFEST

SITES = ["blocks.0.mlp.out", "blocks.1.attn.o", "blocks.2.mlp.in"]


@pytest.fixture
def art(tiny):
    bridge, _ = tiny
    specs = [AdapterSpec(s, rank=4, rotate_u=(i == 1), scale="add" if i == 2 else "exp",
                         bias=("none", "span", "free")[i])
             for i, s in enumerate(SITES)]
    adapters = make_adapters(bridge, specs, init_scale=0.3)
    with torch.no_grad():
        for a in adapters[1:]:
            a.b.normal_(generator=torch.Generator().manual_seed(5))  # bias terms that are not zero
    cfg = TrainConfig(layers=(0, 1), loss_layer=2, rank=4, loss=LossConfig(objective="shift", margin=0.25))
    d = torch.randn(bridge.cfg.d_model, generator=torch.Generator().manual_seed(0))
    return SteeringArtifact.build(bridge, adapters, d / d.norm(), "blocks.2.hook_resid_post", cfg,
                                  {"held_out": {"1": {"shift": 0.5}}, "scale": 2.0},
                                  {"pairs": None, "personas": ["a", "b"]})


def ids(n=3):
    return torch.randint(100, 20000, (n, 7), generator=torch.Generator().manual_seed(1))


def test_round_trip_of_every_field_and_bit_identical_logits(tiny, art, tmp_path):
    bridge, _ = tiny
    art.save(tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE, MANIFEST])
    back = SteeringArtifact.load(tmp_path / "a", bridge)
    assert back.config == art.config and back.loss_hook == art.loss_hook and back.base_model == art.base_model
    assert back.fingerprints == art.fingerprints and back.metrics == art.metrics and back.data == art.data
    assert torch.equal(back.d_steer, art.d_steer)
    assert [a.spec for a in back.adapters] == [a.spec for a in art.adapters]
    for a, b in zip(art.adapters, back.adapters):
        assert a.state_dict().keys() == b.state_dict().keys()
        assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    with torch.no_grad():
        for c in (1.0, -0.5):
            with apply_adapters(bridge, art.adapters, c):
                x = bridge(ids())
            with apply_adapters(bridge, back.adapters, c):
                y = bridge(ids())
            assert torch.equal(x, y)
    assert json.loads((tmp_path / "a" / CONFIG_FILE).read_text())["format_version"] == FORMAT_VERSION


@pytest.mark.parametrize("missing", [CONFIG_FILE, WEIGHTS_FILE])
def test_a_directory_missing_a_file_is_refused_naming_it(art, tmp_path, missing):
    art.save(tmp_path / "a")
    (tmp_path / "a" / missing).unlink()
    with pytest.raises(FileNotFoundError, match=missing):
        load_artifact(tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="not an artifact directory"):
        load_artifact(tmp_path / "nowhere")


def edit_config(path, fn):
    f = path / CONFIG_FILE
    cfg = json.loads(f.read_text())
    f.write_text(json.dumps(fn(cfg)))


@pytest.mark.parametrize("edit, match", [
    (lambda c: {**c, "format_version": 1}, "older interp-steer"),
    (lambda c: {**c, "format_version": FORMAT_VERSION + 1}, "newer interp-steer"),
    (lambda c: {**c, "architecture": "lora"}, "architecture"),
    (lambda c: {**c, "fingerprints": {}}, "fingerprint of finite numbers per adapter site"),
    (lambda c: {**c, "fingerprints": {k: [float("nan")] * 3 for k in c["fingerprints"]}}, "NaN|finite numbers"),
    (lambda c: {**c, "fingerprints": {k: [1e400, 0, 0] for k in c["fingerprints"]}}, "Infinity|finite numbers"),
    (lambda c: {k: v for k, v in c.items() if k != "loss_hook"}, r"missing keys \['loss_hook'\]"),
    (lambda c: {**c, "train_config": {**c["train_config"], "lr": "fast"}}, "lr must be a number"),
    (lambda c: {**c, "adapters": [{"site": "blocks.0.mlp.out"}]}, "must have the keys"),
    (lambda c: [1, 2], "expected a JSON object"),
])
def test_a_bad_config_is_refused_with_a_message(art, tmp_path, edit, match):
    art.save(tmp_path / "a")
    edit_config(tmp_path / "a", edit)
    with pytest.raises(ValueError, match=match):
        load_artifact(tmp_path / "a")


def test_an_artifact_written_before_a_field_existed_reads_as_it_was_trained(art, tmp_path):
    """``triplets`` defaults to 'aligned' now; an artifact saved before the field existed rotated the top ones."""
    assert TrainConfig().triplets == "aligned"
    art.save(tmp_path / "a")
    edit_config(tmp_path / "a", lambda c: {**c, "train_config": {k: v for k, v in c["train_config"].items()
                                                                   if k != "triplets"}})
    assert load_artifact(tmp_path / "a").config.triplets == "top"
    art.save(tmp_path / "b")  # a field that is written wins
    edit_config(tmp_path / "b", lambda c: {**c, "train_config": {**c["train_config"], "triplets": "aligned"}})
    assert load_artifact(tmp_path / "b").config.triplets == "aligned"


def test_an_adapter_spec_written_before_the_bias_term_existed_has_none(art, tmp_path):
    art.save(tmp_path / "a")
    edit_config(tmp_path / "a", lambda c: {**c, "adapters": [
        {k: v for k, v in d.items() if not (k == "bias" and v == "none")} for d in c["adapters"]]})
    assert load_artifact(tmp_path / "a").config.bias == "none"  # the fixture's TrainConfig has the default
    edit_config(tmp_path / "a", lambda c: {**c, "train_config": {**c["train_config"], "bias": "span"}})
    assert load_artifact(tmp_path / "a").config.bias == "span"  # a written field wins
    edit_config(tmp_path / "a", lambda c: {**c, "train_config": {k: v for k, v in c["train_config"].items()
                                                                   if k != "bias"}})
    assert load_artifact(tmp_path / "a").config.bias == "none"  # a missing one is what it was before the field
    back = load_artifact(tmp_path / "a")
    assert [a.spec for a in back.adapters] == [a.spec for a in art.adapters]
    assert [a.b is None for a in back.adapters] == [True, False, False]


def test_garbage_and_truncated_files_are_refused_naming_the_file(art, tmp_path):
    art.save(tmp_path / "a")
    (tmp_path / "a" / CONFIG_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="config.json: not a readable"):
        load_artifact(tmp_path / "a")
    art.save(tmp_path / "b")
    w = tmp_path / "b" / WEIGHTS_FILE
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(ValueError, match="adapter.safetensors: not a readable safetensors"):
        load_artifact(tmp_path / "b")


@pytest.mark.parametrize("change, match", [
    (lambda t: {**t, "blocks.0.mlp.out.lam": torch.full_like(t["blocks.0.mlp.out.lam"], float("nan"))}, "NaN or inf"),
    (lambda t: {k: v for k, v in t.items() if k != "blocks.1.attn.o.theta_u"}, "'blocks.1.attn.o.theta_u' is "
                                                                               "missing"),
    (lambda t: {**t, "blocks.0.mlp.out.theta_v": torch.zeros(3, 3)}, "has shape"),
    (lambda t: {k: v for k, v in t.items() if k != "d_steer"}, "d_steer"),
    (lambda t: {**t, "extra": torch.zeros(1)}, "unexpected tensors"),
])
def test_bad_tensors_are_refused(art, tmp_path, change, match):
    art.save(tmp_path / "a")
    w = tmp_path / "a" / WEIGHTS_FILE
    save_file(change(load_file(str(w))), str(w))
    with pytest.raises(ValueError, match=match):
        load_artifact(tmp_path / "a")


def test_load_refuses_another_models_weights(tiny, art, tmp_path):
    bridge, _ = tiny
    art.save(tmp_path / "a")
    with torch.no_grad():
        linear_weight(bridge, SITES[0]).mul_(1.01)
    with pytest.raises(ValueError, match="differ from those it was trained on"):
        load_artifact(tmp_path / "a", bridge)
    edit_config(tmp_path / "a", lambda c: {**c, "base_model": "someone/else"})
    with pytest.raises(ValueError, match="someone/else"):
        load_artifact(tmp_path / "a", bridge)


def test_saving_never_deletes_or_overwrites_what_the_project_did_not_write(art, tmp_path):
    thesis = tmp_path / "thesis"
    (thesis / "sub").mkdir(parents=True)
    (thesis / "thesis.tex").write_text("precious")
    (thesis / "sub" / "data.csv").write_text("1,2")
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match="did not write"):
            art.save(thesis, overwrite=overwrite)
    assert (thesis / "thesis.tex").read_text() == "precious" and (thesis / "sub" / "data.csv").read_text() == "1,2"
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        art.save(tmp_path / "file")
    assert (tmp_path / "file").read_text() == "x"
    art.save(tmp_path / "a")
    with pytest.raises(FileExistsError, match="--overwrite"):
        art.save(tmp_path / "a")
    art.save(tmp_path / "a", overwrite=True)
    (tmp_path / "empty").mkdir()
    art.save(tmp_path / "empty")  # an empty directory is fine
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "empty", "file", "thesis"]


def test_an_interrupted_write_leaves_the_old_directory_whole_and_no_debris(art, tmp_path):
    art.save(tmp_path / "a")
    before = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}

    def boom(path):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_dir_atomic(tmp_path / "a", {CONFIG_FILE: lambda p: p.write_text("{}"), WEIGHTS_FILE: boom},
                         overwrite=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_checkpoint_round_trip(tiny, art, tmp_path):
    bridge, _ = tiny
    opt = torch.optim.AdamW(art.adapters.parameters(), lr=0.1)
    sum(p.sum() for p in art.adapters.parameters()).backward()
    opt.step()
    save_checkpoint(tmp_path / "c", Checkpoint(art, opt.state_dict(), 7, 1.5))
    back = load_checkpoint(tmp_path / "c", bridge)
    assert back.step == 7 and back.scale == 1.5 and back.artifact.config == art.config
    state, want = back.optimizer["state"], opt.state_dict()["state"]
    assert state.keys() == want.keys() and all(torch.equal(state[i][k], want[i][k]) for i in want for k in want[i])
    assert load_checkpoint(tmp_path / "none", bridge) is None


def test_d_steer_lives_in_the_stream_whatever_the_first_site_writes(tiny, tmp_path):
    """An artifact whose first adapter writes d_mlp features (mlp.in) still round-trips; a d_steer of the wrong
    size is refused against the model."""
    bridge, _ = tiny
    adapters = make_adapters(bridge, [AdapterSpec("blocks.0.mlp.in", rank=4)], init_scale=0.3)
    art = SteeringArtifact.build(bridge, adapters, torch.ones(bridge.cfg.d_model), "blocks.2.hook_resid_post",
                                 TrainConfig(site="mlp.in", triplets="top", layers=(0,), loss_layer=2, rank=4))
    art.save(tmp_path / "a")
    assert torch.equal(SteeringArtifact.load(tmp_path / "a", bridge).d_steer, art.d_steer)
    art.d_steer = torch.ones(3)
    with pytest.raises(ValueError, match="d_model is 64"):
        art.check_model(bridge)


def test_an_artifact_config_with_a_key_given_twice_is_refused(art, tmp_path):
    """JSON keeps the last of two equal keys silently; an artifact holding one is not what it seems."""
    art.save(tmp_path / "a")
    f = tmp_path / "a" / CONFIG_FILE
    text = f.read_text()
    f.write_text(text.replace('"loss_hook":', '"loss_hook": "blocks.0.hook_resid_post", "loss_hook":', 1))
    with pytest.raises(ValueError, match="the key 'loss_hook' appears twice"):
        load_artifact(tmp_path / "a")


@pytest.mark.parametrize("edit, match", [
    (lambda c: {**c, "metrics": [1, 2, 3]}, "'metrics' must be a JSON object, got list"),
    (lambda c: {**c, "data": "hello"}, "'data' must be a JSON object, got str"),
    (lambda c: {**c, "adapters": []}, "'adapters' must be a non-empty list"),
    (lambda c: {**c, "adapters": c["adapters"] + c["adapters"][:1]}, "appear more than once"),
    (lambda c: {**c, "adapters": [{**c["adapters"][0], "rank": 4.0}] + c["adapters"][1:]},
     "rank must be an integer >= 1, got 4.0"),
    (lambda c: {**c, "format_version": str(FORMAT_VERSION)}, "format_version must be an integer"),
    (lambda c: {**c, "train_config": {**c["train_config"], "loss_layer": 999}}, "loss_layer 999 contradicts"),
])
def test_an_artifact_whose_fields_are_of_the_wrong_kind_or_contradict_is_refused_by_name(art, tmp_path, edit,
                                                                                          match):
    art.save(tmp_path / "a")
    edit_config(tmp_path / "a", edit)
    with pytest.raises(ValueError, match=re.escape(match)):
        load_artifact(tmp_path / "a")


def test_the_artifact_applies_itself_and_refuses_other_weights(art, tiny):
    """``with art.apply(bridge, c)`` is ``apply_adapters`` after the weight check; c = 0 exact, hooks removed."""
    bridge, _ = tiny
    x = ids()
    base = bridge(x)
    with art.apply(bridge, 0.0):
        assert torch.equal(bridge(x), base)
    with art.apply(bridge, 1.0):
        steered = bridge(x)
    with apply_adapters(bridge, art.adapters, 1.0):
        assert torch.equal(bridge(x), steered)
    assert not torch.allclose(steered, base) and torch.equal(bridge(x), base)
    W = linear_weight(bridge, SITES[0])
    orig = W.detach().clone()
    with torch.no_grad():
        W.add_(1e-3)
        try:
            with pytest.raises(ValueError, match="differ from those it was trained on"):
                art.apply(bridge, 1.0)
        finally:
            W.copy_(orig)


@pytest.mark.parametrize("damage, match", [
    (lambda t: {**t, "scale": 0}, "scale > 0"),
    (lambda t: {**t, "step": True}, "step >= 0"),
    (lambda t: {**t, "duals": ["x"]}, "duals: finite numbers"),
    (lambda t: {**t, "param_groups": [1]}, "param_groups: a list of objects"),
    (lambda t: "garbage", "expected {step"),
])
def test_a_damaged_checkpoint_is_refused_with_the_fix(tiny, art, tmp_path, damage, match):
    """`--resume` from a trainer file someone edited or a disk damaged: one message naming the file and the fix
    (remove it or restore it), never a raw KeyError or a hint to lower the learning rate."""
    from interp_steer.storage.io import TRAINER_FILE

    bridge, _ = tiny
    opt = torch.optim.AdamW(art.adapters.parameters(), lr=0.1)
    save_checkpoint(tmp_path / "c", Checkpoint(art, opt.state_dict(), 3, 1.0, [0.5, 0.25]))
    f = tmp_path / "c" / TRAINER_FILE
    f.write_text(json.dumps(damage(json.loads(f.read_text()))))
    with pytest.raises(ValueError, match=re.escape(match) + ".*is damaged: remove it"):
        load_checkpoint(tmp_path / "c", bridge)
