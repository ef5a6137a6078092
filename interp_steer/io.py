"""Adapter artifacts: ``adapter.safetensors`` + ``config.json`` (versioned), written atomically. No pickles.

``config.json`` holds the format version, the base model's name, one fingerprint per site (so an adapter is
never applied to weights it was not decomposed from), the adapter specs, the training config and metrics.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformer_lens.model_bridge import TransformerBridge

from .adapter import AdapterSpec, SVDAdapter, linear_weight

FORMAT_VERSION = 1
ARCHITECTURE = "svd_rotation_adapter"
WEIGHTS_FILE = "adapter.safetensors"
CONFIG_FILE = "config.json"


def model_name(bridge: TransformerBridge) -> str:
    return str(getattr(bridge.cfg, "model_name", "") or "unknown")


def fingerprint(W: torch.Tensor) -> list[float]:
    """[sum, Frobenius norm, first entry] of a weight in float64: cheap, and changes with any real edit."""
    w = W.detach().double()
    return [w.sum().item(), w.norm().item(), w.flatten()[0].item()]


def json_safe(obj: Any) -> Any:
    """NaN and ±inf become null: strict JSON readers reject them."""
    if isinstance(obj, float):
        return None if math.isnan(obj) or math.isinf(obj) else obj
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json_atomic(path: Path, obj: Any, indent: int = 2) -> None:
    """Write strict JSON (``json_safe``) to a temporary name beside ``path``, then rename (no half-written file
    on interrupt)."""
    path = Path(path)
    obj = json_safe(obj)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=indent, allow_nan=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_tensors_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def adapter_tensors(adapters: Iterable[SVDAdapter]) -> dict[str, torch.Tensor]:
    """Flat ``{site}.{name}`` dict of every parameter and buffer."""
    return {f"{a.site}.{k}": v for a in adapters for k, v in a.state_dict().items()}


def save_adapter(path: str | Path, adapters: Iterable[SVDAdapter], bridge: TransformerBridge, *,
                 train_config: dict | None = None, metrics: dict | None = None) -> Path:
    """Write ``path/adapter.safetensors`` and ``path/config.json``; the whole directory appears at once."""
    path = Path(path)
    adapters = list(adapters)
    config = {
        "format_version": FORMAT_VERSION,
        "architecture": ARCHITECTURE,
        "base_model": model_name(bridge),
        "adapters": [a.spec.to_dict() for a in adapters],
        "fingerprints": {a.site: fingerprint(linear_weight(bridge, a.site)) for a in adapters},
        "train_config": train_config or {},
        "metrics": metrics or {},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".tmp-", dir=path.parent))
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in adapter_tensors(adapters).items()},
                  tmp / WEIGHTS_FILE, metadata={"format_version": str(FORMAT_VERSION)})
        write_json_atomic(tmp / CONFIG_FILE, config)
        old = None
        if path.exists():  # swap: the previous version stays whole until the new one is in place
            old = path.with_name(path.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_config(path: str | Path) -> dict:
    path = Path(path)
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path} is not an adapter directory: {CONFIG_FILE} is missing")
    config = json.loads(cfg_file.read_text())
    if config.get("architecture") != ARCHITECTURE:
        raise ValueError(f"{cfg_file}: architecture {config.get('architecture')!r}, expected {ARCHITECTURE!r}")
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{cfg_file}: format_version {config.get('format_version')!r}; this version reads "
                         f"{FORMAT_VERSION}. Re-train or upgrade interp-steer.")
    return config


def load_adapter(path: str | Path, bridge: TransformerBridge, *, check_base: bool = True
                 ) -> tuple[nn.ModuleList, dict]:
    """Load adapters saved by ``save_adapter`` for ``bridge``; raises if the base model differs."""
    path = Path(path)
    config = read_config(path)
    if check_base:
        if config["base_model"] != model_name(bridge):
            raise ValueError(f"adapter {path} was trained on {config['base_model']!r}, "
                             f"this model is {model_name(bridge)!r}")
        for site, fp in config["fingerprints"].items():
            now = fingerprint(linear_weight(bridge, site))
            if any(abs(a - b) > 1e-6 * max(1.0, abs(a)) for a, b in zip(fp, now)):
                raise ValueError(f"adapter {path}: the weights at {site} differ from those it was trained on "
                                 f"(fingerprint {fp} vs {now}); same model name, different weights?")
    tensors = load_file(str(path / WEIGHTS_FILE))
    adapters = nn.ModuleList()
    for spec_dict in config["adapters"]:
        spec = AdapterSpec(**spec_dict)
        get = lambda k: tensors[f"{spec.site}.{k}"]  # noqa: E731
        a = SVDAdapter(spec, get("U"), get("S"), get("V"))
        a.load_state_dict({k: get(k) for k in a.state_dict()}, strict=True)
        adapters.append(a)
    return adapters, config
