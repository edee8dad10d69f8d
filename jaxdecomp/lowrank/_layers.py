"""Low-rank linear layers: `LowRankLinear` (U S V^T with a rank mask) and
`FactorizedLinear` (A B^T)."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray

from .._misc import mm

HI = jax.lax.Precision.HIGHEST


def _check_features(name, in_features, out_features):
    for label, v in (("in_features", in_features), ("out_features", out_features)):
        if not (isinstance(v, int) and v >= 1):
            raise ValueError(f"{name}: {label} must be a positive int; got {v!r}.")


def _bias_init(key, in_features, out_features, dtype, use_bias):
    """eqx.nn.Linear's bias initialisation (or None)."""
    if not use_bias:
        return None
    lim = 1 / np.sqrt(in_features)
    return jr.uniform(key, (out_features,), dtype, -lim, lim)


def _dense_init(key, in_features, out_features, dtype):
    """eqx.nn.Linear's initialisation: uniform(-1/sqrt(in), 1/sqrt(in))."""
    lim = 1 / np.sqrt(in_features)
    return jr.uniform(key, (out_features, in_features), dtype, -lim, lim)


class FactorizedLinear(eqx.Module):
    r"""A linear layer with weight $W = A B^T$ of fixed rank $r$ (no orthogonality).

    The baseline for rank-adaptive training: trained with any optax optimizer, it is
    the "factorized + Adam" row of the benchmark, and the export format of
    [`LowRankLinear.shrink`][jaxdecomp.lowrank.LowRankLinear.shrink].

    **Arguments:** `in_features`, `out_features`, `rank` ($1 \le r \le
    \min(n_{in}, n_{out})$), `use_bias`, `dtype`, `key`. The factors are initialised
    so that $W$ has the variance of `eqx.nn.Linear`'s initialisation.

    Called on a vector of shape `(in_features,)` (use `jax.vmap` for batches).

    **Example:**

    ```python
    import jax, jax.numpy as jnp
    from jaxdecomp.lowrank import FactorizedLinear

    layer = FactorizedLinear(64, 32, rank=8, key=jax.random.key(0))
    y = jax.vmap(layer)(jnp.ones((5, 64)))
    ```
    """

    a: Float[Array, "out rank"]
    b: Float[Array, "in rank"]
    bias: Float[Array, " out"] | None
    in_features: int = eqx.field(static=True)
    out_features: int = eqx.field(static=True)

    def __init__(
        self,
        in_features,
        out_features,
        rank,
        *,
        use_bias=True,
        dtype=None,
        key: PRNGKeyArray,
    ):
        _check_features("FactorizedLinear", in_features, out_features)
        if not (isinstance(rank, int) and 1 <= rank <= min(in_features, out_features)):
            raise ValueError(
                f"FactorizedLinear: rank must be an int in [1, min(in, out) = "
                f"{min(in_features, out_features)}]; got {rank!r}."
            )
        dtype = jnp.zeros(()).dtype if dtype is None else dtype
        ka, kb, kc = jr.split(key, 3)
        lim = 1 / np.sqrt(in_features)
        self.a = jr.normal(ka, (out_features, rank), dtype) / np.sqrt(rank)
        self.b = jr.uniform(kb, (in_features, rank), dtype, -lim, lim)
        self.bias = _bias_init(kc, in_features, out_features, dtype, use_bias)
        self.in_features = in_features
        self.out_features = out_features

    @property
    def rank(self) -> int:
        return self.a.shape[-1]

    @property
    def weight(self) -> Float[Array, "out in"]:
        return mm(self.a, self.b.T)

    def __call__(self, x: Float[Array, " in"], *, key=None) -> Float[Array, " out"]:
        y = jnp.matmul(self.a, jnp.matmul(self.b.T, x, precision=HI), precision=HI)
        return y if self.bias is None else y + self.bias


class LowRankLinear(eqx.Module):
    r"""A linear layer in SVD-like form $W = U S V^T$ with orthonormal $U$, $V$,
    stored at a static maximum rank with a rank mask.

    The factors have shapes $U \in \mathbb{R}^{n_{out} \times r_{max}}$,
    $S \in \mathbb{R}^{r_{max} \times r_{max}}$ (a full core, as the DLRT integrator
    needs), $V \in \mathbb{R}^{n_{in} \times r_{max}}$; only the leading `rank`
    columns are active (`mask`, an array). Changing the rank changes array values, never
    shapes, so a jitted training step never recompiles when the rank adapts.

    **Arguments:**

    - `in_features`, `out_features`: sizes.
    - `max_rank`: the static capacity, $1 \le r_{max} \le \min(n_{in}, n_{out})$.
    - `rank`: the initially active rank (default `max_rank`).
    - `use_bias`, `dtype`, `key`: as `eqx.nn.Linear`. The initial weight is the
        truncated SVD of an `eqx.nn.Linear`-style random matrix.

    **Methods:** `rank` (active rank, an int array), `weight` (the dense $W$),
    `to_dense()` (an `eqx.nn.Linear`), `with_rank(r)` (same factors, new mask; `r` may
    be traced), `shrink()` (host-side export at the true rank as a
    [`FactorizedLinear`][jaxdecomp.lowrank.FactorizedLinear]).

    **Derivatives:** an ordinary Equinox module: gradients with respect to `u`, `s`,
    `v`, `bias` in both modes (the mask is not differentiated).

    **Example:**

    ```python
    import jax, jax.numpy as jnp
    from jaxdecomp.lowrank import LowRankLinear

    layer = LowRankLinear(64, 32, max_rank=16, rank=4, key=jax.random.key(0))
    y = jax.vmap(layer)(jnp.ones((5, 64)))
    bigger = layer.with_rank(8)  # same shapes: no recompilation
    small = layer.shrink()       # FactorizedLinear of rank 4
    ```

    **Reference:** Schotthöfer et al., "Low-rank lottery tickets", NeurIPS 2022.
    """

    u: Float[Array, "out max_rank"]
    s: Float[Array, "max_rank max_rank"]
    v: Float[Array, "in max_rank"]
    bias: Float[Array, " out"] | None
    mask: Float[Array, " max_rank"]
    in_features: int = eqx.field(static=True)
    out_features: int = eqx.field(static=True)

    def __init__(
        self,
        in_features,
        out_features,
        max_rank,
        *,
        rank=None,
        use_bias=True,
        dtype=None,
        key: PRNGKeyArray,
    ):
        _check_features("LowRankLinear", in_features, out_features)
        limit = min(in_features, out_features)
        if not (isinstance(max_rank, int) and 1 <= max_rank <= limit):
            raise ValueError(
                f"LowRankLinear: max_rank must be an int in [1, min(in, out) = "
                f"{limit}]; "
                f"got {max_rank!r}."
            )
        rank = max_rank if rank is None else rank
        if not (isinstance(rank, int) and 1 <= rank <= max_rank):
            raise ValueError(
                f"LowRankLinear: rank must be an int in [1, max_rank = {max_rank}]; "
                "got "
                f"{rank!r}."
            )
        dtype = jnp.zeros(()).dtype if dtype is None else dtype
        kw, kb = jr.split(key)
        w = _dense_init(kw, in_features, out_features, dtype)
        u, sv, vt = jnp.linalg.svd(w, full_matrices=False)
        self.u = u[:, :max_rank]
        self.s = jnp.diag(sv[:max_rank])
        self.v = vt[:max_rank].T
        self.bias = _bias_init(kb, in_features, out_features, dtype, use_bias)
        self.mask = (jnp.arange(max_rank) < rank).astype(dtype)
        self.in_features = in_features
        self.out_features = out_features

    @property
    def max_rank(self) -> int:
        return self.s.shape[-1]

    @property
    def rank(self) -> Int[Array, ""]:
        return jnp.sum(self.mask > 0).astype(jnp.int32)

    @property
    def masked_core(self) -> Float[Array, "max_rank max_rank"]:
        mask = jax.lax.stop_gradient(self.mask)  # the rank is not differentiated
        return self.s * (mask[:, None] * mask[None, :])

    @property
    def weight(self) -> Float[Array, "out in"]:
        return mm(mm(self.u, self.masked_core), self.v.T)

    def __call__(self, x: Float[Array, " in"], *, key=None) -> Float[Array, " out"]:
        h = jnp.matmul(self.v.T, x, precision=HI)
        h = jnp.matmul(self.masked_core, h, precision=HI)
        y = jnp.matmul(self.u, h, precision=HI)
        return y if self.bias is None else y + self.bias

    def with_rank(self, rank) -> LowRankLinear:
        """The same factors with the leading `rank` columns active (traceable)."""
        mask = (jnp.arange(self.max_rank) < rank).astype(self.mask.dtype)
        return eqx.tree_at(lambda m: m.mask, self, mask)

    def to_dense(self) -> eqx.nn.Linear:
        """An `eqx.nn.Linear` with weight U S V^T (active part) and the same bias."""
        dense = eqx.nn.Linear(
            self.in_features,
            self.out_features,
            use_bias=self.bias is not None,
            dtype=self.u.dtype,
            key=jr.key(0),
        )
        dense = eqx.tree_at(lambda m: m.weight, dense, self.weight)
        if self.bias is not None:
            dense = eqx.tree_at(lambda m: m.bias, dense, self.bias)
        return dense

    def shrink(self) -> FactorizedLinear:
        """Export at the true rank r as a `FactorizedLinear` (A = U_r S_r, B = V_r).

        Host-side (reads the mask); not for use under `jit`."""
        keep = np.nonzero(np.asarray(self.mask) > 0)[0]
        if keep.size == 0:
            raise ValueError("LowRankLinear.shrink: the layer has rank 0.")
        out = FactorizedLinear(
            self.in_features,
            self.out_features,
            int(keep.size),
            use_bias=self.bias is not None,
            dtype=self.u.dtype,
            key=jr.key(0),
        )
        a = mm(self.u[:, keep], self.s[np.ix_(keep, keep)])
        out = eqx.tree_at(lambda m: (m.a, m.b), out, (a, self.v[:, keep]))
        if self.bias is not None:
            out = eqx.tree_at(lambda m: m.bias, out, self.bias)
        return out

    # The generic Tucker-2 view used by `dlrt`: (u, core (r, r, 1), v, mask, mask).
    def _tucker(self):
        return self.u, self.s[:, :, None], self.v, self.mask, self.mask

    def _with_tucker(self, u, core, v, mask, mask_in) -> LowRankLinear:
        del mask_in  # a matrix has one rank (both modes' singular values coincide)
        return eqx.tree_at(
            lambda m: (m.u, m.s, m.v, m.mask), self, (u, core[:, :, 0], v, mask)
        )
