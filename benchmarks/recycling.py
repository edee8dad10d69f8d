"""Sequences of related SPD systems: `solvers.solve_sequence` with Krylov subspace
recycling (deflated CG, harmonic Ritz vectors carried from system to system) against
warm-started PCG with the same preconditioner, and against SciPy CG + PyAMG on the
same sequence (hierarchy rebuilt per system vs reused).

Two sequences on 2-D variable-coefficient diffusion (log-normal fields, log-variance
1.5, as in the `cg` benchmark), one stopping rule for every entry
(||b - A x|| <= rtol ||b||, checked on the true residual by `solvers.cg`; SciPy stops
on its recursive one; rtol 1e-8, float64 on CPU):

- `heat_steps`: implicit-Euler steps (I + dt A/h^2) u_{k+1} = u_k, dt = 1e-2, in the
  h^2-scaled form (A + s I) u_{k+1} = s u_k with s = h^2/dt = 1/(n^2 dt), u_0
  random; the right-hand side of each step is the previous solution (time stepping:
  the sequence is chained).
- `fields`: independent coefficient fields (the neural-operator data-generation case
  of SKR), b = 1 for every system; solved in the given order or in SKR's greedy
  nearest-neighbour order of the face coefficients.

Every row is one jitted `solve_sequence` (or one Python loop for the SciPy rows);
times are the median of `repeats` after a compiling warm-up. The total CG iterations
are exact counts; "true rel. res." is the worst over the sequence of
||b - A x|| / ||b|| recomputed from the returned solutions.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

import solvers

from ._harness import Table, optional_import

VARIANCE = 1.5
DT = 1e-2


def _preconditioners():
    return {
        "Jacobi": solvers.Jacobi,
        "IC(0)": lambda op: solvers.IncompleteCholesky(op.to_sparse()),
        "Multigrid": solvers.Multigrid,
    }


def _sequences(n: int, steps: int, systems: int, dtype):
    base = solvers.problems.diffusion_2d(
        jax.random.key(0), n, variance=VARIANCE, dtype=dtype
    )
    heat = solvers.problems.heat_steps(base, jnp.full(steps, DT, dtype))
    u0 = jax.random.normal(jax.random.key(1), (n * n,), dtype)
    keys = jax.random.split(jax.random.key(2), systems)
    fields = jax.jit(
        jax.vmap(
            lambda k: solvers.problems.diffusion_2d(
                k, n, variance=VARIANCE, dtype=dtype
            )
        )
    )(keys)
    ones = jnp.ones((systems, n * n), dtype)
    return heat, u0, fields, ones


def _timed(fn, *args, repeats):
    """Median seconds of `repeats` runs of the compiled `fn` and its output; one run
    when the first takes over 20 s (long runs vary little)."""
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
        if times[0] > 20:
            break
    return float(np.median(times)), out


def _true_residual(ops, xs, bs):
    def one(op, x, b):
        return jnp.linalg.norm(b - op.mv(x)) / jnp.linalg.norm(b)

    return float(jnp.max(jax.vmap(one)(ops, xs, bs)))


def _scipy_rows(table, name, ops, xs_rhs, rtol, chained, u0, anchors):
    """SciPy CG with PyAMG smoothed aggregation: the hierarchy rebuilt per system,
    or built once (first system) and reused; warm-started like the JAX rows."""
    sp, spla, pyamg = anchors
    if spla is None or pyamg is None:
        return
    count = jax.tree_util.tree_leaves(ops)[0].shape[0]
    mats = [
        jax.tree_util.tree_map(lambda a: a[i], ops).to_scipy() for i in range(count)
    ]
    rhs = None if chained else np.asarray(xs_rhs)
    shifts = np.asarray(ops.shift) if chained else None

    modes = ("rebuilt per system", "reused")
    if not chained and count > 50:
        # one field's hierarchy for independent fields: measured at 32^2 and 128^2
        # (default run), far more iterations; not repeated at full size
        modes = modes[:1]
    failed = [0]
    for mode in modes:

        def solve_all(mode=mode):
            x_prev = np.asarray(u0) if chained else np.zeros(mats[0].shape[0])
            its, out = 0, []
            failed[0] = 0
            ml = None
            for i, a in enumerate(mats):
                if mode == "rebuilt per system" or ml is None:
                    ml = pyamg.smoothed_aggregation_solver(a)
                m = ml.aspreconditioner(cycle="V")
                b = shifts[i] * x_prev if chained else rhs[i]
                k = [0]

                def cb(xk, k=k):
                    k[0] += 1
                    if not np.isfinite(xk[0]):  # SciPy CG iterates on with NaN
                        raise FloatingPointError

                try:
                    x, _ = spla.cg(
                        a,
                        b,
                        x0=x_prev,
                        rtol=rtol,
                        atol=0.0,
                        M=m,
                        maxiter=5000,
                        callback=cb,
                    )
                except FloatingPointError:
                    x = np.full_like(b, np.nan)
                    failed[0] += 1
                its += k[0]
                out.append((b, x))
                x_prev = x
            return its, out

        t0 = time.perf_counter()
        its, out = solve_all()
        t = time.perf_counter() - t0
        res = max(
            np.linalg.norm(b - a @ x) / np.linalg.norm(b)
            for a, (b, x) in zip(mats, out)
        )
        label = f"SciPy CG, hierarchy {mode}"
        if failed[0]:
            label += f" (SciPy CG diverged to NaN on {failed[0]} systems)"
        table.add(name, "PyAMG SA", label, its, t, res, "–", "–")
        print("  " + " | ".join(map(str, table.rows[-1])), flush=True)


def run(
    full: bool = False,
    n: int | None = None,
    steps: int | None = None,
    systems: int | None = None,
    sequences: tuple[str, ...] = ("heat", "fields"),
    neural_inverse: bool = True,
    newton: bool = True,
    recycle: tuple[int, ...] | None = None,
    methods: tuple[str, ...] | None = None,
    repeats: int = 3,
    host_anchors: bool = True,
):
    """Default: 128^2, 30 heat steps, 30 fields, k = 8 and 32 (minutes on a
    2-core CPU); `full=True`: the issue's 256^2, 100 heat steps, 200 fields, k = 16
    and 32 (over an hour on a 2-core CPU; `methods=("IC(0)",)` alone: about 20
    minutes)."""
    if jax.default_backend() == "gpu":
        dtype, rtol = jnp.float32, 1e-6
    else:
        dtype, rtol = jnp.float64, 1e-8
    n = n or (256 if full else 128)
    steps = steps or (100 if full else 30)
    systems = systems or (200 if full else 30)
    recycle = recycle or ((16, 32) if full else (8, 32))
    anchors = tuple(
        optional_import(m) if host_anchors else None
        for m in ("scipy.sparse", "scipy.sparse.linalg", "pyamg")
    )
    heat, u0, fields, ones = _sequences(n, steps, systems, dtype)
    pre = _preconditioners()
    # (IC(0)'s level-scheduled triangular solves cost ~4.3 ms per application at
    # 256^2 on an idle 2-core CPU: its rows add about 15 minutes to `full`: 3.3 + 12.1
    # minutes measured for heat + fields, 2026-12-06)
    if methods is not None:
        pre = {k: v for k, v in pre.items() if k in methods}

    cols = [
        "sequence",
        "preconditioner",
        "strategy",
        "total iterations",
        "time (s)",
        "true rel. res.",
    ]
    table = Table(
        f"Sequences of {n} x {n} systems ({jnp.dtype(dtype).name}, rtol {rtol:g}): "
        f"{steps} heat steps (dt {DT:g}, chained), {systems} independent fields "
        "(b = 1)",
        cols + ["iterations / warm PCG", "time / warm PCG"],
    )
    cases = [("heat", heat, None), ("fields", fields, ones)]
    cases = [c for c in cases if c[0] in sequences]
    for pname, factory in pre.items():
        for seq_name, ops, bs in cases:
            chained = bs is None
            strategies = [("warm-started PCG", 0, None)]
            strategies += [(f"recycle k={k}", k, None) for k in recycle]
            if not chained:
                if not full:
                    strategies += [("greedy order, warm PCG", 0, "greedy")]
                strategies += [
                    (f"greedy order + recycle k={max(recycle)}", max(recycle), "greedy")
                ]
            base = None
            for label, k, order in strategies:

                def go(ops, bs, k=k, order=order):
                    rhs = (lambda i, u: ops.shift[i] * u) if bs is None else bs
                    return solvers.solve_sequence(
                        ops,
                        rhs,
                        initial=u0 if bs is None else None,
                        recycle=k,
                        order=order,
                        preconditioner=factory,
                        rtol=rtol,
                        throw=False,
                    )

                fn = jax.jit(go).lower(ops, bs).compile()
                print(f"  {seq_name} / {pname} / {label} ...", flush=True)
                t, sol = _timed(fn, ops, bs, repeats=repeats)
                ok = bool(jnp.all(sol.converged))
                rhs_used = (
                    ops.shift[:, None] * jnp.concatenate([u0[None], sol.x[:-1]])
                    if chained
                    else bs
                )
                res = _true_residual(ops, sol.x, rhs_used)
                its = int(sol.total_steps)
                if base is None:
                    base = (its, t)
                table.add(
                    seq_name,
                    pname,
                    label + ("" if ok else " (NOT all converged)"),
                    its,
                    t,
                    res,
                    its / base[0],
                    t / base[1],
                )
                # each row as it is measured (a long run keeps what it measured)
                print("  " + " | ".join(map(str, table.rows[-1])), flush=True)
    for seq_name, ops, bs in cases:
        print(f"  {seq_name} / PyAMG + SciPy ...", flush=True)
        _scipy_rows(table, seq_name, ops, bs, rtol, bs is None, u0, anchors)
    table.notes += [
        "recycle k: `solvers.solve_sequence(..., recycle=k)` (window 2k): deflated "
        "CG with the previous system's k harmonic Ritz vectors; overhead per system "
        "k matvecs and k preconditioner applications (M^{-1} A of the recorded "
        "directions comes from the iteration's own z vectors), per iteration 4 "
        "products with k x n matrices (2.5 in float64: the residual's coarse "
        "correction every 4th step).",
        "greedy order: SKR's nearest-neighbour order on the flattened face "
        "coefficients; solutions are returned in input order.",
        "PyAMG rows: smoothed aggregation V-cycle as SciPy CG's preconditioner, "
        "warm-started like the JAX rows; 'rebuilt' includes the set-up of every "
        "hierarchy, 'reused' builds one on the first system.",
    ]
    tables = [table, newton_table()] if newton else [table]
    if not neural_inverse:
        return tables
    sizes = (64, 128, 256, 512) if full else (64, 128, 256)
    return [*tables, neural_inverse_at_size(sizes)]


def neural_inverse_at_size(
    sizes=(64, 128, 256), train_steps: int = 300, max_steps: int = 3000
):
    """The trained `NeuralInverse` (flexible CG, FCG(5)), trained on 64 x 64 fields as
    in the `cg` benchmark, on held-out fields of the same family at growing sizes:
    iterations against Jacobi-PCG and IC(0)-PCG. DCDM (Kaneda et al.) reports
    iteration counts roughly independent of the grid."""
    from .cg import HELD_OUT, train_models

    dtype, rtol = jnp.float64, 1e-8
    trained = train_models(
        n=64, steps=train_steps, dtype=dtype, only=("NeuralInverse",)
    )
    model, secs, losses = trained["NeuralInverse"]
    table = Table(
        f"NeuralInverse trained on 64 x 64 (variance {VARIANCE}, {train_steps} Adam "
        f"steps, {secs:.0f} s), held-out fields, CG to rtol {rtol:g}, b = 1",
        [
            "n x n",
            "Jacobi PCG",
            "IC(0) PCG",
            "NeuralInverse FCG(5)",
            "NeuralInverse / Jacobi",
            "NeuralInverse iterations / n",
            "true rel. res.",
        ],
    )

    def solve(op, pre, flexible):
        return _counted_solve(op, pre, flexible, rtol=rtol, max_steps=max_steps)

    for n in sizes:
        print(f"  NeuralInverse at {n} x {n} ...", flush=True)
        op = solvers.problems.diffusion_2d(
            jax.random.key(HELD_OUT), n, variance=VARIANCE, dtype=dtype
        )
        jac, _ = solve(op, solvers.Jacobi, False)
        ic, _ = solve(op, lambda o: solvers.IncompleteCholesky(o.to_sparse()), False)
        net, res = solve(op, model, True)
        both = isinstance(net, int) and isinstance(jac, int)
        table.add(
            n,
            jac,
            ic,
            net,
            net / jac if both else None,
            net / n if isinstance(net, int) else None,
            res,
        )
        print("  " + " | ".join(map(str, table.rows[-1])), flush=True)
    table.notes.append(
        f"training loss {float(losses[0]):.3g} -> {float(losses[-1]):.3g}; "
        f"max_steps {max_steps} for every solve ('> N (code)': not converged, "
        "with `solvers.cg`'s result code; `not_spd`: a direction had "
        "r^T M^{-1}(r) <= 0, the network is not positive there); the "
        "library's network is 2-D only (`neural_inverse_3d` measures a 3-D "
        "prototype of the same architecture)."
    )
    return table


def _counted_solve(op, pre, flexible, *, rtol, max_steps):
    """CG on `op` with b = 1 and the preconditioner `pre(op)`: (iterations, or
    '> N (result code)' when not converged; the true relative residual)."""
    from .cg import _code_name

    b = jnp.ones_like(op.diagonal())
    sol = jax.jit(
        lambda op, b: solvers.cg(
            op,
            b,
            preconditioner=pre(op),
            rtol=rtol,
            max_steps=max_steps,
            flexible=flexible,
            throw=False,
        )
    )(op, b)
    res = float(jnp.linalg.norm(b - op.mv(sol.x)) / jnp.linalg.norm(b))
    steps = int(sol.n_steps)
    if bool(sol.converged):
        return steps, res
    return f"> {steps} ({_code_name(sol.result)})", res


def neural_inverse_3d(
    sizes=(16, 32, 48),
    train_n: int = 16,
    count: int = 16,
    train_steps: int = 300,
    width: int = 16,
    max_steps: int = 1500,
    learning_rate: float = 3e-3,
):
    """The NeuralInverse architecture in 3-D (`benchmarks._neural3d`, a prototype:
    the library's network is 2-D), trained with the A-norm loss on `count`
    `diffusion_3d` fields at `train_n`^3 (solutions by IC(0)-PCG to 1e-12; Adam
    `learning_rate`, batch 4), then flexible CG FCG(5) on a held-out field at
    growing sizes against Jacobi and IC(0) PCG (float64, rtol 1e-8, b = 1). DCDM
    (Kaneda et al.) is a 3-D method and reports iterations roughly independent of
    the grid."""
    import optax

    from ._neural3d import NeuralInverse3D
    from .cg import HELD_OUT

    dtype, rtol = jnp.float64, 1e-8
    keys = jax.random.split(jax.random.key(0), count)
    ops = jax.vmap(
        lambda k: solvers.problems.diffusion_3d(
            k, train_n, variance=VARIANCE, dtype=dtype
        )
    )(keys)
    bs = jax.random.normal(jax.random.key(1), (count, train_n**3), dtype)
    xs = jax.jit(
        jax.vmap(
            lambda op, b: (
                solvers.cg(
                    op,
                    b,
                    preconditioner=solvers.IncompleteCholesky(op.to_sparse()),
                    rtol=1e-12,
                    max_steps=20 * train_n**2,
                ).x
            )
        )
    )(ops, bs)
    t0 = time.perf_counter()
    model, losses = solvers.train_preconditioner(
        NeuralInverse3D(jax.random.key(2), width=width),
        (ops, xs, bs),
        solvers.a_norm_loss,
        optax.adam(learning_rate),
        steps=train_steps,
        key=jax.random.key(3),
        batch_size=4,
        progress=False,
    )
    secs = time.perf_counter() - t0
    table = Table(
        f"NeuralInverse architecture in 3-D (prototype, width {width}), trained on "
        f"{count} fields of {train_n}^3 (variance {VARIANCE}, {train_steps} Adam "
        f"steps at {learning_rate:g}, {secs:.0f} s), held-out field, CG to rtol "
        f"{rtol:g}, b = 1",
        [
            "n^3",
            "Jacobi PCG",
            "IC(0) PCG",
            "NeuralInverse-3D FCG(5)",
            "NeuralInverse-3D / Jacobi",
            "true rel. res.",
        ],
    )
    for n in sizes:
        print(f"  NeuralInverse-3D at {n}^3 ...", flush=True)
        op = solvers.problems.diffusion_3d(
            jax.random.key(HELD_OUT), n, variance=VARIANCE, dtype=dtype
        )
        counted = dict(rtol=rtol, max_steps=max_steps)
        jac, _ = _counted_solve(op, solvers.Jacobi, False, **counted)
        ic, _ = _counted_solve(
            op, lambda o: solvers.IncompleteCholesky(o.to_sparse()), False, **counted
        )
        net, res = _counted_solve(op, model, True, **counted)
        both = isinstance(net, int) and isinstance(jac, int)
        table.add(n, jac, ic, net, net / jac if both else None, res)
        print("  " + " | ".join(map(str, table.rows[-1])), flush=True)
    table.notes.append(
        f"training loss {float(losses[0]):.3g} -> {float(losses[-1]):.3g} (the "
        "untrained network is Jacobi); max_steps "
        f"{max_steps} ('> N (code)': not converged, with the result code)."
    )
    return table


def newton_table(
    configs=((1000, "float64", None), (4000, "float64", None), (4000, "float32", 1024)),
    recycle=(0, 8, 16),
    repeats: int = 3,
) -> Table:
    """Krylov recycling between the Newton-CG solves of `solvers.sinkhorn_newton`
    (`recycle=k`): 2-D uniform clouds, epsilon 1e-3, tol 1e-9 (float64) / 1e-5
    (float32), dense and sparse Hessian (k = 64); configs are (n, dtype,
    batch_size: None = dense cost matrix, int = online)."""
    table = Table(
        "sinkhorn_newton: Newton-CG with recycling (`recycle=k`) vs plain Jacobi-PCG "
        "(epsilon 1e-3, jit, median after warm-up)",
        [
            "n, dtype, geometry",
            "Hessian",
            "recycle",
            "time (s)",
            "time / recycle=0",
            "CG iterations",
            "Newton steps",
            "L1 error",
        ],
    )
    rng = np.random.default_rng(0)
    for n, dtype, batch in configs:
        tol = 1e-9 if dtype == "float64" else 1e-5
        x = jnp.asarray(rng.uniform(size=(n, 2)), dtype)
        y = jnp.asarray(rng.uniform(size=(n, 2)), dtype)
        label = f"{n}, {dtype}, " + ("dense" if batch is None else f"online {batch}")
        for hessian in ("dense", "sparse"):
            base = None
            for k in recycle:

                def solve(x, y, hessian=hessian, k=k):
                    geom = solvers.PointCloud(x, y, batch_size=batch)
                    return solvers.sinkhorn_newton(
                        geom,
                        epsilon=1e-3,
                        tol=tol,
                        hessian=hessian,
                        recycle=k,
                        throw=False,
                    )

                fn = jax.jit(solve)
                jax.block_until_ready(fn(x, y))  # compile
                t, out = _timed(fn, x, y, repeats=repeats)
                base = t if k == 0 else base
                table.add(
                    label,
                    hessian,
                    k,
                    t,
                    t / base,
                    int(out.n_cg_steps),
                    int(out.n_newton_steps),
                    float(jnp.max(out.error)),
                )
                print("  " + " | ".join(map(str, table.rows[-1])), flush=True)
    table.notes.append(
        "recycle = k: each Newton step's CG is deflated by the previous step's k "
        "harmonic Ritz vectors (one batched matvec with them per step). The sparse "
        "Hessian falls back to dense steps where k = 64 entries per row keep less "
        "than 99% of the plan (here at n <= 4000)."
    )
    return table


def tangent_reuse_table(
    sizes=(128, 256), ks=(16, 32), methods=("Jacobi", "IC(0)"), repeats: int = 3
):
    """Would the derivative solves of one `solvers.cg` call gain from the forward
    solve's own Krylov space? (Issue 16 asks to measure it.) The forward solve
    (b = 1, a field of the recycling family) with `recycle=k` gives k harmonic Ritz
    vectors; a cotangent solve A y = g (a random g, as in reverse mode, and a
    smooth g = 1 + 0.1 noise) is timed plain and deflated by those vectors
    (`deflation=`, which includes their A-orthonormalisation, k matvecs). Not
    counted: the Ritz extraction after the forward solve, which reuse would add to
    every differentiated call. float64, rtol 1e-8, jitted, median of `repeats`
    after a compiling warm-up."""
    dtype, rtol = jnp.float64, 1e-8
    table = Table(
        f"One solve's derivative: cotangent solves deflated by the forward solve's "
        f"Ritz vectors ({jnp.dtype(dtype).name}, rtol {rtol:g}, one field per size)",
        [
            "n x n",
            "preconditioner",
            "k",
            "forward steps",
            "cotangent",
            "plain steps",
            "deflated steps",
            "plain (ms)",
            "deflated (ms)",
            "time deflated / plain",
        ],
    )
    pre = {k: v for k, v in _preconditioners().items() if k in methods}
    for n in sizes:
        op = solvers.problems.diffusion_2d(
            jax.random.key(0), n, variance=VARIANCE, dtype=dtype
        )
        b = jnp.ones(n * n, dtype)
        noise = jax.random.normal(jax.random.key(5), (n * n,), dtype)
        for pname, factory in pre.items():
            m = factory(op)

            def cot(g, w, m=m):
                return solvers.cg(op, g, preconditioner=m, rtol=rtol, deflation=w)

            for k in ks:
                sol = solvers.cg(op, b, preconditioner=m, rtol=rtol, recycle=k)
                w = sol.ritz_vectors
                for gname, g in (("random", noise), ("smooth", b + 0.1 * noise)):
                    t0, plain = _timed(
                        jax.jit(lambda g: cot(g, None)), g, repeats=repeats
                    )
                    t1, defl = _timed(jax.jit(cot), g, w, repeats=repeats)
                    table.add(
                        n,
                        pname,
                        k,
                        int(sol.n_steps),
                        gname,
                        int(plain.n_steps),
                        int(defl.n_steps),
                        1e3 * t0,
                        1e3 * t1,
                        t1 / t0,
                    )
                    print("  " + " | ".join(map(str, table.rows[-1])), flush=True)
    table.notes += [
        "Reverse mode solves one cotangent system per `solvers.cg` call with the "
        "same operator; the forward solve's first 2k directions give poor Ritz "
        "vectors after a single solve (a sequence improves them system by "
        "system), so the deflated cotangent solve saves few steps.",
    ]
    return table
