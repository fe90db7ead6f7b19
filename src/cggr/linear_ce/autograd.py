"""The autograd Function of the selective linear cross-entropy: scores, selection and loss in the forward, the
gradients of the kept rows in the backward.

Shape legend: N tokens, H hidden size, V vocabulary, K kept tokens, K_max a static (host-side) bound on K.

Forward (hidden (N, H), weight (V, H), bias (V,) | None, targets (N,) long, row_weights (N,) fp32 | None)::

    route = choose_route(plan, gradients wanted)        the kernel and its mode (cggr.linear_ce.plan)
    hidden with the rows of ignored targets zeroed      (a select: NaN / inf there never propagate)
    stats (5, N) = lse, entropy, confidence, margin, nll    (+ the gradients or d_hidden, on some routes)
    mask = every valid row, or select_tokens(difficulty(scores)) (dynamic threshold: ratio from the mean confidence)
    w = mask / K ('mean') or mask ('sum'), times row_weights;  loss = Σ w · nll
    saved: hidden, weight, bias, targets, lse, w and the K_max compact row indices (kept rows first), or nothing
    but the gradients when the forward computed them

Backward: the route's backward with the row weights w · grad_out; fp16 on the Triton path with ``'mean'``
pre-scales the row weights by a power of two (exact) so that p · w does not underflow, and divides it back.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cggr.linear_ce.options import LinearCrossEntropyInfo
from cggr.linear_ce.plan import GRADS_IN_FORWARD, HIDDEN_GRAD_IN_FORWARD, OUTPUTS, Needs, Plan, choose_route
from cggr.scoring import TokenScores, difficulty, masked_mean
from cggr.selection import dynamic_ratio, select_tokens


def _zero_ignored_rows(hidden: Tensor, valid: Tensor) -> Tensor:
    """``hidden`` (N, H) with the rows of ignored targets set to 0 (a select: NaN/inf there never propagate).

    An ignored row's gradient weight is 0, but 0 · NaN = NaN: a NaN or inf hidden row at an ignored (padded)
    position would otherwise turn its logits, and through them every d_weight / d_bias element, into NaN. With
    zeros there, ignored rows give finite statistics that nothing reads and add exact zeros to every gradient
    sum, so the loss and gradients are bit-for-bit those of any finite values at those rows. Costs one pass over
    (N, H) in the forward and one in the backward (the masked copy is not kept between them).
    """
    return torch.where(valid.unsqueeze(-1), hidden, 0)


class SelectiveLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, plan: Plan,
                row_weights: Tensor | None = None):
        # hidden (N, H), weight (V, H), bias (V,) | None, targets (N,) long, row_weights (N,) fp32 | None
        n = hidden.shape[0]
        valid = targets != plan.ignore_index  # (N,)
        n_valid = valid.sum()
        hidden_in, hidden = hidden, _zero_ignored_rows(hidden, valid)  # the kernels see 0 at ignored rows
        need = ctx.needs_input_grad if plan.grad_enabled else (False, False, False)
        needs = Needs(hidden=need[0], weight=need[1], bias=bias is not None and need[2])
        route = choose_route(plan, needs, hidden, weight)
        opts = route.options
        common = dict(ignore_index=plan.ignore_index, softcap=plan.softcap, workspace_bytes=opts.workspace_bytes)
        # fp16 only: rows are weighted by w · scale (scale = 2^round(log2 K_max), exact) so that the chunk
        # gradient p · w does not underflow fp16 (p ~ 1/V, w = 1/K); the outputs are divided by scale after.
        scale = plan.fp16_scale(hidden.dtype, n if route.all_rows else plan.k_max(n))
        grads = d_h_fwd = None
        if route.forward in (GRADS_IN_FORWARD, HIDDEN_GRAD_IN_FORWARD):  # every valid token kept: w known now
            w = valid.float() / (n_valid.clamp(min=1) if plan.reduction == "mean" else 1) * scale
            if row_weights is not None:
                w = w * row_weights
        if route.forward == OUTPUTS:
            # statistics now; the vocabulary chunks (which need every row's lse first) in the backward, with the
            # upstream gradient already known
            stats = route.forward_fn(hidden, weight, bias, targets, route.outputs_sched,
                                     ignore_index=plan.ignore_index, softcap=plan.softcap)
        elif route.forward == GRADS_IN_FORWARD:
            stats, grads = route.forward_fn(
                hidden, weight, bias, targets, row_weights=w, need_hidden_grad=needs.hidden,
                need_weight_grad=needs.weight, need_bias_grad=needs.bias, workspace=opts.workspace, **common,
            )
        elif route.forward == HIDDEN_GRAD_IN_FORWARD:
            stats, d_h_fwd = route.forward_fn(
                hidden, weight, bias, targets, w, ignore_index=plan.ignore_index, softcap=plan.softcap,
                accumulate=opts.accumulate,
            )
        else:
            stats, _ = route.forward_fn(hidden, weight, bias, targets, **common)
        shape = plan.target_shape
        scores = TokenScores(
            entropy=stats[1].view(shape), confidence=stats[2].view(shape), margin=stats[3].view(shape),
            nll=stats[4].view(shape), valid=valid.view(shape), vocab_size=weight.shape[0],
        )
        if plan.keeps_all_valid():
            mask = valid
            ratio = torch.ones((), dtype=torch.float32, device=hidden.device)
        else:
            sel_ratio: float | Tensor = plan.ratio
            # a fill kernel, not torch.tensor(): a host-to-device copy cannot be captured in a CUDA graph
            ratio = torch.full((), plan.ratio, dtype=torch.float32, device=hidden.device)
            if opts.threshold_sensitivity is not None and plan.selection != "fixed_quota":
                mean_conf = masked_mean(stats[2], valid)
                sel_ratio = ratio = dynamic_ratio(plan.ratio, mean_conf, opts.threshold_sensitivity)
            mask = select_tokens(
                difficulty(scores, plan.scoring), valid.view(shape), sel_ratio, strategy=plan.selection,
                num_strata=opts.num_strata, min_tokens_per_sequence=opts.min_tokens_per_sequence,
                generator=opts.generator,
            ).reshape(-1)
        k = mask.sum()
        w = mask.float()
        if plan.reduction == "mean":
            w = w / k.clamp(min=1)
        if row_weights is not None:
            w = w * row_weights
        loss = (w * stats[4]).sum()
        plan.info = LinearCrossEntropyInfo(mask=mask.view(shape), scores=scores, num_selected=k, ratio=ratio)
        ctx.plan = plan
        ctx.route = route
        ctx.scale = scale
        ctx.consumed = False
        ctx.d_h_fwd = d_h_fwd
        if route.forward == GRADS_IN_FORWARD:
            ctx.grads = grads
        elif needs.any():
            idx = None  # None: every row (route.all_rows; unselected rows: weight 0)
            if not route.all_rows:
                k_max = plan.k_max(n)
                idx = torch.argsort((~mask).to(torch.int8), stable=True)[:k_max]  # selected rows first
            ctx.save_for_backward(hidden_in, weight, bias, targets, stats[0], w, idx)  # no masked copy kept
        return loss

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        if ctx.consumed:
            raise RuntimeError("linear_cross_entropy does not support backward twice through the same graph")
        ctx.consumed = True
        plan, route = ctx.plan, ctx.route
        need = ctx.needs_input_grad
        if route.forward == GRADS_IN_FORWARD:
            d_h, d_w, d_b = ctx.grads
            ctx.grads = None
            g = grad_out.float()
            for t in (d_h, d_w, d_b):  # in place: the forward's gradient buffers belong to this graph only
                if t is not None:
                    t.mul_(g.to(t.dtype))
                    if ctx.scale != 1.0:
                        t.mul_(1.0 / ctx.scale)  # a power of two: exact
            return d_h, d_w, d_b, None, None, None
        hidden, weight, bias, targets, lse, w, idx = ctx.saved_tensors
        hidden = _zero_ignored_rows(hidden, targets != plan.ignore_index)  # as in the forward
        d_h_fwd, ctx.d_h_fwd = ctx.d_h_fwd, None  # HIDDEN_GRAD_IN_FORWARD: d_hidden from the forward
        if route.forward == OUTPUTS:
            d_h, d_w, d_b = route.backward_fn(
                hidden, weight, bias, targets, lse, w * (grad_out.float() * ctx.scale), route.outputs_sched,
                ignore_index=plan.ignore_index, softcap=plan.softcap, need_hidden_grad=need[0],
                need_bias_grad=bias is not None and need[2],
            )
        else:
            d_h, d_w, d_b = route.backward_fn(
                hidden, weight, bias, targets, lse, w * (grad_out.float() * ctx.scale), idx,
                ignore_index=plan.ignore_index, softcap=plan.softcap, workspace_bytes=route.options.workspace_bytes,
                need_hidden_grad=need[0] and d_h_fwd is None, need_weight_grad=need[1],
                need_bias_grad=bias is not None and need[2],
            )
        if d_h_fwd is not None:  # in place: the forward's buffer belongs to this graph only
            d_h = d_h_fwd.mul_(grad_out.float().to(d_h_fwd.dtype))
        if ctx.scale != 1.0:
            for t in (d_h, d_w, d_b):
                if t is not None:
                    t.mul_(1.0 / ctx.scale)
        return d_h, d_w, d_b, None, None, None


@torch.compiler.disable
def run_selective(hidden, weight, bias, targets, plan: Plan, row_weights: Tensor | None = None):
    """The autograd Function, run eagerly under ``torch.compile`` (a graph break here).

    Its forward hands the selection back through ``plan.info`` and its context keeps tensors as attributes,
    which dynamo cannot trace (it raised an internal error); eager, it costs a handful of launches.
    """
    loss = SelectiveLinearCE.apply(hidden, weight, bias, targets, plan, row_weights)
    return loss, plan.info
