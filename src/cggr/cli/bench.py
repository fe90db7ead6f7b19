"""``cggr bench``: training-step throughput of every arm side by side, same model, same batch.

Shape legend: B sequences per step, T tokens per sequence.

For each (B, T) and each arm (``standard``, ``cggr``, ``cggr-loss``, ``random``; see :mod:`cggr.cli.race`)
one full optimizer step (forward, backward, AdamW) is timed with :func:`cggr.cli.timing.time_fn` — the
harness the scripts in ``benchmarks/`` use: warm-up calls, then the median of CUDA-event timings on GPU
(``perf_counter`` on CPU) and the peak allocated memory. Every arm gets the same B sequences (random token
ids); the selecting arms train on the ``ratio`` share of them, so this measures the cost of one step at equal
scan. samples/s = B / median step time; *speed-up* = standard's median / the arm's median (same process).
"""

from __future__ import annotations

import copy
import gc
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cggr.cli.presets import CLIError, build_model, resolve_model
from cggr.cli.race import ARM_SPECS, Arm, RaceConfig, check_arms, resolve_device


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """``"4x512,16x512"`` → [(4, 512), (16, 512)]; raises :class:`CLIError` on anything else."""
    shapes = []
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", part)
        if match is None or int(match.group(1)) < 1 or int(match.group(2)) < 2:
            raise CLIError(f"--shapes: expected BxT pairs like 4x512,16x512 (B >= 1, T >= 2), got {part.strip()!r}")
        shapes.append((int(match.group(1)), int(match.group(2))))
    return shapes


@dataclass
class BenchConfig:
    model: str = "tiny"
    shapes: str = "8x128"
    arms: tuple[str, ...] = tuple(n for n, a in ARM_SPECS.items() if not a.data_seed_offset)  # no A/A arm
    ratio: float = 0.25
    router_layers: int | None = None
    device: str = "auto"
    dtype: str = "auto"
    warmup: int = 3
    iters: int = 10
    seed: int = 0
    out: str = "cggr-bench"
    name: str = "bench"


def run_bench(cfg: BenchConfig, *, log=print) -> dict[str, Any]:
    """Time every arm at every shape; print the table and write ``<out>/<name>.json|.md``."""
    from cggr.cli.timing import environment, write_results

    if not (math.isfinite(cfg.ratio) and 0.0 < cfg.ratio <= 1.0):
        raise CLIError(f"--ratio must be in (0, 1], got {cfg.ratio}")
    if cfg.warmup < 0 or cfg.iters < 1:
        raise CLIError(f"--warmup must be >= 0 and --iters >= 1, got {cfg.warmup} and {cfg.iters}")
    check_arms(cfg.arms)
    shapes = parse_shapes(cfg.shapes)
    device = resolve_device(cfg.device)
    spec = resolve_model(cfg.model)
    router_layers = cfg.router_layers or spec.preset.router_layers
    if spec.num_layers and router_layers >= spec.num_layers:
        raise CLIError(f"--router-layers must be < the model's {spec.num_layers} layers, got {router_layers}")
    base = build_model(spec, None, seed=cfg.seed)
    vocab = int(base.config.vocab_size)
    race_cfg = RaceConfig(ratio=cfg.ratio, seed=cfg.seed, dtype=cfg.dtype)
    from cggr.cli.timing import time_fn

    rows: list[dict[str, Any]] = []
    for batch, seq_len in shapes:
        if round(cfg.ratio * batch) < 1 and any(a != "standard" for a in cfg.arms):
            log(f"note: ratio {cfg.ratio} of B={batch} rounds to 0; the selecting arms keep 1 sequence")
        gen = torch.Generator().manual_seed(cfg.seed)
        ids = torch.randint(0, vocab, (batch, seq_len), generator=gen).to(device)  # (B, T)
        mask = torch.ones_like(ids, dtype=torch.bool)
        standard_ms = None
        for arm in cfg.arms:
            model = copy.deepcopy(base).to(device)
            model.train()
            # the reducible arms look reference losses up by row: synthetic ones here (this times the step only)
            reference = torch.rand(batch, generator=gen).to(device) * 5
            block_rows = torch.arange(batch, device=device)
            runner = Arm(arm, model, race_cfg, router_layers, 1e-5, device, reference=reference)
            row: dict[str, Any] = {"B": batch, "T": seq_len, "arm": arm}
            try:
                timing = time_fn(lambda r=runner, x=ids, m=mask, i=block_rows: r.step(x, m, 1e-5, count=False, rows=i),
                                 warmup=cfg.warmup, iters=cfg.iters, device=device)
            except torch.cuda.OutOfMemoryError:
                row.update({"step ms": None, "samples/s": None, "speed-up": None, "peak mem GiB": None,
                            "status": "out of memory"})
            else:
                if arm == "standard":
                    standard_ms = timing.median_ms
                row.update({
                    "step ms": round(timing.median_ms, 3),
                    # 4 significant digits: a slow arm's rate (2 samples/s) and speed-up (0.03x) keep their
                    # precision, which a fixed number of decimals would not
                    "samples/s": float(f"{batch / (timing.median_ms / 1e3):.4g}"),
                    "speed-up": float(f"{standard_ms / timing.median_ms:.4g}") if standard_ms else None,
                    "peak mem GiB": round(timing.peak_mem_gib, 3) if device.type == "cuda" else None,
                    "min ms": round(timing.min_ms, 3),
                    "status": "ok",
                })
            rows.append(row)
            del runner, model
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            log(f"  B={batch} T={seq_len} {arm:>9}: {row['step ms']} ms/step")
    env = environment(device, command=_command())
    meta = {"model": spec.name, "parameters": sum(p.numel() for p in base.parameters()), "ratio": cfg.ratio,
            "router_layers": router_layers, "warmup": cfg.warmup, "iters": cfg.iters, "dtype": cfg.dtype,
            "equal_scan": True}
    columns = ["B", "T", "arm", "step ms", "samples/s", "speed-up", "peak mem GiB"]
    notes = (f"{spec.name} ({meta['parameters'] / 1e6:.1f}M parameters), ratio {cfg.ratio}, router "
             f"{router_layers} layers, median of {cfg.iters} steps after {cfg.warmup} warm-up steps "
             f"({'CUDA events' if device.type == 'cuda' else 'perf_counter'}). Every arm gets the same B "
             "sequences; speed-up = standard's step time / the arm's.")
    json_path, md_path = write_results(cfg.name, rows, title=f"cggr bench: {spec.name}", notes=notes,
                                       columns=columns, out_dir=Path(cfg.out), extra=meta, env=env)
    from cggr.cli.tables import text_table

    print(text_table([{c: r.get(c) for c in columns} for r in rows]))
    print(f"wrote {json_path}, {md_path}")
    return {"rows": rows, "meta": meta, "environment": env, "paths": [str(json_path), str(md_path)]}


def _command() -> str:
    from cggr.cli.race import command_line

    return command_line()


__all__ = ["BenchConfig", "parse_shapes", "run_bench"]
