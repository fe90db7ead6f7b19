"""What ``CGGRLoss``, ``CGGRScorer`` and ``CGGRModel`` share: the curriculum and the token selector.

Shape legend: B batch, T sequence length, N = B·T tokens.

* :class:`Curriculum` — the warm-up schedule of the kept share, ``step()``, the ``step_count`` buffer (so
  ``state_dict()`` resumes it) with a host mirror (the schedule never reads the device), and one seedable
  counter-based random source (:class:`cggr._rng.CounterRNG`, its counter the ``rng_counter`` buffer).
* :class:`TokenSelector` — the selection settings (a :class:`cggr.SelectionConfig`, checked in :mod:`cggr.config`)
  and one method that turns :class:`TokenScores` into (difficulty, mask, info) with the dynamic threshold
  applied, without a host sync.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cggr._rng import CounterRNG, _capturing
from cggr._validation import check_seed
from cggr.config import SelectionConfig, config_property, resolve_selection_config
from cggr.sampling import importance_select
from cggr.scoring import TokenScores, difficulty, masked_mean
from cggr.selection import RatioSchedule, dynamic_ratio, num_selected, select_tokens


class Curriculum(nn.Module):
    """Kept share ratio(step) falling from 1 to ``min_tokens_ratio`` over ``warmup_steps`` (docs/design.md §4.4).

    Args:
        min_tokens_ratio: Share kept once warm-up is over, in (0, 1].
        warmup_steps: Steps of the linear warm-up (0: the minimum share from the start).
        seed: Seed of the random source of ``stratified`` and ``random`` (a :class:`cggr._rng.CounterRNG` whose
            draw counter is the ``rng_counter`` buffer); ``None``: drawn from torch's global generator at
            construction, so ``torch.manual_seed`` before building the module makes runs repeatable. The seed in
            use is the ``rng_seed`` buffer: ``load_state_dict`` resumes the saved stream (seed and counter).
    """

    step_count: Tensor

    def __init__(self, min_tokens_ratio: float, warmup_steps: int, seed: int | None) -> None:
        super().__init__()
        self.schedule = RatioSchedule(min_tokens_ratio, warmup_steps)
        self.seed = check_seed(seed)
        self.register_buffer("step_count", torch.zeros((), dtype=torch.long))
        self._set_step(0)  # the host mirror of step_count (see host_step)
        # the random source: a counter-based hash (traceable by torch.compile, no host sync); the counter is saved
        rng_seed = self.seed if self.seed is not None else int(torch.randint(0, 2**62, (), dtype=torch.long))
        self.register_buffer("rng_counter", torch.zeros((), dtype=torch.long))
        # the seed travels with the counter (seed=None draws differ between processes); low 64 bits, as int64.
        # The buffer is the seed in use (no host copy): DDP's broadcast of rank 0's buffers reaches the stream
        low = rng_seed & (2**64 - 1)
        self.register_buffer("rng_seed", torch.tensor(low - 2**64 if low >= 2**63 else low, dtype=torch.long))
        self.register_load_state_dict_pre_hook(_default_rng_counter)
        self.register_load_state_dict_post_hook(_sync_step)

    @property
    def min_tokens_ratio(self) -> float:
        return self.schedule.min_tokens_ratio

    @property
    def warmup_steps(self) -> int:
        return self.schedule.warmup_steps

    @property
    def current_ratio(self) -> float:
        """Scheduled share kept at the current step (before any dynamic threshold), from :meth:`host_step`."""
        self.host_step()
        return self._ratio

    def _buffer_key(self) -> tuple | None:
        """What identifies the buffer's current contents without reading them: identity, storage, version counter
        (every in-place op bumps it: ``fill_``, ``copy_``, ``add_``, a checkpoint loader's ``copy_``). ``None``
        for an inference tensor (no version counter): never trusted."""
        b = self.step_count
        return None if b.is_inference() else (id(b), b.data_ptr(), b._version)

    def _mirror_in_sync(self) -> bool:
        """Whether the buffer is unchanged since this module last wrote or read it (no device read)."""
        key = self._buffer_key()
        return key is not None and key == self._seen

    def _set_step(self, step: int) -> None:
        self._step = step
        self._ratio = self.schedule(step)
        self._seen = self._buffer_key()

    def host_step(self) -> int:
        """The step on the host; the ``step_count`` buffer is the truth.

        The host mirror is used while the buffer is unchanged since this module last wrote or read it (compared
        by :meth:`_buffer_key`: no device read); after any outside write (``step_count.fill_(500)``, an in-place
        checkpoint loader, ``.to()``, DDP's buffer broadcast) the buffer is read once: free on the CPU, a host
        sync on an accelerator. While ``torch.compile`` traces or a CUDA graph is captured, the mirror (dynamo
        guards on it; :meth:`step`, called eagerly, reads an outside write). A write through ``.data`` bypasses
        the version counter and is not seen: write the buffer itself.
        """
        if torch.compiler.is_compiling() or _capturing():
            return self._step
        if not self._mirror_in_sync():
            self._set_step(int(self.step_count))
        return self._step

    def _apply(self, fn, recurse=True):
        # ``.to()``/``.cuda()`` replace the buffer by a copy of the same value: keep the mirror trusted (a first
        # step after a device move would otherwise read the buffer back, a host sync) if it was in sync before.
        in_sync = self._mirror_in_sync()
        out = super()._apply(fn, recurse)
        if in_sync:
            self._seen = self._buffer_key()
        return out

    def __getstate__(self):
        # ``copy.deepcopy``/pickling copy the buffer with its value but a new identity and version counter: carry
        # whether the mirror held the buffer's value, so the copy trusts it too (no host read at its first step).
        state = self.__dict__.copy()
        state["_mirror_in_sync"] = self._mirror_in_sync()
        return state

    def __setstate__(self, state):
        in_sync = state.pop("_mirror_in_sync", False)
        super().__setstate__(state)
        if in_sync:
            self._seen = self._buffer_key()

    def step(self) -> None:
        """Advance the curriculum by one optimizer step: ``step_count += 1`` in place.

        No host sync, except once after an outside write to the buffer (then it is read here, so that even a
        compiled module, whose forward uses the mirror, follows the write from the next step on).
        """
        self.host_step()
        self.step_count.add_(1)
        self._set_step(self._step + 1)

    def random_generator(self) -> CounterRNG:
        """The module's random source (draws land on their inputs' device; each advances ``rng_counter``).

        Seed and counter are read from the ``rng_seed`` and ``rng_counter`` buffers at every draw: whatever
        writes them (``load_state_dict``, DDP broadcasting rank 0's buffers, an in-place ``copy_``) is the stream.
        """
        return CounterRNG(self.rng_seed, self.rng_counter)


def _default_rng_counter(module: Curriculum, state_dict, prefix, *_) -> None:
    """State dicts saved before the counter-based random source had no ``rng_counter``: its stream restarts;
    those saved before ``rng_seed`` keep the module's own seed."""
    state_dict.setdefault(prefix + "rng_counter", torch.zeros((), dtype=torch.long))
    state_dict.setdefault(prefix + "rng_seed", module.rng_seed.detach().clone())


def _sync_step(module: Curriculum, incompatible_keys) -> None:
    module._set_step(int(module.step_count))


class TokenSelector(Curriculum):
    """The token selection of :class:`cggr.CGGRLoss` and :class:`cggr.CGGRScorer`: a checked
    :class:`cggr.SelectionConfig` (its fields readable, and assignable with a re-check, as attributes) and one method
    that turns :class:`TokenScores` into (difficulty, mask, info)."""

    #: The class name the settings are checked for (:func:`cggr.config.resolve_selection_config`).
    _selection_owner = "CGGRLoss"

    scoring = config_property("scoring")
    selection = config_property("selection")
    num_strata = config_property("num_strata")
    min_tokens_per_sequence = config_property("min_tokens_per_sequence")
    dynamic_threshold = config_property("dynamic_threshold")
    threshold_sensitivity = config_property("threshold_sensitivity")
    temperature = config_property("temperature")
    uniform_mix = config_property("uniform_mix")
    reference_norm = config_property("reference_norm")
    ignore_index = config_property("ignore_index")

    def __init__(self, config: SelectionConfig) -> None:
        super().__init__(config.min_tokens_ratio, config.warmup_steps, config.seed)
        self._set_selection_config(config)

    def _set_selection_config(self, config: SelectionConfig) -> None:
        self.selection_config = resolve_selection_config(self._selection_owner, config)

    @property
    def uses_dynamic_threshold(self) -> bool:
        return self.dynamic_threshold and self.selection != "fixed_quota"

    def scheduled_ratio(self, device: torch.device) -> float | Tensor:
        """The warm-up share for a call on ``device``, from the ``step_count`` buffer.

        A float when it cannot change (``warmup_steps = 0``) or when the buffer lives on another device (then
        from :meth:`host_step`); else a 0-d tensor computed from the buffer on its device (fp64 where the device
        has it: the same value as the host formula), so an in-place write is seen at once, nothing syncs the host
        and ``torch.compile`` compiles one graph for the whole warm-up.
        """
        if self.warmup_steps == 0:
            return self.min_tokens_ratio
        if self.step_count.device != device:
            return self.current_ratio
        return self.schedule.at(self.step_count)

    def selection_generator(self) -> CounterRNG | None:
        """The generator the randomised strategies draw from; ``None`` for the deterministic ones."""
        randomised = ("stratified", "random", "sampled", "importance")
        return self.random_generator() if self.selection in randomised else None

    def select_scored(self, scores: TokenScores, valid: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Difficulty, selection mask and device-side statistics of scored tokens.

        Args:
            scores: Scores of (N,) or (B, T) tokens.
            valid: Bool mask of the same shape: tokens that may be selected and that count in statistics.

        Returns:
            ``(difficulty fp32, mask bool, info)``; info holds 0-d tensors ``current_ratio`` (after the dynamic
            threshold), ``tokens_selected``, ``tokens_total``, ``confidence`` and ``entropy`` (means over valid).
        """
        diff, mask, info, _ = self.select_scored_weighted(scores, valid)
        return diff, mask, info

    def select_scored_weighted(
        self, scores: TokenScores, valid: Tensor, diff: Tensor | None = None
    ) -> tuple[Tensor, Tensor, dict[str, Tensor], Tensor | None]:
        """As :meth:`select_scored`, with an optional precomputed difficulty (e.g. excess loss) and, for
        ``selection='importance'``, the inclusion probabilities π shaped like ``valid`` (else ``None``); info
        then also holds ``importance_variance_ratio`` (see :mod:`cggr.sampling`)."""
        if diff is None:
            diff = difficulty(scores, self.scoring)
        n_valid = valid.sum()
        mean_conf = masked_mean(scores.confidence, valid)  # a select: garbage at invalid positions stays out
        ratio = self.scheduled_ratio(valid.device)
        if self.uses_dynamic_threshold:
            ratio = dynamic_ratio(ratio, mean_conf, self.threshold_sensitivity)
        pi = None
        rho = None
        if self.selection == "importance":
            k = num_selected(ratio, n_valid)
            mask, pi, rho = importance_select(diff, valid, k, uniform_mix=self.uniform_mix,
                                              generator=self.selection_generator())
        else:
            mask = select_tokens(
                diff,
                valid,
                ratio,
                strategy=self.selection,
                num_strata=self.num_strata,
                min_tokens_per_sequence=self.min_tokens_per_sequence,
                generator=self.selection_generator(),
                temperature=self.temperature,
            )
        info = {
            # a fixed ratio stays a CPU scalar: building a device tensor from it would be a blocking copy
            "current_ratio": ratio.float() if isinstance(ratio, Tensor) else torch.tensor(ratio, dtype=torch.float32),
            "tokens_selected": mask.sum(),
            "tokens_total": n_valid,
            "confidence": mean_conf,
            "entropy": masked_mean(scores.entropy, valid),
        }
        if rho is not None:
            info["importance_variance_ratio"] = rho
        return diff, mask, info, pi

    def extra_repr(self) -> str:
        return (
            f"scoring={self.scoring!r}, selection={self.selection!r}, min_tokens_ratio={self.min_tokens_ratio}, "
            f"warmup_steps={self.warmup_steps}, dynamic_threshold={self.dynamic_threshold}"
        )
