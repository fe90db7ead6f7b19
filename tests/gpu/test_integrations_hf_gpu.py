"""CUDA: the Trainer integration on the paths that only run on a GPU — CGGRModel's fused head (Triton selective
linear cross-entropy, picked automatically on CUDA) and CGGRLoss's Triton scoring — under gradient accumulation
(``num_items_in_batch``), in evaluation, and against the plain model's Trainer run."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments  # noqa: E402

from cggr import CGGRLoss, CGGRModel  # noqa: E402
from cggr.integrations.transformers import apply_cggr  # noqa: E402

pytestmark = pytest.mark.cuda
V = 1001  # not a power of two, larger than one vocabulary tile


@pytest.fixture(autouse=True)
def _no_tf32():
    """fp32 matmuls without TF32, so that the plain and the CGGR runs agree to fp32 rounding."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(old)


def _llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def _rows(n: int = 16, t: int = 24, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ids = torch.randint(0, V, (t,), generator=g)
        length = 4 + int(torch.randint(0, t - 4, (), generator=g)) if i % 3 else t
        mask = (torch.arange(t) < length).long()
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return rows


def _train(tmp_path, accumulation: int, setup=None):
    args = TrainingArguments(str(tmp_path / f"acc{accumulation}"), per_device_train_batch_size=8 // accumulation,
                             gradient_accumulation_steps=accumulation, max_steps=3, learning_rate=0.1, optim="sgd",
                             lr_scheduler_type="constant", logging_steps=1, max_grad_norm=1e9, report_to=[],
                             save_strategy="no", disable_tqdm=True, seed=0, per_device_eval_batch_size=16)
    trainer = Trainer(model=_llama(), args=args, train_dataset=_rows(), eval_dataset=_rows())
    installed = setup(trainer) if setup else None
    trainer.train()
    logs = [(h["loss"], h["grad_norm"]) for h in trainer.state.log_history if "grad_norm" in h]
    return trainer, logs, installed


def _close(got, want, rtol):
    assert len(got) == len(want)
    for (lg, ng), (lw, nw) in zip(got, want):
        assert math.isclose(lg, lw, rel_tol=rtol) and math.isclose(ng, nw, rel_tol=rtol), (got, want)


@pytest.mark.parametrize("mode", ["model", "loss"])
def test_trainer_accumulation_on_cuda_equals_the_plain_model_during_warmup(tmp_path, mode, monkeypatch):
    """apply_cggr on CUDA: the fused head (CGGRModel) or the Triton scoring (CGGRLoss) under the Trainer; every
    token kept during warm-up, so accumulation 1 and 4 equal the plain model's run (fp32, TF32 off)."""
    import cggr._fused_head as fused_head_module  # CGGRModel's fused head calls linear_cross_entropy here

    fused_calls = [0]
    real = fused_head_module.linear_cross_entropy
    monkeypatch.setattr(fused_head_module, "linear_cross_entropy",
                        lambda *a, **k: fused_calls.__setitem__(0, fused_calls[0] + 1) or real(*a, **k))

    def setup(trainer):
        if mode == "model":
            return apply_cggr(trainer, num_router_layers=1, min_tokens_ratio=0.25, warmup_steps=1000)
        return apply_cggr(trainer, loss=CGGRLoss(min_tokens_ratio=0.25, warmup_steps=1000))

    plain = {acc: _train(tmp_path / "plain", acc) for acc in (1, 4)}
    for acc in (1, 4):
        trainer, logs, installed = _train(tmp_path / mode, acc, setup)
        assert trainer.args.device.type == "cuda"
        _close(logs, plain[acc][1], rtol=2e-4)
        _close(logs, plain[1][1], rtol=2e-4)
        assert int(installed.step_count) == 3
        assert math.isclose(trainer.evaluate()["eval_loss"], plain[acc][0].evaluate()["eval_loss"], rel_tol=1e-5)
    if mode == "model":
        assert fused_calls[0] == 3 * (1 + 4)  # every training micro-batch through the fused head


@pytest.mark.parametrize("token_ratio", [None, 0.5])
def test_fused_head_num_items_in_batch_cuda(token_ratio):
    """Four identical micro-batches with num_items_in_batch == their concatenation, through the auto-picked fused
    head; and the same through the unfused path (loss and gradients, fp32). Two unpadded rows of 24 targets: the
    kept token share is the same in a micro-batch (12 of 24) and in the concatenation (48 of 96)."""
    model = _llama(5).cuda()
    rows = _rows(4, t=25, seed=9)
    mb = {k: torch.stack([rows[0][k], rows[3][k]]).cuda() for k in rows[0]}  # rows 0 and 3 are unpadded
    four = {k: torch.cat([v] * 4) for k, v in mb.items()}
    n4 = int((four["labels"][:, 1:] != -100).sum())

    def run(fused, batch, calls, num_items):
        cm = CGGRModel(model, num_router_layers=1, min_tokens_ratio=0.5, warmup_steps=0, fused_head=fused,
                       token_ratio=token_ratio)
        model.zero_grad(set_to_none=True)
        loss = sum(cm(**batch, num_items_in_batch=num_items).loss for _ in range(calls))
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    l_auto, g_auto = run(None, mb, 4, torch.tensor(n4, device="cuda"))
    l_plain, g_plain = run(False, mb, 4, n4)
    l_one, g_one = run(None, four, 1, None)
    torch.testing.assert_close(l_auto, l_plain, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(l_auto, l_one, rtol=1e-4, atol=1e-6)
    for a, b, c in zip(g_auto, g_plain, g_one):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=1e-5)
        torch.testing.assert_close(a, c, rtol=2e-3, atol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_cggr_loss_eval_is_the_full_loss_cuda(dtype, tol):
    """CGGRLoss in eval mode / under no grad on CUDA (Triton scoring, Triton fused head): the full loss."""
    torch.manual_seed(3)
    logits = torch.randn(4, 33, V, device="cuda", dtype=dtype)
    targets = torch.randint(0, V, (4, 33), device="cuda")
    targets[1, 10:] = -100
    crit = CGGRLoss(min_tokens_ratio=0.25, warmup_steps=0)
    want = F.cross_entropy(logits.double().flatten(0, 1), targets.flatten(), ignore_index=-100)
    with torch.no_grad():
        got = crit(logits, targets)
    assert abs(float(got) - float(want)) <= tol * float(want)
    hidden = torch.randn(4, 33, 64, device="cuda", dtype=dtype)
    weight = torch.randn(V, 64, device="cuda", dtype=dtype) * 0.1
    want_h = F.cross_entropy((hidden.double() @ weight.double().T).flatten(0, 1), targets.flatten(),
                             ignore_index=-100)
    n = int((targets != -100).sum())
    crit.eval()
    got_h = crit.forward_hidden(hidden, weight, targets, num_items_in_batch=2 * n)
    assert abs(float(got_h) - float(want_h) / 2) <= tol * float(want_h)
