"""The fused Pallas kernels of the online point-cloud passes (`backend="pallas"`),
in Pallas's interpret mode on the CPU: agreement with the XLA row passes and with a
dense float64 reference, derivatives in both modes, jit/vmap, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.special import logsumexp
from jax.test_util import check_grads

import solvers
from solvers import _pallas
from solvers._kernel import Kernel

from .helpers import run_on_host_devices


def _clouds(n, m, d, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.uniform(size=(n, d)), dtype)
    y = jnp.asarray(rng.uniform(size=(m, d)), dtype)
    return x, y


def _cost(x, y, euclidean):
    d2 = jnp.sum((x[:, None, :] - y[None, :, :]) ** 2, axis=-1)
    return jnp.sqrt(d2) if euclidean else d2


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("euclidean", [False, True], ids=["sqeuclidean", "euclidean"])
# sizes off the 128-tiles, one tile, and a dimension above the padded 16
@pytest.mark.parametrize("n,m,d", [(300, 517, 3), (5, 7, 2), (130, 129, 20)])
def test_kernels_match_a_dense_reference(dtype, euclidean, n, m, d):
    x, y = _clouds(n, m, d, dtype)
    eps = 0.05
    x, y = x - 0.5, y - 0.5  # centred, as the geometry passes them
    scale = 1 / eps if euclidean else float(1 / np.sqrt(eps))
    rng = np.random.default_rng(1)
    p = jnp.asarray(rng.normal(size=m), dtype).at[1].set(-jnp.inf)
    q = jnp.asarray(rng.normal(size=n), dtype).at[0].set(-jnp.inf)
    v = jnp.asarray(rng.normal(size=m), dtype)
    c = _cost(x, y, euclidean) / eps
    lse = jax.jit(_pallas.lse_rows, static_argnums=4)(x, y, p, scale, euclidean)
    ps = jax.jit(_pallas.expsum_rows, static_argnums=6)(x, y, q, p, v, scale, euclidean)
    assert lse.dtype == ps.dtype == dtype and lse.shape == ps.shape == (n,)
    tol = 1e-11 if dtype == jnp.float64 else 2e-5
    ref = logsumexp(p[None, :] - c, axis=1)
    np.testing.assert_allclose(lse, ref, rtol=tol, atol=tol)
    ref = jnp.exp(q[:, None] + p[None, :] - c) @ v
    np.testing.assert_allclose(ps, ref, rtol=tol, atol=tol * float(jnp.max(abs(ref))))
    # a row with no column left: -inf, not NaN
    none = jnp.full((m,), -jnp.inf, dtype)
    out = _pallas.lse_rows(x[:3], y, none, scale, euclidean)
    assert np.all(np.isneginf(np.asarray(out)))


def _problem(dtype, n=150, m=140, zero_weights=True):
    x, y = _clouds(n, m, 2, dtype, seed=3)
    rng = np.random.default_rng(4)
    a = rng.uniform(0.5, 1.0, n)
    b = rng.uniform(0.5, 1.0, m)
    if zero_weights:
        a[[2, 7]] = 0.0
        b[5] = 0.0
    return x, y, jnp.asarray(a / a.sum(), dtype), jnp.asarray(b / b.sum(), dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("solver", ["sinkhorn", "sinkhorn_newton"])
def test_solves_match_the_xla_passes(solver, dtype):
    x, y, a, b = _problem(dtype)
    out = {}
    for backend in ("xla", "pallas"):
        geom = solvers.PointCloud(x, y, batch_size=64, backend=backend)
        sol = jax.jit(lambda g, s=solver: getattr(solvers, s)(g, a, b, epsilon=1e-2))(
            geom
        )
        assert sol.result == solvers.RESULTS.successful
        assert sol.f.dtype == dtype
        out[backend] = sol
    tol = 1e-12 if dtype == jnp.float64 else 2e-6
    # the same iterations (step counts equal), the potentials to rounding
    assert int(out["xla"].n_steps) == int(out["pallas"].n_steps)
    np.testing.assert_allclose(out["pallas"].f, out["xla"].f, atol=tol)
    np.testing.assert_allclose(out["pallas"].g, out["xla"].g, atol=tol)
    np.testing.assert_allclose(
        out["pallas"].reg_ot_cost, out["xla"].reg_ot_cost, rtol=10 * tol
    )


def test_kernel_passes_match_the_xla_passes_float64():
    """Each fused pass (f_hat, g_hat, P v, P^T u, marginals) against its XLA row
    pass, zero weights included."""
    x, y, a, b = _problem(jnp.float64)
    rng = np.random.default_rng(5)
    f = jnp.asarray(rng.normal(size=x.shape[0]) * 0.01)
    g = jnp.asarray(rng.normal(size=y.shape[0]) * 0.01)
    u = jnp.asarray(rng.normal(size=x.shape[0]))
    v = jnp.asarray(rng.normal(size=y.shape[0]))
    eps = jnp.asarray(0.03)
    res = {}
    for backend in ("xla", "pallas"):
        k = Kernel.build(solvers.PointCloud(x, y, batch_size=32, backend=backend), a, b)
        plan = k.plan(f, g, eps)
        res[backend] = (
            k.f_hat(g, eps),
            k.g_hat(f, eps),
            plan.mv(v),
            plan.rmv(u),
            *plan.marginals(),
        )
    for p_out, x_out in zip(res["pallas"], res["xla"]):
        np.testing.assert_allclose(p_out, x_out, rtol=1e-12, atol=1e-14)


def _cost_fn(backend, batch_size=32, solver="sinkhorn_newton"):
    def cost(x, y, a, b, eps):
        geom = solvers.PointCloud(x, y, batch_size=batch_size, backend=backend)
        return getattr(solvers, solver)(geom, a, b, epsilon=eps).reg_ot_cost

    return cost


def test_derivatives_both_modes_match_xla_float64():
    x, y, a, b = _problem(jnp.float64, 60, 50)
    eps = jnp.asarray(0.05)
    args = (x, y, a, b, eps)
    grads = {
        be: jax.jit(jax.grad(_cost_fn(be), argnums=(0, 1, 2, 3, 4)))(*args)
        for be in ("xla", "pallas")
    }
    for gp, gx in zip(grads["pallas"], grads["xla"]):
        np.testing.assert_allclose(gp, gx, rtol=1e-9, atol=1e-12)
    rng = np.random.default_rng(6)
    tangents = tuple(jnp.asarray(rng.normal(size=v.shape)) for v in args)
    jvps = {
        be: jax.jit(lambda *t, be=be: jax.jvp(_cost_fn(be), args, t)[1])(*tangents)
        for be in ("xla", "pallas")
    }
    np.testing.assert_allclose(jvps["pallas"], jvps["xla"], rtol=1e-9)


@pytest.mark.slow  # 30 s; first order in both modes runs by default (vs the XLA passes)
def test_check_grads_second_order_float64():
    x, y, a, b = _problem(jnp.float64, 12, 10, zero_weights=False)
    eps = jnp.asarray(0.1)
    cost = _cost_fn("pallas", batch_size=4)
    fn = jax.jit(lambda x, y: cost(x, y, a, b, eps))  # compiled once per transform
    check_grads(fn, (x, y), order=2, modes=("fwd", "rev"))


def test_jit_without_recompilation_and_vmap():
    x, y, a, b = _problem(jnp.float32, 40, 30, zero_weights=False)
    traces = []

    @jax.jit
    def solve(x, y):
        traces.append(x.shape)
        geom = solvers.PointCloud(x, y, batch_size=16, backend="pallas")
        return solvers.sinkhorn(geom, a, b, epsilon=0.05).reg_ot_cost

    xs = jnp.stack([x, x + 0.1, x * 0.9])
    looped = jnp.stack([solve(xi, y) for xi in xs])
    assert traces == [(40, 2)], traces
    batched = jax.vmap(solve, in_axes=(0, None))(xs, y)
    np.testing.assert_allclose(batched, looped, rtol=1e-5)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"backend": "triton", "batch_size": 8}, "backend must be"),
        ({"backend": "pallas"}, "needs a batch_size"),
        (
            {"backend": "pallas", "batch_size": 8, "cost": lambda u, v: jnp.sum(u * v)},
            "needs a batch_size",
        ),
    ],
    ids=["unknown", "dense", "callable_cost"],
)
def test_bad_backend_raises_at_construction(kw, match):
    x, y = _clouds(5, 4, 2, jnp.float32)
    with pytest.raises(ValueError, match=match):
        solvers.PointCloud(x, y, **kw)


_SHARDED = """
import json
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
jax.config.update("jax_enable_x64", True)
import solvers
rng = np.random.default_rng(0)
x = jnp.asarray(rng.uniform(size=(400, 2))); y = jnp.asarray(rng.uniform(size=(300, 2)))
b = jnp.ones(300) / 300
mesh = jax.make_mesh((4,), ("i",)); rows = NamedSharding(mesh, P("i"))

def cost(x, axis=None):
    geom = solvers.PointCloud(x, y, batch_size=32, axis_name=axis, backend="pallas")
    a = jnp.ones(x.shape[0]) / 400
    return solvers.sinkhorn_newton(geom, a, b, epsilon=1e-2).reg_ot_cost

def sharded(check_vma):
    return jax.shard_map(lambda x: cost(x, "i"), mesh=mesh, in_specs=(P("i"),),
                         out_specs=P(), check_vma=check_vma)

xs, t = jax.device_put(x, rows), jax.device_put(jnp.ones_like(x), rows)
sh = sharded(False)
out = {
    "value": abs(float(jax.jit(cost)(x) - jax.jit(sh)(xs))),
    "grad": float(jnp.max(abs(jax.jit(jax.grad(cost))(x) - jax.jit(jax.grad(sh))(xs)))),
    "jvp": abs(float(jax.jvp(jax.jit(cost), (x,), (jnp.ones_like(x),))[1]
                     - jax.jit(lambda x, t: jax.jvp(sh, (x,), (t,))[1])(xs, t))),
}
try:
    jax.jit(sharded(True))(xs)
    out["raised"] = False
except ValueError as e:
    out["raised"] = "check_vma=False" in str(e)
print(json.dumps(out))
"""


@pytest.mark.slow  # 32 s in a subprocess; run with --runslow
def test_rows_sharded_over_4_devices_match_one_device():
    """Rows sharded with `jax.shard_map(check_vma=False)`: value, gradient (outside)
    and jvp as on one device; with check_vma=True a clear trace-time error."""
    out = run_on_host_devices(_SHARDED, 4)
    assert out["raised"] is True, out
    assert out["value"] < 1e-13 and out["grad"] < 1e-12 and out["jvp"] < 1e-12, out


def test_lowers_for_cuda_with_triton_kernels():
    """The kernels, and a whole solve with its gradient, lower for CUDA (Pallas's
    Triton backend) on this CPU-only machine: the GPU code path at least compiles
    to Triton IR (running it needs a GPU)."""
    from jax import export

    checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    x, y = _clouds(300, 517, 2, jnp.float32)

    def solve(x, y):
        geom = solvers.PointCloud(x, y, batch_size=128, backend="pallas")
        # throw=False: eqx.error_if's host callback cannot be lowered off-device
        return solvers.sinkhorn_newton(geom, epsilon=1e-2, throw=False).reg_ot_cost

    exp = export.export(
        jax.jit(jax.value_and_grad(solve)), platforms=("cuda",), disabled_checks=checks
    )(x, y)
    text = exp.mlir_module()
    assert text.count("xla.gpu.triton") >= 4  # the four fused passes, at least
    for dtype in (jnp.float32, jnp.float64):
        xs, ys = _clouds(50, 70, 3, dtype)
        p = jnp.zeros(70, dtype)
        fn = jax.jit(lambda x, y, p: _pallas.lse_rows(x, y, p, 2.0, False))
        text = export.export(fn, platforms=("cuda",), disabled_checks=checks)(
            xs, ys, p
        ).mlir_module()
        assert "xla.gpu.triton" in text
