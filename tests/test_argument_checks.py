"""Bad arguments are refused at the door: a TypeError / ValueError that names the argument, the value received
and what was expected, never an AttributeError or a torch error from deep inside.

Other devices are simulated with ``meta`` tensors (no GPU needed): a device check compares devices only.
"""

from __future__ import annotations

import pytest
import torch

from cggr import CGGRLoss, CGGRModel, CGGRScorer
from cggr.functional import token_scores
from cggr.scoring import token_scores_torch as torch_token_scores
from cggr.selection import select_tokens

transformers = pytest.importorskip("transformers")

from tests.test_router import V, build_model  # noqa: E402


def _lt(b=2, t=6, v=11):
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    return torch.randn(b, t, v, generator=g), torch.randint(0, v, (b, t), generator=g)


def test_logits_that_are_not_a_tensor():
    _, targets = _lt()
    for call in (CGGRLoss(), CGGRLoss().select, token_scores, torch_token_scores):
        with pytest.raises(TypeError, match=r"logits must be a torch\.Tensor, got list"):
            call([[0.5, 0.1]] * 12, targets)


def test_loss_without_targets():
    logits, _ = _lt()
    for call in (CGGRLoss(), CGGRLoss().select):
        with pytest.raises(TypeError, match=r"targets must be a torch\.Tensor of class indices .*, got None"):
            call(logits, None)
    with pytest.raises(TypeError, match="targets must be an integer tensor of class indices, got NoneType"):
        CGGRLoss().forward_hidden(torch.randn(4, 8), torch.randn(10, 8), None)


def test_ignore_index_that_is_not_an_int():
    logits, targets = _lt()
    for call in (token_scores, torch_token_scores):
        with pytest.raises(TypeError, match="ignore_index must be an int, got 'x'"):
            call(logits, targets, ignore_index="x")
        with pytest.raises(TypeError, match=r"ignore_index must be an int, got 1\.5"):
            call(logits, targets, ignore_index=1.5)
    for cls in (CGGRLoss, lambda **kw: CGGRScorer(lambda ids, **_: None, **kw)):
        with pytest.raises(TypeError, match="ignore_index must be an int, got 'x'"):
            cls(ignore_index="x")


def test_select_tokens_valid_and_devices():
    d = torch.randn(2, 5)
    with pytest.raises(TypeError, match=r"valid must be None or a bool tensor of shape \(2, 5\), got list"):
        select_tokens(d, [[True] * 5] * 2, 0.5)
    with pytest.raises(ValueError, match="valid is on meta but difficulty is on cpu"):
        select_tokens(d, torch.ones(2, 5, dtype=torch.bool, device="meta"), 0.5)
    with pytest.raises(TypeError, match=r"difficulty must be a 1-D .* tensor, got list"):
        select_tokens([0.1, 0.2], None, 0.5)


def test_scorer_inputs():
    model = build_model("llama")
    scorer = CGGRScorer(model, warmup_steps=0)
    ids = torch.randint(0, V, (2, 7))
    with pytest.raises(TypeError, match=r"input_ids must be an integer tensor of token ids, got dtype torch\.float32"):
        scorer(ids.float())
    with pytest.raises(ValueError, match="targets are on meta but input_ids are on cpu"):
        scorer(ids, targets=torch.zeros(2, 7, dtype=torch.long, device="meta"))
    with pytest.raises(ValueError, match="attention_mask is on meta but input_ids are on cpu"):
        scorer(ids, attention_mask=torch.ones(2, 7, dtype=torch.long, device="meta"))


def test_model_names_labels_and_mask_on_another_device():
    model = build_model("llama")
    cm = CGGRModel(model, warmup_steps=0, min_tokens_ratio=0.5)
    ids = torch.randint(0, V, (2, 7))
    with pytest.raises(ValueError, match="labels are on meta but input_ids are on cpu"):
        cm(ids, labels=torch.zeros(2, 7, dtype=torch.long, device="meta"))
    with pytest.raises(ValueError, match="attention_mask is on meta but input_ids are on cpu"):
        cm(ids, labels=ids, attention_mask=torch.ones(2, 7, dtype=torch.long, device="meta"))
