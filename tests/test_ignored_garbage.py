"""Ignored and padded positions never influence selection, loss or gradients, whatever their values.

Each check runs the same call twice on fresh random inputs: once with ordinary values at the ignored
(``ignore_index`` target) or padded (``attention_mask == 0``) positions, once with garbage there (NaN, +inf,
-inf, ±1e30 and large random values). The selection, the loss, every gradient and every metric must be exactly
equal (``torch.equal``, not a tolerance): the ignored positions take no part in any sum. The default
``dynamic_threshold=True`` is used throughout, since its mean confidence is where a NaN used to leak in (it made
the ratio NaN and K collapse to 1).

A NaN at a VALID position is the user's and must still reach the loss; that is checked too.
"""

from __future__ import annotations

import pytest
import torch

from cggr import CGGRLoss, CGGRScorer
from cggr.functional import LinearCrossEntropyOptions, linear_cross_entropy
from cggr.selection import select_tokens

STRATEGIES = ["topk", "stratified", "sequence_aware", "fixed_quota", "random"]
LOSS_STRATEGIES = [*STRATEGIES, "sampled", "importance"]  # the randomised rules of cggr.sampling
NAN, INF = float("nan"), float("inf")


def _seed() -> int:
    return torch.seed() % 2**31


def _garbage_like(rows: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Rows (..., D) of garbage: every row holds NaN, +inf, -inf, ±1e30 and huge random values."""
    out = torch.randn(rows.shape, generator=g, dtype=torch.float64) * 1e4
    flat = out.view(-1, rows.shape[-1])
    specials = torch.tensor([NAN, INF, -INF, 1e30, -1e30], dtype=torch.float64)
    for i in range(flat.shape[0]):
        cols = torch.randperm(rows.shape[-1], generator=g)[: min(rows.shape[-1], 2 + i % 4)]
        flat[i, cols] = specials[(torch.arange(cols.numel()) + i) % specials.numel()]
    if rows.shape[0] > 0:
        flat[0] = NAN  # one row entirely NaN
    if flat.shape[0] > 1:
        flat[1] = INF  # one row entirely +inf
    return out.to(rows.dtype)


def _dirty(x: torch.Tensor, where: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """``x`` with garbage rows at the positions ``where`` (bool over x.shape[:-1])."""
    out = x.detach().clone()
    out[where] = _garbage_like(out[where], g)
    return out


def _loss_inputs(shape, vocab, dtype, g):
    logits = (torch.randn(*shape, vocab, generator=g) * 2).to(dtype)
    targets = torch.randint(0, vocab, shape, generator=g)
    ignored = torch.rand(shape, generator=g) < 0.3
    ignored.view(-1)[0] = True  # at least one ignored position
    ignored.view(-1)[-1] = False  # at least one valid one
    targets[ignored] = -100
    return logits, targets, ignored


def _run_loss(crit, logits, targets):
    z = logits.clone().requires_grad_()
    loss = crit(z, targets)
    loss.backward()
    return loss.detach(), z.grad, crit.get_metrics(), crit._last["tokens_selected"]


@pytest.mark.parametrize("strategy", LOSS_STRATEGIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 13), (29,)])
def test_cggr_loss_ignores_garbage_at_ignored_positions(strategy, dtype, shape):
    g = torch.Generator().manual_seed(_seed())
    logits, targets, ignored = _loss_inputs(shape, 37, dtype, g)
    dirty = _dirty(logits, ignored, g)
    kw = dict(selection=strategy, min_tokens_ratio=0.3, warmup_steps=0, seed=11, min_tokens_per_sequence=2)
    a, b = CGGRLoss(**kw), CGGRLoss(**kw)  # dynamic_threshold=True (the default)
    mask_a, _ = a.select(logits, targets)
    mask_b, _ = b.select(dirty, targets)
    assert torch.equal(mask_a, mask_b)
    a.rng_counter.zero_()
    b.rng_counter.zero_()
    loss_a, grad_a, m_a, _ = _run_loss(a, logits, targets)
    loss_b, grad_b, m_b, _ = _run_loss(b, dirty, targets)
    assert torch.isfinite(loss_a) and torch.equal(loss_a, loss_b)
    assert torch.equal(grad_a, grad_b)
    assert not grad_b[ignored].any()  # exactly 0 (not NaN) at every ignored row
    assert m_a == m_b
    n_valid = int((~ignored).sum())
    assert m_b["tokens_total"] == n_valid and (m_b["tokens_selected"] > 1 or n_valid <= 2)


def test_cggr_loss_nan_at_ignored_position_keeps_the_dynamic_ratio():
    """The probe that found the bug: 63 valid tokens, a NaN row at the one ignored position, 1 token kept."""
    g = torch.Generator().manual_seed(_seed())
    logits = torch.randn(2, 32, 50, generator=g)
    targets = torch.randint(0, 50, (2, 32), generator=g)
    targets[0, 0] = -100
    dirty = logits.clone()
    dirty[0, 0] = NAN
    crit = CGGRLoss(warmup_steps=0)
    crit(logits, targets)
    clean = crit.get_metrics()
    crit(dirty, targets)
    got = crit.get_metrics()
    assert got == clean
    assert got["tokens_selected"] > 1 and got["effective_ratio"] == got["effective_ratio"]  # not NaN


@pytest.mark.parametrize("dynamic", [True, False])
def test_nan_at_a_valid_position_reaches_the_loss(dynamic):
    g = torch.Generator().manual_seed(_seed())
    logits, targets, ignored = _loss_inputs((4, 9), 23, torch.float32, g)
    pos = int(torch.nonzero(~ignored.view(-1))[-1])
    logits.view(-1, 23)[pos, 3] = NAN
    crit = CGGRLoss(min_tokens_ratio=0.25, warmup_steps=0, dynamic_threshold=dynamic)
    mask, _ = crit.select(logits, targets)
    assert mask.view(-1)[pos]  # NaN counts as the hardest
    loss = crit(logits, targets)
    assert torch.isnan(loss)
    # the dynamic threshold falls back to the scheduled ratio: K is not collapsed to 1
    n_valid = int((~ignored).sum())
    assert int(mask.sum()) == max(1, int(0.25 * n_valid + 0.5))
    assert crit.get_metrics()["tokens_selected"] == int(mask.sum())


# ------------------------------------------------------------------------------------------ fused head
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("ratio", [1.0, 0.3])
def test_linear_cross_entropy_ignores_garbage_hidden_rows(strategy, ratio):
    g = torch.Generator().manual_seed(_seed())
    n, h, v = 31, 12, 41
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) / 3
    bias = torch.randn(v, generator=g, dtype=torch.float64)
    targets = torch.randint(0, v, (n,), generator=g)
    ignored = torch.rand(n, generator=g) < 0.3
    ignored[:2] = True
    targets[ignored] = -100
    dirty = _dirty(hidden, ignored, g)
    results = []
    for hid in (hidden, dirty):
        hs, ws, bs = (t.clone().requires_grad_() for t in (hid, weight, bias))
        opts = LinearCrossEntropyOptions(threshold_sensitivity=0.5, generator=torch.Generator().manual_seed(4),
                                         min_tokens_per_sequence=2)
        loss, info = linear_cross_entropy(hs, ws, targets, bias=bs, ratio=ratio, selection=strategy,
                                          impl="torch", return_info=True, options=opts)
        loss.backward()
        results.append((loss.detach(), info.mask, info.num_selected, info.ratio, hs.grad, ws.grad, bs.grad))
    for x, y in zip(*results, strict=True):
        assert torch.equal(x, y)
    assert torch.isfinite(results[1][0]) and not results[1][4][ignored].any()


@pytest.mark.parametrize("dynamic", [True, False])
def test_forward_hidden_ignores_garbage_hidden_rows(dynamic):
    g = torch.Generator().manual_seed(_seed())
    hidden = torch.randn(3, 10, 16, generator=g)
    weight = torch.randn(29, 16, generator=g) / 4
    targets = torch.randint(0, 29, (3, 10), generator=g)
    ignored = torch.rand(3, 10, generator=g) < 0.3
    ignored[0, 0] = True
    targets[ignored] = -100
    dirty = _dirty(hidden, ignored, g)
    out = []
    for hid in (hidden, dirty):
        crit = CGGRLoss(min_tokens_ratio=0.3, warmup_steps=0, dynamic_threshold=dynamic)
        hs, ws = hid.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = crit.forward_hidden(hs, ws, targets)
        loss.backward()
        out.append((loss.detach(), hs.grad, ws.grad, crit.get_metrics()))
    a, b = out
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
    assert a[3] == b[3] and b[3]["avg_confidence"] == b[3]["avg_confidence"]


# ------------------------------------------------------------------------------------------ router (scorer)
class _FixedRouter:
    """A router callable returning fixed (B, T, V) logits, whatever the ids."""

    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits

    def __call__(self, input_ids, attention_mask=None, **kw):
        return self.logits


@pytest.mark.parametrize("strategy", [*STRATEGIES, "sampled"])
@pytest.mark.parametrize("with_targets", [False, True])
def test_scorer_ignores_garbage_router_logits_at_padded_positions(strategy, with_targets):
    g = torch.Generator().manual_seed(_seed())
    b, t, v = 4, 11, 19
    logits = torch.randn(b, t, v, generator=g) * 2
    ids = torch.randint(0, v, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[0, 7:] = 0
    mask[2, :3] = 0  # left padding
    targets = None
    pad = mask == 0
    if with_targets:
        targets = torch.randint(0, v, (b, t), generator=g)
        targets[1, 4] = -100
        pad = pad | (targets == -100)
    dirty = _dirty(logits, pad, g)
    outs = []
    for lg in (logits, dirty):
        sc = CGGRScorer(_FixedRouter(lg), min_tokens_ratio=0.3, warmup_steps=0, selection=strategy, seed=3)
        diff, sel, info = sc(ids, targets=targets, attention_mask=mask)
        outs.append((diff, sel, info))
    (d_a, s_a, i_a), (d_b, s_b, i_b) = outs
    assert torch.equal(s_a, s_b) and not s_b[pad].any()
    assert torch.equal(d_a[~pad], d_b[~pad])
    for key in i_a:
        assert torch.equal(i_a[key], i_b[key]), key
    assert int(i_b["tokens_selected"]) > 1


# ------------------------------------------------------------------------------------------ select_tokens ratio
@pytest.mark.parametrize("bad", [0.0, -1.0, NAN, INF, -INF, 1.5])
def test_select_tokens_rejects_a_bad_tensor_ratio(bad):
    d = torch.randn(10)
    with pytest.raises(ValueError, match=r"ratio must be in \(0, 1\]"):
        select_tokens(d, None, torch.tensor(bad))
    with pytest.raises(ValueError, match=r"ratio must be in \(0, 1\]"):
        select_tokens(d, None, torch.tensor(bad, dtype=torch.float64))


def test_select_tokens_tensor_ratio_type_shape_and_device():
    d = torch.randn(2, 5)
    with pytest.raises(TypeError, match=r"ratio must be a float or a 0-d floating-point tensor, got torch\.int64"):
        select_tokens(d, None, torch.tensor(1))
    with pytest.raises(ValueError, match=r"ratio must be a 0-d tensor, got shape \(1,\)"):
        select_tokens(d, None, torch.tensor([0.5]))
    with pytest.raises(ValueError, match="ratio is on meta but difficulty is on cpu"):
        select_tokens(d, None, torch.tensor(0.5, device="meta"))
    # a valid tensor ratio selects what the same float does
    for r in (0.2, 0.5, 1.0):
        assert torch.equal(select_tokens(d, None, torch.tensor(r, dtype=torch.float64)), select_tokens(d, None, r))


@pytest.mark.parametrize(("selection", "token_ratio"),
                         [("topk", None), ("topk", 0.5), ("sampled", None), ("importance", None)])
def test_model_ignores_garbage_router_logits_at_padded_positions(selection, token_ratio):
    pytest.importorskip("transformers")
    from cggr import CGGRModel
    from tests.test_router import V, build_model

    g = torch.Generator().manual_seed(_seed())
    b, t = 6, 12
    ids = torch.randint(3, V, (b, t), generator=g)
    labels = ids.clone()
    labels[1, :4] = -100
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0
    mask[4, 3:] = 0
    targets = torch.nn.functional.pad(labels.masked_fill(mask == 0, -100)[:, 1:], (0, 1), value=-100)
    targets = targets.masked_fill(mask == 0, -100)
    logits = torch.randn(b, t, V, generator=g)
    dirty = _dirty(logits, targets == -100, g)  # padded, ignored and each row's last position
    model = build_model("llama").train()
    outs = []
    for lg in (logits, dirty):
        model.zero_grad(set_to_none=True)
        cm = CGGRModel(model, router=_FixedRouter(lg), min_tokens_ratio=0.5, warmup_steps=0, token_ratio=token_ratio,
                       selection=selection, seed=7)
        loss = cm(ids, labels=labels, attention_mask=mask).loss
        loss.backward()
        outs.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None],
                     cm.get_metrics()))
    (l_a, g_a, m_a), (l_b, g_b, m_b) = outs
    assert torch.isfinite(l_b) and torch.equal(l_a, l_b)
    assert all(torch.equal(x, y) for x, y in zip(g_a, g_b, strict=True))
    assert m_a == m_b and m_b["router_confidence"] == m_b["router_confidence"]  # the metric is not NaN


@pytest.mark.parametrize("dynamic", [0.5, None])
def test_nan_hidden_at_a_valid_row_reaches_the_linear_ce_loss(dynamic):
    g = torch.Generator().manual_seed(_seed())
    hidden = torch.randn(30, 8, generator=g, dtype=torch.float64)
    weight = torch.randn(17, 8, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 17, (30,), generator=g)
    targets[:4] = -100
    hidden[9, 2] = NAN
    loss, info = linear_cross_entropy(hidden, weight, targets, ratio=0.25, impl="torch", return_info=True,
                                      options=LinearCrossEntropyOptions(threshold_sensitivity=dynamic))
    assert torch.isnan(loss) and bool(info.mask[9])
    assert int(info.num_selected) == max(1, int(0.25 * 26 + 0.5))  # K from the scheduled ratio, not collapsed
