"""Chebyshev polynomial preconditioning (matvec only)."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._base import AbstractPreconditioner, diagonal_of, matvec_of, positive_or_nan


def _power_lmax(matvec, n, dtype, steps):
    """Largest eigenvalue estimate by power iteration (Rayleigh quotient)."""
    v = jnp.ones((n,), dtype) + jnp.linspace(0, 1, n, dtype=dtype) ** 2
    v = v / jnp.linalg.norm(v)

    def body(_, v):
        w = matvec(v)
        return w / jnp.linalg.norm(w)

    v = lax.fori_loop(0, steps, body, v)
    return jnp.vdot(v, matvec(v))


class Chebyshev(AbstractPreconditioner):
    """Chebyshev polynomial preconditioning: $M^{-1} = p(D^{-1}A)\\,D^{-1}$ with $p$
    the degree-`degree` polynomial of the Chebyshev iteration for the interval
    $[\\lambda_{max}/\\text{ratio}, \\lambda_{max}]$ of the Jacobi-scaled matrix
    $D^{-1}A$ ($D = I$ with `jacobi=False`). It only needs matvecs (`degree` per
    application), so it runs matrix-free and GPU friendly; it is symmetric, and
    positive definite as long as $\\lambda_{max}$ bounds the spectrum.

    **Arguments:**

    - `operator`: a matrix, [`solvers.SparseMatrix`][], lineax operator or a problem
        with `mv` and `diagonal()` (e.g. [`solvers.problems.Diffusion2D`][]).
    - `degree`: polynomial degree (default 4).
    - `ratio`: $\\lambda_{max}/\\lambda_{min}$ of the target interval (default 30).
    - `lmax`: an upper bound on the spectrum of $D^{-1}A$; default: 1.1 times a
        30-step power-iteration estimate (if it is too small the preconditioner can be
        indefinite and [`solvers.cg`][] reports `not_spd`).
    - `jacobi`: Jacobi-scale first (default True; needs the diagonal).

    Differentiable in the operator's values.

    **Example:**

    ```python
    import solvers

    op = solvers.problems.poisson_2d(16)
    sol = solvers.cg(op, op.diagonal(), preconditioner=solvers.Chebyshev(op, degree=3))
    print(sol.n_steps)
    ```

    Reference: Saad, *Iterative Methods for Sparse Linear Systems*, 2nd ed.,
    Alg. 12.1; Adams et al., J. Comput. Phys. 188 (2003).
    """

    operator: object
    inv_diagonal: Float[Array, " n"]
    lmax: Float[Array, ""]
    degree: int = eqx.field(static=True)
    ratio: float = eqx.field(static=True)

    def __init__(
        self,
        operator,
        degree: int = 4,
        ratio: float = 30.0,
        lmax=None,
        jacobi: bool = True,
    ):
        if not (isinstance(degree, int) and degree >= 1):
            raise ValueError(f"Chebyshev: degree must be an int >= 1; got {degree}.")
        if not ratio > 1:
            raise ValueError(f"Chebyshev: ratio must be > 1; got {ratio}.")
        self.operator = operator
        matvec = matvec_of(operator)
        if jacobi:
            d = diagonal_of(operator, "Chebyshev")
            self.inv_diagonal = 1 / positive_or_nan(d)
        else:
            n = _size_of(operator)
            self.inv_diagonal = jnp.ones((n,), _dtype_of(operator))
        self.degree = degree
        self.ratio = float(ratio)
        if lmax is None:
            n = self.inv_diagonal.shape[0]
            scaled = lambda v: self.inv_diagonal * matvec(v)  # noqa: E731
            lmax = 1.1 * _power_lmax(scaled, n, self.inv_diagonal.dtype, 30)
        self.lmax = jnp.asarray(lmax, self.inv_diagonal.dtype)

    def mv(self, r):
        upper = self.lmax
        lower = upper / self.ratio
        theta, delta = (upper + lower) / 2, (upper - lower) / 2
        sigma = theta / delta
        b = self.inv_diagonal * r
        matvec = matvec_of(self.operator)
        x = jnp.zeros_like(b)
        res = b
        d = b / theta
        rho = 1 / sigma
        for _ in range(self.degree):  # static degree
            x = x + d
            res = res - self.inv_diagonal * matvec(d)
            rho_new = 1 / (2 * sigma - rho)
            d = rho_new * rho * d + 2 * rho_new / delta * res
            rho = rho_new
        return x

    def in_structure(self):
        return jax.ShapeDtypeStruct(self.inv_diagonal.shape, self.inv_diagonal.dtype)


def _size_of(operator):
    if hasattr(operator, "in_structure"):
        return operator.in_structure().shape[0]
    if hasattr(operator, "n"):
        return operator.n**2
    return jnp.shape(operator)[0]


def _dtype_of(operator):
    if hasattr(operator, "in_structure"):
        return operator.in_structure().dtype
    if hasattr(operator, "kx"):
        return operator.kx.dtype
    return jnp.result_type(operator)
