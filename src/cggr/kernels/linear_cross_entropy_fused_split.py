"""Split backward of the fused linear cross-entropy (``LinearCrossEntropyOptions(kernel='fused', bwd='split')``
and ``bwd='split_fwd'``).

Shape legend: N tokens, H hidden size, V vocabulary, R = N or K_max rows of the backward, BN / BV / BD / BO tile
sizes along rows / vocabulary / the GEMM depth H / the H chunk of the output products, S vocabulary splits of
the d_hidden kernel. One GEMM pass = R·V·H multiply-adds.

The forward is the one of :mod:`cggr.kernels.linear_cross_entropy_fused` (scores, lse). Only the backward
differs: instead of one kernel whose every [BN, BV] tile adds a [BN, H] slice into d_hidden and a [BV, H] slice
into d_weight under locks ('tiled', that module's ``_bwd_kernel``), each output gets its own kernel that OWNS
what it writes:

    _bwd_dw_kernel      grid (V / BV_w): a program owns vocabulary block ``cols`` and loops over every row block
        acc_b = 0                                                      [BV_w] fp32 (bias gradient, registers)
        for each [BN_w] row block with some nonzero row weight:
            g = (softmax(z) - onehot) · w_row (· softcap factor)       z recomputed, [BN_w, BV_w] fp32
            acc_b += Σ_rows g
            for each BO chunk c of H:  d_weight[cols, c] = d_weight[cols, c] + g.T @ hidden[rows, c]
                (a plain load-add-store: no other program touches d_weight[cols]; no lock, no atomic)
        d_bias[cols] = acc_b                                           written once
    _bwd_dh_kernel      grid (R / BN_h, S): a program owns row block ``rows`` and one vocabulary range
        for each [BV_h] vocabulary tile of its range:
            g recomputed as above; c_t[rows] += g[row, target] (registers)
            for each BO chunk c:  d_hidden[rows, c] += (g with the target column zeroed) @ weight[cols, c]
                (S = 1: plain load-add-store, the program owns the rows; S > 1: the S programs of a row
                block add under a lock per (row block, chunk), or with 16-bit atomics ('atomic'))
        CT[rows] = c_t (the split that holds the target)
    _target_fixup_kernel (shared)  d_hidden[row] += c_t[row] · weight[target[row]] in fp32, one rounding

Why (arithmetic and traffic; 16-bit inputs, 4 bytes of read + write per output element per add):

* 'tiled' does 3 GEMM passes (recompute z, g @ W, g.T @ h) but adds partials of every tile into both outputs:
  R·V·H·4·(1/BN + 1/BV) bytes of locked read-modify-write (128 x 128 tiles: R·V·H / 16 bytes, 29 GB at
  (16384, 576, 49152)), each add a lock round trip on a row block that ~16 resident programs share (what that
  costs, measured: docs/linear_cross_entropy.md, "Why a split backward").
* Owning an output row needs its whole reduction in one program. A register accumulator [BN, H] does not fit
  (H = 2048: 512 KiB fp32 at BN = 64), and splitting H into chunks each owned by its own program costs one
  z recompute per chunk (H / BO passes). So the output itself, in its own dtype, is the accumulator, as in
  'tiled', but with ONE owner: no locks, no contention, and a product loop that Triton's software pipeliner
  stages (the SRC chunk through TMA or cp.async, the DST chunk prefetched, PROD_STAGES deep) so that their
  latency overlaps the chunk MMAs.
* The price is a second z recompute: 4 GEMM passes instead of 3 (5 with the forward). The adds are cut to
  R·V·H·4·(1/BV_h + 1/BN_w) bytes with long tiles along the reduction axis (BV_h = BN_w = 256: half of 'tiled'
  at 128 x 128), on [BN_h, H] / [BV_w, H] slices that a program keeps revisiting (L2-friendly).
* Per case (R, H, V) = (16384, 576, 49152) / (8192, 2048, 128256) / (8192, 2304, 256000): 4 GEMM passes plus
  7 / 34 / 75 GB of unlocked read-modify-write in EACH of the two kernels (R·V·H·4 / 256), against 29 / 134 /
  302 GB of locked read-modify-write in 'tiled' (the expected and measured times: docs/linear_cross_entropy.md,
  "Why a split backward").
* The d_hidden kernel has only R / BN_h row blocks (BN_h = 64: 128 at R = 8192, about one per SM; 32 at ratio
  0.25), so where there are fewer than SMs it splits the vocabulary S = max(1, SMs // row blocks) ways, and
  only then takes locks (S writers per row block, start chunk rotated per split, so they rarely meet; or, with
  config DH_LOCK='block', one lock per row block around the tile's pipelined product: with S = 2 one program's
  product overlaps the other's logits recompute).
* The gradient filter (``filter_eps``) skips the products (not the recompute) of tiles below the threshold;
  the target coefficient is kept whole.

``bwd='split_fwd'``: at ratio 1 the row weights are known before the forward (every valid row, 1/N_valid),
so d_hidden needs no second pass over the logits. ``_fwd_dh_kernel`` (grid R / BN_h: one program per row block
over the whole vocabulary, so no vocabulary-split partials to merge) folds each logits tile into the online
statistics AND adds e @ weight[cols] into d_hidden, e = exp(z - ref) off the target column (the softmax's
numerator against the running maximum ref; flash-attention style: the running sum is rescaled by
exp(ref_old - ref_new) in the same read-modify-write when ref moves, i.e. only in the first few tiles of a
row). ``_fwd_dh_finalise_kernel`` then writes w · (O · exp(ref - lse) + (p_t - 1) · weight[t]) per row in fp32
(one rounding). The backward runs only the d_weight kernel: 2 + 2 = 4 GEMM passes for forward + backward,
like 'tiled', with no lock anywhere. Not used when ``filter_eps`` is set (the filter needs the lse) or at
ratio < 1 (the selection needs the scores first: plain 'split'); fp16 accumulates O in fp32 (O is
unnormalised, up to V · |weight|: beyond fp16's range for large V).

Error model: that of 'native' in the fused module, with fewer adds per element: d_hidden[n, :] receives
ceil(V / BV_h) rounded partials (target column excluded, added last in fp32), d_weight[v, :] ceil(R / BN_w).
``accumulate='fp32_hidden'`` / ``'fp32'`` accumulate in fp32 buffers as there (N·H·4 / (N + V)·H·4 extra bytes);
fp32 inputs always do.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from cggr.kernels._linear_ce_launch import (
    LARGE_SMEM_BYTES,
    LAST_LAUNCHED,
    _merge_kernel,
    _target_fixup_kernel,
    descriptor,
    dot_precision,
    gradient_accumulators,
    in_input_dtypes,
    interpreting,
    num_sms,
    on_input_device,
    smem_per_block,
    tma_usable,
)
from cggr.kernels._linear_ce_modes import check_accumulate
from cggr.kernels._linear_ce_tiles import _fwd_fold, _logits_tile, _product_add, _tile_columns, _tile_grad
from cggr.kernels._utils import LOG2E, NEG_BIG

#: Accumulation of the d_hidden kernel: one program per row block (S = 1: plain adds), or S > 1 programs per row
#: block adding under a lock per (row block, H chunk), with atomics, or under one lock per row block held for the
#: tile's whole (pipelined) product (config DH_LOCK='block').
_EXCLUSIVE, _LOCKED, _ATOMIC, _BLOCK_LOCKED = 0, 1, 2, 3


@triton.jit
def _grad_tile(H, W, Bias, HD, WD, rows, row_mask, row0, col0, lse, tgt, w_row, V, D, stride_h, stride_w, softcap,
               filter_eps, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, FILTER: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
               DOT_PRECISION: tl.constexpr, TMA_H: tl.constexpr, TMA_W: tl.constexpr):
    """Recomputed [BN, BV] fp32 gradient of Σ w_n · nll_n w.r.t. the (pre-softcap) logits of the rows ``rows``
    and the columns col0 + [0, BV), its target mask, and with FILTER whether its products are needed (gradient
    filter: not every |softmax - onehot| of a weighted row is below eps); without FILTER the third value is an
    unused scalar (the callers branch on FILTER first). ``tgt`` [BN] int64 targets (negative: none)."""
    lcols, cols, col_mask = _tile_columns(col0, V, BLOCK_V)
    zc = _logits_tile(H, W, Bias, HD, WD, rows, row_mask, row0, cols, col_mask, col0, D, stride_h, stride_w, softcap,
                      HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, EVEN_D, DOT_PRECISION, TMA_H, TMA_W)
    g, is_t, _ltgt, keep = _tile_grad(zc, lse, tgt, col0, lcols, col_mask, w_row, softcap, filter_eps, HAS_SOFTCAP,
                                      FILTER, BLOCK_V)
    return g, is_t, keep


@triton.jit
def _bwd_dw_kernel(
    H, W, Bias, T, LSE, WROW, IDX, DW, DB, HD, WD, HOD, R, V, D, stride_h, stride_w, softcap, filter_eps,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_IDX: tl.constexpr, COMPUTE_DW: tl.constexpr,
    COMPUTE_DB: tl.constexpr, FILTER: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_O: tl.constexpr, EVEN_D: tl.constexpr, EVEN_O: tl.constexpr,
    DOT_PRECISION: tl.constexpr, TMA_H: tl.constexpr, TMA_W: tl.constexpr, PROD_STAGES: tl.constexpr,
):
    pid_v = tl.program_id(0)
    col0 = pid_v * BLOCK_V
    cols = (col0 + tl.arange(0, BLOCK_V)).to(tl.int64)
    col_mask = cols < V
    acc_b = tl.zeros((BLOCK_V,), tl.float32)
    for nb in range(0, tl.cdiv(R, BLOCK_N)):
        row0 = nb * BLOCK_N
        offs_r = (row0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        row_mask = offs_r < R
        if HAS_IDX:
            rows = tl.load(IDX + offs_r, mask=row_mask, other=0).to(tl.int64)
        else:
            rows = offs_r
        w_row = tl.load(WROW + rows, mask=row_mask, other=0.0)
        if tl.max(tl.abs(w_row), axis=0) != 0.0:  # ignored / padding rows only: exactly zero, skipped
            lse = tl.load(LSE + rows, mask=row_mask, other=0.0)
            tgt = tl.load(T + rows, mask=row_mask, other=-1)
            g, _is_t, keep = _grad_tile(H, W, Bias, HD, WD, rows, row_mask, row0, col0, lse, tgt, w_row, V, D,
                                        stride_h, stride_w, softcap, filter_eps, HAS_BIAS, HAS_SOFTCAP, FILTER,
                                        BLOCK_N, BLOCK_V, BLOCK_D, EVEN_D, DOT_PRECISION, TMA_H, TMA_W)
            if COMPUTE_DB:
                acc_b += tl.sum(g, axis=0)
            if COMPUTE_DW:
                gt = tl.trans(g.to(H.dtype.element_ty))  # [BV, BN]
                if FILTER:
                    if keep:
                        _product_add(gt, H, HOD, rows, row_mask, row0, DW, cols, col_mask, DW, 0, D, stride_h,
                                     stride_w, acc_b, 0, BLOCK_O, EVEN_O, DOT_PRECISION, False, TMA_H, PROD_STAGES)
                else:
                    _product_add(gt, H, HOD, rows, row_mask, row0, DW, cols, col_mask, DW, 0, D, stride_h, stride_w,
                                 acc_b, 0, BLOCK_O, EVEN_O, DOT_PRECISION, False, TMA_H, PROD_STAGES)
    if COMPUTE_DB:
        tl.store(DB + cols, acc_b, mask=col_mask)


@triton.jit(do_not_specialize=["vb_per_split"])  # a per-shape value: no recompile per N
def _bwd_dh_kernel(
    H, W, Bias, T, LSE, WROW, IDX, DH, CT, LOCK, HD, WD, WOD, R, V, D, stride_h, stride_w, vb_per_split, softcap,
    filter_eps, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_IDX: tl.constexpr, MODE: tl.constexpr,
    FILTER: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_O: tl.constexpr, EVEN_D: tl.constexpr, EVEN_O: tl.constexpr, DOT_PRECISION: tl.constexpr,
    TMA_H: tl.constexpr, TMA_W: tl.constexpr, PROD_STAGES: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
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
    lse = tl.load(LSE + rows, mask=row_mask, other=0.0)
    tgt = tl.load(T + rows, mask=row_mask, other=-1)
    n_oc = tl.cdiv(D, BLOCK_O)
    vb0 = pid_s * vb_per_split
    vb1 = tl.minimum(vb0 + vb_per_split, tl.cdiv(V, BLOCK_V))
    c_t = tl.zeros((BLOCK_N,), tl.float32)
    for vb in range(vb0, vb1):
        col0 = vb * BLOCK_V
        cols = (col0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        col_mask = cols < V
        g, is_t, keep = _grad_tile(H, W, Bias, HD, WD, rows, row_mask, row0, col0, lse, tgt, w_row, V, D, stride_h,
                                   stride_w, softcap, filter_eps, HAS_BIAS, HAS_SOFTCAP, FILTER, BLOCK_N, BLOCK_V,
                                   BLOCK_D, EVEN_D, DOT_PRECISION, TMA_H, TMA_W)
        c_t += tl.sum(tl.where(is_t, g, 0.0), axis=1)
        gh = tl.where(is_t, 0.0, g).to(H.dtype.element_ty)  # target column: added by _target_fixup_kernel
        # the splits of one row block start at different chunks (their locks rarely meet)
        if FILTER:
            if keep:
                _dh_product(gh, W, WOD, cols, col_mask, col0, DH, rows, row_mask, LOCK + pid_n * n_oc, pid_s, D,
                            stride_w, stride_h, MODE, BLOCK_O, EVEN_O, DOT_PRECISION, TMA_W, PROD_STAGES)
        else:
            _dh_product(gh, W, WOD, cols, col_mask, col0, DH, rows, row_mask, LOCK + pid_n * n_oc, pid_s, D,
                        stride_w, stride_h, MODE, BLOCK_O, EVEN_O, DOT_PRECISION, TMA_W, PROD_STAGES)
    has_t = row_mask & (tgt >= vb0 * BLOCK_V) & (tgt < vb1 * BLOCK_V)
    tl.store(CT + offs_r, c_t, mask=has_t)


@triton.jit
def _dh_product(gh, W, WOD, cols, col_mask, col0, DH, rows, row_mask, LOCKS, start, D, stride_w, stride_h,
                MODE: tl.constexpr, BLOCK_O: tl.constexpr, EVEN_O: tl.constexpr, DOT_PRECISION: tl.constexpr,
                TMA_W: tl.constexpr, PROD_STAGES: tl.constexpr):
    """d_hidden[rows] += gh @ weight[cols] in accumulation MODE (0-2: :func:`_product_add`'s; 3: the row block's
    lock ``LOCKS`` (its first chunk's) is held around a plain, pipelined pass over every chunk)."""
    if MODE == 3:
        while tl.atomic_cas(LOCKS, 0, 1) == 1:
            pass
        _product_add(gh, W, WOD, cols, col_mask, col0, DH, rows, row_mask, LOCKS, start, D, stride_w, stride_h,
                     rows, 0, BLOCK_O, EVEN_O, DOT_PRECISION, False, TMA_W, PROD_STAGES)  # ends with a CTA barrier
        tl.atomic_xchg(LOCKS, 0)
    else:
        _product_add(gh, W, WOD, cols, col_mask, col0, DH, rows, row_mask, LOCKS, start, D, stride_w, stride_h,
                     rows, MODE, BLOCK_O, EVEN_O, DOT_PRECISION, False, TMA_W, PROD_STAGES)


@triton.jit
def _fwd_dh_kernel(
    H, W, Bias, T, PART, DH, HD, WD, WOD, N, V, D, stride_h, stride_w, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_O: tl.constexpr, EVEN_D: tl.constexpr, EVEN_O: tl.constexpr,
    DOT_PRECISION: tl.constexpr, TMA_H: tl.constexpr, TMA_W: tl.constexpr, PROD_STAGES: tl.constexpr,
):
    """Forward statistics of a row block over the whole vocabulary, plus O = Σ_{v != target} exp(z_v - ref) ·
    (softcap factor) · weight[v] into DH, rescaled whenever the running maximum ``ref`` moves (flash-attention
    style: DH = DH · exp(ref_old - ref_new) + e @ weight[cols]). PART is [6, 1, N] (one vocabulary split)."""
    pid = tl.program_id(0)
    row0 = pid * BLOCK_N
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
    for vb in range(0, tl.cdiv(V, BLOCK_V)):
        col0 = vb * BLOCK_V
        lcols, cols, col_mask = _tile_columns(col0, V, BLOCK_V)
        zc = _logits_tile(H, W, Bias, HD, WD, rows, row_mask, row0, cols, col_mask, col0, D, stride_h, stride_w,
                          softcap, HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, EVEN_D, DOT_PRECISION, TMA_H,
                          TMA_W)
        z = tl.where(col_mask[None, :], zc, float("-inf"))  # as in _fwd_tile: zero probability past V
        old_ref = ref
        ref, s, t, a1, a2, zt, e = _fwd_fold(z, lcols, tgt - col0, ref, s, t, a1, a2, zt, BLOCK_V)
        e = tl.where(lcols[None, :] == (tgt - col0)[:, None], 0.0, e)  # target column: added by the finalise kernel
        if HAS_SOFTCAP:
            y = zc / softcap
            e = e * (1.0 - y * y)
        alpha = tl.exp2((old_ref - ref) * LOG2E)  # [BN], 1 once the row maximum has settled
        _product_add(e.to(H.dtype.element_ty), W, WOD, cols, col_mask, col0, DH, rows, row_mask, DH, 0, D, stride_w,
                     stride_h, alpha, 0, BLOCK_O, EVEN_O, DOT_PRECISION, True, TMA_W, PROD_STAGES)
    base = PART + rows  # [6, 1, N]
    tl.store(base, ref, mask=row_mask)
    tl.store(base + N, s, mask=row_mask)
    tl.store(base + 2 * N, t, mask=row_mask)
    tl.store(base + 3 * N, a1, mask=row_mask)
    tl.store(base + 4 * N, a2, mask=row_mask)
    tl.store(base + 5 * N, zt, mask=row_mask)


@triton.jit
def _fwd_dh_finalise_kernel(DH, W, T, WROW, PART, STATS, N, D, stride_h, stride_w, softcap, ignore_index,
                            HAS_SOFTCAP: tl.constexpr, BLOCK: tl.constexpr):
    """d_hidden[row] = w · (O[row] · exp(ref - lse) + (p_t - 1) · (softcap factor) · weight[target]), in fp32
    with one rounding: O · exp(ref - lse) = Σ_{v != t} p_v · (factor) · weight[v]."""
    r = tl.program_id(0).to(tl.int64)
    w = tl.load(WROW + r)
    ref = tl.load(PART + r)
    zt = tl.load(PART + 5 * N + r)
    lse = tl.load(STATS + r)
    tgt = tl.load(T + r).to(tl.int64)
    has_t = tgt != ignore_index
    tgt = tl.where(has_t, tgt, 0)  # an in-bounds row; its coefficient c_t is 0
    c0 = w * tl.exp(ref - lse)
    zt = tl.where(has_t, zt, lse)  # ignored rows: zt is NEG_BIG; any finite value (c_t is 0 there)
    c_t = w * (tl.exp(zt - lse) - 1.0)
    if HAS_SOFTCAP:
        y = zt / softcap
        c_t = c_t * (1.0 - y * y)
    c_t = tl.where(has_t, c_t, 0.0)
    offs = tl.arange(0, BLOCK)
    for d0 in range(0, D, BLOCK):
        m = (offs + d0) < D
        ptrs = DH + r * stride_h + d0 + offs
        o = tl.load(ptrs, mask=m, other=0.0).to(tl.float32)
        wt = tl.load(W + tgt * stride_w + d0 + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(ptrs, (c0 * o + c_t * wt).to(DH.dtype.element_ty), mask=m)


# ---------------------------------------------------------------------------------------------- launcher
#: Shared memory per block (opt-in) below which the split kernels use 2 pipeline stages (consumer GPUs, ~99 KiB).
SMALL_SMEM_BYTES = 128 * 1024


def split_config(
    dtype: torch.dtype,
    interpret: bool,
    hidden_size: int | None = None,
    smem_bytes: int | None = None,
    *,
    fp32_weight_grad: bool = False,
) -> dict:
    """Tile heuristic of the split backward (and of :func:`forward_with_hidden_grad`).

    16-bit inputs: the d_hidden kernel's tile is 64 rows x 256 vocabulary columns (long along its reduction
    axis), the d_weight kernel's 256 rows x 64 columns, 64-deep GEMM steps, 64-wide H chunks in the products,
    8 warps, 3 stages for the logits recompute and the products, operands through TMA where the rows are
    16-byte aligned. Static check (sm_90 compile, ``benchmarks/sweep_fused_tiles.py --static``): every product a
    warp-group MMA, recompute and product loops pipelined (TMA + mbarriers), no spills, 139 KB of shared memory.
    Where a block may use >= 200 KiB of shared memory (H100 / H200 class), the tile-sweep winners (the
    measurements: docs/linear_cross_entropy.md, "Tile choices"): d_hidden 128 x 256 under one lock per row block
    (``DH_LOCK='block'``), d_weight 256 x 128 (208 KiB) unless d_weight accumulates in an fp32 buffer
    (``accumulate='fp32'``: the fp32 tile's add takes the 256 x 128 kernel to 256 KiB, over the 227 KiB of an
    H200 block; 256 x 64 takes 176 KiB).

    Args:
        dtype: Input dtype.
        interpret: Whether the Triton interpreter runs the kernels.
        hidden_size: H (unused by the current rule; the heuristic's input for H-dependent tiles).
        smem_bytes: Shared memory a block may opt in to (``_linear_ce_launch.smem_per_block``);
            ``None``: the large-shared-memory tiles are left out.
        fp32_weight_grad: Whether the d_weight kernel adds into an fp32 buffer (its tile stays 256 x 64).

    Below ``SMALL_SMEM_BYTES`` (consumer GPUs: ~99 KiB per block) both kernels use 2 pipeline stages: 3 take 120
    KiB at sm_86 / sm_89 (``benchmarks/sweep_fused_tiles.py --static --arch 86``; not run on such a GPU here).

    Returns:
        Keys: DH_BLOCK_N x DH_BLOCK_V (d_hidden kernel tile), DW_BLOCK_N x DW_BLOCK_V (d_weight kernel tile),
        BLOCK_D (GEMM depth step), BLOCK_O (H chunk of the products), num_warps, num_stages, PROD_STAGES
        (pipeline depth of the product loops), TMA, optional DH_SPLITS (S; default max(1, SMs // row blocks)),
        DH_LOCK ('chunk', default: S > 1 programs of a row block add each H chunk under that chunk's lock, the
        chunk loop not pipelined; 'block': under one lock per row block held for the tile's whole pipelined pass)
        and DH_num_warps / DH_num_stages / DW_num_warps / DW_num_stages (per-kernel overrides); FWD_DH_BLOCK_N,
        FWD_DH_BLOCK_V, FWD_DH_num_warps, FWD_DH_num_stages for :func:`forward_with_hidden_grad` (default: DH_).
        Under the Triton interpreter the tiles are small, so that tests exercise several blocks per axis.
    """
    del hidden_size
    if interpret:
        return dict(DH_BLOCK_N=16, DH_BLOCK_V=32, DW_BLOCK_N=32, DW_BLOCK_V=16, BLOCK_D=16, BLOCK_O=16,
                    num_warps=1, num_stages=1, PROD_STAGES=1, TMA=True)
    if dtype == torch.float32:
        return dict(DH_BLOCK_N=64, DH_BLOCK_V=64, DW_BLOCK_N=64, DW_BLOCK_V=64, BLOCK_D=32, BLOCK_O=32,
                    num_warps=8, num_stages=2, PROD_STAGES=2, TMA=True)
    cfg = dict(DH_BLOCK_N=64, DH_BLOCK_V=256, DW_BLOCK_N=256, DW_BLOCK_V=64, BLOCK_D=64, BLOCK_O=64,
               num_warps=8, num_stages=3, PROD_STAGES=3, TMA=True)
    if smem_bytes is not None and smem_bytes < SMALL_SMEM_BYTES:
        # 3 stages take 120 KiB per kernel at sm_86 (static compile, TMA off): over the ~99 KiB of a consumer GPU
        cfg.update(num_stages=2, PROD_STAGES=2)  # 80 KiB
    if smem_bytes is not None and smem_bytes >= LARGE_SMEM_BYTES:
        # forward_with_hidden_grad keeps its 64-row tile (FWD_DH_BLOCK_N): the sweep did not time it at 128
        cfg.update(DH_BLOCK_N=128, DH_LOCK="block", FWD_DH_BLOCK_N=64)
        if not fp32_weight_grad:
            cfg["DW_BLOCK_V"] = 128
    return cfg


def _dh_splits(cfg: dict, n_nb: int, n_vb: int, device: torch.device) -> int:
    if "DH_SPLITS" in cfg:
        s = int(cfg["DH_SPLITS"])
    elif device.type != "cuda":
        s = max(1, 4 // n_nb)  # interpreter: split small problems, so that the locked path is exercised
    else:
        s = max(1, num_sms(device.index if device.index is not None else torch.cuda.current_device()) // n_nb)
    return max(1, min(s, n_vb))


@on_input_device
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
    """Gradients of Σ_n w_n · nll_n from the rows ``idx`` (or all rows): one kernel per output (module docstring).

    Args:
        hidden: (N, H) contiguous, float16 / bfloat16 / float32.
        weight: (V, H) contiguous, same dtype.
        bias: (V,) or ``None``.
        targets: (N,) long.
        lse: (N,) fp32 log-sum-exp saved by the forward.
        row_weights: (N,) fp32 weights, already multiplied by the upstream gradient; 0 outside the selection.
        idx: (K_max,) long row indices, each at most once (padding rows carry weight 0), or ``None`` for
            every row (ratio 1). Each row at most once is what makes a row block's d_hidden exclusively owned.
        ignore_index: Unused (ignored rows carry weight 0); kept for signature parity.
        softcap: ``None`` or the logit soft-cap.
        workspace_bytes: Unused (no workspace).
        need_hidden_grad, need_weight_grad, need_bias_grad: Which gradients to compute.
        accumulate: ``'native'`` (adds in the output dtype; locks only where the d_hidden kernel is split),
            ``'atomic'`` (split d_hidden adds with 16-bit atomics instead of locks), ``'fp32_hidden'``,
            ``'fp32'`` (fp32 buffers, cast at the end).
        filter_eps: ``None`` (exact) or CCE's gradient filter threshold.
        config: Tile-size override (keys of :func:`split_config`).

    Returns:
        ``(d_hidden (N, H), d_weight (V, H), d_bias (V,))`` in the input dtype, ``None`` where not needed.
    """
    del ignore_index, workspace_bytes
    n, d = hidden.shape
    vocab = weight.shape[0]
    dev = hidden.device
    f32 = torch.float32
    d_h, d_w, d_b, dh_fp32, dw_fp32 = gradient_accumulators(
        hidden, weight, accumulate, need_hidden_grad, need_weight_grad, need_bias_grad
    )
    r = n if idx is None else idx.shape[0]
    bias = bias.contiguous() if bias is not None else None
    if r > 0 and (d_h is not None or d_w is not None or d_b is not None):
        cfg = dict(config or split_config(hidden.dtype, interpreting(), d, smem_per_block(hidden.device),
                                          fp32_weight_grad=dw_fp32))
        bd, bo = cfg["BLOCK_D"], cfg["BLOCK_O"]
        prec = dot_precision(hidden.dtype)
        idx_arg = idx if idx is not None else targets
        tma_w = tma_usable(cfg, hidden, weight)
        tma_h = tma_w and idx is None  # selected rows are gathered with pointers
        common = dict(HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, HAS_IDX=idx is not None,
                      FILTER=filter_eps is not None, BLOCK_D=bd, BLOCK_O=bo, EVEN_D=d % bd == 0, EVEN_O=d % bo == 0,
                      DOT_PRECISION=prec, TMA_H=tma_h, TMA_W=tma_w)
        cap = float(softcap) if softcap is not None else 1.0
        eps = float(filter_eps) if filter_eps is not None else 0.0
        b_arg = bias if bias is not None else hidden
        if d_w is not None or d_b is not None:
            bn, bv = cfg["DW_BLOCK_N"], cfg["DW_BLOCK_V"]
            LAST_LAUNCHED["bwd_dw"] = _bwd_dw_kernel[(triton.cdiv(vocab, bv),)](
                hidden, weight, b_arg, targets, lse, row_weights, idx_arg,
                d_w if d_w is not None else lse, d_b if d_b is not None else lse,
                descriptor(hidden, (bn, bd), tma_h), descriptor(weight, (bv, bd), tma_w),
                descriptor(hidden, (bn, bo), tma_h),
                r, vocab, d, hidden.stride(0), weight.stride(0), cap, eps,
                COMPUTE_DW=d_w is not None, COMPUTE_DB=d_b is not None, BLOCK_N=bn, BLOCK_V=bv, **common,
                PROD_STAGES=cfg.get("PROD_STAGES", cfg["num_stages"]),
                num_warps=cfg.get("DW_num_warps", cfg["num_warps"]),
                num_stages=cfg.get("DW_num_stages", cfg["num_stages"]),
            )
        if d_h is not None:
            bn, bv = cfg["DH_BLOCK_N"], cfg["DH_BLOCK_V"]
            n_nb, n_vb, n_oc = triton.cdiv(r, bn), triton.cdiv(vocab, bv), triton.cdiv(d, bo)
            splits = _dh_splits(cfg, n_nb, n_vb, dev)
            vb_per_split = triton.cdiv(n_vb, splits)
            splits = triton.cdiv(n_vb, vb_per_split)  # no empty split
            if splits == 1:
                mode = _EXCLUSIVE
            elif dh_fp32 or accumulate == "atomic":
                mode = _ATOMIC
            else:
                mode = _BLOCK_LOCKED if cfg.get("DH_LOCK", "chunk") == "block" else _LOCKED
            locked = mode in (_LOCKED, _BLOCK_LOCKED)
            lock = torch.zeros(n_nb * n_oc, dtype=torch.int32, device=dev) if locked else targets
            c_t = torch.zeros(r, dtype=f32, device=dev)  # (R,) target coefficients
            LAST_LAUNCHED["bwd_dh"] = _bwd_dh_kernel[(n_nb, splits)](
                hidden, weight, b_arg, targets, lse, row_weights, idx_arg, d_h, c_t, lock,
                descriptor(hidden, (bn, bd), tma_h), descriptor(weight, (bv, bd), tma_w),
                descriptor(weight, (bv, bo), tma_w),
                r, vocab, d, hidden.stride(0), weight.stride(0), vb_per_split, cap, eps,
                MODE=mode, BLOCK_N=bn, BLOCK_V=bv, **common, PROD_STAGES=cfg.get("PROD_STAGES", cfg["num_stages"]),
                num_warps=cfg.get("DH_num_warps", cfg["num_warps"]),
                num_stages=cfg.get("DH_num_stages", cfg["num_stages"]),
            )
            _target_fixup_kernel[(r,)](
                d_h, weight, targets, idx_arg, c_t, d, d_h.stride(0), weight.stride(0),
                HAS_IDX=idx is not None, BLOCK=min(1024, triton.next_power_of_2(d)), num_warps=4,
            )
    return in_input_dtypes(d_h, d_w, d_b, hidden, weight, bias)


@on_input_device
def forward_with_hidden_grad(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    row_weights: Tensor,
    *,
    ignore_index: int,
    softcap: float | None,
    accumulate: str = "native",
    config: dict | None = None,
) -> tuple[Tensor, Tensor]:
    """Scores of every row and d_hidden of Σ_n w_n · nll_n over every row, in ONE pass over the vocabulary.

    For ``bwd='split_fwd'`` at ratio 1 (the row weights are known before the forward): the forward's row block
    (BN = DH_BLOCK_N rows, the whole vocabulary in one program, so no split partials to merge) also
    accumulates O = Σ_{v != t} exp(z_v - ref) · weight[v] into d_hidden, rescaled as its running maximum moves;
    a finalise kernel turns O into w · (Σ_{v != t} p_v · weight[v] + (p_t - 1) · weight[t]). This replaces
    the d_hidden kernel's logits recompute of the split backward: 1 + 1 GEMM passes here, 2 in the backward
    (d_weight kernel). fp16 accumulates O in an fp32 buffer (O is not normalised: up to V · |weight| could
    overflow fp16); bf16 and fp32 in the output dtype unless ``accumulate`` asks for fp32.

    Args:
        hidden, weight, bias, targets: as in :func:`cggr.kernels.linear_cross_entropy_fused.forward_stats`.
        row_weights: (N,) fp32 weights of the rows' nll (0 for ignored rows).
        ignore_index: Target value to ignore (nll 0, no target term).
        softcap: ``None`` or the logit soft-cap.
        accumulate: ``'native'`` / ``'atomic'`` (output dtype) or ``'fp32_hidden'`` / ``'fp32'`` (fp32 buffer).
        config: Tile-size override (keys of :func:`split_config`: FWD_DH_BLOCK_N / FWD_DH_BLOCK_V (default: the
            DH_ tiles), BLOCK_D, BLOCK_O, num_warps, num_stages, FWD_DH_num_warps / FWD_DH_num_stages (default:
            DH_num_warps / DH_num_stages, then num_warps / num_stages)).

    Returns:
        ``(stats (5, N) fp32 = lse, entropy, confidence, margin, nll;  d_hidden (N, H) in the input dtype)``.
    """
    check_accumulate(accumulate)
    n, d = hidden.shape
    vocab = weight.shape[0]
    dev = hidden.device
    f32 = torch.float32
    dh_fp32 = accumulate in ("fp32_hidden", "fp32") or hidden.dtype in (f32, torch.float16)
    stats = torch.empty(5, n, dtype=f32, device=dev)
    d_h = torch.zeros(n, d, dtype=f32 if dh_fp32 else hidden.dtype, device=dev)
    if n > 0:
        cfg = dict(config or split_config(hidden.dtype, interpreting(), d, smem_per_block(hidden.device)))
        bn, bv = cfg.get("FWD_DH_BLOCK_N", cfg["DH_BLOCK_N"]), cfg.get("FWD_DH_BLOCK_V", cfg["DH_BLOCK_V"])
        bd, bo = cfg["BLOCK_D"], cfg["BLOCK_O"]
        bias = bias.contiguous() if bias is not None else None
        cap = float(softcap) if softcap is not None else 1.0
        part = torch.empty(6, 1, n, dtype=f32, device=dev)
        tma = tma_usable(cfg, hidden, weight)
        LAST_LAUNCHED["fwd_dh"] = _fwd_dh_kernel[(triton.cdiv(n, bn),)](
            hidden, weight, bias if bias is not None else hidden, targets, part, d_h,
            descriptor(hidden, (bn, bd), tma), descriptor(weight, (bv, bd), tma), descriptor(weight, (bv, bo), tma),
            n, vocab, d, hidden.stride(0), weight.stride(0), cap,
            HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=bd,
            BLOCK_O=bo, EVEN_D=d % bd == 0, EVEN_O=d % bo == 0, DOT_PRECISION=dot_precision(hidden.dtype),
            TMA_H=tma, TMA_W=tma, PROD_STAGES=cfg.get("PROD_STAGES", cfg["num_stages"]),
            num_warps=cfg.get("FWD_DH_num_warps", cfg.get("DH_num_warps", cfg["num_warps"])),
            num_stages=cfg.get("FWD_DH_num_stages", cfg.get("DH_num_stages", cfg["num_stages"])),
        )
        merge_block = 1024 if not interpreting() else 64
        _merge_kernel[(triton.cdiv(n, merge_block),)](
            part, stats, targets, n, 1, ignore_index, BLOCK=merge_block, num_warps=4,
        )
        _fwd_dh_finalise_kernel[(n,)](
            d_h, weight, targets, row_weights, part, stats, n, d, d_h.stride(0), weight.stride(0), cap, ignore_index,
            HAS_SOFTCAP=softcap is not None, BLOCK=min(1024, triton.next_power_of_2(d)), num_warps=4,
        )
    return stats, d_h.to(hidden.dtype)
