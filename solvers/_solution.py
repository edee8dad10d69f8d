"""Result codes and the solution type of the optimal-transport solvers."""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from ._dual import dual_value


class RESULTS(eqx.Enumeration):
    """Result codes of `solvers`."""

    successful = ""
    max_steps_reached = (
        "The solver did not reach its tolerance within `max_steps` steps. Optimal "
        "transport at small epsilon: try sinkhorn_newton or an epsilon_schedule; "
        "conjugate gradients: a better preconditioner or a larger max_steps."
    )
    stalled = (
        "sinkhorn_newton: the marginal error stopped decreasing above `tol` (50 "
        "Newton steps at the final epsilon without halving it). In float32 at small "
        "epsilon this is the dtype's accuracy floor: use float64 or a larger tol."
    )
    nonfinite_input = (
        "The input (cost matrix, points, right-hand side) contains NaN or inf."
    )
    invalid_weights = (
        "The marginal weights must be finite and strictly positive (drop points with "
        "zero weight)."
    )
    unbalanced = (
        "The marginals have different total mass (|sum(a) - sum(b)| > sqrt(eps) "
        "sum(a)); balanced optimal transport needs equal masses."
    )
    invalid_epsilon = "epsilon must be finite and > 0."
    not_spd = (
        "Conjugate gradients broke down (p^T A p <= 0 or r^T M^{-1} r <= 0): the "
        "operator or the preconditioner is not symmetric positive definite."
    )
    not_symmetric = (
        "cg: the operator is not symmetric (a probe u^T A v - v^T A u exceeded "
        "sqrt(eps) (||u|| ||Av|| + ||v|| ||Au||)); conjugate gradients and the "
        "transposed solves of its derivative need a symmetric positive definite "
        "operator. Use a nonsymmetric solver (e.g. lineax.GMRES)."
    )
    nonfinite_output = (
        "The potentials became NaN or inf (epsilon too small for the dtype without an "
        "epsilon_schedule?)."
    )


class OTSolution(eqx.Module):
    """The result of [`solvers.sinkhorn`][] and [`solvers.sinkhorn_newton`][].

    The plan is $P_{ij} = \\exp((f_i + g_j - C_{ij})/\\varepsilon)$; the potentials are
    returned in the gauge $\\langle a, f\\rangle = \\langle b, g\\rangle$ (they are
    otherwise defined up to $f + t$, $g - t$).

    - `f`, `g`: dual potentials, shapes `(n,)`, `(m,)`.
    - `a`, `b`, `cost_matrix`, `epsilon`: the problem solved.
    - `n_steps`: iterations taken (Sinkhorn updates plus Newton steps).
    - `n_newton_steps`: Newton steps among them (0 for `sinkhorn`).
    - `error`: L1 marginal violations relative to the total mass,
        `[sum|P 1 - a|, sum|P^T 1 - b|] / sum(a)`.
    - `converged`: `max(error) <= tol` at the final epsilon.
    - `result`: a [`solvers.RESULTS`][] code.

    All array fields are differentiable outputs of the solver (see
    [`solvers.sinkhorn`][]); `plan()`, `reg_ot_cost` and `transport_cost` are
    differentiable too.
    """

    f: Float[Array, " n"]
    g: Float[Array, " m"]
    a: Float[Array, " n"]
    b: Float[Array, " m"]
    cost_matrix: Float[Array, "n m"]
    epsilon: Float[Array, ""]
    n_steps: Int[Array, ""]
    n_newton_steps: Int[Array, ""]
    error: Float[Array, " 2"]
    converged: Bool[Array, ""]
    result: RESULTS

    def plan(self) -> Float[Array, "n m"]:
        """The transport plan $P = \\exp((f \\oplus g - C)/\\varepsilon)$."""
        return jnp.exp(
            (self.f[:, None] + self.g[None, :] - self.cost_matrix) / self.epsilon
        )

    @property
    def reg_ot_cost(self) -> Float[Array, ""]:
        """Entropic OT cost $\\langle P, C\\rangle + \\varepsilon\\,
        \\mathrm{KL}(P \\,\\|\\, a b^T)$, evaluated by the dual. Its first derivatives
        are Danskin's (no linear solve): $\\partial/\\partial C = P$,
        $\\partial/\\partial a = f - \\varepsilon\\log a$ (up to a constant), and
        second derivatives go through the implicit potentials."""
        return dual_value(
            self.cost_matrix, self.a, self.b, self.epsilon, self.f, self.g
        )

    @property
    def transport_cost(self) -> Float[Array, ""]:
        """$\\langle P, C\\rangle$ (what POT's `sinkhorn2` returns)."""
        return jnp.sum(self.plan() * self.cost_matrix)
