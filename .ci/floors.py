"""Print `name==floor` for every direct dependency of the project (and the extras named on the command line)
whose range in pyproject.toml has a lower bound `>=floor`: the constraints `make test-lowest` installs under.

    python .ci/floors.py test > floors.txt        # [project] dependencies and the `test` extra
    python .ci/floors.py test --check             # this interpreter has exactly those versions installed

torch is left out (`--skip torch`, the default): it is installed first from the local CPU wheel and kept.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    sys.exit("error: .ci/floors.py needs Python >= 3.11 (tomllib) to read pyproject.toml")

REQ = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*([^;]*)")


def floors(pyproject: Path, extras: list[str], skip: set[str]) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in extras:
        if extra not in project.get("optional-dependencies", {}):
            sys.exit(f"error: pyproject.toml has no extra {extra!r}")
        reqs += project["optional-dependencies"][extra]
    out = {}
    for req in reqs:
        m = REQ.match(req)
        if m is None:
            sys.exit(f"error: cannot read the requirement {req!r}")
        name, spec = m.group(1).lower().replace("_", "-"), m.group(2)
        lows = [s.strip()[2:].strip() for s in spec.split(",") if s.strip().startswith(">=")]
        if name in skip or not lows:
            continue
        out[name] = f"{name}=={lows[0]}"
    return sorted(out.values())


def _release(version: str) -> tuple[int, ...]:
    """'0.7' and '0.7.0' alike; a local label ('+cpu') ignored."""
    parts = [int(x) for x in re.findall(r"\d+", version.split("+")[0].split("rc")[0])]
    while parts and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def check(pins: list[str]) -> list[str]:
    """Each pin whose installed version differs, as 'name: installed X, floor Y'."""
    bad = []
    for pin in pins:
        name, floor = pin.split("==")
        try:
            have = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            have = "none"
        if _release(have) != _release(floor):
            bad.append(f"{name}: installed {have}, floor {floor}")
    return bad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("extras", nargs="*", help="optional-dependency groups to include")
    parser.add_argument("--pyproject", type=Path, default=Path(__file__).resolve().parents[1] / "pyproject.toml")
    parser.add_argument("--skip", default="torch", help="comma-separated names to leave out (default: torch)")
    parser.add_argument("--check", action="store_true", help="check the installed versions instead of printing")
    args = parser.parse_args()
    pins = floors(args.pyproject, args.extras, set(filter(None, args.skip.split(","))))
    if not args.check:
        print("\n".join(pins))
        return
    bad = check(pins)
    if bad:
        sys.exit("error: not at the lower bounds of pyproject.toml (the lowest-versions run would test others):\n "
                 " "
                 + "\n  ".join(bad))
    print(f"{len(pins)} direct dependencies at their lower bounds")


if __name__ == "__main__":
    main()
