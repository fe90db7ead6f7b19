"""Randomised selection rules: Gumbel-top-k sampling and unbiased importance sampling. No host synchronisation.

Shape legend: N candidates (tokens or sequences), K kept (a 0-d long tensor or a Python int).

Both rules keep exactly K valid candidates (K from :func:`cggr.selection.num_selected`), draw their randomness
from one :class:`cggr._rng.CounterRNG` draw (or a ``torch.Generator``), and keep every shape static, so they
compile and capture like ``topk`` and ``random``.

``sampled`` (Gumbel-top-k): key_i = score_i / τ + G_i with G_i = -log(-log U_i) i.i.d. Gumbel; keep the K largest
keys. This draws K candidates *without replacement* from the Plackett-Luce model with weights exp(score_i / τ):
the first pick is i with probability softmax(score / τ)_i, the next among the rest in proportion to the same
weights, and so on. τ → 0 is ``topk``, τ → ∞ is ``random`` (uniform). τ is in the score's units: with
``scoring='loss'`` (nats), τ = 1 keeps a sequence twice as often as one 0.69 nats easier at the first pick.
Selective Backprop (Jiang et al. 2019) and JEST (Evans et al. 2024) sample instead of taking the top: the top-k of a
noisy score concentrates on outliers, sampling keeps diversity.

``importance`` (unbiased importance sampling, Katharopoulos & Fleuret 2018): each candidate gets a sampling
weight p_i = (1 - λ) · s_i / Σ s + λ / n_valid with s_i = max(score_i, 0) (NaN and +inf scores count as the
largest finite score) and λ = ``uniform_mix`` in (0, 1]; inclusion probabilities π_i = min(1, c · p_i) with c
chosen so that Σ π_i = K (candidates with K · p_i ≥ 1 are always kept); K distinct candidates are drawn by
randomised systematic sampling (a random order, then the K points u, u + 1, ..., u + K - 1 on the cumulated π),
which keeps candidate i with probability exactly π_i. Weighting a kept candidate by 1 / π_i (Horvitz-Thompson)
makes Σ_kept loss_i / π_i an unbiased estimate of Σ_all loss_i, whatever the scores: the scores only move the
variance. With i.i.d. draws (with replacement) from p the weight is 1 / (n · p_i) per draw; the two coincide in
expectation (π_i ≈ K · p_i when nothing is capped). λ bounds every weight by n / (K · λ).

Variance estimate (``importance_variance_ratio``): with the scores taken as proxies of the per-candidate gradient
norms g_i (for the last layer ‖softmax(z) - onehot(y)‖ lies in [1 - p_y, √2 · (1 - p_y)] with p_y = exp(-nll)),
the per-draw second moment of the importance-sampled gradient over that of uniform sampling is
ρ = Σ g_i² / p_i / (n · Σ g_i²); ρ < 1 means the importance sampler's gradient has the smaller variance (by about
1 - ρ), ρ = 1 at λ = 1 (uniform). It is an estimate from the scores, not a measured gradient variance.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cggr._rng import CounterRNG, uniform
from cggr._validation import check_finite_float

#: Default share of the uniform distribution mixed into the importance sampler's probabilities.
DEFAULT_UNIFORM_MIX = 0.1
#: Default Gumbel-top-k temperature (in the score's units).
DEFAULT_TEMPERATURE = 1.0


def check_temperature(value: object) -> float:
    """τ of ``sampled``: a finite float > 0."""
    value = check_finite_float("temperature", value)
    if value <= 0.0:
        raise ValueError(f"temperature must be > 0 (tau -> 0 is 'topk'; use selection='topk' for it), got {value!r}")
    return value


def check_uniform_mix(value: object) -> float:
    """λ of ``importance``: a float in (0, 1] (0 would allow unbounded weights)."""
    value = check_finite_float("uniform_mix", value)
    if not 0.0 < value <= 1.0:
        raise ValueError(f"uniform_mix must be in (0, 1] (1 = uniform sampling), got {value!r}")
    return value


def device_count(k: Tensor | int, device: torch.device) -> Tensor:
    """K as a 0-d long tensor on ``device``: a fill kernel for an int (``torch.tensor(k, device=...)`` would be a
    host-to-device copy, which a CUDA graph cannot capture)."""
    if isinstance(k, Tensor):
        return k.to(device=device, dtype=torch.long)
    return torch.full((), int(k), dtype=torch.long, device=device)


def _prob_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def gumbel_keys(keys: Tensor, valid: Tensor, temperature: float, generator: torch.Generator | CounterRNG | None
                ) -> Tensor:
    """keys / τ + Gumbel noise for valid candidates, -inf elsewhere (fp32, shaped like ``keys``).

    Args:
        keys: Ranking keys (fp32; NaN already mapped to +inf, valid ones finite or +inf).
        valid: Bool mask of the same shape.
        temperature: τ > 0.
        generator: Random source (one draw of ``keys.numel()`` uniforms).
    """
    u = uniform(keys.shape, keys.device, generator)  # [0, 1), multiples of 2^-24
    u = u + 2.0**-25  # (0, 1): finite Gumbel noise
    g = -torch.log(-torch.log(u))
    lim = torch.finfo(torch.float32).max / 4  # keys / τ stays finite (a tiny τ must not turn a key into -inf)
    scaled = (keys.float() / temperature).clamp(min=-lim)
    return torch.where(valid, scaled + g, -torch.inf)


def sampling_weights(scores: Tensor, valid: Tensor, uniform_mix: float) -> tuple[Tensor, Tensor]:
    """(p, s): p_i = (1 - λ) · s_i / Σ s + λ / n_valid over valid candidates (0 elsewhere), s = max(score, 0).

    NaN and +inf scores count as the largest finite valid score; Σ s = 0 gives the uniform distribution.
    ``p`` is fp64 (fp32 on MPS), 1-D of length N; ``s`` the clamped scores in the same dtype.
    """
    dt = _prob_dtype(scores.device)
    s = scores.reshape(-1).to(dt)
    v = valid.reshape(-1)
    finite = torch.isfinite(s) & v
    top = torch.where(finite, s, 0.0).amax().clamp(min=0.0) if s.numel() else s.new_zeros(())
    s = torch.where(torch.isnan(s) | (s == torch.inf), top, s).clamp(min=0.0)
    s = torch.where(v, s, 0.0)
    n_valid = v.sum().to(dt)
    total = s.sum()
    share = torch.where(total > 0, s / total.clamp(min=torch.finfo(dt).tiny), 1.0 / n_valid.clamp(min=1))
    p = (1.0 - uniform_mix) * share + uniform_mix / n_valid.clamp(min=1)
    return torch.where(v, p, 0.0), s


def inclusion_probabilities(p: Tensor, k: Tensor | int) -> Tensor:
    """π_i = min(1, c · p_i) with Σ π = K (the candidates with the largest p are capped at 1 first).

    Args:
        p: (N,) non-negative sampling weights summing to 1 over the candidates that may be kept.
        k: K, 0 <= K <= the number of candidates with p > 0.

    Returns:
        (N,) π in p's dtype. With m the number of capped candidates (the smallest m such that
        (K - m) · p_(m+1) <= Σ_{j > m} p_(j) in descending order), π = 1 for the m largest and
        (K - m) · p_i / Σ_{j > m} p_(j) for the rest.
    """
    n = p.shape[0]
    k_t = device_count(k, p.device).to(p.dtype)
    if n == 0:
        return p.clone()
    ps, order = torch.sort(p, descending=True, stable=True)  # (N,)
    tail = torch.flip(torch.cumsum(torch.flip(ps, [0]), 0), [0])  # tail[m] = Σ_{j >= m} ps[j]
    m = torch.arange(n, device=p.device, dtype=p.dtype)
    ok = ((k_t - m) * ps <= tail * (1.0 + 1e-12)) | (m >= k_t)  # m capped candidates suffice
    m_star = torch.argmax(ok.to(torch.int8))  # first True (a True always exists: m = K - 1 or K)
    tail_m = tail.gather(0, m_star.view(1)).squeeze(0)  # a gather, not tail[m_star]: no data-dependent index
    scale = (k_t - m_star.to(p.dtype)) / tail_m.clamp(min=torch.finfo(p.dtype).tiny)
    pi_sorted = torch.where(m < m_star.to(p.dtype), 1.0, (ps * scale).clamp(max=1.0))
    return torch.empty_like(pi_sorted).scatter_(0, order, pi_sorted)


def systematic_sample(pi: Tensor, k: Tensor | int, generator: torch.Generator | CounterRNG | None) -> Tensor:
    """Bool (N,) mask of exactly K distinct candidates, candidate i kept with probability π_i (Σ π = K, π <= 1).

    Randomised systematic sampling: candidates in a uniformly random order, cumulated π (rescaled so the total
    is exactly K), one uniform start u; candidate j is kept when an integer-spaced point u + m (m = 0..K-1) falls
    in its interval [C_(j-1), C_j). One random draw of N + 1 uniforms.
    """
    n = pi.shape[0]
    dt = pi.dtype
    k_t = device_count(k, pi.device)
    r = uniform((n + 1,), pi.device, generator)  # n order keys, then the start u
    order = torch.argsort(r[:n], stable=True)  # a uniformly random order
    u = r[n].to(dt)
    pi_perm = pi.index_select(0, order)
    c = torch.cumsum(pi_perm, 0)  # (N,)
    k_f = k_t.to(dt)
    if n:
        c = c * (k_f / c[-1].clamp(min=torch.finfo(dt).tiny))  # total exactly K (up to rounding) ...
        c = torch.cat([c[:-1].clamp(max=k_f), k_f.reshape(1)])  # ... and the last one exactly K
    prev = torch.cat([c.new_zeros(1), c[:-1]])

    def points_below(x: Tensor) -> Tensor:  # #{m in [0, K): u + m < x}
        return torch.minimum(torch.ceil(x - u).clamp(min=0), k_f)

    hits = points_below(c) - points_below(prev)  # (N,) in {0, 1} (2 only on a rounding knife edge)
    # exactly K: rank by hits (then π); telescoping makes Σ hits = K, this also covers the knife edge
    key = torch.where(pi_perm > 0, hits + pi_perm * 0.5, -1.0)
    rank_sorted = torch.argsort(torch.argsort(key, descending=True, stable=True), stable=True)
    mask_perm = rank_sorted < k_t
    return torch.empty_like(mask_perm).scatter_(0, order, mask_perm)


def variance_ratio(p: Tensor, s: Tensor, valid: Tensor) -> Tensor:
    """ρ = Σ s_i² / p_i / (n · Σ s_i²) over valid candidates (1.0 when every s is 0); 0-d fp32.

    The per-draw second moment of the importance-weighted gradient over that of uniform sampling, with the
    scores ``s`` as gradient-norm proxies: ρ < 1 means importance sampling has the lower variance.
    """
    v = valid.reshape(-1)
    n = v.sum().to(p.dtype)
    s2 = torch.where(v, s * s, 0.0)
    num = torch.where(v & (p > 0), s2 / p.clamp(min=torch.finfo(p.dtype).tiny), 0.0).sum()
    den = n * s2.sum()
    return torch.where(den > 0, num / den.clamp(min=torch.finfo(p.dtype).tiny), 1.0).float()


def importance_select(
    scores: Tensor,
    valid: Tensor | None,
    k: Tensor | int,
    *,
    uniform_mix: float = DEFAULT_UNIFORM_MIX,
    generator: torch.Generator | CounterRNG | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Unbiased importance sampling of exactly K candidates.

    Args:
        scores: (N,) or (B, T) non-negative importance scores (negative ones count as 0).
        valid: Bool mask of the same shape, or ``None`` for all valid.
        k: How many to keep (0-d long tensor or int), at most the number of valid candidates.
        uniform_mix: λ in (0, 1].
        generator: Random source (one draw of N + 1 uniforms).

    Returns:
        ``(mask, pi, variance_ratio)``: bool mask shaped like ``scores`` with exactly K valid True entries;
        π (inclusion probabilities, fp64 — fp32 on MPS — shaped like ``scores``, 0 where invalid); ρ (0-d fp32,
        see the module docstring). ``Σ_kept x_i / π_i`` is an unbiased estimate of ``Σ_valid x_i``.
    """
    uniform_mix = check_uniform_mix(uniform_mix)
    if valid is None:
        valid = torch.ones_like(scores, dtype=torch.bool)
    p, s = sampling_weights(scores, valid, uniform_mix)
    pi = inclusion_probabilities(p, k)
    mask = systematic_sample(pi, k, generator) & valid.reshape(-1)
    return mask.view(scores.shape), pi.view(scores.shape), variance_ratio(p, s, valid)


__all__ = [
    "DEFAULT_TEMPERATURE",
    "DEFAULT_UNIFORM_MIX",
    "check_temperature",
    "check_uniform_mix",
    "device_count",
    "gumbel_keys",
    "importance_select",
    "inclusion_probabilities",
    "sampling_weights",
    "systematic_sample",
    "variance_ratio",
]
