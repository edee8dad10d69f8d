"""Restarted, right-preconditioned GMRES whose stopping test is the true residual:
the default nonsymmetric tangent solver of `jaxdecomp.custom_root` above
`DENSE_MAX_SIZE` unknowns (through `jaxdecomp.TrueResidualGMRES`)."""

from __future__ import annotations

import jax.lax as lax
import jax.numpy as jnp

from ._cg_loop import _MAX_CHECKS, _PROGRESS, rhs_scale
from ._misc import mm


def gmres_loop(matvec, precond, b, x0, *, rtol, restart, max_steps):
    """GMRES(`restart`) for A x = b, preconditioned on the right (A M u = b, x = M u),
    so that its residual is the residual of A x = b. Returns `x, (steps,
    converged, ||b - A x||, inaccurate, stagnated)` (steps: Arnoldi steps, one
    matvec each; the restart's true-residual matvecs are not counted).

    Each cycle runs Arnoldi (classical Gram-Schmidt applied twice, at HIGHEST
    precision) with Givens rotations, whose last entry |g_j| is the least-squares
    residual of the cycle; the cycle ends when |g_j| reaches the target, after
    `restart` steps, on a (lucky) breakdown h_{j+1,j} = 0, or at `max_steps`.
    The update x <- x + M V y is followed by one matvec: the true residual
    b - A x, the only one the stopping test uses (||b - Ax|| <= rtol ||b||).

    Failures are told apart, as in `cg_loop(verify=True)`: a cycle whose
    least-squares residual reached the target, or fell below half the true
    residual, while the true residual missed the tolerance is a *check* (the
    Krylov model and the true residual disagree: rounding limits the accuracy);
    after a failed check the target is tol / 2, and a check that is not 10% below
    the previous one, or the 8th, sets `inaccurate` (the tolerance is below what
    the dtype attains, about eps ||A|| ||x||). A full cycle that is not a check and
    does not decrease the true residual at all sets `stagnated` (GMRES(m) can
    stall on indefinite or strongly nonnormal systems, e.g. a cyclic shift; a
    larger `restart` may help). Without either, no convergence within `max_steps` steps
    is the remaining failure.

    Why not lineax's GMRES: besides the residual it requires each entry of the
    last cycle's update to be below atol + rtol |y_i|; with an absolute atol,
    entries of y near zero cannot pass that test when y is large (A small), and
    it reported `stagnation` on a healthy system (measured: float32, n = 4096,
    A = 1e-4 (I + 0.3 G / sqrt(n)), tolerance eps^(2/3), its residual 1.4e-7
    relative, while the same system at scale 1 or 1e-2 passed)."""
    # on the problem scaled by s = max|b| (as `scaled_cg_loop`): the norms neither
    # underflow nor overflow
    s = rhs_scale(b)
    x, (steps, converged, beta, inaccurate, stagnated) = _gmres(
        matvec, precond, b / s, x0 / s, rtol=rtol, restart=restart, max_steps=max_steps
    )
    return x * s, (steps, converged, beta * s, inaccurate, stagnated)


def _gmres(matvec, precond, b, x0, *, rtol, restart, max_steps):
    n = b.shape[0]
    m = min(restart, n)
    dtype = b.dtype
    tol = rtol * jnp.linalg.norm(b)

    def cycle(x, r, beta, target, steps):
        """One GMRES(m) cycle from x with true residual r (norm beta)."""
        basis = jnp.zeros((m + 1, n), dtype).at[0].set(r / jnp.where(beta > 0, beta, 1))
        hess = jnp.zeros((m + 1, m), dtype)  # rotated: upper triangular
        g = jnp.zeros((m + 1,), dtype).at[0].set(beta)
        cs = jnp.zeros((m,), dtype)
        sn = jnp.zeros((m,), dtype)

        def cond(c):
            basis, hess, g, cs, sn, j, done = c
            return ~done & (j < m) & (steps + j < max_steps)

        def body(c):
            basis, hess, g, cs, sn, j, _ = c
            w = matvec(precond(basis[j]))
            # classical Gram-Schmidt twice (rows > j of the basis are zero)
            h = mm(basis, w)
            w = w - mm(h, basis)
            h2 = mm(basis, w)
            w = w - mm(h2, basis)
            h = h + h2
            hn = jnp.linalg.norm(w)
            lucky = ~(hn > 0)
            basis = basis.at[j + 1].set(
                jnp.where(lucky, 0, w / jnp.where(lucky, 1, hn))
            )
            col = h.at[j + 1].set(hn)

            # the previous rotations, applied in order to the new column
            def rotate(i, col):
                a, c2 = col[i], col[i + 1]
                new_a = cs[i] * a + sn[i] * c2
                new_c2 = -sn[i] * a + cs[i] * c2
                keep = i < j
                col = col.at[i].set(jnp.where(keep, new_a, a))
                return col.at[i + 1].set(jnp.where(keep, new_c2, c2))

            col = lax.fori_loop(0, m, rotate, col)
            a, c2 = col[j], col[j + 1]
            rho = jnp.hypot(a, c2)
            safe = jnp.where(rho > 0, rho, 1)
            c_j = jnp.where(rho > 0, a / safe, 1)
            s_j = jnp.where(rho > 0, c2 / safe, 0)
            col = col.at[j].set(rho).at[j + 1].set(0)
            cs, sn = cs.at[j].set(c_j), sn.at[j].set(s_j)
            g = g.at[j + 1].set(-s_j * g[j]).at[j].set(c_j * g[j])
            hess = hess.at[:, j].set(col)
            done = (jnp.abs(g[j + 1]) <= target) | lucky | ~jnp.isfinite(g[j + 1])
            return basis, hess, g, cs, sn, j + 1, done

        c = (basis, hess, g, cs, sn, jnp.array(0), ~(beta > target))
        basis, hess, g, cs, sn, j, _ = lax.while_loop(cond, body, c)
        # back substitution on the j x j leading block (identity beyond it)
        used = jnp.arange(m) < j
        upper = jnp.where(
            used[:, None] & used[None, :], hess[:m], jnp.eye(m, dtype=dtype)
        )
        diag = jnp.diagonal(upper)
        upper = upper + jnp.diag(jnp.where(used & (diag == 0), 1, 0).astype(dtype))
        y = lax.linalg.triangular_solve(
            upper, jnp.where(used, g[:m], 0)[:, None], left_side=True, lower=False
        )[:, 0]
        x = x + precond(mm(y, basis[:m]))
        r = b - matvec(x)
        return x, r, jnp.linalg.norm(r), jnp.abs(g[j]), steps + j, j

    def cond(o):
        *_, stop = o
        return ~stop

    def body(o):
        x, r, beta, steps, n_checks, last_check, _, _, _ = o
        target = jnp.where(n_checks > 0, 0.5 * tol, tol)
        x_new, r_new, beta_new, estimate, steps, j = cycle(x, r, beta, target, steps)
        converged = beta_new <= tol
        # a check: the cycle's least-squares residual reached the target, or is
        # below half the true residual (the Krylov model and the true residual
        # disagree: rounding, not the iteration, limits the accuracy)
        checked = ~converged & ((estimate <= target) | (estimate < 0.5 * beta_new))
        inaccurate = checked & (
            ~(beta_new <= _PROGRESS * last_check) | (n_checks + 1 >= _MAX_CHECKS)
        )
        # a full cycle whose own model made no progress either
        stagnated = ~checked & ~converged & (j == m) & ~(beta_new < beta)
        # a cycle that made things worse (rounding) is not taken
        worse = ~(beta_new <= beta)
        x = jnp.where(worse, x, x_new)
        r = jnp.where(worse, r, r_new)
        beta = jnp.where(worse, beta, beta_new)
        stop = (
            converged
            | inaccurate
            | stagnated
            | (steps >= max_steps)
            | ~jnp.isfinite(beta_new)
        )
        n_checks = n_checks + checked.astype(n_checks.dtype)
        last_check = jnp.where(checked, beta_new, last_check)
        return x, r, beta, steps, n_checks, last_check, inaccurate, stagnated, stop

    r0 = b - matvec(x0)
    beta0 = jnp.linalg.norm(r0)
    o = (
        x0,
        r0,
        beta0,
        jnp.array(0),
        jnp.array(0),
        jnp.array(jnp.inf, dtype),
        jnp.array(False),
        jnp.array(False),
        beta0 <= tol,
    )
    x, _, beta, steps, _, _, inaccurate, stagnated, _ = lax.while_loop(cond, body, o)
    return x, (steps, beta <= tol, beta, inaccurate, stagnated)
