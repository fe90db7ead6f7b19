"""The Triton kernels on garbage at ignored rows, on the CPU through the Triton interpreter.

Same protocol as tests/test_ignored_garbage.py (the PyTorch paths): one call with ordinary values at the rows
whose target is ``ignore_index``, one with NaN / +inf / -inf / ±1e30 there; selection, loss, gradients and
metrics must be exactly equal, with the dynamic threshold on. Covers the one-pass scoring kernel (through
``CGGRLoss(impl='triton')``, which must also select what the PyTorch path selects) and the linear cross-entropy
kernels (``chunked``, with the ratio-1 forward gradients and ``workspace='outputs'``, and ``fused`` with each
backward). Skipped without triton (CI); see tests/_interpret.py for why the checks may run in a fresh process.
"""

from __future__ import annotations

import pytest
import torch

from tests._interpret import import_triton, interpreter_env, is_interpreted, module_hooks

with interpreter_env():  # see tests/_interpret.py
    import_triton()
    from cggr.kernels import linear_cross_entropy as lce
    from cggr.kernels import linear_cross_entropy_fused as fz
    from cggr.kernels import linear_cross_entropy_fused_split as sp
    from cggr.kernels import scoring as ks

INTERPRETED = is_interpreted(ks._token_scores_kernel, lce._ce_rows_kernel, fz._fwd_stats_kernel, fz._bwd_kernel,
                             sp._bwd_dh_kernel, sp._bwd_dw_kernel, sp._fwd_dh_kernel)
needs_interp, _interpret_env, test_in_fresh_process = module_hooks(INTERPRETED, __file__)

from cggr import CGGRLoss  # noqa: E402
from cggr.functional import LinearCrossEntropyOptions, linear_cross_entropy  # noqa: E402
from tests.test_ignored_garbage import _dirty, _loss_inputs, _run_loss, _seed  # noqa: E402


@needs_interp
@pytest.mark.parametrize("strategy", ["topk", "stratified", "sequence_aware"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# the interpreter runs the kernel's arithmetic in numpy, which warns on the inf - inf of the planted garbage rows
# (their scores are NaN by design and never read); on a GPU the same arithmetic is silent
@pytest.mark.filterwarnings("ignore:invalid value encountered in subtract:RuntimeWarning")
def test_scoring_kernel_ignores_garbage_at_ignored_rows(strategy, dtype):
    g = torch.Generator().manual_seed(_seed())
    logits, targets, ignored = _loss_inputs((3, 17), 301, dtype, g)
    dirty = _dirty(logits, ignored, g)
    kw = dict(selection=strategy, min_tokens_ratio=0.3, warmup_steps=0, seed=5, min_tokens_per_sequence=2)
    runs = [_run_loss(CGGRLoss(impl=impl, **kw), z, targets) for impl, z in
            (("triton", logits), ("triton", dirty), ("torch", dirty))]
    (l_a, g_a, m_a, _), (l_b, g_b, m_b, k_b), (_, _, m_t, k_t) = runs
    assert torch.isfinite(l_b) and torch.equal(l_a, l_b) and torch.equal(g_a, g_b) and m_a == m_b
    assert not g_b[ignored].any()
    assert int(k_b) == int(k_t) and m_b["tokens_selected"] == m_t["tokens_selected"] > 1


OPTIONS = [
    LinearCrossEntropyOptions(),  # chunked: forward gradients at ratio 1, compact rows below
    LinearCrossEntropyOptions(workspace="outputs"),
    LinearCrossEntropyOptions(kernel="fused"),
    LinearCrossEntropyOptions(kernel="fused", bwd="split"),
    LinearCrossEntropyOptions(kernel="fused", bwd="split_fwd"),
]


@needs_interp
@pytest.mark.parametrize("options", OPTIONS, ids=["chunked", "outputs", "fused", "split", "split_fwd"])
@pytest.mark.parametrize("ratio", [1.0, 0.3])
def test_linear_ce_kernels_ignore_garbage_hidden_rows(options, ratio):
    g = torch.Generator().manual_seed(_seed())
    n, h, v = 29, 16, 75
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) / 4
    bias = torch.randn(v, generator=g) / 2
    targets = torch.randint(0, v, (n,), generator=g)
    ignored = torch.rand(n, generator=g) < 0.3
    ignored[:2] = True
    targets[ignored] = -100
    dirty = _dirty(hidden, ignored, g)
    import dataclasses

    opts = dataclasses.replace(options, threshold_sensitivity=0.5)
    out = []
    for hid in (hidden, dirty):
        hs, ws, bs = (x.clone().requires_grad_() for x in (hid, weight, bias))
        loss, info = linear_cross_entropy(hs, ws, targets, bias=bs, ratio=ratio, impl="triton", return_info=True,
                                          options=opts)
        loss.backward()
        out.append((loss.detach(), info.mask, info.num_selected, info.ratio, hs.grad, ws.grad, bs.grad))
    for a, b in zip(*out, strict=True):
        assert torch.equal(a, b)
    assert torch.isfinite(out[1][0]) and torch.isfinite(out[1][5]).all() and not out[1][4][ignored].any()
