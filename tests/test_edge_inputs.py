"""Edge and bad input over the public API: every case must be *visible*.

For each case the outcome must be one of
- a library error: a trace-time `ValueError`/`TypeError` whose message names the
  function, or a run-time `EquinoxRuntimeError` (`throw=True`);
- a result code other than `successful` (`throw=False`);
- a finite value within the documented accuracy of a float64 NumPy reference;
and for derivatives: an error, or agreement with finite differences (or the exact
derivative). No case is skipped because it fails. The case ids start with the defect
class of docs/failure_modes.md, so a failing run counts silent cases by class.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import optax
import pytest
import scipy.linalg

import jaxdecomp
import solvers
from jaxdecomp import lowrank

F32, F64 = np.float32, np.float64
RUNTIME_ERRORS = (eqx.EquinoxRuntimeError, jax.errors.JaxRuntimeError)


def _rel(x, ref):
    x, ref = np.asarray(x, F64), np.asarray(ref, F64)
    return np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-300)


def _bound(dtype):
    # The checked accuracy of the matrix functions: residuals and error estimates
    # <= 10 sqrt(eps); the forward error tracks them within a small factor.
    return 30 * float(np.finfo(dtype).eps) ** 0.5


def _spd(n, kappa, dtype, seed=0):
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    return ((q * np.geomspace(1.0, 1.0 / kappa, n)) @ q.T).astype(dtype)


def _rank_deficient_cov(dtype):
    x = np.random.default_rng(1).standard_normal((4, 8))
    return (x.T @ x / 4).astype(dtype)


# --------------------------------------------------------------------------------------
# Matrix functions
# --------------------------------------------------------------------------------------

MATRICES = {
    "spd_k1e2": lambda dt: _spd(5, 1e2, dt),
    "spd_k1e4": lambda dt: _spd(5, 1e4, dt),
    "spd_k1e8": lambda dt: _spd(5, 1e8, dt),
    "spd_k1e12": lambda dt: _spd(5, 1e12, dt),
    "spd_k1e16": lambda dt: _spd(5, 1e16, dt),
    "one_by_one": lambda dt: np.array([[4.0]], dt),
    "identity": lambda dt: np.eye(4, dtype=dt),
    "zero": lambda dt: np.zeros((3, 3), dt),
    "singular_diag": lambda dt: np.diag([1.0, 0.0]).astype(dt),
    "rank_deficient_cov": _rank_deficient_cov,
    "indefinite": lambda dt: np.diag([1.0, -1.0, 2.0]).astype(dt),
    "non_symmetric": lambda dt: np.array([[2.0, 1.0], [0.0, 3.0]], dt),
    "nan": lambda dt: np.array([[1.0, np.nan], [np.nan, 1.0]], dt),
    "inf": lambda dt: np.array([[np.inf, 0.0], [0.0, 1.0]], dt),
    "scale_1e-30": lambda dt: (1e-30 * _spd(4, 10, F64)).astype(dt),
    "scale_1e30": lambda dt: (1e30 * _spd(4, 10, F64)).astype(dt),
    "batch": lambda dt: np.stack([_spd(3, 10, dt, s) for s in range(3)]),
}


def _eig_fn(a, f):
    w, v = np.linalg.eigh(np.asarray(a, F64))
    return (v * f(w)) @ np.swapaxes(v, -1, -2)


REFERENCES = {
    "sqrtm": lambda a: _eig_fn(a, lambda w: np.sqrt(np.maximum(w, 0))),
    "inv_sqrtm": lambda a: _eig_fn(a, lambda w: 1 / np.sqrt(w)),
    "inv_pth_root": lambda a: _eig_fn(a, lambda w: w ** (-1 / 4)),
}

FUNCTIONS = [
    ("sqrtm", "eigh"),
    ("sqrtm", "newton_schulz"),
    ("sqrtm", "mixed"),
    ("inv_sqrtm", "eigh"),
    ("inv_sqrtm", "newton_schulz"),
    ("sqrtm_and_inv_sqrtm", "eigh"),
    ("sqrtm_and_inv_sqrtm", "newton_schulz"),
    ("sqrtm_and_inv_sqrtm", "mixed"),
    ("inv_pth_root", "eigh"),
    ("inv_pth_root", "newton_schulz"),
]


# Jitted with the function and method static: cases of one shape and dtype share a
# compilation (the suite is dominated by compile time). Trace-time errors still raise.
@eqx.filter_jit
def _call(name, method, a, precision="highest"):
    kw = {} if precision == "highest" else {"precision": precision}
    if name == "inv_pth_root":
        return jaxdecomp.inv_pth_root(
            a, 4, method=method, throw=False, full_output=True, **kw
        )
    fn = getattr(jaxdecomp, name)
    return fn(a, method=method, throw=False, full_output=True, **kw)


def _check_matrix_function(name, method, a, precision="highest"):
    try:
        sol = _call(name, method, jnp.asarray(a), precision)
    except (ValueError, TypeError) as e:
        assert name in str(e), str(e)
        return
    if sol.result != jaxdecomp.RESULTS.successful:
        return  # visible
    values = sol.value if isinstance(sol.value, tuple) else (sol.value,)
    for v in values:
        assert v.dtype == a.dtype
        assert np.all(np.isfinite(np.asarray(v))), "successful but not finite"
    if name == "sqrtm_and_inv_sqrtm":
        pairs = [(values[0], REFERENCES["sqrtm"]), (values[1], REFERENCES["inv_sqrtm"])]
    else:
        pairs = [(values[0], REFERENCES[name])]
    for v, ref in pairs:
        err = _rel(v, ref(a))
        assert err <= _bound(a.dtype), f"successful but {err:.2e} wrong"


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", list(MATRICES))
@pytest.mark.parametrize(
    "name,method", FUNCTIONS, ids=[f"{n}-{m}" for n, m in FUNCTIONS]
)
def test_matrix_function_edge(name, method, case, dtype):
    _check_matrix_function(name, method, MATRICES[case](dtype))


# The tensor-core schemes of the Newton-Schulz paths (float32 only: float64 input
# ignores them): the least accurate (bfloat16 x 3) and the TF32 rounding.
SCHEME_FUNCTIONS = [
    ("sqrtm", "newton_schulz"),
    ("sqrtm", "mixed"),
    ("inv_sqrtm", "newton_schulz"),
    ("sqrtm_and_inv_sqrtm", "newton_schulz"),
    ("inv_pth_root", "newton_schulz"),
]


# bf16x3 (the least accurate scheme) by default; tf32x3 takes the same split-product
# path (its TF32 rounding is tested in test_precision) and runs with --runslow
@pytest.mark.parametrize(
    "precision", ["bf16x3", pytest.param("tf32x3", marks=pytest.mark.slow)]
)
@pytest.mark.parametrize("case", list(MATRICES))
@pytest.mark.parametrize(
    "name,method", SCHEME_FUNCTIONS, ids=[f"{n}-{m}" for n, m in SCHEME_FUNCTIONS]
)
def test_matrix_function_edge_tensor_core_precision(name, method, case, precision):
    _check_matrix_function(name, method, MATRICES[case](F32), precision)


@pytest.mark.parametrize(
    "a",
    [
        np.zeros((0, 0)),
        np.zeros((2, 0, 0)),
        np.ones(3),
        np.ones((2, 3)),
        np.eye(3, dtype=np.int32),
        np.eye(3, dtype=np.float16),
        np.eye(3, dtype=np.complex64),
    ],
    ids=["empty", "empty_batch", "vector", "non_square", "int", "float16", "complex"],
)
@pytest.mark.parametrize(
    "fn",
    [jaxdecomp.sqrtm, jaxdecomp.inv_sqrtm, jaxdecomp.sqrtm_and_inv_sqrtm],
    ids=lambda f: f.__name__,
)
def test_shape_dtype_errors_at_trace_time(fn, a):
    with pytest.raises((ValueError, TypeError), match=fn.__name__):
        fn(a)


POLAR_INPUTS = {
    "well": lambda dt: np.random.default_rng(0).standard_normal((6, 4)).astype(dt),
    "wide": lambda dt: np.random.default_rng(0).standard_normal((3, 5)).astype(dt),
    "k1e4": lambda dt: (_spd(5, 1e4, F64) @ np.diag([1, 2, 3, 4, 5.0])).astype(dt),
    "k1e8": lambda dt: _spd(5, 1e8, dt),
    "rank_deficient": lambda dt: np.outer(np.arange(1.0, 5), np.ones(3)).astype(dt),
    "zero": lambda dt: np.zeros((3, 3), dt),
    "nan": lambda dt: np.full((2, 2), np.nan, dt),
    "scale_1e-30": lambda dt: (1e-30 * _spd(3, 10, F64)).astype(dt),
}


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", list(POLAR_INPUTS))
@pytest.mark.parametrize("method", ["svd", "newton_schulz", "newton_schulz-bf16x3"])
def test_polar_edge(method, case, dtype):
    a = POLAR_INPUTS[case](dtype)
    method, _, precision = method.partition("-")
    sol = jaxdecomp.polar(
        jnp.asarray(a),
        method=method,
        precision=precision or "highest",
        throw=False,
        full_output=True,
    )
    if sol.result != jaxdecomp.RESULTS.successful:
        assert case in ("rank_deficient", "zero", "nan") or (
            case == "k1e8" and dtype == F32
        ), "a full-rank, well-resolved input was rejected"
        return
    w, s, vt = np.linalg.svd(np.asarray(a, F64), full_matrices=False)
    kappa = s[0] / s[-1]
    err = _rel(sol.value, w @ vt)
    # U is as accurate as the conditioning allows: kappa eps, capped by the check
    assert err <= 30 * max(kappa * np.finfo(dtype).eps, np.finfo(dtype).eps ** 0.5)


LYAPUNOV_INPUTS = {
    "spd": (lambda dt: _spd(4, 10, dt), lambda dt: np.eye(4, dtype=dt)),
    "non_symmetric_s": (
        lambda dt: np.array([[2.0, 1.0], [0.0, 3.0]], dt),
        lambda dt: np.eye(2, dtype=dt),
    ),
    "nan_g": (lambda dt: np.eye(2, dtype=dt), lambda dt: np.full((2, 2), np.nan, dt)),
    "indefinite_s": (
        lambda dt: np.diag([1.0, -1.0]).astype(dt),
        lambda dt: np.eye(2, dtype=dt),
    ),
    "singular_s": (
        lambda dt: np.diag([1.0, 0.0]).astype(dt),
        lambda dt: np.eye(2, dtype=dt),
    ),
    "ill_conditioned_s": (lambda dt: _spd(4, 1e12, dt), lambda dt: _spd(4, 3, dt, 7)),
}


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", list(LYAPUNOV_INPUTS))
@pytest.mark.parametrize("method", ["eigh", "newton_schulz", "newton_schulz-bf16x3"])
def test_solve_lyapunov_edge(method, case, dtype):
    s, g = (f(dtype) for f in LYAPUNOV_INPUTS[case])
    method, _, precision = method.partition("-")
    sol = jaxdecomp.solve_lyapunov(
        jnp.asarray(s),
        jnp.asarray(g),
        method=method,
        precision=precision or "highest",
        throw=False,
        full_output=True,
    )
    if sol.result != jaxdecomp.RESULTS.successful:
        assert case != "spd"
        return
    s64, g64 = np.asarray(s, F64), np.asarray(g, F64)
    ref = scipy.linalg.solve_continuous_lyapunov(s64, g64)
    err = _rel(sol.value, ref)
    w = np.linalg.eigvalsh(0.5 * (s64 + s64.T))
    kappa = w.max() / w.min()
    assert err <= 30 * max(kappa * np.finfo(dtype).eps, np.finfo(dtype).eps ** 0.5)


# --------------------------------------------------------------------------------------
# Derivatives of the matrix functions at edge input
# --------------------------------------------------------------------------------------


def _fd_jvp(f, x, dx, h=1e-6):
    return (f(x + h * dx) - f(x - h * dx)) / (2 * h)


def test_sqrtm_gradient_at_semidefinite_input_is_finite_and_exact_on_its_manifold():
    # A = B B^T with B of rank 2 in R^4: perturbing B keeps the null space, and the
    # derivative there is finite; it must match finite differences in B.
    b = np.random.default_rng(3).standard_normal((4, 2))
    db = np.random.default_rng(4).standard_normal((4, 2))

    def f(b):
        return jaxdecomp.sqrtm(b @ b.T)

    def closed_form(b):  # (B B^T)^{1/2} = B (B^T B)^{-1/2} B^T, smooth in B
        w, v = jnp.linalg.eigh(b.T @ b)
        return b @ (v / jnp.sqrt(w)) @ v.T @ b.T

    # (finite differences of f itself are noise: sqrt turns the rounding-level null
    # eigenvalues of B B^T into 1e-8 entries)
    _, tangent = jax.jvp(f, (jnp.asarray(b),), (jnp.asarray(db),))
    _, exact = jax.jvp(closed_form, (jnp.asarray(b),), (jnp.asarray(db),))
    assert np.all(np.isfinite(np.asarray(tangent)))
    np.testing.assert_allclose(tangent, exact, rtol=1e-6, atol=1e-7)
    g = jax.grad(lambda b: jnp.sum(f(b) ** 2))(jnp.asarray(b))
    assert np.all(np.isfinite(np.asarray(g)))
    # diag(1, 0): finite everywhere; the (1,1) entry is d sqrt(t)/dt = 1/2 and the
    # off-diagonal derivative 1 / (1 + 0) = 1 (the reproducer was NaN everywhere).
    g = jax.grad(lambda a: jaxdecomp.sqrtm(a).sum())(jnp.diag(jnp.array([1.0, 0.0])))
    np.testing.assert_allclose(g, [[0.5, 1.0], [1.0, 0.0]], atol=1e-12)


def test_inverse_root_gradient_at_singular_input_is_not_silent():
    a = jnp.asarray(_rank_deficient_cov(F64))
    with pytest.raises(RUNTIME_ERRORS):
        jax.block_until_ready(jax.grad(lambda a: jaxdecomp.inv_sqrtm(a).sum())(a))


def test_polar_newton_schulz_derivative_ill_conditioned():
    a = jnp.asarray(_spd(5, 1e4, F64) @ np.diag([1, 2, 3, 4, 5.0]))
    da = jnp.asarray(np.random.default_rng(0).standard_normal((5, 5)))
    f = lambda a: jaxdecomp.polar(a, method="newton_schulz")  # noqa: E731
    _, t = jax.jvp(f, (a,), (da,))
    fd = _fd_jvp(
        lambda a: np.asarray(jaxdecomp.polar(jnp.asarray(a), method="svd")),
        np.asarray(a),
        np.asarray(da),
        h=1e-9,
    )
    assert _rel(t, fd) < 1e-4


# --------------------------------------------------------------------------------------
# Conjugate gradients
# --------------------------------------------------------------------------------------

_SPD4 = _spd(4, 10, F64)


def _cg_cases():
    e1 = np.eye(4)[0]
    return {
        "spd": (_SPD4, e1, {}),
        "zero_rhs": (_SPD4, np.zeros(4), {}),
        "indefinite": (np.diag([1.0, -1.0, 2.0, 3.0]), np.ones(4), {}),
        "non_symmetric": (np.array([[2.0, 1.0], [0.0, 3.0]]), np.ones(2), {}),
        "nan_rhs": (_SPD4, np.full(4, np.nan), {}),
        "nan_operator": (np.full((4, 4), np.nan), np.ones(4), {}),
        "max_steps_1": (_spd(40, 1e6, F64), np.ones(40), {"max_steps": 1}),
        "tiny_rhs": (_SPD4, 1e-25 * np.ones(4), {}),
        "huge_rhs": (_SPD4, 1e25 * np.ones(4), {}),
        "nan_preconditioner": (_SPD4, np.ones(4), {"preconditioner": "nan"}),
        "zero_preconditioner": (_SPD4, np.ones(4), {"preconditioner": "zero"}),
        # the recursive residual reaches eps, the true one stops near eps kappa
        "unattainable_rtol": (_spd(10, 1e3, F64), np.ones(10), {"rtol": "eps"}),
    }


def _deflation_basis(n, dtype):
    """A random deflation basis for the edge cases (1 column for 2 x 2 systems)."""
    k = 1 if n <= 2 else 2
    return jnp.asarray(np.random.default_rng(5).standard_normal((n, k)), dtype)


@pytest.mark.parametrize("solver", ["cg", "deflated", "sequence"])
@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", list(_cg_cases()))
def test_cg_edge(case, dtype, solver):
    """Every CG edge case also through deflated CG (a random basis, returning Ritz
    vectors) and through `solve_sequence` (the system twice, recycling)."""
    a, b, kw = _cg_cases()[case]
    kw = dict(kw)
    if kw.get("preconditioner") == "nan":
        kw["preconditioner"] = lambda r: r * jnp.nan
    elif kw.get("preconditioner") == "zero":
        kw["preconditioner"] = lambda r: 0 * r
    if kw.get("rtol") == "eps":
        kw["rtol"] = float(np.finfo(dtype).eps)
    a, b = jnp.asarray(a, dtype), jnp.asarray(b, dtype)
    if solver == "cg":
        sol = solvers.cg(a, b, throw=False, **kw)
    elif solver == "deflated":
        sol = solvers.cg(
            a, b, throw=False, deflation=_deflation_basis(b.shape[0], dtype), **kw
        )
        assert sol.ritz_vectors.dtype == dtype
        assert np.all(np.isfinite(np.asarray(sol.ritz_vectors)))
    else:
        pre = kw.pop("preconditioner", None)
        seq = solvers.solve_sequence(
            jnp.stack([a, a]),
            jnp.stack([b, b]),
            recycle=1,
            preconditioner=None if pre is None else (lambda op: pre),
            throw=False,
            **kw,
        )
        # both systems agree on the outcome (the second is deflated and warm-started)
        first, second = (
            jax.tree_util.tree_map(lambda c: c[i], seq.result) for i in (0, 1)
        )
        ok = [r == solvers.RESULTS.successful for r in (first, second)]
        if case == "unattainable_rtol":
            assert first == second == solvers.RESULTS.inaccurate
        if not all(ok):
            assert case not in ("spd", "zero_rhs", "tiny_rhs", "huge_rhs"), ok
            return
        sol = jax.tree_util.tree_map(lambda x: x[1], seq)
        sol = solvers.CGSolution(
            x=sol.x,
            n_steps=sol.n_steps,
            residual_norms=jnp.zeros(1, dtype),
            converged=sol.converged,
            result=second,
        )
    if case == "unattainable_rtol":
        # not `converged` on the recursive residual: the true one is checked, and
        # the best iterate comes back with its true residual
        assert sol.result == solvers.RESULTS.inaccurate and not bool(sol.converged)
        a64, b64, x64 = (np.asarray(v, F64) for v in (a, b, sol.x))
        true = np.linalg.norm(b64 - a64 @ x64)
        last = float(sol.residual_norms[sol.n_steps])
        assert last > kw["rtol"] * np.linalg.norm(b64)
        # ... up to the rounding of evaluating b - A x in the dtype
        rounding = (
            len(b64)
            * kw["rtol"]
            * np.linalg.norm(np.abs(b64) + np.abs(a64) @ np.abs(x64))
        )
        assert abs(last - true) <= rounding, (last, true, rounding)
    if sol.result != solvers.RESULTS.successful:
        assert case not in ("spd", "zero_rhs", "tiny_rhs", "huge_rhs")
        return
    x = np.asarray(sol.x, F64)
    assert np.all(np.isfinite(x))
    ref = np.linalg.solve(np.asarray(a, F64), np.asarray(b, F64))
    assert _rel(x, ref) <= 1e3 * float(np.finfo(dtype).eps) ** 0.5


@pytest.mark.parametrize(
    "kw",
    [{"max_steps": 0}, {"max_steps": 2.5}, {"memory": 0, "flexible": True}],
    ids=["max_steps_0", "max_steps_float", "memory_0"],
)
def test_cg_bad_options(kw):
    with pytest.raises(ValueError, match="cg"):
        solvers.cg(_SPD4, np.ones(4), **kw)


@pytest.mark.parametrize(
    "b",
    [np.zeros(0), np.ones((2, 2)), np.ones(3), np.arange(4)],
    ids=["empty", "matrix", "wrong_size", "int"],
)
def test_cg_bad_rhs(b):
    with pytest.raises((ValueError, TypeError), match="cg"):
        solvers.cg(_SPD4, b)


def test_cg_derivative_solves_are_checked():
    # reproducer: the cotangent solve stopped at max_steps, 99.97% wrong, no error
    a = jnp.diag(jnp.geomspace(1.0, 1e-6, 40))
    b = jnp.zeros(40).at[0].set(1.0)
    with pytest.raises(RUNTIME_ERRORS):
        g = jax.grad(lambda b: solvers.cg(a, b, max_steps=5).x.sum())(b)
        jax.block_until_ready(g)
    # a primal that converges from a good warm start, whose cotangent solve does not
    a = jnp.diag(jnp.geomspace(1.0, 1e-3, 30))
    b = jnp.ones(30)
    x0 = jnp.linalg.solve(a, b)
    sol = solvers.cg(a, b, x0=x0, max_steps=3)
    assert sol.result == solvers.RESULTS.successful
    with pytest.raises(RUNTIME_ERRORS):
        g = jax.grad(lambda b: solvers.cg(a, b, x0=x0, max_steps=3).x.sum())(b)
        jax.block_until_ready(g)
    g = jax.grad(lambda b: solvers.cg(a, b, x0=x0, max_steps=3, throw=False).x.sum())(b)
    assert np.all(np.isnan(np.asarray(g)))  # throw=False: NaN, not a wrong number
    # and a converged one is exact
    g = jax.grad(lambda b: solvers.cg(a, b).x.sum())(b)
    np.testing.assert_allclose(g, np.linalg.solve(np.asarray(a).T, np.ones(30)))


def test_cg_non_symmetric_gradient_is_not_silent():
    a = jnp.array([[2.0, 1.0], [0.0, 3.0]])
    with pytest.raises(RUNTIME_ERRORS):
        jax.block_until_ready(jax.grad(lambda b: solvers.cg(a, b).x.sum())(jnp.ones(2)))


_LINEAR_SOLVERS = {
    "TrueResidualCG": jaxdecomp.TrueResidualCG,
    "TrueResidualGMRES": jaxdecomp.TrueResidualGMRES,
}


@pytest.mark.parametrize("solver", list(_LINEAR_SOLVERS))
@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", list(_cg_cases()))
def test_true_residual_linear_solver_edge(case, dtype, solver):
    """The CG edge cases through the lineax solvers behind `custom_root`'s
    iterative tangent solves: `successful` only with an accurate solution (true
    residual within rtol), a failure code otherwise; never NaN claimed converged."""
    a, b, kw = _cg_cases()[case]
    rtol = float(np.finfo(dtype).eps) ** (2 / 3)
    if kw.get("rtol") == "eps":
        rtol = float(np.finfo(dtype).eps)
    options = {}
    if kw.get("preconditioner") == "nan":
        options["preconditioner"] = lx.FunctionLinearOperator(
            lambda r: r * jnp.nan, jax.ShapeDtypeStruct(b.shape, dtype)
        )
    elif kw.get("preconditioner") == "zero":
        options["preconditioner"] = lx.FunctionLinearOperator(
            lambda r: 0 * r, jax.ShapeDtypeStruct(b.shape, dtype)
        )
    a, b = jnp.asarray(a, dtype), jnp.asarray(b, dtype)
    sol = lx.linear_solve(
        lx.MatrixLinearOperator(a),
        b,
        _LINEAR_SOLVERS[solver](rtol=rtol, max_steps=kw.get("max_steps")),
        options=options,
        throw=False,
    )
    ok = sol.result == lx.RESULTS.successful
    if case in ("spd", "zero_rhs", "tiny_rhs", "huge_rhs") or (
        case in ("indefinite", "non_symmetric") and solver == "TrueResidualGMRES"
    ):
        assert ok, sol.result
    if case in ("nan_rhs", "nan_operator", "nan_preconditioner", "zero_preconditioner"):
        assert not ok
    if case in ("unattainable_rtol", "max_steps_1"):
        assert not ok
    if not ok:
        return
    a64, b64, x64 = (np.asarray(v, F64) for v in (a, b, sol.value))
    assert np.all(np.isfinite(x64)) and sol.value.dtype == dtype
    # the true residual, up to the rounding of evaluating b - A x in the dtype
    rounding = (
        len(b64)
        * float(np.finfo(dtype).eps)
        * np.linalg.norm(np.abs(b64) + np.abs(a64) @ np.abs(x64))
    )
    assert np.linalg.norm(b64 - a64 @ x64) <= rtol * np.linalg.norm(b64) + rounding


@pytest.mark.parametrize(
    "kw",
    [
        {"rtol": 0.0},
        {"rtol": 1.5},
        {"rtol": "1e-5"},
        {"rtol": 1e-5, "max_steps": 0},
        {"rtol": 1e-5, "max_steps": 2.5},
    ],
    ids=["rtol_0", "rtol_1.5", "rtol_str", "max_steps_0", "max_steps_float"],
)
@pytest.mark.parametrize("solver", list(_LINEAR_SOLVERS))
def test_true_residual_linear_solver_bad_options(solver, kw):
    with pytest.raises(ValueError, match=solver):
        _LINEAR_SOLVERS[solver](**kw)


def test_true_residual_linear_solver_bad_dtype():
    with pytest.raises(ValueError, match="restart"):
        jaxdecomp.TrueResidualGMRES(rtol=1e-5, restart=0)
    a = jnp.eye(3, dtype=jnp.complex128)
    for solver in _LINEAR_SOLVERS.values():
        with pytest.raises(TypeError, match="real floating"):
            lx.linear_solve(
                lx.MatrixLinearOperator(a), jnp.ones(3, a.dtype), solver(1e-5)
            )


# --------------------------------------------------------------------------------------
# Optimal transport
# --------------------------------------------------------------------------------------


def _clouds(dtype, n=12, m=10, offset=0.0):
    rng = np.random.default_rng(0)
    return (rng.uniform(size=(n, 2)) + offset).astype(dtype), (
        rng.uniform(size=(m, 2)) + offset
    ).astype(dtype)


def _ot_cases():
    n, m = 12, 10
    return {
        "uniform": ({}, True),
        "tiny_mass": ({"a": np.full(n, 1e-6 / n), "b": np.full(m, 1e-6 / m)}, True),
        "huge_mass": ({"a": np.full(n, 1e6 / n), "b": np.full(m, 1e6 / m)}, True),
        # zero weights are padding (masked out), not an error
        "zero_weight": ({"a": np.r_[0.0, np.full(n - 1, 1 / (n - 1))]}, True),
        "zero_weights_both": (
            {
                "a": np.r_[np.zeros(3), np.full(n - 3, 1 / (n - 3))],
                "b": np.r_[np.full(m - 2, 1 / (m - 2)), np.zeros(2)],
            },
            True,
        ),
        "negative_weight": ({"a": np.r_[-0.1, np.full(n - 1, 1.1 / (n - 1))]}, False),
        "nan_weight": ({"a": np.r_[np.nan, np.full(n - 1, 1 / (n - 1))]}, False),
        "all_zero_weights": ({"a": np.zeros(n), "b": np.zeros(m)}, False),
        "unbalanced": ({"a": np.full(n, 2.0 / n)}, False),
        "epsilon_nan": ({"epsilon": np.nan}, False),
        "epsilon_huge": ({"epsilon": 1e6}, True),
    }


@eqx.filter_jit
def _ot_solve(solver, x, y, a, b, eps, batch_size=None, backend="xla"):
    # one compilation each
    geom = solvers.PointCloud(x, y, batch_size=batch_size, backend=backend)
    if solver == "sinkhorn_newton-recycle":  # deflated Newton-CG (recycle=4)
        return solvers.sinkhorn_newton(geom, a, b, epsilon=eps, throw=False, recycle=4)
    return getattr(solvers, solver)(geom, a, b, epsilon=eps, throw=False)


@pytest.mark.parametrize(
    "batch_size", [None, 5, "pallas"], ids=["dense", "online", "online-pallas"]
)
@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", list(_ot_cases()))
@pytest.mark.parametrize(
    "solver", ["sinkhorn", "sinkhorn_newton", "sinkhorn_newton-recycle"]
)
def test_ot_edge(solver, case, dtype, batch_size):
    backend = "xla"
    if batch_size == "pallas":  # the fused kernels (interpret mode on the CPU)
        batch_size, backend = 5, "pallas"
    kw, valid = _ot_cases()[case]
    x, y = _clouds(dtype)
    a = jnp.asarray(kw.get("a", np.full(x.shape[0], 1 / x.shape[0])), dtype)
    b = jnp.asarray(kw.get("b", np.full(y.shape[0], 1 / y.shape[0])), dtype)
    eps = jnp.asarray(kw.get("epsilon", 0.05), dtype)
    out = _ot_solve(
        solver, jnp.asarray(x), jnp.asarray(y), a, b, eps, batch_size, backend
    )
    if out.result != solvers.RESULTS.successful:
        assert not valid, out.result
        return
    assert valid, "invalid input accepted"
    p = np.asarray(out.plan(), F64)
    a = np.asarray(out.a, F64)
    b = np.asarray(out.b, F64)
    tol = float(np.finfo(dtype).eps) ** 0.5
    # the tolerance is relative to the mass, whatever the mass
    assert np.abs(p.sum(1) - a).sum() <= 10 * tol * a.sum()
    assert np.abs(p.sum(0) - b).sum() <= 10 * tol * a.sum()
    assert np.all(p[a == 0] == 0) and np.all(p[:, b == 0] == 0)
    assert np.all(np.isfinite(out.f)) and np.all(np.isfinite(out.g))


@eqx.filter_jit
def _divergence_and_grad(x, y, a, b, eps, batch_size=None):  # one compilation each
    def loss(x):
        out = solvers.sinkhorn_divergence(
            x, y, a, b, epsilon=eps, batch_size=batch_size, throw=False
        )
        return out.divergence, out

    return jax.value_and_grad(loss, has_aux=True)(x)


@pytest.mark.parametrize(
    "dtype, batch_size",
    [(F32, None), (F64, None), (F64, 5)],
    ids=["f32-dense", "f64-dense", "f64-online"],
)
@pytest.mark.parametrize("case", list(_ot_cases()))
def test_sinkhorn_divergence_edge(case, dtype, batch_size):
    # (float32 at epsilon 1e6 was a strict xfail until reg_ot_cost became the
    # semi-dual without epsilon * log(a): S came out -0.5 where float64 gives 0.02)
    kw, valid = _ot_cases()[case]
    x, y = _clouds(dtype)
    a = jnp.asarray(kw.get("a", np.full(x.shape[0], 1 / x.shape[0])), dtype)
    b = jnp.asarray(kw.get("b", np.full(y.shape[0], 1 / y.shape[0])), dtype)
    eps = jnp.asarray(kw.get("epsilon", 0.05), dtype)
    (value, out), grad = _divergence_and_grad(
        jnp.asarray(x), jnp.asarray(y), a, b, eps, batch_size
    )
    if out.result != solvers.RESULTS.successful:
        assert not valid, out.result
        assert not bool(out.converged)
        return
    assert valid, "invalid input accepted"
    tol = float(np.finfo(dtype).eps) ** 0.5
    mass = float(np.sum(np.asarray(a, F64)))
    for sol in (out.xy, out.xx, out.yy):  # each of the three solves is accurate
        p = np.asarray(sol.plan(), F64)
        assert np.abs(p.sum(1) - np.asarray(sol.a, F64)).sum() <= 10 * tol * mass
        assert np.abs(p.sum(0) - np.asarray(sol.b, F64)).sum() <= 10 * tol * mass
    # S >= 0 up to the solves' accuracy (scaled by the cost's size and the mass)
    assert np.isfinite(float(value)) and float(value) >= -10 * tol * mass
    grad = np.asarray(grad, F64)
    assert np.all(np.isfinite(grad))
    # a zero-weight point carries no mass: its gradient is exactly zero
    assert np.all(grad[np.asarray(a) == 0] == 0)


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", list(_ot_cases()))
def test_sparse_k_edge(case, dtype):
    # invalid problems raise a ValueError naming the function; valid ones give an
    # int in [8, m] (a static shape, so there is no result code to return)
    kw, valid = _ot_cases()[case]
    x, y = _clouds(dtype)
    a = np.asarray(kw.get("a", np.full(x.shape[0], 1 / x.shape[0])), dtype)
    b = np.asarray(kw.get("b", np.full(y.shape[0], 1 / y.shape[0])), dtype)
    eps = kw.get("epsilon", 0.05)
    geom = solvers.PointCloud(jnp.asarray(x), jnp.asarray(y))
    if not valid:
        with pytest.raises(ValueError, match="sparse_k"):
            solvers.sparse_k(geom, a, b, epsilon=eps)
        return
    k = solvers.sparse_k(geom, a, b, epsilon=eps)
    assert isinstance(k, int) and min(8, y.shape[0]) <= k <= y.shape[0]


def test_ot_tiny_mass_is_solved_as_accurately_as_unit_mass():
    x, y = _clouds(F64)
    geom = solvers.PointCloud(jnp.asarray(x), jnp.asarray(y))
    unit = solvers.sinkhorn(geom, epsilon=1e-2)
    s = 1e-6
    tiny = solvers.sinkhorn(
        geom, jnp.full(12, s / 12), jnp.full(10, s / 10), epsilon=1e-2
    )
    np.testing.assert_allclose(tiny.plan() / s, unit.plan(), rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(tiny.transport_cost / s, unit.transport_cost, rtol=1e-6)
    ga = jax.grad(
        lambda x: (
            solvers.sinkhorn(
                solvers.PointCloud(x, jnp.asarray(y)),
                jnp.full(12, s / 12),
                jnp.full(10, s / 10),
                epsilon=1e-2,
            ).reg_ot_cost
        )
    )(jnp.asarray(x))
    gu = jax.grad(
        lambda x: (
            solvers.sinkhorn(
                solvers.PointCloud(x, jnp.asarray(y)), epsilon=1e-2
            ).reg_ot_cost
        )
    )(jnp.asarray(x))
    np.testing.assert_allclose(ga / s, gu, rtol=1e-5, atol=1e-10)


def test_pointcloud_float32_far_from_origin():
    x, y = _clouds(F64, offset=1e3)
    x32, y32 = x.astype(F32), y.astype(F32)
    c = solvers.PointCloud(jnp.asarray(x32), jnp.asarray(y32)).cost_matrix
    ref = ((x32.astype(F64)[:, None] - y32.astype(F64)[None]) ** 2).sum(-1)
    assert np.abs(np.asarray(c, F64) - ref).max() <= 1e-5 * max(ref.max(), 1)
    out = solvers.sinkhorn(
        solvers.PointCloud(jnp.asarray(x32), jnp.asarray(y32)), epsilon=0.05
    )
    out64 = solvers.sinkhorn(
        solvers.PointCloud(jnp.asarray(x32.astype(F64)), jnp.asarray(y32.astype(F64))),
        epsilon=0.05,
    )
    np.testing.assert_allclose(out.transport_cost, out64.transport_cost, rtol=1e-3)


@pytest.mark.parametrize(
    "args",
    [
        (np.zeros((0, 2)), np.ones((3, 2))),
        (np.ones((3, 2)), np.ones((3, 3))),
        (np.ones(3), np.ones(3)),
        (np.ones((3, 2), np.int32), np.ones((3, 2), np.int32)),
    ],
    ids=["empty", "dim_mismatch", "vectors", "int"],
)
def test_pointcloud_bad_input(args):
    with pytest.raises((ValueError, TypeError), match="PointCloud"):
        solvers.PointCloud(jnp.asarray(args[0]), jnp.asarray(args[1]))


# --------------------------------------------------------------------------------------
# Implicit differentiation
# --------------------------------------------------------------------------------------


def test_custom_root_check_is_scale_invariant_and_ignores_x0():
    def F(x, t):
        return x**3 - t

    @jaxdecomp.custom_root(F)
    def bad(x0, t):  # stops at residual ~0.6, whatever x0
        return jnp.cbrt(t) + 0.6 / (3 * jnp.cbrt(t) ** 2)

    @jaxdecomp.custom_root(F)
    def good(x0, t):
        return jnp.cbrt(t)

    t = jnp.asarray(8.0)
    for x0 in (jnp.asarray(1e4), jnp.asarray(0.0), jnp.asarray(2.0)):
        with pytest.raises(RUNTIME_ERRORS):
            jax.block_until_ready(jax.grad(lambda t: bad(x0, t))(t))
        np.testing.assert_allclose(jax.grad(lambda t: good(x0, t))(t), 1 / 12)

    # rescaling F does not change the verdict
    @jaxdecomp.custom_root(lambda x, t: 1e-12 * (x**3 - t))
    def bad_scaled(x0, t):
        return jnp.cbrt(t) + 0.6 / (3 * jnp.cbrt(t) ** 2)

    with pytest.raises(RUNTIME_ERRORS):
        jax.block_until_ready(jax.grad(lambda t: bad_scaled(0.0, t))(t))


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", ["regular", "singular", "nan_root", "zero_tangent"])
@pytest.mark.parametrize("fn", ["root_jvp", "root_vjp"])
def test_root_products_edge(fn, case, dtype):
    """jaxdecomp.root_jvp / root_vjp at F(x, t) = x^3 - t: exact where the Jacobian
    is regular, an error (never inf/NaN) where it is singular (root at 0) or the
    root is NaN, zero for a zero tangent; dtype preserved."""

    def F(x, t):
        return x**3 - t

    t = jnp.asarray([8.0, 27.0], dtype)
    x = jnp.cbrt(t)
    v = jnp.ones(2, dtype)
    if case == "singular":
        x, t = jnp.zeros(2, dtype), jnp.zeros(2, dtype)
    elif case == "nan_root":
        x = x.at[0].set(jnp.nan)
    elif case == "zero_tangent":
        v = jnp.zeros(2, dtype)

    def run():
        if fn == "root_jvp":
            return jaxdecomp.root_jvp(F, x, (t,), (v,))
        return jaxdecomp.root_vjp(F, x, (t,), v)[0]

    if case in ("singular", "nan_root"):
        with pytest.raises(RUNTIME_ERRORS):
            jax.block_until_ready(run())
        return
    out = run()
    assert out.dtype == dtype
    expected = np.asarray(v, F64) / (3 * np.asarray(x, F64) ** 2)
    np.testing.assert_allclose(out, expected, rtol=10 * float(np.finfo(dtype).eps))


def test_custom_root_root_at_zero_is_accepted():
    @jaxdecomp.custom_root(lambda x, t: x - t, symmetric=True)
    def solve(x0, t):
        return t

    assert float(jax.grad(lambda t: solve(0.0, t))(jnp.asarray(0.0))) == 1.0


# --------------------------------------------------------------------------------------
# Low-rank training from singular cores
# --------------------------------------------------------------------------------------


_DLRT_X = jax.random.normal(jax.random.key(1), (32, 12), dtype=jnp.float32)
_DLRT_Y = _DLRT_X @ jax.random.normal(jax.random.key(2), (12, 8), dtype=jnp.float32)
_DLRT = lowrank.dlrt(0.05, tau=0.05)


def _dlrt_loss(m):
    return jnp.mean((jax.vmap(m)(_DLRT_X) - _DLRT_Y) ** 2)


@eqx.filter_jit
def _dlrt_step(layer, state):  # one compilation for every case
    updates, state = _DLRT.update(jax.grad(_dlrt_loss)(layer), state, layer)
    layer = optax.apply_updates(layer, updates)
    return layer, state, _dlrt_loss(layer)


def _dlrt_steps(layer, steps=3):
    state = _DLRT.init(layer)
    losses = [float(_dlrt_loss(layer))]
    for _ in range(steps):
        layer, state, loss = _dlrt_step(layer, state)
        losses.append(float(loss))
    return layer, losses


@pytest.mark.parametrize(
    "make",
    [
        lambda m: eqx.tree_at(lambda lyr: lyr.s, m, jnp.zeros_like(m.s)),
        lambda m: eqx.tree_at(lambda lyr: lyr.s, m, m.s.at[1, 1].set(0.0)),
        lambda m: m.with_rank(0),
        lambda m: eqx.tree_at(lambda lyr: lyr.s, m, m.s.at[4:, 4:].set(0.0)).with_rank(
            6
        ),
    ],
    ids=["zero_core", "singular_core", "rank_0", "with_rank_past_trained"],
)
def test_dlrt_singular_core_stays_finite(make):
    layer = lowrank.LowRankLinear(
        12, 8, 6, rank=3, dtype=jnp.float32, key=jax.random.key(0)
    )
    layer = make(layer)
    layer, losses = _dlrt_steps(layer)
    assert np.all(np.isfinite(np.asarray(layer.weight)))
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]


# ------------------------------------------------- matrix-root optimizers (optim)


def _optim_grad(case, dtype):
    rng = np.random.default_rng(0)
    g = rng.standard_normal((12, 8))
    u, _, vt = np.linalg.svd(g, full_matrices=False)
    return {
        "zero": np.zeros((12, 8)),
        "rank_deficient_rank1": np.outer(
            rng.standard_normal(12), rng.standard_normal(8)
        ),
        "ill_conditioned_1e12": (u * np.logspace(0, -12, 8)) @ vt,
        "scale_tiny_1e-30": 1e-30 * g,
        "scale_huge_1e30": 1e30 * g,
        "nonfinite_nan": np.where(np.arange(96).reshape(12, 8) == 5, np.nan, g),
        "nonfinite_inf": np.where(np.arange(96).reshape(12, 8) == 5, np.inf, g),
    }[case].astype(dtype)


_OPTIMIZERS = {
    "muon": lambda throw: jaxdecomp.optim.muon(0.02, throw=throw),
    "muon-bf16x3": lambda throw: jaxdecomp.optim.muon(
        0.02, throw=throw, precision="bf16x3"
    ),
    "shampoo": lambda throw: jaxdecomp.optim.shampoo(
        1e-3, block_size=5, precondition_every=1, throw=throw
    ),
    "shampoo_4bit": lambda throw: jaxdecomp.optim.shampoo(
        1e-3, block_size=5, precondition_every=1, quantize="4bit", throw=throw
    ),
    "soap": lambda throw: jaxdecomp.optim.soap(
        1e-3, block_size=5, precondition_every=1, throw=throw
    ),
}
_OPTIM_CASES = [
    "zero",
    "rank_deficient_rank1",
    "ill_conditioned_1e12",
    "scale_tiny_1e-30",
    "scale_huge_1e30",
    "nonfinite_nan",
    "nonfinite_inf",
]


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", _OPTIM_CASES)
@pytest.mark.parametrize("name", sorted(_OPTIMIZERS))
def test_optim_edge(name, case, dtype):
    # a (12, 8) weight (blocks of 4-5 rows/columns, uneven), a bias and a scalar;
    # two steps, the second with a refresh: finite updates in the parameter's dtype,
    # or, for NaN/inf gradients, an error (throw=True) / a skipped step with the
    # code (throw=False)
    params = {
        "w": jnp.zeros((12, 8), dtype),
        "b": jnp.zeros((8,), dtype),
        "s": jnp.zeros((), dtype),
    }
    grads = {
        "w": jnp.asarray(_optim_grad(case, dtype)),
        "b": jnp.ones((8,), dtype),
        "s": jnp.ones((), dtype),
    }
    # squares of 1e30 overflow float32: Shampoo's and SOAP's statistics (Muon keeps no
    # squares) -> the `overflow` code, never an inf in the state or a NaN update
    overflows = (
        case == "scale_huge_1e30" and dtype == F32 and not name.startswith("muon")
    )
    codes = jaxdecomp.optim.RESULTS
    with jax.numpy_dtype_promotion("standard"):  # optax's Adam inside muon
        if case.startswith("nonfinite") or overflows:
            message, code = (
                ("overflowed", codes.overflow)
                if overflows
                else ("NaN or inf", codes.nonfinite_gradient)
            )
            opt = _OPTIMIZERS[name](True)
            state = opt.init(params)
            with pytest.raises(RUNTIME_ERRORS, match=message):
                jax.block_until_ready(jax.jit(opt.update)(grads, state, params))
            opt = _OPTIMIZERS[name](False)
            update = jax.jit(opt.update)
            up, state = update(grads, opt.init(params), params)
            # (muon's vectors go to optax's AdamW, which is not guarded: documented)
            for leaf in [up["w"]] if name.startswith("muon") else jax.tree.leaves(up):
                np.testing.assert_array_equal(leaf, 0)
            inner = (
                state.inner_states["muon"].inner_state[0]
                if name.startswith("muon")
                else state[0]
            )
            assert inner.result == code
            assert int(inner.count) == 0  # the step was skipped
            return
        opt = _OPTIMIZERS[name](True)
        state = opt.init(params)
        update = jax.jit(opt.update)
        for _ in range(2):
            up, state = update(grads, state, params)
    for leaf in jax.tree.leaves(up):
        assert leaf.dtype == dtype
        assert np.all(np.isfinite(np.asarray(leaf))), (name, case)
    for leaf in jax.tree.leaves(state):
        if jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.floating):
            assert np.all(np.isfinite(np.asarray(leaf))), (name, case)
    if case == "zero":
        np.testing.assert_array_equal(up["w"], 0)


def test_optim_empty_and_1x1_parameters():
    params = {"e": jnp.zeros((0, 4)), "one": jnp.ones((1, 1)), "w": jnp.ones((3, 2))}
    grads = {"e": jnp.zeros((0, 4)), "one": jnp.full((1, 1), 2.0), "w": jnp.eye(3, 2)}
    for opt in (
        jaxdecomp.optim.muon(0.1),
        jaxdecomp.optim.shampoo(0.1),
        jaxdecomp.optim.shampoo(0.1, quantize="4bit"),
        jaxdecomp.optim.soap(0.1),
    ):
        with jax.numpy_dtype_promotion("standard"):
            up, _ = jax.jit(opt.update)(grads, opt.init(params), params)
        assert up["e"].shape == (0, 4)
        assert np.all(np.isfinite(np.asarray(up["one"]))) and float(up["one"][0, 0]) < 0
