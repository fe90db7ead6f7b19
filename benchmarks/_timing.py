"""The benchmark scripts' timing harness: the one ``cggr bench`` uses (:mod:`cggr.cli.timing`), re-exported.

Only the default output folder differs: ``benchmarks/results/<device_tag()>/``. Usage::

    from benchmarks._timing import time_fn, write_results

    t = time_fn(lambda: model(x).sum().backward(), warmup=5, iters=20)   # median of CUDA-event timings
    write_results("my_bench", rows, title="My benchmark")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cggr.cli.timing import Timing, device_tag, environment, markdown_table, synchronize, time_fn
from cggr.cli.timing import write_results as _write_results

__all__ = ["Timing", "device_tag", "environment", "markdown_table", "synchronize", "time_fn", "write_results"]

RESULTS_ROOT = Path(__file__).resolve().parent / "results"


def write_results(name: str, rows, *, out_dir: str | Path | None = None, **kwargs: Any):
    """:func:`cggr.cli.timing.write_results` with ``out_dir`` defaulting to ``benchmarks/results/<device>/``."""
    return _write_results(name, rows, out_dir=out_dir if out_dir is not None else RESULTS_ROOT / device_tag(), **kwargs)
