"""Matrix-root optimizers (`jaxdecomp.optim`): training curves, root computations and
state memory, against Adam and `optax.contrib.muon` in the same run.

Tasks (all offline, float32):

- `digits_mlp`: scikit-learn digits, MLP 64-128-128-10 (tanh), batches of 128;
- `digits_cnn`: the same digits as 1x8x8 images, conv 3x3x16 - conv 3x3x32 - 2x2
  average pool - dense 10 (ReLU);
- `char_lm`: a character-level transformer language model (2 pre-LN blocks, d = 64,
  4 heads, context 64, batches of 32) on the source text of a few Python standard
  library modules (shipped with every Python; the last 10% held out).

Muon (ours and optax's) gets the hidden matrices (convolution kernels viewed as
(out, in kh kw), the same `MuonDimensionNumbers` for both) and AdamW (lr 3e-3) for
embeddings, output layers, biases and gains. Shampoo and SOAP precondition every array
with at least 2 dimensions. Every optimizer gets a learning-rate sweep; the table
shows the best rate by final validation loss. "Steps to target" is the first
evaluation step at which the validation loss reaches Adam's best final loss; time to
target = steps x the measured time per step (training steps only: compiled ahead, no
evaluation inside the timing).
"""

from __future__ import annotations

import inspect
import math
import time

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax

from jaxdecomp import inv_pth_root, optim

from ._harness import Table, optional_import, time_fn

DN = optim.MuonDimensionNumbers
ADAM_LR_FOR_MUON = 3e-3

# --------------------------------------------------------------------------- data


def _digits():
    datasets = optional_import("sklearn.datasets")
    if datasets is None:
        return None
    x, y = datasets.load_digits(return_X_y=True)
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(x))
    x, y = x[perm] / 16.0, y[perm]
    n_val = len(x) // 5
    mean, std = x[n_val:].mean(0), x[n_val:].std(0) + 1e-3
    x = ((x - mean) / std).astype(np.float32)
    return (x[n_val:], y[n_val:]), (x[:n_val], y[:n_val])


def _corpus() -> np.ndarray:
    import argparse
    import json.decoder
    import textwrap

    text = "".join(inspect.getsource(m) for m in (argparse, textwrap, json.decoder))
    data = np.frombuffer(text.encode("ascii", "replace"), np.uint8)
    return np.minimum(data, 127).astype(np.int32)


# ------------------------------------------------------------------------- models


def _dense(key, n_in, n_out):
    return jr.normal(key, (n_in, n_out), jnp.float32) / math.sqrt(n_in)


def _mlp_init(key):
    k = jr.split(key, 3)
    p = {
        "w1": _dense(k[0], 64, 128),
        "b1": jnp.zeros(128, jnp.float32),
        "w2": _dense(k[1], 128, 128),
        "b2": jnp.zeros(128, jnp.float32),
        "w3": _dense(k[2], 128, 10),
        "b3": jnp.zeros(10, jnp.float32),
    }
    dims = {k: None for k in p} | {"w1": DN(), "w2": DN()}
    return p, dims


def _mlp(p, x):
    h = jnp.tanh(x @ p["w1"] + p["b1"])
    h = jnp.tanh(h @ p["w2"] + p["b2"])
    return h @ p["w3"] + p["b3"]


def _cnn_init(key):
    k = jr.split(key, 3)
    p = {
        "c1": jr.normal(k[0], (16, 1, 3, 3), jnp.float32) / 3.0,
        "d1": jnp.zeros((16, 1, 1), jnp.float32),
        "c2": jr.normal(k[1], (32, 16, 3, 3), jnp.float32) / 12.0,
        "d2": jnp.zeros((32, 1, 1), jnp.float32),
        "w": _dense(k[2], 512, 10),
        "b": jnp.zeros(10, jnp.float32),
    }
    conv = DN(reduction_axis=(1, 2, 3), output_axis=0)
    dims = {k: None for k in p} | {"c1": conv, "c2": conv}
    return p, dims


def _conv(x, w):
    return jax.lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW")
    )


def _cnn(p, x):
    x = x.reshape(-1, 1, 8, 8)
    h = jax.nn.relu(_conv(x, p["c1"]) + p["d1"])
    h = jax.nn.relu(_conv(h, p["c2"]) + p["d2"])
    h = h.reshape(-1, 32, 4, 2, 4, 2).mean(axis=(3, 5))
    return h.reshape(len(x), -1) @ p["w"] + p["b"]


D, HEADS, CONTEXT, LAYERS, VOCAB = 64, 4, 64, 2, 128


def _lm_init(key):
    keys = iter(jr.split(key, 4 + 6 * LAYERS))
    p = {
        "embed": jr.normal(next(keys), (VOCAB, D), jnp.float32) * 0.1,
        "pos": jr.normal(next(keys), (CONTEXT, D), jnp.float32) * 0.1,
        "head": _dense(next(keys), D, VOCAB),
        "ln_f": jnp.ones(D, jnp.float32),
    }
    dims = {"embed": None, "pos": None, "head": None, "ln_f": None}
    for i in range(LAYERS):
        for name, shape in (
            ("q", (D, D)),
            ("k", (D, D)),
            ("v", (D, D)),
            ("o", (D, D)),
            ("up", (D, 4 * D)),
            ("down", (4 * D, D)),
        ):
            p[f"{name}{i}"] = _dense(next(keys), *shape)
            dims[f"{name}{i}"] = DN()
        for g in ("ln1_", "ln2_"):
            p[g + str(i)] = jnp.ones(D, jnp.float32)
            dims[g + str(i)] = None
    return p, dims


def _ln(x, g):
    x = x - x.mean(-1, keepdims=True)
    return g * x / jnp.sqrt((x * x).mean(-1, keepdims=True) + 1e-5)


def _lm(p, tokens):
    t = tokens.shape[-1]
    h = p["embed"][tokens] + p["pos"][:t]
    mask = jnp.tril(jnp.ones((t, t), bool))
    for i in range(LAYERS):
        x = _ln(h, p[f"ln1_{i}"])
        b = x.shape[0]
        q, k, v = (
            (x @ p[f"{n}{i}"]).reshape(b, t, HEADS, D // HEADS) for n in ("q", "k", "v")
        )
        att = jnp.einsum("bthd,bshd->bhts", q, k) / math.sqrt(D // HEADS)
        att = jax.nn.softmax(jnp.where(mask, att, -1e9), axis=-1)
        y = jnp.einsum("bhts,bshd->bthd", att, v).reshape(b, t, D)
        h = h + y @ p[f"o{i}"]
        x = _ln(h, p[f"ln2_{i}"])
        h = h + jax.nn.gelu(x @ p[f"up{i}"]) @ p[f"down{i}"]
    return _ln(h, p["ln_f"]) @ p["head"]


def _xent(logits, labels):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


class _Task:
    """init(key) -> (params, muon dims); loss(params, batch); batches(key, n) -> n
    stacked training batches; val: fixed validation batches."""

    def __init__(self, name, steps):
        self.name, self.steps = name, steps
        if name == "char_lm":
            data = _corpus()
            split = int(0.9 * len(data))
            self.train, self.valid = jnp.asarray(data[:split]), data[split:]
            self.init = _lm_init
            n_val = (len(self.valid) - 1) // (CONTEXT + 1)
            windows = self.valid[: n_val * (CONTEXT + 1)].reshape(n_val, CONTEXT + 1)
            self.val = jnp.asarray(windows[:256])

            def loss(p, batch):
                return _xent(_lm(p, batch[:, :-1]), batch[:, 1:])

            self.loss = loss
            self.val_loss = loss
        else:
            (xt, yt), (xv, yv) = _digits()
            self.train = (jnp.asarray(xt), jnp.asarray(yt))
            self.val = (jnp.asarray(xv), jnp.asarray(yv))
            model = _mlp if name == "digits_mlp" else _cnn
            self.init = _mlp_init if name == "digits_mlp" else _cnn_init

            def loss(p, batch):
                return _xent(model(p, batch[0]), batch[1])

            self.loss = loss
            self.val_loss = loss

    def batches(self, key, n):
        if self.name == "char_lm":
            starts = jr.randint(key, (n, 32), 0, len(self.train) - CONTEXT - 1)
            take = jax.vmap(
                jax.vmap(
                    lambda s: jax.lax.dynamic_slice(self.train, (s,), (CONTEXT + 1,))
                )
            )
            return take(starts)
        x, y = self.train
        idx = jr.randint(key, (n, 128), 0, len(x))
        return x[idx], y[idx]


# --------------------------------------------------------------------- optimizers


def _optimizers(dims):
    lrs_adam = (1e-3, 3e-3, 1e-2)
    lrs_muon = (0.01, 0.02, 0.05)
    return {
        "adam": (lambda lr: optax.adam(lr), lrs_adam),
        "optax.contrib.muon": (
            lambda lr: optax.contrib.muon(
                lr,
                adam_learning_rate=ADAM_LR_FOR_MUON,
                muon_weight_dimension_numbers=dims,
            ),
            lrs_muon,
        ),
        "optim.muon": (
            lambda lr: optim.muon(
                lr,
                adam_learning_rate=ADAM_LR_FOR_MUON,
                muon_weight_dimension_numbers=dims,
            ),
            lrs_muon,
        ),
        "optim.shampoo": (lambda lr: optim.shampoo(lr, block_size=128), lrs_adam),
        "optim.shampoo 4-bit": (
            lambda lr: optim.shampoo(lr, block_size=128, quantize="4bit"),
            lrs_adam,
        ),
        "optim.soap": (lambda lr: optim.soap(lr), lrs_adam),
    }


def _train(task: _Task, opt, steps: int, every: int, seed: int = 0):
    """Validation loss every `every` steps, seconds per training step, and the
    optimizer state's bytes."""
    params, _ = task.init(jr.key(seed))
    state = opt.init(params)

    @jax.jit
    def chunk(params, state, key):
        batches = task.batches(key, every)

        def body(carry, batch):
            params, state = carry
            grads = jax.grad(task.loss)(params, batch)
            updates, state = opt.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), None

        (params, state), _ = jax.lax.scan(body, (params, state), batches)
        return params, state

    val = jax.jit(task.val_loss)
    key = jr.key(seed + 1)
    compiled = chunk.lower(params, state, key).compile()
    curve, seconds = [(0, float(val(params, task.val)))], 0.0
    for i in range(steps // every):
        t0 = time.perf_counter()
        params, state = jax.block_until_ready(
            compiled(params, state, jr.fold_in(key, i))
        )
        seconds += time.perf_counter() - t0
        curve.append(((i + 1) * every, float(val(params, task.val))))
    nbytes = sum(x.nbytes for x in jax.tree.leaves(state) if hasattr(x, "nbytes"))
    return curve, seconds / (steps // every * every), nbytes


def _steps_to(curve, target):
    for step, loss in curve:
        if loss <= target:
            return step
    return None


def training_tables(tasks, steps, every, seeds=(0,), sweep=True):
    out = []
    for name in tasks:
        task = _Task(name, steps)
        _, dims = task.init(jr.key(0))
        table = Table(
            f"{name}: best learning rate per optimizer, {steps} steps (float32)",
            [
                "optimizer",
                "lr",
                "final val loss",
                "min val loss",
                "steps to Adam's loss",
                "ms / step",
                "time to Adam's loss (s)",
                "steps vs Adam",
                "time vs optax muon",
                "state bytes",
            ],
        )
        best = {}
        for opt_name, (make, lrs) in _optimizers(dims).items():
            runs = []
            for lr in lrs if sweep else lrs[1:2]:
                finals, curves, times, nbytes = [], [], [], 0
                for seed in seeds:
                    curve, sec, nbytes = _train(task, make(lr), steps, every, seed)
                    finals.append(curve[-1][1])
                    curves.append(curve)
                    times.append(sec)
                mean_curve = [
                    (c[0][0], float(np.mean([cc[j][1] for cc in curves])))
                    for j, c in enumerate(zip(*curves))
                ]
                final = float(np.mean(finals))
                if not np.isfinite(final):
                    final = float("inf")
                runs.append((final, lr, mean_curve, float(np.median(times)), nbytes))
                print(
                    f"  {name:10s} {opt_name:20s} lr {lr:<6g} final val {final:.4f} "
                    f"{1e3 * float(np.median(times)):.2f} ms/step",
                    flush=True,
                )
            best[opt_name] = min(runs, key=lambda r: r[0])
        target = best["adam"][0]
        steps_to = {k: _steps_to(v[2], target) for k, v in best.items()}
        time_to = {
            k: None if steps_to[k] is None else steps_to[k] * best[k][3] for k in best
        }
        for k, (final, lr, curve, sec, nbytes) in best.items():
            adam_steps, muon_time = steps_to["adam"], time_to["optax.contrib.muon"]
            table.add(
                k,
                lr,
                final,
                min(c[1] for c in curve),
                steps_to[k],
                1e3 * sec,
                time_to[k],
                None
                if steps_to[k] is None or not adam_steps
                else steps_to[k] / adam_steps,
                None if time_to[k] is None or not muon_time else time_to[k] / muon_time,
                nbytes,
            )
        table.notes.append(
            f"learning rates swept: Adam/Shampoo/SOAP {_optimizers(dims)['adam'][1]}, "
            f"Muon {_optimizers(dims)['optim.muon'][1]} (AdamW {ADAM_LR_FOR_MUON} for "
            f"the non-Muon parameters); {len(seeds)} seed(s), validation every "
            f"{every} steps; target = Adam's best final validation loss ({target:.4f})."
        )
        table.notes.append(
            "Ratios below 1 are wins: steps vs Adam (goal: < 1), time vs optax's Muon "
            "(goal: < 1). '–': the target was not reached within the run."
        )
        out.append(table)
    return out


# ---------------------------------------------------------------- root computations


def _spectrum_matrix(key, m, n, cond, dtype=jnp.float32, batch=()):
    k1, k2 = jr.split(key)
    u, _ = jnp.linalg.qr(jr.normal(k1, (*batch, m, n), jnp.float64))
    v, _ = jnp.linalg.qr(jr.normal(k2, (*batch, n, n), jnp.float64))
    s = jnp.logspace(0, -math.log10(cond), n, dtype=jnp.float64)
    return ((u * s) @ jnp.swapaxes(v, -1, -2)).astype(dtype)


def _eigh_polar(g):
    gram = jnp.swapaxes(g, -1, -2) @ g
    lam, v = jnp.linalg.eigh(gram)
    scale = jnp.where(lam > 0, lam, 1) ** -0.5
    inv = (v * scale[..., None, :]) @ jnp.swapaxes(v, -1, -2)
    return g @ inv


def root_tables(full: bool):
    shapes = [(8, 256, 256), (4, 512, 128)] + ([(4, 1024, 1024)] if full else [])
    table = Table(
        "Muon's orthogonalization: batched polar factors (float32, singular values "
        "log-spaced in [1e-3, 1])",
        [
            "shape",
            "method",
            "ms",
            "ratio to optax quintic",
            "||U^T U - I||_F / sqrt(n)",
            "max |sigma - 1|",
            "rel. error vs exact U",
        ],
    )
    muon_mod = optional_import("optax.contrib._muon")
    for shape in shapes:
        *batch, m, n = shape
        g = _spectrum_matrix(jr.key(0), m, n, 1e3, batch=tuple(batch))
        g64 = np.asarray(g, np.float64)
        w, _, vt = np.linalg.svd(g64, full_matrices=False)
        exact = w @ vt
        methods = {
            "jaxdecomp polar_express (6 steps)": lambda x: optim.orthogonalize(x),
            "jaxdecomp polar_express, precision tf32x3": lambda x: optim.orthogonalize(
                x, precision="tf32x3"
            ),
            "jaxdecomp polar_express, precision bf16x3": lambda x: optim.orthogonalize(
                x, precision="bf16x3"
            ),
            "jaxdecomp newton_schulz (to tol)": lambda x: optim.orthogonalize(
                x, method="newton_schulz"
            ),
            "jaxdecomp newton_schulz, precision tf32x3": lambda x: optim.orthogonalize(
                x, method="newton_schulz", precision="tf32x3"
            ),
            "jaxdecomp newton_schulz, precision bf16x3": lambda x: optim.orthogonalize(
                x, method="newton_schulz", precision="bf16x3"
            ),
            "svd": lambda x: optim.orthogonalize(x, method="svd"),
            "eigh of G^T G": _eigh_polar,
        }
        if muon_mod is not None:
            fn = muon_mod.orthogonalize_via_newton_schulz
            methods = {
                "optax fixed quintic (5 steps)": lambda x: jax.vmap(
                    lambda y: fn(y, jnp.asarray((3.4445, -4.775, 2.0315)), 5)
                )(x)
            } | methods
        base = None
        for name, f in methods.items():
            jf = jax.jit(f)
            t = time_fn(jf, g, repeats=5)
            u = np.asarray(jf(g), np.float64)
            s = np.linalg.svd(u, compute_uv=False)
            orth = np.linalg.norm(
                np.swapaxes(u, -1, -2) @ u - np.eye(n), axis=(-2, -1)
            ).max() / math.sqrt(n)
            err = np.linalg.norm(u - exact) / np.linalg.norm(exact)
            base = t if base is None else base
            table.add(
                "x".join(map(str, shape)),
                name,
                1e3 * t,
                t / base,
                orth,
                float(np.abs(s - 1).max()),
                err,
            )
            print(f"  root {shape} {name}: {1e3 * t:.2f} ms", flush=True)
    table.notes += [
        "CPU timings use HIGHEST-precision matmuls for jaxdecomp (the brief's rule) "
        "and optax's default precision for its quintic (the same on CPU).",
        "precision tf32x3 / bf16x3 (`precision=`): the Newton-Schulz matmuls as split "
        "TF32 / bfloat16 products (tensor cores on a GPU); on the CPU each is "
        "several HIGHEST matmuls (slower here): these rows measure the accuracy.",
    ]

    shp = Table(
        "Shampoo's inverse 4th roots: a batch of 16 block statistics 128x128 (float32, "
        "A = G G^T / 128 + 1e-6 ||.||_F I)",
        ["method", "ms", "ratio to batched eigh", "max ||X^4 A - I||_F / sqrt(n)"],
    )
    gs = jr.normal(jr.key(1), (16, 128, 128), jnp.float32)
    a = gs @ jnp.swapaxes(gs, -1, -2) / 128
    ridge = 1e-6 * jnp.linalg.norm(a, axis=(-2, -1))[:, None, None]
    a = a + ridge * jnp.eye(128, dtype=jnp.float32)
    assert a.dtype == jnp.float32
    a64 = np.asarray(a, np.float64)

    def res(x):
        x = np.asarray(x, np.float64)
        x4 = x @ x @ x @ x
        return float(
            (
                np.linalg.norm(x4 @ a64 - np.eye(128), axis=(-2, -1)) / math.sqrt(128)
            ).max()
        )

    roots = {
        "inv_pth_root eigh, batched (what shampoo uses)": jax.jit(
            jax.vmap(lambda x: inv_pth_root(x, 4, throw=False))
        ),
        "inv_pth_root newton_schulz, batched": jax.jit(
            jax.vmap(lambda x: inv_pth_root(x, 4, method="newton_schulz", throw=False))
        ),
        "eigh, one call per block (Python loop)": lambda x: [
            _one_root(x[i]) for i in range(x.shape[0])
        ],
    }
    base = None
    for name, f in roots.items():
        t = time_fn(f, a, repeats=5)
        out = f(a)
        out = jnp.stack(out) if isinstance(out, list) else out
        base = t if base is None else base
        shp.add(name, 1e3 * t, t / base, res(out))
    return [table, shp]


@jax.jit
def _one_root(x):
    lam, v = jnp.linalg.eigh(x)
    return (v * lam**-0.25) @ v.T


def memory_table(tasks_tables):
    """State bytes and final loss of 32-bit vs 4-bit Shampoo, from the training
    tables (same steps, each at its best learning rate)."""
    table = Table(
        "Shampoo state memory: 32-bit vs 4-bit eigenvector state (whole optimizer "
        "state, including grafting moments)",
        [
            "task",
            "32-bit bytes",
            "4-bit bytes",
            "ratio",
            "32-bit final loss",
            "4-bit final loss",
        ],
    )
    for t in tasks_tables:
        rows = {r[0]: r for r in t.rows}
        a, b = rows.get("optim.shampoo"), rows.get("optim.shampoo 4-bit")
        if a is None or b is None:
            continue
        table.add(t.title.split(":")[0], a[-1], b[-1], a[-1] / b[-1], a[2], b[2])
    table.notes.append(
        "The factor statistics and roots shrink 7.1x (0.5625 bytes per entry); the "
        "grafting and momentum moments (parameter-sized, float32) do not, so the whole "
        "state shrinks less for models whose blocks are small."
    )
    return table


def run(
    full: bool = False,
    tasks=None,
    steps=None,
    every=None,
    seeds=None,
    roots=True,
    sweep=True,
):
    tasks = ("digits_mlp", "digits_cnn", "char_lm") if tasks is None else tasks
    steps = (1000 if full else 300) if steps is None else steps
    every = 25 if every is None else every
    seeds = ((0, 1) if full else (0,)) if seeds is None else seeds
    if any(t.startswith("digits") for t in tasks) and _digits() is None:
        tasks = [t for t in tasks if not t.startswith("digits")]
    with jax.numpy_dtype_promotion("standard"):
        tables = training_tables(tasks, steps, every, seeds, sweep)
        out = [*tables, memory_table(tables)]
        if roots:
            out += root_tables(full)
    return out
