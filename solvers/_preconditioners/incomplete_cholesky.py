"""Zero-fill incomplete Cholesky, IC(0), computed by level scheduling."""

from __future__ import annotations

import functools as ft

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import ArrayLike

from .._sparse import LevelSchedule, SparseMatrix, SparsityPattern, _wavefronts
from ._base import AbstractPreconditioner, as_sparse


class _IC0Plan:
    """Host data for IC(0) on a lower pattern: for every entry (i, j) the pairs of
    entries (i, k), (j, k) with k < j whose products it subtracts, the entry of the
    pivot (j, j), and a level schedule of the entries."""

    def __init__(self, low: SparsityPattern):
        rows, cols, ptr = low.rows, low.cols, low.indptr
        nnz = low.nnz
        row_maps = [
            dict(zip(cols[ptr[i] : ptr[i + 1]].tolist(), range(ptr[i], ptr[i + 1])))
            for i in range(low.shape[0])
        ]
        pairs, deps = [], []
        for e in range(nnz):
            i, j = int(rows[e]), int(cols[e])
            ri, rj = row_maps[i], row_maps[j]
            pe = [(ri[k], rj[k]) for k in ri if k < j and k in rj]
            pairs.append(pe)
            d = [q for p in pe for q in p]
            if i != j:
                d.append(rj[j])
            deps.append(np.asarray(d, np.int64))
        k = max(1, max(len(p) for p in pairs))
        p1 = np.full((nnz, k), nnz, np.int32)
        p2 = np.full((nnz, k), nnz, np.int32)
        for e, pe in enumerate(pairs):
            for s, (a, b) in enumerate(pe):
                p1[e, s], p2[e, s] = a, b
        self.p1, self.p2 = p1, p2
        self.pivot = low.diagonal_index[cols].astype(np.int32)
        self.is_diag = rows == cols
        self.schedule = LevelSchedule.from_levels(_wavefronts(deps))


@ft.lru_cache(maxsize=16)
def _plan(low: SparsityPattern) -> _IC0Plan:
    return _IC0Plan(low)


def ic0_factor(a: SparseMatrix, shift=0.0) -> SparseMatrix:
    """The IC(0) factor $L$ (lower pattern of $A$) of $A + \\text{shift}\\,
    \\mathrm{diag}(A)$: $l_{jj} = \\sqrt{a_{jj} - \\sum_{k<j} l_{jk}^2}$,
    $l_{ij} = (a_{ij} - \\sum_{k<j} l_{ik} l_{jk}) / l_{jj}$ over the pattern. Entries
    are computed wavefront by wavefront (each wavefront depends only on earlier
    ones), so the result is the exact sequential IC(0). A breakdown (non-positive
    pivot) gives NaN."""
    low = a.lower()
    plan = _plan(low.pattern)
    nnz = low.pattern.nnz
    is_diag = jnp.asarray(plan.is_diag)
    av = jnp.where(is_diag, low.values * (1 + shift), low.values)
    p1, p2, piv = jnp.asarray(plan.p1), jnp.asarray(plan.p2), jnp.asarray(plan.pivot)

    def step(e, valid, fac):
        s = jnp.sum(fac[p1[e]] * fac[p2[e]], axis=-1)
        t = av[e] - s
        diag = is_diag[e]
        ok = diag & (t > 0)
        # both branches stay finite where unselected (NaN-free derivatives)
        root = jnp.where(ok, jnp.sqrt(jnp.where(ok, t, 1)), jnp.nan)
        val = jnp.where(diag, root, t / jnp.where(diag, 1, fac[piv[e]]))
        return fac.at[jnp.where(valid, e, nnz)].set(jnp.where(valid, val, 0))

    fac = plan.schedule.run(step, jnp.zeros((nnz + 1,), a.values.dtype))
    return low.with_values(fac[:nnz])


class IncompleteCholesky(AbstractPreconditioner):
    """Zero-fill incomplete Cholesky, IC(0): $M = L L^T$ with $L$ lower triangular on
    the pattern of $A$ and $(L L^T)_{ij} = a_{ij}$ on that pattern;
    $M^{-1} r = L^{-T} L^{-1} r$ by two level-scheduled triangular solves.

    The factorization runs on the device as a loop over wavefronts of entries (host
    precomputed once per pattern); it is the exact sequential IC(0) and is
    differentiable in the matrix values. It exists for M-matrices (e.g. diffusion
    with positive coefficients); otherwise a non-positive pivot can occur: use
    `shift` (factor $A + \\text{shift}\\,\\mathrm{diag}(A)$, Manteuffel), else the
    factor is NaN and [`solvers.cg`][] reports `not_spd`.

    **Arguments:**

    - `operator`: a [`solvers.SparseMatrix`][] (symmetric pattern, stored diagonal),
        a problem with `to_sparse()`, a SciPy sparse or a concrete dense matrix.
    - `shift`: diagonal shift (default 0).
    - `factor`: instead of `operator`, a lower-triangular [`solvers.SparseMatrix`][]
        $L$ with positive diagonal to use as is (how [`solvers.NeuralIC`][] returns
        its learned factor).

    **Example:**

    ```python
    import solvers

    op = solvers.problems.poisson_2d(16)
    ic = solvers.IncompleteCholesky(op)
    sol = solvers.cg(op, op.diagonal(), preconditioner=ic)
    print(sol.n_steps)
    ```

    Reference: Meijerink & van der Vorst, Math. Comp. 31 (1977).
    """

    factor: SparseMatrix

    def __init__(self, operator=None, shift: float | ArrayLike = 0.0, *, factor=None):
        if factor is not None:  # a given lower-triangular factor (e.g. a learned one)
            if operator is not None:
                raise ValueError(
                    "IncompleteCholesky: pass operator or factor, not both."
                )
            self.factor = factor
        else:
            self.factor = ic0_factor(as_sparse(operator, "IncompleteCholesky"), shift)

    def mv(self, r):
        y = self.factor.solve_triangular(r)
        return self.factor.solve_triangular(y, transpose=True)

    def in_structure(self):
        return jax.ShapeDtypeStruct((self.factor.shape[0],), self.factor.values.dtype)
