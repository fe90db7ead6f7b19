"""cggr._rng.CounterRNG: exact integer hashing, uniformity, streams, and tracing by torch.compile."""

from __future__ import annotations

import math
import random

import pytest
import torch

from cggr import CGGRLoss
from cggr._rng import CounterRNG, _mix32, _mul32

M32 = 0xFFFFFFFF


def _lowbias32(x: int) -> int:  # pure-Python reference of the mixer
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & M32
    return x ^ (x >> 16)


def test_integer_ops_equal_exact_python_arithmetic():
    rnd = random.Random(0)
    xs = [0, 1, 0xFFFF, 0x10000, M32 - 1, M32] + [rnd.getrandbits(32) for _ in range(2000)]
    t = torch.tensor(xs, dtype=torch.int64)
    for c in (0x7FEB352D, 0x846CA68B, 1, M32):
        assert _mul32(t, c).tolist() == [(x * c) & M32 for x in xs]
    assert _mix32(t).tolist() == [_lowbias32(x) for x in xs]


def _rng(seed=7):
    return CounterRNG(seed, torch.zeros((), dtype=torch.long))


def test_uniforms_are_in_range_on_a_2_to_minus_24_grid_and_close_to_uniform():
    u = _rng().uniform((200_000,), "cpu").double()
    assert u.min() >= 0 and u.max() < 1
    assert torch.equal(u * 2**24, torch.floor(u * 2**24))
    counts = torch.histc(u, bins=64, min=0, max=1)
    expected = u.numel() / 64
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 120  # 63 degrees of freedom: p ~ 1e-5 (deterministic: the seed is fixed)
    assert abs(float(u.mean()) - 0.5) < 3 / math.sqrt(12 * u.numel()) * 2


def test_streams_advance_the_counter_and_depend_on_seed_and_draw():
    rng = _rng()
    a = rng.uniform((4, 5), "cpu")
    assert a.shape == (4, 5) and int(rng.counter) == 1
    b = rng.uniform((4, 5), "cpu")
    assert int(rng.counter) == 2 and not torch.equal(a, b)
    again = _rng()
    assert torch.equal(again.uniform((4, 5), "cpu"), a) and torch.equal(again.uniform((4, 5), "cpu"), b)
    assert not torch.equal(_rng(8).uniform((4, 5), "cpu"), a)
    # consecutive draws and neighbouring indices are uncorrelated
    r = _rng()
    x, y = r.uniform((50_000,), "cpu").double(), r.uniform((50_000,), "cpu").double()
    assert abs(float(torch.corrcoef(torch.stack([x, y]))[0, 1])) < 0.02
    assert abs(float(torch.corrcoef(torch.stack([x[:-1], x[1:]]))[0, 1])) < 0.02
    # large counters and seeds (high 32 bits) change the stream too
    hi = CounterRNG(7 + (1 << 40), torch.tensor(1 << 33))
    assert not torch.equal(hi.uniform((8,), "cpu"), _rng().uniform((8,), "cpu"))


def test_permutations_are_permutations_with_uniform_positions():
    rng = _rng(3)
    first = torch.zeros(7)
    for _ in range(7000):
        p = rng.permutation(7, "cpu")
        assert sorted(p.tolist()) == list(range(7))
        first[p[0]] += 1
    assert float(((first - 1000) ** 2 / 1000).sum()) < 25  # 6 degrees of freedom


def test_bad_arguments_raise():
    with pytest.raises(TypeError, match="seed"):
        CounterRNG(1.5, torch.zeros((), dtype=torch.long))
    with pytest.raises(TypeError, match="counter"):
        CounterRNG(1, torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("selection", ["stratified", "random"])
def test_random_strategies_compile_without_graph_breaks_and_match_eager(selection):
    torch.manual_seed(0)
    logits = torch.randn(3, 17, 29)
    targets = torch.randint(0, 29, (3, 17))
    eager = CGGRLoss(selection=selection, min_tokens_ratio=0.3, warmup_steps=0, seed=5)
    comp = CGGRLoss(selection=selection, min_tokens_ratio=0.3, warmup_steps=0, seed=5)
    explain = torch._dynamo.explain(lambda lg, tg: comp.select(lg, tg)[0])(logits, targets)
    assert explain.graph_break_count == 0
    comp.rng_counter.zero_()
    torch._dynamo.reset()
    fn = torch.compile(lambda lg, tg: comp.select(lg, tg)[0], fullgraph=True)
    masks = []
    for _ in range(3):
        m_e, m_c = eager.select(logits, targets)[0], fn(logits, targets)
        assert torch.equal(m_e, m_c)
        masks.append(m_c)
    assert not torch.equal(masks[0], masks[1])  # a new draw every call
    assert int(comp.rng_counter) == int(eager.rng_counter) == 3


def test_state_dict_resumes_the_random_stream():
    logits = torch.randn(40, 11)
    targets = torch.randint(0, 11, (40,))
    crit = CGGRLoss(selection="random", min_tokens_ratio=0.4, warmup_steps=0, seed=9)
    for _ in range(2):
        crit.select(logits, targets)
    state = crit.state_dict()
    assert int(state["rng_counter"]) == 2
    resumed = CGGRLoss(selection="random", min_tokens_ratio=0.4, warmup_steps=0, seed=9)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.select(logits, targets)[0], crit.select(logits, targets)[0])


def test_a_state_dict_without_the_counter_still_loads_strictly():
    """Checkpoints saved before the counter-based random source (no rng_counter) load; the stream restarts."""
    crit = CGGRLoss(selection="random", min_tokens_ratio=0.4, warmup_steps=0, seed=9)
    crit.step()
    state = crit.state_dict()
    del state["rng_counter"]
    resumed = CGGRLoss(selection="random", min_tokens_ratio=0.4, warmup_steps=0, seed=9)
    resumed.rng_counter.fill_(5)
    resumed.load_state_dict(state)  # strict
    assert int(resumed.rng_counter) == 0 and int(resumed.step_count) == 1
    outer = torch.nn.ModuleDict({"loss": CGGRLoss(selection="random", seed=9)})
    nested = {f"loss.{k}": v for k, v in state.items()}
    outer.load_state_dict(nested)
    assert int(outer["loss"].rng_counter) == 0


@pytest.mark.parametrize("selection", ["random", "stratified"])
def test_unseeded_module_resumes_the_same_stream(selection):
    """seed=None draws the seed once; a resume in another process (another global RNG state) must continue the
    same stream, so the seed travels in the state dict with the counter."""
    logits = torch.randn(40, 11)
    targets = torch.randint(0, 11, (40,))
    torch.manual_seed(1)
    crit = CGGRLoss(selection=selection, min_tokens_ratio=0.4, warmup_steps=0)
    crit.select(logits, targets)
    state = {k: v.clone() for k, v in crit.state_dict().items()}
    torch.manual_seed(2)
    resumed = CGGRLoss(selection=selection, min_tokens_ratio=0.4, warmup_steps=0)
    resumed.load_state_dict(state)
    for _ in range(2):
        assert torch.equal(resumed.select(logits, targets)[0], crit.select(logits, targets)[0])


def test_a_state_dict_without_the_seed_keeps_the_module_seed():
    crit = CGGRLoss(selection="random", min_tokens_ratio=0.4, warmup_steps=0, seed=9)
    state = crit.state_dict()
    del state["rng_seed"]
    resumed = CGGRLoss(selection="random", min_tokens_ratio=0.4, warmup_steps=0, seed=9)
    resumed.load_state_dict(state)  # strict
    logits, targets = torch.randn(30, 7), torch.randint(0, 7, (30,))
    assert torch.equal(resumed.select(logits, targets)[0], crit.select(logits, targets)[0])
