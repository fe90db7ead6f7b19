"""``CGGRLoss``: cross-entropy over the hardest tokens only.

Shape legend: B batch, T sequence length, N = B·T tokens, V vocabulary, K kept tokens.

Dataflow of one call:

    logits (N, V) ──token_scores (no grad, fp32, chunked)──> entropy, confidence, margin, nll   (N,)
                  ──difficulty + select_tokens──────────────> mask (N,) bool, K = mask.sum() on device
    loss = Σ_selected nll / K                                  (reduction='mean'; 'sum' drops the / K)
    backward: d logits = (softmax(z) - onehot(target)) · w     w = mask / K, recomputed chunk by chunk

The nll of every token is a by-product of scoring, so the forward reads the logits once; the backward writes
the gradient in the logits' dtype without an fp32 copy of (N, V). What this saves: the loss and the LM-head
backward of easy tokens. It does NOT shrink the backward through the transformer body (attention spreads
every token's gradient to earlier positions); use :class:`cggr.CGGRModel` for that.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from cggr._selector import TokenSelector
from cggr._validation import REDUCTIONS, check_choice, check_int
from cggr.functional import (
    IMPLS,
    LinearCrossEntropyOptions,
    check_head_options,
    linear_cross_entropy,
    token_scores,
)
from cggr.scoring import DEFAULT_CHUNK_ELEMENTS


class _SelectedCrossEntropy(torch.autograd.Function):
    """loss = Σ_n w_n · nll_n with nll precomputed in fp32; backward recomputes softmax chunk by chunk."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, weights: Tensor, nll: Tensor, rows: int) -> Tensor:
        # logits (N, V) any float dtype; targets (N,) long with ignored entries already weighted 0;
        # weights (N,) fp32; nll (N,) fp32 (0 at ignored positions).
        ctx.save_for_backward(logits, targets, weights)
        ctx.rows = rows
        return (weights * nll).sum()

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        logits, targets, weights = ctx.saved_tensors
        n, _ = logits.shape
        grad = torch.empty_like(logits)  # (N, V) in the logits' dtype
        coef = (weights * grad_out).unsqueeze(-1)  # (N, 1) fp32
        for start in range(0, n, ctx.rows):
            stop = min(start + ctx.rows, n)
            p = torch.softmax(logits[start:stop].float(), dim=-1)  # (c, V) fp32
            p.scatter_add_(1, targets[start:stop].unsqueeze(-1), torch.full_like(p[:, :1], -1.0))
            grad[start:stop] = (p * coef[start:stop]).to(grad.dtype)
        return grad, None, None, None, None


class CGGRLoss(TokenSelector):
    """Selective cross-entropy: only the hardest tokens contribute to the loss and its gradient.

    Args:
        scoring: Difficulty signal: ``'entropy'``, ``'margin'``, ``'loss'`` or ``'combined'``.
        selection: ``'topk'``, ``'stratified'``, ``'sequence_aware'``, ``'fixed_quota'`` or ``'random'``.
        num_strata: Buckets for ``stratified``.
        min_tokens_per_sequence: Per-sequence floor for ``sequence_aware`` (3-D inputs: per row of B).
        dynamic_threshold: Scale the ratio by the batch's mean confidence (ignored by ``fixed_quota``).
        threshold_sensitivity: Strength of the dynamic threshold.
        min_tokens_ratio: Share of valid tokens kept once warm-up is over, in (0, 1].
        warmup_steps: Steps over which the kept share falls linearly from 1 to ``min_tokens_ratio``.
        ignore_index: Target value to ignore.
        reduction: ``'mean'`` over the selected tokens, or ``'sum'``.
        seed: Seed of the random source used by ``stratified`` and ``random`` (a counter-based hash that
            ``torch.compile`` can trace; its draw counter is saved in ``state_dict``). ``None``: drawn from
            torch's global generator at construction, so ``torch.manual_seed`` before it makes runs repeatable.
        chunk_size: Rows of logits processed at once in scoring and backward (default: ~16 Mi elements).
        impl: Scoring implementation: ``'auto'`` (the one-pass Triton kernel on CUDA, else PyTorch),
            ``'torch'`` or ``'triton'`` (raises where it cannot run). ``CGGR_IMPL=torch`` forces PyTorch.
        head_options: Kernel settings of :meth:`forward_hidden` (a :class:`cggr.functional.
            LinearCrossEntropyOptions` setting only ``kernel``, ``workspace``, ``workspace_bytes``,
            ``accumulate``, ``filter_eps``, ``bwd``; e.g. ``LinearCrossEntropyOptions(workspace='outputs')`` for
            no logits workspace). ``None``: the defaults.

    Call ``step()`` after each optimizer step to advance the curriculum. ``step_count`` is a buffer, so
    ``state_dict()`` carries the curriculum across a resume. Inputs: logits (B, T, V) or (N, V), targets
    (B, T) or (N,) already aligned with the logits (no shift), any float dtype for logits.
    """

    def __init__(
        self,
        scoring: str = "combined",
        selection: str = "topk",
        num_strata: int = 4,
        min_tokens_per_sequence: int = 1,
        dynamic_threshold: bool = True,
        threshold_sensitivity: float = 0.5,
        min_tokens_ratio: float = 0.25,
        warmup_steps: int = 1000,
        ignore_index: int = -100,
        reduction: str = "mean",
        seed: int | None = None,
        chunk_size: int | None = None,
        impl: str = "auto",
        head_options: LinearCrossEntropyOptions | None = None,
    ) -> None:
        super().__init__(
            scoring=scoring, selection=selection, num_strata=num_strata,
            min_tokens_per_sequence=min_tokens_per_sequence, dynamic_threshold=dynamic_threshold,
            threshold_sensitivity=threshold_sensitivity, min_tokens_ratio=min_tokens_ratio,
            warmup_steps=warmup_steps, ignore_index=ignore_index, seed=seed,
        )
        self.reduction = check_choice("reduction", reduction, REDUCTIONS)
        self.chunk_size = None if chunk_size is None else check_int("chunk_size", chunk_size, minimum=1)
        self.impl = check_choice("impl", impl, IMPLS)
        self.head_options = check_head_options(head_options, "CGGRLoss")
        self._last: dict[str, Tensor] = {}

    def select(self, logits: Tensor, targets: Tensor) -> tuple[Tensor, Any]:
        """Scores and selection without the loss: returns (mask like targets, TokenScores)."""
        scores = token_scores(logits, targets, ignore_index=self.ignore_index, chunk_size=self.chunk_size,
                              impl=self.impl)  # checks logits and targets
        _, mask, info = self.select_scored(scores, scores.valid)
        self._last = {k: v.detach() for k, v in info.items()}
        return mask, scores

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Cross-entropy over the selected tokens.

        Args:
            logits: (B, T, V) or (N, V).
            targets: (B, T) or (N,) aligned with ``logits``; ``ignore_index`` entries are skipped.

        Returns:
            0-d fp32 loss. 0.0 (still differentiable) when every target is ignored.
        """
        mask, scores = self.select(logits, targets)
        vocab = logits.shape[-1]
        flat_mask = mask.reshape(-1)
        weights = flat_mask.float()
        if self.reduction == "mean":
            weights = weights / flat_mask.sum().clamp(min=1)
        safe_targets = torch.where(scores.valid, targets, 0).reshape(-1).long()  # (N,) gather/scatter index
        rows = self.chunk_size or max(1, DEFAULT_CHUNK_ELEMENTS // vocab)
        return _SelectedCrossEntropy.apply(
            logits.reshape(-1, vocab), safe_targets, weights, scores.nll.reshape(-1), rows
        )

    def forward_hidden(
        self, hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None = None,
        softcap: float | None = None,
    ) -> Tensor:
        """The same selective loss straight from hidden states and the LM head: [N, V] logits never exist.

        Runs :func:`cggr.functional.linear_cross_entropy` with this loss's scoring, selection, current
        ratio, dynamic threshold, strata, sequence floor, ``ignore_index``, ``reduction`` and ``impl``.

        Args:
            hidden: (B, T, H) or (N, H) final hidden states (after the model's final norm).
            weight: (V, H) head weight, e.g. ``model.get_output_embeddings().weight``.
            targets: (B, T) or (N,) aligned with ``hidden`` (no shift).
            bias: Optional (V,) head bias.
            softcap: Final-logit soft-capping (Gemma 2/3), or ``None``.

        Returns:
            0-d fp32 loss.
        """
        options = dataclasses.replace(
            self.head_options or LinearCrossEntropyOptions(),
            num_strata=self.num_strata,
            min_tokens_per_sequence=self.min_tokens_per_sequence,
            threshold_sensitivity=self.threshold_sensitivity if self.uses_dynamic_threshold else None,
            generator=self.selection_generator(),
        )
        loss, info = linear_cross_entropy(
            hidden, weight, targets, bias=bias, ratio=self.current_ratio, scoring=self.scoring,
            selection=self.selection, ignore_index=self.ignore_index, softcap=softcap, reduction=self.reduction,
            impl=self.impl, return_info=True, options=options,
        )
        valid = info.scores.valid
        n_valid = valid.sum()
        denom = n_valid.clamp(min=1)
        self._last = {
            "current_ratio": info.ratio.detach(),
            "tokens_selected": info.mask.sum().detach(),
            "tokens_total": n_valid.detach(),
            "confidence": ((info.scores.confidence * valid).sum() / denom).detach(),
            "entropy": ((info.scores.entropy * valid).sum() / denom).detach(),
        }
        return loss

    # ------------------------------------------------------------------ metrics
    def get_metrics(self) -> dict[str, float]:
        """Host-side metrics of the last forward (this syncs; call it outside the hot path)."""
        out: dict[str, float] = {"step": self._step, "scheduled_ratio": self.current_ratio}
        if self._last:
            vals = {k: float(v) for k, v in self._last.items()}
            total = vals["tokens_total"]
            out.update(
                token_ratio=vals["tokens_selected"] / total if total > 0 else 0.0,
                effective_ratio=vals["current_ratio"],
                tokens_selected=int(vals["tokens_selected"]),
                tokens_total=int(total),
                avg_confidence=vals["confidence"],
                avg_entropy=vals["entropy"],
            )
        return out
