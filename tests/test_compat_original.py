"""Names users of the original ``cggr`` (0.5.x) rely on: metric keys, ``router.passthrough``, argument ranges.

Where the semantics differ on purpose, docs/compat.md says how; these tests pin what is kept.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from cggr import CGGRLoss, CGGRModel, CGGRScorer, create_truncated_router
from cggr.functional import LinearCrossEntropyOptions

transformers = pytest.importorskip("transformers")

from tests.test_router import V, build_model  # noqa: E402


@pytest.mark.parametrize("bad", [1.5, -0.1, 1.0000001, -1e-9])
def test_threshold_sensitivity_outside_its_range_is_a_value_error(bad):
    for make in (lambda s: CGGRLoss(threshold_sensitivity=s),
                 lambda s: CGGRScorer(lambda ids, **_: None, threshold_sensitivity=s),
                 lambda s: LinearCrossEntropyOptions(threshold_sensitivity=s)):
        with pytest.raises(ValueError, match=rf"threshold_sensitivity must be .*\[0, 1\].*got {bad!r}"):
            make(bad)


def test_threshold_sensitivity_range_ends_are_accepted():
    for s in (0, 0.0, 0.5, 1, 1.0):
        assert CGGRLoss(threshold_sensitivity=s).threshold_sensitivity == float(s)
        assert LinearCrossEntropyOptions(threshold_sensitivity=s).threshold_sensitivity == s


class _PlainLM(nn.Module):
    """A model with no layer list the router knows (blocks in an nn.Sequential): a passthrough router."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, 16)
        self.blocks = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16))
        self.head = nn.Linear(16, V)

    def forward(self, input_ids, attention_mask=None):
        return self.head(self.blocks(self.emb(input_ids)))


def test_passthrough_router_reports_passthrough_and_runs_the_whole_model():
    model = _PlainLM()
    ids = torch.randint(0, V, (3, 7))
    with pytest.warns(UserWarning, match="_PlainLM"):
        router = create_truncated_router(model, num_layers=1)
    assert router.passthrough is True and router.layers_used == -1
    with torch.no_grad():
        assert torch.equal(router(ids), model(ids))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cm = CGGRModel(model, min_tokens_ratio=0.5, warmup_steps=0)
    assert cm.router.passthrough is True
    truncated = create_truncated_router(build_model("llama"), num_layers=1)
    assert truncated.passthrough is False


@pytest.mark.parametrize("token_ratio", [None, 0.5])
def test_model_metrics_have_router_tokens_selected(token_ratio):
    model = build_model("llama").train()
    cm = CGGRModel(model, num_router_layers=2, min_tokens_ratio=0.5, warmup_steps=0, token_ratio=token_ratio)
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    ids = torch.randint(3, V, (6, 10), generator=g)
    labels = ids.clone()
    labels[2, :6] = -100
    mask = torch.ones_like(ids)
    mask[4, 5:] = 0
    cm(ids, labels=labels, attention_mask=mask)
    m = cm.get_metrics()
    # the valid (shifted, unpadded) targets of the sequences the router selected, counted independently
    targets = torch.nn.functional.pad(labels.masked_fill(mask == 0, -100)[:, 1:], (0, 1), value=-100)
    targets = targets.masked_fill(mask == 0, -100)
    expected = sum(int((targets[i] != -100).sum()) for i in m["selected_indices"])
    assert m["router_tokens_selected"] == expected
    if token_ratio is None:
        assert m["tokens_selected"] == expected
    else:
        assert m["tokens_selected"] < expected
