"""The package's import graph flows one way: cli → commands → sweep → train/concepts → evaluate → capture/io →
adapter/loss/models → config/data → names. Parsed from the source, so a cycle (or a core module importing a command) fails here."""

import ast
from pathlib import Path

import interp_steer

PACKAGE = Path(interp_steer.__file__).parent
LEVEL = {  # a module may import only modules of a strictly lower level
    "names": 0, "ownership": 0, "signals": 0, "progress": 0, "methods": 0,
    "config": 1, "data": 1,
    "models": 2, "adapter": 2, "loss": 2, "evalsets": 2, "caa": 2, "plots": 2, "metrics": 2,
    "capture": 3, "io": 3, "generation_check": 3, "prefix": 3,
    "directions": 4, "evaluate": 4, "report": 4, "distributed": 4,
    "concepts": 5, "train": 5, "export": 5,
    "sweep": 6,
    "commands": 7,
    "study": 8,
    "cli": 9,
}


def package_imports(path: Path) -> set[str]:
    """Modules of this package that ``path`` imports anywhere (top level or inside functions)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                out.add(node.module.split(".")[0])
            elif node.level == 1:
                out.update(a.name for a in node.names)
            elif node.module and node.module.startswith("interp_steer."):
                out.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[1] for a in node.names if a.name.startswith("interp_steer."))
    return out


def test_every_module_has_a_level():
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert modules == set(LEVEL), "give each new module a level in LEVEL (and so a place in the flow)"


def test_imports_flow_one_way():
    wrong = [(m, dep) for m in LEVEL for dep in package_imports(PACKAGE / f"{m}.py")
             if dep in LEVEL and LEVEL[dep] >= LEVEL[m]]
    assert not wrong, f"imports against the flow (module, imported): {wrong}"


def test_the_core_never_imports_analysis_or_the_cli():
    for m in LEVEL:
        tree = ast.parse((PACKAGE / f"{m}.py").read_text())
        names = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not any(n.split(".")[0] == "analysis" for n in names), m


def test_the_public_face_names_only_what_exists_and_documents_each_name():
    doc = interp_steer.__doc__
    assert len(interp_steer.__all__) <= 30 and f"These {len(interp_steer.__all__)} names are the face" in doc
    for name in interp_steer.__all__:
        assert getattr(interp_steer, name) is not None
        assert f"``{name}``" in doc, f"document {name} in interp_steer/__init__.py's docstring"


def test_the_public_face_keeps_function_names_that_are_also_module_names():
    import importlib

    import interp_steer as ist

    importlib.import_module("interp_steer.train")  # Python records a submodule on its package when it loads
    importlib.import_module("interp_steer.capture")
    assert callable(ist.train) and ist.train.__module__ == "interp_steer.train"
    assert callable(ist.capture) and ist.capture.__module__ == "interp_steer.capture"
    importlib.import_module("interp_steer.export")
    assert callable(ist.export) and ist.export.__module__ == "interp_steer.export"
