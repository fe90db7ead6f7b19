"""``step_count`` is the truth: in-place writes to the buffer (``fill_``, ``copy_``, ``zero_``, ``add_``, what the
original project's users and in-place checkpoint loaders do) set the curriculum, for every module and path.

Each check compares the number of kept tokens / sequences with K = max(1, round-half-up(ratio(step) · n)) from the
schedule formula evaluated here (tests/reference.py's ``k_of``) at the step written into the buffer.
"""

from __future__ import annotations

import pytest
import torch

from cggr import CGGRLoss, CGGRModel, CGGRScorer
from tests.reference import k_of

WARMUP, MIN_RATIO = 1000, 0.25


def _ratio(step: int) -> float:
    return 1.0 - min(1.0, step / WARMUP) * (1.0 - MIN_RATIO)


def _inputs(seed, shape=(3, 40), vocab=29):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(*shape, vocab, generator=g)
    targets = torch.randint(0, vocab, shape, generator=g)
    targets[0, :5] = -100
    return logits, targets


WRITES = [
    ("fill_", lambda b: b.fill_(500), 500),
    ("copy_", lambda b: b.copy_(torch.tensor(750)), 750),
    ("add_", lambda b: b.add_(900), 900),
    ("zero_ after steps", lambda b: b.zero_(), 0),
    ("detach().fill_", lambda b: b.detach().fill_(250), 250),
]


@pytest.mark.parametrize(("name", "write", "step"), WRITES, ids=[w[0] for w in WRITES])
@pytest.mark.parametrize("selection", ["topk", "stratified", "random"])
def test_loss_follows_in_place_writes(name, write, step, selection):
    logits, targets = _inputs(1)
    n_valid = int((targets != -100).sum())
    crit = CGGRLoss(selection=selection, dynamic_threshold=False, min_tokens_ratio=MIN_RATIO, warmup_steps=WARMUP)
    if name.startswith("zero_"):
        for _ in range(3):
            crit.step()
    write(crit.step_count)
    mask, _ = crit.select(logits, targets)
    assert int(mask.sum()) == k_of(_ratio(step), n_valid)
    m = crit.get_metrics()
    assert m["step"] == step and m["scheduled_ratio"] == pytest.approx(_ratio(step))
    assert crit.current_ratio == pytest.approx(_ratio(step))
    crit.step()  # counts on from the written value
    assert int(crit.step_count) == step + 1 and crit.get_metrics()["step"] == step + 1
    crit.select(logits, targets)
    assert crit.get_metrics()["tokens_selected"] == k_of(_ratio(step + 1), n_valid)


def test_loss_dynamic_threshold_and_forward_hidden_follow_the_buffer():
    logits, targets = _inputs(2)
    a = CGGRLoss(min_tokens_ratio=MIN_RATIO, warmup_steps=WARMUP)
    b = CGGRLoss(min_tokens_ratio=MIN_RATIO, warmup_steps=WARMUP)
    for _ in range(600):  # b reaches step 600 by step(); a by one write
        b.step()
    a.step_count.fill_(600)
    assert torch.equal(a.select(logits, targets)[0], b.select(logits, targets)[0])
    assert a.get_metrics() == b.get_metrics()
    g = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(3, 40, 8, generator=g), torch.randn(29, 8, generator=g)
    a.forward_hidden(hidden, weight, targets)
    b.forward_hidden(hidden, weight, targets)
    assert a.get_metrics() == b.get_metrics()
    n_valid = int((targets != -100).sum())
    assert a.get_metrics()["tokens_selected"] > k_of(_ratio(600), n_valid) - 1  # dynamic: at least the schedule's


def test_scorer_follows_in_place_writes():
    logits, _ = _inputs(4)
    sc = CGGRScorer(lambda ids, **kw: logits, min_tokens_ratio=MIN_RATIO, warmup_steps=WARMUP,
                    dynamic_threshold=False)
    ids = torch.zeros(logits.shape[:2], dtype=torch.long)
    sc.step_count.fill_(800)
    _, mask, info = sc(ids)
    assert int(mask.sum()) == k_of(_ratio(800), mask.numel())
    assert float(info["current_ratio"]) == pytest.approx(_ratio(800))


def test_model_follows_in_place_writes():
    pytest.importorskip("transformers")
    from tests.test_router import V, build_model

    model = build_model("llama").train()
    cm = CGGRModel(model, num_router_layers=2, min_tokens_ratio=MIN_RATIO, warmup_steps=WARMUP)
    ids = torch.randint(3, V, (8, 10), generator=torch.Generator().manual_seed(5))
    for step, k in ((0, 8), (500, 5), (1000, 2)):  # k = round-half-up(ratio(step) · 8)
        cm.step_count.fill_(step)
        cm(ids, labels=ids)
        m = cm.get_metrics()
        assert m["sequences_selected"] == k and m["step"] == step and cm.num_selected_sequences(8) == k
    cm.step()
    assert cm.get_metrics()["step"] == 1001


def test_load_state_dict_and_steps_still_resume():
    logits, targets = _inputs(6)
    a = CGGRLoss(dynamic_threshold=False, min_tokens_ratio=MIN_RATIO, warmup_steps=WARMUP)
    for _ in range(321):
        a.step()
    b = CGGRLoss(dynamic_threshold=False, min_tokens_ratio=MIN_RATIO, warmup_steps=WARMUP)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.select(logits, targets)[0], b.select(logits, targets)[0])
    assert b.get_metrics()["step"] == 321 and b.current_ratio == pytest.approx(_ratio(321))


def test_compiled_loss_follows_the_buffer_through_warm_up_without_recompiling():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    crit = CGGRLoss(min_tokens_ratio=MIN_RATIO, warmup_steps=10, seed=2)  # dynamic threshold on
    eager = CGGRLoss(min_tokens_ratio=MIN_RATIO, warmup_steps=10, seed=2)
    counter = CompileCounter()
    compiled = torch.compile(crit, backend=counter, fullgraph=True)
    for step in range(6):
        logits, targets = _inputs(10 + step)
        if step == 3:
            crit.step_count.fill_(8)  # a jump mid-run
            eager.step_count.fill_(8)
        compiled(logits, targets)
        eager(logits, targets)
        assert crit.get_metrics() == eager.get_metrics(), step
        crit.step()
        eager.step()
    assert counter.frame_count == 1


def test_compiled_model_follows_a_write_from_the_next_step_on():
    pytest.importorskip("transformers")
    from tests.test_router import V, build_model

    torch._dynamo.reset()
    model = build_model("llama").train()
    cm = CGGRModel(model, num_router_layers=2, min_tokens_ratio=MIN_RATIO, warmup_steps=WARMUP)
    compiled = torch.compile(cm, backend="aot_eager")
    ids = torch.randint(3, V, (8, 10), generator=torch.Generator().manual_seed(7))
    compiled(ids, labels=ids)
    assert cm.get_metrics()["sequences_selected"] == 8
    cm.step_count.fill_(999)  # a compiled forward uses the host mirror: step() reads the write
    cm.step()
    compiled(ids, labels=ids)
    m = cm.get_metrics()
    assert m["step"] == 1000 and m["sequences_selected"] == 2


def _host_reads_of_step_count(module, monkeypatch) -> list[int]:
    """Record every read of ``step_count`` back to the host (``int(buffer)``: a host sync on an accelerator)."""
    from cggr import _selector

    reads = []
    real = _selector.Curriculum._set_step

    def spy(self, step):
        reads.append(step)
        return real(self, step)

    monkeypatch.setattr(_selector.Curriculum, "_set_step", spy)
    return reads


@pytest.mark.parametrize("copy_kind", ["to_device", "deepcopy", "pickle"])
def test_a_moved_or_copied_module_trusts_its_mirror_and_still_sees_writes(copy_kind, monkeypatch):
    """``.to(device)`` and ``copy.deepcopy`` give the buffer a new identity and version counter with the same value:
    the first step after them must not read it back (a host sync per model move or ladder copy on CUDA, seen in the
    H200 race test), yet an outside write to the copy is still followed."""
    import copy
    import io

    crit = CGGRLoss(dynamic_threshold=False, min_tokens_ratio=MIN_RATIO, warmup_steps=WARMUP)
    for _ in range(300):
        crit.step()
    old = crit.step_count
    if copy_kind == "to_device":  # a device move, on the CPU: every tensor replaced by a copy of itself
        moved = crit._apply(lambda t: t.clone())
    elif copy_kind == "deepcopy":
        moved = copy.deepcopy(crit)
    else:
        buf = io.BytesIO()
        torch.save(crit, buf)
        buf.seek(0)
        moved = torch.load(buf, weights_only=False)
    assert moved.step_count is not old
    reads = _host_reads_of_step_count(moved, monkeypatch)
    logits, targets = _inputs(7)
    mask = moved.select(logits, targets)[0]
    assert int(mask.sum()) == k_of(_ratio(300), int((targets != -100).sum()))
    assert moved.current_ratio == pytest.approx(_ratio(300))
    moved.step()
    assert reads == [301]  # step() writes the mirror; nothing was read back from the buffer
    moved.step_count.fill_(800)  # an outside write to the copy is still seen
    assert moved.current_ratio == pytest.approx(_ratio(800))
    if moved is not crit:  # a copy: the original keeps its own step
        assert crit.current_ratio == pytest.approx(_ratio(300))


def test_an_untrusted_mirror_is_not_made_trusted_by_a_copy():
    """A write before the copy that the module has not read yet is read by the copy (the copy trusts only a mirror
    that was in sync)."""
    import copy

    crit = CGGRLoss(dynamic_threshold=False, min_tokens_ratio=MIN_RATIO, warmup_steps=WARMUP)
    crit.step_count.fill_(600)
    moved = copy.deepcopy(crit)
    assert moved.current_ratio == pytest.approx(_ratio(600))
    crit2 = CGGRLoss(dynamic_threshold=False, min_tokens_ratio=MIN_RATIO, warmup_steps=WARMUP)
    crit2.step_count.fill_(400)
    assert crit2._apply(lambda t: t.clone()).current_ratio == pytest.approx(_ratio(400))
