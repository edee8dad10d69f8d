"""solvers: optimal transport (Sinkhorn, Sinkhorn-Newton) and preconditioned Krylov
solvers with learned preconditioners, built on `jaxdecomp`.

This package may import `jaxdecomp`; `jaxdecomp` never imports it.
"""
