"""The entropic OT dual, its Danskin derivative, and implicit differentiation of the
potentials (shared by `sinkhorn` and `sinkhorn_newton`)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, Float

from jaxdecomp._misc import default_tol, mm

from ._misc import pcg


def log_plan(f, g, c, eps):
    return (f[:, None] + g[None, :] - c) / eps


def f_hat(g, c, eps):
    """-eps * logsumexp_j((g_j - C_ij)/eps): the f-update is eps log a + f_hat."""
    return -eps * jax.nn.logsumexp((g[None, :] - c) / eps, axis=1)


def g_hat(f, c, eps):
    return -eps * jax.nn.logsumexp((f[:, None] - c) / eps, axis=0)


def _xlogx(a):
    return jnp.sum(a * jnp.log(a))


def _dual(c, a, b, eps, f, g):
    # <f,a> + <g,b> - eps sum(P) + eps sum(a) sum(b) - eps (H-terms): at the optimum
    # this equals <P,C> + eps KL(P || a b^T).
    p_sum = jnp.sum(jnp.exp(log_plan(f, g, c, eps)))
    return (
        jnp.vdot(f, a)
        + jnp.vdot(g, b)
        - eps * p_sum
        + eps * jnp.sum(a) * jnp.sum(b)
        - eps * (_xlogx(a) + _xlogx(b))
    )


@jax.custom_jvp
def dual_value(c, a, b, eps, f, g) -> Float[Array, ""]:
    """Entropic OT cost by the dual at the potentials `f`, `g`; derivative by Danskin
    (the potentials' tangents are not needed: the dual is stationary in them)."""
    return _dual(c, a, b, eps, f, g)


@dual_value.defjvp
def _dual_value_jvp(primals, tangents):
    c, a, b, eps, f, g = primals
    dc, da, db, deps, _, _ = tangents
    return jax.jvp(
        lambda c, a, b, eps: _dual(c, a, b, eps, f, g),
        (c, a, b, eps),
        (dc, da, db, deps),
    )


def gauge(f, g, a, b):
    """Shift (f + t, g - t) so that <a, f> = <b, g> (a smooth gauge choice)."""
    t = (jnp.vdot(b, g) - jnp.vdot(a, f)) / (jnp.sum(a) + jnp.sum(b))
    return f + t, g - t


_TANGENT_FAILED = (
    "optimal transport: the linear solve of the implicit derivative (the tangent or "
    "cotangent of the potentials) did not converge, so the derivative would be wrong. "
    "The problem is probably too ill-conditioned at this epsilon and dtype: use "
    "float64 or a larger epsilon."
)


def _tangent(throw, c, a, b, eps, f, g, dc, da, db, deps):
    """Linearised marginal constraints, solved for (df, dg) by PCG on the Schur
    complement S = diag(P^T 1) - P^T diag(1/(P 1)) P (gauge direction 1 removed)."""
    p = jnp.exp(log_plan(f, g, c, eps))
    r = jnp.sum(p, axis=1)
    col = jnp.sum(p, axis=0)
    # d log P = (df + dg - dC - (f + g - C) deps / eps) / eps
    dce = dc + (f[:, None] + g[None, :] - c) * (deps / eps)
    u = eps * da + jnp.sum(p * dce, axis=1)
    v = eps * db + jnp.sum(p * dce, axis=0)
    rhs = v - mm(p.T, u / r)
    # Only mass-preserving perturbations keep the problem balanced: drop the rest.
    rhs = rhs - jnp.mean(rhs)
    shift = jnp.mean(col)
    m = col.shape[0]

    def matvec(x):
        return col * x - mm(p.T, mm(p, x) / r) + shift * jnp.mean(x)

    inv_diag = 1.0 / (col - mm((p * p).T, 1.0 / r) + shift / m)
    tol = default_tol(p.dtype, 2 / 3)

    def solve(matvec, rhs):
        y, _, converged = pcg(matvec, rhs, inv_diag, tol, 10 * m)
        if throw:
            return eqx.error_if(y, ~converged, _TANGENT_FAILED)
        return jnp.where(converged, y, jnp.nan)

    dg = lax.custom_linear_solve(matvec, rhs, solve, symmetric=True)
    df = (u - mm(p, dg)) / r
    return df, dg


def _zero_tangent(x):
    if jnp.issubdtype(jnp.result_type(x), jnp.inexact):
        return jnp.zeros_like(x)
    return np.zeros(jnp.shape(x), jax.dtypes.float0)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def implicit_solve(run: Callable, throw: bool, c, a, b, eps):
    """`run(c, a, b, eps) -> (f, g, aux)` with derivatives of (f, g) by the implicit
    function theorem on the marginal constraints (forward, reverse, any order). A
    tangent or cotangent solve that does not converge raises (`throw`) or gives
    NaN, never a silently wrong derivative."""
    return run(c, a, b, eps)


@implicit_solve.defjvp
def _implicit_solve_jvp(run, throw, primals, tangents):
    out = implicit_solve(run, throw, *primals)
    f, g, aux = out
    df, dg = _tangent(throw, *primals, f, g, *tangents)
    return out, (df, dg, jtu.tree_map(_zero_tangent, aux))
