"""The fused (minimal-memory) linear cross-entropy kernel on the CPU through the Triton interpreter.

:mod:`cggr.kernels.linear_cross_entropy_fused` (``LinearCrossEntropyOptions(kernel='fused')``) against float64
references with materialised logits, at small odd shapes (V not a power of two, N = 1, N and H not multiples of
the 16 x 32 interpreter tiles, all-ignored rows, softcap on/off, bias, selected-rows backward). Skipped without
triton (CI). The kernels must be defined while TRITON_INTERPRET=1 is set, before triton is imported: when another
module imported triton first in this process, the checks run in a fresh subprocess instead.

The interpreter's tl.dot is wrong for bf16 inputs (Triton 3.9), so fp32 and fp16 here; bf16 is covered by
tests/gpu/test_linear_ce_gpu.py.

Tolerances. fp32: docs/design.md §6 (1e-5). fp16 statistics: the fp16 x fp16 products are exact in fp32 and everything
after them is fp32, so the scores are fp32-accurate against an fp64 reference on the same fp16 inputs (1e-5).
fp16 gradients: g = softmax - onehot is rounded once to fp16 before the tile products (relative 2^-11) and every
output element receives at most ceil(V / 32) <= 4 rounded adds here plus the final rounding ('native'), each at
most 2^-11 relative to the running sum: <= 6 · 2^-11 ~ 2.9e-3, so 3e-3 (norm-relative).

Shape legend: N tokens, H hidden, V vocabulary.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests._interpret import import_triton, interpreter_env, is_interpreted, module_hooks

with interpreter_env():  # only this module's tests run interpreted (fixture below)
    import_triton()
    from cggr.kernels import linear_cross_entropy_fused as fz
    from cggr.kernels import linear_cross_entropy_fused_split as sp  # bwd='split' / 'split_fwd' cases

INTERPRETED = is_interpreted(fz._bwd_kernel, sp._bwd_dh_kernel, sp._fwd_dh_kernel)
needs_interp, _interpret_env, test_in_fresh_process = module_hooks(INTERPRETED, __file__)

from cggr.functional import LinearCrossEntropyOptions, linear_cross_entropy  # noqa: E402
from cggr.scoring import token_scores_torch as torch_token_scores  # noqa: E402
from tests.reference import lce_inputs, lce_logits64, lce_naive, rel_err  # noqa: E402

FUSED = LinearCrossEntropyOptions(kernel="fused")


GRAD_TOL = {torch.float32: 1e-5, torch.float16: 3e-3}


def _fused(hidden, weight, b, t, options=FUSED, **kw):
    for x in (hidden, weight, b):
        if x is not None:
            x.grad = None
    loss, info = linear_cross_entropy(hidden, weight, t, bias=b, impl="triton", return_info=True, options=options,
                                      **kw)
    loss.backward()
    return loss.detach(), info, [hidden.grad, weight.grad] + ([b.grad] if b is not None else [])


# ------------------------------------------------------------------------------------------ forward scores
@needs_interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "n,h,v,softcap,bias",
    [(1, 24, 50, None, False), (37, 24, 101, 5.0, True), (53, 40, 257, None, True), (20, 16, 33, 3.0, False)],
)
def test_forward_scores_match_fp64(dtype, n, h, v, softcap, bias):
    hidden, weight, b, t = lce_inputs((n,), h, v, dtype, seed=n + v, bias=bias)
    if n > 1:
        t[3] = -100
    stats, grads = fz.forward_stats(hidden.detach(), weight.detach(), b.detach() if b is not None else None, t,
                                    ignore_index=-100, softcap=softcap)
    assert grads == (None, None, None)
    z = lce_logits64(hidden, weight, b, softcap)
    ref = torch_token_scores(z, t)
    torch.testing.assert_close(stats[0].double(), torch.logsumexp(z, -1), rtol=1e-5, atol=1e-5)
    for i, name in enumerate(("entropy", "confidence", "margin", "nll"), start=1):
        torch.testing.assert_close(stats[i].double(), getattr(ref, name).double(), rtol=1e-5, atol=1e-5,
                                   msg=name)


@needs_interp
@pytest.mark.parametrize("bwd", ["tiled", "split", "split_fwd"])
def test_minus_inf_bias_masks_columns_without_nan(bwd):
    """A -inf bias (a masked / padded vocabulary) is a legitimate zero-probability column: scores, loss and
    gradients stay finite and equal the torch path's (float64)."""
    hidden, weight, b, t = lce_inputs((23,), 16, 97, torch.float32, seed=43, bias=True)
    with torch.no_grad():
        b[90:] = float("-inf")
        b[3:60:2] = float("-inf")  # every other column of a span: inside tiles, not only in the last one
    t = torch.where((t >= 90) | ((t >= 3) & (t < 60) & (t % 2 == 1)), 2, t)  # targets on allowed columns
    loss, info, grads = _fused(hidden, weight, b, t, options=LinearCrossEntropyOptions(kernel="fused", bwd=bwd))
    h64, w64, b64 = (x.detach().double().requires_grad_() for x in (hidden, weight, b))
    ref, ref_info = linear_cross_entropy(h64, w64, t, bias=b64, impl="torch", return_info=True)
    ref.backward()
    assert abs(float(loss.detach()) - float(ref.detach())) <= 1e-5 * max(1.0, abs(float(ref.detach())))
    for name in ("entropy", "confidence", "margin", "nll"):
        got, want = getattr(info.scores, name), getattr(ref_info.scores, name)
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got.double(), want.double(), rtol=1e-5, atol=1e-5, msg=name)
    for a, c in zip(grads, (h64.grad, w64.grad, b64.grad)):
        assert torch.isfinite(a).all() and rel_err(a, c) <= 1e-5, rel_err(a, c)


@needs_interp
def test_forward_flattened_loop_and_forward_only_tiles_give_the_same_scores():
    hidden, weight, b, t = lce_inputs((45,), 40, 301, torch.float32, seed=17, bias=True)
    args = (hidden.detach(), weight.detach(), b.detach(), t)
    base = fz.default_config(torch.float32, True)
    ref, _ = fz.forward_stats(*args, ignore_index=-100, softcap=4.0, config=base)
    for extra in (dict(FLATTEN=True), dict(FWD_BLOCK_N=32, FWD_BLOCK_V=16, FWD_BLOCK_D=32)):
        got, _ = fz.forward_stats(*args, ignore_index=-100, softcap=4.0, config={**base, **extra})
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


@needs_interp
@pytest.mark.parametrize("h", [48, 41])  # 48: rows 16-byte aligned (TMA descriptors); 41: pointers only
def test_tma_descriptor_and_pointer_tiles_agree(h):
    """TMA (zero-filled out-of-bounds blocks) and masked pointer loads feed the same products: same bits, for the
    forward and the tiled backward, at the interpreter tiles and at the sm_90 tiles (128 x 128, 64-deep)."""
    hidden, weight, _b, t = lce_inputs((77,), h, 301, torch.float16, seed=23, bias=False)
    hid, wt = hidden.detach(), weight.detach()
    t[5] = -100
    row_w = torch.where(t != -100, 1.0 / 76, 0.0).float()
    for base in (fz.default_config(torch.float16, True, h), fz.default_config(torch.float16, False, h)):
        outs = []
        for tma in (True, False):
            cfg = {**base, "TMA": tma}
            stats, _ = fz.forward_stats(hid, wt, None, t, ignore_index=-100, softcap=None, config=cfg)
            grads = fz.backward_selected(hid, wt, None, t, stats[0], row_w, None, ignore_index=-100, softcap=None,
                                         need_hidden_grad=True, need_weight_grad=True, need_bias_grad=False,
                                         config=cfg)
            outs.append([stats, *grads[:2]])
        for a, b in zip(*outs):
            assert torch.equal(a, b)


def test_tile_heuristic_takes_the_sweep_tiles_only_with_large_shared_memory():
    base = fz.default_config(torch.bfloat16, False, 2048, None)
    assert fz.default_config(torch.bfloat16, False, 2048, 163 * 1024) == base  # A100-class: unchanged
    assert fz.default_config(torch.bfloat16, False, 2048, 227 * 1024) == {**base, "FWD_BLOCK_V": 256}
    assert fz.default_config(torch.bfloat16, False, 2050, 227 * 1024) == base  # no TMA rows: the wide tile spills
    assert fz.default_config(torch.float16, False, 576, 227 * 1024) == {**base, "FWD_num_warps": 4}
    assert fz.default_config(torch.float32, False, 2048, 227 * 1024) == fz.default_config(torch.float32, False)
    wide = fz.default_config(torch.bfloat16, False, 576, 227 * 1024, wide_backward=True)
    assert wide == {**base, "FWD_num_warps": 4, "BLOCK_V": 256, "HALVES": True, "FWD_BLOCK_V": 128}
    assert fz.default_config(torch.bfloat16, False, 2048, 227 * 1024, wide_backward=True)["FWD_BLOCK_V"] == 256
    assert fz.default_config(torch.bfloat16, False, 2048, 163 * 1024, wide_backward=True) == base


def _backward(h, w, b, t, stats, row_w, idx, cfg, accumulate="atomic", filter_eps=None, softcap=None):
    return fz.backward_selected(h, w, b, t, stats[0], row_w, idx, ignore_index=-100, softcap=softcap,
                                need_hidden_grad=True, need_weight_grad=True, need_bias_grad=b is not None,
                                accumulate=accumulate, filter_eps=filter_eps, config=cfg)


@needs_interp
def test_wide_backward_tile_matches_naive_fp16():
    """The H100/H200 tiled-backward tile with atomics (128 x 256 as two halves, every row) at odd N, H, V."""
    hidden, weight, b, t = lce_inputs((150,), 72, 301, torch.float16, seed=37, bias=True)
    h, w, bb = hidden.detach(), weight.detach(), b.detach()
    mask = t != -100
    _, ref = lce_naive(hidden, weight, b, t, mask, None, "mean")
    cfg = fz.default_config(torch.float16, False, 72, 227 * 1024, wide_backward=True)
    stats, _ = fz.forward_stats(h, w, bb, t, ignore_index=-100, softcap=None, config=cfg)
    got = _backward(h, w, bb, t, stats, mask.float() / mask.sum(), None, cfg)
    for a, c in zip(got, ref):
        assert rel_err(a, c) <= GRAD_TOL[torch.float16], rel_err(a, c)


@needs_interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n,h,v,softcap,selected", [(150, 72, 301, None, False), (37, 40, 97, 4.0, True),
                                                      (1, 24, 50, None, False)])
def test_halves_tile_matches_naive(dtype, n, h, v, softcap, selected):
    """HALVES (the tile's logits GEMM and products as two half tiles) at odd N, H, V, with softcap, bias, ignored
    rows and selected rows (pointer-gathered operands), against the fp64 reference."""
    hidden, weight, b, t = lce_inputs((n,), h, v, dtype, seed=n + v + 5, bias=True)
    hd, w, bb = hidden.detach(), weight.detach(), b.detach()
    mask = t != -100
    idx = None
    if selected:  # every other valid row, padded with a zero-weight row
        sel = mask.nonzero().squeeze(1)[::2]
        mask = torch.zeros_like(mask).index_fill_(0, sel, True)
        idx = torch.cat([sel, sel.new_zeros(1) + int((~mask).nonzero()[0])])
    _, ref = lce_naive(hidden, weight, b, t, mask, softcap, "mean")
    cfg = {**fz.default_config(dtype, True), "HALVES": True}
    stats, _ = fz.forward_stats(hd, w, bb, t, ignore_index=-100, softcap=softcap, config=cfg)
    got = _backward(hd, w, bb, t, stats, mask.float() / mask.sum(), idx, cfg, softcap=softcap)
    for a, c in zip(got, ref):
        assert rel_err(a, c) <= GRAD_TOL[dtype], rel_err(a, c)


@needs_interp
def test_halves_tile_filters_like_the_half_width_tile():
    """With the gradient filter a halves tile skips each half on its own: the gradients equal those of the plain
    tile of half the width with the same eps (fp32: same products, atomic adds in another order)."""
    hidden, weight, b, t = lce_inputs((40,), 16, 600, torch.float32, seed=13, bias=True, ignore_every=7, scale=20.0)
    t[::3] = 5  # a peaked softmax and repeated targets: some half tiles are skipped, some kept
    hd, w, bb = hidden.detach(), weight.detach(), b.detach()
    base = fz.default_config(torch.float32, True)
    stats, _ = fz.forward_stats(hd, w, bb, t, ignore_index=-100, softcap=None, config=base)
    row_w = (t != -100).float()
    got = {}
    for eps in (0.03, 1e-30):
        narrow = _backward(hd, w, bb, t, stats, row_w, None, {**base, "BLOCK_V": 16}, filter_eps=eps)
        got[eps] = _backward(hd, w, bb, t, stats, row_w, None, {**base, "HALVES": True}, filter_eps=eps)
        for a, c in zip(got[eps], narrow):
            torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)
    wide = _backward(hd, w, bb, t, stats, row_w, None, base, filter_eps=0.03)
    # the whole tile skips less than its halves at this eps, and both skip something
    assert not torch.equal(wide[1], got[0.03][1]) and not torch.equal(wide[1], got[1e-30][1])
    with pytest.raises(ValueError, match="HALVES"):
        _backward(hd.half(), w.half(), None, t, stats, row_w, None, {**base, "HALVES": True}, accumulate="native")


@needs_interp
def test_wide_forward_tile_gives_the_same_scores():
    """The H100/H200 forward tile for H > 1024 (128 x 256) against the default tile, odd N and V."""
    hidden, weight, _b, t = lce_inputs((77,), 1032, 301, torch.float16, seed=31, bias=False)
    args = (hidden.detach(), weight.detach(), None, t)
    base = fz.default_config(torch.float16, False, 1032)
    ref, _ = fz.forward_stats(*args, ignore_index=-100, softcap=None, config=base)
    wide = fz.default_config(torch.float16, False, 1032, 227 * 1024)
    assert wide["FWD_BLOCK_V"] == 256
    got, _ = fz.forward_stats(*args, ignore_index=-100, softcap=None, config=wide)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@needs_interp
def test_forward_exact_ties_give_zero_margin_and_split_merge_is_exact():
    """Duplicated columns (in different tiles and vocabulary splits) are an exact top-2 tie: margin 0."""
    hidden, weight, _, t = lce_inputs((19,), 16, 70, torch.float32, seed=3, bias=False, ignore_every=0)
    w = weight.detach().clone()
    w[65] = w[2] * 3.0  # column 65 is the maximum everywhere (scaled copy), column 66 its twin
    w[66] = w[65]
    z = lce_logits64(hidden, w, None, None)
    stats, _ = fz.forward_stats(hidden.detach(), w, None, t, ignore_index=-100, softcap=None)
    ref = torch_token_scores(z, t)
    pos = (z[:, 65] > 0) & (z[:, 65] == z.max(-1).values)
    assert pos.any()
    assert torch.equal(stats[3][pos], torch.zeros_like(stats[3][pos]))
    torch.testing.assert_close(stats[3].double(), ref.margin.double(), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ loss and gradients
@needs_interp
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
def test_loss_and_grads_match_naive_fp64(dtype, shape, h, v, ratio, softcap, bias, reduction):
    hidden, weight, b, t = lce_inputs(shape, h, v, dtype, seed=sum(shape) + v + h, bias=bias)
    loss, info, grads = _fused(hidden, weight, b, t, ratio=ratio, softcap=softcap, reduction=reduction)
    ref_loss, ref_grads = lce_naive(hidden, weight, b, t, info.mask, softcap, reduction)
    assert abs(float(loss.detach()) - float(ref_loss.detach())) <= 1e-5 * max(1.0, abs(float(ref_loss.detach())))
    for a, c in zip(grads, ref_grads):
        assert a.dtype == dtype and torch.isfinite(a).all()
        assert rel_err(a, c) <= GRAD_TOL[dtype], (rel_err(a, c), a.shape)
    unselected = ~info.mask
    assert torch.equal(grads[0][unselected], torch.zeros_like(grads[0][unselected]))
    # the selection is the torch path's (fp32 scores of the same logits)
    _, info_ref = linear_cross_entropy(hidden.detach().double(), weight.detach().double(), t,
                                       bias=b.detach().double() if b is not None else None, ratio=ratio,
                                       softcap=softcap, impl="torch", return_info=True)
    assert torch.equal(info.mask, info_ref.mask)


@needs_interp
@pytest.mark.parametrize("accumulate", ["native", "atomic", "fp32_hidden", "fp32"])
def test_accumulate_modes_fp16(accumulate):
    hidden, weight, b, t = lce_inputs((45,), 24, 131, torch.float16, seed=21, bias=True)
    opts = LinearCrossEntropyOptions(kernel="fused", accumulate=accumulate)
    for ratio in (1.0, 0.5):
        loss, info, grads = _fused(hidden, weight, b, t, options=opts, ratio=ratio)
        ref_loss, ref_grads = lce_naive(hidden, weight, b, t, info.mask, None, "mean")
        assert abs(float(loss.detach()) - float(ref_loss.detach())) <= 1e-5 * abs(float(ref_loss.detach()))
        for a, c in zip(grads, ref_grads):
            assert a.dtype == torch.float16
            assert rel_err(a, c) <= GRAD_TOL[torch.float16], (accumulate, ratio, rel_err(a, c))


@needs_interp
def test_all_ignored_rows_and_no_grad_forward():
    hidden, weight, b, t = lce_inputs((6,), 16, 40, torch.float32, seed=2)
    t[:] = -100
    for ratio in (1.0, 0.5):
        loss, info, grads = _fused(hidden, weight, b, t, ratio=ratio)
        assert float(loss.detach()) == 0.0 and int(info.num_selected) == 0
        for g in grads:
            assert torch.equal(g, torch.zeros_like(g))
    hidden, weight, b, t = lce_inputs((9,), 16, 40, torch.float32, seed=6)
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, t, bias=b, impl="triton", options=FUSED)
    assert not loss.requires_grad
    ref = F.cross_entropy(lce_logits64(hidden, weight, b, None), t, ignore_index=-100)
    assert abs(float(loss.detach()) - float(ref.detach())) <= 1e-5 * float(ref.detach())


@needs_interp
def test_only_some_gradients_requested():
    hidden, weight, b, t = lce_inputs((33,), 24, 90, torch.float32, seed=8)
    for ratio in (1.0, 0.4):
        loss, info = linear_cross_entropy(hidden, weight.detach(), t, bias=b.detach(), impl="triton",
                                          ratio=ratio, return_info=True, options=FUSED)
        (g_h,) = torch.autograd.grad(loss, (hidden,))
        _, ref_grads = lce_naive(hidden, weight, b, t, info.mask, None, "mean")
        assert rel_err(g_h, ref_grads[0]) <= 1e-5
        loss = linear_cross_entropy(hidden.detach(), weight, t, bias=b, impl="triton", ratio=ratio, options=FUSED)
        g_w, g_b = torch.autograd.grad(loss, (weight, b))
        assert rel_err(g_w, ref_grads[1]) <= 1e-5 and rel_err(g_b, ref_grads[2]) <= 1e-5


@needs_interp
def test_gradient_filter_error_is_bounded_and_tiny_eps_is_exact():
    """Skipped tiles have every |p - onehot| < eps: the d_hidden error is at most eps · w_n · Σ_v |W[v, :]|."""
    # 8 rows, peaked softmax (logit std 20), one target column: most of the 19 vocabulary tiles are skippable
    hidden, weight, _, t = lce_inputs((8,), 16, 600, torch.float32, seed=13, bias=False, ignore_every=0, scale=20.0)
    t[:] = 0
    _, _, exact = _fused(hidden, weight, None, t, reduction="sum")
    _, _, tiny = _fused(hidden, weight, None, t, reduction="sum",
                        options=LinearCrossEntropyOptions(kernel="fused", filter_eps=1e-30))
    for a, c in zip(tiny, exact):
        torch.testing.assert_close(a, c, rtol=0, atol=0)
    eps = 0.03  # several tiles of this data have max |p - onehot| in (0.002, 0.03)
    _, _, filt = _fused(hidden, weight, None, t, reduction="sum",
                        options=LinearCrossEntropyOptions(kernel="fused", filter_eps=eps))
    bound = eps * weight.detach().abs().sum(0)  # (H,), w_n = 1 ('sum')
    assert ((filt[0] - exact[0]).abs() <= bound[None, :] + 1e-6).all()
    assert not torch.equal(filt[1], exact[1])  # something was skipped at this eps
