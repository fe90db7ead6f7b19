"""The selection rules of the equal-steps study (benchmarks/study_selection.py) and the training steps they share.

Shape legend: S sequences scanned per step, k sequences trained on per step, T tokens per sequence, V vocabulary.
The plain-torch prototypes here are checked against :class:`cggr.CGGRModel`'s choices at every step of a run
(``--impl library``); the study's module docstring describes each rule.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F

from cggr.cli.data import BatchStream
from cggr.cli.race import lr_at


@torch.no_grad()
def scan(model, ids: torch.Tensor, *, bound: bool = False, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-sequence mean next-token loss of (n, T) ``ids`` (every token valid), and optionally the mean over
    tokens of ‖softmax(z) − onehot(y)‖₂ (the per-token bound on the last layer's gradient norm): (n,), (n,)."""
    losses, bounds = [], []
    for chunk in ids.split(batch):
        logits = model(input_ids=chunk).logits[:, :-1].float()  # (b, T-1, V)
        targets = chunk[:, 1:]  # (b, T-1)
        logp = logits.log_softmax(-1)
        nll = -logp.gather(-1, targets[..., None])[..., 0]  # (b, T-1)
        losses.append(nll.mean(-1))
        if bound:
            p = logp.exp()
            sq = (p * p).sum(-1) - 2 * p.gather(-1, targets[..., None])[..., 0] + 1  # (b, T-1)
            bounds.append(sq.clamp(min=0).sqrt().mean(-1))
    return torch.cat(losses), (torch.cat(bounds) if bound else None)


def seq_losses(model, ids: torch.Tensor) -> torch.Tensor:
    """(n,) per-sequence mean next-token loss of (n, T) ``ids``, with grad."""
    logits = model(input_ids=ids).logits[:, :-1]  # (n, T-1, V)
    nll = F.cross_entropy(logits.float().transpose(1, 2), ids[:, 1:], reduction="none")  # (n, T-1)
    return nll.mean(-1)


def make_optimizer(model, lr: float) -> torch.optim.Optimizer:
    """The race's optimizer: AdamW, betas (0.9, 0.95), weight decay 0.1."""
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)


def train_step(model, opt, ids: torch.Tensor, lr: float,
               weights: torch.Tensor | None = None) -> tuple[float, torch.Tensor]:
    """One AdamW step on the (weighted) mean of the per-sequence losses of (n, T) ``ids``; clip at 1 (the race's).
    Returns (the step's loss, the (n,) detached per-sequence losses of the training forward, i.e. before the
    update): the second is what the stale rules keep, at no extra cost."""
    for g in opt.param_groups:
        g["lr"] = lr
    per_seq = seq_losses(model, ids)  # (n,)
    loss = per_seq.mean() if weights is None else (per_seq * weights).sum()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach()), per_seq.detach()


def train_plain(model, blocks: torch.Tensor, *, steps: int, batch: int, lr: float, seed: int) -> tuple[float, float]:
    """``steps`` steps of plain training on ``batch`` blocks per step (seeded order); returns (wall, CPU) seconds
    (the CPU time is the cost on a shared machine; the wall time includes waiting for other processes)."""
    t0, c0 = time.perf_counter(), time.process_time()
    opt = make_optimizer(model, lr)
    stream = BatchStream(blocks.shape[0], seed)
    model.train()
    for step in range(steps):
        train_step(model, opt, blocks[stream.take(batch)], lr_at(step / steps, lr))  # (loss, per-seq): unused
    return time.perf_counter() - t0, time.process_time() - c0


def zscore(x: torch.Tensor) -> torch.Tensor:
    """Standardised over the S (population sd, as ``cggr.reference.excess_scores(normalize='zscore')``)."""
    return (x - x.mean()) / x.std(unbiased=False).clamp(min=1e-6)


def percentile(x: torch.Tensor) -> torch.Tensor:
    """Rank of each entry over the S scaled to [0, 1] (0 = lowest; ties by position), as the library's 'rank'."""
    rank = torch.empty_like(x, dtype=torch.long)
    rank[torch.argsort(x, stable=True)] = torch.arange(len(x))
    return rank.float() / max(len(x) - 1, 1)


def gumbel_topk(score: torch.Tensor, k: int, tau: float, g: torch.Generator) -> torch.Tensor:
    """k indices without replacement with Plackett-Luce probabilities ∝ exp(score / τ) (Gumbel-top-k)."""
    u = torch.rand(score.shape, generator=g).clamp(1e-12, 1 - 1e-12)
    return torch.topk(score / tau - torch.log(-torch.log(u)), k).indices


STALE_RULES = ("unseen-first", "stale-hardest", "stale-reducible-norm")  # and stale-sampled-t<τ>


def is_stale(rule: str) -> bool:
    """Whether the rule chooses from the per-block table of stale training losses (never from a scan)."""
    return rule in STALE_RULES or rule.startswith("stale-sampled-t")


def needs_scan(rule: str) -> bool:
    """Whether the rule reads the learner's losses (a no-grad forward over the S) before choosing."""
    return (rule not in ("random", "all", "ref-low") and not rule.startswith("ref-filter")
            and not is_stale(rule))


def update_stale(table: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor, per_seq: torch.Tensor) -> None:
    """Write the (k,) training losses ``per_seq`` of the trained ``rows`` of the S into the (P,) per-pool-block
    ``table`` at their pool indices ``idx[rows]``; every other entry keeps its value (+inf: never trained)."""
    table[idx[rows]] = per_seq.to(table.dtype)


def unseen_first_order(stale: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """(S,) the candidates in a uniformly random order, then stably the never-trained ones (stale = +inf) first:
    ties among the unseen, and among the seen, are broken uniformly at random (not by position)."""
    perm = torch.randperm(stale.shape[0], generator=g)
    return perm[torch.argsort((~torch.isinf(stale[perm])).long(), stable=True)]


def choose_stale(rule: str, k: int, stale: torch.Tensor, ref: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """(k,) chosen rows of the S from the (S,) stale training losses (+inf = never trained) and (S,) reference
    losses; no forward. Every stale rule takes the unseen first (uniformly among them); the rules differ in how
    they rank the seen:

    * ``unseen-first``: uniformly at random (the coverage control);
    * ``stale-hardest``: by stale loss, highest first;
    * ``stale-reducible-norm``: by z(stale) − z(reference), z over the seen candidates of the step;
    * ``stale-sampled-t<τ>``: Gumbel-top-k over that score / τ.
    """
    order = unseen_first_order(stale, g)  # (S,)
    if rule == "unseen-first":
        return order[:k]
    if rule == "stale-hardest":  # stable over the random order: equal losses (the +inf above all) tie uniformly
        return order[torch.argsort(-stale[order], stable=True)][:k]
    seen = order[~torch.isinf(stale[order])]
    unseen = order[: len(order) - len(seen)]
    need = k - len(unseen)
    if need <= 0:
        return unseen[:k]
    score = zscore(stale[seen].double()) - zscore(ref[seen].double())  # (n_seen,)
    if rule == "stale-reducible-norm":
        pick = torch.topk(score, need).indices
    elif rule.startswith("stale-sampled-t"):
        pick = gumbel_topk(score, need, float(rule[len("stale-sampled-t"):]), g)
    else:
        raise ValueError(f"unknown stale rule {rule!r}")
    return torch.cat([unseen, seen[pick]])


def choose(rule: str, k: int, loss: torch.Tensor | None, bound: torch.Tensor | None, ref: torch.Tensor,
           g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(chosen rows of the S, per-row loss weights or None for the plain mean) of one rule on one step."""
    s = ref.shape[0]
    if rule == "random":
        return torch.randperm(s, generator=g)[:k], None
    if rule == "all":
        return torch.arange(s), None
    if rule == "hardest":
        return torch.topk(loss, k).indices, None
    if rule == "reducible":
        return torch.topk(loss - ref, k).indices, None
    if rule == "reducible-norm":
        return torch.topk(zscore(loss) - zscore(ref), k).indices, None
    if rule == "reducible-rank":
        return torch.topk(percentile(loss) - percentile(ref), k).indices, None
    if rule.startswith("sampled-t"):
        return gumbel_topk(zscore(loss) - zscore(ref), k, float(rule[len("sampled-t"):]), g), None
    if rule.startswith("ref-filter"):  # ref-filter: drop 1/8; ref-filter-q<f>: drop the share f
        drop = max(1, round(s * (float(rule[len("ref-filter-q"):]) if rule != "ref-filter" else 0.125)))
        keep = torch.topk(ref, s - drop, largest=False).indices
        return keep[torch.randperm(len(keep), generator=g)[:k]], None
    if rule == "ref-low":
        return torch.topk(ref, k, largest=False).indices, None
    if is_stale(rule):
        raise ValueError(f"{rule!r} chooses from stale losses: call choose_stale")
    if rule in ("importance", "importance-bound"):  # with replacement; size: the loss, or the gradient bound
        size = loss if rule == "importance" else bound
        p = 0.5 * size / size.sum() + 0.5 / s  # (S,)
        draws = torch.multinomial(p, k, replacement=True, generator=g)  # (k,)
        rows, counts = torch.unique(draws, return_counts=True)
        return rows, counts.double() / (k * s * p[rows].double())  # sum_j w(i_j) L(i_j) / k, w = 1 / (S p)
    raise ValueError(f"unknown rule {rule!r}")


def library_settings(rule: str) -> dict[str, Any] | None:
    """``CGGRModel`` keyword arguments of ``rule``, or ``None`` when the library has no such rule."""
    if rule == "random":
        return {"selection": "random"}
    if rule == "hardest":
        return {"scoring": "loss", "selection": "topk"}
    if rule == "reducible":
        return {"scoring": "reducible", "selection": "topk", "reference_norm": "none"}
    if rule == "reducible-norm":
        return {"scoring": "reducible", "selection": "topk", "reference_norm": "zscore"}
    if rule == "reducible-rank":
        return {"scoring": "reducible", "selection": "topk", "reference_norm": "rank"}
    if rule.startswith("sampled-t"):
        return {"scoring": "reducible", "selection": "sampled", "reference_norm": "zscore",
                "temperature": float(rule[len("sampled-t"):])}
    if rule == "importance":
        return {"scoring": "loss", "selection": "importance", "uniform_mix": 0.5}
    return None


class CapturingRouter:
    """The learner itself as ``CGGRModel``'s router (an oracle scan: full model, no grad inside CGGRModel); keeps
    the last logits so the study can place the picks among the S without a second forward."""

    def __init__(self, model) -> None:
        self.model, self.logits = model, None

    def __call__(self, input_ids: torch.Tensor, **kwargs):
        out = self.model(input_ids=input_ids, **kwargs)
        self.logits = out.logits  # (S, T, V), computed under CGGRModel's no_grad
        return out


def logits_losses(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(S,) per-sequence mean next-token loss from (S, T, V) logits of (S, T) ids."""
    logp = logits[:, :-1].float().log_softmax(-1)
    return -logp.gather(-1, ids[:, 1:, None])[..., 0].mean(-1)
