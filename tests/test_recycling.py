"""Tests for deflated CG (`solvers.cg(..., deflation=W)`), its harmonic Ritz vectors
and `solvers.solve_sequence` (Krylov subspace recycling across related systems)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import solvers
from solvers._sequence import greedy_order

RUNTIME_ERRORS = (eqx.EquinoxRuntimeError, jax.errors.JaxRuntimeError)


def spectrum_system(n=60, n_small=4, seed=0, dtype=np.float64, small=(1e-5, 1e-3)):
    """SPD with `n_small` isolated tiny eigenvalues (the slow modes) and the rest in
    [1, 10]; returns the matrix, its slow eigenvectors and a right-hand side."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    lam = np.concatenate(
        [np.geomspace(*small, n_small), np.linspace(1, 10, n - n_small)]
    )
    a = (q * lam) @ q.T
    a = (a + a.T) / 2
    return (
        jnp.asarray(a, dtype),
        jnp.asarray(q[:, :n_small], dtype),
        jnp.asarray(rng.normal(size=n), dtype),
    )


def test_deflation_removes_slow_modes():
    a, w, b = spectrum_system()
    plain = solvers.cg(a, b, rtol=1e-10)
    defl = solvers.cg(a, b, rtol=1e-10, deflation=w)
    exact = np.linalg.solve(np.asarray(a), np.asarray(b))
    np.testing.assert_allclose(defl.x, exact, rtol=1e-8)
    np.testing.assert_allclose(plain.x, exact, rtol=1e-8)
    # deflated: the spectrum left is [1, 10] (kappa 10); measured 32 vs 73 steps
    assert int(defl.n_steps) <= 40 and int(plain.n_steps) >= 60
    # any basis of the same span does the same (it is A-orthonormalised inside)
    mixed = w @ jnp.asarray(np.random.default_rng(1).normal(size=(4, 4)))
    again = solvers.cg(a, b, rtol=1e-10, deflation=mixed)
    assert abs(int(again.n_steps) - int(defl.n_steps)) <= 1
    np.testing.assert_allclose(again.x, exact, rtol=1e-8)


_SLOW = pytest.mark.slow  # default-suite time: one fixed and one flexible case run


def test_float64_coarse_correction_every_fourth_step(monkeypatch):
    """In float64 the residual's coarse correction runs every 4th step (its rounding
    drift is 1e-16 per step): a long deflated solve then needs the same steps as
    with the correction every step and meets a tolerance near float64's level on
    the true residual."""
    import jaxdecomp._cg_loop as cg_loop_module

    op = solvers.problems.diffusion_2d(jax.random.key(0), 32, variance=2.0)
    pre = solvers.Jacobi(op)
    basis = solvers.cg(op, jnp.ones(1024), preconditioner=pre, recycle=8).ritz_vectors
    b = jax.random.normal(jax.random.key(1), (1024,))

    def solve():  # a fresh trace: the interval is read at trace time
        return jax.jit(
            lambda b, w: solvers.cg(
                op, b, preconditioner=pre, deflation=w, rtol=1e-13, max_steps=2000
            )
        )(b, basis)

    every_fourth = solve()
    monkeypatch.setattr(cg_loop_module, "_CLEAN_EVERY_F64", 1)
    every_step = solve()
    assert every_fourth.converged and every_step.converged
    assert abs(int(every_fourth.n_steps) - int(every_step.n_steps)) <= 2
    r = b - op.mv(every_fourth.x)
    assert jnp.linalg.norm(r) <= 1e-13 * jnp.linalg.norm(b)
    np.testing.assert_allclose(every_fourth.x, every_step.x, rtol=0, atol=1e-11)


@pytest.mark.parametrize(
    "precond, flexible",
    [
        ("jacobi", False),
        ("nonlinear", True),
        pytest.param("none", False, marks=_SLOW),
        pytest.param("ic0", False, marks=_SLOW),
        pytest.param("multigrid", False, marks=_SLOW),
        pytest.param("none", True, marks=_SLOW),
        pytest.param("jacobi", True, marks=_SLOW),
        pytest.param("ic0", True, marks=_SLOW),
        pytest.param("multigrid", True, marks=_SLOW),
    ],
)
def test_deflation_with_every_preconditioner(precond, flexible):
    op = solvers.problems.diffusion_2d(jax.random.key(0), 16, variance=2.0)
    b = jax.random.normal(jax.random.key(1), (256,))
    pre = {
        "none": None,
        "jacobi": solvers.Jacobi(op),
        "ic0": solvers.IncompleteCholesky(op.to_sparse()),
        "multigrid": solvers.Multigrid(op),
        "nonlinear": lambda r: r / op.diagonal() * (1 + 0.1 * jnp.tanh(r)),
    }[precond]
    first = solvers.cg(
        op, b, preconditioner=pre, rtol=1e-10, flexible=flexible, recycle=6
    )
    assert first.ritz_vectors.shape == (256, 6)
    b2 = jax.random.normal(jax.random.key(2), (256,))
    sol = solvers.cg(
        op,
        b2,
        preconditioner=pre,
        rtol=1e-10,
        flexible=flexible,
        deflation=first.ritz_vectors,
    )
    exact = np.linalg.solve(np.asarray(op.to_dense()), np.asarray(b2))
    np.testing.assert_allclose(sol.x, exact, rtol=1e-8, atol=1e-10)
    ref = solvers.cg(op, b2, preconditioner=pre, rtol=1e-10, flexible=flexible)
    assert int(sol.n_steps) <= int(ref.n_steps)


def test_harmonic_ritz_values_are_the_small_eigenvalues():
    """With the whole Krylov space recorded (window >= steps), the harmonic Ritz pairs
    are exact eigenpairs of M^{-1} A: the smallest ones."""
    a, _, b = spectrum_system(n=24, n_small=3)
    d = jnp.diag(a)
    # kappa = 1e6: the true residual stops near 1e-11 in float64, so 1e-10 (36
    # steps, past the 24 recorded) rather than an unattainable 1e-14 (`inaccurate`)
    sol = solvers.cg(
        a, b, preconditioner=lambda r: r / d, rtol=1e-10, recycle=3, window=24
    )
    s = 1 / np.sqrt(np.asarray(d))
    lam = np.linalg.eigvalsh(s[:, None] * np.asarray(a) * s[None, :])
    np.testing.assert_allclose(sol.ritz_values, lam[:3], rtol=1e-6)
    v = np.asarray(sol.ritz_vectors)
    resid = (np.asarray(a) @ v) / np.asarray(d)[:, None] - v * np.asarray(
        sol.ritz_values
    )
    assert (
        np.linalg.norm(resid, axis=0).max() <= 1e-6 * np.asarray(sol.ritz_values).max()
    )
    np.testing.assert_allclose(np.linalg.norm(v, axis=0), 1.0, rtol=1e-12)


def test_ritz_vectors_fewer_directions_than_asked():
    # a 3 x 3 system converges in <= 3 steps: 3 directions for 5 vectors
    a = jnp.diag(jnp.array([1.0, 2.0, 3.0]))
    sol = solvers.cg(a, jnp.ones(3), recycle=5, window=8)
    v, vals = np.asarray(sol.ritz_vectors), np.asarray(sol.ritz_values)
    assert np.isfinite(v).all() and np.isinf(vals[3:]).all() and (v[:, 3:] == 0).all()
    np.testing.assert_allclose(np.sort(vals[:3]), [1.0, 2.0, 3.0], rtol=1e-10)
    # and they deflate the next solve cleanly (zero columns are ignored)
    nxt = solvers.cg(a, jnp.array([1.0, -1.0, 2.0]), deflation=sol.ritz_vectors[:, :3])
    np.testing.assert_allclose(nxt.x, [1.0, -0.5, 2 / 3], rtol=1e-12)
    assert int(nxt.n_steps) <= 1


def test_deflated_derivatives_both_modes():
    a, w, b = spectrum_system(n=12, n_small=2, small=(1e-2, 1e-1))

    def f(a, b):
        a = (a + a.T) / 2
        return solvers.cg(a, b, rtol=1e-13, deflation=w).x

    check_grads(
        f, (a, b), order=1, modes=("fwd", "rev"), atol=1e-5, rtol=1e-5, eps=1e-6
    )
    # the same derivative as the undeflated solve (W only changes the solver).
    # Second order: test_deflated_second_derivatives (slow: default-suite time)
    g1 = jax.grad(lambda a: f(a, b).sum())(a)
    g0 = jax.grad(lambda a: solvers.cg((a + a.T) / 2, b, rtol=1e-13).x.sum())(a)
    np.testing.assert_allclose(g1, g0, rtol=1e-8, atol=1e-10)


@pytest.mark.slow
def test_deflated_second_derivatives():
    a, w, b = spectrum_system(n=12, n_small=2, small=(1e-2, 1e-1))

    def f(a, b):
        return solvers.cg((a + a.T) / 2, b, rtol=1e-13, deflation=w).x

    check_grads(
        f, (a, b), order=2, modes=("fwd", "rev"), atol=1e-5, rtol=1e-5, eps=1e-6
    )


def test_deflated_unroll_matches_implicit_gradient():
    a, w, b = spectrum_system(n=12, n_small=2, small=(1e-2, 1e-1))
    grads = [
        jax.grad(
            lambda b: solvers.cg(a, b, rtol=1e-13, deflation=w, differentiation=d).x @ b
        )(b)
        for d in ("implicit", "unroll")
    ]
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-7)


def test_deflation_jit_vmap_dtype():
    a, w, b = spectrum_system(n=20, n_small=2, small=(1e-2, 1e-1))
    traces = []

    @jax.jit
    def f(a, b, w):
        traces.append(1)
        return solvers.cg(a, b, rtol=1e-10, deflation=w)

    f(a, b, w)
    f(a * 2, b + 1, w * 3)
    assert len(traces) == 1
    bs = jax.random.normal(jax.random.key(0), (3, 20))
    batched = jax.vmap(lambda b: f(a, b, w))(bs)
    for i in range(3):
        one = f(a, bs[i], w)
        np.testing.assert_allclose(batched.x[i], one.x, rtol=1e-12)
        # the same vectors up to sign (eigenvectors)
        dots = np.sum(
            np.asarray(batched.ritz_vectors[i]) * np.asarray(one.ritz_vectors), 0
        )
        np.testing.assert_allclose(np.abs(dots), 1.0, rtol=1e-8)
    a32, w32, b32 = (x.astype(np.float32) for x in (a, w, b))
    sol = solvers.cg(a32, b32, deflation=w32, rtol=1e-5)
    assert sol.x.dtype == sol.ritz_vectors.dtype == sol.ritz_values.dtype == np.float32
    exact = np.linalg.solve(np.asarray(a), np.asarray(b))
    assert np.linalg.norm(
        np.asarray(sol.x, np.float64) - exact
    ) <= 1e-3 * np.linalg.norm(exact)


def test_deflation_bad_input():
    a, w, b = spectrum_system(n=10, n_small=2)
    for bad in (w[:5], w[:, 0], jnp.zeros((10, 0))):
        with pytest.raises(ValueError, match="cg: deflation"):
            solvers.cg(a, b, deflation=bad)
    with pytest.raises(TypeError, match="cg: deflation"):
        solvers.cg(a, b, deflation=w.astype(np.float32))
    with pytest.raises(ValueError, match="cg: recycle"):
        solvers.cg(a, b, recycle=-1)
    with pytest.raises(ValueError, match="cg: window"):
        solvers.cg(a, b, recycle=2, window=0)
    exact = np.linalg.solve(np.asarray(a), np.asarray(b))
    bad_bases = {
        "duplicate_column": jnp.concatenate([w, w[:, :1]], axis=1),
        "zero_column": w.at[:, 1].set(0),
        "nan": w.at[0, 0].set(jnp.nan),
        "inf": w.at[3, 1].set(jnp.inf),
    }
    for name, bad in bad_bases.items():
        sol = solvers.cg(a, b, deflation=bad, throw=False)
        assert sol.result == solvers.RESULTS.invalid_deflation, name
        assert not bool(sol.converged), name
        # the iterate is still a plain CG solve (the basis was ignored), never NaN
        np.testing.assert_allclose(sol.x, exact, rtol=1e-6)
        with pytest.raises(RUNTIME_ERRORS, match="deflation basis"):
            jax.block_until_ready(solvers.cg(a, b, deflation=bad).x)


# --------------------------------------------------------------------------------------
# solve_sequence
# --------------------------------------------------------------------------------------


def _heat(n=16, steps=6, seed=0):
    base = solvers.problems.diffusion_2d(jax.random.key(seed), n, variance=1.0)
    return solvers.problems.heat_steps(base, jnp.geomspace(1e-2, 1e-1, steps))


def test_sequence_time_stepping_matches_a_loop():
    ops = _heat()
    u0 = jax.random.normal(jax.random.key(3), (256,))
    seq = solvers.solve_sequence(
        ops,
        lambda i, u: ops.shift[i] * u,
        initial=u0,
        recycle=4,
        preconditioner=solvers.Jacobi,
        rtol=1e-11,
    )
    u = np.asarray(u0)
    for i in range(6):
        op = jax.tree_util.tree_map(lambda x: x[i], ops)
        u = np.linalg.solve(np.asarray(op.to_dense()), float(op.shift) * u)
        np.testing.assert_allclose(seq.x[i], u, rtol=1e-8)
    assert seq.n_steps.shape == (6,) and bool(jnp.all(seq.converged))
    assert bool(jnp.all(seq.result == solvers.RESULTS.successful))
    assert seq.ritz_vectors.shape == (256, 4)
    np.testing.assert_array_equal(seq.order, np.arange(6))


def test_recycling_cuts_iterations_on_a_sequence():
    base = solvers.problems.diffusion_2d(jax.random.key(0), 32, variance=2.0)
    ops = solvers.problems.heat_steps(base, jnp.full(12, 1e-1))
    u0 = jax.random.normal(jax.random.key(3), (1024,))
    run = lambda k: solvers.solve_sequence(  # noqa: E731
        ops,
        lambda i, u: ops.shift[i] * u,
        initial=u0,
        recycle=k,
        preconditioner=solvers.Jacobi,
        rtol=1e-8,
    )
    plain, recycled = run(0), run(16)
    diff = np.linalg.norm(np.asarray(recycled.x - plain.x), axis=1)
    assert (diff <= 1e-6 * np.linalg.norm(np.asarray(plain.x), axis=1)).all()
    # measured: 948 vs 1743 total steps (the last systems: 53 vs 143)
    assert int(recycled.total_steps) < 0.6 * int(plain.total_steps)
    assert plain.ritz_vectors is None


def test_greedy_order():
    t = np.array([0.0, 0.9, 0.2, 0.5, 0.1, 0.7, 0.3])
    perm = greedy_order(jnp.asarray(t)[:, None])
    np.testing.assert_array_equal(perm, np.argsort(t))
    # ordered sequence: same solutions in input order
    keys = jax.random.split(jax.random.key(1), 5)
    ops = jax.vmap(lambda k: solvers.problems.diffusion_2d(k, 8))(keys)
    bs = jax.random.normal(jax.random.key(2), (5, 64))
    seq = solvers.solve_sequence(ops, bs, recycle=3, order="greedy", rtol=1e-11)
    assert sorted(np.asarray(seq.order).tolist()) == list(range(5))
    assert int(seq.order[0]) == 0
    for i in range(5):
        op = jax.tree_util.tree_map(lambda x: x[i], ops)
        exact = np.linalg.solve(np.asarray(op.to_dense()), np.asarray(bs[i]))
        np.testing.assert_allclose(seq.x[i], exact, rtol=1e-8)
    given = solvers.solve_sequence(
        ops, bs, order=jnp.array([4, 2, 0, 1, 3]), rtol=1e-11
    )
    np.testing.assert_array_equal(given.order, [4, 2, 0, 1, 3])
    np.testing.assert_allclose(given.x, seq.x, rtol=1e-8)


def test_sequence_derivatives_both_modes():
    ops = _heat(n=4, steps=3)
    u0 = jnp.linspace(-1.0, 1.0, 16)

    def f(kx, u0):
        o = eqx.tree_at(lambda o: o.kx, ops, kx)
        return solvers.solve_sequence(
            o, lambda i, u: o.shift[i] * u, initial=u0, recycle=2, rtol=1e-13
        ).x

    check_grads(f, (ops.kx, u0), order=1, modes=("fwd", "rev"), atol=1e-6, rtol=1e-6)


@pytest.mark.slow
def test_sequence_second_derivatives():
    ops = _heat(n=4, steps=3)
    bs = jax.random.normal(jax.random.key(0), (3, 16))

    def g(bs):
        return solvers.solve_sequence(ops, bs, recycle=2, order="greedy", rtol=1e-13).x

    check_grads(g, (bs,), order=2, modes=("fwd",), atol=1e-6, rtol=1e-6)
    # independent right-hand sides, a greedy order, callable operators

    def g2(bs):
        return solvers.solve_sequence(
            lambda i: jax.tree_util.tree_map(lambda x: x[i], ops),
            bs,
            recycle=2,
            order="greedy",
            features=jnp.arange(3.0)[:, None],
            rtol=1e-13,
        ).x

    check_grads(g2, (bs,), order=1, modes=("fwd", "rev"), atol=1e-6, rtol=1e-6)
    # second order through reverse mode: forward over reverse (jax.hessian) agrees
    # with forward over forward. Reverse over reverse is not available: JAX cannot
    # transpose the while loop of a linear solve's derivative inside lax.scan (the
    # same holds for solvers.cg under a user's lax.scan), documented.
    s = lambda bs: jnp.sum(g(bs) ** 3)  # noqa: E731
    np.testing.assert_allclose(
        jax.hessian(s)(bs), jax.jacfwd(jax.jacfwd(s))(bs), rtol=1e-9, atol=1e-12
    )


def test_sequence_jit_no_retrace_and_float32():
    ops = _heat()
    bs = jax.random.normal(jax.random.key(0), (6, 256))
    traces = []

    @jax.jit
    def f(ops, bs):
        traces.append(1)
        return solvers.solve_sequence(ops, bs, recycle=3, preconditioner=solvers.Jacobi)

    f(ops, bs)
    f(jax.tree_util.tree_map(lambda x: x * 1.5, ops), bs * 2)
    assert len(traces) == 1
    ops32 = jax.tree_util.tree_map(lambda x: x.astype(np.float32), ops)
    seq = solvers.solve_sequence(ops32, bs.astype(np.float32), recycle=3)
    assert seq.x.dtype == seq.ritz_vectors.dtype == np.float32
    ref = solvers.solve_sequence(ops, bs, recycle=3, rtol=1e-11)
    assert (
        np.abs(np.asarray(seq.x) - np.asarray(ref.x)).max()
        <= 1e-3 * np.abs(np.asarray(ref.x)).max()
    )


def test_sequence_failures_are_per_system():
    rng = np.random.default_rng(0)
    mats = []
    for i in range(5):
        m = rng.normal(size=(12, 12))
        a = m @ m.T / 12 + np.eye(12)
        if i == 2:  # stops being SPD
            a = a - 3 * np.eye(12) * np.abs(np.linalg.eigvalsh(a)).max()
        mats.append(a)
    mats = jnp.asarray(np.stack(mats))
    bs = jnp.asarray(rng.normal(size=(5, 12)))
    seq = solvers.solve_sequence(mats, bs, recycle=3, throw=False, rtol=1e-11)
    ok = np.asarray(seq.result == solvers.RESULTS.successful)
    np.testing.assert_array_equal(ok, [True, True, False, True, True])
    third = jax.tree_util.tree_map(lambda c: c[2], seq.result)
    assert third == solvers.RESULTS.not_spd
    for i in (0, 1, 3, 4):
        exact = np.linalg.solve(np.asarray(mats[i]), np.asarray(bs[i]))
        np.testing.assert_allclose(seq.x[i], exact, rtol=1e-8)
    with pytest.raises(RUNTIME_ERRORS, match="not symmetric positive definite"):
        jax.block_until_ready(solvers.solve_sequence(mats, bs, recycle=3).x)


def test_sequence_bad_input():
    ops = _heat()
    bs = jnp.ones((6, 256))
    with pytest.raises(ValueError, match="solve_sequence: the number of systems"):
        solvers.solve_sequence(ops, bs[:5])
    with pytest.raises(ValueError, match="solve_sequence: rhs"):
        solvers.solve_sequence(ops, bs[0])
    with pytest.raises(TypeError, match="solve_sequence: rhs"):
        solvers.solve_sequence(ops, jnp.ones((6, 256), int))
    with pytest.raises(ValueError, match="solve_sequence: each operator"):
        solvers.solve_sequence(ops, bs.astype(np.float32))
    with pytest.raises(ValueError, match="solve_sequence: each operator"):
        solvers.solve_sequence(ops, jnp.ones((6, 100)))
    with pytest.raises(ValueError, match="same leading"):
        solvers.solve_sequence(eqx.tree_at(lambda o: o.kx, ops, ops.kx[:3]), bs)
    with pytest.raises(ValueError, match="solve_sequence: order"):
        solvers.solve_sequence(ops, bs, order=jnp.array([0, 1, 2, 3, 4, 4]))
    with pytest.raises(ValueError, match="solve_sequence: order"):
        solvers.solve_sequence(ops, lambda i, u: u, initial=bs[0], order="greedy")
    with pytest.raises(ValueError, match="solve_sequence: order"):
        solvers.solve_sequence(ops, bs, order="random")
    with pytest.raises(ValueError, match="length"):
        solvers.solve_sequence(lambda i: ops, lambda i, u: u, initial=bs[0])
    with pytest.raises(ValueError, match="solve_sequence: with a callable rhs"):
        solvers.solve_sequence(ops, lambda i, u: u)
    with pytest.raises(ValueError, match="solve_sequence: rhs"):
        solvers.solve_sequence(ops, lambda i, u: u[:3], initial=bs[0])
    with pytest.raises(ValueError, match="solve_sequence: deflation"):
        solvers.solve_sequence(ops, bs, recycle=2, deflation=jnp.ones((256, 3)))
    with pytest.raises(ValueError, match="solve_sequence: recycle"):
        solvers.solve_sequence(ops, bs, recycle=-2)
