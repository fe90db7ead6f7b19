"""The fused linear cross-entropy kernels compile for an H100/H200 (sm_90) without a GPU.

Every kernel of :mod:`cggr.kernels.linear_cross_entropy_fused` (and of its split backward,
:mod:`cggr.kernels.linear_cross_entropy_fused_split`) is compiled ahead of time with the installed
Triton (``triton.compile`` on an ``ASTSource`` for ``GPUTarget('cuda', 90, 32)``, ptxas included) at its default
tiles for bf16, fp16 and fp32, in the constexpr variants the launchers use (bias, softcap, selected rows,
accumulation modes, gradient filter, flattened forward loop, TMA descriptors or pointers). This catches type and
lowering errors (for example a 16-bit atomic the backend cannot lower) before any GPU time is spent. It runs in a
subprocess so that the kernels are plain JIT functions even when another test module turned the interpreter on.
Skipped without triton or without its bundled ptxas (CI). The GPU's own Triton may differ in version:
tests/gpu/test_linear_ce_gpu.py remains the check on the device.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

triton = pytest.importorskip("triton", reason="needs triton (pip install triton, Linux): the kernels' compile checks")

SCRIPT = textwrap.dedent(
    """
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from cggr.kernels import _linear_ce_launch as launch
    from cggr.kernels import linear_cross_entropy_fused as fz
    from cggr.kernels import linear_cross_entropy_fused_split as sp

    TARGET = GPUTarget("cuda", 90, 32)
    DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    NOT_DIVISIBLE = ("ignore_index", "S", "vb_per_split")


    def desc(p, block):  # a host-side TMA descriptor argument, or the plain pointer when TMA is off
        return f"tensordesc<{p[1:]}[{block[0]},{block[1]}]>" if block else p


    def compile_one(fn, sig, constexprs, num_warps, num_stages):
        attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k, t in sig.items()
                 if t.startswith("*") or (t == "i32" and k not in NOT_DIVISIBLE)}
        full = {**sig, **{k: "constexpr" for k in constexprs}}
        src = ASTSource(fn=fn, signature=full, constexprs=constexprs, attrs=attrs)
        triton.compile(src, target=TARGET, options={"num_warps": num_warps, "num_stages": num_stages})


    count = 0
    for name, dtype in DTYPES.items():
        cfg = fz.default_config(dtype, False)
        p = "*" + name
        prec = launch.dot_precision(dtype)
        bn, bv, bd, bo = cfg["BLOCK_N"], cfg["BLOCK_V"], cfg["BLOCK_D"], cfg["BLOCK_O"]
        variants = ((False, False, False, True, True), (True, True, False, False, False),
                    (False, False, True, True, True), (False, False, False, True, False))
        for bias, cap, flat, even, tma in variants:
            fwd = {"H": p, "W": p, "Bias": p, "T": "*i64", "PART": "*fp32", "HD": desc(p, tma and (bn, bd)),
                   "WD": desc(p, tma and (bv, bd)), "N": "i32", "V": "i32", "D": "i32", "stride_h": "i32",
                   "stride_w": "i32", "vb_per_split": "i32", "softcap": "fp32"}
            compile_one(fz._fwd_stats_kernel, fwd, dict(
                HAS_BIAS=bias, HAS_SOFTCAP=cap, BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=bd, EVEN_D=even, DOT_PRECISION=prec,
                FLATTEN=flat, TMA_H=tma, TMA_W=tma), cfg["num_warps"], cfg["num_stages"])
            count += 1
        modes = ("fp32",) if dtype == torch.float32 else ("native", "atomic", "fp32_hidden", "fp32")
        # + the H100/H200 halves tile (128 x 256 as two halves: hardware atomics, every row, TMA)
        wide = fz.default_config(dtype, False, 2048, 227 * 1024, wide_backward=True)
        halves_runs = [] if dtype == torch.float32 else [("atomic", wide, (False, False, False, False, True)),
                                                          ("atomic", wide, (True, True, False, True, True))]
        variants = ((False, False, False, False, True), (True, True, True, True, False))
        runs = [(m, cfg, v) for m in modes for v in variants]
        for mode, c, (bias, cap, idx, filt, even) in runs + halves_runs:
            bn, bv, bd, bo = c["BLOCK_N"], c["BLOCK_V"], c["BLOCK_D"], c["BLOCK_O"]
            bvw = bv // 2 if c["HALVES"] else bv
            tma_w, tma_h = even, even and not idx  # as the launcher: selected rows are gathered with pointers
            sig = {"H": p, "W": p, "Bias": p, "T": "*i64", "LSE": "*fp32", "WROW": "*fp32", "IDX": "*i64",
                   "DH": p, "DW": p, "DB": "*fp32", "CT": "*fp32", "LOCK_H": "*i32", "LOCK_W": "*i32",
                   "HD": desc(p, tma_h and (bn, bd)), "WD": desc(p, tma_w and (bvw, bd)),
                   "HOD": desc(p, tma_h and (bn, bo)), "WOD": desc(p, tma_w and (bvw, bo)), "R": "i32",
                   "V": "i32", "D": "i32", "stride_h": "i32", "stride_w": "i32", "softcap": "fp32",
                   "filter_eps": "fp32"}
            dh32 = mode in ("fp32_hidden", "fp32")
            if dh32:
                sig["DH"] = "*fp32"
            if mode == "fp32":
                sig["DW"] = "*fp32"
            compile_one(fz._bwd_kernel, sig, dict(
                HAS_BIAS=bias, HAS_SOFTCAP=cap, HAS_IDX=idx, COMPUTE_DH=True, COMPUTE_DW=True,
                COMPUTE_DB=bias, DH_ATOMIC=dh32 or mode == "atomic", DW_ATOMIC=mode in ("fp32", "atomic"),
                FILTER=filt, BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=bd, BLOCK_O=bo, GROUP_N=c["GROUP_N"], EVEN_D=even,
                EVEN_O=even, DOT_PRECISION=prec, TMA_H=tma_h, TMA_W=tma_w, PROD_STAGES=c["PROD_STAGES"],
                HALVES=c["HALVES"]), c["num_warps"], c["num_stages"])
            count += 1
        fix = {"DH": p, "W": p, "T": "*i64", "IDX": "*i64", "CT": "*fp32", "D": "i32", "stride_h": "i32",
               "stride_w": "i32"}
        compile_one(fz._target_fixup_kernel, fix, dict(HAS_IDX=True, BLOCK=1024), 4, 1)
        count += 1
    for name, dtype in DTYPES.items():  # split backward (bwd='split')
        cfg = sp.split_config(dtype, False)
        p = "*" + name
        prec = launch.dot_precision(dtype)
        acc = p if dtype != torch.float32 else "*fp32"
        base = {"H": p, "W": p, "Bias": p, "T": "*i64", "LSE": "*fp32", "WROW": "*fp32", "IDX": "*i64"}
        bd, bo = cfg["BLOCK_D"], cfg["BLOCK_O"]
        hn, hv, wn, wv = cfg["DH_BLOCK_N"], cfg["DH_BLOCK_V"], cfg["DW_BLOCK_N"], cfg["DW_BLOCK_V"]
        for bias, cap, idx, filt, even in ((False, False, False, False, True), (True, True, True, True, False)):
            tma_w, tma_h = even, even and not idx
            dw = {**base, "DW": acc, "DB": "*fp32", "HD": desc(p, tma_h and (wn, bd)),
                  "WD": desc(p, tma_w and (wv, bd)), "HOD": desc(p, tma_h and (wn, bo)), "R": "i32",
                  "V": "i32", "D": "i32", "stride_h": "i32", "stride_w": "i32", "softcap": "fp32", "filter_eps": "fp32"}
            dh = {**base, "DH": acc, "CT": "*fp32", "LOCK": "*i32", "HD": desc(p, tma_h and (hn, bd)),
                  "WD": desc(p, tma_w and (hv, bd)), "WOD": desc(p, tma_w and (hv, bo)), "R": "i32", "V": "i32",
                  "D": "i32", "stride_h": "i32", "stride_w": "i32", "vb_per_split": "i32", "softcap": "fp32",
                  "filter_eps": "fp32"}
            common = dict(HAS_BIAS=bias, HAS_SOFTCAP=cap, HAS_IDX=idx, FILTER=filt, BLOCK_D=bd, BLOCK_O=bo,
                          EVEN_D=even, EVEN_O=even, DOT_PRECISION=prec, TMA_H=tma_h, TMA_W=tma_w,
                          PROD_STAGES=cfg["PROD_STAGES"])
            compile_one(sp._bwd_dw_kernel, dw, dict(common, COMPUTE_DW=True, COMPUTE_DB=bias,
                        BLOCK_N=cfg["DW_BLOCK_N"], BLOCK_V=cfg["DW_BLOCK_V"]), cfg["num_warps"], cfg["num_stages"])
            count += 1
            for mode in (0, 1, 2, 3):  # exclusive, locked, atomic (16-bit atomics: fp16 / bf16), row-block lock
                compile_one(sp._bwd_dh_kernel, dh, dict(common, MODE=mode, BLOCK_N=cfg["DH_BLOCK_N"],
                            BLOCK_V=cfg["DH_BLOCK_V"]), cfg["num_warps"], cfg["num_stages"])
                count += 1
        acc = p if name == "bf16" else "*fp32"  # fp16: O accumulated in fp32
        for bias, cap, even in ((False, False, True), (True, True, False)):  # bwd='split_fwd' forward
            fdh = {"H": p, "W": p, "Bias": p, "T": "*i64", "PART": "*fp32", "DH": acc,
                   "HD": desc(p, even and (hn, bd)), "WD": desc(p, even and (hv, bd)),
                   "WOD": desc(p, even and (hv, bo)), "N": "i32", "V": "i32", "D": "i32", "stride_h": "i32",
                   "stride_w": "i32", "softcap": "fp32"}
            compile_one(sp._fwd_dh_kernel, fdh, dict(
                HAS_BIAS=bias, HAS_SOFTCAP=cap, BLOCK_N=hn, BLOCK_V=hv, BLOCK_D=bd, BLOCK_O=bo, EVEN_D=even,
                EVEN_O=even, DOT_PRECISION=prec, TMA_H=even, TMA_W=even, PROD_STAGES=cfg["PROD_STAGES"]),
                cfg["num_warps"], cfg["num_stages"])
            count += 1
        fin = {"DH": acc, "W": p, "T": "*i64", "WROW": "*fp32", "PART": "*fp32", "STATS": "*fp32", "N": "i32",
               "D": "i32", "stride_h": "i32", "stride_w": "i32", "softcap": "fp32", "ignore_index": "i32"}
        compile_one(sp._fwd_dh_finalise_kernel, fin, dict(HAS_SOFTCAP=True, BLOCK=1024), 4, 1)
        count += 1
    merge = {"PART": "*fp32", "STATS": "*fp32", "T": "*i64", "N": "i32", "S": "i32", "ignore_index": "i32"}
    compile_one(fz._merge_kernel, merge, dict(BLOCK=1024), 4, 1)
    print("compiled", count + 1)
    """
)


def _ptxas_available() -> bool:
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    return os.path.exists(bundled) or os.environ.get("TRITON_PTXAS_PATH") is not None


@pytest.mark.skipif(not _ptxas_available(), reason="triton's bundled ptxas is missing")
def test_fused_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(root, "src"), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, cwd=root,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    assert "compiled" in r.stdout
