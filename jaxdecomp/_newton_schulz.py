"""Matmul-only Newton–Schulz-type iterations with per-step optimal polynomials.

Three iterations share one driver:

- the coupled square-root iteration (Y -> A^{1/2}, Z -> A^{-1/2}), which is the sign
  iteration on [[0, A], [I, 0]] written in its blocks;
- the sign iteration on [[S, G], [0, -S]], whose off-diagonal block tends to 2 X with
  S X + X S = G (the Lyapunov solve of the backward passes);
- the polar iteration X <- X q(X^T X);

and `mixed_sqrt` combines the first two into a mixed-precision square root
(low-precision iterations, then Newton refinement with high-precision residuals).

Each step applies an odd quintic p(x) = x (a + b x^2 + c x^4) from `sign_schedule`
(optimal for the current interval), then the classical quintic until the residual is
below `tol`, stops improving (the rounding floor), or `max_steps` is reached.
All matmuls run at HIGHEST precision unless another `matmul` is passed: the
low-precision phase of `mixed_sqrt`, or a float32-accurate tensor-core scheme of the
public `precision=` option (`_matmul.py`), with its unit roundoff for the stopping
rule.
"""

from __future__ import annotations

import jax.lax as lax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from ._misc import eye_like, fro, mm, mT, sym
from ._sign_polynomials import sign_schedule

# Design lower bound of the interval the polynomials are optimal for: covers condition
# numbers up to 1e6 for the square root (its sign interval is sqrt(lambda / c)).
DESIGN_ELL = 1e-3


# Low-precision iterations divide the optimal polynomials' argument by this factor
# (p(x / s)), so that rounding cannot push a value past the interval the next
# polynomial is designed for (as Polar Express does for bfloat16); without it the
# bfloat16 square-root iteration diverges.
SAFETY = 1.01


def _coeffs(dtype, safety: float = 1.0) -> Array:
    coeffs = np.array(sign_schedule(DESIGN_ELL))
    powers = 2 * np.arange(coeffs.shape[1]) + 1
    coeffs[:-1] /= safety ** powers[None, :]  # not the classical (self-correcting) row
    return jnp.asarray(coeffs, dtype)


def _max_residual(r: Array) -> Array:
    # One loop for a whole batch: iterate until every member is done.
    return jnp.max(r) if r.ndim else r


def _drive(
    step, state, res0, dtype, tol, max_steps: int, safety: float = 1.0, unit=None
):
    """Run `state, res = step(state, coeffs)` until res <= tol, stagnation at the
    rounding floor after the schedule, or max_steps. Returns (state, n_steps,
    residual).

    Stagnation counts only once the residual is small (below sqrt(max(tol, 10 u)),
    u the unit roundoff of the matmuls, default that of `dtype`): a value far below
    the design interval (a singular value of a matrix worse conditioned than the
    schedule covers) grows by the classical quintic's factor 15/8 per step while the
    residual barely moves, and stopping there would leave it unconverged."""
    coeffs = _coeffs(dtype, safety)
    n_sched = coeffs.shape[0] - 1
    unit = float(jnp.finfo(dtype).eps) if unit is None else unit
    floor = max(float(tol), 10 * unit) ** 0.5

    def cond(carry):
        k, _, res, prev = carry
        stalled = (k > n_sched) & (res > 0.5 * prev) & (res < floor)
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


def coupled_sqrt(
    a: Array, tol, max_steps: int, matmul=mm, safety: float = 1.0, unit=None
):
    """(A^{1/2}, A^{-1/2}, n_steps, residual ||ZY - I||_F / sqrt(n)) for SPD `a`.
    With a low-precision `matmul` (unit roundoff `unit`), Z Y is symmetrised every
    step (it is symmetric in exact arithmetic) and the polynomials are damped by
    `safety`.

    The residual is also the accuracy measure of A^{1/2}: in the common eigenbasis
    Y = sqrt(lambda m) with Z Y = m, so an eigenvalue the iteration has not resolved
    (m far from 1) shows in it, while it hides in ||Y^2 - A|| as lambda (1 - m)."""
    n = a.shape[-1]
    mm_ = matmul
    c = _upper_bound_eig(a)
    eye = eye_like(a)
    y = a / c
    z = eye
    m = y  # = z @ y

    def step(state, co):
        y, z, m = state
        m2 = mm_(m, m)
        t = co[0] * eye + co[1] * m + co[2] * m2
        y, z = mm_(y, t), mm_(t, z)
        m = mm_(z, y)
        if matmul is not mm:
            m = sym(m)
        return (y, z, m), fro(m - eye) / jnp.sqrt(n)

    (y, z, _), k, res = _drive(
        step,
        (y, z, m),
        fro(m - eye) / jnp.sqrt(n),
        a.dtype,
        tol,
        max_steps,
        safety,
        unit,
    )
    sc = jnp.sqrt(c)
    return y * sc, z / sc, k, res


def sign_lyapunov(
    s: Array,
    g: Array,
    tol,
    max_steps: int,
    matmul=mm,
    safety: float = 1.0,
    parity: int = 0,
    unit=None,
):
    """X with S X + X S = G for SPD `s`, by the sign iteration. The residual
    returned also measures ||sign(S) - I||, so an indefinite `s` shows as failure.

    The iteration's blocks are P (a polynomial in S), R = P^2, Q (-> 2X), and per
    step E = PQ - QP and RE + ER. For `g` symmetric (`parity=1`) or antisymmetric
    (`parity=-1`) so are Q and X, E has the opposite parity and QP = parity (PQ)^T,
    ER = -parity (RE)^T: 7 matmuls per step instead of 9 (`parity=0`, any `g`).
    """
    n = s.shape[-1]
    c = _upper_bound_eig(s)
    eye = eye_like(s)
    p = s / c
    q = jnp.broadcast_to(g / c, jnp.broadcast_shapes(g.shape, s.shape))
    mm = matmul
    r = mm(p, p)

    def commutators(p, q, r):
        """(PQ - QP, R E + E R)."""
        if not parity:
            e = mm(p, q) - mm(q, p)
            return e, mm(r, e) + mm(e, r)
        pq = mm(p, q)
        e = pq - parity * mT(pq)
        re = mm(r, e)
        return e, re - parity * mT(re)

    def step(state, co):
        p, q, r = state
        e, re_er = commutators(p, q, r)
        r2 = mm(r, r)
        t = co[0] * eye + co[1] * r + co[2] * r2
        f = co[1] * e + co[2] * re_er
        p, q = mm(p, t), mm(p, f) + mm(q, t)
        if parity:  # keep the structure exact under rounding
            q = 0.5 * (q + parity * mT(q))
        r = mm(p, p)
        return (p, q, r), fro(r - eye) / jnp.sqrt(n)

    (p, q, _), k, res = _drive(
        step,
        (p, q, r),
        fro(r - eye) / jnp.sqrt(n),
        s.dtype,
        tol,
        max_steps,
        safety,
        unit,
    )
    # sign(S) = I exactly when S is positive definite: fold that into the residual.
    res = jnp.maximum(res, _max_residual(fro(p - eye) / jnp.sqrt(n)))
    return 0.5 * q, k, res


def polar_iteration(a: Array, tol, max_steps: int, matmul=mm, unit=None):
    """Orthogonal polar factor of a tall (m >= n) full-rank `a` (matmuls by
    `matmul`, of unit roundoff `unit`)."""
    n = a.shape[-1]
    # scale by max|a| first: fro(a) under/overflows for entries ~1e-30 / 1e30 (float32)
    big = jnp.max(jnp.abs(a), axis=(-2, -1), keepdims=True)
    a = a / jnp.where(big > 0, big, 1)
    x = a / fro(a)[..., None, None]
    eye = jnp.broadcast_to(jnp.eye(n, dtype=a.dtype), a.shape[:-2] + (n, n))
    mm_ = matmul

    def gram_of(x):
        g = mm_(mT(x), x)
        return g if matmul is mm else sym(g)

    gram = gram_of(x)

    def step(state, co):
        x, gram = state
        t = co[0] * eye + co[1] * gram + co[2] * mm_(gram, gram)
        x = mm_(x, t)
        gram = gram_of(x)
        return (x, gram), fro(gram - eye) / jnp.sqrt(n)

    (x, _), k, res = _drive(
        step,
        (x, gram),
        fro(gram - eye) / jnp.sqrt(n),
        a.dtype,
        tol,
        max_steps,
        unit=unit,
    )
    return x, k, res


def low_precision_matmul(dtype):
    """The matmul of the low-precision phase for `dtype` inputs, and its unit
    roundoff: bfloat16 operands with float32 accumulation for float32 (tensor-core
    rate on GPUs), float32 operands at HIGHEST precision for float64."""
    dtype = jnp.dtype(dtype)
    low = jnp.bfloat16 if dtype == jnp.float32 else jnp.float32

    def matmul(a, b):
        out = jnp.matmul(
            a.astype(low),
            b.astype(low),
            precision=lax.Precision.HIGHEST if low == jnp.float32 else None,
            preferred_element_type=jnp.float32,
        )
        return out.astype(dtype)

    return matmul, float(jnp.finfo(low).eps) / 2


# Low-precision sign-iteration steps per refinement (the correction needs only a
# couple of correct digits) and the low-precision square-root steps.
MIXED_LYAPUNOV_STEPS = 12
MIXED_SQRT_STEPS = 12


def mixed_sqrt(a: Array, tol, max_steps: int, want_inv: bool, matmul=mm):
    """Mixed-precision (A^{1/2}, A^{-1/2} or zeros, n_steps, residual) for SPD `a`;
    `matmul` is the working precision's (default HIGHEST; a `precision=` scheme).

    1. Low precision: coupled Newton-Schulz on A / c + delta I (c >= lambda_max,
       delta = u_low / 4, a shift that keeps the rounded matrix positive definite).
    2. Newton refinement, each step with the residual R = A / c - X^2 in the working
       precision (HIGHEST) and the correction E of X E + E X = R from the sign
       iteration in low precision: X <- X + sym(E), until ||E||_F / ||X||_F <= tol
       or ||E|| stops decreasing (the working-precision floor), or `max_steps`.
    3. For A^{-1/2}: Newton-Schulz inversion of X from the low-precision Z, in the
       working precision, Y <- Y + Y (I - X Y).
    n_steps counts refinement steps (step 2); residual is the last relative ||R||_F;
    the error estimate is the last relative correction ||E||_F / ||X||_F divided by
    (1 - the ratio of the last two corrections).
    """
    low, u_low = low_precision_matmul(a.dtype)
    c = _upper_bound_eig(a)
    ah = a / c
    eye = eye_like(a)
    x, z, _, _ = coupled_sqrt(
        ah + (u_low / 4) * eye, 0.0, MIXED_SQRT_STEPS, low, SAFETY, 2 * u_low
    )
    x, z = sym(x), sym(z)
    norm = fro(ah)

    def residual(x):
        r = ah - matmul(x, x)
        return r, _max_residual(fro(r) / norm)

    def cond(carry):
        k, _, _, step, prev = carry
        # Stop on the size of the correction, not the residual: an error along an
        # eigenvector with a small eigenvalue mu shows in R only as 2 mu E.
        # Stalled: corrections no longer shrinking (by less than Newton's factor 1/2
        # while an eigenvalue far below the low-precision shift is being resolved)
        # and already small (the rounding floor), so that a correction that grows
        # after the large eigenvalues have converged does not stop the loop.
        stalled = (k >= 2) & (step > 0.75 * prev) & (step < tol**0.5)
        return (k < max_steps) & (step > tol) & ~stalled

    def body(carry):
        k, x, r, step, _ = carry
        e, _, _ = sign_lyapunov(
            x, sym(r), 0.0, MIXED_LYAPUNOV_STEPS, low, SAFETY, parity=1, unit=2 * u_low
        )
        e = sym(e)
        x = x + e
        r, _ = residual(x)
        return k + 1, x, r, _max_residual(fro(e) / fro(x)), step

    r0, res0 = residual(x)
    inf = jnp.full_like(res0, jnp.inf)
    init = (jnp.asarray(0), x, r0, inf, inf)
    k, x, r, last, prev = lax.while_loop(cond, body, init)
    res = _max_residual(fro(r) / norm)
    # The error left, extrapolated from the last two corrections: Newton converges
    # quadratically (ratio ~ 0, error ~ the last correction), but only linearly along
    # a zero or unresolved eigenvalue (ratio r, error ~ last / (1 - r)), where the
    # last correction alone under-reports the error (measured 7x at kappa 1e16).
    ratio = jnp.where(prev > 0, last / prev, 0.0)
    est = last / (1 - jnp.minimum(ratio, 0.99))
    sc = jnp.sqrt(c)
    if not want_inv:
        return x * sc, jnp.zeros((), a.dtype), k, res, est

    n = a.shape[-1]

    def inv_res(y):
        return _max_residual(fro(eye - matmul(x, y)) / jnp.sqrt(n))

    def inv_cond(carry):
        j, _, res, prev = carry
        return (j < max_steps) & (res > tol) & ~((j >= 8) & (res > 0.5 * prev))

    def inv_body(carry):
        j, y, res, _ = carry
        y = sym(y + matmul(y, eye - matmul(x, y)))
        return j + 1, y, inv_res(y), res

    inv0 = (jnp.asarray(0), z, inv_res(z), jnp.asarray(jnp.inf, res0.dtype))
    _, y, _, _ = lax.while_loop(inv_cond, inv_body, inv0)
    return x * sc, y / sc, k, res, est
