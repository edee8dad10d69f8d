"""Run benchmarks: `python -m benchmarks [name ...] [--full] [--out DIR]
[--update-docs] [--json PATH]`.

Without names: the headline run (`benchmarks/headline.py`): one summary row per
capability against its best installed anchor, and a first-call (compile) table; about
4 minutes on a 2-core CPU, with a progress bar. `all`: every benchmark at its default
size (tens of minutes). `--full`: the sizes the issues specify (every benchmark when
no names are given; hours on a CPU). Anchors that are not installed are skipped with a
one-line message. Plots and a copy of the tables go to `--out` (default
`benchmarks/out/`, git-ignored); the tracked images in `docs/img/` are rewritten only
with `--update-docs`.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import pathlib
import sys

import jax

jax.config.update("jax_enable_x64", True)  # benchmarks pick dtypes explicitly

from . import _harness  # noqa: E402
from ._harness import machine  # noqa: E402

BENCHMARKS = {
    "headline": "benchmarks.headline",
    "implicit": "benchmarks.implicit",
    "sqrtm": "benchmarks.sqrtm",
    "lowrank": "benchmarks.lowrank",
    "sinkhorn": "benchmarks.sinkhorn",
    "ot_scale": "benchmarks.ot_scale",
    "cg": "benchmarks.cg",
    "recycling": "benchmarks.recycling",
    "optim": "benchmarks.optim",
    "gpu": "benchmarks.gpu",  # the GPU-only measurements, one prepared run
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument(
        "names", nargs="*", help=f"any of {sorted(BENCHMARKS)}, or 'all'"
    )
    parser.add_argument("--full", action="store_true", help="the issues' full sizes")
    parser.add_argument("--json", metavar="PATH", help="also write results as JSON")
    parser.add_argument(
        "--out",
        metavar="DIR",
        default=str(_harness.OUTPUT["dir"]),
        help="folder for plots and tables (default: benchmarks/out/)",
    )
    parser.add_argument(
        "--update-docs",
        action="store_true",
        help="also rewrite the tracked plots in docs/img/",
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bar (e.g. in logs)"
    )
    args = parser.parse_args(argv)
    everything = [n for n in BENCHMARKS if n not in ("gpu", "headline")]
    if not args.names:
        names = everything if args.full else ["headline"]
    elif args.names == ["all"]:
        names = everything
    else:
        names = args.names
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(
            f"unknown benchmark(s) {unknown}; choose from {sorted(BENCHMARKS)} or 'all'"
        )
    out_dir = pathlib.Path(args.out)
    _harness.OUTPUT.update(dir=out_dir, update_docs=args.update_docs)

    header = {
        "command": "python -m benchmarks " + " ".join(argv or sys.argv[1:]),
        "machine": machine(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }
    lines = [f"# {header['command']}\n# {header['machine']}\n# {header['date']}\n"]
    print(lines[0], flush=True)
    if names == ["headline"]:
        print(
            "Headline run: one row per capability against its best installed anchor,"
            " then first-call latencies; about 4 minutes on a 2-core CPU. Full "
            "tables: `python -m benchmarks all` or `--full`.\n",
            flush=True,
        )
    results = []
    for name in names:
        module = importlib.import_module(BENCHMARKS[name])
        print(f"## {name}\n", flush=True)
        lines.append(f"## {name}\n")
        kwargs = {"progress": not args.no_progress} if name == "headline" else {}
        for table in module.run(full=args.full, **kwargs):
            print(table.markdown(), "\n", flush=True)
            lines.append(table.markdown() + "\n")
            results.append({"benchmark": name, **table.to_json()})
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "_".join(names) if len(names) <= 3 else "all"
    report = out_dir / f"{stem}{'_full' if args.full else ''}.md"
    report.write_text("\n".join(lines))
    print(f"(tables written to {report})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**header, "tables": results}, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
