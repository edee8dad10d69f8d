"""The Lyapunov equation S X + X S = G, as the backward passes of the roots need it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._matmul import Precision, check_precision, scheme_matmul
from ._misc import check_matrix, default_tol, fro, mm, mT, safe_reciprocal
from ._newton_schulz import sign_lyapunov
from ._solution import RESULTS, MatrixFunctionSolution


def eig_solver(v: Array, mu: Array) -> Callable[[Array], Array]:
    """b -> X with S X + X S = b, for S = V diag(mu) V^T (mu >= 0): in the eigenbasis
    the equation is diagonal, X~_ij = b~_ij / (mu_i + mu_j). Finite at repeated
    eigenvalues.

    Where mu_i + mu_j = 0 (both eigenvalues zero: the square root of a semidefinite
    matrix) the equation has no solution unless b~_ij = 0, and the entry is set to 0.
    For the derivative of A^{1/2} this is the derivative along perturbations that keep
    the null space (dA with a zero null-space block, e.g. every dA = dB B^T + B dB^T of
    A = B B^T), finite and exact there; along the null-space block itself the true
    derivative is infinite (d sqrt(t)/dt at t = 0) and is dropped."""
    inv_denom = safe_reciprocal(mu[..., :, None] + mu[..., None, :])

    def solve(b):
        bt = mm(mm(mT(v), b), v)
        return mm(mm(v, bt * inv_denom), mT(v))

    return solve


def ns_solver(
    s: Array,
    tol,
    max_steps: int,
    throw: bool,
    parity: int = 0,
    info: bool = False,
    precision: str = "highest",
) -> Callable[[Array], Array]:
    """b -> X with S X + X S = b by the matmul-only sign iteration, run to `tol`
    (for `parity` see `sign_lyapunov`; matmuls by the `precision` scheme); with
    `info`, b -> (X, (steps, residual)).

    The iteration's residual ||P^2 - I|| (and ||sign(S) - I||) depends on S alone,
    not on b: the solves of the derivatives converge exactly when the primal's does,
    so checking the primal's covers them."""
    loose = default_tol(s.dtype, 0.5)
    matmul, unit = scheme_matmul(precision, s.dtype)

    def solve(b):
        x, k, res = sign_lyapunov(
            s, b, tol, max_steps, matmul, parity=parity, unit=unit
        )
        if info:
            return x, (k, res)
        if throw:
            x = eqx.error_if(
                x,
                ~(res <= loose),
                "solve_lyapunov: the Newton-Schulz sign iteration did not converge to "
                "sign(S) = I; S must be symmetric positive definite.",
            )
        return x

    return solve


def lyapunov_linear_solve(
    s: Array,
    b: Array,
    solve: Callable[[Array], Array],
    parity: int = 0,
    has_aux: bool = False,
):
    """X with S X + X S = b, differentiable in `s` and `b` (any order, both modes).

    `lax.custom_linear_solve` differentiates through the matvec Z -> S Z + Z S only (the
    solver is never differentiated), and the operator is self-adjoint for symmetric S,
    so the same solver serves the transposed solve of reverse mode.

    `parity=1` (or -1) is for a symmetric (antisymmetric) `b`: the operator is then
    taken on that subspace, Z -> L(Pi Z) with Pi the projection on it (self-adjoint,
    and commuting with L for symmetric S), and its inverse Pi b -> L^{-1}(Pi b). So
    the solver only ever sees right-hand sides of that parity, also the cotangents of
    reverse mode, and can use the cheaper structured iteration.

    With `has_aux`, `solve` returns `(X, aux)` and so does this function (the aux of
    the primal solve).
    """

    def proj(z):
        return 0.5 * (z + parity * mT(z)) if parity else z

    def matvec(z):
        z = proj(z)
        return mm(s, z) + mm(z, s)

    return lax.custom_linear_solve(
        matvec,
        proj(b),
        lambda _, rhs: solve(proj(rhs)),
        symmetric=True,
        has_aux=has_aux,
    )


def solve_lyapunov(
    s: Float[Array, "*batch n n"],
    g: Float[Array, "*batch n n"],
    *,
    method: Literal["eigh", "newton_schulz"] = "eigh",
    tol: float | None = None,
    max_steps: int = 60,
    precision: Precision = "highest",
    throw: bool = True,
    full_output: bool = False,
) -> Float[Array, "*batch n n"]:
    r"""Solve the Lyapunov (symmetric Sylvester) equation $S X + X S = G$.

    For symmetric positive definite $S$ the solution is unique. In the eigenbasis
    $S = V \operatorname{diag}(\mu) V^T$ it is
    $X = V \big[(V^T G V)_{ij} / (\mu_i + \mu_j)\big] V^T$, which is how `"eigh"`
    computes it; `"newton_schulz"` instead reads $2X$ off the sign of
    $\begin{bmatrix} S & G \\ 0 & -S \end{bmatrix}$, computed by a matmul-only
    iteration with per-step optimal quintic polynomials, run to `tol` (not a fixed
    number of steps: Song et al.'s 8 fixed steps are 23–86% wrong at condition numbers
    of 1e3 and more).

    These are the backward passes of [`jaxdecomp.sqrtm`][] ($dX$ solves
    $X\,dX + dX\,X = dA$) and of [`jaxdecomp.polar`][].

    **Arguments:**

    - `s`: symmetric positive definite, shape `(..., n, n)`.
    - `g`: right-hand side, shape `(..., n, n)` (broadcast against `s`).
    - `method`: `"eigh"` (default; exact, fastest on CPU) or `"newton_schulz"`
        (matmuls only; fast on GPUs).
    - `tol`: residual tolerance of `"newton_schulz"` (default `10 eps`; it also stops
        at the rounding floor).
    - `max_steps`: iteration cap of `"newton_schulz"`.
    - `precision`: the matmuls of `"newton_schulz"` on float32 input: `"highest"`
        (default; float32 on CUDA cores), or a split scheme that runs them on tensor
        cores at (near) float32 accuracy, `"bf16x6"`, `"tf32x3"` or `"bf16x3"` (see
        [`jaxdecomp.sqrtm`][]). No effect on `"eigh"` or float64 input.
    - `throw`: raise (`eqx.error_if`, also under `jit`) on failure (default `True`).
    - `full_output`: return a [`jaxdecomp.MatrixFunctionSolution`][] (value, result
        code, steps, residual) instead of the array.

    **Returns:** $X$, with the shape and dtype of `g`.

    **Failure modes:** shape and dtype mistakes raise at trace time. At run time
    (result codes, raised if `throw`): NaN/inf in `s` or `g` (`nonfinite_input`), a
    non-symmetric `s` ($\|S - S^T\|_F > \sqrt{\varepsilon}\|S\|_F$,
    `not_symmetric`; it is never silently symmetrised), for `"eigh"` an eigenvalue of
    `s` that is not above the rounding level $n\varepsilon\lambda_{\max}$
    (`indefinite`), and a solution whose relative residual
    $\|SX + XS - G\|_F / (2\|S\|_F\|X\|_F + \|G\|_F)$ exceeds
    $10\sqrt{\varepsilon}$ (`inaccurate`: e.g. Newton–Schulz on an indefinite `s`).

    **Derivatives:** with respect to `s` and `g`, forward and reverse mode, any order
    (an implicit rule through `lax.custom_linear_solve`).

    **Example:**

    ```python
    import jax.numpy as jnp
    import jaxdecomp

    s = jnp.array([[2.0, 0.5], [0.5, 1.0]])
    g = jnp.array([[1.0, 0.0], [0.0, 3.0]])
    x = jaxdecomp.solve_lyapunov(s, g)
    assert jnp.allclose(s @ x + x @ s, g, atol=1e-5)
    ```
    """
    name = "solve_lyapunov"
    s = check_matrix(s, "solve_lyapunov(s, ...)", square=True)
    g = check_matrix(g, "solve_lyapunov(..., g)", square=True)
    if g.shape[-1] != s.shape[-1]:
        raise ValueError(
            f"solve_lyapunov: s is {s.shape} but g is {g.shape}; the last two "
            "dimensions must agree."
        )
    if g.dtype != s.dtype:
        raise TypeError(f"solve_lyapunov: s is {s.dtype} but g is {g.dtype}.")
    if method not in ("eigh", "newton_schulz"):
        raise ValueError(
            f"solve_lyapunov: method must be 'eigh' or 'newton_schulz'; got {method!r}."
        )
    if not (isinstance(max_steps, int) and max_steps > 0):
        raise ValueError(f"{name}: max_steps must be a positive int; got {max_steps}.")
    check_precision(precision, name)
    shape = jnp.broadcast_shapes(s.shape, g.shape)
    g = jnp.broadcast_to(g, shape)
    tol = 10 * default_tol(s.dtype, 1.0) if tol is None else float(tol)
    eps_half = default_tol(s.dtype, 0.5)

    # Run-time checks, one result code for the call; bad input is replaced by a
    # harmless one so that the iterations terminate (the result is raised on).
    s_const = lax.stop_gradient(s)
    finite = jnp.all(jnp.isfinite(s_const)) & jnp.all(jnp.isfinite(g))
    asym = jnp.any(fro(s_const - mT(s_const)) > eps_half * fro(s_const))
    result = RESULTS.where(asym, RESULTS.not_symmetric, RESULTS.successful)
    result = RESULTS.where(finite, result, RESULTS.nonfinite_input)
    ok = result == RESULTS.successful
    s_safe = jnp.where(ok, s_const, jnp.eye(s.shape[-1], dtype=s.dtype))
    s = jnp.where(ok, s, lax.stop_gradient(s_safe))
    g = jnp.where(ok, g, 0)
    n_steps = jnp.asarray(0)
    if method == "eigh":
        mu, v = jnp.linalg.eigh(s_safe)
        # positive definite, with the smallest eigenvalue above the rounding level
        # of the largest (else S X + X S = G is singular at this precision)
        mu_max = jnp.max(jnp.abs(mu), axis=-1)
        definite = jnp.all(jnp.min(mu, axis=-1) > s.shape[-1] * eps_half**2 * mu_max)
        result = RESULTS.where(ok & ~definite, RESULTS.indefinite, result)
        solve = eig_solver(v, jnp.where(definite, mu, 1))
        x = lyapunov_linear_solve(s, g, solve)
    else:
        solve = ns_solver(s_safe, tol, max_steps, False, info=True, precision=precision)
        x, (n_steps, sign_res) = lyapunov_linear_solve(s, g, solve, has_aux=True)
        # sign(S) = I exactly when S is positive definite (and resolved at this
        # precision): the sign iteration's own residual says whether it is
        definite = jnp.max(sign_res) <= 10 * eps_half
        result = RESULTS.where(ok & ~definite, RESULTS.indefinite, result)
    # The defining equation, relative to the scale of its terms.
    xs = lax.stop_gradient(x)
    s_, g_ = lax.stop_gradient(s), lax.stop_gradient(g)
    scale = 2 * fro(s_) * fro(xs) + fro(g_)
    residual = jnp.max(
        fro(mm(s_, xs) + mm(xs, s_) - g_) / jnp.where(scale > 0, scale, 1)
    )
    bad = ~(residual <= 10 * eps_half)  # NaN counts as bad
    result = RESULTS.where(
        (result == RESULTS.successful) & bad, RESULTS.inaccurate, result
    )
    if throw:
        x = result.error_if(x, result != RESULTS.successful)
    if full_output:
        return MatrixFunctionSolution(x, result, n_steps, residual)
    return x
