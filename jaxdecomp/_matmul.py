r"""Float32 matmuls on tensor cores at (near) float32 accuracy: the `precision=`
schemes of the Newton–Schulz paths.

A float32 matmul at `HIGHEST` precision runs on an H100's CUDA cores (67 TFLOP/s);
its tensor cores multiply bfloat16 (990 TFLOP/s dense) or TF32 (495). One pass in
either format is 1e-3 .. 3e-4 wrong, which a Newton–Schulz iteration does not
correct. Splitting each operand into a sum of low-precision parts and multiplying
the parts recovers the lost bits (the "3xTF32" scheme of CUTLASS, the
`BF16_BF16_F32_X3/X6` algorithms of XLA):

- `"bf16x3"`: $a = a_1 + a_2$ (bfloat16 parts, 16 significant bits);
  $ab \approx a_1b_1 + a_1b_2 + a_2b_1$, 3 bfloat16 products, relative error about
  $2^{-16}$ per product (the dropped $a_2b_2$ and the rounding of $a_2$).
- `"bf16x6"`: $a = a_1 + a_2 + a_3$ (24 bits: all of float32's significand);
  the 6 products of total order $\le 2$, about $2^{-24}$: float32 accuracy.
- `"tf32x3"`: $a = a_1 + a_2$ with TF32 parts (11 significant bits each, 22 in all),
  $a_1b_1 + a_1b_2 + a_2b_1$: about $2^{-22}$.
- `"highest"` (the default): one float32 matmul at `Precision.HIGHEST`.

Every product of the parts is exact in float32 (8 + 8 or 11 + 11 bits) and is
accumulated in float32, so the result does not depend on where it runs, up to the
order of the float32 accumulation: the parts are formed here in JAX and the
low-precision matmuls are explicit (bfloat16 operands with
`preferred_element_type=float32`; TF32 parts rounded here and multiplied by XLA's
`TF32_TF32_F32` algorithm on GPU, at `HIGHEST` on the CPU, where it is exact for
TF32 values). That is what lets the CPU measure the accuracy a GPU will get: XLA's
own `BF16_BF16_F32_X3` preset is ignored on the CPU (it computes in float32), so it
cannot be tested there.

The schemes apply to float32 input; float64 input always runs float64 matmuls
(`HIGHEST`), whatever is asked for.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array

from ._misc import mm

PRECISIONS = ("highest", "bf16x3", "bf16x6", "tf32x3")
Precision = Literal["highest", "bf16x3", "bf16x6", "tf32x3"]

# The unit roundoff each scheme's products behave like (`_drive`'s rounding floor
# uses it): float32's eps for the exact-to-float32 ones.
_UNIT = {"bf16x3": 2.0**-15, "tf32x3": 2.0**-21, "bf16x6": 2.0**-23}


def check_precision(precision, name: str) -> str:
    """Trace-time check of a `precision=` argument."""
    if precision not in PRECISIONS:
        raise ValueError(
            f"{name}: precision must be one of {PRECISIONS}; got {precision!r}."
        )
    return precision


def round_to_tf32(x: Array) -> Array:
    """float32 `x` rounded to nearest (ties to even) to TF32's 10 explicit
    significand bits. Finite input only (it is the caller's: the roots replace
    non-finite input before iterating)."""
    bits = lax.bitcast_convert_type(x, jnp.uint32)
    half = jnp.uint32(0xFFF) + ((bits >> 13) & jnp.uint32(1))
    bits = (bits + half) & jnp.uint32(0xFFFFE000)
    return lax.bitcast_convert_type(bits, jnp.float32)


def _bf16_parts(x: Array, k: int) -> list[Array]:
    parts = []
    rest = x
    for _ in range(k):
        part = rest.astype(jnp.bfloat16)
        parts.append(part)
        rest = rest - part.astype(jnp.float32)
    return parts


def _bf16_dot(a: Array, b: Array) -> Array:
    return jnp.matmul(a, b, preferred_element_type=jnp.float32)


def _tf32_dot(a: Array, b: Array) -> Array:
    """Product of TF32-valued float32 arrays: exact products, float32 sums."""
    return lax.platform_dependent(
        a,
        b,
        cuda=lambda a, b: jnp.matmul(
            a, b, precision=lax.DotAlgorithmPreset.TF32_TF32_F32
        ),
        default=mm,
    )


def _split_matmul(parts, dot, orders) -> Callable[[Array, Array], Array]:
    def matmul(a, b):
        pa, pb = parts(a), parts(b)
        # the smallest terms first
        out = None
        for order in reversed(orders):
            term = None
            for i, j in order:
                t = dot(pa[i], pb[j])
                term = t if term is None else term + t
            out = term if out is None else out + term
        return out

    return matmul


_ORDERS = {
    "bf16x3": [[(0, 0)], [(0, 1), (1, 0)]],
    "tf32x3": [[(0, 0)], [(0, 1), (1, 0)]],
    "bf16x6": [[(0, 0)], [(0, 1), (1, 0)], [(0, 2), (2, 0), (1, 1)]],
}


def scheme_matmul(precision: str, dtype) -> tuple[Callable, float | None]:
    """(matmul, unit roundoff or None for the dtype's own) of a `precision=` scheme
    for `dtype` input. float64 (and `"highest"`) give the HIGHEST-precision `mm`."""
    if precision == "highest" or jnp.dtype(dtype) != jnp.float32:
        return mm, None
    if precision == "tf32x3":

        def parts(x):
            hi = round_to_tf32(x)
            return [hi, round_to_tf32(x - hi)]

        dot = _tf32_dot
    else:
        k = 3 if precision == "bf16x6" else 2

        def parts(x):
            return _bf16_parts(x, k)

        dot = _bf16_dot
    return _split_matmul(parts, dot, _ORDERS[precision]), _UNIT[precision]
