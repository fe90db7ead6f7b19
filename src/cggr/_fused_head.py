"""The fused head of :class:`cggr.CGGRModel`: the loss of the kept targets straight from the final hidden states.

Shape legend: k selected sequences, T sequence length, H hidden size, V vocabulary, K kept tokens, K_max a static
bound on K.

Instead of the (k, T, V) logits, the base model's (k, T, H) hidden states (after the final norm) go through
:func:`cggr.functional.linear_cross_entropy` with the head's weight, bias, softcap and logit scale (the quirks of
:mod:`cggr.integrations.hf_quirks`), so the [k·T, V] logits never exist; with ``token_ratio`` only a static
K_max ≥ K of the rows are gathered first, so the head costs about ``token_ratio`` of a full one. The loss and
gradients equal the logits path's up to floating-point rounding.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from cggr.functional import LinearCrossEntropyOptions, linear_cross_entropy
from cggr.integrations.hf_quirks import HeadSpec, fused_head_parts, head_operands


def fused_parts(model: nn.Module, *, forward_fn: object, causal: bool) -> tuple[tuple[nn.Module, HeadSpec] | None, str]:
    """``((base model, head spec), "")`` when the fused head can run for ``model``, else ``(None, reason)``."""
    if forward_fn is not None:
        return None, "forward_fn is given (the fused head would call the base model past it)"
    if not causal:
        return None, "the fused head computes next-token (causal) losses; this model is trained as a masked LM"
    return fused_head_parts(model)


def fused_head_loss(
    hidden: Tensor, spec: HeadSpec, kept_targets: Tensor, keep: Tensor, *, token_ratio: float | None,
    ignore_index: int, impl: str, options: LinearCrossEntropyOptions | None, tok_weight: Tensor | None = None,
    chosen_rows: int | None = None,
) -> Tensor:
    """Mean cross-entropy over the kept targets, straight from the final hidden states.

    Args:
        hidden: (k, T, H) hidden states after the final norm.
        spec: Head weight (V, H), bias (V,), softcap and logit scale.
        kept_targets: (k, T) shifted targets, ``ignore_index`` where not kept.
        keep: (k, T) bool, ``kept_targets != ignore_index``.
        token_ratio: The token share of this call (``None``: every valid token).
        ignore_index, impl, options: The model's ``ignore_index``, ``impl`` and ``head_options``.
        tok_weight: Optional (k, T) per-token weights (importance sampling; ``token_ratio`` is then None).
        chosen_rows: Rows the tokens were chosen among when more than these k (global selection: the kept
            tokens of all ranks' K rows were ranked together, so this rank may hold more than its share).

    Returns:
        0-d fp32 loss (0.0 with grad when nothing is kept), equal to the unfused path's.
    """
    k, t, hsize = hidden.shape
    hidden, weight, bias = head_operands(hidden, spec)
    if token_ratio is not None:
        # Only the kept rows matter: gather a static K_max ≥ K of them (kept rows first; the rest carry
        # ignore_index targets), so the head costs ~token_ratio of a full one. K = max(1, round(r · n_valid))
        # and n_valid ≤ k·(T - 1) (the last position of a causal sequence predicts nothing).
        n_rows = k if chosen_rows is None else chosen_rows
        k_max = min(k * t, max(1, math.floor(token_ratio * n_rows * (t - 1) + 0.5)))
        rows = torch.argsort((~keep.reshape(-1)).to(torch.int8), stable=True)[:k_max]  # (K_max,)
        h2 = hidden.reshape(-1, hsize).index_select(0, rows)  # (K_max, H)
        t2 = kept_targets.reshape(-1).index_select(0, rows)  # (K_max,)
    else:  # HF shift: position t predicts label t + 1 (the padded last column is all ignore_index)
        h2 = hidden[:, :-1].reshape(-1, hsize)  # (k·(T-1), H)
        t2 = kept_targets[:, :-1].reshape(-1)  # (k·(T-1),)
    w2 = tok_weight[:, :-1].reshape(-1) if tok_weight is not None else None
    with torch.autocast(hidden.device.type, enabled=False):
        return linear_cross_entropy(
            h2, weight, t2, bias=bias, ratio=1.0, ignore_index=ignore_index, softcap=spec.softcap,
            reduction="mean", impl=impl, options=options, row_weights=w2,
        )


__all__ = ["fused_head_loss", "fused_parts"]
