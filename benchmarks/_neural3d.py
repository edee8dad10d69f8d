"""A 3-D prototype of `solvers.NeuralInverse`'s architecture, for the issue-16
measurement "NeuralInverse at size ... and in 3-D" (the library's network is 2-D
only). Not library code: the same structure as `solvers.NeuralInverse` (a lifting
convolution, residual blocks of two 3x3x3 convolutions, 2x2x2 average pooling,
nearest upsampling, 1x1x1 merges of the skip connections, a zero-initialised output
convolution, float32 parameters) and the same preconditioner,
M^{-1}(r) = s D^{-1}(r/s + UNet(r/s, log diag(A) - mean)), s = ||r||, on
`solvers.problems.Diffusion3D` operators (Dirichlet boundary = zero padding)."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr

from solvers._preconditioners.neural_inverse import _Block


def _Block3(width, key):
    return _Block(width, key, dims=3)


def _pool3(h):  # 2 x 2 x 2 average pooling of (channels, n, n, n)
    c, n = h.shape[0], h.shape[1]
    return h.reshape(c, n // 2, 2, n // 2, 2, n // 2, 2).mean(axis=(2, 4, 6))


def _upsample3(h):  # nearest-neighbour 2x upsampling in the three grid axes
    for axis in (1, 2, 3):
        h = jnp.repeat(h, 2, axis=axis)
    return h


class NeuralInverse3D(eqx.Module):
    """`model(op)` -> a nonlinear preconditioner for flexible CG on a 3-D grid."""

    lift: eqx.nn.Conv3d
    down: list[_Block]
    bottom: _Block
    merge: list[eqx.nn.Conv3d]
    up: list[_Block]
    out: eqx.nn.Conv3d

    def __init__(self, key, width: int = 16, levels: int = 3):
        keys = iter(jr.split(key, 3 * levels + 3))
        self.lift = eqx.nn.Conv3d(2, width, 3, padding=1, key=next(keys))
        self.down = [_Block3(width, next(keys)) for _ in range(levels - 1)]
        self.bottom = _Block3(width, next(keys))
        self.merge = [
            eqx.nn.Conv3d(2 * width, width, 1, key=next(keys))
            for _ in range(levels - 1)
        ]
        self.up = [_Block3(width, next(keys)) for _ in range(levels - 1)]
        out = eqx.nn.Conv3d(width, 1, 3, padding=1, key=next(keys))
        self.out = eqx.tree_at(
            lambda c: (c.weight, c.bias),
            out,
            (jnp.zeros_like(out.weight), jnp.zeros_like(out.bias)),
        )
        for name in ("lift", "down", "bottom", "merge", "up", "out"):
            setattr(
                self,
                name,
                jax.tree_util.tree_map(
                    lambda p: p.astype(jnp.float32) if eqx.is_inexact_array(p) else p,
                    getattr(self, name),
                ),
            )

    def unet(self, x):
        h = self.lift(x)
        skips = []
        for block in self.down:
            h = block(h)
            skips.append(h)
            h = _pool3(h)
        h = self.bottom(h)
        for block, merge, skip in zip(self.up, self.merge, reversed(skips)):
            h = block(merge(jnp.concatenate([_upsample3(h), skip], axis=0)))
        return self.out(h)[0]

    def __call__(self, op):
        return _Preconditioner3D(self, op.diagonal())


class _Preconditioner3D(eqx.Module):
    model: NeuralInverse3D
    diagonal: jax.Array

    def mv(self, r):
        n = round(self.diagonal.shape[0] ** (1 / 3))
        s = jnp.linalg.norm(r)
        s_safe = jnp.where(s > 0, s, 1)
        x = (r / s_safe).reshape(n, n, n)
        logd = jnp.log(self.diagonal).reshape(n, n, n)
        feats = jnp.stack([x, logd - jnp.mean(logd)]).astype(jnp.float32)
        z = self.model.unet(feats).astype(r.dtype)
        return s * (x + z).reshape(-1) / self.diagonal

    def __call__(self, r):
        return self.mv(r)
