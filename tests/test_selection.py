"""cggr.selection against plain-Python references, with hypothesis for the invariants."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cggr.selection import RatioSchedule, dynamic_ratio, num_selected, select_sequences, select_tokens
from tests.reference import k_of, stratified_quotas, topk_set

STRATEGIES = ["topk", "stratified", "sequence_aware", "fixed_quota", "random"]


def _batch(b, t, *, ignore_share, seed):
    g = torch.Generator().manual_seed(seed)
    diff = torch.rand(b, t, generator=g) * 10
    valid = torch.rand(b, t, generator=g) >= ignore_share
    return diff, valid


def _mask_set(mask):
    return set(torch.nonzero(mask.reshape(-1)).flatten().tolist())


@st.composite
def batches(draw):
    b = draw(st.integers(1, 6))
    t = draw(st.integers(1, 40))
    ratio = draw(st.floats(0.01, 1.0))
    ignore = draw(st.sampled_from([0.0, 0.3, 0.9]))
    seed = draw(st.integers(0, 2**31 - 1))
    diff, valid = _batch(b, t, ignore_share=ignore, seed=seed)
    return diff, valid, ratio, seed


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5, 1.0])
@pytest.mark.parametrize("shape", [(1,), (1, 1), (3, 17), (2, 64), (257,)])
def test_topk_equals_brute_force(shape, ratio):
    diff = torch.randn(shape)
    valid = torch.rand(shape) > 0.25
    mask = select_tokens(diff, valid, ratio, strategy="topk")
    assert mask.shape == diff.shape and mask.dtype == torch.bool
    assert _mask_set(mask) == topk_set(diff, valid, ratio)
    assert torch.equal(mask, select_tokens(diff, valid, ratio, strategy="fixed_quota"))


@settings(max_examples=60, deadline=None)
@given(batches(), st.sampled_from(STRATEGIES))
def test_every_strategy_keeps_exactly_k_valid_tokens(batch, strategy):
    diff, valid, ratio, seed = batch
    gen = torch.Generator().manual_seed(seed)
    mask = select_tokens(diff, valid, ratio, strategy=strategy, generator=gen, min_tokens_per_sequence=1)
    k = k_of(ratio, int(valid.sum()))
    assert not (mask & ~valid).any()
    if strategy == "sequence_aware":
        assert int(mask.sum()) >= k
    else:
        assert int(mask.sum()) == k


@settings(max_examples=60, deadline=None)
@given(batches(), st.integers(1, 7))
def test_stratified_takes_the_quota_of_every_bucket(batch, num_strata):
    diff, valid, ratio, seed = batch
    mask = select_tokens(diff, valid, ratio, strategy="stratified", num_strata=num_strata,
                         generator=torch.Generator().manual_seed(seed))
    d, v, m = diff.reshape(-1).tolist(), valid.reshape(-1).tolist(), mask.reshape(-1).tolist()
    order = sorted((i for i in range(len(d)) if v[i]), key=lambda i: -d[i])
    n = len(order)
    bucket_of = {i: r * num_strata // n for r, i in enumerate(order)}
    sizes = [sum(1 for i in order if bucket_of[i] == b) for b in range(num_strata)]
    taken = [sum(1 for i in order if m[i] and bucket_of[i] == b) for b in range(num_strata)]
    assert taken == stratified_quotas(k_of(ratio, n), sizes)


def test_stratified_is_seedable_and_random_within_buckets():
    diff, valid = _batch(4, 50, ignore_share=0.1, seed=3)
    run = lambda s: select_tokens(diff, valid, 0.3, strategy="stratified",
                                  generator=torch.Generator().manual_seed(s))
    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


@settings(max_examples=60, deadline=None)
@given(batches(), st.integers(1, 12))
def test_sequence_aware_tops_up_every_sequence_with_its_hardest(batch, min_per_seq):
    diff, valid, ratio, _ = batch
    mask = select_tokens(diff, valid, ratio, strategy="sequence_aware", min_tokens_per_sequence=min_per_seq)
    base = select_tokens(diff, valid, ratio, strategy="topk")
    assert not (base & ~mask).any(), "the global top-k is always kept"
    for row in range(diff.shape[0]):
        n_valid = int(valid[row].sum())
        kept = int(mask[row].sum())
        assert kept == max(int(base[row].sum()), min(min_per_seq, n_valid))
        added = mask[row] & ~base[row]
        if added.any():  # additions are the row's hardest tokens that the global top-k left out
            left = valid[row] & ~mask[row]
            if left.any():
                assert diff[row][added].min() >= diff[row][left].max()


def test_random_is_uniform_over_valid_tokens():
    diff = torch.arange(20.0)
    valid = torch.ones(20, dtype=torch.bool)
    valid[:4] = False
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(20)
    trials = 2000
    for _ in range(trials):
        counts += select_tokens(diff, valid, 0.25, strategy="random", generator=gen).float()
    assert counts[:4].sum() == 0
    freq = counts[4:] / trials  # each valid token: k/n = 4/16 = 0.25
    assert (freq - 0.25).abs().max() < 0.05


def test_nan_difficulty_counts_as_hardest():
    diff = torch.tensor([0.1, float("nan"), 5.0, 0.2])
    mask = select_tokens(diff, None, 0.25)
    assert mask.tolist() == [False, True, False, False]


def test_all_ignored_selects_nothing():
    diff = torch.randn(3, 4)
    valid = torch.zeros(3, 4, dtype=torch.bool)
    for strategy in STRATEGIES:
        assert not select_tokens(diff, valid, 0.5, strategy=strategy,
                                 generator=torch.Generator().manual_seed(0)).any()


def test_tensor_ratio_is_accepted():
    diff, valid = _batch(2, 30, ignore_share=0.0, seed=1)
    a = select_tokens(diff, valid, torch.tensor(0.4))
    b = select_tokens(diff, valid, 0.4)
    assert torch.equal(a, b)


def test_num_selected_rounds_half_up_and_floors_at_one():
    n = torch.tensor([0, 1, 2, 3, 4, 10, 7])
    assert num_selected(0.25, n).tolist() == [0, 1, 1, 1, 1, 3, 2]
    assert num_selected(0.5, torch.tensor(5)).item() == 3  # 2.5 -> 3


def test_ratio_schedule_and_dynamic_threshold():
    sched = RatioSchedule(0.25, 100)
    assert [sched(s) for s in (0, 50, 100, 500)] == [1.0, pytest.approx(0.625), 0.25, 0.25]
    assert RatioSchedule(0.3, 0)(0) == 0.3
    r = dynamic_ratio(0.25, torch.tensor(0.2), 0.5)
    assert r.item() == pytest.approx(0.25 * (1 + 0.8 * 0.5))
    assert dynamic_ratio(0.9, torch.tensor(0.0), 1.0).item() == 1.0  # clamp at 1
    assert dynamic_ratio(0.4, torch.tensor(0.0), -5.0).item() == pytest.approx(0.2)  # clamp at ratio/2


def test_select_sequences():
    d = torch.tensor([0.3, 2.0, float("nan"), 1.0, -4.0])
    assert sorted(select_sequences(d, 2).tolist()) == [1, 2]
    idx = select_sequences(d, 3, strategy="random", generator=torch.Generator().manual_seed(0))
    assert len(set(idx.tolist())) == 3 and all(0 <= i < 5 for i in idx.tolist())


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda: select_tokens(torch.rand(4), None, 0.0), ValueError, r"ratio must be in \(0, 1\], got 0.0"),
        (lambda: select_tokens(torch.rand(4), None, 1.5), ValueError, "ratio must be in"),
        (lambda: select_tokens(torch.rand(4), None, 0.5, strategy="best"), ValueError, "strategy must be one of"),
        (lambda: select_tokens(torch.rand(4), None, 0.5, num_strata=0), ValueError, "num_strata must be >= 1"),
        (lambda: select_tokens(torch.rand(4), None, 0.5, min_tokens_per_sequence=0), ValueError,
         "min_tokens_per_sequence must be >= 1"),
        (lambda: select_tokens(torch.rand(2, 2, 2), None, 0.5), ValueError, "difficulty must be"),
        (lambda: select_tokens(torch.rand(4), torch.ones(3, dtype=torch.bool), 0.5), ValueError, "valid must be"),
        (lambda: RatioSchedule(0.5, -1), ValueError, "warmup_steps must be >= 0, got -1"),
        (lambda: RatioSchedule(0.0, 10), ValueError, "min_tokens_ratio must be in"),
        (lambda: select_sequences(torch.rand(3), 4), ValueError, r"k must be an int in \[1, 3\]"),
    ],
)
def test_bad_input_raises(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_k_reference_matches_formula():
    assert k_of(0.25, 0) == 0 and k_of(0.01, 3) == 1 and k_of(0.5, 5) == 3 and k_of(1.0, 7) == 7
    assert k_of(0.3, 10) == math.floor(3.5)
