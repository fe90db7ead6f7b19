"""Checkpoints of CGGR modules: the curriculum state file (``cggr_state.pt``) and the ``transformers.Trainer``
support that saves ``Trainer(model=CGGRModel(...))`` as the wrapped model's plain checkpoint, resumes from one, and
gives it a ``CGGRCallback`` when none was passed (its curriculum steps only through one).

This module imports neither :mod:`cggr.model` nor :mod:`cggr.integrations.transformers`: the classes it acts on are
registered through :func:`install_trainer_support` (by :class:`cggr.CGGRModel` when it wraps a transformers model,
and by the integration module), so both can install it without an import cycle. ``transformers`` itself is imported
only inside functions.
"""

from __future__ import annotations

import functools
import json
import os
import warnings
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from cggr._calling import unwrap_model
from cggr._selector import Curriculum
from cggr.integrations.peft_models import adapter_files, check_adapter_checkpoints, is_peft_model, peft_model_of

#: Classes whose instances the Trainer support treats as a CGGRModel / as a CGGRCallback (see
#: :func:`install_trainer_support`).
_MODEL_CLASSES: list[type] = []
_CALLBACK_CLASSES: list[type] = []

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


def saved_states(saved: Any, path: str) -> tuple[list[dict[str, Tensor]], list[str] | None]:
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


def read_state(path: str) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


def load_saved_states(modules: list[Curriculum], saved: Any, path: str) -> None:
    """Load ``saved`` (read from the ``cggr_state.pt`` at ``path``) into ``modules`` (in order; the same count and,
    where the file records them, the same classes)."""
    states, classes = saved_states(saved, path)
    if len(states) != len(modules):
        raise ValueError(f"{path} holds {len(states)} CGGR curricula, expected {len(modules)} "
                         f"({', '.join(type(m).__name__ for m in modules)})")
    if classes is not None:
        own = [type(m).__name__ for m in modules]
        if list(classes) != own:
            raise ValueError(f"{path} holds the curricula of {list(classes)}, expected {own}")
    for module, state in zip(modules, states, strict=True):
        load_curriculum_state(module, state)


def set_step(module: Curriculum, step: int) -> None:
    state = curriculum_state(module)
    state["step_count"] = torch.tensor(step, dtype=state["step_count"].dtype)
    load_curriculum_state(module, state)


def step_of(module: Curriculum) -> int:
    return int(module.step_count)


# ---------------------------------------------------------------------------------------------- save / load
def save_pretrained(cggr_model: nn.Module, save_directory: str | os.PathLike, **kwargs: Any) -> None:
    """See :meth:`cggr.CGGRModel.save_pretrained`: the wrapped model's ``save_pretrained`` plus ``cggr_state.pt``;
    for a PEFT model ``PeftModel.save_pretrained`` (the adapters, not the frozen base weights)."""
    inner = peft_model_of(cggr_model.model) or unwrap_model(cggr_model.model)
    if not callable(getattr(inner, "save_pretrained", None)):
        raise TypeError(
            f"save_pretrained needs a wrapped model with save_pretrained (a transformers PreTrainedModel), got "
            f"{type(inner).__name__}; save cggr_model.model.state_dict() and cggr_model's curriculum instead"
        )
    inner.save_pretrained(save_directory, **kwargs)
    if kwargs.get("is_main_process", True):
        torch.save(curriculum_state(cggr_model), os.path.join(save_directory, CGGR_STATE_NAME))


def from_pretrained(
    wrapper_class: type,
    pretrained_model_name_or_path: str | os.PathLike,
    *,
    model_class: Any = None,
    model_kwargs: dict[str, Any] | None = None,
    base_model: nn.Module | None = None,
    **cggr_kwargs: Any,
) -> nn.Module:
    """Load the plain model with ``model_class.from_pretrained`` (default ``AutoModelForCausalLM``) and wrap it in
    ``wrapper_class(model, **cggr_kwargs)`` (:class:`cggr.CGGRModel` or a subclass); a ``cggr_state.pt`` in the
    directory restores the curriculum.

    A directory with a PEFT adapter (``adapter_config.json``, what :func:`save_pretrained` writes for a PEFT model)
    loads as a trainable ``PeftModel`` (:func:`cggr.integrations.peft_models.load_peft_model`): on ``base_model``
    when given (``model_class`` must then be None), else on the base model its config names. An explicit
    ``model_class`` loads such a directory its own way (e.g. ``AutoPeftModelForSequenceClassification``, whose
    adapters PEFT freezes unless ``model_kwargs={"is_trainable": True}``)."""
    path = os.fspath(pretrained_model_name_or_path)
    peft_dir = adapter_files(path)
    if base_model is not None and not peft_dir:
        raise ValueError(f"base_model is for a PEFT adapter directory, but {path} holds no adapter "
                         "(adapter_config.json and adapter_model.safetensors); load it without base_model")
    if peft_dir and model_class is None:
        from cggr.integrations.peft_models import load_peft_model

        model = load_peft_model(path, base_model, model_kwargs or {})
    elif base_model is not None:
        raise ValueError(f"give base_model (a PEFT adapter on it) or model_class, not both (model_class="
                         f"{getattr(model_class, '__name__', model_class)!r})")
    else:
        if model_class is None:
            from transformers import AutoModelForCausalLM

            model_class = AutoModelForCausalLM
        model = model_class.from_pretrained(pretrained_model_name_or_path, **(model_kwargs or {}))
    cggr_model = wrapper_class(model, **cggr_kwargs)
    state_path = os.path.join(path, CGGR_STATE_NAME)
    if os.path.isfile(state_path):  # save_pretrained's file, or a Trainer checkpoint's (CGGRCallback: one module)
        load_saved_states([cggr_model], read_state(state_path), state_path)
    return cggr_model


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


def _wrapped_pretrained(model: nn.Module | None) -> tuple[nn.Module, nn.Module, str] | None:
    """``(cggr_model, wrapped PreTrainedModel or PeftModel, its key prefix in cggr_model.state_dict())`` when
    ``model`` (a Trainer's model, DDP- or compile-wrapped or not) is a CGGRModel around a transformers
    PreTrainedModel or a ``peft.PeftModel`` (the Trainer saves and loads either through its own branch for it)."""
    from transformers import PreTrainedModel

    if not isinstance(model, nn.Module):
        return None
    root, _ = _strip_wrappers(model, "")
    if not _MODEL_CLASSES or not isinstance(root, tuple(_MODEL_CLASSES)):
        return None
    inner, prefix = _strip_wrappers(root.model, "model.")
    return (root, inner, prefix) if isinstance(inner, PreTrainedModel) or is_peft_model(inner) else None


def _engine_loads(trainer: Any) -> bool:
    """DeepSpeed, FSDP and SageMaker MP resume from their own checkpoint files (with the wrapper's keys)."""
    from transformers.utils import is_sagemaker_mp_enabled

    return bool(trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled or is_sagemaker_mp_enabled())


def _inner_state_dict(cggr_model: nn.Module, state_dict: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
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


class _CheckpointWeights:
    """The weight files of a checkpoint directory: their tensor names (``keys``) and their state dicts, one file at a
    time (:meth:`shards`).

    Each file is read once. The names of an index or a safetensors file come from its header; a single
    ``pytorch_model.bin`` (transformers 4.x ``save_safetensors=False``) has none, so it is loaded for its names and
    that dict is what :meth:`shards` yields, then dropped, instead of a second read of a file of the model's size.
    """

    def __init__(self, directory: str, name: str) -> None:
        self.directory, self.name = directory, name
        path = os.path.join(directory, name)
        self._state: dict[str, Tensor] | None = None
        if name.endswith(".json"):
            with open(path, encoding="utf-8") as f:
                self.keys = list(json.load(f)["weight_map"])
        elif name.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                self.keys = list(f.keys())
        else:
            self._state = torch.load(path, map_location="cpu", weights_only=True)
            self.keys = list(self._state)

    @classmethod
    def find(cls, directory: str) -> _CheckpointWeights | None:
        """The weights in ``directory`` (``None``: no weight file the Trainer writes)."""
        name = _weight_file(directory)
        return None if name is None else cls(directory, name)

    def release(self) -> None:
        """Drop the loaded ``.bin`` dict (before a load that reads the files itself: no second copy in memory)."""
        self._state = None

    def shards(self) -> Iterator[dict[str, Tensor]]:
        """Yield the state dict of each weight file (a shard, or the only file); a ``.bin`` loaded for its names is
        handed out (once) rather than read again."""
        if self._state is not None:
            state, self._state = self._state, None
            yield state
            return
        from safetensors.torch import load_file

        if self.name.endswith(".json"):
            with open(os.path.join(self.directory, self.name), encoding="utf-8") as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        else:
            files = [self.name]
        for file in files:
            full = os.path.join(self.directory, file)
            yield load_file(full) if file.endswith(".safetensors") else torch.load(full, map_location="cpu",
                                                                                   weights_only=True)


def _load_checked(target: nn.Module, directory: str, weights: _CheckpointWeights) -> None:
    """Copy the checkpoint in ``directory`` into ``target`` (the wrapped model, or the CGGRModel for a checkpoint of
    its own state dict), in place.

    Every tensor of ``target.state_dict()`` must come from the file (except one tied to a loaded tensor, or one the
    model never saves), and every tensor of the file must be one of them; else a ValueError names them. Files in the
    original (converted) layout of models whose weights transformers converts on load (e.g. fused MoE experts) go
    through ``from_pretrained`` and are then copied, under the same checks."""
    own = target.state_dict(keep_vars=True)
    unexpected = sorted(set(weights.keys) - set(own))
    if unexpected and not _converted_layout(target):
        raise ValueError(f"the checkpoint in {directory} has tensors that {type(target).__name__} does not: "
                         f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}; it is not this model's")
    if unexpected:  # e.g. per-expert tensors that this transformers version fuses: its loader converts them
        weights.release()
        converted, info = type(target).from_pretrained(directory, config=target.config, output_loading_info=True)
        problems = {k: v for k, v in info.items() if v}
        if problems:
            raise ValueError(f"the checkpoint in {directory} does not load into {type(target).__name__}: {problems}")
        shards = [converted.state_dict()]
    else:
        shards = weights.shards()
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


def _checkpoint_target(parts: tuple[nn.Module, nn.Module, str], directory: str
                       ) -> tuple[nn.Module, _CheckpointWeights] | None:
    """``(module, weights)``: the wrapped model for a checkpoint of its save_pretrained (with config.json), the
    CGGRModel for one of its own state dict (written before this support existed); ``None`` without a weight file
    (the Trainer's own loader then says so)."""
    weights = _CheckpointWeights.find(directory)
    if weights is None:
        return None
    keys = weights.keys
    cggr_model, inner, _ = parts
    if set(keys) <= set(cggr_model.state_dict(keep_vars=True)) and not set(keys) <= set(inner.state_dict()):
        return cggr_model, weights
    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise ValueError(f"{directory} holds neither the wrapped model's save_pretrained (no config.json) nor a "
                         f"CGGRModel state dict (tensor names {keys[:4]} ...)")
    return inner, weights


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
        self.model = inner  # the Trainer's own branch for it: (Peft)save_pretrained, tokenizer, training args
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
        callbacks = [cb for cb in self.callback_handler.callbacks if isinstance(cb, tuple(_CALLBACK_CLASSES))]
        for cb in callbacks:  # on_train_begin restores the curricula from this very checkpoint
            cb.resumed_from = os.fspath(resume_from_checkpoint)
        parts = _wrapped_pretrained(model if model is not None else self.model)
        if parts is not None and not _engine_loads(self) and _load_peft_checkpoint(
                self, original, parts, os.fspath(resume_from_checkpoint), callbacks):
            return None
        found = None if parts is None or _engine_loads(self) else _checkpoint_target(parts, resume_from_checkpoint)
        if found is None:
            return original(self, resume_from_checkpoint, model)
        cggr_model = parts[0]
        _load_checked(found[0], resume_from_checkpoint, found[1])
        if found[0] is cggr_model:  # the wrapper's own state dict carried the curriculum
            return
        _load_curriculum(cggr_model, resume_from_checkpoint, callbacks)

    return _load_from_checkpoint


def _load_peft_checkpoint(trainer: Any, original: Any, parts: tuple[nn.Module, nn.Module, str], directory: str,
                          callbacks: list) -> bool:
    """Resume a CGGRModel around a PeftModel from the adapters in ``directory`` through the Trainer's own PEFT
    branch (``load_adapter`` into the active adapter, subdirectories for the others), after checking that they are
    exactly this model's adapter tensors; then its curriculum. ``False``: no adapter there (another layout)."""
    cggr_model, inner, _ = parts
    if not is_peft_model(inner) or not os.path.isdir(directory) or not (adapter_files(directory) or any(
            adapter_files(os.path.join(directory, name)) for name in os.listdir(directory))):
        return False
    check_adapter_checkpoints(inner, directory)
    original(trainer, directory, inner)
    _load_curriculum(cggr_model, directory, callbacks)
    return True


def _load_curriculum(cggr_model: nn.Module, resume_from_checkpoint: str, callbacks: list) -> None:
    """The curriculum of a checkpoint's ``cggr_state.pt`` into ``cggr_model`` (a CGGRCallback's file is left to
    the callback, which loads it into its modules at on_train_begin); a warning when there is none to restore."""
    path = os.path.join(resume_from_checkpoint, CGGR_STATE_NAME)
    if not os.path.isfile(path):
        if not callbacks:  # a CGGRCallback sets the step from global_step and warns
            warnings.warn(f"{resume_from_checkpoint} has no {CGGR_STATE_NAME}: the CGGRModel's curriculum "
                          "(step, random stream) is not restored", stacklevel=3)
        return
    saved = read_state(path)
    if callbacks and isinstance(saved, dict) and "global_step" in saved:
        return  # a CGGRCallback's file: the callback loads it into its modules at on_train_begin
    modules = [cggr_model] if not (isinstance(saved, dict) and "modules" in saved) else [
        m for m in cggr_model.modules() if isinstance(m, Curriculum)]  # as a CGGRCallback() finds them
    load_saved_states(modules, saved, path)


def _trainer_load_best_model(original):
    @functools.wraps(original)
    def _load_best_model(self) -> None:
        parts = _wrapped_pretrained(self.model)
        best = self.state.best_model_checkpoint
        if parts is not None and best is not None and not _engine_loads(self) and is_peft_model(parts[1]) and (
                adapter_files(best)):
            check_adapter_checkpoints(parts[1], best)
            model = self.model
            self.model = parts[1]  # the Trainer's own PEFT branch: load_adapter into the active adapter
            try:
                return original(self)
            finally:
                self.model = model
        found = None if parts is None or best is None or _engine_loads(self) else _checkpoint_target(parts, best)
        if found is None:
            return original(self)
        _load_checked(found[0], best, found[1])  # the weights only, as the Trainer does for any model

    return _load_best_model


# A Trainer whose model is a CGGRModel steps its curriculum only through a CGGRCallback (the Trainer knows nothing of
# CGGRModel.step()). Without one the warm-up ratio would hold for good, silently: train() adds one when none is there.
#: The callbacks :func:`_trainer_train` added (the user's own are never removed).
_ADDED_CALLBACKS: weakref.WeakSet = weakref.WeakSet()


def _cggr_root(model: Any) -> nn.Module | None:
    """The registered CGGR model that ``model`` (a Trainer's model) is or wraps (DDP, ``torch.compile``, PEFT, FSDP
    stripped), else ``None``."""
    if not isinstance(model, nn.Module) or not _MODEL_CLASSES:
        return None
    root = unwrap_model(model)
    return root if isinstance(root, tuple(_MODEL_CLASSES)) else None


def ensure_curriculum_callback(trainer: Any) -> None:
    """Give ``trainer`` exactly one registered callback (a ``CGGRCallback()``) when its model is a CGGR model.

    None among its callbacks: one is added (and remembered as added here). One of the user's there as well (passed,
    or added with ``add_callback`` after a ``train()`` in which this one was added): the added one is removed, so
    the curriculum never steps twice per optimizer step. The user's callbacks all given other modules than the
    model (``CGGRCallback(loss)``): a warning, and no second callback (its ``on_save`` would write ``cggr_state.pt``
    over the first one's). Any other model: a callback added here earlier is removed."""
    callbacks = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, tuple(_CALLBACK_CLASSES))]
    added = [cb for cb in callbacks if cb in _ADDED_CALLBACKS]
    own = [cb for cb in callbacks if cb not in _ADDED_CALLBACKS]
    root = _cggr_root(trainer.model)
    for cb in added if own or root is None else added[1:]:
        trainer.callback_handler.remove_callback(cb)
    if root is None:
        return
    if own:
        if not any(cb.steps(root) if callable(getattr(cb, "steps", None)) else True for cb in own):
            name = type(own[0]).__name__
            warnings.warn(f"the Trainer's {type(root).__name__} is not stepped by its {name} (given other modules "
                          f"only): its curriculum stays at step {step_of(root)}; pass {name}() (every CGGR module of "
                          "the model) or add the model to its modules", stacklevel=3)
    elif not added:
        callback = _CALLBACK_CLASSES[0]()
        trainer.add_callback(callback)
        _ADDED_CALLBACKS.add(callback)


def _trainer_train(original):
    """Wrap ``Trainer.train``: :func:`ensure_curriculum_callback` first.

    Why ``train()`` and not ``__init__``: at the start of ``train()`` the callback list is final (``callbacks=``,
    ``add_callback``/``remove_callback`` after construction, an earlier ``train()``), so exactly one callback is
    there whatever the order; ``__init__`` would see only ``callbacks=``, and transformers' ``add_callback`` of a
    second ``CGGRCallback`` merely logs the duplicate and appends it (the curriculum would step twice). Not later
    (``_inner_training_loop``, ``on_train_begin``): ``train()`` calls ``_load_from_checkpoint`` before those, and the
    callback must already be there to restore the curriculum from the checkpoint it resumes from. ``model_init``
    rebuilds the model inside ``train()`` after this point; the added ``CGGRCallback()`` finds its modules in the
    Trainer's model at ``on_train_begin``, so it steps the rebuilt one."""
    @functools.wraps(original)
    def train(self, *args: Any, **kwargs: Any) -> Any:
        if _CALLBACK_CLASSES:
            ensure_curriculum_callback(self)
        return original(self, *args, **kwargs)

    return train


def install_trainer_support(*, model_class: type | None = None, callback_class: type | None = None) -> None:
    """Patch ``transformers.Trainer`` (once) so that a ``model_class`` instance (:class:`cggr.CGGRModel`) saves and
    loads as the PreTrainedModel it wraps and, wrapped or not, has its curriculum stepped; ``callback_class``
    (:class:`~cggr.integrations.callback.CGGRCallback`) instances are told which checkpoint the Trainer resumed
    from, and ``train()`` adds one when the model is a ``model_class`` instance and none is among the callbacks
    (:func:`ensure_curriculum_callback`). The classes are registered here rather than imported, so that
    :mod:`cggr.model` can install this without an import cycle."""
    if model_class is not None and model_class not in _MODEL_CLASSES:
        _MODEL_CLASSES.append(model_class)
    if callback_class is not None and callback_class not in _CALLBACK_CLASSES:
        _CALLBACK_CLASSES.append(callback_class)
    try:
        from transformers import Trainer
    except ImportError:  # transformers without its Trainer (e.g. no torch.distributed): nothing to support
        return
    if getattr(Trainer, "_cggr_model_support", False):
        return
    Trainer._save = _trainer_save(Trainer._save)
    Trainer._load_from_checkpoint = _trainer_load_from_checkpoint(Trainer._load_from_checkpoint)
    Trainer._load_best_model = _trainer_load_best_model(Trainer._load_best_model)
    Trainer.train = _trainer_train(Trainer.train)
    Trainer._cggr_model_support = True


__all__ = ["CGGR_STATE_NAME", "curriculum_state", "from_pretrained", "install_trainer_support", "load_curriculum_state",
           "load_saved_states", "read_state", "save_pretrained", "saved_states", "set_step", "step_of"]
