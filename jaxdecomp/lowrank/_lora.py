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

from .._misc import is_conv, is_linear, mm, select_linear_layers

HI = jax.lax.Precision.HIGHEST


class LoRA(eqx.Module):
    r"""A low-rank adapter around a frozen `eqx.nn.Linear` or `eqx.nn.Conv`.

    - Linear: $y = W x + b + \tfrac{\alpha}{r} B A x$, with
      $A \in \mathbb{R}^{r \times n_{in}}$ (random) and
      $B \in \mathbb{R}^{n_{out} \times r}$ (zeros).
    - Convolution (any number of spatial dimensions, `groups=1`): a Tucker-2 update of
      the kernel, as FLoRA does, $\Delta W_{o,i,\ldots} = \tfrac{\alpha}{r}
      \sum_{a,b} B_{oa}\, G_{ab\ldots}\, A_{bi}$ with a core $G \in
      \mathbb{R}^{r\times r\times k_1\times\cdots}$ (random), $A$ (random),
      $B$ (zeros); the layer convolves with $W + \Delta W$. Trainable parameters:
      $r(c_{in} + c_{out}) + r^2 k_1\cdots k_d$ instead of $c_{out} c_{in}
      k_1\cdots k_d$.

    $B = 0$, so training starts from the wrapped layer exactly. The base weight and
    bias pass through `lax.stop_gradient`, so they are frozen: their gradients are
    exactly zero in both modes. `merge()` folds the adapter into the base weight
    (inference costs one plain layer) and `unmerge()` takes it out again; both are exact
    to rounding and work under `jit`.

    **Arguments:**

    - `layer`: an `eqx.nn.Linear` or an ungrouped `eqx.nn.Conv` (`Conv1d/2d/3d`);
        anything else is a `TypeError`.
    - `rank`: $1 \le r \le \min(n_{in}, n_{out})$ (channels for a convolution).
    - `alpha`: the scale numerator ($\alpha/r$ multiplies the update), positive.
    - `key`: initialises $A$ (uniform, $\pm 1/\sqrt{\text{fan-in}}$) and $G$
        (normal, variance $1/(r k)$).

    **Example:**

    ```python
    import equinox as eqx, jax, jax.numpy as jnp
    from jaxdecomp.lowrank import LoRA

    base = eqx.nn.Linear(16, 8, key=jax.random.key(0))
    adapted = LoRA(base, rank=4, alpha=8.0, key=jax.random.key(1))
    x = jnp.ones(16)
    assert jnp.allclose(adapted(x), base(x))  # B = 0 at start
    merged = adapted.merge()

    conv = eqx.nn.Conv2d(8, 16, 3, padding=1, key=jax.random.key(2))
    tucker = LoRA(conv, rank=2, key=jax.random.key(3))  # 2 (8 + 16) + 4 * 9 params
    ```

    **References:** Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models",
    ICLR 2022; Si et al., "FLoRA: Low-Rank Core Space for N-dimension", 2024.
    """

    base: eqx.nn.Linear | eqx.nn.Conv
    a: Float[Array, "rank in"]
    b: Float[Array, "out rank"]
    core: Float[Array, "rank rank *kernel"] | None
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
        if is_linear(layer):
            if layer.in_features == "scalar" or layer.out_features == "scalar":
                raise TypeError("LoRA: 'scalar' Linear layers are not supported.")
            n_in, n_out, taps = layer.in_features, layer.out_features, ()
        elif is_conv(layer):
            n_out, n_in, *taps = layer.weight.shape
            taps = tuple(taps)
        else:
            raise TypeError(
                "LoRA: only eqx.nn.Linear and ungrouped eqx.nn.Conv layers are "
                f"supported; got {type(layer).__name__}."
            )
        limit = min(n_in, n_out)
        if not (isinstance(rank, int) and 1 <= rank <= limit):
            raise ValueError(
                f"LoRA: rank must be an int in [1, min(in, out) = {limit}]; got "
                f"{rank!r}."
            )
        if not (isinstance(alpha, (int, float)) and alpha > 0):
            raise ValueError(f"LoRA: alpha must be a positive number; got {alpha!r}.")
        dtype = layer.weight.dtype
        ka, kg = jr.split(key)
        lim = 1 / np.sqrt(n_in * int(np.prod(taps, dtype=int)))
        self.base = layer
        self.a = jr.uniform(ka, (rank, n_in), dtype, -lim, lim)
        self.b = jnp.zeros((n_out, rank), dtype)
        if taps:
            std = float(1 / np.sqrt(rank * int(np.prod(taps))))
            self.core = std * jr.normal(kg, (rank, rank, *taps), dtype)
        else:
            self.core = None
        self.scale = float(alpha) / rank
        self.merged = merged

    @property
    def delta(self) -> Float[Array, "out in *kernel"]:
        """The adapter's weight update: (alpha / r) B A, or the Tucker-2 kernel update
        (alpha / r) B G A for a convolution."""
        if self.core is None:
            return self.scale * mm(self.b, self.a)
        return self.scale * jnp.einsum(
            "oa,ab...,bi->oi...", self.b, self.core, self.a, precision=HI
        )

    def __call__(self, x, *, key=None):
        w = jax.lax.stop_gradient(self.base.weight)
        if self.core is not None:
            # Convolve once with the effective kernel. Merged: the base already holds
            # the update; (delta - stop_gradient(delta)) is zero but keeps the
            # adapter's gradient, so training can continue after a merge.
            delta = self.delta
            if self.merged:
                delta = delta - jax.lax.stop_gradient(delta)
            base = jtu.tree_map(jax.lax.stop_gradient, self.base)
            return eqx.tree_at(lambda c: c.weight, base, w + delta)(x)
        y = jnp.matmul(w, x, precision=HI)
        if self.base.bias is not None:
            y = y + jax.lax.stop_gradient(self.base.bias)
        if self.merged:
            w_frozen_delta = jax.lax.stop_gradient(self.delta)
            adapter = jnp.matmul(self.delta - w_frozen_delta, x, precision=HI)
            return y + adapter
        ax = jnp.matmul(self.a, x, precision=HI)
        return y + self.scale * jnp.matmul(self.b, ax, precision=HI)

    @property
    def trainable_params(self) -> int:
        """Number of adapter parameters: r (in + out) (+ r^2 k for a convolution)."""
        n = self.a.size + self.b.size
        return n + (0 if self.core is None else self.core.size)

    def merge(self) -> LoRA:
        """Fold the update into the base weight (no-op if already merged)."""
        if self.merged:
            return self
        new = eqx.tree_at(lambda m: m.base.weight, self, self.base.weight + self.delta)
        return _set_merged(new, True)

    def unmerge(self) -> LoRA:
        """Take the update out of the base weight (no-op if not merged)."""
        if not self.merged:
            return self
        new = eqx.tree_at(lambda m: m.base.weight, self, self.base.weight - self.delta)
        return _set_merged(new, False)

    def to_linear(self) -> eqx.nn.Linear | eqx.nn.Conv:
        """The plain wrapped layer type with the adapter folded in (deployment)."""
        return self.merge().base


def _set_merged(layer: LoRA, merged: bool) -> LoRA:
    # `merged` is a static field, so flipping it needs a new instance; this is how
    # Equinox itself rebuilds modules when unflattening (no __init__ call).
    out = object.__new__(LoRA)
    for field in ("base", "a", "b", "core", "scale"):
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
    r"""Wrap selected `eqx.nn.Linear` / `eqx.nn.Conv` layers of a model in
    [`LoRA`][jaxdecomp.lowrank.LoRA] adapters (Tucker-2 adapters for convolutions),
    by tree surgery (`eqx.tree_at`).

    **Arguments:**

    - `model`: any pytree (an Equinox model).
    - `rank`, `alpha`: as for `LoRA` (same for every wrapped layer).
    - `where`: `model -> layer or sequence of layers` selecting which layers to wrap
        (as in `eqx.tree_at`); default every `eqx.nn.Linear` and ungrouped
        `eqx.nn.Conv`.
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
    where, layers, single = select_linear_layers(model, where, "lora", convs=True)
    keys = jr.split(key, len(layers))
    wrapped = [LoRA(layer, rank, alpha, key=k) for layer, k in zip(layers, keys)]
    return eqx.tree_at(where, model, wrapped[0] if single else wrapped)


def trainable(model: Any) -> Any:
    """Filter spec of the trainable leaves of a LoRA-adapted model.

    **Arguments:** `model`, any pytree containing [`LoRA`][jaxdecomp.lowrank.LoRA]
    layers.

    **Returns:** a pytree of bools like `model`: True exactly for the adapter factors
    `a`, `b` (and `core` for convolutions); for `eqx.partition` / `eqx.filter` /
    `optax.masked`.

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
            if x.core is not None:
                spec = eqx.tree_at(lambda m: m.core, spec, True)
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
