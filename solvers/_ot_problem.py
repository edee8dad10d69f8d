"""Input checking and set-up shared by the optimal-transport solvers."""

from __future__ import annotations

import numbers

import jax.lax as lax
import jax.numpy as jnp

from jaxdecomp._misc import default_tol

from ._dual import gauge, implicit_solve
from ._geometry import (
    AbstractGeometry,
    Geometry,
    all_devices,
    error_if_devices,
    sum_devices,
)
from ._kernel import Kernel
from ._solution import RESULTS, OTSolution


def _weights(w, size, dtype, name, fn):
    if w is None:
        return jnp.full((size,), 1.0 / size, dtype)
    w = jnp.asarray(w)
    if w.shape != (size,):
        raise ValueError(
            f"{fn}: {name} must have shape ({size},) to match the cost matrix; got "
            f"{w.shape}."
        )
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise TypeError(f"{fn}: {name} must be floating point; got {w.dtype}.")
    return w.astype(dtype)


def prepare(geom, a, b, epsilon, fn: str):
    """Kernel, weights, epsilon (dtype of the cost) and a run-time result code.

    Shapes, dtypes and a concrete non-positive epsilon raise at trace time. Bad values
    (NaN cost or points, negative, NaN or all-zero weights, unequal masses, traced
    bad epsilon) give a result code, and are replaced by harmless ones so that the
    loop still terminates. `epsilon=None` is 0.05 times the standard deviation of
    the cost's entries (OTT-JAX's default; not differentiated).
    """
    if not isinstance(geom, AbstractGeometry):
        c = jnp.asarray(geom)
        if c.ndim != 2:
            raise ValueError(
                f"{fn}: geom must be a Geometry, a PointCloud or an (n, m) cost "
                "matrix; "
                f"got an array of shape {c.shape}."
            )
        if not jnp.issubdtype(c.dtype, jnp.floating):
            raise TypeError(
                f"{fn}: the cost matrix must be floating point; got {c.dtype}."
            )
        geom = Geometry(c)
    dtype = geom.dtype
    n, m = geom.shape
    axis = getattr(geom, "axis_name", None)  # rows (and a) sharded over devices
    if a is None and axis is not None:  # uniform over all devices' rows
        a = jnp.full((n,), 1, dtype) / sum_devices(jnp.asarray(n, dtype), axis)
    a = _weights(a, n, dtype, "a", fn)
    b = _weights(b, m, dtype, "b", fn)
    if epsilon is not None:
        if isinstance(epsilon, numbers.Real) and not (0 < epsilon < float("inf")):
            raise ValueError(f"{fn}: epsilon must be finite and > 0; got {epsilon}.")
        if jnp.shape(epsilon) != ():
            raise ValueError(
                f"{fn}: epsilon must be a scalar; got shape {jnp.shape(epsilon)}."
            )
    geom = geom._dense()

    tiny = jnp.sqrt(jnp.finfo(dtype).eps)
    finite = geom._finite()

    def good(w, axis):
        nonneg = all_devices(jnp.all(jnp.isfinite(w) & (w >= 0)), axis)
        return nonneg & ~all_devices(jnp.all(w <= 0), axis)

    good_w = good(a, axis) & good(b, None)
    mass_a = sum_devices(jnp.sum(a), axis)
    balanced = jnp.abs(mass_a - jnp.sum(b)) <= tiny * mass_a
    result = RESULTS.where(balanced, RESULTS.successful, RESULTS.unbalanced)
    result = RESULTS.where(good_w, result, RESULTS.invalid_weights)
    result = RESULTS.where(finite, result, RESULTS.nonfinite_input)
    cmax = None  # max |C|, when the default epsilon's pass over the cost gave it
    if epsilon is None:
        stats = lax.stop_gradient(
            Kernel.build(geom._sanitise(finite), a, b).cost_stats()
        )
        eps, cmax = 0.05 * stats[2], stats[0]
    else:
        eps = jnp.asarray(epsilon, dtype)
    good_eps = jnp.isfinite(eps) & (eps > 0)
    result = RESULTS.where(good_eps, result, RESULTS.invalid_epsilon)
    ok = result == RESULTS.successful
    geom = geom._sanitise(ok)
    kernel = Kernel.build(geom, a, b)
    a = jnp.where(ok, a, 1 / jnp.asarray(kernel.rows_total(), dtype))
    b = jnp.where(ok, b, 1.0 / m)
    eps = jnp.where(ok, eps, 1)
    return Kernel.build(geom, a, b), a, b, eps, result, cmax


def default_epsilon(kernel):
    """OTT-JAX's default: 0.05 times the standard deviation of the cost's entries
    (one pass; not differentiated)."""
    return 0.05 * lax.stop_gradient(kernel.cost_stats()[2])


def check_init(init, kernel, fn):
    """Validate a warm start `(f, g)` at trace time; returns g (or None)."""
    if init is None:
        return None
    try:
        f0, g0 = init
    except (TypeError, ValueError):
        raise ValueError(
            f"{fn}: init must be None or a pair (f, g) of potentials; got {init!r}."
        ) from None
    n, m = kernel.geom.shape
    if jnp.shape(f0) != (n,) or jnp.shape(g0) != (m,):
        raise ValueError(
            f"{fn}: init = (f, g) must have shapes ({n},) and ({m},); got "
            f"{jnp.shape(f0)} and {jnp.shape(g0)}."
        )
    # Only g is used: the first f-update recomputes f from it exactly.
    g0 = jnp.asarray(g0, kernel.geom.dtype)
    return lax.stop_gradient(jnp.where(jnp.isfinite(g0), g0, 0))


def check_schedule(epsilon_schedule, fn):
    """Validate an `epsilon_schedule` at trace time; returns it normalised."""
    if epsilon_schedule is None or epsilon_schedule == "auto":
        return epsilon_schedule
    try:
        init, decay = epsilon_schedule
    except (TypeError, ValueError):
        raise ValueError(
            f"{fn}: epsilon_schedule must be None, 'auto' or (epsilon_init, decay); "
            f"got {epsilon_schedule!r}."
        ) from None
    if not 0 < decay < 1:
        raise ValueError(f"{fn}: the schedule's decay must be in (0, 1); got {decay}.")
    return (init, float(decay))


def schedule(epsilon_schedule, kernel, eps, cmax=None):
    """(first epsilon, decay factor, max |C| or None) of the continuation; (eps, 1,
    cmax) for none. Not differentiated (the solution does not depend on the path).
    `cmax`: max |C| if already known (one pass over the cost less, which online is a
    full recompute); returned, computed if the schedule needed it."""
    if epsilon_schedule is None:
        return eps, 1.0, cmax
    if epsilon_schedule == "auto":
        if cmax is None:
            cmax = kernel.cost_stats()[0]
        cmax = lax.stop_gradient(cmax)
        init, decay = 0.05 * cmax, 0.25
    else:
        init, decay = epsilon_schedule
    first = jnp.maximum(jnp.asarray(init, eps.dtype), lax.stop_gradient(eps))
    return first, decay, cmax


def solve(
    loop,
    geom,
    a,
    b,
    epsilon,
    tol,
    epsilon_schedule,
    throw,
    fn,
    *,
    init=None,
    implicit=True,
    **loop_options,
):
    """The shared driver: check the input, run `loop(kernel, a, b, eps, g0, tol=...,
    eps_init=..., decay=..., **loop_options) -> (f, g, (steps, newton_steps,
    error, stalled))` under implicit differentiation (or directly, if not
    `implicit`; `cmax`: max |C| when a pass already gave it, else None), then
    gauge-fix, build the [`solvers.OTSolution`][] and raise on
    failure if `throw`. A warm start `init` skips the epsilon continuation."""
    kernel, a, b, eps, result, cmax = prepare(geom, a, b, epsilon, fn)
    tol = default_tol(kernel.geom.dtype, 0.5) if tol is None else tol
    epsilon_schedule = check_schedule(epsilon_schedule, fn)
    g0 = check_init(init, kernel, fn)
    if g0 is not None:
        epsilon_schedule = None

    def run(kernel, a, b, eps, init):
        # `init` = (g0, cmax): passed as an argument (not differentiated), not
        # closed over, since `run` is a nondiff argument of a custom_jvp
        g0, cmax = init
        first, decay, cmax = schedule(epsilon_schedule, kernel, eps, cmax)
        return loop(
            kernel,
            a,
            b,
            eps,
            g0,
            tol=tol,
            eps_init=first,
            decay=decay,
            cmax=cmax,
            **loop_options,
        )

    # Every tolerance is relative to the total mass: the loops solve the problem
    # with weights a / s, b / s (s = sum(a)), whose plan is P / s, so that the
    # potentials are f = f' + eps log s, g = g'. Differentiable in s.
    mass = kernel.rsum(a)
    a_n, b_n = a / mass, b / mass
    if implicit:
        f, g, aux = implicit_solve(run, throw, kernel, a_n, b_n, eps, (g0, cmax))
    else:
        f, g, aux = run(kernel, a_n, b_n, eps, (g0, cmax))
    f = f + jnp.where(kernel.mask_a, eps * jnp.log(mass), 0)
    return _finish(f, g, kernel, a, b, eps, aux, result, tol, throw)


def _finish(f, g, kernel, a, b, eps, aux, result, tol, throw):
    """Gauge-fix, build the solution, and raise on failure if `throw`."""
    n_steps, n_newton, n_cg, error, stalled = aux
    f, g = gauge(kernel, f, g, a, b)
    finite = kernel.rall(jnp.isfinite(f)) & jnp.all(jnp.isfinite(g))
    converged = jnp.max(error) <= tol
    result = RESULTS.where(
        result == RESULTS.successful,
        RESULTS.where(
            finite,
            RESULTS.where(
                converged,
                RESULTS.successful,
                RESULTS.where(stalled, RESULTS.stalled, RESULTS.max_steps_reached),
            ),
            RESULTS.nonfinite_output,
        ),
        result,
    )
    sol = OTSolution(
        f=f,
        g=g,
        a=a,
        b=b,
        geom=kernel.geom,
        epsilon=eps,
        n_steps=n_steps,
        n_newton_steps=n_newton,
        n_cg_steps=n_cg,
        error=error,
        converged=converged & (result == RESULTS.successful),
        result=result,
    )
    if throw:
        sol = error_if_devices(
            sol, result != RESULTS.successful, result.error_if, kernel.axis_name
        )
    return sol
