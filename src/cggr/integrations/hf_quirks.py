"""Per-``model_type`` data on how a Hugging Face causal LM turns its final hidden states into logits.

Shape legend: H hidden size, V vocabulary.

Most causal LMs compute ``logits = lm_head(hidden)`` (a ``(V, H)`` weight, sometimes a ``(V,)`` bias, e.g. GPT-J).
A few post-process the logits in their ``*ForCausalLM.forward``; this module records those steps as data so that
:class:`cggr.CGGRModel` can run the fused head (:func:`cggr.functional.linear_cross_entropy`) with one generic
code path::

    logits = softcap · tanh(scale · (hidden @ weight.T + bias) / softcap)     (softcap and scale optional)

The scale is folded into the hidden states and the bias (``scale · (h W^T + b) = (scale · h) W^T + scale · b``).
The bias is read generically from ``get_output_embeddings().bias``. Model types whose head does something
else (e.g. a per-vocabulary scale) are listed in :data:`UNSUPPORTED` and never fused; an unknown model type
whose config carries a logit softcap or scale attribute is refused too, as its meaning is not verified.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from cggr._autocast import autocast_dtype
from cggr.integrations.peft_models import prompt_learning_reason
from cggr.router import unwrap_model

# model_type -> config attribute holding the final-logit soft-capping value (logits = c · tanh(logits / c)).
SOFTCAP_ATTR: dict[str, str] = {
    "gemma2": "final_logit_softcapping",
    "gemma3": "final_logit_softcapping",
    "gemma3_text": "final_logit_softcapping",
    "gemma4": "final_logit_softcapping",
    "gemma4_text": "final_logit_softcapping",
    "mistral_large4": "final_logit_softcapping",
}

# model_type -> (config attribute, True if logits are divided by it, False if multiplied), applied before softcap.
SCALE_ATTR: dict[str, tuple[str, bool]] = {
    "cohere": ("logit_scale", False),
    "cohere2": ("logit_scale", False),
    "cohere2_moe": ("logit_scale", False),
    "granite": ("logits_scaling", True),
    "granite_swa": ("logits_scaling", True),
    "granitemoe": ("logits_scaling", True),
    "granitemoe_swa": ("logits_scaling", True),
    "granitemoehybrid": ("logits_scaling", True),
    "granitemoeshared": ("logits_scaling", True),
    "falcon_h1": ("lm_head_multiplier", False),
    "hyperclovax": ("logits_scaling", False),
}

# model_type -> why its head cannot be expressed as (weight, bias, scale, softcap).
UNSUPPORTED: dict[str, str] = {
    "dory": "a learned per-vocabulary logit scale",
    "minicpm3": "hidden states are rescaled inside the causal-LM forward",
    "gemma3n": "per-layer/altup outputs and its own softcap handling in the causal-LM forward",
    "gemma3n_text": "per-layer/altup outputs and its own softcap handling in the causal-LM forward",
    "inkling2": "its own softcap module in the causal-LM forward",
    "muse_glimmer": "an output multiplier combined with softcapping in the causal-LM forward",
    "diffusion_gemma": "not a next-token causal LM head",
}

# Config attributes that signal logit post-processing; an unknown model type carrying one is refused.
_SUSPECT_ATTRS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "lm_head_multiplier",
                  "output_multiplier")


@dataclass(frozen=True)
class HeadSpec:
    """How to compute the logits of a causal LM from its final hidden states.

    Attributes:
        weight: (V, H) head weight (the ``nn.Parameter`` itself, so gradients reach it).
        bias: (V,) head bias or ``None``.
        softcap: Final-logit soft-capping value or ``None``.
        logit_scale: Multiplier applied to the raw logits before the softcap, or ``None`` (= 1).
    """

    weight: Tensor
    bias: Tensor | None
    softcap: float | None
    logit_scale: float | None


def head_operands(hidden: Tensor, spec: HeadSpec) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(hidden, weight, bias)`` for :func:`cggr.functional.linear_cross_entropy` with ``spec.softcap``.

    Under autocast they are cast to the autocast dtype (the head GEMM runs in it, as ``nn.Linear`` would: float64
    stays float64; call the loss with autocast disabled); the logit scale is folded into the hidden states and
    the bias.

    Args:
        hidden: (..., H) final hidden states (after the model's final norm).
        spec: The head (:func:`head_spec`).
    """
    weight, bias = spec.weight, spec.bias
    dtype = autocast_dtype(hidden)
    if dtype is not None:
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    if spec.logit_scale is not None:  # scale · (h W^T + b) = (scale · h) W^T + scale · b
        hidden = hidden * spec.logit_scale
        bias = bias * spec.logit_scale if bias is not None else None
    return hidden, weight, bias


def _text_config(config: Any) -> Any:
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def _number(config: Any, attr: str, model_type: str) -> float | None:
    val = getattr(_text_config(config), attr, None)
    if val is None:
        val = getattr(config, attr, None)
    if val is None:
        return None
    if isinstance(val, bool) or not isinstance(val, (int, float)):
        raise ValueError(f"config.{attr} of model_type {model_type!r} must be a number, got {val!r}")
    return float(val)


def head_spec(model: nn.Module) -> tuple[HeadSpec | None, str]:
    """The fused-head description of a Hugging Face causal LM, or ``None`` and the reason it has none.

    Args:
        model: An (unwrapped) Hugging Face ``*ForCausalLM``-style model.

    Returns:
        ``(spec, "")`` when the head is a plain linear layer plus the quirks recorded here, else
        ``(None, reason)``.
    """
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    weight = getattr(head, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        return None, f"{type(model).__name__}.get_output_embeddings() returned no module with a (V, H) weight"
    if getattr(type(head), "forward", None) is not nn.Linear.forward:
        return None, f"the output embedding {type(head).__name__} is not a plain nn.Linear"
    bias = getattr(head, "bias", None)
    if bias is not None and (not isinstance(bias, Tensor) or tuple(bias.shape) != (weight.shape[0],)):
        return None, f"the output embedding's bias has shape {getattr(bias, 'shape', None)}, expected (V,)"
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type in UNSUPPORTED:
        return None, f"model_type {model_type!r} has {UNSUPPORTED[model_type]}"
    softcap = scale = None
    if model_type in SOFTCAP_ATTR:
        softcap = _number(config, SOFTCAP_ATTR[model_type], model_type)
    if model_type in SCALE_ATTR:
        attr, divide = SCALE_ATTR[model_type]
        val = _number(config, attr, model_type)
        if val is not None:
            if val == 0:
                return None, f"config.{attr} of model_type {model_type!r} is 0"
            scale = 1.0 / val if divide else val
    if model_type not in SOFTCAP_ATTR and model_type not in SCALE_ATTR and config is not None:
        text = _text_config(config)
        for attr in _SUSPECT_ATTRS:
            if getattr(text, attr, None) is not None or getattr(config, attr, None) is not None:
                return None, (f"model_type {model_type!r} has config.{attr} but no verified entry in "
                              "cggr.integrations.hf_quirks")
    if softcap is not None and softcap <= 0:
        return None, f"config.{SOFTCAP_ATTR[model_type]} of model_type {model_type!r} is {softcap}, expected > 0"
    if scale == 1.0:
        scale = None
    return HeadSpec(weight=weight, bias=bias, softcap=softcap, logit_scale=scale), ""


def _is_fsdp(module: nn.Module) -> bool:
    """FSDP1 wrapper or an FSDP2 ``fully_shard`` module (its root hooks gather the parameters)."""
    if type(module).__name__ == "FullyShardedDataParallel":
        return True
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(module, FSDPModule)


def wrapper_reason(model: nn.Module) -> str:
    """Why the base of ``model`` cannot be called directly, or ``""``: a wrapper on the way must see the call.

    DDP/DataParallel reduce gradients through hooks of their own forward; an FSDP module gathers its sharded
    parameters (the head weight among them) only around its own forward; a ``torch.compile``'d module would run
    uncompiled. Each reason names the arrangement that keeps the fused head: the wrapper around the CGGRModel. A
    PEFT model's LoRA layers sit inside the base model (calling it runs them), but a prompt-learning adapter lives
    in ``PeftModel.forward`` (:func:`cggr.integrations.peft_models.prompt_learning_reason`).
    """
    reason = prompt_learning_reason(model)
    if reason:
        return reason
    wrapped = model
    for _ in range(8):  # wrappers must see the call: the base model cannot be called past them
        if isinstance(wrapped, nn.parallel.DistributedDataParallel | nn.DataParallel):
            return (f"the model is wrapped in {type(wrapped).__name__} (its hooks would be bypassed; wrap the "
                    f"CGGRModel instead: {type(wrapped).__name__}(CGGRModel(model)))")
        if _is_fsdp(wrapped):
            return (f"the model is an FSDP module ({type(wrapped).__name__}: its hooks gather the sharded head "
                    "weight only around its own forward; shard the CGGRModel as the root instead: "
                    "fully_shard(CGGRModel(model)) after fully_shard on each layer)")
        if isinstance(getattr(wrapped, "_orig_mod", None), nn.Module):
            return (
                "the model is torch.compile'd (calling its base would bypass compilation; compile the "
                "CGGRModel instead)"
            )
        inner = getattr(wrapped, "module", None)
        if not isinstance(inner, nn.Module):
            break
        wrapped = inner
    return ""


def fused_head_parts(model: nn.Module) -> tuple[tuple[nn.Module, HeadSpec] | None, str]:
    """The base model (returning ``last_hidden_state`` after the final norm) and the head of a causal LM.

    The base is ``getattr(model, model.base_model_prefix)`` (else ``model.get_decoder()``) of the unwrapped
    model. Models inside DDP/FSDP/DataParallel or ``torch.compile`` are refused: calling their base directly
    would bypass the wrapper's hooks or the compilation.

    Args:
        model: The model as given to :class:`cggr.CGGRModel` (possibly PEFT-wrapped).

    Returns:
        ``((base, spec), "")`` or ``(None, reason)``.
    """
    reason = wrapper_reason(model)
    if reason:
        return None, reason
    model = unwrap_model(model)
    prefix = getattr(model, "base_model_prefix", "")
    base = getattr(model, prefix, None) if isinstance(prefix, str) and prefix else None
    if not isinstance(base, nn.Module) or base is model:
        get_decoder = getattr(model, "get_decoder", None)
        base = get_decoder() if callable(get_decoder) else None
    if not isinstance(base, nn.Module) or base is model:
        return None, f"no base model found (base_model_prefix={prefix!r}, get_decoder())"
    spec, reason = head_spec(model)
    if spec is None:
        return None, reason
    return (base, spec), ""


__all__ = [
    "SCALE_ATTR",
    "SOFTCAP_ATTR",
    "UNSUPPORTED",
    "HeadSpec",
    "fused_head_parts",
    "head_operands",
    "head_spec",
    "wrapper_reason",
]
