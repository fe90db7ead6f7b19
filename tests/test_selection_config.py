"""cggr.SelectionConfig: one checked object behind the selection settings of CGGRLoss, CGGRScorer and CGGRModel.

Keyword arguments and ``selection_config=`` build the same module (bit for bit); every field is checked in one place
with the message the modules' keyword arguments give; a module refuses what it does not read; assigning an
attribute re-checks; ``CGGRModel.score_sequences`` validates ``labels`` as ``forward`` does.
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

from cggr import CGGRLoss, CGGRScorer, SelectionConfig
from cggr.config import MODEL_SCORING_MODES, resolve_selection_config
from tests.reference import brute_difficulty, k_of

transformers = pytest.importorskip("transformers")

from cggr import CGGRModel  # noqa: E402
from tests.test_router import V, build_model  # noqa: E402

FIELDS = [f.name for f in dataclasses.fields(SelectionConfig)]


def _logits_targets(seed: int, b: int = 3, t: int = 11, v: int = 13):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=g, dtype=torch.float64) * 2
    targets = torch.randint(0, v, (b, t), generator=g)
    targets[0, :3] = -100
    targets[2, 7:] = -100
    return logits, targets


def _batch(seed: int, b: int = 6, t: int = 10):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (b, t), generator=g)
    labels = ids.clone()
    labels[1, :4] = -100
    mask = torch.ones_like(ids)
    mask[4, 6:] = 0
    return ids, labels, mask


@pytest.mark.parametrize("cls", [CGGRLoss, CGGRScorer, CGGRModel])
def test_every_constructor_default_is_the_config_default(cls):
    """What ``selection_config=`` relies on: a keyword left alone equals the config's default, type included."""
    params = inspect.signature(cls).parameters
    shared = [name for name in FIELDS if name in params]
    assert len(shared) >= 10, shared
    for name in shared:
        default = params[name].default
        want = SelectionConfig.__dataclass_fields__[name].default
        assert type(default) is type(want) and default == want, (cls.__name__, name, default, want)
    assert params["selection_config"].default is None


@pytest.mark.parametrize("kw", [
    dict(selection="topk", scoring="entropy"),
    dict(selection="stratified", num_strata=3, min_tokens_ratio=0.4),
    dict(selection="sequence_aware", min_tokens_per_sequence=2, dynamic_threshold=False),
    dict(selection="random", warmup_steps=0, min_tokens_ratio=0.3),
    dict(selection="sampled", temperature=0.7, threshold_sensitivity=0.2),
    dict(selection="importance", uniform_mix=0.3, scoring="loss"),
])
def test_loss_from_keywords_equals_loss_from_config(kw):
    logits, targets = _logits_targets(1)
    out = []
    for build in ("keywords", "config"):
        args = dict(kw, seed=5)
        crit = CGGRLoss(**args) if build == "keywords" else CGGRLoss(selection_config=SelectionConfig(**args))
        z = logits.clone().requires_grad_()
        loss = crit(z, targets)
        loss.backward()
        out.append((loss.detach(), z.grad, crit.select(logits, targets)[0]))
        assert crit.selection_config == SelectionConfig(**args)
    (l1, g1, m1), (l2, g2, m2) = out
    assert torch.equal(l1, l2) and torch.equal(g1, g2) and torch.equal(m1, m2)


def test_model_and_scorer_from_keywords_equal_config():
    ids, labels, mask = _batch(3)
    kw = dict(min_tokens_ratio=0.5, warmup_steps=0, selection="sampled", temperature=0.5, token_ratio=0.6, seed=2)
    losses, picked = [], []
    for build in ("keywords", "config"):
        model = build_model("llama")
        cm = (CGGRModel(model, num_router_layers=2, **kw) if build == "keywords"
              else CGGRModel(model, num_router_layers=2, selection_config=SelectionConfig(**kw)))
        loss = cm(ids, labels=labels, attention_mask=mask).loss
        loss.backward()
        losses.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
        picked.append(cm.get_metrics()["selected_indices"])
    assert picked[0] == picked[1]
    assert torch.equal(losses[0][0], losses[1][0])
    assert all(torch.equal(a, b) for a, b in zip(losses[0][1], losses[1][1], strict=True))

    logits, targets = _logits_targets(2)
    skw = dict(min_tokens_ratio=0.3, warmup_steps=0, selection="stratified", num_strata=2, seed=9)
    masks = [CGGRScorer(lambda ids, **_: logits, **skw)(targets.clamp(min=0), targets)[1],
             CGGRScorer(lambda ids, **_: logits, selection_config=SelectionConfig(**skw))(targets.clamp(min=0),
                                                                                        targets)[1]]
    assert torch.equal(masks[0], masks[1])


# field, bad value, exception, message (the one each module's keyword argument has always given)
BAD = [
    ("min_tokens_ratio", 0.0, ValueError, r"min_tokens_ratio must be in \(0, 1\], got 0\.0"),
    ("min_tokens_ratio", "half", TypeError, r"min_tokens_ratio must be a float in \(0, 1\], got str 'half'"),
    ("warmup_steps", -1, ValueError, r"warmup_steps must be >= 0, got -1"),
    ("warmup_steps", 10.0, TypeError, r"warmup_steps must be an int >= 0, got float 10\.0"),
    ("token_ratio", 1.5, ValueError, r"token_ratio must be in \(0, 1\], got 1\.5"),
    ("num_strata", 0, ValueError, r"num_strata must be >= 1, got 0"),
    ("min_tokens_per_sequence", 1.0, TypeError, r"min_tokens_per_sequence must be an int >= 1, got float 1\.0"),
    ("dynamic_threshold", 1, TypeError, r"dynamic_threshold must be a bool, got 1"),
    ("threshold_sensitivity", 2.0, ValueError, r"threshold_sensitivity must be in \[0, 1\], got 2\.0"),
    ("temperature", 0.0, ValueError, r"temperature must be > 0 .*got 0\.0"),
    ("temperature", float("inf"), ValueError, r"temperature must be a finite number, got inf"),
    ("uniform_mix", 0.0, ValueError, r"uniform_mix must be in \(0, 1\] .*got 0\.0"),
    ("reference_norm", "l2", ValueError, r"reference_norm must be one of 'none', 'zscore', 'rank', got 'l2'"),
    ("ignore_index", "x", TypeError, r"ignore_index must be an int, got 'x'"),
    ("seed", -1, ValueError, r"seed must be >= 0, got -1"),
]


@pytest.mark.parametrize("field, bad, exc, msg", BAD)
def test_each_field_is_checked_once_with_the_same_message_everywhere(field, bad, exc, msg):
    with pytest.raises(exc, match=msg):
        SelectionConfig(**{field: bad})
    with pytest.raises(exc, match=msg):  # a checked variant of a good config
        dataclasses.replace(SelectionConfig(), **{field: bad})
    makers = {CGGRLoss: lambda **kw: CGGRLoss(**kw),
              CGGRScorer: lambda **kw: CGGRScorer(lambda ids, **_: None, **kw),
              CGGRModel: lambda **kw: CGGRModel(build_model("llama", num_layers=2), num_router_layers=1, **kw)}
    checked = [cls for cls in makers if field in inspect.signature(cls).parameters]
    assert checked, field
    for cls in checked:
        with pytest.raises(exc, match=msg):
            makers[cls](**{field: bad})


def test_scoring_modes_and_rules_are_the_modules_own():
    model = build_model("llama")
    with pytest.raises(ValueError, match=r"scoring must be one of 'entropy', 'margin', 'loss', 'combined', "
                                         r"'reducible', got 'excess'"):
        CGGRModel(model, scoring="excess")
    with pytest.raises(ValueError, match=r"scoring must be one of .*'reducible', got 'excess'"):
        CGGRModel(model, selection_config=SelectionConfig(scoring="excess"))
    with pytest.raises(ValueError, match=r"scoring must be one of 'entropy', 'margin', 'loss', 'combined', "
                                         r"'excess', got 'reducible'"):
        CGGRLoss(selection_config=SelectionConfig(scoring="reducible"))
    with pytest.raises(ValueError, match=r"selection must be one of 'topk', 'random', 'sampled', 'importance', "
                                         r"got 'stratified'"):
        CGGRModel(model, selection="stratified")
    with pytest.raises(ValueError, match=r"scoring must be one of 'entropy', 'margin', 'loss', 'combined', got "
                                         r"'excess'"):
        CGGRScorer(lambda ids, **_: None, selection_config=SelectionConfig(scoring="excess"))
    for make in (lambda: CGGRScorer(lambda ids, **_: None, selection="importance"),
                 lambda: CGGRScorer(lambda ids, **_: None, selection_config=SelectionConfig(selection="importance"))):
        with pytest.raises(ValueError, match="selection='importance' needs its 1 / pi weights"):
            make()
    with pytest.raises(ValueError, match=r"token_ratio=0\.5 cannot be combined with selection='importance'"):
        SelectionConfig(selection="importance", token_ratio=0.5)
    assert MODEL_SCORING_MODES[-1] == "reducible"


def test_a_setting_the_module_does_not_read_is_refused():
    model = build_model("llama")
    with pytest.raises(ValueError, match=r"CGGRModel does not read selection_config's num_strata=8: leave it"):
        CGGRModel(model, selection_config=SelectionConfig(num_strata=8))
    with pytest.raises(ValueError, match=r"CGGRModel does not read selection_config's dynamic_threshold=False"):
        CGGRModel(model, selection_config=SelectionConfig(dynamic_threshold=False))
    with pytest.raises(ValueError, match=r"CGGRLoss does not read selection_config's token_ratio=0\.5"):
        CGGRLoss(selection_config=SelectionConfig(token_ratio=0.5))
    with pytest.raises(ValueError, match=r"CGGRScorer does not read selection_config's uniform_mix=0\.5, "
                                         r"reference_norm='rank'"):
        CGGRScorer(lambda ids, **_: None, selection_config=SelectionConfig(uniform_mix=0.5, reference_norm="rank"))
    # the defaults of unread fields are fine, whatever the spelling of the config
    CGGRModel(model, num_router_layers=1, selection_config=SelectionConfig(num_strata=4, scoring="reducible"))


def test_keywords_and_config_are_not_mixed():
    with pytest.raises(ValueError, match=r"CGGRLoss: pass the selection settings either as keyword arguments or as "
                                         r"selection_config=, not both \(got scoring='loss', seed=3 with"):
        CGGRLoss(scoring="loss", seed=3, selection_config=SelectionConfig())
    with pytest.raises(ValueError, match=r"not both \(got temperature=1 with"):  # 1 is not the default 1.0
        CGGRLoss(temperature=1, selection_config=SelectionConfig())
    with pytest.raises(TypeError, match=r"selection_config must be a cggr\.SelectionConfig or None, got dict"):
        CGGRLoss(selection_config={"selection": "topk"})
    # the same check, called directly: an owner's own keywords, a config, and both
    assert resolve_selection_config("CGGRModel", None, token_ratio=0.5) == SelectionConfig(token_ratio=0.5)
    assert resolve_selection_config("CGGRModel", SelectionConfig(token_ratio=0.5), token_ratio=None).token_ratio == 0.5
    with pytest.raises(ValueError, match=r"not both \(got token_ratio=0\.25 with"):
        resolve_selection_config("CGGRModel", SelectionConfig(token_ratio=0.5), token_ratio=0.25)


def test_values_are_normalised_and_the_config_is_frozen():
    cfg = SelectionConfig(min_tokens_ratio=1, threshold_sensitivity=1, temperature=2, uniform_mix=1)
    for name in ("min_tokens_ratio", "threshold_sensitivity", "temperature", "uniform_mix"):
        assert type(getattr(cfg, name)) is float
    assert cfg == SelectionConfig(min_tokens_ratio=1.0, threshold_sensitivity=1.0, temperature=2.0, uniform_mix=1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.selection = "random"
    assert CGGRLoss(min_tokens_ratio=1).min_tokens_ratio == 1.0


def test_assigning_an_attribute_rechecks_the_config():
    """Before the config, ``criterion.selection = 'bogus'`` was accepted silently (and failed at the next call)."""
    crit = CGGRLoss(seed=1, warmup_steps=0)
    with pytest.raises(ValueError, match=r"selection must be one of .*got 'bogus'"):
        crit.selection = "bogus"
    assert crit.selection == "topk" and crit.selection_config.selection == "topk"
    crit.selection = "random"
    assert crit.selection_config == SelectionConfig(selection="random", seed=1, warmup_steps=0)
    logits, targets = _logits_targets(4)
    fresh = CGGRLoss(selection="random", seed=1, warmup_steps=0)
    assert torch.equal(crit(logits, targets), fresh(logits, targets))  # the same stream, the same rule

    with pytest.raises(ValueError, match=r"threshold_sensitivity must be in \[0, 1\], got 3\.0"):
        crit.threshold_sensitivity = 3.0
    scorer = CGGRScorer(lambda ids, **_: None)
    with pytest.raises(ValueError, match="selection='importance' needs its 1 / pi weights"):
        scorer.selection = "importance"

    cm = CGGRModel(build_model("llama"), num_router_layers=1, selection="importance")
    with pytest.raises(ValueError, match=r"token_ratio=0\.5 cannot be combined with selection='importance'"):
        cm.token_ratio = 0.5
    cm.selection = "topk"
    cm.token_ratio = 0.5
    assert (cm.selection, cm.token_ratio) == ("topk", 0.5)
    glob = CGGRModel(build_model("llama"), num_router_layers=1, global_selection=True)
    with pytest.raises(ValueError, match="global_selection supports selection 'topk' and 'random', got 'sampled'"):
        glob.selection = "sampled"


def test_scorer_temperature_reaches_the_sampled_rule():
    """``CGGRScorer(temperature=)`` (new keyword): τ → 0 is top-k of the fp64 brute-force difficulty; the default
    τ = 1 draws differently on this batch."""
    logits, targets = _logits_targets(7, b=4, t=16, v=29)
    valid = targets != -100
    diff = brute_difficulty(logits, targets)
    k = k_of(0.4, int(valid.sum()))
    want = torch.zeros(valid.numel(), dtype=torch.bool)
    want[torch.argsort(torch.where(valid, diff, -torch.inf).reshape(-1), descending=True)[:k]] = True
    common = dict(min_tokens_ratio=0.4, warmup_steps=0, dynamic_threshold=False, selection="sampled", seed=3)
    cold = CGGRScorer(lambda ids, **_: logits, temperature=1e-6, **common)
    assert cold.temperature == 1e-6
    assert torch.equal(cold(targets.clamp(min=0), targets)[1].reshape(-1), want)
    warm = CGGRScorer(lambda ids, **_: logits, **common)
    assert not torch.equal(warm(targets.clamp(min=0), targets)[1].reshape(-1), want)


def test_score_sequences_checks_labels_as_forward_does():
    """Before, score_sequences skipped the device and range checks of forward: an out-of-range label failed later,
    named ``targets``."""
    cm = CGGRModel(build_model("llama"), num_router_layers=1, min_tokens_ratio=0.5, warmup_steps=0)
    ids, labels, mask = _batch(5)
    bad = labels.clone()
    bad[2, 3] = V + 5
    for call in (cm.score_sequences, lambda *a, **k: cm(*a, **k)):
        with pytest.raises(ValueError, match=rf"labels must be in \[0, {V}\) or equal ignore_index=-100, found "
                                             rf"{V + 5}"):
            call(ids, labels=bad, attention_mask=mask)
        with pytest.raises(ValueError, match="labels are on meta but input_ids are on cpu"):
            call(ids, labels=labels.to("meta"), attention_mask=mask)
        with pytest.raises(TypeError, match="labels must be an integer tensor of token ids"):
            call(ids, labels=labels.float(), attention_mask=mask)
    cm.train()
    cm(ids, labels=labels, attention_mask=mask)
    assert torch.equal(cm.score_sequences(ids, labels, mask), cm.last_sequence_scores())


def test_moved_names_are_still_importable_from_their_old_homes():
    import cggr
    import cggr.model
    import cggr.scorer
    from cggr.outputs import CGGROutput

    assert cggr.CGGRScorer is cggr.model.CGGRScorer is cggr.scorer.CGGRScorer
    assert cggr.model.CGGROutput is CGGROutput
    assert callable(cggr.model.is_masked_lm)
    assert cggr.SelectionConfig is SelectionConfig


def test_a_compiled_module_follows_an_assigned_setting():
    """The settings live in one frozen object that ``torch.compile`` guards on: assigning ``criterion.selection``
    recompiles rather than replaying the old rule (compared with fresh eager modules on the same stream)."""
    logits, targets = _logits_targets(8)
    crit = CGGRLoss(seed=2, warmup_steps=0, min_tokens_ratio=0.3)
    compiled = torch.compile(crit, backend="eager", fullgraph=True)
    assert torch.equal(compiled(logits, targets), CGGRLoss(seed=2, warmup_steps=0, min_tokens_ratio=0.3)(logits,
                                                                                                          targets))
    crit.selection = "random"
    want = CGGRLoss(seed=2, warmup_steps=0, min_tokens_ratio=0.3, selection="random")(logits, targets)
    got = compiled(logits, targets)
    assert torch.equal(got, want)
    assert not torch.equal(got, CGGRLoss(seed=2, warmup_steps=0, min_tokens_ratio=0.3)(logits, targets))
