"""The linear cross-entropy kernels' modes and defaults, without Triton.

The op (:mod:`cggr.linear_ce`) validates its options against these and the kernels check their arguments against
the same tuples; this module imports nothing, so the op can import it on a machine without Triton (the kernel
modules themselves import Triton at the top and are imported only inside the dispatching functions).
"""

from __future__ import annotations

#: Default bound on the logits workspace of the chunked kernel (bytes).
DEFAULT_WORKSPACE_BYTES = 256 * 1024 * 1024
#: Where the chunked kernel's logits chunks live (``LinearCrossEntropyOptions.workspace``).
WORKSPACES = ("buffer", "outputs")
#: How the fused kernels sum the gradient outputs over tiles (``LinearCrossEntropyOptions.accumulate`` once
#: ``'auto'`` is resolved; error models in :mod:`cggr.kernels.linear_cross_entropy_fused`).
ACCUMULATE_MODES = ("native", "atomic", "fp32_hidden", "fp32")


def check_accumulate(accumulate: str) -> None:
    """Raise ``ValueError`` unless ``accumulate`` is one of :data:`ACCUMULATE_MODES` (a kernel's own check)."""
    if accumulate not in ACCUMULATE_MODES:
        raise ValueError(f"accumulate must be one of {ACCUMULATE_MODES}, got {accumulate!r}")
