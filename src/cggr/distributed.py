"""Sequence selection across data-parallel ranks: ``CGGRModel(..., global_selection=True)``.

Shape legend: W ranks in the process group, B sequences per rank, T sequence length, k sequences each rank
trains on (``CGGRModel.num_selected_sequences(B)``), K = W·k sequences chosen across ranks.

By default every rank of a DDP/FSDP job selects among its own B sequences (the hardest k of them). With
``global_selection=True`` the ranks choose together: the K hardest of all W·B sequences, and every rank trains on
k of them, so shapes stay static (k per rank, as without it) and the work stays balanced::

    every rank: (input_ids, targets, attention_mask) (B, T) ──one packed all_gather, async──> (W·B, T)
                router on its own B rows ──scores (B,) [(B, T) with token_ratio]──all_gather──> (W·B,) [(W·B, T)]
                top-K over W·B (the same tensor on every rank, so the same choice) ──sorted──> K rows
                rows [r·k, (r+1)·k) of them ──> rank r's model forward/backward (any rank's data)
                loss_r = CE summed over rank r's kept tokens · W / (kept tokens of all ranks)

DDP and FSDP average gradients over the W ranks, so the mean of ``loss_r`` (the loss whose gradient they produce)
is the mean cross-entropy over every kept token of the global batch: a single-process run on the concatenated
batch with K sequences gives the same loss and gradients. ``token_ratio`` keeps the hardest tokens among all K
chosen sequences, and ``selection='random'`` picks K sequences uniformly among all W·B (each rank draws the W·B
uniforms from its own stream and contributes its slice, so the ranks need no common seed).

Collectives per training call, issued in the same order on every rank and never read on the host (no sync):
one all_gather of the (B, T) shape, one of the packed token ids/targets/mask (overlapping the router), one of
the scores, and one per extra batch-shaped tensor argument (``position_ids``, ...). The exchanged data are token
ids and scores, O(B·T) integers: small next to the gradient all-reduce.

Requirements (checked): every rank passes the same (B, T) (a DistributedSampler gives equal B; pad to a fixed
length, not to the longest sequence of each rank's batch), an ``attention_mask`` on every rank or on none, and the
same batch-shaped keyword tensors. Eval mode (``model.eval()``) does not communicate: each rank's loss is its own.
"""

from __future__ import annotations

import zlib
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from cggr._rng import CounterRNG


def process_group_size(group: Any) -> tuple[int, int] | None:
    """``(rank, world_size)`` in ``group`` (``None``: the default group), or ``None`` when there is nothing to
    share: torch.distributed unavailable or not initialised, or a group of one process."""
    if not dist.is_available() or not dist.is_initialized():
        return None
    world = dist.get_world_size(group)
    if world <= 1:
        return None
    return dist.get_rank(group), world


def _all_gather(t: Tensor, group: Any, async_op: bool = False) -> tuple[Tensor, Any]:
    """(W·n, ...) concatenation along dim 0 of every rank's (n, ...) ``t``, and the work handle when async."""
    t = t.contiguous()
    out = t.new_empty((t.shape[0] * dist.get_world_size(group), *t.shape[1:]))
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # the newer name when present
    work = gather(out, t, group=group, async_op=async_op)
    return out, work


_LAYOUTS: dict[tuple[torch.device, tuple[int, ...]], Tensor] = {}


def _layout_tensor(layout: tuple[int, ...], device: torch.device) -> Tensor:
    """(1, n) long tensor of ``layout`` on ``device``, made once per layout: a training loop's layout repeats,
    and building it anew would be a host-to-device copy every step."""
    key = (device, layout)
    if key not in _LAYOUTS:
        if len(_LAYOUTS) > 64:  # many distinct layouts (varying lengths): keep the cache small
            _LAYOUTS.clear()
        _LAYOUTS[key] = torch.tensor([layout], dtype=torch.long, device=device)
    return _LAYOUTS[key]


class GlobalBatch:
    """The whole W·B-row batch of a training call on every rank, and this rank's share of a global choice.

    Args:
        group: Process group (``None``: the default one).
        rank, world_size: This process's rank in ``group`` and the group's size (W > 1).
        input_ids: (B, T) integer token ids of this rank.
        targets: (B, T) integer targets aligned with the logits (``ignore_index`` where nothing counts).
        attention_mask: (B, T) or ``None``.
        batch_kwargs: Keyword tensors of the model call whose leading dimension is B (sliced with the rows).
    """

    def __init__(
        self,
        group: Any,
        rank: int,
        world_size: int,
        input_ids: Tensor,
        targets: Tensor,
        attention_mask: Tensor | None,
        batch_kwargs: dict[str, Tensor],
    ) -> None:
        self.group, self.rank, self.world_size = group, rank, world_size
        self.batch = input_ids.shape[0]
        device = input_ids.device
        # 1. every rank must send the same shape: all_gather needs equal sizes (and NCCL would not say so)
        batch_kwargs = dict(sorted(batch_kwargs.items()))  # one gather order on every rank
        names = zlib.crc32(",".join(batch_kwargs).encode())  # deterministic across processes (unlike hash())
        layout = [*input_ids.shape, int(attention_mask is not None), len(batch_kwargs), names,
                  sum(v.numel() for v in batch_kwargs.values())]
        shapes, _ = _all_gather(_layout_tensor(tuple(layout), device), group)  # (W, 6)
        same = (shapes == shapes[:1]).all()
        if device.type == "cpu":  # a host value already: say which rank sent what
            if not bool(same):
                raise ValueError(
                    "global_selection needs the same batch layout on every rank: [batch, seq_len, has "
                    "attention_mask, number of batch keyword tensors, crc32 of their names, their total size] per "
                    f"rank = {shapes.tolist()}; pad every rank's "
                    "batch to one fixed length (not to each batch's longest sequence), pass attention_mask on every "
                    "rank or on none, and the same batch-shaped keyword tensors"
                )
        else:  # no host sync: a device-side assertion stops the step before the mismatched collective
            torch._assert_async(
                same,
                "global_selection needs the same (batch, seq_len), attention_mask presence and batch-shaped "
                "keyword tensors on every rank",
            )
        # 2. the packed token ids, targets and mask of every rank, in flight while the router runs
        self._dtypes = (input_ids.dtype, targets.dtype, None if attention_mask is None else attention_mask.dtype)
        cols = [input_ids.long(), targets.long()]
        if attention_mask is not None:
            cols.append(attention_mask.long())
        self._packed, self._work = _all_gather(torch.stack(cols, dim=-1), group, async_op=True)  # (W·B, T, c)
        self._kwargs = {key: _all_gather(val, group, async_op=True) for key, val in batch_kwargs.items()}

    def rows(self) -> tuple[Tensor, Tensor, Tensor | None, dict[str, Tensor]]:
        """Every rank's ``(input_ids, targets, attention_mask, batch_kwargs)``, rank-major: (W·B, T)."""
        self._work.wait()
        ids = self._packed[..., 0].to(self._dtypes[0])
        targets = self._packed[..., 1].to(self._dtypes[1])
        mask = self._packed[..., 2].to(self._dtypes[2]) if self._dtypes[2] is not None else None
        kwargs = {}
        for key, (val, work) in self._kwargs.items():
            work.wait()
            kwargs[key] = val
        return ids, targets, mask, kwargs

    def scores(self, seq_score: Tensor, tok_diff: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Every rank's sequence scores (W·B,) and, when given, token difficulties (W·B, T), in one all_gather."""
        if tok_diff is None:
            return _all_gather(seq_score.float(), self.group)[0], None
        packed, _ = _all_gather(torch.cat([seq_score.float()[:, None], tok_diff.float()], dim=1), self.group)
        return packed[:, 0], packed[:, 1:]

    def random_scores(self, generator: CounterRNG | torch.Generator | None, device: torch.device) -> Tensor:
        """(W·B,) uniforms, independent across ranks: each rank draws W·B from its stream and sends its slice
        (ranks sharing a stream send disjoint slices of one draw; ranks with their own streams, independent
        ones), so the top K of them is a uniformly random K-subset of the global batch."""
        from cggr._rng import uniform

        n, b = self.world_size * self.batch, self.batch
        u = uniform((n,), device, generator)[self.rank * b : (self.rank + 1) * b]
        return _all_gather(u, self.group)[0]

    def share(self, t: Tensor) -> Tensor:
        """Rows [r·k, (r+1)·k) of a (K, ...) tensor of the K = W·k chosen rows: this rank's share."""
        k = t.shape[0] // self.world_size
        return t[self.rank * k : (self.rank + 1) * k]

    def loss_scale(self, n_local: Tensor, n_global: Tensor) -> Tensor:
        """Factor turning this rank's mean loss (over its ``n_local`` kept tokens) into CE sum · W / n_global,
        so that the gradient mean over the W ranks is the gradient of the global mean loss."""
        return n_local.clamp(min=1).to(torch.float32) * self.world_size / n_global.clamp(min=1).to(torch.float32)


def start_global_batch(group: Any, input_ids: Tensor, targets: Tensor, attention_mask: Tensor | None,
                       kwargs: dict[str, Any], num_items: Any) -> GlobalBatch | None:
    """Start gathering every rank's batch for ``global_selection``: a :class:`GlobalBatch`, or ``None`` without an
    initialised group of W > 1 processes. ``kwargs``: the model call's keyword arguments (its tensors of leading
    dimension B travel with the rows); ``num_items``: the call's ``num_items_in_batch`` (refused here)."""
    ranks = process_group_size(group)
    if ranks is None:
        return None
    if num_items is not None:
        raise ValueError("num_items_in_batch cannot be combined with global_selection=True: the loss is already "
                         "normalised by the kept tokens of all ranks (a Trainer scaling it again for its own "
                         "token averaging across devices would count the ranks twice); use per-rank selection")
    batch = input_ids.shape[0]
    batch_kwargs = {key: val for key, val in kwargs.items()
                    if isinstance(val, Tensor) and val.dim() >= 1 and val.shape[0] == batch}
    return GlobalBatch(group, *ranks, input_ids, targets, attention_mask, batch_kwargs)


__all__ = ["GlobalBatch", "process_group_size", "start_global_batch"]
