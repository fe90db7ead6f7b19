"""The static settings of one :func:`cggr.functional.linear_cross_entropy` call (:class:`Plan`) and the one place
that decides which kernel runs and how (:func:`choose_route`).

Shape legend: N tokens, H hidden size, V vocabulary, K kept tokens, K_max a static (host-side) bound on K.

A route is chosen once per call, at the start of the autograd forward (the gradients wanted are known there), from
``impl`` (already resolved to ``'torch'`` or ``'triton'``), the options, whether every valid token is kept
(ratio 1, no dynamic threshold lowering it) and which gradients are wanted. The forward and the backward only
follow it. ``Route.forward`` is one of:

- ``'stats'`` (every case not below): the forward computes the statistics of every row; the backward runs the
  kernel's backward over the K_max compact rows (kept rows first), or over every row for the fused kernel when
  every valid token is kept.
- ``'grads_in_forward'`` (chunked kernel, every valid token kept, some gradient wanted, not ``'outputs'``): the
  forward computes statistics and gradients in one pass (3 GEMM passes in all); the backward scales them by the
  upstream gradient.
- ``'outputs'`` (chunked kernel, ``workspace='outputs'``, every valid token kept, weight gradient wanted): the
  forward runs the statistics pass, the backward the vocabulary chunks inside d_weight's unwritten rows.
- ``'hidden_grad_in_forward'`` (fused kernel, ``bwd='split_fwd'``, every valid token kept, hidden gradient
  wanted, no ``filter_eps``): the forward computes statistics and d_hidden in one pass over the vocabulary; the
  backward runs the split backward's d_weight (and d_bias) kernel.

Two option rewrites happen here too: ``workspace='outputs'`` with every valid token kept but no schedule (N >> H:
too many vocabulary chunks) runs ``kernel='fused'`` (no logits workspace either), and the fused kernel's
``accumulate='auto'`` becomes the device's mode (:func:`cggr.linear_ce.options.resolve_accumulate`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from cggr.linear_ce import torch_path
from cggr.linear_ce.options import LinearCrossEntropyInfo, LinearCrossEntropyOptions, resolve_accumulate

#: ``Route.forward`` values (module docstring).
STATS = "stats"
GRADS_IN_FORWARD = "grads_in_forward"
OUTPUTS = "outputs"
HIDDEN_GRAD_IN_FORWARD = "hidden_grad_in_forward"


@dataclass
class Plan:
    """Static settings of one call plus a slot for the selection made inside the autograd forward."""

    impl: str
    ratio: float
    scoring: str
    selection: str
    ignore_index: int
    softcap: float | None
    reduction: str
    options: LinearCrossEntropyOptions
    target_shape: tuple[int, ...]
    grad_enabled: bool = True
    info: LinearCrossEntropyInfo | None = None

    def keeps_all_valid(self) -> bool:
        """Every valid token is kept: ratio 1 and no dynamic threshold that could lower it."""
        sens = self.options.threshold_sensitivity
        return self.ratio == 1.0 and (sens is None or sens >= 0 or self.selection == "fixed_quota")

    def fp16_scale(self, dtype: torch.dtype, rows: int) -> float:
        """Power-of-two gradient pre-scale for fp16 on the Triton path with 'mean' (1.0 otherwise)."""
        if self.impl != "triton" or dtype != torch.float16 or self.reduction != "mean":
            return 1.0
        return float(2.0 ** round(math.log2(max(1, rows))))

    def k_max(self, n: int) -> int:
        """Static bound on K: the scheduled ratio raised by the dynamic threshold, plus sequence floors."""
        r_hi = self.ratio
        sens = self.options.threshold_sensitivity
        dyn = sens is not None and self.selection != "fixed_quota"
        if dyn and sens > 0:
            r_hi = min(1.0, self.ratio * (1.0 + sens))
        k = min(n, max(1, math.floor(r_hi * n + 0.5)) + (1 if dyn else 0))
        if self.selection == "sequence_aware":
            rows = self.target_shape[0] if len(self.target_shape) == 2 else 1
            k = min(n, k + rows * self.options.min_tokens_per_sequence)
        return k


class Needs(NamedTuple):
    """The gradients the caller wants (all False under ``torch.no_grad``); ``bias`` is False without a bias."""

    hidden: bool
    weight: bool
    bias: bool

    def any(self) -> bool:
        return self.hidden or self.weight or self.bias


@dataclass(frozen=True)
class Route:
    """How one call runs (module docstring): decided by :func:`choose_route`, followed by the autograd Function.

    Attributes:
        kernel: ``'torch'``, ``'chunked'`` or ``'fused'``: the code that runs.
        options: The call's options as they run (the kernel after the ``'outputs'`` fallback, ``accumulate``
            resolved for the fused kernel).
        forward: One of :data:`STATS`, :data:`GRADS_IN_FORWARD`, :data:`OUTPUTS`, :data:`HIDDEN_GRAD_IN_FORWARD`.
        all_rows: The gradients come from every row (no compaction, no argsort; unkept rows weigh 0), else from
            the K_max compact rows.
        forward_fn: The forward's launcher (its signature depends on ``forward``).
        backward_fn: The backward's launcher; ``None`` for :data:`GRADS_IN_FORWARD`.
        outputs_sched: :data:`OUTPUTS` only: the ``cggr.kernels.linear_cross_entropy.OutputsSchedule``.
    """

    kernel: str
    options: LinearCrossEntropyOptions
    forward: str
    all_rows: bool
    forward_fn: Callable
    backward_fn: Callable | None
    outputs_sched: Any = None


def choose_route(plan: Plan, needs: Needs, hidden: Tensor, weight: Tensor) -> Route:
    """The route of one call with (N, H) ``hidden`` and (V, H) ``weight`` (module docstring: the table).

    The kernel modules are imported here, on the Triton path only: they import Triton at the top.
    """
    opts = plan.options
    all_valid = plan.keeps_all_valid()
    if plan.impl == "torch":
        return Route("torch", opts, STATS, False, torch_path.forward_stats, torch_path.backward_selected)
    if opts.kernel == "chunked":
        from cggr.kernels import linear_cross_entropy as chunked

        if opts.workspace == "outputs" and all_valid:
            n, hsize = hidden.shape
            sched = chunked.outputs_schedule(n, hsize, weight.shape[0], hidden.element_size(),
                                             workspace_bytes=opts.workspace_bytes)
            if sched is None:
                # N >> H: too many vocabulary chunks; the fused kernel keeps the no-workspace promise (the chunked
                # kernel would fall back to its logits buffer)
                opts = dataclasses.replace(opts, kernel="fused", workspace="buffer")
            elif needs.weight:
                return Route("chunked", opts, OUTPUTS, True, chunked.outputs_forward_stats, chunked.outputs_backward,
                             sched)
        if opts.kernel == "chunked":
            if all_valid and needs.any():  # every valid token kept: gradients during the forward
                return Route("chunked", opts, GRADS_IN_FORWARD, True, chunked.forward_stats, None)
            return Route("chunked", opts, STATS, False, chunked.forward_stats, chunked.backward_selected)
    from cggr.kernels import linear_cross_entropy_fused as fused

    if opts.accumulate == "auto":
        opts = dataclasses.replace(opts, accumulate=resolve_accumulate("auto", hidden.device, hidden.dtype))
    if opts.bwd in ("split", "split_fwd"):
        from cggr.kernels import linear_cross_entropy_fused_split as split

        backward = functools.partial(split.backward_selected, accumulate=opts.accumulate, filter_eps=opts.filter_eps)
        if opts.bwd == "split_fwd" and all_valid and needs.hidden and opts.filter_eps is None:
            # the row weights are known before the forward: d_hidden in the forward's pass over the vocabulary
            return Route("fused", opts, HIDDEN_GRAD_IN_FORWARD, True, split.forward_with_hidden_grad, backward)
    else:
        backward = functools.partial(fused.backward_selected, accumulate=opts.accumulate, filter_eps=opts.filter_eps)
    # every valid token kept: the backward runs over every row (no compaction, no argsort)
    return Route("fused", opts, STATS, all_valid, fused.forward_stats, backward)
