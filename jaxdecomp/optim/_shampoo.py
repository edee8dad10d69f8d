r"""Shampoo with blocking, grafting and an optional 4-bit eigenvector state."""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import optax
from jaxtyping import Array

from .._inv_pth_root import inv_pth_root
from .._misc import mm, mT
from .._solution import RESULTS as ROOT_RESULTS
from ._blocks import Blocking, from_blocks, plan, to_blocks
from ._misc import (
    Sequence,
    begin_step,
    bias_correction,
    check_positive_ints,
    compute_dtype,
    finish_step,
)
from ._quantize import Quantized, dequantize, quantize as quantize_4bit, rectify
from ._results import RESULTS


class Factors(NamedTuple):
    r"""Kronecker factors of one blocked parameter (32-bit state): statistics
    $L, R$ of shape (n_blocks, d, d) and their inverse roots."""

    left: Array
    right: Array
    left_root: Array
    right_root: Array


class QuantizedFactor(NamedTuple):
    r"""One factor in 4-bit form: statistic $U\,\mathrm{diag}(\lambda)\,U^T$ and root
    $V\,\mathrm{diag}(\mu)\,V^T$ with $U, V$ quantized, $\lambda, \mu$ full
    precision."""

    vecs: Quantized
    vals: Array
    root_vecs: Quantized
    root_vals: Array


class QuantizedFactors(NamedTuple):
    left: QuantizedFactor
    right: QuantizedFactor


class ShampooState(NamedTuple):
    """`count`: steps taken (skipped steps not counted); `mu`: momentum of the
    grafted update; `nu`: the grafting second moment; `factors`: per leaf (in
    `jax.tree.leaves` order) `None` for scalars/vectors or the blocked factors;
    `result`: the latest step's [`jaxdecomp.optim.RESULTS`][] code;
    `root_failures`: how many block roots were kept from an earlier refresh because
    the new one was not finite."""

    count: Array
    mu: Any
    nu: Any
    factors: tuple
    result: RESULTS
    root_failures: Array


def _ridge(a: Array, epsilon: float) -> Array:
    """Relative ridge epsilon * ||A||_F per matrix, with an absolute floor."""
    fro = jnp.sqrt(jnp.sum(a * a, axis=(-2, -1)))
    floor = jnp.sqrt(jnp.finfo(a.dtype).tiny)
    return epsilon * fro + floor


def _eye(d: int, n: int, dtype) -> Array:
    return jnp.broadcast_to(jnp.eye(d, dtype=dtype), (n, d, d))


def _batched_roots(stats: list[Array], old: list[Array], p: int, epsilon: float):
    """Inverse p-th roots of every statistic (groups of equal size in one batched
    `inv_pth_root` call); a non-finite root keeps the old one. Returns (roots,
    number kept)."""
    sizes = sorted({s.shape[-1] for s in stats})
    out: list[Array | None] = [None] * len(stats)
    failures = jnp.asarray(0, jnp.int32)
    chain = Sequence()
    for d in sizes:
        idx = [i for i, s in enumerate(stats) if s.shape[-1] == d]
        a = jnp.concatenate([stats[i] for i in idx])
        a = a + _ridge(a, epsilon)[:, None, None] * jnp.eye(d, dtype=a.dtype)
        a = chain.after_previous(a)
        sol = jax.vmap(
            lambda x: inv_pth_root(x, p, method="eigh", throw=False, full_output=True)
        )(a)
        roots = chain.done(sol.value)
        prev = jnp.concatenate([old[i] for i in idx])
        # accuracy-limited codes (`singular`: a tiny eigenvalue not resolved at this
        # precision) keep the root, the best this precision gives; invalid input
        # (non-finite, non-symmetric or indefinite statistics) does not
        invalid = (
            (sol.result == ROOT_RESULTS.nonfinite_input)
            | (sol.result == ROOT_RESULTS.not_symmetric)
            | (sol.result == ROOT_RESULTS.indefinite)
        )
        ok = jnp.all(jnp.isfinite(roots), axis=(-2, -1)) & ~invalid
        failures = failures + jnp.sum(~ok).astype(jnp.int32)
        roots = jnp.where(ok[:, None, None], roots, prev)
        start = 0
        for i in idx:
            k = stats[i].shape[0]
            out[i] = roots[start : start + k]
            start += k
    return out, failures


def _quantized_statistic_update(
    f: QuantizedFactor,
    gram: Array,
    beta2: float,
    p: int,
    epsilon: float,
    refresh: Array,
) -> tuple[QuantizedFactor, Array]:
    """Dequantize and rectify the eigenvectors, rebuild the statistic, accumulate
    `gram`, take its exact eigendecomposition and requantize; at a refresh also set
    the root to (vals + ridge)^(-1/p) in the same basis. A block whose eigh is not
    finite keeps its old factor. Returns (factor, number of such blocks)."""
    n, d = gram.shape[0], gram.shape[-1]
    u = rectify(dequantize(f.vecs, (n, d, d), gram.dtype))
    stat = beta2 * mm(u * f.vals[:, None, :], mT(u)) + (1 - beta2) * gram
    vals, vecs = jnp.linalg.eigh(stat)
    ok = jnp.all(jnp.isfinite(vecs), axis=(-2, -1)) & jnp.all(
        jnp.isfinite(vals), axis=-1
    )
    vals = jnp.where(ok[:, None], jnp.maximum(vals, 0), f.vals)
    ridge = epsilon * jnp.sqrt(jnp.sum(vals * vals, axis=-1, keepdims=True))
    ridge = ridge + jnp.sqrt(jnp.finfo(gram.dtype).tiny)
    new_vecs = quantize_4bit(jnp.where(ok[:, None, None], vecs, u))
    # the quantized codes are not split per block: a refresh with any failed block
    # keeps the whole factor's old root
    refresh = refresh & jnp.all(ok)
    root_vals = jnp.where(refresh, (vals + ridge) ** (-1.0 / p), f.root_vals)
    root_vecs = jtu.tree_map(
        lambda a, b: jnp.where(refresh, a, b), new_vecs, f.root_vecs
    )
    new = QuantizedFactor(new_vecs, vals, root_vecs, root_vals)
    return new, jnp.sum(~ok).astype(jnp.int32)


def _quantized_root(f: QuantizedFactor, d: int, dtype, n: int) -> Array:
    v = rectify(dequantize(f.root_vecs, (n, d, d), dtype))
    return mm(v * f.root_vals[:, None, :], mT(v))


def _init_quantized(n: int, d: int, dtype) -> QuantizedFactor:
    eye = quantize_4bit(_eye(d, n, dtype))
    return QuantizedFactor(eye, jnp.zeros((n, d), dtype), eye, jnp.ones((n, d), dtype))


def scale_by_shampoo(
    *,
    block_size: int = 256,
    precondition_every: int = 10,
    statistics_every: int | None = None,
    exponent_override: int | None = None,
    beta1: float = 0.9,
    beta2: float = 0.999,
    epsilon: float = 1e-6,
    grafting: Literal["adam", "sgd", None] = "adam",
    graft_eps: float = 1e-8,
    state_dtype=None,
    quantize: Literal["4bit"] | None = None,
    throw: bool = True,
) -> optax.GradientTransformation:
    """The Shampoo direction without the learning rate and weight decay (to build
    your own chain); [`shampoo`][jaxdecomp.optim.shampoo] is
    `optax.chain(scale_by_shampoo(...), optax.add_decayed_weights(weight_decay),
    optax.scale_by_learning_rate(learning_rate))`.

    **Arguments:** as [`shampoo`][jaxdecomp.optim.shampoo], without `learning_rate`
    and `weight_decay`.

    **Returns:** an `optax.GradientTransformation` whose state is a
    [`ShampooState`][jaxdecomp.optim.ShampooState].

    **Example:**

    ```python
    import jax.numpy as jnp, optax
    from jaxdecomp import optim

    opt = optax.chain(optim.scale_by_shampoo(block_size=64), optax.scale(-1e-2))
    state = opt.init({"w": jnp.ones((8, 8))})
    assert int(state[0].count) == 0
    ```
    """
    _check(block_size, precondition_every, exponent_override, grafting, quantize)
    p = 4 if exponent_override is None else exponent_override
    quantized = quantize == "4bit"
    if statistics_every is None:
        statistics_every = precondition_every if quantized else 1
    if not (
        isinstance(statistics_every, int)
        and statistics_every >= 1
        and precondition_every % statistics_every == 0
    ):
        raise ValueError(
            "shampoo: statistics_every must be a positive int that divides "
            f"precondition_every={precondition_every}; got {statistics_every!r}."
        )

    def plans(params) -> list[Blocking | None]:
        return [plan(jnp.shape(x), block_size) for x in jtu.tree_leaves(params)]

    def dtype_of(x):
        return compute_dtype(x.dtype, state_dtype)

    def init_fn(params):
        leaves = jtu.tree_leaves(params)
        for x in leaves:
            if not jnp.issubdtype(x.dtype, jnp.floating):
                raise ValueError(
                    f"shampoo: parameters must be floating point; got {x.dtype}."
                )
        factors = []
        for x, b in zip(leaves, plans(params)):
            if b is None:
                factors.append(None)
                continue
            dt = dtype_of(x)
            n, dl, dr = b.n_blocks, b.block_rows, b.block_cols
            if quantized:
                factors.append(
                    QuantizedFactors(
                        _init_quantized(n, dl, dt), _init_quantized(n, dr, dt)
                    )
                )
            else:
                factors.append(
                    Factors(
                        jnp.zeros((n, dl, dl), dt),
                        jnp.zeros((n, dr, dr), dt),
                        _eye(dl, n, dt),
                        _eye(dr, n, dt),
                    )
                )
        zeros = lambda x: jnp.zeros_like(x, dtype=dtype_of(x))  # noqa: E731
        return ShampooState(
            jnp.zeros([], jnp.int32),
            jtu.tree_map(zeros, params),
            jtu.tree_map(zeros, params),
            tuple(factors),
            RESULTS.successful,
            jnp.zeros([], jnp.int32),
        )

    def update_fn(updates, state, params=None):
        del params
        updates, state, finite = begin_step(updates, state, throw)
        grads, treedef = jtu.tree_flatten(updates)
        bplans = plans(updates)
        count = state.count + 1
        refresh = (count - 1) % precondition_every == 0
        statistics_due = (count - 1) % statistics_every == 0
        nu = jtu.tree_leaves(state.nu)
        mu = jtu.tree_leaves(state.mu)
        new_nu = [
            (beta2 * v + (1 - beta2) * jnp.square(g.astype(v.dtype))).astype(v.dtype)
            for g, v in zip(grads, nu)
        ]

        def graft_direction(g, v):
            g = g.astype(v.dtype)
            if grafting == "adam":
                vhat = v / bias_correction(beta2, count, v.dtype)
                return g / (jnp.sqrt(vhat) + graft_eps)
            return g

        grafts = [graft_direction(g, v) for g, v in zip(grads, new_nu)]
        gblocks = [
            None if b is None else to_blocks(g.astype(dtype_of(g)), b)
            for g, b in zip(grads, bplans)
        ]
        failures = jnp.asarray(0, jnp.int32)
        new_factors: list = list(state.factors)
        roots: list = [None] * len(grads)
        mats = [i for i, b in enumerate(bplans) if b is not None]
        chain = Sequence()  # one LAPACK call at a time (see Sequence)
        if quantized:
            for i in mats:
                f, gb, b = state.factors[i], gblocks[i], bplans[i]
                dt = gb.dtype

                def update_statistics(args):
                    f, gb = args
                    seq = Sequence()
                    left, fl = seq.done(
                        _quantized_statistic_update(
                            f.left, mm(gb, mT(gb)), beta2, p, epsilon, refresh
                        )
                    )
                    f, gb = seq.after_previous((f, gb))
                    right, fr = _quantized_statistic_update(
                        f.right, mm(mT(gb), gb), beta2, p, epsilon, refresh
                    )
                    return left, right, fl + fr

                left, right, fails = chain.done(
                    lax.cond(
                        statistics_due,
                        update_statistics,
                        lambda args: (
                            args[0].left,
                            args[0].right,
                            jnp.asarray(0, jnp.int32),
                        ),
                        chain.after_previous((f, gb)),
                    )
                )
                failures = failures + fails
                new_factors[i] = QuantizedFactors(left, right)
                n = b.n_blocks
                roots[i] = (
                    _quantized_root(left, b.block_rows, dt, n),
                    _quantized_root(right, b.block_cols, dt, n),
                )
        else:
            stats_l = []
            stats_r = []
            for i in mats:
                f, gb = state.factors[i], gblocks[i]
                new_l = beta2 * f.left + (1 - beta2) * mm(gb, mT(gb))
                new_r = beta2 * f.right + (1 - beta2) * mm(mT(gb), gb)
                stats_l.append(jnp.where(statistics_due, new_l, f.left))
                stats_r.append(jnp.where(statistics_due, new_r, f.right))
            old = [state.factors[i].left_root for i in mats] + [
                state.factors[i].right_root for i in mats
            ]

            def do_refresh(args):
                stats, old = args
                return _batched_roots(stats, old, p, epsilon)

            new_roots, failures = lax.cond(
                refresh,
                do_refresh,
                lambda args: (list(args[1]), jnp.asarray(0, jnp.int32)),
                (stats_l + stats_r, old),
            )
            k = len(mats)
            for j, i in enumerate(mats):
                lr, rr = new_roots[j], new_roots[k + j]
                new_factors[i] = Factors(stats_l[j], stats_r[j], lr, rr)
                roots[i] = (lr, rr)

        directions = []
        for i, (_g, b) in enumerate(zip(grads, bplans)):
            if b is None:
                directions.append(grafts[i])
                continue
            lr, rr = roots[i]
            d = mm(mm(lr, gblocks[i]), rr)
            if grafting is not None:
                gb = to_blocks(grafts[i], b)
                dn = jnp.sqrt(jnp.sum(d * d, axis=(-2, -1), keepdims=True))
                gn = jnp.sqrt(jnp.sum(gb * gb, axis=(-2, -1), keepdims=True))
                d = d * jnp.where(dn > 0, gn / jnp.where(dn > 0, dn, 1), 0)
            directions.append(from_blocks(d, b))
        new_mu = [
            (beta1 * m + (1 - beta1) * d.astype(m.dtype)).astype(m.dtype)
            for m, d in zip(mu, directions)
        ]
        out = [
            (m / bias_correction(beta1, count, m.dtype)).astype(g.dtype)
            for m, g in zip(new_mu, grads)
        ]
        new_state = ShampooState(
            count,
            jtu.tree_unflatten(treedef, new_mu),
            jtu.tree_unflatten(treedef, new_nu),
            tuple(new_factors),
            state.result,
            state.root_failures + failures,
        )
        return finish_step(
            finite, jtu.tree_unflatten(treedef, out), new_state, state, throw
        )

    return optax.GradientTransformation(init_fn, update_fn)


def _check(block_size, precondition_every, exponent_override, grafting, quantize):
    check_positive_ints(
        "shampoo", block_size=block_size, precondition_every=precondition_every
    )
    if exponent_override is not None and not (
        isinstance(exponent_override, int) and exponent_override >= 1
    ):
        raise ValueError(
            "shampoo: exponent_override must be a positive int; got "
            f"{exponent_override!r}."
        )
    if grafting not in ("adam", "sgd", None):
        raise ValueError(
            f"shampoo: grafting must be 'adam', 'sgd' or None; got {grafting!r}."
        )
    if quantize not in (None, "4bit"):
        raise ValueError(f"shampoo: quantize must be None or '4bit'; got {quantize!r}.")


def shampoo(
    learning_rate: optax.ScalarOrSchedule,
    *,
    block_size: int = 256,
    precondition_every: int = 10,
    statistics_every: int | None = None,
    exponent_override: int | None = None,
    beta1: float = 0.9,
    beta2: float = 0.999,
    epsilon: float = 1e-6,
    grafting: Literal["adam", "sgd", None] = "adam",
    graft_eps: float = 1e-8,
    weight_decay: float = 0.0,
    state_dtype=None,
    quantize: Literal["4bit"] | None = None,
    throw: bool = True,
) -> optax.GradientTransformation:
    r"""Shampoo (Gupta, Koren & Singer 2018) in the blocked, grafted form of
    Distributed Shampoo (Anil et al. 2020), with roots from
    [`jaxdecomp.inv_pth_root`][] and an optional 4-bit state (Wang et al. 2024).

    Each parameter with at least 2 dimensions is viewed as its most nearly square
    matrix $(\prod_{i<k} n_i, \prod_{i\ge k} n_i)$ (a convolution kernel
    (out, in, kh, kw) as (out, in kh kw) when that is the squarer split) and cut
    into blocks of at most `block_size` per side (equal blocks; zero padding of at
    most one row/column per block when the size does not divide). Per block $G$,
    every `statistics_every` steps (default every step)

    $$L \leftarrow \beta_2 L + (1-\beta_2)\,G G^T,\quad
      R \leftarrow \beta_2 R + (1-\beta_2)\,G^T G,\quad
      D = \hat L\,G\,\hat R,$$

    with $\hat L = (L + \rho_L I)^{-1/p}$, $\hat R = (R + \rho_R I)^{-1/p}$ recomputed
    every `precondition_every` steps (first at step 1), $p = 4$ unless
    `exponent_override`, ridge $\rho = \epsilon\|L\|_F$ (relative). Grafting
    rescales $D$ per block to the norm of the `grafting` direction (`"adam"`:
    $G/(\sqrt{\hat v} + \epsilon_g)$; `"sgd"`: $G$; `None`: no rescaling). The
    update is the bias-corrected momentum ($\beta_1$) of the grafted direction,
    times $-\eta$ (plus decoupled `weight_decay`). Scalars and vectors get the
    grafting direction (Adam by default).

    All blocks' factors of the same size are stacked into one batched
    `inv_pth_root` (eigh) call per size; the refresh is a `lax.cond`, so steps
    between refreshes cost only matmuls.

    **Arguments:**

    - `learning_rate`: float or optax schedule.
    - `block_size`, `precondition_every`, `exponent_override`, `beta1`, `beta2`,
      `epsilon`, `grafting`, `graft_eps`, `weight_decay`: as above.
    - `statistics_every`: update $L, R$ with the current gradient only every this
      many steps (Distributed Shampoo's `statistics_compute_steps`; must divide
      `precondition_every`). Default 1, and `precondition_every` with
      `quantize="4bit"`.
    - `state_dtype`: dtype of the statistics, roots and moments (default: each
      parameter's, and float32 for bfloat16/float16 parameters, whose updates are
      cast back to the parameter's dtype).
    - `quantize`: `None` (32-bit factors) or `"4bit"`: each factor is kept as
      eigenvectors in 4 bits (block-wise linear-square quantization, Björck
      rectification after dequantization) and eigenvalues in full precision, both
      for the statistic and for its root. A statistics update dequantizes,
      rectifies, rebuilds $L$, accumulates $GG^T$ and takes an exact `eigh` to
      requantize (`inv_pth_root` does not return eigenvectors; on the CPU a batched
      `eigh` was also cheaper than one QR subspace-iteration step, 1.8 vs 3.1 ms for
      2 x 128 x 128): that is why statistics are sampled every
      `precondition_every` steps by default in this mode, as 4-bit Shampoo
      updates its preconditioners at an interval. A refresh sets the root from the
      same decomposition. State memory for the factors: 0.5625 bytes per entry
      instead of 4 (float32). Steps between statistics updates pay for
      dequantizing and rectifying the root (4 matmuls per factor).
    - `throw`: NaN/inf in the gradient raises at run time (`eqx.error_if`); with
      `throw=False` the step is skipped (zero update, state unchanged, `result`
      says `nonfinite_gradient`); a finite gradient whose statistics or update overflow
      (entries near 1e30 in float32) is treated the same way with the code
      `overflow`.

    **Returns:** an `optax.GradientTransformation` over any pytree of floating
    arrays; jit-compiled without recompilation across steps (the refresh is traced
    once); state in `state_dtype`.

    **Failure modes:** a refresh whose statistic is invalid for `inv_pth_root`
    (non-finite, e.g. after an overflow; non-symmetric; indefinite) or whose root
    comes out non-finite keeps the previous root (the identity before the first
    success) and increments `state.root_failures`: a documented fallback, not an
    error. A root that `inv_pth_root` flags only as inaccurate (`singular`: in
    float32 a ridge of 1e-6 leaves eigenvalues it cannot resolve) is used: it is
    the best root this precision gives, and the ridge bounds its norm. Zero
    gradients give zero statistics: the absolute ridge floor $\sqrt{\text{tiny}}$
    keeps the root finite and the update is zero. Non-floating parameters, bad
    block sizes or options raise at construction/`init`.

    **Example:**

    ```python
    import jax, jax.numpy as jnp, optax
    from jaxdecomp import optim

    params = {"w": jnp.ones((20, 12)), "b": jnp.zeros(12)}
    opt = optim.shampoo(1e-2, block_size=8)
    state = opt.init(params)
    key = jax.random.key(0)
    grads = jax.tree.map(lambda p: jax.random.normal(key, p.shape), params)
    updates, state = opt.update(grads, state, params)
    assert int(state[0].root_failures) == 0
    ```

    **References:** Gupta, Koren & Singer, "Shampoo", ICML 2018; Anil et al.,
    "Scalable Second Order Optimization for Deep Learning", 2020; Wang et al.,
    "4-bit Shampoo for Memory-Efficient Network Training", NeurIPS 2024.
    """
    return optax.chain(
        scale_by_shampoo(
            block_size=block_size,
            precondition_every=precondition_every,
            statistics_every=statistics_every,
            exponent_override=exponent_override,
            beta1=beta1,
            beta2=beta2,
            epsilon=epsilon,
            grafting=grafting,
            graft_eps=graft_eps,
            state_dtype=state_dtype,
            quantize=quantize,
            throw=throw,
        ),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
    )
