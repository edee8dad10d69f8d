"""jaxdecomp: differentiable matrix functions, low-rank layers and implicit
differentiation for JAX."""

from . import lowrank as lowrank, optim as optim
from ._implicit import (
    custom_fixed_point as custom_fixed_point,
    custom_root as custom_root,
    root_jvp as root_jvp,
    root_vjp as root_vjp,
)
from ._inv_pth_root import inv_pth_root as inv_pth_root
from ._linear_solvers import (
    TrueResidualCG as TrueResidualCG,
    TrueResidualGMRES as TrueResidualGMRES,
)
from ._lyapunov import solve_lyapunov as solve_lyapunov
from ._polar import polar as polar
from ._solution import (
    RESULTS as RESULTS,
    MatrixFunctionSolution as MatrixFunctionSolution,
)
from ._sqrtm import (
    inv_sqrtm as inv_sqrtm,
    sqrtm as sqrtm,
    sqrtm_and_inv_sqrtm as sqrtm_and_inv_sqrtm,
)

__version__ = "0.1.0"
