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

from ._geometry import error_if_devices, invariant, sum_devices, varying
from ._kernel import Kernel
from ._misc import is_zero, jvp_live, pcg


def safe_log(w):
    """log w, with 0 at w = 0 (the convention for zero weights)."""
    return jnp.where(w > 0, jnp.log(jnp.where(w > 0, w, 1)), 0)


def _hat_potentials(kernel: Kernel, a, b, eps, g):
    """Potentials without the $\\varepsilon\\log a$, $\\varepsilon\\log b$ that `f`,
    `g` carry: $(f', \\tilde g, M)$ with $P_{ij} = a_i b_j e^{L_{ij}}$, $L_{ij} =
    (\\tilde f_i + \\tilde g_j - C_{ij})/\\varepsilon$, $\\tilde f = f' -
    \\varepsilon\\log M$, $f'$ and $\\tilde g$ of the size of the costs.

    With $M = \\sum a$, $\\beta = b / \\sum b$ and $\\tilde g = g -
    \\varepsilon\\log b$ centred under $\\beta$: $f'_i = -\\varepsilon\\log\\sum_j
    \\beta_j e^{(\\tilde g_j - C_{ij})/\\varepsilon}$ (`Kernel.f_mean`), and where
    every row's exponents span less than 1 ($\\varepsilon$ above the costs' spread)
    $\\tilde g$ is replaced by $-\\varepsilon\\log\\sum_i (a_i/M) e^{(f'_i -
    C_{ij})/\\varepsilon}$ (`Kernel.g_mean`): the means by expm1/log1p, so float32
    keeps their digits at $\\varepsilon \\gg \\max|C|$, where
    $\\varepsilon\\log a$ alone rounds by more than the costs (0.25 at
    $\\varepsilon = 10^6$). The error of $g$ (that rounding, and what `tol` leaves)
    enters the value at second order (the dual is stationary); the extra half
    iteration contracts it first where it is large (float32 Newton steps leave $g$
    noisy along flat directions at large $\\varepsilon$: 1% of the value at $10^8$
    without it). Zero-weight entries get the c-transforms (finite)."""
    mb = kernel.mask_b
    mass = kernel.rsum(a)
    beta = jnp.where(mb, b, 0) / jnp.sum(b)
    gt = jnp.where(mb, g - eps * safe_log(b), 0)
    gt = gt - jnp.vdot(beta, gt)
    fp, near = kernel.f_mean(gt, b, eps)
    # the iteration's second half only where it matters (epsilon above the cost's
    # spread: there Newton's float32 g is noisy); otherwise f' is the exact
    # c-transform of the centred g. Either way one marginal is exact, which makes
    # the dual's exponential sum vanish (`_hat_value`).
    gpp = lax.cond(near, lambda: kernel.g_mean(fp, a, eps), lambda: gt)
    return fp, gpp, mass


def _pair_sum(kernel: Kernel, a, b, eps, fp, gt, shift, phi):
    """$\\sum_{ij} a_i b_j\\,\\varphi(L'_{ij} - \\mathrm{shift})$, $L'_{ij} = (f'_i +
    \\tilde g_j - C_{ij})/\\varepsilon$, in one pass over the cost. (`a`, `b`
    themselves, zero at zero weights, not masked copies: the derivative in a zero
    weight is then the c-transform's, finite, as for the potentials.)"""

    def fn(c, fb, ab):
        big_l = (fb[:, None] + gt[None, :] - c) / eps - shift
        return None, jnp.sum(ab[:, None] * b[None, :] * phi(big_l))

    _, s = kernel.geom.row_pass(fn, (fp, a))
    return sum_devices(s, kernel.axis_name)


def _hat_value(kernel: Kernel, a, b, eps, fp, gt, mass0):
    """`_hat_dual` where one marginal is exact (its sum of expm1 is then 0): no pass
    over the cost. $M(\\langle\\alpha, f'\\rangle + \\langle\\beta, \\tilde
    g\\rangle) - \\varepsilon M(\\log M + 1 - M)$ at $M_0 = M$."""
    mass_a = kernel.rsum(a)
    return (
        kernel.rdot(a, fp)
        - eps * jnp.log(mass0) * mass_a
        + jnp.vdot(b, gt)
        - eps * (1 / mass0 - 1) * mass_a * jnp.sum(b)
    )


def _hat_dual(kernel: Kernel, a, b, eps, fp, gt, mass0):
    """The dual in the hat potentials: $\\langle a, \\tilde f\\rangle + \\langle b,
    \\tilde g\\rangle - \\varepsilon\\sum_{ij} a_i b_j\\,\\mathrm{expm1}(L_{ij})$ (the
    usual $\\langle a, f\\rangle + \\langle b, g\\rangle - \\varepsilon\\sum P +
    \\varepsilon \\sum a \\sum b - \\varepsilon H(a) - \\varepsilon H(b)$ at
    $f = \\tilde f + \\varepsilon\\log a$, without its cancelling terms of size
    $\\varepsilon\\log n$). At the optimum it is $\\langle P, C\\rangle +
    \\varepsilon\\,\\mathrm{KL}(P\\,\\|\\,ab^T)$. With $\\tilde f = f' -
    \\varepsilon\\log M_0$ ($M_0$ fixed, like the potentials) the sum is $\\sum a_i
    b_j\\,\\mathrm{expm1}(L'_{ij}) / M_0 + (1/M_0 - 1)\\sum a \\sum b$, so that no
    exponent carries $\\log M_0$ (its rounding would cost digits at mass $\\ne 1$)."""
    s = _pair_sum(kernel, a, b, eps, fp, gt, 0.0, jnp.expm1)
    return _hat_value(kernel, a, b, eps, fp, gt, mass0) - eps * s / mass0


# phi(L) = L e^L - expm1(L) = sum_{k>=2} (k - 1) L^k / k!, by its series for |L| < 0.1
# (truncated at k = 10: relative error < 1e-16) where the formula cancels
_PHI = tuple((k - 1) / float(np.prod(np.arange(1, k + 1))) for k in range(10, 1, -1))


def _phi(x):
    small = jnp.abs(x) < 0.1
    xs = jnp.where(small, x, 0)
    series = _PHI[0]
    for coef in _PHI[1:]:
        series = series * xs + coef
    xl = jnp.where(small, 1.0, x)
    return jnp.where(small, series * xs * xs, xl * jnp.exp(xl) - jnp.expm1(xl))


def _hat_kl(kernel: Kernel, a, b, eps, fp, gt, mass0):
    """$\\partial/\\partial\\varepsilon$ of `_hat_dual` at fixed hat potentials,
    $\\sum_{ij} a_i b_j \\varphi(L_{ij})$, $\\varphi(L) = L e^L - \\mathrm{expm1}(L)
    \\ge 0$ (at the optimum the generalised $\\mathrm{KL}(P\\,\\|\\,ab^T)$, the
    derivative of the entropic cost in $\\varepsilon$). Autodiff of `_hat_dual` would
    subtract two sums of size $|L|$ to get one of size $L^2$: in float32 at
    $\\varepsilon = 10^4$ that gave $-2\\cdot 10^{-6}$ for $2.5\\cdot 10^{-10}$."""
    return _pair_sum(kernel, a, b, eps, fp, gt, jnp.log(mass0), _phi)


@jax.custom_jvp
def dual_value(kernel, a, b, eps, f, g) -> Float[Array, ""]:
    """Entropic OT cost at the solved potentials, from the hat potentials of `g`
    (`_hat_potentials`: accurate at any epsilon, also in float32); `f` (the
    c-transform of `g`, as the solvers return it) is not used. Derivative by
    Danskin: the dual is stationary in the potentials, so its partial derivatives
    at fixed hat potentials are the derivative ($\\partial/\\partial C = P$,
    $\\partial/\\partial a_i = \\tilde f_i$ + const, $\\partial/\\partial\\varepsilon
    = \\mathrm{KL}(P\\,\\|\\,ab^T)$ by `_hat_kl`); higher orders differentiate that
    through the implicit potentials."""
    del f
    return _hat_value(kernel, a, b, eps, *_hat_potentials(kernel, a, b, eps, g))


def _dual_value_jvp(primals, tangents):
    kernel, a, b, eps, f, g = primals
    dk, da, db, deps, _, _ = tangents
    hat = _hat_potentials(kernel, a, b, eps, g)

    _, tangent = jvp_live(
        lambda k, a, b: _hat_dual(k, a, b, eps, *hat), (kernel, a, b), (dk, da, db)
    )
    value = _hat_value(kernel, a, b, eps, *hat)
    if not is_zero(deps):  # (a pass over the cost: only if needed)
        tangent = tangent + deps * _hat_kl(kernel, a, b, eps, *hat)
    return value, tangent


dual_value.defjvp(_dual_value_jvp, symbolic_zeros=True)


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
    dropped); their potentials are c-transforms, differentiated as such. Runs on XLA
    passes (`Kernel.unfused`): its maps of the tangents are transposed in reverse
    mode."""
    kernel = kernel.unfused()
    ma, mb = kernel.mask_a, kernel.mask_b

    def marginals(k, eps):
        plan = k.plan(f, g, eps)
        return plan.marginals(), plan

    # With f, g fixed, d(P1) = -(1/eps) sum_j P_ij (dC_ij + (f_i + g_j - C_ij)
    # deps / eps), so the linearised constraints' right-hand sides are
    # eps (da - d(P1)) and eps (db - d(P^T 1)): one pass, forward mode (the
    # primal plan comes back as the aux, formed once).
    (r, col), (dr, dcol), plan = jvp_live(
        marginals, (kernel, eps), (dk, deps), has_aux=True
    )
    r = jnp.where(ma, r, 1)
    u = eps * (-dr if is_zero(da) else jnp.where(ma, da, 0) - dr)
    v = eps * (-dcol if is_zero(db) else jnp.where(mb, db, 0) - dcol)
    m_kept = jnp.sum(mb).astype(r.dtype)
    rhs = jnp.where(mb, v - plan.rmv(u / r), 0)
    # Only mass-preserving perturbations keep the problem balanced: drop the rest.
    rhs = jnp.where(mb, rhs - jnp.sum(rhs) / m_kept, 0)
    shift = jnp.sum(col) / m_kept
    inv_diag = 1.0 / (col - plan.sq_rmv(1.0 / r) + jnp.where(mb, shift / m_kept, shift))
    tol = jnp.asarray(default_tol(r.dtype, 2 / 3), r.dtype)
    m = col.shape[0]
    # Inside shard_map with check_vma=True the solve runs typed as varying (every
    # device runs the same one, on identical values): custom_linear_solve lifts its
    # right-hand side and its operator's data to the union of their varying axes
    # after tracing them with the unlifted types, which breaks its derivatives, so
    # all of them are varying from the start; `invariant` types the solution as
    # replicated again. Without an axis (or with check_vma=False) nothing changes.
    axis = kernel.axis_name
    op = varying((plan, r, col, shift, m_kept, mb, inv_diag, tol), axis)

    def matvec(x):
        plan, r, col, shift, m_kept, mb, _, _ = op
        gauge_term = shift * jnp.where(mb, jnp.sum(jnp.where(mb, x, 0)) / m_kept, x)
        return col * x - plan.rmv(plan.mv(x) / r) + gauge_term

    def solve(matvec, rhs):
        inv_diag, tol = op[-2:]
        y, _, converged, _ = pcg(matvec, rhs, inv_diag, tol, 10 * m)
        if throw:
            return error_if_devices(
                y,
                ~converged,
                lambda y, bad: eqx.error_if(y, bad, _TANGENT_FAILED),
                axis,
            )
        return jnp.where(converged, y, jnp.nan)

    dg = invariant(
        lax.custom_linear_solve(matvec, varying(rhs, axis), solve, symmetric=True), axis
    )
    df = (u - plan.mv(dg)) / r

    def c_transforms(df, dg):
        # zero-weight rows: f_i = f_hat_i(g); columns: g_j = g_hat_j(f)
        _, df_hat = jvp_live(
            lambda g, k, e: k.f_hat(g, e), (g, kernel, eps), (dg, dk, deps)
        )
        df = jnp.where(ma, df, df_hat)
        _, dg_hat = jvp_live(
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


def _implicit_solve_jvp(run, throw, primals, tangents):
    kernel, a, b, eps, init = primals
    dk, da, db, deps, _ = tangents
    out = implicit_solve(run, throw, *primals)
    f, g, aux = out
    df, dg = _tangent(throw, kernel, a, b, eps, f, g, dk, da, db, deps)
    return out, (df, dg, jtu.tree_map(_zero_tangent, aux))


# symbolic zeros: the tangents of inputs that are not differentiated stay symbolic
# (`jvp_live` holds them fixed instead of forming zeros)
implicit_solve.defjvp(_implicit_solve_jvp, symbolic_zeros=True)
