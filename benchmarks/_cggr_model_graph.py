"""Whole-step CUDA-graph capture for ``bench_cggr_model.py --cuda-graph`` (PyTorch's "whole-network capture").

Recipe (one graph per arm and shape; docs/cuda_graphs.md shows it for users):

1. a static input tensor, allocated once (every later batch is ``copy_``-ed into it);
2. a few warm-up calls on a side stream (Triton compilation, cuBLAS workspaces, the optimizer's state);
3. ``optimizer.zero_grad(set_to_none=True)``, then one call captured with ``torch.cuda.graph``: its ``.grad``
   tensors and every temporary come from the graph's memory pool, and the optimizer step (fused AdamW with
   ``capturable=True``: step counter and bias corrections on the device) is part of the graph;
4. each timed step = copy of the batch into the static input + ``graph.replay()``.

Graphs of one shape share a memory pool: they are replayed one at a time, and no graph reads another's
temporaries (parameters, optimizer state, static inputs and the curriculum buffers live outside the pool), so the
pool holds the largest step's working set instead of the sum of all of them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


class GraphedCall:
    """``fn(static_input)`` captured in a CUDA graph; ``call(x)`` copies ``x`` into the static input and replays.

    Args:
        fn: The work to capture, ``fn(x) -> outputs`` (kept alive as ``self.outputs``, overwritten by each replay).
        example: A tensor of the shape and dtype every later input has (its values are the warm-up input).
        warmup: Eager calls on a side stream before the capture (they run for real: a training step updates the
            parameters).
        pool: Memory-pool handle shared with other graphs (``torch.cuda.graph_pool_handle()``) or ``None``.
        before_each: Called before every warm-up call and before the capture (e.g. ``zero_grad(set_to_none=True)``).
    """

    def __init__(
        self,
        fn: Callable[[Tensor], Any],
        example: Tensor,
        *,
        warmup: int = 3,
        pool: Any = None,
        before_each: Callable[[], None] | None = None,
    ) -> None:
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 (the capture needs warmed-up kernels), got {warmup}")
        self.static_input = example.clone()
        # the warm-up allocates from the ordinary caching allocator: hand back what earlier warm-ups left cached
        # (next to a large graph pool, e.g. the standard step at (32, 2048), the cache alone can exhaust the GPU)
        torch.cuda.empty_cache()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                if before_each is not None:
                    before_each()
                fn(self.static_input)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # the warm-up's cached blocks: the capture allocates from the graph's own pool
        if before_each is not None:
            before_each()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.outputs = fn(self.static_input)
        torch.cuda.synchronize()

    def __call__(self, x: Tensor) -> Any:
        """Copy ``x`` into the static input, replay; returns the (static) outputs."""
        self.static_input.copy_(x)
        self.graph.replay()
        return self.outputs

    def replay(self) -> Any:
        """Replay on the static input as it is (no copy: e.g. the scoring row, whose input is the router's logits)."""
        self.graph.replay()
        return self.outputs


def graphed_train_step(
    forward: Callable[[Tensor], Tensor],
    optimizer: torch.optim.Optimizer,
    example: Tensor,
    *,
    warmup: int = 3,
    pool: Any = None,
) -> GraphedCall:
    """One training step (loss = forward(x), backward, optimizer step) captured whole; returns its replayer.

    The optimizer must be capturable (``capturable=True``). Gradients are not accumulated across replays: they
    are set to ``None`` before the capture, so the captured backward writes (not adds) them.
    """

    def body(x: Tensor) -> Tensor:
        loss = forward(x)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return GraphedCall(
        body, example, warmup=warmup, pool=pool, before_each=lambda: optimizer.zero_grad(set_to_none=True)
    )


def graphed_no_grad(fn: Callable[[Tensor], Any], example: Tensor, *, warmup: int = 2, pool: Any = None) -> GraphedCall:
    """``fn`` under ``torch.no_grad()`` captured (the breakdown rows: router forward, scoring)."""

    def body(x: Tensor) -> Any:
        with torch.no_grad():
            return fn(x)

    return GraphedCall(body, example, warmup=warmup, pool=pool)


__all__ = ["GraphedCall", "graphed_no_grad", "graphed_train_step"]
