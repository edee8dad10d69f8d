"""jaxdecomp: differentiable matrix functions, low-rank layers and implicit
differentiation for JAX."""

from ._implicit import (
    custom_fixed_point as custom_fixed_point,
    custom_root as custom_root,
)

__version__ = "0.1.0"
