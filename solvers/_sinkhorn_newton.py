"""Sinkhorn-Newton(-Sparse): Newton steps on the semi-dual with a sparsified Hessian."""

from __future__ import annotations

from typing import Literal

import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import ArrayLike, Float

from jaxdecomp._misc import mm

from ._dual import f_hat, g_hat, log_plan
from ._geometry import AbstractGeometry
from ._misc import pcg
from ._ot_problem import solve
from ._solution import OTSolution

_LINE_SEARCH_STEPS = 12
_ARMIJO = 1e-4


def _dense_system(p, r, col, rho):
    """S = diag(col) - P^T diag(1/r) P + rho I, matrix-free, and its diagonal."""

    def matvec(x):
        return col * x - mm(p.T, mm(p, x) / r) + rho * x

    return matvec, col - mm((p * p).T, 1.0 / r) + rho


def _sparse_system(vals, idx, r, col, rho):
    """The same with P replaced by its per-row top-k entries (exact diagonal)."""
    m = col.shape[0]
    flat = idx.reshape(-1)

    def pt(y):  # P~^T y by scatter-add
        return jnp.zeros((m,), y.dtype).at[flat].add((vals * y[:, None]).reshape(-1))

    def matvec(x):
        return col * x - pt(jnp.sum(vals * x[idx], axis=1) / r) + rho * x

    diag = col - jnp.zeros((m,), r.dtype).at[flat].add((vals**2 / r[:, None]).ravel())
    return matvec, diag + rho


def _newton_loop(
    c,
    a,
    b,
    eps,
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
):
    log_a, log_b = jnp.log(a), jnp.log(b)
    stage_tol = jnp.maximum(tol, 1e-3 * jnp.sum(b))
    g0 = jnp.zeros_like(b)
    f0 = eps_init * log_a + f_hat(g0, c, eps_init)
    int0 = jnp.array(0)
    init = (f0, g0, eps_init, int0, int0, int0, jnp.array(False))
    roundoff = 10 * jnp.finfo(c.dtype).eps

    def cond(state):
        *_, steps, _, _, done = state
        return ~done & (steps < max_steps)

    def body(state):
        f, g, e, steps, n_newton, n_cg, _ = state
        p = jnp.exp(log_plan(f, g, c, e))
        r = jnp.sum(p, axis=1)
        col = jnp.sum(p, axis=0)
        err = jnp.sum(jnp.abs(col - b))
        final = e <= eps
        done = (final & (err <= tol)) | ~jnp.isfinite(err)
        stage = ~final & (err <= stage_tol)
        e_next = jnp.where(stage, jnp.maximum(eps, e * decay), e)
        use_newton = (err <= threshold) & ~done & ~stage

        def sinkhorn_step():
            g_new = e * log_b + g_hat(f, c, e)
            return e_next * log_a + f_hat(g_new, c, e_next), g_new, int0, int0

        def newton_step():
            rho = jnp.mean(b) * jnp.minimum(err, 1.0)
            rhs = e * (b - col)
            rhs = rhs - jnp.mean(rhs)
            eta = jnp.minimum(0.1, jnp.sqrt(err))

            def solve_dense():
                matvec, diag = _dense_system(p, r, col, rho)
                return pcg(matvec, rhs, 1.0 / diag, eta, cg_max_steps)

            if hessian == "dense":
                delta, its = solve_dense()
            else:
                vals, idx = lax.top_k(p, min(k, p.shape[1]))

                def solve_sparse():
                    matvec, diag = _sparse_system(vals, idx, r, col, rho)
                    return pcg(matvec, rhs, 1.0 / diag, eta, cg_max_steps)

                kept = jnp.sum(vals) / jnp.sum(p)
                delta, its = lax.cond(kept >= kept_mass, solve_sparse, solve_dense)

            # Armijo backtracking on the concave semi-dual
            # phi(g) = <g, b> + <a, f_hat(g)>, whose gradient is b - col.
            slope = jnp.vdot(b - col, delta)
            fh0 = f - e * log_a
            phi0 = jnp.vdot(g, b) + jnp.vdot(a, fh0)
            slack = roundoff * (jnp.abs(jnp.vdot(g, b)) + jnp.abs(jnp.vdot(a, fh0)))

            def ls_cond(s):
                _, _, ok, i = s
                return ~ok & (i < _LINE_SEARCH_STEPS)

            def ls_body(s):
                t, _, _, i = s
                t = t / 2
                fh = f_hat(g + t * delta, c, e)
                phi = jnp.vdot(g + t * delta, b) + jnp.vdot(a, fh)
                ok = (phi >= phi0 + _ARMIJO * t * slope - slack) & (slope > 0)
                return t, fh, ok, i + 1

            t, fh, ok, _ = lax.while_loop(
                ls_cond, ls_body, (jnp.asarray(2.0, c.dtype), fh0, False, int0)
            )

            def accept():
                return e * log_a + fh, g + t * delta, jnp.array(1), its

            def reject():  # line search failed: fall back to a Sinkhorn step
                f_s, g_s, _, _ = sinkhorn_step()
                return f_s, g_s, int0, its

            return lax.cond(ok, accept, reject)

        f_new, g_new, newton, its = lax.cond(use_newton, newton_step, sinkhorn_step)
        keep = lambda old, new: jnp.where(done, old, new)  # noqa: E731
        return (
            keep(f, f_new),
            keep(g, g_new),
            keep(e, e_next),
            steps + keep(0, 1),
            n_newton + newton,
            n_cg + its,
            done,
        )

    f, g, e, steps, n_newton, _, _ = lax.while_loop(cond, body, init)
    p = jnp.exp(log_plan(f, g, c, eps))
    error = jnp.stack(
        [
            jnp.sum(jnp.abs(jnp.sum(p, axis=1) - a)),
            jnp.sum(jnp.abs(jnp.sum(p, axis=0) - b)),
        ]
    )
    error = jnp.where(e <= eps, error, jnp.inf)
    return f, g, (steps, n_newton, error)


def sinkhorn_newton(
    geom: AbstractGeometry | Float[ArrayLike, "n m"],
    a: Float[ArrayLike, " n"] | None = None,
    b: Float[ArrayLike, " m"] | None = None,
    *,
    epsilon: float | Float[ArrayLike, ""],
    tol: float | None = None,
    max_steps: int = 2_000,
    epsilon_schedule: None | Literal["auto"] | tuple[float, float] = "auto",
    hessian: Literal["dense", "sparse"] = "dense",
    k: int = 16,
    kept_mass: float = 0.9,
    newton_threshold: float = 1.0,
    cg_max_steps: int = 200,
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
    - `hessian="sparse"`: $P$ replaced by its `k` largest entries per row (fixed
        shape, jit/vmap-safe, scatter-add products) with the exact diagonal
        $\\mathrm{diag}(P^T 1)$; when these keep less than `kept_mass` of the plan's
        mass the step uses the dense Hessian instead (the paper's global top-2n rule
        keeps too little mass on 2-D point clouds);
    - `hessian="dense"` (default): matrix-free products with the dense plan, the GPU
        choice (two matrix-vector products per CG step);
    - epsilon continuation (`epsilon_schedule="auto"` by default), so that
        $\\varepsilon = 10^{-4}$ on costs of scale 1 converges.

    **Arguments:**

    - `geom`, `a`, `b`, `epsilon`, `tol`, `throw`: as for [`solvers.sinkhorn`][].
    - `max_steps`: limit on Sinkhorn plus Newton steps (default 2,000).
    - `epsilon_schedule`: `"auto"` (default; start at $0.05\\max|C|$ and divide by 4
        whenever the marginal error drops below 1e-3), `None`, or
        `(epsilon_init, decay)`.
    - `hessian`, `k`, `kept_mass`: see above (static).
    - `newton_threshold`: L1 marginal error below which Newton steps are taken.
    - `cg_max_steps`: CG iterations per Newton step (static).

    **Returns:** an [`solvers.OTSolution`][] (`n_newton_steps` counts the Newton
    steps).

    **Failure modes:** as [`solvers.sinkhorn`][]. Float32 has an accuracy floor at
    small $\\varepsilon$: each plan entry carries a relative rounding error of about
    $6 \\cdot 10^{-8} \\max|C| / \\varepsilon$ from the potentials inside the
    exponential (the exact solution of a 1000-point problem rounded to float32 has L1
    marginal error $3.8 \\cdot 10^{-7}$ at $\\varepsilon = 10^{-3}$ and
    $4.2 \\cdot 10^{-6}$ at $10^{-4}$); a `tol` below the floor ends in
    `max_steps_reached`: use float64.

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
    if hessian not in ("dense", "sparse"):
        raise ValueError(f"{fn}: hessian must be 'dense' or 'sparse'; got {hessian!r}.")
    if not (isinstance(k, int) and 1 <= k):
        raise ValueError(f"{fn}: k must be a positive int; got {k}.")
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
        max_steps=max_steps,
        threshold=newton_threshold,
        hessian=hessian,
        k=k,
        kept_mass=kept_mass,
        cg_max_steps=cg_max_steps,
    )
