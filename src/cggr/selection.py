"""Which tokens (or sequences) to keep, given their difficulty. Pure PyTorch, no host synchronisation.

Shape legend: B batch, T sequence length, N = B·T tokens, K kept tokens, S strata.

Every selector returns a boolean mask of the input's shape rather than a list of indices, so shapes stay
static whatever the data: the number of kept tokens K lives on the device as a tensor, never on the host.
That keeps ``torch.compile`` free of recompilations and CUDA graphs capturable.

Rules (docs/design.md §4.3, §4.5):

* Invalid tokens (ignored targets) are never selected and do not count in n_valid.
* K = max(1, floor(ratio · n_valid + 1/2)), and 0 when n_valid = 0 ("round half up").
* NaN difficulty counts as the hardest, so a NaN reaches the loss instead of being hidden.
* ``topk`` / ``fixed_quota``: the K hardest. ``random``: K uniformly at random (the control).
* ``stratified``: valid tokens sorted by difficulty and cut into S buckets of (near) equal size (token of rank r
  goes to bucket floor(r·S / n_valid), hardest bucket 0); bucket i gets a quota proportional to S - i
  (largest-remainder rounding, leftovers to the hardest buckets), quotas capped at the bucket size with the
  overflow handed to the hardest buckets that still have room; within a bucket the tokens are drawn at random.
* ``sequence_aware``: ``topk``, then each sequence gets its hardest unselected valid tokens until it holds
  min(min_tokens_per_sequence, its valid tokens) selected ones (so more than K may be kept).
* ``sampled``: K drawn without replacement with Gumbel-top-k over difficulty / ``temperature`` (Plackett-Luce;
  τ → 0 is ``topk``, τ → ∞ is ``random``). ``importance``: K drawn by unbiased importance sampling with
  inclusion probabilities π ∝ difficulty mixed with uniform (``uniform_mix``); the 1 / π weights that make the
  kept tokens' loss unbiased come from :func:`cggr.sampling.importance_select`. Both: :mod:`cggr.sampling`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cggr._rng import CounterRNG, permutation, uniform
from cggr._validation import (
    SELECTION_STRATEGIES,
    check_choice,
    check_int,
    check_ratio,
    check_ratio_tensor,
)
from cggr.sampling import (
    DEFAULT_TEMPERATURE,
    DEFAULT_UNIFORM_MIX,
    check_temperature,
    check_uniform_mix,
    device_count,
    gumbel_keys,
    importance_select,
)

#: Token strategies of :func:`select_tokens` (and of ``CGGRLoss``/``CGGRScorer``): the shared ones plus the
#: randomised rules of :mod:`cggr.sampling`.
TOKEN_STRATEGIES = (*SELECTION_STRATEGIES, "sampled", "importance")
#: Sequence strategies of :func:`select_sequences` (and of ``CGGRModel``).
SEQUENCE_STRATEGIES = ("topk", "random", "sampled", "importance")


class RatioSchedule:
    """Warm-up curriculum: ratio(step) = 1 - min(1, step / warmup_steps) · (1 - min_tokens_ratio).

    ``warmup_steps = 0`` means the minimum ratio from the first step.

    Args:
        min_tokens_ratio: Share of tokens kept once warm-up is over, in (0, 1].
        warmup_steps: Steps over which the ratio falls linearly from 1 to ``min_tokens_ratio``.
    """

    def __init__(self, min_tokens_ratio: float, warmup_steps: int) -> None:
        self.min_tokens_ratio = check_ratio("min_tokens_ratio", min_tokens_ratio)
        self.warmup_steps = check_int("warmup_steps", warmup_steps, minimum=0)

    def __call__(self, step: int) -> float:
        if self.warmup_steps == 0:
            return self.min_tokens_ratio
        progress = min(1.0, max(0, step) / self.warmup_steps)
        return 1.0 - progress * (1.0 - self.min_tokens_ratio)

    def at(self, step: Tensor) -> Tensor:
        """The same ratio from a 0-d integer step tensor, on its device without a host sync: fp64 (fp32 on MPS),
        the same operations as :meth:`__call__`, so the same value."""
        if self.warmup_steps == 0:
            return torch.full((), self.min_tokens_ratio, dtype=torch.float64, device=step.device)
        dtype = torch.float32 if step.device.type == "mps" else torch.float64
        progress = (step.clamp(min=0).to(dtype) / self.warmup_steps).clamp(max=1.0)
        return 1.0 - progress * (1.0 - self.min_tokens_ratio)

    def finished(self, step: int) -> bool:
        """True once the ratio no longer changes."""
        return step >= self.warmup_steps

    def __repr__(self) -> str:
        return f"RatioSchedule(min_tokens_ratio={self.min_tokens_ratio}, warmup_steps={self.warmup_steps})"


def dynamic_ratio(ratio: float | Tensor, mean_confidence: Tensor, sensitivity: float) -> Tensor:
    """ratio · (1 + (1 - mean confidence) · sensitivity), clamped to [ratio / 2, 1]; a 0-d fp32 tensor.

    Low confidence (the model is still learning) keeps more tokens; high confidence keeps fewer. A NaN mean
    confidence (NaN or inf logits at a valid position: the user's own) gives the scheduled ``ratio`` rather than a
    NaN ratio that would collapse K to 1; the NaN itself is not hidden: it counts as the hardest token and so
    reaches the loss. Compute the mean over valid positions only (:func:`cggr.scoring.masked_mean`).
    """
    if isinstance(ratio, Tensor):  # a scheduled ratio from the step buffer: fp32 like the float path
        base = ratio.float()
        r = base * (1.0 + (1.0 - mean_confidence.float()) * sensitivity)
        r = torch.minimum(torch.maximum(r, base / 2.0), torch.ones_like(r))
        return torch.where(torch.isnan(r), base, r)
    r = ratio * (1.0 + (1.0 - mean_confidence.float()) * sensitivity)
    r = r.clamp(min=ratio / 2.0, max=1.0)
    return torch.where(torch.isnan(r), torch.full_like(r, ratio), r)


def num_selected(ratio: float | Tensor, n_valid: Tensor) -> Tensor:
    """K = max(1, floor(ratio · n_valid + 1/2)), capped at n_valid; 0 where n_valid is 0. Long tensor."""
    # fp64 where the device has it, so that ratio · n is exact enough for the half-way rule.
    dtype = torch.float32 if n_valid.device.type == "mps" else torch.float64
    k = torch.floor(n_valid.to(dtype) * ratio + 0.5).long()
    k = torch.minimum(k.clamp(min=1), n_valid)
    return torch.where(n_valid > 0, k, torch.zeros_like(k))


def _descending_rank(keys: Tensor) -> Tensor:
    """Rank of every element when ``keys`` is sorted in descending order along the last dim (ties: first wins)."""
    order = torch.argsort(keys, dim=-1, descending=True, stable=True)
    positions = torch.arange(keys.shape[-1], device=keys.device).expand_as(keys)
    return torch.empty_like(order).scatter_(-1, order, positions)


def _ranking_keys(difficulty: Tensor, valid: Tensor) -> Tensor:
    """fp32 keys where every valid token outranks every invalid one and NaN counts as the hardest."""
    d = difficulty.float()
    d = torch.where(torch.isnan(d), torch.inf, d)
    finite_min = torch.finfo(torch.float32).min
    return torch.where(valid, d.clamp(min=finite_min), -torch.inf)


def _stratified(keys: Tensor, valid: Tensor, k: Tensor, num_strata: int, generator) -> Tensor:
    n = keys.numel()
    n_valid = valid.sum()
    rank = _descending_rank(keys)  # (N,), valid tokens first
    bucket = torch.where(valid, (rank * num_strata) // n_valid.clamp(min=1), num_strata)  # (N,) in [0, S]
    sizes = torch.zeros(num_strata + 1, dtype=torch.long, device=keys.device).scatter_add_(
        0, bucket, torch.ones_like(bucket)
    )[:num_strata]  # (S,)

    # Quotas ∝ S - i that sum to K: floors, then the remainder one each to the hardest buckets.
    weights = torch.arange(num_strata, 0, -1, device=keys.device)  # (S,) = S - i
    total_w = num_strata * (num_strata + 1) // 2
    quota = (k * weights) // total_w
    remainder = k - quota.sum()
    quota = quota + (torch.arange(num_strata, device=keys.device) < remainder).long()
    # Cap at the bucket sizes; hand the overflow to the hardest buckets that still have room (S is small).
    quota = torch.minimum(quota, sizes)
    overflow = k - quota.sum()
    parts = []
    for i in range(num_strata):
        add = torch.minimum(overflow, sizes[i] - quota[i])
        parts.append(quota[i] + add)
        overflow = overflow - add
    quota = torch.stack(parts)  # (S,)

    # Random order inside each bucket: sort by a random key, then stably by bucket.
    order = torch.argsort(uniform((n,), keys.device, generator))
    order = order[torch.argsort(bucket[order], stable=True)]  # (N,) grouped by bucket, random within
    pos = torch.empty_like(order).scatter_(0, order, torch.arange(n, device=keys.device))
    starts = torch.cumsum(sizes, 0) - sizes  # (S,)
    quota_ext = torch.cat([quota, quota.new_zeros(1)])
    starts_ext = torch.cat([starts, starts.new_zeros(1)])
    return valid & ((pos - starts_ext[bucket]) < quota_ext[bucket])


def _fill_sequences(mask: Tensor, keys: Tensor, valid: Tensor, min_per_seq: int) -> Tensor:
    # mask, keys, valid: (B, T)
    need = torch.minimum(valid.sum(-1), torch.full_like(valid.sum(-1), min_per_seq)) - (mask & valid).sum(-1)
    free = valid & ~mask
    rank = _descending_rank(torch.where(free, keys, -torch.inf))  # (B, T)
    return mask | (free & (rank < need.clamp(min=0).unsqueeze(-1)))


def select_tokens(
    difficulty: Tensor,
    valid: Tensor | None,
    ratio: float | Tensor,
    *,
    strategy: str = "topk",
    num_strata: int = 4,
    min_tokens_per_sequence: int = 1,
    generator: torch.Generator | CounterRNG | None = None,
    temperature: float = DEFAULT_TEMPERATURE,
    uniform_mix: float = DEFAULT_UNIFORM_MIX,
) -> Tensor:
    """Boolean mask of the tokens to keep.

    Args:
        difficulty: (N,) or (B, T) difficulty, higher = harder.
        valid: Bool mask of the same shape (False = ignored target), or ``None`` for all valid.
        ratio: Share of the valid tokens to keep, in (0, 1]: a float, or a 0-d floating-point tensor (the dynamic
            threshold's, a schedule's) on ``difficulty.device`` or the CPU. A tensor ratio is checked where the
            check costs no host sync: a CPU tensor eagerly (``ValueError``); a tensor on an accelerator with a
            device-side assert (``torch._assert_async``: no host sync, it surfaces as a ``RuntimeError`` at the
            next synchronisation, as the target range check does), also inside ``torch.compile``d code.
        strategy: ``'topk'``, ``'stratified'``, ``'sequence_aware'``, ``'fixed_quota'``, ``'random'``,
            ``'sampled'`` or ``'importance'`` (mask only; the weights: :func:`cggr.sampling.importance_select`).
        num_strata: Buckets for ``stratified``.
        min_tokens_per_sequence: Per-sequence floor for ``sequence_aware`` (rows of a 2-D input).
        generator: Random source for ``stratified``, ``random``, ``sampled`` and ``importance``: a
            ``torch.Generator`` on ``difficulty.device``, a :class:`cggr._rng.CounterRNG` (what the modules use:
            traceable by ``torch.compile``), or ``None`` (torch's global generator).
        temperature: τ > 0 of ``sampled`` (in difficulty units).
        uniform_mix: λ in (0, 1] of ``importance``.

    Returns:
        Bool tensor shaped like ``difficulty``; exactly K = max(1, round(ratio · n_valid)) True entries,
        all valid (``sequence_aware`` may add more).
    """
    check_choice("strategy", strategy, TOKEN_STRATEGIES)
    temperature = check_temperature(temperature)
    uniform_mix = check_uniform_mix(uniform_mix)
    num_strata = check_int("num_strata", num_strata, minimum=1)
    min_tokens_per_sequence = check_int("min_tokens_per_sequence", min_tokens_per_sequence, minimum=1)
    if not isinstance(difficulty, Tensor):
        raise TypeError(f"difficulty must be a 1-D (N,) or 2-D (B, T) tensor, got {type(difficulty).__name__}")
    if difficulty.dim() not in (1, 2):
        raise ValueError(
            f"difficulty must be a 1-D (N,) or 2-D (B, T) tensor, got "
            f"{tuple(difficulty.shape) if isinstance(difficulty, Tensor) else type(difficulty).__name__}"
        )
    if valid is None:
        valid = torch.ones_like(difficulty, dtype=torch.bool)
    elif not isinstance(valid, Tensor):
        raise TypeError(
            f"valid must be None or a bool tensor of shape {tuple(difficulty.shape)}, got {type(valid).__name__}"
        )
    elif valid.shape != difficulty.shape or valid.dtype != torch.bool:
        raise ValueError(
            f"valid must be a bool tensor of shape {tuple(difficulty.shape)}, got {valid.dtype} "
            f"{tuple(valid.shape)}"
        )
    if valid.device != difficulty.device:
        raise ValueError(f"valid is on {valid.device} but difficulty is on {difficulty.device}; move them together")
    if isinstance(ratio, Tensor):
        check_ratio_tensor(ratio, difficulty.device)
    else:
        check_ratio("ratio", ratio)

    shape = difficulty.shape
    keys = _ranking_keys(difficulty, valid).reshape(-1)  # (N,)
    flat_valid = valid.reshape(-1)
    k = num_selected(ratio, flat_valid.sum())  # 0-d long, on device

    if strategy == "random":
        rand_keys = torch.where(flat_valid, uniform(keys.shape, keys.device, generator), -1.0)
        mask = _descending_rank(rand_keys) < k
    elif strategy == "stratified":
        mask = _stratified(keys, flat_valid, k, num_strata, generator)
    elif strategy == "sampled":
        mask = _descending_rank(gumbel_keys(keys, flat_valid, temperature, generator)) < k
    elif strategy == "importance":
        mask = importance_select(difficulty.reshape(-1), flat_valid, k, uniform_mix=uniform_mix,
                                 generator=generator)[0]
    else:  # topk, fixed_quota, sequence_aware
        mask = _descending_rank(keys) < k
    mask = mask.view(shape)
    if strategy == "sequence_aware":
        rows = (1, -1) if len(shape) == 1 else shape
        mask = _fill_sequences(mask.view(rows), keys.view(rows), valid.view(rows), min_tokens_per_sequence)
        mask = mask.view(shape)
    return mask


def select_sequences(
    seq_difficulty: Tensor,
    k: int,
    *,
    strategy: str = "topk",
    generator: torch.Generator | CounterRNG | None = None,
    temperature: float = DEFAULT_TEMPERATURE,
    uniform_mix: float = DEFAULT_UNIFORM_MIX,
) -> Tensor:
    """Indices of the k sequences to train on: the hardest (``topk``), k at random (``random``), k drawn by
    Gumbel-top-k over difficulty / τ (``sampled``) or by unbiased importance sampling (``importance``; the
    1 / π weights: :func:`importance_sequences`).

    Args:
        seq_difficulty: (B,) one score per sequence; NaN counts as the hardest (``importance``: as the largest
            finite score; -inf marks a sequence that must not be kept, e.g. one without valid targets).
        k: How many to keep, 1 <= k <= B (a Python int, so the output shape is static).
        strategy: ``'topk'``, ``'random'``, ``'sampled'`` or ``'importance'``.
        generator: Random source for ``random``, ``sampled`` and ``importance`` (as in :func:`select_tokens`).
        temperature: τ > 0 of ``sampled``.
        uniform_mix: λ in (0, 1] of ``importance``.

    Returns:
        (k,) long tensor of batch indices.
    """
    check_choice("strategy", strategy, SEQUENCE_STRATEGIES)
    temperature = check_temperature(temperature)
    uniform_mix = check_uniform_mix(uniform_mix)
    if not isinstance(seq_difficulty, Tensor) or seq_difficulty.dim() != 1:
        raise ValueError(
            "seq_difficulty must be a 1-D (B,) tensor, got "
            f"{tuple(seq_difficulty.shape) if isinstance(seq_difficulty, Tensor) else type(seq_difficulty)}"
        )
    batch = seq_difficulty.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not (1 <= k <= batch):
        raise ValueError(f"k must be an int in [1, {batch}] (the batch size), got {k!r}")
    if strategy == "random":
        return permutation(batch, seq_difficulty.device, generator)[:k]
    if strategy == "importance":
        return importance_sequences(seq_difficulty, k, uniform_mix=uniform_mix, generator=generator)[0]
    d = seq_difficulty.float()
    d = torch.where(torch.isnan(d), torch.inf, d)
    if strategy == "sampled":
        d = gumbel_keys(d, d > -torch.inf, temperature, generator)
    return torch.topk(d, k, sorted=False).indices


def importance_sequences(
    seq_score: Tensor,
    k: int,
    *,
    uniform_mix: float = DEFAULT_UNIFORM_MIX,
    generator: torch.Generator | CounterRNG | None = None,
    valid: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """k distinct sequences by unbiased importance sampling, with their inclusion probabilities.

    Args:
        seq_score: (B,) importance scores (negative ones count as 0, NaN as the largest; see
            :mod:`cggr.sampling`); -inf (or ``valid`` False) marks a sequence that is never kept.
        k: How many to keep, 1 <= k <= B (a Python int). Fewer keepable sequences than k: the rest of the k
            indices are unkeepable ones with π = 0 (give them weight 0).
        uniform_mix: λ in (0, 1].
        generator: Random source.
        valid: Optional (B,) bool mask of keepable sequences (default: ``seq_score > -inf``).

    Returns:
        ``(idx (k,) long, pi (k,) inclusion probabilities of those indices (fp64; fp32 on MPS), ρ)``: weighting
        sequence ``idx[j]``'s loss by ``1 / pi[j]`` makes the sum an unbiased estimate of the batch's sum.
    """
    if valid is None:
        valid = seq_score > -torch.inf
    n_valid = valid.sum()
    k_eff = torch.minimum(device_count(k, seq_score.device), n_valid)
    mask, pi, rho = importance_select(seq_score, valid, k_eff, uniform_mix=uniform_mix, generator=generator)
    idx = torch.argsort((~mask).to(torch.int8), stable=True)[:k]  # the kept ones first
    return idx, pi.index_select(0, idx), rho


__all__ = [
    "SEQUENCE_STRATEGIES",
    "TOKEN_STRATEGIES",
    "RatioSchedule",
    "dynamic_ratio",
    "importance_sequences",
    "num_selected",
    "select_sequences",
    "select_tokens",
]
