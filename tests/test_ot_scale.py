"""Optimal transport beyond dense memory and one device, and what OTT/POT users expect:
online PointCloud (batch_size), rows sharded over devices (axis_name), zero weights
as padding, warm starts, default epsilon, sinkhorn_divergence."""

import textwrap

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import solvers

from .helpers import run_on_host_devices
from .test_sinkhorn import problem

F32, F64 = np.float32, np.float64

SOLVES = {
    "sinkhorn": lambda g, a, b, **kw: solvers.sinkhorn(g, a, b, **kw),
    "newton_dense": lambda g, a, b, **kw: solvers.sinkhorn_newton(g, a, b, **kw),
    "newton_sparse": lambda g, a, b, **kw: solvers.sinkhorn_newton(
        g, a, b, hessian="sparse", k=16, **kw
    ),
}
COSTS = {
    "sqeuclidean": "sqeuclidean",
    "euclidean": "euclidean",
    "callable": lambda u, v: jnp.sum(jnp.abs(u - v)),
}


# --------------------------------------------------------------------------------------
# Online geometry
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "solver, cost",
    [
        ("sinkhorn", "sqeuclidean"),
        pytest.param("newton_dense", "euclidean", marks=pytest.mark.slow),
        ("newton_sparse", "callable"),
        pytest.param("newton_sparse", "sqeuclidean", marks=pytest.mark.slow),
    ],
)
def test_online_matches_dense(solver, cost):
    x, y, a, b = problem(40, 50)
    x, y, a, b = map(jnp.asarray, (x, y, a, b))
    solve = SOLVES[solver]
    kw = dict(epsilon=0.05, tol=1e-10)
    dense = solve(solvers.PointCloud(x, y, cost=COSTS[cost]), a, b, **kw)
    # 40 rows in blocks of 16: two full blocks and a remainder of 8
    geom = solvers.PointCloud(x, y, cost=COSTS[cost], batch_size=16)
    online = solve(geom, a, b, **kw)
    assert online.geom.is_online and online.result == solvers.RESULTS.successful
    np.testing.assert_allclose(online.f, dense.f, atol=1e-12)
    np.testing.assert_allclose(online.g, dense.g, atol=1e-12)
    np.testing.assert_allclose(online.reg_ot_cost, dense.reg_ot_cost, rtol=1e-12)
    np.testing.assert_allclose(online.transport_cost, dense.transport_cost, rtol=1e-12)
    v, u = jnp.linspace(0, 1, 50), jnp.linspace(-1, 1, 40)
    p = dense.plan()
    np.testing.assert_allclose(online.apply_plan(v), p @ v, atol=1e-14)
    np.testing.assert_allclose(online.apply_plan(u, axis=0), p.T @ u, atol=1e-14)
    np.testing.assert_allclose(online.plan(), p, atol=1e-14)  # dense on request


def test_online_point_cloud_far_from_origin_float32():
    # centred once for all blocks: float32 costs keep their digits at offset 1e3
    x, y, _, _ = problem(30, 30, dtype=F32)
    ref = solvers.sinkhorn_newton(
        solvers.PointCloud(jnp.asarray(x), jnp.asarray(y)), epsilon=0.05
    )
    far = solvers.sinkhorn_newton(
        solvers.PointCloud(jnp.asarray(x + 1e3), jnp.asarray(y + 1e3), batch_size=7),
        epsilon=0.05,
    )
    assert far.f.dtype == jnp.float32
    np.testing.assert_allclose(far.reg_ot_cost, ref.reg_ot_cost, rtol=1e-4)


@pytest.mark.parametrize(
    "solver",
    [
        pytest.param("sinkhorn", marks=pytest.mark.slow),
        "newton_dense",
        pytest.param("newton_sparse", marks=pytest.mark.slow),
    ],
)
def test_online_derivatives_equal_the_dense_ones(solver):
    # forward and reverse mode of the implicit potentials and of the cost, online
    # against dense (whose derivatives check_grads verifies in test_sinkhorn)
    x, y, a, b = problem(9, 11)
    x, y, a, b = map(jnp.asarray, (x, y, a, b))
    solve = SOLVES[solver]

    def fn(x, a, batch_size):
        a = a / jnp.sum(a)
        out = solve(solvers.PointCloud(x, y, batch_size=batch_size), a, b, epsilon=0.1)
        return out.g, out.reg_ot_cost

    rng = np.random.default_rng(1)
    tx, ta = jnp.asarray(rng.normal(size=x.shape)), jnp.asarray(rng.normal(size=9))
    _, t_on = jax.jvp(lambda x, a: fn(x, a, 4), (x, a), (tx, ta))
    _, t_de = jax.jvp(lambda x, a: fn(x, a, None), (x, a), (tx, ta))
    np.testing.assert_allclose(t_on[0], t_de[0], atol=1e-12)
    np.testing.assert_allclose(t_on[1], t_de[1], atol=1e-12)
    ct = jnp.asarray(rng.normal(size=11))

    def pullback(batch_size):
        _, vjp = jax.vjp(lambda x, a: fn(x, a, batch_size), x, a)
        return vjp((ct, jnp.asarray(0.7)))

    for on, de in zip(pullback(4), pullback(None)):
        np.testing.assert_allclose(on, de, atol=1e-12)


@pytest.mark.slow  # about 2.5 minutes: second order through the blocked passes
def test_online_derivatives_second_order():
    x, y, a, b = problem(6, 7)
    x, y, a, b = map(jnp.asarray, (x, y, a, b))

    def fn(x, y):
        geom = solvers.PointCloud(x, y, batch_size=4)
        out = solvers.sinkhorn_newton(geom, a, b, epsilon=0.1, hessian="sparse", k=4)
        return out.f[:3], out.reg_ot_cost

    check_grads(fn, (x, y), order=2, modes=("fwd", "rev"), atol=1e-5, rtol=1e-5)


def _temp_bytes(fn, *args):
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_online_never_allocates_n_by_m():
    n, m, bs = 3000, 2800, 50
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.uniform(size=(n, 2)))
    y = jnp.asarray(rng.uniform(size=(m, 2)))
    nm_bytes = n * m * 8

    def solve(x, bs, hessian="dense"):
        geom = solvers.PointCloud(x, y, batch_size=bs)
        return solvers.sinkhorn_newton(geom, epsilon=1e-2, hessian=hessian)

    dense = _temp_bytes(lambda x: solve(x, None).f, x)
    assert dense >= nm_bytes  # the check can fail: the dense solve does store C
    for hessian in ("dense", "sparse"):
        online = _temp_bytes(lambda x: solve(x, bs, hessian).f, x)
        # O((n + m) d + bs m + n k): here under a quarter of n m
        assert online < nm_bytes / 4, (hessian, online, nm_bytes)
        # reverse mode recomputes each block instead of storing it
        grad = _temp_bytes(jax.grad(lambda x: solve(x, bs, hessian).reg_ot_cost), x)
        assert grad < nm_bytes / 4, (hessian, grad, nm_bytes)


def test_online_float32_and_jit_without_retrace():
    x, y, a, b = problem(30, 20, dtype=F32)

    @eqx.filter_jit
    @eqx.debug.assert_max_traces(max_traces=1)
    def solve(x, y, a, b, eps):
        geom = solvers.PointCloud(x, y, batch_size=8)
        return solvers.sinkhorn_newton(geom, a, b, epsilon=eps)

    out = solve(*map(jnp.asarray, (x, y, a, b)), jnp.float32(0.05))
    out2 = solve(*map(jnp.asarray, (x + 0.1, y, a, b)), jnp.float32(0.07))
    assert out.f.dtype == out2.g.dtype == jnp.float32
    assert out.result == out2.result == solvers.RESULTS.successful


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_online_bad_batch_size(bad):
    x = jnp.zeros((4, 2))
    with pytest.raises(ValueError, match="batch_size"):
        solvers.PointCloud(x, x, batch_size=bad)


# --------------------------------------------------------------------------------------
# Zero weights (padding)
# --------------------------------------------------------------------------------------


def _pad(v, size, fill=0.0):
    return np.concatenate([v, np.full((size - v.shape[0],) + v.shape[1:], fill)])


@pytest.mark.parametrize(
    "solver, batch_size",
    [
        pytest.param("sinkhorn", 16, marks=pytest.mark.slow),
        pytest.param("newton_dense", None, marks=pytest.mark.slow),
        ("newton_sparse", 16),
    ],
)
def test_padding_matches_unpadded_values(solver, batch_size):
    x, y, a, b = problem(30, 25)
    solve = SOLVES[solver]
    kw = dict(epsilon=0.05, tol=1e-11)
    ref = solve(solvers.PointCloud(jnp.asarray(x), jnp.asarray(y)), a, b, **kw)
    # padded rows/columns: arbitrary points (here far away) with weight 0
    xp, yp = _pad(x, 37, 5.0), _pad(y, 31, -3.0)
    ap, bp = _pad(a, 37), _pad(b, 31)
    geom = solvers.PointCloud(jnp.asarray(xp), jnp.asarray(yp), batch_size=batch_size)
    out = solve(geom, ap, bp, **kw)
    assert out.result == solvers.RESULTS.successful
    np.testing.assert_allclose(out.f[:30], ref.f, atol=1e-9)
    np.testing.assert_allclose(out.g[:25], ref.g, atol=1e-9)
    np.testing.assert_allclose(out.reg_ot_cost, ref.reg_ot_cost, rtol=1e-10)
    p = np.asarray(out.plan())
    assert np.all(p[30:] == 0) and np.all(p[:, 25:] == 0)
    # padded potentials: the c-transforms (finite, documented)
    c = np.asarray(out.cost_matrix)
    f_pad = -0.05 * np.log(np.exp((np.asarray(out.g[:25]) - c[30:, :25]) / 0.05).sum(1))
    np.testing.assert_allclose(out.f[30:], f_pad, rtol=1e-9)


@pytest.mark.parametrize(
    "solver, batch_size",
    [("newton_dense", None), pytest.param("newton_sparse", 16, marks=pytest.mark.slow)],
)
def test_padding_derivatives_match_unpadded(solver, batch_size):
    x, y, a, b = problem(30, 25)
    solve = SOLVES[solver]
    kw = dict(epsilon=0.05, tol=1e-11)
    xp, yp = _pad(x, 37, 5.0), _pad(y, 31, -3.0)
    ap, bp = _pad(a, 37), _pad(b, 31)

    # gradients with respect to the real points agree; padding gets none
    def loss(xp):
        geom = solvers.PointCloud(xp, jnp.asarray(yp), batch_size=batch_size)
        return solve(geom, ap, bp, **kw).reg_ot_cost

    def loss_ref(x):
        return solve(solvers.PointCloud(x, jnp.asarray(y)), a, b, **kw).reg_ot_cost

    gp = jax.grad(loss)(jnp.asarray(xp))
    np.testing.assert_allclose(gp[:30], jax.grad(loss_ref)(jnp.asarray(x)), atol=1e-9)
    np.testing.assert_allclose(gp[30:], 0, atol=1e-14)

    # and the implicit derivative of the potentials
    def pot(xp):
        geom = solvers.PointCloud(xp, jnp.asarray(yp), batch_size=batch_size)
        return solve(geom, ap, bp, **kw).g[:25]

    def pot_ref(x):
        return solve(solvers.PointCloud(x, jnp.asarray(y)), a, b, **kw).g

    t = jnp.asarray(np.random.default_rng(3).normal(size=x.shape))
    _, jp = jax.jvp(pot, (jnp.asarray(xp),), (jnp.asarray(_pad(t, 37)),))
    _, jr_ = jax.jvp(pot_ref, (jnp.asarray(x),), (t,))
    np.testing.assert_allclose(jp, jr_, atol=1e-8)


def test_padded_batch_under_vmap_matches_each_problem():
    sizes = [(20, 15), (12, 18), (25, 25)]
    n_max, m_max = 25, 25
    xs, ys, as_, bs_, refs = [], [], [], [], []
    for k, (n, m) in enumerate(sizes):
        x, y, a, b = problem(n, m, seed=k)
        refs.append(
            solvers.sinkhorn_newton(
                solvers.PointCloud(jnp.asarray(x), jnp.asarray(y)),
                a,
                b,
                epsilon=0.05,
                tol=1e-11,
            )
        )
        xs.append(_pad(x, n_max))
        ys.append(_pad(y, m_max))
        as_.append(_pad(a, n_max))
        bs_.append(_pad(b, m_max))

    @jax.vmap
    def solve(x, y, a, b):
        geom = solvers.PointCloud(x, y)
        out = solvers.sinkhorn_newton(geom, a, b, epsilon=0.05, tol=1e-11)
        return out.f, out.g, out.reg_ot_cost

    f, g, cost = solve(*(jnp.asarray(np.stack(v)) for v in (xs, ys, as_, bs_)))
    for k, (n, m) in enumerate(sizes):
        np.testing.assert_allclose(f[k, :n], refs[k].f, atol=1e-9)
        np.testing.assert_allclose(g[k, :m], refs[k].g, atol=1e-9)
        np.testing.assert_allclose(cost[k], refs[k].reg_ot_cost, rtol=1e-10)


# --------------------------------------------------------------------------------------
# Warm start, default epsilon
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "solver, batch_size",
    [
        ("sinkhorn", None),
        ("newton_dense", 16),
        pytest.param("newton_sparse", None, marks=pytest.mark.slow),
    ],
)
def test_warm_start_from_a_converged_solution(solver, batch_size):
    x, y, a, b = problem(40, 30)
    geom = solvers.PointCloud(jnp.asarray(x), jnp.asarray(y), batch_size=batch_size)
    solve = SOLVES[solver]
    cold = solve(geom, a, b, epsilon=1e-2)
    warm = solve(geom, a, b, epsilon=1e-2, init=(cold.f, cold.g))
    assert int(warm.n_steps) <= 2, int(warm.n_steps)
    assert int(warm.n_steps) < int(cold.n_steps)
    np.testing.assert_allclose(warm.reg_ot_cost, cold.reg_ot_cost, rtol=1e-8)
    if solver == "sinkhorn":
        # plain Sinkhorn: a moved cloud needs a smooth change of the potentials,
        # Sinkhorn's slowest mode, and a warm start need not pay (371 cold vs 428
        # warm steps when x moves by 0.01)
        return
    # a nearby problem (the points moved a little) restarts faster than cold
    geom2 = solvers.PointCloud(jnp.asarray(x + 0.01), jnp.asarray(y))
    cold2 = solve(geom2, a, b, epsilon=1e-2)
    warm2 = solve(geom2, a, b, epsilon=1e-2, init=(cold.f, cold.g))
    assert int(warm2.n_steps) < int(cold2.n_steps)
    np.testing.assert_allclose(warm2.reg_ot_cost, cold2.reg_ot_cost, rtol=1e-7)


def test_warm_start_is_not_differentiated_and_bad_init_raises():
    x, y, a, b = problem(10, 12)
    y = jnp.asarray(y)
    cold = solvers.sinkhorn_newton(solvers.PointCloud(jnp.asarray(x), y), epsilon=0.1)

    def loss(x, init):
        return solvers.sinkhorn_newton(
            solvers.PointCloud(x, y), epsilon=0.1, init=init
        ).reg_ot_cost

    g_cold = jax.grad(loss)(jnp.asarray(x), None)
    g_warm = jax.grad(loss)(jnp.asarray(x), (cold.f, cold.g))
    np.testing.assert_allclose(g_warm, g_cold, atol=1e-9)
    geom = solvers.PointCloud(jnp.asarray(x), y)
    with pytest.raises(ValueError, match="init"):
        solvers.sinkhorn(geom, epsilon=0.1, init=(cold.f, cold.g[:-1]))
    with pytest.raises(ValueError, match="init"):
        solvers.sinkhorn_newton(geom, epsilon=0.1, init=cold.f)


@pytest.mark.parametrize("batch_size", [None, 7])
def test_default_epsilon_is_five_percent_of_the_cost_std(batch_size):
    x, y, a, b = problem(20, 30)
    geom = solvers.PointCloud(jnp.asarray(x), jnp.asarray(y), batch_size=batch_size)
    out = solvers.sinkhorn_newton(geom, a, b)
    c = np.asarray(solvers.PointCloud(jnp.asarray(x), jnp.asarray(y)).cost_matrix)
    np.testing.assert_allclose(out.epsilon, 0.05 * c.std(), rtol=1e-12)
    assert out.result == solvers.RESULTS.successful
    # not differentiated (as OTT-JAX): the derivative is that at a fixed epsilon
    eps = float(out.epsilon)

    def default(x):
        return solvers.sinkhorn(solvers.PointCloud(x, jnp.asarray(y)), a, b).reg_ot_cost

    def fixed(x):
        geom = solvers.PointCloud(x, jnp.asarray(y))
        return solvers.sinkhorn(geom, a, b, epsilon=eps).reg_ot_cost

    np.testing.assert_allclose(
        jax.grad(default)(jnp.asarray(x)), jax.grad(fixed)(jnp.asarray(x)), atol=1e-10
    )


def test_default_epsilon_and_auto_schedule_share_one_pass_over_the_cost(monkeypatch):
    # online, every pass recomputes the n x m cost: the default epsilon's statistics
    # also give the schedule's max |C| (issue 19: they were computed twice)
    from solvers import _kernel

    calls = []
    original = _kernel.Kernel.cost_stats

    def counted(self):
        calls.append(1)
        return original(self)

    monkeypatch.setattr(_kernel.Kernel, "cost_stats", counted)
    x, y, a, b = problem(20, 30)
    geom = solvers.PointCloud(jnp.asarray(x), jnp.asarray(y), batch_size=7)
    jax.eval_shape(lambda g: solvers.sinkhorn_newton(g, a, b).f, geom)
    assert len(calls) == 1
    calls.clear()
    jax.eval_shape(lambda g: solvers.sinkhorn_newton(g, a, b, epsilon=1e-2).f, geom)
    assert len(calls) == 1  # the schedule's own pass
    calls.clear()
    jax.eval_shape(lambda g: solvers.sinkhorn(g, a, b).f, geom)
    assert len(calls) == 1  # default epsilon, no schedule


def test_default_epsilon_matches_ott():
    pointcloud = pytest.importorskip("ott.geometry.pointcloud")
    x, y, _, _ = problem(20, 30)
    ours = solvers.sinkhorn(solvers.PointCloud(jnp.asarray(x), jnp.asarray(y)))
    ott_eps = pointcloud.PointCloud(jnp.asarray(x), jnp.asarray(y)).epsilon
    np.testing.assert_allclose(ours.epsilon, ott_eps, rtol=1e-10)


# --------------------------------------------------------------------------------------
# Sinkhorn divergence
# --------------------------------------------------------------------------------------


def _div_problem():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(30, 2)))
    y = jnp.asarray(rng.normal(size=(35, 2)) + 1)
    a = jnp.asarray(rng.uniform(1, 2, 30))
    b = jnp.asarray(rng.uniform(1, 2, 35))
    return x, y, a / a.sum(), b / b.sum()


def _pot_ot_eps(x, y, a, b, eps):
    """reg_ot_cost = <P, C> + eps KL(P || a b^T) from POT's log-domain Sinkhorn."""
    import ot

    c = ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)
    p = ot.sinkhorn(
        a, b, c, eps, method="sinkhorn_log", stopThr=1e-14, numItermax=100_000
    )
    kl = np.sum(p * np.log(p / np.outer(a, b))) - p.sum() + 1
    return np.sum(p * c) + eps * kl


def test_sinkhorn_divergence_value_against_pot_definition_and_properties():
    x, y, a, b = _div_problem()
    eps = 0.2
    out = solvers.sinkhorn_divergence(x, y, a, b, epsilon=eps, tol=1e-12)
    xn, yn, an, bn = (np.asarray(v) for v in (x, y, a, b))
    ref = _pot_ot_eps(xn, yn, an, bn, eps) - 0.5 * (
        _pot_ot_eps(xn, xn, an, an, eps) + _pot_ot_eps(yn, yn, bn, bn, eps)
    )
    np.testing.assert_allclose(out.divergence, ref, rtol=1e-8)
    assert out.divergence > 0 and out.converged
    same = solvers.sinkhorn_divergence(x, x, a, a, epsilon=eps).divergence
    np.testing.assert_allclose(same, 0, atol=1e-12)
    # the online geometry and the plain Sinkhorn solver give the same value
    online = solvers.sinkhorn_divergence(
        x, y, a, b, epsilon=eps, batch_size=8, solver="sinkhorn", tol=1e-12
    )
    np.testing.assert_allclose(online.divergence, out.divergence, rtol=1e-10)


def test_sinkhorn_divergence_matches_ott():
    sd = pytest.importorskip("ott.tools.sinkhorn_divergence")
    from ott.geometry import pointcloud

    x, y, a, b = _div_problem()

    def ours(x, a):
        return solvers.sinkhorn_divergence(x, y, a, b, tol=1e-12).divergence

    def ott(x, a):
        out = sd.sinkhorn_divergence(
            pointcloud.PointCloud,
            x,
            y,
            a=a,
            b=b,
            solve_kwargs=dict(threshold=1e-12, max_iterations=100_000),
        )
        return out[0] if isinstance(out, tuple) else out.divergence

    # OTT-JAX needs standard dtype promotion (the suite runs strict)
    with jax.numpy_dtype_promotion("standard"):
        value, (gx, ga) = jax.value_and_grad(ott, (0, 1))(x, a)
    ours_value, (ours_gx, ours_ga) = jax.value_and_grad(ours, (0, 1))(x, a)
    np.testing.assert_allclose(ours_value, value, rtol=1e-6)
    np.testing.assert_allclose(ours_gx, gx, rtol=1e-6, atol=1e-9)
    # weight gradients are defined up to a constant (mass-preserving directions)
    np.testing.assert_allclose(
        ours_ga - ours_ga.mean(), ga - ga.mean(), rtol=1e-6, atol=1e-9
    )


@jax.jit
def _div_fn(x, y, a, b):
    a, b = a / jnp.sum(a), b / jnp.sum(b)  # check_grads perturbs the masses
    return solvers.sinkhorn_divergence(
        x, y, a, b, epsilon=0.3, solver="sinkhorn"
    ).divergence


def _small_div_problem():
    x, y, _, _ = _div_problem()
    return x[:8], y[:9], jnp.full(8, 1 / 8), jnp.full(9, 1 / 9)


def test_sinkhorn_divergence_derivatives_jit_vmap_float32():
    x, y, a, b = _small_div_problem()
    check_grads(_div_fn, (x, y, a, b), order=1, modes=("fwd", "rev"), eps=1e-6)
    batch = jnp.stack([x, x + 0.5])
    vm = jax.vmap(_div_fn, in_axes=(0, None, None, None))(batch, y, a, b)
    loop = jnp.stack([_div_fn(batch[0], y, a, b), _div_fn(batch[1], y, a, b)])
    np.testing.assert_allclose(vm, loop, rtol=1e-10)
    jitted = eqx.filter_jit(eqx.debug.assert_max_traces(_div_fn, max_traces=1))
    jitted(x, y, a, b)
    jitted(x + 0.1, y, a, b)
    out = _div_fn(*(v.astype(jnp.float32) for v in (x, y, a, b)))
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, _div_fn(x, y, a, b), rtol=1e-3)


@pytest.mark.slow  # about 3 minutes: second order of three solves
def test_sinkhorn_divergence_second_order():
    x, y, a, b = _small_div_problem()
    check_grads(
        lambda x, y: _div_fn(x, y, a, b),
        (x, y),
        order=2,
        modes=("fwd", "rev"),
        atol=1e-5,
        rtol=1e-5,
        eps=1e-6,
    )


def test_sinkhorn_divergence_failures():
    x, y, a, b = _div_problem()
    with pytest.raises(ValueError, match="solver"):
        solvers.sinkhorn_divergence(x, y, solver="newton")
    with pytest.raises(ValueError, match="same d"):
        solvers.sinkhorn_divergence(x, y[:, :1])
    out = solvers.sinkhorn_divergence(x, y, 2 * a, b, epsilon=0.1, throw=False)
    assert out.result == solvers.RESULTS.unbalanced
    with pytest.raises(Exception, match="different total mass"):
        solvers.sinkhorn_divergence(x, y, 2 * a, b, epsilon=0.1)


# --------------------------------------------------------------------------------------
# Choosing the sparse Hessian's k from kept_mass
# --------------------------------------------------------------------------------------


def _numpy_k(plan, target, multiple=8):
    """Smallest multiple of 8 whose per-row top-k keeps `target` of the mass."""
    top = -np.sort(-np.asarray(plan, np.float64), axis=1)
    curve = np.cumsum(top.sum(axis=0)) / top.sum()
    k = int(np.argmax(curve >= target * (1 - 1e-12))) + 1
    return min(plan.shape[1], multiple * -(-k // multiple))


def test_sparse_k_counts_the_plan_mass_like_numpy():
    x, y, a, b = map(jnp.asarray, problem(300, 250))
    geom = solvers.PointCloud(x, y)
    eps = 0.01
    out = solvers.sinkhorn_newton(geom, a, b, epsilon=eps, tol=1e-12)
    # with the converged g and every row, the estimate is the exact plan's count
    k = solvers.sparse_k(geom, a, b, epsilon=eps, g=out.g, sample=300)
    assert k == _numpy_k(out.plan(), 0.995)
    assert k % 8 == 0 and 8 <= k < 250
    # the solver's own near-top-k selection with that k keeps kept_mass of the plan
    from solvers._sinkhorn_newton import _select_rows

    vals, _, _ = _select_rows(out.plan(), k)
    assert float(vals.sum() / out.plan().sum()) >= 0.99
    # the kernel estimate (g = 0, default) on a sample of rows: close to it
    k0 = solvers.sparse_k(geom, a, b, epsilon=eps)
    assert abs(k0 - k) <= 16, (k0, k)
    # online geometry and float32: the same count
    online = solvers.PointCloud(x, y, batch_size=64)
    assert solvers.sparse_k(online, a, b, epsilon=eps) == k0
    x32, y32, a32, b32 = (v.astype(jnp.float32) for v in (x, y, a, b))
    k32 = solvers.sparse_k(solvers.PointCloud(x32, y32), a32, b32, epsilon=eps)
    assert abs(k32 - k0) <= 8
    # monotone in epsilon and kept_mass, capped at m
    assert solvers.sparse_k(geom, a, b, epsilon=eps / 4) < k0
    assert solvers.sparse_k(geom, a, b, epsilon=eps, kept_mass=0.9) < k0
    assert solvers.sparse_k(geom, a, b, epsilon=10.0) == 250
    # a cost matrix works as the solvers' geometry does; default epsilon too
    assert solvers.sparse_k(geom.cost_matrix, a, b, epsilon=eps) == k0
    assert isinstance(solvers.sparse_k(geom), int)


def test_sinkhorn_newton_k_auto():
    x, y, a, b = map(jnp.asarray, problem(200, 180))
    geom = solvers.PointCloud(x, y)
    kw = dict(epsilon=0.05, tol=1e-10, hessian="sparse")
    k = solvers.sparse_k(geom, a, b, epsilon=0.05)
    assert k > 64  # the measured k, not the floor
    auto = solvers.sinkhorn_newton(geom, a, b, k="auto", **kw)
    fixed = solvers.sinkhorn_newton(geom, a, b, k=k, **kw)
    assert int(auto.n_steps) == int(fixed.n_steps)
    np.testing.assert_allclose(auto.g, fixed.g, rtol=0, atol=1e-13)
    # where the final epsilon needs fewer than 64 entries, "auto" keeps 64
    assert solvers.sparse_k(geom, a, b, epsilon=0.01) < 64
    small = dict(kw, epsilon=0.01)
    auto = solvers.sinkhorn_newton(geom, a, b, k="auto", **small)
    fixed = solvers.sinkhorn_newton(geom, a, b, k=64, **small)
    np.testing.assert_allclose(auto.g, fixed.g, rtol=0, atol=1e-13)

    # traced inputs: a clear error at trace time (k is a shape), in every transform
    def solve(x):
        return solvers.sinkhorn_newton(solvers.PointCloud(x, y), a, b, k="auto", **kw)

    for transform, arg in (
        (jax.jit(lambda x: solve(x).g), x),
        (jax.grad(lambda x: solve(x).reg_ot_cost), x),
        (jax.vmap(lambda x: solve(x).g), x[None]),
    ):
        with pytest.raises(TypeError, match="sparse_k"):
            transform(arg)
    # the dense Hessian does not use k: "auto" is fine under jit
    dense = jax.jit(
        lambda x: (
            solvers.sinkhorn_newton(
                solvers.PointCloud(x, y), a, b, k="auto", epsilon=0.01, tol=1e-10
            ).g
        )
    )(x)
    assert bool(jnp.all(jnp.isfinite(dense)))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(kept_mass=0.0), ValueError, "kept_mass"),
        (dict(kept_mass=1.5), ValueError, "kept_mass"),
        (dict(sample=0), ValueError, "sample"),
        (dict(sample=True), ValueError, "sample"),
        (dict(g=np.zeros(7)), ValueError, "shape"),
        (dict(g=np.full(50, np.nan)), ValueError, "finite"),
        (dict(epsilon=-1.0), ValueError, "epsilon"),
        (dict(a=-np.ones(40) / 40), ValueError, "weights"),
        (dict(a=np.ones(41) / 41), ValueError, "shape"),
        (dict(x_nan=True), ValueError, "finite|NaN|inf"),
    ],
)
def test_sparse_k_bad_input(kwargs, error, match):
    x, y, a, b = problem(40, 50)
    if kwargs.pop("x_nan", False):
        x = x.copy()
        x[3, 0] = np.nan
    a = kwargs.pop("a", a)
    with pytest.raises(error, match=match):
        solvers.sparse_k(solvers.PointCloud(x, y), a, b, **{"epsilon": 0.01, **kwargs})


@pytest.mark.parametrize("k", [0, -3, 2.5, True, "top"])
def test_sinkhorn_newton_bad_k(k):
    x, y, a, b = problem(20, 30)
    with pytest.raises(ValueError, match="k must be"):
        solvers.sinkhorn_newton(solvers.PointCloud(x, y), a, b, hessian="sparse", k=k)


# --------------------------------------------------------------------------------------
# Rows sharded over devices
# --------------------------------------------------------------------------------------

_SHARDED = textwrap.dedent(
    """
    import functools, json, jax, jax.numpy as jnp, numpy as np, solvers
    from jax.sharding import NamedSharding, PartitionSpec as P
    jax.config.update("jax_enable_x64", True)
    assert len(jax.devices()) == 8
    rng = np.random.default_rng(0)
    n, m = 400, 300
    x = jnp.asarray(rng.uniform(size=(n, 2))); y = jnp.asarray(rng.uniform(size=(m, 2)))
    a = jnp.asarray(rng.uniform(1, 2, n)).at[:7].set(0.0); a = a / a.sum()
    b = jnp.full(m, 1 / m)
    mesh = jax.make_mesh((8,), ("i",))
    rows, whole = NamedSharding(mesh, P("i")), NamedSharding(mesh, P())
    out = {}
    for name, bs, kw in [
        ("dense", None, {}),
        ("online_sparse", 16, {"hessian": "sparse", "k": 32}),
    ]:
        solve = solvers.sinkhorn if kw is None else functools.partial(
            solvers.sinkhorn_newton, **kw)
        wa = a if name == "dense" else None  # default: uniform over all rows
        ref = solve(solvers.PointCloud(x, y, batch_size=bs), wa, b, epsilon=1e-2)
        ref_grad = jax.grad(lambda x: solve(
            solvers.PointCloud(x, y, batch_size=bs), wa, b, epsilon=1e-2
        ).reg_ot_cost)(x)

        def solve_sharded(x, y, a, b):
            geom = solvers.PointCloud(x, y, batch_size=bs, axis_name="i")
            return solve(geom, a if name == "dense" else None, b, epsilon=1e-2)

        # shard_map's default replication checks (check_vma=True): values,
        # gradients taken outside and inside the shard_map, a jvp, and second order
        # (forward over reverse in x, reverse over reverse in y)
        specs = (P("i"), P(), P("i"), P())

        @jax.jit
        @functools.partial(jax.shard_map, mesh=mesh, in_specs=specs,
                           out_specs=(P("i"), P(), P(), P()))
        def sharded(x, y, a, b):
            sol = solve_sharded(x, y, a, b)
            return sol.f, sol.g, sol.reg_ot_cost, sol.n_steps

        def cost(x, y, a, b):
            return solve_sharded(x, y, a, b).reg_ot_cost

        cost_sh = jax.shard_map(cost, mesh=mesh, in_specs=specs, out_specs=P())
        args = (jax.device_put(x, rows), jax.device_put(y, whole),
                jax.device_put(a, rows), jax.device_put(b, whole))
        f, g, c, steps = sharded(*args)
        gx = jax.jit(jax.grad(cost_sh))(*args)
        gx_in, gy_in = jax.jit(jax.shard_map(
            jax.grad(cost, argnums=(0, 1)), mesh=mesh, in_specs=specs,
            out_specs=(P("i"), P())))(*args)
        ref_cost = lambda x, y: solve(  # noqa: E731
            solvers.PointCloud(x, y, batch_size=bs), wa, b, epsilon=1e-2).reg_ot_cost
        ref_gy = jax.grad(ref_cost, argnums=1)(x, y)
        tx = jnp.asarray(rng.normal(size=x.shape))
        jv = jax.jit(lambda *p: jax.jvp(lambda x: cost_sh(x, *p[1:]), (p[0],),
                                        (jax.device_put(tx, rows),))[1])(*args)
        ref_jv = jax.jvp(lambda x: ref_cost(x, y), (x,), (tx,))[1]
        err = lambda u, v: float(np.max(np.abs(np.asarray(u) - np.asarray(v))))  # noqa
        rel = lambda u, v: err(u, v) / float(np.max(np.abs(np.asarray(v))))  # noqa
        # a jvp in the weights b alone (no tangent of the cost: the rules' path
        # without a live kernel tangent)
        tb = jnp.asarray(rng.normal(size=m)) / m
        tb = tb - tb.mean()
        jb = jax.jit(lambda *p: jax.jvp(lambda b: cost_sh(*p[:3], b), (p[3],),
                                        (tb,))[1])(*args)
        ref_jb = jax.jvp(lambda b: solve(solvers.PointCloud(x, y, batch_size=bs), wa,
                                         b, epsilon=1e-2).reg_ot_cost, (b,), (tb,))[1]
        second = dict(jvp_b=float(abs(jb - ref_jb) / abs(ref_jb)))
        if SECOND_ORDER and name == "online_sparse":  # (compiling it is slow)
            hv = jax.jit(lambda *p: jax.jvp(
                lambda x: jax.grad(cost_sh)(x, *p[1:]), (p[0],),
                (jax.device_put(tx, rows),))[1])(*args)
            ref_hv = jax.jvp(lambda x: jax.grad(ref_cost)(x, y), (x,), (tx,))[1]
            gg = jax.jit(jax.grad(lambda y, x, a, b: jnp.sum(
                jax.grad(cost_sh, argnums=1)(x, y, a, b) ** 2)))(
                    *args[1::-1], *args[2:])
            ref_gg = jax.grad(
                lambda y: jnp.sum(jax.grad(ref_cost, argnums=1)(x, y) ** 2))(y)
            second.update(hvp=rel(hv, ref_hv), rev_rev=rel(gg, ref_gg))
        # and gradients with check_vma=False, taken outside the shard_map (inside,
        # JAX transposes psum into psum and scales them by the device count)
        gx_novma = jax.jit(jax.grad(jax.shard_map(
            cost, mesh=mesh, in_specs=specs, out_specs=P(), check_vma=False)))(*args)
        out[name] = dict(
            f=err(f, ref.f), g=err(g, ref.g), cost=float(abs(c - ref.reg_ot_cost)),
            grad=max(err(gx, ref_grad), err(gx_in, ref_grad), err(gx_novma, ref_grad),
                     err(gy_in, ref_gy)),
            jvp=rel(jv, ref_jv), **second,
            steps=[int(steps), int(ref.n_steps)], sharded=str(f.sharding.spec))
    # epsilon above the costs' spread: reg_ot_cost's column update (pmax / psum
    # over the devices) and its derivative in epsilon
    def big(x, y, a, b, e, axis=None):
        return solvers.sinkhorn(solvers.PointCloud(x, y, axis_name=axis), a, b,
                                epsilon=e).reg_ot_cost
    ref_v, ref_d = jax.value_and_grad(big, argnums=4)(x, y, a, b, 100.0)
    big_sharded = jax.shard_map(
        functools.partial(big, axis="i"), mesh=mesh,
        in_specs=(P("i"), P(), P("i"), P(), P()), out_specs=P())
    v, d = jax.jit(jax.value_and_grad(big_sharded, argnums=4))(*args, 100.0)
    out_big = [float(abs(v - ref_v) / abs(ref_v)), float(abs(d - ref_d) / abs(ref_d))]
    # Newton-CG with recycling (its basis and Ritz extraction on column quantities),
    # sharded with check_vma=True: the same solve and CG count as on one device
    def rec(x, a, axis=None):
        sol = solvers.sinkhorn_newton(solvers.PointCloud(x, y, axis_name=axis), a, b,
                                      epsilon=1e-2, recycle=4)
        return sol.reg_ot_cost, sol.n_cg_steps
    ref_rec = rec(x, a)
    got_rec = jax.jit(jax.shard_map(functools.partial(rec, axis="i"), mesh=mesh,
                                    in_specs=(P("i"), P("i")), out_specs=(P(), P())))(
        args[0], args[2])
    out_rec = [float(abs(got_rec[0] - ref_rec[0])), int(got_rec[1]), int(ref_rec[1])]
    # a failed solve raises under check_vma=True too (the check on a scalar token)
    fail = jax.jit(jax.shard_map(
        lambda x, y: solvers.sinkhorn(solvers.PointCloud(x, y, axis_name="i"),
                                      epsilon=1e-3, max_steps=3).g,
        mesh=mesh, in_specs=(P("i"), P()), out_specs=P()))
    try:
        fail(jax.device_put(x, rows), jax.device_put(y, whole)).block_until_ready()
        out["raised"] = False
    except Exception as e:
        out["raised"] = "max_steps" in str(e)
    out["large_epsilon"] = out_big
    out["recycle"] = out_rec
    print(json.dumps(out))
    """
)


def _check_sharded(second_order: bool):
    # (keeps conftest's --xla_backend_optimization_level=0: a third of the time)
    code = _SHARDED.replace("SECOND_ORDER", str(second_order))
    out = run_on_host_devices(code, 8)
    assert out.pop("raised") is True
    value_err, d_eps_err = out.pop("large_epsilon")
    assert value_err < 1e-13 and d_eps_err < 1e-9, (value_err, d_eps_err)
    rec_err, rec_cg, ref_cg = out.pop("recycle")
    assert rec_err < 1e-13 and rec_cg == ref_cg > 0, (rec_err, rec_cg, ref_cg)
    for name, r in out.items():
        assert r["f"] < 1e-12 and r["g"] < 1e-12 and r["cost"] < 1e-13, (name, r)
        assert r["grad"] < 1e-12, (name, r)
        assert r["jvp"] < 1e-12 and r["jvp_b"] < 1e-12, (name, r)
        if second_order and name == "online_sparse":
            assert r["hvp"] < 1e-11 and r["rev_rev"] < 1e-11, (name, r)
        assert r["steps"][0] == r["steps"][1], (name, r)
        assert "i" in r["sharded"], (name, r)


def test_rows_sharded_over_8_devices_match_one_device():
    """Values, first derivatives (outside and inside the shard_map, jvp), failures
    and recycling on 8 devices; second order in the slow variant below."""
    _check_sharded(second_order=False)


@pytest.mark.slow  # the second-order derivatives add about 1.5 minutes of compiling
def test_rows_sharded_over_8_devices_second_order():
    _check_sharded(second_order=True)
