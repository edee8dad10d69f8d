"""Every ```python block in the docs, README and public docstrings runs."""

import inspect
import pathlib
import re

import jax
import pytest

import jaxdecomp
import solvers

ROOT = pathlib.Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)
PAGES = sorted([*ROOT.glob("docs/**/*.md"), ROOT / "README.md"])


def _run(blocks, name):
    # Examples run as a user would run them: default float32, standard promotion.
    namespace = {}
    with jax.enable_x64(False), jax.numpy_dtype_promotion("standard"):
        for code in blocks:
            exec(compile(code, name, "exec"), namespace)


def _blocks(text):
    return [
        inspect.cleandoc(b) if b.startswith(" ") else b for b in BLOCK.findall(text)
    ]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_page_examples_run(page):
    _run(_blocks(page.read_text()), str(page))


PUBLIC = [
    getattr(module, name)
    for module in (
        jaxdecomp,
        jaxdecomp.lowrank,
        jaxdecomp.optim,
        solvers,
        solvers.problems,
    )
    for name in dir(module)
    if not name.startswith("_")
    and (
        inspect.isfunction(getattr(module, name))
        or name
        in (
            *("LowRankLinear", "LoRA", "PointCloud", "Geometry", "Diffusion2D"),
            *("SparseMatrix", "Jacobi", "SSOR", "IncompleteCholesky", "Chebyshev"),
            *("Multigrid", "NeuralIC", "NeuralFSAI", "FactorizedInverse"),
            *("OmegaBandit", "NeuralInverse", "TrueResidualCG", "TrueResidualGMRES"),
        )
    )
]


@pytest.mark.parametrize("obj", PUBLIC, ids=lambda o: o.__name__)
def test_docstring_examples_run(obj):
    doc = inspect.getdoc(obj)
    assert doc and "**Arguments:**" in doc, f"{obj.__name__} lacks a full docstring"
    blocks = _blocks(doc)
    assert blocks, f"{obj.__name__} has no example"
    _run(blocks, obj.__name__)
