"""How ``CGGRModel``, ``CGGRScorer`` and ``TruncatedRouter`` call a model and read its logits.

Shape legend: B batch, T sequence length, V vocabulary.

Two kinds of model are called without an adapter:

* Hugging Face style, ``forward(input_ids=None, attention_mask=None, ...)`` (a parameter named ``input_ids``):
  called as ``model(input_ids=ids, attention_mask=mask, **kwargs)``.
* Plain PyTorch style (nanoGPT, torchtitan, litgpt: ``forward(idx)``, ``forward(tokens)``): called as
  ``model(ids, **kwargs)``; ``attention_mask`` is passed as a keyword only if ``forward`` has a parameter of
  that name, and a mask given to a model that takes none is a ``ValueError`` (it is never dropped silently).

Anything else goes through a ``forward_fn(model, input_ids, attention_mask, **kwargs)`` adapter. The output (of
the model or of ``forward_fn``) may be the logits tensor, a tuple or list whose first element is the logits
(``return_dict=False``, nanoGPT's ``(logits, loss)``), or an object with a ``.logits`` tensor.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

#: ``forward_fn(model, input_ids, attention_mask, **kwargs) -> logits or an output holding them``.
ForwardFn = Callable[..., Any]


def check_forward_fn(forward_fn: Any) -> ForwardFn | None:
    if forward_fn is not None and not callable(forward_fn):
        raise TypeError(
            f"forward_fn must be None or a callable forward_fn(model, input_ids, attention_mask, **kwargs), "
            f"got {type(forward_fn).__name__}"
        )
    return forward_fn


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP/FSDP (``.module``), ``torch.compile`` (``._orig_mod``) and PEFT (``get_base_model()``) wrappers."""
    seen: set[int] = set()
    while id(model) not in seen:
        seen.add(id(model))
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        elif callable(getattr(model, "get_base_model", None)) and type(model).__name__.startswith("Peft"):
            model = model.get_base_model()
        elif type(model).__name__ == "FullyShardedDataParallel" and isinstance(
            getattr(model, "module", None), nn.Module
        ):
            model = model.module
    return model


def call_style(model: nn.Module) -> str:
    """How :func:`call_model` calls ``model`` without an adapter, from the unwrapped model's ``forward`` signature
    (read once, at construction: DDP/compile wrappers take ``*args, **kwargs``).

    Returns ``'hf'`` (a parameter named ``input_ids``), ``'positional_mask'`` (``forward(idx, attention_mask)``)
    or ``'positional'`` (``forward(idx)``).
    """
    try:
        params = inspect.signature(unwrap_model(model).forward).parameters
    except (TypeError, ValueError):  # no introspectable signature: the Hugging Face convention
        return "hf"
    if "input_ids" in params:
        return "hf"
    return "positional_mask" if "attention_mask" in params else "positional"


def call_model(
    model: nn.Module,
    style: str,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    forward_fn: ForwardFn | None,
    **kwargs: Any,
) -> Any:
    """The model's output for ``input_ids`` (B, T): through ``forward_fn`` if given, else in ``style``."""
    if forward_fn is not None:
        return forward_fn(model, input_ids, attention_mask, **kwargs)
    if style == "hf":
        return model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    if style == "positional_mask":
        return model(input_ids, attention_mask=attention_mask, **kwargs)
    if attention_mask is not None:
        raise ValueError(
            f"attention_mask was given but {type(model).__name__}.forward takes no attention_mask (it is called as "
            "model(input_ids)); pass forward_fn=lambda model, input_ids, attention_mask, **kw: ... to say how the "
            "mask reaches the model, or call without attention_mask if the model needs none"
        )
    return model(input_ids, **kwargs)


def logits_of(out: Any, what: str = "model") -> Tensor:
    """The logits in a model output: the tensor itself, ``out[0]`` of a tuple/list, or ``out.logits``."""
    if isinstance(out, Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(out, tuple | list) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(
        f"{what} returned {type(out).__name__}, expected the logits tensor (B, T, V), a tuple whose first element "
        "is the logits, or an object with a .logits tensor; pass forward_fn= to adapt a model with another output"
    )


__all__ = ["ForwardFn", "call_model", "call_style", "check_forward_fn", "logits_of"]
