"""Hugging Face ``transformers.Trainer`` integration: one line to train with CGGR, checkpoints stay plain HF ones.

Shape legend: B batch, T sequence length, V vocabulary.

What ``apply_cggr(trainer, ...)`` does (the one-liner, in the spirit of ``use_liger_kernel=True``)::

    trainer.model            stays the plain PreTrainedModel: save_model / checkpoints / resume / push_to_hub /
                             AutoModelForCausalLM.from_pretrained work as without cggr
    trainer.compute_loss     training micro-batches with labels go through a CGGRModel around the model the
                             Trainer passes (DDP/compile-wrapped or not); evaluation goes to the Trainer's own
                             loss, so eval_loss is the plain model's
      or, with loss=CGGRLoss(...):
    trainer.compute_loss_func = cggr_loss_func(criterion)   (the model's logits, HF shift, num_items_in_batch)
    trainer callbacks        + CGGRCallback: curriculum step after every optimizer step (not every micro-batch),
                             its state (step, random stream) saved in each checkpoint as cggr_state.pt and
                             restored on resume

What ``Trainer(model=CGGRModel(model, ...))`` does (importing this module, or building a ``CGGRModel`` around a
``PreTrainedModel``, adds it to ``transformers.Trainer``; other models are untouched)::

    train()                      adds a CGGRCallback() when none is among the callbacks (a CGGRModel's curriculum
                                 steps only through one); one passed or added by the user is then the only one

    save_model() / checkpoints   the wrapped model's save_pretrained (config.json, weights without the wrapper's
                                 ``model.`` prefix: AutoModelForCausalLM.from_pretrained loads them) + cggr_state.pt
    train(resume_from_checkpoint) / load_best_model_at_end
                                 the weights into the wrapped model, every one checked (a missing, extra or
                                 misshapen tensor raises; the Trainer's own load, strict=False, would only log it),
                                 and cggr_state.pt into the curriculum

Gradient accumulation: transformers' Trainer passes ``num_items_in_batch`` (the valid targets of all the
micro-batches of one optimizer step); both ``CGGRModel`` and ``CGGRLoss`` then return ``mean over the kept tokens ×
n / N`` (n: this micro-batch's valid targets), which the Trainer does not divide again. Every micro-batch weighs by
its share of the tokens, so accumulation G gives the loss and gradient of one batch G times larger whenever every
micro-batch keeps the same share of its tokens (exactly so at ratio 1, e.g. during warm-up, and in evaluation).
Selection itself is per micro-batch (the Trainer never shows the whole accumulated batch at once).
"""

from __future__ import annotations

import os
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from cggr._calling import logits_of
from cggr._selector import Curriculum
from cggr.integrations import checkpoints
from cggr.integrations.callback import CGGRCallback
from cggr.integrations.checkpoints import (
    CGGR_STATE_NAME,
    curriculum_state,
    install_trainer_support,
    load_curriculum_state,
)
from cggr.loss import CGGRLoss
from cggr.model import CGGRModel


# ---------------------------------------------------------------------------------------------- save / load
def save_pretrained(cggr_model: CGGRModel, save_directory: str | os.PathLike, **kwargs: Any) -> None:
    """See :meth:`cggr.CGGRModel.save_pretrained`."""
    checkpoints.save_pretrained(cggr_model, save_directory, **kwargs)


def from_pretrained(
    pretrained_model_name_or_path: str | os.PathLike,
    *,
    model_class: Any = None,
    model_kwargs: dict[str, Any] | None = None,
    **cggr_kwargs: Any,
) -> CGGRModel:
    """Load the plain model with ``model_class.from_pretrained`` (default ``AutoModelForCausalLM``) and wrap it in
    ``CGGRModel(model, **cggr_kwargs)``; a ``cggr_state.pt`` in the directory restores the curriculum."""
    return checkpoints.from_pretrained(CGGRModel, pretrained_model_name_or_path, model_class=model_class,
                                       model_kwargs=model_kwargs, **cggr_kwargs)


# ---------------------------------------------------------------------------------------------- loss function
def cggr_loss_func(criterion: CGGRLoss, *, causal: bool = True):
    """A ``Trainer(compute_loss_func=...)`` that applies ``criterion`` to the model's logits.

    Args:
        criterion: The :class:`cggr.CGGRLoss` (its ``ignore_index`` must be the labels' padding value, -100 for
            HF collators; the Trainer gives a ``compute_loss_func`` no attention mask).
        causal: Shift HF-style (position t predicts label t + 1), as causal-LM models do.

    The returned ``compute_loss_func(outputs, labels, num_items_in_batch=None)`` passes ``num_items_in_batch`` on,
    so the loss is normalised for the whole accumulated batch (the Trainer does not divide a ``compute_loss_func``'s
    loss by the accumulation steps), and under ``Trainer.evaluate`` (no grad) ``criterion`` returns the full loss.
    """
    if not isinstance(criterion, CGGRLoss):
        raise TypeError(f"criterion must be a CGGRLoss, got {type(criterion).__name__}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")

    def compute_loss_func(outputs: Any, labels: Tensor | None, num_items_in_batch: int | Tensor | None = None):
        if labels is None:
            raise ValueError("cggr_loss_func: the batch has no labels (the Trainer passed labels=None)")
        logits = logits_of(outputs)  # (B, T, V)
        if logits.shape[:-1] != labels.shape:
            raise ValueError(
                f"logits of shape {tuple(logits.shape)} do not match labels of shape {tuple(labels.shape)}"
            )
        # the shift pads the targets instead of slicing the logits: logits[:, :-1] would be copied by the reshape
        targets = F.pad(labels[:, 1:], (0, 1), value=criterion.ignore_index) if causal else labels  # (B, T)
        return criterion(logits, targets, num_items_in_batch=num_items_in_batch)

    return compute_loss_func


# ---------------------------------------------------------------------------------------------- one-liner
def apply_cggr(trainer: Any, *, loss: CGGRLoss | None = None, **cggr_model_kwargs: Any) -> CGGRModel | CGGRLoss:
    """Train a ``transformers.Trainer``'s model with CGGR; returns the installed :class:`cggr.CGGRModel` (batch
    split, the default) or ``loss`` (token-level selective loss).

    Args:
        trainer: A ``transformers.Trainer`` built with the plain model (``Trainer(model=model, ...)``).
        loss: A :class:`cggr.CGGRLoss`: becomes the Trainer's ``compute_loss_func`` (:func:`cggr_loss_func`).
        **cggr_model_kwargs: Without ``loss``: arguments of :class:`cggr.CGGRModel` (``min_tokens_ratio``,
            ``warmup_steps``, ``num_router_layers``, ``selection``, ``token_ratio``, ...).

    Training micro-batches with labels go through the CGGR module, evaluation through the Trainer's own loss
    (``CGGRModel``) or the full loss (``CGGRLoss`` under no grad), so ``evaluate()`` reports the plain model's
    loss. A :class:`CGGRCallback` steps the curriculum once per optimizer step and saves it with each checkpoint.
    The Trainer's model is left as it is: ``save_model()`` writes a checkpoint that
    ``AutoModelForCausalLM.from_pretrained`` loads.

    Raises:
        TypeError: ``trainer`` is not a Trainer, or its model is already a CGGR module.
        ValueError: The Trainer has label smoothing, a ``compute_loss_func`` or a ``CGGRCallback`` already (each
            would bypass or duplicate the CGGR loss or curriculum).
    """
    from transformers import Trainer

    if not isinstance(trainer, Trainer):
        raise TypeError(f"trainer must be a transformers.Trainer, got {type(trainer).__name__}")
    if isinstance(trainer.model, Curriculum):
        raise TypeError(
            "apply_cggr wraps the Trainer's plain model itself; build the Trainer with the model, not a "
            f"{type(trainer.model).__name__} (or keep Trainer(model=CGGRModel(...)): its train() adds a CGGRCallback)"
        )
    if any(isinstance(cb, CGGRCallback) for cb in trainer.callback_handler.callbacks):
        raise ValueError("the Trainer already has a CGGRCallback (apply_cggr applied twice, or one passed in "
                         "callbacks=): apply_cggr adds its own")
    if trainer.label_smoother is not None:  # the Trainer would compute its own smoothed loss, bypassing CGGR
        raise ValueError(f"apply_cggr does not support label smoothing (label_smoothing_factor="
                         f"{trainer.args.label_smoothing_factor}); set it to 0")
    if trainer.compute_loss_func is not None:  # it would replace (loss=) or bypass (CGGRModel) the CGGR loss
        raise ValueError("apply_cggr: the Trainer already has a compute_loss_func")
    if loss is not None:
        if cggr_model_kwargs:
            raise TypeError(f"apply_cggr(loss=...) takes no CGGRModel arguments, got {sorted(cggr_model_kwargs)}")
        trainer.compute_loss_func = cggr_loss_func(loss, causal=not _is_masked(trainer.model))
        trainer.add_callback(CGGRCallback(loss))
        return loss

    cggr_model = CGGRModel(trainer.model, **cggr_model_kwargs)
    original = trainer.compute_loss  # bound: a Trainer subclass's own compute_loss stays in charge

    def compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training and inputs.get("labels") is not None:
            if trainer.compute_loss_func is not None or trainer.label_smoother is not None:
                raise ValueError("apply_cggr: a compute_loss_func or label smoothing was set after apply_cggr; "
                                 "the CGGRModel loss cannot be combined with them")
            # the model the Trainer passes (DDP/compile-wrapped or not) does the forward, so its hooks run
            if cggr_model._modules["model"] is not model:
                cggr_model._modules["model"] = model
            cggr_model.training = True
            model = cggr_model  # returns a CGGROutput; the Trainer reads outputs[0] and scales as for any model
        return original(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    trainer.compute_loss = compute_loss
    trainer.add_callback(CGGRCallback(cggr_model))
    return cggr_model


def _is_masked(model: nn.Module) -> bool:
    from cggr.model import is_masked_lm

    return is_masked_lm(model)


install_trainer_support(model_class=CGGRModel, callback_class=CGGRCallback)

__all__ = [
    "CGGR_STATE_NAME",
    "CGGRCallback",
    "apply_cggr",
    "cggr_loss_func",
    "curriculum_state",
    "from_pretrained",
    "load_curriculum_state",
    "save_pretrained",
]
