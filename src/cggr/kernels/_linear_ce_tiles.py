"""Tile-level Triton helpers shared by the fused linear cross-entropy kernels.

Used by :mod:`cggr.kernels.linear_cross_entropy_fused` (forward statistics, tiled backward),
:mod:`cggr.kernels.linear_cross_entropy_fused_halves` (the tiled backward's two-halves tile) and
:mod:`cggr.kernels.linear_cross_entropy_fused_split` (split backward, forward with d_hidden). Every function here is
an inlined ``@triton.jit`` helper, no kernel and no launcher (the kernels and launch helpers those modules share are
in :mod:`cggr.kernels._linear_ce_launch`).

Shape legend: BN rows of a tile (hidden rows), BV vocabulary columns (HV = BV / 2 for a half tile), BD the GEMM's
depth step along H, BO the H chunk of the backward's products, D = H.

Logits: ``_logits_tile`` ([BN, BV] fp32 = hidden[rows] @ weight[cols].T (+ bias) (softcap), the GEMM loop over D
in BD steps through ``_h_step`` / ``_w_step``: TMA descriptors or pointer gathers) and ``_logits_halves`` (the
same tile as two [BN, HV] register tensors, each hidden step loaded once for both).
Forward statistics: ``_fwd_fold`` (one logits tile folded into the online row state: running maximum, Σ exp,
Σ exp·(z - ref), exact top-2, target logit).
Gradient epilogue: ``_softmax_grad`` (g = softmax - onehot), ``_live_max`` (the gradient filter's test),
``_weighted`` (row weights, softcap derivative), ``_tile_grad`` (all three), ``_tile_sums`` (d_bias and the
target coefficients).
Products: ``_product_add`` (DST += A @ SRC chunk by chunk: exclusive, locked or atomic adds; ``_accumulate``,
``_load_src``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from cggr.kernels._utils import LOG2E, NEG_BIG, softcap_fn


@triton.jit
def _h_step(HD, h_base, row_mask, row0, d0, D, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, TMA_H: tl.constexpr):
    """[BN, BD] hidden operand of the GEMM step at depth ``d0``: the TMA block of HD at (row0, d0), or gathered
    with pointers from ``h_base`` [BN, 1] (the rows' pointers, hoisted out of the loop), masked to zero."""
    if TMA_H:
        return HD.load([row0, d0])
    offs_d = d0 + tl.arange(0, BLOCK_D)
    ptrs = h_base + offs_d[None, :]
    if EVEN_D:
        return tl.load(ptrs, mask=row_mask[:, None], other=0.0)
    return tl.load(ptrs, mask=row_mask[:, None] & (offs_d < D)[None, :], other=0.0)


@triton.jit
def _w_step(WD, w_base, col_mask, col0, d0, D, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, TMA_W: tl.constexpr):
    """[BD, BV] (transposed) weight operand of the GEMM step at depth ``d0``, as :func:`_h_step` (``w_base``
    [1, BV] the columns' row pointers)."""
    if TMA_W:
        return WD.load([col0, d0]).T
    offs_d = d0 + tl.arange(0, BLOCK_D)
    ptrs = w_base + offs_d[:, None]
    if EVEN_D:
        return tl.load(ptrs, mask=col_mask[None, :], other=0.0)
    return tl.load(ptrs, mask=col_mask[None, :] & (offs_d < D)[:, None], other=0.0)


@triton.jit
def _logits_epilogue(acc, Bias, cols, col_mask, softcap, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """Bias and softcap applied to an fp32 logits tile."""
    if HAS_BIAS:
        b = tl.load(Bias + cols, mask=col_mask, other=0.0).to(tl.float32)
        acc = acc + b[None, :]
    if HAS_SOFTCAP:
        acc = softcap_fn(acc, softcap)
    return acc


@triton.jit
def _logits_tile(H, W, Bias, HD, WD, rows, row_mask, row0, cols, col_mask, col0, D, stride_h, stride_w, softcap,
                 HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, TMA_H: tl.constexpr, TMA_W: tl.constexpr):
    """[BN, BV] fp32 logits of the rows ``rows`` and vocabulary columns ``cols``, bias and softcap applied.

    The GEMM loop runs over H in BD steps (the innermost loop: Triton's pipeliner stages both operands through
    shared memory, ``num_stages`` deep, and the product lowers to warp-group MMA on sm_90). With TMA_H / TMA_W
    an operand tile is fetched by the tensor-memory accelerator from the descriptor HD ([N, H], block
    [BN, BD]) at row ``row0`` / WD ([V, H], block [BV, BD]) at row ``col0``, out-of-bounds rows and columns
    zero-filled: no per-thread addresses or masks (registers freed for the tile's epilogue). Otherwise the tile
    is gathered with pointers (``rows`` may be any row indices), masked to zero.
    """
    h_base = H + rows[:, None] * stride_h  # [BN, 1]
    w_base = W + cols[None, :] * stride_w  # [1, BV]
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        h = _h_step(HD, h_base, row_mask, row0, d0, D, BLOCK_D, EVEN_D, TMA_H)  # [BN, BD]
        w = _w_step(WD, w_base, col_mask, col0, d0, D, BLOCK_D, EVEN_D, TMA_W)  # [BD, BV]
        acc = tl.dot(h, w, acc, input_precision=DOT_PRECISION)
    return _logits_epilogue(acc, Bias, cols, col_mask, softcap, HAS_BIAS, HAS_SOFTCAP)


@triton.jit
def _logits_halves(H, W, Bias, HD, WD, rows, row_mask, row0, cols_a, mask_a, col0, cols_b, mask_b, D, stride_h,
                   stride_w, softcap, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr,
                   HALF_V: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, TMA_H: tl.constexpr, TMA_W: tl.constexpr):
    """The [BN, 2·HV] logits tile of :func:`_logits_tile` as two [BN, HV] halves (columns col0 + [0, HV) and
    col0 + HV + [0, HV); WD's block is [HV, BD]): each hidden step is loaded once for both halves (the wide
    tile's operand traffic), and the halves are separate register tensors that the caller can use or skip."""
    h_base = H + rows[:, None] * stride_h  # [BN, 1]
    wa_base = W + cols_a[None, :] * stride_w  # [1, HV]
    wb_base = W + cols_b[None, :] * stride_w
    acc_a = tl.zeros((BLOCK_N, HALF_V), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_N, HALF_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        h = _h_step(HD, h_base, row_mask, row0, d0, D, BLOCK_D, EVEN_D, TMA_H)  # [BN, BD]
        w_a = _w_step(WD, wa_base, mask_a, col0, d0, D, BLOCK_D, EVEN_D, TMA_W)  # [BD, HV]
        w_b = _w_step(WD, wb_base, mask_b, col0 + HALF_V, d0, D, BLOCK_D, EVEN_D, TMA_W)
        acc_a = tl.dot(h, w_a, acc_a, input_precision=DOT_PRECISION)
        acc_b = tl.dot(h, w_b, acc_b, input_precision=DOT_PRECISION)
    return (_logits_epilogue(acc_a, Bias, cols_a, mask_a, softcap, HAS_BIAS, HAS_SOFTCAP),
            _logits_epilogue(acc_b, Bias, cols_b, mask_b, softcap, HAS_BIAS, HAS_SOFTCAP))


@triton.jit
def _tile_columns(col0, V, BLOCK_V: tl.constexpr):
    """Columns of the vocabulary tile starting at ``col0``: int32 index within the tile [BV], int64 column [BV],
    and the mask of the columns below V."""
    lcols = tl.arange(0, BLOCK_V)
    return lcols, col0.to(tl.int64) + lcols, lcols < V - col0


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
def _softmax_grad(zc, lse, tgt, col0, lcols, col_mask, BLOCK_V: tl.constexpr):
    """Unweighted gradient g = softmax - onehot(target) of a [BN, BV] logits tile ``zc`` (columns col0 + lcols,
    ``lse`` [BN] the rows' log-sum-exp, ``tgt`` [BN] targets, negative: none), zero on masked columns; also the
    target mask ``is_t`` [BN, BV] and the target's column within the tile ``ltgt`` [BN] int32 (-1: not here)."""
    p = tl.exp2(zc * LOG2E - (lse * LOG2E)[:, None])
    p = tl.where(col_mask[None, :], p, 0.0)
    ltgt = tl.where((tgt >= col0) & (tgt < col0 + BLOCK_V), tgt - col0, -1).to(tl.int32)
    is_t = lcols[None, :] == ltgt[:, None]
    return tl.where(is_t, p - 1.0, p), is_t, ltgt


@triton.jit
def _live_max(g, w_row):
    """max |g| over the rows of nonzero weight: the gradient filter skips the tile when it is below eps."""
    return tl.max(tl.max(tl.where((w_row != 0.0)[:, None], tl.abs(g), 0.0), axis=1), axis=0)


@triton.jit
def _weighted(g, zc, w_row, softcap, HAS_SOFTCAP: tl.constexpr):
    """g · w_row (· the softcap's derivative 1 - (zc / softcap)²): the gradient w.r.t. the pre-softcap logits."""
    g = g * w_row[:, None]
    if HAS_SOFTCAP:
        y = zc / softcap
        g = g * (1.0 - y * y)
    return g


@triton.jit
def _tile_grad(zc, lse, tgt, col0, lcols, col_mask, w_row, softcap, filter_eps, HAS_SOFTCAP: tl.constexpr,
               FILTER: tl.constexpr, BLOCK_V: tl.constexpr):
    """Weighted gradient of a [BN, BV] logits tile (or half tile), its target mask and column, and whether it is
    kept (with FILTER: not every |softmax - onehot| of a weighted row below eps; without: an unused placeholder,
    the callers branch on FILTER first)."""
    g, is_t, ltgt = _softmax_grad(zc, lse, tgt, col0, lcols, col_mask, BLOCK_V)
    if FILTER:
        keep = _live_max(g, w_row) >= filter_eps
    else:
        keep = tl.max(w_row, axis=0) != 0.0  # unused
    return _weighted(g, zc, w_row, softcap, HAS_SOFTCAP), is_t, ltgt, keep


@triton.jit
def _tile_sums(g, is_t, ltgt, cols, col_mask, DB, CT, offs_r, row_mask, COMPUTE_DB: tl.constexpr,
               COMPUTE_DH: tl.constexpr):
    """d_bias[cols] += Σ_rows g (fp32 atomics), and CT[rows] = the target column's g for the rows whose target is
    in this tile (or half tile: a row's target is in one at most), added to d_hidden by _target_fixup_kernel."""
    if COMPUTE_DB:
        tl.atomic_add(DB + cols, tl.sum(g, axis=0), mask=col_mask, sem="relaxed")
    if COMPUTE_DH:
        tl.store(CT + offs_r, tl.sum(tl.where(is_t, g, 0.0), axis=1), mask=row_mask & (ltgt >= 0))


@triton.jit
def _accumulate(ptrs, val, mask, lock, USE_ATOMIC: tl.constexpr):
    """``*ptrs += val`` for a tile: fp32 atomics, or a locked read-add-write in the buffer's dtype."""
    if USE_ATOMIC:
        tl.atomic_add(ptrs, val, mask=mask, sem="relaxed")
    else:
        while tl.atomic_cas(lock, 0, 1) == 1:
            pass
        cur = tl.load(ptrs, mask=mask, other=0.0, cache_modifier=".cg")
        tl.store(ptrs, (cur.to(tl.float32) + val).to(ptrs.dtype.element_ty), mask=mask)
        tl.debug_barrier()  # every thread's store is issued before the lock is released
        tl.atomic_xchg(lock, 0)


@triton.jit
def _product_add(A, SRC, SD, src_rows, src_mask, src0, DST, dst_rows, dst_mask, LOCKS, start, D, stride_src,
                 stride_dst, row_scale, MODE: tl.constexpr, BLOCK_O: tl.constexpr, EVEN_O: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, HAS_SCALE: tl.constexpr, TMA_SRC: tl.constexpr,
                 PROD_STAGES: tl.constexpr):
    """DST[dst_rows, c] += A @ SRC[src_rows, c] for every BO-wide chunk c of D, from chunk ``start`` on (cyclic).

    MODE 0 (exclusive): plain load-add-store (with HAS_SCALE: DST = DST · row_scale[:, None] + A @ SRC);
    1: under the chunk's lock ``LOCKS + c``; 2: atomic adds. With TMA_SRC the SRC chunk is the block at row
    ``src0`` of the descriptor SD (block [len(src_rows), BO], out-of-bounds zero-filled), else gathered with
    pointers (``src_rows`` any row indices).

    MODE 0 / 2: the SRC chunk goes straight into the product from an address computed from the loop index only,
    so that Triton's software pipeliner stages it through shared memory (PROD_STAGES deep) and the product
    is an asynchronous warp-group MMA (sm_90) overlapped with the next chunks' loads; the DST chunk is loaded
    before the product so that its latency overlaps it. MODE 1: the lock's spin loop inside the chunk loop
    keeps the pipeliner out, so the next SRC chunk is prefetched by hand (into registers, through pointers)
    before the lock is taken, and the product is issued before the lock (see the select below): the lock is held
    for the read-add-write only.
    """
    n_oc = tl.cdiv(D, BLOCK_O)
    offs_o = tl.arange(0, BLOCK_O)
    src_base = SRC + src_rows[:, None] * stride_src  # [BK, 1]
    dst_base = DST + dst_rows[:, None] * stride_dst  # [BM, 1]
    start = start % n_oc
    if MODE == 1:
        # pointer loads: a TMA load outside the pipeliner would be waited for at once, a register load only at
        # its first use (the next iteration)
        oc = start
        src = _load_src(SD, src_base, src_mask, src0, oc * BLOCK_O, offs_o, D, EVEN_O, False)
        for _i in range(0, n_oc):
            part = tl.dot(A, src, input_precision=DOT_PRECISION)  # [BM, BO] fp32
            nxt = oc + 1
            nxt = tl.where(nxt >= n_oc, nxt - n_oc, nxt)
            src = _load_src(SD, src_base, src_mask, src0, nxt * BLOCK_O, offs_o, D, EVEN_O, False)  # prefetch
            od = oc * BLOCK_O + offs_o
            if EVEN_O:
                m_out = dst_mask[:, None]
            else:
                m_out = dst_mask[:, None] & (od < D)[None, :]
            # the select keeps Triton from folding the add of the read-back into the product (dot(A, src, acc=cur)),
            # which would move the MMA after the load, i.e. into the critical section (masked elements are not stored)
            part = tl.where(m_out, part, 0.0)
            _accumulate(dst_base + od[None, :], part, m_out, LOCKS + oc, False)
            oc = nxt
    else:
        for i in tl.range(0, n_oc, num_stages=PROD_STAGES):
            oc = start + i
            oc = tl.where(oc >= n_oc, oc - n_oc, oc)  # start < n_oc: one wrap at most
            od = oc * BLOCK_O + offs_o
            if EVEN_O:
                m_out = dst_mask[:, None]
            else:
                m_out = dst_mask[:, None] & (od < D)[None, :]
            ptrs = dst_base + od[None, :]
            if MODE == 0:
                cur = tl.load(ptrs, mask=m_out, other=0.0)
            src = _load_src(SD, src_base, src_mask, src0, oc * BLOCK_O, offs_o, D, EVEN_O, TMA_SRC)  # [BK, BO]
            part = tl.dot(A, src, input_precision=DOT_PRECISION)  # [BM, BO] fp32
            if MODE == 0:
                if HAS_SCALE:
                    part = cur.to(tl.float32) * row_scale[:, None] + part
                else:
                    part = cur.to(tl.float32) + part
                tl.store(ptrs, part.to(DST.dtype.element_ty), mask=m_out)
            else:
                _accumulate(ptrs, part, m_out, LOCKS + oc, True)
        if MODE == 0:
            # the caller's next tile re-reads these chunks, maybe from other threads of the CTA: order the stores
            tl.debug_barrier()


@triton.jit
def _load_src(SD, src_base, src_mask, src0, o0, offs_o, D, EVEN_O: tl.constexpr, TMA_SRC: tl.constexpr):
    """The [BK, BO] SRC chunk of columns o0 + offs_o: the TMA block of SD at (src0, o0), or through pointers."""
    if TMA_SRC:
        return SD.load([src0, o0])
    od = o0 + offs_o
    if EVEN_O:
        return tl.load(src_base + od[None, :], mask=src_mask[:, None], other=0.0)
    return tl.load(src_base + od[None, :], mask=src_mask[:, None] & (od < D)[None, :], other=0.0)
