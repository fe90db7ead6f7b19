"""``SelectionConfig``: the selection settings of ``CGGRLoss``, ``CGGRScorer`` and ``CGGRModel``, checked in one place.

The three modules take the same settings (the curriculum, the difficulty signal, the selection rule and its
parameters, ``ignore_index``, the seed). Each builds one frozen :class:`SelectionConfig` from its keyword arguments,
or takes one whole as ``selection_config=``, and validates it through :func:`resolve_selection_config`; its
attributes of the same names (``criterion.selection``, ``model.token_ratio`` ...) read that config, and assigning one
re-validates it. Not every module reads every field:

* all three: ``min_tokens_ratio``, ``warmup_steps``, ``scoring``, ``selection``, ``temperature``, ``ignore_index``,
  ``seed``;
* ``CGGRLoss`` and ``CGGRScorer`` (token rules): ``num_strata``, ``min_tokens_per_sequence``,
  ``dynamic_threshold``, ``threshold_sensitivity``;
* ``CGGRLoss`` and ``CGGRModel`` (importance sampling, reference losses): ``uniform_mix``, ``reference_norm``;
* ``CGGRModel`` only: ``token_ratio``.

A field a module does not read must keep its default there (nothing is dropped silently), and the scoring modes and
selection rules differ: ``'excess'`` is a token score (``CGGRLoss``), ``'reducible'`` a sequence score
(``CGGRModel``); ``CGGRModel`` selects sequences (``topk``, ``random``, ``sampled``, ``importance``), the others
tokens; ``CGGRScorer`` refuses ``importance`` (its mask carries no 1 / π weights).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cggr._validation import (
    SCORING_MODES,
    check_bool,
    check_choice,
    check_ignore_index,
    check_int,
    check_ratio,
    check_seed,
    check_sensitivity,
)
from cggr.reference import REFERENCE_NORMS
from cggr.sampling import DEFAULT_TEMPERATURE, DEFAULT_UNIFORM_MIX, check_temperature, check_uniform_mix
from cggr.selection import SEQUENCE_STRATEGIES, TOKEN_STRATEGIES

#: Scoring modes of CGGRLoss: the shared ones plus ``'excess'`` (Rho-1: token loss − reference token loss).
LOSS_SCORING_MODES = (*SCORING_MODES, "excess")
#: Scoring modes of CGGRModel: the shared ones plus ``'reducible'`` (RHO-LOSS: learner loss − reference loss).
MODEL_SCORING_MODES = (*SCORING_MODES, "reducible")
_ALL_SCORING_MODES = (*SCORING_MODES, "excess", "reducible")


@dataclass(frozen=True)
class SelectionConfig:
    """The selection settings shared by :class:`cggr.CGGRLoss`, :class:`cggr.CGGRScorer` and :class:`cggr.CGGRModel`.

    Frozen and validated at construction (every field, with the message of the module's own keyword argument);
    ``dataclasses.replace(config, field=value)`` makes a checked variant. The defaults are the modules' defaults.

    Attributes:
        min_tokens_ratio: Share kept once warm-up is over, in (0, 1] (tokens, or sequences in ``CGGRModel``).
        warmup_steps: Steps over which the kept share falls linearly from 1 to ``min_tokens_ratio`` (>= 0).
        scoring: Difficulty signal: ``'entropy'``, ``'margin'``, ``'loss'``, ``'combined'``, ``'excess'``
            (``CGGRLoss``) or ``'reducible'`` (``CGGRModel``).
        selection: ``'topk'``, ``'stratified'``, ``'sequence_aware'``, ``'fixed_quota'``, ``'random'``, ``'sampled'``
            or ``'importance'`` (``CGGRModel``: ``'topk'``, ``'random'``, ``'sampled'``, ``'importance'``).
        token_ratio: ``CGGRModel`` only: inside the selected sequences keep the hardest share of valid tokens, in
            (0, 1], or ``None`` (every valid token). Not with ``selection='importance'``.
        num_strata: Buckets of ``stratified`` (>= 1).
        min_tokens_per_sequence: Per-sequence floor of ``sequence_aware`` (>= 1).
        dynamic_threshold: Scale the ratio by the batch's mean confidence (token selection; not ``fixed_quota``).
        threshold_sensitivity: Strength of the dynamic threshold, in [0, 1].
        temperature: τ > 0 of ``sampled``, in difficulty (score) units.
        uniform_mix: λ in (0, 1] of ``importance``.
        reference_norm: How ``'excess'``/``'reducible'`` combine the learner's and the reference's losses:
            ``'none'``, ``'zscore'`` or ``'rank'`` (:func:`cggr.reference.excess_scores`).
        ignore_index: Target (label) value to ignore.
        seed: Seed (an int >= 0) of the module's random stream, or ``None`` (drawn from torch's global generator).
    """

    min_tokens_ratio: float = 0.25
    warmup_steps: int = 1000
    scoring: str = "combined"
    selection: str = "topk"
    token_ratio: float | None = None
    num_strata: int = 4
    min_tokens_per_sequence: int = 1
    dynamic_threshold: bool = True
    threshold_sensitivity: float = 0.5
    temperature: float = DEFAULT_TEMPERATURE
    uniform_mix: float = DEFAULT_UNIFORM_MIX
    reference_norm: str = "none"
    ignore_index: int = -100
    seed: int | None = None

    def __post_init__(self) -> None:
        for name, value in _checked(self, _ALL_SCORING_MODES, TOKEN_STRATEGIES).items():
            object.__setattr__(self, name, value)  # the normalised value (e.g. 1 -> 1.0), as the checks return it


# field -> its check; the value stored is what the check returns
_CHECKS: dict[str, Callable[[Any], Any]] = {
    "min_tokens_ratio": lambda v: check_ratio("min_tokens_ratio", v),
    "warmup_steps": lambda v: check_int("warmup_steps", v, minimum=0),
    "token_ratio": lambda v: None if v is None else check_ratio("token_ratio", v),
    "num_strata": lambda v: check_int("num_strata", v, minimum=1),
    "min_tokens_per_sequence": lambda v: check_int("min_tokens_per_sequence", v, minimum=1),
    "dynamic_threshold": lambda v: check_bool("dynamic_threshold", v),
    "threshold_sensitivity": check_sensitivity,
    "temperature": check_temperature,
    "uniform_mix": check_uniform_mix,
    "reference_norm": lambda v: check_choice("reference_norm", v, REFERENCE_NORMS),
    "ignore_index": check_ignore_index,
    "seed": check_seed,
}


def _checked(config: SelectionConfig, scoring_modes: tuple[str, ...], strategies: tuple[str, ...]) -> dict[str, Any]:
    """Every field of ``config`` checked (scoring and selection against the given choices), normalised.

    The one place the selection settings are validated: ``ValueError``/``TypeError`` naming the field, the value and
    what was expected, as the modules' keyword arguments always reported them.
    """
    out = {
        "scoring": check_choice("scoring", config.scoring, scoring_modes),
        "selection": check_choice("selection", config.selection, strategies),
    }
    out.update((name, check(getattr(config, name))) for name, check in _CHECKS.items())
    if out["selection"] == "importance" and out["token_ratio"] is not None:
        raise ValueError(f"token_ratio={out['token_ratio']!r} cannot be combined with selection='importance' "
                         "(keeping the hardest tokens would bias the importance-weighted estimate); use "
                         "token_ratio=None")
    return out


@dataclass(frozen=True)
class _Owner:
    """What one module accepts: its scoring modes and selection rules, the fields it reads, rules it refuses."""

    scoring_modes: tuple[str, ...]
    strategies: tuple[str, ...]
    fields: frozenset[str]
    refused: tuple[tuple[str, str], ...] = ()  # (selection, why)


_COMMON = frozenset({"min_tokens_ratio", "warmup_steps", "scoring", "selection", "ignore_index", "seed",
                     "temperature"})
_TOKEN_RULES = frozenset({"num_strata", "min_tokens_per_sequence", "dynamic_threshold", "threshold_sensitivity"})
_OWNERS: dict[str, _Owner] = {
    "CGGRLoss": _Owner(LOSS_SCORING_MODES, TOKEN_STRATEGIES, _COMMON | _TOKEN_RULES | {"uniform_mix",
                                                                                        "reference_norm"}),
    "CGGRScorer": _Owner(SCORING_MODES, TOKEN_STRATEGIES, _COMMON | _TOKEN_RULES, refused=(
        ("importance", "selection='importance' needs its 1 / pi weights applied to a loss; CGGRScorer's mask has "
                       "none (use CGGRLoss or CGGRModel for importance sampling, or 'sampled' here)"),
    )),
    "CGGRModel": _Owner(MODEL_SCORING_MODES, SEQUENCE_STRATEGIES, _COMMON | {"token_ratio", "uniform_mix",
                                                                             "reference_norm"}),
}
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(SelectionConfig)}


def _is_default(name: str, value: object) -> bool:
    default = _DEFAULTS[name]
    return type(value) is type(default) and value == default  # True vs 1, 1 vs 1.0, a tensor: not the default


def resolve_selection_config(owner: str, config: SelectionConfig | None = None, **kwargs: Any) -> SelectionConfig:
    """The checked :class:`SelectionConfig` of module ``owner`` (``'CGGRLoss'``, ``'CGGRScorer'``, ``'CGGRModel'``).

    Args:
        owner: The module's class name (in messages, and for the fields and choices it accepts).
        config: A whole config (the ``selection_config=`` argument), or ``None``.
        **kwargs: The module's selection keyword arguments as received (with ``config``: each must keep its default,
            the settings come from one place or the other).

    Raises:
        TypeError, ValueError: A bad field (named, with its value and what was expected); a scoring mode or rule
            the module does not have; a field it does not read set away from its default; keywords and ``config``
            both given.
    """
    spec = _OWNERS[owner]
    if config is None:
        # the module's own choices first, so that its message lists them (not every module's)
        check_choice("scoring", kwargs.get("scoring", _DEFAULTS["scoring"]), spec.scoring_modes)
        check_choice("selection", kwargs.get("selection", _DEFAULTS["selection"]), spec.strategies)
        config = SelectionConfig(**kwargs)
    else:
        if not isinstance(config, SelectionConfig):
            raise TypeError(f"selection_config must be a cggr.SelectionConfig or None, got {type(config).__name__}")
        both = {name: value for name, value in kwargs.items() if not _is_default(name, value)}
        if both:
            given = ", ".join(f"{name}={value!r}" for name, value in both.items())
            raise ValueError(f"{owner}: pass the selection settings either as keyword arguments or as "
                             f"selection_config=, not both (got {given} with selection_config={config!r})")
        check_choice("scoring", config.scoring, spec.scoring_modes)
        check_choice("selection", config.selection, spec.strategies)
    unused = {name: getattr(config, name) for name in _DEFAULTS
              if name not in spec.fields and not _is_default(name, getattr(config, name))}
    if unused:
        given = ", ".join(f"{name}={value!r}" for name, value in unused.items())
        raise ValueError(f"{owner} does not read selection_config's {given}: leave it at the default ({owner} "
                         f"reads {', '.join(sorted(spec.fields))})")
    for rule, why in spec.refused:
        if config.selection == rule:
            raise ValueError(why)
    return config


def config_property(name: str, doc: str = "") -> property:
    """An attribute of a selecting module that reads field ``name`` of its ``selection_config``; assigning it
    checks the changed config as the constructor does (``module._set_selection_config``)."""

    def fget(self: Any) -> Any:
        return getattr(self.selection_config, name)

    def fset(self: Any, value: Any) -> None:
        self._set_selection_config(dataclasses.replace(self.selection_config, **{name: value}))

    return property(fget, fset, doc=doc or f"``selection_config.{name}`` (assigning it re-validates the config).")


__all__ = ["LOSS_SCORING_MODES", "MODEL_SCORING_MODES", "SelectionConfig", "resolve_selection_config"]
