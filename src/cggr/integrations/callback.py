"""``CGGRCallback``: the ``transformers.Trainer`` callback that steps CGGR curricula once per optimizer step and
carries them through checkpoints (``cggr_state.pt``).

It lives apart from :mod:`cggr.integrations.transformers` (which re-exports it) because it needs neither
:mod:`cggr.model` nor :mod:`cggr.loss`: :class:`cggr.CGGRModel` registers it with the Trainer support of
:mod:`cggr.integrations.checkpoints` when it wraps a transformers model, without an import cycle, so that
``Trainer(model=CGGRModel(...))`` gets one even when nothing imports the integration module (see
:func:`cggr.integrations.checkpoints.install_trainer_support`).
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import nn
from transformers import TrainerCallback

from cggr._selector import Curriculum
from cggr.integrations.checkpoints import (
    CGGR_STATE_NAME,
    curriculum_state,
    load_saved_states,
    read_state,
    set_step,
    step_of,
)


class CGGRCallback(TrainerCallback):
    """Advance CGGR curricula once per optimizer step and carry them through Trainer checkpoints.

    Args:
        *modules: The :class:`cggr.CGGRModel` / :class:`cggr.CGGRLoss` / :class:`cggr.CGGRScorer` instances to
            step. None given: every one found in the Trainer's model at each ``on_train_begin`` (e.g.
            ``Trainer(model=CGGRModel(...))``; found again at every ``train()``, so a model that ``model_init``
            rebuilds, as hyperparameter search does per trial, is the one stepped).

    ``Trainer(model=CGGRModel(...))`` adds a ``CGGRCallback()`` itself when ``train()`` starts and none is among its
    callbacks (see :func:`cggr.integrations.checkpoints.install_trainer_support`); passing one stays allowed and is
    then the only one.

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
        #: No modules given: ``modules`` is found in the Trainer's model at every ``on_train_begin``.
        self.discover: bool = not modules
        #: The checkpoint ``Trainer._load_from_checkpoint`` loaded (set by the Trainer support of this module).
        self.resumed_from: str | None = None

    def steps(self, module: nn.Module) -> bool:
        """Whether this callback steps ``module`` in the next ``train()``: it was given, or it is (a module of) the
        Trainer's model and this callback finds its modules there."""
        return self.discover or any(m is module for m in self.modules)

    def _discover(self, model: nn.Module | None) -> None:
        if not self.discover or model is None:
            return
        self.modules = [m for m in model.modules() if isinstance(m, Curriculum)]
        if not self.modules:
            warnings.warn(
                f"CGGRCallback: no CGGR module given and none found in {type(model).__name__}; nothing to step",
                stacklevel=2,
            )

    def _checkpoint_dirs(self, args, state) -> list[str]:
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
                saved = read_state(path)
                if isinstance(saved, dict) and int(saved.get("global_step", -1)) == state.global_step:
                    load_saved_states(self.modules, saved, path)
                    return
        for module in self.modules:
            if step_of(module) != state.global_step:
                warnings.warn(
                    f"CGGRCallback: resumed at step {state.global_step} without {CGGR_STATE_NAME}; "
                    f"{type(module).__name__}'s curriculum moves from step {step_of(module)} to {state.global_step} "
                    "(its random stream is not restored)",
                    stacklevel=2,
                )
                set_step(module, state.global_step)

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


__all__ = ["CGGRCallback"]
