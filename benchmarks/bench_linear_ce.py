"""Fused linear cross-entropy, forward + backward: cggr (ratio 1.0 and 0.25) vs eager, Liger-Kernel and CCE (issue 5).

bf16, (N, H, V) in {(16384, 576, 49152), (8192, 2048, 128256), (8192, 2304, 256000)}; hidden ~ N(0, 1),
weight ~ N(0, s²/H) (logits ~ N(0, s²); s from --logit-std, default 1), targets uniform.
Every arm computes d hidden and d weight through ``torch.autograd.grad`` (no .grad accumulation).
Time: median of CUDA-event timings after warm-up. Memory:
peak allocated during the timed calls minus what was allocated before them (inputs), i.e. the arm's own
workspace plus its gradients.

Arms:
  eager            logits = hidden @ weight.T (bf16), F.cross_entropy(logits.float(), targets)
  cggr r=1.0       cggr.functional.linear_cross_entropy(ratio=1.0, impl='triton')
  cggr r=0.25      cggr.functional.linear_cross_entropy(ratio=0.25, scoring='combined', selection='topk')
  cggr r=1.0 outputs-ws  ratio 1 with LinearCrossEntropyOptions(workspace='outputs'): the chunked kernel's logits
                   chunks live in the unwritten rows of d_weight (no 256 MiB workspace, 4 GEMM passes; the fused
                   kernel when the schedule would need more than OUTPUTS_MAX_CHUNKS chunks, e.g. N >> H)
  cggr fused r=*   the same with LinearCrossEntropyOptions(kernel='fused') (logits only in registers,
                   gradients accumulated in bf16 into the outputs); 'fused fp32_hidden' with accumulate='fp32_hidden',
                   'fused atomic' with accumulate='atomic' (bf16 hardware atomics instead of locks),
                   'fused filter=2^-12' with CCE's gradient filter at its bf16 default threshold (opt-in: inexact)
  cggr fused split r=*  the same with bwd='split' (one backward kernel per gradient output, each output row owned
                   by one program: no locks; 4 GEMM passes; 'split filter=2^-12' with the gradient filter);
                   'split_fwd' with bwd='split_fwd' (ratio 1: d_hidden accumulated during the forward)
  liger            liger_kernel 0.8.5 liger_fused_linear_cross_entropy (if importable)
  cce              cut_cross_entropy.linear_cross_entropy (defaults, incl. its gradient filter; if importable)
  cce exact        the same with filter_eps=None (exact gradients, like every cggr arm without 'filter')
  score+cce r=0.25 score every token (cggr Triton forward, no grad), top-25% by 'combined', CCE on those rows
  cce 25% rows     CCE on a fixed 25% of the rows, no scoring (reference only: not a selective loss)

    python benchmarks/bench_linear_ce.py [--cases 0,1,2] [--iters 10] [--logit-std 1,4] [--workspace-arms]
        [--fused-sweep] [--split-sweep] [--backward-tiles] [--atomic] [--only 'cggr fused,cce'] [--exclude '25%']
        [--no-breakdown] [--name linear_ce] [--out DIR]

Every case also gets breakdown rows (arm 'part: ...', no autograd): one cuBLAS GEMM hidden @ weight.T into a
bf16 [N, V] buffer (the time of one GEMM pass), the fused kernel's forward alone (scores) and its ratio-1 backward
alone (3 GEMM passes + accumulation), its split backward alone (bwd='split': 4 GEMM passes, no locks; also each
of its two kernels alone: 'd_hidden only', 'd_weight only'), the 'split_fwd' forward alone (scores + d_hidden),
and the chunked kernel's forward alone.
--fused-sweep also times 'cggr fused r=1.0' and the fused forward / backward parts under other tile
configurations (SWEEP: overrides of the fused kernel's default_config), for tuning; --split-sweep the split
backward and 'split_fwd' forward parts under SPLIT_SWEEP (overrides of
linear_cross_entropy_fused_split.split_config); --backward-tiles the fused arms (exact, filtered, ratio 0.25) under the
BACKWARD_TILES backward tiles.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.compiler.errors import CompilationError
from triton.runtime.errors import OutOfResources

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from benchmarks._timing import markdown_table, time_fn, write_results

from cggr.functional import LinearCrossEntropyOptions, linear_cross_entropy
from cggr.kernels import linear_cross_entropy as chunked_kernel
from cggr.kernels import linear_cross_entropy_fused as fused_kernel
from cggr.kernels import linear_cross_entropy_fused_split as split_kernel
from cggr.kernels.linear_cross_entropy import DEFAULT_WORKSPACE_BYTES, forward_stats
from cggr.scoring import TokenScores, difficulty

CASES = [(16384, 576, 49152), (8192, 2048, 128256), (8192, 2304, 256000)]
FUSED = LinearCrossEntropyOptions(kernel="fused")
OUTPUTS_WS = LinearCrossEntropyOptions(workspace="outputs")
FUSED_FP32H = LinearCrossEntropyOptions(kernel="fused", accumulate="fp32_hidden")
FUSED_ATOMIC = LinearCrossEntropyOptions(kernel="fused", accumulate="atomic")
# --fused-sweep: overrides of the fused kernel's bf16 default tiles (BLOCK_N=128, BLOCK_V=128, BLOCK_D=64,
# BLOCK_O=64, num_warps=8, num_stages=3); FLATTEN: flattened forward tile loop (Triton >= 3.3)
SWEEP = [dict(num_warps=16), dict(BLOCK_V=64), dict(BLOCK_N=64), dict(BLOCK_N=64, BLOCK_V=64),
         dict(BLOCK_O=32, num_warps=16), dict(FLATTEN=True), dict(BLOCK_D=32, num_stages=4)]
FUSED_FILTER = LinearCrossEntropyOptions(kernel="fused", filter_eps=2.0**-12)  # CCE's bf16 default
SPLIT = LinearCrossEntropyOptions(kernel="fused", bwd="split")
SPLIT_FILTER = LinearCrossEntropyOptions(kernel="fused", bwd="split", filter_eps=2.0**-12)
SPLIT_ATOMIC = LinearCrossEntropyOptions(kernel="fused", bwd="split", accumulate="atomic")
SPLIT_FWD = LinearCrossEntropyOptions(kernel="fused", bwd="split_fwd")
# --split-sweep: overrides of the split backward's bf16 default tiles (DH 64 x 256, DW 256 x 64, BLOCK_D=64,
# BLOCK_O=64, num_warps=8, num_stages=3; DH_SPLITS: vocabulary splits of the d_hidden kernel, default SMs // row
# blocks, > 1 adds under locks)
# --backward-tiles: the tiled backward's tile (accumulate 'auto' = 'atomic' on sm_90): 128 x 128, 128 x 256, and
# 128 x 256 as two 128-column halves (HALVES: one logits GEMM, the filter and the products per half)
BACKWARD_TILES = [dict(BLOCK_V=128, HALVES=False), dict(BLOCK_V=256, HALVES=False), dict(BLOCK_V=256, HALVES=True)]
SPLIT_SWEEP = [dict(DH_BLOCK_N=128, DH_BLOCK_V=128, DW_BLOCK_N=128, DW_BLOCK_V=128),
               dict(DH_BLOCK_V=128, DW_BLOCK_N=128), dict(BLOCK_D=32, num_stages=4), dict(BLOCK_O=128),
               dict(DH_SPLITS=2)]


def _many_chunks(fn, max_chunks: int = 512):
    """``fn()`` with the outputs workspace's chunk cap raised (kernels.linear_cross_entropy.OUTPUTS_MAX_CHUNKS,
    64 by default): times the narrow-chunk schedule that N >> H needs (case 0) instead of its buffer fallback."""
    saved = chunked_kernel.OUTPUTS_MAX_CHUNKS
    chunked_kernel.OUTPUTS_MAX_CHUNKS = max_chunks
    try:
        return fn()
    finally:
        chunked_kernel.OUTPUTS_MAX_CHUNKS = saved


def _tiles_name(tiles: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in tiles.items())


class _Tiles:
    """Context: a kernel module's default tiles (``module.<attr>(dtype, interpret)``) overridden by ``tiles``
    (the fused kernel's default_config by default: forward and backward of one step; with ``backward_only`` the
    forward keeps its default tile, FWD_BLOCK_V pinned)."""

    def __init__(self, tiles: dict, module=fused_kernel, attr: str = "default_config", backward_only: bool = False):
        self.tiles, self.module, self.attr, self.backward_only = tiles, module, attr, backward_only

    def __enter__(self):
        self.orig = orig = getattr(self.module, self.attr)

        def patched(*a, **k):
            cfg = orig(*a, **k)
            pin = {"FWD_BLOCK_V": cfg.get("FWD_BLOCK_V", cfg["BLOCK_V"])} if self.backward_only else {}
            return {**cfg, **pin, **self.tiles}

        setattr(self.module, self.attr, patched)

    def __exit__(self, *exc):
        setattr(self.module, self.attr, self.orig)


def _optional_arms():
    arms = {}
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError as e:
        print("liger-kernel not importable:", e)
    else:
        arms["liger"] = lambda h, w, t: liger_fused_linear_cross_entropy(h, w, t)
    try:
        from cut_cross_entropy import linear_cross_entropy as cce
    except ImportError as e:
        print("cut-cross-entropy not importable:", e)
    else:
        arms["cce"] = lambda h, w, t: cce(h, w, t)
        arms["cce exact (filter_eps=None)"] = lambda h, w, t: cce(h, w, t, filter_eps=None)
    return arms


def _score_then(fn, ratio):
    """'Score every token (cggr Triton forward, no grad), then ``fn`` on the selected rows'."""

    def run(h, w, t):
        n = h.shape[0]
        k = max(1, int(ratio * n + 0.5))
        with torch.no_grad():
            stats, _ = forward_stats(h.detach(), w.detach(), None, t, ignore_index=-100, softcap=None,
                                     workspace_bytes=DEFAULT_WORKSPACE_BYTES)
            sc = TokenScores(stats[1], stats[2], stats[3], stats[4], t != -100, w.shape[0])
            idx = torch.topk(difficulty(sc, "combined"), k, sorted=False).indices
        return fn(h[idx], w, t[idx])

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="0,1,2")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--skip-eager", action="store_true")
    ap.add_argument("--logit-std", default="1", help="comma list of logit scales (weight ~ N(0, std²/H))")
    ap.add_argument("--workspace-arms", action="store_true", help="also time cggr with a 64 MiB workspace")
    ap.add_argument("--fused-sweep", action="store_true", help="also time the fused kernel under other tiles")
    ap.add_argument("--split-sweep", action="store_true", help="also time the split backward under other tiles")
    ap.add_argument("--backward-tiles", action="store_true",
                    help="also time the fused arms (exact, filter, ratio 0.25) under the BACKWARD_TILES tiles")
    ap.add_argument("--atomic", action="store_true", help="also time the fused kernel with accumulate='atomic'")
    ap.add_argument("--only", default="", help="comma list of substrings: time only arms whose name has one")
    ap.add_argument("--exclude", default="", help="comma list of substrings: skip arms whose name has one")
    ap.add_argument("--no-breakdown", action="store_true", help="skip the 'part: ...' rows")
    ap.add_argument("--name", default="linear_ce", help="results file stem")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    extra = _optional_arms()
    rows = []
    for std in [float(s) for s in args.logit_std.split(",")]:
        for ci in [int(c) for c in args.cases.split(",")]:
            rows += _bench_case(ci, extra, args, std)
            torch.cuda.empty_cache()
            _finish(rows, args)  # rewritten after every case: a crash later keeps what was measured


def _breakdown(hidden, weight, targets, args) -> dict:
    """Timings of the parts (no autograd): one GEMM pass, the fused forward and backward, the chunked forward."""
    h, w = hidden.detach(), weight.detach()
    n, v = h.shape[0], w.shape[0]
    parts = {}
    out = torch.empty(n, v, dtype=h.dtype, device=h.device) if n * v * h.element_size() <= 24 * 2**30 else None
    if out is not None:
        parts["part: cuBLAS GEMM N x V x H (1 pass)"] = lambda: torch.mm(h, w.t(), out=out)
    parts["part: fused forward (scores)"] = lambda: fused_kernel.forward_stats(
        h, w, None, targets, ignore_index=-100, softcap=None)
    stats, _ = fused_kernel.forward_stats(h, w, None, targets, ignore_index=-100, softcap=None)
    row_w = torch.full((n,), 1.0 / n, dtype=torch.float32, device=h.device)
    parts["part: fused backward r=1 (native)"] = lambda: fused_kernel.backward_selected(
        h, w, None, targets, stats[0], row_w, None, ignore_index=-100, softcap=None, need_hidden_grad=True,
        need_weight_grad=True, need_bias_grad=False)
    for label, need_h, need_w in (("", True, True), (" d_hidden only", True, False), (" d_weight only", False, True)):
        parts[f"part: fused split backward r=1 (native){label}"] = lambda need_h=need_h, need_w=need_w: (
            split_kernel.backward_selected(h, w, None, targets, stats[0], row_w, None, ignore_index=-100,
                                           softcap=None, need_hidden_grad=need_h, need_weight_grad=need_w,
                                           need_bias_grad=False))
    parts["part: fused split_fwd forward (scores + d_hidden)"] = lambda: split_kernel.forward_with_hidden_grad(
        h, w, None, targets, row_w, ignore_index=-100, softcap=None)
    parts["part: chunked forward (scores)"] = lambda: forward_stats(
        h, w, None, targets, ignore_index=-100, softcap=None, workspace_bytes=DEFAULT_WORKSPACE_BYTES)
    res = {}
    for name, fn in parts.items():
        res[name] = time_fn(fn, warmup=args.warmup, iters=args.iters).median_ms
    for tiles in SWEEP if args.fused_sweep else []:
        for part in ("fused forward (scores)", "fused backward r=1 (native)"):
            try:
                with _Tiles(tiles):
                    res[f"part: {part} tiles {_tiles_name(tiles)}"] = time_fn(
                        parts[f"part: {part}"], warmup=args.warmup, iters=args.iters).median_ms
            except (OutOfResources, CompilationError) as e:
                print(part, tiles, "not measured:", type(e).__name__, str(e)[:2000])
    for tiles in SPLIT_SWEEP if args.split_sweep else []:
        for part in ("fused split backward r=1 (native)", "fused split_fwd forward (scores + d_hidden)"):
            try:
                with _Tiles(tiles, split_kernel, "split_config"):
                    res[f"part: {part} tiles {_tiles_name(tiles)}"] = time_fn(
                        parts[f"part: {part}"], warmup=args.warmup, iters=args.iters).median_ms
            except (OutOfResources, CompilationError) as e:
                print(part, tiles, "not measured:", type(e).__name__, str(e)[:2000])
    return res


def _bench_case(ci: int, extra: dict, args, std: float) -> list[dict]:
    dev = torch.device("cuda")
    rows: list[dict] = []
    n, h, v = CASES[ci]
    gen = torch.Generator(device=dev).manual_seed(ci)
    hidden = torch.randn(n, h, device=dev, generator=gen).to(torch.bfloat16).requires_grad_()
    weight = (torch.randn(v, h, device=dev, generator=gen) * (std / h**0.5)).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, v, (n,), device=dev, generator=gen)

    arms = {}
    if not args.skip_eager and std == 1.0:
        arms["eager (materialised logits)"] = lambda hh, ww, tt: F.cross_entropy((hh @ ww.t()).float(), tt)
    arms["cggr r=1.0"] = lambda hh, ww, tt: linear_cross_entropy(hh, ww, tt, ratio=1.0, impl="triton")
    arms["cggr r=0.25"] = lambda hh, ww, tt: linear_cross_entropy(hh, ww, tt, ratio=0.25, impl="triton")
    arms["cggr r=1.0 outputs-ws"] = lambda hh, ww, tt: linear_cross_entropy(hh, ww, tt, ratio=1.0, impl="triton",
                                                                           options=OUTPUTS_WS)
    arms["cggr r=1.0 outputs-ws max-chunks=512"] = lambda hh, ww, tt: _many_chunks(
        lambda: linear_cross_entropy(hh, ww, tt, ratio=1.0, impl="triton", options=OUTPUTS_WS))
    arms["cggr fused r=1.0"] = lambda hh, ww, tt: linear_cross_entropy(hh, ww, tt, ratio=1.0, impl="triton",
                                                                      options=FUSED)
    arms["cggr fused r=0.25"] = lambda hh, ww, tt: linear_cross_entropy(hh, ww, tt, ratio=0.25, impl="triton",
                                                                       options=FUSED)
    arms["cggr fused fp32_hidden r=1.0"] = lambda hh, ww, tt: linear_cross_entropy(
        hh, ww, tt, ratio=1.0, impl="triton", options=FUSED_FP32H)
    arms["cggr fused filter=2^-12 r=1.0"] = lambda hh, ww, tt: linear_cross_entropy(
        hh, ww, tt, ratio=1.0, impl="triton", options=FUSED_FILTER)
    for r in (1.0, 0.25):
        arms[f"cggr fused split r={r}"] = lambda hh, ww, tt, r=r: linear_cross_entropy(
            hh, ww, tt, ratio=r, impl="triton", options=SPLIT)
    arms["cggr fused split filter=2^-12 r=1.0"] = lambda hh, ww, tt: linear_cross_entropy(
        hh, ww, tt, ratio=1.0, impl="triton", options=SPLIT_FILTER)
    arms["cggr fused split_fwd r=1.0"] = lambda hh, ww, tt: linear_cross_entropy(
        hh, ww, tt, ratio=1.0, impl="triton", options=SPLIT_FWD)
    if args.fused_sweep:
        for tiles in SWEEP:
            arms[f"cggr fused r=1.0 tiles {_tiles_name(tiles)}"] = (arms["cggr fused r=1.0"], tiles)
    if args.backward_tiles:  # the tiled backward's tile: exact, filtered, selected rows (forward unchanged)
        for tiles in BACKWARD_TILES:
            for base in ("cggr fused r=1.0", "cggr fused filter=2^-12 r=1.0", "cggr fused r=0.25"):
                arms[f"{base} bwd tiles {_tiles_name(tiles)}"] = (arms[base], tiles, True)
    if args.workspace_arms:
        small = LinearCrossEntropyOptions(workspace_bytes=64 * 2**20)
        for r in (1.0, 0.25):
            arms[f"cggr r={r} ws=64MiB"] = lambda hh, ww, tt, r=r: linear_cross_entropy(
                hh, ww, tt, ratio=r, impl="triton", options=small)
    for name, fn in extra.items():
        arms[name] = fn
    if "cce" in extra:
        arms["score all + cce on 25%"] = _score_then(extra["cce"], 0.25)
        quarter = torch.arange(0, n, 4, device=dev)
        arms["cce on fixed 25% rows (ref)"] = lambda hh, ww, tt, q=quarter: extra["cce"](hh[q], ww, tt[q])
    if args.atomic:  # opt-in: a Triton without bf16 atomic_add may fail to compile it (or abort in LLVM)
        arms["cggr fused atomic r=1.0"] = lambda hh, ww, tt: linear_cross_entropy(
            hh, ww, tt, ratio=1.0, impl="triton", options=FUSED_ATOMIC)
        arms["cggr fused split atomic r=0.25"] = lambda hh, ww, tt: linear_cross_entropy(
            hh, ww, tt, ratio=0.25, impl="triton", options=SPLIT_ATOMIC)  # atomics where the d_hidden kernel splits
    if args.only:
        keep = [k.strip() for k in args.only.split(",") if k.strip()]
        arms = {name: fn for name, fn in arms.items() if any(k in name for k in keep or [""])}
    drop = [k.strip() for k in args.exclude.split(",") if k.strip()]
    arms = {name: fn for name, fn in arms.items() if not any(k in name for k in drop)}

    results = {}
    steps_by_name = {}
    for name, fn in arms.items():
        fn, tiles, bwd_only = (*fn, False)[:3] if isinstance(fn, tuple) else (fn, None, False)

        def step(fn=fn, tiles=tiles, bwd_only=bwd_only):
            with _Tiles(tiles, backward_only=bwd_only) if tiles is not None else contextlib.nullcontext():
                loss = fn(hidden, weight, targets)
                return torch.autograd.grad(loss, (hidden, weight))

        steps_by_name[name] = step

        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        try:
            # one untimed call first: allocations that live on after the first use (cuBLAS workspaces) belong to
            # the baseline, not to whichever arm happens to run first
            step()
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            tm = time_fn(step, warmup=args.warmup, iters=args.iters)
        except (torch.OutOfMemoryError, OutOfResources, CompilationError) as e:
            # eager on a smaller GPU; a sweep tile too big; bf16 atomics missing from this Triton
            print(name, "not measured:", type(e).__name__, str(e)[:2000])
            continue
        results[name] = tm
        rows.append({"logit_std": std, "N": n, "H": h, "V": v, "arm": name, "ms": tm.median_ms,
                     "peak_extra_MiB": (tm.peak_mem_bytes - before) / 2**20})
        print(f"std={std} ({n},{h},{v}) {name}: {tm.median_ms:.2f} ms, {(tm.peak_mem_bytes - before) / 2**20:.0f} MiB",
              flush=True)
    best_full = min((results[a].median_ms for a in ("liger", "cce") if a in results), default=float("nan"))
    for r in rows:
        r["vs_best_liger_cce_r1"] = best_full / r["ms"]
    for name, ms in ({} if args.no_breakdown else _breakdown(hidden, weight, targets, args)).items():
        rows.append({"logit_std": std, "N": n, "H": h, "V": v, "arm": name, "ms": ms})
        print(f"std={std} ({n},{h},{v}) {name}: {ms:.2f} ms", flush=True)
    # accuracy of the ratio-1 arms against the chunked kernel (fp32-accumulated gradients), same inputs
    full = ("liger", "cce", "cce exact (filter_eps=None)")
    steps = {name: steps_by_name[name] for name in steps_by_name if ("r=1.0" in name or name in full)
             and name in results}
    if "cggr r=1.0" in steps:
        ref = steps["cggr r=1.0"]()
        for r in rows:
            if r["arm"] in steps and r["arm"] != "cggr r=1.0":
                got = steps[r["arm"]]()
                r["grad_rel_err_vs_chunked"] = max(
                    float((a.double() - b.double()).norm() / b.double().norm()) for a, b in zip(got, ref))
                del got
        del ref
    return rows


def _finish(rows: list[dict], args) -> None:
    cols = ["logit_std", "N", "H", "V", "arm", "ms", "peak_extra_MiB", "vs_best_liger_cce_r1",
            "grad_rel_err_vs_chunked"]
    notes = (
        "Forward + backward (d hidden, d weight), bf16, median of CUDA-event timings after warm-up. "
        "vs_best_liger_cce_r1 = (faster of Liger/CCE at full ratio) / arm time: > 1 is faster. "
        "peak_extra_MiB = peak allocated during the timed calls - allocated before (inputs). "
        "Inputs: hidden ~ N(0,1), weight ~ N(0, logit_std²/H) (logits ~ N(0, logit_std²)), targets uniform; "
        "CCE's gradient filter skips blocks whose softmax is below bf16 precision, so its time depends on the data. "
        "grad_rel_err_vs_chunked: max over (d hidden, d weight) of ||g - g_chunked|| / ||g_chunked|| against the "
        "chunked kernel at ratio 1 (fp32-accumulated), same inputs; ratio-1 arms only (cggr, Liger, CCE)."
    )
    paths = write_results(args.name, rows, title="Fused linear cross-entropy: fwd+bwd time and memory",
                          notes=notes, columns=cols, out_dir=args.out)
    print(markdown_table(rows, cols))
    print("wrote", *paths)


if __name__ == "__main__":
    main()
