"""The Gibbs kernel of an optimal-transport problem: every pass the solvers make over
the cost (c-transforms, marginals, plan-vector products, the sparse Hessian's
selection), dense or recomputed by blocks, with zero-weight entries masked out."""

from __future__ import annotations

import dataclasses

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from jaxdecomp._misc import mm

from . import _pallas
from ._geometry import AbstractGeometry, all_devices, sum_devices


def _lse(z, ok, axis):
    """log-sum-exp of `z` over the entries where `ok`, -inf (with a zero derivative,
    not NaN) where there are none: a block of rows that are all padding."""
    z = jnp.where(ok, z, -jnp.inf)
    top = lax.stop_gradient(jnp.max(z, axis=axis))
    top = jnp.where(jnp.isfinite(top), top, 0)
    s = jnp.sum(jnp.exp(z - jnp.expand_dims(top, axis)), axis=axis)
    return jnp.where(s > 0, jnp.log(jnp.where(s > 0, s, 1)) + top, -jnp.inf)


def _log_mean(s1, s0):
    """log of a weighted mean of exponentials $m = \\sum_j w_j e^{y_j}$ ($\\sum w =
    1$, $y \\le 0$, max 0), from $s_1 = \\sum_j w_j\\,\\mathrm{expm1}(y_j) = m - 1$
    and $s_0 = \\sum_j w_j e^{y_j} = m$.

    At $\\varepsilon \\gg |C|$ every $y_j$ is tiny and $m = 1 + s_1$ with $|s_1|$ of
    the order of $\\max|C|/\\varepsilon$: `log1p(s1)` keeps its digits where
    `log(s0)` would round them away (float32 loses every digit of the costs at
    $\\varepsilon = 10^6$). Far from 1 (small $\\varepsilon$) `s0` is the accurate
    one (1 + s_1 cancels)."""
    near = s1 > -0.5
    return jnp.where(
        near, jnp.log1p(jnp.where(near, s1, 0)), jnp.log(jnp.where(near, 1, s0))
    )


def _across(tree, combine, axis_name):
    """Combine column outputs across the devices of `axis_name` (rows sharded)."""
    if axis_name is None:
        return tree

    def one(v):
        if combine == "sum":
            return lax.psum(v, axis_name)
        if combine == "max":
            return lax.pmax(v, axis_name)
        # the shift only stabilises: no derivative through it (pmax has none)
        top = lax.pmax(lax.stop_gradient(v), axis_name)
        safe = jnp.where(jnp.isfinite(top), top, 0)
        return safe + jnp.log(lax.psum(jnp.exp(v - safe), axis_name))

    return jax.tree_util.tree_map(one, tree)


def logits(f, g, c, eps, row_ok, col_ok):
    """$(f_i + g_j - C_{ij})/\\varepsilon$, -inf outside the kept rows and columns.

    A `where`, not -inf added to the potentials: the derivative with respect to
    epsilon of (-inf - C)/epsilon would be inf * 0 = NaN."""
    ok = row_ok[:, None] & col_ok[None, :]
    return jnp.where(ok, (f[:, None] + g[None, :] - c) / eps, -jnp.inf)


class Kernel(eqx.Module):
    """$K_{ij} = \\exp(-C_{ij}/\\varepsilon)$ restricted to the rows and columns of
    positive weight (`mask_a`, `mask_b`): a zero-weight entry has a zero plan row or
    column and takes no part in any log-sum-exp, while the potentials themselves
    stay finite."""

    geom: AbstractGeometry
    mask_a: Bool[Array, " n"]
    mask_b: Bool[Array, " m"]

    @staticmethod
    def build(geom: AbstractGeometry, a, b) -> Kernel:
        return Kernel(geom, lax.stop_gradient(a > 0), lax.stop_gradient(b > 0))

    @property
    def axis_name(self) -> str | None:
        return getattr(self.geom, "axis_name", None)

    @property
    def fused(self) -> bool:
        """Whether the c-transforms and plan products run as fused Pallas kernels
        (`PointCloud(..., backend="pallas")`)."""
        return getattr(self.geom, "backend", "xla") == "pallas"

    def unfused(self) -> Kernel:
        """The same kernel on XLA row passes: for the derivative rules, whose linear
        maps (of tangents and cotangents) must be transposable, which a Pallas call
        is not."""
        if not self.fused:
            return self
        geom = dataclasses.replace(self.geom, backend="xla")
        return Kernel(geom, self.mask_a, self.mask_b)

    def rsum(self, v):
        """Sum of a row-space (length n) quantity, over all devices' rows."""
        return sum_devices(jnp.sum(v), self.axis_name)

    def rdot(self, u, v):
        return sum_devices(jnp.vdot(u, v), self.axis_name)

    def rall(self, v):
        return all_devices(jnp.all(v), self.axis_name)

    def rows_total(self) -> int | Array:
        n = self.geom.shape[0]
        return n if self.axis_name is None else lax.psum(n, self.axis_name)

    def f_hat(self, g, eps) -> Float[Array, " n"]:
        """$-\\varepsilon\\,\\mathrm{LSE}_j((g_j - C_{ij})/\\varepsilon)$ over the
        kept columns (the f-update is $\\varepsilon \\log a + \\hat f$)."""
        if self.fused:
            return _pallas.fused(_pallas.f_hat, Kernel._f_hat, self, g, eps)
        return self._f_hat(g, eps)

    def _f_hat(self, g, eps):
        mb = self.mask_b

        def fn(c):
            return -eps * _lse((g[None, :] - c) / eps, mb[None, :], 1), None

        return self.geom.row_pass(fn)[0]

    def f_mean(self, g, w, eps) -> tuple[Float[Array, " n"], Bool[Array, ""]]:
        """$-\\varepsilon \\log \\big(\\sum_j w_j e^{(g_j - C_{ij})/\\varepsilon} /
        \\sum_j w_j\\big)$ over the kept columns (the c-transform against the
        *normalised* weights `w`), accurate also at $\\varepsilon \\gg |g - C|$;
        and whether every row's exponents span less than 1 ("near": there
        $\\varepsilon$ exceeds the spread of $g - C$).

        A block of near rows sums `expm1` and takes `log1p` (`exp` and `log` would
        round the mean's distance from 1 away: float32 loses every digit of the
        costs at $\\varepsilon = 10^6$; with a span below 1 every $e^y \\ge 0.37$, so
        nothing cancels); other blocks the usual shifted log-sum-exp. One
        exponential per entry either way (a `lax.cond` per block)."""
        mb = self.mask_b
        wn = jnp.where(mb, w, 0)
        wn = wn / jnp.sum(wn)

        def fn(c):
            z = jnp.where(mb[None, :], (g[None, :] - c) / eps, -jnp.inf)
            top = lax.stop_gradient(jnp.max(z, axis=1))
            top = jnp.where(jnp.isfinite(top), top, 0)
            low = lax.stop_gradient(jnp.min(jnp.where(mb[None, :], z, top[:, None]), 1))
            y = z - top[:, None]
            log_mean = lax.cond(
                jnp.all(top - low < 1),
                lambda y: jnp.log1p(jnp.sum(wn * jnp.expm1(y), axis=1)),
                lambda y: jnp.log(jnp.sum(wn * jnp.exp(y), axis=1)),
                y,
            )
            return (-eps * (top + log_mean), top - low), None

        (fp, span), _ = self.geom.row_pass(fn)
        return fp, self.rall(span < 1)

    def g_mean(self, f, w, eps) -> Float[Array, " m"]:
        """The same over the kept rows (the column c-transform against the
        normalised `w`), by expm1/log1p or exp/log per column (`_log_mean`): one
        pass for the columns' maxima, one for the sums (two exponentials per
        entry: used where `f_mean` found every row near)."""
        ma = self.mask_a
        wn = jnp.where(ma, w, 0)
        wn = wn / self.rsum(wn)

        def z(c, fb, ok):
            return jnp.where(ok[:, None], (fb[:, None] - c) / eps, -jnp.inf)

        _, top = self.geom.row_pass(
            lambda c, fb, ok: (None, jnp.max(z(c, fb, ok), axis=0)), (f, ma), "max"
        )
        # the shift only stabilises: no derivative (and pmax has no rule)
        top = _across(lax.stop_gradient(top), "max", self.axis_name)
        top = jnp.where(jnp.isfinite(top), top, 0)

        def sums(c, fb, ok, wb):
            y = z(c, fb, ok) - top[None, :]
            return None, (
                jnp.sum(wb[:, None] * jnp.expm1(y), axis=0),
                jnp.sum(wb[:, None] * jnp.exp(y), axis=0),
            )

        _, (s1, s0) = self.geom.row_pass(sums, (f, ma, wn))
        s1, s0 = _across((s1, s0), "sum", self.axis_name)
        return -eps * (top + _log_mean(s1, s0))

    def g_hat(self, f, eps) -> Float[Array, " m"]:
        if self.fused:
            cols = _pallas.fused(_pallas.g_hat_local, Kernel._g_hat_local, self, f, eps)
        else:
            cols = self._g_hat_local(f, eps)
        return -eps * _across(cols, "lse", self.axis_name)

    def _g_hat_local(self, f, eps):
        def fn(c, fb, ok):
            return None, _lse((fb[:, None] - c) / eps, ok[:, None], 0)

        return self.geom.row_pass(fn, (f, self.mask_a), "lse")[1]

    def plan(self, f, g, eps) -> Plan:
        """The plan at the potentials `f`, `g`: materialised once for a dense
        geometry (reused by every product), recomputed per pass online."""
        if self.geom.is_online:
            return Plan(self, f, g, eps, None)
        c = self.geom.cost_matrix
        p = jnp.exp(logits(f, g, c, eps, self.mask_a, self.mask_b))
        return Plan(self, f, g, eps, p)

    def cost_stats(self):
        """(max |C|, mean C, std C) over all entries, in one pass."""
        mx, (s1, s2) = self.geom.row_pass(
            lambda c: (jnp.max(jnp.abs(c), axis=1), (jnp.sum(c), jnp.sum(c * c)))
        )
        s1, s2 = _across((s1, s2), "sum", self.axis_name)
        # (a level for thresholds: not differentiated, and pmax has no rule)
        mx = _across(lax.stop_gradient(jnp.max(mx)), "max", self.axis_name)
        size = jnp.asarray(self.rows_total() * self.geom.shape[1], s1.dtype)
        mean = s1 / size
        return mx, mean, jnp.sqrt(jnp.maximum(s2 / size - mean**2, 0))


class Plan(eqx.Module):
    """$P_{ij} = \\exp((f_i + g_j - C_{ij})/\\varepsilon)$ (zero at zero weights) as
    an operator: marginals, products, selections."""

    kernel: Kernel
    f: Float[Array, " n"]
    g: Float[Array, " m"]
    eps: Float[Array, ""]
    p: Float[Array, "n m"] | None

    def _pass(self, fn, row_args=(), combine="sum"):
        rows, cols = self._pass_local(fn, row_args, combine)
        return rows, _across(cols, combine, self.kernel.axis_name)

    def _pass_local(self, fn, row_args=(), combine="sum"):
        """`_pass` over this device's rows (column results not combined across
        devices)."""
        k, eps = self.kernel, self.eps
        if self.p is not None:
            return fn(self.p, *row_args)
        g, mb = self.g, k.mask_b

        def block(c, fb, ok, *args):
            return fn(jnp.exp(logits(fb, g, c, eps, ok, mb)), *args)

        return k.geom.row_pass(block, (self.f, k.mask_a, *row_args), combine)

    @property
    def _fused(self) -> bool:
        return self.p is None and self.kernel.fused

    def marginals(self):
        """$(P1, P^T1)$ in one pass (two fused kernels with `backend="pallas"`)."""
        if self._fused:
            n, m = self.kernel.geom.shape
            return self.mv(jnp.ones(m, self.f.dtype)), self.rmv(
                jnp.ones(n, self.f.dtype)
            )
        return self._pass(lambda p: (jnp.sum(p, axis=1), jnp.sum(p, axis=0)))

    def mv(self, v) -> Float[Array, " n"]:
        if self._fused:
            return _pallas.fused(_pallas.plan_rows, Plan._mv, self, v)
        return self._mv(v)

    def _mv(self, v):
        return self._pass(lambda p: (mm(p, v), None))[0]

    def rmv(self, u) -> Float[Array, " m"]:
        if self._fused:
            cols = _pallas.fused(_pallas.plan_cols_local, Plan._rmv_local, self, u)
        else:
            cols = self._rmv_local(u)
        return _across(cols, "sum", self.kernel.axis_name)

    def _rmv_local(self, u):
        """$P^Tu$ over this device's rows."""
        return self._pass_local(lambda p, ub: (None, mm(ub, p)), (u,))[1]

    def sq_rmv(self, w) -> Float[Array, " m"]:
        """$(P \\circ P)^T w$ (the diagonal of the Newton system)."""
        return self._pass(lambda p, wb: (None, mm(wb, p * p)), (w,))[1]

    def cost_weighted(self) -> Float[Array, ""]:
        """$\\langle P, C\\rangle$."""
        k, eps, g = self.kernel, self.eps, self.g

        def block(c, fb, ok):
            return None, jnp.sum(jnp.exp(logits(fb, g, c, eps, ok, k.mask_b)) * c)

        return k.rsum(k.geom.row_pass(block, (self.f, k.mask_a))[1])

    def rows(self, stride: int) -> Plan:
        """The plan of every `stride`-th row."""
        k = self.kernel
        if self.p is not None:
            return Plan(k, self.f[::stride], self.g, self.eps, self.p[::stride])
        sub = Kernel(k.geom.rows(stride), k.mask_a[::stride], k.mask_b)
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
        ok = k.mask_a[:, None] & k.mask_b[idx]
        z = jnp.where(ok, (self.f[:, None] + self.g[idx] - c) / self.eps, -jnp.inf)
        return jnp.exp(z)
