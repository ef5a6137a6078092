"""Exports that serve: a steer at a chosen coefficient c, in formats other tools load without interp-steer.

- **merged** — a Hugging Face model directory with ``W(c) = W + ΔW(c)`` baked into every adapted linear layer
  (``adapter.merged_weights``); ``AutoModelForCausalLM.from_pretrained(DIR)`` loads it, lm-evaluation-harness and
  any server run it as a plain model.
- **lora** — ``ΔW(c) = U (R_u(c) diag(S_c) R(c)ᵀ − diag S) Vᵀ`` has rank ≤ r, so it *is* a LoRA:
  ``B = U (R_u diag(S_c) Rᵀ − diag S)`` (d_out × r), ``A = Vᵀ`` (r × d_in) (``SVDAdapter.factors``), written in
  peft's format with ``lora_alpha = r`` so that peft's scaling α/r is 1 and ``W x + B A x = W(c) x``. One
  directory per c; a multi-LoRA server holds c = +1 and c = −1 side by side over one base model. An adapter's bias
  term ``c·b`` (``bias`` 'free' or 'span') goes into ``lora_B.bias`` (peft's ``lora_bias``); a merged export of
  it needs the layer to have a bias (GPT-2's do; Llama's ``down_proj`` does not) and is refused otherwise.
- **control-vector** — an additive steer ``h_L ← h_L + c · scale_L · d_L`` (every position) as a llama.cpp control
  vector: a GGUF file with ``general.architecture = "controlvector"``, ``controlvector.model_hint``,
  ``controlvector.layer_count`` and one F32 tensor ``direction.N`` per layer. llama.cpp adds ``direction.N`` to the
  output of its layer N, counted from 0 (``build_cvec(cur, il)`` at the end of layer ``il``; the loader puts
  ``direction.N`` where layer ``il = N`` reads it, and refuses N = 0). That is TransformerLens'
  ``blocks.N.hook_resid_post``, so a vector at ``blocks.N.hook_resid_post`` is written as ``direction.N``, and
  layer 0 cannot be exported (README, "Export").

Every export is one directory, written into a temporary sibling and renamed into place (``io.write_dir_atomic``),
with ``export.json`` saying what it holds (format, c, method, the artifact and base model it came from).

Each format is one registered ``ExportFormatSpec`` (``EXPORTS``), called through one signature,
``export(artifact, bridge, tokenizer, fmt, c, out, ...)``; a new format is one writer and one ``register_export``
(CONTRIBUTING.md, "Where to add things"). The ``save_*`` functions beneath are the formats' own writers, for
adapters that are not (yet) an artifact.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import gguf
import numpy as np
import torch
from jaxtyping import Float
from safetensors.torch import save_file
from torch import Tensor, nn
from transformer_lens.model_bridge import TransformerBridge
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from ..method.adapter import SVDAdapter, linear_weight, merged_weights
from ..method.data import ContrastivePair, pair_batches, select_pairs
from ..method.directions import SteeringVector, additive_vector
from ..method.states import capture
from ..names import layer_of, resid_post, site_layer
from ..registry import Registry
from .io import SteeringArtifact, json_text, model_name, read_json, write_dir_atomic

EXPORT_FORMAT_VERSION = 1
MANIFEST_FILE = "export.json"
LORA_CONFIG_FILE = "adapter_config.json"       # peft's names: PeftModel.from_pretrained and vLLM read these
LORA_WEIGHTS_FILE = "adapter_model.safetensors"
CONTROL_VECTOR_FILE = "control_vector.gguf"
CONTROL_VECTOR_ARCH = "controlvector"           # llama.cpp's `general.architecture` of a control vector


def check_coeff(c: float) -> float:
    if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c):
        raise ValueError(f"coeff must be a finite number, got {c!r}")
    return float(c)


def check_finite(tensors: Mapping[str, Tensor], c: float) -> None:
    """Refuse to write tensors that are not finite (a coefficient so large that exp(c·λ) or c·d overflows)."""
    bad = [k for k, t in tensors.items() if not bool(torch.isfinite(t).all())]
    if bad:
        raise ValueError(f"at coeff {c:g} the export's tensors are not finite ({len(bad)} of {len(tensors)}, e.g. "
                         f"{bad[0]}); use a smaller --coeff (the steer is meant for |c| of about 1)")


# ------------------------------------------------------------------------------------- HF names

def _skeleton(bridge: TransformerBridge) -> nn.Module:
    """The bare HF model of the bridge's config on the meta device: its names, without the bridge's wrappers."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(bridge.original_model.config)


def hf_module_names(bridge: TransformerBridge, sites: Iterable[str]) -> dict[str, str]:
    """The HF module path behind each site (``blocks.3.mlp.out`` → ``model.layers.3.mlp.down_proj`` on Llama).

    Asked of the bridge, not a table: the module a site wraps is found by identity in the HF model, and the
    bridge's ``_original_component`` hops are dropped from its path (as TransformerLens does for state dicts);
    of the aliases left, the one a bare HF model of this config has is the name.
    """
    names = {n for n, _ in _skeleton(bridge).named_modules()}
    paths: dict[int, list[str]] = {}
    for path, m in bridge.original_model.named_modules(remove_duplicate=False):
        paths.setdefault(id(m), []).append(path.replace("._original_component", ""))
    out = {}
    for site in sites:
        module = getattr(bridge.get_submodule(site), "original_component", None)
        if not isinstance(module, nn.Linear):
            raise ValueError(f"site {site!r} is not an nn.Linear (found {type(module).__name__}); only linear "
                             "layers can be exported as LoRA")
        found = sorted(set(paths.get(id(module), [])) & names)
        if len(found) != 1:
            raise ValueError(f"cannot name the HF module behind {site!r} (candidates {found})")
        out[site] = found[0]
    return out


def hf_module_name(bridge: TransformerBridge, site: str) -> str:
    """``hf_module_names`` of one site."""
    return hf_module_names(bridge, [site])[site]


def hf_state_dict(bridge: TransformerBridge) -> dict[str, Tensor]:
    """The bridge's HF weights under the HF model's own names (live tensors: what the model holds right now)."""
    want = set(_skeleton(bridge).state_dict())
    out: dict[str, Tensor] = {}
    for key, value in bridge.original_model.state_dict().items():
        clean = key.replace("._original_component", "")
        if clean in want and clean not in out:
            out[clean] = value
    missing = sorted(want - set(out))
    if missing:
        raise ValueError(f"the bridge does not expose HF weights {missing[:5]}; cannot export this model")
    return out


# ------------------------------------------------------------------------------------------- writers

def _manifest(fmt: str, c: float, extra: Mapping[str, Any] | None) -> dict:
    return {"export_format_version": EXPORT_FORMAT_VERSION, "format": fmt, "coeff": c, **(extra or {})}


def _write_dir(out: str | Path, fill: Callable[[Path], None], overwrite: bool) -> Path:
    return write_dir_atomic(out, fill, overwrite, what="an export")


def save_merged(bridge: TransformerBridge, tokenizer: PreTrainedTokenizerBase, adapters: Iterable[SVDAdapter],
                c: float, out: str | Path, *, overwrite: bool = False, manifest: Mapping[str, Any] | None = None
                ) -> Path:
    """A plain HF model directory (safetensors, config, tokenizer) whose weights are ``W(c)`` at every site.

    >>> save_merged(bridge, tok, art.adapters, 1.0, "runs/honesty-merged+1")  # doctest: +SKIP
    """
    c = check_coeff(c)
    adapters = list(adapters)
    hf = bridge.original_model
    skeleton = _skeleton(bridge)
    skeleton.generation_config = hf.generation_config
    text = json_text(_manifest("merged", c, {**(manifest or {}), "sites": [a.site for a in adapters]}))

    check_finite({a.site: a.merge(linear_weight(bridge, a.site).detach(), c) for a in adapters}, c)

    def fill(tmp: Path) -> None:
        with merged_weights(bridge, adapters, c):  # the originals come back on exit, also on error
            state = {k: v.detach().contiguous() for k, v in hf_state_dict(bridge).items()}
            skeleton.save_pretrained(tmp, state_dict=state)  # the skeleton lends names and config, no memory
        tokenizer.save_pretrained(tmp)
        (tmp / MANIFEST_FILE).write_text(text)

    return _write_dir(out, fill, overwrite)


def lora_tensors(bridge: TransformerBridge, adapters: Iterable[SVDAdapter], c: float
                 ) -> tuple[dict[str, Tensor], dict[str, int]]:
    """peft's tensors for ``ΔW(c) = B A`` at every site, and the rank of each HF module.

    Adapters with a bias term (``bias`` 'free' or 'span') write ``c·b`` as ``lora_B.bias`` (peft's ``lora_bias``);
    when any adapter has one, every module gets a ``lora_B.bias`` (zeros where its adapter has none)."""
    adapters = list(adapters)
    modules = hf_module_names(bridge, [a.site for a in adapters])
    with_bias = any(a.b is not None for a in adapters)
    tensors, ranks = {}, {}
    for a in adapters:
        name = modules[a.site]
        B, A = a.factors(c)
        tensors[f"base_model.model.{name}.lora_A.weight"] = A.detach().float().contiguous()  # r × d_in
        tensors[f"base_model.model.{name}.lora_B.weight"] = B.detach().float().contiguous()  # d_out × r
        if with_bias:
            db = a.bias_delta(c)
            db = torch.zeros(B.shape[0], dtype=B.dtype, device=B.device) if db is None else db
            tensors[f"base_model.model.{name}.lora_B.bias"] = db.detach().float().contiguous()
        ranks[name] = a.spec.rank
    return tensors, ranks


def lora_config(ranks: Mapping[str, int], base_model: str, lora_bias: bool = False) -> dict:
    """peft's ``adapter_config.json``: ``lora_alpha = r`` for every module, so peft's scaling α/r is exactly 1."""
    r = max(ranks.values())
    odd = {name: k for name, k in ranks.items() if k != r}
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": r, "lora_alpha": r, "rank_pattern": odd, "alpha_pattern": dict(odd),
        "target_modules": sorted(ranks), "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "modules_to_save": None, "init_lora_weights": True,
        "inference_mode": True, "lora_bias": lora_bias,
    }


def save_lora(bridge: TransformerBridge, adapters: Iterable[SVDAdapter], c: float, out: str | Path, *,
              base_model: str, overwrite: bool = False, manifest: Mapping[str, Any] | None = None) -> Path:
    """A peft LoRA directory for the steer at ``c``: ``PeftModel.from_pretrained(base, DIR)`` is the steered model.

    >>> save_lora(bridge, art.adapters, -1.0, "runs/honesty-lora-1", base_model="HuggingFaceTB/SmolLM2-135M-Instruct")  # doctest: +SKIP
    """
    c = check_coeff(c)
    adapters = list(adapters)
    tensors, ranks = lora_tensors(bridge, adapters, c)
    check_finite(tensors, c)
    config = json_text(lora_config(ranks, base_model, lora_bias=any(k.endswith(".lora_B.bias") for k in tensors)))
    modules = hf_module_names(bridge, [a.site for a in adapters])
    text = json_text(_manifest("lora", c, {**(manifest or {}), "modules": modules}))

    def fill(tmp: Path) -> None:
        save_file(tensors, str(tmp / LORA_WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / LORA_CONFIG_FILE).write_text(config)
        (tmp / MANIFEST_FILE).write_text(text)

    return _write_dir(out, fill, overwrite)


def control_vector_layers(vector: SteeringVector, c: float, n_layers: int) -> dict[int, Float[Tensor, " d_model"]]:
    """``{N: c · scale · d}`` for llama.cpp's ``direction.N``: N is the block whose ``hook_resid_post`` it is added to.

    Refuses hooks that are not a block's ``resid_post`` and block 0 (llama.cpp never steers its layer 0).
    """
    c = check_coeff(c)
    out = {}
    for name, d in vector.directions.items():
        L = layer_of(name)
        if L is None or name != resid_post(L):
            raise ValueError(f"a llama.cpp control vector adds to the residual stream after a block; {name!r} is "
                             "not a blocks.N.hook_resid_post")
        if not 1 <= L < n_layers:
            raise ValueError(f"llama.cpp cannot steer after block {L}: its control vectors reach blocks 1 to "
                             f"{n_layers - 1} (direction.0 is refused); build the vector at other layers")
        out[L] = (c * vector.scales[name] * d.detach()).float()  # the very sum SteeringVector.apply's hook adds
    return dict(sorted(out.items()))


def save_control_vector(vector: SteeringVector, c: float, out: str | Path, *, n_layers: int, model_hint: str,
                        overwrite: bool = False, manifest: Mapping[str, Any] | None = None) -> Path:
    """``DIR/control_vector.gguf`` for ``llama-cli --control-vector``: direction.N = c · scale_N · d_N.

    >>> save_control_vector(vec, 0.03, "runs/cv", n_layers=30, model_hint="llama")  # doctest: +SKIP
    """
    layers = control_vector_layers(vector, c, n_layers)
    check_finite({f"direction.{L}": v for L, v in layers.items()}, c)
    text = json_text(_manifest("control-vector", float(c), {**(manifest or {}), "layers": list(layers)}))

    def fill(tmp: Path) -> None:
        writer = gguf.GGUFWriter(str(tmp / CONTROL_VECTOR_FILE), CONTROL_VECTOR_ARCH)  # general.architecture
        writer.add_string(f"{CONTROL_VECTOR_ARCH}.model_hint", model_hint)
        writer.add_int32(f"{CONTROL_VECTOR_ARCH}.layer_count", len(layers))  # as llama.cpp's cvector-generator
        for L, v in layers.items():
            writer.add_tensor(f"direction.{L}", v.cpu().numpy().astype(np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        (tmp / MANIFEST_FILE).write_text(text)

    return _write_dir(out, fill, overwrite)


def read_control_vector(path: str | Path) -> tuple[dict[int, Float[Tensor, " d_model"]], dict[str, Any]]:
    """``({N: direction.N}, {key: value})`` of a control-vector GGUF (a file, or an export directory holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / CONTROL_VECTOR_FILE
    reader = gguf.GGUFReader(str(path))
    meta = {}
    for key, f in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        meta[key] = f.contents()
    if meta.get("general.architecture") != CONTROL_VECTOR_ARCH:
        raise ValueError(f"{path}: general.architecture is {meta.get('general.architecture')!r}, not "
                         f"{CONTROL_VECTOR_ARCH!r}")
    dirs = {}
    for t in reader.tensors:
        m = re.fullmatch(r"direction\.(\d+)", t.name)
        if m is None:
            raise ValueError(f"{path}: unexpected tensor {t.name!r} (a control vector holds direction.N only)")
        dirs[int(m.group(1))] = torch.from_numpy(np.array(t.data, dtype=np.float32).reshape(-1))
    return dict(sorted(dirs.items())), meta


def read_manifest(path: str | Path) -> dict:
    return read_json(Path(path) / MANIFEST_FILE, "export manifest")


# --------------------------------------------------------------------------------------------- the registry

@dataclass(frozen=True)
class ExportFormatSpec:
    """One export format: ``write(artifact, bridge, tokenizer, c, out, *, overwrite, manifest, method, pairs)``
    returns the directory it wrote; ``check(artifact, method)`` refuses what it cannot write before the model
    loads; ``needs_pairs``: the caller passes the artifact's pairs (before their split) as ``pairs``."""

    name: str
    write: Callable[..., Path]
    description: str
    check: Callable[[SteeringArtifact, str | None], None] = lambda artifact, method: None
    needs_pairs: bool = False


EXPORTS: Registry[ExportFormatSpec] = Registry("export format")


def register_export(spec: ExportFormatSpec, *, replace: bool = False) -> ExportFormatSpec:
    return EXPORTS.add(spec.name, spec, replace=replace)


def get_export(name: str) -> ExportFormatSpec:
    return EXPORTS.find(name)


def export(artifact: SteeringArtifact, bridge: TransformerBridge, tokenizer: PreTrainedTokenizerBase, fmt: str,
           c: float, out: str | Path, *, overwrite: bool = False, manifest: Mapping[str, Any] | None = None,
           method: str | None = None, pairs: Sequence[ContrastivePair] | None = None) -> Path:
    """Write ``artifact``'s steer at ``c`` as format ``fmt`` (``EXPORTS``) into ``out``, after checking that
    ``bridge`` holds the weights the artifact was made from. ``method``: the additive method of a control vector;
    ``pairs``: the artifact's training pairs, for a format that ``needs_pairs``.

    >>> export(art, bridge, tok, "lora", -1.0, "runs/honesty-lora-1")  # doctest: +SKIP
    """
    spec = get_export(fmt)
    spec.check(artifact, method)
    if spec.needs_pairs and not pairs:
        raise ValueError(f"the {fmt} export is built from the artifact's training pairs: pass pairs=")
    artifact.check_model(bridge)
    return spec.write(artifact, bridge, tokenizer, c, out, overwrite=overwrite, manifest=manifest, method=method,
                      pairs=pairs)


def _merged(artifact, bridge, tokenizer, c, out, *, overwrite, manifest, method, pairs) -> Path:
    return save_merged(bridge, tokenizer, artifact.adapters, c, out, overwrite=overwrite, manifest=manifest)


def _lora(artifact, bridge, tokenizer, c, out, *, overwrite, manifest, method, pairs) -> Path:
    return save_lora(bridge, artifact.adapters, c, out, base_model=model_name(bridge), overwrite=overwrite,
                     manifest=manifest)


def control_vector_blocks(artifact: SteeringArtifact) -> list[int]:
    """The adapted blocks a control vector can reach (llama.cpp never steers its layer 0's output)."""
    return sorted({site_layer(a.site) for a in artifact.adapters} - {0})


def _check_control_vector(artifact: SteeringArtifact, method: str | None) -> None:
    if method is None:
        raise ValueError("a control vector holds an additive method: pass method= (e.g. 'pca_diff')")
    if not control_vector_blocks(artifact):
        raise ValueError("the artifact adapts only block 0, whose output a llama.cpp control vector cannot reach")


def _control_vector(artifact, bridge, tokenizer, c, out, *, overwrite, manifest, method, pairs) -> Path:
    blocks = control_vector_blocks(artifact)
    if len(blocks) < len({site_layer(a.site) for a in artifact.adapters}):
        print("block 0 left out: llama.cpp never steers the output of its layer 0")
    tc = artifact.config
    train_pairs, _ = select_pairs(list(pairs), tc.n_pairs, tc.held_out, tc.seed)  # the adapter's own split
    batches = list(pair_batches(train_pairs, tokenizer, tc.batch_pairs))
    names = [resid_post(L) for L in blocks]
    vector = additive_vector(bridge, method, artifact, capture(bridge, batches, names), batches)
    return save_control_vector(vector, c, out, n_layers=bridge.cfg.n_layers,
                               model_hint=str(bridge.original_model.config.model_type), overwrite=overwrite,
                               manifest={**(manifest or {}), "method": method})


register_export(ExportFormatSpec("merged", _merged, "a Hugging Face model directory with W(c) baked in"))
register_export(ExportFormatSpec("lora", _lora, "a peft LoRA directory: ΔW(c) = B A exactly, c·b as lora_bias"))
register_export(ExportFormatSpec("control-vector", _control_vector, "a llama.cpp control-vector GGUF of an "
                                 "additive method from the artifact's pairs", _check_control_vector, True))
