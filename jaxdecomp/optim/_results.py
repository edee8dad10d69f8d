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
    root_failed = (
        "A preconditioner refresh gave a non-finite root (or eigenbasis); the last "
        "good one was kept (the identity before the first success)."
    )
