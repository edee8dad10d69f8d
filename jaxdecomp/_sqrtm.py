r"""Square roots and inverse square roots of symmetric positive (semi)definite matrices.

One internal primitive, `_sqrt_pair`, computes $X = A^{1/2}$ and/or $Y = A^{-1/2}$ by
one of four forward methods and carries a `custom_jvp` rule: $dX$ solves the Lyapunov
equation $X\,dX + dX\,X = dA$ and $dY = -Y\,dX\,Y$ (or, for $Y$ alone,
$Y\,dY + dY\,Y = -Y^2\,dA\,Y^2$). The Lyapunov solve goes through
`lax.custom_linear_solve`, so forward mode, reverse mode and higher orders all work
and stay finite at repeated eigenvalues.
"""

from __future__ import annotations

import functools as ft
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ._lyapunov import eig_solver, lyapunov_linear_solve, ns_solver
from ._matmul import Precision, check_precision, scheme_matmul
from ._misc import (
    check_matrix,
    default_tol,
    eye_like,
    fro,
    mm,
    mT,
    safe_reciprocal,
    sym,
)
from ._newton_schulz import coupled_sqrt, mixed_sqrt
from ._rayleigh_ritz import eigh_functions
from ._solution import RESULTS, MatrixFunctionSolution

_METHODS = ("auto", "eigh", "newton_schulz", "mixed", "pade", "taylor")
_BACKWARDS = ("auto", "eigh", "newton_schulz")
_Method = Literal["auto", "eigh", "newton_schulz", "mixed", "pade", "taylor"]

# Song et al. (ICLR 2022): Taylor polynomial of degree 10 (MTP) and the [5/5] Pade
# approximant (MPA) of (1 - z)^(+-1/2), applied to z = I - A / ||A||_F.
TAYLOR_DEGREE = 10
PADE_DEGREE = 5


@ft.cache
def _taylor_coeffs(power: float, degree: int) -> np.ndarray:
    """Taylor coefficients of (1 - z)^power at 0."""
    c = [1.0]
    for k in range(1, degree + 1):
        c.append(c[-1] * (k - 1 - power) / k)  # binom(power, k) (-1)^k recursion
    return np.array(c)


@ft.cache
def _pade_coeffs(power: float, m: int) -> tuple[np.ndarray, np.ndarray]:
    """[m/m] Pade approximant P(z) / Q(z) of (1 - z)^power (q_0 = 1)."""
    a = _taylor_coeffs(power, 2 * m)
    # sum_{j=0}^{m} q_j a_{k-j} = 0 for k = m+1..2m, with q_0 = 1.
    rows = range(m + 1, 2 * m + 1)
    mat = np.array([[a[k - j] for j in range(1, m + 1)] for k in rows])
    q = np.concatenate([[1.0], np.linalg.solve(mat, -a[m + 1 : 2 * m + 1])])
    p = np.array([sum(q[j] * a[k - j] for j in range(0, k + 1)) for k in range(m + 1)])
    return p, q


def _series(z: Array, coeffs: np.ndarray) -> Array:
    """sum_k c_k z^k by Horner's rule (matmuls at HIGHEST)."""
    eye = eye_like(z)
    out = float(coeffs[-1]) * eye
    for c in coeffs[-2::-1]:
        out = mm(out, z) + float(c) * eye
    return out


def _song(a: Array, method: str, want_sqrt: bool, want_inv: bool):
    """Song et al.'s MTP / MPA forward passes (normalised by ||A||_F)."""
    norm = fro(a)[..., None, None]
    z = eye_like(a) - a / norm
    x = y = None
    if method == "taylor":
        if want_sqrt:
            x = _series(z, _taylor_coeffs(0.5, TAYLOR_DEGREE)) * jnp.sqrt(norm)
        if want_inv:
            y = _series(z, _taylor_coeffs(-0.5, TAYLOR_DEGREE)) / jnp.sqrt(norm)
    else:
        p, q = _pade_coeffs(0.5, PADE_DEGREE)
        pz, qz = _series(z, p), _series(z, q)
        if want_sqrt:
            x = jnp.linalg.solve(qz, pz) * jnp.sqrt(norm)
        if want_inv:
            y = jnp.linalg.solve(pz, qz) / jnp.sqrt(norm)
    return x, y


def _sqrt_and_divided_differences(d):
    """sqrt(d) and its divided differences 1 / (s_i + s_j)."""
    s = jnp.sqrt(jnp.maximum(d, 0.0))
    return s, safe_reciprocal(s[..., :, None] + s[..., None, :])


def _inv_sqrt_and_divided_differences(d):
    """1 / sqrt(d) and its divided differences -1 / (s_i s_j (s_i + s_j))."""
    s = jnp.sqrt(jnp.maximum(d, 0.0))
    si, sj = s[..., :, None], s[..., None, :]
    return 1 / s, -safe_reciprocal(si * sj * (si + sj))


class _Config(eqx.Module):
    method: str = eqx.field(static=True)
    backward: str = eqx.field(static=True)
    want_sqrt: bool = eqx.field(static=True)
    want_inv: bool = eqx.field(static=True)
    tol: float = eqx.field(static=True)
    max_steps: int = eqx.field(static=True)
    precision: str = eqx.field(static=True, default="highest")


@eqx.filter_custom_jvp
def _sqrt_pair(a, *, cfg: _Config):
    """Returns (x, y, v, mu, w, n_steps, error measure); unused entries are zeros.
    The error measure (Newton-Schulz: ||ZY - I||_F / sqrt(n); mixed: the
    extrapolated last correction) sees eigenvalues that the iteration has not
    resolved, which the residual ||X^2 - A|| hides."""
    n_steps = jnp.asarray(0)
    est = jnp.zeros((), a.dtype)
    v = mu = w = jnp.zeros((), a.dtype)
    if cfg.method == "eigh":
        w, v = jnp.linalg.eigh(a)
        fns = []
        if cfg.want_sqrt:
            fns.append(_sqrt_and_divided_differences)
        if cfg.want_inv:
            fns.append(_inv_sqrt_and_divided_differences)
        values, d = eigh_functions(a, w, v, fns)
        x = values[0] if cfg.want_sqrt else None
        y = values[-1] if cfg.want_inv else None
        s = jnp.sqrt(jnp.maximum(d, 0.0))
        mu = s if cfg.want_sqrt else 1 / s
    elif cfg.method == "newton_schulz":
        # ||ZY - I|| is the error measure: it sees unresolved eigenvalues
        matmul, unit = scheme_matmul(cfg.precision, a.dtype)
        x, y, n_steps, est = coupled_sqrt(a, cfg.tol, cfg.max_steps, matmul, unit=unit)
        x, y = sym(x), sym(y)
    elif cfg.method == "mixed":
        matmul, _ = scheme_matmul(cfg.precision, a.dtype)
        x, y, n_steps, _, est = mixed_sqrt(
            a, cfg.tol, cfg.max_steps, cfg.want_inv, matmul
        )
        y = y if cfg.want_inv else None
    else:
        x, y = _song(a, cfg.method, True, cfg.want_inv)
    zero = jnp.zeros((), a.dtype)
    x = zero if x is None else x
    y = zero if y is None else y
    return x, y, v, mu, w, n_steps, est


@_sqrt_pair.def_jvp
def _sqrt_pair_jvp(primals, tangents, *, cfg: _Config):
    (a,) = primals
    (da,) = tangents
    out = _sqrt_pair(a, cfg=cfg)
    x, y, v, mu, _, _, _ = out
    da = sym(da)
    if cfg.method == "eigh" and not cfg.want_sqrt:
        # Y alone: Y dY + dY Y = -Y^2 dA Y^2, solved in the eigenbasis of Y.
        y2 = mm(y, y)
        dy = lyapunov_linear_solve(y, -mm(mm(y2, da), y2), eig_solver(v, mu), parity=1)
        dx = None
    else:
        backward = cfg.backward
        if backward == "auto":
            backward = "eigh" if cfg.method == "eigh" else "newton_schulz"
        if backward == "eigh":
            if cfg.method == "eigh":
                solve = eig_solver(v, mu)
            else:
                mu_x, v_x = jnp.linalg.eigh(jax.lax.stop_gradient(x))
                solve = eig_solver(v_x, mu_x)
        else:
            solve = ns_solver(
                jax.lax.stop_gradient(x),
                cfg.tol,
                cfg.max_steps,
                True,
                parity=1,
                precision=cfg.precision,
            )
        dx = lyapunov_linear_solve(x, da, solve, parity=1)
        dy = -mm(mm(y, dx), y) if cfg.want_inv else None
    # x feeds the rule itself, so its tangent must be right even when only y is wanted.
    t_out = (dx, dy, None, None, None, None, None)
    return out, t_out


def _validate(a: Array, name: str) -> tuple[Array, RESULTS]:
    """Symmetrise, and classify bad input (a result code, checked at run time)."""
    eps_half = default_tol(a.dtype, 0.5)
    finite = jnp.all(jnp.isfinite(a))
    norm = fro(a)
    asym = fro(a - mT(a)) > eps_half * norm
    negdiag = jnp.any(jnp.diagonal(a, axis1=-2, axis2=-1) < -eps_half * norm[..., None])
    result = RESULTS.where(jnp.any(negdiag), RESULTS.indefinite, RESULTS.successful)
    result = RESULTS.where(jnp.any(asym), RESULTS.not_symmetric, result)
    result = RESULTS.where(~finite, RESULTS.nonfinite_input, result)
    # Keep NaN out of the iterations (their result is discarded/raised on anyway).
    a = jnp.where(finite, sym(a), eye_like(a))
    return a, result


def inverse_root_check(result, residual_fn, w, dtype, always: bool):
    """(result, residual): `singular` unless `residual_fn()`, the relative residual of
    an inverse root's defining equation (||Y A Y - I||_F / sqrt(n), ||Z^p A - I||),
    is at most 10 sqrt(eps). An eigenvalue that is zero or below the rounding level
    breaks it. Given the eigenvalues `w` (eigh; None otherwise) the residual is only
    computed (`lax.cond`) when they say it can exceed the bound, kappa > 0.1 /
    sqrt(eps) or lambda_min <= 0 (it grows like kappa eps), unless `always`."""
    eps_half = default_tol(dtype, 0.5)

    def residual():
        return jnp.max(residual_fn()).astype(dtype)

    if w is None or always:
        res = residual()
    else:
        wmax = jnp.max(jnp.abs(w), axis=-1)
        ill = jnp.any(~(wmax * eps_half < 0.1 * jnp.min(w, axis=-1)))  # also NaN
        res = jax.lax.cond(ill, residual, lambda: jnp.zeros((), dtype))
    bad = ~(res <= 10 * eps_half)  # NaN counts as bad
    result = RESULTS.where(
        (result == RESULTS.successful) & bad, RESULTS.singular, result
    )
    return result, res


def _choose_method(method: str) -> str:
    if method != "auto":
        return method
    # Measured on an H100 (benchmarks/RESULTS.md, float32, forward + backward):
    # eigh at HIGHEST precision is 1.3-2.4x faster than Newton-Schulz at n = 64..512
    # and equally accurate in the value, so "auto" is eigh on every backend.
    return "eigh"


def _sqrtm_impl(
    a, name, method, backward, tol, max_steps, precision, throw, full_output, want
):
    a = check_matrix(a, name, square=True)
    check_precision(precision, name)
    if method not in _METHODS:
        raise ValueError(f"{name}: method must be one of {_METHODS}; got {method!r}.")
    if backward not in _BACKWARDS:
        raise ValueError(
            f"{name}: backward must be one of {_BACKWARDS}; got {backward!r}."
        )
    if not (isinstance(max_steps, int) and max_steps > 0):
        raise ValueError(f"{name}: max_steps must be a positive int; got {max_steps}.")
    method = _choose_method(method)
    tol = 10 * default_tol(a.dtype, 1.0) if tol is None else float(tol)
    cfg = _Config(
        method, backward, want != "inv", want != "sqrt", tol, max_steps, precision
    )
    a, result = _validate(a, name)
    x, y, _, _, w, n_steps, est = _sqrt_pair(a, cfg=cfg)
    eps_half = default_tol(a.dtype, 0.5)
    bound = 10 * eps_half  # the accuracy every checked result must have
    if method == "eigh":
        wmax = jnp.max(jnp.abs(w), axis=-1)
        indefinite = jnp.any(jnp.min(w, axis=-1) < -eps_half * wmax)
        result = RESULTS.where(
            (result == RESULTS.successful) & indefinite, RESULTS.indefinite, result
        )
    iterative = method in ("newton_schulz", "mixed")
    a_ = jax.lax.stop_gradient(a)
    residual = None
    # The square root: eigh is backward stable, and its value is as accurate as the
    # conditioning allows (indefiniteness is caught above). The iterations must also
    # have resolved every eigenvalue, which their error measure sees and the
    # residual does not.
    if want != "inv" and (iterative or full_output):
        xs = jax.lax.stop_gradient(x)
        residual = jnp.max(fro(mm(xs, xs) - a_) / fro(a_))
        if iterative:
            bad = ~(residual <= bound) | ~(est <= bound)  # NaN counts as bad
            code = RESULTS.where(
                jnp.asarray(n_steps >= max_steps),
                RESULTS.max_steps_reached,
                RESULTS.inaccurate,
            )
            result = RESULTS.where((result == RESULTS.successful) & bad, code, result)
    if want != "sqrt" and method in ("eigh", "newton_schulz", "mixed"):

        def inv_residual():  # ||Y A Y - I||_F / sqrt(n)
            ys = jax.lax.stop_gradient(y)
            return fro(mm(mm(ys, a_), ys) - eye_like(a_)) / jnp.sqrt(a.shape[-1])

        w_ = w if method == "eigh" else None
        result, inv_res = inverse_root_check(
            result, inv_residual, w_, a.dtype, full_output and want == "inv"
        )
        residual = inv_res if want == "inv" else residual
    value = {"sqrt": x, "inv": y, "both": (x, y)}[want]
    if throw:
        value = result.error_if(value, result != RESULTS.successful)
    if full_output:
        return MatrixFunctionSolution(value, result, n_steps, residual)
    return value


_DOC_COMMON = r"""
    **Methods** (`method`):

    - `"eigh"`: $A = V \Lambda V^T$, $f(A) = V f(\Lambda) V^T$; LAPACK-fast on
        CPU. Below float64, when some matrix in the batch has
        $\lambda_{\max}/\lambda_{\min} > 2000$, the basis is corrected once
        (Rayleigh–Ritz): with $M = V^T A V = \operatorname{diag}(d) + O$ formed at
        HIGHEST precision, $f(A) = V[\operatorname{diag}(f(d)) + O \circ
        f[d_i, d_j]]V^T$ to first order ($f[\cdot,\cdot]$ the divided
        differences). That costs 3-4 more matmuls and gives 10-15x less error in
        float32 at $\kappa \ge 10^4$ (a plain float32 eigh is 3.4-4.9e-5 wrong in
        $A^{1/2}$ at $\kappa = 10^5$, the corrected one 1.7-5.9e-6). Semidefinite
        input is allowed (eigenvalues down to $-\sqrt{\varepsilon}\|A\|$ are
        clamped to 0) for the square root.
    - `"newton_schulz"`: the coupled iteration $Y_{k+1} = Y_k\,q_k(Z_kY_k)$,
        $Z_{k+1} = q_k(Z_kY_k)\,Z_k$ from $Y_0 = A/c$, $Z_0 = I$
        ($c \ge \lambda_{\max}$),
        with $x\,q_k(x^2)$ the optimal odd quintic for the current spectral interval
        (Polar Express style), then the classical quintic, to tolerance `tol` or the
        rounding floor. Matmuls only (HIGHEST precision): the GPU method. About 8 steps
        (32 matmuls) for condition numbers up to 1e6.
    - `"mixed"`: mixed precision, for GPUs whose bfloat16 tensor cores are ~15x
        faster than float32 at HIGHEST precision. (1) The same coupled iteration in
        low precision (bfloat16 operands with float32 accumulation for float32 input;
        float32 for float64 input) on $A/c + \delta I$ ($\delta$ a quarter of the
        low-precision unit roundoff keeps the rounded matrix definite; polynomial
        arguments damped by 1.01 as in Polar Express, without which the bfloat16
        iteration diverges). (2) Newton refinement $X \leftarrow X + E$ with the
        residual $R = A/c - X^2$ in the working precision (HIGHEST, or the
        `precision` scheme) and
        $X E + E X = R$ solved by the sign iteration in low precision, until the
        correction $\|E\|_F/\|X\|_F \le$ `tol` or it stops shrinking at the
        rounding floor (3-9 steps for $\kappa \le 10^5$). (3) $A^{-1/2}$, when asked
        for, by Newton–Schulz inversion of $X$ in the working precision from the
        low-precision $Z$. The refinement corrects the low-precision errors, so the
        result is more accurate than `"newton_schulz"` (float32, $n \le 1024$,
        $\kappa \le 10^5$: $\le 4.8 \times 10^{-6}$ measured; the bfloat16-only
        iteration is 1e-2 wrong). Designed, like `"newton_schulz"`, for
        $\kappa \le 10^6$: beyond it the low-precision correction resolves the
        smallest eigenvalues slowly (refinement runs up to `max_steps`) and the
        accuracy along them is not guaranteed. On CPUs bfloat16 is emulated and this
        method is ~10x slower than `"newton_schulz"`; its GPU speed is not measured
        yet (see `benchmarks/RESULTS.md`).
    - `"pade"`, `"taylor"`: Song et al.'s MPA ([5/5] Padé) and MTP (degree 10 Taylor)
        of $(1 - z)^{\pm 1/2}$ at $z = I - A/\|A\|_F$, faithful to the paper. They
        are approximations: accurate only when the spectrum of $A/\|A\|_F$ is close to
        1 (small $n$, well-conditioned); no residual check is applied to them.
    - `"auto"` (default): `"eigh"` on every backend. On an H100 (float32, batch 256,
        forward + backward, before the Rayleigh–Ritz correction) it was 1.3-2.4x
        faster than `"newton_schulz"` for $n = 32..512$ at equal accuracy of the
        value; choose `"newton_schulz"` for a 10x more accurate float32 gradient
        there.

    **Derivatives:** a `custom_jvp` rule. $dX$ solves the Lyapunov equation
    $X\,dX + dX\,X = dA$ (with $dA$ symmetrised), by `backward="eigh"` (reusing the
    forward eigendecomposition: divided differences $1/(\sqrt{\lambda_i} +
    \sqrt{\lambda_j})$, finite at repeated eigenvalues and at the identity) or
    `"newton_schulz"` (the matrix-sign iteration run to `tol`, matmuls only: 7 per
    step, using that $dA$ and $dX$ are symmetric; about 7 steps in float32);
    `"auto"` matches the forward method (Newton–Schulz for `"pade"`/`"taylor"`, as
    Song et al.'s MPA-Lya, but converged). Forward, reverse and higher-order
    derivatives all work. For `"pade"`/`"taylor"` the derivative is that of the exact
    root at the computed value (the paper's choice), not of the approximation.

    **Failure modes:** non-square, non-float or integer input raises at trace time.
    At run time (`throw=True`, via `eqx.error_if`, also under `jit`): NaN/inf input,
    a non-symmetric input ($\|A - A^T\|_F > \sqrt{\varepsilon}\|A\|_F$), an
    indefinite input (a negative diagonal entry, or for `"eigh"` an eigenvalue below
    $-\sqrt{\varepsilon}\|A\|$), an iterative result whose relative residual
    $\|X^2 - A\|_F/\|A\|_F$ or error measure (which sees eigenvalues the iteration
    has not resolved: $\|ZY - I\|_F/\sqrt n$ for Newton–Schulz, the extrapolated
    last correction for `"mixed"`) exceeds $10\sqrt{\varepsilon}$ (`inaccurate`,
    e.g. Newton–Schulz on an indefinite, semidefinite or extremely ill-conditioned
    matrix), and an inverse root with $\|YAY - I\|_F/\sqrt n > 10\sqrt{\varepsilon}$
    (`singular`: a zero eigenvalue, or one below the rounding level). The derivative
    of $A^{1/2}$ at semidefinite input is finite: the null-space block of $dA$, where
    the true derivative is infinite, is dropped (exact along perturbations that keep
    the null space, e.g. $dA = dB\,B^T + B\,dB^T$ for $A = BB^T$).
    With `throw=False` the value is returned as computed; pass `full_output=True` to
    get a [`jaxdecomp.MatrixFunctionSolution`][] with the result code, step count and
    residual.

    **Tensor-core precision** (`precision`): a float32 matmul at `HIGHEST`
    precision runs on a GPU's CUDA cores (H100: 67 TFLOP/s), one pass on its tensor
    cores is 1e-3 (bfloat16) or 3e-4 (TF32, the default float32 matmul there) wrong.
    The split schemes write each float32 operand as a sum of bfloat16 or TF32 parts
    and add the exact products of the parts in float32 (as CUTLASS's 3xTF32 and
    XLA's `BF16_BF16_F32_X3/X6`): `"bf16x6"` (3 bfloat16 parts, 6 products: float32
    accuracy, 0.7e-7 .. 2.5e-7 relative per matmul at $n = 64..1024$), `"tf32x3"`
    (2 TF32 parts, 3 products: 1.6e-7 .. 4e-7) and `"bf16x3"` (2 bfloat16 parts, 3
    products: 4.4e-6, not float32-accurate; `"newton_schulz"`'s square root is
    then about 1e-4 wrong, `"mixed"`'s 7e-6 .. 1e-5). With `"tf32x3"` or
    `"bf16x6"` every path is as accurate as with `"highest"` (float32,
    $\kappa = 10^3$, $n = 64..512$: within 2x, measured on the CPU); `"mixed"` with
    them runs entirely on tensor cores; at $\kappa = 10^5$ `"newton_schulz"` loses
    2-4x with them (2e-5 .. 4e-5), `"mixed"` at most 1.7x (4.4e-6 .. 7.2e-6). The
    parts and products are formed in JAX, so the numerics are the same on every
    backend (up to the order of float32 sums) and the CPU measures them; on CPUs the
    schemes are only slower. Accuracy tables (and on GPUs, once measured, the
    times): `benchmarks/RESULTS.md`.

    **Precision:** float32 and float64, dtype preserved. In float32 (measured on the
    CPU, $n \le 1024$, $\kappa \le 10^5$) the relative error of $A^{1/2}$ is at most
    6e-6 for `"eigh"` and `"mixed"` and 1.6e-5 for `"newton_schulz"`; $A^{-1/2}$ is
    $\kappa$ times worse conditioned (`"eigh"`: about $5 \cdot 10^{-9}\kappa$).
    See the benchmark tables.
"""

_ARGS_COMMON = """
    - `method`: `"auto"`, `"eigh"`, `"newton_schulz"`, `"mixed"`, `"pade"` or
        `"taylor"`.
    - `backward`: `"auto"`, `"eigh"` or `"newton_schulz"` (the Lyapunov solve).
    - `tol`: Newton–Schulz residual tolerance, or for `"mixed"` the relative residual
        $\\|A - X^2\\|_F / \\|A\\|_F$ of the refinement (default `10 eps`; the
        iterations also stop at their rounding floor).
    - `max_steps`: Newton–Schulz (or `"mixed"` refinement) iteration cap (default
        50).
    - `precision`: how the Newton–Schulz matmuls run on float32 input (forward
        `"newton_schulz"`, the working-precision matmuls of `"mixed"`, and
        `backward="newton_schulz"`): `"highest"` (default), `"bf16x6"`, `"tf32x3"`
        or `"bf16x3"`; see **Tensor-core precision** below. No effect on float64
        input or on the `"eigh"` paths.
    - `throw`: raise on failure (default `True`).
    - `full_output`: return a `MatrixFunctionSolution` instead of the array.
"""


def sqrtm(
    a: Float[Array, "*batch n n"],
    *,
    method: _Method = "auto",
    backward: Literal["auto", "eigh", "newton_schulz"] = "auto",
    tol: float | None = None,
    max_steps: int = 50,
    precision: Precision = "highest",
    throw: bool = True,
    full_output: bool = False,
) -> Float[Array, "*batch n n"]:
    options = (method, backward, tol, max_steps, precision, throw, full_output)
    return _sqrtm_impl(a, "sqrtm", *options, "sqrt")


def inv_sqrtm(
    a: Float[Array, "*batch n n"],
    *,
    method: _Method = "auto",
    backward: Literal["auto", "eigh", "newton_schulz"] = "auto",
    tol: float | None = None,
    max_steps: int = 50,
    precision: Precision = "highest",
    throw: bool = True,
    full_output: bool = False,
) -> Float[Array, "*batch n n"]:
    options = (method, backward, tol, max_steps, precision, throw, full_output)
    return _sqrtm_impl(a, "inv_sqrtm", *options, "inv")


def sqrtm_and_inv_sqrtm(
    a: Float[Array, "*batch n n"],
    *,
    method: _Method = "auto",
    backward: Literal["auto", "eigh", "newton_schulz"] = "auto",
    tol: float | None = None,
    max_steps: int = 50,
    precision: Precision = "highest",
    throw: bool = True,
    full_output: bool = False,
) -> tuple[Float[Array, "*batch n n"], Float[Array, "*batch n n"]]:
    options = (method, backward, tol, max_steps, precision, throw, full_output)
    return _sqrtm_impl(a, "sqrtm_and_inv_sqrtm", *options, "both")


sqrtm.__doc__ = rf"""Principal square root $A^{{1/2}}$ of a symmetric positive
    (semi)definite matrix.

    The unique symmetric positive semidefinite $X$ with $X X = A$, for `a` of shape
    `(..., n, n)` (any leading batch dimensions).

    **Arguments:**

    - `a`: symmetric positive (semi)definite, float32 or float64.
    {_ARGS_COMMON}
    **Returns:** $A^{{1/2}}$, same shape and dtype as `a`.
    {_DOC_COMMON}
    **Example:** ZCA whitening of a batch of features.

    ```python
    import jax, jax.numpy as jnp
    import jaxdecomp

    x = jax.random.normal(jax.random.key(0), (256, 16))
    cov = jnp.cov(x, rowvar=False) + 1e-3 * jnp.eye(16)
    white = x @ jaxdecomp.inv_sqrtm(cov)
    root = jaxdecomp.sqrtm(cov, method="newton_schulz")
    g = jax.grad(lambda c: jnp.trace(jaxdecomp.sqrtm(c)))(cov)  # = inv_sqrtm / 2
    ```

    **References:** Higham, *Functions of Matrices* (2008), ch. 6; Song et al., "Fast
    Differentiable Matrix Square Root", ICLR 2022; Amsel et al., "The Polar Express",
    2025.
    """

inv_sqrtm.__doc__ = rf"""Inverse square root $A^{{-1/2}}$ of a symmetric positive
    definite matrix.

    **Arguments:**

    - `a`: symmetric positive definite, float32 or float64, shape `(..., n, n)`.
    {_ARGS_COMMON}
    **Returns:** $A^{{-1/2}}$, same shape and dtype as `a`.
    {_DOC_COMMON}
    **Example:**

    ```python
    import jax.numpy as jnp
    import jaxdecomp

    a = jnp.array([[4.0, 1.0], [1.0, 3.0]])
    y = jaxdecomp.inv_sqrtm(a)
    assert jnp.allclose(y @ a @ y, jnp.eye(2), atol=1e-5)
    ```
    """

sqrtm_and_inv_sqrtm.__doc__ = rf"""Both $A^{{1/2}}$ and $A^{{-1/2}}$ of a symmetric
    positive definite matrix, at the cost of one (the coupled Newton–Schulz iteration
    produces both; `"eigh"` shares one eigendecomposition).

    **Arguments:**

    - `a`: symmetric positive definite, float32 or float64, shape `(..., n, n)`.
    {_ARGS_COMMON}
    **Returns:** `(sqrt_a, inv_sqrt_a)`.
    {_DOC_COMMON}
    **Example:**

    ```python
    import jax.numpy as jnp
    import jaxdecomp

    a = jnp.array([[4.0, 1.0], [1.0, 3.0]])
    x, y = jaxdecomp.sqrtm_and_inv_sqrtm(a, method="newton_schulz")
    assert jnp.allclose(x @ y, jnp.eye(2), atol=1e-5)
    ```
    """
