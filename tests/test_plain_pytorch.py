"""CGGRModel, CGGRScorer, CGGRLoss and the router on hand-written PyTorch LMs (no transformers), against fp64
brute-force selection and plain cross-entropy on the selected rows."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from cggr import CGGRLoss, CGGRModel, CGGRScorer, create_truncated_router
from tests.reference import brute_difficulty
from tests.tiny_gpt import IdsGPT, KwGPT, MaskedGPT, TinyGPT, TupleGPT

V = 67


def shifted_targets(labels: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """HF shift with CGGRModel's padding rule: a pad neither is predicted nor predicts. (B, T), -100 = none."""
    if mask is not None:
        labels = labels.masked_fill(mask == 0, -100)
    targets = F.pad(labels[:, 1:], (0, 1), value=-100)
    return targets.masked_fill(mask == 0, -100) if mask is not None else targets


def reference_sequences(router_logits: torch.Tensor, targets: torch.Tensor, k: int) -> list[int]:
    d = brute_difficulty(router_logits, targets)
    valid = targets != -100
    seq = torch.where(valid, d, 0.0).sum(-1) / valid.sum(-1).clamp(min=1)
    return sorted(torch.argsort(seq, descending=True)[:k].tolist())


def _batch(seed: int, b: int = 6, t: int = 11, pad: bool = False):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (b, t), generator=g)
    labels = ids.clone()
    labels[1, :3] = -100
    mask = None
    if pad:
        mask = torch.ones_like(ids)
        mask[2, 7:] = 0  # right padding
        mask[4, 6:] = 0
    return ids, labels, mask


def _logits(model, ids, mask=None) -> torch.Tensor:
    if isinstance(model, KwGPT):
        return model(tokens=ids, pad=mask)["scores"]
    if isinstance(model, MaskedGPT):
        return model(ids, attention_mask=mask).logits
    if isinstance(model, IdsGPT):
        return model(ids, attention_mask=mask)
    out = model(ids)
    return out[0] if isinstance(out, tuple) else out


def kw_forward(model, input_ids, attention_mask, **kwargs):
    return model(tokens=input_ids, pad=attention_mask, **kwargs)["scores"]


CASES = {
    "tensor": (TinyGPT, {}, False),
    "hf_names_tensor_output": (IdsGPT, {}, True),
    "tuple": (TupleGPT, {}, False),
    "object_with_mask": (MaskedGPT, {}, True),
    "forward_fn": (KwGPT, {"forward_fn": kw_forward}, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_cggr_model_equals_cross_entropy_on_the_selected_sequences(case):
    """Loss and every parameter's gradient equal plain cross-entropy over the k hardest sequences (k = 3 > 1: the
    old unfused path took ``out[0]``, the first sequence's logits, and called ``model(input_ids=...)``)."""
    cls, kwargs, pad = CASES[case]
    torch.manual_seed(0)
    model = cls().eval()  # no dropout anyway; eval only to make the intent plain
    ids, labels, mask = _batch(3, pad=pad)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cm = CGGRModel(model, min_tokens_ratio=0.5, warmup_steps=0, **kwargs)
    assert any("passthrough" in str(w.message) for w in caught)  # no HF layer list: the model is its own router
    cm.train()
    out = cm(ids, labels=labels, attention_mask=mask)
    out.loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    sel = cm.get_metrics()["selected_indices"]

    targets = shifted_targets(labels, mask)
    with torch.no_grad():
        want_sel = reference_sequences(_logits(model, ids, mask), targets, 3)
    assert sorted(sel) == want_sel
    assert out.logits.shape == (3, ids.shape[1], V)

    model.zero_grad(set_to_none=True)
    idx = torch.tensor(sel)
    logits = _logits(model, ids[idx], None if mask is None else mask[idx])  # (3, T, V)
    ref = F.cross_entropy(logits.flatten(0, 1), targets[idx].flatten(), ignore_index=-100)
    ref.backward()
    ref64 = F.cross_entropy(logits.detach().double().flatten(0, 1), targets[idx].flatten(), ignore_index=-100)
    torch.testing.assert_close(out.loss.detach().double(), ref64, rtol=1e-6, atol=1e-7)
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_eval_mode_is_the_full_loss_and_labels_none_is_the_model_output():
    torch.manual_seed(1)
    model = TinyGPT()
    ids, labels, _ = _batch(5)
    cm = CGGRModel(model, router=create_truncated_router(model, 1, layer_path="blocks"), min_tokens_ratio=0.25,
                   warmup_steps=0).eval()
    with torch.no_grad():
        got = cm(ids, labels=labels).loss
        logits = model(ids).double()
        assert torch.equal(cm(ids), model(ids))  # no labels: the model's own output
    targets = shifted_targets(labels, None)
    want = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-7)


def test_truncated_router_on_a_plain_model_with_layer_path():
    torch.manual_seed(2)
    model = TinyGPT(layers=4)
    ids, _, _ = _batch(6)
    router = create_truncated_router(model, 2, layer_path="blocks")
    assert not router.passthrough and router.layers_used == 2
    assert list(router.parameters()) == [] and len(model.blocks) == 4  # shares, copies nothing, model intact
    with torch.no_grad():
        torch.testing.assert_close(router(ids), model.head(model.hidden(ids, num_layers=2)), rtol=0, atol=0)
    # nanoGPT's tuple output and a forward_fn adapter go through the router too
    tup = TupleGPT(layers=4)
    with torch.no_grad():
        want = tup.head(tup.hidden(ids, num_layers=3))
        torch.testing.assert_close(create_truncated_router(tup, 3, layer_path="blocks")(ids), want, rtol=0, atol=0)
        kw = KwGPT(layers=4)
        r = create_truncated_router(kw, 1, forward_fn=kw_forward, layer_path="blocks")
        torch.testing.assert_close(r(ids), kw.head(kw.hidden(ids, num_layers=1)), rtol=0, atol=0)
    for bad, err in (("layers", ValueError), ("blocks.0", ValueError), ("", TypeError), (3, TypeError)):
        with pytest.raises(err, match="layer_path"):
            create_truncated_router(model, 2, layer_path=bad)


def test_passthrough_router_on_a_plain_model_is_the_full_model():
    torch.manual_seed(3)
    model = TinyGPT()
    ids, _, _ = _batch(7)
    with pytest.warns(UserWarning, match="passthrough"):
        router = create_truncated_router(model, 2)
    assert router.passthrough
    with torch.no_grad():
        torch.testing.assert_close(router(ids), model(ids), rtol=0, atol=0)


def test_user_router_returning_a_tuple_selects_by_its_logits():
    """A callable router (here: the first block of the model, nanoGPT-style tuple output) drives the selection."""
    torch.manual_seed(4)
    model = TinyGPT()
    calls = []

    def router(input_ids, attention_mask=None):
        calls.append(input_ids.shape)
        return model.head(model.hidden(input_ids, num_layers=1)), None

    ids, labels, _ = _batch(8, b=8)
    cm = CGGRModel(model, router=router, min_tokens_ratio=0.25, warmup_steps=0)
    cm(ids, labels=labels)
    with torch.no_grad():
        want = reference_sequences(model.head(model.hidden(ids, num_layers=1)), shifted_targets(labels, None), 2)
    assert sorted(cm.get_metrics()["selected_indices"]) == want and calls == [ids.shape]


def test_scorer_on_a_plain_router_selects_the_hardest_tokens():
    torch.manual_seed(5)
    model = TinyGPT()
    router = create_truncated_router(model, 2, layer_path="blocks")
    ids, labels, _ = _batch(9, b=5, t=13)
    targets = shifted_targets(labels, None)
    sc = CGGRScorer(router, min_tokens_ratio=0.3, warmup_steps=0, dynamic_threshold=False)
    diff, keep, info = sc(ids, targets=targets)
    with torch.no_grad():
        d = brute_difficulty(model.head(model.hidden(ids, num_layers=2)), targets)
    valid = targets != -100
    n_keep = max(1, math.floor(0.3 * int(valid.sum()) + 0.5))
    want = torch.zeros_like(valid)
    want.view(-1)[torch.argsort(torch.where(valid, d, -math.inf).flatten(), descending=True)[:n_keep]] = True
    assert torch.equal(keep, want) and int(info["tokens_selected"]) == n_keep
    torch.testing.assert_close(diff.double(), d, rtol=1e-5, atol=1e-5)


def test_cggr_loss_on_plain_logits_equals_cross_entropy_over_the_selected_rows():
    torch.manual_seed(6)
    model = TinyGPT()
    ids, labels, _ = _batch(10, b=4, t=12)
    targets = shifted_targets(labels, None)
    crit = CGGRLoss(min_tokens_ratio=0.25, warmup_steps=0, dynamic_threshold=False)
    logits = model(ids)  # (B, T, V)
    loss = crit(logits, targets)
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    valid = targets != -100
    d = brute_difficulty(logits.detach(), targets)
    n_keep = max(1, math.floor(0.25 * int(valid.sum()) + 0.5))
    rows = torch.argsort(torch.where(valid, d, -math.inf).flatten(), descending=True)[:n_keep]  # (K,)
    model.zero_grad(set_to_none=True)
    flat = model(ids).flatten(0, 1)  # (B·T, V)
    ref = F.cross_entropy(flat[rows], targets.flatten()[rows])  # hand-picked rows, plain mean
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-7)
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_plain_model_errors_name_the_problem():
    model = TinyGPT()
    ids, labels, _ = _batch(11)
    cm = CGGRModel(model, router=create_truncated_router(model, 1, layer_path="blocks"), warmup_steps=0)
    with pytest.raises(ValueError, match=r"attention_mask.*forward_fn"):  # forward(idx) takes no mask: never dropped
        cm(ids, labels=labels, attention_mask=torch.ones_like(ids))

    class LastOnly(TinyGPT):  # nanoGPT without targets: logits of the last position only
        def forward(self, idx):
            return self.head(self.hidden(idx)[:, [-1]])

    last = LastOnly()
    cm = CGGRModel(last, router=create_truncated_router(last, 1, layer_path="blocks"), min_tokens_ratio=1.0)
    with pytest.raises(ValueError, match=r"logits of shape \(6, 1, 67\)"):
        cm(ids, labels=labels)
    with pytest.raises(TypeError, match="forward_fn"):
        CGGRModel(model, router=create_truncated_router(model, 1, layer_path="blocks"), forward_fn="call")
    with pytest.raises(ValueError, match="forward_fn"):
        CGGRModel(model, forward_fn=kw_forward, fused_head=True, router=lambda i, attention_mask=None: None)


def test_activation_checkpointing_of_a_model_without_it_names_the_model():
    """CGGRModel.activation_checkpointing_enable (what transformers' Trainer calls) is the wrapped model's: a plain
    model without one gets an AttributeError that names it."""
    cm = CGGRModel(TinyGPT(), router=lambda ids, **kw: torch.zeros(*ids.shape, 8))
    with pytest.raises(AttributeError, match=r"the wrapped model TinyGPT has no activation_checkpointing_enable"):
        cm.activation_checkpointing_enable()
