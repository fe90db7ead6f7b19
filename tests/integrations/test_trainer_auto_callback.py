"""``Trainer(model=CGGRModel(...))`` without ``callbacks=[CGGRCallback()]``: the Trainer adds the callback itself, so
the warm-up curriculum steps once per optimizer step (it used to stay at step 0: the warm-up ratio forever), and
never a second one when the user passed or added one (the curriculum would then step twice per optimizer step).

Reference: the rows the wrapped model really trains on per micro-batch (a forward pre-hook on it, not the wrapper's
own metrics), against the schedule computed independently here in exact rational arithmetic:
``k(s) = max(1, round_half_up(B * (1 - min(1, s / W) * (1 - m))))`` for optimizer step s, per-device batch B,
warm-up W and minimum ratio m. With gradient accumulation G every optimizer step runs G micro-batches at one step.
"""

from __future__ import annotations

import math
import warnings
from fractions import Fraction

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import Trainer, TrainingArguments  # noqa: E402

from cggr import CGGRLoss, CGGRModel  # noqa: E402
from cggr.integrations.transformers import CGGRCallback, curriculum_state  # noqa: E402
from tests.integrations.test_integrations_hf import padded_rows, tiny_llama  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true but no accelerator:UserWarning")

B, WARMUP, MIN_RATIO = 4, 4, Fraction(1, 5)
CGGR_KWARGS = dict(num_router_layers=1, min_tokens_ratio=float(MIN_RATIO), warmup_steps=WARMUP, selection="random",
                   seed=4)


def scheduled_rows(step: int) -> int:
    """Rows kept at optimizer step ``step`` (0-based), from the schedule's definition (no cggr code)."""
    ratio = 1 - min(Fraction(1), Fraction(step, WARMUP)) * (1 - MIN_RATIO)
    return min(B, max(1, math.floor(ratio * B + Fraction(1, 2))))


def expected_rows(first_step: int, last_step: int, accumulation: int) -> list[int]:
    return [scheduled_rows(s) for s in range(first_step, last_step) for _ in range(accumulation)]


def record_rows(cm: CGGRModel) -> list[int]:
    """The batch size of every training forward of the wrapped model (the rows the selection kept)."""
    rows: list[int] = []

    def hook(module, args, kwargs):
        if module.training:
            rows.append(int(kwargs["input_ids"].shape[0]))

    cm.model.register_forward_pre_hook(hook, with_kwargs=True)
    return rows


def training_args(out, accumulation=1, steps=6, **overrides):
    args = dict(per_device_train_batch_size=B, gradient_accumulation_steps=accumulation, max_steps=steps,
                learning_rate=0.1, optim="sgd", lr_scheduler_type="constant", max_grad_norm=1e9, report_to=[],
                use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0)
    args.update(overrides)
    return TrainingArguments(str(out), **args)


def cggr_callbacks(trainer) -> list[CGGRCallback]:
    return [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, CGGRCallback)]


@pytest.mark.parametrize("accumulation", [1, 2])
def test_without_a_callback_the_curriculum_steps_once_per_optimizer_step(tmp_path, accumulation):
    """The bug: no CGGRCallback, so step_count stayed 0 and every micro-batch kept all B rows (ratio 1) for good."""
    cm = CGGRModel(tiny_llama(), **CGGR_KWARGS)
    rows = record_rows(cm)
    trainer = Trainer(model=cm, args=training_args(tmp_path, accumulation), train_dataset=padded_rows())
    trainer.train()
    assert trainer.state.global_step == 6
    assert int(cm.step_count) == 6  # one step per optimizer step, not per micro-batch
    assert rows == expected_rows(0, 6, accumulation)  # 4, 3, 2, 2, 1, 1 rows (each G times)
    assert len(cggr_callbacks(trainer)) == 1


@pytest.mark.parametrize("how", ["callbacks=[instance]", "callbacks=[class]", "add_callback", "added_after_a_run"])
def test_a_callback_of_the_user_is_the_only_one(tmp_path, how):
    """A CGGRCallback passed to the Trainer, or added with add_callback before train(), even after a train() in which
    the Trainer had added its own: exactly one steps the curriculum (two would skip every other schedule step)."""
    cm = CGGRModel(tiny_llama(), **CGGR_KWARGS)
    rows = record_rows(cm)
    callbacks = {"callbacks=[instance]": [CGGRCallback()], "callbacks=[class]": [CGGRCallback]}.get(how)
    trainer = Trainer(model=cm, args=training_args(tmp_path, 2, steps=3), train_dataset=padded_rows(),
                      callbacks=callbacks)
    if how == "added_after_a_run":
        trainer.train()
        assert int(cm.step_count) == 3 and rows == expected_rows(0, 3, 2)
        rows.clear()
    if how in ("add_callback", "added_after_a_run"):
        mine = CGGRCallback()
        trainer.add_callback(mine)
    trainer.train()
    first = 3 if how == "added_after_a_run" else 0  # a second train() starts at global step 0, the curriculum goes on
    assert int(cm.step_count) == first + 3
    assert rows == expected_rows(first, first + 3, 2)
    assert len(cggr_callbacks(trainer)) == 1
    if how in ("add_callback", "added_after_a_run"):
        assert cggr_callbacks(trainer) == [mine]


def test_resume_without_a_callback_continues_the_count(tmp_path):
    """An uninterrupted 4-step run vs 2 steps + resume from checkpoint-2 into a fresh model with other weights, in
    another output_dir, no callback in either: the resumed run trains at steps 2 and 3 of the schedule and ends with
    the same curriculum state (step and random stream) as the uninterrupted one."""
    def run(out, seed, resume=None):
        cm = CGGRModel(tiny_llama(seed=seed), **CGGR_KWARGS)
        rows = record_rows(cm)
        args = training_args(out, 2, steps=4, save_strategy="steps", save_steps=2)
        Trainer(model=cm, args=args, train_dataset=padded_rows()).train(resume_from_checkpoint=resume)
        return cm, rows

    cm_full, rows_full = run(tmp_path / "full", 0)
    assert int(cm_full.step_count) == 4 and rows_full == expected_rows(0, 4, 2)
    cm_res, rows_res = run(tmp_path / "elsewhere", 5, resume=str(tmp_path / "full" / "checkpoint-2"))
    assert rows_res == expected_rows(2, 4, 2)
    assert int(cm_res.step_count) == 4
    for name, value in curriculum_state(cm_full).items():
        assert torch.equal(getattr(cm_res, name), value), name


def test_model_init_models_are_stepped_in_every_run(tmp_path):
    """With model_init every train() builds a new CGGRModel (hyperparameter search does this per trial): the callback
    the Trainer added steps the model of the current run, not the one it found first."""
    trainer = Trainer(model_init=lambda: CGGRModel(tiny_llama(), **CGGR_KWARGS), args=training_args(tmp_path, steps=2),
                      train_dataset=padded_rows())
    trainer.train()
    first = trainer.model
    trainer.train()
    assert trainer.model is not first
    assert int(first.step_count) == 2 and int(trainer.model.step_count) == 2
    assert len(cggr_callbacks(trainer)) == 1


def test_a_callback_that_does_not_step_the_model_is_reported(tmp_path):
    """A CGGRCallback given other modules only (here a CGGRLoss) leaves the Trainer's CGGRModel unstepped: the Trainer
    adds no second callback (it would write cggr_state.pt over the first one's), and says so."""
    cm = CGGRModel(tiny_llama(), **CGGR_KWARGS)
    trainer = Trainer(model=cm, args=training_args(tmp_path, steps=1), train_dataset=padded_rows(),
                      callbacks=[CGGRCallback(CGGRLoss())])
    with pytest.warns(UserWarning, match=r"CGGRModel .*not stepped"):
        trainer.train()
    assert len(cggr_callbacks(trainer)) == 1 and int(cm.step_count) == 0
    with warnings.catch_warnings():  # one that steps the model as well: no warning
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", "'pin_memory' argument")
        trainer.remove_callback(CGGRCallback)
        trainer.add_callback(CGGRCallback(CGGRLoss(), cm))
        trainer.train()
    assert int(cm.step_count) == 1


@pytest.mark.parametrize("wrap", ["torch.compile", "DataParallel", "plain model"])
def test_a_wrapped_cggr_model_gets_the_callback_and_other_models_none(tmp_path, wrap):
    """The check unwraps the Trainer's model (torch.compile's OptimizedModule, DataParallel) to the CGGRModel, and the
    added callback finds the CGGRModel inside the wrapper; a plain model gets none, and loses one added earlier."""
    from transformers import TrainerState

    from cggr.integrations.checkpoints import ensure_curriculum_callback

    cm = CGGRModel(tiny_llama(), **CGGR_KWARGS)
    model = {"torch.compile": torch.compile, "DataParallel": torch.nn.DataParallel,
             "plain model": lambda m: m.model}[wrap](cm)
    trainer = Trainer(model=model, args=training_args(tmp_path), train_dataset=padded_rows())
    ensure_curriculum_callback(trainer)
    ensure_curriculum_callback(trainer)  # idempotent
    callbacks = cggr_callbacks(trainer)
    if wrap == "plain model":
        assert callbacks == []
        return
    assert len(callbacks) == 1
    callbacks[0].on_train_begin(trainer.args, TrainerState(), trainer.control, model=trainer.model)
    assert len(callbacks[0].modules) == 1 and callbacks[0].modules[0] is cm
    trainer.model = cm.model  # the model swapped for a plain one: the added callback goes
    ensure_curriculum_callback(trainer)
    assert cggr_callbacks(trainer) == []
