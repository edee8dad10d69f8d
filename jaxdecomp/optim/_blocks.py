"""Splitting parameters into square-ish matrix blocks (Distributed Shampoo's
blocking), shared by `shampoo` and `soap`.

A parameter with at least two dimensions is viewed as the most nearly square matrix
(prod(shape[:k]), prod(shape[k:])) (the split k with the smallest larger side, the
first such k on ties: a (out, in) weight stays as it is, an Equinox convolution kernel
(out, in, kh, kw) becomes (out, in kh kw) when in kh kw is the closer to out); each
side of length d is cut into ceil(d / block_size) equal blocks of length
ceil(d / ceil(d / block_size)), padding with zeros only when that does not divide d
(at most one row/column per block).
Zero padding is harmless for Shampoo and SOAP: padded rows of a gradient are zero, so
their statistics are zero, the ridge keeps the factors invertible, and the padded part
of the preconditioned update is dropped again.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax.numpy as jnp
from jaxtyping import Array


class Blocking(NamedTuple):
    shape: tuple[int, ...]
    rows: int  # the matrix view
    cols: int
    block_rows: int
    block_cols: int
    grid_rows: int
    grid_cols: int

    @property
    def n_blocks(self) -> int:
        return self.grid_rows * self.grid_cols


def _split(d: int, block_size: int) -> tuple[int, int]:
    grid = math.ceil(d / block_size)
    return math.ceil(d / grid), grid


def plan(shape: tuple[int, ...], block_size: int) -> Blocking | None:
    """The blocking of a parameter of this shape; None for scalars and vectors."""
    if len(shape) < 2 or math.prod(shape) == 0:
        return None
    splits = [
        (math.prod(shape[:k]), math.prod(shape[k:])) for k in range(1, len(shape))
    ]
    rows, cols = min(splits, key=lambda rc: max(rc))
    br, gr = _split(rows, block_size)
    bc, gc = _split(cols, block_size)
    return Blocking(tuple(shape), rows, cols, br, bc, gr, gc)


def to_blocks(x: Array, b: Blocking) -> Array:
    """(n_blocks, block_rows, block_cols)."""
    m = x.reshape(b.rows, b.cols)
    pr, pc = b.grid_rows * b.block_rows - b.rows, b.grid_cols * b.block_cols - b.cols
    if pr or pc:
        m = jnp.pad(m, ((0, pr), (0, pc)))
    m = m.reshape(b.grid_rows, b.block_rows, b.grid_cols, b.block_cols)
    return m.transpose(0, 2, 1, 3).reshape(b.n_blocks, b.block_rows, b.block_cols)


def from_blocks(blocks: Array, b: Blocking) -> Array:
    m = blocks.reshape(b.grid_rows, b.grid_cols, b.block_rows, b.block_cols)
    m = m.transpose(0, 2, 1, 3).reshape(
        b.grid_rows * b.block_rows, b.grid_cols * b.block_cols
    )
    return m[: b.rows, : b.cols].reshape(b.shape)
