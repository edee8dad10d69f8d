"""The headline run, `python -m benchmarks` with no arguments: one row per capability,
each measured in this run against the best installed anchor, and the first-call
(trace + compile) latency of the main entry points. About 4 minutes on a 2-core CPU.

Every row is a small instance of a full benchmark (same code, same anchors, same
accuracy measure); the full tables are `python -m benchmarks all` (default sizes) and
`python -m benchmarks --full` (the issues' sizes).

Best anchor: among the anchor rows that reach the row's accuracy bar, the fastest; if
none does, the most accurate. "time / anchor" < 1 means we are faster.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxdecomp
import solvers

from ._harness import Table, optional_import, time_fn

COLUMNS = [
    "capability",
    "problem",
    "ours",
    "time (s)",
    "error",
    "best anchor",
    "anchor time (s)",
    "anchor error",
    "time / anchor",
    "accuracy bar",
]


def _best(anchors, bar):
    """anchors: [(name, time, error)] -> the fastest meeting `bar`, else the most
    accurate (None if there are none)."""
    anchors = [a for a in anchors if a[1] is not None and np.isfinite(a[1])]
    if not anchors:
        return None
    good = [a for a in anchors if a[2] is not None and a[2] <= bar]
    if good:
        return min(good, key=lambda a: a[1])
    return min(anchors, key=lambda a: np.inf if a[2] is None else a[2])


def _row(capability, problem, ours, anchors, bar, error_name="rel. error"):
    """One summary row from `ours = (name, time, error)` and the anchors."""
    best = _best(anchors, bar)
    name, t, err = ours
    if best is None:
        return [capability, problem, name, t, err, "(no anchor installed)"] + [
            None,
            None,
            None,
            f"{error_name} <= {bar:g}",
        ]
    return [
        capability,
        problem,
        name,
        t,
        err,
        best[0],
        best[1],
        best[2],
        t / best[1],
        f"{error_name} <= {bar:g}",
    ]


# ------------------------------------------------------------------ capabilities


def _implicit():
    from . import implicit as imp

    d, steps = 200, 500
    X, y, Xv, yv = imp._data(d)
    y, yv = (y > 0).astype(np.float64), (yv > 0).astype(np.float64)
    lam = 0.1
    ref = imp._reference("logistic", lam, X, y, Xv, yv)
    args = (jnp.asarray(lam), *map(jnp.asarray, (X, y, Xv, yv)))
    loss, optimality = imp._losses("logistic")
    inner = imp._inner(optimality, steps, "logistic")
    methods = {
        "custom_root (auto)": jaxdecomp.custom_root(optimality, symmetric=True)(inner),
        "unrolled (grad through the loop)": inner,
    }
    jaxopt = optional_import("jaxopt")
    if jaxopt is not None:
        methods["JAXopt custom_root (default)"] = jaxopt.implicit_diff.custom_root(
            optimality
        )(inner)
    rows = []
    for name, solver in methods.items():
        f = imp._hypergrad(solver, loss)
        t = time_fn(f, *args, repeats=5)
        rows.append((name, t, abs(float(f(*args)) - ref) / abs(ref)))
    return [
        _row(
            "implicit differentiation",
            f"logistic-regression hypergradient, d={d}, {steps} GD steps, float64",
            rows[0],
            rows[1:],
            1e-6,
        )
    ]


def _sqrtm():
    from . import sqrtm as sq

    cands = {
        "sqrtm (auto)": lambda a: jaxdecomp.sqrtm(a, throw=False),
        **{
            k: v
            for k, v in sq._candidates(optional_import("ott")).items()
            if not k.startswith("jaxdecomp")
        },
    }
    table = sq.timing_table(False, cands, configs=[(16, 128)], plot=False)
    rows = [(r[1], r[2] / 1e3, r[4]) for r in table.rows]
    grad_errors = ", ".join(f"{r[1]} {r[5]:.1e}" for r in table.rows)
    ours = next(r for r in rows if r[0] == "sqrtm (auto)")
    return [
        _row(
            "matrix square root",
            "value + gradient (timed), 16 x 128 x 128, float32, kappa 1e3; "
            f"gradient errors: {grad_errors}",
            ours,
            [r for r in rows if r is not ours],
            1e-5,
            "rel. error of A^1/2",
        )
    ]


def _sinkhorn():
    from . import sinkhorn as sk

    methods = ["sparse", "OTT-JAX plain", "Anderson"]
    (table,) = sk.run(
        sizes=(1000,),
        dtypes=("float32",),
        epsilons=(1e-3,),
        curves=False,
        methods=methods,
    )
    rows = [(r[3], r[4], r[6]) for r in table.rows]
    ours = next(r for r in rows if r[0].startswith("jaxdecomp"))
    return [
        _row(
            "Sinkhorn-Newton",
            "entropic OT, n = 1000 2-D points, epsilon 1e-3, float32",
            ("sinkhorn_newton (sparse)", *ours[1:]),
            [r for r in rows if r is not ours],
            sk.TOL["float32"],
            "marginal L1 error",
        )
    ]


def _cg():
    from . import cg as cgb

    n, rtol = 128, 1e-8
    op = solvers.problems.diffusion_2d(
        jax.random.key(cgb.HELD_OUT + n), n, variance=cgb.VARIANCE, dtype=jnp.float64
    )
    anchors = tuple(
        optional_import(m) for m in ("scipy.sparse", "scipy.sparse.linalg", "pyamg")
    )
    rows = cgb._run_problem(
        op, jnp.float64, rtol, {}, anchors, {}, methods=("Multigrid V(1,1)", "IC(0)")
    )
    # time = set-up + solve, for ours and the anchors alike
    rows = [(name, setup + t, res) for name, _, setup, t, res in rows]
    ours = [r for r in rows if r[0].startswith("solvers.cg")]
    best_ours = min(ours, key=lambda r: r[1])
    return [
        _row(
            "preconditioned CG",
            f"2-D diffusion (log-variance {cgb.VARIANCE}), {n}^2, float64, rtol "
            f"{rtol:g}; set-up + solve",
            (best_ours[0].replace("solvers.cg + ", "cg + "), *best_ours[1:]),
            [r for r in rows if not r[0].startswith("solvers.cg")],
            10 * rtol,
            "true rel. residual",
        )
    ]


def _recycling():
    from . import recycling as rc

    (table, *_) = rc.run(
        n=64,
        steps=30,
        sequences=("heat",),
        neural_inverse=False,
        recycle=(8,),
        methods=("Jacobi",),
        repeats=3,
    )
    rows = {r[2]: r for r in table.rows}
    ours, warm = rows["recycle k=8"], rows["warm-started PCG"]
    anchors = [
        (f"{r[1]} + {r[2]}", r[4], r[5]) for r in table.rows if r[1] == "PyAMG SA"
    ]
    name = (
        f"solve_sequence(recycle=8), Jacobi: {ours[3]} iterations "
        f"({ours[3] / warm[3]:.2f} of warm-started PCG), time {ours[4] / warm[4]:.2f} "
        "of it"
    )
    return [
        _row(
            "Krylov recycling",
            "30 heat steps (2-D diffusion), 64^2, float64, rtol 1e-8, chained",
            (name, ours[4], ours[5]),
            anchors,
            1e-7,
            "true rel. residual",
        )
    ]


def _lowrank():
    from . import lowrank as lr

    tables = lr.run(
        epochs=5,
        taus_sgd=(),
        taus_adam=((0.15, 0.35),),
        plots=False,
        trp_settings=(),
    )
    if not tables:
        return []
    table = tables[0]
    acc = {r[0]: float(str(r[1]).split()[0]) for r in table.rows}
    params = {r[0]: r[3] for r in table.rows}
    dlrt = next(k for k in acc if "DLRT" in k or "dlrt" in k.lower())
    dense = next(k for k in acc if k.startswith("dense"))
    return [
        [
            "low-rank layers (DLRT)",
            "digits MLP 64-256-256-10, 5 epochs, float32; error = 1 - test accuracy",
            f"{dlrt} ({params[dlrt]} params)",
            None,
            1 - acc[dlrt] / 100,
            f"{dense} ({params[dense]} params)",
            None,
            1 - acc[dense] / 100,
            None,
            "– (parameters vs accuracy)",
        ]
    ]


def _optim():
    from . import optim as op

    with jax.numpy_dtype_promotion("standard"):
        (table,) = op.training_tables(["digits_mlp"], steps=150, every=25, sweep=False)
    cols = table.columns
    name_i, t_i = cols.index("optimizer"), cols.index("time to Adam's loss (s)")
    loss_i = cols.index("min val loss")
    rows = [(r[name_i], r[t_i], r[loss_i]) for r in table.rows]
    ours = [r for r in rows if r[0].startswith("optim.")]
    reached = [r for r in ours if r[1] is not None]
    best_ours = min(reached, key=lambda r: r[1]) if reached else ours[0]
    anchors = [r for r in rows if not r[0].startswith("optim.")]
    adam_loss = next(r[2] for r in rows if r[0] == "adam")
    return [
        _row(
            "matrix-root optimizers",
            "digits MLP, 150 steps, float32; time to Adam's best validation loss",
            best_ours,
            anchors,
            adam_loss,
            "min validation loss",
        )
    ]


CAPABILITIES = {
    "implicit": (15, _implicit),
    "sqrtm": (20, _sqrtm),
    "sinkhorn": (30, _sinkhorn),
    "cg": (30, _cg),
    "recycling": (25, _recycling),
    "lowrank": (30, _lowrank),
    "optim": (40, _optim),
}


# ------------------------------------------------------------------ compile times


def _entry_points():
    """(name, goal, build) with build() -> (jitted function, args)."""
    rng = np.random.default_rng(0)

    def spd(n, dtype):
        m = rng.normal(size=(n, n))
        return jnp.asarray(m @ m.T / n + np.eye(n), dtype)

    def sqrtm():
        return jax.jit(lambda a: jaxdecomp.sqrtm(a)), (spd(128, jnp.float32),)

    def sqrtm_grad():
        f = jax.jit(jax.grad(lambda a: jnp.sum(jaxdecomp.sqrtm(a))))
        return f, (spd(128, jnp.float32),)

    def polar():
        a = jnp.asarray(rng.normal(size=(128, 64)), jnp.float32)
        return jax.jit(lambda a: jaxdecomp.polar(a)), (a,)

    def clouds(n):
        x = jnp.asarray(rng.uniform(size=(n, 2)), jnp.float32)
        return x, jnp.asarray(rng.uniform(size=(n, 2)), jnp.float32)

    def sinkhorn():
        f = jax.jit(
            lambda x, y: solvers.sinkhorn(solvers.PointCloud(x, y), epsilon=1e-2).f
        )
        return f, clouds(1000)

    def sinkhorn_newton():
        f = jax.jit(
            lambda x, y: (
                solvers.sinkhorn_newton(solvers.PointCloud(x, y), epsilon=1e-2).f
            )
        )
        return f, clouds(1000)

    def cg(preconditioner):
        def build():
            op = solvers.problems.poisson_2d(31, jnp.float64)  # 961 unknowns
            b = jnp.ones(op.n**2)
            f = jax.jit(
                lambda op, b: (
                    solvers.cg(
                        op,
                        b,
                        preconditioner=None
                        if preconditioner is None
                        else preconditioner(op),
                    ).x
                )
            )
            return f, (op, b)

        return build

    def custom_root():
        def F(x, theta):
            return x**3 - theta

        @jaxdecomp.custom_root(F)
        def root(x0, theta):
            return jnp.cbrt(theta)

        f = jax.jit(jax.grad(lambda t: jnp.sum(root(None, t))))
        return f, (jnp.linspace(1.0, 8.0, 100),)

    return [
        ("jaxdecomp.sqrtm, 128 x 128 float32", "<= 2 s", sqrtm),
        ("grad of jaxdecomp.sqrtm, 128 x 128 float32", None, sqrtm_grad),
        ("jaxdecomp.polar, 128 x 64 float32", None, polar),
        ("solvers.sinkhorn, n = 1000, float32", None, sinkhorn),
        ("solvers.sinkhorn_newton, n = 1000, float32", "<= 2 s", sinkhorn_newton),
        ("solvers.cg, Poisson 31^2 (961), float64", "<= 2 s", cg(None)),
        ("solvers.cg + Jacobi, Poisson 31^2", "<= 2 s", cg(solvers.Jacobi)),
        ("solvers.cg + Multigrid, Poisson 31^2", "<= 2 s", cg(solvers.Multigrid)),
        ("grad through custom_root (100 unknowns)", None, custom_root),
    ]


def compile_table() -> Table:
    table = Table(
        "First call (trace + compile + run, under jax.jit) and steady state",
        ["entry point", "first call (s)", "steady state (ms)", "ratio", "goal", "met"],
    )
    for name, goal, build in _entry_points():
        f, args = build()
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        first = time.perf_counter() - t0
        steady = time_fn(f, *args, repeats=5, warmup=0)
        met = None if goal is None else ("yes" if first <= 2.0 else "NO")
        table.add(name, first, 1e3 * steady, first / steady, goal, met)
    table.notes.append(
        "First call measured in this process after the capability rows, so helpers "
        "that JAX caches across programs (none of ours are jitted on their own) do "
        "not make it look cheaper; a fresh interpreter adds ~1-2 s of imports."
    )
    return table


def run(full: bool = False, only=None, progress: bool = True):
    """The summary table and the compile-time table. `only`: a subset of
    `CAPABILITIES` (and "compile"); `progress`: a progress bar on stderr."""
    del full  # the headline has one size; `--full` runs the full tables instead
    names = list(CAPABILITIES) + ["compile"]
    if only is not None:
        names = [n for n in names if n in only]
    estimates = {n: CAPABILITIES[n][0] if n in CAPABILITIES else 30 for n in names}
    bar = _Progress(estimates, enabled=progress)
    summary = Table("Headline: every capability against its best anchor", COLUMNS)
    out = [summary]
    for name in names:
        bar.start(name)
        if name == "compile":
            out.append(compile_table())
        else:
            try:
                for row in CAPABILITIES[name][1]():
                    summary.add(*row)
            except Exception as e:  # noqa: BLE001 - a failing part is reported
                summary.add(name, f"FAILED: {type(e).__name__}: {e}"[:200], *[None] * 8)
        bar.done(name)
    bar.close()
    summary.notes.append(
        "Best anchor: the fastest anchor row that meets the accuracy bar, else the "
        "most accurate. Times: median after warm-up, jit-compiled. Full tables: "
        "`python -m benchmarks all` (default sizes) or `--full` (the issues' sizes)."
    )
    return out


class _Progress:
    """A tqdm bar over the parts, weighted by their estimated seconds (so its ETA is
    an estimate of the whole run); plain lines on stderr without tqdm."""

    def __init__(self, estimates, enabled=True):
        self.estimates, self.enabled = estimates, enabled
        self.t0 = time.perf_counter()
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(
                    total=sum(estimates.values()),
                    unit="s",
                    bar_format=(
                        "{desc}: {percentage:3.0f}%|{bar}| {elapsed} < {remaining}"
                    ),
                    leave=True,
                )
            except ImportError:
                pass

    def start(self, name):
        self.t_part = time.perf_counter()
        if self.bar is not None:
            self.bar.set_description(f"{name} (~{self.estimates[name]} s)")
        elif self.enabled:
            import sys

            left = sum(self.estimates.values())
            print(
                f"[{name}] ~{self.estimates[name]} s (run estimate {left} s)",
                file=sys.stderr,
                flush=True,
            )

    def done(self, name):
        if self.bar is not None:
            self.bar.update(self.estimates[name])

    def close(self):
        if self.bar is not None:
            self.bar.close()
