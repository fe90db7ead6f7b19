"""CUDA tests: the Triton path of ``linear_cross_entropy`` against the PyTorch path and a materialised reference.

Fresh random inputs per check; the allocator cache is poisoned with NaN before each run so unwritten output
elements (gradients, scores) show up. Odd shapes: V not a power of two, N = 1, N not a multiple of the chunk,
tiny workspaces that force several row and vocabulary chunks. Every check runs for both Triton kernels
(``options.kernel``: 'chunked', with ``options.workspace`` 'buffer' and 'outputs', and 'fused', with every
backward schedule ``options.bwd``: 'tiled', 'split' and 'split_fwd'); the fused kernel's accumulation modes, a
lock-contention case and the split backward's tiles and vocabulary splits are checked at the end, and the chunked
kernel's 'outputs' workspace (logits chunks in the unwritten rows of d_weight) with forced narrow chunks and its
no-workspace memory bound.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cggr.functional import LinearCrossEntropyOptions, linear_cross_entropy
from cggr.scoring import difficulty
from cggr.scoring import token_scores_torch as torch_token_scores
from cggr.selection import select_tokens
from tests.reference import rel_err

pytestmark = pytest.mark.cuda


def _poison() -> None:
    junk = torch.full((1 << 26,), float("nan"), device="cuda")
    del junk


def _inputs(n, h, v, dtype, seed, bias, ignore_every=4):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    hidden = torch.randn(n, h, device="cuda", generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, device="cuda", generator=gen) * (2.0 / h**0.5)).to(dtype).requires_grad_()
    b = (torch.randn(v, device="cuda", generator=gen) * 0.5).to(dtype).requires_grad_() if bias else None
    t = torch.randint(0, v, (n,), device="cuda", generator=gen)
    if ignore_every and n > 1:
        t[::ignore_every] = -100
    return hidden, weight, b, t


def _run(impl, hidden, weight, b, t, **kw):
    hidden.grad = weight.grad = None
    if b is not None:
        b.grad = None
    _poison()
    loss, info = linear_cross_entropy(hidden, weight, t, bias=b, impl=impl, return_info=True, **kw)
    _poison()
    loss.backward()
    grads = [hidden.grad.clone(), weight.grad.clone()] + ([b.grad.clone()] if b is not None else [])
    return loss.detach(), info, grads


def _materialised(hidden, weight, b, t, mask, softcap, reduction="mean"):
    """fp32 reference with the [N, V] logits: CE over ``mask`` and its gradients."""
    h = hidden.detach().float().requires_grad_()
    w = weight.detach().float().requires_grad_()
    bb = b.detach().float().requires_grad_() if b is not None else None
    z = (h @ w.t() + (bb if bb is not None else 0.0)).reshape(-1, w.shape[0])
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    nll = F.cross_entropy(z, torch.where(t == -100, 0, t).reshape(-1), reduction="none")
    m = mask.reshape(-1).float()
    loss = (nll * m).sum() / (m.sum().clamp(min=1) if reduction == "mean" else 1.0)
    loss.backward()
    return loss.detach(), [h.grad, w.grad] + ([bb.grad] if bb is not None else []), z.detach()


def _half_selection(valid, seed):
    """A random half of the rows, restricted to ``valid``: its mask (N,) and 800 compact row indices for a
    selected-rows backward (the selected rows first, ascending, then unselected rows as zero-weight padding)."""
    n = valid.shape[0]
    perm = torch.randperm(n, device="cuda", generator=torch.Generator(device="cuda").manual_seed(seed))
    half = torch.zeros(n, dtype=torch.bool, device="cuda")
    half[perm[: n // 2]] = True
    half &= valid
    order = torch.argsort((~half).to(torch.int8), stable=True)
    return half, order[:800]


CASES = [
    # n, h, v, ratio, softcap, bias, workspace bytes (small: several chunks)
    (1, 64, 1000, 1.0, None, False, 1 << 20),
    (300, 64, 5003, 1.0, None, True, 1 << 20),
    (300, 64, 5003, 0.3, 30.0, True, 1 << 20),
    (257, 128, 32000, 0.25, None, False, 1 << 22),
    (257, 128, 32000, 1.0, 15.0, False, 1 << 22),
    (64, 96, 777, 0.5, None, True, 1 << 30),
]


# 'fused-<bwd>': kernel='fused', bwd=<bwd>; 'chunked-outputs': kernel='chunked', workspace='outputs'
KERNELS = ["chunked", "chunked-outputs", "fused", "fused-split", "fused-split_fwd"]
BWDS = ["tiled", "split", "split_fwd"]


def _k(kernel: str) -> dict:
    """LinearCrossEntropyOptions keywords of a KERNELS entry."""
    name, _, variant = kernel.partition("-")
    if name == "chunked":
        return dict(kernel="chunked", workspace=variant or "buffer")
    return dict(kernel="fused", bwd=variant or "tiled")


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("n,h,v,ratio,softcap,bias,ws", CASES)
def test_fp32_triton_matches_torch_path(n, h, v, ratio, softcap, bias, ws, kernel):
    hidden, weight, b, t = _inputs(n, h, v, torch.float32, seed=n * 7 + v, bias=bias)
    opts = LinearCrossEntropyOptions(workspace_bytes=ws, **_k(kernel))
    kw = dict(ratio=ratio, softcap=softcap, options=opts)
    loss_t, info_t, g_t = _run("triton", hidden, weight, b, t, **kw)
    loss_r, info_r, g_r = _run("torch", hidden, weight, b, t, **kw)
    assert torch.equal(info_t.mask, info_r.mask)
    assert abs(float(loss_t) - float(loss_r)) <= 1e-5 * max(1.0, abs(float(loss_r)))
    for a, c in zip(g_t, g_r):
        assert torch.isfinite(a).all()
        assert rel_err(a, c) <= 1e-5, rel_err(a, c)
    for name in ("entropy", "confidence", "margin", "nll"):
        assert rel_err(getattr(info_t.scores, name), getattr(info_r.scores, name)) <= 1e-5, name
    # unselected rows get exactly zero gradient
    unselected = ~info_t.mask
    assert torch.equal(g_t[0][unselected], torch.zeros_like(g_t[0][unselected]))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("n,h,v,ratio,softcap,bias,ws", CASES)
def test_bf16_triton_against_materialised_reference(n, h, v, ratio, softcap, bias, ws, kernel):
    hidden, weight, b, t = _inputs(n, h, v, torch.bfloat16, seed=n * 11 + v, bias=bias)
    opts = LinearCrossEntropyOptions(workspace_bytes=ws, **_k(kernel))
    loss_t, info, g_t = _run("triton", hidden, weight, b, t, ratio=ratio, softcap=softcap, options=opts)
    loss_ref, g_ref, z = _materialised(hidden, weight, b, t, info.mask, softcap)
    assert abs(float(loss_t) - float(loss_ref)) <= 1e-2 * abs(float(loss_ref)) + 1e-6
    for a, c in zip(g_t, g_ref):
        assert torch.isfinite(a).all()
        assert rel_err(a, c) <= 1e-2, rel_err(a, c)
    # the selection is the one CGGRLoss makes on the (fp32) materialised logits, up to bf16 near-ties
    ref_mask = select_tokens(difficulty(torch_token_scores(z, t), "combined"), t != -100, ratio)
    agree = (ref_mask == info.mask).float().mean()
    assert agree >= 0.97, float(agree)


@pytest.mark.parametrize("kernel", KERNELS)
def test_bf16_ratio_one_equals_cross_entropy_and_fp16_runs(kernel):
    for dtype in (torch.bfloat16, torch.float16):
        hidden, weight, _, t = _inputs(513, 256, 50257, dtype, seed=5, bias=False)
        loss, _, g = _run("triton", hidden, weight, None, t, options=LinearCrossEntropyOptions(**_k(kernel)))
        ref, g_ref, _ = _materialised(hidden, weight, None, t, t != -100, None)
        assert abs(float(loss) - float(ref)) <= 1e-2 * float(ref)
        for a, c in zip(g, g_ref):
            assert rel_err(a, c) <= 1e-2


@pytest.mark.parametrize("kernel", KERNELS)
def test_sum_reduction_3d_inputs_sequence_aware_and_dynamic_threshold(kernel):
    gen = torch.Generator(device="cuda").manual_seed(9)
    hidden = torch.randn(3, 41, 64, device="cuda", generator=gen).requires_grad_()
    weight = (torch.randn(999, 64, device="cuda", generator=gen) * 0.3).requires_grad_()
    t = torch.randint(0, 999, (3, 41), device="cuda", generator=gen)
    t[1, :] = -100  # an all-ignored sequence
    for selection, sens in (("sequence_aware", None), ("topk", 0.5), ("stratified", None)):
        opts = LinearCrossEntropyOptions(
            threshold_sensitivity=sens, min_tokens_per_sequence=3, workspace_bytes=1 << 16,
            generator=torch.Generator(device="cuda").manual_seed(0), **_k(kernel),
        )
        kw = dict(ratio=0.2, selection=selection, reduction="sum", options=opts)
        loss_t, info_t, g_t = _run("triton", hidden, weight, None, t, **kw)
        opts_r = LinearCrossEntropyOptions(
            threshold_sensitivity=sens, min_tokens_per_sequence=3, workspace_bytes=1 << 16,
            generator=torch.Generator(device="cuda").manual_seed(0),
        )
        kw["options"] = opts_r
        loss_r, info_r, g_r = _run("torch", hidden, weight, None, t, **kw)
        assert info_t.mask.shape == (3, 41)
        assert torch.equal(info_t.mask, info_r.mask), selection
        assert not info_t.mask[1].any()
        assert abs(float(loss_t) - float(loss_r)) <= 1e-5 * abs(float(loss_r))
        for a, c in zip(g_t, g_r):
            assert rel_err(a, c) <= 1e-5
        loss_m, _, _ = _materialised(hidden, weight, None, t, info_t.mask, None, reduction="sum")
        assert abs(float(loss_t) - float(loss_m)) <= 1e-5 * abs(float(loss_m))


@pytest.mark.parametrize("kernel", KERNELS)
def test_all_ignored_gives_zero_loss_and_zero_grads(kernel):
    hidden, weight, b, t = _inputs(33, 32, 300, torch.bfloat16, seed=3, bias=True, ignore_every=0)
    t[:] = -100
    for ratio in (1.0, 0.5):
        loss, info, grads = _run("triton", hidden, weight, b, t, ratio=ratio,
                                 options=LinearCrossEntropyOptions(**_k(kernel)))
        assert float(loss) == 0.0 and int(info.num_selected) == 0
        for g in grads:
            assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("kernel", KERNELS)
def test_fp16_large_k_does_not_lose_small_gradients(kernel):
    """p · w = (1/V) · (1/K) underflows fp16; the power-of-two pre-scale must keep those gradients."""
    hidden, weight, _, t = _inputs(8192, 64, 32000, torch.float16, seed=12, bias=False, ignore_every=0)
    for ratio in (1.0, 0.5):
        loss, info, g = _run("triton", hidden, weight, None, t, ratio=ratio,
                             options=LinearCrossEntropyOptions(**_k(kernel)))
        ref, g_ref, _ = _materialised(hidden, weight, None, t, info.mask, None)
        assert abs(float(loss) - float(ref)) <= 1e-2 * float(ref)
        for a, c in zip(g, g_ref):
            assert torch.isfinite(a).all()
            assert rel_err(a, c) <= 1e-2, (ratio, rel_err(a, c))


# ------------------------------------------------------------------------------------------ chunked, 'outputs'
@pytest.mark.parametrize("tail_bytes", [None, 0], ids=["default-tail", "no-tail-budget"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_chunked_outputs_workspace_against_materialised(dtype, tail_bytes, monkeypatch):
    """workspace='outputs' at ratio 1 with many vocabulary chunks: loss and gradients against fp32 materialised
    ones (where the chunks live is checked on CPU in tests/kernels/test_linear_ce_chunked_interpret.py; memory is
    measured by benchmarks/bench_linear_ce.py, not asserted here). tail_bytes=0 forces the geometric chunks down
    to 8 columns (the 16-byte alignment)."""
    from cggr.kernels import linear_cross_entropy as lce

    if tail_bytes is not None:
        monkeypatch.setattr(lce, "OUTPUTS_TAIL_BYTES", tail_bytes)
    n, h, v = 2048, 1024, 32003
    sched = lce.outputs_schedule(n, h, v, 2)
    assert sched is not None and len(sched.chunks) >= 10
    hidden, weight, b, t = _inputs(n, h, v, dtype, seed=71, bias=True)
    with torch.no_grad():
        weight.mul_(0.5)
    opts = LinearCrossEntropyOptions(workspace="outputs")
    for softcap in (None, 20.0):
        loss = linear_cross_entropy(hidden, weight, t, bias=b, softcap=softcap, impl="triton", options=opts)
        g = torch.autograd.grad(loss, (hidden, weight, b))
        ref, g_ref, _ = _materialised(hidden, weight, b, t, t != -100, softcap)
        assert abs(float(loss) - float(ref)) <= 1e-2 * float(ref)
        for a, c in zip(g, g_ref):
            assert a.dtype == dtype and torch.isfinite(a).all()
            assert rel_err(a, c) <= 1e-2, (softcap, rel_err(a, c))
        del g


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_chunked_outputs_workspace_without_schedule_runs_fused(dtype, monkeypatch):
    """N >> H (benchmark case 0's proportions): no 'outputs' schedule, so the public op runs the fused kernel at
    ratio 1 (no logits workspace); loss and gradients against fp32 materialised ones."""
    from cggr.kernels import linear_cross_entropy as lce
    from cggr.kernels import linear_cross_entropy_fused as fz

    n, h, v = 8192, 64, 4001
    assert lce.outputs_schedule(n, h, v, 2) is None
    calls = []
    orig = fz.forward_stats
    monkeypatch.setattr(fz, "forward_stats", lambda *a, **k: calls.append(1) or orig(*a, **k))
    hidden, weight, b, t = _inputs(n, h, v, dtype, seed=73, bias=True)
    loss = linear_cross_entropy(hidden, weight, t, bias=b, impl="triton",
                                options=LinearCrossEntropyOptions(workspace="outputs"))
    g = torch.autograd.grad(loss, (hidden, weight, b))
    assert calls == [1]
    ref, g_ref, _ = _materialised(hidden, weight, b, t, t != -100, None)
    assert abs(float(loss) - float(ref)) <= 1e-2 * float(ref), (float(loss), float(ref))
    errs = [rel_err(a, c) for a, c in zip(g, g_ref)]
    for a in g:
        assert a.dtype == dtype and torch.isfinite(a).all()
    # the fused kernel adds N / 128 = 64 row-block partials into each d_weight element in the output dtype:
    # bf16 RMS error up to u · sqrt(64 / 3) ~ 1.8e-2 (test_fused_16bit_accumulation_under_contention's model)
    tol = {torch.bfloat16: 3e-2, torch.float16: 1e-2}[dtype]
    assert max(errs) <= tol, errs


# ------------------------------------------------------------------------------------------ fused kernel only
@pytest.mark.parametrize("bwd", BWDS)
@pytest.mark.parametrize("accumulate", ["native", "atomic", "fp32_hidden", "fp32"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_accumulate_modes_against_materialised(accumulate, dtype, bwd):
    """Bench-like proportions (logits ~ N(0, 1), V / 128 = 250 vocabulary tiles per d_hidden element)."""
    hidden, weight, b, t = _inputs(1000, 256, 32000, dtype, seed=31, bias=True)
    with torch.no_grad():
        weight.mul_(0.5)
    opts = LinearCrossEntropyOptions(kernel="fused", accumulate=accumulate, bwd=bwd)
    for ratio, softcap in ((1.0, None), (0.25, 20.0)):
        loss, info, g = _run("triton", hidden, weight, b, t, ratio=ratio, softcap=softcap, options=opts)
        ref, g_ref, _ = _materialised(hidden, weight, b, t, info.mask, softcap)
        assert abs(float(loss) - float(ref)) <= 1e-2 * float(ref)
        for a, c in zip(g, g_ref):
            assert a.dtype == dtype and torch.isfinite(a).all()
            assert rel_err(a, c) <= 1e-2, (accumulate, ratio, rel_err(a, c))


@pytest.mark.parametrize("bwd", BWDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("accumulate", ["native", "atomic"])
def test_fused_16bit_accumulation_under_contention(accumulate, dtype, bwd):
    """Many row blocks writing the same few d_weight rows (V = 300: 3 vocabulary blocks, 64 row blocks).

    16-bit accumulation (locked read-add-write, or 16-bit atomics) against 'fp32' on the same inputs. m = 64
    adds per d_weight element give an RMS rounding error of about u · sqrt(m / 3) (u = 2^-11 fp16: ~2.3e-3 at
    most; 2^-8 bf16: ~1.8e-2 at most, typically a third of it) norm-relative; a lost update (broken lock) drops
    a whole partial of ~1/64 of the element, and many of them show far above the bounds used here. ('split':
    d_weight owned by one program per vocabulary block, 32 adds of 256-row partials per element.)
    """
    tol = {torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]
    for seed in range(3):
        hidden, weight, b, t = _inputs(8192, 96, 300, dtype, seed=40 + seed, bias=True, ignore_every=0)
        out = {}
        for acc in (accumulate, "fp32"):
            opts = LinearCrossEntropyOptions(kernel="fused", accumulate=acc, bwd=bwd)
            out[acc] = _run("triton", hidden, weight, b, t, reduction="sum", options=opts)
        _, g_ref, _ = _materialised(hidden, weight, b, t, t != -100, None, reduction="sum")
        for a, c, r in zip(out[accumulate][2], out["fp32"][2], g_ref):
            assert rel_err(c, r) <= (1e-3 if dtype == torch.float16 else 1e-2)
            assert rel_err(a, r) <= tol, rel_err(a, r)


@pytest.mark.parametrize("bwd", BWDS)
def test_fused_gradient_filter_is_opt_in_and_bounded(bwd):
    hidden, weight, _, t = _inputs(700, 128, 20000, torch.bfloat16, seed=51, bias=False)
    with torch.no_grad():
        weight.mul_(3.0)  # peaked softmax: many tiles below the threshold
    exact = _run("triton", hidden, weight, None, t, options=LinearCrossEntropyOptions(kernel="fused", bwd=bwd))
    eps = 2.0**-12  # CCE's bf16 default (bf16 eps / 32)
    filt = _run("triton", hidden, weight, None, t,
                options=LinearCrossEntropyOptions(kernel="fused", filter_eps=eps, bwd=bwd))
    assert torch.equal(filt[0], exact[0])  # the forward is never filtered
    _, g_ref, _ = _materialised(hidden, weight, None, t, t != -100, None)
    for a, c in zip(filt[2], g_ref):
        assert rel_err(a, c) <= 1e-2


# split backward: tiles, vocabulary splits of the d_hidden kernel (locked / atomic adds), selected rows
SPLIT_CONFIGS = [
    dict(),  # default tiles; S = SMs // row blocks
    dict(DH_SPLITS=1),  # every row block owned by one program
    dict(DH_SPLITS=3),  # locked adds, 3 writers per row block
    dict(DH_BLOCK_N=128, DH_BLOCK_V=128, DW_BLOCK_N=128, DW_BLOCK_V=128, BLOCK_O=128, num_warps=8),
    dict(BLOCK_D=32, num_stages=4),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("config", SPLIT_CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_split_backward_tiles_and_splits_against_materialised(config, dtype):
    """The split backward called directly (tile / split overrides): d_hidden, d_weight, d_bias against fp32
    materialised gradients, over all rows and over a shuffled half of them (with zero-weight padding rows), with
    softcap and bias; the 'atomic' d_hidden adds with 3 splits too. H = 200 is not a multiple of the 64 / 128
    chunks, V = 20011 not of the tiles."""
    from cggr.kernels import linear_cross_entropy_fused as fz
    from cggr.kernels import linear_cross_entropy_fused_split as sp

    hidden, weight, b, t = _inputs(1500, 200, 20011, dtype, seed=61, bias=True)
    h, w, bb = hidden.detach(), weight.detach(), b.detach()
    stats, _ = fz.forward_stats(h, w, bb, t, ignore_index=-100, softcap=25.0)
    valid = t != -100
    half, idx_half = _half_selection(valid, seed=3)
    for mask, idx in ((valid, None), (half, idx_half)):
        row_w = mask.float() / mask.sum()
        _, g_ref, _ = _materialised(hidden, weight, b, t, mask, 25.0)
        modes = ("native", "atomic") if config.get("DH_SPLITS", 1) > 1 else ("native",)
        for accumulate in modes:
            _poison()
            got = sp.backward_selected(h, w, bb, t, stats[0], row_w, idx, ignore_index=-100, softcap=25.0,
                                       need_hidden_grad=True, need_weight_grad=True, need_bias_grad=True,
                                       accumulate=accumulate, config={**sp.split_config(dtype, False), **config})
            for a, c in zip(got, g_ref):
                assert a.dtype == dtype and torch.isfinite(a).all()
                assert rel_err(a, c) <= 1e-2, (config, accumulate, idx is not None, rel_err(a, c))
            assert torch.equal(got[0][~mask], torch.zeros_like(got[0][~mask]))


# tiled backward tiles on the GPU (compiled, sm_90 warp-group MMA / TMA): 128 x 128, 128 x 256, 128 x 256 as halves
TILED_CONFIGS = [dict(BLOCK_V=128), dict(BLOCK_V=256), dict(BLOCK_V=256, HALVES=True)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("config", TILED_CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_tiled_backward_tiles_against_materialised(config, dtype):
    """The tiled backward called directly with atomic adds under each tile: exact gradients (all rows and a
    shuffled selection with zero-weight padding, softcap, bias) against fp32 materialised ones, and with the
    gradient filter the per-element bound eps · |w_n| · Σ_v |W[v, :]| (d_hidden) against the exact result of the
    same tile, plus the halves tile's filtered gradients equal to the 128-wide tile's (same skip granularity).
    H = 200 is not a multiple of the 64-wide chunks, V = 20011 not of the tiles."""
    from cggr.kernels import linear_cross_entropy_fused as fz

    hidden, weight, b, t = _inputs(1500, 200, 20011, dtype, seed=71, bias=True)
    h, w, bb = hidden.detach(), weight.detach(), b.detach()
    cfg = {**fz.default_config(dtype, False), **config}
    stats, _ = fz.forward_stats(h, w, bb, t, ignore_index=-100, softcap=25.0)
    valid = t != -100
    half, idx_half = _half_selection(valid, seed=5)

    def run(weight_, lse, row_w, idx, softcap, filter_eps=None, tiles=cfg):
        _poison()
        return fz.backward_selected(h, weight_, bb, t, lse, row_w, idx, ignore_index=-100, softcap=softcap,
                                    need_hidden_grad=True, need_weight_grad=True, need_bias_grad=True,
                                    accumulate="atomic", filter_eps=filter_eps, config=tiles)

    for mask, idx in ((valid, None), (half, idx_half)):
        row_w = mask.float() / mask.sum()
        _, g_ref, _ = _materialised(hidden, weight, b, t, mask, 25.0)
        got = run(w, stats[0], row_w, idx, 25.0)
        for a, c in zip(got, g_ref):
            assert a.dtype == dtype and torch.isfinite(a).all()
            assert rel_err(a, c) <= 1e-2, (config, idx is not None, rel_err(a, c))
        assert torch.equal(got[0][~mask], torch.zeros_like(got[0][~mask]))
    # gradient filter, peaked softmax (no softcap: its derivative would only shrink the skipped terms)
    with torch.no_grad():
        w3 = w * 3.0
    stats3, _ = fz.forward_stats(h, w3, bb, t, ignore_index=-100, softcap=None)
    row_w = valid.float()  # 'sum': w_n = 1
    eps = 2.0**-8
    out = {}
    for name, tiles in (("cfg", cfg), ("narrow", {**cfg, "BLOCK_V": 128, "HALVES": False})):
        for fe in (None, eps):
            out[name, fe] = run(w3, stats3[0], row_w, None, None, filter_eps=fe, tiles=tiles)
    assert not torch.equal(out["cfg", eps][1], out["cfg", None][1])  # the filter skipped something
    bound = eps * w3.float().abs().sum(0)  # (H,)
    diff = (out["cfg", eps][0].float() - out["cfg", None][0].float()).abs()
    # + the 16-bit accumulation's own error (two runs of different atomic orders and skipped sets)
    assert (diff <= bound[None, :] + 2e-2 * out["cfg", None][0].float().abs() + 1e-3).all()
    if config.get("HALVES"):
        for a, c in zip(out["cfg", eps], out["narrow", eps]):
            assert rel_err(a, c) <= 2e-2, rel_err(a, c)
