"""What every arm of a race shares: :class:`RaceEnv` (the data on the device, the clock) and :class:`RaceContext`
(the settings resolved for this race), passed to training (:mod:`.train`) and evaluation (:mod:`.evaluate`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from cggr.cli.data import RaceData
from cggr.cli.race.config import RaceConfig
from cggr.cli.race.progress import RaceProgress


@dataclass
class RaceEnv:
    """What every chunk of a race needs: data (on the device on CUDA), device, precision, the clock."""

    train_ids: torch.Tensor
    train_mask: torch.Tensor
    device: torch.device
    clock: Callable[[], float]
    max_chunk_seconds: float
    has_padding: bool = True  # False: every training sequence is full, the arms run without an attention mask


@dataclass
class RaceContext:
    """Per-race context of :func:`train_arm`."""

    cfg: RaceConfig
    data: RaceData
    env: RaceEnv
    router_layers: int
    lr: float
    budget: float
    batch: int
    scan: int
    fused: bool
    eval_bs: int
    probe: torch.Tensor  # (n_probe,) indices of the probe blocks
    reference: torch.Tensor | None = None  # (N_train,) reference loss per training block (--reference)
    progress: RaceProgress | None = None  # the display (None: nothing shown)


__all__ = ["RaceContext", "RaceEnv"]
