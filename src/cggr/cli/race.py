"""``cggr race``: plain training against CGGR, same model, same initialisation, same data order, same clock.

Shape legend: B sequences per optimizer step of ``standard``; S = round(B · scan_multiplier) sequences scanned
per step by the selecting arms; k = max(1, round(ratio · S)) sequences (or tokens) they train on; T tokens per
sequence; V vocabulary.

Arms (each from a deep copy of one initial model, each reading the same seeded sequence order):

* ``standard``: forward + backward over B sequences, loss on every token.
* ``cggr``: :class:`cggr.CGGRModel` scans S sequences with the truncated router (no grad) and runs the full
  forward + backward on the hardest k (= B by default) sequences.
* ``cggr-loss``: :class:`cggr.CGGRLoss` over S sequences: full forward + backward of all S, loss (and LM-head
  gradient) on the hardest ``ratio`` share of tokens only. With the fused head (below) the loss owns the LM head
  (:meth:`cggr.CGGRLoss.forward_hidden` on the base model's final hidden states: [S·T, V] logits never exist, the
  head's backward covers the selected tokens only); with the logits head it is ``CGGRLoss(logits, targets)``.
* ``random``: the control, ``CGGRModel(selection='random')``: k of the S sequences uniformly at random, no
  router (so it is never slower than ``cggr``: any gain of ``cggr`` over it is the ranking's).

The LM head of the training loss is the same in every arm, decided once per race (``--head``, :func:`resolve_head`):
``fused`` = :func:`cggr.functional.linear_cross_entropy` on the base model's final hidden states (fp32 logit
math, [b·T, V] logits never stored; ``standard`` with ``ratio=1``, ``CGGRModel(fused_head=True)``,
``CGGRLoss.forward_hidden``), ``logits`` = the Hugging Face logits (bf16 under autocast) and a cross-entropy on
them (``standard``: ``model(..., labels=...).loss``; ``CGGRModel(fused_head=False)``; ``CGGRLoss(logits, ...)``).
``auto`` follows ``CGGRModel``'s own default: fused for a causal LM whose head can be fused, on CUDA. Otherwise a
Δ to ``standard`` would mix the selection with the loss implementation.

Every arm trains for the same wall-clock budget; the learning rate follows the *elapsed fraction* of that budget
(linear warm-up over the first 5%, cosine decay to zero at 100%), so each arm finishes its schedule whatever its
step time. The held-out loss is measured at fixed fractions of the budget with the clock stopped.
Per-step CUDA synchronisation makes the clock exact on GPUs (the same cost for every arm).
"""

from __future__ import annotations

import copy
import gc
import hashlib
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from cggr._validation import SCORING_MODES
from cggr.cli.data import BatchStream, RaceData, load_arithmetic_data, load_text_data, pretrained_tokenizer
from cggr.cli.presets import CLIError, ModelSpec, build_model, resolve_model

ARMS = ("standard", "cggr", "cggr-loss", "random")
HEADS = ("auto", "fused", "logits")
HEAD_NAMES = {True: "fused (linear-CE on hidden states)", False: "logits (the model's own)"}
WARMUP_FRACTION = 0.05


@dataclass
class RaceConfig:
    """Settings of one race (the command line's, with preset defaults filled in by :func:`run_race`)."""

    model: str = "tiny"
    data: str = "code"
    minutes: float | None = None
    ratio: float = 0.25
    router_layers: int | None = None
    arms: tuple[str, ...] = ARMS
    device: str = "auto"
    seed: int = 0
    out: str = "cggr-race"
    scan_multiplier: float | None = None
    batch_size: int | None = None
    seq_len: int | None = None
    lr: float | None = None
    evals: int = 8
    eval_sequences: int = 64
    dtype: str = "auto"
    progress: bool = True
    plot: bool = True
    name: str = "race"
    train_problems: int = 50_000  # size of the generated arithmetic training pool
    ratio_warmup_steps: int = 0  # CGGR curriculum: steps over which the kept share falls from 1 to ratio
    scoring: str = "combined"  # difficulty of the cggr and cggr-loss arms: entropy, margin, loss or combined
    head: str = "auto"  # LM head of every arm's training loss: auto, fused (linear-CE on hidden states) or logits


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
    if cfg.lr is not None and not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise CLIError(f"--lr must be a positive number, got {cfg.lr}")
    check_arms(cfg.arms)


def check_arms(arms: tuple[str, ...]) -> None:
    """Known arms, each at most once, at least one."""
    unknown = [a for a in arms if a not in ARMS]
    if unknown or not arms:
        given = ", ".join(unknown) or "(none given)"
        raise CLIError(f"--arms: unknown arm(s) {given}; expected some of {', '.join(ARMS)}")
    if len(set(arms)) != len(arms):
        raise CLIError(f"--arms: each arm at most once, got {', '.join(arms)}")


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


@dataclass
class ArmResult:
    """What one arm did and reached; the JSON rows are :meth:`row`."""

    arm: str
    init_digest: str
    steps: int = 0
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    sequences_scanned: int = 0
    tokens_scanned: int = 0
    tokens_backpropagated: int = 0  # tokens through the full model's forward + backward
    tokens_in_loss: int = 0
    router_tokens: int = 0  # tokens through the router's no-grad forward
    first_sequences: list[int] = field(default_factory=list)
    curve: list[dict[str, float]] = field(default_factory=list)
    last_train_loss: float = float("nan")
    step_seconds: list[float] = field(default_factory=list)
    epochs: float = 0.0  # passes over the training sequences read by this arm
    cpu_seconds: float = 0.0  # process CPU time during the timed steps (contention check on CPU runs)

    def row(self) -> dict[str, Any]:
        final = self.curve[-1] if self.curve else {}
        return {
            "arm": self.arm, "steps": self.steps, "train_seconds": round(self.train_seconds, 2),
            "eval_seconds": round(self.eval_seconds, 2), "sequences_scanned": self.sequences_scanned,
            "tokens_scanned": self.tokens_scanned, "tokens_backpropagated": self.tokens_backpropagated,
            "tokens_in_loss": self.tokens_in_loss, "router_tokens": self.router_tokens, "epochs": self.epochs,
            "heldout_loss": final.get("heldout_loss"), "accuracy": final.get("accuracy"),
            "last_train_loss": self.last_train_loss, "init_digest": self.init_digest,
            "cpu_utilisation": (self.cpu_seconds / (self.train_seconds * torch.get_num_threads())
                                if self.train_seconds else None),
            "median_step_seconds": statistics.median(self.step_seconds) if self.step_seconds else None,
            "max_step_seconds": max(self.step_seconds, default=None),
            "first_sequences": self.first_sequences, "curve": self.curve,
        }


def autocast_context(device: torch.device, dtype: str):
    """The race's precision context: bf16 autocast for ``dtype`` ``'bfloat16'`` (or ``'auto'`` on CUDA), else
    autocast disabled (fp32)."""
    use_bf16 = dtype == "bfloat16" or (dtype == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return torch.autocast(device_type=device.type, enabled=False)


@torch.no_grad()
def heldout_loss(model, data: RaceData, device: torch.device, dtype: str, batch_size: int) -> float:
    """Token-weighted mean next-token cross-entropy (nats) over the held-out sequences."""
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    for start in range(0, data.eval_ids.shape[0], batch_size):
        ids = data.eval_ids[start : start + batch_size].to(device)  # (b, T)
        mask = data.eval_mask[start : start + batch_size].to(device)  # (b, T)
        with autocast_context(device, dtype):
            logits = model(input_ids=ids, attention_mask=mask.long()).logits[:, :-1]  # (b, T-1, V)
        targets = ids[:, 1:].masked_fill(~mask[:, 1:], -100)  # (b, T-1)
        nll = F.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=-100, reduction="sum")
        total += nll.double()
        count += int(mask[:, 1:].sum())
    model.train(was_training)
    return float(total) / max(count, 1)


@torch.no_grad()
def arithmetic_accuracy(model, data: RaceData, device: torch.device, dtype: str, batch_size: int) -> float:
    """Exact-match accuracy of greedy completions of the held-out problems (answer after ``####``)."""
    from cggr.cli.arithmetic import exact_match_accuracy

    was_training = model.training
    model.eval()
    tok = data.tokenizer
    prompts = tok.encode([p.prompt for p in data.problems])
    max_new = max(len(ids) for ids in tok.encode([p.completion for p in data.problems])) + 4
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
    return exact_match_accuracy(completions, [p.answer for p in data.problems])


class Arm:
    """One arm's model, optimizer and step function.

    ``fused_head``: the race's head (:func:`resolve_head`; ``None`` resolves ``cfg.head`` for this model).
    ``True``: ``standard`` and ``cggr-loss`` compute the loss from the base model's hidden states (``self.head``
    holds the (base model, HeadSpec) pair), the CGGRModel arms run with ``fused_head=True``; ``False``: every
    arm's loss is on the model's logits (``self.head`` is ``None``, ``CGGRModel(fused_head=False)``).
    """

    def __init__(self, arm: str, model, cfg: RaceConfig, router_layers: int, lr: float, device: torch.device,
                 *, fused_head: bool | None = None):
        from cggr import CGGRLoss, CGGRModel, create_truncated_router
        from cggr.integrations.hf_quirks import fused_head_parts

        self.arm, self.model, self.device, self.cfg = arm, model, device, cfg
        self.fused_head = resolve_head(cfg.head, model, device) if fused_head is None else bool(fused_head)
        fused = {"fused": True} if device.type == "cuda" else {}
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1, **fused)
        self.wrapper = None
        self.criterion = None
        self.head = None
        if arm in ("cggr", "random"):
            router = create_truncated_router(model, num_layers=router_layers) if arm == "cggr" else None
            self.wrapper = CGGRModel(
                model, router=router, num_router_layers=router_layers, min_tokens_ratio=cfg.ratio,
                warmup_steps=cfg.ratio_warmup_steps, scoring=cfg.scoring,
                selection="topk" if arm == "cggr" else "random", seed=cfg.seed, fused_head=self.fused_head,
            )
            return
        if arm == "cggr-loss":
            self.criterion = CGGRLoss(
                scoring=cfg.scoring, selection="topk", dynamic_threshold=False, min_tokens_ratio=cfg.ratio,
                warmup_steps=cfg.ratio_warmup_steps, seed=cfg.seed,
            ).to(device)
        if self.fused_head:
            self.head, reason = fused_head_parts(model)  # (base model, HeadSpec)
            if self.head is None:
                raise CLIError(f"--head fused is not possible for {type(model).__name__}: {reason}")

    def loss(self, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """This arm's training loss on (b, T) ``ids`` (``labels``: ids with -100 at padding), with grad."""
        with autocast_context(self.device, self.cfg.dtype):
            if self.wrapper is not None:
                loss = self.wrapper(ids, labels=labels, attention_mask=mask.long())
            elif self.head is not None:  # the fused head: logits never stored, fp32 logit math
                from cggr.functional import linear_cross_entropy
                from cggr.integrations.hf_quirks import head_operands

                base, spec = self.head
                hidden = base(input_ids=ids, attention_mask=mask.long()).last_hidden_state  # (b, T, H)
                hidden, weight, bias = head_operands(hidden[:, :-1], spec)  # (b, T-1, H)
                with torch.autocast(self.device.type, enabled=False):
                    if self.criterion is not None:
                        loss = self.criterion.forward_hidden(hidden, weight, labels[:, 1:], bias=bias,
                                                             softcap=spec.softcap)
                    else:  # standard: every valid token (ratio 1), the mean over them as in HF's loss
                        loss = linear_cross_entropy(hidden, weight, labels[:, 1:], bias=bias, ratio=1.0,
                                                    softcap=spec.softcap)
            elif self.criterion is not None:
                logits = self.model(input_ids=ids, attention_mask=mask.long()).logits[:, :-1]  # (S, T-1, V)
                loss = self.criterion(logits, labels[:, 1:])
            else:
                loss = self.model(input_ids=ids, attention_mask=mask.long(), labels=labels).loss
        return loss

    def step(
        self, ids: torch.Tensor, mask: torch.Tensor, lr: float, *, count: bool = True
    ) -> tuple[torch.Tensor, int, int]:
        """One optimizer step on (S or B, T) ``ids``; returns (loss, tokens back-propagated, tokens in loss).

        ``count=False`` skips the token counts (they read device values) and returns zeros for them; the race
        times the step that way and reads :meth:`counts` with the clock stopped.
        """
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        labels = ids.masked_fill(~mask, -100)  # (b, T)
        loss = self.loss(ids, mask, labels)
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
        valid = int(mask[:, 1:].sum())  # targets of position t are the tokens at t + 1
        if self.wrapper is not None:
            selected = self.wrapper.get_metrics()["tokens_selected"]
            return selected, selected
        if self.criterion is not None:
            return valid, self.criterion.get_metrics()["tokens_selected"]
        return valid, valid


def prepare(cfg: RaceConfig) -> tuple[ModelSpec, RaceData]:
    """Resolve ``cfg.model`` and load ``cfg.data`` (tokenised, split, cached): what every arm of a race shares."""
    spec = resolve_model(cfg.model)
    tokenizer = pretrained_tokenizer(spec.path) if spec.kind == "pretrained" else None
    vocab = spec.preset.vocab_size
    if cfg.data == "arithmetic":
        data = load_arithmetic_data(vocab_size=vocab, eval_sequences=cfg.eval_sequences, tokenizer=tokenizer,
                                    num_train=cfg.train_problems)
    else:
        seq_len = cfg.seq_len or spec.preset.seq_len
        data = load_text_data(cfg.data, seq_len=seq_len, vocab_size=vocab, eval_sequences=cfg.eval_sequences,
                              tokenizer=tokenizer)
    return spec, data


def run_race(cfg: RaceConfig, *, log=print) -> dict[str, Any]:
    """Run every arm of ``cfg`` and return the results (also written to ``cfg.out`` as JSON, Markdown, PNG)."""
    from cggr.cli.report import write_race_outputs
    from cggr.cli.timing import environment, synchronize

    validate_config(cfg)
    device = resolve_device(cfg.device)
    t_setup = time.perf_counter()
    spec, data = prepare(cfg)
    preset = spec.preset
    minutes = cfg.minutes if cfg.minutes is not None else preset.minutes
    batch = cfg.batch_size or preset.batch_size
    multiplier = cfg.scan_multiplier if cfg.scan_multiplier is not None else 1.0 / cfg.ratio
    scan = max(1, round(batch * multiplier))
    kept = min(scan, max(1, math.floor(cfg.ratio * scan + 0.5)))  # sequences the selecting arms train on
    router_layers = cfg.router_layers or preset.router_layers
    if spec.num_layers and router_layers >= spec.num_layers:
        raise CLIError(f"--router-layers must be < the model's {spec.num_layers} layers, got {router_layers}")
    lr = cfg.lr or preset.lr
    budget = minutes * 60.0
    base = build_model(spec, None if spec.kind == "pretrained" else data.tokenizer.vocab_size, seed=cfg.seed)
    n_params = sum(p.numel() for p in base.parameters())
    fused = resolve_head(cfg.head, base, device)  # one head for every arm
    setup_seconds = time.perf_counter() - t_setup
    log(f"cggr race: {spec.name} ({n_params / 1e6:.1f}M parameters) on {data.info['origin']}, device {device}, "
        f"{minutes:g} min per arm, ratio {cfg.ratio}, standard batch {batch}, selecting arms scan {scan} "
        f"and train on {kept}; LM head {HEAD_NAMES[fused]} in every arm")
    fractions = [i / cfg.evals for i in range(cfg.evals + 1)]
    eval_bs = max(batch, 16)
    results: list[ArmResult] = []
    for arm in cfg.arms:
        torch.manual_seed(cfg.seed)
        model = copy.deepcopy(base).to(device)
        model.train()
        result = ArmResult(arm=arm, init_digest=weights_digest(model))
        per_step = batch if arm == "standard" else scan
        # untimed warm-up step on a scratch copy (allocator, kernels, lazy init), so no arm pays it on the clock
        scratch = Arm(arm, copy.deepcopy(model), cfg, router_layers, 0.0, device, fused_head=fused)
        scratch.step(data.train_ids[:per_step].to(device), data.train_mask[:per_step].to(device), 0.0,
                     count=False)
        del scratch
        runner = Arm(arm, model, cfg, router_layers, lr, device, fused_head=fused)
        stream = BatchStream(data.train_ids.shape[0], cfg.seed)
        bar = _progress(arm, budget, cfg.progress)
        next_eval = 0
        while True:
            # every evaluation point the last step crossed (one slow step can cross several: same model state)
            crossed = []
            while next_eval < len(fractions) and result.train_seconds >= fractions[next_eval] * budget - 1e-9:
                crossed.append(fractions[next_eval])
                next_eval += 1
            if crossed:
                t0 = time.perf_counter()
                point = {"time_s": round(result.train_seconds, 3), "step": result.steps,
                         "sequences": result.sequences_scanned,
                         "heldout_loss": heldout_loss(model, data, device, cfg.dtype, eval_bs)}
                if data.problems and (next_eval == len(fractions) or cfg.evals <= 8):
                    point["accuracy"] = arithmetic_accuracy(model, data, device, cfg.dtype, 64)
                result.curve += [{"fraction": f, **point} for f in crossed]
                result.eval_seconds += time.perf_counter() - t0
            if result.train_seconds >= budget:
                break
            idx = stream.take(per_step)  # (S or B,)
            if len(result.first_sequences) < 64:
                result.first_sequences += idx.tolist()[: 64 - len(result.first_sequences)]
            ids, mask = data.train_ids[idx].to(device), data.train_mask[idx].to(device)  # (S or B, T)
            synchronize(device)
            c0, t0 = time.process_time(), time.perf_counter()
            loss, _, _ = runner.step(ids, mask, lr_at(result.train_seconds / budget, lr), count=False)
            result.last_train_loss = float(loss.detach())  # host sync: the clock stops when the step is done
            synchronize(device)
            dt = time.perf_counter() - t0
            result.cpu_seconds += time.process_time() - c0
            backprop, in_loss = runner.counts(mask)  # bookkeeping, off the clock (its host syncs differ per arm)
            result.train_seconds += dt
            result.step_seconds.append(dt)
            result.steps += 1
            result.sequences_scanned += per_step
            result.epochs = result.sequences_scanned / data.train_ids.shape[0]
            result.tokens_scanned += int((mask[:, 1:] & mask[:, :-1]).sum())
            result.tokens_backpropagated += backprop
            result.tokens_in_loss += in_loss
            if arm == "cggr":
                result.router_tokens += int(mask.sum())
            if bar is not None:
                bar.update(min(dt, max(budget - bar.n, 0.0)))
                bar.set_postfix(steps=result.steps, loss=f"{result.last_train_loss:.3f}", refresh=False)
            if not math.isfinite(result.last_train_loss):
                log(f"  {arm}: training loss became {result.last_train_loss} at step {result.steps}; stopping arm")
                break
        if bar is not None:
            bar.close()
        final = result.curve[-1]
        log(f"  {arm:>9}: {result.steps} steps, held-out loss {final['heldout_loss']:.4f}"
            + (f", accuracy {final['accuracy']:.1%}" if "accuracy" in final else ""))
        results.append(result)
        del runner, model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    settings = {
        "model": spec.name, "model_kind": spec.kind, "parameters": n_params, "data": cfg.data,
        "minutes_per_arm": minutes,
        "ratio": cfg.ratio, "scan_multiplier": multiplier, "batch_size": batch, "scanned_per_step": scan,
        "trained_per_step": kept,
        "ratio_warmup_steps": cfg.ratio_warmup_steps, "scoring": cfg.scoring, "router_layers": router_layers,
        "num_layers": spec.num_layers, "lr": lr, "warmup_fraction": WARMUP_FRACTION,
        "schedule": "linear warm-up, cosine to 0 over each arm's budget (by elapsed time)", "seed": cfg.seed,
        "head": "fused" if fused else "logits", "head_option": cfg.head,
        "device": str(device), "dtype": cfg.dtype, "evals": cfg.evals, "setup_seconds": round(setup_seconds, 1),
        "data_info": data.info,
    }
    env = environment(device, command=command_line())
    payload = {"settings": settings, "environment": env, "arms": [r.row() for r in results]}
    payload["paths"] = write_race_outputs(payload, Path(cfg.out), cfg.name, plot=cfg.plot)
    return payload


def command_line() -> str:
    """This process's command line, shell-quoted, with the program shown as ``cggr`` (recorded in the results)."""
    import shlex
    import sys

    argv = list(sys.argv)
    if argv and Path(argv[0]).name in ("cggr", "__main__.py", "main.py"):
        argv[0] = "cggr"
    return " ".join(shlex.quote(a) for a in argv)


def _progress(arm: str, budget: float, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: no bar
        return None
    return tqdm(total=round(budget, 1), desc=f"{arm:>9}", unit="s", leave=True, mininterval=0.5,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s {postfix}")


__all__ = ["ARMS", "HEADS", "Arm", "ArmResult", "RaceConfig", "arithmetic_accuracy", "autocast_context", "command_line",
           "heldout_loss", "lr_at", "prepare", "resolve_head", "run_race", "validate_config", "weights_digest"]
