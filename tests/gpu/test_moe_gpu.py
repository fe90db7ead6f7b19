"""PersistentTRMLP on CUDA: the Triton grouped-GEMM path against the torch path and an fp32 oracle.

Shape legend: N tokens, d hidden, I intermediate, Hc columns of w1, E experts, k = top_k, M = N·k.
"""

from __future__ import annotations

import pytest
import torch

from cggr import PersistentTRMLP
from cggr.moe import expert_mlp_torch, route_tokens

pytestmark = pytest.mark.cuda
triton = pytest.importorskip("triton")

from cggr.kernels.grouped_gemm import GroupedMLPOptions, grouped_expert_mlp  # noqa: E402
from cggr.kernels.moe_routing import fused_route  # noqa: E402
from cggr.moe import aux_losses  # noqa: E402
from tests.reference import rel_err  # noqa: E402


def _gen(device="cuda") -> torch.Generator:
    return torch.Generator(device).manual_seed(torch.seed() % 2**31)


def _poison_allocator() -> None:
    """Fill freed cached blocks with NaN so that any output row a kernel forgets to write shows up."""
    junk = torch.full((1 << 27,), float("nan"), device="cuda", dtype=torch.float32)  # 512 MiB
    del junk


def _inputs(n_tok, d, inter, n_exp, activation, dtype, skew, g):
    hc = 2 * inter if activation == "swiglu" else inter
    x = torch.randn(n_tok, d, device="cuda", generator=g).to(dtype)
    wr = torch.randn(n_exp, d, device="cuda", generator=g) / d**0.5
    if skew:  # a shared direction in x plus a Zipf-like per-expert bias along it: most pairs go to few experts
        u = torch.randn(d, device="cuda", generator=g)
        u = u / u.norm()
        x = (x.float() + 4.0 * u).to(dtype)
        bias = -1.5 * torch.log(torch.arange(1, n_exp + 1, device="cuda", dtype=torch.float32))
        wr = wr + bias[:, None] / 4.0 * u[None, :]
    wr = wr.to(dtype)
    w1 = (torch.randn(n_exp, d, hc, device="cuda", generator=g) / d**0.5).to(dtype)
    w2 = (torch.randn(n_exp, inter, d, device="cuda", generator=g) / inter**0.5).to(dtype)
    return x, wr, w1, w2


CASES = [  # (N, d, I, E, k, activation, skew, masked)
    (512, 256, 384, 8, 2, "swiglu", False, False),
    (777, 200, 136, 5, 2, "swiglu", True, True),  # odd shapes: K not a multiple of the block, ragged tiles
    (300, 128, 256, 6, 3, "silu", True, False),
    (333, 192, 160, 4, 1, "gelu", False, True),
    (64, 128, 128, 16, 6, "swiglu", True, True),  # most experts see few or no tokens
    (1, 64, 96, 4, 4, "swiglu", False, False),  # N = 1, top_k = E
]


def _case_id(c):
    return f"N{c[0]}-d{c[1]}-I{c[2]}-E{c[3]}-k{c[4]}-{c[5]}-s{c[6]}-m{c[7]}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_triton_matches_oracle(case, dtype):
    _check_against_oracle(case, dtype, GroupedMLPOptions())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", [CASES[1], CASES[3]], ids=_case_id)
def test_fused_act_bwd_matches_oracle(case, dtype):
    """The fallback option act_bwd_split=False (activation backward in the dy·w2ᵀ epilogue)."""
    _check_against_oracle(case, dtype, GroupedMLPOptions(act_bwd_split=False))


def _check_against_oracle(case, dtype, opts):
    n_tok, d, inter, n_exp, k, activation, skew, masked = case
    g = _gen()
    x, wr, w1, w2 = _inputs(n_tok, d, inter, n_exp, activation, dtype, skew, g)
    mask = (torch.rand(n_tok, device="cuda", generator=g) > 0.3) if masked else None
    plan = route_tokens(x, wr, k, mask)
    gy = torch.randn(n_tok, d, device="cuda", generator=g).to(dtype)

    def run(fn, xx, a1, a2, dt):
        xx, a1, a2 = (t.detach().to(dt).requires_grad_() for t in (xx, a1, a2))
        w = plan.weights.detach().clone().requires_grad_()
        y = fn(xx, a1, a2, w)
        y.backward(gy.to(dt))
        return y.detach(), xx.grad, a1.grad, a2.grad, w.grad

    _poison_allocator()
    ours = run(lambda xx, a1, a2, w: grouped_expert_mlp(xx, a1, a2, w, plan.tok, plan.pair, plan.offs, plan.routed,
                                                        top_k=k, activation=activation, options=opts),
               x, w1, w2, dtype)
    torch.cuda.synchronize()
    ref = run(lambda xx, a1, a2, w: expert_mlp_torch(xx, a1, a2, plan._replace(weights=w), k, activation,
                                                     use_grouped_mm=False), x, w1, w2, torch.float32)
    same_dtype = run(lambda xx, a1, a2, w: expert_mlp_torch(xx, a1, a2, plan._replace(weights=w), k, activation),
                     x, w1, w2, dtype)
    names = ["y", "dx", "dw1", "dw2", "dweights"]
    for name, o, r, t in zip(names, ours, ref, same_dtype):
        assert torch.isfinite(o).all(), f"{name} has non-finite values"
        err, err_torch = rel_err(o, r), rel_err(t, r)
        assert err < 2e-2 and err < 3 * err_torch + 1e-3, f"{name}: triton rel err {err:.3g}, torch {err_torch:.3g}"
    if mask is not None:
        assert int(torch.count_nonzero(ours[0][~mask])) == 0
        assert int(torch.count_nonzero(ours[1][~mask])) == 0
    # experts with no rows get an exact zero weight gradient
    empty = plan.counts[:n_exp] == 0
    if bool(empty.any()):
        assert float(ours[2][empty].abs().max()) == 0.0 and float(ours[3][empty].abs().max()) == 0.0


ROUTE_CASES = [  # (N, d, E, k, skew, masked)
    (1000, 256, 8, 2, False, False),
    (1000, 256, 8, 2, True, True),
    (3001, 128, 64, 6, True, True),  # several blocks of 16 tokens, E_PAD = 128
    (777, 96, 5, 5, False, True),  # top_k = E
    (1, 64, 4, 2, False, False),  # N = 1
]


@pytest.mark.parametrize(("case", "dtype"), [(c, torch.bfloat16) for c in ROUTE_CASES]
                         + [(c, torch.float16) for c in ROUTE_CASES[1:3]],
                         ids=lambda v: f"N{v[0]}-E{v[2]}-k{v[3]}-s{v[4]}-m{v[5]}" if isinstance(v, tuple) else str(v))
def test_fused_routing_matches_torch(case, dtype):
    """Same experts (ties: lowest index), sorted rows, counts; weights, losses and router gradient close."""
    n_tok, d, n_exp, k, skew, masked = case
    g = _gen()
    x, wr, _, _ = _inputs(n_tok, d, 8, n_exp, "silu", dtype, skew, g)
    mask = (torch.rand(n_tok, device="cuda", generator=g) > 0.3) if masked else None
    logits = torch.nn.functional.linear(x, wr)  # (N, E) in dtype: exact ties happen, both paths see the same
    ref_l = logits.detach().float().requires_grad_()
    plan = route_tokens(ref_l, torch.eye(n_exp, device="cuda"), k, mask)  # the torch path on these logits
    fl = logits.detach().clone().requires_grad_()
    _poison_allocator()
    weights, bal, z, probs, idx, topw, counts, offs, tok, pair = fused_route(fl, k, mask)
    assert torch.equal(idx.long(), plan.top_idx)
    assert torch.equal(counts, plan.counts) and torch.equal(offs, plan.offs)
    assert torch.equal(pair.long(), plan.pair) and torch.equal(tok.long(), plan.tok)
    torch.testing.assert_close(topw, plan.top_w.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(probs, plan.probs.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(weights, plan.weights.detach(), atol=1e-6, rtol=1e-5)
    rbal, rz = aux_losses(plan, k)
    torch.testing.assert_close(bal, rbal.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(z, rz.detach(), atol=1e-5, rtol=1e-5)
    gw = torch.randn(n_tok * k, device="cuda", generator=g)
    gw[int(plan.offs[-1]):] = 0.0  # null-routed rows never receive a gradient from the expert kernels
    (weights * gw).sum().add(0.7 * bal + 0.3 * z).backward()
    (plan.weights * gw).sum().add(0.7 * rbal + 0.3 * rz).backward()
    assert fl.grad.dtype == dtype and torch.isfinite(fl.grad).all()
    assert rel_err(fl.grad, ref_l.grad) < 1e-2, f"router logit gradient rel err {rel_err(fl.grad, ref_l.grad):.3g}"


@pytest.mark.parametrize(("dtype", "skew", "fused_routing"), [
    (torch.bfloat16, False, True), (torch.bfloat16, True, True), (torch.float16, False, True),
    (torch.float16, True, True), (torch.bfloat16, True, False)])
def test_module_triton_vs_torch(dtype, skew, fused_routing):
    g = _gen()
    n_exp, d, inter = 8, 256, 320
    m = PersistentTRMLP(d, inter, num_experts=n_exp, top_k=2, z_loss_coef=1e-3, device="cuda", dtype=dtype,
                        kernel_options=GroupedMLPOptions(fused_routing=fused_routing))
    x, wr, w1, w2 = _inputs(1024, d, inter, n_exp, "swiglu", dtype, skew, g)
    with torch.no_grad():
        m.router.weight.copy_(wr)
        m.expert_w1.copy_(w1)
        m.expert_w2.copy_(w2)
    x = x.view(4, 256, d)
    mask = torch.rand(4, 256, device="cuda", generator=g) > 0.5
    gy = torch.randn_like(x)
    res = {}
    for impl in ("triton", "torch"):
        m.impl = impl
        m.zero_grad(set_to_none=True)
        xx = x.detach().clone().requires_grad_()
        _poison_allocator()
        y, aux = m(xx, token_mask=mask)
        torch.autograd.backward([y, aux], [gy, torch.ones_like(aux)])
        res[impl] = [y.detach(), aux.detach(), xx.grad, m.router.weight.grad, m.expert_w1.grad, m.expert_w2.grad]
    for name, a, b in zip(["y", "aux", "dx", "drouter", "dw1", "dw2"], res["triton"], res["torch"]):
        assert torch.isfinite(a).all(), name
        assert rel_err(a, b) < 2e-2, f"{name}: rel diff {rel_err(a, b):.3g}"
    assert torch.equal(res["triton"][0][~mask], torch.zeros_like(res["triton"][0][~mask]))


def test_no_host_sync_in_triton_forward_backward():
    m = PersistentTRMLP(128, 256, num_experts=8, top_k=2, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(256, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    mask = torch.rand(256, device="cuda") > 0.5
    y, aux = m(x, token_mask=mask)  # warm-up compiles the kernels
    (y.sum() + aux).backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y, aux = m(x, token_mask=mask)
        (y.float().sum() + aux).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("fused_routing", [True, False])
def test_garbage_in_null_routed_tokens_changes_nothing_triton(fused_routing):
    """NaN / inf / 1e30 in null-routed tokens (token_mask False): the Triton path's output, aux_loss and gradients
    equal those with ordinary values there (up to the accumulation order of the atomics), all finite."""
    g = _gen()
    n_exp, d, inter = 8, 128, 192
    m = PersistentTRMLP(d, inter, num_experts=n_exp, top_k=2, z_loss_coef=1e-3, device="cuda", dtype=torch.bfloat16,
                        impl="triton", kernel_options=GroupedMLPOptions(fused_routing=fused_routing))
    x = torch.randn(4, 96, d, device="cuda", generator=g).to(torch.bfloat16)
    mask = torch.rand(4, 96, device="cuda", generator=g) > 0.5
    dirty = x.clone()
    junk = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30], device="cuda", dtype=torch.bfloat16)
    dirty[~mask] = junk[torch.randint(0, 4, dirty[~mask].shape, device="cuda", generator=g)]
    gy = torch.randn_like(x)
    res = []
    for inp in (x, dirty):
        m.zero_grad(set_to_none=True)
        xx = inp.detach().clone().requires_grad_()
        y, aux = m(xx, token_mask=mask)
        torch.autograd.backward([y, aux], [gy, torch.ones_like(aux)])
        res.append([y.detach(), aux.detach(), xx.grad, m.router.weight.grad, m.expert_w1.grad, m.expert_w2.grad])
    for name, a, b in zip(["y", "aux", "dx", "drouter", "dw1", "dw2"], *res):
        assert torch.isfinite(b).all(), name
        assert rel_err(a, b) < 1e-2, f"{name}: rel diff {rel_err(a, b):.3g}"
    assert not res[1][0][~mask].any() and not res[1][2][~mask].any()


@pytest.mark.parametrize("shape", [(0, 128), (2, 0, 128)])
def test_zero_tokens_triton(shape):
    m = PersistentTRMLP(128, 192, num_experts=4, top_k=2, device="cuda", dtype=torch.bfloat16, impl="triton")
    x = torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y, aux = m(x, token_mask=torch.ones(shape[:-1], dtype=torch.bool, device="cuda"))
    assert y.shape == x.shape and float(aux.detach()) == 0.0
    (y.float().sum() + aux).backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_impl_dispatch_on_cuda_full_precision(dtype, monkeypatch):
    """cggr._dispatch.resolve_impl with the MoE dtypes: a CUDA fp32/fp64 layer runs the torch path under 'auto'
    (exactly impl='torch'), and an explicit 'triton' raises TypeError naming the argument, value and dtypes."""
    from cggr import moe

    monkeypatch.delenv("CGGR_IMPL", raising=False)
    g = _gen()
    m = PersistentTRMLP(64, 96, num_experts=4, top_k=2, device="cuda", dtype=dtype)
    x = torch.randn(3, 17, 64, device="cuda", generator=g, dtype=dtype)
    mask = torch.rand(3, 17, device="cuda", generator=g) > 0.4
    monkeypatch.setattr(moe, "grouped_expert_mlp", lambda *a, **k: pytest.fail("the Triton path ran"))
    y_auto, aux_auto = m(x, token_mask=mask)
    m.impl = "torch"
    y_torch, aux_torch = m(x, token_mask=mask)
    assert torch.equal(y_auto, y_torch) and torch.equal(aux_auto, aux_torch)
    m.impl = "triton"
    expected = rf"PersistentTRMLP\(impl='triton'\) supports bfloat16 and float16, got {dtype}"
    with pytest.raises(TypeError, match=expected):
        m(x, token_mask=mask)
    with pytest.raises(TypeError, match=r"route_tokens\(impl='triton'\) supports bfloat16 and float16"):
        route_tokens(x.view(-1, 64), m.router.weight, 2, impl="triton")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_impl_auto_picks_triton_on_cuda_half(dtype, monkeypatch):
    """'auto' on a CUDA bf16/fp16 layer runs the grouped-GEMM kernels (counted) and the fused routing."""
    from cggr import moe

    monkeypatch.delenv("CGGR_IMPL", raising=False)
    calls = []

    def counting(*args, **kwargs):
        calls.append(args[0].dtype)
        return grouped_expert_mlp(*args, **kwargs)

    monkeypatch.setattr(moe, "grouped_expert_mlp", counting)
    m = PersistentTRMLP(64, 96, num_experts=4, top_k=2, device="cuda", dtype=dtype)
    x = torch.randn(2, 33, 64, device="cuda", dtype=dtype)
    y, _ = m(x)
    assert calls == [dtype] and y.dtype == dtype
    monkeypatch.setenv("CGGR_IMPL", "torch")
    m(x)
    assert calls == [dtype]
