"""``LinearCrossEntropyOptions`` checks of the fused kernel's knobs (no triton needed: runs in CI)."""

from __future__ import annotations

import pytest
import torch

from cggr import functional
from cggr.functional import LinearCrossEntropyOptions
from cggr.linear_ce import options as linear_ce_options


def test_bwd_choices_and_default():
    assert LinearCrossEntropyOptions().bwd == "tiled"
    assert LinearCrossEntropyOptions(kernel="fused", bwd="split").bwd == "split"
    assert LinearCrossEntropyOptions(kernel="fused", bwd="split_fwd", accumulate="fp32_hidden").bwd == "split_fwd"
    with pytest.raises(ValueError, match="bwd"):
        LinearCrossEntropyOptions(kernel="fused", bwd="splitted")


def test_fused_only_knobs_refused_with_the_chunked_kernel():
    for kw in (dict(bwd="split"), dict(bwd="split_fwd"), dict(accumulate="fp32"), dict(filter_eps=1e-3)):
        with pytest.raises(ValueError, match="kernel='fused'"):
            LinearCrossEntropyOptions(kernel="chunked", **kw)


def test_accumulate_default_is_auto_and_accepted_with_either_kernel():
    assert LinearCrossEntropyOptions().accumulate == "auto"
    assert LinearCrossEntropyOptions(kernel="chunked", accumulate="native").accumulate == "native"  # as before
    with pytest.raises(ValueError, match="accumulate"):
        LinearCrossEntropyOptions(kernel="fused", accumulate="atomics")


@pytest.mark.parametrize(
    "device,dtype,capability,triton,want",
    [
        ("cuda", torch.bfloat16, (9, 0), (3, 6), "atomic"),
        ("cuda", torch.float16, (10, 0), (3, 9), "atomic"),
        ("cuda", torch.bfloat16, (8, 0), (3, 6), "native"),  # no bf16 atomics before Hopper
        ("cuda", torch.bfloat16, (9, 0), (3, 5), "native"),  # a Triton not verified with bf16 atomic_add
        ("cuda", torch.bfloat16, (9, 0), None, "native"),  # no triton at all
        ("cuda", torch.float32, (9, 0), (3, 6), "native"),  # fp32 accumulates in fp32 anyway
        ("cpu", torch.bfloat16, (9, 0), (3, 6), "native"),
    ],
)
def test_resolve_accumulate_auto(monkeypatch, device, dtype, capability, triton, want):
    monkeypatch.setattr(linear_ce_options, "_triton_version", lambda: triton)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert functional.resolve_accumulate("auto", torch.device(device), dtype) == want
    for explicit in functional.ACCUMULATE_MODES:  # an explicit choice is never overridden
        assert functional.resolve_accumulate(explicit, torch.device(device), dtype) == explicit
    with pytest.raises(ValueError, match="accumulate"):
        functional.resolve_accumulate("fast", torch.device(device), dtype)
