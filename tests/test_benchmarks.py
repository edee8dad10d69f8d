"""The benchmark runner and harness work (tiny sizes; timings are not asserted)."""

import jax
import jax.numpy as jnp
import pytest

from benchmarks import _harness, cg, implicit, lowrank, optim, sinkhorn
from benchmarks.__main__ import main


def test_table_and_timer():
    t = _harness.Table("demo", ["a", "b"])
    t.add("x", 1.5e-5)
    with pytest.raises(ValueError):
        t.add("only one")
    md = t.markdown()
    assert "| a | b |" in md and "1.50e-05" in md
    assert _harness.time_fn(lambda: jnp.ones(3), repeats=2) >= 0
    calls = []
    fn = jax.jit(lambda x: x + 1)
    # a jitted function is compiled ahead of time; a run longer than long_s is
    # timed once, with no separate warm-up run
    assert _harness.time_fn(fn, jnp.ones(3), repeats=3, long_s=0.0) >= 0
    _harness.time_fn(lambda: calls.append(1), repeats=3, long_s=0.0)
    assert len(calls) == 2  # not jitted: warm-up, then one (long) timed run


def test_sinkhorn_benchmark_runs_and_converges():
    (table,) = sinkhorn.run(
        sizes=(150,),
        dtypes=("float64",),
        epsilons=(1e-2,),
        curves=False,
        sparse_k=False,
    )
    rows = {row[3]: row for row in table.rows}
    for name in (
        "sinkhorn",
        "sinkhorn momentum 1.8",
        "sinkhorn_newton (dense)",
        "sinkhorn_newton (sparse, k=64)",
    ):
        assert rows[f"jaxdecomp {name}"][7] == "yes"  # measured marginal error
        assert rows[f"jaxdecomp {name}"][6] <= sinkhorn.TOL["float64"]


def test_sparse_k_benchmark_runs():
    table = sinkhorn.sparse_k_table(configs=[(300, "float64", 1e-2, 1e-9)])
    rows = {row[4]: row for row in table.rows}
    assert set(rows) == {"dense", "sparse", "sparse (k = sparse_k)"}
    assert all(row[9] <= 1e-9 for row in table.rows)  # every variant converged
    assert rows["sparse (k = sparse_k)"][6] >= 0.99  # the chosen k keeps the mass


def test_implicit_tangent_solver_table():
    table = implicit.tangent_solver_table(sizes=(300,), scales=(1e-4,), repeats=1)
    rows = {row[2].split(" (")[0]: row for row in table.rows}
    ours = rows["default"]
    assert ours[3] == "gradient" and ours[4] < 1e-4


def test_implicit_benchmark_runs_and_is_accurate():
    tables = implicit.bench(d=20, steps=400, repeats=1)
    main_tables = [t for t in tables if "hypergradient," in t.title]
    assert len(main_tables) == 2
    for table in main_tables:
        errors = {row[0]: row[-1] for row in table.rows if row[-1] is not None}
        assert errors["jaxdecomp implicit (auto)"] < 1e-9
        assert errors["jaxdecomp implicit (dense LU)"] < 1e-9
    early = tables[-1]
    ours = [row for row in early.rows if row[1] == "jaxdecomp implicit"]
    assert ours and all(row[3].startswith("raised") for row in ours)


def test_runner_rejects_unknown_name():
    with pytest.raises(SystemExit):
        main(["no-such-benchmark"])


@pytest.mark.slow  # a minute of compilation; run with --runslow before benchmarking
def test_cg_benchmark_runs_and_agrees_with_scipy():
    main, gen, three_d, accuracy, cost = cg.run(
        sizes=(16,),
        train_steps=3,
        train_n=8,
        plots=False,
        variances=(cg.VARIANCE,),
        sizes_3d=(8,),
        true_residual_sizes=(16,),
        check_cost_sizes=(16,),
    )
    # float32: whatever solvers.cg reports successful meets rtol in the true residual
    checked = [r for r in accuracy.rows if r[2].startswith("solvers.cg")]
    assert len(checked) == 4
    for _, rtol, _, _, true, reported in checked:
        if reported == "successful":  # (1%: evaluating b - Ax in float32 or float64)
            assert true <= 1.01 * rtol
    rows = {(row[0].split(" (")[0], row[2]): row for row in main.rows + three_d.rows}
    problems = ("Poisson", f"diffusion var {cg.VARIANCE}")
    for problem in problems + ("3-D Poisson", f"3-D diffusion var {cg.VARIANCE}"):
        ours = rows[(problem, "solvers.cg + none")]
        scipy_row = rows.get((problem, "SciPy CG"))
        for method in ("none", "Jacobi", "IC(0)", "Multigrid V(1,1)"):
            assert rows[(problem, f"solvers.cg + {method}")][6] <= 1e-8  # true residual
        if scipy_row is not None:  # same stopping rule, same iterations (+-2)
            assert abs(ours[3] - scipy_row[3]) <= 2
    assert len(gen.rows) == 1
    # with and without the true-residual check: the same steps and solution (float64)
    no_check, check, ours, _ = cost.rows
    assert no_check[2] == check[2] == ours[2] and abs(check[3] - no_check[3]) <= 1e-12
    assert ours[3] <= 1e-8


@pytest.mark.slow  # 45 s of compilation (every table row); run with --runslow
def test_lowrank_benchmark_runs():
    pytest.importorskip("sklearn")
    main, compression, lora_table = lowrank.run(
        seeds=range(1),
        epochs=2,
        taus_sgd=(0.2,),
        taus_adam=((0.15, 0.35),),
        plots=False,
        taus_seq=(0.2,),
    )
    rows = {row[0]: row for row in main.rows}
    assert float(rows["dense + Adam"][1].split()[0]) > 30  # learns something
    # every compression method at every budget, within its budget (+ biases)
    budgets = [r for r in compression.rows if r[1] is not None]
    assert len(budgets) == len(lowrank.COMPRESSIONS) * 3
    for r in budgets:
        assert r[2] <= r[1] / 100 * (64 * 256 + 256 * 256 + 2560) + 256 + 256 + 10
    assert rows["dense + Adam"][3] == 85002
    for name in (
        "DLRT SGD tau=0.2",
        "DLRT Adam cosine tau=(0.15, 0.35)",
        "DLRT SGD sequential tau=0.2",
    ):
        assert rows[name][3] < 85002 and rows[name][7] > 0  # params, exported step
    assert len(lora_table.rows) == 3


@pytest.mark.slow  # compiles every GPU-run method at tiny sizes; run with --runslow
def test_gpu_benchmark_runs_at_tiny_sizes(monkeypatch):
    from benchmarks import gpu

    monkeypatch.setenv("GPU_SMALL", "1")
    monkeypatch.setenv("GPU_PARTS", "sqrtm,precision,sinkhorn,pallas,cg")
    tables = gpu.run()
    titles = [t.title for t in tables]
    assert any("sqrtm forward+backward" in t for t in titles)
    assert any("by precision scheme" in t for t in titles)
    assert any(t.startswith("Fused Pallas passes") for t in titles)
    sq = next(t for t in tables if "sqrtm forward+backward" in t.title)
    assert "jaxdecomp mixed (bf16x6)" in {row[1] for row in sq.rows}
    assert any("Entropic OT" in t for t in titles)
    assert any(t.startswith("CG to relative residual") for t in titles)
    cg_rows = next(t for t in tables if t.title.startswith("CG to")).rows
    methods = {row[2] for row in cg_rows}
    assert "solvers.cg + IC(0)" not in methods and "solvers.cg + Jacobi" in methods


def test_ot_scale_worker_measures_a_converged_online_solve():
    from benchmarks import ot_scale

    cfg = {"impl": "ours", "n": 300, "dtype": "float32", "batch_size": 64}
    out = ot_scale.worker({**cfg, "hessian": "sparse", "k": "auto"})
    assert out["error"] <= ot_scale.TOL["float32"], out
    assert out["rss_peak_mb"] >= out["rss_start_mb"] > 0
    assert out["k"] >= 64 and out["k_s"] > 0  # chosen outside the timed solve
    # OTT's decay schedule (0.95 from 0.05) reaches epsilon 1e-3 at iteration 77
    assert 0.05 * 0.95 ** (ot_scale._OTT_DECAY_ITERS - 1) > ot_scale.EPS
    assert 0.05 * 0.95**ot_scale._OTT_DECAY_ITERS <= ot_scale.EPS
    pytest.importorskip("ott")
    ott = ot_scale.worker({**cfg, "impl": "ott", "ott_cap": 20, "decay": True})
    assert ott["capped"] and ott["iterations"] == "20"  # capped: not converged
    assert ott["error"] > ot_scale.TOL["float32"]


@pytest.mark.slow
def test_optim_benchmark_runs():
    tables = optim.run(
        tasks=("digits_mlp",), steps=50, every=25, roots=False, sweep=False
    )
    rows = {row[0]: row for row in tables[0].rows}
    assert set(rows) == {
        "adam",
        "optax.contrib.muon",
        "optim.muon",
        "optim.shampoo",
        "optim.shampoo 4-bit",
        "optim.soap",
    }
    for row in rows.values():
        assert row[2] < 1.0  # every optimizer trains (initial loss is about 2.3)
    (memory,) = tables[1].rows
    assert memory[3] > 1  # 4-bit state is smaller


def test_headline_runner_writes_to_out_not_docs(tmp_path, monkeypatch):
    """`python -m benchmarks` with no names is the headline run: a summary row per
    capability (here two stand-ins and one that fails), the compile table (one
    entry), tables written to --out, and docs/img left alone."""
    from benchmarks import headline

    def fast():
        return [
            headline._row(
                "demo",
                "tiny",
                ("ours", 1.0, 1e-9),
                [("slow anchor", 4.0, 1e-9), ("fast but wrong", 0.5, 1.0)],
                1e-6,
            )
        ]

    def broken():
        raise RuntimeError("boom")

    monkeypatch.setattr(
        headline, "CAPABILITIES", {"demo": (1, fast), "broken": (1, broken)}
    )
    entries = headline._entry_points()
    monkeypatch.setattr(headline, "_entry_points", lambda: entries[2:3])
    monkeypatch.setattr(_harness, "OUTPUT", dict(_harness.OUTPUT))
    docs_img = sorted(p.stat().st_mtime for p in _harness.DOCS_IMG.glob("*.png"))
    assert main(["--out", str(tmp_path), "--no-progress"]) == 0
    report = (tmp_path / "headline.md").read_text()
    # the fast anchor misses the accuracy bar: the best anchor is the slow one
    assert (
        "| demo | tiny | ours | 1 | 1.00e-09 | slow anchor | 4 | 1.00e-09 | 0.25 |"
        in (report)
    )
    assert "FAILED: RuntimeError: boom" in report
    assert "jaxdecomp.polar" in report and "First call" in report
    assert docs_img == sorted(
        p.stat().st_mtime for p in _harness.DOCS_IMG.glob("*.png")
    )
    # the best-anchor rule without any anchor meeting the bar: the most accurate
    assert headline._best([("a", 1.0, 1e-2), ("b", 2.0, 1e-3)], 1e-6)[0] == "b"
    assert headline._best([], 1e-6) is None


def test_precision_benchmark_measures_the_schemes():
    from benchmarks import sqrtm

    gemm, paths = sqrtm.precision_table(sizes=(32,), time=False)
    (row,) = gemm.rows
    errs = dict(zip(gemm.columns[1:], row[1:]))
    # float32-accurate schemes vs what they correct (one TF32 / bfloat16 pass)
    for p in ("highest", "tf32x3", "bf16x6"):
        assert errs[p] < 1e-6, errs
    assert 1e-6 < errs["bf16x3"] < 2e-5
    assert errs["one TF32 pass (H100 default)"] > 1e-4
    assert len(paths.rows) == 5 * 4
    for name, _, scheme, err, *_ in paths.rows:
        assert err < (5e-4 if scheme == "bf16x3" else 5e-5), (name, scheme, err)


def test_fused_benchmark_runs_and_agrees():
    from benchmarks import ot_scale

    table = ot_scale.fused_table(sizes=(300,), batch_size=64, ott=False, repeats=1)
    rows = {row[1]: row for row in table.rows}
    assert len(rows) == 4
    for name, row in rows.items():
        assert row[5] <= 2e-5, (name, row)  # converged to tol 1e-5 (float64 check)
    # the same iterations on both backends (to rounding: within one step)
    for solver in ("sinkhorn_newton", "sinkhorn"):
        xla, fused = rows[f"solvers.{solver}, xla"], rows[f"solvers.{solver}, pallas"]
        assert abs(xla[4] - fused[4]) <= max(1, 0.01 * xla[4])


def test_newton_recycling_benchmark_runs():
    from benchmarks import recycling

    table = recycling.newton_table(
        configs=((200, "float64", None),), recycle=(0, 4), repeats=1
    )
    rows = {(row[1], row[2]): row for row in table.rows}
    assert len(rows) == 4
    for row in rows.values():
        assert row[7] <= 1e-8, row  # converged (tol 1e-9 relative L1, float64)
    assert rows[("dense", 4)][5] < rows[("dense", 0)][5]  # fewer CG iterations


@pytest.mark.slow  # 12 s: compiles three solves (a benchmark, not a library check)
def test_tangent_reuse_benchmark_runs():
    from benchmarks import recycling

    table = recycling.tangent_reuse_table(
        sizes=(24,), ks=(4,), methods=("IC(0)",), repeats=1
    )
    assert [row[4] for row in table.rows] == ["random", "smooth"]
    for n, _, k, fwd, _, plain, deflated, *_ in table.rows:
        assert (n, k) == (24, 4) and fwd > 0
        # the deflated solve converged, in no more steps than the plain one
        assert 0 < deflated <= plain, (plain, deflated)


@pytest.mark.slow  # 10 s: trains a 3-D network (a benchmark, not a library check)
def test_neural_inverse_3d_runs():
    from benchmarks import recycling

    table = recycling.neural_inverse_3d(
        sizes=(8,), train_n=8, count=4, train_steps=2, width=4
    )
    ((n, jac, ic, net, *_),) = table.rows
    assert n == 8 and isinstance(jac, int) and isinstance(ic, int) and ic < jac
    # converged (an int) or a '> N (result code)' cell naming why not
    assert isinstance(net, int) or (net.startswith("> ") and "(" in net)


@pytest.mark.slow  # trains on 64 x 64 (the function's fixed training grid)
def test_neural_inverse_at_size_runs():
    from benchmarks import recycling

    table = recycling.neural_inverse_at_size(sizes=(16,), train_steps=2, max_steps=400)
    ((n, jac, ic, net, *_),) = table.rows
    assert n == 16 and isinstance(jac, int) and isinstance(ic, int)
    # converged (an int) or a '> N (result code)' cell naming why not
    assert isinstance(net, int) or (net.startswith("> ") and "(" in net)


def test_recycling_sequence_benchmark_runs():
    from benchmarks import recycling

    (table,) = recycling.run(
        n=16,
        steps=3,
        systems=3,
        recycle=(4,),
        methods=("Jacobi",),
        neural_inverse=False,
        newton=False,
        repeats=1,
        host_anchors=False,
    )
    strategies = [(row[0], row[2]) for row in table.rows]
    assert strategies == [
        ("heat", "warm-started PCG"),
        ("heat", "recycle k=4"),
        ("fields", "warm-started PCG"),
        ("fields", "recycle k=4"),
        ("fields", "greedy order, warm PCG"),
        ("fields", "greedy order + recycle k=4"),
    ]
    for row in table.rows:
        assert row[3] > 0 and row[5] < 1e-7, row  # converged, true residual small
