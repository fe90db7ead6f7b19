"""Where the time of one ``linear_cross_entropy`` configuration goes: CUDA kernels by total time (torch.profiler).

A diagnostic for tuning, not a claim: it prints the kernels of a few forward+backward steps of the benchmark
shapes (benchmarks/bench_linear_ce.py's CASES, bf16, logits ~ N(0, 1)), grouped by kernel name, with their share
of the step, and writes the table as JSON + Markdown (``--out``).

Usage (GPU)::

    PYTHONPATH=src python3 benchmarks/profile_linear_ce.py --case 2 --options workspace=outputs
    PYTHONPATH=src python3 benchmarks/profile_linear_ce.py --case 1 --options kernel=fused,filter_eps=0.000244140625

``--options``: ``key=value`` pairs of :class:`cggr.functional.LinearCrossEntropyOptions` (numbers parsed).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from benchmarks.bench_linear_ce import CASES

from cggr.functional import LinearCrossEntropyOptions, linear_cross_entropy


def _parse_options(text: str) -> LinearCrossEntropyOptions:
    kw = {}
    for pair in filter(None, (p.strip() for p in text.split(","))):
        if "=" not in pair:
            raise ValueError(f"--options expects key=value pairs, got {pair!r}")
        key, value = pair.split("=", 1)
        try:
            kw[key] = int(value)
        except ValueError:
            try:
                kw[key] = float(value)
            except ValueError:
                kw[key] = None if value == "None" else value
    return LinearCrossEntropyOptions(**kw)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", type=int, default=2, choices=range(len(CASES)))
    ap.add_argument("--ratio", type=float, default=1.0)
    ap.add_argument("--options", default="", help="LinearCrossEntropyOptions as key=value,key=value")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--timeline", action="store_true",
                    help="also print every kernel of the last step in launch order (name, ms)")
    ap.add_argument("--name", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_linear_ce.py needs a CUDA GPU")
    opts = _parse_options(args.options)
    n, h, v = CASES[args.case]
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(args.case)
    hidden = torch.randn(n, h, device=dev, generator=gen).to(torch.bfloat16).requires_grad_()
    weight = (torch.randn(v, h, device=dev, generator=gen) / h**0.5).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, v, (n,), device=dev, generator=gen)

    def step():
        hidden.grad = weight.grad = None
        linear_cross_entropy(hidden, weight, targets, ratio=args.ratio, impl="triton", options=opts).backward()

    for _ in range(3):  # compile + warm-up
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    totals: dict[str, list[float]] = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            t = totals.setdefault(ev.name, [0.0, 0])
            t[0] += ev.device_time / 1000.0  # us -> ms
            t[1] += 1
    step_ms = sum(t[0] for t in totals.values()) / args.steps
    if args.timeline:
        kernels = [ev for ev in prof.events() if ev.device_type == torch.autograd.DeviceType.CUDA]
        kernels.sort(key=lambda ev: ev.time_range.start)
        per_step = len(kernels) // args.steps
        print(f"timeline of the last step ({per_step} kernels): start_ms duration_ms name")
        last = kernels[-per_step:]
        t0 = last[0].time_range.start
        for ev in last:
            print(f"  {(ev.time_range.start - t0) / 1000:9.3f} {ev.device_time / 1000:8.3f}  {ev.name[:70]}")
    rows = [
        {"kernel": name[:90], "ms_per_step": round(ms / args.steps, 3), "calls_per_step": calls // args.steps,
         "share": round(ms / args.steps / step_ms, 3)}
        for name, (ms, calls) in sorted(totals.items(), key=lambda kv: -kv[1][0])[: args.top]
    ]
    print(f"case {args.case} (N, H, V) = {(n, h, v)}, ratio {args.ratio}, options {opts}")
    print(f"GPU kernel time per step: {step_ms:.2f} ms (sum of kernels; gaps not included)")
    for r in rows:
        print(f"  {r['ms_per_step']:8.3f} ms  {r['share']:6.1%}  x{r['calls_per_step']:<4d} {r['kernel']}")
    if args.out:
        from benchmarks._timing import write_results

        name = args.name or f"profile_linear_ce_case{args.case}"
        write_results(name, rows, title=f"linear_cross_entropy kernels, case {args.case} {(n, h, v)}",
                      notes=f"ratio {args.ratio}, options {opts}; kernel time per step {step_ms:.2f} ms "
                            "(sum of CUDA kernels, no gaps), torch.profiler, bf16.", out_dir=args.out)


if __name__ == "__main__":
    main()
