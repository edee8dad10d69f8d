"""How many entries per row the sparse Newton Hessian keeps: `k` from `kept_mass`."""

from __future__ import annotations

import math

import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import ArrayLike, Float

from ._dual import safe_log
from ._geometry import AbstractGeometry, PointCloud
from ._ot_problem import prepare
from ._solution import RESULTS

# aim above `kept_mass` by half of what it leaves out: the solver reselects when its
# entries lose 2% of their mass and falls back to the dense Hessian below kept_mass
_MARGIN = 0.5
_MULTIPLE = 8


def check_concrete(tree, fn: str) -> None:
    """A trace-time TypeError if any leaf is traced: `k` is a shape."""
    if any(isinstance(v, jax.core.Tracer) for v in jtu.tree_leaves(tree)):
        raise TypeError(
            f"{fn}: choosing k measures the plan and needs concrete values, but got "
            "traced inputs (inside jax.jit, jax.vmap or jax.grad). Call "
            "solvers.sparse_k(geom, a, b, epsilon=...) once outside the "
            "transformation, on representative data, and pass the int it returns as "
            "sinkhorn_newton's static k."
        )


@jax.jit
def _kept_curve(c, a, b, g, eps):
    """Mass of the plan rows' k largest entries, as a fraction of the sample's mass,
    for k = 1..m: rows P_ij = a_i b_j exp((g_j - C_ij)/eps) / sum_l b_l exp(...)
    (the f-update's exact row marginal a_i, with the column potential g)."""
    z = jnp.where(b > 0, (g - c) / eps + safe_log(b), -jnp.inf)
    p = jnp.exp(z - jnp.max(z, axis=1, keepdims=True))
    p = p / jnp.sum(p, axis=1, keepdims=True)
    top = -jnp.sort(-p, axis=1)  # each row in decreasing order
    return jnp.cumsum(a @ top) / jnp.sum(a)


def sparse_k(
    geom: AbstractGeometry | Float[ArrayLike, "n m"],
    a: Float[ArrayLike, " n"] | None = None,
    b: Float[ArrayLike, " m"] | None = None,
    *,
    epsilon: float | None = None,
    kept_mass: float = 0.99,
    g: Float[ArrayLike, " m"] | None = None,
    sample: int = 256,
) -> int:
    """Entries per row that [`solvers.sinkhorn_newton`][]'s sparse Hessian needs to
    keep `kept_mass` of the plan: the `k` to pass with `hessian="sparse"`.

    The plan's rows are estimated at the target $\\varepsilon$ on a sample of rows
    (every $\\lceil n / \\text{sample}\\rceil$-th):

    $$\\tilde P_{ij} = a_i\\,\\frac{b_j\\, e^{(g_j - C_{ij})/\\varepsilon}}
    {\\sum_l b_l\\, e^{(g_l - C_{il})/\\varepsilon}}$$

    (the plan after an exact $f$-update, so each row has its final mass $a_i$), with
    $g = 0$ unless a column potential is given (for instance the `g` of an earlier
    solve on similar data: then $\\tilde P$ is the plan itself). The result is the
    smallest multiple of 8 such that the `k` largest entries of each sampled row
    together keep at least $\\text{kept\\_mass} + (1 - \\text{kept\\_mass})/2$ of
    the sample's mass (0.995 for the default: the margin covers the solver's 2%
    reselection rule and the sample), capped at $m$. With $g = 0$ the estimate is
    the kernel's width: for two clouds drawn from one distribution it matched the
    converged plan's kept mass to 0.002 (2-D, $n = 10^4$, $\\varepsilon = 10^{-3}$
    to $1.6\\cdot 10^{-2}$); a transport map that contracts or expands the cloud
    changes the width, and the solver then still falls back to the dense Hessian
    wherever the kept mass is short, so a wrong estimate costs time, never
    accuracy. The number of entries grows like $n\\,\\varepsilon^{d/2}$: on the unit
    square at $\\varepsilon = 10^{-3}$ it returns 24 at $n = 1000$, 72 at $n = 4000$
    and 168 at $n = 10^4$ (where the default `k = 64` keeps 88% and every step is
    dense; 128 keeps 98.4%, 256 keeps 99.97%).

    **Arguments:**

    - `geom`, `a`, `b`, `epsilon`: the problem, as for [`solvers.sinkhorn_newton`][]
        (`epsilon=None`: the same default, 0.05 times the cost's standard
        deviation). `epsilon` is the *final* one: the continuation's earlier, larger
        epsilons need more entries and take dense steps where these are short.
    - `kept_mass`: as for `sinkhorn_newton` (default 0.99).
    - `g`: optional column potential of shape `(m,)` (default 0).
    - `sample`: number of rows looked at (default 256; all rows if `n` is smaller).
        Costs one sort of a `(sample, m)` block.

    **Returns:** a Python `int` in $[8, m]$ (or $m$ if smaller).

    **Failure modes:** it must see values, so it cannot run under `jax.jit`,
    `jax.vmap` or `jax.grad` (a `TypeError` saying so at trace time): call it once
    outside, on representative data, and pass the result as the static `k`. Bad
    input (shapes, NaN or negative weights, a non-finite cost or epsilon) raises a
    `ValueError`/`TypeError`; `kept_mass` outside $(0, 1]$ or `sample` < 1 a
    `ValueError`.

    **Derivatives:** none (an integer; a static argument).

    **Example:**

    ```python
    import jax
    import solvers

    x = jax.random.uniform(jax.random.key(0), (2000, 2))
    y = jax.random.uniform(jax.random.key(1), (2000, 2))
    geom = solvers.PointCloud(x, y)
    k = solvers.sparse_k(geom, epsilon=1e-3)
    out = solvers.sinkhorn_newton(geom, epsilon=1e-3, hessian="sparse", k=k)
    print(k, out.n_newton_steps)
    ```
    """
    fn = "sparse_k"
    if not 0.0 < kept_mass <= 1.0:
        raise ValueError(f"{fn}: kept_mass must be in (0, 1]; got {kept_mass}.")
    if isinstance(sample, bool) or not isinstance(sample, int) or sample < 1:
        raise ValueError(f"{fn}: sample must be a positive int; got {sample!r}.")
    check_concrete((geom, a, b, epsilon, g), fn)
    if isinstance(geom, PointCloud) and not geom.is_online:
        # only a sample of rows is needed: never materialise the n x m cost (the
        # checks and the default epsilon then make passes by blocks)
        geom = PointCloud(
            geom.x, geom.y, cost=geom.cost, batch_size=1024, axis_name=geom.axis_name
        )
    kernel, a, b, eps, result, _ = prepare(geom, a, b, epsilon, fn)
    if getattr(kernel.geom, "axis_name", None) is not None:
        raise ValueError(
            f"{fn}: call it on the whole (unsharded) problem, without axis_name."
        )
    if not bool(result == RESULTS.successful):
        raise ValueError(f"{fn}: invalid problem: {RESULTS[result]}")
    n, m = kernel.geom.shape
    if g is None:
        g = jnp.zeros((m,), b.dtype)
    else:
        g = jnp.asarray(g, b.dtype)
        if g.shape != (m,):
            raise ValueError(f"{fn}: g must have shape ({m},); got {g.shape}.")
        if not bool(jnp.all(jnp.isfinite(jnp.where(b > 0, g, 0)))):
            raise ValueError(f"{fn}: g must be finite where b > 0.")
    stride = max(1, -(-n // sample))
    rows = kernel.geom.rows(stride)
    c = rows.cost_matrix
    curve = _kept_curve(c, a[::stride], b, lax.stop_gradient(g), eps)
    target = kept_mass + _MARGIN * (1.0 - kept_mass)
    # the first k whose curve reaches the target (rounding: the last entry is 1)
    reached = jnp.asarray(curve >= target * (1 - 4 * jnp.finfo(curve.dtype).eps))
    k = int(jnp.argmax(reached.at[-1].set(True))) + 1
    return min(m, _MULTIPLE * math.ceil(k / _MULTIPLE))
