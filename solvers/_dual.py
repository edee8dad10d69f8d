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

from jaxdecomp._misc import default_tol

from ._geometry import error_if_devices, sum_devices
from ._kernel import Kernel
from ._misc import pcg


def safe_log(w):
    """log w, with 0 at w = 0 (the convention for zero weights)."""
    return jnp.where(w > 0, jnp.log(jnp.where(w > 0, w, 1)), 0)


@jax.custom_jvp
def _xlogx(a):
    return jnp.sum(a * safe_log(a))


@_xlogx.defjvp
def _xlogx_jvp(primals, tangents):
    # d(a log a) = (log a + 1) da, with log 0 := 0 (matching the zero-weight
    # convention of the potentials, so the Danskin derivative stays finite).
    (a,), (da,) = primals, tangents
    return _xlogx(a), jnp.sum((safe_log(a) + 1) * da)


def _dual(kernel: Kernel, a, b, eps, f, g):
    # <f,a> + <g,b> - eps sum(P) + eps sum(a) sum(b) - eps (H-terms): at the optimum
    # this equals <P,C> + eps KL(P || a b^T).
    r, _ = kernel.plan(f, g, eps).marginals()
    xlogx_a = sum_devices(_xlogx(a), kernel.axis_name)
    return (
        kernel.rdot(f, a)
        + jnp.vdot(g, b)
        - eps * kernel.rsum(r)
        + eps * kernel.rsum(a) * jnp.sum(b)
        - eps * (xlogx_a + _xlogx(b))
    )


def _semi_dual(kernel: Kernel, a, b, eps, g):
    """The optimal dual value near $g$, computed without the $\\varepsilon\\log a$,
    $\\varepsilon\\log b$ the potentials carry.

    With $M = \\sum a$, $\\alpha = a / M$, $\\beta = b / \\sum b$, $\\tilde g = g -
    \\varepsilon \\log b$ centred ($\\tilde g - \\langle \\beta, \\tilde
    g\\rangle$), one Sinkhorn iteration in these variables,
    $f'_i = -\\varepsilon\\log\\sum_j \\beta_j e^{(\\tilde g_j - C_{ij})/\\varepsilon}$
    and $g''_j = -\\varepsilon\\log\\sum_i \\alpha_i e^{(f'_i - C_{ij})/\\varepsilon}$
    (`f_mean`, `g_mean`: expm1/log1p where the means are close to 1), then the
    semi-dual in $f$:

    $$M\\big(\\langle \\alpha, f'\\rangle + \\langle\\beta, g''\\rangle\\big) -
    \\varepsilon M(\\log M + 1 - M).$$

    At the optimum this is `_dual`, but term by term of the size of the costs, so
    float32 keeps the value's digits at $\\varepsilon \\gg \\max|C|$, where `_dual`
    cancels terms of size $\\varepsilon \\log n$ (0.5 for 0.32 at $10^6$). The error
    of $g$ (its rounding, about $10^{-7}\\varepsilon$ in float32, and what `tol`
    leaves) enters at second order only (the semi-dual is stationary at the
    optimum), after the iteration has contracted it (strongly at large
    $\\varepsilon$, where float32 Newton steps leave $g$ noisy along flat
    directions: 1% of the value at $10^8$ without it)."""
    ma, mb = kernel.mask_a, kernel.mask_b
    mass = kernel.rsum(a)
    beta = jnp.where(mb, b, 0) / jnp.sum(b)
    gt = jnp.where(mb, g - eps * safe_log(b), 0)
    gt = jnp.where(mb, gt - jnp.vdot(beta, gt), 0)
    fp = jnp.where(ma, kernel.f_mean(gt, b, eps), 0)
    gpp = jnp.where(mb, kernel.g_mean(fp, a, eps), 0)
    return (
        kernel.rdot(a, fp)
        + mass * jnp.vdot(beta, gpp)
        - eps * mass * (jnp.log(mass) + 1 - mass)
    )


@jax.custom_jvp
def dual_value(kernel, a, b, eps, f, g) -> Float[Array, ""]:
    """Entropic OT cost at the solved potentials: the semi-dual at `g` (accurate
    at any epsilon, see `_semi_dual`); derivative by Danskin on the dual at
    (`f`, `g`) (the potentials' tangents are not needed: the dual is stationary in
    them). `f` must be the c-transform of `g` (the solvers' last update is one)."""
    del f
    return _semi_dual(kernel, a, b, eps, g)


@dual_value.defjvp
def _dual_value_jvp(primals, tangents):
    kernel, a, b, eps, f, g = primals
    dk, da, db, deps, _, _ = tangents
    _, tangent = jax.jvp(
        lambda k, a, b, eps: _dual(k, a, b, eps, f, g),
        (kernel, a, b, eps),
        (dk, da, db, deps),
    )
    return dual_value(kernel, a, b, eps, f, g), tangent


def gauge(kernel, f, g, a, b):
    """Shift (f + t, g - t) so that <a, f> = <b, g> (a smooth gauge choice)."""
    t = (jnp.vdot(b, g) - kernel.rdot(a, f)) / (kernel.rsum(a) + jnp.sum(b))
    return f + t, g - t


_TANGENT_FAILED = (
    "optimal transport: the linear solve of the implicit derivative (the tangent or "
    "cotangent of the potentials) did not converge, so the derivative would be wrong. "
    "The problem is probably too ill-conditioned at this epsilon and dtype: use "
    "float64 or a larger epsilon."
)


def _tangent(throw, kernel, a, b, eps, f, g, dk, da, db, deps):
    """Linearised marginal constraints, solved for (df, dg) by PCG on the Schur
    complement S = diag(P^T 1) - P^T diag(1/(P 1)) P (gauge direction 1 removed).

    Zero-weight entries are constants of the problem (their weights' tangents are
    dropped); their potentials are c-transforms, differentiated as such."""
    ma, mb = kernel.mask_a, kernel.mask_b

    def marginals(k, eps):
        plan = k.plan(f, g, eps)
        return plan.marginals(), plan

    # With f, g fixed, d(P1) = -(1/eps) sum_j P_ij (dC_ij + (f_i + g_j - C_ij)
    # deps / eps), so the linearised constraints' right-hand sides are
    # eps (da - d(P1)) and eps (db - d(P^T 1)): one pass, forward mode (the
    # primal plan comes back as the aux, formed once).
    (r, col), (dr, dcol), plan = jax.jvp(
        marginals, (kernel, eps), (dk, deps), has_aux=True
    )
    r = jnp.where(ma, r, 1)
    u = eps * (jnp.where(ma, da, 0) - dr)
    v = eps * (jnp.where(mb, db, 0) - dcol)
    m_kept = jnp.sum(mb).astype(r.dtype)
    rhs = jnp.where(mb, v - plan.rmv(u / r), 0)
    # Only mass-preserving perturbations keep the problem balanced: drop the rest.
    rhs = jnp.where(mb, rhs - jnp.sum(rhs) / m_kept, 0)
    shift = jnp.sum(col) / m_kept

    def matvec(x):
        gauge_term = shift * jnp.where(mb, jnp.sum(jnp.where(mb, x, 0)) / m_kept, x)
        return col * x - plan.rmv(plan.mv(x) / r) + gauge_term

    inv_diag = 1.0 / (col - plan.sq_rmv(1.0 / r) + jnp.where(mb, shift / m_kept, shift))
    tol = default_tol(r.dtype, 2 / 3)
    m = col.shape[0]

    def solve(matvec, rhs):
        y, _, converged = pcg(matvec, rhs, inv_diag, tol, 10 * m)
        if throw:
            return error_if_devices(
                y,
                ~converged,
                lambda y, bad: eqx.error_if(y, bad, _TANGENT_FAILED),
                kernel.axis_name,
            )
        return jnp.where(converged, y, jnp.nan)

    dg = lax.custom_linear_solve(matvec, rhs, solve, symmetric=True)
    df = (u - plan.mv(dg)) / r

    def c_transforms(df, dg):
        # zero-weight rows: f_i = f_hat_i(g); columns: g_j = g_hat_j(f)
        _, df_hat = jax.jvp(
            lambda g, k, e: k.f_hat(g, e), (g, kernel, eps), (dg, dk, deps)
        )
        df = jnp.where(ma, df, df_hat)
        _, dg_hat = jax.jvp(
            lambda f, k, e: k.g_hat(f, e), (f, kernel, eps), (df, dk, deps)
        )
        return df, jnp.where(mb, dg, dg_hat)

    padded = ~(kernel.rall(ma) & jnp.all(mb))
    return lax.cond(padded, c_transforms, lambda df, dg: (df, dg), df, dg)


def _zero_tangent(x):
    if jnp.issubdtype(jnp.result_type(x), jnp.inexact):
        return jnp.zeros_like(x)
    return np.zeros(jnp.shape(x), jax.dtypes.float0)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def implicit_solve(run: Callable, throw: bool, kernel, a, b, eps, init):
    """`run(kernel, a, b, eps, init) -> (f, g, aux)` with derivatives of (f, g) by
    the implicit function theorem on the marginal constraints (forward, reverse, any
    order; `init` is not differentiated). A tangent or cotangent solve that does not
    converge raises (`throw`) or gives NaN, never a silently wrong derivative."""
    return run(kernel, a, b, eps, init)


@implicit_solve.defjvp
def _implicit_solve_jvp(run, throw, primals, tangents):
    kernel, a, b, eps, init = primals
    dk, da, db, deps, _ = tangents
    out = implicit_solve(run, throw, *primals)
    f, g, aux = out
    df, dg = _tangent(throw, kernel, a, b, eps, f, g, dk, da, db, deps)
    return out, (df, dg, jtu.tree_map(_zero_tangent, aux))
