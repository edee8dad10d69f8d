"""Timing, memory and table helpers shared by every benchmark.

Every timing is the median of `repeats` runs after `warmup` calls (which also compile),
with `jax.block_until_ready` on the outputs. Anchors are timed in the same process, so
ratios compare like with like.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import pathlib
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax


def time_fn(
    fn: Callable, *args, repeats: int = 5, warmup: int = 1, long_s: float | None = None
) -> float:
    """Median wall-clock seconds of `fn(*args)` (outputs blocked on) after warm-up.
    With `long_s`, a first timed run longer than `long_s` seconds is returned alone
    (long runs vary little; repeating them costs minutes); a jitted `fn` is then
    compiled ahead of time, and its first run counts as the warm-up when it is
    short, so a long run is not done twice."""
    if long_s is not None and hasattr(fn, "lower"):
        fn = fn.lower(*args).compile()
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        first = time.perf_counter() - t0
        if first > long_s:
            return first
        warmup = 0
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
        if long_s is not None and times[0] > long_s:
            break
    return statistics.median(times)


def compiled_temp_bytes(jitted: Callable, *args) -> int | None:
    """XLA's temporary-buffer size for `jitted(*args)` (peak scratch memory), or None
    where the backend does not report it."""
    try:
        stats = jitted.lower(*args).compile().memory_analysis()
    except Exception:  # noqa: BLE001 - reporting only
        return None
    if stats is None:
        return None
    return int(stats.temp_size_in_bytes)


def optional_import(name: str, extra: str = "bench"):
    """Import an anchor library, or print a one-line skip message and return None."""
    try:
        return importlib.import_module(name)
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        print(
            f"  (skipping {name}: not available [{type(e).__name__}]; "
            f"pip install -e '.[{extra}]')"
        )
        return None


def machine() -> str:
    dev = jax.devices()[0]
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (
        f"{dev.platform}:{getattr(dev, 'device_kind', '')} | {cpu} "
        f"({os.cpu_count()} cores) | jax {jax.__version__}"
    )


def fmt(x: Any) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        if x == 0:
            return "0"
        if abs(x) >= 1e4 or abs(x) < 1e-2:
            return f"{x:.2e}"
        return f"{x:.3g}"
    return str(x)


@dataclasses.dataclass
class Table:
    """One result table: a title, column names, rows and free-form notes."""

    title: str
    columns: list[str]
    rows: list[list[Any]] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    def add(self, *row):
        if len(row) != len(self.columns):
            raise ValueError(f"row {row} does not match columns {self.columns}")
        self.rows.append(list(row))

    def markdown(self) -> str:
        out = [f"### {self.title}", ""]
        out.append("| " + " | ".join(self.columns) + " |")
        out.append("|" + "|".join("---" for _ in self.columns) + "|")
        for row in self.rows:
            out.append("| " + " | ".join(fmt(x) for x in row) + " |")
        out.extend(["", *[f"- {n}" for n in self.notes]])
        return "\n".join(out)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS_IMG = ROOT / "docs" / "img"
# Where plots go: `--out` (default benchmarks/out/, git-ignored); the tracked docs
# images are rewritten only with `--update-docs`.
OUTPUT = {"dir": ROOT / "benchmarks" / "out", "update_docs": False}


def save_figure(name: str, draw: Callable[[Any], None]) -> None:
    """Call `draw(ax)` on a fresh log-log figure and save it as `name` in the output
    folder (and in docs/img with `--update-docs`); prints a one-line skip message
    without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("  (skipping the plot: matplotlib is not installed)")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.set_xscale("log")
    ax.set_yscale("log")
    draw(ax)
    ax.legend(fontsize=7)
    fig.tight_layout()
    dirs = [pathlib.Path(OUTPUT["dir"])] + ([DOCS_IMG] if OUTPUT["update_docs"] else [])
    for folder in dirs:
        folder.mkdir(parents=True, exist_ok=True)
        fig.savefig(folder / name, dpi=110)
        print(f"  (plot written to {folder / name})")
    plt.close(fig)
