"""Symmetric successive over-relaxation (SSOR) preconditioning."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from .._sparse import SparseMatrix
from ._base import AbstractPreconditioner, as_sparse, positive_or_nan


class SSOR(AbstractPreconditioner):
    """SSOR preconditioning: with $A = L + D + L^T$ and $T = D/\\omega + L$,

    $$M = \\tfrac{\\omega}{2 - \\omega}\\, T (D/\\omega)^{-1} T^T, \\qquad
    M^{-1} r = \\tfrac{2 - \\omega}{\\omega}\\, T^{-T} (D/\\omega)\\, T^{-1} r,$$

    two sparse triangular solves per application (level-scheduled, see
    [`solvers.SparseMatrix.solve_triangular`][]). SPD for SPD $A$ and
    $0 < \\omega < 2$; $\\omega = 1$ is symmetric Gauss–Seidel.

    **Arguments:**

    - `operator`: a [`solvers.SparseMatrix`][] (symmetric pattern, stored diagonal),
        a problem with `to_sparse()`, a SciPy sparse or a concrete dense matrix.
    - `omega`: relaxation parameter in (0, 2) (default 1); may be a traced array
        (e.g. chosen online by [`solvers.OmegaBandit`][]); values outside (0, 2) make
        the preconditioner NaN, which [`solvers.cg`][] reports as `not_spd`.

    Differentiable in the matrix values and `omega`.

    **Example:**

    ```python
    import solvers

    op = solvers.problems.poisson_2d(16)
    sol = solvers.cg(op, op.mv(op.diagonal()), preconditioner=solvers.SSOR(op, 1.5))
    print(sol.n_steps)
    ```

    Reference: Saad, *Iterative Methods for Sparse Linear Systems*, 2nd ed., §10.2.
    """

    factor: SparseMatrix  # T = D / omega + L on the lower pattern
    scale: Float[Array, " n"]  # (2 - omega) / omega * D / omega

    def __init__(self, operator, omega: float | ArrayLike = 1.0):
        a = as_sparse(operator, "SSOR")
        if isinstance(omega, (int, float)) and not 0 < omega < 2:
            raise ValueError(f"SSOR: omega must be in (0, 2); got {omega}.")
        omega = jnp.asarray(omega, a.values.dtype)
        omega = jnp.where((omega > 0) & (omega < 2), omega, jnp.nan)
        low = a.lower()
        d = positive_or_nan(a.diagonal())
        is_diag = low.pattern.rows == low.pattern.cols
        dvals = (d / omega)[low.pattern.rows]
        self.factor = low.with_values(jnp.where(np.asarray(is_diag), dvals, low.values))
        self.scale = (2 - omega) / omega * d / omega

    def mv(self, r):
        y = self.factor.solve_triangular(r)
        return self.factor.solve_triangular(self.scale * y, transpose=True)

    def in_structure(self):
        return jax.ShapeDtypeStruct(self.scale.shape, self.scale.dtype)
