"""What a caller of :func:`cggr.functional.linear_cross_entropy` sets (:class:`LinearCrossEntropyOptions`) and gets
back (:class:`LinearCrossEntropyInfo`), and the checks around them.

Shape legend: N tokens, H hidden size, V vocabulary, K kept tokens.

Measured time and memory of each kernel choice: docs/linear_cross_entropy.md.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from cggr._rng import CounterRNG
from cggr._validation import check_choice, check_int
from cggr.kernels._linear_ce_modes import ACCUMULATE_MODES, DEFAULT_WORKSPACE_BYTES, WORKSPACES
from cggr.scoring import TokenScores

KERNELS = ("chunked", "fused")
ACCUMULATE_OPTIONS = ("auto", *ACCUMULATE_MODES)  # what LinearCrossEntropyOptions takes
#: First Triton release whose 16-bit ``atomic_add`` the fused kernels use by default (``accumulate='auto'``): bf16
#: atomics need sm_90 and a recent Triton; 3.6 is the release verified on an H200 (tests/gpu, the tile sweep).
ATOMIC_MIN_TRITON = (3, 6)
FUSED_BACKWARDS = ("tiled", "split", "split_fwd")


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
            ``'fused'`` (logits only in registers: minimal memory; see :mod:`cggr.linear_ce.op`).
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
