"""Exports that serve: a merged HF model and a peft LoRA give the hooked model's logits at c; a llama.cpp control
vector reads back exactly and lands where llama.cpp adds it; bad input is refused before anything is written."""

import json

import numpy as np
import peft  # the test extra has it (pyproject): a missing peft fails here, it is not skipped
import pytest
import torch
from transformers import AutoModelForCausalLM

from interp_steer.app import cli, commands
from interp_steer.config import ConfigError, ExportRun, LossConfig, TrainConfig
from interp_steer.method.adapter import AdapterSpec, apply_adapters, make_adapters
from interp_steer.method.directions import SteeringVector
from interp_steer.method.models import tiny_model
from interp_steer.names import resid_post
from interp_steer.storage.exports import (
    CONTROL_VECTOR_FILE,
    LORA_CONFIG_FILE,
    LORA_WEIGHTS_FILE,
    MANIFEST_FILE,
    control_vector_layers,
    hf_module_name,
    hf_state_dict,
    read_control_vector,
    read_manifest,
    save_control_vector,
    save_lora,
    save_merged,
)
from interp_steer.storage.io import SteeringArtifact, model_name, write_dir_atomic
from interp_steer.storage.ownership import MANIFEST, why_not_owned

SITES = ["blocks.0.mlp.out", "blocks.1.attn.q", "blocks.1.attn.o", "blocks.2.mlp.in"]
TOL = 1e-4  # float32


@pytest.fixture
def adapters(tiny):
    bridge, _ = tiny
    specs = [AdapterSpec(s, rank=4, rotate_u=(i == 1), scale="add" if i == 3 else "exp") for i, s in enumerate(SITES)]
    return make_adapters(bridge, specs, init_scale=0.3)  # large θ, λ: ΔW far from 0, so a wrong export shows


def ids():
    return torch.randint(100, 20000, (2, 9), generator=torch.Generator().manual_seed(1))


def hooked_logits(bridge, adapters, c):
    with torch.no_grad(), apply_adapters(bridge, adapters, c):
        return bridge(ids())


def fresh_base(bridge):
    """A plain HF model (no bridge) holding the tiny model's weights: what a server loads as the base."""
    base = AutoModelForCausalLM.from_config(bridge.original_model.config)
    base.load_state_dict({k: v.clone() for k, v in hf_state_dict(bridge).items()})
    return base.eval()


def test_sites_are_named_by_the_hf_modules_behind_them(tiny):
    bridge, _ = tiny
    assert hf_module_name(bridge, "blocks.0.mlp.out") == "model.layers.0.mlp.down_proj"
    assert hf_module_name(bridge, "blocks.2.mlp.in") == "model.layers.2.mlp.up_proj"
    assert hf_module_name(bridge, "blocks.2.mlp.gate") == "model.layers.2.mlp.gate_proj"
    assert hf_module_name(bridge, "blocks.1.attn.q") == "model.layers.1.self_attn.q_proj"
    assert hf_module_name(bridge, "blocks.1.attn.o") == "model.layers.1.self_attn.o_proj"


@pytest.mark.parametrize("c", [1.0, -0.7])
def test_merged_export_loads_in_plain_transformers_and_matches_the_hooks(tiny, adapters, tmp_path, c):
    bridge, tok = tiny
    out = save_merged(bridge, tok, adapters, c, tmp_path / "m", manifest={"base_model": "tiny"})
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        merged = model(ids()).logits
    hooked = hooked_logits(bridge, adapters, c)
    assert (merged - hooked).abs().max().item() < TOL
    assert (hooked - bridge(ids())).abs().max().item() > 100 * TOL  # the steer is not a no-op
    assert {"config.json", "model.safetensors", "tokenizer.json", MANIFEST_FILE} <= {p.name for p in out.iterdir()}
    assert read_manifest(out)["coeff"] == c and read_manifest(out)["format"] == "merged"
    # the tokenizer came along
    assert tok("Hello there")["input_ids"] == type(tok).from_pretrained(out)("Hello there")["input_ids"]


def test_merging_leaves_the_live_model_as_it_was(tiny, adapters, tmp_path):
    bridge, tok = tiny
    before = {k: v.clone() for k, v in hf_state_dict(bridge).items()}
    save_merged(bridge, tok, adapters, 1.0, tmp_path / "m")
    assert all(torch.equal(before[k], v) for k, v in hf_state_dict(bridge).items())


@pytest.mark.parametrize("c", [1.0, -1.0])
def test_lora_export_is_exact_in_peft(tiny, adapters, tmp_path, c):
    bridge, _ = tiny
    out = save_lora(bridge, adapters, c, tmp_path / "l", base_model="tiny")
    cfg = json.loads((out / LORA_CONFIG_FILE).read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 4 and cfg["peft_type"] == "LORA"
    model = peft.PeftModel.from_pretrained(fresh_base(bridge), out).eval()
    with torch.no_grad():
        lora = model(ids()).logits
    assert (lora - hooked_logits(bridge, adapters, c)).abs().max().item() < TOL
    # every site became a LoRA layer of peft's: nothing was dropped as an unknown key
    wrapped = {n.removeprefix("base_model.model.") for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == {hf_module_name(bridge, s) for s in SITES}


@pytest.mark.filterwarnings("ignore:`lora_bias=True` was passed")  # peft: such a LoRA cannot be merged by peft
def test_an_adapter_bias_term_exports_as_peft_lora_bias_and_is_refused_as_merged(tiny, tmp_path):
    bridge, tok = tiny
    specs = [AdapterSpec("blocks.0.mlp.out", rank=4, bias="free"), AdapterSpec("blocks.1.attn.q", rank=4),
             AdapterSpec("blocks.2.mlp.out", rank=4, bias="span"),
             AdapterSpec("blocks.1.mlp.out", rank=1, bias="only")]
    ads = make_adapters(bridge, specs, init_scale=0.3)
    with torch.no_grad():
        for k, seed in ((0, 6), (2, 7), (3, 8)):
            ads[k].b.normal_(generator=torch.Generator().manual_seed(seed))
    for c in (1.0, -1.0):
        out = save_lora(bridge, ads, c, tmp_path / f"l{c}", base_model="tiny")
        assert json.loads((out / LORA_CONFIG_FILE).read_text())["lora_bias"] is True
        model = peft.PeftModel.from_pretrained(fresh_base(bridge), out).eval()
        with torch.no_grad():
            lora = model(ids()).logits
        hooked = hooked_logits(bridge, ads, c)
        assert (lora - hooked).abs().max().item() < TOL
        with torch.no_grad():
            saved = [ads[k].b.clone() for k in (0, 2, 3)]
            for k in (0, 2, 3):
                ads[k].b.zero_()
            without = hooked_logits(bridge, ads, c)
            for k, b in zip((0, 2, 3), saved):
                ads[k].b.copy_(b)
        assert (hooked - without).abs().max().item() > 100 * TOL  # the bias terms really are in the export
    with pytest.raises(ValueError, match="no bias to merge"):
        save_merged(bridge, tok, ads, 1.0, tmp_path / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l-1.0", "l1.0"]  # no merged directory, no debris


def test_the_lora_factors_are_the_merge_and_have_rank_r(adapters):
    for a in adapters:
        B, A = a.factors(0.8)
        W = torch.randn(a.U.shape[0], a.V.shape[0], generator=torch.Generator().manual_seed(2))
        assert torch.allclose(W + B @ A, a.merge(W, 0.8), atol=1e-6)
        assert B.shape == (a.U.shape[0], a.spec.rank) and A.shape == (a.spec.rank, a.V.shape[0])
        assert torch.equal(a.factors(0.0)[0], torch.zeros_like(B))  # c = 0: ΔW = 0 exactly


def test_two_loras_at_plus_and_minus_one_serve_side_by_side(tiny, adapters, tmp_path):
    """A multi-LoRA server keeps both directions over one base: switching adapters switches the steer."""
    bridge, _ = tiny
    save_lora(bridge, adapters, 1.0, tmp_path / "up", base_model="tiny")
    save_lora(bridge, adapters, -1.0, tmp_path / "down", base_model="tiny")
    model = peft.PeftModel.from_pretrained(fresh_base(bridge), tmp_path / "up", adapter_name="up").eval()
    model.load_adapter(tmp_path / "down", adapter_name="down")
    with torch.no_grad():
        for name, c in (("up", 1.0), ("down", -1.0)):
            model.set_adapter(name)
            assert (model(ids()).logits - hooked_logits(bridge, adapters, c)).abs().max().item() < TOL


def vector(bridge, layers):
    g = torch.Generator().manual_seed(3)
    dirs = {resid_post(L): torch.nn.functional.normalize(torch.randn(bridge.cfg.d_model, generator=g), dim=0)
            for L in layers}
    return SteeringVector(dirs, {n: 2.0 + i for i, n in enumerate(dirs)})


def test_control_vector_reads_back_exactly(tiny, tmp_path):
    bridge, _ = tiny
    vec = vector(bridge, [1, 2])
    out = save_control_vector(vec, -0.3, tmp_path / "cv", n_layers=bridge.cfg.n_layers, model_hint="llama")
    back, meta = read_control_vector(out)
    want = control_vector_layers(vec, -0.3, bridge.cfg.n_layers)
    assert list(back) == [1, 2] and all(torch.equal(back[L], want[L]) for L in want)  # bit for bit
    assert torch.allclose(want[2], -0.3 * 3.0 * vec.directions[resid_post(2)])
    assert meta["general.architecture"] == "controlvector"
    assert meta["controlvector.model_hint"] == "llama" and meta["controlvector.layer_count"] == 2
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, CONTROL_VECTOR_FILE, MANIFEST_FILE]


def test_control_vector_lands_where_llama_cpp_adds_it(tiny, tmp_path):
    """llama.cpp adds direction.N to the output of its layer N (0-based: `build_cvec(cur, il)` closes layer il).
    Emulate that on the plain HF model, reading the GGUF back: the logits equal the steering vector's at
    blocks.N.hook_resid_post. The other reading of the index (direction.N after layer N − 1) does not."""
    bridge, _ = tiny
    vec = vector(bridge, [1, 2])
    out = save_control_vector(vec, 0.5, tmp_path / "cv", n_layers=bridge.cfg.n_layers, model_hint="llama")
    back, _ = read_control_vector(out)
    base = fresh_base(bridge)

    def add(v):
        def hook(module, inputs, output):
            return (output[0] + v,) + tuple(output[1:]) if isinstance(output, tuple) else output + v
        return hook

    def llama_cpp_logits(offset):
        handles = [base.model.layers[N + offset].register_forward_hook(add(v)) for N, v in back.items()]
        try:
            with torch.no_grad():
                return base(ids()).logits
        finally:
            for h in handles:
                h.remove()

    with torch.no_grad(), vec.scaled(0.5).apply(bridge):
        hooked = bridge(ids())
    assert (llama_cpp_logits(0) - hooked).abs().max().item() < TOL
    assert (llama_cpp_logits(-1) - hooked).abs().max().item() > 100 * TOL


def test_control_vectors_llama_cpp_cannot_hold_are_refused(tiny, tmp_path):
    bridge, _ = tiny
    with pytest.raises(ValueError, match="direction.0 is refused"):
        save_control_vector(vector(bridge, [0, 1]), 1.0, tmp_path / "cv", n_layers=3, model_hint="llama")
    bad = SteeringVector({"blocks.1.hook_resid_mid": torch.ones(bridge.cfg.d_model)},
                         {"blocks.1.hook_resid_mid": 1.0})
    with pytest.raises(ValueError, match="not a blocks.N.hook_resid_post"):
        save_control_vector(bad, 1.0, tmp_path / "cv", n_layers=3, model_hint="llama")
    with pytest.raises(ValueError, match="finite"):
        save_control_vector(vector(bridge, [1]), float("nan"), tmp_path / "cv", n_layers=3, model_hint="llama")
    assert not (tmp_path / "cv").exists()


def test_exports_never_replace_what_they_did_not_write(tiny, adapters, tmp_path):
    bridge, tok = tiny
    foreign = tmp_path / "thesis"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match="did not write"):
            save_lora(bridge, adapters, 1.0, foreign, base_model="tiny", overwrite=overwrite)
    assert [p.name for p in foreign.iterdir()] == ["thesis.tex"]
    save_lora(bridge, adapters, 1.0, tmp_path / "l", base_model="tiny")
    with pytest.raises(FileExistsError, match="already holds an export"):
        save_lora(bridge, adapters, -1.0, tmp_path / "l", base_model="tiny")
    save_merged(bridge, tok, adapters, -1.0, tmp_path / "l", overwrite=True)  # an export replaces an export
    assert read_manifest(tmp_path / "l")["format"] == "merged"
    assert not (tmp_path / "l" / LORA_WEIGHTS_FILE).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l", "thesis"]  # no temporary left behind


def test_a_failed_export_leaves_nothing(tiny, adapters, tmp_path, monkeypatch):
    bridge, tok = tiny
    monkeypatch.setattr(type(tok), "save_pretrained", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        save_merged(bridge, tok, adapters, 1.0, tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_every_file_a_directory_writer_writes_is_in_its_manifest_and_only_those_are_replaced(tmp_path):
    def fill(d):
        (d / "config.json").write_text("{}")
        (d / "notes.txt").write_text("any name: the manifest, not the name, says it is ours")
    out = write_dir_atomic(tmp_path / "e", fill)
    assert why_not_owned(out) is None
    write_dir_atomic(out, fill, overwrite=True)  # ours, unchanged: replaced
    (out / "notes.txt").write_text("edited by the user")
    with pytest.raises(FileExistsError, match="'notes.txt' has changed"):
        write_dir_atomic(out, fill, overwrite=True)
    assert (out / "notes.txt").read_text() == "edited by the user"


# ----------------------------------------------------------------------------------- the command


@pytest.fixture
def artifact(tiny, adapters, tmp_path):
    bridge, _ = tiny
    d = torch.nn.functional.normalize(torch.randn(bridge.cfg.d_model, generator=torch.Generator().manual_seed(0)),
                                      dim=0)
    cfg = TrainConfig(layers=(1, 2), loss_layer=2, rank=4, n_pairs=8, batch_pairs=2,
                      loss=LossConfig(kl_budget=None))
    art = SteeringArtifact.build(bridge, adapters, d, "blocks.2.hook_resid_post", cfg,
                                 data={"model": None, "pairs": None, "personas": None, "concept": "sentiment"})
    return art.save(tmp_path / "art")


def test_export_command_writes_each_format(tiny, adapters, artifact, tmp_path, monkeypatch):
    bridge, _ = tiny
    monkeypatch.setattr(commands, "load_model", lambda name=None, device="auto", dtype=None: tiny)
    assert cli.main(["export", str(artifact), "--out", str(tmp_path / "m"), "--format", "merged",
                     "--coeff", "-1"]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    with torch.no_grad():
        assert (model(ids()).logits - hooked_logits(bridge, adapters, -1.0)).abs().max().item() < TOL
    assert read_manifest(tmp_path / "m")["artifact"] == str(artifact)
    assert cli.main(["export", str(artifact), "--out", str(tmp_path / "l"), "--format", "lora"]) == 0
    assert json.loads((tmp_path / "l" / LORA_CONFIG_FILE).read_text())["r"] == 4
    assert cli.main(["export", str(artifact), "--out", str(tmp_path / "cv"), "--format", "control-vector",
                     "--method", "mean_diff", "--coeff", "0.5"]) == 0
    back, meta = read_control_vector(tmp_path / "cv")
    assert list(back) == [1, 2]  # resid_post of the adapted blocks 1 and 2; block 0 is left out (llama.cpp)
    assert meta["controlvector.model_hint"] == "llama"
    assert all(np.isfinite(v.numpy()).all() and v.norm() > 0 for v in back.values())


def test_export_of_an_artifact_of_other_weights_is_refused(artifact, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(commands, "load_model", lambda name=None, device="auto", dtype=None: tiny_model(seed=1))
    code = cli.main(["export", str(artifact), "--out", str(tmp_path / "m"), "--format", "merged"])
    assert code == 2 and "differ from those it was trained on" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


BAD = [
    (["export", "ART", "--format", "gguf"], "expected one of merged, lora, control-vector"),
    (["export", "ART", "--format", "lora", "--coeff", "nan"], "expected a finite number"),
    (["export", "ART", "--format", "lora", "--coeff", "inf"], "expected a finite number"),
    (["export", "ART", "--format", "lora"], "give --out"),
    (["export", "--out", "X", "--format", "lora"], "give the artifact directory"),
    (["export", "ART", "--out", "X"], "give --format"),
    (["export", "ART", "--out", "X", "--format", "control-vector", "--method", "random"], "expected one of"),
]


@pytest.mark.parametrize("argv, message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_export_options_exit_2_before_any_model(argv, message, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(commands, "load_model", lambda *a, **k: pytest.fail("a model was loaded for a bad input"))
    argv = [str(tmp_path / a) if a in ("ART", "X") else a for a in argv]
    with pytest.raises(SystemExit) as e:
        raise SystemExit(cli.main(argv))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_an_existing_path_and_a_missing_artifact_before_the_model(artifact, tmp_path, monkeypatch,
                                                                                  capsys):
    monkeypatch.setattr(commands, "load_model", lambda *a, **k: pytest.fail("a model was loaded for a bad input"))
    (tmp_path / "thesis").mkdir()
    (tmp_path / "thesis" / "notes.txt").write_text("mine")
    for extra in ([], ["--overwrite"]):
        code = cli.main(["export", str(artifact), "--out", str(tmp_path / "thesis"), "--format", "lora", *extra])
        assert code == 2 and "did not write" in capsys.readouterr().err
    code = cli.main(["export", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--format", "lora"])
    assert code == 2 and "not an artifact directory" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="only for --format control-vector"):
        ExportRun(artifact="a", out="o", format="lora", method="pca_diff")


def test_every_format_is_one_registered_writer_behind_one_signature(tiny, adapters, artifact, tmp_path):
    """``export(artifact, bridge, tok, fmt, c, out)``: the formats the CLI accepts are the registry's, each writes
    what its own writer writes, and what a format cannot do is refused before anything is written."""
    from typing import get_args

    from interp_steer.config import ExportFormat
    from interp_steer.method.data import persona_pairs
    from interp_steer.storage.exports import EXPORTS, export
    from interp_steer.storage.io import load_artifact

    bridge, tok = tiny
    assert get_args(ExportFormat) == tuple(EXPORTS)
    art = load_artifact(artifact)
    via = export(art, bridge, tok, "lora", -1.0, tmp_path / "via")
    direct = save_lora(bridge, art.adapters, -1.0, tmp_path / "direct", base_model="tiny")
    assert json.loads((via / LORA_CONFIG_FILE).read_text()) == {
        **json.loads((direct / LORA_CONFIG_FILE).read_text()), "base_model_name_or_path": model_name(bridge)}
    assert (via / LORA_WEIGHTS_FILE).read_bytes() == (direct / LORA_WEIGHTS_FILE).read_bytes()
    with pytest.raises(ValueError, match="unknown export format 'gguf'; registered: merged, lora, control-vector"):
        export(art, bridge, tok, "gguf", 1.0, tmp_path / "x")
    with pytest.raises(ValueError, match="pass method="):
        export(art, bridge, tok, "control-vector", 1.0, tmp_path / "x")
    with pytest.raises(ValueError, match="training pairs: pass pairs="):
        export(art, bridge, tok, "control-vector", 1.0, tmp_path / "x", method="mean_diff")
    cv = export(art, bridge, tok, "control-vector", 0.5, tmp_path / "cv", method="mean_diff",
                pairs=persona_pairs(tok))
    assert list(read_control_vector(cv)[0]) == [1, 2]
    assert not (tmp_path / "x").exists()
