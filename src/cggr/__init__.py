"""cggr — Confidence-Gated Gradient Routing.

Score how hard every token is (entropy, top-2 margin, loss) and spend the expensive work — loss, backward,
whole forward passes, expert GEMMs — only on the hard tokens and sequences.

Public names are imported lazily (PEP 562), so ``import cggr`` stays cheap and optional dependencies
(transformers, triton) are only needed by the parts that use them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> submodule that defines it
_EXPORTS: dict[str, str] = {
    "TokenScores": "cggr.scoring",
    "token_scores": "cggr.scoring",
    "difficulty": "cggr.scoring",
    "select_tokens": "cggr.selection",
    "select_sequences": "cggr.selection",
    "RatioSchedule": "cggr.selection",
    "SelectionConfig": "cggr.config",
    "CGGRLoss": "cggr.loss",
    "TruncatedRouter": "cggr.router",
    "create_truncated_router": "cggr.router",
    "CGGRScorer": "cggr.scorer",
    "CGGRModel": "cggr.model",
    "PersistentTRMLP": "cggr.moe",
    "create_persistent_tr_mlp": "cggr.moe",
    "linear_cross_entropy": "cggr.functional",
    "ReferenceLosses": "cggr.reference",
    "AsyncCGGRScorer": "cggr.async_scoring",
    "SequenceScoreCache": "cggr.async_scoring",
    "compute_reference_losses": "cggr.reference",
    "enable_flash_attention": "cggr.flash",
    "load_model_with_flash_attention": "cggr.flash",
    "get_flash_attention_info": "cggr.flash",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'cggr' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from cggr.async_scoring import AsyncCGGRScorer, SequenceScoreCache
    from cggr.config import SelectionConfig
    from cggr.flash import enable_flash_attention, get_flash_attention_info, load_model_with_flash_attention
    from cggr.functional import linear_cross_entropy
    from cggr.loss import CGGRLoss
    from cggr.model import CGGRModel
    from cggr.moe import PersistentTRMLP, create_persistent_tr_mlp
    from cggr.reference import ReferenceLosses, compute_reference_losses
    from cggr.router import TruncatedRouter, create_truncated_router
    from cggr.scorer import CGGRScorer
    from cggr.scoring import TokenScores, difficulty, token_scores
    from cggr.selection import RatioSchedule, select_sequences, select_tokens
