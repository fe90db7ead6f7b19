"""Training of one arm run in ``cggr race``: the stop-before-overrun budget rule (:func:`plan_chunk`), chunks of
steps timed on the race's clock (:func:`run_chunk`), the budget ladder's decay branches, and
:func:`train_arm`, which trains one arm of one replicate with its evaluations and returns an :class:`ArmResult`.

Shape legend: N_train training blocks; per = the rows one step reads (B or S); T tokens per block.

Clock: every arm trains for the same wall-clock budget, and never past it: a step is started only when the arm's
measured step time (the largest of its recent steps, or of its untimed warm-up step at first) says it fits. A step
that turns out slower than that estimate can still end past the budget: :meth:`ArmResult.row` records it as
``overrun_seconds`` and the race warns about it and marks it on the plot. Evaluations and the ladder's decay
branches run with the clock stopped; ``wall_seconds`` is the run's whole wall-clock time.

No per-step host sync on GPUs: steps run in chunks (about a second of work, at most 2% of the budget) with one
CUDA synchronise and one read of the accumulated loss and token counts per chunk; the training data are put on
the device once. On CPUs a chunk is one step (CPU steps are synchronous anyway).
"""

from __future__ import annotations

import copy
import gc
import hashlib
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from cggr.cli.data import BatchStream
from cggr.cli.race.arms import ARM_SPECS, Arm, arm_scan
from cggr.cli.race.config import COOLDOWN_FRACTION, wsd_lr
from cggr.cli.race.context import RaceContext, RaceEnv
from cggr.cli.race.evaluate import full_eval, probe_eval
from cggr.cli.race.progress import RaceProgress


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 (first 16 hex digits) of every parameter's bytes in ``state_dict`` order."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]



@dataclass
class ArmResult:
    """What one arm did and reached in one replicate (seed); the JSON rows are :meth:`row`."""

    arm: str
    init_digest: str
    seed: int = 0  # the replicate's init seed
    data_seed: int = 0  # this arm's data seed (the A/A arm's differs)
    order: int = 0  # position of the arm in its replicate's running order
    budget_seconds: float = 0.0
    steps: int = 0
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    ladder_seconds: float = 0.0  # training time of the ladder's decay branches (off the main clock)
    wall_seconds: float = 0.0  # the whole run: warm-up, training, evaluations and ladder branches
    sequences_scanned: int = 0
    tokens_scanned: int = 0
    tokens_backpropagated: int = 0  # tokens through the full model's forward + backward
    tokens_in_loss: int = 0
    router_tokens: int = 0  # tokens through the router's no-grad forward
    first_sequences: list[int] = field(default_factory=list)
    curve: list[dict[str, float]] = field(default_factory=list)
    ladder: list[dict[str, float]] = field(default_factory=list)
    last_train_loss: float = float("nan")
    step_seconds: list[float] = field(default_factory=list)
    epochs: float = 0.0  # passes over the training sequences read by this arm
    cpu_seconds: float = 0.0  # process CPU time during the timed steps (contention check on CPU runs)
    heldout: dict[str, Any] = field(default_factory=dict)  # the full held-out set at the end

    def row(self) -> dict[str, Any]:
        final = self.curve[-1] if self.curve else {}
        return {
            "arm": self.arm, "seed": self.seed, "data_seed": self.data_seed, "order": self.order,
            "steps": self.steps, "budget_seconds": round(self.budget_seconds, 3),
            "train_seconds": round(self.train_seconds, 3), "eval_seconds": round(self.eval_seconds, 2),
            "overrun_seconds": round(max(0.0, self.train_seconds - self.budget_seconds), 3),
            "ladder_seconds": round(self.ladder_seconds, 2), "wall_seconds": round(self.wall_seconds, 2),
            "sequences_scanned": self.sequences_scanned,
            "tokens_scanned": self.tokens_scanned, "tokens_backpropagated": self.tokens_backpropagated,
            "tokens_in_loss": self.tokens_in_loss, "router_tokens": self.router_tokens, "epochs": self.epochs,
            "heldout_loss": self.heldout.get("loss", final.get("heldout_loss")),
            "heldout_se": self.heldout.get("se"), "heldout_by_group": self.heldout.get("by_group"),
            "probe_loss": final.get("heldout_loss"), "accuracy": final.get("accuracy"),
            "last_train_loss": self.last_train_loss, "init_digest": self.init_digest,
            "cpu_utilisation": (self.cpu_seconds / (self.train_seconds * torch.get_num_threads())
                                if self.train_seconds else None),
            "median_step_seconds": statistics.median(self.step_seconds) if self.step_seconds else None,
            "max_step_seconds": max(self.step_seconds, default=None),
            "first_sequences": self.first_sequences, "curve": self.curve, "ladder": self.ladder,
            "block_losses": self.heldout.get("block_losses"),
        }


def plan_chunk(elapsed: float, estimate: float, hard_end: float, soft_end: float, max_steps: int) -> int:
    """Steps to run next: none that would end past ``hard_end`` (the budget) by the step-time ``estimate``,
    enough to reach ``soft_end`` (the next evaluation or ladder point), at most ``max_steps``.

    Returns 0 when not even one step fits: the arm stops *before* a step that would overrun its budget.
    """
    fit = math.floor((hard_end - elapsed) / estimate + 1e-9) if estimate > 0 else max_steps
    if fit < 1:
        return 0
    want = max(1, math.ceil((soft_end - elapsed) / estimate - 1e-9)) if estimate > 0 else 1
    return max(1, min(fit, want, max_steps))


class _Track:
    """One training trajectory on its own clock: an arm's main run, or a ladder rung's decay branch."""

    def __init__(self, runner: Arm, stream: BatchStream, per_step: int, estimate: float):
        self.runner, self.stream, self.per_step = runner, stream, per_step
        self.seconds = 0.0
        self.steps = 0
        self.recent = [estimate]  # per-step seconds of the recent chunks; the estimate is their maximum

    @property
    def estimate(self) -> float:
        return max(self.recent[-8:])


def run_chunk(track: _Track, env: RaceEnv, steps: int, lr_at_time: Callable[[float], float],
              result: ArmResult | None) -> float:
    """Run ``steps`` optimizer steps of ``track``, timed as one chunk (one synchronise, one host read of the
    accumulated loss and counts at its end); returns the chunk's mean training loss. Bookkeeping goes into
    ``result`` (the main run) when given."""
    from cggr.cli.timing import synchronize

    runner, per = track.runner, track.per_step
    idx = track.stream.take(steps * per)  # (steps·per,) on the CPU
    rows = idx.to(env.train_ids.device)
    device = env.device
    loss_sum = torch.zeros((), dtype=torch.float32, device=device)
    backprop = torch.zeros((), dtype=torch.int64, device=device)
    in_loss = torch.zeros((), dtype=torch.int64, device=device)
    scanned = torch.zeros((), dtype=torch.int64, device=device)
    estimate = track.estimate
    synchronize(device)
    c0, t0 = time.process_time(), env.clock()
    for i in range(steps):
        pick = rows[i * per : (i + 1) * per]
        ids, mask = env.train_ids[pick].to(device), env.train_mask[pick].to(device)  # (per, T)
        loss, _, _ = runner.step(ids, mask, lr_at_time(track.seconds + i * estimate), count=False, rows=pick)
        loss_sum += loss.detach().float()
        if result is not None:
            b, k = runner.device_counts(mask)
            backprop += b
            in_loss += k
            scanned += (mask[:, 1:] & mask[:, :-1]).sum()
    synchronize(device)
    dt = env.clock() - t0
    cpu = time.process_time() - c0
    track.seconds += dt
    track.steps += steps
    track.recent.append(dt / steps)
    mean_loss = float(loss_sum) / steps  # the one host read of the chunk (the device is idle now)
    if result is not None:
        result.train_seconds = track.seconds
        result.steps = track.steps
        result.step_seconds += [dt / steps] * steps
        result.cpu_seconds += cpu
        result.sequences_scanned += steps * per
        result.tokens_scanned += int(scanned)
        result.tokens_backpropagated += int(backprop)
        result.tokens_in_loss += int(in_loss)
        if runner.spec.router:
            result.router_tokens += int(env.train_mask[rows].sum())
        if len(result.first_sequences) < 64:
            result.first_sequences += idx.tolist()[: 64 - len(result.first_sequences)]
        result.last_train_loss = mean_loss
    return mean_loss


def _max_steps(track: _Track, env: RaceEnv) -> int:
    """Steps per chunk: one on CPU (steps are synchronous there), about ``max_chunk_seconds`` of work on CUDA."""
    if env.device.type != "cuda":
        return 1
    return max(1, math.floor(env.max_chunk_seconds / track.estimate))


def train_span(track: _Track, env: RaceEnv, end: float, lr_at_time, result: ArmResult | None = None,
               soft_end: float | None = None) -> bool:
    """Train ``track`` until ``soft_end`` is reached (default ``end``) or no further step fits before ``end``;
    returns False when the loss became non-finite."""
    soft = end if soft_end is None else soft_end
    while track.seconds < soft:
        n = plan_chunk(track.seconds, track.estimate, end, soft, _max_steps(track, env))
        if n == 0:
            break
        if not math.isfinite(run_chunk(track, env, n, lr_at_time, result)):
            return False
    return True


def train_arm(arm: str, base, sh: RaceContext, *, init_seed: int, data_seed: int, order: int,
              initial: dict[str, dict[str, float]], log) -> ArmResult:
    """Train one arm of one replicate: main run with its evaluations and ladder branches, then the full eval."""
    from cggr.cli.timing import synchronize

    cfg, env, budget = sh.cfg, sh.env, sh.budget
    wall0 = time.perf_counter()
    progress = sh.progress or RaceProgress(seeds=1, arms=1, budget=budget, bars=False, log=lambda *_: None)
    spec = ARM_SPECS[arm]
    arm_data_seed = data_seed + spec.data_seed_offset
    torch.manual_seed(init_seed)
    model = copy.deepcopy(base).to(env.device)
    model.train()
    result = ArmResult(arm=arm, init_digest=weights_digest(model), seed=init_seed, data_seed=arm_data_seed,
                       order=order, budget_seconds=budget)
    per_step, ratio = arm_scan(spec, cfg, sh.batch, sh.scan)
    progress.status("warm-up: 2 untimed steps")
    # two untimed warm-up steps on a scratch copy (allocator, kernels, lazy init): no arm pays them on its clock;
    # the second one's time is the first step-time estimate of the stop-before-overrun rule
    scratch = Arm(arm, copy.deepcopy(model), cfg, sh.router_layers, 0.0, env.device, fused_head=sh.fused,
                  seed=arm_data_seed, reference=sh.reference, ratio=ratio)
    scratch.pass_mask = env.has_padding
    warm_ids, warm_mask = env.train_ids[:per_step].to(env.device), env.train_mask[:per_step].to(env.device)
    estimate = 0.0
    for _ in range(2):
        synchronize(env.device)
        t0 = env.clock()
        scratch.step(warm_ids, warm_mask, 0.0, count=False,
                     rows=torch.arange(warm_ids.shape[0], device=env.train_ids.device))
        synchronize(env.device)
        estimate = env.clock() - t0
    del scratch
    runner = Arm(arm, model, cfg, sh.router_layers, sh.lr, env.device, fused_head=sh.fused, seed=arm_data_seed,
                 reference=sh.reference, ratio=ratio)
    runner.pass_mask = env.has_padding
    track = _Track(runner, BatchStream(env.train_ids.shape[0], arm_data_seed), per_step, estimate)

    def main_lr(t: float) -> float:
        return wsd_lr(t / budget, sh.lr)

    fractions = [i / cfg.evals for i in range(cfg.evals + 1)]
    rungs = sorted(cfg.ladder)
    next_eval, next_rung, finite = 0, 0, True
    arithmetic = bool(sh.data.problems)

    def evaluate(crossed: list[float], probe_loss: float | None = None) -> None:
        t0 = time.perf_counter()
        key = str(result.init_digest)
        if result.steps == 0 and key in initial:  # every arm of a replicate starts from the same weights
            point = dict(initial[key])
        elif probe_loss is not None and not arithmetic:  # read off the full evaluation's probe blocks
            point = {"heldout_loss": probe_loss}
        else:
            progress.status(f"evaluating {len(sh.probe)} probe blocks (clock stopped)")
            point = probe_eval(model, sh, accuracy=arithmetic and (cfg.evals <= 8 or next_eval == len(fractions)))
            if result.steps == 0:
                initial[key] = dict(point)
        point = {"time_s": round(track.seconds, 3), "step": result.steps, "sequences": result.sequences_scanned,
                 "train_loss": result.last_train_loss if result.steps else None, **point}
        result.curve += [{"fraction": f, **point} for f in crossed]
        result.eval_seconds += time.perf_counter() - t0

    while finite:
        crossed = []
        while next_eval < len(fractions) and track.seconds >= fractions[next_eval] * budget - 1e-9:
            crossed.append(fractions[next_eval])
            next_eval += 1
        if crossed:
            evaluate(crossed)
        while next_rung < len(rungs) and track.seconds >= (1 - COOLDOWN_FRACTION) * rungs[next_rung] * budget:
            progress.status(f"budget ladder: a copy decays for rung {rungs[next_rung]:g} (clock stopped)")
            result.ladder.append(_ladder_rung(track, sh, rungs[next_rung], result))
            next_rung += 1
        events = [fractions[next_eval] * budget] if next_eval < len(fractions) else []
        if next_rung < len(rungs):
            events.append((1 - COOLDOWN_FRACTION) * rungs[next_rung] * budget)
        soft = min([*events, budget])
        before = track.seconds
        n = plan_chunk(track.seconds, track.estimate, budget, soft, _max_steps(track, env))
        if n == 0:
            break
        finite = math.isfinite(run_chunk(track, env, n, main_lr, result))
        progress.trained(track.seconds - before, result.steps, result.last_train_loss)
        if not finite:
            log(f"  {arm} (seed {init_seed}): training loss became {result.last_train_loss} at step "
                f"{result.steps}; stopping arm")
    progress.status(f"evaluating the full held-out set ({sh.data.eval_ids.shape[0]} blocks, clock stopped)")
    t0 = time.perf_counter()
    result.heldout = full_eval(model, sh)
    result.eval_seconds += time.perf_counter() - t0
    if next_eval < len(fractions):  # the arm stopped before its budget's end: its final state closes the curve
        evaluate(fractions[next_eval:], probe_loss=result.heldout["probe_loss"])
    result.epochs = result.sequences_scanned / env.train_ids.shape[0]
    result.wall_seconds = time.perf_counter() - wall0
    return result


def _ladder_rung(track: _Track, sh: RaceContext, rung: float, result: ArmResult) -> dict[str, Any]:
    """A rung of the budget ladder: a copy of the arm at the start of rung budget ``rung · budget``'s decay
    (its state is that of a run with that budget: the WSD schedule is still at its stable peak) decays linearly
    to 0 over ``COOLDOWN_FRACTION`` of the rung budget on its own clock, then is evaluated on the probe blocks."""
    t_start = time.perf_counter()
    branch = _Track(copy.deepcopy(track.runner), track.stream.clone(), track.per_step, track.estimate)
    branch.recent = list(track.recent)
    decay = COOLDOWN_FRACTION * rung * sh.budget
    peak = sh.lr
    finite = train_span(branch, sh.env, decay, lambda tau: peak * max(0.0, 1.0 - tau / decay))
    point = probe_eval(branch.runner.model, sh, accuracy=False)
    out = {"rung": rung, "branch_at_s": round(track.seconds, 3), "decay_s": round(branch.seconds, 3),
           "decay_steps": branch.steps,
           "budget_s": round(track.seconds + branch.seconds, 3), "steps": track.steps + branch.steps,
           "finite": finite, **point}
    result.ladder_seconds += branch.seconds
    result.eval_seconds += time.perf_counter() - t_start - branch.seconds
    del branch
    gc.collect()
    return out


__all__ = ["ArmResult", "RaceContext", "plan_chunk", "run_chunk", "train_arm", "train_span", "weights_digest"]
