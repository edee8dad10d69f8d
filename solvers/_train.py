"""Training loop for learned preconditioners."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
import optax
from jaxtyping import PRNGKeyArray, PyTree


def train_preconditioner(
    model: eqx.Module,
    problems: PyTree,
    loss: Callable[[Any, Any], jax.Array],
    optimizer: optax.GradientTransformation,
    *,
    steps: int,
    key: PRNGKeyArray,
    batch_size: int | None = None,
    progress: bool = True,
) -> tuple[eqx.Module, np.ndarray]:
    """Train a learned preconditioner with optax by minibatch gradient descent.

    Each step draws `batch_size` problems (without replacement) from `problems` — a
    pytree whose array leaves share a leading batch axis, e.g. `(a, x, b)` with a
    batched [`solvers.SparseMatrix`][] from `jax.vmap` — and applies
    `optimizer` to the gradient of the mean of `loss(model, problem)` with respect to
    the model's floating-point arrays (`eqx.filter_value_and_grad`). The step is one
    `eqx.filter_jit`-compiled function, traced once; the Python loop around it only
    draws keys and reports progress (a one-line progress bar on stderr, every ~0.5 s).

    **Arguments:**

    - `model`: an Equinox module (e.g. [`solvers.NeuralIC`][]).
    - `problems`: batched training problems.
    - `loss`: `loss(model, problem) -> scalar` for one problem (e.g.
        [`solvers.solution_weighted_loss`][]).
    - `optimizer`: an optax transformation.
    - `steps`: number of steps; `key`: PRNG key for the minibatches.
    - `batch_size`: problems per step (default: all).
    - `progress`: show the progress bar.

    **Returns:** `(trained_model, losses)` with the loss of every step.

    A non-finite loss raises (`eqx.error_if`) instead of silently corrupting the model.

    **Example:**

    ```python
    import jax, optax
    import solvers

    keys = jax.random.split(jax.random.key(0), 4)
    mats = jax.vmap(lambda k: solvers.problems.diffusion_2d(k, 8).to_sparse())(keys)
    xs = jax.random.normal(jax.random.key(1), (4, 64))
    bs = jax.vmap(lambda a, x: a.mv(x))(mats, xs)
    model, losses = solvers.train_preconditioner(
        solvers.NeuralIC(jax.random.key(2)), (mats, xs, bs),
        solvers.solution_weighted_loss, optax.adam(1e-3), steps=5,
        key=jax.random.key(3), progress=False)
    print(losses)
    ```
    """
    leaves = jtu.tree_leaves(problems)
    if not leaves:
        raise ValueError("train_preconditioner: problems has no arrays.")
    n_problems = jnp.shape(leaves[0])[0]
    if any(jnp.shape(x)[:1] != (n_problems,) for x in leaves):
        raise ValueError(
            "train_preconditioner: every array in problems needs the same leading "
            "batch size."
        )
    batch_size = n_problems if batch_size is None else batch_size
    if not (isinstance(batch_size, int) and 1 <= batch_size <= n_problems):
        raise ValueError(
            f"train_preconditioner: batch_size must be in [1, {n_problems}]; got "
            f"{batch_size}."
        )
    if not (isinstance(steps, int) and steps >= 1):
        raise ValueError(
            f"train_preconditioner: steps must be an int >= 1; got {steps}."
        )

    params, static = eqx.partition(model, eqx.is_inexact_array)
    opt_state = optimizer.init(params)

    @eqx.filter_jit
    def step(params, opt_state, key):
        idx = jr.choice(key, n_problems, (batch_size,), replace=False)
        batch = jtu.tree_map(lambda x: x[idx], problems)

        def batch_loss(params):
            m = eqx.combine(params, static)
            return jnp.mean(jax.vmap(lambda p: loss(m, p))(batch))

        value, grads = eqx.filter_value_and_grad(batch_loss)(params)
        value = eqx.error_if(
            value, ~jnp.isfinite(value), "train_preconditioner: non-finite loss"
        )
        # optax mixes its int step count with floats: allow that under strict promotion
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = optimizer.update(grads, opt_state, params)
        return eqx.apply_updates(params, updates), opt_state, value

    losses = np.empty(steps)
    last = start = time.perf_counter()
    for i, k in enumerate(jr.split(key, steps)):
        params, opt_state, value = step(params, opt_state, k)
        losses[i] = float(value)
        now = time.perf_counter()
        if progress and (now - last > 0.5 or i == steps - 1):
            last = now
            done = (i + 1) / steps
            bar = "#" * int(30 * done)
            sys.stderr.write(
                f"\rtrain_preconditioner [{bar:<30}] {i + 1}/{steps} "
                f"loss {losses[i]:.4g} ({now - start:.1f} s)"
            )
            if i == steps - 1:
                sys.stderr.write("\n")
            sys.stderr.flush()
    return eqx.combine(params, static), losses
