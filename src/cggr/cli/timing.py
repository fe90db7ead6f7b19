"""Timing harness shared by ``cggr bench`` and the scripts under ``benchmarks/`` (``benchmarks/_timing.py``
re-exports it, so both measure the same way).

The API is deliberately small:

* :func:`time_fn` — warm up a callable, then time it repeatedly and report the median (CUDA events on
  CUDA, ``time.perf_counter`` on CPU) together with the peak device memory seen during the timed calls.
* :func:`environment` — device name, torch/triton/transformers versions and the command line, for the
  record that every published figure must carry.
* :func:`device_tag` — short folder name for ``benchmarks/results/<device>/`` (``h200``, ``h100``, ``cpu``...).
* :func:`markdown_table` — render a list of row dicts as a Markdown table.
* :func:`write_results` — write ``<name>.json`` and ``<name>.md`` (rows + environment) under
  ``benchmarks/results/<device>/`` (or a folder you pass).

Example::

    from cggr.cli.timing import time_fn, write_results

    t = time_fn(lambda: train_step(batch), warmup=3, iters=10)
    rows = [{"arm": "standard", "step_ms": t.median_ms, "peak_mem_gib": t.peak_mem_gib}]
    write_results("my_bench", rows, title="My benchmark", out_dir="benchmarks/results/h200")

Figures are only meaningful beside a baseline timed in the same process; report ratios to it.
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["Timing", "device_tag", "environment", "markdown_table", "package_version", "synchronize", "time_fn",
           "write_results"]

@dataclass
class Timing:
    """Result of :func:`time_fn`.

    Attributes:
        median_ms: median wall time of one call in milliseconds.
        times_ms: every timed call, in order.
        peak_mem_bytes: peak allocated device memory during the timed calls (0 on CPU).
        warmup: number of untimed warm-up calls.
    """

    median_ms: float
    times_ms: list[float] = field(default_factory=list)
    peak_mem_bytes: int = 0
    warmup: int = 0

    @property
    def min_ms(self) -> float:
        return min(self.times_ms) if self.times_ms else float("nan")

    @property
    def peak_mem_gib(self) -> float:
        return self.peak_mem_bytes / 2**30

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["min_ms"] = self.min_ms
        d["peak_mem_gib"] = self.peak_mem_gib
        return d


def synchronize(device: torch.device | str) -> None:
    """Wait for every queued kernel on ``device`` (no-op on CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(
    fn: Callable[[], Any],
    *,
    warmup: int = 3,
    iters: int = 10,
    device: torch.device | str | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> Timing:
    """Time ``fn()``: ``warmup`` untimed calls, then ``iters`` timed calls, each timed on its own; the median is
    reported.

    On CUDA each call is bracketed by CUDA events (no host sync inside the timed region besides the
    event synchronisation after each call) and the peak allocated memory is reset after warm-up.
    On CPU ``clock`` (``time.perf_counter``) is read before and after each call.

    Why not :class:`torch.utils.benchmark.Timer`: it measures what a stateless statement costs, and it does that
    well, but ``cggr bench`` and the benchmark scripts time *one training step per call* (weights and optimizer
    state change with every call) together with the memory it needs, which Timer cannot: ``Timer.timeit(n)`` runs
    ``max(n // 100, 2)`` extra warm-up calls inside every measurement and returns one mean over ``n`` calls,
    ``blocked_autorange`` chooses the number of calls itself, neither reads the peak device memory, and on CPU it
    times with ``num_threads=1`` unless told otherwise (a step here runs with the process's threads). So this
    function keeps exactly ``warmup + iters`` calls, one sample per call (median and min of a distribution that
    contention widens), the device time of each call from CUDA events (without the host's synchronisation
    latency that Timer's ``synchronize`` + ``perf_counter`` timer adds) and the peak allocated memory.

    Args:
        fn: zero-argument callable (e.g. one full training step).
        warmup: untimed calls first (compilation, autotuning, allocator warm-up), >= 0.
        iters: timed calls, >= 1.
        device: device whose events/memory to use; defaults to the current CUDA device when CUDA is
            available, else CPU.
        clock: the CPU path's clock in seconds (injectable: tests pass a fake one).

    Returns:
        A :class:`Timing`.
    """
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    if not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be an int >= 1, got {iters!r}")
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    times: list[float] = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(iters):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        peak = torch.cuda.max_memory_allocated(device)
    else:
        for _ in range(iters):
            t0 = clock()
            fn()
            times.append((clock() - t0) * 1e3)
        peak = 0
    return Timing(median_ms=statistics.median(times), times_ms=times, peak_mem_bytes=int(peak), warmup=warmup)


def _cpu_name() -> str:
    name = platform.processor() or platform.machine() or "cpu"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def package_version(name: str) -> str | None:
    """The installed version of the distribution ``name`` (:func:`importlib.metadata.version`), ``None`` when it is
    not installed. For ``cggr`` itself: ``cggr.__version__``, the version of the code that runs (the distribution's
    version is read from it, so the two agree for an installed copy; a source checkout on ``PYTHONPATH`` may
    shadow an installed copy of another version)."""
    if name == "cggr":
        import cggr

        return cggr.__version__
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: torch.device | str | None = None, command: str | None = None) -> dict[str, Any]:
    """Device name, library versions, platform and the command line of this process (or ``command``)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        cuda = torch.version.cuda
    else:
        name = _cpu_name()
        cuda = None
    return {
        "device": name,
        "device_type": device.type,
        "cuda": cuda,
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "transformers": package_version("transformers"),
        "cggr": package_version("cggr"),
        "python": platform.python_version(),
        "command": command if command is not None else " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def device_tag(device: torch.device | str | None = None) -> str:
    """Short lower-case folder name for a device: ``h200``, ``h100``, ``a100``..., or ``cpu``."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    m = re.search(r"\b([a-z]{1,2}\d{2,4}[a-z]?)\b", name)
    return m.group(1) if m else re.sub(r"[^a-z0-9]+", "_", name).strip("_")


def _fmt(v: Any) -> str:
    """A benchmark table's cell: 3 significant digits under 10 (timings, ratios), one decimal from 10 on."""
    if v is None:
        return "–"
    if isinstance(v, float):
        if v != v:  # NaN
            return "n/a"
        return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Render rows (dicts) as a Markdown table (:func:`cggr.cli.tables.markdown_table`, cells by ``_fmt``);
    ``columns`` defaults to the first row's keys."""
    from cggr.cli.tables import markdown_table as table

    return table(rows, list(columns) if columns is not None else list(rows[0]) if rows else [], _fmt)


def write_results(
    name: str,
    rows: Sequence[dict[str, Any]],
    *,
    title: str | None = None,
    notes: str = "",
    columns: Sequence[str] | None = None,
    out_dir: str | Path,
    extra: dict[str, Any] | None = None,
    env: dict[str, Any] | None = None,
) -> tuple[Path, Path]:
    """Write ``<name>.json`` and ``<name>.md`` with the rows and :func:`environment`.

    Args:
        name: file stem, e.g. ``"cggr_model"``.
        rows: list of flat dicts (one per measured configuration/arm).
        title: Markdown heading (defaults to ``name``).
        notes: free text placed under the heading (protocol, what the ratios mean).
        columns: columns of the Markdown table (defaults to the first row's keys).
        out_dir: folder to write into (``benchmarks/_timing.py`` defaults it to
            ``benchmarks/results/<device_tag()>/``).
        extra: additional JSON-serialisable metadata stored under ``"meta"``.
        env: the environment record (defaults to :func:`environment` of the default device).

    Returns:
        ``(json_path, md_path)``.
    """
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"name must be a plain file stem, got {name!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    env = environment() if env is None else env
    payload = {"name": name, "environment": env, "meta": extra or {}, "rows": list(rows)}
    json_path = out / f"{name}.json"
    json_path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    md = [f"# {title or name}", ""]
    if notes:
        md += [notes.strip(), ""]
    md += [markdown_table(rows, columns), ""]
    md += ["Environment:", ""]
    md += [f"- {k}: `{v}`" for k, v in env.items()]
    md_path = out / f"{name}.md"
    md_path.write_text("\n".join(md) + "\n")
    return json_path, md_path
