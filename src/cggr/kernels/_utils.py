"""Shared Triton building blocks for the row-wise softmax kernels (scoring and the fused linear cross-entropy).

Shape legend: N rows (tokens), V vocabulary. One Triton program owns one row of V logits.

The row statistics are gathered in ONE read of the row with an online softmax kept per lane: the row is
walked in chunks of ``4 · BLOCK`` elements, loaded as four ``BLOCK``-wide slices; every lane (one element
position of a slice) carries

    a1, a2   its two largest values so far (exact, duplicates kept: a2 = a1 when the maximum repeats)
    ref      max(a1, -1e38): the finite reference of the lane's exponentials, in natural units
    s        Σ exp(z - ref)
    t        Σ exp(z - ref) · (z - ref) · log2(e)      (log2 units: the exp2 argument is reused)

and rescales s, t once per chunk when ref moves (one exp per lane per chunk, one exp per element). The lanes
are merged at the end: M = max ref, S = Σ s·2^((ref - M)·log2 e), T likewise, which gives

    lse = M + ln S,  entropy = ln S - T·ln2 / S,  confidence = exp(z(1) - lse),
    margin = exp(z(1) - lse) - exp(z(2) - lse)   with z(2) the exact second largest value.

Every exp2 argument is clamped to -1e38, so a -inf logit (a masked tail element, or a masked vocabulary entry)
adds 0 to s and 0 · -1e38 = 0 to t: p = 0 contributes 0 · log 0 = 0 to the entropy, as in the PyTorch reference
(0 · -inf would be NaN). NaN logits always propagate to every score (the clamp keeps NaN, s becomes NaN), so a
broken row is never hidden.

This module imports Triton at the top: import it only where Triton is known to be importable.
"""

from __future__ import annotations

import triton
import triton.language as tl

#: Finite stand-in for -inf in exponent arithmetic.
NEG_BIG = tl.constexpr(-1.0e38)  # NEG_BIG · log2(e) stays finite
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def softcap_fn(z, softcap):
    """softcap · tanh(z / softcap) in fp32 (tanh through exp, saturating cleanly at ±1)."""
    x = z / softcap
    e = tl.exp(2.0 * x)
    return softcap * (1.0 - 2.0 / (e + 1.0))


@triton.jit
def _top2_push(a1, a2, z):
    a2 = tl.maximum(a2, tl.minimum(a1, z))
    a1 = tl.maximum(a1, z)
    return a1, a2


@triton.jit
def _load_slice(row_ptr, offs, V, softcap, HAS_SOFTCAP: tl.constexpr, MASKED: tl.constexpr):
    if MASKED:
        z = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
    else:
        z = tl.load(row_ptr + offs).to(tl.float32)
    if HAS_SOFTCAP:
        z = softcap_fn(z, softcap)
        if MASKED:
            z = tl.where(offs < V, z, float("-inf"))
    return z


@triton.jit
def _exp_acc(z, ref2, s, t):
    d2 = z * LOG2E - ref2  # fused multiply-add, log2 units
    d2 = tl.maximum(d2, NEG_BIG, propagate_nan=tl.PropagateNan.ALL)  # -inf logits: e = 0, e · d2 = 0 (not NaN)
    e = tl.exp2(d2)
    return s + e, t + e * d2


@triton.jit
def _chunk_update(row_ptr, base, V, lanes, a1, a2, s, t, ref, softcap,
                  HAS_SOFTCAP: tl.constexpr, BLOCK: tl.constexpr, MASKED: tl.constexpr):
    o0 = base + lanes
    z0 = _load_slice(row_ptr, o0, V, softcap, HAS_SOFTCAP, MASKED)
    z1 = _load_slice(row_ptr, o0 + BLOCK, V, softcap, HAS_SOFTCAP, MASKED)
    z2 = _load_slice(row_ptr, o0 + 2 * BLOCK, V, softcap, HAS_SOFTCAP, MASKED)
    z3 = _load_slice(row_ptr, o0 + 3 * BLOCK, V, softcap, HAS_SOFTCAP, MASKED)
    a1, a2 = _top2_push(a1, a2, z0)
    a1, a2 = _top2_push(a1, a2, z1)
    a1, a2 = _top2_push(a1, a2, z2)
    a1, a2 = _top2_push(a1, a2, z3)
    new_ref = tl.maximum(a1, NEG_BIG)
    shift2 = tl.maximum((ref - new_ref) * LOG2E, NEG_BIG)  # <= 0, finite (0 · -inf would be NaN)
    alpha = tl.exp2(shift2)
    t = alpha * (t + shift2 * s)
    s = alpha * s
    ref2 = new_ref * LOG2E
    s, t = _exp_acc(z0, ref2, s, t)
    s, t = _exp_acc(z1, ref2, s, t)
    s, t = _exp_acc(z2, ref2, s, t)
    s, t = _exp_acc(z3, ref2, s, t)
    return a1, a2, s, t, new_ref


@triton.jit
def row_softmax_stats(row_ptr, V, softcap, HAS_SOFTCAP: tl.constexpr, BLOCK: tl.constexpr):
    """One read of a row of V logits -> (lse, entropy, confidence, margin), fp32 scalars.

    ``row_ptr`` points at the row's first element (unit stride). With ``HAS_SOFTCAP`` every logit is first
    mapped through ``softcap · tanh(z / softcap)``.
    """
    lanes = tl.arange(0, BLOCK)
    a1 = tl.full([BLOCK], float("-inf"), tl.float32)
    a2 = tl.full([BLOCK], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK], tl.float32)
    t = tl.zeros([BLOCK], tl.float32)
    ref = tl.full([BLOCK], NEG_BIG, tl.float32)
    CHUNK: tl.constexpr = 4 * BLOCK
    n_full = V // CHUNK
    for c in range(0, n_full):
        a1, a2, s, t, ref = _chunk_update(row_ptr, c * CHUNK, V, lanes, a1, a2, s, t, ref, softcap,
                                          HAS_SOFTCAP, BLOCK, False)
    if n_full * CHUNK < V:
        a1, a2, s, t, ref = _chunk_update(row_ptr, n_full * CHUNK, V, lanes, a1, a2, s, t, ref, softcap,
                                          HAS_SOFTCAP, BLOCK, True)
    # merge the lanes
    top1 = tl.max(a1, axis=0)
    m = tl.max(ref, axis=0)
    shift2 = tl.maximum((ref - m) * LOG2E, NEG_BIG)  # (BLOCK,) <= 0, finite
    c = tl.exp2(shift2)
    s_tot = tl.sum(s * c, axis=0)
    t_tot = tl.sum(c * (t + shift2 * s), axis=0)
    n_top = tl.sum((a1 == top1).to(tl.int32), axis=0)
    others = tl.maximum(tl.max(a2, axis=0), tl.max(tl.where(a1 == top1, float("-inf"), a1), axis=0))
    top2 = tl.where(n_top >= 2, top1, others)
    log_s = tl.log(s_tot)
    lse = m + log_s
    entropy = tl.maximum(log_s - (t_tot * LN2) / s_tot, 0.0, propagate_nan=tl.PropagateNan.ALL)
    conf = tl.exp(top1 - lse)
    margin = conf - tl.exp(top2 - lse)
    return lse, entropy, conf, margin


def row_block(vocab_size: int, element_size: int, num_warps: int, block: int | None = None) -> int:
    """Lanes per slice: four elements per thread, shrunk for short rows (a power of two >= 32).

    Four elements per thread per slice (four slices per chunk) with 4 warps measured fastest on an H200
    (bf16 rows of 49152-256000: 3.05-3.1 TB/s, against 2.2-2.6 TB/s with 16 elements and 8 warps);
    ``element_size`` is kept for callers that tune per dtype.
    """
    if block is not None:
        return block
    del element_size
    per_thread = 4
    full = per_thread * 32 * num_warps
    return max(32, min(full, triton.next_power_of_2(max(1, vocab_size // 4))))
