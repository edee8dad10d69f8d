r"""Inverse p-th roots $A^{-1/p}$ of symmetric positive definite matrices (Shampoo)."""

from __future__ import annotations

from typing import Literal

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._matmul import Precision, check_precision
from ._misc import check_matrix, eye_like, fro, mm, mT
from ._rayleigh_ritz import eigh_functions
from ._solution import RESULTS, MatrixFunctionSolution
from ._sqrtm import _validate, inv_sqrtm, inverse_root_check, sqrtm


def _power(x: Array, k: int) -> Array:
    out = eye_like(x)
    for _ in range(k):
        out = mm(out, x)
    return out


def _weights(mu: Array, p: int) -> Array:
    """sum_k mu_i^k mu_j^(p-1-k) = (mu_i^p - mu_j^p) / (mu_i - mu_j), also at
    mu_i = mu_j."""
    mi, mj = mu[..., :, None], mu[..., None, :]
    return sum(mi**k * mj ** (p - 1 - k) for k in range(p))


@eqx.filter_custom_jvp
def _eigh_inv_root(a, *, p: int):
    w, v = jnp.linalg.eigh(a)

    def inv_root(d):
        # d^(-1/p) and its divided differences at d = mu^-p: -mu_i^p mu_j^p / weights.
        mu = jnp.maximum(d, 0.0) ** (-1.0 / p)
        mu_p = mu**p
        return mu, -mu_p[..., :, None] * mu_p[..., None, :] / _weights(mu, p)

    (z,), d = eigh_functions(a, w, v, [inv_root])
    return z, v, jnp.maximum(d, 0.0) ** (-1.0 / p), w


@_eigh_inv_root.def_jvp
def _eigh_inv_root_jvp(primals, tangents, *, p: int):
    (a,) = primals
    (da,) = tangents
    out = _eigh_inv_root(a, p=p)
    z, v, mu, _ = out
    da = 0.5 * (da + mT(da))
    # Z^p = A^-1, so sum_k Z^k dZ Z^(p-1-k) = -Z^p dA Z^p. In the eigenbasis of Z the
    # left side is diagonal with weights sum_k mu_i^k mu_j^(p-1-k) > 0 (finite at
    # repeated eigenvalues). custom_linear_solve differentiates through the matvec only.
    weights = _weights(mu, p)

    def matvec(t):
        return sum(mm(mm(_power(z, k), t), _power(z, p - 1 - k)) for k in range(p))

    def solve(_, b):
        bt = mm(mm(mT(v), b), v)
        return mm(mm(v, bt / weights), mT(v))

    zp = _power(z, p)
    dz = lax.custom_linear_solve(matvec, -mm(mm(zp, da), zp), solve, symmetric=True)
    return out, (dz, None, None, None)


def inv_pth_root(
    a: Float[Array, "*batch n n"],
    p: int,
    *,
    ridge: float = 0.0,
    method: Literal["auto", "eigh", "newton_schulz"] = "auto",
    tol: float | None = None,
    max_steps: int = 50,
    precision: Precision = "highest",
    throw: bool = True,
    full_output: bool = False,
) -> Float[Array, "*batch n n"]:
    r"""Inverse $p$-th root $(A + \rho I)^{-1/p}$ of a symmetric positive (semi)definite
    matrix, as Shampoo-style optimizers need ($p = 2, 4, \dots$).

    **Arguments:**

    - `a`: symmetric positive semidefinite, float32 or float64, shape `(..., n, n)`.
    - `p`: a positive integer (static).
    - `ridge`: $\rho \ge 0$ added to the diagonal first (Shampoo's epsilon; needed
        for singular statistics).
    - `method`: `"eigh"`: $V \operatorname{diag}((\lambda + \rho)^{-1/p}) V^T$, any
        `p`; below float64 with the Rayleigh–Ritz correction of
        [`jaxdecomp.sqrtm`][] when $\kappa > 2000$ (float32, $\kappa = 10^4$,
        $p = 4$: 0.9-1.8e-5 instead of 1.7-2.1e-4). `"newton_schulz"`:
        matmul-only, for `p` a power of two, by repeated coupled Newton–Schulz
        square roots ($A^{-1/4} = (A^{1/2})^{-1/2}$), see [`jaxdecomp.sqrtm`][].
        `"auto"`: `"eigh"` (faster on the H100 too; see [`jaxdecomp.sqrtm`][]).
    - `tol`, `max_steps`, `precision`, `throw`, `full_output`: as for
        [`jaxdecomp.sqrtm`][] (`precision`: the tensor-core schemes of the
        `"newton_schulz"` matmuls, forward and backward; no effect on `"eigh"`).

    **Returns:** $(A + \rho I)^{-1/p}$, same shape and dtype as `a`.

    **Derivatives:** `custom_jvp`. For `"eigh"`, $dZ$ solves the linear equation
    $\sum_{k=0}^{p-1} Z^k\,dZ\,Z^{p-1-k} = -Z^p\,dA\,Z^p$ (from $Z^p = A^{-1}$),
    diagonal in the eigenbasis of $Z$ with weights
    $\sum_k \mu_i^k \mu_j^{p-1-k}$: finite at repeated eigenvalues; through
    `lax.custom_linear_solve`, so all orders and both modes work. For
    `"newton_schulz"`, the chain rule through the square roots' Lyapunov rules.

    **Failure modes:** as [`jaxdecomp.sqrtm`][] (NaN/inf, non-symmetric, indefinite
    or, after the ridge, singular input raise at run time with `throw=True`);
    `p` not a positive int, or `"newton_schulz"` with `p` not a power of two, raise
    at trace time.

    **Example:** a Shampoo preconditioner for a 2-D gradient.

    ```python
    import jax, jax.numpy as jnp
    import jaxdecomp

    g = jax.random.normal(jax.random.key(0), (32, 16))
    # g g^T has rank 16: the ridge sets its condition number (~8e4 here); 1e-4 would
    # give 8e5, too ill-conditioned for a float32 inverse root (result `singular`)
    left = jaxdecomp.inv_pth_root(g @ g.T, 4, ridge=1e-3)
    right = jaxdecomp.inv_pth_root(g.T @ g, 4, ridge=1e-3)
    update = left @ g @ right
    ```

    **Reference:** Gupta, Koren & Singer, "Shampoo", ICML 2018; Anil et al., "Scalable
    Second Order Optimization for Deep Learning", 2020.
    """
    name = "inv_pth_root"
    a = check_matrix(a, name, square=True)
    if not (isinstance(p, int) and not isinstance(p, bool) and p >= 1):
        raise ValueError(f"{name}: p must be a positive Python int; got {p!r}.")
    if not (isinstance(ridge, (int, float)) and ridge >= 0):
        raise ValueError(f"{name}: ridge must be a non-negative number; got {ridge!r}.")
    if method not in ("auto", "eigh", "newton_schulz"):
        raise ValueError(
            f"{name}: method must be 'auto', 'eigh' or 'newton_schulz'; got {method!r}."
        )
    power_of_two = p >= 2 and (p & (p - 1)) == 0
    if method == "newton_schulz" and not power_of_two:
        raise ValueError(
            f"{name}: method='newton_schulz' needs p to be a power of two; got p={p}. "
            "Use method='eigh'."
        )
    check_precision(precision, name)
    if method == "auto":
        method = "eigh"
    a_in = a + ridge * eye_like(a) if ridge else a
    if method == "newton_schulz":
        opts = dict(
            method="newton_schulz",
            tol=tol,
            max_steps=max_steps,
            precision=precision,
            throw=throw,
            full_output=True,
        )
        x, k = a_in, p
        steps, result = jnp.asarray(0), RESULTS.successful
        while k > 2:
            sol = sqrtm(x, **opts)
            x, k = sol.value, k // 2
            steps, result = steps + sol.n_steps, sol.result
        sol = inv_sqrtm(x, **opts)
        value, steps = sol.value, steps + sol.n_steps
        result = RESULTS.where(result == RESULTS.successful, sol.result, result)
    else:
        a_sym, result = _validate(a_in, name)
        value, _, _, w = _eigh_inv_root(a_sym, p=p)
        steps = jnp.asarray(0)
        nonpositive = jnp.any(jnp.min(w, axis=-1) <= 0)
        result = RESULTS.where(
            (result == RESULTS.successful) & nonpositive, RESULTS.indefinite, result
        )
    # The defining equation Z^p (A + ridge I) = I, relative.
    zs, a_ = jax.lax.stop_gradient(value), jax.lax.stop_gradient(a_in)

    def residual_fn():
        return fro(mm(_power(zs, p), a_) - eye_like(a_)) / jnp.sqrt(a.shape[-1])

    result, residual = inverse_root_check(
        result, residual_fn, w if method == "eigh" else None, a.dtype, full_output
    )
    if throw:
        value = result.error_if(value, result != RESULTS.successful)
    if full_output:
        return MatrixFunctionSolution(value, result, steps, residual)
    return value
