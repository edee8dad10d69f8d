"""Matrix square root: accuracy against a float64 reference, and forward+backward time.

Accuracy: relative Frobenius error of A^{1/2} for SPD matrices with log-spaced spectra
(condition numbers 1e1..1e5), in float32 and float64, against a float64 eigh of the
(rounded) input. Rows: jaxdecomp's methods, JAX eigh (default precision), OTT-JAX's
`sqrtm_only`, and `jax.scipy.linalg.sqrtm` (CPU only, no gradient).

Time: forward + backward of `sum(sqrtm(A) * G)` for a batch, jit-compiled, float32,
condition number 1e3, against JAX eigh differentiated by autodiff (the common anchor)
and OTT-JAX. Song et al.'s PyTorch MPA-Lya and the GPU rows need the lent GPU machine.
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jaxdecomp

from ._harness import Table, optional_import, save_figure, time_fn


def _spd_batch(batch, n, kappa, seed=0):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(batch, n, n)))
    lam = np.geomspace(1.0, 1.0 / kappa, n)
    return np.einsum("bij,j,bkj->bik", q, lam, q, optimize=True)


def _ref_sqrt(a):
    w, v = np.linalg.eigh(np.asarray(a, np.float64))
    return np.einsum(
        "...ij,...j,...kj->...ik", v, np.sqrt(np.maximum(w, 0)), v, optimize=True
    )


def _rel(x, ref):
    x = np.asarray(x, np.float64)
    return float(
        np.max(
            np.linalg.norm(x - ref, axis=(-2, -1)) / np.linalg.norm(ref, axis=(-2, -1))
        )
    )


def _ref_lyapunov(s, g, f=None):
    """X with f(S) X + X f(S) = G, in float64 in the eigenbasis of symmetric S."""
    w, v = np.linalg.eigh(np.asarray(s, np.float64))
    mu = w if f is None else f(w)
    gt = np.swapaxes(v, -1, -2) @ np.asarray(g, np.float64) @ v
    return v @ (gt / (mu[..., :, None] + mu[..., None, :])) @ np.swapaxes(v, -1, -2)


def _ref_grad(a, g):
    """d/dA sum(A^{1/2} * G) for symmetric G: the Lyapunov solve X Gam + Gam X = G."""
    return _ref_lyapunov(a, g, lambda w: np.sqrt(np.maximum(w, 0)))


def _song_anchor():
    """Song et al.'s MPA-Lya (PyTorch), loaded from a checkout named by the environment
    variable SONG_MATSQRT_DIR (it is not vendored here). Needs `pip install torch
    mpmath` (not in the `bench` extra: torch is a multi-GB install). Returns a timing
    function, or None."""
    path = os.environ.get("SONG_MATSQRT_DIR")
    if not path:
        print(
            "  (skipping Song et al. MPA-Lya: set SONG_MATSQRT_DIR to a checkout of "
            "KingJamesSong/FastDifferentiableMatSqrt)"
        )
        return None
    torch = optional_import("torch")
    if torch is None or optional_import("mpmath") is None:
        return None
    spec = importlib.util.spec_from_file_location(
        "song_torch_utils", Path(path) / "torch_utils.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def run(a, g, repeats):
        m = torch.tensor(np.asarray(a), device=device, requires_grad=True)
        gt = torch.tensor(np.asarray(g), device=device)

        def once():
            m.grad = None
            out = module.MPA_Lya.apply(m)
            (out * gt).sum().backward()
            if device == "cuda":
                torch.cuda.synchronize()
            return out

        once()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = once()
            times.append(time.perf_counter() - t0)
        return (
            statistics.median(times),
            out.detach().cpu().numpy(),
            m.grad.detach().cpu().numpy(),
        )

    return run


def _eigh_sqrt(a, precision=None):  # the anchor: plain JAX eigh + autodiff
    w, v = jnp.linalg.eigh(a)
    return jnp.matmul(
        v * jnp.sqrt(jnp.maximum(w, 0))[..., None, :],
        jnp.swapaxes(v, -1, -2),
        precision=precision,
    )


def _on_cpu() -> bool:
    return jax.default_backend() == "cpu"


def _candidates(ott):
    out = {
        f"jaxdecomp {m}": (lambda a, m=m: jaxdecomp.sqrtm(a, method=m, throw=False))
        for m in ("eigh", "newton_schulz", "mixed", "pade", "taylor")
    }
    out["JAX eigh + autodiff (default precision)"] = _eigh_sqrt
    if not _on_cpu():  # default float32 matmuls are TF32 there: add the fair anchor
        out["JAX eigh + autodiff (HIGHEST)"] = lambda a: _eigh_sqrt(
            a, jax.lax.Precision.HIGHEST
        )
    if ott is not None:
        from ott.math import matrix_square_root as msr

        def ott_sqrt(a):
            # OTT's loop breaks on float32 under jax_enable_x64 (which this runner
            # sets), so float32 inputs are traced with x64 off, as its users run it.
            with jax.enable_x64(a.dtype == jnp.float64):
                return jax.vmap(msr.sqrtm_only)(a)

        out["OTT-JAX sqrtm_only"] = ott_sqrt
    return out


def scheme_candidates():
    """The Newton-Schulz methods with float32-accurate tensor-core schemes (GPU rows
    of the timing table; on a CPU they only cost more)."""

    def make(method, p):
        return lambda a: jaxdecomp.sqrtm(a, method=method, precision=p, throw=False)

    return {
        f"jaxdecomp {m} ({p})": make(m, p)
        for m, p in (
            ("newton_schulz", "tf32x3"),
            ("newton_schulz", "bf16x6"),
            ("mixed", "tf32x3"),
            ("mixed", "bf16x6"),
        )
    }


def run(full: bool = False):
    ott = optional_import("ott")
    cands = _candidates(ott)
    return [
        *accuracy_tables(full, cands),
        timing_table(full, cands),
        *precision_table(full),
    ]


def accuracy_tables(full, cands):
    tables = []

    sizes = (8, 64, 256, 1024) if full else (16, 128)
    for dtype in (jnp.float32, jnp.float64):
        acc = Table(
            f"sqrtm accuracy, {np.dtype(dtype).name}: max relative Frobenius error "
            f"over n in {sizes} (4 matrices each)",
            ["method", "kappa=1e1", "kappa=1e3", "kappa=1e4", "kappa=1e5"],
        )
        scipy_name = "jax.scipy.linalg.sqrtm (CPU, no grad)"
        names = [*cands, *([scipy_name] if _on_cpu() else [])]
        failures = set()
        errs = {name: [] for name in names}
        for kappa in (1e1, 1e3, 1e4, 1e5):
            worst = dict.fromkeys(names, 0.0)
            for n in sizes:
                a = _spd_batch(4 if n < 1024 else 1, n, kappa, seed=n).astype(dtype)
                ref = _ref_sqrt(a)
                aj = jnp.asarray(a)
                for name, f in cands.items():
                    try:
                        err = _rel(jax.jit(f)(aj), ref)
                    except Exception as e:  # noqa: BLE001 - an anchor failing is a result
                        failures.add(f"{name}: {type(e).__name__} in {np.dtype(dtype)}")
                        err = float("nan")
                    worst[name] = max(worst[name], err)
                if _on_cpu():  # jax.scipy.linalg.sqrtm is CPU-only
                    scipy_sqrt = jax.vmap(jax.scipy.linalg.sqrtm)(aj).real
                    worst[scipy_name] = max(worst[scipy_name], _rel(scipy_sqrt, ref))
            for name in names:
                errs[name].append(worst[name])
        for name in names:
            acc.add(name, *errs[name])
        acc.notes.append(
            "Reference: float64 eigh of the input as rounded to the dtype. Targets: "
            "<= 1e-5 (float32), <= 1e-10 (float64) for every method but pade/taylor."
        )
        acc.notes.extend(f"failed (nan in the table): {f}" for f in sorted(failures))
        tables.append(acc)

    return tables


def timing_table(full, cands, configs=None, plot=True, kappa=1e3):
    if configs is None:
        configs = (
            [(256, 32), (256, 64), (256, 128), (256, 256), (64, 512)]
            if full
            else [(32, 32), (32, 64), (16, 128)]
        )
    song = _song_anchor()
    timing = Table(
        f"sqrtm forward+backward time, float32, kappa={kappa:.0e} (jit, median after "
        "warm-up)".replace("e+0", "e"),
        [
            "batch x n",
            "method",
            "time (ms)",
            "time / JAX eigh",
            "rel. error of A^1/2",
            "rel. error of gradient",
        ],
    )
    for batch, n in configs:
        a = jnp.asarray(_spd_batch(batch, n, kappa, seed=1), jnp.float32)
        g = np.random.default_rng(2).normal(size=(batch, n, n))
        g = jnp.asarray(g + np.swapaxes(g, -1, -2), jnp.float32)  # symmetric
        ref = _ref_sqrt(np.asarray(a))
        ref_grad = _ref_grad(np.asarray(a), np.asarray(g))
        rows = {}
        for name, f in cands.items():
            # pade/taylor are approximate; on CPU, OTT is slow and mixed's bfloat16
            # matmuls are emulated
            slow_on_cpu = (name.startswith("OTT") and n > 128) or (
                name.endswith("mixed") and n > 64
            )
            if (n > 128 and name.endswith(("pade", "taylor"))) or (
                _on_cpu() and slow_on_cpu
            ):
                continue
            loss = jax.jit(jax.value_and_grad(lambda a, f=f: jnp.sum(f(a) * g)))
            try:
                t = time_fn(loss, a, repeats=5 if full else 3)
                rows[name] = (t, _rel(jax.jit(f)(a), ref), _rel(loss(a)[1], ref_grad))
                print(f"    {batch} x {n} {name}: {1e3 * t:.3g} ms", flush=True)
            except Exception as e:  # noqa: BLE001 - an anchor failing is a result
                timing.notes.append(
                    f"{name} failed at {batch} x {n}: {type(e).__name__}"
                )
        if song is not None:
            t, out, grad = song(a, g, 5 if full else 3)
            rows["Song et al. MPA-Lya (PyTorch)"] = (
                t,
                _rel(out, ref),
                _rel(grad, ref_grad),
            )
            print(f"    {batch} x {n} Song et al.: {1e3 * t:.3g} ms", flush=True)
        t_eigh = rows["JAX eigh + autodiff (default precision)"][0]
        for name, (t, err, gerr) in rows.items():
            timing.add(f"{batch} x {n}", name, 1e3 * t, t / t_eigh, err, gerr)
    timing.notes.append(
        "pade/taylor (and OTT-JAX on CPU) are timed up to n = 128 only, mixed on "
        "CPU (bfloat16 emulated) up to n = 64. "
        "'auto' picks eigh on every backend."
    )
    if plot:
        _plot(timing)
    return timing


def _plot(timing: Table):
    """Accuracy against time, one marker per method and size (output folder)."""
    methods = sorted({row[1] for row in timing.rows})
    sizes = sorted({row[0] for row in timing.rows}, key=lambda s: int(s.split()[-1]))
    markers = "os^vDP*X"

    def draw(ax):
        for i, method in enumerate(methods):
            pts = [(row[2], row[4]) for row in timing.rows if row[1] == method]
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                markers[i % len(markers)],
                label=method,
                alpha=0.8,
            )
        ax.set_xlabel("forward + backward time (ms)")
        ax.set_ylabel("relative error of A^1/2 (float32)")
        ax.set_title(f"sqrtm, {jax.devices()[0].platform}, sizes {', '.join(sizes)}")

    save_figure("sqrtm_accuracy_time.png", draw)


# --------------------------------------------------------------------------------------
# Tensor-core precision schemes (`precision=`)
# --------------------------------------------------------------------------------------

SCHEMES = ("highest", "tf32x3", "bf16x6", "bf16x3")
_PASSES = {"highest": 1, "tf32x3": 3, "bf16x6": 6, "bf16x3": 3}


def _ref_polar(a):
    w, _, vt = np.linalg.svd(np.asarray(a, np.float64), full_matrices=False)
    return w @ vt


def _scheme_paths(p):
    """name -> (function of (a, g), reference of (a, g) in float64, its output kind)."""

    def ns_loss(a, g):
        f = lambda m: jaxdecomp.sqrtm(  # noqa: E731
            m, method="newton_schulz", backward="newton_schulz", precision=p
        )
        return jax.value_and_grad(lambda m: jnp.sum(f(m) * g))(a)[1]

    return {
        "sqrtm newton_schulz": (
            lambda a, g: jaxdecomp.sqrtm(a, method="newton_schulz", precision=p),
            lambda a, g: _ref_sqrt(a),
        ),
        "sqrtm mixed": (
            lambda a, g: jaxdecomp.sqrtm(a, method="mixed", precision=p),
            lambda a, g: _ref_sqrt(a),
        ),
        "gradient of sum(sqrtm(A) G), newton_schulz both ways": (
            ns_loss,
            lambda a, g: _ref_grad(a, g),
        ),
        "polar newton_schulz (A itself)": (
            lambda a, g: jaxdecomp.polar(a, method="newton_schulz", precision=p),
            lambda a, g: _ref_polar(a),
        ),
        "solve_lyapunov newton_schulz (S = A, G)": (
            lambda a, g: jaxdecomp.solve_lyapunov(
                a, g, method="newton_schulz", precision=p
            ),
            lambda a, g: _ref_lyapunov(a, g),
        ),
    }


def precision_table(full: bool = False, sizes=None, kappa: float = 1e3, time=True):
    """Accuracy (and, on this machine, time) of the Newton-Schulz paths with each
    `precision=` scheme, float32, against float64 references.

    The schemes' parts and products are formed in JAX, so the errors are those a
    GPU's tensor cores give (up to the order of float32 sums); the times are this
    machine's (on a CPU the schemes only cost more: bfloat16 is emulated)."""
    if sizes is None:
        sizes = (128, 256, 512) if full else (64, 128)
    batch = 2
    rng = np.random.default_rng(3)
    gemm = Table(
        "float32 matmul schemes: relative Frobenius error of A B (normal entries) "
        "against float64",
        ["n", *SCHEMES, "one TF32 pass (H100 default)", "one bfloat16 pass"],
    )
    from jaxdecomp._matmul import round_to_tf32, scheme_matmul

    for n in sizes:
        a, b = rng.standard_normal((2, n, n))
        ref = a @ b
        a32, b32 = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
        errs = [
            _rel(jax.jit(scheme_matmul(p, jnp.float32)[0])(a32, b32), ref)
            for p in SCHEMES
        ]
        tf32 = jnp.matmul(
            round_to_tf32(a32), round_to_tf32(b32), precision=jax.lax.Precision.HIGHEST
        )
        bf16 = jnp.matmul(
            a32.astype(jnp.bfloat16),
            b32.astype(jnp.bfloat16),
            preferred_element_type=jnp.float32,
        )
        gemm.add(n, *errs, _rel(tf32, ref), _rel(bf16, ref))
    gemm.notes.append(
        "Products per matmul: highest 1 (CUDA cores on a GPU), tf32x3 3 (TF32 tensor "
        "cores), bf16x6 6 and bf16x3 3 (bfloat16 tensor cores). The one-pass columns "
        "are what the split schemes correct: TF32 is a float32 matmul at default "
        "precision on an H100."
    )

    title = (
        f"Newton-Schulz paths by precision scheme, float32, kappa={kappa:.0e}, "
        f"batch {batch}: relative error against float64 (and time on this machine)"
    )
    table = Table(
        title.replace("e+0", "e"),
        ["path", "n", "scheme", "rel. error", "steps", "time (ms)", "time / highest"],
    )
    for n in sizes:
        a = _spd_batch(batch, n, kappa, seed=n).astype(np.float32)
        g = rng.standard_normal((batch, n, n))
        g = (g + np.swapaxes(g, -1, -2)).astype(np.float32)
        aj, gj = jnp.asarray(a), jnp.asarray(g)
        base = {}
        for p in SCHEMES:
            for name, (f, ref_fn) in _scheme_paths(p).items():
                if name == "sqrtm mixed" and n > 128 and _on_cpu() and not full:
                    continue
                fj = jax.jit(f)
                out = fj(aj, gj)
                ref = ref_fn(a, g)
                if name.startswith("gradient"):
                    out = 0.5 * (out + jnp.swapaxes(out, -1, -2))
                    ref = 0.5 * (ref + np.swapaxes(ref, -1, -2))
                err = _rel(out, ref)
                steps = ""
                if name.startswith(("sqrtm", "polar")):
                    fn = (
                        jaxdecomp.polar if name.startswith("polar") else jaxdecomp.sqrtm
                    )
                    meth = "mixed" if "mixed" in name else "newton_schulz"
                    sol = jax.jit(
                        lambda m, fn=fn, meth=meth, p=p: fn(
                            m, method=meth, precision=p, full_output=True
                        )
                    )(aj)
                    steps = int(sol.n_steps)
                t = time_fn(fj, aj, gj, repeats=3) if time else float("nan")
                if p == "highest":
                    base[name] = t
                table.add(name, n, p, err, steps, 1e3 * t, t / base[name])
                print(f"    {name} n={n} {p}: {err:.2e}, {1e3 * t:.3g} ms", flush=True)
    table.notes.append(
        "The errors are the GPU's (the schemes are formed in JAX; CPU and GPU differ "
        "only in the order of float32 sums). The times are this machine's: on a CPU "
        "bfloat16 is emulated and every scheme is slower than highest; the GPU times "
        "are in the sqrtm GPU table (rows 'newton_schulz (tf32x3)' etc.). steps: "
        "Newton-Schulz steps (mixed: refinement steps)."
    )
    return [gemm, table]
