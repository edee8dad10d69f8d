"""A learned factorized sparse approximate inverse (matvec-only preconditioner)."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from .._sparse import SparseMatrix
from ._base import AbstractPreconditioner
from .neural_ic import MatrixGNN, positive_scale


class FactorizedInverse(AbstractPreconditioner):
    """$M^{-1} = G^T G$ for a lower-triangular sparse $G$ with positive diagonal:
    two sparse products per application, no triangular solves (GPU friendly). SPD
    because $G$ is nonsingular.

    **Arguments:**

    - `factor`: the lower-triangular [`solvers.SparseMatrix`][] $G$.

    **Example:**

    ```python
    import jax.numpy as jnp
    import solvers

    g = solvers.SparseMatrix.from_dense(jnp.array([[0.5, 0.0], [-0.1, 0.6]]))
    print(solvers.FactorizedInverse(g).mv(jnp.ones(2)))
    ```
    """

    factor: SparseMatrix

    def mv(self, r):
        return self.factor.transpose().mv(self.factor.mv(r))

    def in_structure(self):
        return jax.ShapeDtypeStruct((self.factor.shape[0],), self.factor.values.dtype)


class NeuralFSAI(eqx.Module):
    """A learned matvec-only preconditioner: a graph neural network on the graph of
    $A$ (the same scale-free message passing as [`solvers.NeuralIC`][]) predicts a
    lower-triangular $G$ with $A$'s lower pattern, and the preconditioner is the
    factorized sparse approximate inverse $M^{-1} = G^T G$
    ([`solvers.FactorizedInverse`][]): applying it costs two sparse products and no
    triangular solves, which is what a GPU wants (level-scheduled IC solves are
    80–120x slower than Jacobi-PCG on an H100 at $256^2$–$512^2$).

    $G = \\tilde G D^{-1/2}$ with $\\tilde g_{ii} = e^{3\\tanh(\\delta_{ii}/3)}$ and
    $\\tilde g_{ij} = \\delta_{ij}$ ($i > j$); untrained ($\\delta = 0$) it is Jacobi.
    Always SPD. Train it with [`solvers.a_norm_loss`][] (scale-invariant, Kaneda et
    al.), e.g. with [`solvers.train_preconditioner`][].

    **Arguments:** `key` (PRNG key), `width` (default 16), `depth` (default 3).

    **Example:**

    ```python
    import jax
    import solvers

    op = solvers.problems.diffusion_2d(jax.random.key(0), 16)
    model = solvers.NeuralFSAI(jax.random.key(1))
    print(solvers.cg(op, op.diagonal(), preconditioner=model(op.to_sparse())).n_steps)
    ```

    Reference: Kolotilina & Yeremin, SIAM J. Matrix Anal. Appl. 14 (1993) (FSAI);
    Li et al., ICML 2023 (GNN-predicted sparse factors).
    """

    gnn: MatrixGNN

    def __init__(self, key: PRNGKeyArray, width: int = 16, depth: int = 3):
        self.gnn = MatrixGNN(key, width, depth)

    def factor(self, a: SparseMatrix) -> SparseMatrix:
        """The predicted lower-triangular $G$ (positive diagonal)."""
        delta, sd, ahat = self.gnn(a, "NeuralFSAI")
        p = ahat.pattern
        rows, cols = p.rows[p.lower_index], p.cols[p.lower_index]
        gt = jnp.where(np.asarray(rows == cols), positive_scale(delta), delta)
        return SparseMatrix(gt / sd[cols], p.lower)

    def __call__(self, a: SparseMatrix) -> FactorizedInverse:
        return FactorizedInverse(self.factor(a))


def a_norm_loss(model, problem) -> Float[Array, ""]:
    """The scale-invariant loss of Kaneda et al. (ICML 2023) for a preconditioner
    model: with $f = M^{-1} b$ and $x = A^{-1} b$, the squared $A$-norm error of the
    best multiple of $f$, relative to $\\|x\\|_A^2$:

    $$1 - \\frac{(b^T f)^2}{(f^T A f)\\,(x^T b)} \\in [0, 1].$$

    It only asks $M^{-1}b$ to point the right way (CG is invariant to the scale of
    the preconditioner).

    **Arguments:**

    - `model`: a callable `model(a) -> preconditioner` (e.g. [`solvers.NeuralFSAI`][]).
    - `problem`: `(a, x, b)` with $a x = b$.

    **Returns:** the scalar loss.

    **Example:**

    ```python
    import jax
    import solvers

    a = solvers.problems.diffusion_2d(jax.random.key(0), 8).to_sparse()
    x = jax.random.normal(jax.random.key(1), (64,))
    print(solvers.a_norm_loss(solvers.NeuralFSAI(jax.random.key(2)), (a, x, a.mv(x))))
    ```

    Reference: Kaneda, Akar, Chen, Kim, Teran & Kim, "A deep conjugate direction
    method for iteratively solving linear systems", ICML 2023.
    """
    a, x, b = problem
    f = model(a).mv(b)
    return 1 - jnp.vdot(b, f) ** 2 / (jnp.vdot(f, a.mv(f)) * jnp.vdot(x, b))
