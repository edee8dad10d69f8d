"""LoRA adapters: `LoRA`, `lora` (tree surgery), `merge`/`unmerge`, `trainable`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from .._misc import mm, select_linear_layers

HI = jax.lax.Precision.HIGHEST


class LoRA(eqx.Module):
    r"""A low-rank adapter around a frozen `eqx.nn.Linear`:
    $y = W x + b + \tfrac{\alpha}{r} B A x$, with $A \in \mathbb{R}^{r \times n_{in}}$
    (random) and $B \in \mathbb{R}^{n_{out} \times r}$ (zeros, so training starts
    from the wrapped layer exactly).

    The base weight and bias pass through `lax.stop_gradient`, so they are frozen:
    their gradients are exactly zero in both modes. `merge()` folds the adapter into
    the base weight (inference costs one matmul) and `unmerge()` takes it out again;
    both are exact to rounding and work under `jit`.

    **Arguments:**

    - `layer`: an `eqx.nn.Linear` (convolutions are not supported yet: `TypeError`).
    - `rank`: $1 \le r \le \min(n_{in}, n_{out})$.
    - `alpha`: the scale numerator ($\alpha/r$ multiplies $BA$), positive.
    - `key`: initialises $A$ (uniform, $\pm 1/\sqrt{n_{in}}$).

    **Example:**

    ```python
    import equinox as eqx, jax, jax.numpy as jnp
    from jaxdecomp.lowrank import LoRA

    base = eqx.nn.Linear(16, 8, key=jax.random.key(0))
    adapted = LoRA(base, rank=4, alpha=8.0, key=jax.random.key(1))
    x = jnp.ones(16)
    assert jnp.allclose(adapted(x), base(x))  # B = 0 at start
    merged = adapted.merge()
    ```

    **Reference:** Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models",
    ICLR 2022.
    """

    base: eqx.nn.Linear
    a: Float[Array, "rank in"]
    b: Float[Array, "out rank"]
    scale: float = eqx.field(static=True)
    merged: bool = eqx.field(static=True)

    def __init__(
        self,
        layer,
        rank: int,
        alpha: float = 1.0,
        *,
        key: PRNGKeyArray,
        merged: bool = False,
    ):
        if not isinstance(layer, eqx.nn.Linear):
            raise TypeError(
                "LoRA: only eqx.nn.Linear layers are supported; got "
                f"{type(layer).__name__}."
            )
        if layer.in_features == "scalar" or layer.out_features == "scalar":
            raise TypeError("LoRA: 'scalar' Linear layers are not supported.")
        limit = min(layer.in_features, layer.out_features)
        if not (isinstance(rank, int) and 1 <= rank <= limit):
            raise ValueError(
                f"LoRA: rank must be an int in [1, min(in, out) = {limit}]; got "
                f"{rank!r}."
            )
        if not (isinstance(alpha, (int, float)) and alpha > 0):
            raise ValueError(f"LoRA: alpha must be a positive number; got {alpha!r}.")
        dtype = layer.weight.dtype
        lim = 1 / np.sqrt(layer.in_features)
        self.base = layer
        self.a = jr.uniform(key, (rank, layer.in_features), dtype, -lim, lim)
        self.b = jnp.zeros((layer.out_features, rank), dtype)
        self.scale = float(alpha) / rank
        self.merged = merged

    @property
    def delta(self) -> Float[Array, "out in"]:
        """The adapter's weight update (alpha / r) B A."""
        return self.scale * mm(self.b, self.a)

    def __call__(self, x: Float[Array, " in"], *, key=None) -> Float[Array, " out"]:
        w = jax.lax.stop_gradient(self.base.weight)
        y = jnp.matmul(w, x, precision=HI)
        if self.base.bias is not None:
            y = y + jax.lax.stop_gradient(self.base.bias)
        if self.merged:
            # The base weight already holds the update; the adapter still gets its
            # gradient so that training can continue after a merge.
            w_frozen_delta = jax.lax.stop_gradient(self.delta)
            adapter = jnp.matmul(self.delta - w_frozen_delta, x, precision=HI)
            return y + adapter
        ax = jnp.matmul(self.a, x, precision=HI)
        return y + self.scale * jnp.matmul(self.b, ax, precision=HI)

    def merge(self) -> LoRA:
        """Fold (alpha/r) B A into the base weight (no-op if already merged)."""
        if self.merged:
            return self
        new = eqx.tree_at(lambda m: m.base.weight, self, self.base.weight + self.delta)
        return _set_merged(new, True)

    def unmerge(self) -> LoRA:
        """Take (alpha/r) B A out of the base weight (no-op if not merged)."""
        if not self.merged:
            return self
        new = eqx.tree_at(lambda m: m.base.weight, self, self.base.weight - self.delta)
        return _set_merged(new, False)

    def to_linear(self) -> eqx.nn.Linear:
        """A plain `eqx.nn.Linear` with the adapter folded in (for deployment)."""
        return self.merge().base


def _set_merged(layer: LoRA, merged: bool) -> LoRA:
    # `merged` is a static field, so flipping it needs a new instance; this is how
    # Equinox itself rebuilds modules when unflattening (no __init__ call).
    out = object.__new__(LoRA)
    for field in ("base", "a", "b", "scale"):
        object.__setattr__(out, field, getattr(layer, field))
    object.__setattr__(out, "merged", merged)
    return out


def _is_lora(x) -> bool:
    return isinstance(x, LoRA)


def lora(
    model: Any,
    rank: int,
    alpha: float = 1.0,
    *,
    where: Callable[[Any], Any] | None = None,
    key: PRNGKeyArray,
) -> Any:
    r"""Wrap selected `eqx.nn.Linear` layers of a model in
    [`LoRA`][jaxdecomp.lowrank.LoRA] adapters, by tree surgery (`eqx.tree_at`).

    **Arguments:**

    - `model`: any pytree (an Equinox model).
    - `rank`, `alpha`: as for `LoRA` (same for every wrapped layer).
    - `where`: `model -> layer or sequence of layers` selecting which `eqx.nn.Linear`
        layers to wrap (as in `eqx.tree_at`); default all of them.
    - `key`: split across the wrapped layers.

    **Returns:** the model with the selected layers replaced. The base weights of the
    wrapped layers are frozen by the adapters themselves; to freeze *everything else*
    too (as LoRA fine-tuning does), train only
    `eqx.filter(model, trainable(model))`, e.g. `eqx.partition(model,
    trainable(model))`.

    **Example:**

    ```python
    import equinox as eqx, jax
    from jaxdecomp.lowrank import lora, trainable

    mlp = eqx.nn.MLP(8, 2, width_size=16, depth=2, key=jax.random.key(0))
    adapted = lora(mlp, rank=2, alpha=4.0, key=jax.random.key(1))
    params, frozen = eqx.partition(adapted, trainable(adapted))
    ```
    """
    where, layers, single = select_linear_layers(model, where, "lora")
    keys = jr.split(key, len(layers))
    wrapped = [LoRA(layer, rank, alpha, key=k) for layer, k in zip(layers, keys)]
    return eqx.tree_at(where, model, wrapped[0] if single else wrapped)


def trainable(model: Any) -> Any:
    """Filter spec of the trainable leaves of a LoRA-adapted model.

    **Arguments:** `model`, any pytree containing [`LoRA`][jaxdecomp.lowrank.LoRA]
    layers.

    **Returns:** a pytree of bools like `model`: True exactly for the adapter factors
    `a` and `b`; for `eqx.partition` / `eqx.filter` / `optax.masked`.

    **Example:**

    ```python
    import equinox as eqx, jax
    from jaxdecomp.lowrank import lora, trainable

    mlp = eqx.nn.MLP(4, 2, width_size=8, depth=1, key=jax.random.key(0))
    adapted = lora(mlp, rank=2, key=jax.random.key(1))
    params, frozen = eqx.partition(adapted, trainable(adapted))
    ```
    """

    def spec_of(x):
        spec = jtu.tree_map(lambda _: False, x)
        if _is_lora(x):
            spec = eqx.tree_at(lambda m: (m.a, m.b), spec, (True, True))
        return spec

    return jtu.tree_map(spec_of, model, is_leaf=_is_lora)


def merge(model: Any) -> Any:
    """Merge every LoRA adapter in `model` into its base weight (see `LoRA.merge`).

    **Arguments:** `model`, any pytree. **Returns:** the model with every `LoRA` merged
    (exact to rounding; works under `jit`).

    **Example:**

    ```python
    import equinox as eqx, jax
    from jaxdecomp.lowrank import lora, merge, unmerge

    mlp = eqx.nn.MLP(4, 2, width_size=8, depth=1, key=jax.random.key(0))
    merged = merge(lora(mlp, rank=2, key=jax.random.key(1)))
    restored = unmerge(merged)
    ```
    """
    return jtu.tree_map(
        lambda x: x.merge() if _is_lora(x) else x, model, is_leaf=_is_lora
    )


def unmerge(model: Any) -> Any:
    """Undo [`merge`][jaxdecomp.lowrank.merge] for every LoRA adapter in `model`.

    **Arguments:** `model`, any pytree. **Returns:** the model with every merged
    `LoRA` unmerged.

    **Example:**

    ```python
    import equinox as eqx, jax
    from jaxdecomp.lowrank import lora, merge, unmerge

    layer = lora(eqx.nn.Linear(3, 3, key=jax.random.key(0)), 1, key=jax.random.key(1))
    assert not unmerge(merge(layer)).merged
    ```
    """
    return jtu.tree_map(
        lambda x: x.unmerge() if _is_lora(x) else x, model, is_leaf=_is_lora
    )
