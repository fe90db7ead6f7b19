"""Effective bandwidth of token scoring: the one-pass Triton kernel vs the PyTorch path (issue 5).

Effective bandwidth = logit bytes (N · V · element size) / median time. The copy ceiling is measured in the
same process as a device-to-device copy (bytes read + bytes written). bf16 logits ~ N(0, 2²), targets uniform,
every 8th ignored.

    python benchmarks/bench_scoring.py                 # the three shapes of issue 5, default kernel config
    python benchmarks/bench_scoring.py --sweep         # also time (num_warps, lanes per thread) variants
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from benchmarks._timing import markdown_table, time_fn, write_results

from cggr.kernels.scoring import default_num_warps, token_scores_triton
from cggr.scoring import token_scores_torch as torch_token_scores

SHAPES = [(8192, 49152), (4096, 128256), (2048, 256000)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", action="store_true", help="time kernel config variants too")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results/<device>)")
    args = ap.parse_args()
    rows = []
    for n, v in SHAPES:
        rows += _bench_shape(n, v, args)
        torch.cuda.empty_cache()
    _finish(rows, args)


def _bench_shape(n: int, v: int, args) -> list[dict]:
    dev = torch.device("cuda")
    rows: list[dict] = []
    gen = torch.Generator(device=dev).manual_seed(0)
    logits = (torch.randn(n, v, device=dev, generator=gen) * 2.0).to(torch.bfloat16)
    targets = torch.randint(0, v, (n,), device=dev, generator=gen)
    targets[::8] = -100
    nbytes = logits.numel() * logits.element_size()
    dst = torch.empty_like(logits)
    copy = time_fn(lambda: dst.copy_(logits), warmup=5, iters=args.iters)
    ref = torch_token_scores(logits, targets)
    out = token_scores_triton(logits, targets, -100)
    err = max(
        float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))
        for a, b in zip(out, (ref.entropy, ref.confidence, ref.margin, ref.nll))
    )
    tt = time_fn(lambda: token_scores_triton(logits, targets, -100), warmup=5, iters=args.iters)
    tr = time_fn(lambda: torch_token_scores(logits, targets), warmup=2, iters=max(3, args.iters // 4))
    base = {"N": n, "V": v, "GB": round(nbytes / 1e9, 3), "copy_TBps": 2 * nbytes / copy.median_ms / 1e9}
    nw = default_num_warps(v, 2)
    rows.append({**base, "impl": f"triton (default, {nw} warps)", "ms": tt.median_ms,
                 "TBps": nbytes / tt.median_ms / 1e9, "speedup_vs_torch": tr.median_ms / tt.median_ms,
                 "max_rel_err": err})
    rows.append({**base, "impl": "torch path (cggr.scoring)", "ms": tr.median_ms,
                 "TBps": nbytes / tr.median_ms / 1e9, "speedup_vs_torch": 1.0, "max_rel_err": 0.0})
    if args.sweep:
        for nw in (2, 4, 8):
            for per_thread in (2, 4, 8):
                blk = per_thread * 32 * nw
                t = time_fn(lambda nw=nw, blk=blk: token_scores_triton(
                    logits, targets, -100, num_warps=nw, block=blk), warmup=3, iters=args.iters)
                rows.append({**base, "impl": f"triton sweep nw={nw} lanes/thread={per_thread}",
                             "ms": t.median_ms, "TBps": nbytes / t.median_ms / 1e9,
                             "speedup_vs_torch": tr.median_ms / t.median_ms, "max_rel_err": float("nan")})
    return rows


def _finish(rows: list[dict], args) -> None:
    cols = ["N", "V", "GB", "impl", "ms", "TBps", "copy_TBps", "speedup_vs_torch", "max_rel_err"]
    notes = (
        "Effective bandwidth = bf16 logit bytes / median time (CUDA events, after warm-up). copy_TBps: "
        "device-to-device copy in the same process, (read + write) / time. Target (issue 5): >= 3.0 TB/s. "
        "max_rel_err: max |triton - torch| / max |torch| over the four scores."
    )
    paths = write_results("scoring", rows, title="Token scoring: one-pass Triton kernel vs PyTorch path",
                          notes=notes, columns=cols, out_dir=args.out)
    print(markdown_table(rows, cols))
    print("wrote", *paths)


if __name__ == "__main__":
    main()
