"""Seeded test problems for the linear solvers (structured-grid diffusion)."""

from ._diffusion import (
    Diffusion2D as Diffusion2D,
    diffusion_2d as diffusion_2d,
    poisson_2d as poisson_2d,
)
