"""Functional API: one-pass token scoring and the selective fused linear cross-entropy.

Shape legend: B batch, T sequence length, N = B·T tokens, H hidden size, V vocabulary, K kept tokens,
K_max a static (host-side) upper bound on K.

Both ops dispatch on ``impl`` (docs/design.md §6): ``'torch'`` is the pure-PyTorch path (CPU path and test oracle),
``'triton'`` the CUDA kernels under :mod:`cggr.kernels`, ``'auto'`` picks Triton for CUDA tensors when Triton
imports. An explicit ``'triton'`` that cannot run raises; the environment variable ``CGGR_IMPL=torch`` forces
the PyTorch path everywhere.

``linear_cross_entropy`` dataflow (both paths)::

    hidden (N, H), weight (V, H) ──chunked logits + row statistics──> lse, entropy, confidence, margin, nll (N,)
        ([N, V] is never materialised: chunks of rows, or of the vocabulary, live in a bounded workspace)
    difficulty(scores, scoring) ──select_tokens (same rules as CGGRLoss)──> mask (N,), K = mask.sum()
    loss = Σ_selected nll / K   ('mean'; 'sum' drops / K)
    backward: logits recomputed for the K_max compact rows (selected rows first), gradients of hidden,
              weight and bias come from the selected rows only.

The Triton path has two kernels, chosen by ``LinearCrossEntropyOptions.kernel``:

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

import dataclasses
import functools
import math
import os
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from cggr._rng import CounterRNG
from cggr._validation import (
    REDUCTIONS,
    SCORING_MODES,
    SELECTION_STRATEGIES,
    check_bool,
    check_choice,
    check_ignore_index,
    check_int,
    check_logits_targets,
    check_ratio,
    check_target_range,
)
from cggr.kernels._linear_ce_modes import ACCUMULATE_MODES
from cggr.scoring import TokenScores, difficulty, masked_mean
from cggr.scoring import token_scores as _torch_token_scores
from cggr.selection import dynamic_ratio, select_tokens

Impl = Literal["auto", "torch", "triton"]
IMPLS = ("auto", "torch", "triton")
KERNELS = ("chunked", "fused")
WORKSPACES = ("buffer", "outputs")  # LinearCrossEntropyOptions.workspace (kernel='chunked')
ACCUMULATE_OPTIONS = ("auto", *ACCUMULATE_MODES)  # what LinearCrossEntropyOptions takes
#: First Triton release whose 16-bit ``atomic_add`` the fused kernels use by default (``accumulate='auto'``): bf16
#: atomics need sm_90 and a recent Triton; 3.6 is the release verified on an H200 (tests/gpu, the tile sweep).
ATOMIC_MIN_TRITON = (3, 6)
FUSED_BACKWARDS = ("tiled", "split", "split_fwd")
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
DEFAULT_WORKSPACE_BYTES = 256 * 1024 * 1024


# ---------------------------------------------------------------------------------------------- dispatch
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_impl(impl: str, tensor: Tensor, *, op: str) -> str:
    """Return ``'torch'`` or ``'triton'`` for ``impl`` and the tensor the op runs on (docs/design.md §6)."""
    check_choice("impl", impl, IMPLS)
    if os.environ.get("CGGR_IMPL", "").strip().lower() == "torch" or impl == "torch":
        return "torch"
    on_gpu = tensor.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    dtype_ok = tensor.dtype in _TRITON_DTYPES
    if impl == "triton":
        if not _triton_importable():
            raise RuntimeError(f"{op}(impl='triton') needs the 'triton' package, which is not importable")
        if not on_gpu:
            raise RuntimeError(f"{op}(impl='triton') needs CUDA tensors, got a tensor on {tensor.device}")
        if not dtype_ok:
            raise TypeError(f"{op}(impl='triton') supports float16, bfloat16 and float32, got {tensor.dtype}")
        return "triton"
    return "triton" if on_gpu and dtype_ok and _triton_importable() else "torch"


# ---------------------------------------------------------------------------------------------- scoring
def token_scores(
    logits: Tensor,
    targets: Tensor | None = None,
    *,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    impl: Impl = "auto",
) -> TokenScores:
    """Entropy, confidence, top-2 margin and nll of every token, fp32, in one read of the logits.

    Same fields and semantics as :func:`cggr.scoring.token_scores` (the ``'torch'`` path and the oracle).
    The Triton kernel reads each row once (online softmax with the exact top-2 and the target logit).

    Args:
        logits: (N, V) or (B, T, V), any floating dtype (Triton: float16, bfloat16, float32).
        targets: (N,) or (B, T) class indices aligned with ``logits`` (no shift), or ``None``.
        ignore_index: Target value marking positions to ignore (nll 0, ``valid`` False).
        chunk_size: Rows per chunk of the ``'torch'`` path (default ~16 Mi elements); the kernel needs none.
        impl: ``'auto'``, ``'torch'`` or ``'triton'``.

    Returns:
        :class:`cggr.scoring.TokenScores`, tensors shaped ``logits.shape[:-1]``. No gradient flows.
    """
    if not isinstance(logits, Tensor):  # before resolve_impl reads its device
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if resolve_impl(impl, logits, op="token_scores") == "torch":  # it checks its inputs itself
        return _torch_token_scores(logits, targets, ignore_index=ignore_index, chunk_size=chunk_size)
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


# ---------------------------------------------------------------------------------------------- options
@dataclass(frozen=True)
class LinearCrossEntropyOptions:
    """Less common knobs of :func:`linear_cross_entropy` (the same meaning as in :class:`cggr.CGGRLoss`).

    Attributes:
        num_strata: Buckets for ``selection='stratified'``.
        min_tokens_per_sequence: Per-sequence floor for ``selection='sequence_aware'`` (rows of 3-D inputs).
        threshold_sensitivity: ``None`` for a fixed ratio; a float in [0, 1] turns on the dynamic threshold
            ratio · (1 + (1 - mean confidence) · sensitivity), clamped to [ratio / 2, 1] (not for ``fixed_quota``).
        generator: Random source for ``stratified`` and ``random``: a ``torch.Generator`` on the inputs' device
            or a :class:`cggr._rng.CounterRNG` (as in :func:`cggr.selection.select_tokens`).
        workspace_bytes: Bound on the logits workspace of one chunk (bytes; ``kernel='chunked'`` only).
        kernel: Triton path only: ``'chunked'`` (cuBLAS chunks + a logits workspace, the default) or
            ``'fused'`` (logits only in registers: minimal memory; see the module docstring).
        workspace: ``kernel='chunked'`` only: where its logits chunks live when the gradients are computed in the
            forward (ratio 1 with the weight gradient wanted). ``'buffer'`` (default): a reusable workspace of
            ``workspace_bytes`` (three GEMM passes). ``'outputs'``: no workspace; the chunks live in the
            not-yet-written rows of the weight gradient (a statistics pass in the forward, then vocabulary
            chunks from the top down in the backward, four GEMM passes; peak memory ~ the gradients + a tail
            buffer, usually <= 512 KiB and never above ``workspace_bytes``; nothing held from the forward but
            the (5, N) statistics); d_hidden is summed over the m vocabulary chunks in its own dtype (m
            roundings instead of one). When N >> H the chunks would be too many (more than
            :data:`cggr.kernels.linear_cross_entropy.OUTPUTS_MAX_CHUNKS`; e.g. N = 16384, H = 576, V = 49152:
            171): at ratio 1 the ``'fused'`` kernel runs instead (no logits workspace either; ``accumulate``
            'auto'). Without the weight gradient, below ratio 1 and without gradients the chunked kernel's
            buffer path runs (:mod:`cggr.kernels.linear_cross_entropy`).
        accumulate: ``kernel='fused'`` only: how the gradient outputs are summed over tiles. ``'auto'``
            (default): ``'atomic'`` for bf16/fp16 inputs on a GPU of compute capability 9.0 or newer with
            Triton >= 3.6, else ``'native'`` (:func:`resolve_accumulate`). ``'native'`` adds fp32 tile partials
            into the output dtype under locks (no extra memory; one bf16 rounding per add), ``'atomic'`` the same
            with 16-bit hardware atomics instead of locks (bf16: Hopper; no lock round trips, hence the default
            where it can run; timings: docs/linear_cross_entropy.md), ``'fp32_hidden'`` keeps d_hidden in an
            fp32 buffer (N·H·4 extra bytes), ``'fp32'`` both d_hidden and d_weight ((N + V)·H·4 extra bytes).
            fp32 inputs always accumulate in fp32.
        filter_eps: ``kernel='fused'`` only: ``None`` (exact, default) or Cut Cross-Entropy's gradient
            filter: backward tiles (128 vocabulary columns on the GPU) whose every |softmax - onehot| is below
            ``filter_eps`` are skipped (faster when the softmax is peaked or spread thin over a large
            vocabulary; drops those tiles' gradient, at most filter_eps per logit). ``2**-12`` is CCE's bf16
            default: the same semantics as ``cut_cross_entropy.linear_cross_entropy``'s default, for comparing
            with CCE at its own settings (timings and gradient errors: docs/linear_cross_entropy.md).
        bwd: ``kernel='fused'`` only: the backward's schedule. ``'tiled'`` (default): one kernel, every logits
            tile adds into both gradient outputs under locks (3 GEMM passes). ``'split'``: one kernel per output,
            each output row owned by one program (no locks unless the d_hidden kernel must split the vocabulary
            to fill the GPU; 4 GEMM passes; :mod:`cggr.kernels.linear_cross_entropy_fused_split`).
            ``'split_fwd'``: ``'split'``, except that at ratio 1 with the hidden gradient needed (and no
            ``filter_eps``) d_hidden is accumulated during the forward's pass over the vocabulary (the row weights
            are known then), saving the d_hidden kernel's logits recompute (4 GEMM passes forward + backward);
            fp16 accumulates it in an fp32 buffer (N·H·4 bytes).
    """

    num_strata: int = 4
    min_tokens_per_sequence: int = 1
    threshold_sensitivity: float | None = None
    generator: torch.Generator | CounterRNG | None = None
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES
    kernel: str = "chunked"
    workspace: str = "buffer"
    accumulate: str = "auto"
    filter_eps: float | None = None
    bwd: str = "tiled"

    def __post_init__(self) -> None:
        check_choice("kernel", self.kernel, KERNELS)
        check_choice("workspace", self.workspace, WORKSPACES)
        if self.kernel != "chunked" and self.workspace != "buffer":
            raise ValueError(
                f"workspace={self.workspace!r} applies to kernel='chunked' only, got kernel={self.kernel!r}"
            )
        check_choice("accumulate", self.accumulate, ACCUMULATE_OPTIONS)
        check_choice("bwd", self.bwd, FUSED_BACKWARDS)
        fe = self.filter_eps
        if fe is not None and (isinstance(fe, bool) or not isinstance(fe, (int, float)) or not 0 < fe < 1):
            raise ValueError(f"filter_eps must be None or a float in (0, 1), got {fe!r}")
        if self.kernel != "fused" and (self.accumulate not in ("auto", "native") or fe is not None
                                       or self.bwd != "tiled"):
            raise ValueError(
                f"accumulate={self.accumulate!r}, filter_eps={fe!r} and bwd={self.bwd!r} apply to kernel='fused' "
                f"only, got kernel={self.kernel!r}"
            )
        check_int("num_strata", self.num_strata, minimum=1)
        check_int("min_tokens_per_sequence", self.min_tokens_per_sequence, minimum=1)
        check_int("workspace_bytes", self.workspace_bytes, minimum=1)
        ts = self.threshold_sensitivity
        if ts is not None and (isinstance(ts, bool) or not isinstance(ts, (int, float))):
            raise TypeError(f"threshold_sensitivity must be None or a finite float, got {type(ts).__name__} {ts!r}")
        if ts is not None and not math.isfinite(ts):
            raise ValueError(f"threshold_sensitivity must be None or a finite float, got {ts!r}")
        if ts is not None and not 0 <= ts <= 1:  # the range of CGGRLoss and the original cggr
            raise ValueError(f"threshold_sensitivity must be None or a float in [0, 1], got {ts!r}")
        if self.generator is not None and not isinstance(self.generator, torch.Generator | CounterRNG):
            raise TypeError(
                "generator must be a torch.Generator, a cggr._rng.CounterRNG or None, got "
                f"{type(self.generator).__name__}"
            )


class LinearCrossEntropyInfo(NamedTuple):
    """What :func:`linear_cross_entropy` selected (``return_info=True``).

    Attributes:
        mask: Bool, shaped like ``targets``: the tokens whose loss and gradient count.
        scores: :class:`cggr.scoring.TokenScores` of every token (fp32, shaped like ``targets``).
        num_selected: 0-d long tensor, K.
        ratio: 0-d fp32 tensor, the ratio used (after the dynamic threshold, if on).
    """

    mask: Tensor
    scores: TokenScores
    num_selected: Tensor
    ratio: Tensor


# ---------------------------------------------------------------------------------------------- torch path
def _torch_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Raw logits of a chunk in the compute dtype (fp64 for fp64 inputs, else fp32), GEMM in the input dtype."""
    z = hidden @ weight.t() if bias is None else torch.addmm(bias, hidden, weight.t())
    return z.double() if z.dtype == torch.float64 else z.float()


def _softcap(z: Tensor, softcap: float | None) -> Tensor:
    return z if softcap is None else softcap * torch.tanh(z / softcap)


def _torch_forward_stats(hidden, weight, bias, targets, *, ignore_index, softcap, workspace_bytes, **_):
    """Reference forward: (5, N) fp32 stats = lse, entropy, confidence, margin, nll (rows in chunks)."""
    n = hidden.shape[0]
    vocab = weight.shape[0]
    stats = torch.empty(5, n, dtype=torch.float32, device=hidden.device)
    rows = max(1, min(n, workspace_bytes // (vocab * 8)))
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        z = _softcap(_torch_logits(hidden[start:stop], weight, bias), softcap)  # (c, V)
        sc = _torch_token_scores(z, targets[start:stop], ignore_index=ignore_index)
        stats[0, start:stop] = torch.logsumexp(z, dim=-1)
        stats[1, start:stop] = sc.entropy
        stats[2, start:stop] = sc.confidence
        stats[3, start:stop] = sc.margin
        stats[4, start:stop] = sc.nll
    return stats, (None, None, None)


def _torch_backward_selected(
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
        zr = _torch_logits(hs[start:stop], weight, bias).to(cdt)
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


def _triton_version() -> tuple[int, ...] | None:
    try:
        import triton
    except ImportError:
        return None
    return tuple(int(p) for p in triton.__version__.split(".")[:2] if p.isdigit())


def resolve_accumulate(accumulate: str, device: torch.device, dtype: torch.dtype) -> str:
    """The fused kernels' accumulation mode for ``LinearCrossEntropyOptions.accumulate`` on this device.

    ``'auto'`` becomes ``'atomic'`` (16-bit hardware atomics, no locks) for bfloat16 / float16 inputs on a CUDA
    GPU of compute capability 9.0 or newer with Triton >= :data:`ATOMIC_MIN_TRITON`, and ``'native'`` (locked
    adds, same error model) everywhere else; any other value is returned unchanged.
    """
    check_choice("accumulate", accumulate, ACCUMULATE_OPTIONS)
    if accumulate != "auto":
        return accumulate
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return "native"
    version = _triton_version()
    if version is None or version < ATOMIC_MIN_TRITON:
        return "native"
    return "atomic" if torch.cuda.get_device_capability(device) >= (9, 0) else "native"


# ---------------------------------------------------------------------------------------------- autograd
@dataclass
class _Plan:
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
    #: workspace='outputs' (Triton chunked kernel, every valid token kept): its schedule for (N, H, V), a
    #: cggr.kernels.linear_cross_entropy.OutputsSchedule (None: not that path)
    outputs_sched: tuple | None = None

    def backend(self):
        if self.impl == "triton" and self.options.kernel == "fused":
            from cggr.kernels import linear_cross_entropy_fused as fused

            opts = self.options
            if opts.bwd in ("split", "split_fwd"):
                from cggr.kernels.linear_cross_entropy_fused_split import backward_selected
            else:
                backward_selected = fused.backward_selected
            return fused.forward_stats, functools.partial(
                backward_selected, accumulate=opts.accumulate, filter_eps=opts.filter_eps
            )
        if self.impl == "triton":
            from cggr.kernels import linear_cross_entropy as kernels

            return kernels.forward_stats, kernels.backward_selected
        return _torch_forward_stats, _torch_backward_selected

    def all_rows_backward(self) -> bool:
        """The fused kernel at ratio 1 runs its backward over every row (no compaction, no argsort)."""
        return self.impl == "triton" and self.options.kernel == "fused" and self.keeps_all_valid()

    def keeps_all_valid(self) -> bool:
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


#: LinearCrossEntropyOptions fields that set the kernel, not the selection (what ``head_options`` may set).
HEAD_OPTION_FIELDS = ("workspace_bytes", "kernel", "workspace", "accumulate", "filter_eps", "bwd")


def check_head_options(value: object, owner: str) -> LinearCrossEntropyOptions | None:
    """``head_options`` of :class:`cggr.CGGRModel` / :class:`cggr.CGGRLoss`: ``None`` or a
    :class:`LinearCrossEntropyOptions` that sets only kernel fields (:data:`HEAD_OPTION_FIELDS`); the selection
    fields come from the owner's own arguments, so a non-default one is refused instead of being overwritten."""
    if value is None:
        return None
    if not isinstance(value, LinearCrossEntropyOptions):
        raise TypeError(f"head_options must be a LinearCrossEntropyOptions or None, got {type(value).__name__}")
    default = LinearCrossEntropyOptions()
    for field in dataclasses.fields(value):
        got, want = getattr(value, field.name), getattr(default, field.name)
        if field.name not in HEAD_OPTION_FIELDS and got is not want and got != want:
            raise ValueError(
                f"head_options.{field.name}={got!r} is a selection setting: {owner} sets it from its own "
                f"arguments (head_options may set {', '.join(HEAD_OPTION_FIELDS)})"
            )
    return value


def _zero_ignored_rows(hidden: Tensor, valid: Tensor) -> Tensor:
    """``hidden`` (N, H) with the rows of ignored targets set to 0 (a select: NaN/inf there never propagate).

    An ignored row's gradient weight is 0, but 0 · NaN = NaN: a NaN or inf hidden row at an ignored (padded)
    position would otherwise turn its logits, and through them every d_weight / d_bias element, into NaN. With
    zeros there, ignored rows give finite statistics that nothing reads and add exact zeros to every gradient
    sum, so the loss and gradients are bit-for-bit those of any finite values at those rows. Costs one pass over
    (N, H) in the forward and one in the backward (the masked copy is not kept between them).
    """
    return torch.where(valid.unsqueeze(-1), hidden, 0)


class _SelectiveLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, plan: _Plan,
                row_weights: Tensor | None = None):
        # hidden (N, H), weight (V, H), bias (V,) | None, targets (N,) long, row_weights (N,) fp32 | None
        forward_stats, _ = plan.backend()
        opts = plan.options
        n = hidden.shape[0]
        valid = targets != plan.ignore_index  # (N,)
        n_valid = valid.sum()
        hidden_in, hidden = hidden, _zero_ignored_rows(hidden, valid)  # the kernels see 0 at ignored rows
        need = ctx.needs_input_grad if plan.grad_enabled else (False, False, False)
        wants_grad = need[0] or need[1] or (bias is not None and need[2])
        # chunked kernel, workspace='outputs', ratio 1, weight gradient wanted: statistics now, the vocabulary
        # chunks (which need every row's lse first) in the backward, with the upstream gradient already known
        outputs_sched = plan.outputs_sched if need[1] else None
        # chunked Triton kernel at ratio 1: gradients during the forward (the fused kernel needs the lse first)
        fused = (plan.impl == "triton" and opts.kernel == "chunked" and wants_grad and plan.keeps_all_valid()
                 and outputs_sched is None)
        # fused kernel, bwd='split_fwd', ratio 1: d_hidden accumulated in the forward's pass over the vocabulary
        fwd_dh = (plan.impl == "triton" and opts.kernel == "fused" and opts.bwd == "split_fwd" and need[0]
                  and plan.keeps_all_valid() and opts.filter_eps is None)
        common = dict(ignore_index=plan.ignore_index, softcap=plan.softcap, workspace_bytes=opts.workspace_bytes)
        # fp16 only: rows are weighted by w · scale (scale = 2^round(log2 K_max), exact) so that the chunk
        # gradient p · w does not underflow fp16 (p ~ 1/V, w = 1/K); the outputs are divided by scale after.
        all_rows = fused or outputs_sched is not None or plan.all_rows_backward()
        scale = plan.fp16_scale(hidden.dtype, n if all_rows else plan.k_max(n))
        if outputs_sched is not None:
            from cggr.kernels.linear_cross_entropy import outputs_forward_stats

            stats = outputs_forward_stats(hidden, weight, bias, targets, outputs_sched,
                                          ignore_index=plan.ignore_index, softcap=plan.softcap)
        elif fused:  # every valid token is kept: gradients in the same pass
            w = valid.float() / (n_valid.clamp(min=1) if plan.reduction == "mean" else 1) * scale
            if row_weights is not None:
                w = w * row_weights
            stats, grads = forward_stats(
                hidden, weight, bias, targets, row_weights=w, need_hidden_grad=need[0],
                need_weight_grad=need[1], need_bias_grad=bias is not None and need[2], workspace=opts.workspace,
                **common,
            )
        elif fwd_dh:
            from cggr.kernels.linear_cross_entropy_fused_split import forward_with_hidden_grad

            w = valid.float() / (n_valid.clamp(min=1) if plan.reduction == "mean" else 1) * scale
            if row_weights is not None:
                w = w * row_weights
            stats, d_h_fwd = forward_with_hidden_grad(
                hidden, weight, bias, targets, w, ignore_index=plan.ignore_index, softcap=plan.softcap,
                accumulate=opts.accumulate,
            )
        else:
            stats, grads = forward_stats(hidden, weight, bias, targets, **common)
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
        ctx.fused = fused
        ctx.scale = scale
        ctx.consumed = False
        ctx.d_h_fwd = d_h_fwd if fwd_dh else None
        ctx.outputs_sched = outputs_sched
        if fused:
            ctx.grads = grads
        elif wants_grad:
            idx = None  # None: every row (fused kernel or workspace='outputs', ratio 1; unselected rows: weight 0)
            if not all_rows:
                k_max = plan.k_max(n)
                idx = torch.argsort((~mask).to(torch.int8), stable=True)[:k_max]  # selected rows first
            ctx.save_for_backward(hidden_in, weight, bias, targets, stats[0], w, idx)  # no masked copy kept
        return loss

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        if ctx.consumed:
            raise RuntimeError("linear_cross_entropy does not support backward twice through the same graph")
        ctx.consumed = True
        plan = ctx.plan
        need = ctx.needs_input_grad
        if ctx.fused:
            d_h, d_w, d_b = ctx.grads
            ctx.grads = None
            g = grad_out.float()
            for t in (d_h, d_w, d_b):  # in place: the fused forward's buffers belong to this graph only
                if t is not None:
                    t.mul_(g.to(t.dtype))
                    if ctx.scale != 1.0:
                        t.mul_(1.0 / ctx.scale)  # a power of two: exact
            return d_h, d_w, d_b, None, None, None
        hidden, weight, bias, targets, lse, w, idx = ctx.saved_tensors
        hidden = _zero_ignored_rows(hidden, targets != plan.ignore_index)  # as in the forward
        d_h_fwd, ctx.d_h_fwd = ctx.d_h_fwd, None  # bwd='split_fwd' at ratio 1: d_hidden from the forward
        if ctx.outputs_sched is not None:
            from cggr.kernels.linear_cross_entropy import outputs_backward

            d_h, d_w, d_b = outputs_backward(
                hidden, weight, bias, targets, lse, w * (grad_out.float() * ctx.scale), ctx.outputs_sched,
                ignore_index=plan.ignore_index, softcap=plan.softcap, need_hidden_grad=need[0],
                need_bias_grad=bias is not None and need[2],
            )
        else:
            _, backward_selected = plan.backend()
            d_h, d_w, d_b = backward_selected(
                hidden, weight, bias, targets, lse, w * (grad_out.float() * ctx.scale), idx,
                ignore_index=plan.ignore_index, softcap=plan.softcap, workspace_bytes=plan.options.workspace_bytes,
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


# ---------------------------------------------------------------------------------------------- public op
def _check_lce_inputs(hidden, weight, targets, bias, softcap) -> None:
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
    _check_lce_inputs(hidden, weight, targets, bias, softcap)
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
    if row_weights is not None:
        if not isinstance(row_weights, Tensor) or not row_weights.is_floating_point():
            got = row_weights.dtype if isinstance(row_weights, Tensor) else type(row_weights).__name__
            raise TypeError(f"row_weights must be a floating-point tensor shaped like targets, got {got}")
        if tuple(row_weights.shape) != tuple(targets.shape):
            raise ValueError(f"row_weights shape {tuple(row_weights.shape)} does not match targets shape "
                             f"{tuple(targets.shape)}")
        if row_weights.device != hidden.device:
            raise ValueError(f"row_weights are on {row_weights.device} but hidden is on {hidden.device}")
        row_weights = row_weights.detach().reshape(-1).float()
    check_target_range(targets, vocab, ignore_index=ignore_index)
    chosen = resolve_impl(impl, hidden, op="linear_cross_entropy")
    plan = _Plan(
        impl=chosen, ratio=float(ratio), scoring=scoring, selection=selection, ignore_index=ignore_index,
        softcap=float(softcap) if softcap is not None else None, reduction=reduction, options=options,
        target_shape=tuple(targets.shape), grad_enabled=torch.is_grad_enabled(),
    )
    outputs_ws = chosen == "triton" and options.kernel == "chunked" and options.workspace == "outputs"
    if outputs_ws and plan.keeps_all_valid():
        from cggr.kernels.linear_cross_entropy import outputs_schedule

        plan.outputs_sched = outputs_schedule(targets.numel(), hsize, vocab, hidden.element_size(),
                                              workspace_bytes=options.workspace_bytes)
        if plan.outputs_sched is None:
            # N >> H: too many vocabulary chunks; the fused kernel keeps the no-workspace promise (the chunked
            # kernel would fall back to its logits buffer)
            plan.options = dataclasses.replace(options, kernel="fused", workspace="buffer")
    opts = plan.options
    if chosen == "triton" and opts.kernel == "fused" and opts.accumulate == "auto":
        plan.options = dataclasses.replace(opts, accumulate=resolve_accumulate("auto", hidden.device, hidden.dtype))
    h2 = hidden.reshape(-1, hsize).contiguous()
    loss, info = _run_selective(h2, weight.contiguous(), bias, targets.reshape(-1).long(), plan, row_weights)
    return (loss, info) if return_info else loss


@torch.compiler.disable
def _run_selective(hidden, weight, bias, targets, plan: _Plan, row_weights: Tensor | None = None):
    """The autograd Function, run eagerly under ``torch.compile`` (a graph break here).

    Its forward hands the selection back through ``plan.info`` and its context keeps tensors as attributes,
    which dynamo cannot trace (it raised an internal error); eager, it costs a handful of launches.
    """
    loss = _SelectiveLinearCE.apply(hidden, weight, bias, targets, plan, row_weights)
    return loss, plan.info


__all__ = [
    "LinearCrossEntropyInfo",
    "LinearCrossEntropyOptions",
    "linear_cross_entropy",
    "resolve_accumulate",
    "resolve_impl",
    "token_scores",
]
