"""The selective fused linear cross-entropy, :func:`linear_cross_entropy` (public as
``cggr.functional.linear_cross_entropy`` and ``cggr.linear_cross_entropy``).

Shape legend: B batch, T sequence length, N = B·T tokens, H hidden size, V vocabulary, K kept tokens,
K_max a static (host-side) upper bound on K.

It dispatches on ``impl`` (:mod:`cggr._dispatch`, docs/design.md §6): ``'torch'`` is the pure-PyTorch path
(:mod:`cggr.linear_ce.torch_path`: CPU path and test oracle), ``'triton'`` the CUDA kernels under
:mod:`cggr.kernels`, ``'auto'`` picks Triton for CUDA tensors when Triton imports.

Dataflow (both paths)::

    hidden (N, H), weight (V, H) ──chunked logits + row statistics──> lse, entropy, confidence, margin, nll (N,)
        ([N, V] is never materialised: chunks of rows, or of the vocabulary, live in a bounded workspace)
    difficulty(scores, scoring) ──select_tokens (same rules as CGGRLoss)──> mask (N,), K = mask.sum()
    loss = Σ_selected nll / K   ('mean'; 'sum' drops / K)
    backward: logits recomputed for the K_max compact rows (selected rows first), gradients of hidden,
              weight and bias come from the selected rows only.

The Triton path has two kernels, chosen by ``LinearCrossEntropyOptions.kernel`` (which one runs, and in which
mode, is decided once per call: :func:`cggr.linear_ce.plan.choose_route`):

- ``'chunked'`` (default): cuBLAS GEMMs over bounded [chunk, V] logits workspaces plus Triton row kernels
  (:mod:`cggr.kernels.linear_cross_entropy`). With ``ratio = 1`` (every valid token kept) and gradients
  needed, it computes the gradients during the forward (three GEMM passes instead of four) and the backward
  only scales them.
- ``'fused'``: Triton GEMM tiles fused with the online-softmax statistics in the forward and with the gradient
  in the backward (:mod:`cggr.kernels.linear_cross_entropy_fused`, Cut Cross-Entropy's design): no logits
  workspace at all, peak memory ~ the gradient outputs; the outputs are accumulated in their own dtype by
  default (``accumulate``: error model in that module), four GEMM passes at ratio 1. ``bwd='split'`` swaps its
  backward for one kernel per gradient output without locks (five passes;
  :mod:`cggr.kernels.linear_cross_entropy_fused_split`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from cggr._dispatch import Impl, resolve_impl
from cggr._validation import (
    REDUCTIONS,
    SCORING_MODES,
    SELECTION_STRATEGIES,
    check_bool,
    check_choice,
    check_ignore_index,
    check_ratio,
    check_target_range,
)
from cggr.linear_ce.autograd import run_selective
from cggr.linear_ce.options import LinearCrossEntropyInfo, LinearCrossEntropyOptions
from cggr.linear_ce.plan import Plan


def _check_inputs(hidden, weight, targets, bias, softcap) -> None:
    if not isinstance(hidden, Tensor):
        raise TypeError(f"hidden must be a torch.Tensor, got {type(hidden).__name__}")
    if hidden.dim() not in (2, 3) or not hidden.is_floating_point():
        raise ValueError(
            f"hidden must be a floating (N, H) or (B, T, H) tensor, got {hidden.dtype} {tuple(hidden.shape)}"
        )
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        shape = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"weight must be a (V, H) tensor, got {shape}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight shape {tuple(weight.shape)} does not match hidden size H={hidden.shape[-1]} (expected (V, H))"
        )
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must equal hidden dtype {hidden.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    if bias is not None:
        if not isinstance(bias, Tensor) or tuple(bias.shape) != (weight.shape[0],):
            shape = tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__
            raise ValueError(f"bias must be None or a ({weight.shape[0]},) tensor, got {shape}")
        if bias.dtype != hidden.dtype or bias.device != hidden.device:
            raise TypeError(f"bias must be {hidden.dtype} on {hidden.device}, got {bias.dtype} on {bias.device}")
    if not isinstance(targets, Tensor) or targets.is_floating_point() or targets.dtype == torch.bool:
        got = targets.dtype if isinstance(targets, Tensor) else type(targets).__name__
        raise TypeError(f"targets must be an integer tensor of class indices, got {got}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"targets shape {tuple(targets.shape)} does not match hidden batch/seq shape {tuple(hidden.shape[:-1])}"
        )
    if targets.device != hidden.device:
        raise ValueError(f"targets are on {targets.device} but hidden is on {hidden.device}")
    if softcap is not None and (
        isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not (0 < softcap < math.inf)
    ):
        raise ValueError(f"softcap must be None or a positive finite float, got {softcap!r}")


def _check_row_weights(row_weights: object, targets: Tensor, hidden: Tensor) -> Tensor | None:
    """``row_weights`` flattened to (N,) fp32 and detached, after checking it is shaped like ``targets``."""
    if row_weights is None:
        return None
    if not isinstance(row_weights, Tensor) or not row_weights.is_floating_point():
        got = row_weights.dtype if isinstance(row_weights, Tensor) else type(row_weights).__name__
        raise TypeError(f"row_weights must be a floating-point tensor shaped like targets, got {got}")
    if tuple(row_weights.shape) != tuple(targets.shape):
        raise ValueError(f"row_weights shape {tuple(row_weights.shape)} does not match targets shape "
                         f"{tuple(targets.shape)}")
    if row_weights.device != hidden.device:
        raise ValueError(f"row_weights are on {row_weights.device} but hidden is on {hidden.device}")
    return row_weights.detach().reshape(-1).float()


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Tensor | None = None,
    ratio: float = 1.0,
    scoring: str = "combined",
    selection: str = "topk",
    ignore_index: int = -100,
    softcap: float | None = None,
    reduction: str = "mean",
    impl: Impl = "auto",
    return_info: bool = False,
    options: LinearCrossEntropyOptions | None = None,
    row_weights: Tensor | None = None,
) -> Tensor | tuple[Tensor, LinearCrossEntropyInfo]:
    """Selective cross-entropy of an LM head, straight from hidden states: the [N, V] logits never exist.

    Scores every valid token from ``hidden @ weight.T (+ bias)`` (optionally soft-capped), keeps
    K = max(1, round(ratio · n_valid)) of them with the same rules as :class:`cggr.CGGRLoss`, and returns the
    cross-entropy over the kept tokens; the gradients of ``hidden``, ``weight`` and ``bias`` come from the kept
    tokens only. With ``ratio=1`` it equals ``F.cross_entropy(hidden @ weight.T + bias, targets)``.

    Under ``torch.compile`` the op itself runs eagerly (one graph break; not usable with ``fullgraph=True``):
    the code around it compiles as usual, and it launches the same kernels as in eager mode.

    Args:
        hidden: (N, H) or (B, T, H) hidden states (float16, bfloat16, float32; float64 on the torch path).
        weight: (V, H) LM-head weight, same dtype and device.
        targets: (N,) or (B, T) class indices aligned with ``hidden`` (no shift); ``ignore_index`` skipped.
        bias: Optional (V,) head bias (e.g. GPT-J).
        ratio: Share of the valid tokens kept, in (0, 1].
        scoring: Difficulty signal: ``'entropy'``, ``'margin'``, ``'loss'`` or ``'combined'``.
        selection: ``'topk'``, ``'stratified'``, ``'sequence_aware'``, ``'fixed_quota'`` or ``'random'``.
        ignore_index: Target value to ignore.
        softcap: Final-logit soft-capping (Gemma 2/3): logits = softcap · tanh(z / softcap).
        reduction: ``'mean'`` over the kept tokens or ``'sum'``.
        impl: ``'auto'``, ``'torch'`` or ``'triton'``.
        return_info: Also return a :class:`LinearCrossEntropyInfo` (mask, scores, K, ratio).
        options: :class:`LinearCrossEntropyOptions` (strata, sequence floor, dynamic threshold, generator,
            workspace size, Triton kernel ``'chunked'`` / ``'fused'`` and its accumulation).
        row_weights: Optional per-token weights shaped like ``targets`` (floating, same device; not
            differentiated): every kept token's term is multiplied by its weight, in the loss and in all three
            gradients (``'mean'``: Σ_kept w_n · nll_n / K, ``'sum'``: Σ_kept w_n · nll_n). Selection ignores them.
            E.g. importance weights 1 / π (:mod:`cggr.sampling`). Weights scale the fp16 gradient pre-scale's
            headroom: keep them O(1) with ``'mean'`` in fp16.

    Returns:
        0-d fp32 loss (0.0, still differentiable, when every target is ignored), and the info if asked.
    """
    _check_inputs(hidden, weight, targets, bias, softcap)
    check_ratio("ratio", ratio)
    check_choice("scoring", scoring, SCORING_MODES)
    check_choice("selection", selection, SELECTION_STRATEGIES)
    check_choice("reduction", reduction, REDUCTIONS)
    check_ignore_index(ignore_index)
    check_bool("return_info", return_info)
    options = options if options is not None else LinearCrossEntropyOptions()
    if not isinstance(options, LinearCrossEntropyOptions):
        raise TypeError(f"options must be a LinearCrossEntropyOptions, got {type(options).__name__}")
    vocab, hsize = weight.shape
    row_weights = _check_row_weights(row_weights, targets, hidden)
    check_target_range(targets, vocab, ignore_index=ignore_index)
    plan = Plan(
        impl=resolve_impl(impl, hidden, op="linear_cross_entropy"), ratio=float(ratio), scoring=scoring,
        selection=selection, ignore_index=ignore_index, softcap=float(softcap) if softcap is not None else None,
        reduction=reduction, options=options, target_shape=tuple(targets.shape), grad_enabled=torch.is_grad_enabled(),
    )
    h2 = hidden.reshape(-1, hsize).contiguous()
    loss, info = run_selective(h2, weight.contiguous(), bias, targets.reshape(-1).long(), plan, row_weights)
    return (loss, info) if return_info else loss
