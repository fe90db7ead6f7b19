"""PEFT (``peft.PeftModel``) models inside :class:`cggr.CGGRModel`: what is saved, what is loaded, what is refused.

A LoRA model from ``get_peft_model(model, LoraConfig(...))`` injects its adapter layers into the base model in
place, so the router (the base model's first layers, :mod:`cggr.router`) and the fused head (the base model's
body, :mod:`cggr._fused_head`) run the adapted layers although they call the base model past the ``PeftModel``.
What must go through the ``PeftModel`` itself:

* saving: ``PeftModel.save_pretrained`` writes the adapters (``adapter_config.json`` and ``adapter_model.*``), not
  the frozen base weights; :func:`cggr.integrations.checkpoints.save_pretrained` and the Trainer patches there call
  it (:func:`peft_model_of` finds it under DDP/``torch.compile`` wrappers);
* loading: ``PeftModel.from_pretrained(base, path, is_trainable=True)`` (:func:`load_peft_model`), and a Trainer
  checkpoint through the Trainer's own PEFT branch, after :func:`check_adapter_checkpoint` made sure that the
  files hold exactly this model's adapter tensors (``PeftModel.load_adapter`` loads with ``strict=False``);
* the forward of prompt-learning methods (prompt, prefix, p-tuning): ``PeftModel.forward`` adds virtual tokens or
  a prefix cache, so calling the base model directly would train without them (:func:`prompt_learning_reason`).

``peft`` is imported only inside functions that load or save adapters; :func:`is_peft_model` never imports it.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from torch import nn

#: Files ``PeftModel.save_pretrained`` writes per adapter.
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")


def is_peft_model(model: Any) -> bool:
    """Whether ``model`` is a ``peft.PeftModel`` (any task subclass).

    Looked up in ``sys.modules``, never imported: a PeftModel exists only once ``peft`` is imported, and this runs
    at every ``CGGRModel`` forward (the fused head's checks), where importing ``peft`` (or failing to, without it
    installed: a search of the import path each time) would be work for nothing."""
    peft = sys.modules.get("peft")
    peft_model = getattr(peft, "PeftModel", None) if peft is not None else None
    return isinstance(peft_model, type) and isinstance(model, peft_model)


def peft_model_of(model: nn.Module) -> nn.Module | None:
    """The ``PeftModel`` that ``model`` is, or holds under DDP/DataParallel (``.module``) and ``torch.compile``
    (``._orig_mod``) wrappers; ``None`` when there is none."""
    for _ in range(8):
        if is_peft_model(model):
            return model
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        elif isinstance(model._modules.get("_orig_mod"), nn.Module):
            model = model._orig_mod
        else:
            return None
    return None


def prompt_learning_reason(model: nn.Module) -> str:
    """Why the base of the PEFT model in ``model`` must not be called directly, or ``""``: an active
    prompt-learning adapter (prompt tuning, prefix tuning, p-tuning) exists only in ``PeftModel.forward``."""
    peft_model = peft_model_of(model)
    if peft_model is None:
        return ""
    configs = getattr(peft_model, "peft_config", {})
    for name in getattr(peft_model, "active_adapters", None) or ():
        config = configs.get(name)
        if getattr(config, "is_prompt_learning", False):
            kind = getattr(getattr(config, "peft_type", None), "value", type(config).__name__)
            return (f"the PEFT adapter {name!r} ({kind}) is a prompt-learning method: its virtual tokens or prefix "
                    f"are added by {type(peft_model).__name__}.forward, which calling the base model directly would "
                    "skip")
    return ""


def adapter_files(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds a ``PeftModel.save_pretrained`` adapter (its config and weights)."""
    directory = os.fspath(directory)
    return os.path.isfile(os.path.join(directory, ADAPTER_CONFIG_NAME)) and any(
        os.path.isfile(os.path.join(directory, name)) for name in ADAPTER_WEIGHT_NAMES)


def _saved_keys(directory: str) -> list[str]:
    from peft.utils.save_and_load import load_peft_weights

    return list(load_peft_weights(directory, device="cpu"))


def check_adapter_checkpoint(peft_model: nn.Module, directory: str | os.PathLike, adapter_name: str) -> None:
    """Raise a ValueError unless the adapter weights in ``directory`` are exactly the tensors of ``peft_model``'s
    adapter ``adapter_name`` (as ``PeftModel.save_pretrained`` names them).

    ``PeftModel.load_adapter`` (what the Trainer resumes with) loads with ``strict=False`` and the Trainer discards
    its report, so an adapter of other target modules would load partly and leave the rest at its old value.
    Embedding layers that ``save_pretrained(save_embedding_layers=True)`` added may be present or not."""
    from peft.utils.save_and_load import get_peft_model_state_dict

    directory = os.fspath(directory)
    if adapter_name not in getattr(peft_model, "peft_config", {}):
        return  # a new adapter: load_adapter creates it from the file's own config
    want = set(get_peft_model_state_dict(peft_model, adapter_name=adapter_name))
    allowed = want | set(get_peft_model_state_dict(peft_model, adapter_name=adapter_name,
                                                   save_embedding_layers=True))
    have = set(_saved_keys(directory))
    missing, unexpected = sorted(want - have), sorted(have - allowed)
    if missing or unexpected:
        raise ValueError(
            f"the adapter in {directory} does not match the PEFT model's adapter {adapter_name!r}: "
            f"missing {missing[:6]}{' ...' if len(missing) > 6 else ''}, "
            f"unexpected {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''} (another LoraConfig or base model?); "
            "nothing may stay at its old value")


def check_adapter_checkpoints(peft_model: nn.Module, directory: str | os.PathLike) -> None:
    """:func:`check_adapter_checkpoint` for every adapter the Trainer's PEFT branch loads from ``directory``: the
    one at its top (into the active adapter, or ``'default'`` when there are adapter subdirectories) and each
    subdirectory's (into the adapter of its name)."""
    directory = os.fspath(directory)
    subdirs = [name for name in sorted(os.listdir(directory)) if adapter_files(os.path.join(directory, name))]
    if adapter_files(directory):
        active = (getattr(peft_model, "active_adapters", None) or ["default"])[0]
        check_adapter_checkpoint(peft_model, directory, "default" if subdirs else active)
    for name in subdirs:
        check_adapter_checkpoint(peft_model, os.path.join(directory, name), name)


def load_peft_model(path: str | os.PathLike, base_model: nn.Module | None, model_kwargs: dict[str, Any]) -> nn.Module:
    """The ``PeftModel`` saved in ``path``: ``PeftModel.from_pretrained(base_model, path, ...)``, or without
    ``base_model`` ``AutoPeftModelForCausalLM.from_pretrained(path, ...)`` (the base model named in
    ``adapter_config.json``). ``is_trainable`` defaults to True (PEFT's own default, False, freezes the adapters:
    a CGGRModel is for training); ``model_kwargs`` go to the ``from_pretrained`` call."""
    try:
        from peft import AutoPeftModelForCausalLM, PeftModel
    except ImportError as err:
        raise ImportError(f"{os.fspath(path)} holds a PEFT adapter ({ADAPTER_CONFIG_NAME}); loading it needs the "
                          "peft package (pip install peft)") from err
    kwargs = {"is_trainable": True, **model_kwargs}
    if base_model is None:
        return AutoPeftModelForCausalLM.from_pretrained(os.fspath(path), **kwargs)
    if not isinstance(base_model, nn.Module):
        raise TypeError(f"base_model must be a torch.nn.Module (the model the adapter was trained on), got "
                        f"{type(base_model).__name__}")
    if is_peft_model(base_model):
        raise ValueError(f"base_model is already a {type(base_model).__name__}; pass the plain model that "
                         "get_peft_model wrapped (PeftModel.from_pretrained adds the saved adapter to it)")
    return PeftModel.from_pretrained(base_model, os.fspath(path), **kwargs)


__all__ = ["ADAPTER_CONFIG_NAME", "ADAPTER_WEIGHT_NAMES", "adapter_files", "check_adapter_checkpoint",
           "check_adapter_checkpoints", "is_peft_model", "load_peft_model", "peft_model_of", "prompt_learning_reason"]
