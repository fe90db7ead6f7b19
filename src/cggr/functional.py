"""Functional API: one-pass token scoring and the selective fused linear cross-entropy.

The public entry point of both ops; their code lives in their own modules:

- :func:`token_scores`: :mod:`cggr.scoring` (the same function as ``cggr.token_scores``).
- :func:`linear_cross_entropy`, :class:`LinearCrossEntropyOptions`, :class:`LinearCrossEntropyInfo`,
  :func:`resolve_accumulate`: :mod:`cggr.linear_ce` (options, the PyTorch path, the route, the autograd Function,
  the op).
- :func:`resolve_impl` (``impl='auto' | 'torch' | 'triton'``, docs/design.md §6): :mod:`cggr._dispatch`.

Both ops dispatch on ``impl``: ``'torch'`` is the pure-PyTorch path (CPU path and test oracle), ``'triton'`` the
CUDA kernels under :mod:`cggr.kernels`, ``'auto'`` picks Triton for CUDA tensors when Triton imports. An explicit
``'triton'`` that cannot run raises; the environment variable ``CGGR_IMPL=torch`` forces the PyTorch path
everywhere.
"""

from __future__ import annotations

from cggr._dispatch import IMPLS as IMPLS
from cggr._dispatch import Impl as Impl
from cggr._dispatch import resolve_impl
from cggr.kernels._linear_ce_modes import ACCUMULATE_MODES as ACCUMULATE_MODES
from cggr.kernels._linear_ce_modes import DEFAULT_WORKSPACE_BYTES as DEFAULT_WORKSPACE_BYTES
from cggr.kernels._linear_ce_modes import WORKSPACES as WORKSPACES
from cggr.linear_ce.op import linear_cross_entropy
from cggr.linear_ce.options import ACCUMULATE_OPTIONS as ACCUMULATE_OPTIONS
from cggr.linear_ce.options import ATOMIC_MIN_TRITON as ATOMIC_MIN_TRITON
from cggr.linear_ce.options import FUSED_BACKWARDS as FUSED_BACKWARDS
from cggr.linear_ce.options import HEAD_OPTION_FIELDS as HEAD_OPTION_FIELDS
from cggr.linear_ce.options import KERNELS as KERNELS
from cggr.linear_ce.options import (
    LinearCrossEntropyInfo,
    LinearCrossEntropyOptions,
    resolve_accumulate,
)
from cggr.linear_ce.options import check_head_options as check_head_options
from cggr.scoring import token_scores

__all__ = [
    "LinearCrossEntropyInfo",
    "LinearCrossEntropyOptions",
    "linear_cross_entropy",
    "resolve_accumulate",
    "resolve_impl",
    "token_scores",
]
