"""What ``CGGRScorer``, ``CGGRModel`` and ``CGGRLoss`` take from their caller, checked and put in shape.

Shape legend: B batch, T sequence length, V vocabulary, k selected sequences.

* (B, T) tensors (``input_ids``, ``labels``, ``targets``, ``attention_mask``): :func:`check_2d`.
* HF labels to targets aligned with the logits: :func:`aligned_targets` (causal LMs shift, masked LMs do not:
  :func:`is_masked_lm`; padding neither is predicted nor predicts).
* ``num_items_in_batch`` (gradient accumulation): :func:`check_num_items`, without reading a device value.
* Extra model inputs with a leading batch dimension, sliced to the selected rows: :func:`row_kwargs`.
* The router: :func:`resolve_router`, :func:`set_router` (held without counting its parameters twice) and its
  logits (:func:`router_logits`, no grad).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cggr._calling import ForwardFn, logits_of
from cggr.router import TruncatedRouter, create_truncated_router, unwrap_model

# Model types trained with unshifted (masked-LM) labels when no ``causal`` flag is given.
_MASKED_LM_TYPES = frozenset(
    {
        "bert",
        "roberta",
        "xlm-roberta",
        "camembert",
        "distilbert",
        "albert",
        "electra",
        "deberta",
        "deberta-v2",
        "modernbert",
        "mpnet",
        "ernie",
    }
)


def is_masked_lm(model: nn.Module) -> bool:
    """True for masked-LM heads (BERT/RoBERTa-style: labels are not shifted)."""
    model = unwrap_model(model)
    if "MaskedLM" in type(model).__name__:
        return True
    cfg = getattr(model, "config", None)
    return bool(
        cfg is not None
        and getattr(cfg, "model_type", None) in _MASKED_LM_TYPES
        and not getattr(cfg, "is_decoder", False)
    )


def check_2d(name: str, t: Tensor | None, shape: torch.Size | None = None, *, integer: bool = False,
             device: torch.device | None = None) -> None:
    """``t`` is None or a (B, T) tensor (of ``shape`` / on ``device``: those of input_ids, when given)."""
    if t is None:
        return
    if not isinstance(t, Tensor) or t.dim() != 2:
        got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a (B, T) tensor, got {got}")
    if shape is not None and t.shape != shape:
        raise ValueError(f"{name} shape {tuple(t.shape)} does not match input_ids shape {tuple(shape)}")
    if device is not None and t.device != device:
        verb = "are" if name.endswith("s") else "is"
        raise ValueError(f"{name} {verb} on {t.device} but input_ids are on {device}; move them together")
    if integer and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor of token ids, got dtype {t.dtype}")


def aligned_targets(labels: Tensor, attention_mask: Tensor | None, *, causal: bool, ignore_index: int) -> Tensor:
    """(B, T) targets aligned with the logits from checked (B, T) HF labels.

    Padding (``attention_mask == 0``) is never a target. Causal: position t predicts label t+1, the last position
    predicts nothing, and neither does a padding position (left padding: the last pad does not predict the first
    real token), so the loss equals that of the unpadded sequences. Masked LMs: the labels as they are.
    """
    if attention_mask is not None:
        labels = labels.masked_fill(attention_mask == 0, ignore_index)
    if not causal:
        return labels
    targets = F.pad(labels[:, 1:], (0, 1), value=ignore_index)  # (B, T)
    if attention_mask is not None:
        targets = targets.masked_fill(attention_mask == 0, ignore_index)
    return targets


def check_num_items(num_items: Any) -> int | Tensor | None:
    """``num_items_in_batch`` as given, checked without reading a device value (no host sync)."""
    if num_items is None:
        return None
    if isinstance(num_items, Tensor):
        if num_items.numel() != 1 or num_items.is_complex() or num_items.dtype == torch.bool:
            raise ValueError(
                f"num_items_in_batch must be a positive int or a one-element real tensor, got a tensor of shape "
                f"{tuple(num_items.shape)} and dtype {num_items.dtype}"
            )
        return num_items.reshape(())
    if isinstance(num_items, bool) or not isinstance(num_items, int) or num_items <= 0:
        raise ValueError(f"num_items_in_batch must be a positive int or a one-element tensor, got {num_items!r}")
    return num_items


def row_kwargs(kwargs: dict[str, Any], batch: int, idx: Tensor | None = None) -> dict[str, Any]:
    """``kwargs`` with every tensor of leading dimension ``batch`` sliced to rows ``idx`` (``None``: as given)."""
    out = {}
    for key, val in kwargs.items():
        if isinstance(val, Tensor) and val.dim() >= 1 and val.shape[0] == batch and idx is not None:
            val = val.index_select(0, idx)
        out[key] = val
    return out


def resolve_router(
    model: nn.Module, router: Callable[..., Any] | None, num_router_layers: int, forward_fn: ForwardFn | None
) -> Any:
    """``router`` checked, or the default truncated router of ``model``."""
    if router is None:
        return create_truncated_router(model, num_router_layers, forward_fn=forward_fn)
    if not callable(router):
        raise TypeError(f"router must be a TruncatedRouter or a callable returning logits, got {type(router)}")
    return router


def set_router(owner: nn.Module, router: Any) -> None:
    """``owner.router = router``: a :class:`TruncatedRouter` (which owns no parameters) as a submodule, any other
    router by plain reference, so that its parameters are never counted twice (nor form a module cycle)."""
    if isinstance(router, TruncatedRouter):
        owner.router = router  # registers no parameters of its own
    else:
        object.__setattr__(owner, "router", router)  # plain reference: no duplicate parameters, no cycles


def router_logits(router: Callable[..., Any], input_ids: Tensor, attention_mask: Tensor | None, **kw) -> Tensor:
    """(B, T, V) logits of ``router`` on ``input_ids`` (no grad); any other shape is a ``ValueError``."""
    with torch.no_grad():
        if attention_mask is not None:
            kw["attention_mask"] = attention_mask
        out = router(input_ids, **kw)
    logits = logits_of(out, "router")
    if logits.dim() != 3 or logits.shape[:2] != input_ids.shape:
        raise ValueError(
            f"router must return logits of shape (B, T, V) = ({input_ids.shape[0]}, {input_ids.shape[1]}, V), "
            f"got {tuple(logits.shape)}"
        )
    return logits
