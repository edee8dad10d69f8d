r"""The orthogonal polar factor $U$ of $A = U H$ (Muon-style orthogonalisation)."""

from __future__ import annotations

from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._lyapunov import eig_solver, lyapunov_linear_solve, ns_solver
from ._matmul import Precision, check_precision, scheme_matmul
from ._misc import check_matrix, default_tol, fro, mm, mT, sym
from ._newton_schulz import polar_iteration
from ._solution import RESULTS, MatrixFunctionSolution


class _Config(eqx.Module):
    method: str = eqx.field(static=True)
    tol: float = eqx.field(static=True)
    max_steps: int = eqx.field(static=True)
    precision: str = eqx.field(static=True, default="highest")


@eqx.filter_custom_jvp
def _polar_tall(a, *, cfg: _Config):
    """(U, singular values or zeros, n_steps, residual) for tall `a` (m >= n)."""
    n = a.shape[-1]
    if cfg.method == "svd":
        w, s, vt = jnp.linalg.svd(a, full_matrices=False)
        u = mm(w, vt)
        return u, s, jnp.asarray(0), jnp.zeros((), a.dtype)
    matmul, unit = scheme_matmul(cfg.precision, a.dtype)
    u, k, res = polar_iteration(a, cfg.tol, cfg.max_steps, matmul, unit)
    return u, jnp.zeros(a.shape[:-2] + (n,), a.dtype), k, res


@_polar_tall.def_jvp
def _polar_tall_jvp(primals, tangents, *, cfg: _Config):
    (a,) = primals
    (da,) = tangents
    out = _polar_tall(a, cfg=cfg)
    u = out[0]
    h = sym(mm(mT(u), a))  # A = U H, H symmetric positive definite
    h_const = jax.lax.stop_gradient(h)
    if cfg.method == "svd":
        mu, v = jnp.linalg.eigh(h_const)
        solve = eig_solver(v, mu)
    else:
        solve = ns_solver(
            h_const, cfg.tol, cfg.max_steps, True, parity=-1, precision=cfg.precision
        )
    # U^T dU = Omega is skew, and H Omega + Omega H = U^T dA - dA^T U.
    utda = mm(mT(u), da)
    omega = lyapunov_linear_solve(h, utda - mT(utda), solve, parity=-1)
    du = mm(u, omega)
    if a.shape[-2] != a.shape[-1]:
        # Tall: the component outside range(U) is (I - U U^T) dA H^{-1}.
        perp = da - mm(u, utda)
        du = du + mT(jnp.linalg.solve(h, mT(perp)))
    return out, (du, None, None, None)


def polar(
    a: Float[Array, "*batch m n"],
    *,
    method: Literal["auto", "svd", "newton_schulz"] = "auto",
    tol: float | None = None,
    max_steps: int = 50,
    precision: Precision = "highest",
    throw: bool = True,
    full_output: bool = False,
) -> Float[Array, "*batch m n"]:
    r"""Orthogonal polar factor $U$ of $A = U H$ ($U$ with orthonormal columns or rows,
    $H$ symmetric positive definite): the nearest semi-orthogonal matrix to $A$, as
    Muon-style optimizers use to orthogonalise updates.

    For tall or square `a` ($m \ge n$), $U^T U = I_n$; for wide `a`, $U U^T = I_m$
    (computed as the transpose of the polar factor of $A^T$). Any leading batch
    dimensions.

    **Arguments:**

    - `a`: full-rank matrix, float32 or float64, shape `(..., m, n)`.
    - `method`: `"svd"`: $U = W V^T$ from $A = W \Sigma V^T$. `"newton_schulz"`:
        $X_{k+1} = X_k\,q_k(X_k^T X_k)$ from $X_0 = A / \|A\|_F$, with $x\,q_k(x^2)$ the
        optimal odd quintic for the current singular-value interval (as in Polar
        Express), then the classical quintic, to `tol` (3 matmuls a step, HIGHEST
        precision; about 8 steps up to condition number 1e3). `"auto"`:
        `"newton_schulz"` on GPU/TPU, `"svd"` on CPU.
    - `tol`, `max_steps`, `precision`, `throw`, `full_output`: as for
        [`jaxdecomp.sqrtm`][] (`precision` applies to `"newton_schulz"`, forward and
        backward; `"bf16x6"` or `"tf32x3"` run its matmuls on GPU tensor cores at
        float32 accuracy).

    **Returns:** $U$, same shape and dtype as `a`.

    **Derivatives:** `custom_jvp`: with $H = U^T A$, $\Omega = U^T dU$ solves the
    Lyapunov equation $H\Omega + \Omega H = U^T dA - dA^T U$ (by eigh, or by the
    Newton–Schulz sign iteration for `"newton_schulz"`), and for tall $A$
    $dU = U\Omega + (I - UU^T)\,dA\,H^{-1}$. Forward, reverse and higher order.

    **Failure modes:** NaN/inf input and numerically rank-deficient input (a singular
    value at most $\max(m, n)\,\varepsilon\,\sigma_{\max}$, numpy's `matrix_rank`
    rule, for `"svd"`; for `"newton_schulz"` an orthogonality residual
    $\|U^TU - I\|_F/\sqrt{n}$ above $10\sqrt{\varepsilon}$ after the iteration
    stopped), where the polar factor is not unique, raise at run time with
    `throw=True`; 1-D, empty or non-float input at trace time. Full-rank but
    ill-conditioned input is accepted: the Newton–Schulz iteration keeps going past
    its polynomial schedule (about 2 more steps per factor 10 of condition number
    beyond 1e3) until converged or `max_steps`. $U$ is then as accurate as the
    conditioning allows (relative error about $\kappa\,\varepsilon$).

    **Example:** orthogonalising a gradient, as Muon does.

    ```python
    import jax, jax.numpy as jnp
    import jaxdecomp

    g = jax.random.normal(jax.random.key(0), (64, 32))
    u = jaxdecomp.polar(g, method="newton_schulz")
    assert jnp.allclose(u.T @ u, jnp.eye(32), atol=1e-4)
    ```

    **References:** Higham, *Functions of Matrices*, ch. 8; Amsel et al., "The Polar
    Express", 2025; Jordan et al., "Muon", 2024.
    """
    name = "polar"
    a = check_matrix(a, name, square=False)
    if method not in ("auto", "svd", "newton_schulz"):
        raise ValueError(
            f"{name}: method must be 'auto', 'svd' or 'newton_schulz'; got {method!r}."
        )
    if not (isinstance(max_steps, int) and max_steps > 0):
        raise ValueError(f"{name}: max_steps must be a positive int; got {max_steps}.")
    check_precision(precision, name)
    if method == "auto":
        method = "svd" if jax.default_backend() == "cpu" else "newton_schulz"
    tol = 10 * default_tol(a.dtype, 1.0) if tol is None else float(tol)
    wide = a.shape[-2] < a.shape[-1]
    at = mT(a) if wide else a
    finite = jnp.all(jnp.isfinite(at))
    at = jnp.where(finite, at, 1.0)
    u, s, n_steps, _ = _polar_tall(at, cfg=_Config(method, tol, max_steps, precision))
    eps_half = default_tol(a.dtype, 0.5)
    n = at.shape[-1]
    us = jax.lax.stop_gradient(u)
    residual = jnp.max(fro(mm(mT(us), us) - jnp.eye(n, dtype=a.dtype)) / jnp.sqrt(n))
    if method == "svd":
        # numpy's numerical-rank rule (matrix_rank): s_min <= max(m, n) eps s_max
        rank_tol = max(a.shape[-2:]) * default_tol(a.dtype, 1.0)
        deficient = jnp.any(s[..., -1] <= rank_tol * s[..., 0])
    else:
        deficient = ~(residual <= 10 * eps_half)
    result = RESULTS.where(deficient, RESULTS.rank_deficient, RESULTS.successful)
    result = RESULTS.where(~finite, RESULTS.nonfinite_input, result)
    value = mT(u) if wide else u
    if throw:
        value = result.error_if(value, result != RESULTS.successful)
    if full_output:
        return MatrixFunctionSolution(value, result, n_steps, residual)
    return value
