"""The Jacobi (diagonal) preconditioner."""

from __future__ import annotations

import jax
from jaxtyping import Array, Float

from ._base import AbstractPreconditioner, diagonal_of, positive_or_nan


class Jacobi(AbstractPreconditioner):
    """Jacobi preconditioning $M^{-1} r = r / \\mathrm{diag}(A)$.

    **Arguments:**

    - `operator`: a dense matrix, a [`solvers.SparseMatrix`][], a lineax operator or a
        problem with `diagonal()` (e.g. [`solvers.problems.Diffusion2D`][]).

    A non-positive diagonal entry (so $A$ is not SPD) becomes NaN, which
    [`solvers.cg`][] reports as `not_spd`. Differentiable in the operator's values.

    **Example:**

    ```python
    import jax.numpy as jnp
    import solvers

    a = jnp.array([[4.0, 1.0], [1.0, 3.0]])
    print(solvers.cg(a, jnp.ones(2), preconditioner=solvers.Jacobi(a)).n_steps)
    ```
    """

    inv_diagonal: Float[Array, " n"]

    def __init__(self, operator):
        self.inv_diagonal = 1 / positive_or_nan(diagonal_of(operator, "Jacobi"))

    def mv(self, r):
        return self.inv_diagonal * r

    def in_structure(self):
        return jax.ShapeDtypeStruct(self.inv_diagonal.shape, self.inv_diagonal.dtype)

    def diagonal(self):
        return self.inv_diagonal
