"""The arms of ``cggr race``: the registry of how each arm trains (:class:`ArmSpec`, :func:`register_arm`), how
many sequences it reads per step (:func:`arm_scan`), the LM head every arm shares (:func:`resolve_head`), and
:class:`Arm`, one arm's model, optimizer and training step.

Shape legend: B sequences per optimizer step of ``standard``; S sequences read per step by a selecting arm (the
race's ``round(B · scan_multiplier)``, or the arm's own ``scan_factor · B``); b the rows of one step (B or S);
T tokens per sequence; H hidden size; V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from cggr.cli.presets import CLIError
from cggr.cli.race.config import DEFAULT_ARMS, HEADS, RaceConfig, check_reference_settings, check_settings

HEAD_NAMES = {True: "fused (linear-CE on hidden states)", False: "logits (the model's own)"}
AA_DATA_SEED_OFFSET = 1_000_003  # the A/A arm's data seed: data_seed + this

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


def check_arms(arms: tuple[str, ...]) -> None:
    """Known arms (:data:`ARM_SPECS`), each at most once, at least one."""
    unknown = [a for a in arms if a not in ARM_SPECS]
    if unknown or not arms:
        given = ", ".join(unknown) or "(none given)"
        raise CLIError(f"--arms: unknown arm(s) {given}; expected some of {', '.join(ARM_SPECS)}")
    if len(set(arms)) != len(arms):
        raise CLIError(f"--arms: each arm at most once, got {', '.join(arms)}")


def validate_config(cfg: RaceConfig) -> None:
    """Raise :class:`CLIError` (one-line message) for values no race can run with: the settings
    (:func:`~cggr.cli.race.config.check_settings`), the arms against this registry, then ``--reference-*``."""
    check_settings(cfg)
    check_arms(cfg.arms)
    needs = [a for a in cfg.arms if ARM_SPECS[a].scoring == "reducible"]
    if needs and not cfg.reference:
        raise CLIError(f"--arms {', '.join(needs)} need --reference (a reference model trained on a split of the "
                       "training blocks that no arm trains on)")
    check_reference_settings(cfg)



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



def autocast_context(device: torch.device, dtype: str):
    """The race's precision context: bf16 autocast for ``dtype`` ``'bfloat16'`` (or ``'auto'`` on CUDA), else
    autocast disabled (fp32)."""
    if uses_bf16(device, dtype):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return torch.autocast(device_type=device.type, enabled=False)


def uses_bf16(device: torch.device, dtype: str) -> bool:
    """Whether the race computes under bf16 autocast (``--dtype bfloat16``, or ``auto`` on CUDA)."""
    return dtype == "bfloat16" or (dtype == "auto" and device.type == "cuda")



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


__all__ = ["AA_DATA_SEED_OFFSET", "ARMS", "ARM_KINDS", "ARM_SPECS", "DEFAULT_ARMS", "HEADS", "HEAD_NAMES",
           "SAMPLED_TEMPERATURE", "Arm", "ArmSpec", "arm_scan", "autocast_context", "check_arms", "register_arm",
           "resolve_head", "uses_bf16", "validate_config"]
