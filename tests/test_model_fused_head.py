"""CGGRModel's fused head (cggr.functional.linear_cross_entropy from the final hidden states) against its
unfused path (materialised logits + cross-entropy), which is itself checked against HF in tests/test_model.py."""

from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import cggr._fused_head as fused_head_module  # noqa: E402  (CGGRModel's fused head calls linear_cross_entropy here)
from cggr import CGGRModel  # noqa: E402
from cggr.integrations.hf_quirks import head_spec  # noqa: E402
from tests.test_router import _LLAMA, V, build_model  # noqa: E402

FAMILIES = ["llama", "gemma2", "gemma3", "gptj", "gpt2", "qwen3", "phi3"]
# Both paths return an fp32 loss and the unfused one casts the logits to fp32 (as HF's loss does), so fp64
# models agree to fp32 rounding of the loss and of the softmax in the gradients, not to fp64 precision.
TOL64 = 2e-6


def _extra_model(name: str) -> torch.nn.Module:
    """Causal LMs with a logit scale (Cohere: multiply, Granite: divide), tiny random weights."""
    torch.manual_seed(0)
    if name == "cohere":
        cfg = transformers.CohereConfig(vocab_size=V, logit_scale=0.5, **_LLAMA)
        cls = transformers.CohereForCausalLM
    else:
        cfg = transformers.GraniteConfig(vocab_size=V, logits_scaling=4.0, **_LLAMA)
        cls = transformers.GraniteForCausalLM
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(cfg).eval()


def _batch(seed: int, b: int = 5, t: int = 11):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (b, t), generator=g)
    labels = ids.clone()
    labels[1, :4] = -100
    labels[3, 5:8] = -100
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0  # right padding
    mask[4, 6:] = 0  # (heavier padding makes HF's eager Gemma2 attention NaN in fp64, both paths alike)
    return ids, labels, mask


def _loss_and_grads(model, wrapper, ids, labels, mask):
    model.zero_grad(set_to_none=True)
    loss = wrapper(ids, labels=labels, attention_mask=mask).loss
    loss.backward()
    grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
    return loss.detach(), grads, wrapper.get_metrics()


def _count_fused_calls(monkeypatch) -> list[int]:
    calls = [0]
    real = fused_head_module.linear_cross_entropy

    def counting(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(fused_head_module, "linear_cross_entropy", counting)
    return calls


def _compare(model, monkeypatch, token_ratio, dtype, tol, batch_seed=0, **kw):
    model = model.to(dtype)
    calls = _count_fused_calls(monkeypatch)
    common = dict(num_router_layers=2, min_tokens_ratio=0.6, warmup_steps=0, token_ratio=token_ratio, impl="torch")
    common.update(kw)
    fused = CGGRModel(model, fused_head=True, **common)
    plain = CGGRModel(model, fused_head=False, **common)
    ids, labels, mask = _batch(batch_seed)
    l_f, g_f, m_f = _loss_and_grads(model, fused, ids, labels, mask)
    assert calls[0] == 1
    l_p, g_p, m_p = _loss_and_grads(model, plain, ids, labels, mask)
    assert calls[0] == 1  # the unfused path never calls it
    assert m_f["selected_indices"] == m_p["selected_indices"]
    assert m_f["tokens_selected"] == m_p["tokens_selected"]
    assert m_f["sequences_selected"] < ids.shape[0]  # the batch split is active
    assert l_f.dtype == torch.float32 and torch.isfinite(l_f)
    torch.testing.assert_close(l_f, l_p, rtol=tol, atol=tol)
    n_nonzero = 0
    for (pname, _), a, b in zip(model.named_parameters(), g_f, g_p, strict=True):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m, n=pname: f"{n}: {m}")
        n_nonzero += int(b.abs().sum() > 0)
    assert n_nonzero > 2


@pytest.mark.parametrize("token_ratio", [None, 0.4])
@pytest.mark.parametrize("name", FAMILIES)
def test_fused_equals_unfused_fp64(name, token_ratio, monkeypatch):
    _compare(build_model(name), monkeypatch, token_ratio, torch.float64, TOL64)


@pytest.mark.parametrize("name", ["cohere", "granite"])
def test_fused_logit_scale_fp64(name, monkeypatch):
    _compare(_extra_model(name), monkeypatch, 0.5, torch.float64, TOL64)


@pytest.mark.parametrize("name", ["gemma2", "gptj"])
def test_fused_equals_unfused_fp32(name, monkeypatch):
    _compare(build_model(name), monkeypatch, None, torch.float32, 2e-5)


def test_fused_random_selection_and_every_sequence(monkeypatch):
    model = build_model("llama")
    _compare(model, monkeypatch, 0.3, torch.float64, TOL64, selection="random", seed=7, batch_seed=3)
    monkeypatch.undo()
    _compare(model, monkeypatch, 0.25, torch.float64, TOL64, min_tokens_ratio=0.6, scoring="entropy", batch_seed=4)


def test_fused_nothing_valid_and_single_position():
    model = build_model("gpt2").double()
    fused = CGGRModel(model, num_router_layers=2, min_tokens_ratio=1.0, fused_head=True, impl="torch")
    ids = torch.randint(3, V, (3, 6))
    loss = fused(ids, labels=torch.full_like(ids, -100)).loss
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    for t in (1, 2):  # T = 1: nothing to predict
        ids = torch.randint(3, V, (2, t))
        plain = CGGRModel(model, num_router_layers=2, min_tokens_ratio=1.0, fused_head=False, impl="torch")
        torch.testing.assert_close(fused(ids, labels=ids).loss, plain(ids, labels=ids).loss, rtol=TOL64, atol=TOL64)
    tr = CGGRModel(model, num_router_layers=2, min_tokens_ratio=1.0, token_ratio=0.5, fused_head=True, impl="torch")
    assert tr(ids[:, :1], labels=ids[:, :1]).loss.item() == 0.0


def test_fused_head_masked_lm_raises():
    with pytest.raises(ValueError, match=r"fused_head=True.*masked LM"):
        CGGRModel(build_model("bert"), num_router_layers=2, fused_head=True)
    with pytest.raises(ValueError, match=r"fused_head=True.*masked LM"):
        CGGRModel(build_model("llama"), num_router_layers=2, fused_head=True, causal=False)
    with pytest.raises(TypeError, match="fused_head"):
        CGGRModel(build_model("llama"), num_router_layers=2, fused_head="yes")


def test_fused_head_refuses_wrappers():
    model = build_model("llama")
    for wrapped, what in ((torch.nn.DataParallel(model), "DataParallel"), (torch.compile(model), "compile")):
        with pytest.raises(ValueError, match=what):
            CGGRModel(wrapped, num_router_layers=2, fused_head=True)
        assert CGGRModel(wrapped, num_router_layers=2)._fused_parts()[0] is None


def test_fused_head_auto_is_off_on_cpu(monkeypatch):
    calls = _count_fused_calls(monkeypatch)
    model = build_model("llama")
    auto = CGGRModel(model, num_router_layers=2, min_tokens_ratio=0.5, warmup_steps=0)
    assert auto.fused_head is None
    ids, labels, mask = _batch(1)
    auto(ids, labels=labels, attention_mask=mask).loss.backward()
    assert calls[0] == 0
    assert auto._fused_parts()[0] is not None  # it would run on CUDA
    assert CGGRModel(build_model("bert"), num_router_layers=2)._fused_parts()[0] is None


def test_head_spec_quirks():
    spec, reason = head_spec(build_model("gemma2"))
    assert reason == "" and spec.softcap == 5.0 and spec.logit_scale is None and spec.bias is None
    assert head_spec(build_model("gemma3"))[0].softcap == 5.0  # model_type gemma3_text
    spec, _ = head_spec(build_model("gptj"))
    assert spec.bias is not None and spec.bias.shape == (V,) and spec.softcap is None
    assert head_spec(_extra_model("cohere"))[0].logit_scale == 0.5
    assert head_spec(_extra_model("granite"))[0].logit_scale == 0.25
    model = build_model("llama")
    model.config.final_logit_softcapping = 30.0  # an unverified quirk on an unknown head: refused
    spec, reason = head_spec(model)
    assert spec is None and "final_logit_softcapping" in reason
    with pytest.raises(ValueError, match="no verified entry"):
        CGGRModel(model, num_router_layers=2, fused_head=True)
    model = build_model("llama")
    model.config.model_type = "dory"
    assert "per-vocabulary" in head_spec(model)[1]


@pytest.mark.parametrize("token_ratio", [None, 0.4])
def test_compiled_fused_head_equals_eager_and_does_not_recompile(token_ratio):
    """torch.compile of CGGRModel with the fused head: the same loss and gradients, one compilation."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model = build_model("llama").train()
    wrapper = CGGRModel(model, num_router_layers=1, min_tokens_ratio=0.5, warmup_steps=0, fused_head=True,
                        token_ratio=token_ratio)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(wrapper, backend=counter)
    frames = []
    for seed in range(3):
        ids, labels, mask = _batch(seed)
        loss_c, grads_c, metrics_c = _loss_and_grads(model, compiled, ids, labels, mask)
        loss_e, grads_e, metrics_e = _loss_and_grads(model, wrapper, ids, labels, mask)
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-6, atol=1e-7)
        for gc, ge in zip(grads_c, grads_e):
            torch.testing.assert_close(gc, ge, rtol=1e-5, atol=1e-7)
        assert sorted(metrics_c["selected_indices"]) == sorted(metrics_e["selected_indices"])
        frames.append(counter.frame_count)
    assert frames[0] >= 1 and frames[-1] == frames[0], frames


def test_head_options_reach_the_fused_head(monkeypatch):
    from cggr.functional import LinearCrossEntropyOptions

    seen = []
    real = fused_head_module.linear_cross_entropy
    monkeypatch.setattr(fused_head_module, "linear_cross_entropy",
                        lambda *a, **k: seen.append(k["options"]) or real(*a, **k))
    model = build_model("llama").double()
    head = LinearCrossEntropyOptions(workspace_bytes=V * 8 * 3)  # torch path: 3 rows per chunk
    common = dict(num_router_layers=2, min_tokens_ratio=0.6, warmup_steps=0, impl="torch", fused_head=True)
    ids, labels, mask = _batch(4)
    l_a, g_a, _ = _loss_and_grads(model, CGGRModel(model, head_options=head, **common), ids, labels, mask)
    l_b, g_b, _ = _loss_and_grads(model, CGGRModel(model, **common), ids, labels, mask)
    assert seen == [head, None]
    torch.testing.assert_close(l_a, l_b, rtol=1e-12, atol=1e-12)
    for a, b in zip(g_a, g_b, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match=r"head_options.threshold_sensitivity=0.5 is a selection setting: CGGRModel"):
        CGGRModel(model, num_router_layers=2, head_options=LinearCrossEntropyOptions(threshold_sensitivity=0.5))
