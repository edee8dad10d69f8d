"""(Flexible) preconditioned conjugate gradients with residual history."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import lineax as lx
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from jaxdecomp._cg_loop import scaled_cg_loop
from jaxdecomp._misc import default_tol, mm, stop_gradient_arrays

from ._recycling import basis_independent, harmonic_ritz, prepare_deflation
from ._solution import RESULTS

_DERIVATIVE_FAILED = (
    "cg: a derivative solve (the tangent or cotangent system A dx = rhs of the "
    "implicit derivative) did not converge within max_steps, or its true residual "
    "||rhs - A dx|| stopped above the tolerance (below what the dtype attains), so "
    "the derivative would be wrong. Raise max_steps, use a better preconditioner, a "
    "looser rtol or float64, or check that the operator is symmetric positive "
    "definite."
)


def _symmetry_probe(matvec, b) -> Array:
    """Whether u^T (A v) = v^T (A u) for two fixed pseudo-random vectors, to within
    sqrt(eps) (||u|| ||A v|| + ||v|| ||A u||): two matvecs that catch an operator that
    is not symmetric, for which CG's answer (and the transposed solves of its
    reverse-mode derivative) would be wrong."""
    n = b.shape[0]
    key_u, key_v = jax.random.split(jax.random.key(0))
    u = jax.random.normal(key_u, (n,), b.dtype)
    v = jax.random.normal(key_v, (n,), b.dtype)
    av, au = lax.stop_gradient(matvec(v)), lax.stop_gradient(matvec(u))
    gap = jnp.abs(jnp.vdot(u, av) - jnp.vdot(v, au))
    scale = jnp.linalg.norm(u) * jnp.linalg.norm(av) + jnp.linalg.norm(v) * (
        jnp.linalg.norm(au)
    )
    # NaN from a broken operator is reported by the solve itself, not as asymmetry
    return ~(gap > default_tol(b.dtype, 0.5) * scale)


@eqx.filter_custom_jvp
def _implicit_cg(op, b, x0, precond, deflation, *, opts, throw):
    """CG from x0 with the implicit derivative dx = A^{-1}(db - dA x): every tangent
    and cotangent is a CG solve of its own, from 0 (deflated by the same basis as
    the primal solve), checked for convergence (an error, or NaN with throw=False,
    never a silently wrong derivative). The deflation basis and the recorded
    directions are constants for differentiation."""
    return scaled_cg_loop(
        stop_gradient_arrays(op),
        precond,
        b,
        x0,
        unroll=False,
        deflation=deflation,
        **opts,
    )


@_implicit_cg.def_jvp
def _implicit_cg_jvp(primals, tangents, *, opts, throw):
    op, b, x0, precond, deflation = primals
    t_op, t_b, _, _, _ = tangents
    out = _implicit_cg(op, b, x0, precond, deflation, opts=opts, throw=throw)
    x = out[0]
    # rhs = db - dA x, with dA x the tangent of A x in the operator's arrays (None
    # tangents: constants)
    _, dax = eqx.filter_jvp(lambda op: op(x), (op,), (t_op,))
    dax = jnp.zeros_like(x) if dax is None else dax
    rhs = -dax if t_b is None else t_b - dax
    tangent_opts = dict(opts, window=0)

    def solve(matvec, rhs):
        y, (_, _, converged, _, _), _ = scaled_cg_loop(
            matvec,
            precond,
            rhs,
            jnp.zeros_like(rhs),
            unroll=False,
            deflation=deflation,
            **tangent_opts,
        )
        if throw:
            return eqx.error_if(y, ~converged, _DERIVATIVE_FAILED)
        return jnp.where(converged, y, jnp.nan)

    # differentiable in `op` too (second-order derivatives)
    dx = lax.custom_linear_solve(op, rhs, solve, symmetric=True)
    k, norms, converged, rnorm, inaccurate = out[1]
    t_aux = (
        np.zeros(k.shape, jax.dtypes.float0),
        jnp.zeros_like(norms),
        np.zeros(converged.shape, jax.dtypes.float0),
        jnp.zeros_like(rnorm),
        np.zeros(inaccurate.shape, jax.dtypes.float0),
    )
    t_rec = jax.tree_util.tree_map(jnp.zeros_like, out[2])
    return out, (dx, t_aux, t_rec)


class CGSolution(eqx.Module):
    """The result of [`solvers.cg`][].

    - `x`: the (approximate) solution.
    - `n_steps`: CG iterations taken.
    - `residual_norms`: $\\|r_k\\|_2$ for $k = 0, \\ldots,$ `max_steps`
        (recursively updated residuals, except that the entry at `n_steps`, and
        at each step where the true residual was checked, is the true residual
        $\\|b - Ax_k\\|_2$; entries after `n_steps` are NaN).
    - `converged`: whether the true residual $\\|b - Ax\\|_2 \\le
        \\max(\\text{rtol}\\,\\|b\\|_2, \\text{atol})$ (in fixed-step mode:
        the steps ran without breakdown).
    - `result`: a [`solvers.RESULTS`][] code.
    - `ritz_vectors`: with `recycle=k` (or a `deflation` basis), `(n, k)` harmonic
        Ritz vectors of the preconditioned operator with the smallest harmonic Ritz
        values, from the deflation basis and the solve's first search directions:
        pass them as `deflation=` to the next, related system (unit columns; a zero
        column where fewer than k directions were available). `None` otherwise.
    - `ritz_values`: their harmonic Ritz values, approximations from above of the
        smallest eigenvalues of $M^{-1}A$ (inf for a zero column), or `None`.

    `ritz_vectors` and `ritz_values` are constants for differentiation.
    """

    x: Float[Array, " n"]
    n_steps: Int[Array, ""]
    residual_norms: Float[Array, " max_steps_plus_1"]
    converged: Bool[Array, ""]
    result: RESULTS
    ritz_vectors: Float[Array, "n k"] | None = None
    ritz_values: Float[Array, " k"] | None = None


def as_matvec(operator, name: str, what: str) -> Callable[[Array], Array]:
    """A matvec from a matrix, a lineax operator or a callable."""
    if isinstance(operator, lx.AbstractLinearOperator) or (
        hasattr(operator, "mv") and not hasattr(operator, "shape")
    ):
        return operator.mv
    if callable(operator):
        return operator
    arr = jnp.asarray(operator)
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1]:
        raise ValueError(
            f"{name}: {what} must be a square matrix, a lineax operator or a callable; "
            f"got an array of shape {arr.shape}."
        )
    return lambda x: mm(arr, x)


def as_preconditioner(preconditioner, name: str, what: str):
    """`r -> M^{-1} r` from None (the identity), a matrix, a lineax operator or a
    callable."""
    if preconditioner is None:
        return lambda r: r
    return as_matvec(preconditioner, name, what)


def cg(
    operator: Float[ArrayLike, "n n"] | lx.AbstractLinearOperator | Callable,
    b: Float[ArrayLike, " n"],
    *,
    preconditioner: Any = None,
    x0: Float[ArrayLike, " n"] | None = None,
    rtol: float | None = None,
    atol: float = 0.0,
    max_steps: int | None = None,
    flexible: bool = False,
    memory: int = 5,
    deflation: Float[ArrayLike, "n k"] | None = None,
    recycle: int | None = None,
    window: int | None = None,
    differentiation: Literal["implicit", "unroll"] = "implicit",
    throw: bool = True,
) -> CGSolution:
    """Solve $Ax = b$ for symmetric positive definite $A$ by preconditioned conjugate
    gradients.

    With $z_k = M^{-1} r_k$: $\\alpha_k = r_k^T z_k / p_k^T A p_k$,
    $x_{k+1} = x_k + \\alpha_k p_k$, $r_{k+1} = r_k - \\alpha_k A p_k$,
    $p_{k+1} = z_{k+1} + \\beta_k p_k$ with $\\beta_k = r_{k+1}^T z_{k+1} / r_k^T
    z_k$. With `flexible=True` (for preconditioners that change between iterations
    or are nonlinear, e.g. a neural network): Notay's flexible CG, FCG($m$), which
    A-orthogonalises each new direction against the last $m$ = `memory` ones,
    $p_{k+1} = z_{k+1} - \\sum_{j} \\frac{z_{k+1}^T A p_j}{p_j^T A p_j} p_j$,
    with $\\alpha_k = p_k^T r_k / p_k^T A p_k$ (for a fixed SPD preconditioner this
    is plain PCG in exact arithmetic). Kaneda et al.'s DCDM is the case $m = 2$.

    **Stopping rule** (one rule, used in every benchmark): stop when
    $\\|r_k\\|_2 \\le \\max(\\text{rtol}\\,\\|b\\|_2,\\ \\text{atol})$ for the
    true residual $r_k = b - Ax_k$. The iteration updates $r_k$ recursively, which
    in floating point drifts away from $b - Ax_k$ (in float32 it can fall far
    below it: on a 64 x 64 diffusion field the iteration alone reports the
    default 3.5e-4 met where the true residual is 2.1e-3); so when the recursive
    residual meets the tolerance, one matvec computes the true one. If that misses
    the tolerance, the residual is replaced by the true one and CG restarts from
    $x_k$ (to half the tolerance in the recursive residual); if a check is
    not 10% below the previous one (8 checks at most), the tolerance is below what
    the dtype attains for this system, about
    $\\varepsilon\\,\\|A\\|\\,\\|x\\|$, and the result is `inaccurate`. Checks
    do not count in `n_steps`; they cost a matvec and a preconditioner application
    each (one in a solve that converges cleanly). The same rule judges the
    derivative solves.

    **Arguments:**

    - `operator`: an `(n, n)` matrix (products at HIGHEST precision), a lineax linear
        operator, or a matvec callable `x -> A x`.
    - `b`: the right-hand side, shape `(n,)`; its dtype is the solution's dtype.
    - `preconditioner`: `None`, a matrix $M^{-1}$, a lineax operator or a callable
        `r -> M^{-1} r` (SPD for plain CG).
    - `x0`: initial guess (default 0).
    - `rtol`: relative tolerance (default $\\sqrt{\\text{eps}}$ of the dtype); `atol`:
        absolute tolerance (default 0).
    - `max_steps`: iteration limit (default $10 n$; static: it sizes the residual
        history buffer). **Fixed-step mode** (lineax's convention): with
        `rtol=0, atol=0` (Python zeros) and `max_steps=k`, exactly $k$ steps are
        run (fewer only on an exactly zero residual) and the iterate is returned
        with result `successful`: a fixed-cost approximate solve, e.g. inside a
        training loop. Breakdown and non-finite values are still reported. Its
        `"implicit"` derivative solves the tangent systems with $k$ steps as
        well (an approximate $A^{-1}$, as lineax does), which is not the exact
        derivative of the truncated iterate; `differentiation="unroll"` gives
        that. `rtol = atol = 0` without `max_steps` is a `ValueError`.
    - `flexible`: flexible CG, FCG(`memory`).
    - `memory`: directions kept for A-orthogonalisation in flexible CG (default 5;
        static; costs `2 memory` vectors of storage and `memory` dot products and
        updates per step). More memory helps strongly nonlinear preconditioners:
        the trained `NeuralInverse` needs 432, 226, 134, 94 iterations with 1, 2, 5,
        10 (Jacobi: 282; the Polak–Ribière variant used before: 506).
    - `deflation`: an `(n, k)` basis $W$ of slow modes (e.g. the previous system's
        `ritz_vectors`): deflated CG (Saad, Yeung, Erhel & Guyomarc'h 2000). $W$ is
        made A-orthonormal ($k$ matvecs, $O(nk^2)$), the initial guess is corrected,
        $x_0 \\leftarrow x_0 + W (W^TAW)^{-1} W^T r_0$, and every direction is
        A-orthogonalised against $W$, $p \\leftarrow p - W(W^TAW)^{-1}(AW)^T z$,
        so CG runs on the complement of span($W$); each step also removes the
        residual's rounding-level component in span($W$) (without it, float32
        deflated CG diverged; in float64 it runs every 4th step). $4k$ more dot
        products and updates per step in float32, $2.5k$ in float64, no extra
        matvec. Works with every preconditioner and
        with `flexible=True`. The solution does not depend on $W$ (a constant for
        differentiation); the derivative solves reuse it. A non-finite or
        (numerically) rank-deficient $W$ is `invalid_deflation`.
    - `recycle`: how many harmonic Ritz vectors to return in `ritz_vectors`
        (static; default: $k$ with `deflation`, none without).
    - `window`: how many of the solve's first search directions are recorded for
        the Ritz extraction (static; default `max(2 recycle, 10)`; costs
        `3 window` vectors of storage, and after the solve $O(n(k +
        \text{window})^2)$ work and $k$ preconditioner applications for a
        `deflation` basis of $k$ columns: $M^{-1}A$ of the recorded directions
        comes from the iteration's own preconditioned residuals, except with
        `flexible=True`, where the preconditioner may be nonlinear and is applied
        to all `k + window` vectors).
    - `differentiation`: `"implicit"` (default): $x = A^{-1}b$ is differentiated as a
        linear solve (`lax.custom_linear_solve`: derivatives with respect to `b` and
        to arrays the operator closes over, forward and reverse mode, any order; each
        tangent or cotangent costs one more CG solve, from 0 whatever `x0`, checked
        for convergence like the primal: one that fails raises, or with
        `throw=False` gives NaN, never a wrong derivative; the solution does not
        depend on the preconditioner, so its parameters get zero gradient). `"unroll"`:
        backpropagate through the iterations (checkpointed, reverse mode), which is
        what training a preconditioner through the solver needs.
    - `throw`: raise (via `eqx.error_if`, also under `jit`) on failure.

    **Returns:** a [`solvers.CGSolution`][].

    **Failure modes:** shape and dtype errors raise at trace time. NaN/inf in `b`
    (`nonfinite_input`), a non-positive curvature $p^T A p \\le 0$ or $r^T z \\le 0$
    (`not_spd`: the operator or preconditioner is not SPD), an operator that fails a
    two-matvec symmetry probe, $|u^T A v - v^T A u| > \\sqrt{\\varepsilon}(\\|u\\|
    \\|Av\\| + \\|v\\|\\|Au\\|)$ for fixed pseudo-random $u, v$ (`not_symmetric`),
    an invalid `deflation` basis (`invalid_deflation`), a tolerance the true
    residual cannot reach in this dtype (`inaccurate`: `x` is the last iterate,
    its true residual the last `residual_norms` entry) and no convergence within
    `max_steps` (`max_steps_reached`) give result codes,
    raised if `throw`. The stopping test runs on the problem scaled by
    $\\max|b|$, so $\\|b\\|$ of $10^{\\pm 25}$ in float32 neither under- nor
    overflows. float32 attains true residuals of about $\\varepsilon\\,\\kappa$ only:
    the default `rtol` $\\sqrt{\\varepsilon} = 3.5 \\times 10^{-4}$ is met by plain
    and flexible Jacobi-preconditioned CG on 64 x 64 and 128 x 128 diffusion
    fields of variance 1.5 (2.5-3.4e-4, at 7-12% more steps than the iteration
    alone, which stops at 2.1-3.7e-3; they attain about 2e-4: see the
    failure-modes page); larger or harder float32 systems need a looser `rtol`
    or float64.

    **Example:**

    ```python
    import jax.numpy as jnp
    import solvers

    a = jnp.array([[4.0, 1.0], [1.0, 3.0]])
    sol = solvers.cg(a, jnp.array([1.0, 2.0]), preconditioner=lambda r: r / jnp.diag(a))
    print(sol.x, sol.n_steps, sol.residual_norms[: sol.n_steps + 1])
    ```

    Reference: Hestenes & Stiefel (1952); Notay, "Flexible conjugate gradients", SIAM
    J. Sci. Comput. 2000.
    """
    fn = "cg"
    b = jnp.asarray(b)
    if b.ndim != 1:
        raise ValueError(
            f"{fn}: b must be a vector (use jax.vmap for batches); got shape {b.shape}."
        )
    if not jnp.issubdtype(b.dtype, jnp.floating):
        raise TypeError(f"{fn}: b must be floating point; got {b.dtype}.")
    n = b.shape[0]
    if isinstance(operator, lx.AbstractLinearOperator):
        shape = (operator.out_structure().shape[0], operator.in_structure().shape[0])
        if shape != (n, n):
            raise ValueError(
                f"{fn}: operator must be {n} x {n} to match b; got {shape[0]} x "
                f"{shape[1]}."
            )
    elif not callable(operator) and not hasattr(operator, "mv"):
        shape = jnp.shape(operator)
        if shape != (n, n):
            raise ValueError(
                f"{fn}: operator must have shape ({n}, {n}) to match b; got {shape}."
            )
    matvec = as_matvec(operator, fn, "operator")
    precond = as_preconditioner(preconditioner, fn, "preconditioner")
    x0 = jnp.zeros_like(b) if x0 is None else jnp.asarray(x0, b.dtype)
    if x0.shape != b.shape:
        raise ValueError(f"{fn}: x0 must have shape {b.shape}; got {x0.shape}.")
    if differentiation not in ("implicit", "unroll"):
        raise ValueError(
            f"{fn}: differentiation must be 'implicit' or 'unroll'; got "
            f"{differentiation!r}."
        )
    w = None
    if deflation is not None:
        w = jnp.asarray(deflation)
        if w.ndim != 2 or w.shape[0] != n or w.shape[1] < 1:
            raise ValueError(
                f"{fn}: deflation must be an (n, k) basis with n = {n} and k >= 1; "
                f"got shape {w.shape}."
            )
        if w.dtype != b.dtype:
            raise TypeError(
                f"{fn}: deflation must have b's dtype {b.dtype}; got {w.dtype}."
            )
        w = w.T
    if recycle is None:
        recycle = 0 if w is None else w.shape[0]
    opts, window = check_options(
        fn, b.dtype, n, rtol, atol, max_steps, flexible, memory, recycle, window
    )
    sol = solve(
        matvec,
        precond,
        b,
        x0,
        w,
        opts=opts,
        recycle=recycle,
        window=window,
        differentiation=differentiation,
        strict=True,
        throw=throw,
    )
    if throw:
        sol = sol.result.error_if(sol, sol.result != RESULTS.successful)
    return sol


def check_options(
    fn, dtype, n, rtol, atol, max_steps, flexible, memory, recycle, window
):
    """Defaults and checks of the options `cg` and `solve_sequence` share: returns
    the CG loop's options and the recording window (0 without recycling)."""
    # lineax's convention: rtol = atol = 0 with max_steps = k runs k steps and
    # returns the iterate (a fixed-cost approximate solve)
    fixed_steps = _is_zero(rtol) and _is_zero(atol)
    if fixed_steps and max_steps is None:
        raise ValueError(
            f"{fn}: rtol = atol = 0 runs a fixed number of steps and needs "
            "max_steps (lineax's convention); give max_steps, or a tolerance."
        )
    rtol = default_tol(dtype, 0.5) if rtol is None else rtol
    max_steps = 10 * n if max_steps is None else max_steps
    if not (isinstance(max_steps, int) and max_steps > 0):
        raise ValueError(f"{fn}: max_steps must be a positive int; got {max_steps}.")
    if not (isinstance(memory, int) and memory > 0):
        raise ValueError(f"{fn}: memory must be a positive int; got {memory}.")
    if not (isinstance(recycle, int) and recycle >= 0):
        raise ValueError(f"{fn}: recycle must be an int >= 0; got {recycle}.")
    window = max(2 * recycle, 10) if window is None else window
    if recycle and not (isinstance(window, int) and window >= 1):
        raise ValueError(
            f"{fn}: window must be a positive int (with recycle); got {window}."
        )
    opts = dict(
        rtol=rtol,
        atol=atol,
        max_steps=max_steps,
        flexible=flexible,
        memory=memory,
        fixed_steps=fixed_steps,
    )
    return opts, window if recycle else 0


def _is_zero(tol) -> bool:
    return isinstance(tol, (int, float)) and not isinstance(tol, bool) and tol == 0


def solve(
    matvec,
    precond,
    b,
    x0,
    w,
    *,
    opts,
    recycle,
    window,
    differentiation,
    strict,
    throw,
) -> CGSolution:
    """`cg` after argument checking, without raising on the result (the solve of one
    system in `solve_sequence` too). `w`: deflation rows `(k, n)` or None;
    `strict`: a non-finite or rank-deficient `w` is `invalid_deflation` (otherwise
    its dependent directions are dropped: a recycled basis)."""
    finite_b = jnp.all(jnp.isfinite(b))
    b_safe = jnp.where(finite_b, b, 0)
    symmetric = _symmetry_probe(matvec, b)
    deflation, valid_w = None, jnp.array(True)
    if w is not None:
        if strict:
            valid_w = basis_independent(lax.stop_gradient(w))
            w = jnp.where(valid_w, w, 0)
        deflation, _ = prepare_deflation(matvec, w)
    opts = dict(opts, window=window)

    if differentiation == "unroll":
        x, (k, norms, converged, rnorm, inaccurate), recorded = scaled_cg_loop(
            matvec, precond, b_safe, x0, unroll=True, deflation=deflation, **opts
        )
    else:
        # The solution does not depend on the preconditioner nor on x0, so their
        # arrays are constants for differentiation.
        precond_const = stop_gradient_arrays(
            eqx.filter_closure_convert(precond, b_safe)
        )
        op = eqx.filter_closure_convert(matvec, b_safe)
        x, (k, norms, converged, rnorm, inaccurate), recorded = _implicit_cg(
            op,
            b_safe,
            lax.stop_gradient(x0),
            precond_const,
            deflation,
            opts=opts,
            throw=throw,
        )
    max_steps = opts["max_steps"]
    breakdown = ~converged & ~inaccurate & (k < max_steps) & jnp.isfinite(rnorm)
    result = RESULTS.where(converged, RESULTS.successful, RESULTS.max_steps_reached)
    result = RESULTS.where(inaccurate, RESULTS.inaccurate, result)
    result = RESULTS.where(breakdown, RESULTS.not_spd, result)
    result = RESULTS.where(symmetric, result, RESULTS.not_symmetric)
    result = RESULTS.where(valid_w, result, RESULTS.invalid_deflation)
    result = RESULTS.where(
        finite_b & jnp.isfinite(rnorm), result, RESULTS.nonfinite_input
    )
    converged = converged & finite_b & valid_w
    ritz_vectors = ritz_values = None
    if recycle:
        vectors, ritz_values = harmonic_ritz(recorded, precond, recycle)
        ritz_vectors = vectors.T
    return CGSolution(
        x=x,
        n_steps=k,
        residual_norms=norms,
        converged=converged,
        result=result,
        ritz_vectors=ritz_vectors,
        ritz_values=ritz_values,
    )
