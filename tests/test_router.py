"""TruncatedRouter against the full model and independently built k-layer models, on all 17 configurations.

Every model is a tiny random-weight model built from a config (no downloads), fp32, eval mode.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from cggr import CGGRModel, create_truncated_router  # noqa: E402
from cggr.router import TruncatedRouter, find_layer_path  # noqa: E402

V = 97
L = 3
_ATT = dict(
    hidden_size=32, intermediate_size=48, num_hidden_layers=L, num_attention_heads=4, max_position_embeddings=64
)
_LLAMA = dict(_ATT, num_key_value_heads=2)

# name -> (config class, model class, config kwargs)
CONFIGS: dict[str, tuple[str, str, dict]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", _LLAMA),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(_LLAMA, sliding_window=8)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", _LLAMA),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(_LLAMA, head_dim=8)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(_LLAMA, head_dim=8)),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        dict(_LLAMA, head_dim=8, sliding_window=8, final_logit_softcapping=5.0, attn_logit_softcapping=20.0),
    ),
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(_LLAMA, head_dim=8, sliding_window=8, final_logit_softcapping=5.0, sliding_window_pattern=2),
    ),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(_LLAMA, pad_token_id=0)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=32, n_layer=L, n_head=4, n_positions=64)),
    "gptj": ("GPTJConfig", "GPTJForCausalLM", dict(n_embd=32, n_layer=L, n_head=4, n_positions=64, rotary_dim=4)),
    "falcon": ("FalconConfig", "FalconForCausalLM", dict(hidden_size=32, num_hidden_layers=L, num_attention_heads=4)),
    "falcon_alibi": (
        "FalconConfig",
        "FalconForCausalLM",
        dict(hidden_size=32, num_hidden_layers=L, num_attention_heads=4, alibi=True),
    ),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", _ATT),
    "bert": ("BertConfig", "BertForMaskedLM", _ATT),
    "roberta": ("RobertaConfig", "RobertaForMaskedLM", dict(_ATT, max_position_embeddings=70, pad_token_id=1)),
    "mamba": (
        "MambaConfig",
        "MambaForCausalLM",
        dict(hidden_size=32, num_hidden_layers=L, state_size=4, conv_kernel=3),
    ),
    "mamba2": (
        "Mamba2Config",
        "Mamba2ForCausalLM",
        dict(
            hidden_size=32,
            num_hidden_layers=L,
            state_size=8,
            num_heads=8,
            head_dim=8,
            n_groups=1,
            conv_kernel=3,
            chunk_size=8,
        ),
    ),
}
ATTENTION_FAMILIES = [n for n in CONFIGS if not n.startswith("mamba")]


def make_config(name: str, num_layers: int = L):
    cfg_cls, _, kw = CONFIGS[name]
    cls = getattr(transformers, cfg_cls)
    cfg = cls(vocab_size=V, **kw)
    cfg.num_hidden_layers = num_layers
    if not isinstance(getattr(cls, "layer_types", None), property) and getattr(cfg, "layer_types", None):
        full = cls(vocab_size=V, **kw).layer_types
        cfg.layer_types = list(full[:num_layers])
    return cfg


def build_model(name: str, num_layers: int = L, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model_cls = getattr(transformers, CONFIGS[name][1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model_cls(make_config(name, num_layers)).eval()


def reference_k_layers(name: str, model: nn.Module, k: int) -> nn.Module:
    """An independently built k-layer model loaded with ``model``'s weights (layers >= k dropped)."""
    ref = build_model(name, num_layers=k, seed=123)
    res = ref.load_state_dict(model.state_dict(), strict=False)
    assert not res.missing_keys, res.missing_keys
    dropped = [f".{j}." for j in range(k, L)]
    assert res.unexpected_keys and all(any(d in key for d in dropped) for key in res.unexpected_keys)
    return ref


def _ids(gen_seed: int = 0, batch: int = 3, seq: int = 10) -> torch.Tensor:
    g = torch.Generator().manual_seed(gen_seed)
    return torch.randint(3, V, (batch, seq), generator=g)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_router_exact_at_full_depth_and_matches_independent_k_layer_model(name):
    model = build_model(name)
    ids = _ids(hash(name) % 1000)
    with torch.no_grad():
        full = model(input_ids=ids).logits
    router = create_truncated_router(model, num_layers=L)
    assert not router.passthrough and router.layers_used == L
    out = router(ids)
    assert out.shape == full.shape and not out.requires_grad
    assert (out - full).abs().max().item() <= 1e-5

    k = 2
    router_k = create_truncated_router(model, num_layers=k)
    assert router_k.layers_used == k
    ref = reference_k_layers(name, model, k)
    with torch.no_grad():
        expected = ref(input_ids=ids).logits
    got = router_k(ids)
    assert (got - expected).abs().max().item() <= 1e-5
    # and it is genuinely truncated: differs from the full model
    assert (got - full).abs().max().item() > 1e-4


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert", "falcon_alibi", "gemma2"])
def test_router_with_padding_matches_independent_model(name):
    model = build_model(name)
    ids = _ids(7, batch=3, seq=9)
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    mask[2, 4:] = 0
    router = create_truncated_router(model, 2)
    ref = reference_k_layers(name, model, 2)
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask).logits
    got = router(ids, attention_mask=mask)
    keep = mask.bool()
    assert (got - expected)[keep].abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", list(CONFIGS))
def test_no_parameter_duplicated(name):
    model = build_model(name)
    router = create_truncated_router(model, 2)
    assert list(router.parameters()) == [] and router.state_dict() == {}
    model_ptrs = {p.data_ptr() for p in model.parameters()} | {b.data_ptr() for b in model.buffers()}
    shell_tensors = list(router._shell.parameters()) + list(router._shell.buffers())
    assert shell_tensors and all(t.data_ptr() in model_ptrs for t in shell_tensors)
    cm = CGGRModel(model, router=router, warmup_steps=0)
    sd = cm.state_dict()
    assert set(sd) == {f"model.{k}" for k in model.state_dict()} | {"step_count", "rng_counter", "rng_seed"}
    ptrs = [p.data_ptr() for p in cm.parameters()]
    assert len(ptrs) == len(set(ptrs)) == len(list(model.parameters()))
    opt = torch.optim.AdamW(cm.parameters())
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_router_eval_does_not_leak_and_follows_model_mode():
    model = build_model("gpt2").train()
    router = create_truncated_router(model, 2)
    router.eval()
    assert model.training and all(m.training for m in model.modules())
    model.eval()
    router(_ids())
    assert not router._shell.training and not router._shell.transformer.training
    model.train()
    router(_ids())
    assert router._shell.training and router._shell.transformer.training
    router.to(torch.float64)  # owns nothing: the model's dtype is untouched
    assert next(model.parameters()).dtype == torch.float32


# Falcon cannot change its implementation after loading (transformers keeps the old one and warns).
@pytest.mark.parametrize("name", [n for n in ATTENTION_FAMILIES if not n.startswith("falcon")])
def test_still_exact_after_set_attn_implementation(name):
    model = build_model(name)
    router = create_truncated_router(model, L)
    ids = _ids(3)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    router(ids, attention_mask=mask)  # build and use the shell with the first implementation
    model.set_attn_implementation("eager")
    assert model.config._attn_implementation == "eager"
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits
    got = router(ids, attention_mask=mask)
    keep = mask.bool()
    assert (got - full)[keep].abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", list(CONFIGS))
def test_still_exact_after_resize_token_embeddings(name):
    model = build_model(name)
    router = create_truncated_router(model, L)
    ids = _ids(4)
    router(ids)
    model.resize_token_embeddings(V + 13)
    ids = ids.clone()
    ids[0, 0] = V + 5  # a new token
    with torch.no_grad():
        full = model(input_ids=ids).logits
    got = router(ids)
    assert got.shape[-1] == V + 13
    assert (got - full).abs().max().item() <= 1e-5


def test_unwraps_data_parallel_and_peft_like_wrappers():
    model = build_model("qwen2")
    ids = _ids(5)
    ref = reference_k_layers("qwen2", model, 2)
    with torch.no_grad():
        expected = ref(input_ids=ids).logits

    class PeftModelForCausalLM(nn.Module):  # the shape of peft's wrapper: get_base_model()
        def __init__(self, base):
            super().__init__()
            self.base_model = nn.ModuleDict({"model": base})

        def get_base_model(self):
            return self.base_model["model"]

    for wrapped in (nn.DataParallel(model), PeftModelForCausalLM(model)):
        router = create_truncated_router(wrapped, 2)
        assert router.model is model
        assert (router(ids) - expected).abs().max().item() <= 1e-5


def test_unknown_architecture_is_passthrough_with_warning():
    cfg = transformers.OPTConfig(
        vocab_size=V, hidden_size=16, ffn_dim=32, num_hidden_layers=2, num_attention_heads=2, word_embed_proj_dim=16
    )
    model = transformers.OPTForCausalLM(cfg).eval()
    assert find_layer_path(model) is None
    with pytest.warns(UserWarning, match="OPTForCausalLM"):
        router = create_truncated_router(model, 1)
    assert router.passthrough
    ids = _ids(6)
    with torch.no_grad():
        full = model(input_ids=ids).logits
    assert torch.equal(router(ids), full)


def test_bad_arguments():
    model = build_model("llama")
    with pytest.raises(ValueError, match="num_layers"):
        create_truncated_router(model, 0)
    with pytest.raises(TypeError, match="num_layers"):
        create_truncated_router(model, 2.0)
    with pytest.raises(TypeError, match="model"):
        TruncatedRouter("llama", 2)
    # more layers than the model has: the whole model
    router = create_truncated_router(model, 99)
    assert router.layers_used == L


@pytest.mark.parametrize("name", ["llama", "gemma3", "qwen3"])
def test_router_skips_packed_sequence_detection_like_a_standard_forward(name, monkeypatch):
    """transformers' packed-sequence check is a host sync on CUDA; the router must not trigger it more
    often than a plain training forward of the model does."""
    import transformers.masking_utils as mu

    calls = {"n": 0}
    original = mu.find_packed_sequence_indices

    def counting(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(mu, "find_packed_sequence_indices", counting)
    model = build_model(name).train()
    ids = _ids(8)
    model(input_ids=ids, labels=ids)
    standard = calls["n"]
    calls["n"] = 0
    create_truncated_router(model, 2)(ids)
    assert calls["n"] <= standard
