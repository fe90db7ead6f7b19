"""Attention-backend helpers on CPU: backend choice, errors for unusable backends, the seed's import path."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import cggr_flash  # noqa: E402
from cggr import create_truncated_router  # noqa: E402
from cggr.flash import enable_flash_attention, get_flash_attention_info, load_model_with_flash_attention  # noqa: E402
from tests.test_router import build_model  # noqa: E402


def test_shim_reexports_the_same_functions():
    assert cggr_flash.enable_flash_attention is enable_flash_attention
    assert cggr_flash.load_model_with_flash_attention is load_model_with_flash_attention
    assert cggr_flash.get_flash_attention_info is get_flash_attention_info


def test_info_is_consistent():
    info = get_flash_attention_info()
    assert info["cuda_available"] == torch.cuda.is_available()
    assert info["sdpa_available"]
    assert info["recommended_backend"] in ("flash_attention_2", "sdpa", "eager")
    if not info["flash_attn_available"]:
        assert info["flash_attn_version"] is None and info["recommended_backend"] == "sdpa"


def test_enable_switches_through_transformers_and_router_follows():
    model = build_model("llama")
    router = create_truncated_router(model, 3)
    ids = torch.randint(3, 90, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    assert enable_flash_attention(model, "eager") is model
    assert model.config._attn_implementation == "eager"
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits
    assert (router(ids, attention_mask=mask) - full)[mask.bool()].abs().max() <= 1e-5
    enable_flash_attention(model, "auto")  # CPU: flash-attn unusable -> sdpa
    assert model.config._attn_implementation == "sdpa"


def test_unusable_or_unknown_backend_raises():
    model = build_model("gpt2")
    with pytest.raises(ValueError, match="flash_attention_2"):
        enable_flash_attention(model, "flash_attention_2")  # CPU / fp32 / maybe not installed: always unusable here
    with pytest.raises(ValueError, match="backend must be one of"):
        enable_flash_attention(model, "flash3")
    with pytest.raises(TypeError, match="set_attn_implementation"):
        enable_flash_attention(torch.nn.Linear(2, 2))


def test_model_that_cannot_switch_raises_when_explicit():
    model = build_model("falcon")  # Falcon cannot change its implementation after loading
    before = model.config._attn_implementation
    enable_flash_attention(model, "auto")  # auto keeps what the model has
    assert model.config._attn_implementation == before
    with pytest.raises(ValueError, match="cannot switch"):
        enable_flash_attention(model, "eager")


def test_load_with_flash_attention_from_local_folder(tmp_path):
    build_model("qwen2").save_pretrained(tmp_path)
    model = load_model_with_flash_attention(str(tmp_path), backend="eager")
    assert model.config._attn_implementation == "eager"
    model = load_model_with_flash_attention(str(tmp_path))
    assert model.config._attn_implementation == (
        "sdpa" if not torch.cuda.is_available() else model.config._attn_implementation
    )
    with pytest.raises(ValueError, match="flash_attention_2"):
        load_model_with_flash_attention(str(tmp_path), backend="flash_attention_2", dtype=torch.float32)
