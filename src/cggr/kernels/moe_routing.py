"""Fused token routing for :class:`cggr.moe.PersistentTRMLP` (Triton): softmax, top-k, counting sort, aux loss.

Shape legend: N tokens, E experts, k = ``top_k`` slots per token, M = N·k (token, slot) pairs, E_PAD the next
power of two above E (column E of the per-block tables holds the null-routed pairs), n_blk = ceil(N / BT) token
blocks of BT tokens.

The router logits (N, E) come from one cuBLAS GEMM (``F.linear``) outside this module; everything after it runs
in three launches with no host synchronisation:

Forward::

    1. per token block:  p = softmax(z) in fp32, lse = logsumexp(z); top-k experts by logit, descending, the
                         LOWEST expert index first among equal logits (the torch path sorts stably, so both
                         paths pick the same experts); w = p[top] / Σ p[top]; per-block tables: routed pairs per
                         expert (null-routed tokens count k pairs in column E), Σ_routed p, Σ_routed lse²
    2. one program:      counts (E+1,), group offsets offs (E+1,) and each block's first row per expert
                         (one exclusive scan over the blocks: a stable counting sort), the load-balancing loss
                         E·Σ_e counts_e·ΣP_e / (n_r²·k) and the z-loss Σ lse² / n_r (n_r routed tokens, >= 1)
    3. per token block:  the sorted row of each pair = its block's first row for the expert + the number of
                         earlier tokens of the block with that expert (null pairs: sentinel E, in pair order);
                         writes tok, pair = t·k + slot and the routing weight at that row, and pos (N, k)

The rows are in the order of ``torch.sort(expert_of_pair, stable=True)`` on the torch path: the same permutation.

Backward (one launch, recomputing p and lse from the logits)::

    dw_j      = dweights[pos[t, j]]                              (0 for null-routed tokens)
    dp[top_j] = (dw_j - Σ_i dw_i·w_i) / Σ p[top]                 renormalisation
    dp[e]    += dbalance · E · counts_e / (n_r²·k)                routed tokens only
    dlogits   = p ⊙ (dp - Σ p·dp) + dz · 2·lse/n_r · p           softmax; logsumexp (routed tokens only)

This module imports Triton at the top: import it only where Triton is known to be importable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["fused_route"]


@triton.jit
def _softmax_rows(logits_ptr, t, tmask, e, emask, stride_l):
    """fp32 logits (BT, E_PAD) (-inf padding), probabilities and logsumexp of a block of tokens."""
    m2 = tmask[:, None] & emask[None, :]
    z = tl.load(logits_ptr + t.to(tl.int64)[:, None] * stride_l + e[None, :], mask=m2,
                other=float("-inf")).to(tl.float32)
    mx = tl.where(tmask, tl.max(z, 1), 0.0)
    ex = tl.exp(z - mx[:, None])
    ssum = tl.where(tmask, tl.sum(ex, 1), 1.0)
    return z, ex / ssum[:, None], mx + tl.log(ssum)


@triton.jit
def _routed_rows(mask_ptr, t, tmask, HAS_MASK: tl.constexpr):
    if HAS_MASK:
        return (tl.load(mask_ptr + t, mask=tmask, other=0) != 0) & tmask
    return tmask


@triton.jit
def _route_fwd_kernel(logits_ptr, mask_ptr, probs_ptr, idx_ptr, topw_ptr, hist_ptr, psum_ptr, zsum_ptr,
                      N, E, stride_l, K: tl.constexpr, HAS_MASK: tl.constexpr, BT: tl.constexpr,
                      E_PAD: tl.constexpr):
    blk = tl.program_id(0)
    t = blk * BT + tl.arange(0, BT)
    tmask = t < N
    e = tl.arange(0, E_PAD)
    emask = e < E
    z, p, lse = _softmax_rows(logits_ptr, t, tmask, e, emask, stride_l)
    routed = _routed_rows(mask_ptr, t, tmask, HAS_MASK)
    t64 = t.to(tl.int64)
    tl.store(probs_ptr + t64[:, None] * E + e[None, :], p, mask=tmask[:, None] & emask[None, :])
    ecol = e[None, :] + tl.zeros((BT, E_PAD), dtype=tl.int32)
    free = tl.where(emask[None, :], 1, 0) + tl.zeros((BT, E_PAD), dtype=tl.int32)  # 1 = not chosen yet
    rank = tl.zeros((BT, E_PAD), dtype=tl.int32)
    for j in range(K):
        v = tl.max(tl.where(free != 0, z, float("-inf")), 1)
        ej = tl.min(tl.where((free != 0) & (z == v[:, None]), ecol, E_PAD), 1)
        # NaN logits match nothing: take the lowest free expert so that the k experts stay distinct and in range
        ej = tl.where(ej < E_PAD, ej, tl.min(tl.where(free != 0, ecol, E_PAD), 1))
        hit = ecol == ej[:, None]
        rank = tl.where(hit, j, rank)
        free = tl.where(hit, 0, free)
    sel = (free == 0) & emask[None, :]
    s = tl.where(tmask, tl.sum(tl.where(sel, p, 0.0), 1), 1.0)
    out = t64[:, None] * K + rank
    smask = sel & tmask[:, None]
    tl.store(idx_ptr + out, ecol, mask=smask)
    tl.store(topw_ptr + out, p / s[:, None], mask=smask)
    r2 = sel & routed[:, None]
    cnt = tl.sum(r2.to(tl.int32), 0)  # (E_PAD,), 0 in the padding columns
    n_null = tl.sum((tmask & (routed == 0)).to(tl.int32), 0) * K
    tl.store(hist_ptr + blk * E_PAD + e, tl.where(e == E, n_null, cnt))
    tl.store(psum_ptr + blk * E_PAD + e, tl.sum(tl.where(routed[:, None], p, 0.0), 0))
    tl.store(zsum_ptr + blk, tl.sum(tl.where(routed, lse * lse, 0.0), 0))


@triton.jit
def _route_scan_kernel(hist_ptr, psum_ptr, zsum_ptr, base_ptr, counts_ptr, offs_ptr, bal_ptr, z_ptr, n_blk, E,
                       K: tl.constexpr, RB: tl.constexpr, E_PAD: tl.constexpr):
    """One pass over the block tables: base[b, e] = pairs of expert e in blocks < b (relative to offs[e]),
    then counts, offs and the two loss terms."""
    e = tl.arange(0, E_PAD)
    carry = tl.zeros((E_PAD,), dtype=tl.int32)
    ps = tl.zeros((E_PAD,), dtype=tl.float32)
    zs = tl.zeros((RB,), dtype=tl.float32)
    for b0 in range(0, n_blk, RB):
        rows = b0 + tl.arange(0, RB)
        rm = rows < n_blk
        off = rows[:, None] * E_PAD + e[None, :]
        h = tl.load(hist_ptr + off, mask=rm[:, None], other=0)
        tl.store(base_ptr + off, carry[None, :] + tl.cumsum(h, 0) - h, mask=rm[:, None])
        carry += tl.sum(h, 0)
        ps += tl.sum(tl.load(psum_ptr + off, mask=rm[:, None], other=0.0), 0)
        zs += tl.load(zsum_ptr + rows, mask=rm, other=0.0)
    start = tl.cumsum(carry, 0) - carry  # first sorted row of each expert; start[E] = routed pairs
    tl.store(counts_ptr + e, carry, mask=e <= E)
    tl.store(offs_ptr + e, start, mask=e <= E)
    n_r = tl.maximum(tl.sum(tl.where(e == E, start, 0), 0) // K, 1).to(tl.float32)
    bal = tl.sum(tl.where(e < E, carry.to(tl.float32) * ps, 0.0), 0)
    tl.store(bal_ptr, bal * E / (n_r * n_r * K))
    tl.store(z_ptr, tl.sum(zs, 0) / n_r)


@triton.jit
def _route_scatter_kernel(idx_ptr, topw_ptr, mask_ptr, base_ptr, offs_ptr, pos_ptr, tok_ptr, pair_ptr, w_ptr, N, E,
                          K: tl.constexpr, HAS_MASK: tl.constexpr, BT: tl.constexpr, E_PAD: tl.constexpr):
    blk = tl.program_id(0)
    t = blk * BT + tl.arange(0, BT)
    tmask = t < N
    e = tl.arange(0, E_PAD)
    routed = _routed_rows(mask_ptr, t, tmask, HAS_MASK)
    # token-level membership (the k experts of a token are distinct); column E: null-routed tokens
    member = tl.zeros((BT, E_PAD), dtype=tl.int32)
    for j in range(K):
        ej = tl.load(idx_ptr + t * K + j, mask=tmask, other=E_PAD)
        member += (e[None, :] == ej[:, None]).to(tl.int32)
    member = tl.where(routed[:, None], member, 0)
    member = tl.where(e[None, :] == E, (tmask & (routed == 0)).to(tl.int32)[:, None], member)
    excl = tl.cumsum(member, 0) - member  # earlier tokens of this block with the same expert
    base = tl.load(base_ptr + blk * E_PAD + e) + tl.load(offs_ptr + e, mask=e <= E, other=0)  # (E_PAD,)
    first = base[None, :] + excl
    null_first = tl.sum(tl.where(e == E, base, 0), 0) + tl.sum(tl.where(e[None, :] == E, excl, 0), 1) * K
    for j in range(K):
        ej = tl.load(idx_ptr + t * K + j, mask=tmask, other=E_PAD)
        pos = tl.where(routed, tl.sum(tl.where(e[None, :] == ej[:, None], first, 0), 1), null_first + j)
        tl.store(pos_ptr + t * K + j, pos, mask=tmask)
        tl.store(tok_ptr + pos, t, mask=tmask)
        tl.store(pair_ptr + pos, t * K + j, mask=tmask)
        tl.store(w_ptr + pos, tl.load(topw_ptr + t * K + j, mask=tmask, other=0.0), mask=tmask)


@triton.jit
def _route_bwd_kernel(logits_ptr, mask_ptr, idx_ptr, topw_ptr, pos_ptr, dw_ptr, counts_ptr, offs_ptr, dbal_ptr,
                      dz_ptr, dl_ptr, N, E, stride_l, K: tl.constexpr, HAS_MASK: tl.constexpr,
                      HAS_DW: tl.constexpr, HAS_DBAL: tl.constexpr, HAS_DZ: tl.constexpr, BT: tl.constexpr,
                      E_PAD: tl.constexpr):
    blk = tl.program_id(0)
    t = blk * BT + tl.arange(0, BT)
    tmask = t < N
    e = tl.arange(0, E_PAD)
    emask = e < E
    _z, p, lse = _softmax_rows(logits_ptr, t, tmask, e, emask, stride_l)
    routed = _routed_rows(mask_ptr, t, tmask, HAS_MASK)
    dp = tl.zeros((BT, E_PAD), dtype=tl.float32)
    if HAS_DW:
        dsel = tl.zeros((BT, E_PAD), dtype=tl.float32)
        wsel = tl.zeros((BT, E_PAD), dtype=tl.float32)
        member = tl.zeros((BT, E_PAD), dtype=tl.int32)
        for j in range(K):
            ej = tl.load(idx_ptr + t * K + j, mask=tmask, other=E_PAD)
            wj = tl.load(topw_ptr + t * K + j, mask=tmask, other=0.0)
            pj = tl.load(pos_ptr + t * K + j, mask=tmask, other=0)
            dwj = tl.load(dw_ptr + pj, mask=routed, other=0.0).to(tl.float32)
            hit = e[None, :] == ej[:, None]
            dsel += tl.where(hit, dwj[:, None], 0.0)
            wsel += tl.where(hit, wj[:, None], 0.0)
            member += hit.to(tl.int32)
        s = tl.where(tmask, tl.sum(tl.where(member != 0, p, 0.0), 1), 1.0)
        dot = tl.sum(dsel * wsel, 1)
        dp = tl.where(member != 0, (dsel - dot[:, None]) / s[:, None], 0.0)
    n_r = tl.maximum(tl.load(offs_ptr + E) // K, 1).to(tl.float32)
    if HAS_DBAL:
        cnt = tl.load(counts_ptr + e, mask=emask, other=0).to(tl.float32)
        coef = tl.load(dbal_ptr) * E / (n_r * n_r * K)
        dp += tl.where(routed[:, None], coef * cnt[None, :], 0.0)
    g = p * (dp - tl.sum(p * dp, 1)[:, None])
    if HAS_DZ:
        dz = tl.load(dz_ptr)
        g += tl.where(routed, dz * 2.0 * lse / n_r, 0.0)[:, None] * p
    m2 = tmask[:, None] & emask[None, :]
    tl.store(dl_ptr + t.to(tl.int64)[:, None] * E + e[None, :], g.to(dl_ptr.dtype.element_ty), mask=m2)


def _blocks(n_tok: int, n_exp: int) -> tuple[int, int, int, int]:
    """(E_PAD, BT, n_blk, num_warps): 2048 (token, expert) entries per program (16 per thread, no spills at
    E <= 127 with ptxas for sm_90), 16 tokens at least."""
    e_pad = triton.next_power_of_2(n_exp + 1)
    bt = max(16, min(128, 2048 // e_pad))
    return e_pad, bt, triton.cdiv(max(n_tok, 1), bt), 4 if bt * e_pad <= 2048 else 8


class _FusedRouting(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, token_mask, top_k):
        n_tok, n_exp = logits.shape
        dev = logits.device
        e_pad, bt, n_blk, nw = _blocks(n_tok, n_exp)
        m_rows = n_tok * top_k
        mask_u8 = token_mask.view(torch.uint8) if token_mask is not None else None
        mask_arg = mask_u8 if mask_u8 is not None else logits
        i32, f32 = torch.int32, torch.float32
        probs = torch.empty(n_tok, n_exp, device=dev, dtype=f32)  # (N, E)
        idx = torch.empty(n_tok, top_k, device=dev, dtype=i32)  # (N, k)
        topw = torch.empty(n_tok, top_k, device=dev, dtype=f32)  # (N, k)
        hist = torch.empty(n_blk, e_pad, device=dev, dtype=i32)
        psum = torch.empty(n_blk, e_pad, device=dev, dtype=f32)
        zsum = torch.empty(n_blk, device=dev, dtype=f32)
        _route_fwd_kernel[(n_blk,)](logits, mask_arg, probs, idx, topw, hist, psum, zsum, n_tok, n_exp,
                                    logits.stride(0), K=top_k, HAS_MASK=mask_u8 is not None, BT=bt, E_PAD=e_pad,
                                    num_warps=nw)
        base = torch.empty(n_blk, e_pad, device=dev, dtype=i32)
        counts = torch.empty(n_exp + 1, device=dev, dtype=i32)
        offs = torch.empty(n_exp + 1, device=dev, dtype=i32)
        balance = torch.empty((), device=dev, dtype=f32)
        z = torch.empty((), device=dev, dtype=f32)
        _route_scan_kernel[(1,)](hist, psum, zsum, base, counts, offs, balance, z, n_blk, n_exp, K=top_k,
                                 RB=max(1, min(256, 16384 // e_pad)), E_PAD=e_pad, num_warps=8)
        pos = torch.empty(n_tok, top_k, device=dev, dtype=i32)  # (N, k) sorted row of each pair
        tok = torch.empty(m_rows, device=dev, dtype=i32)  # (M,)
        pair = torch.empty(m_rows, device=dev, dtype=i32)  # (M,)
        weights = torch.empty(m_rows, device=dev, dtype=f32)  # (M,)
        _route_scatter_kernel[(n_blk,)](idx, topw, mask_arg, base, offs, pos, tok, pair, weights, n_tok, n_exp,
                                        K=top_k, HAS_MASK=mask_u8 is not None, BT=bt, E_PAD=e_pad, num_warps=nw)
        ctx.save_for_backward(logits, mask_u8, idx, topw, pos, counts, offs)
        ctx.top_k = top_k
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(probs, idx, topw, counts, offs, tok, pair)
        return weights, balance, z, probs, idx, topw, counts, offs, tok, pair

    @staticmethod
    def backward(ctx, dweights, dbalance, dz, *_unused):
        logits, mask_u8, idx, topw, pos, counts, offs = ctx.saved_tensors
        n_tok, n_exp = logits.shape
        e_pad, bt, n_blk, nw = _blocks(n_tok, n_exp)
        dl = torch.empty(n_tok, n_exp, device=logits.device, dtype=logits.dtype)  # (N, E)
        dummy = offs
        _route_bwd_kernel[(n_blk,)](
            logits, mask_u8 if mask_u8 is not None else dummy, idx, topw, pos,
            dweights.contiguous() if dweights is not None else dummy, counts, offs,
            dbalance.float() if dbalance is not None else dummy, dz.float() if dz is not None else dummy, dl,
            n_tok, n_exp, logits.stride(0), K=ctx.top_k, HAS_MASK=mask_u8 is not None, HAS_DW=dweights is not None,
            HAS_DBAL=dbalance is not None, HAS_DZ=dz is not None, BT=bt, E_PAD=e_pad, num_warps=nw,
        )
        return dl, None, None


def fused_route(logits: torch.Tensor, top_k: int, token_mask: torch.Tensor | None = None):
    """Softmax, top-k, renormalisation, counting sort by expert and the aux-loss terms in three launches.

    Args:
        logits: (N, E) router logits (any float dtype; read in fp32), contiguous rows.
        top_k: k, 1 <= k <= E.
        token_mask: (N,) bool, True = route; None routes every token.

    Returns:
        ``(weights, balance, z, probs, top_idx, top_w, counts, offs, tok, pair)``: weights (M,) fp32 routing
        weight of each sorted row (differentiable); balance, z: 0-dim fp32 load-balancing loss
        ``E·Σ_e f_e·P_e`` and z-loss ``mean lse²`` over routed tokens (differentiable); probs (N, E) fp32;
        top_idx (N, k) int32 (descending logits, lowest index first among ties); top_w (N, k) fp32; counts and
        offs (E+1,) int32; tok, pair (M,) int32. Only weights, balance and z carry gradients (to ``logits``).
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be (N, E), got shape {tuple(logits.shape)}")
    n_tok, n_exp = logits.shape
    if not 1 <= top_k <= n_exp:
        raise ValueError(f"top_k must be in [1, {n_exp}], got {top_k}")
    if n_tok * top_k >= 2**31:
        raise ValueError(f"N·top_k must be < 2**31 (int32 rows), got {n_tok * top_k}")
    if token_mask is not None and (token_mask.dtype != torch.bool or tuple(token_mask.shape) != (n_tok,)):
        raise ValueError(f"token_mask must be a ({n_tok},) bool tensor, got {token_mask.dtype} "
                         f"{tuple(token_mask.shape)}")
    logits = logits if logits.stride(1) == 1 else logits.contiguous()
    mask = token_mask.contiguous() if token_mask is not None else None
    return _FusedRouting.apply(logits, mask, top_k)
