"""Conjugate gradients on 2-D diffusion: jaxdecomp's `solvers.cg` against JAX, lineax,
SciPy, SciPy + ILU and PyAMG (the first table of the learned-preconditioner issue;
learned preconditioners will add rows).

One stopping rule for every entry: ||b - A x||_2 <= rtol ||b||_2 (rtol 1e-8, float64,
CPU), b = 1. The table reports iterations, set-up time, solve time (median of 3 after
warm-up for JAX entries) and the true final relative residual.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np

import solvers

from ._harness import Table, optional_import, time_fn

RTOL = 1e-8


def _problems(n):
    return {
        "Poisson": solvers.problems.poisson_2d(n),
        "diffusion var 0.6": solvers.problems.diffusion_2d(
            jax.random.key(0), n, variance=0.6
        ),
    }


def run(full: bool = False, sizes=None):
    if sizes is None:
        sizes = (128, 256, 512) if full else (64, 128)
    sp = optional_import("scipy.sparse")
    spla = optional_import("scipy.sparse.linalg")
    pyamg = optional_import("pyamg")
    table = Table(
        f"CG to relative residual {RTOL:g} (float64, b = 1)",
        [
            "problem",
            "n x n",
            "method",
            "iterations",
            "setup (s)",
            "solve (s)",
            "true rel. residual",
            "time / JAX CG",
        ],
    )
    for n in sizes:
        for pname, op in _problems(n).items():
            b = jnp.ones(n * n)
            bnorm = float(jnp.linalg.norm(b))
            max_steps = 20 * n * 4
            rows = []

            def true_res(x):
                return float(jnp.linalg.norm(b - op.mv(jnp.asarray(x)))) / bnorm

            for name, precond in (("none", None), ("Jacobi", "jacobi")):
                fn = jax.jit(
                    lambda b, precond=precond: solvers.cg(
                        op.mv,
                        b,
                        rtol=RTOL,
                        max_steps=max_steps,
                        preconditioner=None if precond is None else op.jacobi(),
                        throw=False,
                    )
                )
                t = time_fn(fn, b, repeats=3)
                sol = fn(b)
                rows.append(
                    (f"jaxdecomp cg, {name}", int(sol.n_steps), 0.0, t, true_res(sol.x))
                )
            fn = jax.jit(
                lambda b: jax.scipy.sparse.linalg.cg(
                    op.mv, b, tol=RTOL, atol=0.0, maxiter=max_steps
                )[0]
            )
            t = time_fn(fn, b, repeats=3)
            rows.append(
                ("jax.scipy.sparse.linalg.cg, none", None, 0.0, t, true_res(fn(b)))
            )
            lx_op = lx.FunctionLinearOperator(
                op.mv,
                jax.ShapeDtypeStruct(b.shape, b.dtype),
                lx.positive_semidefinite_tag,
            )
            solver = lx.CG(
                rtol=RTOL, atol=0.0, norm=lx.internal.two_norm, max_steps=max_steps
            )
            fn = jax.jit(
                lambda b: (lambda s: (s.value, s.stats["num_steps"]))(
                    lx.linear_solve(lx_op, b, solver, throw=False)
                )
            )
            t = time_fn(fn, b, repeats=3)
            x, steps = fn(b)
            rows.append(("lineax CG, none", int(steps), 0.0, t, true_res(x)))
            if sp is not None and spla is not None:
                a_csr = op.to_scipy()
                bn = np.ones(n * n)

                def scipy_cg(m=None):
                    its = [0]

                    def count(_):
                        its[0] += 1

                    x, _ = spla.cg(
                        a_csr,
                        bn,
                        rtol=RTOL,
                        atol=0.0,
                        M=m,
                        maxiter=max_steps,
                        callback=count,
                    )
                    return x, its[0]

                t = time_fn(scipy_cg, repeats=3, warmup=0)
                x, its = scipy_cg()
                rows.append(("SciPy CG, none", its, 0.0, t, true_res(x)))
                t0 = time.perf_counter()
                ilu = spla.spilu(a_csr.tocsc(), drop_tol=0.0, fill_factor=1.0)
                m_ilu = spla.LinearOperator(a_csr.shape, ilu.solve)
                setup = time.perf_counter() - t0
                t = time_fn(scipy_cg, m_ilu, repeats=3, warmup=0)
                x, its = scipy_cg(m_ilu)
                rows.append(
                    ("SciPy CG + ILU (spilu, fill 1)", its, setup, t, true_res(x))
                )
                if pyamg is not None:
                    t0 = time.perf_counter()
                    ml = pyamg.smoothed_aggregation_solver(a_csr)
                    m_amg = ml.aspreconditioner(cycle="V")
                    setup = time.perf_counter() - t0
                    t = time_fn(scipy_cg, m_amg, repeats=3, warmup=0)
                    x, its = scipy_cg(m_amg)
                    rows.append(("PyAMG SA + SciPy CG", its, setup, t, true_res(x)))
            t_ref = next(r[3] for r in rows if r[0].startswith("jax.scipy"))
            contrast = float(op.kx.max() / op.kx.min())
            for name, its, setup, t, res in rows:
                table.add(
                    f"{pname} (contrast {contrast:.3g})",
                    f"{n} x {n}",
                    name,
                    its,
                    setup,
                    t,
                    res,
                    t / t_ref,
                )
            print(f"  done {pname} n={n}", flush=True)
    table.notes.append(
        "jax.scipy.sparse.linalg.cg does not report its iteration count ('–'). "
        "SciPy's spilu with fill_factor=1, drop_tol=0 is the closest SciPy has to "
        "IC(0). JAX entries use the matrix-free 5-point stencil; SciPy/PyAMG use the "
        "same matrix in CSR. IC(0), SSOR, Chebyshev, multigrid and the learned "
        "preconditioners are not built yet."
    )
    return [table]
