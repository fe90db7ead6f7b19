"""``CGGROutput``: what :class:`cggr.CGGRModel` returns when ``labels`` are given (re-exported by ``cggr.model``).

Shape legend: B batch, T sequence length, V vocabulary, k selected sequences.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor


@dataclass
class CGGROutput:
    """What :class:`CGGRModel` returns when ``labels`` are given: the loss, and the logits it was computed from.

    It reads like a Hugging Face ``ModelOutput``, so ``transformers.Trainer``, Accelerate loops and code written for
    HF models work unchanged: ``out.loss``, ``out["loss"]``, ``out[0]`` (the first field that is not ``None``),
    ``out[1:]``, ``out.to_tuple()``, ``loss, logits = out``.

    Attributes:
        loss: 0-d fp32 loss (see :meth:`CGGRModel.forward`).
        logits: (k, T, V) logits of the k sequences trained on, in the order of ``get_metrics()["selected_indices"]``
            (in eval mode: every sequence, (B, T, V)); ``None`` with the fused head, which never materialises them.
    """

    loss: Tensor | None = None
    logits: Tensor | None = None

    def keys(self) -> list[str]:
        return [name for name in ("loss", "logits") if getattr(self, name) is not None]

    def items(self) -> list[tuple[str, Tensor]]:
        return [(name, getattr(self, name)) for name in self.keys()]

    def values(self) -> list[Tensor]:
        return [getattr(self, name) for name in self.keys()]

    def to_tuple(self) -> tuple[Tensor, ...]:
        return tuple(self.values())

    def __getitem__(self, key: str | int | slice) -> Any:
        if isinstance(key, str):
            if getattr(self, key, None) is None or key not in ("loss", "logits"):
                raise KeyError(key)
            return getattr(self, key)
        return self.to_tuple()[key]

    def __iter__(self):
        return iter(self.to_tuple())

    def __len__(self) -> int:
        return len(self.keys())


__all__ = ["CGGROutput"]
