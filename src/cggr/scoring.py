"""Per-token difficulty scores from logits.

Shape legend: B batch, T sequence length, N = B·T tokens, V vocabulary.

:func:`token_scores` is the public op (``cggr.token_scores`` and ``cggr.functional.token_scores`` are this
function): it dispatches on ``impl`` (:mod:`cggr._dispatch`) to the Triton kernel (:mod:`cggr.kernels.scoring`,
one read of each row) or to :func:`token_scores_torch`, the pure-PyTorch path (the CPU path and the test oracle).
Both compute every score in fp32 whatever the logits' dtype; the PyTorch path works in chunks of rows so that
the extra memory is O(chunk × V) rather than several fp32 copies of the whole (N, V) tensor:

    p = softmax(z)                          # (chunk, V) fp32, one chunk at a time
    entropy    H = -Σ p log p = log Σ e^(z-m) - Σ p (z - m)   # nats, m = max z; 0 · log 0 = 0 (-inf logits)
    confidence   = max p = exp(max z - lse)
    margin       = p(1) - p(2)              # exact top-2 (a duplicated maximum gives 0); V = 1 gives 1
    nll          = lse - z[target]          # 0 at ignored positions

``difficulty(scores, mode)`` turns them into one number per token (higher = harder), docs/design.md §4.2.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from cggr._dispatch import Impl, resolve_impl
from cggr._validation import SCORING_MODES, check_choice, check_int, check_logits_targets

#: Elements of fp32 work per chunk (16 Mi elements = 64 MiB per temporary).
DEFAULT_CHUNK_ELEMENTS = 1 << 24


class TokenScores(NamedTuple):
    """Scores of every token, fp32, each of shape ``logits.shape[:-1]``.

    Attributes:
        entropy: Shannon entropy of the predicted distribution, in nats.
        confidence: Probability of the most likely token.
        margin: Probability gap between the two most likely tokens.
        nll: Negative log-likelihood of the target (0.0 where the target is ignored); ``None`` without targets.
        valid: ``targets != ignore_index``; ``None`` without targets.
        vocab_size: V, needed to normalise entropy and nll in the ``combined`` score.
    """

    entropy: Tensor
    confidence: Tensor
    margin: Tensor
    nll: Tensor | None
    valid: Tensor | None
    vocab_size: int


def _row_chunk(vocab_size: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        return check_int("chunk_size", chunk_size, minimum=1)
    return max(1, DEFAULT_CHUNK_ELEMENTS // vocab_size)


def token_scores(
    logits: Tensor,
    targets: Tensor | None = None,
    *,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    impl: Impl = "auto",
) -> TokenScores:
    """Entropy, confidence, top-2 margin and (with targets) nll of every token, fp32, in one read of the logits.

    Scores are statistics, not training signals: they carry no gradient. ``impl='torch'`` runs
    :func:`token_scores_torch`; the Triton kernel reads each row once (online softmax with the exact top-2 and
    the target logit) and gives the same fields with the same semantics.

    Args:
        logits: (N, V) or (B, T, V), any floating dtype (Triton: float16, bfloat16, float32).
        targets: (N,) or (B, T) class indices aligned with ``logits`` (no shift), or ``None``.
        ignore_index: Target value marking positions to ignore (nll 0, ``valid`` False).
        chunk_size: Rows per chunk of the ``'torch'`` path (default ~16 Mi elements); the kernel needs none.
        impl: ``'auto'``, ``'torch'`` or ``'triton'`` (:func:`cggr._dispatch.resolve_impl`).

    Returns:
        :class:`TokenScores` with tensors of shape ``logits.shape[:-1]`` on ``logits.device``.
    """
    if not isinstance(logits, Tensor):  # before resolve_impl reads its device
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if resolve_impl(impl, logits, op="token_scores") == "torch":  # it checks its inputs itself
        return token_scores_torch(logits, targets, ignore_index=ignore_index, chunk_size=chunk_size)
    check_logits_targets(logits, targets, ignore_index=ignore_index)
    from cggr.kernels.scoring import token_scores_triton

    lead = logits.shape[:-1]
    vocab = logits.shape[-1]
    with torch.no_grad():
        ent, conf, marg, nll = token_scores_triton(
            logits.detach().reshape(-1, vocab), targets.reshape(-1).long() if targets is not None else None,
            ignore_index,
        )
    return TokenScores(
        entropy=ent.view(lead),
        confidence=conf.view(lead),
        margin=marg.view(lead),
        nll=nll.view(lead) if nll is not None else None,
        valid=(targets != ignore_index) if targets is not None else None,
        vocab_size=vocab,
    )


@torch.no_grad()
def token_scores_torch(
    logits: Tensor,
    targets: Tensor | None = None,
    *,
    ignore_index: int = -100,
    chunk_size: int | None = None,
) -> TokenScores:
    """The pure-PyTorch :func:`token_scores` (the CPU path and the test oracle): fp32, in chunks of rows.

    Scores are statistics, not training signals: they carry no gradient.

    Args:
        logits: (N, V) or (B, T, V), any floating dtype.
        targets: (N,) or (B, T) class indices aligned with ``logits`` (no shift), or ``None``.
        ignore_index: Target value marking positions to ignore.
        chunk_size: Rows processed at once; defaults to about 16 Mi elements per chunk.

    Returns:
        :class:`TokenScores` with tensors of shape ``logits.shape[:-1]`` on ``logits.device``.
    """
    check_logits_targets(logits, targets, ignore_index=ignore_index)
    lead_shape = logits.shape[:-1]
    vocab = logits.shape[-1]
    z_all = logits.reshape(-1, vocab)  # (N, V)
    n = z_all.shape[0]
    t_all = targets.reshape(-1).long() if targets is not None else None  # (N,) any integer dtype

    entropy = torch.empty(n, dtype=torch.float32, device=logits.device)
    confidence = torch.empty_like(entropy)
    margin = torch.empty_like(entropy)
    nll = torch.empty_like(entropy) if t_all is not None else None

    rows = _row_chunk(vocab, chunk_size)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        z = z_all[start:stop].float()  # (c, V) fp32 <- the only chunk-sized copy
        zmax = z.amax(dim=-1, keepdim=True)  # (c, 1)
        # (c, V), <= 0; a -inf logit (masked vocabulary) becomes the most negative float, so that its
        # p · (z - max z) term is 0 · finite = 0 rather than 0 · -inf = NaN (NaN logits still give NaN)
        zc = (z - zmax).clamp_(min=torch.finfo(torch.float32).min)
        e = torch.exp(zc)  # (c, V)
        s = e.sum(dim=-1, keepdim=True)  # (c, 1)
        lse = zmax + torch.log(s)  # (c, 1)
        # H = lse - Σ p z = log s - Σ p (z - max z): shifted, so no cancellation against a large lse.
        entropy[start:stop] = (torch.log(s) - (e * zc).sum(dim=-1, keepdim=True) / s).squeeze(-1).clamp_min(0.0)
        confidence[start:stop] = torch.exp(zmax - lse).squeeze(-1)
        if vocab >= 2:
            top2 = torch.topk(z, 2, dim=-1).values  # (c, 2), exact, duplicates kept
            margin[start:stop] = (torch.exp(top2[:, 0:1] - lse) - torch.exp(top2[:, 1:2] - lse)).squeeze(-1)
        else:
            margin[start:stop] = torch.exp(zmax - lse).squeeze(-1)
        if t_all is not None:
            t = t_all[start:stop]
            ok = t != ignore_index
            zt = torch.gather(z, 1, torch.where(ok, t, 0).unsqueeze(-1))  # (c, 1)
            nll[start:stop] = torch.where(ok, (lse - zt).squeeze(-1), 0.0)

    return TokenScores(
        entropy=entropy.view(lead_shape),
        confidence=confidence.view(lead_shape),
        margin=margin.view(lead_shape),
        nll=nll.view(lead_shape) if nll is not None else None,
        valid=(targets != ignore_index) if targets is not None else None,
        vocab_size=vocab,
    )


def masked_mean(values: Tensor, valid: Tensor) -> Tensor:
    """Mean of ``values`` over the ``valid`` positions (0 when none is valid), a 0-d tensor without host sync.

    A select, not a multiply: a NaN or inf at an invalid (ignored, padded) position never enters the sum
    (``NaN · 0`` would be NaN), so garbage there cannot change a statistic that selection depends on.
    """
    return torch.where(valid, values, 0).sum() / valid.sum().clamp(min=1)


def difficulty(scores: TokenScores, mode: str) -> Tensor:
    """One difficulty value per token, fp32, higher = harder (docs/design.md §4.2).

    * ``entropy``: H.
    * ``margin``: 1 - margin.
    * ``loss``: nll; without targets it falls back to H.
    * ``combined``: H / ln V + (1 - margin) + nll / ln V (the nll term only with targets). For V = 1 both
      normalised terms are 0 (H and nll are then always 0).

    Args:
        scores: Output of :func:`token_scores`.
        mode: One of ``'entropy'``, ``'margin'``, ``'loss'``, ``'combined'``.
    """
    check_choice("mode", mode, SCORING_MODES)
    if mode == "entropy":
        return scores.entropy
    if mode == "margin":
        return 1.0 - scores.margin
    if mode == "loss":
        return scores.nll if scores.nll is not None else scores.entropy
    inv_log_v = 1.0 / math.log(scores.vocab_size) if scores.vocab_size > 1 else 0.0
    out = scores.entropy * inv_log_v + (1.0 - scores.margin)
    if scores.nll is not None:
        out = out + scores.nll * inv_log_v
    return out
