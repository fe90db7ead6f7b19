"""The pure-PyTorch linear cross-entropy: the CPU path and the test oracle of the Triton kernels.

Shape legend: N tokens, H hidden size, V vocabulary, K_max compact rows of the backward, C rows of a chunk.

The same two functions as each kernel module (:mod:`cggr.kernels.linear_cross_entropy`,
:mod:`cggr.kernels.linear_cross_entropy_fused`), with the same signatures, so that the autograd Function runs
any of them unchanged::

    forward_stats:      for each chunk of C rows (C·V·8 <= workspace_bytes):
                            z = softcap(hidden_c @ weight.T (+ bias))      fp32 (fp64 for fp64 inputs), [C, V]
                            stats[:, rows] = lse, entropy, confidence, margin, nll    (token_scores_torch)
    backward_selected:  for each chunk of the K_max compact rows idx:
                            g = (softmax(z) - onehot(target)) · w_row (· softcap')   recomputed in the compute dtype
                            d_hidden[idx] = g @ weight;  d_weight += g.T @ hidden[idx];  d_bias += Σ_rows g
"""

from __future__ import annotations

import torch
from torch import Tensor

from cggr.scoring import token_scores_torch


def _logits(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Raw logits of a chunk in the compute dtype (fp64 for fp64 inputs, else fp32), GEMM in the input dtype."""
    z = hidden @ weight.t() if bias is None else torch.addmm(bias, hidden, weight.t())
    return z.double() if z.dtype == torch.float64 else z.float()


def _softcap(z: Tensor, softcap: float | None) -> Tensor:
    return z if softcap is None else softcap * torch.tanh(z / softcap)


def forward_stats(hidden, weight, bias, targets, *, ignore_index, softcap, workspace_bytes, **_):
    """Reference forward: (5, N) fp32 stats = lse, entropy, confidence, margin, nll (rows in chunks)."""
    n = hidden.shape[0]
    vocab = weight.shape[0]
    stats = torch.empty(5, n, dtype=torch.float32, device=hidden.device)
    rows = max(1, min(n, workspace_bytes // (vocab * 8)))
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        z = _softcap(_logits(hidden[start:stop], weight, bias), softcap)  # (c, V)
        sc = token_scores_torch(z, targets[start:stop], ignore_index=ignore_index)
        stats[0, start:stop] = torch.logsumexp(z, dim=-1)
        stats[1, start:stop] = sc.entropy
        stats[2, start:stop] = sc.confidence
        stats[3, start:stop] = sc.margin
        stats[4, start:stop] = sc.nll
    return stats, (None, None, None)


def backward_selected(
    hidden, weight, bias, targets, lse, row_weights, idx, *, ignore_index, softcap, workspace_bytes,
    need_hidden_grad, need_weight_grad, need_bias_grad,
):
    """Reference backward over the compact rows ``idx``, accumulated in fp32 (fp64 for fp64 inputs).

    The softmax is recomputed from the logits in the compute dtype rather than from the saved fp32 ``lse``,
    so that fp64 inputs give fp64-accurate gradients (this path is the test oracle).
    """
    del lse
    vocab = weight.shape[0]
    k = idx.shape[0]
    cdt = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    hs, ts = hidden.index_select(0, idx), targets.index_select(0, idx)
    ws = row_weights.index_select(0, idx).to(cdt)
    d_hs = torch.zeros(k, hidden.shape[1], dtype=cdt, device=hidden.device)
    d_w = torch.zeros(weight.shape, dtype=cdt, device=hidden.device) if need_weight_grad else None
    d_b = torch.zeros(vocab, dtype=cdt, device=hidden.device) if need_bias_grad else None
    w_c = weight.to(cdt)
    rows = max(1, min(max(k, 1), workspace_bytes // (vocab * 8)))
    for start in range(0, k, rows):
        stop = min(k, start + rows)
        zr = _logits(hs[start:stop], weight, bias).to(cdt)
        zc = _softcap(zr, softcap)
        g = torch.softmax(zc, dim=-1)  # recomputed in the compute dtype (the saved fp32 lse is not reused)
        t = ts[start:stop]
        ok = t != ignore_index
        g.scatter_add_(1, torch.where(ok, t, 0)[:, None], -ok.to(cdt)[:, None])
        g = g * ws[start:stop, None]
        if softcap is not None:
            g = g * (1.0 - (zc / softcap) ** 2)
        d_hs[start:stop] = g @ w_c
        if d_w is not None:
            d_w += g.t() @ hs[start:stop].to(cdt)
        if d_b is not None:
            d_b += g.sum(0)
    d_hidden = torch.zeros_like(hidden).index_copy_(0, idx, d_hs.to(hidden.dtype)) if need_hidden_grad else None
    return (
        d_hidden,
        d_w.to(weight.dtype) if d_w is not None else None,
        d_b.to(bias.dtype) if d_b is not None else None,
    )
