"""Layout rules of the design card."""

import ast
import pathlib

import jaxdecomp
import solvers

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _imports(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module


def test_jaxdecomp_never_imports_solvers():
    for path in (ROOT / "jaxdecomp").rglob("*.py"):
        for name in _imports(path):
            assert name.split(".")[0] != "solvers", f"{path} imports {name}"


def test_init_files_only_reexport():
    for package in ("jaxdecomp", "solvers"):
        tree = ast.parse((ROOT / package / "__init__.py").read_text())
        for node in tree.body:
            ok = isinstance(node, (ast.ImportFrom, ast.Import)) or (
                isinstance(node, (ast.Expr, ast.Assign))  # docstring, __version__
            )
            assert ok, f"{package}/__init__.py has code: {ast.dump(node)[:80]}"


def test_versions():
    assert jaxdecomp.__version__
    assert solvers.__doc__
