"""Sum of the k per-slot rows of each token (Triton): the last step of the MoE forward and of its dx.

Shape legend: N tokens, k slots per token, M = N·k (token, slot) rows in pair order (row t·k + slot), D columns.

Forward only (no autograd: the callers sit inside :class:`cggr.kernels.grouped_gemm._GroupedExpertMLP`)::

    out[t] = Σ_slot rows[t·k + slot]     fp32 accumulation in slot order, one rounding; 0 for null-routed tokens
                                         (their rows are never written by the expert kernels and are not read)

One program per token, 16-byte vector loads along D: a bandwidth-bound pass (reads M·D, writes N·D elements).
This module imports Triton at the top: import it only where Triton is known to be importable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["sum_slots"]


@triton.jit
def _sum_slots_kernel(rows_ptr, routed_ptr, out_ptr, D, stride_r, stride_o, K: tl.constexpr,
                      HAS_ROUTED: tl.constexpr, BD: tl.constexpr):
    t = tl.program_id(0)
    if HAS_ROUTED:
        d_eff = tl.where(tl.load(routed_ptr + t) != 0, D, 0)  # 0: a null-routed token, nothing is read
    else:
        d_eff = D
    src = rows_ptr + t.to(tl.int64) * K * stride_r
    dst = out_ptr + t.to(tl.int64) * stride_o
    for d0 in range(0, D, BD):
        cols = d0 + tl.arange(0, BD)
        acc = tl.zeros((BD,), dtype=tl.float32)
        for j in range(K):
            acc += tl.load(src + j * stride_r + cols, mask=cols < d_eff, other=0.0).to(tl.float32)
        tl.store(dst + cols, acc.to(out_ptr.dtype.element_ty), mask=cols < D)


def sum_slots(rows: torch.Tensor, routed: torch.Tensor | None, top_k: int) -> torch.Tensor:
    """(M, D) per-(token, slot) rows -> (N, D) sums over the k slots, 0 where ``routed`` is False.

    Args:
        rows: (N·k, D), unit column stride.
        routed: (N,) bool or None (every token routed).
        top_k: k.
    """
    if rows.dim() != 2 or rows.shape[0] % top_k or rows.stride(1) != 1:
        raise ValueError(f"rows must be (N·{top_k}, D) with unit column stride, got {tuple(rows.shape)} "
                         f"strides {rows.stride()}")
    n_tok, d = rows.shape[0] // top_k, rows.shape[1]
    out = torch.empty(n_tok, d, device=rows.device, dtype=rows.dtype)
    if n_tok:
        flags = routed.contiguous().view(torch.uint8) if routed is not None else out
        _sum_slots_kernel[(n_tok,)](rows, flags, out, d, rows.stride(0), out.stride(0), K=top_k,
                                    HAS_ROUTED=routed is not None, BD=min(2048, max(128, triton.next_power_of_2(d))),
                                    num_warps=4)
    return out
