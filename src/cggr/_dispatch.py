"""Which implementation an op runs: ``impl='auto' | 'torch' | 'triton'`` (docs/design.md §6).

``'torch'`` is the pure-PyTorch path (the CPU path and the test oracle), ``'triton'`` the CUDA kernels under
:mod:`cggr.kernels`, ``'auto'`` picks Triton for CUDA tensors of a supported dtype when Triton imports. An explicit
``'triton'`` that cannot run raises; the environment variable ``CGGR_IMPL=torch`` forces the PyTorch path
everywhere. Used by :func:`cggr.scoring.token_scores` and :func:`cggr.linear_ce.op.linear_cross_entropy`.
"""

from __future__ import annotations

import os
from typing import Literal

import torch
from torch import Tensor

from cggr._validation import check_choice

Impl = Literal["auto", "torch", "triton"]
IMPLS = ("auto", "torch", "triton")
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def triton_importable() -> bool:
    """Whether the ``triton`` package imports (only ``ImportError`` is caught)."""
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
        if not triton_importable():
            raise RuntimeError(f"{op}(impl='triton') needs the 'triton' package, which is not importable")
        if not on_gpu:
            raise RuntimeError(f"{op}(impl='triton') needs CUDA tensors, got a tensor on {tensor.device}")
        if not dtype_ok:
            raise TypeError(f"{op}(impl='triton') supports float16, bfloat16 and float32, got {tensor.dtype}")
        return "triton"
    return "triton" if on_gpu and dtype_ok and triton_importable() else "torch"
