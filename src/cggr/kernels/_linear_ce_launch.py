"""What the fused linear cross-entropy's schedules share at launch: the forward with its tiled backward
(:mod:`cggr.kernels.linear_cross_entropy_fused`) and the split backward
(:mod:`cggr.kernels.linear_cross_entropy_fused_split`) both import from here, never from each other.

Shape legend: N tokens, H hidden size (D in the kernels), V vocabulary, R rows of a backward (N or K_max), S
vocabulary splits of a forward.

- Two small kernels both schedules launch: ``_merge_kernel`` (the S partial online-softmax states of each row
  merged into lse, entropy, confidence, margin, nll) and ``_target_fixup_kernel`` (d_hidden[row] +=
  c_row · weight[target_row] in fp32: the target column is kept out of the d_hidden accumulation, see the
  error model in the fused module).
- Device queries (:func:`smem_per_block`, :func:`num_sms`, :func:`interpreting`), launching on the inputs'
  device (:func:`on_input_device`), the GEMM precision (:func:`dot_precision`), TMA descriptors
  (:func:`tma_usable`, :func:`descriptor`), the gradient accumulators and their final cast
  (:func:`gradient_accumulators`, :func:`in_input_dtypes`), and :data:`LAST_LAUNCHED` (compile facts of the last
  launch of each main kernel, for the tile sweep).

This module imports Triton at the top: import it only where Triton is known to be importable.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from cggr.kernels._linear_ce_modes import check_accumulate
from cggr.kernels._utils import LN2, LOG2E, NEG_BIG

try:  # host-side TMA descriptors (Triton >= 3.4); without them every tile is loaded through pointers
    from triton.tools.tensor_descriptor import TensorDescriptor as _TensorDescriptor
except ImportError:
    _TensorDescriptor = None


# ---------------------------------------------------------------------------------------------- shared kernels
@triton.jit
def _merge_kernel(PART, STATS, T, N, S, ignore_index, BLOCK: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    mask = rows < N
    stride_k = S * N
    m = tl.full((BLOCK,), NEG_BIG, tl.float32)
    for k in range(0, S):
        m = tl.maximum(m, tl.load(PART + k * N + rows, mask=mask, other=NEG_BIG))
    s_tot = tl.zeros((BLOCK,), tl.float32)
    t_tot = tl.zeros((BLOCK,), tl.float32)
    a1 = tl.full((BLOCK,), NEG_BIG, tl.float32)
    a2 = tl.full((BLOCK,), NEG_BIG, tl.float32)
    zt = tl.full((BLOCK,), NEG_BIG, tl.float32)
    for k in range(0, S):
        p = PART + k * N + rows
        ref = tl.load(p, mask=mask, other=NEG_BIG)
        s = tl.load(p + stride_k, mask=mask, other=1.0)  # 1 on masked rows: no log(0) there
        t = tl.load(p + 2 * stride_k, mask=mask, other=0.0)
        b1 = tl.load(p + 3 * stride_k, mask=mask, other=NEG_BIG)
        b2 = tl.load(p + 4 * stride_k, mask=mask, other=NEG_BIG)
        shift2 = (ref - m) * LOG2E
        c = tl.exp2(shift2)
        s_tot += c * s
        t_tot += c * (t + shift2 * s)
        a2 = tl.maximum(tl.minimum(a1, b1), tl.maximum(a2, b2))
        a1 = tl.maximum(a1, b1)
        zt = tl.maximum(zt, tl.load(p + 5 * stride_k, mask=mask, other=NEG_BIG))
    log_s = tl.log(s_tot)
    lse = m + log_s
    entropy = tl.maximum(log_s - (t_tot * LN2) / s_tot, 0.0, propagate_nan=tl.PropagateNan.ALL)
    conf = tl.exp(a1 - lse)
    margin = conf - tl.exp(a2 - lse)
    tgt = tl.load(T + rows, mask=mask, other=ignore_index)
    nll = tl.where(tgt != ignore_index, lse - zt, 0.0)
    tl.store(STATS + rows, lse, mask=mask)
    tl.store(STATS + N + rows, entropy, mask=mask)
    tl.store(STATS + 2 * N + rows, conf, mask=mask)
    tl.store(STATS + 3 * N + rows, margin, mask=mask)
    tl.store(STATS + 4 * N + rows, nll, mask=mask)


@triton.jit
def _target_fixup_kernel(DH, W, T, IDX, CT, D, stride_h, stride_w, HAS_IDX: tl.constexpr, BLOCK: tl.constexpr):
    """d_hidden[row] += c_row · weight[target_row] in fp32, one rounding (c_row = 0: nothing to add)."""
    r = tl.program_id(0).to(tl.int64)
    c = tl.load(CT + r)
    if c != 0.0:
        if HAS_IDX:
            row = tl.load(IDX + r).to(tl.int64)
        else:
            row = r
        tgt = tl.load(T + row).to(tl.int64)  # in [0, V): c is only written by the tile holding the target
        offs = tl.arange(0, BLOCK)
        for d0 in range(0, D, BLOCK):
            m = (offs + d0) < D
            dh_ptrs = DH + row * stride_h + d0 + offs
            dh = tl.load(dh_ptrs, mask=m, other=0.0).to(tl.float32)
            wt = tl.load(W + tgt * stride_w + d0 + offs, mask=m, other=0.0).to(tl.float32)
            tl.store(dh_ptrs, (dh + c * wt).to(DH.dtype.element_ty), mask=m)


# ---------------------------------------------------------------------------------------------- launch helpers
#: Shared memory per block (opt-in) from which the tile heuristics take the large tiles of the H200 sweep
#: (H100 / H200: 227 KiB; A100: 163 KiB; consumer GPUs: ~99 KiB).
LARGE_SMEM_BYTES = 200 * 1024


@functools.lru_cache(maxsize=16)
def _smem_optin(device_index: int) -> int:
    props = torch.cuda.get_device_properties(device_index)
    optin = getattr(props, "shared_memory_per_block_optin", None)
    if optin is not None:
        return int(optin)
    return 227 * 1024 if props.major >= 9 else 0  # older torch: assume Hopper-class only from sm_90


def smem_per_block(device: torch.device) -> int | None:
    """Shared memory (bytes) a block may opt in to on ``device``; ``None`` off CUDA (interpreter)."""
    if device.type != "cuda":
        return None
    return _smem_optin(device.index if device.index is not None else torch.cuda.current_device())


#: The compiled kernel of the last launch of each main kernel ('fwd_stats', 'bwd_tiled', and the split module's
#: 'bwd_dh', 'bwd_dw', 'fwd_dh'), as Triton's launch returns it: its registers (``n_regs``), spills
#: (``n_spills``), shared memory and TTGIR, for benchmarks/sweep_fused_tiles.py. ``None`` under the interpreter.
LAST_LAUNCHED: dict[str, object] = {}


def interpreting() -> bool:
    """Whether the Triton interpreter runs the kernels (``TRITON_INTERPRET=1``: the CPU tests)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=16)
def num_sms(device_index: int) -> int:
    """Streaming multiprocessors of the CUDA device ``device_index``."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def on_input_device(fn):
    """Run ``fn(hidden, ...)`` with ``hidden``'s CUDA device current (Triton launches on the current device)."""

    @functools.wraps(fn)
    def wrapper(hidden, *args, **kwargs):
        guard = torch.cuda.device(hidden.device) if hidden.device.type == "cuda" else contextlib.nullcontext()
        with guard:
            return fn(hidden, *args, **kwargs)

    return wrapper


def dot_precision(dtype: torch.dtype) -> str:
    """The tl.dot precision of the logits GEMM: fp32 inputs get true fp32 products (``'ieee'``), never TF32."""
    return "ieee" if dtype == torch.float32 else "tf32"


def tma_usable(cfg: dict, *tensors: Tensor) -> bool:
    """Whether the operand tiles of ``tensors`` (2-D, row-major) can come through TMA descriptors: the config
    allows it (key TMA, default on), this Triton has host-side tensor descriptors, and every tensor is
    non-empty with a 16-byte aligned base and row stride (the hardware's requirement; H % 8 == 0 for 16-bit)."""
    if not cfg.get("TMA", True) or _TensorDescriptor is None:
        return False
    return all(
        t.dim() == 2 and t.numel() > 0 and t.stride(1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0
        and t.data_ptr() % 16 == 0
        for t in tensors
    )


def descriptor(t: Tensor, block: tuple[int, int], use: bool):
    """A TMA descriptor of the 2-D tensor ``t`` with ``block``-shaped tiles, or ``t`` itself (unused) if not ``use``."""
    return _TensorDescriptor.from_tensor(t, list(block)) if use else t


def gradient_accumulators(
    hidden: Tensor,
    weight: Tensor,
    accumulate: str,
    need_hidden_grad: bool,
    need_weight_grad: bool,
    need_bias_grad: bool,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, bool, bool]:
    """Zeroed gradient outputs of a fused backward, which the kernels accumulate into.

    d_hidden is fp32 for ``accumulate`` in ('fp32_hidden', 'fp32') or fp32 inputs, d_weight for 'fp32' or fp32
    inputs, else each in its input's dtype; d_bias is always fp32 (it is summed with fp32 atomics / in registers).

    Returns:
        ``(d_hidden (N, H), d_weight (V, H), d_bias (V,), dh_fp32, dw_fp32)``, ``None`` where not needed.
    """
    check_accumulate(accumulate)
    n, d = hidden.shape
    vocab = weight.shape[0]
    dev, f32 = hidden.device, torch.float32
    dh_fp32 = accumulate in ("fp32_hidden", "fp32") or hidden.dtype == f32
    dw_fp32 = accumulate == "fp32" or hidden.dtype == f32
    d_h = torch.zeros(n, d, dtype=f32 if dh_fp32 else hidden.dtype, device=dev) if need_hidden_grad else None
    d_w = torch.zeros(vocab, d, dtype=f32 if dw_fp32 else weight.dtype, device=dev) if need_weight_grad else None
    d_b = torch.zeros(vocab, dtype=f32, device=dev) if need_bias_grad else None
    return d_h, d_w, d_b, dh_fp32, dw_fp32


def in_input_dtypes(
    d_h: Tensor | None, d_w: Tensor | None, d_b: Tensor | None, hidden: Tensor, weight: Tensor, bias: Tensor | None
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The accumulated gradients cast to the dtypes of ``hidden``, ``weight`` and ``bias`` (no copy if equal)."""
    return (
        d_h.to(hidden.dtype) if d_h is not None else None,
        d_w.to(weight.dtype) if d_w is not None else None,
        d_b.to(bias.dtype) if d_b is not None else None,
    )
