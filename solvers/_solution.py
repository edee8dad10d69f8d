"""Result codes and the solution type of the optimal-transport solvers."""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from ._dual import dual_value
from ._geometry import AbstractGeometry
from ._kernel import Kernel, logits


class RESULTS(eqx.Enumeration):
    """Result codes of `solvers`."""

    successful = ""
    max_steps_reached = (
        "The solver did not reach its tolerance within `max_steps` steps. Optimal "
        "transport at small epsilon: try sinkhorn_newton or an epsilon_schedule; "
        "conjugate gradients: a better preconditioner or a larger max_steps."
    )
    stalled = (
        "Sinkhorn: the marginal error stopped decreasing above `tol` (sinkhorn_newton: "
        "50 Newton steps at the final epsilon without halving it; sinkhorn: 200 steps "
        "without a 5% gain, near the rounding level). In float32 at small epsilon "
        "this is the dtype's accuracy floor: use float64 or a larger tol."
    )
    nonfinite_input = (
        "The input (cost matrix, points, right-hand side) contains NaN or inf."
    )
    invalid_weights = (
        "The marginal weights must be finite and nonnegative, with at least one "
        "positive entry each (zero weights mark padding)."
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
    inaccurate = (
        "cg: the recursively updated residual reached the tolerance but the true "
        "residual ||b - Ax|| did not, also after replacing the residual by the true "
        "one and iterating on: the tolerance is below what this dtype attains for "
        "this system (about eps ||A|| ||x||; e.g. about 2e-4 relative for a float32 "
        "64 x 64 diffusion field of contrast 1e3). Use float64, a looser rtol, or "
        "throw=False to keep the returned (last) iterate, whose true residual is the "
        "last residual_norms entry."
    )
    invalid_deflation = (
        "cg: the deflation basis W is not finite or is (numerically) rank-deficient "
        "(its normalised columns' Gram matrix has an eigenvalue at rounding level); "
        "drop dependent columns, e.g. by a QR with a rank test."
    )
    nonfinite_output = (
        "The potentials became NaN or inf (epsilon too small for the dtype without an "
        "epsilon_schedule?)."
    )


class OTSolution(eqx.Module):
    """The result of [`solvers.sinkhorn`][] and [`solvers.sinkhorn_newton`][].

    The plan is $P_{ij} = \\exp((f_i + g_j - C_{ij})/\\varepsilon)$ on the entries
    of positive weight (zero rows and columns at zero weights); the potentials are
    returned in the gauge $\\langle a, f\\rangle = \\langle b, g\\rangle$ (they
    are otherwise defined up to $f + t$, $g - t$). A zero-weight entry's potential is
    the c-transform of the other, $f_i = -\\varepsilon\\,\\mathrm{LSE}_{j: b_j >
    0}((g_j - C_{ij})/\\varepsilon)$ (finite: what the f-update gives with
    $\\log a_i$ read as 0), and likewise for $g_j$.

    - `f`, `g`: dual potentials, shapes `(n,)`, `(m,)`.
    - `a`, `b`, `geom`, `epsilon`: the problem solved (`geom` is the online
        [`solvers.PointCloud`][] when one was given with `batch_size`, otherwise a
        [`solvers.Geometry`][] holding the cost matrix).
    - `n_steps`: iterations taken (Sinkhorn updates plus Newton steps).
    - `n_newton_steps`: Newton steps among them (0 for `sinkhorn`).
    - `n_cg_steps`: conjugate-gradient iterations of the Newton steps, in all (0
        for `sinkhorn`).
    - `error`: L1 marginal violations relative to the total mass,
        `[sum|P 1 - a|, sum|P^T 1 - b|] / sum(a)`.
    - `converged`: `max(error) <= tol` at the final epsilon.
    - `result`: a [`solvers.RESULTS`][] code.

    All array fields are differentiable outputs of the solver (see
    [`solvers.sinkhorn`][]); `plan()`, `apply_plan`, `reg_ot_cost` and
    `transport_cost` are differentiable too, and only `plan()` and `cost_matrix`
    materialise an $n \\times m$ array.
    """

    f: Float[Array, " n"]
    g: Float[Array, " m"]
    a: Float[Array, " n"]
    b: Float[Array, " m"]
    geom: AbstractGeometry
    epsilon: Float[Array, ""]
    n_steps: Int[Array, ""]
    n_newton_steps: Int[Array, ""]
    n_cg_steps: Int[Array, ""]
    error: Float[Array, " 2"]
    converged: Bool[Array, ""]
    result: RESULTS

    @property
    def _kernel(self) -> Kernel:
        return Kernel.build(self.geom, self.a, self.b)

    @property
    def cost_matrix(self) -> Float[Array, "n m"]:
        """The `(n, m)` cost matrix (materialised for an online geometry)."""
        return self.geom.cost_matrix

    def plan(self) -> Float[Array, "n m"]:
        """The transport plan $P = \\exp((f \\oplus g - C)/\\varepsilon)$ (dense,
        also for an online geometry: use `apply_plan` to avoid it)."""
        k = self._kernel
        return jnp.exp(
            logits(self.f, self.g, self.cost_matrix, self.epsilon, k.mask_a, k.mask_b)
        )

    def apply_plan(self, v: Float[Array, " k"], axis: int = 1) -> Float[Array, " l"]:
        """$P v$ (`axis=1`, `v` of shape `(m,)`) or $P^T v$ (`axis=0`, `v` of
        shape `(n,)`), in blocks of rows for an online geometry (never stored)."""
        n, m = self.geom.shape
        v = jnp.asarray(v)
        if axis not in (0, 1) or v.shape != ((m,) if axis == 1 else (n,)):
            raise ValueError(
                f"apply_plan: axis must be 1 (v of shape ({m},)) or 0 (v of shape "
                f"({n},)); got axis={axis!r} and shape {v.shape}."
            )
        plan = self._kernel.plan(self.f, self.g, self.epsilon)
        return plan.mv(v) if axis == 1 else plan.rmv(v)

    @property
    def reg_ot_cost(self) -> Float[Array, ""]:
        """Entropic OT cost $\\langle P, C\\rangle + \\varepsilon\\,
        \\mathrm{KL}(P \\,\\|\\, a b^T)$, evaluated from potentials without the
        $\\varepsilon \\log a$ that `f`, `g` carry (accurate in float32 also at
        $\\varepsilon \\gg \\max|C|$, see docs/sinkhorn.md). Its first derivatives
        are Danskin's (no linear solve): $\\partial/\\partial C = P$,
        $\\partial/\\partial a = f - \\varepsilon\\log a$ (up to a constant),
        $\\partial/\\partial\\varepsilon = \\mathrm{KL}(P\\,\\|\\,ab^T)$, and second
        derivatives go through the implicit potentials."""
        return dual_value(self._kernel, self.a, self.b, self.epsilon, self.f, self.g)

    @property
    def transport_cost(self) -> Float[Array, ""]:
        """$\\langle P, C\\rangle$ (what POT's `sinkhorn2` returns)."""
        return self._kernel.plan(self.f, self.g, self.epsilon).cost_weighted()
