"""A graph neural network that predicts an incomplete-Cholesky-type factor."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from .._sparse import SparseMatrix
from ._base import as_sparse
from .incomplete_cholesky import IncompleteCholesky, ic0_factor


class _EdgeLayer(eqx.Module):
    edge: eqx.nn.MLP
    node: eqx.nn.MLP

    def __init__(self, width, key):
        k1, k2 = jr.split(key)
        self.edge = eqx.nn.MLP(3 * width, width, width, 1, jax.nn.gelu, key=k1)
        self.node = eqx.nn.MLP(2 * width, width, width, 1, jax.nn.gelu, key=k2)

    def __call__(self, h, e, rows, cols):
        e = e + jax.vmap(self.edge)(jnp.concatenate([e, h[rows], h[cols]], axis=-1))
        agg = jax.ops.segment_sum(e, rows, h.shape[0], indices_are_sorted=True)
        h = h + jax.vmap(self.node)(jnp.concatenate([h, agg], axis=-1))
        return h, e


class MatrixGNN(eqx.Module):
    """Message passing on the graph of a sparse SPD matrix (nodes = unknowns, edges =
    nonzeros), scale-free: it sees $\\hat A = D^{-1/2} A D^{-1/2}$. Edge features
    $(\\hat a_{ij}, [i = j])$, node features $(\\sum_{j\\ne i}|\\hat a_{ij}|, 1)$,
    `depth` residual edge/node MLP layers of width `width`, and a linear read-out of
    one number per lower-triangle entry, initialized to zero."""

    encode_edge: eqx.nn.Linear
    encode_node: eqx.nn.Linear
    layers: list[_EdgeLayer]
    decode: eqx.nn.Linear

    def __init__(self, key, width: int, depth: int):
        keys = jr.split(key, depth + 3)
        self.encode_edge = eqx.nn.Linear(2, width, key=keys[0])
        self.encode_node = eqx.nn.Linear(2, width, key=keys[1])
        self.layers = [_EdgeLayer(width, k) for k in keys[2:-1]]
        dec = eqx.nn.Linear(width, "scalar", key=keys[-1])
        self.decode = eqx.tree_at(
            lambda d: (d.weight, d.bias),
            dec,
            (jnp.zeros_like(dec.weight), jnp.zeros(())),
        )

    def __call__(self, a: SparseMatrix, name: str):
        """`(delta, sqrt_diag, a_hat)`: the read-out on the lower entries, $\\sqrt{
        \\mathrm{diag}(A)}$ and $\\hat A$ (a SparseMatrix)."""
        a = as_sparse(a, name)
        p = a.pattern
        dtype = a.values.dtype
        d = a.diagonal()
        sd = jnp.sqrt(jnp.where(d > 0, d, jnp.nan))
        rows, cols = jnp.asarray(p.rows), jnp.asarray(p.cols)
        ahat = a.values / (sd[p.rows] * sd[p.cols])
        is_diag = jnp.asarray(p.rows == p.cols, dtype)
        offmass = jax.ops.segment_sum(
            jnp.abs(ahat) * (1 - is_diag), rows, d.shape[0], indices_are_sorted=True
        )
        params_dtype = self.decode.weight.dtype
        e = jax.vmap(self.encode_edge)(
            jnp.stack([ahat, is_diag], -1).astype(params_dtype)
        )
        h = jax.vmap(self.encode_node)(
            jnp.stack([offmass, jnp.ones_like(offmass)], -1).astype(params_dtype)
        )
        for layer in self.layers:
            h, e = layer(h, e, rows, cols)
        delta = jax.vmap(self.decode)(e[p.lower_index]).astype(dtype)
        return delta, sd, a.with_values(ahat)


def positive_scale(delta):
    """A bounded positive diagonal scaling $e^{3\\tanh(\\delta/3)} \\in [0.05, 20]$."""
    return jnp.exp(3 * jnp.tanh(delta / 3))


class NeuralIC(eqx.Module):
    """A learned incomplete-Cholesky preconditioner (Li et al., ICML 2023): a graph
    neural network on the graph of $A$ (nodes = unknowns, edges = nonzeros) predicts
    a lower-triangular factor $L$ with $A$'s lower pattern; calling the model on a
    matrix returns the preconditioner $M = L L^T$, applied by two level-scheduled
    triangular solves (an [`solvers.IncompleteCholesky`][] with that factor).

    **Construction of $L$** (scale-equivariant and always SPD): with $D =
    \\mathrm{diag}(A)$ and $\\hat A = D^{-1/2} A D^{-1/2}$, edge features are
    $(\\hat a_{ij}, [i = j])$ and node features $(\\sum_{j\\ne i}|\\hat a_{ij}|, 1)$;
    `depth` message-passing layers (residual MLPs of width `width`) give an edge
    output $\\delta_{ij}$, and

    $$L = D^{1/2}\\tilde L,\\quad \\tilde l_{ij} = \\tilde l^0_{ij} + \\delta_{ij}
    \\ (i > j),\\quad
    \\tilde l_{ii} = \\tilde l^0_{ii}\\, e^{3\\tanh(\\delta_{ii}/3)},$$

    where $\\tilde L^0$ is IC(0) of $\\hat A$ (`base="ic0"`, a learned correction on
    top of IC(0)) or the lower triangle of $\\hat A$ with unit diagonal
    (`base="none"`). The positive diagonal makes $LL^T$ SPD for every parameter
    value. The last layer starts at zero, so an untrained model is exactly its base.
    Local message passing makes the model independent of the grid size: train on
    small grids, apply to large ones.

    **Training:** the solution-weighted loss
    [`solvers.solution_weighted_loss`][] $\\|L L^T x - b\\|^2/\\|b\\|^2$ over pairs
    $A x = b$, e.g. with [`solvers.train_preconditioner`][].

    **Arguments:** `key` (PRNG key for the initialization), `width` (default 16),
    `depth` (default 3), `base` (`"ic0"` (default) or `"none"`).

    Differentiable with respect to the parameters and the matrix values (the IC(0)
    base is taken as a constant: `lax.stop_gradient`).

    **Example:**

    ```python
    import jax
    import solvers

    op = solvers.problems.diffusion_2d(jax.random.key(0), 16, variance=1.0)
    model = solvers.NeuralIC(jax.random.key(1))
    sol = solvers.cg(op, op.diagonal(), preconditioner=model(op.to_sparse()))
    print(sol.n_steps)
    ```

    Reference: Li, Chen, Cheng, Xu & Li, "Learning preconditioners for conjugate
    gradient PDE solvers", ICML 2023.
    """

    gnn: MatrixGNN
    base: str = eqx.field(static=True)

    def __init__(
        self, key: PRNGKeyArray, width: int = 16, depth: int = 3, base: str = "ic0"
    ):
        if base not in ("ic0", "none"):
            raise ValueError(f"NeuralIC: base must be 'ic0' or 'none'; got {base!r}.")
        self.gnn = MatrixGNN(key, width, depth)
        self.base = base

    def factor(self, a: SparseMatrix) -> SparseMatrix:
        """The predicted lower-triangular factor $L$ (positive diagonal)."""
        delta, sd, ahat = self.gnn(a, "NeuralIC")
        ahat = lax.stop_gradient(ahat)
        p = ahat.pattern
        diag_low = np.asarray(p.rows[p.lower_index] == p.cols[p.lower_index])
        if self.base == "ic0":
            base = ic0_factor(ahat).values
        else:
            base = jnp.where(diag_low, 1.0, ahat.values[p.lower_index])
        lt = jnp.where(diag_low, base * positive_scale(delta), base + delta)
        return SparseMatrix(sd[p.rows[p.lower_index]] * lt, p.lower)

    def __call__(self, a: SparseMatrix) -> IncompleteCholesky:
        return IncompleteCholesky(factor=self.factor(a))


def solution_weighted_loss(model, problem) -> Float[Array, ""]:
    """The loss of Li et al. (ICML 2023) for a factor model:
    $\\|L L^T x - b\\|_2^2 / \\|b\\|_2^2$ for one system `problem = (a, x, b)` with
    $a x = b$ (a [`solvers.SparseMatrix`][] and vectors). It weights the error
    $LL^T - A$ by the distribution of solutions (smooth for PDEs), which is where CG
    needs the preconditioner to be accurate, and needs only sparse products.

    **Arguments:**

    - `model`: a factor model with `model.factor(a) -> L` (e.g. [`solvers.NeuralIC`][]).
    - `problem`: `(a, x, b)`.

    **Returns:** the scalar loss (differentiable in the model's parameters).

    **Example:**

    ```python
    import jax
    import solvers

    a = solvers.problems.diffusion_2d(jax.random.key(0), 8).to_sparse()
    x = jax.random.normal(jax.random.key(1), (64,))
    model = solvers.NeuralIC(jax.random.key(2))
    print(solvers.solution_weighted_loss(model, (a, x, a.mv(x))))
    ```
    """
    a, x, b = problem
    lfac = model.factor(a)
    y = lfac.transpose().mv(x)
    return jnp.sum((lfac.mv(y) - b) ** 2) / jnp.sum(b**2)
