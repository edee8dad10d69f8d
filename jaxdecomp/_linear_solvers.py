r"""Matrix-free lineax solvers that stop on the true residual: the default tangent
solvers of `custom_root` above `DENSE_MAX_SIZE` unknowns, public so that a tangent
solve can be given another tolerance, step limit or restart length."""

from __future__ import annotations

import jax
import jax.flatten_util
import jax.numpy as jnp
import lineax as lx
import numpy as np

from ._cg_loop import scaled_cg_loop
from ._gmres_loop import gmres_loop


class _AbstractOperatorSolver(lx.AbstractLinearSolver):
    """A lineax solver whose state is the operator itself (matrix-free: `compute`
    only applies it); transposing transposes the operator."""

    def init(self, operator, options):
        del options
        return operator

    def transpose(self, state, options):
        return state.transpose(), options

    def conj(self, state, options):
        return lx.conj(state), options

    def assume_full_rank(self):
        return True


def _check_options(name, rtol, max_steps):
    if not (
        isinstance(rtol, (int, float, np.floating))
        and not isinstance(rtol, bool)
        and 0 < rtol < 1
    ):
        raise ValueError(f"{name}: rtol must be a float in (0, 1); got {rtol!r}.")
    if max_steps is not None and not (
        isinstance(max_steps, int) and not isinstance(max_steps, bool) and max_steps > 0
    ):
        raise ValueError(
            f"{name}: max_steps must be a positive int or None; got {max_steps!r}."
        )


def _flat_problem(state, vector, options):
    """(matvec, preconditioner, b, x0, unravel) on flat vectors."""
    flat_b, unravel = jax.flatten_util.ravel_pytree(vector)
    if not jnp.issubdtype(flat_b.dtype, jnp.floating):
        raise TypeError(
            "TrueResidualCG / TrueResidualGMRES: real floating vectors only; got "
            f"{flat_b.dtype} (use lineax's CG / GMRES for complex systems)."
        )

    def flat(op):
        return lambda v: jax.flatten_util.ravel_pytree(op.mv(unravel(v)))[0]

    pre = options.get("preconditioner")
    precond = (lambda r: r) if pre is None else flat(pre)
    y0 = options.get("y0")
    x0 = (
        jnp.zeros_like(flat_b)
        if y0 is None
        else jax.flatten_util.ravel_pytree(y0)[0].astype(flat_b.dtype)
    )
    return flat(state), precond, flat_b, x0, unravel


def _result(converged, k, max_steps, inaccurate, rnorm, stagnated=False):
    """lineax's code: successful, else max_steps_reached (steps used up, finite,
    tolerance attainable), stagnation, or singular (unattainable tolerance,
    breakdown, NaN)."""
    failed = lx.RESULTS.where(
        (k >= max_steps) & ~inaccurate & jnp.isfinite(rnorm),
        lx.RESULTS.max_steps_reached,
        lx.RESULTS.singular,
    )
    failed = lx.RESULTS.where(stagnated, lx.RESULTS.stagnation, failed)
    return lx.RESULTS.where(converged, lx.RESULTS.successful, failed)


class TrueResidualCG(_AbstractOperatorSolver):
    r"""Preconditioned conjugate gradients that stop on the true residual, as a
    lineax solver (for symmetric positive definite operators).

    Solves $Ax = b$ with the iteration of `solvers.cg`: when the recursively updated
    residual meets the tolerance, one matvec computes the true residual, and the
    solve has converged only if $\|b - Ax\|_2 \le \text{rtol}\,\|b\|_2$; otherwise
    the residual is replaced by the true one and CG restarts from $x$. Breakdown is
    $p^TAp \le 0$ or $r^TM^{-1}r \le 0$, a test that does not depend on the scale of
    $A$ (lineax's `lx.CG` compares $|p^TAp|$ with an absolute multiple of $\epsilon$
    and returned NaN on healthy float32 systems with small eigenvalues: measured,
    1000 unknowns, eigenvalues in $[0.005, 0.01]$).

    The default symmetric tangent solver of [`jaxdecomp.custom_root`][] above 256
    unknowns (with rtol $= \epsilon^{2/3}$); pass it as `solve=` for another
    tolerance or step limit. Usable anywhere lineax takes a solver
    (`lx.linear_solve`).

    **Arguments:**

    - `rtol`: relative tolerance on the true residual, a Python float in (0, 1).
    - `max_steps`: CG steps at most (default $10n$).

    **Failures** (lineax result codes): no convergence within `max_steps` is
    `max_steps_reached`; a tolerance below what the dtype attains (about
    $\epsilon\|A\|\|x\|$ relative to $\|b\|$: float32 beyond a condition number of
    a few hundred at rtol 2.4e-5), a breakdown (not positive definite) or NaN is
    `singular`. The returned iterate is finite after a breakdown.

    `options` of `lx.linear_solve`: `"preconditioner"` (a positive definite operator
    approximating $A^{-1}$) and `"y0"` (initial guess). Pytrees are flattened; real
    floating dtypes only. Derivatives: lineax differentiates the solution implicitly
    (both modes; a transposed solve is a CG solve with the transposed operator).

    ```python
    import jax.numpy as jnp
    import lineax as lx
    import jaxdecomp

    a = jnp.diag(jnp.linspace(1e-3, 1e-2, 500))
    sol = lx.linear_solve(
        lx.MatrixLinearOperator(a, lx.positive_semidefinite_tag),
        jnp.ones(500),
        jaxdecomp.TrueResidualCG(rtol=1e-5),
    )
    assert jnp.linalg.norm(1 - a @ sol.value) <= 1e-5 * jnp.sqrt(500.0)
    ```
    """

    rtol: float
    max_steps: int | None = None

    def __check_init__(self):
        _check_options("TrueResidualCG", self.rtol, self.max_steps)

    def compute(self, state, vector, options):
        matvec, precond, b, x0, unravel = _flat_problem(state, vector, options)
        max_steps = 10 * b.size if self.max_steps is None else self.max_steps
        x, (k, _, converged, rnorm, inaccurate), _ = scaled_cg_loop(
            matvec,
            precond,
            b,
            x0,
            rtol=self.rtol,
            atol=0.0,
            max_steps=max_steps,
            flexible=False,
            unroll=False,
        )
        result = _result(converged, k, max_steps, inaccurate, rnorm)
        return unravel(x), result, {"num_steps": k, "max_steps": max_steps}


class TrueResidualGMRES(_AbstractOperatorSolver):
    r"""Restarted GMRES, preconditioned on the right, that stops on the true
    residual, as a lineax solver (for general nonsingular operators).

    Solves $Ax = b$ by GMRES(`restart`) on $AMu = b$, $x = Mu$: Arnoldi with
    classical Gram-Schmidt applied twice (HIGHEST precision) and Givens rotations;
    each cycle ends when its least-squares residual reaches the tolerance (or after
    `restart` steps), and one matvec then computes the true residual. The solve has
    converged only if $\|b - Ax\|_2 \le \text{rtol}\,\|b\|_2$. lineax's `lx.GMRES`
    additionally bounds every entry of the last update by $\text{atol} +
    \text{rtol}|y_i|$, which is not invariant to the scale of $A$: it reported
    `stagnation` on healthy float32 systems (measured: 2000 and 4096 unknowns,
    $A = 10^{-4}(I + 0.3G/\sqrt{n})$, residuals 3e-7 and 1.4e-7 relative).

    The default nonsymmetric tangent solver of [`jaxdecomp.custom_root`][] above 256
    unknowns (with rtol $= \epsilon^{2/3}$); pass it as `solve=` for another
    tolerance, restart length or step limit.

    **Arguments:**

    - `rtol`: relative tolerance on the true residual, a Python float in (0, 1).
    - `restart`: Krylov dimension per cycle (default 20; memory `restart + 1`
        vectors).
    - `max_steps`: Arnoldi steps (matvecs) at most, over all cycles (default $10n$).

    **Failures** (lineax result codes): no convergence within `max_steps` is
    `max_steps_reached`; a full cycle that does not reduce the residual is
    `stagnation` (GMRES(m) can stall on strongly nonnormal or indefinite systems,
    e.g. a cyclic shift: a larger `restart` or a preconditioner may help); a
    tolerance below what the dtype attains (the cycle's least-squares residual and
    the true one disagree, and restarts stop improving by 10%, 8 at most) or NaN is
    `singular`.

    `options` of `lx.linear_solve`: `"preconditioner"` (an operator approximating
    $A^{-1}$, applied on the right) and `"y0"`. Pytrees are flattened; real floating
    dtypes only. Derivatives: lineax differentiates the solution implicitly (both
    modes; the transposed solve runs GMRES on $A^T$).

    ```python
    import jax.numpy as jnp
    import jax.random as jr
    import lineax as lx
    import jaxdecomp

    n = 400
    a = 1e-4 * (jnp.eye(n) + 0.3 * jr.normal(jr.key(0), (n, n)) / jnp.sqrt(n))
    sol = lx.linear_solve(
        lx.MatrixLinearOperator(a), jnp.ones(n), jaxdecomp.TrueResidualGMRES(rtol=1e-5)
    )
    assert jnp.linalg.norm(1 - a @ sol.value) <= 1.01e-5 * jnp.sqrt(n)
    ```
    """

    rtol: float
    restart: int = 20
    max_steps: int | None = None

    def __check_init__(self):
        _check_options("TrueResidualGMRES", self.rtol, self.max_steps)
        if not (
            isinstance(self.restart, int)
            and not isinstance(self.restart, bool)
            and self.restart > 0
        ):
            raise ValueError(
                f"TrueResidualGMRES: restart must be a positive int; got "
                f"{self.restart!r}."
            )

    def compute(self, state, vector, options):
        matvec, precond, b, x0, unravel = _flat_problem(state, vector, options)
        max_steps = 10 * b.size if self.max_steps is None else self.max_steps
        x, (k, converged, rnorm, inaccurate, stagnated) = gmres_loop(
            matvec,
            precond,
            b,
            x0,
            rtol=self.rtol,
            restart=self.restart,
            max_steps=max_steps,
        )
        result = _result(converged, k, max_steps, inaccurate, rnorm, stagnated)
        return unravel(x), result, {"num_steps": k, "max_steps": max_steps}
