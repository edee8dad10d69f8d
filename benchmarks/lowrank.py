"""Low-rank training on scikit-learn's digits: accuracy against parameter count.

MLP 64-256-256-10 (ReLU), cross-entropy, minibatches of 128, several seeds, in the
format of DLRT's LeNet table. Rows: dense + Adam; factorized (A B^T, fixed rank) +
Adam; DLRT (`jaxdecomp.lowrank.dlrt`, rank-adaptive, several tau) for the two hidden
layers with Adam on the output layer; post-hoc `compress` of the trained dense model
(truncated SVD, global budget, no fine-tuning). Parameters are counted as exported
(rank r layer: r (in + out) + bias). Then LoRA fine-tuning: pretrain on digits 0-4,
adapt to 5-9, LoRA (rank 4) vs full fine-tuning.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax

from jaxdecomp.lowrank import (
    FactorizedLinear,
    LowRankLinear,
    compress,
    compression_report,
    dlrt,
    lora,
    trainable,
    trp,
)

from ._harness import Table, optional_import, time_fn


class MLP(eqx.Module):
    layers: list

    def __call__(self, x):
        for layer in self.layers[:-1]:
            x = jax.nn.relu(layer(x))
        return self.layers[-1](x)


def _data(seed, digits=None):
    datasets = optional_import("sklearn.datasets")
    if datasets is None:
        return None
    x, y = datasets.load_digits(return_X_y=True)
    if digits is not None:
        keep = np.isin(y, digits)
        x, y = x[keep], y[keep]
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(x))
    x, y = x[perm] / 16.0, y[perm]
    n_test = len(x) // 5
    mean, std = x[n_test:].mean(0), x[n_test:].std(0) + 1e-6
    x = (x - mean) / std
    f32 = np.float32
    return (x[n_test:].astype(f32), y[n_test:]), (x[:n_test].astype(f32), y[:n_test])


def _loss(model, x, y):
    logits = jax.vmap(model)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _accuracy(model, x, y):
    return float(jnp.mean(jnp.argmax(jax.vmap(model)(x), -1) == y))


def _make(kind, key, rank=6, max_rank=32):
    k1, k2, k3 = jr.split(key, 3)
    f32 = jnp.float32
    last = eqx.nn.Linear(256, 10, dtype=f32, key=k3)
    if kind == "dense":
        return MLP(
            [
                eqx.nn.Linear(64, 256, dtype=f32, key=k1),
                eqx.nn.Linear(256, 256, dtype=f32, key=k2),
                last,
            ]
        )
    if kind == "factorized":
        return MLP(
            [
                FactorizedLinear(64, 256, rank, dtype=f32, key=k1),
                FactorizedLinear(256, 256, rank, dtype=f32, key=k2),
                last,
            ]
        )
    return MLP(
        [
            LowRankLinear(64, 256, max_rank, dtype=f32, key=k1),
            LowRankLinear(256, 256, max_rank, dtype=f32, key=k2),
            last,
        ]
    )


def _optimizer(kind, model, tau=None, lr_dlrt=0.05):
    if kind not in ("dlrt", "trp"):
        return optax.adam(1e-3)
    labels = jax.tree_util.tree_map(lambda _: "adam", model)
    for i in (0, 1):
        labels = eqx.tree_at(
            lambda m, i=i: m.layers[i],
            labels,
            jax.tree_util.tree_map(lambda _: "dlrt", model.layers[i]),
        )
    # The labels tree is itself a (callable) module, so pass it through a function.
    hidden = (
        dlrt(lr_dlrt, tau, momentum=0.9)
        if kind == "dlrt"
        else trp(0.1, nuclear_weight=1e-3, period=20, tol=0.3)
    )
    return optax.multi_transform(
        {"dlrt": hidden, "adam": optax.adam(1e-3)}, lambda _: labels
    )


def _train(model, opt, train, epochs, seed, filter_spec=None):
    (x, y) = train
    filter_spec = eqx.is_inexact_array if filter_spec is None else filter_spec
    params, static = eqx.partition(model, filter_spec)
    state = opt.init(params)

    @eqx.filter_jit
    def step(params, state, xb, yb):
        grads = eqx.filter_grad(lambda p: _loss(eqx.combine(p, static), xb, yb))(params)
        updates, state = opt.update(grads, state, params)
        return eqx.apply_updates(params, updates), state

    rng = np.random.default_rng(seed)
    batch = 128
    for _ in range(epochs):
        perm = rng.permutation(len(x))
        for i in range(0, len(x) - batch + 1, batch):
            idx = perm[i : i + batch]
            params, state = step(
                params, state, jnp.asarray(x[idx]), jnp.asarray(y[idx])
            )
    step_time = time_fn(
        step, params, state, jnp.asarray(x[:batch]), jnp.asarray(y[:batch]), repeats=20
    )
    return eqx.combine(params, static), step_time


def run(full: bool = False):
    seeds = range(5) if full else range(1)
    epochs = 60 if full else 10
    taus = (0.1, 0.15, 0.2, 0.25, 0.3) if full else (0.1, 0.2)
    if _data(0) is None:
        return []
    with jax.numpy_dtype_promotion("standard"):
        return _run(seeds, epochs, taus)


def _run(seeds, epochs, taus):
    configs = [("dense", None), ("factorized", None)] + [("dlrt", t) for t in taus]
    results = {}
    for seed in seeds:
        train, test = _data(seed)
        dense_model = None
        for kind, tau in configs:
            model = _make(kind, jr.key(seed))
            opt = _optimizer(kind, model, tau)
            model, t = _train(model, opt, train, epochs, seed)
            if kind == "dense":
                dense_model = model
            name = (
                "dense + Adam"
                if kind == "dense"
                else (
                    "factorized r=6 + Adam"
                    if kind == "factorized"
                    else f"DLRT tau={tau}"
                )
            )
            rep = compression_report(model)
            ranks = [layer["rank"] for layer in rep["layers"][:2]]
            results.setdefault(name, []).append(
                (_accuracy(model, *test), rep["total_params"], t, ranks)
            )
        # TRP baseline: SGD with nuclear-norm penalty and periodic truncation, then
        # exported by truncated SVD at the same tolerance.
        dense0 = _make("dense", jr.key(seed))
        model, t = _train(
            dense0,
            _optimizer("trp", dense0),
            train,
            epochs,
            seed,
        )
        small = compress(model, tol=0.3, where=lambda m: m.layers[:2])
        rep = compression_report(small)
        results.setdefault("TRP (SGD, nuclear 1e-3, tol 0.3) + Adam output", []).append(
            (
                _accuracy(small, *test),
                rep["total_params"],
                t,
                [layer["rank"] for layer in rep["layers"][:2]],
            )
        )
        for budget in (4000, 8000):
            small = compress(dense_model, budget=budget, where=lambda m: m.layers[:2])
            rep = compression_report(small)
            ranks = [layer["rank"] for layer in rep["layers"][:2]]
            results.setdefault(f"compress (budget {budget}, no fine-tune)", []).append(
                (_accuracy(small, *test), rep["total_params"], None, ranks)
            )
    n_dense = results["dense + Adam"][0][1]
    acc_dense = np.mean([r[0] for r in results["dense + Adam"]])
    table = Table(
        f"digits MLP 64-256-256-10, {len(seeds)} seeds, {epochs} epochs (CPU, float32)",
        [
            "method",
            "test accuracy (%)",
            "Δ vs dense (points)",
            "params",
            "compression (%)",
            "ranks (hidden layers)",
            "train step (ms)",
        ],
    )
    for name, rows in results.items():
        acc = np.array([r[0] for r in rows]) * 100
        params = int(np.mean([r[1] for r in rows]))
        ranks = sorted({tuple(r[3]) for r in rows})
        t = [r[2] for r in rows if r[2] is not None]
        table.add(
            name,
            f"{acc.mean():.2f} ± {acc.std():.2f}",
            round(acc.mean() - 100 * acc_dense, 2),
            params,
            round(100 * (1 - params / n_dense), 1),
            ", ".join(str(list(r)) for r in ranks[:3]),
            1e3 * float(np.median(t)) if t else None,
        )
    table.notes.append(
        "Params as exported (rank-r layer: r (in + out) + bias); DLRT trains at "
        "max_rank 32 with masks (export with `shrink()`), SGD (lr 0.05, momentum "
        "0.9) on the factors and Adam on the output layer. Step time: median of 20 "
        "jitted steps "
        "(batch 128) after training; DLRT's includes its QR/SVD of 2 max_rank-wide "
        "bases, which dominates on a CPU; the exported model costs as the factorized "
        "row at its rank."
    )
    return [table, _lora_table(seeds, epochs)]


def _lora_table(seeds, epochs):
    table = Table(
        "LoRA fine-tuning: pretrain on digits 0-4, adapt to 5-9",
        ["method", "test accuracy on 5-9 (%)", "trainable params"],
    )
    rows = {}
    for seed in seeds:
        pre_train, _ = _data(seed, digits=[0, 1, 2, 3, 4])
        new_train, new_test = _data(seed, digits=[5, 6, 7, 8, 9])
        base, _ = _train(
            _make("dense", jr.key(seed)), optax.adam(1e-3), pre_train, epochs, seed
        )
        rows.setdefault("before adaptation", []).append((_accuracy(base, *new_test), 0))
        full, _ = _train(base, optax.adam(1e-3), new_train, epochs, seed)
        n_full = sum(
            x.size
            for x in jax.tree_util.tree_leaves(eqx.filter(base, eqx.is_inexact_array))
        )
        rows.setdefault("full fine-tuning", []).append(
            (_accuracy(full, *new_test), n_full)
        )
        adapted = lora(base, rank=4, alpha=8.0, key=jr.key(100 + seed))
        spec = trainable(adapted)
        tuned, _ = _train(
            adapted, optax.adam(1e-2), new_train, epochs, seed, filter_spec=spec
        )
        n_lora = sum(
            x.size for x in jax.tree_util.tree_leaves(eqx.filter(adapted, spec))
        )
        rows.setdefault("LoRA rank 4 (all layers)", []).append(
            (_accuracy(tuned, *new_test), n_lora)
        )
    for name, r in rows.items():
        acc = np.array([x[0] for x in r]) * 100
        table.add(name, f"{acc.mean():.2f} ± {acc.std():.2f}", int(r[0][1]))
    return table
