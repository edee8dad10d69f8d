"""Tests for solvers.cg (the foundation of the preconditioned-CG issue)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest
from jax.test_util import check_grads

import solvers


def spd_system(n=30, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    m = rng.normal(size=(n, n))
    a = m @ m.T / n + np.diag(rng.uniform(0.1, 10.0, size=n))
    return jnp.asarray(a, dtype), jnp.asarray(rng.normal(size=n), dtype)


@pytest.mark.parametrize("flexible", [False, True])
@pytest.mark.parametrize("kind", ["matrix", "callable", "lineax"])
def test_solves_against_numpy(kind, flexible):
    a, b = spd_system()
    operator = {
        "matrix": a,
        "callable": lambda x: a @ x,
        "lineax": lx.MatrixLinearOperator(a, lx.positive_semidefinite_tag),
    }[kind]
    jacobi = lambda r: r / jnp.diag(a)  # noqa: E731
    sol = solvers.cg(operator, b, preconditioner=jacobi, rtol=1e-12, flexible=flexible)
    np.testing.assert_allclose(sol.x, np.linalg.solve(a, b), rtol=1e-9)
    k = int(sol.n_steps)
    norms = np.asarray(sol.residual_norms)
    assert np.isfinite(norms[: k + 1]).all() and np.isnan(norms[k + 1 :]).all()
    assert norms[k] <= 1e-12 * np.linalg.norm(b) and bool(sol.converged)


def test_flexible_cg_memory():
    """FCG(m): with a fixed SPD preconditioner it takes PCG's iterations; with a
    nonlinear one and full memory (every direction A-orthogonal to all previous
    ones) it terminates within n steps like a direct method, while short memory
    does not."""
    a, b = spd_system(n=24, seed=3)
    d = jnp.diag(a)

    def solve(m, memory, flexible=True):
        f = jax.jit(
            lambda b: solvers.cg(
                a,
                b,
                preconditioner=m,
                rtol=1e-10,
                max_steps=400,
                flexible=flexible,
                memory=memory,
            )
        )
        return f(b)

    jacobi = lambda r: r / d  # noqa: E731
    plain = solve(jacobi, 1, flexible=False)
    for memory in (1, 3):
        assert abs(int(solve(jacobi, memory).n_steps) - int(plain.n_steps)) <= 1

    def nonlinear_jacobi(d):  # positively homogeneous, r^T M(r) > 0, not linear
        def apply(r):
            s = jnp.linalg.norm(r)
            return r / d * (1.0 + 0.9 * jnp.tanh(4.0 * r / s))

        return apply

    nonlinear = nonlinear_jacobi(d)

    full = solve(nonlinear, 24)
    np.testing.assert_allclose(full.x, np.linalg.solve(a, b), rtol=1e-8)
    assert int(full.n_steps) <= 24 + 2
    assert int(solve(nonlinear, 1).n_steps) > int(full.n_steps)
    # derivatives (float64, both modes, order 2) and vmap of the flexible solve
    a8, b8 = spd_system(n=8, seed=5)

    def flex(a, b):
        return solvers.cg(
            0.5 * (a + a.T),
            b,
            rtol=1e-13,
            flexible=True,
            memory=3,
            preconditioner=nonlinear_jacobi(jnp.diag(a)),
        ).x

    check_grads(jax.jit(flex), (a8, b8), order=2, modes=("fwd", "rev"))
    bs = jnp.stack([b8, 2 * b8 + 1, -b8])
    f = jax.jit(lambda b: flex(a8, b))
    looped = jnp.stack([f(x) for x in bs])
    np.testing.assert_allclose(jax.jit(jax.vmap(f))(bs), looped, rtol=1e-10)
    with pytest.raises(ValueError, match="memory"):
        solvers.cg(a, b, flexible=True, memory=0)


def test_preconditioner_reduces_iterations():
    n = 200
    diag = np.geomspace(1.0, 1e4, n)
    a = jnp.asarray(np.diag(diag) + 0.1 * np.eye(n, k=1) + 0.1 * np.eye(n, k=-1))
    b = jnp.ones(n)
    plain = solvers.cg(a, b, rtol=1e-8)
    jacobi = solvers.cg(a, b, rtol=1e-8, preconditioner=jnp.diag(1.0 / jnp.diag(a)))
    assert int(jacobi.n_steps) < int(plain.n_steps) / 5


def test_check_grads_both_modes():
    a, b = spd_system(8)

    def solve(a, b):
        return solvers.cg(0.5 * (a + a.T), b, rtol=1e-13).x

    check_grads(jax.jit(solve), (a, b), order=2, modes=("fwd", "rev"))


def test_unrolled_matches_implicit():
    a, b = spd_system(20)
    g_imp = jax.grad(lambda b: jnp.sum(solvers.cg(a, b, rtol=1e-13).x ** 2))(b)
    g_unr = jax.grad(
        lambda b: jnp.sum(
            solvers.cg(a, b, rtol=1e-13, differentiation="unroll", max_steps=100).x ** 2
        )
    )(b)
    np.testing.assert_allclose(g_unr, g_imp, rtol=1e-8)


def test_vmap_per_system_counts_and_no_retrace():
    a, b = spd_system(20)
    bs = jnp.stack([b, jnp.ones_like(b), jnp.zeros_like(b).at[0].set(1.0)])
    batched = jax.vmap(lambda b: solvers.cg(a, b, rtol=1e-10))(bs)
    for i in range(3):
        single = solvers.cg(a, bs[i], rtol=1e-10)
        assert int(batched.n_steps[i]) == int(single.n_steps)
        np.testing.assert_allclose(batched.x[i], single.x, rtol=1e-10)
    solve = jax.jit(
        eqx.debug.assert_max_traces(lambda b: solvers.cg(a, b).x, max_traces=1)
    )
    solve(b)
    solve(2 * b)


def test_float32_keeps_dtype():
    a, b = spd_system(20, dtype=np.float32)
    sol = solvers.cg(a, b, rtol=1e-5)
    assert sol.x.dtype == jnp.float32 and sol.residual_norms.dtype == jnp.float32
    assert np.linalg.norm(
        np.asarray(a, np.float64) @ np.asarray(sol.x, np.float64)
        - np.asarray(b, np.float64)
    ) <= 2e-5 * np.linalg.norm(b)


def test_bad_input():
    a, b = spd_system(10)
    with pytest.raises(ValueError, match="shape"):
        solvers.cg(a, b[:5])
    with pytest.raises(ValueError, match="shape"):
        solvers.cg(jnp.ones((3, 4)), jnp.ones(3))
    with pytest.raises(ValueError, match="square"):
        solvers.cg(a, b, preconditioner=jnp.ones((10, 3)))
    with pytest.raises(ValueError, match="vector"):
        solvers.cg(a, jnp.ones((10, 2)))
    with pytest.raises(TypeError, match="floating"):
        solvers.cg(a, jnp.ones(10, jnp.int32))
    codes = {
        "indefinite": (solvers.cg(-a, b, throw=False), solvers.RESULTS.not_spd),
        "nan": (
            solvers.cg(a, b.at[0].set(jnp.nan), throw=False),
            solvers.RESULTS.nonfinite_input,
        ),
        "max_steps": (
            solvers.cg(a, b, max_steps=2, throw=False),
            solvers.RESULTS.max_steps_reached,
        ),
    }
    for sol, code in codes.values():
        assert sol.result == code and not bool(sol.converged)
    with pytest.raises(Exception, match="positive definite"):
        jax.block_until_ready(jax.jit(lambda a: solvers.cg(-a, b).x)(a))


def test_same_stopping_rule_and_iterations_as_scipy():
    spla = pytest.importorskip("scipy.sparse.linalg")
    for op in (
        solvers.problems.poisson_2d(16),
        solvers.problems.diffusion_3d(jax.random.key(0), 8, variance=1.5),
    ):
        b = np.ones(op.diagonal().size)
        its = [0]

        def count(_):
            its[0] += 1

        x, _ = spla.cg(op.to_scipy(), b, rtol=1e-8, atol=0.0, callback=count)
        sol = solvers.cg(op, jnp.asarray(b), rtol=1e-8)
        assert abs(int(sol.n_steps) - its[0]) <= 2, (int(sol.n_steps), its[0])
        np.testing.assert_allclose(sol.x, x, rtol=1e-6)


def test_diffusion_problems():
    op = solvers.problems.diffusion_2d(jax.random.key(1), 10, variance=1.0)
    dense = np.asarray(op.to_dense())
    np.testing.assert_allclose(dense, op.to_scipy().toarray(), atol=1e-14)
    np.testing.assert_allclose(dense, dense.T, atol=1e-14)
    assert np.linalg.eigvalsh(dense).min() > 0
    np.testing.assert_allclose(op.diagonal(), np.diag(dense))
    again = solvers.problems.diffusion_2d(jax.random.key(1), 10, variance=1.0)
    np.testing.assert_array_equal(op.kx, again.kx)  # seeded

    def contrast(v):
        o = solvers.problems.diffusion_2d(jax.random.key(1), 32, variance=v)
        return float(o.kx.max() / o.kx.min())

    assert contrast(0.0) == pytest.approx(1.0) and contrast(2.0) > contrast(0.5) > 1
    poisson = np.asarray(solvers.problems.poisson_2d(4).to_dense())
    lap1d = 2 * np.eye(4) - np.eye(4, k=1) - np.eye(4, k=-1)
    np.testing.assert_allclose(
        poisson, np.kron(lap1d, np.eye(4)) + np.kron(np.eye(4), lap1d)
    )
    sol = solvers.cg(op, jnp.ones(100), preconditioner=solvers.Jacobi(op), rtol=1e-10)
    np.testing.assert_allclose(sol.x, np.linalg.solve(dense, np.ones(100)), rtol=1e-8)
    keys = jax.random.split(jax.random.key(2), 3)
    batched = jax.jit(jax.vmap(lambda k: solvers.problems.diffusion_2d(k, 8).kx))(keys)
    for i in range(3):
        np.testing.assert_allclose(
            batched[i], solvers.problems.diffusion_2d(keys[i], 8).kx, rtol=1e-12
        )
    with pytest.raises(ValueError, match="kx"):
        solvers.problems.Diffusion2D(jnp.ones((3, 3)), jnp.ones((3, 4)))
    with pytest.raises(ValueError, match="variance"):
        solvers.problems.diffusion_2d(jax.random.key(0), 8, variance=-1.0)


def test_preconditioner_parameters_are_constants_for_implicit_derivatives():
    # x = A^{-1} b does not depend on the preconditioner: with the implicit rule its
    # parameters get an exact zero derivative (both modes), including parameters
    # that only a callable closes over; unrolled, the derivative is rounding noise.
    a, b = spd_system(n=10, seed=4)

    def solve(w, mode="implicit", flexible=False):
        return solvers.cg(
            a,
            b,
            preconditioner=lambda r: r * w,
            rtol=1e-12,
            differentiation=mode,
            flexible=flexible,
        ).x

    w = jnp.ones(10)
    for flexible in (False, True):
        f = jax.jit(lambda w, flexible=flexible: jnp.sum(solve(w, flexible=flexible)))
        assert float(jnp.abs(jax.grad(f)(w)).max()) == 0.0
        _, tangent = jax.jvp(f, (w,), (jnp.ones(10),))
        assert float(tangent) == 0.0
    unrolled = jax.grad(lambda w: jnp.sum(solve(w, "unroll", True)))(w)
    assert float(jnp.abs(unrolled).max()) < 1e-9
    # a preconditioner built from the differentiated operator: the derivative is the
    # operator's alone (as without preconditioner)
    op = solvers.problems.diffusion_2d(jax.random.key(0), 8, variance=1.0)

    def loss(kx, precondition):
        o = solvers.problems.Diffusion2D(kx, op.ky)
        m = solvers.IncompleteCholesky(o.to_sparse()) if precondition else None
        return jnp.sum(solvers.cg(o, jnp.ones(64), preconditioner=m, rtol=1e-12).x ** 2)

    g = jax.jit(jax.grad(loss), static_argnums=1)
    np.testing.assert_allclose(g(op.kx, True), g(op.kx, False), rtol=1e-8, atol=1e-12)


def test_fixed_step_convention_of_lineax():
    """lineax's `CG(rtol=0, atol=0, max_steps=k)` runs k steps and returns the
    iterate; `solvers.cg` does the same (lineax's own case: a fixed-cost
    approximate solve), and reports breakdown and missing max_steps."""
    a, b = spd_system(n=40)
    for k in (1, 5, 12):
        ours = solvers.cg(a, b, rtol=0, atol=0, max_steps=k)
        op = lx.MatrixLinearOperator(a, lx.positive_semidefinite_tag)
        theirs = lx.linear_solve(op, b, lx.CG(rtol=0, atol=0, max_steps=k))
        assert int(ours.n_steps) == k and bool(ours.converged)
        assert ours.result == solvers.RESULTS.successful
        np.testing.assert_allclose(ours.x, theirs.value, rtol=1e-10, atol=1e-12)
        # with a preconditioner: k steps of PCG
        jac = jnp.diag(1 / jnp.diag(a))
        pre = solvers.cg(a, b, rtol=0, atol=0, max_steps=k, preconditioner=jac)
        theirs = lx.linear_solve(
            op,
            b,
            lx.CG(rtol=0, atol=0, max_steps=k),
            options={
                "preconditioner": lx.MatrixLinearOperator(
                    jac, lx.positive_semidefinite_tag
                )
            },
        )
        np.testing.assert_allclose(pre.x, theirs.value, rtol=1e-10, atol=1e-12)
    # the fixed-step solve is differentiable (tangents by k-step solves, as lineax)
    fixed = lambda b: solvers.cg(a, b, rtol=0, atol=0, max_steps=60).x  # noqa: E731
    check_grads(fixed, (b,), order=1, modes=("fwd", "rev"))
    np.testing.assert_allclose(jax.jit(fixed)(b), fixed(b))
    x32 = solvers.cg(
        a.astype(jnp.float32), b.astype(jnp.float32), rtol=0, atol=0, max_steps=5
    ).x
    assert x32.dtype == jnp.float32
    # an exactly solved 1x1 system stops early and is successful
    one = solvers.cg(jnp.eye(1) * 2.0, jnp.ones(1), rtol=0, atol=0, max_steps=4)
    assert int(one.n_steps) == 1 and bool(one.converged)
    with pytest.raises(ValueError, match="max_steps"):
        solvers.cg(a, b, rtol=0, atol=0)
    # breakdown is still reported: an indefinite operator
    indefinite = a - 2 * jnp.linalg.eigvalsh(a)[-1] * jnp.eye(40)
    bad = solvers.cg(indefinite, b, rtol=0, atol=0, max_steps=10, throw=False)
    assert bad.result == solvers.RESULTS.not_spd


def _diffusion_f32(n=64):
    """A float32 system whose recursive residual drifts below the true one: a 64^2
    diffusion field of variance 1.5 (coefficient contrast ~1e3), b = 1, Jacobi."""
    op = solvers.problems.diffusion_2d(
        jax.random.key(0), n, variance=1.5, dtype=jnp.float32
    )
    d = op.diagonal()
    return op, jnp.ones(n * n, jnp.float32), lambda r: r / d


def _true_residual(op, b, x):
    """||b - A x|| / ||b|| in float64 (x as returned)."""
    op64 = jax.tree_util.tree_map(
        lambda a: a.astype(jnp.float64) if eqx.is_inexact_array(a) else a, op
    )
    b64 = b.astype(jnp.float64)
    return float(
        jnp.linalg.norm(b64 - op64.mv(x.astype(jnp.float64))) / (jnp.linalg.norm(b64))
    )


def test_convergence_is_judged_on_the_true_residual():
    """float32: the recursively updated residual reaches rtol while b - Ax does not.
    Without the check (the iteration alone, as jax.scipy's CG) the default rtol
    3.5e-4 is reported met at a true residual of 2.4e-3; with it the residual is
    replaced and CG goes on until the true residual meets rtol."""
    from jaxdecomp._cg_loop import scaled_cg_loop

    op, b, jacobi = _diffusion_f32()
    rtol = float(np.finfo(np.float32).eps) ** 0.5
    x, (k, _, converged, _, _), _ = scaled_cg_loop(
        op.mv, jacobi, b, jnp.zeros_like(b), rtol=rtol, atol=0.0,
        max_steps=40960, flexible=False, unroll=False, verify=False,
    )  # fmt: skip
    assert bool(converged) and _true_residual(op, b, x) > 5 * rtol  # the defect
    for flexible in (False, True):
        sol = solvers.cg(op, b, preconditioner=jacobi, flexible=flexible)
        assert sol.result == solvers.RESULTS.successful and bool(sol.converged)
        true = _true_residual(op, b, sol.x)
        # the last entry is the checked true residual (1% for evaluating it in
        # float32 and rounding x)
        last = float(sol.residual_norms[sol.n_steps]) / float(jnp.linalg.norm(b))
        assert last <= rtol and abs(true - last) <= 0.01 * last, (true, last)
        assert int(sol.n_steps) <= 1.2 * int(k)  # the replacement costs few steps
        assert np.isnan(np.asarray(sol.residual_norms[sol.n_steps + 1 :])).all()


def test_unattainable_tolerance_is_inaccurate():
    op, b, jacobi = _diffusion_f32()
    sol = solvers.cg(op, b, preconditioner=jacobi, rtol=1e-5, throw=False)
    assert sol.result == solvers.RESULTS.inaccurate and not bool(sol.converged)
    true = _true_residual(op, b, sol.x)
    last = float(sol.residual_norms[sol.n_steps]) / float(jnp.linalg.norm(b))
    assert true > 1e-5 and abs(true - last) <= 0.01 * true
    with pytest.raises(Exception, match="true residual"):
        jax.block_until_ready(solvers.cg(op, b, preconditioner=jacobi, rtol=1e-5).x)
    # float64 at kappa 1e6: the floor is ~1e-11 (attained: 1e-10 converges)
    a, _ = spd_system(24)
    w, v = np.linalg.eigh(np.asarray(a))
    a = jnp.asarray(v @ np.diag(np.geomspace(1e-6, 1.0, 24)) @ v.T)
    b64 = jnp.ones(24)
    bad = solvers.cg(a, b64, rtol=1e-14, throw=False)
    good = solvers.cg(a, b64, rtol=1e-10, throw=False)
    assert bad.result == solvers.RESULTS.inaccurate
    assert good.result == solvers.RESULTS.successful
    ref = np.linalg.solve(np.asarray(a), np.ones(24))
    assert np.linalg.norm(np.asarray(good.x) - ref) <= 1e-4 * np.linalg.norm(ref)
    # vmap agrees with a loop, code by code, and jit does not retrace
    bs = jnp.stack([b, jax.random.normal(jax.random.key(1), b.shape, jnp.float32)])

    def solve(b):
        return solvers.cg(op, b, preconditioner=jacobi, rtol=3e-5, throw=False)

    batched = jax.vmap(solve)(bs)
    single = jax.jit(eqx.debug.assert_max_traces(solve, max_traces=1))
    for i in range(2):
        one = single(bs[i])
        assert int(batched.result._value[i]) == int(one.result._value)
        # float32 batched products round differently from single ones, and near the
        # dtype's level a check can pass one step later (measured: 246 vs 245);
        # exact equality of the counts is tested in float64
        # (test_vmap_per_system_counts_and_no_retrace). An `inaccurate` system goes
        # through several replace-and-restart rounds, each restarting from an
        # iterate that differs in rounding: its count differs more (measured: 281
        # vs 290), so only its outcome is compared
        if one.result == solvers.RESULTS.successful:
            assert abs(int(batched.n_steps[i]) - int(one.n_steps)) <= 2
        # and both meet (or both miss) the tolerance in their checked residual
        bnorm = float(jnp.linalg.norm(bs[i]))
        ok = one.result == solvers.RESULTS.successful
        for norms, k in (
            (batched.residual_norms[i], batched.n_steps[i]),
            (one.residual_norms, one.n_steps),
        ):
            assert (float(norms[k]) <= 3e-5 * bnorm) == ok
    assert {int(batched.result._value[i]) for i in range(2)} == {
        int(solvers.RESULTS.successful._value),
        int(solvers.RESULTS.inaccurate._value),
    }


@pytest.mark.parametrize("mode", ["fwd", "rev"])
def test_derivative_solves_check_the_true_residual(mode):
    """A tangent (or cotangent) whose solve cannot reach rtol in the true residual is
    an error (NaN with throw=False), not a derivative from a drifted residual."""
    op, ones, jacobi = _diffusion_f32()
    b = jax.random.normal(jax.random.key(1), ones.shape, jnp.float32)

    def f(b, throw=True):
        return solvers.cg(op, b, preconditioner=jacobi, rtol=3e-5, throw=throw).x

    assert solvers.cg(op, b, preconditioner=jacobi, rtol=3e-5).converged
    for throw in (True, False):
        if mode == "fwd":
            run = lambda: jax.jvp(lambda b: f(b, throw), (b,), (ones,))[1]  # noqa: E731
        else:
            run = lambda: jax.vjp(lambda b: f(b, throw), b)[1](ones)[0]  # noqa: E731
        if throw:
            with pytest.raises(Exception, match="derivative solve"):
                jax.block_until_ready(run())
        else:
            assert np.isnan(np.asarray(run())).all()
