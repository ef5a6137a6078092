"""Device and dtype: clear errors before any weight is read, and the adapter's invariants on a bfloat16 model.

bfloat16 runs on the CPU, so its invariants are tested here on every machine; cuda and mps are tested only for
the refusal when they are absent (a machine with one runs the same tests through ``device="auto"``).
"""

import re

import pytest
import torch

from interp_steer.config import ConfigError, DemoRun, EvalRun, LossConfig, TrainConfig, TrainRun
from interp_steer.method import models
from interp_steer.method.adapter import AdapterSpec, apply_adapters, linear_weight, make_adapters, merged_weights
from interp_steer.method.data import persona_pairs, tokenize
from interp_steer.method.models import available_devices, resolve_device, resolve_dtype, tiny_model
from interp_steer.training.loop import train

TEXTS = ["The capital of France is Paris, and the capital of Spain is", "Honesty means", "A short one"]
SPECS = [AdapterSpec("blocks.0.mlp.out", 8), AdapterSpec("blocks.1.attn.q", 8, rotate_u=True),
         AdapterSpec("blocks.2.attn.o", 8, scale="add"), AdapterSpec("blocks.2.mlp.in", 8)]


def test_auto_picks_cuda_then_mps_then_cpu():
    have = available_devices()
    assert have[0] == "cpu"
    expected = "cuda" if "cuda" in have else "mps" if "mps" in have else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")


def test_a_missing_device_is_refused_before_any_weight_is_read(monkeypatch):
    missing = [d for d in ("cuda", "mps") if d not in available_devices()]
    if not missing:
        pytest.skip("this machine has both cuda and mps")

    def read(*a, **kw):
        raise AssertionError("weights or tokenizer were read for a device that is not there")
    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", read)
    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", read)
    monkeypatch.setattr(models, "_default_cache_path", read)
    for d in missing:
        with pytest.raises(ValueError, match=rf"device '{d}' is not available on this machine .*available: cpu"):
            models.load_model(None, device=d)
    with pytest.raises(ValueError, match="not a device name"):
        models.load_model("x", device="tpu")


def test_dtypes_are_named_and_checked_on_the_device(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_dtype(None, cpu) == torch.float32
    assert resolve_dtype("bfloat16", cpu) == torch.bfloat16 == resolve_dtype(torch.bfloat16, cpu)
    with pytest.raises(ValueError, match="dtype 'fp8' is not supported; use one of float32, bfloat16, float16"):
        resolve_dtype("fp8", cpu)
    with pytest.raises(ValueError, match="use one of float32, bfloat16, float16"):
        resolve_dtype(torch.int8, cpu)

    def cannot(device, dtype):
        raise RuntimeError('"addmm_impl" not implemented for \'Half\'')
    monkeypatch.setattr(models, "_probe", cannot)  # what a device without float16 kernels answers
    with pytest.raises(ValueError, match=r"dtype float16 cannot run on device 'cpu' \(RuntimeError: .*addmm"):
        models.load_model("x", device="cpu", dtype="float16")


def test_configs_name_the_allowed_devices_and_dtypes():
    assert TrainRun().device == "auto" and TrainRun().dtype == "float32"
    for cls in (TrainRun, DemoRun):
        with pytest.raises(ConfigError, match=re.escape("device must be one of auto, cpu, cuda, mps, got 'tpu'")):
            cls(device="tpu")
        with pytest.raises(ConfigError, match=re.escape("dtype must be one of float32, bfloat16, float16, got "
                                                        "'fp8'")):
            cls(dtype="fp8")
    with pytest.raises(ConfigError, match="dtype must be"):
        EvalRun(artifact="a", dtype="float64")
    assert TrainRun.from_dict(TrainRun(device="cpu", dtype="bfloat16").to_dict()).dtype == "bfloat16"


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def bf16(request):
    """A bfloat16 tiny model and the same weights in float32 (the reference its rounding is measured against)."""
    b16, tok = tiny_model(seed=0, n_layers=3, family=request.param, dtype="bfloat16")
    b32, _ = tiny_model(seed=0, n_layers=3, family=request.param)
    b32.load_state_dict({k: v.float() for k, v in b16.state_dict().items()})  # bf16 values are exact in float32
    return b16, b32, tok


def logits(bridge, batch):
    return bridge(batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids).float()


def test_bfloat16_adapters_compute_in_float32_and_c_zero_is_bit_exact(bf16, logits_at_c):
    b16, _, tok = bf16
    assert {p.dtype for p in b16.parameters()} == {torch.bfloat16}
    ads = make_adapters(b16, SPECS, init_scale=0.3)
    assert {t.dtype for a in ads for t in (*a.buffers(), *a.parameters())} == {torch.float32}
    base, zero, one = logits_at_c(b16, ads, tokenize(TEXTS, tok))
    assert torch.equal(zero, base)
    assert (one - base).abs().max() > 0.05


def test_bfloat16_merged_equals_hooks_within_the_dtypes_own_rounding(bf16):
    """Merged and hooked bfloat16 runs round differently (W(c) once to bf16, versus x W + Δ per activation), so they
    cannot agree bit for bit. The bound is the dtype's own error: each is within 2× of how far the bf16 base model
    is from the same weights in float32 (measured: that floor is 0.005 on logits of size ~1, i.e. one bf16 ulp;
    hooked − merged ≤ 0.008; the steering effect is 0.1–0.3, twenty times larger)."""
    b16, b32, tok = bf16
    ads16, ads32 = make_adapters(b16, SPECS, init_scale=0.3), make_adapters(b32, SPECS, init_scale=0.3)
    b = tokenize(TEXTS, tok)
    before = {s.site: linear_weight(b16, s.site).clone() for s in SPECS}
    with torch.no_grad():
        floor = (logits(b16, b) - logits(b32, b)).abs().max()
        assert 0 < floor < 0.05
        for c in (1.0, -0.6):
            with apply_adapters(b32, ads32, c):
                truth = logits(b32, b)
            with apply_adapters(b16, ads16, c):
                hooked = logits(b16, b)
            with merged_weights(b16, ads16, c):
                merged = logits(b16, b)
            for name, x in (("hooked", hooked), ("merged", merged)):
                assert (x - truth).abs().max() <= 2 * floor, (name, c, (x - truth).abs().max().item(), floor.item())
            assert (hooked - merged).abs().max() <= 4 * floor
            assert (truth - logits(b32, b)).abs().max() > 20 * floor  # the effect is far above the rounding
    assert all(torch.equal(linear_weight(b16, s), w) for s, w in before.items())  # bf16 weights restored exactly


def test_a_bfloat16_model_trains(bf16, tmp_path):
    b16, _, tok = bf16
    cfg = TrainConfig(layers=(0, 1), loss_layer=2, rank=4, steps=2, batch_pairs=2, n_pairs=8, held_out=0.25,
                      eval_coeffs=(-1.0, 1.0), loss=LossConfig(kl_budget=None))
    result = train(b16, tok, persona_pairs(tok), cfg, tmp_path / "run", progress=False)
    assert len(result.history) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)
    assert all(p.dtype == torch.float32 for p in result.adapters.parameters())
    assert set(result.metrics["held_out"]) == {"-1", "1"}


def test_the_commands_refuse_a_missing_device_before_writing_anything(tmp_path, monkeypatch, capsys):
    from interp_steer.app import cli, commands
    missing = [d for d in ("cuda", "mps") if d not in available_devices()]
    if not missing:
        pytest.skip("this machine has both cuda and mps")

    def refuse(*a, **kw):
        raise AssertionError("a model was loaded for a device that is not there")
    monkeypatch.setattr(commands, "load_model", refuse)
    for argv in (["demo", "--out", str(tmp_path / "d")], ["train", "--out", str(tmp_path / "t")],
                 ["eval", str(tmp_path / "missing-artifact"), "--out", str(tmp_path / "e")]):
        assert cli.main([*argv, "--device", missing[0]]) == 2
        err = capsys.readouterr().err
        assert f"device '{missing[0]}' is not available" in err and "available: cpu" in err
        assert err.count("\n") == 1  # one line
    assert list(tmp_path.iterdir()) == []  # no run directory, no run_config.json
