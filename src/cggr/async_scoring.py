"""Cheaper sequence scoring for :class:`cggr.CGGRModel`: stale scores by example index, and a side-stream scorer.

Shape legend: B batch, T sequence length, N examples in the dataset.

The router's no-grad forward over the scanned batch is what a ``CGGRModel`` step pays for choosing; on a
SmolLM-135M shape with a 4-layer router and a 4x scan it is roughly 40% of a step. Two ways to pay less, both
feeding ``CGGRModel.forward(..., sequence_scores=)`` so that the step itself runs no router:

* :class:`SequenceScoreCache` — reuse scores computed on an earlier step for the same examples (multi-epoch
  training, or a scan that re-visits examples): ``update(indices, scores)`` after a step that scored them
  (``CGGRModel.last_sequence_scores()``), ``lookup(indices)`` on a later one. The scores are as stale as the
  model was then; never-scored examples count as the hardest (+inf), so they are picked, trained on and scored.
* :class:`AsyncCGGRScorer` — score the NEXT batch on a side CUDA stream while the current step's backward runs
  (the original project's name). The next batch is scored with the weights of the current step, before its
  optimizer update (one step stale). Usage::

      scorer = AsyncCGGRScorer(cggr_model)
      scores = scorer.score(ids, labels)                     # the first batch, inline
      for step in range(steps):
          loss = cggr_model(ids, labels=labels, sequence_scores=scores).loss
          ids, labels = next_batch()
          scorer.prefetch(ids, labels)                       # side stream: overlaps the backward below
          loss.backward()
          scores = scorer.wait()                             # BEFORE optimizer.step(): weights are about to change
          optimizer.step(); optimizer.zero_grad(); cggr_model.step()

  Without CUDA (or with ``enabled=False``) ``prefetch`` scores synchronously: the same numbers, no overlap.
  Whether the overlap saves time depends on whether the GPU has idle resources during the backward (launch-bound
  small models: yes; compute-bound large batches: little); ``benchmarks/bench_async_scoring.py`` measures it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from cggr._validation import check_bool, check_int


class SequenceScoreCache:
    """Per-example sequence scores from earlier steps, looked up by example index.

    Args:
        num_examples: N; example indices are 0..N-1.
        device: Where the table lives (put it where the model is: lookups and updates are then device ops with
            no host synchronisation).
    """

    def __init__(self, num_examples: int, device: torch.device | str | None = None) -> None:
        self.num_examples = check_int("num_examples", num_examples, minimum=1)
        self.scores = torch.full((num_examples,), torch.inf, dtype=torch.float32, device=device)
        self.updated_at = torch.full((num_examples,), -1, dtype=torch.long, device=device)
        self._updates = torch.zeros((), dtype=torch.long, device=device)

    def _index(self, indices: Tensor) -> Tensor:
        if not isinstance(indices, Tensor) or indices.is_floating_point() or indices.dtype == torch.bool:
            got = indices.dtype if isinstance(indices, Tensor) else type(indices).__name__
            raise TypeError(f"indices must be an integer tensor of example indices, got {got}")
        if indices.dim() != 1:
            raise ValueError(f"indices must be 1-D (B,), got shape {tuple(indices.shape)}")
        if indices.device.type == "cpu" and indices.numel() and not torch.compiler.is_compiling():
            lo, hi = int(indices.min()), int(indices.max())
            if lo < 0 or hi >= self.num_examples:
                raise ValueError(f"indices must be in [0, {self.num_examples}), got values in [{lo}, {hi}]")
        return indices.to(self.scores.device, torch.long)

    def update(self, indices: Tensor, scores: Tensor) -> None:
        """Store (B,) ``scores`` for the examples ``indices`` (-inf scores, i.e. sequences without targets, too)."""
        idx = self._index(indices)
        if not isinstance(scores, Tensor) or tuple(scores.shape) != (idx.shape[0],):
            got = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
            raise ValueError(f"scores must have shape ({idx.shape[0]},) like indices, got {got}")
        self._updates.add_(1)
        self.scores.index_copy_(0, idx, scores.detach().to(self.scores))
        self.updated_at.index_copy_(0, idx, self._updates.expand(idx.shape[0]))

    def lookup(self, indices: Tensor) -> Tensor:
        """(B,) fp32 scores of these examples (+inf for never-scored ones: they count as the hardest)."""
        return self.scores.index_select(0, self._index(indices))

    def age(self, indices: Tensor) -> Tensor:
        """(B,) updates since each example was last scored (-1: never)."""
        at = self.updated_at.index_select(0, self._index(indices))
        return torch.where(at >= 0, self._updates - at, -1)

    def state_dict(self) -> dict[str, Tensor]:
        return {"scores": self.scores, "updated_at": self.updated_at, "updates": self._updates}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if tuple(state["scores"].shape) != (self.num_examples,):
            raise ValueError(f"state holds {tuple(state['scores'].shape)} scores, this cache {self.num_examples}")
        self.scores.copy_(state["scores"])
        self.updated_at.copy_(state["updated_at"])
        self._updates.copy_(state["updates"])


class AsyncCGGRScorer:
    """Scores a batch with a :class:`cggr.CGGRModel`'s router on a side CUDA stream (``score_sequences``).

    Args:
        cggr_model: The model whose router, ``scoring`` and ``reference_norm`` define the scores.
        enabled: Use a side stream when the inputs are on CUDA (``False``: always synchronous).
    """

    def __init__(self, cggr_model: Any, enabled: bool = True) -> None:
        if not hasattr(cggr_model, "score_sequences"):
            raise TypeError(f"cggr_model must be a cggr.CGGRModel, got {type(cggr_model).__name__}")
        self.cggr_model = cggr_model
        self.enabled = check_bool("enabled", enabled)
        self._stream: torch.cuda.Stream | None = None
        self._pending: tuple[Tensor, Any, Any] | None = None  # (scores, done event, stream)

    def score(self, input_ids: Tensor, labels: Tensor, attention_mask: Tensor | None = None,
              reference_loss: Tensor | None = None, **kwargs: Any) -> Tensor:
        """(B,) scores now, on the current stream."""
        return self.cggr_model.score_sequences(input_ids, labels, attention_mask, reference_loss, **kwargs)

    def prefetch(self, input_ids: Tensor, labels: Tensor, attention_mask: Tensor | None = None,
                 reference_loss: Tensor | None = None, **kwargs: Any) -> None:
        """Start scoring this batch: on a side stream that waits for everything queued so far on the current one
        (so the inputs and the router's weights are as of now); :meth:`wait` returns the scores."""
        if self._pending is not None:
            raise RuntimeError("prefetch called twice without wait(): take the previous scores first")
        if not (self.enabled and input_ids.is_cuda):
            self._pending = (self.score(input_ids, labels, attention_mask, reference_loss, **kwargs), None, None)
            return
        main = torch.cuda.current_stream(input_ids.device)
        if self._stream is None or self._stream.device != input_ids.device:
            self._stream = torch.cuda.Stream(device=input_ids.device)
        side = self._stream
        side.wait_stream(main)
        tensors = [t for t in (input_ids, labels, attention_mask, reference_loss, *kwargs.values())
                   if isinstance(t, Tensor) and t.is_cuda]
        for t in tensors:  # the allocator must not reuse them before the side stream is done with them
            t.record_stream(side)
        with torch.cuda.stream(side):
            scores = self.score(input_ids, labels, attention_mask, reference_loss, **kwargs)
            done = torch.cuda.Event()
            done.record(side)
        self._pending = (scores, done, side)

    def wait(self) -> Tensor:
        """The prefetched batch's (B,) scores; the current stream waits for the side stream (no host sync).

        Call it before the optimizer updates the router's weights (they are read by the side stream)."""
        if self._pending is None:
            raise RuntimeError("wait() without a prefetch()")
        scores, done, _ = self._pending
        self._pending = None
        if done is not None:
            main = torch.cuda.current_stream(scores.device)
            main.wait_event(done)
            scores.record_stream(main)
        return scores

    @property
    def pending(self) -> bool:
        """True between :meth:`prefetch` and :meth:`wait`."""
        return self._pending is not None


__all__ = ["AsyncCGGRScorer", "SequenceScoreCache"]
