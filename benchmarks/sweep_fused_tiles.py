"""Tile sweep of the fused linear cross-entropy kernels (issue 5): forward, tiled backward, split d_hidden / d_weight.

Shape legend: N tokens, H hidden size, V vocabulary. bf16, (N, H, V) in CASES (those of bench_linear_ce.py);
hidden ~ N(0, 1), weight ~ N(0, 1/H), targets uniform, ratio 1 (row weights 1/N, no ignored rows).

GPU mode (default). Per case, in one process:
  * yardstick: one cuBLAS GEMM pass hidden @ weight.T into a preallocated bf16 [N, V] buffer;
  * reference: the chunked kernel (cggr.kernels.linear_cross_entropy.forward_stats with row weights: scores and
    fp32-accumulated gradients);
  * for each part (fwd: forward_stats; tiled: backward_selected of the fused module, accumulate 'native';
    dh / dw: the split backward with only d_hidden / only d_weight) and each candidate config (the default of the
    kernel's tile heuristic first, then overrides of it): the result is validated against the reference
    (fwd: max |lse - lse_ref| and max |nll - nll_ref|; backward parts: ||g - g_ref|| / ||g_ref||), then timed
    (median of CUDA-event timings after warm-up). A config whose error exceeds max(ERR_FLOOR, ERR_FACTOR x
    the default config's error) is marked invalid and never ranked; one that fails to compile or to launch
    (shared memory, registers) is recorded with its error.
  * also the registers, spills and shared memory of the kernel's last launch (CompiledKernel metadata) and
    whether its TTGIR has warp-group MMA (``warp_group_dot``) and TMA copies.
Rows are written to ``<out>/<name>.json|.md`` after every measurement (a run killed by ``timeout`` keeps what it
measured); runs with the same --out / --name accumulate (one case per process keeps each under its timeout).
--summary prints the table of the best valid config per (case, part) against the default and the cuBLAS pass.

Static mode (--static, CPU, no GPU): compiles every kernel for sm_90 (``GPUTarget('cuda', 90, 32)``) with the
installed Triton under each candidate config and prints: warp-group MMA count, mma.sync count, cp.async / TMA
copies in the TTGIR, registers and spills (ptxas -v), shared memory.

    python benchmarks/sweep_fused_tiles.py --cases 0 --out DIR      # one case (repeat for 1, 2)
    python benchmarks/sweep_fused_tiles.py --summary --out DIR       # table of all cases so far
    python benchmarks/sweep_fused_tiles.py --static                  # CPU: sm_90 compile report
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cggr.kernels import linear_cross_entropy_fused as fz
from cggr.kernels import linear_cross_entropy_fused_split as sp

CASES = [(16384, 576, 49152), (8192, 2048, 128256), (8192, 2304, 256000)]
PARTS = ("fwd", "dh", "dw", "tiled")  # the slowest part last: a timeout cuts it first
ERR_FLOOR, ERR_FACTOR = 0.02, 2.0
# candidate overrides per part, on top of the kernel's tile heuristic (fz.default_config / sp.split_config);
# {} is the heuristic itself and comes first
CANDIDATES = {
    # forward: 128 x 256 / 256 x 128 tiles cut the L2 -> SM operand traffic per MAC by 1/4 (no spills with TMA);
    # 4 warps (one warp group, 255 registers, 96 KiB) lets two CTAs share an SM, one's epilogue (online softmax)
    # overlapping the other's MMAs; FLATTEN prefetches the next tile's operands during the epilogue
    "fwd": [{}, {"TMA": False}, {"FWD_BLOCK_V": 256}, {"FWD_num_warps": 4}, {"FWD_BLOCK_N": 256}, {"FLATTEN": True},
            {"FWD_num_stages": 4}, {"FWD_num_warps": 4, "FWD_num_stages": 2}],
    # tiled: larger tiles / BLOCK_O=128 spill (static report), so only the pipeline depth and the raster
    # '_accumulate': 'atomic' (bf16 hardware atomics, the error model of 'native'): product loops pipelined, no locks
    "tiled": [{}, {"TMA": False}, {"_accumulate": "atomic"}, {"num_stages": 4}, {"GROUP_N": 16}, {"GROUP_N": 4},
              # 'atomic' (the default on sm_90 with Triton >= 3.6): its product loops are pipelined and it holds
              # fewer registers (184), so the tile shape is open again; atomics per MAC ~ 1/BLOCK_N + 1/BLOCK_V
              {"_accumulate": "atomic", "BLOCK_V": 256}, {"_accumulate": "atomic", "BLOCK_N": 256},
              {"_accumulate": "atomic", "BLOCK_O": 128, "PROD_STAGES": 2}, {"_accumulate": "atomic", "PROD_STAGES": 4},
              {"_accumulate": "atomic", "num_stages": 4}, {"_accumulate": "atomic", "num_warps": 4},
              # HALVES: the 128 x 256 tile as two 128-column halves (the gradient filter's granularity); '_filter'
              # (static mode only) compiles the filtered kernel
              {"_accumulate": "atomic", "BLOCK_V": 256, "HALVES": True},
              {"_accumulate": "atomic", "BLOCK_V": 256, "HALVES": True, "_filter": True},
              {"_accumulate": "atomic", "BLOCK_V": 256, "_filter": True},
              {"_accumulate": "atomic", "_filter": True}],
    # split: 128 x 256 (d_hidden) / 256 x 128 (d_weight) tiles move ~36% fewer bytes per MAC than 64 x 256 /
    # 256 x 64; d_hidden with 128-row blocks has R / 128 programs (64 at R = 8192: DH_SPLITS=1 leaves SMs idle,
    # the default S = SMs // blocks = 2 adds under per-chunk locks, DH_LOCK=block under one per row block)
    "dh": [{}, {"TMA": False}, {"DH_BLOCK_N": 128, "DH_BLOCK_V": 256, "DH_LOCK": "block"},
           {"DH_BLOCK_N": 128, "DH_BLOCK_V": 256, "DH_SPLITS": 1}, {"DH_BLOCK_N": 128, "DH_BLOCK_V": 256},
           {"DH_BLOCK_N": 128, "DH_BLOCK_V": 256, "_accumulate": "atomic"}, {"BLOCK_O": 128, "PROD_STAGES": 2},
           {"DH_BLOCK_N": 128, "DH_BLOCK_V": 128}, {"num_stages": 4}, {"PROD_STAGES": 2},
           {"DH_num_warps": 4, "DH_BLOCK_V": 128}],
    "dw": [{}, {"TMA": False}, {"DW_BLOCK_V": 128}, {"DW_BLOCK_V": 128, "_accumulate": "fp32"},
           {"DW_BLOCK_V": 64, "_accumulate": "fp32"}, {"DW_BLOCK_V": 128, "PROD_STAGES": 2},
           {"BLOCK_O": 128, "PROD_STAGES": 2}, {"DW_BLOCK_N": 128, "DW_BLOCK_V": 128}, {"num_stages": 4},
           {"DW_num_warps": 4, "DW_BLOCK_N": 128}, {"DW_num_warps": 4, "num_stages": 2, "PROD_STAGES": 2}],
}
KERNEL_OF = {"fwd": "fwd_stats", "tiled": "bwd_tiled", "dh": "bwd_dh", "dw": "bwd_dw"}
COLUMNS = ["N", "H", "V", "part", "config", "ms", "x_cublas", "err", "valid", "regs", "spills", "smem_KiB", "wgmma",
           "tma", "note"]


def _name(over: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in over.items()) or "default"


def _config(part: str, over: dict, dtype: torch.dtype, h: int) -> dict:
    """The kernel's heuristic tiles with ``over`` applied (key ``_accumulate``: the backward's ``accumulate``
    argument, 'native' by default; key ``_filter``: the gradient filter at CCE's bf16 eps 2^-12; both kept in the
    dict for :func:`_run_part`)."""
    smem = fz.smem_per_block(torch.device("cuda")) if torch.cuda.is_available() else None
    cfg_fn = fz.default_config if part in ("fwd", "tiled") else sp.split_config
    base = cfg_fn(dtype, False, h, smem)
    return {**base, **over}


def _run_part(part: str, cfg: dict, hid, wt, tgt, lse, row_w):
    """One call of ``part`` under ``cfg``; returns what is compared with the reference."""
    if part == "fwd":
        return fz.forward_stats(hid, wt, None, tgt, ignore_index=-100, softcap=None, config=cfg)[0]
    cfg = dict(cfg)
    kw = dict(ignore_index=-100, softcap=None, need_bias_grad=False, accumulate=cfg.pop("_accumulate", "native"),
              filter_eps=2.0**-12 if cfg.pop("_filter", False) else None, config=cfg)
    if part == "tiled":
        return fz.backward_selected(hid, wt, None, tgt, lse, row_w, None, need_hidden_grad=True,
                                    need_weight_grad=True, **kw)
    return sp.backward_selected(hid, wt, None, tgt, lse, row_w, None, need_hidden_grad=part == "dh",
                                need_weight_grad=part == "dw", **kw)


def _error(part: str, got, ref_stats, ref_grads) -> float:
    if part == "fwd":  # absolute error of lse and nll (nats)
        return max(float((got[0] - ref_stats[0]).abs().max()), float((got[4] - ref_stats[4]).abs().max()))
    pairs = {"tiled": ((got[0], ref_grads[0]), (got[1], ref_grads[1])), "dh": ((got[0], ref_grads[0]),),
             "dw": ((got[1], ref_grads[1]),)}[part]
    return max(float((a.double() - b.double()).norm() / b.double().norm()) for a, b in pairs)


def _kernel_facts(part: str) -> dict:
    k = fz.LAST_LAUNCHED.get(KERNEL_OF[part])
    if k is None:
        return {}
    ttgir = getattr(k, "asm", {}).get("ttgir", "")
    return {"regs": getattr(k, "n_regs", None), "spills": getattr(k, "n_spills", None),
            "smem_KiB": round(k.metadata.shared / 1024, 1) if hasattr(k, "metadata") else None,
            "wgmma": ttgir.count("ttng.warp_group_dot "), "tma": ttgir.count("async_tma_copy_global_to_local")}


def _load(path: Path) -> list[dict]:
    return json.loads(path.read_text())["rows"] if path.exists() else []


def _write(rows: list[dict], args) -> None:
    from benchmarks._timing import write_results

    notes = ("bf16, ratio 1, median of CUDA-event timings after warm-up; x_cublas = time / one cuBLAS GEMM pass "
             "(N x V x H) of the same case. err: fwd max |lse - ref| and |nll - ref| (nats), backward parts "
             "||g - g_ref|| / ||g_ref|| against the chunked kernel (fp32-accumulated); valid = err <= max("
             f"{ERR_FLOOR}, {ERR_FACTOR} x the default's err). regs / spills / smem / wgmma / tma: the kernel's "
             "last launch (registers per thread, spilled bytes, shared memory, warp-group MMAs and TMA copies in "
             "its TTGIR). Parts: fwd = forward scores; tiled = tiled backward (d_hidden + d_weight, locks); dh / "
             "dw = split backward with only d_hidden / only d_weight.")
    write_results(args.name, rows, title="Fused linear cross-entropy: tile sweep", notes=notes, columns=COLUMNS,
                  out_dir=args.out)


def _sweep_case(ci: int, args, rows: list[dict]) -> None:
    from benchmarks._timing import synchronize, time_fn
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources

    from cggr.kernels.linear_cross_entropy import DEFAULT_WORKSPACE_BYTES, forward_stats

    n, h, v = CASES[ci]
    dev = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float16 if args.smoke else torch.bfloat16  # the interpreter has no bf16 products
    gen = torch.Generator(device=dev).manual_seed(ci)
    hid = torch.randn(n, h, device=dev, generator=gen).to(dtype)
    wt = (torch.randn(v, h, device=dev, generator=gen) / h**0.5).to(dtype)
    tgt = torch.randint(0, v, (n,), device=dev, generator=gen)
    row_w = torch.full((n,), 1.0 / n, dtype=torch.float32, device=dev)
    ref_stats, ref_grads = forward_stats(hid, wt, None, tgt, ignore_index=-100, softcap=None,
                                         workspace_bytes=DEFAULT_WORKSPACE_BYTES, row_weights=row_w,
                                         need_hidden_grad=True, need_weight_grad=True)
    lse = ref_stats[0].contiguous()
    buf = [torch.empty(n, v, dtype=dtype, device=dev)]  # [N, V] GEMM output, freed after timing
    cublas = time_fn(lambda: torch.mm(hid, wt.t(), out=buf[0]), warmup=args.warmup, iters=args.iters).median_ms
    buf.clear()
    if not args.smoke:
        torch.cuda.empty_cache()
    base = {"N": n, "H": h, "V": v}
    rows.append({**base, "part": "cuBLAS GEMM (1 pass)", "config": "", "ms": cublas, "x_cublas": 1.0})
    print(f"({n},{h},{v}) cuBLAS 1 pass: {cublas:.2f} ms", flush=True)
    for part in args.parts.split(","):
        default_err = None
        for over in CANDIDATES[part][: args.max_configs]:
            cfg = _config(part, over, hid.dtype, h)
            row = {**base, "part": part, "config": _name(over)}
            try:
                fz.LAST_LAUNCHED.clear()
                got = _run_part(part, cfg, hid, wt, tgt, lse, row_w)
                synchronize(dev)
                err = _error(part, got, ref_stats, ref_grads)
                del got
                if default_err is None:
                    default_err = err
                row.update(_kernel_facts(part), err=err,
                           valid=bool(math.isfinite(err) and err <= max(ERR_FLOOR, ERR_FACTOR * default_err)))
                ms = time_fn(lambda part=part, cfg=cfg: _run_part(part, cfg, hid, wt, tgt, lse, row_w),
                             warmup=args.warmup, iters=args.iters).median_ms
                row.update(ms=ms, x_cublas=ms / cublas)
            except (CompilationError, OutOfResources, RuntimeError, ValueError) as e:  # a candidate that cannot run
                row.update(valid=False, note=f"{type(e).__name__}: {str(e)[:160]}")
            rows.append(row)
            print(f"({n},{h},{v}) {part} [{row['config']}]: {row.get('ms', float('nan')):.2f} ms, "
                  f"err {row.get('err', float('nan')):.2e}, valid {row['valid']}, regs {row.get('regs')}, "
                  f"spills {row.get('spills')}, smem {row.get('smem_KiB')} KiB, wgmma {row.get('wgmma')}, "
                  f"tma {row.get('tma')} {row.get('note', '')}", flush=True)
            _write(rows, args)
            if not args.smoke:
                torch.cuda.empty_cache()


def _summary(rows: list[dict]) -> None:
    print("\nbest valid config per case and part (ms; x = / one cuBLAS GEMM pass of the case):")
    print(f"{'case (N,H,V)':24} {'part':6} {'cuBLAS':>7} {'default':>8} {'x':>5} {'best':>8} {'x':>5}  best config")
    for n, h, v in CASES:
        case = [r for r in rows if (r["N"], r["H"], r["V"]) == (n, h, v)]
        cub = next((r["ms"] for r in case if r["part"].startswith("cuBLAS")), float("nan"))
        for part in PARTS:
            got = [r for r in case if r["part"] == part and r.get("valid") and r.get("ms") is not None]
            if not got:
                continue
            d = next((r["ms"] for r in got if r["config"] == "default"), float("nan"))
            b = min(got, key=lambda r: r["ms"])
            print(f"{(n, h, v)!s:24} {part:6} {cub:7.2f} {d:8.2f} {d / cub:5.2f} {b['ms']:8.2f} "
                  f"{b['ms'] / cub:5.2f}  {b['config']}")
    print("\nper part, the config valid and timed in every case with the lowest geometric mean of ms / default ms:")
    for part in PARTS:
        got = [r for r in rows if r["part"] == part and r.get("valid") and r.get("ms") is not None]
        cases = {(r["N"], r["H"], r["V"]) for r in got}
        default = {(r["N"], r["H"], r["V"]): r["ms"] for r in got if r["config"] == "default"}
        scores = {}
        for name in {r["config"] for r in got}:
            ms = {(r["N"], r["H"], r["V"]): r["ms"] for r in got if r["config"] == name}
            if cases and set(ms) == cases == set(default):
                scores[name] = math.exp(sum(math.log(ms[c] / default[c]) for c in cases) / len(cases))
        if scores:
            best = min(scores, key=scores.get)
            print(f"  {part:6} {best}  ({scores[best]:.3f} x default over {len(cases)} cases)")


# ---------------------------------------------------------------------------------------------- static (CPU)
def _static(args) -> None:
    import os
    import re
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources

    target = GPUTarget("cuda", args.arch, 32)
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    # the newest bundled ptxas (Triton >= 3.5 emits PTX that the older sm_90 one rejects)
    ptxas = next((os.path.join(bindir, p) for p in ("ptxas-blackwell", "ptxas")
                  if os.path.exists(os.path.join(bindir, p))), None)
    p, h = "*bf16", 2048

    def desc(block, on):
        return f"tensordesc<bf16[{block[0]},{block[1]}]>" if on else p

    def compile_one(fn, sig, constexprs, num_warps, num_stages):
        not_div = ("vb_per_split",)
        attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k, t in sig.items()
                 if t.startswith("*") or (t == "i32" and k not in not_div)}
        src = ASTSource(fn=fn, signature={**sig, **{k: "constexpr" for k in constexprs}}, constexprs=constexprs,
                        attrs=attrs)
        return triton.compile(src, target=target, options={"num_warps": num_warps, "num_stages": num_stages})

    def facts(k) -> str:
        ttgir, ptx = k.asm["ttgir"], k.asm["ptx"]
        regs = spill = "?"
        if ptxas is not None:
            with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
                f.write(ptx)
            arch = f"sm_{args.arch}a" if args.arch == 90 else f"sm_{args.arch}"
            r = subprocess.run([ptxas, f"-arch={arch}", "-v", f.name, "-o", os.devnull], capture_output=True,
                               text=True)
            os.unlink(f.name)
            m = re.search(r"Used (\d+) registers", r.stdout + r.stderr)
            s = re.search(r"(\d+) bytes spill stores", r.stdout + r.stderr)
            regs, spill = (m.group(1) if m else "?"), (s.group(1) if s else "?")
        n_tma = ttgir.count("async_tma_copy_global_to_local")
        return (f"wgmma {ttgir.count('ttng.warp_group_dot '):2d}  mma.sync {ptx.count('mma.sync')}  cp.async "
                f"{ttgir.count('async_copy_global_to_local'):2d}  tma {n_tma:2d}  regs {regs:>3}  spill {spill:>3} B"
                f"  smem {k.metadata.shared / 1024:6.1f} KiB")

    print(f"triton {triton.__version__}, sm_{args.arch}, bf16, H = {h} (EVEN), ratio 1, 'native' accumulation")
    for part in PARTS:
        for over in CANDIDATES[part][: args.max_configs]:
            c = _config(part, over, torch.bfloat16, h)
            tma, atomic = bool(c.get("TMA", True)), c.get("_accumulate") == "atomic"
            try:
                if part == "fwd":
                    bn, bv, bd = (c.get("FWD_" + k, c[k]) for k in ("BLOCK_N", "BLOCK_V", "BLOCK_D"))
                    sig = {"H": p, "W": p, "Bias": p, "T": "*i64", "PART": "*fp32", "HD": desc((bn, bd), tma),
                           "WD": desc((bv, bd), tma), "N": "i32", "V": "i32", "D": "i32", "stride_h": "i32",
                           "stride_w": "i32", "vb_per_split": "i32", "softcap": "fp32"}
                    k = compile_one(fz._fwd_stats_kernel, sig, dict(
                        HAS_BIAS=False, HAS_SOFTCAP=False, BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=bd, EVEN_D=True,
                        DOT_PRECISION="tf32", FLATTEN=bool(c.get("FLATTEN", False)), TMA_H=tma, TMA_W=tma),
                        c.get("FWD_num_warps", c["num_warps"]), c.get("FWD_num_stages", c["num_stages"]))
                    shape = f"{bn}x{bv}x{bd}"
                elif part == "tiled":
                    bn, bv, bd, bo = c["BLOCK_N"], c["BLOCK_V"], c["BLOCK_D"], c["BLOCK_O"]
                    halves = bool(c.get("HALVES", False))
                    bvw = bv // 2 if halves else bv
                    sig = {"H": p, "W": p, "Bias": p, "T": "*i64", "LSE": "*fp32", "WROW": "*fp32", "IDX": "*i64",
                           "DH": p, "DW": p, "DB": "*fp32", "CT": "*fp32", "LOCK_H": "*i32", "LOCK_W": "*i32",
                           "HD": desc((bn, bd), tma), "WD": desc((bvw, bd), tma), "HOD": desc((bn, bo), tma),
                           "WOD": desc((bvw, bo), tma), "R": "i32", "V": "i32", "D": "i32", "stride_h": "i32",
                           "stride_w": "i32", "softcap": "fp32", "filter_eps": "fp32"}
                    k = compile_one(fz._bwd_kernel, sig, dict(
                        HAS_BIAS=False, HAS_SOFTCAP=False, HAS_IDX=False, COMPUTE_DH=True, COMPUTE_DW=True,
                        COMPUTE_DB=False, DH_ATOMIC=atomic, DW_ATOMIC=atomic, FILTER=bool(c.get("_filter")),
                        BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=bd, BLOCK_O=bo, GROUP_N=c["GROUP_N"], EVEN_D=True,
                        EVEN_O=True, DOT_PRECISION="tf32", TMA_H=tma, TMA_W=tma, PROD_STAGES=c["PROD_STAGES"],
                        HALVES=halves),
                        c["num_warps"], c["num_stages"])
                    shape = f"{bn}x{bv}x{bd} o{bo}"
                else:
                    pre = "DH_" if part == "dh" else "DW_"
                    bn, bv, bd, bo = c[pre + "BLOCK_N"], c[pre + "BLOCK_V"], c["BLOCK_D"], c["BLOCK_O"]
                    common = {"H": p, "W": p, "Bias": p, "T": "*i64", "LSE": "*fp32", "WROW": "*fp32", "IDX": "*i64"}
                    tail = {"R": "i32", "V": "i32", "D": "i32", "stride_h": "i32", "stride_w": "i32"}
                    if part == "dh":
                        sig = {**common, "DH": p, "CT": "*fp32", "LOCK": "*i32", "HD": desc((bn, bd), tma),
                               "WD": desc((bv, bd), tma), "WOD": desc((bv, bo), tma), **tail, "vb_per_split": "i32",
                               "softcap": "fp32", "filter_eps": "fp32"}
                        mode = 2 if atomic else 3 if c.get("DH_LOCK") == "block" else 0  # as at S > 1
                        fn, extra = sp._bwd_dh_kernel, dict(MODE=mode)
                    else:
                        dw_t = "*fp32" if c.get("_accumulate") == "fp32" else p  # 'fp32': an fp32 d_weight buffer
                        sig = {**common, "DW": dw_t, "DB": "*fp32", "HD": desc((bn, bd), tma),
                               "WD": desc((bv, bd), tma), "HOD": desc((bn, bo), tma), **tail, "softcap": "fp32",
                               "filter_eps": "fp32"}
                        fn, extra = sp._bwd_dw_kernel, dict(COMPUTE_DW=True, COMPUTE_DB=False)
                    k = compile_one(fn, sig, dict(
                        HAS_BIAS=False, HAS_SOFTCAP=False, HAS_IDX=False, FILTER=False, BLOCK_N=bn, BLOCK_V=bv,
                        BLOCK_D=bd, BLOCK_O=bo, EVEN_D=True, EVEN_O=True, DOT_PRECISION="tf32", TMA_H=tma,
                        TMA_W=tma, PROD_STAGES=c.get("PROD_STAGES", c["num_stages"]), **extra),
                        c.get(pre + "num_warps", c["num_warps"]), c.get(pre + "num_stages", c["num_stages"]))
                    shape = f"{bn}x{bv}x{bd} o{bo}"
                print(f"{part:5} {shape:16} {_name(over):44} {facts(k)}", flush=True)
            except (CompilationError, OutOfResources, RuntimeError, ValueError) as e:  # reported, not hidden
                print(f"{part:5} {'':16} {_name(over):44} not compiled: {type(e).__name__}: {str(e)[:200]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="0,1,2")
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--max-configs", type=int, default=99, help="first K candidates of each part")
    ap.add_argument("--name", default="linear_ce_fused_tiles")
    ap.add_argument("--out", default=None)
    ap.add_argument("--summary", action="store_true", help="print the best-config table of --out/--name and exit")
    ap.add_argument("--static", action="store_true", help="CPU: sm_90 compile report of every candidate")
    ap.add_argument("--arch", type=int, default=90, help="--static: compute capability to compile for (86: A10 /"
                    " RTX 30xx, 89: L4 / RTX 40xx; no TMA there: use TMA=False candidates)")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU check of this script under TRITON_INTERPRET=1: one tiny fp16 case, 1 iteration")
    args = ap.parse_args()
    if args.smoke:
        CASES[:] = [(80, 64, 300)]
        args.cases, args.iters, args.warmup = "0", 1, 0
    if args.static:
        _static(args)
        return
    from benchmarks._timing import RESULTS_ROOT, device_tag

    path = Path(args.out if args.out is not None else RESULTS_ROOT / device_tag()) / f"{args.name}.json"
    rows = _load(path)
    if not args.summary:
        for ci in [int(c) for c in args.cases.split(",")]:
            _sweep_case(ci, args, rows)
    _summary(rows)


if __name__ == "__main__":
    main()
