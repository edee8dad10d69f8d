"""solvers: optimal transport (Sinkhorn, Sinkhorn-Newton) and preconditioned Krylov
solvers with learned preconditioners, built on `jaxdecomp`.

This package may import `jaxdecomp`; `jaxdecomp` never imports it.
"""

from . import problems as problems
from ._cg import CGSolution as CGSolution, cg as cg
from ._divergence import (
    SinkhornDivergence as SinkhornDivergence,
    sinkhorn_divergence as sinkhorn_divergence,
)
from ._geometry import (
    AbstractGeometry as AbstractGeometry,
    Geometry as Geometry,
    PointCloud as PointCloud,
)
from ._preconditioners._base import AbstractPreconditioner as AbstractPreconditioner
from ._preconditioners.chebyshev import Chebyshev as Chebyshev
from ._preconditioners.incomplete_cholesky import (
    IncompleteCholesky as IncompleteCholesky,
)
from ._preconditioners.jacobi import Jacobi as Jacobi
from ._preconditioners.multigrid import Multigrid as Multigrid
from ._preconditioners.neural_fsai import (
    FactorizedInverse as FactorizedInverse,
    NeuralFSAI as NeuralFSAI,
    a_norm_loss as a_norm_loss,
)
from ._preconditioners.neural_ic import (
    NeuralIC as NeuralIC,
    solution_weighted_loss as solution_weighted_loss,
)
from ._preconditioners.neural_inverse import (
    NetworkPreconditioner as NetworkPreconditioner,
    NeuralInverse as NeuralInverse,
)
from ._preconditioners.omega_bandit import OmegaBandit as OmegaBandit
from ._preconditioners.ssor import SSOR as SSOR
from ._sequence import (
    SequenceSolution as SequenceSolution,
    solve_sequence as solve_sequence,
)
from ._sinkhorn import sinkhorn as sinkhorn
from ._sinkhorn_newton import sinkhorn_newton as sinkhorn_newton
from ._solution import RESULTS as RESULTS, OTSolution as OTSolution
from ._sparse import SparseMatrix as SparseMatrix, SparsityPattern as SparsityPattern
from ._sparse_k import sparse_k as sparse_k
from ._train import train_preconditioner as train_preconditioner
