"""The package is grouped by role and its imports flow one way between the groups: app → comparison → training →
evaluation → storage → method → the shared vocabulary. Parsed from the source, so an import against the flow (or a
cycle inside a group) fails here, not in a user's notebook."""

import ast
import inspect
import pkgutil
from pathlib import Path

import interp_steer

PACKAGE = Path(interp_steer.__file__).parent
VOCABULARY = ("names", "config", "registry", "progress", "signals")  # top-level modules, no torch
GROUPS = ("method", "storage", "evaluation", "training", "comparison", "app")  # each may import those before it
LEVEL = {"vocabulary": 0, **{g: i + 1 for i, g in enumerate(GROUPS)}}


def modules() -> dict[str, Path]:
    """Every module of the package but the face, by dotted name under it (``method.states``)."""
    out = {}
    for p in PACKAGE.rglob("*.py"):
        rel = p.relative_to(PACKAGE).with_suffix("")
        if rel.parts[0] in ("datasets", "__pycache__") or rel.parts == ("__init__",):
            continue
        out[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = p
    return out


def group(module: str) -> str:
    head = module.split(".")[0]
    return "vocabulary" if head in VOCABULARY else head


def package_imports(module: str, path: Path) -> set[str]:
    """Modules of this package (dotted, as in ``modules()``) that ``path`` imports anywhere, top level or inside
    functions; relative imports resolved against the module's own package."""
    here = module.split(".")[:-1] if path.name != "__init__.py" else module.split(".")
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[:len(here) - node.level + 1]
                target = [*base, *(node.module.split(".") if node.module else [])]
            elif node.module and node.module.startswith("interp_steer."):
                target = node.module.split(".")[1:]
            else:
                continue
            if node.module is None or not target:  # from . import a, b: each name a module
                out.update(".".join([*target, a.name]) for a in node.names)
            else:
                out.add(".".join(target))
        elif isinstance(node, ast.Import):
            out.update(".".join(a.name.split(".")[1:]) for a in node.names if a.name.startswith("interp_steer."))
    return out


def test_every_module_sits_in_a_group_or_the_vocabulary():
    stray = [m for m in modules() if group(m) not in LEVEL or (group(m) == "vocabulary" and "." in m)]
    assert not stray, f"put each module in one of the groups {GROUPS} or the vocabulary {VOCABULARY}: {stray}"
    for g in GROUPS:
        assert (PACKAGE / g / "__init__.py").read_text().startswith('"""'), f"{g}/__init__.py says what {g} is"


def test_imports_flow_one_way_between_groups():
    found = modules()
    wrong = [(m, dep) for m, p in found.items() for dep in package_imports(m, p)
             if group(dep) in LEVEL and group(dep) != group(m) and LEVEL[group(dep)] >= LEVEL[group(m)]]
    assert not wrong, f"imports against the flow (module, imported): {wrong}"


def test_no_cycle_inside_a_group():
    found = modules()
    graph = {m: {d for d in package_imports(m, p) if d in found and d != m} for m, p in found.items()}
    done, active = set(), []

    def visit(m):
        if m in active:
            raise AssertionError(f"import cycle: {' -> '.join(active[active.index(m):] + [m])}")
        if m in done:
            return
        active.append(m)
        for d in sorted(graph[m]):
            visit(d)
        active.pop()
        done.add(m)

    for m in sorted(graph):
        visit(m)


def test_the_core_never_imports_analysis_or_the_cli():
    for m, p in modules().items():
        names = {n.module for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, ast.ImportFrom) and n.module}
        assert not any(n.split(".")[0] == "analysis" for n in names), m


def test_the_public_face_names_only_what_exists_and_documents_each_name():
    doc = interp_steer.__doc__
    assert len(interp_steer.__all__) <= 30 and f"These {len(interp_steer.__all__)} names are the face" in doc
    for name in interp_steer.__all__:
        assert getattr(interp_steer, name) is not None
        assert f"``{name}``" in doc, f"document {name} in interp_steer/__init__.py's docstring"
    for g in GROUPS:
        assert f"    {g}/ " in doc, f"the face's docstring names the group {g}/"


def test_no_public_function_shares_its_modules_name():
    """A module named like a function it holds makes ``interp_steer.NAME`` the module once anything imports it."""
    import importlib

    import interp_steer as ist

    for info in pkgutil.walk_packages(ist.__path__, "interp_steer."):
        if info.name.startswith("interp_steer.datasets"):
            continue
        mod = importlib.import_module(info.name)
        leaf = info.name.rsplit(".", 1)[1]
        fn = getattr(mod, leaf, None)
        assert not (inspect.isfunction(fn) or inspect.isclass(fn)) or fn.__module__ != mod.__name__, info.name
    for name in ("train", "capture", "export"):
        assert callable(getattr(ist, name)), name
