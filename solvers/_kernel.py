"""The Gibbs kernel of an optimal-transport problem: every pass the solvers make over
the cost (c-transforms, marginals, plan-vector products, the sparse Hessian's
selection), dense or recomputed by blocks, with zero-weight entries masked out."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from jaxdecomp._misc import mm

from ._geometry import AbstractGeometry


def _lse(x, axis):
    return jax.nn.logsumexp(x, axis=axis)


class Kernel(eqx.Module):
    """$K_{ij} = \\exp(-C_{ij}/\\varepsilon)$ restricted to the rows and columns of
    positive weight: `la`, `lb` are 0 there and -inf at zero weights, added to the
    potentials inside every pass (so a zero-weight entry has a zero plan row or
    column and takes no part in any log-sum-exp), while the potentials themselves
    stay finite."""

    geom: AbstractGeometry
    la: Float[Array, " n"]
    lb: Float[Array, " m"]

    @staticmethod
    def build(geom: AbstractGeometry, a, b) -> Kernel:
        def log_mask(w):
            return lax.stop_gradient(jnp.where(w > 0, 0.0, -jnp.inf).astype(w.dtype))

        return Kernel(geom, log_mask(a), log_mask(b))

    @property
    def mask_a(self) -> Bool[Array, " n"]:
        return self.la == 0

    @property
    def mask_b(self) -> Bool[Array, " m"]:
        return self.lb == 0

    def f_hat(self, g, eps) -> Float[Array, " n"]:
        """$-\\varepsilon\\,\\mathrm{LSE}_j((g_j - C_{ij})/\\varepsilon)$ over the
        kept columns (the f-update is $\\varepsilon \\log a + \\hat f$)."""
        ge = g + self.lb
        rows, _ = self.geom.row_pass(
            lambda c: (-eps * _lse((ge[None, :] - c) / eps, 1), None)
        )
        return rows

    def g_hat(self, f, eps) -> Float[Array, " m"]:
        fe = f + self.la
        _, cols = self.geom.row_pass(
            lambda c, fb: (None, _lse((fb[:, None] - c) / eps, 0)), (fe,), "lse"
        )
        return -eps * cols

    def plan(self, f, g, eps) -> Plan:
        """The plan at the potentials `f`, `g`: materialised once for a dense
        geometry (reused by every product), recomputed per pass online."""
        if self.geom.is_online:
            return Plan(self, f, g, eps, None)
        c = self.geom.cost_matrix
        p = jnp.exp(((f + self.la)[:, None] + (g + self.lb)[None, :] - c) / eps)
        return Plan(self, f, g, eps, p)

    def cost_stats(self):
        """(max |C|, mean C, std C) over all entries, in one pass."""
        mx, (s1, s2) = self.geom.row_pass(
            lambda c: (jnp.max(jnp.abs(c), axis=1), (jnp.sum(c), jnp.sum(c * c)))
        )
        n, m = self.geom.shape
        mean = s1 / (n * m)
        return jnp.max(mx), mean, jnp.sqrt(jnp.maximum(s2 / (n * m) - mean**2, 0))


class Plan(eqx.Module):
    """$P_{ij} = \\exp((f_i + g_j - C_{ij})/\\varepsilon)$ (zero at zero weights) as
    an operator: marginals, products, selections."""

    kernel: Kernel
    f: Float[Array, " n"]
    g: Float[Array, " m"]
    eps: Float[Array, ""]
    p: Float[Array, "n m"] | None

    def _pass(self, fn, row_args=(), combine="sum"):
        if self.p is not None:
            return fn(self.p, *row_args)
        k, eps = self.kernel, self.eps
        ge = self.g + k.lb

        def block(c, fb, *args):
            return fn(jnp.exp((fb[:, None] + ge[None, :] - c) / eps), *args)

        return k.geom.row_pass(block, (self.f + k.la, *row_args), combine)

    def marginals(self):
        """$(P1, P^T1)$ in one pass."""
        return self._pass(lambda p: (jnp.sum(p, axis=1), jnp.sum(p, axis=0)))

    def mv(self, v) -> Float[Array, " n"]:
        return self._pass(lambda p: (mm(p, v), None))[0]

    def rmv(self, u) -> Float[Array, " m"]:
        return self._pass(lambda p, ub: (None, mm(ub, p)), (u,))[1]

    def sq_rmv(self, w) -> Float[Array, " m"]:
        """$(P \\circ P)^T w$ (the diagonal of the Newton system)."""
        return self._pass(lambda p, wb: (None, mm(wb, p * p)), (w,))[1]

    def cost_weighted(self) -> Float[Array, ""]:
        """$\\langle P, C\\rangle$."""
        k, eps = self.kernel, self.eps
        fe, ge = self.f + k.la, self.g + k.lb

        def block(c, fb):
            p = jnp.exp((fb[:, None] + ge[None, :] - c) / eps)
            return None, jnp.sum(p * c)

        return k.geom.row_pass(block, (fe,))[1]

    def rows(self, stride: int) -> Plan:
        """The plan of every `stride`-th row."""
        k = self.kernel
        if self.p is not None:
            return Plan(k, self.f[::stride], self.g, self.eps, self.p[::stride])
        sub = Kernel(k.geom.rows(stride), k.la[::stride], k.lb)
        return Plan(sub, self.f[::stride], self.g, self.eps, None)

    def select(self, kk: int, select_fn):
        """`select_fn(p_block, kk) -> (vals, idx, used)` per block of rows."""
        return self._pass(lambda p: (select_fn(p, kk), None))[0]

    def take(self, idx: Int[Array, "n k"]) -> Float[Array, "n k"]:
        """$P_{i, \\mathrm{idx}_{il}}$."""
        if self.p is not None:
            return jnp.take_along_axis(self.p, idx, axis=1)
        k = self.kernel
        c = k.geom.cost_at(idx)
        ge = (self.g + k.lb)[idx]
        return jnp.exp(((self.f + k.la)[:, None] + ge - c) / self.eps)
