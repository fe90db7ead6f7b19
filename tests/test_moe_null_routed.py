"""PersistentTRMLP: null-routed tokens take no part in anything, whatever their values; empty inputs work.

Protocol: the same layer and call twice on fresh random inputs, once with ordinary values at the null-routed
tokens (``token_mask=False``), once with garbage there (NaN, +inf, -inf, ±1e30). The output, ``aux_loss`` (balance
and z-loss terms) and every gradient (input, router, experts) must be exactly equal, finite, and 0 at the
null-routed tokens' inputs. A NaN in a ROUTED token is the user's and must still reach the output and aux_loss.

Shape legend: B batch, T sequence, N tokens, d hidden.
"""

from __future__ import annotations

import pytest
import torch

from cggr import PersistentTRMLP
from tests.test_ignored_garbage import _dirty, _seed


def _layer(d=12, inter=10, n_exp=4, k=2, activation="swiglu", dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    m = PersistentTRMLP(d, inter, num_experts=n_exp, top_k=k, activation=activation, aux_loss_coef=0.7,
                        z_loss_coef=0.3, impl="torch", dtype=dtype)
    with torch.no_grad():
        m.router.weight.mul_(4.0)
    return m


def _run(m, x, mask, gy):
    m.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    y, aux = m(x, token_mask=mask)
    (y * gy).sum().add(aux).backward()
    return y.detach(), aux.detach(), x.grad, [p.grad for p in m.parameters()]


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_garbage_in_null_routed_tokens_changes_nothing(activation, dtype):
    g = torch.Generator().manual_seed(_seed())
    m = _layer(activation=activation, dtype=dtype, seed=_seed())
    x = torch.randn(3, 9, 12, generator=g, dtype=torch.float64).to(dtype)
    mask = torch.rand(3, 9, generator=g) > 0.4
    mask[0, 0], mask[1, 1] = False, True
    dirty = _dirty(x, ~mask, g)
    gy = torch.randn(x.shape, generator=g, dtype=torch.float64).to(dtype)
    ya, aa, gxa, gpa = _run(m, x, mask, gy)
    yb, ab, gxb, gpb = _run(m, dirty, mask, gy)
    assert torch.isfinite(ab) and torch.equal(aa, ab)
    assert torch.equal(ya, yb) and not yb[~mask].any()
    assert torch.equal(gxa, gxb) and not gxb[~mask].any()
    for a, b in zip(gpa, gpb, strict=True):
        assert torch.isfinite(b).all() and torch.equal(a, b)
    metrics = m.get_metrics()
    assert metrics["tokens_routed"] == int(mask.sum()) and metrics["aux_loss"] == float(ab)


def test_nan_in_a_routed_token_reaches_output_and_aux_loss():
    g = torch.Generator().manual_seed(_seed())
    m = _layer(seed=1)
    x = torch.randn(10, 12, generator=g, dtype=torch.float64)
    mask = torch.ones(10, dtype=torch.bool)
    mask[3] = False
    x[5, 2] = float("nan")
    y, aux = m(x, token_mask=mask)
    assert torch.isnan(y[5]).all() and torch.isnan(aux)
    assert torch.isfinite(y[[0, 1, 2, 4, 6, 7, 8, 9]]).all() and not y[3].any()


@pytest.mark.parametrize("shape", [(0, 12), (2, 0, 12), (0, 5, 12)])
@pytest.mark.parametrize("masked", [False, True])
def test_zero_tokens(shape, masked):
    m = _layer(seed=2)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    mask = torch.zeros(shape[:-1], dtype=torch.bool) if masked else None
    y, aux = m(x, token_mask=mask)
    assert y.shape == x.shape and float(aux.detach()) == 0.0
    (y.sum() + aux).backward()
    assert x.grad.shape == x.shape
    for p in m.parameters():
        assert p.grad is None or not p.grad.any()
    assert m.get_metrics()["tokens_total"] == 0
