"""The preconditioner base class (a lineax operator) and operator conversions."""

from __future__ import annotations

import abc

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np

from .._misc import register_operator
from .._sparse import SparseMatrix


class AbstractPreconditioner(lx.AbstractLinearOperator):
    """A symmetric positive definite approximation $M^{-1} \\approx A^{-1}$, applied
    by `mv(r)` (or by calling it). A lineax linear operator tagged symmetric and
    positive semidefinite, so it can be passed to [`solvers.cg`][] or as
    `options={"preconditioner": M}` to `lineax.CG`."""

    @abc.abstractmethod
    def mv(self, r): ...

    @abc.abstractmethod
    def in_structure(self): ...

    def out_structure(self):
        return self.in_structure()

    def __call__(self, r):
        return self.mv(r)

    def as_matrix(self):
        s = self.in_structure()
        return jax.vmap(self.mv, out_axes=1)(jnp.eye(s.shape[0], dtype=s.dtype))

    def transpose(self):
        return self


register_operator(
    AbstractPreconditioner, symmetric=lambda op: True, psd=lambda op: True
)


def as_sparse(operator, name: str) -> SparseMatrix:
    """A `SparseMatrix` from a SparseMatrix, an object with `to_sparse()` (e.g. a
    structured-grid problem), a SciPy sparse matrix or a concrete dense matrix."""
    if isinstance(operator, SparseMatrix):
        m = operator
    elif hasattr(operator, "to_sparse"):
        m = operator.to_sparse()
    elif hasattr(operator, "tocoo"):
        m = SparseMatrix.from_scipy(operator)
    elif isinstance(operator, (np.ndarray, jax.Array)) and not isinstance(
        operator, jax.core.Tracer
    ):
        m = SparseMatrix.from_dense(operator)
    else:
        raise TypeError(
            f"{name}: needs the matrix entries: pass a solvers.SparseMatrix, a problem "
            "with to_sparse(), a SciPy sparse matrix or a concrete dense matrix; got "
            f"{type(operator).__name__}."
        )
    if m.shape[0] != m.shape[1]:
        raise ValueError(f"{name}: the matrix must be square; got shape {m.shape}.")
    if not m.pattern.is_symmetric:
        raise ValueError(f"{name}: the matrix must have a symmetric sparsity pattern.")
    if np.any(m.pattern.diagonal_index < 0):
        raise ValueError(f"{name}: every diagonal entry must be stored.")
    return m


def diagonal_of(operator, name: str):
    """The diagonal of a matrix, SparseMatrix, lineax operator or an object with
    `diagonal()`."""
    if isinstance(operator, lx.AbstractLinearOperator):
        return lx.diagonal(operator)
    if hasattr(operator, "diagonal") and not isinstance(
        operator, (np.ndarray, jax.Array)
    ):
        return operator.diagonal()
    if callable(operator):
        raise TypeError(
            f"{name}: cannot take the diagonal of a matvec function; pass a matrix, a "
            "SparseMatrix, a lineax operator or a problem with diagonal()."
        )
    a = jnp.asarray(operator)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"{name}: expected a square matrix; got shape {a.shape}.")
    return jnp.diag(a)


def matvec_of(operator):
    """`x -> A x` for a matrix, a lineax operator, an object with `mv` or a callable."""
    from .._cg import as_matvec

    return as_matvec(operator, "preconditioner", "operator")


def positive_or_nan(d):
    """`d` where positive, NaN elsewhere: a non-positive pivot makes the
    preconditioner non-SPD, which CG then reports as `not_spd` instead of returning
    garbage."""
    return jnp.where(d > 0, d, jnp.nan)


class _Structure(eqx.Module):
    n: int = eqx.field(static=True)
    dtype: object = eqx.field(static=True)

    def __call__(self):
        return jax.ShapeDtypeStruct((self.n,), self.dtype)
