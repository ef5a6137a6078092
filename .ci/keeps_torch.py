"""Fail if a `pip install --dry-run --report REPORT` plan would install torch: adding interp-steer to an
environment that already has torch must keep that torch (a CUDA or ROCm build is the user's, and a plain `torch`
requirement would pull a multi-GB build over it).

    pip install --dry-run --quiet --report plan.json -e ".[test,export]" && python .ci/keeps_torch.py plan.json
"""

from __future__ import annotations

import importlib.metadata
import json
import sys
from pathlib import Path


def replaced(plan: dict, name: str = "torch") -> str | None:
    """'torch A -> B' if the plan installs ``name``, else None."""
    for item in plan.get("install", []):
        meta = item.get("metadata", {})
        if meta.get("name", "").lower().replace("_", "-") == name:
            try:
                have = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                have = "none"
            return f"{name} {have} -> {meta.get('version')}"
    return None


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(f"usage: python {sys.argv[0]} PIP_REPORT.json")
    plan = json.loads(Path(sys.argv[1]).read_text())
    change = replaced(plan)
    if change is not None:
        sys.exit(f"error: pip would replace the installed torch ({change}): pyproject.toml's torch range must "
                 "admit "
                 "every torch the project supports, with no cap below the newest release unless one breaks it")
    print(f"pip keeps torch {importlib.metadata.version('torch')}; it would install "
          f"{len(plan.get('install', []))} packages")


if __name__ == "__main__":
    main()
