"""Small helpers shared across `solvers`: the Jacobi-PCG of the OT solvers (on
`jaxdecomp._cg_loop`), operator registration, symbolic-zero helpers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jax.custom_derivatives import SymbolicZero

from jaxdecomp._cg_loop import scaled_cg_loop


def pcg(
    matvec, b, inv_diag, rtol, max_steps: int, deflation=None, window=0, verify=True
):
    """Jacobi-preconditioned CG from 0 (the inner solver of the OT solvers): returns
    the iterate, the step count, whether it converged (on the true residual with
    `verify`), and the recorded directions (`cg_loop`'s `deflation` and `window`;
    None without a window)."""
    x, (k, _, converged, _, _), recorded = scaled_cg_loop(
        matvec,
        lambda r: inv_diag * r,
        b,
        jnp.zeros_like(b),
        rtol=rtol,
        atol=0.0,
        max_steps=max_steps,
        flexible=False,
        unroll=False,
        deflation=deflation,
        window=window,
        verify=verify,
    )
    return x, k, converged, recorded


def register_operator(cls, *, symmetric, psd, diagonal=None):
    """Register a `lineax.AbstractLinearOperator` subclass with lineax's
    `singledispatch` queries (tags, `linearise`, `materialise`, `diagonal`, ...), so
    that lineax solvers accept it. `symmetric`/`psd` map an instance to a bool."""
    import lineax as lx

    lx.linearise.register(cls)(lambda op: op)
    lx.materialise.register(cls)(lambda op: op)
    lx.conj.register(cls)(lambda op: op)  # real operators only
    lx.is_symmetric.register(cls)(symmetric)
    lx.is_positive_semidefinite.register(cls)(psd)
    lx.is_negative_semidefinite.register(cls)(lambda op: False)
    lx.has_unit_diagonal.register(cls)(lambda op: False)
    for query in (
        lx.is_diagonal,
        lx.is_tridiagonal,
        lx.is_lower_triangular,
        lx.is_upper_triangular,
    ):
        query.register(cls)(lambda op: False)
    lx.diagonal.register(cls)(
        diagonal if diagonal is not None else lambda op: jnp.diag(op.as_matrix())
    )

    def _tridiagonal(op):
        m = op.as_matrix()
        return jnp.diag(m), jnp.diag(m, -1), jnp.diag(m, 1)

    lx.tridiagonal.register(cls)(_tridiagonal)
    return cls


def is_zero(t):
    return isinstance(t, SymbolicZero) or (
        isinstance(t, (jax.Array, np.ndarray)) and t.dtype == jax.dtypes.float0
    )


def jvp_live(fn, primals, tangents, has_aux=False):
    """`jax.jvp(fn, primals, tangents)` where the tangents may hold symbolic zeros
    (or float0 leaves): those leaves are held fixed instead of being instantiated as
    arrays of zeros. Cheaper, and it avoids a JAX 0.10 defect: inside `jax.shard_map`
    under `jax.jit`, a zero tangent instantiated for a replicated input (the cloud
    `y` when only `x` is differentiated) made forward-mode derivatives NaN or
    garbage (1e258; reduced: `jnp.maximum(x @ y.T, 0.3)` with a zero `dy`).
    Returns `(out, tangent_out[, aux])`; no live tangent: zeros."""
    p_leaves, tree = jtu.tree_flatten(primals)
    t_leaves = jtu.tree_leaves(tangents, is_leaf=is_zero)
    if len(t_leaves) != len(p_leaves):
        raise AssertionError("jvp_live: tangents do not match the primals")
    live = [i for i, t in enumerate(t_leaves) if not is_zero(t)]

    def partial_fn(*live_p):
        leaves = list(p_leaves)
        for i, v in zip(live, live_p):
            leaves[i] = v
        return fn(*jtu.tree_unflatten(tree, leaves))

    args = [p_leaves[i] for i in live]
    dargs = [t_leaves[i] for i in live]
    if has_aux:
        if not live:
            out, aux = fn(*primals)
            return out, jtu.tree_map(jnp.zeros_like, out), aux
        return jax.jvp(partial_fn, args, dargs, has_aux=True)
    if not live:
        out = fn(*primals)
        return out, jtu.tree_map(jnp.zeros_like, out)
    return jax.jvp(partial_fn, args, dargs)
