"""CUDA tests: the Triton one-pass scoring kernel against the PyTorch path (and an fp64 brute force).

Fresh random inputs per check, outputs poisoned (the allocator cache is filled with NaN first, so an
unwritten output element shows up as NaN), odd vocabulary sizes, duplicated maxima, NaN rows, strided rows.
"""

from __future__ import annotations

import pytest
import torch

from cggr.functional import token_scores
from cggr.scoring import token_scores_torch as torch_token_scores
from tests.reference import rel_err, scores_fp64

pytestmark = pytest.mark.cuda

FIELDS = ("entropy", "confidence", "margin", "nll")


def _poison() -> None:
    """Fill the CUDA caching allocator with NaN so that torch.empty hands back NaN-filled memory."""
    junk = torch.full((1 << 26,), float("nan"), device="cuda")
    del junk


def _logits(shape, dtype, gen, scale=3.0):
    z = torch.randn(shape, generator=gen, device="cuda", dtype=torch.float32) * scale
    return z.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1), (3, 2), (7, 37), (33, 1000), (5, 50257), (129, 4096), (2, 3, 32001)])
def test_triton_matches_torch_path(shape, dtype):
    gen = torch.Generator(device="cuda").manual_seed(hash((shape, str(dtype))) % 2**31)
    z = _logits(shape, dtype, gen)
    t = torch.randint(0, shape[-1], shape[:-1], device="cuda", generator=gen)
    t.view(-1)[::3] = -100
    ref = torch_token_scores(z, t)
    _poison()
    out = token_scores(z, t, impl="triton")
    for name in FIELDS:
        a, b = getattr(out, name), getattr(ref, name)
        assert a.shape == b.shape and a.dtype == torch.float32
        assert torch.isfinite(a).all(), name
        if float(b.norm()) > 1e-3:  # (V = 1: entropy ~ 0, only the absolute check below is meaningful)
            assert rel_err(a, b) <= 1e-5, (name, rel_err(a, b))
        torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-5)
    assert torch.equal(out.valid, ref.valid)
    assert out.vocab_size == shape[-1]


def test_against_fp64_brute_force():
    gen = torch.Generator(device="cuda").manual_seed(1)
    z = _logits((6, 777), torch.float32, gen)
    t = torch.randint(0, 777, (6,), device="cuda", generator=gen)
    t[2] = -100
    _poison()
    out = token_scores(z, t, impl="triton")
    ref = scores_fp64(z, t)
    for name in FIELDS:
        torch.testing.assert_close(getattr(out, name).double().cpu(), ref[name], rtol=1e-5, atol=1e-6)


def test_duplicated_maximum_gives_zero_margin():
    gen = torch.Generator(device="cuda").manual_seed(2)
    z = _logits((4, 9000), torch.bfloat16, gen)
    top = z.float().amax(dim=-1) + 1.0
    z[0, 10], z[0, 11] = top[0], top[0]  # neighbouring lanes
    z[1, 5], z[1, 5 + 2048] = top[1], top[1]  # same lane (any power-of-two block <= 2048), later chunk
    z[2, 7], z[2, 8999] = top[2], top[2]  # main loop and masked tail
    z[3, 100] = top[3]  # a single maximum: margin > 0
    _poison()
    out = token_scores(z, impl="triton")
    assert torch.equal(out.margin[:3], torch.zeros(3, device="cuda"))
    assert out.margin[3] > 0
    torch.testing.assert_close(out.margin, torch_token_scores(z).margin, rtol=1e-4, atol=1e-6)


def test_nan_row_is_not_hidden_and_other_rows_unaffected():
    gen = torch.Generator(device="cuda").manual_seed(3)
    z = _logits((3, 5000), torch.float32, gen)
    z[1, 1234] = float("nan")
    t = torch.tensor([1, 2, 3], device="cuda")
    _poison()
    out = token_scores(z, t, impl="triton")
    ref = torch_token_scores(z, t)
    for name in FIELDS:
        a = getattr(out, name)
        assert torch.isnan(a[1]), name
        torch.testing.assert_close(a[[0, 2]], getattr(ref, name)[[0, 2]], rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_minus_inf_logits_are_zero_probability(dtype):
    """-inf logits (masked / padded vocabulary) in the main loop and the tail: finite scores equal to the torch path."""
    gen = torch.Generator(device="cuda").manual_seed(6)
    z = _logits((4, 50257), dtype, gen)
    z[:, 50000:] = float("-inf")
    z[1, :49998] = float("-inf")  # two allowed tokens
    z[2, 1::2] = float("-inf")
    t = torch.tensor([7, 49999, 8, -100], device="cuda")
    _poison()
    out = token_scores(z, t, impl="triton")
    ref = torch_token_scores(z, t)
    for name in FIELDS:
        a = getattr(out, name)
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, getattr(ref, name), rtol=2e-4, atol=2e-5)


def test_strided_rows_and_no_targets():
    gen = torch.Generator(device="cuda").manual_seed(4)
    wide = _logits((17, 3000 + 24), torch.bfloat16, gen)
    z = wide[:, 5:3005]  # row stride 3024, unaligned start
    _poison()
    out = token_scores(z, impl="triton")
    ref = torch_token_scores(z)
    assert out.nll is None and out.valid is None
    for name in ("entropy", "confidence", "margin"):
        torch.testing.assert_close(getattr(out, name), getattr(ref, name), rtol=2e-4, atol=2e-5)


def test_explicit_triton_rejects_cpu_and_fp64():
    with pytest.raises(RuntimeError, match="CUDA"):
        token_scores(torch.randn(2, 5), impl="triton")
    with pytest.raises(TypeError, match="float64"):
        token_scores(torch.randn(2, 5, device="cuda", dtype=torch.float64), impl="triton")
