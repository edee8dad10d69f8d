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


# --------------------------------------------------------------------------------------
# Matrices
# --------------------------------------------------------------------------------------

HIGHEST = lax.Precision.HIGHEST


def mm(a: Array, b: Array) -> Array:
    """Batched matmul at HIGHEST precision (no TF32 / bf16 passes on GPU)."""
    return jnp.matmul(a, b, precision=HIGHEST)


def mT(a: Array) -> Array:
    return jnp.swapaxes(a, -1, -2)


def sym(a: Array) -> Array:
    return 0.5 * (a + mT(a))


def eye_like(a: Array) -> Array:
    return jnp.broadcast_to(jnp.eye(a.shape[-1], dtype=a.dtype), a.shape)


def fro(a: Array) -> Array:
    """Frobenius norm over the last two axes."""
    return jnp.sqrt(jnp.sum(jnp.square(a), axis=(-2, -1)))


def safe_reciprocal(den: Array) -> Array:
    """1 / den, and 0 where den is 0 (divided differences at zero eigenvalues of a
    singular matrix, where the off-diagonal rest is zero to rounding anyway, and the
    derivatives of roots at semidefinite input: see `eig_solver`)."""
    ok = den != 0
    return jnp.where(ok, 1 / jnp.where(ok, den, 1), 0)


def check_matrix(a, name: str, *, square: bool) -> Array:
    """Trace-time checks: a floating array of shape (..., m, n) (m == n if square)."""
    if not eqx.is_array_like(a):
        raise TypeError(f"{name}: expected an array, got {type(a)}.")
    a = jnp.asarray(a)
    if a.ndim < 2:
        raise ValueError(f"{name}: expected shape (..., n, n); got {a.shape}.")
    if square and a.shape[-1] != a.shape[-2]:
        raise ValueError(
            f"{name}: expected a square matrix (..., n, n); got shape {a.shape}."
        )
    if a.size == 0:
        raise ValueError(
            f"{name}: expected a non-empty array; got shape {a.shape} (size 0)."
        )
    if not jnp.issubdtype(a.dtype, jnp.floating):
        raise TypeError(
            f"{name}: expected a real floating dtype (float32 or float64); got "
            f"{a.dtype}. Convert integers with .astype(float)."
        )
    if a.dtype not in (jnp.float32, jnp.float64):
        raise TypeError(
            f"{name}: only float32 and float64 are supported; got {a.dtype} "
            "(compute in float32 and cast the result)."
        )
    return a


# --------------------------------------------------------------------------------------
# Layer selection (tree surgery)
# --------------------------------------------------------------------------------------


def is_linear(x) -> bool:
    return isinstance(x, eqx.nn.Linear)


def is_conv(x) -> bool:
    """An ungrouped `eqx.nn.Conv` (any number of spatial dimensions)."""
    return isinstance(x, eqx.nn.Conv) and x.groups == 1


def select_linear_layers(model, where, name: str, *, convs: bool = False):
    """Resolve `where` (a `model -> layer | sequence of layers` selector, default: every
    `eqx.nn.Linear`, and every ungrouped `eqx.nn.Conv` if `convs`) to
    `(where, layers, single)`, checking the type of every selected layer. Replace with
    `eqx.tree_at(where, model, new[0] if single else new)`."""

    def ok(x):
        return is_linear(x) or (convs and is_conv(x))

    if where is None:

        def where(m):
            return [x for x in jtu.tree_leaves(m, is_leaf=ok) if ok(x)]

    selected = where(model)
    single = not isinstance(selected, (list, tuple))
    layers = [selected] if single else list(selected)
    if not layers:
        raise ValueError(f"{name}: `where` selected no layers.")
    kinds = "(non-scalar) eqx.nn.Linear"
    kinds += " or ungrouped eqx.nn.Conv" if convs else ""
    for layer in layers:
        if not ok(layer) or (is_linear(layer) and layer.in_features == "scalar"):
            raise TypeError(
                f"{name}: can only handle {kinds} layers; `where` selected a "
                f"{type(layer).__name__}."
            )
    return where, layers, single


def truncation_rank(sigma: Array, tol, max_rank: int) -> Array:
    """Smallest r with ||sigma[r:]||_2 <= tol ||sigma||_2 (sigma sorted descending),
    clipped to [1, max_rank]. Traceable; the one truncation rule of DLRT, TRP and
    `compress`."""
    tail = jnp.sqrt(jnp.cumsum(jnp.square(sigma[::-1]))[::-1])  # tail[i] = ||s[i:]||
    ok = jnp.concatenate([tail[1:], jnp.zeros((1,), sigma.dtype)]) <= tol * tail[0]
    r = jnp.argmax(ok) + 1  # first index i with ||s[i+1:]|| <= tol ||s||
    return jnp.clip(r, 1, max_rank)
