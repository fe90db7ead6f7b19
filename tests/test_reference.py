"""cggr.reference (cached reference losses) and the scores/rules built on it in CGGRLoss and CGGRModel,
against fp64 brute force computed here."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cggr import CGGRLoss, CGGRModel, ReferenceLosses, compute_reference_losses
from cggr.functional import linear_cross_entropy
from cggr.reference import dataset_digest, excess_scores
from cggr.router import create_truncated_router
from cggr.sampling import inclusion_probabilities, sampling_weights
from tests.tiny_models import tiny_llama

transformers = pytest.importorskip("transformers")

V, T = 48, 11


def _llama(seed=0, layers=2):
    return tiny_llama(V, seed=seed, layers=layers)


def _data(n=13, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (n, T), generator=g)
    labels = ids.clone()
    labels[2, :4] = -100
    mask = torch.ones_like(ids)
    mask[4, 7:] = 0  # right padding
    mask[6, :3] = 0  # left padding
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _brute_token_losses(model, data):
    """(N, T) fp64 per-token losses aligned as CGGRModel's shifted targets, and validity, one row at a time."""
    n = data["input_ids"].shape[0]
    out = torch.zeros(n, T, dtype=torch.float64)
    val = torch.zeros(n, T, dtype=torch.bool)
    with torch.no_grad():
        for i in range(n):
            ids, lab, m = data["input_ids"][i], data["labels"][i], data["attention_mask"][i]
            logits = model(input_ids=ids[None], attention_mask=m[None]).logits[0].double()
            for t in range(T - 1):
                y = int(lab[t + 1])
                if m[t] == 0 or m[t + 1] == 0 or y == -100:
                    continue
                out[i, t] = torch.logsumexp(logits[t], 0) - logits[t, y]
                val[i, t] = True
    return out, val


# ---------------------------------------------------------------------------------------------- the cache
def test_compute_matches_brute_force_and_round_trips(tmp_path):
    model = _llama(3).eval()
    data = _data()
    idx = torch.arange(100, 113)  # global indices of these examples
    path = tmp_path / "ref.safetensors"
    ref = compute_reference_losses(model, data, indices=idx, batch_size=4, path=path, tokenizer="tok-a",
                                   progress=False)
    want, val = _brute_token_losses(model, data)
    assert torch.equal(ref.token_valid, val)
    assert torch.allclose(ref.token_loss.double(), want, atol=2e-5)
    seq_want = (want.sum(1) / val.sum(1)).float()
    assert torch.allclose(ref.sequence_loss, seq_want, atol=2e-5)
    loaded = ReferenceLosses.load(path, vocab_size=V, seq_len=T, dataset=data, tokenizer="tok-a", causal=True,
                                  ignore_index=-100)
    assert torch.equal(loaded.sequence_loss, ref.sequence_loss) and torch.equal(loaded.token_loss, ref.token_loss)
    assert torch.equal(loaded.token_valid, ref.token_valid) and torch.equal(loaded.indices, idx)
    batch = torch.tensor([[112, 100], [105, 105]])
    assert torch.equal(loaded.sequence(batch), ref.sequence_loss[batch - 100])
    assert torch.equal(loaded.tokens(torch.tensor([107, 101])), ref.token_loss[[7, 1]])
    assert loaded.fingerprint["dataset_digest"] == dataset_digest(data)
    # a second call with the same path and data loads instead of recomputing
    calls = []
    again = compute_reference_losses(lambda **kw: calls.append(1), data, indices=idx, path=path, tokenizer="tok-a",
                                     progress=False)
    assert not calls and torch.equal(again.sequence_loss, ref.sequence_loss)


def test_mismatches_are_refused_with_the_argument_named(tmp_path):
    model = _llama(3)
    data = _data()
    path = tmp_path / "ref.safetensors"
    ref = compute_reference_losses(model, data, path=path, tokenizer="tok-a", progress=False)
    other = {**data, "input_ids": data["input_ids"].roll(1, 0)}
    with pytest.raises(ValueError, match="vocab_size=49 does not match"):
        ReferenceLosses.load(path, vocab_size=49)
    with pytest.raises(ValueError, match="seq_len=12 does not match"):
        ReferenceLosses.load(path, seq_len=12)
    with pytest.raises(ValueError, match="tokenizer='tok-b' does not match"):
        ref.check(tokenizer="tok-b")
    with pytest.raises(ValueError, match="dataset digest"):
        ref.check(dataset=other)
    with pytest.raises(ValueError, match="dataset has sequence length 10"):
        ref.check(dataset=data["input_ids"][:, :10])
    with pytest.raises(ValueError, match="indices has 2 example indices without a reference loss"):
        ref.sequence([0, 13, 99])
    with pytest.raises(TypeError, match="indices must be integer"):
        ref.sequence(torch.tensor([0.0]))
    with pytest.raises(ValueError, match=r"path .* holds reference losses of another run .*dataset_digest"):
        compute_reference_losses(model, other, path=path, progress=False)
    with pytest.raises(ValueError, match="indices must be 13 integer example indices"):
        compute_reference_losses(model, data, indices=torch.arange(5), progress=False)
    with pytest.raises(ValueError, match="indices must be unique"):
        compute_reference_losses(model, data, indices=torch.zeros(13, dtype=torch.long), progress=False)
    with pytest.raises(ValueError, match="does not exist"):
        ReferenceLosses.load(tmp_path / "nope.safetensors")
    no_tok = compute_reference_losses(model, data["input_ids"], store_tokens=False, progress=False)
    with pytest.raises(ValueError, match="store_tokens=False"):
        no_tok.tokens([0])


def test_resume_from_a_partial_file(tmp_path):
    model = _llama(4).eval()
    data = [{"input_ids": r, "attention_mask": m} for r, m in zip(_data()["input_ids"], _data()["attention_mask"],
                                                                  strict=True)]  # a list of examples
    full = compute_reference_losses(model, data, batch_size=3, progress=False)
    calls = {"n": 0}

    class Flaky(torch.nn.Module):  # fails on its third batch
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, **kw):
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt
            return self.inner(**kw)

    path = tmp_path / "ref.safetensors"
    with pytest.raises(KeyboardInterrupt):
        compute_reference_losses(Flaky(), data, batch_size=3, path=path, checkpoint_every=1, progress=False)
    partial = tmp_path / "ref.safetensors.partial"
    assert partial.is_file() and not path.exists()
    with pytest.raises(ValueError, match="partial file"):
        ReferenceLosses.load(partial)
    calls["n"] = -100  # no more failures; count the batches the resumed run computes
    out = compute_reference_losses(Flaky(), data, batch_size=3, path=path, checkpoint_every=1, progress=False)
    assert calls["n"] == -100 + math.ceil((13 - 6) / 3)  # batches 3.. only: the first 6 examples came from the file
    assert not partial.exists() and path.is_file()
    assert torch.allclose(out.sequence_loss, full.sequence_loss, atol=1e-6)
    assert torch.allclose(out.token_loss, full.token_loss, atol=1e-6)


# ---------------------------------------------------------------------------------------------- scores
def _excess_fp64(lrn, ref, valid, norm):
    lrn, ref = lrn.double(), ref.double()
    vals_l = [float(x) for x, v in zip(lrn.reshape(-1), valid.reshape(-1), strict=True) if v]
    vals_r = [float(x) for x, v in zip(ref.reshape(-1), valid.reshape(-1), strict=True) if v]
    n = len(vals_l)

    def z(x, vals):
        m = sum(vals) / n
        sd = max(math.sqrt(sum((y - m) ** 2 for y in vals) / n), 1e-6)
        return (x - m) / sd

    def rank(x, vals):
        return sum(1 for y in vals if y < x) / max(n - 1, 1)

    out = torch.zeros_like(lrn)
    for i in range(lrn.numel()):
        if not valid.reshape(-1)[i]:
            continue
        a, b = float(lrn.reshape(-1)[i]), float(ref.reshape(-1)[i])
        out.reshape(-1)[i] = {"none": a - b, "zscore": z(a, vals_l) - z(b, vals_r),
                              "rank": rank(a, vals_l) - rank(b, vals_r)}[norm]
    return out


@pytest.mark.parametrize("norm", ["none", "zscore", "rank"])
def test_excess_scores_equal_brute_force(norm):
    g = torch.Generator().manual_seed(7)
    lrn = torch.rand(5, 9, generator=g) * 6
    ref = lrn * 1.4 + torch.randn(5, 9, generator=g) * 0.3
    valid = torch.rand(5, 9, generator=g) > 0.3
    got = excess_scores(lrn, ref, valid, normalize=norm)
    assert torch.allclose(got.double(), _excess_fp64(lrn, ref, valid, norm), atol=1e-5)
    with pytest.raises(ValueError, match="reference_loss shape"):
        excess_scores(lrn, ref[:, :3])
    with pytest.raises(ValueError, match="normalize must be one of"):
        excess_scores(lrn, ref, normalize="minmax")


@pytest.mark.parametrize("norm", ["none", "zscore"])
def test_cggr_loss_excess_selects_the_brute_force_top_k(norm):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 14, 29, generator=g) * 2
    targets = torch.randint(0, 29, (3, 14), generator=g)
    targets[1, 3:9] = -100
    ref = torch.rand(3, 14, generator=g) * 4
    crit = CGGRLoss(scoring="excess", selection="topk", dynamic_threshold=False, min_tokens_ratio=0.3,
                    warmup_steps=0, reference_norm=norm)
    mask, _ = crit.select(logits, targets, reference_loss=ref)
    valid = targets != -100
    nll = torch.where(valid, torch.logsumexp(logits.double(), -1)
                      - logits.double().gather(-1, targets.clamp(min=0)[..., None])[..., 0], 0.0)
    score = _excess_fp64(nll, ref, valid, norm)
    k = math.floor(0.3 * int(valid.sum()) + 0.5)
    order = sorted((i for i in range(42) if valid.reshape(-1)[i]), key=lambda i: -float(score.reshape(-1)[i]))
    assert set(torch.nonzero(mask.reshape(-1)).flatten().tolist()) == set(order[:k])
    loss = crit(logits, targets, reference_loss=ref)
    sel = mask.reshape(-1)
    assert torch.allclose(loss.double(), nll.reshape(-1)[sel].mean(), atol=1e-5)
    with pytest.raises(ValueError, match="reference_loss is required with scoring='excess'"):
        crit(logits, targets)
    with pytest.raises(ValueError, match="reference_loss shape"):
        crit(logits, targets, reference_loss=ref[:, 1:])
    with pytest.raises(ValueError, match="only used with scoring='excess'"):
        CGGRLoss()(logits, targets, reference_loss=ref)
    with pytest.raises(ValueError, match="forward_hidden does not support"):
        crit.forward_hidden(torch.randn(4, 8), torch.randn(29, 8), torch.zeros(4, dtype=torch.long))


def test_cggr_loss_importance_weights_and_unbiasedness():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 9, 17, generator=g) * 2
    targets = torch.randint(0, 17, (2, 9), generator=g)
    targets[0, :3] = -100
    valid = targets != -100
    nll = F.cross_entropy(logits.double().reshape(-1, 17), targets.reshape(-1), reduction="none", ignore_index=-100)
    full = float(nll.sum() / valid.sum())
    crit = CGGRLoss(scoring="loss", selection="importance", dynamic_threshold=False, min_tokens_ratio=0.25,
                    warmup_steps=0, seed=3, uniform_mix=0.2)
    # one call against the Horvitz-Thompson formula with the brute-force inclusion probabilities
    lg = logits.clone().requires_grad_(True)
    loss = crit(lg, targets)
    p, _ = sampling_weights(torch.where(valid, nll.view(2, 9), 0.0), valid, 0.2)
    pi = inclusion_probabilities(p, math.floor(0.25 * int(valid.sum()) + 0.5)).view(2, 9)
    crit2 = CGGRLoss(scoring="loss", selection="importance", dynamic_threshold=False, min_tokens_ratio=0.25,
                     warmup_steps=0, seed=3, uniform_mix=0.2)
    m2, _ = crit2.select(logits, targets)  # the first draw of the same stream = what `loss` used
    want = float((nll.view(2, 9)[m2] / pi[m2]).sum() / valid.sum())
    assert abs(float(loss.detach()) - want) < 1e-5
    loss.backward()  # gradient = that of the weighted sum
    lg2 = logits.double().clone().requires_grad_(True)
    w = torch.where(m2, 1.0 / pi, 0.0) / valid.sum()
    (F.cross_entropy(lg2.reshape(-1, 17), targets.reshape(-1), reduction="none", ignore_index=-100)
     * w.reshape(-1)).sum().backward()
    assert torch.allclose(lg.grad.double(), lg2.grad, atol=1e-6)
    # Monte-Carlo: E[loss] = the full mean (4.5 standard errors: false-alarm rate 6.8e-6)
    draws = 1500
    vals = torch.tensor([float(crit(logits, targets)) for _ in range(draws)], dtype=torch.float64)
    assert abs(float(vals.mean()) - full) <= 4.5 * float(vals.std()) / math.sqrt(draws)
    assert "importance_variance_ratio" in crit.get_metrics()


# ---------------------------------------------------------------------------------------------- CGGRModel
def _router_seq_nll(model, ids, labels, mask, layers):
    """(B,) fp64 mean router nll over each sequence's valid shifted targets, and (B, T) token nll / validity."""
    router = create_truncated_router(model, layers)
    with torch.no_grad():
        logits = router(ids, attention_mask=mask).double()
    lab = labels.masked_fill(mask == 0, -100)
    tgt = F.pad(lab[:, 1:], (0, 1), value=-100).masked_fill(mask == 0, -100)
    valid = tgt != -100
    nll = torch.where(valid, torch.logsumexp(logits, -1) - logits.gather(-1, tgt.clamp(min=0)[..., None])[..., 0],
                      0.0)
    return nll.sum(1) / valid.sum(1), nll, valid


@pytest.mark.parametrize("norm", ["none", "zscore", "rank"])
@pytest.mark.parametrize("per_token", [False, True])
def test_reducible_selection_equals_brute_force(norm, per_token):
    model = _llama(5).train()
    d = _data(10, seed=8)
    ids, labels, mask = d["input_ids"], d["labels"], d["attention_mask"]
    g = torch.Generator().manual_seed(1)
    ref_tok = torch.rand(10, T, generator=g) * 5
    cm = CGGRModel(model, num_router_layers=1, min_tokens_ratio=0.3, warmup_steps=0, scoring="reducible",
                   reference_norm=norm)
    seq_nll, _, valid = _router_seq_nll(model, ids, labels, mask, 1)
    if per_token:
        ref_arg = ref_tok
        seq_ref = torch.where(valid, ref_tok.double(), 0.0).sum(1) / valid.sum(1)
    else:
        ref_arg = ref_tok[:, 0]
        seq_ref = ref_arg.double()
    cm(ids, labels=labels, attention_mask=mask, reference_loss=ref_arg)
    score = _excess_fp64(seq_nll, seq_ref, torch.ones(10, dtype=torch.bool), norm)
    got = cm.get_metrics()["selected_indices"]
    assert len(set(got)) == 3  # the three largest scores (rank differences can tie: compare the values)
    assert torch.allclose(score[got].sort().values, torch.topk(score, 3).values.sort().values, atol=1e-5)
    with pytest.raises(ValueError, match="reference_loss is required with scoring='reducible'"):
        cm(ids, labels=labels)
    with pytest.raises(ValueError, match=r"reference_loss must be per sequence \(10,\) or per token"):
        cm(ids, labels=labels, reference_loss=ref_tok[:, :4])
    with pytest.raises(ValueError, match="only used with scoring='reducible'"):
        CGGRModel(model, num_router_layers=1)(ids, labels=labels, reference_loss=ref_arg)
    cm.eval()  # eval: the full loss, no reference needed
    assert torch.isfinite(cm(ids, labels=labels).loss)


def test_importance_model_loss_is_the_horvitz_thompson_estimate():
    model = _llama(6).train()
    d = _data(9, seed=3)
    ids, labels, mask = d["input_ids"], d["labels"], d["attention_mask"]
    cm = CGGRModel(model, num_router_layers=1, min_tokens_ratio=0.34, warmup_steps=0, scoring="loss",
                   selection="importance", uniform_mix=0.3, seed=2, fused_head=False)
    loss = cm(ids, labels=labels, attention_mask=mask).loss
    idx = cm.get_metrics()["selected_indices"]
    assert len(set(idx)) == 3
    seq_nll, _, valid = _router_seq_nll(model, ids, labels, mask, 1)
    p, _ = sampling_weights(seq_nll, torch.ones(9, dtype=torch.bool), 0.3)
    pi = inclusion_probabilities(p, 3)
    with torch.no_grad():
        full_logits = model(input_ids=ids, attention_mask=mask).logits.double()
    lab = labels.masked_fill(mask == 0, -100)
    tgt = F.pad(lab[:, 1:], (0, 1), value=-100).masked_fill(mask == 0, -100)
    tok = F.cross_entropy(full_logits.reshape(-1, V), tgt.reshape(-1), ignore_index=-100, reduction="none").view(9, T)
    want = sum(float(tok[i].sum()) / float(pi[i]) for i in idx) / int(valid.sum())
    assert abs(float(loss.detach()) - want) < 1e-4 * max(1.0, abs(want))
    assert cm.get_metrics()["importance_variance_ratio"] > 0
    with pytest.raises(ValueError, match=r"token_ratio=0\.5 cannot be combined with selection='importance'"):
        CGGRModel(model, selection="importance", token_ratio=0.5)


@pytest.mark.parametrize("selection", ["sampled", "importance"])
def test_state_dict_resume_reproduces_the_stream(selection):
    model = _llama(7).train()
    d = _data(12, seed=5)
    ids, labels = d["input_ids"], d["labels"]

    def make():
        return CGGRModel(model, num_router_layers=1, min_tokens_ratio=0.25, warmup_steps=3, selection=selection,
                         scoring="loss", seed=4, temperature=0.5)

    a = make()
    for _ in range(3):
        a(ids, labels=labels)
        a.step()
    state = a.state_dict()
    state = {k: v.clone() for k, v in state.items() if not k.startswith(("model.", "router."))}  # a snapshot
    runs = []
    for _ in range(3):
        a(ids, labels=labels)
        runs.append(a.get_metrics()["selected_indices"])
        a.step()
    b = CGGRModel(model, num_router_layers=1, min_tokens_ratio=0.25, warmup_steps=3, selection=selection,
                  scoring="loss", seed=99, temperature=0.5)
    b.load_state_dict(state, strict=False)
    for want in runs:
        b(ids, labels=labels)
        assert b.get_metrics()["selected_indices"] == want
        b.step()
    loss_a = CGGRLoss(selection=selection, seed=1, warmup_steps=0, dynamic_threshold=False)
    logits = torch.randn(4, 6, V)
    tg = torch.randint(0, V, (4, 6))
    loss_a.select(logits, tg)
    st = {k: v.clone() for k, v in loss_a.state_dict().items()}
    m1 = loss_a.select(logits, tg)[0]
    loss_b = CGGRLoss(selection=selection, seed=0, warmup_steps=0, dynamic_threshold=False)
    loss_b.load_state_dict(st)
    assert torch.equal(loss_b.select(logits, tg)[0], m1)


@pytest.mark.parametrize("selection", ["sampled", "importance"])
def test_compiled_model_step_does_not_recompile(selection):
    from torch._dynamo.testing import CompileCounter

    model = _llama(8).train()
    cm = CGGRModel(model, num_router_layers=1, min_tokens_ratio=0.5, warmup_steps=0, selection=selection,
                   scoring="loss", seed=0)
    counter = CompileCounter()
    compiled = torch.compile(cm, backend=counter)
    d = _data(8, seed=2)
    for _ in range(3):
        compiled(d["input_ids"], labels=d["labels"]).loss.backward()
    assert counter.frame_count == 1, counter.frame_count


# ---------------------------------------------------------------------------------------------- fused head
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("ratio", [1.0, 0.5])
def test_linear_cross_entropy_row_weights_equal_brute_force(reduction, ratio):
    g = torch.Generator().manual_seed(3)
    n, h, v = 23, 8, 31
    hid = torch.randn(n, h, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(v, h, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(v, generator=g, dtype=torch.float64, requires_grad=True)
    tg = torch.randint(0, v, (n,), generator=g)
    tg[::6] = -100
    rw = torch.rand(n, generator=g, dtype=torch.float64) * 3
    loss, info = linear_cross_entropy(hid, w, tg, bias=b, ratio=ratio, reduction=reduction, impl="torch",
                                      row_weights=rw, return_info=True)
    loss.backward()
    grads = [t.grad.clone() for t in (hid, w, b)]
    for t in (hid, w, b):
        t.grad = None
    keep = info.mask
    nll = F.cross_entropy(hid @ w.t() + b, tg, ignore_index=-100, reduction="none")
    want = (nll * rw * keep).sum() / (keep.sum() if reduction == "mean" else 1)
    want.backward()
    # the weights are carried in fp32 (as the op's own 1 / K): fp32-relative agreement
    assert torch.allclose(loss.double(), want, rtol=1e-6, atol=1e-9)
    for got, t in zip(grads, (hid, w, b), strict=True):
        assert (got - t.grad).abs().max() <= 1e-6 * t.grad.abs().max()
    with pytest.raises(ValueError, match="row_weights shape"):
        linear_cross_entropy(hid, w, tg, impl="torch", row_weights=rw[:5])
    with pytest.raises(TypeError, match="row_weights must be a floating-point"):
        linear_cross_entropy(hid, w, tg, impl="torch", row_weights=tg)
