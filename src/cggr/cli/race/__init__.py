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

The modules: :mod:`~cggr.cli.race.arms` (the arm registry and :class:`Arm`), :mod:`~cggr.cli.race.config`
(:class:`RaceConfig`, its checks, the schedules), :mod:`~cggr.cli.race.train` (the budget rule, chunks, the
ladder, one arm run), :mod:`~cggr.cli.race.evaluate` (held-out losses and accuracy), :mod:`~cggr.cli.race.progress`
(what the race shows while it runs) and :mod:`~cggr.cli.race.run` (:func:`run_race`, the whole race). Every public
name is importable from ``cggr.cli.race``.
"""

from __future__ import annotations

from cggr.cli.race.arms import (
    AA_DATA_SEED_OFFSET,
    ARM_KINDS,
    ARM_SPECS,
    ARMS,
    DEFAULT_ARMS,
    HEAD_NAMES,
    HEADS,
    SAMPLED_TEMPERATURE,
    Arm,
    ArmSpec,
    arm_scan,
    autocast_context,
    check_arms,
    register_arm,
    resolve_head,
    uses_bf16,
    validate_config,
)
from cggr.cli.race.config import (
    COOLDOWN_FRACTION,
    DEFAULT_LADDER,
    PROTOCOLS,
    WARMUP_FRACTION,
    RaceConfig,
    check_router_layers,
    demo_note,
    lr_at,
    protocol_name,
    resolve_device,
    rungs_of,
    scan_multiplier,
    wsd_lr,
)
from cggr.cli.race.evaluate import arithmetic_accuracy, heldout_block_losses, heldout_loss, probe_indices
from cggr.cli.race.progress import RaceProgress, format_duration
from cggr.cli.race.run import REFERENCE_SEED_OFFSET, command_line, load_data, prepare, run_race
from cggr.cli.race.train import ArmResult, plan_chunk, weights_digest

__all__ = ["AA_DATA_SEED_OFFSET", "ARMS", "ARM_KINDS", "ARM_SPECS", "COOLDOWN_FRACTION", "DEFAULT_ARMS",
           "DEFAULT_LADDER", "HEADS", "HEAD_NAMES", "PROTOCOLS", "REFERENCE_SEED_OFFSET", "SAMPLED_TEMPERATURE",
           "WARMUP_FRACTION", "Arm", "ArmResult", "ArmSpec", "RaceConfig", "RaceProgress", "arithmetic_accuracy",
           "arm_scan", "autocast_context", "check_arms", "check_router_layers", "command_line", "demo_note",
           "format_duration", "heldout_block_losses", "heldout_loss", "load_data", "lr_at", "plan_chunk", "prepare",
           "probe_indices", "protocol_name", "register_arm", "resolve_device", "resolve_head", "run_race", "rungs_of",
           "scan_multiplier", "uses_bf16", "validate_config", "weights_digest", "wsd_lr"]
