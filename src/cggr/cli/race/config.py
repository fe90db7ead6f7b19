"""Settings of ``cggr race``: :class:`RaceConfig` and its checks (:func:`check_settings`, run before any work;
:func:`check_router_layers`, run once the model is known and before the data load), the protocols' scan
multiplier, the device, and the learning-rate schedules.

Shape legend: B sequences per optimizer step of ``standard``; S = round(B · scan_multiplier) sequences read per
step by the selecting arms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cggr._validation import SCORING_MODES
from cggr.cli.data import MAX_BLOCKS_PER_FILE
from cggr.cli.presets import CLIError, ModelSpec

WARMUP_FRACTION = 0.05
COOLDOWN_FRACTION = 0.2  # WSD: the last 20% of a budget decays the learning rate linearly to 0
PROTOCOLS = ("free-lunch", "equal-scan")
DEFAULT_LADDER = (0.25, 0.5, 0.75)


HEADS = ("auto", "fused", "logits")  # --head
DEFAULT_ARMS = ("standard", "cggr", "random", "standard-aa")  # --arms (names of cggr.cli.race.arms.ARM_SPECS)


@dataclass
class RaceConfig:
    """Settings of one race (the command line's, with preset defaults filled in by :func:`run_race`)."""

    model: str = "tiny"
    data: str = "code"
    minutes: float | None = None
    ratio: float = 0.25
    router_layers: int | None = None
    arms: tuple[str, ...] = DEFAULT_ARMS
    device: str = "auto"
    seed: int = 0  # init seed of the first replicate (replicate i: seed + i)
    out: str = "cggr-race"
    scan_multiplier: float | None = None  # None: from the protocol
    batch_size: int | None = None
    seq_len: int | None = None
    lr: float | None = None
    evals: int = 8
    eval_sequences: int = 64  # probe blocks: the curve points and the ladder rungs
    dtype: str = "auto"
    progress: bool = True
    plot: bool = True
    name: str = "race"
    train_problems: int = 50_000  # size of the generated arithmetic training pool
    ratio_warmup_steps: int = 0  # CGGR curriculum: steps over which the kept share falls from 1 to ratio
    scoring: str = "combined"  # difficulty of the cggr and cggr-loss arms: entropy, margin, loss or combined
    head: str = "auto"  # LM head of every arm's training loss: auto, fused (linear-CE on hidden states) or logits
    seeds: int = 1  # paired replicates
    data_seed: int | None = None  # data seed of the first replicate (None: = seed)
    protocol: str = "free-lunch"
    heldout_blocks: int = 1024  # the full held-out set, evaluated at the end
    heldout_cap: int = MAX_BLOCKS_PER_FILE  # at most this many held-out blocks per held-out file
    ladder: tuple[float, ...] = DEFAULT_LADDER  # rung budgets as fractions of the budget (time-to-target)
    reference: bool = False  # train a reference model on a split of the training blocks (reducible arms)
    reference_fraction: float = 0.5  # share of the training blocks the reference trains on (no arm sees them)
    reference_steps: int = 200  # the reference's optimizer steps (batch: the standard batch)
    reference_blocks: int | None = None  # score (and train every arm on) at most this many of the other blocks


def check_settings(cfg: RaceConfig) -> None:
    """Raise :class:`CLIError` (one-line message) for settings no race can run with, the arms aside (those are
    checked against the registry by :func:`cggr.cli.race.arms.validate_config`)."""
    if cfg.minutes is not None and not (math.isfinite(cfg.minutes) and cfg.minutes > 0):
        raise CLIError(f"--minutes must be a positive number of minutes per arm, got {cfg.minutes}")
    if not (math.isfinite(cfg.ratio) and 0.0 < cfg.ratio <= 1.0):
        raise CLIError(f"--ratio must be in (0, 1], got {cfg.ratio}")
    if cfg.scan_multiplier is not None and not (math.isfinite(cfg.scan_multiplier) and cfg.scan_multiplier >= 1):
        raise CLIError(f"--scan-multiplier must be >= 1, got {cfg.scan_multiplier}")
    for name in ("router_layers", "batch_size", "seq_len"):
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if cfg.ratio_warmup_steps < 0:
        raise CLIError(f"--ratio-warmup-steps must be >= 0, got {cfg.ratio_warmup_steps}")
    if cfg.scoring not in SCORING_MODES:
        raise CLIError(f"--scoring must be one of {', '.join(SCORING_MODES)}, got {cfg.scoring!r}")
    if cfg.head not in HEADS:
        raise CLIError(f"--head must be one of {', '.join(HEADS)}, got {cfg.head!r}")
    if cfg.evals < 1 or cfg.eval_sequences < 1:
        raise CLIError(f"--evals and --eval-sequences must be >= 1, got {cfg.evals} and {cfg.eval_sequences}")
    if cfg.heldout_blocks < 1 or cfg.heldout_cap < 1:
        raise CLIError(f"--heldout-blocks and --heldout-cap must be >= 1, got {cfg.heldout_blocks} and "
                       f"{cfg.heldout_cap}")
    if cfg.lr is not None and not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise CLIError(f"--lr must be a positive number, got {cfg.lr}")
    if cfg.seeds < 1:
        raise CLIError(f"--seeds must be >= 1, got {cfg.seeds}")
    if cfg.protocol not in PROTOCOLS:
        raise CLIError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {cfg.protocol!r}")
    low = WARMUP_FRACTION / (1.0 - COOLDOWN_FRACTION)
    bad = [f for f in cfg.ladder if not (math.isfinite(f) and low < f < 1.0)]
    if bad or len(set(cfg.ladder)) != len(cfg.ladder):
        raise CLIError(f"--ladder: rungs must be distinct fractions of the budget in ({low:.4g}, 1) (a rung's decay "
                       f"starts at {1 - COOLDOWN_FRACTION:g} of it, after the warm-up), got "
                       f"{','.join(map(str, cfg.ladder))}")


def check_reference_settings(cfg: RaceConfig) -> None:
    """The ``--reference-*`` settings (:class:`CLIError` when no race can run with them)."""
    if not (0.0 < cfg.reference_fraction < 1.0):
        raise CLIError(f"--reference-fraction must be in (0, 1), got {cfg.reference_fraction}")
    if cfg.reference_steps < 1:
        raise CLIError(f"--reference-steps must be >= 1, got {cfg.reference_steps}")
    if cfg.reference_blocks is not None and cfg.reference_blocks < 1:
        raise CLIError(f"--reference-blocks must be >= 1, got {cfg.reference_blocks}")



def check_router_layers(cfg: RaceConfig, spec: ModelSpec) -> int:
    """The truncated router's depth (``--router-layers`` or the preset's); :class:`CLIError` unless it is below the
    model's layer count. Needs only the model's config, so :func:`cggr.cli.race.run_race` checks it before loading
    any data (a first run's data load trains a tokenizer: about a minute)."""
    router_layers = cfg.router_layers or spec.preset.router_layers
    if spec.num_layers and router_layers >= spec.num_layers:
        raise CLIError(f"--router-layers must be < the model's {spec.num_layers} layers ({spec.name}), got "
                       f"{router_layers}")
    return router_layers


def scan_multiplier(cfg: RaceConfig) -> float:
    """S / B: ``--scan-multiplier`` when given, else the protocol's (free-lunch 1 / ratio, equal-scan 1)."""
    if cfg.scan_multiplier is not None:
        return float(cfg.scan_multiplier)
    return 1.0 / cfg.ratio if cfg.protocol == "free-lunch" else 1.0



def protocol_name(cfg: RaceConfig, multiplier: float) -> str:
    """The protocol the scan multiplier amounts to (``custom`` when it is neither 1 / ratio nor 1)."""
    if math.isclose(multiplier, 1.0 / cfg.ratio):
        return "free-lunch"
    if multiplier == 1.0:
        return "equal-scan"
    return "custom"


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; anything else must be a usable torch device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise CLIError(f"--device: {name!r} is not a torch device ({exc})") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: CUDA is not available on this machine")
    return device



def lr_at(fraction: float, peak: float, warmup: float = WARMUP_FRACTION) -> float:
    """Budget-aware schedule: linear warm-up over ``warmup`` of the budget, cosine to 0 at fraction 1."""
    fraction = min(max(fraction, 0.0), 1.0)
    if fraction < warmup:
        return peak * fraction / warmup
    return peak * 0.5 * (1.0 + math.cos(math.pi * (fraction - warmup) / (1.0 - warmup)))



def wsd_lr(fraction: float, peak: float, warmup: float = WARMUP_FRACTION,
           cooldown: float = COOLDOWN_FRACTION) -> float:
    """Warm-up / stable / decay: linear warm-up over ``warmup`` of the budget, ``peak`` until ``1 - cooldown``,
    then linear decay to 0 at fraction 1. Any state before ``1 - cooldown`` is shared by every longer budget
    with the same warm-up, which is what makes the budget ladder's rungs valid runs of their own budget."""
    fraction = min(max(fraction, 0.0), 1.0)
    if fraction < warmup:
        return peak * fraction / warmup
    if fraction < 1.0 - cooldown:
        return peak
    return peak * (1.0 - fraction) / cooldown



def rungs_of(cfg: RaceConfig) -> tuple[float, ...]:
    """The ladder's rung fractions, sorted."""
    return tuple(sorted(cfg.ladder))




def demo_note(model: str, seeds: int) -> str:
    """The sentence a small or single-seed race prints about what it can and cannot show ('' when none)."""
    notes = []
    if model == "tiny":
        notes.append("this is a demo-sized race (a 3M-parameter model for well under a minute per arm): it shows "
                     "how the race works and what it measures, not whether CGGR helps on a real model")
    if seeds < 2:
        notes.append("one seed gives no confidence interval (gaps of a few percent are within seed-to-seed "
                     "noise); use --seeds 3 or more for a verdict")
    return ("note: " + "; ".join(notes) + ".") if notes else ""


__all__ = ["COOLDOWN_FRACTION", "DEFAULT_ARMS", "DEFAULT_LADDER", "HEADS", "PROTOCOLS", "WARMUP_FRACTION", "RaceConfig",
           "check_reference_settings", "check_router_layers", "check_settings", "demo_note", "lr_at", "protocol_name",
           "resolve_device", "rungs_of", "scan_multiplier", "wsd_lr"]
