"""CGGRLoss on CUDA: same results as on CPU, and no host synchronisation in the hot path."""

from __future__ import annotations

import pytest
import torch

from cggr import CGGRLoss

pytestmark = pytest.mark.cuda

STRATEGIES = ["topk", "stratified", "sequence_aware", "fixed_quota", "random"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("strategy", ["topk", "sequence_aware", "fixed_quota", "random"])
def test_cuda_matches_cpu(strategy, dtype):  # 'random': the counter-based source draws the same on every device
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    logits = (torch.randn(3, 37, 1031, generator=g) * 2).to(dtype)
    targets = torch.randint(0, 1031, (3, 37), generator=g)
    targets[:, :5] = -100
    kw = dict(selection=strategy, min_tokens_ratio=0.3, warmup_steps=0, dynamic_threshold=False, seed=4)
    cpu_logits = logits.clone().requires_grad_()
    cpu_loss = CGGRLoss(**kw)(cpu_logits, targets)
    cpu_loss.backward()
    gpu_logits = logits.cuda().requires_grad_()
    gpu_loss = CGGRLoss(**kw)(gpu_logits, targets.cuda())
    gpu_loss.backward()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(gpu_loss.cpu(), cpu_loss, rtol=tol, atol=tol)
    torch.testing.assert_close(gpu_logits.grad.float().cpu(), cpu_logits.grad.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_no_host_sync_with_fixed_ratio(strategy):
    logits = torch.randn(4, 64, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, 4096, (4, 64), device="cuda")
    crit = CGGRLoss(selection=strategy, min_tokens_ratio=0.25, warmup_steps=0, dynamic_threshold=False, seed=0)
    crit(logits, targets).backward()  # warms up kernels
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


def test_device_mismatch_is_a_clear_error():
    logits = torch.randn(2, 5, 11, device="cuda")
    with pytest.raises(ValueError, match="targets are on cpu but logits are on cuda"):
        CGGRLoss()(logits, torch.zeros(2, 5, dtype=torch.long))
