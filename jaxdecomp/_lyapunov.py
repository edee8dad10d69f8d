"""The Lyapunov equation S X + X S = G, as the backward passes of the roots need it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._misc import check_matrix, default_tol, fro, mm, mT
from ._newton_schulz import sign_lyapunov


def eig_solver(v: Array, mu: Array) -> Callable[[Array], Array]:
    """b -> X with S X + X S = b, for S = V diag(mu) V^T (mu > 0): in the eigenbasis the
    equation is diagonal, X~_ij = b~_ij / (mu_i + mu_j). Finite at repeated
    eigenvalues."""
    denom = mu[..., :, None] + mu[..., None, :]

    def solve(b):
        bt = mm(mm(mT(v), b), v)
        return mm(mm(v, bt / denom), mT(v))

    return solve


def ns_solver(
    s: Array, tol, max_steps: int, throw: bool, parity: int = 0
) -> Callable[[Array], Array]:
    """b -> X with S X + X S = b by the matmul-only sign iteration, run to `tol`
    (for `parity` see `sign_lyapunov`)."""
    loose = default_tol(s.dtype, 0.5)

    def solve(b):
        x, _, res = sign_lyapunov(s, b, tol, max_steps, parity=parity)
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
    s: Array, b: Array, solve: Callable[[Array], Array], parity: int = 0
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
    )


def solve_lyapunov(
    s: Float[Array, "*batch n n"],
    g: Float[Array, "*batch n n"],
    *,
    method: Literal["eigh", "newton_schulz"] = "eigh",
    tol: float | None = None,
    max_steps: int = 60,
    throw: bool = True,
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
    - `throw`: raise (`eqx.error_if`) if `"newton_schulz"` fails to converge, or if
        `s` has a non-positive eigenvalue for `"eigh"`.

    **Returns:** $X$, with the shape and dtype of `g`.

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
    g = jnp.broadcast_to(g, jnp.broadcast_shapes(s.shape, g.shape))
    tol = 10 * default_tol(s.dtype, 1.0) if tol is None else tol
    s_const = lax.stop_gradient(s)
    if method == "eigh":
        mu, v = jnp.linalg.eigh(s_const)
        if throw:
            mu = eqx.error_if(
                mu,
                ~jnp.all(mu > 0) | ~jnp.all(jnp.isfinite(mu)),
                "solve_lyapunov: s must be symmetric positive definite (finite, with "
                "positive eigenvalues).",
            )
        solve = eig_solver(v, mu)
    else:
        if throw:
            s_const = eqx.error_if(
                s_const,
                fro(s_const - mT(s_const)) > default_tol(s.dtype, 0.5) * fro(s_const),
                "solve_lyapunov: s must be symmetric.",
            )
        solve = ns_solver(s_const, tol, max_steps, throw)
    return lyapunov_linear_solve(s, g, solve)
