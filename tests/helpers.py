"""Shared test helpers."""

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np


def tree_allclose(x, y, *, rtol=1e-5, atol=1e-8):
    """Whether two pytrees have equal structure and allclose leaves."""
    if jtu.tree_structure(x) != jtu.tree_structure(y):
        return False
    return all(
        np.shape(a) == np.shape(b) and np.allclose(a, b, rtol=rtol, atol=atol)
        for a, b in zip(jtu.tree_leaves(x), jtu.tree_leaves(y))
    )


def assert_tree_allclose(x, y, *, rtol=1e-5, atol=1e-8):
    assert jtu.tree_structure(x) == jtu.tree_structure(y), (
        jtu.tree_structure(x),
        jtu.tree_structure(y),
    )
    for a, b in zip(jtu.tree_leaves(x), jtu.tree_leaves(y)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


def finite_difference_jvp(fn, primals, tangents, eps=1e-6):
    """Central finite-difference JVP of `fn` at `primals` along `tangents` (pytrees)."""
    plus = jtu.tree_map(lambda p, t: p + eps * t, primals, tangents)
    minus = jtu.tree_map(lambda p, t: p - eps * t, primals, tangents)
    return jtu.tree_map(lambda a, b: (a - b) / (2 * eps), fn(*plus), fn(*minus))


def random_like(key, tree):
    """Standard-normal pytree with the structure, shapes and dtypes of `tree`."""
    leaves, treedef = jtu.tree_flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return jtu.tree_unflatten(
        treedef,
        [
            jax.random.normal(k, jnp.shape(x), jnp.result_type(x))
            for k, x in zip(keys, leaves)
        ],
    )


def run_on_host_devices(code: str, devices: int, timeout: float = 600):
    """Run `code` in a fresh Python with `devices` host CPU devices; return the JSON
    object its last line of output prints (keeping conftest's XLA_FLAGS)."""
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "")
    env["XLA_FLAGS"] = (
        f"{flags} --xla_force_host_platform_device_count={devices}".strip()
    )
    run = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])
