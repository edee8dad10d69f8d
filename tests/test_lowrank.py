"""Tests for jaxdecomp.lowrank: layers, LoRA, DLRT."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest
from jax.test_util import check_grads

from jaxdecomp.lowrank import (
    FactorizedLinear,
    LoRA,
    LowRankLinear,
    compress,
    compression_report,
    dlrt,
    lora,
    merge,
    trainable,
    trp,
    unmerge,
)


def test_lowrank_linear_forward_rank_and_export(getkey):
    layer = LowRankLinear(12, 7, max_rank=6, rank=4, key=getkey())
    x = jr.normal(getkey(), (12,))
    w = np.asarray(layer.weight)
    assert np.linalg.matrix_rank(w, tol=1e-10) == 4 and int(layer.rank) == 4
    np.testing.assert_allclose(layer(x), w @ np.asarray(x) + layer.bias, atol=1e-12)
    np.testing.assert_allclose(layer.u.T @ layer.u, np.eye(6), atol=1e-12)
    dense = layer.to_dense()
    np.testing.assert_allclose(dense(x), layer(x), atol=1e-12)
    small = layer.shrink()
    assert isinstance(small, FactorizedLinear) and small.rank == 4
    np.testing.assert_allclose(small(x), layer(x), atol=1e-12)
    assert int(layer.with_rank(2).rank) == 2


def test_layers_gradients_both_modes(getkey):
    low = LowRankLinear(5, 4, max_rank=3, key=getkey())
    fact = FactorizedLinear(5, 4, rank=2, key=getkey())
    x = jr.normal(getkey(), (5,))
    for layer in (low, fact):
        params, static = eqx.partition(layer, eqx.is_inexact_array)
        leaves, treedef = jax.tree_util.tree_flatten(params)

        def f(*leaves, static=static, treedef=treedef):
            return eqx.combine(jax.tree_util.tree_unflatten(treedef, leaves), static)(x)

        if layer is low:  # the mask is not differentiated; perturb the rest only
            mask_index = [i for i, v in enumerate(leaves) if v is params.mask][0]
            free = [i for i in range(len(leaves)) if i != mask_index]

            def g(*free_leaves):
                full = list(leaves)
                for i, v in zip(free, free_leaves):
                    full[i] = v
                return f(*full)

            check_grads(g, [leaves[i] for i in free], order=2, modes=("fwd", "rev"))
            grads = eqx.filter_grad(lambda m: jnp.sum(m(x)))(layer)
            assert float(jnp.abs(grads.mask).max()) == 0.0
        else:
            check_grads(f, leaves, order=2, modes=("fwd", "rev"))


def test_layer_vmap_jit_and_no_recompile_on_rank_change(getkey):
    layer = LowRankLinear(8, 6, max_rank=5, key=getkey())
    xs = jr.normal(getkey(), (10, 8))

    @eqx.filter_jit
    @eqx.debug.assert_max_traces(max_traces=1)
    def apply(layer, xs):
        return jax.vmap(layer)(xs)

    out = [apply(layer.with_rank(r), xs) for r in (5, 3, 1)]
    np.testing.assert_allclose(out[0], jnp.stack([layer(x) for x in xs]), atol=1e-12)
    assert not np.allclose(out[0], out[2])


def test_layer_bad_input(getkey):
    with pytest.raises(ValueError, match="max_rank"):
        LowRankLinear(4, 3, max_rank=4, key=getkey())
    with pytest.raises(ValueError, match="rank"):
        LowRankLinear(4, 3, max_rank=2, rank=3, key=getkey())
    with pytest.raises(ValueError, match="rank"):
        FactorizedLinear(4, 3, rank=0, key=getkey())
    with pytest.raises(ValueError, match="in_features"):
        LowRankLinear(0, 3, max_rank=1, key=getkey())


# --------------------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------------------


def test_lora_starts_at_base_and_freezes_it(getkey):
    base = eqx.nn.Linear(6, 4, key=getkey())
    layer = LoRA(base, rank=2, alpha=4.0, key=getkey())
    x = jr.normal(getkey(), (6,))
    np.testing.assert_allclose(layer(x), base(x), atol=1e-12)
    grads = eqx.filter_grad(lambda m: jnp.sum(m(x) ** 2))(layer)
    assert float(jnp.abs(grads.base.weight).max()) == 0.0
    assert float(jnp.abs(grads.base.bias).max()) == 0.0
    assert float(jnp.abs(grads.b).max()) > 0
    # Both modes, second order, in the adapter factors.
    layer = eqx.tree_at(lambda m: m.b, layer, jr.normal(getkey(), (4, 2)))
    check_grads(
        lambda a, b: eqx.tree_at(lambda m: (m.a, m.b), layer, (a, b))(x),
        (layer.a, layer.b),
        order=2,
        modes=("fwd", "rev"),
    )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_lora_merge_unmerge_exact_under_jit(getkey, dtype):
    base = eqx.nn.Linear(32, 16, dtype=dtype, key=getkey())
    layer = LoRA(base, rank=4, alpha=8.0, key=getkey())
    layer = eqx.tree_at(lambda m: m.b, layer, jr.normal(getkey(), (16, 4), dtype))
    xs = jr.normal(getkey(), (5, 32), dtype)
    merged = eqx.filter_jit(lambda m: m.merge())(layer)
    assert merged.merged and merged.a.dtype == dtype
    back = eqx.filter_jit(lambda m: m.unmerge())(merged)
    np.testing.assert_allclose(jax.vmap(merged)(xs), jax.vmap(layer)(xs), atol=1e-6)
    np.testing.assert_allclose(back.base.weight, base.weight, atol=1e-6)
    lin = layer.to_linear()
    assert isinstance(lin, eqx.nn.Linear)
    np.testing.assert_allclose(jax.vmap(lin)(xs), jax.vmap(layer)(xs), atol=1e-6)
    # Training can continue on a merged layer: same adapter gradients.
    g1 = eqx.filter_grad(lambda m: jnp.sum(jax.vmap(m)(xs) ** 2))(layer)
    g2 = eqx.filter_grad(lambda m: jnp.sum(jax.vmap(m)(xs) ** 2))(merged)
    np.testing.assert_allclose(g1.b, g2.b, rtol=1e-4, atol=1e-4)


def test_lora_helper_tree_surgery(getkey):
    mlp = eqx.nn.MLP(8, 3, width_size=16, depth=2, key=getkey())
    adapted = lora(mlp, rank=2, alpha=4.0, key=getkey())
    assert all(isinstance(layer, LoRA) for layer in adapted.layers)
    only_last = lora(mlp, 2, where=lambda m: m.layers[-1], key=getkey())
    assert isinstance(only_last.layers[-1], LoRA)
    assert isinstance(only_last.layers[0], eqx.nn.Linear)
    params, frozen = eqx.partition(adapted, trainable(adapted))
    assert len(jax.tree_util.tree_leaves(params)) == 6  # (a, b) per layer
    x = jr.normal(getkey(), (8,))
    np.testing.assert_allclose(adapted(x), mlp(x), atol=1e-12)
    m2 = merge(adapted)
    np.testing.assert_allclose(m2(x), adapted(x), atol=1e-12)
    assert all(not layer.merged for layer in unmerge(m2).layers)


def test_lora_bad_input(getkey):
    conv = eqx.nn.Conv2d(3, 4, 3, key=getkey())
    with pytest.raises(TypeError, match="not supported|only eqx.nn.Linear"):
        LoRA(conv, rank=2, key=getkey())
    base = eqx.nn.Linear(4, 3, key=getkey())
    with pytest.raises(ValueError, match="rank"):
        LoRA(base, rank=4, key=getkey())
    with pytest.raises(ValueError, match="alpha"):
        LoRA(base, rank=2, alpha=0.0, key=getkey())
    with pytest.raises(TypeError, match="eqx.nn.Linear"):
        lora({"c": conv}, 2, where=lambda m: m["c"], key=getkey())


# --------------------------------------------------------------------------------------
# DLRT
# --------------------------------------------------------------------------------------


def _teacher_problem(key, n_in=40, n_out=30, rank=3, n=256, dtype=jnp.float32):
    k1, k2, k3 = jr.split(key, 3)
    t = jr.normal(k1, (n_out, rank), dtype) @ jr.normal(k2, (rank, n_in), dtype) / 5
    x = jr.normal(k3, (n, n_in), dtype)
    return x, x @ t.T


def _fit(layer, opt, x, y, steps):
    """`steps` jitted steps of `opt` on the mean squared error of `layer` on (x, y);
    the step must trace once (also when a LowRankLinear's rank changes). Returns
    (layer, state, loss, ranks), ranks empty for layers without one."""
    state = opt.init(layer)

    @eqx.filter_jit
    @eqx.debug.assert_max_traces(max_traces=1)
    def step(layer, state):
        loss, grads = eqx.filter_value_and_grad(
            lambda m: jnp.mean((jax.vmap(m)(x) - y) ** 2)
        )(layer)
        updates, state = opt.update(grads, state, layer)
        return eqx.apply_updates(layer, updates), state, loss

    ranks = []
    for _ in range(steps):
        layer, state, loss = step(layer, state)
        if hasattr(layer, "rank"):
            ranks.append(int(layer.rank))
    return layer, state, loss, ranks


def _train_teacher(key, opt, steps):
    """Fit a rank-3 teacher with a LowRankLinear(max_rank=12) and `opt`."""
    k1, k2 = jr.split(key)
    x, y = _teacher_problem(k1)
    layer = LowRankLinear(40, 30, max_rank=12, dtype=jnp.float32, key=k2)
    return _fit(layer, opt, x, y, steps)


def test_dlrt_recovers_rank_keeps_orthonormality_no_recompile(getkey):
    layer, _, loss, ranks = _train_teacher(getkey(), dlrt(0.5, tau=0.05), 1000)
    assert ranks[0] <= 12 and ranks[-1] == 3  # the teacher's rank
    assert float(loss) < 1e-6
    eye = jnp.eye(12, dtype=jnp.float32)
    assert float(jnp.abs(layer.u.T @ layer.u - eye).max()) <= 1e-6
    assert float(jnp.abs(layer.v.T @ layer.v - eye).max()) <= 1e-6
    assert layer.u.dtype == jnp.float32


def test_dlrt_momentum_is_carried_across_rank_changes(getkey):
    opt = dlrt(0.05, tau=0.05, momentum=0.9)
    _, state, loss, ranks = _train_teacher(getkey(), opt, 600)
    assert ranks[-1] == 3 and len(set(ranks)) > 1  # the rank changed on the way
    assert float(loss) < 1e-6
    assert state.momentum.k.shape == (30, 12)  # momentum lives in the (fixed) shapes
    with pytest.raises(ValueError, match="momentum"):
        dlrt(0.1, momentum=1.0)


def test_dlrt_with_multi_transform_and_bad_input(getkey):
    model = {
        "low": LowRankLinear(6, 5, max_rank=4, key=getkey()),
        "dense": eqx.nn.Linear(5, 2, key=getkey()),
    }
    labels = jax.tree_util.tree_map(
        lambda _: "adam", model, is_leaf=lambda x: isinstance(x, LowRankLinear)
    )
    labels["low"] = jax.tree_util.tree_map(lambda _: "dlrt", model["low"])
    opt = optax.multi_transform(
        {"dlrt": dlrt(0.1, 0.1), "adam": optax.adam(1e-2)}, labels
    )
    params = eqx.filter(model, eqx.is_inexact_array)
    state = opt.init(params)
    x = jr.normal(getkey(), (6,))

    def loss(m):
        return jnp.sum(m["dense"](m["low"](x)) ** 2)

    grads = eqx.filter_grad(loss)(model)
    with jax.numpy_dtype_promotion("standard"):  # optax.adam's step count is an int
        updates, state = opt.update(grads, state, params)
    new = eqx.apply_updates(model, updates)
    assert float(loss(new)) < float(loss(model))
    with pytest.raises(ValueError, match="tau"):
        dlrt(0.1, tau=1.5)
    with pytest.raises(ValueError, match="learning_rate"):
        dlrt(-0.1)


# --------------------------------------------------------------------------------------
# TRP and compress
# --------------------------------------------------------------------------------------


def test_trp_finds_low_rank_and_compress_exports_it(getkey):
    layer = eqx.nn.Linear(16, 12, key=getkey())
    x = jr.normal(getkey(), (64, 16))
    y = x[:, :2] @ jnp.ones((2, 12))  # rank-1 teacher
    opt = trp(0.1, nuclear_weight=1e-2, period=5, tol=0.3)
    layer, *_ = _fit(layer, opt, x, y, 50)
    s = np.linalg.svd(np.asarray(layer.weight), compute_uv=False)
    assert s[1] < 1e-5 * s[0]
    small = compress(layer, tol=1e-4)
    assert int(small.rank) == 1
    np.testing.assert_allclose(small(x[0]), layer(x[0]), atol=1e-5)
    # Under optax.multi_transform, with a dense layer left to another optimizer.
    model = {
        "hidden": eqx.nn.Linear(4, 4, key=getkey()),
        "out": eqx.nn.Linear(4, 2, key=getkey()),
    }
    labels = {
        "hidden": jax.tree_util.tree_map(lambda _: "trp", model["hidden"]),
        "out": jax.tree_util.tree_map(lambda _: "sgd", model["out"]),
    }
    opt = optax.multi_transform({"trp": trp(0.1), "sgd": optax.sgd(0.1)}, labels)
    params = eqx.filter(model, eqx.is_inexact_array)
    state = opt.init(params)
    grads = eqx.filter_grad(lambda m: jnp.sum(m["out"](m["hidden"](jnp.ones(4))) ** 2))(
        model
    )
    updates, _ = opt.update(grads, state, params)
    assert jnp.all(jnp.isfinite(updates["hidden"].weight))
    with pytest.raises(ValueError, match="period"):
        trp(0.1, period=0)
    with pytest.raises(ValueError, match="tol"):
        trp(0.1, tol=1.0)


def test_compress_rank_tol_budget(getkey):
    mlp = eqx.nn.MLP(32, 4, width_size=64, depth=2, key=getkey())
    x = jr.normal(getkey(), (32,))
    full = compress(mlp, rank=64)
    np.testing.assert_allclose(full(x), mlp(x), atol=1e-10)  # full rank: exact
    ranks = [
        layer["rank"] for layer in compression_report(compress(mlp, rank=3))["layers"]
    ]
    assert ranks == [3, 3, 3]
    w = np.asarray(mlp.layers[1].weight)
    s = np.linalg.svd(w, compute_uv=False)
    r = int(compress(mlp.layers[1], tol=0.5).rank)
    assert np.linalg.norm(s[r:]) <= 0.5 * np.linalg.norm(s) < np.linalg.norm(s[r - 1 :])
    small = compress(mlp, budget=2000)
    report = compression_report(small)
    assert sum(l["macs"] for l in report["layers"]) <= 2000  # noqa: E741
    with pytest.raises(ValueError, match="exactly one"):
        compress(mlp, rank=2, tol=0.1)
    with pytest.raises(ValueError, match="budget"):
        compress(mlp, budget=10)
    with pytest.raises(TypeError, match="eqx.nn.Linear"):
        compress(
            {"c": eqx.nn.Conv2d(1, 1, 3, key=getkey())}, rank=1, where=lambda m: m["c"]
        )
