"""PersistentTRMLP on CPU (torch path) against a naive per-token fp64 reference written here.

Shape legend: N tokens, d hidden, I intermediate, E experts, k = top_k.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from cggr import PersistentTRMLP, create_persistent_tr_mlp
from cggr.moe import expert_mlp_torch, route_tokens


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(torch.seed() % 2**31)


def _act(h: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "swiglu":
        half = h.shape[-1] // 2
        g, u = h[..., :half], h[..., half:]
        return g / (1 + torch.exp(-g)) * u
    if activation == "silu":
        return h / (1 + torch.exp(-h))
    return 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))


def naive_moe(x, wr, w1, w2, top_k, activation, mask=None, aux_coef=1.0, z_coef=0.0):
    """Per-token loop in fp64: returns (y (N, d), aux scalar)."""
    n_tok, n_exp = x.shape[0], wr.shape[0]
    ys, probs_routed, counts, lse2 = [], [], [0.0] * n_exp, []
    for t in range(n_tok):
        logits = wr @ x[t]  # (E,)
        p = torch.softmax(logits, 0)
        if mask is not None and not bool(mask[t]):
            ys.append(torch.zeros_like(x[t]))
            continue
        vals, idx = torch.topk(p, top_k)
        w = vals / vals.sum()
        out = torch.zeros_like(x[t])
        for j in range(top_k):
            e = int(idx[j])
            counts[e] += 1
            out = out + w[j] * (_act(x[t] @ w1[e], activation) @ w2[e])
        ys.append(out)
        probs_routed.append(p)
        lse2.append(torch.logsumexp(logits, 0) ** 2)
    y = torch.stack(ys)
    if not probs_routed:
        return y, (x.sum() * 0.0 + wr.sum() * 0.0)
    n_r = len(probs_routed)
    f = torch.tensor(counts, dtype=x.dtype) / (n_r * top_k)
    pm = torch.stack(probs_routed).mean(0)
    aux = aux_coef * n_exp * (f * pm).sum() + z_coef * torch.stack(lse2).mean()
    return y, aux


def _layer(d, inter, n_exp, k, activation, **kw):
    torch.manual_seed(torch.seed() % 2**31)
    m = PersistentTRMLP(d, inter, num_experts=n_exp, top_k=k, activation=activation, dtype=torch.float64,
                        impl="torch", **kw)
    with torch.no_grad():  # larger router weights: well separated top-k choices
        m.router.weight.mul_(4.0)
    return m


def _check_against_naive(m, x, mask=None, atol=1e-10):
    x = x.clone().requires_grad_()
    y, aux = m(x, token_mask=mask)
    g = _gen()
    gy = torch.randn(y.shape, generator=g, dtype=y.dtype)
    (y * gy).sum().add(aux * 0.7).backward()
    xr = x.detach().reshape(-1, x.shape[-1]).clone().requires_grad_()
    wr = m.router.weight.detach().clone().requires_grad_()
    w1 = m.expert_w1.detach().clone().requires_grad_()
    w2 = m.expert_w2.detach().clone().requires_grad_()
    yr, auxr = naive_moe(xr, wr, w1, w2, m.top_k, m.activation, None if mask is None else mask.reshape(-1),
                         m.aux_loss_coef, m.z_loss_coef)
    (yr * gy.reshape(yr.shape)).sum().add(auxr * 0.7).backward()
    torch.testing.assert_close(y.reshape(yr.shape), yr, atol=atol, rtol=1e-9)
    torch.testing.assert_close(aux, auxr, atol=atol, rtol=1e-9)
    torch.testing.assert_close(x.grad.reshape(xr.shape), xr.grad, atol=atol, rtol=1e-9)
    torch.testing.assert_close(m.router.weight.grad, wr.grad, atol=atol, rtol=1e-9)
    torch.testing.assert_close(m.expert_w1.grad, w1.grad, atol=atol, rtol=1e-9)
    torch.testing.assert_close(m.expert_w2.grad, w2.grad, atol=atol, rtol=1e-9)
    return y, aux


@pytest.mark.parametrize("activation", ["swiglu", "silu", "gelu"])
@pytest.mark.parametrize(("n_exp", "k"), [(4, 2), (5, 1), (3, 3)])
def test_matches_naive_reference(activation, n_exp, k):
    m = _layer(12, 20, n_exp, k, activation, aux_loss_coef=0.37, z_loss_coef=0.05)
    x = torch.randn(3, 7, 12, generator=_gen(), dtype=torch.float64)
    _check_against_naive(m, x)


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_token_mask_null_routing(activation):
    m = _layer(10, 14, 4, 2, activation, aux_loss_coef=1.0, z_loss_coef=0.1)
    g = _gen()
    x = torch.randn(2, 9, 10, generator=g, dtype=torch.float64)
    mask = torch.rand(2, 9, generator=g) > 0.4
    mask[0, 0], mask[1, -1] = False, True
    y, _ = _check_against_naive(m, x, mask)
    assert torch.equal(y[~mask], torch.zeros_like(y[~mask]))
    # null-routed tokens take no part in routing statistics: changing them changes nothing
    x2 = x.clone()
    x2[~mask] = torch.randn(int((~mask).sum()), 10, generator=g, dtype=torch.float64) * 5
    y2, aux2 = m(x2, token_mask=mask)
    _, aux = m(x, token_mask=mask)
    torch.testing.assert_close(y2[mask], y[mask].detach(), atol=1e-12, rtol=0)
    torch.testing.assert_close(aux2, aux, atol=1e-12, rtol=0)
    assert m.get_metrics()["tokens_routed"] == int(mask.sum())


def test_all_tokens_null_routed():
    m = _layer(8, 6, 3, 2, "swiglu", z_loss_coef=0.2)
    x = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    y, aux = m(x, token_mask=torch.zeros(5, dtype=torch.bool))
    (y.sum() + aux).backward()
    assert torch.equal(y, torch.zeros_like(y)) and float(aux.detach()) == 0.0
    for t in (x.grad, m.router.weight.grad, m.expert_w1.grad, m.expert_w2.grad):
        assert torch.isfinite(t).all() and float(t.abs().max()) == 0.0


def _pin_router(m, x, expert_bias):
    """Feature 0 of x is 1 and router column 0 adds a per-expert bias: forces or forbids experts."""
    x[..., 0] = 1.0
    with torch.no_grad():
        m.router.weight[:, 0] = torch.as_tensor(expert_bias, dtype=m.router.weight.dtype)


def test_expert_with_no_tokens():
    m = _layer(10, 12, 5, 2, "swiglu")
    x = torch.randn(17, 10, generator=_gen(), dtype=torch.float64)
    _pin_router(m, x, [0.0, -60.0, 0.0, 0.0, -60.0])
    _check_against_naive(m, x)
    assert float(m.expert_w1.grad[1].abs().max()) == 0.0 and float(m.expert_w2.grad[4].abs().max()) == 0.0
    met = m.get_metrics()
    assert met["expert_tokens"][1] == 0 and met["expert_tokens"][4] == 0
    assert sum(met["expert_tokens"]) == 17 * 2


def test_every_token_on_one_expert():
    m = _layer(10, 12, 4, 1, "silu")
    x = torch.randn(13, 10, generator=_gen(), dtype=torch.float64)
    _pin_router(m, x, [0.0, 0.0, 60.0, 0.0])
    _check_against_naive(m, x)
    met = m.get_metrics()
    assert met["expert_tokens"] == [0, 0, 13, 0] and met["load_imbalance"] == pytest.approx(4.0)


def test_single_token_and_top_k_equals_num_experts():
    m = _layer(6, 8, 4, 4, "swiglu", z_loss_coef=0.3)
    x = torch.randn(1, 6, generator=_gen(), dtype=torch.float64)
    _check_against_naive(m, x)
    m2 = _layer(6, 8, 3, 3, "gelu")
    _check_against_naive(m2, torch.randn(1, 1, 6, generator=_gen(), dtype=torch.float64))


def test_gradcheck_tiny_float64():
    m = _layer(4, 5, 3, 2, "swiglu", aux_loss_coef=0.5, z_loss_coef=0.1)
    x = torch.randn(6, 4, generator=_gen(), dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([True, True, False, True, True, True])
    names = ["router.weight", "expert_w1", "expert_w2"]
    params = [dict(m.named_parameters())[n].detach().clone().requires_grad_() for n in names]

    def fn(x, wr, w1, w2):
        y, aux = torch.func.functional_call(m, dict(zip(names, (wr, w1, w2))), (x,), {"token_mask": mask})
        return y, aux

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_aux_loss_balanced_router_is_one():
    m = PersistentTRMLP(8, 4, num_experts=4, top_k=2, dtype=torch.float64, impl="torch")
    with torch.no_grad():
        m.router.weight.zero_()
    _, aux = m(torch.randn(6, 8, dtype=torch.float64))
    # uniform probabilities: P_e = 1/E for all e whatever f is, so E * Σ f_e / E = 1
    assert float(aux.detach()) == pytest.approx(1.0, abs=1e-12)


def test_loop_and_dataflow_agree_float32_odd_shapes():
    torch.manual_seed(3)
    m = PersistentTRMLP(7, 9, num_experts=5, top_k=2, activation="gelu", impl="torch")
    x = torch.randn(11, 7)
    plan = route_tokens(x, m.router.weight, 2, torch.rand(11) > 0.3)
    y = expert_mlp_torch(x, m.expert_w1, m.expert_w2, plan, 2, "gelu", use_grouped_mm=False)
    xr, wr = x.double(), m.router.weight.double()
    yr, _ = naive_moe(xr, wr, m.expert_w1.double(), m.expert_w2.double(), 2, "gelu", plan.routed)
    torch.testing.assert_close(y.double(), yr, atol=1e-5, rtol=1e-5)


def test_sorted_plan_invariants():
    x = torch.randn(20, 6, dtype=torch.float64)
    wr = torch.randn(5, 6, dtype=torch.float64)
    mask = torch.rand(20) > 0.5
    plan = route_tokens(x, wr, 3, mask)
    e_sorted = torch.where(plan.routed[:, None], plan.top_idx, 5).reshape(-1)[plan.order]
    assert torch.all(e_sorted[1:] >= e_sorted[:-1])
    assert int(plan.offs[-1]) == int(mask.sum()) * 3 and int(plan.counts[-1]) == int((~mask).sum()) * 3
    assert torch.equal(plan.tok.long(), plan.order // 3)
    torch.testing.assert_close(plan.top_w.sum(-1), torch.ones(20, dtype=torch.float64))


def test_input_validation(monkeypatch):
    with pytest.raises(ValueError, match="top_k"):
        PersistentTRMLP(8, 8, num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="activation"):
        PersistentTRMLP(8, 8, activation="relu")
    with pytest.raises(TypeError, match="hidden_dim"):
        PersistentTRMLP(8.0, 8)
    with pytest.raises(ValueError, match="aux_loss_coef"):
        PersistentTRMLP(8, 8, aux_loss_coef=float("nan"))
    m = create_persistent_tr_mlp(8, 16, num_experts=4, top_k=2)
    with pytest.raises(ValueError, match=r"x must be"):
        m(torch.randn(3, 7))
    with pytest.raises(TypeError, match="token_mask"):
        m(torch.randn(3, 8), token_mask=torch.ones(3))
    with pytest.raises(ValueError, match="token_mask shape"):
        m(torch.randn(2, 3, 8), token_mask=torch.ones(6, dtype=torch.bool))
    with pytest.raises(TypeError, match="dtype"):
        m(torch.randn(3, 8, dtype=torch.float64))
    from cggr import _dispatch

    with monkeypatch.context() as mp:  # the device check, whether or not this machine has triton
        mp.setattr(_dispatch, "triton_importable", lambda: True)
        needs_cuda = r"PersistentTRMLP\(impl='triton'\) needs CUDA tensors, got a tensor on cpu"
        with pytest.raises(RuntimeError, match=needs_cuda):
            PersistentTRMLP(8, 8, impl="triton")(torch.randn(2, 8))
    with pytest.raises(ValueError, match=r"impl must be one of 'auto', 'torch', 'triton', got 'cuda'"):
        PersistentTRMLP(8, 8, impl="cuda")


def test_factory_and_parameter_layout():
    m = create_persistent_tr_mlp(hidden_dim=16, intermediate_dim=24, num_experts=4, top_k=2)
    assert m.expert_w1.shape == (4, 16, 48) and m.expert_w2.shape == (4, 24, 16)
    assert m.router.weight.shape == (4, 16) and m.router.bias is None
    m2 = create_persistent_tr_mlp(16, 24, activation="silu")
    assert m2.expert_w1.shape == (8, 16, 24)
    y, aux = m(torch.randn(2, 3, 16))
    assert y.shape == (2, 3, 16) and aux.dim() == 0 and aux.dtype == torch.float32
    # SwiGLU layout: first I columns gate, next I up (checked against F.silu(x@gate)*(x@up) for one expert)
    x = torch.randn(1, 16)
    plan = route_tokens(x, m.router.weight, 2)
    y1 = expert_mlp_torch(x, m.expert_w1, m.expert_w2, plan, 2, "swiglu")
    ref = sum(w * (F.silu(x @ m.expert_w1[e, :, :24]) * (x @ m.expert_w1[e, :, 24:])) @ m.expert_w2[e]
              for w, e in zip(plan.top_w[0], plan.top_idx[0].tolist()))
    torch.testing.assert_close(y1, ref, atol=1e-5, rtol=1e-5)


def test_env_forces_torch(monkeypatch):
    monkeypatch.setenv("CGGR_IMPL", "torch")
    m = PersistentTRMLP(8, 8, num_experts=2, top_k=1, impl="triton")
    y, _ = m(torch.randn(3, 8))  # would raise without the override on CPU
    assert y.shape == (3, 8)


def test_impl_is_decided_by_the_project_dispatcher(monkeypatch):
    """The layer and route_tokens ask cggr._dispatch.resolve_impl (MoE dtypes bf16/fp16, not interpretable): the
    same triton check, errors and environment override as the other ops."""
    from cggr import _dispatch

    monkeypatch.delenv("CGGR_IMPL", raising=False)
    monkeypatch.setattr(_dispatch, "triton_importable", lambda: False)
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    m = PersistentTRMLP(8, 8, num_experts=2, top_k=1, impl="triton", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"PersistentTRMLP\(impl='triton'\) needs the 'triton' package"):
        m(x)
    with pytest.raises(RuntimeError, match=r"route_tokens\(impl='triton'\) needs the 'triton' package"):
        route_tokens(x, m.router.weight, 1, impl="triton")
    with pytest.raises(ValueError, match=r"impl must be one of 'auto', 'torch', 'triton', got 'fused'"):
        route_tokens(x, m.router.weight, 1, impl="fused")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_interpreter_env_keeps_cpu_layers_on_the_torch_path(monkeypatch, dtype):
    """TRITON_INTERPRET=1 (the CPU kernel tests) does not send a CPU layer to the kernels, whose entry needs CUDA
    tensors (and the interpreter's tl.dot is wrong for bf16): 'auto' equals 'torch' exactly, 'triton' raises."""
    from cggr import _dispatch, moe

    monkeypatch.delenv("CGGR_IMPL", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(_dispatch, "triton_importable", lambda: True)
    monkeypatch.setattr(moe, "grouped_expert_mlp", lambda *a, **k: pytest.fail("the Triton path ran"))
    g = _gen()
    m = PersistentTRMLP(16, 12, num_experts=4, top_k=2, dtype=dtype)
    x = torch.randn(2, 5, 16, generator=g).to(dtype)
    mask = torch.rand(2, 5, generator=g) > 0.3
    y_auto, aux_auto = m(x, token_mask=mask)
    m.impl = "torch"
    y_torch, aux_torch = m(x, token_mask=mask)
    assert torch.equal(y_auto, y_torch) and torch.equal(aux_auto, aux_torch)
    m.impl = "triton"
    with pytest.raises(RuntimeError, match=r"PersistentTRMLP\(impl='triton'\) needs CUDA tensors"):
        m(x, token_mask=mask)


def test_top_k_ties_go_to_the_lowest_expert_index():
    # x = logits, router = identity: exact equal logits (frequent with bf16 routers)
    logits = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0, 2.0], [0.0, 5.0, 1.0, 5.0, 1.0]])
    plan = route_tokens(logits, torch.eye(5), 3)
    assert plan.top_idx.tolist() == [[1, 2, 3], [0, 1, 2], [1, 3, 2]]
    torch.testing.assert_close(plan.top_w[1], torch.full((3,), 1 / 3))


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_autocast_computes_in_the_autocast_dtype_like_a_bf16_copy(x_dtype):
    # fp32 parameters under torch.autocast(bf16): the same outputs as a bf16 copy of the layer on bf16 inputs,
    # and fp32 parameter gradients equal to that copy's bf16 gradients (the casts are differentiable)
    m = create_persistent_tr_mlp(16, 24, num_experts=4, top_k=2, impl="torch", z_loss_coef=1e-3)
    ref = copy.deepcopy(m).to(torch.bfloat16)
    g = _gen()
    x = torch.randn(3, 5, 16, generator=g).to(x_dtype)
    gy = torch.randn(3, 5, 16, generator=g).to(torch.bfloat16)
    mask = torch.rand(3, 5, generator=g) > 0.3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, aux = m(x, token_mask=mask)
    yr, auxr = ref(x.to(torch.bfloat16), token_mask=mask)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, yr, atol=0, rtol=0)
    torch.testing.assert_close(aux.float(), auxr.float(), atol=0, rtol=0)
    (y.float() * gy).sum().add(aux.float()).backward()
    (yr.float() * gy).sum().add(auxr.float()).backward()
    for p, pr in zip(m.parameters(), ref.parameters(), strict=True):
        assert p.grad.dtype == torch.float32
        torch.testing.assert_close(p.grad, pr.grad.float(), atol=0, rtol=0)
    with pytest.raises(TypeError, match="autocast"):  # outside autocast a dtype mismatch is still refused
        m(torch.randn(2, 16, dtype=torch.bfloat16))


def test_float64_layer_under_autocast_stays_float64():
    # autocast leaves float64 alone (as it does for nn.Linear): same result as without autocast
    m = _layer(10, 12, 4, 2, "swiglu")
    x = torch.randn(3, 4, 10, generator=_gen(), dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, aux = m(x)
    yr, auxr = m(x)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, yr, atol=0, rtol=0)
    torch.testing.assert_close(aux, auxr, atol=0, rtol=0)
