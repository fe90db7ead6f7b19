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

from cggr._inputs import check_num_items
from cggr._selector import TokenSelector
from cggr._validation import REDUCTIONS, check_choice, check_int
from cggr.config import SelectionConfig, resolve_selection_config
from cggr.functional import (
    IMPLS,
    LinearCrossEntropyOptions,
    check_head_options,
    linear_cross_entropy,
    token_scores,
)
from cggr.reference import excess_scores
from cggr.sampling import DEFAULT_TEMPERATURE, DEFAULT_UNIFORM_MIX
from cggr.scoring import DEFAULT_CHUNK_ELEMENTS, masked_mean


def _check_targets(targets: object) -> None:
    """token_scores takes ``targets=None`` (scores without nll); a loss needs them."""
    if not isinstance(targets, Tensor):
        raise TypeError(
            "targets must be a torch.Tensor of class indices (B, T) or (N,) aligned with the logits, got "
            f"{'None' if targets is None else type(targets).__name__}"
        )


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
        kept = weights.unsqueeze(-1) != 0  # (N, 1): ignored and unselected rows get exactly 0, even if NaN/inf
        for start in range(0, n, ctx.rows):
            stop = min(start + ctx.rows, n)
            p = torch.softmax(logits[start:stop].float(), dim=-1)  # (c, V) fp32
            p.scatter_add_(1, targets[start:stop].unsqueeze(-1), torch.full_like(p[:, :1], -1.0))
            grad[start:stop] = torch.where(kept[start:stop], p * coef[start:stop], 0.0).to(grad.dtype)
        return grad, None, None, None, None


class CGGRLoss(TokenSelector):
    """Selective cross-entropy: only the hardest tokens contribute to the loss and its gradient.

    Args:
        scoring: Difficulty signal: ``'entropy'``, ``'margin'``, ``'loss'``, ``'combined'`` or ``'excess'``
            (Rho-1's selective language modelling: the token's loss minus a reference model's loss on the same
            token, passed as ``forward(..., reference_loss=)``; see :func:`cggr.reference.excess_scores` and
            :func:`cggr.reference.compute_reference_losses`; Rho-1 keeps ~60-70% of the tokens).
        selection: ``'topk'``, ``'stratified'``, ``'sequence_aware'``, ``'fixed_quota'``, ``'random'``,
            ``'sampled'`` (Gumbel-top-k over difficulty / ``temperature``: τ → 0 is ``topk``, τ → ∞ is
            ``random``) or ``'importance'`` (unbiased: tokens drawn with inclusion probability π ∝ difficulty
            mixed with ``uniform_mix`` of uniform, each kept token weighted 1 / π, so the expected loss and
            gradient equal those of every valid token; negative difficulty counts as 0). See :mod:`cggr.sampling`.
        num_strata: Buckets for ``stratified``.
        min_tokens_per_sequence: Per-sequence floor for ``sequence_aware`` (3-D inputs: per row of B).
        dynamic_threshold: Scale the ratio by the batch's mean confidence (ignored by ``fixed_quota``).
        threshold_sensitivity: Strength of the dynamic threshold, in [0, 1] (as in the original ``cggr``).
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
        temperature: τ > 0 of ``selection='sampled'``, in difficulty units.
        uniform_mix: λ in (0, 1] of ``selection='importance'`` (every weight is at most N_valid / (K · λ)).
        reference_norm: How ``'excess'`` combines the losses (:func:`cggr.reference.excess_scores`): ``'none'``
            (the raw difference, Rho-1), ``'zscore'`` (both standardised over the batch's valid tokens first) or
            ``'rank'`` (percentile ranks).
        head_options: Kernel settings of :meth:`forward_hidden` (a :class:`cggr.functional.
            LinearCrossEntropyOptions` setting only ``kernel``, ``workspace``, ``workspace_bytes``,
            ``accumulate``, ``filter_eps``, ``bwd``; e.g. ``LinearCrossEntropyOptions(workspace='outputs')`` for
            no logits workspace). ``None``: the defaults.
        selection_config: The selection settings as one :class:`cggr.SelectionConfig` instead of the keyword
            arguments above (``scoring`` ... ``reference_norm``, which then stay at their defaults); the attributes
            of those names read it (``criterion.selection_config``), and assigning one re-checks it.

    Call ``step()`` after each optimizer step to advance the curriculum. ``step_count`` is a buffer, so
    ``state_dict()`` carries the curriculum across a resume. In eval mode (``criterion.eval()``) or with grad
    disabled (``torch.no_grad()``, as evaluation loops such as ``Trainer.evaluate`` run) the loss is the true loss
    over every valid token (no selection, no random draw; the metrics of the last training call are kept), as
    :class:`cggr.CGGRModel` does in eval mode. Inputs: logits (B, T, V) or (N, V), targets
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
        temperature: float = DEFAULT_TEMPERATURE,
        uniform_mix: float = DEFAULT_UNIFORM_MIX,
        reference_norm: str = "none",
        selection_config: SelectionConfig | None = None,
    ) -> None:
        super().__init__(resolve_selection_config(
            "CGGRLoss", selection_config, scoring=scoring, selection=selection, num_strata=num_strata,
            min_tokens_per_sequence=min_tokens_per_sequence, dynamic_threshold=dynamic_threshold,
            threshold_sensitivity=threshold_sensitivity, min_tokens_ratio=min_tokens_ratio,
            warmup_steps=warmup_steps, ignore_index=ignore_index, seed=seed, temperature=temperature,
            uniform_mix=uniform_mix, reference_norm=reference_norm,
        ))
        self.reduction = check_choice("reduction", reduction, REDUCTIONS)
        self.chunk_size = None if chunk_size is None else check_int("chunk_size", chunk_size, minimum=1)
        self.impl = check_choice("impl", impl, IMPLS)
        self.head_options = check_head_options(head_options, "CGGRLoss")
        self._last: dict[str, Tensor] = {}

    def select(self, logits: Tensor, targets: Tensor, reference_loss: Tensor | None = None) -> tuple[Tensor, Any]:
        """Scores and selection without the loss: returns (mask like targets, TokenScores)."""
        _check_targets(targets)
        mask, scores, _ = self._select(logits, targets, reference_loss)
        return mask, scores

    def _select(self, logits: Tensor, targets: Tensor, reference_loss: Tensor | None):
        scores = token_scores(logits, targets, ignore_index=self.ignore_index, chunk_size=self.chunk_size,
                              impl=self.impl)  # checks logits and targets
        diff = None
        if self.scoring == "excess":
            if reference_loss is None:
                raise ValueError("reference_loss is required with scoring='excess': the reference model's per-token "
                                 f"losses shaped like targets {tuple(targets.shape)} (cggr.reference)")
            if not isinstance(reference_loss, Tensor) or not reference_loss.is_floating_point():
                got = reference_loss.dtype if isinstance(reference_loss, Tensor) else type(reference_loss).__name__
                raise TypeError(f"reference_loss must be a floating-point tensor shaped like targets, got {got}")
            if reference_loss.shape != targets.shape:
                raise ValueError(f"reference_loss shape {tuple(reference_loss.shape)} does not match targets shape "
                                 f"{tuple(targets.shape)} (per-token reference losses, aligned like targets)")
            ref = reference_loss.to(device=scores.nll.device, dtype=torch.float32)
            diff = excess_scores(scores.nll, ref, scores.valid, normalize=self.reference_norm)
        elif reference_loss is not None:
            raise ValueError(f"reference_loss is only used with scoring='excess', got scoring={self.scoring!r}")
        _, mask, info, pi = self.select_scored_weighted(scores, scores.valid, diff)
        self._last = {k: v.detach() for k, v in info.items()}
        return mask, scores, pi

    @property
    def selecting(self) -> bool:
        """True when a call selects tokens (training mode with grad enabled); else the full loss is computed."""
        return self.training and torch.is_grad_enabled()

    def forward(
        self, logits: Tensor, targets: Tensor, reference_loss: Tensor | None = None,
        num_items_in_batch: int | Tensor | None = None,
    ) -> Tensor:
        """Cross-entropy over the selected tokens (over every valid token when not :attr:`selecting`).

        Args:
            logits: (B, T, V) or (N, V).
            targets: (B, T) or (N,) aligned with ``logits``; ``ignore_index`` entries are skipped.
            reference_loss: Per-token reference losses shaped like ``targets`` (``scoring='excess'`` only, where
                it is required; e.g. ``ReferenceLosses.tokens(idx)[:, :-1]`` for targets ``labels[:, 1:]``).
            num_items_in_batch: Valid targets in the whole accumulated batch (transformers' Trainer passes it to
                a ``compute_loss_func``; see :func:`cggr.integrations.transformers.cggr_loss_func`). Given N, the
                ``'mean'`` loss becomes ``mean over the selected tokens × n / N`` with n the valid targets of this
                call, so each micro-batch weighs by its share of the tokens: the accumulated loss and gradient are
                those of one batch whenever every micro-batch keeps the same share (exactly so with every token
                kept and when not selecting, where it is HF's ``sum / N``). Not allowed with ``reduction='sum'``.

        Returns:
            0-d fp32 loss. 0.0 (still differentiable) when every target is ignored. With
            ``selection='importance'``: Σ_kept nll / (π · N_valid) (``'sum'``: Σ_kept nll / π), an unbiased
            estimate of the mean (sum) over every valid token.
        """
        _check_targets(targets)
        num_items = self._check_num_items(num_items_in_batch)
        if self.selecting:
            mask, scores, pi = self._select(logits, targets, reference_loss)
        else:  # evaluation: every valid token (no reference needed); the last training call's metrics stay
            scores = token_scores(logits, targets, ignore_index=self.ignore_index, chunk_size=self.chunk_size,
                                  impl=self.impl)
            mask, pi = scores.valid, None
        vocab = logits.shape[-1]
        flat_mask = mask.reshape(-1)
        weights = flat_mask.float()
        if pi is not None:  # Horvitz-Thompson: 1 / π per kept token, normalised by every valid token
            weights = torch.where(flat_mask, 1.0 / pi.reshape(-1).clamp(min=1e-30), 0.0).float()
            if self.reduction == "mean":
                weights = weights / scores.valid.sum().clamp(min=1)
        elif self.reduction == "mean":
            weights = weights / flat_mask.sum().clamp(min=1)
        if num_items is not None:  # ('mean' only) this call's share of the accumulated targets, no host sync
            weights = weights * (scores.valid.sum() / num_items)
        safe_targets = torch.where(scores.valid, targets, 0).reshape(-1).long()  # (N,) gather/scatter index
        rows = self.chunk_size or max(1, DEFAULT_CHUNK_ELEMENTS // vocab)
        return _SelectedCrossEntropy.apply(
            logits.reshape(-1, vocab), safe_targets, weights, scores.nll.reshape(-1), rows
        )

    def _check_num_items(self, num_items: Any) -> int | Tensor | None:
        if num_items is not None and self.reduction != "mean":
            raise ValueError(
                f"num_items_in_batch normalises a mean; it is not allowed with reduction={self.reduction!r}"
            )
        return check_num_items(num_items)

    def forward_hidden(
        self, hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None = None,
        softcap: float | None = None, num_items_in_batch: int | Tensor | None = None,
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
            num_items_in_batch: As in :meth:`forward`.

        Returns:
            0-d fp32 loss (over every valid token when not :attr:`selecting`).
        """
        num_items = self._check_num_items(num_items_in_batch)
        if not self.selecting:  # evaluation: the full loss, no selection, no draw, no metrics
            loss, info = linear_cross_entropy(
                hidden, weight, targets, bias=bias, ratio=1.0, ignore_index=self.ignore_index, softcap=softcap,
                reduction=self.reduction, impl=self.impl, return_info=True, options=self.head_options,
            )
            if num_items is not None:
                loss = loss * (info.scores.valid.sum() / num_items)
            return loss
        if self.scoring == "excess" or self.selection in ("sampled", "importance"):
            raise ValueError(
                f"forward_hidden does not support scoring={self.scoring!r} with selection={self.selection!r} "
                "(scoring='excess', selection='sampled' and 'importance' run in forward(logits, targets))"
            )
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
        self._last = {
            "current_ratio": info.ratio.detach(),
            "tokens_selected": info.mask.sum().detach(),
            "tokens_total": n_valid.detach(),
            "confidence": masked_mean(info.scores.confidence, valid).detach(),
            "entropy": masked_mean(info.scores.entropy, valid).detach(),
        }
        if num_items is not None:
            loss = loss * (n_valid / num_items)
        return loss

    # ------------------------------------------------------------------ metrics
    def get_metrics(self) -> dict[str, float]:
        """Host-side metrics of the last forward (this syncs; call it outside the hot path)."""
        out: dict[str, float] = {"step": self.host_step(), "scheduled_ratio": self.current_ratio}
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
            if "importance_variance_ratio" in vals:
                out["importance_variance_ratio"] = vals["importance_variance_ratio"]
        return out
