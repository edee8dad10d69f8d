"""The GPU measurements the open issues ask for, in one prepared run.

`python -m benchmarks gpu` on the lent GPU machine (device time is short: one run of
this module should take about 6-8 minutes on an H100/H200, most of it compilation):

- sqrtm: forward+backward, float32, kappa 1e3, batch 256 x n for n = 128, 256 and
  64 x 512: `eigh`, `newton_schulz`, `mixed` (also with the tensor-core schemes
  `precision="tf32x3"` / `"bf16x6"`) against JAX eigh + autodiff (default and
  HIGHEST precision) and OTT-JAX; Song et al. if `SONG_MATSQRT_DIR` is set; and at
  kappa 1e5 (256 x 256), where float32 `eigh` adds its Rayleigh-Ritz correction;
- precision (only if named in `GPU_PARTS`): every Newton-Schulz path with every
  `precision=` scheme at n = 256 and 512, batch 2 (time per scheme);
- sinkhorn: n = 10000, epsilon = 1e-3, float32 (tolerance 1e-6), every method of the
  `sinkhorn` benchmark with OTT-JAX's variants;
- pallas: `PointCloud(..., backend="pallas")` (fused Pallas c-transforms and plan
  products) against the XLA online passes and OTT-JAX online, n = 10^4, float32,
  epsilon 1e-3, batch 1024;
- cg: float32, relative residual 1e-6, 2-D 1024^2 and 2048^2 and 3-D 64^3 and 128^3,
  matvec-only preconditioners (IC-type triangular solves are 80-120x slower than
  Jacobi-PCG on a GPU) against jax.scipy's and lineax's CG (with the true-residual
  check, float32 rows that cannot reach 1e-6 report `inaccurate`); float32's
  attainable accuracy at 256^2 and 1024^2 (`cg.true_residual_table`) and the
  check's cost at 1024^2 in float64 (`cg.check_cost_table`).

`GPU_PARTS=sqrtm,cg` (any of sqrtm, precision, sinkhorn, pallas, cg) runs a subset;
`GPU_SMALL=1` runs tiny sizes (a smoke test for any machine).
"""

from __future__ import annotations

import os

from . import cg, ot_scale, sinkhorn, sqrtm
from ._harness import optional_import

CG_METHODS = (
    "none",
    "Jacobi",
    "Chebyshev (degree 4)",
    "Multigrid V(1,1)",
    "NeuralFSAI (trained 64x64)",
)
SQRTM_METHODS = (
    "jaxdecomp eigh",
    "jaxdecomp newton_schulz",
    "jaxdecomp mixed",
    "JAX eigh + autodiff (default precision)",
    "JAX eigh + autodiff (HIGHEST)",
    "OTT-JAX sqrtm_only",
)


def run(full: bool = False):
    del full  # the sizes are the issues' GPU sizes
    small = os.environ.get("GPU_SMALL") == "1"
    parts = os.environ.get("GPU_PARTS", "sqrtm,sinkhorn,pallas,cg").split(",")
    tables = []
    if "sqrtm" in parts:
        cands = sqrtm._candidates(optional_import("ott"))
        cands = {k: v for k, v in cands.items() if k in SQRTM_METHODS}
        cands.update(sqrtm.scheme_candidates())  # tensor cores, float32 accuracy
        configs = [(2, 16)] if small else [(256, 128), (256, 256), (64, 512)]
        tables.append(sqrtm.timing_table(True, cands, configs=configs, plot=False))
        # kappa 1e5: float32 eigh with its Rayleigh-Ritz correction (not taken at
        # kappa 1e3), against the anchors at the same accuracy target
        ill = {
            k: v
            for k, v in cands.items()
            if not k.startswith("OTT") and "x3)" not in k and "x6)" not in k
        }
        tables.append(
            sqrtm.timing_table(
                True,
                ill,
                configs=configs[:1] if small else [(256, 256)],
                plot=False,
                kappa=1e5,
            )
        )
    if "precision" in parts:  # the schemes' times on the device (errors as on CPU)
        tables += sqrtm.precision_table(sizes=(16,) if small else (256, 512))
    if "sinkhorn" in parts:
        tables += sinkhorn.run(
            sizes=(100,) if small else (10_000,),
            dtypes=("float32",),
            epsilons=(1e-3,),
            curves=False,
        )
    if "pallas" in parts:  # fused online passes vs XLA online and OTT-JAX online
        tables.append(
            ot_scale.fused_table(
                sizes=(500,) if small else (10_000,),
                batch_size=128 if small else 1024,
                ott=not small,
            )
        )
    if "cg" in parts:
        tables += cg.run(
            sizes=(16,) if small else (1024, 2048),
            sizes_3d=(8,) if small else (64, 128),
            variances=(cg.VARIANCE,),
            plots=False,
            methods=CG_METHODS,
            host_anchors=False,
            train_steps=3 if small else 300,
            train_n=8 if small else 64,
            # float32's attainable accuracy at size, and what the true-residual
            # check costs on the device (float64)
            true_residual_sizes=(16,) if small else (256, 1024),
            check_cost_sizes=(16,) if small else (1024,),
        )
    return tables
