"""A 3-D prototype of `solvers.NeuralInverse`, for the issue-16 measurement
"NeuralInverse at size ... and in 3-D" (the library's network is 2-D only). Not
library code: the library's U-Net layers built with 3-D convolutions
(`_unet_layers(dims=3)`: 3x3x3 residual blocks, 2x2x2 pooling, nearest upsampling,
zero-initialised output, float32 parameters) and the library's preconditioner,
M^{-1}(r) = s D^{-1}(r/s + UNet(r/s, log diag(A) - mean)), s = ||r||, on
`solvers.problems.Diffusion3D` operators (Dirichlet boundary = zero padding)."""

from __future__ import annotations

import jax.numpy as jnp

import solvers
from solvers._preconditioners.neural_inverse import _unet_layers


class NeuralInverse3D(solvers.NeuralInverse):
    """`model(op)` -> a nonlinear preconditioner for flexible CG on a 3-D grid."""

    def __init__(self, key, width: int = 16, levels: int = 3):
        for name, layer in _unet_layers(key, width, levels, 3, jnp.float32).items():
            setattr(self, name, layer)

    def __call__(self, op):
        return solvers.NetworkPreconditioner(self, op.diagonal())
