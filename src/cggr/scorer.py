"""Scoring a batch with a cheap router: ``CGGRScorer`` (a token keep-mask) and the sequence scores of ``CGGRModel``.

Shape legend: B batch, T sequence length, V vocabulary.

Both run the router (a truncated copy of the model's first layers, or any callable returning logits) without grad,
score every token from its logits (:func:`cggr.functional.token_scores`: fp32 entropy, confidence, margin, nll; one
Triton pass on CUDA) and rank by difficulty. :class:`CGGRScorer` stops at a (B, T) token mask, the input of null
routing (``PersistentTRMLP(token_mask=...)``); :func:`router_scores` averages the difficulty over each sequence's
valid targets (or, for ``scoring='reducible'``, compares the router's loss with a reference model's) so that
:class:`cggr.CGGRModel` can keep the hardest sequences. Nothing here reads a device value on the host.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from cggr._inputs import check_2d, router_logits, set_router
from cggr._selector import TokenSelector
from cggr._validation import check_choice
from cggr.config import SelectionConfig, resolve_selection_config
from cggr.functional import IMPLS, token_scores
from cggr.reference import excess_scores
from cggr.sampling import DEFAULT_TEMPERATURE
from cggr.scoring import difficulty, masked_mean


class CGGRScorer(TokenSelector):
    """Per-token difficulty and a keep-mask from a router, for null routing (e.g. ``PersistentTRMLP``).

    Args:
        router: A :class:`cggr.TruncatedRouter` (or any callable ``router(input_ids, attention_mask=...)``
            returning (B, T, V) logits or an object with ``.logits``). Only a ``TruncatedRouter`` (which owns
            no parameters) is registered as a submodule; any other router is held by plain reference so that
            its parameters are never counted twice.
        scoring, selection, num_strata, min_tokens_per_sequence, dynamic_threshold, threshold_sensitivity,
        min_tokens_ratio, warmup_steps, ignore_index, seed, temperature: As in :class:`cggr.CGGRLoss`
            (``selection='importance'`` is refused: the mask carries no 1 / π weights).
        impl: Scoring kernel, ``'auto'``, ``'torch'`` or ``'triton'`` (see :func:`cggr.functional.token_scores`).
        selection_config: The selection settings as one :class:`cggr.SelectionConfig` instead of the keyword
            arguments above (which then stay at their defaults).

    Call: ``difficulty, mask, info = scorer(input_ids, targets=None, attention_mask=None)`` where ``targets``
    (B, T) are aligned with the logits (already shifted) and enable the nll term; ``attention_mask`` zeros and
    ``ignore_index`` targets are never selected. ``difficulty`` is (B, T) fp32, ``mask`` (B, T) bool, ``info``
    a dict of 0-d tensors: current_ratio (a CPU scalar when the ratio is a host value: fixed, or the
    scorer's step buffer on another device), tokens_selected,
    tokens_total, confidence, entropy (on the device).
    """

    _selection_owner = "CGGRScorer"

    def __init__(
        self,
        router: Callable[..., Any] | nn.Module,
        min_tokens_ratio: float = 0.25,
        scoring: str = "combined",
        selection: str = "topk",
        num_strata: int = 4,
        min_tokens_per_sequence: int = 1,
        dynamic_threshold: bool = True,
        threshold_sensitivity: float = 0.5,
        warmup_steps: int = 1000,
        ignore_index: int = -100,
        seed: int | None = None,
        impl: str = "auto",
        temperature: float = DEFAULT_TEMPERATURE,
        selection_config: SelectionConfig | None = None,
    ) -> None:
        super().__init__(resolve_selection_config(
            "CGGRScorer", selection_config, scoring=scoring, selection=selection, num_strata=num_strata,
            min_tokens_per_sequence=min_tokens_per_sequence, dynamic_threshold=dynamic_threshold,
            threshold_sensitivity=threshold_sensitivity, min_tokens_ratio=min_tokens_ratio,
            warmup_steps=warmup_steps, ignore_index=ignore_index, seed=seed, temperature=temperature,
        ))
        if not callable(router):
            raise TypeError(f"router must be a TruncatedRouter or a callable returning logits, got {type(router)}")
        set_router(self, router)
        self.impl = check_choice("impl", impl, IMPLS)

    def forward(
        self,
        input_ids: Tensor,
        targets: Tensor | None = None,
        attention_mask: Tensor | None = None,
        **router_kwargs: Any,
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Score every token and select the hardest.

        Returns:
            ``(difficulty (B, T) fp32, mask (B, T) bool, info)``.
        """
        check_2d("input_ids", input_ids, integer=True)
        check_2d("targets", targets, input_ids.shape, device=input_ids.device)
        check_2d("attention_mask", attention_mask, input_ids.shape, device=input_ids.device)
        logits = router_logits(self.router, input_ids, attention_mask, **router_kwargs)  # (B, T, V)
        scores = token_scores(logits, targets, ignore_index=self.ignore_index, impl=self.impl)
        valid = scores.valid if scores.valid is not None else torch.ones(scores.entropy.shape, dtype=torch.bool,
                                                                          device=scores.entropy.device)
        if attention_mask is not None:
            valid = valid & attention_mask.bool()
        diff, mask, info = self.select_scored(scores, valid)  # (B, T) fp32, (B, T) bool
        return diff, mask, info


def router_scores(
    router: Callable[..., Any], input_ids: Tensor, targets: Tensor, valid: Tensor, attention_mask: Tensor | None,
    reference_loss: Tensor | None, router_kwargs: dict[str, Any], *, scoring: str, reference_norm: str,
    ignore_index: int, impl: str,
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Token difficulty and per-sequence scores of a batch from the router, as :class:`cggr.CGGRModel` ranks it.

    Args:
        router: Returns (B, T, V) logits (see :func:`cggr._inputs.router_logits`).
        input_ids: (B, T) token ids.
        targets: (B, T) targets aligned with the logits (shifted for causal LMs), ``ignore_index`` where none.
        valid: (B, T) bool, ``targets != ignore_index``.
        attention_mask: (B, T) or ``None``, passed to the router.
        reference_loss: ``scoring='reducible'`` only: the checked reference losses, (B,) or (B, T).
        router_kwargs: Extra router inputs (the batch's, unsliced).
        scoring, reference_norm, ignore_index, impl: The model's settings.

    Returns:
        ``(token difficulty (B, T) fp32, sequence score (B,) fp32, router statistics)``: the score is the mean
        difficulty over the sequence's valid targets (``'reducible'``: :func:`reducible_scores`), -inf for a
        sequence without any; the statistics are the router's mean confidence and entropy over valid tokens.
    """
    r_logits = router_logits(router, input_ids, attention_mask, **router_kwargs)
    scores = token_scores(r_logits, targets, ignore_index=ignore_index, impl=impl)
    del r_logits
    n_tok = valid.sum(-1)  # (B,)
    if scoring == "reducible":
        tok_diff, seq_score = reducible_scores(scores.nll, reference_loss, valid, n_tok, reference_norm)
    else:
        tok_diff = difficulty(scores, scoring)  # (B, T) fp32
        seq_score = torch.where(valid, tok_diff, 0.0).sum(-1) / n_tok.clamp(min=1)  # (B,)
    seq_score = torch.where(n_tok > 0, seq_score, -torch.inf)
    stats = {  # padded garbage stays out
        "router_confidence": masked_mean(scores.confidence, valid),
        "router_entropy": masked_mean(scores.entropy, valid),
    }
    return tok_diff, seq_score, stats


def check_sequence_scores(sequence_scores: object, batch: int, device: torch.device) -> Tensor:
    """Precomputed per-sequence scores (``CGGRModel.forward(..., sequence_scores=)``): a floating-point (B,)
    tensor, returned detached, fp32, on ``device``."""
    if not isinstance(sequence_scores, Tensor) or not sequence_scores.is_floating_point():
        got = sequence_scores.dtype if isinstance(sequence_scores, Tensor) else type(sequence_scores).__name__
        raise TypeError(f"sequence_scores must be a floating-point (B,) tensor, got {got}")
    if tuple(sequence_scores.shape) != (batch,):
        raise ValueError(f"sequence_scores must have shape ({batch},) (one score per sequence), got "
                         f"{tuple(sequence_scores.shape)}")
    return sequence_scores.detach().to(device=device, dtype=torch.float32)


def reducible_scores(nll: Tensor, reference_loss: Tensor, valid: Tensor, n_tok: Tensor, reference_norm: str
                     ) -> tuple[Tensor, Tensor]:
    """Token difficulty (B, T) and sequence score (B,) of ``scoring='reducible'`` (RHO-LOSS).

    The sequence score is ``excess_scores(learner's mean nll, reference's mean loss)`` over the sequences with
    valid targets, normalised per ``reference_norm``; the token difficulty (for ``token_ratio``) is the
    per-token excess with a (B, T) reference, else the router's nll.
    """
    seq_valid = n_tok > 0
    seq_nll = torch.where(valid, nll, 0.0).sum(-1) / n_tok.clamp(min=1)  # (B,)
    if reference_loss.dim() == 2:
        seq_ref = torch.where(valid, reference_loss, 0.0).sum(-1) / n_tok.clamp(min=1)
        tok_diff = excess_scores(nll, reference_loss, valid, normalize=reference_norm)
    else:
        seq_ref = reference_loss
        tok_diff = nll
    seq_ref = torch.where(seq_valid, seq_ref, 0.0)  # a sequence without targets may carry a NaN reference
    return tok_diff, excess_scores(seq_nll, seq_ref, seq_valid, normalize=reference_norm)


__all__ = ["CGGRScorer", "check_sequence_scores", "reducible_scores", "router_scores"]
