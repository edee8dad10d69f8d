"""Seeded test problems for the linear solvers (structured-grid diffusion)."""

from ._diffusion import (
    Diffusion2D as Diffusion2D,
    Diffusion3D as Diffusion3D,
    anisotropic_2d as anisotropic_2d,
    diffusion_2d as diffusion_2d,
    diffusion_3d as diffusion_3d,
    heat_steps as heat_steps,
    poisson_2d as poisson_2d,
    poisson_3d as poisson_3d,
)
