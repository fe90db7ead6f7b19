"""Minimal-memory Triton path of ``cggr.functional.linear_cross_entropy`` (``options.kernel='fused'``).

Shape legend: N tokens, H hidden size, V vocabulary, K_max static bound on the selected rows, BN / BV / BD
tile sizes along N / V / H, S vocabulary splits of the forward, R = N or K_max rows of the backward.

Nothing of size [N, V] (not even a bounded chunk of it) and no fp32 [N, H] or [V, H] accumulator exists by
default: the logits live only as register tiles, as in Cut Cross-Entropy (CCE, apple/ml-cross-entropy); the
gradient outputs themselves are the accumulators.

Forward (scores of every token, no gradient; two kernels)::

    _fwd_stats_kernel   grid (N / BN, S): a program owns BN rows and one contiguous vocabulary range
        for each [BN, BV] tile of its range:
            z = hidden[rows] @ weight[cols].T (+ bias) (softcap)      tl.dot over H in BD steps, fp32
            online per-row statistics, all fp32 [BN]:
                ref (running max), s = Σ exp(z - ref), t = Σ exp(z - ref)·(z - ref)·log2(e),
                exact top-2 (a1 >= a2), target logit zt
        part[6, S, N] <- (ref, s, t, a1, a2, zt)
    _merge_kernel       grid (N / 1024): the S partial states of each row merged (rescaled to the global max)
        stats[5, N] = lse, entropy, confidence, margin, nll          (same formulas as kernels/_utils.py)

Backward (gradients of Σ_n w_n · nll_n over R rows: all N at ratio 1, or the K_max compact selected rows
``idx`` with zero-weight padding; w_n already holds grad_out · (1/K or 1) · fp16 pre-scale)::

    _bwd_kernel         grid (R / BN · V / BV), grouped by GROUP_N row blocks (L2 reuse of weight tiles)
        skip the tile when every row weight is 0 (ignored / padding rows: exact)
        z = hidden[rows] @ weight[cols].T (+ bias) (softcap)          recomputed, fp32
        g = (exp(z - lse) - onehot(target)) · w_row (· (1 - (z_capped / softcap)²))      [BN, BV] fp32
        [optional gradient filter: skip the tile when max |exp(z - lse) - onehot| < filter_eps]
        d_bias[cols] += Σ_rows g                                      fp32 atomics
        c_t[rows] = g[row, target]   (only the tile that holds the row's target writes it)     [R] fp32
        g' = g with the target column zeroed
        for each BO-wide column chunk c of H (start rotated per program to spread lock traffic):
            d_hidden[rows, c] += g' @ weight[cols, c]                 [BN, BO], fp32 tile product
            d_weight[cols, c] += g.T @ hidden[rows, c]                [BV, BO]
        an add is a locked read-add-write in the output dtype ('native'), or an fp32 atomic add into an
        fp32 buffer cast at the end ('fp32_hidden': d_hidden only, 'fp32': both)
    _target_fixup_kernel grid (R): d_hidden[row] += c_t[row] · weight[target[row]]   (fp32, one rounding)

With ``HALVES`` (the H100/H200 default where the adds are atomic: a 128 x 256 tile) every tile of _bwd_kernel is
computed as two 128-column halves with the filter, sums and products per half
(:mod:`cggr.kernels.linear_cross_entropy_fused_halves`). The tile-level helpers (logits tile, gradient epilogue,
products) shared with the split backward are in :mod:`cggr.kernels._linear_ce_tiles`.

Error model of the 'native' accumulation (bf16/fp16 outputs). Every tile partial is an fp32 sum (the tile
GEMM of g rounded once to the input dtype, as in the chunked path); the partials of one output element are added
in the output dtype, one rounding per add: d_hidden[n, :] receives ceil(V / BV) partials, d_weight[v, :]
ceil(R / BN). With unit roundoff u (2^-8 bf16, 2^-11 fp16) an element after m adds is off by at most
u · Σ_k |S_k| (S_k the running sums), for independent roundings about u · |S_m| · sqrt(m / 3) in the RMS; an
addend below half an ulp of the running sum is lost whole. That is why the target column (coefficient
w · (p_t - 1), the largest term by far) is kept out of the d_hidden accumulation and added last in fp32: the
running sums are then E_n = w_n · Σ_{v != t} p_nv · weight[v] only, which shrink with (1 - p_t) (no
cancellation when the model is confident) and are ~sqrt(Σ p²) of |weight[t]| when the softmax is spread
out over many tiles (m large), so the accumulation error is u · sqrt(m / 3) relative to |E_n|, not to d_hidden.
d_weight keeps the target terms in its running sums (m = R / BN adds, far fewer). 'fp32_hidden' costs N·H·4
extra bytes and makes d_hidden fp32-accumulated; 'fp32' costs (N + V)·H·4 and does both. 'atomic' has the
error model of 'native' but adds with the hardware's 16-bit atomics (atom.add.noftz.bf16 / .f16: bf16 needs
sm_90 and a Triton with bf16 atomic_add) instead of locks: no lock round trips, no read-back to the SM.

The optional gradient filter (off by default) is CCE's: a tile is skipped when every |p - onehot| < eps;
the skipped gradient per element is then bounded by eps · Σ_{skipped tiles} (|w| · Σ |other operand|).

Locks ('native'): one int32 per (row block, H chunk) of d_hidden and per (vocabulary block, H chunk) of
d_weight; a lock is taken with an atomic compare-and-swap spin, the read bypasses L1 (``.cg``), a CTA barrier
precedes the release. fp32 buffers ('fp32_hidden', 'fp32', fp32 inputs) and 'atomic' use atomic adds instead.

GEMM efficiency on sm_90 (H100 / H200; ``benchmarks/sweep_fused_tiles.py --static`` prints the compile facts).
Every tile product lowers to an asynchronous warp-group MMA (``warp_group_dot``, 64-row MMAs per warp group).
The logits GEMM loop (over H, BD deep) is the innermost loop of its tile and is software-pipelined
``num_stages`` deep; where the rows of hidden / weight are 16-byte aligned (H % 8 == 0 for 16-bit inputs) its
operands come through TMA descriptors (host-side ``TensorDescriptor``: one thread issues a block copy, no
per-thread addresses, out-of-bounds rows / columns zero-filled), which frees registers for the epilogue (the bare
GEMM loop of a 128 x 128 tile: 150 -> 90 per thread; a 128 x 256 forward tile no longer spills); selected rows
(ratio < 1) are gathered with pointers. The backward's product loops (over the H chunks)
are pipelined too (PROD_STAGES deep) where they have no lock ('atomic', fp32 buffers, the split backward's
exclusive adds): the SRC chunk is addressed from the loop index only. With locks ('native') the spin loop keeps
the pipeliner out: the next chunk is prefetched into registers and the MMA is issued before the lock is taken.
The kernels are bound by on-chip operand traffic (L2 -> SM bytes per MAC: (1/BV + 1/BN) · 2 for the logits GEMM)
more than by MMA issue, hence the large tiles; tile choices are :func:`default_config`'s (a sweep overrides them).

This backward ('tiled', ``LinearCrossEntropyOptions(bwd='tiled')``, the default) is one schedule;
:mod:`cggr.kernels.linear_cross_entropy_fused_split` (``bwd='split'``) is the other: one kernel per gradient
output, every output row owned by one program (no locks), at the price of a second logits recompute.

The public entry point (argument checks, selection, autograd) is :func:`cggr.functional.linear_cross_entropy`.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from cggr.functional import ACCUMULATE_MODES
from cggr.kernels._linear_ce_tiles import (
    _live_max,
    _logits_tile,
    _product_add,
    _softmax_grad,
    _tile_columns,
    _tile_sums,
    _weighted,
)
from cggr.kernels._utils import LN2, LOG2E, NEG_BIG
from cggr.kernels.linear_cross_entropy_fused_halves import _bwd_tile_halves

try:  # host-side TMA descriptors (Triton >= 3.4); without them every tile is loaded through pointers
    from triton.tools.tensor_descriptor import TensorDescriptor as _TensorDescriptor
except ImportError:
    _TensorDescriptor = None


# ---------------------------------------------------------------------------------------------- forward
@triton.jit
def _fwd_fold(z, cols, tgt, ref, s, t, a1, a2, zt, BLOCK_V: tl.constexpr):
    """One [BN, BV] logits tile ``z`` (masked columns at -inf) folded into the online row state
    (ref, s, t, a1, a2, zt); also returns e = exp(z - new_ref) of the tile (0 on masked columns).

    ``cols`` [BV] and ``tgt`` [BN] only mark the target column (``cols == tgt``): int32 indices local to the
    tile, ``cols = arange(BV)`` and ``tgt = target - first column`` (no target in the tile: outside [0, BV)),
    cheaper in registers than int64 ones."""
    # exact top-2 of the tile, merged into (a1, a2)
    t1 = tl.max(z, axis=1)
    is_top = z == t1[:, None]
    n_top = tl.sum(is_top.to(tl.int32), axis=1)
    t2 = tl.max(tl.where(is_top, NEG_BIG, z), axis=1)
    t2 = tl.where(n_top >= 2, t1, t2)
    a2 = tl.maximum(tl.minimum(a1, t1), tl.maximum(a2, t2))
    a1 = tl.maximum(a1, t1)
    # online Σ exp and Σ exp·(z - ref) (log2 units), rescaled when the reference moves
    new_ref = tl.maximum(ref, t1)
    shift2 = (ref - new_ref) * LOG2E  # <= 0, finite
    alpha = tl.exp2(shift2)
    t = alpha * (t + shift2 * s)
    s = alpha * s
    d2 = z * LOG2E - (new_ref * LOG2E)[:, None]
    d2 = tl.maximum(d2, NEG_BIG, propagate_nan=tl.PropagateNan.ALL)  # -inf logits (a -inf bias): e · d2 = 0, not NaN
    e = tl.exp2(d2)
    s = s + tl.sum(e, axis=1)
    t = t + tl.sum(e * d2, axis=1)
    # target logit: only a tile that holds some row's target column does the [BN, BV] compare (with random targets
    # most tiles hold none: 1 - (1 - BV / V)^BN of them do)
    if tl.max(((tgt >= 0) & (tgt < BLOCK_V)).to(tl.int32), axis=0) > 0:
        zt = tl.maximum(zt, tl.max(tl.where(cols[None, :] == tgt[:, None], z, NEG_BIG), axis=1))
    return new_ref, s, t, a1, a2, zt, e


@triton.jit
def _fwd_tile(H, W, Bias, HD, WD, rows, row_mask, row0, tgt, vb, V, D, stride_h, stride_w, softcap,
              ref, s, t, a1, a2, zt, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
              TMA_H: tl.constexpr, TMA_W: tl.constexpr):
    """One [BN, BV] logits tile folded into the online row state (ref, s, t, a1, a2, zt)."""
    col0 = vb * BLOCK_V
    lcols, cols, col_mask = _tile_columns(col0, V, BLOCK_V)
    z = _logits_tile(H, W, Bias, HD, WD, rows, row_mask, row0, cols, col_mask, col0, D, stride_h, stride_w, softcap,
                     HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, EVEN_D, DOT_PRECISION, TMA_H, TMA_W)
    # columns past V: -inf, zero probability like a -inf logit (a finite stand-in would count as the row maximum
    # of a tile whose real columns are all -inf); _fwd_fold clamps exp's argument, so e · d2 stays 0
    z = tl.where(col_mask[None, :], z, float("-inf"))
    ref, s, t, a1, a2, zt, _e = _fwd_fold(z, lcols, tgt - col0, ref, s, t, a1, a2, zt, BLOCK_V)
    return ref, s, t, a1, a2, zt


@triton.jit(do_not_specialize=["vb_per_split"])  # a per-shape value: no recompile per N
def _fwd_stats_kernel(
    H, W, Bias, T, PART, HD, WD, N, V, D, stride_h, stride_w, vb_per_split, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr, FLATTEN: tl.constexpr,
    TMA_H: tl.constexpr, TMA_W: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    row0 = pid_n * BLOCK_N
    rows = (row0 + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_mask = rows < N
    tgt = tl.load(T + rows, mask=row_mask, other=-1)
    tgt = tl.where((tgt >= 0) & (tgt < V), tgt, -1).to(tl.int32)  # int32 (V < 2^31); -1: no target column
    ref = tl.full((BLOCK_N,), NEG_BIG, tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    t = tl.zeros((BLOCK_N,), tl.float32)
    a1 = tl.full((BLOCK_N,), NEG_BIG, tl.float32)
    a2 = tl.full((BLOCK_N,), NEG_BIG, tl.float32)
    zt = tl.full((BLOCK_N,), NEG_BIG, tl.float32)
    n_vb = tl.cdiv(V, BLOCK_V)
    vb0 = pid_s * vb_per_split
    vb1 = tl.minimum(vb0 + vb_per_split, n_vb)
    if FLATTEN:  # tile loop and GEMM loop flattened into one pipelined loop (Triton >= 3.3 on Hopper)
        for vb in tl.range(vb0, vb1, flatten=True):
            ref, s, t, a1, a2, zt = _fwd_tile(H, W, Bias, HD, WD, rows, row_mask, row0, tgt, vb, V, D, stride_h,
                                              stride_w, softcap, ref, s, t, a1, a2, zt, HAS_BIAS, HAS_SOFTCAP,
                                              BLOCK_N, BLOCK_V, BLOCK_D, EVEN_D, DOT_PRECISION, TMA_H, TMA_W)
    else:
        for vb in range(vb0, vb1):
            ref, s, t, a1, a2, zt = _fwd_tile(H, W, Bias, HD, WD, rows, row_mask, row0, tgt, vb, V, D, stride_h,
                                              stride_w, softcap, ref, s, t, a1, a2, zt, HAS_BIAS, HAS_SOFTCAP,
                                              BLOCK_N, BLOCK_V, BLOCK_D, EVEN_D, DOT_PRECISION, TMA_H, TMA_W)
    stride_k = tl.num_programs(1) * N  # PART is [6, S, N]
    base = PART + pid_s * N + rows
    tl.store(base, ref, mask=row_mask)
    tl.store(base + stride_k, s, mask=row_mask)
    tl.store(base + 2 * stride_k, t, mask=row_mask)
    tl.store(base + 3 * stride_k, a1, mask=row_mask)
    tl.store(base + 4 * stride_k, a2, mask=row_mask)
    tl.store(base + 5 * stride_k, zt, mask=row_mask)


@triton.jit
def _merge_kernel(PART, STATS, T, N, S, ignore_index, BLOCK: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    mask = rows < N
    stride_k = S * N
    m = tl.full((BLOCK,), NEG_BIG, tl.float32)
    for k in range(0, S):
        m = tl.maximum(m, tl.load(PART + k * N + rows, mask=mask, other=NEG_BIG))
    s_tot = tl.zeros((BLOCK,), tl.float32)
    t_tot = tl.zeros((BLOCK,), tl.float32)
    a1 = tl.full((BLOCK,), NEG_BIG, tl.float32)
    a2 = tl.full((BLOCK,), NEG_BIG, tl.float32)
    zt = tl.full((BLOCK,), NEG_BIG, tl.float32)
    for k in range(0, S):
        p = PART + k * N + rows
        ref = tl.load(p, mask=mask, other=NEG_BIG)
        s = tl.load(p + stride_k, mask=mask, other=1.0)  # 1 on masked rows: no log(0) there
        t = tl.load(p + 2 * stride_k, mask=mask, other=0.0)
        b1 = tl.load(p + 3 * stride_k, mask=mask, other=NEG_BIG)
        b2 = tl.load(p + 4 * stride_k, mask=mask, other=NEG_BIG)
        shift2 = (ref - m) * LOG2E
        c = tl.exp2(shift2)
        s_tot += c * s
        t_tot += c * (t + shift2 * s)
        a2 = tl.maximum(tl.minimum(a1, b1), tl.maximum(a2, b2))
        a1 = tl.maximum(a1, b1)
        zt = tl.maximum(zt, tl.load(p + 5 * stride_k, mask=mask, other=NEG_BIG))
    log_s = tl.log(s_tot)
    lse = m + log_s
    entropy = tl.maximum(log_s - (t_tot * LN2) / s_tot, 0.0, propagate_nan=tl.PropagateNan.ALL)
    conf = tl.exp(a1 - lse)
    margin = conf - tl.exp(a2 - lse)
    tgt = tl.load(T + rows, mask=mask, other=ignore_index)
    nll = tl.where(tgt != ignore_index, lse - zt, 0.0)
    tl.store(STATS + rows, lse, mask=mask)
    tl.store(STATS + N + rows, entropy, mask=mask)
    tl.store(STATS + 2 * N + rows, conf, mask=mask)
    tl.store(STATS + 3 * N + rows, margin, mask=mask)
    tl.store(STATS + 4 * N + rows, nll, mask=mask)


# ---------------------------------------------------------------------------------------------- backward
@triton.jit
def _bwd_kernel(
    H, W, Bias, T, LSE, WROW, IDX, DH, DW, DB, CT, LOCK_H, LOCK_W, HD, WD, HOD, WOD,
    R, V, D, stride_h, stride_w, softcap, filter_eps,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_IDX: tl.constexpr,
    COMPUTE_DH: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
    DH_ATOMIC: tl.constexpr, DW_ATOMIC: tl.constexpr, FILTER: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_O: tl.constexpr,
    GROUP_N: tl.constexpr, EVEN_D: tl.constexpr, EVEN_O: tl.constexpr, DOT_PRECISION: tl.constexpr,
    TMA_H: tl.constexpr, TMA_W: tl.constexpr, PROD_STAGES: tl.constexpr, HALVES: tl.constexpr,
):
    pid = tl.program_id(0)
    n_nb = tl.cdiv(R, BLOCK_N)
    n_vb = tl.cdiv(V, BLOCK_V)
    per_group = GROUP_N * n_vb
    first_n = (pid // per_group) * GROUP_N
    group_size = tl.minimum(n_nb - first_n, GROUP_N)
    pid_n = first_n + (pid % per_group) % group_size
    pid_v = (pid % per_group) // group_size

    row0 = pid_n * BLOCK_N
    offs_r = (row0 + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_mask = offs_r < R
    if HAS_IDX:
        rows = tl.load(IDX + offs_r, mask=row_mask, other=0).to(tl.int64)
    else:
        rows = offs_r
    w_row = tl.load(WROW + rows, mask=row_mask, other=0.0)
    if tl.max(tl.abs(w_row), axis=0) == 0.0:
        return  # ignored or padding rows only: their gradient is exactly zero
    col0 = pid_v * BLOCK_V
    lse = tl.load(LSE + rows, mask=row_mask, other=0.0)
    tgt = tl.load(T + rows, mask=row_mask, other=-1)
    if HALVES:
        _bwd_tile_halves(H, W, Bias, HD, WD, HOD, WOD, DH, DW, DB, CT, rows, offs_r, row_mask, row0, col0, lse, tgt,
                         w_row, pid_n, pid_v, V, D, stride_h, stride_w, softcap, filter_eps, HAS_BIAS, HAS_SOFTCAP,
                         COMPUTE_DH, COMPUTE_DW, COMPUTE_DB, FILTER, BLOCK_N, BLOCK_V // 2, BLOCK_D, BLOCK_O, EVEN_D,
                         EVEN_O, DOT_PRECISION, TMA_H, TMA_W, PROD_STAGES)
    else:  # (an early return in a compile-time branch does not stop the code after it from being compiled)
        lcols, cols, col_mask = _tile_columns(col0, V, BLOCK_V)
        zc = _logits_tile(H, W, Bias, HD, WD, rows, row_mask, row0, cols, col_mask, col0, D, stride_h, stride_w,
                          softcap, HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, EVEN_D, DOT_PRECISION, TMA_H,
                          TMA_W)
        g, is_t, ltgt = _softmax_grad(zc, lse, tgt, col0, lcols, col_mask, BLOCK_V)
        if FILTER:  # noqa: SIM102 - a compile-time branch around a runtime one: Triton's `and` would mix them
            if _live_max(g, w_row) < filter_eps:
                return
        g = _weighted(g, zc, w_row, softcap, HAS_SOFTCAP)
        _tile_sums(g, is_t, ltgt, cols, col_mask, DB, CT, offs_r, row_mask, COMPUTE_DB, COMPUTE_DH)
        gb = g.to(H.dtype.element_ty)
        if COMPUTE_DH:  # without the target column (its coefficient is in CT)
            gh = tl.where(is_t, 0.0, g).to(H.dtype.element_ty)
        n_oc = tl.cdiv(D, BLOCK_O)
        # rotated start chunk: the programs that share a lock row (same row block for d_hidden, same vocabulary
        # block for d_weight) differ in the other tile index and so take different locks first
        if COMPUTE_DH:
            _product_add(gh, W, WOD, cols, col_mask, col0, DH, rows, row_mask, LOCK_H + pid_n * n_oc, pid_v, D,
                         stride_w, stride_h, w_row, 2 if DH_ATOMIC else 1, BLOCK_O, EVEN_O, DOT_PRECISION, False,
                         TMA_W, PROD_STAGES)
        if COMPUTE_DW:
            _product_add(tl.trans(gb), H, HOD, rows, row_mask, row0, DW, cols, col_mask, LOCK_W + pid_v * n_oc,
                         pid_n, D, stride_h, stride_w, w_row, 2 if DW_ATOMIC else 1, BLOCK_O, EVEN_O, DOT_PRECISION,
                         False, TMA_H, PROD_STAGES)


@triton.jit
def _target_fixup_kernel(DH, W, T, IDX, CT, D, stride_h, stride_w, HAS_IDX: tl.constexpr, BLOCK: tl.constexpr):
    """d_hidden[row] += c_row · weight[target_row] in fp32, one rounding (c_row = 0: nothing to add)."""
    r = tl.program_id(0).to(tl.int64)
    c = tl.load(CT + r)
    if c != 0.0:
        if HAS_IDX:
            row = tl.load(IDX + r).to(tl.int64)
        else:
            row = r
        tgt = tl.load(T + row).to(tl.int64)  # in [0, V): c is only written by the tile holding the target
        offs = tl.arange(0, BLOCK)
        for d0 in range(0, D, BLOCK):
            m = (offs + d0) < D
            dh_ptrs = DH + row * stride_h + d0 + offs
            dh = tl.load(dh_ptrs, mask=m, other=0.0).to(tl.float32)
            wt = tl.load(W + tgt * stride_w + d0 + offs, mask=m, other=0.0).to(tl.float32)
            tl.store(dh_ptrs, (dh + c * wt).to(DH.dtype.element_ty), mask=m)


# ---------------------------------------------------------------------------------------------- launchers
def default_config(
    dtype: torch.dtype,
    interpret: bool,
    hidden_size: int | None = None,
    smem_bytes: int | None = None,
    *,
    wide_backward: bool = False,
) -> dict:
    """Tile heuristic of the forward (:func:`forward_stats`) and the tiled backward (:func:`backward_selected`).

    16-bit inputs: 128 x 128 tiles, 64-deep GEMM steps, 8 warps (two warp groups, each a 64-row warp-group MMA
    on sm_90), 3 pipeline stages (96 KiB of shared memory), operands through TMA descriptors where the rows are
    16-byte aligned (``TMA``; H % 8 == 0). Where the GPU gives a block >= 200 KiB of shared memory (H100 / H200
    class) the tiles are the winners of a tile sweep (the measurements: docs/linear_cross_entropy.md, "Tile
    choices"): the forward takes a 128 x 256 tile (``FWD_BLOCK_V=256``, 144 KiB) for H > 1024, only with TMA
    operands (H % 8 == 0: it spills through pointer loads), and four warps (``FWD_num_warps=4``) for H <= 1024;
    the tiled backward takes 128 x 256 tiles when ``wide_backward`` (hardware atomics: fewer atomic adds per MAC,
    ~ 1 / BLOCK_N + 1 / BLOCK_V), computed as two 128-column halves (``HALVES``) so that the gradient filter
    skips per half, i.e. as often as with 128-wide tiles, at the wide tile's exact speed.
    fp32: 64 x 64 tiles with 32-deep steps (fp32 products run on FMA units, register-bound; fp32 is the
    correctness path, not the fast one). Under the Triton interpreter (CPU) the tiles are 16 x 32, so that tests
    exercise several blocks per axis.

    Args:
        dtype: Input dtype.
        interpret: Whether the Triton interpreter runs the kernels.
        hidden_size: H; ``None``: the H-dependent forward overrides are left out.
        smem_bytes: Shared memory a block may opt in to on the target GPU (:func:`smem_per_block`); ``None``:
            the large-shared-memory overrides are left out.
        wide_backward: Whether the tiled backward adds with hardware atomics (the halves tile needs them).

    Returns:
        Keys: BLOCK_N, BLOCK_V, BLOCK_D (GEMM depth step), BLOCK_O (H chunk of the backward products), GROUP_N,
        HALVES (the backward's tile as two halves of BLOCK_V / 2 columns; atomic adds only), num_warps,
        num_stages, PROD_STAGES (pipeline depth of the backward's product loops where they are pipelined:
        'atomic' / fp32 accumulation), TMA; optional forward-only overrides FWD_BLOCK_N, FWD_BLOCK_V,
        FWD_BLOCK_D, FWD_num_warps, FWD_num_stages, and FLATTEN (flattened tile loop in the forward, off by
        default). A ``config`` argument of the launchers replaces this dict.
    """
    if interpret:
        return dict(BLOCK_N=16, BLOCK_V=32, BLOCK_D=16, BLOCK_O=16, GROUP_N=2, num_warps=1, num_stages=1,
                    PROD_STAGES=1, TMA=True, HALVES=False)
    if dtype == torch.float32:
        return dict(BLOCK_N=64, BLOCK_V=64, BLOCK_D=32, BLOCK_O=32, GROUP_N=8, num_warps=8, num_stages=2,
                    PROD_STAGES=2, TMA=True, HALVES=False)
    cfg = dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=64, BLOCK_O=64, GROUP_N=8, num_warps=8, num_stages=3,
               PROD_STAGES=3, TMA=True, HALVES=False)
    if hidden_size is not None and smem_bytes is not None and smem_bytes >= LARGE_SMEM_BYTES:
        if hidden_size <= 1024:
            cfg["FWD_num_warps"] = 4
        elif hidden_size % 8 == 0:
            cfg["FWD_BLOCK_V"] = 256
        if wide_backward and hidden_size % 8 == 0:
            cfg.update(BLOCK_V=256, HALVES=True, FWD_BLOCK_V=cfg.get("FWD_BLOCK_V", 128))  # the forward: its own
    return cfg


#: Shared memory per block (opt-in) from which the tile heuristics take the large tiles of the H200 sweep
#: (H100 / H200: 227 KiB; A100: 163 KiB; consumer GPUs: ~99 KiB).
LARGE_SMEM_BYTES = 200 * 1024


@functools.lru_cache(maxsize=16)
def _smem_optin(device_index: int) -> int:
    props = torch.cuda.get_device_properties(device_index)
    optin = getattr(props, "shared_memory_per_block_optin", None)
    if optin is not None:
        return int(optin)
    return 227 * 1024 if props.major >= 9 else 0  # older torch: assume Hopper-class only from sm_90


def smem_per_block(device: torch.device) -> int | None:
    """Shared memory (bytes) a block may opt in to on ``device``; ``None`` off CUDA (interpreter)."""
    if device.type != "cuda":
        return None
    return _smem_optin(device.index if device.index is not None else torch.cuda.current_device())


#: The compiled kernel of the last launch of each main kernel ('fwd_stats', 'bwd_tiled', and the split module's
#: 'bwd_dh', 'bwd_dw', 'fwd_dh'), as Triton's launch returns it: its registers (``n_regs``), spills
#: (``n_spills``), shared memory and TTGIR, for benchmarks/sweep_fused_tiles.py. ``None`` under the interpreter.
LAST_LAUNCHED: dict[str, object] = {}


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=16)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _programs_target(device: torch.device) -> int:
    """Programs the forward aims for (it splits the vocabulary until it has that many): eight per SM, so that
    the last, partial wave costs at most ~1/8 of the time; the partial states cost 24 · S bytes per row."""
    if device.type != "cuda":
        return 8  # interpreter: a few splits, so that the merge is exercised
    return 8 * _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def _on_input_device(fn):
    """Run ``fn(hidden, ...)`` with ``hidden``'s CUDA device current (Triton launches on the current device)."""

    @functools.wraps(fn)
    def wrapper(hidden, *args, **kwargs):
        guard = torch.cuda.device(hidden.device) if hidden.device.type == "cuda" else contextlib.nullcontext()
        with guard:
            return fn(hidden, *args, **kwargs)

    return wrapper


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 inputs: true fp32 products, never TF32


def _tma_usable(cfg: dict, *tensors: Tensor) -> bool:
    """Whether the operand tiles of ``tensors`` (2-D, row-major) can come through TMA descriptors: the config
    allows it (key TMA, default on), this Triton has host-side tensor descriptors, and every tensor is
    non-empty with a 16-byte aligned base and row stride (the hardware's requirement; H % 8 == 0 for 16-bit)."""
    if not cfg.get("TMA", True) or _TensorDescriptor is None:
        return False
    return all(
        t.dim() == 2 and t.numel() > 0 and t.stride(1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0
        and t.data_ptr() % 16 == 0
        for t in tensors
    )


def _descriptor(t: Tensor, block: tuple[int, int], use: bool):
    """A TMA descriptor of the 2-D tensor ``t`` with ``block``-shaped tiles, or ``t`` itself (unused) if not ``use``."""
    return _TensorDescriptor.from_tensor(t, list(block)) if use else t


@_on_input_device
def forward_stats(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    *,
    ignore_index: int,
    softcap: float | None,
    workspace_bytes: int | None = None,
    config: dict | None = None,
    **_unused,
) -> tuple[Tensor, tuple[None, None, None]]:
    """Scores of every row with the logits kept in registers (see the module docstring).

    Args:
        hidden: (N, H) contiguous, float16 / bfloat16 / float32.
        weight: (V, H) contiguous, same dtype.
        bias: (V,) or ``None``.
        targets: (N,) long; ``ignore_index`` rows get nll 0.
        ignore_index: Target value to ignore.
        softcap: ``None`` or the logit soft-cap.
        workspace_bytes: Accepted for signature parity with the chunked kernel; unused (no workspace).
        config: Tile-size override (keys of :func:`default_config`).

    Returns:
        ``(stats, (None, None, None))`` with stats (5, N) fp32 = lse, entropy, confidence, margin, nll.
    """
    if _unused.get("row_weights") is not None:
        raise ValueError("the fused kernel computes gradients in the backward only; row_weights must be None")
    del workspace_bytes
    n, d = hidden.shape
    vocab = weight.shape[0]
    stats = torch.empty(5, n, dtype=torch.float32, device=hidden.device)
    if n == 0:
        return stats, (None, None, None)
    bias = bias.contiguous() if bias is not None else None
    cfg = dict(config or default_config(hidden.dtype, _interpreting(), d, smem_per_block(hidden.device)))
    bn, bv, bd = (cfg.get("FWD_" + k, cfg[k]) for k in ("BLOCK_N", "BLOCK_V", "BLOCK_D"))
    n_nb, n_vb = triton.cdiv(n, bn), triton.cdiv(vocab, bv)
    splits = max(1, min(n_vb, triton.cdiv(_programs_target(hidden.device), n_nb)))
    vb_per_split = triton.cdiv(n_vb, splits)
    splits = triton.cdiv(n_vb, vb_per_split)  # no empty split
    part = torch.empty(6, splits, n, dtype=torch.float32, device=hidden.device)
    tma = _tma_usable(cfg, hidden, weight)
    LAST_LAUNCHED["fwd_stats"] = _fwd_stats_kernel[(n_nb, splits)](
        hidden, weight, bias if bias is not None else hidden, targets, part,
        _descriptor(hidden, (bn, bd), tma), _descriptor(weight, (bv, bd), tma), n, vocab, d,
        hidden.stride(0), weight.stride(0), vb_per_split, float(softcap) if softcap is not None else 1.0,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=bd,
        EVEN_D=d % bd == 0, DOT_PRECISION=_dot_precision(hidden.dtype), FLATTEN=bool(cfg.get("FLATTEN", False)),
        TMA_H=tma, TMA_W=tma,
        num_warps=cfg.get("FWD_num_warps", cfg["num_warps"]), num_stages=cfg.get("FWD_num_stages", cfg["num_stages"]),
    )
    merge_block = 1024 if not _interpreting() else 64
    _merge_kernel[(triton.cdiv(n, merge_block),)](
        part, stats, targets, n, splits, ignore_index, BLOCK=merge_block, num_warps=4,
    )
    return stats, (None, None, None)


def gradient_accumulators(
    hidden: Tensor,
    weight: Tensor,
    accumulate: str,
    need_hidden_grad: bool,
    need_weight_grad: bool,
    need_bias_grad: bool,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, bool, bool]:
    """Zeroed gradient outputs of a fused backward, which the kernels accumulate into.

    d_hidden is fp32 for ``accumulate`` in ('fp32_hidden', 'fp32') or fp32 inputs, d_weight for 'fp32' or fp32
    inputs, else each in its input's dtype; d_bias is always fp32 (it is summed with fp32 atomics / in registers).

    Returns:
        ``(d_hidden (N, H), d_weight (V, H), d_bias (V,), dh_fp32, dw_fp32)``, ``None`` where not needed.
    """
    if accumulate not in ACCUMULATE_MODES:
        raise ValueError(f"accumulate must be one of {ACCUMULATE_MODES}, got {accumulate!r}")
    n, d = hidden.shape
    vocab = weight.shape[0]
    dev, f32 = hidden.device, torch.float32
    dh_fp32 = accumulate in ("fp32_hidden", "fp32") or hidden.dtype == f32
    dw_fp32 = accumulate == "fp32" or hidden.dtype == f32
    d_h = torch.zeros(n, d, dtype=f32 if dh_fp32 else hidden.dtype, device=dev) if need_hidden_grad else None
    d_w = torch.zeros(vocab, d, dtype=f32 if dw_fp32 else weight.dtype, device=dev) if need_weight_grad else None
    d_b = torch.zeros(vocab, dtype=f32, device=dev) if need_bias_grad else None
    return d_h, d_w, d_b, dh_fp32, dw_fp32


def in_input_dtypes(
    d_h: Tensor | None, d_w: Tensor | None, d_b: Tensor | None, hidden: Tensor, weight: Tensor, bias: Tensor | None
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The accumulated gradients cast to the dtypes of ``hidden``, ``weight`` and ``bias`` (no copy if equal)."""
    return (
        d_h.to(hidden.dtype) if d_h is not None else None,
        d_w.to(weight.dtype) if d_w is not None else None,
        d_b.to(bias.dtype) if d_b is not None else None,
    )


@_on_input_device
def backward_selected(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    lse: Tensor,
    row_weights: Tensor,
    idx: Tensor | None,
    *,
    ignore_index: int,
    softcap: float | None,
    workspace_bytes: int | None = None,
    need_hidden_grad: bool,
    need_weight_grad: bool,
    need_bias_grad: bool,
    accumulate: str = "native",
    filter_eps: float | None = None,
    config: dict | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of Σ_n w_n · nll_n from the rows ``idx`` (or all rows), accumulated tile by tile.

    Args:
        hidden, weight, bias, targets: as in :func:`forward_stats`.
        lse: (N,) fp32 log-sum-exp saved by the forward.
        row_weights: (N,) fp32 weights, already multiplied by the upstream gradient; 0 outside the selection.
        idx: (K_max,) long row indices, each at most once (padding rows carry weight 0), or ``None`` for
            every row (ratio 1).
        ignore_index: Unused (ignored rows carry weight 0); kept for signature parity.
        workspace_bytes: Unused (no workspace).
        accumulate: ``'native'``, ``'atomic'``, ``'fp32_hidden'`` or ``'fp32'`` (module docstring: error
            model, memory).
        filter_eps: ``None`` (exact) or CCE's gradient filter threshold.
        config: Tile-size override (keys of :func:`default_config`).

    Returns:
        ``(d_hidden (N, H), d_weight (V, H), d_bias (V,))`` in the input dtype, ``None`` where not needed.
    """
    del ignore_index, workspace_bytes
    n, d = hidden.shape
    vocab = weight.shape[0]
    dev = hidden.device
    d_h, d_w, d_b, dh_fp32, dw_fp32 = gradient_accumulators(
        hidden, weight, accumulate, need_hidden_grad, need_weight_grad, need_bias_grad
    )
    atomic = accumulate == "atomic"
    r = n if idx is None else idx.shape[0]
    bias = bias.contiguous() if bias is not None else None
    if r > 0 and (d_h is not None or d_w is not None or d_b is not None):
        cfg = dict(config or default_config(hidden.dtype, _interpreting(), d, smem_per_block(dev),
                                            wide_backward=atomic))
        bn, bv, bo = cfg["BLOCK_N"], cfg["BLOCK_V"], cfg["BLOCK_O"]
        n_nb, n_vb, n_oc = triton.cdiv(r, bn), triton.cdiv(vocab, bv), triton.cdiv(d, bo)
        lock_h = None if d_h is None or dh_fp32 or atomic else torch.zeros(n_nb * n_oc, dtype=torch.int32, device=dev)
        lock_w = None if d_w is None or dw_fp32 or atomic else torch.zeros(n_vb * n_oc, dtype=torch.int32, device=dev)
        dummy = lse
        c_t = torch.zeros(r, dtype=torch.float32, device=dev) if d_h is not None else dummy  # (R,) target coeffs
        bd = cfg["BLOCK_D"]
        tma_w = _tma_usable(cfg, hidden, weight)
        tma_h = tma_w and idx is None  # selected rows are gathered with pointers
        halves = bool(cfg.get("HALVES", False))
        if halves and not ((d_h is None or dh_fp32 or atomic) and (d_w is None or dw_fp32 or atomic)):
            raise ValueError(f"config HALVES=True adds with atomics only; accumulate={accumulate!r} with "
                             f"{hidden.dtype} inputs takes locks: use accumulate='atomic' or HALVES=False")
        bvw = bv // 2 if halves else bv  # the weight blocks of a halves tile are half tiles
        LAST_LAUNCHED["bwd_tiled"] = _bwd_kernel[(n_nb * n_vb,)](
            hidden, weight, bias if bias is not None else hidden, targets, lse, row_weights,
            idx if idx is not None else targets,
            d_h if d_h is not None else dummy, d_w if d_w is not None else dummy, d_b if d_b is not None else dummy,
            c_t,
            lock_h if lock_h is not None else targets, lock_w if lock_w is not None else targets,
            _descriptor(hidden, (bn, bd), tma_h), _descriptor(weight, (bvw, bd), tma_w),
            _descriptor(hidden, (bn, bo), tma_h), _descriptor(weight, (bvw, bo), tma_w),
            r, vocab, d, hidden.stride(0), weight.stride(0),
            float(softcap) if softcap is not None else 1.0, float(filter_eps) if filter_eps is not None else 0.0,
            HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, HAS_IDX=idx is not None,
            COMPUTE_DH=d_h is not None, COMPUTE_DW=d_w is not None, COMPUTE_DB=d_b is not None,
            DH_ATOMIC=dh_fp32 or atomic, DW_ATOMIC=dw_fp32 or atomic, FILTER=filter_eps is not None,
            BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=bd, BLOCK_O=bo, GROUP_N=cfg["GROUP_N"],
            EVEN_D=d % bd == 0, EVEN_O=d % bo == 0, DOT_PRECISION=_dot_precision(hidden.dtype),
            TMA_H=tma_h, TMA_W=tma_w, PROD_STAGES=cfg.get("PROD_STAGES", cfg["num_stages"]), HALVES=halves,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
        if d_h is not None:
            _target_fixup_kernel[(r,)](
                d_h, weight, targets, idx if idx is not None else targets, c_t, d, d_h.stride(0), weight.stride(0),
                HAS_IDX=idx is not None, BLOCK=min(1024, triton.next_power_of_2(d)), num_warps=4,
            )
    return in_input_dtypes(d_h, d_w, d_b, hidden, weight, bias)
