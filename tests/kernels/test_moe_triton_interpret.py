"""The MoE Triton kernels on the CPU through the Triton interpreter (TRITON_INTERPRET=1), small odd shapes.

Checks the fused routing (:mod:`cggr.kernels.moe_routing`) against the torch routing path and the grouped
expert-MLP kernels (:mod:`cggr.kernels.grouped_gemm`, split and fused activation backward) against the fp64
per-token reference of ``test_moe.py``. Skipped without triton (CI). The kernels must be defined while
TRITON_INTERPRET=1 is set, before triton is imported: when another module imported triton first in this process,
the checks run in a fresh subprocess instead (and when this module is the first, the whole process stays
interpreted: do not collect it together with tests/gpu in one process on a GPU machine).

The interpreter's tl.dot is wrong for bf16 inputs (Triton 3.9), so the GEMM checks here use fp32 and fp16; bf16
is covered by tests/gpu/test_moe_gpu.py on the GPU.

Shape legend: N tokens, d hidden, I intermediate, E experts, k = top_k, M = N·k.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests._interpret import import_triton, interpreter_env, is_interpreted, module_hooks

with interpreter_env():  # see tests/_interpret.py
    import_triton()
    from cggr.kernels import grouped_gemm as gg
    from cggr.kernels import moe_routing as mr
    from cggr.kernels import moe_slot_sum as ss

INTERPRETED = is_interpreted(mr._route_fwd_kernel, gg._rows_kernel, ss._sum_slots_kernel)
needs_interp, _interpret_env, test_in_fresh_process = module_hooks(INTERPRETED, __file__)

from cggr.moe import aux_losses, expert_mlp_torch, route_tokens  # noqa: E402
from tests.test_moe import naive_moe  # noqa: E402


def _gen(seed=None) -> torch.Generator:
    return torch.Generator().manual_seed(torch.seed() % 2**31 if seed is None else seed)


def _torch_plan(logits, k, mask):
    """The torch routing path on given logits: x = logits, router = identity (exact in fp32)."""
    eye = torch.eye(logits.shape[1], dtype=logits.dtype)
    return route_tokens(logits, eye, k, mask, impl="torch")


ROUTE_CASES = [  # (N, E, k, masked, kind)
    (37, 5, 2, False, "random"),
    (37, 5, 2, True, "random"),
    (130, 8, 2, True, "random"),  # two token blocks
    (41, 6, 6, True, "random"),  # top_k = E
    (1, 4, 3, False, "random"),  # N = 1
    (29, 5, 2, False, "ties"),  # many equal logits: lowest index first
    (23, 5, 1, True, "one_expert"),  # every token on expert 3
    (31, 7, 3, False, "empty_expert"),  # experts 1 and 4 never chosen
    (300, 64, 6, True, "random"),  # E_PAD = 128, several blocks
    (9, 3, 2, "none", "random"),  # every token null-routed
]


def _route_inputs(n, e, masked, kind, g):
    logits = torch.randn(n, e, generator=g) * 3
    if kind == "ties":
        logits = torch.randint(0, 3, (n, e), generator=g).float()
    elif kind == "one_expert":
        logits[:, 3] += 50.0
    elif kind == "empty_expert":
        logits[:, [1, 4]] -= 50.0
    if masked == "none":
        mask = torch.zeros(n, dtype=torch.bool)
    else:
        mask = (torch.rand(n, generator=g) > 0.35) if masked else None
    return logits, mask


@needs_interp
@pytest.mark.parametrize("case", ROUTE_CASES, ids=lambda c: f"N{c[0]}-E{c[1]}-k{c[2]}-m{c[3]}-{c[4]}")
def test_fused_route_matches_torch(case):
    n, e, k, masked, kind = case
    g = _gen()
    logits, mask = _route_inputs(n, e, masked, kind, g)
    ref_logits = logits.clone().requires_grad_()
    plan = _torch_plan(ref_logits, k, mask)
    fl = logits.clone().requires_grad_()
    weights, bal, z, probs, idx, topw, counts, offs, tok, pair = mr.fused_route(fl, k, mask)
    assert torch.equal(idx.long(), plan.top_idx)
    torch.testing.assert_close(topw, plan.top_w.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(probs, plan.probs.detach(), atol=1e-6, rtol=1e-5)
    assert torch.equal(counts, plan.counts) and torch.equal(offs, plan.offs)
    assert torch.equal(pair.long(), plan.order) and torch.equal(tok.long(), plan.tok)
    torch.testing.assert_close(weights, plan.weights.detach(), atol=1e-6, rtol=1e-5)
    rbal, rz = aux_losses(plan, k)
    torch.testing.assert_close(bal, rbal.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(z, rz.detach(), atol=1e-5, rtol=1e-5)
    # gradients: routed rows of the weights, the balance and the z terms
    n_valid = int(plan.offs[-1])
    gw = torch.randn(n * k, generator=g)
    gw[n_valid:] = 0.0  # null-routed rows never receive a gradient from the expert kernels
    cb, cz = 0.7, 0.3
    (weights * gw).sum().add(cb * bal + cz * z).backward()
    (plan.weights * gw).sum().add(cb * rbal + cz * rz).backward()
    torch.testing.assert_close(fl.grad, ref_logits.grad, atol=1e-5, rtol=1e-4)


@needs_interp
def test_fused_route_bf16_logits_and_partial_grads():
    g = _gen()
    logits = (torch.randn(45, 6, generator=g) * 2).to(torch.bfloat16)
    mask = torch.rand(45, generator=g) > 0.3
    ref_logits = logits.clone().requires_grad_()
    plan = _torch_plan(ref_logits.float(), 2, mask)  # the torch path promotes bf16 logits to fp32 too
    fl = logits.clone().requires_grad_()
    _w, bal, _z, _p, idx, _tw, _c, _o, _t, _pr = mr.fused_route(fl, 2, mask)
    assert torch.equal(idx.long(), plan.top_idx)
    bal.backward()  # only the balance term: weights and z receive no gradient
    rbal, _ = aux_losses(plan, 2)
    rbal.backward()
    assert fl.grad.dtype == torch.bfloat16
    torch.testing.assert_close(fl.grad.float(), ref_logits.grad.float(), atol=1e-3, rtol=1e-2)


def _mlp_inputs(n, d, inter, e, activation, g, dtype=torch.float32):
    hc = 2 * inter if activation == "swiglu" else inter
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    wr = torch.randn(e, d, generator=g, dtype=torch.float64) * (4.0 / d**0.5)
    w1 = torch.randn(e, d, hc, generator=g, dtype=torch.float64) / d**0.5
    w2 = torch.randn(e, inter, d, generator=g, dtype=torch.float64) / inter**0.5
    return [t.to(dtype) for t in (x, wr, w1, w2)]


SMALL = gg.GemmConfig(32, 32, 16, 4, 1)
OPTS = {
    "split": gg.GroupedMLPOptions(up=SMALL, down=SMALL, dx=SMALL, wgrad=SMALL, wgrad2=SMALL,
                                  act_bwd_gemm=gg.GemmConfig(32, 64, 32, 4, 1)),
    "split_default_tiles": gg.GroupedMLPOptions(),
    "fused": gg.GroupedMLPOptions(up=SMALL, down=SMALL, dx=SMALL, wgrad=SMALL, wgrad2=SMALL, act_bwd=SMALL,
                                  act_bwd_split=False),
}

MLP_CASES = [  # (N, d, I, E, k, activation, masked, pin, opts)
    (37, 48, 40, 5, 2, "swiglu", True, None, "split"),
    (37, 48, 40, 5, 2, "swiglu", False, None, "fused"),
    (37, 48, 40, 5, 2, "gelu", True, None, "split_default_tiles"),
    (29, 40, 24, 4, 4, "silu", False, None, "split"),  # top_k = E
    (33, 48, 40, 5, 2, "swiglu", True, [0.0, -60.0, 0.0, 0.0, -60.0], "split"),  # experts 1, 4 empty
    (21, 32, 40, 4, 1, "swiglu", False, [0.0, 0.0, 60.0, 0.0], "split"),  # every token on expert 2
    (1, 32, 24, 3, 2, "swiglu", False, None, "split"),  # N = 1
]


@needs_interp
@pytest.mark.parametrize("case", MLP_CASES, ids=lambda c: f"N{c[0]}-E{c[3]}-k{c[4]}-{c[5]}-m{c[6]}-{c[8]}")
def test_triton_moe_matches_fp64_reference(case):
    n, d, inter, e, k, activation, masked, pin, opts = case
    g = _gen()
    x, wr, w1, w2 = _mlp_inputs(n, d, inter, e, activation, g)
    if pin is not None:  # feature 0 = 1 and a per-expert router bias on it: forces or forbids experts
        x[:, 0] = 1.0
        wr[:, 0] = torch.tensor(pin)
    mask = (torch.rand(n, generator=g) > 0.3) if masked else None
    if mask is not None:
        mask[0] = True
    leaves = [t.clone().requires_grad_() for t in (x, wr, w1, w2)]
    xx, wrr, w1r, w2r = leaves
    weights, bal, z, _p, _i, _tw, counts, offs, tok, pair = mr.fused_route(F.linear(xx, wrr), k, mask)
    y = gg._GroupedExpertMLP.apply(xx, w1r, w2r, weights, tok, pair, offs, mask, k, activation, OPTS[opts])
    gy = torch.randn(y.shape, generator=g)
    (y * gy).sum().add(0.7 * bal + 0.3 * z).backward()
    ref = [t.double().requires_grad_() for t in (x, wr, w1, w2)]
    yr, auxr = naive_moe(*ref, k, activation, mask, aux_coef=0.7, z_coef=0.3)
    (yr * gy.double()).sum().add(auxr).backward()
    torch.testing.assert_close(y.double(), yr.detach(), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close((0.7 * bal + 0.3 * z).double(), auxr.detach(), atol=2e-5, rtol=1e-4)
    for name, a, b in zip(["dx", "drouter", "dw1", "dw2"], leaves, ref):
        torch.testing.assert_close(a.grad.double(), b.grad, atol=5e-5, rtol=1e-3, msg=name)
    if mask is not None:
        assert torch.equal(y[~mask], torch.zeros_like(y[~mask]))
    empty = counts[:e] == 0
    if bool(empty.any()):
        assert float(w1r.grad[empty].abs().max()) == 0.0 and float(w2r.grad[empty].abs().max()) == 0.0


@needs_interp
def test_split_and_fused_act_bwd_agree_fp16():
    """The two activation-backward variants on fp16 inputs against the torch dataflow in fp32 (same plan)."""
    g = _gen()
    n, d, inter, e, k = 40, 48, 40, 5, 2
    x, wr, w1, w2 = _mlp_inputs(n, d, inter, e, "swiglu", g, torch.float16)
    mask = torch.rand(n, generator=g) > 0.3
    plan = route_tokens(x.float(), wr.float(), k, mask)
    tok, pair = plan.tok.to(torch.int32), plan.pair.to(torch.int32)
    gy = torch.randn(n, d, generator=g).half()
    outs = {}
    for name in ("split", "fused"):
        leaves = [t.clone().requires_grad_() for t in (x, w1, w2)]
        w = plan.weights.detach().float().clone().requires_grad_()
        y = gg._GroupedExpertMLP.apply(*leaves, w, tok, pair, plan.offs, mask, k, "swiglu", OPTS[name])
        y.backward(gy)
        outs[name] = [y.detach(), *(t.grad for t in leaves), w.grad]
    leaves = [t.float().clone().requires_grad_() for t in (x, w1, w2)]
    w = plan.weights.detach().float().clone().requires_grad_()
    y = expert_mlp_torch(leaves[0], leaves[1], leaves[2], plan._replace(weights=w), k, "swiglu",
                         use_grouped_mm=False)
    y.backward(gy.float())
    ref = [y.detach(), *(t.grad for t in leaves), w.grad]
    for name, res in outs.items():
        for what, a, b in zip(["y", "dx", "dw1", "dw2", "dweights"], res, ref):
            err = float((a.float() - b).norm() / b.norm().clamp_min(1e-30))
            assert err < 5e-3, f"{name} {what}: rel err {err:.3g}"


@needs_interp
@pytest.mark.parametrize(("n", "k", "d", "dtype"), [(37, 2, 48, torch.float32), (5, 6, 130, torch.float16),
                                                    (3, 1, 2500, torch.bfloat16)])
def test_sum_slots(n, k, d, dtype):
    g = _gen()
    rows = (torch.randn(n * k, d, generator=g) * 3).to(dtype)
    routed = torch.rand(n, generator=g) > 0.3
    rows.view(n, k, d)[~routed] = float("nan")  # rows of null-routed tokens are never written: not to be read
    out = ss.sum_slots(rows, routed, k)
    ref = rows.view(n, k, d).double().sum(1).masked_fill(~routed[:, None], 0)
    torch.testing.assert_close(out.double(), ref.to(dtype).double())  # the dtype's default tolerances
    assert torch.equal(out[~routed], torch.zeros_like(out[~routed]))
    clean = rows.nan_to_num()
    torch.testing.assert_close(ss.sum_slots(clean, None, k).double(), clean.view(n, k, d).double().sum(1).to(dtype)
                               .double())
