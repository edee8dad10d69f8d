"""Diagnostics of low-rank models: active ranks and singular spectra per layer."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import jax.tree_util as jtu

from .._misc import is_conv, is_linear
from ._layers import LowRankLinear
from ._tucker import TuckerConv2d


def _is_lowrank(x) -> bool:
    return isinstance(x, (LowRankLinear, TuckerConv2d))


def ranks(model: Any) -> list[jax.Array]:
    """The active rank of every low-rank layer of `model`, in tree order.

    **Arguments:** `model`, any pytree.

    **Returns:** a list with, per [`LowRankLinear`][jaxdecomp.lowrank.LowRankLinear],
    its rank (an int array of shape `()`) and, per
    [`TuckerConv2d`][jaxdecomp.lowrank.TuckerConv2d], its `(out, in)` ranks (shape
    `(2,)`). Traceable: record a rank history inside a jitted training step or a
    `lax.scan` (stack the list), or call it on the host after each step.

    **Example:**

    ```python
    import jax
    from jaxdecomp.lowrank import LowRankLinear, ranks

    layers = [LowRankLinear(8, 8, max_rank=4, rank=r, key=jax.random.key(r))
              for r in (1, 3)]
    assert [int(r) for r in ranks(layers)] == [1, 3]
    ```
    """
    leaves = jtu.tree_leaves(model, is_leaf=_is_lowrank)
    return [x.rank for x in leaves if _is_lowrank(x)]


def spectra(model: Any) -> list[jax.Array | tuple[jax.Array, jax.Array]]:
    """Singular values of the weight of every linear / convolutional layer of `model`
    (dense or low-rank), in tree order, largest first.

    **Arguments:** `model`, any pytree.

    **Returns:** a list with, per `LowRankLinear`, the singular values of its masked
    core (`max_rank` values; zeros past the active rank, so the spectrum of
    $W = USV^T$); per `eqx.nn.Linear`, those of its weight; per `TuckerConv2d` or
    `eqx.nn.Conv`, the pair (mode-out, mode-in) of singular values of the kernel's
    unfoldings (the spectra that Tucker truncation reads). Traceable.

    **Example:**

    ```python
    import equinox as eqx, jax
    from jaxdecomp.lowrank import compress, spectra

    mlp = eqx.nn.MLP(16, 4, width_size=8, depth=1, key=jax.random.key(0))
    before, after = spectra(mlp), spectra(compress(mlp, rank=2))
    # after[0] (rank 2) equals before[0][:2]: truncation keeps the leading values
    ```
    """

    def is_layer(x):
        return _is_lowrank(x) or is_linear(x) or is_conv(x)

    def unfold_spectra(w):
        o, i = w.shape[:2]
        so = jnp.linalg.svd(w.reshape(o, -1), compute_uv=False)
        si = jnp.linalg.svd(jnp.swapaxes(w, 0, 1).reshape(i, -1), compute_uv=False)
        return so, si

    out = []
    for x in jtu.tree_leaves(model, is_leaf=is_layer):
        if not is_layer(x):
            continue
        if isinstance(x, LowRankLinear):
            out.append(jnp.linalg.svd(x.masked_core, compute_uv=False))
        elif isinstance(x, TuckerConv2d):
            so, si = unfold_spectra(x.masked_core)
            a, b = x.max_rank
            out.append((so[:a], si[:b]))
        elif is_linear(x):
            out.append(jnp.linalg.svd(x.weight, compute_uv=False))
        else:
            out.append(unfold_spectra(x.weight))
    return out
