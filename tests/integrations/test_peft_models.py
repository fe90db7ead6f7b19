"""cggr.integrations.peft_models without importing peft: whether a model is a PeftModel is a lookup, not an import."""

from __future__ import annotations

import builtins
import sys

import pytest
import torch

pytest.importorskip("transformers")

from cggr import CGGRModel
from cggr.integrations.peft_models import is_peft_model
from tests.tiny_models import tiny_llama


def test_forwards_never_try_to_import_peft(monkeypatch):
    """Every CGGRModel forward with the fused head asks whether the model is a PEFT one (prompt-learning adapters
    must not be skipped). That question imported peft each time (a search of the import path on every forward where
    peft is not installed); it is now answered from sys.modules: no import is attempted."""
    attempts = []
    real_import = builtins.__import__

    def counting_import(name, *args, **kwargs):
        if name == "peft" or name.startswith("peft."):
            attempts.append(name)
        return real_import(name, *args, **kwargs)

    cm = CGGRModel(tiny_llama(96), num_router_layers=1, fused_head=True, warmup_steps=0, min_tokens_ratio=0.5)
    ids = torch.randint(0, 96, (4, 12), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(builtins, "__import__", counting_import)
    for _ in range(3):
        cm(input_ids=ids, labels=ids).loss.backward()
    assert attempts == []


def test_is_peft_model_reads_sys_modules(monkeypatch):
    class PeftModel(torch.nn.Module):  # stands in for peft.PeftModel
        pass

    class FakePeft:
        pass

    FakePeft.PeftModel = PeftModel
    wrapped, plain = PeftModel(), torch.nn.Linear(2, 2)
    monkeypatch.setitem(sys.modules, "peft", None)  # peft not importable: nothing is a PEFT model
    assert not is_peft_model(wrapped) and not is_peft_model(plain)
    monkeypatch.setitem(sys.modules, "peft", FakePeft)
    assert is_peft_model(wrapped) and not is_peft_model(plain)
