"""Seeded test problems for the linear solvers (structured-grid diffusion)."""

from ._diffusion import (
    Diffusion2D as Diffusion2D,
    anisotropic_2d as anisotropic_2d,
    diffusion_2d as diffusion_2d,
    heat_steps as heat_steps,
    poisson_2d as poisson_2d,
)
