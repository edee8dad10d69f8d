r"""SOAP: Adam in Shampoo's eigenbasis."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import optax
from jaxtyping import Array

from .._misc import mm, mT
from ._blocks import from_blocks, plan, to_blocks
from ._misc import (
    Sequence,
    begin_step,
    bias_correction,
    check_positive_ints,
    compute_dtype,
    finish_step,
)
from ._results import RESULTS


class SoapFactors(NamedTuple):
    """Per blocked parameter: statistics `left`, `right` (n_blocks, d, d), their
    eigenbases `q_left`, `q_right`, and Adam's second moment `nu` in the rotated
    basis (n_blocks, d_left, d_right)."""

    left: Array
    right: Array
    q_left: Array
    q_right: Array
    nu: Array


class SoapState(NamedTuple):
    """`count`, `mu` (first moment, in the parameters' own basis), `nu` (second
    moment of the scalar/vector leaves; matrix leaves keep theirs in `factors`),
    `factors` (per leaf, `None` or [`SoapFactors`][jaxdecomp.optim.SoapFactors]),
    `result` and `basis_failures` (eigenbasis refreshes that came out non-finite and
    were discarded)."""

    count: Array
    mu: Any
    nu: Any
    factors: tuple
    result: RESULTS
    basis_failures: Array


def _sorted_eigh(stat: Array) -> Array:
    _, vecs = jnp.linalg.eigh(stat)
    return vecs[..., ::-1]  # largest first, as SOAP's reference


def _both_eigh(a):
    seq = Sequence()
    left = seq.done(_sorted_eigh(a[0]))
    return left, _sorted_eigh(seq.after_previous(a[1]))


def _power_qr(stat: Array, q: Array, nu: Array, side: int):
    """SOAP's refresh: order the basis by the Rayleigh quotients diag(Q^T S Q)
    (largest first, permuting the second moment along with it), then one
    subspace-iteration step Q <- qr(S Q)."""
    est = jnp.einsum("bij,bik,bkj->bj", q, stat, q, precision=lax.Precision.HIGHEST)
    order = jnp.argsort(-est, axis=-1)
    q = jnp.take_along_axis(q, order[:, None, :], axis=-1)
    if side == 0:
        nu = jnp.take_along_axis(nu, order[:, :, None], axis=1)
    else:
        nu = jnp.take_along_axis(nu, order[:, None, :], axis=2)
    q, _ = jnp.linalg.qr(mm(stat, q))
    return q, nu


def scale_by_soap(
    *,
    b1: float = 0.95,
    b2: float = 0.95,
    shampoo_beta: float | None = None,
    eps: float = 1e-8,
    precondition_every: int = 10,
    block_size: int = 1024,
    state_dtype=None,
    throw: bool = True,
) -> optax.GradientTransformation:
    """The SOAP direction without the learning rate and weight decay;
    [`soap`][jaxdecomp.optim.soap] chains it with `optax.add_decayed_weights` and
    `optax.scale_by_learning_rate`.

    **Arguments:** as [`soap`][jaxdecomp.optim.soap], without `learning_rate` and
    `weight_decay`.

    **Returns:** an `optax.GradientTransformation` whose state is a
    [`SoapState`][jaxdecomp.optim.SoapState].

    **Example:**

    ```python
    import jax.numpy as jnp, optax
    from jaxdecomp import optim

    opt = optax.chain(optim.scale_by_soap(), optax.scale(-3e-3))
    state = opt.init({"w": jnp.ones((8, 4))})
    ```
    """
    check_positive_ints(
        "soap", block_size=block_size, precondition_every=precondition_every
    )
    sb = b2 if shampoo_beta is None else shampoo_beta

    def dtype_of(x):
        return compute_dtype(x.dtype, state_dtype)

    def init_fn(params):
        leaves = jtu.tree_leaves(params)
        factors = []
        for x in leaves:
            if not jnp.issubdtype(x.dtype, jnp.floating):
                raise ValueError(
                    f"soap: parameters must be floating point; got {x.dtype}."
                )
            b = plan(x.shape, block_size)
            if b is None:
                factors.append(None)
                continue
            dt, n = dtype_of(x), b.n_blocks
            dl, dr = b.block_rows, b.block_cols
            eye = lambda d: jnp.broadcast_to(jnp.eye(d, dtype=dt), (n, d, d))  # noqa: E731
            factors.append(
                SoapFactors(
                    jnp.zeros((n, dl, dl), dt),
                    jnp.zeros((n, dr, dr), dt),
                    eye(dl),
                    eye(dr),
                    jnp.zeros((n, dl, dr), dt),
                )
            )
        zeros = lambda x: jnp.zeros_like(x, dtype=dtype_of(x))  # noqa: E731
        nu = jtu.tree_map(
            lambda x: (
                zeros(x)
                if plan(x.shape, block_size) is None
                else jnp.zeros((0,), dtype_of(x))
            ),
            params,
        )
        return SoapState(
            jnp.zeros([], jnp.int32),
            jtu.tree_map(zeros, params),
            nu,
            tuple(factors),
            RESULTS.successful,
            jnp.zeros([], jnp.int32),
        )

    def update_fn(updates, state, params=None):
        del params
        updates, state, finite = begin_step(updates, state, throw)
        grads, treedef = jtu.tree_flatten(updates)
        mu, nu = jtu.tree_leaves(state.mu), jtu.tree_leaves(state.nu)
        count = state.count + 1
        first = count == 1
        refresh = (count % precondition_every == 0) & ~first
        outs, new_mu, new_nu, new_factors = [], [], [], []
        failures = jnp.asarray(0, jnp.int32)
        chain = Sequence()  # one LAPACK call at a time (see Sequence)
        for g, m, v, f in zip(grads, mu, nu, state.factors):
            g = g.astype(m.dtype)
            m = b1 * m + (1 - b1) * g
            new_mu.append(m)
            c1 = bias_correction(b1, count, m.dtype)
            c2 = bias_correction(b2, count, m.dtype)
            if f is None:
                v = b2 * v + (1 - b2) * g * g
                new_nu.append(v)
                new_factors.append(None)
                outs.append((m / c1) / (jnp.sqrt(v / c2) + eps))
                continue
            new_nu.append(v)
            b = plan(g.shape, block_size)
            gb, mb = to_blocks(g, b), to_blocks(m, b)
            # the first step sets the statistics and the basis (eigh) before use
            left0 = jnp.where(first, mm(gb, mT(gb)), f.left)
            right0 = jnp.where(first, mm(mT(gb), gb), f.right)
            ql, qr = chain.done(
                lax.cond(
                    first,
                    _both_eigh,
                    lambda a: (a[2], a[3]),
                    chain.after_previous((left0, right0, f.q_left, f.q_right)),
                )
            )
            rot_g = mm(mm(mT(ql), gb), qr)
            rot_m = mm(mm(mT(ql), mb), qr)
            vb = b2 * f.nu + (1 - b2) * rot_g * rot_g
            step = (rot_m / c1) / (jnp.sqrt(vb / c2) + eps)
            outs.append(from_blocks(mm(mm(ql, step), mT(qr)), b))
            # statistics after the step (SOAP's order); the first step already has them
            left = jnp.where(first, left0, sb * f.left + (1 - sb) * mm(gb, mT(gb)))
            right = jnp.where(first, right0, sb * f.right + (1 - sb) * mm(mT(gb), gb))

            def do_refresh(a):
                left, right, ql, qr, vb = a
                inner = Sequence()
                nql, vb2 = inner.done(_power_qr(left, ql, vb, 0))
                right, qr, vb2 = inner.after_previous((right, qr, vb2))
                nqr, vb2 = _power_qr(right, qr, vb2, 1)
                ok = jnp.all(jnp.isfinite(nql), axis=(-2, -1)) & jnp.all(
                    jnp.isfinite(nqr), axis=(-2, -1)
                )
                okm = ok[:, None, None]
                return (
                    jnp.where(okm, nql, ql),
                    jnp.where(okm, nqr, qr),
                    jnp.where(okm, vb2, vb),
                    jnp.sum(~ok).astype(jnp.int32),
                )

            ql, qr, vb, fails = chain.done(
                lax.cond(
                    refresh,
                    do_refresh,
                    lambda a: (a[2], a[3], a[4], jnp.asarray(0, jnp.int32)),
                    chain.after_previous((left, right, ql, qr, vb)),
                )
            )
            failures = failures + fails
            new_factors.append(SoapFactors(left, right, ql, qr, vb))
        outs = [o.astype(g.dtype) for o, g in zip(outs, grads)]
        new_state = SoapState(
            count,
            jtu.tree_unflatten(treedef, new_mu),
            jtu.tree_unflatten(treedef, new_nu),
            tuple(new_factors),
            state.result,
            state.basis_failures + failures,
        )
        return finish_step(
            finite, jtu.tree_unflatten(treedef, outs), new_state, state, throw
        )

    return optax.GradientTransformation(init_fn, update_fn)


def soap(
    learning_rate: optax.ScalarOrSchedule,
    *,
    b1: float = 0.95,
    b2: float = 0.95,
    shampoo_beta: float | None = None,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    precondition_every: int = 10,
    block_size: int = 1024,
    state_dtype=None,
    throw: bool = True,
) -> optax.GradientTransformation:
    r"""SOAP (Vyas et al. 2024): Adam run in the eigenbasis of Shampoo's
    preconditioner. Per matrix block $G$ with statistics $L, R$ and their
    eigenbases $Q_L, Q_R$:

    $$G' = Q_L^T G Q_R,\quad M \leftarrow \beta_1 M + (1-\beta_1) G,\quad
      V \leftarrow \beta_2 V + (1-\beta_2)\,G'^{\odot 2},\quad
      \Delta = -\eta\,Q_L \frac{Q_L^T \hat M Q_R}{\sqrt{\hat V} + \epsilon} Q_R^T,$$

    then $L \leftarrow \beta_s L + (1-\beta_s) GG^T$ (likewise $R$). The bases come
    from `eigh` at the first step and are refreshed every `precondition_every`
    steps by SOAP's one power-iteration step with QR ($Q \leftarrow
    \mathrm{qr}(LQ)$, after ordering $Q$ and $V$ by the Rayleigh quotients), which
    costs a QR instead of an eigendecomposition. Scalars and vectors get Adam.
    Matrices larger than `block_size` on a side are blocked as in
    [`shampoo`][jaxdecomp.optim.shampoo]. Unlike the reference implementation the
    first step is taken (not skipped).

    **Arguments:** `learning_rate` (float or schedule); `b1`, `b2` (defaults of the
    paper, 0.95/0.95); `shampoo_beta` (statistics decay, default `b2`); `eps`;
    `weight_decay` (decoupled); `precondition_every` (10); `block_size` (1024);
    `state_dtype` (default: the parameter's; float32 for bfloat16/float16);
    `throw` (as
    [`shampoo`][jaxdecomp.optim.shampoo]).

    **Returns:** an `optax.GradientTransformation`, jit-compiled without
    recompilation across steps.

    **Failure modes:** NaN/inf gradients, and finite gradients whose statistics
    overflow (code `overflow`), raise with `throw=True` or skip the step;
    a refresh that comes out non-finite keeps the previous basis and increments
    `basis_failures`. Zero gradients: zero update (the basis stays the identity).

    **Example:**

    ```python
    import jax, jax.numpy as jnp, optax
    from jaxdecomp import optim

    params = {"w": jnp.ones((16, 8)), "b": jnp.zeros(8)}
    opt = optim.soap(3e-3)
    state = opt.init(params)
    key = jax.random.key(1)
    grads = jax.tree.map(lambda p: jax.random.normal(key, p.shape), params)
    updates, state = opt.update(grads, state, params)
    ```

    **Reference:** Vyas et al., "SOAP: Improving and Stabilizing Shampoo using Adam",
    ICLR 2025.
    """
    return optax.chain(
        scale_by_soap(
            b1=b1,
            b2=b2,
            shampoo_beta=shampoo_beta,
            eps=eps,
            precondition_every=precondition_every,
            block_size=block_size,
            state_dtype=state_dtype,
            throw=throw,
        ),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
    )
