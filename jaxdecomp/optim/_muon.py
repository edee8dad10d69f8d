r"""Muon: orthogonalized momentum for matrix parameters, with `jaxdecomp.polar`."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax.numpy as jnp
import jax.tree_util as jtu
import optax
from jaxtyping import Array

from .._matmul import Precision, check_precision
from .._misc import mm
from .._newton_schulz import DESIGN_ELL
from .._polar import polar
from .._sign_polynomials import sign_schedule
from ._misc import (
    Sequence,
    begin_step,
    compute_dtype,
    finish_step,
    no_derivative,
)
from ._results import RESULTS

MuonDimensionNumbers = optax.contrib.MuonDimensionNumbers

# Steps of the optimal (Polar Express) schedule for [1e-3, 1] before the classical
# quintic takes over: after them every singular value in [1e-3, 1] ||G||_F is within
# 1e-3 of 1.
POLAR_EXPRESS_STEPS = sign_schedule(DESIGN_ELL).shape[0] - 1
_METHODS = ("polar_express", "newton_schulz", "svd")


def orthogonalize(
    g: Array,
    *,
    method: Literal["polar_express", "newton_schulz", "svd"] = "polar_express",
    ns_steps: int | None = None,
    tol: float | None = None,
    precision: Precision = "highest",
) -> Array:
    r"""The orthogonalized update $U V^T$ of $G = U \Sigma V^T$ (batched over leading
    dimensions), as Muon applies to its momentum, with singular values that are zero
    (or negligible) mapped to zero instead of one.

    **Arguments:** `g` (float array, `(..., m, n)`), `method`, `ns_steps`, `tol`,
    `precision`:

    - `"polar_express"` (default): `ns_steps` (default 6) steps of
      [`jaxdecomp.polar`][]'s Newton–Schulz iteration from $G/\|G\|_F$ with the
      optimal quintic for each step: fixed cost (3 matmuls a step, as optax's fixed
      quintic), and every singular value in $[10^{-3}, 1]\,\|G\|_F$ ends within
      $10^{-3}$ of 1 (optax's 5 fixed-quintic steps leave them in about
      $[0.7, 1.2]$).
    - `"newton_schulz"`: [`jaxdecomp.polar`][] to `tol` (at most `ns_steps`, default
      50, steps): accurate for full-rank $G$ (to the conditioning), but a
      rank-deficient $G$ runs all `ns_steps`.
    - `"svd"`: $W\,\mathrm{diag}(\sigma_i > \max(m,n)\,\varepsilon\,\sigma_1)\,V^T$
      from an SVD, the exact reference.
    - `precision` (default `"highest"`): how the float32 matmuls of the two
      Newton–Schulz methods are computed, as [`jaxdecomp.polar`][]'s `precision`:
      `"tf32x3"` / `"bf16x6"` run them on tensor cores at float32 accuracy,
      `"bf16x3"` at about $2^{-16}$ (ample for Muon's $10^{-3}$ target). float64
      input and `"svd"` ignore it.

    **Returns:** an array of `g`'s shape and dtype. A zero matrix gives zero.

    **Derivatives:** none: differentiating through it raises a `TypeError` at trace
    time (a truncated iteration's derivative would be wrong).

    **Example:**

    ```python
    import jax, jax.numpy as jnp
    from jaxdecomp import optim

    g = jax.random.normal(jax.random.key(0), (32, 16))
    u = optim.orthogonalize(g)
    assert jnp.allclose(u.T @ u, jnp.eye(16), atol=3e-3)
    ```
    """
    if method not in _METHODS:
        raise ValueError(
            f"orthogonalize: method must be one of {_METHODS}; got {method!r}."
        )
    check_precision(precision, "orthogonalize")
    g = no_derivative(g)
    if g.size == 0:  # an empty parameter has an empty update
        return g
    out_dtype = g.dtype
    g = g.astype(compute_dtype(g.dtype))  # bfloat16/float16: computed in float32
    if method == "svd":
        w, s, vt = jnp.linalg.svd(g, full_matrices=False)
        cut = max(g.shape[-2:]) * jnp.finfo(g.dtype).eps * s[..., :1]
        keep = (s > cut) & (s > 0)
        return mm(w * keep[..., None, :].astype(g.dtype), vt).astype(out_dtype)
    norm = jnp.sqrt(jnp.sum(g * g, axis=(-2, -1), keepdims=True))
    nonzero = norm > 0
    safe = jnp.where(nonzero, g, jnp.eye(*g.shape[-2:], dtype=g.dtype))
    if method == "polar_express":
        steps = POLAR_EXPRESS_STEPS if ns_steps is None else ns_steps
        tol = 0.0 if tol is None else tol
    else:
        steps = 50 if ns_steps is None else ns_steps
    sol = polar(
        safe,
        method="newton_schulz",
        tol=tol,
        max_steps=steps,
        throw=False,
        full_output=True,
        precision=precision,
    )
    return jnp.where(nonzero, sol.value, 0).astype(out_dtype)


def _normalize_axes(ndim: int, axes) -> tuple[int, ...]:
    axes = (axes,) if isinstance(axes, int) else tuple(axes)
    return tuple(sorted(a % ndim for a in axes))


def _matrix_view(x: Array, dims: MuonDimensionNumbers):
    """(batch, reduction, output) view of `x` and its inverse, as optax's Muon."""
    if x.ndim < 2:
        raise ValueError(
            f"muon: a parameter labelled for Muon must have at least 2 dimensions; got "
            f"shape {x.shape}. Label it 'adam' (the default for ndim != 2)."
        )
    red = _normalize_axes(x.ndim, dims.reduction_axis)
    out = _normalize_axes(x.ndim, dims.output_axis)
    if set(red) & set(out):
        raise ValueError(
            f"muon: reduction axes {red} and output axes {out} overlap "
            f"(shape {x.shape})."
        )
    batch = tuple(a for a in range(x.ndim) if a not in red and a not in out)
    perm = batch + red + out
    inv = tuple(sorted(range(x.ndim), key=lambda i: perm[i]))
    sizes = lambda axes: tuple(x.shape[a] for a in axes)  # noqa: E731
    flat = (math.prod(sizes(batch)), math.prod(sizes(red)), math.prod(sizes(out)))
    unflat = sizes(batch) + sizes(red) + sizes(out)

    def view(y):
        return y.transpose(perm).reshape(flat)

    def unview(y):
        return y.reshape(unflat).transpose(inv)

    return view, unview, flat[1], flat[2]


class ScaleByMuonState(NamedTuple):
    count: Array
    mu: Any
    result: RESULTS


def scale_by_muon(
    *,
    beta: float = 0.95,
    nesterov: bool = True,
    method: Literal["polar_express", "newton_schulz", "svd"] = "polar_express",
    ns_steps: int | None = None,
    tol: float | None = None,
    mu_dtype=None,
    weight_dimension_numbers: Any = None,
    throw: bool = True,
    precision: Precision = "highest",
) -> optax.GradientTransformation:
    r"""Muon's direction for every leaf it receives (all must have ndim >= 2):
    momentum $M \leftarrow \beta M + G$ (Nesterov: $G + \beta M$ is orthogonalized),
    then [`orthogonalize`][jaxdecomp.optim.orthogonalize] on each (batch of)
    matrix views, scaled by $\sqrt{\max(1, \text{fan\_out}/\text{fan\_in})}$ as
    optax's Muon. `weight_dimension_numbers`: a `MuonDimensionNumbers` pytree (or
    function of the params) as `optax.contrib.scale_by_muon`; default (0, 1) for
    every leaf. Non-finite gradients: see [`muon`][jaxdecomp.optim.muon].

    **Arguments:** `beta`, `nesterov`, `method`, `ns_steps`, `tol`, `mu_dtype`,
    `throw`, `precision` as [`muon`][jaxdecomp.optim.muon];
    `weight_dimension_numbers` as above.

    **Returns:** an `optax.GradientTransformation` with a
    [`ScaleByMuonState`][jaxdecomp.optim.ScaleByMuonState] (`count`, `mu`,
    `result`).

    **Example:**

    ```python
    import jax.numpy as jnp, optax
    from jaxdecomp import optim

    opt = optax.chain(optim.scale_by_muon(), optax.scale(-0.02))
    params = {"w": jnp.ones((6, 3))}
    updates, _ = opt.update({"w": jnp.eye(6, 3)}, opt.init(params), params)
    assert jnp.allclose(updates["w"], -0.02 * jnp.eye(6, 3), atol=1e-4)  # polar(1.95 I)
    ```
    """
    if method not in _METHODS:
        raise ValueError(f"muon: method must be one of {_METHODS}; got {method!r}.")
    check_precision(precision, "muon")

    def dims_for(params):
        dims = weight_dimension_numbers
        if callable(dims) and not isinstance(dims, MuonDimensionNumbers):
            dims = dims(params)
        if dims is None:
            dims = MuonDimensionNumbers()
        if isinstance(dims, MuonDimensionNumbers):
            return jtu.tree_map(lambda _: dims, params)
        return dims

    def init_fn(params):
        mu = jtu.tree_map(
            lambda p: jnp.zeros_like(p, dtype=mu_dtype or p.dtype), params
        )
        for p in jtu.tree_leaves(params):
            if jnp.ndim(p) < 2:
                raise ValueError(
                    f"muon: parameters given to scale_by_muon must have at least 2 "
                    f"dimensions; got shape {jnp.shape(p)}. Use jaxdecomp.optim.muon, "
                    "which sends the others to Adam."
                )
        return ScaleByMuonState(jnp.zeros([], jnp.int32), mu, RESULTS.successful)

    def update_fn(updates, state, params=None):
        updates, state, finite = begin_step(updates, state, throw)
        mu = jtu.tree_map(
            lambda m, g: (beta * m + g).astype(m.dtype), state.mu, updates
        )
        direction = (
            jtu.tree_map(lambda m, g: g + beta * m, mu, updates) if nesterov else mu
        )
        dims = dims_for(updates)
        is_dims = lambda x: isinstance(x, MuonDimensionNumbers)  # noqa: E731

        def one(d, dim):
            view, unview, fan_in, fan_out = _matrix_view(d, dim)
            u = orthogonalize(
                view(d), method=method, ns_steps=ns_steps, tol=tol, precision=precision
            )
            if d.size == 0:  # an empty parameter: an empty update
                return jnp.zeros_like(d)
            return unview(u * math.sqrt(max(1.0, fan_out / fan_in))).astype(d.dtype)

        chain = Sequence()  # one LAPACK call at a time for method="svd"

        def one_in_turn(dim, d):
            if method != "svd":
                return one(d, dim)
            return chain.done(one(chain.after_previous(d), dim))

        new = jtu.tree_map(one_in_turn, dims, direction, is_leaf=is_dims)
        # throw=False: a non-finite gradient (or an overflow) skips the step
        new_state = ScaleByMuonState(state.count + 1, mu, state.result)
        return finish_step(finite, new, new_state, state, throw)

    return optax.GradientTransformation(init_fn, update_fn)


def _default_labels(params):
    return jtu.tree_map(lambda p: "muon" if jnp.ndim(p) == 2 else "adam", params)


def muon(
    learning_rate: optax.ScalarOrSchedule,
    *,
    beta: float = 0.95,
    nesterov: bool = True,
    method: Literal["polar_express", "newton_schulz", "svd"] = "polar_express",
    ns_steps: int | None = None,
    tol: float | None = None,
    weight_decay: float = 0.0,
    mu_dtype=None,
    adam_b1: float = 0.9,
    adam_b2: float = 0.999,
    adam_eps: float = 1e-8,
    adam_weight_decay: float = 0.0,
    adam_learning_rate: optax.ScalarOrSchedule | None = None,
    muon_weight_dimension_numbers: Any = None,
    throw: bool = True,
    precision: Precision = "highest",
) -> optax.GradientTransformation:
    r"""Muon (Jordan et al. 2024) with an accurate orthogonalization from
    [`jaxdecomp.polar`][]: for each matrix parameter,

    $$M \leftarrow \beta M + G,\qquad
      \Delta W = -\eta\,\sqrt{\max(1, \tfrac{\text{fan\_out}}{\text{fan\_in}})}\;
      \operatorname{polar}(G + \beta M)\ (\text{Nesterov}),$$

    where $\operatorname{polar}(X) = UV^T$ for $X = U\Sigma V^T$; every other
    parameter gets AdamW (`adam_*` arguments, `adam_learning_rate` defaults to
    `learning_rate`).

    **Arguments:**

    - `learning_rate`: a float or an optax schedule.
    - `beta`, `nesterov`: momentum (defaults as optax's Muon).
    - `method`, `ns_steps`, `tol`: how the update is orthogonalized, see
      [`orthogonalize`][jaxdecomp.optim.orthogonalize]. Default `"polar_express"`:
      6 steps of the optimal-polynomial Newton–Schulz iteration (18 matmuls, HIGHEST
      precision), which maps every singular value in $[10^{-3}, 1]\|G\|_F$ to within
      $10^{-3}$ of 1; optax's default (5 fixed-quintic steps) leaves them in about
      $[0.7, 1.2]$. `"newton_schulz"` iterates to `tol`, `"svd"` is exact.
    - `precision`: the Newton–Schulz matmuls' scheme, as
      [`jaxdecomp.polar`][]: `"highest"` (default, float32 on CUDA cores),
      `"tf32x3"` / `"bf16x6"` (tensor cores, float32 accuracy), `"bf16x3"`
      (tensor cores, about $2^{-16}$ per product: the orthogonalization stays
      within its $10^{-3}$ target). Ignored for float64 and `"svd"`. An unknown
      value raises at construction.
    - `weight_decay`: decoupled weight decay on the Muon parameters.
    - `mu_dtype`: dtype of the momentum (default: the parameter's). bfloat16 and
      float16 momenta are orthogonalized in float32 and cast back.
    - `muon_weight_dimension_numbers`: which parameters use Muon and how they are
      viewed as matrices, exactly as `optax.contrib.muon`: `None` (every 2-D
      parameter, the rest Adam), or a pytree (or function of the params) of
      `optax.contrib.MuonDimensionNumbers` (reduction and output axes; other axes
      are batch axes, orthogonalized independently) and `None` (Adam) leaves.
    - `throw`: a gradient with NaN or inf raises at run time (`eqx.error_if`,
      message from [`jaxdecomp.optim.RESULTS`][]); with `throw=False` the Muon
      step is skipped (zero update, momentum kept) and `result` in the state says
      `nonfinite_gradient` (`overflow` if the momentum or the update overflow).
      (The Adam part follows optax: NaN propagates.)

    **Returns:** an `optax.GradientTransformation` (a `optax.partition` of a Muon
    chain and AdamW): works on any pytree (Equinox models via
    `eqx.filter(model, eqx.is_array)`), under `jit` with no recompilation across
    steps, `optax.chain`-able; the state keeps each parameter's dtype.

    **Failure modes:** a parameter labelled for Muon with fewer than 2 dimensions,
    or overlapping axes, raises at `init`; an unknown `method` at construction.
    Zero or rank-deficient gradients are fine (zero singular values give zero).

    **Example:**

    ```python
    import jax, jax.numpy as jnp, optax
    from jaxdecomp import optim

    params = {"w": jnp.ones((8, 4)), "b": jnp.zeros(4)}
    opt = optim.muon(0.02)
    state = opt.init(params)
    grads = {"w": jax.random.normal(jax.random.key(0), (8, 4)), "b": jnp.ones(4)}
    updates, state = opt.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    ```

    **References:** Jordan et al., "Muon: An optimizer for hidden layers in neural
    networks", 2024; Amsel et al., "The Polar Express", 2025.
    """
    if adam_learning_rate is None:
        adam_learning_rate = learning_rate
    dims = muon_weight_dimension_numbers

    if dims is None:
        labels: Callable = _default_labels
        muon_dims = None
    else:

        def resolve(params):
            return (
                dims(params)
                if callable(dims) and not isinstance(dims, MuonDimensionNumbers)
                else dims
            )

        def labels(params):
            d = resolve(params)
            if isinstance(d, MuonDimensionNumbers):
                return jtu.tree_map(lambda _: "muon", params)
            return jtu.tree_map(
                lambda dim, sub: jtu.tree_map(
                    lambda _: "adam" if dim is None else "muon", sub
                ),
                d,
                params,
                is_leaf=lambda x: x is None or isinstance(x, MuonDimensionNumbers),
            )

        def muon_dims(params):
            # params here is the masked subtree: only the Muon leaves are arrays
            d = resolve(params)
            if isinstance(d, MuonDimensionNumbers):
                return d
            return jtu.tree_map(
                lambda dim, sub: jtu.tree_map(
                    lambda _: dim if dim is not None else MuonDimensionNumbers(), sub
                ),
                d,
                params,
                is_leaf=lambda x: x is None or isinstance(x, MuonDimensionNumbers),
            )

    return optax.partition(
        {
            "muon": optax.chain(
                scale_by_muon(
                    beta=beta,
                    nesterov=nesterov,
                    method=method,
                    ns_steps=ns_steps,
                    tol=tol,
                    mu_dtype=mu_dtype,
                    weight_dimension_numbers=muon_dims,
                    throw=throw,
                    precision=precision,
                ),
                optax.add_decayed_weights(weight_decay),
                optax.scale_by_learning_rate(learning_rate),
            ),
            "adam": optax.adamw(
                adam_learning_rate,
                b1=adam_b1,
                b2=adam_b2,
                eps=adam_eps,
                weight_decay=adam_weight_decay,
                mu_dtype=mu_dtype,
                nesterov=nesterov,
            ),
        },
        labels,
    )
