"""CUDA checks for the router, the fused router scoring, CGGRModel and the attention-backend helpers."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from cggr import CGGRModel, create_truncated_router, enable_flash_attention, get_flash_attention_info  # noqa: E402
from cggr.functional import token_scores as fused_token_scores  # noqa: E402
from cggr.scoring import token_scores_torch  # noqa: E402

pytestmark = pytest.mark.cuda


def _llama(dtype=torch.float32, layers=3, vocab=1001):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg).to("cuda", dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,v", [(1, 7), (333, 1001), (4099, 4096)])
def test_token_scores_of_router_logits_triton_match_reference(dtype, n, v):
    g = torch.Generator(device="cuda").manual_seed(n + v)
    logits = (torch.randn(n, v, device="cuda", generator=g) * 3).to(dtype)
    targets = torch.randint(0, v, (n,), device="cuda", generator=g)
    targets[::5] = -100
    ref = token_scores_torch(logits, targets)
    got = fused_token_scores(logits, targets, impl="triton")
    for name in ("entropy", "confidence", "margin", "nll"):
        a, b = getattr(got, name), getattr(ref, name)
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), (name, (a - b).abs().max())
    assert torch.equal(got.valid, ref.valid)
    no_t = fused_token_scores(logits, None, impl="triton")
    assert no_t.nll is None and torch.allclose(no_t.entropy, ref.entropy, rtol=1e-5, atol=1e-5)


def test_router_exact_on_cuda_bf16():
    model = _llama(torch.bfloat16)
    ids = torch.randint(0, 1001, (3, 37), device="cuda")
    with torch.no_grad():
        full = model(input_ids=ids).logits
    assert torch.equal(create_truncated_router(model, 3)(ids), full)


def test_cggr_model_gradients_match_reference_on_cuda():
    model = _llama(torch.float32).train()
    for m in model.modules():
        m.training = True
    ids = torch.randint(0, 1001, (8, 33), device="cuda")
    labels = ids.clone()
    labels[2, :5] = -100
    mask = torch.ones_like(ids)
    mask[5, 20:] = 0
    cm = CGGRModel(model, num_router_layers=2, min_tokens_ratio=0.25, warmup_steps=0)
    loss = cm(ids, labels=labels, attention_mask=mask).loss
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    idx = cm._last["indices"]
    assert idx.shape == (2,)
    model.zero_grad(set_to_none=True)
    sel_labels = labels[idx].masked_fill(mask[idx] == 0, -100)
    ref = model(input_ids=ids[idx], attention_mask=mask[idx], labels=sel_labels).loss
    ref.backward()
    assert torch.allclose(loss, ref, rtol=1e-5, atol=1e-6)
    for g, p in zip(grads, model.parameters(), strict=True):
        assert torch.allclose(g, p.grad, rtol=1e-4, atol=1e-6)


class _TinyLM(torch.nn.Module):
    """logits = ids · w (no gathers, no data-dependent kernels): isolates CGGRModel's own operations."""

    def __init__(self, vocab):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(vocab, device="cuda") * 0.01)

    def forward(self, input_ids, attention_mask=None):
        from types import SimpleNamespace

        return SimpleNamespace(logits=input_ids.unsqueeze(-1).float() * self.w)


def test_cggr_model_own_ops_never_sync_the_host():
    vocab = 1001
    ids = torch.randint(0, vocab, (16, 64), device="cuda")
    labels = ids.clone()
    labels[3, :10] = -100
    mask = torch.ones_like(ids)
    mask[5, 40:] = 0
    router_logits = torch.randn(16, 64, vocab, device="cuda", dtype=torch.bfloat16)
    model = _TinyLM(vocab)
    for token_ratio in (None, 0.5):
        cm = CGGRModel(
            model, router=lambda x, **kw: router_logits, min_tokens_ratio=0.25, warmup_steps=0, token_ratio=token_ratio
        )
        cm(ids, labels=labels, attention_mask=mask).loss.backward()  # warm-up: compile the fused scoring
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            cm(ids, labels=labels, attention_mask=mask).loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_full_hf_cggr_step_sync_count():
    """With a real HF Llama, a CGGRModel step syncs the host no more than a standard step does."""
    model = _llama(torch.bfloat16).train()
    ids = torch.randint(0, 1001, (8, 64), device="cuda")
    cm = CGGRModel(model, num_router_layers=2, min_tokens_ratio=0.25, warmup_steps=0)
    cm(ids, labels=ids).loss.backward()
    std = model(input_ids=ids, labels=ids).loss
    std.backward()
    torch.cuda.synchronize()

    def first_sync(fn):
        """None, or the innermost frames (file:line function) of the first host sync in fn()."""
        import traceback

        torch.cuda.set_sync_debug_mode("error")
        try:
            fn()
        except RuntimeError as exc:
            if "synchroniz" not in str(exc).lower():
                raise
            frames = traceback.extract_tb(exc.__traceback__)
            return [f"{f.filename.split('site-packages/')[-1]}:{f.lineno} {f.name}" for f in frames][-6:]
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return None

    std_sync = first_sync(lambda: model(input_ids=ids, labels=ids).loss.backward())
    cggr_sync = first_sync(lambda: cm(ids, labels=ids).loss.backward())
    print("first host sync: standard", std_sync, "| cggr", cggr_sync)
    assert std_sync is not None or cggr_sync is None, cggr_sync


def test_flash_helpers_on_cuda():
    info = get_flash_attention_info()
    assert info["cuda_available"]
    model = _llama(torch.bfloat16)
    enable_flash_attention(model, "sdpa")
    assert model.config._attn_implementation == "sdpa"
    enable_flash_attention(model, "auto")
    expected = "flash_attention_2" if info["flash_attn_available"] else "sdpa"
    assert model.config._attn_implementation == expected
    if not info["flash_attn_available"]:
        with pytest.raises(ValueError, match="flash-attn"):
            enable_flash_attention(model, "flash_attention_2")
    fp32 = _llama(torch.float32)
    if info["flash_attn_available"]:
        with pytest.raises(ValueError, match="fp16 or bf16"):
            enable_flash_attention(fp32, "flash_attention_2")
