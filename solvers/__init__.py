"""solvers: optimal transport (Sinkhorn, Sinkhorn-Newton) and preconditioned Krylov
solvers with learned preconditioners, built on `jaxdecomp`.

This package may import `jaxdecomp`; `jaxdecomp` never imports it.
"""

from . import problems as problems
from ._cg import CGSolution as CGSolution, cg as cg
from ._geometry import (
    AbstractGeometry as AbstractGeometry,
    Geometry as Geometry,
    PointCloud as PointCloud,
)
from ._sinkhorn import sinkhorn as sinkhorn
from ._sinkhorn_newton import sinkhorn_newton as sinkhorn_newton
from ._solution import RESULTS as RESULTS, OTSolution as OTSolution
