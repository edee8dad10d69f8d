"""Test configuration: float64 on, strict dtype promotion, PRNG keys, markers.

`slow` and `gpu` tests are skipped unless `--runslow` / `--rungpu` is given (and, for
`gpu`, a GPU backend is present).

The test suite is dominated by XLA compilation on CPU, so it asks XLA's CPU backend
for no LLVM optimisation (`--xla_backend_optimization_level=0`, about 30% less wall
time). This changes how fast the compiled code runs, not what it computes (XLA's CPU
backend does not reassociate floating point at any level); benchmarks do not use it.
"""

import gc
import os

_FLAG = "--xla_backend_optimization_level"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}=0".strip()

import jax  # noqa: E402
import jax.random as jr  # noqa: E402
import pytest  # noqa: E402

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


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop every compiled program after each test module. Each loaded XLA CPU
    executable holds memory mappings (about 14 per small solver program); a
    long-lived xdist worker that kept them all reached Linux's default
    `vm.max_map_count` (65,530: 55,441 mappings were counted in one worker at 80% of
    the suite) and then segfaulted inside XLA's compiler. Within a module, jitted
    helpers still share their compilations."""
    yield
    jax.clear_caches()
    gc.collect()
