"""CUDA: CGGRModel around a PEFT LoRA model. Auto mode takes the fused head (Triton) through the base model, past
the PeftModel, and must equal the unfused path (PeftModel.forward, (k, T, V) logits) in loss and LoRA gradients;
a LoRA head or a prompt-learning adapter keeps the logits path."""

from __future__ import annotations

import warnings

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from cggr import CGGRModel  # noqa: E402
from tests.reference import rel_err  # noqa: E402
from tests.test_model_fused_head import _count_fused_calls  # noqa: E402

# prefix tuning: peft 0.21 passes past_key_values, which transformers 5.24 deprecates (their code, not cggr's)
pytestmark = [pytest.mark.cuda, pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")]

VOCAB = 1001


def _peft_model(dtype: torch.dtype, targets=("q_proj", "v_proj", "up_proj", "down_proj")):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg).to("cuda", dtype)
    lora = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=list(targets), init_lora_weights=False)
    return peft.get_peft_model(model, lora)


def _batch(b: int = 6, t: int = 37):
    g = torch.Generator(device="cuda").manual_seed(b * t)
    ids = torch.randint(3, VOCAB, (b, t), device="cuda", generator=g)
    labels = ids.clone()
    labels[1, :9] = -100
    mask = torch.ones_like(ids)
    mask[0, 25:] = 0
    mask[4, 17:] = 0
    labels[mask == 0] = -100
    return ids, labels, mask


def _run(peft_model, wrapper, ids, labels, mask):
    peft_model.zero_grad(set_to_none=True)
    out = wrapper(ids, labels=labels, attention_mask=mask)
    out.loss.backward()
    grads = {n: p.grad.float().clone() for n, p in peft_model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float32, 1e-4)])
@pytest.mark.parametrize("token_ratio", [None, 0.3])
def test_lora_fused_head_matches_the_peft_forward_cuda(dtype, tol, token_ratio, monkeypatch):
    calls = _count_fused_calls(monkeypatch)
    peft_model = _peft_model(dtype)
    lora = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    common = dict(num_router_layers=2, min_tokens_ratio=0.5, warmup_steps=0, token_ratio=token_ratio)
    ids, labels, mask = _batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "fused head off" warning for LoRA
        out_f, g_f = _run(peft_model, CGGRModel(peft_model, fused_head=None, **common), ids, labels, mask)
    assert calls[0] == 1 and out_f.logits is None  # auto: the fused head on CUDA
    out_p, g_p = _run(peft_model, CGGRModel(peft_model, fused_head=False, **common), ids, labels, mask)
    assert calls[0] == 1 and out_p.logits is not None
    assert set(g_f) == set(g_p) == lora  # only the adapters get gradients
    l_f, l_p = float(out_f.loss), float(out_p.loss)
    assert abs(l_f - l_p) <= tol * abs(l_p) + 1e-6, (l_f, l_p)
    flat_f = torch.cat([g_f[n].flatten() for n in sorted(lora)])
    flat_p = torch.cat([g_p[n].flatten() for n in sorted(lora)])
    assert torch.isfinite(flat_f).all() and flat_p.norm() > 0
    assert rel_err(flat_f, flat_p) <= tol, rel_err(flat_f, flat_p)


def test_lora_head_and_prefix_tuning_keep_the_logits_path_cuda():
    """A LoRA lm_head is not a plain nn.Linear (the fused head would drop its adapter): auto mode takes the logits
    path. Prefix tuning lives in PeftModel.forward: auto mode warns once and takes the logits path, which trains
    the prefix."""
    peft_model = _peft_model(torch.float32, targets=("q_proj", "lm_head"))
    ids, labels, mask = _batch()
    out, grads = _run(peft_model, CGGRModel(peft_model, num_router_layers=2, min_tokens_ratio=0.5, warmup_steps=0),
                      ids, labels, mask)
    assert out.logits is not None and any("lm_head.lora_B" in n for n in grads)

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    prefix = peft.get_peft_model(transformers.LlamaForCausalLM(cfg).cuda(),
                                 peft.PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"))
    with pytest.warns(UserWarning, match="prompt-learning"):
        cm = CGGRModel(prefix, num_router_layers=2, min_tokens_ratio=0.5, warmup_steps=0)
    with pytest.warns(UserWarning, match="fused head off"):
        out, grads = _run(prefix, cm, ids, labels, mask)
    assert out.logits is not None and grads and all(g.abs().sum() > 0 for g in grads.values())
