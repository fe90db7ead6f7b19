"""cggr.scoring against an fp64 row-by-row reference."""

from __future__ import annotations

import math

import pytest
import torch

from cggr.scoring import TokenScores, difficulty, token_scores
from tests.reference import difficulty_fp64, scores_fp64

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _inputs(shape, vocab, dtype, *, ignore_share=0.2, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    logits = (torch.randn(*shape, vocab, generator=g) * 3).to(dtype)
    targets = torch.randint(0, vocab, shape, generator=g)
    targets[torch.rand(shape, generator=g) < ignore_share] = -100
    return logits, targets


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("shape", "vocab"),
    [((1,), 1), ((7,), 2), ((3, 5), 3), ((2, 9), 50), ((1,), 50257), ((2, 2), 50257), ((4, 3), 97)],
)
def test_scores_match_fp64(shape, vocab, dtype):
    logits, targets = _inputs(shape, vocab, dtype)
    got = token_scores(logits, targets, chunk_size=3)  # odd chunk: rows straddle chunk boundaries
    # The reference sees exactly the values the function saw (already rounded to bf16/fp16).
    ref = scores_fp64(logits, targets)
    for name in ("entropy", "confidence", "margin", "nll"):
        value = getattr(got, name)
        assert value.dtype == torch.float32 and value.shape == logits.shape[:-1]
        torch.testing.assert_close(value.double(), ref[name], rtol=2e-5, atol=2e-5, msg=name)
    assert torch.equal(got.valid, targets != -100)
    assert got.vocab_size == vocab


def test_without_targets_has_no_nll():
    logits, _ = _inputs((4, 6), 33, torch.float32)
    got = token_scores(logits)
    assert got.nll is None and got.valid is None
    ref = scores_fp64(logits, None)
    torch.testing.assert_close(got.entropy.double(), ref["entropy"], rtol=1e-5, atol=1e-5)


def test_duplicate_maximum_gives_zero_margin():
    logits = torch.tensor([[2.0, 5.0, 5.0, -1.0], [0.0, 0.0, 0.0, 0.0]])
    got = token_scores(logits)
    torch.testing.assert_close(got.margin, torch.zeros(2))
    torch.testing.assert_close(got.entropy[1], torch.tensor(math.log(4)))


def test_chunking_does_not_change_results():
    logits, targets = _inputs((37,), 129, torch.float32)
    a = token_scores(logits, targets, chunk_size=1)
    b = token_scores(logits, targets)
    for x, y in zip(a[:4], b[:4]):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", ["entropy", "margin", "loss", "combined"])
@pytest.mark.parametrize("with_targets", [True, False])
@pytest.mark.parametrize("vocab", [1, 2, 61])
def test_difficulty_matches_fp64(mode, with_targets, vocab):
    logits, targets = _inputs((3, 8), vocab, torch.float32)
    targets = targets if with_targets else None
    got = difficulty(token_scores(logits, targets), mode)
    ref = difficulty_fp64(scores_fp64(logits, targets), mode, vocab)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_minus_inf_logits_are_zero_probability_not_nan(dtype):
    """-inf logits (a masked vocabulary, a padded head) are legitimate: p = 0 adds 0 to the entropy (0 · log 0 = 0),
    so every score stays finite and equals the fp64 reference; the selection still ranks by difficulty."""
    logits, targets = _inputs((3, 6), 40, dtype, ignore_share=0.0)
    logits[:, :, 30:] = float("-inf")  # padded vocabulary
    logits[1, 2, :28] = float("-inf")  # only two tokens allowed here
    targets = targets.clamp(max=29)
    targets[1, 2] = 28
    got = token_scores(logits, targets, chunk_size=5)
    ref = scores_fp64(logits, targets)
    for name in ("entropy", "confidence", "margin", "nll"):
        assert torch.isfinite(getattr(got, name)).all(), name
        torch.testing.assert_close(getattr(got, name).double(), ref[name], rtol=1e-5, atol=1e-5)


def test_nan_logits_propagate_to_scores():
    logits, targets = _inputs((5,), 10, torch.float32)
    logits[2, 3] = float("nan")
    got = token_scores(logits, targets)
    assert torch.isnan(got.entropy[2]) and torch.isnan(difficulty(got, "combined")[2])
    assert torch.isfinite(got.entropy[[0, 1, 3, 4]]).all()


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda: token_scores(torch.randn(5)), ValueError, "logits must be 2-D or 3-D"),
        (lambda: token_scores(torch.randn(2, 3, 4, 5)), ValueError, r"got shape \(2, 3, 4, 5\)"),
        (lambda: token_scores(torch.randint(0, 3, (2, 3))), TypeError, "floating-point"),
        (lambda: token_scores(torch.randn(2, 3, 4), torch.zeros(2, 4, dtype=torch.long)), ValueError,
         r"targets shape \(2, 4\) does not match logits batch/seq shape \(2, 3\)"),
        (lambda: token_scores(torch.randn(4, 3), torch.zeros(4)), TypeError, "integer tensor"),
        (lambda: token_scores(torch.randn(4, 3), torch.tensor([0, 1, 3, 0])), ValueError, r"\[0, 3\).*found 3"),
        (lambda: token_scores(torch.randn(4, 3), torch.tensor([0, -1, 2, 0])), ValueError, "found -1"),
        (lambda: token_scores([[1.0]]), TypeError, "torch.Tensor"),
        (lambda: difficulty(token_scores(torch.randn(2, 3)), "hard"), ValueError, "mode must be one of"),
        (lambda: token_scores(torch.randn(2, 3), chunk_size=0), ValueError, "chunk_size must be >= 1"),
    ],
)
def test_bad_input_raises_naming_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_ignore_index_is_respected_and_configurable():
    logits, _ = _inputs((6,), 5, torch.float32)
    targets = torch.tensor([0, 7, 1, 7, 4, 2])
    got = token_scores(logits, targets, ignore_index=7)
    assert got.valid.tolist() == [True, False, True, False, True, True]
    assert got.nll[1] == 0 and got.nll[3] == 0


def test_token_scores_is_a_named_tuple_without_grad():
    logits = torch.randn(3, 4, requires_grad=True)
    got = token_scores(logits, torch.tensor([0, 1, 2]))
    assert isinstance(got, TokenScores)
    assert not got.entropy.requires_grad and not got.nll.requires_grad
