"""``linear_cross_entropy(..., row_weights=)`` on the Triton kernels, on the CPU through the Triton interpreter.

Every Triton path that applies the per-row weights: the chunked kernel with its gradients in the forward (ratio 1),
its selected-rows backward (ratio < 1), its 'outputs' workspace (forced several chunks), and the fused kernel with
each backward schedule (tiled, split, split_fwd), against an fp64 reference with materialised logits
(Σ_kept w_n · nll_n / K, or the sum). fp32 (tolerance 1e-5, as the other interpreter tests); bf16 and fp16 run on
the GPU (tests/gpu/test_selection_rules_gpu.py). Skipped without triton; run in a fresh process when triton was
imported before the interpreter could be switched on (tests/_interpret.py).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests._interpret import import_triton, interpreter_env, is_interpreted, module_hooks

with interpreter_env():  # only this module's tests run interpreted (fixture below)
    import_triton()
    from cggr.kernels import linear_cross_entropy as lce
    from cggr.kernels import linear_cross_entropy_fused as fz
    from cggr.kernels import linear_cross_entropy_fused_split as sp

INTERPRETED = is_interpreted(lce._ce_rows_kernel, fz._bwd_kernel, sp._bwd_dh_kernel)
needs_interp, _interpret_env, test_in_fresh_process = module_hooks(INTERPRETED, __file__)

from cggr.functional import LinearCrossEntropyOptions, linear_cross_entropy  # noqa: E402
from tests.reference import lce_inputs, rel_err  # noqa: E402

PATHS = {
    "chunked": LinearCrossEntropyOptions(kernel="chunked"),
    "chunked-outputs": LinearCrossEntropyOptions(kernel="chunked", workspace="outputs"),
    "fused-tiled": LinearCrossEntropyOptions(kernel="fused", bwd="tiled"),
    "fused-split": LinearCrossEntropyOptions(kernel="fused", bwd="split"),
    "fused-split_fwd": LinearCrossEntropyOptions(kernel="fused", bwd="split_fwd"),
}


@needs_interp
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("ratio,reduction", [(1.0, "mean"), (1.0, "sum"), (0.4, "mean")])
def test_row_weights_match_fp64(path, ratio, reduction, monkeypatch):
    monkeypatch.setattr(lce, "OUTPUTS_TAIL_BYTES", 0)  # the 'outputs' workspace in several vocabulary chunks
    hidden, weight, b, t = lce_inputs((3, 13), 24, 101, torch.float32, seed=11, bias=True)
    rw = torch.rand(3, 13, generator=torch.Generator().manual_seed(2)) * 3
    loss, info = linear_cross_entropy(hidden, weight, t, bias=b, ratio=ratio, reduction=reduction, impl="triton",
                                      row_weights=rw, return_info=True, options=PATHS[path])
    loss.backward()
    got = [hidden.grad, weight.grad, b.grad]
    h64, w64, b64 = (x.detach().double().requires_grad_() for x in (hidden, weight, b))
    nll = F.cross_entropy((h64 @ w64.t() + b64).reshape(-1, 101), t.reshape(-1).clamp(min=0), reduction="none")
    keep = info.mask.reshape(-1).double()
    ref = (nll * keep * rw.reshape(-1).double()).sum() / (keep.sum() if reduction == "mean" else 1.0)
    ref.backward()
    assert abs(float(loss.detach()) - float(ref.detach())) <= 1e-5 * max(1.0, abs(float(ref.detach())))
    for a, c in zip(got, (h64.grad, w64.grad, b64.grad), strict=True):
        assert rel_err(a, c) <= 1e-5, (path, rel_err(a, c))
