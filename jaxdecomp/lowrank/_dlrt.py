r"""Rank-adaptive training of low-rank layers (DLRT), an optax transformation.

One engine serves `LowRankLinear` and `TuckerConv2d`: both expose a Tucker-2 view
$W_{o,i,s} = \sum_{ab} U^o_{oa} U^i_{ib} C_{abs}$ (a matrix is the case of one
"spatial" tap with a square core)."""

from __future__ import annotations

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import optax

from .._misc import HIGHEST, mm, truncation_rank
from ._layers import LowRankLinear
from ._tucker import TuckerConv2d

HI = HIGHEST


def _is_lowrank(x) -> bool:
    return isinstance(x, (LowRankLinear, TuckerConv2d))


def _trainable_lowrank(x) -> bool:
    # (optax.multi_transform hands a transformation masked params: a low-rank layer
    # labelled for another optimizer arrives with non-array fields.)
    if isinstance(x, LowRankLinear):
        return all(eqx.is_array(v) for v in (x.u, x.s, x.v))
    if isinstance(x, TuckerConv2d):
        return all(eqx.is_array(v) for v in (x.u_out, x.core, x.u_in))
    return False


def _orth(x):
    return jnp.linalg.qr(x, mode="reduced")[0]


def _polish(x):
    """One Newton-Schulz step towards the nearest orthonormal matrix: squares the
    orthonormality error left by QR and SVD rounding (keeps it at a few ulps)."""
    return 1.5 * x - 0.5 * mm(x, mm(x.T, x))


def _mat_o(c):
    return c.reshape(c.shape[0], -1)


def _mat_i(c):
    return jnp.swapaxes(c, 0, 1).reshape(c.shape[1], -1)


def _frame(m, mask):
    """For the mode unfolding m (a, b k) (inactive rows zero): orthonormal rows Q^T
    spanning m's row space and the pseudo-inverse R^+ of R with m^T = Q R, from the
    SVD m = W S V^T (Q = V, R = S W^T, R^+ = W S^+). Directions with a singular
    value at the rounding level (a singular core: zero-initialised, `with_rank` past
    the trained rank, rank 0) are dropped, so the Riemannian gradient stays finite:
    there the fixed-rank manifold has no tangent space in those directions and the
    step moves the core first. Frames are ordered by singular value, so the active
    ones lead, like `mask`."""
    w, sv, vt = jnp.linalg.svd(m, full_matrices=False)
    tiny = max(m.shape) * jnp.finfo(m.dtype).eps * jnp.max(sv)
    keep = (sv > tiny) & (jnp.arange(sv.shape[0], dtype=mask.dtype) < jnp.sum(mask))
    keep = keep.astype(m.dtype)
    rinv = w * (keep / jnp.where(keep > 0, sv, 1))[None, :]
    return vt * keep[:, None], rinv


class _Point(eqx.Module):
    """A point of the Tucker-2 manifold (active parts) with its unfolding frames."""

    uo: jax.Array
    c: jax.Array
    ui: jax.Array
    mo: jax.Array
    mi: jax.Array
    qo: jax.Array  # (a, b, k): orthonormal rows spanning mat_o(C)'s row space
    ro: jax.Array  # (a, a): R_o^+ (see `_frame`)
    qi: jax.Array  # (b, a, k)
    ri: jax.Array


def _point(layer) -> _Point:
    uo, c, ui, mo, mi = layer._tucker()
    mo, mi = jax.lax.stop_gradient(mo), jax.lax.stop_gradient(mi)
    uo, ui = uo * mo, ui * mi
    c = c * (mo[:, None, None] * mi[None, :, None])
    a, b, k = c.shape
    qo, ro = _frame(_mat_o(c), mo)
    qi, ri = _frame(_mat_i(c), mi)
    return _Point(uo, c, ui, mo, mi, qo.reshape(a, b, k), ro, qi.reshape(b, a, k), ri)


class _Tangent(eqx.Module):
    r"""A tangent vector at a `_Point`: $D \times_o U^o \times_i U^i$ plus the mode
    parts $\sum_{ab} Y^o_{oa} Q^o_{abs} U^i_{ib}$ and $\sum_{ab} U^o_{oa} Y^i_{ib}
    Q^i_{bas}$, with $Y^o \perp U^o$, $Y^i \perp U^i$ (three mutually orthogonal
    parts: the Frobenius norm is the norm of (D, Y^o, Y^i))."""

    d: jax.Array
    yo: jax.Array
    yi: jax.Array


def _tangent_combine(alpha, x: _Tangent, beta, y: _Tangent) -> _Tangent:
    return jtu.tree_map(lambda p, q: alpha * p + beta * q, x, y)


def _perp(u, y, mask):
    return (y - mm(u, mm(u.T, y))) * mask


def _riemannian_grad(p: _Point, grad) -> _Tangent:
    """The projection of the loss gradient G onto the tangent space, from the factor
    gradients: D = dL/dC, Y^o = (I - U^o U^o^T) (dL/dU^o) R_o^{-1} (dL/dU^o =
    mat_o(G x_i U^i^T) Q_o R_o, with R_o^+ for a singular core); likewise Y^i."""
    guo, gc, gui, _, _ = grad._tucker()
    d = gc * (p.mo[:, None, None] * p.mi[None, :, None])
    yo = mm(guo * p.mo, p.ro)
    yi = mm(gui * p.mi, p.ri)
    return _Tangent(d, _perp(p.uo, yo, p.mo), _perp(p.ui, yi, p.mi))


def _dense(p: _Point, t: _Tangent) -> jax.Array:
    """The tangent vector as a dense (out, in, k) array."""
    return (
        jnp.einsum("oa,ib,abs->ois", p.uo, p.ui, t.d, precision=HI)
        + jnp.einsum("oa,abs,ib->ois", t.yo, p.qo, p.ui, precision=HI)
        + jnp.einsum("oa,ib,bas->ois", p.uo, t.yi, p.qi, precision=HI)
    )


def _project(p: _Point, w: jax.Array) -> _Tangent:
    """Orthogonal projection of a dense (out, in, k) array onto the tangent space."""
    d = jnp.einsum("ois,oa,ib->abs", w, p.uo, p.ui, precision=HI)
    yo = jnp.einsum("ois,ib,abs->oa", w, p.ui, p.qo, precision=HI)
    yi = jnp.einsum("ois,oa,bas->ib", w, p.uo, p.qi, precision=HI)
    return _Tangent(d, _perp(p.uo, yo, p.mo), _perp(p.ui, yi, p.mi))


class _Moments(eqx.Module):
    """Per low-rank layer: the first moment (a tangent vector at the current point,
    transported to each new point by projection) and the scalar second moment (mean
    square per degree of freedom; invariant under basis changes)."""

    m: _Tangent
    v: jax.Array


def _zero_moments(layer) -> _Moments:
    uo, c, ui, _, _ = layer._tucker()
    zero = _Tangent(jnp.zeros_like(c), jnp.zeros_like(uo), jnp.zeros_like(ui))
    return _Moments(zero, jnp.zeros((), c.dtype))


def _truncate(ch, a_max, b_max, tau, caps=None):
    """HOSVD truncation of the augmented core: (P_o, P_i, rank_o, rank_i), ranks at
    most `caps` (default: the layer's maximum ranks a_max, b_max)."""
    cap_o, cap_i = (a_max, b_max) if caps is None else caps
    k = ch.shape[2]
    if k == 1:  # a matrix: one SVD, one rank for both modes
        p, sigma, qt = jnp.linalg.svd(ch[:, :, 0], full_matrices=False)
        r = truncation_rank(sigma, tau, min(cap_o, cap_i))
        return p[:, :a_max], qt[:b_max].T, r, r
    po, so, _ = jnp.linalg.svd(_mat_o(ch), full_matrices=False)
    pi, si, _ = jnp.linalg.svd(_mat_i(ch), full_matrices=False)
    ro = truncation_rank(so, tau, cap_o)
    ri = truncation_rank(si, tau, cap_i)
    ro = jnp.minimum(ro, ri * k)  # valid Tucker-2 ranks
    ri = jnp.minimum(ri, ro * k)
    return po[:, :a_max], pi[:, :b_max], ro, ri


def _truncated(layer, uo, ui, ch, tau, caps=None):
    """The layer at the truncation of core `ch` in the orthonormal bases `uo`, `ui`
    (columns beyond the active ones included): W = ch x_o uo x_i ui, truncated."""
    a, b = layer._tucker()[1].shape[:2]
    p_o, p_i, r_o, r_i = _truncate(ch, a, b, tau, caps)
    dtype = layer._tucker()[3].dtype
    new_mo = (jnp.arange(a) < r_o).astype(dtype)
    new_mi = (jnp.arange(b) < r_i).astype(dtype)
    new_c = jnp.einsum("pa,qb,pqs->abs", p_o, p_i, ch, precision=HI)
    new_c = new_c * (new_mo[:, None, None] * new_mi[None, :, None])
    return layer._with_tucker(
        _polish(mm(uo, p_o)), new_c, _polish(mm(ui, p_i)), new_mo, new_mi
    )


def _step(layer, grad, mom: _Moments, lr, tau, method, b1, b2, eps, count):
    """One parallel rank-adaptive basis-update & Galerkin step: (layer, moments)."""
    p = _point(layer)
    a, b, k = p.c.shape
    xi = _riemannian_grad(p, grad)
    if method == "adam":
        m = _tangent_combine(b1, mom.m, 1 - b1, xi)
        ro, ri = jnp.sum(p.mo), jnp.sum(p.mi)
        n_out, n_in = p.uo.shape[0], p.ui.shape[0]
        dof = ro * ri * k + (n_out - ro) * ro + (n_in - ri) * ri
        sq = sum(jnp.sum(jnp.square(x)) for x in jtu.tree_leaves(xi))
        v = b2 * mom.v + (1 - b2) * sq / dof
        t = count.astype(v.dtype)
        scale = (1 / (1 - b1**t)) / (jnp.sqrt(v / (1 - b2**t)) + eps)
        eta = _tangent_combine(scale, m, 0.0, m)
    else:
        m = _tangent_combine(b1, mom.m, 1.0, xi)
        v, eta = mom.v, m
    # Augmented orthonormal bases [U, Y] (old and new directions) for both modes, and
    # the Galerkin core of W - lr * eta in them.
    uh = _orth(jnp.concatenate([p.uo, eta.yo], axis=1))
    vh = _orth(jnp.concatenate([p.ui, eta.yi], axis=1))
    po, pyo = mm(uh.T, p.uo), mm(uh.T, eta.yo)
    pi, pyi = mm(vh.T, p.ui), mm(vh.T, eta.yi)
    ch = jnp.einsum("pa,qb,abs->pqs", po, pi, p.c - lr * eta.d, precision=HI) - lr * (
        jnp.einsum("pa,abs,qb->pqs", pyo, p.qo, pi, precision=HI)
        + jnp.einsum("pa,qb,bas->pqs", po, pyi, p.qi, precision=HI)
    )
    new = _truncated(layer, uh, vh, ch, tau)
    # Transport the first moment to the new point by projection.
    m_new = _project(_point(new), _dense(p, m))
    return new, _Moments(m_new, v)


def _augment(layer, grad):
    """Sequential DLRT, first half (the K- and L-steps' basis update): the same W
    written exactly in the augmented orthonormal bases orth[U, Y] of both modes, Y the
    new directions of the projected gradient; ranks min(2r, max_rank)."""
    p = _point(layer)
    a, b, _ = p.c.shape
    xi = _riemannian_grad(p, grad)

    def basis(u, y, mask, r_max):
        r = jnp.sum(mask).astype(jnp.int32)
        idx = jnp.arange(r_max, dtype=jnp.int32)
        room = (idx < r_max - r).astype(y.dtype)
        # columns [U (r), Y (up to r_max - r), 0, ...]: Y's active columns rolled
        # behind U's (both are masked to their leading columns)
        q = _polish(_orth(u + jnp.roll(y * room, r, axis=1)))
        new_mask = (idx < jnp.minimum(2 * r, r_max)).astype(mask.dtype)
        return q, new_mask  # all columns orthonormal; the mask selects the active

    uh, mo = basis(p.uo, xi.yo, p.mo, a)
    vh, mi = basis(p.ui, xi.yi, p.mi, b)
    c = jnp.einsum("pa,qb,abs->pqs", mm(uh.T, p.uo), mm(vh.T, p.ui), p.c, precision=HI)
    return layer._with_tucker(uh, c, vh, mo, mi)


def _galerkin(layer, grad, lr, tau):
    """Sequential DLRT, second half (the S-step and truncation): a gradient step on
    the core with the gradient taken at the augmented bases, then truncation by tau
    to at most half the maximum rank (so that the next augmentation fits)."""
    uo, c, ui, mo, mi = layer._tucker()  # all basis columns orthonormal
    mask = mo[:, None, None] * mi[None, :, None]
    ch = (c - lr * grad._tucker()[1]) * mask
    a, b = c.shape[:2]
    return _truncated(layer, uo, ui, ch, tau, (max(a // 2, 1), max(b // 2, 1)))


def _rest_spec(params):
    """Filter spec of the leaves `dlrt` hands to its inner optimizer: every inexact
    array except the factors and masks of the low-rank layers (their biases
    included)."""

    def spec(x):
        if _trainable_lowrank(x):
            s = jtu.tree_map(lambda _: False, x)
            if x.bias is not None:
                s = eqx.tree_at(lambda m: m.bias, s, True)
            return s
        return jtu.tree_map(eqx.is_inexact_array, x)

    return jtu.tree_map(spec, params, is_leaf=_is_lowrank)


class DLRTState(eqx.Module):
    """`count` (steps taken), `moments` (per low-rank layer, None elsewhere) and the
    inner optimizer's state for the other leaves."""

    count: jax.Array
    moments: object
    inner: object


def dlrt(
    learning_rate: float | Callable,
    tau: float = 0.1,
    momentum: float = 0.0,
    *,
    method: str = "sgd",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    variant: str = "parallel",
) -> optax.GradientTransformation:
    r"""Rank-adaptive training of [`LowRankLinear`][jaxdecomp.lowrank.LowRankLinear]
    and [`TuckerConv2d`][jaxdecomp.lowrank.TuckerConv2d] layers, as an optax
    `GradientTransformation`: the parallel rank-adaptive basis-update & Galerkin
    integrator (one backward pass per step).

    Each low-rank layer is a point of the Tucker-2 manifold $W = C \times_o U^o
    \times_i U^i$ (a matrix $U S V^T$ is the case of a 1-tap kernel). With the
    Riemannian gradient $\xi = P_W(\partial L/\partial W)$ recovered from the factor
    gradients ($\partial_C L$ and $(\partial_{U^o} L) R_o^{-1}$, $R_o$ from the QR
    of the core's unfolding), and the step direction $\eta$ ($\xi$, its momentum, or
    its Adam-normalised momentum):

    1. augmented orthonormal bases $\hat U^o = \operatorname{orth}[U^o, Y^o_\eta]$,
       $\hat U^i = \operatorname{orth}[U^i, Y^i_\eta]$ (old and new directions, up to
       twice the rank);
    2. Galerkin core $\hat C = (W - \eta_{lr}\,\eta) \times_o \hat U^{oT} \times_i
       \hat U^{iT}$ (for a matrix: $\hat S = \hat U^T(U\tilde SV^T + (I - UU^T)KV^T +
       UL^T(I - VV^T))\hat V$ with $K = US - \eta_{lr} GV$, $L = VS^T - \eta_{lr}
       G^TU$, $\tilde S = S - \eta_{lr} U^TGV$);
    3. truncation: (HO)SVD of $\hat C$; per mode keep the smallest rank with tail
       $\|\sigma_{r:}\| \le \tau\|\sigma\|$ (at most the layer's maximum rank).

    Shapes never change (ranks live in the layers' masks), so a jitted step does not
    recompile when a rank adapts; the bases stay orthonormal to rounding (QR every
    step). Every other leaf (the low-rank layers' biases included) is updated by the
    matching optax optimizer (`optax.sgd` with the same momentum, or `optax.adam`
    with the same `b1, b2, eps`) at the same learning rate; to use yet another
    optimizer for them, combine with `optax.multi_transform`, labelling the low-rank
    layers for `dlrt`.

    **Variants** (`variant`):

    - `"parallel"` (default, one backward pass per step; GeoLoRA-style): the steps
      above, the Galerkin core built from the same gradient as the bases.
    - `"sequential"`: DLRT's own integrator (the rank-adaptive BUG of Ceruti, Kusch &
      Lubich, as in Schotthöfer et al.'s Algorithm 1), two backward passes per step,
      as two consecutive `update` calls: the first (K- and L-steps) writes the same
      $W$ in the augmented bases $\operatorname{orth}[U, Y]$ (ranks doubled; the
      loss does not change), the second (S-step) takes a gradient step on the
      augmented core with the gradient *at the augmented bases* and truncates. Ranks
      are capped at half the layer's maximum rank so that the augmentation fits in
      the fixed shapes. Plain SGD only (`method="sgd"`, `momentum=0`); the other
      leaves move on the second call only, and a schedule counts DLRT steps (pairs
      of calls).

    **Arguments:**

    - `learning_rate`: the step size $\eta_{lr} > 0$, or an optax schedule
        (`count -> step size`).
    - `tau`: relative truncation threshold in $(0, 1)$.
    - `momentum`: heavy-ball coefficient $\beta \in [0, 1)$ for `method="sgd"`
        (default 0: plain SGD).
    - `method`: `"sgd"` (default) or `"adam"`.
    - `b1`, `b2`, `eps`: Adam's parameters (`method="adam"`).
    - `variant`: `"parallel"` (default) or `"sequential"` (see above).

    **Optimizer state across basis changes:** the first moment (momentum) is a
    tangent vector of the manifold, stored in the current bases and carried to the
    new point by projection after every step (vector transport by projection), so it
    is never reset when the bases rotate or the rank changes. Adam's second moment is
    kept per layer as the mean square of the Riemannian gradient per degree of freedom
    (a scalar), as in Riemannian Adam (Bécigneul & Ganea, ICLR 2019): elementwise
    second moments are not defined independently of the basis, which changes every
    step. So `method="adam"` is Adam elementwise on the other leaves and this
    basis-free Adam on the low-rank layers.

    **Returns:** an `optax.GradientTransformation`; its `update` needs `params`.

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
    approximation", 2024; Schotthöfer et al., "GeoLoRA", 2024; Bécigneul & Ganea,
    "Riemannian adaptive optimization methods", ICLR 2019.
    """
    if callable(learning_rate):
        schedule = learning_rate
    elif isinstance(learning_rate, (int, float)) and learning_rate > 0:
        schedule = optax.constant_schedule(float(learning_rate))
    else:
        raise ValueError(
            "dlrt: learning_rate must be a positive number or a schedule; got "
            f"{learning_rate!r}."
        )
    if not (isinstance(tau, (int, float)) and 0 < tau < 1):
        raise ValueError(f"dlrt: tau must be in (0, 1); got {tau!r}.")
    if not (isinstance(momentum, (int, float)) and 0 <= momentum < 1):
        raise ValueError(f"dlrt: momentum must be in [0, 1); got {momentum!r}.")
    if method not in ("sgd", "adam"):
        raise ValueError(f"dlrt: method must be 'sgd' or 'adam'; got {method!r}.")
    for name, val in (("b1", b1), ("b2", b2)):
        if not 0 <= val < 1:
            raise ValueError(f"dlrt: {name} must be in [0, 1); got {val!r}.")
    if variant not in ("parallel", "sequential"):
        raise ValueError(
            f"dlrt: variant must be 'parallel' or 'sequential'; got {variant!r}."
        )
    sequential = variant == "sequential"
    if sequential and (method != "sgd" or momentum):
        raise ValueError(
            "dlrt: variant='sequential' is plain SGD (DLRT's integrator); use the "
            "parallel variant for momentum or Adam."
        )
    if method == "adam":
        inner = optax.adam(schedule, b1=b1, b2=b2, eps=eps)
        beta1 = b1
    else:
        inner = optax.sgd(schedule, momentum=momentum or None)
        beta1 = momentum

    def init(params):
        moments = jtu.tree_map(
            lambda p: _zero_moments(p) if _trainable_lowrank(p) else None,
            params,
            is_leaf=_is_lowrank,
        )
        rest = eqx.filter(params, _rest_spec(params))
        with jax.numpy_dtype_promotion("standard"):
            inner_state = inner.init(rest)
        return DLRTState(jnp.zeros((), jnp.int32), moments, inner_state)

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("dlrt: update(grads, state, params) needs params.")
        count = state.count + 1
        spec = _rest_spec(params)
        # sequential: even calls update the bases, odd calls the cores (and the
        # other leaves); one DLRT step is two calls, the schedule counts DLRT steps
        half = state.count % 2 if sequential else None
        with jax.numpy_dtype_promotion("standard"):
            lr = schedule(state.count // 2 if sequential else state.count)
            rest, inner_state = inner.update(
                eqx.filter(updates, spec), state.inner, eqx.filter(params, spec)
            )
        if sequential:  # the other leaves move with the cores only
            rest = jtu.tree_map(lambda u: u * half.astype(u.dtype), rest)
            inner_state = jtu.tree_map(
                lambda new, old: jnp.where(half == 1, new, old),
                inner_state,
                state.inner,
            )
        g_leaves, treedef = jtu.tree_flatten(updates, is_leaf=_is_lowrank)
        p_leaves = treedef.flatten_up_to(params)
        m_leaves = treedef.flatten_up_to(state.moments)
        out, moms = [], []
        for g, p, mom in zip(g_leaves, p_leaves, m_leaves):
            if _trainable_lowrank(p):
                lr_p = jnp.asarray(lr, p._tucker()[1].dtype)
                if sequential:
                    new = jax.lax.cond(
                        half == 0,
                        _augment,
                        lambda p, g: _galerkin(p, g, lr_p, tau),
                        p,
                        g,
                    )
                else:
                    new, mom = _step(
                        p, g, mom, lr_p, tau, method, beta1, b2, eps, count
                    )
                delta = jtu.tree_map(lambda a, b: a - b, new, p)
                if p.bias is not None:
                    delta = eqx.tree_at(lambda m: m.bias, delta, None)
                out.append(delta)
            else:  # same structure, no leaves: `rest` holds this one's update
                out.append(jtu.tree_map(lambda _: None, g))
            moms.append(mom)
        lowrank = jtu.tree_unflatten(treedef, out)
        return (
            eqx.combine(rest, lowrank),
            DLRTState(count, jtu.tree_unflatten(treedef, moms), inner_state),
        )

    return optax.GradientTransformation(init, update)
