"""Small helpers shared across `solvers`: the conjugate-gradient iteration
(HIGHEST-precision products come from `jaxdecomp._misc.mm`)."""

from __future__ import annotations

import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp

from jaxdecomp._misc import mm


def scaled_cg_loop(matvec, precond, b, x0, *, atol, **options):
    """`cg_loop` on the problem scaled by s = max|b| (A (x / s) = b / s), so that the
    norms in the stopping test neither underflow (||b|| ~ 1e-25 in float32 would
    give a zero tolerance) nor overflow (~1e25 would give inf). The returned residual
    norms are in the original units; b = 0 gives x = 0."""
    s = lax.stop_gradient(jnp.max(jnp.abs(b)))
    s = jnp.where((s > 0) & jnp.isfinite(s), s, 1).astype(b.dtype)
    x, (k, norms, converged, rnorm) = cg_loop(
        matvec, precond, b / s, x0 / s, atol=atol / s, **options
    )
    return x * s, (k, norms * s, converged, rnorm * s)


def cg_loop(
    matvec, precond, b, x0, *, rtol, atol, max_steps, flexible, unroll, memory=1
):
    """The (flexible) preconditioned CG iteration behind `solvers.cg` and the OT
    solvers' inner solves. Returns `x, (steps, residual_norms, converged, ||r||)`.

    Flexible CG is Notay's FCG(memory): each new direction is A-orthogonalised
    against the last `memory` directions, kept in fixed-size ring buffers."""
    tol = jnp.maximum(rtol * jnp.linalg.norm(lax.stop_gradient(b)), atol)
    r0 = b - matvec(x0)
    z0 = precond(r0)
    norms0 = jnp.full((max_steps + 1,), jnp.nan, b.dtype)
    norms0 = norms0.at[0].set(jnp.linalg.norm(r0))
    m = memory if flexible else 0
    # ring buffers: directions p_j, A p_j and p_j^T A p_j (1 where empty: no effect)
    ring = (
        jnp.zeros((m, b.shape[0]), b.dtype),
        jnp.zeros((m, b.shape[0]), b.dtype),
        jnp.ones((m,), b.dtype),
    )
    rz0 = jnp.vdot(r0, z0)
    init = (x0, r0, z0, z0, rz0, ring, norms0, jnp.array(0), jnp.array(False))

    def cond(s):
        *_, k, stop = s
        return ~stop & (k < max_steps)

    def body(s):
        x, r, z, p, rz, ring, norms, k, _ = s
        ap = matvec(p)
        pap = jnp.vdot(p, ap)
        breakdown = ~(pap > 0) | ~(rz > 0)  # non-SPD operator or preconditioner
        # flexible: alpha = p^T r / p^T A p (= r^T z / p^T A p for a fixed SPD M)
        num = jnp.vdot(p, r) if flexible else rz
        alpha = jnp.where(breakdown, 0, num / jnp.where(breakdown, 1, pap))
        # on breakdown keep the last iterate (p may hold NaN from a broken M^{-1})
        x = jnp.where(breakdown, x, x + alpha * p)
        r_new = jnp.where(breakdown, r, r - alpha * ap)
        z_new = precond(r_new)
        rz_new = jnp.vdot(r_new, z_new)
        if flexible:
            ps, aps, paps = ring
            i = k % m
            ps, aps = ps.at[i].set(p), aps.at[i].set(ap)
            paps = paps.at[i].set(jnp.where(breakdown, 1, pap))
            ring = (ps, aps, paps)
            coef = mm(aps, z_new) / paps
            p = z_new - mm(coef, ps)
        else:
            beta = jnp.where(breakdown, 0, rz_new / jnp.where(breakdown, 1, rz))
            p = z_new + beta * p
        norm = jnp.linalg.norm(r_new)
        norms = norms.at[k + 1].set(norm)
        stop = (norm <= tol) | breakdown | ~jnp.isfinite(norm)
        return x, r_new, z_new, p, rz_new, ring, norms, k + 1, stop

    if unroll:
        out = eqx.internal.while_loop(
            cond, body, init, max_steps=max_steps, kind="checkpointed"
        )
    else:
        out = lax.while_loop(cond, body, init)
    x, r, _, _, _, _, norms, k, _ = out
    # the stop flag also fires on breakdown; convergence is judged on the residual
    return x, (k, norms, jnp.linalg.norm(r) <= tol, jnp.linalg.norm(r))


def pcg(matvec, b, inv_diag, rtol, max_steps: int):
    """Jacobi-preconditioned CG from 0 (the inner solver of the OT solvers): returns
    the iterate, the step count and whether it converged."""
    x, (k, _, converged, _) = scaled_cg_loop(
        matvec,
        lambda r: inv_diag * r,
        b,
        jnp.zeros_like(b),
        rtol=rtol,
        atol=0.0,
        max_steps=max_steps,
        flexible=False,
        unroll=False,
    )
    return x, k, converged


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
