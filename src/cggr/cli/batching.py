"""Sequences and their order for ``cggr race``: token streams cut into blocks, rows padded to one length, and
the seeded order in which every arm reads the training sequences.

Shape legend: T tokens per sequence; n sequences.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def cut_blocks(flat: np.ndarray, seq_len: int) -> torch.Tensor:
    """(n, T) long blocks of consecutive tokens of the flat stream ``flat``; the tail shorter than T is dropped."""
    n = len(flat) // seq_len
    return torch.from_numpy(flat[: n * seq_len].copy()).view(n, seq_len)  # (n, T)


def pad_rows(rows: Sequence[Sequence[int]], seq_len: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad (or cut) ``rows`` to (len(rows), T) ids and a bool mask that is False at padding."""
    lengths = np.fromiter((min(len(r), seq_len) for r in rows), dtype=np.int64, count=len(rows))
    ids = np.full((len(rows), seq_len), pad_id, dtype=np.int64)
    mask = np.arange(seq_len)[None, :] < lengths[:, None]  # (n, T)
    ids[mask] = np.fromiter((t for r in rows for t in list(r)[:seq_len]), dtype=np.int64, count=int(lengths.sum()))
    return torch.from_numpy(ids), torch.from_numpy(mask)


class BatchStream:
    """Indices of training sequences in a seeded order: a fresh permutation every epoch.

    Two streams built with the same ``num_sequences`` and ``seed`` yield the same indices whatever batch sizes
    they are read with, so arms that scan more sequences per step read further along the same order.
    """

    def __init__(self, num_sequences: int, seed: int) -> None:
        if num_sequences < 1:
            raise ValueError(f"num_sequences must be >= 1, got {num_sequences}")
        self.num_sequences = num_sequences
        self.generator = torch.Generator().manual_seed(seed)
        self._order = torch.randperm(num_sequences, generator=self.generator)
        self._pos = 0
        self.epoch = 0
        self.consumed = 0

    def clone(self) -> BatchStream:
        """An independent copy at the same position (its generator state copied): both yield the same indices."""
        other = BatchStream.__new__(BatchStream)
        other.num_sequences, other._pos, other.epoch, other.consumed = (
            self.num_sequences, self._pos, self.epoch, self.consumed)
        other.generator = torch.Generator().manual_seed(0)
        other.generator.set_state(self.generator.get_state())
        other._order = self._order.clone()
        return other

    def take(self, count: int) -> torch.Tensor:
        """The next ``count`` sequence indices, (count,) long."""
        parts, need = [], count
        while need:
            if self._pos == self.num_sequences:
                self._order = torch.randperm(self.num_sequences, generator=self.generator)
                self._pos, self.epoch = 0, self.epoch + 1
            piece = self._order[self._pos : self._pos + need]
            parts.append(piece)
            self._pos += len(piece)
            need -= len(piece)
        self.consumed += count
        return torch.cat(parts)


__all__ = ["BatchStream", "cut_blocks", "pad_rows"]
