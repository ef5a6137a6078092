"""Files: the one steering artifact, checkpoints, and atomic writers. Safetensors and JSON only, never pickle.

An artifact is one directory::

    config.json          format_version, architecture, base_model, fingerprints, adapter specs, loss_hook,
                         the full TrainConfig, where the pairs came from, metrics
    adapter.safetensors  every adapter tensor as "{site}.{name}" (U, S, V, theta_v, lam[, theta_u][, b]) and "d_steer"

A checkpoint is an artifact plus ``optimizer.safetensors`` and ``trainer.json``, written by the same writer.
Every directory is written whole into a temporary sibling and renamed into place; an existing one is kept
as ``NAME.prev`` until the new one is in place, so a kill at any moment leaves a whole directory to load.
Nothing the project did not write is ever deleted or overwritten.
"""

from __future__ import annotations

import glob
import json
import math
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Union

import torch
from jaxtyping import Float
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformer_lens.model_bridge import TransformerBridge

from ..config import ConfigError, TrainConfig
from ..method.adapter import AdapterSpec, SVDAdapter, apply_adapters, linear_weight
from ..method.data import strict_json
from ..method.models import DTYPES, model_device
from .ownership import claim, follow_umask, read_manifest, remove_owned, why_not_owned, write_manifest

FORMAT_VERSION = 2
ARCHITECTURE = "svd_rotation_adapter"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "adapter.safetensors"
RUN_CONFIG_FILE = "run_config.json"
OPTIMIZER_FILE = "optimizer.safetensors"
TRAINER_FILE = "trainer.json"
ARTIFACT_FILES = (CONFIG_FILE, WEIGHTS_FILE)
CHECKPOINT_FILES = (*ARTIFACT_FILES, OPTIMIZER_FILE, TRAINER_FILE)
DirWriters = Union[Mapping[str, Callable[[Path], None]], Callable[[Path], None]]
# what each writer's ``what`` is as a manifest kind (ownership.KINDS)
KIND_OF = {"an artifact": "artifact", "an export": "export", "a study cell": "cell", "a checkpoint": "checkpoint",
           "a run directory": "run"}


# ---------------------------------------------------------------------------------------- atomic writers

def json_safe(obj: Any) -> Any:
    """NaN and ±inf become null: strict JSON readers reject them."""
    if isinstance(obj, float):
        return None if math.isnan(obj) or math.isinf(obj) else obj
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` to a temporary name beside ``path``, then rename: no half-written file on interrupt."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    follow_umask(Path(tmp), directory=False)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def json_text(obj: Any, indent: int = 2) -> str:
    """Strict JSON (``json_safe``: NaN/inf as null), one trailing newline."""
    return json.dumps(json_safe(obj), indent=indent, allow_nan=False) + "\n"


def write_json_atomic(path: Path, obj: Any, indent: int = 2) -> None:
    """Strict JSON, atomically."""
    text = json_text(obj, indent)
    _atomic(Path(path), lambda p: p.write_text(text))


def write_text_atomic(path: Path, text: str) -> None:
    _atomic(Path(path), lambda p: p.write_text(text))


def read_json(path: Path, what: str) -> Any:
    """JSON from ``path`` or ``ValueError`` naming the file (never a bare traceback)."""
    try:
        return strict_json(Path(path).read_text(), str(path))
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{path}: not a readable {what} ({e.__class__.__name__}: {e})") from None


def read_tensors(path: Path) -> dict[str, Tensor]:
    """Tensors of a safetensors file, or ``ValueError`` naming the file if it is truncated or not safetensors."""
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e}); rewrite it (train again)") from None


# ------------------------------------------------------------------------------------ directories

def _refuse_link(path: Path) -> None:
    if path.is_symlink():
        raise FileExistsError(f"{path} is a symbolic link (to {os.readlink(path)}); interp-steer never writes "
                              "through "
                              "one, since replacing it would replace files in its target. Give the real "
                              "directory's "
                              "path or a new one.")


def _check_sibling(sibling: Path, name: str, path: Path, what: str, kind: str) -> None:
    """``sibling`` (``X.prev``, ``X.ckpt``) may be replaced or removed only if it is the project's copy of ``name``,
    of the kind that name holds (an artifact at ``X.ckpt`` is not a checkpoint)."""
    if sibling.is_symlink() or sibling.exists():
        reason = why_not_owned(sibling, name, (kind,))
        if reason is not None:
            raise FileExistsError(f"{sibling} is in the way of writing {what} at {path} ({reason}); interp-steer "
                                  "uses that name for its own copy and will not touch it. Move it away or choose "
                                  "another output path.")


def check_out_name(path: str | Path) -> Path:
    """``path`` as an output directory of its own: ``.``, ``..`` or ``/`` name none (the directory they name holds
    everything else beside the output)."""
    path = Path(path)
    if path.name in ("", ".", ".."):
        raise FileExistsError(f"{str(path)!r} names no directory of its own for an output; give a path such as "
                              "runs/x")
    return path


def check_owned_or_empty(path: Path, kind: str, what: str, where: str = "output directory") -> bool:
    """Whether ``path`` holds something: ``False`` when it is absent or an empty directory, ``True`` when it is a
    directory provably the project's ``what`` (its manifest says ``kind``, whatever the directory is called now: a
    renamed or copied one stays the project's); ``FileExistsError`` for anything else (``where``: what to choose
    instead, e.g. ``--out``)."""
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory; choose another {where}")
    if not (path.is_dir() and any(path.iterdir())):
        return False
    reason = why_not_owned(path, None, (kind,))
    if reason is not None:
        raise FileExistsError(f"{path} is not {what} interp-steer wrote ({reason}); it will not replace it or "
                              f"write into it. Choose a new or empty {where}.")
    return True


def _check_existing(path: Path, overwrite: bool, what: str) -> None:
    """``path`` may be written: absent, empty, or provably the project's ``what`` (``check_owned_or_empty``) and
    ``overwrite`` given."""
    check_out_name(path)
    _refuse_link(path)
    if check_owned_or_empty(path, KIND_OF[what], what):
        if not overwrite:
            raise FileExistsError(f"{path} already holds {what}; pass --overwrite (overwrite=True) to replace "
                                  "it, or choose another output directory")


def _stale_temporaries(path: Path) -> list[Path]:
    """Temporary directories a killed run (SIGKILL) left beside ``path``."""
    if not path.parent.is_dir():
        return []
    return sorted(p for p in path.parent.glob(f".{glob.escape(path.name)}.tmp-*") if p.is_dir())


def check_dir_target(path: str | Path, overwrite: bool = False, what: str = "an artifact",
                     siblings: Iterable[str] = ()) -> Path:
    """Raise unless ``write_dir_atomic(path, …, overwrite)`` can succeed; writes nothing.

    An existing ``path`` is replaced only if it is provably the project's (``ownership``: a manifest naming every
    file under it, all unchanged), and only with ``overwrite``. ``path.prev`` and each of ``siblings`` (suffixes,
    e.g. ``.ckpt``) must be absent or the project's own copy. Never follows a symbolic link. Called before any
    model work, so a bad output path costs nothing.
    """
    path = Path(path)
    _check_existing(path, overwrite, what)
    _check_sibling(path.with_name(path.name + ".prev"), path.name, path, what, KIND_OF[what])
    for suffix in siblings:
        sib = path.with_name(path.name + suffix)
        kind = {".ckpt": "checkpoint"}[suffix]
        _check_sibling(sib, sib.name, path, what, kind)
        _check_sibling(sib.with_name(sib.name + ".prev"), sib.name, path, what, kind)
    stale = _stale_temporaries(path)
    if stale:
        warnings.warn(f"{len(stale)} temporary director{'y' if len(stale) == 1 else 'ies'} left beside {path} by "
                      "a "
                      f"run that was killed ({', '.join(p.name for p in stale[:3])}); interp-steer cannot prove "
                      "what "
                      "is in them and leaves them: delete them yourself.", stacklevel=2)
    check_writable(path.parent)
    return path


def check_writable(directory: str | Path) -> Path:
    """Raise ``OSError`` unless ``directory`` can be created and written to; creates nothing."""
    directory = Path(directory)
    probe = directory
    while not probe.exists() and not probe.is_symlink() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise OSError(f"cannot write to {directory}: {probe} is not a directory; choose a writable output path")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OSError(f"cannot write to {directory}: {probe} is not writable; choose a writable output path")
    return directory


def check_run_dir(path: str | Path, overwrite: bool = False) -> Path:
    """Raise unless ``path`` can be an eval or demo run's output directory; writes nothing.

    A non-empty directory is refused unless it is provably an earlier run's (its manifest) and ``overwrite``;
    files of the earlier run that this one does not rewrite are kept.
    """
    path = Path(path)
    _check_existing(path, overwrite, "a run directory")
    return check_writable(path)


def prepare_run_dir(path: str | Path, overwrite: bool = False) -> Path:
    """``check_run_dir``, then create the directory (the first write of a run)."""
    path = check_run_dir(path, overwrite)
    path.mkdir(parents=True, exist_ok=True)
    return path


def seal_run_dir(path: str | Path) -> None:
    """Record every file now under a run directory in its manifest: what a later ``--overwrite`` may replace."""
    write_manifest(Path(path), Path(path).name, kind="run")


def write_dir_atomic(path: str | Path, writers: DirWriters, overwrite: bool = False, what: str = "an artifact", *,
                     identity: str | None = None, local: Iterable[str] = ()) -> Path:
    """Write every file into a temporary sibling directory, add its manifest, then swap it into place at once.

    ``writers`` is ``{file name: write(file path)}``, or one ``fill(directory)`` that writes its files itself
    (``save_pretrained``). An existing ``path`` (only with ``overwrite``, only if provably the project's:
    ``check_dir_target``) is renamed to ``path.prev`` first and removed after the swap: a kill at any moment
    leaves ``path`` or ``path.prev`` whole (``resolve_dir`` finds it). Another process writing the same path
    gets a clear error (``ownership.claim``). The manifest records the kind (``what``), ``identity`` (the run it
    belongs to) and ``local`` (top-level entries that may later be absent as a whole: ``ownership``).
    """
    path = check_out_name(path)
    kind = KIND_OF[what]
    with claim(path):
        check_dir_target(path, overwrite, what)
        check_removable(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        follow_umask(tmp, directory=True)
        prev = path.with_name(path.name + ".prev")
        moved = False  # path became prev here: proven the project's above, whatever name it was written as
        try:
            if callable(writers):
                writers(tmp)
            else:
                for name, write in writers.items():
                    write(tmp / name)
            write_manifest(tmp, path.name, kind=kind, identity=identity, local=tuple(local))
            if path.is_dir():
                if not any(path.iterdir()):
                    path.rmdir()  # an empty directory holds nothing to keep
                else:
                    if prev.exists() and not remove_owned(prev, path.name, (kind,)):  # stale, from an earlier kill
                        raise FileExistsError(f"{prev} could not be removed; nothing was replaced")
                    os.replace(path, prev)
                    moved = True
            os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # a fresh directory of this call's own making
            raise
        if prev.exists():
            remove_owned(prev, None if moved else path.name, (kind,))
    return path


def check_removable(path: Path) -> None:
    """Refuse, before anything is written, an existing directory whose files could not be removed once the new
    one is in place (a read-only directory in it): the swap would leave ``path.prev`` behind."""
    if not path.is_dir() or path.is_symlink():
        return
    for d in [path, *(p for p in path.rglob("*") if p.is_dir() and not p.is_symlink())]:
        if not os.access(d, os.W_OK | os.X_OK):
            raise PermissionError(f"{d} is read-only: the files of {path} could not be removed after writing its "
                                  f"replacement; make it writable (chmod -R u+w {path}) or choose another --out. "
                                  "Nothing was written")


def resolve_dir(path: str | Path, required: Iterable[str]) -> Path | None:
    """``path`` if it holds every required file, else ``path.prev`` if that is the project's copy of ``path``
    holding them (a swap was interrupted)."""
    path = Path(path)
    required = tuple(required)
    if path.is_dir() and not path.is_symlink() and all((path / n).is_file() for n in required):
        return path
    prev = path.with_name(path.name + ".prev")
    if why_not_owned(prev, path.name) is None and all((prev / n).is_file() for n in required):
        return prev
    return None


# -------------------------------------------------------------------------------------- the artifact

def model_name(bridge: TransformerBridge) -> str:
    return str(getattr(bridge.cfg, "model_name", "") or "unknown")


def fingerprint(W: Tensor) -> list[float]:
    """[sum, Frobenius norm, first entry] of a weight in float64: cheap, and changes with any real edit."""
    w = W.detach().to("cpu" if W.device.type == "mps" else W.device, torch.float64)  # MPS has no float64
    return [w.sum().item(), w.norm().item(), w.flatten()[0].item()]


@dataclass
class SteeringArtifact:
    """Everything a trained steer is: the adapters, the frozen direction ``d_steer`` they were trained along
    and the hook where it lives, the TrainConfig, the base model (name + weight fingerprints), metrics.

    >>> art = SteeringArtifact.load("runs/honesty", bridge)  # doctest: +SKIP
    >>> with apply_adapters(bridge, art.adapters, c=1.0): ...  # doctest: +SKIP
    """

    adapters: nn.ModuleList
    d_steer: Float[Tensor, " d_model"]
    loss_hook: str
    config: TrainConfig
    base_model: str
    fingerprints: dict[str, list[float]]
    metrics: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)  # where the pairs came from: {"pairs": path, "personas": [...]}
    # the dtype of the weights it was trained on: its fingerprints are of those weights, so a model loaded in
    # another dtype (an export's float32 copy of a bfloat16 run) is checked after casting to it
    weights_dtype: str = "float32"

    @classmethod
    def build(cls, bridge: TransformerBridge, adapters: Iterable[SVDAdapter], d_steer: Tensor, loss_hook: str,
              config: TrainConfig, metrics: dict | None = None, data: dict | None = None) -> "SteeringArtifact":
        """An artifact for ``bridge``: records its name and the fingerprint of every adapted weight."""
        adapters = nn.ModuleList(adapters)
        fps = {a.site: fingerprint(linear_weight(bridge, a.site)) for a in adapters}
        dtype = linear_weight(bridge, adapters[0].site).dtype if len(adapters) else torch.float32
        name = next((k for k, v in DTYPES.items() if v == dtype), "float32")
        return cls(adapters, d_steer.detach().clone(), loss_hook, config, model_name(bridge), fps,
                   dict(metrics or {}), dict(data or {}), name)

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        return save_artifact(path, self, overwrite=overwrite)

    def to(self, device: torch.device | str) -> "SteeringArtifact":
        """The adapters and ``d_steer`` on ``device`` (the model's), in place; returns the artifact."""
        self.adapters.to(device)
        self.d_steer = self.d_steer.to(device)
        return self

    @classmethod
    def load(cls, path: str | Path, bridge: TransformerBridge | None = None) -> "SteeringArtifact":
        return load_artifact(path, bridge)

    def apply(self, bridge: TransformerBridge, c: float):
        """``with art.apply(bridge, c):`` the model steered at ``c`` (c = 0: exactly the base model), after
        checking that ``bridge`` holds the weights the adapters were made from; every hook is removed on exit."""
        self.check_model(bridge)
        return apply_adapters(bridge, self.adapters, c)

    def check_model(self, bridge: TransformerBridge, where: str = "artifact") -> None:
        """Raise ``ValueError`` unless ``bridge`` is the model these adapters were decomposed from."""
        if self.base_model != model_name(bridge):
            raise ValueError(f"{where} was trained on {self.base_model!r}, this model is {model_name(bridge)!r}; "
                             "load the model it was trained on (--model)")
        if self.d_steer.shape != (bridge.cfg.d_model,):
            raise ValueError(f"{where}: d_steer has {tuple(self.d_steer.shape)} entries, this model's d_model is "
                             f"{bridge.cfg.d_model}")
        for a in self.adapters:
            W = linear_weight(bridge, a.site)
            if (W.shape[0], W.shape[1]) != (a.U.shape[0], a.V.shape[0]):
                raise ValueError(f"{where}: {a.site} is {tuple(W.shape)} in this model, the adapter expects "
                                 f"{(a.U.shape[0], a.V.shape[0])}")
            fp, now = self.fingerprints[a.site], fingerprint(W.to(DTYPES[self.weights_dtype]))
            if not all(abs(x - y) <= 1e-6 * max(1.0, abs(x)) for x, y in zip(fp, now)):  # NaN fails too
                raise ValueError(f"{where}: the weights at {a.site} differ from those it was trained on "
                                 f"(fingerprint {fp} vs {now}); same model name, different weights?")

    def config_json(self) -> dict:
        return {
            "format_version": FORMAT_VERSION, "architecture": ARCHITECTURE, "base_model": self.base_model,
            "fingerprints": self.fingerprints, "adapters": [a.spec.to_dict() for a in self.adapters],
            "loss_hook": self.loss_hook, "train_config": self.config.to_dict(), "data": self.data,
            "metrics": self.metrics, "weights_dtype": self.weights_dtype,
        }

    def tensors(self) -> dict[str, Tensor]:
        out = {f"{a.site}.{k}": v for a in self.adapters for k, v in a.state_dict().items()}
        out["d_steer"] = self.d_steer
        return out


def artifact_writers(artifact: SteeringArtifact) -> dict[str, Callable[[Path], None]]:
    tensors = {k: v.detach().contiguous().cpu() for k, v in artifact.tensors().items()}
    config = json_text(artifact.config_json())
    return {
        WEIGHTS_FILE: lambda p: save_file(tensors, str(p), metadata={"format_version": str(FORMAT_VERSION)}),
        CONFIG_FILE: lambda p: p.write_text(config),
    }


def save_artifact(path: str | Path, artifact: SteeringArtifact, *, overwrite: bool = False,
                  run_config: dict | None = None, identity: str | None = None) -> Path:
    """Write the artifact directory at once (see module docstring); ``run_config`` goes beside it; ``identity``
    (``train.run_identity``) goes into its manifest."""
    writers = artifact_writers(artifact)
    if run_config is not None:
        text = json_text(run_config)
        writers[RUN_CONFIG_FILE] = lambda p: p.write_text(text)
    return write_dir_atomic(path, writers, overwrite, identity=identity)


_SPEC_KEYS = {"site", "rank", "scale", "rotate_u", "bias"}
_SPEC_OPTIONAL = {"bias": "none"}  # spec keys added later: the value an artifact written without them had
# TrainConfig fields added after artifacts were written without them: the value such an artifact was trained
# with (before the field existed every run rotated the largest triplets, and no adapter had a bias term), so
# that a later change of the default cannot change what an old artifact says it was
_BEFORE_FIELD = {"triplets": "top", "bias": "none"}


def written_train_config(d):
    """A saved ``train_config`` with the fields it predates filled in as they were when it was trained (a
    missing field otherwise takes today's default, which may differ: ``triplets`` is ``aligned`` now)."""
    return {**_BEFORE_FIELD, **d} if isinstance(d, dict) else d


_KEYS = ("format_version", "architecture", "base_model", "fingerprints", "adapters", "loss_hook", "train_config")


def read_artifact_config(path: str | Path) -> dict:
    """``config.json`` of an artifact, checked for format and version (``ValueError`` naming what is wrong)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not an artifact directory (it does not exist or is a file); "
                                "write one with `interp-steer train --out DIR`")
    missing = [n for n in ARTIFACT_FILES if not (path / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{path} is not a whole artifact: {', '.join(missing)} missing. "
                                "Write one with `interp-steer train --out DIR`")
    config = read_json(path / CONFIG_FILE, "artifact config")
    if not isinstance(config, dict):
        raise ValueError(f"{path / CONFIG_FILE}: expected a JSON object, got {type(config).__name__}")
    if config.get("architecture") != ARCHITECTURE:
        raise ValueError(f"{path / CONFIG_FILE}: architecture {config.get('architecture')!r}, expected "
                         f"{ARCHITECTURE!r}")
    version = config.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise ValueError(f"{path / CONFIG_FILE}: format_version must be an integer (this version reads "
                         f"{FORMAT_VERSION}), got {version!r}")
    if version != FORMAT_VERSION:
        hint = ("it was written by an older interp-steer; train it again with this version" if
                isinstance(version, int) and version < FORMAT_VERSION else
                "it was written by a newer interp-steer; upgrade (pip install -U interp-steer)")
        raise ValueError(f"{path / CONFIG_FILE}: format_version {version!r}, this version reads {FORMAT_VERSION}: "
                         f"{hint}")
    absent = [k for k in _KEYS if k not in config]
    if absent:
        raise ValueError(f"{path / CONFIG_FILE}: missing keys {absent}")
    for k in ("metrics", "data", "train_config", "fingerprints"):
        if config.get(k) is not None and not isinstance(config[k], dict):
            raise ValueError(f"{path / CONFIG_FILE}: {k!r} must be a JSON object, got {type(config[k]).__name__} "
                             f"{str(config[k])[:60]}")
    if not isinstance(config["adapters"], list) or not config["adapters"]:
        raise ValueError(f"{path / CONFIG_FILE}: 'adapters' must be a non-empty list of adapter specs, got "
                         f"{str(config['adapters'])[:60]}")
    return config


def load_artifact(path: str | Path, bridge: TransformerBridge | None = None) -> SteeringArtifact:
    """Read an artifact; with ``bridge``, also refuse it unless it was trained on exactly that model.

    Every tensor is checked: present, of the shape its spec implies, finite; nothing is unpickled.
    """
    path = Path(path)
    config = read_artifact_config(path)
    cfg_file = path / CONFIG_FILE
    try:
        train_config = TrainConfig.from_dict(written_train_config(config["train_config"]))
        specs = []
        for d in config["adapters"]:
            if not isinstance(d, dict) or not set(_SPEC_KEYS) - set(_SPEC_OPTIONAL) <= set(d) <= _SPEC_KEYS:
                raise ValueError(f"adapter spec {d!r} must have the keys {sorted(_SPEC_KEYS)} "
                                 f"({', '.join(sorted(_SPEC_OPTIONAL))} may be missing)")
            specs.append(AdapterSpec(**{**_SPEC_OPTIONAL, **d}))
    except (ConfigError, ValueError, TypeError) as e:
        raise ValueError(f"{cfg_file}: {e}") from None
    sites = [s.site for s in specs]
    twice = sorted({s for s in sites if sites.count(s) > 1})
    if twice:
        raise ValueError(f"{cfg_file}: the adapter sites {twice} appear more than once; one adapter per site")
    hook = config["loss_hook"]
    ll = train_config.loss_layer
    if isinstance(hook, str) and isinstance(ll, int) and not isinstance(ll, bool) and not hook.startswith(
            f"blocks.{ll}."):
        raise ValueError(f"{cfg_file}: train_config.loss_layer {ll} contradicts loss_hook {hook!r}; the file was "
                         "edited or damaged: train it again")
    fps = config["fingerprints"]
    sites = [s.site for s in specs]
    if not specs or not isinstance(fps, dict) or sorted(fps) != sorted(sites) or not all(
            isinstance(v, list) and len(v) == 3
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)
            for v in fps.values()):
        raise ValueError(f"{cfg_file}: needs one [sum, norm, first] fingerprint of finite numbers per adapter "
                         "site "
                         f"{sites}, "
                         f"got {fps!r}")
    if not isinstance(config["loss_hook"], str) or not isinstance(config["base_model"], str):
        raise ValueError(f"{cfg_file}: loss_hook and base_model must be strings")
    weights_dtype = config.get("weights_dtype", "float32")  # written before the key: checked as float32, as then
    if weights_dtype not in DTYPES:
        raise ValueError(f"{cfg_file}: weights_dtype must be one of {', '.join(DTYPES)}, got {weights_dtype!r}")
    tensors = read_tensors(path / WEIGHTS_FILE)
    adapters = nn.ModuleList(_adapter_from(spec, tensors, path / WEIGHTS_FILE) for spec in specs)
    d_steer = tensors.pop("d_steer", None)
    if d_steer is None or d_steer.ndim != 1 or not torch.isfinite(d_steer).all():
        raise ValueError(f"{path / WEIGHTS_FILE}: 'd_steer' missing, or not a finite vector")
    extra = sorted(set(tensors) - {f"{s.site}.{k}" for s, a in zip(specs, adapters) for k in a.state_dict()})
    if extra:
        raise ValueError(f"{path / WEIGHTS_FILE}: unexpected tensors {extra[:5]}")
    art = SteeringArtifact(adapters, d_steer, config["loss_hook"], train_config, config["base_model"],
                           {k: [float(x) for x in v] for k, v in fps.items()}, dict(config.get("metrics") or {}),
                           dict(config.get("data") or {}), weights_dtype)
    if bridge is not None:
        art.check_model(bridge, where=f"artifact {path}")
        art.to(model_device(bridge))
    return art


def _adapter_from(spec: AdapterSpec, tensors: dict[str, Tensor], where: Path) -> SVDAdapter:
    def get(k: str) -> Tensor:
        key = f"{spec.site}.{k}"
        if key not in tensors:
            raise ValueError(f"{where}: tensor {key!r} is missing")
        t = tensors[key]
        if not torch.isfinite(t).all():
            raise ValueError(f"{where}: tensor {key!r} holds NaN or inf")
        return t

    U, S, V, r = get("U"), get("S"), get("V"), spec.rank
    if U.ndim != 2 or V.ndim != 2 or U.shape[1] != r or V.shape[1] != r or S.shape != (r,):
        raise ValueError(f"{where}: {spec.site}: U, S, V must be (d_out, {r}), ({r},), (d_in, {r}); got "
                         f"{tuple(U.shape)}, {tuple(S.shape)}, {tuple(V.shape)}")
    a = SVDAdapter(spec, U, S, V)
    state = {}
    for k, v in a.state_dict().items():
        t = get(k)
        if t.shape != v.shape:
            raise ValueError(f"{where}: tensor '{spec.site}.{k}' has shape {tuple(t.shape)}, expected "
                             f"{tuple(v.shape)}")
        state[k] = t
    if spec.bias == "only" and any(state[k].abs().max() > 0 for k in ("theta_v", "lam")):
        raise ValueError(f"{where}: {spec.site} has bias 'only' (it writes c·b alone) but non-zero theta_v or "
                         "lam: "
                         "the file was edited or damaged; retrain it")
    a.load_state_dict(state, strict=True)
    return a


# ------------------------------------------------------------------------------------- checkpoints

@dataclass
class Checkpoint:
    """A training run's state after ``step`` optimiser steps: the artifact so far, the optimiser, the loss scale."""

    artifact: SteeringArtifact
    optimizer: dict          # torch optimizer state_dict
    step: int
    scale: float
    duals: list[float] = field(default_factory=list)  # the KL constraint's multipliers (c = +1, c = −1)


def save_checkpoint(path: str | Path, ckpt: Checkpoint, identity: str | None = None,
                    run_config: dict | None = None) -> Path:
    """The artifact's files plus the optimiser state, swapped into place at once (``write_dir_atomic``); its
    manifest records ``identity``, the run it belongs to, and ``run_config`` (how to resume it) goes beside."""
    state = ckpt.optimizer
    opt_tensors = {f"{i}.{k}": v.detach().contiguous().cpu() for i, s in state["state"].items() for k, v in s.items()}
    trainer = {"step": ckpt.step, "scale": ckpt.scale, "duals": ckpt.duals, "param_groups": state["param_groups"]}
    writers = artifact_writers(ckpt.artifact)
    writers[OPTIMIZER_FILE] = lambda p: save_file(opt_tensors, str(p))
    trainer_text = json_text(trainer)
    writers[TRAINER_FILE] = lambda p: p.write_text(trainer_text)
    if run_config is not None:
        run_text = json_text(run_config)
        writers[RUN_CONFIG_FILE] = lambda p: p.write_text(run_text)
    return write_dir_atomic(path, writers, overwrite=True, what="a checkpoint", identity=identity)


def load_checkpoint(path: str | Path, bridge: TransformerBridge) -> Checkpoint | None:
    """The newest whole checkpoint at ``path`` (or ``path.prev`` if a swap was cut short); None if neither."""
    found = resolve_dir(path, CHECKPOINT_FILES)
    if found is None:
        return None
    art = load_artifact(found, bridge)
    trainer = read_json(found / TRAINER_FILE, "trainer state")
    fix = f"the checkpoint {found} is damaged: remove it (train without --resume) or restore it"

    def number(x) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    if not (isinstance(trainer, dict) and isinstance(trainer.get("step"), int)
            and not isinstance(trainer.get("step"), bool) and trainer["step"] >= 0
            and number(trainer.get("scale")) and trainer["scale"] > 0
            and isinstance(trainer.get("param_groups"), list)
            and all(isinstance(g, dict) for g in trainer["param_groups"])
            and isinstance(trainer.get("duals", []), list) and all(number(x) for x in trainer.get("duals", []))):
        raise ValueError(f"{found / TRAINER_FILE}: expected {{step >= 0, scale > 0 (finite), param_groups: a list "
                         f"of objects, duals: finite numbers}}; {fix}")
    state: dict = {}
    for k, v in read_tensors(found / OPTIMIZER_FILE).items():
        i, _, name = k.partition(".")
        if not (i.isdigit() and name) or not torch.isfinite(v).all():
            raise ValueError(f"{found / OPTIMIZER_FILE}: tensor {k!r} is not an optimizer state "
                             f"('<param index>.<name>', finite); {fix}")
        state.setdefault(int(i), {})[name] = v
    return Checkpoint(art, {"state": state, "param_groups": trainer["param_groups"]}, trainer["step"],
                      float(trainer["scale"]), [float(x) for x in trainer.get("duals", [])])


def checkpoint_identity(path: str | Path, name: str | None = None) -> str | None:
    """The run identity a checkpoint directory's manifest records, the directory written as ``name`` (default:
    its name; ``X.ckpt`` for ``X.ckpt.prev``); None if it is not a checkpoint of the project's, or was written
    before identities."""
    path = Path(path)
    m = read_manifest(path, name or path.name, ("checkpoint",))
    return None if isinstance(m, str) else m.identity


def check_checkpoint(out: str | Path, identity: str, overwrite: bool, resume: bool) -> None:
    """Raise unless the checkpoint beside ``out`` (``out.ckpt`` and its ``.prev``) is absent or this run's: its
    manifest records ``identity``. With ``resume`` the checkpoint is the one to continue (``train`` compares its
    TrainConfig and identity once it is loaded). Another run's checkpoint is kept, named, with how to resume or
    remove it, unless ``overwrite`` discards it. Writes nothing."""
    out = Path(out)
    ckpt = out.with_name(out.name + ".ckpt")
    for p in (ckpt, ckpt.with_name(ckpt.name + ".prev")):
        if not (p.exists() or p.is_symlink()):
            continue
        m = read_manifest(p, ckpt.name, ("checkpoint",))
        if isinstance(m, str):
            raise FileExistsError(f"{p} is in the way of the checkpoint of {out} ({m}); interp-steer will not "
                                  "touch "
                                  "it. Move it away or choose another output path.")
        if overwrite or resume or m.identity == identity:  # resumed: its TrainConfig and identity are compared
            continue
        how = (f"`interp-steer train --config {ckpt / RUN_CONFIG_FILE} --resume`" if (ckpt / RUN_CONFIG_FILE).is_file()
               else "the command that wrote it, with --resume")
        raise FileExistsError(f"{p} is the checkpoint of another training run (its config, pairs or model differ "
                              f"from this one's); interp-steer keeps it. Resume that run with {how}, pass "
                              "--overwrite to discard it, or remove it yourself.")


def remove_checkpoint(path: str | Path, identity: str | None, resumed: bool = False, overwrite: bool = False
                      ) -> None:
    """Remove a finished run's checkpoint directories, where they are provably the project's (``ownership``) and
    this run's: their manifest records ``identity`` (or, if ``resumed``, they were written before identities),
    or ``overwrite`` discards another run's."""
    path = Path(path)
    for p in (path, path.with_name(path.name + ".prev")):
        found = checkpoint_identity(p, path.name)
        if found == identity or overwrite or (resumed and found is None):
            remove_owned(p, path.name, ("checkpoint",))
