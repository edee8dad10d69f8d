"""Tests for the fixed-pattern SparseMatrix, level-scheduled triangular solves, the
classic preconditioners and the learned ones (NeuralIC, train_preconditioner)."""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import optax
import pytest
import scipy.linalg as sla
import scipy.sparse as sp
from jax.test_util import check_grads

import solvers

SPD = frozenset({lx.symmetric_tag, lx.positive_semidefinite_tag})


def random_spd_sparse(n=30, density=0.15, seed=0):
    """A random sparse symmetric M-matrix (IC(0) exists) with an irregular pattern."""
    rng = np.random.default_rng(seed)
    m = sp.random(n, n, density=density, random_state=rng, format="coo")
    off = -abs(m + m.T)
    off.setdiag(0)
    off = sp.csr_matrix(off)
    off.eliminate_zeros()
    diag = -np.asarray(off.sum(axis=1)).ravel() + rng.uniform(0.1, 1.0, n)
    return sp.csr_matrix(off + sp.diags(diag))


def ic0_reference(a):
    """Dense textbook IC(0) (row-by-row, restricted to the pattern of a)."""
    a = np.array(a, np.float64)
    n = a.shape[0]
    mask = np.tril(a != 0)
    low = np.zeros_like(a)
    for j in range(n):
        low[j, j] = np.sqrt(a[j, j] - low[j, :j] @ low[j, :j])
        for i in range(j + 1, n):
            if mask[i, j]:
                low[i, j] = (a[i, j] - low[i, :j] @ low[j, :j]) / low[j, j]
    return low


# -- SparseMatrix and triangular solves -----------------------------------------------


def test_sparse_matrix_products_transpose_and_lineax():
    m = random_spd_sparse()
    a = solvers.SparseMatrix.from_scipy(m, tags=SPD)
    dense = m.toarray()
    np.testing.assert_allclose(a.as_matrix(), dense)
    np.testing.assert_allclose(a.transpose().as_matrix(), dense.T)
    x = jnp.asarray(np.random.default_rng(1).normal(size=m.shape[0]))
    np.testing.assert_allclose(a.mv(x), dense @ x, rtol=1e-12)
    b = a.mv(x)
    sol = lx.linear_solve(a, b, lx.CG(rtol=1e-12, atol=1e-12))
    np.testing.assert_allclose(sol.value, x, rtol=1e-8)
    # the same pattern from a dense matrix is equal (same compiled code)
    assert solvers.SparseMatrix.from_dense(dense).pattern == a.pattern
    assert hash(solvers.SparseMatrix.from_dense(dense).pattern) == hash(a.pattern)


@pytest.mark.parametrize("transpose", [False, True])
def test_solve_triangular_against_scipy(transpose):
    low = solvers.SparseMatrix.from_scipy(random_spd_sparse(40, 0.2, seed=3)).lower()
    b = jnp.asarray(np.random.default_rng(2).normal(size=40))
    x = low.solve_triangular(b, transpose=transpose)
    dense = np.asarray(low.as_matrix())
    ref = sla.solve_triangular(dense, b, lower=True, trans=1 if transpose else 0)
    np.testing.assert_allclose(x, ref, rtol=1e-11)
    # an upper-triangular matrix solves by its own (bottom-up) schedule
    up = low.transpose()
    np.testing.assert_allclose(
        up.solve_triangular(b),
        sla.solve_triangular(dense.T, b, lower=False),
        rtol=1e-11,
    )


def test_level_schedule_of_the_five_point_stencil():
    from solvers._sparse import _triangular_schedule

    n = 12
    low = solvers.problems.poisson_2d(n).to_sparse().lower()
    assert _triangular_schedule(low.pattern).schedule.n_levels == 2 * n - 1


def test_sparse_derivatives_vmap_and_jit():
    m = random_spd_sparse(12, 0.3, seed=5)
    a = solvers.SparseMatrix.from_scipy(m, tags=SPD)
    low = a.lower()
    b = jnp.linspace(1.0, 2.0, 12)

    def f(values, b):
        return low.with_values(values).solve_triangular(b, transpose=True)

    check_grads(jax.jit(f), (low.values, b), order=2, modes=("fwd", "rev"))

    # CG needs a symmetric operator (and checks it): symmetrise the values, as a
    # finite-difference perturbation of the stored entries need not be.
    pat = a.pattern
    where = {(int(i), int(j)): k for k, (i, j) in enumerate(zip(pat.rows, pat.cols))}
    mirror = np.array([where[(int(j), int(i))] for i, j in zip(pat.rows, pat.cols)])

    def solve(values, b):
        values = 0.5 * (values + values[mirror])
        return solvers.cg(a.with_values(values), b, rtol=1e-13).x

    check_grads(jax.jit(solve), (a.values, b), order=2, modes=("fwd", "rev"))

    # vmap over values agrees with a loop; new values do not retrace
    batch = jnp.stack([a.values, 2 * a.values, 0.5 * a.values])
    out = jax.vmap(lambda v: a.with_values(v).mv(b))(batch)
    for v, o in zip(batch, out):
        np.testing.assert_allclose(o, a.with_values(v).mv(b), rtol=1e-13)

    @jax.jit
    @eqx.debug.assert_max_traces(max_traces=1)
    def apply(mat, b):
        return mat.lower().solve_triangular(b)

    apply(a, b)
    apply(a.with_values(3 * a.values), b)


def test_sparse_bad_input():
    with pytest.raises(ValueError, match="duplicate"):
        solvers.SparsityPattern([0, 0], [1, 1], (2, 2))
    with pytest.raises(ValueError, match="outside"):
        solvers.SparsityPattern([0, 2], [1, 1], (2, 2))
    pattern = solvers.SparsityPattern([0, 1], [0, 1], (2, 2))
    with pytest.raises(ValueError, match="values must have shape"):
        solvers.SparseMatrix(jnp.ones(3), pattern)
    with pytest.raises(TypeError, match="floating"):
        solvers.SparseMatrix(jnp.ones(2, int), pattern)
    with pytest.raises(ValueError, match="expected a vector"):
        solvers.SparseMatrix(jnp.ones(2), pattern).mv(jnp.ones(3))
    full = solvers.SparseMatrix.from_dense(jnp.array([[2.0, 1.0], [1.0, 2.0]]))
    with pytest.raises(ValueError, match="not triangular"):
        full.solve_triangular(jnp.ones(2))
    no_diag = solvers.SparseMatrix.from_dense(jnp.array([[0.0, 0.0], [1.0, 2.0]]))
    with pytest.raises(ValueError, match="diagonal"):
        no_diag.solve_triangular(jnp.ones(2))


# -- classic preconditioners ----------------------------------------------------------


@pytest.mark.parametrize("kind", ["grid", "random"])
def test_incomplete_cholesky_matches_textbook(kind):
    if kind == "grid":
        op = solvers.problems.diffusion_2d(jax.random.key(0), 6, variance=2.0)
        a = op.to_sparse()
    else:
        a = solvers.SparseMatrix.from_scipy(random_spd_sparse(30, 0.2, seed=4))
    dense = np.asarray(a.as_matrix())
    ic = solvers.IncompleteCholesky(a)
    ref = ic0_reference(dense)
    np.testing.assert_allclose(ic.factor.as_matrix(), ref, rtol=1e-12, atol=1e-14)
    # (L L^T)_ij = a_ij on the pattern
    llt = ref @ ref.T
    np.testing.assert_allclose(llt[dense != 0], dense[dense != 0], rtol=1e-12)
    r = jnp.linspace(-1.0, 1.0, dense.shape[0])
    np.testing.assert_allclose(ic.mv(r), np.linalg.solve(llt, r), rtol=1e-10)
    # derivative of the factor with respect to the matrix values, both modes
    check_grads(
        jax.jit(lambda v: solvers.IncompleteCholesky(a.with_values(v)).factor.values),
        (a.values,),
        order=2,
        modes=("fwd", "rev"),
    )


def test_ssor_jacobi_and_chebyshev_against_dense_formulas():
    m = random_spd_sparse(25, 0.2, seed=6)
    a = solvers.SparseMatrix.from_scipy(m, tags=SPD)
    dense = m.toarray()
    d = np.diag(dense)
    omega = 1.3
    t = np.diag(d / omega) + np.tril(dense, -1)
    minv = (
        (2 - omega)
        / omega
        * np.linalg.solve(t.T, np.diag(d / omega))
        @ np.linalg.inv(t)
    )
    np.testing.assert_allclose(solvers.SSOR(a, omega).as_matrix(), minv, rtol=1e-10)
    np.testing.assert_allclose(solvers.Jacobi(a).as_matrix(), np.diag(1 / d))
    np.testing.assert_allclose(solvers.Jacobi(dense).as_matrix(), np.diag(1 / d))

    # Chebyshev: M^{-1} = p(A) with 1 - lam p(lam) = T_k((theta - lam)/delta)/T_k(sigma)
    degree, ratio = 5, 20.0
    lam, q = np.linalg.eigh(dense)
    lmax = 1.05 * lam[-1]
    cheb = solvers.Chebyshev(a, degree, ratio, lmax=lmax, jacobi=False)
    lo = lmax / ratio
    theta, delta = (lmax + lo) / 2, (lmax - lo) / 2
    tk = np.polynomial.chebyshev.Chebyshev.basis(degree)
    p = (1 - tk((theta - lam) / delta) / tk(theta / delta)) / lam
    np.testing.assert_allclose(cheb.as_matrix(), (q * p) @ q.T, rtol=1e-9, atol=1e-12)
    # with Jacobi scaling and the estimated lmax it is symmetric positive definite
    mj = np.asarray(solvers.Chebyshev(a).as_matrix())
    np.testing.assert_allclose(mj, mj.T, atol=1e-12)
    assert np.linalg.eigvalsh(mj).min() > 0


def test_multigrid_is_spd_and_grid_independent():
    op = solvers.problems.diffusion_2d(jax.random.key(1), 16, variance=1.0)
    mg = np.asarray(jax.jit(lambda op: solvers.Multigrid(op).as_matrix())(op))
    np.testing.assert_allclose(mg, mg.T, atol=1e-12)
    assert np.linalg.eigvalsh(mg).min() > 0
    steps = []
    for n in (32, 64):
        op = solvers.problems.diffusion_2d(jax.random.key(2), n, variance=1.0)
        sol = jax.jit(
            lambda op: solvers.cg(
                op, jnp.ones(op.n**2), preconditioner=solvers.Multigrid(op)
            )
        )(op)
        steps.append(int(sol.n_steps))
    assert max(steps) <= 20 and steps[1] <= steps[0] + 4, steps
    with pytest.raises(TypeError, match="Diffusion2D"):
        solvers.Multigrid(op.to_sparse())
    with pytest.raises(ValueError, match="coarsens only"):
        solvers.Multigrid(solvers.problems.poisson_2d(65))


def test_diffusion_3d_problems_and_multigrid_3d():
    op = solvers.problems.poisson_3d(4)
    a = np.asarray(op.to_dense())
    np.testing.assert_allclose(a, a.T, atol=0)
    np.testing.assert_allclose(np.diag(a), 6.0)  # 6 unit faces per cell (Dirichlet)
    np.testing.assert_allclose(np.asarray(op.to_scipy().todense()), a, atol=0)
    np.testing.assert_allclose(np.asarray(op.to_sparse().as_matrix()), a, atol=0)
    # a 7-point stencil: the 3 axis neighbours at strides 1, 4, 16
    assert sorted(np.nonzero(a[21])[0] - 21) == [-16, -4, -1, 0, 1, 4, 16]
    # seeded log-normal coefficients: harmonic face means, deterministic, float32
    keys = jax.random.split(jax.random.key(0), 2)
    ops = jax.vmap(lambda k: solvers.problems.diffusion_3d(k, 8, variance=2.0))(keys)
    one = solvers.problems.diffusion_3d(keys[1], 8, variance=2.0)
    np.testing.assert_allclose(ops.kz[1], one.kz, rtol=1e-12)
    op32 = solvers.problems.diffusion_3d(keys[0], 8, dtype=jnp.float32)
    assert op32.mv(jnp.ones(512, jnp.float32)).dtype == jnp.float32
    assert float(jnp.min(one.kx)) > 0 and float(jnp.max(one.ky / one.ky.min())) > 10
    # Multigrid: symmetric positive definite and grid-independent in 3-D too,
    # also for shifted (heat-step) systems
    mg = np.asarray(jax.jit(lambda op: solvers.Multigrid(op).as_matrix())(one))
    np.testing.assert_allclose(mg, mg.T, atol=1e-12)
    assert np.linalg.eigvalsh(mg).min() > 0
    solve = jax.jit(
        lambda op: solvers.cg(
            op, jnp.ones(op.n**3), preconditioner=solvers.Multigrid(op), rtol=1e-8
        )
    )
    steps = []
    for n in (16, 32):
        op = solvers.problems.diffusion_3d(jax.random.key(2), n, variance=1.0)
        sol = solve(op)
        np.testing.assert_allclose(op.mv(sol.x), jnp.ones(n**3), atol=1e-6)
        steps.append(int(sol.n_steps))
    assert max(steps) <= 20 and steps[1] <= steps[0] + 4, steps
    op16 = solvers.problems.diffusion_3d(jax.random.key(2), 16, variance=1.0)
    heat = solvers.problems.heat_steps(op16, jnp.array([1e-4, 1e-2]))
    heat_steps = [
        int(solve(jax.tree_util.tree_map(lambda x: x[i], heat)).n_steps) for i in (0, 1)
    ]
    assert heat_steps[0] <= heat_steps[1] <= 20, heat_steps
    with pytest.raises(ValueError, match="kz"):
        solvers.problems.Diffusion3D(one.kx, one.ky, one.kz[:, :, :-1])
    with pytest.raises(ValueError, match="n must be"):
        solvers.problems.diffusion_3d(keys[0], 1)
    with pytest.raises(ValueError, match="coarsens only"):
        solvers.Multigrid(solvers.problems.poisson_3d(17))


def test_preconditioners_reduce_iterations_in_order_and_work_with_lineax():
    op = solvers.problems.diffusion_2d(jax.random.key(3), 32, variance=2.0)
    a = op.to_sparse()
    b = jnp.ones(32 * 32)
    steps = {}
    for name, m in [
        ("none", None),
        ("jacobi", solvers.Jacobi(op)),
        ("chebyshev", solvers.Chebyshev(op, 4)),
        ("ssor", solvers.SSOR(a, 1.5)),
        ("ic0", solvers.IncompleteCholesky(a)),
        ("multigrid", solvers.Multigrid(op)),
    ]:
        sol = solvers.cg(a, b, preconditioner=m, rtol=1e-8)
        np.testing.assert_allclose(op.mv(sol.x), b, atol=1e-6)
        steps[name] = int(sol.n_steps)
        if m is not None:  # lineax's CG takes them as preconditioners
            lsol = lx.linear_solve(
                a, b, lx.CG(rtol=1e-8, atol=0.0), options={"preconditioner": m}
            )
            np.testing.assert_allclose(lsol.value, sol.x, rtol=1e-5)
    assert steps["none"] > 2 * steps["jacobi"] > 2 * steps["ic0"], steps
    assert steps["chebyshev"] < steps["jacobi"] and steps["ssor"] < steps["jacobi"]
    assert steps["multigrid"] < steps["ic0"] / 2, steps


@pytest.mark.parametrize("name", ["jacobi", "ssor", "ic0", "chebyshev", "multigrid"])
def test_preconditioned_cg_vmap_float32_and_not_spd(name):
    make = {
        "jacobi": solvers.Jacobi,
        "ssor": lambda op: solvers.SSOR(op, 1.2),
        "ic0": solvers.IncompleteCholesky,
        "chebyshev": lambda op: solvers.Chebyshev(op, 3),
        "multigrid": solvers.Multigrid,
    }[name]
    keys = jax.random.split(jax.random.key(4), 3)
    ops = jax.vmap(lambda k: solvers.problems.diffusion_2d(k, 16, variance=1.5))(keys)
    b = jnp.ones(256)

    @jax.jit  # one compilation for the loop below
    def solve(op):
        return solvers.cg(op, b, preconditioner=make(op), rtol=1e-10)

    batched = jax.vmap(solve)(ops)
    for i in range(3):
        one = solve(jax.tree_util.tree_map(lambda x: x[i], ops))
        np.testing.assert_allclose(batched.x[i], one.x, rtol=1e-9)
        assert int(batched.n_steps[i]) == int(one.n_steps)
    op32 = jax.tree_util.tree_map(lambda x: x[0].astype(jnp.float32), ops)
    sol32 = solvers.cg(
        op32, b.astype(jnp.float32), preconditioner=make(op32), rtol=1e-5
    )
    assert sol32.x.dtype == jnp.float32 and bool(sol32.converged)
    # a matrix with a negative diagonal entry: a result code, never garbage
    if name != "multigrid":
        bad = solvers.problems.poisson_2d(16)
        bad = solvers.problems.Diffusion2D(bad.kx.at[3, 3].set(-50.0), bad.ky)
        out = solvers.cg(bad, b, preconditioner=make(bad), throw=False)
        assert out.result == solvers.RESULTS.not_spd
        with pytest.raises(Exception, match="not"):
            solvers.cg(bad, b, preconditioner=make(bad))


@pytest.mark.parametrize("name", ["jacobi", "ssor", "chebyshev", "multigrid"])
def test_preconditioner_derivatives_in_the_coefficients(name):
    # M^{-1} r as a function of the face coefficients, order 2, both modes
    make = {
        "jacobi": solvers.Jacobi,
        "ssor": lambda op: solvers.SSOR(op, 1.3),
        "chebyshev": lambda op: solvers.Chebyshev(op, 3, lmax=2.5),
        "multigrid": lambda op: solvers.Multigrid(op, coarsest=4),
    }[name]
    op = solvers.problems.diffusion_2d(jax.random.key(9), 8, variance=1.0)
    r = jnp.linspace(-1.0, 1.0, 64)

    def apply(kx, ky):
        return make(solvers.problems.Diffusion2D(kx, ky)).mv(r)

    check_grads(jax.jit(apply), (op.kx, op.ky), order=2, modes=("fwd", "rev"))


def test_preconditioner_bad_input():
    with pytest.raises(ValueError, match="omega"):
        solvers.SSOR(solvers.problems.poisson_2d(4), 2.5)
    with pytest.raises(TypeError, match="matvec function"):
        solvers.Jacobi(lambda x: x)
    with pytest.raises(TypeError, match="entries"):
        solvers.IncompleteCholesky(lambda x: x)
    with pytest.raises(ValueError, match="symmetric sparsity"):
        solvers.IncompleteCholesky(np.triu(np.ones((3, 3))) + np.eye(3))
    with pytest.raises(ValueError, match="degree"):
        solvers.Chebyshev(solvers.problems.poisson_2d(4), 0)


# -- learned preconditioners ----------------------------------------------------------


def training_set(n=12, count=6, variance=1.5, seed=0):
    keys = jax.random.split(jax.random.key(seed), count)
    mats = jax.vmap(
        lambda k: solvers.problems.diffusion_2d(k, n, variance=variance).to_sparse()
    )(keys)
    bs = jax.random.normal(jax.random.key(seed + 1), (count, n * n))
    xs = jax.vmap(lambda a, b: solvers.cg(a, b, rtol=1e-12).x)(mats, bs)
    return mats, xs, bs


def mean_loss_and_train(model, loss, problems, steps):
    """The untrained mean loss over the problems, then Adam training (batch 3)."""
    loss0 = float(jnp.mean(jax.jit(jax.vmap(lambda p: loss(model, p)))(problems)))
    trained, losses = solvers.train_preconditioner(
        model,
        problems,
        loss,
        optax.adam(3e-3),
        steps=steps,
        key=jax.random.key(5),
        batch_size=3,
        progress=False,
    )
    return loss0, trained, losses


def test_neural_ic_starts_at_ic0_is_spd_and_trains():
    mats, xs, bs = training_set()
    a0 = jax.tree_util.tree_map(lambda x: x[0], mats)
    model = solvers.NeuralIC(jax.random.key(0), width=8, depth=2)
    # untrained = IC(0) (the factor of D^-1/2 A D^-1/2, rescaled)
    ref = solvers.IncompleteCholesky(a0).factor.as_matrix()
    np.testing.assert_allclose(
        model.factor(a0).as_matrix(), ref, rtol=1e-10, atol=1e-12
    )
    # random parameters still give an SPD preconditioner (positive diagonal)
    noisy = jax.tree_util.tree_map(
        lambda p: p + 0.5 if eqx.is_inexact_array(p) else p, model
    )
    low = np.asarray(noisy.factor(a0).as_matrix())
    assert np.all(np.diag(low) > 0) and np.allclose(low, np.tril(low))
    assert np.isfinite(low).all()
    # scale equivariance: A -> c A gives L -> sqrt(c) L
    np.testing.assert_allclose(
        noisy.factor(a0.with_values(4 * a0.values)).values,
        2 * noisy.factor(a0).values,
        rtol=1e-10,
    )
    # training lowers the loss and (after enough steps) the iterations
    loss0, trained, losses = mean_loss_and_train(
        model, solvers.solution_weighted_loss, (mats, xs, bs), steps=60
    )
    assert losses.shape == (60,) and np.isfinite(losses).all()
    assert np.mean(losses[-10:]) < 0.7 * loss0, (loss0, losses[-10:])
    # a held-out, larger grid: the model applies to any size
    op = solvers.problems.diffusion_2d(jax.random.key(99), 24, variance=1.5)
    a = op.to_sparse()
    sol = solvers.cg(a, jnp.ones(24 * 24), preconditioner=trained(a), rtol=1e-8)
    assert bool(sol.converged)


def test_neural_ic_derivatives_and_float32():
    mats, xs, bs = training_set(n=6, count=2)
    problem = jax.tree_util.tree_map(lambda x: x[0], (mats, xs, bs))
    model = solvers.NeuralIC(jax.random.key(1), width=4, depth=1)
    model = jax.tree_util.tree_map(
        lambda p: p + 0.1 if eqx.is_inexact_array(p) else p, model
    )
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def loss_of_decoder(w):
        m = eqx.combine(eqx.tree_at(lambda p: p.gnn.decode.weight, params, w), static)
        return solvers.solution_weighted_loss(m, problem)

    check_grads(
        jax.jit(loss_of_decoder),
        (params.gnn.decode.weight,),
        order=1,
        modes=("fwd", "rev"),
    )
    a32 = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), problem[0])
    m32 = jax.tree_util.tree_map(
        lambda p: p.astype(jnp.float32) if eqx.is_inexact_array(p) else p, model
    )
    assert m32(a32).factor.values.dtype == jnp.float32
    with pytest.raises(TypeError, match="SparseMatrix"):
        model.factor(lambda x: x)


def test_train_preconditioner_bad_input_and_single_trace():
    mats, xs, bs = training_set(n=6, count=3)
    model = solvers.NeuralIC(jax.random.key(2), width=4, depth=1)
    traces = []

    def loss(m, p):
        traces.append(1)
        return solvers.solution_weighted_loss(m, p)

    train = functools.partial(
        solvers.train_preconditioner,
        model,
        loss=loss,
        optimizer=optax.sgd(1e-3),
        key=jax.random.key(0),
        progress=False,
    )
    train((mats, xs, bs), steps=4, batch_size=2)
    assert len(traces) == 1
    with pytest.raises(ValueError, match="batch_size"):
        train((mats, xs, bs), steps=1, batch_size=5)
    with pytest.raises(ValueError, match="leading"):
        solvers.train_preconditioner(
            model,
            (mats, xs[:2], bs),
            loss,
            optax.sgd(1e-3),
            steps=1,
            key=jax.random.key(0),
        )
    with pytest.raises(Exception, match="non-finite"):
        solvers.train_preconditioner(
            model,
            (mats, xs * jnp.nan, bs),
            solvers.solution_weighted_loss,
            optax.sgd(1e-3),
            steps=1,
            key=jax.random.key(0),
            progress=False,
        )


# -- sequences of systems and the omega bandit ----------------------------------------


def test_heat_steps_are_shifted_systems():
    base = solvers.problems.diffusion_2d(jax.random.key(6), 16, variance=1.0)
    ops = solvers.problems.heat_steps(base, jnp.array([1e-3, 1e-1]))
    dense = np.asarray(base.to_dense())
    for k, dt in enumerate((1e-3, 1e-1)):
        op = jax.tree_util.tree_map(lambda x: x[k], ops)
        shifted = dense + np.eye(256) / (256 * dt)
        np.testing.assert_allclose(op.to_dense(), shifted, rtol=1e-12)
        np.testing.assert_allclose(op.to_sparse().as_matrix(), shifted, rtol=1e-12)
        sol = solvers.cg(op, jnp.ones(256), preconditioner=solvers.Multigrid(op))
        np.testing.assert_allclose(shifted @ sol.x, np.ones(256), atol=1e-6)
    with pytest.raises(ValueError, match="vector"):
        solvers.problems.heat_steps(base, jnp.ones((2, 2)))


def test_anisotropic_problem():
    op = solvers.problems.anisotropic_2d(8, 1e-2)
    ref = sp.kronsum(
        sp.diags([-1e-2, 2e-2, -1e-2], [-1, 0, 1], shape=(8, 8)),
        sp.diags([-1.0, 2.0, -1.0], [-1, 0, 1], shape=(8, 8)),
    ).toarray()
    np.testing.assert_allclose(op.to_dense(), ref, atol=1e-14)
    sol = solvers.cg(op, jnp.ones(64), preconditioner=solvers.IncompleteCholesky(op))
    np.testing.assert_allclose(ref @ sol.x, np.ones(64), atol=1e-5)
    with pytest.raises(ValueError, match="epsilon"):
        solvers.problems.anisotropic_2d(8, 0.0)


def test_omega_bandit_finds_the_best_arm():
    omegas = jnp.linspace(1.0, 1.9, 10)
    cost = 40 + 300 * (omegas - 1.6) ** 2  # best arm: omega = 1.6

    @jax.jit
    def play(key):
        def step(bandit, key):
            arm, _ = bandit.sample(key)
            return bandit.update(arm, cost[arm]), cost[arm]

        bandit = solvers.OmegaBandit(omegas, max_cost=200.0)
        return jax.lax.scan(step, bandit, jax.random.split(key, 3000))

    bandit, paid = play(jax.random.key(0))
    assert int(bandit.rounds) == 3000
    assert abs(float(bandit.best()) - 1.6) < 1e-6
    # regret: the last rounds cost far less than a uniform choice
    assert float(paid[-500:].mean()) < 0.5 * float(cost.mean() - cost.min()) + float(
        cost.min()
    )
    p = bandit.probabilities()
    np.testing.assert_allclose(float(p.sum()), 1.0, rtol=1e-12)
    with pytest.raises(ValueError, match="omega"):
        solvers.OmegaBandit(jnp.array([0.5, 2.5]), max_cost=10.0)
    with pytest.raises(ValueError, match="max_cost"):
        solvers.OmegaBandit(max_cost=0.0)


def test_omega_bandit_with_ssor_on_heat_steps():
    ops = solvers.problems.heat_steps(
        solvers.problems.poisson_2d(12), jnp.geomspace(1e-3, 1.0, 8)
    )
    b = jnp.ones(144)

    @jax.jit
    def run(ops, key):
        def step(bandit, xs):
            op, key = xs
            arm, omega = bandit.sample(key)
            sol = solvers.cg(
                op, b, preconditioner=solvers.SSOR(op, omega), max_steps=300
            )
            return bandit.update(arm, sol.n_steps), sol.n_steps

        bandit = solvers.OmegaBandit(jnp.array([1.0, 1.4, 1.8]), max_cost=300.0)
        return jax.lax.scan(step, bandit, (ops, jax.random.split(key, 8)))

    bandit, steps = run(ops, jax.random.key(1))
    assert int(bandit.rounds) == 8 and np.all(np.asarray(steps) > 0)


def test_neural_fsai_and_a_norm_loss():
    mats, xs, bs = training_set(n=10, count=6)
    a0 = jax.tree_util.tree_map(lambda x: x[0], mats)
    model = solvers.NeuralFSAI(jax.random.key(0), width=8, depth=2)
    # untrained: G = D^{-1/2}, so G^T G is Jacobi
    np.testing.assert_allclose(
        model(a0).as_matrix(), solvers.Jacobi(a0).as_matrix(), rtol=1e-12
    )
    noisy = jax.tree_util.tree_map(
        lambda p: p + 0.05 if eqx.is_inexact_array(p) else p, model
    )
    g = np.asarray(noisy.factor(a0).as_matrix())
    m = np.asarray(noisy(a0).as_matrix())
    np.testing.assert_allclose(m, g.T @ g, rtol=1e-10, atol=1e-14)
    assert np.all(np.diag(g) > 0) and np.linalg.eigvalsh(m).min() > 0

    # the loss: in [0, 1], zero for the exact inverse, invariant to scaling M
    problem = jax.tree_util.tree_map(lambda x: x[0], (mats, xs, bs))
    dense = np.asarray(a0.as_matrix())

    class Exact(eqx.Module):
        scale: float

        def __call__(self, a):
            return lx.MatrixLinearOperator(
                jnp.asarray(self.scale * np.linalg.inv(dense))
            )

    assert abs(float(solvers.a_norm_loss(Exact(1.0), problem))) < 1e-10
    assert abs(float(solvers.a_norm_loss(Exact(7.0), problem))) < 1e-10
    value = float(solvers.a_norm_loss(noisy, problem))
    assert 0 < value < 1
    check_grads(
        jax.jit(
            lambda v: solvers.a_norm_loss(noisy, (a0.with_values(v), *problem[1:]))
        ),
        (a0.values,),
        order=1,
        modes=("fwd", "rev"),
    )
    loss0, _, losses = mean_loss_and_train(
        model, solvers.a_norm_loss, (mats, xs, bs), steps=40
    )
    assert np.mean(losses[-10:]) < 0.8 * loss0, (loss0, losses[-10:])


def _neural_inverse_setup():
    keys = jax.random.split(jax.random.key(7), 4)
    ops = jax.vmap(lambda k: solvers.problems.diffusion_2d(k, 8, variance=1.0))(keys)
    bs = jax.random.normal(jax.random.key(8), (4, 64))
    xs = jax.vmap(lambda op, b: solvers.cg(op, b, rtol=1e-12).x)(ops, bs)
    op0 = jax.tree_util.tree_map(lambda x: x[0], ops)
    model = solvers.NeuralInverse(
        jax.random.key(0), width=4, levels=2, dtype=jnp.float64
    )
    noisy = jax.tree_util.tree_map(
        lambda p: p + 0.1 if eqx.is_inexact_array(p) else p, model
    )
    return ops, xs, bs, op0, model, noisy


def test_neural_inverse():
    ops, xs, bs, op0, model, noisy = _neural_inverse_setup()
    r = jnp.linspace(-1.0, 2.0, 64)
    # untrained = Jacobi; positively homogeneous once trained
    np.testing.assert_allclose(model(op0).mv(r), r / op0.diagonal(), rtol=1e-12)
    m = noisy(op0)
    np.testing.assert_allclose(m.mv(3.0 * r), 3.0 * m.mv(r), rtol=1e-12)
    assert not np.allclose(m.mv(r), r / op0.diagonal())
    # float32 keeps its dtype
    op32 = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), op0)
    m32 = jax.tree_util.tree_map(
        lambda p: p.astype(jnp.float32) if eqx.is_inexact_array(p) else p, noisy
    )
    assert m32(op32).mv(r.astype(jnp.float32)).dtype == jnp.float32
    with pytest.raises(TypeError, match="Diffusion2D"):
        model(op0.to_sparse())
    with pytest.raises(ValueError, match="divisible"):
        solvers.NeuralInverse(jax.random.key(0), levels=3)(
            solvers.problems.poisson_2d(6)
        )


@pytest.mark.slow  # 25 s: trains the U-Net; NeuralInverse is not a recommended default
def test_neural_inverse_derivatives_and_training():
    ops, xs, bs, op0, model, noisy = _neural_inverse_setup()
    # derivatives of the Kaneda loss with respect to the weights, both modes
    problem = jax.tree_util.tree_map(lambda x: x[0], (ops, xs, bs))
    params, static = eqx.partition(noisy, eqx.is_inexact_array)

    def loss_of_output_layer(w):
        mm = eqx.combine(eqx.tree_at(lambda p: p.out.weight, params, w), static)
        return solvers.a_norm_loss(mm, problem)

    check_grads(
        jax.jit(loss_of_output_layer),
        (params.out.weight,),
        order=1,
        modes=("fwd", "rev"),
    )
    # training lowers the loss; the result preconditions flexible CG
    loss0, trained, losses = mean_loss_and_train(
        model, solvers.a_norm_loss, (ops, xs, bs), steps=30
    )
    assert np.mean(losses[-5:]) < loss0, (loss0, losses[-5:])
    sol = solvers.cg(op0, jnp.ones(64), preconditioner=trained(op0), flexible=True)
    assert bool(sol.converged)
