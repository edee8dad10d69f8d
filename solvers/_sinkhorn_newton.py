"""Sinkhorn-Newton(-Sparse): Newton steps on the semi-dual with a sparsified Hessian."""

from __future__ import annotations

from typing import Literal

import jax
import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import ArrayLike, Float

from ._dual import safe_log
from ._geometry import AbstractGeometry, sum_devices, varying
from ._misc import pcg
from ._ot_problem import solve
from ._recycling import harmonic_ritz, prepare_deflation
from ._sinkhorn import marginal_errors
from ._solution import OTSolution
from ._sparse_k import check_concrete, sparse_k

_LINE_SEARCH_STEPS = 12
_ARMIJO = 1e-4
# sparse Hessian: reselect the pattern after this loss of kept mass; estimate the
# kept mass from about _SAMPLE_ROWS rows before a selection over all of them
_REFRESH_DROP = 0.02
_SAMPLE_ROWS = 128
_SAMPLE_SLACK = 0.01
# stop (result `stalled`) after this many Newton-phase steps at the final epsilon
# without halving the marginal error: the float32 floor at small epsilon
_STALL_STEPS = 50


def _dense_system(plan, r, col, rho):
    """S = diag(col) - P^T diag(1/r) P + rho I, matrix-free, and its diagonal."""

    def matvec(x):
        return col * x - plan.rmv(plan.mv(x) / r) + rho * x

    return matvec, col - plan.sq_rmv(1.0 / r) + rho


def _sparse_system(vals, idx, r, m, rho, axis_name=None):
    """The same for the plan's kept entries P~ (fixed-shape rows `vals` at columns
    `idx`): S~ = diag(P~^T (P~1 / r)) - P~^T diag(1/r) P~.

    S is the Laplacian of the graph on the columns with edge weights
    sum_i P_ij P_il / r_i; S~ is the Laplacian of the same graph with the dropped
    entries' edges removed. It keeps S's null vector 1 and its smooth modes (using
    the exact diagonal diag(P^T 1) instead adds the dropped mass as a diagonal,
    which overweights smooth modes: 51 instead of 20 Newton steps on the n = 4000,
    epsilon = 1e-3 benchmark problem with k = 64).
    """
    flat = idx.reshape(-1)

    def col_sums(w):  # sum_i w_ij over the kept entries, by scatter-add
        return sum_devices(
            jnp.zeros((m,), w.dtype).at[flat].add(w.reshape(-1)), axis_name
        )

    def pt(y):  # P~^T y
        return col_sums(vals * y[:, None])

    lap = pt(jnp.sum(vals, axis=1) / r)  # the subgraph Laplacian's degrees

    def matvec(x):
        return lap * x - pt(jnp.sum(vals * x[idx], axis=1) / r) + rho * x

    return matvec, lap - col_sums(vals**2 / r[:, None]) + rho


# per-row selection: a top-k over columns (float32 keys) from this many columns on,
# a threshold bisection below (measured on a CPU: top-k 0.14-0.9x the bisection's
# time at 4000 to 10^5 columns, 0.8-2.2x at 1000)
_TOPK_FROM = 2048


def _select_rows(p, k: int, method: str | None = None):
    """Per-row (near-)top-k of a nonnegative matrix, fixed shape (n, k).

    Returns values, column indices and the mask of used slots (unused ones: value
    0). Two methods, chosen by the number of columns m unless `method` is given:

    - `"topk"` (m > 2048): `lax.top_k` of the row scaled by its maximum, in
      float32 whatever `p`'s dtype (XLA's CPU top-k is a partial sort for float32
      and a full sort otherwise: 1.7 s instead of 47 ms per 1024 x 10^4 block);
      the values are then read from `p` in its own dtype. Exactly the k largest
      (up to float32 ties); slots whose value is 0 are unused.
    - `"bisect"`: a bisection on the log-gap below each row's maximum (12 passes,
      to within a factor e^(40/2^12)) finds the largest threshold with at most k
      entries above it; their columns are read off the row's running count of
      entries above the threshold by a binary search per slot (the running count is
      the expensive part at large m).
    """
    n, m = p.shape
    if method is None:
        method = "topk" if m > _TOPK_FROM else "bisect"
    if method == "topk":
        pmax = jnp.max(p, axis=1, keepdims=True)
        key = (p / jnp.where(pmax > 0, pmax, 1)).astype(jnp.float32)
        _, idx = lax.top_k(key, min(k, m))
        if k > m:  # (static) fewer columns than slots: pad with unused slots
            idx = jnp.pad(idx, ((0, 0), (0, k - m)), constant_values=m - 1)
        vals = jnp.take_along_axis(p, idx, axis=1)
        used = (vals > 0) & (jnp.arange(k) < m)
        return jnp.where(used, vals, 0), idx.astype(jnp.int32), used
    if method != "bisect":
        raise ValueError(f"_select_rows: unknown method {method!r}")
    iters, span = 12, 40.0
    pmax = jnp.max(p, axis=1, keepdims=True)

    def body(_, s):
        fits, over = s  # log-gaps with <= k and > k entries above the threshold
        mid = (fits + over) / 2
        small = jnp.sum(p >= pmax * jnp.exp(-mid), axis=1, keepdims=True) <= k
        return jnp.where(small, mid, fits), jnp.where(small, over, mid)

    s0 = (jnp.zeros_like(pmax), jnp.full_like(pmax, span))
    gap, _ = lax.fori_loop(0, iters, body, s0)
    count = jnp.cumsum(p >= pmax * jnp.exp(-gap), axis=1, dtype=jnp.int32)
    slots = jnp.arange(1, k + 1, dtype=jnp.int32)
    idx = jax.vmap(lambda row: jnp.searchsorted(row, slots, side="left"))(count)
    filled = idx < m
    idx = jnp.minimum(idx, m - 1).astype(jnp.int32)
    return jnp.where(filled, jnp.take_along_axis(p, idx, axis=1), 0), idx, filled


def _newton_cg(matvec, diag, rhs, eta, max_steps: int, w, recycle: int):
    """Jacobi-PCG for a Newton system to relative residual `eta`: `(delta, steps,
    w_new)`. With `recycle` > 0, deflated CG (`solvers.cg(..., deflation=)`) by the
    rows `w`, the harmonic Ritz vectors of the previous Newton system (zero rows:
    none yet), and `w_new` those of this one: the systems of successive Newton steps
    differ little, and their slow modes are what CG spends its late steps on. Costs
    one matvec with the `recycle` rows at once (a batched pass over the plan, skipped
    while `w` is zero) and O(m (recycle + window)^2) for the Ritz vectors.

    The true residual is not checked (`verify=False`): an inexact Newton step needs
    no particular accuracy (its convergence flag is not used), and the outer loop
    judges the iterate by its marginal errors, computed directly."""
    if not recycle:
        delta, its, _, _ = pcg(matvec, rhs, 1.0 / diag, eta, max_steps, verify=False)
        return delta, its, w

    deflation, _ = prepare_deflation(matvec, w)
    window = max(2 * recycle, 10)
    delta, its, _, recorded = pcg(
        matvec, rhs, 1.0 / diag, eta, max_steps, deflation, window, verify=False
    )

    def precond(r):
        return r / diag

    w_new, _ = harmonic_ritz(recorded, precond, recycle)
    return delta, its, w_new


def _newton_loop(
    kernel,
    a,
    b,
    eps,
    g0,
    *,
    tol,
    max_steps,
    eps_init,
    decay,
    threshold,
    hessian,
    k,
    kept_mass,
    cg_max_steps,
    recycle,
    cmax,
):
    del cmax  # (the stall rule here needs no level)
    log_a, log_b = safe_log(a), safe_log(b)
    ma, mb = kernel.mask_a, kernel.mask_b
    dtype = a.dtype
    n, m = kernel.geom.shape
    stage_tol = jnp.maximum(tol, 1e-3 * jnp.sum(b))
    g0 = jnp.zeros_like(b) if g0 is None else g0
    f0 = eps_init * log_a + kernel.f_hat(g0, eps_init)
    int0 = jnp.array(0)
    kk = min(k, m) if hessian == "sparse" else 0
    stride = max(1, n // _SAMPLE_ROWS)
    # sparse Hessian: the cached per-row index set, its used slots, the mass
    # fraction it kept when selected and the epsilon then (-1: none selected yet)
    # and the recycled Krylov basis of the Newton systems (`recycle` rows of length
    # m, zero rows: none yet)
    sel0 = (
        *varying(
            (jnp.zeros((n, kk), jnp.int32), jnp.zeros((n, kk), bool)), kernel.axis_name
        ),
        jnp.asarray(0.0, dtype),
        jnp.asarray(-1.0, dtype),
        jnp.zeros((recycle, m), dtype),
    )
    # stall guard: best error at the final epsilon, Newton-phase steps since it last
    # halved
    guard0 = (jnp.asarray(jnp.inf, dtype), int0)
    init = (f0, g0, eps_init, int0, int0, int0, jnp.array(False), sel0, guard0)
    roundoff = 10 * jnp.finfo(dtype).eps
    m_kept = jnp.sum(mb).astype(dtype)

    def cond(state):
        *_, steps, _, _, done, _, (_, since) = state
        return ~done & (steps < max_steps) & (since < _STALL_STEPS)

    def body(state):
        f, g, e, steps, n_newton, n_cg, _, sel, (best, since) = state
        plan = kernel.plan(f, g, e)
        r, col = plan.marginals()
        err = jnp.sum(jnp.abs(col - b))
        final = e <= eps
        done = (final & (err <= tol)) | ~jnp.isfinite(err)
        stage = ~final & (err <= stage_tol)
        e_next = jnp.where(stage, jnp.maximum(eps, e * decay), e)
        use_newton = (err <= threshold) & ~done & ~stage
        reset = ~final | (err <= 0.5 * best)
        guard = (
            jnp.where(reset, err, best),
            jnp.where(reset, 0, since + use_newton.astype(since.dtype)),
        )

        def sinkhorn_step():
            g_new = e * log_b + kernel.g_hat(f, e)
            return (
                e_next * log_a + kernel.f_hat(g_new, e_next),
                g_new,
                int0,
                int0,
                sel,
            )

        def newton_step():
            # zero-weight rows and columns: r = 1 keeps the divisions finite (their
            # plan entries are 0), the step leaves their potentials alone
            r_safe = jnp.where(ma, r, 1)
            rho = jnp.sum(b) / m_kept * jnp.minimum(err, 1.0)
            rhs = jnp.where(mb, e * (b - col), 0)
            rhs = jnp.where(mb, rhs - jnp.sum(rhs) / m_kept, 0)
            eta = jnp.minimum(0.1, jnp.sqrt(err))

            w = sel[4]

            def solve_dense():
                matvec, diag = _dense_system(plan, r_safe, col, rho)
                return _newton_cg(matvec, diag, rhs, eta, cg_max_steps, w, recycle)

            if hessian == "dense":
                delta, its, w_new = solve_dense()
                sel_new = (*sel[:4], w_new)
            else:
                # Reuse the cached index set while it keeps its mass (the plan's
                # support moves little between Newton steps); select anew (a
                # top-k over the whole plan, the expensive part) when not.
                idx, used, kept_ref, e_ref, _ = sel
                total = kernel.rsum(r)
                vals = jnp.where(used, plan.take(idx), 0)
                kept = kernel.rsum(vals) / total
                stale = (kept < kept_ref - _REFRESH_DROP) | (
                    (e != e_ref) & (kept < kept_mass)
                )

                def select():
                    v, i, u = plan.select(kk, _select_rows)
                    kept_new = kernel.rsum(v) / total
                    return v, i, u, kept_new, kept_new, e

                def skip():  # too little mass: no retry before e changes
                    return vals, idx, used, kept, kept, e

                def try_select():
                    if stride == 1:
                        return select()
                    # a sample of rows first tells whether k per row can be enough
                    v, _, _ = plan.rows(stride).select(kk, _select_rows)
                    est = kernel.rsum(v) / kernel.rsum(r[::stride])
                    return lax.cond(est >= kept_mass - _SAMPLE_SLACK, select, skip)

                vals, idx, used, kept, kept_ref, e_ref = lax.cond(
                    stale,
                    try_select,
                    lambda: (vals, idx, used, kept, kept_ref, e_ref),
                )

                def solve_sparse():
                    matvec, diag = _sparse_system(
                        vals, idx, r_safe, m, rho, kernel.axis_name
                    )
                    return _newton_cg(matvec, diag, rhs, eta, cg_max_steps, w, recycle)

                delta, its, w_new = lax.cond(
                    kept >= kept_mass, solve_sparse, solve_dense
                )
                sel_new = (idx, used, kept_ref, e_ref, w_new)

            # Armijo backtracking on the concave semi-dual
            # phi(g) = <g, b> + <a, f_hat(g)>, whose gradient is b - col.
            slope = jnp.vdot(b - col, delta)
            fh0 = f - e * log_a
            phi0 = jnp.vdot(g, b) + kernel.rdot(a, fh0)
            slack = roundoff * (jnp.abs(jnp.vdot(g, b)) + jnp.abs(kernel.rdot(a, fh0)))

            def ls_cond(s):
                _, _, ok, i = s
                return ~ok & (i < _LINE_SEARCH_STEPS)

            def ls_body(s):
                t, _, _, i = s
                t = t / 2
                fh = kernel.f_hat(g + t * delta, e)
                phi = jnp.vdot(g + t * delta, b) + kernel.rdot(a, fh)
                ok = (phi >= phi0 + _ARMIJO * t * slope - slack) & (slope > 0)
                return t, fh, ok, i + 1

            t, fh, ok, _ = lax.while_loop(
                ls_cond, ls_body, (jnp.asarray(2.0, dtype), fh0, False, int0)
            )

            def accept():
                return e * log_a + fh, g + t * delta, jnp.array(1), its, sel_new

            def reject():  # line search failed: fall back to a Sinkhorn step
                f_s, g_s, _, _, _ = sinkhorn_step()
                return f_s, g_s, int0, its, sel_new

            return lax.cond(ok, accept, reject)

        f_new, g_new, newton, its, sel = lax.cond(
            use_newton, newton_step, sinkhorn_step
        )
        keep = lambda old, new: jnp.where(done, old, new)  # noqa: E731
        return (
            keep(f, f_new),
            keep(g, g_new),
            keep(e, e_next),
            steps + keep(0, 1),
            n_newton + newton,
            n_cg + its,
            done,
            sel,
            guard,
        )

    f, g, e, steps, n_newton, n_cg, _, _, (_, since) = lax.while_loop(cond, body, init)
    # zero-weight columns: their potential is the c-transform of f
    g = lax.cond(jnp.all(mb), lambda: g, lambda: jnp.where(mb, g, kernel.g_hat(f, eps)))
    error = marginal_errors(kernel, f, g, a, b, eps)
    error = jnp.where(e <= eps, error, jnp.inf)
    return f, g, (steps, n_newton, n_cg, error, since >= _STALL_STEPS)


def sinkhorn_newton(
    geom: AbstractGeometry | Float[ArrayLike, "n m"],
    a: Float[ArrayLike, " n"] | None = None,
    b: Float[ArrayLike, " m"] | None = None,
    *,
    epsilon: float | Float[ArrayLike, ""] | None = None,
    tol: float | None = None,
    max_steps: int = 2_000,
    epsilon_schedule: None | Literal["auto"] | tuple[float, float] = "auto",
    hessian: Literal["dense", "sparse"] = "dense",
    k: int | Literal["auto"] = 64,
    kept_mass: float = 0.99,
    newton_threshold: float = 1.0,
    cg_max_steps: int = 200,
    recycle: int = 0,
    init: tuple[Float[ArrayLike, " n"], Float[ArrayLike, " m"]] | None = None,
    throw: bool = True,
) -> OTSolution:
    """Entropic optimal transport by Sinkhorn-Newton(-Sparse).

    Same problem, potentials and result as [`solvers.sinkhorn`][]. After each exact
    f-update ($P1 = a$) the semi-dual $\\varphi(g) = \\langle g, b\\rangle +
    \\langle a, \\hat f(g)\\rangle$ is concave with gradient $b - P^T 1$ and Hessian
    $-S/\\varepsilon$, $S = \\mathrm{diag}(P^T 1) - P^T \\mathrm{diag}(1/P1)\\, P$
    (the Schur complement of the full dual Hessian). A Newton step solves

    $$(S + \\rho I)\\,\\delta = \\varepsilon\\,(b - P^T 1), \\qquad \\rho =
    \\bar b\\,\\min(1, \\|P^T1 - b\\|_1)$$

    by Jacobi-preconditioned CG to relative tolerance $\\min(0.1,
    \\|P^T1-b\\|_1^{1/2})$ (inexact Newton; the gauge direction $1$ is projected out of
    the right-hand side, the small shift $\\rho$ is the SSNS-style regularisation),
    then Armijo backtracking on $\\varphi$. Improvements over Tang et al. (ICLR 2024):

    - an adaptive switch: Sinkhorn steps while the L1 marginal error exceeds
        `newton_threshold`, Newton afterwards, and a Sinkhorn step whenever the line
        search fails (12 halvings);
    - `hessian="sparse"`: $P$ replaced by (about) its `k` largest entries per row
        (fixed shape, jit/vmap-safe, gather and scatter-add products), and $S$ by
        the Laplacian of what they keep ($S$ is a graph Laplacian on the columns;
        dropping entries removes edges, so the gauge null vector and the smooth
        modes are kept); when these keep less than `kept_mass` of the plan's mass
        the step uses the dense Hessian instead (the paper's global top-2n rule
        keeps too little mass on 2-D point clouds). The entries are selected per
        row (a float32 `lax.top_k` from 2049 columns on, a 12-pass threshold
        bisection below, whichever was faster on a CPU), and the selection is
        reused across Newton steps and epsilon stages until it loses 2% of its
        mass; a sample of 128 rows first checks whether `k` per row can reach
        `kept_mass`. Then a Newton step
        costs the passes over $C$ that form $P$ and test the step, plus $O(nk)$
        per CG step instead of two dense products: 1.6x
        ($\\varepsilon = 10^{-3}$) and 4x ($10^{-4}$) faster than `"dense"` at
        n = 4000 on a CPU (benchmark tables in `benchmarks/RESULTS.md`). Raise `k`
        when $n\\varepsilon$ grows (more entries per row matter). Under `jax.vmap`
        the branches (select or reuse, sparse or dense) all run, so batches are
        faster with `"dense"`;
    - `hessian="dense"` (default): matrix-free products with the dense plan, the GPU
        choice (two matrix-vector products per CG step);
    - epsilon continuation (`epsilon_schedule="auto"` by default), so that
        $\\varepsilon = 10^{-4}$ on costs of scale 1 converges.

    **Arguments:**

    - `geom`, `a`, `b`, `epsilon`, `tol`, `init`, `throw`: as for
        [`solvers.sinkhorn`][] (an online [`solvers.PointCloud`][] with `batch_size`
        never stores the $n \\times m$ cost; rows sharded with `axis_name` inside
        `jax.shard_map` solve the same problem on several devices).
    - `max_steps`: limit on Sinkhorn plus Newton steps (default 2,000).
    - `epsilon_schedule`: `"auto"` (default; start at $0.05\\max|C|$ and divide by 4
        whenever the marginal error drops below 1e-3), `None`, or
        `(epsilon_init, decay)`.
    - `hessian`, `k` (default 64), `kept_mass` (default 0.99; at 0.9 the step can
        stall on smooth modes): see above (static). `k="auto"` is
        `max(64, solvers.sparse_k(...))` ([`solvers.sparse_k`][]: the kept mass of
        the kernel's rows at the final epsilon, on a sample of rows; never below 64,
        since the continuation's earlier epsilons need more): concrete inputs only
        (a `TypeError` under `jax.jit`/`vmap`/`grad`: call `sparse_k` outside and
        pass the int). A
        larger `k` pays only where the CG solves dominate (many CG steps: small
        epsilon, float64 tolerances); at $n = 10^4$, $\varepsilon = 10^{-3}$,
        float32, tol $10^{-5}$ the CG solves take 1-31 steps, the passes that form
        the plan dominate, and `k = 256` (which keeps the mass) is as fast as the
        dense Hessian.
    - `newton_threshold`: L1 marginal error below which Newton steps are taken.
    - `cg_max_steps`: CG iterations per Newton step (static).
    - `recycle`: 0 (default) or the number $k$ of vectors recycled from one Newton
        system to the next (static): each step's CG is deflated by the previous
        step's $k$ harmonic Ritz vectors (the slow modes of $S$, which change
        little between steps), as `solvers.cg(..., deflation=, recycle=)` does for
        sequences. Costs one matvec with the $k$ vectors together per step (a
        batched pass over the plan) and $O(m (k + w)^2)$ for the Ritz vectors
        ($w = \\max(2k, 10)$ recorded directions). Measured ($\\varepsilon =
        10^{-3}$, 2-core CPU): $k = 8$ halves the CG iterations; the time is
        0.74-0.92x with the dense Hessian at $n = 4000$ (float64 dense, float32
        online), unchanged with the sparse Hessian and 1.1-1.7x at $n = 1000$
        (overhead), hence off by default (`benchmarks/RESULTS.md`). The total is
        in `OTSolution.n_cg_steps`.

    **Returns:** an [`solvers.OTSolution`][] (`n_newton_steps` counts the Newton
    steps).

    **Failure modes:** as [`solvers.sinkhorn`][]. Float32 has an accuracy floor at
    small $\\varepsilon$: each plan entry carries a relative rounding error of about
    $6 \\cdot 10^{-8} \\max|C| / \\varepsilon$ from the potentials inside the
    exponential (the exact solution of a 1000-point problem rounded to float32 has L1
    marginal error $3.8 \\cdot 10^{-7}$ at $\\varepsilon = 10^{-3}$ and
    $4.2 \\cdot 10^{-6}$ at $10^{-4}$); a `tol` below the floor ends with result
    `stalled` once 50 Newton steps at the final $\\varepsilon$ have not halved the
    marginal error (instead of running to `max_steps`): use float64 there.

    **Derivatives:** implicit, exactly as for [`solvers.sinkhorn`][] (the
    derivative does not depend on the solver); forward and reverse mode, any order.
    There is no unrolled mode.

    **Example:**

    ```python
    import jax
    import solvers

    x = jax.random.uniform(jax.random.key(0), (300, 2))
    y = jax.random.uniform(jax.random.key(1), (300, 2))
    out = solvers.sinkhorn_newton(solvers.PointCloud(x, y), epsilon=1e-3, tol=1e-5)
    print(out.n_steps, out.n_newton_steps, out.error)
    ```

    Reference: Tang, Shavlovsky, Rahmanian, Tardini, Thekumparampil, Xiao, Ying,
    "Accelerating Sinkhorn algorithm with sparse Newton iterations", ICLR 2024;
    Brauer, Clason, Lorenz, Wirth, "A Sinkhorn-Newton method for entropic optimal
    transport", 2017.
    """
    fn = "sinkhorn_newton"
    for name, v in (("max_steps", max_steps), ("cg_max_steps", cg_max_steps)):
        if not (isinstance(v, int) and v > 0):
            raise ValueError(f"{fn}: {name} must be a positive int; got {v}.")
    if isinstance(recycle, bool) or not (isinstance(recycle, int) and recycle >= 0):
        raise ValueError(f"{fn}: recycle must be a non-negative int; got {recycle!r}.")
    if hessian not in ("dense", "sparse"):
        raise ValueError(f"{fn}: hessian must be 'dense' or 'sparse'; got {hessian!r}.")
    if k != "auto" and (isinstance(k, bool) or not (isinstance(k, int) and 1 <= k)):
        raise ValueError(f"{fn}: k must be a positive int or 'auto'; got {k!r}.")
    if not 0.0 < kept_mass <= 1.0:
        raise ValueError(f"{fn}: kept_mass must be in (0, 1]; got {kept_mass}.")
    if k == "auto":
        if hessian == "sparse":
            check_concrete((geom, a, b, epsilon), f"{fn}(k='auto')")
            # never below the default: the continuation's earlier, larger epsilons
            # need more entries than the final one (k = 16 for epsilon 1e-4 at
            # n = 4000 made their steps dense: 14% slower than k = 64)
            k = max(64, sparse_k(geom, a, b, epsilon=epsilon, kept_mass=kept_mass))
        else:
            k = 1  # unused by the dense Hessian
    return solve(
        _newton_loop,
        geom,
        a,
        b,
        epsilon,
        tol,
        epsilon_schedule,
        throw,
        fn,
        init=init,
        max_steps=max_steps,
        threshold=newton_threshold,
        hessian=hessian,
        k=k,
        kept_mass=kept_mass,
        cg_max_steps=cg_max_steps,
        recycle=recycle,
    )
