"""(Flexible) preconditioned conjugate gradients with residual history."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import lineax as lx
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from jaxdecomp._misc import default_tol, mm

from ._misc import cg_loop
from ._solution import RESULTS


class CGSolution(eqx.Module):
    """The result of [`solvers.cg`][].

    - `x`: the (approximate) solution.
    - `n_steps`: CG iterations taken.
    - `residual_norms`: $\\|r_k\\|_2$ for $k = 0, \\ldots,$ `max_steps`
        (recursively updated residuals; entries after `n_steps` are NaN).
    - `converged`: whether $\\|r\\|_2 \\le
        \\max(\\text{rtol}\\,\\|b\\|_2, \\text{atol})$.
    - `result`: a [`solvers.RESULTS`][] code.
    """

    x: Float[Array, " n"]
    n_steps: Int[Array, ""]
    residual_norms: Float[Array, " max_steps_plus_1"]
    converged: Bool[Array, ""]
    result: RESULTS


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
    recursively updated residual.

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
        history buffer).
    - `flexible`: flexible CG, FCG(`memory`).
    - `memory`: directions kept for A-orthogonalisation in flexible CG (default 5;
        static; costs `2 memory` vectors of storage and `memory` dot products and
        updates per step). More memory helps strongly nonlinear preconditioners:
        the trained `NeuralInverse` needs 432, 226, 134, 94 iterations with 1, 2, 5,
        10 (Jacobi: 282; the Polak–Ribière variant used before: 506).
    - `differentiation`: `"implicit"` (default): $x = A^{-1}b$ is differentiated as a
        linear solve (`lax.custom_linear_solve`: derivatives with respect to `b` and
        to arrays the operator closes over, forward and reverse mode, any order; each
        tangent or cotangent costs one more CG solve; the solution does not depend on
        the preconditioner, so its parameters get zero gradient). `"unroll"`:
        backpropagate through the iterations (checkpointed, reverse mode), which is
        what training a preconditioner through the solver needs.
    - `throw`: raise (via `eqx.error_if`, also under `jit`) on failure.

    **Returns:** a [`solvers.CGSolution`][].

    **Failure modes:** shape and dtype errors raise at trace time. NaN/inf in `b`
    (`nonfinite_input`), a non-positive curvature $p^T A p \\le 0$ or $r^T z \\le 0$
    (`not_spd`: the operator or preconditioner is not SPD), and no convergence within
    `max_steps` (`max_steps_reached`) give result codes, raised if `throw`.

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
    precond = (
        (lambda r: r)
        if preconditioner is None
        else as_matvec(preconditioner, fn, "preconditioner")
    )
    x0 = jnp.zeros_like(b) if x0 is None else jnp.asarray(x0, b.dtype)
    if x0.shape != b.shape:
        raise ValueError(f"{fn}: x0 must have shape {b.shape}; got {x0.shape}.")
    rtol = default_tol(b.dtype, 0.5) if rtol is None else rtol
    max_steps = 10 * n if max_steps is None else max_steps
    if not (isinstance(max_steps, int) and max_steps > 0):
        raise ValueError(f"{fn}: max_steps must be a positive int; got {max_steps}.")
    if not (isinstance(memory, int) and memory > 0):
        raise ValueError(f"{fn}: memory must be a positive int; got {memory}.")
    if differentiation not in ("implicit", "unroll"):
        raise ValueError(
            f"{fn}: differentiation must be 'implicit' or 'unroll'; got "
            f"{differentiation!r}."
        )

    finite_b = jnp.all(jnp.isfinite(b))
    b_safe = jnp.where(finite_b, b, 0)
    opts = dict(
        rtol=rtol, atol=atol, max_steps=max_steps, flexible=flexible, memory=memory
    )

    if differentiation == "unroll":
        x, (k, norms, converged, rnorm) = cg_loop(
            matvec, precond, b_safe, x0, unroll=True, **opts
        )
    else:
        # x0 is only an initial guess (also for the tangent and transpose solves,
        # which use the same tolerances relative to their own right-hand sides).
        x0_ = lax.stop_gradient(x0)

        # The solution does not depend on the preconditioner, so the arrays it closes
        # over are constants for differentiation (lax.custom_linear_solve cannot
        # differentiate with respect to values closed over by `solve`: it fails).
        precond_const = eqx.filter_closure_convert(precond, b_safe)
        precond_const = jax.tree_util.tree_map(
            lambda c: lax.stop_gradient(c) if eqx.is_array(c) else c, precond_const
        )

        def solve(matvec, rhs):
            y, aux = cg_loop(matvec, precond_const, rhs, x0_, unroll=False, **opts)
            return y, aux

        x, (k, norms, converged, rnorm) = lax.custom_linear_solve(
            matvec, b_safe, solve, symmetric=True, has_aux=True
        )
    breakdown = ~converged & (k < max_steps) & jnp.isfinite(rnorm)
    result = RESULTS.where(converged, RESULTS.successful, RESULTS.max_steps_reached)
    result = RESULTS.where(breakdown, RESULTS.not_spd, result)
    result = RESULTS.where(
        finite_b & jnp.isfinite(rnorm), result, RESULTS.nonfinite_input
    )
    converged = converged & finite_b
    sol = CGSolution(
        x=x, n_steps=k, residual_norms=norms, converged=converged, result=result
    )
    if throw:
        sol = result.error_if(sol, result != RESULTS.successful)
    return sol
