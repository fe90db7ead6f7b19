"""The tiled backward's two-halves tile (``default_config``'s ``HALVES``; atomic adds only).

Part of :mod:`cggr.kernels.linear_cross_entropy_fused` (``_bwd_kernel`` calls :func:`_bwd_tile_halves` for
every tile when HALVES is set). Shape legend: BN rows, HV = BLOCK_V / 2 columns per half, BO the H chunk of the
products, D = H.

Dataflow of one [BN, 2·HV] tile (columns col0 + [0, HV) = half a, col0 + HV + [0, HV) = half b)::

    za, zb = hidden[rows] @ weight[cols_a].T, ... @ weight[cols_b].T     one GEMM loop, each hidden step loaded once
    g_x = (softmax(z_x) - onehot) · w_row (· softcap')                  [BN, HV] fp32 per half
    keep_x = not FILTER or max |softmax - onehot| over weighted rows >= filter_eps     per half
    kept halves: d_bias[cols_x] += Σ_rows g_x; CT[rows] = target column of g_x
    for each BO chunk c of D (rotated start):
        d_hidden[rows, c] += Σ_kept g'_x @ weight[cols_x, c]           one atomic add for both halves
        d_weight[cols_x, c] += g_x.T @ hidden[rows, c]                  hidden chunk loaded once for both halves

The wide tile's GEMM cost (operand traffic per MAC (1/256 + 1/BN)) with the narrow tile's gradient-filter
granularity: a half whose gradient is below eps costs no products (benchmarks/results/h200/linear_ce_halves.md).
"""

from __future__ import annotations

import triton
import triton.language as tl

from cggr.kernels._linear_ce_tiles import _load_src, _logits_halves, _tile_columns, _tile_grad, _tile_sums


@triton.jit
def _bwd_tile_halves(H, W, Bias, HD, WD, HOD, WOD, DH, DW, DB, CT, rows, offs_r, row_mask, row0, col0, lse, tgt,
                     w_row, pid_n, pid_v, V, D, stride_h, stride_w, softcap, filter_eps, HAS_BIAS: tl.constexpr,
                     HAS_SOFTCAP: tl.constexpr, COMPUTE_DH: tl.constexpr, COMPUTE_DW: tl.constexpr,
                     COMPUTE_DB: tl.constexpr, FILTER: tl.constexpr, BLOCK_N: tl.constexpr, HALF_V: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_O: tl.constexpr, EVEN_D: tl.constexpr, EVEN_O: tl.constexpr,
                     DOT_PRECISION: tl.constexpr, TMA_H: tl.constexpr, TMA_W: tl.constexpr,
                     PROD_STAGES: tl.constexpr):
    """The [BN, 2·HV] tile of :func:`_bwd_kernel` (HALVES; atomic adds only) as two [BN, HV] halves a, b: one
    logits GEMM for both (:func:`_logits_halves`), then the gradient filter, d_bias, the target coefficients and
    the products per half, so that a half whose gradient is below eps costs no products (the narrow tile's skip
    rate at the wide tile's GEMM cost). d_hidden takes both halves' products in one sum per H chunk
    (:func:`_dh_halves`); d_weight's rows are per half anyway (:func:`_dw_halves`)."""
    lcols, cols_a, mask_a = _tile_columns(col0, V, HALF_V)
    _lc, cols_b, mask_b = _tile_columns(col0 + HALF_V, V, HALF_V)
    za, zb = _logits_halves(H, W, Bias, HD, WD, rows, row_mask, row0, cols_a, mask_a, col0, cols_b, mask_b, D,
                            stride_h, stride_w, softcap, HAS_BIAS, HAS_SOFTCAP, BLOCK_N, HALF_V, BLOCK_D, EVEN_D,
                            DOT_PRECISION, TMA_H, TMA_W)
    ga, is_ta, ltgt_a, keep_a = _tile_grad(za, lse, tgt, col0, lcols, mask_a, w_row, softcap, filter_eps,
                                           HAS_SOFTCAP, FILTER, HALF_V)
    gb, is_tb, ltgt_b, keep_b = _tile_grad(zb, lse, tgt, col0 + HALF_V, lcols, mask_b, w_row, softcap, filter_eps,
                                           HAS_SOFTCAP, FILTER, HALF_V)
    if FILTER:
        if keep_a:
            _tile_sums(ga, is_ta, ltgt_a, cols_a, mask_a, DB, CT, offs_r, row_mask, COMPUTE_DB, COMPUTE_DH)
        if keep_b:
            _tile_sums(gb, is_tb, ltgt_b, cols_b, mask_b, DB, CT, offs_r, row_mask, COMPUTE_DB, COMPUTE_DH)
    else:
        _tile_sums(ga, is_ta, ltgt_a, cols_a, mask_a, DB, CT, offs_r, row_mask, COMPUTE_DB, COMPUTE_DH)
        _tile_sums(gb, is_tb, ltgt_b, cols_b, mask_b, DB, CT, offs_r, row_mask, COMPUTE_DB, COMPUTE_DH)
    dt = H.dtype.element_ty
    if FILTER:
        if keep_a & keep_b:
            _products_halves(ga, gb, is_ta, is_tb, True, True, H, W, HOD, WOD, DH, DW, rows, row_mask, row0, cols_a,
                             mask_a, cols_b, mask_b, col0, pid_n, pid_v, D, stride_h, stride_w, dt, COMPUTE_DH,
                             COMPUTE_DW, HALF_V, BLOCK_O, EVEN_O, DOT_PRECISION, TMA_H, TMA_W, PROD_STAGES)
        elif keep_a:
            _products_halves(ga, gb, is_ta, is_tb, True, False, H, W, HOD, WOD, DH, DW, rows, row_mask, row0, cols_a,
                             mask_a, cols_b, mask_b, col0, pid_n, pid_v, D, stride_h, stride_w, dt, COMPUTE_DH,
                             COMPUTE_DW, HALF_V, BLOCK_O, EVEN_O, DOT_PRECISION, TMA_H, TMA_W, PROD_STAGES)
        elif keep_b:
            _products_halves(ga, gb, is_ta, is_tb, False, True, H, W, HOD, WOD, DH, DW, rows, row_mask, row0, cols_a,
                             mask_a, cols_b, mask_b, col0, pid_n, pid_v, D, stride_h, stride_w, dt, COMPUTE_DH,
                             COMPUTE_DW, HALF_V, BLOCK_O, EVEN_O, DOT_PRECISION, TMA_H, TMA_W, PROD_STAGES)
    else:
        _products_halves(ga, gb, is_ta, is_tb, True, True, H, W, HOD, WOD, DH, DW, rows, row_mask, row0, cols_a,
                         mask_a, cols_b, mask_b, col0, pid_n, pid_v, D, stride_h, stride_w, dt, COMPUTE_DH,
                         COMPUTE_DW, HALF_V, BLOCK_O, EVEN_O, DOT_PRECISION, TMA_H, TMA_W, PROD_STAGES)


@triton.jit
def _products_halves(ga, gb, is_ta, is_tb, USE_A: tl.constexpr, USE_B: tl.constexpr, H, W, HOD, WOD, DH, DW, rows,
                     row_mask, row0, cols_a, mask_a, cols_b, mask_b, col0, pid_n, pid_v, D, stride_h, stride_w,
                     dt: tl.constexpr, COMPUTE_DH: tl.constexpr, COMPUTE_DW: tl.constexpr, HALF_V: tl.constexpr,
                     BLOCK_O: tl.constexpr, EVEN_O: tl.constexpr, DOT_PRECISION: tl.constexpr, TMA_H: tl.constexpr,
                     TMA_W: tl.constexpr, PROD_STAGES: tl.constexpr):
    """d_hidden and d_weight products of the kept halves (USE_A / USE_B) of a halves tile, atomic adds."""
    if COMPUTE_DH:  # the target column is added by _target_fixup_kernel
        _dh_halves(tl.where(is_ta, 0.0, ga).to(dt), tl.where(is_tb, 0.0, gb).to(dt), USE_A, USE_B, W, WOD, cols_a,
                   mask_a, cols_b, mask_b, col0, DH, rows, row_mask, pid_v, D, stride_w, stride_h, HALF_V, BLOCK_O,
                   EVEN_O, DOT_PRECISION, TMA_W, PROD_STAGES)
    if COMPUTE_DW:
        _dw_halves(tl.trans(ga.to(dt)), tl.trans(gb.to(dt)), USE_A, USE_B, H, HOD, rows, row_mask, row0, DW, cols_a,
                   mask_a, cols_b, mask_b, pid_n, D, stride_h, stride_w, BLOCK_O, EVEN_O, DOT_PRECISION, TMA_H,
                   PROD_STAGES)


@triton.jit
def _dh_halves(Ga, Gb, USE_A: tl.constexpr, USE_B: tl.constexpr, W, WOD, cols_a, mask_a, cols_b, mask_b, col0, DH,
               rows, row_mask, start, D, stride_w, stride_h, HALF_V: tl.constexpr, BLOCK_O: tl.constexpr,
               EVEN_O: tl.constexpr, DOT_PRECISION: tl.constexpr, TMA_W: tl.constexpr, PROD_STAGES: tl.constexpr):
    """DH[rows, c] += Ga @ W[cols_a, c] + Gb @ W[cols_b, c] (the used halves) for every BO-wide chunk c of D from
    chunk ``start`` on (cyclic), one atomic add per chunk; pipelined like :func:`_product_add`'s MODE 2."""
    n_oc = tl.cdiv(D, BLOCK_O)
    offs_o = tl.arange(0, BLOCK_O)
    wa_base = W + cols_a[:, None] * stride_w  # [HV, 1]
    wb_base = W + cols_b[:, None] * stride_w
    dst_base = DH + rows[:, None] * stride_h  # [BN, 1]
    start = start % n_oc
    for i in tl.range(0, n_oc, num_stages=PROD_STAGES):
        oc = start + i
        oc = tl.where(oc >= n_oc, oc - n_oc, oc)
        od = oc * BLOCK_O + offs_o
        if EVEN_O:
            m_out = row_mask[:, None]
        else:
            m_out = row_mask[:, None] & (od < D)[None, :]
        if USE_A:
            part = tl.dot(Ga, _load_src(WOD, wa_base, mask_a, col0, oc * BLOCK_O, offs_o, D, EVEN_O, TMA_W),
                          input_precision=DOT_PRECISION)  # [BN, BO] fp32
            if USE_B:
                part = tl.dot(Gb, _load_src(WOD, wb_base, mask_b, col0 + HALF_V, oc * BLOCK_O, offs_o, D, EVEN_O,
                                            TMA_W), part, input_precision=DOT_PRECISION)
        else:
            part = tl.dot(Gb, _load_src(WOD, wb_base, mask_b, col0 + HALF_V, oc * BLOCK_O, offs_o, D, EVEN_O, TMA_W),
                          input_precision=DOT_PRECISION)
        tl.atomic_add(dst_base + od[None, :], part, mask=m_out, sem="relaxed")


@triton.jit
def _dw_halves(GaT, GbT, USE_A: tl.constexpr, USE_B: tl.constexpr, H, HOD, rows, row_mask, row0, DW, cols_a, mask_a,
               cols_b, mask_b, start, D, stride_h, stride_w, BLOCK_O: tl.constexpr, EVEN_O: tl.constexpr,
               DOT_PRECISION: tl.constexpr, TMA_H: tl.constexpr, PROD_STAGES: tl.constexpr):
    """DW[cols_a, c] += GaT @ H[rows, c] and DW[cols_b, c] += GbT @ H[rows, c] (the used halves) for every BO-wide
    chunk c of D from chunk ``start`` on (cyclic); the hidden chunk is loaded once for both halves."""
    n_oc = tl.cdiv(D, BLOCK_O)
    offs_o = tl.arange(0, BLOCK_O)
    src_base = H + rows[:, None] * stride_h  # [BN, 1]
    da_base = DW + cols_a[:, None] * stride_w  # [HV, 1]
    db_base = DW + cols_b[:, None] * stride_w
    start = start % n_oc
    for i in tl.range(0, n_oc, num_stages=PROD_STAGES):
        oc = start + i
        oc = tl.where(oc >= n_oc, oc - n_oc, oc)
        od = oc * BLOCK_O + offs_o
        src = _load_src(HOD, src_base, row_mask, row0, oc * BLOCK_O, offs_o, D, EVEN_O, TMA_H)  # [BN, BO]
        if EVEN_O:
            col_ok = True
        else:
            col_ok = (od < D)[None, :]
        if USE_A:
            tl.atomic_add(da_base + od[None, :], tl.dot(GaT, src, input_precision=DOT_PRECISION),
                          mask=mask_a[:, None] & col_ok, sem="relaxed")
        if USE_B:
            tl.atomic_add(db_base + od[None, :], tl.dot(GbT, src, input_precision=DOT_PRECISION),
                          mask=mask_b[:, None] & col_ok, sem="relaxed")
