"""Helpers shared by the optimizers: the non-finite-gradient guard and Adam moments."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, Bool

from ._results import RESULTS

NONFINITE_MESSAGE = (
    "jaxdecomp.optim: the gradient contains NaN or inf (pass throw=False to skip "
    "such steps instead of raising)."
)


def finite_guard(updates, throw: bool) -> tuple[object, Bool[Array, ""]]:
    """(updates, all finite); raises at run time through `eqx.error_if` if not and
    `throw`."""
    finite = _all_finite(updates)
    if throw and jtu.tree_leaves(updates):
        updates = eqx.error_if(updates, ~finite, NONFINITE_MESSAGE)
    return updates, finite


def begin_step(updates, state, throw: bool):
    """The start of every optimizer's update: the differentiation guard on the
    gradients and the state, then the non-finite check. Returns (updates, state,
    all finite)."""
    updates, state = no_derivative((updates, state))
    updates, finite = finite_guard(updates, throw)
    return updates, state, finite


def check_positive_ints(name: str, **values) -> None:
    for key, v in values.items():
        if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            raise ValueError(f"{name}: {key} must be a positive int; got {v!r}.")


OVERFLOW_MESSAGE = (
    "jaxdecomp.optim: the gradient is finite but the optimizer's statistics or update "
    "overflowed (squares of very large entries); scale the loss down, keep the state "
    "in float64 (state_dtype=jnp.float64), or pass throw=False to skip such steps."
)


def _all_finite(tree) -> Bool[Array, ""]:
    leaves = [x for x in jtu.tree_leaves(tree) if eqx.is_inexact_array(x)]
    if not leaves:
        return jnp.asarray(True)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def finish_step(finite, updates, new_state, old_state, throw: bool):
    """The end of every optimizer's update: a step whose gradient was finite but
    whose new statistics or update are not (overflow) raises with `throw`, else it
    is skipped like a non-finite gradient. Sets `result` in the state; a skipped
    step returns zero updates and the old state (with the new `result`)."""
    overflow = finite & ~(_all_finite(updates) & _all_finite(new_state))
    if throw:
        updates = eqx.error_if(updates, overflow, OVERFLOW_MESSAGE)
    ok = finite & ~overflow
    result = RESULTS.where(
        finite,
        RESULTS.where(overflow, RESULTS.overflow, RESULTS.successful),
        RESULTS.nonfinite_gradient,
    )
    new_state = keep_if_skipped(
        ok, new_state._replace(result=result), old_state._replace(result=result)
    )
    updates = jtu.tree_map(lambda u: jnp.where(ok, u, jnp.zeros_like(u)), updates)
    return updates, new_state


def keep_if_skipped(finite, new, old):
    """The new state where the step was taken, the old one where it was skipped."""
    return jtu.tree_map(lambda a, b: jnp.where(finite, a, b), new, old)


def bias_correction(beta: float, count: Array, dtype) -> Array:
    return (1 - jnp.asarray(beta, dtype) ** count.astype(dtype)).astype(dtype)


@jax.custom_jvp
def _guard(leaves):
    return leaves


@_guard.defjvp
def _guard_jvp(primals, tangents):
    raise TypeError(
        "jaxdecomp.optim: differentiating through an optimizer update (with respect "
        "to the gradients or the optimizer state) is not supported: the updates use "
        "truncated iterations, eigendecompositions and refresh schedules whose "
        "derivatives would be wrong or undefined. Apply jax.lax.stop_gradient to the "
        "gradients if you mean to treat the update as a constant."
    )


def no_derivative(tree):
    """`tree` unchanged; differentiating through it raises (at trace time) instead
    of giving a silently wrong derivative."""
    leaves, treedef = jtu.tree_flatten(tree)
    idx = [i for i, x in enumerate(leaves) if eqx.is_inexact_array(x)]
    if not idx:
        return tree
    guarded = _guard([leaves[i] for i in idx])
    for i, x in zip(idx, guarded):
        leaves[i] = x
    return jtu.tree_unflatten(treedef, leaves)


def compute_dtype(dtype, override=None):
    """The dtype optimizer states and matrix functions use for a parameter of
    `dtype`: `override` if given, else float32 for half-precision parameters
    (bfloat16, float16: the matrix functions need float32 or float64), else
    `dtype`."""
    if override is not None:
        return jnp.dtype(override)
    dtype = jnp.dtype(dtype)
    return dtype if dtype in (jnp.float32, jnp.float64) else jnp.dtype(jnp.float32)


class Sequence:
    """Runs LAPACK-backed calls (eigh, QR, SVD) one after another inside one traced
    function.

    jaxlib's batched CPU LAPACK kernels split the batch over XLA's intra-op thread
    pool and block a pool thread until the pieces finish; when XLA's thunk executor
    runs two such independent calls at once on a small pool (2 threads on a 2-core
    machine), both pool threads block waiting for work nobody can run and the step
    hangs forever (seen with Shampoo's per-size root refreshes on a CNN: every thread
    idle, two `lapack_ssyevd_ffi` frames in `BlockingCounter::Wait`). Making each
    call's input depend on the previous call's output serializes them: the input
    gets `+ 0` computed from one entry of that output (`entry > inf`, false for every
    value, NaN and inf included, so the input is unchanged). A
    `lax.optimization_barrier` does not do it: XLA's CPU pipeline removes barriers
    before the thunk executor schedules by buffer dependencies.
    """

    def __init__(self):
        self.last = None

    def after_previous(self, x):
        if self.last is None:
            return x
        leaves = [
            v
            for v in jax.tree.leaves(self.last)
            if eqx.is_inexact_array(v) and jnp.size(v)
        ]
        if not leaves:
            return x
        entry = jnp.ravel(leaves[0])[0]
        zero = entry > jnp.inf
        return jax.tree.map(lambda v: v + zero.astype(v.dtype), x)

    def done(self, y):
        self.last = y
        return y
