"""Result codes and the solution type of the matrix functions."""

from __future__ import annotations

import equinox as eqx
from jaxtyping import Array, Float, Int


class RESULTS(eqx.Enumeration):
    """Result codes of `jaxdecomp`'s matrix functions."""

    successful = ""
    max_steps_reached = (
        "The iteration did not reach its tolerance within `max_steps` steps. The input "
        "may be indefinite or singular, or worse conditioned than the method handles; "
        "try method='eigh'."
    )
    nonfinite_input = "The input contains NaN or inf."
    not_symmetric = (
        "The input is not symmetric: ||A - A^T||_F > sqrt(eps) ||A||_F. Pass a "
        "symmetric matrix, e.g. (A + A^T) / 2."
    )
    indefinite = (
        "The input is not positive semidefinite: it has an eigenvalue below "
        "-sqrt(eps) ||A||_2 (or a negative diagonal entry); inverse roots need a "
        "positive definite input (after the ridge)."
    )
    inaccurate = (
        "The result does not satisfy its defining equation to sqrt(eps) accuracy "
        "(relative residual or error estimate too large); the input is probably not "
        "positive definite, or too ill-conditioned for the method. Try "
        "method='eigh'."
    )
    singular = (
        "The input is singular, or numerically singular at this precision: the "
        "inverse root fails its defining equation (||Y A Y - I||_F / sqrt(n) > 10 "
        "sqrt(eps)), because an eigenvalue is zero or too small to be resolved. Add a "
        "ridge (A + delta I), or use float64."
    )
    rank_deficient = (
        "The input is numerically rank deficient (a singular value is below "
        "max(m, n) eps times the largest), so its polar factor is not unique and has "
        "no derivative."
    )


class MatrixFunctionSolution(eqx.Module):
    """What `full_output=True` returns.

    - `value`: the requested matrix (or a tuple of them for `sqrtm_and_inv_sqrtm`).
    - `result`: a [`jaxdecomp.RESULTS`][] code (batched like the input's leading dims
        are reduced: one code for the whole call).
    - `n_steps`: iterations taken (0 for direct methods).
    - `residual`: the relative residual of the defining equation:
        `||X X - A||_F / ||A||_F` for the square root (also for
        `sqrtm_and_inv_sqrtm`), `||Y A Y - I||_F / sqrt(n)` for the inverse root,
        `||U^T U - I||_F / sqrt(n)` for the polar factor.
    """

    value: Array | tuple[Array, ...]
    result: RESULTS
    n_steps: Int[Array, ""]
    residual: Float[Array, ""]
