"""``CGGRModel(get_peft_model(model, LoraConfig(...)))`` against the real ``peft`` package: training, saving, loading
and ``transformers.Trainer`` checkpoints.

References: a LoRA model written by hand (a plain transformers model of the same config called through
``torch.func.functional_call`` with W + (alpha / r) · B A in place of every adapted weight, fp64), never peft's own
forward or merge; PeftModel.save_pretrained's own files; the uninterrupted Trainer run. Every model is a tiny
random-weight model built from a config (no download); the adapters start random (``init_lora_weights=False``: with
PEFT's default B = 0 they would change nothing and any test of them would pass vacuously).
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.nn.functional as F

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import safetensors.torch  # noqa: E402
from peft import LoraConfig, PeftModel, PrefixTuningConfig, get_peft_model  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

from cggr import CGGRModel, create_truncated_router  # noqa: E402
from cggr.integrations.transformers import CGGR_STATE_NAME, curriculum_state  # noqa: E402
from tests.integrations.test_integrations_hf import padded_rows  # noqa: E402
from tests.integrations.test_trainer_cggr_model import CGGR_KWARGS, losses, make_trainer  # noqa: E402

# pin_memory on a CPU-only machine: torch warns that nothing gets pinned
# prefix tuning: peft 0.21 passes past_key_values, which transformers 5.24 deprecates (their code, not cggr's)
pytestmark = [
    pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true but no accelerator:UserWarning"),
    pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning"),
]

V = 96
R, ALPHA = 4, 8  # scaling alpha / r = 2
FAMILIES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM")}


def tiny(family: str = "llama", seed: int = 0, layers: int = 3):
    cfg_cls, model_cls = FAMILIES[family]
    torch.manual_seed(seed)
    cfg = getattr(transformers, cfg_cls)(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return getattr(transformers, model_cls)(cfg)


def lora(model, targets=("q_proj", "v_proj", "up_proj"), seed: int = 1, **kw):
    torch.manual_seed(seed)
    config = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=list(targets),
                        init_lora_weights=False, **kw)
    return get_peft_model(model, config)


def lora_params(peft_model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in peft_model.named_parameters() if "lora_" in n}


# ---------------------------------------------------------------------------------------------- the hand-made LoRA
def hand_lora(peft_model, num_layers: int | None = None):
    """``(plain fp64 model, lora leaves, call)``: a fresh transformers model of the base's config (truncated to
    ``num_layers``) holding the base weights, and ``call(ids, mask)`` running it with W + (alpha / r) · B A for every
    adapted linear layer, A and B fp64 leaves that require grad (keyed by the adapted module's name)."""
    base = peft_model.get_base_model()
    cfg = base.config.to_dict()
    if num_layers is not None:
        cfg["num_hidden_layers"] = num_layers
        if cfg.get("layer_types"):
            cfg["layer_types"] = cfg["layer_types"][:num_layers]
    plain = type(base)(type(base.config).from_dict(cfg)).double().eval()
    weights = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            key = name.removeprefix("base_model.model.")
            weights[key] = (module.base_layer.weight.detach().double(),
                            module.lora_A["default"].weight.detach().double().requires_grad_(),
                            module.lora_B["default"].weight.detach().double().requires_grad_())
    own = plain.state_dict()
    base_sd = {k.replace(".base_layer.", "."): v for k, v in base.state_dict().items() if "lora_" not in k}
    kept = {k: v.double() for k, v in base_sd.items() if k in own}
    assert set(own) == set(kept)  # every tensor of the reference is the base's
    plain.load_state_dict(kept)
    weights = {k: w for k, w in weights.items() if f"{k}.weight" in own}

    def call(ids, mask):
        params = {f"{k}.weight": w + (ALPHA / R) * b @ a for k, (w, a, b) in weights.items()}
        return torch.func.functional_call(plain, params, (), {"input_ids": ids, "attention_mask": mask}).logits

    return plain, {k: (a, b) for k, (_, a, b) in weights.items()}, call


def unpadded_targets(labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T) next-token targets of the unpadded sequences, written out: position t predicts labels[t + 1] when both
    are real tokens and the label is not -100."""
    b, t = labels.shape
    out = torch.full_like(labels, -100)
    for i in range(b):
        for j in range(t - 1):
            if mask[i, j] and mask[i, j + 1] and labels[i, j + 1] != -100:
                out[i, j] = labels[i, j + 1]
    return out


def batch(seed: int, b: int = 6, t: int = 11, left: bool = False):
    """Random ids, padding (right or left, 0-4 pads a row) and a few -100 labels inside the real tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (b, t), generator=g)
    pads = torch.randint(0, 5, (b,), generator=g)
    pos = torch.arange(t)
    mask = ((pos >= pads[:, None]) if left else (pos < (t - pads)[:, None])).long()
    labels = ids.masked_fill(mask == 0, -100)
    labels = labels.masked_fill(torch.rand(b, t, generator=g) < 0.15, -100)
    return ids, mask, labels


# ---------------------------------------------------------------------------------------------- training
def test_the_router_runs_the_lora_adapted_layers():
    """The truncated router of a PEFT model = the hand-made LoRA model's first 2 layers (fp64), and not the base's
    (adapters disabled), with and without padding."""
    peft_model = lora(tiny("qwen2")).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # LoRA runs inside the base model: nothing to warn about
        router = create_truncated_router(peft_model, 2)
    _, _, call = hand_lora(peft_model, num_layers=2)
    ids, mask, _ = batch(3, left=True)
    for m in (mask, None):
        want = call(ids, m)
        got = router(ids, attention_mask=m)
        real = (m if m is not None else torch.ones_like(ids)).bool()
        assert (got.double() - want)[real].abs().max() < 1e-4
        with peft_model.disable_adapter():
            plain = router(ids, attention_mask=m)
        assert (plain.double() - want)[real].abs().max() > 1e-2  # the adapters matter at this size


@pytest.mark.parametrize("family, fused, left, targets", [
    ("llama", False, False, ("q_proj", "v_proj", "up_proj", "lm_head")),
    ("llama", True, False, ("q_proj", "k_proj", "down_proj")),
    ("qwen2", False, True, ("q_proj", "v_proj", "gate_proj")),
])
def test_loss_and_lora_gradients_equal_the_hand_made_lora_on_the_selected_rows(family, fused, left, targets):
    """CGGRModel(peft_model), hardest half by the router's loss: the selected rows are the top half of the hand-made
    2-layer LoRA model's mean loss, the loss is the hand-made full LoRA model's mean cross-entropy over the selected
    rows' valid targets (padding and -100 excluded), and every LoRA A/B gradient equals the reference's; the base
    weights get no gradient and no requires_grad flag changes. fused=True takes the fused selective head (torch
    path on the CPU) through the base model, past the PeftModel."""
    peft_model = lora(tiny(family), targets)
    flags = {n: p.requires_grad for n, p in peft_model.named_parameters()}
    assert sum(flags.values()) == len(lora_params(peft_model)) > 0
    cm = CGGRModel(peft_model, num_router_layers=2, min_tokens_ratio=0.5, warmup_steps=0, scoring="loss",
                   selection="topk", fused_head=fused)
    for step, seed in enumerate((10, 11)):  # two optimizer-free steps on fresh inputs
        ids, mask, labels = batch(seed, left=left)
        peft_model.zero_grad(set_to_none=True)
        out = cm(ids, labels=labels, attention_mask=mask)
        out.loss.backward()
        cm.step()

        targets_ref = unpadded_targets(labels, mask)
        valid = targets_ref != -100
        _, _, short = hand_lora(peft_model, num_layers=2)
        with torch.no_grad():
            nll = F.cross_entropy(short(ids, mask).transpose(1, 2), targets_ref, ignore_index=-100, reduction="none")
        seq = (nll * valid).sum(1) / valid.sum(1)
        want_rows = sorted(torch.topk(seq, 3).indices.tolist())
        assert sorted(cm.get_metrics()["selected_indices"]) == want_rows, step

        _, leaves, full = hand_lora(peft_model)
        rows = torch.tensor(want_rows)
        logits = full(ids[rows], mask[rows])
        loss = F.cross_entropy(logits.transpose(1, 2), targets_ref[rows], ignore_index=-100, reduction="sum")
        loss = loss / valid[rows].sum()
        loss.backward()
        assert abs(out.loss.item() - loss.item()) < 1e-5 * max(1.0, loss.item()), step

        grads = {n: p.grad for n, p in peft_model.named_parameters() if p.grad is not None}
        assert set(grads) == set(lora_params(peft_model))  # no base weight got a gradient
        for key, (a, b) in leaves.items():
            for which, ref in (("A", a), ("B", b)):
                got = grads[f"base_model.model.{key}.lora_{which}.default.weight"].double()
                scale = ref.grad.abs().max().item()
                assert scale > 0 and (got - ref.grad).abs().max().item() <= 1e-4 * scale, (step, key, which)
        assert {n: p.requires_grad for n, p in peft_model.named_parameters()} == flags


def test_the_fused_head_refuses_a_prompt_learning_adapter():
    """Prefix tuning lives in PeftModel.forward: the fused head calls the base model past it, so the loss came out
    of the untouched base model (no gradient for the prefix at all). It is refused; auto mode on CUDA takes the
    logits path (through PeftModel.forward), which trains the prefix; the router (the base model's first layers)
    says that it scores without the prefix."""
    peft_model = get_peft_model(tiny(), PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"))
    with pytest.raises(ValueError, match=r"fused_head=True is not possible .*'default' \(PREFIX_TUNING\) is a "
                                         r"prompt-learning method"), pytest.warns(UserWarning):
        CGGRModel(peft_model, num_router_layers=2, fused_head=True)
    with pytest.warns(UserWarning, match=r"prompt-learning method.*the router scores the base model's first layers "
                                         r"without them"):
        cm = CGGRModel(peft_model, num_router_layers=2, min_tokens_ratio=0.5, warmup_steps=0)
    ids, mask, labels = batch(4)
    cm(ids, labels=labels, attention_mask=mask).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in peft_model.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------------- save / load
def trained_cggr(seed: int = 0, **lora_kw):
    peft_model = lora(tiny(seed=seed), seed=seed + 1, **lora_kw)
    cm = CGGRModel(peft_model, num_router_layers=1, min_tokens_ratio=0.5, warmup_steps=3, selection="random", seed=4)
    opt = torch.optim.SGD([p for p in cm.parameters() if p.requires_grad], lr=0.1)
    for s in range(2):
        ids, mask, labels = batch(20 + s)
        cm(ids, labels=labels, attention_mask=mask).loss.backward()
        opt.step()
        opt.zero_grad()
        cm.step()
    return cm, peft_model


def test_save_pretrained_writes_the_adapters_and_from_pretrained_loads_them(tmp_path):
    """save_pretrained of CGGRModel(peft_model) wrote the base model's full weights (config.json, model.safetensors)
    and no adapter: PeftModel.from_pretrained could not load it. It now writes exactly what
    PeftModel.save_pretrained writes (the same files, the same tensors) plus cggr_state.pt; CGGRModel.from_pretrained
    (base_model=) and PeftModel.from_pretrained load the adapters back tensor for tensor, trainable."""
    cm, peft_model = trained_cggr(modules_to_save=["lm_head"])
    cm.save_pretrained(str(tmp_path / "cggr"))
    peft_model.save_pretrained(str(tmp_path / "peft"))
    files = set(os.listdir(tmp_path / "cggr"))
    assert files == set(os.listdir(tmp_path / "peft")) | {CGGR_STATE_NAME}
    assert "model.safetensors" not in files and "config.json" not in files
    saved = safetensors.torch.load_file(str(tmp_path / "cggr" / "adapter_model.safetensors"))
    want = safetensors.torch.load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert set(saved) == set(want) and all(torch.equal(saved[k], want[k]) for k in want)
    assert all("lora_" in k or k == "base_model.model.lm_head.weight" for k in saved)  # + modules_to_save's head

    back = CGGRModel.from_pretrained(str(tmp_path / "cggr"), base_model=tiny(), num_router_layers=1,
                                     min_tokens_ratio=0.5, warmup_steps=3, selection="random", seed=4)
    assert isinstance(back.model, PeftModel)
    got, ref = back.model.state_dict(), peft_model.state_dict()
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)  # adapters and the same base
    assert {n for n, p in back.model.named_parameters() if p.requires_grad} == {
        n for n, p in peft_model.named_parameters() if p.requires_grad}
    for name, value in curriculum_state(cm).items():
        assert torch.equal(getattr(back, name), value), name
    assert int(back.step_count) == 2

    plain_peft = PeftModel.from_pretrained(tiny(), str(tmp_path / "cggr"))  # what a PEFT user loads it with
    got = plain_peft.state_dict()
    assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_from_pretrained_without_base_model_loads_the_base_named_in_the_adapter_config(tmp_path):
    """No base_model: AutoPeftModelForCausalLM reads base_model_name_or_path from adapter_config.json (here a local
    directory), loads it and the adapters, trainable."""
    tiny().save_pretrained(str(tmp_path / "base"))
    peft_model = lora(transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base")))
    cm = CGGRModel(peft_model, num_router_layers=1)
    cm.step()
    cm.save_pretrained(str(tmp_path / "adapter"))
    back = CGGRModel.from_pretrained(str(tmp_path / "adapter"), num_router_layers=1)
    assert isinstance(back.model, PeftModel) and int(back.step_count) == 1
    assert_same(back.model.state_dict(), peft_model.state_dict())
    assert {n for n, p in back.model.named_parameters() if p.requires_grad} == set(lora_params(peft_model))


def test_from_pretrained_refuses_what_it_cannot_load(tmp_path):
    cm, _ = trained_cggr()
    cm.save_pretrained(str(tmp_path / "adapter"))
    CGGRModel(tiny(), num_router_layers=1).save_pretrained(str(tmp_path / "plain"))
    with pytest.raises(ValueError, match="holds no adapter"):
        CGGRModel.from_pretrained(str(tmp_path / "plain"), base_model=tiny(), num_router_layers=1)
    with pytest.raises(ValueError, match="not both"):
        CGGRModel.from_pretrained(str(tmp_path / "adapter"), base_model=tiny(), num_router_layers=1,
                                  model_class=transformers.AutoModelForCausalLM)
    with pytest.raises(ValueError, match="already a PeftModel"):
        CGGRModel.from_pretrained(str(tmp_path / "adapter"), base_model=lora(tiny()), num_router_layers=1)
    with pytest.raises(TypeError, match=r"base_model must be a torch\.nn\.Module"):
        CGGRModel.from_pretrained(str(tmp_path / "adapter"), base_model="llama", num_router_layers=1)


# ---------------------------------------------------------------------------------------------- Trainer
TRAINER_CGGR = CGGR_KWARGS  # the same Trainer setup as test_trainer_cggr_model.py, on a PEFT model


def assert_same(got: dict, want: dict):
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name


@pytest.mark.parametrize("callback", [True, False])
def test_trainer_checkpoints_hold_the_adapters_and_resume_bit_for_bit(tmp_path, callback):
    """Trainer(model=CGGRModel(peft_model)) checkpointed the wrapper's whole state dict (base weights included,
    no adapter_config.json). Its checkpoints are now PeftModel.save_pretrained's plus cggr_state.pt; a run resumed
    from checkpoint-2 into a PEFT model with OTHER adapter weights, from another output_dir, ends on exactly the
    uninterrupted run's losses, adapters and curriculum; the frozen base weights never change."""
    full, cm_full = make_trainer(tmp_path / "full", lora(tiny()), callback=callback)
    base_before = {k: v.clone() for k, v in cm_full.model.get_base_model().state_dict().items() if "lora_" not in k}
    full.train()
    ckpt = tmp_path / "full" / "checkpoint-2"
    files = set(os.listdir(ckpt))
    assert {"adapter_config.json", "adapter_model.safetensors", CGGR_STATE_NAME} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin", "config.json"}
    assert_same({k: v for k, v in cm_full.model.get_base_model().state_dict().items() if "lora_" not in k},
                base_before)
    want_ckpt = safetensors.torch.load_file(str(ckpt / "adapter_model.safetensors"))

    resumed, cm_res = make_trainer(tmp_path / "elsewhere", lora(tiny(), seed=9), callback=callback)
    resumed._load_from_checkpoint(str(ckpt))  # what train(resume_from_checkpoint=) calls first
    assert_same(peft.get_peft_model_state_dict(cm_res.model), want_ckpt)  # the tensors really arrived
    resumed.train(resume_from_checkpoint=str(ckpt))

    assert len(losses(full)) == 4 and losses(resumed) == losses(full)
    assert_same(cm_res.model.state_dict(), cm_full.model.state_dict())
    for name, value in curriculum_state(cm_full).items():
        assert torch.equal(getattr(cm_res, name), value), name
    assert int(cm_res.step_count) == 4 and int(cm_res.rng_counter) > 0  # the callback train() adds, or the one passed
    assert {n for n, p in cm_res.model.named_parameters() if p.requires_grad} == set(lora_params(cm_res.model))

    trainer_export = tmp_path / "export"
    full.save_model(str(trainer_export))  # save_model: the adapters too; CGGRModel.from_pretrained loads it
    back = CGGRModel.from_pretrained(str(trainer_export), base_model=tiny(), **TRAINER_CGGR)
    assert_same(back.model.state_dict(), cm_full.model.state_dict())
    assert int(back.step_count) == int(cm_full.step_count)


def test_trainer_resume_refuses_an_adapter_of_another_config(tmp_path):
    """PeftModel.load_adapter (the Trainer's resume) loads with strict=False and the Trainer drops its report: an
    adapter of other target modules would load partly. Refused with the tensors named, before anything loads."""
    trainer, _ = make_trainer(tmp_path / "out", lora(tiny()), steps=2, callback=False)
    trainer.train()
    other, cm_other = make_trainer(tmp_path / "other", lora(tiny(), targets=("q_proj", "k_proj", "v_proj"), seed=3),
                                   callback=False)
    before = {k: v.clone() for k, v in cm_other.model.state_dict().items()}
    with pytest.raises(ValueError, match=r"does not match the PEFT model's adapter 'default': missing \[.*k_proj"):
        other._load_from_checkpoint(str(tmp_path / "out" / "checkpoint-2"))
    assert_same(cm_other.model.state_dict(), before)
    with pytest.raises(ValueError, match="Can't find a valid checkpoint"):  # the Trainer's own message
        other._load_from_checkpoint(str(tmp_path / "nowhere"))
    plain = tmp_path / "plain"  # a full-model checkpoint is not an adapter of this PeftModel either
    CGGRModel(tiny(), num_router_layers=1).save_pretrained(str(plain))
    with pytest.raises(ValueError, match="has tensors that PeftModel does not"):
        other._load_from_checkpoint(str(plain))


def test_trainer_load_best_model_at_end_loads_the_best_adapter(tmp_path):
    """load_best_model_at_end through the Trainer's PEFT branch (a higher eval_loss counts as better, so
    checkpoint-2 is the best while training went on to step 4)."""
    trainer, cm = make_trainer(tmp_path / "out", lora(tiny()), eval_strategy="steps", eval_steps=2,
                               load_best_model_at_end=True, metric_for_best_model="eval_loss",
                               greater_is_better=True, learning_rate=0.01)
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and best.endswith("checkpoint-2")
    want = safetensors.torch.load_file(os.path.join(best, "adapter_model.safetensors"))
    assert_same(peft.get_peft_model_state_dict(cm.model), want)
    assert {n for n, p in cm.model.named_parameters() if p.requires_grad} == set(lora_params(cm.model))


def test_apply_cggr_on_a_peft_trainer_resumes_bit_for_bit(tmp_path):
    """apply_cggr(Trainer(model=peft_model)): the Trainer's model stays the PeftModel (its own PEFT checkpoints);
    a resumed run ends on the uninterrupted run's adapters and curriculum."""
    from cggr.integrations.transformers import apply_cggr

    def run(out, peft_model, resume=None):
        args = dict(per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=4, learning_rate=0.1,
                    optim="sgd", lr_scheduler_type="constant", max_grad_norm=1e9, report_to=[], use_cpu=True,
                    save_strategy="steps", save_steps=2, disable_tqdm=True, seed=0, logging_steps=1)
        trainer = Trainer(model=peft_model, args=TrainingArguments(str(out), **args), train_dataset=padded_rows())
        cm = apply_cggr(trainer, **TRAINER_CGGR)
        trainer.train(resume_from_checkpoint=resume)
        return trainer, cm

    full, cm_full = run(tmp_path / "full", lora(tiny()))
    assert {"adapter_model.safetensors", CGGR_STATE_NAME} <= set(os.listdir(tmp_path / "full" / "checkpoint-2"))
    resumed, cm_res = run(tmp_path / "elsewhere", lora(tiny(), seed=9), resume=str(tmp_path / "full" / "checkpoint-2"))
    assert len(losses(full)) == 4 and losses(resumed) == losses(full)  # steps 1-2 from trainer_state.json
    assert_same(resumed.model.state_dict(), full.model.state_dict())
    for name, value in curriculum_state(cm_full).items():
        assert torch.equal(getattr(cm_res, name), value), name


def test_trainer_activation_checkpointing_recomputes_the_lora_layers(tmp_path):
    """TrainingArguments(activation_checkpointing=True) called CGGRModel.activation_checkpointing_enable, which did
    not exist (AttributeError before the first step). It now enables it on the wrapped model: the last layer (not in
    the router) runs its MLP twice per micro-batch (forward, then recomputed in backward), and the losses and adapters
    equal the run without checkpointing."""
    flag = "activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ else (
        "gradient_checkpointing")

    def run(out, checkpointing):
        trainer, cm = make_trainer(out, lora(tiny()), steps=2, save_strategy="no", **{flag: checkpointing})
        calls, mlp = [], cm.model.get_base_model().model.layers[-1].mlp
        forward = mlp.forward  # counted in forward itself: torch's recomputation runs no module hooks

        def counted(*args, **kwargs):
            calls.append(1)
            return forward(*args, **kwargs)

        mlp.forward = counted
        trainer.train()
        return trainer, cm, len(calls)

    plain, cm_plain, n_plain = run(tmp_path / "plain", False)
    ckpt, cm_ckpt, n_ckpt = run(tmp_path / "ckpt", True)
    assert n_plain == 4 and n_ckpt == 8  # 2 steps x 2 micro-batches, each recomputed once in backward
    assert torch.allclose(torch.tensor(losses(ckpt)), torch.tensor(losses(plain)), rtol=1e-6)
    for (name, a), b in zip(lora_params(cm_ckpt.model).items(), lora_params(cm_plain.model).values()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), name
        assert not torch.equal(a, lora_params(lora(tiny()))[name])  # trained



def test_trainer_resumes_every_adapter_of_a_multi_adapter_model(tmp_path):
    """Two adapters: PeftModel.save_pretrained writes the inactive one in a subdirectory named after it, and the
    Trainer's PEFT branch loads both; the key check covers the subdirectory's adapter too (another LoraConfig for
    'second' is refused, naming it)."""
    def two(seed, second_targets=("k_proj",)):
        peft_model = lora(tiny(), seed=seed)
        torch.manual_seed(seed + 100)
        peft_model.add_adapter("second", LoraConfig(r=2, lora_alpha=4, target_modules=list(second_targets),
                                                    init_lora_weights=False))
        return peft_model

    full, cm_full = make_trainer(tmp_path / "full", two(1), callback=False)
    full.train()
    ckpt = tmp_path / "full" / "checkpoint-2"
    assert {"adapter_model.safetensors", "adapter_config.json"} <= set(os.listdir(ckpt / "second"))
    resumed, cm_res = make_trainer(tmp_path / "elsewhere", two(9), callback=False)
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert losses(resumed) == losses(full)
    assert_same(cm_res.model.state_dict(), cm_full.model.state_dict())  # 'second' (never trained) included
    assert cm_res.model.active_adapters == ["default"]

    other, _ = make_trainer(tmp_path / "other", two(9, second_targets=("o_proj",)), callback=False)
    with pytest.raises(ValueError, match=r"adapter 'second': missing \[.*o_proj"):
        other._load_from_checkpoint(str(ckpt))
