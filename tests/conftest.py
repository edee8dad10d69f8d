"""Test configuration: float64 on, strict dtype promotion, PRNG keys, markers.

`slow` and `gpu` tests are skipped unless `--runslow` / `--rungpu` is given (and, for
`gpu`, a GPU backend is present).
"""

import jax
import jax.random as jr
import pytest

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="run tests marked slow")
    parser.addoption("--rungpu", action="store_true", help="run tests marked gpu")


def pytest_collection_modifyitems(config, items):
    has_gpu = jax.default_backend() == "gpu"
    for item in items:
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(pytest.mark.skip(reason="slow: pass --runslow to run"))
        if "gpu" in item.keywords and not (config.getoption("--rungpu") and has_gpu):
            item.add_marker(
                pytest.mark.skip(reason="gpu: pass --rungpu on a machine with a GPU")
            )


@pytest.fixture
def getkey():
    """`getkey()` returns a fresh PRNG key on each call (deterministic per test)."""
    key = jr.key(0)

    def _getkey():
        nonlocal key
        key, sub = jr.split(key)
        return sub

    return _getkey
