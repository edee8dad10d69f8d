"""Entropic OT: Sinkhorn and Sinkhorn-Newton against OTT-JAX and POT.

2-D uniform point clouds (n = m, squared Euclidean cost, costs of scale 1), uniform
weights, absolute epsilon. Every solver runs to the same L1 marginal tolerance (1e-6
in float32, 1e-9 in float64); the table reports the median time (jit-compiled, after
warm-up), the iterations, and the marginal error *measured by us* on the returned
potentials or plan, so a fast unconverged answer shows as such.

Default sizes: n = 1000. `--full`: n in {1000, 4000, 10000} on a GPU, {1000, 4000} on
a CPU (n = 10000 runs there take hours for the plain anchors).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

import solvers

from ._harness import Table, optional_import, save_figure, time_fn

TOL = {"float32": 1e-6, "float64": 1e-9}
MAX_STEPS = 10_000


def _points(n, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return (
        jnp.asarray(rng.uniform(size=(n, 2)), dtype),
        jnp.asarray(rng.uniform(size=(n, 2)), dtype),
    )


def _err_from_potentials(c, f, g, eps):
    """L1 marginal error of exp((f + g - C)/eps) against uniform weights, in float64."""
    c, f, g = (np.asarray(v, np.float64) for v in (c, f, g))
    p = np.exp((f[:, None] + g[None, :] - c) / eps)
    n, m = c.shape
    return max(np.abs(p.sum(1) - 1 / n).sum(), np.abs(p.sum(0) - 1 / m).sum())


def _ours(name, eps, tol, max_steps=MAX_STEPS):
    if name == "sinkhorn":
        return lambda geom: solvers.sinkhorn(
            geom, epsilon=eps, tol=tol, max_steps=max_steps, throw=False
        )
    if name == "sinkhorn momentum 1.8":
        return lambda geom: solvers.sinkhorn(
            geom, epsilon=eps, tol=tol, max_steps=max_steps, momentum=1.8, throw=False
        )
    if name == "sinkhorn_newton (dense)":
        return lambda geom: solvers.sinkhorn_newton(
            geom, epsilon=eps, tol=tol, throw=False
        )
    if name == "sinkhorn_newton (sparse, k=64)":
        return lambda geom: solvers.sinkhorn_newton(
            geom, epsilon=eps, tol=tol, hessian="sparse", k=64, throw=False
        )
    raise KeyError(name)


def _ott_variants(ott_ok, max_steps=MAX_STEPS):
    if not ott_ok:
        return {}
    from ott.geometry import epsilon_scheduler
    from ott.solvers.linear import acceleration, sinkhorn as ott_sinkhorn

    def make(**kw):
        return lambda tol: ott_sinkhorn.Sinkhorn(
            threshold=tol, max_iterations=max_steps, **kw
        )

    return {
        "OTT-JAX plain": (make(), False),
        "OTT-JAX Momentum(start=20)": (
            make(momentum=acceleration.Momentum(start=20)),
            False,
        ),
        "OTT-JAX Anderson(memory=5)": (
            make(anderson=acceleration.AndersonAcceleration(memory=5)),
            False,
        ),
        "OTT-JAX epsilon decay": (make(), True),
        "_scheduler": epsilon_scheduler,
    }


def _run_ott(variants, name, x, y, eps, tol):
    from ott.geometry import pointcloud
    from ott.problems.linear import linear_problem

    make, decay = variants[name]
    epsilon = (
        variants["_scheduler"].Epsilon(target=eps, init=0.05 / eps, decay=0.95)
        if decay
        else eps
    )
    solver = make(tol)

    def run(x, y):
        geom = pointcloud.PointCloud(x, y, epsilon=epsilon)
        out = solver(linear_problem.LinearProblem(geom))
        return out.f, out.g, out.n_iters, geom.cost_matrix

    # OTT's loop breaks on float32 under jax_enable_x64 (set by this runner).
    with jax.enable_x64(x.dtype == jnp.float64):
        fn = jax.jit(run)
        t = time_fn(fn, x, y, repeats=3, long_s=1.0)
        f, g, n_iters, c = fn(x, y)
    return t, int(n_iters), _err_from_potentials(c, f, g, eps)


def run(
    full: bool = False,
    sizes=None,
    dtypes=("float32", "float64"),
    epsilons=(1e-2, 1e-3, 1e-4),
    curves: bool = True,
    max_steps: int = MAX_STEPS,
    methods=None,
    sparse_k: bool = True,
):
    """`sizes`, `dtypes`, `epsilons` restrict the grid (e.g. one size on a CPU);
    `curves=False` skips the convergence plot; `max_steps` caps the Sinkhorn
    iterations (ours and OTT-JAX's; Newton keeps its own default); `methods`, if
    given, keeps only the rows whose name contains one of its strings;
    `sparse_k=False` skips the table of the sparse Hessian's k."""
    if sizes is None:
        sizes = (1000, 4000, 10000) if full else (1000,)
        if full and jax.default_backend() == "cpu":
            sizes = (1000, 4000)
    ott_ok = optional_import("ott") is not None
    pot = optional_import("ot")
    ott_variants = _ott_variants(ott_ok, max_steps)
    table = Table(
        "Entropic OT on 2-D uniform point clouds (median time, jit, after warm-up)",
        [
            "n",
            "dtype",
            "epsilon",
            "method",
            "time (s)",
            "iterations (Newton)",
            "marginal L1 error",
            "converged",
            "time / OTT plain",
        ],
    )

    def wanted(name):
        return methods is None or any(m in name for m in methods)

    ours = [
        name
        for name in (
            "sinkhorn",
            "sinkhorn momentum 1.8",
            "sinkhorn_newton (dense)",
            "sinkhorn_newton (sparse, k=64)",
        )
        if wanted(f"jaxdecomp {name}")
    ]
    anchors = [v for v in ott_variants if not v.startswith("_") and wanted(v)]
    for n in sizes:
        for dtype in dtypes:
            for eps in epsilons:
                tol = TOL[dtype]
                x, y = _points(n, dtype)
                geom = solvers.PointCloud(x, y)
                rows = []
                for name in ours:
                    fn = jax.jit(_ours(name, eps, tol, max_steps))
                    t = time_fn(fn, geom, repeats=3, long_s=1.0)
                    out = fn(geom)
                    err = _err_from_potentials(out.cost_matrix, out.f, out.g, eps)
                    its = f"{int(out.n_steps)} ({int(out.n_newton_steps)})"
                    rows.append((f"jaxdecomp {name}", t, its, err))
                for name in anchors:
                    try:
                        t, its, err = _run_ott(ott_variants, name, x, y, eps, tol)
                        rows.append((name, t, str(its), err))
                    except Exception as e:  # noqa: BLE001 - an anchor failing is a result
                        table.notes.append(f"{name} failed at n={n}, eps={eps}: {e!r}")
                use_pot = pot is not None and wanted("POT sinkhorn_log")
                if use_pot and n <= 1000 and dtype == "float64":
                    c = np.asarray(geom.cost_matrix, np.float64)
                    w = np.full(n, 1.0 / n)
                    t0 = time.perf_counter()
                    plan, log = pot.sinkhorn(
                        w,
                        w,
                        c,
                        eps,
                        method="sinkhorn_log",
                        stopThr=tol,
                        numItermax=5000,
                        log=True,
                    )
                    t = time.perf_counter() - t0
                    err = max(
                        np.abs(plan.sum(1) - w).sum(), np.abs(plan.sum(0) - w).sum()
                    )
                    rows.append(
                        ("POT sinkhorn_log (NumPy, 1 run)", t, str(log["niter"]), err)
                    )
                t_ott = next((r[1] for r in rows if r[0] == "OTT-JAX plain"), None)
                for name, t, its, err in rows:
                    table.add(
                        n,
                        dtype,
                        eps,
                        name,
                        t,
                        its,
                        err,
                        "yes" if err <= tol else "NO",
                        None if t_ott is None else t / t_ott,
                    )
                print(f"  done n={n} {dtype} eps={eps}", flush=True)
    table.notes.append(
        f"Tolerance: L1 marginal error {TOL['float32']:g} (float32), "
        f"{TOL['float64']:g} (float64); iteration cap {max_steps} (POT: 5000, n <= "
        "1000 and float64 only). 'marginal L1 error' is recomputed in float64 from "
        "the returned potentials (the max over rows and columns); 'converged' compares "
        "it with the tolerance. OTT-JAX counts iterations in blocks of 10."
    )
    tables = [table]
    if curves:
        tables.append(convergence_curves(ott_variants))
    if sparse_k:
        tables.append(sparse_k_table(full))
    return tables


def sparse_k_table(full: bool = False, configs=None):
    """The sparse Hessian with k = 64 against k from `solvers.sparse_k` (and the dense
    Hessian), where k = 64 keeps too little of the plan. Default: n = 4000 (float64,
    epsilon 1e-3 and 1e-4); `full` adds n = 10^4 (float32 tol 1e-5 and float64).
    `configs`: (n, dtype, epsilon, tol) tuples instead."""
    from solvers._sinkhorn_newton import _select_rows

    if configs is None:
        configs = [(4000, "float64", 1e-3, 1e-9), (4000, "float64", 1e-4, 1e-9)]
        if full:
            configs += [(10000, "float32", 1e-3, 1e-5), (10000, "float64", 1e-3, 1e-9)]
    table = Table(
        "Sparse Newton Hessian: k = 64 against k = solvers.sparse_k (2-D uniform "
        "clouds, jit, one timed run after ahead-of-time compilation)",
        [
            "n",
            "dtype",
            "epsilon",
            "tol",
            "Hessian",
            "k",
            "plan mass kept by k (final)",
            "time (s)",
            "iterations (Newton)",
            "marginal L1 error",
            "time / dense",
        ],
    )
    for n, dtype, eps, tol in configs:
        x, y = _points(n, dtype)
        geom = solvers.PointCloud(x, y)
        t0 = time.perf_counter()
        k_auto = solvers.sparse_k(geom, epsilon=eps)
        t_choose = time.perf_counter() - t0
        rows = []
        for label, hess, k in (
            ("dense", "dense", None),
            ("sparse", "sparse", 64),
            ("sparse (k = sparse_k)", "sparse", k_auto),
        ):
            kw = {} if k is None else {"k": k}
            fn = jax.jit(
                lambda g, hess=hess, kw=kw: solvers.sinkhorn_newton(
                    g, epsilon=eps, tol=tol, hessian=hess, throw=False, **kw
                )
            )
            t = time_fn(fn, geom, repeats=3, long_s=1.0)
            out = fn(geom)
            err = float(jnp.max(out.error))
            kept = None
            if k is not None:
                p = out.plan()
                kept = float(jnp.sum(_select_rows(p, k)[0]) / jnp.sum(p))
            its = f"{int(out.n_steps)} ({int(out.n_newton_steps)})"
            rows.append((label, k, kept, t, its, err))
        t_dense = rows[0][3]
        for label, k, kept, t, its, err in rows:
            table.add(n, dtype, eps, tol, label, k, kept, t, its, err, t / t_dense)
        table.notes.append(
            f"n = {n}, {dtype}, epsilon {eps:g}: sparse_k chose k = {k_auto} in "
            f"{t_choose:.2f} s (first call, compilation included)."
        )
        print(f"  done sparse k n={n} {dtype} eps={eps}", flush=True)
    table.notes.append(
        "'plan mass kept' is the fraction of the converged plan's mass in the k "
        "entries per row that the solver's selection keeps (the solver uses the "
        "sparse Hessian only where this is >= kept_mass = 0.99, else a dense step). "
        "'marginal L1 error' is the solver's own (relative to the mass)."
    )
    return table


def convergence_curves(ott_variants, n=1000, eps=1e-3):
    """Marginal error against time (float64), by re-running each solver with a
    growing step budget; writes sinkhorn_convergence.png to the output folder."""
    x, y = _points(n, "float64", seed=1)
    geom = solvers.PointCloud(x, y)
    budgets = [2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000]
    curves = {}

    def ours(name, make):
        pts = []
        for k in budgets:
            fn = jax.jit(lambda geom, k=k: make(geom, k))
            t = time_fn(fn, geom, repeats=1)
            out = fn(geom)
            pts.append((t, _err_from_potentials(out.cost_matrix, out.f, out.g, eps)))
            if pts[-1][1] <= 1e-9:
                break
        curves[name] = pts

    ours(
        "jaxdecomp sinkhorn",
        lambda g, k: solvers.sinkhorn(
            g, epsilon=eps, tol=1e-9, max_steps=k, throw=False
        ),
    )
    ours(
        "jaxdecomp sinkhorn momentum 1.8",
        lambda g, k: solvers.sinkhorn(
            g, epsilon=eps, tol=1e-9, max_steps=k, momentum=1.8, throw=False
        ),
    )
    ours(
        "jaxdecomp sinkhorn_newton",
        lambda g, k: solvers.sinkhorn_newton(
            g, epsilon=eps, tol=1e-9, max_steps=k, throw=False
        ),
    )
    ours(
        "jaxdecomp sinkhorn_newton (sparse, k=64)",
        lambda g, k: solvers.sinkhorn_newton(
            g, epsilon=eps, tol=1e-9, max_steps=k, hessian="sparse", k=64, throw=False
        ),
    )
    if ott_variants:
        from ott.geometry import pointcloud
        from ott.problems.linear import linear_problem
        from ott.solvers.linear import acceleration, sinkhorn as ott_sinkhorn

        for name, kw in (
            ("OTT-JAX plain", {}),
            (
                "OTT-JAX Momentum(start=20)",
                {"momentum": acceleration.Momentum(start=20)},
            ),
            (
                "OTT-JAX Anderson(memory=5)",
                {"anderson": acceleration.AndersonAcceleration(memory=5)},
            ),
        ):
            pts = []
            for k in budgets:
                if k < 10:
                    continue
                solver = ott_sinkhorn.Sinkhorn(threshold=1e-9, max_iterations=k, **kw)
                fn = jax.jit(
                    lambda x, y, solver=solver: (lambda out: (out.f, out.g))(
                        solver(
                            linear_problem.LinearProblem(
                                pointcloud.PointCloud(x, y, epsilon=eps)
                            )
                        )
                    )
                )
                t = time_fn(fn, x, y, repeats=1)
                f, g = fn(x, y)
                pts.append((t, _err_from_potentials(geom.cost_matrix, f, g, eps)))
                if pts[-1][1] <= 1e-9:
                    break
            curves[name] = pts
    _plot(curves, n, eps)
    table = Table(
        f"Convergence: marginal L1 error vs time, n={n}, eps={eps:g}, float64",
        ["method", "(time s, error) per step budget"],
    )
    for name, pts in curves.items():
        table.add(name, ", ".join(f"({t:.3g}, {e:.1e})" for t, e in pts))
    return table


def _plot(curves, n, eps):
    def draw(ax):
        for name, pts in curves.items():
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=name, ms=3)
        ax.set_xlabel("time (s)")
        ax.set_ylabel("L1 marginal error")
        ax.set_title(f"n={n}, epsilon={eps:g}, float64, {jax.devices()[0].platform}")

    save_figure("sinkhorn_convergence.png", draw)
