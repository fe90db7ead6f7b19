"""``cggr race``: plain training against CGGR, same model, same initialisation, same data order, same clock.

Shape legend: B sequences per optimizer step of ``standard``; S = round(B · scan_multiplier) sequences scanned
per step by the selecting arms; k = max(1, round(ratio · S)) sequences (or tokens) they train on; T tokens per
sequence; V vocabulary.

Arms (:data:`ARM_SPECS`, a registry: :func:`register_arm` adds one), each from a deep copy of one initial model:

* ``standard``: forward + backward over B sequences, loss on every token.
* ``cggr``: :class:`cggr.CGGRModel` scans S sequences with the truncated router (no grad) and runs the full
  forward + backward on the hardest k sequences.
* ``cggr-loss``: :class:`cggr.CGGRLoss` over S sequences: full forward + backward of all S, loss (and LM-head
  gradient) on the hardest ``ratio`` share of tokens only. With the fused head (below) the loss owns the LM head
  (:meth:`cggr.CGGRLoss.forward_hidden` on the base model's final hidden states: [S·T, V] logits never exist, the
  head's backward covers the selected tokens only); with the logits head it is ``CGGRLoss(logits, targets)``.
* ``random``: the control, ``CGGRModel(selection='random')``: k of the S sequences uniformly at random, no
  router (so it is never slower than ``cggr``: any gain of ``cggr`` over it is the ranking's).
* ``standard-aa``: the A/A arm, ``standard`` again on another data order (data seed + :data:`AA_DATA_SEED_OFFSET`),
  same initial weights: its gap to ``standard`` is the race's own noise floor.

Protocols (``--protocol``): ``free-lunch`` (default; S = B / ratio, so every arm trains on B sequences per step
and the selecting arms pay for scanning 4B at ratio 0.25) and ``equal-scan`` (S = B: every arm reads the same B
sequences per step, the selecting arms train on ratio · B of them). ``--scan-multiplier`` sets S / B directly.

Seeds (``--seeds N``): replicate i uses init seed ``seed + i`` (the initial weights) and data seed
``data_seed + i`` (the sequence order, and the random picks of the selecting arms); within a replicate every arm
starts from the same weights and reads the same order, so arms are compared **paired by seed**
(:mod:`cggr.cli.stats`: Student-t intervals of the per-seed differences). The order in which the arms run is
rotated by one per replicate, so no arm always runs first (or last) on a machine that warms up or throttles.

The LM head of the training loss is the same in every arm, decided once per race (``--head``, :func:`resolve_head`):
``fused`` = :func:`cggr.functional.linear_cross_entropy` on the base model's final hidden states (fp32 logit
math, [b·T, V] logits never stored; ``standard`` with ``ratio=1``, ``CGGRModel(fused_head=True)``,
``CGGRLoss.forward_hidden``), ``logits`` = the Hugging Face logits (bf16 under autocast on CUDA, fp32 on CPU) and
a cross-entropy on them. ``auto`` follows ``CGGRModel``'s own default: fused for a causal LM whose head can be
fused, on CUDA. Otherwise a Δ to ``standard`` would mix the selection with the loss implementation.

Clock and schedule: every arm trains for the same wall-clock budget, and never past it: a step is started only
when the arm's measured step time (the largest of its recent steps, or of its untimed warm-up step at first)
says it fits. The learning rate follows the *elapsed fraction* of the budget with a warm-up / stable / decay
(WSD) schedule (:func:`wsd_lr`): linear warm-up over the first 5%, the peak until 80%, a linear decay to zero over
the last 20%. Time-to-target needs losses that are valid at every budget, which a decaying schedule's
intermediate points are not (the learning rate is still high there), so each arm also runs a **budget ladder**
(``--ladder``): at 80% of each rung budget b (in the stable phase, where the main run's state is exactly that of
a run with budget b) a copy of the arm (model, optimizer, data position) decays for 0.2 b of its own training
time, off the main clock, and is evaluated: the loss a run of budget b would reach. The held-out loss is
measured with the clock stopped: on ``--eval-sequences`` probe blocks at ``--evals`` fractions of the budget
and at each rung, and on the full held-out set (``--heldout-blocks``) at the end.

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
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from cggr._validation import SCORING_MODES
from cggr.cli.data import (
    MAX_BLOCKS_PER_FILE,
    BatchStream,
    RaceData,
    load_arithmetic_data,
    load_text_data,
    pretrained_tokenizer,
)
from cggr.cli.presets import CLIError, ModelSpec, build_model, resolve_model

HEADS = ("auto", "fused", "logits")
HEAD_NAMES = {True: "fused (linear-CE on hidden states)", False: "logits (the model's own)"}
WARMUP_FRACTION = 0.05
COOLDOWN_FRACTION = 0.2  # WSD: the last 20% of a budget decays the learning rate linearly to 0
AA_DATA_SEED_OFFSET = 1_000_003  # the A/A arm's data seed: data_seed + this
PROTOCOLS = ("free-lunch", "equal-scan")
DEFAULT_LADDER = (0.25, 0.5, 0.75)
ARM_KINDS = ("plain", "model", "loss")


@dataclass(frozen=True)
class ArmSpec:
    """How one arm trains; :func:`register_arm` adds it to :data:`ARM_SPECS` (and so to ``--arms``).

    Attributes:
        name: The ``--arms`` name.
        kind: ``'plain'`` (the model's own loss on every token of B sequences), ``'model'``
            (:class:`cggr.CGGRModel`: sequence selection among S) or ``'loss'`` (:class:`cggr.CGGRLoss`: token
            selection among S).
        selection: ``selection=`` of CGGRModel / CGGRLoss (``'topk'``, ``'random'``, ...).
        router: ``True``: CGGRModel with the truncated router (``--router-layers``); ``'model'``: the learner
            itself scores (a no-grad forward of the whole model over the S sequences: its own loss, as in
            RHO-LOSS); ``False``: no router.
        scoring: Difficulty score; ``None`` takes the race's ``--scoring``.
        scans: Reads S sequences per step (a selecting arm); ``False``: B.
        scan_factor: This arm's S / B under the free-lunch protocol (it still trains on B: ratio B / S); ``None``:
            the race's (``1 / --ratio``). Under ``--protocol equal-scan`` or ``--scan-multiplier`` the race's.
        data_seed_offset: Added to the replicate's data seed (the A/A arm reads another order).
        options: Further keyword arguments of CGGRModel / CGGRLoss, as ``(name, value)`` pairs.
        color, marker: Plot style.
        description: One line for the report.
    """

    name: str
    kind: str
    selection: str = "topk"
    router: bool | str = False
    scoring: str | None = None
    scans: bool = False
    scan_factor: float | None = None
    data_seed_offset: int = 0
    options: tuple[tuple[str, Any], ...] = ()
    color: str | None = None
    marker: str = "."
    description: str = ""


ARM_SPECS: dict[str, ArmSpec] = {}


def register_arm(spec: ArmSpec) -> ArmSpec:
    """Add (or replace) an arm in :data:`ARM_SPECS`; ``--arms`` and the report pick it up by name."""
    if not isinstance(spec, ArmSpec):
        raise TypeError(f"spec must be an ArmSpec, got {type(spec).__name__}")
    if spec.kind not in ARM_KINDS:
        raise ValueError(f"ArmSpec.kind must be one of {', '.join(ARM_KINDS)}, got {spec.kind!r}")
    if not spec.name or "," in spec.name or spec.name != spec.name.strip():
        raise ValueError(f"ArmSpec.name must be a non-empty name without commas or surrounding spaces, "
                         f"got {spec.name!r}")
    if spec.kind == "plain" and spec.scans:
        raise ValueError(f"arm {spec.name!r}: a 'plain' arm trains on what it reads, so it cannot scan S")
    if spec.router not in (True, False, "model"):
        raise ValueError(f"ArmSpec.router must be True, False or 'model', got {spec.router!r}")
    if spec.scan_factor is not None and not (spec.scans and math.isfinite(spec.scan_factor)
                                             and spec.scan_factor >= 1):
        raise ValueError(f"arm {spec.name!r}: scan_factor must be a number >= 1 on a scanning arm, got "
                         f"{spec.scan_factor!r} (scans={spec.scans})")
    ARM_SPECS[spec.name] = spec
    return spec


register_arm(ArmSpec("standard", "plain", color="black", marker="o",
                     description="plain training: B sequences, loss on every token"))
register_arm(ArmSpec("cggr", "model", selection="topk", router=True, scans=True, color="tab:red", marker="s",
                     description="CGGRModel: the truncated router ranks S sequences, trains on the hardest k"))
register_arm(ArmSpec("cggr-loss", "loss", selection="topk", scans=True, color="tab:blue", marker="^",
                     description="CGGRLoss: forward + backward of S sequences, loss on the hardest ratio of tokens"))
register_arm(ArmSpec("random", "model", selection="random", scans=True, color="tab:gray", marker="x",
                     description="control: k of the S sequences at random, no router"))
register_arm(ArmSpec("standard-aa", "plain", data_seed_offset=AA_DATA_SEED_OFFSET, color="tab:green", marker="D",
                     description="A/A: standard on another data order (the noise floor)"))

# issue 15's rules: sampled and importance-weighted selection by the router's loss, and RHO-LOSS reducible loss
# (router loss − a reference model's loss, both z-scored over the scan; needs --reference)
SAMPLED_TEMPERATURE = 0.5  # nats of router loss (sampled), z-score units (reducible-sampled)
register_arm(ArmSpec("cggr-sampled", "model", selection="sampled", router=True, scoring="loss", scans=True,
                     options=(("temperature", SAMPLED_TEMPERATURE),), color="tab:orange", marker="v",
                     description="k of the S drawn without replacement by Gumbel-top-k over router loss / 0.5 "
                                 "(Plackett-Luce)"))
register_arm(ArmSpec("cggr-importance", "model", selection="importance", router=True, scoring="loss", scans=True,
                     options=(("uniform_mix", 0.1),), color="tab:purple", marker="P",
                     description="k of the S drawn with probability ∝ router loss (10% uniform), each loss weighted "
                                 "1/π: an unbiased estimate of the S sequences' mean loss"))
register_arm(ArmSpec("cggr-reducible", "model", selection="topk", router=True, scoring="reducible", scans=True,
                     options=(("reference_norm", "zscore"),), color="tab:brown", marker="*",
                     description="RHO-LOSS: the k of the S with the largest z(router loss) − z(reference loss) "
                                 "(--reference)"))
register_arm(ArmSpec("cggr-reducible-self", "model", selection="topk", router="model", scoring="reducible",
                     scans=True, scan_factor=2.0, options=(("reference_norm", "zscore"),), color="tab:olive",
                     marker="p",
                     description="RHO-LOSS with the learner's own loss: the model scores 2B (no grad) and trains on "
                                 "the B with the largest z(model loss) − z(reference loss) (--reference)"))
register_arm(ArmSpec("cggr-reducible-sampled", "model", selection="sampled", router=True, scoring="reducible",
                     scans=True, options=(("reference_norm", "zscore"), ("temperature", SAMPLED_TEMPERATURE)),
                     color="tab:pink", marker="h",
                     description="reducible loss as cggr-reducible, k drawn by Gumbel-top-k at tau 0.5 (--reference)"))

ARMS = tuple(ARM_SPECS)  # the arms registered at import
DEFAULT_ARMS = ("standard", "cggr", "random", "standard-aa")


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


def validate_config(cfg: RaceConfig) -> None:
    """Raise :class:`CLIError` (one-line message) for values no race can run with."""
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
    check_arms(cfg.arms)
    needs = [a for a in cfg.arms if ARM_SPECS[a].scoring == "reducible"]
    if needs and not cfg.reference:
        raise CLIError(f"--arms {', '.join(needs)} need --reference (a reference model trained on a split of the "
                       "training blocks that no arm trains on)")
    if not (0.0 < cfg.reference_fraction < 1.0):
        raise CLIError(f"--reference-fraction must be in (0, 1), got {cfg.reference_fraction}")
    if cfg.reference_steps < 1:
        raise CLIError(f"--reference-steps must be >= 1, got {cfg.reference_steps}")
    if cfg.reference_blocks is not None and cfg.reference_blocks < 1:
        raise CLIError(f"--reference-blocks must be >= 1, got {cfg.reference_blocks}")


def check_arms(arms: tuple[str, ...]) -> None:
    """Known arms (:data:`ARM_SPECS`), each at most once, at least one."""
    unknown = [a for a in arms if a not in ARM_SPECS]
    if unknown or not arms:
        given = ", ".join(unknown) or "(none given)"
        raise CLIError(f"--arms: unknown arm(s) {given}; expected some of {', '.join(ARM_SPECS)}")
    if len(set(arms)) != len(arms):
        raise CLIError(f"--arms: each arm at most once, got {', '.join(arms)}")


def scan_multiplier(cfg: RaceConfig) -> float:
    """S / B: ``--scan-multiplier`` when given, else the protocol's (free-lunch 1 / ratio, equal-scan 1)."""
    if cfg.scan_multiplier is not None:
        return float(cfg.scan_multiplier)
    return 1.0 / cfg.ratio if cfg.protocol == "free-lunch" else 1.0


def arm_scan(spec: ArmSpec, cfg: RaceConfig, batch: int, scan: int) -> tuple[int, float]:
    """(sequences read per step, ``min_tokens_ratio``) of arm ``spec`` in a race of standard batch ``batch`` whose
    selecting arms scan ``scan``: B and the race's ratio for a plain arm; ``round(scan_factor · B)`` and B / that for
    a scanning arm with its own :attr:`ArmSpec.scan_factor` under the free-lunch protocol; else S and the ratio."""
    if not spec.scans:
        return batch, cfg.ratio
    if spec.scan_factor is not None and cfg.scan_multiplier is None and cfg.protocol == "free-lunch":
        per_step = max(batch, round(batch * spec.scan_factor))
        return per_step, batch / per_step
    return scan, cfg.ratio


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


def resolve_head(choice: str, model: torch.nn.Module, device: torch.device) -> bool:
    """Whether every arm's training loss uses the fused linear-CE head (``True``) or the model's logits.

    Args:
        choice: ``'auto'``: the rule of ``CGGRModel(fused_head=None)``: fused for a causal LM whose head
            :func:`cggr.integrations.hf_quirks.fused_head_parts` can fuse, on CUDA; ``'fused'``: always
            (:class:`CLIError` when the model's head cannot be fused); ``'logits'``: never.
        model: The race's model (before any wrapper).
        device: The device the arms train on.
    """
    from cggr.integrations.hf_quirks import fused_head_parts
    from cggr.model import is_masked_lm

    if choice not in HEADS:
        raise CLIError(f"--head must be one of {', '.join(HEADS)}, got {choice!r}")
    if choice == "logits":
        return False
    if is_masked_lm(model):
        parts, reason = None, "it is a masked LM (the fused head computes next-token losses)"
    else:
        parts, reason = fused_head_parts(model)
    if choice == "fused":
        if parts is None:
            raise CLIError(f"--head fused is not possible for {type(model).__name__}: {reason}")
        return True
    return parts is not None and device.type == "cuda"


def lr_at(fraction: float, peak: float, warmup: float = WARMUP_FRACTION) -> float:
    """Budget-aware schedule: linear warm-up over ``warmup`` of the budget, cosine to 0 at fraction 1."""
    fraction = min(max(fraction, 0.0), 1.0)
    if fraction < warmup:
        return peak * fraction / warmup
    return peak * 0.5 * (1.0 + math.cos(math.pi * (fraction - warmup) / (1.0 - warmup)))


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 (first 16 hex digits) of every parameter's bytes in ``state_dict`` order."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


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
            "ladder_seconds": round(self.ladder_seconds, 2), "sequences_scanned": self.sequences_scanned,
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


def autocast_context(device: torch.device, dtype: str):
    """The race's precision context: bf16 autocast for ``dtype`` ``'bfloat16'`` (or ``'auto'`` on CUDA), else
    autocast disabled (fp32)."""
    if uses_bf16(device, dtype):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return torch.autocast(device_type=device.type, enabled=False)


def uses_bf16(device: torch.device, dtype: str) -> bool:
    """Whether the race computes under bf16 autocast (``--dtype bfloat16``, or ``auto`` on CUDA)."""
    return dtype == "bfloat16" or (dtype == "auto" and device.type == "cuda")


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


class Arm:
    """One arm's model, optimizer and step function, built from its :class:`ArmSpec` (``ARM_SPECS[arm]``).

    ``fused_head``: the race's head (:func:`resolve_head`; ``None`` resolves ``cfg.head`` for this model).
    ``True``: ``standard`` and ``cggr-loss`` compute the loss from the base model's hidden states (``self.head``
    holds the (base model, HeadSpec) pair), the CGGRModel arms run with ``fused_head=True``; ``False``: every
    arm's loss is on the model's logits (``self.head`` is ``None``, ``CGGRModel(fused_head=False)``).
    ``ratio``: the share of the read sequences (or tokens) the arm trains on (``None``: ``cfg.ratio``; see
    :func:`arm_scan`).
    """

    def __init__(self, arm: str, model, cfg: RaceConfig, router_layers: int, lr: float, device: torch.device,
                 *, fused_head: bool | None = None, seed: int | None = None, reference: torch.Tensor | None = None,
                 ratio: float | None = None):
        from cggr import CGGRLoss, CGGRModel, create_truncated_router
        from cggr.integrations.hf_quirks import fused_head_parts

        if arm not in ARM_SPECS:
            raise CLIError(f"--arms: unknown arm {arm!r}; expected one of {', '.join(ARM_SPECS)}")
        spec = ARM_SPECS[arm]
        self.arm, self.spec, self.model, self.device, self.cfg = arm, spec, model, device, cfg
        seed = cfg.seed if seed is None else seed  # the selection's random generator (random picks, ties)
        self.fused_head = resolve_head(cfg.head, model, device) if fused_head is None else bool(fused_head)
        fused = {"fused": True} if device.type == "cuda" else {}
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1, **fused)
        self.wrapper = None
        self.criterion = None
        self.head = None
        self.pass_mask = True  # see loss()
        scoring = spec.scoring or cfg.scoring
        # (N_train,) reference loss of every training block (reducible scoring): looked up by the step's rows
        self.reference = reference if scoring == "reducible" else None
        if scoring == "reducible" and reference is None:
            raise CLIError(f"arm {arm!r} scores reducible loss: it needs the race's reference losses (--reference)")
        ratio = cfg.ratio if ratio is None else ratio
        if spec.kind == "model":
            if spec.router == "model":  # the learner scores its own loss (a no-grad forward of the whole model)
                router = model
            else:
                router = create_truncated_router(model, num_layers=router_layers) if spec.router else None
            self.wrapper = CGGRModel(
                model, router=router, num_router_layers=router_layers, min_tokens_ratio=ratio,
                warmup_steps=cfg.ratio_warmup_steps, scoring=scoring, selection=spec.selection, seed=seed,
                fused_head=self.fused_head, **dict(spec.options),
            )
            return
        if spec.kind == "loss":
            options = {"dynamic_threshold": False, **dict(spec.options)}
            self.criterion = CGGRLoss(
                scoring=scoring, selection=spec.selection, min_tokens_ratio=ratio,
                warmup_steps=cfg.ratio_warmup_steps, seed=seed, **options,
            ).to(device)
        if self.fused_head:
            self.head, reason = fused_head_parts(model)  # (base model, HeadSpec)
            if self.head is None:
                raise CLIError(f"--head fused is not possible for {type(model).__name__}: {reason}")

    def loss(self, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
             rows: torch.Tensor | None = None) -> torch.Tensor:
        """This arm's training loss on (b, T) ``ids`` (``labels``: ids with -100 at padding), with grad.

        ``self.pass_mask = False`` (set by the race when its training data have no padding) calls the model without
        an attention mask: the same attention, and no host sync in Hugging Face's mask preparation (it reads
        whether an all-ones mask can be skipped). ``rows``: the (b,) training-block indices of ``ids`` (the
        reducible arms look their reference losses up).
        """
        attention = mask.long() if self.pass_mask else None
        with autocast_context(self.device, self.cfg.dtype):
            if self.wrapper is not None:
                extra = {}
                if self.reference is not None:
                    if rows is None:
                        raise ValueError(f"arm {self.arm!r} needs the rows of its batch (reference losses)")
                    extra["reference_loss"] = self.reference.index_select(0, rows.to(self.reference.device))
                loss = self.wrapper(ids, labels=labels, attention_mask=attention, **extra).loss
            elif self.head is not None:  # the fused head: logits never stored, fp32 logit math
                from cggr.functional import linear_cross_entropy
                from cggr.integrations.hf_quirks import head_operands

                base, spec = self.head
                hidden = base(input_ids=ids, attention_mask=attention).last_hidden_state  # (b, T, H)
                hidden, weight, bias = head_operands(hidden[:, :-1], spec)  # (b, T-1, H)
                with torch.autocast(self.device.type, enabled=False):
                    if self.criterion is not None:
                        loss = self.criterion.forward_hidden(hidden, weight, labels[:, 1:], bias=bias,
                                                             softcap=spec.softcap)
                    else:  # standard: every valid token (ratio 1), the mean over them as in HF's loss
                        loss = linear_cross_entropy(hidden, weight, labels[:, 1:], bias=bias, ratio=1.0,
                                                    softcap=spec.softcap)
            elif self.criterion is not None:
                logits = self.model(input_ids=ids, attention_mask=attention).logits[:, :-1]  # (S, T-1, V)
                loss = self.criterion(logits, labels[:, 1:])
            else:
                loss = self.model(input_ids=ids, attention_mask=attention, labels=labels).loss
        return loss

    def step(
        self, ids: torch.Tensor, mask: torch.Tensor, lr: float, *, count: bool = True,
        rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, int, int]:
        """One optimizer step on (S or B, T) ``ids``; returns (loss, tokens back-propagated, tokens in loss).

        ``count=False`` skips the token counts (they read device values) and returns zeros for them; the race
        times the step that way and reads :meth:`counts` with the clock stopped.
        """
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        labels = ids.masked_fill(~mask, -100)  # (b, T)
        loss = self.loss(ids, mask, labels, rows)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        for module in (self.wrapper, self.criterion):
            if module is not None:
                module.step()  # the curriculum only (no host sync); the last forward's metrics stay readable
        if not count:
            return loss, 0, 0
        return (loss, *self.counts(mask))

    def counts(self, mask: torch.Tensor) -> tuple[int, int]:
        """(tokens back-propagated, tokens in the loss) of the last step on (b, T) ``mask`` (host syncs)."""
        backprop, in_loss = self.device_counts(mask)
        return int(backprop), int(in_loss)

    def device_counts(self, mask: torch.Tensor) -> tuple[torch.Tensor | int, torch.Tensor | int]:
        """:meth:`counts` without a host sync: 0-d tensors on the mask's device (or Python ints where the
        selection recorded one), which the race adds up per chunk. Reads the selection's count from the module's
        last-call record (``get_metrics`` would synchronise)."""
        valid = mask[:, 1:].sum()  # targets of position t are the tokens at t + 1
        module = self.wrapper if self.wrapper is not None else self.criterion
        if module is None:
            return valid, valid
        selected = module._last["tokens_selected"]
        if isinstance(selected, torch.Tensor) and selected.device != mask.device:
            selected = selected.to(mask.device, non_blocking=True)
        return (selected, selected) if self.wrapper is not None else (valid, selected)


def prepare(cfg: RaceConfig) -> tuple[ModelSpec, RaceData]:
    """Resolve ``cfg.model`` and load ``cfg.data`` (tokenised, split, cached): what every arm of a race shares.

    The held-out set has ``cfg.heldout_blocks`` blocks (at most ``cfg.heldout_cap`` per held-out file) or, for
    ``arithmetic``, that many held-out problems.
    """
    spec = resolve_model(cfg.model)
    tokenizer = pretrained_tokenizer(spec.path) if spec.kind == "pretrained" else None
    vocab = spec.preset.vocab_size
    if cfg.data == "arithmetic":
        data = load_arithmetic_data(vocab_size=vocab, eval_sequences=cfg.heldout_blocks, tokenizer=tokenizer,
                                    num_train=cfg.train_problems)
    else:
        seq_len = cfg.seq_len or spec.preset.seq_len
        data = load_text_data(cfg.data, seq_len=seq_len, vocab_size=vocab, eval_sequences=cfg.heldout_blocks,
                              tokenizer=tokenizer, max_blocks_per_file=cfg.heldout_cap)
    return spec, data


def probe_indices(num_blocks: int, count: int) -> torch.Tensor:
    """(min(count, num_blocks),) evenly spaced indices into the held-out blocks: the probe subset."""
    if count >= num_blocks:
        return torch.arange(num_blocks)
    return torch.linspace(0, num_blocks - 1, count).round().long().unique()


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


@dataclass
class _Env:
    """What every chunk of a race needs: data (on the device on CUDA), device, precision, the clock."""

    train_ids: torch.Tensor
    train_mask: torch.Tensor
    device: torch.device
    clock: Callable[[], float]
    max_chunk_seconds: float
    has_padding: bool = True  # False: every training sequence is full, the arms run without an attention mask


def _run_chunk(track: _Track, env: _Env, steps: int, lr_at_time: Callable[[float], float],
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


def _max_steps(track: _Track, env: _Env) -> int:
    """Steps per chunk: one on CPU (steps are synchronous there), about ``max_chunk_seconds`` of work on CUDA."""
    if env.device.type != "cuda":
        return 1
    return max(1, math.floor(env.max_chunk_seconds / track.estimate))


def _train_span(track: _Track, env: _Env, end: float, lr_at_time, result: ArmResult | None = None,
                soft_end: float | None = None) -> bool:
    """Train ``track`` until ``soft_end`` is reached (default ``end``) or no further step fits before ``end``;
    returns False when the loss became non-finite."""
    soft = end if soft_end is None else soft_end
    while track.seconds < soft:
        n = plan_chunk(track.seconds, track.estimate, end, soft, _max_steps(track, env))
        if n == 0:
            break
        if not math.isfinite(_run_chunk(track, env, n, lr_at_time, result)):
            return False
    return True


@dataclass
class _Shared:
    """Per-race context of :func:`_train_arm`."""

    cfg: RaceConfig
    data: RaceData
    env: _Env
    router_layers: int
    lr: float
    budget: float
    batch: int
    scan: int
    fused: bool
    eval_bs: int
    probe: torch.Tensor  # (n_probe,) indices of the probe blocks
    progress: bool
    reference: torch.Tensor | None = None  # (N_train,) reference loss per training block (--reference)


def _probe_eval(model, sh: _Shared, *, accuracy: bool) -> dict[str, float]:
    from cggr.cli.timing import synchronize

    ids, mask = sh.data.eval_ids[sh.probe], sh.data.eval_mask[sh.probe]
    sums, counts = heldout_block_losses(model, ids, mask, sh.env.device, sh.cfg.dtype, sh.eval_bs)
    point = {"heldout_loss": float(sums.sum()) / max(int(counts.sum()), 1)}
    if accuracy and sh.data.problems:
        problems = [sh.data.problems[i] for i in sh.probe.tolist()]
        point["accuracy"] = arithmetic_accuracy(model, sh.data, sh.env.device, sh.cfg.dtype, 64, problems=problems)
    synchronize(sh.env.device)
    return point


def _full_eval(model, sh: _Shared) -> dict[str, Any]:
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


def _train_arm(arm: str, base, sh: _Shared, *, init_seed: int, data_seed: int, order: int,
               initial: dict[str, dict[str, float]], log) -> ArmResult:
    """Train one arm of one replicate: main run with its evaluations and ladder branches, then the full eval."""
    from cggr.cli.timing import synchronize

    cfg, env, budget = sh.cfg, sh.env, sh.budget
    spec = ARM_SPECS[arm]
    arm_data_seed = data_seed + spec.data_seed_offset
    torch.manual_seed(init_seed)
    model = copy.deepcopy(base).to(env.device)
    model.train()
    result = ArmResult(arm=arm, init_digest=weights_digest(model), seed=init_seed, data_seed=arm_data_seed,
                       order=order, budget_seconds=budget)
    per_step, ratio = arm_scan(spec, cfg, sh.batch, sh.scan)
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
    bar = _progress(f"{arm} s{init_seed}", budget, sh.progress)
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
            point = _probe_eval(model, sh, accuracy=arithmetic and (cfg.evals <= 8 or next_eval == len(fractions)))
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
        finite = math.isfinite(_run_chunk(track, env, n, main_lr, result))
        if bar is not None:
            bar.update(track.seconds - before)
            bar.set_postfix(steps=result.steps, loss=f"{result.last_train_loss:.3f}", refresh=False)
        if not finite:
            log(f"  {arm} (seed {init_seed}): training loss became {result.last_train_loss} at step "
                f"{result.steps}; stopping arm")
    if bar is not None:
        bar.close()
    t0 = time.perf_counter()
    result.heldout = _full_eval(model, sh)
    result.eval_seconds += time.perf_counter() - t0
    if next_eval < len(fractions):  # the arm stopped before its budget's end: its final state closes the curve
        evaluate(fractions[next_eval:], probe_loss=result.heldout["probe_loss"])
    result.epochs = result.sequences_scanned / env.train_ids.shape[0]
    return result


def _ladder_rung(track: _Track, sh: _Shared, rung: float, result: ArmResult) -> dict[str, Any]:
    """A rung of the budget ladder: a copy of the arm at the start of rung budget ``rung · budget``'s decay
    (its state is that of a run with that budget: the WSD schedule is still at its stable peak) decays linearly
    to 0 over ``COOLDOWN_FRACTION`` of the rung budget on its own clock, then is evaluated on the probe blocks."""
    t_start = time.perf_counter()
    branch = _Track(copy.deepcopy(track.runner), track.stream.clone(), track.per_step, track.estimate)
    branch.recent = list(track.recent)
    decay = COOLDOWN_FRACTION * rung * sh.budget
    peak = sh.lr
    finite = _train_span(branch, sh.env, decay, lambda tau: peak * max(0.0, 1.0 - tau / decay))
    point = _probe_eval(branch.runner.model, sh, accuracy=False)
    out = {"rung": rung, "branch_at_s": round(track.seconds, 3), "decay_s": round(branch.seconds, 3),
           "decay_steps": branch.steps,
           "budget_s": round(track.seconds + branch.seconds, 3), "steps": track.steps + branch.steps,
           "finite": finite, **point}
    result.ladder_seconds += branch.seconds
    result.eval_seconds += time.perf_counter() - t_start - branch.seconds
    del branch
    gc.collect()
    return out


def run_race(cfg: RaceConfig, *, log=print, clock: Callable[[], float] = time.perf_counter) -> dict[str, Any]:
    """Run every arm of ``cfg`` for every replicate and return the results (also written to ``cfg.out`` as JSON,
    Markdown and PNG; :func:`cggr.cli.report.race_summary` computes the intervals).

    ``clock``: the training clock (seconds), injectable so that tests can check the budget rule with a fake one.
    """
    from cggr.cli.report import write_race_outputs
    from cggr.cli.timing import environment

    validate_config(cfg)
    device = resolve_device(cfg.device)
    t_setup = time.perf_counter()
    spec, data = prepare(cfg)
    preset = spec.preset
    minutes = cfg.minutes if cfg.minutes is not None else preset.minutes
    batch = cfg.batch_size or preset.batch_size
    multiplier = scan_multiplier(cfg)
    scan = max(1, round(batch * multiplier))
    kept = min(scan, max(1, math.floor(cfg.ratio * scan + 0.5)))  # sequences the selecting arms train on
    router_layers = cfg.router_layers or preset.router_layers
    if spec.num_layers and router_layers >= spec.num_layers:
        raise CLIError(f"--router-layers must be < the model's {spec.num_layers} layers, got {router_layers}")
    lr = cfg.lr or preset.lr
    budget = minutes * 60.0
    vocab = None if spec.kind == "pretrained" else data.tokenizer.vocab_size
    data_seed0 = cfg.seed if cfg.data_seed is None else cfg.data_seed
    replicates = [(cfg.seed + i, data_seed0 + i) for i in range(cfg.seeds)]
    base = build_model(spec, vocab, seed=replicates[0][0])
    n_params = sum(p.numel() for p in base.parameters())
    fused = resolve_head(cfg.head, base, device)  # one head for every arm
    reference_info, reference = None, None
    if cfg.reference:  # before the arms: every arm then trains on the blocks the reference never saw
        data, reference, reference_info = _build_reference(cfg, spec, data, vocab, batch, lr, device, log)
    on_device = device.type == "cuda"
    env = _Env(train_ids=data.train_ids.to(device) if on_device else data.train_ids,
               train_mask=data.train_mask.to(device) if on_device else data.train_mask, device=device, clock=clock,
               max_chunk_seconds=min(1.0, 0.02 * budget), has_padding=not bool(data.train_mask.all()))
    probe = probe_indices(data.eval_ids.shape[0], cfg.eval_sequences)
    sh = _Shared(cfg=cfg, data=data, env=env, router_layers=router_layers, lr=lr, budget=budget, batch=batch,
                 scan=scan, fused=fused, eval_bs=max(batch, 16), probe=probe, progress=cfg.progress,
                 reference=reference.to(device) if reference is not None else None)
    setup_seconds = time.perf_counter() - t_setup
    protocol = protocol_name(cfg, multiplier)
    log(f"cggr race: {spec.name} ({n_params / 1e6:.1f}M parameters) on {data.info['origin']}, device {device}, "
        f"{minutes:g} min per arm, {cfg.seeds} seed(s), protocol {protocol}: standard batch {batch}, selecting "
        f"arms scan {scan} and train on {kept} (ratio {cfg.ratio}); LM head {HEAD_NAMES[fused]} in every arm; "
        f"held-out {data.eval_ids.shape[0]} blocks (probe {len(probe)})")
    demo = demo_note(spec.name, cfg.seeds)
    if demo:
        log(demo)
    results: list[ArmResult] = []
    for init_seed, data_seed in replicates:
        if init_seed != replicates[0][0]:
            base = build_model(spec, vocab, seed=init_seed)
        shift = init_seed % len(cfg.arms)  # the running order rotates with the seed
        order = list(cfg.arms[shift:]) + list(cfg.arms[:shift])
        initial: dict[str, dict[str, float]] = {}
        for pos, arm in enumerate(order):
            r = _train_arm(arm, base, sh, init_seed=init_seed, data_seed=data_seed, order=pos, initial=initial,
                           log=log)
            se = r.heldout.get("se")
            log(f"  seed {init_seed} {arm:>11}: {r.steps} steps, held-out loss {r.heldout['loss']:.4f}"
                + (f" ± {se:.4f} (bootstrap SE)" if se else "")
                + (f", accuracy {r.curve[-1]['accuracy']:.1%}" if "accuracy" in r.curve[-1] else ""))
            results.append(r)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    position = {a: i for i, a in enumerate(cfg.arms)}
    results.sort(key=lambda r: (r.seed, position[r.arm]))
    settings = {
        "model": spec.name, "model_kind": spec.kind, "parameters": n_params, "data": cfg.data,
        "minutes_per_arm": minutes,
        "ratio": cfg.ratio, "protocol": protocol, "scan_multiplier": multiplier, "batch_size": batch,
        "scanned_per_step": scan, "trained_per_step": kept,
        "ratio_warmup_steps": cfg.ratio_warmup_steps, "scoring": cfg.scoring, "router_layers": router_layers,
        "num_layers": spec.num_layers, "lr": lr, "warmup_fraction": WARMUP_FRACTION,
        "cooldown_fraction": COOLDOWN_FRACTION, "ladder": list(rungs_of(cfg)),
        "schedule": (f"warm-up {WARMUP_FRACTION:.0%} / stable / linear decay over the last "
                     f"{COOLDOWN_FRACTION:.0%} of each arm's budget (by elapsed time)"),
        "seed": cfg.seed, "seeds": [s for s, _ in replicates], "data_seeds": [d for _, d in replicates],
        "aa_data_seed_offset": AA_DATA_SEED_OFFSET, "arms": list(cfg.arms),
        "head": "fused" if fused else "logits", "head_option": cfg.head,
        "device": str(device), "dtype": cfg.dtype,
        "precision": "bf16 autocast" if uses_bf16(device, cfg.dtype) else "fp32",
        "evals": cfg.evals, "probe_blocks": len(probe), "heldout_blocks": int(data.eval_ids.shape[0]),
        "heldout_cap": cfg.heldout_cap, "heldout_groups": list(data.eval_groups),
        "heldout_tokens": data.eval_mask[:, 1:].sum(-1).tolist(),
        "setup_seconds": round(setup_seconds, 1), "data_info": data.info,
    }
    if reference_info is not None:
        settings["reference"] = reference_info
    env_info = environment(device, command=command_line())
    payload = {"settings": settings, "environment": env_info, "arms": [r.row() for r in results]}
    payload["paths"] = write_race_outputs(payload, Path(cfg.out), cfg.name, plot=cfg.plot)
    return payload


REFERENCE_SEED_OFFSET = 7_919  # the reference model's init seed: --seed + this


def _build_reference(cfg: RaceConfig, spec: ModelSpec, data: RaceData, vocab: int | None, batch: int, lr: float,
                     device: torch.device, log) -> tuple[RaceData, torch.Tensor, dict[str, Any]]:
    """``--reference``: train a fresh model of the race's architecture on ``reference_fraction`` of the training
    blocks (seeded split), score the other blocks with it, and return the race data restricted to those blocks
    (every arm trains on them, paired), their (N_train,) reference losses and the one-off cost (seconds)."""
    import dataclasses

    from cggr.cli.reference_model import build_reference

    model = build_model(spec, vocab, seed=cfg.seed + REFERENCE_SEED_OFFSET)
    rows, losses, info = build_reference(
        model, data.train_ids, data.train_mask, fraction=cfg.reference_fraction, steps=cfg.reference_steps,
        batch_size=batch, lr=lr, device=device, seed=cfg.seed + REFERENCE_SEED_OFFSET,
        autocast=lambda: autocast_context(device, cfg.dtype), max_blocks=cfg.reference_blocks,
    )
    del model
    info.update(fraction=cfg.reference_fraction, seed=cfg.seed + REFERENCE_SEED_OFFSET,
                train_seconds=round(info["train_seconds"], 2), score_seconds=round(info["score_seconds"], 2),
                total_seconds=round(info["total_seconds"], 2))
    log(f"reference model: {info['steps']} steps on {info['reference_blocks']} training blocks in "
        f"{info['train_seconds']:.1f} s, scored the other {info['train_blocks']} blocks in "
        f"{info['score_seconds']:.1f} s "
        f"(mean loss {info['mean_reference_loss']:.3f}; one-off, on no arm's clock); every arm trains on those "
        f"{info['train_blocks']} blocks")
    n_all = int(data.train_ids.shape[0])
    keys = data.train_keys  # per training row for arithmetic (its questions), per document for text corpora
    new_info = dict(data.info, train_sequences=int(rows.numel()), reference_sequences=n_all - int(rows.numel()))
    new = dataclasses.replace(
        data, train_ids=data.train_ids[rows], train_mask=data.train_mask[rows], info=new_info,
        train_keys=[keys[i] for i in rows.tolist()] if len(keys) == n_all else list(keys),
    )
    return new, losses.sequence(torch.arange(len(losses))), info


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


def command_line() -> str:
    """This process's command line, shell-quoted, with the program shown as ``cggr`` (recorded in the results)."""
    import shlex
    import sys

    argv = list(sys.argv)
    if argv and Path(argv[0]).name in ("cggr", "__main__.py", "main.py"):
        argv[0] = "cggr"
    return " ".join(shlex.quote(a) for a in argv)


def _progress(desc: str, budget: float, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: no bar
        return None
    return tqdm(total=round(budget, 1), desc=f"{desc:>14}", unit="s", leave=True, mininterval=0.5,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s {postfix}")


__all__ = ["AA_DATA_SEED_OFFSET", "ARMS", "ARM_SPECS", "COOLDOWN_FRACTION", "DEFAULT_ARMS", "DEFAULT_LADDER",
           "HEADS", "PROTOCOLS", "Arm", "ArmResult", "ArmSpec", "RaceConfig", "arithmetic_accuracy", "arm_scan",
           "autocast_context", "command_line", "demo_note", "heldout_block_losses", "heldout_loss", "lr_at",
           "plan_chunk", "prepare", "probe_indices", "register_arm", "resolve_head", "run_race", "scan_multiplier",
           "validate_config", "weights_digest", "wsd_lr"]
