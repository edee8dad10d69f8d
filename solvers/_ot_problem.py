"""Input checking and set-up shared by the optimal-transport solvers."""

from __future__ import annotations

import numbers

import jax.lax as lax
import jax.numpy as jnp

from jaxdecomp._misc import default_tol

from ._dual import gauge, implicit_solve
from ._geometry import AbstractGeometry
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
    """Cost matrix, weights, epsilon (dtype of the cost) and a run-time result code.

    Shapes, dtypes and a concrete non-positive epsilon raise at trace time. Bad values
    (NaN cost, non-positive or NaN weights, unequal masses, traced bad epsilon) give a
    result code, and are replaced by harmless ones so that the loop still terminates.
    """
    if isinstance(geom, AbstractGeometry):
        c = geom.cost_matrix
    else:
        c = jnp.asarray(geom)
        if c.ndim != 2:
            raise ValueError(
                f"{fn}: geom must be a Geometry, a PointCloud or an (n, m) cost "
                "matrix; "
                f"got an array of shape {c.shape}."
            )
    if not jnp.issubdtype(c.dtype, jnp.floating):
        raise TypeError(f"{fn}: the cost matrix must be floating point; got {c.dtype}.")
    n, m = c.shape
    a = _weights(a, n, c.dtype, "a", fn)
    b = _weights(b, m, c.dtype, "b", fn)
    if isinstance(epsilon, numbers.Real) and not (0 < epsilon < float("inf")):
        raise ValueError(f"{fn}: epsilon must be finite and > 0; got {epsilon}.")
    eps = jnp.asarray(epsilon, c.dtype)
    if eps.shape != ():
        raise ValueError(f"{fn}: epsilon must be a scalar; got shape {eps.shape}.")

    tiny = jnp.sqrt(jnp.finfo(c.dtype).eps)
    finite_c = jnp.all(jnp.isfinite(c))
    good_w = jnp.all(jnp.isfinite(a) & (a > 0)) & jnp.all(jnp.isfinite(b) & (b > 0))
    balanced = jnp.abs(jnp.sum(a) - jnp.sum(b)) <= tiny * jnp.sum(a)
    good_eps = jnp.isfinite(eps) & (eps > 0)
    result = RESULTS.where(balanced, RESULTS.successful, RESULTS.unbalanced)
    result = RESULTS.where(good_w, result, RESULTS.invalid_weights)
    result = RESULTS.where(finite_c, result, RESULTS.nonfinite_input)
    result = RESULTS.where(good_eps, result, RESULTS.invalid_epsilon)
    ok = result == RESULTS.successful
    c = jnp.where(ok, c, 0)
    a = jnp.where(ok, a, 1.0 / n)
    b = jnp.where(ok, b, 1.0 / m)
    eps = jnp.where(ok, eps, 1)
    return c, a, b, eps, result


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


def schedule(epsilon_schedule, c, eps):
    """(first epsilon, decay factor) of the continuation; (eps, 1) for none. Not
    differentiated (the solution does not depend on the path)."""
    if epsilon_schedule is None:
        return eps, 1.0
    if epsilon_schedule == "auto":
        init, decay = 0.05 * jnp.max(jnp.abs(lax.stop_gradient(c))), 0.25
    else:
        init, decay = epsilon_schedule
    return jnp.maximum(jnp.asarray(init, eps.dtype), lax.stop_gradient(eps)), decay


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
    implicit=True,
    **loop_options,
):
    """The shared driver: check the input, run `loop(c, a, b, eps, tol=...,
    eps_init=..., decay=..., **loop_options) -> (f, g, (steps, newton_steps,
    error))` under implicit differentiation (or directly, if not `implicit`), then
    gauge-fix, build the [`solvers.OTSolution`][] and raise on failure if `throw`."""
    c, a, b, eps, result = prepare(geom, a, b, epsilon, fn)
    tol = default_tol(c.dtype, 0.5) if tol is None else tol
    epsilon_schedule = check_schedule(epsilon_schedule, fn)

    def run(c, a, b, eps):
        init, decay = schedule(epsilon_schedule, c, eps)
        return loop(c, a, b, eps, tol=tol, eps_init=init, decay=decay, **loop_options)

    # Every tolerance is relative to the total mass: the loops solve the problem
    # with weights a / s, b / s (s = sum(a)), whose plan is P / s, so that the
    # potentials are f = f' + eps log s, g = g'. Differentiable in s.
    mass = jnp.sum(a)
    a_n, b_n = a / mass, b / mass
    if implicit:
        f, g, aux = implicit_solve(run, throw, c, a_n, b_n, eps)
    else:
        f, g, aux = run(c, a_n, b_n, eps)
    f = f + eps * jnp.log(mass)
    return _finish(f, g, c, a, b, eps, aux, result, tol, throw)


def _finish(f, g, c, a, b, eps, aux, result, tol, throw):
    """Gauge-fix, build the solution, and raise on failure if `throw`."""
    n_steps, n_newton, error, stalled = aux
    f, g = gauge(f, g, a, b)
    finite = jnp.all(jnp.isfinite(f)) & jnp.all(jnp.isfinite(g))
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
        cost_matrix=c,
        epsilon=eps,
        n_steps=n_steps,
        n_newton_steps=n_newton,
        error=error,
        converged=converged & (result == RESULTS.successful),
        result=result,
    )
    if throw:
        sol = result.error_if(sol, result != RESULTS.successful)
    return sol
