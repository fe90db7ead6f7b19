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

What ``Trainer(model=CGGRModel(model, ...), callbacks=[CGGRCallback()])`` does (importing this module, or building a
``CGGRModel`` around a ``PreTrainedModel``, adds it to ``transformers.Trainer``; other models are untouched)::

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

import functools
import json
import os
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import TrainerCallback

from cggr._calling import logits_of
from cggr._selector import Curriculum
from cggr.loss import CGGRLoss
from cggr.model import CGGRModel

#: File written next to the model's weights: the curriculum state of each CGGR module (step, random stream).
CGGR_STATE_NAME = "cggr_state.pt"


# ---------------------------------------------------------------------------------------------- curriculum state
def curriculum_state(module: Curriculum) -> dict[str, Tensor]:
    """The curriculum's own buffers (``step_count``, ``rng_counter``, ``rng_seed``) on the CPU, nothing else."""
    return {name: buf.detach().cpu().clone() for name, buf in module.named_buffers(recurse=False)}


def load_curriculum_state(module: Curriculum, state: dict[str, Tensor]) -> None:
    """Restore :func:`curriculum_state` into ``module`` (through ``load_state_dict``, so its hooks run)."""
    own = curriculum_state(module)
    if set(state) != set(own):
        raise ValueError(f"curriculum state has keys {sorted(state)}, expected {sorted(own)}")
    # strict=False: only these buffers are loaded; the wrapped model's weights are not in the dict on purpose
    result = module.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"unexpected curriculum keys {result.unexpected_keys}")


def _saved_states(saved: Any, path: str) -> tuple[list[dict[str, Tensor]], list[str] | None]:
    """The curriculum states in a ``cggr_state.pt`` and their classes (``None``: not recorded): the file of
    :func:`save_pretrained` (one module's :func:`curriculum_state`) or of :class:`CGGRCallback` (``global_step``,
    ``modules``, ``classes``)."""
    if isinstance(saved, dict) and "modules" in saved:
        modules = saved["modules"]
        classes = saved.get("classes")
        if not isinstance(modules, list) or (classes is not None and len(classes) != len(modules)):
            raise ValueError(f"{path} is not a cggr_state.pt: 'modules' must be a list, one class name each")
        return modules, classes
    if isinstance(saved, dict) and all(isinstance(v, Tensor) for v in saved.values()):
        return [saved], None
    raise ValueError(f"{path} is not a cggr_state.pt (got {type(saved).__name__})")


def _read_state(path: str) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


def _load_saved_states(modules: list[Curriculum], saved: Any, path: str) -> None:
    """Load ``saved`` (read from the ``cggr_state.pt`` at ``path``) into ``modules`` (in order; the same count and,
    where the file records them, the same classes)."""
    states, classes = _saved_states(saved, path)
    if len(states) != len(modules):
        raise ValueError(f"{path} holds {len(states)} CGGR curricula, expected {len(modules)} "
                         f"({', '.join(type(m).__name__ for m in modules)})")
    if classes is not None:
        own = [type(m).__name__ for m in modules]
        if list(classes) != own:
            raise ValueError(f"{path} holds the curricula of {list(classes)}, expected {own}")
    for module, state in zip(modules, states, strict=True):
        load_curriculum_state(module, state)


def _set_step(module: Curriculum, step: int) -> None:
    state = curriculum_state(module)
    state["step_count"] = torch.tensor(step, dtype=state["step_count"].dtype)
    load_curriculum_state(module, state)


def _step_of(module: Curriculum) -> int:
    return int(module.step_count)


# ---------------------------------------------------------------------------------------------- save / load
def save_pretrained(cggr_model: CGGRModel, save_directory: str | os.PathLike, **kwargs: Any) -> None:
    """See :meth:`cggr.CGGRModel.save_pretrained`."""
    from cggr.router import unwrap_model

    inner = unwrap_model(cggr_model.model)
    if not callable(getattr(inner, "save_pretrained", None)):
        raise TypeError(
            f"save_pretrained needs a wrapped model with save_pretrained (a transformers PreTrainedModel), got "
            f"{type(inner).__name__}; save cggr_model.model.state_dict() and cggr_model's curriculum instead"
        )
    inner.save_pretrained(save_directory, **kwargs)
    if kwargs.get("is_main_process", True):
        torch.save(curriculum_state(cggr_model), os.path.join(save_directory, CGGR_STATE_NAME))


def from_pretrained(
    pretrained_model_name_or_path: str | os.PathLike,
    *,
    model_class: Any = None,
    model_kwargs: dict[str, Any] | None = None,
    **cggr_kwargs: Any,
) -> CGGRModel:
    """Load the plain model with ``model_class.from_pretrained`` (default ``AutoModelForCausalLM``) and wrap it in
    ``CGGRModel(model, **cggr_kwargs)``; a ``cggr_state.pt`` in the directory restores the curriculum."""
    if model_class is None:
        from transformers import AutoModelForCausalLM

        model_class = AutoModelForCausalLM
    model = model_class.from_pretrained(pretrained_model_name_or_path, **(model_kwargs or {}))
    cggr_model = CGGRModel(model, **cggr_kwargs)
    path = os.path.join(os.fspath(pretrained_model_name_or_path), CGGR_STATE_NAME)
    if os.path.isfile(path):  # save_pretrained's file, or a Trainer checkpoint's (CGGRCallback: one module)
        _load_saved_states([cggr_model], _read_state(path), path)
    return cggr_model


# ---------------------------------------------------------------------------------------------- callback
class CGGRCallback(TrainerCallback):
    """Advance CGGR curricula once per optimizer step and carry them through Trainer checkpoints.

    Args:
        *modules: The :class:`cggr.CGGRModel` / :class:`cggr.CGGRLoss` / :class:`cggr.CGGRScorer` instances to
            step. None given: every one found in the Trainer's model at ``on_train_begin`` (e.g.
            ``Trainer(model=CGGRModel(...))``).

    ``on_step_end`` (the Trainer calls it after each optimizer step, not after each accumulated micro-batch) calls
    ``step()`` on each module. ``on_save`` writes the modules' curriculum state to ``cggr_state.pt`` inside the
    checkpoint just written (``<output_dir>/checkpoint-<step>``). ``on_train_begin`` of a resumed run
    (``global_step > 0``) loads it back from the checkpoint the Trainer resumed from (``train(resume_from_checkpoint=
    path)``, wherever it lies), ``args.resume_from_checkpoint`` or ``<output_dir>/checkpoint-<step>``; without that
    file the step is set to ``global_step`` (the schedule is exact; the random stream of the drawing selections,
    ``'random'``, ``'stratified'``, ``'sampled'``, ``'importance'``, continues from where the module is, with a
    warning).
    """

    def __init__(self, *modules: Curriculum) -> None:
        for i, module in enumerate(modules):
            if not isinstance(module, Curriculum):
                raise TypeError(
                    f"CGGRCallback modules[{i}] must be a CGGRModel, CGGRLoss or CGGRScorer, "
                    f"got {type(module).__name__}"
                )
        self.modules: list[Curriculum] = list(modules)
        #: The checkpoint ``Trainer._load_from_checkpoint`` loaded (set by the Trainer support of this module).
        self.resumed_from: str | None = None

    def _discover(self, model: nn.Module | None) -> None:
        if self.modules or model is None:
            return
        self.modules = [m for m in model.modules() if isinstance(m, Curriculum)]
        if not self.modules:
            warnings.warn(
                f"CGGRCallback: no CGGR module given and none found in {type(model).__name__}; nothing to step",
                stacklevel=2,
            )

    def _checkpoint_dirs(self, args: Any, state: Any) -> list[str]:
        dirs = [self.resumed_from] if self.resumed_from is not None else []
        resume = getattr(args, "resume_from_checkpoint", None)
        if isinstance(resume, str | os.PathLike):
            dirs.append(os.fspath(resume))
        dirs.append(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))
        return dirs

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._discover(model)
        if state.global_step <= 0 or not self.modules:
            return
        for directory in self._checkpoint_dirs(args, state):
            path = os.path.join(directory, CGGR_STATE_NAME)
            if os.path.isfile(path):
                saved = _read_state(path)
                if isinstance(saved, dict) and int(saved.get("global_step", -1)) == state.global_step:
                    _load_saved_states(self.modules, saved, path)
                    return
        for module in self.modules:
            if _step_of(module) != state.global_step:
                warnings.warn(
                    f"CGGRCallback: resumed at step {state.global_step} without {CGGR_STATE_NAME}; "
                    f"{type(module).__name__}'s curriculum moves from step {_step_of(module)} to {state.global_step} "
                    "(its random stream is not restored)",
                    stacklevel=2,
                )
                _set_step(module, state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        for module in self.modules:
            module.step()

    def on_save(self, args, state, control, **kwargs):
        if not self.modules or not state.is_world_process_zero:
            return
        directory = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(directory):
            torch.save(
                {"global_step": state.global_step, "modules": [curriculum_state(m) for m in self.modules],
                 "classes": [type(m).__name__ for m in self.modules]},
                os.path.join(directory, CGGR_STATE_NAME),
            )


# --------------------------------------------------------------------------------------------- Trainer(model=CGGRModel)
# transformers' Trainer saves a model that is not a PreTrainedModel as its bare state_dict (model.safetensors, no
# config.json) and loads checkpoints back with load_state_dict(strict=False). For a CGGRModel around a PreTrainedModel
# the three methods below make save_model()/checkpoints the wrapped model's save_pretrained plus cggr_state.pt, and
# make resume / load_best_model_at_end load such a checkpoint into the wrapped model, every tensor checked. Any other
# model (a plain PreTrainedModel, apply_cggr's, a CGGRModel around a plain PyTorch model) takes the Trainer's own code.
_WEIGHT_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json", "model.safetensors",
                 "pytorch_model.bin")


def _strip_wrappers(module: nn.Module, prefix: str) -> tuple[nn.Module, str]:
    """``module`` without DDP/DataParallel (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers, and the
    state-dict prefix that reaches it."""
    while True:
        if isinstance(module, nn.parallel.DistributedDataParallel | nn.DataParallel):
            module, prefix = module.module, f"{prefix}module."
        elif isinstance(module._modules.get("_orig_mod"), nn.Module) and hasattr(module, "_orig_mod"):
            module, prefix = module._orig_mod, f"{prefix}_orig_mod."
        else:
            return module, prefix


def _wrapped_pretrained(model: nn.Module | None) -> tuple[CGGRModel, nn.Module, str] | None:
    """``(cggr_model, wrapped PreTrainedModel, its key prefix in cggr_model.state_dict())`` when ``model`` (a
    Trainer's model, DDP- or compile-wrapped or not) is a CGGRModel around a transformers PreTrainedModel."""
    from transformers import PreTrainedModel

    if not isinstance(model, nn.Module):
        return None
    root, _ = _strip_wrappers(model, "")
    if not isinstance(root, CGGRModel):
        return None
    inner, prefix = _strip_wrappers(root.model, "model.")
    return (root, inner, prefix) if isinstance(inner, PreTrainedModel) else None


def _engine_loads(trainer: Any) -> bool:
    """DeepSpeed, FSDP and SageMaker MP resume from their own checkpoint files (with the wrapper's keys)."""
    from transformers.utils import is_sagemaker_mp_enabled

    return bool(trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled or is_sagemaker_mp_enabled())


def _inner_state_dict(cggr_model: CGGRModel, state_dict: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The wrapped model's part of a CGGRModel state dict (gathered by FSDP/DeepSpeed), without ``prefix``."""
    own = set(curriculum_state(cggr_model))
    out, other = {}, []
    for key, value in state_dict.items():
        if key.startswith(prefix):
            out[key[len(prefix):]] = value
        elif key not in own:
            other.append(key)
    if other:
        raise ValueError(f"the CGGRModel state dict has keys outside its wrapped model ({prefix!r}) and its "
                         f"curriculum: {sorted(other)}; save_pretrained would drop them")
    return out


def _weight_file(directory: str) -> str | None:
    """The first weight file the Trainer writes that exists in ``directory`` (an index, or a single file)."""
    return next((n for n in _WEIGHT_FILES if os.path.isfile(os.path.join(directory, n))), None)


def _checkpoint_keys(directory: str) -> list[str] | None:
    """The tensor names of the weights in ``directory`` (``None``: no weight file the Trainer writes)."""
    name = _weight_file(directory)
    if name is None:
        return None
    path = os.path.join(directory, name)
    if name.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            return list(json.load(f)["weight_map"])
    if name.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            return list(f.keys())
    return list(torch.load(path, map_location="cpu", weights_only=True))


def _weight_shards(directory: str):
    """Yield the state dict of each weight file in ``directory`` (one at a time: a shard, or the only file)."""
    from safetensors.torch import load_file

    name = _weight_file(directory)
    if name is None:
        return
    if name.endswith(".json"):
        with open(os.path.join(directory, name), encoding="utf-8") as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = [name]
    for file in files:
        full = os.path.join(directory, file)
        yield load_file(full) if file.endswith(".safetensors") else torch.load(full, map_location="cpu",
                                                                               weights_only=True)


def _load_checked(target: nn.Module, directory: str, keys: list[str]) -> None:
    """Copy the checkpoint in ``directory`` into ``target`` (the wrapped model, or the CGGRModel for a checkpoint of
    its own state dict), in place.

    Every tensor of ``target.state_dict()`` must come from the file (except one tied to a loaded tensor, or one the
    model never saves), and every tensor of the file must be one of them; else a ValueError names them. Files in the
    original (converted) layout of models whose weights transformers converts on load (e.g. fused MoE experts) go
    through ``from_pretrained`` and are then copied, under the same checks."""
    own = target.state_dict(keep_vars=True)
    unexpected = sorted(set(keys) - set(own))
    if unexpected and not _converted_layout(target):
        raise ValueError(f"the checkpoint in {directory} has tensors that {type(target).__name__} does not: "
                         f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}; it is not this model's")
    if unexpected:  # e.g. per-expert tensors that this transformers version fuses: its loader converts them
        converted, info = type(target).from_pretrained(directory, config=target.config, output_loading_info=True)
        problems = {k: v for k, v in info.items() if v}
        if problems:
            raise ValueError(f"the checkpoint in {directory} does not load into {type(target).__name__}: {problems}")
        shards = [converted.state_dict()]
    else:
        shards = _weight_shards(directory)
    loaded: set[str] = set()
    for shard in shards:
        result = target.load_state_dict(shard, strict=False)  # a shape mismatch raises here
        if result.unexpected_keys:
            raise ValueError(f"the checkpoint in {directory} has tensors that {type(target).__name__} does not: "
                             f"{sorted(result.unexpected_keys)}")
        loaded.update(shard)
    by_tensor: dict[int, set[str]] = {}
    for key, tensor in own.items():
        by_tensor.setdefault(id(tensor), set()).add(key)
    never_saved = set(getattr(target, "_keys_to_ignore_on_save", None) or ())
    missing = [k for k in own if k not in loaded and k not in never_saved and not by_tensor[id(own[k])] & loaded]
    if missing:
        raise ValueError(f"the checkpoint in {directory} lacks tensors of {type(target).__name__}: "
                         f"{missing[:8]}{' ...' if len(missing) > 8 else ''}; nothing may stay at its old value")


def _converted_layout(model: nn.Module) -> bool:
    """Whether transformers renames or converts this model's tensors between the file and the module."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        return False
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
    except ImportError:  # a transformers without weight conversions
        return False
    return bool(get_model_conversion_mapping(model, add_legacy=False))


def _checkpoint_target(parts: tuple[CGGRModel, nn.Module, str], directory: str
                       ) -> tuple[nn.Module, list[str]] | None:
    """``(module, tensor names)``: the wrapped model for a checkpoint of its save_pretrained (with config.json), the
    CGGRModel for one of its own state dict (written before this support existed); ``None`` without a weight file
    (the Trainer's own loader then says so)."""
    keys = _checkpoint_keys(directory)
    if keys is None:
        return None
    cggr_model, inner, _ = parts
    if set(keys) <= set(cggr_model.state_dict(keep_vars=True)) and not set(keys) <= set(inner.state_dict()):
        return cggr_model, keys
    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise ValueError(f"{directory} holds neither the wrapped model's save_pretrained (no config.json) nor a "
                         f"CGGRModel state dict (tensor names {keys[:4]} ...)")
    return inner, keys


def _trainer_save(original):
    @functools.wraps(original)
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        parts = _wrapped_pretrained(self.model)
        if parts is None:
            return original(self, output_dir, state_dict=state_dict)
        cggr_model, inner, prefix = parts
        if state_dict is not None:  # gathered by FSDP/DeepSpeed/SageMaker from the wrapper
            state_dict = _inner_state_dict(cggr_model, state_dict, prefix)
        model = self.model
        self.model = inner  # the Trainer's own PreTrainedModel branch: save_pretrained, tokenizer, training args
        try:
            original(self, output_dir, state_dict=state_dict)
        finally:
            self.model = model
        if self.args.should_save:
            directory = output_dir if output_dir is not None else self.args.output_dir
            torch.save(curriculum_state(cggr_model), os.path.join(directory, CGGR_STATE_NAME))

    return _save


def _trainer_load_from_checkpoint(original):
    @functools.wraps(original)
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        callbacks = [cb for cb in self.callback_handler.callbacks if isinstance(cb, CGGRCallback)]
        for cb in callbacks:  # on_train_begin restores the curricula from this very checkpoint
            cb.resumed_from = os.fspath(resume_from_checkpoint)
        parts = _wrapped_pretrained(model if model is not None else self.model)
        found = None if parts is None or _engine_loads(self) else _checkpoint_target(parts, resume_from_checkpoint)
        if found is None:
            return original(self, resume_from_checkpoint, model)
        cggr_model = parts[0]
        _load_checked(found[0], resume_from_checkpoint, found[1])
        if found[0] is cggr_model:  # the wrapper's own state dict carried the curriculum
            return
        path = os.path.join(resume_from_checkpoint, CGGR_STATE_NAME)
        if not os.path.isfile(path):
            if not callbacks:  # a CGGRCallback sets the step from global_step and warns
                warnings.warn(f"{resume_from_checkpoint} has no {CGGR_STATE_NAME}: the CGGRModel's curriculum "
                              "(step, random stream) is not restored", stacklevel=2)
            return
        saved = _read_state(path)
        if callbacks and isinstance(saved, dict) and "global_step" in saved:
            return  # a CGGRCallback's file: the callback loads it into its modules at on_train_begin
        modules = [cggr_model] if not (isinstance(saved, dict) and "modules" in saved) else [
            m for m in cggr_model.modules() if isinstance(m, Curriculum)]  # as a CGGRCallback() finds them
        _load_saved_states(modules, saved, path)

    return _load_from_checkpoint


def _trainer_load_best_model(original):
    @functools.wraps(original)
    def _load_best_model(self) -> None:
        parts = _wrapped_pretrained(self.model)
        best = self.state.best_model_checkpoint
        found = None if parts is None or best is None or _engine_loads(self) else _checkpoint_target(parts, best)
        if found is None:
            return original(self)
        _load_checked(found[0], best, found[1])  # the weights only, as the Trainer does for any model

    return _load_best_model


def _install_trainer_support() -> None:
    """Patch ``transformers.Trainer`` (once) so that a CGGRModel around a PreTrainedModel saves and loads as one."""
    try:
        from transformers import Trainer
    except ImportError:  # transformers without its Trainer (e.g. no torch.distributed): nothing to support
        return
    if getattr(Trainer, "_cggr_model_support", False):
        return
    Trainer._save = _trainer_save(Trainer._save)
    Trainer._load_from_checkpoint = _trainer_load_from_checkpoint(Trainer._load_from_checkpoint)
    Trainer._load_best_model = _trainer_load_best_model(Trainer._load_best_model)
    Trainer._cggr_model_support = True


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
            f"{type(trainer.model).__name__} (or keep Trainer(model=CGGRModel(...)) and add CGGRCallback())"
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


_install_trainer_support()

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
