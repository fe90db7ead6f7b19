"""The chunked linear cross-entropy kernel's ``workspace='outputs'`` schedule on the CPU (Triton interpreter).

:mod:`cggr.kernels.linear_cross_entropy` with ``LinearCrossEntropyOptions(workspace='outputs')``: at ratio 1 with
the weight gradient wanted, the logits chunks live in the unwritten rows of d_weight. Checked here: the schedule as
a pure function (coverage, scratch inside unwritten rows, alignment, bounds, fallback), that the kernel really
puts its chunks into d_weight's storage, and the scores, loss and gradients against float64 references with
materialised logits at small odd shapes (V not a multiple of 16, N = 1, N > H and N < H, ignored rows, softcap,
bias, fp16 pre-scale). Skipped without triton (CI); see tests/_interpret.py for the fresh-process fallback.

Tolerances. fp32: docs/design.md §6 (1e-5). The kernel stores its logits chunks in the input dtype (one rounding of an
fp32-accumulated product), everything after that is fp32: the scores match fp64 statistics of the logits rounded
once to the input dtype (1e-5). Gradients, unit roundoff u (2^-11 fp16): the softmax of rounded logits is off by
at most u · max|z| relative; g = softmax - onehot is rounded once to the input dtype, each d_weight / d_bias
element gets one more rounding, each d_hidden element one rounding per vocabulary chunk (m = chunks + tail; the
fp16 pre-scale multiplies by powers of two, exactly): norm-relative <= (m + 2) · u + u · max|z| for d_hidden and
3 · u + u · max|z| for the others.

Shape legend: N tokens, H hidden, V vocabulary.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from tests._interpret import import_triton, interpreter_env, is_interpreted, module_hooks

with interpreter_env():  # only this module's tests run interpreted (fixture below)
    import_triton()
    from cggr.kernels import linear_cross_entropy as lce
    from cggr.kernels import linear_cross_entropy_fused as fz

INTERPRETED = is_interpreted(lce._ce_rows_kernel, fz._fwd_stats_kernel, fz._bwd_kernel)
needs_interp, _interpret_env, test_in_fresh_process = module_hooks(INTERPRETED, __file__)

from cggr.functional import LinearCrossEntropyOptions, linear_cross_entropy  # noqa: E402
from cggr.scoring import token_scores_torch as torch_token_scores  # noqa: E402
from tests.reference import lce_inputs, lce_logits64, lce_naive, rel_err  # noqa: E402

OUTPUTS = LinearCrossEntropyOptions(workspace="outputs")
U = {torch.float32: 2.0**-24, torch.float16: 2.0**-11}


# ------------------------------------------------------------------------------------------ the schedule
def _check_schedule(sched, n, h, v, elem, ws, max_chunks):
    """Every invariant the kernel relies on, by plain loops."""
    align = max(1, 16 // elem)
    assert 1 <= sched.rows <= max(1, n) and (sched.rows <= h)  # [C, V] stats chunk inside V·H elements
    if n >= 16 and h >= 16:
        assert sched.rows % 16 == 0 or sched.rows == n
    assert len(sched.chunks) <= max_chunks
    covered = [0] * v
    top = v
    for v0, v1 in sched.chunks:  # top down, contiguous
        assert v1 == top and v1 - v0 > 0 and (v1 - v0) % align == 0
        assert n * (v1 - v0) <= v0 * h  # scratch = flat [0, N·Vc) lies in rows [0, v0): none written yet
        for c in range(v0, v1):
            covered[c] += 1
        top = v0
    assert top == sched.tail
    for c in range(sched.tail):
        covered[c] += 1
    assert covered == [1] * v  # [0, V) exactly once
    assert n * sched.tail * elem <= ws


@pytest.mark.parametrize("elem", [2, 4])
def test_schedule_invariants_over_a_grid(elem):
    for n, h, v, tail_bytes, ws in itertools.product(
        (0, 1, 7, 37, 300, 5000), (1, 9, 16, 24, 130), (1, 2, 33, 101, 1000, 50257), (0, 64, 4096), (1 << 12, 1 << 30)
    ):
        sched = lce.outputs_schedule(n, h, v, elem, workspace_bytes=ws, tail_bytes=tail_bytes, max_chunks=48)
        free = lce.outputs_schedule(n, h, v, elem, workspace_bytes=1 << 60, tail_bytes=min(tail_bytes, ws),
                                    max_chunks=10**9)
        if sched is None:  # too many chunks, or the tail does not fit the workspace
            assert len(free.chunks) > 48 or n * free.tail * elem > ws
        else:
            _check_schedule(sched, n, h, v, elem, ws, 48)
            assert sched == free
            if sched.tail > 0 and sched.chunks:  # stopped: rest fits the tail budget or the next width rounds to 0
                align = max(1, 16 // elem)
                assert n * sched.tail * elem <= tail_bytes or sched.tail * h // (n + h) < align


def test_schedule_of_the_benchmark_cases():
    """(16384, 576, 49152): N >> H, 171 chunks needed -> buffer path; the two large vocabularies: 39 chunks and
    a 32-column (512 KiB) tail in bf16."""
    assert lce.outputs_schedule(16384, 576, 49152, 2) is None
    for n, h, v in ((8192, 2048, 128256), (8192, 2304, 256000)):
        sched = lce.outputs_schedule(n, h, v, 2)
        _check_schedule(sched, n, h, v, 2, lce.DEFAULT_WORKSPACE_BYTES, lce.OUTPUTS_MAX_CHUNKS)
        assert (sched.rows, len(sched.chunks), sched.tail) == (h, 39, 32)


# ------------------------------------------------------------------------------------------ the kernel
def _rounded_logits(hidden, weight, b, softcap):
    """fp64 logits rounded once to the input dtype (the kernel's [chunk] logits), then soft-capped in fp64."""
    z = lce_logits64(hidden, weight, b, None).detach().to(hidden.dtype).double()
    return softcap * torch.tanh(z / softcap) if softcap is not None else z


def _loss_fp64(z, t, mask, reduction):
    """Σ (or mean) over ``mask`` of the fp64 nll of the logits ``z`` (N, V)."""
    z = z.reshape(-1, z.shape[-1])
    nll = torch.logsumexp(z, -1) - z.gather(1, t.reshape(-1).clamp(min=0)[:, None]).squeeze(1)
    m = mask.reshape(-1).double()
    total = float((nll * m).sum())
    return total / max(1.0, float(m.sum())) if reduction == "mean" else total


def _grad_tols(dtype, m, z):
    """Norm-relative bounds of (d_hidden, d_weight, d_bias): see the module docstring (m vocabulary chunks)."""
    u = U[dtype]
    logits = u * float(z.detach().abs().max())  # softmax of logits rounded to the input dtype
    return [max(1e-5, (m + 2) * u + logits)] + [max(1e-5, 3 * u + logits)] * 2


def _record_logits(monkeypatch):
    """Record (storage pointer, storage offset, numel) of every logits chunk the kernel writes."""
    calls = []
    orig = lce._logits_into

    def rec(out, hidden, weight, bias):
        calls.append((out.untyped_storage().data_ptr(), out.storage_offset(), out.numel()))
        return orig(out, hidden, weight, bias)

    monkeypatch.setattr(lce, "_logits_into", rec)
    return calls


@needs_interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "n,h,v,softcap,bias",
    [(1, 24, 50, None, True), (37, 24, 101, 5.0, True), (20, 40, 97, None, False), (53, 16, 257, 3.0, True)],
)
def test_forward_stats_outputs_matches_fp64(dtype, n, h, v, softcap, bias, monkeypatch):
    hidden, weight, b, t = lce_inputs((n,), h, v, dtype, seed=3 * n + v, bias=bias)
    hid, wt, bb = hidden.detach(), weight.detach(), b.detach() if b is not None else None
    valid = t != -100
    row_w = valid.float() / valid.sum().clamp(min=1)
    sched = lce.outputs_schedule(n, h, v, hid.element_size(), tail_bytes=0)
    assert sched is not None and (len(sched.chunks) >= 2 or n == 1)
    calls = _record_logits(monkeypatch)
    stats, grads = lce.forward_stats(hid, wt, bb, t, ignore_index=-100, softcap=softcap, workspace_bytes=1 << 30,
                                     row_weights=row_w, need_hidden_grad=True, need_weight_grad=True,
                                     need_bias_grad=bias, workspace="outputs", outputs_tail_bytes=0)
    # every chunk but the tail was written into d_weight's storage, from its first element
    n_stats = -(-n // sched.rows)
    assert len(calls) == n_stats + len(sched.chunks) + (sched.tail > 0)
    dw_ptr = grads[1].untyped_storage().data_ptr()
    for i, (ptr, off, numel) in enumerate(calls):
        if i < n_stats + len(sched.chunks):
            assert ptr == dw_ptr and off == 0 and numel <= v * h
        else:
            assert ptr != dw_ptr and numel == n * sched.tail
    # scores of the logits as the kernel stores them (rounded once to the input dtype), soft-capped in fp64
    z = _rounded_logits(hidden, weight, b, softcap)
    ref = torch_token_scores(z, t)
    torch.testing.assert_close(stats[0].double(), torch.logsumexp(z, -1), rtol=1e-5, atol=1e-5)
    for i, name in enumerate(("entropy", "confidence", "margin", "nll"), start=1):
        torch.testing.assert_close(stats[i].double(), getattr(ref, name).double(), rtol=1e-5, atol=1e-5,
                                   msg=name)
    # gradients of the mean nll over the valid rows
    _, ref_grads = lce_naive(hidden, weight, b, t, valid, softcap, "mean")
    got = [grads[0], grads[1]] + ([grads[2]] if bias else [])
    assert grads[2] is None or bias
    tols = _grad_tols(dtype, len(sched.chunks) + (sched.tail > 0), lce_logits64(hidden, weight, b, None))
    for a, c, tol in zip(got, ref_grads, tols):
        assert a.dtype == dtype and torch.isfinite(a).all()
        assert rel_err(a, c) <= tol, (rel_err(a, c), tol, a.shape)
    # the buffer path on the same inputs agrees
    stats_b, grads_b = lce.forward_stats(hid, wt, bb, t, ignore_index=-100, softcap=softcap,
                                         workspace_bytes=1 << 30, row_weights=row_w, need_hidden_grad=True,
                                         need_weight_grad=True, need_bias_grad=bias)
    torch.testing.assert_close(stats, stats_b, rtol=1e-5, atol=1e-5)
    for a, c, tol in zip(got, grads_b, tols):
        assert rel_err(a, c) <= 2 * tol


@needs_interp
def test_only_weight_gradient_and_fallbacks(monkeypatch):
    hidden, weight, b, t = lce_inputs((29,), 24, 131, torch.float32, seed=4, bias=True)
    hid, wt, bb = hidden.detach(), weight.detach(), b.detach()
    row_w = (t != -100).float() * 0.25
    kw = dict(ignore_index=-100, softcap=None, workspace_bytes=1 << 30, row_weights=row_w, need_weight_grad=True,
              need_bias_grad=True)
    ref = lce.forward_stats(hid, wt, bb, t, need_hidden_grad=True, **kw)
    used = []
    orig = lce._forward_grads_in_outputs
    monkeypatch.setattr(lce, "_forward_grads_in_outputs", lambda *a, **k: used.append(1) or orig(*a, **k))
    # d_weight only (frozen hidden): the outputs path, no d_hidden
    stats, (d_h, d_w, d_b) = lce.forward_stats(hid, wt, bb, t, need_hidden_grad=False, workspace="outputs",
                                               outputs_tail_bytes=0, **kw)
    assert used == [1] and d_h is None
    torch.testing.assert_close(stats, ref[0], rtol=1e-5, atol=1e-5)
    assert rel_err(d_w, ref[1][1]) <= 1e-5 and rel_err(d_b, ref[1][2]) <= 1e-5
    # a chunk bound of 1: the buffer path
    got = lce.forward_stats(hid, wt, bb, t, need_hidden_grad=True, workspace="outputs", outputs_tail_bytes=0,
                            outputs_max_chunks=1, **kw)
    assert used == [1]
    for a, c in zip(got[1], ref[1]):
        torch.testing.assert_close(a, c)
    # frozen head (no weight gradient) and no gradients at all: the buffer path
    lce.forward_stats(hid, wt, bb, t, **{**kw, "need_weight_grad": False}, need_hidden_grad=True,
                      workspace="outputs")
    lce.forward_stats(hid, wt, bb, t, **{**kw, "row_weights": None}, workspace="outputs")
    assert used == [1]
    with pytest.raises(ValueError, match="workspace"):
        lce.forward_stats(hid, wt, bb, t, need_hidden_grad=True, workspace="weights", **kw)


@needs_interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "shape,h,v,softcap,bias,reduction",
    [((1,), 24, 50, None, True, "mean"), ((3, 13), 24, 101, 7.0, True, "sum"), ((2, 9), 48, 203, None, False, "mean")],
)
def test_linear_cross_entropy_outputs_workspace(dtype, shape, h, v, softcap, bias, reduction, monkeypatch):
    """Through the public op: the outputs path runs at ratio 1 (tiny tail budget: several chunks), the loss and
    gradients match fp64; below ratio 1 the selected-rows backward runs as before."""
    monkeypatch.setattr(lce, "OUTPUTS_TAIL_BYTES", 0)
    used, stats_calls = [], []
    orig, orig_stats = lce.outputs_backward, lce.outputs_forward_stats
    monkeypatch.setattr(lce, "outputs_backward", lambda *a, **k: used.append(a[6]) or orig(*a, **k))
    monkeypatch.setattr(lce, "outputs_forward_stats", lambda *a, **k: stats_calls.append(a[4]) or orig_stats(*a, **k))
    hidden, weight, b, t = lce_inputs(shape, h, v, dtype, seed=sum(shape) + v, bias=bias)
    for ratio in (1.0, 0.5):
        used.clear()
        stats_calls.clear()
        for x in (hidden, weight, b):
            if x is not None:
                x.grad = None
        loss, info = linear_cross_entropy(hidden, weight, t, bias=b, ratio=ratio, softcap=softcap,
                                          reduction=reduction, impl="triton", return_info=True, options=OUTPUTS)
        assert len(stats_calls) == (ratio == 1.0) and not used  # statistics in the forward, gradients later
        loss.backward()
        assert len(used) == (ratio == 1.0) and stats_calls == used  # one schedule for both passes
        m = len(used[0].chunks) + (used[0].tail > 0) if used else 1
        _, ref_grads = lce_naive(hidden, weight, b, t, info.mask, softcap, reduction)
        ref_loss = _loss_fp64(_rounded_logits(hidden, weight, b, softcap), t, info.mask, reduction)
        assert abs(float(loss.detach()) - ref_loss) <= 1e-5 * max(1.0, abs(ref_loss))
        grads = [hidden.grad, weight.grad] + ([b.grad] if b is not None else [])
        tols = _grad_tols(dtype, m, lce_logits64(hidden, weight, b, None))
        for a, c, tol in zip(grads, ref_grads, tols):
            assert a.dtype == dtype and torch.isfinite(a).all()
            assert rel_err(a, c) <= tol, (ratio, rel_err(a, c), tol)


@needs_interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_outputs_workspace_upstream_gradient_and_double_backward_guard(dtype, monkeypatch):
    """The vocabulary chunks run in the backward with the upstream gradient folded into the row weights: a
    scaled loss gives scaled gradients (no extra pass over d_weight); a second backward is refused."""
    monkeypatch.setattr(lce, "OUTPUTS_TAIL_BYTES", 0)
    hidden, weight, b, t = lce_inputs((3, 13), 24, 101, dtype, seed=41, bias=True)
    loss, info = linear_cross_entropy(hidden, weight, t, bias=b, impl="triton", return_info=True, options=OUTPUTS)
    (loss * 2.5).backward(retain_graph=True)
    _, ref = lce_naive(hidden, weight, b, t, info.mask, None, "mean")
    m = len(lce.outputs_schedule(39, 24, 101, hidden.element_size()).chunks) + 1
    tols = _grad_tols(dtype, m, lce_logits64(hidden, weight, b, None))
    for a, c, tol in zip([hidden.grad, weight.grad, b.grad], ref, tols):
        assert rel_err(a.double() / 2.5, c) <= tol, rel_err(a.double() / 2.5, c)
    with pytest.raises(RuntimeError, match="backward twice"):
        loss.backward()


@needs_interp
def test_outputs_without_a_schedule_runs_the_fused_kernel(monkeypatch):
    """N >> H (here: a chunk cap of 1): at ratio 1 the public op runs the fused kernel (no logits workspace
    either) instead of the chunked kernel's buffer fallback; below ratio 1 the chunked kernel as before."""
    monkeypatch.setattr(lce, "OUTPUTS_TAIL_BYTES", 0)
    monkeypatch.setattr(lce, "OUTPUTS_MAX_CHUNKS", 1)
    assert lce.outputs_schedule(37, 24, 203, 4) is None
    fused_calls, chunked_calls = [], []
    orig_fz, orig_lce = fz.forward_stats, lce.forward_stats
    monkeypatch.setattr(fz, "forward_stats", lambda *a, **k: fused_calls.append(1) or orig_fz(*a, **k))
    monkeypatch.setattr(lce, "forward_stats", lambda *a, **k: chunked_calls.append(1) or orig_lce(*a, **k))
    hidden, weight, b, t = lce_inputs((37,), 24, 203, torch.float32, seed=5, bias=True)
    for ratio in (1.0, 0.5):
        fused_calls.clear()
        chunked_calls.clear()
        for x in (hidden, weight, b):
            x.grad = None
        loss, info = linear_cross_entropy(hidden, weight, t, bias=b, ratio=ratio, impl="triton", return_info=True,
                                          options=OUTPUTS)
        loss.backward()
        assert (len(fused_calls), len(chunked_calls)) == ((1, 0) if ratio == 1.0 else (0, 1))
        ref_loss, ref_grads = lce_naive(hidden, weight, b, t, info.mask, None, "mean")
        assert abs(float(loss.detach()) - float(ref_loss)) <= 1e-5 * max(1.0, abs(float(ref_loss)))
        for a, c in zip([hidden.grad, weight.grad, b.grad], ref_grads):
            assert rel_err(a, c) <= 1e-5, (ratio, rel_err(a, c))


@needs_interp
def test_outputs_passes_split_match_the_one_call_path():
    """outputs_forward_stats (own scratch) + outputs_backward == forward_stats(workspace='outputs') bit for bit;
    a scratch that is too small or of another dtype is refused."""
    hidden, weight, b, t = lce_inputs((41,), 24, 157, torch.float32, seed=12, bias=True)
    hid, wt, bb = hidden.detach(), weight.detach(), b.detach()
    row_w = (t != -100).float() / 7
    sched = lce.outputs_schedule(41, 24, 157, 4, tail_bytes=0)
    assert sched is not None and len(sched.chunks) >= 3
    kw = dict(ignore_index=-100, softcap=None)
    stats = lce.outputs_forward_stats(hid, wt, bb, t, sched, **kw)
    grads = lce.outputs_backward(hid, wt, bb, t, stats[0], row_w, sched, need_hidden_grad=True, need_bias_grad=True,
                                 **kw)
    ref_stats, ref_grads = lce._forward_grads_in_outputs(hid, wt, bb, t, row_w, sched, need_hidden_grad=True,
                                                         need_bias_grad=True, **kw)
    assert torch.equal(stats, ref_stats)
    for a, c in zip(grads, ref_grads):
        assert torch.equal(a, c)
    with pytest.raises(ValueError, match="scratch must hold"):
        lce.outputs_forward_stats(hid, wt, bb, t, sched, scratch=torch.empty(10), **kw)
    with pytest.raises(ValueError, match="scratch must hold"):
        lce.outputs_forward_stats(hid, wt, bb, t, sched, scratch=torch.empty(24 * 157, dtype=torch.float64), **kw)


def test_option_validation():
    assert LinearCrossEntropyOptions().workspace == "buffer"
    with pytest.raises(ValueError, match="workspace"):
        LinearCrossEntropyOptions(workspace="weights")
    with pytest.raises(ValueError, match="kernel='chunked' only"):
        LinearCrossEntropyOptions(kernel="fused", workspace="outputs")
