"""``LinearCrossEntropyOptions`` checks of the fused kernel's knobs (no triton needed: runs in CI)."""

from __future__ import annotations

import pytest

from cggr.functional import LinearCrossEntropyOptions


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
