"""Tests for `jaxdecomp.custom_root` / `jaxdecomp.custom_fixed_point`."""

import warnings

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import lineax as lx
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxdecomp

from .helpers import assert_tree_allclose, finite_difference_jvp

HI = lax.Precision.HIGHEST


# --------------------------------------------------------------------------------------
# Ridge regression: F(w) = X^T (X w - y) + lam w, closed form (X^T X + lam I)^-1 X^T y.
# --------------------------------------------------------------------------------------


def ridge_grad(w, lam, X, y):
    r = jnp.matmul(X, w, precision=HI) - y
    return jnp.matmul(X.T, r, precision=HI) + lam * w


def ridge_closed(lam, X, y):
    d = X.shape[1]
    A = jnp.matmul(X.T, X, precision=HI) + lam * jnp.eye(d, dtype=X.dtype)
    return jnp.linalg.solve(A, jnp.matmul(X.T, y, precision=HI))


def make_ridge_solver(steps=None, **options):
    """A gradient-descent inner solver (never differentiated)."""

    @jaxdecomp.custom_root(ridge_grad, **options)
    def solver(w0, lam, X, y):
        L = jnp.linalg.norm(X, ord=2) ** 2 + lam
        n_steps = 4000 if steps is None else steps
        return lax.fori_loop(
            0, n_steps, lambda _, w: w - ridge_grad(w, lam, X, y) / L, w0
        )

    return solver


def ridge_data(key, n=30, d=5, dtype=jnp.float64):
    kx, ky = jr.split(key)
    X = jr.normal(kx, (n, d), dtype) / jnp.sqrt(jnp.asarray(n, dtype))
    y = jr.normal(ky, (n,), dtype)
    return X, y


class _NaiveCG(eqx.Module):
    """A plain JAXopt-style `solve(matvec, b)` for the callable-solver path."""

    def __call__(self, matvec, b):
        def body(_, c):
            x, r, p, rs = c
            Ap = matvec(p)
            alpha = rs / jnp.vdot(p, Ap)
            x, r = x + alpha * p, r - alpha * Ap
            rs_new = jnp.vdot(r, r)
            return x, r, r + (rs_new / rs) * p, rs_new

        init = (jnp.zeros_like(b), b, b, jnp.vdot(b, b))
        return lax.fori_loop(0, b.size, body, init)[0]


SOLVES = {
    "auto": None,
    "cg": lx.CG(rtol=1e-12, atol=1e-12),
    "gmres": lx.GMRES(rtol=1e-12, atol=1e-12),
    "lu": lx.LU(),
    "callable": _NaiveCG(),
}


@pytest.mark.parametrize("solve", SOLVES)
def test_ridge_value_and_jacobians(getkey, solve):
    X, y = ridge_data(getkey())
    lam = jnp.asarray(0.7)
    solver = make_ridge_solver(solve=SOLVES[solve], symmetric=True)
    w0 = jnp.zeros(X.shape[1])
    assert_tree_allclose(solver(w0, lam, X, y), ridge_closed(lam, X, y), rtol=1e-10)
    expected = jax.jacfwd(ridge_closed, argnums=(0, 1, 2))(lam, X, y)
    fwd = jax.jacfwd(solver, argnums=(1, 2, 3))(w0, lam, X, y)
    rev = jax.jacrev(solver, argnums=(1, 2, 3))(w0, lam, X, y)
    assert_tree_allclose(fwd, expected, rtol=1e-8, atol=1e-10)
    assert_tree_allclose(rev, expected, rtol=1e-8, atol=1e-10)


def test_ridge_check_grads_order2(getkey):
    X, y = ridge_data(getkey(), n=12, d=4)
    solver = make_ridge_solver()
    w0 = jnp.zeros(4)
    check_grads(  # jitted: one compilation per derivative, not op-by-op dispatch
        jax.jit(lambda lam, X, y: solver(w0, lam, X, y)),
        (jnp.asarray(0.5), X, y),
        order=2,
        modes=("fwd", "rev"),
    )


def test_ridge_hessian_matches_closed_form(getkey):
    X, y = ridge_data(getkey())
    solver = make_ridge_solver()
    w0 = jnp.zeros(X.shape[1])
    u = jr.normal(getkey(), (X.shape[1],))

    def outer(lam, X):
        return jnp.vdot(u, solver(w0, lam, X, y)) ** 2

    def outer_ref(lam, X):
        return jnp.vdot(u, ridge_closed(lam, X, y)) ** 2

    args = (jnp.asarray(0.3), X)
    assert_tree_allclose(
        jax.jit(jax.hessian(outer, argnums=(0, 1)))(*args),
        jax.hessian(outer_ref, argnums=(0, 1))(*args),
        rtol=1e-7,
        atol=1e-9,
    )


def test_large_system_uses_iterative_solver(getkey):
    # d > DENSE_MAX_SIZE: the automatic choice is CG (symmetric) / GMRES (general).
    d = jaxdecomp._implicit.DENSE_MAX_SIZE + 44
    X, y = ridge_data(getkey(), n=2 * d, d=d)
    lam = jnp.asarray(1.0)
    w0 = jnp.zeros(d)
    v = jr.normal(getkey(), (d,))
    expected = jax.grad(lambda lam: jnp.vdot(v, ridge_closed(lam, X, y)))(lam)
    for symmetric in (True, False):

        @jaxdecomp.custom_root(ridge_grad, symmetric=symmetric)
        def solver(w0, lam, X, y):
            return ridge_closed(lam, X, y)

        got = jax.grad(lambda lam: jnp.vdot(v, solver(w0, lam, X, y)))(lam)
        np.testing.assert_allclose(got, expected, rtol=1e-8)


def _scaled_spd(d, lo, hi, seed=0):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return (q * np.geomspace(lo, hi, d)) @ q.T


@pytest.mark.parametrize("lo, hi", [(0.005, 0.01), (0.002, 1.0)])
def test_default_iterative_solver_float32(lo, hi):
    """float32, 1000 unknowns, symmetric: the default tangent solver is CG on the
    true residual, whose breakdown test does not depend on the scale of the
    Jacobian (lineax's CG gave NaN on the first system, which was reported as "not
    a root"), in both modes and under vmap."""
    d = 1000
    a64 = _scaled_spd(d, lo, hi)
    a = jnp.asarray(a64, jnp.float32)

    @jaxdecomp.custom_root(
        lambda x, t: jnp.matmul(a, x, precision=HI) - t, symmetric=True
    )
    def solver(x0, t):
        return jnp.linalg.solve(a, t)

    rng = np.random.default_rng(1)
    t = jnp.asarray(rng.normal(size=d), jnp.float32)
    v = jnp.asarray(rng.normal(size=d), jnp.float32)
    exact = np.linalg.solve(a64, np.asarray(v, np.float64))  # A^{-1} v, A symmetric
    _, tangent = jax.jvp(lambda t: solver(None, t), (t,), (v,))
    grad = jax.grad(lambda t: jnp.vdot(v, solver(None, t)))(t)
    for got in (tangent, grad):
        assert got.dtype == jnp.float32
        err = np.linalg.norm(np.asarray(got, np.float64) - exact)
        assert err <= 1e-4 * np.linalg.norm(exact)
    vs = jnp.stack([v, -2 * v])
    batched = jax.vmap(lambda v: jax.jvp(lambda t: solver(None, t), (t,), (v,))[1])(vs)
    # each batched tangent meets the same accuracy as the unbatched one
    for got, want in ((batched[0], exact), (batched[1], -2 * exact)):
        err = np.linalg.norm(np.asarray(got, np.float64) - want)
        assert err <= 1e-4 * np.linalg.norm(want)


def test_default_iterative_solver_reports_unattainable_tolerance():
    """float32 at condition number 1e4: the default tolerance (2.4e-5) is below what
    CG attains; the tangent solve fails visibly (no NaN gradient, no "not a root")."""
    a = jnp.asarray(_scaled_spd(1000, 1e-4, 1.0), jnp.float32)

    @jaxdecomp.custom_root(
        lambda x, t: jnp.matmul(a, x, precision=HI) - t, symmetric=True
    )
    def solver(x0, t):
        return jnp.linalg.solve(a, t)

    t = jnp.ones(1000, jnp.float32)
    with pytest.raises(Exception, match="non-finite|ill-conditioned|nearly singular"):
        jax.block_until_ready(jax.grad(lambda t: solver(None, t).sum())(t))


@pytest.mark.parametrize(
    "order",
    [1, pytest.param(2, marks=pytest.mark.slow)],  # 2: 45 s of compilation
)
def test_default_iterative_solver_check_grads_float64(order):
    d = jaxdecomp._implicit.DENSE_MAX_SIZE + 1  # the smallest CG size (cost)
    a = jnp.asarray(_scaled_spd(d, 0.5, 1.0))
    b = jnp.asarray(np.random.default_rng(2).normal(size=d))

    @jaxdecomp.custom_root(
        lambda x, s: s * jnp.matmul(a, x, precision=HI) - b, symmetric=True
    )
    def solver(x0, s):
        return jnp.linalg.solve(s * a, b)

    f = lambda s: jnp.sum(solver(None, s) ** 2)  # noqa: E731
    check_grads(f, (jnp.asarray(1.5),), order=order, modes=("fwd", "rev"))


def _nonsymmetric(d, scale, seed=0):
    rng = np.random.default_rng(seed)
    return scale * (np.eye(d) + 0.3 * rng.normal(size=(d, d)) / np.sqrt(d))


def test_default_nonsymmetric_solver_float32_small_scale():
    """float32, 2000 unknowns, nonsymmetric Jacobian 1e-4 (I + 0.3 G / sqrt(d)): the
    default tangent solver is GMRES on the true residual. lineax's GMRES (the
    previous default) reports `stagnation` on this healthy system (its update
    test has an absolute atol; scale 1 passes), so the hypergradient raised."""
    d = 2000
    a64 = _nonsymmetric(d, 1e-4)
    a = jnp.asarray(a64, jnp.float32)
    rng = np.random.default_rng(1)
    t64 = rng.normal(size=d)
    x64 = np.linalg.solve(a64, t64)  # the forward solution, computed once
    t, x_star = jnp.asarray(t64, jnp.float32), jnp.asarray(x64, jnp.float32)
    # (lineax 0.1.1's GMRES: `stagnation` here; `benchmarks.implicit`'s
    # tangent_solver_table shows it beside this solver)

    @jaxdecomp.custom_root(lambda x, t: jnp.matmul(a, x, precision=HI) - t)
    def solver(x0, t):
        return x_star + 0 * t

    v = jnp.asarray(rng.normal(size=d), jnp.float32)
    _, tangent = jax.jvp(lambda t: solver(None, t), (t,), (v,))
    grad = jax.grad(lambda t: jnp.vdot(v, solver(None, t)))(t)
    exact_fwd = np.linalg.solve(a64, np.asarray(v, np.float64))
    exact_rev = np.linalg.solve(a64.T, np.asarray(v, np.float64))
    for got, want in ((tangent, exact_fwd), (grad, exact_rev)):
        assert got.dtype == jnp.float32
        assert np.linalg.norm(np.asarray(got, np.float64) - want) <= 1e-4 * (
            np.linalg.norm(want)
        )


def _lx_solve(a, b, solver):
    return lx.linear_solve(lx.MatrixLinearOperator(a), b, solver, throw=False)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_true_residual_gmres(dtype):
    """The GMRES behind the default: meets rtol in the true residual (checked in
    float64) at every scale, with and without a (right) preconditioner, under jit
    without retracing and under vmap (== a loop)."""
    GMRES = jaxdecomp.TrueResidualGMRES
    rtol = jaxdecomp._misc.default_tol(dtype, 2 / 3)
    d = 300
    rng = np.random.default_rng(3)
    b64 = rng.normal(size=d)
    b = jnp.asarray(b64, dtype)
    traces = []

    @jax.jit
    def solve(a, b):
        traces.append(None)
        return _lx_solve(a, b, GMRES(rtol=rtol))

    for scale in (1e-6, 1.0, 1e6):
        a64 = _nonsymmetric(d, scale)
        sol = solve(jnp.asarray(a64, dtype), b)
        assert sol.result == lx.RESULTS.successful and sol.value.dtype == dtype
        res = np.linalg.norm(b64 - a64 @ np.asarray(sol.value, np.float64))
        assert res <= 1.05 * rtol * np.linalg.norm(b64)
        assert 0 < int(sol.stats["num_steps"]) <= 20
    assert len(traces) == 1
    # an exact right preconditioner: one step
    a64 = _nonsymmetric(d, 1.0)
    a = jnp.asarray(a64, dtype)
    inverse = lx.MatrixLinearOperator(jnp.asarray(np.linalg.inv(a64), dtype))
    sol = lx.linear_solve(
        lx.MatrixLinearOperator(a),
        b,
        GMRES(rtol=rtol),
        options={"preconditioner": inverse},
        throw=False,
    )
    assert sol.result == lx.RESULTS.successful and int(sol.stats["num_steps"]) == 1
    # vmap == loop
    bs = jnp.stack([b, 2 * b[::-1], jnp.zeros_like(b)])

    def solve_ok(b):
        sol = _lx_solve(a, b, GMRES(rtol=rtol))
        return sol.value, sol.result == lx.RESULTS.successful

    values, ok = jax.vmap(solve_ok)(bs)
    assert np.all(ok)
    atol = 1e-4 if dtype == jnp.float32 else 1e-12
    for i in range(3):
        np.testing.assert_allclose(values[i], solve_ok(bs[i])[0], rtol=0, atol=atol)
    assert not np.any(values[2])  # b = 0 gives x = 0


@pytest.mark.parametrize("name", ["TrueResidualCG", "TrueResidualGMRES"])
def test_true_residual_solvers_derivatives_jit_vmap(name):
    """The public solvers inside `lx.linear_solve`, float64: value against NumPy,
    check_grads in both modes (lineax's implicit derivative runs the solver on the
    tangent and on the transposed system), one trace for new values, vmap == loop."""
    solver = getattr(jaxdecomp, name)(rtol=1e-13)
    d = 12
    base = _scaled_spd(d, 0.5, 2.0)
    if name == "TrueResidualGMRES":
        base = base + _nonsymmetric(d, 0.3) - 0.3 * np.eye(d)
    base = jnp.asarray(base)
    tag = (lx.positive_semidefinite_tag,) if name == "TrueResidualCG" else ()
    traces = []

    def solve(s, b):
        traces.append(None)
        op = lx.MatrixLinearOperator(base + s * jnp.eye(d), tag)
        return lx.linear_solve(op, b, solver).value

    b = jnp.asarray(np.random.default_rng(4).normal(size=d))
    np.testing.assert_allclose(
        solve(0.1, b), np.linalg.solve(base + 0.1 * np.eye(d), b), rtol=1e-10
    )
    check_grads(solve, (0.1, b), order=1, modes=("fwd", "rev"))
    traces.clear()
    jitted = jax.jit(solve)
    jitted(0.2, b)
    jitted(0.3, 2 * b)
    assert len(traces) == 1
    ss = jnp.array([0.1, 0.5, 1.0])
    batched = jax.vmap(solve, in_axes=(0, None))(ss, b)
    for i in range(3):
        np.testing.assert_allclose(batched[i], solve(ss[i], b), rtol=1e-10)


def test_true_residual_gmres_failures():
    """Failures are codes, told apart: GMRES(20) on a cyclic shift of 300 unknowns
    makes no progress (`stagnation`), a tolerance below float32's level is
    `singular` (message: ill-conditioned), and too few steps `max_steps_reached`;
    never a converged claim."""
    GMRES = jaxdecomp.TrueResidualGMRES
    d = 300
    shift = jnp.asarray(np.roll(np.eye(d), 1, axis=0), jnp.float32)
    e0 = jnp.zeros(d, jnp.float32).at[0].set(1)
    assert _lx_solve(shift, e0, GMRES(rtol=1e-3)).result == lx.RESULTS.stagnation
    a = jnp.asarray(_scaled_spd(d, 1e-3, 1.0) + _nonsymmetric(d, 1e-3), jnp.float32)
    b = jnp.ones(d, jnp.float32)
    sol = _lx_solve(a, b, GMRES(rtol=1e-9))
    assert sol.result == lx.RESULTS.singular
    assert np.all(np.isfinite(sol.value))  # the best iterate, not NaN
    sol = _lx_solve(a, b, GMRES(rtol=1e-3, max_steps=3))
    assert sol.result == lx.RESULTS.max_steps_reached
    assert int(sol.stats["num_steps"]) == 3


@pytest.mark.parametrize(
    "order",
    [1, pytest.param(2, marks=pytest.mark.slow)],  # 2: compilation-heavy
)
def test_default_nonsymmetric_solver_check_grads_float64(order):
    d = jaxdecomp._implicit.DENSE_MAX_SIZE + 1  # the smallest GMRES size (cost)
    a = jnp.asarray(_nonsymmetric(d, 1.0))
    b = jnp.asarray(np.random.default_rng(2).normal(size=d))

    @jaxdecomp.custom_root(lambda x, s: s * jnp.matmul(a, x, precision=HI) - b)
    def solver(x0, s):
        return jnp.linalg.solve(s * a, b)

    f = lambda s: jnp.sum(solver(None, s) ** 2)  # noqa: E731
    check_grads(f, (jnp.asarray(1.5),), order=order, modes=("fwd", "rev"))


# --------------------------------------------------------------------------------------
# Lasso by proximal gradient, as a fixed point. Orthogonal design => closed form
# w* = soft_threshold(X^T y, lam).
# --------------------------------------------------------------------------------------


def soft_threshold(z, t):
    return jnp.sign(z) * jnp.maximum(jnp.abs(z) - t, 0.0)


def prox_grad_step(w, lam, X, y):
    eta = 0.5
    g = jnp.matmul(X.T, jnp.matmul(X, w, precision=HI) - y, precision=HI)
    return soft_threshold(w - eta * g, eta * lam)


@jaxdecomp.custom_fixed_point(prox_grad_step)
def lasso_solver(w0, lam, X, y):
    return lax.fori_loop(0, 200, lambda _, w: prox_grad_step(w, lam, X, y), w0)


def lasso_closed(lam, X, y):
    return soft_threshold(jnp.matmul(X.T, y, precision=HI), lam)


def lasso_data(key, n=8, d=5):
    Q, _ = jnp.linalg.qr(jr.normal(key, (n, n)))
    X = Q[:, :d]  # orthonormal columns
    # X^T y = z with entries well away from the threshold (no kinks nearby).
    z = jnp.array([2.0, -1.5, 0.2, -0.1, 1.2])
    y = jnp.matmul(X, z, precision=HI)
    return X, y


def test_lasso_value_and_derivatives(getkey):
    X, y = lasso_data(getkey())
    lam = jnp.asarray(0.5)
    w0 = jnp.zeros(5)
    assert_tree_allclose(lasso_solver(w0, lam, X, y), lasso_closed(lam, X, y))
    for jac in (jax.jacfwd, jax.jacrev):
        assert_tree_allclose(
            jax.jit(jac(lasso_solver, argnums=(1, 3)))(w0, lam, X, y),
            jax.jacfwd(lasso_closed, argnums=(0, 2))(lam, X, y),
            rtol=1e-9,
            atol=1e-12,
        )
    check_grads(
        jax.jit(lambda lam, y: lasso_solver(w0, lam, X, y)),
        (lam, y),
        order=2,
        modes=("fwd", "rev"),
        eps=1e-4,
    )


# --------------------------------------------------------------------------------------
# Transformations, pytrees, closures, aux.
# --------------------------------------------------------------------------------------


def test_vmap_matches_loop(getkey):
    X, y = ridge_data(getkey())
    solver = make_ridge_solver()
    w0 = jnp.zeros(X.shape[1])
    lams = jnp.array([0.1, 0.5, 2.0])
    ys = jnp.stack([y, 2 * y, -y])

    def f(lam, y):
        return jax.grad(lambda lam: jnp.sum(solver(w0, lam, X, y) ** 2))(lam)

    # jitted: one compilation each instead of op-by-op dispatch of the solver loops
    batched = jax.jit(jax.vmap(f))(lams, ys)
    f_jit = jax.jit(f)
    looped = jnp.stack([f_jit(lam, y) for lam, y in zip(lams, ys)])
    assert_tree_allclose(batched, looped, rtol=1e-12)
    jac = jax.jacfwd(solver, argnums=1)
    jac_batched = jax.jit(jax.vmap(jac, in_axes=(None, 0, None, 0)))(w0, lams, X, ys)
    jac_jit = jax.jit(jac)
    jac_loop = jnp.stack([jac_jit(w0, lam, X, y) for lam, y in zip(lams, ys)])
    assert_tree_allclose(jac_batched, jac_loop, rtol=1e-12)


def test_pytree_params_and_kwargs(getkey):
    # Params {"a", "b"} solve a coupled linear system A [a; b] = theta, with theta
    # given partly positionally and partly as a keyword.
    A = jnp.array([[3.0, 1.0, 0.0], [1.0, 4.0, 1.0], [0.0, 1.0, 5.0]])

    def optimality(params, theta_a, *, theta_b):
        x = jnp.concatenate([params["a"], params["b"]])
        r = jnp.matmul(A, x, precision=HI) - jnp.concatenate([theta_a, theta_b])
        return {"a": r[:2], "b": r[2:]}

    @jaxdecomp.custom_root(optimality)
    def solver(init, theta_a, *, theta_b):
        x = jnp.linalg.solve(A, jnp.concatenate([theta_a, theta_b]))
        return {"a": x[:2], "b": x[2:]}

    def closed(theta_a, theta_b):
        x = jnp.linalg.solve(A, jnp.concatenate([theta_a, theta_b]))
        return {"a": x[:2], "b": x[2:]}

    init = {"a": jnp.zeros(2), "b": jnp.zeros(1)}
    ta, tb = jnp.array([1.0, 2.0]), jnp.array([3.0])

    def loss(ta, tb):
        out = solver(init, ta, theta_b=tb)
        return jnp.sum(out["a"] ** 2) + 3 * jnp.sum(out["b"])

    def loss_ref(ta, tb):
        out = closed(ta, tb)
        return jnp.sum(out["a"] ** 2) + 3 * jnp.sum(out["b"])

    assert_tree_allclose(
        jax.grad(loss, argnums=(0, 1))(ta, tb),
        jax.grad(loss_ref, argnums=(0, 1))(ta, tb),
    )
    dt = (jnp.array([0.3, -0.2]), jnp.array([0.7]))
    assert_tree_allclose(
        jax.jvp(lambda a, b: solver(init, a, theta_b=b), (ta, tb), dt)[1],
        jax.jvp(closed, (ta, tb), dt)[1],
    )


def test_closed_over_arrays_are_differentiated(getkey):
    X, y = ridge_data(getkey())
    w0 = jnp.zeros(X.shape[1])

    def loss(scale):
        Xs = X * scale  # closed over by the optimality function below

        @jaxdecomp.custom_root(lambda w, lam: ridge_grad(w, lam, Xs, y))
        def solver(w0, lam):
            return ridge_closed(lam, Xs, y)

        return jnp.sum(solver(w0, 0.5) ** 2)

    def loss_ref(scale):
        return jnp.sum(ridge_closed(0.5, X * scale, y) ** 2)

    s = jnp.asarray(1.3)
    np.testing.assert_allclose(jax.grad(loss)(s), jax.grad(loss_ref)(s), rtol=1e-9)
    np.testing.assert_allclose(
        jax.jvp(loss, (s,), (jnp.ones(()),))[1],
        finite_difference_jvp(loss_ref, (s,), (jnp.ones(()),)),
        rtol=1e-6,
    )


def test_has_aux(getkey):
    X, y = ridge_data(getkey())

    @jaxdecomp.custom_root(ridge_grad, has_aux=True)
    def solver(w0, lam, X, y):
        w = ridge_closed(lam, X, y)
        return w, {"steps": jnp.asarray(3), "norm": jnp.linalg.norm(w)}

    w0 = jnp.zeros(X.shape[1])
    (w, aux), (tw, taux) = jax.jvp(
        lambda lam: solver(w0, lam, X, y), (jnp.asarray(0.4),), (jnp.ones(()),)
    )
    assert int(aux["steps"]) == 3
    assert float(taux["norm"]) == 0.0  # aux is not differentiated
    expected = jax.jvp(
        lambda lam: ridge_closed(lam, X, y), (jnp.asarray(0.4),), (jnp.ones(()),)
    )[1]
    assert_tree_allclose(tw, expected)


def test_jit_does_not_retrace(getkey):
    X, y = ridge_data(getkey())
    solver = make_ridge_solver()
    w0 = jnp.zeros(X.shape[1])

    @eqx.debug.assert_max_traces(max_traces=1)
    def grad_fn(lam, y):
        return jax.grad(lambda lam: jnp.sum(solver(w0, lam, X, y)))(lam)

    grad_fn = jax.jit(grad_fn)
    g1 = grad_fn(jnp.asarray(0.5), y)
    g2 = grad_fn(jnp.asarray(0.9), 2 * y)
    assert not np.allclose(g1, g2)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_dtype_preserved(getkey, dtype):
    X, y = ridge_data(getkey(), dtype=dtype)
    solver = make_ridge_solver(symmetric=True)
    w0 = jnp.zeros(X.shape[1], dtype)
    lam = jnp.asarray(0.5, dtype)
    w = solver(w0, lam, X, y)
    g = jax.grad(lambda lam: jnp.sum(solver(w0, lam, X, y)))(lam)
    t = jax.jvp(lambda lam: solver(w0, lam, X, y), (lam,), (jnp.ones((), dtype),))[1]
    assert w.dtype == g.dtype == t.dtype == dtype
    ref = jax.grad(lambda lam: jnp.sum(ridge_closed(lam, X, y)))(lam)
    tol = 1e-4 if dtype == jnp.float32 else 1e-10
    np.testing.assert_allclose(g, ref, rtol=tol)


# --------------------------------------------------------------------------------------
# Failures are visible.
# --------------------------------------------------------------------------------------


def test_unconverged_solver_raises(getkey):
    X, y = ridge_data(getkey())
    solver = make_ridge_solver(steps=3)
    w0 = jnp.zeros(X.shape[1])
    lam = jnp.asarray(0.5)
    solver(w0, lam, X, y)  # no derivative: no check, no error
    with pytest.raises(Exception, match="does not satisfy the optimality condition"):
        jax.grad(lambda lam: jnp.sum(solver(w0, lam, X, y)))(lam)
    with pytest.raises(Exception, match="does not satisfy the optimality condition"):
        jax.jit(jax.jacfwd(solver, argnums=1))(w0, lam, X, y)


def test_unconverged_solver_nan_and_warn(getkey):
    X, y = ridge_data(getkey())
    w0 = jnp.zeros(X.shape[1])
    lam = jnp.asarray(0.5)
    nan_solver = make_ridge_solver(steps=3, on_failure="nan")
    g = jax.grad(lambda lam: jnp.sum(nan_solver(w0, lam, X, y)))(lam)
    t = jax.jvp(lambda lam: nan_solver(w0, lam, X, y), (lam,), (jnp.ones(()),))[1]
    assert np.isnan(g) and np.all(np.isnan(t))
    good = make_ridge_solver(on_failure="nan")
    assert np.isfinite(jax.grad(lambda lam: jnp.sum(good(w0, lam, X, y)))(lam))
    warn_solver = make_ridge_solver(steps=3, on_failure="warn")
    with pytest.warns(RuntimeWarning, match="optimality condition"):
        g = jax.grad(lambda lam: jnp.sum(warn_solver(w0, lam, X, y)))(lam)
        jax.effects_barrier()
    with pytest.warns(RuntimeWarning, match="optimality condition"):
        jax.jit(jax.jacfwd(warn_solver, argnums=1))(w0, lam, X, y)
        jax.effects_barrier()
    t = jax.jit(jax.jacfwd(nan_solver, argnums=1))(w0, lam, X, y)
    assert np.all(np.isnan(t))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jax.grad(
            lambda lam: jnp.sum(make_ridge_solver(on_failure="warn")(w0, lam, X, y))
        )(lam)
        jax.effects_barrier()


def test_nonfinite_solution_is_reported(getkey):
    X, y = ridge_data(getkey())

    @jaxdecomp.custom_root(ridge_grad)
    def solver(w0, lam, X, y):
        return jnp.full_like(w0, jnp.nan)

    with pytest.raises(Exception, match="optimality condition"):
        jax.grad(lambda lam: jnp.sum(solver(jnp.zeros(5), lam, X, y)))(1.0)


def test_tangent_solve_failure_raises(getkey):
    X, y = ridge_data(getkey(), d=20, n=40)
    w0 = jnp.zeros(20)
    lam = jnp.asarray(1e-3)
    solver = make_ridge_solver(
        solve=lx.CG(rtol=1e-12, atol=1e-12, max_steps=2), symmetric=True, steps=20000
    )
    for f in (
        jax.grad(lambda lam: jnp.sum(solver(w0, lam, X, y))),
        lambda lam: jax.jvp(
            lambda lam_: solver(w0, lam_, X, y), (lam,), (jnp.ones(()),)
        )[1],
    ):
        with pytest.raises(Exception, match="maximum number of solver steps"):
            jax.block_until_ready(f(lam))


def test_preconditioner_and_tangent_init_are_used(getkey):
    X, y = ridge_data(getkey(), d=20, n=40)
    w0 = jnp.zeros(20)
    lam = jnp.asarray(1e-3)

    def exact_inverse(w, lam, X, y):
        A = jnp.matmul(X.T, X, precision=HI) + lam * jnp.eye(20)
        return lx.TaggedLinearOperator(
            lx.MatrixLinearOperator(jnp.linalg.inv(A)),
            (lx.symmetric_tag, lx.positive_semidefinite_tag),
        )

    cg5 = lx.CG(rtol=1e-10, atol=1e-10, max_steps=5)
    expected = jax.grad(lambda lam: jnp.sum(ridge_closed(lam, X, y)))(lam)
    plain = make_ridge_solver(solve=cg5, symmetric=True, steps=20000)
    with pytest.raises(Exception, match="maximum number of solver steps"):
        jax.block_until_ready(jax.grad(lambda lam: jnp.sum(plain(w0, lam, X, y)))(lam))
    solver = make_ridge_solver(
        solve=cg5, symmetric=True, steps=20000, preconditioner=exact_inverse
    )
    got = jax.grad(lambda lam: jnp.sum(solver(w0, lam, X, y)))(lam)
    np.testing.assert_allclose(got, expected, rtol=1e-7)

    # An exact initial guess for the (forward-mode) tangent needs zero CG steps.
    def exact_tangent(w, lam, X, y):
        return jax.jvp(lambda lam_: ridge_closed(lam_, X, y), (lam,), (jnp.ones(()),))[
            1
        ]

    cg0 = lx.CG(rtol=1e-8, atol=1e-8, max_steps=2)
    solver = make_ridge_solver(
        solve=cg0, symmetric=True, steps=20000, tangent_init=exact_tangent
    )
    t = jax.jvp(lambda lam_: solver(w0, lam_, X, y), (lam,), (jnp.ones(()),))[1]
    np.testing.assert_allclose(t, exact_tangent(None, lam, X, y), rtol=1e-7)


def test_singular_jacobian_with_ridge():
    # Graph-Laplacian system L x = P theta: x is defined up to a constant (the gauge);
    # the solver returns the zero-mean solution. With a small ridge the derivative is
    # the pseudo-inverse one up to O(ridge / lambda_2).
    n = 6
    adj = jnp.ones((n, n)) - jnp.eye(n)
    adj = adj.at[0, 3].set(0.0).at[3, 0].set(0.0)
    L = jnp.diag(adj.sum(1)) - adj
    P = jnp.eye(n) - jnp.ones((n, n)) / n  # rhs always in range(L)

    def optimality(x, theta):
        return jnp.matmul(L, x, precision=HI) - jnp.matmul(P, theta, precision=HI)

    def pinv_solution(theta):
        return jnp.matmul(
            jnp.linalg.pinv(L), jnp.matmul(P, theta, precision=HI), precision=HI
        )

    ridge = 1e-9

    @jaxdecomp.custom_root(optimality, ridge=ridge)
    def solver(x0, theta):
        return pinv_solution(theta)

    theta = jnp.arange(1.0, n + 1.0)
    x0 = jnp.zeros(n)
    got = jax.jacrev(solver, argnums=1)(x0, theta)
    expected = jax.jacfwd(pinv_solution)(theta)
    np.testing.assert_allclose(got, expected, atol=1e-7)
    np.testing.assert_allclose(
        jax.jacfwd(solver, argnums=1)(x0, theta), expected, atol=1e-7
    )
    # Without the ridge, the singular dense solve is reported, not silently wrong.
    plain = jaxdecomp.custom_root(optimality)(lambda x0, theta: pinv_solution(theta))
    with pytest.raises(Exception, match="non-finite"):
        jax.block_until_ready(jax.jacfwd(plain, argnums=1)(x0, theta))


# --------------------------------------------------------------------------------------
# Bad input raises clear errors at trace time.
# --------------------------------------------------------------------------------------


def test_bad_configuration():
    with pytest.raises(ValueError, match="on_failure"):
        jaxdecomp.custom_root(ridge_grad, on_failure="ignore")
    with pytest.raises(ValueError, match="ridge"):
        jaxdecomp.custom_root(ridge_grad, ridge=-1.0)
    with pytest.raises(ValueError, match="rtol"):
        jaxdecomp.custom_root(ridge_grad, rtol=-1.0)
    with pytest.raises(TypeError, match="solve"):
        jaxdecomp.custom_root(ridge_grad, solve="cg")
    with pytest.raises(TypeError, match="callable"):
        jaxdecomp.custom_root(3.0)
    with pytest.raises(TypeError, match="callable"):
        jaxdecomp.custom_fixed_point(None)


def test_bad_shapes_raise_at_trace_time(getkey):
    X, y = ridge_data(getkey())
    w0 = jnp.zeros(X.shape[1])

    @jaxdecomp.custom_root(lambda w, lam, X, y: ridge_grad(w, lam, X, y)[:-1])
    def wrong_shape(w0, lam, X, y):
        return ridge_closed(lam, X, y)

    with pytest.raises(ValueError, match="structure and shapes of the solution"):
        jax.eval_shape(wrong_shape, w0, 0.5, X, y)

    @jaxdecomp.custom_root(lambda w, lam: w)
    def int_solution(w0, lam):
        return jnp.arange(3)

    with pytest.raises(TypeError, match="floating-point"):
        jax.eval_shape(int_solution, w0, 0.5)

    @jaxdecomp.custom_root(ridge_grad, has_aux=True)
    def no_aux(w0, lam, X, y):
        return ridge_closed(lam, X, y)

    with pytest.raises(ValueError, match="has_aux=True"):
        jax.eval_shape(no_aux, w0, 0.5, X, y)

    @jaxdecomp.custom_fixed_point(lambda w, lam: jnp.concatenate([w, w]))
    def fp_wrong(w0, lam):
        return w0

    with pytest.raises(ValueError, match="fixed_point_fun"):
        jax.eval_shape(fp_wrong, w0, 0.5)


# --------------------------------------------------------------------------------------
# Migration from JAXopt: same numbers where JAXopt is right; visible where it is not.
# --------------------------------------------------------------------------------------


def test_matches_jaxopt(getkey):
    implicit_diff = pytest.importorskip("jaxopt.implicit_diff")
    X, y = ridge_data(getkey())
    w0 = jnp.zeros(X.shape[1])

    def inner(w0, lam, X, y):
        L = jnp.linalg.norm(X, ord=2) ** 2 + lam
        return lax.fori_loop(0, 4000, lambda _, w: w - ridge_grad(w, lam, X, y) / L, w0)

    ours = jaxdecomp.custom_root(ridge_grad)(inner)
    theirs = implicit_diff.custom_root(ridge_grad)(inner)
    lam = jnp.asarray(0.3)
    assert_tree_allclose(
        jax.jacrev(ours, argnums=(1, 2))(w0, lam, X, y),
        jax.jacrev(theirs, argnums=(1, 2))(w0, lam, X, y),
        rtol=1e-6,
    )


# JAXopt's own cases (tests/implicit_diff_test.py): solver called with keyword
# arguments, has_aux, root_vjp / root_jvp; the Jacobian reference is the closed form.


def _jaxopt_ridge_solver(init_params, lam, X, y):
    del init_params
    return ridge_closed(lam, X, y)


def test_jaxopt_convention_keyword_arguments(getkey):
    X, y = ridge_data(getkey())
    lam = jnp.asarray(0.7)
    jac = jax.jacfwd(ridge_closed)(lam, X, y)
    solver = jaxdecomp.custom_root(ridge_grad)(_jaxopt_ridge_solver)
    assert_tree_allclose(solver(None, lam=lam, X=X, y=y), ridge_closed(lam, X, y))
    assert_tree_allclose(
        jax.jacrev(solver, argnums=1)(None, lam, X=X, y=y), jac, rtol=1e-10
    )
    assert_tree_allclose(
        jax.jacfwd(lambda t: solver(None, X=X, y=y, lam=t))(lam), jac, rtol=1e-10
    )

    def with_aux(init_params, lam, X, y):
        return _jaxopt_ridge_solver(init_params, lam, X, y), None

    aux_solver = jaxdecomp.custom_root(ridge_grad, has_aux=True)(with_aux)
    J, _ = jax.jacrev(aux_solver, argnums=1)(None, lam, X=X, y=y)
    assert_tree_allclose(J, jac, rtol=1e-10)


def test_jaxopt_convention_catch_all_fixed_point_function(getkey):
    # `lambda x, *args` worked under JAXopt with keyword calls: the solver's
    # signature resolves the keywords to positions.
    X, y = ridge_data(getkey())
    lam = jnp.asarray(0.7)
    step = 1 / (jnp.linalg.norm(X, ord=2) ** 2 + lam)
    T = lambda w, *args: w - step * ridge_grad(w, *args)  # noqa: E731
    solver = jaxdecomp.custom_fixed_point(T)(_jaxopt_ridge_solver)
    jac = jax.jacfwd(ridge_closed)(lam, X, y)
    for f in (jax.jacfwd, jax.jacrev):
        got = f(lambda t: solver(None, y=y, lam=t, X=X))(lam)
        assert_tree_allclose(got, jac, rtol=1e-9)


def test_jaxopt_convention_defaults_and_reference_signature(getkey):
    X, y = ridge_data(getkey())
    lam = jnp.asarray(0.7)
    jac = jax.jacfwd(ridge_closed)(lam, X, y)

    # the solver's default reaches F when F takes it ...
    def F_scaled(w, lam, X, y, scale):
        return scale * ridge_grad(w, lam, X, y)

    @jaxdecomp.custom_root(F_scaled)
    def with_default(w0, lam, X, y, scale=3.0):
        return ridge_closed(lam, X, y)

    # ... and is left out when F does not take it (a solver option)
    @jaxdecomp.custom_root(ridge_grad)
    def with_option(w0, lam, X, y, maxiter=100):
        return ridge_closed(lam, X, y)

    # keyword-only solver arguments and a catch-all F: ambiguous without a
    # reference signature, a clear TypeError at trace time ...
    def kw_only(w0, *, lam, X, y):
        return ridge_closed(lam, X, y)

    def F_any(w, *args):
        return ridge_grad(w, *args)

    with pytest.raises(TypeError, match="reference_signature"):
        jaxdecomp.custom_root(F_any)(kw_only)(None, lam=lam, X=X, y=y)
    # ... resolved by one
    resolved = jaxdecomp.custom_root(
        F_any, reference_signature=lambda w, lam, X, y: None
    )(kw_only)
    for solver in (with_default, with_option):
        assert_tree_allclose(jax.jacrev(solver, argnums=1)(None, lam, X, y), jac)
    assert_tree_allclose(
        jax.jacfwd(lambda t: resolved(None, lam=t, X=X, y=y))(lam), jac, rtol=1e-10
    )
    with pytest.raises(TypeError, match="with_option.*unexpected keyword"):
        with_option(None, lam, X, y, tol=1e-3)


def test_root_jvp_and_root_vjp_match_closed_form(getkey):
    X, y = ridge_data(getkey())
    lam = 0.7
    sol = ridge_closed(lam, X, y)
    args = (lam, X, y)
    jac = jax.jacfwd(ridge_closed)(lam, X, y)
    tangents = (1.0, jnp.zeros_like(X), jnp.zeros_like(y))
    for solve in (None, lx.CG(rtol=1e-12, atol=1e-12), _NaiveCG()):
        kwargs = dict(symmetric=True) if solve is not None else {}
        got = jaxdecomp.root_jvp(ridge_grad, sol, args, tangents, solve, **kwargs)
        assert_tree_allclose(got, jac, rtol=1e-9)
        rows = jax.vmap(
            lambda g, solve=solve, kwargs=kwargs: jaxdecomp.root_vjp(
                ridge_grad, sol, args, g, solve, **kwargs
            )[0]
        )(jnp.eye(sol.shape[0]))
        assert_tree_allclose(rows, jac, rtol=1e-9)
    # every argument: the full Jacobian in X agrees with the closed form's
    jac_x = jax.jacfwd(ridge_closed, argnums=1)(lam, X, y)
    cots = jaxdecomp.root_vjp(ridge_grad, sol, args, jnp.ones_like(sol))
    assert_tree_allclose(cots[1], jnp.einsum("i,ijk->jk", jnp.ones_like(sol), jac_x))
    assert cots[0].shape == () and cots[2].shape == y.shape


def test_root_jvp_and_root_vjp_derivatives_and_jit(getkey):
    X, y = ridge_data(getkey(), n=8, d=3)
    lam = jnp.asarray(0.7)
    g = jr.normal(getkey(), (3,), X.dtype)

    def jvp_of(lam, X, y):
        s = ridge_closed(lam, X, y)
        return jaxdecomp.root_jvp(
            ridge_grad,
            s,
            (lam, X, y),
            (jnp.ones_like(lam), jnp.zeros_like(X), jnp.zeros_like(y)),
        )

    def vjp_of(lam, X, y):
        s = ridge_closed(lam, X, y)
        return jaxdecomp.root_vjp(ridge_grad, s, (lam, X, y), g.astype(X.dtype))[0]

    # jit: each eager call would compile lineax's solve anew (a new closure)
    check_grads(jax.jit(jvp_of), (lam, X, y), order=2, modes=("fwd", "rev"))
    check_grads(jax.jit(vjp_of), (lam, X, y), order=2, modes=("fwd", "rev"))
    assert_tree_allclose(jax.jit(jvp_of)(lam, X, y), jvp_of(lam, X, y))
    assert_tree_allclose(jax.jit(vjp_of)(lam, X, y), vjp_of(lam, X, y))
    args32 = jax.tree.map(lambda a: a.astype(jnp.float32), (lam, X, y))
    assert jvp_of(*args32).dtype == jnp.float32
    assert vjp_of(*args32).dtype == jnp.float32
    # vmap over problems agrees with a loop
    lams = jnp.array([0.3, 0.7, 2.0])
    assert_tree_allclose(
        jax.vmap(lambda t: jvp_of(t, X, y))(lams),
        jnp.stack([jvp_of(t, X, y) for t in lams]),
    )


def test_root_jvp_and_root_vjp_bad_input(getkey):
    X, y = ridge_data(getkey())
    sol = ridge_closed(0.7, X, y)
    with pytest.raises(ValueError, match="same length"):
        jaxdecomp.root_jvp(ridge_grad, sol, (0.7, X, y), (1.0,))
    with pytest.raises(ValueError, match="structure and shapes"):
        jaxdecomp.root_vjp(
            lambda w, *a: ridge_grad(w, *a)[:-1], sol, (0.7, X, y), sol[:-1]
        )
    with pytest.raises(ValueError, match="cotangent"):
        jaxdecomp.root_vjp(ridge_grad, sol, (0.7, X, y), sol[:-1])
    with pytest.raises(TypeError, match="tuple"):
        jaxdecomp.root_vjp(ridge_grad, sol, [0.7, X, y], sol)
    # a singular Jacobian is an error, not inf/NaN
    with pytest.raises(Exception, match="singular|non-finite"):
        jaxdecomp.root_jvp(
            lambda w, lam: lam * jnp.zeros_like(w) + 0 * w, sol, (1.0,), (1.0,)
        )
