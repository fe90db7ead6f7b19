"""CGGRScorer and CGGRModel against independent references (selection by brute force in fp64, loss by HF)."""

from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from cggr import CGGRModel, CGGRScorer, create_truncated_router  # noqa: E402
from cggr.selection import select_tokens  # noqa: E402
from tests.reference import brute_difficulty  # noqa: E402
from tests.test_router import CONFIGS, V, build_model, reference_k_layers  # noqa: E402

K_ROUTER = 2


def reference_selection(name, model, ids, labels, mask, k, causal=True):
    ref = reference_k_layers(name, model, K_ROUTER)
    labels = labels.masked_fill(mask == 0, -100) if mask is not None else labels
    targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100) if causal else labels
    with torch.no_grad():
        logits = ref(input_ids=ids, attention_mask=mask).logits
    d = brute_difficulty(logits, targets)
    valid = targets != -100
    seq = torch.where(valid, d, 0.0).sum(-1) / valid.sum(-1).clamp(min=1)
    seq = torch.where(valid.sum(-1) > 0, seq, -math.inf)
    return set(torch.argsort(seq, descending=True)[:k].tolist()), labels


def _grads(model):
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


def _batch(seed, b=6, t=12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (b, t), generator=g)
    labels = ids.clone()
    labels[1, :4] = -100
    labels[3, 5:9] = -100
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0
    mask[4, 3:] = 0
    return ids, labels, mask


@pytest.mark.parametrize("name", [n for n in CONFIGS if n not in ("bert", "roberta")])  # MLMs: test below
def test_gradients_equal_plain_cross_entropy_on_selected_sequences(name):
    model = build_model(name).eval()  # no dropout: the reference must see the same function
    ids, labels, mask = _batch(11)
    if name.startswith("mamba"):
        mask = None  # Mamba has no padding mask semantics for training
    cm = CGGRModel(model, num_router_layers=K_ROUTER, min_tokens_ratio=0.5, warmup_steps=0)
    torch.manual_seed(0)
    loss = cm(ids, labels=labels, attention_mask=mask).loss
    loss.backward()
    got = _grads(model)
    sel = set(cm.get_metrics()["selected_indices"])
    want, masked_labels = reference_selection(name, model, ids, labels, mask, 3)
    assert sel == want
    model.zero_grad(set_to_none=True)
    idx = torch.tensor(sorted(sel))
    torch.manual_seed(0)
    ref = model(input_ids=ids[idx], attention_mask=None if mask is None else mask[idx], labels=masked_labels[idx]).loss
    ref.backward()
    assert torch.allclose(loss, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(got, _grads(model), strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_padding_and_ignored_positions_have_no_influence():
    model = build_model("llama").train()
    ids, labels, mask = _batch(12)
    cm = CGGRModel(model, num_router_layers=K_ROUTER, min_tokens_ratio=0.5, warmup_steps=0)
    loss1 = cm(ids, labels=labels, attention_mask=mask).loss
    loss1.backward()
    g1, sel1 = _grads(model), cm.get_metrics()["selected_indices"]
    model.zero_grad(set_to_none=True)
    # scramble every padded position's token and label
    g = torch.Generator().manual_seed(5)
    pad = mask == 0
    ids2 = torch.where(pad, torch.randint(3, V, ids.shape, generator=g), ids)
    labels2 = torch.where(pad, torch.randint(3, V, ids.shape, generator=g), labels)
    loss2 = cm(ids2, labels=labels2, attention_mask=mask).loss
    loss2.backward()
    assert cm.get_metrics()["selected_indices"] == sel1
    assert torch.allclose(loss1, loss2, rtol=1e-6, atol=1e-7)
    for a, b in zip(g1, _grads(model), strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_left_padding_equals_the_unpadded_sequences():
    """A padding position predicts nothing: with left padding the loss (ratio 1) is the mean next-token CE of the
    unpadded sequences, computed one by one (RoPE: shifting a sequence right leaves its logits unchanged), and
    the padded tokens' content does not matter. HF's own loss would also count the last pad predicting the
    first real token."""
    model = build_model("llama").eval()
    g = torch.Generator().manual_seed(21)
    ids = torch.randint(3, V, (4, 10), generator=g)
    mask = torch.ones_like(ids)
    for row, n_pad in enumerate((0, 3, 5, 9)):
        mask[row, :n_pad] = 0
    cm = CGGRModel(model, num_router_layers=K_ROUTER, min_tokens_ratio=1.0, warmup_steps=0)
    loss = cm(ids, labels=ids, attention_mask=mask).loss
    nll, count = 0.0, 0
    with torch.no_grad():
        for row in range(4):
            seq = ids[row, mask[row].bool()][None]  # (1, T_row) unpadded
            logits = model(input_ids=seq).logits[0, :-1].double()
            nll += float(torch.nn.functional.cross_entropy(logits, seq[0, 1:], reduction="sum"))
            count += seq.shape[1] - 1
    assert cm.get_metrics()["tokens_total"] == count
    assert abs(loss.item() - nll / count) < 1e-5
    scrambled = torch.where(mask == 0, torch.randint(3, V, ids.shape, generator=g), ids)
    torch.testing.assert_close(cm(scrambled, labels=scrambled, attention_mask=mask).loss, loss, rtol=1e-6, atol=1e-6)
    # the router's sequence scores ignore the padding too: the same sequences are picked whatever it holds
    half = CGGRModel(model, num_router_layers=K_ROUTER, min_tokens_ratio=0.5, warmup_steps=0)
    half(ids, labels=ids, attention_mask=mask)
    picked = half.get_metrics()["selected_indices"]
    half(scrambled, labels=scrambled, attention_mask=mask)
    assert half.get_metrics()["selected_indices"] == picked


@pytest.mark.parametrize("name", ["bert", "roberta"])
def test_masked_lm_labels_are_not_shifted(name):
    model = build_model(name).eval()
    ids, _, mask = _batch(13)
    labels = torch.full_like(ids, -100)
    labels[:, 2::3] = ids[:, 2::3]
    labels[4] = -100  # a sequence with no target at all is never picked over ones that have targets
    cm = CGGRModel(model, num_router_layers=K_ROUTER, min_tokens_ratio=0.5, warmup_steps=0)
    assert not cm.causal
    loss = cm(ids, labels=labels, attention_mask=mask).loss
    loss.backward()
    got = _grads(model)
    sel = set(cm.get_metrics()["selected_indices"])
    want, masked = reference_selection(name, model, ids, labels, mask, 3, causal=False)
    assert sel == want and 4 not in sel
    model.zero_grad(set_to_none=True)
    idx = torch.tensor(sorted(sel))
    ref = model(input_ids=ids[idx], attention_mask=mask[idx], labels=masked[idx]).loss
    ref.backward()
    assert torch.allclose(loss, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(got, _grads(model), strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_token_ratio_keeps_only_hardest_tokens_of_selected_sequences():
    model = build_model("qwen2").eval()
    ids, labels, mask = _batch(14)
    cm = CGGRModel(model, num_router_layers=K_ROUTER, min_tokens_ratio=0.5, warmup_steps=0, token_ratio=0.3)
    loss = cm(ids, labels=labels, attention_mask=mask).loss
    idx = cm._last["indices"]
    router = create_truncated_router(model, K_ROUTER)
    ml = labels.masked_fill(mask == 0, -100)
    targets = torch.nn.functional.pad(ml[:, 1:], (0, 1), value=-100)
    d = brute_difficulty(router(ids, attention_mask=mask), targets).float()
    keep = select_tokens(d[idx], targets[idx] != -100, 0.3)
    with torch.no_grad():
        logits = model(input_ids=ids[idx], attention_mask=mask[idx]).logits.double()
    nll = torch.logsumexp(logits, -1) - torch.gather(logits, -1, targets[idx].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    ref = nll[keep].mean()
    n_valid = (targets[idx] != -100).sum()
    assert keep.sum() == max(1, math.floor(0.3 * n_valid + 0.5))
    assert cm.get_metrics()["tokens_selected"] == int(keep.sum())
    assert torch.allclose(loss.double(), ref, rtol=1e-5)


@pytest.mark.parametrize("ratio", [1.0, 0.5])
def test_int32_labels_equal_int64_labels(ratio):
    model = build_model("llama").eval()
    ids, labels, mask = _batch(19)
    cm = CGGRModel(model, num_router_layers=K_ROUTER, min_tokens_ratio=ratio, warmup_steps=0)
    want = cm(ids, labels=labels, attention_mask=mask).loss
    got = cm(ids, labels=labels.int(), attention_mask=mask).loss
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_hf_trainer_reads_num_items_in_batch_from_the_forward():
    """transformers' Trainer (5.x, Trainer.__init__ / training_step) passes ``num_items_in_batch`` to a model that
    says ``accepts_loss_kwargs = True`` and then does not divide its loss by the accumulation steps; CGGRModel's
    forward takes it and normalises by it (the accumulation equivalence itself:
    tests/integrations/test_integrations_hf.py)."""
    import inspect

    cm = CGGRModel(build_model("llama"), num_router_layers=K_ROUTER)
    assert cm.accepts_loss_kwargs is True
    assert "num_items_in_batch" in inspect.signature(cm.forward).parameters
    assert cm.loss_type == "ForCausalLM"  # the Trainer counts labels[:, 1:] for such a model


def test_labels_none_returns_plain_output_and_random_control():
    model = build_model("llama")
    ids, labels, mask = _batch(15)
    cm = CGGRModel(model, warmup_steps=0)
    out = cm(ids, attention_mask=mask)
    with torch.no_grad():
        assert torch.equal(out.logits, model(input_ids=ids, attention_mask=mask).logits)
    rnd = CGGRModel(model, warmup_steps=0, selection="random", seed=3, min_tokens_ratio=0.5)
    seen = set()
    for _ in range(6):
        rnd(ids, labels=labels)
        sel = rnd.get_metrics()["selected_indices"]
        assert len(sel) == len(set(sel)) == 3
        seen |= set(sel)
    assert len(seen) > 3


@pytest.mark.parametrize("selection,token_ratio", [("topk", None), ("random", None), ("topk", 0.5)])
def test_eval_mode_loss_covers_every_sequence_and_token(selection, token_ratio):
    model = build_model("llama")
    ids, labels, mask = _batch(17, b=8)
    cm = CGGRModel(
        model, num_router_layers=K_ROUTER, min_tokens_ratio=0.25, warmup_steps=0, selection=selection,
        token_ratio=token_ratio, seed=4,
    )
    train_loss = cm(ids, labels=labels, attention_mask=mask).loss
    metrics, counter = cm.get_metrics(), cm.rng_counter.clone()
    cm.eval()
    with torch.no_grad():
        got = cm(ids, labels=labels, attention_mask=mask).loss
        logits = model(input_ids=ids, attention_mask=mask).logits.double()  # (B, T, V), all 8 sequences
    # fp64 reference: mean next-token CE over every valid (unpadded, not ignored) position of the batch
    targets = labels.masked_fill(mask == 0, -100)[:, 1:]
    targets = targets.masked_fill(mask[:, :-1] == 0, -100)
    valid = targets != -100
    nll = torch.logsumexp(logits[:, :-1], -1) - logits[:, :-1].gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    want = nll[valid].mean()
    assert abs(float(got) - float(want)) < 1e-5 * float(want)
    assert abs(float(train_loss.detach()) - float(want)) > 1e-4  # the train step saw a quarter of the batch
    assert cm.get_metrics() == metrics and torch.equal(cm.rng_counter, counter)  # eval draws and logs nothing
    cm.train()
    cm(ids, labels=labels, attention_mask=mask)
    assert cm.get_metrics()["sequences_selected"] == 2


def test_curriculum_step_count_and_metrics():
    model = build_model("gpt2")
    cm = CGGRModel(model, min_tokens_ratio=0.25, warmup_steps=4)
    assert [cm.num_selected_sequences(8)] == [8]
    ks = []
    for _ in range(6):
        ks.append(cm.num_selected_sequences(8))
        cm.step()
    # ratio 1, .8125, .625, .4375, .25, .25 -> k = round half up of 8·ratio
    assert ks == [8, 7, 5, 4, 2, 2]
    sd = cm.state_dict()
    assert int(sd["step_count"]) == 6
    cm2 = CGGRModel(model, min_tokens_ratio=0.25, warmup_steps=4)
    cm2.load_state_dict(sd)
    assert cm2.current_ratio == 0.25 and cm2.get_metrics()["step"] == 6
    ids, labels, mask = _batch(16, b=8)
    cm2(ids, labels=labels, attention_mask=mask)
    m = cm2.get_metrics()
    assert m["sequences_selected"] == 2 and m["batch_size"] == 8
    valid = torch.nn.functional.pad(labels.masked_fill(mask == 0, -100)[:, 1:], (0, 1), value=-100) != -100
    assert m["tokens_total"] == int(valid.sum())
    assert m["tokens_selected"] == int(valid[m["selected_indices"]].sum())
    assert 0.0 < m["router_confidence"] <= 1.0 and m["router_entropy"] > 0


@pytest.mark.parametrize("selection", ["topk", "random"])
def test_compiled_training_step_does_not_recompile(selection):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model = build_model("llama").train()
    cm = CGGRModel(model, num_router_layers=K_ROUTER, min_tokens_ratio=0.5, warmup_steps=0, selection=selection,
                   seed=1)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(cm, backend=counter)
    frames = []
    for i in range(4):
        ids, labels, _ = _batch(100 + i)
        loss = compiled(ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        cm.step()
        frames.append(counter.frame_count)
        assert torch.isfinite(loss)
    assert frames[0] == 1 and frames[-1] == frames[0], frames  # one graph (no breaks), never recompiled
    # the compiled step selects what the eager one does (the random control: from the same draw)
    ids, labels, _ = _batch(200)
    draw = cm.rng_counter.clone()
    compiled(ids, labels=labels)
    sel_c = cm.get_metrics()["selected_indices"]
    cm.rng_counter.copy_(draw)
    cm(ids, labels=labels)
    assert sorted(sel_c) == sorted(cm.get_metrics()["selected_indices"])
    assert counter.frame_count == frames[0]


def test_scorer_mask_and_info():
    model = build_model("llama")
    router = create_truncated_router(model, K_ROUTER)
    ids, labels, mask = _batch(17)
    targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    sc = CGGRScorer(router, min_tokens_ratio=0.25, warmup_steps=0, dynamic_threshold=False)
    diff, keep, info = sc(ids, targets=targets, attention_mask=mask)
    want = brute_difficulty(reference_k_layers("llama", model, K_ROUTER)(input_ids=ids, attention_mask=mask).logits,
                            targets)  # fmt: skip
    valid = (targets != -100) & mask.bool()
    assert diff.dtype == torch.float32 and diff.shape == ids.shape
    assert torch.allclose(diff.double(), want, rtol=1e-5, atol=1e-5)
    k = max(1, math.floor(0.25 * int(valid.sum()) + 0.5))
    assert int(keep.sum()) == k and not (keep & ~valid).any()
    assert diff[keep].min() >= diff[valid & ~keep].max()
    assert int(info["tokens_selected"]) == k and int(info["tokens_total"]) == int(valid.sum())
    assert float(info["current_ratio"]) == 0.25
    assert 0 < float(info["confidence"]) <= 1 and float(info["entropy"]) > 0
    # warm-up curriculum and dynamic threshold
    sc2 = CGGRScorer(router, min_tokens_ratio=0.5, warmup_steps=2)
    assert int(sc2(ids)[1].sum()) == ids.numel()
    sc2.step()
    sc2.step()
    _, _, info2 = sc2(ids)
    assert 0.5 <= float(info2["current_ratio"]) <= 1.0 and int(sc2.step_count) == 2


def test_bad_arguments():
    model = build_model("llama")
    ids, labels, _ = _batch(18)
    with pytest.raises(ValueError, match="min_tokens_ratio"):
        CGGRModel(model, min_tokens_ratio=0.0)
    with pytest.raises(ValueError, match="selection"):
        CGGRModel(model, selection="stratified")
    with pytest.raises(TypeError, match="model"):
        CGGRModel("gpt2")
    cm = CGGRModel(model, warmup_steps=0)
    with pytest.raises(ValueError, match="labels shape"):
        cm(ids, labels=labels[:, :-1])
    with pytest.raises(ValueError, match="input_ids"):
        cm(None, labels=labels)
    with pytest.raises(TypeError, match="router"):
        CGGRScorer(42)
    # the message names the argument the caller passed (labels, not the internal shifted targets)
    for ratio in (1.0, 0.5):  # 1.0: the router is not run
        cm = CGGRModel(model, warmup_steps=0, min_tokens_ratio=ratio)
        with pytest.raises(TypeError, match=r"labels must be an integer tensor.*float32"):
            cm(ids, labels=labels.float())
        with pytest.raises(TypeError, match=r"input_ids must be an integer tensor.*float32"):
            cm(ids.float(), labels=labels)
        bad = labels.clone()
        bad[1, 3] = model.config.vocab_size  # one past the head's rows
        with pytest.raises(ValueError, match=rf"labels must be in \[0, {model.config.vocab_size}\).*found"):
            cm(ids, labels=bad)
    with pytest.raises(TypeError, match=r"targets must be an integer tensor.*float32"):
        CGGRScorer(create_truncated_router(model, K_ROUTER))(ids, targets=labels.float())
