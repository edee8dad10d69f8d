"""Low-rank training on scikit-learn's digits: accuracy against parameter count.

MLP 64-256-256-10 (ReLU), cross-entropy, minibatches of 128, several seeds, in the
format of DLRT's LeNet table. Rows: dense + Adam; factorized (A B^T, fixed rank) +
Adam; DLRT (`jaxdecomp.lowrank.dlrt`, rank-adaptive, SGD or Adam, several tau) for the
two hidden layers with Adam on the output layer; TRP; post-hoc `compress` of the
trained dense model (truncated SVD, global budget, no fine-tuning). Plots (to the
output folder): accuracy against parameters, and DLRT's rank history. Parameters are
counted as exported (rank r layer: r (in + out) + bias). Then LoRA fine-tuning:
pretrain on digits 0-4, adapt to 5-9, LoRA (rank 4) vs full fine-tuning.
"""

from __future__ import annotations

import time

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
    ranks,
    trainable,
    trp,
)

from ._harness import Table, optional_import, save_figure, time_fn


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
    if kind == "dlrt_all":  # the output layer low-rank too (max rank 10)
        last = LowRankLinear(256, 10, 10, dtype=f32, key=k3)
    return MLP(
        [
            LowRankLinear(64, 256, max_rank, dtype=f32, key=k1),
            LowRankLinear(256, 256, max_rank, dtype=f32, key=k2),
            last,
        ]
    )


def _labels(model, hidden_labels):
    """multi_transform labels: the hidden layers get `hidden_labels[i]`, the rest
    "adam". The labels tree is itself a (callable) module, so it is passed through a
    function."""
    labels = jax.tree_util.tree_map(lambda _: "adam", model)
    for i, lab in enumerate(hidden_labels):
        labels = eqx.tree_at(
            lambda m, i=i: m.layers[i],
            labels,
            jax.tree_util.tree_map(lambda _, lab=lab: lab, model.layers[i]),
        )
    return lambda _: labels


def _hidden_optimizer(model, transforms):
    """`transforms[i]` for layer i, Adam (1e-3) for the other layers."""
    names = [f"h{i}" for i in range(len(transforms))]
    return optax.multi_transform(
        {**dict(zip(names, transforms)), "adam": optax.adam(1e-3)},
        _labels(model, names),
    )


STEPS_PER_EPOCH = 11  # 1438 training digits, batches of 128


SEQUENTIAL_LR = 0.3  # plain SGD (no momentum); best of 0.1 / 0.3 on seeds 0-1


def _methods(taus_sgd, taus_adam, epochs, taus_seq=()):
    """(name, model kind, optimizer factory) per row of the main table."""

    def cosine():
        return optax.cosine_decay_schedule(1e-2, epochs * STEPS_PER_EPOCH)

    rows = [
        ("dense + Adam", "dense", lambda m: optax.adam(1e-3)),
        ("factorized r=6 + Adam", "factorized", lambda m: optax.adam(1e-3)),
    ]
    for tau in taus_sgd:
        rows.append(
            (
                f"DLRT SGD tau={tau}",
                "dlrt",
                lambda m, t=tau: _hidden_optimizer(
                    m, [dlrt(0.05, t, momentum=0.9)] * 2
                ),
            )
        )
    for tau in taus_seq:
        rows.append(
            (
                f"DLRT SGD sequential tau={tau}",
                "dlrt",
                lambda m, t=tau: _hidden_optimizer(
                    m, [dlrt(SEQUENTIAL_LR, t, variant="sequential")] * 2
                ),
            )
        )
    for tau in taus_adam:
        per_layer = (tau, tau) if isinstance(tau, float) else tau
        name = f"DLRT Adam cosine tau={tau}"
        if len(per_layer) == 3:
            name += " (all 3 layers)"
        rows.append(
            (
                name,
                "dlrt" if len(per_layer) == 2 else "dlrt_all",
                lambda m, ts=per_layer: _hidden_optimizer(
                    m, [dlrt(cosine(), t, method="adam") for t in ts]
                ),
            )
        )
    return rows


TRP_SETTINGS = ((0.05, 1e-3, 20, 0.2), (0.1, 1e-4, 20, 0.3))


def _train(model, opt, train, epochs, seed, filter_spec=None, history=None):
    """Minibatch training; returns (model, median jitted step time). With `history`
    (a list), appends `ranks(model)` after every epoch."""
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
        if history is not None:
            history.append([np.asarray(r).tolist() for r in ranks(params)])
    step_time = time_fn(
        step, params, state, jnp.asarray(x[:batch]), jnp.asarray(y[:batch]), repeats=20
    )
    return eqx.combine(params, static), step_time


def _lowrank_ranks(report):
    """Ranks of the factored layers of a compression report (dense layers: [])."""
    return [layer["rank"] for layer in report["layers"] if layer["type"] != "Linear"]


def _export(model):
    """The deployable model: low-rank layers at their true rank (`shrink()`)."""
    return jax.tree_util.tree_map(
        lambda x: x.shrink() if isinstance(x, LowRankLinear) else x,
        model,
        is_leaf=lambda x: isinstance(x, LowRankLinear),
    )


def _exported_step_time(model, train):
    """Median Adam step (batch 128) of the exported model: what training or
    fine-tuning the low-rank model costs at its rank."""
    _, t = _train(_export(model), optax.adam(1e-3), train, 0, 0)
    return t


def run(
    full: bool = False,
    seeds=None,
    epochs=None,
    taus_sgd=None,
    taus_adam=None,
    plots: bool = True,
    trp_settings=None,
    taus_seq=None,
):
    seeds = (range(5) if full else range(1)) if seeds is None else seeds
    if taus_seq is None:
        taus_seq = (0.2,) if full else ()
    epochs = (60 if full else 10) if epochs is None else epochs
    if taus_sgd is None:
        taus_sgd = (0.1, 0.15, 0.2, 0.25, 0.3) if full else (0.2,)
    if taus_adam is None:
        taus_adam = (0.2, 0.25, (0.15, 0.35), (0.15, 0.35, 0.3))
        if not full:
            taus_adam = taus_adam[2:]
    trp_settings = TRP_SETTINGS if trp_settings is None else trp_settings
    if _data(0) is None:
        return []
    with jax.numpy_dtype_promotion("standard"):
        return _run(seeds, epochs, taus_sgd, taus_adam, plots, trp_settings, taus_seq)


def _run(seeds, epochs, taus_sgd, taus_adam, plots, trp_settings, taus_seq):
    results, histories, dense_models = {}, {}, []
    for seed in seeds:
        train, test = _data(seed)
        dense_model = None
        for name, kind, make_opt in _methods(taus_sgd, taus_adam, epochs, taus_seq):
            model = _make(kind, jr.key(seed))
            history = [] if kind.startswith("dlrt") and seed == seeds[0] else None
            model, t = _train(
                model, make_opt(model), train, epochs, seed, None, history
            )
            if history is not None:
                histories[name] = history
            if kind == "dense":
                dense_model = model
            rep = compression_report(model)
            results.setdefault(name, []).append(
                (
                    _accuracy(model, *test),
                    rep["total_params"],
                    t,
                    _exported_step_time(model, train),
                    _lowrank_ranks(rep),
                )
            )
        # TRP baseline: SGD with nuclear-norm penalty and periodic truncation of the
        # hidden layers (Adam on the output layer), exported by truncated SVD at the
        # same tolerance.
        for lr, weight, period, tol in trp_settings:
            dense0 = _make("dense", jr.key(seed))
            opt = _hidden_optimizer(dense0, [trp(lr, weight, period, tol)] * 2)
            model, t = _train(dense0, opt, train, epochs, seed)
            small = compress(model, tol=tol, where=lambda m: m.layers[:2])
            rep = compression_report(small)
            results.setdefault(
                f"TRP (SGD {lr}, nuclear {weight:g}, tol {tol})", []
            ).append(
                (
                    _accuracy(small, *test),
                    rep["total_params"],
                    t,
                    _exported_step_time(small, train),
                    _lowrank_ranks(rep),
                )
            )
        dense_models.append((seed, dense_model, train, test))
        for budget in (4000, 8000):
            small = compress(dense_model, budget=budget, where=lambda m: m.layers[:2])
            rep = compression_report(small)
            results.setdefault(f"compress (budget {budget}, no fine-tune)", []).append(
                (
                    _accuracy(small, *test),
                    rep["total_params"],
                    None,
                    _exported_step_time(small, train),
                    _lowrank_ranks(rep),
                )
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
            "ranks (low-rank layers)",
            "train step (ms)",
            "exported step (ms)",
        ],
    )
    summary = {}
    for name, rows in results.items():
        acc = np.array([r[0] for r in rows]) * 100
        params = int(np.mean([r[1] for r in rows]))
        ranks_seen = sorted({tuple(r[4]) for r in rows})
        t = [r[2] for r in rows if r[2] is not None]
        summary[name] = (params, acc.mean(), acc.std())
        table.add(
            name,
            f"{acc.mean():.2f} ± {acc.std():.2f}",
            round(acc.mean() - 100 * acc_dense, 2),
            params,
            round(100 * (1 - params / n_dense), 1),
            ", ".join(str(list(r)) if r else "dense" for r in ranks_seen[:3]),
            1e3 * float(np.median(t)) if t else None,
            1e3 * float(np.median([r[3] for r in rows])),
        )
    table.notes.append(
        "Params as exported (rank-r layer: r (in + out) + bias). DLRT trains the two "
        "hidden layers at max_rank 32 with masks (exported with `shrink()`), either "
        "SGD (lr 0.05, momentum 0.9) or basis-free Adam with a cosine-decayed rate "
        "(1e-2 -> 0), one tau for both layers or a pair (first, second hidden layer, "
        "two `dlrt` transforms in `optax.multi_transform`); Adam 1e-3 on the output "
        "layer, except in the 'all 3 layers' row, where the output layer is a "
        "LowRankLinear (max rank 10) trained by a third `dlrt` (third tau). "
        "Train step: median of 20 jitted steps (batch 128) after training, as "
        "trained (DLRT's includes QR/SVDs of 2 max_rank-wide bases per layer, which "
        "dominate on a CPU). Exported step: an Adam step of the exported model "
        "(factorized layers at the found ranks), i.e. what training or fine-tuning "
        "the low-rank model costs at that rank, against the dense row."
    )
    if plots:
        _plot_accuracy(summary, n_dense)
        _plot_rank_history(histories)
    return [table, compression_table(dense_models, results), _lora_table(seeds, epochs)]


COMPRESSIONS = {
    "weight SVD, absolute allocation (before)": dict(allocation="absolute"),
    "weight SVD, relative allocation (default)": {},
    "data-aware (whitened SVD), relative": "data",
    "data-aware (whitened SVD), absolute": "data-absolute",
}


def compression_table(
    dense_models, results, fractions=(0.05, 0.1, 0.2), finetune_epochs=2
):
    """`compress` of the trained dense MLP, all three layers, at a global budget of
    `fractions` of its weights: accuracy as compressed and after `finetune_epochs`
    of Adam (1e-3) on the factors, against the rows of the main table that train
    low-rank (DLRT, TRP)."""
    table = Table(
        "Post-hoc compression of the trained dense MLP (all 3 layers), global budget",
        [
            "method",
            "budget (% of dense weights)",
            "params",
            "ranks",
            "test accuracy (%)",
            f"after {finetune_epochs}-epoch fine-tune (%)",
            "compress (s)",
        ],
    )
    n_weights = 64 * 256 + 256 * 256 + 256 * 10
    for name, option in COMPRESSIONS.items():
        for frac in fractions:
            accs, tuned, params, ranks, secs = [], [], [], set(), []
            for seed, dense, train, test in dense_models:
                kw = dict(option) if isinstance(option, dict) else {}
                if option in ("data", "data-absolute"):
                    kw["data"] = train[0]
                    if option == "data-absolute":
                        kw["allocation"] = "absolute"
                t0 = time.perf_counter()
                small = compress(dense, budget=int(frac * n_weights), **kw)
                secs.append(time.perf_counter() - t0)
                rep = compression_report(small)
                params.append(rep["total_params"])
                ranks.add(tuple(layer["rank"] for layer in rep["layers"]))
                accs.append(_accuracy(small, *test))
                ft, _ = _train(small, optax.adam(1e-3), train, finetune_epochs, seed)
                tuned.append(_accuracy(ft, *test))
            table.add(
                name,
                round(100 * frac),
                int(np.mean(params)),
                ", ".join(str(list(r)) for r in sorted(ranks)[:2]),
                f"{100 * np.mean(accs):.1f} ± {100 * np.std(accs):.1f}",
                f"{100 * np.mean(tuned):.1f} ± {100 * np.std(tuned):.1f}",
                float(np.median(secs)),
            )
    for name, rows in results.items():
        if name.startswith(("dense", "DLRT", "TRP")):
            acc = np.array([r[0] for r in rows]) * 100
            table.add(
                f"{name} (trained, main table)",
                None,
                int(np.mean([r[1] for r in rows])),
                None,
                f"{acc.mean():.1f} ± {acc.std():.1f}",
                None,
                None,
            )
    table.notes.append(
        f"{len(dense_models)} seed(s); budget in factor parameters (r (in + out) per "
        "layer; biases on top). Relative allocation: each layer's spectrum "
        "normalised by its total energy; absolute: raw sigma^2 (the default before "
        "2026-12-05). Data-aware: SVD of W C^{1/2} with C the second moment of the "
        "layer's inputs on the training inputs (compress(..., data=X)). Fine-tune: "
        "Adam 1e-3 on the factored model, minibatches of 128."
    )
    return table


def _plot_accuracy(summary, n_dense):
    """Test accuracy against parameters, one marker per method (output folder)."""

    def draw(ax):
        ax.set_yscale("linear")
        markers = "os^vDP*Xhd<>"
        for i, (name, (params, acc, std)) in enumerate(summary.items()):
            ax.errorbar(
                params,
                acc,
                yerr=std,
                fmt=markers[i % len(markers)],
                label=name,
                capsize=2,
            )
        ax.axvline(0.1 * n_dense, color="gray", ls=":", lw=1)
        ax.set_xlabel("parameters (exported)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_ylim(85, 100)
        ax.set_title(
            "digits MLP: accuracy against parameters (dotted: 90% compression)"
        )

    save_figure("lowrank_accuracy.png", draw)


def _plot_rank_history(histories):
    """Active rank of each hidden layer after every epoch, per DLRT run (seed 0)."""

    def draw(ax):
        ax.set_xscale("linear")
        ax.set_yscale("linear")
        colors = [f"C{i}" for i in range(10)] + ["black", "olive", "navy"]
        for i, (name, hist) in enumerate(histories.items()):
            h = np.array(hist)
            epochs = np.arange(1, len(h) + 1)
            for layer, style in ((0, "-"), (1, "--")):
                ax.plot(
                    epochs,
                    h[:, layer],
                    style,
                    color=colors[i % len(colors)],
                    label=f"{name}" if layer == 0 else None,
                )
        ax.set_xlabel("epoch")
        ax.set_ylabel("active rank (solid: layer 1, dashed: layer 2)")
        ax.set_title("DLRT rank history (hidden layers; max_rank 32)")

    save_figure("lowrank_rank_history.png", draw)


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
