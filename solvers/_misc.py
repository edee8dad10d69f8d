"""Small helpers shared across `solvers`."""

from __future__ import annotations

import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array


def mv(p: Array, x: Array) -> Array:
    """`p @ x` at HIGHEST precision (no TF32 inside iterations)."""
    return jnp.matmul(p, x, precision=lax.Precision.HIGHEST)
