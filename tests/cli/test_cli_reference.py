"""The race's reference model helpers (cggr.cli.reference_model): split, training, scoring, with a fake clock."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from cggr.cli.reference_model import build_reference, split_blocks, train_reference
from tests.tiny_models import tiny_llama

transformers = pytest.importorskip("transformers")


def _tiny(seed=0):
    return tiny_llama(37, seed=seed, max_position_embeddings=32)


def _fake_clock(step=0.5):
    ticks = itertools.count()
    return lambda: next(ticks) * step


def test_split_is_seeded_disjoint_and_complete():
    a, b = split_blocks(11, 0.3, seed=4)
    assert sorted(a.tolist() + b.tolist()) == list(range(11)) and len(a) == 3
    assert torch.equal(a, split_blocks(11, 0.3, seed=4)[0]) and not torch.equal(a, split_blocks(11, 0.3, seed=5)[0])
    assert len(split_blocks(2, 0.99, seed=0)[1]) == 1  # both sides keep a block
    with pytest.raises(ValueError, match="fraction must be in"):
        split_blocks(10, 1.0, seed=0)
    with pytest.raises(ValueError, match="num_blocks must be >= 2"):
        split_blocks(1, 0.5, seed=0)


def test_reference_training_lowers_its_loss_and_scores_only_the_other_blocks():
    g = torch.Generator().manual_seed(0)
    # a learnable corpus: every block counts up modulo the vocabulary from a random start
    starts = torch.randint(0, 37, (24, 1), generator=g)
    ids = (starts + torch.arange(12)) % 37
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[3, 8:] = False
    model = _tiny()
    clock = _fake_clock()
    before = compute_mean_loss(model, ids, mask)
    rows, losses, info = build_reference(model, ids, mask, fraction=0.5, steps=60, batch_size=8, lr=3e-3,
                                         device=torch.device("cpu"), seed=1, clock=clock)
    _, train_rows = split_blocks(24, 0.5, seed=1)
    assert torch.equal(rows, train_rows) and len(losses) == 12
    assert info["reference_blocks"] == 12 and info["train_blocks"] == 12 and info["steps"] == 60
    assert info["train_seconds"] == 0.5 and info["score_seconds"] == 0.5  # one tick per measured part
    assert info["total_seconds"] == 1.0
    after = compute_mean_loss(model, ids[train_rows], mask[train_rows])
    assert after < before - 1.0  # it learned the pattern (on blocks it never trained on)
    assert math.isclose(info["mean_reference_loss"], float(losses.sequence_loss.mean()), rel_tol=1e-6)
    assert torch.allclose(losses.sequence(torch.arange(12)),
                          per_block_loss(model, ids[train_rows], mask[train_rows]), atol=1e-5)


def test_train_reference_rejects_empty_runs():
    with pytest.raises(ValueError, match="steps and batch_size"):
        train_reference(_tiny(), torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 4, dtype=torch.bool), steps=0,
                        batch_size=1, lr=1e-3, device=torch.device("cpu"), seed=0)


@torch.no_grad()
def per_block_loss(model, ids, mask):
    model.eval()
    logits = model(input_ids=ids, attention_mask=mask.long()).logits[:, :-1].double()
    tgt = ids[:, 1:].masked_fill(~mask[:, 1:] | ~mask[:, :-1], -100)
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                            ignore_index=-100, reduction="none").view(tgt.shape)
    return ((nll.sum(1)) / (tgt != -100).sum(1)).float()


def compute_mean_loss(model, ids, mask):
    return float(per_block_loss(model, ids, mask).mean())


def test_max_blocks_scores_a_seeded_subset_of_the_other_blocks():
    ids = torch.randint(0, 37, (30, 8), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids, dtype=torch.bool)
    _, rest = split_blocks(30, 0.5, seed=2)
    rows, losses, info = build_reference(_tiny(), ids, mask, fraction=0.5, steps=1, batch_size=2, lr=1e-3,
                                         device=torch.device("cpu"), seed=2, max_blocks=6, score_bytes=1)
    assert len(rows) == 6 == len(losses) and set(rows.tolist()) <= set(rest.tolist())
    assert torch.equal(rows, rows.sort().values) and info["unused_blocks"] == 30 - 15 - 6
    again, _, _ = build_reference(_tiny(), ids, mask, fraction=0.5, steps=1, batch_size=2, lr=1e-3,
                                  device=torch.device("cpu"), seed=2, max_blocks=6)
    assert torch.equal(rows, again)
