"""Log-domain Sinkhorn with over-relaxation and epsilon continuation."""

from __future__ import annotations

from typing import Literal

import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import ArrayLike, Float

from ._dual import safe_log
from ._geometry import AbstractGeometry
from ._ot_problem import solve
from ._solution import OTSolution


def marginal_errors(kernel, f, g, a, b, eps):
    """[sum|P1 - a|, sum|P^T1 - b|] at the potentials (f, g), one pass."""
    r, col = kernel.plan(f, g, eps).marginals()
    return jnp.stack([kernel.rsum(jnp.abs(r - a)), jnp.sum(jnp.abs(col - b))])


# stop (result `stalled`) after this many steps at the final epsilon in which the
# best marginal error has not improved by _STALL_GAIN, once it is within the
# rounding level (relative to the mass) eps_dtype * max(_STALL_LEVEL, _STALL_SPREAD
# * max|C| / epsilon): the float32 floor at small epsilon, where the error
# fluctuates (rounding noise still sets tiny new records, so "any progress" is not
# the test). The exponents (f + g - C) / epsilon round by eps_dtype * max|C| /
# epsilon; the floors measured (Newton, float32, uniform clouds) sit 20-500x below
# that: 1.5e-6 to 1.4e-5 at epsilon 5e-4 to 1e-4, n = 200-1000, ~1e-6 at 1e-3.
# Slow convergence (plain float32 Sinkhorn at epsilon 2e-4 to 5e-4 creeps from
# 5e-4 to the floor, halving every ~1,000 steps, ~7% per 200) is not stopped: the
# rule it replaced (halving within 200 steps, fixed level 1e4 eps = 1.2e-3) called
# it `stalled` 100-300x above the floor; now it ends within ~5x of it or runs to
# max_steps.
_STALL_STEPS = 200
_STALL_LEVEL = 100
_STALL_SPREAD = 0.05
_STALL_GAIN = 0.05


def _sinkhorn_loop(
    kernel, a, b, eps, g0, *, tol, max_steps, momentum, eps_init, decay, unroll, cmax
):
    omega = 1.0 if momentum is None else momentum
    log_a, log_b = safe_log(a), safe_log(b)
    mb = kernel.mask_b
    stage_tol = jnp.maximum(tol, 1e-3 * jnp.sum(b))
    zero = jnp.zeros((), a.dtype)
    g0 = jnp.zeros_like(b) if g0 is None else g0
    f0 = eps_init * log_a + kernel.f_hat(g0, eps_init)
    # state: f, g, current epsilon, column error of (f, g), steps, done, stall guard
    # (best error at the final epsilon, steps since it last improved)
    guard0 = (zero + jnp.inf, jnp.array(0))
    init = (f0, g0, eps_init, zero + jnp.inf, jnp.array(0), jnp.array(False), guard0)

    if cmax is None:  # one pass (shared with the default epsilon or schedule if any)
        cmax = kernel.cost_stats()[0]
    cmax = lax.stop_gradient(cmax)
    level = jnp.maximum(_STALL_LEVEL, _STALL_SPREAD * cmax / eps)
    floor = level * jnp.finfo(a.dtype).eps * jnp.sum(b)

    def stalled(best, since):
        return (since >= _STALL_STEPS) & (best <= floor)

    def cond(state):
        *_, steps, done, (best, since) = state
        return ~done & (steps < max_steps) & ~stalled(best, since)

    def body(state):
        f, g, e, _, steps, _, (best, since) = state
        gh = kernel.g_hat(f, e)
        col = jnp.where(mb, jnp.exp((g - gh) / e), 0)
        err = jnp.sum(jnp.abs(col - b))
        final = e <= eps
        done = (final & (err <= tol)) | ~jnp.isfinite(err)
        e_next = jnp.where(~final & (err <= stage_tol), jnp.maximum(eps, e * decay), e)
        g_new = g + omega * (e * log_b + gh - g)
        f_new = f + omega * (e_next * log_a + kernel.f_hat(g_new, e_next) - f)
        f = jnp.where(done, f, f_new)
        g = jnp.where(done, g, g_new)
        better = err <= (1 - _STALL_GAIN) * best
        best = jnp.where(final & better, err, best)
        since = jnp.where(final & ~better & ~done, since + 1, 0)
        return (
            f,
            g,
            jnp.where(done, e, e_next),
            err,
            steps + jnp.where(done, 0, 1),
            done,
            (best, since),
        )

    if unroll:
        f, g, e, _, steps, done, guard = eqx.internal.while_loop(
            cond, body, init, max_steps=max_steps + 1, kind="checkpointed"
        )
    else:
        f, g, e, _, steps, done, guard = lax.while_loop(cond, body, init)
    if momentum is not None:  # a plain f-update makes the row marginals exact
        f = eps * log_a + kernel.f_hat(g, eps)
    # zero-weight columns: their potential is the c-transform of f
    g = lax.cond(jnp.all(mb), lambda: g, lambda: jnp.where(mb, g, kernel.g_hat(f, eps)))
    error = marginal_errors(kernel, f, g, a, b, eps)
    error = jnp.where(e <= eps, error, jnp.inf)  # never reached the target epsilon
    # stalled: the guard fired, or the loop's own test passed but the error
    # recomputed from the final potentials (rows and columns) is above tol: both
    # are the dtype's floor, not a lack of steps
    floor_hit = stalled(*guard) | (done & (steps < max_steps))
    return f, g, (steps, jnp.array(0), jnp.array(0), error, floor_hit)


def sinkhorn(
    geom: AbstractGeometry | Float[ArrayLike, "n m"],
    a: Float[ArrayLike, " n"] | None = None,
    b: Float[ArrayLike, " m"] | None = None,
    *,
    epsilon: float | Float[ArrayLike, ""] | None = None,
    tol: float | None = None,
    max_steps: int = 10_000,
    momentum: float | None = None,
    epsilon_schedule: None | Literal["auto"] | tuple[float, float] = None,
    differentiation: Literal["implicit", "unroll"] = "implicit",
    init: tuple[Float[ArrayLike, " n"], Float[ArrayLike, " m"]] | None = None,
    throw: bool = True,
) -> OTSolution:
    """Entropic optimal transport by log-domain Sinkhorn iterations.

    Solves $\\min_{P \\ge 0,\\ P1 = a,\\ P^T 1 = b} \\langle P, C\\rangle +
    \\varepsilon\\,\\mathrm{KL}(P\\,\\|\\,ab^T)$ through its dual potentials,
    $P_{ij} = \\exp((f_i + g_j - C_{ij})/\\varepsilon)$, alternating

    $$g \\leftarrow \\varepsilon\\log b - \\varepsilon\\,\\mathrm{LSE}_i\\big((f_i -
    C_{ij})/\\varepsilon\\big), \\qquad f \\leftarrow \\varepsilon\\log a -
    \\varepsilon\\,\\mathrm{LSE}_j\\big((g_j - C_{ij})/\\varepsilon\\big)$$

    (stable for any $\\varepsilon$), optionally over-relaxed
    ($x \\leftarrow x + \\omega(x_{\\text{new}} - x)$, `momentum` $=\\omega \\in
    (0, 2)$), until the column marginal's L1 error is at most `tol` (the rows are exact
    after each f-update).

    **Arguments:**

    - `geom`: a [`solvers.PointCloud`][], a [`solvers.Geometry`][] or an `(n, m)`
        cost matrix. Its dtype is the solution's dtype.
    - `a`, `b`: nonnegative weights of equal total mass (default uniform, mass 1).
        Zero weights are padding: those rows/columns are masked out of every
        log-sum-exp and marginal (zero plan entries) and get the c-transform as
        their (finite) potential; see [`solvers.OTSolution`][].
    - `epsilon`: the regularisation, absolute (in the units of the cost); default
        (`None`) 0.05 times the standard deviation of the cost's entries (OTT-JAX's
        rule; computed in one pass, not differentiated).
    - `tol`: tolerance on the L1 marginal error relative to the total mass, so the
        same for weights summing to 1 or to 1e-6 (default $\\sqrt{\\text{eps}}$ of the
        dtype: 3.5e-4 in float32, 1.5e-8 in float64).
    - `max_steps`: iteration limit (default 10,000; static).
    - `momentum`: over-relaxation factor $\\omega$ (None: plain Sinkhorn).
    - `epsilon_schedule`: continuation for small $\\varepsilon$: `None`, `"auto"`
        (start at $0.05\\max|C|$, divide by 4 each time the marginal error drops below
        1e-3) or `(epsilon_init, decay)`.
    - `differentiation`: `"implicit"` (default: the implicit function theorem on the
        marginal constraints, costs one linear solve per tangent and works in forward
        and reverse mode to any order) or `"unroll"` (backpropagate through the
        iterations with checkpointing; reverse mode; `max_steps` iterations are
        stored).
    - `init`: a warm start `(f, g)` (e.g. a previous solution's potentials; only
        `g` is used, `f` is recomputed by an exact update). Skips the epsilon
        continuation; a converged restart takes at most 2 steps. Not differentiated.
    - `throw`: raise (via `eqx.error_if`, also under `jit`) if the solve fails.

    **Returns:** an [`solvers.OTSolution`][].

    **Failure modes:** shape and dtype mismatches and a concrete `epsilon <= 0` raise
    at trace time. NaN/inf cost, negative or NaN weights, all-zero weights, unequal
    masses, a
    traced bad epsilon, non-convergence within `max_steps` and non-finite potentials
    give a result code (raised if `throw`). A `tol` below the dtype's accuracy floor
    (float32 at small $\\varepsilon$, see [`solvers.sinkhorn_newton`][]) ends with
    result `stalled` (instead of running to `max_steps`) once 200 steps at the final
    $\\varepsilon$ have not improved the best marginal error by 5% while it is
    within the rounding level of the exponents, $\\text{eps} \\cdot \\max(100, 0.05
    \\max|C|/\\varepsilon)$ of the mass (the floor sits below it; slower progress
    above it runs to `max_steps`: result `max_steps_reached`), or when the loop's
    own test passed but the error recomputed from the final potentials is above
    `tol`.

    **Derivatives:** $f$, $g$ (hence `plan()`, `reg_ot_cost`, `transport_cost`) are
    differentiable with respect to the cost matrix (so the points), both marginals
    and $\\varepsilon$. Implicit mode linearises $P1 = a$, $P^T1 = b$ and solves the
    Schur complement in $g$ by Jacobi-preconditioned CG; the gauge direction
    $(1, -1)$ is removed and the potentials are returned in the gauge $\\langle a,
    f\\rangle = \\langle b, g\\rangle$, so `grad(lambda x: sinkhorn(...).f.sum())` is
    well defined. Perturbations of the marginals that change the total mass are
    projected out (the problem is balanced). `reg_ot_cost` uses Danskin's theorem
    (no linear solve) for first derivatives.

    **Example:**

    ```python
    import jax
    import solvers

    x = jax.random.uniform(jax.random.key(0), (200, 2))
    y = jax.random.uniform(jax.random.key(1), (300, 2))
    out = solvers.sinkhorn(solvers.PointCloud(x, y), epsilon=1e-2)
    print(out.reg_ot_cost, out.n_steps, out.error)
    grad_x = jax.grad(lambda x: solvers.sinkhorn(
        solvers.PointCloud(x, y), epsilon=1e-2).reg_ot_cost)(x)
    ```

    Reference: Cuturi, "Sinkhorn Distances", NeurIPS 2013; Peyré & Cuturi,
    "Computational Optimal Transport", 2019 (log-domain updates, section 4.4).
    """
    fn = "sinkhorn"
    if not (isinstance(max_steps, int) and max_steps > 0):
        raise ValueError(f"{fn}: max_steps must be a positive int; got {max_steps}.")
    if momentum is not None and not 0 < momentum < 2:
        raise ValueError(f"{fn}: momentum must be in (0, 2); got {momentum}.")
    if differentiation not in ("implicit", "unroll"):
        raise ValueError(
            f"{fn}: differentiation must be 'implicit' or 'unroll'; got "
            f"{differentiation!r}."
        )
    unroll = differentiation == "unroll"
    return solve(
        _sinkhorn_loop,
        geom,
        a,
        b,
        epsilon,
        tol,
        epsilon_schedule,
        throw,
        fn,
        init=init,
        implicit=not unroll,
        unroll=unroll,
        max_steps=max_steps,
        momentum=momentum,
    )
