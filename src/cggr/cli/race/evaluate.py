"""Held-out evaluation of ``cggr race``, always with the training clock stopped: per-block losses, the probe subset
(the curve's points and the ladder's rungs), the full held-out set at the end of an arm (bootstrap SE, per group),
and exact-match accuracy on the arithmetic task.

Shape legend: N held-out blocks; n of them in the probe subset; b blocks per evaluation batch; T tokens per block;
V vocabulary.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from cggr.cli.data import RaceData
from cggr.cli.race.arms import autocast_context

if TYPE_CHECKING:
    from cggr.cli.race.context import RaceContext

@torch.no_grad()
def heldout_block_losses(model, ids: torch.Tensor, mask: torch.Tensor, device: torch.device, dtype: str,
                         batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per held-out block: (summed next-token cross-entropy in nats, float64 (N,); target tokens, int64 (N,)).

    ``ids`` / ``mask``: (N, T) on any device; the target of position t is the token at t + 1, padding (mask
    False) ignored. The sums stay on the device until the end (one host read per call).
    """
    was_training = model.training
    model.eval()
    sums, counts = [], []
    for start in range(0, ids.shape[0], batch_size):
        x = ids[start : start + batch_size].to(device)  # (b, T)
        m = mask[start : start + batch_size].to(device)  # (b, T)
        with autocast_context(device, dtype):
            logits = model(input_ids=x, attention_mask=m.long()).logits[:, :-1]  # (b, T-1, V)
        targets = x[:, 1:].masked_fill(~m[:, 1:], -100)  # (b, T-1)
        nll = F.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=-100, reduction="none")
        sums.append(nll.double().sum(-1))  # (b,)
        counts.append(m[:, 1:].sum(-1))  # (b,)
    model.train(was_training)
    return torch.cat(sums).cpu(), torch.cat(counts).cpu()


def heldout_loss(model, data: RaceData, device: torch.device, dtype: str, batch_size: int) -> float:
    """Token-weighted mean next-token cross-entropy (nats) over all of ``data``'s held-out sequences."""
    sums, counts = heldout_block_losses(model, data.eval_ids, data.eval_mask, device, dtype, batch_size)
    return float(sums.sum()) / max(int(counts.sum()), 1)


@torch.no_grad()
def arithmetic_accuracy(model, data: RaceData, device: torch.device, dtype: str, batch_size: int,
                        problems: list | None = None) -> float:
    """Exact-match accuracy of greedy completions of the held-out problems (answer after ``####``); ``problems``:
    a subset of ``data.problems`` (default all)."""
    from cggr.cli.arithmetic import exact_match_accuracy

    was_training = model.training
    model.eval()
    tok = data.tokenizer
    problems = data.problems if problems is None else problems
    prompts = tok.encode([p.prompt for p in problems])
    max_new = max(len(ids) for ids in tok.encode([p.completion for p in problems])) + 4
    completions: list[str] = []
    for start in range(0, len(prompts), batch_size):
        rows = prompts[start : start + batch_size]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), tok.eos_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):  # left padding, so every prompt ends at the last column
            ids[i, width - len(row) :] = torch.tensor(row)
            mask[i, width - len(row) :] = 1
        with autocast_context(device, dtype):
            out = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new, do_sample=False,
                eos_token_id=tok.eos_id, pad_token_id=tok.eos_id,
            )
        completions += [tok.decode(row[width:].tolist()) for row in out.cpu()]
    model.train(was_training)
    return exact_match_accuracy(completions, [p.answer for p in problems])


def probe_indices(num_blocks: int, count: int) -> torch.Tensor:
    """(min(count, num_blocks),) evenly spaced indices into the held-out blocks: the probe subset."""
    if count >= num_blocks:
        return torch.arange(num_blocks)
    return torch.linspace(0, num_blocks - 1, count).round().long().unique()



def probe_eval(model, sh: RaceContext, *, accuracy: bool) -> dict[str, float]:
    """The probe blocks' token-weighted held-out loss (and, on arithmetic with ``accuracy``, their exact-match
    accuracy)."""
    from cggr.cli.timing import synchronize

    ids, mask = sh.data.eval_ids[sh.probe], sh.data.eval_mask[sh.probe]
    sums, counts = heldout_block_losses(model, ids, mask, sh.env.device, sh.cfg.dtype, sh.eval_bs)
    point = {"heldout_loss": float(sums.sum()) / max(int(counts.sum()), 1)}
    if accuracy and sh.data.problems:
        problems = [sh.data.problems[i] for i in sh.probe.tolist()]
        point["accuracy"] = arithmetic_accuracy(model, sh.data, sh.env.device, sh.cfg.dtype, 64, problems=problems)
    synchronize(sh.env.device)
    return point


def full_eval(model, sh: RaceContext) -> dict[str, Any]:
    """The full held-out set: token-weighted loss, its bootstrap SE over blocks, per group, per-block losses."""
    from cggr.cli.stats import bootstrap_se

    sums, counts = heldout_block_losses(model, sh.data.eval_ids, sh.data.eval_mask, sh.env.device, sh.cfg.dtype,
                                        sh.eval_bs)
    tokens = counts.double().clamp(min=1)
    per_block = (sums / tokens).tolist()
    weights = counts.double().tolist()
    probe_sums, probe_counts = sums[sh.probe], counts[sh.probe]
    out: dict[str, Any] = {
        "loss": float(sums.sum()) / max(int(counts.sum()), 1),
        "se": bootstrap_se(per_block, weights) if len(per_block) > 1 else None,
        "block_losses": [round(x, 5) for x in per_block],
        "probe_loss": float(probe_sums.sum()) / max(int(probe_counts.sum()), 1),  # the probe's, same numbers
    }
    groups = sh.data.eval_groups or ["all"] * len(per_block)
    by_group = {}
    for g in dict.fromkeys(groups):
        sel = [i for i, h in enumerate(groups) if h == g]
        tok = sum(weights[i] for i in sel)
        by_group[g] = {"loss": sum(float(sums[i]) for i in sel) / max(tok, 1.0), "blocks": len(sel)}
    out["by_group"] = by_group
    return out



__all__ = ["arithmetic_accuracy", "full_eval", "heldout_block_losses", "heldout_loss", "probe_eval", "probe_indices"]
