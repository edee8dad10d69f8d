"""Trained rank pruning (TRP): nuclear-norm penalty plus periodic SVD truncation."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import optax

from .._misc import is_linear, mm, truncation_rank


class TRPState(eqx.Module):
    count: jax.Array


def _truncate(w, tol):
    u, s, vt = jnp.linalg.svd(w, full_matrices=False)
    keep = jnp.arange(s.shape[0]) < truncation_rank(s, tol, s.shape[0])
    return mm(u * (s * keep.astype(s.dtype))[None, :], vt)


def trp(
    learning_rate: float,
    nuclear_weight: float = 1e-4,
    period: int = 20,
    tol: float = 0.1,
) -> optax.GradientTransformation:
    r"""Trained rank pruning (Xu et al., IJCAI 2020) for the `eqx.nn.Linear` weights of
    a model, as an optax transformation: a baseline for rank-adaptive training.

    Every step is SGD on $L + \lambda\sum_l \|W_l\|_*$ (subgradient $U_lV_l^T$ of the
    nuclear norm); every `period` steps each weight is replaced by its truncated SVD,
    keeping the smallest rank with tail $\|\sigma_{r:}\| \le$ `tol` $\|\sigma\|$. Other
    leaves take plain SGD steps. Export the result with
    [`compress`][jaxdecomp.lowrank.compress]`(model, tol=...)`.

    **Arguments:** `learning_rate` (> 0), `nuclear_weight` $\lambda \ge 0$, `period`
    (steps between truncations, >= 1), `tol` in (0, 1).

    **Returns:** an `optax.GradientTransformation` (its `update` needs `params`).

    **Example:**

    ```python
    import equinox as eqx, jax, jax.numpy as jnp
    from jaxdecomp.lowrank import trp

    layer = eqx.nn.Linear(8, 8, key=jax.random.key(0))
    opt = trp(0.1, nuclear_weight=1e-3, period=5, tol=0.2)
    state = opt.init(layer)
    grads = eqx.filter_grad(lambda m: jnp.sum(m(jnp.ones(8)) ** 2))(layer)
    updates, state = opt.update(grads, state, layer)
    layer = eqx.apply_updates(layer, updates)
    ```

    **Reference:** Xu et al., "TRP: Trained Rank Pruning for Efficient Deep Neural
    Networks", IJCAI 2020.
    """
    if not learning_rate > 0:
        raise ValueError(f"trp: learning_rate must be positive; got {learning_rate!r}.")
    if not nuclear_weight >= 0:
        raise ValueError(f"trp: nuclear_weight must be >= 0; got {nuclear_weight!r}.")
    if not (isinstance(period, int) and period >= 1):
        raise ValueError(f"trp: period must be a positive int; got {period!r}.")
    if not 0 < tol < 1:
        raise ValueError(f"trp: tol must be in (0, 1); got {tol!r}.")

    def init(params):
        del params
        return TRPState(jnp.zeros((), jnp.int32))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("trp: update(grads, state, params) needs params.")
        count = state.count + 1
        truncate_now = (count % period) == 0

        def one(g, p):
            # (A layer masked out by optax.multi_transform has no array weight.)
            if not (is_linear(p) and eqx.is_array(p.weight)):
                return jtu.tree_map(lambda x: -learning_rate * x, g)
            u, _, vt = jnp.linalg.svd(p.weight, full_matrices=False)
            step = g.weight + nuclear_weight * mm(u, vt)
            w_new = p.weight - learning_rate * step
            w_new = jnp.where(truncate_now, _truncate(w_new, tol), w_new)
            out = jtu.tree_map(lambda x: -learning_rate * x, g)
            return eqx.tree_at(lambda m: m.weight, out, w_new - p.weight)

        new = jtu.tree_map(one, updates, params, is_leaf=is_linear)
        return new, TRPState(count)

    return optax.GradientTransformation(init, update)
