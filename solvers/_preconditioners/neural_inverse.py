"""A convolutional network approximating the inverse of a structured-grid operator."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

from ..problems._diffusion import Diffusion2D


class _Block(eqx.Module):
    """Residual block of two 3x3 convolutions (3x3x3 with `dims=3`: the 3-D
    prototype in `benchmarks/_neural3d.py` uses it too)."""

    conv1: eqx.nn.Conv
    conv2: eqx.nn.Conv

    def __init__(self, width, key, dims: int = 2):
        k1, k2 = jr.split(key)
        self.conv1 = eqx.nn.Conv(dims, width, width, 3, padding=1, key=k1)
        self.conv2 = eqx.nn.Conv(dims, width, width, 3, padding=1, key=k2)

    def __call__(self, h):
        return h + self.conv2(jax.nn.gelu(self.conv1(jax.nn.gelu(h))))


def _pool(h):  # 2 x ... x 2 average pooling of (channels, n, ..., n)
    c, *grid = h.shape
    split = [m for n in grid for m in (n // 2, 2)]
    return h.reshape(c, *split).mean(axis=tuple(range(2, 2 * len(grid) + 1, 2)))


def _upsample(h):  # nearest-neighbour 2x upsampling in every grid axis
    for axis in range(1, h.ndim):
        h = jnp.repeat(h, 2, axis=axis)
    return h


def _unet_layers(key, width: int, levels: int, dims: int, dtype):
    """The layers of `NeuralInverse`'s U-Net on a `dims`-dimensional grid (the 3-D
    prototype in `benchmarks/_neural3d.py` builds its network here too), in the
    network's `dtype`; the output convolution starts at zero."""
    keys = iter(jr.split(key, 3 * levels + 3))

    def conv(cin, cout, size):
        return eqx.nn.Conv(dims, cin, cout, size, padding=size // 2, key=next(keys))

    lift = conv(2, width, 3)
    down = [_Block(width, next(keys), dims) for _ in range(levels - 1)]
    bottom = _Block(width, next(keys), dims)
    merge = [conv(2 * width, width, 1) for _ in range(levels - 1)]
    up = [_Block(width, next(keys), dims) for _ in range(levels - 1)]
    out = conv(width, 1, 3)
    out = eqx.tree_at(
        lambda c: (c.weight, c.bias),
        out,
        (jnp.zeros_like(out.weight), jnp.zeros_like(out.bias)),
    )
    layers = dict(lift=lift, down=down, bottom=bottom, merge=merge, up=up, out=out)
    # the network's precision is its parameters' dtype (default float32)
    return jax.tree_util.tree_map(
        lambda p: p.astype(dtype) if eqx.is_inexact_array(p) else p, layers
    )


class NeuralInverse(eqx.Module):
    """A U-Net that approximates $A^{-1}$ up to scale for structured-grid diffusion
    operators (Kaneda et al., ICML 2023); calling the model on an operator returns a
    nonlinear preconditioner for flexible CG (`solvers.cg(..., flexible=True)`).

    For a residual $r$ with $s = \\|r\\|_2$ and $D = \\mathrm{diag}(A)$:

    $$M^{-1}(r) = s\\, D^{-1}\\big(r/s + \\mathrm{UNet}(r/s,\\ \\log\\mathrm{diag}(A)
    - \\overline{\\log\\mathrm{diag}(A)})\\big),$$

    positively homogeneous ($M^{-1}(cr) = cM^{-1}(r)$ for $c > 0$), so it does not
    depend on the scale of the system. The U-Net has `levels` resolutions (2x2
    average pooling, nearest upsampling, skip connections, residual 3x3 convolution
    blocks of `width` channels; zero padding matches the Dirichlet boundary) and its
    last layer starts at zero: an untrained model is Jacobi. Being convolutional, it
    applies to any grid size divisible by $2^{\\text{levels}-1}$. Train it with the
    scale-invariant [`solvers.a_norm_loss`][] (Kaneda et al.) on problems `(op, x, b)`.

    Not linear and not guaranteed positive definite: use flexible CG, which reports
    `not_spd` if a direction fails ($r^T M^{-1}(r) \\le 0$). Its directions must be
    A-orthogonalised against several previous ones, as in Kaneda et al.'s DCDM:
    measured (`python -m benchmarks cg`, trained on 64 x 64 fields, loss 0.50 ->
    0.17, held-out 64 x 64 field), flexible CG needs 432, 226, 134 and 94
    iterations with `memory` = 1, 2, 5 (the default) and 10, against 282 for
    Jacobi, 86 for IC(0) and 58 for NeuralIC. One application costs ~30 matvecs on
    a CPU, so on a CPU it does not pay in time.

    It does not carry to larger grids than it was trained on (measured,
    `benchmarks.recycling.neural_inverse_at_size`, trained on 64 x 64): 90, 436 and
    1683 iterations at 64^2, 128^2 and 256^2 against Jacobi's 284, 542 and 1105, and
    at 512^2 flexible CG stops with `not_spd` after 74 steps. Train it on the grid
    size it will be used at.

    **Arguments:** `key` (PRNG key), `width` (default 16), `levels` (default 3),
    `dtype` of the parameters and of the network's arithmetic (default float32, also
    for float64 systems: a preconditioner needs no more, and convolutions are much
    faster in float32; the residual scaling and the Jacobi part use the system's
    dtype).

    **Example:**

    ```python
    import jax
    import solvers

    op = solvers.problems.diffusion_2d(jax.random.key(0), 16)
    m = solvers.NeuralInverse(jax.random.key(1))(op)
    print(solvers.cg(op, op.diagonal(), preconditioner=m, flexible=True).n_steps)
    ```

    Reference: Kaneda, Akar, Chen, Kim, Teran & Kim, "A deep conjugate direction
    method for iteratively solving linear systems", ICML 2023.
    """

    lift: eqx.nn.Conv
    down: list[_Block]
    bottom: _Block
    merge: list[eqx.nn.Conv]
    up: list[_Block]
    out: eqx.nn.Conv

    def __init__(
        self,
        key: PRNGKeyArray,
        width: int = 16,
        levels: int = 3,
        dtype=jnp.float32,
    ):
        if not (isinstance(levels, int) and levels >= 1):
            raise ValueError(
                f"NeuralInverse: levels must be an int >= 1; got {levels}."
            )
        for name, layer in _unet_layers(key, width, levels, 2, dtype).items():
            setattr(self, name, layer)

    def __call__(self, op: Diffusion2D) -> NetworkPreconditioner:
        if not isinstance(op, Diffusion2D):
            raise TypeError(
                "NeuralInverse: needs a structured-grid solvers.problems.Diffusion2D; "
                f"got {type(op).__name__}."
            )
        factor = 2 ** len(self.down)
        if op.n % factor:
            raise ValueError(
                f"NeuralInverse: the grid size n = {op.n} must be divisible by "
                f"{factor} (2^(levels - 1))."
            )
        return NetworkPreconditioner(self, op.diagonal())

    def unet(self, x: Float[Array, " 2 *grid"]) -> Float[Array, " *grid"]:
        h = self.lift(x)
        skips = []
        for block in self.down:
            h = block(h)
            skips.append(h)
            h = _pool(h)
        h = self.bottom(h)
        for block, merge, skip in zip(self.up, self.merge, reversed(skips)):
            h = block(merge(jnp.concatenate([_upsample(h), skip], axis=0)))
        return self.out(h)[0]


class NetworkPreconditioner(eqx.Module):
    """A trained [`solvers.NeuralInverse`][] bound to one operator: `mv(r)` (or
    calling it) applies the network. Nonlinear; for flexible CG."""

    model: NeuralInverse
    diagonal: Float[Array, " n2"]

    def mv(self, r):
        dims = self.model.lift.num_spatial_dims
        grid = (int(round(self.diagonal.shape[0] ** (1 / dims))),) * dims
        dtype = r.dtype
        s = jnp.linalg.norm(r)
        s_safe = jnp.where(s > 0, s, 1)
        x = (r / s_safe).reshape(grid)
        logd = jnp.log(self.diagonal).reshape(grid)
        feats = jnp.stack([x, logd - jnp.mean(logd)])
        wdtype = self.model.out.weight.dtype
        z = self.model.unet(feats.astype(wdtype)).astype(dtype)
        return s * (x + z).reshape(-1) / self.diagonal

    def __call__(self, r):
        return self.mv(r)
