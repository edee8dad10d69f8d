r"""Rank-adaptive training of `LowRankLinear` layers (DLRT), an optax transform."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import optax

from .._misc import mm, truncation_rank
from ._layers import LowRankLinear


def _is_lowrank(x) -> bool:
    return isinstance(x, LowRankLinear)


def _orth(x):
    return jnp.linalg.qr(x, mode="reduced")[0]


def _polish(x):
    """One Newton-Schulz step towards the nearest orthonormal matrix: squares the
    orthonormality error left by QR and SVD rounding (keeps it at a few ulps)."""
    gram = mm(x.T, x)
    return 1.5 * x - 0.5 * mm(x, gram)


class _Momentum(eqx.Module):
    """Heavy-ball momentum of the tangent-projected gradient, in the current bases:
    k = M V, l = M^T U, s = U^T M V (the projection P(M) = k V^T + U l^T - U s V^T)."""

    k: jax.Array
    l: jax.Array  # noqa: E741
    s: jax.Array
    bias: jax.Array | None


def _zero_momentum(layer: LowRankLinear) -> _Momentum:
    bias = None if layer.bias is None else jnp.zeros_like(layer.bias)
    return _Momentum(
        jnp.zeros_like(layer.u), jnp.zeros_like(layer.v), jnp.zeros_like(layer.s), bias
    )


def _step(layer: LowRankLinear, grad: LowRankLinear, mom: _Momentum, lr, tau, beta):
    """One parallel basis-update & Galerkin step: (new layer, new momentum)."""
    m = jax.lax.stop_gradient(layer.mask)
    mm2 = m[:, None] * m[None, :]
    r_max = layer.max_rank
    u, v = layer.u * m, layer.v * m
    s = layer.s * mm2
    # Gradients of W from the factor gradients: dL/dU = G V S^T, dL/dV = G^T U S,
    # dL/dS = U^T G V. S is invertible on the active block (truncation keeps its
    # singular values above tau ||S||); the inactive block is padded with I.
    s_full = s + jnp.diag(1.0 - m)
    gv = jnp.linalg.solve(s_full, (grad.u * m).T).T * m  # G V       (out x r_max)
    gtu = jnp.linalg.solve(s_full.T, (grad.v * m).T).T * m  # G^T U  (in x r_max)
    gs = grad.s * mm2  # U^T G V
    # Heavy ball on the tangent space (the momentum is already in these bases).
    mk, ml, ms = beta * mom.k + gv, beta * mom.l + gtu, beta * mom.s + gs
    k1 = mm(u, s) - lr * mk  # K-step
    l1 = mm(v, s.T) - lr * ml  # L-step
    s1 = s - lr * ms  # S-step (parallel: at the old bases)
    # Augmented orthonormal bases [U, K1], [V, L1].
    uh = _orth(jnp.concatenate([u, k1], axis=1))
    vh = _orth(jnp.concatenate([v, l1], axis=1))
    uh_u, vt_vh = mm(uh.T, u), mm(v.T, vh)
    core = (
        mm(mm(uh_u, s1), vt_vh)
        + mm(mm(uh.T, k1) - mm(uh_u, mm(u.T, k1)), vt_vh)
        + mm(uh_u, mm(l1.T, vh) - mm(mm(l1.T, v), vt_vh))
    )
    p, sigma, qt = jnp.linalg.svd(core, full_matrices=False)
    rank = truncation_rank(sigma, tau, r_max)
    new_mask = (jnp.arange(r_max) < rank).astype(layer.mask.dtype)
    new_u = _polish(mm(uh, p[:, :r_max]))
    new_v = _polish(mm(vh, qt[:r_max].T))
    new_s = jnp.diag(sigma[:r_max]) * (new_mask[:, None] * new_mask[None, :])
    new = eqx.tree_at(
        lambda x: (x.u, x.s, x.v, x.mask), layer, (new_u, new_s, new_v, new_mask)
    )
    mb = None
    if layer.bias is not None:
        mb = beta * mom.bias + grad.bias
        new = eqx.tree_at(lambda x: x.bias, new, layer.bias - lr * mb)
    # Transport the momentum to the new bases by projection: with
    # M = mk V^T + U ml^T - U ms V^T, store M V', M^T U', U'^T M V'.
    nu, nv = new_u * new_mask, new_v * new_mask
    vt_nv, ut_nu = mm(v.T, nv), mm(u.T, nu)
    k_new = mm(mk, vt_nv) + mm(u, mm(ml.T, nv)) - mm(u, mm(ms, vt_nv))
    l_new = mm(ml, ut_nu) + mm(v, mm(mk.T, nu)) - mm(v, mm(ms.T, ut_nu))
    s_new = (
        mm(mm(nu.T, mk), vt_nv) + mm(ut_nu.T, mm(ml.T, nv)) - mm(ut_nu.T, mm(ms, vt_nv))
    )
    return new, _Momentum(k_new, l_new, s_new, mb)


class DLRTState(eqx.Module):
    """Per-`LowRankLinear` momentum (None elsewhere), kept in the current bases."""

    momentum: object


def dlrt(
    learning_rate: float, tau: float = 0.1, momentum: float = 0.0
) -> optax.GradientTransformation:
    r"""Rank-adaptive training of [`LowRankLinear`][jaxdecomp.lowrank.LowRankLinear]
    layers, as an optax `GradientTransformation`: the parallel rank-adaptive
    basis-update & Galerkin integrator (one backward pass per step).

    For each `LowRankLinear` leaf with $W = U S V^T$ (active rank $r$) and loss gradient
    $G = \partial L / \partial W$ (recovered from the factor gradients as
    $GV = (\partial_U L) S^{-T}$, $G^TU = (\partial_V L) S^{-1}$,
    $U^TGV = \partial_S L$):

    1. $K = US - \eta\,GV$, $L = VS^T - \eta\,G^TU$, $\tilde S = S - \eta\,U^TGV$;
    2. new orthonormal bases $\hat U = \operatorname{orth}[U, K]$,
       $\hat V = \operatorname{orth}[V, L]$ (old and new directions, up to $2r$);
    3. Galerkin core $\hat S = \hat U^T\big(U\tilde SV^T + (I - UU^T)KV^T +
       UL^T(I - VV^T)\big)\hat V$;
    4. truncation: $\hat S = P\Sigma Q^T$, keep the smallest $r'$ with
       $\|\Sigma_{r':}\| \le \tau\|\Sigma\|$ (at most `max_rank`), so
       $U \leftarrow \hat U P_{r'}$, $S \leftarrow \Sigma_{r'}$, $V \leftarrow \hat V
       Q_{r'}$.

    Shapes never change (the rank lives in the layer's mask), so a jitted step does not
    recompile when the rank adapts; $U$ and $V$ stay orthonormal to rounding (QR every
    step). Biases of the low-rank layers take a plain SGD step; every other leaf too
    — to train those with another optimizer, combine with `optax.multi_transform`,
    labelling the `LowRankLinear` leaves for `dlrt`.

    **Arguments:**

    - `learning_rate`: the step size $\eta > 0$ (SGD on the low-rank manifold).
    - `tau`: relative truncation threshold in $(0, 1)$.
    - `momentum`: heavy-ball coefficient $\beta \in [0, 1)$ (default 0: plain SGD).
        The momentum of the projected gradient is stored by its three components in
        the current bases and carried across every basis change by projecting the
        tangent matrix it represents onto the new bases (vector transport by
        projection), so it is never reset when the rank changes.

    **Returns:** an `optax.GradientTransformation`; its `update` needs `params`.

    **Limitations (this version):** SGD with optional heavy-ball momentum (no Adam
    moments yet); only `LowRankLinear` (not `TuckerConv2d`).

    **Example:**

    ```python
    import equinox as eqx, jax, jax.numpy as jnp, optax
    from jaxdecomp.lowrank import LowRankLinear, dlrt

    layer = LowRankLinear(20, 10, max_rank=8, key=jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (64, 20))
    y = x @ jnp.ones((20, 10)) / 20  # a rank-1 teacher

    opt = dlrt(learning_rate=0.5, tau=0.05)
    state = opt.init(layer)

    @eqx.filter_jit
    def step(layer, state):
        grads = eqx.filter_grad(lambda m: jnp.mean((jax.vmap(m)(x) - y) ** 2))(layer)
        updates, state = opt.update(grads, state, layer)
        return eqx.apply_updates(layer, updates), state

    for _ in range(100):
        layer, state = step(layer, state)
    ```

    **References:** Schotthöfer et al., "Low-rank lottery tickets: finding efficient
    low-rank neural networks via matrix differential equations", NeurIPS 2022; Ceruti,
    Kusch & Lubich, "A parallel rank-adaptive integrator for dynamical low-rank
    approximation", 2024; Schotthöfer et al., "GeoLoRA", 2024.
    """
    if not (isinstance(learning_rate, (int, float)) and learning_rate > 0):
        raise ValueError(
            f"dlrt: learning_rate must be positive; got {learning_rate!r}."
        )
    if not (isinstance(tau, (int, float)) and 0 < tau < 1):
        raise ValueError(f"dlrt: tau must be in (0, 1); got {tau!r}.")

    if not (isinstance(momentum, (int, float)) and 0 <= momentum < 1):
        raise ValueError(f"dlrt: momentum must be in [0, 1); got {momentum!r}.")

    def init(params):
        return DLRTState(
            jtu.tree_map(
                lambda p: (
                    _zero_momentum(p) if _is_lowrank(p) and eqx.is_array(p.u) else None
                ),
                params,
                is_leaf=_is_lowrank,
            )
        )

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("dlrt: update(grads, state, params) needs params.")
        g_leaves, treedef = jtu.tree_flatten(updates, is_leaf=_is_lowrank)
        p_leaves = treedef.flatten_up_to(params)
        m_leaves = treedef.flatten_up_to(state.momentum)
        out, moms = [], []
        for g, p, mom in zip(g_leaves, p_leaves, m_leaves):
            if _is_lowrank(p) and eqx.is_array(p.u):
                new, mom = _step(p, g, mom, learning_rate, tau, momentum)
                out.append(
                    jtu.tree_map(
                        lambda a, b: None if a is None else a - b,
                        new,
                        p,
                        is_leaf=lambda x: x is None,
                    )
                )
            else:
                out.append(None if g is None else -learning_rate * g)
            moms.append(mom)
        return (
            jtu.tree_unflatten(treedef, out),
            DLRTState(jtu.tree_unflatten(treedef, moms)),
        )

    return optax.GradientTransformation(init, update)
