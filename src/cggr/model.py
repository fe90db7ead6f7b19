"""``CGGRScorer`` (token masks from a cheap router) and ``CGGRModel`` (train only on the hardest sequences).

Shape legend: B batch, T sequence length, H hidden size, V vocabulary, k selected sequences
(k = max(1, round(ratio · B))), K kept tokens, K_max a static bound on K.

Dataflow of one ``CGGRModel`` training call::

    input_ids (B, T) ──router (first layers, no grad)──> logits (B, T, V)
        ──scores (fp32; one Triton pass on CUDA)──> difficulty (B, T) ──mean over valid tokens──> seq score (B,)
        ──topk (k, static)──> idx (k,) ──index_select──> input_ids (k, T), labels (k, T)
        ──full model (with grad)──> logits (k, T, V) ──cross-entropy over valid targets──> loss

With the fused head (causal LMs on CUDA by default, ``fused_head``), the last step becomes::

        ──base model (with grad)──> hidden (k, T, H) after the final norm
        ──[token_ratio: gather the ≤ K_max kept rows]──> linear_cross_entropy(hidden, head weight, bias,
          softcap, logit scale from cggr.integrations.hf_quirks) ──> loss   ([k·T, V] logits never exist)

Cost ≈ router (about k_layers/L of a no-grad forward) + ratio × one full training step. Everything stays on the
device: k is a Python int fixed by the ratio, selection uses ``torch.topk``/``index_select`` (no ``nonzero``,
``.item()`` or ``.tolist()``), so with a fixed ratio the step is ``torch.compile``/CUDA-graph friendly.
Metrics that need host values are computed lazily in ``get_metrics()``.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cggr._calling import ForwardFn, call_model, call_style, check_forward_fn, logits_of
from cggr._selector import Curriculum, TokenSelector
from cggr._validation import (
    SCORING_MODES,
    check_bool,
    check_choice,
    check_ignore_index,
    check_int,
    check_ratio,
    check_target_range,
)
from cggr.distributed import GlobalBatch, process_group_size
from cggr.functional import IMPLS, LinearCrossEntropyOptions, check_head_options, linear_cross_entropy, token_scores
from cggr.integrations.hf_quirks import HeadSpec, fused_head_parts, head_operands, wrapper_reason
from cggr.reference import REFERENCE_NORMS, check_reference_loss, excess_scores
from cggr.router import TruncatedRouter, create_truncated_router, unwrap_model
from cggr.sampling import DEFAULT_TEMPERATURE, DEFAULT_UNIFORM_MIX, check_temperature, check_uniform_mix
from cggr.scoring import difficulty, masked_mean
from cggr.selection import SEQUENCE_STRATEGIES, importance_sequences, select_sequences, select_tokens

#: Scoring modes of CGGRModel: the shared ones plus ``'reducible'`` (RHO-LOSS: learner loss − reference loss).
MODEL_SCORING_MODES = (*SCORING_MODES, "reducible")

# Model types trained with unshifted (masked-LM) labels when no ``causal`` flag is given.
_MASKED_LM_TYPES = frozenset(
    {
        "bert",
        "roberta",
        "xlm-roberta",
        "camembert",
        "distilbert",
        "albert",
        "electra",
        "deberta",
        "deberta-v2",
        "modernbert",
        "mpnet",
        "ernie",
    }
)


def _router_logits(router: Callable[..., Any], input_ids: Tensor, attention_mask: Tensor | None, **kw) -> Tensor:
    with torch.no_grad():
        if attention_mask is not None:
            kw["attention_mask"] = attention_mask
        out = router(input_ids, **kw)
    logits = logits_of(out, "router")
    if logits.dim() != 3 or logits.shape[:2] != input_ids.shape:
        raise ValueError(
            f"router must return logits of shape (B, T, V) = ({input_ids.shape[0]}, {input_ids.shape[1]}, V), "
            f"got {tuple(logits.shape)}"
        )
    return logits


def _check_2d(name: str, t: Tensor | None, shape: torch.Size | None = None, *, integer: bool = False,
              device: torch.device | None = None) -> None:
    """``t`` is None or a (B, T) tensor (of ``shape`` / on ``device``: those of input_ids, when given)."""
    if t is None:
        return
    if not isinstance(t, Tensor) or t.dim() != 2:
        got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a (B, T) tensor, got {got}")
    if shape is not None and t.shape != shape:
        raise ValueError(f"{name} shape {tuple(t.shape)} does not match input_ids shape {tuple(shape)}")
    if device is not None and t.device != device:
        verb = "are" if name.endswith("s") else "is"
        raise ValueError(f"{name} {verb} on {t.device} but input_ids are on {device}; move them together")
    if integer and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor of token ids, got dtype {t.dtype}")


def _resolve_router(
    model: nn.Module, router: Callable[..., Any] | None, num_router_layers: int, forward_fn: ForwardFn | None
) -> Any:
    if router is None:
        return create_truncated_router(model, num_router_layers, forward_fn=forward_fn)
    if not callable(router):
        raise TypeError(f"router must be a TruncatedRouter or a callable returning logits, got {type(router)}")
    return router


# ---------------------------------------------------------------------------------------------- scorer
class CGGRScorer(TokenSelector):
    """Per-token difficulty and a keep-mask from a router, for null routing (e.g. ``PersistentTRMLP``).

    Args:
        router: A :class:`cggr.TruncatedRouter` (or any callable ``router(input_ids, attention_mask=...)``
            returning (B, T, V) logits or an object with ``.logits``). Only a ``TruncatedRouter`` (which owns
            no parameters) is registered as a submodule; any other router is held by plain reference so that
            its parameters are never counted twice.
        scoring, selection, num_strata, min_tokens_per_sequence, dynamic_threshold, threshold_sensitivity,
        min_tokens_ratio, warmup_steps, ignore_index, seed: As in :class:`cggr.CGGRLoss`.
        impl: Scoring kernel, ``'auto'``, ``'torch'`` or ``'triton'`` (see :func:`cggr.functional.token_scores`).

    Call: ``difficulty, mask, info = scorer(input_ids, targets=None, attention_mask=None)`` where ``targets``
    (B, T) are aligned with the logits (already shifted) and enable the nll term; ``attention_mask`` zeros and
    ``ignore_index`` targets are never selected. ``difficulty`` is (B, T) fp32, ``mask`` (B, T) bool, ``info``
    a dict of 0-d tensors: current_ratio (a CPU scalar when the ratio is a host value: fixed, or the
    scorer's step buffer on another device), tokens_selected,
    tokens_total, confidence, entropy (on the device).
    """


    def __init__(
        self,
        router: Callable[..., Any] | nn.Module,
        min_tokens_ratio: float = 0.25,
        scoring: str = "combined",
        selection: str = "topk",
        num_strata: int = 4,
        min_tokens_per_sequence: int = 1,
        dynamic_threshold: bool = True,
        threshold_sensitivity: float = 0.5,
        warmup_steps: int = 1000,
        ignore_index: int = -100,
        seed: int | None = None,
        impl: str = "auto",
    ) -> None:
        super().__init__(
            scoring=scoring, selection=selection, num_strata=num_strata,
            min_tokens_per_sequence=min_tokens_per_sequence, dynamic_threshold=dynamic_threshold,
            threshold_sensitivity=threshold_sensitivity, min_tokens_ratio=min_tokens_ratio,
            warmup_steps=warmup_steps, ignore_index=ignore_index, seed=seed,
        )
        if not callable(router):
            raise TypeError(f"router must be a TruncatedRouter or a callable returning logits, got {type(router)}")
        if selection == "importance":
            raise ValueError("selection='importance' needs its 1 / pi weights applied to a loss; CGGRScorer's mask "
                             "has none (use CGGRLoss or CGGRModel for importance sampling, or 'sampled' here)")
        _set_router(self, router)
        self.impl = check_choice("impl", impl, IMPLS)

    def forward(
        self,
        input_ids: Tensor,
        targets: Tensor | None = None,
        attention_mask: Tensor | None = None,
        **router_kwargs: Any,
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Score every token and select the hardest.

        Returns:
            ``(difficulty (B, T) fp32, mask (B, T) bool, info)``.
        """
        _check_2d("input_ids", input_ids, integer=True)
        _check_2d("targets", targets, input_ids.shape, device=input_ids.device)
        _check_2d("attention_mask", attention_mask, input_ids.shape, device=input_ids.device)
        logits = _router_logits(self.router, input_ids, attention_mask, **router_kwargs)  # (B, T, V)
        scores = token_scores(logits, targets, ignore_index=self.ignore_index, impl=self.impl)
        valid = scores.valid if scores.valid is not None else torch.ones(scores.entropy.shape, dtype=torch.bool,
                                                                          device=scores.entropy.device)
        if attention_mask is not None:
            valid = valid & attention_mask.bool()
        diff, mask, info = self.select_scored(scores, valid)  # (B, T) fp32, (B, T) bool
        return diff, mask, info


# ---------------------------------------------------------------------------------------------- model
@dataclass
class CGGROutput:
    """What :class:`CGGRModel` returns when ``labels`` are given: the loss, and the logits it was computed from.

    It reads like a Hugging Face ``ModelOutput``, so ``transformers.Trainer``, Accelerate loops and code written for
    HF models work unchanged: ``out.loss``, ``out["loss"]``, ``out[0]`` (the first field that is not ``None``),
    ``out[1:]``, ``out.to_tuple()``, ``loss, logits = out``.

    Attributes:
        loss: 0-d fp32 loss (see :meth:`CGGRModel.forward`).
        logits: (k, T, V) logits of the k sequences trained on, in the order of ``get_metrics()["selected_indices"]``
            (in eval mode: every sequence, (B, T, V)); ``None`` with the fused head, which never materialises them.
    """

    loss: Tensor | None = None
    logits: Tensor | None = None

    def keys(self) -> list[str]:
        return [name for name in ("loss", "logits") if getattr(self, name) is not None]

    def items(self) -> list[tuple[str, Tensor]]:
        return [(name, getattr(self, name)) for name in self.keys()]

    def values(self) -> list[Tensor]:
        return [getattr(self, name) for name in self.keys()]

    def to_tuple(self) -> tuple[Tensor, ...]:
        return tuple(self.values())

    def __getitem__(self, key: str | int | slice) -> Any:
        if isinstance(key, str):
            if getattr(self, key, None) is None or key not in ("loss", "logits"):
                raise KeyError(key)
            return getattr(self, key)
        return self.to_tuple()[key]

    def __iter__(self):
        return iter(self.to_tuple())

    def __len__(self) -> int:
        return len(self.keys())


def is_masked_lm(model: nn.Module) -> bool:
    """True for masked-LM heads (BERT/RoBERTa-style: labels are not shifted)."""
    model = unwrap_model(model)
    if "MaskedLM" in type(model).__name__:
        return True
    cfg = getattr(model, "config", None)
    return bool(
        cfg is not None
        and getattr(cfg, "model_type", None) in _MASKED_LM_TYPES
        and not getattr(cfg, "is_decoder", False)
    )


class CGGRModel(Curriculum):
    """Batch split: score the batch with a truncated router, train the full model on the hardest sequences.

    Args:
        model: A Hugging Face causal LM or masked LM, or a plain PyTorch LM: called as
            ``model(input_ids=..., attention_mask=...)`` when its ``forward`` has an ``input_ids`` parameter, else
            as ``model(input_ids)`` (``attention_mask`` as a keyword only if ``forward`` takes one); its output is
            the logits (B, T, V), a tuple starting with them, or an object with ``.logits``.
        router: Router returning (B, T, V) logits; default ``create_truncated_router(model, num_router_layers,
            forward_fn=forward_fn)`` (a plain model without a known layer list is its own router: passthrough;
            give a router built with ``layer_path=`` for a truncated one).
        num_router_layers: Layers of the default router.
        min_tokens_ratio: Share of the batch's sequences trained on once warm-up is over, in (0, 1].
        warmup_steps: Steps over which the share falls linearly from 1 to ``min_tokens_ratio``.
        scoring: Token difficulty: ``'entropy'``, ``'margin'``, ``'loss'``, ``'combined'`` or ``'reducible'``
            (RHO-LOSS, Mindermann et al. 2022: a sequence's score is the learner's loss minus a reference
            model's loss on it, passed as ``forward(..., reference_loss=)``, per sequence (B,) or per token (B, T);
            see :mod:`cggr.reference`). The learner's loss is the ROUTER's mean next-token loss over the
            sequence's valid targets (the router is the learner's first layers: cheap, but only a proxy); for
            the learner's own loss, as in RHO-LOSS, pass ``router=model`` (a no-grad forward of the whole model
            over the batch). How the two are combined: ``reference_norm``.
        selection: ``'topk'`` (hardest sequences), ``'random'`` (the control; the router is not run),
            ``'sampled'`` (k drawn without replacement by Gumbel-top-k over score / ``temperature``: τ → 0 is
            ``topk``, τ → ∞ is ``random``) or ``'importance'`` (unbiased importance sampling: sequence i kept
            with probability π_i ∝ its score mixed with ``uniform_mix`` of uniform, negative scores counting as
            0; its loss weighted by 1 / π_i so that the expected loss and gradient equal the whole batch's mean
            over valid tokens). See :mod:`cggr.sampling`.
        token_ratio: If set, inside the selected sequences only the hardest ``token_ratio`` share of valid
            tokens (by router difficulty) contributes to the loss.
        ignore_index: Label value to ignore.
        causal: Shift labels HF-style (position t predicts label t+1). ``None``: ``False`` for masked LMs.
        seed: Seed of the ``random`` control's generator.
        impl: Scoring kernel, ``'auto'``, ``'torch'`` or ``'triton'`` (see :func:`cggr.functional.token_scores`);
            also the kernel of the fused head.
        fused_head: Compute the causal-LM loss from the base model's final hidden states with
            :func:`cggr.functional.linear_cross_entropy` instead of materialising the (k, T, V) logits.
            ``None`` (default): when the model is a causal LM on CUDA whose head is a plain linear layer with
            the quirks recorded in :mod:`cggr.integrations.hf_quirks` (not wrapped in DDP/FSDP/DataParallel
            or ``torch.compile``: the base model is called directly; put the wrapper around the ``CGGRModel``
            instead: ``DDP(CGGRModel(model))``, ``fully_shard(CGGRModel(model))``, ``torch.compile(CGGRModel(...))``;
            a wrapped model warns once and takes the unfused path);
            ``True``: always (``ValueError`` if impossible); ``False``: never. The loss and gradients equal
            the unfused path's (same selection, same mean over kept tokens) up to floating-point rounding.
        temperature: τ > 0 of ``selection='sampled'``, in score units.
        uniform_mix: λ in (0, 1] of ``selection='importance'`` (every weight is at most B / (k · λ)).
        reference_norm: How ``'reducible'`` combines the learner's and the reference's per-sequence losses
            (:func:`cggr.reference.excess_scores`): ``'none'`` (the raw difference, RHO-LOSS), ``'zscore'``
            (both standardised over the batch's sequences first: the raw difference ranks mostly by LOW reference
            loss when the reference's losses spread more than the learner's, i.e. it picks easy sequences) or
            ``'rank'`` (percentile ranks).
        head_options: Kernel settings of the fused head (a :class:`cggr.functional.LinearCrossEntropyOptions`
            setting only ``kernel``, ``workspace``, ``workspace_bytes``, ``accumulate``, ``filter_eps``,
            ``bwd``; e.g. ``LinearCrossEntropyOptions(workspace='outputs')``: no 256 MiB logits workspace, the
            chunks live in the head weight's gradient). ``None``: the defaults.
        forward_fn: Adapter for any other call signature or output:
            ``forward_fn(model, input_ids, attention_mask, **kwargs)`` returning the logits (B, T, V) or an output
            holding them (a tuple starting with them, or ``.logits``); also used by the default router. The fused
            head (which calls the base model directly) is off with an adapter.
        global_selection: Under DDP/FSDP (an initialised ``torch.distributed`` group of W > 1 processes),
            choose the W·k hardest sequences of all ranks' batches instead of the k hardest of each rank's own,
            and give every rank k of them (static shapes, balanced work; see :mod:`cggr.distributed`). The
            loss a rank returns is then its kept tokens' cross-entropy sum · W / (kept tokens of all ranks), so
            the gradient mean that DDP/FSDP compute is the gradient of the global mean loss (the mean of the
            ranks' losses is that loss), and the metrics describe the global batch. Every rank must pass the
            same (B, T). With ``selection`` ``'topk'`` or ``'random'``; not with ``num_items_in_batch``. Off
            (default): selection and the loss's mean are per rank. A no-op without a group of > 1 processes.
        process_group: The group that ``global_selection`` selects across (``None``: the default group).

    ``forward(input_ids, labels=None, attention_mask=None, reference_loss=None, num_items_in_batch=None,
    **kwargs)`` returns the plain model output when ``labels`` is ``None``, else a :class:`CGGROutput` whose
    ``.loss`` is the 0-d fp32 mean cross-entropy over the valid targets of the selected sequences (0.0 with grad
    when there are none); with ``selection='importance'`` Σ_selected Σ_t nll / (π_i · N_valid) with N_valid the
    valid targets of the whole batch (an unbiased estimate of the whole batch's mean; ``token_ratio`` is refused
    with it, as it would bias the estimate); with ``num_items_in_batch``, scaled for gradient accumulation (see
    :meth:`forward`). Positions with ``attention_mask == 0`` are neither predicted nor predict anything: with left
    padding the last pad does not predict the first real token (HF's own loss counts that term), so the loss
    equals that of the unpadded sequences. Call ``step()`` after each optimizer step; ``step_count`` is a buffer,
    so ``state_dict()`` carries the curriculum. ``parameters()`` are the model's, each once.
    """

    #: For transformers' Trainer: ``forward`` takes ``num_items_in_batch`` and then returns a loss normalised for the
    #: whole accumulated batch (the Trainer passes it and does not divide by the gradient-accumulation steps).
    accepts_loss_kwargs = True

    def __init__(
        self,
        model: nn.Module,
        router: Callable[..., Any] | None = None,
        num_router_layers: int = 4,
        min_tokens_ratio: float = 0.25,
        warmup_steps: int = 1000,
        scoring: str = "combined",
        selection: str = "topk",
        token_ratio: float | None = None,
        ignore_index: int = -100,
        causal: bool | None = None,
        seed: int | None = None,
        impl: str = "auto",
        fused_head: bool | None = None,
        head_options: LinearCrossEntropyOptions | None = None,
        temperature: float = DEFAULT_TEMPERATURE,
        uniform_mix: float = DEFAULT_UNIFORM_MIX,
        reference_norm: str = "none",
        forward_fn: ForwardFn | None = None,
        global_selection: bool = False,
        process_group: Any = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        super().__init__(min_tokens_ratio, warmup_steps, seed)
        if fused_head is not None and not isinstance(fused_head, bool):
            raise TypeError(f"fused_head must be a bool or None, got {fused_head!r}")
        check_int("num_router_layers", num_router_layers, minimum=1)
        self.forward_fn = check_forward_fn(forward_fn)
        self._call_style = call_style(model)
        self.model = model
        _set_router(self, _resolve_router(model, router, num_router_layers, self.forward_fn))
        self.scoring = check_choice("scoring", scoring, MODEL_SCORING_MODES)
        self.selection = check_choice("selection", selection, SEQUENCE_STRATEGIES)
        self.token_ratio = None if token_ratio is None else check_ratio("token_ratio", token_ratio)
        if self.selection == "importance" and self.token_ratio is not None:
            raise ValueError(f"token_ratio={token_ratio!r} cannot be combined with selection='importance' (keeping "
                             "the hardest tokens would bias the importance-weighted estimate); use token_ratio=None")
        self.temperature = check_temperature(temperature)
        self.uniform_mix = check_uniform_mix(uniform_mix)
        self.reference_norm = check_choice("reference_norm", reference_norm, REFERENCE_NORMS)
        self.ignore_index = check_ignore_index(ignore_index)
        if causal is not None and not isinstance(causal, bool):
            raise TypeError(f"causal must be a bool or None, got {causal!r}")
        self.causal = (not is_masked_lm(model)) if causal is None else causal
        self.impl = check_choice("impl", impl, IMPLS)
        self.fused_head = fused_head
        self.head_options = check_head_options(head_options, "CGGRModel")
        self.global_selection = check_bool("global_selection", global_selection)
        if self.global_selection and self.selection not in ("topk", "random"):
            raise ValueError(f"global_selection supports selection 'topk' and 'random', got {self.selection!r} (its "
                             "draws or weights are per rank)")
        if self.global_selection and self.scoring == "reducible" and self.reference_norm != "none":
            raise ValueError(f"global_selection needs scores comparable across ranks; reference_norm="
                             f"{self.reference_norm!r} normalises over each rank's batch (use 'none')")
        self.process_group = process_group
        if fused_head:
            _, reason = self._fused_parts()
            if reason:
                raise ValueError(f"fused_head=True is not possible for {type(model).__name__}: {reason}")
        self._last: dict[str, Tensor | int] = {}
        self._warned_unfused = False
        _add_trainer_support(model)
        # the curriculum's buffers start where the model lives (a random draw on a CPU counter inside a compiled
        # CUDA graph would be a host-device copy; CGGRModel.to() moves them like any module's buffers)
        device = next((p.device for p in model.parameters()), None)
        if device is not None:
            for name in ("step_count", "rng_counter", "rng_seed"):
                self._buffers[name] = self._buffers[name].to(device)
            self._set_step(0)  # the moved step_count holds 0: keep the host mirror trusted (no read at the 1st step)

    # ------------------------------------------------------------------ Hugging Face passthrough
    @property
    def loss_type(self) -> str:
        """``'ForCausalLM'`` or ``'ForMaskedLM'``: tells transformers' Trainer whether labels are shifted, so that
        its ``num_items_in_batch`` counts ``labels[:, 1:]`` for causal LMs, as this wrapper's loss does."""
        return "ForCausalLM" if self.causal else "ForMaskedLM"

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Save the wrapped model with its own ``save_pretrained`` (so ``AutoModelForCausalLM.from_pretrained``
        loads it back as the plain model) plus the curriculum (``cggr_state.pt``: step and random stream).

        Args:
            save_directory: Directory to write.
            **kwargs: Passed to the wrapped model's ``save_pretrained`` (e.g. ``safe_serialization``,
                ``is_main_process``).
        """
        from cggr.integrations.transformers import save_pretrained

        save_pretrained(self, save_directory, **kwargs)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, *, model_class: Any = None,
        model_kwargs: dict[str, Any] | None = None, **cggr_kwargs: Any,
    ) -> CGGRModel:
        """``CGGRModel(model_class.from_pretrained(path, **model_kwargs), **cggr_kwargs)`` (``model_class``
        default ``AutoModelForCausalLM``), with the curriculum of ``cggr_state.pt`` when the directory has one
        (see :meth:`save_pretrained`)."""
        from cggr.integrations.transformers import from_pretrained

        return from_pretrained(pretrained_model_name_or_path, model_class=model_class, model_kwargs=model_kwargs,
                               **cggr_kwargs)

    # ------------------------------------------------------------------ curriculum
    def num_selected_sequences(self, batch_size: int) -> int:
        """k = max(1, round(ratio · B)) (round half up), at most B."""
        return min(batch_size, max(1, math.floor(self.current_ratio * batch_size + 0.5)))

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: Tensor | None = None,
        labels: Tensor | None = None,
        attention_mask: Tensor | None = None,
        reference_loss: Tensor | None = None,
        sequence_scores: Tensor | None = None,
        num_items_in_batch: int | Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """Train step loss over the hardest sequences, or the plain model output when ``labels`` is None.

        In eval mode (``not self.training``) the loss covers every sequence and valid token (no router, no
        random draw, the metrics of the last training step kept), so evaluation loops report the true loss.

        Args:
            input_ids: (B, T) token ids.
            labels: (B, T) HF-style labels (shifted inside for causal LMs), ``ignore_index`` ignored.
            attention_mask: (B, T) 1 = token, 0 = padding.
            reference_loss: ``scoring='reducible'`` only (required there in training mode, ignored in eval mode):
                the reference model's loss per sequence (B,) or per token (B, T), aligned with the shifted
                targets as :class:`cggr.reference.ReferenceLosses` stores them (``.sequence(idx)`` /
                ``.tokens(idx)``). Per token, a sequence's reference loss is its mean over the valid targets,
                and ``token_ratio`` keeps the tokens of largest excess loss.
            sequence_scores: Optional precomputed (B,) per-sequence scores to select by instead of running the
                router (training mode; ignored in eval mode): stale scores of the same examples from an earlier
                step (:class:`cggr.async_scoring.SequenceScoreCache`), or the next batch's scores computed on a
                side CUDA stream while this step trained (:class:`cggr.async_scoring.AsyncCGGRScorer`), e.g. from
                :meth:`score_sequences`. Sequences without valid targets are never selected whatever their score.
                Not with ``token_ratio`` (which needs the router's token scores), ``reference_loss`` (it belongs
                in the scores' computation) or ``selection='random'``.
            num_items_in_batch: Valid targets in the whole accumulated batch (what transformers' Trainer passes
                under gradient accumulation; for causal LMs it counts ``labels[:, 1:] != -100``). Given N, the loss
                is ``mean over the kept tokens × n / N`` with n the valid targets of this call: each micro-batch
                weighs by its share of the tokens, so the accumulated loss and gradient are those of one batch of
                all micro-batches whenever every micro-batch keeps the same share (exactly so at ratio 1 and in
                eval mode, where the loss is HF's ``sum / N``). ``None``: the per-call mean.
            **kwargs: Extra model inputs; tensors with leading dim B (e.g. ``token_type_ids``,
                ``position_ids``) are sliced to the selected sequences.

        Returns:
            A :class:`CGGROutput` (``.loss``, ``.logits``) when ``labels`` are given, else the model's own output.
        """
        if reference_loss is not None and self.scoring != "reducible":
            raise ValueError(f"reference_loss is only used with scoring='reducible', got scoring={self.scoring!r}")
        if labels is None:
            return call_model(self.model, self._call_style, input_ids, attention_mask, self.forward_fn, **kwargs)
        if input_ids is None:
            raise ValueError("input_ids is required when labels are given (the router scores token ids)")
        _check_2d("input_ids", input_ids, integer=True)
        _check_2d("labels", labels, input_ids.shape, integer=True,  # before any .long(): floats never truncate
                  device=input_ids.device)
        _check_2d("attention_mask", attention_mask, input_ids.shape, device=input_ids.device)
        num_items = _check_num_items(num_items_in_batch)
        head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        head_w = getattr(head, "weight", None)
        # named as passed (the loss sees shifted targets); skipped where the head's weight is not a plain (V, H)
        # matrix here (e.g. FSDP's flattened, freed parameters outside forward): the loss still checks
        if isinstance(head_w, Tensor) and head_w.dim() == 2 and head_w.shape[0] > 0:
            check_target_range(labels, head_w.shape[0], ignore_index=self.ignore_index, name="labels")
        batch = input_ids.shape[0]
        if attention_mask is not None:
            labels = labels.masked_fill(attention_mask == 0, self.ignore_index)
        if self.causal:  # position t predicts label t+1; the last position predicts nothing
            targets = F.pad(labels[:, 1:], (0, 1), value=self.ignore_index)  # (B, T)
            if attention_mask is not None:  # nor does a padding position (left padding: the last pad)
                targets = targets.masked_fill(attention_mask == 0, self.ignore_index)
        else:
            targets = labels
        valid = targets != self.ignore_index  # (B, T)
        # eval mode: the loss of every sequence and token, so an evaluation loop (HF Trainer.evaluate, a
        # held-out pass) reports the true loss, not the hardest share's; no router, no random draw
        routing = self.training
        token_ratio = self.token_ratio if routing else None
        k = self.num_selected_sequences(batch) if routing else batch
        glob = self._global_batch(input_ids, targets, attention_mask, kwargs, num_items) if routing else None

        need_scores = (self.selection != "random" and k < batch) or token_ratio is not None
        given_scores: Tensor | None = None
        if sequence_scores is not None and routing:
            given_scores = self._check_sequence_scores(sequence_scores, batch, input_ids.device, reference_loss)
            need_scores = False
        if reference_loss is not None:
            reference_loss = check_reference_loss(reference_loss, batch, input_ids.shape[1], input_ids.device)
        elif need_scores and self.scoring == "reducible":
            raise ValueError("reference_loss is required with scoring='reducible' in training mode: the reference "
                             f"model's losses per sequence ({batch},) or per token {tuple(input_ids.shape)} "
                             "(cggr.reference.ReferenceLosses)")
        tok_diff: Tensor | None = None
        last: dict[str, Tensor | int] = {}  # a fresh dict per call (never read here: no compile guards on it)
        if need_scores:
            tok_diff, seq_score = self._score(input_ids, targets, valid, attention_mask, reference_loss,
                                              _batch_kwargs(kwargs, batch), last)
            last["sequence_scores"] = seq_score.detach()
        elif given_scores is not None:
            seq_score = torch.where(valid.any(-1), given_scores, -torch.inf)  # (B,)
        seq_weight: Tensor | None = None  # importance: 1 / π of the selected sequences (k,)
        if glob is not None:  # every rank now holds all W·B rows and the same scores; K = W·k are chosen
            input_ids, targets, attention_mask, gathered = glob.rows()
            kwargs = {**kwargs, **gathered}
            if need_scores or given_scores is not None:
                seq_score, tok_diff = glob.scores(seq_score, tok_diff)
            valid = targets != self.ignore_index
            batch, k = batch * glob.world_size, k * glob.world_size
            if k == batch:
                idx = torch.arange(batch, device=input_ids.device)
            else:  # sorted, so that rank r's share is rows [r·k, (r+1)·k) of one list that every rank holds
                if self.selection == "random":
                    seq_score = glob.random_scores(self.random_generator(), input_ids.device)
                idx = torch.sort(select_sequences(seq_score, k)).values  # (K,)
        elif self.selection == "random" and routing:
            idx = self.random_generator().permutation(batch, input_ids.device)[:k]  # (k,)
        elif k == batch:
            idx = torch.arange(batch, device=input_ids.device)
        elif self.selection == "importance":
            idx, pi, rho = importance_sequences(seq_score, k, uniform_mix=self.uniform_mix,
                                                generator=self.random_generator())  # (k,), (k,)
            seq_weight = torch.where(pi > 0, 1.0 / pi.clamp(min=1e-30), 0.0).float()
            last["importance_variance_ratio"] = rho
            last["importance_max_weight"] = seq_weight.max()
        else:
            gen = self.random_generator() if self.selection == "sampled" else None
            idx = select_sequences(seq_score, k, strategy=self.selection, generator=gen,
                                   temperature=self.temperature)  # (k,)

        sub_ids = input_ids.index_select(0, idx)  # (k, T)
        sub_targets = targets.index_select(0, idx)  # (k, T)
        sub_mask = attention_mask.index_select(0, idx) if attention_mask is not None else None
        sub_kwargs = _batch_kwargs(kwargs, batch, idx)
        if token_ratio is not None:
            sub_valid = sub_targets != self.ignore_index  # (k, T)
            keep = select_tokens(tok_diff.index_select(0, idx), sub_valid, token_ratio)  # (k, T)
            kept_targets = torch.where(keep, sub_targets, self.ignore_index)
        else:
            keep = sub_targets != self.ignore_index
            kept_targets = sub_targets
        n_keep = keep.sum()
        router_selected = (sub_targets != self.ignore_index).sum()
        if glob is not None:  # this rank's share of the K chosen rows; the global count normalises
            n_global = n_keep
            sub_ids, sub_targets, keep, kept_targets = (glob.share(t) for t in (sub_ids, sub_targets, keep,
                                                                                kept_targets))
            sub_mask = glob.share(sub_mask) if sub_mask is not None else None
            sub_kwargs = {key: glob.share(val) if key in gathered else val for key, val in sub_kwargs.items()}
            n_keep = keep.sum()
        # importance: token weights n_keep / (π_i · N_valid) under the mean over kept tokens, so the loss is
        # Σ nll / (π_i · N_valid) (Horvitz-Thompson over the whole batch's valid targets)
        tok_weight = None
        if seq_weight is not None:
            tok_weight = (seq_weight * (n_keep / valid.sum().clamp(min=1))).unsqueeze(1).expand(k, sub_ids.shape[1])
        fused = self._fused_for(input_ids.device)
        logits = None
        if fused is not None:
            base, spec = fused
            out = base(input_ids=sub_ids, attention_mask=sub_mask, **sub_kwargs)
            hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]  # (k, T, H)
            loss = self._fused_loss(hidden, spec, kept_targets, keep, token_ratio, tok_weight,
                                    None if glob is None else k)
        else:
            out = call_model(self.model, self._call_style, sub_ids, sub_mask, self.forward_fn, **sub_kwargs)
            logits = logits_of(out, type(self.model).__name__)  # (k, T, V)
            if logits.dim() != 3 or logits.shape[:2] != sub_ids.shape:
                raise ValueError(
                    f"{type(self.model).__name__} returned logits of shape {tuple(logits.shape)} for input_ids of "
                    f"shape {tuple(sub_ids.shape)}; expected (k, T, V) = ({sub_ids.shape[0]}, {sub_ids.shape[1]}, "
                    "V), the logits of every position (pass forward_fn= to adapt the call)"
                )
            vocab = logits.shape[-1]
            flat_logits = logits.float().view(-1, vocab)  # (k·T, V) fp32, as HF's own loss does
            flat_targets = kept_targets.reshape(-1).long()
            if tok_weight is None:
                ce = F.cross_entropy(flat_logits, flat_targets, ignore_index=self.ignore_index, reduction="sum")
            else:  # 0 at ignored targets
                ce = F.cross_entropy(flat_logits, flat_targets, ignore_index=self.ignore_index, reduction="none")
                ce = (ce * tok_weight.reshape(-1)).sum()
            loss = ce / n_keep.clamp(min=1)  # mean over kept tokens; 0.0 (with grad) when there are none
        if num_items is not None:  # this call's share of the accumulated batch's targets (no host sync)
            loss = loss * (valid.sum() / num_items)
        if glob is not None:
            loss = loss * glob.loss_scale(n_keep, n_global)

        if not routing:  # the training metrics of the last train step stay readable after an evaluation
            return CGGROutput(loss=loss, logits=logits)
        last.update(
            indices=idx.detach(),
            # the original cggr's key: here the valid targets of the sequences the router selected (docs/compat.md)
            router_tokens_selected=router_selected.detach(),
            tokens_selected=(n_keep if glob is None else n_global).detach(),
            tokens_total=valid.sum().detach(),
            sequences_selected=k,
            batch_size=batch,
        )
        self._last = last
        return CGGROutput(loss=loss, logits=logits)

    # ------------------------------------------------------------------ distributed
    def _global_batch(self, input_ids: Tensor, targets: Tensor, attention_mask: Tensor | None,
                      kwargs: dict[str, Any], num_items: Any) -> GlobalBatch | None:
        """Start gathering every rank's batch (``global_selection`` with W > 1 ranks), else ``None``."""
        if not self.global_selection:
            return None
        ranks = process_group_size(self.process_group)
        if ranks is None:
            return None
        if num_items is not None:
            raise ValueError("num_items_in_batch cannot be combined with global_selection=True: the loss is already "
                             "normalised by the kept tokens of all ranks (a Trainer scaling it again for its own "
                             "token averaging across devices would count the ranks twice); use per-rank selection")
        batch = input_ids.shape[0]
        batch_kwargs = {key: val for key, val in kwargs.items()
                        if isinstance(val, Tensor) and val.dim() >= 1 and val.shape[0] == batch}
        return GlobalBatch(self.process_group, *ranks, input_ids, targets, attention_mask, batch_kwargs)

    # ------------------------------------------------------------------ fused head
    def _fused_parts(self) -> tuple[tuple[nn.Module, HeadSpec] | None, str]:
        """``((base model, head spec), "")`` when the fused head can run, else ``(None, reason)``."""
        if self.forward_fn is not None:
            return None, "forward_fn is given (the fused head would call the base model past it)"
        if not self.causal:
            return None, "the fused head computes next-token (causal) losses; this model is trained as a masked LM"
        return fused_head_parts(self.model)

    def _fused_for(self, device: torch.device) -> tuple[nn.Module, HeadSpec] | None:
        """The fused-head parts for this call, or ``None`` for the unfused path (see ``fused_head``)."""
        if self.fused_head is False or (self.fused_head is None and device.type != "cuda"):
            return None
        parts, reason = self._fused_parts()  # re-read every call: heads can be resized or replaced
        if parts is None and self.fused_head:
            raise ValueError(f"fused_head=True is no longer possible for {type(self.model).__name__}: {reason}")
        if parts is None and not self._warned_unfused and wrapper_reason(self.model):
            # auto mode on CUDA: a wrapper inside the CGGRModel costs the fused head; say so once, never silently
            self._warned_unfused = True
            warnings.warn(f"CGGRModel: fused head off, the loss takes the (k, T, V) logits path: {reason}",
                          stacklevel=3)
        return parts

    def _score(self, input_ids: Tensor, targets: Tensor, valid: Tensor, attention_mask: Tensor | None,
               reference_loss: Tensor | None, router_kwargs: dict[str, Any], last: dict[str, Any]
               ) -> tuple[Tensor, Tensor]:
        """Router token difficulty (B, T) and sequence scores (B,; -inf without valid targets); router statistics
        into ``last``."""
        r_logits = _router_logits(self.router, input_ids, attention_mask, **router_kwargs)
        scores = token_scores(r_logits, targets, ignore_index=self.ignore_index, impl=self.impl)
        del r_logits
        n_tok = valid.sum(-1)  # (B,)
        if self.scoring == "reducible":
            tok_diff, seq_score = self._reducible(scores.nll, reference_loss, valid, n_tok)
        else:
            tok_diff = difficulty(scores, self.scoring)  # (B, T) fp32
            seq_score = torch.where(valid, tok_diff, 0.0).sum(-1) / n_tok.clamp(min=1)  # (B,)
        seq_score = torch.where(n_tok > 0, seq_score, -torch.inf)
        last["router_confidence"] = masked_mean(scores.confidence, valid)  # padded garbage stays out
        last["router_entropy"] = masked_mean(scores.entropy, valid)
        return tok_diff, seq_score

    def _check_sequence_scores(self, sequence_scores: object, batch: int, device: torch.device,
                               reference_loss: Tensor | None) -> Tensor:
        if self.token_ratio is not None:
            raise ValueError(f"sequence_scores cannot be used with token_ratio={self.token_ratio!r}: the token "
                             "selection needs the router's token scores of this batch")
        if self.selection == "random":
            raise ValueError("sequence_scores is not used by selection='random' (it draws without scores)")
        if reference_loss is not None:
            raise ValueError("pass reference_loss to the computation of sequence_scores (e.g. score_sequences), "
                             "not together with them")
        if not isinstance(sequence_scores, Tensor) or not sequence_scores.is_floating_point():
            got = sequence_scores.dtype if isinstance(sequence_scores, Tensor) else type(sequence_scores).__name__
            raise TypeError(f"sequence_scores must be a floating-point (B,) tensor, got {got}")
        if tuple(sequence_scores.shape) != (batch,):
            raise ValueError(f"sequence_scores must have shape ({batch},) (one score per sequence), got "
                             f"{tuple(sequence_scores.shape)}")
        return sequence_scores.detach().to(device=device, dtype=torch.float32)

    @torch.no_grad()
    def score_sequences(self, input_ids: Tensor, labels: Tensor, attention_mask: Tensor | None = None,
                        reference_loss: Tensor | None = None, **kwargs: Any) -> Tensor:
        """(B,) fp32 per-sequence scores exactly as a training call computes them (router, ``scoring``,
        ``reference_norm``; -inf for a sequence without valid targets), without training: for
        ``forward(..., sequence_scores=)`` on a later step (stale scores) or on a side stream
        (:class:`cggr.async_scoring.AsyncCGGRScorer`). Arguments as in :meth:`forward`."""
        _check_2d("input_ids", input_ids, integer=True)
        _check_2d("labels", labels, input_ids.shape, integer=True)
        _check_2d("attention_mask", attention_mask, input_ids.shape)
        batch = input_ids.shape[0]
        if attention_mask is not None:
            labels = labels.masked_fill(attention_mask == 0, self.ignore_index)
        if self.causal:  # as in forward: position t predicts label t+1, padding predicts nothing
            targets = F.pad(labels[:, 1:], (0, 1), value=self.ignore_index)
            if attention_mask is not None:
                targets = targets.masked_fill(attention_mask == 0, self.ignore_index)
        else:
            targets = labels
        if self.scoring == "reducible":
            if reference_loss is None:
                raise ValueError("reference_loss is required with scoring='reducible'")
            reference_loss = check_reference_loss(reference_loss, batch, input_ids.shape[1], input_ids.device)
        elif reference_loss is not None:
            raise ValueError(f"reference_loss is only used with scoring='reducible', got scoring={self.scoring!r}")
        return self._score(input_ids, targets, targets != self.ignore_index, attention_mask, reference_loss,
                           _batch_kwargs(kwargs, batch), {})[1]

    def last_sequence_scores(self) -> Tensor | None:
        """(B,) scores the last training call computed with its router (None if it ran none), on the device:
        e.g. for :meth:`cggr.async_scoring.SequenceScoreCache.update`."""
        return self._last.get("sequence_scores")

    def _reducible(self, nll: Tensor, reference_loss: Tensor, valid: Tensor, n_tok: Tensor) -> tuple[Tensor, Tensor]:
        """Token difficulty (B, T) and sequence score (B,) of ``scoring='reducible'``.

        The sequence score is ``excess_scores(learner's mean nll, reference's mean loss)`` over the sequences with
        valid targets, normalised per ``reference_norm``; the token difficulty (for ``token_ratio``) is the
        per-token excess with a (B, T) reference, else the router's nll.
        """
        seq_valid = n_tok > 0
        seq_nll = torch.where(valid, nll, 0.0).sum(-1) / n_tok.clamp(min=1)  # (B,)
        if reference_loss.dim() == 2:
            seq_ref = torch.where(valid, reference_loss, 0.0).sum(-1) / n_tok.clamp(min=1)
            tok_diff = excess_scores(nll, reference_loss, valid, normalize=self.reference_norm)
        else:
            seq_ref = reference_loss
            tok_diff = nll
        seq_ref = torch.where(seq_valid, seq_ref, 0.0)  # a sequence without targets may carry a NaN reference
        return tok_diff, excess_scores(seq_nll, seq_ref, seq_valid, normalize=self.reference_norm)

    def _fused_loss(
        self, hidden: Tensor, spec: HeadSpec, kept_targets: Tensor, keep: Tensor, token_ratio: float | None,
        tok_weight: Tensor | None = None, chosen_rows: int | None = None,
    ) -> Tensor:
        """Mean cross-entropy over the kept targets, straight from the final hidden states.

        Args:
            hidden: (k, T, H) hidden states after the final norm.
            spec: Head weight (V, H), bias (V,), softcap and logit scale.
            kept_targets: (k, T) shifted targets, ``ignore_index`` where not kept.
            keep: (k, T) bool, ``kept_targets != ignore_index``.
            token_ratio: The token share of this call (``None``: every valid token).
            tok_weight: Optional (k, T) per-token weights (importance sampling; ``token_ratio`` is then None).
            chosen_rows: Rows the tokens were chosen among when more than these k (global selection: the kept
                tokens of all ranks' K rows were ranked together, so this rank may hold more than its share).

        Returns:
            0-d fp32 loss (0.0 with grad when nothing is kept), equal to the unfused path's.
        """
        k, t, hsize = hidden.shape
        hidden, weight, bias = head_operands(hidden, spec)
        if token_ratio is not None:
            # Only the kept rows matter: gather a static K_max ≥ K of them (kept rows first; the rest carry
            # ignore_index targets), so the head costs ~token_ratio of a full one. K = max(1, round(r · n_valid))
            # and n_valid ≤ k·(T - 1) (the last position of a causal sequence predicts nothing).
            n_rows = k if chosen_rows is None else chosen_rows
            k_max = min(k * t, max(1, math.floor(token_ratio * n_rows * (t - 1) + 0.5)))
            rows = torch.argsort((~keep.reshape(-1)).to(torch.int8), stable=True)[:k_max]  # (K_max,)
            h2 = hidden.reshape(-1, hsize).index_select(0, rows)  # (K_max, H)
            t2 = kept_targets.reshape(-1).index_select(0, rows)  # (K_max,)
        else:  # HF shift: position t predicts label t + 1 (the padded last column is all ignore_index)
            h2 = hidden[:, :-1].reshape(-1, hsize)  # (k·(T-1), H)
            t2 = kept_targets[:, :-1].reshape(-1)  # (k·(T-1),)
        w2 = tok_weight[:, :-1].reshape(-1) if tok_weight is not None else None
        with torch.autocast(hidden.device.type, enabled=False):
            return linear_cross_entropy(
                h2, weight, t2, bias=bias, ratio=1.0, ignore_index=self.ignore_index, softcap=spec.softcap,
                reduction="mean", impl=self.impl, options=self.head_options, row_weights=w2,
            )

    # ------------------------------------------------------------------ metrics
    def get_metrics(self) -> dict[str, Any]:
        """Host-side metrics of the last call (this syncs; call it outside the hot path)."""
        out: dict[str, Any] = {"step": self.host_step(), "scheduled_ratio": self.current_ratio}
        if self._last:
            for key, val in self._last.items():
                if key == "sequence_scores":  # a (B,) tensor: last_sequence_scores()
                    continue
                if key == "indices":
                    out["selected_indices"] = [int(i) for i in val.cpu()]
                elif isinstance(val, Tensor):
                    out[key] = float(val) if val.is_floating_point() else int(val)
                else:
                    out[key] = val
            total = out.get("tokens_total", 0)
            out["token_ratio"] = out["tokens_selected"] / total if total else 0.0
            out["sequence_ratio"] = out["sequences_selected"] / out["batch_size"]
        return out

    def extra_repr(self) -> str:
        return (
            f"min_tokens_ratio={self.schedule.min_tokens_ratio}, warmup_steps={self.schedule.warmup_steps}, "
            f"scoring={self.scoring!r}, selection={self.selection!r}, token_ratio={self.token_ratio}, "
            f"causal={self.causal}, fused_head={self.fused_head}"
        )


# ---------------------------------------------------------------------------------------------- helpers
def _check_num_items(num_items: Any) -> int | Tensor | None:
    """``num_items_in_batch`` as given, checked without reading a device value (no host sync)."""
    if num_items is None:
        return None
    if isinstance(num_items, Tensor):
        if num_items.numel() != 1 or num_items.is_complex() or num_items.dtype == torch.bool:
            raise ValueError(
                f"num_items_in_batch must be a positive int or a one-element real tensor, got a tensor of shape "
                f"{tuple(num_items.shape)} and dtype {num_items.dtype}"
            )
        return num_items.reshape(())
    if isinstance(num_items, bool) or not isinstance(num_items, int) or num_items <= 0:
        raise ValueError(f"num_items_in_batch must be a positive int or a one-element tensor, got {num_items!r}")
    return num_items


def _batch_kwargs(kwargs: dict[str, Any], batch: int, idx: Tensor | None = None) -> dict[str, Any]:
    out = {}
    for key, val in kwargs.items():
        if isinstance(val, Tensor) and val.dim() >= 1 and val.shape[0] == batch and idx is not None:
            val = val.index_select(0, idx)
        out[key] = val
    return out


def _add_trainer_support(model: nn.Module) -> None:
    """Around a transformers model, import :mod:`cggr.integrations.transformers`: it teaches ``transformers.Trainer``
    to save ``Trainer(model=CGGRModel(...))`` as the wrapped model's plain checkpoint and to resume from one."""
    if type(unwrap_model(model)).__module__.startswith("transformers."):
        import cggr.integrations.transformers  # noqa: F401


def _set_router(owner: nn.Module, router: Any) -> None:
    if isinstance(router, TruncatedRouter):
        owner.router = router  # registers no parameters of its own
    else:
        object.__setattr__(owner, "router", router)  # plain reference: no duplicate parameters, no cycles


__all__ = ["CGGRModel", "CGGROutput", "CGGRScorer", "is_masked_lm"]
