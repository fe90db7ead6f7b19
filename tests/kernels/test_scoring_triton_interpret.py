"""The Triton scoring kernel (:mod:`cggr.kernels.scoring`) on the CPU through the Triton interpreter.

Checks the one-pass row statistics against the PyTorch path (itself checked against fp64 in test_scoring.py) on
rows with -inf logits in the unmasked main loop and in the masked tail, and with NaN. Skipped without triton (CI);
see tests/_interpret.py for why the checks may run in a fresh process.
"""

from __future__ import annotations

import pytest
import torch

from tests._interpret import import_triton, interpreter_env, is_interpreted, module_hooks

with interpreter_env():  # see tests/_interpret.py
    import_triton()
    from cggr.kernels import scoring as ks

INTERPRETED = is_interpreted(ks._token_scores_kernel)
needs_interp, _interpret_env, test_in_fresh_process = module_hooks(INTERPRETED, __file__)

from cggr.functional import token_scores  # noqa: E402
from cggr.scoring import token_scores_torch as torch_token_scores  # noqa: E402

FIELDS = ("entropy", "confidence", "margin", "nll")


@needs_interp
@pytest.mark.parametrize("vocab", [37, 1000, 4099])
def test_minus_inf_logits_match_the_torch_path(vocab):
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    z = torch.randn(5, vocab, generator=g) * 3
    t = torch.randint(0, vocab - 9, (5,), generator=g)
    z[:, vocab - 7:] = float("-inf")  # padded vocabulary: the masked tail and, for long rows, the main loop
    z[1, : vocab - 9] = float("-inf")  # two allowed tokens
    t[1] = vocab - 8
    z[2, 1::2] = float("-inf")  # every other token masked
    t[2] = t[2] // 2 * 2
    z[3, 4] = float("nan")  # a broken row stays NaN
    t[4] = -100
    out = token_scores(z, t, impl="triton")
    ref = torch_token_scores(z, t)
    for name in FIELDS:
        a, b = getattr(out, name), getattr(ref, name)
        assert torch.isnan(a[3]) or name == "nll", name
        keep = torch.tensor([0, 1, 2, 4])
        assert torch.isfinite(a[keep]).all(), (name, a)
        torch.testing.assert_close(a[keep], b[keep], rtol=1e-5, atol=1e-5)
