"""Reference-model losses as data: compute once, cache with a fingerprint, hand to training batches by index.

Shape legend: N examples in the dataset, T sequence length, B batch, V vocabulary.

RHO-LOSS (Mindermann et al. 2022) ranks training sequences by their *reducible* loss: the learner's loss minus
the loss of a small reference model trained on held-out data of the same distribution, computed ONCE per example
and looked up by the example's index during training. Rho-1 (Lin et al. 2024) does the same per token (*excess*
loss). This module holds the data side:

* :func:`compute_reference_losses` runs the reference model over a dataset (batched, no grad, a tqdm progress bar
  if tqdm is installed, resumable from a partial file) and returns a :class:`ReferenceLosses`.
* :class:`ReferenceLosses` stores the per-sequence (N,) and per-token (N, T) losses with the examples' indices and
  a fingerprint (vocabulary size, tokenizer, sequence length, dataset digest, label shift, ignore_index), saves
  to and loads from safetensors, refuses a fingerprint that does not match, and hands losses to a batch by index
  (:meth:`ReferenceLosses.sequence`, :meth:`ReferenceLosses.tokens`).
* :func:`excess_scores` turns a learner's and a reference's losses into a score (``normalize``: see there), the
  one function behind ``CGGRLoss(scoring='excess')`` and ``CGGRModel(scoring='reducible')``.

Alignment: the per-token losses are stored like :class:`cggr.CGGRModel`'s shifted targets: entry (i, t) is the
loss of predicting ``labels[i, t + 1]`` from positions <= t for causal models (the last column and padded or
ignored targets are invalid, stored as 0 with ``token_valid`` False); ``labels[i, t]`` at position t for masked
LMs (``causal=False``). For :class:`cggr.CGGRLoss` fed ``logits[:, :-1]`` and ``labels[:, 1:]`` take
``tokens(idx)[:, :-1]``. A per-sequence loss is the mean over the sequence's valid targets (NaN without any).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cggr._validation import check_bool, check_choice, check_ignore_index, check_int

#: How :func:`excess_scores` combines the learner's and the reference's losses.
REFERENCE_NORMS = ("none", "zscore", "rank")
_FORMAT = "cggr.reference/1"
_META_KEY = "cggr_reference"


# ---------------------------------------------------------------------------------------------- scores
def _valid_stats(x: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and population standard deviation of ``x`` over ``valid`` (0-d fp32; sd >= a tiny floor)."""
    n = valid.sum().clamp(min=1).float()
    mean = torch.where(valid, x, 0.0).sum() / n
    var = torch.where(valid, (x - mean) ** 2, 0.0).sum() / n
    return mean, var.sqrt().clamp(min=1e-6)


def _percentile(x: Tensor, valid: Tensor) -> Tensor:
    """Rank of every valid entry among the valid ones, scaled to [0, 1] (0 = lowest; ties by position)."""
    flat = torch.where(valid, x, torch.inf).reshape(-1)  # invalid entries rank last
    order = torch.argsort(flat, stable=True)
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(flat.numel(), device=x.device))
    denom = (valid.sum() - 1).clamp(min=1).float()
    return (rank.float() / denom).view(x.shape)


def excess_scores(learner_loss: Tensor, reference_loss: Tensor, valid: Tensor | None = None, *,
                  normalize: str = "none") -> Tensor:
    """Score = learner loss − reference loss (reducible / excess loss), optionally normalised per batch.

    Args:
        learner_loss: Losses of the model being trained (any shape, e.g. (B,) or (B, T)); any float dtype.
        reference_loss: The reference model's losses for the same entries, same shape.
        valid: Bool mask of the same shape (entries that count; others get score 0), or ``None`` for all.
        normalize: ``'none'``: the raw difference (RHO-LOSS, Rho-1). ``'zscore'``: each loss standardised over
            the valid entries of this call before subtracting, (l − mean l)/sd l − (r − mean r)/sd r. When the two
            losses are strongly correlated and the reference's spread is larger (as the pilot of issue 15 found),
            the raw difference mostly ranks by LOW reference loss, i.e. picks easy sequences;
            standardising removes that scale effect, so the score ranks sequences that the learner finds harder
            than their reference difficulty predicts. ``'rank'``: the same with percentile ranks in [0, 1]
            instead of z-scores (robust to outliers such as noise documents with huge losses).

    Returns:
        fp32 tensor of the input's shape. No host synchronisation.
    """
    check_choice("normalize", normalize, REFERENCE_NORMS)
    for name, t in (("learner_loss", learner_loss), ("reference_loss", reference_loss)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            got = t.dtype if isinstance(t, Tensor) else type(t).__name__
            raise TypeError(f"{name} must be a floating-point tensor, got {got}")
    if reference_loss.shape != learner_loss.shape:
        raise ValueError(
            f"reference_loss shape {tuple(reference_loss.shape)} does not match the learner's loss shape "
            f"{tuple(learner_loss.shape)}"
        )
    if reference_loss.device != learner_loss.device:
        raise ValueError(
            f"reference_loss is on {reference_loss.device} but the learner's loss is on {learner_loss.device}"
        )
    if valid is None:
        valid = torch.ones_like(learner_loss, dtype=torch.bool)
    elif valid.shape != learner_loss.shape or valid.dtype != torch.bool:
        raise ValueError(f"valid must be a bool tensor of shape {tuple(learner_loss.shape)}, got {valid.dtype} "
                         f"{tuple(valid.shape)}")
    lrn, ref = learner_loss.float(), reference_loss.float()
    if normalize == "zscore":
        (ml, sl), (mr, sr) = _valid_stats(lrn, valid), _valid_stats(ref, valid)
        out = (lrn - ml) / sl - (ref - mr) / sr
    elif normalize == "rank":
        out = _percentile(lrn, valid) - _percentile(ref, valid)
    else:
        out = lrn - ref
    return torch.where(valid, out, 0.0)


def check_reference_loss(reference_loss: object, batch: int, seq_len: int, device: torch.device) -> Tensor:
    """A ``reference_loss=`` argument: (B,) per sequence or (B, T) per token, floating; returned as fp32 on
    ``device`` (a copy when it lives elsewhere: put it there in the data loader to avoid one)."""
    if not isinstance(reference_loss, Tensor):
        raise TypeError(f"reference_loss must be a torch.Tensor, got {type(reference_loss).__name__}")
    if not reference_loss.is_floating_point():
        raise TypeError(f"reference_loss must be a floating-point tensor, got dtype {reference_loss.dtype}")
    if tuple(reference_loss.shape) not in ((batch,), (batch, seq_len)):
        raise ValueError(
            f"reference_loss must be per sequence ({batch},) or per token ({batch}, {seq_len}), got shape "
            f"{tuple(reference_loss.shape)}"
        )
    return reference_loss.to(device=device, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------- dataset
class _Examples:
    """A dataset as fixed-length (input_ids, labels, attention_mask) rows, read in batches."""

    def __init__(self, dataset: Any) -> None:
        self.columns: dict[str, Tensor] | None = None
        self.rows: Sequence[Any] | None = None
        if isinstance(dataset, Tensor):
            self.columns = {"input_ids": dataset}
        elif isinstance(dataset, Mapping):
            if "input_ids" not in dataset:
                raise ValueError(f"dataset mapping must have an 'input_ids' column, got keys {sorted(dataset)}")
            self.columns = {k: torch.as_tensor(dataset[k]) for k in ("input_ids", "labels", "attention_mask")
                            if k in dataset and dataset[k] is not None}
        elif isinstance(dataset, Sequence) or (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
            self.rows = dataset
        else:
            raise TypeError(
                "dataset must be an (N, T) tensor of token ids, a mapping with an 'input_ids' (N, T) column, or a "
                f"sequence of examples (dicts with 'input_ids'), got {type(dataset).__name__}"
            )
        if self.columns is not None:
            ids = self.columns["input_ids"]
            if ids.dim() != 2 or ids.is_floating_point() or ids.dtype == torch.bool:
                raise ValueError(f"dataset input_ids must be an (N, T) integer tensor, got {ids.dtype} "
                                 f"{tuple(ids.shape)}")
            for key, col in self.columns.items():
                if col.shape != ids.shape:
                    raise ValueError(f"dataset {key} shape {tuple(col.shape)} does not match input_ids shape "
                                     f"{tuple(ids.shape)}")
            self.n, self.seq_len = ids.shape
        else:
            self.n = len(self.rows)
            if self.n == 0:
                raise ValueError("dataset is empty")
            self.seq_len = self._row(0)["input_ids"].shape[0]

    def _row(self, i: int) -> dict[str, Tensor]:
        ex = self.rows[i]
        if isinstance(ex, Tensor):
            ex = {"input_ids": ex}
        if not isinstance(ex, Mapping) or "input_ids" not in ex:
            raise ValueError(f"dataset example {i} must be a tensor of token ids or a dict with 'input_ids', got "
                             f"{type(ex).__name__}")
        out = {k: torch.as_tensor(ex[k]) for k in ("input_ids", "labels", "attention_mask")
               if k in ex and ex[k] is not None}
        for key, col in out.items():
            if col.dim() != 1 or (hasattr(self, "seq_len") and col.shape[0] != self.seq_len):
                want = f"({self.seq_len},)" if hasattr(self, "seq_len") else "1-D"
                raise ValueError(f"dataset example {i} {key} must have shape {want} (fixed-length sequences), got "
                                 f"{tuple(col.shape)}")
        return out

    def batch(self, start: int, stop: int) -> dict[str, Tensor]:
        if self.columns is not None:
            return {k: v[start:stop] for k, v in self.columns.items()}
        rows = [self._row(i) for i in range(start, stop)]
        keys = set(rows[0])
        if any(set(r) != keys for r in rows):
            raise ValueError(f"dataset examples {start}..{stop - 1} do not all have the same columns")
        return {k: torch.stack([r[k] for r in rows]) for k in keys}

    def digest(self, batch_size: int = 1024) -> str:
        """sha256 over (N, T) and every column's int64 values, row-major, in a fixed column order."""
        h = hashlib.sha256(f"{self.n}x{self.seq_len}".encode())
        for start in range(0, self.n, batch_size):
            b = self.batch(start, min(self.n, start + batch_size))
            for key in ("input_ids", "labels", "attention_mask"):
                if key in b:
                    h.update(key.encode())
                    h.update(b[key].to(torch.int64).contiguous().numpy().tobytes())
        return h.hexdigest()


def dataset_digest(dataset: Any) -> str:
    """The dataset digest stored in a :class:`ReferenceLosses` fingerprint (sha256 hex of ids, labels, mask)."""
    return _Examples(dataset).digest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """``name_or_path|size|sha256 of the sorted vocabulary`` of a Hugging Face tokenizer (or ``str(tokenizer)``
    for a plain string identifier)."""
    if isinstance(tokenizer, str):
        return tokenizer
    name = getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    digest = hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest()[:16]
    return f"{name}|{len(tokenizer) if hasattr(tokenizer, '__len__') else len(vocab)}|{digest}"


# ---------------------------------------------------------------------------------------------- the cache
@dataclasses.dataclass
class ReferenceLosses:
    """A reference model's losses over a dataset, keyed by example index.

    Attributes:
        indices: (N,) int64 example indices (unique), in the order the losses are stored.
        sequence_loss: (N,) fp32 mean loss over each example's valid targets (NaN without any).
        token_loss: (N, T) fp32 per-token losses (0 where invalid), or ``None`` if not stored.
        token_valid: (N, T) bool, the targets that have a loss, or ``None`` with ``token_loss``.
        fingerprint: ``format``, ``vocab_size``, ``seq_len``, ``dataset_digest``, ``tokenizer`` (or ``""``),
            ``causal``, ``ignore_index``, ``model`` (informational), ``num_examples``.
    """

    indices: Tensor
    sequence_loss: Tensor
    token_loss: Tensor | None
    token_valid: Tensor | None
    fingerprint: dict[str, Any]

    def __post_init__(self) -> None:
        n = self.indices.shape[0] if isinstance(self.indices, Tensor) and self.indices.dim() == 1 else None
        if n is None or self.indices.is_floating_point():
            raise ValueError(f"indices must be a 1-D integer tensor, got {self.indices!r:.80}")
        if self.sequence_loss.shape != (n,):
            raise ValueError(f"sequence_loss must have shape ({n},), got {tuple(self.sequence_loss.shape)}")
        if (self.token_loss is None) != (self.token_valid is None):
            raise ValueError("token_loss and token_valid must both be given or both be None")
        if self.token_loss is not None:
            t = self.fingerprint.get("seq_len")
            if self.token_loss.shape != (n, t) or self.token_valid.shape != (n, t):
                raise ValueError(f"token_loss and token_valid must have shape ({n}, {t}), got "
                                 f"{tuple(self.token_loss.shape)} and {tuple(self.token_valid.shape)}")
        self.indices = self.indices.to(torch.int64)
        self._sorted, self._order = torch.sort(self.indices)
        if n > 1 and bool((self._sorted[1:] == self._sorted[:-1]).any()):
            raise ValueError("indices must be unique")

    def __len__(self) -> int:
        return self.indices.shape[0]

    # ------------------------------------------------------------------ lookup
    def positions(self, indices: Tensor | Sequence[int]) -> Tensor:
        """Rows of the stored arrays for these example indices (CPU long); ``ValueError`` if any is missing.

        A host-side lookup (it reads the indices): call it in the data pipeline, not inside a compiled step.
        """
        q = torch.as_tensor(indices)
        if q.is_floating_point() or q.dtype == torch.bool:
            raise TypeError(f"indices must be integer example indices, got dtype {q.dtype}")
        q = q.to("cpu", torch.int64)
        flat = q.reshape(-1)
        pos = torch.searchsorted(self._sorted, flat).clamp(max=max(0, len(self) - 1))
        found = self._sorted[pos] == flat if len(self) else torch.zeros_like(flat, dtype=torch.bool)
        if not bool(found.all()):
            missing = flat[~found][:8].tolist()
            raise ValueError(
                f"indices has {int((~found).sum())} example indices without a reference loss (e.g. {missing}); "
                f"the reference covers {len(self)} examples (indices {int(self._sorted[0])}..{int(self._sorted[-1])})"
            )
        return self._order[pos].view(q.shape)

    def sequence(self, indices: Tensor | Sequence[int], device: torch.device | str | None = None) -> Tensor:
        """(B,) fp32 per-sequence reference losses of these examples (``reference_loss=`` of ``CGGRModel``)."""
        pos = self.positions(indices)
        out = self.sequence_loss.index_select(0, pos.reshape(-1)).view(pos.shape)
        return out.to(device) if device is not None else out

    def tokens(self, indices: Tensor | Sequence[int], device: torch.device | str | None = None) -> Tensor:
        """(B, T) fp32 per-token reference losses (aligned as in the module docstring; 0 where invalid)."""
        if self.token_loss is None:
            raise ValueError("these reference losses were computed with store_tokens=False: no per-token losses")
        pos = self.positions(indices)
        out = self.token_loss.index_select(0, pos.reshape(-1)).view(*pos.shape, self.token_loss.shape[1])
        return out.to(device) if device is not None else out

    # ------------------------------------------------------------------ fingerprint
    def check(self, *, vocab_size: int | None = None, seq_len: int | None = None, dataset: Any = None,
              tokenizer: Any = None, causal: bool | None = None, ignore_index: int | None = None) -> None:
        """``ValueError`` naming the argument if any given one differs from what the losses were computed with."""
        fp = self.fingerprint
        expected: dict[str, Any] = {}
        if vocab_size is not None:
            expected["vocab_size"] = int(vocab_size)
        if seq_len is not None:
            expected["seq_len"] = int(seq_len)
        if causal is not None:
            expected["causal"] = bool(causal)
        if ignore_index is not None:
            expected["ignore_index"] = int(ignore_index)
        if tokenizer is not None:
            expected["tokenizer"] = tokenizer_fingerprint(tokenizer)
        for key, want in expected.items():
            if fp.get(key) != want:
                hint = " (another tokenizer?)" if key in ("vocab_size", "tokenizer") else ""
                raise ValueError(f"{key}={want!r} does not match the reference losses' {key}={fp.get(key)!r}{hint}")
        if dataset is not None:
            ex = _Examples(dataset)
            if ex.seq_len != fp.get("seq_len"):
                raise ValueError(f"dataset has sequence length {ex.seq_len} but the reference losses were computed "
                                 f"with seq_len={fp.get('seq_len')}")
            got = ex.digest()
            if got != fp.get("dataset_digest"):
                raise ValueError(f"dataset digest {got[:16]}... does not match the reference losses' dataset_digest "
                                 f"{str(fp.get('dataset_digest'))[:16]}... (other examples, order or labels)")

    # ------------------------------------------------------------------ storage
    def _tensors(self) -> dict[str, Tensor]:
        out = {"indices": self.indices.contiguous(), "sequence_loss": self.sequence_loss.float().contiguous()}
        if self.token_loss is not None:
            out["token_loss"] = self.token_loss.float().contiguous()
            out["token_valid"] = self.token_valid.to(torch.uint8).contiguous()
        return out

    def save(self, path: str | os.PathLike) -> None:
        """Write a safetensors file (atomically: a temporary file, then a rename), fingerprint in its metadata."""
        _write(Path(path), self._tensors(), self.fingerprint)

    @classmethod
    def load(cls, path: str | os.PathLike, **expected: Any) -> ReferenceLosses:
        """Read a file written by :meth:`save`; ``expected`` keyword arguments go to :meth:`check`."""
        tensors, fp = _read(Path(path))
        if fp.get("complete") is False:
            raise ValueError(f"path {str(path)!r} is a partial file ({fp.get('done')} of {fp.get('num_examples')} "
                             "examples): finish it with compute_reference_losses(..., path=...) first")
        out = cls._from(tensors, fp)
        out.check(**expected)
        return out

    @classmethod
    def _from(cls, tensors: dict[str, Tensor], fp: dict[str, Any]) -> ReferenceLosses:
        tv = tensors.get("token_valid")
        return cls(indices=tensors["indices"], sequence_loss=tensors["sequence_loss"],
                   token_loss=tensors.get("token_loss"), token_valid=tv.bool() if tv is not None else None,
                   fingerprint=fp)


def _write(path: Path, tensors: dict[str, Tensor], fingerprint: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
              metadata={_META_KEY: json.dumps(fingerprint, sort_keys=True)})
    os.replace(tmp, path)


def _read(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    from safetensors import safe_open

    if not path.is_file():
        raise ValueError(f"path {str(path)!r} does not exist")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if _META_KEY not in meta:
            raise ValueError(f"path {str(path)!r} is not a cggr reference-loss file (no {_META_KEY!r} metadata)")
        fp = json.loads(meta[_META_KEY])
        if fp.get("format") != _FORMAT:
            raise ValueError(f"path {str(path)!r} has format {fp.get('format')!r}, expected {_FORMAT!r}")
        return {k: f.get_tensor(k) for k in f.keys()}, fp  # noqa: SIM118 (safe_open is no dict)


# ---------------------------------------------------------------------------------------------- compute
def _vocab_size(model: nn.Module) -> int | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    w = getattr(head, "weight", None)
    if isinstance(w, Tensor) and w.dim() == 2:
        return int(w.shape[0])
    cfg = getattr(model, "config", None)
    return int(cfg.vocab_size) if getattr(cfg, "vocab_size", None) else None


@torch.no_grad()
def _batch_losses(model: nn.Module, batch: dict[str, Tensor], *, causal: bool, ignore_index: int,
                  device: torch.device, autocast_dtype: torch.dtype | None) -> tuple[Tensor, Tensor, int]:
    """Per-token losses (B, T) fp32 (0 where invalid), their validity (B, T) and V, as CGGRModel aligns them."""
    ids = batch["input_ids"].to(device, torch.long)
    labels = batch.get("labels", batch["input_ids"]).to(device, torch.long)
    mask = batch.get("attention_mask")
    mask = mask.to(device) if mask is not None else None
    if mask is not None:
        labels = labels.masked_fill(mask == 0, ignore_index)
    if causal:
        targets = F.pad(labels[:, 1:], (0, 1), value=ignore_index)
        if mask is not None:
            targets = targets.masked_fill(mask == 0, ignore_index)
    else:
        targets = labels
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        out = model(input_ids=ids, attention_mask=mask)
    logits = out.logits if hasattr(out, "logits") else out[0] if isinstance(out, tuple) else out
    if not isinstance(logits, Tensor) or logits.dim() != 3 or logits.shape[:2] != ids.shape:
        raise ValueError(f"model must return (B, T, V) logits for input_ids {tuple(ids.shape)}, got "
                         f"{tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__}")
    vocab = logits.shape[-1]
    valid = targets != ignore_index
    bad = valid & ((targets < 0) | (targets >= vocab))
    if bool(bad.any()):
        raise ValueError(f"dataset labels must be in [0, {vocab}) or equal ignore_index={ignore_index}, found "
                         f"{int(targets[bad][0])}")
    nll = F.cross_entropy(logits.float().reshape(-1, vocab), torch.where(valid, targets, 0).reshape(-1),
                          reduction="none").view(targets.shape)
    return torch.where(valid, nll, 0.0).cpu(), valid.cpu(), vocab


def compute_reference_losses(
    model: nn.Module,
    dataset: Any,
    *,
    indices: Tensor | Sequence[int] | None = None,
    batch_size: int = 8,
    path: str | os.PathLike | None = None,
    resume: bool = True,
    checkpoint_every: int = 50,
    causal: bool = True,
    ignore_index: int = -100,
    tokenizer: Any = None,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
    store_tokens: bool = True,
    progress: bool = True,
) -> ReferenceLosses:
    """Run ``model`` over ``dataset`` once (no grad, eval mode) and return its per-sequence/per-token losses.

    Args:
        model: The reference model (anything called as ``model(input_ids=, attention_mask=)`` returning logits or
            an object with ``.logits``). Trained on data the learner never trains on (RHO-LOSS: a held-out split
            of the same distribution; never the evaluation data).
        dataset: An (N, T) integer tensor of token ids, a mapping with ``input_ids`` (N, T) and optional
            ``labels`` / ``attention_mask`` columns, or a sequence of such examples (dicts of (T,) tensors).
            Labels default to the input ids (HF causal-LM convention, shifted inside when ``causal``).
        indices: (N,) unique example indices that training batches will look the losses up by (default
            0..N-1): e.g. the examples' positions in the training set.
        batch_size: Examples per forward pass.
        path: Where to save the result (safetensors). While computing, a ``<path>.partial`` file is rewritten
            every ``checkpoint_every`` batches; with ``resume`` a run that was interrupted continues from it, and
            a finished ``path`` whose fingerprint matches is loaded instead of recomputed.
        resume: Reuse ``path`` / ``<path>.partial`` when their fingerprint matches (a mismatch is a ValueError).
        checkpoint_every: Batches between partial saves.
        causal: Shift labels (position t predicts label t + 1); ``False`` for masked LMs.
        ignore_index: Label value to ignore.
        tokenizer: Optional tokenizer (or a string naming it), recorded in the fingerprint.
        device: Where to run (default: the model's device).
        autocast_dtype: Optional autocast dtype for the forward (e.g. ``torch.bfloat16`` on a GPU).
        store_tokens: Keep the (N, T) per-token losses (``False``: per-sequence only, N · 4 bytes).
        progress: Show a tqdm progress bar when tqdm is installed.
    """
    if not isinstance(model, nn.Module) and not callable(model):
        raise TypeError(f"model must be a torch.nn.Module or a callable, got {type(model).__name__}")
    batch_size = check_int("batch_size", batch_size, minimum=1)
    checkpoint_every = check_int("checkpoint_every", checkpoint_every, minimum=1)
    check_bool("resume", resume)
    check_bool("causal", causal)
    check_bool("store_tokens", store_tokens)
    check_bool("progress", progress)
    check_ignore_index(ignore_index)
    examples = _Examples(dataset)
    n, t = examples.n, examples.seq_len
    if indices is None:
        idx = torch.arange(n, dtype=torch.int64)
    else:
        idx = torch.as_tensor(indices)
        if idx.shape != (n,) or idx.is_floating_point() or idx.dtype == torch.bool:
            raise ValueError(f"indices must be {n} integer example indices (one per dataset example), got "
                             f"{idx.dtype} {tuple(idx.shape)}")
        idx = idx.to(torch.int64)
        if n > 1 and bool((torch.sort(idx).values.diff() == 0).any()):
            raise ValueError("indices must be unique")
    param = next((p for p in model.parameters()), None) if isinstance(model, nn.Module) else None
    dev = torch.device(device) if device is not None else (param.device if param is not None else torch.device("cpu"))
    fp: dict[str, Any] = {
        "format": _FORMAT, "vocab_size": _vocab_size(model) if isinstance(model, nn.Module) else None,
        "seq_len": t, "dataset_digest": examples.digest(), "num_examples": n,
        "indices_digest": hashlib.sha256(idx.numpy().tobytes()).hexdigest(),
        "tokenizer": tokenizer_fingerprint(tokenizer) if tokenizer is not None else "",
        "causal": causal, "ignore_index": ignore_index, "store_tokens": store_tokens,
        "model": type(model).__name__,
    }
    final = Path(path) if path is not None else None
    partial = final.with_name(final.name + ".partial") if final is not None else None
    if final is not None and resume and final.is_file():
        done_ref = ReferenceLosses.load(final)
        _same_run("path", final, done_ref.fingerprint, fp)
        return done_ref

    seq = torch.full((n,), math.nan, dtype=torch.float32)
    tok = torch.zeros((n, t), dtype=torch.float32) if store_tokens else None
    tval = torch.zeros((n, t), dtype=torch.bool) if store_tokens else None
    start = 0
    if partial is not None and resume and partial.is_file():
        tensors, old = _read(partial)
        _same_run("path", partial, old, fp)
        start = int(old["done"])
        seq[:start] = tensors["sequence_loss"][:start]
        if store_tokens:
            tok[:start] = tensors["token_loss"][:start]
            tval[:start] = tensors["token_valid"][:start].bool()
        fp["vocab_size"] = old.get("vocab_size", fp["vocab_size"])

    def snapshot(done: int, complete: bool) -> None:
        meta = dict(fp, done=done, complete=complete)
        tensors = {"indices": idx, "sequence_loss": seq}
        if store_tokens:
            tensors.update(token_loss=tok, token_valid=tval.to(torch.uint8))
        _write(final if complete else partial, tensors, meta)

    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm
        except ImportError:
            tqdm = None
        if tqdm is not None:
            bar = tqdm(total=n, initial=start, desc="reference losses", unit="seq")
    was_training = getattr(model, "training", False)
    if isinstance(model, nn.Module):
        model.eval()
    try:
        for n_batches, lo in enumerate(range(start, n, batch_size), start=1):
            hi = min(n, lo + batch_size)
            nll, valid, vocab = _batch_losses(model, examples.batch(lo, hi), causal=causal,
                                              ignore_index=ignore_index, device=dev, autocast_dtype=autocast_dtype)
            if fp["vocab_size"] is None:
                fp["vocab_size"] = vocab
            elif fp["vocab_size"] != vocab:
                raise ValueError(f"model returns logits over {vocab} classes but its vocab_size is "
                                 f"{fp['vocab_size']}")
            cnt = valid.sum(-1)
            seq[lo:hi] = torch.where(cnt > 0, nll.sum(-1) / cnt.clamp(min=1), math.nan)
            if store_tokens:
                tok[lo:hi], tval[lo:hi] = nll, valid
            if bar is not None:
                bar.update(hi - lo)
            if partial is not None and n_batches % checkpoint_every == 0 and hi < n:
                snapshot(hi, complete=False)
    finally:
        if bar is not None:
            bar.close()
        if isinstance(model, nn.Module):
            model.train(was_training)
    fp["complete"] = True
    fp["done"] = n
    out = ReferenceLosses(indices=idx, sequence_loss=seq, token_loss=tok, token_valid=tval, fingerprint=fp)
    if final is not None:
        snapshot(n, complete=True)
        if partial.is_file():
            partial.unlink()
    return out


def _same_run(name: str, path: Path, old: dict[str, Any], new: dict[str, Any]) -> None:
    keys = ("format", "seq_len", "dataset_digest", "num_examples", "indices_digest", "tokenizer", "causal",
            "ignore_index", "store_tokens")
    diff = [k for k in keys if old.get(k) != new.get(k)]
    if new.get("vocab_size") is not None and old.get("vocab_size") not in (None, new["vocab_size"]):
        diff.append("vocab_size")
    if diff:
        detail = ", ".join(f"{k}: {old.get(k)!r} there vs {new.get(k)!r} now" for k in diff)
        raise ValueError(f"{name} {str(path)!r} holds reference losses of another run ({detail}); delete it or pass "
                         "resume=False")


__all__ = [
    "REFERENCE_NORMS",
    "ReferenceLosses",
    "check_reference_loss",
    "compute_reference_losses",
    "dataset_digest",
    "excess_scores",
    "tokenizer_fingerprint",
]
