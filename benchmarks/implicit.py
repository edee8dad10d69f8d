"""Hypergradient of a regularised regression: implicit vs unrolled vs JAXopt.

Problem: L2-regularised ridge or logistic regression on `n = 2d` training samples,
solved by `steps` gradient-descent iterations (a fixed-count `fori_loop`, the inner
solver). Outer objective: the loss on held-out data at the inner solution; we time the
gradient with respect to the regularisation strength `lam` (inner solve included) and
compare it with a float64 NumPy reference computed from the exact inner solution
(closed form for ridge, Newton for logistic).

Rows: jaxdecomp's `custom_root` with its automatic tangent solver (dense LU for
d <= 256, else CG since the problem is tagged symmetric) and with a dense LU;
differentiation through the unrolled loop; JAXopt's `custom_root` with its default
(normal-equation CG, tol 1e-5) and with CG at tol 1e-10; and the inner solve alone (no
gradient) as the floor.

A second table shows what happens when the inner solver is stopped early: JAXopt returns
a wrong gradient, jaxdecomp raises.
"""

from __future__ import annotations

import functools as ft
import logging

import jax
import jax.lax as lax
import jax.numpy as jnp
import lineax as lx
import numpy as np

import jaxdecomp

from ._harness import Table, compiled_temp_bytes, optional_import, time_fn

HI = lax.Precision.HIGHEST


def _data(d, seed=0):
    rng = np.random.default_rng(seed)
    n = 2 * d
    w_true = rng.normal(size=d) / np.sqrt(d)
    X = rng.normal(size=(n, d))
    Xv = rng.normal(size=(n, d))
    y = X @ w_true + 0.5 * rng.normal(size=n)
    yv = Xv @ w_true + 0.5 * rng.normal(size=n)
    return X, y, Xv, yv


def _losses(kind):
    if kind == "ridge":

        def loss(w, X, y):
            r = jnp.matmul(X, w, precision=HI) - y
            return 0.5 * jnp.mean(r**2)

    else:

        def loss(w, X, y):  # labels y in {0, 1}
            z = jnp.matmul(X, w, precision=HI)
            return jnp.mean(jnp.logaddexp(0.0, z) - y * z)

    def optimality(w, lam, X, y):
        return jax.grad(loss)(w, X, y) + lam * w

    return loss, optimality


def _reference(kind, lam, X, y, Xv, yv):
    """Float64 NumPy: exact inner solution and d(val loss)/d(lam) = -g_v^T H^-1 w*."""
    n, d = X.shape
    if kind == "ridge":
        H = X.T @ X / n + lam * np.eye(d)
        w = np.linalg.solve(H, X.T @ y / n)
        gv = Xv.T @ (Xv @ w - yv) / n
    else:
        w = np.zeros(d)
        for _ in range(50):
            p = 1 / (1 + np.exp(-(X @ w)))
            g = X.T @ (p - y) / n + lam * w
            H = (X * (p * (1 - p))[:, None]).T @ X / n + lam * np.eye(d)
            w = w - np.linalg.solve(H, g)
        p = 1 / (1 + np.exp(-(X @ w)))
        H = (X * (p * (1 - p))[:, None]).T @ X / n + lam * np.eye(d)
        pv = 1 / (1 + np.exp(-(Xv @ w)))
        gv = Xv.T @ (pv - yv) / n
    return -gv @ np.linalg.solve(H, w)


def _inner(optimality, steps, kind):
    def solver(w0, lam, X, y):
        lip = jnp.linalg.norm(X, ord=2) ** 2 / X.shape[0]
        lip = (0.25 * lip if kind == "logistic" else lip) + lam
        return lax.fori_loop(
            0, steps, lambda _, w: w - optimality(w, lam, X, y) / lip, w0
        )

    return solver


def _hypergrad(solver, loss):
    def outer(lam, X, y, Xv, yv):
        w = solver(jnp.zeros(X.shape[1], X.dtype), lam, X, y)
        return loss(w, Xv, yv)

    return jax.jit(jax.grad(outer))


def run(full: bool = False):
    """Default: d=200, 500 steps; full (the issue's sizes): d=1000, 2000 steps."""
    tables = bench(*((1000, 2000, 5) if full else (200, 500, 3)))
    return tables + [tangent_solver_table()]


def bench(d: int, steps: int, repeats: int):
    jaxopt = optional_import("jaxopt")
    tables = []
    early = Table(
        f"Early-stopped inner solver (d={d}, 20 of {steps} steps): failure seen?",
        ["problem", "method", "hypergradient rel. error", "outcome"],
    )
    for kind in ("ridge", "logistic"):
        X, y, Xv, yv = _data(d)
        if kind == "logistic":
            y, yv = (y > 0).astype(np.float64), (yv > 0).astype(np.float64)
        lam = 0.1
        ref = _reference(kind, lam, X, y, Xv, yv)
        args = (jnp.asarray(lam), *map(jnp.asarray, (X, y, Xv, yv)))
        loss, optimality = _losses(kind)
        inner = _inner(optimality, steps, kind)

        methods = {
            "jaxdecomp implicit (auto)": jaxdecomp.custom_root(
                optimality, symmetric=True
            )(inner),
            "jaxdecomp implicit (dense LU)": jaxdecomp.custom_root(
                optimality, solve=lx.LU()
            )(inner),
            "unrolled (grad through the loop)": inner,
        }
        if jaxopt is not None:
            methods["jaxopt implicit (default: normal CG)"] = (
                jaxopt.implicit_diff.custom_root(optimality)(inner)
            )
            methods["jaxopt implicit (CG, tol 1e-10)"] = (
                jaxopt.implicit_diff.custom_root(
                    optimality,
                    solve=ft.partial(
                        jaxopt.linear_solve.solve_cg, tol=1e-10, maxiter=10 * d
                    ),
                )(inner)
            )

        table = Table(
            f"{kind} regression hypergradient, d={d}, n={2 * d}, "
            f"{steps} inner GD steps, "
            "float64",
            [
                "method",
                "time (ms)",
                "time / unrolled",
                "XLA temp memory (MB)",
                "rel. error vs NumPy",
            ],
        )
        fns = {name: _hypergrad(s, loss) for name, s in methods.items()}
        fwd = jax.jit(lambda lam, X, y, Xv, yv: inner(jnp.zeros(d), lam, X, y))
        times = {name: time_fn(f, *args, repeats=repeats) for name, f in fns.items()}
        t_unrolled = times["unrolled (grad through the loop)"]
        for name, f in fns.items():
            g = float(f(*args))
            mem = compiled_temp_bytes(f, *args)
            table.add(
                name,
                1e3 * times[name],
                times[name] / t_unrolled,
                None if mem is None else mem / 2**20,
                abs(g - ref) / abs(ref),
            )
        t_fwd = time_fn(fwd, *args, repeats=repeats)
        mem = compiled_temp_bytes(fwd, *args)
        table.add(
            "inner solve only (no gradient)",
            1e3 * t_fwd,
            t_fwd / t_unrolled,
            None if mem is None else mem / 2**20,
            None,
        )
        table.notes.append(
            "auto = dense LU for d <= 256, else CG (the problem is tagged symmetric)."
        )
        table.notes.append(
            "Time: median of "
            f"{repeats} runs after warm-up, inner solve + hypergradient, jit-compiled."
        )
        tables.append(table)

        # Early stopping: 20 steps instead of `steps`.
        short = _inner(optimality, 20, kind)
        candidates = {"jaxdecomp implicit": jaxdecomp.custom_root(optimality)(short)}
        if jaxopt is not None:
            candidates["jaxopt implicit"] = jaxopt.implicit_diff.custom_root(
                optimality
            )(short)
        # JAX logs the failed host callback on top of raising; the table says it.
        logging.getLogger("jax._src.callback").setLevel(logging.CRITICAL)
        for name, s in candidates.items():
            try:
                g = float(_hypergrad(s, loss)(*args))
                early.add(kind, name, abs(g - ref) / abs(ref), "returned a gradient")
            except Exception as e:  # noqa: BLE001 - the point is to show the error
                first = str(e).strip().splitlines()
                msg = next((ln for ln in first if "optimality" in ln), first[0])
                early.add(kind, name, None, f"raised: {msg[:90]}…")
    tables.append(early)
    return tables


def _root_objective(a, x_star, v, solve):
    """t -> v . x*(t) for the root of A x - t (x* given), through `custom_root`."""

    @jaxdecomp.custom_root(lambda x, t: jnp.matmul(a, x, precision=HI) - t, solve=solve)
    def root(x0, t):
        return x_star + 0 * t

    return lambda t: jnp.vdot(v, root(None, t))


def tangent_solver_table(
    sizes=(1000, 2000, 4096), scales=(1.0, 1e-2, 1e-4), repeats: int = 5
) -> Table:
    """`custom_root`'s default nonsymmetric tangent solver above 256 unknowns:
    GMRES(20) on the true residual against `lx.GMRES(rtol=tol, atol=tol)` (the
    previous default), float32, tol = eps^(2/3) = 2.4e-5. The root of
    F(x, t) = A x - t with A = s (I + 0.3 G / sqrt(d)) (G Gaussian), solved once
    in float64; the hypergradient d(v . x*)/dt = A^{-T} v (reverse mode, a
    transposed solve) against float64, and its time (jitted, median of
    `repeats`)."""
    table = Table(
        "custom_root, nonsymmetric tangent solve (float32, A = s (I + 0.3 G / "
        "sqrt(d)), hypergradient A^{-T} v)",
        ["d", "scale s", "tangent solver", "outcome", "rel. error", "time (ms)"],
    )
    tol = float(np.finfo(np.float32).eps) ** (2 / 3)
    solvers = {
        "default (GMRES(20), true residual)": None,
        "lx.GMRES(rtol=tol, atol=tol) (previous default)": lx.GMRES(rtol=tol, atol=tol),
    }
    logging.getLogger("jax._src.callback").setLevel(logging.CRITICAL)
    for d in sizes:
        rng = np.random.default_rng(0)
        g = 0.3 * rng.normal(size=(d, d)) / np.sqrt(d)
        t64, v64 = rng.normal(size=d), rng.normal(size=d)
        for scale in scales:
            a64 = scale * (np.eye(d) + g)
            a = jnp.asarray(a64, jnp.float32)
            x_star = jnp.asarray(np.linalg.solve(a64, t64), jnp.float32)
            exact = np.linalg.solve(a64.T, v64)
            t, v = jnp.asarray(t64, jnp.float32), jnp.asarray(v64, jnp.float32)
            for name, solve in solvers.items():
                grad = jax.jit(jax.grad(_root_objective(a, x_star, v, solve)))
                try:
                    got = np.asarray(grad(t), np.float64)
                    err = np.linalg.norm(got - exact) / np.linalg.norm(exact)
                    table.add(
                        d, scale, name, "gradient", err,
                        1e3 * time_fn(grad, t, repeats=repeats),
                    )  # fmt: skip
                except Exception as e:  # noqa: BLE001 - the point is to show it
                    lines = str(e).strip().splitlines()
                    msg = next((ln for ln in lines if "stagnation" in ln), lines[0])
                    table.add(d, scale, name, f"raised: {msg[:70]}…", None, None)
    table.notes.append(
        "Times include the root check of `custom_root` (a Newton-step solve) and the "
        "transposed tangent solve; the forward solution is precomputed (not timed)."
    )
    return table
