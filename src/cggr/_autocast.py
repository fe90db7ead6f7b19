"""The compute dtype ``torch.autocast`` would give an op on a tensor (shared by the fused LM head and the MoE layer)."""

from __future__ import annotations

import torch


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The autocast dtype when autocast is on for ``x``'s device type and would cast ``x``, else ``None``.

    Mirrors autocast's own eligibility rule for ops like ``nn.Linear``: floating tensors are cast to the autocast
    dtype, except float64 ones, which autocast leaves alone.
    """
    kind = x.device.type
    if not x.is_floating_point() or x.dtype == torch.float64 or not torch.is_autocast_enabled(kind):
        return None
    return torch.get_autocast_dtype(kind)
