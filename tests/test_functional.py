"""CPU tests of cggr.functional: token_scores dispatch and the PyTorch path of linear_cross_entropy.

The references are independent: logits materialised in float64, ``F.log_softmax`` / ``F.cross_entropy``,
autograd for the gradients, and :class:`cggr.CGGRLoss` on the materialised logits for the selection.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cggr._rng import CounterRNG
from cggr.functional import LinearCrossEntropyOptions, linear_cross_entropy, token_scores
from cggr.loss import CGGRLoss
from cggr.scoring import token_scores_torch as torch_token_scores
from tests.reference import lce_inputs, lce_logits64, lce_naive


def _ours(hidden, weight, b, t, **kw):
    for x in (hidden, weight, b):
        if x is not None:
            x.grad = None
    loss, info = linear_cross_entropy(hidden, weight, t, bias=b, impl="torch", return_info=True, **kw)
    loss.backward()
    return loss.detach(), info, [hidden.grad, weight.grad] + ([b.grad] if b is not None else [])


# ------------------------------------------------------------------------------------------ token_scores
def test_token_scores_torch_impl_is_the_reference_and_auto_picks_torch_on_cpu():
    z = torch.randn(2, 7, 53) * 3
    t = torch.randint(0, 53, (2, 7))
    t[0, 2] = -100
    ref = torch_token_scores(z, t)
    for impl in ("torch", "auto"):
        out = token_scores(z, t, impl=impl)
        for name in ("entropy", "confidence", "margin", "nll", "valid"):
            assert torch.equal(getattr(out, name), getattr(ref, name))


def test_token_scores_is_one_dispatching_function_under_every_public_name():
    import cggr
    from cggr import functional, scoring

    assert cggr.token_scores is functional.token_scores is scoring.token_scores is token_scores
    z = torch.randn(3, 11)
    with pytest.raises((RuntimeError, TypeError), match="impl='triton'"):  # impl= reaches the dispatch
        cggr.token_scores(z, impl="triton")
    assert torch.equal(cggr.token_scores(z, impl="torch").margin, torch_token_scores(z).margin)


def test_token_scores_explicit_triton_on_cpu_raises_and_env_forces_torch(monkeypatch):
    z = torch.randn(3, 11)
    with pytest.raises((RuntimeError, TypeError)):
        token_scores(z, impl="triton")
    monkeypatch.setenv("CGGR_IMPL", "torch")
    out = token_scores(z, impl="triton")
    assert torch.equal(out.entropy, torch_token_scores(z).entropy)
    with pytest.raises(ValueError, match="impl"):
        token_scores(z, impl="cuda")


# ------------------------------------------------------------------------------------------ loss and grads
@pytest.mark.parametrize(
    "shape,h,v,ratio,softcap,bias,reduction",
    [
        ((1,), 8, 50, 1.0, None, True, "mean"),
        ((37,), 16, 101, 0.3, None, False, "mean"),
        ((37,), 16, 101, 1.0, 7.0, True, "sum"),
        ((64,), 12, 257, 0.25, 7.0, True, "mean"),
        ((2, 9), 16, 33, 0.5, None, True, "sum"),
    ],
)
def test_torch_path_matches_naive_fp64(shape, h, v, ratio, softcap, bias, reduction):
    hidden, weight, b, t = lce_inputs(shape, h, v, seed=sum(shape) + v, bias=bias)
    opts = LinearCrossEntropyOptions(workspace_bytes=2048)  # several row chunks
    loss, info, grads = _ours(hidden, weight, b, t, ratio=ratio, softcap=softcap, reduction=reduction, options=opts)
    ref_loss, ref_grads = lce_naive(hidden, weight, b, t, info.mask, softcap, reduction)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-6, atol=1e-7)
    for a, c in zip(grads, ref_grads):
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-8)
    assert info.mask.shape == t.shape
    assert int(info.num_selected) == int(info.mask.sum())
    assert not (info.mask & (t == -100)).any()
    # tokens outside the selection give no gradient to hidden
    assert torch.equal(grads[0][~info.mask], torch.zeros_like(grads[0][~info.mask]))


def test_fp32_inputs_match_naive_within_fp32_tolerance():
    hidden, weight, b, t = lce_inputs((50,), 24, 301, dtype=torch.float32, seed=4)
    loss, info, grads = _ours(hidden, weight, b, t, ratio=0.4, softcap=12.0)
    ref_loss, ref_grads = lce_naive(hidden, weight, b, t, info.mask, 12.0, "mean")
    assert abs(float(loss) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss))
    for a, c in zip(grads, ref_grads):
        assert float((a.double() - c).norm() / c.norm()) <= 1e-5


def test_ratio_one_equals_plain_cross_entropy():
    hidden, weight, b, t = lce_inputs((3, 13), 20, 91, seed=7)
    loss, info, grads = _ours(hidden, weight, b, t, ratio=1.0)
    assert torch.equal(info.mask, t != -100)
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    bb = b.detach().clone().requires_grad_()
    ref = F.cross_entropy((h @ w.t() + bb).reshape(-1, 91), t.reshape(-1), ignore_index=-100)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-8)
    for a, c in zip(grads, (h.grad, w.grad, bb.grad)):
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-9)


def test_all_ignored_rows_give_zero_loss_and_zero_grads():
    hidden, weight, b, t = lce_inputs((6,), 8, 40, seed=2)
    t[:] = -100
    for ratio in (1.0, 0.5):
        loss, info, grads = _ours(hidden, weight, b, t, ratio=ratio)
        assert float(loss) == 0.0 and int(info.num_selected) == 0
        for g in grads:
            assert torch.equal(g, torch.zeros_like(g))


# ------------------------------------------------------------------------------------------ selection
@pytest.mark.parametrize("scoring", ["entropy", "margin", "loss", "combined"])
@pytest.mark.parametrize("selection", ["topk", "stratified", "random", "fixed_quota"])
def test_selected_set_equals_cggrloss_on_materialised_logits(scoring, selection):
    hidden, weight, b, t = lce_inputs((120,), 16, 203, seed=11, bias=True)
    ratio = 0.3
    crit = CGGRLoss(scoring=scoring, selection=selection, dynamic_threshold=False, min_tokens_ratio=ratio,
                    warmup_steps=0, seed=123)
    ref_mask, _ = crit.select(lce_logits64(hidden, weight, b, None).float(), t)
    # the same random source as the loss's: seed 123, first draw
    opts = LinearCrossEntropyOptions(generator=CounterRNG(123, torch.zeros((), dtype=torch.long)), workspace_bytes=4096)
    _, info = linear_cross_entropy(hidden, weight, t, bias=b, ratio=ratio, scoring=scoring, selection=selection,
                                   impl="torch", return_info=True, options=opts)
    assert torch.equal(info.mask, ref_mask)


def test_dynamic_threshold_and_sequence_aware_match_cggrloss():
    hidden, weight, _, t = lce_inputs((4, 25), 16, 97, seed=5, bias=False)
    t[2, :] = -100
    for selection in ("topk", "sequence_aware"):
        crit = CGGRLoss(scoring="combined", selection=selection, dynamic_threshold=True, threshold_sensitivity=0.5,
                        min_tokens_ratio=0.2, warmup_steps=0, min_tokens_per_sequence=4)
        ref_mask, _ = crit.select(lce_logits64(hidden, weight, None, None).float(), t)
        opts = LinearCrossEntropyOptions(threshold_sensitivity=0.5, min_tokens_per_sequence=4)
        loss, info = linear_cross_entropy(hidden, weight, t, ratio=0.2, selection=selection, impl="torch",
                                          return_info=True, options=opts)
        assert torch.equal(info.mask, ref_mask), selection
        assert float(info.ratio) == pytest.approx(crit.get_metrics()["effective_ratio"])
        ref_loss, _ = lce_naive(hidden, weight, None, t, info.mask, None, "mean")
        torch.testing.assert_close(loss.detach().double(), ref_loss, rtol=1e-6, atol=1e-8)


# ------------------------------------------------------------------------------------------ errors
def test_bad_arguments_raise_with_names():
    hidden, weight, b, t = lce_inputs((5,), 8, 30, seed=1)
    with pytest.raises(ValueError, match="weight shape"):
        linear_cross_entropy(hidden, weight[:, :7], t, impl="torch")
    with pytest.raises(TypeError, match="dtype"):
        linear_cross_entropy(hidden.float(), weight, t, impl="torch")
    with pytest.raises(ValueError, match="targets shape"):
        linear_cross_entropy(hidden, weight, t[:4], impl="torch")
    with pytest.raises(ValueError, match="softcap"):
        linear_cross_entropy(hidden, weight, t, softcap=-1.0, impl="torch")
    with pytest.raises(ValueError, match="ratio"):
        linear_cross_entropy(hidden, weight, t, ratio=0.0, impl="torch")
    with pytest.raises(ValueError, match="selection"):
        linear_cross_entropy(hidden, weight, t, selection="best", impl="torch")
    with pytest.raises(ValueError, match=r"\[0, 30\)"):
        linear_cross_entropy(hidden, weight, torch.full_like(t, 30), impl="torch")
    with pytest.raises(ValueError, match="bias"):
        linear_cross_entropy(hidden, weight, t, bias=b[:5], impl="torch")
    with pytest.raises(TypeError, match="options"):
        linear_cross_entropy(hidden, weight, t, options={"num_strata": 2}, impl="torch")
    with pytest.raises(ValueError, match="num_strata"):
        LinearCrossEntropyOptions(num_strata=0)
    # Without triton installed the message names the package; with it, the device.
    with pytest.raises(RuntimeError, match=r"impl='triton'\) needs (CUDA|the 'triton' package)"):
        linear_cross_entropy(hidden.float(), weight.float(), t, impl="triton")


def test_second_backward_through_the_same_graph_raises():
    hidden, weight, b, t = lce_inputs((7,), 8, 30, seed=3)
    loss = linear_cross_entropy(hidden, weight, t, bias=b, ratio=0.5, impl="torch")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward twice"):
        loss.backward()


def test_no_grad_forward_keeps_nothing_and_matches():
    hidden, weight, b, t = lce_inputs((9,), 8, 30, seed=6)
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, t, bias=b, ratio=1.0, impl="torch")
    assert not loss.requires_grad
    ref = F.cross_entropy(hidden.detach() @ weight.detach().t() + b.detach(), t, ignore_index=-100)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-8)


def test_kernel_options_are_validated_and_ignored_by_the_torch_path():
    with pytest.raises(ValueError, match="kernel"):
        LinearCrossEntropyOptions(kernel="cce")
    with pytest.raises(ValueError, match="accumulate"):
        LinearCrossEntropyOptions(kernel="fused", accumulate="bf16")
    with pytest.raises(ValueError, match="filter_eps"):
        LinearCrossEntropyOptions(kernel="fused", filter_eps=0.0)
    with pytest.raises(ValueError, match="kernel='fused' only"):
        LinearCrossEntropyOptions(accumulate="fp32")
    with pytest.raises(ValueError, match="kernel='fused' only"):
        LinearCrossEntropyOptions(filter_eps=1e-4)
    with pytest.raises(TypeError, match="threshold_sensitivity must be None or a finite float, got str"):
        LinearCrossEntropyOptions(threshold_sensitivity="0.5")
    with pytest.raises(ValueError, match="threshold_sensitivity must be None or a finite float, got inf"):
        LinearCrossEntropyOptions(threshold_sensitivity=float("inf"))
    hidden, weight, b, t = lce_inputs((11,), 8, 30, seed=9)
    opts = LinearCrossEntropyOptions(kernel="fused", accumulate="fp32", filter_eps=1e-4)
    a = linear_cross_entropy(hidden, weight, t, bias=b, ratio=0.5, impl="torch", options=opts)
    c = linear_cross_entropy(hidden, weight, t, bias=b, ratio=0.5, impl="torch")
    assert torch.equal(a, c)
