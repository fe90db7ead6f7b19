"""CUDA: CGGRModel's fused head (Triton selective linear cross-entropy) against its unfused path (materialised
(k, T, V) logits + cross-entropy) on tiny random causal LMs, bf16 and fp32; and that 'auto' picks it on CUDA."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import cggr._fused_head as fused_head_module  # noqa: E402  (CGGRModel's fused head calls linear_cross_entropy here)
from cggr import CGGRModel  # noqa: E402
from tests.reference import rel_err  # noqa: E402
from tests.test_router import CONFIGS, make_config  # noqa: E402

pytestmark = pytest.mark.cuda

VOCAB = 1001  # not a power of two, larger than one vocabulary tile
FAMILIES = ["llama", "gemma2", "gptj", "gpt2", "qwen3", "phi3"]


def _model(name: str, dtype: torch.dtype) -> torch.nn.Module:
    cfg = make_config(name)
    cfg.vocab_size = VOCAB
    torch.manual_seed(0)
    model = getattr(transformers, CONFIGS[name][1])(cfg)
    with torch.no_grad():  # non-zero head bias (GPT-J) so that its gradient path is exercised
        bias = getattr(model.get_output_embeddings(), "bias", None)
        if bias is not None:
            bias.normal_(0.0, 0.5)
    return model.to("cuda", dtype).eval()


def _batch(b: int = 6, t: int = 37):
    g = torch.Generator(device="cuda").manual_seed(b * t)
    ids = torch.randint(3, VOCAB, (b, t), device="cuda", generator=g)
    labels = ids.clone()
    labels[1, :9] = -100
    labels[3, 20:30] = -100
    mask = torch.ones_like(ids)
    mask[0, 25:] = 0
    mask[4, 17:] = 0
    return ids, labels, mask


def _run(model, wrapper, ids, labels, mask):
    model.zero_grad(set_to_none=True)
    loss = wrapper(ids, labels=labels, attention_mask=mask).loss
    loss.backward()
    grads = [p.grad.float().clone() if p.grad is not None else torch.zeros_like(p, dtype=torch.float32)
             for p in model.parameters()]  # fmt: skip
    return loss.detach().float(), grads, wrapper.get_metrics()


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float32, 1e-4)])
@pytest.mark.parametrize("token_ratio", [None, 0.3])
@pytest.mark.parametrize("name", FAMILIES)
def test_fused_head_matches_unfused_cuda(name, token_ratio, dtype, tol, monkeypatch):
    calls = [0]
    real = fused_head_module.linear_cross_entropy

    def counting(*args, **kwargs):
        assert kwargs.get("impl") == "triton"
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(fused_head_module, "linear_cross_entropy", counting)
    model = _model(name, dtype)
    common = dict(num_router_layers=2, min_tokens_ratio=0.5, warmup_steps=0, token_ratio=token_ratio)
    fused = CGGRModel(model, fused_head=None, impl="triton", **common)  # auto: on for a causal LM on CUDA
    plain = CGGRModel(model, fused_head=False, impl="triton", **common)
    ids, labels, mask = _batch()
    l_f, g_f, m_f = _run(model, fused, ids, labels, mask)
    assert calls[0] == 1
    l_p, g_p, m_p = _run(model, plain, ids, labels, mask)
    assert calls[0] == 1
    assert m_f["selected_indices"] == m_p["selected_indices"]
    assert m_f["tokens_selected"] == m_p["tokens_selected"] > 0
    assert torch.isfinite(l_f)
    assert abs(float(l_f) - float(l_p)) <= tol * abs(float(l_p)) + 1e-6, (float(l_f), float(l_p))
    flat_f = torch.cat([g.flatten() for g in g_f])
    flat_p = torch.cat([g.flatten() for g in g_p])
    assert torch.isfinite(flat_f).all()
    assert rel_err(flat_f, flat_p) <= tol, rel_err(flat_f, flat_p)
    for (pname, _), a, b in zip(model.named_parameters(), g_f, g_p, strict=True):
        if b.norm() > 1e-3 * flat_p.norm():  # parameters with a non-negligible gradient
            assert rel_err(a, b) <= 3 * tol, (pname, rel_err(a, b))


def test_fused_head_autocast_cuda():
    """fp32 weights under bf16 autocast: the head GEMM runs in bf16 in both paths."""
    model = _model("llama", torch.float32)
    common = dict(num_router_layers=2, min_tokens_ratio=0.5, warmup_steps=0, token_ratio=0.5)
    ids, labels, mask = _batch()
    out = []
    for fused_head in (True, False):
        wrapper = CGGRModel(model, fused_head=fused_head, **common)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out.append(_run(model, wrapper, ids, labels, mask))
    (l_f, g_f, _), (l_p, g_p, _) = out
    assert abs(float(l_f) - float(l_p)) <= 1e-2 * abs(float(l_p))
    assert rel_err(torch.cat([g.flatten() for g in g_f]), torch.cat([g.flatten() for g in g_p])) <= 2e-2


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float32, 1e-4)])
@pytest.mark.parametrize("head", ["outputs", "fused", "fused-filter"])
def test_head_options_match_unfused_cuda(head, dtype, tol, monkeypatch):
    """head_options through CGGRModel: workspace='outputs' (tail budget 0: several vocabulary chunks, gradients
    in the backward) and the fused kernel, against the unfused path."""
    from cggr.functional import LinearCrossEntropyOptions
    from cggr.kernels import linear_cross_entropy as lce

    monkeypatch.setattr(lce, "OUTPUTS_TAIL_BYTES", 0)
    opts = {"outputs": LinearCrossEntropyOptions(workspace="outputs"),
            "fused": LinearCrossEntropyOptions(kernel="fused"),
            "fused-filter": LinearCrossEntropyOptions(kernel="fused", filter_eps=2.0**-12)}[head]
    used = []
    real = lce.outputs_backward
    monkeypatch.setattr(lce, "outputs_backward", lambda *a, **k: used.append(1) or real(*a, **k))
    model = _model("llama", dtype)
    common = dict(num_router_layers=2, min_tokens_ratio=0.5, warmup_steps=0)
    ids, labels, mask = _batch()
    l_f, g_f, m_f = _run(model, CGGRModel(model, fused_head=True, head_options=opts, **common), ids, labels, mask)
    l_p, g_p, m_p = _run(model, CGGRModel(model, fused_head=False, **common), ids, labels, mask)
    assert len(used) == (head == "outputs")
    assert m_f["selected_indices"] == m_p["selected_indices"]
    assert abs(float(l_f) - float(l_p)) <= tol * abs(float(l_p)) + 1e-6, (float(l_f), float(l_p))
    flat_f = torch.cat([g.flatten() for g in g_f])
    flat_p = torch.cat([g.flatten() for g in g_p])
    assert torch.isfinite(flat_f).all()
    assert rel_err(flat_f, flat_p) <= tol, rel_err(flat_f, flat_p)
