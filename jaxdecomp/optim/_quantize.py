r"""4-bit block-wise quantization of orthogonal (eigenvector) matrices, as in 4-bit
Shampoo (Wang, Li, Wang & Fan, NeurIPS 2024).

Entries are normalized by the largest magnitude in their block of `QUANT_BLOCK`
consecutive entries (a float32 scale per block) and rounded to the nearest of the 16
values of the *linear-square* map $R(j) = \operatorname{sign}(x_j)\,x_j^2$,
$x_j = -1 + 2j/15$, which spends its resolution near zero where most entries of an
eigenvector matrix are. Two codes are packed into one `uint8`: an $n\times n$
matrix costs $n^2/2$ bytes plus $4n^2/64$ bytes of scales (0.5625 byte per entry
against 4 for float32, a 7.1x saving).

After dequantization the columns are no longer orthonormal; `rectify` applies
Björck steps $U \leftarrow U(3I - U^TU)/2$ (the Newton–Schulz polar iteration
started at $U$ itself, which is already close to orthogonal: one step squares the
orthogonality error).
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from .._misc import mm, mT

QUANT_BLOCK = 64
_X = -1 + 2 * np.arange(16) / 15
CODEBOOK = np.sign(_X) * _X**2  # increasing
_MIDPOINTS = (CODEBOOK[1:] + CODEBOOK[:-1]) / 2


class Quantized(NamedTuple):
    """A 4-bit matrix: packed codes (uint8, two per byte) and per-block scales."""

    codes: Array
    scales: Array


def quantize(x: Array) -> Quantized:
    size = x.size
    pad = (-size) % QUANT_BLOCK
    flat = jnp.pad(x.reshape(-1), (0, pad)).reshape(-1, QUANT_BLOCK)
    scales = jnp.max(jnp.abs(flat), axis=-1, keepdims=True)
    normalized = flat / jnp.where(scales > 0, scales, 1)
    mid = jnp.asarray(_MIDPOINTS, x.dtype)
    # index of the nearest codebook value: how many midpoints lie below (15 compares)
    flat_n = normalized.reshape(-1)
    codes = jnp.sum(flat_n[:, None] > mid[None, :], axis=-1).astype(jnp.uint8)
    if codes.size % 2:
        codes = jnp.pad(codes, (0, 1))
    pairs = codes.reshape(-1, 2)
    packed = pairs[:, 0] | (pairs[:, 1] << 4)
    return Quantized(packed, scales[:, 0].astype(x.dtype))


def dequantize(q: Quantized, shape: tuple[int, ...], dtype) -> Array:
    size = int(np.prod(shape))
    codes = jnp.stack([q.codes & 15, q.codes >> 4], axis=-1).reshape(-1)
    values = jnp.asarray(CODEBOOK, dtype)[codes.astype(jnp.int32)]
    n_blocks = q.scales.shape[0]
    values = values[: n_blocks * QUANT_BLOCK].reshape(n_blocks, QUANT_BLOCK)
    return (values * q.scales[:, None]).reshape(-1)[:size].reshape(shape)


def rectify(u: Array, steps: int = 1) -> Array:
    """Björck orthonormalization steps U <- U (3I - U^T U) / 2 (batched)."""
    eye = jnp.eye(u.shape[-1], dtype=u.dtype)
    for _ in range(steps):
        u = mm(u, 1.5 * eye - 0.5 * mm(mT(u), u))
    return u
