"""Preconditioned CG on 2-D diffusion: `solvers.cg` with classic and learned
preconditioners against JAX's and lineax's CG, SciPy CG and PyAMG.

One stopping rule for every entry: ||b - A x||_2 <= rtol ||b||_2 (`solvers.cg` checks
it on the true residual; the anchors stop on their recursively updated one; rtol 1e-8
in float64 on CPU, 1e-6 in float32 on GPU), b = 1. The
tables report iterations, set-up time, solve time (median of 3 after warm-up) and the
true final relative residual, on held-out log-normal coefficient fields (seeds not
used for training) and 2-D Poisson. `NeuralIC`, `NeuralFSAI` and `NeuralInverse`
are trained in the same run on 64 x 64 fields of the same family (`train_models`)
and applied unchanged to larger grids and to a higher-contrast family.
"""

from __future__ import annotations

import time

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import optax

import solvers

from ._harness import Table, optional_import, save_figure, time_fn

VARIANCE = 1.5  # log-coefficient variance of the training family
HELD_OUT = 1000  # seeds >= this are never used for training
# the rows the generalisation table needs (absent when `run(methods=...)` omits them)
_GEN_METHODS = (
    "Jacobi",
    "NeuralFSAI (trained 64x64)",
    "IC(0)",
    "NeuralIC (trained 64x64)",
)


def _setting():
    if jax.default_backend() == "gpu":
        return jnp.float32, 1e-6
    return jnp.float64, 1e-8


def train_models(
    n: int = 64,
    count: int = 32,
    steps: int = 300,
    batch_size: int = 4,
    dtype=None,
    only: tuple[str, ...] | None = None,
):
    """Train `solvers.NeuralIC` (solution-weighted loss), `solvers.NeuralFSAI` and
    `solvers.NeuralInverse` (A-norm loss) on `count` fields of the training family at
    n x n (or only the named ones); returns `{name: (model, seconds, losses)}`
    (seconds include the training solves)."""
    dtype = dtype or _setting()[0]
    keys = jax.random.split(jax.random.key(0), count)
    ops = jax.vmap(
        lambda k: solvers.problems.diffusion_2d(k, n, variance=VARIANCE, dtype=dtype)
    )(keys)
    mats = jax.vmap(lambda op: op.to_sparse())(ops)
    bs = jax.random.normal(jax.random.key(1), (count, n * n), dtype)
    solve = jax.jit(
        jax.vmap(
            lambda a, b: (
                solvers.cg(
                    a,
                    b,
                    preconditioner=solvers.IncompleteCholesky(a),
                    rtol=float(jnp.finfo(dtype).eps) ** 0.75,
                    max_steps=20 * n,
                ).x
            )
        )
    )
    t0 = time.perf_counter()
    xs = solve(mats, bs)
    t_data = time.perf_counter() - t0
    out, key = {}, jax.random.key(2)
    for name, model, loss, mat in (
        ("NeuralIC", solvers.NeuralIC(key), solvers.solution_weighted_loss, mats),
        ("NeuralFSAI", solvers.NeuralFSAI(key), solvers.a_norm_loss, mats),
        ("NeuralInverse", solvers.NeuralInverse(key), solvers.a_norm_loss, ops),
    ):
        if only is not None and name not in only:
            continue
        t0 = time.perf_counter()
        model, losses = solvers.train_preconditioner(
            model,
            (mat, xs, bs),
            loss,
            optax.adam(3e-3),
            steps=steps,
            key=jax.random.key(3),
            batch_size=batch_size,
            progress=False,
        )
        out[name] = (model, time.perf_counter() - t0 + t_data, losses)
    return out


def _jax_preconditioners(trained, methods=None):
    out = {
        "none": None,
        "Jacobi": solvers.Jacobi,
        "Chebyshev (degree 4)": lambda op: solvers.Chebyshev(op, 4),
        "SSOR (omega 1.5)": lambda op: solvers.SSOR(op.to_sparse(), 1.5),
        "IC(0)": lambda op: solvers.IncompleteCholesky(op.to_sparse()),
        "Multigrid V(1,1)": solvers.Multigrid,
    }
    for name, (model, _, _) in trained.items():
        if name != "NeuralInverse":  # measured apart: see _neural_inverse_row
            out[f"{name} (trained 64x64)"] = lambda op, m=model: m(op.to_sparse())
    if methods is not None:
        out = {k: v for k, v in out.items() if k in methods}
    return out


def _neural_inverse_row(model, op, rtol):
    """Flexible CG with the trained NeuralInverse: one solve (iterations, true
    residual) and the median time of one network application. On a CPU the U-Net
    costs ~70 matvecs per application, so it is measured on one problem only."""
    n = op.n
    b = jnp.ones(n * n, op.kx.dtype)
    m = model(op)
    sol = jax.jit(
        lambda op, m, b: solvers.cg(
            op,
            b,
            preconditioner=m,
            rtol=rtol,
            max_steps=40 * n,
            flexible=True,
            throw=False,
        )
    )(op, m, b)
    t_apply = time_fn(jax.jit(lambda m, r: m.mv(r)), m, b, repeats=5)
    t_mv = time_fn(jax.jit(lambda op, r: op.mv(r)), op, b, repeats=5)
    res = float(jnp.linalg.norm(b - op.mv(sol.x)) / jnp.linalg.norm(b))
    return int(sol.n_steps), t_apply, t_mv, res


def _run_problem(op, dtype, rtol, trained, anchors, histories, methods=None):
    """Rows `(method, iterations, setup, solve, true residual)` for one problem."""
    n = op.n
    size = n**op.ndim
    b = jnp.ones(size, dtype)
    bnorm = float(jnp.linalg.norm(b))
    max_steps = 40 * round(size**0.5)  # 40 n in 2-D; 40 n^1.5 in 3-D
    rows = []

    def true_res(x):
        return float(jnp.linalg.norm(b - op.mv(jnp.asarray(x, dtype)))) / bnorm

    solve = jax.jit(
        lambda op, m, b: solvers.cg(
            op, b, preconditioner=m, rtol=rtol, max_steps=max_steps, throw=False
        )
    )
    for name, make in _jax_preconditioners(trained, methods).items():
        if make is None:
            m, setup = None, 0.0
        else:
            build = jax.jit(make)
            setup = time_fn(build, op, repeats=3)
            m = build(op)
        t = time_fn(solve, op, m, b, repeats=3)
        sol = solve(op, m, b)
        k = int(sol.n_steps)
        histories[name] = np.asarray(sol.residual_norms[: k + 1]) / bnorm
        rows.append((f"solvers.cg + {name}", k, setup, t, true_res(sol.x)))

    fn = jax.jit(
        lambda op, b: jax.scipy.sparse.linalg.cg(
            op.mv, b, tol=rtol, atol=0.0, maxiter=max_steps
        )[0]
    )
    rows.append(
        (
            "jax.scipy.sparse.linalg.cg",
            None,
            0.0,
            time_fn(fn, op, b, repeats=3),
            true_res(fn(op, b)),
        )
    )
    solver = lx.CG(rtol=rtol, atol=0.0, norm=lx.internal.two_norm, max_steps=max_steps)

    def lineax_cg(op, b):
        lx_op = lx.FunctionLinearOperator(
            op.mv, jax.ShapeDtypeStruct(b.shape, b.dtype), lx.positive_semidefinite_tag
        )
        s = lx.linear_solve(lx_op, b, solver, throw=False)
        return s.value, s.stats["num_steps"]

    fn = jax.jit(lineax_cg)
    t = time_fn(fn, op, b, repeats=3)
    x, steps = fn(op, b)
    rows.append(("lineax CG", int(steps), 0.0, t, true_res(x)))

    sp, spla, pyamg = anchors
    if spla is not None:
        a_csr = op.to_scipy()
        bn = np.ones(size)

        def scipy_cg(m=None, record=None):
            its = [0]

            def count(xk):
                its[0] += 1
                if record is not None:
                    record.append(np.linalg.norm(bn - a_csr @ xk) / np.linalg.norm(bn))

            x, _ = spla.cg(
                a_csr, bn, rtol=rtol, atol=0.0, M=m, maxiter=max_steps, callback=count
            )
            return x, its[0]

        t = time_fn(scipy_cg, repeats=3, warmup=0)
        x, its = scipy_cg()
        rows.append(("SciPy CG", its, 0.0, t, true_res(x)))
        if pyamg is not None:
            t0 = time.perf_counter()
            ml = pyamg.smoothed_aggregation_solver(a_csr)
            m_amg = ml.aspreconditioner(cycle="V")
            setup = time.perf_counter() - t0
            t = time_fn(scipy_cg, m_amg, repeats=3, warmup=0)
            hist = [1.0]
            x, its = scipy_cg(m_amg, hist)
            histories["PyAMG SA"] = np.asarray(hist)
            rows.append(("PyAMG SA + SciPy CG", its, setup, t, true_res(x)))
    return rows


def _add_rows(table, pname, size, op, rows):
    """One table row per method, with the time relative to jax.scipy's CG."""
    contrast = float(op.kx.max() / op.kx.min())
    t_ref = next(r[3] for r in rows if r[0].startswith("jax.scipy"))
    for name, its, setup, t, res in rows:
        table.add(
            f"{pname} (contrast {contrast:.3g})",
            size,
            name,
            its,
            setup,
            t,
            res,
            t / t_ref,
        )


def run(
    full: bool = False,
    sizes=None,
    train_steps: int = 300,
    train_n: int = 64,
    plots: bool = True,
    variances=(VARIANCE, 2 * VARIANCE),
    sizes_3d=None,
    methods=None,
    host_anchors: bool = True,
    true_residual_sizes=(64, 128),
    check_cost_sizes=(128, 256),
):
    """`methods` restricts the `solvers.cg` rows to these preconditioner names
    (e.g. no IC-type triangular solves at 2048^2 on a GPU); `host_anchors=False`
    skips SciPy CG and PyAMG; `true_residual_sizes`: the grids of the float32
    true-residual table (`true_residual_table`); `check_cost_sizes`: the grids of
    the check's time table (`check_cost_table`), the last table returned."""
    dtype, rtol = _setting()
    if sizes_3d is None:
        if jax.default_backend() == "gpu":
            sizes_3d = (32, 64, 128)
        else:
            sizes_3d = (16, 32, 64) if full else (16, 32)
    if sizes is None:
        if jax.default_backend() == "gpu":
            sizes = (64, 256, 1024, 2048) if full else (64, 256, 1024)
        else:
            sizes = (64, 128, 256, 512) if full else (64, 128, 256)
    anchors = tuple(
        optional_import(m) if host_anchors else None
        for m in ("scipy.sparse", "scipy.sparse.linalg", "pyamg")
    )
    trained = train_models(n=train_n, steps=train_steps, dtype=dtype)
    print("  trained " + ", ".join(f"{k} ({v[1]:.0f} s)" for k, v in trained.items()))

    cols = ["problem", "n x n", "method", "iterations", "setup (s)", "solve (s)"]
    cols += ["true rel. residual", "time / JAX CG"]
    main = Table(
        f"CG to relative residual {rtol:g} ({jnp.dtype(dtype).name}, b = 1)", cols
    )
    gen = Table(
        f"Learned preconditioners (trained on {train_n} x {train_n}, variance "
        f"{VARIANCE}) on held-out fields, iterations",
        [
            "n x n",
            "log-variance",
            "contrast",
            "Jacobi",
            "NeuralFSAI",
            "IC(0)",
            "NeuralIC",
            "NeuralIC vs IC(0)",
        ],
    )
    three_d = Table(
        f"3-D: CG to relative residual {rtol:g} ({jnp.dtype(dtype).name}, b = 1)",
        cols[:1] + ["n^3"] + cols[2:],
    )
    curves: dict[str, list] = {}
    last_hist: dict[str, np.ndarray] = {}
    for n in sizes:
        problems = {
            f"diffusion var {var}": solvers.problems.diffusion_2d(
                jax.random.key(HELD_OUT + n), n, variance=var, dtype=dtype
            )
            for var in variances
        }
        problems["Poisson"] = solvers.problems.poisson_2d(n, dtype)
        for pname, op in problems.items():
            hist: dict[str, np.ndarray] = {}
            rows = _run_problem(op, dtype, rtol, trained, anchors, hist, methods)
            _add_rows(main, pname, f"{n} x {n}", op, rows)
            its = {r[0]: r[1] for r in rows}
            if pname.startswith("diffusion") and all(
                f"solvers.cg + {c}" in its for c in _GEN_METHODS
            ):
                ic = its["solvers.cg + IC(0)"]
                nic = its["solvers.cg + NeuralIC (trained 64x64)"]
                var = float(pname.split()[-1])
                gen.add(
                    f"{n} x {n}",
                    var,
                    float(op.kx.max() / op.kx.min()),
                    its["solvers.cg + Jacobi"],
                    its["solvers.cg + NeuralFSAI (trained 64x64)"],
                    ic,
                    nic,
                    f"{1 - nic / ic:.0%} fewer",
                )
            if pname == f"diffusion var {VARIANCE}":
                for name, k in its.items():
                    if k is not None:
                        curves.setdefault(name, []).append((n, k))
                last_hist = hist
            print(f"  done {pname} n={n}", flush=True)
    for n in sizes_3d:
        problems = {
            f"3-D diffusion var {VARIANCE}": solvers.problems.diffusion_3d(
                jax.random.key(HELD_OUT + n), n, variance=VARIANCE, dtype=dtype
            ),
            "3-D Poisson": solvers.problems.poisson_3d(n, dtype),
        }
        for pname, op in problems.items():
            rows = _run_problem(op, dtype, rtol, trained, anchors, {}, methods)
            _add_rows(three_d, pname, f"{n}^3", op, rows)
            print(f"  done {pname} n={n}", flush=True)
    three_d.notes.append(
        "7-point stencil, cell-centered, zero Dirichlet; the learned models are the "
        "ones trained on 2-D 64 x 64 fields (5-point graphs), applied unchanged to "
        "the 3-D 7-point matrix graph. Multigrid is the same V(1,1) cycle in 3-D "
        "(8-cell coarsening, red-black Gauss-Seidel)."
    )
    main.notes += [
        "Held-out fields: seeds never used in training. jax.scipy.sparse.linalg.cg "
        "does not report its iteration count ('–'). SciPy has no IC(0); its spilu "
        "(SuperLU ILU, any fill factor, natural ordering or not) gives a "
        "nonsymmetric preconditioner (|M - M^T| ~ 0.5) on which SciPy's CG "
        "diverges, so it is not in the table. JAX entries "
        "apply the matrix-free 5-point stencil (IC(0), SSOR and NeuralIC use its "
        "SparseMatrix for their triangular factors); SciPy/PyAMG use the same matrix "
        "in CSR. Setup = building the preconditioner from the matrix (jitted; "
        "host-side level schedules are computed once per sparsity pattern and "
        "cached, not included).",
        "NeuralIC / NeuralFSAI / NeuralInverse: trained in this run on 32 fields "
        f"at {train_n} x {train_n} (variance {VARIANCE}), {train_steps} Adam "
        "steps (lr 3e-3), batch 4; "
        + "; ".join(
            f"{k}: {v[1]:.0f} s including the training solves, loss "
            f"{v[2][0]:.3g} -> {np.mean(v[2][-20:]):.3g}"
            for k, v in trained.items()
        )
        + ". The model names say the training grid; the same weights run on every "
        "size.",
    ]
    if "NeuralInverse" in trained and sizes and methods is None:
        n0 = sizes[0]
        op = solvers.problems.diffusion_2d(
            jax.random.key(HELD_OUT + n0), n0, variance=VARIANCE, dtype=dtype
        )
        its, t_apply, t_mv, res = _neural_inverse_row(
            trained["NeuralInverse"][0], op, rtol
        )
        jac = next(
            r[3]
            for r in main.rows
            if r[1] == f"{n0} x {n0}"
            and r[0].startswith(f"diffusion var {VARIANCE} ")
            and r[2] == "solvers.cg + Jacobi"
        )
        main.notes.append(
            f"NeuralInverse (U-Net, float32 network, flexible CG with memory 5), "
            f"held-out diffusion "
            f"var {VARIANCE} at {n0} x {n0}: {its} iterations (Jacobi: {jac}; the "
            f"untrained model is Jacobi), true rel. residual {res:.2g}; one network "
            f"application {t_apply * 1e3:.2f} ms = {t_apply / t_mv:.0f} matvecs "
            f"({t_mv * 1e3:.3f} ms) on this machine, so it is not timed at larger "
            "sizes."
        )
    if plots and curves:

        def draw_iterations(ax):
            for name, pts in curves.items():
                x, y = zip(*pts)
                ax.plot([v * v for v in x], y, "o-", label=name, ms=3)
            ax.set_xlabel("unknowns")
            ax.set_ylabel(f"CG iterations to rel. residual {rtol:g}")
            ax.set_title(f"held-out diffusion, log-variance {VARIANCE}")

        def draw_histories(ax):
            for name, h in last_hist.items():
                ax.plot(np.arange(1, h.size + 1), h, label=name)
            ax.set_xlabel("iteration + 1")
            ax.set_ylabel("relative residual")
            ax.set_title(f"residual histories, {sizes[-1]} x {sizes[-1]}")

        save_figure("cg_iterations.png", draw_iterations)
        save_figure("cg_residuals.png", draw_histories)
    tables = [main] + ([gen] if gen.rows else []) + ([three_d] if sizes_3d else [])
    return tables + [
        true_residual_table(true_residual_sizes),
        check_cost_table(check_cost_sizes),
    ]


def true_residual_table(sizes=(64, 128), rtols=(None, 1e-5)) -> Table:
    """float32 CG's attainable accuracy: the iteration alone (stopping on its
    recursively updated residual, as jax.scipy's CG does) against `solvers.cg`,
    which checks the true residual, replaces the residual and reports `inaccurate`
    below the dtype's level; lineax's CG (residual recomputed every 10 steps) and
    jax.scipy's CG as anchors. Diffusion fields of variance 1.5, b = 1, Jacobi;
    true residuals evaluated in float64."""
    from solvers._misc import pcg

    table = Table(
        "float32 CG: true residual ||b - Ax|| / ||b|| (evaluated in float64) when "
        "each solver stops (diffusion variance 1.5, b = 1, Jacobi)",
        ["n x n", "rtol", "method", "steps", "true rel. residual", "reported"],
    )
    for n in sizes:
        op = solvers.problems.diffusion_2d(
            jax.random.key(0), n, variance=VARIANCE, dtype=jnp.float32
        )
        op64 = jax.tree_util.tree_map(
            lambda a: a.astype(jnp.float64) if eqx.is_inexact_array(a) else a, op
        )
        d = op.diagonal()
        b = jnp.ones(n * n, jnp.float32)
        max_steps = 40 * n

        def true_res(x):
            r = jnp.ones(n * n) - op64.mv(jnp.asarray(x, jnp.float64))
            return float(jnp.linalg.norm(r) / n)

        def jacobi(r):
            return r / d

        for rtol in rtols:
            tol = float(np.finfo(np.float32).eps) ** 0.5 if rtol is None else rtol
            label = tol
            x, k, conv, _ = jax.jit(
                lambda b: pcg(op.mv, b, 1 / d, tol, max_steps, verify=False)
            )(b)
            table.add(
                f"{n} x {n}", label, "PCG iteration alone (recursive residual)",
                int(k), true_res(x), "converged" if bool(conv) else "not converged",
            )  # fmt: skip
            for flexible in (False, True):
                sol = jax.jit(
                    lambda b: solvers.cg(
                        op,
                        b,
                        preconditioner=jacobi,
                        rtol=rtol,
                        flexible=flexible,
                        max_steps=max_steps,
                        throw=False,
                    )  # fmt: skip
                )(b)
                table.add(
                    f"{n} x {n}", label,
                    "solvers.cg" + (" (flexible)" if flexible else ""),
                    int(sol.n_steps), true_res(sol.x),
                    _code_name(sol.result),
                )  # fmt: skip
            x = jax.jit(
                lambda b: jax.scipy.sparse.linalg.cg(
                    op.mv, b, tol=tol, atol=0.0, M=jacobi, maxiter=max_steps
                )[0]
            )(b)
            table.add(f"{n} x {n}", label, "jax.scipy CG", None, true_res(x), "-")
            lx_op = lx.FunctionLinearOperator(
                op.mv, jax.ShapeDtypeStruct(b.shape, b.dtype),
                lx.positive_semidefinite_tag,
            )  # fmt: skip
            solver = lx.CG(
                rtol=tol, atol=0.0, norm=lx.internal.two_norm, max_steps=max_steps
            )
            pre = lx.FunctionLinearOperator(
                jacobi, jax.ShapeDtypeStruct(b.shape, b.dtype),
                lx.positive_semidefinite_tag,
            )  # fmt: skip
            s = lx.linear_solve(
                lx_op, b, solver, options={"preconditioner": pre}, throw=False
            )
            table.add(
                f"{n} x {n}", label, "lineax CG (stabilise_every=10)",
                int(s.stats["num_steps"]), true_res(s.value),
                "successful" if s.result == lx.RESULTS.successful else "failed",
            )  # fmt: skip
    table.notes.append(
        "`solvers.cg` steps exclude its true-residual checks (one matvec each). "
        "'converged' for the iteration alone is its own claim; the true residual "
        "column shows whether it holds. rtol 3.45e-4 is float32's default."
    )
    table.notes.append(
        "lineax's CG (which recomputes its residual every 10 steps) stops at its "
        "first step with NaN on these float32 systems: its breakdown test "
        "|p^T A p| > 100 eps n |r^T z| rejects b = 1, for which A 1 is nonzero only "
        "near the boundary (float64 is not affected)."
    )
    return table


def check_cost_table(sizes=(128, 256), repeats: int = 9) -> Table:
    """What the true-residual check costs in time: the CG iteration of `solvers.cg`
    with and without it (`jaxdecomp._cg_loop.scaled_cg_loop(verify=...)`), on
    float64 diffusion fields (variance 1.5, b = 1, Jacobi, rtol 1e-8), where both stop
    after the same steps; `solvers.cg` and jax.scipy's CG beside them. Every variant
    returns its iterate and step count (a benchmark that keeps only the step count
    lets XLA drop the iterate's update: measured, that made the loop without the
    check look 1.2x faster than it is). Medians of `repeats` interleaved runs."""
    from jaxdecomp._cg_loop import scaled_cg_loop

    table = Table(
        "Cost of the true-residual check (float64, diffusion variance 1.5, b = 1, "
        "Jacobi, rtol 1e-8)",
        ["n x n", "method", "steps", "true rel. residual", "solve (ms)",
         "time / no check"],
    )  # fmt: skip
    for n in sizes:
        op = solvers.problems.diffusion_2d(jax.random.key(0), n, variance=VARIANCE)
        d = op.diagonal()
        b = jnp.ones(n * n)
        max_steps = 40 * n

        def jacobi(r):
            return r / d

        def loop(verify):
            def f(b):
                x, info, _ = scaled_cg_loop(
                    op.mv, jacobi, b, jnp.zeros_like(b), rtol=1e-8, atol=0.0,
                    max_steps=max_steps, flexible=False, unroll=False, verify=verify,
                )  # fmt: skip
                return x, info[0]

            return jax.jit(f)

        def ours(b):
            sol = solvers.cg(
                op, b, preconditioner=jacobi, rtol=1e-8, max_steps=max_steps
            )
            return sol.x, sol.n_steps

        def jax_scipy(b):
            x, _ = jax.scipy.sparse.linalg.cg(
                op.mv, b, tol=1e-8, atol=0.0, M=jacobi, maxiter=max_steps
            )
            return x, None

        fns = {
            "CG iteration without the check (verify=False)": loop(False),
            "CG iteration with the check (verify=True)": loop(True),
            "solvers.cg": jax.jit(ours),
            "jax.scipy CG": jax.jit(jax_scipy),
        }
        times = {name: [] for name in fns}
        outs = {name: jax.block_until_ready(f(b)) for name, f in fns.items()}
        for _ in range(repeats):  # interleaved: the machine's drift hits all alike
            for name, f in fns.items():
                t0 = time.perf_counter()
                jax.block_until_ready(f(b))
                times[name].append(time.perf_counter() - t0)
        base = float(np.median(times["CG iteration without the check (verify=False)"]))
        for name, (x, k) in outs.items():
            t = float(np.median(times[name]))
            res = float(jnp.linalg.norm(b - op.mv(x)) / jnp.linalg.norm(b))
            table.add(
                f"{n} x {n}", name, None if k is None else int(k), res, 1e3 * t,
                t / base,
            )  # fmt: skip
    table.notes.append(
        "steps exclude the check's one matvec. Every variant returns its iterate "
        "and step count (returning also the residual-norm history changed nothing: "
        "measured); between the first two rows the only difference is the check and "
        "the loop around the CG loop that runs it."
    )
    return table


def _code_name(result) -> str:
    """The `solvers.RESULTS` member name of a (scalar) result."""
    names = ("successful", "inaccurate", "max_steps_reached", "not_spd")
    for name in names + ("nonfinite_input",):
        if result == getattr(solvers.RESULTS, name):
            return name
    return "other failure"
