"""Online choice of the SSOR relaxation parameter by a multi-armed bandit."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray


class OmegaBandit(eqx.Module):
    """Choose the SSOR/SOR relaxation parameter $\\omega$ online across a sequence of
    related linear systems, from the iteration counts alone (Khodak et al., ICLR
    2024): an Exp3 bandit over a grid of candidate values.

    Round $t$: draw arm $i \\sim p_t$ with
    $p_t \\propto \\exp(-\\eta_t \\hat L_i)$, $\\eta_t = \\sqrt{\\log K / (t K)}$;
    solve with $\\omega_i$; observe the cost $c \\in [0, 1]$ (iterations divided by
    `max_cost`) and update the importance-weighted cumulative loss
    $\\hat L_i \\mathrel{+}= c / p_{t,i}$. The expected total cost is within
    $O(\\sqrt{T K \\log K})$ of the best fixed candidate in hindsight, with no
    assumption on how the systems vary. Purely functional: `update` returns a new
    bandit, so the whole loop can run under `jit`/`lax.scan`.

    **Arguments:**

    - `omegas`: candidate values in (0, 2) (default 20 values from 1.0 to 1.95).
    - `max_cost`: the cost normalizer (e.g. CG's `max_steps`).

    **Example:**

    ```python
    import jax, jax.numpy as jnp
    import solvers

    base = solvers.problems.poisson_2d(16)
    ops = solvers.problems.heat_steps(base, jnp.full(3, 1e-2))
    bandit, key = solvers.OmegaBandit(max_cost=500), jax.random.key(0)
    for t in range(3):
        key, sub = jax.random.split(key)
        op = jax.tree_util.tree_map(lambda x: x[t], ops)
        arm, omega = bandit.sample(sub)
        sol = solvers.cg(op, jnp.ones(256), preconditioner=solvers.SSOR(op, omega),
                         max_steps=500)
        bandit = bandit.update(arm, sol.n_steps)
    print(bandit.best())
    ```

    Reference: Khodak, Chow, Balcan & Talwalkar, "Learning to relax: setting solver
    parameters across a sequence of linear system instances", ICLR 2024.
    """

    omegas: Float[Array, " k"]
    losses: Float[Array, " k"]
    rounds: Int[Array, ""]
    max_cost: float = eqx.field(static=True)

    def __init__(
        self,
        omegas: Float[ArrayLike, " k"] | None = None,
        *,
        max_cost: float,
    ):
        omegas = jnp.linspace(1.0, 1.95, 20) if omegas is None else jnp.asarray(omegas)
        if omegas.ndim != 1 or omegas.shape[0] < 2:
            raise ValueError(
                "OmegaBandit: omegas must be a vector of >= 2 values; got "
                f"{omegas.shape}."
            )
        if not isinstance(omegas, jax.core.Tracer) and not np.all(
            (np.asarray(omegas) > 0) & (np.asarray(omegas) < 2)
        ):
            raise ValueError("OmegaBandit: every omega must lie in (0, 2).")
        if not max_cost > 0:
            raise ValueError(f"OmegaBandit: max_cost must be > 0; got {max_cost}.")
        self.omegas = omegas
        self.losses = jnp.zeros_like(omegas)
        self.rounds = jnp.array(0)
        self.max_cost = float(max_cost)

    def probabilities(self) -> Float[Array, " k"]:
        k = self.omegas.shape[0]
        t = jnp.maximum(self.rounds, 1).astype(self.losses.dtype)
        eta = jnp.sqrt(jnp.log(k) / (t * k))
        z = -eta * (self.losses - self.losses.min())
        p = jnp.exp(z)
        return p / p.sum()

    def sample(self, key: PRNGKeyArray) -> tuple[Int[Array, ""], Float[Array, ""]]:
        """Draw an arm; returns `(arm, omega)`."""
        arm = jr.choice(key, self.omegas.shape[0], p=self.probabilities())
        return arm, self.omegas[arm]

    def update(self, arm, cost) -> OmegaBandit:
        """Record the cost (e.g. CG iterations) of the drawn arm."""
        p = self.probabilities()[arm]
        c = jnp.clip(jnp.asarray(cost, self.losses.dtype) / self.max_cost, 0, 1)
        return eqx.tree_at(
            lambda b: (b.losses, b.rounds),
            self,
            (self.losses.at[arm].add(c / p), self.rounds + 1),
        )

    def best(self) -> Float[Array, ""]:
        """The candidate with the smallest estimated cumulative cost."""
        return self.omegas[jnp.argmin(self.losses)]
