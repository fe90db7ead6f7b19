"""The selection study's stale-score rules (benchmarks/_study_rules.py, benchmarks/study_selection.py): the per-block
table of training losses, each rule's choice against a brute-force reference, uniform tie-breaking among the
never-trained blocks, and that a stale run chooses without any scan.

Shape legend: P blocks in the pool, S candidates per step, k trained per step, T tokens per block.
"""

from __future__ import annotations

import itertools
import math
import sys
import types
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import _study_rules as rules

STALE = ("unseen-first", "stale-hardest", "stale-reducible-norm", "stale-sampled-t1")
# Each distribution check below fails a correct implementation with probability 1e-4 (for a random seed; the seeds
# are fixed, so the test is deterministic).
FALSE_ALARM = 1e-4


def chi_square_p(counts: list[int], probs: list[float]) -> float:
    """Upper-tail p-value of Pearson's chi-square statistic of ``counts`` against ``probs`` (df = cells - 1)."""
    n = sum(counts)
    stat = sum((c - n * p) ** 2 / (n * p) for c, p in zip(counts, probs))
    df = len(counts) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def case(seed: int, s: int, n_unseen: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(S,) stale losses with ``n_unseen`` +inf at random positions and distinct finite values elsewhere, (S,)
    reference losses."""
    g = torch.Generator().manual_seed(seed)
    stale = 4 + 3 * torch.rand(s, generator=g)
    stale[torch.randperm(s, generator=g)[:n_unseen]] = math.inf
    return stale, 3 + 2 * torch.rand(s, generator=g)


def brute_seen_order(rule: str, stale: torch.Tensor, ref: torch.Tensor) -> list[int]:
    """Seen candidates (finite stale loss) ranked best first by the rule's score, in Python floats (fp64)."""
    seen = [i for i in range(len(stale)) if math.isfinite(float(stale[i]))]
    if rule == "stale-hardest":
        return sorted(seen, key=lambda i: -float(stale[i]))
    assert rule == "stale-reducible-norm"

    def z(values: list[float]) -> list[float]:
        mean = sum(values) / len(values)
        sd = max(math.sqrt(sum((v - mean) ** 2 for v in values) / len(values)), 1e-6)
        return [(v - mean) / sd for v in values]

    score = [a - b for a, b in zip(z([float(stale[i]) for i in seen]), z([float(ref[i]) for i in seen]))]
    return [seen[j] for j in sorted(range(len(seen)), key=lambda j: -score[j])]


# ------------------------------------------------------------------------------------------------ the table
def test_update_stale_matches_a_loop_over_steps():
    g = torch.Generator().manual_seed(3)
    p, s, k = 37, 11, 4
    table = torch.full((p,), math.inf)
    expected = [math.inf] * p
    for _ in range(9):
        idx = torch.randperm(p, generator=g)[:s]  # (S,) pool indices of the candidates
        rows = torch.randperm(s, generator=g)[:k]  # (k,) trained rows of the S
        per_seq = torch.rand(k, generator=g) * 5
        rules.update_stale(table, idx, rows, per_seq)
        for j, r in enumerate(rows.tolist()):
            expected[int(idx[r])] = float(per_seq[j])
        assert table.tolist() == expected  # the k trained blocks written at their pool index, the rest untouched
    assert torch.isinf(table).any() and not torch.isinf(table).all()


def test_train_step_returns_the_training_forwards_per_sequence_losses():
    """The stale loss is the block's loss in the training forward (before the update), with no extra forward."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=53, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    ids = torch.randint(0, 53, (5, 9))
    before = [model.state_dict()[k].clone() for k in ("lm_head.weight",)]
    model.eval()
    with torch.no_grad():  # independent reference: fp64 log-softmax of the pre-update logits
        logp = model(input_ids=ids).logits[:, :-1].double().log_softmax(-1)
    want = torch.stack([-sum(logp[b, t, ids[b, t + 1]] for t in range(8)) / 8 for b in range(5)])
    model.train()
    opt = rules.make_optimizer(model, 1e-2)
    loss, per_seq = rules.train_step(model, opt, ids, 1e-2)
    assert not per_seq.requires_grad and per_seq.shape == (5,)
    torch.testing.assert_close(per_seq.double(), want, rtol=1e-5, atol=1e-5)
    assert loss == pytest.approx(float(per_seq.mean()), rel=1e-6)
    assert not torch.equal(before[0], model.state_dict()["lm_head.weight"])  # the step did update


# ------------------------------------------------------------------------------------------------ the rules
@pytest.mark.parametrize("rule", ["stale-hardest", "stale-reducible-norm"])
@pytest.mark.parametrize("s,k,n_unseen", [(7, 3, 0), (13, 5, 2), (32, 8, 5), (32, 8, 8), (32, 8, 20), (9, 9, 4),
                                          (5, 1, 1), (6, 2, 4)])
def test_ranked_stale_rules_match_brute_force(rule, s, k, n_unseen):
    for seed in range(4):
        stale, ref = case(seed * 31 + s, s, n_unseen)
        got = rules.choose_stale(rule, k, stale, ref, torch.Generator().manual_seed(seed))
        assert len(got) == k and len(set(got.tolist())) == k
        unseen = {i for i in range(s) if math.isinf(float(stale[i]))}
        if n_unseen >= k:
            assert set(got.tolist()) <= unseen
        else:
            want = unseen | set(brute_seen_order(rule, stale, ref)[: k - n_unseen])
            assert set(got.tolist()) == want


@pytest.mark.parametrize("s,k,n_unseen", [(7, 3, 0), (13, 5, 2), (32, 8, 20), (6, 2, 4)])
def test_unseen_first_takes_every_unseen_then_seen(s, k, n_unseen):
    for seed in range(4):
        stale, ref = case(seed, s, n_unseen)
        got = set(rules.choose_stale("unseen-first", k, stale, ref, torch.Generator().manual_seed(seed)).tolist())
        unseen = {i for i in range(s) if math.isinf(float(stale[i]))}
        assert len(got) == k
        assert got <= unseen if n_unseen >= k else unseen <= got


def test_stale_sampled_tends_to_topk_at_low_temperature_and_keeps_unseen_first():
    for seed in range(6):
        stale, ref = case(seed, 16, 3)
        top = rules.choose_stale("stale-reducible-norm", 6, stale, ref, torch.Generator().manual_seed(seed))
        cold = rules.choose_stale("stale-sampled-t1e-6", 6, stale, ref, torch.Generator().manual_seed(seed))
        assert set(cold.tolist()) == set(top.tolist())


def test_stale_sampled_draws_the_seen_pick_with_softmax_probabilities():
    """One seen slot (k = unseen + 1): P(seen i) = softmax(score / τ)_i with score = z(stale) − z(ref) over the seen."""
    stale = torch.tensor([5.0, math.inf, 4.2, 6.1, math.inf, 5.5])
    ref = torch.tensor([4.0, 3.0, 4.4, 4.1, 3.5, 5.0])
    seen = [0, 2, 3, 5]
    tau = 1.5

    def z(x):
        return (x - x.mean()) / x.std(unbiased=False)

    score = z(stale[seen].double()) - z(ref[seen].double())
    probs = (score / tau).softmax(0).tolist()
    g = torch.Generator().manual_seed(11)
    counts = Counter()
    for _ in range(6000):
        got = rules.choose_stale(f"stale-sampled-t{tau}", 3, stale, ref, g).tolist()
        assert {1, 4} <= set(got)
        counts[next(i for i in got if i in seen)] += 1
    assert chi_square_p([counts[i] for i in seen], probs) > FALSE_ALARM


@pytest.mark.parametrize("rule", STALE)
def test_ties_among_unseen_are_uniform_not_positional(rule):
    """5 unseen among 8 (at scattered positions), k = 2: each of the C(5, 2) = 10 pairs equally likely."""
    stale = torch.tensor([4.0, math.inf, 6.0, math.inf, math.inf, 5.0, math.inf, math.inf])
    ref = torch.tensor([4.5, 3.0, 5.5, 3.2, 3.4, 5.1, 3.6, 3.8])
    unseen = [1, 3, 4, 6, 7]
    pairs = list(itertools.combinations(unseen, 2))
    g = torch.Generator().manual_seed(2024)
    counts = Counter(tuple(sorted(rules.choose_stale(rule, 2, stale, ref, g).tolist())) for _ in range(5000))
    assert set(counts) == set(pairs)
    assert chi_square_p([counts[p] for p in pairs], [1 / len(pairs)] * len(pairs)) > FALSE_ALARM


def test_unseen_first_is_uniform_among_the_seen_after_the_unseen():
    stale = torch.tensor([4.0, math.inf, 6.0, 5.0, 7.0])  # 1 unseen, k = 2: the second pick uniform over 4 seen
    g = torch.Generator().manual_seed(5)
    counts = Counter()
    for _ in range(4000):
        got = rules.choose_stale("unseen-first", 2, stale, torch.zeros(5), g).tolist()
        assert 1 in got
        counts[next(i for i in got if i != 1)] += 1
    assert chi_square_p([counts[i] for i in (0, 2, 3, 4)], [0.25] * 4) > FALSE_ALARM


@pytest.mark.parametrize("rule", STALE)
def test_all_unseen_chooses_exactly_as_random(rule):
    """In a seen-once stream every stale loss is +inf: the same generator gives `random`'s very picks."""
    for seed in range(5):
        stale, ref = torch.full((32,), math.inf), torch.rand(32)
        mine = rules.choose_stale(rule, 8, stale, ref, torch.Generator().manual_seed(seed))
        theirs, _ = rules.choose("random", 8, None, None, ref, torch.Generator().manual_seed(seed))
        assert mine.tolist() == theirs.tolist()


@pytest.mark.parametrize("rule", STALE)
def test_stale_rules_need_no_scan_and_are_not_scan_rules(rule):
    assert rules.is_stale(rule) and not rules.needs_scan(rule)
    with pytest.raises(ValueError, match="choose_stale"):
        rules.choose(rule, 2, torch.rand(4), None, torch.rand(4), torch.Generator())
    assert rules.needs_scan("reducible-norm") and not rules.is_stale("sampled-t1")
    with pytest.raises(ValueError, match="unknown stale rule"):
        rules.choose_stale("stale-nonsense", 2, torch.rand(4), torch.rand(4), torch.Generator())


# ------------------------------------------------------------------------------------------------ a whole run
@pytest.mark.parametrize("rule", ["stale-reducible-norm", "unseen-first"])
def test_run_rule_feeds_the_table_by_pool_index_and_never_scans(rule, monkeypatch):
    """A short run of the study itself: no scan at train time, and the stale losses each step chooses from are those
    the training forwards of earlier steps produced for the same pool blocks (rebuilt from the seeded stream)."""
    transformers = pytest.importorskip("transformers")
    import study_selection as study
    from cggr.cli.data import BatchStream

    cfg = transformers.LlamaConfig(vocab_size=61, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1)
    p, s, k, steps, seed = 12, 6, 2, 9, 3
    pool = torch.randint(0, 61, (p, 10), generator=torch.Generator().manual_seed(0))
    setup = study.Setup(
        data=types.SimpleNamespace(tokenizer=types.SimpleNamespace(vocab_size=61)),
        spec=types.SimpleNamespace(kind="config", config=cfg), pool=pool,
        pool_category=np.zeros(p, dtype=int), ref_loss=torch.rand(p) + 3, ref_decile=np.arange(p) % 10,
        eval_ids=pool[:2], eval_category=np.zeros(2, dtype=int), init_state=None, info={})
    args = types.SimpleNamespace(lr=1e-2, steps=steps, scan=s, kept=k, impl="library")

    def no_scan(*a, **kw):
        raise AssertionError("a stale rule ran a scan")

    seen_by_choice, written = [], []
    real_choose, real_update = study.choose_stale, study.update_stale

    def record_choice(rule_, k_, stale, ref, g):
        seen_by_choice.append(stale.clone())
        return real_choose(rule_, k_, stale, ref, g)

    def record_update(table, idx, rows, per_seq):
        written.append((idx[rows].clone(), per_seq.clone()))
        real_update(table, idx, rows, per_seq)

    monkeypatch.setattr(study, "scan", no_scan)
    monkeypatch.setattr(study, "choose_stale", record_choice)
    monkeypatch.setattr(study, "update_stale", record_update)
    run = study.run_rule(rule, setup, args, seed, eval_steps=[], initial={"all": 0.0})
    assert run["train_time_scans"] == 0 and run["impl"] == "study prototype"
    assert len(seen_by_choice) == len(written) == steps

    stream, table = BatchStream(p, seed), [math.inf] * p
    for step in range(steps):
        idx = stream.take(s).tolist()
        assert seen_by_choice[step].tolist() == [table[i] for i in idx]
        blocks, losses = written[step]
        assert set(blocks.tolist()) <= set(idx) and len(blocks) == k
        for b, v in zip(blocks.tolist(), losses.tolist()):
            table[b] = v
    assert any(math.isfinite(v) for v in seen_by_choice[-1].tolist())  # later steps did see trained blocks
    assert run["pool_trained_share"] == pytest.approx(sum(math.isfinite(v) for v in table) / p)
