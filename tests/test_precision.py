"""The `precision=` option of the Newton–Schulz paths: split-bfloat16 / 3xTF32
matmuls (float32 accuracy on GPU tensor cores). The schemes are formed in JAX, so
their accuracy is measured here on the CPU exactly as a GPU computes it."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg as sla

import jaxdecomp
from jaxdecomp._matmul import PRECISIONS, round_to_tf32, scheme_matmul

SCHEMES = ["bf16x3", "tf32x3", "bf16x6"]
# Measured per-matmul relative error bounds (n = 64..1024, normal entries; the
# observed values are 4.4e-6 / 1.6e-7..4e-7 / 6.6e-8..2.5e-7, HIGHEST 1.5e-7..4e-7)
# and the lower bound that shows a scheme really drops bits (not silently float32).
GEMM_BOUND = {"highest": 1e-6, "bf16x3": 1e-5, "tf32x3": 1e-6, "bf16x6": 1e-6}


def spd(n, kappa, seed=0):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    return (q * np.geomspace(1.0, 1.0 / kappa, n)) @ q.T


def rel(x, ref):
    return np.linalg.norm(np.asarray(x, np.float64) - ref) / np.linalg.norm(ref)


def eig_fn(a, f):
    w, v = np.linalg.eigh(a)
    return (v * f(w)) @ v.T


def test_round_to_tf32():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(4096) * 10.0 ** rng.uniform(-30, 30, 4096))
    x = x.astype(jnp.float32)
    r = round_to_tf32(x)
    bits = np.asarray(jax.lax.bitcast_convert_type(r, jnp.uint32))
    assert np.all(bits & 0x1FFF == 0)  # 10 explicit significand bits left
    err = np.abs(np.asarray(r, np.float64) - np.asarray(x, np.float64))
    assert np.all(err <= 2.0**-11 * np.abs(np.asarray(x, np.float64)))  # to nearest
    # exact TF32 values, and ties to even: 1 + 2^-11 -> 1, 1 + 3 * 2^-11 -> 1 + 2^-9
    one = np.float32(1.0)
    vals = jnp.asarray(
        [1.25, -3.0, 0.0, one + 2.0**-11, one + 3 * 2.0**-11], jnp.float32
    )
    np.testing.assert_array_equal(
        round_to_tf32(vals), np.array([1.25, -3.0, 0.0, 1.0, 1 + 2.0**-9], np.float32)
    )


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("n", [64, 512])
def test_scheme_matmul_accuracy(precision, n):
    rng = np.random.default_rng(n)
    a, b = rng.standard_normal((2, 3, n, n))  # a batch of 3
    ref = a @ b
    mm, unit = scheme_matmul(precision, jnp.float32)
    out = jax.jit(mm)(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
    assert out.dtype == jnp.float32 and out.shape == (3, n, n)
    err = rel(out, ref)
    assert err <= GEMM_BOUND[precision], err
    if precision == "bf16x3":
        assert err >= 1e-6, "the bfloat16 parts must really be bfloat16"
        assert unit == 2.0**-15
    # bfloat16-valued operands: the one-part products are exact (float32 sums only)
    ab = np.asarray(jnp.asarray(a, jnp.bfloat16), np.float64)
    bb = np.asarray(jnp.asarray(b, jnp.bfloat16), np.float64)
    exact = mm(jnp.asarray(ab, jnp.float32), jnp.asarray(bb, jnp.float32))
    assert rel(exact, ab @ bb) <= 1e-6
    # float64 input ignores the scheme: float64 matmuls
    mm64, unit64 = scheme_matmul(precision, jnp.float64)
    assert unit64 is None
    assert rel(mm64(jnp.asarray(a), jnp.asarray(b)), ref) <= 1e-14


# Relative error bounds of the float32 results vs float64 (kappa 1e3, n = 96).
# Measured: NS sqrt 3-7e-6 (highest, tf32x3, bf16x6), 8-9e-5 (bf16x3); mixed 4-8e-7
# (1e-5 with bf16x3); inverse roots 3-9e-6 (2.2e-4 bf16x3); polar 4-6e-7 (1.6e-5),
# Lyapunov 1.2-2.1e-6 (6.8e-5).
ROOT_BOUND = {"highest": 2e-5, "tf32x3": 2e-5, "bf16x6": 2e-5, "bf16x3": 3e-4}


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize(
    "fn,method",
    [
        ("sqrtm", "newton_schulz"),
        ("sqrtm", "mixed"),
        ("inv_sqrtm", "newton_schulz"),
        ("sqrtm_and_inv_sqrtm", "mixed"),
    ],
)
def test_roots_float32_accuracy(fn, method, precision):
    a = spd(96, 1e3)
    refs = {
        "sqrtm": [eig_fn(a, np.sqrt)],
        "inv_sqrtm": [eig_fn(a, lambda w: w**-0.5)],
    }
    refs["sqrtm_and_inv_sqrtm"] = refs["sqrtm"] + refs["inv_sqrtm"]
    sol = getattr(jaxdecomp, fn)(
        jnp.asarray(a, jnp.float32),
        method=method,
        precision=precision,
        full_output=True,
    )
    assert sol.result == jaxdecomp.RESULTS.successful
    values = sol.value if isinstance(sol.value, tuple) else (sol.value,)
    for v, ref in zip(values, refs[fn]):
        assert v.dtype == jnp.float32
        scale = 1.0 if ref is refs["sqrtm"][0] else 2.0  # inverse: worse conditioned
        assert rel(v, ref) <= scale * ROOT_BOUND[precision], rel(v, ref)
    # float64 ignores the scheme, bit for bit
    f64 = getattr(jaxdecomp, fn)(jnp.asarray(a), method=method, precision=precision)
    f64_highest = getattr(jaxdecomp, fn)(jnp.asarray(a), method=method)
    for x, y in zip(jax.tree.leaves(f64), jax.tree.leaves(f64_highest)):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_inv_pth_root_float32_accuracy(precision):
    a = spd(64, 1e2, 8)
    ref = eig_fn(a, lambda w: w**-0.25)
    z = jaxdecomp.inv_pth_root(
        jnp.asarray(a, jnp.float32), 4, method="newton_schulz", precision=precision
    )
    assert z.dtype == jnp.float32
    assert rel(z, ref) <= ROOT_BOUND[precision], rel(z, ref)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_polar_and_lyapunov_float32_accuracy(precision):
    rng = np.random.default_rng(1)
    g = rng.standard_normal((80, 48)) @ np.diag(np.geomspace(1, 1e-2, 48))
    w, _, vt = np.linalg.svd(g, full_matrices=False)
    u = jaxdecomp.polar(
        jnp.asarray(g, jnp.float32), method="newton_schulz", precision=precision
    )
    assert u.dtype == jnp.float32
    assert rel(u, w @ vt) <= ROOT_BOUND[precision], rel(u, w @ vt)
    s, rhs = spd(64, 1e2, 2), spd(64, 10.0, 3)
    x = jaxdecomp.solve_lyapunov(
        jnp.asarray(s, jnp.float32),
        jnp.asarray(rhs, jnp.float32),
        method="newton_schulz",
        precision=precision,
    )
    ref = sla.solve_continuous_lyapunov(s, rhs)
    assert rel(x, ref) <= ROOT_BOUND[precision], rel(x, ref)


def _eigh_reference_derivatives(a, da, cot):
    """Float64 derivatives of A^{1/2}: jvp along da and the vjp of cot (eigh)."""
    a64 = jnp.asarray(a)
    _, t = jax.jvp(lambda m: jaxdecomp.sqrtm(m, method="eigh"), (a64,), (da,))
    _, vjp = jax.vjp(lambda m: jaxdecomp.sqrtm(m, method="eigh"), a64)
    return np.asarray(t), np.asarray(vjp(jnp.asarray(cot))[0])


@pytest.mark.parametrize("precision", ["tf32x3", "bf16x6", "bf16x3"])
def test_float32_derivatives_both_modes(precision):
    """jvp and vjp of A^{1/2} with the scheme in the forward and the Newton-Schulz
    Lyapunov backward, against float64 eigh derivatives."""
    a = spd(48, 1e2, 4)
    da = spd(48, 10.0, 5)
    cot = np.random.default_rng(6).standard_normal((48, 48))
    t_ref, g_ref = _eigh_reference_derivatives(a, jnp.asarray(da), cot)

    def f(m):
        return jaxdecomp.sqrtm(
            m, method="newton_schulz", backward="newton_schulz", precision=precision
        )

    a32 = jnp.asarray(a, jnp.float32)
    _, t = jax.jvp(f, (a32,), (jnp.asarray(da, jnp.float32),))
    _, vjp = jax.vjp(f, a32)
    (g,) = vjp(jnp.asarray(cot, jnp.float32))
    bound = ROOT_BOUND[precision]  # measured 2.2-3.9e-6; bf16x3 1.1e-4
    assert t.dtype == g.dtype == jnp.float32
    assert rel(t, t_ref) <= bound, rel(t, t_ref)
    # the cotangent of a symmetric-input function: compare symmetric parts
    g, g_ref = 0.5 * (g + g.T), 0.5 * (g_ref + g_ref.T)
    assert rel(g, g_ref) <= bound, rel(g, g_ref)


def test_float64_check_grads_with_a_scheme():
    """The option is threaded through the rules without touching float64 maths."""
    from jax.test_util import check_grads

    a = jnp.asarray(spd(5, 10.0, 7))

    def f(m):
        m = 0.5 * (m + m.T)
        return jaxdecomp.sqrtm(
            m, method="newton_schulz", backward="newton_schulz", precision="bf16x6"
        )

    check_grads(f, (a,), order=2, modes=("fwd", "rev"))


def test_jit_no_recompile_and_vmap():
    traces = []

    @jax.jit
    def f(a):
        traces.append(a.shape)
        return jaxdecomp.sqrtm(a, method="newton_schulz", precision="bf16x6")

    batch = jnp.asarray(np.stack([spd(8, 10.0, s) for s in range(3)]), jnp.float32)
    looped = jnp.stack([f(b) for b in batch])
    np.testing.assert_allclose(jax.vmap(f)(batch), looped, rtol=1e-5, atol=1e-6)
    assert traces == [(8, 8)], traces  # vmap's trace is of the unbatched shape


@pytest.mark.parametrize(
    "call",
    [
        lambda a, p: jaxdecomp.sqrtm(a, method="newton_schulz", precision=p),
        lambda a, p: jaxdecomp.inv_sqrtm(a, precision=p),
        lambda a, p: jaxdecomp.sqrtm_and_inv_sqrtm(a, precision=p),
        lambda a, p: jaxdecomp.polar(a, method="newton_schulz", precision=p),
        lambda a, p: jaxdecomp.solve_lyapunov(a, a, precision=p),
        lambda a, p: jaxdecomp.inv_pth_root(a, 4, precision=p),
    ],
    ids=[
        "sqrtm",
        "inv_sqrtm",
        "sqrtm_and_inv_sqrtm",
        "polar",
        "solve_lyapunov",
        "inv_pth_root",
    ],
)
@pytest.mark.parametrize("bad", ["fp8", "HIGHEST", None, jax.lax.Precision.HIGHEST])
def test_bad_precision_raises_at_trace_time(call, bad):
    a = jnp.eye(3, dtype=jnp.float32)
    with pytest.raises(ValueError, match="precision must be one of"):
        jax.jit(lambda a: call(a, bad))(a)


def test_scheme_failure_is_visible():
    """An indefinite input still fails visibly with a split scheme."""
    bad = jnp.array([[1.0, 2.0], [2.0, 1.0]], jnp.float32)
    for method in ("newton_schulz", "mixed"):
        with pytest.raises(eqx.EquinoxRuntimeError):
            jaxdecomp.sqrtm(bad, method=method, precision="bf16x3")


def test_schemes_lower_for_cuda_to_tensor_core_dots():
    """Lowered for CUDA (from this CPU machine): `tf32x3` uses XLA's TF32 dot
    algorithm on TF32-valued parts, the bfloat16 schemes bfloat16 dots; HIGHEST
    neither."""
    import re

    from jax import export

    a = jnp.eye(16, dtype=jnp.float32)
    texts = {}
    for p in PRECISIONS:
        fn = jax.jit(
            lambda m, p=p: jaxdecomp.sqrtm(
                m, method="newton_schulz", precision=p, throw=False
            )
        )
        texts[p] = export.export(fn, platforms=("cuda",))(a).mlir_module()
    tf32 = re.compile(r"lhs_precision_type = tf32")
    assert tf32.search(texts["tf32x3"]) and "bf16" not in texts["tf32x3"]
    for p in ("bf16x3", "bf16x6"):
        assert "bf16" in texts[p] and not tf32.search(texts[p])
    assert "bf16" not in texts["highest"] and not tf32.search(texts["highest"])
