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
products) shared with the split backward are in :mod:`cggr.kernels._linear_ce_tiles`, the kernels and launch helpers
both schedules use (merge, target fix-up, device queries, TMA descriptors, accumulators) in
:mod:`cggr.kernels._linear_ce_launch`.

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
from cggr.kernels._linear_ce_tiles import (
    _fwd_fold,
    _live_max,
    _logits_tile,
    _product_add,
    _softmax_grad,
    _tile_columns,
    _tile_sums,
    _weighted,
)
from cggr.kernels._utils import NEG_BIG
from cggr.kernels.linear_cross_entropy_fused_halves import _bwd_tile_halves


# ---------------------------------------------------------------------------------------------- forward
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


def _programs_target(device: torch.device) -> int:
    """Programs the forward aims for (it splits the vocabulary until it has that many): eight per SM, so that
    the last, partial wave costs at most ~1/8 of the time; the partial states cost 24 · S bytes per row."""
    if device.type != "cuda":
        return 8  # interpreter: a few splits, so that the merge is exercised
    return 8 * num_sms(device.index if device.index is not None else torch.cuda.current_device())



@on_input_device
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
    cfg = dict(config or default_config(hidden.dtype, interpreting(), d, smem_per_block(hidden.device)))
    bn, bv, bd = (cfg.get("FWD_" + k, cfg[k]) for k in ("BLOCK_N", "BLOCK_V", "BLOCK_D"))
    n_nb, n_vb = triton.cdiv(n, bn), triton.cdiv(vocab, bv)
    splits = max(1, min(n_vb, triton.cdiv(_programs_target(hidden.device), n_nb)))
    vb_per_split = triton.cdiv(n_vb, splits)
    splits = triton.cdiv(n_vb, vb_per_split)  # no empty split
    part = torch.empty(6, splits, n, dtype=torch.float32, device=hidden.device)
    tma = tma_usable(cfg, hidden, weight)
    LAST_LAUNCHED["fwd_stats"] = _fwd_stats_kernel[(n_nb, splits)](
        hidden, weight, bias if bias is not None else hidden, targets, part,
        descriptor(hidden, (bn, bd), tma), descriptor(weight, (bv, bd), tma), n, vocab, d,
        hidden.stride(0), weight.stride(0), vb_per_split, float(softcap) if softcap is not None else 1.0,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=bd,
        EVEN_D=d % bd == 0, DOT_PRECISION=dot_precision(hidden.dtype), FLATTEN=bool(cfg.get("FLATTEN", False)),
        TMA_H=tma, TMA_W=tma,
        num_warps=cfg.get("FWD_num_warps", cfg["num_warps"]), num_stages=cfg.get("FWD_num_stages", cfg["num_stages"]),
    )
    merge_block = 1024 if not interpreting() else 64
    _merge_kernel[(triton.cdiv(n, merge_block),)](
        part, stats, targets, n, splits, ignore_index, BLOCK=merge_block, num_warps=4,
    )
    return stats, (None, None, None)
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
        cfg = dict(config or default_config(hidden.dtype, interpreting(), d, smem_per_block(dev),
                                            wide_backward=atomic))
        bn, bv, bo = cfg["BLOCK_N"], cfg["BLOCK_V"], cfg["BLOCK_O"]
        n_nb, n_vb, n_oc = triton.cdiv(r, bn), triton.cdiv(vocab, bv), triton.cdiv(d, bo)
        lock_h = None if d_h is None or dh_fp32 or atomic else torch.zeros(n_nb * n_oc, dtype=torch.int32, device=dev)
        lock_w = None if d_w is None or dw_fp32 or atomic else torch.zeros(n_vb * n_oc, dtype=torch.int32, device=dev)
        dummy = lse
        c_t = torch.zeros(r, dtype=torch.float32, device=dev) if d_h is not None else dummy  # (R,) target coeffs
        bd = cfg["BLOCK_D"]
        tma_w = tma_usable(cfg, hidden, weight)
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
            descriptor(hidden, (bn, bd), tma_h), descriptor(weight, (bvw, bd), tma_w),
            descriptor(hidden, (bn, bo), tma_h), descriptor(weight, (bvw, bo), tma_w),
            r, vocab, d, hidden.stride(0), weight.stride(0),
            float(softcap) if softcap is not None else 1.0, float(filter_eps) if filter_eps is not None else 0.0,
            HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, HAS_IDX=idx is not None,
            COMPUTE_DH=d_h is not None, COMPUTE_DW=d_w is not None, COMPUTE_DB=d_b is not None,
            DH_ATOMIC=dh_fp32 or atomic, DW_ATOMIC=dw_fp32 or atomic, FILTER=filter_eps is not None,
            BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=bd, BLOCK_O=bo, GROUP_N=cfg["GROUP_N"],
            EVEN_D=d % bd == 0, EVEN_O=d % bo == 0, DOT_PRECISION=dot_precision(hidden.dtype),
            TMA_H=tma_h, TMA_W=tma_w, PROD_STAGES=cfg.get("PROD_STAGES", cfg["num_stages"]), HALVES=halves,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
        if d_h is not None:
            _target_fixup_kernel[(r,)](
                d_h, weight, targets, idx if idx is not None else targets, c_t, d, d_h.stride(0), weight.stride(0),
                HAS_IDX=idx is not None, BLOCK=min(1024, triton.next_power_of_2(d)), num_warps=4,
            )
    return in_input_dtypes(d_h, d_w, d_b, hidden, weight, bias)
