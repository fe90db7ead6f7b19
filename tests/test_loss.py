"""CGGRLoss against fp64 brute force: selected set, loss value and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cggr import CGGRLoss
from tests.reference import difficulty_fp64, scores_fp64, topk_set

STRATEGIES = ["topk", "stratified", "sequence_aware", "fixed_quota", "random"]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}


def _inputs(shape, vocab, dtype, seed, ignore_share=0.2):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, vocab, generator=g) * 2).to(dtype)
    targets = torch.randint(0, vocab, shape, generator=g)
    targets[torch.rand(shape, generator=g) < ignore_share] = -100
    return logits, targets


def _reference_loss(logits, targets, selected: set[int], reduction="mean"):
    """fp64 cross-entropy over exactly the selected flat positions, with its gradient."""
    z = logits.detach().double().reshape(-1, logits.shape[-1]).requires_grad_()
    t = targets.reshape(-1).clone()
    keep = torch.zeros_like(t, dtype=torch.bool)
    keep[list(selected)] = True
    t[~keep] = -100
    loss = F.cross_entropy(z, t, ignore_index=-100, reduction="sum")
    if reduction == "mean":
        loss = loss / max(1, len(selected))
    loss.backward()
    return loss.detach(), z.grad.view(logits.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scoring", ["entropy", "margin", "loss", "combined"])
@pytest.mark.parametrize(("shape", "vocab"), [((1,), 2), ((3, 7), 3), ((2, 11), 50), ((37,), 129)])
def test_topk_loss_and_grad_match_fp64(shape, vocab, scoring, dtype):
    seed = torch.seed() % 2**31
    logits, targets = _inputs(shape, vocab, dtype, seed)
    logits.requires_grad_()
    crit = CGGRLoss(scoring=scoring, selection="topk", dynamic_threshold=False, min_tokens_ratio=0.4,
                    warmup_steps=0)
    loss = crit(logits, targets)
    loss.backward()
    ref = scores_fp64(logits, targets)
    diff = difficulty_fp64(ref, scoring, vocab)
    selected = topk_set(diff, targets != -100, 0.4)
    mask, _ = crit.select(logits.detach(), targets)
    assert set(torch.nonzero(mask.reshape(-1)).flatten().tolist()) == selected
    ref_loss, ref_grad = _reference_loss(logits, targets, selected)
    assert loss.dtype == torch.float32 and logits.grad.dtype == dtype
    tol = TOL[dtype]
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)  # fp32 maths on rounded inputs
    torch.testing.assert_close(logits.grad.double(), ref_grad, rtol=tol, atol=tol)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_loss_is_cross_entropy_over_the_returned_selection(strategy, reduction):
    logits, targets = _inputs((3, 13), 40, torch.float64, seed=11)
    logits.requires_grad_()
    crit = CGGRLoss(selection=strategy, min_tokens_ratio=0.3, warmup_steps=0, seed=5, reduction=reduction,
                    min_tokens_per_sequence=3)
    mask, _ = CGGRLoss(selection=strategy, min_tokens_ratio=0.3, warmup_steps=0, seed=5,
                       min_tokens_per_sequence=3).select(logits.detach(), targets)
    loss = crit(logits, targets)
    loss.backward()
    selected = set(torch.nonzero(mask.reshape(-1)).flatten().tolist())
    ref_loss, ref_grad = _reference_loss(logits, targets, selected, reduction)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logits.grad, ref_grad, rtol=1e-6, atol=1e-6)
    assert crit.get_metrics()["tokens_selected"] == len(selected)


def test_large_vocab_matches_fp64():
    logits, targets = _inputs((2, 3), 50257, torch.bfloat16, seed=7)
    logits.requires_grad_()
    loss = CGGRLoss(dynamic_threshold=False, warmup_steps=0, min_tokens_ratio=0.5)(logits, targets)
    loss.backward()
    diff = difficulty_fp64(scores_fp64(logits, targets), "combined", 50257)
    ref_loss, ref_grad = _reference_loss(logits, targets, topk_set(diff, targets != -100, 0.5))
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits.grad.double(), ref_grad, rtol=1e-2, atol=1e-4)


def test_ratio_one_equals_plain_cross_entropy():
    logits, targets = _inputs((4, 9), 31, torch.float32, seed=3)
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    loss = CGGRLoss(min_tokens_ratio=1.0, warmup_steps=0)(a, targets)
    ref = F.cross_entropy(b.view(-1, 31), targets.view(-1))
    loss.backward()
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.int8, torch.uint8])
def test_any_integer_target_dtype_equals_long_targets(dtype):
    """Targets are validated as 'an integer tensor': every integer dtype must work, with the int64 result."""
    logits, targets = _inputs((2, 9), 30, torch.float32, seed=8, ignore_share=0.0)
    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    crit = CGGRLoss(min_tokens_ratio=0.5, warmup_steps=0, dynamic_threshold=False)
    loss_a = crit(a, targets.to(dtype))
    loss_b = crit(b, targets)
    loss_a.backward()
    loss_b.backward()
    torch.testing.assert_close(loss_a, loss_b, rtol=0, atol=0)
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)


def test_all_ignored_gives_zero_that_backpropagates():
    logits = torch.randn(2, 5, 7, requires_grad=True)
    targets = torch.full((2, 5), -100)
    for strategy in STRATEGIES:
        logits.grad = None
        loss = CGGRLoss(selection=strategy, seed=0)(logits, targets)
        assert loss.item() == 0.0 and loss.requires_grad
        loss.backward()
        assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_masked_vocabulary_minus_inf_logits_keep_the_ranking():
    """A padded / masked vocabulary (-inf logits) must not turn every difficulty into NaN (which would select by
    position): the selection is still the fp64 top-k and the loss its cross-entropy."""
    logits, targets = _inputs((3, 8), 40, torch.float32, seed=6)
    logits[..., 33:] = float("-inf")
    targets = targets.clamp(max=32)
    logits.requires_grad_()
    crit = CGGRLoss(min_tokens_ratio=0.3, warmup_steps=0, dynamic_threshold=False)
    loss = crit(logits, targets)
    loss.backward()
    selected = topk_set(difficulty_fp64(scores_fp64(logits, targets), "combined", 40), targets != -100, 0.3)
    mask, _ = crit.select(logits.detach(), targets)
    assert set(torch.nonzero(mask.reshape(-1)).flatten().tolist()) == selected
    ref_loss, ref_grad = _reference_loss(logits, targets, selected)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits.grad.double(), ref_grad, rtol=1e-5, atol=1e-6)


def test_nan_logits_give_nan_loss():
    logits, targets = _inputs((2, 6), 9, torch.float32, seed=1, ignore_share=0.0)
    logits[1, 2, 4] = float("nan")
    loss = CGGRLoss(min_tokens_ratio=0.25, warmup_steps=0)(logits, targets)
    assert torch.isnan(loss)


def test_warmup_curriculum_and_dynamic_threshold():
    logits, targets = _inputs((4, 25), 20, torch.float32, seed=2, ignore_share=0.0)
    crit = CGGRLoss(min_tokens_ratio=0.2, warmup_steps=4, dynamic_threshold=False)
    selected = []
    for _ in range(6):
        crit(logits, targets)
        selected.append(crit.get_metrics()["tokens_selected"])
        crit.step()
    assert selected == [100, 80, 60, 40, 20, 20]  # ratio 1, .8, .6, .4, .2, .2 of 100 valid tokens

    dyn = CGGRLoss(min_tokens_ratio=0.2, warmup_steps=0, dynamic_threshold=True, threshold_sensitivity=0.5)
    dyn(logits, targets)
    m = dyn.get_metrics()
    expected = min(1.0, 0.2 * (1 + (1 - m["avg_confidence"]) * 0.5))
    assert m["effective_ratio"] == pytest.approx(expected, rel=1e-6)
    assert m["tokens_selected"] == int(expected * 100 + 0.5)
    fixed = CGGRLoss(selection="fixed_quota", min_tokens_ratio=0.2, warmup_steps=0, dynamic_threshold=True)
    fixed(logits, targets)
    assert fixed.get_metrics()["tokens_selected"] == 20


def test_metrics_match_reference():
    logits, targets = _inputs((3, 10), 12, torch.float32, seed=4)
    crit = CGGRLoss(min_tokens_ratio=0.5, warmup_steps=0, dynamic_threshold=False)
    crit(logits, targets)
    m = crit.get_metrics()
    ref = scores_fp64(logits, targets)
    valid = targets != -100
    assert m["tokens_total"] == int(valid.sum())
    assert m["avg_confidence"] == pytest.approx(ref["confidence"][valid].mean().item(), rel=1e-5)
    assert m["avg_entropy"] == pytest.approx(ref["entropy"][valid].mean().item(), rel=1e-5)
    assert m["token_ratio"] == pytest.approx(m["tokens_selected"] / m["tokens_total"])


def test_state_dict_carries_the_curriculum():
    crit = CGGRLoss(min_tokens_ratio=0.25, warmup_steps=10)
    for _ in range(4):
        crit.step()
    state = crit.state_dict()
    assert state["step_count"].item() == 4
    resumed = CGGRLoss(min_tokens_ratio=0.25, warmup_steps=10)
    resumed.load_state_dict(state)
    assert resumed.get_metrics()["step"] == 4
    assert resumed.current_ratio == crit.current_ratio == pytest.approx(1 - 0.4 * 0.75)


def test_gradient_accumulation_sums_like_plain_losses():
    logits, targets = _inputs((2, 8), 10, torch.float32, seed=9)
    crit = CGGRLoss(min_tokens_ratio=0.5, warmup_steps=0, dynamic_threshold=False)
    a = logits.clone().requires_grad_()
    for half in (slice(0, 1), slice(1, 2)):
        (crit(a[half], targets[half]) / 2).backward()
    b = logits.clone().requires_grad_()
    for half in (slice(0, 1), slice(1, 2)):
        mask, _ = crit.select(b[half].detach(), targets[half])
        t = torch.where(mask, targets[half], -100)
        (F.cross_entropy(b[half].reshape(-1, 10), t.reshape(-1)) / 2).backward()
    torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"scoring": "difficulty"}, ValueError, "scoring must be one of"),
        ({"selection": "hardest"}, ValueError, "selection must be one of"),
        ({"min_tokens_ratio": 0.0}, ValueError, r"min_tokens_ratio must be in \(0, 1\], got 0.0"),
        ({"min_tokens_ratio": 1.2}, ValueError, "min_tokens_ratio must be in"),
        ({"warmup_steps": -5}, ValueError, "warmup_steps must be >= 0, got -5"),
        ({"num_strata": 0}, ValueError, "num_strata must be >= 1"),
        ({"min_tokens_per_sequence": 0}, ValueError, "min_tokens_per_sequence must be >= 1"),
        ({"reduction": "none"}, ValueError, "reduction must be one of"),
        ({"threshold_sensitivity": float("nan")}, ValueError, "threshold_sensitivity must be a finite"),
        ({"threshold_sensitivity": "0.5"}, TypeError, "threshold_sensitivity must be a finite number, got str"),
        ({"dynamic_threshold": "yes"}, TypeError, "dynamic_threshold must be a bool"),
    ],
)
def test_bad_constructor_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        CGGRLoss(**kwargs)


@pytest.mark.parametrize(
    ("logits", "targets", "exc", "match"),
    [
        (torch.randn(5), torch.zeros(5, dtype=torch.long), ValueError, "logits must be 2-D or 3-D"),
        (torch.randn(2, 3, 4), torch.zeros(2, 4, dtype=torch.long), ValueError, "does not match"),
        (torch.randn(4, 3), torch.zeros(4), TypeError, "integer tensor"),
        (torch.randn(4, 3), torch.tensor([0, 1, 5, 0]), ValueError, "found 5"),
    ],
)
def test_bad_forward_arguments(logits, targets, exc, match):
    with pytest.raises(exc, match=match):
        CGGRLoss()(logits, targets)


def test_logits_and_targets_on_different_devices(monkeypatch):
    logits = torch.randn(3, 4, device="meta")
    with pytest.raises(ValueError, match="targets are on cpu but logits are on meta"):
        CGGRLoss()(logits, torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_compiled_loss_runs_steps_without_recompiling_or_graph_breaks(strategy):
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    crit = CGGRLoss(selection=strategy, min_tokens_ratio=0.25, warmup_steps=0, dynamic_threshold=False, seed=2)
    explain = torch._dynamo.explain(crit)(*_inputs((2, 16), 64, torch.float32, seed=0))
    assert explain.graph_break_count == 0, explain.break_reasons
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(crit, backend=counter, fullgraph=True)
    for step in range(4):
        logits, targets = _inputs((2, 16), 64, torch.float32, seed=step)
        logits.requires_grad_()
        draw = crit.rng_counter.clone()
        loss = compiled(logits, targets)
        loss.backward()
        crit.rng_counter.copy_(draw)  # the reference selection from the same random draw
        mask, _ = crit.select(logits.detach(), targets)
        ref, ref_grad = _reference_loss(logits, targets, set(torch.nonzero(mask.reshape(-1)).flatten().tolist()))
        torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits.grad.double(), ref_grad, rtol=1e-5, atol=1e-6)
        crit.step()
    assert counter.frame_count == 1


@pytest.mark.parametrize("strategy", ["topk", "sequence_aware", "fixed_quota", "stratified"])
@pytest.mark.parametrize("dynamic", [False, True])
def test_forward_hidden_equals_forward_on_materialised_logits(strategy, dynamic):
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    hidden = torch.randn(3, 11, 16, generator=g, dtype=torch.float64)
    weight = torch.randn(37, 16, generator=g, dtype=torch.float64) / 4
    bias = torch.randn(37, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 37, (3, 11), generator=g)
    targets[0, :4] = -100
    kw = dict(selection=strategy, min_tokens_ratio=0.3, warmup_steps=0, dynamic_threshold=dynamic, seed=3,
              min_tokens_per_sequence=2)
    h1, w1, b1 = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    a = CGGRLoss(**kw)
    loss_h = a.forward_hidden(h1, w1, targets, bias=b1)
    loss_h.backward()
    h2, w2, b2 = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    b = CGGRLoss(**kw)
    loss_l = b(h2 @ w2.T + b2, targets)
    loss_l.backward()
    assert a.get_metrics()["tokens_selected"] == b.get_metrics()["tokens_selected"]
    torch.testing.assert_close(loss_h, loss_l, rtol=1e-6, atol=1e-6)
    for x, y in ((h1, h2), (w1, w2), (b1, b2)):
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-6, atol=1e-6)


def test_explicit_triton_impl_on_cpu_raises():
    with pytest.raises(RuntimeError, match="impl='triton'"):
        CGGRLoss(impl="triton")(torch.randn(4, 5), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="impl must be one of"):
        CGGRLoss(impl="cuda")


def test_head_options_reach_forward_hidden_and_selection_fields_are_refused(monkeypatch):
    import cggr.loss as cggr_loss
    from cggr.functional import LinearCrossEntropyOptions

    seen = []
    real = cggr_loss.linear_cross_entropy
    monkeypatch.setattr(cggr_loss, "linear_cross_entropy", lambda *a, **k: seen.append(k["options"]) or real(*a, **k))
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    hidden = torch.randn(2, 9, 16, generator=g, dtype=torch.float64)
    weight = torch.randn(29, 16, generator=g, dtype=torch.float64) / 4
    targets = torch.randint(0, 29, (2, 9), generator=g)
    kw = dict(selection="stratified", num_strata=3, min_tokens_ratio=0.5, warmup_steps=0, seed=5)
    head = LinearCrossEntropyOptions(workspace_bytes=64 * 8)  # torch path: 2 rows per chunk
    loss_a = CGGRLoss(head_options=head, **kw).forward_hidden(hidden, weight, targets)
    loss_b = CGGRLoss(**kw).forward_hidden(hidden, weight, targets)
    assert seen[0].workspace_bytes == 64 * 8 and seen[0].num_strata == 3 and seen[1].workspace_bytes != 64 * 8
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-12, atol=1e-12)
    with pytest.raises(TypeError, match="head_options must be a LinearCrossEntropyOptions or None, got dict"):
        CGGRLoss(head_options={"workspace": "outputs"})
    with pytest.raises(ValueError, match=r"head_options.num_strata=2 is a selection setting: CGGRLoss"):
        CGGRLoss(head_options=LinearCrossEntropyOptions(num_strata=2))
    with pytest.raises(ValueError, match=r"head_options.generator=.* is a selection setting"):
        CGGRLoss(head_options=LinearCrossEntropyOptions(generator=torch.Generator()))
