"""``transformers.Trainer(model=CGGRModel(...))``: save_model() and checkpoints are plain Hugging Face checkpoints of
the wrapped model (config.json, weights without the wrapper's ``model.`` prefix) plus ``cggr_state.pt``, and
``train(resume_from_checkpoint=...)`` restores both, bit for bit.

References: the uninterrupted run (a resumed run must end on exactly its weights, curriculum and logged losses) and
the tensors in the files (a load must really copy them: the Trainer loads with ``strict=False``, which would let a
checkpoint with other key names load nothing without an error).
"""

from __future__ import annotations

import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import safetensors.torch  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaForCausalLM, Trainer, TrainingArguments  # noqa: E402

from cggr import CGGRModel  # noqa: E402
from cggr.integrations.transformers import CGGR_STATE_NAME, CGGRCallback, curriculum_state  # noqa: E402
from tests.integrations.test_integrations_hf import padded_rows, tiny_llama  # noqa: E402

# pin_memory on a CPU-only machine: torch warns that nothing gets pinned
pytestmark = pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true but no accelerator:UserWarning")

CGGR_KWARGS = dict(num_router_layers=1, min_tokens_ratio=0.5, warmup_steps=3, selection="random", seed=4)


def make_trainer(out, model, *, callback=True, steps=4, **overrides):
    args = dict(per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=steps, learning_rate=0.1,
                optim="sgd", lr_scheduler_type="constant", logging_steps=1, max_grad_norm=1e9, report_to=[],
                use_cpu=True, save_strategy="steps", save_steps=2, disable_tqdm=True, seed=0)
    args.update(overrides)
    cm = CGGRModel(model, **CGGR_KWARGS)
    trainer = Trainer(model=cm, args=TrainingArguments(str(out), **args), train_dataset=padded_rows(),
                      eval_dataset=padded_rows(), callbacks=[CGGRCallback()] if callback else None)
    return trainer, cm


def losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "grad_norm" in h]


def assert_same_weights(got: torch.nn.Module, want: dict[str, torch.Tensor]):
    got_sd = got.state_dict()
    assert set(got_sd) == set(want)
    for name, tensor in want.items():
        assert torch.equal(got_sd[name], tensor), name


def test_save_model_writes_a_plain_checkpoint_that_from_pretrained_loads(tmp_path):
    """save_model() used to write the wrapper's state dict (``model.model.*``, ``model.lm_head.weight``, the
    curriculum buffers) and no config.json: from_pretrained failed ("Unrecognized model")."""
    trainer, cm = make_trainer(tmp_path / "out", tiny_llama(), steps=2)
    trainer.train()
    trainer.save_model(str(tmp_path / "export"))
    files = set(os.listdir(tmp_path / "export"))
    assert {"config.json", "model.safetensors", CGGR_STATE_NAME} <= files
    saved = safetensors.torch.load_file(str(tmp_path / "export" / "model.safetensors"))
    assert set(saved) == set(cm.model.state_dict())  # no ``model.`` prefix, no curriculum buffers
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "export"))
    assert type(loaded) is LlamaForCausalLM
    assert_same_weights(loaded, cm.model.state_dict())
    state = torch.load(tmp_path / "export" / CGGR_STATE_NAME, weights_only=True)
    assert {k: int(v) for k, v in state.items()} == {k: int(v) for k, v in curriculum_state(cm).items()}
    assert int(state["step_count"]) == 2 and int(state["rng_counter"]) > 0  # selection='random' drew
    back = CGGRModel.from_pretrained(str(tmp_path / "export"), **CGGR_KWARGS)  # weights and curriculum
    assert_same_weights(back.model, cm.model.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(curriculum_state(back).values(), curriculum_state(cm).values()))

    ckpt = tmp_path / "out" / "checkpoint-2"  # each checkpoint is one too (weights + the callback's state)
    assert_same_weights(AutoModelForCausalLM.from_pretrained(str(ckpt)), cm.model.state_dict())
    assert int(CGGRModel.from_pretrained(str(ckpt), **CGGR_KWARGS).step_count) == 2


@pytest.mark.parametrize("callback", [True, False])
def test_resume_from_a_plain_checkpoint_continues_bit_for_bit(tmp_path, callback):
    """An uninterrupted 4-step run vs 2 steps + resume from checkpoint-2 into a model with OTHER initial weights, from
    another output_dir (so nothing is found by name): the same last losses, weights and curriculum, exactly. Without
    the load the weights differ; with a silent non-load (strict=False and other key names) too. Without a
    CGGRCallback passed, the one train() adds steps and saves the curriculum all the same (it used to stay at 0)."""
    full, cm_full = make_trainer(tmp_path / "full", tiny_llama(), callback=callback)
    full.train()
    ckpt = tmp_path / "full" / "checkpoint-2"
    want_ckpt = safetensors.torch.load_file(str(ckpt / "model.safetensors"))

    resumed, cm_res = make_trainer(tmp_path / "elsewhere", tiny_llama(seed=5), callback=callback)
    assert not torch.equal(cm_res.model.lm_head.weight, want_ckpt["lm_head.weight"])
    resumed._load_from_checkpoint(str(ckpt))  # what train(resume_from_checkpoint=) calls first
    assert_same_weights(cm_res.model, want_ckpt)  # the tensors really arrived
    resumed.train(resume_from_checkpoint=str(ckpt))

    assert len(losses(full)) == 4 and losses(resumed) == losses(full)  # steps 1-2 from trainer_state.json, 3-4 run
    assert_same_weights(cm_res.model, cm_full.model.state_dict())
    for name, value in curriculum_state(cm_full).items():
        assert torch.equal(getattr(cm_res, name), value), name
    assert int(cm_res.step_count) == 4 and int(cm_res.rng_counter) > 0


def test_a_pytorch_model_bin_checkpoint_is_read_once_and_resumes_bit_for_bit(tmp_path, monkeypatch):
    """A single ``pytorch_model.bin`` (what transformers 4.x writes with ``save_safetensors=False``) has no header to
    list its tensor names: the support used to torch.load the whole file for the names and again for the tensors
    (twice the read time and host memory of a multi-GB model). Now one read: the resumed run still ends on the
    uninterrupted run's losses and weights, and the loaded tensors are the file's."""
    full, cm_full = make_trainer(tmp_path / "full", tiny_llama())
    full.train()
    ckpt = tmp_path / "full" / "checkpoint-2"
    want_ckpt = safetensors.torch.load_file(str(ckpt / "model.safetensors"))
    os.remove(ckpt / "model.safetensors")
    torch.save(want_ckpt, ckpt / "pytorch_model.bin")

    real_load, reads = torch.load, []

    def counting_load(f, *args, **kwargs):
        reads.append(os.path.basename(os.fspath(f)) if isinstance(f, str | os.PathLike) else repr(f))
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting_load)
    resumed, cm_res = make_trainer(tmp_path / "elsewhere", tiny_llama(seed=5))
    assert not torch.equal(cm_res.model.lm_head.weight, want_ckpt["lm_head.weight"])
    resumed._load_from_checkpoint(str(ckpt))
    assert reads.count("pytorch_model.bin") == 1, reads
    assert_same_weights(cm_res.model, want_ckpt)  # the tensors really arrived from the one read
    reads.clear()
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert reads.count("pytorch_model.bin") == 1, reads
    assert losses(resumed) == losses(full)
    assert_same_weights(cm_res.model, cm_full.model.state_dict())


def test_load_best_model_at_end_loads_the_best_checkpoint(tmp_path):
    """load_best_model_at_end reads the best checkpoint with strict=False: the plain layout must load into the
    wrapped model (a lower learning rate makes eval_loss fall, so checkpoint-4 is not the best: metric inverted)."""
    trainer, cm = make_trainer(tmp_path / "out", tiny_llama(), eval_strategy="steps", eval_steps=2,
                               load_best_model_at_end=True, metric_for_best_model="eval_loss",
                               greater_is_better=True, learning_rate=0.01)
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and best.endswith("checkpoint-2")
    assert_same_weights(cm.model, safetensors.torch.load_file(os.path.join(best, "model.safetensors")))


def test_a_checkpoint_that_does_not_match_the_wrapped_model_is_refused(tmp_path):
    """A missing tensor or a tensor of another model must raise, never load partially (the Trainer's strict=False
    would only log it)."""
    trainer, _ = make_trainer(tmp_path / "out", tiny_llama(), steps=2, callback=False)
    trainer.train()
    ckpt = tmp_path / "out" / "checkpoint-2"
    weights = safetensors.torch.load_file(str(ckpt / "model.safetensors"))
    fresh, _ = make_trainer(tmp_path / "other", tiny_llama(seed=6), callback=False)

    missing = dict(weights)
    del missing["model.layers.1.mlp.up_proj.weight"]
    safetensors.torch.save_file(missing, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        fresh._load_from_checkpoint(str(ckpt))

    extra = dict(weights, **{"model.layers.9.mlp.up_proj.weight": torch.zeros(2)})
    safetensors.torch.save_file(extra, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.9\.mlp\.up_proj\.weight"):
        fresh._load_from_checkpoint(str(ckpt))


def test_a_checkpoint_of_the_wrapper_layout_still_resumes(tmp_path):
    """Checkpoints written before (the CGGRModel's own state dict, no config.json) load as they did: weights and
    curriculum through the Trainer's own loader."""
    cm = CGGRModel(tiny_llama(7), **CGGR_KWARGS)
    cm.step()
    ckpt = tmp_path / "old"
    ckpt.mkdir()
    want = {k: v.clone() for k, v in cm.state_dict().items()}
    safetensors.torch.save_file(want, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    fresh, cm_fresh = make_trainer(tmp_path / "out", tiny_llama(8), callback=False)
    fresh._load_from_checkpoint(str(ckpt))
    assert_same_weights(cm_fresh, want)
    assert int(cm_fresh.step_count) == 1
    del want["model.model.norm.weight"]  # a partial one raises (the Trainer's strict=False load would log it)
    safetensors.torch.save_file(want, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks tensors of CGGRModel: \['model\.model\.norm\.weight'\]"):
        fresh._load_from_checkpoint(str(ckpt))


def test_a_model_whose_weights_transformers_converts_saves_and_resumes(tmp_path):
    """Mixtral's experts are fused in memory (``mlp.experts.gate_up_proj``) and saved per expert (``experts.0.w1``):
    the checkpoint's names are not the module's, so the load goes through from_pretrained's conversion."""
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(vocab_size=96, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=1, num_local_experts=2)
    trainer, cm = make_trainer(tmp_path / "out", transformers.MixtralForCausalLM(cfg), callback=False)
    trainer.save_model(str(tmp_path / "export"))
    names = safetensors.torch.load_file(str(tmp_path / "export" / "model.safetensors"))
    assert set(names) != set(cm.model.state_dict())  # the converted (original) layout
    want = {k: v.clone() for k, v in cm.model.state_dict().items()}
    torch.manual_seed(1)
    fresh, cm_fresh = make_trainer(tmp_path / "other", transformers.MixtralForCausalLM(cfg), callback=False)
    assert not torch.equal(cm_fresh.model.lm_head.weight, want["lm_head.weight"])
    fresh._load_from_checkpoint(str(tmp_path / "export"))
    assert_same_weights(cm_fresh.model, want)


def test_the_support_needs_no_import_of_the_integration(tmp_path):
    """A script that never imports cggr.integrations.transformers (no CGGRCallback) gets plain checkpoints too, and a
    curriculum that steps: CGGRModel around a transformers model brings the support and the callback."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    code = f"""
import os, sys
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments
from cggr import CGGRModel
from tests.tiny_models import tiny_llama
cm = CGGRModel(tiny_llama(96), num_router_layers=1)
out = {str(tmp_path / "export")!r}
Trainer(model=cm, args=TrainingArguments(out, report_to=[], use_cpu=True)).save_model(out)
AutoModelForCausalLM.from_pretrained(out)
print(sorted(os.listdir(out)))
import torch
rows = [{{"input_ids": ids, "labels": ids.clone()}} for ids in torch.randint(0, 96, (8, 8))]
args = TrainingArguments(out + "-train", per_device_train_batch_size=4, max_steps=2, report_to=[], use_cpu=True,
                         save_strategy="no")
Trainer(model=cm, args=args, train_dataset=rows).train()
print("step", int(cm.step_count), "integration imported:", "cggr.integrations.transformers" in sys.modules)
"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root / "src"), str(root)]))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "'config.json'" in done.stdout and f"'{CGGR_STATE_NAME}'" in done.stdout
    assert "step 2 integration imported: False" in done.stdout


def test_apply_cggr_resumes_its_curriculum_from_a_checkpoint_outside_output_dir(tmp_path):
    """CGGRCallback looked for cggr_state.pt only in args.resume_from_checkpoint and <output_dir>/checkpoint-N: a
    checkpoint elsewhere resumed with the step set from global_step and the random stream lost (a warning). It now
    reads the checkpoint the Trainer loaded: the resumed run ends exactly where the uninterrupted one does."""
    from cggr.integrations.transformers import apply_cggr

    def run(out, model, resume=None):
        args = dict(per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=4, learning_rate=0.1,
                    optim="sgd", lr_scheduler_type="constant", max_grad_norm=1e9, report_to=[], use_cpu=True,
                    save_strategy="steps", save_steps=2, disable_tqdm=True, seed=0)
        trainer = Trainer(model=model, args=TrainingArguments(str(out), **args), train_dataset=padded_rows())
        cm = apply_cggr(trainer, **CGGR_KWARGS)
        trainer.train(resume_from_checkpoint=resume)
        return trainer, cm

    full, cm_full = run(tmp_path / "full", tiny_llama())
    resumed, cm_res = run(tmp_path / "elsewhere", tiny_llama(seed=5), resume=str(tmp_path / "full" / "checkpoint-2"))
    for name, value in curriculum_state(cm_full).items():
        assert torch.equal(getattr(cm_res, name), value), name
    assert_same_weights(resumed.model, full.model.state_dict())


def test_a_cggr_state_of_another_module_is_refused(tmp_path):
    """A checkpoint's cggr_state.pt records the classes of its curricula: a CGGRLoss's state (the same three buffers)
    must not load into a CGGRModel."""
    from cggr import CGGRLoss

    cm = CGGRModel(tiny_llama(3), num_router_layers=1)
    cm.save_pretrained(str(tmp_path))
    torch.save({"global_step": 5, "modules": [curriculum_state(CGGRLoss())], "classes": ["CGGRLoss"]},
               tmp_path / CGGR_STATE_NAME)
    with pytest.raises(ValueError, match=r"curricula of \['CGGRLoss'\], expected \['CGGRModel'\]"):
        CGGRModel.from_pretrained(str(tmp_path), num_router_layers=1)


def test_tied_embeddings_load_although_the_file_holds_them_once(tmp_path):
    """save_pretrained writes a tied lm_head.weight once (as model.embed_tokens.weight): the check that every tensor
    is loaded accepts a tensor tied to a loaded one, and the tie survives."""
    def tied(seed):
        torch.manual_seed(seed)
        cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
        return LlamaForCausalLM(cfg)

    trainer, cm = make_trainer(tmp_path / "out", tied(0), callback=False)
    trainer.save_model(str(tmp_path / "export"))
    assert "lm_head.weight" not in safetensors.torch.load_file(str(tmp_path / "export" / "model.safetensors"))
    fresh, cm_fresh = make_trainer(tmp_path / "other", tied(1), callback=False)
    fresh._load_from_checkpoint(str(tmp_path / "export"))
    assert_same_weights(cm_fresh.model, cm.model.state_dict())
    assert cm_fresh.model.lm_head.weight is cm_fresh.model.model.embed_tokens.weight
