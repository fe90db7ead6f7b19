"""The randomised selection rules (cggr.sampling; selection='sampled' / 'importance') against exact references.

Statistical tests run with fixed seeds (deterministic); their false-alarm rates are stated where they are used:
a chi-square test at alpha = 1e-3, and Monte-Carlo bounds at 4.5 standard errors per coordinate (two-sided
P = 6.8e-6 each, Bonferroni over the coordinates).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from cggr._rng import CounterRNG
from cggr.sampling import (
    importance_select,
    inclusion_probabilities,
    sampling_weights,
    systematic_sample,
    variance_ratio,
)
from cggr.selection import importance_sequences, num_selected, select_sequences, select_tokens

#: chi2.ppf(1 - 1e-3, df) for the degrees of freedom used here (scipy.stats.chi2.ppf, tabulated)
CHI2_CRIT_1E3 = {5: 20.515, 9: 27.877}
Z_BOUND = 4.5


def _rng(seed: int) -> CounterRNG:
    return CounterRNG(seed, torch.zeros((), dtype=torch.long))


def _pl_set_probs(weights: list[float], k: int) -> dict[frozenset, float]:
    """Plackett-Luce probability of every unordered k-subset (sum over its orders of the sequential draws)."""
    out: dict[frozenset, float] = {}
    n = len(weights)
    for perm in itertools.permutations(range(n), k):
        p, left = 1.0, sum(weights)
        for i in perm:
            p *= weights[i] / left
            left -= weights[i]
        out[frozenset(perm)] = out.get(frozenset(perm), 0.0) + p
    return out


def _chi2(counts: dict[frozenset, int], probs: dict[frozenset, float], draws: int) -> float:
    assert set(counts) <= set(probs), "a subset outside the support was drawn"
    return sum((counts.get(s, 0) - draws * p) ** 2 / (draws * p) for s, p in probs.items())


def test_sampled_sequences_follow_plackett_luce():
    scores = torch.tensor([0.3, -0.4, 1.1, 0.0])
    tau = 0.7
    weights = [math.exp(float(s) / tau) for s in scores.double()]
    probs = _pl_set_probs(weights, 2)  # 6 subsets: df = 5
    gen, draws, counts = _rng(11), 6000, {}
    for _ in range(draws):
        key = frozenset(select_sequences(scores, 2, strategy="sampled", temperature=tau, generator=gen).tolist())
        counts[key] = counts.get(key, 0) + 1
    assert _chi2(counts, probs, draws) < CHI2_CRIT_1E3[5]


def test_sampled_tokens_follow_plackett_luce_over_valid_tokens():
    diff = torch.tensor([[0.5, 2.0, -1.0], [1.0, 9.0, 0.2]])  # (2, 3): the 9.0 token is invalid
    valid = torch.tensor([[True, True, True], [True, False, True]])
    tau = 1.5
    flat = [i for i in range(6) if valid.reshape(-1)[i]]
    weights = [math.exp(float(diff.reshape(-1)[i]) / tau) for i in flat]
    probs = {frozenset(flat[j] for j in s): p for s, p in _pl_set_probs(weights, 2).items()}  # 10 subsets
    gen, draws, counts = _rng(5), 6000, {}
    ratio = 0.4  # K = round(0.4 * 5) = 2
    for _ in range(draws):
        mask = select_tokens(diff, valid, ratio, strategy="sampled", temperature=tau, generator=gen)
        assert int(mask.sum()) == 2 and not (mask & ~valid).any()
        key = frozenset(torch.nonzero(mask.reshape(-1)).flatten().tolist())
        counts[key] = counts.get(key, 0) + 1
    assert _chi2(counts, probs, draws) < CHI2_CRIT_1E3[9]


def test_sampled_temperature_limits():
    g = torch.Generator().manual_seed(0)
    diff = torch.randn(5, 13, generator=g)
    valid = torch.rand(5, 13, generator=g) > 0.2
    cold = select_tokens(diff, valid, 0.3, strategy="sampled", temperature=1e-6, generator=_rng(1))
    assert torch.equal(cold, select_tokens(diff, valid, 0.3, strategy="topk"))
    seq = torch.randn(9, generator=g)
    cold_seq = select_sequences(seq, 4, strategy="sampled", temperature=1e-6, generator=_rng(2))
    assert set(cold_seq.tolist()) == set(torch.topk(seq, 4).indices.tolist())
    # tau -> inf: every 2-subset of 4 equally likely (chi-square against uniform, alpha = 1e-3)
    scores = torch.tensor([5.0, -3.0, 0.0, 1.0])
    gen, draws, counts = _rng(3), 3000, {}
    for _ in range(draws):
        key = frozenset(select_sequences(scores, 2, strategy="sampled", temperature=1e9, generator=gen).tolist())
        counts[key] = counts.get(key, 0) + 1
    probs = {frozenset(s): 1 / 6 for s in itertools.combinations(range(4), 2)}
    assert _chi2(counts, probs, draws) < CHI2_CRIT_1E3[5]


def _inclusion_brute(p: list[float], k: int) -> list[float]:
    """pi = min(1, c p) with sum k: cap at 1 and rescale the rest until nothing exceeds 1 (textbook loop)."""
    capped: set[int] = set()
    while True:
        rest = [i for i in range(len(p)) if i not in capped and p[i] > 0]
        scale = (k - len(capped)) / sum(p[i] for i in rest)
        over = [i for i in rest if p[i] * scale > 1 + 1e-12]
        if not over:
            return [1.0 if i in capped else p[i] * scale for i in range(len(p))]
        capped.update(over)


@pytest.mark.parametrize("seed", range(6))
def test_inclusion_probabilities_equal_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(2, 40, (), generator=g))
    scores = torch.rand(n, generator=g, dtype=torch.float64) ** 4 * 10  # skewed: several capped at 1
    valid = torch.rand(n, generator=g) > 0.2
    valid[0] = True
    n_valid = int(valid.sum())
    k = int(torch.randint(1, n_valid + 1, (), generator=g))
    mix = [0.05, 0.3, 1.0][seed % 3]
    p, _ = sampling_weights(scores, valid, mix)
    s = [float(x) if v else 0.0 for x, v in zip(scores.tolist(), valid.tolist(), strict=True)]
    want_p = [((1 - mix) * si / sum(s) + mix / n_valid) if v else 0.0 for si, v in zip(s, valid.tolist(), strict=True)]
    assert torch.allclose(p, torch.tensor(want_p, dtype=torch.float64), rtol=1e-12, atol=1e-15)
    pi = inclusion_probabilities(p, torch.tensor(k))
    want = torch.tensor(_inclusion_brute(want_p, k), dtype=torch.float64)
    assert torch.allclose(pi, want, rtol=1e-9, atol=1e-12), (pi, want)
    assert abs(float(pi.sum()) - k) < 1e-9 and float(pi.max()) <= 1.0


def test_systematic_sample_keeps_exactly_k_with_the_inclusion_probabilities():
    g = torch.Generator().manual_seed(3)
    scores = torch.rand(12, generator=g) ** 3 * 5
    valid = torch.ones(12, dtype=torch.bool)
    valid[[2, 7]] = False
    k = 4
    mask, pi, _ = importance_select(scores, valid, k, uniform_mix=0.1, generator=_rng(0))
    gen, draws = _rng(9), 5000
    counts = torch.zeros(12, dtype=torch.float64)
    for _ in range(draws):
        mask = systematic_sample(pi, k, gen)
        assert int(mask.sum()) == k and not (mask & ~valid).any()
        counts += mask.double()
    freq = counts / draws
    se = (pi * (1 - pi) / draws).sqrt()
    # binomial frequencies within 4.5 standard errors (12 coordinates: false-alarm rate <= 8e-5); pi = 1 exact
    assert ((freq - pi).abs() <= Z_BOUND * se + 1e-12).all(), (freq, pi)


def test_importance_weighted_gradient_is_unbiased():
    """E[Σ_kept g_i / π_i] = Σ_i g_i for the per-sequence gradients of a real softmax head (fp64)."""
    g = torch.Generator().manual_seed(0)
    b, t, h, v, k = 10, 6, 4, 8, 3
    hidden = torch.randn(b, t, h, generator=g, dtype=torch.float64)
    head = torch.randn(v, h, generator=g, dtype=torch.float64)
    targets = torch.randint(0, v, (b, t), generator=g)
    targets[1, :4] = -100
    valid = targets != -100
    n_all = int(valid.sum())
    grads, seq_loss = [], []
    for i in range(b):  # per-sequence gradient of its share of the batch's mean loss
        w = head.clone().requires_grad_(True)
        nll = torch.nn.functional.cross_entropy(hidden[i] @ w.t(), targets[i], ignore_index=-100, reduction="sum")
        (nll / n_all).backward()
        grads.append(w.grad.reshape(-1))
        seq_loss.append(float(nll.detach()) / int(valid[i].sum()))
    grads = torch.stack(grads)  # (B, D)
    full = grads.sum(0)  # the full-batch mean-loss gradient
    scores = torch.tensor(seq_loss)
    gen, draws = _rng(21), 4000
    est = torch.empty(draws, grads.shape[1], dtype=torch.float64)
    for m in range(draws):
        idx, pi, _ = importance_sequences(scores, k, uniform_mix=0.2, generator=gen)
        assert len(set(idx.tolist())) == k
        est[m] = (grads[idx] / pi.unsqueeze(1)).sum(0)
    mean, se = est.mean(0), est.std(0) / math.sqrt(draws)
    # 32 coordinates at 4.5 standard errors: false-alarm rate <= 32 * 6.8e-6
    assert ((mean - full).abs() <= Z_BOUND * se + 1e-12).all(), ((mean - full) / se).abs().max()
    # and it is a real reduction against uniform sampling of the same k (scores correlate with the gradients)
    assert torch.isfinite(est).all()


def test_variance_ratio_equals_formula():
    scores = torch.tensor([3.0, 0.5, 0.0, 1.5, 7.0])
    valid = torch.tensor([True, True, True, False, True])
    p, s = sampling_weights(scores, valid, 0.25)
    got = float(variance_ratio(p, s, valid))
    ss = [3.0, 0.5, 0.0, 7.0]
    tot = sum(ss)
    pp = [0.75 * x / tot + 0.25 / 4 for x in ss]
    want = sum(x * x / q for x, q in zip(ss, pp, strict=True)) / (4 * sum(x * x for x in ss))
    assert abs(got - want) < 1e-6
    p1, s1 = sampling_weights(scores, valid, 1.0)
    assert abs(float(variance_ratio(p1, s1, valid)) - 1.0) < 1e-6  # uniform: no change


def test_importance_select_edge_cases():
    # NaN and +inf count as the largest finite score; negatives as 0; all-zero scores: uniform
    scores = torch.tensor([float("nan"), 2.0, -5.0, float("inf")])
    p, _ = sampling_weights(scores, torch.ones(4, dtype=torch.bool), 0.5)
    assert torch.allclose(p, torch.tensor([0.5 * 2 / 6 + 0.125, 0.5 * 2 / 6 + 0.125, 0.125, 0.5 * 2 / 6 + 0.125],
                                          dtype=p.dtype))
    p0, _ = sampling_weights(torch.zeros(3), torch.ones(3, dtype=torch.bool), 0.1)
    assert torch.allclose(p0, torch.full((3,), 1 / 3, dtype=p0.dtype))
    # k = n_valid keeps everything with pi = 1; sequences with -inf scores are never kept
    idx, pi, _ = importance_sequences(torch.tensor([1.0, -torch.inf, 2.0]), 2, generator=_rng(0))
    assert set(idx.tolist()) == {0, 2} and torch.allclose(pi, torch.ones(2, dtype=pi.dtype))
    # fewer keepable sequences than k: the extra index carries pi = 0 (weight 0)
    idx, pi, _ = importance_sequences(torch.tensor([1.0, -torch.inf, -torch.inf]), 2, generator=_rng(0))
    assert idx[0] == 0 and float(pi[0]) == 1.0 and float(pi[1]) == 0.0
    # every token ignored: nothing kept
    assert not select_tokens(torch.randn(2, 3), torch.zeros(2, 3, dtype=torch.bool), 0.5, strategy="importance",
                             generator=_rng(0)).any()
    with pytest.raises(ValueError, match="uniform_mix"):
        select_tokens(torch.randn(4), None, 0.5, strategy="importance", uniform_mix=0.0)
    with pytest.raises(ValueError, match="temperature"):
        select_sequences(torch.randn(4), 2, strategy="sampled", temperature=0.0)
    with pytest.raises(TypeError, match="temperature"):
        select_sequences(torch.randn(4), 2, strategy="sampled", temperature="hot")


@pytest.mark.parametrize("strategy", ["sampled", "importance"])
@pytest.mark.parametrize("shape", [(1,), (3, 17), (257,)])
@pytest.mark.parametrize("ratio", [0.1, 0.5, 1.0])
def test_exact_k_valid_tokens(strategy, shape, ratio):
    g = torch.Generator().manual_seed(sum(shape))
    diff = torch.rand(shape, generator=g) * 4
    valid = torch.rand(shape, generator=g) > 0.3
    mask = select_tokens(diff, valid, ratio, strategy=strategy, generator=_rng(4))
    assert int(mask.sum()) == int(num_selected(ratio, valid.sum())) and not (mask & ~valid).any()


def test_draws_are_reproducible_from_the_counter():
    scores = torch.rand(30)
    a, b = _rng(8), _rng(8)
    for _ in range(3):
        x = importance_sequences(scores, 7, generator=a)[0]
        y = importance_sequences(scores, 7, generator=b)[0]
        assert torch.equal(x, y)
    assert int(a.counter) == 3
    c = CounterRNG(8, torch.tensor(2))  # resume at draw 2
    assert torch.equal(select_sequences(scores, 7, strategy="importance", generator=c),
                       importance_sequences(scores, 7, generator=_rng_at(8, 2))[0])


def _rng_at(seed: int, counter: int) -> CounterRNG:
    return CounterRNG(seed, torch.tensor(counter))


@pytest.mark.parametrize("strategy", ["sampled", "importance"])
def test_selection_compiles_to_one_graph(strategy):
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    rng = _rng(0)

    def step(scores):
        return select_sequences(scores, 5, strategy=strategy, generator=rng, temperature=0.5)

    compiled = torch.compile(step, backend=counter, fullgraph=True)
    eager_rng = _rng(0)
    for i in range(3):
        scores = torch.rand(16) + i
        got = compiled(scores)
        want = select_sequences(scores, 5, strategy=strategy, generator=eager_rng, temperature=0.5)
        assert set(got.tolist()) == set(want.tolist())
    assert counter.frame_count == 1, counter.frame_count


@pytest.mark.parametrize("selection", ["sampled", "importance"])
def test_compiled_cggr_loss_has_one_graph_and_equals_eager(selection):
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter

    from cggr import CGGRLoss

    torch._dynamo.reset()
    crit = CGGRLoss(selection=selection, scoring="loss", min_tokens_ratio=0.3, warmup_steps=0,
                    dynamic_threshold=False, seed=2)
    counter = CompileCounter()
    compiled = torch.compile(crit, backend=counter, fullgraph=True)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        logits = torch.randn(2, 16, 40, generator=g, requires_grad=True)
        targets = torch.randint(0, 40, (2, 16), generator=g)
        targets[0, :5] = -100
        draw = crit.rng_counter.clone()
        loss = compiled(logits, targets)
        crit.rng_counter.copy_(draw)  # the eager call from the same random draw
        want = crit(logits, targets)
        torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    assert counter.frame_count == 1, counter.frame_count


def test_scorer_refuses_importance():
    from cggr import CGGRScorer

    with pytest.raises(ValueError, match="selection='importance' needs its 1 / pi weights"):
        CGGRScorer(lambda ids, **kw: torch.zeros(*ids.shape, 5), selection="importance")
    scorer = CGGRScorer(lambda ids, **kw: torch.randn(*ids.shape, 5, generator=torch.Generator().manual_seed(0)),
                        selection="sampled", warmup_steps=0, dynamic_threshold=False, min_tokens_ratio=0.5, seed=0)
    _, mask, _ = scorer(torch.zeros(2, 6, dtype=torch.long))
    assert int(mask.sum()) == 6
