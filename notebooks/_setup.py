"""The notebooks' shared setup: ``import _setup`` first, before anything imports torch or transformers.

* offline: the packaged model needs no network (``HF_HUB_OFFLINE=1``), and tokenizers stay quiet in forks;
* torch threads: ``OMP_NUM_THREADS`` if set (e.g. ``OMP_NUM_THREADS=1`` on a shared machine), else torch's choice;
  a fixed seed, so reruns print the same numbers;
* the repository root on ``sys.path``: ``analysis`` sits beside the installed package and is not installed itself
  (nbmake and Jupyter run a notebook with its own folder, ``notebooks/``, as working directory).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
if not (ROOT / "analysis" / "__init__.py").is_file():  # pragma: no cover - a moved notebooks/ folder
    raise ImportError(f"notebooks/_setup.py expects the repository root at {ROOT} (no analysis/ there)")
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

THREADS = int(os.environ.get("OMP_NUM_THREADS") or 0) or torch.get_num_threads()
torch.set_num_threads(THREADS)
SEED = 0
torch.manual_seed(SEED)
