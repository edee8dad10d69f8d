"""Result codes of the matrix-root optimizers."""

from __future__ import annotations

import equinox as eqx


class RESULTS(eqx.Enumeration):
    """Result codes kept in the state of `jaxdecomp.optim`'s optimizers (field
    `result`, the code of the latest step)."""

    successful = ""
    nonfinite_gradient = (
        "The gradient contains NaN or inf. With throw=False the step was skipped: the "
        "update is zero and the optimizer state is unchanged."
    )
    overflow = (
        "The gradient is finite but the optimizer's statistics or update overflowed "
        "(e.g. squares of entries near 1e30 in float32). With throw=False the step was "
        "skipped: the update is zero and the optimizer state is unchanged. Scale the "
        "loss down or keep the state in float64 (state_dtype)."
    )
    root_failed = (
        "A preconditioner refresh gave a non-finite root (or eigenbasis); the last "
        "good one was kept (the identity before the first success)."
    )
