"""Krylov subspace recycling for conjugate gradients: the deflation basis (made
A-orthonormal for the operator at hand) and the harmonic Ritz vectors extracted
from a solve for the next system."""

from __future__ import annotations

import jax
import jax.lax as lax
import jax.numpy as jnp

from jaxdecomp._misc import mm, sym


def _eig_floor(dtype, size: int):
    """Eigenvalues of a Gram matrix below `floor * max` are treated as zero (the
    rounding level of forming it)."""
    return 10 * size * float(jnp.finfo(dtype).eps)


def _orthonormalising_transform(w, aw, extra=None):
    """For rows `w` (with `aw = A w`, and optional `extra` rows of a linear image of
    `w`): `(t, keep, (w, aw, extra))` — the `(m, m)` matrix `t` with rows
    v_i / sqrt(d_i) of the row-normalised Gram matrix W A W^T = V D V^T (zero rows
    for the numerically dependent directions and for non-finite rows), so that
    `t @ w` has q A q^T = I on the kept directions; `keep` marks those; and the
    row sets with their non-finite rows zeroed. O(n m^2) for the Gram matrix only:
    callers that need combinations of the rows, not the rows, never form `t @ w`."""
    finite = jnp.all(jnp.isfinite(w), axis=1) & jnp.all(jnp.isfinite(aw), axis=1)
    if extra is not None:
        finite = finite & jnp.all(jnp.isfinite(extra), axis=1)

    def zero(x):
        return None if x is None else jnp.where(finite[:, None], x, 0)

    w, aw, extra = zero(w), zero(aw), zero(extra)
    # normalise rows first (the Gram matrix's eigenvalues then measure the angles
    # between the directions, not their lengths)
    scale = jnp.linalg.norm(w, axis=1)
    inv_scale = jnp.where(finite & (scale > 0), 1 / jnp.where(scale > 0, scale, 1), 0)
    gram = sym(mm(w, aw.T) * inv_scale[:, None] * inv_scale[None, :])
    d, v = jnp.linalg.eigh(gram)
    keep = d > _eig_floor(w.dtype, w.shape[0]) * jnp.maximum(jnp.max(d), 0)
    inv_sqrt = jnp.where(keep, 1 / jnp.sqrt(jnp.where(keep, d, 1)), 0)
    t = (v * inv_sqrt).T * inv_scale[None, :]  # rows v_i / sqrt(d_i), unscaled
    return t, keep, (w, aw, extra)


def a_orthonormalise(w, aw):
    """Rows `w` (with `aw = A w`) -> rows `q`, `aq` spanning the same space with
    q A q^T = I on the numerically independent directions and zero rows for the
    rest (non-finite rows count as dependent). Returns `q, aq, rank`."""
    t, keep, (w, aw, _) = _orthonormalising_transform(w, aw)
    return mm(t, w), mm(t, aw), jnp.sum(keep)


def basis_independent(w):
    """Whether the rows of `w` are finite and numerically linearly independent
    (smallest eigenvalue of the row-normalised Gram matrix above the rounding level)."""
    finite = jnp.all(jnp.isfinite(w))
    w = jnp.where(finite, w, 0)
    norms = jnp.linalg.norm(w, axis=1, keepdims=True)
    nonzero = jnp.all(norms > 0)
    wn = w / jnp.where(norms > 0, norms, 1)
    smallest = jnp.linalg.eigvalsh(sym(mm(wn, wn.T)))[0]
    return finite & nonzero & (smallest > _eig_floor(w.dtype, w.shape[0]))


def prepare_deflation(matvec, w):
    """`(W, AW)` A-orthonormal rows for `cg_loop(deflation=...)` from rows `w`:
    k matvecs (batched; skipped for an all-zero `w`, e.g. nothing recycled yet or a
    rejected basis) and O(n k^2) work. Also returns the rank kept."""
    w = lax.stop_gradient(w)
    aw = lax.stop_gradient(
        lax.cond(
            jnp.any(w != 0), lambda: jax.vmap(matvec)(w), lambda: jnp.zeros_like(w)
        )
    )
    q, aq, rank = a_orthonormalise(w, aw)
    return (q, aq), rank


def harmonic_ritz(recorded, precond, k: int):
    """The `k` harmonic Ritz vectors of the preconditioned operator M^{-1} A with the
    smallest harmonic Ritz values, from the space Z = span(W, P) of the deflation
    basis and the directions recorded in a solve (`recorded = (Z, AZ, M^{-1} A Z)`
    rows, the last None when M^{-1} must be applied here):

        Z^T A M^{-1} A Z y = theta Z^T A Z y

    (an exact eigenvector v of M^{-1} A in span(Z) is recovered with theta = its
    eigenvalue; harmonic values approximate the small eigenvalues from above, which
    are the ones that slow CG down). Directions that are dependent or non-finite
    are dropped; when fewer than `k` remain, the missing vectors are zero rows (no
    deflation in them). Returns rows `(k, n)` normalised to unit 2-norm and the
    values `(k,)` (inf where missing).

    Solved in coefficient space: with T the A-orthonormalising transform of the m
    rows of Z (from the m x m Gram matrix), C = T (AZ)(M^{-1}AZ)^T T^T, and only
    the k result rows Y T Z are formed: two m x m x n Gram products and one
    k x m x n product, instead of transforming all three row sets: measured
    1.3-1.9x faster (n = 16384-65536, k = 16-32; at 128^2 with k = 32 the old
    extraction took 67-88 ms of the ~110 ms that recycling added per system with
    Multigrid)."""
    z, az, maz = (None if x is None else lax.stop_gradient(x) for x in recorded)
    t, valid, (z, az, maz) = _orthonormalising_transform(z, az, maz)
    if maz is None:
        # a flexible (possibly nonlinear) preconditioner: applied to the
        # A-orthonormal rows themselves
        aq = mm(t, az)
        maq = jax.vmap(precond)(aq)
        maq = jnp.where(valid[:, None] & jnp.isfinite(maq), maq, 0)
        c = sym(mm(aq, maq.T))
    else:
        c = sym(mm(mm(t, mm(az, maz.T)), t.T))
    # dropped directions get an eigenvalue above every valid one (the valid block is
    # positive semidefinite, so its eigenvalues are at most its trace)
    big = 1 + 2 * jnp.sum(jnp.abs(jnp.diag(c)))
    theta, u = jnp.linalg.eigh(c + jnp.diag(jnp.where(valid, 0, big)))
    theta, u = theta[:k], u[:, :k]
    ok = theta < big / 2
    vectors = mm(mm(u.T, t), z)
    norms = jnp.linalg.norm(vectors, axis=1, keepdims=True)
    ok = ok & (norms[:, 0] > 0)
    vectors = jnp.where(ok[:, None], vectors / jnp.where(ok[:, None], norms, 1), 0)
    return vectors, jnp.where(ok, theta, jnp.inf)
