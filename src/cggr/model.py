"""``CGGRModel``: train only on the hardest sequences of each batch, scored by a cheap router.

Shape legend: B batch, T sequence length, H hidden size, V vocabulary, k selected sequences
(k = max(1, round(ratio · B))), K kept tokens, K_max a static bound on K.

Dataflow of one ``CGGRModel`` training call (one private method per step of ``forward``)::

    _targets:  labels (B, T) ──checked once, shifted (causal LMs), padding ignored──> targets (B, T)
    _scores:   input_ids (B, T) ──router (first layers, no grad)──> logits (B, T, V)
        ──scores (fp32; one Triton pass on CUDA)──> difficulty (B, T) ──mean over valid tokens──> seq score (B,)
    _select:   ──topk (k, static)──> idx (k,)
    _rows:     ──index_select──> input_ids (k, T), targets (k, T) [token_ratio: the hardest tokens among them]
    _loss:     ──full model (with grad)──> logits (k, T, V) ──cross-entropy over valid targets──> loss
               fused head (causal LMs on CUDA by default): ──base model──> hidden (k, T, H) ──[≤ K_max kept rows]──>
               linear_cross_entropy with the head's weight and quirks (``cggr._fused_head``; no (k·T, V) logits)

Cost ≈ router (about k_layers/L of a no-grad forward) + ratio × one full training step. Everything stays on the
device: k is a Python int fixed by the ratio, selection uses ``torch.topk``/``index_select`` (no ``nonzero``,
``.item()`` or ``.tolist()``), so with a fixed ratio the step is ``torch.compile``/CUDA-graph friendly.
Metrics that need host values are computed lazily in ``get_metrics()``. Elsewhere: the settings
(:class:`cggr.SelectionConfig`) in :mod:`cggr.config`; the router's scores and :class:`cggr.CGGRScorer` in
:mod:`cggr.scorer`; input checks and the label shift in ``cggr._inputs`` (``CGGRScorer``, ``is_masked_lm`` and
:class:`cggr.outputs.CGGROutput` are re-exported here).
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cggr._calling import ForwardFn, call_model, call_style, check_forward_fn, logits_of
from cggr._fused_head import fused_head_loss, fused_parts
from cggr._inputs import (
    aligned_targets,
    check_2d,
    check_num_items,
    is_masked_lm,
    resolve_router,
    row_kwargs,
    set_router,
)
from cggr._selector import Curriculum
from cggr._validation import check_bool, check_choice, check_int, check_target_range
from cggr.config import SelectionConfig, config_property, resolve_selection_config
from cggr.distributed import GlobalBatch, start_global_batch
from cggr.functional import IMPLS, LinearCrossEntropyOptions, check_head_options
from cggr.integrations.hf_quirks import HeadSpec, wrapper_reason
from cggr.outputs import CGGROutput
from cggr.reference import check_reference_loss
from cggr.router import unwrap_model
from cggr.sampling import DEFAULT_TEMPERATURE, DEFAULT_UNIFORM_MIX
from cggr.scorer import CGGRScorer, check_sequence_scores, router_scores
from cggr.selection import importance_sequences, select_sequences, select_tokens


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
        selection_config: The selection settings as one :class:`cggr.SelectionConfig` instead of the keyword
            arguments ``min_tokens_ratio``, ``warmup_steps``, ``scoring``, ``selection``, ``token_ratio``,
            ``ignore_index``, ``seed``, ``temperature``, ``uniform_mix``, ``reference_norm`` (which then stay at
            their defaults); the attributes of those names read it, and assigning one re-checks it.

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

    _selection_owner = "CGGRModel"

    scoring = config_property("scoring")
    selection = config_property("selection")
    token_ratio = config_property("token_ratio")
    temperature = config_property("temperature")
    uniform_mix = config_property("uniform_mix")
    reference_norm = config_property("reference_norm")
    ignore_index = config_property("ignore_index")

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
        selection_config: SelectionConfig | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        config = resolve_selection_config(
            "CGGRModel", selection_config, min_tokens_ratio=min_tokens_ratio, warmup_steps=warmup_steps,
            scoring=scoring, selection=selection, token_ratio=token_ratio, ignore_index=ignore_index, seed=seed,
            temperature=temperature, uniform_mix=uniform_mix, reference_norm=reference_norm,
        )
        super().__init__(config.min_tokens_ratio, config.warmup_steps, config.seed)
        if fused_head is not None and not isinstance(fused_head, bool):
            raise TypeError(f"fused_head must be a bool or None, got {fused_head!r}")
        check_int("num_router_layers", num_router_layers, minimum=1)
        if causal is not None and not isinstance(causal, bool):
            raise TypeError(f"causal must be a bool or None, got {causal!r}")
        self.global_selection = check_bool("global_selection", global_selection)
        self.process_group = process_group
        self._set_selection_config(config)
        self.forward_fn = check_forward_fn(forward_fn)
        self._call_style = call_style(model)
        self.model = model
        set_router(self, resolve_router(model, router, num_router_layers, self.forward_fn))
        self.causal = (not is_masked_lm(model)) if causal is None else causal
        self.impl = check_choice("impl", impl, IMPLS)
        self.fused_head = fused_head
        self.head_options = check_head_options(head_options, "CGGRModel")
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

    def _set_selection_config(self, config: SelectionConfig) -> None:
        """Check ``config`` for this model (also when an attribute such as ``selection`` is assigned) and use it."""
        config = resolve_selection_config(self._selection_owner, config)
        if self.global_selection and config.selection not in ("topk", "random"):
            raise ValueError(f"global_selection supports selection 'topk' and 'random', got {config.selection!r} "
                             "(its draws or weights are per rank)")
        if self.global_selection and config.scoring == "reducible" and config.reference_norm != "none":
            raise ValueError(f"global_selection needs scores comparable across ranks; reference_norm="
                             f"{config.reference_norm!r} normalises over each rank's batch (use 'none')")
        self.selection_config = config

    # ------------------------------------------------------------------ Hugging Face passthrough
    @property
    def loss_type(self) -> str:
        """``'ForCausalLM'`` or ``'ForMaskedLM'``: tells transformers' Trainer whether labels are shifted, so that
        its ``num_items_in_batch`` counts ``labels[:, 1:]`` for causal LMs, as this wrapper's loss does."""
        return "ForCausalLM" if self.causal else "ForMaskedLM"

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Save the wrapped model with its own ``save_pretrained`` (so ``AutoModelForCausalLM.from_pretrained``
        loads it back as the plain model) plus the curriculum (``cggr_state.pt``: step and random stream). A PEFT
        model saves as ``PeftModel.save_pretrained`` does: its adapters, not the frozen base weights.

        Args:
            save_directory: Directory to write.
            **kwargs: Passed to the wrapped model's ``save_pretrained`` (e.g. ``safe_serialization``,
                ``is_main_process``).
        """
        from cggr.integrations.checkpoints import save_pretrained

        save_pretrained(self, save_directory, **kwargs)

    def activation_checkpointing_enable(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped model's ``activation_checkpointing_enable(*args, **kwargs)`` (what transformers' Trainer calls
        for ``TrainingArguments(activation_checkpointing=True)``; for a PEFT or other frozen-embedding model it also
        makes the embeddings' output require grad, so that the gradient reaches the adapters through recomputed
        layers). The router runs without grad and stores nothing to recompute."""
        return _hf_method(self.model, "activation_checkpointing_enable")(*args, **kwargs)

    def gradient_checkpointing_enable(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped model's ``gradient_checkpointing_enable``: the name transformers' Trainer calls before 5.x."""
        return _hf_method(self.model, "gradient_checkpointing_enable")(*args, **kwargs)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, *, model_class: Any = None,
        model_kwargs: dict[str, Any] | None = None, base_model: nn.Module | None = None, **cggr_kwargs: Any,
    ) -> CGGRModel:
        """``CGGRModel(model_class.from_pretrained(path, **model_kwargs), **cggr_kwargs)`` (``model_class``
        default ``AutoModelForCausalLM``), with the curriculum of ``cggr_state.pt`` when the directory has one
        (see :meth:`save_pretrained`). A PEFT adapter directory loads as a trainable ``PeftModel``: on
        ``base_model`` (the plain model the adapter was trained on) when given, else on the base model named in
        its ``adapter_config.json``."""
        from cggr.integrations.checkpoints import from_pretrained

        return from_pretrained(cls, pretrained_model_name_or_path, model_class=model_class, model_kwargs=model_kwargs,
                               base_model=base_model, **cggr_kwargs)

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
        targets = self._targets(input_ids, labels, attention_mask)  # (B, T), aligned with the logits
        num_items = check_num_items(num_items_in_batch)
        valid = targets != self.ignore_index  # (B, T)
        batch = input_ids.shape[0]
        # eval mode: the loss of every sequence and token, so an evaluation loop (HF Trainer.evaluate, a
        # held-out pass) reports the true loss, not the hardest share's; no router, no random draw
        routing = self.training
        token_ratio = self.token_ratio if routing else None
        k = self.num_selected_sequences(batch) if routing else batch
        glob = (start_global_batch(self.process_group, input_ids, targets, attention_mask, kwargs, num_items)
                if routing and self.global_selection else None)  # global_selection: start gathering every rank's rows
        last: dict[str, Tensor | int] = {}  # a fresh dict per call (never read here: no compile guards on it)
        tok_diff, seq_score = self._scores(input_ids, targets, valid, attention_mask, reference_loss,
                                           sequence_scores if routing else None, kwargs, k, token_ratio, last)

        gathered: dict[str, Tensor] = {}
        if glob is not None:  # every rank now holds all W·B rows and the same scores; K = W·k are chosen
            input_ids, targets, attention_mask, gathered = glob.rows()
            kwargs = {**kwargs, **gathered}
            if seq_score is not None:
                seq_score, tok_diff = glob.scores(seq_score, tok_diff)
            valid = targets != self.ignore_index
            batch, k = batch * glob.world_size, k * glob.world_size
        idx, seq_weight = self._select(seq_score, batch, k, routing, glob, input_ids.device, last)  # (k,), (k,)
        sub_ids, sub_targets, sub_mask, sub_kwargs, keep, kept_targets = self._rows(
            idx, input_ids, targets, attention_mask, kwargs, batch, tok_diff, token_ratio)  # (k, T) each
        n_keep = keep.sum()
        router_selected = (sub_targets != self.ignore_index).sum()
        n_global = n_keep
        if glob is not None:  # this rank's share of the K chosen rows; the global count normalises
            sub_ids, keep, kept_targets = (glob.share(t) for t in (sub_ids, keep, kept_targets))
            sub_mask = glob.share(sub_mask) if sub_mask is not None else None
            sub_kwargs = {key: glob.share(val) if key in gathered else val for key, val in sub_kwargs.items()}
            n_keep = keep.sum()
        # importance: token weights n_keep / (π_i · N_valid) under the mean over kept tokens, so the loss is
        # Σ nll / (π_i · N_valid) (Horvitz-Thompson over the whole batch's valid targets)
        tok_weight = None
        if seq_weight is not None:
            tok_weight = (seq_weight * (n_keep / valid.sum().clamp(min=1))).unsqueeze(1).expand(k, sub_ids.shape[1])
        loss, logits = self._loss(self._fused_for(input_ids.device), sub_ids, sub_mask, sub_kwargs, kept_targets,
                                  keep, n_keep, token_ratio, tok_weight, None if glob is None else k)
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
            tokens_selected=n_global.detach(),
            tokens_total=valid.sum().detach(),
            sequences_selected=k,
            batch_size=batch,
        )
        self._last = last
        return CGGROutput(loss=loss, logits=logits)

    # ------------------------------------------------------------------ the steps of forward
    def _targets(self, input_ids: Tensor, labels: Tensor, attention_mask: Tensor | None) -> Tensor:
        """Shift: the checked (B, T) inputs and the targets aligned with the logits (:func:`cggr._inputs.
        aligned_targets`). The one place ``labels`` are validated: shape, device, an integer dtype (before any
        ``.long()``: floats never truncate) and, where the head's weight is a plain (V, H) matrix here, the range
        [0, V) or ``ignore_index`` (named ``labels``, as passed; skipped for e.g. FSDP's flattened parameters
        outside forward: the loss still checks)."""
        check_2d("input_ids", input_ids, integer=True)
        check_2d("labels", labels, input_ids.shape, integer=True, device=input_ids.device)
        check_2d("attention_mask", attention_mask, input_ids.shape, device=input_ids.device)
        head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        head_w = getattr(head, "weight", None)
        if isinstance(head_w, Tensor) and head_w.dim() == 2 and head_w.shape[0] > 0:
            check_target_range(labels, head_w.shape[0], ignore_index=self.ignore_index, name="labels")
        return aligned_targets(labels, attention_mask, causal=self.causal, ignore_index=self.ignore_index)

    def _scores(self, input_ids: Tensor, targets: Tensor, valid: Tensor, attention_mask: Tensor | None,
                reference_loss: Tensor | None, given: Tensor | None, kwargs: dict[str, Any], k: int,
                token_ratio: float | None, last: dict[str, Any]) -> tuple[Tensor | None, Tensor | None]:
        """Score: ``(token difficulty (B, T), sequence scores (B,))`` to select by, from the router (router
        statistics and the scores into ``last``) or from ``given`` precomputed scores (``sequence_scores=``; then no
        token difficulty); ``(None, None)`` when the call needs none (every sequence kept, or ``random`` without
        ``token_ratio``). Checks ``reference_loss`` whenever given."""
        batch = input_ids.shape[0]
        need_scores = (self.selection != "random" and k < batch) or token_ratio is not None
        given_scores: Tensor | None = None
        if given is not None:
            given_scores = self._check_sequence_scores(given, batch, input_ids.device, reference_loss)
            need_scores = False
        if reference_loss is not None:
            reference_loss = check_reference_loss(reference_loss, batch, input_ids.shape[1], input_ids.device)
        elif need_scores and self.scoring == "reducible":
            raise ValueError("reference_loss is required with scoring='reducible' in training mode: the reference "
                             f"model's losses per sequence ({batch},) or per token {tuple(input_ids.shape)} "
                             "(cggr.reference.ReferenceLosses)")
        if need_scores:
            tok_diff, seq_score, stats = self._score(input_ids, targets, valid, attention_mask, reference_loss,
                                                     row_kwargs(kwargs, batch))
            last.update(stats)
            last["sequence_scores"] = seq_score.detach()
            return tok_diff, seq_score
        if given_scores is not None:
            return None, torch.where(valid.any(-1), given_scores, -torch.inf)  # (B,)
        return None, None

    def _score(self, input_ids: Tensor, targets: Tensor, valid: Tensor, attention_mask: Tensor | None,
               reference_loss: Tensor | None, router_kwargs: dict[str, Any]) -> tuple[Tensor, Tensor, dict]:
        """:func:`cggr.scorer.router_scores` with this model's router and settings."""
        return router_scores(self.router, input_ids, targets, valid, attention_mask, reference_loss, router_kwargs,
                             scoring=self.scoring, reference_norm=self.reference_norm,
                             ignore_index=self.ignore_index, impl=self.impl)

    def _select(self, seq_score: Tensor | None, batch: int, k: int, routing: bool, glob: GlobalBatch | None,
                device: torch.device, last: dict[str, Any]) -> tuple[Tensor, Tensor | None]:
        """Select: the (k,) batch indices to train on and, for ``importance``, their 1 / π weights (k,) (else
        ``None``; its statistics into ``last``). Global selection: the sorted W·k of the gathered batch."""
        if glob is not None:
            if k == batch:
                return torch.arange(batch, device=device), None
            # sorted, so that rank r's share is rows [r·k, (r+1)·k) of one list that every rank holds
            if self.selection == "random":
                seq_score = glob.random_scores(self.random_generator(), device)
            return torch.sort(select_sequences(seq_score, k)).values, None  # (K,)
        if self.selection == "random" and routing:
            return self.random_generator().permutation(batch, device)[:k], None
        if k == batch:
            return torch.arange(batch, device=device), None
        if self.selection == "importance":
            idx, pi, rho = importance_sequences(seq_score, k, uniform_mix=self.uniform_mix,
                                                generator=self.random_generator())  # (k,), (k,)
            seq_weight = torch.where(pi > 0, 1.0 / pi.clamp(min=1e-30), 0.0).float()
            last["importance_variance_ratio"] = rho
            last["importance_max_weight"] = seq_weight.max()
            return idx, seq_weight
        gen = self.random_generator() if self.selection == "sampled" else None
        return select_sequences(seq_score, k, strategy=self.selection, generator=gen,
                                temperature=self.temperature), None

    def _rows(self, idx: Tensor, input_ids: Tensor, targets: Tensor, attention_mask: Tensor | None,
              kwargs: dict[str, Any], batch: int, tok_diff: Tensor | None, token_ratio: float | None):
        """The selected rows: ``(input_ids, targets, attention_mask, kwargs, keep, kept_targets)``, each (k, T)
        (kwargs: their batch-shaped tensors); ``keep`` marks the targets the loss counts (with ``token_ratio``, the
        hardest share of the valid ones by router difficulty) and ``kept_targets`` is ``ignore_index`` elsewhere."""
        sub_ids = input_ids.index_select(0, idx)  # (k, T)
        sub_targets = targets.index_select(0, idx)  # (k, T)
        sub_mask = attention_mask.index_select(0, idx) if attention_mask is not None else None
        sub_kwargs = row_kwargs(kwargs, batch, idx)
        if token_ratio is not None:
            sub_valid = sub_targets != self.ignore_index  # (k, T)
            keep = select_tokens(tok_diff.index_select(0, idx), sub_valid, token_ratio)  # (k, T)
            kept_targets = torch.where(keep, sub_targets, self.ignore_index)
        else:
            keep = sub_targets != self.ignore_index
            kept_targets = sub_targets
        return sub_ids, sub_targets, sub_mask, sub_kwargs, keep, kept_targets

    def _loss(self, fused: tuple[nn.Module, HeadSpec] | None, ids: Tensor, mask: Tensor | None,
              kwargs: dict[str, Any], kept_targets: Tensor, keep: Tensor, n_keep: Tensor, token_ratio: float | None,
              tok_weight: Tensor | None, chosen_rows: int | None) -> tuple[Tensor, Tensor | None]:
        """Loss: the mean cross-entropy over the kept targets of the selected rows (0.0 with grad when there are
        none; ``tok_weight``: importance weights) and the (k, T, V) logits it came from (``None`` with the fused
        head: :func:`cggr._fused_head.fused_head_loss`)."""
        if fused is not None:
            base, spec = fused
            out = base(input_ids=ids, attention_mask=mask, **kwargs)
            hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]  # (k, T, H)
            loss = fused_head_loss(hidden, spec, kept_targets, keep, token_ratio=token_ratio, impl=self.impl,
                                   ignore_index=self.ignore_index, options=self.head_options, tok_weight=tok_weight,
                                   chosen_rows=chosen_rows)
            return loss, None
        out = call_model(self.model, self._call_style, ids, mask, self.forward_fn, **kwargs)
        logits = logits_of(out, type(self.model).__name__)  # (k, T, V)
        if logits.dim() != 3 or logits.shape[:2] != ids.shape:
            raise ValueError(
                f"{type(self.model).__name__} returned logits of shape {tuple(logits.shape)} for input_ids of "
                f"shape {tuple(ids.shape)}; expected (k, T, V) = ({ids.shape[0]}, {ids.shape[1]}, "
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
        return ce / n_keep.clamp(min=1), logits  # mean over kept tokens; 0.0 (with grad) when there are none

    # ------------------------------------------------------------------ fused head
    def _fused_parts(self) -> tuple[tuple[nn.Module, HeadSpec] | None, str]:
        """``((base model, head spec), "")`` when the fused head can run, else ``(None, reason)``."""
        return fused_parts(self.model, forward_fn=self.forward_fn, causal=self.causal)

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

    # ------------------------------------------------------------------ precomputed sequence scores
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
        return check_sequence_scores(sequence_scores, batch, device)

    @torch.no_grad()
    def score_sequences(self, input_ids: Tensor, labels: Tensor, attention_mask: Tensor | None = None,
                        reference_loss: Tensor | None = None, **kwargs: Any) -> Tensor:
        """(B,) fp32 per-sequence scores exactly as a training call computes them (router, ``scoring``,
        ``reference_norm``; -inf for a sequence without valid targets), without training: for
        ``forward(..., sequence_scores=)`` on a later step (stale scores) or on a side stream
        (:class:`cggr.async_scoring.AsyncCGGRScorer`). Arguments as in :meth:`forward` (checked the same way)."""
        targets = self._targets(input_ids, labels, attention_mask)
        batch = input_ids.shape[0]
        if self.scoring == "reducible":
            if reference_loss is None:
                raise ValueError("reference_loss is required with scoring='reducible'")
            reference_loss = check_reference_loss(reference_loss, batch, input_ids.shape[1], input_ids.device)
        elif reference_loss is not None:
            raise ValueError(f"reference_loss is only used with scoring='reducible', got scoring={self.scoring!r}")
        return self._score(input_ids, targets, targets != self.ignore_index, attention_mask, reference_loss,
                           row_kwargs(kwargs, batch))[1]

    def last_sequence_scores(self) -> Tensor | None:
        """(B,) scores the last training call computed with its router (None if it ran none), on the device:
        e.g. for :meth:`cggr.async_scoring.SequenceScoreCache.update`."""
        return self._last.get("sequence_scores")

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


def _hf_method(model: nn.Module, name: str) -> Callable[..., Any]:
    """``name`` of the model inside DDP/compile/PEFT wrappers, or an AttributeError saying which model lacks it."""
    inner = unwrap_model(model)
    method = getattr(inner, name, None)
    if not callable(method):
        raise AttributeError(f"CGGRModel.{name}: the wrapped model {type(inner).__name__} has no {name} (a "
                             "transformers PreTrainedModel has); enable checkpointing on the model itself")
    return method


def _add_trainer_support(model: nn.Module) -> None:
    """Around a transformers model, or once ``transformers.Trainer`` is imported: ``Trainer(model=CGGRModel(...))``
    checkpoints and a curriculum that steps without ``callbacks=[CGGRCallback()]`` (cggr.integrations.checkpoints)."""
    if type(unwrap_model(model)).__module__.startswith("transformers.") or "transformers.trainer" in sys.modules:
        try:
            import transformers.trainer_callback  # noqa: F401
        except ImportError:  # transformers without its Trainer (e.g. no torch.distributed): nothing to support
            return
        from cggr.integrations.callback import CGGRCallback
        from cggr.integrations.checkpoints import install_trainer_support

        install_trainer_support(model_class=CGGRModel, callback_class=CGGRCallback)


__all__ = ["CGGRModel", "CGGROutput", "CGGRScorer", "is_masked_lm"]
