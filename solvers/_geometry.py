"""Geometries: where a cost matrix comes from."""

from __future__ import annotations

from collections.abc import Callable

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array, Float


class AbstractGeometry(eqx.Module):
    """Something that produces an `(n, m)` cost matrix."""

    @property
    def cost_matrix(self) -> Float[Array, "n m"]:
        raise NotImplementedError


class Geometry(AbstractGeometry):
    """A plain cost matrix $C \\in \\mathbb{R}^{n \\times m}$.

    **Arguments:**

    - `cost`: the `(n, m)` floating-point cost matrix.

    **Example:**

    ```python
    import jax.numpy as jnp
    import solvers

    geom = solvers.Geometry(jnp.array([[0.0, 1.0], [1.0, 0.0]]))
    print(geom.cost_matrix.shape)
    ```
    """

    cost: Float[Array, "n m"]

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


def _sqeuclidean(x, y):
    # Centre first: the expansion |x|^2 + |y|^2 - 2 x.y cancels catastrophically for
    # points far from the origin (float32 clouds offset by 1e3 lose all digits of
    # costs of size 1). The cost is translation invariant, so the shift is exact and
    # needs no derivative.
    centre = lax.stop_gradient(
        (jnp.sum(x, axis=0) + jnp.sum(y, axis=0)) / (x.shape[0] + y.shape[0])
    )
    x, y = x - centre, y - centre
    xx = jnp.sum(x * x, axis=-1)
    yy = jnp.sum(y * y, axis=-1)
    xy = jnp.matmul(x, y.T, precision=lax.Precision.HIGHEST)
    return jnp.maximum(xx[:, None] + yy[None, :] - 2 * xy, 0)


class PointCloud(AbstractGeometry):
    """Two point clouds $x \\in \\mathbb{R}^{n\\times d}$,
    $y \\in \\mathbb{R}^{m\\times d}$ and a ground cost $C_{ij} = c(x_i, y_j)$.

    **Arguments:**

    - `x`, `y`: `(n, d)` and `(m, d)` floating-point arrays of the same dtype.
    - `cost`: `"sqeuclidean"` (default; $\\|x_i - y_j\\|^2$, computed after
        centring both clouds on their common mean, with HIGHEST precision matmuls,
        clipped at 0), `"euclidean"`, or a callable
        `cost(x_i, y_j) -> scalar` (vmapped over both clouds).

    The cost matrix is materialised ($n m$ entries). Derivatives flow to `x` and `y`.

    **Example:**

    ```python
    import jax
    import solvers

    x = jax.random.uniform(jax.random.key(0), (5, 2))
    y = jax.random.uniform(jax.random.key(1), (7, 2))
    print(solvers.PointCloud(x, y).cost_matrix.shape)
    ```
    """

    x: Float[Array, "n d"]
    y: Float[Array, "m d"]
    cost: str | Callable = eqx.field(static=True, default="sqeuclidean")

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

    @property
    def cost_matrix(self):
        if self.cost == "sqeuclidean":
            return _sqeuclidean(self.x, self.y)
        if self.cost == "euclidean":
            d2 = _sqeuclidean(self.x, self.y)
            # sqrt is not differentiable at 0: use the safe-where pattern.
            safe = jnp.where(d2 > 0, d2, 1.0)
            return jnp.where(d2 > 0, jnp.sqrt(safe), 0.0)
        return jax.vmap(lambda xi: jax.vmap(lambda yj: self.cost(xi, yj))(self.y))(
            self.x
        )
