"""Triton kernel: per-token entropy, confidence, top-2 margin and nll in one read of the logits.

Shape legend: N rows (tokens), V vocabulary.

Forward dataflow (no backward: scores are statistics and carry no gradient)::

    logits (N, V) any float dtype, unit stride along V
      └─ one program per row: row_softmax_stats (kernels/_utils.py) walks the row once, keeping per lane the
         exact top-2, a running reference max, Σ exp and Σ exp·(z - ref)  ──>  lse, entropy, confidence, margin
      └─ the target logit z[target] is one extra scalar load       ──>  nll = lse - z[target] (0 if ignored)
    entropy, confidence, margin, nll: (N,) fp32

The public entry point is :func:`cggr.functional.token_scores` (``impl=`` dispatch, argument checks);
:func:`token_scores_triton` here assumes checked inputs on a CUDA device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from cggr.kernels._utils import row_block, row_softmax_stats


@triton.jit
def _token_scores_kernel(
    Z, stride_row, V, T, ignore_index,
    ENT, CONF, MARG, NLL,
    HAS_TARGETS: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = Z + row * stride_row
    lse, ent, conf, marg = row_softmax_stats(row_ptr, V, 1.0, False, BLOCK)
    tl.store(ENT + row, ent)
    tl.store(CONF + row, conf)
    tl.store(MARG + row, marg)
    if HAS_TARGETS:
        tgt = tl.load(T + row)
        valid = tgt != ignore_index
        safe = tl.where(valid, tgt, 0)
        zt = tl.load(row_ptr + safe).to(tl.float32)
        tl.store(NLL + row, tl.where(valid, lse - zt, 0.0))


def default_num_warps(vocab_size: int, element_size: int) -> int:
    """Warps per row program: 4 for long rows (fastest of 4/8/16 on an H200), 1 for short ones."""
    row_bytes = vocab_size * element_size
    if row_bytes >= 8 * 1024:
        return 4
    return 1


def token_scores_triton(
    logits: Tensor,
    targets: Tensor | None,
    ignore_index: int,
    *,
    num_warps: int | None = None,
    block: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Launch the scoring kernel on checked inputs.

    Args:
        logits: (N, V) float tensor on CUDA (made unit-stride along V if it is not).
        targets: (N,) integer tensor or ``None``.
        ignore_index: Target value marking ignored rows (their nll is 0).
        num_warps: Warps per program (benchmark override; default from :func:`default_num_warps`).
        block: Lanes per slice, a power of two (benchmark override).

    Returns:
        ``(entropy, confidence, margin, nll)``, each (N,) fp32; nll is ``None`` without targets.
    """
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    n, vocab = logits.shape
    nw = num_warps or default_num_warps(vocab, logits.element_size())
    blk = row_block(vocab, logits.element_size(), nw, block)
    entropy = torch.empty(n, dtype=torch.float32, device=logits.device)
    confidence = torch.empty_like(entropy)
    margin = torch.empty_like(entropy)
    nll = torch.empty_like(entropy) if targets is not None else None
    if n == 0:
        return entropy, confidence, margin, nll
    tgt = targets.contiguous() if targets is not None else entropy  # dummy pointer when absent
    _token_scores_kernel[(n,)](
        logits, logits.stride(0), vocab, tgt, ignore_index,
        entropy, confidence, margin, nll if nll is not None else entropy,
        HAS_TARGETS=targets is not None, BLOCK=blk, num_warps=nw,
    )
    return entropy, confidence, margin, nll
