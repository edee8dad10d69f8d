"""Tests for inv_pth_root and polar."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg as sla
from jax.test_util import check_grads

import jaxdecomp

from .test_sqrtm import rel, spd, symmetrised


def inv_root_ref(a, p, ridge=0.0):
    w, v = np.linalg.eigh(np.asarray(a, np.float64) + ridge * np.eye(a.shape[-1]))
    return (v * w ** (-1.0 / p)) @ v.T


@pytest.mark.parametrize("p", [1, 2, 3, 4, 8])
def test_inv_pth_root_accuracy(p):
    a = spd(40, 1e4, seed=p)
    methods = ["eigh"] + (["newton_schulz"] if p in (2, 4, 8) else [])
    for method in methods:
        z = jaxdecomp.inv_pth_root(jnp.asarray(a), p, ridge=1e-3, method=method)
        assert rel(z, inv_root_ref(a, p, 1e-3)) <= 1e-10
        z32 = jaxdecomp.inv_pth_root(
            jnp.asarray(a, jnp.float32), p, ridge=1e-3, method=method
        )
        assert z32.dtype == jnp.float32
        assert rel(z32, inv_root_ref(np.asarray(a, np.float32), p, 1e-3)) <= 1e-4


@pytest.mark.parametrize("n", [64, 256])
def test_inv_pth_root_float32_eigh_without_ridge(n):
    # kappa = 1e4: the Rayleigh-Ritz correction of the float32 eigh measures
    # 0.9-1.8e-5 (a plain float32 eigh 1.7-2.1e-4).
    a = np.asarray(spd(n, 1e4, seed=n), np.float32)
    z = jaxdecomp.inv_pth_root(jnp.asarray(a), 4, method="eigh")
    assert z.dtype == jnp.float32
    assert rel(z, inv_root_ref(a, 4)) <= 4e-5


@pytest.mark.parametrize("method,p", [("eigh", 3), ("eigh", 4), ("newton_schulz", 4)])
def test_inv_pth_root_grads(method, p):
    a = jnp.asarray(spd(5, 10.0, seed=1))
    check_grads(
        jax.jit(
            symmetrised(
                lambda a: jaxdecomp.inv_pth_root(a, p, ridge=0.1, method=method)
            )
        ),
        (a,),
        order=2,
        modes=("fwd", "rev"),
        eps=1e-5,
    )
    # Finite and exact at the identity (repeated eigenvalues): dZ = -dA / (p 2^{1+1/p}).
    da = jnp.asarray(spd(4, 3.0, seed=2))
    _, dz = jax.jvp(
        lambda a: jaxdecomp.inv_pth_root(a, p, method=method), (2 * jnp.eye(4),), (da,)
    )
    np.testing.assert_allclose(dz, -da * 2.0 ** (-1 - 1 / p) / p, atol=1e-12)


def test_inv_pth_root_vmap_jit_and_errors():
    batch = jnp.stack([jnp.asarray(spd(5, k, seed=i)) for i, k in enumerate([3, 30])])
    f = jax.jit(
        eqx.debug.assert_max_traces(
            lambda a: jaxdecomp.inv_pth_root(a, 4, method="eigh"), max_traces=1
        )
    )
    np.testing.assert_allclose(
        jax.vmap(f)(batch), jnp.stack([f(a) for a in batch]), atol=1e-12
    )
    with pytest.raises(ValueError, match="positive Python int"):
        jaxdecomp.inv_pth_root(jnp.eye(3), 0)
    with pytest.raises(ValueError, match="power of two"):
        jaxdecomp.inv_pth_root(jnp.eye(3), 3, method="newton_schulz")
    with pytest.raises(ValueError, match="ridge"):
        jaxdecomp.inv_pth_root(jnp.eye(3), 2, ridge=-1.0)
    with pytest.raises(Exception, match="positive definite"):
        jaxdecomp.inv_pth_root(jnp.diag(jnp.array([1.0, 0.0, 2.0])), 4, method="eigh")
    sol = jaxdecomp.inv_pth_root(
        jnp.diag(jnp.array([1.0, 0.0, 2.0])), 4, ridge=1e-2, full_output=True
    )
    assert sol.result == jaxdecomp.RESULTS.successful and float(sol.residual) < 1e-12


@pytest.mark.parametrize("shape", [(6, 6), (9, 4), (3, 7), (2, 5, 3)])
@pytest.mark.parametrize("method", ["svd", "newton_schulz"])
def test_polar(shape, method):
    rng = np.random.default_rng(sum(shape))
    a = rng.normal(size=shape)

    def ref(m):
        return sla.polar(m)[0] if m.shape[0] >= m.shape[1] else sla.polar(m.T)[0].T

    expected = np.stack([ref(m) for m in a.reshape(-1, *shape[-2:])]).reshape(shape)
    u = jaxdecomp.polar(jnp.asarray(a), method=method)
    np.testing.assert_allclose(u, expected, atol=1e-12)
    u32 = jaxdecomp.polar(jnp.asarray(a, jnp.float32), method=method)
    assert u32.dtype == jnp.float32
    assert rel(u32, expected) <= 1e-5
    if len(shape) == 2:
        check_grads(
            jax.jit(lambda a: jaxdecomp.polar(a, method=method)),
            (jnp.asarray(a),),
            order=2,
            modes=("fwd", "rev"),
            eps=1e-5,
        )
    else:
        looped = jnp.stack([jaxdecomp.polar(m, method=method) for m in jnp.asarray(a)])
        np.testing.assert_allclose(
            jax.vmap(lambda m: jaxdecomp.polar(m, method=method))(jnp.asarray(a)),
            looped,
            atol=1e-12,
        )


def test_polar_errors():
    with pytest.raises(ValueError, match=r"\(\.\.\., n, n\)"):
        jaxdecomp.polar(jnp.ones(3))
    with pytest.raises(ValueError, match="method"):
        jaxdecomp.polar(jnp.ones((3, 3)), method="qr")
    for method in ("svd", "newton_schulz"):
        with pytest.raises(Exception, match="rank deficient"):
            jaxdecomp.polar(jnp.ones((4, 3)), method=method)
        with pytest.raises(Exception, match="NaN or inf"):
            jaxdecomp.polar(jnp.eye(3).at[0, 0].set(jnp.inf), method=method)
