"""2-D diffusion operators on structured grids (matrix-free) and seeded generators."""

from __future__ import annotations

import functools as ft

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray


def _axis_slice(d, axis, sl):
    return tuple(sl if b == axis else slice(None) for b in range(d))


class _GridDiffusion(eqx.Module):
    """Shared by `Diffusion2D` and `Diffusion3D`: the cell-centered finite-volume
    diffusion stencil on a d-dimensional grid of n^d cells, given one array of face
    coefficients per axis (length n + 1 along its axis, n along the others)."""

    @property
    def faces(self) -> tuple[Array, ...]:
        raise NotImplementedError

    @property
    def n(self) -> int:
        return self.faces[0].shape[1]

    @property
    def ndim(self) -> int:
        return len(self.faces)

    def _check_faces(self, name, labels):
        d = len(self.faces)
        n = self.faces[0].shape[-1] if d > 1 else None
        for a, k in enumerate(self.faces):
            want = tuple(n + 1 if b == a else n for b in range(d))
            if k.shape != want:
                shapes = [f.shape for f in self.faces]
                raise ValueError(
                    f"{name}: {labels[a]} (face coefficients across axis {a}) must "
                    f"have shape {want} (n + 1 along the axis, n elsewhere); got "
                    f"shapes {shapes} for {', '.join(labels)}."
                )

    def mv(self, u: Float[Array, " N"]) -> Float[Array, " N"]:
        d, n = self.ndim, self.n
        u = u.reshape((n,) * d)
        up = jnp.pad(u, 1)
        out = self.shift * u
        for a, k in enumerate(self.faces):
            nb_hi = up[
                tuple(slice(2, None) if b == a else slice(1, -1) for b in range(d))
            ]
            nb_lo = up[
                tuple(slice(None, -2) if b == a else slice(1, -1) for b in range(d))
            ]
            k_hi = k[_axis_slice(d, a, slice(1, None))]
            k_lo = k[_axis_slice(d, a, slice(None, -1))]
            out = out + k_hi * (u - nb_hi) + k_lo * (u - nb_lo)
        return out.reshape(-1)

    def diagonal(self) -> Float[Array, " N"]:
        d = self.ndim
        out = self.shift
        for a, k in enumerate(self.faces):
            out = (
                out
                + k[_axis_slice(d, a, slice(1, None))]
                + k[_axis_slice(d, a, slice(None, -1))]
            )
        return out.reshape(-1)

    def to_dense(self) -> Float[Array, "N N"]:
        size = self.n**self.ndim
        return jax.vmap(self.mv, out_axes=1)(jnp.eye(size, dtype=self.faces[0].dtype))

    def to_sparse(self):
        """The same matrix as a [`solvers.SparseMatrix`][] (tagged SPD) whose values
        are differentiable functions of the face coefficients; the pattern is cached
        per grid."""
        from .._sparse import SparseMatrix

        pattern, _ = _stencil_pattern(self.n, self.ndim)
        return SparseMatrix(
            self._coo_values()[pattern.order],
            pattern,
            frozenset({lx.symmetric_tag, lx.positive_semidefinite_tag}),
        )

    def _coo_values(self):
        # diagonal, then per axis the (lower, upper) couplings across interior faces
        d = self.ndim
        parts = [self.diagonal()]
        for a, k in enumerate(self.faces):
            inner = k[_axis_slice(d, a, slice(1, -1))].reshape(-1)
            parts += [-inner, -inner]
        return jnp.concatenate(parts)

    def to_scipy(self):
        """The same matrix as a SciPy CSR matrix (float64, host memory)."""
        import scipy.sparse as sp

        size = self.n**self.ndim
        _, (rows, cols) = _stencil_pattern(self.n, self.ndim)
        vals = np.asarray(self._coo_values(), np.float64)
        return sp.csr_matrix((vals, (rows, cols)), shape=(size, size))


class Diffusion2D(_GridDiffusion):
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
        self._check_faces("Diffusion2D", ("kx", "ky"))

    @property
    def faces(self):
        return (self.kx, self.ky)

    @property
    def n(self) -> int:
        return self.ky.shape[0]


class Diffusion3D(_GridDiffusion):
    """The 3-D analogue of [`Diffusion2D`][solvers.problems.Diffusion2D]:
    $-\\nabla\\cdot(k\\nabla u)$ on the unit cube with zero Dirichlet boundary values,
    cell-centered finite volumes on an `n x n x n` grid (7-point stencil, unknowns in
    row-major order, scaled so that Poisson has unit face coefficients):
    $(Au)_c = \\sum_{\\text{faces } f \\text{ of } c} k_f (u_c -
    u_{\\text{neighbour across } f}) + \\sigma u_c$. SPD for positive coefficients.
    Matrix-free `mv` ($7n^3$ multiply-adds), `diagonal()`, `to_dense()`,
    `to_sparse()`, `to_scipy()`; [`solvers.Multigrid`][] handles it.

    **Arguments:** `kx`, `ky`, `kz`: face coefficients across the first, second and
    third axis, shapes `(n + 1, n, n)`, `(n, n + 1, n)`, `(n, n, n + 1)`; `shift`:
    a nonnegative diagonal shift (default 0).

    **Example:**

    ```python
    import jax.numpy as jnp
    import solvers

    op = solvers.problems.poisson_3d(8)
    sol = solvers.cg(op, jnp.ones(8**3), preconditioner=solvers.Multigrid(op))
    print(sol.n_steps)
    ```
    """

    kx: Float[Array, "n+1 n n"]
    ky: Float[Array, "n n+1 n"]
    kz: Float[Array, "n n n+1"]
    shift: Float[ArrayLike, ""] = 0.0

    def __check_init__(self):
        self._check_faces("Diffusion3D", ("kx", "ky", "kz"))

    @property
    def faces(self):
        return (self.kx, self.ky, self.kz)


@ft.lru_cache(maxsize=16)
def _stencil_pattern(n: int, d: int = 2):
    """The (2d+1)-point pattern in the COO order of `_GridDiffusion._coo_values`."""
    from .._sparse import SparsityPattern

    idx = np.arange(n**d).reshape((n,) * d)
    rows, cols = [idx.ravel()], [idx.ravel()]
    for a in range(d):
        hi = idx[_axis_slice(d, a, slice(1, None))].ravel()
        lo = idx[_axis_slice(d, a, slice(None, -1))].ravel()
        rows += [hi, lo]
        cols += [lo, hi]
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    return SparsityPattern(rows, cols, (n**d, n**d)), (rows, cols)


def poisson_2d(n: int, dtype=None) -> Diffusion2D:
    """2-D Poisson ($k = 1$) on an `n x n` interior grid (see
    [`Diffusion2D`][solvers.problems.Diffusion2D]).

    **Arguments:**

    - `n`: grid cells per side; `dtype`: float dtype of the coefficients (default:
      JAX's default float dtype, float64 when x64 is enabled, else float32).

    **Example:**

    ```python
    import solvers

    print(solvers.problems.poisson_2d(8).diagonal()[:3])
    ```
    """
    dtype = _float_dtype(dtype)
    return Diffusion2D(jnp.ones((n + 1, n), dtype), jnp.ones((n, n + 1), dtype))


def _float_dtype(dtype):
    """`dtype`, or JAX's default float dtype when None."""
    return jnp.result_type(float) if dtype is None else jnp.dtype(dtype)


def _gaussian_field(key, n, length, dtype, d=2):
    """A unit-variance stationary Gaussian field on an n^d grid (FFT filter with a
    Gaussian kernel of correlation length `length`, in units of the domain)."""
    white = jax.random.normal(key, (n,) * d, dtype)
    freq = jnp.fft.fftfreq(n) * n  # integer wavenumbers
    k2 = sum(
        (freq**2).reshape(tuple(n if b == a else 1 for b in range(d))) for a in range(d)
    )
    filt = jnp.exp(-((jnp.pi * length) ** 2) * k2 / 2)
    spectrum = jnp.fft.fftn(white)
    field = jnp.fft.ifftn(spectrum * filt.astype(spectrum.dtype)).real.astype(dtype)
    return (field - field.mean()) / field.std()


def _lognormal_faces(name, key, n, d, variance, length, dtype):
    """Face coefficients of k = exp(sqrt(variance) z): harmonic means of the two
    neighbouring cells, the cell's value on boundary faces."""
    if not (isinstance(n, int) and n >= 2):
        raise ValueError(f"{name}: n must be an int >= 2; got {n}.")
    if variance < 0 or length <= 0:
        raise ValueError(
            f"{name}: need variance >= 0 and length > 0; got {variance}, {length}."
        )
    dtype = _float_dtype(dtype)
    z = _gaussian_field(key, n, length, dtype, d)
    k = jnp.exp(jnp.sqrt(jnp.asarray(variance, dtype)) * z)
    faces = []
    for a in range(d):
        hi, lo = (
            k[_axis_slice(d, a, slice(1, None))],
            k[_axis_slice(d, a, slice(None, -1))],
        )
        first, last = (
            k[_axis_slice(d, a, slice(None, 1))],
            k[_axis_slice(d, a, slice(-1, None))],
        )
        faces.append(jnp.concatenate([first, 2 * hi * lo / (hi + lo), last], axis=a))
    return faces


def diffusion_2d(
    key: PRNGKeyArray,
    n: int,
    *,
    variance: float = 1.0,
    length: float = 0.1,
    dtype=None,
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
    - `dtype`: float dtype (default: JAX's default float dtype).

    **Example:**

    ```python
    import jax
    import solvers

    op = solvers.problems.diffusion_2d(jax.random.key(0), 32, variance=2.0)
    print(op.diagonal().shape)
    ```
    """
    kx, ky = _lognormal_faces("diffusion_2d", key, n, 2, variance, length, dtype)
    return Diffusion2D(kx, ky)


def heat_steps(op: _GridDiffusion, dts: Float[ArrayLike, " steps"]) -> _GridDiffusion:
    """A sequence of related systems: implicit-Euler heat-equation steps
    $(I + \\Delta t_k A_{\\text{unscaled}})\\,u_{k+1} = u_k$ with time steps `dts`,
    in the $h^2$-scaled form $(A + s_k I)\\,u_{k+1} = s_k u_k$,
    $s_k = h^2/\\Delta t_k$ ($h = 1/n$; mind the $s_k$ on the right-hand side:
    `ops.shift[k] * u`), the operators returned as one
    batched [`Diffusion2D`][solvers.problems.Diffusion2D] or
    [`Diffusion3D`][solvers.problems.Diffusion3D] (leading axis = step;
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
    dts = jnp.asarray(dts, op.faces[0].dtype)
    if dts.ndim != 1:
        raise ValueError(f"heat_steps: dts must be a vector; got shape {dts.shape}.")
    shifts = 1.0 / (op.n**2 * dts)
    return jax.vmap(lambda s: eqx.tree_at(lambda o: o.shift, op, s))(shifts)


def anisotropic_2d(n: int, epsilon: float, dtype=None) -> Diffusion2D:
    """Axis-aligned anisotropic diffusion $-u_{xx} - \\varepsilon u_{yy}$ on an
    `n x n` grid (face coefficients 1 across the first axis, $\\varepsilon$ across
    the second): the classic hard case for point smoothers and geometric multigrid
    with full coarsening as $\\varepsilon \\to 0$.

    **Arguments:**

    - `n`: grid cells per side.
    - `epsilon`: the anisotropy ratio, > 0.
    - `dtype`: float dtype (default: JAX's default float dtype).

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


def poisson_3d(n: int, dtype=None) -> Diffusion3D:
    """3-D Poisson ($k = 1$) on an `n x n x n` interior grid (see
    [`Diffusion3D`][solvers.problems.Diffusion3D]).

    **Arguments:** `n`: grid cells per side; `dtype`: float dtype (default: JAX's
    default float dtype).

    **Example:**

    ```python
    import solvers

    print(solvers.problems.poisson_3d(4).diagonal()[:3])  # 6 in the interior
    ```
    """
    if not (isinstance(n, int) and n >= 2):
        raise ValueError(f"poisson_3d: n must be an int >= 2; got {n}.")
    ones = [
        jnp.ones(tuple(n + 1 if b == a else n for b in range(3)), dtype)
        for a in range(3)
    ]
    return Diffusion3D(*ones)


def diffusion_3d(
    key: PRNGKeyArray,
    n: int,
    *,
    variance: float = 1.0,
    length: float = 0.1,
    dtype=None,
) -> Diffusion3D:
    """3-D variable-coefficient diffusion with a log-normal coefficient field, as
    [`diffusion_2d`][solvers.problems.diffusion_2d] (harmonic-mean face coefficients,
    correlation length `length`, log-variance `variance`) on an `n x n x n` grid.

    **Arguments:** `key`, `n`, `variance`, `length`, `dtype` as for `diffusion_2d`.

    **Example:**

    ```python
    import jax
    import solvers

    op = solvers.problems.diffusion_3d(jax.random.key(0), 8, variance=2.0)
    print(op.diagonal().shape)  # (512,)
    ```
    """
    return Diffusion3D(
        *_lognormal_faces("diffusion_3d", key, n, 3, variance, length, dtype)
    )
