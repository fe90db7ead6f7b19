"""Cheaper scoring: CGGRModel(sequence_scores=), score_sequences, SequenceScoreCache and AsyncCGGRScorer (CPU)."""

from __future__ import annotations

import pytest
import torch

from cggr import AsyncCGGRScorer, CGGRModel, SequenceScoreCache
from cggr.router import create_truncated_router
from tests.tiny_models import tiny_llama

transformers = pytest.importorskip("transformers")

V, T = 40, 9


def _llama(seed=0):
    return tiny_llama(V, seed=seed, max_position_embeddings=32).train()


def _batch(b=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (b, T), generator=g)
    labels = ids.clone()
    labels[3] = -100  # a sequence without targets: never selected
    mask = torch.ones_like(ids)
    mask[5, 6:] = 0
    return ids, labels, mask


class _Counting:
    def __init__(self, router):
        self.router, self.calls = router, 0

    def __call__(self, *a, **kw):
        self.calls += 1
        return self.router(*a, **kw)


@pytest.mark.parametrize("selection,scoring", [("topk", "combined"), ("sampled", "loss"), ("importance", "entropy"),
                                               ("topk", "reducible")])
def test_precomputed_scores_select_what_the_router_would(selection, scoring):
    model = _llama()
    ids, labels, mask = _batch()
    ref = torch.rand(10) * 3
    kw = {"reference_loss": ref} if scoring == "reducible" else {}
    router = _Counting(create_truncated_router(model, 1))

    def make():
        return CGGRModel(model, router=router, min_tokens_ratio=0.3, warmup_steps=0, selection=selection,
                         scoring=scoring, seed=3, fused_head=False)

    a, b = make(), make()
    loss_a = a(ids, labels=labels, attention_mask=mask, **kw).loss
    scores = b.score_sequences(ids, labels, mask, **kw)
    assert torch.equal(scores, a.last_sequence_scores())
    assert float(scores[3]) == -torch.inf
    calls = router.calls
    loss_b = b(ids, labels=labels, attention_mask=mask, sequence_scores=scores).loss
    assert router.calls == calls  # no router in the step
    assert a.get_metrics()["selected_indices"] == b.get_metrics()["selected_indices"]
    assert torch.allclose(loss_a, loss_b)
    # a sequence without targets stays out even with the largest given score
    hot = torch.zeros(10)
    hot[3] = 100.0
    b(ids, labels=labels, attention_mask=mask, sequence_scores=hot)
    assert 3 not in b.get_metrics()["selected_indices"]


def test_sequence_scores_are_refused_where_they_cannot_apply():
    model = _llama()
    ids, labels, _ = _batch()
    s = torch.rand(10)
    with pytest.raises(ValueError, match="token_ratio"):
        CGGRModel(model, num_router_layers=1, token_ratio=0.5, warmup_steps=0)(ids, labels=labels, sequence_scores=s)
    with pytest.raises(ValueError, match="selection='random'"):
        CGGRModel(model, num_router_layers=1, selection="random")(ids, labels=labels, sequence_scores=s)
    red = CGGRModel(model, num_router_layers=1, scoring="reducible", warmup_steps=0)
    with pytest.raises(ValueError, match="not together with them"):
        red(ids, labels=labels, sequence_scores=s, reference_loss=s)
    cm = CGGRModel(model, num_router_layers=1, warmup_steps=0)
    with pytest.raises(ValueError, match=r"sequence_scores must have shape \(10,\)"):
        cm(ids, labels=labels, sequence_scores=s[:4])
    with pytest.raises(TypeError, match="sequence_scores must be a floating-point"):
        cm(ids, labels=labels, sequence_scores=torch.arange(10))
    with pytest.raises(ValueError, match="reference_loss is required"):
        red.score_sequences(ids, labels)


def test_score_cache_round_trip_and_stale_training_loop():
    cache = SequenceScoreCache(20)
    idx = torch.tensor([4, 0, 19])
    assert torch.isinf(cache.lookup(idx)).all() and cache.age(idx).tolist() == [-1, -1, -1]
    cache.update(idx, torch.tensor([1.0, 2.0, -torch.inf]))
    cache.update(torch.tensor([4]), torch.tensor([5.0]))
    assert cache.lookup(torch.tensor([0, 4, 19, 7])).tolist() == [2.0, 5.0, -torch.inf, torch.inf]
    assert cache.age(torch.tensor([0, 4, 7])).tolist() == [1, 0, -1]
    with pytest.raises(ValueError, match=r"indices must be in \[0, 20\)"):
        cache.lookup(torch.tensor([20]))
    with pytest.raises(TypeError, match="indices must be an integer tensor"):
        cache.lookup(torch.tensor([1.0]))
    with pytest.raises(ValueError, match=r"scores must have shape \(3,\)"):
        cache.update(idx, torch.zeros(2))
    other = SequenceScoreCache(20)
    other.load_state_dict({k: v.clone() for k, v in cache.state_dict().items()})
    assert torch.equal(other.lookup(idx), cache.lookup(idx)) and torch.equal(other.age(idx), cache.age(idx))

    # epoch 1 scores with the router; epoch 2 selects by the cached scores and runs no router
    model = _llama(1)
    ids, labels, mask = _batch(8, seed=4)
    router = _Counting(create_truncated_router(model, 1))
    cm = CGGRModel(model, router=router, min_tokens_ratio=0.25, warmup_steps=0)
    table = SequenceScoreCache(8)
    order = torch.arange(8)
    cm(ids, labels=labels, attention_mask=mask)
    table.update(order, cm.last_sequence_scores())
    first = cm.get_metrics()["selected_indices"]
    calls = router.calls
    cm(ids, labels=labels, attention_mask=mask, sequence_scores=table.lookup(order))
    assert router.calls == calls and cm.get_metrics()["selected_indices"] == first


def test_async_scorer_without_cuda_is_synchronous_and_checks_its_protocol():
    model = _llama(2)
    ids, labels, mask = _batch()
    cm = CGGRModel(model, num_router_layers=1, min_tokens_ratio=0.3, warmup_steps=0)
    scorer = AsyncCGGRScorer(cm)
    scorer.prefetch(ids, labels, mask)
    assert scorer.pending
    with pytest.raises(RuntimeError, match="prefetch called twice"):
        scorer.prefetch(ids, labels, mask)
    got = scorer.wait()
    assert torch.equal(got, cm.score_sequences(ids, labels, mask)) and not scorer.pending
    with pytest.raises(RuntimeError, match="without a prefetch"):
        scorer.wait()
    with pytest.raises(TypeError, match=r"cggr_model must be a cggr\.CGGRModel"):
        AsyncCGGRScorer(model)
