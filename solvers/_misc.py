"""Small helpers shared across `solvers`: the conjugate-gradient iteration
(HIGHEST-precision products come from `jaxdecomp._misc.mm`)."""

from __future__ import annotations

import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp


def cg_loop(matvec, precond, b, x0, *, rtol, atol, max_steps, flexible, unroll):
    """The (flexible) preconditioned CG iteration behind `solvers.cg` and the OT
    solvers' inner solves. Returns `x, (steps, residual_norms, converged, ||r||)`."""
    tol = jnp.maximum(rtol * jnp.linalg.norm(lax.stop_gradient(b)), atol)
    r0 = b - matvec(x0)
    z0 = precond(r0)
    norms0 = jnp.full((max_steps + 1,), jnp.nan, b.dtype)
    norms0 = norms0.at[0].set(jnp.linalg.norm(r0))
    init = (x0, r0, z0, z0, jnp.vdot(r0, z0), norms0, jnp.array(0), jnp.array(False))

    def cond(s):
        *_, k, stop = s
        return ~stop & (k < max_steps)

    def body(s):
        x, r, z, p, rz, norms, k, _ = s
        ap = matvec(p)
        pap = jnp.vdot(p, ap)
        breakdown = ~(pap > 0) | ~(rz > 0)  # non-SPD operator or preconditioner
        alpha = jnp.where(breakdown, 0, rz / jnp.where(breakdown, 1, pap))
        # on breakdown keep the last iterate (p may hold NaN from a broken M^{-1})
        x = jnp.where(breakdown, x, x + alpha * p)
        r_new = jnp.where(breakdown, r, r - alpha * ap)
        z_new = precond(r_new)
        rz_new = jnp.vdot(r_new, z_new)
        # Flexible CG (Polak-Ribiere): beta = <r_new, z_new - z> / <r, z>.
        num = rz_new - jnp.vdot(r_new, z) if flexible else rz_new
        beta = jnp.where(breakdown, 0, num / jnp.where(breakdown, 1, rz))
        p = z_new + beta * p
        norm = jnp.linalg.norm(r_new)
        norms = norms.at[k + 1].set(norm)
        stop = (norm <= tol) | breakdown | ~jnp.isfinite(norm)
        return x, r_new, z_new, p, rz_new, norms, k + 1, stop

    if unroll:
        out = eqx.internal.while_loop(
            cond, body, init, max_steps=max_steps, kind="checkpointed"
        )
    else:
        out = lax.while_loop(cond, body, init)
    x, r, _, _, _, norms, k, _ = out
    # the stop flag also fires on breakdown; convergence is judged on the residual
    return x, (k, norms, jnp.linalg.norm(r) <= tol, jnp.linalg.norm(r))


def pcg(matvec, b, inv_diag, rtol, max_steps: int):
    """Jacobi-preconditioned CG from 0 (the inner solver of the OT solvers): returns
    the iterate and the step count."""
    x, (k, *_) = cg_loop(
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
    return x, k


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
