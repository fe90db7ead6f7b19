"""transformers.Trainer with CGGRModel / CGGRLoss: train, evaluate, gradient accumulation, save, reload, resume.

References: the same Trainer run on the plain model (HF's own loss, which normalises by ``num_items_in_batch``),
and fp64 recomputation of the selective loss from the selected rows.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainingArguments,
)

from cggr import CGGRLoss, CGGRModel  # noqa: E402
from cggr.integrations.transformers import (  # noqa: E402
    CGGR_STATE_NAME,
    CGGRCallback,
    apply_cggr,
    cggr_loss_func,
)
from cggr.model import CGGROutput  # noqa: E402
from tests.tiny_models import tiny_llama as shared_tiny_llama  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
V = 96


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    return shared_tiny_llama(V, seed=seed, intermediate_size=64)


def padded_rows(n: int = 16, t: int = 12, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """Rows of different lengths, right-padded (label -100, attention 0): micro-batches hold different numbers of
    targets, so a mean of per-micro-batch means differs from the mean over the accumulated batch."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ids = torch.randint(0, V, (t,), generator=g)
        length = 3 + int(torch.randint(0, t - 2, (), generator=g)) if i % 3 else t
        mask = (torch.arange(t) < length).long()
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return rows


def run_trainer(tmp_path, accumulation: int, setup=None, *, model=None, steps: int = 3, rows=None, **args):
    model = model if model is not None else tiny_llama()
    kw = dict(per_device_train_batch_size=8 // accumulation, gradient_accumulation_steps=accumulation,
              max_steps=steps, learning_rate=0.1, optim="sgd", lr_scheduler_type="constant", logging_steps=1,
              max_grad_norm=1e9, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0,
              per_device_eval_batch_size=16)
    kw.update(args)
    trainer_model = setup.get("wrap", lambda m: m)(model) if setup else model
    rows = rows if rows is not None else padded_rows()
    trainer = Trainer(model=trainer_model, args=TrainingArguments(str(tmp_path / f"out{accumulation}"), **kw),
                      train_dataset=rows, eval_dataset=rows, callbacks=setup.get("callbacks") if setup else None,
                      compute_loss_func=setup.get("loss_func") if setup else None)
    installed = setup["apply"](trainer) if setup and "apply" in setup else None
    trainer.train()
    logs = [(h["loss"], h["grad_norm"]) for h in trainer.state.log_history if "grad_norm" in h]
    return trainer, logs, installed


def assert_logs_close(got, want, rtol=2e-5):
    assert len(got) == len(want)
    for (lg, ng), (lw, nw) in zip(got, want):
        assert math.isclose(lg, lw, rel_tol=rtol) and math.isclose(ng, nw, rel_tol=rtol), (got, want)


@pytest.fixture(scope="module")
def plain_runs(tmp_path_factory):
    """The plain model under the Trainer at accumulation 1 and 4 (HF's loss: sum / num_items_in_batch)."""
    tmp = tmp_path_factory.mktemp("plain")
    out = {}
    for acc in (1, 4):
        trainer, logs, _ = run_trainer(tmp, acc)
        out[acc] = (logs, trainer.evaluate()["eval_loss"], trainer.model.state_dict())
    assert_logs_close(out[4][0], out[1][0])  # HF's own accumulation is exact: the reference is sound
    return out


# ---------------------------------------------------------------------------------------------- CGGRModel in Trainer
@pytest.mark.parametrize("accumulation", [1, 4])
def test_trainer_model_cggr_model_trains_evaluates_and_steps_once_per_optimizer_step(tmp_path, plain_runs,
                                                                                      accumulation):
    """Trainer(model=CGGRModel(...)): train() and evaluate() used to raise IndexError (a bare 0-d loss); the
    curriculum never moved. During warm-up every sequence is kept, so the run equals the plain model's: the same
    logged loss and gradient norm at accumulation 1 and 4 (num_items_in_batch), the same eval_loss."""
    holder = {}

    def wrap(m):
        holder["cm"] = CGGRModel(m, num_router_layers=1, min_tokens_ratio=0.25, warmup_steps=1000)
        return holder["cm"]

    trainer, logs, _ = run_trainer(tmp_path, accumulation, {"wrap": wrap, "callbacks": [CGGRCallback()]})
    cm = holder["cm"]
    want_logs, want_eval, _ = plain_runs[accumulation]
    assert_logs_close(logs, want_logs)
    assert_logs_close(logs, plain_runs[1][0])  # accumulation 4 == accumulation 1
    assert math.isclose(trainer.evaluate()["eval_loss"], want_eval, rel_tol=1e-5)
    assert int(cm.step_count) == trainer.state.global_step == 3  # per optimizer step, not per micro-batch
    assert cm.get_metrics()["batch_size"] == 8 // accumulation


def test_apply_cggr_after_warmup_trains_on_the_hardest_sequences_and_evaluates_the_plain_loss(tmp_path, plain_runs):
    """apply_cggr: training micro-batches go through CGGRModel (here half of each micro-batch, the hardest), eval
    through the Trainer's own loss: eval_loss is exactly what the plain model's Trainer reports for the same weights."""
    setup = {"apply": lambda tr: apply_cggr(tr, num_router_layers=1, min_tokens_ratio=0.5, warmup_steps=0)}
    trainer, logs, cm = run_trainer(tmp_path, 2, setup, steps=2)
    assert isinstance(cm, CGGRModel) and int(cm.step_count) == 2
    assert cm.get_metrics()["sequences_selected"] == 2 and cm.get_metrics()["batch_size"] == 4
    assert not math.isclose(logs[0][0], plain_runs[1][0][0][0], rel_tol=1e-3)  # a different (selective) loss
    eval_loss = trainer.evaluate()["eval_loss"]
    args = TrainingArguments(str(tmp_path / "ev"), report_to=[], use_cpu=True, per_device_eval_batch_size=16)
    plain = Trainer(model=tiny_llama(), args=args, eval_dataset=padded_rows())
    plain.model.load_state_dict(trainer.model.state_dict())
    assert math.isclose(eval_loss, plain.evaluate()["eval_loss"], rel_tol=1e-6)


def test_cggr_model_num_items_in_batch_is_the_token_weighted_selective_mean():
    """Σ over micro-batches of cm(mb, num_items_in_batch=N).loss = Σ_m mean_m(kept nll) · n_m / N (fp64 reference,
    loss and gradients); identical micro-batches give exactly the loss and gradient of their concatenation."""
    model = tiny_llama(3).double()
    cm = CGGRModel(model, num_router_layers=1, min_tokens_ratio=0.5, warmup_steps=0)
    rows = padded_rows(8, seed=5)
    batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    n_total = int((batch["labels"][:, 1:] != -100).sum())  # what the Trainer counts for a causal LM
    got_loss = 0.0
    ref_terms = []
    for s in range(0, 8, 2):
        mb = {k: v[s:s + 2] for k, v in batch.items()}
        got_loss = got_loss + cm(**mb, num_items_in_batch=torch.tensor(n_total)).loss
        sel = torch.tensor(cm.get_metrics()["selected_indices"])  # (1,)
        logits = model(input_ids=mb["input_ids"][sel], attention_mask=mb["attention_mask"][sel]).logits
        targets = mb["labels"][sel][:, 1:]
        kept_mean = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-100)
        ref_terms.append(kept_mean * int((mb["labels"][:, 1:] != -100).sum()) / n_total)
    model.zero_grad(set_to_none=True)
    got_loss.backward()
    got_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    ref = sum(ref_terms)
    ref.backward()
    # CGGRModel's loss is fp32 (logits.float(), as HF's own loss): fp32-level agreement with the fp64 reference
    torch.testing.assert_close(got_loss.double(), ref, rtol=1e-6, atol=1e-8)
    for g, p in zip(got_grads, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-8)

    # four copies of one micro-batch == the batch of the four copies (same selection, same share kept)
    mb = {k: v[2:4] for k, v in batch.items()}
    four = {k: torch.cat([v] * 4) for k, v in mb.items()}
    n4 = int((four["labels"][:, 1:] != -100).sum())
    model.zero_grad(set_to_none=True)
    acc = sum(cm(**mb, num_items_in_batch=n4).loss for _ in range(4))
    acc.backward()
    acc_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    one = cm(**four).loss
    one.backward()
    torch.testing.assert_close(acc, one, rtol=1e-6, atol=1e-8)
    for g, p in zip(acc_grads, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("token_ratio", [None, 0.5])
def test_fused_head_num_items_in_batch_equals_the_unfused_path(token_ratio):
    """The fused head (fused_head=True; on the CPU its PyTorch path) scales by n / N as the unfused path does, and
    four identical micro-batches equal their concatenation (loss and gradients)."""
    model = tiny_llama(12)
    rows = padded_rows(4, t=13, seed=13)  # rows 0 and 3 unpadded: 12 targets each, token_ratio keeps 6 of 12
    mb = {k: torch.stack([rows[0][k], rows[3][k]]) for k in rows[0]}
    four = {k: torch.cat([v] * 4) for k, v in mb.items()}
    n4 = int((four["labels"][:, 1:] != -100).sum())

    def loss_and_grads(fused, batch, calls, num_items):
        cm = CGGRModel(model, num_router_layers=1, min_tokens_ratio=0.5, warmup_steps=0, fused_head=fused,
                       token_ratio=token_ratio, impl="torch")
        model.zero_grad(set_to_none=True)
        loss = sum(cm(**batch, num_items_in_batch=num_items).loss for _ in range(calls))
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    l_fused, g_fused = loss_and_grads(True, mb, 4, n4)
    l_plain, g_plain = loss_and_grads(False, mb, 4, n4)
    l_one, g_one = loss_and_grads(True, four, 1, None)
    torch.testing.assert_close(l_fused, l_plain, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(l_fused, l_one, rtol=1e-5, atol=1e-7)
    for a, b, c in zip(g_fused, g_plain, g_one):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-7)


def test_cggr_output_reads_like_a_model_output():
    loss, logits = torch.tensor(1.5), torch.zeros(2, 3, 4)
    out = CGGROutput(loss=loss, logits=logits)
    assert out[0] is loss and out["loss"] is loss and out.to_tuple() == (loss, logits)
    assert out[1:] == (logits,) and list(out.keys()) == ["loss", "logits"]
    first, second = out
    assert first is loss and second is logits
    fused = CGGROutput(loss=loss)  # fused head: no logits
    assert fused.to_tuple() == (loss,) and fused[1:] == () and len(fused) == 1
    with pytest.raises(KeyError):
        fused["logits"]


def test_num_items_in_batch_is_checked():
    cm = CGGRModel(tiny_llama(), num_router_layers=1)
    ids = torch.randint(0, V, (2, 5))
    for bad in (0, -3, 2.5, True, torch.ones(2)):
        with pytest.raises(ValueError, match="num_items_in_batch"):
            cm(ids, labels=ids, num_items_in_batch=bad)
    crit = CGGRLoss(reduction="sum")
    with pytest.raises(ValueError, match=r"num_items_in_batch.*reduction='sum'"):
        crit(torch.randn(4, 7), torch.arange(4), num_items_in_batch=4)


# ---------------------------------------------------------------------------------------------- CGGRLoss in Trainer
def test_cggr_loss_func_is_exact_under_gradient_accumulation_during_warmup(tmp_path, plain_runs):
    """compute_loss_func=cggr_loss_func(CGGRLoss): the logged loss and gradient norm were 4x at accumulation 4
    (num_items_in_batch ignored, and the Trainer does not divide a compute_loss_func's loss). Every token is kept
    during warm-up, so accumulation 1 and 4 equal each other and the plain model's run."""
    for acc in (1, 4):
        crit = CGGRLoss(min_tokens_ratio=0.25, warmup_steps=1000)
        setup = {"loss_func": cggr_loss_func(crit), "callbacks": [CGGRCallback(crit)]}
        trainer, logs, _ = run_trainer(tmp_path, acc, setup)
        assert_logs_close(logs, plain_runs[acc][0])
        assert_logs_close(logs, plain_runs[1][0])
        assert int(crit.step_count) == 3
        assert math.isclose(trainer.evaluate()["eval_loss"], plain_runs[acc][1], rel_tol=1e-5)


def test_cggr_loss_accumulation_equals_one_batch_when_every_micro_batch_keeps_the_same_share(tmp_path):
    """After warm-up (ratio 0.5) with rows that are all one sequence, every micro-batch keeps the same share of its
    tokens as the whole batch (22 -> 11 and 88 -> 44 targets; a dynamic threshold would round K per micro-batch):
    accumulation 4 == accumulation 1 (they were 4x apart)."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, V, (12,), generator=g)
    rows = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()} for _ in range(8)]
    logs = {}
    for acc in (1, 4):
        crit = CGGRLoss(min_tokens_ratio=0.5, warmup_steps=0, dynamic_threshold=False)
        setup = {"apply": lambda tr, crit=crit: apply_cggr(tr, loss=crit)}
        _, logs[acc], installed = run_trainer(tmp_path, acc, setup, rows=rows, steps=2)
        assert installed is crit and int(crit.step_count) == 2 and crit.get_metrics()["token_ratio"] < 1
    assert_logs_close(logs[4], logs[1])


def test_cggr_loss_num_items_in_batch_reference():
    """num_items_in_batch = this call's valid targets gives the plain selective mean; otherwise the selective
    mean × n / N (fp64 reference over the selected rows)."""
    torch.manual_seed(8)
    logits = torch.randn(3, 9, 31, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 31, (3, 9))
    targets[0, :4] = -100
    crit = CGGRLoss(min_tokens_ratio=0.4, warmup_steps=0, dynamic_threshold=False)
    plain = crit(logits, targets)  # a 0-d fp32 loss
    n = int((targets != -100).sum())
    torch.testing.assert_close(crit(logits, targets, num_items_in_batch=n), plain, rtol=1e-6, atol=0)
    got = crit(logits, targets, num_items_in_batch=torch.tensor(4 * n))
    mask, _ = crit.select(logits, targets)
    nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten().clamp(min=0), reduction="none")
    want = nll[mask.flatten()].mean() * n / (4 * n)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)
    (g_got,) = torch.autograd.grad(got, logits)
    (g_want,) = torch.autograd.grad(want, logits)
    torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("mode", ["eval", "no_grad"])
@pytest.mark.parametrize("selection", ["topk", "random"])
def test_cggr_loss_in_eval_mode_or_without_grad_is_the_full_loss(mode, selection):
    """CGGRLoss had no eval behaviour: eval_loss was the selective loss (6.037 instead of 5.912 in the report)."""
    torch.manual_seed(9)
    logits = torch.randn(4, 10, 37)
    targets = torch.randint(0, 37, (4, 10))
    targets[2, 5:] = -100
    crit = CGGRLoss(min_tokens_ratio=0.25, warmup_steps=0, selection=selection, seed=1)
    train = crit(logits, targets)
    metrics, counter = crit.get_metrics(), crit.rng_counter.clone()
    want = F.cross_entropy(logits.double().flatten(0, 1), targets.flatten(), ignore_index=-100)
    if mode == "eval":
        crit.eval()
        got = crit(logits, targets)
    else:
        with torch.no_grad():
            got = crit(logits, targets)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-7)
    assert abs(float(train) - float(want)) > 1e-3  # the training call was selective
    assert crit.get_metrics() == metrics and torch.equal(crit.rng_counter, counter)  # eval draws and logs nothing
    if mode == "eval":  # HF's eval loss under accumulation-aware counting: sum / N
        n = int((targets != -100).sum())
        got_half = crit(logits, targets, num_items_in_batch=2 * n)
        torch.testing.assert_close(got_half.double(), want / 2, rtol=1e-6, atol=1e-7)


def test_cggr_loss_forward_hidden_eval_is_the_full_loss():
    torch.manual_seed(10)
    hidden = torch.randn(2, 7, 16, dtype=torch.float64)
    weight = torch.randn(29, 16, dtype=torch.float64)
    targets = torch.randint(0, 29, (2, 7))
    targets[1, 3:] = -100
    crit = CGGRLoss(min_tokens_ratio=0.25, warmup_steps=0, impl="torch").eval()
    want = F.cross_entropy((hidden @ weight.T).flatten(0, 1), targets.flatten(), ignore_index=-100)
    torch.testing.assert_close(crit.forward_hidden(hidden, weight, targets).double(), want, rtol=1e-6, atol=1e-8)
    n = int((targets != -100).sum())
    third = crit.forward_hidden(hidden, weight, targets, num_items_in_batch=3 * n)
    torch.testing.assert_close(third.double(), want / 3, rtol=1e-6, atol=1e-8)


# ---------------------------------------------------------------------------------------------- save / load / resume
def test_apply_cggr_checkpoints_load_as_the_plain_model_and_resume_the_curriculum(tmp_path):
    """save_model() used to write ``model.model.*`` keys and no config. With apply_cggr the Trainer's model stays the
    plain one: AutoModelForCausalLM.from_pretrained loads it; each checkpoint carries cggr_state.pt, and a resumed
    run ends where the uninterrupted one does (weights and curriculum)."""
    common = dict(steps=4, save_strategy="steps", save_steps=2, save_total_limit=None)

    def apply(tr):
        return apply_cggr(tr, num_router_layers=1, min_tokens_ratio=0.5, warmup_steps=3, selection="random", seed=4)

    full, _, cm_full = run_trainer(tmp_path / "full", 2, {"apply": apply}, **common)
    out = tmp_path / "export"
    full.save_model(str(out))
    loaded = AutoModelForCausalLM.from_pretrained(str(out))
    assert type(loaded) is LlamaForCausalLM
    for (name, a), b in zip(full.model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name

    ckpt = tmp_path / "full" / "out2" / "checkpoint-2"
    saved = torch.load(ckpt / CGGR_STATE_NAME, weights_only=True)
    assert saved["global_step"] == 2 and int(saved["modules"][0]["step_count"]) == 2
    assert int(saved["modules"][0]["rng_counter"]) > 0  # selection='random' drew

    model = tiny_llama()
    args = dict(per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=4, learning_rate=0.1,
                optim="sgd", lr_scheduler_type="constant", report_to=[], use_cpu=True, save_strategy="no",
                disable_tqdm=True, seed=0, max_grad_norm=1e9)
    resumed = Trainer(model=model, args=TrainingArguments(str(tmp_path / "full" / "out2"), **args),
                      train_dataset=padded_rows())
    cm_res = apply(resumed)
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert int(cm_res.step_count) == int(cm_full.step_count) == 4
    assert torch.equal(cm_res.rng_counter, cm_full.rng_counter) and torch.equal(cm_res.rng_seed, cm_full.rng_seed)
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


def test_resume_without_cggr_state_sets_the_step_from_global_step(tmp_path):
    crit = CGGRLoss(min_tokens_ratio=0.5, warmup_steps=10)
    cb = CGGRCallback(crit)

    class Args:
        output_dir = str(tmp_path)
        resume_from_checkpoint = None

    class State:
        global_step = 6

    with pytest.warns(UserWarning, match="without cggr_state.pt"):
        cb.on_train_begin(Args(), State(), None)
    assert int(crit.step_count) == 6 and crit.current_ratio == pytest.approx(1 - 0.6 * 0.5)
    with pytest.raises(TypeError, match=r"modules\[1\]"):
        CGGRCallback(crit, torch.nn.Linear(2, 2))


def test_cggr_model_save_pretrained_and_from_pretrained(tmp_path):
    model = tiny_llama(11)
    cm = CGGRModel(model, num_router_layers=1, min_tokens_ratio=0.5, warmup_steps=8, selection="random", seed=2)
    ids = torch.randint(0, V, (4, 6))
    for _ in range(3):
        cm(ids, labels=ids)
        cm.step()
    cm.save_pretrained(str(tmp_path))
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    assert set(plain.state_dict()) == set(model.state_dict())  # no ``model.`` prefix, config written
    for name, p in model.state_dict().items():
        assert torch.equal(plain.state_dict()[name], p), name
    back = CGGRModel.from_pretrained(str(tmp_path), num_router_layers=1, min_tokens_ratio=0.5, warmup_steps=8,
                                     selection="random", seed=2)
    assert isinstance(back.model, LlamaForCausalLM) and int(back.step_count) == 3
    explicit = CGGRModel.from_pretrained(str(tmp_path), model_class=LlamaForCausalLM,
                                         model_kwargs={"dtype": torch.float64}, num_router_layers=1)
    assert next(explicit.model.parameters()).dtype == torch.float64 and int(explicit.step_count) == 3
    assert back.current_ratio == cm.current_ratio and torch.equal(back.rng_counter, cm.rng_counter)
    cm(ids, labels=ids)
    back(ids, labels=ids)
    assert cm.get_metrics()["selected_indices"] == back.get_metrics()["selected_indices"]  # the same stream

    from tests.tiny_gpt import TinyGPT

    gpt = TinyGPT()
    with pytest.raises(TypeError, match="save_pretrained"):
        CGGRModel(gpt, router=lambda i, attention_mask=None: gpt(i)).save_pretrained(str(tmp_path / "x"))


def test_apply_cggr_arguments_are_checked(tmp_path):
    args = TrainingArguments(str(tmp_path), report_to=[], use_cpu=True)
    with pytest.raises(TypeError, match=r"transformers\.Trainer"):
        apply_cggr(object())
    wrapped = Trainer(model=CGGRModel(tiny_llama(), num_router_layers=1), args=args)
    with pytest.raises(TypeError, match="plain model"):
        apply_cggr(wrapped)
    trainer = Trainer(model=tiny_llama(), args=args)
    with pytest.raises(TypeError, match="no CGGRModel arguments"):
        apply_cggr(trainer, loss=CGGRLoss(), min_tokens_ratio=0.5)
    with pytest.raises(TypeError, match="CGGRLoss"):
        cggr_loss_func(torch.nn.CrossEntropyLoss())
    apply_cggr(trainer, num_router_layers=1)
    with pytest.raises(ValueError, match="already has a CGGRCallback"):
        apply_cggr(trainer, num_router_layers=1)
    smoothing = TrainingArguments(str(tmp_path), report_to=[], use_cpu=True, label_smoothing_factor=0.1)
    with pytest.raises(ValueError, match="label smoothing"):  # the Trainer's smoothed loss would bypass CGGR
        apply_cggr(Trainer(model=tiny_llama(), args=smoothing))
    with pytest.raises(ValueError, match="compute_loss_func"):
        apply_cggr(Trainer(model=tiny_llama(), args=args, compute_loss_func=lambda *a, **k: 0), num_router_layers=1)


# ---------------------------------------------------------------------------------------------- packaging
def test_hf_extra_brings_accelerate():
    """TrainingArguments needs accelerate; ``pip install ".[hf]"`` did not install it."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(re.match(r"accelerate\b", dep) for dep in extras["hf"])
    assert any(re.match(r"transformers\b", dep) for dep in extras["hf"])


def test_readme_never_installs_the_unrelated_pypi_package():
    """``pip install cggr`` installs another project (cggr 0.5.0 on PyPI); the README must install this code."""
    readme = (ROOT / "README.md").read_text()
    for line in readme.splitlines():
        for cmd in re.findall(r"pip install\s+([^\s#]+)", line):
            assert not re.fullmatch(r"[\"']?cggr(\[[\w,]+\])?[\"']?", cmd), line
    install = readme.split("## Install", 1)[1].split("\n## ", 1)[0]
    assert 'pip install -e ".[hf]"' in install and "pip wheel" in install


# ---------------------------------------------------------------------------------------------- Accelerate
def test_router_under_accelerate_mixed_precision_runs_only_its_layers():
    """accelerator.prepare(model) with mixed precision (what the Trainer does with bf16=True) patches
    ``model.forward`` on the instance, bound to the model; the router's shell copied that method and so ran the
    whole model (all 4 layers) as its "1-layer" router. The shell now binds it to itself, keeping the autocast."""
    from accelerate import Accelerator

    from cggr import create_truncated_router

    torch.manual_seed(14)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                      num_key_value_heads=1)
    model = LlamaForCausalLM(cfg)
    before = create_truncated_router(model, 1)  # built before prepare(): must notice the patched forward
    ids = torch.randint(0, V, (3, 9))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = before(ids).float()  # 1 layer under the autocast Accelerate applies
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # a singleton: the Trainer tests set fp32 before
    try:
        Accelerator(mixed_precision="bf16", cpu=True).prepare(model)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert "forward" in vars(model)  # Accelerate's instance-level wrapper
    ran = []
    hooks = [layer.register_forward_hook(lambda mod, a, o, i=i: ran.append(i))
             for i, layer in enumerate(model.model.layers)]
    for router in (before, create_truncated_router(model, 1)):
        ran.clear()
        with torch.no_grad():
            got = router(ids)
        assert ran == [0]
        torch.testing.assert_close(got.float(), want, rtol=0, atol=0)
    ran.clear()
    with torch.no_grad():  # the model itself still runs every layer, with Accelerate's wrapper
        model(input_ids=ids)
    assert ran == [0, 1, 2, 3]
    for h in hooks:
        h.remove()
