"""Which implementation an op runs: ``impl='auto' | 'torch' | 'triton'`` (docs/design.md §6).

``'torch'`` is the pure-PyTorch path (the CPU path and the test oracle), ``'triton'`` the CUDA kernels under
:mod:`cggr.kernels`, ``'auto'`` picks Triton for CUDA tensors of a dtype the op's kernels support when Triton
imports. An explicit ``'triton'`` that cannot run raises; the environment variable ``CGGR_IMPL=torch`` forces the
PyTorch path everywhere. Under ``TRITON_INTERPRET=1`` (the CPU kernel tests) CPU tensors count as CUDA ones for the
ops whose Triton path the interpreter runs. Used by :func:`cggr.scoring.token_scores`,
:func:`cggr.linear_ce.op.linear_cross_entropy` and :class:`cggr.moe.PersistentTRMLP` (with
:func:`cggr.moe.route_tokens`), so each decides its implementation in one place.
"""

from __future__ import annotations

import os
from typing import Literal

import torch
from torch import Tensor

from cggr._validation import check_choice

Impl = Literal["auto", "torch", "triton"]
IMPLS = ("auto", "torch", "triton")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # scoring and linear_ce: every float dtype but fp64


def triton_importable() -> bool:
    """Whether the ``triton`` package imports (only ``ImportError`` is caught)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_impl(impl: str, tensor: Tensor, *, op: str, dtypes: tuple[torch.dtype, ...] = TRITON_DTYPES,
                 interpretable: bool = True) -> str:
    """Return ``'torch'`` or ``'triton'`` for ``impl`` and the tensor the op runs on (docs/design.md §6).

    Args:
        impl: ``'auto'``, ``'torch'`` or ``'triton'`` (anything else: ValueError).
        tensor: the input whose device and dtype decide (the op's main operand).
        op: the op's name, for the error messages (``"{op}(impl='triton') ..."``).
        dtypes: the dtypes the op's Triton kernels support; ``'auto'`` picks torch for any other, an explicit
            ``'triton'`` raises TypeError.
        interpretable: whether the op's Triton path runs on CPU tensors under ``TRITON_INTERPRET=1``. False (the
            MoE layer, whose kernel entry needs CUDA tensors) keeps CPU tensors on the torch path there too.

    Raises:
        RuntimeError: explicit ``'triton'`` without an importable triton or on a non-CUDA tensor.
        TypeError: explicit ``'triton'`` on a dtype outside ``dtypes``.
    """
    check_choice("impl", impl, IMPLS)
    if os.environ.get("CGGR_IMPL", "").strip().lower() == "torch" or impl == "torch":
        return "torch"
    interpreted = interpretable and os.environ.get("TRITON_INTERPRET") == "1"
    on_gpu = tensor.device.type == "cuda" or interpreted
    dtype_ok = tensor.dtype in dtypes
    if impl == "triton":
        if not triton_importable():
            raise RuntimeError(f"{op}(impl='triton') needs the 'triton' package, which is not importable")
        if not on_gpu:
            raise RuntimeError(f"{op}(impl='triton') needs CUDA tensors, got a tensor on {tensor.device}")
        if not dtype_ok:
            names = [str(d).removeprefix("torch.") for d in dtypes]
            expected = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
            raise TypeError(f"{op}(impl='triton') supports {expected}, got {tensor.dtype}")
        return "triton"
    return "triton" if on_gpu and dtype_ok and triton_importable() else "torch"
