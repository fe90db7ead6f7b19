"""cggr._dispatch.resolve_impl: the one place an op decides ``'torch'`` or ``'triton'`` (docs/design.md §6).

CPU only: ``TRITON_INTERPRET=1`` makes CPU tensors count as CUDA ones for ops whose Triton path the interpreter
runs, which is how the Triton branches are reached here; ``triton_importable`` is patched so that the checks do not
depend on whether triton is installed. No kernel runs.
"""

from __future__ import annotations

import pytest
import torch

from cggr import _dispatch
from cggr._dispatch import TRITON_DTYPES, resolve_impl

HALF = (torch.bfloat16, torch.float16)


@pytest.fixture
def triton_present(monkeypatch):
    monkeypatch.setattr(_dispatch, "triton_importable", lambda: True)
    monkeypatch.delenv("CGGR_IMPL", raising=False)


def test_auto_on_cpu_is_torch_and_explicit_triton_raises_naming_op_and_device(triton_present, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.zeros(3, dtype=torch.float16)
    assert resolve_impl("auto", x, op="f") == "torch"
    assert resolve_impl("torch", x, op="f") == "torch"
    with pytest.raises(RuntimeError, match=r"^f\(impl='triton'\) needs CUDA tensors, got a tensor on cpu$"):
        resolve_impl("triton", x, op="f")


def test_dtypes_keyword_is_the_ops_kernel_dtypes(triton_present, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # CPU tensors count as CUDA for an interpretable op
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        x = torch.zeros(2, 3, dtype=dtype)
        default = "triton" if dtype in TRITON_DTYPES else "torch"
        assert resolve_impl("auto", x, op="f") == default
        assert resolve_impl("auto", x, op="f", dtypes=HALF) == ("triton" if dtype in HALF else "torch")
        if dtype in HALF:
            assert resolve_impl("triton", x, op="f", dtypes=HALF) == "triton"
        else:
            with pytest.raises(TypeError, match=rf"^moe\(impl='triton'\) supports bfloat16 and float16, got {dtype}$"):
                resolve_impl("triton", x, op="moe", dtypes=HALF)
    assert (torch.float16, torch.bfloat16, torch.float32) == TRITON_DTYPES  # scoring and linear_ce keep theirs
    with pytest.raises(TypeError, match=r"supports float16, bfloat16 and float32, got torch.float64"):
        resolve_impl("triton", torch.zeros(1, dtype=torch.float64), op="f")
    with pytest.raises(TypeError, match=r"supports bfloat16, got torch.float16"):
        resolve_impl("triton", torch.zeros(1, dtype=torch.float16), op="f", dtypes=(torch.bfloat16,))


def test_non_interpretable_op_keeps_cpu_tensors_on_torch_under_the_interpreter(triton_present, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = torch.zeros(4, dtype=torch.bfloat16)
    assert resolve_impl("auto", x, op="f", interpretable=False) == "torch"
    with pytest.raises(RuntimeError, match=r"f\(impl='triton'\) needs CUDA tensors, got a tensor on cpu"):
        resolve_impl("triton", x, op="f", interpretable=False)
    assert resolve_impl("triton", x, op="f") == "triton"  # the default: interpretable


def test_env_override_missing_triton_and_bad_impl(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = torch.zeros(2, dtype=torch.float16)
    monkeypatch.setattr(_dispatch, "triton_importable", lambda: False)
    monkeypatch.delenv("CGGR_IMPL", raising=False)
    assert resolve_impl("auto", x, op="f") == "torch"
    with pytest.raises(RuntimeError, match=r"f\(impl='triton'\) needs the 'triton' package"):
        resolve_impl("triton", x, op="f")
    monkeypatch.setenv("CGGR_IMPL", " Torch ")
    assert resolve_impl("triton", x, op="f") == "torch"
    for bad in ("cuda", None, "TRITON"):
        with pytest.raises(ValueError, match=r"impl must be one of 'auto', 'torch', 'triton', got"):
            resolve_impl(bad, x, op="f")
