"""Fixed-sparsity-pattern matrices and level-scheduled sparse triangular solves."""

from __future__ import annotations

import functools as ft
import hashlib

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import lineax as lx
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from ._misc import register_operator


class SparsityPattern:
    """The static, hashable nonzero pattern of a sparse matrix: row and column indices
    (host NumPy arrays) in row-major (CSR) order, without duplicates.

    Build it once on the host (from SciPy, a dense mask or a generator); it is a
    static part of [`solvers.SparseMatrix`][], so its indices are compile-time
    constants and only the values are traced, vmapped and differentiated. Patterns
    compare equal (and share compiled code) when their indices are equal.
    """

    def __init__(self, rows: ArrayLike, cols: ArrayLike, shape: tuple[int, int]):
        rows = np.asarray(rows, np.int64).ravel()
        cols = np.asarray(cols, np.int64).ravel()
        shape = tuple(int(s) for s in shape)
        if len(shape) != 2 or rows.shape != cols.shape:
            raise ValueError(
                "SparsityPattern: rows and cols must be equal-length index vectors and "
                f"shape a pair; got {rows.shape}, {cols.shape}, {shape}."
            )
        if rows.size and (
            rows.min() < 0
            or cols.min() < 0
            or rows.max() >= shape[0]
            or cols.max() >= shape[1]
        ):
            raise ValueError(f"SparsityPattern: an index is outside the shape {shape}.")
        order = np.lexsort((cols, rows))
        rows, cols = rows[order], cols[order]
        if rows.size > 1 and np.any((rows[1:] == rows[:-1]) & (cols[1:] == cols[:-1])):
            raise ValueError("SparsityPattern: duplicate (row, col) entries.")
        self.rows = rows.astype(np.int32)
        self.cols = cols.astype(np.int32)
        self.shape = shape
        self.order = order.astype(np.int32)  # how the given entries were sorted
        self._hash = hash(
            (shape, hashlib.sha1(self.rows.tobytes() + self.cols.tobytes()).hexdigest())
        )

    @property
    def nnz(self) -> int:
        return self.rows.size

    def __hash__(self):
        return self._hash

    def __eq__(self, other):
        return (
            isinstance(other, SparsityPattern)
            and self._hash == other._hash
            and self.shape == other.shape
            and np.array_equal(self.rows, other.rows)
            and np.array_equal(self.cols, other.cols)
        )

    def __repr__(self):
        return f"SparsityPattern(shape={self.shape}, nnz={self.nnz})"

    @ft.cached_property
    def indptr(self) -> np.ndarray:
        return np.searchsorted(self.rows, np.arange(self.shape[0] + 1)).astype(np.int64)

    @ft.cached_property
    def transpose_perm(self) -> np.ndarray:
        """`perm` such that `values[perm]` are the values of the transpose in its CSR
        order."""
        return np.lexsort((self.rows, self.cols)).astype(np.int32)

    @ft.cached_property
    def transposed(self) -> SparsityPattern:
        p = self.transpose_perm
        return SparsityPattern(self.cols[p], self.rows[p], self.shape[::-1])

    @ft.cached_property
    def diagonal_index(self) -> np.ndarray:
        """Index of each diagonal entry in the values (-1 where not stored)."""
        out = -np.ones(min(self.shape), np.int32)
        d = np.nonzero(self.rows == self.cols)[0]
        out[self.rows[d]] = d
        return out

    @ft.cached_property
    def lower_index(self) -> np.ndarray:
        """Indices (into the values) of the entries with col <= row."""
        return np.nonzero(self.cols <= self.rows)[0].astype(np.int32)

    @ft.cached_property
    def lower(self) -> SparsityPattern:
        i = self.lower_index
        return SparsityPattern(self.rows[i], self.cols[i], self.shape)

    @ft.cached_property
    def is_symmetric(self) -> bool:
        t = self.transposed
        return (
            self.shape[0] == self.shape[1]
            and np.array_equal(self.rows, t.rows)
            and np.array_equal(self.cols, t.cols)
        )


def _wavefronts(dep_lists: list[np.ndarray]) -> np.ndarray:
    """Topological level of each item: 1 + the largest level among the items it
    depends on (dependencies always precede the item)."""
    level = np.zeros(len(dep_lists), np.int64)
    for i, deps in enumerate(dep_lists):
        if deps.size:
            level[i] = level[deps].max() + 1
    return level


class LevelSchedule(eqx.Module):
    """Items grouped into wavefronts (levels) whose members are independent of each
    other; processed level by level in a `fori_loop`, `width` items at a time.
    Stored flat (O(items) memory): `items[ptr[l]:ptr[l + 1]]` is level `l`."""

    items: np.ndarray  # item ids sorted by level, padded by `width` copies of -1
    ptr: np.ndarray
    width: int = eqx.field(static=True)

    @staticmethod
    def from_levels(level: np.ndarray) -> LevelSchedule:
        order = np.argsort(level, kind="stable")
        counts = np.bincount(level) if level.size else np.zeros(1, np.int64)
        width = int(counts.max()) if level.size else 1
        ptr = np.concatenate([[0], np.cumsum(counts)])
        items = np.concatenate([order, -np.ones(width, np.int64)])
        return LevelSchedule(items.astype(np.int32), ptr.astype(np.int32), width)

    @property
    def n_levels(self) -> int:
        return self.ptr.size - 1

    def run(self, fn, carry):
        """`carry = fn(items, valid, carry)` for each level (items padded with -1)."""
        items, ptr = jnp.asarray(self.items), jnp.asarray(self.ptr)

        def body(level, carry):
            start = ptr[level]
            idx = lax.dynamic_slice_in_dim(items, start, self.width)
            valid = start + jnp.arange(self.width, dtype=ptr.dtype) < ptr[level + 1]
            return fn(jnp.where(valid, idx, 0), valid, carry)

        return lax.fori_loop(0, self.n_levels, body, carry)


class TriangularSchedule(eqx.Module):
    """Host-precomputed data for a level-scheduled solve with a triangular pattern."""

    schedule: LevelSchedule
    offdiag_cols: np.ndarray  # (n, k) columns of the off-diagonal entries, -1 padded
    offdiag_vals: np.ndarray  # (n, k) their value indices, -1 padded
    diag_vals: np.ndarray  # (n,) value index of the diagonal

    @staticmethod
    def build(pattern: SparsityPattern, lower: bool) -> TriangularSchedule:
        n = pattern.shape[0]
        rows, cols, ptr = pattern.rows, pattern.cols, pattern.indptr
        if pattern.shape[0] != pattern.shape[1]:
            raise ValueError(
                f"triangular solve: the matrix is not square {pattern.shape}."
            )
        if np.any(cols > rows if lower else cols < rows):
            raise ValueError(
                "triangular solve: the matrix is not triangular (it has entries on "
                "both sides of the diagonal)."
            )
        diag = pattern.diagonal_index
        if np.any(diag < 0):
            raise ValueError("triangular solve: the pattern lacks diagonal entries.")
        off = np.nonzero(rows != cols)[0]
        counts = np.bincount(rows[off], minlength=n)
        k = max(int(counts.max()) if off.size else 0, 1)
        starts = np.concatenate([[0], np.cumsum(counts)])[:-1]
        slot = np.arange(off.size) - np.repeat(starts, counts)
        oc = -np.ones((n, k), np.int64)
        ov = -np.ones((n, k), np.int64)
        oc[rows[off], slot] = cols[off]
        ov[rows[off], slot] = off
        del ptr
        deps = [oc[i][oc[i] >= 0] for i in range(n)]
        if not lower:  # process rows bottom-up: relabel i -> n - 1 - i
            deps = [n - 1 - d for d in deps[::-1]]
            level = _wavefronts(deps)[::-1]
        else:
            level = _wavefronts(deps)
        return TriangularSchedule(
            LevelSchedule.from_levels(level),
            oc.astype(np.int32),
            ov.astype(np.int32),
            diag.astype(np.int32),
        )

    def solve(self, values: Array, b: Array) -> Array:
        n = b.shape[0]
        oc, ov = jnp.asarray(self.offdiag_cols), jnp.asarray(self.offdiag_vals)
        dv = jnp.asarray(self.diag_vals)
        # scratch slots: x[n] = 0 and values[nnz] = 0 absorb the padding
        vals = jnp.concatenate([values, jnp.zeros((1,), values.dtype)])
        oc = jnp.where(oc < 0, n, oc)
        ov = jnp.where(ov < 0, values.shape[0], ov)

        def step(rows, valid, x):
            s = jnp.sum(vals[ov[rows]] * x[oc[rows]], axis=-1)
            xr = (b[rows] - s) / vals[dv[rows]]
            return x.at[jnp.where(valid, rows, n)].set(jnp.where(valid, xr, 0))

        x = jnp.zeros((n + 1,), b.dtype)
        return self.schedule.run(step, x)[:n]


class SparseMatrix(lx.AbstractLinearOperator):
    """A sparse matrix with a fixed sparsity pattern: the pattern is static (host
    indices, part of the type), the `values` are a traced array, so the matrix can be
    vmapped over values, differentiated with respect to them (forward and reverse,
    any order) and passed to `jit` without recompiling for new values.

    It is a lineax linear operator (`mv`, `as_matrix`, `transpose`; tagged symmetric
    / positive semidefinite as you declare with `tags`) and is accepted everywhere
    `solvers` takes an operator. Products use a gather and a sorted segment sum.

    **Arguments:**

    - `values`: the nonzero values, shape `(nnz,)`, in the pattern's CSR order.
    - `pattern`: a [`solvers.SparsityPattern`][].
    - `tags`: lineax tags, e.g. `frozenset({lx.symmetric_tag,
        lx.positive_semidefinite_tag})` for an SPD matrix (what lineax's CG checks).

    Use `SparseMatrix.from_dense` / `from_scipy` to build one, `lower()` for the lower
    triangle and `solve_triangular` for level-scheduled triangular solves.

    **Example:**

    ```python
    import jax.numpy as jnp
    import solvers

    a = solvers.SparseMatrix.from_dense(jnp.array([[4.0, 1.0], [1.0, 3.0]]))
    print(a.mv(jnp.ones(2)), a.lower().solve_triangular(jnp.ones(2)))
    ```
    """

    values: Float[Array, " nnz"]
    pattern: SparsityPattern = eqx.field(static=True)
    tags: frozenset = eqx.field(static=True, default=frozenset())

    def __check_init__(self):
        if jnp.shape(self.values) != (self.pattern.nnz,):
            raise ValueError(
                f"SparseMatrix: values must have shape ({self.pattern.nnz},) to match "
                f"the pattern; got {jnp.shape(self.values)}."
            )
        if not jnp.issubdtype(jnp.result_type(self.values), jnp.floating):
            raise TypeError(
                "SparseMatrix: values must be floating point; got "
                f"{jnp.result_type(self.values)}."
            )

    # -- construction -----------------------------------------------------------------
    @staticmethod
    def from_dense(a, *, tags=frozenset(), pattern: SparsityPattern | None = None):
        """From a dense matrix: the pattern is its nonzeros (the matrix must be
        concrete), or the given `pattern` (then `a` may be traced)."""
        if pattern is None:
            mask = np.asarray(a) != 0
            rows, cols = np.nonzero(mask)
            pattern = SparsityPattern(rows, cols, mask.shape)
        a = jnp.asarray(a)
        return SparseMatrix(a[pattern.rows, pattern.cols], pattern, frozenset(tags))

    @staticmethod
    def from_scipy(m, *, tags=frozenset(), dtype=None):
        """From a SciPy sparse matrix (explicit zeros are kept in the pattern)."""
        m = m.tocoo()
        pattern = SparsityPattern(m.row, m.col, m.shape)
        values = np.asarray(m.data)[pattern.order]
        return SparseMatrix(jnp.asarray(values, dtype), pattern, frozenset(tags))

    # -- lineax interface -------------------------------------------------------------
    def mv(self, x):
        p = self.pattern
        if jnp.shape(x) != (p.shape[1],):
            raise ValueError(
                f"SparseMatrix.mv: expected a vector of shape ({p.shape[1]},); got "
                f"{jnp.shape(x)}."
            )
        return jax.ops.segment_sum(
            self.values * x[p.cols],
            jnp.asarray(p.rows),
            num_segments=p.shape[0],
            indices_are_sorted=True,
        )

    def as_matrix(self):
        p = self.pattern
        return jnp.zeros(p.shape, self.values.dtype).at[p.rows, p.cols].add(self.values)

    to_dense = as_matrix

    def transpose(self):
        p = self.pattern
        return SparseMatrix(self.values[p.transpose_perm], p.transposed, self.tags)

    def in_structure(self):
        return jax.ShapeDtypeStruct((self.pattern.shape[1],), self.values.dtype)

    def out_structure(self):
        return jax.ShapeDtypeStruct((self.pattern.shape[0],), self.values.dtype)

    # -- helpers ----------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        return self.pattern.shape

    def diagonal(self):
        """The diagonal (zeros where no diagonal entry is stored)."""
        d = self.pattern.diagonal_index
        return jnp.where(d >= 0, self.values[np.maximum(d, 0)], 0)

    def lower(self) -> SparseMatrix:
        """The lower triangle (diagonal included) on the lower part of the pattern."""
        return SparseMatrix(
            self.values[self.pattern.lower_index], self.pattern.lower, frozenset()
        )

    def with_values(self, values) -> SparseMatrix:
        return SparseMatrix(values, self.pattern, self.tags)

    def solve_triangular(self, b, *, transpose: bool = False):
        """Solve $T x = b$ (or $T^T x = b$ with `transpose=True`) for a lower or upper
        triangular matrix with stored, nonzero diagonal, by level scheduling: rows are
        grouped on the host into wavefronts of mutually independent rows, and the
        solve is a `fori_loop` over wavefronts (sequential depth = number of levels,
        e.g. $2n - 1$ for a 5-point stencil on an $n \\times n$ grid in natural order).
        Differentiable in `values` and `b`."""
        m = self.transpose() if transpose else self
        sched = _triangular_schedule(m.pattern)
        b = jnp.asarray(b)
        if b.shape != (m.shape[0],):
            raise ValueError(
                f"solve_triangular: b must have shape ({m.shape[0]},); got {b.shape}."
            )
        return sched.solve(m.values, b)


@ft.lru_cache(maxsize=64)
def _triangular_schedule(pattern: SparsityPattern) -> TriangularSchedule:
    lower = bool(np.all(pattern.cols <= pattern.rows))
    return TriangularSchedule.build(pattern, lower=lower)


register_operator(
    SparseMatrix,
    symmetric=lambda op: (
        lx.symmetric_tag in op.tags or lx.positive_semidefinite_tag in op.tags
    ),
    psd=lambda op: lx.positive_semidefinite_tag in op.tags,
    diagonal=lambda op: op.diagonal(),
)
