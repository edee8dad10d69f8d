"""The (flexible, deflated) preconditioned conjugate-gradient iteration with a
true-residual check: behind `solvers.cg`, the inner solves of the OT solvers, and the
default symmetric tangent solver of `jaxdecomp.custom_root` (`solvers` imports it from
here; `jaxdecomp` may not import `solvers`)."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp

from ._misc import mm

# `cg_loop(verify=True)`: at most this many true-residual checks, each of which must
# be this factor below the previous one to go on
_MAX_CHECKS = 8
_PROGRESS = 0.9
# deflated CG in float64: the residual's coarse correction every this many steps
_CLEAN_EVERY_F64 = 4


def rhs_scale(b):
    """s = max|b| (1 when b is zero or not finite), without gradient: the scale by
    which the Krylov loops divide the problem so that their norms neither underflow
    nor overflow."""
    s = lax.stop_gradient(jnp.max(jnp.abs(b)))
    return jnp.where((s > 0) & jnp.isfinite(s), s, 1).astype(b.dtype)


def scaled_cg_loop(matvec, precond, b, x0, *, atol, **options):
    """`cg_loop` on the problem scaled by s = max|b| (A (x / s) = b / s), so that the
    norms in the stopping test neither underflow (||b|| ~ 1e-25 in float32 would
    give a zero tolerance) nor overflow (~1e25 would give inf). The returned residual
    norms are in the original units; b = 0 gives x = 0. The deflation basis and the
    recorded directions are scale-free (only their span is used)."""
    s = rhs_scale(b)
    x, (k, norms, converged, rnorm, inaccurate), recorded = cg_loop(
        matvec, precond, b / s, x0 / s, atol=atol / s, **options
    )
    return x * s, (k, norms * s, converged, rnorm * s, inaccurate), recorded


def cg_loop(
    matvec,
    precond,
    b,
    x0,
    *,
    rtol,
    atol,
    max_steps,
    flexible,
    unroll,
    memory=1,
    deflation=None,
    window=0,
    fixed_steps=False,
    verify=True,
):
    """The (flexible) preconditioned CG iteration behind `solvers.cg` and the OT
    solvers' inner solves. Returns `x, (steps, residual_norms, converged, ||r||,
    inaccurate), recorded`.

    Flexible CG is Notay's FCG(memory): each new direction is A-orthogonalised
    against the last `memory` directions, kept in fixed-size ring buffers.

    `deflation = (W, AW)`, `(k, n)` rows with W A W^T = I (zero rows allowed): deflated
    CG (Saad, Yeung, Erhel & Guyomarc'h 2000). The initial guess is corrected so that
    W r_0 = 0 and every direction is A-orthogonalised against W,
    p <- p - W^T (AW z), which keeps the residual orthogonal to span(W): the iteration
    runs on the complement of the deflated (slow) modes. Each step also removes the
    residual's rounding-level component in span(W) by a coarse correction
    (r <- r - AW^T (W r), its x-part summed and applied at the end, as in the
    A-DEF2 variant that Tang, Nabben, Vuik & Erlangga 2009 found robust): without
    it float32 deflated CG diverged. No extra matvec; 4 products with k x n
    matrices per step in float32 (and below), 2.5 in float64, where the coarse
    correction runs every 4th step: its rounding drift is 1e-16 per step. (In
    float32 every 8th step saved 15% of the time at the same iteration counts,
    but every 32nd made Multigrid-deflated CG diverge: measured, 128^2
    sequences; so every step there, for a margin. In float64, every 4th step:
    the same iteration counts, 0.88x the time, measured on 10 heat steps at
    256^2 with IC(0) and k = 32; a 32^2 field at rtol 1e-13 took the same 163
    steps with the correction every step, every 4th, every 64th or never.)

    `window > 0` records the first `window` directions for recycling and returns
    `recorded = (Z, AZ, M^{-1} A Z)`: rows of the deflation basis and of the
    directions (zero rows when the solve stops earlier); the third is None for
    flexible CG. Otherwise `recorded = None`.

    `fixed_steps` (lineax's convention for `rtol = atol = 0`): exactly `max_steps`
    steps (fewer only on an exactly zero residual), reported as converged unless
    the iteration broke down or went non-finite.

    `verify` (not with `fixed_steps`): convergence is judged on the true residual
    b - A x. When the recursively updated residual reaches the tolerance, the CG
    loop ends and one matvec gives A x (an outer loop of at most 8 checks around
    the CG loop: nothing of the check runs in the CG steps themselves).
    If ||b - A x|| <= tol the solve has converged (and `||r||` and the last
    residual-norm entry are the true ones). Otherwise the residual is replaced by
    the true one and CG restarts from x (p = z: the old direction was conjugate to
    a residual that no longer holds) until the recursive residual reaches tol / 2;
    a check that is not at least 10% below the previous one, or the 8th check,
    stops with `inaccurate` set: the tolerance is below what the dtype attains,
    about eps ||A|| ||x||. Measured (`benchmarks.cg.true_residual_table`), float32,
    64^2 diffusion field (variance 1.5), b = 1, Jacobi: at rtol 3.5e-4 the
    iteration alone stops after 216 steps at a true residual of 2.1e-3; checked,
    241 steps and 2.6e-4; at rtol 1e-5 `inaccurate` after 316 steps at 1.6e-4
    (alone: 261 steps, "converged", 2.1e-3). (Requiring 2x per check instead of
    10%, or tol instead of tol / 2 after a replacement, stopped flexible CG as
    `inaccurate` at 1.0-1.3x tol on attainable tolerances.) Check steps do not
    count as steps."""
    tol = jnp.maximum(rtol * jnp.linalg.norm(lax.stop_gradient(b)), atol)
    r0 = b - matvec(x0)
    if deflation is not None:
        w, aw = deflation
        c = mm(w, r0)
        x0 = x0 + mm(c, w)
        r0 = r0 - mm(c, aw)

        def project(z):
            return z - mm(mm(aw, z), w)

        def clean(r):
            # the residual's component in span(W) (rounding noise that the
            # A-orthogonalised directions cannot reduce; left alone it grows until
            # it dominates r and CG diverges: measured, float32 went to inf) is
            # removed by a coarse correction; its x-part is applied at the end
            c = mm(w, r)
            return r - mm(c, aw), c

    else:

        def project(z):
            return z

        def clean(r):
            return r, None

    z0 = precond(r0)
    norms0 = jnp.full((max_steps + 1,), jnp.nan, b.dtype)
    norms0 = norms0.at[0].set(jnp.linalg.norm(r0))
    m = memory if flexible else 0
    # ring buffers: directions p_j, A p_j and p_j^T A p_j (1 where empty: no effect)
    ring = (
        jnp.zeros((m, b.shape[0]), b.dtype),
        jnp.zeros((m, b.shape[0]), b.dtype),
        jnp.ones((m,), b.dtype),
    )
    # recycling record: the first `window` directions p_j and A p_j; for a fixed
    # preconditioner (not flexible) also z_0..z_window, alpha_j and the coarse
    # coefficients c_j, from which M^{-1} A p_j follows without applying M^{-1}
    k_defl = 0 if deflation is None else deflation[0].shape[0]
    # the coarse correction of the residual every step in float32 (and below), every
    # `_CLEAN_EVERY_F64`th step in float64 (its rounding drift is 1e-16 per step)
    clean_every = 1 if jnp.finfo(b.dtype).bits <= 32 else _CLEAN_EVERY_F64
    z_trick = bool(window) and not flexible
    record0 = (
        jnp.zeros((window, b.shape[0]), b.dtype),
        jnp.zeros((window, b.shape[0]), b.dtype),
        jnp.zeros((window + 1 if z_trick else 0, b.shape[0]), b.dtype).at[0].set(z0)
        if z_trick
        else None,
        jnp.zeros((window,), b.dtype),
        jnp.zeros((window, k_defl), b.dtype),
    )
    rz0 = jnp.vdot(r0, z0)
    coarse0 = None if deflation is None else jnp.zeros(deflation[0].shape[0], b.dtype)
    verify = verify and not fixed_steps
    start_converged = norms0[0] <= tol

    def like_b(v):
        # v typed like the data (inside shard_map with check_vma=True, varying when
        # b is: the checks make the counters data-dependent)
        return jnp.where(start_converged, v, v)

    init = (
        x0,
        coarse0,
        r0,
        z0,
        project(z0),
        rz0,
        ring,
        record0,
        norms0,
        like_b(jnp.array(0)) if verify else jnp.array(0),
        # already converged (e.g. an exact warm start, or a fully deflated
        # residual, whose rounding noise CG must not iterate on)
        start_converged,
    )

    def cg_steps(s, target):
        """CG steps until the recursive residual reaches `target`, breakdown,
        non-finite values or `max_steps`."""

        def cond(s):
            *_, k, stop = s
            return ~stop & (k < max_steps)

        def body(s):
            x, coarse, r, z, p, rz, ring, record, norms, k, _ = s
            ap = matvec(p)
            pap = jnp.vdot(p, ap)
            breakdown = ~(pap > 0) | ~(rz > 0)  # non-SPD operator or preconditioner
            # flexible: alpha = p^T r / p^T A p (= r^T z / p^T A p for a fixed SPD M)
            num = jnp.vdot(p, r) if flexible else rz
            alpha = jnp.where(breakdown, 0, num / jnp.where(breakdown, 1, pap))
            # on breakdown keep the last iterate (p may hold NaN from a broken M^-1)
            x = jnp.where(breakdown, x, x + alpha * p)
            r_new = jnp.where(breakdown, r, r - alpha * ap)
            if deflation is None or clean_every == 1:
                r_new, c = clean(r_new)
            else:
                r_new, c = lax.cond(
                    (k + 1) % clean_every == 0,
                    clean,
                    lambda r: (r, jnp.zeros(k_defl, r.dtype)),
                    r_new,
                )
            if deflation is not None:
                coarse = coarse + c
            z_new = precond(r_new)
            rz_new = jnp.vdot(r_new, z_new)
            if window:
                record = _record(record, k, window, p, ap, z_new, alpha, c)
            if flexible:
                ps, aps, paps = ring
                i = k % m
                ps, aps = ps.at[i].set(p), aps.at[i].set(ap)
                paps = paps.at[i].set(jnp.where(breakdown, 1, pap))
                ring = (ps, aps, paps)
                coef = mm(aps, z_new) / paps
                p = project(z_new - mm(coef, ps))
            else:
                beta = jnp.where(breakdown, 0, rz_new / jnp.where(breakdown, 1, rz))
                p = project(z_new) + beta * p
            norm = jnp.linalg.norm(r_new)
            norms = norms.at[k + 1].set(norm)
            stop = (norm <= target) | breakdown | ~jnp.isfinite(norm)
            return x, coarse, r_new, z_new, p, rz_new, ring, record, norms, k + 1, stop

        if unroll:
            return eqx.internal.while_loop(
                cond, body, s, max_steps=max_steps, kind="checkpointed"
            )
        return lax.while_loop(cond, body, s)

    def check(s, n_checks, last):
        """The true residual of the iterate: accepted, or the residual replaced
        by it and CG restarted from the iterate (p = z: the old direction was
        conjugate to a residual that no longer holds), or stalled."""
        x, coarse, _, _, p, _, ring, record, norms, k, _ = s
        if deflation is not None:
            x = x + mm(coarse, deflation[0])
        true_r = b - matvec(x)
        true_norm = jnp.linalg.norm(true_r)
        accurate = true_norm <= tol
        stalled = ~accurate & (
            ~(true_norm <= _PROGRESS * last) | (n_checks + 1 >= _MAX_CHECKS)
        )
        r, c = clean(true_r)
        coarse = None if deflation is None else c
        z = precond(r)
        if flexible:
            ps, aps, paps = ring
            p = project(z - mm(mm(aps, z) / paps, ps))
        else:
            p = project(z)
        norms = norms.at[k].set(true_norm)
        stop = accurate | stalled | ~jnp.isfinite(true_norm)
        s = (x, coarse, r, z, p, jnp.vdot(r, z), ring, record, norms, k, stop)
        return s, true_norm, accurate, stalled

    if not verify:
        s = cg_steps(init, tol)
        accepted, inaccurate = None, like_b(False)
    else:
        # CG steps to the tolerance, then one matvec for the true residual; after
        # a failed check the recursive residual must reach tol / 2 before the next
        # (stopping at tol again would leave the true residual at tol plus the new
        # drift, just above it: measured, flexible CG checked 0.1306, then 0.1300
        # against 0.128, `inaccurate`). The checks run between the CG loops, never
        # inside them: doing the check's vector work in every step, as a masked
        # check step, or a lax.cond between check and CG steps, made float64
        # Jacobi-PCG slower; nested in this loop it costs nothing measurable
        # (`benchmarks.cg.check_cost_table`: 0.89-0.91x the loop without it).
        def outer_cond(o):
            return ~o[-1]

        def outer_body(o):
            s, n_checks, last, _, _, _ = o
            target = jnp.where(n_checks > 0, 0.5 * tol, tol)
            s = cg_steps(s[:-1] + (o[-1],), target)  # (no steps once done)
            k, norms = s[-2], s[-3]
            reached = norms[k] <= target  # not: breakdown, NaN or max_steps
            checked, true_norm, accurate, stalled = check(s, n_checks, last)
            s = jax.tree_util.tree_map(
                lambda a, b: jnp.where(reached, a, b), checked, s
            )
            return (
                s,
                n_checks + reached.astype(n_checks.dtype),
                jnp.where(reached, true_norm, last),
                reached & accurate,
                reached & stalled,
                ~reached | accurate | stalled,
            )

        o = (
            init,
            like_b(jnp.array(0)),
            like_b(jnp.array(jnp.inf, b.dtype)),
            start_converged,
            like_b(False),
            start_converged,
        )
        if unroll:
            o = eqx.internal.while_loop(
                outer_cond,
                outer_body,
                o,
                max_steps=_MAX_CHECKS + 1,
                kind="checkpointed",
            )
        else:
            o = lax.while_loop(outer_cond, outer_body, o)
        s, _, _, accepted, inaccurate, _ = o
    x, coarse, r, _, _, _, _, record, norms, k, stop = s
    if deflation is not None:
        x = x + mm(coarse, deflation[0])
    # the stop flag also fires on breakdown; convergence is judged on the residual
    # (with `verify`, on the true residual by the last check step; r then is the
    # true residual, up to its rounding-level part in span(W))
    rnorm = jnp.linalg.norm(r)
    converged = accepted if verify else rnorm <= tol
    if fixed_steps:
        converged = converged | (~stop & (k == max_steps) & jnp.isfinite(rnorm))
    info = (k, norms, converged, rnorm, inaccurate)
    if not window:
        return x, info, None
    return x, info, _recycling_basis(record, k, window, deflation, precond)


def _record(record, k, window, p, ap, z_new, alpha, c):
    """Store step k's p, A p, z_{k+1}, alpha_k and c_k while k < window (in place: a
    select of the old row once the window is full). The first directions are the
    better choice: measured, the last `window` recycle worse (198 vs 94 steps per
    heat step, 64^2)."""
    slot = jnp.minimum(k, window - 1)
    full = k >= window

    def put(buf, v, at):
        return lax.dynamic_update_index_in_dim(buf, jnp.where(full, buf[at], v), at, 0)

    ps, aps, zs, alphas, cs = record
    ps, aps = put(ps, p, slot), put(aps, ap, slot)
    if zs is not None:
        zs = put(zs, z_new, slot + 1)
    alphas = put(alphas, alpha, slot)
    if c is not None:
        cs = put(cs, c, slot)
    return ps, aps, zs, alphas, cs


def _recycling_basis(record, k, window, deflation, precond):
    """`(Z, AZ, M^{-1} A Z)` rows for the Ritz extraction: the deflation basis and
    the recorded directions (rows of steps not taken or broken down are zero).
    M^{-1} A p_j = (z_j - z_{j+1} - (M^{-1} A W)^T c_j) / alpha_j, from
    r_{j+1} = r_j - alpha_j A p_j - (AW)^T c_j: only the k_defl rows of
    M^{-1} A W cost preconditioner applications. `None` for the third entry with a
    flexible (possibly nonlinear) preconditioner."""
    ps, aps, zs, alphas, cs = record
    valid = (alphas != 0) & (jnp.arange(window) < k)
    ps = jnp.where(valid[:, None], ps, 0)
    aps = jnp.where(valid[:, None], aps, 0)
    maps, maw = None, None
    if zs is not None:
        diff = zs[:-1] - zs[1:]
        if deflation is not None:
            maw = jax.vmap(precond)(deflation[1])
            diff = diff - mm(cs, maw)
        maps = diff / jnp.where(valid, alphas, 1)[:, None]
        maps = jnp.where(valid[:, None], maps, 0)
    if deflation is None:
        return ps, aps, maps
    w, aw = deflation
    return (
        jnp.concatenate([w, ps]),
        jnp.concatenate([aw, aps]),
        None if maps is None else jnp.concatenate([maw, maps]),
    )
