"""Matmul-only Newton–Schulz-type iterations with per-step optimal polynomials.

Three iterations share one driver:

- the coupled square-root iteration (Y -> A^{1/2}, Z -> A^{-1/2}), which is the sign
  iteration on [[0, A], [I, 0]] written in its blocks;
- the sign iteration on [[S, G], [0, -S]], whose off-diagonal block tends to 2 X with
  S X + X S = G (the Lyapunov solve of the backward passes);
- the polar iteration X <- X q(X^T X).

Each step applies an odd quintic p(x) = x (a + b x^2 + c x^4) from `sign_schedule`
(optimal for the current interval), then the classical quintic until the residual is
below `tol`, stops improving (the rounding floor), or `max_steps` is reached.
All matmuls run at HIGHEST precision.
"""

from __future__ import annotations

import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array

from ._misc import eye_like, fro, mm, mT
from ._sign_polynomials import sign_schedule

# Design lower bound of the interval the polynomials are optimal for: covers condition
# numbers up to 1e6 for the square root (its sign interval is sqrt(lambda / c)).
DESIGN_ELL = 1e-3


def _coeffs(dtype) -> Array:
    return jnp.asarray(sign_schedule(DESIGN_ELL), dtype)


def _max_residual(r: Array) -> Array:
    # One loop for a whole batch: iterate until every member is done.
    return jnp.max(r) if r.ndim else r


def _drive(step, state, res0, dtype, tol, max_steps: int):
    """Run `state, res = step(state, coeffs)` until res <= tol, stagnation after the
    schedule, or max_steps. Returns (state, n_steps, residual)."""
    coeffs = _coeffs(dtype)
    n_sched = coeffs.shape[0] - 1

    def cond(carry):
        k, _, res, prev = carry
        stalled = (k > n_sched) & (res > 0.5 * prev)
        return (k < max_steps) & (res > tol) & ~stalled

    def body(carry):
        k, state, res, _ = carry
        state, new_res = step(state, coeffs[jnp.minimum(k, n_sched)])
        return k + 1, state, _max_residual(new_res), res

    res0 = _max_residual(res0)
    init = (jnp.asarray(0), state, res0, jnp.full_like(res0, jnp.inf))
    k, state, res, _ = lax.while_loop(cond, body, init)
    return state, k, res


def _upper_bound_eig(a: Array) -> Array:
    """An upper bound on the spectral radius of symmetric `a`: min(||a||_F, ||a||_1)."""
    one = jnp.max(jnp.sum(jnp.abs(a), axis=-2), axis=-1)
    return jnp.minimum(fro(a), one)[..., None, None]


def coupled_sqrt(a: Array, tol, max_steps: int):
    """(A^{1/2}, A^{-1/2}, n_steps, residual ||ZY - I||_F / sqrt(n)) for SPD `a`."""
    n = a.shape[-1]
    c = _upper_bound_eig(a)
    eye = eye_like(a)
    y = a / c
    z = eye
    m = y  # = z @ y

    def step(state, co):
        y, z, m = state
        m2 = mm(m, m)
        t = co[0] * eye + co[1] * m + co[2] * m2
        y, z = mm(y, t), mm(t, z)
        m = mm(z, y)
        return (y, z, m), fro(m - eye) / jnp.sqrt(n)

    (y, z, _), k, res = _drive(
        step, (y, z, m), fro(m - eye) / jnp.sqrt(n), a.dtype, tol, max_steps
    )
    sc = jnp.sqrt(c)
    return y * sc, z / sc, k, res


def sign_lyapunov(s: Array, g: Array, tol, max_steps: int):
    """X with S X + X S = G for SPD `s` (any `g`), by the sign iteration. The residual
    returned also measures ||sign(S) - I||, so an indefinite `s` shows as failure."""
    n = s.shape[-1]
    c = _upper_bound_eig(s)
    eye = eye_like(s)
    p = s / c
    q = jnp.broadcast_to(g / c, jnp.broadcast_shapes(g.shape, s.shape))
    r = mm(p, p)

    def step(state, co):
        p, q, r = state
        e = mm(p, q) - mm(q, p)
        r2 = mm(r, r)
        t = co[0] * eye + co[1] * r + co[2] * r2
        f = co[1] * e + co[2] * (mm(r, e) + mm(e, r))
        p, q = mm(p, t), mm(p, f) + mm(q, t)
        r = mm(p, p)
        return (p, q, r), fro(r - eye) / jnp.sqrt(n)

    (p, q, _), k, res = _drive(
        step, (p, q, r), fro(r - eye) / jnp.sqrt(n), s.dtype, tol, max_steps
    )
    # sign(S) = I exactly when S is positive definite: fold that into the residual.
    res = jnp.maximum(res, _max_residual(fro(p - eye) / jnp.sqrt(n)))
    return 0.5 * q, k, res


def polar_iteration(a: Array, tol, max_steps: int):
    """Orthogonal polar factor of a tall (m >= n) full-rank `a`."""
    n = a.shape[-1]
    x = a / fro(a)[..., None, None]
    eye = jnp.broadcast_to(jnp.eye(n, dtype=a.dtype), a.shape[:-2] + (n, n))
    gram = mm(mT(x), x)

    def step(state, co):
        x, gram = state
        t = co[0] * eye + co[1] * gram + co[2] * mm(gram, gram)
        x = mm(x, t)
        gram = mm(mT(x), x)
        return (x, gram), fro(gram - eye) / jnp.sqrt(n)

    (x, _), k, res = _drive(
        step, (x, gram), fro(gram - eye) / jnp.sqrt(n), a.dtype, tol, max_steps
    )
    return x, k, res
