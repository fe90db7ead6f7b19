"""Triton path of the selective fused linear cross-entropy (``cggr.functional.linear_cross_entropy``).

Shape legend: N tokens, H hidden size, V vocabulary, K_max static bound on the selected rows, C rows of a
row chunk, Vc columns of a vocabulary chunk.

The [N, V] logits are never materialised: matrix products run on cuBLAS in bounded chunks that live in one
reusable workspace (``workspace_bytes``, default 256 MiB) and a Triton row kernel turns each chunk into
statistics or gradients in place.

Forward (scores of every token; no gradient)::

    for each row chunk [C, H] of hidden:
        z = hidden_c @ weight.T (+ bias)            cuBLAS, [C, V] in the input dtype, fp32 accumulation
        _ce_rows_kernel(STATS)                      one read per row: lse, entropy, confidence, margin, nll
                                                    (softcap applied on the fly: softcap·tanh(z / softcap))

Forward with gradients (all valid tokens kept, e.g. ratio = 1; three GEMM passes, like Liger-Kernel)::

    for each row chunk: z = hidden_c @ weight.T (+ bias)
        _ce_rows_kernel(STATS + GRAD)   stats, then z <- (softmax(z) - onehot(target)) · w_row (· softcap')
        d_hidden_c = z @ weight;  d_weight (+)= z.T @ hidden_c;  d_bias += Σ_rows z      (fp32 accumulate)

Gradients of every row, ``workspace='outputs'`` (opt-in; ratio 1 with the weight gradient wanted): no logits
workspace; the chunks live in the not-yet-written part of d_weight [V, H] (viewed flat, V·H elements), four GEMM
passes instead of three (schedule: :func:`outputs_schedule`). The statistics pass is :func:`outputs_forward_stats`
(the public op runs it in its forward, in a scratch of min(N, C)·V <= V·H elements freed on return), the chunk
pass :func:`outputs_backward` (run in the backward, the upstream gradient folded into the row weights: no pass
over d_weight to scale it); ``forward_stats(workspace='outputs', row_weights=...)`` runs both in one call::

    for each row chunk of C <= H rows (C·V <= V·H):
        z = hidden_c @ weight.T (+ bias)  into the scratch (d_weight's storage)   [C, V]
        _ce_rows_kernel(STATS)            lse, entropy, confidence, margin, nll of every row
    for each vocabulary chunk [v0, v1), from the top down (N·(v1 - v0) <= v0·H, i.e. v1 - v0 <= v1·H / (N + H)):
        z = hidden @ weight[v0:v1].T (+ bias)  into d_weight rows [0, v0) (not written yet)   [N, Vc]
        _ce_rows_kernel(GRAD, saved lse)       z <- (exp(z - lse) - onehot) · w_row (· softcap')
        d_weight[v0:v1] = z.T @ hidden         written once: exact
        d_hidden (+)= z @ weight[v0:v1]        first chunk writes, later chunks add in the output dtype
        d_bias[v0:v1] = Σ_rows z               (fp32, cast at the end)
    the last columns [0, v_t) (once N·v_t elements fit ``OUTPUTS_TAIL_BYTES`` or a chunk would be narrower than
    16 bytes): the same with a dedicated N x v_t buffer, last.

  Memory: the gradients, the (5, N) fp32 stats and the tail buffer (<= ``OUTPUTS_TAIL_BYTES`` unless the 16-byte
  alignment stops the schedule earlier; never above ``workspace_bytes``). Error model: d_weight and d_bias as
  in the buffer path (one rounding of an fp32-accumulated product); d_hidden receives one rounding in its own
  dtype per chunk (m = chunks + tail roundings of the running sum, each at most the unit roundoff relative to
  it: 2^-8 bf16, 2^-11 fp16, 2^-24 fp32) instead of the buffer path's single rounding (an addend below half an
  ulp of the sum is lost instead, so the many narrow chunks cost little). The chunks shrink geometrically by the
  factor 1 - H / (N + H): when N >> H they are many and narrow, so above ``OUTPUTS_MAX_CHUNKS`` chunks (or a
  tail buffer above ``workspace_bytes``) :func:`outputs_schedule` returns ``None``: this module's
  :func:`forward_stats` then runs the buffer path, the public op the fused kernel
  (``cggr.kernels.linear_cross_entropy_fused``, no workspace either); without the weight gradient (frozen head) or
  without gradients the buffer path runs. bf16 (N, H, V) = (8192, 2048, 128256) and (8192, 2304, 256000): 39
  chunks and a 32-column tail (512 KiB); (16384, 576, 49152) would need 171 chunks: no schedule.

Backward of the selected rows (recomputed logits of K_max compact rows only; three GEMM passes over K_max)::

    hs = hidden[idx]  [K_max, H]   (idx: selected rows first, then zero-weight padding up to the static K_max)
    for each vocabulary chunk [v0, v1):
        z = hs @ weight[v0:v1].T (+ bias)           [K_max, Vc]
        _ce_rows_kernel(GRAD, saved lse)            z <- (exp(z - lse) - onehot) · w_row · grad_out (· softcap')
        d_weight[v0:v1] = z.T @ hs                  written once: exact, no accumulation across chunks
        d_hs += z @ weight[v0:v1]                   fp32 accumulator [K_max, H]
        d_bias[v0:v1] = Σ_rows z
    d_hidden = zeros.index_copy(idx, d_hs)

The public entry point (argument checks, selection, autograd) is :func:`cggr.functional.linear_cross_entropy`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from cggr.kernels._linear_ce_modes import DEFAULT_WORKSPACE_BYTES, WORKSPACES
from cggr.kernels._utils import LOG2E, row_block, row_softmax_stats, softcap_fn
from cggr.kernels.scoring import default_num_warps

#: ``workspace='outputs'``: the vocabulary chunks in d_weight stop once the remaining columns fit this (bytes).
OUTPUTS_TAIL_BYTES = 512 * 1024
#: ``workspace='outputs'``: a schedule with more vocabulary chunks than this falls back to the buffer path.
OUTPUTS_MAX_CHUNKS = 64


@triton.jit
def _ce_rows_kernel(
    Z, stride_row, V, col_offset, T, ignore_index, WROW,
    LSE, ENT, CONF, MARG, NLL, softcap,
    HAS_SOFTCAP: tl.constexpr, COMPUTE_STATS: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = Z + row * stride_row
    tgt = tl.load(T + row)
    valid = tgt != ignore_index
    local_t = tl.where(valid, tgt - col_offset, -1)  # target column inside this chunk (-1: none)
    if COMPUTE_STATS:
        lse, ent, conf, marg = row_softmax_stats(row_ptr, V, softcap, HAS_SOFTCAP, BLOCK)
        zt = tl.load(row_ptr + tl.maximum(local_t, 0)).to(tl.float32)
        if HAS_SOFTCAP:
            zt = softcap_fn(zt, softcap)
        tl.store(LSE + row, lse)
        tl.store(ENT + row, ent)
        tl.store(CONF + row, conf)
        tl.store(MARG + row, marg)
        tl.store(NLL + row, tl.where(valid, lse - zt, 0.0))
    else:
        lse = tl.load(LSE + row)
    if WRITE_GRAD:
        w = tl.load(WROW + row)
        lse2 = lse * LOG2E
        for start in range(0, V, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            m = offs < V
            z = tl.load(row_ptr + offs, mask=m, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                zc = softcap_fn(z, softcap)
            else:
                zc = z
            p = tl.exp2(zc * LOG2E - lse2)
            g = tl.where(offs == local_t, p - 1.0, p) * w
            if HAS_SOFTCAP:
                y = zc / softcap
                g = g * (1.0 - y * y)
            tl.store(row_ptr + offs, g.to(Z.dtype.element_ty), mask=m)


def _launch_rows(z, targets, *, ignore_index, softcap, col_offset=0, row_weights=None, stats=None, lse=None):
    """Run ``_ce_rows_kernel`` over the rows of the chunk ``z`` [c, Vc] (unit stride along Vc)."""
    c, vc = z.shape
    if c == 0:
        return
    nw = default_num_warps(vc, z.element_size())
    blk = row_block(vc, z.element_size(), nw)
    compute_stats = stats is not None
    write_grad = row_weights is not None
    dummy = targets
    lse_buf = stats[0] if compute_stats else lse
    ent, conf, marg, nll = stats[1:] if compute_stats else (dummy, dummy, dummy, dummy)
    _ce_rows_kernel[(c,)](
        z, z.stride(0), vc, col_offset, targets, ignore_index,
        row_weights if write_grad else dummy,
        lse_buf, ent, conf, marg, nll, float(softcap) if softcap is not None else 1.0,
        HAS_SOFTCAP=softcap is not None, COMPUTE_STATS=compute_stats, WRITE_GRAD=write_grad,
        BLOCK=blk, num_warps=nw,
    )


def _logits_into(out: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    if bias is None:
        return torch.mm(hidden, weight.t(), out=out)
    return torch.addmm(bias, hidden, weight.t(), out=out)


def chunk_rows(n: int, vocab: int, element_size: int, workspace_bytes: int) -> int:
    """Rows per chunk so that a [C, V] chunk fits the workspace (at least 16, a multiple of 16)."""
    rows = max(16, workspace_bytes // max(1, vocab * element_size))
    rows = rows - rows % 16 if rows >= 32 else rows
    return max(1, min(n, rows))


class OutputsSchedule(NamedTuple):
    """Chunks of the ``workspace='outputs'`` forward with gradients (see the module docstring).

    Attributes:
        rows: C, rows per chunk of the statistics pass ([C, V] logits in d_weight's storage: C <= H).
        chunks: Vocabulary chunks ``(v0, v1)`` of the gradient pass, from the top down; chunk i's [N, v1 - v0]
            logits occupy d_weight's flat elements [0, N·(v1 - v0)), inside rows [0, v0), which no chunk has
            written yet.
        tail: v_t, the columns [0, v_t) done last with a dedicated [N, v_t] buffer (0: none).
    """

    rows: int
    chunks: tuple[tuple[int, int], ...]
    tail: int


def outputs_schedule(
    n: int,
    hidden_size: int,
    vocab: int,
    element_size: int,
    *,
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
    tail_bytes: int | None = None,
    max_chunks: int | None = None,
) -> OutputsSchedule | None:
    """The ``workspace='outputs'`` schedule for (N, H, V), or ``None`` when the buffer path must run instead.

    Chunk widths: the largest multiple of ``16 / element_size`` columns (16-byte rows for cuBLAS) with
    N·width <= v0·H, i.e. width <= v1·H / (N + H); the chunks stop when the rest [0, v1) fits ``tail_bytes``
    (default :data:`OUTPUTS_TAIL_BYTES`, capped by ``workspace_bytes``) or the next width would round to zero.
    ``None`` when more than ``max_chunks`` (default :data:`OUTPUTS_MAX_CHUNKS`) chunks would be needed or the
    tail buffer would exceed ``workspace_bytes`` (both happen when N >> H).
    """
    tail_bytes = OUTPUTS_TAIL_BYTES if tail_bytes is None else tail_bytes
    max_chunks = OUTPUTS_MAX_CHUNKS if max_chunks is None else max_chunks
    align = max(1, 16 // element_size)
    rows = hidden_size - hidden_size % 16 if hidden_size >= 16 else hidden_size
    rows = max(1, min(n, rows))
    chunks = []
    v1 = vocab
    while v1 > 0 and n * v1 * element_size > min(tail_bytes, workspace_bytes):
        width = v1 * hidden_size // (n + hidden_size)
        width -= width % align
        if width == 0:
            break
        if len(chunks) == max_chunks:
            return None
        chunks.append((v1 - width, v1))
        v1 -= width
    if n * v1 * element_size > workspace_bytes:
        return None
    return OutputsSchedule(rows, tuple(chunks), v1)


def forward_stats(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    *,
    ignore_index: int,
    softcap: float | None,
    workspace_bytes: int,
    row_weights: Tensor | None = None,
    need_hidden_grad: bool = False,
    need_weight_grad: bool = False,
    need_bias_grad: bool = False,
    workspace: str = "buffer",
    outputs_tail_bytes: int | None = None,
    outputs_max_chunks: int | None = None,
) -> tuple[Tensor, tuple[Tensor | None, Tensor | None, Tensor | None]]:
    """Scores of every row; with ``row_weights`` also the gradients of Σ w_n · nll_n (three GEMM passes).

    Args:
        hidden: (N, H) contiguous.
        weight: (V, H) contiguous, same dtype.
        bias: (V,) or ``None``.
        targets: (N,) long; ``ignore_index`` rows get nll 0.
        row_weights: (N,) fp32 loss weight per row; when given, gradients are computed in this pass.
        workspace: ``'buffer'`` (a reusable logits workspace of ``workspace_bytes``) or ``'outputs'`` (with
            ``row_weights`` and the weight gradient wanted: the logits chunks live in d_weight's unwritten rows,
            four GEMM passes; falls back to ``'buffer'`` when :func:`outputs_schedule` returns ``None`` or
            without the weight gradient; see the module docstring).
        outputs_tail_bytes, outputs_max_chunks: Overrides of :data:`OUTPUTS_TAIL_BYTES` and
            :data:`OUTPUTS_MAX_CHUNKS` for ``workspace='outputs'``.

    Returns:
        ``(stats, (d_hidden, d_weight, d_bias))`` with stats (5, N) fp32 = lse, entropy, confidence, margin,
        nll; the gradients are ``None`` unless asked for.
    """
    if workspace not in WORKSPACES:
        raise ValueError(f"workspace must be one of {WORKSPACES}, got {workspace!r}")
    n, hsize = hidden.shape
    vocab = weight.shape[0]
    grads = row_weights is not None
    if workspace == "outputs" and grads and need_weight_grad:
        sched = outputs_schedule(n, hsize, vocab, hidden.element_size(), workspace_bytes=workspace_bytes,
                                 tail_bytes=outputs_tail_bytes, max_chunks=outputs_max_chunks)
        if sched is not None:
            return _forward_grads_in_outputs(
                hidden, weight, bias, targets, row_weights, sched, ignore_index=ignore_index, softcap=softcap,
                need_hidden_grad=need_hidden_grad, need_bias_grad=need_bias_grad,
            )
    stats = torch.empty(5, n, dtype=torch.float32, device=hidden.device)
    rows = chunk_rows(n, vocab, hidden.element_size(), workspace_bytes)
    buf = torch.empty(rows * vocab, dtype=hidden.dtype, device=hidden.device)
    d_hidden = torch.empty_like(hidden) if grads and need_hidden_grad else None
    d_weight = torch.empty_like(weight) if grads and need_weight_grad else None
    d_bias = torch.zeros(vocab, dtype=torch.float32, device=hidden.device) if grads and need_bias_grad else None
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        z = buf[: (stop - start) * vocab].view(stop - start, vocab)
        h_c = hidden[start:stop]
        _logits_into(z, h_c, weight, bias)
        _launch_rows(
            z, targets[start:stop], ignore_index=ignore_index, softcap=softcap,
            row_weights=row_weights[start:stop] if grads else None,
            stats=tuple(stats[i, start:stop] for i in range(5)),
        )
        if not grads:
            continue
        if d_hidden is not None:
            torch.mm(z, weight, out=d_hidden[start:stop])
        if d_weight is not None:
            if start == 0:
                torch.mm(z.t(), h_c, out=d_weight)
            else:
                d_weight.addmm_(z.t(), h_c)
        if d_bias is not None:
            d_bias += z.sum(0, dtype=torch.float32)
    return stats, (d_hidden, d_weight, d_bias.to(bias.dtype) if d_bias is not None else None)


def _forward_grads_in_outputs(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    row_weights: Tensor,
    sched: OutputsSchedule,
    *,
    ignore_index: int,
    softcap: float | None,
    need_hidden_grad: bool,
    need_bias_grad: bool,
) -> tuple[Tensor, tuple[Tensor | None, Tensor, Tensor | None]]:
    """``workspace='outputs'`` in one call: statistics, then the gradients by vocabulary chunks in d_weight's
    unwritten rows (the statistics pass uses d_weight's storage too)."""
    d_weight = torch.empty_like(weight)  # (V, H)
    stats = outputs_forward_stats(hidden, weight, bias, targets, sched, ignore_index=ignore_index, softcap=softcap,
                                  scratch=d_weight.view(-1))
    grads = outputs_backward(hidden, weight, bias, targets, stats[0], row_weights, sched, ignore_index=ignore_index,
                             softcap=softcap, need_hidden_grad=need_hidden_grad, need_bias_grad=need_bias_grad,
                             d_weight=d_weight)
    return stats, grads


def outputs_forward_stats(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    sched: OutputsSchedule,
    *,
    ignore_index: int,
    softcap: float | None,
    scratch: Tensor | None = None,
) -> Tensor:
    """The statistics pass of ``workspace='outputs'``: [C, V] logits chunks (C = ``sched.rows`` <= H).

    Args:
        hidden, weight, bias, targets, ignore_index, softcap: as in :func:`forward_stats`.
        sched: :func:`outputs_schedule` of (N, H, V).
        scratch: Flat storage of at least min(N, C)·V elements in the input dtype (e.g. d_weight's, which
            holds V·H >= C·V); ``None``: a temporary buffer of that size (at most d_weight's size, so no
            higher than the peak of :func:`outputs_backward`), freed on return.

    Returns:
        stats (5, N) fp32 = lse, entropy, confidence, margin, nll.
    """
    n, _ = hidden.shape
    vocab = weight.shape[0]
    stats = torch.empty(5, n, dtype=torch.float32, device=hidden.device)
    rows = min(n, sched.rows)
    if scratch is None:
        scratch = torch.empty(rows * vocab, dtype=hidden.dtype, device=hidden.device)
    elif scratch.numel() < rows * vocab or scratch.dtype != hidden.dtype:
        raise ValueError(
            f"scratch must hold {rows * vocab} {hidden.dtype} elements, got {scratch.numel()} {scratch.dtype}"
        )
    for start in range(0, n, sched.rows):
        stop = min(n, start + sched.rows)
        z = scratch[: (stop - start) * vocab].view(stop - start, vocab)  # (C, V)
        _logits_into(z, hidden[start:stop], weight, bias)
        _launch_rows(z, targets[start:stop], ignore_index=ignore_index, softcap=softcap,
                     stats=tuple(stats[i, start:stop] for i in range(5)))
    return stats


def outputs_backward(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    lse: Tensor,
    row_weights: Tensor,
    sched: OutputsSchedule,
    *,
    ignore_index: int,
    softcap: float | None,
    need_hidden_grad: bool,
    need_bias_grad: bool,
    d_weight: Tensor | None = None,
) -> tuple[Tensor | None, Tensor, Tensor | None]:
    """The gradient pass of ``workspace='outputs'``: vocabulary chunks from the top down in d_weight's unwritten
    rows, then the tail buffer (module docstring). Gradients of Σ_n w_n · nll_n over every row.

    Args:
        lse: (N,) fp32 log-sum-exp of the statistics pass.
        row_weights: (N,) fp32 w_n (already multiplied by the upstream gradient; 0 for ignored rows).
        d_weight: Preallocated (V, H) output, or ``None`` (allocated here).

    Returns:
        ``(d_hidden, d_weight, d_bias)`` in the input dtype, ``None`` where not asked for.
    """
    n, _ = hidden.shape
    vocab = weight.shape[0]
    if d_weight is None:
        d_weight = torch.empty_like(weight)  # (V, H)
    flat = d_weight.view(-1)  # (V·H,): the scratch of the chunks until their rows are written
    d_hidden = torch.empty_like(hidden) if need_hidden_grad else None
    d_bias = torch.empty(vocab, dtype=torch.float32, device=hidden.device) if need_bias_grad else None
    segments = [(v0, v1, flat) for v0, v1 in sched.chunks]
    if sched.tail > 0:
        segments.append((0, sched.tail, torch.empty(n * sched.tail, dtype=hidden.dtype, device=hidden.device)))
    for i, (v0, v1, scratch) in enumerate(segments):  # top down; the tail (own buffer) last
        z = scratch[: n * (v1 - v0)].view(n, v1 - v0)  # (N, Vc): d_weight rows [0, v0) or the tail buffer
        w_c = weight[v0:v1]
        _logits_into(z, hidden, w_c, bias[v0:v1] if bias is not None else None)
        _launch_rows(z, targets, ignore_index=ignore_index, softcap=softcap, col_offset=v0,
                     row_weights=row_weights, lse=lse)
        torch.mm(z.t(), hidden, out=d_weight[v0:v1])  # written once: exact
        if d_hidden is not None:
            if i == 0:
                torch.mm(z, w_c, out=d_hidden)
            else:
                d_hidden.addmm_(z, w_c)  # one rounding in the output dtype per chunk
        if d_bias is not None:
            torch.sum(z, dim=0, dtype=torch.float32, out=d_bias[v0:v1])
    return d_hidden, d_weight, d_bias.to(bias.dtype) if d_bias is not None else None


def backward_selected(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    lse: Tensor,
    row_weights: Tensor,
    idx: Tensor,
    *,
    ignore_index: int,
    softcap: float | None,
    workspace_bytes: int,
    need_hidden_grad: bool,
    need_weight_grad: bool,
    need_bias_grad: bool,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of Σ w_n · nll_n from the compact rows ``idx`` only (see the module docstring).

    Args:
        hidden, weight, bias, targets: as in :func:`forward_stats`.
        lse: (N,) fp32 log-sum-exp saved by the forward.
        row_weights: (N,) fp32 weights, already multiplied by the upstream gradient; 0 outside the selection.
        idx: (K_max,) long row indices, each at most once (padding rows carry weight 0).
    """
    vocab, _ = weight.shape
    k = idx.shape[0]
    hs = hidden.index_select(0, idx)  # (K_max, H)
    ts = targets.index_select(0, idx)
    lses = lse.index_select(0, idx)
    ws = row_weights.index_select(0, idx)
    cols = max(16, workspace_bytes // max(1, k * hidden.element_size()))
    cols = min(vocab, cols - cols % 16 if cols >= 32 else cols)
    one_chunk = cols >= vocab
    buf = torch.empty(k * cols, dtype=hidden.dtype, device=hidden.device)
    d_weight = torch.empty_like(weight) if need_weight_grad else None
    d_bias = torch.empty(vocab, dtype=torch.float32, device=hidden.device) if need_bias_grad else None
    d_hs = None
    if need_hidden_grad and not one_chunk:
        d_hs = torch.zeros(k, hidden.shape[1], dtype=torch.float32, device=hidden.device)
    for v0 in range(0, vocab, cols):
        v1 = min(vocab, v0 + cols)
        z = buf[: k * (v1 - v0)].view(k, v1 - v0)
        _logits_into(z, hs, weight[v0:v1], bias[v0:v1] if bias is not None else None)
        _launch_rows(
            z, ts, ignore_index=ignore_index, softcap=softcap, col_offset=v0, row_weights=ws, lse=lses
        )
        if d_weight is not None:
            torch.mm(z.t(), hs, out=d_weight[v0:v1])
        if need_hidden_grad:
            part = torch.mm(z, weight[v0:v1])  # (K_max, H) in the input dtype
            if one_chunk:
                d_hs = part
            else:
                d_hs += part
        if d_bias is not None:
            d_bias[v0:v1] = z.sum(0, dtype=torch.float32)
    d_hidden = None
    if need_hidden_grad:
        d_hidden = torch.zeros_like(hidden).index_copy_(0, idx, d_hs.to(hidden.dtype))
    return d_hidden, d_weight, d_bias.to(bias.dtype) if d_bias is not None else None
