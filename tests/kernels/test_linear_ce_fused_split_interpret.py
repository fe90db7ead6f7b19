"""The split backward of the fused linear cross-entropy (``bwd='split'`` / ``'split_fwd'``) in the Triton interpreter.

:mod:`cggr.kernels.linear_cross_entropy_fused_split` against float64 references with materialised logits, at
small odd shapes (V not a power of two, N = 1, N and H not multiples of the interpreter tiles, all-ignored rows,
softcap on/off, bias, ratio 1 and below), with the d_hidden kernel unsplit (each row block owned by one program:
plain adds) and split over the vocabulary (locked or atomic adds), every accumulation mode, and 'split_fwd'
(d_hidden accumulated in the forward at ratio 1). Skipped without triton (CI); run in a fresh subprocess when
another module imported triton first (see tests/_interpret.py).

fp32 and fp16 only (the interpreter's tl.dot is wrong for bf16; bf16 is covered by tests/gpu/test_linear_ce_gpu.py).
Tolerances as in tests/kernels/test_linear_ce_fused_interpret.py: fp32 1e-5 (docs/design.md §6); fp16 gradients 3e-3
(g rounded once to fp16, at most ceil(V / 16) <= 7 rounded adds per element here plus the final rounding, each
at most 2^-11 relative to the running sum, RMS far below).

Shape legend: N tokens, H hidden, V vocabulary.
"""

from __future__ import annotations

import pytest
import torch

from tests._interpret import import_triton, interpreter_env, is_interpreted, module_hooks

with interpreter_env():  # only this module's tests run interpreted (fixture below)
    import_triton()
    from cggr.kernels import linear_cross_entropy_fused as fz
    from cggr.kernels import linear_cross_entropy_fused_split as sp

INTERPRETED = is_interpreted(sp._bwd_dh_kernel, sp._bwd_dw_kernel, fz._fwd_stats_kernel)
needs_interp, _interpret_env, test_in_fresh_process = module_hooks(INTERPRETED, __file__)

from cggr.functional import LinearCrossEntropyOptions, linear_cross_entropy  # noqa: E402
from tests.reference import lce_inputs, lce_naive, rel_err  # noqa: E402

SPLIT = LinearCrossEntropyOptions(kernel="fused", bwd="split")
BWDS = ["split", "split_fwd"]
GRAD_TOL = {torch.float32: 1e-5, torch.float16: 3e-3}


def _split(hidden, weight, b, t, options=SPLIT, bwd=None, **kw):
    if bwd is not None:
        options = LinearCrossEntropyOptions(kernel="fused", bwd=bwd)
    for x in (hidden, weight, b):
        if x is not None:
            x.grad = None
    loss, info = linear_cross_entropy(hidden, weight, t, bias=b, impl="triton", return_info=True, options=options,
                                      **kw)
    loss.backward()
    return loss.detach(), info, [hidden.grad, weight.grad] + ([b.grad] if b is not None else [])


def _backward(hidden, weight, b, t, mask, softcap, idx, config, accumulate="native", need=(True, True, True)):
    """Direct call of the split backward with a tile/split override: rows ``idx`` (or all), weights 1/K."""
    h, w = hidden.detach(), weight.detach()
    bb = b.detach() if b is not None else None
    stats, _ = fz.forward_stats(h, w, bb, t, ignore_index=-100, softcap=softcap)
    row_w = mask.reshape(-1).float() / mask.sum().clamp(min=1)
    return sp.backward_selected(h, w, bb, t, stats[0], row_w, idx, ignore_index=-100, softcap=softcap,
                                need_hidden_grad=need[0], need_weight_grad=need[1],
                                need_bias_grad=bb is not None and need[2], accumulate=accumulate,
                                config={**sp.split_config(h.dtype, True), **config})


# ------------------------------------------------------------------------------------------ through the public op
@needs_interp
@pytest.mark.parametrize("bwd", BWDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "shape,h,v,ratio,softcap,bias,reduction",
    [
        ((1,), 24, 50, 1.0, None, True, "mean"),
        ((37,), 40, 101, 1.0, 7.0, True, "sum"),
        ((37,), 40, 101, 0.3, None, False, "mean"),
        ((2, 21), 24, 97, 0.25, 5.0, True, "mean"),
    ],
)
def test_loss_and_grads_match_naive_fp64(dtype, shape, h, v, ratio, softcap, bias, reduction, bwd):
    hidden, weight, b, t = lce_inputs(shape, h, v, dtype, seed=sum(shape) + v + h + 1, bias=bias)
    loss, info, grads = _split(hidden, weight, b, t, bwd=bwd, ratio=ratio, softcap=softcap, reduction=reduction)
    ref_loss, ref_grads = lce_naive(hidden, weight, b, t, info.mask, softcap, reduction)
    assert abs(float(loss.detach()) - float(ref_loss.detach())) <= 1e-5 * max(1.0, abs(float(ref_loss.detach())))
    for a, c in zip(grads, ref_grads):
        assert a.dtype == dtype and torch.isfinite(a).all()
        assert rel_err(a, c) <= GRAD_TOL[dtype], (rel_err(a, c), a.shape)
    unselected = ~info.mask
    assert torch.equal(grads[0][unselected], torch.zeros_like(grads[0][unselected]))


@needs_interp
@pytest.mark.parametrize("bwd", BWDS)
@pytest.mark.parametrize("accumulate", ["native", "atomic", "fp32_hidden", "fp32"])
def test_accumulate_modes_fp16(accumulate, bwd):
    hidden, weight, b, t = lce_inputs((45,), 24, 131, torch.float16, seed=22, bias=True)
    opts = LinearCrossEntropyOptions(kernel="fused", bwd=bwd, accumulate=accumulate)
    for ratio in (1.0, 0.5):
        _, info, grads = _split(hidden, weight, b, t, options=opts, ratio=ratio)
        _, ref_grads = lce_naive(hidden, weight, b, t, info.mask, None, "mean")
        for a, c in zip(grads, ref_grads):
            assert a.dtype == torch.float16
            assert rel_err(a, c) <= GRAD_TOL[torch.float16], (accumulate, ratio, rel_err(a, c))


@needs_interp
@pytest.mark.parametrize("bwd", BWDS)
def test_all_ignored_rows_give_zero_grads(bwd):
    hidden, weight, b, t = lce_inputs((6,), 16, 40, torch.float32, seed=2)
    t[:] = -100
    for ratio in (1.0, 0.5):
        loss, info, grads = _split(hidden, weight, b, t, bwd=bwd, ratio=ratio, softcap=3.0)
        assert float(loss.detach()) == 0.0 and int(info.num_selected) == 0
        for g in grads:
            assert torch.equal(g, torch.zeros_like(g))


@needs_interp
@pytest.mark.parametrize("bwd", BWDS)
def test_only_some_gradients_requested(bwd):
    hidden, weight, b, t = lce_inputs((33,), 24, 90, torch.float32, seed=8)
    opts = LinearCrossEntropyOptions(kernel="fused", bwd=bwd)
    for ratio in (1.0, 0.4):
        loss, info = linear_cross_entropy(hidden, weight.detach(), t, bias=b.detach(), impl="triton",
                                          ratio=ratio, return_info=True, options=opts)
        (g_h,) = torch.autograd.grad(loss, (hidden,))
        _, ref_grads = lce_naive(hidden, weight, b, t, info.mask, None, "mean")
        assert rel_err(g_h, ref_grads[0]) <= 1e-5
        loss = linear_cross_entropy(hidden.detach(), weight, t, bias=b, impl="triton", ratio=ratio, options=opts)
        g_w, g_b = torch.autograd.grad(loss, (weight, b))
        assert rel_err(g_w, ref_grads[1]) <= 1e-5 and rel_err(g_b, ref_grads[2]) <= 1e-5
        loss = linear_cross_entropy(hidden.detach(), weight.detach(), t, bias=b, impl="triton", ratio=ratio,
                                    options=opts)
        (g_b,) = torch.autograd.grad(loss, (b,))  # d_weight kernel for the bias alone
        assert rel_err(g_b, ref_grads[2]) <= 1e-5


# ------------------------------------------------------------------------------------------ kernel schedules
@needs_interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "splits,accumulate,lock", [(1, "native", "chunk"), (3, "native", "chunk"), (3, "native", "block"),
                               (3, "atomic", "chunk"), (2, "fp32_hidden", "chunk"), (64, "native", "chunk")]
)
def test_d_hidden_vocabulary_splits_and_selected_rows(dtype, splits, accumulate, lock):
    """d_hidden kernel owned (S = 1: plain adds) or split over the vocabulary (locks per chunk or per row block
    (DH_LOCK) / atomics; S clamped to the number of vocabulary tiles), over all rows and over a permuted subset of
    rows, with softcap and bias."""
    hidden, weight, b, t = lce_inputs((29,), 40, 211, dtype, seed=splits + 5, bias=True, ignore_every=0)
    gen = torch.Generator().manual_seed(splits)
    perm = torch.randperm(29, generator=gen)
    for idx, k in ((None, 29), (perm[:11], 11)):
        mask = torch.zeros(29, dtype=torch.bool)
        mask[perm[:k] if idx is not None else slice(None)] = True
        if idx is not None:  # padding: unselected rows (weight 0) after the selected ones, as the op builds it
            idx = torch.cat([idx, perm[k:k + 4]])
        got = _backward(hidden, weight, b, t, mask, 4.0, idx, dict(DH_SPLITS=splits, DH_LOCK=lock), accumulate)
        _, ref = lce_naive(hidden, weight, b, t, mask, 4.0, "mean")
        for a, c in zip(got, ref):
            assert a.dtype == dtype
            assert rel_err(a, c) <= GRAD_TOL[dtype], (splits, accumulate, idx is not None, rel_err(a, c))
        assert torch.equal(got[0][~mask], torch.zeros_like(got[0][~mask]))


@needs_interp
def test_other_tiles_and_uneven_chunks_give_the_same_gradients():
    """Tiles that do not divide N, V or H (BLOCK_O = 32 over H = 40: a partial last chunk; BLOCK_D = 32)."""
    hidden, weight, b, t = lce_inputs((45,), 40, 301, torch.float32, seed=17, bias=True)
    mask = t != -100
    _, ref = lce_naive(hidden, weight, b, t, mask, None, "mean")
    for cfg in (dict(), dict(DH_BLOCK_N=32, DH_BLOCK_V=16, DW_BLOCK_N=16, DW_BLOCK_V=64, BLOCK_D=32, BLOCK_O=32)):
        got = _backward(hidden, weight, b, t, mask, None, None, cfg)
        for a, c in zip(got, ref):
            assert rel_err(a, c) <= 1e-5, (cfg, rel_err(a, c))


def test_tile_heuristic_takes_the_sweep_tiles_only_with_large_shared_memory():
    base = sp.split_config(torch.bfloat16, False, 2048, None)
    assert sp.split_config(torch.bfloat16, False, 2048, 163 * 1024) == base  # A100-class: unchanged
    big = sp.split_config(torch.bfloat16, False, 2048, 227 * 1024)
    assert (big["DH_BLOCK_N"], big["DH_BLOCK_V"], big["DW_BLOCK_N"], big["DW_BLOCK_V"]) == (128, 256, 256, 128)
    assert big["DH_LOCK"] == "block" and big["FWD_DH_BLOCK_N"] == 64
    # an fp32 d_weight buffer: 256 x 128 would need 256 KiB of shared memory (sweep_fused_tiles.py --static)
    assert sp.split_config(torch.bfloat16, False, 2048, 227 * 1024, fp32_weight_grad=True)["DW_BLOCK_V"] == 64
    small = sp.split_config(torch.bfloat16, False, 2048, 99 * 1024)  # consumer GPU: 2 stages (80 KiB, not 120)
    assert small == {**base, "num_stages": 2, "PROD_STAGES": 2}
    assert sp.split_config(torch.float32, False, 2048, 227 * 1024) == sp.split_config(torch.float32, False, 2048)


@needs_interp
@pytest.mark.parametrize("accumulate", ["native", "atomic"])
def test_large_shared_memory_tiles_match_naive_fp16(accumulate):
    """The H100/H200 tiles (d_hidden 128 x 256 under a row-block lock, d_weight 256 x 128) at odd N, H, V."""
    hidden, weight, b, t = lce_inputs((150,), 72, 301, torch.float16, seed=29, bias=True)
    mask = t != -100
    _, ref = lce_naive(hidden, weight, b, t, mask, None, "mean")
    cfg = {**sp.split_config(torch.float16, False, 72, 227 * 1024), "DH_SPLITS": 2}
    got = _backward(hidden, weight, b, t, mask, None, None, cfg, accumulate=accumulate)
    for a, c in zip(got, ref):
        assert rel_err(a, c) <= GRAD_TOL[torch.float16], (accumulate, rel_err(a, c))


@needs_interp
def test_split_equals_tiled_backward_fp32():
    """Both schedules sum the same fp32 products: equal up to fp32 summation order."""
    hidden, weight, b, t = lce_inputs((40,), 24, 150, torch.float32, seed=4, bias=True)
    tiled = _split(hidden, weight, b, t, options=LinearCrossEntropyOptions(kernel="fused"), ratio=0.5, softcap=6.0)
    split = _split(hidden, weight, b, t, ratio=0.5, softcap=6.0)
    assert torch.equal(tiled[1].mask, split[1].mask) and float(tiled[0]) == float(split[0])
    for a, c in zip(split[2], tiled[2]):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-7)


@needs_interp
def test_gradient_filter_error_is_bounded_and_tiny_eps_is_exact():
    """Skipped tiles have every |p - onehot| < eps: the d_hidden error is at most eps · w_n · Σ_v |W[v, :]|, and
    the d_weight error of column v at most eps · Σ_n w_n · |h[n, :]|; the bias gradient is never filtered."""
    hidden, weight, _, t = lce_inputs((8,), 16, 600, torch.float32, seed=13, bias=False, ignore_every=0, scale=20.0)
    t[:] = 0
    _, _, exact = _split(hidden, weight, None, t, reduction="sum")
    tiny = LinearCrossEntropyOptions(kernel="fused", bwd="split", filter_eps=1e-30)
    _, _, got = _split(hidden, weight, None, t, reduction="sum", options=tiny)
    for a, c in zip(got, exact):
        torch.testing.assert_close(a, c, rtol=0, atol=0)
    eps = 0.03
    filt_opts = LinearCrossEntropyOptions(kernel="fused", bwd="split", filter_eps=eps)
    _, _, filt = _split(hidden, weight, None, t, reduction="sum", options=filt_opts)
    bound_h = eps * weight.detach().abs().sum(0)  # (H,), w_n = 1 ('sum')
    assert ((filt[0] - exact[0]).abs() <= bound_h[None, :] + 1e-6).all()
    bound_w = eps * hidden.detach().abs().sum(0)  # (H,)
    assert ((filt[1] - exact[1]).abs() <= bound_w[None, :] + 1e-6).all()
    assert not torch.equal(filt[1], exact[1])  # something was skipped at this eps


@needs_interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_forward_with_hidden_grad_scores_and_upstream_gradient(dtype):
    """'split_fwd' at ratio 1: the scores equal the fused forward's (another tile order: fp32 rounding only), the
    upstream gradient scales d_hidden (and d_weight), and softcap with ignored rows stays finite."""
    hidden, weight, b, t = lce_inputs((41,), 40, 163, dtype, seed=30, bias=True)
    h, w, bb = hidden.detach(), weight.detach(), b.detach()
    valid = t != -100
    row_w = valid.float() / valid.sum()
    stats, d_h = sp.forward_with_hidden_grad(h, w, bb, t, row_w, ignore_index=-100, softcap=6.0,
                                             config={**sp.split_config(dtype, True), "FWD_DH_BLOCK_V": 64})
    ref_stats, _ = fz.forward_stats(h, w, bb, t, ignore_index=-100, softcap=6.0)
    torch.testing.assert_close(stats, ref_stats, rtol=1e-5, atol=1e-5)
    _, ref = lce_naive(hidden, weight, b, t, valid, 6.0, "mean")
    assert d_h.dtype == dtype and rel_err(d_h, ref[0]) <= GRAD_TOL[dtype]
    opts = LinearCrossEntropyOptions(kernel="fused", bwd="split_fwd")
    loss = linear_cross_entropy(hidden, weight, t, bias=b, impl="triton", softcap=6.0, options=opts)
    g_h, g_w = torch.autograd.grad(loss * 3.0, (hidden, weight))
    assert rel_err(g_h, 3.0 * ref[0]) <= GRAD_TOL[dtype] and rel_err(g_w, 3.0 * ref[1]) <= GRAD_TOL[dtype]
