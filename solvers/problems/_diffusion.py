"""2-D diffusion operators on structured grids (matrix-free) and seeded generators."""

from __future__ import annotations

import functools as ft

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray


class Diffusion2D(eqx.Module):
    """The finite-volume operator $-\\nabla\\cdot(k\\nabla u)$ on the unit square with
    zero Dirichlet boundary values, on an `n x n` grid of interior cells (5-point
    stencil, unknowns in row-major order, scaled by $h^2$ so that Poisson has unit
    face coefficients):

    $$(Au)_{ij} = \\sum_{\\text{faces } f \\text{ of } (i,j)} k_f\\,(u_{ij} -
    u_{\\text{neighbour across } f}),$$

    with $u = 0$ outside. SPD for positive face coefficients. Matrix-free: `mv`
    costs $5n^2$ multiply-adds (GPU friendly); `diagonal()`, `to_dense()` (small n)
    `to_sparse()` (a differentiable [`solvers.SparseMatrix`][]) and `to_scipy()` (CSR,
    for the SciPy/PyAMG anchors) are provided.

    **Arguments:**

    - `kx`: face coefficients across vertical faces, shape `(n + 1, n)` (row `i`
        is the face between cells `i - 1` and `i` along the first axis).
    - `ky`: face coefficients across horizontal faces, shape `(n, n + 1)`.
    - `shift`: a nonnegative diagonal shift $\\sigma$ (scalar; default 0): the
        operator is $A + \\sigma I$, e.g. an implicit heat-equation step
        $(I + \\Delta t\\,A_{\\text{unscaled}})$ scaled by $h^2/\\Delta t$, i.e.
        $\\sigma = h^2/\\Delta t$ (see [`solvers.problems.heat_steps`][]).

    **Example:**

    ```python
    import jax.numpy as jnp
    import solvers

    op = solvers.problems.poisson_2d(16)
    sol = solvers.cg(op, jnp.ones(16 * 16), preconditioner=solvers.Jacobi(op))
    print(sol.n_steps)
    ```
    """

    kx: Float[Array, "n+1 n"]
    ky: Float[Array, "n n+1"]
    shift: Float[ArrayLike, ""] = 0.0

    def __check_init__(self):
        n = self.ky.shape[0]
        if self.kx.shape != (n + 1, n) or self.ky.shape != (n, n + 1):
            raise ValueError(
                "Diffusion2D: kx must be (n + 1, n) and ky (n, n + 1); got "
                f"{self.kx.shape} and {self.ky.shape}."
            )

    @property
    def n(self) -> int:
        return self.ky.shape[0]

    def mv(self, u: Float[Array, " n*n"]) -> Float[Array, " n*n"]:
        n = self.n
        u = u.reshape(n, n)
        up = jnp.pad(u, 1)
        out = (
            self.kx[1:] * (u - up[2:, 1:-1])
            + self.kx[:-1] * (u - up[:-2, 1:-1])
            + self.ky[:, 1:] * (u - up[1:-1, 2:])
            + self.ky[:, :-1] * (u - up[1:-1, :-2])
            + self.shift * u
        )
        return out.reshape(-1)

    def diagonal(self) -> Float[Array, " n*n"]:
        d = self.kx[1:] + self.kx[:-1] + self.ky[:, 1:] + self.ky[:, :-1] + self.shift
        return d.reshape(-1)

    def to_dense(self) -> Float[Array, "n*n n*n"]:
        return jax.vmap(self.mv, out_axes=1)(jnp.eye(self.n**2, dtype=self.kx.dtype))

    def to_sparse(self):
        """The same matrix as a [`solvers.SparseMatrix`][] (tagged SPD) whose values
        are differentiable functions of `kx`, `ky`; the pattern is cached per `n`."""
        from .._sparse import SparseMatrix

        pattern, _ = _stencil_pattern(self.n)
        return SparseMatrix(
            self._coo_values()[pattern.order],
            pattern,
            frozenset({lx.symmetric_tag, lx.positive_semidefinite_tag}),
        )

    def _coo_values(self):
        # diagonal, then (lower, upper) couplings across x-faces, then across y-faces
        kx, ky = self.kx[1:-1].reshape(-1), self.ky[:, 1:-1].reshape(-1)
        return jnp.concatenate([self.diagonal(), -kx, -kx, -ky, -ky])

    def to_scipy(self):
        """The same matrix as a SciPy CSR matrix (float64, host memory)."""
        import scipy.sparse as sp

        n = self.n
        _, (rows, cols) = _stencil_pattern(n)
        vals = np.asarray(self._coo_values(), np.float64)
        return sp.csr_matrix((vals, (rows, cols)), shape=(n * n, n * n))


@ft.lru_cache(maxsize=16)
def _stencil_pattern(n: int):
    """The 5-point pattern in the COO order of `Diffusion2D._coo_values`."""
    from .._sparse import SparsityPattern

    idx = np.arange(n * n).reshape(n, n)
    xi, xj = idx[1:, :].ravel(), idx[:-1, :].ravel()
    yi, yj = idx[:, 1:].ravel(), idx[:, :-1].ravel()
    rows = np.concatenate([idx.ravel(), xi, xj, yi, yj])
    cols = np.concatenate([idx.ravel(), xj, xi, yj, yi])
    return SparsityPattern(rows, cols, (n * n, n * n)), (rows, cols)


def poisson_2d(n: int, dtype=jnp.float64) -> Diffusion2D:
    """2-D Poisson ($k = 1$) on an `n x n` interior grid (see
    [`Diffusion2D`][solvers.problems.Diffusion2D]).

    **Arguments:**

    - `n`: grid cells per side; `dtype`: float dtype of the coefficients.

    **Example:**

    ```python
    import solvers

    print(solvers.problems.poisson_2d(8).diagonal()[:3])
    ```
    """
    return Diffusion2D(jnp.ones((n + 1, n), dtype), jnp.ones((n, n + 1), dtype))


def _gaussian_field(key, n, length, dtype):
    """A unit-variance stationary Gaussian field on an n x n grid (FFT filter with a
    Gaussian kernel of correlation length `length`, in units of the domain)."""
    white = jax.random.normal(key, (n, n), dtype)
    freq = jnp.fft.fftfreq(n) * n  # integer wavenumbers
    k2 = freq[:, None] ** 2 + freq[None, :] ** 2
    filt = jnp.exp(-((jnp.pi * length) ** 2) * k2 / 2)
    spectrum = jnp.fft.fft2(white)
    field = jnp.fft.ifft2(spectrum * filt.astype(spectrum.dtype)).real.astype(dtype)
    return (field - field.mean()) / field.std()


def diffusion_2d(
    key: PRNGKeyArray,
    n: int,
    *,
    variance: float = 1.0,
    length: float = 0.1,
    dtype=jnp.float64,
) -> Diffusion2D:
    """Variable-coefficient diffusion with a log-normal coefficient field
    $k = \\exp(\\sigma z)$, $z$ a unit-variance Gaussian field of correlation length
    `length`, $\\sigma^2$ = `variance`; face coefficients are harmonic means of the
    neighbouring cells (boundary faces take the cell's value). The contrast
    $\\max k / \\min k$ grows like $\\exp(c\\,\\sigma)$.

    **Arguments:**

    - `key`: a JAX PRNG key (the problem is a deterministic function of it).
    - `n`: grid cells per side.
    - `variance`, `length`: of the log-coefficient field.
    - `dtype`: float dtype.

    **Example:**

    ```python
    import jax
    import solvers

    op = solvers.problems.diffusion_2d(jax.random.key(0), 32, variance=2.0)
    print(op.diagonal().shape)
    ```
    """
    if not (isinstance(n, int) and n >= 2):
        raise ValueError(f"diffusion_2d: n must be an int >= 2; got {n}.")
    if variance < 0 or length <= 0:
        raise ValueError(
            "diffusion_2d: need variance >= 0 and length > 0; got "
            f"{variance}, {length}."
        )
    k = jnp.exp(
        jnp.sqrt(jnp.asarray(variance, dtype)) * _gaussian_field(key, n, length, dtype)
    )
    harm = lambda p, q: 2 * p * q / (p + q)  # noqa: E731
    kx = jnp.concatenate([k[:1], harm(k[1:], k[:-1]), k[-1:]], axis=0)
    ky = jnp.concatenate([k[:, :1], harm(k[:, 1:], k[:, :-1]), k[:, -1:]], axis=1)
    return Diffusion2D(kx, ky)


def heat_steps(op: Diffusion2D, dts: Float[ArrayLike, " steps"]) -> Diffusion2D:
    """A sequence of related systems: implicit-Euler heat-equation steps
    $(I + \\Delta t_k A_{\\text{unscaled}})\\,u_{k+1} = u_k$ with time steps `dts`,
    in the $h^2$-scaled form $A + (h^2/\\Delta t_k) I$ ($h = 1/n$), returned as one
    batched [`Diffusion2D`][solvers.problems.Diffusion2D] (leading axis = step;
    index it with `jax.tree_util.tree_map(lambda x: x[k], ops)` or `jax.vmap` over
    it). Smaller steps give better-conditioned systems.

    **Arguments:**

    - `op`: the diffusion operator $A$ (unshifted).
    - `dts`: the time steps, a vector.

    **Example:**

    ```python
    import jax.numpy as jnp
    import solvers

    base = solvers.problems.poisson_2d(8)
    ops = solvers.problems.heat_steps(base, jnp.array([1e-3, 1e-2]))
    print(ops.shift)
    ```
    """
    dts = jnp.asarray(dts, op.kx.dtype)
    if dts.ndim != 1:
        raise ValueError(f"heat_steps: dts must be a vector; got shape {dts.shape}.")
    shifts = 1.0 / (op.n**2 * dts)
    return jax.vmap(lambda s: Diffusion2D(op.kx, op.ky, s))(shifts)


def anisotropic_2d(n: int, epsilon: float, dtype=jnp.float64) -> Diffusion2D:
    """Axis-aligned anisotropic diffusion $-u_{xx} - \\varepsilon u_{yy}$ on an
    `n x n` grid (face coefficients 1 across the first axis, $\\varepsilon$ across
    the second): the classic hard case for point smoothers and geometric multigrid
    with full coarsening as $\\varepsilon \\to 0$.

    **Arguments:**

    - `n`: grid cells per side.
    - `epsilon`: the anisotropy ratio, > 0.
    - `dtype`: float dtype.

    **Example:**

    ```python
    import solvers

    print(solvers.problems.anisotropic_2d(8, 1e-2).diagonal()[:3])
    ```
    """
    if not (isinstance(n, int) and n >= 2):
        raise ValueError(f"anisotropic_2d: n must be an int >= 2; got {n}.")
    if not epsilon > 0:
        raise ValueError(f"anisotropic_2d: epsilon must be > 0; got {epsilon}.")
    return Diffusion2D(
        jnp.ones((n + 1, n), dtype), jnp.full((n, n + 1), epsilon, dtype)
    )
