"""Independent fp64 brute-force references used by the tests (naive loops and textbook formulas)."""

from __future__ import annotations

import math

import torch


def scores_fp64(logits: torch.Tensor, targets: torch.Tensor | None, ignore_index: int = -100) -> dict:
    """Entropy, confidence, margin, nll of every row, computed row by row in float64."""
    z = logits.detach().double().reshape(-1, logits.shape[-1]).cpu()
    t = targets.reshape(-1).cpu() if targets is not None else None
    out = {"entropy": [], "confidence": [], "margin": [], "nll": []}
    for i in range(z.shape[0]):
        row = z[i]
        p = torch.exp(row - row.max())
        p = p / p.sum()
        ent = -sum(float(pj) * math.log(float(pj)) for pj in p if pj > 0)
        ps = sorted((float(x) for x in p), reverse=True)
        out["entropy"].append(ent)
        out["confidence"].append(ps[0])
        out["margin"].append(ps[0] - ps[1] if len(ps) > 1 else ps[0])
        if t is not None:
            if int(t[i]) == ignore_index:
                out["nll"].append(0.0)
            else:
                lse = float(row.max()) + math.log(float(torch.exp(row - row.max()).sum()))
                out["nll"].append(lse - float(row[int(t[i])]))
    shape = logits.shape[:-1]
    res = {k: torch.tensor(v, dtype=torch.float64).view(shape) for k, v in out.items() if v}
    res["nll"] = res.get("nll")
    return res


def difficulty_fp64(ref: dict, mode: str, vocab: int) -> torch.Tensor:
    has_nll = ref["nll"] is not None
    if mode == "entropy":
        return ref["entropy"]
    if mode == "margin":
        return 1 - ref["margin"]
    if mode == "loss":
        return ref["nll"] if has_nll else ref["entropy"]
    inv = 1 / math.log(vocab) if vocab > 1 else 0.0
    d = ref["entropy"] * inv + (1 - ref["margin"])
    return d + ref["nll"] * inv if has_nll else d


def brute_difficulty(logits: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
    """'combined' difficulty in fp64 by the definitions of docs/design.md §4.2: H / ln V + (1 - top-2 margin)
    + nll / ln V (nll only where a target is)."""
    z = logits.double()
    p = torch.softmax(z, -1)
    ent = -(p * torch.log(p)).sum(-1)
    top = torch.sort(p, -1, descending=True).values
    out = ent / math.log(z.shape[-1]) + 1 - (top[..., 0] - top[..., 1])
    if targets is not None:
        nll = torch.logsumexp(z, -1) - torch.gather(z, -1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        out = out + torch.where(targets >= 0, nll, 0.0) / math.log(z.shape[-1])
    return out


def k_of(ratio: float, n_valid: int) -> int:
    """K = max(1, round-half-up(ratio · n_valid)), 0 for an empty batch."""
    if n_valid == 0:
        return 0
    return min(n_valid, max(1, math.floor(ratio * n_valid + 0.5)))


def topk_set(diff: torch.Tensor, valid: torch.Tensor, ratio: float) -> set[int]:
    """Indices (flattened) of the K hardest valid tokens, by a plain Python sort."""
    d = diff.reshape(-1).tolist()
    v = valid.reshape(-1).tolist()
    idx = [i for i in range(len(d)) if v[i]]
    idx.sort(key=lambda i: (-(math.inf if math.isnan(d[i]) else d[i]), i))
    return set(idx[: k_of(ratio, len(idx))])


def stratified_quotas(k: int, sizes: list[int]) -> list[int]:
    """Quota per bucket ∝ S - i (largest remainder to the hardest), capped, overflow to the hardest with room."""
    s = len(sizes)
    w = [s - i for i in range(s)]
    total = sum(w)
    q = [k * wi // total for wi in w]
    rem = k - sum(q)
    for i in range(rem):
        q[i] += 1
    q = [min(qi, si) for qi, si in zip(q, sizes)]
    over = k - sum(q)
    for i in range(s):
        add = min(over, sizes[i] - q[i])
        q[i] += add
        over -= add
    return q


# ------------------------------------------------------------------ linear cross-entropy (hidden states + head)
def lce_inputs(shape, h, v, dtype=torch.float64, seed=0, bias=True, ignore_every=5, scale=2.0):
    """Leaf (hidden (*shape, h), weight (v, h), bias (v,) or None) and targets (shape) with every
    ``ignore_every``-th target ignored; logits ~ N(0, scale²)."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, h, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=gen, dtype=torch.float64) * (scale / h**0.5)).to(dtype).requires_grad_()
    b = (torch.randn(v, generator=gen, dtype=torch.float64) * 0.5).to(dtype).requires_grad_() if bias else None
    t = torch.randint(0, v, shape, generator=gen)
    if ignore_every:
        t.view(-1)[1::ignore_every] = -100
    return hidden, weight, b, t


def lce_logits64(hidden, weight, b, softcap):
    """fp64 logits hidden @ weight.T (+ b), soft-capped; differentiable."""
    z = hidden.double() @ weight.double().t()
    if b is not None:
        z = z + b.double()
    return softcap * torch.tanh(z / softcap) if softcap is not None else z


def lce_naive(hidden, weight, b, t, mask, softcap, reduction):
    """fp64 loss and [d hidden, d weight(, d bias)] with materialised logits, over the tokens in ``mask``."""
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    bb = b.detach().double().requires_grad_() if b is not None else None
    z = lce_logits64(h, w, bb, softcap).reshape(-1, w.shape[0])
    logp = torch.log_softmax(z, dim=-1)
    nll = -logp.gather(1, t.reshape(-1).clamp(min=0)[:, None]).squeeze(1)
    m = mask.reshape(-1).double()
    loss = (nll * m).sum()
    if reduction == "mean":
        loss = loss / m.sum().clamp(min=1)
    loss.backward()
    return loss.detach(), [h.grad, w.grad] + ([bb.grad] if bb is not None else [])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-relative error ||a - b|| / ||b|| computed in float64 (a zero ``b`` counts as 1e-300)."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-300))
