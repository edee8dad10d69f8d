"""Geometries: where a cost matrix comes from."""

from __future__ import annotations

import numbers
from collections.abc import Callable

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, Bool, Float, Int

_IDENTITY = {"sum": 0.0, "lse": -jnp.inf, "max": -jnp.inf}
_COMBINE = {"sum": jnp.add, "lse": jnp.logaddexp, "max": jnp.maximum}


class AbstractGeometry(eqx.Module):
    """Where the cost $C_{ij}$ of an optimal-transport problem comes from.

    The solvers never need the whole `(n, m)` cost at once: they make passes over it
    by blocks of rows ([`solvers.PointCloud`][] with `batch_size` recomputes each
    block and never stores the matrix). `cost_matrix` materialises it.
    """

    @property
    def cost_matrix(self) -> Float[Array, "n m"]:
        raise NotImplementedError

    @property
    def shape(self) -> tuple[int, int]:
        raise NotImplementedError

    @property
    def dtype(self):
        raise NotImplementedError

    @property
    def is_online(self) -> bool:
        """Whether passes recompute the cost by blocks (no `(n, m)` array stored)."""
        return False

    def row_pass(self, fn, row_args=(), combine: str = "sum"):
        """`fn(c_block, *row_args_block) -> (row_out, col_out)` over blocks of rows.

        Returns the row outputs concatenated over the blocks and the column outputs
        combined over the blocks by `combine` (`"sum"`, `"lse"` (log-sum-exp) or
        `"max"`). Dense geometries call `fn` once on the whole matrix."""
        return fn(self.cost_matrix, *row_args)

    def cost_at(self, idx: Int[Array, "n k"]) -> Float[Array, "n k"]:
        """$C_{i, \\mathrm{idx}_{il}}$: the cost at `k` given columns per row."""
        return jnp.take_along_axis(self.cost_matrix, idx, axis=1)

    def rows(self, stride: int) -> AbstractGeometry:
        """The geometry of every `stride`-th row (a sample)."""
        return Geometry(self.cost_matrix[::stride])

    def _finite(self) -> Bool[Array, ""]:
        return jnp.all(jnp.isfinite(self.cost_matrix))

    def _sanitise(self, ok) -> AbstractGeometry:
        """The same geometry with harmless values where `ok` is False."""
        return Geometry(jnp.where(ok, self.cost_matrix, 0))

    def _dense(self) -> AbstractGeometry:
        """What the solvers work on: the materialised cost unless online."""
        return self


class Geometry(AbstractGeometry):
    """A plain cost matrix $C \\in \\mathbb{R}^{n \\times m}$.

    **Arguments:**

    - `cost`: the `(n, m)` floating-point cost matrix.
    - `axis_name`: as for [`solvers.PointCloud`][] (`cost` is then this device's
        block of rows).

    **Example:**

    ```python
    import jax.numpy as jnp
    import solvers

    geom = solvers.Geometry(jnp.array([[0.0, 1.0], [1.0, 0.0]]))
    print(geom.cost_matrix.shape)
    ```
    """

    cost: Float[Array, "n m"]
    axis_name: str | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        shape = jnp.shape(self.cost)
        if len(shape) != 2 or not jnp.issubdtype(
            jnp.result_type(self.cost), jnp.floating
        ):
            raise ValueError(
                "Geometry: cost must be a floating-point (n, m) matrix; got shape "
                f"{shape} and dtype {jnp.result_type(self.cost)}."
            )

    @property
    def cost_matrix(self):
        return self.cost

    @property
    def shape(self):
        return tuple(jnp.shape(self.cost))

    @property
    def dtype(self):
        return jnp.result_type(self.cost)

    def rows(self, stride):
        return Geometry(self.cost[::stride], self.axis_name)

    def _finite(self):
        return all_devices(jnp.all(jnp.isfinite(self.cost)), self.axis_name)

    def _sanitise(self, ok):
        return Geometry(jnp.where(ok, self.cost, 0), self.axis_name)


def all_devices(ok, axis_name):
    """`ok` on every device of `axis_name` (unchanged without one)."""
    if axis_name is None:
        return ok
    return lax.psum(jnp.where(ok, 0, 1), axis_name) == 0


def sum_devices(v, axis_name):
    return v if axis_name is None else lax.psum(v, axis_name)


def varying(tree, axis_name):
    """Mark row-local values created inside `jax.shard_map` (zeros, identities) as
    varying over `axis_name`, the type the loops' carries get once they depend on
    the device's rows (needed with `check_vma=True`; unchanged without an axis)."""
    if axis_name is None:
        return tree

    def cast(v):
        if not isinstance(v, jax.Array) or axis_name in jax.typeof(v).mat.varying:
            return v
        return lax.pcast(v, (axis_name,), to="varying")

    return jtu.tree_map(cast, tree)


def invariant(v, axis_name):
    """A column quantity that every device computed identically, typed as replicated
    again inside `jax.shard_map` with `check_vma=True`.

    `lax.custom_linear_solve` types its solution as varying as soon as the operator
    closes over row-local values (JAX lifts the right-hand side to the union of its
    arguments' varying axes), although every device runs the same solve. The mean
    over the devices (`psum / count`: exact for identical values up to the sum's
    rounding) gives the replicated type, and its transpose hands every device the
    same cotangent, so reverse mode solves the same system everywhere and the lifted
    right-hand side's transpose (`psum`) adds the devices' shares back up. Unchanged
    where the value is not typed varying (no axis, or `check_vma=False`)."""
    if axis_name is None or axis_name not in jax.typeof(v).mat.varying:
        return v
    return lax.psum(v, axis_name) / lax.psum(1, axis_name)


def error_if_devices(tree, pred, raise_if, axis_name):
    """`raise_if(tree, pred)` (an `eqx.error_if`), also inside `jax.shard_map` with
    `check_vma=True`: there the check raises on a scalar token (whose branches have no
    varying type to disagree on) and every array leaf of `tree` is tied to the token
    (+ 0, | False: the values are unchanged, and nothing that uses them can run
    before the check)."""
    if axis_name is None:
        return raise_if(tree, pred)
    token = raise_if(jnp.zeros((), jnp.int32), pred)

    def tie(v):
        if not isinstance(v, jax.Array):
            return v
        if v.dtype == jnp.bool_:
            return v | (token != 0)
        return v + token.astype(v.dtype)

    return jtu.tree_map(tie, tree)


def _centre(x, y, axis_name):
    # The cost is translation invariant, so the shift is exact and needs no
    # derivative. With rows sharded, the mean over all devices' rows.
    sx = sum_devices(jnp.sum(x, axis=0), axis_name)
    count = jnp.asarray(sum_devices(x.shape[0], axis_name) + y.shape[0], x.dtype)
    return lax.stop_gradient((sx + jnp.sum(y, axis=0)) / count)


def _sqeuclidean(x, y):
    """|x_i - y_j|^2 by the expansion |x|^2 + |y|^2 - 2 x.y (one matmul) of points
    already centred on their common mean: uncentred, the expansion cancels
    catastrophically for points far from the origin (float32 clouds offset by 1e3
    lose all digits of costs of size 1)."""
    xx = jnp.sum(x * x, axis=-1)
    yy = jnp.sum(y * y, axis=-1)
    xy = jnp.matmul(x, y.T, precision=lax.Precision.HIGHEST)
    return jnp.maximum(xx[:, None] + yy[None, :] - 2 * xy, 0)


def _safe_sqrt(d2):
    # sqrt is not differentiable at 0: use the safe-where pattern.
    safe = jnp.where(d2 > 0, d2, 1.0)
    return jnp.where(d2 > 0, jnp.sqrt(safe), 0.0)


class PointCloud(AbstractGeometry):
    """Two point clouds $x \\in \\mathbb{R}^{n\\times d}$,
    $y \\in \\mathbb{R}^{m\\times d}$ and a ground cost $C_{ij} = c(x_i, y_j)$.

    **Arguments:**

    - `x`, `y`: `(n, d)` and `(m, d)` floating-point arrays of the same dtype.
    - `cost`: `"sqeuclidean"` (default; $\\|x_i - y_j\\|^2$, computed after
        centring both clouds on their common mean, with HIGHEST precision matmuls,
        clipped at 0), `"euclidean"`, or a callable
        `cost(x_i, y_j) -> scalar` (vmapped over both clouds).
    - `batch_size`: `None` (default: the solvers materialise the $n m$ cost matrix
        once) or a positive int: the *online* geometry. Then no $n \\times m$ array
        is ever stored: every pass of a solver over the cost (Sinkhorn updates,
        marginals, the Newton matrix-vector products, the sparse Hessian's row
        selection, the line search, the implicit derivatives, `apply_plan`)
        recomputes it in blocks of `batch_size` rows (the last block takes the
        remainder), so the peak memory is $O((n + m) d + \\text{batch\\_size}\\,
        m)$ plus $O(nk)$ for a sparse Hessian. Each pass costs the cost's
        recomputation ($O(nmd)$), so prefer `None` when $n m$ fits in memory.
        `cost_matrix` and [`solvers.OTSolution.plan`][] still materialise the
        matrix when asked.

    - `axis_name`: `None` (default), or the name of a `jax.shard_map` mesh axis over
        which the rows are sharded: `x` is then this device's block of rows (and the
        weights `a` too), `y` and `b` are whole on every device. Row passes stay
        local; column reductions (the g-update's log-sum-exp, $P^T u$, marginals)
        and sums over rows are combined across the axis (`psum`/`pmax`), so each
        Newton or Sinkhorn step communicates $O(m)$ numbers. Solve inside
        `jax.shard_map` (see the "Optimal transport at scale" docs page).
    - `backend`: `"xla"` (default) or `"pallas"` (online only, named costs): the
        passes that dominate a solve, the c-transforms (log-sum-exps over rows and
        over columns) and the plan's products and marginals, run as fused Pallas
        kernels that recompute the cost in 128 x 128 tiles in registers
        (flash-attention style: a running maximum and sum), never writing a block
        of it to memory; the other online passes (sparse selection, line-search
        values, epsilon-derivative passes) stay XLA row passes of `batch_size`
        rows. For GPUs (Pallas's Triton backend); on a CPU the kernels run in
        Pallas's interpret mode, correct but slow (the tests use it). Derivatives
        are those of the XLA passes (a `custom_jvp`: the kernels are never
        differentiated), so every derivative and mode works as with `"xla"`.

    Derivatives flow to `x` and `y` (in online mode block by block, with the
    blocks recomputed in reverse mode instead of stored).

    **Example:**

    ```python
    import jax
    import solvers

    x = jax.random.uniform(jax.random.key(0), (5, 2))
    y = jax.random.uniform(jax.random.key(1), (7, 2))
    print(solvers.PointCloud(x, y).cost_matrix.shape)
    online = solvers.PointCloud(x, y, batch_size=2)  # never stores 5 x 7
    ```
    """

    x: Float[Array, "n d"]
    y: Float[Array, "m d"]
    cost: str | Callable = eqx.field(static=True, default="sqeuclidean")
    batch_size: int | None = eqx.field(static=True, default=None)
    axis_name: str | None = eqx.field(static=True, default=None)
    backend: str = eqx.field(static=True, default="xla")

    def __check_init__(self):
        sx, sy = jnp.shape(self.x), jnp.shape(self.y)
        if len(sx) != 2 or len(sy) != 2 or sx[1] != sy[1]:
            raise ValueError(
                "PointCloud: x and y must be (n, d) and (m, d) arrays with the same d; "
                f"got {sx} and {sy}."
            )
        if 0 in sx or 0 in sy:
            raise ValueError(
                f"PointCloud: x and y must be non-empty; got shapes {sx} and {sy}."
            )
        for name, v in (("x", self.x), ("y", self.y)):
            if not jnp.issubdtype(jnp.result_type(v), jnp.floating):
                raise TypeError(
                    f"PointCloud: {name} must be floating point; got "
                    f"{jnp.result_type(v)}."
                )
        if jnp.result_type(self.x) != jnp.result_type(self.y):
            raise TypeError(
                "PointCloud: x and y must have the same dtype; got "
                f"{jnp.result_type(self.x)} and {jnp.result_type(self.y)}."
            )
        if not (callable(self.cost) or self.cost in ("sqeuclidean", "euclidean")):
            raise ValueError(
                "PointCloud: cost must be 'sqeuclidean', 'euclidean' or a callable; "
                f"got {self.cost!r}."
            )
        b = self.batch_size
        if b is not None and (
            isinstance(b, bool) or not isinstance(b, numbers.Integral) or b < 1
        ):
            raise ValueError(
                f"PointCloud: batch_size must be None or a positive int; got {b!r}."
            )
        if self.backend not in ("xla", "pallas"):
            raise ValueError(
                f"PointCloud: backend must be 'xla' or 'pallas'; got {self.backend!r}."
            )
        if self.backend == "pallas" and (b is None or callable(self.cost)):
            raise ValueError(
                "PointCloud: backend='pallas' fuses the online passes of the "
                "'sqeuclidean' and 'euclidean' costs; it needs a batch_size (the "
                "other online passes' block size) and a named cost; got "
                f"batch_size={b!r}, cost={self.cost!r}."
            )

    @property
    def shape(self):
        return (jnp.shape(self.x)[0], jnp.shape(self.y)[0])

    @property
    def dtype(self):
        return jnp.result_type(self.x)

    @property
    def is_online(self):
        return self.batch_size is not None

    def _centred(self):
        if callable(self.cost):
            return self.x, self.y
        c = _centre(self.x, self.y, self.axis_name)
        return self.x - c, self.y - c

    def _block_cost(self, xb, y):
        if self.cost == "sqeuclidean":
            return _sqeuclidean(xb, y)
        if self.cost == "euclidean":
            return _safe_sqrt(_sqeuclidean(xb, y))
        return jax.vmap(lambda xi: jax.vmap(lambda yj: self.cost(xi, yj))(y))(xb)

    @property
    def cost_matrix(self):
        return self._block_cost(*self._centred())

    def _dense(self):
        if self.is_online:
            return self
        return Geometry(self.cost_matrix, self.axis_name)

    def _finite(self):
        ok = jnp.all(jnp.isfinite(self.x)) & jnp.all(jnp.isfinite(self.y))
        return all_devices(ok, self.axis_name)

    def _sanitise(self, ok):
        return eqx.tree_at(
            lambda g: (g.x, g.y),
            self,
            (jnp.where(ok, self.x, 0), jnp.where(ok, self.y, 0)),
        )

    def rows(self, stride):
        return eqx.tree_at(lambda g: g.x, self, self.x[::stride])

    def cost_at(self, idx):
        x, y = self._centred()
        yk = y[idx]  # (n, k, d): the differences directly, no expansion
        if self.cost == "sqeuclidean":
            return jnp.sum((x[:, None, :] - yk) ** 2, axis=-1)
        if self.cost == "euclidean":
            return _safe_sqrt(jnp.sum((x[:, None, :] - yk) ** 2, axis=-1))
        return jax.vmap(jax.vmap(self.cost, in_axes=(None, 0)))(x, yk)

    def row_pass(self, fn, row_args=(), combine="sum"):
        x, y = self._centred()
        if not self.is_online:
            return fn(self._block_cost(x, y), *row_args)
        n = x.shape[0]
        bs = min(self.batch_size, n)
        nb, rem = divmod(n, bs)

        # Checkpointed: reverse mode recomputes each block's cost and plan from the
        # block's points instead of storing them (which would be n x m again).
        @jax.checkpoint
        def block(xb, args):
            return fn(self._block_cost(xb, y), *args)

        head = jtu.tree_map(
            lambda v: v[: nb * bs].reshape(nb, bs, *v.shape[1:]), (x, tuple(row_args))
        )
        _, cols_shape = jax.eval_shape(block, *jtu.tree_map(lambda v: v[0], head))
        ident = _IDENTITY[combine]
        combine_fn = _COMBINE[combine]
        acc0 = jtu.tree_map(lambda s: jnp.full(s.shape, ident, s.dtype), cols_shape)
        acc0 = varying(acc0, self.axis_name)  # the blocks' sums differ per device

        def body(acc, xs):
            rows, cols = block(*xs)
            return jtu.tree_map(combine_fn, acc, cols), rows

        acc, rows = lax.scan(body, acc0, head)
        rows = jtu.tree_map(lambda v: v.reshape(nb * bs, *v.shape[2:]), rows)
        if rem:
            tail = jtu.tree_map(lambda v: v[nb * bs :], (x, tuple(row_args)))
            rows_t, cols_t = block(*tail)
            acc = jtu.tree_map(combine_fn, acc, cols_t)
            rows = jtu.tree_map(lambda u, v: jnp.concatenate([u, v]), rows, rows_t)
        return rows, acc
