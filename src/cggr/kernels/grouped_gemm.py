"""Persistent ragged grouped GEMMs for token-routed experts (Triton) and the expert-MLP autograd Function.

Shape legend: N tokens (= B·T), d hidden, I expert intermediate, Hc columns of ``w1`` (2I for SwiGLU: gate then up,
else I), E experts, k slots per token, M = N·k (token, slot) pairs. "Sorted rows" are the M pairs ordered by
expert id. Group offsets ``offs`` (E+1,) int32 live on the device: rows ``offs[e]:offs[e+1]`` belong to expert e,
and rows from ``offs[E]`` on are null-routed pairs (sentinel expert E) that no kernel ever visits. Every kernel is
ONE persistent launch over all experts: each program walks a static-stride list of tiles, and the tile → expert
map is computed inside the kernel from ``offs`` (no host synchronisation, static launch shapes).

Forward dataflow (``tok[m]`` = token of sorted row m, ``pair[m]`` = its (token, slot) index, ``w[m]`` = weight)::

    up:    H[m] = x[tok[m]] @ w1[e]                 gather fused into the A loads; epilogue: A = act(H)
    down:  Yp[pair[m]] = w[m] · (A[m] @ w2[e])      routing weight + scatter fused into the epilogue
    y[t] = Σ_slot Yp[t·k + slot]                     deterministic sum over k (no atomics); 0 for null tokens

Backward dataflow (recomputes act(H), act'(H) from the stored pre-activation H; one gather pass first writes
dy[tok] and w·dy[tok] in sorted row order, and x[tok] for dw1, because plain row loads keep the GEMM main loops
faster than gathers inside them)::

    G[m]  = dy[tok[m]] @ w2[e]ᵀ                     a plain grouped GEMM to an (M, I) buffer, then one elementwise
                                                      pass: dw[m] = Σ_i G·act(H), dH = w[m] · G · act'(H)
                                                      (option act_bwd_split=False: both in the GEMM's epilogue,
                                                      dw as per-column-tile partials)
    dXp[pair[m]] = dH[m] @ w1[e]ᵀ;  dx[t] = Σ_slot dXp[t·k + slot]
    dw1[e] = x[tok]ₑᵀ @ dHₑ ;  dw2[e] = Aₑᵀ @ (w · dy[tok])ₑ       ragged-K grouped GEMMs (one launch each)

Inputs are bf16 or fp16; every product accumulates in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

try:  # Triton is optional: the torch path in cggr.moe is the CPU path and the oracle.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    HAS_TRITON = False

__all__ = ["HAS_TRITON", "GemmConfig", "GroupedMLPOptions", "grouped_expert_mlp"]

ACTIVATIONS = {"swiglu": 0, "silu": 1, "gelu": 2}


@dataclass(frozen=True)
class GemmConfig:
    """Tile shape and pipelining of one persistent grouped GEMM."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    num_warps: int = 8
    num_stages: int = 3


@dataclass(frozen=True)
class GroupedMLPOptions:
    """Kernel options of :func:`grouped_expert_mlp` (one :class:`GemmConfig` per launch).

    Attributes:
        up: gathered up-projection with the activation epilogue (for SwiGLU each tile holds gate AND up columns).
        down: down-projection with the routing-weight + scatter epilogue.
        act_bwd: ``dy @ w2ᵀ`` with the routing-weight-gradient and activation-backward epilogue.
        dx: ``dH @ w1ᵀ`` scattered to (token, slot) rows.
        wgrad: the ragged-K weight-gradient GEMM dw1 = x[tok]ᵀ·dH (block_k walks the rows of one expert).
        wgrad2: dw2 = Aᵀ·(w·dy[tok]) (w·dy[tok] is gathered and scaled into sorted rows first).
        programs_per_sm: persistent programs launched per multiprocessor.
        prefetch_h: in ``act_bwd``, load the stored pre-activation tiles before the main loop.
        act_bwd_split: True (default): ``G = dy[tok] @ w2ᵀ`` is a plain grouped GEMM (``act_bwd_gemm``) whose
            (M, I) result goes through a separate elementwise activation-backward pass (one extra round trip of
            G, but the GEMM keeps large tiles: the fused epilogue spills registers at 128-wide tiles).
            False: the fused ``act_bwd`` kernel.
        act_bwd_gemm: tiles of the split GEMM; None picks them from the shape.
        fused_routing: :class:`cggr.moe.PersistentTRMLP` routes with the fused Triton routing kernels
            (:mod:`cggr.kernels.moe_routing`); False: the eager PyTorch routing.
    """

    # defaults: the fastest of the candidates timed by ``bench_moe.py --breakdown`` on an H200
    up: GemmConfig = field(default_factory=lambda: GemmConfig(128, 128, 32, 8, 4))
    down: GemmConfig = field(default_factory=lambda: GemmConfig(128, 256, 64, 8, 4))
    act_bwd: GemmConfig = field(default_factory=lambda: GemmConfig(128, 64, 64, 8, 4))
    dx: GemmConfig = field(default_factory=lambda: GemmConfig(128, 256, 64, 8, 3))
    wgrad: GemmConfig = field(default_factory=lambda: GemmConfig(128, 256, 64, 8, 3))
    wgrad2: GemmConfig = field(default_factory=lambda: GemmConfig(128, 256, 64, 8, 3))
    programs_per_sm: int = 1
    prefetch_h: bool = True
    act_bwd_split: bool = True
    act_bwd_gemm: GemmConfig | None = None
    fused_routing: bool = True


if HAS_TRITON:

    @triton.jit
    def _sched_prologue(offs_ptr, E, BM: tl.constexpr, E_PAD: tl.constexpr):
        """Per-expert row ranges and inclusive cumulative row-tile counts, read once per program."""
        eidx = tl.arange(0, E_PAD)
        emask = eidx < E
        starts = tl.load(offs_ptr + eidx, mask=emask, other=0)
        ends = tl.load(offs_ptr + eidx + 1, mask=emask, other=0)
        ntiles = (ends - starts + BM - 1) // BM
        cum = tl.cumsum(ntiles, 0)
        return eidx, starts, ends, ntiles, cum

    @triton.jit
    def _locate(row_tile, eidx, starts, ends, ntiles, cum, BM: tl.constexpr):
        """Expert, first row and end row of a global row tile (experts with no rows own no tiles)."""
        e = tl.sum((cum <= row_tile).to(tl.int32), 0)
        sel = eidx == e
        first = tl.sum(tl.where(sel, cum - ntiles, 0), 0)
        start = tl.sum(tl.where(sel, starts, 0), 0)
        end = tl.sum(tl.where(sel, ends, 0), 0)
        return e, start + (row_tile - first) * BM, end

    @triton.jit
    def _mainloop(a_ptr, a_rows, stride_am, rmask, b_ptr, stride_bk, stride_bn, cols, cmask, b2_off, K,
                  GATED: tl.constexpr, EVEN_K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                  BK: tl.constexpr):
        """acc[BM, BN] = A[a_rows, :K] @ B[:K, cols] (and the same with B shifted by b2_off when GATED)."""
        rk = tl.arange(0, BK)
        a_ptrs = a_ptr + a_rows[:, None] * stride_am + rk[None, :]
        b_ptrs = b_ptr + rk[:, None] * stride_bk + cols[None, :] * stride_bn
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        acc2 = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(0, K, BK):
            if EVEN_K:
                a = tl.load(a_ptrs, mask=rmask[:, None], other=0.0)
                b = tl.load(b_ptrs, mask=cmask[None, :], other=0.0)
            else:
                kmask = rk < K - k
                a = tl.load(a_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=kmask[:, None] & cmask[None, :], other=0.0)
            acc = tl.dot(a, b, acc)
            if GATED:
                if EVEN_K:
                    b2 = tl.load(b_ptrs + b2_off, mask=cmask[None, :], other=0.0)
                else:
                    b2 = tl.load(b_ptrs + b2_off, mask=kmask[:, None] & cmask[None, :], other=0.0)
                acc2 = tl.dot(a, b2, acc2)
            a_ptrs += BK
            b_ptrs += BK * stride_bk
        return acc, acc2

    @triton.jit
    def _act(h, ACT: tl.constexpr):
        if ACT == 2:  # exact (erf) GELU, as torch.nn.functional.gelu
            return 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476))
        else:  # SiLU (the gate of SwiGLU too)
            return h * tl.sigmoid(h)

    @triton.jit
    def _act_grad(h, ACT: tl.constexpr):
        if ACT == 2:
            return 0.5 * (1.0 + tl.erf(h * 0.7071067811865476)) + h * 0.3989422804014327 * tl.exp(-0.5 * h * h)
        else:
            s = tl.sigmoid(h)
            return s * (1.0 + h * (1.0 - s))

    @triton.jit
    def _rows_kernel(a_ptr, idx_ptr, b_ptr, offs_ptr, out_ptr, pair_ptr, scale_ptr, h_ptr,
                     E, K, N, stride_am, stride_be, stride_bk, stride_bn, stride_om, stride_hm,
                     GATHER_A: tl.constexpr, ACT: tl.constexpr, STORE_H: tl.constexpr,
                     SCATTER: tl.constexpr, SCALE: tl.constexpr, EVEN_K: tl.constexpr, OFF64: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, E_PAD: tl.constexpr,
                     NUM_PROGS: tl.constexpr):
        """Row-ragged grouped GEMM out[rows] = epilogue(A[rows] @ B[e]); ACT: -1 none, 0 SwiGLU, 1 SiLU, 2 GELU."""
        GATED: tl.constexpr = ACT == 0
        pid = tl.program_id(0)
        eidx, starts, ends, ntiles, cum = _sched_prologue(offs_ptr, E, BM, E_PAD)
        n_col = tl.cdiv(N, BN)
        total = tl.sum(ntiles, 0) * n_col
        for tile in range(pid, total, NUM_PROGS):
            row_tile = tile // n_col
            col_tile = tile % n_col
            e, row0, end = _locate(row_tile, eidx, starts, ends, ntiles, cum, BM)
            rows = row0 + tl.arange(0, BM)
            rmask = rows < end
            if GATHER_A:
                a_rows = tl.load(idx_ptr + rows, mask=rmask, other=0).to(tl.int64)
            else:
                a_rows = rows.to(tl.int64)
            cols = col_tile * BN + tl.arange(0, BN)
            cmask = cols < N
            acc, acc2 = _mainloop(a_ptr, a_rows, stride_am, rmask, b_ptr + e.to(tl.int64) * stride_be,
                                  stride_bk, stride_bn, cols, cmask, N * stride_bn, K,
                                  GATED, EVEN_K, BM, BN, BK)
            out_ty = out_ptr.dtype.element_ty
            omask = rmask[:, None] & cmask[None, :]
            # 32-bit element offsets unless the buffers are huge (64-bit offset tensors spill registers)
            rows_o = rows.to(tl.int64) if OFF64 else rows
            if ACT >= 0:
                h = acc.to(out_ty)
                if STORE_H:
                    h_off = rows_o[:, None] * stride_hm + cols[None, :]
                    tl.store(h_ptr + h_off, h, mask=omask)
                    if GATED:
                        tl.store(h_ptr + N + h_off, acc2.to(out_ty), mask=omask)
                res = _act(h.to(tl.float32), ACT)
                if GATED:
                    res = res * acc2.to(out_ty).to(tl.float32)
            else:
                res = acc
            if SCALE:
                res = res * tl.load(scale_ptr + rows, mask=rmask, other=0.0)[:, None]
            if SCATTER:
                o_rows = tl.load(pair_ptr + rows, mask=rmask, other=0)
                o_rows = o_rows.to(tl.int64) if OFF64 else o_rows.to(tl.int32)
            else:
                o_rows = rows_o
            tl.store(out_ptr + (o_rows[:, None] * stride_om + cols[None, :]), res.to(out_ty), mask=omask)

    @triton.jit
    def _act_bwd_kernel(dy_ptr, tok_ptr, w2_ptr, offs_ptr, h_ptr, wt_ptr, dh_ptr, dwp_ptr,
                        E, K, N, M, stride_dym, stride_be, stride_bk, stride_bn, stride_hm,
                        ACT: tl.constexpr, EVEN_K: tl.constexpr, OFF64: tl.constexpr, GATHER_A: tl.constexpr,
                        PREFETCH_H: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                        E_PAD: tl.constexpr, NUM_PROGS: tl.constexpr):
        """G = dy[tok] @ w2[e]ᵀ; epilogue: dw partials Σ G·act(H) and dH = w·G·act'(H).

        With GATHER_A False, ``dy_ptr`` already holds the gathered rows dy[tok] in sorted order. PREFETCH_H issues
        the loads of the H tiles before the main loop so that their latency hides behind it.
        """
        GATED: tl.constexpr = ACT == 0
        pid = tl.program_id(0)
        eidx, starts, ends, ntiles, cum = _sched_prologue(offs_ptr, E, BM, E_PAD)
        n_col = tl.cdiv(N, BN)
        total = tl.sum(ntiles, 0) * n_col
        for tile in range(pid, total, NUM_PROGS):
            row_tile = tile // n_col
            col_tile = tile % n_col
            e, row0, end = _locate(row_tile, eidx, starts, ends, ntiles, cum, BM)
            rows = row0 + tl.arange(0, BM)
            rmask = rows < end
            if GATHER_A:
                a_rows = tl.load(tok_ptr + rows, mask=rmask, other=0).to(tl.int64)
            else:
                a_rows = rows.to(tl.int64)
            cols = col_tile * BN + tl.arange(0, BN)
            cmask = cols < N
            omask = rmask[:, None] & cmask[None, :]
            rows_o = rows.to(tl.int64) if OFF64 else rows
            off = rows_o[:, None] * stride_hm + cols[None, :]  # h and dh share the (M, Hc) layout
            if PREFETCH_H:
                hg_raw = tl.load(h_ptr + off, mask=omask, other=0.0)
                if GATED:
                    hu_raw = tl.load(h_ptr + N + off, mask=omask, other=0.0)
            g, _unused = _mainloop(dy_ptr, a_rows, stride_dym, rmask, w2_ptr + e.to(tl.int64) * stride_be,
                                   stride_bk, stride_bn, cols, cmask, 0, K, False, EVEN_K, BM, BN, BK)
            if not PREFETCH_H:
                hg_raw = tl.load(h_ptr + off, mask=omask, other=0.0)
                if GATED:
                    hu_raw = tl.load(h_ptr + N + off, mask=omask, other=0.0)
            w = tl.load(wt_ptr + rows, mask=rmask, other=0.0)
            hg = hg_raw.to(tl.float32)
            da = g * w[:, None]
            out_ty = dh_ptr.dtype.element_ty
            if GATED:
                hu = hu_raw.to(tl.float32)
                s = tl.sigmoid(hg)
                silu = hg * s
                dwp = tl.sum(g * (silu * hu), 1)
                tl.store(dh_ptr + off, (da * hu * (s * (1.0 + hg * (1.0 - s)))).to(out_ty), mask=omask)
                tl.store(dh_ptr + N + off, (da * silu).to(out_ty), mask=omask)
            else:
                dwp = tl.sum(g * _act(hg, ACT), 1)
                tl.store(dh_ptr + off, (da * _act_grad(hg, ACT)).to(out_ty), mask=omask)
            tl.store(dwp_ptr + col_tile.to(tl.int64) * M + rows, dwp, mask=rmask)

    @triton.jit
    def _act_bwd_ew_kernel(g_ptr, h_ptr, wt_ptr, offs_ptr, dh_ptr, dw_ptr, E, N, stride_gm, stride_hm,
                           ACT: tl.constexpr, BN: tl.constexpr):
        """Activation backward of one sorted row m (one program per row) from G = dy[tok] @ w2ᵀ (M, I):
        dH = w·G·act'(H) and dw[m] = Σ_i G·act(H); rows m >= offs[E] get dw = 0 and no dH."""
        m = tl.program_id(0)
        n_eff = tl.where(m < tl.load(offs_ptr + E), N, 0)  # 0: a null-routed row, every access masked
        w = tl.load(wt_ptr + m)  # m < M: in bounds (rows past offs[E] are masked below)
        g_row = g_ptr + m.to(tl.int64) * stride_gm
        h_row = h_ptr + m.to(tl.int64) * stride_hm  # h and dh share the (M, Hc) layout
        dh_row = dh_ptr + m.to(tl.int64) * stride_hm
        dw = tl.zeros((BN,), dtype=tl.float32)
        out_ty = dh_ptr.dtype.element_ty
        for n0 in range(0, N, BN):
            cols = n0 + tl.arange(0, BN)
            cm = cols < n_eff
            g = tl.load(g_row + cols, mask=cm, other=0.0).to(tl.float32)
            hg = tl.load(h_row + cols, mask=cm, other=0.0).to(tl.float32)
            da = g * w
            if ACT == 0:
                hu = tl.load(h_row + N + cols, mask=cm, other=0.0).to(tl.float32)
                s = tl.sigmoid(hg)
                silu = hg * s
                dw += g * (silu * hu)
                tl.store(dh_row + cols, (da * hu * (s * (1.0 + hg * (1.0 - s)))).to(out_ty), mask=cm)
                tl.store(dh_row + N + cols, (da * silu).to(out_ty), mask=cm)
            else:
                dw += g * _act(hg, ACT)
                tl.store(dh_row + cols, (da * _act_grad(hg, ACT)).to(out_ty), mask=cm)
        tl.store(dw_ptr + m, tl.sum(dw, 0))

    @triton.jit
    def _gather_kernel(src_ptr, idx_ptr, scale_ptr, offs_ptr, dst_ptr, dst2_ptr, E, D, stride_s, stride_d,
                       PLAIN: tl.constexpr, SCALED: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr):
        """dst[m] = src[idx[m]] and/or dst2[m] = scale[m] · src[idx[m]] (fp32 product, one rounding) for the
        routed sorted rows m < offs[E]; one read of the source rows."""
        rows = tl.program_id(0) * BR + tl.arange(0, BR)
        rmask = rows < tl.load(offs_ptr + E)
        src_rows = tl.load(idx_ptr + rows, mask=rmask, other=0).to(tl.int64)
        if SCALED:
            s = tl.load(scale_ptr + rows, mask=rmask, other=0.0)
        dst_rows = rows.to(tl.int64)[:, None] * stride_d
        for d0 in range(0, D, BD):
            cols = d0 + tl.arange(0, BD)
            m = rmask[:, None] & (cols < D)[None, :]
            v = tl.load(src_ptr + src_rows[:, None] * stride_s + cols[None, :], mask=m, other=0.0)
            if PLAIN:
                tl.store(dst_ptr + dst_rows + cols[None, :], v, mask=m)
            if SCALED:
                tl.store(dst2_ptr + dst_rows + cols[None, :],
                         (v.to(tl.float32) * s[:, None]).to(dst2_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _wgrad_kernel(l_ptr, l_idx_ptr, r_ptr, r_idx_ptr, r_scale_ptr, offs_ptr, out_ptr,
                      E, P, Q, stride_lm, stride_rm, stride_oe, stride_op,
                      GATHER_L: tl.constexpr, GATHER_R: tl.constexpr, SCALE_R: tl.constexpr,
                      P_FAST: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                      NUM_PROGS: tl.constexpr):
        """out[e] (P, Q) = L[rows of e]ᵀ @ R[rows of e]: the reduction runs over the ragged rows of one expert."""
        pid = tl.program_id(0)
        n_p = tl.cdiv(P, BM)
        n_q = tl.cdiv(Q, BN)
        per_e = n_p * n_q
        total = E * per_e
        for tile in range(pid, total, NUM_PROGS):
            e = tile // per_e
            rem = tile % per_e
            if P_FAST:
                tp = rem % n_p
                tq = rem // n_p
            else:
                tp = rem // n_q
                tq = rem % n_q
            start = tl.load(offs_ptr + e)
            end = tl.load(offs_ptr + e + 1)
            p = tp * BM + tl.arange(0, BM)
            q = tq * BN + tl.arange(0, BN)
            pmask = p < P
            qmask = q < Q
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            for r0 in range(start, end, BK):
                rows = r0 + tl.arange(0, BK)
                rmask = rows < end
                if GATHER_L:
                    li = tl.load(l_idx_ptr + rows, mask=rmask, other=0).to(tl.int64)
                else:
                    li = rows.to(tl.int64)
                if GATHER_R:
                    ri = tl.load(r_idx_ptr + rows, mask=rmask, other=0).to(tl.int64)
                else:
                    ri = rows.to(tl.int64)
                lt = tl.load(l_ptr + li[:, None] * stride_lm + p[None, :], mask=rmask[:, None] & pmask[None, :],
                             other=0.0)
                rt = tl.load(r_ptr + ri[:, None] * stride_rm + q[None, :], mask=rmask[:, None] & qmask[None, :],
                             other=0.0)
                if SCALE_R:
                    s = tl.load(r_scale_ptr + rows, mask=rmask, other=0.0)
                    rt = (rt.to(tl.float32) * s[:, None]).to(lt.dtype)
                acc = tl.dot(tl.trans(lt), rt, acc)
            o_ptrs = out_ptr + e.to(tl.int64) * stride_oe + p[:, None].to(tl.int64) * stride_op + q[None, :]
            tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=pmask[:, None] & qmask[None, :])


def _num_programs(device: torch.device, upper_bound: int, opts: GroupedMLPOptions) -> int:
    # CPU tensors only reach the kernels under TRITON_INTERPRET=1 (tests): 3 programs exercise the tile striding
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 3
    return max(1, min(sms * opts.programs_per_sm, upper_bound))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _launch_rows(a, idx, b, offs, out, pair, scale, h, *, n_rows, K, N, stride_be, stride_bk, stride_bn, act, cfg,
                 opts):
    E = offs.shape[0] - 1
    upper = (_cdiv(n_rows, cfg.block_m) + E) * _cdiv(N, cfg.block_n)  # bound on the row tiles of all groups
    nprog = _num_programs(a.device, upper, opts)
    dummy = offs
    _rows_kernel[(nprog,)](
        a, idx if idx is not None else dummy, b, offs, out, pair if pair is not None else dummy,
        scale if scale is not None else dummy, h if h is not None else out,
        E, K, N, a.stride(0), stride_be, stride_bk, stride_bn, out.stride(0), h.stride(0) if h is not None else 0,
        GATHER_A=idx is not None, ACT=act, STORE_H=h is not None, SCATTER=pair is not None,
        SCALE=scale is not None, EVEN_K=K % cfg.block_k == 0,
        OFF64=max(out.numel(), h.numel() if h is not None else 0) >= 2**31,
        BM=cfg.block_m, BN=cfg.block_n, BK=cfg.block_k, E_PAD=triton.next_power_of_2(E + 1),
        NUM_PROGS=nprog, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def _launch_wgrad(lmat, l_idx, rmat, r_idx, r_scale, offs, out, *, cfg, opts):
    E, P, Q = out.shape
    n_p, n_q = _cdiv(P, cfg.block_m), _cdiv(Q, cfg.block_n)
    nprog = _num_programs(out.device, E * n_p * n_q, opts)
    dummy = offs
    _wgrad_kernel[(nprog,)](
        lmat, l_idx if l_idx is not None else dummy, rmat, r_idx if r_idx is not None else dummy,
        r_scale if r_scale is not None else dummy, offs, out,
        E, P, Q, lmat.stride(0), rmat.stride(0), out.stride(0), out.stride(1),
        GATHER_L=l_idx is not None, GATHER_R=r_idx is not None, SCALE_R=r_scale is not None,
        P_FAST=n_p <= n_q, BM=cfg.block_m, BN=cfg.block_n, BK=cfg.block_k, NUM_PROGS=nprog,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def _launch_gather(src, idx, offs, n_rows, *, plain=True, scale=None):
    """Sorted-row copies of ``src[idx]`` (M, D) and/or ``scale · src[idx]``; rows past offs[E] are left unwritten."""
    d = src.shape[1]
    dst = torch.empty(n_rows, d, device=src.device, dtype=src.dtype) if plain else None
    dst2 = torch.empty(n_rows, d, device=src.device, dtype=src.dtype) if scale is not None else None
    ref = dst if dst is not None else dst2
    _gather_kernel[(_cdiv(n_rows, 32),)](
        src, idx, scale if scale is not None else offs, offs, ref, dst2 if dst2 is not None else ref,
        offs.shape[0] - 1, d, src.stride(0), ref.stride(0), PLAIN=plain, SCALED=scale is not None,
        BR=32, BD=min(256, triton.next_power_of_2(d)), num_warps=4,
    )
    return dst, dst2


def _launch_act_bwd(dy, tok, w2, offs, h, weights, dh, *, act, cfg, opts):
    """Launch the G = dy[tok] @ w2ᵀ kernel (``tok`` None: dy holds sorted rows already); fills dh (M, Hc) and
    returns the (n_col_tiles, M) dw partials."""
    n_rows, d, inter = h.shape[0], dy.shape[1], w2.shape[1]
    if h.stride() != dh.stride():
        raise ValueError(f"h and dh must share one layout, got strides {h.stride()} and {dh.stride()}")
    n_col = _cdiv(inter, cfg.block_n)
    dwp = torch.zeros(n_col, n_rows, device=dy.device, dtype=torch.float32)  # rows never visited stay 0
    E = offs.shape[0] - 1
    nprog = _num_programs(dy.device, (_cdiv(n_rows, cfg.block_m) + E) * n_col, opts)
    _act_bwd_kernel[(nprog,)](
        dy, tok if tok is not None else offs, w2, offs, h, weights, dh, dwp,
        E, d, inter, n_rows, dy.stride(0), w2.stride(0), w2.stride(2), w2.stride(1), h.stride(0),
        ACT=act, EVEN_K=d % cfg.block_k == 0, OFF64=h.numel() >= 2**31,
        GATHER_A=tok is not None, PREFETCH_H=opts.prefetch_h, BM=cfg.block_m, BN=cfg.block_n, BK=cfg.block_k,
        E_PAD=triton.next_power_of_2(E + 1), NUM_PROGS=nprog, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return dwp


def _act_bwd_gemm_cfg(inter: int, opts: GroupedMLPOptions) -> GemmConfig:
    """Tiles of the split G GEMM (K = d, N = I): 128x256 unless 256-wide column tiles waste > 5 % on padding."""
    if opts.act_bwd_gemm is not None:
        return opts.act_bwd_gemm
    if inter <= 128 or _cdiv(inter, 256) * 256 > 1.05 * inter:
        return GemmConfig(128, 128, 64, 8, 4)
    return GemmConfig(128, 256, 64, 8, 3)


def _launch_act_bwd_split(dyg, w2, offs, h, weights, dh, *, act, opts):
    """G = dyg @ w2[e]ᵀ (plain grouped GEMM on the sorted rows dyg), then the elementwise activation backward.
    Fills dh (M, Hc); returns dweights (M,) fp32 (0 past offs[E])."""
    n_rows, d, inter = h.shape[0], dyg.shape[1], w2.shape[1]
    if h.stride() != dh.stride():
        raise ValueError(f"h and dh must share one layout, got strides {h.stride()} and {dh.stride()}")
    g = torch.empty(n_rows, inter, device=dyg.device, dtype=dyg.dtype)  # (M, I), rows past offs[E] unwritten
    _launch_rows(dyg, None, w2, offs, g, None, None, None, n_rows=n_rows, K=d, N=inter, stride_be=w2.stride(0),
                 stride_bk=w2.stride(2), stride_bn=w2.stride(1), act=-1, cfg=_act_bwd_gemm_cfg(inter, opts),
                 opts=opts)
    dw = torch.empty(n_rows, device=dyg.device, dtype=torch.float32)
    if n_rows:
        _act_bwd_ew_kernel[(n_rows,)](
            g, h, weights, offs, dh, dw, offs.shape[0] - 1, inter, g.stride(0), h.stride(0),
            ACT=act, BN=min(1024, max(128, triton.next_power_of_2(inter))), num_warps=4, num_stages=2,
        )
    return dw


def _sum_slots(pairs: torch.Tensor, routed: torch.Tensor | None, top_k: int) -> torch.Tensor:
    """(M, d) per-(token, slot) rows -> (N, d) sums over the k slots (:mod:`cggr.kernels.moe_slot_sum`); rows of
    null-routed tokens are never written by the kernels and are not read: their sums are 0. ``routed`` None
    means every token is routed."""
    from cggr.kernels.moe_slot_sum import sum_slots

    return sum_slots(pairs, routed, top_k)


class _GroupedExpertMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, w2, weights, tok, pair, offs, routed, top_k, activation, opts):
        # x (N, d); w1 (E, d, Hc); w2 (E, I, d); weights (M,) fp32 in sorted order; tok/pair (M,) int32;
        # offs (E+1,) int32; routed (N,) bool or None (all routed)
        act = ACTIVATIONS[activation]
        n_rows, d = tok.shape[0], x.shape[1]
        inter = w2.shape[1]
        hc = w1.shape[2]
        need_grad = any(ctx.needs_input_grad[:4])
        a = torch.empty(n_rows, inter, device=x.device, dtype=x.dtype)  # (M, I) activations, sorted rows
        h = torch.empty(n_rows, hc, device=x.device, dtype=x.dtype) if need_grad else None  # (M, Hc)
        _launch_rows(x, tok, w1, offs, a, None, None, h, n_rows=n_rows, K=d, N=inter, stride_be=w1.stride(0),
                     stride_bk=w1.stride(1), stride_bn=w1.stride(2), act=act, cfg=opts.up, opts=opts)
        yp = torch.empty(n_rows, d, device=x.device, dtype=x.dtype)  # (M, d) weighted expert outputs, pair rows
        _launch_rows(a, None, w2, offs, yp, pair, weights, None, n_rows=n_rows, K=inter, N=d, stride_be=w2.stride(0),
                     stride_bk=w2.stride(1), stride_bn=w2.stride(2), act=-1, cfg=opts.down, opts=opts)
        y = _sum_slots(yp, routed, top_k)
        if need_grad:
            ctx.save_for_backward(x, w1, w2, weights, tok, pair, offs, routed, h, a)
        ctx.top_k, ctx.act, ctx.opts = top_k, act, opts
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w1, w2, weights, tok, pair, offs, routed, h, a = ctx.saved_tensors
        opts, act, top_k = ctx.opts, ctx.act, ctx.top_k
        dy = dy.contiguous().to(x.dtype)  # (N, d)
        n_rows, d = tok.shape[0], x.shape[1]
        hc = w1.shape[2]
        # gathered (and, for dW2, routing-weighted) sorted copies of dy: plain loads make the GEMMs faster than
        # gathers inside their main loops (measured: bench_moe.py --breakdown)
        dyg, dyw = _launch_gather(dy, tok, offs, n_rows, scale=weights if ctx.needs_input_grad[2] else None)
        dh = torch.empty(n_rows, hc, device=x.device, dtype=x.dtype)  # (M, Hc)
        if opts.act_bwd_split:
            dweights = _launch_act_bwd_split(dyg, w2, offs, h, weights, dh, act=act, opts=opts)  # (M,)
        else:
            dwp = _launch_act_bwd(dyg, None, w2, offs, h, weights, dh, act=act, cfg=opts.act_bwd, opts=opts)
            dweights = dwp.sum(0)  # (M,)
        del dyg
        dx = dw1 = dw2 = None
        if ctx.needs_input_grad[0]:
            dxp = torch.empty(n_rows, d, device=x.device, dtype=x.dtype)  # (M, d) pair rows
            _launch_rows(dh, None, w1, offs, dxp, pair, None, None, n_rows=n_rows, K=hc, N=d, stride_be=w1.stride(0),
                         stride_bk=w1.stride(2), stride_bn=w1.stride(1), act=-1, cfg=opts.dx, opts=opts)
            dx = _sum_slots(dxp, routed, top_k)
        if ctx.needs_input_grad[1]:
            dw1 = torch.empty_like(w1)  # (E, d, Hc)
            xs, _ = _launch_gather(x, tok, offs, n_rows)  # (M, d) x[tok]
            _launch_wgrad(xs, None, dh, None, None, offs, dw1, cfg=opts.wgrad, opts=opts)
        if ctx.needs_input_grad[2]:
            dw2 = torch.empty_like(w2)  # (E, I, d)
            _launch_wgrad(a, None, dyw, None, None, offs, dw2, cfg=opts.wgrad2, opts=opts)
        if not ctx.needs_input_grad[3]:
            dweights = None
        return dx, dw1, dw2, dweights, None, None, None, None, None, None, None


def grouped_expert_mlp(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
                       tok: torch.Tensor, pair: torch.Tensor, offs: torch.Tensor, routed: torch.Tensor | None, *,
                       top_k: int, activation: str, options: GroupedMLPOptions | None = None) -> torch.Tensor:
    """Expert MLP of routed tokens with persistent grouped-GEMM Triton kernels (forward + backward).

    Args:
        x: (N, d) tokens, bf16 or fp16, CUDA.
        w1: (E, d, Hc) up-projections (Hc = 2I for ``'swiglu'``: gate columns then up columns).
        w2: (E, I, d) down-projections.
        weights: (M,) fp32 routing weights of the sorted rows (differentiable).
        tok: (M,) int32/int64 token of each sorted row. pair: (M,) (token, slot) index t·k + slot of each row.
        offs: (E+1,) int32 group offsets (rows past ``offs[E]`` are null-routed and never visited).
        routed: (N,) bool, False for null-routed tokens (their output and input gradient are 0); None when
            every token is routed (no token_mask).
        top_k: slots per token k (M = N·k). activation: ``'swiglu'``, ``'silu'`` or ``'gelu'``.
        options: kernel tile configuration.

    Returns:
        (N, d) ``y[t] = Σ_slot w · expert(x[t])`` in the dtype of ``x``.
    """
    if not HAS_TRITON:
        raise RuntimeError("grouped_expert_mlp needs triton (pip install 'cggr[cuda]'), which is not importable")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
    if not x.is_cuda:
        raise ValueError(f"grouped_expert_mlp runs on CUDA tensors only, got x on {x.device}")
    if x.dtype not in (torch.bfloat16, torch.float16) or w1.dtype != x.dtype or w2.dtype != x.dtype:
        raise TypeError(f"x, w1, w2 must all be bf16 or all fp16, got {x.dtype}, {w1.dtype}, {w2.dtype}")
    x, w1, w2 = x.contiguous(), w1.contiguous(), w2.contiguous()
    return _GroupedExpertMLP.apply(x, w1, w2, weights.float().contiguous(), tok, pair, offs, routed, top_k,
                                   activation, options or GroupedMLPOptions())
