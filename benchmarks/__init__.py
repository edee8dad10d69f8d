"""Benchmarks of jaxdecomp and solvers against their anchors: `python -m benchmarks`."""
