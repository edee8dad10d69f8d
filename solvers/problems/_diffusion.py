"""2-D diffusion operators on structured grids (matrix-free) and seeded generators."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray


class Diffusion2D(eqx.Module):
    """The finite-volume operator $-\\nabla\\cdot(k\\nabla u)$ on the unit square with
    zero Dirichlet boundary values, on an `n x n` grid of interior cells (5-point
    stencil, unknowns in row-major order, scaled by $h^2$ so that Poisson has unit
    face coefficients):

    $$(Au)_{ij} = \\sum_{\\text{faces } f \\text{ of } (i,j)} k_f\\,(u_{ij} -
    u_{\\text{neighbour across } f}),$$

    with $u = 0$ outside. SPD for positive face coefficients. Matrix-free: `mv`
    costs $5n^2$ multiply-adds (GPU friendly); `diagonal()`, `to_dense()` (small n)
    and `to_scipy()` (CSR, for the SciPy/PyAMG anchors) are provided.

    **Arguments:**

    - `kx`: face coefficients across vertical faces, shape `(n + 1, n)` (row `i`
        is the face between cells `i - 1` and `i` along the first axis).
    - `ky`: face coefficients across horizontal faces, shape `(n, n + 1)`.

    **Example:**

    ```python
    import jax.numpy as jnp
    import solvers

    op = solvers.problems.poisson_2d(16)
    sol = solvers.cg(op.mv, jnp.ones(16 * 16), preconditioner=op.jacobi())
    print(sol.n_steps)
    ```
    """

    kx: Float[Array, "n+1 n"]
    ky: Float[Array, "n n+1"]

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
        )
        return out.reshape(-1)

    def diagonal(self) -> Float[Array, " n*n"]:
        return (self.kx[1:] + self.kx[:-1] + self.ky[:, 1:] + self.ky[:, :-1]).reshape(
            -1
        )

    def jacobi(self):
        """The Jacobi preconditioner $r \\mapsto r / \\mathrm{diag}(A)$."""
        inv = 1.0 / self.diagonal()
        return lambda r: inv * r

    def to_dense(self) -> Float[Array, "n*n n*n"]:
        return jax.vmap(self.mv, out_axes=1)(jnp.eye(self.n**2, dtype=self.kx.dtype))

    def to_scipy(self):
        """The same matrix as a SciPy CSR matrix (float64, host memory)."""
        import scipy.sparse as sp

        n = self.n
        kx, ky = np.asarray(self.kx, np.float64), np.asarray(self.ky, np.float64)
        idx = np.arange(n * n).reshape(n, n)
        rows, cols, vals = (
            [idx.ravel()],
            [idx.ravel()],
            [np.asarray(self.diagonal(), np.float64)],
        )
        for sl_a, sl_b, k in (
            ((slice(1, None), slice(None)), (slice(None, -1), slice(None)), kx[1:-1]),
            (
                (slice(None), slice(1, None)),
                (slice(None), slice(None, -1)),
                ky[:, 1:-1],
            ),
        ):
            i, j = idx[sl_a].ravel(), idx[sl_b].ravel()
            rows += [i, j]
            cols += [j, i]
            vals += [-k.ravel(), -k.ravel()]
        return sp.csr_matrix(
            (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
            shape=(n * n, n * n),
        )


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
