"""The reference model of the race's reducible-loss arm: split the training blocks, train it, score the rest.

Shape legend: N training blocks, T tokens per block, N_ref blocks the reference trains on, N_train = N - N_ref.

RHO-LOSS (Mindermann et al. 2022) needs a reference model trained on data of the training distribution that the
scored model never trains on ("train on half A, score half B"); never on held-out data. :func:`split_blocks`
draws that split (seeded), :func:`train_reference` trains a fresh model on the A blocks (AdamW, warm-up then
linear decay to 0), and :func:`build_reference` returns the per-block reference losses of the B blocks
(:func:`cggr.compute_reference_losses`) with the one-off seconds each part took, so the race can report that
cost in its own column.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch

from cggr.reference import ReferenceLosses, compute_reference_losses


def split_blocks(num_blocks: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(reference rows, training rows): a seeded random ``fraction`` of ``range(num_blocks)`` for the reference
    (at least one block each side), both sorted. The training arms never see the reference rows."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction!r}")
    if num_blocks < 2:
        raise ValueError(f"num_blocks must be >= 2 to split, got {num_blocks}")
    n_ref = min(num_blocks - 1, max(1, round(fraction * num_blocks)))
    order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed))
    return order[:n_ref].sort().values, order[n_ref:].sort().values


def train_reference(
    model: torch.nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    device: torch.device,
    seed: int,
    autocast: Callable[[], Any] | None = None,
    clock: Callable[[], float] = time.perf_counter,
    on_step: Callable[[int, int], Any] | None = None,
) -> dict[str, Any]:
    """Train ``model`` for ``steps`` AdamW steps on random batches of the (N_ref, T) blocks ``ids`` (``mask``:
    False at padding); learning rate: linear warm-up over 5% of the steps, then linear decay to 0.
    ``on_step(done, steps)`` is called after each step (the race's progress display; no device value is read).

    Returns:
        ``{"steps", "seconds", "final_train_loss"}`` (seconds measured with ``clock``, device synchronised).
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    from cggr.cli.timing import synchronize

    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(seed)
    warm = max(1, math.ceil(0.05 * steps))
    synchronize(device)
    start = clock()
    loss = torch.zeros(())
    for step in range(steps):
        scale = (step + 1) / warm if step < warm else max(0.0, (steps - step) / max(1, steps - warm))
        for group in opt.param_groups:
            group["lr"] = lr * scale
        rows = torch.randint(0, ids.shape[0], (min(batch_size, ids.shape[0]),), generator=gen)
        x, m = ids[rows].to(device), mask[rows].to(device)
        labels = x.masked_fill(~m, -100)
        with autocast() if autocast is not None else torch.autocast(device.type, enabled=False):
            loss = model(input_ids=x, attention_mask=m.long(), labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if on_step is not None:
            on_step(step + 1, steps)
    synchronize(device)
    return {"steps": steps, "seconds": clock() - start, "final_train_loss": float(loss.detach())}


def build_reference(
    model: torch.nn.Module,
    train_ids: torch.Tensor,
    train_mask: torch.Tensor,
    *,
    fraction: float,
    steps: int,
    batch_size: int,
    lr: float,
    device: torch.device,
    seed: int,
    autocast: Callable[[], Any] | None = None,
    clock: Callable[[], float] = time.perf_counter,
    max_blocks: int | None = None,
    on_step: Callable[[int, int], Any] | None = None,
    score_bytes: int = 1 << 28,
) -> tuple[torch.Tensor, ReferenceLosses, dict[str, Any]]:
    """Split, train the reference on the A blocks, compute its losses on the B blocks.

    ``max_blocks``: score (and return) at most this many of the B blocks, a seeded random subset (``None``: all);
    the caller then trains on those only. ``score_bytes``: bound on the fp32 logits of one scoring batch (rows
    per batch = max(``batch_size``, score_bytes / (T · V · 4))). ``on_step``: as in :func:`train_reference`.

    Returns:
        ``(train_rows, losses, info)``: the B rows (indices into ``train_ids``; the race trains on these only),
        their :class:`cggr.reference.ReferenceLosses` keyed by position in ``train_rows`` (0..N_train-1, so a
        batch of stream indices into the B blocks looks up directly), and ``info`` with the split sizes, the
        training steps and seconds, the scoring seconds and the reference's mean loss on the B blocks.
    """
    from cggr.cli.timing import synchronize

    ref_rows, train_rows = split_blocks(train_ids.shape[0], fraction, seed)
    if max_blocks is not None and max_blocks < train_rows.numel():
        if max_blocks < 1:
            raise ValueError(f"max_blocks must be >= 1 or None, got {max_blocks}")
        pick = torch.randperm(train_rows.numel(), generator=torch.Generator().manual_seed(seed + 1))[:max_blocks]
        train_rows = train_rows[pick].sort().values
    info = train_reference(model, train_ids[ref_rows], train_mask[ref_rows], steps=steps, batch_size=batch_size,
                           lr=lr, device=device, seed=seed, autocast=autocast, clock=clock,
                           on_step=on_step)
    synchronize(device)
    start = clock()
    data = {"input_ids": train_ids[train_rows], "attention_mask": train_mask[train_rows].long()}
    dtype = torch.bfloat16 if device.type == "cuda" else None
    vocab = int(model.get_output_embeddings().weight.shape[0]) if hasattr(model, "get_output_embeddings") else 1
    rows_per_batch = max(1, batch_size, score_bytes // (4 * vocab * train_ids.shape[1]))
    losses = compute_reference_losses(model, data, batch_size=rows_per_batch, device=device,
                                      autocast_dtype=dtype, store_tokens=False, progress=False)
    synchronize(device)
    seq = losses.sequence_loss
    info.update(
        reference_blocks=int(ref_rows.numel()), train_blocks=int(train_rows.numel()), score_seconds=clock() - start,
        unused_blocks=int(train_ids.shape[0] - ref_rows.numel() - train_rows.numel()),
        mean_reference_loss=float(seq[~seq.isnan()].mean()) if bool((~seq.isnan()).any()) else math.nan,
    )
    info["train_seconds"] = info.pop("seconds")
    info["total_seconds"] = info["train_seconds"] + info["score_seconds"]
    return train_rows, losses, info


__all__ = ["build_reference", "split_blocks", "train_reference"]
