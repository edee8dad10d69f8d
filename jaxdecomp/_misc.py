"""Small helpers shared across `jaxdecomp` (dtype defaults, pytree norms)."""

from __future__ import annotations

import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, PyTree, Scalar


def inexact_leaves_dtype(tree: PyTree, what: str) -> np.dtype:
    """The lowest-precision floating dtype among the leaves of `tree`.

    Raises `TypeError` (at trace time) if a leaf is not a floating-point array, naming
    `what` in the message.
    """
    leaves = jtu.tree_leaves(tree)
    if not leaves:
        raise ValueError(f"{what} is an empty pytree; expected at least one array.")
    dtypes = []
    for leaf in leaves:
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.inexact):
            raise TypeError(
                f"{what} must contain only floating-point arrays; got a leaf of dtype "
                f"{dtype} and shape {jnp.shape(leaf)}."
            )
        dtypes.append(np.dtype(dtype))
    return max(dtypes, key=lambda d: float(jnp.finfo(d).eps))


def default_tol(dtype, power: float) -> float:
    """`eps(dtype) ** power`: the house rule for default tolerances."""
    return float(jnp.finfo(dtype).eps) ** power


def tree_size(tree: PyTree) -> int:
    """Total number of elements of the array leaves of `tree`."""
    return sum(int(np.prod(jnp.shape(x))) for x in jtu.tree_leaves(tree))


def tree_inf_norm(tree: PyTree[Array]) -> Scalar:
    """Max-norm over all leaves (NaN if any entry is NaN)."""
    leaves = [jnp.max(jnp.abs(x)) for x in jtu.tree_leaves(tree) if jnp.size(x) > 0]
    if not leaves:
        return jnp.array(0.0)
    out = leaves[0]
    for leaf in leaves[1:]:
        # jnp.maximum propagates NaN, which is what a failure check needs.
        out = jnp.maximum(out, leaf.astype(out.dtype))
    return out


def stop_gradient_arrays(tree: PyTree) -> PyTree:
    """`lax.stop_gradient` on the floating-point array leaves; others untouched."""
    return jtu.tree_map(
        lambda x: lax.stop_gradient(x) if eqx.is_inexact_array(x) else x, tree
    )


def same_structure(a, b) -> bool:
    """Whether two pytrees (of arrays or `ShapeDtypeStruct`s) agree in structure and
    shapes."""
    if jtu.tree_structure(a) != jtu.tree_structure(b):
        return False
    return all(
        jnp.shape(x) == jnp.shape(y)
        for x, y in zip(jtu.tree_leaves(a), jtu.tree_leaves(b))
    )


def describe(tree) -> str:
    """A short human-readable summary of a pytree's structure, shapes and dtypes."""
    leaves, treedef = jtu.tree_flatten(tree)
    shapes = ", ".join(f"{jnp.result_type(x)}{list(jnp.shape(x))}" for x in leaves)
    return f"{treedef} with leaves [{shapes}]"
