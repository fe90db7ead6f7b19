"""``step_count`` on CUDA: in-place writes set the curriculum, and the warm-up never syncs the host.

CGGRLoss / CGGRScorer compute the warm-up ratio from the buffer on its device (no host read at all); CGGRModel
needs k on the host and reads the buffer once after an outside write, never after its own ``step()``. A loss left
on the CPU (its buffer too) with CUDA inputs reads the CPU buffer (free) and syncs nothing either.
"""

from __future__ import annotations

import pytest
import torch

from cggr import CGGRLoss, CGGRModel
from tests.reference import k_of

pytestmark = pytest.mark.cuda

WARMUP, MIN_RATIO = 1000, 0.25
STRATEGIES = ["topk", "stratified", "sequence_aware", "fixed_quota", "random"]


def _ratio(step: int) -> float:
    return 1.0 - min(1.0, step / WARMUP) * (1.0 - MIN_RATIO)


def _inputs():
    logits = torch.randn(4, 64, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, 4096, (4, 64), device="cuda")
    targets[1, :7] = -100
    return logits, targets


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("module_on_cuda", [True, False])
def test_loss_warm_up_follows_the_buffer_without_host_sync(strategy, dynamic, module_on_cuda):
    logits, targets = _inputs()
    n_valid = int((targets != -100).sum())
    crit = CGGRLoss(selection=strategy, min_tokens_ratio=MIN_RATIO, warmup_steps=WARMUP, dynamic_threshold=dynamic,
                    seed=0)
    if module_on_cuda:
        crit = crit.cuda()
    crit(logits, targets).backward()  # warms up kernels
    crit.step_count.fill_(499)
    crit.step()  # reads the outside write once (the forward never reads the buffer on the host)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            loss = crit(logits, targets)
            loss.backward()
            crit.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item()
    m = crit.get_metrics()
    assert m["step"] == 503
    if not dynamic and strategy != "sequence_aware":
        assert m["tokens_selected"] == k_of(_ratio(502), n_valid)


def test_model_reads_the_buffer_after_an_outside_write_only():
    vocab = 1001
    ids = torch.randint(0, vocab, (8, 32), device="cuda")
    router_logits = torch.randn(8, 32, vocab, device="cuda", dtype=torch.bfloat16)

    class TinyLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(vocab, device="cuda") * 0.01)

        def forward(self, input_ids, attention_mask=None):
            return input_ids.unsqueeze(-1).float() * self.w

    cm = CGGRModel(TinyLM(), router=lambda x, **kw: router_logits, min_tokens_ratio=MIN_RATIO, warmup_steps=WARMUP)
    assert cm.step_count.is_cuda
    cm(ids, labels=ids).loss.backward()  # warm-up
    cm.step_count.fill_(1000)
    cm(ids, labels=ids).loss.backward()  # reads the written value once
    assert cm.get_metrics()["sequences_selected"] == 2 and cm.get_metrics()["step"] == 1000
    cm.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        cm(ids, labels=ids).loss.backward()  # after its own step(): the mirror, no read
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert cm.get_metrics()["step"] == 1001
