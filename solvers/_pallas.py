r"""Fused Pallas kernels for the online point-cloud passes: the cost is recomputed in
tiles in registers, never stored, not even by blocks of rows.

Two kernels, each over the rows of one cloud against all points of the other (the
column passes swap the clouds):

- `lse`: $\mathrm{LSE}_j(p_j - C_{ij}/\varepsilon)$ with a running maximum and sum
  (one pass, as flash attention does): the Sinkhorn c-transforms `f_hat`, `g_hat`.
- `expsum`: $\sum_j \exp(q_i + p_j - C_{ij}/\varepsilon)\,v_j$ for several vectors
  $v$ at once: the plan's products $Pv$, $P^Tu$ and marginals of the Newton steps.

The potentials arrive divided by $\varepsilon$ with $-\infty$ at zero-weight (and
padding) entries, the points centred and scaled by $\varepsilon^{-1/2}$
(squared Euclidean; $\varepsilon^{-1}$ for Euclidean), so the kernels need no
scalar inputs; the cost is $|x|^2 + |y|^2 - 2x\cdot y$ clipped at 0, the XLA path's
formula (one float32/float64 dot per tile at HIGHEST precision). Rows and columns
are padded to the tile sizes and the dimension to 16 (tensor-core dot shapes).

On a CPU the kernels run in Pallas's interpret mode (`lax.platform_dependent`
picks it: the tests check them there); on a GPU they are compiled by Pallas's
Triton backend. Derivatives: `custom_jvp`, the tangent from the XLA row passes
(`jvp_live`, symbolic zeros held fixed), so the kernels themselves are never
differentiated and every derivative the XLA path has is kept.
"""

from __future__ import annotations

import functools as ft

import jax
import jax.lax as lax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from ._misc import jvp_live

# Tile sizes: rows per program, columns per step of its loop.
BLOCK_ROWS = 128
BLOCK_COLS = 128
_DIM = 16  # the dot's inner dimension is padded to a multiple of this


def _pad_to(v, n, axis, value=0.0):
    extra = n - v.shape[axis]
    if extra == 0:
        return v
    widths = [(0, 0)] * v.ndim
    widths[axis] = (0, extra)
    return jnp.pad(v, widths, constant_values=value)


def _round_up(n, k):
    return -(-n // k) * k


def _tile_cost(x, xx, y, yy, euclidean: bool):
    """Scaled cost tile from points (rows x dim, cols x dim) and squared norms."""
    xy = lax.dot_general(
        x, y, (((1,), (1,)), ((), ())), precision=lax.Precision.HIGHEST
    )
    d2 = jnp.maximum(xx[:, None] + yy[None, :] - 2 * xy, 0)
    return jnp.sqrt(d2) if euclidean else d2


def _lse_kernel(x_ref, xx_ref, y_ref, yy_ref, p_ref, o_ref, *, n_tiles, euclidean):
    x, xx = x_ref[...], xx_ref[...]
    rows = x.shape[0]

    def body(t, carry):
        top, s = carry
        cols = pl.ds(t * BLOCK_COLS, BLOCK_COLS)
        c = _tile_cost(x, xx, y_ref[cols, :], yy_ref[cols], euclidean)
        z = p_ref[cols][None, :] - c
        new = jnp.maximum(top, jnp.max(z, axis=1))
        safe = jnp.where(jnp.isfinite(new), new, 0)
        s = s * jnp.exp(top - safe) + jnp.sum(jnp.exp(z - safe[:, None]), axis=1)
        return new, s

    init = (
        jnp.full((rows,), -jnp.inf, x.dtype),
        jnp.zeros((rows,), x.dtype),
    )
    top, s = lax.fori_loop(0, n_tiles, body, init)
    out = jnp.where(s > 0, jnp.log(jnp.where(s > 0, s, 1)) + top, -jnp.inf)
    o_ref[...] = out.astype(o_ref.dtype)


def _expsum_kernel(
    x_ref, xx_ref, q_ref, y_ref, yy_ref, p_ref, v_ref, o_ref, *, n_tiles, euclidean
):
    x, xx, q = x_ref[...], xx_ref[...], q_ref[...]

    def body(t, acc):
        cols = pl.ds(t * BLOCK_COLS, BLOCK_COLS)
        c = _tile_cost(x, xx, y_ref[cols, :], yy_ref[cols], euclidean)
        e = jnp.exp(q[:, None] + p_ref[cols][None, :] - c)
        return acc + jnp.sum(e * v_ref[cols][None, :], axis=1)

    acc = jnp.zeros((x.shape[0],), x.dtype)
    o_ref[...] = lax.fori_loop(0, n_tiles, body, acc).astype(o_ref.dtype)


def _prepare(x, y, scale):
    """Scaled, padded points and their squared norms."""
    n, m = x.shape[0], y.shape[0]
    dim = _round_up(x.shape[1], _DIM)
    n_pad, m_pad = _round_up(n, BLOCK_ROWS), _round_up(m, BLOCK_COLS)
    xs = _pad_to(_pad_to(x * scale, dim, 1), n_pad, 0)
    ys = _pad_to(_pad_to(y * scale, dim, 1), m_pad, 0)
    return xs, jnp.sum(xs * xs, 1), ys, jnp.sum(ys * ys, 1), n_pad, m_pad


def _call(kernel, out_shape, in_specs, out_spec, grid, args, **params):
    if any(jax.typeof(a).mat.varying for a in args):
        # JAX 0.10's Pallas interpreter fails on varying types ("Scan carry input
        # and output got mismatched varying manual axes"): say so at trace time
        raise ValueError(
            "PointCloud(backend='pallas') inside jax.shard_map needs "
            "check_vma=False (Pallas calls cannot be typed with varying mesh axes "
            "here); take derivatives outside the shard_map then, or use "
            "backend='xla'."
        )
    call = ft.partial(
        pl.pallas_call,
        ft.partial(kernel, **params),
        out_shape=out_shape,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_spec,
    )
    return lax.platform_dependent(
        *args,
        cpu=call(interpret=True),
        # Triton: blocks are pointers into memory, so the whole other cloud can be
        # a block that the loop reads tile by tile (Mosaic GPU copies blocks)
        cuda=call(compiler_params=plt.CompilerParams(num_warps=4, num_stages=2)),
        default=call(interpret=True),
    )


def _row(width=None):
    if width is None:
        return pl.BlockSpec((BLOCK_ROWS,), lambda i: (i,))
    return pl.BlockSpec((BLOCK_ROWS, width), lambda i: (i, 0))


def _whole(shape):
    return pl.BlockSpec(shape, lambda i: (0,) * len(shape))


def lse_rows(x, y, p, scale, euclidean: bool):
    """$\\mathrm{LSE}_j(p_j - \\tilde C_{ij})$ for every row of `x`, with
    $\\tilde C$ the cost of the points scaled by `scale` (p: -inf where excluded)."""
    n = x.shape[0]
    xs, xx, ys, yy, n_pad, m_pad = _prepare(x, y, scale)
    pp = _pad_to(p, m_pad, 0, -jnp.inf)
    dim = xs.shape[1]
    out = _call(
        _lse_kernel,
        jax.ShapeDtypeStruct((n_pad,), x.dtype),
        [_row(dim), _row(), _whole((m_pad, dim)), _whole((m_pad,)), _whole((m_pad,))],
        _row(),
        (n_pad // BLOCK_ROWS,),
        (xs, xx, ys, yy, pp),
        n_tiles=m_pad // BLOCK_COLS,
        euclidean=euclidean,
    )
    return out[:n]


def expsum_rows(x, y, q, p, v, scale, euclidean: bool):
    """$\\sum_j \\exp(q_i + p_j - \\tilde C_{ij})\\,v_j$ for every row of `x`."""
    n = x.shape[0]
    xs, xx, ys, yy, n_pad, m_pad = _prepare(x, y, scale)
    qp = _pad_to(q, n_pad, 0, -jnp.inf)
    pp = _pad_to(p, m_pad, 0, -jnp.inf)
    vp = _pad_to(v, m_pad, 0)
    dim = xs.shape[1]
    col = _whole((m_pad,))
    out = _call(
        _expsum_kernel,
        jax.ShapeDtypeStruct((n_pad,), x.dtype),
        [_row(dim), _row(), _row(), _whole((m_pad, dim)), col, col, col],
        _row(),
        (n_pad // BLOCK_ROWS,),
        (xs, xx, qp, ys, yy, pp, vp),
        n_tiles=m_pad // BLOCK_COLS,
        euclidean=euclidean,
    )
    return out[:n]


# --------------------------------------------------------------------------------------
# The passes of `Kernel` and `Plan` (solvers/_kernel.py), fused
# --------------------------------------------------------------------------------------


@ft.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def fused(impl, reference, *args):
    """`impl(*args)` (a Pallas pass), differentiated as `reference` (the same pass
    by XLA row passes), which computes the same function up to rounding."""
    return impl(*args)


def _fused_jvp(impl, reference, primals, tangents):
    _, t_out = jvp_live(reference, primals, tangents)
    # the primal through `fused` again, so a second derivative also takes the rule
    # (Pallas kernels are never differentiated)
    return fused(impl, reference, *primals), t_out


fused.defjvp(_fused_jvp, symbolic_zeros=True)


def _scaled(geom, eps):
    """Centred points, their scale (cost / eps = the scaled points' cost) and
    whether the cost is Euclidean."""
    x, y = geom._centred()
    euclidean = geom.cost == "euclidean"
    eps = jnp.asarray(eps, x.dtype)
    return x, y, 1 / eps if euclidean else 1 / jnp.sqrt(eps), euclidean


def _masked(v, ok, eps):
    return jnp.where(ok, v / eps, -jnp.inf)


def f_hat(kernel, g, eps):
    x, y, scale, euclidean = _scaled(kernel.geom, eps)
    p = _masked(g, kernel.mask_b, eps)
    return -eps * lse_rows(x, y, p, scale, euclidean)


def g_hat_local(kernel, f, eps):
    """The column log-sum-exps over this device's rows (combined by the caller)."""
    x, y, scale, euclidean = _scaled(kernel.geom, eps)
    return lse_rows(y, x, _masked(f, kernel.mask_a, eps), scale, euclidean)


def plan_rows(plan, v):
    """$Pv$ (this device's rows)."""
    k = plan.kernel
    x, y, scale, euclidean = _scaled(k.geom, plan.eps)
    q, p = _masked(plan.f, k.mask_a, plan.eps), _masked(plan.g, k.mask_b, plan.eps)
    return expsum_rows(x, y, q, p, v, scale, euclidean)


def plan_cols_local(plan, u):
    """$P^Tu$ over this device's rows (summed across devices by the caller)."""
    k = plan.kernel
    x, y, scale, euclidean = _scaled(k.geom, plan.eps)
    q, p = _masked(plan.f, k.mask_a, plan.eps), _masked(plan.g, k.mask_b, plan.eps)
    return expsum_rows(y, x, p, q, u, scale, euclidean)
