"""Run benchmarks: `python -m benchmarks [name ...] [--full] [--json PATH]`.

Without names, every benchmark runs. Default sizes are small (minutes on a laptop
CPU); `--full` uses the sizes the issues specify. Anchors that are not installed are
skipped with a one-line message.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import sys

import jax

jax.config.update("jax_enable_x64", True)  # benchmarks pick dtypes explicitly

from ._harness import machine  # noqa: E402

BENCHMARKS = {
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
    parser.add_argument("names", nargs="*", help=f"any of {sorted(BENCHMARKS)}")
    parser.add_argument("--full", action="store_true", help="the issues' full sizes")
    parser.add_argument("--json", metavar="PATH", help="also write results as JSON")
    args = parser.parse_args(argv)
    names = args.names or [n for n in BENCHMARKS if n != "gpu"]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(
            f"unknown benchmark(s) {unknown}; choose from {sorted(BENCHMARKS)}"
        )

    header = {
        "command": "python -m benchmarks " + " ".join(argv or sys.argv[1:]),
        "machine": machine(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }
    print(f"# {header['command']}\n# {header['machine']}\n# {header['date']}\n")
    results = []
    for name in names:
        module = importlib.import_module(BENCHMARKS[name])
        print(f"## {name}\n", flush=True)
        for table in module.run(full=args.full):
            print(table.markdown(), "\n", flush=True)
            results.append({"benchmark": name, **table.to_json()})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**header, "tables": results}, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
