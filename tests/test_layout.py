"""The package's imports keep one direction (shared design: cli -> engine -> (eval, models, mto,
data) -> config), lazy imports inside functions included: a cycle hidden in a function body is
still a cycle, and it makes the lower package unusable without the upper one."""
import ast
import gc
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "mto_ds"
# What each part of the package may not import (absolute or relative), lazily or not.
FORBIDDEN = {
    "config": {"cli", "engine", "eval", "models", "mto", "data"},
    "mto": {"cli", "engine", "eval", "data", "models"},
    "models": {"cli", "engine", "eval", "data"},
    "data": {"cli", "engine", "eval", "models", "mto"},
    "eval": {"cli", "engine"},
    "engine": {"cli"},
}


def _parse(source: str) -> ast.Module:
    """ast.parse with the garbage collector off. The suite once failed here on CPython 3.11.7 with
    "SystemError: AST constructor recursion depth mismatch" while a finalizer of numba's (left by
    the FFCV tests of the same pytest worker) raised during the test: a collection inside the
    parse that runs such a finalizer is the likely cause, and with the collector off none starts
    there. (A gc.collect() before each parse, as well, took 36 s over the package's files in a
    worker that the FFCV and DeepSpeed tests had filled.)"""
    gc.disable()
    try:
        return ast.parse(source)
    finally:
        gc.enable()


def _imported_parts(path: Path, root: Path = REPO):
    """The mto_ds parts (first component below mto_ds) that `path` imports, with line numbers."""
    package = path.relative_to(root).parts[:-1]  # ("mto_ds", "eval") for mto_ds/eval/run.py
    for node in ast.walk(_parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                target = (*base, *(node.module.split(".") if node.module else ()))
                names = [".".join(target)] if node.module else [".".join((*base, a.name)) for a in node.names]
            else:
                names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "mto_ds" and len(parts) > 1:
                yield parts[1], node.lineno
            if parts[0] == "tools":
                yield "tools", node.lineno


def test_the_package_imports_in_one_direction_and_never_imports_tools():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        part = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        for imported, line in _imported_parts(path):
            if imported == "tools" or imported in FORBIDDEN.get(part, set()):
                wrong.append(f"{path.relative_to(REPO)}:{line} imports mto_ds.{imported}")
    assert wrong == []


def test_the_import_check_sees_relative_and_lazy_imports(tmp_path):
    """The checker itself: imports inside a function body, relative ones up one and two levels,
    and absolute ones are all found, with their lines."""
    fake = tmp_path / "mto_ds" / "eval" / "x.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("import os\nfrom . import knn\n\n\ndef f():\n    from ..engine.export import export_encoder\n"
                    "    import mto_ds.cli\n    from .. import data\n")
    assert sorted(_imported_parts(fake, tmp_path)) == [("cli", 7), ("data", 8), ("engine", 6), ("eval", 2)]
