"""cggr._autocast.autocast_dtype against what torch.autocast itself does to nn.Linear."""

from __future__ import annotations

import pytest
import torch

from cggr._autocast import autocast_dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("enabled", [True, False])
def test_matches_the_dtype_autocast_gives_nn_linear(dtype, enabled):
    lin = torch.nn.Linear(4, 3).to(dtype)
    x = torch.randn(2, 4).to(dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
        want = lin(x).dtype
        got = autocast_dtype(x)
    assert (got or dtype) == want  # None: the op runs in x's own dtype


def test_integer_tensors_are_never_cast():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert autocast_dtype(torch.ones(2, dtype=torch.long)) is None
