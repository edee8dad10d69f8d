"""Post-hoc compression of trained dense layers, and a compression report."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np

from .._misc import is_conv, is_linear, select_linear_layers, truncation_rank
from .._sqrtm import sqrtm_and_inv_sqrtm
from ._layers import FactorizedLinear, LowRankLinear
from ._lora import LoRA
from ._tucker import TuckerConv2d, tucker2, tucker2_spectra


def _budget_ranks(energies, costs, budget: int) -> list[int]:
    """Greedy global allocation: take rank-1 components (layer l's k-th costs
    costs[l](k) parameters and captures energies[l][k]) in order of captured energy per
    parameter until the budget is spent; at least rank 1 everywhere."""
    ranks = [1] * len(energies)
    spent = sum(cost(0) for cost in costs)
    if spent > budget:
        raise ValueError(
            f"compress: budget {budget} is below the minimum {spent} "
            "(rank 1 everywhere)."
        )
    candidates = sorted(
        (
            (e[k] / costs[layer](k), layer, k)
            for layer, e in enumerate(energies)
            for k in range(1, len(e))
        ),
        reverse=True,
    )
    for _, layer, k in candidates:
        cost = costs[layer](k)
        if k == ranks[layer] and spent + cost <= budget:
            ranks[layer] += 1
            spent += cost
    return ranks


def _tucker_layer(layer, r_out, r_in):
    """A `TuckerConv2d` holding the truncated HOSVD of a trained `eqx.nn.Conv2d`."""
    w = np.asarray(layer.weight, np.float64)
    o, i, kh, kw = w.shape
    r_out = max(1, min(r_out, o, r_in * kh * kw))
    r_in = max(1, min(r_in, i, r_out * kh * kw))
    uo, core, ui = tucker2(w, r_out, r_in)
    pad = layer.padding
    new = TuckerConv2d(
        i,
        o,
        (kh, kw),
        (r_out, r_in),
        stride=layer.stride,
        padding=pad,
        dilation=layer.dilation,
        use_bias=layer.bias is not None,
        dtype=layer.weight.dtype,
        key=jr.key(0),
    )
    bias = None if layer.bias is None else layer.bias.reshape(-1)
    return _filled(new, lambda m: (m.u_out, m.core, m.u_in), (uo, core, ui), bias)


def _filled(new, where, factors, bias):
    """`new` with `where(new)` replaced by `factors` (cast to the layer's dtype) and
    its bias by `bias` (if not None)."""
    dt = where(new)[0].dtype
    new = eqx.tree_at(where, new, tuple(np.asarray(f).astype(dt) for f in factors))
    if bias is not None:
        new = eqx.tree_at(lambda m: m.bias, new, bias)
    return new


def _tol_rank(sigma, tol) -> int:
    return int(truncation_rank(jnp.asarray(sigma), tol, len(sigma)))


def _whitened_svd(w, whiten):
    """SVD `U diag(s) V^T` of `W S` (`whiten = (S, S^{-1})`, or None for `W`)."""
    w = np.asarray(w, np.float64)
    if whiten is None:
        return np.linalg.svd(w, full_matrices=False)
    return np.linalg.svd(w @ whiten[0], full_matrices=False)


def _linear_layer(layer, r, whiten=None):
    """A `LowRankLinear` holding the truncated SVD of a trained `eqx.nn.Linear`, or
    with `whiten = (S, S^{-1})` the truncation W' = U_r diag(s_r) V_r^T S^{-1} of the
    SVD of W S, written with orthonormal factors again."""
    u, s, vt = _whitened_svd(layer.weight, whiten)
    if whiten is not None:
        # W' = U_r diag(s_r) (S^{-1} V_r)^T; S^{-1} V_r = Q R (QR), and the r x r
        # core diag(s_r) R^T = P diag(s') O^T (SVD): W' = (U_r P) diag(s') (Q O)^T
        q, rr = np.linalg.qr(whiten[1] @ vt[:r].T)
        p, s_new, ot = np.linalg.svd(s[:r, None] * rr.T)
        u, s, vt = u[:, :r] @ p, s_new, (q @ ot.T).T
    new = LowRankLinear(
        layer.in_features,
        layer.out_features,
        r,
        use_bias=layer.bias is not None,
        dtype=layer.weight.dtype,
        key=jr.key(0),
    )
    factors = (u[:, :r], np.diag(s[:r]), vt[:r].T)
    return _filled(new, lambda m: (m.u, m.s, m.v), factors, layer.bias)


def compress(
    model: Any,
    rank: int | None = None,
    tol: float | None = None,
    budget: int | None = None,
    *,
    where: Callable[[Any], Any] | None = None,
    data: Any = None,
    apply: Callable[[Any, Any], Any] | None = None,
    allocation: str = "relative",
) -> Any:
    r"""Replace dense `eqx.nn.Linear` layers of a trained model by truncated-SVD
    [`LowRankLinear`][jaxdecomp.lowrank.LowRankLinear] layers, and ungrouped
    `eqx.nn.Conv2d` layers by truncated-HOSVD (Tucker-2)
    [`TuckerConv2d`][jaxdecomp.lowrank.TuckerConv2d] layers.

    **Arguments:** `model`, and exactly one of

    - `rank`: the same rank $r$ for every layer (capped at $\min(n_{in}, n_{out})$;
        both Tucker ranks of a kernel);
    - `tol`: per layer (per mode of a kernel), the smallest rank with
        $\|\sigma_{r:}\|_2 \le$ `tol` $\|\sigma\|_2$ (for a matrix: relative
        Frobenius error of the weight at most `tol`; for a kernel at most
        $\sqrt 2$ `tol`);
    - `budget`: a global budget of factor parameters ($\sum_l r_l (n_{in,l} +
        n_{out,l})$ for matrices, $r(c_{in} + c_{out}) + r^2 k_h k_w$ for kernels
        with equal Tucker ranks), allocated greedily, across layers, to the rank-1
        components that remove the most error per parameter. With
        `allocation="relative"` (default) the error of a layer is relative to its
        own size, $\sigma_k^2 / \sum_j \sigma_j^2$: each layer's relative
        Frobenius error counts the same, so a layer with small weights (e.g. a
        10-class output layer) is not starved. `"absolute"` ranks the $\sigma_k^2$
        themselves (the behaviour before; it gave the output layer of a digits MLP
        rank 1 and 20% accuracy).

    **Data-aware compression** (`data=X`, a batch of model inputs): each selected
    `eqx.nn.Linear` is truncated where it matters for its *outputs* on the data.
    With $C = \frac1N\sum x x^T$ the second moment of the layer's inputs (recorded
    by running `apply(model, X)`, default `jax.vmap(model)(X)`) and $S = C^{1/2}$
    (from [`jaxdecomp.sqrtm_and_inv_sqrtm`][] in float64, with a ridge of
    $10^{-8}$ of the mean eigenvalue: constant input features make $C$ singular),
    the layer keeps the truncated SVD of $W S$, mapped back,
    $W' = U_r \Sigma_r V_r^T S^{-1}$: the rank-$r$ weight with the smallest output
    error $\frac1N \sum \|W x - W' x\|^2 = \sum_{k > r} \sigma_k(WS)^2$
    (SVD-LLM's whitening). `tol` and `budget` then measure that
    output error (relative to $\frac1N\sum\|Wx\|^2$). Convolutions use their
    weights as without `data`. `apply(model, data)` runs once, compiled with
    `eqx.filter_jit` (so it must be traceable); the inputs reach the host through
    a callback, one batch at a time. Non-finite `data` (or activations) and a
    selected layer that `apply` never calls are `ValueError`s.

    `where` selects layers as in [`lora`][jaxdecomp.lowrank.lora] (default: every
    `eqx.nn.Linear` and ungrouped `eqx.nn.Conv2d`; other convolutions are a
    `TypeError`). Host-side (reads the weights to choose ranks); not for `jit`.

    **Returns:** the compressed model. Truncated SVD is the optimal approximation of
    each weight in Frobenius norm (Eckart–Young; HOSVD is within $\sqrt 2$ of the
    optimal Tucker-2 approximation); see the benchmark for the effect on
    accuracy with and without fine-tuning.

    **Example:**

    ```python
    import equinox as eqx, jax
    from jaxdecomp.lowrank import compress, compression_report

    mlp = eqx.nn.MLP(64, 10, width_size=256, depth=2, key=jax.random.key(0))
    small = compress(mlp, budget=8000)
    print(compression_report(small)["total_params"])
    ```
    """
    if sum(x is not None for x in (rank, tol, budget)) != 1:
        raise ValueError("compress: pass exactly one of rank, tol or budget.")
    if allocation not in ("relative", "absolute"):
        raise ValueError(
            "compress: allocation must be 'relative' or 'absolute'; got "
            f"{allocation!r}."
        )
    if apply is not None and data is None:
        raise ValueError("compress: `apply` needs `data`.")
    if rank is not None and not (isinstance(rank, int) and rank >= 1):
        raise ValueError(f"compress: rank must be a positive int; got {rank!r}.")
    if tol is not None and not (0 <= tol < 1):
        raise ValueError(f"compress: tol must be in [0, 1); got {tol!r}.")
    where, layers, single = select_linear_layers(model, where, "compress", convs=True)
    for layer in layers:
        if is_conv(layer) and layer.num_spatial_dims != 2:
            raise TypeError("compress: only 2-D convolutions have a low-rank form.")
    # Per layer: singular values (mode-out ones for a kernel) and the cost of rank k+1;
    # kernels also get their mode-in spectrum (for `tol`).
    whitening = (
        _input_whitening(model, where, single, layers, data, apply)
        if data is not None
        else [None] * len(layers)
    )
    spectra, spectra_in, costs = [], [], []
    for layer, whiten in zip(layers, whitening):
        w = np.asarray(layer.weight, np.float64)
        if is_conv(layer):
            o, i = w.shape[:2]
            taps = w[0, 0].size
            so, si = tucker2_spectra(w)
            spectra.append(so)
            spectra_in.append(si)
            costs.append(lambda k, o=o, i=i, t=taps: o + i + (2 * k + 1) * t)
        else:
            spectra.append(_whitened_svd(w, whiten)[1])
            spectra_in.append(spectra[-1])
            costs.append(lambda k, w=w: sum(w.shape))
    if rank is not None:
        ranks = [
            (min(rank, len(so)), min(rank, len(si)))
            for so, si in zip(spectra, spectra_in)
        ]
    elif tol is not None:
        ranks = [
            (_tol_rank(so, tol), _tol_rank(si, tol))
            for so, si in zip(spectra, spectra_in)
        ]
    else:
        energies = [sv**2 for sv in spectra]
        if allocation == "relative":
            energies = [e / max(e.sum(), np.finfo(np.float64).tiny) for e in energies]
        ranks = [(r, r) for r in _budget_ranks(energies, costs, int(budget))]
    new_layers = [
        _tucker_layer(layer, *r)
        if is_conv(layer)
        else _linear_layer(layer, r[0], whiten)
        for layer, r, whiten in zip(layers, ranks, whitening)
    ]
    return eqx.tree_at(where, model, new_layers[0] if single else new_layers)


# ridge of the input second moment, relative to its mean eigenvalue
RIDGE = 1e-8


class _Recorder(eqx.Module):
    """A selected layer that reports its inputs to the host and then acts as the
    layer. A `pure_callback` that sees the whole batch at once under `vmap`
    (`expand_dims`), and returns zeros that are added to the output so that it is
    not dead code."""

    layer: Any
    index: int = eqx.field(static=True)
    sink: Any = eqx.field(static=True)

    def __call__(self, x, *args, **kwargs):
        x = jnp.asarray(x)
        shape = jax.ShapeDtypeStruct(x.shape[:-1], x.dtype)
        zero = jax.pure_callback(
            lambda v: self.sink(self.index, v),
            shape,
            x,
            vmap_method="expand_dims",
        )
        out = self.layer(x, *args, **kwargs)
        return out + jnp.sum(zero).astype(out.dtype)


def _input_whitening(model, where, single, layers, data, apply):
    """Per selected layer: `(S, S^{-1})` from the second moment of its inputs on
    `data`, or None (convolutions)."""
    sums = [None] * len(layers)
    counts = [0] * len(layers)

    def sink(i, x):
        zero = np.zeros(np.shape(x)[:-1], np.asarray(x).dtype)
        x = np.asarray(x, np.float64).reshape(-1, np.shape(x)[-1])
        sums[i] = x.T @ x if sums[i] is None else sums[i] + x.T @ x
        counts[i] += x.shape[0]
        return zero

    wrapped = [_Recorder(layer, i, sink) for i, layer in enumerate(layers)]
    recording = eqx.tree_at(where, model, wrapped[0] if single else wrapped)
    data = jnp.asarray(data) if isinstance(data, np.ndarray) else data

    @eqx.filter_jit
    def run(model, data):
        return jax.vmap(model)(data) if apply is None else apply(model, data)

    jax.block_until_ready(run(recording, data))
    out = []
    for layer, total, count in zip(layers, sums, counts):
        if is_conv(layer):
            out.append(None)
            continue
        if total is None:
            raise ValueError(
                "compress: a selected layer was not called by `apply(model, data)`; "
                "check `data` and `apply`."
            )
        c = total / count
        n = c.shape[0]
        if not np.all(np.isfinite(c)):
            raise ValueError(
                "compress: the inputs of a selected layer on `data` are not finite "
                "(NaN or inf in `data`, or in the activations)."
            )
        # float64 whatever the model's dtype: input features that never vary (e.g.
        # constant pixels) make C singular; the ridge keeps S^{-1} finite, and the
        # directions it inflates are the ones W S (and so W') does not use
        ridge = RIDGE * max(np.trace(c) / n, np.finfo(float).tiny)
        with jax.enable_x64(True):
            s, s_inv = sqrtm_and_inv_sqrtm(jnp.asarray(c + ridge * np.eye(n)))
            out.append((np.asarray(s, np.float64), np.asarray(s_inv, np.float64)))
    return out


def compression_report(model: Any) -> dict:
    """Parameters and multiply-adds per linear / convolutional layer, at the active
    ranks.

    **Arguments:** `model`, any pytree of layers.

    **Returns:** `{"layers": [...], "total_params": int, "total_macs": int}`; MACs are
    per example for linear layers and per output pixel for convolutions. Counts what
    an exported model stores: `eqx.nn.Linear`: in*out; `LowRankLinear` at rank r /
    `FactorizedLinear`: r (in + out); `eqx.nn.Conv`: out*in*taps; `TuckerConv2d` at
    ranks (a, b): a*out + b*in + a*b*taps; `LoRA`: the base plus the adapter; each
    plus its bias. Host-side.

    **Example:**

    ```python
    import equinox as eqx, jax
    from jaxdecomp.lowrank import compression_report

    mlp = eqx.nn.MLP(64, 10, width_size=32, depth=1, key=jax.random.key(0))
    assert compression_report(mlp)["total_params"] == 64 * 32 + 32 + 32 * 10 + 10
    ```
    """
    rows = []

    def bias_size(x):
        return 0 if x.bias is None else x.bias.size

    def visit(x):
        if isinstance(x, LowRankLinear):
            r = int(x.rank)
            w = r * (x.in_features + x.out_features)
            row = ("LowRankLinear", x.in_features, x.out_features, r, w, w)
        elif isinstance(x, FactorizedLinear):
            w = x.rank * (x.in_features + x.out_features)
            row = ("FactorizedLinear", x.in_features, x.out_features, x.rank, w, w)
        elif isinstance(x, TuckerConv2d):
            a, b = (int(v) for v in x.rank)
            taps = x.kernel_size[0] * x.kernel_size[1]
            w = a * x.out_channels + b * x.in_channels + a * b * taps
            row = ("TuckerConv2d", x.in_channels, x.out_channels, (a, b), w, w)
        elif isinstance(x, LoRA):
            o, i = x.base.weight.shape[:2]
            dense = x.base.weight.size
            row = ("LoRA", i, o, x.a.shape[0], dense + x.trainable_params, dense)
            rows.append(row + (bias_size(x.base),))
            return x
        elif is_linear(x) or is_conv(x):
            o, i = x.weight.shape[:2]
            kind = "Linear" if is_linear(x) else "Conv"
            row = (kind, i, o, min(i, o), x.weight.size, x.weight.size)
        else:
            return x
        rows.append(row + (bias_size(x),))
        return x

    kinds = (LowRankLinear, FactorizedLinear, TuckerConv2d, LoRA)
    kinds += (eqx.nn.Linear, eqx.nn.Conv)
    is_layer = lambda x: isinstance(x, kinds)  # noqa: E731
    jtu.tree_map(visit, model, is_leaf=is_layer)
    layers = [
        {"type": t, "in": i, "out": o, "rank": r, "params": w + nb, "macs": macs}
        for t, i, o, r, w, macs, nb in rows
    ]
    return {
        "layers": layers,
        "total_params": sum(x["params"] for x in layers),
        "total_macs": sum(x["macs"] for x in layers),
    }
